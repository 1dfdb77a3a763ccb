"""One checked way to run a model on top of its HuggingFace key/value cache.

Generation (after its first step) and the shared-pads training forward both run the model on new
tokens with the keys and values of earlier positions taken from a cache. A cache that silently
stays empty gives believable, wrong numbers (every new token attends to itself alone), so every
step goes through :func:`cached_forward`, which checks that the cache grew by exactly the number
of tokens it was given and raises :class:`KVCacheError` otherwise.

transformers 5.24 renamed the cache argument that a model hands its attention layers from
``past_key_values=`` to ``cache=``; TransformerLens 4.3's bridge attention reads only the old
name, so on 5.24 its cache came back empty. A keyword pre-hook on every bridge attention module
hands it the cache under both names, which is right on either side of the rename: bridges that
:mod:`prefixlens.models` builds carry it for good (:func:`hand_cache_to_bridge_attention`, so the
bridge's own cached ``generate`` and a PEFT model sharing the HF modules are right too), and on any
other bridge :func:`cached_forward` installs it for the call only.
"""

from __future__ import annotations

import threading
import warnings
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from importlib import metadata
from typing import Any

from jaxtyping import Float, Int
from torch import Tensor, nn

__all__ = ["KVCacheError", "cached_forward", "check_cache_grew", "cache_length", "has_kv_cache", "hand_cache_to_bridge_attention"]


class KVCacheError(RuntimeError):
    """The model's key/value cache does not hold the positions it should."""


def has_kv_cache(model) -> bool:
    """Whether the model returns a key/value cache (HF-backed bridges do; TL-native ones do not)."""
    return getattr(model.cfg, "architecture", None) != "TransformerLensNative" and hasattr(model, "original_model")


def cache_length(cache: Any) -> int | None:
    """Number of positions a HuggingFace cache holds (``None`` for no cache)."""
    return None if cache is None else int(cache.get_seq_length())


def _hand_cache_under_both_names(module: nn.Module, args: tuple, kwargs: dict[str, Any]):
    if kwargs.get("cache") is not None and kwargs.get("past_key_values") is None:
        return args, {**kwargs, "past_key_values": kwargs["cache"]}
    return None


def _bridge_attention(model) -> list[nn.Module]:
    return [m for m in model.modules() if hasattr(m, "_update_kv_cache")]


def _hands_cache_over(module: nn.Module) -> bool:
    return any(h is _hand_cache_under_both_names for h in module._forward_pre_hooks.values())


def hand_cache_to_bridge_attention(model):
    """Make every bridge attention module of ``model`` see the cache under ``past_key_values`` too,
    for good (idempotent; returns ``model``). Applied by :mod:`prefixlens.models` to the bridges it
    builds."""
    for module in _bridge_attention(model):
        if not _hands_cache_over(module):
            module.register_forward_pre_hook(_hand_cache_under_both_names, with_kwargs=True)
    return model


_HANDOVER_LOCK = threading.Lock()
_HANDOVER: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> [open blocks, hook handles]


@contextmanager
def _bridge_attention_reads_cache(model) -> Iterator[None]:
    """Make every bridge attention module see the cache under ``past_key_values`` too, for this block.

    Blocks open in several threads at once share the hooks: the first installs them, the last removes
    them (so one thread's generation never loses them while another's runs)."""
    with _HANDOVER_LOCK:
        state = _HANDOVER.get(model)
        if state is None:
            attention = [m for m in _bridge_attention(model) if not _hands_cache_over(m)]
            handles = [m.register_forward_pre_hook(_hand_cache_under_both_names, with_kwargs=True) for m in attention]
            state = _HANDOVER[model] = [0, handles]
        state[0] += 1
    try:
        with warnings.catch_warnings():
            # The bridge hands HF `past_key_values=`, which transformers >= 5.24 renames (with a warning).
            warnings.filterwarnings("ignore", message=r".*past_key_values.*deprecated", category=FutureWarning)
            yield
    finally:
        with _HANDOVER_LOCK:
            state[0] -= 1
            if state[0] == 0:
                del _HANDOVER[model]
                for handle in state[1]:
                    handle.remove()


def _versions() -> str:
    def version(name: str) -> str:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return "not installed"

    return f"transformers {version('transformers')}, transformer-lens {version('transformer-lens')}"


def check_cache_grew(cache: Any, before: int, n_new: int) -> None:
    """Raise :class:`KVCacheError` unless ``cache`` holds ``before + n_new`` positions after a step."""
    expected = before + n_new
    got = cache_length(cache)
    if got != expected:
        raise KVCacheError(
            f"the model's key/value cache holds {got} positions after this step, expected {expected} "
            f"({before} cached + {n_new} new). The model did not write its keys and values to the "
            f"cache, so later tokens would attend to nothing before them and the results would be silently "
            f"wrong. Installed: {_versions()}. Install the tested versions (`pip install -c constraints.txt -e .` "
            f"in a prefixlens checkout), or turn the cache off: `generate(..., use_cache=False)` recomputes the "
            f"sequence at every step, and `share_pads=False` does the same in training."
        )


def cached_forward(
    model, tokens: Int[Tensor, "batch pos"], cache: Any = None, **kwargs
) -> tuple[Float[Tensor, "batch pos d_vocab"], Any]:
    """Logits of ``tokens`` run after the positions held in ``cache`` (none: from the start), and
    the cache extended by them.

    Raises :class:`KVCacheError` unless the returned cache holds exactly the previous positions
    plus ``tokens.shape[1]``. Extra keyword arguments go to the model's forward; hooks attached to
    the model (a prefix, ``run_with_hooks``) fire as usual.
    """
    before = cache_length(cache) or 0
    with _bridge_attention_reads_cache(model):
        logits, new_cache = model(tokens, past_key_values=cache, return_type="logits_and_cache", **kwargs)
    check_cache_grew(new_cache, before, tokens.shape[1])
    return logits, new_cache
