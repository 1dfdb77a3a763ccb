"""Core speed benchmark: what a prefix costs over the model's own code paths, printed as ratios.

    python benchmarks/core.py            # full run on a toy LLaMA; writes benchmarks/results-core.md
    python benchmarks/core.py --quick    # tiny sizes, few repeats (smoke test); writes nothing unless --out

Three rows, each ``prefixlens time / baseline time`` (median over repeats, after warm-up, timed
alternately so load on the machine hits both sides alike):

- ``run_with_prefix`` (P slots + T tokens, prefix written at every layer's hook_k/hook_v) vs the plain
  forward on P + T real tokens — target <= 1.10;
- ``decompose`` (per-head prefix/content decomposition) vs ``model.run_with_cache`` on P + T real
  tokens — target <= 2.0 (an extra informative row adds the relative-attention and cross-layer
  checks, which cost a second, no-prefix forward pass on 2·B rows);
- ``generate`` with a prefix vs ``model.generate(..., do_sample=False, use_past_kv_cache=True,
  stop_at_eos=False)`` on P + T real tokens, same number of new tokens — target <= 1.2.

With ``--device cuda`` the peak allocated memory ratios are printed too (``torch.cuda.max_memory_allocated``);
CPU peak memory is not measured.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# this checkout's prefixlens, even where another copy is installed: the numbers and the environment
# record (its commit) must be the code next to this script
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import torch
from _timing import interleaved  # this folder's own helper

import prefixlens as pl  # noqa: E402
from prefixlens import models
from prefixlens.environment import describe
from prefixlens.serialization import atomic_write_text

RESULTS = Path(__file__).resolve().parent / "results-core.md"


@dataclass
class Sizes:
    n_layers: int
    d_model: int
    n_heads: int
    n_kv_heads: int
    d_vocab: int
    batch: int
    T: int
    P: int
    new_tokens: int
    warmup: int
    repeats: int

    def describe(self) -> str:
        return (
            f"toy LLaMA: {self.n_layers} layers, d_model {self.d_model}, {self.n_heads} heads "
            f"({self.n_kv_heads} key/value heads), vocab {self.d_vocab}; batch {self.batch}, T {self.T}, "
            f"P {self.P}, {self.new_tokens} new tokens; {self.warmup} warm-up + median of {self.repeats} repeats"
        )


FULL = Sizes(n_layers=4, d_model=256, n_heads=8, n_kv_heads=4, d_vocab=1000, batch=8, T=64, P=10,
             new_tokens=32, warmup=2, repeats=15)
QUICK = Sizes(n_layers=2, d_model=64, n_heads=4, n_kv_heads=2, d_vocab=101, batch=2, T=8, P=3,
              new_tokens=4, warmup=1, repeats=2)


@dataclass
class Row:
    name: str
    compared: str
    target: float | None
    baseline_s: float | None = None
    ours_s: float | None = None
    baseline_mem: int | None = None
    ours_mem: int | None = None
    note: str = ""

    @property
    def ratio(self) -> float | None:
        return None if self.baseline_s is None or self.ours_s is None else self.ours_s / self.baseline_s

    @property
    def mem_ratio(self) -> float | None:
        return None if not self.baseline_mem or self.ours_mem is None else self.ours_mem / self.baseline_mem


def paired_medians(
    baseline: Callable, ours: Callable, warmup: int, repeats: int, clock: Callable[[], float]
) -> tuple[float, float]:
    """Median seconds of ``baseline`` and ``ours``, timed alternately after ``warmup`` calls of each."""
    times = interleaved({"baseline": baseline, "ours": ours}, warmup, repeats, clock)
    return statistics.median(times["baseline"]), statistics.median(times["ours"])


def peak_memory(fn: Callable, device: torch.device) -> int | None:
    """Peak bytes allocated during ``fn`` above what was allocated before (CUDA only)."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - before


