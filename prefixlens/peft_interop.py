"""Import HuggingFace PEFT prefix-tuning adapters as :class:`~prefixlens.KVPrefix`.

PEFT's prefix tuning (``PrefixTuningConfig``, with or without ``prefix_projection``) produces one flat
vector per virtual token, ``[P, 2·n_layers·token_dim]`` with ``token_dim = n_kv_heads·d_head``, and
serves it as a pre-filled HuggingFace cache. What this module reproduces (peft 0.21, read in
``peft_model.PeftModel.get_prompt`` and ``tuners/prefix_tuning/model.py``):

- **the prompt**: ``Embedding(P, 2L·token_dim)`` (no projection), or
  ``Embedding(P, token_dim) → Linear → Tanh → Linear`` (``prefix_projection=True``) evaluated on the
  token ids ``0..P-1``; in ``inference_mode`` (and in every directory written by ``save_pretrained``,
  which stores the MLP's *output* as ``prompt_embeddings``) the table is used directly. The result is
  cast to the base model's dtype, as PEFT does.
- **the split**: ``view(P, 2L, n_kv_heads, d_head)``; slot ``2l`` is layer ``l``'s keys and slot
  ``2l + 1`` its values (``permute(2, 0, 3, 1, 4).split(2)`` → ``(K, V)`` per layer).
- **the key convention**: PEFT's keys go straight into the cache, i.e. they are *post*-rotary keys at
  positions ``0..P-1``. prefixlens stores keys as at ``hook_k`` (pre-rotary), so rotary keys are
  un-rotated with the model's own ``cos``/``sin`` for positions ``0..P-1`` (taken from the HF model's
  rotary module, so ``rope_theta`` and rope scaling are respected):
  ``k_pre = (k·cos − rotate_half(k)·sin) / (cos² + sin²)`` — the exact inverse of
  ``k·cos + rotate_half(k)·sin`` even when ``attention_scaling ≠ 1``. Values only change layout.
- **positions and mask**: PEFT prepends a ``ones(B, P)`` block to a given attention mask and leaves
  ``position_ids`` to the cache offset (``cache_position = P..P+T-1``; explicit ``position_ids`` are
  shifted by ``P``), so content token ``t`` sits at position ``P + t`` — the same as
  :func:`prefixlens.run_with_prefix` without padding and on right-padded rows. On a *left*-padded row
  PEFT's default counts the padding columns, while ``run_with_prefix`` derives positions from the mask
  (each row as alone): they agree when PEFT gets ``position_ids = cumsum(mask) - 1`` (HF ``generate``'s
  convention) or ``run_with_prefix`` gets ``position_ids = arange(T)`` (PEFT's default).

Refused, with a message: adapters that are not prefix tuning, encoder–decoder adapters, adapters whose
shapes do not fit the bridge (layers, key/value heads, head size; for an in-memory ``PeftModel`` also
hidden size, heads and vocabulary of its base model), adapters whose base model is of another model
type (known for an in-memory ``PeftModel``, and for a directory whose ``base_model_name_or_path``
resolves locally), an in-memory ``PeftModel`` whose base weights differ from the bridge's (override:
``check_base_weights=False``), adapter names that do not exist (the error lists those that do), bridges
with no HuggingFace model behind them (TL-native ``boot_native`` bridges), architectures whose cache
PEFT post-processes (Bloom, GPTBigCode) or whose rotary embedding is not rotate-half, and bridges with
weight processing (``enable_compatibility_mode()`` folds value biases, which would shift the values).
A directory whose base model cannot be resolved is checked by shapes only.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor

from prefixlens.prefixes import KVPrefix
from prefixlens.signature import ModelSignature, model_dtype_device, signature_of
from prefixlens.text import default_prepend_bos

__all__ = ["kv_prefix_from_peft", "peft_prompt_to_kv"]

CONFIG_NAME = "adapter_config.json"
WEIGHT_NAMES = ("adapter_model.safetensors", "adapter_model.bin")
# Cache layouts PEFT rewrites for these model types (TRANSFORMERS_MODELS_TO_PREFIX_TUNING_POSTPROCESS_MAPPING).
POSTPROCESSED_MODEL_TYPES = ("bloom", "gpt_bigcode")
# Rotary models that rotate interleaved pairs (``rotate_every_two``) rather than halves.
INTERLEAVED_ROTARY_MODEL_TYPES = ("gptj", "codegen", "chatglm", "glm", "cohere")


def kv_prefix_from_peft(
    peft_model_or_dir: Any, model, adapter_name: str | None = None, check_base_weights: bool = True
) -> KVPrefix:
    """Import a PEFT prefix-tuning adapter for ``model``'s base model as a :class:`KVPrefix`.

    ``peft_model_or_dir``: a ``PeftModel`` in memory, or a directory written by
    ``peft_model.save_pretrained(dir)`` (``adapter_config.json`` + ``adapter_model.safetensors``; a
    non-default adapter is read from ``dir/<adapter_name>/``, as ``save_pretrained`` writes it).
    ``model``: a raw ``TransformerBridge`` of the same base model (a bridge over a HuggingFace model;
    TL-native bridges are refused). Returns keys and values ``[n_layers, P, n_kv_heads, d_head]``
    (keys pre-rotary) in the model's dtype and device, such that ``run_with_prefix(model, tokens,
    prefix)`` equals the PEFT model's logits on ``tokens``. Text after the prefix gets PEFT's BOS policy
    (``prefix.content_bos``: a BOS iff the model's tokenizer adds one), so ``run_with_prefix(model, text,
    prefix)`` equals the PEFT model on ``tokenizer(text)``.

    ``adapter_name``: ``None`` (default) means ``"default"``; for an in-memory ``PeftModel`` whose
    active adapter is another one this is refused (pass the name). A name that does not exist raises
    ``KeyError`` listing the adapters there are. Checks of the base model: the shapes always; the
    model type (``config.model_type``) when the adapter names its base (an in-memory ``PeftModel``,
    or a directory whose ``base_model_name_or_path`` resolves locally); for an in-memory
    ``PeftModel`` also its base model's weights (a sample of the input embeddings), unless
    ``check_base_weights=False`` (to move a prefix onto another checkpoint deliberately).
    """
    signature = signature_of(model)
    _check_bridge(model, signature)
    peft_model = None
    if isinstance(peft_model_or_dir, (str, os.PathLike)):
        config, flat = _read_adapter_dir(Path(peft_model_or_dir), "default" if adapter_name is None else adapter_name)
        base_config = _resolve_base_config(config)
        base_dtype = None
    elif _is_peft_model(peft_model_or_dir):
        peft_model = peft_model_or_dir
        config, flat, base_config, base_dtype = _read_peft_model(peft_model, adapter_name)
    else:
        hint = (
            " (a plain transformers model: pass the PeftModel that wraps it, or its save_pretrained directory)"
            if hasattr(peft_model_or_dir, "config") and hasattr(peft_model_or_dir, "forward") else ""
        )
        raise TypeError(
            "expected a peft PeftModel or the path of a directory written by PeftModel.save_pretrained, "
            f"got {type(peft_model_or_dir).__name__}{hint}."
        )
    if base_dtype is not None:
        flat = flat.to(base_dtype)  # PeftModel.get_prompt casts to the base model's dtype
    prefix = peft_prompt_to_kv(flat, config, model, base_config=base_config)
    if peft_model is not None and check_base_weights:
        _check_base_weights(peft_model.get_base_model(), model)
    # PEFT runs the tokenizer's encoding after the prefix: a BOS iff the checkpoint's tokenizer adds one
    prefix.content_bos = default_prepend_bos(model)
    return prefix


def peft_prompt_to_kv(
    prompt: Float[Tensor, "P flat"],
    config: Mapping[str, Any] | Any,
    model,
    base_config: Any = None,
) -> KVPrefix:
    """PEFT's flat prefix-tuning prompt ``[P, 2·n_layers·token_dim]`` → :class:`KVPrefix` for ``model``.

    ``config``: the adapter's ``PrefixTuningConfig`` (or its JSON dict). ``base_config``: the HF config
    of the PEFT model's base, when known, for the hidden-size / heads / vocabulary check.
    """
    signature = signature_of(model)
    _check_bridge(model, signature)
    cfg = _config_dict(config)
    _check_adapter(cfg, signature, model, base_config)
    P = int(cfg["num_virtual_tokens"])
    L, n_kv, d_head = signature.n_layers, signature.n_kv_heads, signature.d_head
    if prompt.ndim != 2 or tuple(prompt.shape) != (P, 2 * L * n_kv * d_head):
        raise ValueError(
            f"the PEFT prompt must be [num_virtual_tokens, 2*num_layers*token_dim] = {(P, 2 * L * n_kv * d_head)}, "
            f"got {tuple(prompt.shape)}."
        )
    dtype, device = model_dtype_device(model)
    prompt = prompt.detach().to(device=device)
    # PeftModel.get_prompt: view(B, P, 2L, n_kv, d_head).permute(2, 0, 3, 1, 4).split(2) -> (K, V) per layer,
    # i.e. slot 2l holds layer l's keys and slot 2l + 1 its values.
    kv = prompt.view(P, L, 2, n_kv, d_head)
    keys_post = kv[:, :, 0].transpose(0, 1).to(dtype)  # [L, P, n_kv, d_head], post-rotary
    values = kv[:, :, 1].transpose(0, 1).to(dtype)
    keys = _unrotate(model, signature, keys_post, base_config) if signature.positional == "rotary" else keys_post
    return KVPrefix(keys.contiguous().clone(), values.contiguous().clone(), signature)


# ---- reading the adapter ------------------------------------------------------------------------


def _is_peft_model(obj) -> bool:
    try:
        from peft import PeftModel
    except ImportError:  # pragma: no cover - without peft only directories can be read
        PeftModel = ()
    return isinstance(obj, PeftModel) or (hasattr(obj, "peft_config") and hasattr(obj, "get_base_model"))


def _read_peft_model(peft_model, adapter_name: str | None):
    configs = peft_model.peft_config
    active = getattr(peft_model, "active_adapter", None)
    if adapter_name is None:
        adapter_name = "default"
        if isinstance(active, str) and active != adapter_name and active in configs and adapter_name in configs:
            raise ValueError(
                f"the PeftModel's active adapter is {active!r}, not 'default' (it has {sorted(configs)}): pass "
                f"adapter_name={active!r} (what the PeftModel runs) or adapter_name='default' explicitly."
            )
    if adapter_name not in configs:
        raise KeyError(
            f"the PeftModel has no adapter {adapter_name!r}; it has {sorted(configs)}: pass one of them as adapter_name."
        )
    config = configs[adapter_name]
    cfg = _config_dict(config)
    _check_peft_type(cfg, f"{type(peft_model).__name__} adapter {adapter_name!r}")
    encoders = getattr(peft_model, "prompt_encoder", None)
    if encoders is None or adapter_name not in encoders:
        raise ValueError(
            f"{type(peft_model).__name__} adapter {adapter_name!r} is prefix tuning but has no prompt encoder "
            "(is it a PeftModel built by get_peft_model / PeftModel.from_pretrained?)."
        )
    encoder = encoders[adapter_name]
    P = int(cfg["num_virtual_tokens"])
    with torch.no_grad():
        if cfg.get("inference_mode"):
            flat = encoder.embedding.weight  # PEFT skips the MLP in inference mode
        else:
            tokens = torch.arange(P, device=encoder.embedding.weight.device)[None]
            # PEFT's own PrefixEncoder.forward (embedding, or embedding + MLP), called as save_pretrained does
            flat = encoder(tokens)[0]
    base = peft_model.get_base_model()
    base_dtype = getattr(peft_model, "base_model_torch_dtype", None)
    return config, flat.detach(), getattr(base, "config", None), base_dtype


def _adapters_in_dir(path: Path) -> list[str]:
    """The adapter names a ``save_pretrained`` directory holds: ``default`` (the directory itself) and
    every subdirectory with an ``adapter_config.json``."""
    names = ["default"] if (path / CONFIG_NAME).is_file() else []
    return names + sorted(d.name for d in path.iterdir() if d.is_dir() and (d / CONFIG_NAME).is_file())


def _read_adapter_dir(path: Path, adapter_name: str):
    if not path.is_dir():
        raise FileNotFoundError(f"{path} is not a directory written by PeftModel.save_pretrained.")
    available = _adapters_in_dir(path)
    if adapter_name != "default":
        # save_pretrained puts non-default adapters in a subdirectory named after them
        if not (path / adapter_name / CONFIG_NAME).is_file():
            raise KeyError(
                f"{path} holds no adapter {adapter_name!r} (no {adapter_name}/{CONFIG_NAME}); it holds "
                f"{available or 'none'} ('default' is the directory itself): pass one of them as adapter_name."
            )
        path = path / adapter_name
    elif not (path / CONFIG_NAME).is_file():
        if available:
            raise KeyError(
                f"{path} has no {CONFIG_NAME} of its own (no 'default' adapter); it holds the adapters "
                f"{available}: pass one of them as adapter_name."
            )
        raise FileNotFoundError(f"{path} has no {CONFIG_NAME}: pass a directory written by PeftModel.save_pretrained.")
    cfg = _read_config_file(path / CONFIG_NAME)
    _check_peft_type(cfg, str(path / CONFIG_NAME))
    P = cfg.get("num_virtual_tokens")
    if isinstance(P, bool) or not isinstance(P, int) or P < 1:
        raise ValueError(f"{path / CONFIG_NAME}: num_virtual_tokens={P!r} is not a positive int.")
    weights = _load_weights(path)
    if "prompt_embeddings" in weights:
        # What save_pretrained writes: the prompt itself (the MLP's output when prefix_projection=True).
        flat = weights["prompt_embeddings"]
        if flat.shape[0] != P:
            raise ValueError(
                f"{path}: prompt_embeddings has {flat.shape[0]} rows but num_virtual_tokens = {P}."
            )
        return cfg, flat
    # Otherwise a state dict of the prompt encoder itself (e.g. from torch.save(peft_model.state_dict())).
    embedding = _find_weight(weights, "embedding.weight", path)
    if not cfg.get("prefix_projection"):
        return cfg, embedding[:P]
    w0, b0 = _find_weight(weights, "transform.0.weight", path), _find_weight(weights, "transform.0.bias", path)
    w2, b2 = _find_weight(weights, "transform.2.weight", path), _find_weight(weights, "transform.2.bias", path)
    with torch.no_grad():  # PrefixEncoder: Embedding(P) -> Linear -> Tanh -> Linear
        flat = F.linear(torch.tanh(F.linear(embedding[:P], w0, b0)), w2, b2)
    return cfg, flat


def _read_config_file(file: Path) -> dict[str, Any]:
    try:
        cfg = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(
            f"{file} is not valid JSON ({e}); it should be the adapter_config.json PeftModel.save_pretrained writes."
        ) from e
    if not isinstance(cfg, dict):
        raise ValueError(f"{file} holds a JSON {type(cfg).__name__}, not the object of an adapter config.")
    return cfg


def _load_weights(path: Path) -> dict[str, Tensor]:
    for name in WEIGHT_NAMES:
        f = path / name
        if f.exists():
            try:
                if name.endswith(".safetensors"):
                    from safetensors.torch import load_file

                    weights = load_file(str(f))
                else:
                    weights = torch.load(f, map_location="cpu", weights_only=True)
            except Exception as e:
                raise ValueError(f"cannot read the adapter weights {f}: {type(e).__name__}: {e}") from e
            if not isinstance(weights, Mapping) or not all(torch.is_tensor(v) for v in weights.values()):
                raise ValueError(f"{f} does not hold a flat dict of tensors (a PEFT adapter state dict).")
            return dict(weights)
    raise FileNotFoundError(f"{path} holds no adapter weights ({' or '.join(WEIGHT_NAMES)}).")


def _find_weight(weights: Mapping[str, Tensor], suffix: str, path: Path) -> Tensor:
    hits = [k for k in weights if k == suffix or k.endswith("." + suffix)]
    hits = [k for k in hits if "transform" not in k] if suffix == "embedding.weight" else hits
    if len(hits) != 1:
        raise ValueError(
            f"{path}: expected one prompt-encoder weight ending in {suffix!r} (or 'prompt_embeddings'), "
            f"found {hits or 'none'} among {sorted(weights)[:8]}."
        )
    return weights[hits[0]]


def _config_dict(config) -> dict[str, Any]:
    if isinstance(config, Mapping):
        cfg = dict(config)
    elif hasattr(config, "to_dict"):
        cfg = config.to_dict()
    else:
        cfg = dict(vars(config))
    pt = cfg.get("peft_type")
    cfg["peft_type"] = str(getattr(pt, "value", pt))
    return cfg


def _check_peft_type(cfg: Mapping[str, Any], where: str = "this adapter") -> None:
    peft_type = str(getattr(cfg.get("peft_type"), "value", cfg.get("peft_type")))
    if peft_type != "PREFIX_TUNING":
        raise ValueError(
            f"only PEFT prefix-tuning adapters (PrefixTuningConfig) can be imported as a KVPrefix; {where} "
            f"is a {peft_type} adapter, not prefix tuning. (Prompt tuning maps to prefixlens.SoftPrompt; "
            f"weight-space adapters such as LoRA change the model itself: merge them into the base model "
            f"(merge_and_unload()) and bridge that.)"
        )


# ---- checks --------------------------------------------------------------------------------------


def _check_bridge(model, signature: ModelSignature) -> None:
    if not _is_hf_model(_hf_model(model)):
        raise ValueError(
            f"this model ({type(model).__name__}, architecture {signature.architecture!r}) has no HuggingFace model "
            "behind it (a TL-native bridge from boot_native, or a HookedTransformer), so it cannot be the base model "
            "a PEFT adapter was trained on. Import the adapter into a bridge of its base checkpoint "
            "(prefixlens.models.load(...) or TransformerBridge.boot_transformers(...))."
        )
    if signature.weight_processing != "raw":
        raise ValueError(
            "this bridge has weight processing enabled (enable_compatibility_mode() folds norms and value "
            "biases, which shifts every value by a per-head constant), so PEFT's values would not fit it. "
            "Import the adapter into a raw bridge (TransformerBridge.boot_transformers(...) without "
            "enable_compatibility_mode(), e.g. prefixlens.models.load(...))."
        )
    if signature.positional not in ("standard", "rotary"):
        raise NotImplementedError(
            f"importing PEFT prefixes is implemented for learned absolute and rotary positions, not "
            f"{signature.positional!r}."
        )


def _hf_model(model):
    return getattr(model, "original_model", None)


def _is_hf_model(hf) -> bool:
    try:
        from transformers import PreTrainedModel
    except ImportError:  # pragma: no cover
        return hf is not None and hasattr(hf, "config")
    return isinstance(hf, PreTrainedModel)


def _resolve_base_config(cfg: Mapping[str, Any]):
    """The HF config of a directory adapter's ``base_model_name_or_path``, when it resolves without the
    network (a local checkpoint directory, or a hub name in the local cache); otherwise ``None``."""
    name = cfg.get("base_model_name_or_path")
    if not name:
        return None
    try:
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(
            str(name), revision=cfg.get("revision") or None, local_files_only=True
        )
    except Exception:  # noqa: BLE001 - unknown base: only the shapes can be checked
        return None


def _check_base_weights(base, model) -> None:
    """Refuse a ``PeftModel`` whose base model is another checkpoint than the bridge's (a sample of the
    input embeddings, compared at the coarser of the two dtypes' precision)."""
    hf = _hf_model(model)
    if base is hf:
        return
    try:
        ours, theirs = hf.get_input_embeddings().weight, base.get_input_embeddings().weight
    except (AttributeError, NotImplementedError):
        return
    if ours.shape != theirs.shape:
        raise ValueError(
            f"the PeftModel's base model has input embeddings {tuple(theirs.shape)}, the bridge's "
            f"{tuple(ours.shape)}: the adapter was trained for another base model."
        )
    rows = torch.linspace(0, ours.shape[0] - 1, min(64, ours.shape[0])).long()
    a = ours.detach()[rows.to(ours.device)].double().cpu()
    b = theirs.detach()[rows.to(theirs.device)].double().cpu()
    eps = max(torch.finfo(ours.dtype).eps, torch.finfo(theirs.dtype).eps)
    scale = max(float(a.abs().max()), float(b.abs().max()), 1e-30)
    err = float((a - b).abs().max())
    if not math.isfinite(err) or err > 4 * eps * scale:
        raise ValueError(
            f"the PeftModel's base model has other weights than the bridge's (input embeddings differ by up to "
            f"{err:.3g}): the adapter was trained on another checkpoint. Bridge the PeftModel's own base model "
            "(models share it in place), or pass check_base_weights=False to import it anyway."
        )


