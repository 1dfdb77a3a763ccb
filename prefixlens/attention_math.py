"""The attention algebra of a prefix (paper §4), in one place.

For one head and a content query ``i`` with pre-softmax scores ``s_ip`` over the prefix slots and
``s_ij`` over the content keys:

- ``A_i = sigmoid(logsumexp_p s_ip − logsumexp_j s_ij)``: the attention mass on the prefix;
- ``t_i = softmax_j(s_ij) · v_j``: the head output over the content alone;
- ``b_i = softmax_p(s_ip) · v_p``: the prefix bias;
- ``z_i = (1 − A_i)·t_i + A_i·b_i``: the head output with the prefix.

Everything is computed from the scores, never by dividing the pattern by ``1 − A`` (which is
ill-conditioned when ``A → 1``).
"""

from __future__ import annotations

import torch
from jaxtyping import Float
from torch import Tensor

__all__ = ["expand_kv_heads", "prefix_mass", "split_attention", "combine", "causal_scores"]


def expand_kv_heads(x: Float[Tensor, "... n_kv_heads d"], n_heads: int) -> Float[Tensor, "... n_heads d"]:
    """Grouped-query attention: key/value head ``g`` serves query heads ``g·r .. g·r + r − 1``."""
    n_kv = x.shape[-2]
    if n_heads % n_kv:
        raise ValueError(f"n_heads ({n_heads}) is not a multiple of the number of key/value heads ({n_kv}).")
    return x if n_kv == n_heads else x.repeat_interleave(n_heads // n_kv, dim=-2)


def prefix_mass(scores: Float[Tensor, "... q k"], n_slots: int) -> Float[Tensor, "... q"]:
    """``A``: the softmax mass on the first ``n_slots`` keys, from pre-softmax scores."""
    return torch.sigmoid(scores[..., :n_slots].logsumexp(-1) - scores[..., n_slots:].logsumexp(-1))


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
    content_pattern = scores[..., n_slots:].softmax(-1)
    prefix_pattern = scores[..., :n_slots].softmax(-1)
    t = torch.einsum("bhqk,bkhd->bqhd", content_pattern, values[:, n_slots:])
    b = torch.einsum("bhqp,bphd->bqhd", prefix_pattern, values[:, :n_slots])
    return prefix_mass(scores, n_slots), t, b, content_pattern


def combine(
    prefix_attention: Float[Tensor, "*lead head q"],
    content_output: Float[Tensor, "*lead q head d_head"],
    prefix_bias: Float[Tensor, "*lead q head d_head"],
) -> Float[Tensor, "*lead q head d_head"]:
    """``(1 − A)·t + A·b``."""
    A = prefix_attention.transpose(-1, -2).unsqueeze(-1)
    return (1 - A) * content_output + A * prefix_bias


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
