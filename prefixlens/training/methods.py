"""The training methods on the toy tasks: full training, prefix / prompt tuning and LoRA.

Every method runs the model through the ``TransformerBridge``; prefix methods attach the prefix's
hooks (:func:`prefixlens.attached`) with the base model frozen (``requires_grad_(False)``), so the
backward pass computes no weight gradients. Full training runs the model in train mode (the HF
modules apply the dropout the model was built with); prefix and LoRA training run it in eval mode.
Reference defaults (see docs/concepts/training.md, "Training"): AdamW betas (0.9, 0.95); weight decay 0.1
on the weight matrices for full training (embeddings, norms and biases excluded), the torch default
0.01 for prefixes and LoRA; grad-norm clip 1.0; batch 64.

:func:`train_prefix` is also the entry point for training on your own ``(input, target)`` pairs
(:func:`prefixlens.training.pairs.train_on_pairs`): a task name (a string) selects the toy task,
anything else is data.
"""

from __future__ import annotations

from torch import Tensor, nn

from prefixlens.lora import LoRA, add_lora
from prefixlens.prefixes import FORMS, Prefix
from prefixlens.signature import signature_of
from prefixlens.training.checkpoints import run_id
from prefixlens.training.config import TrainConfig, TrainResult, check_init_scale, check_reparam
from prefixlens.training.evaluation import evaluate, validation_batch
from prefixlens.training.loss import batch_loss
from prefixlens.training.reparametrisation import PrefixMLP
from prefixlens.training.state import freeze, restores_model_state
from prefixlens.training.trainer import fit

__all__ = ["PREFIX_FORMS", "prefix_parameter_count", "train_model", "train_prefix", "train_prefix_on_task", "train_lora"]

PREFIX_FORMS = FORMS  # the one registry of prefix forms (prefixlens.prefixes.FORMS): "kv", "residual", "soft"


def prefix_parameter_count(model, length: int, form: str = "residual") -> int:
    """Scalars in a prefix of ``length`` slots: ``L·P·d`` (residual), ``2·L·P·n_kv·d_head`` (kv), ``P·d`` (soft)."""
    s = signature_of(model)
    return {
        "residual": s.n_layers * length * s.d_model,
        "kv": 2 * s.n_layers * length * s.n_kv_heads * s.d_head,
        "soft": length * s.d_model,
    }[form]


def _teacher_forced(model, val, prefix_fn=lambda: None):
    return (lambda: evaluate(model, val, prefix_fn(), method="teacher_forced").mean) if val is not None else None


@restores_model_state(keep_frozen=False)
def train_model(model, task: str, n_pad: int, config: TrainConfig, name: str = "train") -> TrainResult:
    """Pretraining or full fine-tuning: every used weight of ``model`` is trained (in place).

    The model runs in train mode (HF dropout as built); weight decay goes to weight matrices only.
    The bridge's fused ``qkv`` copy (unused in its forward) gets no gradient and is not trained.
    Afterwards (also on an error) every parameter's ``requires_grad`` and ``.grad``, every module's
    train/eval mode and the global RNG are as they were before the call; only the weights changed.

    Args:
        model (TransformerBridge): the model to train, in place.
        task: the toy task's name (or ``"mixture"``).
        n_pad: the number of pad tokens before each input.
        config: steps, learning rate, batch size, seed, evaluation and checkpoint settings.
        name: the run's name, which labels its progress bar and checkpoints.
    """
    config.validate()
    model.requires_grad_(True)
    params = {n: p for n, p in model.named_parameters() if ".qkv." not in n}
    run = run_id("full", task, n_pad, config, model, {})
    val = validation_batch(task, n_pad, config) if config.eval_every else None

    def decay(n: str, p: Tensor) -> bool:
        return p.ndim >= 2 and "wte" not in n and "wpe" not in n and "embed" not in n

    return fit(  # @restores_model_state puts the caller's modes and flags back
        params, lambda batch: batch_loss(model, batch), task, n_pad, config, run, name,
        eval_fn=_teacher_forced(model, val), decay=decay,
        weight_decay=0.1 if config.weight_decay is None else config.weight_decay,
        set_mode=model.train,
    )


