"""Every head's output with a prefix, split into ``(1 − A)·t`` plus the prefix bias ``A·b`` (paper §4)."""

from __future__ import annotations

import functools
import inspect
import math
import warnings
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import no_type_check

import torch
from jaxtyping import Float, Int, Integer, Shaped
from torch import Tensor
from transformer_lens import ActivationCache

from prefixlens.attention_math import (
    bias_term,
    causal_scores,
    combine,
    content_term,
    expand_kv_heads,
    head_residual,
    prefix_pattern,
    split_attention,
)
from prefixlens.generation import _last_logits_only
from prefixlens.injection import check_tokens, full_attention_mask, maybe_attached, n_slots
from prefixlens.prefixes import Prefix
from prefixlens.runtime import cached_run, evaluation_mode, thread_hooks  # evaluation_mode: re-exported here
from prefixlens.signature import model_dtype_device
from prefixlens.text import tokens_and_mask

__all__ = [
    "HeadDecomposition",
    "decompose",
    "prefixed_scores",
    "prefixed_cache",
    "attention_scale",
    "fires_pre_softmax_scores",
    "attention_sources",
    "evaluation_mode",
]


@no_type_check  # counts stack frames (stacklevel): not to be wrapped by the test-time type checker
def _warn_renamed(old: str, new: str) -> None:
    """The one deprecation message of a renamed name ("reference" meant the run without the prefix)."""
    warnings.warn(
        f"{old} is deprecated: it is now {new} (the run without the prefix is the baseline).",
        DeprecationWarning,
        stacklevel=3,
    )


def _accepts_reference(func: Callable) -> Callable:
    """Let ``func`` take ``reference=``, the deprecated spelling of its ``baseline=``: warn and pass
    it on as ``baseline``; giving both is a ``TypeError``."""
    signature = inspect.signature(func)

    @functools.wraps(func)
    @no_type_check  # the caller's frame must be stacklevel=3 of _warn_renamed (see there)
    def wrapper(*args, **kwargs):
        if "reference" in kwargs:
            value = kwargs.pop("reference")
            if "baseline" in signature.bind_partial(*args, **kwargs).arguments:
                raise TypeError(
                    f"{func.__name__}() got both baseline and reference; reference is the deprecated "
                    "spelling of baseline, give baseline only."
                )
            _warn_renamed(f"{func.__name__}(..., reference=...)", f"{func.__name__}(..., baseline=...)")
            kwargs["baseline"] = value
        return func(*args, **kwargs)

    return wrapper


