"""What running a model needs below the prefix forms: token-id checks, eval mode, which prefix is
attached, and hooks that act in one thread only.

A low-level module: it imports nothing of prefixlens but :mod:`prefixlens.signature`, so that
:mod:`prefixlens.prefixes` (``from_prompt``, ``to_kv``) and the machinery above it
(:mod:`prefixlens.injection`, :mod:`prefixlens.decomposition`, ...) share one copy of each without
the prefix forms importing the modules that run them. The public names are re-exported where they
were first defined (``prefixlens.injection.check_tokens`` wraps :func:`check_token_ids`;
``evaluation_mode`` is importable from :mod:`prefixlens.decomposition`; ``attached_prefix`` and
``check_not_attached`` from :mod:`prefixlens.injection`).

**Threads.** A model's hooks are model state, shared by every thread that runs it. Every hook
prefixlens registers (the prefix's, and those of its own caching and patching runs) goes through
:func:`thread_hooks`: it acts only in the thread that registered it and is removed by its own handle,
so a plain ``model(x)`` in another thread is untouched and two threads with two prefixes each get
their own exact answer. Which prefix is attached is recorded per thread too. Hooks registered through
TransformerLens itself (``model.hooks``, ``run_with_hooks``, ``add_hook``, ``model.run_with_cache``)
still act in every thread: that is TransformerLens's design, outside prefixlens's reach. And since the
bridge itself keeps per-call state on its modules, prefixlens's runs of one model take turns across
threads, and a plain forward pass from another thread during one is refused with an error naming the
threads (:func:`holding`): concurrent calls are correct or refused, never wrong; for parallelism, one
model per thread.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from jaxtyping import Int
from torch import Tensor

from prefixlens.signature import model_dtype_device, module_roots

__all__ = [
    "check_token_ids",
    "evaluation_mode",
    "attached_prefix",
    "check_not_attached",
    "set_attached",
    "thread_hooks",
    "model_lock",
    "holding",
    "cached_run",
]

_LOCK = threading.Lock()  # guards the edits of HookPoints' hook lists by thread_hooks
_MODEL_LOCKS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> RLock (see model_lock)
_EVAL: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> [open evaluation_mode blocks, saved modes]
_LOCAL = threading.local()  # per thread: .attached, model -> the prefix an open ``attached`` block holds


def _attached_here() -> weakref.WeakKeyDictionary:
    """This thread's ``model -> attached prefix`` map."""
    attached = getattr(_LOCAL, "attached", None)
    if attached is None:
        attached = _LOCAL.attached = weakref.WeakKeyDictionary()
    return attached


def set_attached(model, prefix) -> None:
    """Record (``prefix``) or forget (``None``) the prefix attached to ``model`` in this thread."""
    if prefix is None:
        _attached_here().pop(model, None)
    else:
        _attached_here()[model] = prefix


def check_token_ids(model, tokens, n_slots: int = 0) -> Int[Tensor, "batch pos"]:
    """Validate content token ids for ``model`` (after ``n_slots`` prefix slots); returns ``[batch, pos]`` ids.

    Integer ids of shape ``[pos]`` or ``[batch, pos]``, non-empty, on the model's device type, in the
    vocabulary, and fitting the context together with the slots."""
    if not isinstance(tokens, Tensor):
        tokens = torch.as_tensor(tokens)
    if tokens.dtype.is_floating_point or tokens.dtype == torch.bool:
        raise TypeError(f"tokens must be integer ids, got dtype {tokens.dtype}.")
    if tokens.ndim == 1:
        tokens = tokens[None]
    if tokens.ndim != 2:
        raise ValueError(f"tokens must be [pos] or [batch, pos], got shape {tuple(tokens.shape)}.")
    if tokens.numel() == 0:
        raise ValueError(f"empty input: tokens has shape {tuple(tokens.shape)}; give at least one content token.")
    _, device = model_dtype_device(model)
    if tokens.device.type != device.type:
        raise ValueError(f"device mismatch: tokens are on {tokens.device} but the model is on {device}.")
    n_ctx = int(model.cfg.n_ctx)
    P = n_slots
    if P + tokens.shape[1] > n_ctx:
        raise ValueError(
            f"prefix length {P} + input length {tokens.shape[1]} = {P + tokens.shape[1]} exceeds the model's "
            f"context of {n_ctx} positions; shorten the input or the prefix."
        )
    vocab = int(model.cfg.d_vocab)
    if int(tokens.min()) < 0 or int(tokens.max()) >= vocab:
        raise ValueError(f"token ids must lie in [0, {vocab}), got min {int(tokens.min())}, max {int(tokens.max())}.")
    return tokens


