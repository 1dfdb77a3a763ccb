"""Where a prefix's attention goes and what its bias does to the answer.

A decomposition (:func:`prefixlens.decompose`) says how much attention each head gives the prefix
(``A``) and what the prefix adds (``A·b``). Read naively, ``A`` overstates an instruction's
influence: many heads park attention on the first token of a sequence whatever it is (an *attention
sink*, Xiao et al., ICLR 2024), and with a prefix in front the sink moves into the prefix's first
slot. On SmolLM2-135M-Instruct with the demo's pirate instruction, ``A`` averages 0.70 over heads,
of which 0.55 sits on slot 0 (``<|im_start|>``). This module separates that from the instruction:

- :func:`slot_groups` splits ``A`` and ``A·b`` exactly by groups of slots (the sink, the chat
  template, the instruction, or any groups you name); the groups' masses add up to ``A`` and their
  terms to ``A·b``.
- :func:`instruction_groups` finds the groups of a prompt from the same prompt with a neutral
  instruction (the template alone), and :func:`compare_with_neutral` measures an instruction net of
  the sink: prefix = template + instruction against prefix = template alone.
- :func:`bias_size` compares ``‖A·b·W_O‖`` with ``‖(1 − A)·t·W_O‖`` per layer and head.
- :func:`bias_logit_effect` gives the *direct* effect of each head's bias on the answer's logit: the
  answer's logit with the final residual as it is, minus with that head's ``A·b·W_O`` removed from
  it (the final norm and unembedding recomputed, not linearised), so heads can be ranked by what
  their bias does rather than by how readable their attention is.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from prefixlens.attention_math import bias_term, content_term, head_residual, slot_group_terms
from prefixlens.decomposition import HeadDecomposition

__all__ = [
    "SlotGroups",
    "slot_groups",
    "instruction_groups",
    "BiasSize",
    "bias_size",
    "BiasLogitEffect",
    "bias_logit_effect",
    "top_heads",
    "NeutralComparison",
    "compare_with_neutral",
]


def _real_positions(d: HeadDecomposition) -> Float[Tensor, "batch pos"]:
    """1 at the real content positions of ``d``, 0 at padding, in ``d``'s dtype."""
    B, T = d.final_residual.shape[:2] if d.final_residual is not None else d.z.shape[1:3]
    if d.content_mask is None:
        return torch.ones(B, T, dtype=d.z.dtype, device=d.z.device)
    return d.content_mask.to(d.z.dtype)


def _mean_over_positions(x: Float[Tensor, "layer batch head pos"], real: Float[Tensor, "batch pos"]) -> Float[Tensor, "layer head"]:
    """The mean of ``x`` over every real (batch, position), per layer and head."""
    return (x * real[None, :, None, :]).sum(dim=(1, 3)) / real.sum()


@dataclass
class SlotGroups:
    """``A`` and ``A·b`` split by groups of slots: ``mass[g]`` and ``term[g]`` add up over the groups
    to the decomposition's ``A`` and ``A·b`` (the groups partition the slots)."""

    names: list[str]
    slots: list[list[int]]
    mass: Float[Tensor, "group layer batch head pos"]
    term: Float[Tensor, "group layer batch pos head d_head"]
    real: Float[Tensor, "batch pos"]

    def mean_mass(self) -> Float[Tensor, "group layer head"]:
        """Each group's attention mass per layer and head, averaged over the real content positions."""
        return torch.stack([_mean_over_positions(m, self.real) for m in self.mass])

    def share(self) -> dict[str, float]:
        """Each group's share of the prefix's attention, averaged over layers, heads and positions
        (the numbers add up to the mean ``A``)."""
        return {n: float(m.mean()) for n, m in zip(self.names, self.mean_mass())}