@dataclass
class HeadDecomposition:
    """The decomposition of every layer and head at the content positions of a prefixed run.

    ``baseline_pattern`` and ``layer_input_shift`` come from the *baseline*, the run without the
    prefix; they need one more forward pass, run on first use (and kept), with the model as it is
    then. ``baseline_pattern`` is the attention the same layer gives to the *same layer input*
    without the prefix (the prefixed run's content residual is patched into a run without slots), so
    ``content_pattern == baseline_pattern`` is the theorem's "relative attention is unchanged".
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
    #: ``softmax_p(s_ip)``: each content query's attention over the slots alone (sums to 1 over the slots);
    #: with :attr:`slot_values` it splits ``A`` and ``A·b`` by groups of slots (:mod:`prefixlens.attribution`)
    slot_pattern: Float[Tensor, "layer batch head pos slot"] | None = None
    #: the values the slots carry in every layer, one head per query head
    slot_values: Float[Tensor, "layer batch slot head d_head"] | None = None
    #: the residual stream after the last layer at the content positions (the final norm's input)
    final_residual: Float[Tensor, "batch pos d_model"] | None = None
    #: 1 at real content positions, 0 at padding (``None``: every position is real)
    content_mask: Integer[Tensor, "batch pos"] | None = None
    _baseline_run: Callable[[], tuple[Tensor, Tensor]] | None = field(default=None, repr=False)
    _baseline: tuple[Tensor, Tensor] | None = field(default=None, repr=False)

    @property
    def has_baseline(self) -> bool:
        """Whether the checks against the baseline (the run without the prefix: relative attention,
        cross-layer shift) are available."""
        return self._baseline is not None or self._baseline_run is not None

    def _baseline_results(self) -> tuple[Tensor, Tensor]:
        if self._baseline is None:
            if self._baseline_run is None:
                raise ValueError(
                    "this decomposition was made with baseline=False; call decompose(..., baseline=True)."
                )
            self._baseline, self._baseline_run = self._baseline_run(), None
        return self._baseline

    @property
    def baseline_pattern(self) -> Float[Tensor, "layer batch head pos pos"]:
        """The attention each layer gives to the prefixed run's content input, without the prefix."""
        return self._baseline_results()[0]

    @property
    def has_reference(self) -> bool:
        """Deprecated spelling of :attr:`has_baseline` (warns, then returns it)."""
        _warn_renamed("HeadDecomposition.has_reference", "HeadDecomposition.has_baseline")
        return self.has_baseline

    @property
    def reference_pattern(self) -> Float[Tensor, "layer batch head pos pos"]:
        """Deprecated spelling of :attr:`baseline_pattern` (warns, then returns it)."""
        _warn_renamed("HeadDecomposition.reference_pattern", "HeadDecomposition.baseline_pattern")
        return self.baseline_pattern

    @property
    def layer_input_shift(self) -> Float[Tensor, "layer batch pos"]:
        """``‖x_prefixed − x_plain‖ / ‖x_plain‖`` of each layer's input at each content position."""
        return self._baseline_results()[1]

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
        content = head_residual(content_term(self.prefix_attention, self.content_output), W_O)
        bias = head_residual(bias_term(self.prefix_attention, self.prefix_bias), W_O)
        return content, bias

    def residual_reconstruction_error(self) -> Float[Tensor, "layer head"]:
        """max |z·W_O[h] − ((1 − A)·t + A·b)·W_O[h]| per layer and head (``b_O`` belongs to neither term)."""
        W_O = self._require_W_O()
        diff = head_residual(self.z - self.reconstruction(), W_O)
        return diff.abs().amax(dim=(1, 2, 4))

    def relative_attention_error(self) -> Float[Tensor, " layer"]:
        """max |prefixed content attention renormalised − attention without the prefix|, per layer.

        Non-finite entries are not masked: a layer with a NaN or infinite pattern reports NaN.
        """
        return (self.content_pattern - self.baseline_pattern).abs().amax(dim=(1, 2, 3, 4))

    def cross_layer_shift(self) -> Float[Tensor, " layer"]:
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
        if self.has_baseline:
            out["relative_attention_error_per_layer"] = self.relative_attention_error().tolist()
            out["cross_layer_shift_per_layer"] = self.cross_layer_shift().tolist()
        return out

    def __repr__(self) -> str:
        """A one-line summary (shapes, dtype, errors), never the tensors; no forward pass is run."""
        L, B, H, T = self.prefix_attention.shape
        parts = [
            f"layers={L}", f"batch={B}", f"n_slots={self.n_slots}", f"positions={T}", f"heads={H}",
            f"d_head={self.z.shape[-1]}", f"dtype={str(self.z.dtype).removeprefix('torch.')}",
            f"reconstruction_error={self.reconstruction_error():.3g}",
            f"mean_prefix_attention={float(self.prefix_attention.mean()):.3g}",
        ]
        if self._baseline is not None:
            parts.append(f"relative_attention_error={float(self.relative_attention_error().max()):.3g}")
        elif self._baseline_run is not None:
            parts.append("relative_attention_error=<not computed yet>")
        return f"HeadDecomposition({', '.join(parts)})"

    def _require_W_O(self) -> Tensor:
        if self.W_O is None:
            raise ValueError("the model exposes no W_O, so the residual-basis terms are unavailable.")
        return self.W_O


# What each layer's attention hooks carry, per model (found by one probe forward pass):
#   "scores"  - hook_attn_scores fires the pre-softmax scores, mask included (softmax(scores) == hook_pattern);
#   "qk"      - TL-native attention: hook_attn_scores fires the pattern, and q·k / scale with the
#               causal mask (recomputed from hook_q, hook_k) reproduces hook_pattern;
#   "pattern" - hook_attn_scores fires the post-softmax pattern (HF modules the bridge delegates to:
#               OPT, GPT-J, ...): the scores are log(hook_pattern), exact up to a per-row constant.
_SOURCES: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _architecture(model) -> str:
    return str(getattr(model.cfg, "architecture", None) or type(model).__name__)


