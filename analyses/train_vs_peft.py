"""prefixlens KV prefix-tuning vs HuggingFace PEFT prefix tuning on SmolLM2: same data, steps, optimiser.

    nice prefixlens run train_vs_peft                                  # 40 steps of batch 16 (several minutes)
    nice prefixlens run train_vs_peft --steps 30 --eval-every 10      # the committed results/train_vs_peft.*
    prefixlens run train_vs_peft --steps 2 --batch 4 --eval-every 1 --n-train 8 --n-test-per-class 4   # a smoke test

Data: a small real objective, AFINN-165 sentiment (:func:`prefixlens.lexicons.afinn_sentiment_task`,
words with |score| >= 2): ``"Word: {w}\\nSentiment:"`` → ``" positive"`` / ``" negative"``; ``--n-train``
training pairs (balanced) and the task's held-out test words for evaluation.

Both runs start from the **same prefix**, Li & Liang's task-word initialisation (the keys and values
the words ``--init-text`` leave in every layer, i.e. PEFT's ``TEXT`` init for prefix tuning), written
into PEFT's prompt table (``[P, 2·L·n_kv·d_head]``, keys rotated) and read back with
``KVPrefix.from_peft`` to check the layout. Then the same batches (one seeded order), AdamW with the
same lr/betas/weight decay, grad-norm clipping 1.0, the same number of steps:

- prefixlens: ``train_prefix(model, pairs, form="kv", init=<that prefix>)``, the prefix served as the
  key/value cache;
- PEFT: ``get_peft_model(hf, PrefixTuningConfig(...))`` trained with its own loss (``labels`` = -100
  except the target tokens), by a plain loop over the same batches.

**Positions of padded rows.** The batches are left-padded (ragged inputs). prefixlens derives each
row's positions from its mask (the content at ``P + cumsum(mask) - 1``), so every row is computed as
if it were alone: checked against the plain HF model on ``init words + row``, row by row. A plain HF
forward given no ``position_ids`` uses ``arange`` positions instead, so a left-padded row's tokens sit
one rotary position per pad token too far right (HF's training convention is right padding, where
``arange`` is right; the notes in results/train_vs_peft.md give the step-0 losses without position
ids). So PEFT here gets the same left-padded batches **with** ``position_ids = cumsum(mask) - 1`` (pads
clamped to 0; masked anyway), which PEFT's prefix tuning supports and offsets by
``num_virtual_tokens`` itself: both runs compute the same function. The held-out evaluation does the
same.

The step-0 losses must agree (asserted, < 1e-4, also checked before PEFT's first step, and the
initial held-out losses likewise): the same function of the same prefix. After that the two
trajectories may differ slightly: PEFT's trained tensors are the *rotated* keys, prefixlens's the keys
before rotary, and Adam's per-coordinate steps are not rotation invariant.

Writes ``train_vs_peft.{json,md,png}`` into --out (the loss curves side by side; environment recorded).
"""

from __future__ import annotations

import argparse
import time
import warnings

import torch

from prefixlens import KVPrefix, lexicons, models
from prefixlens.environment import describe
from prefixlens.experiment import Analysis, int_at_least, non_negative_int, positive_float, positive_int
from prefixlens.training import TrainConfig, train_prefix
from prefixlens.training.fast_kv import rotate_keys
from prefixlens.training.pairs import Pairs, initial_prefix
from prefixlens.training.trainer import learning_rate, make_optimizer

EXPERIMENT = "train_vs_peft"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="smollm2-135m",
                   help="a built-in model or a local checkpoint with a tokenizer that PEFT can wrap")
    p.add_argument("--steps", type=positive_int, default=40, help="optimiser steps of each run")
    p.add_argument("--batch", type=positive_int, default=16, help="training pairs per step (the same batches for both)")
    p.add_argument("--length", type=positive_int, default=10, help="prefix length P (PEFT's num_virtual_tokens)")
    p.add_argument("--lr", type=positive_float, default=5e-3, help="AdamW learning rate of both runs")
    p.add_argument("--n-train", type=int_at_least(2), default=64,
                   help="training pairs (half positive, half negative words; an odd number drops one)")
    p.add_argument("--n-test-per-class", type=positive_int, default=32, help="held-out words per label")
    p.add_argument("--init-text", default="Classify the sentiment of the word as positive or negative",
                   help="the task words whose keys and values start both prefixes (PEFT's TEXT init)")
    p.add_argument("--eval-every", type=positive_int, default=10, help="held-out loss and accuracy every this many steps")
    p.add_argument("--seed", type=non_negative_int, default=0, help="seed of the data split, the batch order and the init")