def slot_groups(d: HeadDecomposition, groups: Mapping[str, Sequence[int]]) -> SlotGroups:
    """Split ``A`` and ``A·b`` of every head by named groups of slots.

    ``groups``: ``{name: slot indices}``; the groups must not overlap, and the slots they leave out
    form one more group, ``"other"``. Exact: the masses add up to ``A`` and the terms to ``A·b``.

    Args:
        d: a decomposition from :func:`prefixlens.decompose`.
        groups: slot indices (``0..P-1``) per group name.
    """
    if d.slot_pattern is None or d.slot_values is None:
        raise ValueError("this decomposition carries no per-slot attention; make it with prefixlens.decompose.")
    P = d.n_slots
    names, members, seen = [], [], set()
    for name, slots in groups.items():
        slots = [int(s) for s in slots]
        bad = [s for s in slots if not 0 <= s < P]
        if bad:
            raise ValueError(f"group {name!r} names slots {bad}, but the prefix has slots 0..{P - 1}.")
        if seen & set(slots):
            raise ValueError(f"group {name!r} shares slots {sorted(seen & set(slots))} with another group; groups must not overlap.")
        if not slots:
            raise ValueError(f"group {name!r} is empty.")
        seen |= set(slots)
        names.append(str(name)), members.append(slots)
    rest = [s for s in range(P) if s not in seen]
    if rest:
        if "other" in names:
            raise ValueError("the slots left out of the groups form a group 'other'; do not use that name.")
        names.append("other"), members.append(rest)
    parts = [slot_group_terms(d.prefix_attention, d.slot_pattern, d.slot_values, m) for m in members]
    return SlotGroups(
        names, members, torch.stack([p[0] for p in parts]), torch.stack([p[1] for p in parts]), _real_positions(d)
    )


def instruction_groups(prompt: Sequence[int], neutral: Sequence[int], sink_slots: int = 1) -> dict[str, list[int]]:
    """The slots of ``prompt`` (template + instruction) in three groups, found against ``neutral``
    (the same template with an empty or neutral instruction): ``"sink"`` (the first ``sink_slots``),
    ``"template"`` (the rest of the ids ``prompt`` shares with ``neutral`` at its start and end) and
    ``"instruction"`` (the ids in between).

    E.g. SmolLM2's ``<|im_start|>system\\nYou are a pirate.<|im_end|>\\n`` against the same with an
    empty system message: sink = ``<|im_start|>``, template = ``system``, ``\\n``, ``<|im_end|>``, ``\\n``.

    Args:
        prompt: the ids of the prompt with the instruction.
        neutral: the ids of the same prompt without it.
        sink_slots: how many leading slots form the sink group (0: none).
    """
    prompt, neutral = [int(i) for i in prompt], [int(i) for i in neutral]
    head = 0
    while head < min(len(prompt), len(neutral)) and prompt[head] == neutral[head]:
        head += 1
    tail = 0
    while tail < min(len(prompt), len(neutral)) - head and prompt[-1 - tail] == neutral[-1 - tail]:
        tail += 1
    instruction = list(range(head, len(prompt) - tail))
    if not instruction:
        raise ValueError("the prompt and the neutral prompt have the same ids: there is no instruction to find.")
    if sink_slots > head:
        raise ValueError(f"sink_slots={sink_slots}, but the prompts share only {head} leading ids.")
    template = [s for s in range(len(prompt)) if s >= sink_slots and s not in instruction]
    groups = {"sink": list(range(sink_slots)), "template": template, "instruction": instruction}
    return {name: slots for name, slots in groups.items() if slots}


@dataclass
class BiasSize:
    """Per layer and head, the mean norm (over real content positions) of the prefix-bias term
    ``A·b·W_O`` and of the content term ``(1 − A)·t·W_O``, in the residual stream's units."""

    bias: Float[Tensor, "layer head"]
    content: Float[Tensor, "layer head"]

    def ratio(self) -> Float[Tensor, "layer head"]:
        """``‖A·b·W_O‖ / ‖(1 − A)·t·W_O‖`` (the bias's size relative to what the content gives)."""
        return self.bias / self.content.clamp_min(torch.finfo(self.content.dtype).tiny)


def bias_size(d: HeadDecomposition) -> BiasSize:
    """``‖A·b·W_O‖`` against ``‖(1 − A)·t·W_O‖`` per layer and head, averaged over real positions."""
    W_O = d._require_W_O()
    real = _real_positions(d)
    bias = head_residual(bias_term(d.prefix_attention, d.prefix_bias), W_O).norm(dim=-1)  # layer batch pos head
    content = head_residual(content_term(d.prefix_attention, d.content_output), W_O).norm(dim=-1)
    return BiasSize(
        _mean_over_positions(bias.transpose(2, 3), real), _mean_over_positions(content.transpose(2, 3), real)
    )