def run(sizes: Sizes, device: torch.device, clock: Callable[[], float] = time.perf_counter, seed: int = 0) -> list[Row]:
    torch.manual_seed(seed)
    model = models.toy_llama(
        n_layers=sizes.n_layers, d_model=sizes.d_model, n_heads=sizes.n_heads, n_kv_heads=sizes.n_kv_heads,
        d_vocab=sizes.d_vocab, n_ctx=sizes.P + sizes.T + sizes.new_tokens + 8, seed=seed, device=device,
    )
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(3, sizes.d_vocab, (sizes.batch, sizes.T), generator=g).to(device)
    prompt = torch.randint(3, sizes.d_vocab, (sizes.batch, sizes.P), generator=g).to(device)
    full = torch.cat([prompt, tokens], dim=1)  # the baseline sees P + T real tokens
    prefix = pl.KVPrefix.random(model, sizes.P, seed=seed)
    rows = []
    tm = lambda b, o: paired_medians(b, o, sizes.warmup, sizes.repeats, clock)  # noqa: E731

    with torch.no_grad():
        row = Row("run_with_prefix", "`pl.run_with_prefix(model, x, prefix)` vs `model(P+T tokens)`", 1.10)
        base_fn = lambda: model(full)  # noqa: E731
        ours_fn = lambda: pl.run_with_prefix(model, tokens, prefix)  # noqa: E731
        row.baseline_s, row.ours_s = tm(base_fn, ours_fn)
        row.baseline_mem, row.ours_mem = peak_memory(base_fn, device), peak_memory(ours_fn, device)
        rows.append(row)

        base_fn = lambda: model.run_with_cache(full)  # noqa: E731
        row = Row("decompose", "`pl.decompose(model, x, prefix)` (A, t, b, z, content pattern) vs `model.run_with_cache(P+T tokens)`", 2.0)
        ours_fn = lambda: pl.decompose(model, tokens, prefix)  # noqa: E731
        row.baseline_s, row.ours_s = tm(base_fn, ours_fn)
        row.baseline_mem, row.ours_mem = peak_memory(base_fn, device), peak_memory(ours_fn, device)
        rows.append(row)
        # With the checks against the run without the prefix (one more forward pass on 2·B rows).
        row = Row(
            "decompose + baseline checks",
            "as above, then `relative_attention_error()` and `cross_layer_shift()` (no target: informative)",
            None,
        )
        ours_fn = lambda: pl.decompose(model, tokens, prefix).relative_attention_error()  # noqa: E731
        row.baseline_s, row.ours_s = tm(base_fn, ours_fn)
        row.baseline_mem, row.ours_mem = peak_memory(base_fn, device), peak_memory(ours_fn, device)
        rows.append(row)

        row = Row(
            "generate",
            f"`pl.generate(model, x, prefix)` vs `model.generate(P+T tokens, use_past_kv_cache=True)`, "
            f"greedy, {sizes.new_tokens} new tokens",
            1.2,
        )
        if hasattr(pl, "generate"):
            base_fn = lambda: model.generate(  # noqa: E731
                full, max_new_tokens=sizes.new_tokens, do_sample=False, use_past_kv_cache=True,
                stop_at_eos=False, verbose=False, return_type="tokens",
            )
            ours_fn = lambda: pl.generate(  # noqa: E731
                model, tokens, prefix, max_new_tokens=sizes.new_tokens, do_sample=False
            )
            out = ours_fn()
            expected = (sizes.batch, sizes.T + sizes.new_tokens)
            if tuple(out.shape) != expected:
                raise RuntimeError(f"pl.generate returned {tuple(out.shape)}, expected {expected}")
            row.baseline_s, row.ours_s = tm(base_fn, ours_fn)
            row.baseline_mem, row.ours_mem = peak_memory(base_fn, device), peak_memory(ours_fn, device)
        else:
            row.note = "pl.generate not available in this checkout"
        rows.append(row)
    return rows


def _fmt(x: float | None, spec: str) -> str:
    return "n/a" if x is None else format(x, spec)


def table(rows: list[Row], with_memory: bool) -> str:
    head = "| benchmark | compared | baseline (ms) | prefixlens (ms) | ratio | target | within target |"
    sep = "|---|---|---:|---:|---:|---:|---|"
    if with_memory:
        head += " peak memory ratio |"
        sep += "---:|"
    lines = [head, sep]
    for r in rows:
        ok = "n/a" if r.ratio is None or r.target is None else ("yes" if r.ratio <= r.target else "**no**")
        line = (
            f"| {r.name} | {r.compared}{' (' + r.note + ')' if r.note else ''} | "
            f"{_fmt(r.baseline_s and r.baseline_s * 1e3, '.2f')} | {_fmt(r.ours_s and r.ours_s * 1e3, '.2f')} | "
            f"{_fmt(r.ratio, '.3f')} | {'—' if r.target is None else f'<= {r.target:g}'} | {ok} |"
        )
        if with_memory:
            line += f" {_fmt(r.mem_ratio, '.2f')} |"
        lines.append(line)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny sizes and two repeats (smoke test)")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default 1)")
    parser.add_argument("--repeats", type=int, default=None, help="override the number of timed repeats")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument("--clock", choices=("auto", "cpu", "wall"), default="auto",
                        help="cpu: process CPU time (robust on a shared machine; needs one thread); wall: "
                        "perf_counter. auto: cpu for one CPU thread, wall otherwise")
    parser.add_argument("--out", type=Path, default=None,
                        help=f"Markdown output (default {RESULTS.name} for a full run, nothing for --quick)")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    sizes = QUICK if args.quick else FULL
    clock_name = args.clock if args.clock != "auto" else (
        "cpu" if device.type == "cpu" and args.threads == 1 else "wall")
    clock = time.process_time if clock_name == "cpu" else time.perf_counter
    if args.repeats:
        sizes.repeats = args.repeats
    header = [
        f"sizes: {sizes.describe()}",
        f"environment: {describe()}",
        f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), "
        f"clock {clock_name} ({'process CPU time' if clock_name == 'cpu' else 'wall-clock'}), device {device}"
        + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else f" ({platform.processor() or platform.machine()})"),
    ]
    print("\n".join(header), flush=True)
    rows = run(sizes, device, clock)
    with_memory = device.type == "cuda"
    text = table(rows, with_memory)
    print(text)
    out = args.out if args.out is not None else (None if args.quick else RESULTS)
    if out is not None:
        command = "python benchmarks/core.py" + (" --quick" if args.quick else "") + (
            f" --threads {args.threads}" if args.threads != 1 else "") + (
            f" --device {args.device}" if args.device != "cpu" else "") + (
            f" --repeats {args.repeats}" if args.repeats else "") + (
            f" --clock {args.clock}" if args.clock != "auto" else "")
        body = "\n".join(
            ["# Core benchmark: prefixlens vs the model's own code paths", "",
             f"Command: `{command}`", ""]
            + [f"- {h}" for h in header]
            + ["", "Ratio = prefixlens time / baseline time (median of repeats); lower is better.", "", text, ""]
        )
        atomic_write_text(out, body)
        print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