def data(n_train: int, n_test_per_class: int, seed: int):
    task = lexicons.afinn_sentiment_task(min_abs=2, n_test_per_class=n_test_per_class, seed=seed)
    by_label = {lab: [(task.prompt(w), " " + l) for w, l in task.train if l == lab] for lab in task.labels}
    half = n_train // 2
    most = min(len(v) for v in by_label.values())
    if half > most:
        raise ValueError(f"--n-train {n_train} needs {half} training words per label; this split has {most} "
                         f"(with --n-test-per-class {n_test_per_class}): give --n-train {2 * most} or fewer")
    train = [pair for i in range(half) for pair in (by_label["positive"][i], by_label["negative"][i])]
    test = [(task.prompt(w), " " + l) for w, l in task.test]
    return task, train, test


def peft_table(model, prefix: KVPrefix) -> torch.Tensor:
    """A KVPrefix as PEFT's flat prompt table ``[P, 2·L·n_kv·d_head]`` (slot 2l: layer l's rotated keys)."""
    keys = rotate_keys(model, prefix.keys.detach())  # [L, P, n_kv, d]
    kv = torch.stack([keys, prefix.values.detach()], dim=1)  # [L, 2, P, n_kv, d]
    L, _, P = kv.shape[:3]
    return kv.permute(2, 0, 1, 3, 4).reshape(P, -1)


def label_accuracy(logits_last: torch.Tensor, label_ids: list[int], gold: list[int]) -> float:
    pred = logits_last[:, label_ids].argmax(-1)
    return float((pred == torch.tensor(gold)).double().mean())


def row_positions(mask: torch.Tensor) -> torch.Tensor:
    """Each row's content positions from its left-padding mask (``cumsum - 1``; pads clamped to 0), as
    prefixlens derives them; PEFT's prefix tuning adds ``num_virtual_tokens`` itself."""
    return (mask.long().cumsum(1) - 1).clamp(min=0)


