"""Batched generation with a prefix, using the model's key/value cache after the first step."""

from __future__ import annotations

import functools
import inspect
from collections.abc import Sequence

import torch
from jaxtyping import Float, Int, Integer, Shaped
from torch import Tensor
from tqdm.auto import tqdm

from prefixlens.injection import check_not_attached, check_tokens, full_attention_mask, maybe_attached
from prefixlens.kv_cache import _bridge_attention_reads_cache, check_cache_grew, has_kv_cache
from prefixlens.prefixes import Prefix
from prefixlens.runtime import holding
from prefixlens.text import decode, tokens_and_mask

__all__ = ["generate", "sample_next", "check_sampling", "row_seed"]


def sample_next(
    logits: Float[Tensor, "batch d_vocab"],
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | Sequence[torch.Generator] | None = None,
) -> Int[Tensor, " batch"]:
    """Greedy argmax, or a sample after temperature, top-k and nucleus (top-p) filtering.

    ``generator``: one ``torch.Generator`` for the whole batch, or a sequence of one per row (row ``i``
    is then drawn from ``generator[i]`` alone, so it does not depend on the other rows).

    Args:
        logits: the next-token logits, ``[batch, d_vocab]``.
        do_sample: sample instead of taking the argmax.
        temperature: the softmax temperature when sampling (> 0).
        top_k: keep only the ``top_k`` most likely tokens (``None``: all).
        top_p: keep the smallest set of tokens whose probability reaches ``top_p`` (``None``: all).
        generator: one generator, or one per row.

    Returns:
        The next token of each row, ``[batch]``.
    """
    check_sampling(temperature if do_sample else 1.0, top_k, top_p)
    if not do_sample:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k is not None:
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        drop = cumulative - sorted_logits.softmax(-1) > top_p  # keep the smallest set reaching top_p
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    probs = logits.softmax(-1)
    if isinstance(generator, (list, tuple)):
        if len(generator) != probs.shape[0]:
            raise ValueError(f"got {len(generator)} generators for a batch of {probs.shape[0]} rows.")
        return torch.cat([torch.multinomial(probs[i : i + 1], 1, generator=g) for i, g in enumerate(generator)]).squeeze(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def check_sampling(temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None) -> None:
    """Raise a ``ValueError`` naming the argument for a temperature, top-k or top-p that filters nothing sensible."""
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0 when sampling, got {temperature}.")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k <= 0):
        raise ValueError(f"top_k must be a positive int (or None for no top-k filtering), got {top_k!r}.")
    if top_p is not None and (isinstance(top_p, bool) or not 0 < top_p <= 1):
        raise ValueError(f"top_p must lie in (0, 1] (or None for no nucleus filtering), got {top_p!r}.")


def row_seed(seed: int, row: int) -> int:
    """The seed of row ``row``'s generator: a function of ``seed`` and the row index only."""
    return (int(seed) * 0x9E3779B97F4A7C15 + (row + 1) * 0xBF58476D1CE4E5B9) % (2**63)


def _holding_the_model(fn):
    """Run ``fn(model, ...)`` holding the model: prefixlens's runs of one model take turns across
    threads, and a bare forward pass from another thread meanwhile is refused (:func:`prefixlens.runtime.holding`)."""

    @functools.wraps(fn)
    def wrapper(model, *args, **kwargs):
        with holding(model):
            return fn(model, *args, **kwargs)

    return wrapper


@_holding_the_model
def generate(
    model,
    tokens: "Integer[Tensor, 'batch pos'] | Integer[Tensor, ' pos'] | str | list[str]",
    prefix: Prefix | None = None,
    max_new_tokens: int = 10,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    eos_token_id: int | None = None,
    use_cache: bool = True,
    batch_size: int | None = None,
    progress: bool = False,
    attention_mask: Shaped[Tensor, "batch mask_pos"] | None = None,
    prepend_bos: bool | None = None,
    return_text: bool = False,
    skip_special_tokens: bool = False,
) -> "Int[Tensor, 'batch pos_plus_new'] | list[str]":
    """Generate ``max_new_tokens`` after ``tokens`` with ``prefix`` in place.

    ``tokens``: ids, a string or a list of strings (left-padded with a mask when ragged;
    :mod:`prefixlens.text`). ``prepend_bos=None``: after a prefix its trained policy (``content_bos``; no BOS for others), the
    model's default without one (the text starts the sequence).
    ``return_text=True`` returns one string per row: the decoded **new tokens only** (the
    continuation, without the input or its padding, as HF's text-generation pipeline with
    ``return_full_text=False``); with ``eos_token_id`` a row's text ends at its first EOS (the EOS
    itself is kept unless ``skip_special_tokens=True``, which drops every special token, like
    ``tokenizer.decode``). It needs the model's tokenizer.

    Returns the content tokens followed by the generated ones (no prefix slots), like
    ``model.generate``. With a prefix from ``from_prompt(model, prompt)``, greedy decoding gives
    the same tokens as greedy decoding of ``prompt + tokens`` (minus the prompt).

    The first step runs ``[slots] + tokens`` with the prefix hooks; later steps feed one token at a
    time through the model's key/value cache, which already holds the prefix keys and values.
    Every cached step checks that the cache holds exactly the positions it should (slots + input +
    tokens so far) and raises :class:`prefixlens.kv_cache.KVCacheError` otherwise;
    ``use_cache=False`` recomputes the whole sequence at every step instead (always so on TL-native
    bridges, which have no cache).

    ``attention_mask`` (``[B, T]`` or ``[B, P + T]``, 1 = real token): a batch of prompts of different
    lengths, padded on the left as in HuggingFace (a right-padded row is refused, since new tokens are
    appended after the last column). The new tokens are appended and the mask extended by ones; each
    row generates what it generates alone. The returned rows keep their padding.

    Sampling draws row ``i`` from its own generator seeded from ``(seed, i)``, so ``batch_size``
    only changes memory use, never the tokens. ``seed=None`` draws a fresh seed from torch's global
    RNG (advancing it, never reseeding it): different on every call, reproducible under
    ``torch.manual_seed``.
    ``batch_size`` splits a large batch into chunks (a batched prefix is split alongside);
    ``eos_token_id`` pads a finished row with EOS and stops once every row of a chunk has finished
    (every row is padded with EOS to ``T + max_new_tokens``).
    Refused inside a :func:`prefixlens.attached` block (prefixes do not nest).

    Args:
        model (TransformerBridge): the model to generate with.
        tokens: the input after the prefix: token ids ``[batch, pos]`` (or ``[pos]``), a string, or a
            list of strings.
        prefix: the prefix in place during generation, or ``None`` for none.
        max_new_tokens: how many tokens to generate (at least 1).
        do_sample: sample instead of greedy argmax decoding.
        temperature: the softmax temperature when sampling (> 0).
        top_k: keep only the ``top_k`` most likely tokens when sampling (``None``: all).
        top_p: nucleus sampling: keep the smallest set of tokens whose probability reaches ``top_p``.
        seed: the seed of the per-row generators when sampling (``None``: drawn from torch's global RNG).
        eos_token_id: the token that ends a row; finished rows are padded with it.
        use_cache: feed one token per step through the key/value cache (``False``: rerun the sequence).
        batch_size: generate in chunks of this many rows (``None``: the whole batch at once).
        progress: show a progress bar over the chunks.
        attention_mask: 1 for real tokens, 0 for (left) padding: ``[batch, pos]`` or ``[batch, P + pos]``.
        prepend_bos: give text input a BOS token (``None``: after a prefix its ``content_bos`` (else none), the model's default
            without one).
        return_text: return the decoded new tokens, one string per row, instead of ids.
        skip_special_tokens: with ``return_text``, drop special tokens from the text.

    Returns:
        The ids ``[batch, pos + new]`` (content then new tokens, no prefix slots), or with
        ``return_text=True`` one string per row.
    """
    check_not_attached(model, "prefixlens.generate")
    tokens, attention_mask = tokens_and_mask(model, tokens, attention_mask, prepend_bos, after=prefix)
    if return_text and getattr(model, "tokenizer", None) is None:
        raise ValueError("return_text=True needs the model's tokenizer to decode; this model has none (use the ids).")
    tokens = check_tokens(model, tokens, prefix)
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}.")
    if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1):
        raise ValueError(f"batch_size must be an int >= 1 (or None for the whole batch at once), got {batch_size!r}.")
    check_sampling(temperature if do_sample else 1.0, top_k, top_p)
    P = prefix.length if prefix is not None else 0
    if P + tokens.shape[1] + max_new_tokens > int(model.cfg.n_ctx):
        raise ValueError(
            f"prefix {P} + input {tokens.shape[1]} + new tokens {max_new_tokens} exceeds the model's context of "
            f"{int(model.cfg.n_ctx)} positions."
        )
    mask = full_attention_mask(attention_mask, tokens, P)
    if mask is not None and not bool(mask[:, -1].all()):
        rows = (mask[:, -1] == 0).nonzero().flatten().tolist()
        raise ValueError(
            f"attention_mask: row(s) {rows} end with padding; generation appends new tokens after the last "
            f"column, so pad on the left (HuggingFace's padding_side='left')."
        )
    if do_sample and seed is None:
        seed = int(torch.randint(0, 2**62, (1,)).item())  # fresh, from the global RNG (not reseeded)
    B = tokens.shape[0]
    step = batch_size or B
    chunks = range(0, B, step)
    width = tokens.shape[1] + max_new_tokens
    outputs = []
    for start in tqdm(chunks, desc="generate", disable=not progress or len(chunks) == 1):
        rows = slice(start, start + step)
        chunk_prefix = prefix.batch_slice(rows) if prefix is not None and prefix.batched else prefix
        generators = None
        if do_sample:
            generators = [
                torch.Generator(device=tokens.device).manual_seed(row_seed(seed, r)) for r in range(start, min(B, start + step))
            ]
        sampling = dict(do_sample=do_sample, temperature=temperature, top_k=top_k, top_p=top_p, generator=generators)
        # a kept-positions KVPrefix places the content only while attached: no cached steps after the first
        cached = use_cache and has_kv_cache(model) and getattr(prefix, "slot_positions", None) is None
        run = _generate_cached if cached else _generate_recompute
        chunk_mask = mask[rows] if mask is not None else None
        out = run(model, tokens[rows], chunk_prefix, chunk_mask, max_new_tokens, eos_token_id, sampling)
        if out.shape[1] < width:  # finished early (every row hit EOS): pad with EOS like a finished row
            out = torch.cat([out, out.new_full((out.shape[0], width - out.shape[1]), eos_token_id)], dim=1)
        outputs.append(out)
    out = torch.cat(outputs, dim=0)
    return _continuation_text(model, out[:, tokens.shape[1] :], eos_token_id, skip_special_tokens) if return_text else out


