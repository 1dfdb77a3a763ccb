"""Section 6: histogram with a prefix vs LoRA at equal parameter counts.

A 4-layer toy GPT-2 pretrained on the four-task mixture learns the histogram (each element's count)
through a LoRA but not through a residual prefix with exactly as many trainable parameters. Both
variants are run: LoRA on the attention output and both MLP matrices (the reference's code) against
a prefix of L·12·d·r parameters (P = 12 slots for the reference's rank 1), and LoRA on the MLP only
(the paper's text) against P = 10·r. The prefix lengths are computed from the LoRA's parameter count
(:func:`equal_size_prefix_length`). Table 3's quick profile shares this model's checkpoints
(``--artifacts``).

    prefixlens run section6 --profile quick --seeds 3 --jobs 3
    prefixlens run section6 --profile quick --seeds 3 --jobs 3 --out results   # refresh the committed results
"""

from __future__ import annotations

import dataclasses
import functools

import _common

from prefixlens.experiment import Analysis

COLUMNS = ["histogram"]
PAPER = {"prefix": {"histogram": "0.31"}, "lora": {"histogram": "92.38"}}
VARIANTS = {"": "reference", "_mlp_only": "mlp"}  # row suffix -> LoRA targets


@dataclasses.dataclass(frozen=True)
class Profile:
    """Settings of a section 6 run: the model, the LoRA rank, the test size and each training run.

    ``model`` holds ``models.toy_gpt2`` arguments; ``pretrain``, ``prefix`` and ``lora`` hold
    ``TrainConfig`` fields, and ``lora_overrides`` the fields that differ for one LoRA variant
    (``"reference"`` or ``"mlp"``). The pads are as many as the longer prefix's slots.
    """

    model: dict
    rank: int
    test_items: int
    pretrain: dict
    prefix: dict
    lora: dict
    lora_overrides: dict = dataclasses.field(default_factory=dict)


class Paper(Profile):
    """The reference's sizes (its notebook 04): 4 layers, 4 heads, d = 256, rank 1 (12 pads); prefix 100k steps at lr 5e-5, LoRA 10k at lr 5e-3.

    The learning rates are constant, as in the reference.
    """


class Quick(Profile):
    """A CPU run of about 40 minutes (3 seeds, --jobs 3): table 3's quick model (d = 64) with a rank-4 LoRA, the reference's adapter size.

    Rank 4 on d = 64 has the reference's 12,288 parameters (4 x 3,072), so the equal-size prefixes
    have 48 and 40 slots and the model is pretrained with 48 pads. LoRA trains at a cosine-decayed
    lr 2e-2: 14,000 steps on the MLP only, 12,000 on the reference's targets (which learn faster).
    How the rank, learning rate and steps were chosen is in ``results/section6.md``.
    """


PROFILES = {
    "quick": Quick(model=dict(n_layers=4, n_heads=4, d_model=64, dropout=0.0), rank=4, test_items=1000,
                   pretrain=dict(iters=4000, lr=3e-3, schedule="cosine"),
                   prefix=dict(iters=2000, lr=1e-2, eval_every=500, target_accuracy=0.98),
                   lora=dict(iters=14_000, lr=2e-2, schedule="cosine", eval_every=1000, target_accuracy=0.98),
                   lora_overrides={"reference": dict(iters=12_000)}),
    "paper": Paper(model=dict(n_layers=4, n_heads=4, d_model=256, dropout=0.1), rank=1, test_items=3200,
                   pretrain=dict(iters=40_000, lr=5e-4), prefix=dict(iters=100_000, lr=5e-5),
                   lora=dict(iters=10_000, lr=5e-3)),
}


def equal_size_prefix_length(model, rank: int, targets: str) -> int:
    """The residual-prefix length with exactly as many parameters as the LoRA (``L·P·d``)."""
    from prefixlens import lora, train

    n = lora.lora_parameter_count(model, rank, targets)
    length = n // train.prefix_parameter_count(model, 1)
    if train.prefix_parameter_count(model, length) != n:
        raise ValueError(f"a rank-{rank} LoRA on {targets!r} has {n} parameters: no residual prefix matches it.")
    return length