def _model_type(model, base_config) -> str:
    for cfg in (base_config, getattr(_hf_model(model), "config", None)):
        if cfg is not None and getattr(cfg, "model_type", None):
            return str(cfg.model_type)
    return ""


def _check_adapter(cfg: Mapping[str, Any], s: ModelSignature, model, base_config) -> None:
    _check_peft_type(cfg)
    if int(cfg.get("num_transformer_submodules") or 1) != 1:
        raise ValueError(
            "this adapter is for an encoder-decoder model (num_transformer_submodules = 2); only decoder-only "
            "(causal LM) adapters can be imported."
        )
    model_type = _model_type(model, base_config)
    ours_type = str(getattr(getattr(_hf_model(model), "config", None), "model_type", "") or "")
    theirs_type = str(getattr(base_config, "model_type", "") or "") if base_config is not None else ""
    if ours_type and theirs_type and ours_type != theirs_type:
        raise ValueError(
            f"this PEFT adapter was trained on a {theirs_type!r} model and the bridge is a {ours_type!r} model; "
            "import it into a bridge of its own base model (same architecture and checkpoint)."
        )
    if model_type in POSTPROCESSED_MODEL_TYPES:
        raise NotImplementedError(
            f"PEFT rewrites the prefix cache of {model_type!r} models; importing them is not implemented."
        )
    problems = []
    P = cfg.get("num_virtual_tokens")
    if not isinstance(P, int) or P < 1:
        problems.append(f"num_virtual_tokens={P!r} is not a positive int")
    heads, token_dim = cfg.get("num_attention_heads"), cfg.get("token_dim")
    if cfg.get("num_layers") != s.n_layers:
        problems.append(f"num_layers={cfg.get('num_layers')} (adapter) vs n_layers={s.n_layers} (model)")
    if heads != s.n_kv_heads:
        problems.append(
            f"num_attention_heads={heads} (adapter; PEFT stores the key/value heads) vs n_kv_heads={s.n_kv_heads} (model)"
        )
    if not heads or not token_dim or token_dim % heads or token_dim // heads != s.d_head:
        problems.append(f"token_dim={token_dim} / num_attention_heads={heads} (adapter) vs d_head={s.d_head} (model)")
    if base_config is not None:
        ours = {
            "hidden size": s.d_model,
            "attention heads": s.n_heads,
            "layers": s.n_layers,
            "vocabulary": s.d_vocab,
        }
        theirs = {
            "hidden size": _first_attr(base_config, "hidden_size", "n_embd", "d_model"),
            "attention heads": _first_attr(base_config, "num_attention_heads", "n_head", "num_heads"),
            "layers": _first_attr(base_config, "num_hidden_layers", "n_layer", "num_layers"),
            "vocabulary": _first_attr(base_config, "vocab_size"),
        }
        problems += [
            f"{k}={theirs[k]} (PEFT base model) vs {ours[k]} (bridge)"
            for k in ours
            if theirs[k] is not None and int(theirs[k]) != int(ours[k])
        ]
    if problems:
        raise ValueError(
            "this PEFT adapter does not fit the model (it was trained for a different base model): "
            + "; ".join(problems)
            + "."
        )
    if P >= s.n_ctx:
        raise ValueError(f"the adapter's {P} virtual tokens leave no room in the model's context of {s.n_ctx}.")


