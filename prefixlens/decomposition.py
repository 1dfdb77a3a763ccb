"""Every head's output with a prefix, split into ``(1 − A)·t`` plus the prefix bias ``A·b`` (paper §4)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch
from jaxtyping import Float, Int
from torch import Tensor

from prefixlens.attention_math import causal_scores, combine, expand_kv_heads, split_attention
from prefixlens.injection import attached, check_tokens
from prefixlens.prefixes import Prefix

__all__ = ["HeadDecomposition", "decompose", "prefixed_scores", "attention_scale", "fires_pre_softmax_scores"]


@dataclass
class HeadDecomposition:
    """The decomposition of every layer and head at the content positions of a prefixed run.

    ``reference_pattern`` and ``layer_input_shift`` need one more forward pass, run on first use
    (and kept), with the model as it is then. ``reference_pattern`` is the attention the same
    layer gives to the *same layer input* without the prefix (the prefixed run's content residual is patched into a run without slots), so
    ``content_pattern == reference_pattern`` is the theorem's "relative attention is unchanged".
    ``layer_input_shift`` is the cross-layer effect: ``‖x_prefixed − x_plain‖ / ‖x_plain‖`` of each
    layer's input at each content position, against the run without the prefix with the content at
    the same positions ``P..P+T-1`` (``position_ids``), so absolute-position models are compared
    like for like.
    """

    n_slots: int
    prefix_attention: Float[Tensor, "layer batch head pos"]
    content_output: Float[Tensor, "layer batch pos head d_head"]
    prefix_bias: Float[Tensor, "layer batch pos head d_head"]
    z: Float[Tensor, "layer batch pos head d_head"]
    content_pattern: Float[Tensor, "layer batch head pos pos"]
    W_O: Float[Tensor, "layer head d_head d_model"] | None = None
    _reference_run: Callable[[], tuple[Tensor, Tensor]] | None = field(default=None, repr=False)
    _reference: tuple[Tensor, Tensor] | None = field(default=None, repr=False)

    @property
    def has_reference(self) -> bool:
        """Whether the no-prefix reference (relative attention, cross-layer shift) is available."""
        return self._reference is not None or self._reference_run is not None

    def _reference_results(self) -> tuple[Tensor, Tensor]:
        if self._reference is None:
            if self._reference_run is None:
                raise ValueError(
                    "this decomposition was made with reference=False; call decompose(..., reference=True)."
                )
            self._reference, self._reference_run = self._reference_run(), None
        return self._reference

    @property
    def reference_pattern(self) -> Float[Tensor, "layer batch head pos pos"]:
        """The attention each layer gives to the prefixed run's content input, without the prefix."""
        return self._reference_results()[0]

    @property
    def layer_input_shift(self) -> Float[Tensor, "layer batch pos"]:
        """``‖x_prefixed − x_plain‖ / ‖x_plain‖`` of each layer's input at each content position."""
        return self._reference_results()[1]

    @property
    def n_layers(self) -> int:
        return self.z.shape[0]

    def reconstruction(self) -> Float[Tensor, "layer batch pos head d_head"]:
        """``(1 − A)·t + A·b`` for every layer, position and head."""
        return combine(self.prefix_attention, self.content_output, self.prefix_bias)

    def reconstruction_error_per_head(self) -> Float[Tensor, "layer head"]:
        """max |hook_z − ((1 − A)·t + A·b)| per layer and head."""
        return (self.z - self.reconstruction()).abs().amax(dim=(1, 2, 4))

    def reconstruction_error(self) -> float:
        """max |hook_z − ((1 − A)·t + A·b)| over every layer, head, example, position and feature."""
        return float(self.reconstruction_error_per_head().max())

    def head_contributions(self) -> tuple[Float[Tensor, "layer batch pos head d_model"], Float[Tensor, "layer batch pos head d_model"]]:
        """``((1 − A)·t·W_O[h], A·b·W_O[h])``: each head's content term and prefix-bias term in the residual basis."""
        W_O = self._require_W_O()
        A = self.prefix_attention.transpose(-1, -2).unsqueeze(-1)
        content = torch.einsum("lbphd,lhdm->lbphm", (1 - A) * self.content_output, W_O)
        bias = torch.einsum("lbphd,lhdm->lbphm", A * self.prefix_bias, W_O)
        return content, bias

    def residual_reconstruction_error(self) -> Float[Tensor, "layer head"]:
        """max |z·W_O[h] − ((1 − A)·t + A·b)·W_O[h]| per layer and head (``b_O`` belongs to neither term)."""
        W_O = self._require_W_O()
        diff = torch.einsum("lbphd,lhdm->lbphm", self.z - self.reconstruction(), W_O)
        return diff.abs().amax(dim=(1, 2, 4))

    def relative_attention_error(self) -> Float[Tensor, "layer"]:
        """max |prefixed content attention renormalised − attention without the prefix|, per layer."""
        valid = torch.isfinite(self.reference_pattern)
        diff = (self.content_pattern - self.reference_pattern).abs().where(valid, torch.zeros_like(self.content_pattern))
        return diff.amax(dim=(1, 2, 3, 4))

    def cross_layer_shift(self) -> Float[Tensor, "layer"]:
        """Mean relative change of each layer's input caused by the prefix (0 for layer 0)."""
        return self.layer_input_shift.mean(dim=(1, 2))

    def summary(self) -> dict[str, list[float] | float]:
        """Plain numbers for tables and JSON: errors per layer, mean prefix attention per layer."""
        out: dict[str, list[float] | float] = {
            "reconstruction_error": self.reconstruction_error(),
            "reconstruction_error_per_layer": self.reconstruction_error_per_head().amax(-1).tolist(),
            "mean_prefix_attention_per_layer": self.prefix_attention.mean(dim=(1, 2, 3)).tolist(),
        }
        if self.W_O is not None:
            out["residual_reconstruction_error_per_layer"] = self.residual_reconstruction_error().amax(-1).tolist()
        if self.has_reference:
            out["relative_attention_error_per_layer"] = self.relative_attention_error().tolist()
            out["cross_layer_shift_per_layer"] = self.cross_layer_shift().tolist()
        return out

    def _require_W_O(self) -> Tensor:
        if self.W_O is None:
            raise ValueError("the model exposes no W_O, so the residual-basis terms are unavailable.")
        return self.W_O


def fires_pre_softmax_scores(model) -> bool:
    """HF-backed bridges and prefixlens constructions fire ``hook_attn_scores`` before the softmax;
    TL-native bridges fire it with the post-softmax pattern, so scores are recomputed from q and k."""
    return getattr(model.cfg, "architecture", None) != "TransformerLensNative"


def attention_scale(model) -> float:
    """The divisor of ``q·k`` (``cfg.attn_scale`` when set, else ``sqrt(d_head)``)."""
    scale = float(getattr(model.cfg, "attn_scale", -1.0) or -1.0)
    return scale if scale > 0 else math.sqrt(model.cfg.d_head)


def decompose(
    model,
    tokens: Int[Tensor, "batch pos"],
    prefix: Prefix,
    reference: bool = True,
) -> HeadDecomposition:
    """Decompose every head of every layer of ``model`` run on ``tokens`` with ``prefix``.

    One prefixed forward pass gives ``A``, ``t``, ``b`` and ``hook_z`` from the pre-softmax scores.
    With ``reference=True`` the checks against the run without the prefix (attention for the same
    layer inputs, shift of each layer's input) are available; their one extra forward pass (the
    plain run and the patched run batched together) runs when first asked for.
    """
    tokens = check_tokens(model, tokens, prefix)
    P, n_layers = prefix.length, int(model.cfg.n_layers)
    extra = {f"blocks.{l}.hook_resid_pre" for l in range(n_layers)} if reference else set()
    scores, values, cache = prefixed_scores(model, tokens, prefix, extra_names=extra)

    A, t, b, z, pattern = [], [], [], [], []
    for l in range(n_layers):
        A_l, t_l, b_l, pattern_l = split_attention(scores[l][:, :, P:], values[l], P)
        A.append(A_l), t.append(t_l), b.append(b_l), pattern.append(pattern_l)
        z.append(cache[f"blocks.{l}.attn.hook_z"][:, P:])

    result = HeadDecomposition(
        n_slots=P,
        prefix_attention=torch.stack(A),
        content_output=torch.stack(t),
        prefix_bias=torch.stack(b),
        z=torch.stack(z),
        content_pattern=torch.stack(pattern),
        W_O=_stacked_W_O(model),
    )
    if reference:
        inputs = [cache[f"blocks.{l}.hook_resid_pre"][:, P:] for l in range(n_layers)]
        result._reference_run = lambda: _reference_run(model, tokens, inputs, P)
    return result


def prefixed_scores(
    model, tokens: Int[Tensor, "batch pos"], prefix: Prefix, extra_names: set[str] = frozenset()
) -> tuple[list[Float[Tensor, "batch head n_pos n_pos"]], list[Float[Tensor, "batch n_pos head d_head"]], "ActivationCache"]:
    """One prefixed forward pass: each layer's pre-softmax scores over all ``P + T`` positions
    (causal mask as ``-inf`` or the model's own large negative), its values with one head per query
    head, and the cache (``hook_z`` and ``extra_names`` included)."""
    n_layers, n_heads = int(model.cfg.n_layers), int(model.cfg.n_heads)
    pre_softmax = fires_pre_softmax_scores(model)
    per_layer = ["hook_v", "hook_z"] + (["hook_attn_scores"] if pre_softmax else ["hook_q", "hook_k"])
    names = {f"blocks.{l}.attn.{h}" for l in range(n_layers) for h in per_layer} | set(extra_names)
    with torch.no_grad(), attached(model, prefix) as slots:
        _, cache = model.run_with_cache(slots.prepend(tokens), names_filter=lambda n: n in names)
    scores, values = [], []
    for l in range(n_layers):
        attn = f"blocks.{l}.attn"
        if pre_softmax:
            scores.append(cache[f"{attn}.hook_attn_scores"])
        else:
            q = expand_kv_heads(cache[f"{attn}.hook_q"], n_heads)
            k = expand_kv_heads(cache[f"{attn}.hook_k"], n_heads)
            scores.append(causal_scores(q, k, attention_scale(model)))
        values.append(expand_kv_heads(cache[f"{attn}.hook_v"], n_heads))
    return scores, values, cache


def _stacked_W_O(model) -> Tensor | None:
    W_O = getattr(model, "W_O", None)
    return W_O.detach() if isinstance(W_O, Tensor) else None


@torch.no_grad()
def _reference_run(model, tokens, prefixed_inputs: list[Tensor], P: int):
    """One forward pass on ``[tokens; tokens]`` at positions ``P..P+T-1`` and without slots: rows
    ``:B`` are the plain run, rows ``B:`` have each layer's input replaced by the prefixed run's."""
    B, T = tokens.shape
    n_layers = int(model.cfg.n_layers)
    plain_inputs, patterns = [None] * n_layers, [None] * n_layers

    def patch_input(l):
        def hook(resid, hook):
            plain_inputs[l] = resid[:B].clone()
            return torch.cat([resid[:B], prefixed_inputs[l]], dim=0)

        return hook

    def grab_pattern(l):
        def hook(pattern, hook):
            patterns[l] = pattern[B:]

        return hook

    hooks = [(f"blocks.{l}.hook_resid_pre", patch_input(l)) for l in range(n_layers)]
    hooks += [(f"blocks.{l}.attn.hook_pattern", grab_pattern(l)) for l in range(n_layers)]
    positions = torch.arange(P, P + T, device=tokens.device).expand(2 * B, T)
    model.run_with_hooks(torch.cat([tokens, tokens]), return_type=None, fwd_hooks=hooks, position_ids=positions)

    shifts = [
        (prefixed_inputs[l] - plain_inputs[l]).norm(dim=-1) / plain_inputs[l].norm(dim=-1).clamp_min(1e-30)
        for l in range(n_layers)
    ]
    return torch.stack(patterns), torch.stack(shifts)
