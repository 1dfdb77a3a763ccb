"""Training on your own data: ``(input, target)`` pairs, every method through one entry point.

    result = prefixlens.train_prefix(model, [("Word: great\\nSentiment:", " positive"), ...],
                                     form="kv", length=8, init="text", init_text="Classify the sentiment",
                                     config=TrainConfig(iters=200, lr=1e-2, batch_size=16))
    result.prefix, result.losses, result.evals

**Data.** A sequence (or torch ``Dataset``) of ``(input, target)`` pairs, or of dicts with ``"input"``
and ``"target"``; each side is a string or token ids. Strings are encoded with
:func:`prefixlens.text.encode`: the input with ``prepend_bos`` (``None``: the model's default, i.e.
BOS iff the checkpoint's tokenizer adds one: PEFT's format, where the BOS follows the prefix), the
target without BOS, each alone (so ``input + target`` is exactly the two encodings joined).

**The BOS policy travels with the prefix.** The policy the text inputs were encoded with is
``result.settings["prepend_bos"]`` (``None`` when every input was ids) and the trained prefix's
``content_bos`` (saved in its file): ``run_with_prefix``, ``run_with_cache``, ``generate``,
``decompose`` and the analysis functions give text after that prefix the same BOS by default, so the
documented calls reproduce the training format exactly (an explicit ``prepend_bos=`` wins). LoRA and
full fine-tuning have no prefix to carry it: text without a prefix gets the model's default, the
training default too; a run with another ``prepend_bos`` needs the same ``prepend_bos`` at inference. A row is
``input + target``, left-padded to the batch's longest row with a mask; the loss is the mean
cross-entropy over the **target tokens only** (each predicted from everything before it), which is
what a HuggingFace / PEFT model computes with ``labels = -100`` on the input and the padding.

**Methods** (``form``): ``"kv"`` (Li & Liang / PEFT prefix tuning: keys and values in every layer),
``"residual"`` (the paper's residual prefix), ``"soft"`` (prompt tuning), ``"lora"`` and ``"full"``
(fine-tuning a copy of the model). The base model is untouched: its weights, ``requires_grad`` flags,
``.grad`` and train/eval modes are as before the call (LoRA adapters are removed on return; attach
them with ``with result.lora:``), and so is the global RNG (the run seeds a fork from ``config.seed``).

**Initialisation** (``init``, prefix forms): ``"random"`` (Gaussian, ``init_scale``), ``"zeros"``,
``"vocab"`` (the prefix of ``length`` vocabulary tokens sampled uniformly with the run's seed, run as
a prompt: PEFT's ``SAMPLE_VOCAB``), ``"text"`` (Li & Liang's initialisation from real task words,
PEFT's ``TEXT``: ``init_text`` encoded without BOS, repeated or truncated to ``length`` tokens as PEFT
does, run as a prompt with ``from_prompt``), or a :class:`~prefixlens.Prefix` to start from (copied).

**The KV fast path.** A KV prefix runs as the model's key/value cache (:mod:`.fast_kv`), so no
placeholder slot passes through any layer (PEFT's route); ``cache_prefix=False`` uses the placeholder
slots instead (same loss and gradients to float precision; required on TL-native bridges, which have
no cache, and chosen automatically there).

**Loop.** :func:`~prefixlens.training.trainer.train_loop`: AdamW, constant/cosine schedule, grad-norm
clipping, a progress bar (``config.progress``), ``eval_fn(step, trained) -> dict | float`` every
``config.eval_every`` steps and at the end (logged into ``result.evals`` as ``[step, metrics]``;
``eval_data`` pairs add ``{"eval_loss": ...}``), and atomic checkpoints that resume exactly
(``config.checkpoint_dir``, ``checkpoint_every``). Batches: a seeded shuffle per epoch.
"""

from __future__ import annotations

import copy
import hashlib
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from jaxtyping import Int
from torch import Tensor

