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

**A real model on a real task** (``--model smollm2-135m``, or ``--task nrc-emotion`` /
``afinn-sentiment`` with any checkpoint that has a tokenizer): the frozen word-classification tasks of
:mod:`prefixlens.lexicons` (labels from the NRC Emotion Lexicon / AFINN-165, shipped by the pip
packages ``nrclex`` / ``afinn``), prompt ``"Word: {w}\\nEmotion:"`` → one label token. For each seed a
P = 10 residual prefix is trained on class-balanced batches of the train words, by cross-entropy over
the whole vocabulary at the last prompt token (Adam, grad-norm clip 1). It starts from the residual
stream of a real 10-token instruction (``--init prompt``, the default; ``--init random``: the
reference's N(0, 0.02)); test accuracy is the argmax over the label tokens (zero-shot, without a
prefix, is the baseline), with 95% Wilson intervals per seed and a t interval across seeds. The slot
statistics are taken at the last prompt token (the reference's query, and here the answer position)
over the test words, for all heads, with each seed's initial prefix as the control, next to the
reference's GPT-2/Emotion per-layer spreads. It writes ``OUT/longer_prefixes_<model>.{json,md,png}``
(``--stem`` overrides). ``--profile`` sets the seeds, steps, batch and test words of the real tasks
(``quick``: a tiny run for tests); the toy task ignores it.

    prefixlens run longer_prefixes                                   # a few minutes on CPU
    prefixlens run longer_prefixes --model smollm2-135m --progress   # ~30 min on one CPU thread
    prefixlens run longer_prefixes --model smollm2-135m --profile quick --out /tmp/lp
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import torch

import prefixlens as pl
from prefixlens import lexicons, models, tasks, train
from prefixlens.analysis import slot_statistics
from prefixlens.environment import describe
from prefixlens.experiment import Analysis, non_negative_int, positive_float, positive_int, seed_list

# Appendix B, GPT-2 on Emotion, mean p99 − p1 gap per layer (head ℓ of layer ℓ only).
REFERENCE_SPREAD = [0.016, 0.102, 0.174, 0.088, 0.076, 0.069, 0.080, 0.106, 0.163, 0.147, 0.156, 0.102]


@dataclasses.dataclass(frozen=True)
class RealTaskProfile:
    """Settings of a real-task run (the toy task ignores them); --seeds, --steps, --batch-size and
    --n-test-per-class override them one by one."""

    seeds: tuple[int, ...] = (0, 1, 2)
    steps: int = 40
    batch_size: int = 16
    n_test_per_class: int = 30


@dataclasses.dataclass(frozen=True)
class Full(RealTaskProfile):
    """The committed run: 3 seeds × 40 steps of 16 words, 30 test words per label."""


@dataclasses.dataclass(frozen=True)
class Quick(RealTaskProfile):
    """A tiny run for tests: 1 seed, 2 steps of 2 words, 2 test words per label."""

    seeds: tuple[int, ...] = (0,)
    steps: int = 2
    batch_size: int = 2
    n_test_per_class: int = 2


PROFILES = {"full": Full(), "quick": Quick()}
TOY_SEEDS = (0, 1, 2, 3, 4)
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


# what a run's settings ("config") hold when an older result lacks them
CONFIG_DEFAULTS = {"stem": None, "real": False}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", help="local checkpoint directory or a built-in model such as smollm2-135m "
                                        "(default: a toy GPT-2 pretrained here)")
    parser.add_argument("--prefixes", nargs="+", help="saved prefix files to analyse instead of training new ones (toy tasks)")
    parser.add_argument("--length", type=positive_int, default=10, help="prefix length P")
    parser.add_argument("--task", choices=list(tasks.TASKS) + list(lexicons.TASKS),
                        help="task the prefixes are trained on (default: nrc-emotion for a built-in model, else ascending)")
    parser.add_argument("--seeds", type=seed_list,
                        help="prefix-training seeds: a number N is seeds 0, ..., N-1, a comma-separated list names them "
                             "(11,12,13; one alone: 7,) (default: 0,1,2,3,4 for a toy task, the profile's for a real one)")
    parser.add_argument("--steps", type=non_negative_int, help="real tasks: training steps per seed (default: the profile's)")
    parser.add_argument("--batch-size", type=positive_int, help="real tasks: words per training step (default: the profile's)")
    parser.add_argument("--lr", type=positive_float, default=5e-3,
                        help="real tasks: Adam learning rate, relative to each initial vector's RMS")
    parser.add_argument("--init", choices=["prompt", "random"], default="prompt",
                        help="real tasks: initial prefix: the residual stream of the task's instruction (INIT_TEXT), "
                             "or random N(0, --init-scale) vectors (the reference's)")
    parser.add_argument("--init-text", help="real tasks, --init prompt: the instruction text (default: INIT_TEXT[task])")
    parser.add_argument("--init-scale", type=positive_float, default=0.02,
                        help="real tasks, --init random: std of the initial prefix (the reference's 0.02)")
    parser.add_argument("--n-test-per-class", type=positive_int, help="real tasks: test words per label (default: the profile's)")
    parser.add_argument("--split-seed", type=non_negative_int, default=0, help="real tasks: seed of the frozen train/test split")
    parser.add_argument("--stem", help="output file stem (default: longer_prefixes, or longer_prefixes_<name> "
                                       "for a built-in model)")
    parser.add_argument("--seed", type=non_negative_int, default=0, help="toy tasks: seed of the base model and its pretraining")
    parser.add_argument("--pretrain-task", default=tasks.MIXTURE, help="toy tasks: the base model's pretraining task")
    parser.add_argument("--pretrain-iters", type=positive_int, default=1500, help="toy tasks: pretraining iterations")
    parser.add_argument("--pretrain-lr", type=positive_float, default=3e-3, help="toy tasks: pretraining learning rate")
    parser.add_argument("--prefix-iters", type=positive_int, default=300, help="toy tasks: prefix-tuning iterations per seed")
    parser.add_argument("--prefix-lr", type=positive_float, default=1e-2, help="toy tasks: prefix-tuning learning rate")
    parser.add_argument("--n-inputs", type=positive_int, default=512, help="toy tasks: test inputs the statistics are taken over")
    parser.add_argument("--n-eval", type=positive_int, default=500, help="toy tasks: test inputs for the accuracies")
    parser.add_argument("--save-prefixes", help="directory to save the trained prefixes in")
    parser.add_argument("--progress", action="store_true", help="print the training progress")


