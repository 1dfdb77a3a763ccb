"""Timing shared by the benchmark scripts: calls timed round-robin after warm-up, summarised by the median.

Interleaving (baseline, prefixlens, baseline, …) makes a background load on a shared machine slow
every method alike, so the ratios of one run stay meaningful when the absolute times do not.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch


def synchronize() -> None:
    """Wait for queued GPU work (no-op on the CPU), so that a clock reading covers the whole call."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def interleaved(
    fns: dict[str, Callable[[], object]],
    warmup: int,
    repeats: int,
    clock: Callable[[], float] = time.perf_counter,
    unit: float = 1.0,
) -> dict[str, list[float]]:
    """Every timed call of each function, round-robin: ``warmup`` untimed rounds, then ``repeats``
    timed ones. Returns ``{name: [seconds × unit per call]}`` (``unit=1e3``: milliseconds)."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            synchronize()
            start = clock()
            fn()
            synchronize()
            times[name].append((clock() - start) * unit)
    return times


CLOCKS = ("auto", "cpu", "wall")


def pick_clock(name: str, threads: int, device: str = "cpu") -> tuple[str, Callable[[], float]]:
    """``(name, clock)``: ``cpu`` is the process CPU time (robust to other processes on a shared machine;
    meaningful with one thread on the CPU), ``wall`` is ``perf_counter``; ``auto`` picks ``cpu`` for one
    CPU thread and ``wall`` otherwise."""
    if name == "auto":
        name = "cpu" if str(device).startswith("cpu") and threads == 1 else "wall"
    return name, (time.process_time if name == "cpu" else time.perf_counter)