def _first_attr(obj, *names):
    for n in names:
        v = getattr(obj, n, None)
        if v is not None:
            return v
    return None


# ---- rotary --------------------------------------------------------------------------------------


def _rotary_module(model):
    hf = _hf_model(model)
    if hf is None:
        raise NotImplementedError(
            "un-rotating PEFT keys needs the HuggingFace rotary module; this bridge has no original_model "
            "(TL-native bridges cannot hold a PEFT base model)."
        )
    found = [
        m
        for _, m in hf.named_modules()
        if type(m).__name__.endswith("RotaryEmbedding") and hasattr(m, "inv_freq")
    ]
    distinct = {(tuple(m.inv_freq.shape), float(m.inv_freq.double().sum()), float(getattr(m, "attention_scaling", 1.0))) for m in found}
    if not found:
        raise NotImplementedError(f"no rotary embedding module found in {type(hf).__name__}.")
    if len(distinct) > 1:
        raise NotImplementedError(
            f"{type(hf).__name__} has several different rotary embeddings (e.g. local and global layers); "
            "importing PEFT prefixes for it is not implemented."
        )
    return found[0]


def _unrotate(model, s: ModelSignature, keys: Tensor, base_config) -> Tensor:
    """Post-rotary keys at positions ``0..P-1`` → pre-rotary (as at ``hook_k``); ``keys``: [L, P, n_kv, d]."""
    model_type = _model_type(model, base_config)
    if model_type in INTERLEAVED_ROTARY_MODEL_TYPES:
        raise NotImplementedError(
            f"{model_type!r} rotates interleaved pairs; only rotate-half (LLaMA-style) rotary is implemented."
        )
    rot = _rotary_module(model)
    if "dynamic" in str(getattr(rot, "rope_type", "")):
        warnings.warn(
            "dynamic rope scaling makes the rotation of positions 0..P-1 depend on the sequence length; the "
            "imported keys use the short-sequence rotation.",
            stacklevel=3,
        )
    P = keys.shape[1]
    position_ids = torch.arange(P, device=keys.device)[None]
    probe = torch.zeros(1, P, s.d_head, dtype=keys.dtype, device=keys.device)
    with torch.no_grad():
        cos, sin = rot(probe, position_ids)  # the model's own cos/sin (theta, scaling, attention_scaling)
    cos, sin = cos[0].to(keys.dtype)[:, None, :], sin[0].to(keys.dtype)[:, None, :]  # [P, 1, rot_dim]
    rot_dim = cos.shape[-1]
    k_rot, k_pass = keys[..., :rot_dim], keys[..., rot_dim:]  # partial rotary rotates the first rot_dim dims
    k_pre = (k_rot * cos - _rotate_half(k_rot) * sin) / (cos * cos + sin * sin)
    return torch.cat([k_pre, k_pass], dim=-1)


def _rotate_half(x: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)
