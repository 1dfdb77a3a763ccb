"""Running a model with a prefix in place, through its HookPoints.

The model runs on ``[P placeholder tokens] + tokens``; the prefix's hooks overwrite the
placeholder positions ``0..P-1`` in every layer. Content token ``t`` therefore sits at position
``P + t``, exactly as after a real prompt of length ``P`` (the convention of PEFT and of the
reference code), so masks, rotary positions and grouped-query attention need no special handling.

**Padding.** ``run_with_prefix``, ``run_with_cache`` (and ``generate``, ``decompose``, the analysis
functions and training) take an ``attention_mask``: either content-length ``[B, T]`` (what PEFT users
pass; the slots are prepended as attended) or full ``[B, P + T]`` (its slot columns must be 1). The
model then runs on ``[slots] + tokens`` with the full mask, and derives positions from it as
HuggingFace does for padded batches (``cumsum(mask) - 1``): a row's real content tokens sit at
``P, P + 1, ...`` whichever side it is padded on, so every row gives what it gives alone. Outputs at
padded positions are undefined. A mask of another shape, with values other than 0/1, with a masked
slot, or with a row that has no real token is refused.

**Text.** Every entry point also takes a string or a list of strings (:mod:`prefixlens.text`): a
ragged list is left-padded and its mask flows into the machinery above. Content after a prefix gets
the BOS policy the prefix was trained with (``prefix.content_bos``), and no BOS for any other prefix (it
continues the prefix's prompt); an explicit ``prepend_bos=`` wins.

**No prefix.** ``prefix=None`` (in ``run_with_prefix``, ``run_with_cache``, ``generate``, ``decompose``,
``check_identities`` and the report figures) is the plain run with ``P = 0``: the same inputs, masks,
positions and return types, equal to ``model(tokens)``; text then starts the sequence and gets the
model's default BOS.

**User hooks.** The prefix's hooks are torch forward hooks placed before every TransformerLens hook of
their HookPoints: a user hook (``model.hooks``, ``add_hook``, ``run_with_hooks``, registered before or
inside the block) sees the activation with the prefix written, and its edits stick. At the content
positions that is exactly the real prompt's run; at the slots, the prompt's wherever the form fixes them.
TransformerLens's ``reset_hooks`` / ``remove_all_hook_fns`` / ``HookPoint.remove_hooks`` and a
``model.hooks()`` exit do not remove them; clearing a HookPoint's torch hooks directly does, and the
block's exit then raises.

**Threads.** The prefix acts only in the thread that attached it, and which prefix is attached is
recorded per thread (:mod:`prefixlens.runtime`): other threads run the model without it, or with their
own prefix. Hooks registered through TransformerLens itself act in every thread.

**One prefix at a time.** Prefixes do not nest: every prefix writes slots ``0..P-1``, so an
``attached`` block (or ``run_with_prefix``, ``generate``, ``decompose``) inside another ``attached``
block of the same thread is refused; build one prefix that holds both (e.g. ``from_prompt`` on the joined prompts). A
forward pass on top of a non-empty key/value cache inside ``attached`` (TransformerLens's own
``model.generate`` with its cache) is refused too, since the slot hooks would overwrite the new
tokens; use :func:`prefixlens.generate`, or ``model.generate(..., use_past_kv_cache=False)`` on
``slots.prepend(tokens)``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass

import torch
from jaxtyping import Float, Int, Integer, Shaped
from torch import Tensor
from transformer_lens import ActivationCache

from prefixlens.prefixes import Prefix
from prefixlens.runtime import (
    attached_prefix,
    cached_run,
    check_not_attached,
    check_token_ids,
    holding,
    set_attached,
    thread_hooks,
)
from prefixlens.text import tokens_and_mask

__all__ = [
    "Slots",
    "attached",
    "maybe_attached",
    "run_with_prefix",
    "run_with_cache",
    "check_tokens",
    "n_slots",
    "full_attention_mask",
    "full_position_ids",
    "attached_prefix",
    "check_not_attached",
]

PLACEHOLDER_TOKEN = 0
RETURN_TYPES = ("logits", "loss", "both", None)

# which prefix is attached to a model, per thread: ``prefixlens.runtime.attached_prefix`` (below the prefix
# forms, so that ``to_kv`` can refuse to run inside a block without importing this module)


@dataclass(frozen=True)
class Slots:
    """How positions map while a prefix is attached: slots ``0..n-1``, content from ``n`` on."""

    n: int
    placeholder: int = PLACEHOLDER_TOKEN

    def placeholders(self, batch: int, device=None) -> Int[Tensor, "batch n"]:
        return torch.full((batch, self.n), self.placeholder, dtype=torch.long, device=device)

    def prepend(self, tokens: Int[Tensor, "batch pos"]) -> Int[Tensor, "batch slots_and_pos"]:
        """``[placeholders] + tokens``: the input to give the model while the prefix is attached."""
        return torch.cat([self.placeholders(tokens.shape[0], tokens.device), tokens], dim=1)

    def content(self, activation: Tensor, dim: int = 1) -> Tensor:
        """Drop the slot positions from an activation (positions along ``dim``)."""
        return activation.narrow(dim, self.n, activation.shape[dim] - self.n)


def n_slots(prefix: Prefix | None) -> int:
    """``P``, the prefix's number of slots; 0 for ``prefix=None`` (the plain run)."""
    return 0 if prefix is None else prefix.length