def _environment_lines(result: dict) -> list[str]:
    """The page's environment line (what made the numbers: versions, commit; wall time), none if not recorded."""
    if "environment" not in result:
        return []
    wall = result.get("wall_time_s")
    return [f"Environment: {describe(result['environment'])}" + (f". Wall time: {wall:.0f} s." if wall is not None else "."), ""]


def settle(args: argparse.Namespace) -> argparse.Namespace:
    """Check the options and fill in what depends on others (the task, the seeds, the profile's
    settings for a real task, the stem); idempotent."""
    if getattr(args, "settled", False):
        return args
    error = analysis.parser().error
    builtin = args.model in models.BUILTIN_MODELS
    if args.task is None:
        args.task = "nrc-emotion" if builtin and not args.prefixes else "ascending"
    args.real = args.task in lexicons.TASKS
    if args.real:
        if not args.model:
            error(f"--task {args.task} needs --model (a checkpoint with a tokenizer, e.g. smollm2-135m)")
        if args.prefixes:
            error("--prefixes is for the toy tasks; a real task trains its prefixes")
        for key, value in dataclasses.asdict(args.settings).items():
            if getattr(args, key) is None:
                setattr(args, key, list(value) if key == "seeds" else value)
    elif args.seeds is None:
        args.seeds = list(TOY_SEEDS)
    if args.stem is None:
        args.stem = "longer_prefixes" + (f"_{args.model.split('-')[0]}" if builtin else "")
    if not args.prefixes and not args.seeds:
        error("give --seeds to train prefixes, or --prefixes to load some")
    args.settled = True
    return args


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line, checked and completed (:func:`settle`)."""
    return settle(analysis.parse_args(argv))


def config_of(args: argparse.Namespace) -> dict:
    """The run's settings as recorded in the result (``config``)."""
    return {k: v for k, v in vars(args).items() if k not in ("settings", "settled", "render_only")}


def settings_of(result: dict) -> argparse.Namespace:
    """The settings a result was run with (its ``config``), for what renders it."""
    return argparse.Namespace(**{**CONFIG_DEFAULTS, **result["config"]})


def load_model(name: str):
    """The checkpoint or built-in model ``--model`` names (tests replace this to reuse a loaded one)."""
    return models.load(name)


def base_model(args) -> tuple[object, dict]:
    """The frozen model the prefixes act on, and how it was made (with its per-task accuracy)."""
    if args.model:
        model = load_model(args.model)
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
                s = slot_statistics(model, content, p, positions=positions)
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


