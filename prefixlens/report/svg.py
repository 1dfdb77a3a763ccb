"""Drawing: inline SVG for the figures CircuitsVis has no component for (heatmaps, scatter plots).

Pure markup, no JavaScript and no outside reference. Every label's extent is estimated from its
length and the margins are sized from it, so nothing is cut off at the edge of the drawing; the
``<svg>`` scales down (``max-width: 100%``) rather than overflow a narrow page.
"""

from __future__ import annotations

import html as _html
import math
from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["PALETTE", "esc", "colour", "diverging_colour", "text_width", "heatmap_svg", "scatter_svg"]

PALETTE = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22"]

_SVG_OPEN = (
    "<svg xmlns='http://www.w3.org/2000/svg' class='pl-svg' width='{w}' height='{h}' viewBox='0 0 {w} {h}' "
    "font-family='sans-serif' font-size='{fs}' style='max-width:100%;height:auto'>"
)


def esc(s) -> str:
    """``str(s)`` escaped for HTML text and attribute values."""
    return _html.escape(str(s), quote=True)


def text_width(s: str, font_size: float = 11.0) -> float:
    """A generous estimate of the rendered width of ``s`` in pixels (sans-serif): wide glyphs count more."""
    units = 0.0
    for ch in str(s):
        if ch in "il.,:;|'!·":
            units += 0.35
        elif ch in "mwMW@%" or ord(ch) > 0x2000:
            units += 0.95
        elif ch.isupper() or ch in "<>_=+~#&":
            units += 0.72
        else:
            units += 0.6
    return units * font_size


def colour(v: float, vmin: float, vmax: float) -> str:
    """White (``vmin``) to dark blue (``vmax``); grey for a non-finite value."""
    if not math.isfinite(v):
        return "#eeeeee"
    x = min(1.0, max(0.0, (v - vmin) / (vmax - vmin) if vmax > vmin else 0.0))
    r, g, b = (round(255 + (c - 255) * x) for c in (8, 48, 107))
    return f"#{r:02x}{g:02x}{b:02x}"


def diverging_colour(v: float, limit: float) -> str:
    """Red (``-limit``) through white (0) to dark blue (``+limit``); grey for a non-finite value."""
    if not math.isfinite(v):
        return "#eeeeee"
    x = min(1.0, abs(v) / limit) if limit > 0 else 0.0
    target = (8, 48, 107) if v >= 0 else (178, 24, 43)
    r, g, b = (round(255 + (c - 255) * x) for c in target)
    return f"#{r:02x}{g:02x}{b:02x}"