def run(args) -> dict:
    from peft import PrefixTuningConfig, get_peft_model

    task, train, test = data(args.n_train, args.n_test_per_class, args.seed)  # first: it checks --n-train
    model = models.load(args.model)
    model.requires_grad_(False)
    model.eval()
    label_ids = task.label_token_ids(model.tokenizer)
    test_pairs = Pairs.from_data(model, test)
    test_gold = [task.label_index(y.strip()) for _, y in test]
    config = TrainConfig(iters=args.steps, lr=args.lr, batch_size=args.batch, weight_decay=0.0, grad_clip=1.0,
                         seed=args.seed, eval_every=args.eval_every, progress=False)
    start = initial_prefix(model, "kv", args.length, "text", args.seed, init_text=args.init_text)

    # ---- PEFT, from the same prefix -----------------------------------------------------------------
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = get_peft_model(model.original_model, PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=args.length))
    table = peft_model.prompt_encoder["default"].embedding.weight
    with torch.no_grad():
        table.copy_(peft_table(model, start))
    back = KVPrefix.from_peft(peft_model, model)
    with torch.no_grad():
        layout_error = max(float((back.keys - start.keys).abs().max()), float((back.values - start.values).abs().max()))
    assert layout_error < 1e-4, f"the PEFT table does not hold the start prefix (max |Δ| {layout_error})"

    def peft_eval() -> dict:
        peft_model.eval()
        with torch.no_grad():
            b = test_pairs.batch(range(len(test_pairs)))
            mask = b.mask if b.mask is not None else torch.ones_like(b.tokens)
            logits = peft_model(input_ids=b.tokens, attention_mask=mask, position_ids=row_positions(mask)).logits
            from prefixlens.training.loss import lm_loss

            return {"eval_loss": float(lm_loss(logits, b.labels)), "accuracy": label_accuracy(logits[:, -1], label_ids, test_gold)}

    from prefixlens.training.pairs import pairs_loss

    pairs = Pairs.from_data(model, train)

    def our_eval(step, prefix) -> dict:
        from prefixlens.training.fast_kv import logits_with_cache_prefix

        b = test_pairs.batch(range(len(test_pairs)))
        logits = logits_with_cache_prefix(model, b.tokens, prefix, attention_mask=b.mask)
        return {"eval_loss": float(pairs_loss(model, b, prefix)), "accuracy": label_accuracy(logits[:, -1], label_ids, test_gold)}

    with torch.no_grad():  # checked before training, so a mismatch stops the run early
        our_step0 = float(pairs_loss(model, next(pairs.stream(config.batch_size, config.seed)), start))
        our_initial_eval = our_eval(0, start)
    peft_initial_eval = peft_eval()
    for key in ("eval_loss", "accuracy"):
        assert abs(our_initial_eval[key] - peft_initial_eval[key]) < 1e-4, f"initial held-out {key} differs: {our_initial_eval}, {peft_initial_eval}"
    params = [p for p in peft_model.parameters() if p.requires_grad]
    opt = make_optimizer({f"p{i}": p for i, p in enumerate(params)}, config, weight_decay=0.0)
    peft_losses, peft_evals = [], []
    stream = pairs.stream(config.batch_size, config.seed)
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for step in range(config.iters):
            b = next(stream)
            full = torch.cat([b.tokens, b.labels[:, -1:]], dim=1)  # the rows with their last token back
            mask = torch.ones_like(full) if b.mask is None else torch.cat([b.mask, b.mask.new_ones(len(full), 1)], dim=1)
            is_target = torch.cat([torch.zeros_like(full[:, :1], dtype=torch.bool), b.labels != -1], dim=1)
            labels = full.masked_fill(~is_target, -100)  # HF shifts the labels itself
            for group in opt.param_groups:
                group["lr"] = learning_rate(config, step)
            peft_model.eval()  # as prefixlens trains: dropout off (SmolLM2 has none anyway)
            loss = peft_model(input_ids=full, attention_mask=mask, position_ids=row_positions(mask), labels=labels).loss
            if step == 0:
                assert abs(float(loss) - our_step0) < 1e-4, f"step-0 losses differ: prefixlens {our_step0}, peft {float(loss)}"
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
            opt.step()
            peft_losses.append(float(loss.detach()))
            done = step + 1
            if done % config.eval_every == 0 or done == config.iters:
                peft_evals.append([done, peft_eval()])
    peft_seconds = time.perf_counter() - t0

    # ---- prefixlens ---------------------------------------------------------------------------------
    t0 = time.perf_counter()
    ours = train_prefix(model, train, form="kv", init=start, config=config, eval_fn=our_eval)
    our_seconds = time.perf_counter() - t0

    step0 = {"prefixlens": ours.losses[0], "peft": peft_losses[0]}
    assert abs(step0["prefixlens"] - step0["peft"]) < 1e-4, f"step-0 losses differ: {step0}"
    return {
        "model": args.model,
        "data": {"task": task.name, "source": task.source, "template": task.template, "n_train": len(train),
                 "n_test": len(test), "params": task.params, "first_pairs": train[:4]},
        "settings": {"steps": args.steps, "batch": args.batch, "length": args.length, "lr": args.lr,
                     "betas": list(config.betas), "weight_decay": 0.0, "grad_clip": 1.0, "seed": args.seed,
                     "init": "text (Li & Liang task words; PEFT TEXT init)", "init_text": args.init_text,
                     "threads": torch.get_num_threads()},
        "layout_check_max_abs": layout_error,
        "step0_loss": step0,
        "step0_abs_diff": abs(step0["prefixlens"] - step0["peft"]),
        "peft_position_ids": "cumsum(mask) - 1 per row (PEFT adds num_virtual_tokens)",
        "losses": {"prefixlens": ours.losses, "peft": peft_losses},
        "evals": {"prefixlens": ours.evals, "peft": peft_evals},
        "initial_eval": our_initial_eval,
        "initial_eval_peft": peft_initial_eval,
        "wall_seconds": {"prefixlens": round(our_seconds, 1), "peft": round(peft_seconds, 1)},
    }