def toy_markdown(result: dict) -> str:
    args, info, items, tables, ranges = (settings_of(result), result["base"], result["prefixes"], result["per_layer"],
                                         result["slot_ranges"])
    L = len(next(iter(tables["last_input"]["prefix"].values())))
    lines = [
        f"# Appendix B on every head: attention over the slots of a P = {args.length} prefix",
        "",
        f"Command: `{result['command']}`",
        "",
        *_environment_lines(result),
        f"Model: {info['model']}.",
    ]
    if "accuracy_no_prefix" in info:
        lines.append(f"Accuracy without a prefix (teacher-forced exact match, {args.n_eval} test inputs): "
                     + ", ".join(f"{t} {a:.1%}" for t, a in info["accuracy_no_prefix"].items()) + ".")
    lines += ["", "## Prefixes", "", f"| prefix | final loss | accuracy on {args.task} | 95% CI |", "|---|---|---|---|"]
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
    lines += ["", f"Every (prefix, layer, head, slot) range is in `{args.stem or 'longer_prefixes'}.json` (`slot_ranges`).", ""]
    return "\n".join(lines)


def toy_figure(result: dict):
    """Row 1: [p1, p99] interval of every slot for the first prefix, one panel per layer × head.
    Row 2: spread per slot, trained vs init; effective ranks per layer."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    per_head = result["per_head"]["last_input"]
    name = per_head["prefix"][0]["prefix"]
    L, H, P = torch.tensor(per_head["prefix"][0]["spread_p1_p99"]).shape
    q = torch.zeros(L, H, P, 3, dtype=torch.float64)  # the first prefix's [p1, median, p99] per layer, head, slot
    for r in result["slot_ranges"]:
        if r["prefix"] == name:
            q[r["layer"], r["head"], r["slot"]] = torch.tensor([r["p1"], r["median"], r["p99"]], dtype=torch.float64)
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
        if kind in per_head:
            spreads = torch.cat([torch.tensor(x["spread_p1_p99"], dtype=torch.float64).flatten() for x in per_head[kind]])
            ax.hist(spreads.numpy(), bins=30, range=(0, 1), alpha=0.6, color=colour, label="trained" if kind == "prefix" else "init")
    ax.set_xlabel("p99 − p1 of a slot's weight across inputs (every prefix, layer, head, slot)")
    ax.set_ylabel("count")
    ax.legend()
    ax = fig.add_subplot(grid[1, half:])
    keys = [("value_rank", "rank of values"), ("value_erank", "erank values"), ("bias_erank", "erank biases"),
            ("bias_erank_centered", "erank bias variation"), ("weight_erank", "erank slot weights")]
    table = result["per_layer"]["answer"]["prefix"]
    width = 0.8 / len(keys)
    for i, (k, label) in enumerate(keys):
        ax.bar([l + i * width for l in range(L)], table[k], width=width, label=label)
    ax.axhline(P, color="k", ls="--", lw=1, label=f"P = {P}")
    ax.set_xticks([l + 0.4 - width / 2 for l in range(L)])
    ax.set_xticklabels([f"layer {l}" for l in range(L)])
    ax.set_ylabel("rank (mean over heads and prefixes)")
    ax.set_title("span used by the realised biases (queries: answer positions)", fontsize=9)
    ax.legend(fontsize=7)
    fig.suptitle(f"Appendix B on every head: attention over the {P} slots ({name}, task {result['config']['task']}, "
                 "query = last input token)")
    fig.tight_layout()
    return fig


# ------------------------------------------------------------------- a real model on a real labelled task

T_975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228}


def real_task(args) -> lexicons.LexiconTask:
    """The frozen task: the lexicon, the labels and the seeded stratified split (see :mod:`prefixlens.lexicons`)."""
    return lexicons.build_task(args.task, n_test_per_class=args.n_test_per_class, seed=args.split_seed)


def encode_prompts(model, task: lexicons.LexiconTask, items) -> list[list[int]]:
    """The ids of every item's prompt (the model's BOS policy: none for SmolLM2, as its own tokenizer)."""
    from prefixlens import text

    return [text.encode(model, task.prompt(w)) for w, _ in items]


def left_pad(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``[N, T_max]`` ids left-padded with ``pad_id`` and the ``[N, T_max]`` mask (1 = real token)."""
    T = max(len(r) for r in rows)
    ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), T), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, T - len(r):] = torch.tensor(r, dtype=torch.long)
        mask[i, T - len(r):] = 1
    return ids, mask


def pad_id_of(model) -> int:
    tok = model.tokenizer
    return int(tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0))


