"""Training on the toy tasks: pretraining / full fine-tuning, prefix-tuning, prompt tuning and LoRA.

Every method runs the model through the ``TransformerBridge``; prefix methods attach the prefix's
hooks (:func:`prefixlens.attached`) with the base model frozen (``requires_grad_(False)``), so the
backward pass computes no weight gradients. The pad positions and prefix slots, the same in every
row, run once per batch through the key/value cache (:func:`batch_loss`). One loop (:func:`fit`)
serves all methods: AdamW, constant or cosine learning rate, global grad-norm clipping, a seeded
data stream, periodic evaluation on a fixed validation set from the *train* split, and safetensors
checkpoints that resume exactly (optimiser, data stream and dropout RNG state) and only into the run
that wrote them. Reference defaults (see the README's toy-tasks section): AdamW betas (0.9, 0.95);
weight decay 0.1 on the weight matrices for full training (embeddings, norms and biases excluded),
the torch default 0.01 for prefixes and LoRA; grad-norm clip 1.0; batch 64. Full training runs the
model in train mode (the HF modules apply the dropout the model was built with); prefix and LoRA
training run it in eval mode.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor, nn
from tqdm.auto import tqdm

from prefixlens import tasks as T
from prefixlens.generation import generate
from prefixlens.kv_cache import cached_forward, has_kv_cache
from prefixlens.injection import full_attention_mask, maybe_attached, run_with_prefix
from prefixlens.lora import LoRA, add_lora
from prefixlens.prefixes import KVPrefix, Prefix, ResidualPrefix, SoftPrompt
from prefixlens.serialization import CorruptFileError, load_tensors, save_tensors
from prefixlens.signature import model_dtype_device, module_roots, signature_of

__all__ = [
    "TrainConfig",
    "TrainResult",
    "Accuracy",
    "PrefixMLP",
    "lm_loss",
    "fit",
    "train_model",
    "train_prefix",
    "train_lora",
    "predict",
    "evaluate",
    "position_accuracy",
    "accuracy_matrix",
    "count_trainable",
    "prefix_parameter_count",
    "freeze",
]

PREFIX_FORMS = {"residual": ResidualPrefix, "kv": KVPrefix, "soft": SoftPrompt}


@dataclass
class TrainConfig:
    """Hyperparameters of one training run (everything that changes the result is hashed into the
    run id; ``progress`` and the checkpoint location are not)."""

    iters: int = 1000
    lr: float = 5e-4
    batch_size: int = 64
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float | None = None  # None: 0.1 for full training, 0.01 for prefixes / LoRA
    grad_clip: float = 1.0
    seed: int = 0
    eval_every: int = 0  # 0: no periodic evaluation
    eval_items: int = 512
    target_accuracy: float | None = None  # stop once the periodic evaluation reaches this
    schedule: str = "constant"  # or "cosine": lr decays to lr/10 over `iters` (the reference: constant)
    checkpoint_dir: str | None = None
    checkpoint_every: int = 0
    progress: bool = True

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise a ``ValueError`` naming every out-of-range setting (also called by :func:`fit`, so a
        config changed after construction is checked too)."""
        problems = []

        def is_int(v) -> bool:
            return isinstance(v, int) and not isinstance(v, bool)

        def is_real(v) -> bool:
            return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

        if not is_int(self.iters) or self.iters < 0:
            problems.append(f"iters={self.iters!r} must be an int >= 0")
        if not is_real(self.lr) or self.lr <= 0:
            problems.append(f"lr={self.lr!r} must be a finite number > 0")
        if not is_int(self.batch_size) or self.batch_size < 1:
            problems.append(f"batch_size={self.batch_size!r} must be an int >= 1")
        betas = tuple(self.betas) if isinstance(self.betas, (tuple, list)) else None
        if betas is None or len(betas) != 2 or not all(is_real(b) and 0 <= b < 1 for b in betas):
            problems.append(f"betas={self.betas!r} must be two numbers in [0, 1)")
        if self.weight_decay is not None and (not is_real(self.weight_decay) or self.weight_decay < 0):
            problems.append(f"weight_decay={self.weight_decay!r} must be None or a finite number >= 0")
        if self.grad_clip is not None and (not is_real(self.grad_clip) or self.grad_clip < 0):
            problems.append(f"grad_clip={self.grad_clip!r} must be None/0 (no clipping) or a finite number > 0")
        if not is_int(self.seed):
            problems.append(f"seed={self.seed!r} must be an int")
        if not is_int(self.eval_every) or self.eval_every < 0:
            problems.append(f"eval_every={self.eval_every!r} must be an int >= 0 (0: no periodic evaluation)")
        if not is_int(self.eval_items) or self.eval_items < 1:
            problems.append(f"eval_items={self.eval_items!r} must be an int >= 1")
        if self.target_accuracy is not None and (not is_real(self.target_accuracy) or not 0 <= self.target_accuracy <= 1):
            problems.append(f"target_accuracy={self.target_accuracy!r} must be None or in [0, 1]")
        if self.target_accuracy is not None and not self.eval_every:
            problems.append("target_accuracy needs eval_every > 0 (it is checked at the periodic evaluations)")
        if self.schedule not in ("constant", "cosine"):
            problems.append(f"schedule={self.schedule!r} must be 'constant' or 'cosine'")
        if not is_int(self.checkpoint_every) or self.checkpoint_every < 0:
            problems.append(f"checkpoint_every={self.checkpoint_every!r} must be an int >= 0 (0: no periodic checkpoints)")
        if problems:
            raise ValueError("invalid TrainConfig: " + "; ".join(problems) + ".")

    def identity(self) -> dict:
        d = dataclasses.asdict(self)
        for k in ("progress", "checkpoint_dir", "checkpoint_every"):
            d.pop(k)
        d["betas"] = list(d["betas"])
        return d


