"""The loss of a batch: answer-token cross-entropy of the model, with or without a prefix.

The pad positions and prefix slots of a toy-task batch, the same in every row, can run once per
batch through the key/value cache (:func:`batch_loss`'s ``share_pads``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor, nn

from prefixlens import tasks
from prefixlens.injection import full_attention_mask, maybe_attached, run_with_prefix
from prefixlens.kv_cache import cached_forward, has_kv_cache
from prefixlens.prefixes import Prefix

__all__ = ["lm_loss", "batch_loss", "can_share_pads", "content", "dropout_active", "logits_of", "logits_shared_pads"]


def lm_loss(
    logits: Float[Tensor, "batch pos d_vocab"], targets: Int[Tensor, "batch pos"]
) -> Float[Tensor, ""]:
    """Mean cross-entropy over the non-ignored (answer) positions (in float32 or wider)."""
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=tasks.IGNORE)


def content(tokens: Tensor, targets: Tensor | None, n_pad: int, prefix: Prefix | None):
    """Without a prefix the model sees the pads; a prefix of length ``L <= n_pad`` takes the place
    of the first ``L`` pads (the remaining ``n_pad - L`` pads stay real tokens)."""
    if prefix is None:
        return tokens, targets
    L = prefix.length
    if L > n_pad:
        raise ValueError(
            f"a prefix of length {L} does not fit the layout with {n_pad} pad positions; build the task "
            f"with n_pad >= {L} (content must stay at the positions the model was trained on)."
        )
    return tokens[:, L:], (targets[:, L:] if targets is not None else None)


def logits_of(model, tokens: Tensor, prefix: Prefix | None, attention_mask: Tensor | None = None) -> Tensor:
    """Content logits of ``model`` (with ``prefix``) on ``tokens`` (a full mask when padded)."""
    if attention_mask is None:
        return model(tokens) if prefix is None else run_with_prefix(model, tokens, prefix)
    if prefix is None:
        mask = full_attention_mask(attention_mask, tokens, 0)
        return model(tokens) if mask is None else model(tokens, attention_mask=mask)
    return run_with_prefix(model, tokens, prefix, attention_mask=attention_mask)


def dropout_active(model) -> bool:
    return model.training and any(isinstance(m, nn.Dropout) and m.p > 0 for m in model.modules())


def can_share_pads(model, tokens: Tensor, n_shared: int, prefix: Prefix | None) -> bool:
    """Whether the first ``n_shared`` positions (and the prefix slots) are the same computation in
    every row: identical pad tokens, one prefix for the whole batch, no dropout, and a model whose
    forward takes a key/value cache."""
    return (
        tokens.shape[0] > 1
        and (n_shared > 0 or prefix is not None)
        and (prefix is None or not prefix.batched)
        and has_kv_cache(model)
        and not dropout_active(model)
        and bool((tokens[:, :n_shared] == tokens[:1, :n_shared]).all())
    )


def logits_shared_pads(
    model, tokens: Int[Tensor, "batch pos"], n_shared: int, prefix: Prefix | None
) -> Float[Tensor, "batch unshared_pos d_vocab"]:
    """Logits at positions ``n_shared:`` of ``tokens`` (after ``prefix``'s slots), with the slots
    and the first ``n_shared`` (pad) positions run once for the whole batch.

    Those positions only attend to each other, so their keys and values are the same in every row:
    one batch-1 pass puts them into the model's key/value cache, which is repeated over the batch
    (gradients flow back through it to the prefix or adapters), and the rest of the sequence runs
    on top of it. This is the same computation as the full pass (checked in the tests to float32
    precision) at ``(pos - n_shared) / (P + pos)`` of the cost of the position-wise layers.
    """
    head = tokens[:1, :n_shared]
    with maybe_attached(model, prefix) as slots:
        _, cache = cached_forward(model, slots.prepend(head))
    cache.batch_repeat_interleave(tokens.shape[0])
    return cached_forward(model, tokens[:, n_shared:], cache)[0]


def batch_loss(
    model,
    batch: tasks.TaskBatch,
    prefix: Prefix | None = None,
    share_pads: bool | None = None,
    attention_mask: Tensor | None = None,
) -> Tensor:
    """Mean answer-token cross-entropy of ``model`` (with ``prefix``) on ``batch``.

    ``share_pads`` runs the pad positions and prefix slots, identical in every row, once per batch
    instead of once per row (see ``logits_shared_pads``) wherever that is exact: ``True`` always,
    ``None`` (default) when they are at least a quarter of the sequence (below that the second
    forward call costs about what it saves: 0.87-1.11x measured with 1 of 20 or 4 of 23 positions,
    against 1.3-1.6x with 12 of 31), ``False`` never.

    ``attention_mask`` (1 = real token, 0 = padding): the shape of ``batch.tokens`` (with a prefix its
    first ``P`` columns, where the slots go, must be 1) or of the content after the slots; padded
    positions are neither attended nor scored (see :mod:`prefixlens.injection`).

    Args:
        model (TransformerBridge): the model to run.
        batch: the toy-task batch.
        prefix: the prefix to run with (``None``: none).
        share_pads: run the shared pad positions once per batch: ``True``, ``False`` or ``None`` (when it
            pays, see above).
        attention_mask: 1 for real tokens, 0 for padding (see above).
    """
    tokens, targets = content(batch.tokens, batch.targets, batch.n_pad, prefix)
    if attention_mask is not None:
        mask = full_attention_mask(attention_mask, tokens, prefix.length if prefix is not None else 0)
        if mask is not None:
            P = prefix.length if prefix is not None else 0
            targets = targets.masked_fill(mask[:, P:] == 0, tasks.IGNORE)
            return lm_loss(logits_of(model, tokens, prefix, mask), targets)
    n_shared = batch.n_pad - (prefix.length if prefix is not None else 0)
    if share_pads is None:
        share_pads = 4 * batch.n_pad >= batch.tokens.shape[1]
    if share_pads and can_share_pads(model, tokens, n_shared, prefix):
        return lm_loss(logits_shared_pads(model, tokens, n_shared, prefix), targets[:, n_shared:])
    return lm_loss(logits_of(model, tokens, prefix), targets)
