"""Appendix B on every head: attention over the slots of a longer prefix, and the span its biases use.

How a longer prefix's attention is spread over its slots, and how much of the span of the prefix
values the realised biases use.

Default: a toy GPT-2 is pretrained briefly on the mixture of the four pretraining tasks, then P = 10
residual prefixes (the paper's form) are prefix-tuned on one task for several seeds with
:func:`prefixlens.train.train_prefix`. For every prefix, every layer and **every head** (the
reference measured head ℓ of layer ℓ only, by a bug), and for each query (the last input token, as
the reference; and every answer position), it records the attention over the P slots normalised to
sum to 1 and reports:

- the p1–p99 spread of each slot's weight across inputs (the reference's statistic, per layer);
- concentration: mean weight of the top slot and of the top two, and the slot perplexity;
- effective ranks: of the prefix values (the span, at most P), of the realised biases ``b_i``
  (what the prefix actually adds), of their variation across inputs, and of the slot weights.

The same statistics for each seed's *initial* (untrained) prefix are the control. ``--prefixes``
analyses saved prefixes instead (``--model`` then names the checkpoint they were trained on).
Writes ``OUT/longer_prefixes.{json,md,png}``.

    python analyses/longer_prefixes.py            # a few minutes on CPU
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

import torch

import prefixlens as pl
from prefixlens import analysis, models, tasks, train
from prefixlens.environment import environment
from prefixlens.serialization import atomic_write_text

# Appendix B, GPT-2 on Emotion, mean p99 − p1 gap per layer (head ℓ of layer ℓ only).
REFERENCE_SPREAD = [0.016, 0.102, 0.174, 0.088, 0.076, 0.069, 0.080, 0.106, 0.163, 0.147, 0.156, 0.102]
TOY_GPT2 = dict(n_layers=2, d_model=64, n_heads=4, d_vocab=tasks.VOCAB, n_ctx=32)
STATS = [
    ("spread_p1_p99", "mean p99−p1"),
    ("max_spread_p1_p99", "max p99−p1"),
    ("top_slot_share", "top slot"),
    ("top2_share", "top 2 slots"),
    ("slot_perplexity", "slot perplexity"),
    ("value_rank", "rank of values"),
    ("value_erank", "erank values"),
    ("bias_erank", "erank biases"),
    ("bias_erank_centered", "erank bias variation"),
    ("weight_erank", "erank slot weights"),
    ("bias_variation", "bias variation"),
    ("prefix_mass", "prefix mass A"),
]


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="local checkpoint directory (default: a toy GPT-2 pretrained here)")
    ap.add_argument("--prefixes", nargs="+", help="saved prefix files to analyse instead of training new ones")
    ap.add_argument("--length", type=int, default=10, help="prefix length P")
    ap.add_argument("--task", default="ascending", choices=tasks.TASKS, help="task the prefixes are trained on")
    ap.add_argument("--seeds", default="0,1,2,3,4", help="prefix-training seeds (comma-separated)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the base model and its pretraining")
    ap.add_argument("--pretrain-task", default=tasks.MIXTURE)
    ap.add_argument("--pretrain-iters", type=int, default=1500)
    ap.add_argument("--pretrain-lr", type=float, default=3e-3)
    ap.add_argument("--prefix-iters", type=int, default=300)
    ap.add_argument("--prefix-lr", type=float, default=1e-2)
    ap.add_argument("--n-inputs", type=int, default=512, help="test inputs the statistics are taken over")
    ap.add_argument("--n-eval", type=int, default=500, help="test inputs for the accuracies")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (0: torch's default)")
    ap.add_argument("--save-prefixes", help="directory to save the trained prefixes in")
    ap.add_argument("--out", default="results")
    ap.add_argument("--progress", action="store_true")
    args = ap.parse_args(argv)
    args.seeds = [int(s) for s in args.seeds.split(",") if s]
    if args.length < 1:
        ap.error("--length must be >= 1")
    if not args.prefixes and not args.seeds:
        ap.error("give --seeds to train prefixes, or --prefixes to load some")
    return args


def base_model(args) -> tuple[object, dict]:
    """The frozen model the prefixes act on, and how it was made (with its per-task accuracy)."""
    if args.model:
        model = models.load(args.model)
        info = {"model": f"checkpoint {args.model}"}
    else:
        model = models.toy_gpt2(seed=args.seed, **TOY_GPT2)
        cfg = train.TrainConfig(iters=args.pretrain_iters, lr=args.pretrain_lr, seed=args.seed, progress=args.progress)
        result = train.train_model(model, args.pretrain_task, args.length, cfg, name="pretrain")
        info = {
            "model": f"toy GPT-2 {json.dumps(TOY_GPT2)}, seed {args.seed}, pretrained on {args.pretrain_task} "
            f"for {args.pretrain_iters} iterations (lr {args.pretrain_lr}, batch {cfg.batch_size}), "
            f"{args.length} pad positions",
            "pretrain_final_loss": result.final_loss,
        }
    model.requires_grad_(False)
    model.eval()
    if int(model.cfg.d_vocab) == tasks.VOCAB:
        info["accuracy_no_prefix"] = {
            t: train.evaluate(model, tasks.test_set(t, args.n_eval, args.length), method="teacher_forced").mean
            for t in tasks.PRETRAINING_TASKS
        }
    return model, info


def prefixes(args, model) -> list[dict]:
    """``[{name, prefix, init, accuracy, ...}]``: trained (or loaded) prefixes with their controls."""
    out = []
    if args.prefixes:
        for path in args.prefixes:
            p = pl.Prefix.load(path, model)
            out.append({"name": Path(path).stem, "prefix": p, "init": None})
        return out
    test = tasks.test_set(args.task, args.n_eval, args.length)
    for seed in args.seeds:
        cfg = train.TrainConfig(iters=args.prefix_iters, lr=args.prefix_lr, seed=seed, progress=args.progress)
        t0 = time.perf_counter()
        prefix, result = train.train_prefix(model, args.task, args.length, cfg, form="residual", length=args.length)
        init = pl.ResidualPrefix.random(model, args.length, seed=seed)  # train_prefix's initialisation
        acc = train.evaluate(model, test, prefix, method="teacher_forced")
        out.append({
            "name": f"seed {seed}",
            "seed": seed,
            "prefix": prefix,
            "init": init,
            "accuracy": acc.mean,
            "accuracy_ci95": list(acc.ci95),
            "final_loss": result.final_loss,
            "train_seconds": round(time.perf_counter() - t0, 1),
        })
        print(f"prefix seed {seed}: loss {result.final_loss:.3f}, {args.task} accuracy {acc}", flush=True)
        if args.save_prefixes:
            prefix.save(Path(args.save_prefixes) / f"{args.task}_P{args.length}_seed{seed}.safetensors")
    return out


def statistics(args, model, items: list[dict]) -> dict:
    """Slot statistics of every prefix (and its initialisation) at the last input token and at the answer positions."""
    test = tasks.test_set(args.task, args.n_inputs, args.length, seed=1)
    content = test.tokens[:, args.length :]  # the prefix replaces the pads: input (10) + answer minus its last token (9)
    queries = {"last_input": tasks.LENGTH - 1, "answer": list(range(tasks.LENGTH - 1, content.shape[1]))}
    stats: dict = {}
    for item in items:
        for kind in ("prefix", "init"):
            p = item[kind]
            if p is None:
                continue
            for qname, positions in queries.items():
                s = analysis.slot_statistics(model, content, p, positions=positions)
                stats.setdefault(qname, {}).setdefault(kind, []).append((item["name"], s))
    return stats


def layer_table(per_prefix: list) -> dict[str, list[float]]:
    """Mean over prefixes of each per-layer statistic (itself a mean over heads)."""
    summaries = [s.summary() for _, s in per_prefix]
    return {k: [sum(x[k][l] for x in summaries) / len(summaries) for l in range(len(summaries[0][k]))] for k in summaries[0]}


def slot_ranges(per_prefix: list) -> list[dict]:
    """The reference's 'p1—p99' table, for every prefix, layer, head and slot."""
    rows = []
    for name, s in per_prefix:
        q = s.quantiles((0.01, 0.5, 0.99))
        L, H, P, _ = q.shape
        for l in range(L):
            for h in range(H):
                for p in range(P):
                    rows.append({"prefix": name, "layer": l, "head": h, "slot": p,
                                 "p1": float(q[l, h, p, 0]), "median": float(q[l, h, p, 1]), "p99": float(q[l, h, p, 2])})
    return rows


