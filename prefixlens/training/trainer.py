"""The training loop shared by every method (:func:`train_loop`; :func:`fit` for the toy tasks).

AdamW, a constant or cosine learning rate, global grad-norm clipping, a seeded data stream, periodic
evaluation, and checkpoints that resume exactly (see :mod:`.checkpoints`). The loop reads in one
screen; a step (:func:`train_step`) and the evaluation (:func:`_evaluate`) are their own functions.

**Half precision.** Trained tensors in float16 or bfloat16 are optimised through float32 master
copies (:class:`Masters`): the forward and backward run in the model's dtype, the gradients are
copied to float32, AdamW's state and update are float32, and the result is rounded back into the
half-precision tensors after each step. In float16 itself AdamW's ``eps=1e-8`` underflows to 0
(``0/0`` on a zero gradient) and bfloat16 loses updates smaller than its precision (about 0.4 % of
a value). **Every step is checked:** the loss before it, the gradient norm and every trained value
after it; a non-finite one stops the run with a ``FloatingPointError`` that says what overflowed and
what to do (float16's range ends at 65504: train in bfloat16 or float32, or lower ``lr``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from prefixlens import tasks
from prefixlens.training.checkpoints import Checkpointer
from prefixlens.training.config import TrainConfig, TrainResult
from prefixlens.training.state import keeps_global_rng

__all__ = ["train_loop", "fit", "train_step", "make_optimizer", "learning_rate", "Masters", "HALF_DTYPES"]

HALF_DTYPES = (torch.float16, torch.bfloat16)

# stream(generator, start_step) -> an iterator of batches from step `start_step` on
Stream = Callable[[torch.Generator, int], Iterator[Any]]


def make_optimizer(params: dict[str, Tensor], config: TrainConfig, decay=None, weight_decay: float = 0.01):
    """AdamW with weight decay on the tensors ``decay(name, p)`` selects (all by default)."""
    decay = decay or (lambda n, p: True)
    groups = [
        {"params": [p for n, p in params.items() if decay(n, p)], "weight_decay": weight_decay},
        {"params": [p for n, p in params.items() if not decay(n, p)], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=config.lr, betas=config.betas)


def learning_rate(config: TrainConfig, step: int) -> float:
    if config.schedule == "cosine":
        return config.lr * (0.1 + 0.45 * (1 + math.cos(math.pi * step / max(1, config.iters))))
    return config.lr


class Masters:
    """The tensors the optimiser updates: ``params`` themselves, or for the float16/bfloat16 ones
    float32 copies (``masters[name]``) whose gradients are the half-precision gradients in float32
    and whose values are rounded back into ``params`` after each step (:meth:`write_back`)."""

    def __init__(self, params: dict[str, Tensor], upcast: bool = True):
        self.params = params
        self.half = {n for n, p in params.items() if p.dtype in HALF_DTYPES} if upcast else set()
        self.masters = {
            n: (p.detach().float().clone().requires_grad_(True) if n in self.half else p) for n, p in params.items()
        }

    def gather_grads(self) -> None:
        for n in self.half:
            g = self.params[n].grad
            self.masters[n].grad = None if g is None else g.float()
            self.params[n].grad = None

    def write_back(self) -> None:
        with torch.no_grad():
            for n in self.half:
                self.params[n].copy_(self.masters[n])

    def dtype_advice(self) -> str:
        """What to do about a non-finite value in a run of this dtype."""
        dtypes = {p.dtype for p in self.params.values()}
        if torch.float16 in dtypes:
            return (
                " The model runs in float16, whose largest value is 65504 (smallest normal 6e-5): an activation, "
                "gradient or trained value overflowed. Train in bfloat16 (float32's range, same memory: "
                "model.to(torch.bfloat16)) or float32, or lower lr / the prefix's init_scale."
            )
        return " Lower lr (or init_scale), keep grad_clip on, or train in float32 or float64."


def _first_nonfinite(tensors: dict[str, Tensor]) -> str | None:
    """The name of the first tensor holding an inf or nan (``None``: all finite; one device sync)."""
    if not tensors:
        return None
    with torch.no_grad():
        finite = torch.stack([torch.isfinite(t).all() for t in tensors.values()]).tolist()
    return next((n for n, ok in zip(tensors, finite) if not ok), None)


def train_step(loss_fn: Callable[[Any], Tensor], batch: Any, opt: torch.optim.Optimizer,
               params: list[Tensor] | Masters, config: TrainConfig, step: int, name: str = "train") -> float:
    """One optimiser step on ``batch``; returns the loss before the step.

    ``params``: the trained tensors (clipped together), or their :class:`Masters` (the optimiser then
    holds the masters). The loss, the gradient norm and every trained value after the step must be
    finite, else a ``FloatingPointError`` names the step, what became non-finite and what to do.

    Args:
        loss_fn: the loss of a batch.
        batch: the batch to train on.
        opt: the optimiser.
        params: the trained tensors, or their float32 masters.
        config: the training settings (learning-rate schedule, gradient clipping).
        step: the step's number (sets the learning rate; named when something is not finite).
        name: the run's name (named when something is not finite).
    """
    masters = params if isinstance(params, Masters) else Masters({str(i): p for i, p in enumerate(params)}, upcast=False)
    lr = learning_rate(config, step)
    for group in opt.param_groups:
        group["lr"] = lr
    loss = loss_fn(batch)
    if not torch.isfinite(loss):
        cause = ("the trained values are finite, so the forward pass overflowed" if step == 0 else
                 f"the previous steps (lr {config.lr:g}) drove the model's activations out of range")
        raise FloatingPointError(f"{name}: the loss became {float(loss)} at step {step}: {cause}.{masters.dtype_advice()}")
    opt.zero_grad(set_to_none=True)
    loss.backward()
    masters.gather_grads()
    trained = list(masters.masters.values())
    norm = torch.nn.utils.clip_grad_norm_(trained, config.grad_clip if config.grad_clip else float("inf"))
    if not torch.isfinite(norm):
        raise FloatingPointError(
            f"{name}: the gradient became non-finite at step {step} (norm {float(norm)}; loss {float(loss):.4g}), "
            f"before the update: the backward pass overflowed.{masters.dtype_advice()}"
        )
    opt.step()
    masters.write_back()
    bad = _first_nonfinite(masters.params) or _first_nonfinite(masters.masters)
    if bad is not None:
        raise FloatingPointError(
            f"{name}: step {step} (lr {lr:g}) made the trained tensor {bad!r} non-finite, so the trained result would "
            f"hold inf/nan.{masters.dtype_advice()}"
        )
    return float(loss.detach())


def _evaluate(eval_fn, done: int, result: TrainResult, bar, set_mode) -> Any:
    value = eval_fn(done)
    value = dict(value) if isinstance(value, dict) else float(value)
    result.evals.append([done, value])
    if set_mode:
        set_mode()
    shown = value if isinstance(value, dict) else {"val": f"{value:.1%}"}
    bar.set_postfix(loss=f"{result.final_loss:.3f}", **{k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in shown.items()})
    return value


@keeps_global_rng
def train_loop(
    params: dict[str, Tensor],
    loss_fn: Callable[[Any], Tensor],
    stream: Stream,
    config: TrainConfig,
    run_id: str,
    name: str,
    eval_fn: Callable[[int], float | dict] | None = None,
    decay: Callable[[str, Tensor], bool] | None = None,
    weight_decay: float = 0.01,
    set_mode: Callable[[], None] | None = None,
) -> TrainResult:
    """Train ``params`` on ``loss_fn(batch)`` over ``stream(generator, start)``'s batches.

    ``decay(name, p)`` selects the tensors that get weight decay; ``eval_fn(step)`` returns the
    periodic evaluation, every ``config.eval_every`` steps and at the end: an accuracy, or a dict of
    metrics (``config.target_accuracy`` stops on the accuracy, or the dict's ``"accuracy"``);
    ``set_mode()`` puts the model in train/eval mode (called after each evaluation). The run seeds
    the global RNG (dropout) from ``config.seed`` on a fork: the caller's RNG state is left as it was.

    Args:
        params: the trained tensors by name.
        loss_fn: the loss of a batch.
        stream: ``stream(generator, start)`` gives the batches from step ``start`` on.
        config: steps, learning rate, seed, evaluation and checkpoint settings.
        run_id: the run's identity (:func:`~prefixlens.training.checkpoints.run_id`), which names its checkpoint.
        name: the run's name, which labels its progress bar.
        eval_fn: ``eval_fn(step)`` returns the periodic evaluation (``None``: none).
        decay: ``decay(name, p)`` selects the tensors that get weight decay (``None``: all).
        weight_decay: AdamW's weight decay.
        set_mode: puts the model in its training mode again after each evaluation.
    """
    config.validate()
    if not params:
        raise ValueError("nothing to train: params is empty.")
    masters = Masters(params)  # float32 copies of float16/bfloat16 tensors (the module docstring)
    bad = _first_nonfinite(params)
    if bad is not None:
        raise ValueError(f"{name}: the trained tensor {bad!r} holds inf/nan before the first step: start from finite "
                         f"values (a smaller init_scale, or another init).{masters.dtype_advice()}")
    opt = make_optimizer(masters.masters, config, decay, weight_decay)
    gen = torch.Generator().manual_seed(config.seed)
    torch.manual_seed(config.seed)
    result = TrainResult(steps=0, run_id=run_id, n_trainable=sum(p.numel() for p in params.values()))
    ckpt = Checkpointer(config, name, run_id)
    start, finished = ckpt.resume(masters.masters, opt, gen, result)
    masters.write_back()
    if finished:  # e.g. stopped early: the run is complete, do not train on
        result.steps, result.stopped_early = start, start < config.iters
        return result
    batches = stream(gen, start)
    if set_mode:
        set_mode()
    bar = tqdm(range(start, config.iters), desc=name, disable=not config.progress, leave=False, mininterval=2.0)
    done = start
    for step in bar:
        result.losses.append(train_step(loss_fn, next(batches), opt, masters, config, step, name))
        done = step + 1
        if eval_fn is not None and config.eval_every and (done % config.eval_every == 0 or done == config.iters):
            value = _evaluate(eval_fn, done, result, bar, set_mode)
            accuracy = value.get("accuracy") if isinstance(value, dict) else value
            if config.target_accuracy is not None and accuracy is not None and accuracy >= config.target_accuracy:
                result.stopped_early = done < config.iters
                ckpt.save(done, masters.masters, opt, gen, result, finished=True)
                break
        if ckpt.due(done, config.iters):
            ckpt.save(done, masters.masters, opt, gen, result, finished=done == config.iters)
    bar.close()
    result.steps = done
    return result


def fit(
    params: dict[str, Tensor],
    loss_fn: Callable[[tasks.TaskBatch], Tensor],
    task: str,
    n_pad: int,
    config: TrainConfig,
    run_id: str,
    name: str,
    eval_fn: Callable[[], float] | None = None,
    decay: Callable[[str, Tensor], bool] | None = None,
    weight_decay: float = 0.01,
    set_mode: Callable[[], None] | None = None,
) -> TrainResult:
    """:func:`train_loop` on a toy task's seeded batch stream (``eval_fn()`` returns the accuracy).

    Args:
        params: the trained tensors by name.
        loss_fn: the loss of a batch.
        task: the toy task's name.
        n_pad: the number of pad tokens before each input.
        config: steps, learning rate, seed, evaluation and checkpoint settings.
        run_id: the run's identity, which names its checkpoint.
        name: the run's name, which labels its progress bar.
        eval_fn: ``eval_fn()`` returns the accuracy (``None``: no evaluation).
        decay: ``decay(name, p)`` selects the tensors that get weight decay (``None``: all).
        weight_decay: AdamW's weight decay.
        set_mode: puts the model in its training mode again after each evaluation.
    """

    def stream(gen: torch.Generator, start: int):  # the generator's state carries the position
        return tasks.batches(task, config.batch_size, n_pad, config.seed, generator=gen)

    return train_loop(
        params, loss_fn, stream, config, run_id, name,
        eval_fn=(lambda step: eval_fn()) if eval_fn is not None else None,
        decay=decay, weight_decay=weight_decay, set_mode=set_mode,
    )
