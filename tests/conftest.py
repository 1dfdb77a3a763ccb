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


@functools.lru_cache(maxsize=None)
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
    """Forward and backward hooks currently attached anywhere in ``model``."""
    points = {id(hp): hp for hp in model.hook_dict.values()}.values()  # aliases share a HookPoint
    return sum(len(hp.fwd_hooks) + len(hp.bwd_hooks) for hp in points)


def random_tokens(shape, seed=0, low=3, high=61):
    return torch.randint(low, high, shape, generator=torch.Generator().manual_seed(seed))
