"""Cost of one training step per method, as a ratio to a plain forward + backward of the same model
and batch (all parameters trainable, no optimiser step).

    python benchmarks/training_step.py [--d-model 64 --n-layers 4 --batch 64 --repeats 30]

Methods: full fine-tuning (forward + backward + AdamW over every weight), prefix-tuning
(residual and KV forms, base frozen with requires_grad_(False)), rank-1 LoRA (reference targets,
base frozen), each with and without ``share_pads`` (the pad positions and prefix slots run once
per batch instead of once per row). Steps are timed interleaved (round-robin) and summarised by the median, so background
load affects every method alike. The clock is the process CPU time with one thread (``--clock auto``, the
default: robust to other processes on a shared machine), wall-clock time otherwise.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from _timing import CLOCKS, interleaved, pick_clock  # noqa: E402 (this folder's own helper)

from prefixlens import models, tasks, train  # noqa: E402
from prefixlens.environment import environment  # noqa: E402
from prefixlens.lora import add_lora  # noqa: E402
from prefixlens.serialization import atomic_write_text  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--d-model", type=int, default=64)
    ap.add_argument("--n-layers", type=int, default=4)
    ap.add_argument("--n-heads", type=int, default=4)
    ap.add_argument("--n-pad", type=int, default=12)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="results/benchmark_training_step.json")
    ap.add_argument("--clock", choices=CLOCKS, default="auto",
                    help="cpu: process CPU time (robust on a shared machine; one thread); wall: perf_counter; "
                         "auto: cpu for one thread, wall otherwise")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    P = args.n_pad
    model = models.toy_gpt2(n_layers=args.n_layers, d_model=args.d_model, n_heads=args.n_heads,
                            d_vocab=tasks.VOCAB, n_ctx=P + 20, seed=0)
    batch = tasks.make_batch("ascending", args.batch, P, "train", torch.Generator().manual_seed(0))
    full_params = [p for n, p in model.named_parameters() if ".qkv." not in n]
    full_opt = torch.optim.AdamW(full_params, lr=1e-4)
    prefixes = {f: train.PREFIX_FORMS[f].random(model, P, seed=0) for f in ("residual", "kv")}
    popt = {f: torch.optim.AdamW(p.parameters(), lr=1e-4) for f, p in prefixes.items()}
    lora = add_lora(model, rank=1, targets="reference")
    lopt = torch.optim.AdamW(lora.parameters(), lr=1e-4)
    lora.remove()

    def plain():
        model.requires_grad_(True)
        model.zero_grad(set_to_none=True)
        train.batch_loss(model, batch, share_pads=False).backward()

    def full(share):
        def step():
            model.requires_grad_(True)
            full_opt.zero_grad(set_to_none=True)
            train.batch_loss(model, batch, share_pads=share).backward()
            full_opt.step()
        return step

    def prefix_step(form, share):
        def step():
            model.requires_grad_(False)
            popt[form].zero_grad(set_to_none=True)
            train.batch_loss(model, batch, prefixes[form], share_pads=share).backward()
            popt[form].step()
        return step

    def lora_step(share):
        def step():
            model.requires_grad_(False)
            with lora:
                lopt.zero_grad(set_to_none=True)
                train.batch_loss(model, batch, share_pads=share).backward()
                lopt.step()
        return step

    methods = {"forward_backward": plain}
    for suffix, share in (("", False), ("_shared_pads", True)):
        methods |= {f"full_finetune{suffix}": full(share), f"prefix_residual{suffix}": prefix_step("residual", share),
                    f"prefix_kv{suffix}": prefix_step("kv", share), f"lora_r1{suffix}": lora_step(share)}
    with torch.no_grad():
        snapshot = {k: v.clone() for k, v in model.state_dict().items()}
    args.clock, clock = pick_clock(args.clock, args.threads)
    times = interleaved(methods, warmup=3, repeats=args.repeats, clock=clock)
    model.load_state_dict(snapshot)
    med = {k: statistics.median(v) for k, v in times.items()}
    base = med["forward_backward"]
    result = {
        "config": vars(args) | {"tokens_per_step": args.batch * (P + 19), "command": " ".join(["python"] + sys.argv)},
        "median_ms": {k: round(1000 * v, 3) for k, v in med.items()},
        "ratio_to_forward_backward": {k: round(v / base, 3) for k, v in med.items()},
        "prefix_vs_full": round(med["prefix_residual"] / med["full_finetune"], 3),
        "shared_pads_speedup": {k: round(med[k] / med[f"{k}_shared_pads"], 3)
                                for k in ("full_finetune", "prefix_residual", "prefix_kv", "lora_r1")},
        "environment": environment(),
    }
    atomic_write_text(args.out, json.dumps(result, indent=1) + "\n")
    print(f"{'method':<28}{'median ms':>10}{'× fwd+bwd':>11}")
    for k in methods:
        print(f"{k:<28}{1000 * med[k]:>10.2f}{med[k] / base:>11.2f}")
    print(f"prefix (residual) step / full fine-tune step = {result['prefix_vs_full']:.2f}")
    print("speed-up from running the pads once per batch (share_pads):",
          ", ".join(f"{k} {v:.2f}x" for k, v in result["shared_pads_speedup"].items()))


if __name__ == "__main__":
    main()
