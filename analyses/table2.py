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
    # 4 heads (2 or 8 heads, or dropout 0.1, missed more margins in full 3-seed runs); 4 prefix
    # slots (one slot on this smaller model reached only 48-99% per seed and task)
    "quick": dict(model=dict(n_layers=1, n_heads=4, d_model=128, dropout=0.0), n_pad=4, test_items=1000,
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
        "Last validation accuracy of prefix training (train split, teacher-forced = greedy exact match) per "
        "seed: " + "; ".join(f"{t} {v}" for t, v in last_val.items()) + ". Each prefix raises its own task above "
        "the other tasks and the no-prefix baseline in " + ("every seed" if own_best == n_seeds else f"{own_best} of {n_seeds} seeds") + ".",
        "The quick profile gives each prefix 4 slots where the reference gives 1 (on a d = 256 model). With one "
        "slot, the same d = 128 model's prefixes plateaued at 48-99% validation accuracy, depending on seed and "
        "task (3-seed quick run at commit dffd148: own-task 94.7 / 76.4 / 79.3 / 91.6%, and 4 off-task cells at "
        "5.4-6.5%); restarting a 1-slot prefix from other random initialisations moved a bad seed's "
        "descending prefix between 50% and 77% and left add1 at 71% (test), so the limit was the single "
        "slot (with its 1-pad pretraining layout), not the optimiser's start. A mixture model has no task "
        "marker: once the prefix has picked the first answer token, the model must keep to the task on its "
        "own, and a 1-slot bias was too weak to hold it "
        "there on this smaller model. More slots do not change what a prefix can do (a bias on each "
        "attention head, the paper's §4), only how strong and query-dependent that bias can be.",
        "The reference model for this table has no ln_1 (skip_layer_norm); HF GPT-2 blocks always normalise, "
        "so our prefix passes through ln_1 as in the reference's other notebooks.",
    ]
    C.write(args, EXPERIMENT, rows, PAPER, {"per_seed_logs": logs, "mechanism": mech},
            notes + C.mechanism_notes(mech), wall, COLUMNS)
    print(open(f"{args.out}/{EXPERIMENT}.md").read())

if __name__ == "__main__":
    main()