from prefixlens import tasks
from prefixlens.injection import run_with_prefix
from prefixlens.lora import LoRA, add_lora
from prefixlens.prefixes import KVPrefix, Prefix
from prefixlens.signature import model_dtype_device
from prefixlens.text import default_prepend_bos, encode
from prefixlens.training.checkpoints import run_id
from prefixlens.training.config import TrainConfig, TrainResult, check_init_scale, check_reparam
from prefixlens.training.fast_kv import logits_with_cache_prefix, supports_cache_prefix
from prefixlens.training.loss import lm_loss, logits_of
from prefixlens.training.methods import PREFIX_FORMS
from prefixlens.training.reparametrisation import PrefixMLP
from prefixlens.training.state import restores_model_state
from prefixlens.training.trainer import train_loop

__all__ = ["Pairs", "PairBatch", "Trained", "train_on_pairs", "pairs_loss", "METHODS", "INITS", "initial_prefix"]

METHODS = ("kv", "residual", "soft", "lora", "full")
INITS = ("random", "zeros", "vocab", "text")


# --------------------------------------------------------------------------------------------------
# data
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PairBatch:
    """A padded batch: ``tokens`` ``[B, W-1]`` (every row but its last token, left-padded),
    ``mask`` ``[B, W-1]`` (1 = real token; ``None`` when nothing is padded) and ``labels`` ``[B, W-1]``
    (the next token where it is a target token, ``IGNORE`` elsewhere)."""

    tokens: Int[Tensor, "batch pos"]
    mask: Int[Tensor, "batch pos"] | None
    labels: Int[Tensor, "batch pos"]

    @property
    def n_target_tokens(self) -> int:
        return int((self.labels != tasks.IGNORE).sum())


def _ids(x, what: str) -> list[int]:
    if isinstance(x, Tensor):
        if x.dtype.is_floating_point or x.dtype == torch.bool or x.ndim != 1:
            raise TypeError(f"{what}: token ids must be a 1-d integer tensor, got {x.dtype} {tuple(x.shape)}.")
        x = x.tolist()
    if not isinstance(x, (list, tuple)) or not all(isinstance(i, int) and not isinstance(i, bool) for i in x):
        raise TypeError(f"{what}: expected a string or a list of int token ids, got {type(x).__name__}.")
    if not x:
        raise ValueError(f"{what} is empty; every input and target needs at least one token.")
    return [int(i) for i in x]


def _item(data, i: int) -> tuple[Any, Any]:
    item = data[i]
    if isinstance(item, dict):
        try:
            return item["input"], item["target"]
        except KeyError:
            raise ValueError(f"data[{i}] is a dict without 'input' and 'target' keys (has {sorted(item)}).") from None
    if isinstance(item, (tuple, list)) and len(item) == 2:
        return item[0], item[1]
    raise TypeError(f"data[{i}] must be an (input, target) pair or a dict with 'input' and 'target', got {type(item).__name__}.")