def check_tokens(model, tokens, prefix: Prefix | None = None) -> Int[Tensor, "batch pos"]:
    """Validate content tokens (and a prefix against the model); returns ``[batch, pos]`` ids."""
    if prefix is not None:
        if not isinstance(prefix, Prefix):
            raise TypeError(
                f"expected a prefixlens prefix (KVPrefix, ResidualPrefix or SoftPrompt), got {type(prefix).__name__}."
            )
        prefix.validate(model)
    tokens = check_token_ids(model, tokens, prefix.length if prefix is not None else 0)
    if prefix is not None and prefix.batched and prefix.batch_size != tokens.shape[0]:
        raise ValueError(
            f"batch mismatch: the {prefix.form} holds {prefix.batch_size} prefixes but tokens have batch "
            f"{tokens.shape[0]}."
        )
    return tokens


def full_attention_mask(
    attention_mask, tokens: Int[Tensor, "batch pos"], n_slots: int
) -> Int[Tensor, "batch slots_and_pos"] | None:
    """The mask of ``[slots] + tokens`` from a content mask ``[B, T]`` or a full mask ``[B, P + T]``
    (1 = real token, 0 = padding); ``None`` when there is no padding at all (the unmasked run).

    Raises ``ValueError`` for a mask of another shape, values other than 0/1, a masked slot, or a
    row without a real content token.
    """
    if attention_mask is None:
        return None
    mask = torch.as_tensor(attention_mask)
    B, T = tokens.shape
    P = n_slots
    shapes = f"[batch, T] = {(B, T)}" + (f" or [batch, P + T] = {(B, P + T)}" if P else "")
    if mask.ndim != 2 or mask.shape[0] != B or mask.shape[1] not in (T, P + T):
        raise ValueError(
            f"attention_mask has shape {tuple(mask.shape)}; expected {shapes} (1 = real token, 0 = padding)."
        )
    if mask.device.type != tokens.device.type:
        raise ValueError(f"device mismatch: attention_mask is on {mask.device} but tokens are on {tokens.device}.")
    if not bool(((mask == 0) | (mask == 1)).all()):
        raise ValueError("attention_mask must hold only 0 (padding) and 1 (real token).")
    mask = mask.to(dtype=torch.long, device=tokens.device)
    if mask.shape[1] == P + T and P:
        if not bool(mask[:, :P].all()):
            raise ValueError(
                f"attention_mask masks a prefix slot (its first {P} columns must be 1: the prefix is always "
                f"attended); pass the content mask [batch, {T}] instead."
            )
    else:
        mask = torch.cat([mask.new_ones(B, P), mask], dim=1)
    empty = (~mask[:, P:].bool()).all(dim=1)
    if bool(empty.any()):
        raise ValueError(
            f"attention_mask row(s) {empty.nonzero().flatten().tolist()} have no real content token; "
            f"drop those rows."
        )
    return None if bool(mask.all()) else mask


