"""Section 6: histogram with a prefix vs LoRA at equal parameter counts, in both variants: LoRA on
attention output + both MLP matrices (the reference's code) vs a prefix of L·12·d·r parameters
(P = 12 for the reference's rank 1), and LoRA on the MLP only (the paper's text) vs P = 10·r.

    python analyses/section6.py --profile quick --seeds 3
"""

from __future__ import annotations

import _common as C

EXPERIMENT = "section6"
COLUMNS = ["histogram"]
PAPER = {"prefix": {"histogram": "0.31"}, "lora": {"histogram": "92.38"}}
PROFILES = {
    # the reference's notebook 04: 4 layers, 4 heads, d = 256, 12 pads; prefix 100k it at lr 5e-5;
    # LoRA r = 1, 10k it at lr 5e-3 (constant)
    "paper": dict(model=dict(n_layers=4, n_heads=4, d_model=256, dropout=0.1), rank=1, test_items=3200,
                  pretrain=dict(iters=40_000, lr=5e-4), prefix=dict(iters=100_000, lr=5e-5),
                  lora=dict(iters=10_000, lr=5e-3)),
    # laptop: the table3 quick model's shape (d = 64) with a rank-4 LoRA, which keeps the reference's
    # adapter size (12,288 parameters = 4 x 3,072 at d = 64); the equal-size prefixes are then 48 / 40
    # slots, so the model is pretrained with 48 pads. LoRA at a cosine-decayed lr 2e-2, 14,000 steps
    # for the MLP-only variant and 12,000 for the reference's targets, which learn faster (see the
    # notes for the rank and learning-rate probes behind these choices)
    "quick": dict(model=dict(n_layers=4, n_heads=4, d_model=64, dropout=0.0), rank=4, test_items=1000,
                  pretrain=dict(iters=4000, lr=3e-3, schedule="cosine"),
                  prefix=dict(iters=2000, lr=1e-2, eval_every=500, target_accuracy=0.98),
                  lora=dict(iters=14_000, lr=2e-2, schedule="cosine", eval_every=1000, target_accuracy=0.98),
                  lora_overrides={"reference": dict(iters=12_000)}),
}
VARIANTS = {"": "reference", "_mlp_only": "mlp"}  # row suffix -> LoRA targets


def equal_size_prefix_length(model, rank: int, targets: str) -> int:
    """The residual-prefix length with exactly as many parameters as the LoRA (``L·P·d``)."""
    from prefixlens import lora as LR
    from prefixlens import train as TR

    n = LR.lora_parameter_count(model, rank, targets)
    length = n // TR.prefix_parameter_count(model, 1)
    if TR.prefix_parameter_count(model, length) != n:
        raise ValueError(f"a rank-{rank} LoRA on {targets!r} has {n} parameters: no residual prefix matches it.")
    return length


def run_seed(args, seed: int) -> dict:
    from prefixlens import models
    from prefixlens import tasks as T
    from prefixlens import train as TR

    prof = PROFILES[args.profile]
    shape = models.toy_gpt2(d_vocab=T.VOCAB, n_ctx=2 * T.LENGTH, seed=seed, **prof["model"])  # sizes only
    lengths = {t: equal_size_prefix_length(shape, prof["rank"], t) for t in VARIANTS.values()}
    P = max(lengths.values())  # the pads the longest prefix replaces, as in the reference (P = 12)
    cfg = lambda key, **over: C.train_config(args, seed, prof[key], **over)  # noqa: E731
    model = models.toy_gpt2(d_vocab=T.VOCAB, n_ctx=P + 2 * T.LENGTH, seed=seed, device=args.device, **prof["model"])
    TR.train_model(model, T.MIXTURE, P, cfg("pretrain"), name=f"s{seed}-pretrain-mixture")
    test = T.test_set("histogram", prof["test_items"], P, seed=seed)
    rows, logs = {}, {"n_pad": P}
    pre = TR.evaluate(model, test)
    for suffix, targets in VARIANTS.items():
        length = lengths[targets]
        p, res = TR.train_prefix(model, "histogram", P, cfg("prefix"), form="residual", length=length,
                                 name=C.prefix_run_name(seed, "histogram", length))
        row = "prefix" + ("_mlp_matched" if suffix else "")
        rows[row] = {"histogram": (TR.evaluate(model, test, p).correct, len(test)), "params": p.n_parameters()}
        logs[row] = {"steps": res.steps, "final_loss": res.final_loss, "evals": res.evals, "length": length}
    for suffix, targets in VARIANTS.items():
        over = prof.get("lora_overrides", {}).get(targets, {})
        lora, res = TR.train_lora(model, "histogram", P, cfg("lora", **over), rank=prof["rank"], targets=targets,
                                  name=f"s{seed}-lora-r{prof['rank']}-{targets}")
        a = TR.evaluate(model, test)
        by_position = TR.position_accuracy(model, test).tolist()
        lora.remove()
        rows["lora" + suffix] = {"histogram": (a.correct, a.n), "params": lora.n_parameters()}
        logs["lora" + suffix] = {"steps": res.steps, "final_loss": res.final_loss, "evals": res.evals,
                                 "position_accuracy": by_position}
    logs["pretrained_histogram"] = pre.mean
    return {"rows": rows, "logs": logs}


