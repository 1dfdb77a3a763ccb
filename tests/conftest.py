"""Shared fixtures: tiny random models of the three families, in float32 and float64."""

from __future__ import annotations

import functools
import os
import warnings

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
warnings.filterwarnings("ignore", category=UserWarning, module="transformer_lens")

from prefixlens import models  # noqa: E402

# Tolerances of the identities (max |Δ|), stated once.
TOL = {torch.float32: 1e-5, torch.float64: 1e-10}
DECOMPOSITION_TOL = {torch.float32: 1e-5, torch.float64: 1e-12}

FAMILIES = {
    "gpt2": functools.partial(models.toy_gpt2, n_layers=2, d_model=32, n_heads=4, d_vocab=61, n_ctx=64),
    "llama_gqa": functools.partial(
        models.toy_llama, n_layers=2, d_model=32, n_heads=4, n_kv_heads=2, d_vocab=61, n_ctx=64
    ),
    "native": functools.partial(models.native, n_layers=2, d_model=32, n_heads=4, d_vocab=61, n_ctx=64),
}


@functools.cache
def build(family: str, dtype: torch.dtype = torch.float32):
    """A cached tiny model; ``init_range=0.3`` so attention is far from uniform."""
    model = FAMILIES[family](seed=7, init_range=0.3, dtype=dtype)
    model.requires_grad_(False)
    return model


@pytest.fixture(params=list(FAMILIES))
def family(request) -> str:
    return request.param


@pytest.fixture(params=[torch.float32, torch.float64], ids=["fp32", "fp64"])
def dtype(request) -> torch.dtype:
    return request.param


def n_attached_hooks(model) -> int:
    """Forward and backward hooks currently attached anywhere in ``model``'s HookPoints, counted at the
    torch level (TransformerLens's own lists miss hooks registered on the module directly, as a prefix's are)."""
    points = {id(hp): hp for hp in model.hook_dict.values()}.values()  # aliases share a HookPoint
    return sum(
        len(hp._forward_hooks) + len(hp._forward_pre_hooks) + len(hp._backward_hooks) + len(hp._backward_pre_hooks)
        for hp in points
    )


def random_tokens(shape, seed=0, low=3, high=61):
    return torch.randint(low, high, shape, generator=torch.Generator().manual_seed(seed))


# Tiny random HuggingFace models of further families (architectures TransformerLens 4.3 bridges), for
# checks that must hold on every family: config class, model class, family-specific settings.
_HF_COMMON = dict(
    vocab_size=61, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
    max_position_embeddings=64, bos_token_id=1, eos_token_id=2, pad_token_id=0, attn_implementation="eager",
    initializer_range=0.3,
)
HF_FAMILIES = {
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(num_key_value_heads=2)),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(num_key_value_heads=2, head_dim=8)),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(num_key_value_heads=2)),
    "gemma": ("GemmaConfig", "GemmaForCausalLM", dict(num_key_value_heads=2, head_dim=8)),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", dict(num_key_value_heads=2, head_dim=8)),
    "phi": ("PhiConfig", "PhiForCausalLM", dict()),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", dict(num_key_value_heads=2)),
    "gpt_neox": ("GPTNeoXConfig", "GPTNeoXForCausalLM", dict()),
    "gptj": ("GPTJConfig", "GPTJForCausalLM", dict(n_embd=32, n_layer=2, n_head=4, n_positions=64, rotary_dim=4)),
    "opt": ("OPTConfig", "OPTForCausalLM", dict(ffn_dim=64, word_embed_proj_dim=32)),
    "bloom": ("BloomConfig", "BloomForCausalLM", dict(n_head=4, n_layer=2)),
}


@functools.cache
def build_hf(family: str, dtype: torch.dtype = torch.float32):
    """A cached tiny random bridge of one of ``HF_FAMILIES`` (seed 0)."""
    import transformers

    config_name, model_name, extra = HF_FAMILIES[family]
    torch.manual_seed(0)
    config = getattr(transformers, config_name)(**{**_HF_COMMON, **extra})
    model = models._bridge(f"prefixlens-test-{family}", getattr(transformers, model_name)(config), dtype, None)
    model.requires_grad_(False)
    return model


# Tests that pass a wrong type or shape on purpose, to check prefixlens's own error message. Under the
# jaxtyping + beartype checker (`pytest --jaxtyping-packages=prefixlens,...`, CI's lock leg) the checker
# rejects the argument first, with its own error, so these are skipped there; the plain suite runs them.
WRONG_TYPES_REASON = (
    "passes a wrong type or shape on purpose to check prefixlens's own error; under --jaxtyping-packages "
    "the runtime type checker rejects it first (the plain suite runs this test)"
)


# beartype checks one randomly drawn item of each container, from Python's global `random` module.
PYTHON_RANDOM_REASON = (
    "checks Python's global random state, which the runtime type checker (beartype) draws from under "
    "--jaxtyping-packages (the plain suite runs this test)"
)


def pytest_collection_modifyitems(config, items):
    if not config.getoption("jaxtyping_packages", None):
        return
    skips = {
        "wrong_types_on_purpose": pytest.mark.skip(reason=WRONG_TYPES_REASON),
        "python_random_state": pytest.mark.skip(reason=PYTHON_RANDOM_REASON),
    }
    for item in items:
        for marker, skip in skips.items():
            if item.get_closest_marker(marker) is not None:
                item.add_marker(skip)


@pytest.fixture
def help_text(capsys):
    """``help_text(script)``: what an analysis script's ``main(["--help"])`` prints (it must exit 0),
    with white space folded so that wrapped sentences read whole."""

    def run(script) -> str:
        with pytest.raises(SystemExit) as exit_:
            script.main(["--help"])
        assert exit_.value.code == 0
        return " ".join(capsys.readouterr().out.split())

    return run
