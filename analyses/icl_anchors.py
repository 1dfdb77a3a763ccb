"""In-context learning through the prefix lens: label words as anchors (Wang et al., EMNLP 2023) on a real model.

Demonstrations are a prefix. On the frozen word-classification tasks of :mod:`prefixlens.lexicons`
(AFINN-165 sentiment, NRC emotions; prompt ``"Word: {w}\\nSentiment:"`` → one label token), with
``k`` demonstrations per class drawn from the train split (seeded draw and order, one line each,
``"Word: w\\nSentiment: positive\\n"``) and every test word as the query, scored on the label words'
logits at the last position (:mod:`prefixlens.icl`):

- **Accuracy** zero-shot and with demonstrations, over several draws (mean, spread, 95% t interval
  of the mean over draws), with two diagnostics of *why* demonstrations help or hurt: how often the
  prediction is the label of the last demonstration (recency) or of the first, and how skewed the
  predicted labels are.
- **Hidden-anchor compression** (item 4): the demonstrations' keys and values kept only at the label
  words and formatting tokens, computed in the full demonstrations (Hidden_anchor,
  ``KVPrefix.from_prompt(model, demos, keep=...)``; the query keeps its positions after the full
  prompt); the same tokens as a real prompt (Text_anchor); formatting tokens and random input-word
  positions instead of the label words (Hidden_random). Accuracy and the speed-up (full prefix
  length / kept length, and the measured evaluation time).
- **Information flow** (item 1): the saliency ``I_l = |Σ_h A_h ⊙ ∂L/∂A_h|`` of every layer (the loss:
  cross-entropy of the gold label at the last position) and its flows ``S_wp`` (text → label words),
  ``S_pq`` (label words → target) and ``S_ww`` (the rest), per layer, over draws and queries.
- **The bridge to Petrov et al.** (item 5): with the demonstrations as the prefix, every head's
  output at the last query position is ``(1 − A)·t + A·b``: ``A`` (the share of the demonstrations'
  bias), the fraction of each head's prefix attention on the label words, and the check that the
  relative attention over the query is unchanged for the same layer input (exact).

Not done here: the isolation experiment (the paper's §2.2) and anchor re-weighting (§3.1).

    prefixlens run icl_anchors --profile quick
    prefixlens run icl_anchors --profile quick --out results     # refresh the committed results
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import torch

from prefixlens import icl, lexicons, models
from prefixlens.experiment import Analysis


@dataclasses.dataclass(frozen=True)
class Profile:
    """Settings of an icl_anchors run.

    ``tasks``: task name → the ``k`` (demonstrations per class) to measure; ``draws``: seeded
    demonstration draws per ``k``; ``n_test``: test words per task (``None``: all); ``flow_k``,
    ``flow_draws``, ``flow_queries``: the AFINN saliency runs; ``bridge_queries``: queries per draw of
    the decomposition (on the ``flow_draws`` draws of ``flow_k``).
    """

    tasks: dict
    draws: int
    n_test: int | None
    flow_k: int
    flow_draws: int
    flow_queries: int
    bridge_queries: int


class Quick(Profile):
    """AFINN k = 1, 4 and NRC k = 1, five draws, 20 class-balanced test words each (measured: 38 min wall, 14 min CPU, on 2 cores shared at load ~15; not timed on an idle machine)."""


class Full(Profile):
    """AFINN and NRC with k = 1, 2, 4, ten draws, all test words, more saliency queries (hours on CPU)."""


class Smoke(Profile):
    """A test of the script: one k, two draws, a few test words (a minute or two)."""


PROFILES = {
    "quick": Quick(tasks={"afinn-sentiment": [1, 4], "nrc-emotion": [1]}, draws=5, n_test=20,
                   flow_k=1, flow_draws=5, flow_queries=2, bridge_queries=4),
    "full": Full(tasks={"afinn-sentiment": [1, 2, 4], "nrc-emotion": [1, 2, 4]}, draws=10, n_test=None,
                 flow_k=1, flow_draws=10, flow_queries=10, bridge_queries=40),
    "smoke": Smoke(tasks={"afinn-sentiment": [1]}, draws=2, n_test=6, flow_k=1, flow_draws=1, flow_queries=2,
                   bridge_queries=3),
}
METHODS = ("demonstrations", "hidden_anchor", "text_anchor", "hidden_random")
# Issue 25's measurement on this model (4 draws), for orientation
ISSUE = {"afinn-sentiment": {"zero_shot": 0.87, "k": {1: 0.705, 2: 0.627, 4: 0.630}},
         "nrc-emotion": {"zero_shot": 0.483, "k": "27-44% with demonstrations"}}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="smollm2-135m", help="the checkpoint (any model the loader takes)")
    parser.add_argument("--stem", default=None, help="output file stem (default: icl_anchors_<model>)")


def _test_split(task, n: int | None):
    """The test words, class-balanced when cut to ``n``: ``(words, labels)``."""
    items = list(task.test)
    if n is not None:
        per = {y: [p for p in items if p[1] == y] for y in task.labels}
        items, i = [], 0
        while len(items) < n:
            items += [per[y][i] for y in task.labels if i < len(per[y]) and len(items) < n]
            i += 1
    return [w for w, _ in items], [y for _, y in items]


def _diagnostics(logits, task, labels, demos=None) -> dict:
    """Accuracy, predicted-label counts and (with demonstrations) how often the prediction is the label
    of the last / first demonstration."""
    pred = logits.argmax(-1)
    n = len(labels)
    counts = torch.bincount(pred, minlength=len(task.labels)).tolist()
    out = {"correct": icl.accuracy(logits, task, labels)[0], "n": n, "predicted": dict(zip(task.labels, counts)),
           "top_label_share": max(counts) / n}
    if demos is not None:
        out["last_label_rate"] = float((pred == task.label_index(demos.labels[-1])).float().mean())
        out["first_label_rate"] = float((pred == task.label_index(demos.labels[0])).float().mean())
    return out


def accuracy_runs(model, profile: Profile) -> dict:
    out = {}
    for name, ks in profile.tasks.items():
        task = lexicons.build_task(name)
        words, labels = _test_split(task, profile.n_test)
        t0 = time.perf_counter()
        zs = icl.label_logits(model, task, words)
        zero = {**_diagnostics(zs, task, labels), "eval_s": round(time.perf_counter() - t0, 2)}
        per_k = {}
        for k in ks:
            draws = []
            for d in range(profile.draws):
                demos = icl.build_demonstrations(model, task, icl.draw_demonstrations(task, k, seed=d))
                row = {"seed": d, "demonstrations": [f"{w}:{y}" for w, y in demos.pairs], "length": demos.length}
                for method, prefix in icl.compression_prefixes(model, demos, seed=d).items():
                    t0 = time.perf_counter()
                    logits = icl.label_logits(model, task, words, prefix)
                    row[method] = {**_diagnostics(logits, task, labels, demos), "prefix_length": prefix.length,
                                   "eval_s": round(time.perf_counter() - t0, 2)}
                draws.append(row)
            per_k[str(k)] = {"draws": draws, "summary": _summarise(draws)}
        out[name] = {"task": task.describe(), "zero_shot": zero, "k": per_k}
    return out


def _summarise(draws: list[dict]) -> dict:
    out = {}
    for m in METHODS:
        rows = [r[m] for r in draws]
        out[m] = {
            "accuracy": icl.mean_and_interval([r["correct"] / r["n"] for r in rows]),
            "last_label_rate": sum(r["last_label_rate"] for r in rows) / len(rows),
            "first_label_rate": sum(r["first_label_rate"] for r in rows) / len(rows),
            "top_label_share": sum(r["top_label_share"] for r in rows) / len(rows),
            "prefix_length": sum(r["prefix_length"] for r in rows) / len(rows),
            "speedup_length": sum(r2["length"] / r["prefix_length"] for r, r2 in zip(rows, draws)) / len(rows),
            "eval_s": sum(r["eval_s"] for r in rows) / len(rows),
        }
    return out


def flow_runs(model, profile: Profile) -> dict:
    task = lexicons.build_task("afinn-sentiment")
    words, labels = _test_split(task, profile.flow_queries)
    ids = icl.label_ids(model, task)
    per_draw = []
    for d in range(profile.flow_draws):
        demos = icl.build_demonstrations(model, task, icl.draw_demonstrations(task, profile.flow_k, seed=d))
        flows = []
        for w, y in zip(words, labels):
            tokens = torch.tensor(list(demos.tokens) + icl.query_tokens(model, task, w), device=model.cfg.device)
            flows.append(icl.information_flow(icl.saliency(model, tokens, ids[task.label_index(y)]), demos.label_positions))
        per_draw.append({key: [sum(f[key][l] for f in flows) / len(flows) for l in range(len(flows[0][key]))]
                         for key in ("S_wp", "S_pq", "S_ww")})
    n_layers = len(per_draw[0]["S_wp"])
    summary = {key: [icl.mean_and_interval([p[key][l] for p in per_draw]) for l in range(n_layers)]
               for key in ("S_wp", "S_pq", "S_ww")}
    return {"k": profile.flow_k, "draws": profile.flow_draws, "queries": len(words), "per_draw": per_draw,
            "summary": summary}


def bridge_runs(model, profile: Profile) -> dict:
    task = lexicons.build_task("afinn-sentiment")
    words, _ = _test_split(task, profile.bridge_queries)
    runs = []
    for d in range(profile.flow_draws):
        demos = icl.build_demonstrations(model, task, icl.draw_demonstrations(task, profile.flow_k, seed=d))
        runs.append(icl.prefix_bridge(model, task, demos, words))
    mean = lambda key: (sum(torch.tensor(r[key]) for r in runs) / len(runs))  # noqa: E731
    bias, label = mean("bias_share"), mean("label_share")
    base = sum(r["label_base_rate"] for r in runs) / len(runs)
    H = label.shape[1]
    top = torch.topk(label.flatten(), min(8, label.numel()))
    return {
        "k": profile.flow_k, "draws": len(runs), "queries": len(words),
        "bias_share": bias.tolist(), "label_share": label.tolist(), "label_base_rate": base,
        "bias_share_per_layer": bias.mean(1).tolist(), "label_share_per_layer": label.mean(1).tolist(),
        "top_label_heads": [{"layer": int(i) // H, "head": int(i) % H, "label_share": float(v),
                             "bias_share": float(bias.flatten()[i])} for v, i in zip(top.values, top.indices)],
        "relative_attention_error": max(r["relative_attention_error"] for r in runs),
        "reconstruction_error": max(r["reconstruction_error"] for r in runs),
    }


def run(args) -> dict:
    profile: Profile = args.settings
    model = models.load(args.model)
    times = {}
    t0 = time.perf_counter()
    accuracy = accuracy_runs(model, profile)
    times["accuracy_and_compression_s"] = round(time.perf_counter() - t0, 1)
    t0 = time.perf_counter()
    flow = flow_runs(model, profile)
    times["flow_s"] = round(time.perf_counter() - t0, 1)
    t0 = time.perf_counter()
    bridge = bridge_runs(model, profile)
    times["bridge_s"] = round(time.perf_counter() - t0, 1)
    cfg = model.cfg
    return {"model": args.model, "model_shape": {"n_layers": int(cfg.n_layers), "n_heads": int(cfg.n_heads),
                                                "d_model": int(cfg.d_model)},
            "accuracy": accuracy, "flow": flow, "bridge": bridge, "times": times, "issue_reference": ISSUE}


def _mean(v) -> float:
    return sum(v) / len(v)


def _flow_shares(S: dict) -> list[tuple[float, float, float]]:
    """Per layer, each flow's share of the three (means over draws)."""
    out = []
    for layer in range(len(S["S_wp"])):
        v = [S[key][layer]["mean"] for key in ("S_wp", "S_pq", "S_ww")]
        tot = sum(v) or 1.0
        out.append((v[0] / tot, v[1] / tot, v[2] / tot))
    return out