@contextmanager
def evaluation_mode(model) -> Iterator[None]:
    """Run ``model`` in eval mode (dropout off) inside the block, then give every submodule back its
    own mode exactly (also those of a bridge's ``original_model``, which ``.modules()`` misses).

    Every analysis entry point (:func:`~prefixlens.decompose`, ``prefixed_scores``, ``from_prompt``,
    the ``prefixlens.analysis`` functions) measures the model's deterministic function this way: with
    dropout the model's own ``hook_z`` is a random draw and no decomposition of it is exact.

    Blocks open in several threads at once share one saving of the modes: the first to enter saves
    them, the last to leave restores them (train/eval mode is model state, the same in every thread).
    """
    with _LOCK:
        state = _EVAL.get(model)
        if state is None:
            modules = {id(m): m for root in module_roots(model) for m in root.modules()}
            state = _EVAL[model] = [0, [(m, m.training) for m in modules.values()]]
            for m, _ in state[1]:
                m.training = False
        state[0] += 1
    try:
        yield
    finally:
        with _LOCK:
            state[0] -= 1
            if state[0] == 0:
                del _EVAL[model]
                for m, training in state[1]:
                    m.training = training


def attached_prefix(model):
    """The prefix an open :func:`prefixlens.attached` block of this thread has attached to ``model``
    (``None``: none; a block in another thread does not act here)."""
    return _attached_here().get(model)


def check_not_attached(model, what: str) -> None:
    """Refuse to run ``what`` while this thread has a prefix attached (its hooks would overwrite content
    positions). A prefix attached in another thread does not act in this one and is no obstacle."""
    outer = _attached_here().get(model)
    if outer is not None:
        raise RuntimeError(
            f"{what} inside a `prefixlens.attached` block of this thread: a {outer.form} (P={outer.length}) is "
            f"already attached to this model, and prefixes do not nest (each writes slots 0..P-1, so the second would overwrite "
            f"content positions of the first). Leave the block first, or use one prefix that holds both "
            f"(e.g. from_prompt on the joined prompts)."
        )


def _hook_point(model, name: str):
    hp = model.hook_dict.get(name)
    if hp is None:
        raise KeyError(f"{name!r} is not a hook point of this model (see model.hook_dict).")
    return hp


def _this_thread_only(hp, fn: Callable, owner: int, direct: bool) -> Callable:
    """``fn(activation, hook)`` acting only in thread ``owner``: a TransformerLens hook function, or
    (``direct``) a raw torch forward hook that applies the HookPoint's conversion as TransformerLens does."""
    if not direct:
        def tl_hook(act, hook):
            return fn(act, hook=hook) if threading.get_ident() == owner else None

        return tl_hook

    def torch_hook(module, args, output):
        if threading.get_ident() != owner:
            return None
        conversion = hp.hook_conversion
        result = fn(conversion.convert(output) if conversion is not None else output, hook=hp)
        if result is not None and conversion is not None:
            result = conversion.revert(result)
        return result

    return torch_hook


def model_lock(model) -> threading.RLock:
    """The lock that makes prefixlens's runs of ``model`` take turns across threads (re-entrant: one
    thread's nested runs do not wait for themselves). See :func:`holding`."""
    with _LOCK:
        lock = _MODEL_LOCKS.get(model)
        if lock is None:
            lock = _MODEL_LOCKS[model] = threading.RLock()
    return lock


def _guard(owner: int) -> Callable:
    def guard(module, args, kwargs=None):  # kwargs=None: also safe if torch calls it while it is being added
        if threading.get_ident() != owner:
            raise RuntimeError(
                f"this model is running a prefixlens call in another thread (thread {owner}), and a forward pass "
                f"of it in this thread (thread {threading.get_ident()}) would interleave with it: a TransformerBridge "
                "is not thread-safe (its modules keep per-call state), so the two passes would corrupt each other. "
                "Run it through prefixlens (prefixlens calls on one model take turns by themselves: "
                "prefixlens.run_with_prefix(model, x, None) is the plain run), wait for the other thread, or give "
                "each thread its own copy of the model (copy.deepcopy(model))."
            )
        if kwargs and kwargs.get("past_key_values") is not None and attached_prefix(module) is not None:
            raise RuntimeError(
                "a forward pass on top of a key/value cache inside `prefixlens.attached`: the prefix hooks would "
                "overwrite the new tokens with prefix slots (e.g. TransformerLens's model.generate with its cache). "
                "Use prefixlens.generate(model, tokens, prefix), or model.generate(slots.prepend(tokens), "
                "use_past_kv_cache=False) inside the block."
            )
        return None

    return guard