@dataclass
class Pairs:
    """Tokenised ``(input, target)`` pairs (see the module docstring for the encoding). ``bos``: the
    BOS policy the text inputs were encoded with (``None`` when every input was given as ids)."""

    inputs: list[list[int]]
    targets: list[list[int]]
    pad_id: int = 0
    bos: bool | None = None

    @classmethod
    def from_data(cls, model, data, prepend_bos: bool | None = None) -> "Pairs":
        if isinstance(data, Pairs):
            return data
        if isinstance(data, (str, bytes)) or not hasattr(data, "__len__") or not hasattr(data, "__getitem__"):
            raise TypeError(
                "data must be a sequence or torch Dataset of (input, target) pairs (strings or token ids); "
                f"got {type(data).__name__}. (A task name selects a toy task: train_prefix(model, 'add1', n_pad, config).)"
            )
        if len(data) == 0:
            raise ValueError("data is empty: give at least one (input, target) pair.")
        inputs, targets, any_text = [], [], False
        for i in range(len(data)):
            x, y = _item(data, i)
            any_text = any_text or isinstance(x, str)
            inputs.append(encode(model, x, prepend_bos) if isinstance(x, str) else _ids(x, f"data[{i}] input"))
            targets.append(encode(model, y, False) if isinstance(y, str) else _ids(y, f"data[{i}] target"))
        vocab = int(model.cfg.d_vocab)
        bad = [i for i, (x, y) in enumerate(zip(inputs, targets)) if min(x + y) < 0 or max(x + y) >= vocab]
        if bad:
            raise ValueError(f"data rows {bad[:10]} have token ids outside [0, {vocab}).")
        tokenizer = getattr(model, "tokenizer", None)
        pad = getattr(tokenizer, "pad_token_id", None) if tokenizer is not None else None
        bos = (default_prepend_bos(model) if prepend_bos is None else bool(prepend_bos)) if any_text else None
        return cls(inputs, targets, 0 if pad is None else int(pad), bos)

    def __len__(self) -> int:
        return len(self.inputs)

    def max_length(self) -> int:
        return max(len(x) + len(y) for x, y in zip(self.inputs, self.targets)) - 1

    def digest(self) -> str:
        h = hashlib.sha256()
        for x, y in zip(self.inputs, self.targets):
            h.update(repr((x, y)).encode())
        return h.hexdigest()

    def batch(self, rows: Sequence[int], device=None) -> PairBatch:
        seqs = [self.inputs[i] + self.targets[i] for i in rows]
        width = max(len(s) for s in seqs)
        tokens = torch.full((len(seqs), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        is_target = torch.zeros((len(seqs), width), dtype=torch.bool)
        for r, (i, s) in enumerate(zip(rows, seqs)):
            tokens[r, width - len(s):] = torch.tensor(s)
            mask[r, width - len(s):] = 1
            is_target[r, width - len(self.targets[i]):] = True
        labels = tokens[:, 1:].masked_fill(~is_target[:, 1:], tasks.IGNORE)
        tokens, mask = tokens[:, :-1], mask[:, :-1]
        return PairBatch(tokens.to(device), None if bool(mask.all()) else mask.to(device), labels.to(device))

    def stream(self, batch_size: int, seed: int, start: int = 0, device=None) -> Iterator[PairBatch]:
        """Batches from step ``start`` on: the data in a fresh seeded order each epoch (a pure
        function of ``seed`` and the step, so a resumed run sees exactly the batches it would have)."""
        n = len(self)

        def order(epoch: int) -> list[int]:
            return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch)).tolist()

        pos = start * batch_size
        cached = None
        while True:
            rows = []
            while len(rows) < batch_size:
                e, k = divmod(pos, n)
                if cached is None or cached[0] != e:
                    cached = (e, order(e))
                rows.append(cached[1][k])
                pos += 1
            yield self.batch(rows, device)


# --------------------------------------------------------------------------------------------------
# the loss
# --------------------------------------------------------------------------------------------------


def pairs_loss(model, batch: PairBatch, prefix: Prefix | None = None, cache_prefix: bool | None = None) -> Tensor:
    """Mean cross-entropy of ``model`` (with ``prefix``) over the target tokens of ``batch``.

    A :class:`KVPrefix` runs as the key/value cache when ``cache_prefix`` (``None``: wherever the model
    supports it, :func:`~prefixlens.training.fast_kv.supports_cache_prefix`), else on placeholder slots."""
    if prefix is None:
        logits = logits_of(model, batch.tokens, None, batch.mask)
    elif isinstance(prefix, KVPrefix) and (supports_cache_prefix(model) if cache_prefix is None else cache_prefix):
        logits = logits_with_cache_prefix(model, batch.tokens, prefix, attention_mask=batch.mask)
    else:
        logits = run_with_prefix(model, batch.tokens, prefix, attention_mask=batch.mask)
    return lm_loss(logits, batch.labels)


# --------------------------------------------------------------------------------------------------
# the result
# --------------------------------------------------------------------------------------------------


