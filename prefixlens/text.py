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

**Which default BOS.** Text that *starts* a sequence (a prompt given to ``from_prompt``, or the input
of ``generate`` without a prefix) gets the model's default. Text that comes *after* a prefix
(``run_with_prefix``, ``run_with_cache``, ``generate``/``decompose``/the analysis functions with a
prefix) is a continuation and gets the **prefix's own policy** (``after=prefix`` below): a prefix
trained on text records the BOS policy its inputs were trained with (``prefix.content_bos``, saved in
its file; PEFT's convention is a BOS after the prefix when the tokenizer adds one, and so is
:func:`prefixlens.train_prefix`'s default), and text after it gets exactly that BOS policy, so the
documented calls reproduce the training format. Every other prefix (``content_bos=None``: from a
prompt, random, made of ids) gets **no BOS**: the prefix stands for the start of the sequence, so ``run_with_prefix(m, content, KVPrefix.from_prompt(m, prompt))``
equals the model on ``encode(prompt) + encode(content, prepend_bos=False)``. That is the concatenation of
the two texts' tokens, which can differ from tokenising ``prompt + content`` jointly where a token would
merge across the boundary (e.g. ``"Hello"`` + ``" world"`` splits as the joint text does, but ``"Hel"`` +
``"lo"`` does not); the prefix is then exact for the token concatenation. An explicit ``prepend_bos=``
always wins over the prefix's policy (e.g. ``prepend_bos=True`` after a PEFT prefix imported without one).

**Chat models.** :func:`chat_prefix` makes a prefix of a system prompt (or any leading turns) rendered
by the tokenizer's chat template, and :func:`chat_continuation` the ids of the turns that follow it, so
that prefix + continuation equals the model on ``tokenizer.apply_chat_template(all turns)``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from jaxtyping import Int, Integer, Shaped
from torch import Tensor

__all__ = [
    "is_text",
    "checkpoint_prepends_bos",
    "default_prepend_bos",
    "content_prepend_bos",
    "encode",
    "tokens_and_mask",
    "decode",
    "chat_ids",
    "chat_prefix",
    "chat_continuation",
]

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


def content_prepend_bos(prefix, prepend_bos: bool | None = None) -> bool:
    """Whether text after ``prefix`` gets a BOS: ``prepend_bos`` when given, else the policy the prefix
    was trained with (``prefix.content_bos``), else no BOS (the text continues the prefix)."""
    if prepend_bos is not None:
        return bool(prepend_bos)
    return bool(getattr(prefix, "content_bos", None))


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
    if not text:
        raise ValueError(
            "empty string: give at least one character of text (for a BOS-only input, pass the BOS id as tokens)."
        )
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
    attention_mask: Shaped[Tensor, "batch mask_pos"] | None = None,
    prepend_bos: bool | None = None,
    continuation: bool = False,
    after=None,
) -> tuple[Tensor | Sequence[int] | Sequence[Sequence[int]], Shaped[Tensor, "batch mask_pos"] | None]:
    """``inputs`` as ids, with the attention mask to use.

    ``prepend_bos=None`` means :func:`default_prepend_bos` for text that starts a sequence, and for
    text that continues a prefix (``continuation``, or ``after`` = that prefix) the prefix's trained
    policy, :func:`content_prepend_bos` (no BOS for a prefix without one: see the module docstring).

    Text: a string gives ``[1, T]``; a list of strings gives ``[B, T_max]``, left-padded, with a
    ``[B, T_max]`` mask when the lengths differ (``None`` when they do not). A mask may not be passed
    with text (it is built from the text). Ids (a tensor or nested lists of ints) are returned as given,
    with the given mask; ``prepend_bos`` is refused for ids, since they are used exactly as they are.
    The ids are on the model's device.

    Args:
        model (TransformerBridge): the model whose tokenizer encodes the text.
        inputs: a string, a list of strings, or ids (a tensor or nested lists of ints).
        attention_mask: the mask that goes with ids (refused with text).
        prepend_bos: give text a BOS token (``None``: see above; refused with ids).
        continuation: the text continues a prefix (no BOS by default).
        after (Prefix | None): the prefix the text continues (its ``content_bos`` is the default; implies
            ``continuation``).

    Returns:
        ``(ids, mask)``: the ids on the model's device and the mask (``None`` without padding).
    """
    if isinstance(inputs, (list, tuple)) and any(isinstance(x, str) for x in inputs) and not is_text(inputs):
        raise TypeError(
            "a list mixing strings and token ids: pass either a list of strings or ids (a tensor or lists of ints)."
        )
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
    if prepend_bos is None and (continuation or after is not None):
        prepend_bos = content_prepend_bos(after)
    texts = [inputs] if isinstance(inputs, str) else list(inputs)
    return _padded(model, [encode(model, t, prepend_bos) for t in texts])


def _padded(model, rows: list[list[int]]) -> tuple[Tensor, Tensor | None]:
    """Rows of ids, left-padded to one width, with a mask when they are ragged; on the model's device."""
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
    tokens: Integer[Tensor, "batch pos"] | Integer[Tensor, " pos"],
    attention_mask: Shaped[Tensor, "batch pos"] | None = None,
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