def main(argv=None) -> None:
    args = C.parser(__doc__.splitlines()[0]).parse_args(argv)
    out, data, wall = C.run_or_load(args, EXPERIMENT, run_seed)
    if data is None:
        per_seed = [{r: {"histogram": v["histogram"]} for r, v in o["rows"].items()} for o in out]
        rows = C.aggregate(per_seed)
        for r in rows:
            rows[r]["params"] = out[0]["rows"][r]["params"]
        logs = [o["logs"] for o in out]
    else:
        rows, logs = data["rows"], data["per_seed_logs"]
    n_pad = logs[0]["n_pad"]
    notes = [
        "Equal trainable parameter counts: a rank-r LoRA on attention output + MLP in/out (what the reference's "
        "add_lora_by_name(['c_proj', 'c_fc']) adapts) has L·12·d·r parameters, as a residual prefix of P = 12·r "
        "slots (L·P·d); a rank-r LoRA on the MLP only (what the paper's text describes) has L·10·d·r, as P = 10·r. "
        "The reference: r = 1 on d = 256 (12,288 and 10,240 parameters, P = 12 and 10). The quick profile: r = 4 "
        f"on d = 64, the same 12,288 and 10,240 parameters, so the prefixes have 48 and 40 slots and the model is "
        f"pretrained with {n_pad} pads. Table 3's quick profile reuses this model's pretraining and its 40-slot "
        "histogram prefix (the same checkpoints).",
        "The paper's claim: LoRA can change the attention/MLP computation and learns the histogram, while a prefix "
        "of the same size can only add biases to the attention outputs and does not.",
        "Why rank 4 on the quick model (probes on the seed-0 4-layer d = 64 mixture model with 12 pads, 10k "
        "steps, test accuracy): with a cosine-decayed lr 1e-2, rank 1 reached 16.6%, rank 2 32.4%, rank 4 "
        "60.8%; rank 4 at lr 2e-2 77.5%. Rank 1 at the reference's constant lr 5e-3 reached 10.5 / 26.8 / 8.6% "
        "(3 seeds), and 26.1 / 27.2 / 18.5% after 20k steps; a d = 128 model, an untied unembedding, the "
        "reference's per-tensor gradient clipping, LoRA+, dropout in pretraining and batch 256 did not lift "
        "rank 1 (earlier runs of this script, README). Rank 1 on d = 64 has a quarter of the reference's adapter "
        "(3,072 parameters); at rank 4 the adapter has the reference's size and LoRA learns the histogram. MLP-only "
        "rank 4 (n_pad 48, seed 0, 12k steps): 67.7% at lr 2e-2, 66.4% at lr 3e-2. Steps: the MLP-only LoRA gets "
        "14,000 (its validation still rises at the end); the reference's targets 12,000, which keeps the quick "
        "profile's total inside its budget (with 14,000 they reached 96.2 / 96.3 / 96.1%, commit 26f1d07).",
        "Teacher-forced accuracy per answer position, per seed: "
        + "; ".join(f"{r}: " + ", ".join(str([round(100 * a) for a in l[r]["position_accuracy"]]) for l in logs)
                    for r in ("lora", "lora_mlp_only"))
        + ". In the probes the first count was the one LoRA learnt last (rank 4 at lr 2e-2, 12 pads, seed 0: "
        "81% at the first answer position against 99% at the others after 10k steps; rank 1: 37% against "
        "83-89%): it is predicted at the last input digit, where the pretrained mixture model cannot yet know "
        "the task; every later count is predicted from an answer position.",
        "Validation accuracy along training, per seed: "
        + "; ".join(f"{r}: " + ", ".join(str([f"{s}:{round(100 * a)}" for s, a in l[r]["evals"]]) for l in logs)
                    for r in ("prefix", "prefix_mlp_matched", "lora", "lora_mlp_only")) + ".",
        "Final training loss per answer token (mean of the last 50 steps), per seed: "
        + ", ".join(f"{r} {[round(l[r]['final_loss'], 2) for l in logs]}" for r in ("prefix", "prefix_mlp_matched", "lora", "lora_mlp_only"))
        + ".",
        f"Pretrained model without adaptation (per seed): {[round(l['pretrained_histogram'], 4) for l in logs]}.",
    ]
    C.write(args, EXPERIMENT, rows, PAPER, {"per_seed_logs": logs}, notes, wall, COLUMNS)
    print(open(f"{args.out}/{EXPERIMENT}.md").read())


if __name__ == "__main__":
    main()