def heatmap_svg(
    values: Tensor,
    rows: Sequence[str],
    cols: Sequence[str],
    vmin: float,
    vmax: float,
    highlight: Sequence[tuple[int, int]] = (),
    max_width: int = 1300,
    legend: str | None = None,
    diverging: bool = False,
) -> str:
    """A labelled ``[rows, cols]`` heatmap. Values show on hover and, when the cells are large enough,
    in the cells; ``highlight`` cells ``(row, col)`` get a red outline; ``legend`` adds a colour bar.
    ``diverging=True`` colours negative values red and positive ones blue, white at 0, on the scale
    ``±max(|vmin|, |vmax|)`` (for signed quantities such as logit effects).

    Column labels are rotated 60°; the margins are computed from the longest labels, and the cell size
    from ``max_width`` so the whole drawing fits in it.

    Args:
        values: the cell values, ``[rows, cols]``.
        rows: the row labels.
        cols: the column labels.
        vmin: the value at the bottom of the colour scale.
        vmax: the value at the top of the colour scale.
        highlight: ``(row, col)`` cells to outline.
        max_width: the drawing's maximum width in pixels.
        legend: the colour bar's label (``None``: no colour bar).
        diverging: a red-white-blue scale centred on 0.

    Returns:
        The SVG markup.
    """
    n_r, n_c = values.shape
    if len(rows) != n_r or len(cols) != n_c:
        wrong = [f"{name}: {len(labels)} labels for {n} {name}" for name, labels, n in (("rows", rows, n_r), ("cols", cols, n_c)) if len(labels) != n]
        raise ValueError(
            f"heatmap_svg: {'; '.join(wrong)} of the {n_r} × {n_c} values; give one label per row and per column."
        )
    fs = 11
    sin, cos = math.sin(math.radians(60)), math.cos(math.radians(60))
    col_w = max((text_width(c, fs) for c in cols), default=0.0)
    left = math.ceil(max((text_width(r, fs) for r in rows), default=0.0)) + 12
    top = math.ceil(col_w * sin) + 16
    right_extra = math.ceil(col_w * cos) + 8  # rotated labels lean right, past the last column
    bar = max(70, math.ceil(text_width(f"{vmin:.3g}", fs)) + 40) if legend else 0
    cell = max(12, min(44, (max_width - left - right_extra - bar) // max(n_c, 1)))
    width = left + n_c * cell + max(right_extra - cell // 2, 8) + bar
    height = top + n_r * cell + 10
    show_text = cell >= 30
    if diverging:
        limit = max(abs(vmin), abs(vmax))
        vmin, vmax = -limit, limit

        def fill(v: float) -> str:
            return diverging_colour(v, limit)
    else:

        def fill(v: float) -> str:
            return colour(v, vmin, vmax)

    out = [_SVG_OPEN.format(w=width, h=height, fs=fs)]
    for j, c in enumerate(cols):
        x, y = left + j * cell + cell / 2, top - 6
        out.append(f"<text x='{x:.1f}' y='{y}' transform='rotate(-60 {x:.1f} {y})'>{esc(c)}</text>")
    for i, r in enumerate(rows):
        out.append(f"<text x='{left - 6}' y='{top + i * cell + cell / 2 + 4:.1f}' text-anchor='end'>{esc(r)}</text>")
        for j in range(n_c):
            v = float(values[i, j])
            out.append(
                f"<rect x='{left + j * cell}' y='{top + i * cell}' width='{cell}' height='{cell}' "
                f"fill='{fill(v)}' stroke='#fff'><title>{esc(r)} · {esc(cols[j])}: {v:.3f}</title></rect>"
            )
            if show_text:
                dark = abs(v) > 0.55 * vmax if diverging else (v - vmin) > 0.55 * (vmax - vmin)
                ink = "#fff" if dark else "#222"
                out.append(
                    f"<text x='{left + j * cell + cell / 2}' y='{top + i * cell + cell / 2 + 4}' text-anchor='middle' "
                    f"fill='{ink}' font-size='9'>{v:.2f}</text>"
                )
    for i, j in highlight:
        out.append(
            f"<rect class='pl-highlight' x='{left + j * cell + 1}' y='{top + i * cell + 1}' width='{cell - 2}' "
            f"height='{cell - 2}' fill='none' stroke='#e4002b' stroke-width='2.5'/>"
        )
    if legend:
        bx, by, bh = width - bar + 18, top, max(60, min(200, n_r * cell))
        steps = 20
        for k in range(steps):
            v = vmax - (vmax - vmin) * (k + 0.5) / steps
            out.append(
                f"<rect x='{bx}' y='{by + k * bh / steps:.1f}' width='14' height='{bh / steps + 0.5:.1f}' "
                f"fill='{fill(v)}'/>"
            )
        out.append(f"<rect x='{bx}' y='{by}' width='14' height='{bh}' fill='none' stroke='#999'/>")
        out.append(f"<text x='{bx + 18}' y='{by + 9}'>{vmax:.3g}</text>")
        out.append(f"<text x='{bx + 18}' y='{by + bh}'>{vmin:.3g}</text>")
        out.append(f"<text x='{bx + 7}' y='{by - 6}' text-anchor='middle'>{esc(legend)}</text>")
    out.append("</svg>")
    return "".join(out)


def scatter_svg(groups: list[tuple[str, Tensor]], axes: Sequence[str], width: int = 620, height: int = 420) -> str:
    """Scatter of ``groups[0]`` (grey, the plain points) and each other group, with links from plain.

    The legend's width follows its longest name, so a long prefix name is not cut off.
    """
    fs = 12
    legend_w = max(text_width(name, fs) for name, _ in groups) + 40
    left, right, top, bottom = 60, math.ceil(legend_w), 20, 50
    width = max(width, left + right + 300)
    allc = torch.cat([c for _, c in groups])
    lo, hi = allc.min(0).values, allc.max(0).values
    span = torch.where(hi - lo > 0, hi - lo, torch.ones_like(hi))
    lo, span = lo - 0.05 * span, span * 1.1
    pw, ph = width - left - right, height - top - bottom

    def xy(p):
        return left + float((p[0] - lo[0]) / span[0]) * pw, top + ph - float((p[1] - lo[1]) / span[1]) * ph

    out = [
        _SVG_OPEN.format(w=width, h=height, fs=fs),
        f"<rect x='{left}' y='{top}' width='{pw}' height='{ph}' fill='#fafafa' stroke='#999'/>",
        f"<text x='{left + pw / 2}' y='{height - 12}' text-anchor='middle'>{esc(axes[0])}</text>",
        f"<text x='16' y='{top + ph / 2}' text-anchor='middle' transform='rotate(-90 16 {top + ph / 2})'>{esc(axes[1])}</text>",
    ]
    plain = groups[0][1]
    for k, (_, c) in enumerate(groups[1:]):
        col = PALETTE[k % len(PALETTE)]
        for a, b in zip(plain, c):
            (x0, y0), (x1, y1) = xy(a), xy(b)
            out.append(f"<line x1='{x0:.1f}' y1='{y0:.1f}' x2='{x1:.1f}' y2='{y1:.1f}' stroke='{col}' stroke-opacity='0.35'/>")
    for k, (name, c) in enumerate(groups):
        col = "#777" if k == 0 else PALETTE[(k - 1) % len(PALETTE)]
        for i, p in enumerate(c):
            x, y = xy(p)
            out.append(f"<circle cx='{x:.1f}' cy='{y:.1f}' r='4' fill='{col}'><title>{esc(name)}, sample {i}</title></circle>")
        ly = top + 14 + 18 * k
        out.append(f"<circle cx='{width - right + 14}' cy='{ly - 4}' r='5' fill='{col}'/>")
        out.append(f"<text x='{width - right + 24}' y='{ly}'>{esc(name)}</text>")
    out.append("</svg>")
    return "".join(out)
