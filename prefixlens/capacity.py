"""How many different completions can one first position produce? Real tokens vs virtual ones (paper §3).

A real first token can select at most ``d_vocab`` completions; a virtual one (a soft token, a
one-slot residual prefix or a one-slot key/value prefix) ranges over a continuum. This module draws
virtual first positions with a documented sampler, generates greedy completions for each arm, and
counts the distinct ones.

**Samplers** (every form, one slot; fitted to the same form computed from *real* single tokens):

- ``"gaussian"``: a Gaussian with the mean and covariance of the real-token tensors ``X`` (``[M, D]``,
  flattened per token; ``M = d_vocab`` tokens, or a random subset of ``fit_tokens`` of them), drawn as
  ``mu + (X - mu)^T g / sqrt(M - 1)`` with ``g ~ N(0, I_M)`` -- exactly the sample covariance (rank
  ``<= M - 1``) without forming a ``D x D`` matrix. For the soft prompt, ``X`` is the embedding matrix.
- ``"convex"``: random convex combinations of ``k`` real-token tensors (``k`` tokens drawn uniformly
  without replacement, weights ``~ Dirichlet(1, ..., 1)``).

:func:`sample_prefixes` fits and draws in one call; for many samples on a large model (49,152 tokens of
SmolLM2: a ``[n, 30 x 576]`` float64 residual draw would take gigabytes), :func:`fit_real_tokens` fits
once and :func:`draw_prefixes` draws blocks of samples, each with its own seeded generator.

**Protocols.** ``content_token=None`` is the reference's: the first position is the whole prompt
and the first generated token is read at it (no BOS). This works for tokens, soft prompts and
residual prefixes (the residual prefix sets every layer's input at the slot, so the slot's own
output is defined) but not for a key/value prefix, which only sets the slot's keys and values; with
``content_token=c`` the prompt is ``[first position, c]`` and every form works (the token arm is
then exactly ``KVPrefix.from_prompt(model, [t])``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from jaxtyping import Int
from torch import Tensor
from tqdm.auto import tqdm

from prefixlens.constructions.theorems import count_distinct
from prefixlens.generation import generate, sample_next
from prefixlens.injection import attached
from prefixlens.kv_cache import cached_forward, has_kv_cache
from prefixlens.prefixes import FORMS, KVPrefix, Prefix, form_class  # FORMS: the one registry of prefix forms
from prefixlens.signature import model_dtype_device, signature_of

__all__ = [
    "FORMS",
    "SAMPLERS",
    "ArmResult",
    "real_token_prefixes",
    "RealTokenFit",
    "fit_real_tokens",
    "draw_prefixes",
    "sample_prefixes",
    "greedy_completions",
    "count_distinct",
    "distinct_curve",
    "run_arm",
]

SAMPLERS = ("gaussian", "convex")


def distinct_curve(completions: Int[Tensor, "n L"], ns: list[int]) -> list[int]:
    """Distinct rows among the first ``n`` rows, for each ``n`` in ``ns`` (rows are i.i.d. draws)."""
    return [count_distinct(completions[:n]) for n in ns]


_form = form_class  # name (or class name) -> form; ValueError naming the valid names


def _flat(prefix: Prefix) -> tuple[Tensor, ...]:
    return tuple(getattr(prefix, n).detach() for n in prefix.tensor_names)


@torch.no_grad()
def real_token_prefixes(model, form: str, tokens: Int[Tensor, " n"], batch_size: int = 512) -> Prefix:
    """The batched one-slot ``form`` prefix of each real token: exactly that token as the first position."""
    cls = _form(form)
    tokens = torch.as_tensor(tokens).reshape(-1)
    _, device = model_dtype_device(model)
    parts = [cls.from_prompt(model, tokens[i:i + batch_size, None].to(device)) for i in range(0, len(tokens), batch_size)]
    tensors = [torch.cat([_flat(p)[j] for p in parts]) for j in range(len(cls.tensor_names))]
    return cls(*tensors, signature=signature_of(model))


@dataclass
class RealTokenFit:
    """The real-token tensors a sampler is fitted to: ``X`` (``[M, D]``, float64 on the CPU, one
    flattened ``form`` prefix per row) for the real tokens ``tokens``, and how to rebuild a prefix."""

    form: str
    tokens: Tensor
    X: Tensor
    shapes: list[torch.Size]
    signature: object
    dtype: torch.dtype
    device: torch.device
    _centred: tuple[Tensor, Tensor] | None = field(default=None, repr=False)

    def centred(self) -> tuple[Tensor, Tensor]:
        """``(mu, X - mu)``, computed once."""
        if self._centred is None:
            mu = self.X.mean(0)
            self._centred = (mu, self.X - mu)
        return self._centred


def _fit(model, form: str, g: torch.Generator, fit_tokens: int | None) -> RealTokenFit:
    _form(form)
    V = int(model.cfg.d_vocab)
    fit = torch.randperm(V, generator=g)[:fit_tokens] if fit_tokens and fit_tokens < V else torch.arange(V)
    tensors = _flat(real_token_prefixes(model, form, fit))
    X = torch.cat([t.reshape(len(fit), -1).double().cpu() for t in tensors], dim=1)  # [M, D]
    dtype, device = model_dtype_device(model)
    return RealTokenFit(form, fit, X, [t.shape[1:] for t in tensors], signature_of(model), dtype, device)


@torch.no_grad()
def fit_real_tokens(model, form: str, seed: int = 0, fit_tokens: int | None = 4096) -> RealTokenFit:
    """The real tokens a sampler is fitted to: a seeded random subset of ``fit_tokens`` of them
    (``None``: all), each as a one-slot ``form`` prefix (what :func:`sample_prefixes` fits to)."""
    return _fit(model, form, torch.Generator().manual_seed(seed), fit_tokens)


@torch.no_grad()
def draw_prefixes(fit: RealTokenFit, n: int, sampler: str, generator: torch.Generator, k: int = 4) -> Prefix:
    """``n`` one-slot prefixes drawn by ``sampler`` from a fitted :class:`RealTokenFit` with ``generator``
    (see the module docstring). Drawing many samples in several calls, each with its own seeded
    generator, needs only one fit and memory for one call's samples.

    Args:
        fit: the sampler's fit to the real tokens (:func:`fit_real_tokens`).
        n: how many prefixes to draw.
        sampler: ``"gaussian"`` or ``"convex"``.
        generator: the random generator the samples are drawn with.
        k: the number of real tokens in each convex combination (``"convex"`` only).

    Returns:
        A batched one-slot prefix of ``n`` samples, of the fit's form.
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler must be one of {SAMPLERS}, got {sampler!r}.")
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}.")
    M = fit.X.shape[0]
    if sampler == "gaussian":
        if M < 2:
            raise ValueError("the Gaussian sampler needs at least 2 real tokens to fit.")
        mu, centred = fit.centred()
        coeff = torch.randn(n, M, generator=generator, dtype=torch.float64) / (M - 1) ** 0.5
        samples = mu + coeff @ centred
    else:
        if not 1 <= k <= M:
            raise ValueError(f"k must be in [1, {M}] for a convex combination, got {k}.")
        idx = torch.stack([torch.randperm(M, generator=generator)[:k] for _ in range(n)])  # [n, k]
        w = -torch.rand(n, k, generator=generator, dtype=torch.float64).clamp_min(1e-300).log()  # Exp(1): Dirichlet(1)
        w = w / w.sum(1, keepdim=True)
        samples = torch.einsum("nk,nkd->nd", w, fit.X[idx])
    out, start = [], 0
    for shape in fit.shapes:
        size = int(torch.Size(shape).numel())
        out.append(samples[:, start:start + size].reshape(n, *shape).to(dtype=fit.dtype, device=fit.device))
        start += size
    return _form(fit.form)(*out, signature=fit.signature)