def markdown(args, info, items, tables, ranges, command) -> str:
    L = len(next(iter(tables["last_input"]["prefix"].values())))
    lines = [
        "# Appendix B on every head: attention over the slots of a P = {} prefix".format(args.length),
        "",
        f"Command: `{command}`",
        "",
        f"Model: {info['model']}.",
    ]
    if "accuracy_no_prefix" in info:
        lines.append("Accuracy without a prefix (teacher-forced exact match, {} test inputs): ".format(args.n_eval)
                     + ", ".join(f"{t} {a:.1%}" for t, a in info["accuracy_no_prefix"].items()) + ".")
    lines += ["", "## Prefixes", "", "| prefix | final loss | accuracy on {} | 95% CI |".format(args.task), "|---|---|---|---|"]
    for it in items:
        if "accuracy" in it:
            lo, hi = it["accuracy_ci95"]
            lines.append(f"| {it['name']} | {it['final_loss']:.3f} | {it['accuracy']:.1%} | [{lo:.1%}, {hi:.1%}] |")
        else:
            lines.append(f"| {it['name']} | — | — | — |")
    for qname, title in (("last_input", "query = last input token (the reference's choice)"),
                         ("answer", "queries = every answer position")):
        lines += ["", f"## Per layer, {title}", "",
                  f"Means over all {int(args.n_heads)} heads, the slots and the {len(items)} prefixes; "
                  f"statistics over {args.n_inputs} test inputs. *init*: the same seeds' untrained prefixes.", ""]
        kinds = [k for k in ("prefix", "init") if k in tables[qname]]
        head = "| statistic | " + " | ".join(f"L{l} {'trained' if k == 'prefix' else 'init'}" for l in range(L) for k in kinds) + " |"
        lines += [head, "|---|" + "---|" * (L * len(kinds))]
        for key, label in STATS:
            cells = [f"{tables[qname][k][key][l]:.3f}" for l in range(L) for k in kinds]
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "Reference (GPT-2 on Emotion, 20 prefixes, head ℓ of layer ℓ only), mean p99−p1 per layer 0..11: "
        + ", ".join(f"{x:.3f}" for x in REFERENCE_SPREAD) + ".",
        "",
        "- *mean/max p99−p1*: spread of each slot's weight across inputs (1st to 99th percentile), mean/max over slots;",
        "- *top slot*, *top 2 slots*: mean weight of the largest one / two slots (1/P = uniform);",
        "- *slot perplexity*: exp(entropy) of the mean slot distribution (how many slots a head uses);",
        "- *rank of values*: dimension of the span of the P prefix values v_p of a head (≤ min(P, d_head));",
        "- *erank*: effective rank exp(H(σ/Σσ)) of the values, of the realised biases b_i = Σ_p w_ip v_p, "
        "of the biases minus their mean (their input-dependent part), and of the [inputs × P] slot weights;",
        "- *bias variation*: rms ‖b_i − mean b‖ / ‖mean b‖ (0: the bias is one fixed vector).",
        "",
        "## p1–p99 ranges of the most-attended slots (query = last input token, trained prefixes)",
        "",
        "| prefix | layer | head | slot | p1 | median | p99 |",
        "|---|---|---|---|---|---|---|",
    ]
    best: dict = {}
    for r in ranges:
        key = (r["prefix"], r["layer"], r["head"])
        if key not in best or r["median"] > best[key]["median"]:
            best[key] = r
    for r in best.values():
        lines.append(f"| {r['prefix']} | {r['layer']} | {r['head']} | {r['slot']} | {r['p1']:.3f} | {r['median']:.3f} | {r['p99']:.3f} |")
    lines += ["", "Every (prefix, layer, head, slot) range is in `longer_prefixes.json` (`slot_ranges`).", ""]
    return "\n".join(lines)