def _pct(s: dict) -> str:
    lo, hi = s["ci95"]
    return f"{100 * s['mean']:.1f} [{100 * lo:.1f}, {100 * hi:.1f}] (range {100 * s['min']:.0f}–{100 * s['max']:.0f})"


def markdown(result: dict) -> str:
    r = result
    lines = [f"# ICL through the prefix lens: label words as anchors ({r['model']}, profile {r.get('profile')})", "",
             f"Command: `{r.get('command')}`; wall time {r.get('wall_time_s')} s ({r['times']}).", "",
             "Accuracy on the label words' logits; with demonstrations: mean over draws, [95% t interval of the "
             "mean], (range of single draws). Issue 25's earlier measurement on this model, 4 draws: "
             "AFINN zero-shot 87%, k = 1/2/4: 70.5/62.7/63.0%; NRC zero-shot 48.3%, with demonstrations 27–44%.", ""]
    for name, t in r["accuracy"].items():
        z = t["zero_shot"]
        lines += [f"## {name} ({t['zero_shot']['n']} of the {t['task']['n_test']} test words, class-balanced)", "",
                  f"Zero-shot: {100 * z['correct'] / z['n']:.1f}% ({z['correct']}/{z['n']}); predicted {z['predicted']}.", "",
                  "| k | method | accuracy % | prefix length | length speed-up | eval s | = last demo's label | = first demo's label | top label share |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for k, v in t["k"].items():
            for m in METHODS:
                s = v["summary"][m]
                lines.append(f"| {k} | {m} | {_pct(s['accuracy'])} | {s['prefix_length']:.1f} | {s['speedup_length']:.2f}× | "
                             f"{s['eval_s']:.2f} | {100 * s['last_label_rate']:.0f}% | {100 * s['first_label_rate']:.0f}% | "
                             f"{100 * s['top_label_share']:.0f}% |")
        lines.append("")
    f = r["flow"]
    lines += ["## Information flow (AFINN)", "",
              f"k = {f['k']}, {f['draws']} draws × {f['queries']} queries; per layer the mean over draws of "
              "S_wp (text → label words), S_pq (label words → target), S_ww (the rest), and each flow's share of their sum.", "",
              "| layer | S_wp | S_pq | S_ww | share wp | share pq | share ww |", "|---|---|---|---|---|---|---|"]
    S = f["summary"]
    shares = _flow_shares(S)
    half = len(shares) // 2
    lines[-2:-2] = [f"Mean share over the first {half} layers: S_wp {_mean([s[0] for s in shares[:half]]):.2f}, "
                    f"S_pq {_mean([s[1] for s in shares[:half]]):.2f}; over the last {len(shares) - half}: "
                    f"S_wp {_mean([s[0] for s in shares[half:]]):.2f}, S_pq {_mean([s[1] for s in shares[half:]]):.2f}.", ""]
    for layer in range(len(S["S_wp"])):
        v = [S[key][layer]["mean"] for key in ("S_wp", "S_pq", "S_ww")]
        tot = sum(v) or 1.0
        lines.append(f"| {layer} | {v[0]:.3g} | {v[1]:.3g} | {v[2]:.3g} | {v[0] / tot:.2f} | {v[1] / tot:.2f} | {v[2] / tot:.2f} |")
    b = r["bridge"]
    lines += ["", "## The bridge to Petrov et al. (AFINN, demonstrations as the prefix)", "",
              f"k = {b['k']}, {b['draws']} draws × {b['queries']} queries, last query position. Max relative-attention "
              f"error against the same layer input without the demonstrations: {b['relative_attention_error']:.2e}; "
              f"max reconstruction error of (1 − A)·t + A·b: {b['reconstruction_error']:.2e}. "
              f"Label words are {100 * b['label_base_rate']:.1f}% of the prefix slots.", "",
              "| layer | mean A (bias share) | mean share of prefix attention on label words |", "|---|---|---|"]
    for layer, (a, s) in enumerate(zip(b["bias_share_per_layer"], b["label_share_per_layer"])):
        lines.append(f"| {layer} | {a:.3f} | {s:.3f} |")
    lines += ["", "Heads putting most of their prefix attention on the label words:", "",
              "| layer | head | share on label words | A |", "|---|---|---|---|"]
    lines += [f"| {h['layer']} | {h['head']} | {h['label_share']:.3f} | {h['bias_share']:.3f} |" for h in b["top_label_heads"]]
    lines += ["", "The paper's qualitative claims (GPT2-XL/GPT-J, other data; for orientation only): S_wp dominates "
              "shallow layers and S_pq deep layers; Hidden_anchor keeps most of ICL's accuracy with a speed-up, "
              "Text_anchor and Hidden_random lose more. Not done: isolation (§2.2) and anchor re-weighting (§3.1)."]
    return "\n".join(lines) + "\n"


def figure(result: dict):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(2, 2, figsize=(12, 8.5))
    a = ax[0, 0]
    for ti, (name, t) in enumerate(result["accuracy"].items()):
        z = t["zero_shot"]
        a.axhline(100 * z["correct"] / z["n"], ls=":", color=f"C{ti}", lw=1)
        for mi, m in enumerate(METHODS):
            ks = list(t["k"])
            means = [100 * t["k"][k]["summary"][m]["accuracy"]["mean"] for k in ks]
            err = [[100 * (t["k"][k]["summary"][m]["accuracy"]["mean"] - t["k"][k]["summary"][m]["accuracy"]["ci95"][0]) for k in ks],
                   [100 * (t["k"][k]["summary"][m]["accuracy"]["ci95"][1] - t["k"][k]["summary"][m]["accuracy"]["mean"]) for k in ks]]
            a.errorbar([int(k) + 0.06 * mi for k in ks], means, yerr=err, marker="os^v"[mi], color=f"C{ti}",
                       ls="-" if mi == 0 else "--", alpha=1.0 if mi == 0 else 0.6,
                       label=f"{name.split('-')[0]} {m}")
    a.set_ylim(0, 100)
    a.set_xlabel("demonstrations per class k (dotted: zero-shot)")
    a.set_ylabel("accuracy %")
    a.set_title("Accuracy: full demonstrations and compressions")
    a.legend(fontsize=6, ncol=2)
    a = ax[0, 1]
    S = result["flow"]["summary"]
    layers = range(len(S["S_wp"]))
    for key, c in (("S_wp", "C0"), ("S_pq", "C1"), ("S_ww", "C2")):
        tot = [sum(S[k][l]["mean"] for k in ("S_wp", "S_pq", "S_ww")) or 1.0 for l in layers]
        a.plot(layers, [S[key][l]["mean"] / tot[l] for l in layers], color=c, label=key)
    a.set_xlabel("layer")
    a.set_ylabel("share of the three flows")
    a.set_title(f"Information flow (AFINN, k = {result['flow']['k']}; cf. the paper's Figure 3)")
    a.legend()
    b = result["bridge"]
    for a, key, title in ((ax[1, 0], "bias_share", "A: share of the demonstrations' bias in each head"),
                          (ax[1, 1], "label_share", f"prefix attention on label words (base rate {b['label_base_rate']:.2f})")):
        im = a.imshow(torch.tensor(b[key]).T.numpy(), aspect="auto", origin="lower", cmap="viridis")
        a.set_xlabel("layer")
        a.set_ylabel("head")
        a.set_title(title, fontsize=9)
        fig.colorbar(im, ax=a)
    fig.suptitle(f"ICL through the prefix lens ({result['model']})")
    fig.tight_layout()
    return fig


analysis = Analysis(name="icl_anchors", doc=__doc__, run=run, markdown=markdown, figure=figure,
                    add_arguments=add_arguments, profiles=PROFILES,
                    stem=lambda args: args.stem or f"icl_anchors_{args.model.replace('-135m', '').replace('/', '_')}",
                    threads=2)


def main(argv: list[str] | None = None) -> dict:
    return analysis.main(argv)


if __name__ == "__main__":
    main()