@dataclass
class Trained:
    """What :func:`train_on_pairs` returns: the trained object, the run's history and its settings.

    ``trained``: a :class:`~prefixlens.Prefix` (``form`` kv/residual/soft; its ``content_bos`` is the BOS
    policy of the training inputs, ``settings["prepend_bos"]``), a detached
    :class:`~prefixlens.lora.LoRA` (``with result.lora: ...`` attaches it) or a fine-tuned copy of the
    model (``full``). ``result``: the :class:`TrainResult` (``losses`` per step, ``evals`` as
    ``[step, metrics]``). ``config`` and ``settings`` (length, init, ...) are what the run used.
    """

    form: str
    trained: Any
    result: TrainResult
    config: TrainConfig
    settings: dict = field(default_factory=dict)

    def _get(self, kinds: tuple[str, ...], what: str):
        if self.form not in kinds:
            raise AttributeError(f"this run trained form={self.form!r}; it has no {what}.")
        return self.trained

    @property
    def prefix(self) -> Prefix:
        return self._get(("kv", "residual", "soft"), "prefix")

    @property
    def lora(self) -> LoRA:
        return self._get(("lora",), "LoRA")

    @property
    def model(self):
        return self._get(("full",), "fine-tuned model")

    @property
    def losses(self) -> list[float]:
        return self.result.losses

    @property
    def evals(self) -> list:
        return self.result.evals


# --------------------------------------------------------------------------------------------------
# initialisation
# --------------------------------------------------------------------------------------------------


def _text_ids(model, init_text, length: int) -> list[int]:
    """``init_text``'s ids (no BOS), repeated or truncated to ``length`` (PEFT's ``TEXT`` init)."""
    if init_text is None:
        raise ValueError("init='text' needs init_text= (task words, e.g. 'Classify the sentiment of the word').")
    ids = encode(model, init_text, False) if isinstance(init_text, str) else _ids(init_text, "init_text")
    return (ids * math.ceil(length / len(ids)))[:length]


def initial_prefix(model, form: str, length: int, init, seed: int, init_text=None, init_scale: float | None = None) -> Prefix:
    """The starting prefix (a fresh, trainable copy): see ``init`` in the module docstring.

    Args:
        model (TransformerBridge): the model the prefix is for.
        form: ``"kv"``, ``"residual"`` or ``"soft"``.
        length: the number of slots.
        init (str | Prefix): ``"random"``, ``"zeros"``, ``"vocab"``, ``"text"``, or a prefix to copy.
        seed: the seed of a random start.
        init_text (str | Sequence[int] | None): the text (or ids) of ``init="text"``.
        init_scale: the standard deviation of a random start (default: per form).
    """
    cls = PREFIX_FORMS[form]
    if isinstance(init, Prefix):
        if not isinstance(init, cls):
            init = init.to_kv(model) if form == "kv" and hasattr(init, "to_kv") else init
        if not isinstance(init, cls):
            raise TypeError(f"init is a {init.form}, but form={form!r} trains a {cls.__name__}.")
        init.validate(model)
        return cls(**{n: getattr(init, n).detach().clone() for n in init.tensor_names}, signature=init.signature)
    if init == "random":
        return cls.random(model, length, seed=seed, **({} if init_scale is None else {"scale": init_scale}))
    if init == "zeros":
        return cls.zeros(model, length)
    if init == "vocab":
        ids = torch.randint(0, int(model.cfg.d_vocab), (length,), generator=torch.Generator().manual_seed(seed))
    elif init == "text":
        ids = torch.tensor(_text_ids(model, init_text, length))
    else:
        raise ValueError(f"init must be one of {INITS} or a Prefix, got {init!r}.")
    prompt = cls.from_prompt(model, ids.to(model_dtype_device(model)[1]))
    return cls(**{n: getattr(prompt, n).detach().clone() for n in prompt.tensor_names}, signature=prompt.signature)


# --------------------------------------------------------------------------------------------------
# the entry point
# --------------------------------------------------------------------------------------------------


def _describe(prefix: Prefix) -> str:
    """A given start prefix in the run id: its form and a digest of its values."""
    h = hashlib.sha256()
    for n in prefix.tensor_names:
        h.update(getattr(prefix, n).detach().double().cpu().numpy().tobytes())
    return f"{prefix.form} sha256:{h.hexdigest()[:16]}"