def markdown(r: dict) -> str:
    s = r["settings"]
    lines = [
        f"# prefixlens KV prefix-tuning vs PEFT prefix tuning ({r['model']})",
        "",
        f"Data: {r['data']['source']}; `{r['data']['template']!r}` → ` positive` / ` negative`; "
        f"{r['data']['n_train']} training pairs, {r['data']['n_test']} held-out words.",
        f"Both: P = {s['length']}, {s['steps']} steps of batch {s['batch']}, AdamW lr {s['lr']} betas {tuple(s['betas'])} "
        f"weight decay 0, grad-norm clip 1.0, seed {s['seed']}, the same batches; the same start prefix "
        f"({s['init']}: {s['init_text']!r}; PEFT table ↔ KVPrefix layout max |Δ| {r['layout_check_max_abs']:.1e}).",
        "",
        f"Step-0 loss: prefixlens {r['step0_loss']['prefixlens']:.6f}, PEFT {r['step0_loss']['peft']:.6f} "
        f"(|Δ| {abs(r['step0_loss']['prefixlens'] - r['step0_loss']['peft']):.1e}; asserted < 1e-4).",
        "",
        "Padded rows: the batches are left-padded; prefixlens places each row's content at `P + cumsum(mask) - 1` "
        "(each row as if alone, checked against the HF model on the real init words + row), and PEFT gets the same "
        "batches with `position_ids = cumsum(mask) - 1` (PEFT's prefix tuning adds `num_virtual_tokens`). Without "
        "them a plain HF/PEFT forward uses `arange` positions, shifting every left-padded row by its pad count.",
        "",
        "| step | prefixlens train loss | PEFT train loss | prefixlens held-out loss / acc | PEFT held-out loss / acc |",
        "|---:|---:|---:|---:|---:|",
    ]
    ours, peft = r["evals"]["prefixlens"], dict((k, v) for k, v in r["evals"]["peft"])
    init, pinit = r["initial_eval"], r.get("initial_eval_peft", r["initial_eval"])
    lines.append(f"| 0 (before) | {r['losses']['prefixlens'][0]:.4f} | {r['losses']['peft'][0]:.4f} | "
                 f"{init['eval_loss']:.4f} / {init['accuracy']:.1%} | {pinit['eval_loss']:.4f} / {pinit['accuracy']:.1%} |")
    for step, m in ours:
        p = peft.get(step, {})
        lines.append(f"| {step} | {r['losses']['prefixlens'][step - 1]:.4f} | {r['losses']['peft'][step - 1]:.4f} | "
                     f"{m['eval_loss']:.4f} / {m['accuracy']:.1%} | {p.get('eval_loss', float('nan')):.4f} / {p.get('accuracy', float('nan')):.1%} |")
    lines += [
        "",
        "Train-loss columns: the loss of the N-th batch, computed before its update (row 0: the first batch, the "
        "step-0 loss); held-out columns: after N updates.",
        "",
        f"Wall time (training + evaluation, {s['threads']} thread(s), shared CPU): prefixlens {r['wall_seconds']['prefixlens']} s, "
        f"PEFT {r['wall_seconds']['peft']} s. Per-step speed: `benchmarks/training_step_real.py`.",
        "",
        "After step 0 the trajectories may differ slightly: PEFT trains the rotated keys, prefixlens the keys "
        "before rotary, and Adam's per-coordinate steps are not rotation invariant.",
        "",
        f"Command: `{r['command']}`. Environment: {describe(r['environment'])}.",
        "",
    ]
    return "\n".join(lines)


def figure(r: dict):
    """Training loss, held-out loss and their difference, prefixlens vs PEFT, against the updates done."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(14, 3.9))
    styles = {"prefixlens": dict(color="C0", lw=2.6, ls="-", marker="o", ms=6),
              "peft": dict(color="C1", lw=1.4, ls="--", marker="s", ms=3.5)}
    for name, st in styles.items():
        losses = r["losses"][name]
        axes[0].plot(range(len(losses)), losses, color=st["color"], lw=st["lw"], ls=st["ls"], label=f"{name} (train batch)")
        ev = r["evals"][name]
        init = r["initial_eval_peft"] if name == "peft" and "initial_eval_peft" in r else r["initial_eval"]
        axes[1].plot([0] + [e[0] for e in ev], [init["eval_loss"]] + [e[1]["eval_loss"] for e in ev], **st, label=f"{name} (held-out)")
    diff = [abs(a - b) for a, b in zip(r["losses"]["prefixlens"], r["losses"]["peft"])]
    axes[2].plot(range(len(diff)), [max(d, 1e-9) for d in diff], color="C2", marker=".", label="|prefixlens − PEFT|")
    axes[2].axhline(1e-4, color="grey", ls=":", lw=1, label="step-0 tolerance 1e-4")
    axes[0].set_yscale("log"), axes[2].set_yscale("log")
    axes[0].set_xlabel("updates done"), axes[0].set_ylabel("target-token loss (log)"), axes[0].set_title("training loss (batch before the step)", fontsize=9)
    axes[1].set_xlabel("updates done"), axes[1].set_ylabel("target-token loss"), axes[1].set_title(f"held-out loss ({r['data']['n_test']} words)", fontsize=9)
    axes[2].set_xlabel("updates done"), axes[2].set_ylabel("absolute difference (log)"), axes[2].set_title(
        f"training-loss difference (step 0: {diff[0]:.1e})", fontsize=9)
    for ax in axes:
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.suptitle(f"{r['model']}: KV prefix-tuning, prefixlens vs PEFT (same start, data, optimiser)", fontsize=10)
    fig.tight_layout()
    return fig


analysis = Analysis(name=EXPERIMENT, doc=__doc__, run=run, markdown=markdown, figure=figure,
                    add_arguments=add_arguments, threads=1)


def main(argv: list[str] | None = None) -> dict:
    return analysis.main(argv)


if __name__ == "__main__":
    main()
