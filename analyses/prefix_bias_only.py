"""Paper §4 at scale: a prefix only rescales content attention and adds a bias — every layer and head.

For a model (default: a toy LLaMA with grouped-query attention; ``--model DIR``: a local LLaMA-family
checkpoint) and prefixes of several lengths (random, or ``--prefix PATH`` written by
``Prefix.save``), over a batch of inputs and in float32 and float64 (plus float16 at P = 1, the
reference's setting), measure both identities for every layer and head with layer-input patching:

1. relative attention  ``A^pt[i, P+j] = A^ref[i, j]·(1 − A_i)``
2. bias only           ``z_i = Σ_p A^pt[i, p]·v_p + (1 − A_i)·t_i``

and compare with the reference notebook's single-head fp16 numbers (LLaMA-7B, layer 0, head 12,
P = 1, one sentence: 4.88e-4 and 9.16e-5). Writes ``OUT/prefix_bias_only.{json,md,png}`` (and an
HTML attention report when :mod:`prefixlens.report` is available).

    python analyses/prefix_bias_only.py                 # toy LLaMA, P = 1, 4, 10, ~1-2 minutes on CPU
    python analyses/prefix_bias_only.py --model /path/to/llama --lengths 1 --n-inputs 8 --seq-len 64
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

import torch

import prefixlens as pl
from prefixlens import analysis, models
from prefixlens.environment import environment
from prefixlens.serialization import atomic_write_text

REFERENCE = {
    "setting": "LLaMA-7B, fp16, one DART sentence, P = 1, layer 0, head 12 only (reference notebook prefix_bias_only.ipynb)",
    "relative_attention": 4.88e-4,
    "bias_only": 9.16e-5,
}
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32, "float64": torch.float64}
TOY_LLAMA = dict(n_layers=4, d_model=128, n_heads=8, n_kv_heads=4, d_vocab=101, n_ctx=128, init_range=0.1)


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="local HuggingFace checkpoint directory (default: a toy LLaMA)")
    ap.add_argument("--prefix", help="a prefix file written by Prefix.save (default: random prefixes)")
    ap.add_argument("--form", choices=["residual", "kv", "soft"], default="residual", help="form of the random prefixes")
    ap.add_argument("--lengths", default="1,4,10", help="prefix lengths P of the random prefixes (comma-separated)")
    ap.add_argument("--dtypes", default="float32,float64", help="dtypes to check every length in")
    ap.add_argument("--reference-dtype", default="float16", help="a low-precision dtype checked at P = 1 only ('' to skip)")
    ap.add_argument("--n-inputs", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (0: torch's default)")
    ap.add_argument("--out", default="results", help="output directory")
    ap.add_argument("--no-report", action="store_true", help="skip the HTML attention report")
    args = ap.parse_args(argv)
    args.lengths = [int(x) for x in args.lengths.split(",") if x]
    args.dtypes = [x for x in args.dtypes.split(",") if x]
    for d in args.dtypes + ([args.reference_dtype] if args.reference_dtype else []):
        if d not in DTYPES:
            ap.error(f"unknown dtype {d!r}; choose from {', '.join(DTYPES)}")
    if not args.lengths or min(args.lengths) < 1:
        ap.error("--lengths needs at least one P >= 1")
    return args


def build_model(args, dtype: torch.dtype):
    if args.model:
        return models.load(args.model, dtype=dtype)
    return models.toy_llama(seed=args.seed, dtype=dtype, **TOY_LLAMA)


def build_prefixes(args, model) -> list[tuple[str, pl.Prefix]]:
    if args.prefix:
        p = pl.Prefix.load(args.prefix, model)
        return [(f"{p.form} from {args.prefix}", p)]
    cls = {"residual": pl.ResidualPrefix, "kv": pl.KVPrefix, "soft": pl.SoftPrompt}[args.form]
    return [(f"random {cls.__name__}", cls.random(model, P, seed=args.seed)) for P in args.lengths]


def input_tokens(args, model) -> torch.Tensor:
    vocab = int(model.cfg.d_vocab)
    g = torch.Generator().manual_seed(args.seed + 1)
    return torch.randint(min(3, vocab - 1), vocab, (args.n_inputs, args.seq_len), generator=g)


def run_checks(args) -> list[dict]:
    runs = []
    plan = [(d, None) for d in args.dtypes]
    if args.reference_dtype and args.reference_dtype not in args.dtypes:
        plan.append((args.reference_dtype, 1))
    for name, only_P in plan:
        model = build_model(args, DTYPES[name])
        tokens = input_tokens(args, model)
        for desc, prefix in build_prefixes(args, model):
            if only_P is not None and prefix.length != only_P:
                continue
            t0 = time.perf_counter()
            check = analysis.check_identities(model, tokens, prefix, batch_size=args.batch_size, progress=True)
            res = check.to_json()
            res.update(prefix=desc, seconds=round(time.perf_counter() - t0, 2))
            runs.append(res)
            print(f"{name:8s} P={prefix.length:<3d} " + "  ".join(f"{k}={v:.2e}" for k, v in res["max"].items()), flush=True)
    return runs


def _fmt(x: float | None) -> str:
    return "—" if x is None else f"{x:.2e}"


def markdown(args, runs: list[dict], command: str, model_desc: str) -> str:
    lines = [
        "# Paper §4 at scale: prefix = attention rescaling + bias, every layer and head",
        "",
        f"Command: `{command}`",
        "",
        f"Model: {model_desc}. Inputs: {args.n_inputs} random token sequences of length {args.seq_len} "
        f"(seed {args.seed}). Every layer and head is checked against the same layer's attention to the "
        "*same layer input* without the prefix (layer-input patching), so deeper layers are checked too.",
        "",
        "- **identity 1** (relative attention): max |A^pt[i, P+j] − A^ref[i, j]·(1 − A_i)| with the model's own patterns;",
        "- **identity 2** (bias only): max |z_i − (Σ_p A^pt[i,p]·v_p + (1 − A_i)·t_i)|, `t` from the no-prefix attention, `z` = `hook_z`;",
        "- **identity 2 (W_O)**: the same per head in the residual basis, |z·W_O[h] − …·W_O[h]|;",
        "- **renorm. (scores)** / **(1−A)t+Ab (scores)**: the decomposition's own errors from the pre-softmax scores.",
        "",
        "## Maximum error over all layers, heads, inputs and positions",
        "",
        "| P | dtype | identity 1 | identity 2 | identity 2 / max abs z | identity 2 (W_O) | renorm. (scores) | (1−A)t+Ab (scores) | max abs z | mean A |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in runs:
        m = r["max"]
        zs = max(row["z_scale"] for row in r["per_layer"])
        meanA = sum(row["mean_prefix_attention"] for row in r["per_layer"]) / len(r["per_layer"])
        lines.append(
            f"| {r['n_slots']} | {r['dtype']} | {_fmt(m['relative_attention'])} | {_fmt(m['bias_only'])} | {_fmt(m['bias_only'] / zs)} | "
            f"{_fmt(m.get('bias_only_residual'))} | {_fmt(m['renormalised_attention'])} | {_fmt(m['bias_only_scores'])} | "
            f"{zs:.2f} | {meanA:.3f} |"
        )
    lines += [
        f"| 1 | reference fp16 (1 head) | {REFERENCE['relative_attention']:.2e} | {REFERENCE['bias_only']:.2e} | ? | — | — | — | ? | ? |",
        "",
        f"Reference: {REFERENCE['setting']}. Half a unit in the last place of fp16 at values in [0.5, 1) is "
        "2.44e-4 and one unit is 4.88e-4: the reference's identity-1 error is one fp16 rounding step, as ours is in fp16; "
        "our fp16 identity-2 error is about two fp16 units (eps 9.8e-4) relative to the largest head output, "
        "whereas the reference's absolute 9.16e-5 reflects LLaMA-7B's small layer-0 head outputs. "
        "In float32 and float64 both identities hold to rounding for every layer and head, for P > 1 too.",
        "",
        "## Per layer (maximum over heads)",
    ]
    by_P: dict[int, list[dict]] = {}
    for r in runs:
        by_P.setdefault(r["n_slots"], []).append(r)
    for P, rs in by_P.items():
        lines += ["", f"### P = {P}", ""]
        head = "| layer | " + " | ".join(f"id. 1 {r['dtype']} | id. 2 {r['dtype']}" for r in rs)
        head += " | mean A | max A | input shift |"
        lines += [head, "|" + "---|" * (1 + 2 * len(rs) + 3)]
        for l in range(len(rs[0]["per_layer"])):
            cells = []
            for r in rs:
                row = r["per_layer"][l]
                cells += [_fmt(row["relative_attention"]), _fmt(row["bias_only"])]
            row0 = rs[0]["per_layer"][l]
            lines.append(
                f"| {l} | " + " | ".join(cells)
                + f" | {row0['mean_prefix_attention']:.3f} | {row0['max_prefix_attention']:.3f} | {row0['cross_layer_shift']:.3f} |"
            )
    lines += [
        "",
        "*input shift*: mean ‖x_prefixed − x_plain‖ / ‖x_plain‖ of the layer input at content positions — "
        "the cross-layer effect through which a prefix changes deeper layers' attention (0 at layer 0).",
        "",
    ]
    return "\n".join(lines)


def figure(args, path: Path) -> None:
    """Figure-5 style heatmaps (float64, P = 1, layer 0 and the last layer, the head with most prefix attention)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    model = build_model(args, torch.float64)
    tokens = input_tokens(args, model)[:1]
    prefix = build_prefixes(args, model)[0][1]
    d = pl.decompose(model, tokens, prefix, reference=True)
    P = prefix.length
    _, cache = pl.run_with_cache(model, tokens, prefix, names_filter=lambda n: n.endswith("hook_pattern"))
    layers = [0, d.n_layers - 1]
    fig, axes = plt.subplots(len(layers), 4, figsize=(16, 4 * len(layers)))
    for row, l in enumerate(layers):
        h = int(d.prefix_attention[l, 0].mean(-1).argmax())
        pattern = cache[f"blocks.{l}.attn.hook_pattern"][0, h]
        A = pattern[P:, :P].sum(-1, keepdim=True)
        ref = torch.nan_to_num(d.reference_pattern[l, 0, h])
        z, rec = d.z[l, 0, :, h], d.reconstruction()[l, 0, :, h]
        panels = [
            (pattern, f"L{l}H{h}: with prefix (P={P}, slots first)"),
            (ref, "without prefix, same layer input"),
            (pattern[P:, P:] - ref * (1 - A), "A^pt[content] − A^ref·(1−A)"),
            (z - rec, "z − ((1−A)t + Ab)"),
        ]
        for i, (ax, (img, title)) in enumerate(zip(axes[row], panels)):
            if i < 2:
                im = ax.imshow(img.numpy(), cmap="magma_r", aspect="auto", vmin=0, vmax=1)
            else:
                lim = float(img.abs().max()) or 1.0
                im = ax.imshow(img.numpy(), cmap="RdBu_r", aspect="auto", vmin=-lim, vmax=lim)
            ax.set_title(title, fontsize=9)
            fig.colorbar(im, ax=ax, fraction=0.046)
    fig.suptitle("Paper Figure 5 style, first and last layer: relative attention and bias only (float64; differences ~1e-16)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=80)
    plt.close(fig)
    tmp.replace(path)


def html_report(args, path: Path) -> str:
    """The Figure-5 report of :mod:`prefixlens.report` (CircuitsVis, self-contained HTML): the error
    table, and for the first prefix and input every layer's attention with the prefix, renormalised,
    and without it, plus the prefix mass per head and position."""
    from prefixlens import report

    model = build_model(args, torch.float32)
    tokens = input_tokens(args, model)[:1, :16]
    desc, prefix = build_prefixes(args, model)[0]
    d = pl.decompose(model, tokens, prefix, reference=True)
    figures = [
        report.summary_figure({f"{desc} (P = {prefix.length}, float32)": d}),
        *report.attention_figure(model, tokens, prefix, layer=None, decomposition=d),
        report.prefix_mass_figure(d, model=model, tokens=tokens),
    ]
    report.html(path, figures, title="prefix_bias_only: a prefix rescales content attention and adds a bias")
    return str(path)


def main(argv=None) -> dict:
    args = parse_args(argv)
    threads = torch.get_num_threads()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    try:
        return _main(args, argv)
    finally:
        torch.set_num_threads(threads)


def _main(args, argv) -> dict:
    command = shlex.join(["python", "analyses/prefix_bias_only.py", *(sys.argv[1:] if argv is None else argv)])
    torch.manual_seed(args.seed)
    out = Path(args.out)
    model_desc = f"checkpoint {args.model}" if args.model else "toy LLaMA " + json.dumps(TOY_LLAMA) + f", seed {args.seed}"
    runs = run_checks(args)
    figure(args, out / "prefix_bias_only.png")
    report = "skipped (--no-report)" if args.no_report else html_report(args, out / "prefix_bias_only.html")
    result = {
        "command": command,
        "config": {k: v for k, v in vars(args).items()},
        "model": model_desc,
        "reference": REFERENCE,
        "runs": runs,
        "report": report,
        "figure": str(out / "prefix_bias_only.png"),
        "environment": environment(),
    }
    atomic_write_text(out / "prefix_bias_only.json", json.dumps(result, indent=1))
    atomic_write_text(out / "prefix_bias_only.md", markdown(args, runs, command, model_desc))
    print(f"wrote {out / 'prefix_bias_only.json'} and .md")
    return result


if __name__ == "__main__":
    main()