def attention_sources(model) -> list[str]:
    """Where each layer's pre-softmax scores come from (``"scores"``, ``"qk"`` or ``"pattern"``).

    Not read from the hook's name or the architecture: one probe forward pass (cached per model)
    captures ``hook_attn_scores`` and ``hook_pattern`` of every layer and checks which of them the
    other is, so a bridge that fires the post-softmax pattern under ``hook_attn_scores`` is found.
    Raises a ``ValueError`` naming the architecture when a layer fires no pattern (e.g. an
    ``sdpa``/flash attention implementation, which returns no weights) or scores that are neither.
    """
    try:
        return _SOURCES[model]
    except (KeyError, TypeError):
        pass
    n_layers, arch = int(model.cfg.n_layers), _architecture(model)
    T = max(2, min(6, int(model.cfg.n_ctx)))
    _, device = model_dtype_device(model)
    tokens = ((torch.arange(T, device=device) * 7 + 3) % int(model.cfg.d_vocab))[None]
    kinds = ("attn_scores", "pattern", "q", "k")
    names = {f"blocks.{l}.attn.hook_{h}" for l in range(n_layers) for h in kinds}
    with torch.no_grad(), evaluation_mode(model):
        _, cache = cached_run(model, tokens, [n for n in model.hook_dict if n in names], return_type=None)
    sources = []
    for l in range(n_layers):
        attn = f"blocks.{l}.attn"
        pattern = cache[f"{attn}.hook_pattern"] if f"{attn}.hook_pattern" in cache else None
        if pattern is None:
            impl = getattr(getattr(getattr(model, "original_model", None), "config", None), "_attn_implementation", None)
            raise ValueError(
                f"{arch}: layer {l}'s attention fires no hook_pattern (attention implementation {impl!r} returns no "
                "weights), so the decomposition cannot be computed; load the model with attn_implementation='eager'."
            )
        p = pattern.double()
        tol = max(1e-4, 8 * torch.finfo(pattern.dtype).eps)
        scores = cache[f"{attn}.hook_attn_scores"] if f"{attn}.hook_attn_scores" in cache else None

        def reproduces(s: Tensor) -> bool:  # called in this iteration only
            return bool((s.double().softmax(-1) - p).abs().max() <= tol)  # noqa: B023

        is_pattern = scores is None or (
            scores.shape == pattern.shape and bool((scores.double() - p).abs().max() <= tol)
        )
        if scores is not None and not is_pattern and scores.shape == pattern.shape and reproduces(scores):
            sources.append("scores")
        elif is_pattern:
            qk = None
            if arch == "TransformerLensNative" and f"{attn}.hook_q" in cache and f"{attn}.hook_k" in cache:
                n_heads = int(model.cfg.n_heads)
                q = expand_kv_heads(cache[f"{attn}.hook_q"], n_heads)
                k = expand_kv_heads(cache[f"{attn}.hook_k"], n_heads)
                qk = causal_scores(q, k, attention_scale(model))
            sources.append("qk" if qk is not None and reproduces(qk) else "pattern")
        else:
            raise ValueError(
                f"{arch}: layer {l}'s hook_attn_scores is neither the pre-softmax scores of its hook_pattern nor the "
                "pattern itself, so prefixlens cannot decompose this attention; this architecture is not supported."
            )
    try:
        _SOURCES[model] = sources
    except TypeError:
        pass
    return sources


def fires_pre_softmax_scores(model) -> bool:
    """Whether every layer fires ``hook_attn_scores`` before the softmax (found by
    :func:`attention_sources`, not by the architecture's name)."""
    return all(s == "scores" for s in attention_sources(model))


def attention_scale(model) -> float:
    """The divisor of ``q·k`` (``cfg.attn_scale`` when set, else ``sqrt(d_head)``)."""
    scale = float(getattr(model.cfg, "attn_scale", -1.0) or -1.0)
    return scale if scale > 0 else math.sqrt(model.cfg.d_head)