def run_seed(args, seed: int) -> dict:
    """One seed: pretrain, then the two equal-size prefixes and the two LoRAs on the histogram."""
    from prefixlens import models, tasks, train

    profile: Profile = args.settings
    shape = models.toy_gpt2(d_vocab=tasks.VOCAB, n_ctx=2 * tasks.LENGTH, seed=seed, **profile.model)  # sizes only
    lengths = {t: equal_size_prefix_length(shape, profile.rank, t) for t in VARIANTS.values()}
    n_pad = max(lengths.values())  # the pads the longest prefix replaces, as in the reference (P = 12)

    def config(settings: dict, **over):
        return _common.train_config(args, seed, settings, **over)

    model = models.toy_gpt2(d_vocab=tasks.VOCAB, n_ctx=n_pad + 2 * tasks.LENGTH, seed=seed, device=args.device,
                            **profile.model)
    train.train_model(model, tasks.MIXTURE, n_pad, config(profile.pretrain), name=f"s{seed}-pretrain-mixture")
    test = tasks.test_set("histogram", profile.test_items, n_pad, seed=seed)
    rows, logs = {}, {"n_pad": n_pad}
    pre = train.evaluate(model, test)
    for suffix, targets in VARIANTS.items():
        length = lengths[targets]
        prefix, res = train.train_prefix(model, "histogram", n_pad, config(profile.prefix), form="residual",
                                         length=length, name=_common.prefix_run_name(seed, "histogram", length))
        row = "prefix" + ("_mlp_matched" if suffix else "")
        rows[row] = {"histogram": (train.evaluate(model, test, prefix).correct, len(test)),
                     "params": prefix.n_parameters()}
        logs[row] = {"steps": res.steps, "final_loss": res.final_loss, "evals": res.evals, "length": length}
    for suffix, targets in VARIANTS.items():
        over = profile.lora_overrides.get(targets, {})
        adapter, res = train.train_lora(model, "histogram", n_pad, config(profile.lora, **over), rank=profile.rank,
                                        targets=targets, name=f"s{seed}-lora-r{profile.rank}-{targets}")
        accuracy = train.evaluate(model, test)
        by_position = train.position_accuracy(model, test).tolist()
        adapter.remove()
        rows["lora" + suffix] = {"histogram": (accuracy.correct, accuracy.n), "params": adapter.n_parameters()}
        logs["lora" + suffix] = {"steps": res.steps, "final_loss": res.final_loss, "evals": res.evals,
                                 "position_accuracy": by_position}
    logs["pretrained_histogram"] = pre.mean
    return {"rows": rows, "logs": logs}


def run(args) -> dict:
    out = _common.run_seeds(run_seed, args)
    rows = _common.aggregate([{r: {"histogram": v["histogram"]} for r, v in o["rows"].items()} for o in out])
    for r in rows:
        rows[r]["params"] = out[0]["rows"][r]["params"]
    return {**_common.seed_record(args), "rows": rows, "per_seed_logs": [o["logs"] for o in out]}


def notes(result: dict) -> list[str]:
    logs = result["per_seed_logs"]
    n_pad = logs[0]["n_pad"]
    lines = [
        "Equal trainable parameter counts: a rank-r LoRA on attention output + MLP in/out (what the reference's "
        "add_lora_by_name(['c_proj', 'c_fc']) adapts) has L·12·d·r parameters, as a residual prefix of P = 12·r "
        "slots (L·P·d); a rank-r LoRA on the MLP only (what the paper's text describes) has L·10·d·r, as P = 10·r. "
        "The reference: r = 1 on d = 256 (12,288 and 10,240 parameters, P = 12 and 10). The quick profile: r = 4 "
        f"on d = 64, the same 12,288 and 10,240 parameters, so the prefixes have 48 and 40 slots and the model is "
        f"pretrained with {n_pad} pads. Table 3's quick profile reuses this model's pretraining and its 40-slot "
        "histogram prefix (the same checkpoints).",
        "The paper's claim: LoRA can change the attention/MLP computation and learns the histogram, while a prefix "
        "of the same size can only add biases to the attention outputs and does not.",
        "Teacher-forced accuracy per answer position, per seed: "
        + "; ".join(f"{r}: " + ", ".join(str([round(100 * a) for a in log[r]["position_accuracy"]]) for log in logs)
                    for r in ("lora", "lora_mlp_only"))
        + ". The first count is predicted at the last input digit, where the pretrained mixture model cannot yet "
        "know the task; every later count is predicted from an answer position.",
        "Validation accuracy along training, per seed: "
        + "; ".join(f"{r}: " + ", ".join(str([f"{s}:{round(100 * a)}" for s, a in log[r]["evals"]]) for log in logs)
                    for r in ("prefix", "prefix_mlp_matched", "lora", "lora_mlp_only")) + ".",
        "Final training loss per answer token (mean of the last 50 steps), per seed: "
        + ", ".join(f"{r} {[round(log[r]['final_loss'], 2) for log in logs]}"
                    for r in ("prefix", "prefix_mlp_matched", "lora", "lora_mlp_only"))
        + ".",
        f"Pretrained model without adaptation (per seed): {[round(log['pretrained_histogram'], 4) for log in logs]}.",
    ]
    return lines


markdown = functools.partial(_common.table_markdown, paper=PAPER, columns=COLUMNS, notes=notes)

analysis = Analysis(name="section6", doc=__doc__, run=run, markdown=markdown, add_arguments=_common.add_arguments,
                    profiles=PROFILES)


def main(argv=None) -> dict:
    return analysis.main(argv)


if __name__ == "__main__":
    main()
