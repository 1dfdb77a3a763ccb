"""Running a model with a prefix in place, through its HookPoints.

The model runs on ``[P placeholder tokens] + tokens``; the prefix's hooks overwrite the
placeholder positions ``0..P-1`` in every layer. Content token ``t`` therefore sits at position
``P + t``, exactly as after a real prompt of length ``P`` (the convention of PEFT and of the
reference code), so masks, rotary positions and grouped-query attention need no special handling.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
from jaxtyping import Float, Int
from torch import Tensor
from transformer_lens import ActivationCache

from prefixlens.prefixes import Prefix
from prefixlens.signature import model_dtype_device

__all__ = ["Slots", "attached", "maybe_attached", "run_with_prefix", "run_with_cache", "check_tokens"]

PLACEHOLDER_TOKEN = 0


@dataclass(frozen=True)
class Slots:
    """How positions map while a prefix is attached: slots ``0..n-1``, content from ``n`` on."""

    n: int
    placeholder: int = PLACEHOLDER_TOKEN

    def placeholders(self, batch: int, device=None) -> Int[Tensor, "batch n"]:
        return torch.full((batch, self.n), self.placeholder, dtype=torch.long, device=device)

    def prepend(self, tokens: Int[Tensor, "batch pos"]) -> Int[Tensor, "batch n+pos"]:
        """``[placeholders] + tokens``: the input to give the model while the prefix is attached."""
        return torch.cat([self.placeholders(tokens.shape[0], tokens.device), tokens], dim=1)

    def content(self, activation: Tensor, dim: int = 1) -> Tensor:
        """Drop the slot positions from an activation (positions along ``dim``)."""
        return activation.narrow(dim, self.n, activation.shape[dim] - self.n)


def check_tokens(model, tokens, prefix: Prefix | None = None) -> Int[Tensor, "batch pos"]:
    """Validate content tokens (and a prefix against the model); returns ``[batch, pos]`` ids."""
    if prefix is not None:
        if not isinstance(prefix, Prefix):
            raise TypeError(
                f"expected a prefixlens prefix (KVPrefix, ResidualPrefix or SoftPrompt), got {type(prefix).__name__}."
            )
        prefix.validate(model)
    if not isinstance(tokens, Tensor):
        tokens = torch.as_tensor(tokens)
    if tokens.dtype.is_floating_point or tokens.dtype == torch.bool:
        raise TypeError(f"tokens must be integer ids, got dtype {tokens.dtype}.")
    if tokens.ndim == 1:
        tokens = tokens[None]
    if tokens.ndim != 2:
        raise ValueError(f"tokens must be [pos] or [batch, pos], got shape {tuple(tokens.shape)}.")
    if tokens.numel() == 0:
        raise ValueError(f"empty input: tokens has shape {tuple(tokens.shape)}; give at least one content token.")
    _, device = model_dtype_device(model)
    if tokens.device.type != device.type:
        raise ValueError(f"device mismatch: tokens are on {tokens.device} but the model is on {device}.")
    n_ctx = int(model.cfg.n_ctx)
    P = prefix.length if prefix is not None else 0
    if P + tokens.shape[1] > n_ctx:
        raise ValueError(
            f"prefix length {P} + input length {tokens.shape[1]} = {P + tokens.shape[1]} exceeds the model's "
            f"context of {n_ctx} positions; shorten the input or the prefix."
        )
    vocab = int(model.cfg.d_vocab)
    if int(tokens.min()) < 0 or int(tokens.max()) >= vocab:
        raise ValueError(f"token ids must lie in [0, {vocab}), got min {int(tokens.min())}, max {int(tokens.max())}.")
    if prefix is not None and prefix.batched and prefix.batch_size != tokens.shape[0]:
        raise ValueError(
            f"batch mismatch: the {prefix.form} holds {prefix.batch_size} prefixes but tokens have batch "
            f"{tokens.shape[0]}."
        )
    return tokens


@contextmanager
def attached(model, prefix: Prefix, placeholder: int = PLACEHOLDER_TOKEN) -> Iterator[Slots]:
    """Attach ``prefix`` to ``model`` for the duration of a ``with`` block.

    Inside, call the model's own ``run_with_hooks`` / ``run_with_cache`` on ``slots.prepend(tokens)``:
    activations at positions ``slots.n:`` belong to the content. The hooks are removed on exit,
    also when the block raises; hooks the user attached before are left alone::

        with prefixlens.attached(model, prefix) as slots:
            logits, cache = model.run_with_cache(slots.prepend(tokens))
            content_resid = slots.content(cache["blocks.0.hook_resid_pre"])
    """
    if not isinstance(prefix, Prefix):
        raise TypeError(f"expected a prefixlens prefix, got {type(prefix).__name__}.")
    prefix.validate(model)
    with model.hooks(fwd_hooks=prefix.injection_hooks()):
        yield Slots(prefix.length, placeholder)


def maybe_attached(model, prefix: Prefix | None) -> AbstractContextManager[Slots]:
    """``attached(model, prefix)``, or no hooks and ``Slots(0)`` when ``prefix`` is ``None``."""
    return attached(model, prefix) if prefix is not None else nullcontext(Slots(0))


def run_with_prefix(
    model, tokens: Int[Tensor, "batch pos"], prefix: Prefix, **kwargs
) -> Float[Tensor, "batch pos d_vocab"]:
    """Logits at the content positions of ``model`` run with ``prefix`` before ``tokens``.

    Equals ``model(prompt + tokens)[:, P:]`` when ``prefix`` comes from ``from_prompt(model, prompt)``.
    Extra keyword arguments go to the model's forward.
    """
    tokens = check_tokens(model, tokens, prefix)
    with attached(model, prefix) as slots:
        logits = model(slots.prepend(tokens), **kwargs)
    return slots.content(logits)


def run_with_cache(
    model,
    tokens: Int[Tensor, "batch pos"],
    prefix: Prefix,
    names_filter: Callable[[str], bool] | str | list[str] | None = None,
    **kwargs,
) -> tuple[Float[Tensor, "batch pos d_vocab"], ActivationCache]:
    """Content logits and the ``ActivationCache`` of the prefixed run.

    The cache covers all ``P + T`` positions (slots first), so attention patterns keep their
    prefix columns; use ``cache[name][:, P:]`` for the content positions.
    """
    tokens = check_tokens(model, tokens, prefix)
    with attached(model, prefix) as slots:
        logits, cache = model.run_with_cache(slots.prepend(tokens), names_filter=names_filter, **kwargs)
    return slots.content(logits), cache
