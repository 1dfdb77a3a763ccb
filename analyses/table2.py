"""Table 2: pretrain on the four-task mixture (no task marker); one prefix per task elicits that task.

    python analyses/table2.py --profile quick --seeds 3
"""

from __future__ import annotations

import _common as C

EXPERIMENT = "table2"
TASKS = ["ascending", "descending", "add1", "add2"]
COLUMNS = TASKS
PAPER = {
    "pretrained": {"ascending": "25±13", "descending": "25±12", "add1": "24±11", "add2": "22±7"},
    "prefix_ascending": {"ascending": "95±2", "descending": "0±0", "add1": "0±0", "add2": "0±0"},
    "prefix_descending": {"ascending": "0±0", "descending": "90±3", "add1": "1±1", "add2": "1±1"},
    "prefix_add1": {"ascending": "0±0", "descending": "1±3", "add1": "95±6", "add2": "0±1"},
    "prefix_add2": {"ascending": "0±0", "descending": "0±0", "add1": "1±2", "add2": "98±5"},
}
PROFILES = {
    # the reference's notebook 02: 1 layer, 4 heads, d = 256 (it also drops ln_1, which the
    # HF GPT-2 block cannot), dropout 0.1, P = 1, prefixes 30k iterations at lr 5e-5
    "paper": dict(model=dict(n_layers=1, n_heads=4, d_model=256, dropout=0.1), n_pad=1, test_items=3200,
                  pretrain=dict(iters=20_000, lr=5e-4), prefix=dict(iters=30_000, lr=5e-5)),
    # laptop: d = 128 (a d = 64 model caps the prefixes at 60-85%: its own skill is the ceiling);
    # 4 heads (2 or 8 heads, or dropout 0.1, missed more margins in full 3-seed runs)
    "quick": dict(model=dict(n_layers=1, n_heads=4, d_model=128, dropout=0.0), n_pad=1, test_items=1000,
                  pretrain=dict(iters=8000, lr=3e-3, schedule="cosine"),
                  prefix=dict(iters=1000, lr=1e-2, schedule="cosine", eval_every=250, target_accuracy=0.98)),
}


def run_seed(args, seed: int) -> dict:
    model, prefixes, result = C.mixture_then_prefixes(args, seed, PROFILES[args.profile], EXPERIMENT, TASKS, COLUMNS)
    if seed == 0:
        result["mechanism"] = C.mechanism(args, EXPERIMENT, model, prefixes, PROFILES[args.profile]["n_pad"], seed)
    return result


def main(argv=None) -> None:
    args = C.parser(__doc__.splitlines()[0]).parse_args(argv)
    out, data, wall = C.run_or_load(args, EXPERIMENT, run_seed)
    if data is None:
        rows = C.aggregate([o["rows"] for o in out])
        logs = [o["logs"] for o in out]
        mech = next((o["mechanism"] for o in out if "mechanism" in o), None)
    else:
        rows, logs, mech = data["rows"], data["per_seed_logs"], data.get("mechanism")
    last_val = {t: [round(100 * l["prefix"][t]["evals"][-1][1]) for l in logs if l["prefix"][t]["evals"]] for t in TASKS}
    seed_acc = lambda row, col, i: rows[row][col]["per_seed"][i]  # noqa: E731
    n_seeds = len(rows["pretrained"][TASKS[0]]["per_seed"])
    # seeds in which every prefix beats, on its own task, both the other tasks and the no-prefix model
    own_best = sum(
        all(seed_acc(f"prefix_{t}", t, i) > max([seed_acc(f"prefix_{t}", c, i) for c in TASKS if c != t]
                                               + [seed_acc("pretrained", t, i)]) for t in TASKS)
        for i in range(n_seeds)
    )
    notes = [
        "Without a prefix (pads in the slot) the mixture model picks one task per input; each prefix selects "
        "its task (the prefix elicits a skill the model already has).",
        "Where a margin is missed, prefix training had plateaued: last validation accuracy (train split, "
        "teacher-forced = greedy exact match) per seed: " + "; ".join(f"{t} {v}" for t, v in last_val.items())
        + ". The ceiling is the quick-profile mixture model's own skill (1 layer, d = 128, 8k steps, vs the "
        "reference's d = 256 and 20k steps): a mixture model has no task marker, so once a prefix has picked "
        "the first answer token the model must keep to the task on its own; where it does not, the prefix's "
        "answer drifts to another task (the off-task cells). A d = 64 model (6k steps) capped the prefixes at "
        "60-85%. The qualitative result (each prefix raises its own task far above the others and the "
        "no-prefix baseline) holds in " + ("every seed" if own_best == n_seeds else f"{own_best} of {n_seeds} seeds") + ".",
        "The reference model for this table has no ln_1 (skip_layer_norm); HF GPT-2 blocks always normalise, "
        "so our prefix passes through ln_1 as in the reference's other notebooks.",
    ]
    C.write(args, EXPERIMENT, rows, PAPER, {"per_seed_logs": logs, "mechanism": mech},
            notes + C.mechanism_notes(mech), wall, COLUMNS)
    print(open(f"{args.out}/{EXPERIMENT}.md").read())

if __name__ == "__main__":
    main()