@_accepts_reference
def decompose(
    model,
    tokens: "Integer[Tensor, 'batch pos'] | Integer[Tensor, ' pos'] | str | list[str]",
    prefix: Prefix | None,
    baseline: bool = True,
    attention_mask: Shaped[Tensor, "batch mask_pos"] | None = None,
    prepend_bos: bool | None = None,
) -> HeadDecomposition:
    """Decompose every head of every layer of ``model`` run on ``tokens`` with ``prefix``.

    One prefixed forward pass gives ``A``, ``t``, ``b`` and ``hook_z`` from the pre-softmax scores.
    With ``baseline=True`` the checks against the baseline, the run without the prefix (attention
    for the same layer inputs, shift of each layer's input), are available; their one extra forward
    pass (the plain run and the patched run batched together) runs when first asked for.
    ``reference=`` is the deprecated spelling of ``baseline=`` (it warns; giving both is an error).

    The model runs in eval mode (dropout off) for every pass, the deferred baseline pass included,
    and each submodule's own train/eval mode is restored afterwards (:func:`evaluation_mode`).
    Which hook carries the pre-softmax scores is found per model by :func:`attention_sources`.
    ``attention_mask`` (``[B, T]`` or ``[B, P + T]``, see :mod:`prefixlens.injection`): padded keys get
    no attention, and every quantity at a padded query position is set to 0 (undefined there).
    ``tokens`` may be text (a string or a list of strings, left-padded with a mask when ragged;
    :mod:`prefixlens.text`); after the prefix it gets the prefix's trained BOS policy (``content_bos``; else no BOS).

    ``prefix=None`` decomposes the plain run (the baseline): there are no slots, so ``A = 0``, the
    content output ``t`` is the head's output ``z``, and ``b``, an average over no slots, is undefined
    and reported as 0 (so ``(1 − A)·t + A·b = z`` still holds exactly); ``content_pattern`` is the
    model's own pattern. Text is then the start of a sequence (the model's default BOS), as in
    :func:`prefixlens.run_with_prefix`.

    Args:
        model (TransformerBridge): the model to decompose.
        tokens: the content after the prefix: token ids ``[batch, pos]`` (or ``[pos]``), a string, or
            a list of strings.
        prefix: the prefix (any form) the content runs after; ``None``: decompose the plain run
            (``A = 0``, ``t = z``, ``b = 0``, ``n_slots = 0``; see above).
        baseline: make the checks against the run without the prefix available (run when first used).
        attention_mask: 1 for real tokens, 0 for padding: ``[batch, pos]`` or ``[batch, P + pos]``.
        prepend_bos: give text content a BOS token after the prefix (default: the prefix's ``content_bos``, else no).

    Returns:
        The decomposition of every layer and head at the content positions.
    """
    tokens, attention_mask = tokens_and_mask(model, tokens, attention_mask, prepend_bos, after=prefix)
    tokens = check_tokens(model, tokens, prefix)
    P, n_layers = n_slots(prefix), int(model.cfg.n_layers)
    mask = full_attention_mask(attention_mask, tokens, P)
    final = f"blocks.{n_layers - 1}.hook_resid_post"
    extra = {f"blocks.{l}.hook_resid_pre" for l in range(n_layers)} if baseline else set()
    scores, values, cache = prefixed_scores(model, tokens, prefix, extra_names=extra | {final}, attention_mask=mask)

    A, t, b, z, pattern, on_slots = [], [], [], [], [], []
    for l in range(n_layers):
        A_l, t_l, b_l, pattern_l = split_attention(scores[l][:, :, P:], values[l], P)
        A.append(_zero_pads(A_l, mask, P, 2)), t.append(_zero_pads(t_l, mask, P, 1))
        b.append(_zero_pads(b_l, mask, P, 1)), pattern.append(_zero_pads(pattern_l, mask, P, 2))
        z.append(_zero_pads(cache[f"blocks.{l}.attn.hook_z"][:, P:], mask, P, 1))
        on_slots.append(_zero_pads(prefix_pattern(scores[l][:, :, P:], P), mask, P, 2))

    result = HeadDecomposition(
        n_slots=P,
        prefix_attention=torch.stack(A),
        content_output=torch.stack(t),
        prefix_bias=torch.stack(b),
        z=torch.stack(z),
        content_pattern=torch.stack(pattern),
        W_O=_stacked_W_O(model),
        slot_pattern=torch.stack(on_slots),
        slot_values=torch.stack([v[:, :P] for v in values]),
        final_residual=cache[final][:, P:],
        content_mask=None if mask is None else mask[:, P:],
    )
    if baseline:
        inputs = [cache[f"blocks.{l}.hook_resid_pre"][:, P:] for l in range(n_layers)]
        start = getattr(prefix, "content_start", None) or P  # a kept-positions KVPrefix: content after the full prompt
        result._baseline_run = lambda: _baseline_run(model, tokens, inputs, P, mask, start)
    return result