@torch.no_grad()
def sample_prefixes(
    model,
    form: str,
    n: int,
    sampler: str = "gaussian",
    seed: int = 0,
    fit_tokens: int | None = 4096,
    k: int = 4,
) -> Prefix:
    """``n`` one-slot ``form`` prefixes drawn by ``sampler`` (see the module docstring), batched.

    ``fit_tokens`` caps how many real tokens the sampler is fitted to (a seeded random subset;
    ``None``: all of them). ``k`` is the number of tokens in a convex combination. One generator
    seeded with ``seed`` picks the fit subset and then draws the samples (:func:`fit_real_tokens`
    followed by :func:`draw_prefixes`).

    Args:
        model (TransformerBridge): the model the prefixes are for.
        form: the prefix form: ``"soft"``, ``"residual"`` or ``"kv"``.
        n: how many prefixes to draw.
        sampler: ``"gaussian"`` or ``"convex"``.
        seed: the seed of the one generator used for the fit subset and the draws.
        fit_tokens: at most this many real tokens to fit the sampler to (``None``: all).
        k: the number of real tokens in each convex combination (``"convex"`` only).

    Returns:
        A batched one-slot prefix of ``n`` samples.
    """
    _form(form)
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler must be one of {SAMPLERS}, got {sampler!r}.")
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}.")
    g = torch.Generator().manual_seed(seed)
    return draw_prefixes(_fit(model, form, g, fit_tokens), n, sampler, g, k)


