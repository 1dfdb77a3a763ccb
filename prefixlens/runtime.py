"""What running a model needs below the prefix forms: token-id checks, eval mode, and which prefix is attached.

A low-level module: it imports nothing of prefixlens but :mod:`prefixlens.signature`, so that
:mod:`prefixlens.prefixes` (``from_prompt``, ``to_kv``) and the machinery above it
(:mod:`prefixlens.injection`, :mod:`prefixlens.decomposition`, ...) share one copy of each without
the prefix forms importing the modules that run them. The public names are re-exported where they
were first defined (``prefixlens.injection.check_tokens`` wraps :func:`check_token_ids`;
``evaluation_mode`` is importable from :mod:`prefixlens.decomposition`; ``attached_prefix`` and
``check_not_attached`` from :mod:`prefixlens.injection`).
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from jaxtyping import Int
from torch import Tensor

from prefixlens.signature import model_dtype_device, module_roots

__all__ = ["check_token_ids", "evaluation_mode", "attached_prefix", "check_not_attached"]

# model -> the prefix attached to it by an open ``prefixlens.attached`` block
_ATTACHED: weakref.WeakKeyDictionary[Any, Any] = weakref.WeakKeyDictionary()


def check_token_ids(model, tokens, n_slots: int = 0) -> Int[Tensor, "batch pos"]:
    """Validate content token ids for ``model`` (after ``n_slots`` prefix slots); returns ``[batch, pos]`` ids.

    Integer ids of shape ``[pos]`` or ``[batch, pos]``, non-empty, on the model's device type, in the
    vocabulary, and fitting the context together with the slots."""
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
    P = n_slots
    if P + tokens.shape[1] > n_ctx:
        raise ValueError(
            f"prefix length {P} + input length {tokens.shape[1]} = {P + tokens.shape[1]} exceeds the model's "
            f"context of {n_ctx} positions; shorten the input or the prefix."
        )
    vocab = int(model.cfg.d_vocab)
    if int(tokens.min()) < 0 or int(tokens.max()) >= vocab:
        raise ValueError(f"token ids must lie in [0, {vocab}), got min {int(tokens.min())}, max {int(tokens.max())}.")
    return tokens


@contextmanager
def evaluation_mode(model) -> Iterator[None]:
    """Run ``model`` in eval mode (dropout off) inside the block, then give every submodule back its
    own mode exactly (also those of a bridge's ``original_model``, which ``.modules()`` misses).

    Every analysis entry point (:func:`~prefixlens.decompose`, ``prefixed_scores``, ``from_prompt``,
    the ``prefixlens.analysis`` functions) measures the model's deterministic function this way: with
    dropout the model's own ``hook_z`` is a random draw and no decomposition of it is exact.
    """
    modules = {id(m): m for root in module_roots(model) for m in root.modules()}
    modes = [(m, m.training) for m in modules.values()]
    try:
        for m, _ in modes:
            m.training = False
        yield
    finally:
        for m, training in modes:
            m.training = training


def attached_prefix(model):
    """The prefix an open :func:`prefixlens.attached` block has attached to ``model`` (``None``: none)."""
    return _ATTACHED.get(model)


def check_not_attached(model, what: str) -> None:
    """Refuse to run ``what`` while a prefix is attached (its hooks would overwrite content positions)."""
    outer = _ATTACHED.get(model)
    if outer is not None:
        raise RuntimeError(
            f"{what} inside a `prefixlens.attached` block: a {outer.form} (P={outer.length}) is already attached "
            f"to this model, and prefixes do not nest (each writes slots 0..P-1, so the second would overwrite "
            f"content positions of the first). Leave the block first, or use one prefix that holds both "
            f"(e.g. from_prompt on the joined prompts)."
        )