def _zero_pads(x: Tensor, mask: Tensor | None, P: int, query_dim: int) -> Tensor:
    """``x`` with 0 at the padded content query positions of the full ``mask`` (none: ``x``)."""
    if mask is None:
        return x
    real = mask[:, P:].bool()
    shape = [1] * x.ndim
    shape[0], shape[query_dim] = real.shape
    return torch.where(real.reshape(shape), x, torch.zeros((), dtype=x.dtype, device=x.device))


def prefixed_cache(
    model,
    tokens: Int[Tensor, "batch pos"],
    prefix: Prefix | None,
    names: "set[str] | frozenset[str]",
    mask: Int[Tensor, "batch n_pos"] | None = None,
) -> "ActivationCache":
    """One prefixed forward pass into a cache of the hooks ``names``: no gradients, eval mode
    (:func:`evaluation_mode`), ``prefix`` attached for the pass only. ``mask``: the full ``[B, P + T]``
    attention mask (:func:`prefixlens.injection.full_attention_mask`) or ``None``.

    The one prefixed run of :func:`prefixed_scores` (so of :func:`decompose`) and of
    :mod:`prefixlens.analysis`.

    Args:
        model (TransformerBridge): the model to run.
        tokens: the content, ``[batch, pos]`` token ids.
        prefix: the prefix the content runs after.
        names: the names of the hooks to cache.
        mask: the full ``[batch, P + pos]`` attention mask, or ``None``.
    """
    masked = {} if mask is None else {"attention_mask": mask}
    # the logits are not used: compute the unembedding at the last position only (when no unembed hook is asked for)
    keep = {} if any("unembed" in n for n in names) else _last_logits_only(model)
    with torch.no_grad(), evaluation_mode(model), maybe_attached(model, prefix) as slots:
        _, cache = cached_run(model, slots.prepend(tokens), [n for n in model.hook_dict if n in names],
                              return_type=None, **keep, **masked)
    return ActivationCache(cache, model, has_batch_dim=True)


def prefixed_scores(
    model,
    tokens: Int[Tensor, "batch pos"],
    prefix: Prefix | None,
    extra_names: set[str] = frozenset(),
    attention_mask: Shaped[Tensor, "batch mask_pos"] | None = None,
) -> tuple[list[Float[Tensor, "batch head n_pos n_pos"]], list[Float[Tensor, "batch n_pos head d_head"]], "ActivationCache"]:
    """One prefixed forward pass: each layer's pre-softmax scores over all ``P + T`` positions
    (causal mask as ``-inf`` or the model's own large negative), its values with one head per query
    head, and the cache (``hook_z`` and ``extra_names`` included).

    The scores come from where :func:`attention_sources` found them: ``hook_attn_scores``, ``q·k``
    (TL-native), or ``log(hook_pattern)`` on bridges that fire only the post-softmax pattern (equal
    to the scores up to a per-row constant, which nothing here depends on). The model runs in eval
    mode (:func:`evaluation_mode`). With ``attention_mask`` (``[B, T]`` or ``[B, P + T]``) padded keys
    score ``-inf``.

    Args:
        model (TransformerBridge): the model to run.
        tokens: the content, ``[batch, pos]`` token ids.
        prefix: the prefix the content runs after.
        extra_names: further hooks to cache.
        attention_mask: 1 for real tokens, 0 for padding: ``[batch, pos]`` or ``[batch, P + pos]``.

    Returns:
        ``(scores, values, cache)``: per layer the scores ``[batch, head, P + pos, P + pos]`` and the
        values ``[batch, P + pos, head, d_head]``, and the activation cache.
    """
    mask = full_attention_mask(attention_mask, tokens, n_slots(prefix))
    n_layers, n_heads = int(model.cfg.n_layers), int(model.cfg.n_heads)
    sources = attention_sources(model)
    per_layer = {"scores": ["hook_attn_scores"], "qk": ["hook_q", "hook_k"], "pattern": ["hook_pattern"]}
    names = {f"blocks.{l}.attn.{h}" for l in range(n_layers) for h in ["hook_v", "hook_z"] + per_layer[sources[l]]}
    names |= set(extra_names)
    cache = prefixed_cache(model, tokens, prefix, names, mask)
    P = n_slots(prefix)
    scores, values = [], []
    for l in range(n_layers):
        attn = f"blocks.{l}.attn"
        if sources[l] == "scores":
            scores.append(cache[f"{attn}.hook_attn_scores"])
        elif sources[l] == "qk":
            q = expand_kv_heads(cache[f"{attn}.hook_q"], n_heads)
            k = expand_kv_heads(cache[f"{attn}.hook_k"], n_heads)
            scores.append(causal_scores(q, k, attention_scale(model)))
        else:
            log_pattern = cache[f"{attn}.hook_pattern"].log()
            _check_recoverable(model, _zero_pads(log_pattern[:, :, P:], mask, P, 2), P, l)
            scores.append(log_pattern)
        if mask is not None:
            scores[-1] = scores[-1].masked_fill(~mask.bool()[:, None, None, :], float("-inf"))
        values.append(expand_kv_heads(cache[f"{attn}.hook_v"], n_heads))
    return scores, values, cache


