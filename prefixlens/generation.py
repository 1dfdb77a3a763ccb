"""Batched generation with a prefix, using the model's key/value cache after the first step."""

from __future__ import annotations

import torch
from jaxtyping import Float, Int
from torch import Tensor
from tqdm.auto import tqdm

from prefixlens.injection import check_tokens, maybe_attached
from prefixlens.kv_cache import cached_forward, has_kv_cache
from prefixlens.prefixes import Prefix

__all__ = ["generate", "sample_next"]


def sample_next(
    logits: Float[Tensor, "batch d_vocab"],
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> Int[Tensor, "batch"]:
    """Greedy argmax, or a sample after temperature, top-k and nucleus (top-p) filtering."""
    if not do_sample:
        return logits.argmax(-1)
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0 when sampling, got {temperature}.")
    logits = logits.float() / temperature
    if top_k is not None:
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        drop = cumulative - sorted_logits.softmax(-1) > top_p  # keep the smallest set reaching top_p
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(-1)


def generate(
    model,
    tokens: Int[Tensor, "batch pos"],
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
) -> Int[Tensor, "batch pos_plus_new"]:
    """Generate ``max_new_tokens`` after ``tokens`` with ``prefix`` in place.

    Returns the content tokens followed by the generated ones (no prefix slots), like
    ``model.generate``. With a prefix from ``from_prompt(model, prompt)``, greedy decoding gives
    the same tokens as greedy decoding of ``prompt + tokens`` (minus the prompt).

    The first step runs ``[slots] + tokens`` with the prefix hooks; later steps feed one token at a
    time through the model's key/value cache, which already holds the prefix keys and values.
    Every cached step checks that the cache holds exactly the positions it should (slots + input +
    tokens so far) and raises :class:`prefixlens.kv_cache.KVCacheError` otherwise;
    ``use_cache=False`` recomputes the whole sequence at every step instead (always so on TL-native
    bridges, which have no cache).
    ``batch_size`` splits a large batch into chunks (a batched prefix is split alongside);
    ``eos_token_id`` pads a finished row with EOS and stops once every row has finished.
    """
    tokens = check_tokens(model, tokens, prefix)
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}.")
    P = prefix.length if prefix is not None else 0
    if P + tokens.shape[1] + max_new_tokens > int(model.cfg.n_ctx):
        raise ValueError(
            f"prefix {P} + input {tokens.shape[1]} + new tokens {max_new_tokens} exceeds the model's context of "
            f"{int(model.cfg.n_ctx)} positions."
        )
    generator = None
    if do_sample:
        generator = torch.Generator(device=tokens.device).manual_seed(0 if seed is None else seed)
    sampling = dict(do_sample=do_sample, temperature=temperature, top_k=top_k, top_p=top_p, generator=generator)
    step = batch_size or tokens.shape[0]
    chunks = range(0, tokens.shape[0], step)
    outputs = []
    for start in tqdm(chunks, desc="generate", disable=not progress or len(chunks) == 1):
        rows = slice(start, start + step)
        chunk_prefix = prefix.batch_slice(rows) if prefix is not None and prefix.batched else prefix
        run = _generate_cached if use_cache and has_kv_cache(model) else _generate_recompute
        outputs.append(run(model, tokens[rows], chunk_prefix, max_new_tokens, eos_token_id, sampling))
    return torch.cat(outputs, dim=0)


def _append(new, finished, eos_token_id):
    if eos_token_id is None:
        return new, finished
    new = torch.where(finished, torch.full_like(new, eos_token_id), new)
    return new, finished | (new == eos_token_id)


@torch.no_grad()
def _generate_cached(model, tokens, prefix, max_new_tokens, eos_token_id, sampling):
    finished = torch.zeros(tokens.shape[0], dtype=torch.bool, device=tokens.device)
    with maybe_attached(model, prefix) as slots:
        logits, cache = cached_forward(model, slots.prepend(tokens))
    generated = []
    for i in range(max_new_tokens):
        new, finished = _append(sample_next(logits[:, -1], **sampling), finished, eos_token_id)
        generated.append(new)
        if i == max_new_tokens - 1 or bool(finished.all()):
            break
        logits, cache = cached_forward(model, new[:, None], cache)
    return torch.cat([tokens, torch.stack(generated, dim=1)], dim=1)


@torch.no_grad()
def _generate_recompute(model, tokens, prefix, max_new_tokens, eos_token_id, sampling):
    finished = torch.zeros(tokens.shape[0], dtype=torch.bool, device=tokens.device)
    with maybe_attached(model, prefix) as slots:
        sequence = slots.prepend(tokens)
        for _ in range(max_new_tokens):
            new, finished = _append(sample_next(model(sequence)[:, -1], **sampling), finished, eos_token_id)
            sequence = torch.cat([sequence, new[:, None]], dim=1)
            if bool(finished.all()):
                break
    return slots.content(sequence)