def figure(stats: dict, path: Path, task: str) -> None:
    """Row 1: [p1, p99] interval of every slot for the first prefix, one panel per layer × head.
    Row 2: spread per slot, trained vs init; effective ranks per layer."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    name, s = stats["last_input"]["prefix"][0]
    L, H = s.shape
    P = s.n_slots
    q = s.quantiles((0.01, 0.5, 0.99))
    fig = plt.figure(figsize=(3 * L * H / 2 + 2, 9))
    grid = fig.add_gridspec(2, L * H)
    for l in range(L):
        for h in range(H):
            ax = fig.add_subplot(grid[0, l * H + h])
            for p in range(P):
                ax.plot([q[l, h, p, 0], q[l, h, p, 2]], [p, p], color="C0", lw=3, solid_capstyle="butt")
                ax.plot(q[l, h, p, 1], p, "k|")
            ax.set_xlim(-0.02, 1.02)
            ax.set_ylim(P - 0.5, -0.5)
            ax.set_title(f"L{l}H{h}", fontsize=9)
            ax.set_yticks(range(P))
            if l or h:
                ax.set_yticklabels([])
            else:
                ax.set_ylabel("slot")
            ax.set_xlabel("weight", fontsize=8)
    half = (L * H) // 2
    ax = fig.add_subplot(grid[1, :half])
    for kind, colour in (("prefix", "C0"), ("init", "C1")):
        if kind in stats["last_input"]:
            spreads = torch.cat([st.spread().flatten() for _, st in stats["last_input"][kind]])
            ax.hist(spreads.numpy(), bins=30, range=(0, 1), alpha=0.6, color=colour, label="trained" if kind == "prefix" else "init")
    ax.set_xlabel("p99 − p1 of a slot's weight across inputs (every prefix, layer, head, slot)")
    ax.set_ylabel("count")
    ax.legend()
    ax = fig.add_subplot(grid[1, half:])
    keys = [("value_rank", "rank of values"), ("value_erank", "erank values"), ("bias_erank", "erank biases"),
            ("bias_erank_centered", "erank bias variation"), ("weight_erank", "erank slot weights")]
    table = layer_table(stats["answer"]["prefix"])
    width = 0.8 / len(keys)
    for i, (k, label) in enumerate(keys):
        ax.bar([l + i * width for l in range(L)], table[k], width=width, label=label)
    ax.axhline(P, color="k", ls="--", lw=1, label=f"P = {P}")
    ax.set_xticks([l + 0.4 - width / 2 for l in range(L)])
    ax.set_xticklabels([f"layer {l}" for l in range(L)])
    ax.set_ylabel("rank (mean over heads and prefixes)")
    ax.set_title("span used by the realised biases (queries: answer positions)", fontsize=9)
    ax.legend(fontsize=7)
    fig.suptitle(f"Appendix B on every head: attention over the {P} slots ({name}, task {task}, query = last input token)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=70)
    plt.close(fig)
    tmp.replace(path)


def main(argv=None) -> dict:
    args = parse_args(argv)
    threads = torch.get_num_threads()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    try:
        return _main(args, argv)
    finally:
        torch.set_num_threads(threads)


def _main(args, argv) -> dict:
    command = shlex.join(["python", "analyses/longer_prefixes.py", *(sys.argv[1:] if argv is None else argv)])
    torch.manual_seed(args.seed)
    out = Path(args.out)
    t0 = time.perf_counter()
    model, info = base_model(args)
    args.n_heads = int(model.cfg.n_heads)
    items = prefixes(args, model)
    stats = statistics(args, model, items)
    tables = {q: {k: layer_table(v) for k, v in by_kind.items()} for q, by_kind in stats.items()}
    ranges = slot_ranges(stats["last_input"]["prefix"])
    figure(stats, out / "longer_prefixes.png", args.task)
    result = {
        "command": command,
        "config": {k: v for k, v in vars(args).items()},
        "base": info,
        "prefixes": [{k: v for k, v in it.items() if k not in ("prefix", "init")} for it in items],
        "per_layer": tables,
        "per_head": {
            q: {k: [{"prefix": n, **{key: getattr(s, fn)().tolist() for key, fn in (
                ("top_slot_share", "top_slot_share"), ("value_rank", "value_rank"), ("bias_erank", "bias_erank"),
                ("weight_erank", "weight_erank"))}, "spread_p1_p99": s.spread().tolist()} for n, s in v]
                for k, v in by_kind.items()}
            for q, by_kind in stats.items()
        },
        "slot_ranges": ranges,
        "reference_spread_per_layer": REFERENCE_SPREAD,
        "seconds": round(time.perf_counter() - t0, 1),
        "environment": environment(),
    }
    atomic_write_text(out / "longer_prefixes.json", json.dumps(result, indent=1))
    atomic_write_text(out / "longer_prefixes.md", markdown(args, info, items, tables, ranges, command))
    print(f"wrote {out / 'longer_prefixes.json'}, .md and .png")
    return result


if __name__ == "__main__":
    main()