def _check_recoverable(model, log_pattern: Tensor, P: int, layer: int) -> None:
    """From the pattern alone, ``b`` (``t``) is lost where a query's attention on every slot
    (content key) underflowed to exactly 0; refuse instead of returning NaN for it."""
    for part, name, keys in (("prefix", "prefix bias b", log_pattern[..., :P]), ("content", "content output t", log_pattern[..., P:])):
        if keys.shape[-1] == 0:  # no slots (prefix=None): b is undefined, not lost
            continue
        lost = torch.isneginf(keys).all(-1)
        if bool(lost.any()):
            raise ValueError(
                f"{_architecture(model)} fires only the post-softmax attention pattern, and in layer {layer} "
                f"{int(lost.sum())} content queries give the {part} exactly 0 attention in {log_pattern.dtype} "
                f"(the softmax underflowed), so the {name} cannot be recovered from the pattern. Run the model in "
                "float64 (models.load(..., dtype=torch.float64)) or use a prefix that takes less extreme attention."
            )


def _stacked_W_O(model) -> Tensor | None:
    W_O = getattr(model, "W_O", None)
    return W_O.detach() if isinstance(W_O, Tensor) else None


@torch.no_grad()
def _baseline_run(model, tokens, prefixed_inputs: list[Tensor], P: int, mask: Tensor | None = None, start: int | None = None):
    """One forward pass on ``[tokens; tokens]`` at positions ``start..start+T-1`` (default ``start = P``)
    and without slots: rows
    ``:B`` are the plain run, rows ``B:`` have each layer's input replaced by the prefixed run's.
    With a (full) ``mask``, the content mask applies, positions are those of the prefixed run, and
    padded query positions get 0."""
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
    start = P if start is None else start
    positions = torch.arange(start, start + T, device=tokens.device).expand(2 * B, T)
    masked = {}
    if mask is not None:
        positions = (mask.cumsum(-1) - 1).clamp_min(0)[:, P:].repeat(2, 1) + (start - P)
        masked = {"attention_mask": mask[:, P:].repeat(2, 1)}
    with evaluation_mode(model), thread_hooks(model, hooks):  # hooks that act in this thread only
        model(
            torch.cat([tokens, tokens]), return_type=None, position_ids=positions, **masked,
            **_last_logits_only(model),  # the logits are not used
        )
    if mask is not None:
        patterns = [_zero_pads(p, mask, P, 2) for p in patterns]
        plain_inputs = [torch.where(mask[:, P:, None].bool(), x, y) for x, y in zip(plain_inputs, prefixed_inputs)]

    shifts = [
        (prefixed_inputs[l] - plain_inputs[l]).norm(dim=-1) / plain_inputs[l].norm(dim=-1).clamp_min(1e-30)
        for l in range(n_layers)
    ]
    return torch.stack(patterns), torch.stack(shifts)