@dataclass
class BiasLogitEffect:
    """The direct effect of each head's prefix bias on the answer at one position, in logits.

    ``per_head[l, b, h]`` is the answer's logit (minus the contrast's, if one was given) with the
    final residual as it is, minus the same with head ``(l, h)``'s ``A·b·W_O`` removed from it;
    ``all_heads[b]`` removes every head's bias at once. Direct means through the final norm and
    unembedding only: what later layers do with a head's bias is not counted.
    """

    per_head: Float[Tensor, "layer batch head"]
    all_heads: Float[Tensor, " batch"]
    answer_logit: Float[Tensor, " batch"]

    def mean(self) -> Float[Tensor, "layer head"]:
        """The effect per layer and head, averaged over the batch."""
        return self.per_head.mean(dim=1)


def bias_logit_effect(
    model,
    d: HeadDecomposition,
    answer: int | Sequence[int] | Tensor,
    contrast: int | Sequence[int] | Tensor | None = None,
    position: int = -1,
) -> BiasLogitEffect:
    """The direct effect of every head's prefix bias on the logit of ``answer`` at ``position``.

    Args:
        model (TransformerBridge): the model ``d`` was made with (its final norm and unembedding are used).
        d: a decomposition from :func:`prefixlens.decompose`.
        answer: the answer token id, one for all rows or one per row.
        contrast: an optional contrast token id (one or per row): the effect is then on the logit
            difference ``answer − contrast``.
        position: the content position whose prediction is read (default: the last; with left
            padding the last position is real in every row).
    """
    if d.final_residual is None:
        raise ValueError("this decomposition carries no final residual; make it with prefixlens.decompose.")
    W_O = d._require_W_O()
    B, T, _ = d.final_residual.shape
    if not -T <= position < T:
        raise ValueError(f"position={position} is out of range for {T} content positions (use -{T}..{T - 1}).")
    real = _real_positions(d)[:, position]
    if not bool(real.all()):
        raise ValueError(f"position {position} is padding in rows {torch.nonzero(real == 0).flatten().tolist()}.")

    def ids(x, what):
        x = torch.as_tensor(x, dtype=torch.long, device=d.z.device).reshape(-1)
        if x.numel() not in (1, B):
            raise ValueError(f"{what} must be one token id or one per row ({B}), got {x.numel()}.")
        if not bool(((x >= 0) & (x < int(model.cfg.d_vocab))).all()):
            raise ValueError(f"{what} ids must be in 0..{int(model.cfg.d_vocab) - 1}.")
        return x.expand(B)

    answer = ids(answer, "answer")
    contrast = None if contrast is None else ids(contrast, "contrast")
    x = d.final_residual[:, position]  # batch d_model
    terms = head_residual(bias_term(d.prefix_attention, d.prefix_bias)[:, :, position, None], W_O)[:, :, 0]  # layer batch head d_model
    L, _, H, _ = terms.shape
    # one batch through the final norm and unembedding: each head's bias removed, all removed, none removed
    flat = torch.cat([(x[None, :, None] - terms).reshape(-1, x.shape[-1]), x - terms.sum(dim=(0, 2)), x], dim=0)

    def read(logits: Tensor, rows: Tensor) -> Tensor:
        value = logits.gather(-1, answer[rows, None])[:, 0]
        return value if contrast is None else value - logits.gather(-1, contrast[rows, None])[:, 0]

    with torch.no_grad():
        logits = model.unembed(model.ln_final(flat[:, None]))[:, 0]
    batch_index = torch.arange(B, device=x.device)
    n_heads = L * B * H
    per_row_of_heads = batch_index[None, :, None].expand(L, B, H).reshape(-1)
    without_one = read(logits[:n_heads], per_row_of_heads).reshape(L, B, H)
    without_all = read(logits[n_heads : n_heads + B], batch_index)
    with_all = read(logits[n_heads + B :], batch_index)
    return BiasLogitEffect(with_all[None, :, None] - without_one, with_all - without_all, with_all)


