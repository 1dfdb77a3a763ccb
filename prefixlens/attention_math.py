"""The attention algebra of a prefix (paper §4), in one place.

For one head and a content query ``i`` with pre-softmax scores ``s_ip`` over the prefix slots and
``s_ij`` over the content keys:

- ``A_i = sigmoid(logsumexp_p s_ip − logsumexp_j s_ij)``: the attention mass on the prefix;
- ``t_i = softmax_j(s_ij) · v_j``: the head output over the content alone;
- ``b_i = softmax_p(s_ip) · v_p``: the prefix bias;
- ``z_i = (1 − A_i)·t_i + A_i·b_i``: the head output with the prefix.

Everything is computed from the scores, never by dividing the pattern by ``1 − A`` (which is
ill-conditioned when ``A → 1``).

The paper's two identities, written with the model's post-softmax patterns (``A^pt`` with the prefix,
``A^ref`` without it, for the same layer input), are :func:`identity_1_residual` (relative attention)
and :func:`identity_2_residual` (bias only).

This module is the one home of these per-head formulas: :mod:`prefixlens.decomposition`,
:mod:`prefixlens.analysis` and the analysis scripts call them instead of writing the einsums again
(as TransformerLens's attention components share one base class's score and pattern functions).
"""

from __future__ import annotations

import torch
from jaxtyping import Float
from torch import Tensor

__all__ = [
    "expand_kv_heads",
    "prefix_mass",
    "prefix_pattern",
    "content_pattern",
    "attend",
    "split_attention",
    "content_term",
    "bias_term",
    "combine",
    "slot_group_terms",
    "head_residual",
    "identity_1_residual",
    "identity_2_residual",
    "causal_scores",
]


