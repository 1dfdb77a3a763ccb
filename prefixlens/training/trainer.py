"""The training loop shared by every method (:func:`train_loop`; :func:`fit` for the toy tasks).

AdamW, a constant or cosine learning rate, global grad-norm clipping, a seeded data stream, periodic
evaluation, and checkpoints that resume exactly (see :mod:`.checkpoints`). The loop reads in one
screen; a step (:func:`train_step`) and the evaluation (:func:`_evaluate`) are their own functions.
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

__all__ = ["train_loop", "fit", "train_step", "make_optimizer", "learning_rate"]

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


def train_step(loss_fn: Callable[[Any], Tensor], batch: Any, opt: torch.optim.Optimizer, params: list[Tensor],
               config: TrainConfig, step: int, name: str = "train") -> float:
    """One optimiser step on ``batch`` (``params``: the trained tensors, clipped together); returns the
    loss before the step.

    Args:
        loss_fn: the loss of a batch.
        batch: the batch to train on.
        opt: the optimiser.
        params: the trained tensors.
        config: the training settings (learning-rate schedule, gradient clipping).
        step: the step's number (sets the learning rate; named when the loss is not finite).
        name: the run's name (named when the loss is not finite).
    """
    for group in opt.param_groups:
        group["lr"] = learning_rate(config, step)
    loss = loss_fn(batch)
    if not torch.isfinite(loss):
        raise FloatingPointError(f"{name}: loss became {float(loss)} at step {step}.")
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if config.grad_clip:
        torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
    opt.step()
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
    opt = make_optimizer(params, config, decay, weight_decay)
    gen = torch.Generator().manual_seed(config.seed)
    torch.manual_seed(config.seed)
    result = TrainResult(steps=0, run_id=run_id, n_trainable=sum(p.numel() for p in params.values()))
    ckpt = Checkpointer(config, name, run_id)
    start, finished = ckpt.resume(params, opt, gen, result)
    if finished:  # e.g. stopped early: the run is complete, do not train on
        result.steps, result.stopped_early = start, start < config.iters
        return result
    batches, plist = stream(gen, start), list(params.values())
    if set_mode:
        set_mode()
    bar = tqdm(range(start, config.iters), desc=name, disable=not config.progress, leave=False, mininterval=2.0)
    done = start
    for step in bar:
        result.losses.append(train_step(loss_fn, next(batches), opt, plist, config, step, name))
        done = step + 1
        if eval_fn is not None and config.eval_every and (done % config.eval_every == 0 or done == config.iters):
            value = _evaluate(eval_fn, done, result, bar, set_mode)
            accuracy = value.get("accuracy") if isinstance(value, dict) else value
            if config.target_accuracy is not None and accuracy is not None and accuracy >= config.target_accuracy:
                result.stopped_early = done < config.iters
                ckpt.save(done, params, opt, gen, result, finished=True)
                break
        if ckpt.due(done, config.iters):
            ckpt.save(done, params, opt, gen, result, finished=done == config.iters)
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
