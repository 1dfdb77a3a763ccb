"""Shared plumbing of the table scripts: CLI, seed fan-out over processes, aggregation, JSON/Markdown.

Kept thin: all training and evaluation lives in ``prefixlens.train`` / ``prefixlens.tasks``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from prefixlens.environment import describe, environment  # noqa: E402
from prefixlens.serialization import atomic_write_text  # noqa: E402
from prefixlens.tasks import wilson_interval  # noqa: E402

# two-sided 97.5% Student-t quantiles by degrees of freedom
_T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228}


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--profile", choices=["quick", "paper"], default="quick")
    p.add_argument("--seeds", type=int, default=3, help="number of seeds (0, 1, ..., N-1)")
    p.add_argument("--jobs", type=int, default=2, help="seeds run in parallel processes")
    p.add_argument("--threads", type=int, default=1, help="torch threads per process")
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default=str(ROOT / "results"), help="directory for <experiment>.json/.md")
    p.add_argument("--artifacts", default=str(ROOT / "runs"), help="checkpoints (git-ignored)")
    p.add_argument("--progress", action="store_true", help="tqdm bars (per process)")
    p.add_argument("--render-only", action="store_true",
                   help="rewrite the Markdown from the existing JSON (no training)")
    return p


# the quick profile's acceptance margins (issue 3): (row pattern, column rule, bound)
TARGETS = {
    "table1": [("pretrained", "ascending", ">=", 0.80), ("full_finetune_descending", "descending", ">=", 0.70),
               ("prefix_descending", "descending", "<=", 0.05)],
    "table2": [("prefix_*", "own", ">=", 0.80), ("prefix_*", "other", "<=", 0.05)],
    "table3": [(f"prefix_{t}", "own", ">=", 0.90) for t in ("ascending", "descending", "add1", "add2")]
    + [("prefix_ascending_add1", "own", ">=", 0.50), ("prefix_histogram", "own", "<=", 0.05)],
    "section6": [("lora", "histogram", ">=", 0.70), ("lora_mlp_only", "histogram", ">=", 0.70),
                 ("prefix", "histogram", "<=", 0.05), ("prefix_mlp_matched", "histogram", "<=", 0.05)],
}


def check_targets(experiment: str, rows: dict) -> list[str]:
    """One line per margin of the quick profile: met or missed, with the measured mean."""
    out = []
    for row_pat, col_rule, op, bound in TARGETS.get(experiment, []):
        for row, cols in rows.items():
            if not (row == row_pat or (row_pat.endswith("*") and row.startswith(row_pat[:-1]))):
                continue
            own = row.removeprefix("prefix_")
            for col, c in cols.items():
                if col == "params":
                    continue
                if col_rule == "own" and col != own or col_rule == "other" and col == own:
                    continue
                if col_rule not in ("own", "other") and col != col_rule:
                    continue
                ok = c["mean"] >= bound if op == ">=" else c["mean"] <= bound
                out.append(f"{'met' if ok else 'MISSED'}: {row} on {col} = {100 * c['mean']:.1f}% (target {op} {100 * bound:.0f}%)")
    return out


def command_line() -> str:
    return "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(sys.argv[0], ROOT)] + sys.argv[1:])


def _init_worker(threads: int) -> None:
    import torch

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(threads)


def run_seeds(fn, args, seeds: list[int]) -> list[dict]:
    """``[fn(args, seed) for seed in seeds]``, in ``args.jobs`` worker processes."""
    if args.jobs <= 1:
        _init_worker(args.threads)
        return [fn(args, s) for s in seeds]
    import multiprocessing as mp

    with ProcessPoolExecutor(args.jobs, mp_context=mp.get_context("spawn"), initializer=_init_worker, initargs=(args.threads,)) as ex:
        return list(ex.map(fn, [args] * len(seeds), seeds))


def cell(per_seed: list[tuple[int, int]]) -> dict:
    """Aggregate ``[(correct, n), ...]`` over seeds: mean of the per-seed accuracies; ci95 is the
    Student-t interval over seeds, widened to at least the Wilson interval of the pooled items (so a
    cell at 0/3000 reads [0, 0.13%], not [0, 0])."""
    accs = [c / n for c, n in per_seed]
    k = len(accs)
    mean = sum(accs) / k
    lo_w, hi_w = wilson_interval(sum(c for c, _ in per_seed), sum(n for _, n in per_seed))
    if k > 1:
        sd = math.sqrt(sum((a - mean) ** 2 for a in accs) / (k - 1))
        half = _T975.get(k - 1, 1.96) * sd / math.sqrt(k)
        lo, hi = min(mean - half, lo_w), max(mean + half, hi_w)
    else:
        lo, hi = lo_w, hi_w
    return {"mean": mean, "ci95": [max(0.0, lo), min(1.0, hi)], "per_seed": accs}


def aggregate(per_seed_rows: list[dict]) -> dict:
    """``[{row: {col: (correct, n)}}]`` (one per seed) -> ``{row: {col: cell}}``."""
    rows: dict = {}
    for row in per_seed_rows[0]:
        rows[row] = {}
        for col in per_seed_rows[0][row]:
            rows[row][col] = cell([r[row][col] for r in per_seed_rows])
    return rows


def fmt(c: dict) -> str:
    lo, hi = c["ci95"]
    return f"{100 * c['mean']:.1f} [{100 * lo:.1f}, {100 * hi:.1f}]"


def write(args, experiment: str, rows: dict, paper: dict, extra: dict, notes: list[str], wall_s: float, columns: list[str]) -> dict:
    """Write ``results/<experiment>.json`` (the contract) and ``.md`` (ours next to the paper's).

    With ``--render-only`` the JSON already on disk is kept and only the Markdown is rewritten."""
    out = Path(args.out)
    if getattr(args, "render_only", False):
        data = json.loads((out / f"{experiment}.json").read_text())
        render(data, paper, notes, columns, out)
        return data
    data = {
        "experiment": experiment,
        "profile": args.profile,
        "seeds": args.seeds,
        "command": command_line(),
        "rows": rows,
        "wall_time_s": round(wall_s, 1),
        "cpu_time_s": round(cpu_seconds(), 1),
        **extra,
        "environment": environment(),
    }
    atomic_write_text(out / f"{experiment}.json", json.dumps(data, indent=1) + "\n")
    render(data, paper, notes, columns, out)
    return data


def render(data: dict, paper: dict, notes: list[str], columns: list[str], out: Path) -> None:
    experiment, rows = data["experiment"], data["rows"]
    cpu = data.get("cpu_time_s")
    lines = [
        f"# {experiment} ({data['profile']} profile, {data['seeds']} seeds)",
        "",
        f"Command: `{data['command']}`  ",
        f"Wall time: {data['wall_time_s'] / 60:.1f} min" + (f"; CPU time {cpu / 60:.1f} min" if cpu else "") + ".  ",
        f"Environment: {describe(data['environment'])}." if "environment" in data else "Environment: not recorded.",
        "",
        "Exact-match accuracy in %, mean over seeds [95% CI]; the paper's number in parentheses.",
        "",
        "| row | " + " | ".join(columns) + " |",
        "|---|" + "---|" * len(columns),
    ]
    for row, cols in rows.items():
        cells = []
        for c in columns:
            if c not in cols:
                cells.append("")
                continue
            p = paper.get(row, {}).get(c)
            cells.append(fmt(cols[c]) + (f" ({p})" if p is not None else ""))
        label = row + (f" ({rows[row]['params']} params)" if isinstance(rows[row].get("params"), int) else "")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    checks = check_targets(experiment, rows) if data["profile"] == "quick" else []
    if checks:
        lines += ["", "## Quick-profile margins", ""] + [f"- {c}" for c in checks]
    if notes:
        lines += ["", "## Notes", ""] + [f"- {n}" for n in notes]
    atomic_write_text(out / f"{experiment}.md", "\n".join(lines) + "\n")


def cpu_seconds() -> float:
    """User + system CPU time of this process and its finished children (the seed workers)."""
    import resource

    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def run_or_load(args, experiment: str, fn) -> tuple[list[dict] | None, dict | None, float]:
    """Run the seeds (``(outputs, None, wall_s)``) or, with ``--render-only``, load the JSON
    (``(None, data, wall_s)``)."""
    if args.render_only:
        data = json.loads((Path(args.out) / f"{experiment}.json").read_text())
        return None, data, data["wall_time_s"]
    with Timer() as tm:
        out = run_seeds(fn, args, list(range(args.seeds)))
    return out, None, tm.s


class Timer:
    def __enter__(self):
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.s = time.perf_counter() - self.t0


def train_config(args, seed: int, settings: dict, checkpoints: str = "shared", every: int = 1000, **over):
    """The ``TrainConfig`` of one run: a profile's ``settings`` (updated by ``over``), seeded, saving a
    checkpoint every ``every`` steps under ``<artifacts>/checkpoints/<checkpoints>``."""
    from prefixlens import train as TR

    return TR.TrainConfig(seed=seed, checkpoint_dir=f"{args.artifacts}/checkpoints/{checkpoints}",
                          checkpoint_every=every, progress=args.progress, **{**settings, **over})


def prefix_run_name(seed: int, task: str, length: int | None = None) -> str:
    """The checkpoint name of a prefix run (one format, so that experiments can share runs)."""
    return f"s{seed}-prefix-{task}" + (f"-P{length}" if length else "")


def mixture_then_prefixes(args, seed: int, prof: dict, experiment: str, prefix_tasks: list[str], columns: list[str]):
    """Pretrain on the four-task mixture, train one prefix per task, evaluate every (row, column).

    Returns ``(model, prefixes, result)`` where ``result`` is the picklable per-seed record.
    With ``prof["prefix_length"]`` the prefixes take that many of the P pad slots. Checkpoints go to
    ``<artifacts>/checkpoints/shared`` so experiments with identical settings (same model, seed and
    config) reuse each other's runs instead of training them again (table 3's quick profile reuses
    section 6's pretraining and its 40-slot histogram prefix).
    """
    from prefixlens import models
    from prefixlens import tasks as T
    from prefixlens import train as TR

    P = prof["n_pad"]
    cfg = lambda key, **over: train_config(args, seed, prof[key], **over)  # noqa: E731
    model = models.toy_gpt2(d_vocab=T.VOCAB, n_ctx=P + 2 * T.LENGTH, seed=seed, device=args.device, **prof["model"])
    pre = TR.train_model(model, T.MIXTURE, P, cfg("pretrain"), name=f"s{seed}-pretrain-mixture")
    tests = {t: T.test_set(t, prof["test_items"], P, seed=seed) for t in columns}
    prefixes: dict = {"pretrained": None}
    length = prof.get("prefix_length")  # None: the prefixes replace all P pads
    logs = {"pretrain_steps": pre.steps, "pretrain_evals": pre.evals, "pretrain_resumed_from": pre.resumed_from,
            "prefix": {}}
    for task in prefix_tasks:
        key = "prefix_" + task
        over = prof.get("prefix_overrides", {}).get(task, {})
        p, res = TR.train_prefix(model, task, P, cfg("prefix", **over), form="residual", length=length,
                                 name=prefix_run_name(seed, task, length))
        prefixes[key] = p
        logs["prefix"][task] = {"steps": res.steps, "final_loss": res.final_loss, "evals": res.evals,
                                "resumed_from": res.resumed_from}
    mat = TR.accuracy_matrix(model, tests, prefixes)
    rows = {r: {t: (a.correct, a.n) for t, a in cols.items()} for r, cols in mat.items()}
    return model, prefixes, {"rows": rows, "logs": logs}


def mechanism(args, experiment: str, model, prefixes: dict, n_pad: int, seed: int, n_items: int = 128) -> dict:
    """Why prefixes work or fail, on seed ``seed``'s model (paper §4 and Figure 3).

    - ``pl.decompose`` on a mixture test batch for every prefix: the renormalised content attention
      equals the pretrained model's for the same layer inputs (``relative_attention_error`` per
      layer, in float32 and in float64) and each head output is ``(1 − A)·t + A·b``.
    - Figure 3: the attention block output of the last layer at the last input position, without
      and with each prefix, projected on its two principal directions. Saved as PNG + safetensors.
    """
    import copy

    import torch

    import prefixlens as pl
    from prefixlens import tasks as T
    from prefixlens.report import project_2d
    from prefixlens.serialization import save_tensors

    out_dir = Path(args.out) / "figures"
    test = T.test_set(T.MIXTURE, n_items, n_pad, seed=seed + 100)
    named = {k: v for k, v in prefixes.items() if v is not None}
    report: dict = {"relative_attention_error": {}, "reconstruction_error": {}, "cross_layer_shift": {},
                    "mean_prefix_attention": {}}
    m64 = copy.deepcopy(model).to(torch.float64)
    for key, prefix in named.items():
        tokens = test.tokens[:, prefix.length:]
        for label, m, p in (("float32", model, prefix), ("float64", m64, copy.deepcopy(prefix).to(torch.float64))):
            d = pl.decompose(m, tokens, p)
            report["relative_attention_error"].setdefault(key, {})[label] = d.relative_attention_error().tolist()
            report["reconstruction_error"].setdefault(key, {})[label] = d.reconstruction_error()
            if label == "float32":
                report["cross_layer_shift"][key] = d.cross_layer_shift().tolist()
                report["mean_prefix_attention"][key] = d.prefix_attention.mean(dim=(1, 2, 3)).tolist()
    del m64

    # Figure 3: attention block output at the last input position
    last = n_pad + T.LENGTH - 1
    hook = f"blocks.{int(model.cfg.n_layers) - 1}.hook_attn_out"
    with torch.no_grad():
        _, cache = model.run_with_cache(test.tokens, names_filter=lambda n: n == hook)
        acts = {"pretrained": cache[hook][:, last].clone()}
        for key, prefix in named.items():
            _, cache = pl.run_with_cache(model, test.tokens[:, prefix.length:], prefix, names_filter=hook)
            acts[key] = cache[hook][:, last].clone()
    # the report's Figure-3 projection (one implementation): PCA of all points together
    coords, _ = project_2d(torch.cat(list(acts.values())))
    proj = {k: c.float().clone() for k, c in zip(acts, coords.split([len(a) for a in acts.values()]))}
    shift = {k: float((acts[k] - acts["pretrained"]).norm(dim=-1).mean()) for k in named}
    spread = {k: float((acts[k] - acts[k].mean(0)).norm(dim=-1).mean()) for k in acts}
    report["figure3"] = {"hook": hook, "position": last, "mean_shift_norm": shift, "within_condition_spread": spread}
    tensors = {f"{k}.activation": v for k, v in acts.items()} | {f"{k}.pca2": v for k, v in proj.items()}
    save_tensors(out_dir / f"{experiment}_figure3.safetensors", tensors,
                 {"experiment": experiment, "seed": str(seed), "hook": hook, "position": str(last),
                  "task_ids": json.dumps(test.task_ids.tolist())})
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 5))
    base = proj["pretrained"]
    ax.scatter(base[:, 0], base[:, 1], c="0.6", s=10, label="no prefix (pads)")
    for i, k in enumerate(named):
        pts = proj[k]
        for j in range(min(40, len(pts))):
            ax.plot([base[j, 0], pts[j, 0]], [base[j, 1], pts[j, 1]], c=f"C{i}", lw=0.3, alpha=0.5)
        ax.scatter(pts[:, 0], pts[:, 1], c=f"C{i}", s=10, label=k)
    ax.set_title(f"{experiment}: {hook} at the last input position\n(PCA of all points; lines link the same input)")
    ax.legend(fontsize=7)
    out_dir.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    tmp = out_dir / f".{experiment}_figure3.tmp.png"
    fig.savefig(tmp, dpi=120)
    os.replace(tmp, out_dir / f"{experiment}_figure3.png")
    plt.close(fig)
    report["environment"] = environment()
    atomic_write_text(out_dir / f"{experiment}_mechanism.json", json.dumps(report, indent=1) + "\n")
    return report


def mechanism_notes(mech: dict | None) -> list[str]:
    if not mech:
        return []
    rel32 = max(max(v["float32"]) for v in mech["relative_attention_error"].values())
    rel64 = max(max(v["float64"]) for v in mech["relative_attention_error"].values())
    rec32 = max(v["float32"] for v in mech["reconstruction_error"].values())
    shift = mech["figure3"]["mean_shift_norm"]
    spread = mech["figure3"]["within_condition_spread"]
    return [
        f"Mechanism (seed 0, `pl.decompose`, layer inputs held fixed): the prefixed model's content attention, "
        f"renormalised, equals the pretrained model's to {rel32:.1e} (float32) / {rel64:.1e} (float64), max over "
        f"prefixes, layers, heads and positions; head outputs equal (1 − A)·t + A·b to {rec32:.1e} (float32).",
        "Figure 3 (`results/figures/*_figure3.png`): at the last input position the attention block output moves "
        "by a mean norm of " + ", ".join(f"{k} {v:.2f}" for k, v in shift.items())
        + f" (spread of the inputs without a prefix: {spread['pretrained']:.2f}): each prefix adds a bias.",
    ]