def last_logits(model, ids, mask, prefix=None, batch_size: int = 50) -> torch.Tensor:
    """Logits at the last prompt token ``[N, vocab]``, with ``prefix`` or (``None``) without one. Left
    padding is masked; without a prefix the positions are ``cumsum(mask) − 1``, as a row alone."""
    out = []
    with torch.no_grad():
        for s in range(0, ids.shape[0], batch_size):
            i, m = ids[s : s + batch_size], mask[s : s + batch_size]
            if prefix is not None:
                logits = pl.run_with_prefix(model, i, prefix, attention_mask=m)
            else:
                logits = model(i, attention_mask=m, position_ids=(m.cumsum(-1) - 1).clamp_min(0))
            out.append(logits[:, -1].float())
    return torch.cat(out)


def accuracy_of(logits, y, label_ids) -> dict:
    """Accuracy of the argmax over the label tokens (with its 95% Wilson interval) and of the greedy
    next token over the whole vocabulary, and the mean log-probability of the right label token."""
    ids = torch.tensor(label_ids)
    pred = logits[:, ids].argmax(-1)
    correct = int((pred == y).sum())
    greedy = int((logits.argmax(-1) == ids[y]).sum())
    logp = logits.log_softmax(-1)[torch.arange(len(y)), ids[y]]
    n = len(y)
    return {"accuracy": correct / n, "correct": correct, "n": n, "accuracy_ci95": list(tasks.wilson_interval(correct, n)),
            "greedy_accuracy": greedy / n, "mean_logprob_label": float(logp.mean()),
            "predicted_counts": torch.bincount(pred, minlength=len(label_ids)).tolist()}


INIT_TEXT = {  # a real instruction whose residual stream initialises the prefix (--init prompt): 10 SmolLM2 tokens
    "nrc-emotion": "Label each word with the emotion it evokes.\n",
    "afinn-sentiment": "Label each word as positive or negative.\n",
}


def initial_prefix(model, args, seed: int) -> pl.ResidualPrefix:
    """``--init prompt``: the residual stream of the task's instruction (:data:`INIT_TEXT`, its first P
    tokens, after repeats of its first token when shorter), the same for every seed;
    ``--init random``: N(0, init_scale) residual vectors (the reference's ``prefix_tune.py``), seeded."""
    from prefixlens import text

    if args.init == "random":
        return pl.ResidualPrefix.random(model, args.length, seed=seed, scale=args.init_scale)
    ids = text.encode(model, args.init_text or INIT_TEXT[args.task])[: args.length]
    ids = [ids[0]] * (args.length - len(ids)) + ids
    prefix = pl.ResidualPrefix.from_prompt(model, torch.tensor(ids))
    prefix.requires_grad_(False)
    return prefix


def train_real_prefix(model, args, train_rows, train_y, label_ids, seed: int):
    """A P-slot residual prefix trained on class-balanced batches of (prompt, label token) pairs.

    The loss is the cross-entropy of the label token over the whole vocabulary at the last prompt
    token (the answer token only, as the reference's ``prefix_tune.py``); the model stays frozen, in
    eval mode. Adam (no weight decay) and grad-norm clipping at 1 act on the prefix divided by each
    initial vector's RMS, so ``lr`` is a relative step for every layer and slot (SmolLM2's residual
    norms range from ~3 at layer 0 to ~2·10⁴ at the first slot of deeper layers). The seed sets the
    batch order (and, with ``--init random``, the initial prefix).
    """
    # TODO(prefixlens.training): switch to the library's general trainer on (input, target) pairs,
    # `train.train_prefix(model, pairs, form="residual", ...)`, once prefixlens/training/pairs.py lands.
    init = initial_prefix(model, args, seed)
    signature = init.signature
    scale = init.resid.detach().pow(2).mean(-1, keepdim=True).sqrt().clamp_min(1e-12)  # [L, P, 1]
    theta = torch.nn.Parameter(init.resid.detach() / scale)
    opt = torch.optim.Adam([theta], lr=args.lr)
    g = torch.Generator().manual_seed(seed)
    K = len(label_ids)
    by_class = [[i for i, c in enumerate(train_y) if c == k] for k in range(K)]
    targets = torch.tensor(label_ids)
    pad = pad_id_of(model)
    losses = []
    model.eval()
    for step in range(args.steps):
        classes = torch.randint(K, (args.batch_size,), generator=g).tolist()
        rows = [by_class[c][int(torch.randint(len(by_class[c]), (1,), generator=g))] for c in classes]
        ids, mask = left_pad([train_rows[i] for i in rows], pad)
        prefix = pl.ResidualPrefix(theta * scale, signature)
        logits = pl.run_with_prefix(model, ids, prefix, attention_mask=mask)[:, -1]
        loss = torch.nn.functional.cross_entropy(logits.float(), targets[classes])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([theta], 1.0)
        opt.step()
        losses.append(loss.item())
        if args.progress:
            print(f"  seed {seed} step {step + 1}/{args.steps}: loss {losses[-1]:.3f}", flush=True)
    trained = pl.ResidualPrefix((theta * scale).detach(), signature)
    trained.requires_grad_(False)
    return trained, init, losses


