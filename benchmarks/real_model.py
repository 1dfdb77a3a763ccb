"""Speed and memory of prefixlens on a real model (SmolLM2-135M), printed as ratios to the baseline.

    python benchmarks/real_model.py                          # SmolLM2 float32, batch 4, T 32, P 8, 32 new tokens
    python benchmarks/real_model.py --batch 8 --T 64 --P 16  # other sizes
    python benchmarks/real_model.py --quick --model DIR       # smoke run on any local checkpoint (tests)

Every ratio is ``prefixlens / baseline`` measured in this one run: the compared calls are timed
round-robin (baseline, prefixlens, baseline, ...) after warm-up and summarised by the median, so
load on a shared machine hits both alike. The clock is the process CPU time with one thread (the
default: robust to other processes on the machine), wall-clock time otherwise.

Rows (the baseline always sees the prompt as ``P`` real tokens, the prefix is ``KVPrefix.from_prompt``
of the same prompt, so both compute the same thing):

- ``decompose``: ``pl.decompose(model, x, prefix)`` (every layer and head: A, t, b, z and the content
  pattern at the T content positions; the run without the prefix, ``baseline=True``, is deferred) vs
  ``model.run_with_cache(prompt + x)`` (every activation, scores, patterns and z included, at P + T
  positions). Target <= 1.0.
- ``decompose + baseline checks`` (informative): then ``relative_attention_error()`` and
  ``cross_layer_shift()`` (one more forward pass on 2·B rows).
- ``generate``: ``pl.generate(model, x, prefix, max_new_tokens=N)`` greedy vs HuggingFace's
  ``model.original_model.generate(prompt + x, do_sample=False, max_new_tokens=N)`` (the same EOS for
  both). The tokens are checked equal in the same run. Target <= 1.0.
- ``generate vs unwrapped HF`` (informative; ``--no-plain-hf`` skips it): the same HF call on a second
  copy of the checkpoint loaded without the bridge. TransformerLens's bridge replaces the HF model's
  submodules in place, so ``model.original_model.generate`` runs through the bridge's components too;
  this row shows what that wrapping costs both sides.
- ``KV-prefix training step``: ``benchmarks/training_step_real.py`` (``train_prefix``'s KV step vs PEFT
  prefix tuning), run as a subprocess; its own ratio is reported. Target <= 1.0.
- peak memory of ``decompose`` vs ``run_with_cache``: on CPU each call runs once in a fresh process
  after the model is loaded, whose peak-RSS mark is reset first (``/proc/self/clear_refs``), so the
  peak is the call's own; on CUDA ``torch.cuda.max_memory_allocated``.

Writes ``results/benchmark_real_model.{json,md}`` (atomically) unless ``--quick`` without ``--out-json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
# this checkout's prefixlens, even where another copy is installed: the numbers and the environment
# record (its commit) must be the code next to this script
sys.path.insert(0, str(ROOT))
import torch  # noqa: E402
from _timing import interleaved  # noqa: E402 (this folder's own helper)

import prefixlens as pl  # noqa: E402
from prefixlens import models  # noqa: E402
from prefixlens.decomposition import attention_sources  # noqa: E402
from prefixlens.environment import describe, environment  # noqa: E402
from prefixlens.serialization import atomic_write_text  # noqa: E402
from prefixlens.signature import model_dtype_device  # noqa: E402

RESULTS_JSON = ROOT / "results" / "benchmark_real_model.json"
RESULTS_MD = ROOT / "results" / "benchmark_real_model.md"
TRAINING_SCRIPT = ROOT / "benchmarks" / "training_step_real.py"


@dataclass
class Sizes:
    batch: int = 4
    T: int = 32
    P: int = 8
    new_tokens: int = 32
    warmup: int = 1
    repeats: int = 5


QUICK = Sizes(batch=2, T=6, P=3, new_tokens=4, warmup=1, repeats=2)


@dataclass
class Row:
    name: str
    compared: str
    target: float | None
    baseline_ms: float | None = None
    prefixlens_ms: float | None = None
    baseline_ms_all: list[float] = field(default_factory=list)
    prefixlens_ms_all: list[float] = field(default_factory=list)
    note: str = ""

    @property
    def ratio(self) -> float | None:
        if self.baseline_ms is None or self.prefixlens_ms is None:
            return None
        return self.prefixlens_ms / self.baseline_ms

    def as_dict(self) -> dict:
        ratio = self.ratio
        return asdict(self) | {
            "ratio": None if ratio is None else round(ratio, 4),
            "within_target": None if ratio is None or self.target is None else ratio <= self.target,
        }


def _median(values: list[float]) -> float:
    return round(statistics.median(values), 2)


def _checkpoint_dir(name: str) -> Path:
    """The local HF checkpoint directory behind ``models.load(name)``."""
    if name in models.BUILTIN_MODELS:
        return Path(models.builtin_checkpoint(name))
    return Path(name).expanduser()


def inputs(model, sizes: Sizes, seed: int = 0):
    """Content tokens ``[B, T]``, the prompt ``[P]`` (ids away from the special tokens) and the prompt
    repeated in front of the content, ``[B, P + T]`` (what the baselines run)."""
    vocab = int(model.cfg.d_vocab)
    low = min(100, vocab // 4)
    g = torch.Generator().manual_seed(seed)
    _, device = model_dtype_device(model)
    x = torch.randint(low, vocab, (sizes.batch, sizes.T), generator=g).to(device)
    prompt = torch.randint(low, vocab, (sizes.P,), generator=g).to(device)
    full = torch.cat([prompt.expand(sizes.batch, -1), x], dim=1)
    return x, prompt, full


def _eos(hf) -> int | None:
    eos = getattr(getattr(hf, "generation_config", None), "eos_token_id", None)
    if isinstance(eos, (list, tuple)):
        eos = eos[0] if eos else None
    return None if eos is None else int(eos)


def _hf_generate(hf, full, new_tokens: int, eos: int | None):
    """HF greedy decoding of ``full``, padded to ``new_tokens`` new tokens with EOS (as pl.generate pads)."""
    kwargs = dict(do_sample=False, max_new_tokens=new_tokens, attention_mask=torch.ones_like(full))
    kwargs |= dict(eos_token_id=eos, pad_token_id=eos) if eos is not None else dict(pad_token_id=0)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = hf.generate(full, **kwargs)
    width = full.shape[1] + new_tokens
    if out.shape[1] < width:
        out = torch.cat([out, out.new_full((out.shape[0], width - out.shape[1]), eos)], dim=1)
    return out


def time_rows(model, sizes: Sizes, clock, plain_hf=None) -> list[Row]:
    x, prompt, full = inputs(model, sizes)
    prefix = pl.KVPrefix.from_prompt(model, prompt)
    P, reps, warm = sizes.P, sizes.repeats, sizes.warmup
    rows = []

    with torch.no_grad():
        # --- decompose vs run_with_cache --------------------------------------------------------
        row = Row(
            "decompose",
            f"`pl.decompose(model, x, prefix)` (A, t, b, z, content pattern of all {int(model.cfg.n_layers)} layers × "
            f"{int(model.cfg.n_heads)} heads at the T content positions) vs `model.run_with_cache(prompt + x)` "
            f"(every activation at P + T positions)",
            1.0,
        )
        d = pl.decompose(model, x, prefix)
        err = d.reconstruction_error()
        row.note = f"reconstruction error {err:.1e}"
        t = interleaved({"base": lambda: model.run_with_cache(full), "ours": lambda: pl.decompose(model, x, prefix)},
                        warm, reps, clock, unit=1e3)
        row.baseline_ms_all, row.prefixlens_ms_all = t["base"], t["ours"]
        rows.append(row)

        row = Row(
            "decompose + baseline checks",
            "as above, then `relative_attention_error()` and `cross_layer_shift()` (one more forward pass on 2·B "
            "rows; informative)",
            None,
        )

        def decompose_checked():
            dd = pl.decompose(model, x, prefix)
            dd.relative_attention_error(), dd.cross_layer_shift()

        t = interleaved({"base": lambda: model.run_with_cache(full), "ours": decompose_checked}, warm, reps, clock, unit=1e3)
        row.baseline_ms_all, row.prefixlens_ms_all = t["base"], t["ours"]
        rows.append(row)

    # --- generate vs HF generate ----------------------------------------------------------------
    hf = model.original_model
    eos = _eos(hf)
    N = sizes.new_tokens

    def ours():
        return pl.generate(model, x, prefix, max_new_tokens=N, eos_token_id=eos)

    fns = {"base": lambda: _hf_generate(hf, full, N, eos), "ours": ours}
    if plain_hf is not None:
        fns["plain"] = lambda: _hf_generate(plain_hf, full, N, eos)
    got, theirs = ours(), fns["base"]()
    same = bool(torch.equal(got, theirs[:, P:]))
    check = f"same tokens as HF: {'yes' if same else 'NO'}"
    if plain_hf is not None:
        same_plain = bool(torch.equal(theirs, fns["plain"]()))
        check += f"; unwrapped HF gives the same tokens: {'yes' if same_plain else 'NO'}"
    t = interleaved(fns, warm, reps, clock, unit=1e3)
    row = Row(
        "generate",
        f"`pl.generate(model, x, prefix, max_new_tokens={N})` greedy vs "
        f"`model.original_model.generate(prompt + x, do_sample=False, max_new_tokens={N})`",
        1.0, note=check,
    )
    row.baseline_ms_all, row.prefixlens_ms_all = t["base"], t["ours"]
    rows.append(row)
    if plain_hf is not None:
        row = Row(
            "generate vs unwrapped HF",
            "as above, the baseline on a second copy of the checkpoint loaded without the bridge (informative: "
            "the bridge wraps `original_model`'s submodules, which costs both sides above)",
            None, note=check,
        )
        row.baseline_ms_all, row.prefixlens_ms_all = t["plain"], t["ours"]
        rows.append(row)
        row = Row(
            "HF generate: bridged vs unwrapped",
            "`model.original_model.generate` (ratio) vs the same call on the unwrapped copy (baseline): the "
            "bridge's own overhead (informative)",
            None,
        )
        row.baseline_ms_all, row.prefixlens_ms_all = t["plain"], t["base"]
        rows.append(row)
    for r in rows:
        if r.baseline_ms_all:
            r.baseline_ms, r.prefixlens_ms = _median(r.baseline_ms_all), _median(r.prefixlens_ms_all)
            r.baseline_ms_all = [round(v, 2) for v in r.baseline_ms_all]
            r.prefixlens_ms_all = [round(v, 2) for v in r.prefixlens_ms_all]
    return rows


# --- peak memory ------------------------------------------------------------------------------------

def _status_kb(field_name: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM) of this process (Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def memory_worker(args) -> None:
    """Child process: load the model, run one call once, print its peak memory as JSON."""
    torch.set_num_threads(args.threads)
    model = models.load(args.model, device=args.device, dtype=getattr(torch, args.dtype))
    sizes = Sizes(batch=args.batch, T=args.T, P=args.P)
    x, prompt, full = inputs(model, sizes)
    prefix = pl.KVPrefix.from_prompt(model, prompt)
    attention_sources(model)  # the one-off probe decompose runs on first use
    call = {
        "decompose": lambda: pl.decompose(model, x, prefix),
        "run_with_cache": lambda: model.run_with_cache(full),
    }[args.memory_worker]
    out: dict[str, object] = {"method": args.memory_worker}
    with torch.no_grad():
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
            result = call()
            torch.cuda.synchronize()
            out |= {"kind": "cuda_max_memory_allocated", "before_mb": before / 2**20,
                    "peak_mb": torch.cuda.max_memory_allocated() / 2**20}
        else:
            rss_before = _status_kb("VmRSS")
            reset = _reset_peak_rss()
            result = call()
            if reset and _status_kb("VmHWM") is not None:
                peak, kind = _status_kb("VmHWM"), "peak RSS of the call (VmHWM reset before it)"
            else:  # no reset: the process's peak since start (model loading included)
                peak, kind = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, "ru_maxrss of the process"
            out |= {"kind": kind, "before_mb": rss_before / 1024 if rss_before else None, "peak_mb": peak / 1024}
    del result
    out["increase_mb"] = None if out.get("before_mb") is None else out["peak_mb"] - out["before_mb"]
    print("MEMORY " + json.dumps(out), flush=True)


def measure_memory(args, runs: int) -> dict:
    """Peak memory of decompose and run_with_cache, each in fresh processes (alternating)."""
    results: dict[str, list[dict]] = {"run_with_cache": [], "decompose": []}
    cmd = [sys.executable, str(Path(__file__).resolve()), "--model", args.model, "--device", args.device,
           "--dtype", args.dtype, "--threads", str(args.threads), "--batch", str(args.batch), "--T", str(args.T),
           "--P", str(args.P)]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    for _ in range(runs):
        for method in results:
            done = subprocess.run(cmd + ["--memory-worker", method], capture_output=True, text=True, env=env)
            lines = [line for line in done.stdout.splitlines() if line.startswith("MEMORY ")]
            if done.returncode != 0 or not lines:
                raise RuntimeError(f"memory worker {method} failed:\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}")
            results[method].append(json.loads(lines[-1][len("MEMORY "):]))

    def med(method: str, key: str) -> float | None:
        values = [r[key] for r in results[method] if r.get(key) is not None]
        return round(statistics.median(values), 1) if values else None

    summary = {
        "kind": results["decompose"][0]["kind"],
        "runs": runs,
        "peak_mb": {m: med(m, "peak_mb") for m in results},
        "increase_mb": {m: med(m, "increase_mb") for m in results},
        "per_run": results,
    }
    base, ours = summary["peak_mb"]["run_with_cache"], summary["peak_mb"]["decompose"]
    summary["peak_ratio"] = round(ours / base, 3) if base else None
    bi, oi = summary["increase_mb"]["run_with_cache"], summary["increase_mb"]["decompose"]
    summary["increase_ratio"] = round(oi / bi, 3) if bi else None
    return summary


# --- the KV-prefix training step (another benchmark's script) ----------------------------------------

def training_step(args) -> dict:
    """Run ``benchmarks/training_step_real.py`` (train_prefix's KV step vs PEFT) and return its ratio."""
    if not TRAINING_SCRIPT.exists():
        return {"skipped": f"{TRAINING_SCRIPT.relative_to(ROOT)} is not in this checkout: run the KV-prefix "
                           "training-step benchmark (train_prefix vs PEFT prefix tuning) there."}
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "training_step.json"
        cmd = [sys.executable, str(TRAINING_SCRIPT), "--repeats", str(args.training_repeats),
               "--threads", str(args.threads), "--out", str(out)]
        if args.model != "smollm2-135m":
            cmd += ["--model", args.model]
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
        done = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if done.returncode != 0 or not out.exists():
            return {"failed": f"{' '.join(cmd[1:])} exited {done.returncode}: {done.stderr[-1500:]}"}
        result = json.loads(out.read_text())
    result["command"] = (f"python benchmarks/{TRAINING_SCRIPT.name} --repeats {args.training_repeats} "
                         f"--threads {args.threads}" + (f" --model {args.model}" if "--model" in cmd else ""))
    return result


# --- reporting ---------------------------------------------------------------------------------------

def _fmt(x, spec: str) -> str:
    return "n/a" if x is None else format(x, spec)


def table(rows: list[Row]) -> str:
    lines = ["| benchmark | compared | baseline (ms) | prefixlens (ms) | ratio | target | within target | note |",
             "|---|---|---:|---:|---:|---:|---|---|"]
    for r in rows:
        ratio = r.ratio
        ok = "n/a" if ratio is None or r.target is None else ("yes" if ratio <= r.target else "**no**")
        target = "—" if r.target is None else f"<= {r.target:g}"
        lines.append(f"| {r.name} | {r.compared} | {_fmt(r.baseline_ms, '.1f')} | {_fmt(r.prefixlens_ms, '.1f')} | "
                     f"{_fmt(ratio, '.3f')} | {target} | {ok} | {r.note} |")
    return "\n".join(lines)


def training_row(result: dict) -> Row:
    row = Row("KV-prefix training step",
              "`train_prefix`'s KV step (prefix served as the key/value cache) vs PEFT prefix tuning, forward + "
              "backward + AdamW (`benchmarks/training_step_real.py`)", 1.0)
    med = result.get("median_ms") or {}
    if "prefixlens_kv_cache" in med and "peft_prefix_tuning" in med:
        row.baseline_ms, row.prefixlens_ms = med["peft_prefix_tuning"], med["prefixlens_kv_cache"]
        every = result.get("all_ms") or {}
        row.baseline_ms_all = every.get("peft_prefix_tuning", [])
        row.prefixlens_ms_all = every.get("prefixlens_kv_cache", [])
        cfg = result.get("config", {})
        row.note = f"batch {cfg.get('batch_shape')}, P {cfg.get('length')}, {cfg.get('repeats')} repeats ({cfg.get('clock', 'wall')} clock)"
    else:
        row.note = result.get("skipped") or result.get("failed", "not run")
    return row


def memory_table(mem: dict) -> str:
    if "skipped" in mem:
        return f"Peak memory: not measured ({mem['skipped']})."
    p, i = mem["peak_mb"], mem["increase_mb"]
    return "\n".join([
        f"Peak memory ({mem['kind']}; median of {mem['runs']} fresh process(es) per call):",
        "",
        "| call | peak (MB) | increase over the loaded model (MB) |",
        "|---|---:|---:|",
        f"| `model.run_with_cache(prompt + x)` | {_fmt(p['run_with_cache'], '.1f')} | {_fmt(i['run_with_cache'], '.1f')} |",
        f"| `pl.decompose(model, x, prefix)` | {_fmt(p['decompose'], '.1f')} | {_fmt(i['decompose'], '.1f')} |",
        f"| ratio decompose / run_with_cache | {_fmt(mem['peak_ratio'], '.3f')} | {_fmt(mem['increase_ratio'], '.3f')} |",
    ])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m", help="built-in name or local checkpoint directory")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--T", type=int, default=None, help="content tokens per row")
    parser.add_argument("--P", type=int, default=None, help="prompt / prefix length")
    parser.add_argument("--new-tokens", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=None, help="timed rounds (median)")
    parser.add_argument("--warmup", type=int, default=None)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1: CPU-time clock)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, two rounds, no training step (smoke test)")
    parser.add_argument("--no-plain-hf", action="store_true", help="skip the unwrapped-HF generate row")
    parser.add_argument("--no-memory", action="store_true")
    parser.add_argument("--memory-runs", type=int, default=1)
    parser.add_argument("--no-training", action="store_true")
    parser.add_argument("--training-repeats", type=int, default=5)
    parser.add_argument("--out-json", type=Path, default=None)
    parser.add_argument("--out-md", type=Path, default=None)
    parser.add_argument("--memory-worker", choices=("decompose", "run_with_cache"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    sizes = QUICK if args.quick else Sizes()
    for name in ("batch", "T", "P", "repeats", "warmup"):
        if getattr(args, name) is not None:
            setattr(sizes, name, getattr(args, name))
    if args.new_tokens is not None:
        sizes.new_tokens = args.new_tokens
    args.batch, args.T, args.P = sizes.batch, sizes.T, sizes.P
    if args.memory_worker:
        memory_worker(args)
        return 0

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    clock_name = "cpu" if device.type == "cpu" and args.threads == 1 else "wall"
    clock = time.process_time if clock_name == "cpu" else time.perf_counter
    load_start = os.getloadavg()
    t0 = time.perf_counter()
    model = models.load(args.model, device=args.device, dtype=getattr(torch, args.dtype))
    load_s = time.perf_counter() - t0
    plain_hf = None
    if not args.no_plain_hf:
        from transformers import AutoModelForCausalLM

        plain_hf = AutoModelForCausalLM.from_pretrained(
            _checkpoint_dir(args.model), attn_implementation="eager", torch_dtype=getattr(torch, args.dtype),
            local_files_only=True,
        ).to(device).eval()
    cfg = model.cfg
    header = [
        f"model: {args.model} ({cfg.n_layers} layers, {cfg.n_heads} heads / {getattr(cfg, 'n_key_value_heads', None) or cfg.n_heads} "
        f"key/value heads, d_model {cfg.d_model}), {args.dtype}, loaded in {load_s:.1f} s",
        f"sizes: batch {sizes.batch}, T {sizes.T}, P {sizes.P}, {sizes.new_tokens} new tokens; {sizes.warmup} warm-up "
        f"round(s), median of {sizes.repeats} interleaved rounds",
        f"clock: {clock_name} ({'process CPU time' if clock_name == 'cpu' else 'wall clock'}), {torch.get_num_threads()} "
        f"thread(s), device {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else platform.machine()}), "
        f"{os.cpu_count()} CPUs, load average at start {load_start[0]:.1f}",
        f"environment: {describe()}",
    ]
    print("\n".join(header), flush=True)
    rows = time_rows(model, sizes, clock, plain_hf)
    del plain_hf
    print(table(rows), flush=True)

    if args.no_memory:
        memory = {"skipped": "--no-memory"}
    else:
        memory = measure_memory(args, args.memory_runs)
        print(memory_table(memory), flush=True)
    if args.no_training or args.quick:
        training = {"skipped": "--quick" if args.quick else "--no-training"}
    else:
        training = training_step(args)
    trow = training_row(training)
    print(table([trow]), flush=True)
    load_end = os.getloadavg()

    command = "python benchmarks/real_model.py" + (" " + " ".join(argv if argv is not None else sys.argv[1:])).rstrip()
    result = {
        "benchmark": "real_model",
        "command": command,
        "model": args.model,
        "dtype": args.dtype,
        "sizes": asdict(sizes),
        "clock": clock_name,
        "threads": torch.get_num_threads(),
        "device": str(device),
        "cpus": os.cpu_count(),
        "load_average": {"start": load_start, "end": load_end},
        "rows": [r.as_dict() for r in rows] + [trow.as_dict()],
        "memory": memory,
        "training_step": training,
        "environment": environment(),
    }
    out_json = args.out_json if args.out_json is not None else (None if args.quick else RESULTS_JSON)
    out_md = args.out_md if args.out_md is not None else (None if args.quick else RESULTS_MD)
    if out_json is not None:
        atomic_write_text(out_json, json.dumps(result, indent=1) + "\n")
        print(f"wrote {out_json}")
    if out_md is not None:
        body = "\n".join(
            ["# prefixlens on a real model: speed and memory as ratios to the baseline", "",
             f"Command: `{command}`", ""]
            + [f"- {h}" for h in header]
            + [f"- load average (1 min) at the end: {load_end[0]:.1f}", "",
               "Ratio = prefixlens / baseline (median of interleaved rounds, same run); lower is better.", "",
               table(rows + [trow]), "", memory_table(memory), ""]
        )
        atomic_write_text(out_md, body)
        print(f"wrote {out_md}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
