"""Table 3: 4-layer mixture model; prefixes for the four tasks, ascending-then-+1 (learnable) and
histogram (not learnable); the full cross-task matrix.

    python analyses/table3.py --profile quick --seeds 3
"""

from __future__ import annotations

import _common as C

EXPERIMENT = "table3"
PREFIX_TASKS = ["ascending", "descending", "add1", "add2", "ascending_add1", "histogram"]
COLUMNS = PREFIX_TASKS
_OWN = {"ascending": "100", "descending": "100", "add1": "100", "add2": "100", "ascending_add1": "93", "histogram": "1"}
PAPER = {
    "pretrained": {"ascending": "17", "descending": "23", "add1": "34", "add2": "25", "ascending_add1": "0", "histogram": "0"},
    **{f"prefix_{t}": {c: (_OWN[t] if c == t else "0") for c in COLUMNS} for t in PREFIX_TASKS},
}
PROFILES = {
    # the reference's notebook 03 / 03_script.py: 4 layers, 4 heads, d = 256, P = 10; prefixes at lr
    # 5e-5: 20k iterations for the pretraining tasks, 500k for ascending_add1 and histogram
    "paper": dict(model=dict(n_layers=4, n_heads=4, d_model=256, dropout=0.1), n_pad=10, test_items=3200,
                  pretrain=dict(iters=40_000, lr=5e-4), prefix=dict(iters=20_000, lr=5e-5),
                  prefix_overrides={"ascending_add1": dict(iters=500_000), "histogram": dict(iters=500_000)}),
    # laptop: d = 64, 4,000 cosine pretraining steps, the reference's P = 10, and prefixes trained
    # at lr 1e-2 for 400 steps (4,000 for ascending_add1, 1,000 for the histogram)
    "quick": dict(model=dict(n_layers=4, n_heads=4, d_model=64, dropout=0.0), n_pad=10,
                  test_items=1000, pretrain=dict(iters=4000, lr=3e-3, schedule="cosine"),
                  prefix=dict(iters=400, lr=1e-2, eval_every=100, target_accuracy=0.98),
                  prefix_overrides={"ascending_add1": dict(iters=4000, eval_every=500),
                                    "histogram": dict(iters=1000, eval_every=250)}),
}


def run_seed(args, seed: int) -> dict:
    prof = PROFILES[args.profile]
    model, prefixes, result = C.mixture_then_prefixes(args, seed, prof, EXPERIMENT, PREFIX_TASKS, COLUMNS)
    if seed == 0:
        result["mechanism"] = C.mechanism(args, EXPERIMENT, model, prefixes, prof["n_pad"], seed)
    return result


def main(argv=None) -> None:
    args = C.parser(__doc__.splitlines()[0]).parse_args(argv)
    out, data, wall = C.run_or_load(args, EXPERIMENT, run_seed)
    if data is None:
        rows, logs = C.aggregate([o["rows"] for o in out]), [o["logs"] for o in out]
        mech = next((o["mechanism"] for o in out if "mechanism" in o), None)
    else:
        rows, logs, mech = data["rows"], data["per_seed_logs"], data.get("mechanism")
    notes = [
        "ascending_add1 composes two pretraining skills (sort, then +1) and is learnable by a prefix; the "
        "histogram needs an attention pattern the model does not have and is not.",
        "histogram = for each element, how often it occurs (RASP's hist); the reference calls it double_hist.",
        "Validation accuracy (train split) along prefix training, per seed: "
        + "; ".join(f"{t}: " + ", ".join(str([f"{s}:{round(100 * a)}" for s, a in l["prefix"][t]["evals"]]) for l in logs)
                    for t in ("ascending_add1", "histogram")) + ".",
        "If ascending_add1 misses 50%: it gets 4,000 prefix steps at lr 1e-2 (the histogram gets 1,000 and "
        "stays at 0-1% over them), and its result is fragile. Earlier runs of this profile with 12 pads and "
        "10-slot prefixes (before this model got the reference's P = 10) gave 18.8 / 19.5 / 41.0%, 7.1 / 21.3 / "
        "25.1% and 20.8 / 15.1 / 42.3% after changes of the arithmetic at float32 rounding only (pads run once "
        "per batch, torch's fused GELU): ascending_add1 training amplifies float-level differences into "
        "different optima. Probes on those 12-pad models: 10,000 steps gave 27.0 / 22.5 / 47.1% (mean 32.2%), "
        "two seeds levelling off at 20-30%; 12 prefix slots 34.7% (seed 0, 4,000 steps) and 23.3 / 54.9% (seeds "
        "1 / 2, 8,000 steps); pretraining for 8,000 steps 17.2 / 31.2% (seeds 1 / 2); pretraining with dropout "
        "0.1 27.4 / 18.6% (seeds 0 / 1); lr 3e-2 constant or Li & Liang's MLP reparametrisation ~20% and lr "
        "3e-2 cosine 22.1% (seed 0); a d = 128 model (P = 10, seed 0) 30.4%, still rising. So the quick d = 64 "
        "model, not the step budget, is the limit. The reference (d = 256) trains both for 500k steps (at lr "
        "5e-5) and reports 71.6% (93% in the paper).",
    ]
    C.write(args, EXPERIMENT, rows, PAPER, {"per_seed_logs": logs, "mechanism": mech},
            notes + C.mechanism_notes(mech), wall, COLUMNS)
    print(open(f"{args.out}/{EXPERIMENT}.md").read())


if __name__ == "__main__":
    main()