def t_interval(values: list[float]) -> list[float] | None:
    """95% t interval of the mean across seeds (None for a single seed)."""
    n = len(values)
    if n < 2:
        return None
    mean = sum(values) / n
    sd = (sum((v - mean) ** 2 for v in values) / (n - 1)) ** 0.5
    half = T_975.get(n - 1, 1.96) * sd / n ** 0.5
    return [mean - half, mean + half]


def reference_at_depth(layer: int, n_layers: int) -> float:
    """The reference's GPT-2 spread of the layer at the same relative depth (12 layers)."""
    return REFERENCE_SPREAD[min(len(REFERENCE_SPREAD) - 1, int((layer + 0.5) * len(REFERENCE_SPREAD) / n_layers))]


def head_table(per_prefix: list, fn) -> torch.Tensor:
    """``[layer, head]`` mean over prefixes of a per-head statistic."""
    return torch.stack([fn(s) for _, s in per_prefix]).mean(0)


def real_per_layer(per_prefix: list) -> dict[str, list[float]]:
    """Per-layer means over heads (and prefixes) of every statistic, plus the spread's min / max over heads."""
    table = layer_table(per_prefix)
    spread = head_table(per_prefix, lambda s: s.spread().mean(-1))  # [L, H], mean over slots and prefixes
    table["spread_min_over_heads"] = spread.amin(-1).tolist()
    table["spread_max_over_heads"] = spread.amax(-1).tolist()
    L, H = spread.shape
    table["spread_head_l"] = [float(spread[l, l]) if l < H else None for l in range(L)]
    return table