def _continuation_text(model, new: Int[Tensor, "batch new"], eos_token_id, skip_special_tokens: bool) -> list[str]:
    """The new tokens of each row as text, cut after the row's first EOS (the EOS padding left out)."""
    keep = None
    if eos_token_id is not None:
        is_eos = new == eos_token_id
        first = torch.where(is_eos.any(1), is_eos.long().argmax(1), new.shape[1])
        keep = torch.arange(new.shape[1], device=new.device)[None] <= first[:, None]
    return decode(model, new, keep, skip_special_tokens=skip_special_tokens)


def _append(new, finished, eos_token_id):
    if eos_token_id is None:
        return new, finished
    new = torch.where(finished, torch.full_like(new, eos_token_id), new)
    return new, finished | (new == eos_token_id)


@torch.no_grad()
def _generate_cached(model, tokens, prefix, mask, max_new_tokens, eos_token_id, sampling):
    """Greedy/sampled decoding on the model's key/value cache.

    The first step runs ``[slots] + tokens`` with the prefix hooks (P extra positions, like a real
    prompt), computing the last position's logits only when the HF model supports it
    (``logits_to_keep``, as HF's ``generate`` does); each new token then runs alone on the cache. The
    cache hand-over hooks (:mod:`prefixlens.kv_cache`) are installed once for the whole generation,
    and every step checks that the cache grew by exactly the tokens it was given.
    """
    T = tokens.shape[1]
    finished = torch.zeros(tokens.shape[0], dtype=torch.bool, device=tokens.device)
    masked = {} if mask is None else {"attention_mask": mask}
    with _bridge_attention_reads_cache(model):
        with maybe_attached(model, prefix) as slots:
            logits, cache = _cached_step(model, slots.prepend(tokens), None, 0, use_cache=True,
                                         **_last_logits_only(model), **masked)
        before = slots.n + T
        generated = []
        for i in range(max_new_tokens):
            new, finished = _append(sample_next(logits[:, -1], **sampling), finished, eos_token_id)
            generated.append(new)
            if i == max_new_tokens - 1 or (eos_token_id is not None and bool(finished.all())):
                break
            if mask is not None:
                mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
                masked = {"attention_mask": mask}
            logits, cache = _cached_step(model, new[:, None], cache, before + i, **masked)
    return torch.cat([tokens, torch.stack(generated, dim=1)], dim=1)


