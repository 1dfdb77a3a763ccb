"""Shared parts of the toy-task scripts (``table1``, ``table2``, ``table3``, ``section6``).

Their own options (:func:`add_arguments`), the seed fan-out over worker processes
(:func:`run_seeds`), aggregation over seeds with 95% intervals (:func:`aggregate`), the quick
profile's acceptance margins (:data:`TARGETS`), the results table (:func:`table_markdown`), and the
mechanism check and Figure 3 of tables 2 and 3 (:func:`mechanism`). Kept thin: all training and
evaluation lives in ``prefixlens.train`` / ``prefixlens.tasks``; the command line, timing, the
environment record and the result files are :class:`prefixlens.experiment.Analysis`'s.
"""

from __future__ import annotations

import argparse
import json
import math
import os
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from prefixlens.environment import describe, environment
from prefixlens.experiment import positive_int, save_figure, seed_list, write_json
from prefixlens.tasks import wilson_interval

# two-sided 97.5% Student-t quantiles by degrees of freedom
_T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options the toy-task scripts share (the runner adds ``--profile``, ``--out``,
    ``--threads`` and ``--render-only``)."""
    parser.add_argument("--seeds", type=seed_list, default="3",
                        help="the seeds: a number N trains seeds 0, 1, ..., N-1; a comma-separated list names them "
                             "(11,12,13; one alone: 7,). The run reports the mean and the 95%% interval over them")
    parser.add_argument("--jobs", type=positive_int, default=2,
                        help="seeds trained in parallel worker processes, each with --threads torch threads "
                             "(1: all seeds in this process)")
    parser.add_argument("--device", default="cpu", help="torch device of the models (cpu, cuda, cuda:1, ...)")
    parser.add_argument("--artifacts", default="runs",
                        help="folder for the training checkpoints (<artifacts>/checkpoints; git-ignored): a training "
                             "run with the same settings resumes from its checkpoint there instead of starting again")
    parser.add_argument("--progress", action="store_true", help="tqdm progress bars (one per worker process)")


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


def _init_worker(threads: int) -> None:
    import torch

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if threads:
        torch.set_num_threads(threads)


def run_seeds(fn: Callable[[argparse.Namespace, int], dict], args: argparse.Namespace) -> list[dict]:
    """``[fn(args, seed) for seed in args.seeds]``, in ``args.jobs`` worker processes (each with
    ``args.threads`` torch threads), or in this process with ``--jobs 1`` (the runner has set its
    threads). ``fn`` and ``args`` (with its profile, ``args.settings``) are pickled for the workers, so
    both must be defined at module level."""
    seeds = list(args.seeds)
    if args.jobs <= 1 or len(seeds) <= 1:
        return [fn(args, s) for s in seeds]
    import multiprocessing as mp

    with ProcessPoolExecutor(min(args.jobs, len(seeds)), mp_context=mp.get_context("spawn"),
                             initializer=_init_worker, initargs=(args.threads,)) as ex:
        return list(ex.map(fn, [args] * len(seeds), seeds))


def seed_record(args: argparse.Namespace) -> dict:
    """What a result records of its seeds: ``seeds`` (how many) and ``seed_values`` (which)."""
    return {"seeds": len(args.seeds), "seed_values": list(args.seeds)}


def seed_values(result: dict) -> list[int]:
    """The seeds a result was run with (results made before ``seed_values`` was recorded: ``0 .. seeds-1``)."""
    return list(result.get("seed_values", range(result["seeds"])))


def seeds_label(result: dict) -> str:
    """``3 seeds``, or ``3 seeds: 11, 12, 13`` when they are not ``0 .. N-1``."""
    values = seed_values(result)
    return f"{len(values)} seeds" + ("" if values == list(range(len(values))) else ": " + ", ".join(map(str, values)))


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


def table_markdown(result: dict, *, paper: dict, columns: list[str], notes: Callable[[dict], list[str]]) -> str:
    """The results table of a toy-task run (ours next to the paper's number), the quick profile's
    margins and ``notes(result)``. A script's ``markdown`` is this with its ``paper``, ``columns``
    and ``notes`` bound (``functools.partial``)."""
    experiment, rows = result["experiment"], result["rows"]
    cpu = result.get("cpu_time_s")
    lines = [
        f"# {experiment} ({result['profile']} profile, {seeds_label(result)})",
        "",
        f"Command: `{result['command']}`  ",
        f"Wall time: {result['wall_time_s'] / 60:.1f} min" + (f"; CPU time {cpu / 60:.1f} min" if cpu else "") + ".  ",
        f"Environment: {describe(result['environment'])}." if "environment" in result else "Environment: not recorded.",
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
    checks = check_targets(experiment, rows) if result["profile"] == "quick" else []
    if checks:
        lines += ["", "## Quick-profile margins", ""] + [f"- {c}" for c in checks]
    notes_ = notes(result)
    if notes_:
        lines += ["", "## Notes", ""] + [f"- {n}" for n in notes_]
    return "\n".join(lines) + "\n"


def train_config(args: argparse.Namespace, seed: int, settings: dict, checkpoints: str = "shared", every: int = 1000,
                 **over):
    """The ``TrainConfig`` of one run: a profile's ``settings`` (updated by ``over``), seeded, saving a
    checkpoint every ``every`` steps under ``<artifacts>/checkpoints/<checkpoints>``."""
    from prefixlens import train

    return train.TrainConfig(seed=seed, checkpoint_dir=f"{args.artifacts}/checkpoints/{checkpoints}",
                             checkpoint_every=every, progress=args.progress, **{**settings, **over})


def prefix_run_name(seed: int, task: str, length: int | None = None) -> str:
    """The checkpoint name of a prefix run (one format, so that experiments can share runs)."""
    return f"s{seed}-prefix-{task}" + (f"-P{length}" if length else "")


def mixture_then_prefixes(args: argparse.Namespace, seed: int, prefix_tasks: list[str], columns: list[str]):
    """Pretrain on the four-task mixture, train one prefix per task, evaluate every (row, column).

    The settings are the profile's (``args.settings``: ``model``, ``n_pad``, ``test_items``,
    ``pretrain``, ``prefix``, and optionally ``prefix_length`` and ``prefix_overrides``). Returns
    ``(model, prefixes, result)`` where ``result`` is the picklable per-seed record. With a
    ``prefix_length`` the prefixes take that many of the ``n_pad`` pad slots. Checkpoints go to
    ``<artifacts>/checkpoints/shared`` so experiments with identical settings (same model, seed and
    config) reuse each other's runs instead of training them again (table 3's quick profile reuses
    section 6's pretraining and its 40-slot histogram prefix).
    """
    from prefixlens import models, tasks, train

    profile = args.settings
    n_pad = profile.n_pad
    model = models.toy_gpt2(d_vocab=tasks.VOCAB, n_ctx=n_pad + 2 * tasks.LENGTH, seed=seed, device=args.device,
                            **profile.model)
    pre = train.train_model(model, tasks.MIXTURE, n_pad, train_config(args, seed, profile.pretrain),
                            name=f"s{seed}-pretrain-mixture")
    tests = {t: tasks.test_set(t, profile.test_items, n_pad, seed=seed) for t in columns}
    prefixes: dict = {"pretrained": None}
    length = getattr(profile, "prefix_length", None)  # None: the prefixes replace all the pads
    overrides = getattr(profile, "prefix_overrides", None) or {}
    logs = {"pretrain_steps": pre.steps, "pretrain_evals": pre.evals, "pretrain_resumed_from": pre.resumed_from,
            "prefix": {}}
    for task in prefix_tasks:
        config = train_config(args, seed, profile.prefix, **overrides.get(task, {}))
        prefix, res = train.train_prefix(model, task, n_pad, config, form="residual", length=length,
                                         name=prefix_run_name(seed, task, length))
        prefixes["prefix_" + task] = prefix
        logs["prefix"][task] = {"steps": res.steps, "final_loss": res.final_loss, "evals": res.evals,
                                "resumed_from": res.resumed_from}
    matrix = train.accuracy_matrix(model, tests, prefixes)
    rows = {r: {t: (a.correct, a.n) for t, a in cols.items()} for r, cols in matrix.items()}
    return model, prefixes, {"rows": rows, "logs": logs}


def mixture_result(args, run_seed) -> dict:
    """Run ``run_seed`` (a :func:`mixture_seed`) for every seed and aggregate: the result of tables 2 and 3."""
    out = run_seeds(run_seed, args)
    return {**seed_record(args), "rows": aggregate([o["rows"] for o in out]),
            "per_seed_logs": [o["logs"] for o in out],
            "mechanism": next((o["mechanism"] for o in out if "mechanism" in o), None)}


def mixture_seed(args: argparse.Namespace, seed: int, experiment: str, prefix_tasks: list[str]) -> dict:
    """One seed of table 2 or 3: :func:`mixture_then_prefixes` on every prefix task (the columns are
    the prefix tasks), and on the first seed the :func:`mechanism` check and Figure 3."""
    model, prefixes, result = mixture_then_prefixes(args, seed, prefix_tasks, prefix_tasks)
    if seed == args.seeds[0]:
        result["mechanism"] = mechanism(args, experiment, model, prefixes, args.settings.n_pad, seed)
    return result


def mechanism(args: argparse.Namespace, experiment: str, model, prefixes: dict, n_pad: int, seed: int,
              n_items: int = 128) -> dict:
    """Why prefixes work or fail, on seed ``seed``'s model (paper §4 and Figure 3).

    - ``pl.decompose`` on a mixture test batch for every prefix: the renormalised content attention
      equals the pretrained model's for the same layer inputs (``relative_attention_error`` per
      layer, in float32 and in float64) and each head output is ``(1 − A)·t + A·b``.
    - Figure 3: the attention block output of the last layer at the last input position, without
      and with each prefix, projected on its two principal directions.

    Written to ``<out>/figures/<experiment>_mechanism.json``, ``_figure3.png`` and
    ``_figure3.safetensors`` (the activations and their projection).
    """
    import copy

    import torch

    import prefixlens as pl
    from prefixlens import tasks
    from prefixlens.report import project_2d
    from prefixlens.serialization import save_tensors

    out_dir = Path(args.out) / "figures"
    test = tasks.test_set(tasks.MIXTURE, n_items, n_pad, seed=seed + 100)
    named = {k: v for k, v in prefixes.items() if v is not None}
    report: dict = {"relative_attention_error": {}, "reconstruction_error": {}, "cross_layer_shift": {},
                    "mean_prefix_attention": {}}
    model64 = copy.deepcopy(model).to(torch.float64)
    for key, prefix in named.items():
        tokens = test.tokens[:, prefix.length:]
        for label, m, p in (("float32", model, prefix), ("float64", model64, copy.deepcopy(prefix).to(torch.float64))):
            d = pl.decompose(m, tokens, p)
            report["relative_attention_error"].setdefault(key, {})[label] = d.relative_attention_error().tolist()
            report["reconstruction_error"].setdefault(key, {})[label] = d.reconstruction_error()
            if label == "float32":
                report["cross_layer_shift"][key] = d.cross_layer_shift().tolist()
                report["mean_prefix_attention"][key] = d.prefix_attention.mean(dim=(1, 2, 3)).tolist()
    del model64

    # Figure 3: attention block output at the last input position
    last = n_pad + tasks.LENGTH - 1
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
    save_figure(figure3(experiment, hook, proj), out_dir / f"{experiment}_figure3.png", dpi=120)
    report["seed"], report["environment"] = seed, environment()
    write_json(out_dir / f"{experiment}_mechanism.json", report)
    return report


def figure3(experiment: str, hook: str, projections: dict):
    """Figure 3: each condition's points (``{"pretrained": (n, 2), prefix name: (n, 2), ...}``), with
    lines from the first 40 inputs without a prefix to the same inputs with each prefix."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 5))
    base = projections["pretrained"]
    ax.scatter(base[:, 0], base[:, 1], c="0.6", s=10, label="no prefix (pads)")
    for i, (key, points) in enumerate((k, v) for k, v in projections.items() if k != "pretrained"):
        for j in range(min(40, len(points))):
            ax.plot([base[j, 0], points[j, 0]], [base[j, 1], points[j, 1]], c=f"C{i}", lw=0.3, alpha=0.5)
        ax.scatter(points[:, 0], points[:, 1], c=f"C{i}", s=10, label=key)
    ax.set_title(f"{experiment}: {hook} at the last input position\n(PCA of all points; lines link the same input)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def mechanism_notes(mech: dict | None) -> list[str]:
    """The mechanism check and Figure 3 in two sentences (none without a mechanism record)."""
    if not mech:
        return []
    rel32 = max(max(v["float32"]) for v in mech["relative_attention_error"].values())
    rel64 = max(max(v["float64"]) for v in mech["relative_attention_error"].values())
    rec32 = max(v["float32"] for v in mech["reconstruction_error"].values())
    shift = mech["figure3"]["mean_shift_norm"]
    spread = mech["figure3"]["within_condition_spread"]
    return [
        f"Mechanism (seed {mech.get('seed', 0)}, `pl.decompose`, layer inputs held fixed): the prefixed model's content attention, "
        f"renormalised, equals the pretrained model's to {rel32:.1e} (float32) / {rel64:.1e} (float64), max over "
        f"prefixes, layers, heads and positions; head outputs equal (1 − A)·t + A·b to {rec32:.1e} (float32).",
        "Figure 3 (`results/figures/*_figure3.png`): at the last input position the attention block output moves "
        "by a mean norm of " + ", ".join(f"{k} {v:.2f}" for k, v in shift.items())
        + f" (spread of the inputs without a prefix: {spread['pretrained']:.2f}): each prefix adds a bias.",
    ]
