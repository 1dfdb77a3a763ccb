"""Text in, text out: one tokenisation policy for every entry point.

Every function that takes content tokens (``run_with_prefix``, ``run_with_cache``, ``generate``,
``decompose``, the analysis functions, ``from_prompt``, training) also takes a string or a list of
strings, turned into ids here and nowhere else:

- **BOS** is explicit: ``prepend_bos=True/False``, or ``None`` for the model's default,
  ``model.cfg.default_prepend_bos``. :func:`prefixlens.models.load` sets that default from the
  checkpoint's own tokenizer (SmolLM2's adds no BOS, so ``"Hi"`` is ``[26843]``, not TransformerLens's
  ``[1, 26843]``, whose stray ``<|im_start|>`` changes the model's answers).
- **Ragged lists** are padded on the **left** (HuggingFace's convention for generation) with the
  tokenizer's pad token (or 0) and come with an ``attention_mask`` (1 = real token), which every
  entry point honours (see :mod:`prefixlens.injection`). Equal-length lists get no mask.
- Each string is encoded alone, without the tokenizer's other special tokens, so a row of a batch is
  exactly the ids of that string alone.
"""

from __future__ import annotations

from typing import Sequence

import torch
from jaxtyping import Int
from torch import Tensor

__all__ = ["is_text", "checkpoint_prepends_bos", "default_prepend_bos", "encode", "tokens_and_mask", "decode"]

TextOrTokens = str | Sequence[str] | Tensor | Sequence[int] | Sequence[Sequence[int]]


def is_text(inputs) -> bool:
    """Whether ``inputs`` is a string or a non-empty list/tuple of strings (rather than ids)."""
    if isinstance(inputs, str):
        return True
    return isinstance(inputs, (list, tuple)) and len(inputs) > 0 and all(isinstance(s, str) for s in inputs)


def checkpoint_prepends_bos(tokenizer) -> bool:
    """Whether ``tokenizer`` (as loaded from the checkpoint, before any bridge changes it) starts an
    encoded text with its BOS token. Measured by encoding, since ``tokenizer_config.json`` can say
    otherwise than what ``__call__`` does."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return False
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return len(ids) > 0 and ids[0] == bos


def default_prepend_bos(model) -> bool:
    """The BOS policy used when ``prepend_bos=None``: ``model.cfg.default_prepend_bos``."""
    return bool(getattr(model.cfg, "default_prepend_bos", True))


def _tokenizer(model):
    tokenizer = getattr(model, "tokenizer", None)
    if tokenizer is None:
        raise ValueError(
            "this model has no tokenizer, so it cannot take text: pass token ids instead, or load the model "
            "with its tokenizer (prefixlens.models.load)."
        )
    return tokenizer


def encode(model, text: str, prepend_bos: bool | None = None) -> list[int]:
    """The ids of one string: the tokenizer's encoding without special tokens, after BOS when
    ``prepend_bos`` (``None``: :func:`default_prepend_bos`)."""
    if not isinstance(text, str):
        raise TypeError(f"expected a string, got {type(text).__name__}.")
    tokenizer = _tokenizer(model)
    bos = default_prepend_bos(model) if prepend_bos is None else bool(prepend_bos)
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    if bos:
        if tokenizer.bos_token_id is None:
            raise ValueError(
                "prepend_bos=True but the model's tokenizer has no BOS token: pass prepend_bos=False."
            )
        ids = [int(tokenizer.bos_token_id)] + ids
    if not ids:
        raise ValueError(f"{text!r} encodes to no tokens; give at least one content token.")
    return ids


def tokens_and_mask(
    model,
    inputs: TextOrTokens,
    attention_mask: Int[Tensor, "batch pos"] | None = None,
    prepend_bos: bool | None = None,
) -> tuple[Tensor, Int[Tensor, "batch pos"] | None]:
    """``inputs`` as ids, with the attention mask to use.

    Text: a string gives ``[1, T]``; a list of strings gives ``[B, T_max]``, left-padded, with a
    ``[B, T_max]`` mask when the lengths differ (``None`` when they do not). A mask may not be passed
    with text (it is built from the text). Ids (a tensor or nested lists of ints) are returned as given,
    with the given mask; ``prepend_bos`` is refused for ids, since they are used exactly as they are.
    The ids are on the model's device.
    """
    if not is_text(inputs):
        if prepend_bos is not None:
            raise ValueError(
                "prepend_bos applies to text only: token ids are used exactly as given (add or drop the BOS "
                "id yourself, or pass the text)."
            )
        return inputs, attention_mask
    if attention_mask is not None:
        raise ValueError(
            "attention_mask was given with text: the mask of a list of strings is built from the text (left "
            "padding); pass token ids to use your own mask."
        )
    texts = [inputs] if isinstance(inputs, str) else list(inputs)
    rows = [encode(model, t, prepend_bos) for t in texts]
    width = max(len(r) for r in rows)
    pad = _tokenizer(model).pad_token_id
    pad = 0 if pad is None else int(pad)
    tokens = torch.tensor([[pad] * (width - len(r)) + r for r in rows], dtype=torch.long)
    mask = None
    if any(len(r) != width for r in rows):
        mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], dtype=torch.long)
    device = model.cfg.device
    if device is not None:
        tokens = tokens.to(device)
        mask = mask.to(device) if mask is not None else None
    return tokens, mask


def decode(
    model,
    tokens: Int[Tensor, "batch pos"],
    attention_mask: Int[Tensor, "batch pos"] | None = None,
    skip_special_tokens: bool = False,
) -> list[str]:
    """One string per row of ``tokens``, padding (``attention_mask == 0``) left out."""
    tokenizer = _tokenizer(model)
    tokens = torch.as_tensor(tokens)
    if tokens.ndim == 1:
        tokens = tokens[None]
    out = []
    for i, row in enumerate(tokens.tolist()):
        if attention_mask is not None:
            keep = torch.as_tensor(attention_mask)[i].tolist()
            row = [t for t, k in zip(row, keep) if k]
        out.append(tokenizer.decode(row, skip_special_tokens=skip_special_tokens))
    return out
