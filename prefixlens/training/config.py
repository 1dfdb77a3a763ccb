"""The settings of a training run (:class:`TrainConfig`) and what it did (:class:`TrainResult`)."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

__all__ = ["TrainConfig", "TrainResult"]


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
        if not is_real(self.lr) or self.lr <= 0:
            problems.append(f"lr={self.lr!r} must be a finite number > 0")
        if not is_int(self.batch_size) or self.batch_size < 1:
            problems.append(f"batch_size={self.batch_size!r} must be an int >= 1")
        betas = tuple(self.betas) if isinstance(self.betas, (tuple, list)) else None
        if betas is None or len(betas) != 2 or not all(is_real(b) and 0 <= b < 1 for b in betas):
            problems.append(f"betas={self.betas!r} must be two numbers in [0, 1)")
        if self.weight_decay is not None and (not is_real(self.weight_decay) or self.weight_decay < 0):
            problems.append(f"weight_decay={self.weight_decay!r} must be None or a finite number >= 0")
        if self.grad_clip is not None and (not is_real(self.grad_clip) or self.grad_clip < 0):
            problems.append(f"grad_clip={self.grad_clip!r} must be None/0 (no clipping) or a finite number > 0")
        if not is_int(self.seed):
            problems.append(f"seed={self.seed!r} must be an int")
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