def full_position_ids(position_ids, tokens: Int[Tensor, "batch pos"], n_slots: int) -> Int[Tensor, "batch slots_and_pos"] | None:
    """Positions of ``[slots] + tokens``. ``[B, T]`` (or ``[T]``) are content positions counted from the
    first content position, as PEFT takes them (it adds ``P``): content gets ``P + position_ids``, the
    slots ``0..P-1`` (the default is ``arange(T)``, i.e. ``P..P+T-1``). ``[B, P + T]`` is taken as it is."""
    if position_ids is None:
        return None
    pos = torch.as_tensor(position_ids)
    B, T = tokens.shape
    P = n_slots
    if pos.ndim == 1:
        pos = pos.expand(B, -1)
    if pos.ndim != 2 or pos.shape[0] != B or pos.shape[1] not in (T, P + T) or pos.is_floating_point():
        raise ValueError(
            f"position_ids must be integer [batch, T] = {(B, T)} (content positions) or [batch, P + T] = "
            f"{(B, P + T)}, got {tuple(pos.shape)} {pos.dtype}."
        )
    pos = pos.to(dtype=torch.long, device=tokens.device)
    if pos.shape[1] == T and P:
        pos = torch.cat([torch.arange(P, device=pos.device).expand(B, P), pos + P], dim=1)
    if int(pos.min()) < 0:
        raise ValueError(f"position_ids must be >= 0, got min {int(pos.min())}.")
    return pos


@contextmanager
def attached(model, prefix: Prefix, placeholder: int = PLACEHOLDER_TOKEN) -> Iterator[Slots]:
    """Attach ``prefix`` to ``model`` for the duration of a ``with`` block.

    Inside, call the model's own ``run_with_hooks`` / ``run_with_cache`` on ``slots.prepend(tokens)``:
    activations at positions ``slots.n:`` belong to the content. The hooks are removed on exit,
    also when the block raises; hooks the user attached before are left alone::

        with prefixlens.attached(model, prefix) as slots:
            logits, cache = model.run_with_cache(slots.prepend(tokens))
            content_resid = slots.content(cache["blocks.0.hook_resid_pre"])

    The prefix acts only in the thread that opened the block (other threads run the model without it),
    and it writes the slots before every other hook of its hook points, so user hooks see the slots as
    the prefix wrote them, whenever they were registered. TransformerLens's ``reset_hooks`` and friends
    do not remove it; the block does, on exit (see the module docstring).
    """
    if not isinstance(prefix, Prefix):
        raise TypeError(f"expected a prefixlens prefix, got {type(prefix).__name__}.")
    prefix.validate(model)
    check_not_attached(model, "attaching a prefix")
    # the whole block holds the model's lock (runs of one model take turns across threads), whose
    # forward pre-hook also refuses a cached step while this thread has the prefix attached
    with holding(model):
        set_attached(model, prefix)
        handles = []
        try:
            handles = prefix.position_hooks(model)  # a kept-positions KVPrefix places its slots and the content
            with thread_hooks(model, prefix.injection_hooks(model), first=True):
                yield Slots(prefix.length, placeholder)
        finally:
            for handle in handles:
                handle.remove()
            set_attached(model, None)


def maybe_attached(model, prefix: Prefix | None) -> AbstractContextManager[Slots]:
    """``attached(model, prefix)``, or no hooks and ``Slots(0)`` when ``prefix`` is ``None`` (refused
    inside an ``attached`` block, whose slots would overwrite the first content positions)."""
    if prefix is None:
        check_not_attached(model, "running without a prefix")
        return _plain(model)
    return attached(model, prefix)


@contextmanager
def _plain(model) -> Iterator[Slots]:
    """No prefix: no hooks, ``Slots(0)``, and the model held for the run (prefixlens's runs of one model
    take turns across threads; see :func:`prefixlens.runtime.holding`)."""
    with holding(model):
        yield Slots(0)


def _forward_kwargs(model, tokens, P: int, attention_mask, position_ids, kwargs: dict) -> tuple[dict, Tensor | None]:
    """The model's keyword arguments for ``[slots] + tokens`` and the content mask ``[B, T]`` (or None)."""
    for name in ("past_key_values", "start_at_layer"):
        if kwargs.get(name) is not None:
            raise ValueError(f"{name}= is not supported with a prefix (the slots must run first, at positions 0..P-1).")
    mask = full_attention_mask(attention_mask, tokens, P)
    positions = full_position_ids(position_ids, tokens, P)
    extra = dict(kwargs)
    if mask is not None:
        extra["attention_mask"] = mask
    if positions is not None:
        if int(positions.max()) >= int(model.cfg.n_ctx):
            raise ValueError(
                f"position_ids reach {int(positions.max())}, beyond the model's context of {int(model.cfg.n_ctx)}."
            )
        extra["position_ids"] = positions
    return extra, (mask[:, P:] if mask is not None else None)


