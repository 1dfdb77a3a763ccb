"""The settings of a training run (:class:`TrainConfig`) and what it did (:class:`TrainResult`)."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

__all__ = ["TrainConfig", "TrainResult", "MAX_LR", "MAX_SEED", "check_init_scale", "check_reparam"]

MAX_LR = 10.0  # AdamW moves each trained value by about lr per step: more is a typo, and overflows
MAX_SEED = 2**32  # seeds are mixed with step and epoch numbers into torch's 64-bit seeds


@dataclass
class TrainConfig:
    """Hyperparameters of one training run (everything that changes the result is hashed into the
    run id; ``progress`` and the checkpoint location are not)."""

    iters: int = 1000
    lr: float = 5e-4
    batch_size: int = 64
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float | None = None  # None: 0.1 for full training, 0.01 for prefixes / LoRA
    grad_clip: float = 1.0
    seed: int = 0
    eval_every: int = 0  # 0: no periodic evaluation
    eval_items: int = 512
    target_accuracy: float | None = None  # stop once the periodic evaluation reaches this
    schedule: str = "constant"  # or "cosine": lr decays to lr/10 over `iters` (the reference: constant)
    checkpoint_dir: str | None = None
    checkpoint_every: int = 0
    progress: bool = True

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise a ``ValueError`` naming every out-of-range setting (also called by the training loop,
        so a config changed after construction is checked too)."""
        problems = []

        def is_int(v) -> bool:
            return isinstance(v, int) and not isinstance(v, bool)

        def is_real(v) -> bool:
            return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

        if not is_int(self.iters) or self.iters < 0:
            problems.append(f"iters={self.iters!r} must be an int >= 0")
        if not is_real(self.lr) or not 0 < self.lr <= MAX_LR:
            problems.append(
                f"lr={self.lr!r} must be a finite number in (0, {MAX_LR:g}] (AdamW moves each trained value by about "
                f"lr per step; a larger lr overflows the update)"
            )
        if not is_int(self.batch_size) or self.batch_size < 1:
            problems.append(f"batch_size={self.batch_size!r} must be an int >= 1")
        betas = tuple(self.betas) if isinstance(self.betas, (tuple, list)) else None
        if betas is None or len(betas) != 2 or not all(is_real(b) and 0 <= b < 1 for b in betas):
            problems.append(f"betas={self.betas!r} must be two numbers in [0, 1)")
        if self.weight_decay is not None and (not is_real(self.weight_decay) or self.weight_decay < 0):
            problems.append(f"weight_decay={self.weight_decay!r} must be None or a finite number >= 0")
        if self.grad_clip is not None and (not is_real(self.grad_clip) or self.grad_clip < 0):
            problems.append(f"grad_clip={self.grad_clip!r} must be None/0 (no clipping) or a finite number > 0")
        if (is_real(self.lr) and self.weight_decay is not None and is_real(self.weight_decay)
                and self.lr * self.weight_decay > 1):
            problems.append(
                f"lr * weight_decay = {self.lr * self.weight_decay:g} must be <= 1 (AdamW multiplies every decayed "
                f"value by 1 - lr * weight_decay each step: above 1 it flips sign and grows without bound)"
            )
        if not is_int(self.seed) or not 0 <= self.seed < MAX_SEED:
            problems.append(f"seed={self.seed!r} must be an int in [0, 2**32)")
        if not is_int(self.eval_every) or self.eval_every < 0:
            problems.append(f"eval_every={self.eval_every!r} must be an int >= 0 (0: no periodic evaluation)")
        if not is_int(self.eval_items) or self.eval_items < 1:
            problems.append(f"eval_items={self.eval_items!r} must be an int >= 1")
        if self.target_accuracy is not None and (not is_real(self.target_accuracy) or not 0 <= self.target_accuracy <= 1):
            problems.append(f"target_accuracy={self.target_accuracy!r} must be None or in [0, 1]")
        if self.target_accuracy is not None and not self.eval_every:
            problems.append("target_accuracy needs eval_every > 0 (it is checked at the periodic evaluations)")
        if self.schedule not in ("constant", "cosine"):
            problems.append(f"schedule={self.schedule!r} must be 'constant' or 'cosine'")
        if not is_int(self.checkpoint_every) or self.checkpoint_every < 0:
            problems.append(f"checkpoint_every={self.checkpoint_every!r} must be an int >= 0 (0: no periodic checkpoints)")
        if problems:
            raise ValueError("invalid TrainConfig: " + "; ".join(problems) + ".")

    def identity(self) -> dict:
        """The settings that change the result (hashed into the run id)."""
        d = dataclasses.asdict(self)
        for k in ("progress", "checkpoint_dir", "checkpoint_every"):
            d.pop(k)
        d["betas"] = list(d["betas"])
        return d


@dataclass
class TrainResult:
    """What a run did: ``losses`` (one per step) and ``evals`` (``[step, value]`` pairs: the
    accuracy on the toy tasks, a dict of metrics from an evaluation callback)."""

    steps: int
    losses: list[float] = field(default_factory=list)
    evals: list[list[Any]] = field(default_factory=list)
    run_id: str = ""
    resumed_from: int | None = None
    n_trainable: int = 0
    stopped_early: bool = False

    @property
    def final_loss(self) -> float:
        tail = self.losses[-50:]
        return float(sum(tail) / len(tail)) if tail else float("nan")


def check_init_scale(init_scale) -> None:
    """Refuse an ``init_scale`` (the standard deviation of a random start) that is not a finite number >= 0."""
    ok = init_scale is None or (
        isinstance(init_scale, (int, float)) and not isinstance(init_scale, bool) and math.isfinite(init_scale)
        and init_scale >= 0
    )
    if not ok:
        raise ValueError(f"init_scale={init_scale!r} must be None (the form's default) or a finite number >= 0 "
                         f"(the standard deviation of the random start).")


def check_reparam(reparam) -> None:
    """Refuse a ``reparam`` that is not ``None`` or a dict of ``d_small`` / ``hidden`` ints >= 1."""
    if reparam is None:
        return
    if not isinstance(reparam, dict) or set(reparam) - {"d_small", "hidden"}:
        raise ValueError(f"reparam={reparam!r} must be None or a dict with keys 'd_small' and/or 'hidden'.")
    bad = {k: v for k, v in reparam.items() if not isinstance(v, int) or isinstance(v, bool) or v < 1}
    if bad:
        raise ValueError(f"reparam: {bad} must be ints >= 1 (the MLP's table width and hidden size).")
