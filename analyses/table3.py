"""Table 3: a 4-layer mixture model; prefixes for the four tasks, ascending-then-+1 (learnable) and histogram (not learnable); the full cross-task matrix.

A 4-layer toy GPT-2 is pretrained on the four-task mixture of table 2. Residual prefixes are trained
on the frozen model for its four tasks, for ascending-then-+1 (a composition of two skills it has)
and for the histogram (each element's count, which needs an attention pattern it does not have),
and every prefix is evaluated on every task. On the first seed the run also checks the mechanism
(``pl.decompose``) and draws Figure 3, written to ``<out>/figures/table3_*``. The quick profile
runs on section 6's quick model and shares its checkpoints (``--artifacts``): whichever of the two
runs first trains them.

    prefixlens run table3 --profile quick --seeds 3 --jobs 3
    prefixlens run table3 --profile quick --seeds 3 --jobs 3 --out results   # refresh the committed results
"""

from __future__ import annotations

import dataclasses
import functools

import _common

from prefixlens.experiment import Analysis

PREFIX_TASKS = ["ascending", "descending", "add1", "add2", "ascending_add1", "histogram"]
COLUMNS = PREFIX_TASKS
_OWN = {"ascending": "100", "descending": "100", "add1": "100", "add2": "100", "ascending_add1": "93", "histogram": "1"}
PAPER = {
    "pretrained": {"ascending": "17", "descending": "23", "add1": "34", "add2": "25", "ascending_add1": "0", "histogram": "0"},
    **{f"prefix_{t}": {c: (_OWN[t] if c == t else "0") for c in COLUMNS} for t in PREFIX_TASKS},
}


@dataclasses.dataclass(frozen=True)
class Profile:
    """Settings of a table 3 run: the model, the pad slots, the prefix length, the test size and each training run.

    ``model`` holds ``models.toy_gpt2`` arguments; ``pretrain`` and ``prefix`` hold ``TrainConfig``
    fields, and ``prefix_overrides`` the fields that differ for some prefix tasks. A prefix takes
    ``prefix_length`` of the ``n_pad`` pad slots (``None``: all of them).
    """

    model: dict
    n_pad: int
    test_items: int
    pretrain: dict
    prefix: dict
    prefix_overrides: dict = dataclasses.field(default_factory=dict)
    prefix_length: int | None = None


class Paper(Profile):
    """The reference's sizes (its notebook 03): 4 layers, 4 heads, d = 256, 10 pads; prefixes at lr 5e-5, 20k steps (500k for the two new tasks)."""


class Quick(Profile):
    """A laptop run of minutes on section 6's quick model (4 layers, d = 64, 48 pads) with 40-slot prefixes, the reference's prefix size.

    4 layers x 40 slots x d 64 = 10,240 parameters = the reference's 4 x 10 x 256. The prefixes
    train at lr 1e-2 for 400 steps; ascending_add1 for 8,000 cosine-decayed steps, and the histogram
    prefix is section 6's 40-slot run (the same checkpoint). How these were chosen is in
    ``results/table3.md``.
    """


PROFILES = {
    "quick": Quick(model=dict(n_layers=4, n_heads=4, d_model=64, dropout=0.0), n_pad=48, prefix_length=40,
                   test_items=1000, pretrain=dict(iters=4000, lr=3e-3, schedule="cosine"),
                   prefix=dict(iters=400, lr=1e-2, eval_every=100, target_accuracy=0.98),
                   prefix_overrides={"ascending_add1": dict(iters=8000, eval_every=500, schedule="cosine"),
                                     "histogram": dict(iters=2000, eval_every=500)}),
    "paper": Paper(model=dict(n_layers=4, n_heads=4, d_model=256, dropout=0.1), n_pad=10, test_items=3200,
                   pretrain=dict(iters=40_000, lr=5e-4), prefix=dict(iters=20_000, lr=5e-5),
                   prefix_overrides={"ascending_add1": dict(iters=500_000), "histogram": dict(iters=500_000)}),
}


def run_seed(args, seed: int) -> dict:
    """One seed: the mixture model, a prefix per task, the accuracy matrix (and the mechanism on the first seed)."""
    return _common.mixture_seed(args, seed, "table3", PREFIX_TASKS)


def run(args) -> dict:
    return _common.mixture_result(args, run_seed)


def notes(result: dict) -> list[str]:
    logs = result["per_seed_logs"]
    lines = [
        "ascending_add1 composes two pretraining skills (sort, then +1) and is learnable by a prefix; the "
        "histogram needs an attention pattern the model does not have and is not.",
        "histogram = for each element, how often it occurs (RASP's hist); the reference calls it double_hist.",
        "Validation accuracy (train split) along prefix training, per seed: "
        + "; ".join(f"{t}: " + ", ".join(str([f"{s}:{round(100 * a)}" for s, a in log["prefix"][t]["evals"]])
                                         for log in logs)
                    for t in ("ascending_add1", "histogram")) + ".",
    ]
    if result["profile"] == "quick":
        lines.append(
            "Layout: the quick profile runs on section 6's quick model (4 layers, d = 64, pretrained on the mixture "
            "with 48 pads for 4,000 cosine steps: the same checkpoints) with 40-slot residual prefixes, the "
            "reference's prefix size (4 layers x 10 slots x d 256 = 10,240 parameters = 4 x 40 x 64); 8 pads stay "
            "between prefix and input. The histogram prefix is section 6's 40-slot run (the same checkpoint). Runs "
            "taken from checkpoints are marked in `per_seed_logs` (`pretrain_resumed_from`, `resumed_from`); the CPU "
            "time above excludes them when section 6 ran first.")
    return lines + _common.mechanism_notes(result.get("mechanism"))


markdown = functools.partial(_common.table_markdown, paper=PAPER, columns=COLUMNS, notes=notes)

analysis = Analysis(name="table3", doc=__doc__, run=run, markdown=markdown, add_arguments=_common.add_arguments,
                    profiles=PROFILES)


def main(argv=None) -> dict:
    return analysis.main(argv)


if __name__ == "__main__":
    main()