def _check_return_type(return_type) -> None:
    if return_type not in RETURN_TYPES:
        raise ValueError(
            f"return_type={return_type!r} is not supported with a prefix; use one of {RETURN_TYPES} "
            f"('loss' covers the content positions only; for predictions take logits.argmax(-1))."
        )


def _finish(model, logits, tokens, content_mask, return_type, loss_per_token: bool):
    """Content logits → what ``return_type`` asks for (the loss over content positions only)."""
    if return_type is None:
        return None
    if return_type == "logits":
        return logits
    if tokens.shape[1] < 2:
        raise ValueError("return_type='loss' needs at least 2 content tokens (the loss predicts the next one).")
    loss = model.loss_fn(logits, tokens, attention_mask=content_mask, per_token=loss_per_token)
    return (logits, loss) if return_type == "both" else loss


def run_with_prefix(
    model,
    tokens: "Integer[Tensor, 'batch pos'] | Integer[Tensor, ' pos'] | str | list[str]",
    prefix: Prefix | None,
    attention_mask: Shaped[Tensor, "batch mask_pos"] | None = None,
    position_ids: Integer[Tensor, "batch position_pos"] | Integer[Tensor, " position_pos"] | None = None,
    return_type: str | None = "logits",
    loss_per_token: bool = False,
    prepend_bos: bool | None = None,
    **kwargs,
) -> (
    Float[Tensor, "batch pos d_vocab"]
    | Float[Tensor, ""]
    | Float[Tensor, "batch loss_pos"]
    | tuple[Float[Tensor, "batch pos d_vocab"], Float[Tensor, ""] | Float[Tensor, "batch loss_pos"]]
    | None
):
    """Logits at the content positions of ``model`` run with ``prefix`` before ``tokens``.

    Equals ``model(prompt + tokens)[:, P:]`` when ``prefix`` comes from ``from_prompt(model, prompt)``.
    ``tokens``: ids, a string or a list of strings (left-padded with a mask when ragged; see
    :mod:`prefixlens.text`). Text after a prefix is a continuation: ``prepend_bos=None`` uses the prefix's trained BOS policy (no BOS for an untrained prefix).
    ``attention_mask``: ``[B, T]`` (content) or ``[B, P + T]`` (full), see the module docstring.
    ``position_ids``: ``[B, T]`` content positions counted from the first content token (PEFT's
    convention: content token ``t`` sits at ``P + position_ids[:, t]``; default ``arange(T)``) or full
    ``[B, P + T]`` positions.
    ``return_type``: ``"logits"`` (content logits), ``"loss"`` (the model's own next-token loss over the
    content positions only: content token ``t`` predicting ``t + 1``, padding excluded, i.e. what
    ``model(prompt + tokens, loss_per_token=True)[:, P:]`` averages to), ``"both"`` or ``None``.
    Extra keyword arguments go to the model's forward.
    ``prefix=None`` is the plain run, the baseline of every comparison: ``model(tokens)`` with the same
    checks, masks, positions and return types; text is then the start of a sequence and gets the model's
    default BOS (as in :func:`prefixlens.generate` without a prefix and ``model(text)``).

    Args:
        model (TransformerBridge): the model to run.
        tokens: the content after the prefix: token ids ``[batch, pos]`` (or ``[pos]``), a string, or a
            list of strings.
        prefix: the prefix (any form) to run the content after; ``None``: no prefix (the plain run).
        attention_mask: 1 for real tokens, 0 for padding: ``[batch, pos]`` or ``[batch, P + pos]``.
        position_ids: content positions ``[batch, pos]`` counted from the first content token, or full
            positions ``[batch, P + pos]`` (default: ``arange(pos)`` after the slots).
        return_type: ``"logits"``, ``"loss"``, ``"both"`` or ``None``.
        loss_per_token: with a loss, return it per token ``[batch, pos - 1]`` instead of the mean.
        prepend_bos: give text content a BOS token after the prefix (default: the prefix's ``content_bos``, else no).
        **kwargs (Any): passed on to the model's forward.

    Returns:
        The content logits ``[batch, pos, d_vocab]``, the loss, ``(logits, loss)`` or ``None``, as
        ``return_type`` asks.
    """
    tokens, attention_mask = tokens_and_mask(model, tokens, attention_mask, prepend_bos, after=prefix)
    tokens = check_tokens(model, tokens, prefix)
    _check_return_type(return_type)
    extra, content_mask = _forward_kwargs(model, tokens, n_slots(prefix), attention_mask, position_ids, kwargs)
    with maybe_attached(model, prefix) as slots:
        logits = model(slots.prepend(tokens), **extra)
    return _finish(model, slots.content(logits), tokens, content_mask, return_type, loss_per_token)