def real_markdown(result: dict) -> str:
    args, info, items, tables = settings_of(result), result["base"], result["prefixes"], result["per_layer"]
    t = info["task"]
    trained, init = tables["prefix"], tables["init"]
    L = len(trained["spread_p1_p99"])
    accs = [it["test"]["accuracy"] for it in items]
    ci = t_interval(accs)
    zs = info["zero_shot"]
    lines = [
        f"# Appendix B on a real task: {info['model_name']}, P = {args.length} residual prefixes on {t['name']}",
        "",
        f"Command: `{result['command']}`",
        "",
        *_environment_lines(result),
        f"Model: {info['model']} ({L} layers × {info['n_heads']} query heads, {info['n_kv_heads']} key/value heads), frozen, eval mode, float32.",
        "",
        "## Task (real labels from outside this project)",
        "",
        f"- Source: {t['source']}.",
        f"- Prompt: `{t['template']!r}` → one of the label tokens " + ", ".join(f"`' {x}'`" for x in t["labels"]) + ".",
        f"- Frozen split (seeded, stratified; `prefixlens.lexicons.build_task({args.task!r}, n_test_per_class={args.n_test_per_class}, seed={args.split_seed})`): "
        f"{t['n_train']} train words {t['train_counts']}, {t['n_test']} test words ({args.n_test_per_class} per label); sha256 `{t['sha256'][:16]}…`. "
        "The test words are listed in the JSON (`task.test`).",
        f"- Accuracy: argmax over the {len(t['labels'])} label tokens at the last prompt token (chance {1 / len(t['labels']):.0%}); "
        "*greedy*: the next token over the whole vocabulary is the label token.",
        f"- Training: {args.steps} steps × {args.batch_size} words (class-balanced draws from the train words; the seed sets their order), "
        f"Adam lr {args.lr} relative to each initial vector's RMS, grad-norm clip 1, cross-entropy of the label token over the whole "
        "vocabulary (the answer token only, as the reference's `prefix_tune.py`). Initial prefix: "
        + (f"the residual stream of the instruction {info['init_text']!r} at every layer (`ResidualPrefix.from_prompt`), the same for every seed."
           if args.init == "prompt" else f"N(0, {args.init_scale}) residual vectors (the reference's), seeded."),
        "",
        "## Accuracy on the test words",
        "",
        "| prefix | final loss | train s | accuracy | 95% CI | greedy | its initial prefix | 95% CI |",
        "|---|---|---|---|---|---|---|---|",
        f"| none (zero-shot) | — | — | {zs['accuracy']:.1%} | [{zs['accuracy_ci95'][0]:.1%}, {zs['accuracy_ci95'][1]:.1%}] | {zs['greedy_accuracy']:.1%} | — | — |",
    ]
    for it in items:
        a, b = it["test"], it["init_test"]
        lines.append(f"| {it['name']} | {it['final_loss']:.3f} | {it['train_seconds']:.0f} | {a['accuracy']:.1%} | "
                     f"[{a['accuracy_ci95'][0]:.1%}, {a['accuracy_ci95'][1]:.1%}] | {a['greedy_accuracy']:.1%} | "
                     f"{b['accuracy']:.1%} | [{b['accuracy_ci95'][0]:.1%}, {b['accuracy_ci95'][1]:.1%}] |")
    mean = sum(accs) / len(accs)
    lines += ["", f"Mean over the {len(items)} seeds: **{mean:.1%}**"
              + (f" (95% t interval across seeds [{ci[0]:.1%}, {ci[1]:.1%}])" if ci else "") + f"; zero-shot {zs['accuracy']:.1%}.", ""]
    ref_mean = sum(REFERENCE_SPREAD) / len(REFERENCE_SPREAD)
    m = lambda xs: sum(x for x in xs if x is not None) / len([x for x in xs if x is not None])  # noqa: E731
    lines += [
        f"## Attention over the {args.length} slots, every head (query: the last prompt token)",
        "",
        f"Per layer: means over all {info['n_heads']} heads, the slots and the {len(items)} seeds, over the {t['n_test']} test words. "
        "*init*: the same seeds' initial (untrained) prefixes, the control. *GPT-2 ref.*: the reference's mean p99−p1 "
        "(GPT-2 on Emotion, 20 prefixes, head ℓ of layer ℓ only) of the GPT-2 layer at the same relative depth. "
        f"*head ℓ*: SmolLM2's spread at head ℓ of layer ℓ (the reference's head choice; layers 0–{min(L, info['n_heads']) - 1}).",
        "",
        f"Overall mean p99−p1: trained **{m(trained['spread_p1_p99']):.3f}**, init {m(init['spread_p1_p99']):.3f}, "
        f"GPT-2 reference {ref_mean:.3f} (layers 0–11: " + ", ".join(f"{x:.3f}" for x in REFERENCE_SPREAD) + "). "
        f"Top slot: trained {m(trained['top_slot_share']):.3f}, init {m(init['top_slot_share']):.3f} (uniform: {1 / args.length:.2f}). "
        f"Slot perplexity: trained {m(trained['slot_perplexity']):.2f}, init {m(init['slot_perplexity']):.2f} of {args.length}.",
        "",
        "| layer | p99−p1 trained | min–max over heads | init | head ℓ | GPT-2 ref. | max p99−p1 | top slot | init | top 2 | slot ppl | init "
        "| erank values | erank biases | init | erank bias var. | erank weights | bias var. | prefix mass A | init |",
        "|---|" + "---|" * 19,
    ]
    for l in range(L):
        hl = trained["spread_head_l"][l]
        lines.append(
            f"| {l} | {trained['spread_p1_p99'][l]:.3f} | {trained['spread_min_over_heads'][l]:.3f}–{trained['spread_max_over_heads'][l]:.3f} | "
            f"{init['spread_p1_p99'][l]:.3f} | {'—' if hl is None else f'{hl:.3f}'} | {reference_at_depth(l, L):.3f} | "
            f"{trained['max_spread_p1_p99'][l]:.3f} | {trained['top_slot_share'][l]:.3f} | {init['top_slot_share'][l]:.3f} | "
            f"{trained['top2_share'][l]:.3f} | {trained['slot_perplexity'][l]:.2f} | {init['slot_perplexity'][l]:.2f} | "
            f"{trained['value_erank'][l]:.2f} | {trained['bias_erank'][l]:.2f} | {init['bias_erank'][l]:.2f} | "
            f"{trained['bias_erank_centered'][l]:.2f} | {trained['weight_erank'][l]:.2f} | {trained['bias_variation'][l]:.3f} | "
            f"{trained['prefix_mass'][l]:.3f} | {init['prefix_mass'][l]:.3f} |")
    lines += [
        "",
        "- *p99−p1*: spread of each slot's weight (attention over the slots renormalised to sum to 1) across the test "
        "words, 1st to 99th percentile, mean over slots (*max*: the largest slot's);",
        "- *top slot*, *top 2*: mean weight of the largest one / two slots; *slot ppl*: exp(entropy) of the mean slot distribution;",
        "- *erank*: effective rank exp(H(σ/Σσ)) of the prefix values v_p (the span, ≤ P), of the realised biases "
        "b_i = Σ_p w_ip v_p, of their input-dependent part (bias var.), and of the [words × P] slot weights; "
        "*bias var.*: rms ‖b_i − mean b‖ / ‖mean b‖; *prefix mass A*: total attention on the slots;",
        f"- per head ([layer][head], every seed, trained and init) in `{args.stem}.json` (`per_head`), and every "
        "(seed, layer, head, slot) p1 / median / p99 in `slot_quantiles`.",
        "",
    ]
    return "\n".join(lines)



