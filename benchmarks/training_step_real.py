"""Cost of a KV-prefix training step on SmolLM2: prefixlens (`train_prefix`'s step) vs PEFT prefix tuning.

    python benchmarks/training_step_real.py [--batch 8 --length 10 --repeats 15 --threads 1]

The same model, batch (ragged real sentences, left-padded, loss on the target tokens), prefix length
and optimiser (AdamW) for every method; one step = forward + backward + AdamW step, timed interleaved
(round-robin) and summarised by the median, so background load affects every method alike; the clock is
the process CPU time with one thread (``--clock auto``, the default), wall-clock time otherwise. Methods:

- ``prefixlens_kv_cache``: :func:`prefixlens.training.trainer.train_step` on
  :func:`prefixlens.training.pairs.pairs_loss` with the KV prefix served as the key/value cache
  (what ``train_prefix(model, data, form="kv")`` runs);
- ``prefixlens_kv_slots``: the same with the prefix on placeholder slots (``cache_prefix=False``);
- ``peft_prefix_tuning``: PEFT's ``PrefixTuningConfig`` model on the same HF weights, its logits
  scored by the same loss function (so only the prefix mechanism differs).

Prints the median times and the ratio prefixlens / PEFT (target <= 1.0), and records every repeat's time
and the spread of the per-repeat ratios (min, median, max).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from _timing import CLOCKS, interleaved, pick_clock  # noqa: E402 (this folder's own helper)

from prefixlens import KVPrefix, models  # noqa: E402
from prefixlens.environment import environment  # noqa: E402
from prefixlens.serialization import atomic_write_text  # noqa: E402
from prefixlens.training import TrainConfig  # noqa: E402
from prefixlens.training.loss import lm_loss  # noqa: E402
from prefixlens.training.pairs import Pairs, pairs_loss  # noqa: E402
from prefixlens.training.trainer import make_optimizer, train_step  # noqa: E402

SENTENCES = [
    ("Review: The film was a joy from start to finish.\nSentiment:", " positive"),
    ("Review: I walked out after twenty minutes.\nSentiment:", " negative"),
    ("Review: A quiet, moving story, beautifully acted.\nSentiment:", " positive"),
    ("Review: Dull.\nSentiment:", " negative"),
    ("Review: The plot makes no sense and the dialogue is worse.\nSentiment:", " negative"),
    ("Review: Funny, warm and clever.\nSentiment:", " positive"),
    ("Review: I would not recommend it to anyone.\nSentiment:", " negative"),
    ("Review: One of the best films of the year.\nSentiment:", " positive"),
]


def peft_prefix_model(hf, length: int):
    from peft import PrefixTuningConfig, get_peft_model

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return get_peft_model(hf, PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=length))


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--length", type=int, default=10, help="prefix length P")
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="results/benchmark_training_step_real.json")
    ap.add_argument("--clock", choices=CLOCKS, default="auto",
                    help="cpu: process CPU time (robust on a shared machine; one thread); wall: perf_counter; "
                         "auto: cpu for one thread, wall otherwise")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    model = models.load(args.model)
    model.requires_grad_(False)
    model.eval()
    rows = [SENTENCES[i % len(SENTENCES)] for i in range(args.batch)]
    pairs = Pairs.from_data(model, rows)
    batch = pairs.batch(range(len(pairs)))
    config = TrainConfig(lr=1e-3, weight_decay=0.0, progress=False)

    prefixes = {route: KVPrefix.random(model, args.length, seed=0, scale=0.1) for route in ("cache", "slots")}
    opts = {r: make_optimizer(dict(p.named_parameters()), config, weight_decay=0.0) for r, p in prefixes.items()}
    peft_model = peft_prefix_model(model.original_model, args.length)
    peft_params = [p for p in peft_model.parameters() if p.requires_grad]
    peft_opt = make_optimizer({f"p{i}": p for i, p in enumerate(peft_params)}, config, weight_decay=0.0)
    tokens, mask = batch.tokens, batch.mask

    def ours(route: str):
        params = list(prefixes[route].parameters())
        return lambda: train_step(lambda b: pairs_loss(model, b, prefixes[route], cache_prefix=route == "cache"),
                                  batch, opts[route], params, config, 0)

    def peft_loss(_):
        logits = peft_model(input_ids=tokens, attention_mask=mask if mask is not None else torch.ones_like(tokens)).logits
        return lm_loss(logits, batch.labels)

    methods = {
        "prefixlens_kv_cache": ours("cache"),
        "prefixlens_kv_slots": ours("slots"),
        "peft_prefix_tuning": lambda: train_step(peft_loss, batch, peft_opt, peft_params, config, 0),
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        args.clock, clock = pick_clock(args.clock, args.threads)
        times = interleaved(methods, warmup=2, repeats=args.repeats, clock=clock)
    med = {k: statistics.median(v) for k, v in times.items()}
    peft = med["peft_prefix_tuning"]
    result = {
        "config": vars(args) | {"batch_shape": list(tokens.shape), "target_tokens": batch.n_target_tokens,
                                "command": " ".join(["python"] + sys.argv)},
        "median_ms": {k: round(1000 * v, 2) for k, v in med.items()},
        "ratio_to_peft": {k: round(v / peft, 3) for k, v in med.items()},
        "all_ms": {k: [round(1000 * t, 2) for t in v] for k, v in times.items()},
        # each repeat's ratio (the calls of one round-robin round run back to back): the spread, not one run
        "ratio_to_peft_per_repeat": {k: _spread([t / p for t, p in zip(v, times["peft_prefix_tuning"])])
                                     for k, v in times.items() if k != "peft_prefix_tuning"},
        "environment": environment(),
    }
    atomic_write_text(args.out, json.dumps(result, indent=1) + "\n")
    print(f"SmolLM2 KV prefix P={args.length}, batch {tuple(tokens.shape)}, {args.repeats} interleaved repeats, "
          f"{args.threads} thread(s)")
    print(f"{'method':<24}{'median ms':>11}{'× PEFT':>9}")
    for k in methods:
        print(f"{k:<24}{1000 * med[k]:>11.1f}{med[k] / peft:>9.2f}")
    spread = result["ratio_to_peft_per_repeat"]["prefixlens_kv_cache"]
    print(f"ratio prefixlens (train_prefix's KV step) / PEFT prefix tuning = {med['prefixlens_kv_cache'] / peft:.2f} "
          f"(per repeat: min {spread['min']:.3f}, median {spread['median']:.3f}, max {spread['max']:.3f})")
    return result


def _spread(values: list[float]) -> dict[str, float]:
    """Min, median and max of ``values``, rounded to 3 decimals."""
    return {"min": round(min(values), 3), "median": round(statistics.median(values), 3), "max": round(max(values), 3)}


if __name__ == "__main__":
    main()