def train_prefix(model, task_or_data, *args, **kwargs):
    """Prefix-tune, prompt-tune (or LoRA / fully fine-tune) ``model``.

    - ``train_prefix(model, task: str, n_pad, config, form=..., ...)``: a toy task by name
      (:func:`train_prefix_on_task`); returns ``(prefix, TrainResult)``.
    - ``train_prefix(model, data, form=..., ...)``: ``(input, target)`` pairs of strings or ids, or a
      torch ``Dataset`` of them (:func:`prefixlens.training.pairs.train_on_pairs`); returns a
      :class:`~prefixlens.training.pairs.Trained`.

    Args:
        model (TransformerBridge): the model to adapt.
        task_or_data (str | Sequence | Dataset): a toy task's name, or the training pairs.
        *args (Any): passed on to :func:`train_prefix_on_task` (toy task) or
            :func:`~prefixlens.training.pairs.train_on_pairs` (data).
        **kwargs (Any): passed on likewise.

    Returns:
        trained (tuple[Prefix, TrainResult] | Trained): ``(prefix, result)`` for a toy task; a
            :class:`~prefixlens.training.pairs.Trained` for data.
    """
    if isinstance(task_or_data, str):
        return train_prefix_on_task(model, task_or_data, *args, **kwargs)
    from prefixlens.training.pairs import train_on_pairs

    return train_on_pairs(model, task_or_data, *args, **kwargs)


@restores_model_state(keep_frozen=True)
def train_prefix_on_task(
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
    or prompt-tune (``"soft"``) the frozen ``model`` on the toy ``task``.

    ``length`` defaults to ``n_pad``; a shorter prefix leaves real pad tokens after it.
    ``init_scale``: standard deviation of the initial prefix (default: 1 for residual, as the
    reference's ``randn``; the embedding std for soft prompts; 1 for kv).
    ``reparam={"d_small": .., "hidden": ..}`` trains Li & Liang's MLP reparametrisation instead and
    returns the exported prefix. The model is frozen (``requires_grad_(False)``) and left frozen;
    it trains in eval mode, and its modes, its parameters' ``.grad`` and the global RNG are restored
    afterwards (on an error the ``requires_grad`` flags too).

    Args:
        model (TransformerBridge): the frozen model.
        task: the toy task's name.
        n_pad: the number of pad tokens before each input (the room for the prefix).
        config: steps, learning rate, batch size, seed, evaluation and checkpoint settings.
        form: ``"residual"``, ``"kv"`` or ``"soft"``.
        length: the number of prefix slots (default ``n_pad``).
        init_scale: the standard deviation of the initial prefix (default: per form, see above).
        reparam: ``{"d_small": .., "hidden": ..}`` to train through Li & Liang's MLP.
        name: the run's name, which labels its progress bar and checkpoints (default: from the settings).

    Returns:
        ``(prefix, result)``: the trained prefix and the training log.
    """
    config.validate()
    if form not in PREFIX_FORMS:
        raise ValueError(f"form must be one of {list(PREFIX_FORMS)}, got {form!r}.")
    check_init_scale(init_scale)
    check_reparam(reparam)
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
    run = run_id("prefix", task, n_pad, config, model, {"form": form, "length": length, "init_scale": init_scale, "reparam": reparam})
    val = validation_batch(task, n_pad, config) if config.eval_every else None
    result = fit(
        params, lambda batch: batch_loss(model, batch, get_prefix()), task, n_pad, config, run, name,
        eval_fn=_teacher_forced(model, val, get_prefix),
        weight_decay=0.01 if config.weight_decay is None else config.weight_decay,
        set_mode=model.eval,
    )
    prefix = holder.export() if reparam is not None else holder
    prefix.requires_grad_(False)
    for p in list(holder.parameters()) + list(prefix.parameters()):
        p.grad = None  # the last step's gradients are not part of the result
    return prefix, result


@restores_model_state(keep_frozen=True)
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

    Args:
        model (TransformerBridge): the frozen model.
        task: the toy task's name.
        n_pad: the number of pad tokens before each input.
        config: steps, learning rate, batch size, seed, evaluation and checkpoint settings.
        rank: the rank of each adapter.
        targets: the roles to adapt, or ``"reference"`` / ``"mlp"`` (see :mod:`prefixlens.lora`).
        name: the run's name, which labels its progress bar and checkpoints (default: from the settings).

    Returns:
        ``(lora, result)``: the attached adapters and the training log.
    """
    config.validate()
    freeze(model)
    model.eval()
    lora = add_lora(model, rank=rank, targets=targets, seed=config.seed)
    name = name or f"lora-r{rank}-{task}"
    params = {n: p for n, p in lora.named_parameters()}
    lora.remove()  # the run id fingerprints the base weights
    run = run_id("lora", task, n_pad, config, model, {"rank": rank, "targets": list(lora.targets)})
    lora.attach()
    val = validation_batch(task, n_pad, config) if config.eval_every else None
    try:
        result = fit(
            params, lambda batch: batch_loss(model, batch), task, n_pad, config, run, name,
            eval_fn=_teacher_forced(model, val),
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