def real_figure(result: dict):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    args, tables = settings_of(result), result["per_layer"]
    trained, init = tables["prefix"], tables["init"]
    accs = [it["test"]["accuracy"] for it in result["prefixes"]]
    L = len(trained["spread_p1_p99"])
    depth = [(l + 0.5) / L for l in range(L)]
    fig, axes = plt.subplots(2, 2, figsize=(14, 10))
    ax = axes[0, 0]
    ax.fill_between(depth, trained["spread_min_over_heads"], trained["spread_max_over_heads"], color="C0", alpha=0.2,
                    label="trained: min–max over heads")
    ax.plot(depth, trained["spread_p1_p99"], "C0-o", ms=3, label="trained: mean over heads")
    ax.plot(depth, init["spread_p1_p99"], "C1--", label="initial prefix (control)")
    R = len(REFERENCE_SPREAD)
    ax.plot([(l + 0.5) / R for l in range(R)], REFERENCE_SPREAD, "ks", label="reference: GPT-2 / Emotion (head ℓ of layer ℓ)")
    ax.set_xlabel("relative depth (layer + 0.5) / n_layers")
    ax.set_ylabel("mean p99 − p1 of a slot's weight")
    ax.set_title("spread of the slot weights across inputs, per layer")
    ax.legend(fontsize=8)
    for ax, key, label in ((axes[0, 1], "spread_p1_p99", "mean p99 − p1 (trained, mean over seeds)"),
                           (axes[1, 0], "top_slot_share", "top-slot weight (trained, mean over seeds)")):
        # [layer, head], mean over the seeds (the per-head spread is already a mean over the slots)
        grid = torch.tensor([x[key] for x in result["per_head"]["prefix"]], dtype=torch.float64).mean(0)
        im = ax.imshow(grid.T.numpy(), aspect="auto", cmap="viridis", origin="lower")
        ax.set_xlabel("layer")
        ax.set_ylabel("head")
        ax.set_title(label)
        fig.colorbar(im, ax=ax)
    ax = axes[1, 1]
    for key, label, style in (("value_erank", "erank values", "C0-"), ("bias_erank", "erank biases", "C1-"),
                              ("bias_erank_centered", "erank bias variation", "C2-"), ("weight_erank", "erank slot weights", "C3-")):
        ax.plot(range(L), trained[key], style, label=f"{label} (trained)")
    ax.plot(range(L), init["bias_erank"], "C1:", label="erank biases (init)")
    ax.axhline(args.length, color="k", ls="--", lw=1, label=f"P = {args.length}")
    ax.set_xlabel("layer")
    ax.set_ylabel("effective rank (mean over heads and seeds)")
    ax.set_title("span used by the realised biases")
    ax.legend(fontsize=8)
    fig.suptitle(f"Appendix B on {args.model}: P = {args.length} residual prefixes on {result['task']['name']} "
                 f"({len(accs)} seeds, mean test accuracy {sum(accs) / len(accs):.1%}), query = last prompt token")
    fig.tight_layout()
    return fig


def _r(t: torch.Tensor, decimals: int = 5) -> list:
    return torch.round(t.double(), decimals=decimals).tolist()


