"""A KV prefix as the model's HuggingFace key/value cache: no placeholder slots in the forward pass.

The placeholder route (:mod:`prefixlens.injection`) runs ``P`` slot positions through every layer and
overwrites their keys and values; the slots' queries, MLPs and logits are computed and thrown away.
For a :class:`~prefixlens.KVPrefix` none of that is needed: its keys and values are the whole
prefix, so they can go straight into a ``DynamicCache`` and the content runs on top of it — what
PEFT's prefix tuning does. The cache concatenates (``torch.cat``), so gradients reach the prefix.

Keys: a KVPrefix stores them as at ``hook_k`` (pre-rotary); the cache holds post-rotary keys, so
rotary models rotate them here with the model's own ``cos``/``sin`` for positions ``0..P-1`` (the
inverse of :func:`prefixlens.peft_interop`'s import). The content then sits at ``P..P+T-1``, and a
padded batch passes the full ``[B, P + T]`` mask, from which the bridge derives the positions
(``cumsum - 1``), as on the placeholder route. Equal to the placeholder route to float precision
(tested on GPT-2, LLaMA with GQA, and SmolLM2).
"""

from __future__ import annotations

import torch
from jaxtyping import Float, Integer, Shaped
from torch import Tensor

from prefixlens.injection import check_not_attached, check_tokens, full_attention_mask
from prefixlens.kv_cache import cached_forward, has_kv_cache
from prefixlens.prefixes import KVPrefix

__all__ = ["supports_cache_prefix", "prefix_cache", "logits_with_cache_prefix", "rotate_keys"]

# model types whose cache layout PEFT rewrites, or whose rotary embedding rotates interleaved pairs
_UNSUPPORTED_MODEL_TYPES = ("bloom", "gpt_bigcode", "gptj", "codegen", "chatglm", "glm", "cohere")


def _hf(model):
    return getattr(model, "original_model", None)


def supports_cache_prefix(model) -> bool:
    """Whether a KV prefix can run as this model's key/value cache: an HF-backed bridge with learned
    or rotate-half rotary positions, no weight processing, one kind of attention layer."""
    hf = _hf(model)
    if hf is None or not has_kv_cache(model):
        return False
    cfg = model.cfg
    if getattr(hf.config, "model_type", None) in _UNSUPPORTED_MODEL_TYPES:
        return False
    if getattr(cfg, "positional_embedding_type", "standard") not in ("standard", "rotary"):
        return False
    if getattr(cfg, "rotary_adjacent_pairs", False) or getattr(cfg, "fold_value_biases", False):
        return False
    if getattr(hf.config, "sliding_window", None) or getattr(hf.config, "layer_types", None) and len(set(hf.config.layer_types)) > 1:
        return False
    if getattr(cfg, "positional_embedding_type", None) == "rotary":
        try:
            _rotary(model)
        except NotImplementedError:
            return False
    return True


def _rotary(model):
    from prefixlens.peft_interop import _rotary_module

    return _rotary_module(model)


def _rotate_half(x: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


def rotate_keys(model, keys: Float[Tensor, "*batch n_layers P n_kv d_head"]) -> Tensor:
    """Pre-rotary keys at positions ``0..P-1`` → the post-rotary keys the cache holds (differentiable)."""
    if getattr(model.cfg, "positional_embedding_type", "standard") != "rotary":
        return keys
    rot = _rotary(model)
    P, d_head = keys.shape[-3], keys.shape[-1]
    probe = torch.zeros(1, P, d_head, dtype=keys.dtype, device=keys.device)
    with torch.no_grad():
        cos, sin = rot(probe, torch.arange(P, device=keys.device)[None])
    cos, sin = cos[0].to(keys.dtype)[:, None, :], sin[0].to(keys.dtype)[:, None, :]  # [P, 1, rot_dim]
    rot_dim = cos.shape[-1]
    k_rot, k_pass = keys[..., :rot_dim], keys[..., rot_dim:]
    return torch.cat([k_rot * cos + _rotate_half(k_rot) * sin, k_pass], dim=-1)


def prefix_cache(model, prefix: KVPrefix, batch: int):
    """A ``DynamicCache`` holding ``prefix``'s keys (rotated) and values for ``batch`` rows."""
    from transformers import DynamicCache

    keys = rotate_keys(model, prefix.keys)
    values = prefix.values
    if not prefix.batched:
        keys, values = keys.unsqueeze(0).expand(batch, *keys.shape), values.unsqueeze(0).expand(batch, *values.shape)
    # [B, L, P, n_kv, d] -> per layer [B, n_kv, P, d]
    layers = [(keys[:, l].transpose(1, 2), values[:, l].transpose(1, 2)) for l in range(keys.shape[1])]
    return DynamicCache(ddp_cache_data=layers, config=_hf(model).config)


def logits_with_cache_prefix(
    model,
    tokens: Integer[Tensor, "batch pos"] | Integer[Tensor, " pos"],
    prefix: KVPrefix,
    attention_mask: Shaped[Tensor, "batch mask_pos"] | None = None,
) -> Float[Tensor, "batch pos d_vocab"]:
    """Content logits of ``model`` with ``prefix`` before ``tokens``, the prefix served as the cache:
    what :func:`prefixlens.run_with_prefix` gives, without running placeholder slots.
    ``attention_mask``: ``[B, T]`` content or ``[B, P + T]`` full (1 = real token)."""
    if not isinstance(prefix, KVPrefix):
        raise TypeError(f"the cache route takes a KVPrefix, got {type(prefix).__name__}; convert with prefix.to_kv(model).")
    if not supports_cache_prefix(model):
        raise NotImplementedError("this model cannot take a KV prefix as its cache; use prefixlens.run_with_prefix.")
    tokens = check_tokens(model, tokens, prefix)
    check_not_attached(model, "running with a prefix as the key/value cache")
    mask = full_attention_mask(attention_mask, tokens, prefix.length)
    extra = {} if mask is None else {"attention_mask": mask}
    logits, _ = cached_forward(model, tokens, prefix_cache(model, prefix, tokens.shape[0]), **extra)
    return logits
