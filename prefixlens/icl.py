"""In-context learning through the prefix lens: label words as anchors (Wang et al., EMNLP 2023).

Demonstrations in a prompt are a prefix. On a :class:`~prefixlens.lexicons.LexiconTask`:

- :func:`draw_demonstrations` / :func:`build_demonstrations`: ``k`` demonstrations per class from the
  train split (a seeded draw and a seeded order), each ``template.format(word=w) + " " + label``
  followed by ``separator``; :func:`query_tokens` the test query (``template.format(word=w)``).
  Every piece (template head, word, template tail, label word, separator) is encoded on its own, so
  the position of every label word, input word and formatting token is known exactly
  (:class:`Demonstrations`). A label word that is several tokens is refused.
- :func:`label_logits` / :func:`accuracy`: the queries scored on the label words' logits at the last
  position, after a prefix (the demonstrations as an exact :class:`~prefixlens.KVPrefix`, a compressed
  one, or none: zero-shot).
- :func:`compression_prefixes`: the hidden-anchor compression's prefixes, Hidden_anchor (label words
  and formatting tokens, their keys and values from the full demonstrations:
  ``KVPrefix.from_prompt(..., keep=...)``), Text_anchor (the same positions' tokens as a real prompt)
  and Hidden_random (formatting tokens and as many random input-word positions as there are label
  words).
- :func:`saliency` and :func:`information_flow`: ``I_l = |Σ_h A_h ⊙ ∂L/∂A_h|`` per layer (the gradient
  of the loss with respect to a ones tensor multiplying each attention pattern at ``hook_pattern``)
  and its three flows, ``S_wp`` (text → label words), ``S_pq`` (label words → target) and ``S_ww``
  (the rest).
- :func:`prefix_bridge`: the demonstrations as a prefix, decomposed (Petrov et al.): the share ``A``
  of each head's output that is the demonstrations' bias, how much of the prefix attention falls on
  the label words, and the relative attention over the query against the same layer input without
  the demonstrations.

Nothing depends on the model's layer count, heads or tokenizer: every id and position is read off
the model and its tokenizer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from jaxtyping import Float, Int
from torch import Tensor

from prefixlens.decomposition import decompose
from prefixlens.injection import attached, run_with_cache, run_with_prefix
from prefixlens.kv_cache import cached_forward, has_kv_cache
from prefixlens.lexicons import LexiconTask
from prefixlens.prefixes import KVPrefix
from prefixlens.runtime import evaluation_mode
from prefixlens.text import default_prepend_bos, encode

__all__ = [
    "Demonstrations",
    "draw_demonstrations",
    "build_demonstrations",
    "label_ids",
    "query_tokens",
    "pad_left",
    "label_logits",
    "accuracy",
    "compression_prefixes",
    "saliency",
    "information_flow",
    "prefix_bridge",
    "mean_and_interval",
]


@dataclass(frozen=True)
class Demonstrations:
    """The demonstrations as token ids, and the role of every position.

    ``tokens``: the ids (a BOS first when the model's default prepends one); ``label_positions``: the
    position of each demonstration's label word, in order; ``labels``: each demonstration's label;
    ``word_positions``: the positions of the input words (the "text" of the demonstrations); every
    other position is a formatting token (BOS, template, separator).
    """

    tokens: tuple[int, ...]
    pairs: tuple[tuple[str, str], ...]
    labels: tuple[str, ...]
    label_positions: tuple[int, ...]
    word_positions: tuple[int, ...]

    @property
    def length(self) -> int:
        return len(self.tokens)

    @property
    def formatting_positions(self) -> tuple[int, ...]:
        other = set(self.label_positions) | set(self.word_positions)
        return tuple(i for i in range(self.length) if i not in other)

    @property
    def anchor_positions(self) -> tuple[int, ...]:
        """Label words and formatting tokens: every position but the input words (Hidden_anchor)."""
        words = set(self.word_positions)
        return tuple(i for i in range(self.length) if i not in words)


def _template_parts(task: LexiconTask) -> tuple[str, str, str]:
    """``(head, word_space, tail)`` of the template: ``head + word_space + word + tail`` is the prompt."""
    if task.template.count("{word}") != 1:
        raise ValueError(f"the task's template must contain '{{word}}' once, got {task.template!r}.")
    head, tail = task.template.split("{word}")
    if head.endswith(" "):
        return head[:-1], " ", tail
    return head, "", tail


def _pieces(model, text: str) -> list[int]:
    return encode(model, text, prepend_bos=False) if text else []


def label_ids(model, task: LexiconTask) -> list[int]:
    """The id of ``" " + label`` for each label of ``task``; a label word that is several tokens (or none)
    of this model's tokenizer is refused (the anchors analyses need one position per label word)."""
    ids = []
    for label in task.labels:
        enc = _pieces(model, " " + label)
        if len(enc) != 1:
            raise ValueError(
                f"the label word {label!r} is {len(enc)} tokens {enc} for this model's tokenizer; the label-word "
                "analyses (scoring, anchors, compression) need a single token per label. Choose labels that are one "
                "token for this tokenizer (e.g. nrc_emotion_task(classes=...)) or another model."
            )
        ids.append(enc[0])
    if len(set(ids)) != len(ids):
        raise ValueError(f"two labels of {task.labels} encode to the same token: {ids}.")
    return ids


def draw_demonstrations(task: LexiconTask, k: int, seed: int) -> tuple[tuple[str, str], ...]:
    """``k`` train words per class (a seeded draw without replacement), in a seeded random order."""
    if k < 1:
        raise ValueError(f"k (demonstrations per class) must be >= 1, got {k}.")
    g = torch.Generator().manual_seed(seed)
    pairs = []
    for label in task.labels:
        words = [w for w, y in task.train if y == label]
        if len(words) < k:
            raise ValueError(f"label {label!r} has {len(words)} train words; k={k} needs more.")
        pairs += [(words[i], label) for i in torch.randperm(len(words), generator=g)[:k].tolist()]
    return tuple(pairs[i] for i in torch.randperm(len(pairs), generator=g).tolist())


def build_demonstrations(model, task: LexiconTask, pairs, separator: str = "\n") -> Demonstrations:
    """The demonstrations ``pairs`` (``(word, label)``) as one prompt: ``template(word) + " " + label +
    separator`` each, after a BOS when the model's default prepends one."""
    head, space, tail = _template_parts(task)
    ids = label_ids(model, task)
    tokens: list[int] = []
    if default_prepend_bos(model):
        tokens.append(int(model.tokenizer.bos_token_id))
    label_pos, word_pos = [], []
    for word, label in pairs:
        tokens += _pieces(model, head)
        w = _pieces(model, space + word)
        word_pos += range(len(tokens), len(tokens) + len(w))
        tokens += w + _pieces(model, tail)
        label_pos.append(len(tokens))
        tokens.append(ids[task.label_index(label)])
        tokens += _pieces(model, separator)
    return Demonstrations(tuple(tokens), tuple(pairs), tuple(y for _, y in pairs), tuple(label_pos), tuple(word_pos))


def query_tokens(model, task: LexiconTask, word: str, zero_shot: bool = False) -> list[int]:
    """The query ``template(word)``, encoded piece by piece as in the demonstrations; ``zero_shot``: the
    start of a sequence (a BOS when the model's default prepends one), else a continuation."""
    head, space, tail = _template_parts(task)
    bos = [int(model.tokenizer.bos_token_id)] if zero_shot and default_prepend_bos(model) else []
    return bos + _pieces(model, head) + _pieces(model, space + word) + _pieces(model, tail)


def pad_left(rows: list[list[int]], device=None) -> tuple[Int[Tensor, "batch pos"], Int[Tensor, "batch pos"]]:
    """Rows of ids left-padded (with 0) to one width, and their mask (1 = real token)."""
    width = max(len(r) for r in rows)
    tokens = torch.tensor([[0] * (width - len(r)) + list(r) for r in rows], dtype=torch.long, device=device)
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], dtype=torch.long, device=device)
    return tokens, mask


