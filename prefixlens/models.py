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

__all__ = ["toy_gpt2", "toy_llama", "native", "load", "toy_tokenizer", "full_precision_softmax", "float64_throughout"]


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
    owners = [bridge] + [m for m in (bridge.__dict__.get("original_model"),) if isinstance(m, torch.nn.Module)]
    for owner in owners:
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
    """A random LLaMA (RMSNorm, rotary, gated SiLU MLP, grouped-query attention) as a bridge."""
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
    **kwargs: Any,
) -> TransformerBridge:
    """A real checkpoint: a local HuggingFace directory (read offline) or a hub name when online.

    A local directory without tokenizer files gets :func:`toy_tokenizer` sized to its vocabulary.
    Extra keyword arguments go to ``TransformerBridge.boot_transformers``.
    """
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
        return _load_from_hub(name, device=device, dtype=dtype, **kwargs)
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
        path, attn_implementation="eager", torch_dtype=dtype, local_files_only=True
    ).to(device or "cpu").eval()
    has_tokenizer = any((path / f).exists() for f in ("tokenizer.json", "tokenizer.model", "vocab.json"))
    if has_tokenizer:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        tokenizer.init_kwargs.setdefault("name_or_path", str(path))
    else:
        tokenizer = toy_tokenizer(hf_model.config.vocab_size)
    bridge = TransformerBridge.boot_transformers(
        str(path), hf_model=hf_model, tokenizer=tokenizer, dtype=dtype, **kwargs
    )
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
        return TransformerBridge.boot_transformers(name, **kwargs).eval()
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