@dataclass
class TrainResult:
    """What a run did: ``losses`` (one per step), ``evals`` (``[step, accuracy]`` pairs)."""

    steps: int
    losses: list[float] = field(default_factory=list)
    evals: list[list[float]] = field(default_factory=list)
    run_id: str = ""
    resumed_from: int | None = None
    n_trainable: int = 0
    stopped_early: bool = False

    @property
    def final_loss(self) -> float:
        tail = self.losses[-50:]
        return float(sum(tail) / len(tail)) if tail else float("nan")


@dataclass(frozen=True)
class Accuracy:
    """Whole-sequence exact match over a frozen test set, with a 95% Wilson interval."""

    correct: int
    n: int

    @property
    def mean(self) -> float:
        return self.correct / self.n

    @property
    def ci95(self) -> tuple[float, float]:
        return T.wilson_interval(self.correct, self.n)

    def __float__(self) -> float:
        return self.mean

    def __repr__(self) -> str:
        lo, hi = self.ci95
        return f"Accuracy({self.mean:.2%} [{lo:.2%}, {hi:.2%}], {self.correct}/{self.n})"


def lm_loss(
    logits: Float[Tensor, "batch pos d_vocab"], targets: Int[Tensor, "batch pos"]
) -> Float[Tensor, ""]:
    """Mean cross-entropy over the non-ignored (answer) positions (in float32 or wider)."""
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=T.IGNORE)


def freeze(model) -> None:
    """``requires_grad_(False)`` on every base parameter (no weight gradients in the backward)."""
    model.requires_grad_(False)


def count_trainable(module: nn.Module | list) -> int:
    params = module.parameters() if isinstance(module, nn.Module) else module
    return sum(p.numel() for p in params if p.requires_grad)


class _ModelState:
    """What training changes on a model besides its trained weights: every parameter's
    ``requires_grad`` and ``.grad``, and every module's train/eval mode. ``restore()`` puts them back
    exactly (per parameter and per module), for the parameters and modules that existed at capture."""

    def __init__(self, model: nn.Module):
        roots = module_roots(model)
        params = {id(p): p for r in roots for p in r.parameters()}
        modules = {id(m): m for r in roots for m in r.modules()}
        self.params = [(p, p.requires_grad, p.grad) for p in params.values()]
        self.modes = [(m, m.training) for m in modules.values()]

    def restore(self, requires_grad: bool = True, grads: bool = True, modes: bool = True) -> None:
        for p, flag, grad in self.params:
            if requires_grad:
                p.requires_grad_(flag)
            if grads:
                p.grad = grad
        if modes:
            for m, training in self.modes:
                m.training = training


def _restores_model_state(keep_frozen: bool):
    """Decorate ``train_*(model, ...)``: the model's per-module train/eval mode and its parameters'
    ``.grad`` are restored when the call returns, and so are the ``requires_grad`` flags unless
    ``keep_frozen`` (prefix and LoRA training leave the base frozen, as documented). If the call
    raises, everything is restored, flags included."""

    def deco(fn):
        @functools.wraps(fn)
        def wrapper(model, *args, **kwargs):
            state = _ModelState(model)
            try:
                out = fn(model, *args, **kwargs)
            except BaseException:
                state.restore()
                raise
            state.restore(requires_grad=not keep_frozen)
            return out

        return wrapper

    return deco