_HELD: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> [depth, guard handle]


@contextmanager
def holding(model) -> Iterator[None]:
    """Hold ``model`` for a prefixlens run in this thread.

    TransformerLens's bridge keeps per-call state on its modules during a forward pass, so two threads
    running one model at once corrupt each other's pass even with no hook involved (measured: a plain
    ``model(x)`` crashing on another thread's batch size). So prefixlens's runs of one model take turns
    (:func:`model_lock`), and while one is running, a forward pre-hook on the model refuses a forward
    pass from any other thread with an error naming both threads (rather than a wrong number); the same
    hook refuses a forward pass on a key/value cache while this thread has a prefix attached. The hook
    is removed when the outermost run ends: nothing is left on the model.
    """
    with model_lock(model):
        state = _HELD.get(model)
        if state is None:
            handle = model.register_forward_pre_hook(_guard(threading.get_ident()), with_kwargs=True)
            state = _HELD[model] = [0, handle]
        state[0] += 1
        try:
            yield
        finally:
            state[0] -= 1
            if state[0] == 0:
                state[1].remove()
                del _HELD[model]


@contextmanager
def thread_hooks(model, fwd_hooks: Sequence[tuple[str, Callable]], first: bool = False) -> Iterator[None]:
    """Forward hooks ``(hook_name, fn(activation, hook))`` for this block that act only in the calling thread.

    ``first=False``: registered through TransformerLens (``HookPoint.add_hook``, so the model sees that the
    point is hooked), run in registration order with the user's hooks, and removed by their own handles on
    exit (never by another thread's exit, nor by a ``model.hooks()`` context's). ``first=True`` (a prefix's
    writers): torch forward hooks placed before every TransformerLens hook of the point, so that any user
    hook, whenever and however registered, sees the activation with the prefix written; TransformerLens's
    ``reset_hooks`` / ``remove_all_hook_fns`` / ``HookPoint.remove_hooks`` (with ``including_permanent`` or
    not) do not see them and cannot remove them.
    """
    with holding(model):  # runs of one model take turns across threads (see holding)
        yield from _thread_hooks(model, fwd_hooks, first)


def _thread_hooks(model, fwd_hooks: Sequence[tuple[str, Callable]], first: bool) -> Iterator[None]:
    owner = threading.get_ident()
    added: list[tuple[str, Any, Any]] = []  # (name, HookPoint, LensHandle) or (name, HookPoint, torch handle)

    def remove() -> list[str]:
        """Remove every hook; the names of ``first`` hooks that were already gone (removed at the torch level)."""
        lost = []
        with _LOCK:
            for name, hp, handle in added:
                if first:
                    if handle.id not in hp._forward_hooks:
                        lost.append(name)
                    handle.remove()
                else:
                    handle.hook.remove()
                    hp.fwd_hooks = [h for h in hp.fwd_hooks if h is not handle]
        return lost

    try:
        for name, fn in fwd_hooks:
            hp = _hook_point(model, name)
            with _LOCK:
                if first:
                    handle = hp.register_forward_hook(_this_thread_only(hp, fn, owner, True), prepend=True)
                else:
                    handle = hp.add_hook(_this_thread_only(hp, fn, owner, False))
                added.append((name, hp, handle))
        yield
    except BaseException:
        remove()
        raise
    lost = remove()
    if lost:
        raise RuntimeError(
            f"the hooks prefixlens placed at {lost[:3]}{' ...' if len(lost) > 3 else ''} were removed inside the "
            f"block by something other than TransformerLens (e.g. HookPoint._forward_hooks.clear()), so forward "
            f"passes after that ran without them (without the prefix) and their results are wrong. Remove hooks "
            f"with TransformerLens's own calls (model.reset_hooks(), which leaves prefixlens's alone) or leave "
            f"the block first."
        )


def cached_run(model, tokens: Tensor, names: Sequence[str], **kwargs) -> tuple[Any, dict[str, Tensor]]:
    """``model(tokens, **kwargs)`` and the (detached) activations at the hook points ``names``, cached by
    hooks that act in this thread only (unlike ``model.run_with_cache``, whose hooks act in every thread)."""
    cache: dict[str, Tensor] = {}

    def saver(name: str) -> Callable:
        def save(act, hook):
            cache[name] = act.detach()

        return save

    with thread_hooks(model, [(n, saver(n)) for n in dict.fromkeys(names)]):
        out = model(tokens, **kwargs)
    return out, cache
