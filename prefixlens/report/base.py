"""The figure types: what a figure builder returns and a report is made of."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = ["Figure", "Row", "MARKUP", "ROW_LAYOUTS"]

#: Figure kinds that are raw markup made here rather than CircuitsVis components.
MARKUP = ("svg", "html")


@dataclass(frozen=True)
class Figure:
    """One figure: a CircuitsVis component name and its React props, or ``"svg"``/``"html"`` markup.

    ``props`` use the React names (``attention``, ``tokens``, ``attentionHeadNames``, ``maskUpperTri``…);
    for ``"svg"``/``"html"`` figures ``props == {"markup": str}`` (already safe HTML). ``data`` keeps the
    numbers behind a figure (for tests and re-plotting); it is not written to the file.
    As the last expression of a Jupyter cell a figure displays by itself (:meth:`_repr_html_`).
    """

    title: str
    component: str
    props: Mapping[str, Any]
    caption: str = ""
    data: Mapping[str, Any] | None = field(default=None, compare=False, repr=False)

    def __post_init__(self):
        if not isinstance(self.component, str) or not self.component:
            raise ValueError("component must be a CircuitsVis component name or 'svg'/'html'.")
        if self.component in MARKUP and not isinstance(self.props.get("markup"), str):
            raise ValueError(f"a {self.component!r} figure needs props={{'markup': str}}.")

    def _repr_html_(self) -> str:
        """Self-contained HTML for a notebook cell: style, the CircuitsVis bundle if needed, the figure."""
        from prefixlens.report.render import fragment

        return fragment([self])


#: How a :class:`Row` places its figures.
ROW_LAYOUTS = ("wrap", "main-stack")


@dataclass(frozen=True)
class Row:
    """Figures shown side by side.

    ``layout="wrap"`` (the default): in one line, wrapping on narrow screens, each figure's width in
    proportion to its size (an attention view's number of tokens). ``layout="main-stack"``: the first
    figure large on the left, the others stacked in a column on its right (one column on a narrow
    screen) — used for an attention view with prefix slots next to the two content-only views.
    """

    title: str
    figures: Sequence[Figure]
    caption: str = ""
    layout: str = "wrap"

    def __post_init__(self):
        if self.layout not in ROW_LAYOUTS:
            raise ValueError(f"layout must be one of {ROW_LAYOUTS}, got {self.layout!r}.")

    def _repr_html_(self) -> str:
        """Self-contained HTML for a notebook cell, like :meth:`Figure._repr_html_`."""
        from prefixlens.report.render import fragment

        return fragment([self])
