"""Paper §3: distinct greedy completions from a real first token vs a virtual one (soft / residual / KV).

    python analyses/token_vs_soft_token.py                       # default: the trained toy model
    python analyses/token_vs_soft_token.py --model toy-llama     # a random toy LLaMA (V = 101)
    python analyses/token_vs_soft_token.py --model /path/to/llama-7b --n 32000 --fit-tokens 1024 \
        --batch-size 512 --dtype float16 --device cuda          # the reference's setting

Two protocols (see ``prefixlens.capacity``):
  reference -- the first position is the whole prompt (no BOS); arms: token, soft-gaussian,
               soft-convex, residual-gaussian (a KV prefix does not define the slot's own output);
  prefix    -- prompt ``[first position, c]`` with a fixed content token c (BOS if the tokenizer has
               one, else 0); arms: token, soft, residual and kv, each with the Gaussian sampler
               (``--convex`` adds the convex-combination sampler for every form).
Writes results/token_vs_soft_token.{json,md,png}; the reference's LLaMA-7B numbers sit next to ours.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shlex
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from prefixlens import capacity, models  # noqa: E402
from prefixlens.environment import describe, environment  # noqa: E402
from prefixlens.serialization import atomic_write_text, load_tensors, save_tensors  # noqa: E402

EXPERIMENT = "token_vs_soft_token"
REFERENCE = {  # reference-spec §6: LLaMA-7B, greedy 10-token completions, no BOS
    "model": "LLaMA-7B (reference notebook)",
    "token": {"n": 32000, "distinct": 24426},
    "soft": {"n": 48218, "distinct": 46812, "sampler": "not in the reference repository"},
}
DTYPES = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16, "bfloat16": torch.bfloat16}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", action="append", default=None,
                   help="toy-trained (default), toy-llama, or a local checkpoint directory; repeat for several")
    p.add_argument("--n", type=int, default=512, help="samples per virtual arm; the token arm uses min(n, d_vocab)")
    p.add_argument("--length", type=int, default=10, help="completion length L (the reference: 10)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--fit-tokens", type=int, default=4096, help="real tokens the samplers are fitted to")
    p.add_argument("--convex-k", type=int, default=4, help="tokens per convex combination")
    p.add_argument("--convex", action="store_true", help="also run the convex sampler in the prefix protocol")
    p.add_argument("--protocols", default="reference,prefix")
    p.add_argument("--train-iters", type=int, default=300, help="pretraining iterations of the toy-trained model")
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default=str(ROOT / "results"))
    p.add_argument("--artifacts", default=str(ROOT / "artifacts"))
    p.add_argument("--progress", action="store_true")
    args = p.parse_args(argv)
    args.model = args.model or ["toy-trained"]
    return args


TOY = dict(n_layers=1, n_heads=4, d_model=64, d_vocab=10, n_ctx=64)


def trained_toy(args) -> tuple[object, str]:
    """A 1-layer GPT-2 (d = 64, V = 10) pretrained on the four-task mixture with prefixlens.train,
    cached as a safetensors state dict under ``artifacts/`` so later runs reload it."""
    cache = Path(args.artifacts) / EXPERIMENT / f"toy-mixture-{args.train_iters}it-seed{args.seed}.safetensors"
    desc = f"toy GPT-2 (1 layer, 4 heads, d=64, V=10) pretrained {args.train_iters} iterations on the task mixture"
    model = models.toy_gpt2(**TOY, seed=args.seed, device=args.device)
    if cache.exists():
        tensors, meta = load_tensors(cache)
        model.load_state_dict(tensors, strict=True)
        return model.to(DTYPES[args.dtype]), desc + f" (cached; final loss {meta['final_loss']})"
    from prefixlens.train import TrainConfig, train_model

    result = train_model(model, "mixture", 1, TrainConfig(iters=args.train_iters, lr=3e-3, seed=args.seed,
                                                           progress=args.progress))
    save_tensors(cache, {k: v.detach().clone() for k, v in model.state_dict().items()},
                 {"final_loss": f"{result.final_loss:.3f}", "config": json.dumps(TOY)})
    return model.eval().to(DTYPES[args.dtype]), desc + f" (final loss {result.final_loss:.3f})"


def load_model(name: str, args):
    if name == "toy-trained":
        return trained_toy(args)
    if name == "toy-llama":
        desc = "toy LLaMA (2 layers, d=64, V=101), random weights, seed 0 -- untrained: a caveat, not a language model"
        return models.toy_llama(d_vocab=101, seed=args.seed, dtype=DTYPES[args.dtype], device=args.device), desc
    return models.load(name, device=args.device, dtype=DTYPES[args.dtype]), f"local checkpoint {name}"


def content_token(model) -> int:
    tok = getattr(model, "tokenizer", None)
    bos = getattr(tok, "bos_token_id", None) if tok is not None else None
    return int(bos) if bos is not None and bos < int(model.cfg.d_vocab) else 0


def arms_for(protocol: str, convex: bool) -> list[str]:
    if protocol == "reference":
        return ["token", "soft-gaussian", "soft-convex", "residual-gaussian"]
    forms = ["soft", "residual", "kv"]
    return ["token"] + [f"{f}-gaussian" for f in forms] + ([f"{f}-convex" for f in forms] if convex else [])


def run_model(name: str, args) -> dict:
    model, desc = load_model(name, args)
    V = int(model.cfg.d_vocab)
    if int(model.cfg.n_layers) == 1:
        desc += ("; with one layer a residual prefix is the soft prompt plus the position embedding, and the "
                 "seeded Gaussian samplers draw the same samples shifted by it, so those two arms coincide")
    out = {"model": name, "description": desc, "d_vocab": V, "n_layers": int(model.cfg.n_layers), "protocols": {}}
    for protocol in args.protocols.split(","):
        c = None if protocol == "reference" else content_token(model)
        rows, n_token = [], min(args.n, V)
        for arm in arms_for(protocol, args.convex):
            t0 = time.time()
            r = capacity.run_arm(model, arm, args.n, args.length, content_token=c, seed=args.seed,
                                 batch_size=args.batch_size, fit_tokens=args.fit_tokens, k=args.convex_k,
                                 progress=args.progress)
            row = r.to_json() | {"seconds": round(time.time() - t0, 2),
                                 "distinct_at_token_n": capacity.count_distinct(r.completions[:n_token]),
                                 "examples": r.completions[:3].tolist()}
            rows.append(row)
            print(f"[{name} / {protocol}] {arm:18s} {r.distinct:6d} / {r.n:<6d} distinct "
                  f"({r.distinct / r.n:.1%})", flush=True)
        out["protocols"][protocol] = {"content_token": c, "arms": rows}
    return out


def markdown(result: dict) -> str:
    lines = [
        "# Token vs soft-token capacity (paper §3)",
        "",
        f"Command: `{result['command']}`  ",
        f"Greedy completions of L = {result['length']} tokens; N samples per virtual arm = {result['n']}; "
        f"seed {result['seed']}; wall time {result['wall_s']:.0f} s.  ",
        f"Environment: {describe(result['environment'])}." if "environment" in result else "Environment: not recorded.",
        "",
        "| model | protocol | first position | N | distinct | distinct / N | distinct among the first N_token |",
        "|---|---|---|---|---|---|---|",
    ]
    for m in result["models"]:
        for protocol, block in m["protocols"].items():
            for row in block["arms"]:
                lines.append(f"| {m['model']} (V = {m['d_vocab']}) | {protocol} | {row['arm']} | {row['n']:,} | "
                             f"{row['distinct']:,} | {row['fraction']:.1%} | {row['distinct_at_token_n']:,} |")
    ref = REFERENCE
    for arm in ("token", "soft"):
        r = ref[arm]
        lines.append(f"| {ref['model']} (V = 32,000) | reference | {arm} | {r['n']:,} | {r['distinct']:,} | "
                     f"{r['distinct'] / r['n']:.1%} | – |")
    lines += ["", "Models:", ""]
    lines += [f"- **{m['model']}**: {m['description']}" for m in result["models"]]
    lines += ["", "Notes:", ""] + [f"- {n}" for n in result["notes"]] + [""]
    return "\n".join(lines)


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models_ = result["models"]
    n_prot = max(len(m["protocols"]) for m in models_)
    fig, axes = plt.subplots(len(models_), n_prot, figsize=(5.5 * n_prot, 4.2 * len(models_)), squeeze=False)
    for i, m in enumerate(models_):
        for j, (protocol, block) in enumerate(m["protocols"].items()):
            ax = axes[i][j]
            top = max(row["n"] for row in block["arms"])
            ax.plot([1, top], [1, top], color="0.8", lw=1, label="N (all distinct)")
            ax.axhline(m["d_vocab"], color="0.5", ls=":", lw=1, label=f"V = {m['d_vocab']}")
            for a, row in enumerate(block["arms"]):
                ax.plot(row["ns"], row["curve"], marker="os^vDx"[a % 6], ms=4, lw=1.2,
                        ls=["-", "--", "-.", ":"][a % 4], label=row["arm"])
            ax.set_xscale("log"), ax.set_yscale("log")
            ax.set_xlabel("N (first positions)"), ax.set_ylabel("distinct completions")
            ax.set_title(f"{m['model']}: {protocol} protocol", fontsize=10)
            ax.legend(fontsize=7)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "wb") as f:
        f.write(buf.getvalue())
    os.replace(tmp, path)


def main(argv=None) -> dict:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    t0 = time.time()
    result = {
        "experiment": EXPERIMENT,
        "command": "python " + " ".join(shlex.quote(a) for a in
                                        ["analyses/token_vs_soft_token.py"] + (sys.argv[1:] if argv is None else argv)),
        "length": args.length, "n": args.n, "seed": args.seed,
        "models": [run_model(name, args) for name in args.model],
        "reference": REFERENCE,
        "notes": [
            "A real first token can give at most V distinct completions; every virtual arm can exceed V.",
            "Samplers are fitted to the same form computed from real single tokens: 'gaussian' matches their "
            "mean and covariance (drawn as mu + (X - mu)^T g / sqrt(M - 1)); 'convex' mixes "
            f"{args.convex_k} real-token tensors with Dirichlet(1) weights (prefixlens.capacity).",
            "The token arm uses every real token when V <= N, else a seeded random subset of N; virtual arms "
            "use N samples. The last column counts each arm's first N_token = min(N, V) samples, so the arms "
            "are compared at the same N.",
            "The reference compares 32,000 tokens with 48,218 soft tokens of unknown provenance; compare "
            "fractions, or the curves at equal N.",
            "Completions are generated with prefixlens.generate (key/value cache after the first step).",
        ],
    }
    result["wall_s"] = time.time() - t0
    result["environment"] = environment()
    out = Path(args.out)
    atomic_write_text(out / f"{EXPERIMENT}.json", json.dumps(result, indent=1))
    atomic_write_text(out / f"{EXPERIMENT}.md", markdown(result))
    plot(result, out / f"{EXPERIMENT}.png")
    print(f"wrote {out / EXPERIMENT}.{{json,md,png}} in {result['wall_s']:.0f} s")
    return result


if __name__ == "__main__":
    main()
