"""What a training call must hand back as it found it: the model's flags, modes and gradients, and
the caller's global RNG."""

from __future__ import annotations

import functools

import torch
from torch import nn

from prefixlens.signature import module_roots

__all__ = ["ModelState", "restores_model_state", "keeps_global_rng", "freeze", "count_trainable", "rng_devices"]


def freeze(model) -> None:
    """``requires_grad_(False)`` on every base parameter (no weight gradients in the backward)."""
    model.requires_grad_(False)


def count_trainable(module: nn.Module | list) -> int:
    params = module.parameters() if isinstance(module, nn.Module) else module
    return sum(p.numel() for p in params if p.requires_grad)


class ModelState:
    """What training changes on a model besides its trained weights: every parameter's
    ``requires_grad`` and ``.grad``, and every module's train/eval mode. ``restore()`` puts them back
    exactly (per parameter and per module), for the parameters and modules that existed at capture."""

    def __init__(self, model: nn.Module):
        roots = module_roots(model)
        params = {id(p): p for r in roots for p in r.parameters()}
        modules = {id(m): m for r in roots for m in r.modules()}
        self.params = [(p, p.requires_grad, p.grad) for p in params.values()]
        self.modes = [(m, m.training) for m in modules.values()]

    def restore(self, requires_grad: bool = True, grads: bool = True, modes: bool = True) -> None:
        for p, flag, grad in self.params:
            if requires_grad:
                p.requires_grad_(flag)
            if grads:
                p.grad = grad
        if modes:
            for m, training in self.modes:
                m.training = training


def restores_model_state(keep_frozen: bool):
    """Decorate ``train_*(model, ...)``: the model's per-module train/eval mode and its parameters'
    ``.grad`` are restored when the call returns, and so are the ``requires_grad`` flags unless
    ``keep_frozen`` (prefix and LoRA training leave the base frozen, as documented). If the call
    raises, everything is restored, flags included."""

    def deco(fn):
        @functools.wraps(fn)
        def wrapper(model, *args, **kwargs):
            state = ModelState(model)
            try:
                out = fn(model, *args, **kwargs)
            except BaseException:
                state.restore()
                raise
            state.restore(requires_grad=not keep_frozen)
            return out

        return wrapper

    return deco


def rng_devices() -> list[int]:
    """CUDA devices whose RNG a seeded run touches (``torch.manual_seed`` seeds all of them)."""
    if not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return []
    return list(range(torch.cuda.device_count()))


def keeps_global_rng(fn):
    """Run ``fn`` on a fork of the global RNGs (CPU and initialised CUDA devices): inside, the run
    seeds and draws from them (dropout) exactly as before; outside, the caller's RNG state is
    unchanged, also when ``fn`` raises."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with torch.random.fork_rng(devices=rng_devices()):
            return fn(*args, **kwargs)

    return wrapper