@torch.no_grad()
def label_logits(model, task: LexiconTask, words, prefix: KVPrefix | None = None, batch_size: int = 64) -> Float[Tensor, "n n_labels"]:
    """The label words' logits at the last position of each query ``template(word)``, after ``prefix``
    (``None``: zero-shot, the query alone from the start of a sequence).

    On a model with a key/value cache the prefix's slots run once per batch (attached, batch 1) and
    the queries run on the cache of them, at the positions the prefix gives the content
    (``content_start`` for a kept-positions prefix); otherwise through :func:`run_with_prefix`. Both
    give the same logits (tested)."""
    ids = torch.tensor(label_ids(model, task))
    out = []
    with evaluation_mode(model):
        for start in range(0, len(words), batch_size):
            rows = [query_tokens(model, task, w, zero_shot=prefix is None) for w in words[start:start + batch_size]]
            tokens, mask = pad_left(rows, model.cfg.device)
            if prefix is None:
                logits = model(tokens, attention_mask=mask)
            elif has_kv_cache(model) and not prefix.batched:
                logits = _after_slots_cache(model, prefix, tokens, mask)
            else:
                logits = run_with_prefix(model, tokens, prefix, attention_mask=mask)
            out.append(logits[:, -1, ids.to(logits.device)].cpu())
    return torch.cat(out)