def real_run(args) -> dict:
    t0 = time.perf_counter()
    model = load_model(args.model)
    model.requires_grad_(False)
    model.eval()
    load_seconds = round(time.perf_counter() - t0, 1)
    task = real_task(args)
    label_ids = task.label_token_ids(model.tokenizer)
    train_rows = encode_prompts(model, task, task.train)
    train_y = [task.label_index(y) for _, y in task.train]
    test_ids, test_mask = left_pad(encode_prompts(model, task, task.test), pad_id_of(model))
    test_y = torch.tensor([task.label_index(y) for _, y in task.test])
    cfg = model.cfg
    info = {
        "model": models.BUILTIN_MODELS[args.model].description if args.model in models.BUILTIN_MODELS else f"checkpoint {args.model}",
        "model_name": args.model, "n_heads": int(cfg.n_heads),
        "n_kv_heads": int(getattr(cfg, "n_key_value_heads", None) or cfg.n_heads),
        "task": task.describe(), "label_token_ids": label_ids, "load_seconds": load_seconds,
        "init_text": (args.init_text or INIT_TEXT[args.task]) if args.init == "prompt" else None,
    }
    info["zero_shot"] = accuracy_of(last_logits(model, test_ids, test_mask), test_y, label_ids)
    print(f"{task.name}: {len(task.train)} train / {len(task.test)} test words; zero-shot accuracy "
          f"{info['zero_shot']['accuracy']:.1%}", flush=True)
    items, stats, init_cache = [], {"prefix": [], "init": []}, None
    for seed in args.seeds:
        t1 = time.perf_counter()
        prefix, init, losses = train_real_prefix(model, args, train_rows, train_y, label_ids, seed)
        train_seconds = time.perf_counter() - t1
        item = {"name": f"seed {seed}", "seed": seed, "losses": losses,
                "final_loss": sum(losses[-10:]) / max(1, len(losses[-10:])) if losses else float("nan"),
                "train_seconds": round(train_seconds, 1)}
        item["test"] = accuracy_of(last_logits(model, test_ids, test_mask, prefix), test_y, label_ids)
        s = slot_statistics(model, test_ids, prefix, positions=-1, attention_mask=test_mask, batch_size=50)
        stats["prefix"].append((item["name"], s))
        # the control: this seed's initial prefix (with --init prompt the same for every seed: computed once)
        if args.init == "random" or init_cache is None:
            init_cache = (accuracy_of(last_logits(model, test_ids, test_mask, init), test_y, label_ids),
                          slot_statistics(model, test_ids, init, positions=-1, attention_mask=test_mask, batch_size=50))
        item["init_test"] = init_cache[0]
        stats["init"].append((item["name"], init_cache[1]))
        item["seconds"] = round(time.perf_counter() - t1, 1)
        items.append(item)
        print(f"prefix seed {seed}: loss {item['final_loss']:.3f}, test accuracy {item['test']['accuracy']:.1%} "
              f"(init {item['init_test']['accuracy']:.1%}), {item['seconds']:.0f} s", flush=True)
        if args.save_prefixes:
            prefix.save(Path(args.save_prefixes) / f"{task.name}_P{args.length}_seed{seed}.safetensors")
    tables = {k: real_per_layer(v) for k, v in stats.items()}
    accs = [it["test"]["accuracy"] for it in items]
    L = len(tables["prefix"]["spread_p1_p99"])
    return {
        "config": config_of(args),
        "base": info,
        "task": {**task.describe(), "test": [list(x) for x in task.test]},
        "prefixes": items,
        "accuracy_mean": sum(accs) / len(accs),
        "accuracy_ci95_across_seeds": t_interval(accs),
        "per_layer": tables,
        "per_head": {k: [{"prefix": n, "spread_p1_p99": _r(s.spread().mean(-1)),
                          **{key: _r(getattr(s, key)()) for key in ("top_slot_share", "value_rank", "value_erank", "bias_erank", "weight_erank")},
                          "prefix_mass": _r(s.prefix_mass.double().mean(-1))} for n, s in v]
                     for k, v in stats.items()},
        "slot_quantiles": {
            "index": "[prefix][layer][head][slot] -> [p1, median, p99] of the slot's weight across the test words (trained prefixes)",
            "prefixes": [n for n, _ in stats["prefix"]],
            "values": [torch.round(s.quantiles((0.01, 0.5, 0.99)), decimals=4).tolist() for _, s in stats["prefix"]],
        },
        "reference_spread_per_layer": REFERENCE_SPREAD,
        "reference_at_same_depth": [reference_at_depth(l, L) for l in range(L)],
    }


def toy_run(args) -> dict:
    torch.manual_seed(args.seed)
    model, info = base_model(args)
    args.n_heads = int(model.cfg.n_heads)
    items = prefixes(args, model)
    stats = statistics(args, model, items)
    tables = {q: {k: layer_table(v) for k, v in by_kind.items()} for q, by_kind in stats.items()}
    return {
        "config": config_of(args),
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
        "slot_ranges": slot_ranges(stats["last_input"]["prefix"]),
        "reference_spread_per_layer": REFERENCE_SPREAD,
    }


def run(args: argparse.Namespace) -> dict:
    """Train (or load) the prefixes and take their slot statistics: on a real task, or on a toy one."""
    settle(args)
    return real_run(args) if args.real else toy_run(args)


def is_real(result: dict) -> bool:
    return bool(settings_of(result).real)


def markdown(result: dict) -> str:
    return real_markdown(result) if is_real(result) else toy_markdown(result)


def figure(result: dict):
    return real_figure(result) if is_real(result) else toy_figure(result)


analysis = Analysis(name="longer_prefixes", doc=__doc__, run=run, markdown=markdown, figure=figure,
                    add_arguments=add_arguments, profiles=PROFILES, stem=lambda args: settle(args).stem, threads=1, dpi=70)


def main(argv: list[str] | None = None) -> dict:
    return analysis.main(argv)


if __name__ == "__main__":
    main()
