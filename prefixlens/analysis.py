"""Checks and statistics over many inputs: the paper's §4 identities for every layer and head, and
the Appendix-B statistics of how a longer prefix's attention is spread over its slots.

Two groups of functions, both thin over :func:`prefixlens.decompose` and the attention algebra of
:mod:`prefixlens.attention_math`:

- :func:`check_identities` measures, for every layer and head and over a batch of inputs, how far
  the model's own prefixed run is from the two identities of paper §4, written exactly as the paper
  (and the reference notebook) states them, with the model's post-softmax patterns
  (:func:`~prefixlens.attention_math.identity_1_residual`, :func:`~prefixlens.attention_math.identity_2_residual`):

  1. *relative attention*: ``A^pt[i, P+j] = A^ref[i, j] · (1 − Σ_p A^pt[i, p])``;
  2. *bias only*: ``z_i = Σ_p A^pt[i, p]·v_p + (1 − Σ_p A^pt[i, p])·t_i`` with ``t_i = Σ_j A^ref[i, j]·v_j``,

  where ``A^ref`` is the attention the same layer gives to the *same layer input* without the prefix
  (layer-input patching, so every layer is checked, not only layer 0), and ``z`` the model's
  ``hook_z``. It also reports the decomposition's own score-based errors.
- :func:`slot_statistics` collects, for chosen query positions, the attention distribution over the
  ``P`` prefix slots, the realised prefix biases ``b_i`` and the prefix values ``v_p`` of every head,
  and summarises them: p1–p99 spread per slot, concentration, and effective ranks (how much of the
  span of the values the realised biases use).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from jaxtyping import Float, Integer, Shaped
from torch import Tensor
from tqdm.auto import tqdm

from prefixlens.attention_math import (
    attend,
    expand_kv_heads,
    identity_1_residual,
    identity_2_residual,
    prefix_mass,
    prefix_pattern,
)
from prefixlens.decomposition import decompose, prefixed_cache, prefixed_scores
from prefixlens.injection import check_tokens, full_attention_mask, n_slots
from prefixlens.prefixes import Prefix
from prefixlens.signature import model_dtype_device
from prefixlens.text import tokens_and_mask

__all__ = [
    "IdentityCheck",
    "check_identities",
    "SlotStatistics",
    "slot_statistics",
    "effective_rank",
    "numerical_rank",
]


# --------------------------------------------------------------------------------------------------
# paper §4: both identities, every layer and head
# --------------------------------------------------------------------------------------------------


@dataclass
class IdentityCheck:
    """Maximum absolute errors of the §4 identities per layer and head over a batch of inputs.

    Fields ``[layer, head]`` unless noted:

    - ``relative_attention``: ``max |A^pt[i, P+j] − A^ref[i, j]·(1 − A_i)|`` (identity 1, model patterns);
    - ``renormalised_attention``: ``max |softmax_j(s_ij) − A^ref[i, j]|`` (identity 1 from the scores,
      :meth:`HeadDecomposition.relative_attention_error`, here per head);
    - ``bias_only``: ``max |z_i − (Σ_p A^pt[i, p]·v_p + (1 − A_i)·t_i)|`` (identity 2, model patterns,
      ``t_i`` from the no-prefix attention for the same layer input);
    - ``bias_only_scores``: ``max |z − ((1 − A)·t + A·b)|`` from the scores
      (:meth:`HeadDecomposition.reconstruction_error_per_head`);
    - ``bias_only_residual``: the same in the residual basis, ``z·W_O[h]`` (``None`` without ``W_O``);
    - ``z_scale``: ``max |z|`` (what the errors are relative to);
    - ``mean_prefix_attention``, ``max_prefix_attention``: ``A_i`` over inputs and positions;
    - ``cross_layer_shift`` ``[layer]``: mean relative change of the layer input caused by the prefix.
    """

    dtype: str
    n_slots: int
    n_examples: int
    n_positions: int
    relative_attention: Float[Tensor, "layer head"]
    renormalised_attention: Float[Tensor, "layer head"]
    bias_only: Float[Tensor, "layer head"]
    bias_only_scores: Float[Tensor, "layer head"]
    bias_only_residual: Float[Tensor, "layer head"] | None
    z_scale: Float[Tensor, "layer head"]
    mean_prefix_attention: Float[Tensor, "layer head"]
    max_prefix_attention: Float[Tensor, "layer head"]
    cross_layer_shift: Float[Tensor, " layer"]

    ERRORS = ("relative_attention", "renormalised_attention", "bias_only", "bias_only_scores", "bias_only_residual")

    @property
    def n_layers(self) -> int:
        return self.relative_attention.shape[0]

    def max_error(self, name: str | None = None) -> float:
        """The largest error of one kind (or of every kind) over all layers and heads (NaN if any is NaN)."""
        names = [name] if name else [n for n in self.ERRORS if getattr(self, n) is not None]
        return float(torch.stack([getattr(self, n).max().double() for n in names]).max())

    def __repr__(self) -> str:
        errors = ", ".join(
            f"{n}={float(getattr(self, n).max()):.3g}" for n in self.ERRORS if getattr(self, n) is not None
        )
        return (
            f"IdentityCheck(dtype={self.dtype}, layers={self.n_layers}, heads={self.relative_attention.shape[1]}, "
            f"n_slots={self.n_slots}, n_examples={self.n_examples}, n_positions={self.n_positions}, {errors})"
        )

    def per_layer(self) -> list[dict[str, float]]:
        """One row per layer: the maximum over heads of each error, and the prefix-attention scale."""
        rows = []
        for l in range(self.n_layers):
            row: dict[str, float] = {"layer": l}
            for n in self.ERRORS:
                t = getattr(self, n)
                if t is not None:
                    row[n] = float(t[l].max())
            row["z_scale"] = float(self.z_scale[l].max())
            row["mean_prefix_attention"] = float(self.mean_prefix_attention[l].mean())
            row["max_prefix_attention"] = float(self.max_prefix_attention[l].max())
            row["cross_layer_shift"] = float(self.cross_layer_shift[l])
            rows.append(row)
        return rows

    def to_json(self) -> dict:
        """Plain numbers: the per-layer table, the per-head matrices, and the overall maxima."""
        out: dict = {
            "dtype": self.dtype,
            "n_slots": self.n_slots,
            "n_examples": self.n_examples,
            "n_positions": self.n_positions,
            "per_layer": self.per_layer(),
            "max": {n: float(getattr(self, n).max()) for n in self.ERRORS if getattr(self, n) is not None},
            "per_head": {},
        }
        for n in self.ERRORS + ("mean_prefix_attention",):
            t = getattr(self, n)
            if t is not None:
                out["per_head"][n] = t.double().tolist()
        return out


def _prefixed_patterns(model, tokens: Tensor, prefix: Prefix | None, mask: Tensor | None = None) -> tuple[list[Tensor], list[Tensor]]:
    """The model's own post-softmax patterns and (per query head) values of a prefixed run (with a
    full ``mask``: padded query rows set to 0)."""
    n_layers, n_heads = int(model.cfg.n_layers), int(model.cfg.n_heads)
    names = {f"blocks.{l}.attn.hook_{h}" for l in range(n_layers) for h in ("pattern", "v")}
    cache = prefixed_cache(model, tokens, prefix, names, mask)
    patterns = [cache[f"blocks.{l}.attn.hook_pattern"] for l in range(n_layers)]
    if mask is not None:
        patterns = [p.masked_fill(~mask.bool()[:, None, :, None], 0.0) for p in patterns]
    values = [expand_kv_heads(cache[f"blocks.{l}.attn.hook_v"], n_heads) for l in range(n_layers)]
    return patterns, values


def _chunk_errors(model, tokens: Tensor, prefix: Prefix | None, mask: Tensor | None = None) -> dict[str, Tensor]:
    P = n_slots(prefix)
    d = decompose(model, tokens, prefix, baseline=True, attention_mask=mask)
    patterns, values = _prefixed_patterns(model, tokens, prefix, mask)
    baseline = d.baseline_pattern  # [l, b, h, q, k]; non-finite values propagate into the errors
    rel, bias = [], []
    for l, (pattern, v) in enumerate(zip(patterns, values)):
        content_rows = pattern[:, :, P:]  # [b, h, q, P + k]
        rel.append(identity_1_residual(content_rows, baseline[l], P).abs().amax(dim=(0, 2, 3)))
        bias.append(identity_2_residual(d.z[l], content_rows, baseline[l], v, P).abs().amax(dim=(0, 1, 3)))
    renorm = (d.content_pattern - baseline).abs()
    out = {
        "relative_attention": torch.stack(rel),
        "renormalised_attention": renorm.amax(dim=(1, 3, 4)),
        "bias_only": torch.stack(bias),
        "bias_only_scores": d.reconstruction_error_per_head(),
        "z_scale": d.z.abs().amax(dim=(1, 2, 4)),
        "A_sum": d.prefix_attention.sum(dim=(1, 3)),
        "A_max": d.prefix_attention.amax(dim=(1, 3)),
        "shift_sum": d.layer_input_shift.sum(dim=(1, 2)),
        "n_real_sum": torch.tensor(float(tokens.numel() if mask is None else mask[:, P:].sum()), device=tokens.device),
    }
    if d.W_O is not None:
        out["bias_only_residual"] = d.residual_reconstruction_error()
    return out


def check_identities(
    model,
    tokens: "Integer[Tensor, 'batch pos'] | Integer[Tensor, ' pos'] | str | list[str]",
    prefix: Prefix | None,
    batch_size: int = 16,
    progress: bool = False,
    attention_mask: Shaped[Tensor, "batch mask_pos"] | None = None,
    prepend_bos: bool | None = None,
) -> IdentityCheck:
    """Measure both §4 identities for every layer and head of ``model`` over ``tokens`` with ``prefix``.

    The inputs are processed ``batch_size`` at a time; errors are maxima over inputs, positions and
    features; a NaN or infinity anywhere shows as NaN in the errors of its layer and head, never
    masked. The model runs in eval mode (dropout off), each submodule's mode restored afterwards.
    Run it on a float64 model (``models.toy_llama(dtype=torch.float64)``,
    ``models.load(dir, dtype=torch.float64)``) to see the identities hold to ~1e-15.
    ``attention_mask`` (``[B, T]`` or ``[B, P + T]``): padded positions are left out of every error and mean.
    ``tokens`` may be text (a string or a list of strings, left-padded with a mask when ragged); after
    the prefix it gets the prefix's trained BOS policy (``content_bos``; else no BOS; :mod:`prefixlens.text`).

    Args:
        model (TransformerBridge): the model to check.
        tokens: the content after the prefix: token ids ``[batch, pos]`` (or ``[pos]``), a string, or a
            list of strings.
        prefix: the prefix (any form) the content runs after; ``None``: the plain run, where both
            identities hold trivially (``A = 0``; a control: every error is the arithmetic's own).
        batch_size: how many inputs to run at a time.
        progress: show a progress bar over the batches.
        attention_mask: 1 for real tokens, 0 for padding: ``[batch, pos]`` or ``[batch, P + pos]``.
        prepend_bos: give text content a BOS token after the prefix (default: the prefix's ``content_bos``, else no).

    Returns:
        The errors of both identities (and of the decomposition) per layer and head.
    """
    tokens, attention_mask = tokens_and_mask(model, tokens, attention_mask, prepend_bos, after=prefix)
    tokens = check_tokens(model, tokens, prefix)
    mask = full_attention_mask(attention_mask, tokens, n_slots(prefix))
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
    if prefix is not None and prefix.batched:
        raise ValueError("check_identities takes one prefix for all inputs; pass an unbatched prefix.")
    B, T = tokens.shape
    acc: dict[str, Tensor] = {}
    for start in tqdm(range(0, B, batch_size), desc="identities", disable=not progress, leave=False):
        rows = slice(start, start + batch_size)
        chunk = _chunk_errors(model, tokens[rows], prefix, mask[rows] if mask is not None else None)
        for k, v in chunk.items():
            if k in acc:
                acc[k] = acc[k] + v if k.endswith("_sum") else torch.maximum(acc[k], v)
            else:
                acc[k] = v
    dtype, _ = model_dtype_device(model)
    return IdentityCheck(
        dtype=str(dtype).removeprefix("torch."),
        n_slots=n_slots(prefix),
        n_examples=B,
        n_positions=T,
        relative_attention=acc["relative_attention"].cpu(),
        renormalised_attention=acc["renormalised_attention"].cpu(),
        bias_only=acc["bias_only"].cpu(),
        bias_only_scores=acc["bias_only_scores"].cpu(),
        bias_only_residual=acc["bias_only_residual"].cpu() if "bias_only_residual" in acc else None,
        z_scale=acc["z_scale"].cpu(),
        mean_prefix_attention=(acc["A_sum"] / acc["n_real_sum"]).cpu(),
        max_prefix_attention=acc["A_max"].cpu(),
        cross_layer_shift=(acc["shift_sum"] / acc["n_real_sum"]).cpu(),
    )


# --------------------------------------------------------------------------------------------------
# Appendix B: attention over the slots of a longer prefix
# --------------------------------------------------------------------------------------------------


def effective_rank(x: Float[Tensor, "n d"], center: bool = False, eps: float = 1e-12) -> float:
    """Roy & Vetterli's effective rank: ``exp(entropy(σ / Σσ))`` of the singular values of ``x``.

    1 for rank-one data, ``min(n, d)`` for data spread evenly over all directions; 0 for all-zero data.
    ``center=True`` subtracts the mean row first (the rank of the *variation* across rows).
    """
    if x.ndim != 2:
        raise ValueError(f"effective_rank needs a [n, d] matrix, got shape {tuple(x.shape)}.")
    x = x.double()
    if not bool(torch.isfinite(x).all()):
        return float("nan")
    if center:
        x = x - x.mean(0, keepdim=True)
    s = torch.linalg.svdvals(x)
    total = s.sum()
    if total <= eps * max(1.0, float(x.abs().max()) if x.numel() else 1.0):
        return 0.0
    p = s / total
    p = p[p > 0]
    return float(torch.exp(-(p * p.log()).sum()))


def numerical_rank(x: Float[Tensor, "n d"], rtol: float = 1e-6) -> int:
    """The number of singular values above ``rtol`` times the largest (``ValueError`` for non-finite ``x``)."""
    if not bool(torch.isfinite(x).all()):
        raise ValueError("numerical_rank of a matrix with NaN or infinite entries is undefined.")
    s = torch.linalg.svdvals(x.double())
    return int((s > rtol * s.max()).sum()) if s.numel() and s.max() > 0 else 0


def _slot_scores(model, tokens: Tensor, prefix: Prefix, positions: Tensor, mask: Tensor | None = None):
    """Pre-softmax scores of the selected content queries over every key, and the slots' per-query-head values."""
    P = prefix.length
    scores, values, _ = prefixed_scores(model, tokens, prefix, attention_mask=mask)
    rows = positions + P
    return torch.stack([s[:, :, rows] for s in scores]), torch.stack([v[:, :P] for v in values])


@dataclass
class SlotStatistics:
    """Attention over the ``P`` prefix slots, and the prefix biases it realises, for every head.

    ``weights[l, h, n, p]``: the attention of query ``n`` (an input × selected position) over the
    slots, normalised to sum to 1 over the slots (``softmax_p s_np``; the reference's "conditional
    distribution over prefix positions"). ``biases[l, h, n]``: the realised prefix bias
    ``b_n = Σ_p weights[n, p]·v_p``. ``values[l, h, p]``: the prefix value vectors ``v_p``.
    ``prefix_mass[l, h, n]``: ``A``, the total attention on the prefix.
    """

    weights: Float[Tensor, "layer head n slot"]
    biases: Float[Tensor, "layer head n d_head"]
    values: Float[Tensor, "layer head slot d_head"]
    prefix_mass: Float[Tensor, "layer head n"]
    positions: list[int] = field(default_factory=list)

    @property
    def n_slots(self) -> int:
        return self.weights.shape[-1]

    def __repr__(self) -> str:
        L, H, N, P = self.weights.shape
        return (
            f"SlotStatistics(layers={L}, heads={H}, queries={N}, n_slots={P}, d_head={self.values.shape[-1]}, "
            f"positions={self.positions if len(self.positions) <= 8 else f'<{len(self.positions)} positions>'}, mean_prefix_mass={float(self.prefix_mass.double().mean()):.3g})"
        )

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.weights.shape[:2])

    def quantiles(self, q: tuple[float, ...] = (0.01, 0.99)) -> Float[Tensor, "layer head slot q"]:
        """Quantiles of each slot's weight across queries (linear interpolation, as numpy's default)."""
        qs = torch.tensor(q, dtype=torch.float64)
        return torch.quantile(self.weights.double(), qs, dim=2).permute(1, 2, 3, 0)

    def spread(self, low: float = 0.01, high: float = 0.99) -> Float[Tensor, "layer head slot"]:
        """The ``p_high − p_low`` gap of each slot's weight across queries (the reference's statistic)."""
        qs = self.quantiles((low, high))
        return qs[..., 1] - qs[..., 0]

    def top_slot_share(self) -> Float[Tensor, "layer head"]:
        """Mean over queries of the largest slot weight (1: all on one slot; 1/P: uniform)."""
        return self.weights.double().amax(-1).mean(-1)

    def top2_share(self) -> Float[Tensor, "layer head"]:
        """Mean over queries of the two largest slot weights together."""
        return self.weights.double().topk(min(2, self.n_slots), dim=-1).values.sum(-1).mean(-1)

    def slot_entropy_perplexity(self) -> Float[Tensor, "layer head"]:
        """``exp(entropy)`` of the mean slot distribution: how many slots a head uses on average."""
        w = self.weights.double().mean(2)
        w = w / w.sum(-1, keepdim=True)
        return torch.exp(-(w * w.clamp_min(1e-300).log()).sum(-1))

    def _per_head(self, fn) -> Tensor:
        L, H = self.shape
        return torch.tensor([[fn(l, h) for h in range(H)] for l in range(L)], dtype=torch.float64)

    def value_rank(self, rtol: float = 1e-6) -> Float[Tensor, "layer head"]:
        """The dimension of the span of the prefix values ``{v_p}`` (at most ``min(P, d_head)``)."""
        return self._per_head(
            lambda l, h: numerical_rank(self.values[l, h], rtol) if bool(torch.isfinite(self.values[l, h]).all()) else math.nan
        )

    def value_erank(self) -> Float[Tensor, "layer head"]:
        """Effective rank of the prefix values ``{v_p}``."""
        return self._per_head(lambda l, h: effective_rank(self.values[l, h]))

    def bias_erank(self, center: bool = False) -> Float[Tensor, "layer head"]:
        """Effective rank of the realised biases ``{b_n}``; ``center=True``: of their variation across inputs."""
        return self._per_head(lambda l, h: effective_rank(self.biases[l, h], center=center))

    def weight_erank(self, center: bool = False) -> Float[Tensor, "layer head"]:
        """Effective rank of the slot-weight matrix ``[n, P]`` (slot mixtures actually used)."""
        return self._per_head(lambda l, h: effective_rank(self.weights[l, h], center=center))

    def bias_variation(self) -> Float[Tensor, "layer head"]:
        """``rms_n ‖b_n − mean b‖ / ‖mean b‖``: how input-dependent the bias is (0: a fixed vector)."""
        b = self.biases.double()
        mean = b.mean(2, keepdim=True)
        rms = (b - mean).norm(dim=-1).pow(2).mean(-1).sqrt()
        return rms / mean.squeeze(2).norm(dim=-1).clamp_min(1e-300)

    def summary(self) -> dict[str, list[float]]:
        """Per-layer means over heads (and slots) of every statistic, for tables and JSON."""
        per_head = {
            "spread_p1_p99": self.spread().mean(-1),
            "max_spread_p1_p99": self.spread().amax(-1),
            "top_slot_share": self.top_slot_share(),
            "top2_share": self.top2_share(),
            "slot_perplexity": self.slot_entropy_perplexity(),
            "value_rank": self.value_rank(),
            "value_erank": self.value_erank(),
            "bias_erank": self.bias_erank(),
            "bias_erank_centered": self.bias_erank(center=True),
            "weight_erank": self.weight_erank(),
            "bias_variation": self.bias_variation(),
            "prefix_mass": self.prefix_mass.double().mean(-1),
        }
        return {k: v.mean(-1).tolist() for k, v in per_head.items()}


def slot_statistics(
    model,
    tokens: "Integer[Tensor, 'batch pos'] | Integer[Tensor, ' pos'] | str | list[str]",
    prefix: Prefix | None,
    positions: int | list[int] | None = -1,
    batch_size: int = 64,
    progress: bool = False,
    attention_mask: Shaped[Tensor, "batch mask_pos"] | None = None,
    prepend_bos: bool | None = None,
) -> SlotStatistics:
    """Attention over the slots of ``prefix`` from the content ``positions`` of every input, every head.

    ``positions``: content indices of the queries (``-1``: the last input token, as the reference's
    Appendix B; ``None``: every content position). Weights are computed from the pre-softmax scores
    (wherever :func:`prefixlens.decomposition.attention_sources` finds them), so they stay accurate
    when the total prefix attention is tiny. The model runs in eval mode (dropout off).
    ``attention_mask`` (``[B, T]`` or ``[B, P + T]``): the selected positions must be real tokens in
    every row (e.g. ``-1`` with left padding); a padded one is refused.
    ``tokens`` may be text (a string or a list of strings, left-padded with a mask when ragged, so
    ``-1`` is every row's last real token); after the prefix it gets the prefix's ``content_bos`` (else no BOS).

    Args:
        model (TransformerBridge): the model to run.
        tokens: the content after the prefix: token ids ``[batch, pos]`` (or ``[pos]``), a string, or a
            list of strings.
        prefix: the prefix whose slots are studied.
        positions: the content positions of the queries: one index, a list of them, or ``None`` for all.
        batch_size: how many inputs to run at a time.
        progress: show a progress bar over the batches.
        attention_mask: 1 for real tokens, 0 for padding: ``[batch, pos]`` or ``[batch, P + pos]``.
        prepend_bos: give text content a BOS token after the prefix (default: the prefix's ``content_bos``, else no).

    Returns:
        The per-slot weights, realised biases and prefix values of every head, with their summaries.
    """
    if prefix is None:
        raise ValueError(
            "slot_statistics studies the attention over a prefix's slots, and prefix=None has none; pass a prefix "
            "(for the plain run's attention use prefixlens.decompose(model, tokens, None).content_pattern)."
        )
    tokens, attention_mask = tokens_and_mask(model, tokens, attention_mask, prepend_bos, after=prefix)
    tokens = check_tokens(model, tokens, prefix)
    if prefix.batched:
        raise ValueError("slot_statistics takes one prefix for all inputs; pass an unbatched prefix.")
    B, T = tokens.shape
    if positions is None:
        pos = list(range(T))
    else:
        one = isinstance(positions, int) or (isinstance(positions, Tensor) and positions.ndim == 0)
        pos = [positions] if one else list(positions) if isinstance(positions, (list, tuple, Tensor)) else [positions]
        if not pos:
            raise ValueError("positions is empty: give at least one content position (or None for all).")
        valid = f"valid are 0..{T - 1} (or -{T}..-1, counting from the end) for inputs of length {T}"
        for i, p in enumerate(pos):
            if isinstance(p, bool) or not hasattr(p, "__index__"):
                raise TypeError(f"positions: content positions must be ints, got {p!r}; {valid}.")
            pos[i] = p = int(p)
            if not -T <= p < T:
                raise ValueError(f"positions: content position {p} is out of range: {valid}.")
        pos = [p % T for p in pos]
    index = torch.tensor(pos, device=tokens.device)
    P = prefix.length
    mask = full_attention_mask(attention_mask, tokens, P)
    if mask is not None and not bool(mask[:, P + index].all()):
        bad = sorted({pos[int(j)] for j in (mask[:, P + index] == 0).nonzero()[:, 1]})
        raise ValueError(
            f"slot_statistics: content position(s) {bad} are padding in some rows; choose positions that are "
            f"real tokens in every row (with left padding, -1 is the last real token of every row)."
        )
    W, Bias, Mass, V = [], [], [], None
    for start in tqdm(range(0, B, batch_size), desc="slots", disable=not progress, leave=False):
        rows = slice(start, start + batch_size)
        scores, values = _slot_scores(model, tokens[rows], prefix, index, mask[rows] if mask is not None else None)
        # scores [l, b, h, q, P + T]; values [l, b, p, h, d] (the same for every b)
        w = prefix_pattern(scores, P)
        bias = attend(w, values).permute(0, 3, 1, 2, 4)  # [l, b, q, h, d] -> [l, h, b, q, d]
        W.append(w.permute(0, 2, 1, 3, 4).flatten(2, 3))
        Bias.append(bias.flatten(2, 3))
        Mass.append(prefix_mass(scores, P).transpose(1, 2).flatten(2, 3))
        V = values[:, 0].transpose(1, 2)  # [l, h, p, d]
    return SlotStatistics(
        weights=torch.cat(W, 2).cpu(),
        biases=torch.cat(Bias, 2).cpu(),
        values=V.cpu(),
        prefix_mass=torch.cat(Mass, 2).cpu(),
        positions=pos,
    )