def _after_slots_cache(model, prefix: KVPrefix, tokens: Int[Tensor, "batch pos"], mask: Int[Tensor, "batch pos"]) -> Float[Tensor, "batch pos d_vocab"]:
    """Content logits after ``prefix`` with the slots computed once: the attached slots (batch 1) fill
    the model's cache, repeated over the batch; the content follows at ``content_start`` (default
    ``P``) + its position among the real tokens."""
    P, B = prefix.length, tokens.shape[0]
    with attached(model, prefix) as slots:
        _, cache = cached_forward(model, slots.placeholders(1, tokens.device), None, use_cache=True)
    cache.batch_repeat_interleave(B)
    start = prefix.content_start if getattr(prefix, "content_start", None) is not None else P
    positions = start + (mask.cumsum(-1) - 1).clamp_min(0)
    full_mask = torch.cat([mask.new_ones(B, P), mask], dim=1)
    logits, _ = cached_forward(model, tokens, cache, attention_mask=full_mask, position_ids=positions, use_cache=True)
    return logits


def accuracy(logits: Float[Tensor, "n n_labels"], task: LexiconTask, labels) -> tuple[int, int]:
    """``(correct, n)``: the argmax over the label words against the gold ``labels``."""
    gold = torch.tensor([task.label_index(y) for y in labels])
    return int((logits.argmax(-1) == gold).sum()), len(labels)


def compression_prefixes(model, demos: Demonstrations, seed: int = 0) -> dict[str, KVPrefix]:
    """The prefixes of the compression comparison: ``demonstrations`` (all positions: the full prompt),
    ``hidden_anchor``, ``text_anchor`` and ``hidden_random`` (see the module docstring)."""
    tokens = torch.tensor(demos.tokens, device=model.cfg.device)
    g = torch.Generator().manual_seed(seed)
    n = len(demos.label_positions)
    if len(demos.word_positions) < n:
        raise ValueError(f"Hidden_random needs {n} input-word positions to stand in for the label words; "
                         f"these demonstrations have {len(demos.word_positions)}.")
    pick = torch.randperm(len(demos.word_positions), generator=g)[:n].tolist()
    random_keep = sorted(set(demos.formatting_positions) | {demos.word_positions[i] for i in pick})
    anchors = list(demos.anchor_positions)
    return {
        "demonstrations": KVPrefix.from_prompt(model, tokens),
        "hidden_anchor": KVPrefix.from_prompt(model, tokens, keep=anchors),
        "text_anchor": KVPrefix.from_prompt(model, tokens[anchors]),
        "hidden_random": KVPrefix.from_prompt(model, tokens, keep=random_keep),
    }


def saliency(model, tokens: Int[Tensor, " pos"], target: int) -> Float[Tensor, "layer pos pos"]:
    """``I_l = |Σ_h A_h ⊙ ∂L/∂A_h|`` for every layer: ``L`` is the cross-entropy of ``target`` at the last
    position. Each layer's pattern (``hook_pattern``) is multiplied by a ones tensor ``M`` and
    ``∂L/∂M = A ⊙ ∂L/∂A``. The model's weights get no gradient; eval mode throughout."""
    n_layers = int(model.cfg.n_layers)
    ones: list[Tensor] = []

    def scale(pattern, hook):
        m = torch.ones_like(pattern, requires_grad=True)
        ones.append(m)
        return pattern * m

    hooks = [(f"blocks.{l}.attn.hook_pattern", scale) for l in range(n_layers)]
    with torch.enable_grad(), evaluation_mode(model):
        logits = model.run_with_hooks(tokens[None], fwd_hooks=hooks)
        if len(ones) != n_layers:
            raise RuntimeError(f"hook_pattern fired {len(ones)} times for {n_layers} layers; saliency needs each layer once.")
        loss = torch.nn.functional.cross_entropy(logits[0, -1:].float(), torch.tensor([target], device=logits.device))
        grads = torch.autograd.grad(loss, ones)
    return torch.stack([g[0].sum(0).abs() for g in grads]).detach()


