"""Checkpoints that resume a run exactly, and only the run that wrote them.

A checkpoint is one safetensors file (written atomically, with a checksum: see
:mod:`prefixlens.serialization`) holding the trained tensors, the optimiser's ``state_dict()`` state,
the data stream's generator and the global (dropout) RNG, with the losses and evaluations so far in
its metadata. The run id hashes everything that changes the result (method, data, config, the base
weights, dtype), so a checkpoint never resumes onto another run.
"""

from __future__ import annotations

import hashlib
import json
import re
import warnings
from pathlib import Path

import torch
from torch import Tensor

from prefixlens.serialization import CorruptFileError, load_tensors, save_tensors
from prefixlens.signature import model_dtype_device, signature_of
from prefixlens.training.config import TrainConfig, TrainResult

__all__ = ["fingerprint", "run_id", "Checkpointer", "checkpoint_dir"]

FORMAT = "2"  # 2: the optimiser state as optimizer.state_dict(); 1 (read too): per-parameter AdamW tensors


def fingerprint(model) -> str:
    """A digest of every element of the base weights (float64 sums, to 10 digits): with the exact
    sampled :func:`~prefixlens.signature.weights_fingerprint` (which catches what sums miss, e.g.
    two token embeddings swapped) it keys the run id, so a checkpoint never resumes onto other
    weights."""
    h = hashlib.sha256()
    with torch.no_grad():
        for name, p in sorted(model.state_dict().items()):
            if not torch.is_tensor(p) or not p.is_floating_point():
                continue
            x = p.detach().double().flatten()
            idx = torch.arange(x.numel())
            h.update(name.encode())
            h.update(f"{float(x.sum()):.10e},{float((x * x).sum()):.10e},{float((x * (idx % 7 + 1)).sum()):.10e}".encode())
    return h.hexdigest()


def run_id(kind: str, task: str, n_pad: int, config: TrainConfig, model, extra: dict) -> str:
    """The identity of a run: what it trains, on what data, with which settings, from which weights.

    Args:
        kind: what is trained: ``"full"``, ``"prefix"`` or ``"lora"``.
        task: the task's name (or a description of the data).
        n_pad: the number of pad tokens before each input.
        config: the training settings.
        model (TransformerBridge): the model, whose weights are part of the identity.
        extra: further settings that change the run.

    Returns:
        The SHA-256 hex digest of all of these, which names the run's checkpoint.
    """
    ident = {
        "kind": kind,
        "task": task,
        "n_pad": n_pad,
        "config": config.identity(),
        # shapes and the weights fingerprint (not the converted ones: they add nothing, and run ids stay as they were)
        "signature": {k: v for k, v in json.loads(signature_of(model).to_json()).items() if k not in ("weights_dtype", "weights_as")},
        "base": fingerprint(model),
        "dtype": str(model_dtype_device(model)[0]),  # a float64 run is not a float32 run's continuation
        "act_fn": str(getattr(model.cfg, "act_fn", None)),  # not in the weights, but changes the function
        "extra": extra,
    }
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()


def checkpoint_dir(config: TrainConfig, name: str, run: str) -> Path | None:
    if not config.checkpoint_dir:
        return None
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", name)
    return Path(config.checkpoint_dir) / f"{safe}-{run[:16]}"