def _cached_step(model, tokens, cache, before: int, **kwargs):
    """Logits of ``tokens`` after the ``before`` positions in ``cache``, and the extended cache; raises
    :class:`~prefixlens.kv_cache.KVCacheError` unless it then holds ``before + tokens.shape[1]``
    positions (as :func:`~prefixlens.kv_cache.cached_forward`, whose hand-over hooks the caller holds)."""
    logits, new_cache = model(tokens, past_key_values=cache, return_type="logits_and_cache", **kwargs)
    check_cache_grew(new_cache, before, tokens.shape[1])
    return logits, new_cache


_LOGITS_TO_KEEP: dict[type, bool] = {}


def _last_logits_only(model) -> dict:
    """``{"logits_to_keep": 1}`` when the bridge's HF model can compute the last position's logits
    alone (what HF's ``generate`` asks for), else ``{}``."""
    hf = getattr(model, "original_model", None)
    if hf is None:
        return {}
    kind = type(hf)
    if kind not in _LOGITS_TO_KEEP:
        try:
            _LOGITS_TO_KEEP[kind] = "logits_to_keep" in inspect.signature(kind.forward).parameters
        except (TypeError, ValueError):
            _LOGITS_TO_KEEP[kind] = False
    return {"logits_to_keep": 1} if _LOGITS_TO_KEEP[kind] else {}


@torch.no_grad()
def _generate_recompute(model, tokens, prefix, mask, max_new_tokens, eos_token_id, sampling):
    finished = torch.zeros(tokens.shape[0], dtype=torch.bool, device=tokens.device)
    with maybe_attached(model, prefix) as slots:
        sequence = slots.prepend(tokens)
        for _ in range(max_new_tokens):
            masked = {} if mask is None else {"attention_mask": mask}
            new, finished = _append(sample_next(model(sequence, **masked)[:, -1], **sampling), finished, eos_token_id)
            sequence = torch.cat([sequence, new[:, None]], dim=1)
            if mask is not None:
                mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
            if bool(finished.all()):
                break
    return slots.content(sequence)