def run_with_cache(
    model,
    tokens: "Integer[Tensor, 'batch pos'] | Integer[Tensor, ' pos'] | str | list[str]",
    prefix: Prefix | None,
    names_filter: Callable[[str], bool] | str | list[str] | None = None,
    attention_mask: Shaped[Tensor, "batch mask_pos"] | None = None,
    position_ids: Integer[Tensor, "batch position_pos"] | Integer[Tensor, " position_pos"] | None = None,
    return_type: str | None = "logits",
    loss_per_token: bool = False,
    prepend_bos: bool | None = None,
    **kwargs,
) -> tuple[
    Float[Tensor, "batch pos d_vocab"]
    | Float[Tensor, ""]
    | Float[Tensor, "batch loss_pos"]
    | tuple[Float[Tensor, "batch pos d_vocab"], Float[Tensor, ""] | Float[Tensor, "batch loss_pos"]]
    | None,
    ActivationCache | dict[str, Tensor],
]:
    """Content logits (or what ``return_type`` asks for, as in :func:`run_with_prefix`) and the
    ``ActivationCache`` of the prefixed run.

    The cache covers all ``P + T`` positions (slots first), so attention patterns keep their
    prefix columns; use ``cache[name][:, P:]`` for the content positions. With padding, the
    activations of padded positions are undefined. ``tokens`` and ``prepend_bos``: as in
    :func:`run_with_prefix` (text, no BOS by default).

    Args:
        model (TransformerBridge): the model to run.
        tokens: the content after the prefix: token ids ``[batch, pos]`` (or ``[pos]``), a string, or a
            list of strings.
        prefix: the prefix (any form) to run the content after; ``None``: no prefix (the plain run).
        names_filter: which hooks to cache: a predicate on the hook name, a name or a list of names
            (``None``: all).
        attention_mask: 1 for real tokens, 0 for padding: ``[batch, pos]`` or ``[batch, P + pos]``.
        position_ids: content positions ``[batch, pos]`` or full positions ``[batch, P + pos]``, as in
            :func:`run_with_prefix`.
        return_type: ``"logits"``, ``"loss"``, ``"both"`` or ``None``.
        loss_per_token: with a loss, return it per token ``[batch, pos - 1]`` instead of the mean.
        prepend_bos: give text content a BOS token after the prefix (default: the prefix's ``content_bos``, else no).
        **kwargs (Any): passed on to the model's forward (the cache is prefixlens's own, whose hooks act
            in this thread only: ``model.run_with_cache``'s own options such as ``pos_slice`` do not apply).

    Returns:
        ``(output, cache)``: what ``return_type`` asks for, as in :func:`run_with_prefix`, and the
        activation cache over all ``P + pos`` positions.
    """
    tokens, attention_mask = tokens_and_mask(model, tokens, attention_mask, prepend_bos, after=prefix)
    tokens = check_tokens(model, tokens, prefix)
    _check_return_type(return_type)
    extra, content_mask = _forward_kwargs(model, tokens, n_slots(prefix), attention_mask, position_ids, kwargs)
    names = _hook_names(model, names_filter)
    with maybe_attached(model, prefix) as slots:
        logits, cache = cached_run(model, slots.prepend(tokens), names, **extra)
    output = _finish(model, slots.content(logits), tokens, content_mask, return_type, loss_per_token)
    return output, ActivationCache(cache, model, has_batch_dim=True)


def _hook_names(model, names_filter: Callable[[str], bool] | str | list[str] | None) -> list[str]:
    """The hook points a ``names_filter`` selects (as ``model.run_with_cache`` takes it: a predicate on
    the name, a name, a list of names, or ``None`` for all); a name that is no hook point is refused."""
    if names_filter is None:
        return list(model.hook_dict)
    if isinstance(names_filter, str):
        names_filter = [names_filter]
    if isinstance(names_filter, (list, tuple, set, frozenset)):
        unknown = [n for n in names_filter if n not in model.hook_dict]
        if unknown:
            raise KeyError(f"names_filter names {unknown}, which are not hook points of this model (see model.hook_dict).")
        return list(names_filter)
    if callable(names_filter):
        return [n for n in model.hook_dict if names_filter(n)]
    raise TypeError(f"names_filter must be a callable, a name, a list of names or None, got {type(names_filter).__name__}.")