def expand_kv_heads(x: Float[Tensor, "... n_kv_heads d"], n_heads: int) -> Float[Tensor, "... n_heads d"]:
    """Grouped-query attention: key/value head ``g`` serves query heads ``g·r .. g·r + r − 1``."""
    n_kv = x.shape[-2]
    if n_heads % n_kv:
        raise ValueError(f"n_heads ({n_heads}) is not a multiple of the number of key/value heads ({n_kv}).")
    return x if n_kv == n_heads else x.repeat_interleave(n_heads // n_kv, dim=-2)


def prefix_mass(scores: Float[Tensor, "... q k"], n_slots: int) -> Float[Tensor, "... q"]:
    """``A``: the softmax mass on the first ``n_slots`` keys, from pre-softmax scores."""
    return torch.sigmoid(scores[..., :n_slots].logsumexp(-1) - scores[..., n_slots:].logsumexp(-1))


def prefix_pattern(scores: Float[Tensor, "... q k"], n_slots: int) -> Float[Tensor, "... q n_slots"]:
    """``softmax_p(s_ip)``: the attention over the first ``n_slots`` keys alone (sums to 1 over the slots)."""
    return scores[..., :n_slots].softmax(-1)


def content_pattern(scores: Float[Tensor, "... q k"], n_slots: int) -> Float[Tensor, "... q k_content"]:
    """``softmax_j(s_ij)``: the attention over the keys after the first ``n_slots`` alone."""
    return scores[..., n_slots:].softmax(-1)


def attend(
    weights: Float[Tensor, "*lead head q k"], values: Float[Tensor, "*lead k head d_head"]
) -> Float[Tensor, "*lead q head d_head"]:
    """``Σ_k w_qk · v_k`` per head (``values`` with one head per query head, see :func:`expand_kv_heads`)."""
    return torch.einsum("...hqk,...khd->...qhd", weights, values)


def split_attention(
    scores: Float[Tensor, "batch head q k"],
    values: Float[Tensor, "batch k head d_head"],
    n_slots: int,
) -> tuple[
    Float[Tensor, "batch head q"],
    Float[Tensor, "batch q head d_head"],
    Float[Tensor, "batch q head d_head"],
    Float[Tensor, "batch head q k_content"],
]:
    """Split a prefixed head into ``(A, t, b, content_pattern)``; ``k = n_slots + k_content``.

    ``values`` must already have one head per query head (see :func:`expand_kv_heads`).
    """
    on_content = content_pattern(scores, n_slots)
    t = attend(on_content, values[:, n_slots:])
    b = attend(prefix_pattern(scores, n_slots), values[:, :n_slots])
    return prefix_mass(scores, n_slots), t, b, on_content


def _per_feature(prefix_attention: Float[Tensor, "*lead head q"]) -> Float[Tensor, "*lead q head 1"]:
    """``A`` laid out like a head output (``[..., q, head, 1]``), to scale ``t`` and ``b``."""
    return prefix_attention.transpose(-1, -2).unsqueeze(-1)


def content_term(
    prefix_attention: Float[Tensor, "*lead head q"], content_output: Float[Tensor, "*lead q head d_head"]
) -> Float[Tensor, "*lead q head d_head"]:
    """``(1 − A)·t``: the content part of the head output."""
    return (1 - _per_feature(prefix_attention)) * content_output


def bias_term(
    prefix_attention: Float[Tensor, "*lead head q"], prefix_bias: Float[Tensor, "*lead q head d_head"]
) -> Float[Tensor, "*lead q head d_head"]:
    """``A·b``: the prefix-bias part of the head output."""
    return _per_feature(prefix_attention) * prefix_bias


def combine(
    prefix_attention: Float[Tensor, "*lead head q"],
    content_output: Float[Tensor, "*lead q head d_head"],
    prefix_bias: Float[Tensor, "*lead q head d_head"],
) -> Float[Tensor, "*lead q head d_head"]:
    """``(1 − A)·t + A·b`` (:func:`content_term` plus :func:`bias_term`)."""
    return content_term(prefix_attention, content_output) + bias_term(prefix_attention, prefix_bias)


def slot_group_terms(
    prefix_attention: Float[Tensor, "*lead head q"],
    slot_pattern: Float[Tensor, "*lead head q slot"],
    slot_values: Float[Tensor, "*lead slot head d_head"],
    slots: list[int],
) -> tuple[Float[Tensor, "*lead head q"], Float[Tensor, "*lead q head d_head"]]:
    """``(A_g, A_g·b_g)`` of a group ``g`` of slots: the attention mass on those slots and their part of
    the bias term, ``A_g = A·Σ_{p∈g} π_p`` and ``A_g·b_g = A·Σ_{p∈g} π_p·v_p`` with ``π = softmax_p(s_ip)``.

    Over groups that partition the slots, the masses add up to ``A`` and the terms to ``A·b``
    (:func:`bias_term`), so the bias splits exactly into, e.g., the attention sink and the instruction.
    """
    weights = slot_pattern[..., slots]
    mass = prefix_attention * weights.sum(-1)
    term = _per_feature(prefix_attention) * attend(weights, slot_values[..., slots, :, :])
    return mass, term


def head_residual(
    x: Float[Tensor, "layer batch q head d_head"], W_O: Float[Tensor, "layer head d_head d_model"]
) -> Float[Tensor, "layer batch q head d_model"]:
    """``x·W_O[h]``: each head's output (or a term of it) in the residual basis, per layer (no ``b_O``)."""
    return torch.einsum("lbphd,lhdm->lbphm", x, W_O)


def identity_1_residual(
    pattern: Float[Tensor, "*lead q k"], baseline: Float[Tensor, "*lead q k_content"], n_slots: int
) -> Float[Tensor, "*lead q k_content"]:
    """Identity 1 (relative attention) from post-softmax patterns: ``A^pt[i, P+j] − A^ref[i, j]·(1 − A_i)``.

    ``pattern``: the prefixed run's attention of the content queries over all ``k = P + k_content``
    keys (slots first); ``baseline``: the attention the same queries give the content without the
    prefix (``A^ref``); ``A_i = Σ_p A^pt[i, p]``. Zero where the identity holds.
    """
    A = pattern[..., :n_slots].sum(-1, keepdim=True)
    return pattern[..., n_slots:] - baseline * (1 - A)


def identity_2_residual(
    z: Float[Tensor, "batch q head d_head"],
    pattern: Float[Tensor, "batch head q k"],
    baseline: Float[Tensor, "batch head q k_content"],
    values: Float[Tensor, "batch k head d_head"],
    n_slots: int,
) -> Float[Tensor, "batch q head d_head"]:
    """Identity 2 (bias only) from post-softmax patterns: ``z_i − (Σ_p A^pt[i, p]·v_p + (1 − A_i)·t_i)``
    with ``t_i = Σ_j A^ref[i, j]·v_j`` and ``A_i = Σ_p A^pt[i, p]``.

    ``z``: the head outputs of the content queries (``hook_z``); ``pattern`` and ``baseline`` as in
    :func:`identity_1_residual`; ``values`` over all ``k`` keys, one head per query head.
    Zero where the identity holds.

    Args:
        z: the head outputs at the content queries, ``[batch, q, head, d_head]``.
        pattern: the prefixed run's attention of the content queries over all keys, ``[batch, head, q, k]``.
        baseline: the attention of the same queries over the content without the prefix (``A^ref``),
            ``[batch, head, q, k_content]``.
        values: the values of all ``k`` keys, one head per query head, ``[batch, k, head, d_head]``.
        n_slots: the number of prefix slots ``P`` (the first keys).

    Returns:
        The residual ``[batch, q, head, d_head]``: zero where the identity holds.
    """
    on_slots = pattern[..., :n_slots]
    t = attend(baseline, values[:, n_slots:])
    return z - (attend(on_slots, values[:, :n_slots]) + content_term(on_slots.sum(-1), t))


def causal_scores(
    q: Float[Tensor, "batch q head d_head"],
    k: Float[Tensor, "batch k head d_head"],
    scale: float,
) -> Float[Tensor, "batch head q k"]:
    """``q·k / scale`` with the causal mask (the last query sees every key), as ``-inf``."""
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / scale
    n_q, n_k = scores.shape[-2:]
    allowed = torch.ones(n_q, n_k, dtype=torch.bool, device=scores.device).tril(n_k - n_q)
    return scores.masked_fill(~allowed, float("-inf"))