def information_flow(I: Float[Tensor, "layer pos pos"], label_positions) -> dict[str, list[float]]:
    """Wang et al.'s three flows per layer from the saliency ``I`` (target: the last position; the diagonal
    left out): ``S_wp = Σ_k Σ_{j<p_k} I(p_k, j) / Σ_k p_k``, ``S_pq = Σ_k I(q, p_k) / C`` and ``S_ww``, the
    mean of every other ``I(i, j)`` with ``j < i``."""
    N = I.shape[-1]
    q, p = N - 1, list(label_positions)
    below = torch.tril(torch.ones(N, N, dtype=torch.bool, device=I.device), diagonal=-1)
    wp = torch.zeros_like(below)
    for k in p:
        wp[k, :k] = True
    pq = torch.zeros_like(below)
    pq[q, p] = True
    ww = below & ~wp & ~pq
    out = {"S_wp": [], "S_pq": [], "S_ww": []}
    for layer in I:
        out["S_wp"].append(float(layer[wp].sum() / sum(p)))
        out["S_pq"].append(float(layer[pq].sum() / len(p)))
        out["S_ww"].append(float(layer[ww].sum() / max(int(ww.sum()), 1)))
    return out


def prefix_bridge(model, task: LexiconTask, demos: Demonstrations, words) -> dict:
    """The demonstrations as a prefix, decomposed at the last query position, per layer and head:
    ``bias_share`` (``A``, the weight of the demonstrations' bias ``b`` in the head's output
    ``(1 − A)·t + A·b``; mean over the queries), ``label_share`` (the fraction of the head's prefix
    attention on the label words), ``label_base_rate`` (the label words' share of the prefix slots) and
    ``relative_attention_error`` (max over everything: the relative attention over the query with the
    prefix against the same layer input without it; 0 up to rounding)."""
    prefix = KVPrefix.from_prompt(model, torch.tensor(demos.tokens, device=model.cfg.device))
    rows = [query_tokens(model, task, w) for w in words]
    tokens, mask = pad_left(rows, model.cfg.device)
    d = decompose(model, tokens, prefix, attention_mask=mask)
    A = d.prefix_attention[:, :, :, -1]  # [layer, batch, head] at the last position (never padded)
    P, n_layers = prefix.length, int(model.cfg.n_layers)
    names = [f"blocks.{l}.attn.hook_pattern" for l in range(n_layers)]
    with torch.no_grad():
        _, cache = run_with_cache(model, tokens, prefix, names_filter=names, attention_mask=mask, return_type=None)
    labels = torch.tensor(demos.label_positions, device=tokens.device)
    share = []
    for name in names:
        last = cache[name][:, :, -1, :P]  # [batch, head, P]: attention of the last query position on the slots
        share.append((last[..., labels].sum(-1) / last.sum(-1).clamp_min(1e-30)).mean(0))
    return {
        "bias_share": A.mean(1).tolist(),
        "label_share": torch.stack(share).tolist(),
        "label_base_rate": len(demos.label_positions) / P,
        "relative_attention_error": float(d.relative_attention_error().max()),
        "reconstruction_error": float(d.reconstruction_error()),
        "n_queries": len(words),
    }


def mean_and_interval(values) -> dict:
    """Mean, standard deviation, min, max and the 95% Student-t interval of the mean of ``values``."""
    v = [float(x) for x in values]
    n = len(v)
    mean = sum(v) / n
    sd = math.sqrt(sum((x - mean) ** 2 for x in v) / (n - 1)) if n > 1 else 0.0
    half = _t975(n - 1) * sd / math.sqrt(n) if n > 1 else 0.0
    return {"mean": mean, "sd": sd, "min": min(v), "max": max(v), "ci95": [mean - half, mean + half], "n": n}


_T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
         11: 2.201, 12: 2.179, 13: 2.160, 14: 2.145, 15: 2.131, 16: 2.120, 17: 2.110, 18: 2.101, 19: 2.093, 20: 2.086}


def _t975(df: int) -> float:
    """The two-sided 97.5% Student-t quantile (df > 20: df = 20's, slightly conservative)."""
    return _T975[min(df, 20)]