def _eval_loss(model, pairs: Pairs, prefix_fn, cache_prefix, batch_size: int) -> float:
    _, device = model_dtype_device(model)
    total, n = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(pairs), batch_size):
            b = pairs.batch(range(start, min(start + batch_size, len(pairs))), device)
            k = b.n_target_tokens
            total += float(pairs_loss(model, b, prefix_fn(), cache_prefix)) * k
            n += k
    return total / n


@restores_model_state(keep_frozen=False)
def train_on_pairs(
    model,
    data,
    *,
    form: str = "kv",
    config: TrainConfig | None = None,
    length: int = 10,
    init: str | Prefix = "random",
    init_text: str | Sequence[int] | None = None,
    init_scale: float | None = None,
    reparam: dict | None = None,
    rank: int = 1,
    targets: tuple[str, ...] | str = "reference",
    eval_fn: Callable[[int, Any], dict | float] | None = None,
    eval_data=None,
    cache_prefix: bool | None = None,
    prepend_bos: bool | None = None,
    name: str | None = None,
) -> Trained:
    """Train ``form`` (kv, residual, soft, lora, full) on ``(input, target)`` pairs; the loss covers
    the target tokens only. See the module docstring for the data, methods, initialisation and loop.

    ``config`` (default ``TrainConfig()``): steps, lr, batch size, seed, schedule, clipping, eval and
    checkpoint settings (``weight_decay=None``: 0.01, or 0.1 on the weight matrices for ``full``).
    ``length``/``init``/``init_text``/``init_scale``/``reparam``: the prefix (``reparam`` = Li & Liang's
    MLP, kv/residual, random init). ``rank``/``targets``: the LoRA. ``eval_fn(step, trained)`` returns
    metrics (run under ``torch.no_grad``); ``eval_data``: held-out pairs, adds ``eval_loss``.

    Args:
        model (TransformerBridge): the model to adapt.
        data (Sequence | Dataset): the ``(input, target)`` pairs (strings or ids, or ``{"input",
            "target"}`` dicts), or a torch ``Dataset`` of them.
        form: ``"kv"``, ``"residual"``, ``"soft"``, ``"lora"`` or ``"full"``.
        config: steps, learning rate, batch size, seed, schedule, evaluation and checkpoint settings.
        length: the number of prefix slots.
        init: how the prefix starts: ``"random"``, ``"zeros"``, ``"vocab"``, ``"text"``, or a prefix.
        init_text: the text (or ids) of ``init="text"``.
        init_scale: the standard deviation of a random start (default: per form).
        reparam: ``{"d_small": .., "hidden": ..}`` to train through Li & Liang's MLP.
        rank: the rank of each LoRA adapter (``form="lora"``).
        targets: the roles LoRA adapts, or ``"reference"`` / ``"mlp"``.
        eval_fn: ``eval_fn(step, trained)`` returns metrics to log (a dict or a number).
        eval_data (Sequence | Dataset | None): held-out pairs; their loss is logged as ``eval_loss``.
        cache_prefix: run a KV prefix as the model's key/value cache (``None``: wherever the model supports it).
        prepend_bos: give each input a BOS token (``None``: the model's default); recorded as the
            trained prefix's ``content_bos`` and ``settings["prepend_bos"]``.
        name: the run's name, which labels its progress bar and checkpoints (default: from the settings).

    Returns:
        The trained prefix (or adapters, or model copy) with its losses, evaluations and settings.
    """
    config = TrainConfig() if config is None else config
    config.validate()
    if form not in METHODS:
        raise ValueError(f"form must be one of {METHODS}, got {form!r}.")
    check_init_scale(init_scale)
    check_reparam(reparam)
    if reparam is not None and (form not in ("kv", "residual") or init != "random"):
        raise ValueError("reparam (Li & Liang's MLP) trains a kv or residual prefix from its own random init.")
    pairs = Pairs.from_data(model, data, prepend_bos)
    held_out = Pairs.from_data(model, eval_data, prepend_bos) if eval_data is not None else None
    _, device = model_dtype_device(model)
    P = length if form in PREFIX_FORMS else 0
    if isinstance(init, Prefix) and form in PREFIX_FORMS:
        P = init.length
    longest = max(pairs.max_length(), held_out.max_length() if held_out else 0)
    if P + longest > int(model.cfg.n_ctx):
        raise ValueError(f"prefix length {P} + the longest pair ({longest} tokens) exceeds the context of {int(model.cfg.n_ctx)}.")
    settings = {"length": P, "init": init if isinstance(init, str) else _describe(init), "init_scale": init_scale,
                "init_text": (_text_ids(model, init_text, P) if init == "text" else None), "reparam": reparam,
                "rank": rank if form == "lora" else None, "targets": targets if form == "lora" else None}

    model.requires_grad_(False)
    target, lora, holder = model, None, None
    get_prefix: Callable[[], Prefix | None] = lambda: None  # noqa: E731
    if form in PREFIX_FORMS:
        if reparam is not None:
            holder = PrefixMLP(model, P, form, seed=config.seed, **reparam)
            get_prefix = holder.prefix
        else:
            holder = initial_prefix(model, form, P, init, config.seed, init_text, init_scale)
            get_prefix = lambda: holder  # noqa: E731
        params = dict(holder.named_parameters())
    elif form == "lora":
        lora = add_lora(model, rank=rank, targets=targets, seed=config.seed)
        lora.remove()  # the run id fingerprints the base weights
        params = dict(lora.named_parameters())
    else:  # full: a copy, so the base stays untouched
        target = copy.deepcopy(model)
        target.requires_grad_(True)
        params = {n: p for n, p in target.named_parameters() if ".qkv." not in n}
    run = run_id(form, f"pairs:{pairs.digest()}", 0, config, model, {k: (str(v) if k == "targets" else v) for k, v in settings.items()})
    settings["prepend_bos"] = pairs.bos  # (the ids, hashed above, already differ with it)
    trained = holder if holder is not None else (lora if lora is not None else target)

    def with_policy(prefix):
        """The trained prefix, carrying the BOS policy of the text it trains on."""
        prefix.content_bos = pairs.bos
        return prefix

    if form in PREFIX_FORMS and reparam is None:
        with_policy(holder)

    def loss_fn(batch: PairBatch) -> Tensor:
        return pairs_loss(target, batch, get_prefix(), cache_prefix)

    def evaluation(step: int):
        metrics: dict[str, Any] = {}
        with torch.no_grad():
            if held_out is not None:
                metrics["eval_loss"] = _eval_loss(target, held_out, get_prefix, cache_prefix, config.batch_size)
            if eval_fn is not None:
                out = eval_fn(step, (with_policy(holder.export()) if reparam is not None else trained))
                metrics.update(out if isinstance(out, dict) else {"metric": float(out)})
        return metrics

    decay = (lambda n, p: p.ndim >= 2 and "wte" not in n and "wpe" not in n and "embed" not in n) if form == "full" else None
    weight_decay = config.weight_decay if config.weight_decay is not None else (0.1 if form == "full" else 0.01)
    if lora is not None:
        lora.attach()
    try:
        result = train_loop(
            params, loss_fn, lambda gen, start: pairs.stream(config.batch_size, config.seed, start, device),
            config, run, name or f"{form}-pairs",
            eval_fn=evaluation if (eval_fn is not None or held_out is not None) else None,
            decay=decay, weight_decay=weight_decay, set_mode=target.train if form == "full" else target.eval,
        )
    finally:
        if lora is not None:
            lora.remove()
    if reparam is not None:
        trained = with_policy(holder.export())
    for p in list(params.values()) + list(trained.parameters()):
        p.grad = None  # the last step's gradients are not part of the result
    trained.requires_grad_(False)
    if form == "full":
        target.eval()
    return Trained(form, trained, result, config, settings)
