"""Section 6: histogram with a prefix vs rank-1 LoRA at equal parameter counts, in both variants:
prefix P = 12 vs LoRA on attention output + both MLP matrices (the reference's code), and prefix
P = 10 vs LoRA on the MLP only (the paper's text).

    python analyses/section6.py --profile quick --seeds 3
"""

from __future__ import annotations

import _common as C
import table3

EXPERIMENT = "section6"
COLUMNS = ["histogram"]
PAPER = {"prefix": {"histogram": "0.31"}, "lora": {"histogram": "92.38"}}
PROFILES = {
    # the reference's notebook 04: 4 layers, 4 heads, d = 256, 12 pads; prefix 100k it at lr 5e-5;
    # LoRA r = 1, 10k it at lr 5e-3
    "paper": dict(model=dict(n_layers=4, n_heads=4, d_model=256, dropout=0.1), n_pad=12, test_items=3200,
                  pretrain=dict(iters=40_000, lr=5e-4), prefix=dict(iters=100_000, lr=5e-5),
                  lora=dict(iters=10_000, lr=5e-3)),
    # laptop: the table3 quick model (same seed and settings, so its checkpoints are reused), the same
    # histogram prefix budget as table3, and LoRA at the reference's learning rate
    "quick": dict(**{k: table3.PROFILES["quick"][k] for k in ("model", "n_pad", "test_items", "pretrain")},
                  prefix={**table3.PROFILES["quick"]["prefix"], **table3.PROFILES["quick"]["prefix_overrides"]["histogram"]},
                  lora=dict(iters=10_000, lr=5e-3, eval_every=1000, target_accuracy=0.98)),
}


def run_seed(args, seed: int) -> dict:
    from prefixlens import models, tasks as T, train as TR

    prof = PROFILES[args.profile]
    P = prof["n_pad"]
    ck = f"{args.artifacts}/checkpoints/shared"
    cfg = lambda key: TR.TrainConfig(seed=seed, checkpoint_dir=ck, checkpoint_every=1000, progress=args.progress, **prof[key])  # noqa: E731
    model = models.toy_gpt2(d_vocab=T.VOCAB, n_ctx=P + 2 * T.LENGTH, seed=seed, device=args.device, **prof["model"])
    TR.train_model(model, T.MIXTURE, P, cfg("pretrain"), name=f"s{seed}-pretrain-mixture")
    test = T.test_set("histogram", prof["test_items"], P, seed=seed)
    rows, logs = {}, {}
    pre = TR.evaluate(model, test)
    for row, length in (("prefix", 12), ("prefix_mlp_matched", 10)):
        p, res = TR.train_prefix(model, "histogram", P, cfg("prefix"), form="residual", length=length,
                                 name=f"s{seed}-prefix-histogram" + ("" if length == 10 else f"-P{length}"))
        a = TR.evaluate(model, test, p)
        rows[row] = {"histogram": (a.correct, a.n), "params": p.n_parameters()}
        logs[row] = {"steps": res.steps, "final_loss": res.final_loss}
    for row, targets in (("lora", "reference"), ("lora_mlp_only", "mlp")):
        lora, res = TR.train_lora(model, "histogram", P, cfg("lora"), rank=1, targets=targets, name=f"s{seed}-lora-{targets}")
        a = TR.evaluate(model, test)
        lora.remove()
        rows[row] = {"histogram": (a.correct, a.n), "params": lora.n_parameters()}
        logs[row] = {"steps": res.steps, "final_loss": res.final_loss, "evals": res.evals}
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
    notes = [
        "Equal trainable parameter counts: prefix P = 12 ↔ rank-1 LoRA on attn output + MLP in/out "
        "(L·12·d each; what the reference's add_lora_by_name(['c_proj', 'c_fc']) adapts), and prefix P = 10 ↔ "
        "rank-1 LoRA on the MLP only (L·10·d each; what the paper's text describes).",
        "The paper's claim: LoRA can change the attention/MLP computation and learns the histogram, while a prefix "
        "of the same size can only add biases to the attention outputs and does not. See the margins above for "
        "whether this run shows it.",
        "LoRA validation accuracy along training, per seed: "
        + "; ".join(f"{r}: " + ", ".join(str([f"{s}:{round(100 * a)}" for s, a in l[r].get("evals", [])]) for l in logs)
                    for r in ("lora", "lora_mlp_only")) + ".",
        "If LoRA misses 70%: the quick profile gives rank-1 LoRA the reference's 10,000 steps at its lr 5e-3, but "
        "on a d = 64 model, where the adapter is also much smaller (L·12·64 = 3,072 parameters vs 12,288). The "
        "reference's LoRA loss falls after 4–6k steps (1.08 at 1k, 0.85 at 4k, 0.19 at 6k); ours leaves its "
        "plateau at about the same time but falls more slowly (final training loss per answer token: "
        + ", ".join(f"{r} {[round(l[r]['final_loss'], 2) for l in logs]}" for r in ("lora", "lora_mlp_only", "prefix"))
        + "). Single-seed probes (seed-0 model) stayed at ~1% validation accuracy with lr 2e-2 or 5e-2 (3,000 "
        "steps) and with batch 256 at lr 5e-3 (2,000 steps); 2-seed probes with a d = 128 model (19 / 23% "
        "after 6,000 steps, against 9 / 25% for d = 64) and with an untied unembedding as in minGPT (4 / 0%) did "
        "not learn faster; 20,000 steps (twice the reference's) reached 26.1 / 27.2 / 18.5% on the test sets, "
        "validation flat from 14k steps on. Seed-0 probes of 6,000 steps (the same model's default run: 7% "
        "validation there): the reference's per-tensor gradient clipping instead of our global clip reached "
        "10.8% (test), LoRA+ (B's learning rate 16x A's) 7.6%, and a model pretrained with the reference's "
        "dropout 0.1 stayed at 0.8% (loss 1.05). So the margin needs a much wider model or far more compute "
        "than a 60-minute CPU budget allows.",
        f"Pretrained model without adaptation (per seed): {[round(l['pretrained_histogram'], 4) for l in logs]}.",
    ]
    C.write(args, EXPERIMENT, rows, PAPER, {"per_seed_logs": logs}, notes, wall, COLUMNS)
    print(open(f"{args.out}/{EXPERIMENT}.md").read())


if __name__ == "__main__":
    main()
