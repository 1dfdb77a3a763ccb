"""Figures of :mod:`prefixlens.attribution`: where the prefix's attention goes (sink, template,
instruction) and which heads' biases move the answer, drawn from its results (nothing is run here)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from jaxtyping import Float
from torch import Tensor

from prefixlens.attribution import SlotGroups
from prefixlens.report.base import Figure
from prefixlens.report.svg import heatmap_svg

__all__ = ["slot_groups_figure", "head_effect_figure"]


def slot_groups_figure(
    split: SlotGroups,
    neutral_mass: Float[Tensor, "layer head"] | None = None,
    title: str = "Where the prefix's attention goes, layer by layer",
) -> Figure:
    """The attention mass on each group of slots per layer (mean over heads and content positions),
    one row per group; with ``neutral_mass`` (the template alone, from
    :func:`prefixlens.attribution.compare_with_neutral`) one more row for comparison.

    Args:
        split: the groups of a decomposition (:func:`prefixlens.attribution.slot_groups`).
        neutral_mass: the neutral prefix's attention mass per layer and head, or ``None``.
        title: the figure's title.
    """
    per_layer = split.mean_mass().mean(-1).double().cpu()  # group layer
    rows = [f"{name} ({len(slots)} slot{'s' * (len(slots) != 1)})" for name, slots in zip(split.names, split.slots)]
    values = [per_layer]
    if neutral_mass is not None:
        rows.append("the template alone (neutral prefix)")
        values.append(neutral_mass.double().cpu().mean(-1)[None])
    grid = torch.cat(values)
    L = grid.shape[1]
    svg = heatmap_svg(grid, rows, [f"L{l}" for l in range(L)], vmin=0.0, vmax=1.0, legend="attention")
    shares = ", ".join(f"{name} {share:.3f}" for name, share in split.share().items())
    caption = (
        "share of each layer's attention (mean over heads, content positions and examples) on each group of prefix "
        f"slots; over all layers: {shares} (these add up to the mean A)"
    )
    if neutral_mass is not None:
        caption += f"; the template alone takes {float(neutral_mass.mean()):.3f}"
    return Figure(title, "svg", {"markup": svg}, caption, data={"rows": rows, "mass": grid})


def head_effect_figure(
    effect: Float[Tensor, "layer head"],
    highlight: Sequence[tuple[int, int]] = (),
    title: str = "Direct effect of each head's prefix bias on the answer",
    caption: str = "",
    unit: str = "Δ logit",
) -> Figure:
    """A signed ``head × layer`` heatmap (red negative, blue positive) of a per-head effect, e.g.
    :meth:`prefixlens.attribution.BiasLogitEffect.mean` or
    :meth:`prefixlens.attribution.NeutralComparison.net_effect`; ``highlight`` outlines heads in red.

    Args:
        effect: the effect per layer and head.
        highlight: ``(layer, head)`` cells to outline.
        title: the figure's title.
        caption: the figure's caption.
        unit: the colour bar's label.
    """
    grid = effect.double().cpu()
    L, H = grid.shape
    limit = float(grid.abs().max()) or 1.0
    svg = heatmap_svg(
        grid.T, [f"H{h}" for h in range(H)], [f"L{l}" for l in range(L)], vmin=-limit, vmax=limit,
        highlight=[(h, l) for l, h in highlight], legend=unit, diverging=True,
    )
    return Figure(title, "svg", {"markup": svg}, caption, data={"effect": grid, "highlight": list(highlight)})