# --------------------------------------------------------------------------------------------------
# Chat models: a prefix from the chat template
# --------------------------------------------------------------------------------------------------

Message = Mapping[str, str]


def _messages(turns, what: str, role: str = "system") -> list[dict]:
    """``turns`` as a list of ``{"role", "content"}`` dicts; a string is one message of ``role``."""
    if isinstance(turns, str):
        return [{"role": role, "content": turns}]
    if isinstance(turns, Mapping):
        turns = [turns]
    turns = list(turns) if isinstance(turns, (list, tuple)) else turns
    if not isinstance(turns, list) or not turns or not all(
        isinstance(m, Mapping) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in turns
    ):
        raise TypeError(
            f"{what} must be a string (one {role} message) or a non-empty list of {{'role': ..., 'content': ...}} "
            f"messages, got {turns!r:.120}."
        )
    return [dict(m) for m in turns]


def chat_ids(model, messages, add_generation_prompt: bool = False) -> list[int]:
    """The ids of ``messages`` rendered by the tokenizer's own chat template
    (``tokenizer.apply_chat_template(messages, tokenize=True, ...)``; the template decides every special
    token, BOS included). Raises ``ValueError`` for a tokenizer without a chat template."""
    tokenizer = _tokenizer(model)
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            f"the model's tokenizer ({getattr(tokenizer, 'name_or_path', type(tokenizer).__name__)}) has no chat "
            f"template, so chat messages cannot be rendered: pass the prompt as text or ids (from_prompt), or "
            f"set tokenizer.chat_template."
        )
    out = tokenizer.apply_chat_template(
        _messages(messages, "messages"), tokenize=True, add_generation_prompt=add_generation_prompt
    )
    ids = out["input_ids"] if isinstance(out, Mapping) else out
    if ids and isinstance(ids[0], (list, tuple)):
        ids = ids[0]
    return [int(i) for i in ids]


def chat_prefix(model, system, form: str = "kv"):
    """A prefix holding a system prompt (or any leading turns) as the chat template renders it.

    ``system``: a string (one ``{"role": "system"}`` message) or a list of messages (e.g. a system
    prompt and few-shot turns). ``form``: ``"kv"`` (:class:`~prefixlens.KVPrefix`), ``"residual"``
    or ``"soft"`` (or the class name; :func:`prefixlens.prefixes.form_class`). The prefix is
    ``from_prompt`` of :func:`chat_ids` of those turns without a generation prompt
    (``form_class(form).from_chat``); follow it with :func:`chat_continuation`.
    """
    # imported when called: the prefix forms sit above this module (they import it at module level)
    from prefixlens.prefixes import form_class

    return form_class(form).from_chat(model, system)


def chat_continuation(
    model, messages, system, add_generation_prompt: bool = True
) -> tuple[Tensor, Int[Tensor, "batch pos"] | None]:
    """The ids of ``messages`` as they continue the templated ``system`` turns of :func:`chat_prefix`,
    with the mask: ``(tokens [B, T], mask or None)``, as :func:`tokens_and_mask` returns.

    ``messages``: one conversation (a list of messages, one message, or a string: one user message)
    or a list of conversations (left-padded, with a mask when ragged). Each row is ``chat_ids(system + conversation)`` with the
    ids of ``chat_ids(system)`` removed from its start, so
    ``run_with_prefix(model, *row, chat_prefix(model, system))`` is the model on the whole templated
    conversation. ``add_generation_prompt=True`` ends with the assistant header, ready for
    ``generate``. Raises ``ValueError`` when the template does not render the system turns as a token
    prefix of the whole conversation (templates that fold the system prompt into the first user turn,
    or tokens merging across the boundary): such a conversation cannot be split into a prefix and a
    continuation.
    """
    head_messages = _messages(system, "system")
    head = chat_ids(model, head_messages, add_generation_prompt=False)
    if isinstance(messages, (str, Mapping)) or (
        isinstance(messages, (list, tuple)) and messages and isinstance(messages[0], Mapping)
    ):
        conversations = [messages]
    elif isinstance(messages, (list, tuple)) and messages:
        conversations = list(messages)
    else:
        raise TypeError(f"messages must be a conversation or a non-empty list of conversations, got {messages!r:.120}.")
    rows = []
    for conversation in conversations:
        full = chat_ids(model, head_messages + _messages(conversation, "messages", "user"), add_generation_prompt)
        if full[: len(head)] != head:
            raise ValueError(
                "the chat template does not render the system turns as a token prefix of the whole conversation "
                f"(first {len(head)} ids differ), so the conversation cannot be split into a prefix and its "
                "continuation; run the whole templated conversation (chat_ids) as tokens instead."
            )
        if len(full) == len(head):
            raise ValueError("the conversation adds no tokens after the system turns: give at least one message.")
        rows.append(full[len(head) :])
    return _padded(model, rows)