@torch.no_grad()
def greedy_completions(
    model,
    first: Int[Tensor, " n"] | Prefix,
    length: int = 10,
    content_token: int | None = None,
    batch_size: int = 256,
    use_cache: bool = True,
    progress: bool = False,
) -> Int[Tensor, "n length"]:
    """Greedy completions of ``length`` tokens from each first position (no BOS).

    ``first`` is ``[n]`` real token ids, or a batched one-slot prefix of ``n`` virtual tokens.
    With ``content_token`` the prompt is ``[first, content_token]``; without it the first generated
    token is read at the first position itself (not defined for a :class:`KVPrefix`).
    Later tokens come from the model's key/value cache where it has one: without a content token the
    slot's own forward pass fills the cache (the slot is not run twice), otherwise
    :func:`prefixlens.generate`. Greedy ids stay tensors throughout (no per-row Python).

    Args:
        model (TransformerBridge): the model to generate with.
        first: the first positions: ``[n]`` real token ids, or a batched one-slot prefix of ``n``.
        length: the number of tokens per completion.
        content_token: a token after the first position (``None``: the first position is the whole prompt).
        batch_size: how many completions to generate at a time.
        use_cache: take later tokens from the key/value cache where the model has one.
        progress: show a progress bar over the batches.

    Returns:
        The completions, ``[n, length]`` token ids.
    """
    if length < 1:
        raise ValueError(f"length must be >= 1, got {length}.")
    _, device = model_dtype_device(model)
    is_prefix = isinstance(first, Prefix)
    if is_prefix:
        if not first.batched or first.length != 1:
            raise ValueError(f"expected a batched one-slot prefix, got P={first.length}, batched={first.batched}.")
        if content_token is None and isinstance(first, KVPrefix):
            raise ValueError(
                "a KVPrefix sets only the slot's keys and values, so the slot's own output is not defined by "
                "it; give a content_token (prompt [slot, content_token])."
            )
        n = first.batch_size
    else:
        first = torch.as_tensor(first).reshape(-1).to(device)
        n = first.shape[0]
    outputs = []
    for start in tqdm(range(0, n, batch_size), desc="completions", disable=not progress):
        rows = slice(start, min(n, start + batch_size))
        B = rows.stop - rows.start
        if is_prefix:
            prefix = first.batch_slice(rows)
            if content_token is None and use_cache and has_kv_cache(model):
                # the slot is the whole prompt: its own output gives the first token, and the cache
                # already holds its keys and values for the rest (no second pass over the slot)
                with attached(model, prefix) as slots:
                    logits, cache = cached_forward(model, slots.placeholders(B, device))
                outputs.append(_greedy_cached(model, logits[:, -1], cache, length))
            elif content_token is None:
                with attached(model, prefix) as slots:
                    g1 = sample_next(model(slots.placeholders(B, device))[:, -1])
                rest = (generate(model, g1[:, None], prefix, length - 1, use_cache=use_cache)[:, 1:]
                        if length > 1 else g1[:, :0])
                outputs.append(torch.cat([g1[:, None], rest], dim=1))
            else:
                c = torch.full((B, 1), content_token, device=device)
                outputs.append(generate(model, c, prefix, length, use_cache=use_cache)[:, 1:])
        else:
            prompt = first[rows, None]
            if content_token is not None:
                prompt = torch.cat([prompt, torch.full_like(prompt, content_token)], dim=1)
            outputs.append(generate(model, prompt, None, length, use_cache=use_cache)[:, prompt.shape[1]:])
    return torch.cat(outputs).cpu()