def top_heads(score: Float[Tensor, "layer head"], k: int = 4, by_magnitude: bool = True) -> list[tuple[int, int]]:
    """The ``k`` (layer, head) pairs with the largest ``score`` (by ``|score|`` when ``by_magnitude``)."""
    flat = (score.abs() if by_magnitude else score).flatten()
    k = min(int(k), flat.numel())
    H = score.shape[1]
    return [(int(i) // H, int(i) % H) for i in flat.topk(k).indices]


@dataclass
class NeutralComparison:
    """An instruction measured net of the sink: the prompt's decomposition split into its groups,
    and the same content after the neutral prompt (the template alone).

    ``mass`` per group (``"sink"``, ``"template"``, ``"instruction"``) and ``neutral_mass`` (all of
    the neutral prefix's attention) are per layer and head, averaged over real positions. With an
    answer, ``effect`` and ``neutral_effect`` are :class:`BiasLogitEffect` s of the two prefixes, and
    ``net_effect()`` is the instruction's own direct effect per head.
    """

    groups: dict[str, list[int]]
    split: SlotGroups
    neutral_mass: Float[Tensor, "layer head"]
    effect: BiasLogitEffect | None = None
    neutral_effect: BiasLogitEffect | None = None

    def mass(self) -> dict[str, Float[Tensor, "layer head"]]:
        return dict(zip(self.split.names, self.split.mean_mass()))

    def net_effect(self) -> Float[Tensor, "layer head"]:
        """Per head, the direct effect of the bias with the instruction minus with the template alone."""
        if self.effect is None or self.neutral_effect is None:
            raise ValueError("no answer was given to compare_with_neutral, so there are no logit effects.")
        return self.effect.mean() - self.neutral_effect.mean()

    def summary(self) -> dict[str, float]:
        """Mean attention on each group (and on the neutral prefix), over layers, heads and positions."""
        out = {f"mass_{name}": float(m.mean()) for name, m in self.mass().items()}
        out["mass_neutral_prefix"] = float(self.neutral_mass.mean())
        if self.effect is not None:
            out["direct_effect_all_heads"] = float(self.effect.all_heads.mean())
            out["direct_effect_all_heads_neutral"] = float(self.neutral_effect.all_heads.mean())
        return out


def compare_with_neutral(
    model,
    content: "Tensor | str | list[str]",
    prompt: Sequence[int] | Tensor,
    neutral: Sequence[int] | Tensor,
    answer: int | Sequence[int] | Tensor | None = None,
    contrast: int | Sequence[int] | Tensor | None = None,
    sink_slots: int = 1,
    **decompose_kwargs: Any,
) -> NeutralComparison:
    """Decompose ``content`` after ``prompt`` (template + instruction) and after ``neutral`` (the
    template alone), split the first by :func:`instruction_groups`, and, with an ``answer``, give
    both prefixes' direct bias effects on it (:func:`bias_logit_effect`).

    Args:
        model (TransformerBridge): the model.
        content: what follows the prompt (ids or text, as :func:`prefixlens.decompose` takes).
        prompt: the ids of the prompt with the instruction.
        neutral: the ids of the prompt without it.
        answer: optional answer token id(s) for the logit effects.
        contrast: optional contrast token id(s) (the effect is then on ``answer − contrast``).
        sink_slots: how many leading slots form the sink group.
        **decompose_kwargs: passed to :func:`prefixlens.decompose` (``attention_mask``, ``prepend_bos``).
    """
    from prefixlens.decomposition import decompose
    from prefixlens.prefixes import KVPrefix

    prompt_ids = torch.as_tensor(prompt).reshape(-1)
    neutral_ids = torch.as_tensor(neutral).reshape(-1)
    groups = instruction_groups(prompt_ids.tolist(), neutral_ids.tolist(), sink_slots)
    decompose_kwargs.setdefault("baseline", False)
    d = decompose(model, content, KVPrefix.from_prompt(model, prompt_ids), **decompose_kwargs)
    d0 = decompose(model, content, KVPrefix.from_prompt(model, neutral_ids), **decompose_kwargs)
    split = slot_groups(d, groups)
    neutral_mass = _mean_over_positions(d0.prefix_attention, _real_positions(d0))
    effect = neutral_effect = None
    if answer is not None:
        effect = bias_logit_effect(model, d, answer, contrast)
        neutral_effect = bias_logit_effect(model, d0, answer, contrast)
    return NeutralComparison(groups, split, neutral_mass, effect, neutral_effect)