def _rng_devices() -> list[int]:
    """CUDA devices whose RNG a seeded run touches (``torch.manual_seed`` seeds all of them)."""
    if not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return []
    return list(range(torch.cuda.device_count()))


def _keeps_global_rng(fn):
    """Run ``fn`` on a fork of the global RNGs (CPU and initialised CUDA devices): inside, the run
    seeds and draws from them (dropout) exactly as before; outside, the caller's RNG state is
    unchanged, also when ``fn`` raises."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with torch.random.fork_rng(devices=_rng_devices()):
            return fn(*args, **kwargs)

    return wrapper


def prefix_parameter_count(model, length: int, form: str = "residual") -> int:
    """Scalars in a prefix of ``length`` slots: ``L·P·d`` (residual), ``2·L·P·n_kv·d_head`` (kv), ``P·d`` (soft)."""
    s = signature_of(model)
    return {
        "residual": s.n_layers * length * s.d_model,
        "kv": 2 * s.n_layers * length * s.n_kv_heads * s.d_head,
        "soft": length * s.d_model,
    }[form]


# --------------------------------------------------------------------------------------------------
# the forward pass on a task batch
# --------------------------------------------------------------------------------------------------


def _content(tokens: Tensor, targets: Tensor | None, n_pad: int, prefix: Prefix | None):
    """Without a prefix the model sees the pads; a prefix of length ``L <= n_pad`` takes the place
    of the first ``L`` pads (the remaining ``n_pad - L`` pads stay real tokens)."""
    if prefix is None:
        return tokens, targets
    L = prefix.length
    if L > n_pad:
        raise ValueError(
            f"a prefix of length {L} does not fit the layout with {n_pad} pad positions; build the task "
            f"with n_pad >= {L} (content must stay at the positions the model was trained on)."
        )
    return tokens[:, L:], (targets[:, L:] if targets is not None else None)


def _logits(model, tokens: Tensor, prefix: Prefix | None, attention_mask: Tensor | None = None) -> Tensor:
    if attention_mask is None:
        return model(tokens) if prefix is None else run_with_prefix(model, tokens, prefix)
    if prefix is None:
        mask = full_attention_mask(attention_mask, tokens, 0)
        return model(tokens) if mask is None else model(tokens, attention_mask=mask)
    return run_with_prefix(model, tokens, prefix, attention_mask=attention_mask)


def _dropout_active(model) -> bool:
    return model.training and any(isinstance(m, nn.Dropout) and m.p > 0 for m in model.modules())


def _can_share_pads(model, tokens: Tensor, n_shared: int, prefix: Prefix | None) -> bool:
    """Whether the first ``n_shared`` positions (and the prefix slots) are the same computation in
    every row: identical pad tokens, one prefix for the whole batch, no dropout, and a model whose
    forward takes a key/value cache."""
    return (
        tokens.shape[0] > 1
        and (n_shared > 0 or prefix is not None)
        and (prefix is None or not prefix.batched)
        and has_kv_cache(model)
        and not _dropout_active(model)
        and bool((tokens[:, :n_shared] == tokens[:1, :n_shared]).all())
    )


def _logits_shared_pads(
    model, tokens: Int[Tensor, "batch pos"], n_shared: int, prefix: Prefix | None
) -> Float[Tensor, "batch pos-n_shared d_vocab"]:
    """Logits at positions ``n_shared:`` of ``tokens`` (after ``prefix``'s slots), with the slots
    and the first ``n_shared`` (pad) positions run once for the whole batch.

    Those positions only attend to each other, so their keys and values are the same in every row:
    one batch-1 pass puts them into the model's key/value cache, which is repeated over the batch
    (gradients flow back through it to the prefix or adapters), and the rest of the sequence runs
    on top of it. This is the same computation as the full pass (checked in the tests to float32
    precision) at ``(pos - n_shared) / (P + pos)`` of the cost of the position-wise layers.
    """
    head = tokens[:1, :n_shared]
    with maybe_attached(model, prefix) as slots:
        _, cache = cached_forward(model, slots.prepend(head))
    cache.batch_repeat_interleave(tokens.shape[0])
    return cached_forward(model, tokens[:, n_shared:], cache)[0]


def batch_loss(
    model,
    batch: T.TaskBatch,
    prefix: Prefix | None = None,
    share_pads: bool | None = None,
    attention_mask: Tensor | None = None,
) -> Tensor:
    """Mean answer-token cross-entropy of ``model`` (with ``prefix``) on ``batch``.

    ``share_pads`` runs the pad positions and prefix slots, identical in every row, once per batch
    instead of once per row (see ``_logits_shared_pads``) wherever that is exact: ``True`` always,
    ``None`` (default) when they are at least a quarter of the sequence (below that the second
    forward call costs about what it saves: 0.87-1.11x measured with 1 of 20 or 4 of 23 positions,
    against 1.3-1.6x with 12 of 31), ``False`` never.

    ``attention_mask`` (1 = real token, 0 = padding): the shape of ``batch.tokens`` (with a prefix its
    first ``P`` columns, where the slots go, must be 1) or of the content after the slots; padded
    positions are neither attended nor scored (see :mod:`prefixlens.injection`).
    """
    tokens, targets = _content(batch.tokens, batch.targets, batch.n_pad, prefix)
    if attention_mask is not None:
        mask = full_attention_mask(attention_mask, tokens, prefix.length if prefix is not None else 0)
        if mask is not None:
            P = prefix.length if prefix is not None else 0
            targets = targets.masked_fill(mask[:, P:] == 0, T.IGNORE)
            return lm_loss(_logits(model, tokens, prefix, mask), targets)
    n_shared = batch.n_pad - (prefix.length if prefix is not None else 0)
    if share_pads is None:
        share_pads = 4 * batch.n_pad >= batch.tokens.shape[1]
    if share_pads and _can_share_pads(model, tokens, n_shared, prefix):
        return lm_loss(_logits_shared_pads(model, tokens, n_shared, prefix), targets[:, n_shared:])
    return lm_loss(_logits(model, tokens, prefix), targets)


# --------------------------------------------------------------------------------------------------
# evaluation
# --------------------------------------------------------------------------------------------------


@torch.no_grad()
def predict(
    model,
    test: T.TaskBatch,
    prefix: Prefix | None = None,
    method: str = "greedy",
    batch_size: int = 500,
) -> Int[Tensor, "n length"]:
    """The model's 10 answer tokens for every item of ``test`` (on the CPU).

    ``method="greedy"`` generates the answer greedily (``prefixlens.generate``) from pads + input;
    ``"teacher_forced"`` takes the argmax at every answer position of one forward pass over the
    correct answer, i.e. each token given the correct preceding ones.
    """
    if method not in ("greedy", "teacher_forced"):
        raise ValueError(f"method must be 'greedy' or 'teacher_forced', got {method!r}.")
    was_training = model.training
    model.eval()
    _, device = model_dtype_device(model)
    out = []
    try:
        for start in range(0, len(test), batch_size):
            sl = slice(start, start + batch_size)
            if method == "teacher_forced":
                tokens, _ = _content(test.tokens[sl].to(device), None, test.n_pad, prefix)
                pred = _logits(model, tokens, prefix)[:, -T.LENGTH :].argmax(-1)
            else:
                prompt, _ = _content(test.prompt()[sl].to(device), None, test.n_pad, prefix)
                pred = generate(model, prompt, prefix=prefix, max_new_tokens=T.LENGTH)[:, -T.LENGTH :]
            out.append(pred.cpu())
    finally:
        model.train(was_training)
    return torch.cat(out)


def evaluate(
    model,
    test: T.TaskBatch,
    prefix: Prefix | None = None,
    method: str = "greedy",
    batch_size: int = 500,
) -> Accuracy:
    """Whole-sequence exact match of the 10 answer tokens on ``test`` (see :func:`predict`).

    Greedy decoding and teacher forcing give the same number: greedy decoding reproduces the answer
    exactly iff every next-token argmax given the correct preceding answer is correct (up to argmax
    ties between float-level different logits). With the key/value cache the two cost about the
    same (greedy 0.9-1.6x teacher forcing on 1,000 items, 4-48 pads); teacher forcing also gives the
    per-position accuracies (:func:`position_accuracy`) and is used for periodic evaluation.
    """
    pred = predict(model, test, prefix, method, batch_size)
    return Accuracy(int((pred == test.answers).all(1).sum()), len(test))


def position_accuracy(
    model, test: T.TaskBatch, prefix: Prefix | None = None, batch_size: int = 500
) -> Float[Tensor, "length"]:
    """Teacher-forced accuracy at each of the 10 answer positions: which step of the answer fails."""
    pred = predict(model, test, prefix, "teacher_forced", batch_size)
    return (pred == test.answers).double().mean(0)


def accuracy_matrix(
    model,
    tests: dict[str, T.TaskBatch],
    prefixes: dict[str, Prefix | None],
    method: str = "greedy",
    progress: bool = False,
) -> dict[str, dict[str, Accuracy]]:
    """``{row: {task: Accuracy}}`` for every prefix (``None`` = the pretrained model) and test set."""
    out: dict[str, dict[str, Accuracy]] = {}
    items = [(r, t) for r in prefixes for t in tests]
    for row, task in tqdm(items, desc="evaluate", disable=not progress, leave=False):
        out.setdefault(row, {})[task] = evaluate(model, tests[task], prefixes[row], method=method)
    return out


# --------------------------------------------------------------------------------------------------
# the loop
# --------------------------------------------------------------------------------------------------


def _fingerprint(model) -> str:
    """A digest of every element of the base weights (float64 sums, to 10 digits): with the exact
    sampled :func:`~prefixlens.signature.weights_fingerprint` (which catches what sums miss, e.g.
    two token embeddings swapped) it keys the run id, so a checkpoint never resumes onto other
    weights."""
    h = hashlib.sha256()
    with torch.no_grad():
        for name, p in sorted(model.state_dict().items()):
            if not torch.is_tensor(p) or not p.is_floating_point():
                continue
            x = p.detach().double().flatten()
            idx = torch.arange(x.numel())
            h.update(name.encode())
            h.update(f"{float(x.sum()):.10e},{float((x * x).sum()):.10e},{float((x * (idx % 7 + 1)).sum()):.10e}".encode())
    return h.hexdigest()


def _run_id(kind: str, task: str, n_pad: int, config: TrainConfig, model, extra: dict) -> str:
    ident = {
        "kind": kind,
        "task": task,
        "n_pad": n_pad,
        "config": config.identity(),
        "signature": json.loads(signature_of(model).to_json()),  # shapes and the weights fingerprint
        "base": _fingerprint(model),
        "dtype": str(model_dtype_device(model)[0]),  # a float64 run is not a float32 run's continuation
        "act_fn": str(getattr(model.cfg, "act_fn", None)),  # not in the weights, but changes the function
        "extra": extra,
    }
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()


def _ckpt_dir(config: TrainConfig, name: str, run_id: str) -> Path | None:
    if not config.checkpoint_dir:
        return None
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", name)
    return Path(config.checkpoint_dir) / f"{safe}-{run_id[:16]}"


def _save_checkpoint(
    path: Path, run_id: str, step: int, params: dict[str, Tensor], opt, gen, result: TrainResult, finished: bool = False
) -> None:
    tensors = {f"param.{k}": v for k, v in params.items()}
    plist = list(params.values())
    for i, p in enumerate(plist):
        st = opt.state.get(p, {})
        for key in ("exp_avg", "exp_avg_sq", "step"):
            if key in st:
                tensors[f"opt.{i}.{key}"] = torch.as_tensor(st[key]).reshape(-1) if key == "step" else st[key]
    tensors["rng.data"] = gen.get_state()
    tensors["rng.torch"] = torch.get_rng_state()
    meta = {
        "prefixlens_checkpoint": "1",
        "run_id": run_id,
        "step": str(step),
        "losses": json.dumps(result.losses),
        "evals": json.dumps(result.evals),
        "finished": "1" if finished else "0",
    }
    save_tensors(path / f"step_{step:09d}.safetensors", tensors, meta)


def _latest_checkpoint(directory: Path | None, run_id: str) -> tuple[Path, dict, dict] | None:
    """The newest readable checkpoint in ``directory`` whose metadata names exactly this run.

    A checkpoint that cannot be read (truncated by a crash, damaged: see
    :func:`~prefixlens.serialization.load_tensors`) is skipped with a warning naming it, and the
    previous one is used (the run then redoes the lost steps exactly and overwrites the bad file).
    """
    if directory is None or not directory.exists():
        return None
    for path in sorted(directory.glob("step_*.safetensors"), reverse=True):
        try:
            tensors, meta = load_tensors(path)
        except CorruptFileError as e:
            warnings.warn(f"skipping an unreadable checkpoint, resuming from an earlier one if any: {e}", UserWarning, stacklevel=3)
            continue
        if meta.get("run_id") == run_id:
            return path, tensors, meta
    return None


@_keeps_global_rng
def fit(
    params: dict[str, Tensor],
    loss_fn: Callable[[T.TaskBatch], Tensor],
    task: str,
    n_pad: int,
    config: TrainConfig,
    run_id: str,
    name: str,
    eval_fn: Callable[[], float] | None = None,
    decay: Callable[[str, Tensor], bool] | None = None,
    weight_decay: float = 0.01,
    set_mode: Callable[[], None] | None = None,
) -> TrainResult:
    """The training loop shared by every method.

    ``params``: named trainable tensors; ``loss_fn(batch)`` the loss of a training batch;
    ``decay(name, p)`` selects the tensors that get weight decay; ``eval_fn()`` returns the periodic
    validation accuracy; ``set_mode()`` puts the model in train/eval mode (called after each eval).
    The run seeds the global RNG (dropout) from ``config.seed`` on a fork: the caller's RNG state is
    left as it was.
    """
    config.validate()
    if config.iters < 0:
        raise ValueError(f"iters must be >= 0, got {config.iters}.")
    if not params:
        raise ValueError("nothing to train: params is empty.")
    if config.schedule not in ("constant", "cosine"):
        raise ValueError(f"schedule must be 'constant' or 'cosine', got {config.schedule!r}.")
    plist = list(params.values())
    decay = decay or (lambda n, p: True)
    groups = [
        {"params": [p for n, p in params.items() if decay(n, p)], "weight_decay": weight_decay},
        {"params": [p for n, p in params.items() if not decay(n, p)], "weight_decay": 0.0},
    ]
    opt = torch.optim.AdamW([g for g in groups if g["params"]], lr=config.lr, betas=config.betas)
    gen = torch.Generator().manual_seed(config.seed)
    torch.manual_seed(config.seed)
    result = TrainResult(steps=0, run_id=run_id, n_trainable=sum(p.numel() for p in plist))
    start = 0
    ckdir = _ckpt_dir(config, name, run_id)
    found = _latest_checkpoint(ckdir, run_id)
    if found is not None:
        _, tensors, meta = found
        with torch.no_grad():
            for k, p in params.items():
                p.copy_(tensors[f"param.{k}"])
        # one optimiser step on zero grads creates the state tensors, then overwrite them
        for i, p in enumerate(plist):
            if f"opt.{i}.exp_avg" in tensors:
                opt.state[p] = {
                    "step": tensors[f"opt.{i}.step"].reshape(()).clone(),
                    "exp_avg": tensors[f"opt.{i}.exp_avg"].to(p).clone(),
                    "exp_avg_sq": tensors[f"opt.{i}.exp_avg_sq"].to(p).clone(),
                }
        gen.set_state(tensors["rng.data"])
        torch.set_rng_state(tensors["rng.torch"])
        start = int(meta["step"])
        result.losses = json.loads(meta["losses"])
        result.evals = json.loads(meta["evals"])
        result.resumed_from = start
        if meta.get("finished") == "1":  # e.g. stopped early: the run is complete, do not train on
            result.steps = start
            result.stopped_early = start < config.iters
            return result
    stream = T.batches(task, config.batch_size, n_pad, config.seed, generator=gen)
    if set_mode:
        set_mode()
    bar = tqdm(range(start, config.iters), desc=name, disable=not config.progress, leave=False, mininterval=2.0)
    step = start
    for step in bar:
        batch = next(stream)
        if config.schedule == "cosine":
            factor = 0.1 + 0.45 * (1 + math.cos(math.pi * step / max(1, config.iters)))
            for group in opt.param_groups:
                group["lr"] = config.lr * factor
        loss = loss_fn(batch)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"{name}: loss became {float(loss)} at step {step}.")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if config.grad_clip:
            torch.nn.utils.clip_grad_norm_(plist, config.grad_clip)
        opt.step()
        result.losses.append(float(loss.detach()))
        done = step + 1
        if eval_fn is not None and config.eval_every and (done % config.eval_every == 0 or done == config.iters):
            acc = float(eval_fn())
            result.evals.append([done, acc])
            if set_mode:
                set_mode()
            bar.set_postfix(loss=f"{result.final_loss:.3f}", val=f"{acc:.1%}")
            if config.target_accuracy is not None and acc >= config.target_accuracy:
                result.stopped_early = done < config.iters
                step = done
                if ckdir is not None:
                    _save_checkpoint(ckdir, run_id, done, params, opt, gen, result, finished=True)
                break
        if ckdir is not None and config.checkpoint_every and (done % config.checkpoint_every == 0 or done == config.iters):
            _save_checkpoint(ckdir, run_id, done, params, opt, gen, result, finished=done == config.iters)
        step = done
    bar.close()
    result.steps = step
    return result


def _validation(task: str, n_pad: int, config: TrainConfig) -> T.TaskBatch:
    """A fixed validation set from the *train* split (the test sets stay unseen)."""
    g = torch.Generator().manual_seed(10_007 + config.seed)
    return T.make_batch(task, config.eval_items, n_pad, "train", g)


# --------------------------------------------------------------------------------------------------
# the methods
# --------------------------------------------------------------------------------------------------


@_restores_model_state(keep_frozen=False)
def train_model(model, task: str, n_pad: int, config: TrainConfig, name: str = "train") -> TrainResult:
    """Pretraining or full fine-tuning: every used weight of ``model`` is trained (in place).

    The model runs in train mode (HF dropout as built); weight decay goes to weight matrices only.
    The bridge's fused ``qkv`` copy (unused in its forward) gets no gradient and is not trained.
    Afterwards (also on an error) every parameter's ``requires_grad`` and ``.grad``, every module's
    train/eval mode and the global RNG are as they were before the call; only the weights changed.
    """
    config.validate()
    model.requires_grad_(True)
    params = {n: p for n, p in model.named_parameters() if ".qkv." not in n}
    run_id = _run_id("full", task, n_pad, config, model, {})
    val = _validation(task, n_pad, config) if config.eval_every else None

    def decay(n: str, p: Tensor) -> bool:
        return p.ndim >= 2 and "wte" not in n and "wpe" not in n and "embed" not in n

    def loss_fn(batch):
        return batch_loss(model, batch)

    return fit(  # @_restores_model_state puts the caller's modes and flags back
        params, loss_fn, task, n_pad, config, run_id, name,
        eval_fn=(lambda: evaluate(model, val, method="teacher_forced").mean) if val is not None else None,
        decay=decay,
        weight_decay=0.1 if config.weight_decay is None else config.weight_decay,
        set_mode=model.train,
    )


class PrefixMLP(nn.Module):
    """Li & Liang's reparametrisation: a small table ``[P, d_small]`` through an MLP gives the prefix.

    Residual form: ``[P, d_small] -> [P, n_layers·d_model]``; KV form: ``-> [P, 2·n_layers·n_kv·d_head]``.
    Call ``prefix()`` for the (differentiable) prefix, ``prefix().detach_copy`` via :meth:`export`.
    """

    def __init__(self, model, length: int, form: str = "residual", d_small: int = 64, hidden: int = 256, seed: int = 0):
        super().__init__()
        if form not in ("residual", "kv"):
            raise ValueError(f"the MLP reparametrisation supports form 'residual' or 'kv', got {form!r}.")
        s = signature_of(model)
        dtype, device = model_dtype_device(model)
        self.form, self.length, self.sig = form, length, s
        out = s.n_layers * s.d_model if form == "residual" else 2 * s.n_layers * s.n_kv_heads * s.d_head
        g = torch.Generator().manual_seed(seed)
        self.table = nn.Parameter(torch.randn(length, d_small, generator=g, dtype=torch.float64).to(dtype=dtype, device=device))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.mlp = nn.Sequential(nn.Linear(d_small, hidden), nn.Tanh(), nn.Linear(hidden, out)).to(dtype=dtype, device=device)

    def prefix(self) -> Prefix:
        s = self.sig
        flat = self.mlp(self.table)  # [P, out]
        if self.form == "residual":
            return ResidualPrefix(flat.reshape(self.length, s.n_layers, s.d_model).transpose(0, 1), s)
        kv = flat.reshape(self.length, 2, s.n_layers, s.n_kv_heads, s.d_head).permute(1, 2, 0, 3, 4)
        return KVPrefix(kv[0], kv[1], s)

    def export(self) -> Prefix:
        """The trained prefix as plain tensors (the MLP is no longer needed)."""
        with torch.no_grad():
            p = self.prefix()
        cls = type(p)
        return cls(**{n: getattr(p, n).detach().clone() for n in p._tensor_names}, signature=p.signature)


@_restores_model_state(keep_frozen=True)
def train_prefix(
    model,
    task: str,
    n_pad: int,
    config: TrainConfig,
    form: str = "residual",
    length: int | None = None,
    init_scale: float | None = None,
    reparam: dict | None = None,
    name: str | None = None,
) -> tuple[Prefix, TrainResult]:
    """Prefix-tune (``form="residual"``, the paper's; ``"kv"``, Li & Liang's free keys and values)
    or prompt-tune (``"soft"``) the frozen ``model`` on ``task``.

    ``length`` defaults to ``n_pad``; a shorter prefix leaves real pad tokens after it.
    ``init_scale``: standard deviation of the initial prefix (default: 1 for residual, as the
    reference's ``randn``; the embedding std for soft prompts; 1 for kv).
    ``reparam={"d_small": .., "hidden": ..}`` trains Li & Liang's MLP reparametrisation instead and
    returns the exported prefix. The model is frozen (``requires_grad_(False)``) and left frozen;
    it trains in eval mode, and its modes, its parameters' ``.grad`` and the global RNG are restored
    afterwards (on an error the ``requires_grad`` flags too).
    """
    config.validate()
    if form not in PREFIX_FORMS:
        raise ValueError(f"form must be one of {list(PREFIX_FORMS)}, got {form!r}.")
    length = n_pad if length is None else length
    if not 1 <= length <= n_pad:
        raise ValueError(f"prefix length must be in 1..n_pad={n_pad}, got {length}.")
    freeze(model)
    model.eval()
    name = name or f"prefix-{form}-{task}"
    if reparam is not None:
        holder: nn.Module = PrefixMLP(model, length, form, seed=config.seed, **reparam)
        get_prefix = holder.prefix
    else:
        kw = {} if init_scale is None else {"scale": init_scale}
        holder = PREFIX_FORMS[form].random(model, length, seed=config.seed, **kw)
        get_prefix = lambda: holder  # noqa: E731
    params = {n: p for n, p in holder.named_parameters()}
    run_id = _run_id("prefix", task, n_pad, config, model, {"form": form, "length": length, "init_scale": init_scale, "reparam": reparam})
    val = _validation(task, n_pad, config) if config.eval_every else None

    def loss_fn(batch):
        return batch_loss(model, batch, get_prefix())

    result = fit(
        params, loss_fn, task, n_pad, config, run_id, name,
        eval_fn=(lambda: evaluate(model, val, get_prefix(), method="teacher_forced").mean) if val is not None else None,
        weight_decay=0.01 if config.weight_decay is None else config.weight_decay,
        set_mode=model.eval,
    )
    prefix = holder.export() if reparam is not None else holder
    prefix.requires_grad_(False)
    for p in list(holder.parameters()) + list(prefix.parameters()):
        p.grad = None  # the last step's gradients are not part of the result
    return prefix, result


@_restores_model_state(keep_frozen=True)
def train_lora(
    model,
    task: str,
    n_pad: int,
    config: TrainConfig,
    rank: int = 1,
    targets: tuple[str, ...] | str = "reference",
    name: str | None = None,
) -> tuple[LoRA, TrainResult]:
    """Rank-``rank`` LoRA on ``targets`` of the frozen ``model``, trained on ``task``.

    The adapters stay attached when this returns (``lora.remove()`` restores the base model); the
    base stays frozen. Its modes, its parameters' ``.grad`` and the global RNG are restored (on an
    error also the flags, and the adapters are removed).
    """
    config.validate()
    freeze(model)
    model.eval()
    lora = add_lora(model, rank=rank, targets=targets, seed=config.seed)
    name = name or f"lora-r{rank}-{task}"
    params = {n: p for n, p in lora.named_parameters()}
    lora.remove()  # the run id fingerprints the base weights
    run_id = _run_id("lora", task, n_pad, config, model, {"rank": rank, "targets": list(lora.targets)})
    lora.attach()
    val = _validation(task, n_pad, config) if config.eval_every else None
    try:
        result = fit(
            params, lambda batch: batch_loss(model, batch), task, n_pad, config, run_id, name,
            eval_fn=(lambda: evaluate(model, val, method="teacher_forced").mean) if val is not None else None,
            weight_decay=0.01 if config.weight_decay is None else config.weight_decay,
            set_mode=model.eval,
        )
    except BaseException:
        lora.remove()
        raise
    lora.requires_grad_(False)
    for p in lora.parameters():
        p.grad = None
    return lora, result