def _greedy_cached(model, logits, cache, length: int) -> Int[Tensor, "batch length"]:
    """``length`` greedy tokens: the first from ``logits`` (``[B, d_vocab]``, the last position), each
    later one from a cached step on the previous one (ids stay tensors: no per-row Python)."""
    generated = [logits.argmax(-1)]
    for _ in range(length - 1):
        step, cache = cached_forward(model, generated[-1][:, None], cache)
        generated.append(step[:, -1].argmax(-1))
    return torch.stack(generated, dim=1)


@dataclass
class ArmResult:
    """One arm: its completions, the distinct count over all of them, and the curve vs N."""

    arm: str
    n: int
    distinct: int
    ns: list[int]
    curve: list[int]
    completions: Tensor = field(repr=False)
    sampler_doc: str = ""

    def to_json(self) -> dict:
        return {"arm": self.arm, "n": self.n, "distinct": self.distinct, "fraction": self.distinct / self.n,
                "ns": self.ns, "curve": self.curve, "sampler": self.sampler_doc}


def _grid(n: int) -> list[int]:
    ns, x = [], 1
    while x < n:
        ns.append(x)
        x = x * 2
    return ns + [n]


def run_arm(
    model,
    arm: str,
    n: int,
    length: int = 10,
    content_token: int | None = None,
    seed: int = 0,
    batch_size: int = 256,
    fit_tokens: int | None = 4096,
    k: int = 4,
    progress: bool = False,
) -> ArmResult:
    """Run one arm: ``"token"`` (``min(n, d_vocab)`` real tokens, a seeded random order) or
    ``"<form>-<sampler>"`` (e.g. ``"soft-gaussian"``, ``"kv-convex"``) with ``n`` samples.

    Args:
        model (TransformerBridge): the model to generate with.
        arm: ``"token"``, or ``"<form>-<sampler>"`` such as ``"soft-gaussian"``.
        n: the number of samples (the token arm takes at most ``d_vocab``).
        length: the number of tokens per completion.
        content_token: a token after the first position (``None``: the first position is the whole prompt).
        seed: the seed of the token order or of the sampler.
        batch_size: how many completions to generate at a time.
        fit_tokens: at most this many real tokens to fit the sampler to (``None``: all).
        k: the number of real tokens in each convex combination (``"convex"`` only).
        progress: show progress bars.

    Returns:
        The arm's completions and their count of distinct ones.
    """
    V = int(model.cfg.d_vocab)
    if arm == "token":
        order = torch.randperm(V, generator=torch.Generator().manual_seed(seed))[: min(n, V)]
        first, doc = order, f"every real token (a seeded random subset of {min(n, V)} of {V})"
    else:
        form, _, sampler = arm.partition("-")
        first = sample_prefixes(model, form, n, sampler, seed=seed, fit_tokens=fit_tokens, k=k)
        doc = (f"{form}: Gaussian with the mean and covariance of the real-token {form} tensors"
               if sampler == "gaussian" else f"{form}: convex combinations of {k} real-token {form} tensors, "
               "Dirichlet(1) weights")
    completions = greedy_completions(model, first, length, content_token, batch_size, progress=progress)
    ns = _grid(completions.shape[0])
    return ArmResult(arm, completions.shape[0], count_distinct(completions), ns,
                     distinct_curve(completions, ns), completions, doc)