class Checkpointer:
    """Saves and finds the checkpoints of one run (``directory=None``: checkpointing is off)."""

    def __init__(self, config: TrainConfig, name: str, run: str):
        self.directory = checkpoint_dir(config, name, run)
        self.run = run
        self.every = config.checkpoint_every

    def due(self, done: int, last: int) -> bool:
        """Whether the periodic schedule saves after step ``done`` (of ``last``)."""
        return self.directory is not None and bool(self.every) and (done % self.every == 0 or done == last)

    def save(self, step: int, params: dict[str, Tensor], opt: torch.optim.Optimizer, gen: torch.Generator,
             result: TrainResult, finished: bool = False) -> None:
        """Write the checkpoint of step ``step`` (nothing when checkpointing is off).

        Args:
            step: the number of steps done.
            params: the trained tensors by name.
            opt: the optimiser, whose state is saved.
            gen: the batch stream's generator, whose state is saved.
            result: the losses and evaluations so far.
            finished: whether the run is complete.
        """
        if self.directory is None:
            return
        tensors = {f"param.{k}": v for k, v in params.items()}
        for i, state in opt.state_dict()["state"].items():
            for key, value in state.items():
                t = torch.as_tensor(value)
                tensors[f"opt.state.{i}.{key}"] = t.reshape(-1) if t.ndim == 0 else t  # safetensors: no 0-d
        tensors["rng.data"] = gen.get_state()
        tensors["rng.torch"] = torch.get_rng_state()
        meta = {
            "prefixlens_checkpoint": FORMAT,
            "run_id": self.run,
            "step": str(step),
            "losses": json.dumps(result.losses),
            "evals": json.dumps(result.evals),
            "finished": "1" if finished else "0",
        }
        save_tensors(self.directory / f"step_{step:09d}.safetensors", tensors, meta)

    def latest(self) -> tuple[Path, dict, dict] | None:
        """The newest readable checkpoint whose metadata names exactly this run.

        A checkpoint that cannot be read (truncated by a crash, damaged: see
        :func:`~prefixlens.serialization.load_tensors`) is skipped with a warning naming it, and the
        previous one is used (the run then redoes the lost steps exactly and overwrites the bad file).
        """
        if self.directory is None or not self.directory.exists():
            return None
        for path in sorted(self.directory.glob("step_*.safetensors"), reverse=True):
            try:
                tensors, meta = load_tensors(path)
            except CorruptFileError as e:
                warnings.warn(f"skipping an unreadable checkpoint, resuming from an earlier one if any: {e}", UserWarning, stacklevel=4)
                continue
            if meta.get("run_id") == self.run:
                return path, tensors, meta
        return None

    def resume(self, params: dict[str, Tensor], opt: torch.optim.Optimizer, gen: torch.Generator,
               result: TrainResult) -> tuple[int, bool]:
        """Load the latest checkpoint of this run into ``params``, ``opt``, ``gen``, the global RNG
        and ``result``; returns ``(step, finished)`` (``(0, False)`` when there is none)."""
        found = self.latest()
        if found is None:
            return 0, False
        _, tensors, meta = found
        with torch.no_grad():
            for k, p in params.items():
                p.copy_(tensors[f"param.{k}"])
        opt.load_state_dict({"state": _optimizer_state(tensors, params, opt), "param_groups": opt.state_dict()["param_groups"]})
        gen.set_state(tensors["rng.data"])
        torch.set_rng_state(tensors["rng.torch"])
        step = int(meta["step"])
        result.losses = json.loads(meta["losses"])
        result.evals = json.loads(meta["evals"])
        result.resumed_from = step
        return step, meta.get("finished") == "1"


def _optimizer_state(tensors: dict[str, Tensor], params: dict[str, Tensor], opt) -> dict[int, dict[str, Tensor]]:
    """The ``state`` of ``opt.state_dict()`` as saved (hyperparameters come from the current
    optimiser, which the run id ties to the same config). Format-1 checkpoints keyed the AdamW
    tensors by the parameter's position in ``params``; they are mapped to the optimiser's order."""
    state: dict[int, dict[str, Tensor]] = {}
    for name, t in tensors.items():
        if name.startswith("opt.state."):
            _, _, i, key = name.split(".", 3)
            state.setdefault(int(i), {})[key] = t.reshape(()) if key == "step" else t
    if state:
        return state
    order = {id(p): j for j, p in enumerate(p for g in opt.param_groups for p in g["params"])}
    for i, p in enumerate(params.values()):  # format 1
        if f"opt.{i}.exp_avg" in tensors:
            state[order[id(p)]] = {
                "step": tensors[f"opt.{i}.step"].reshape(()).clone(),
                "exp_avg": tensors[f"opt.{i}.exp_avg"],
                "exp_avg_sq": tensors[f"opt.{i}.exp_avg_sq"],
            }
    return state
