"""Self-contained, offline HTML reports of what a prefix does to attention (CircuitsVis + inline SVG).

Figure builders return small :class:`Figure` objects (``title, component, props``); a list of them
(a nested list or :class:`Row` puts figures side by side) becomes one HTML file with
:func:`html`, or a notebook cell output with :class:`Report`::

    import prefixlens as pl
    from prefixlens import report
    figs = [
        report.attention_figure(model, tokens, prefix, layer=0),      # paper Figure 5, every head
        report.prefix_mass_figure(pl.decompose(model, tokens, prefix), model=model, tokens=tokens),
        report.bias_shift_figure(model, batch_tokens, {"task A": p_a, "task B": p_b}, layer=0),  # Figure 3
    ]
    report.html("report.html", figs, title="my prefix")        # one file, works offline
    report.Report(figs)                                          # displays in Jupyter

The CircuitsVis bundle (``circuitsvis/dist/cdn/iife.js``) is inlined once per document and every
figure calls ``CircuitsVis.render``: nothing is loaded from unpkg or any other address. The written
file also carries a Content-Security-Policy that forbids every outside request. Figures CircuitsVis
has no component for (heatmaps, scatter plots) are inline SVG generated here, with no JavaScript.
"""

from __future__ import annotations

import functools
import html as _html
import json
import math
import os
import re
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import torch
from jaxtyping import Int
from torch import Tensor

from prefixlens.decomposition import HeadDecomposition, decompose
from prefixlens.injection import check_tokens, run_with_cache
from prefixlens.prefixes import Prefix
from prefixlens.serialization import atomic_write_text

__all__ = [
    "Figure",
    "Row",
    "Report",
    "attention_figure",
    "prefix_mass_figure",
    "bias_shift_figure",
    "summary_figure",
    "svg_figure",
    "html",
    "render_html",
    "slot_labels",
    "token_labels",
    "pad_prefixed_pattern",
    "circuitsvis_bundle",
    "CONTENT_SECURITY_POLICY",
]

#: Every outside request is refused by the browser; inline scripts/styles and data: images only.
CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'unsafe-inline' 'unsafe-eval'; style-src 'unsafe-inline'; "
    "img-src data: blob:; font-src data:; connect-src 'none'; frame-src 'none'; base-uri 'none'; form-action 'none'"
)

#: Figure kinds that are raw markup made here rather than CircuitsVis components.
_MARKUP = ("svg", "html")


@dataclass(frozen=True)
class Figure:
    """One figure: a CircuitsVis component name and its React props, or ``"svg"``/``"html"`` markup.

    ``props`` use the React names (``attention``, ``tokens``, ``attentionHeadNames``, ``maskUpperTri``…);
    for ``"svg"``/``"html"`` figures ``props == {"markup": str}`` (already safe HTML). ``data`` keeps the
    numbers behind a figure (for tests and re-plotting); it is not written to the file.
    """

    title: str
    component: str
    props: Mapping[str, Any]
    caption: str = ""
    data: Mapping[str, Any] | None = field(default=None, compare=False, repr=False)

    def __post_init__(self):
        if not isinstance(self.component, str) or not self.component:
            raise ValueError("component must be a CircuitsVis component name or 'svg'/'html'.")
        if self.component in _MARKUP and not isinstance(self.props.get("markup"), str):
            raise ValueError(f"a {self.component!r} figure needs props={{'markup': str}}.")


@dataclass(frozen=True)
class Row:
    """Figures shown side by side (they wrap on narrow screens)."""

    title: str
    figures: Sequence[Figure]
    caption: str = ""


# --------------------------------------------------------------------------------------------- labels


def slot_labels(n_slots: int) -> list[str]:
    """``["<p0>", …, "<p{n-1}>"]``: labels of the virtual prefix slots."""
    return [f"<p{i}>" for i in range(n_slots)]


def token_labels(model, tokens: Int[Tensor, "pos"]) -> list[str]:
    """One readable label per token id: ``model.to_str_tokens``, else the tokenizer, else the ids."""
    ids = [int(t) for t in torch.as_tensor(tokens).reshape(-1).tolist()]
    try:
        labels = model.to_str_tokens(torch.tensor(ids))
        if isinstance(labels, list) and len(labels) == len(ids) and all(isinstance(s, str) for s in labels):
            return labels
    except Exception:  # noqa: BLE001 - any tokenizer problem falls back to the next option
        pass
    tokenizer = getattr(model, "tokenizer", None)
    if tokenizer is not None:
        try:
            return [tokenizer.decode([i]) for i in ids]
        except Exception:  # noqa: BLE001
            pass
    return [str(i) for i in ids]


def pad_prefixed_pattern(pattern: Tensor, n_slots: int) -> Tensor:
    """``[H, T, P+T]`` content rows of a prefixed pattern -> square ``[H, P+T, P+T]``.

    CircuitsVis labels both axes from one token list and masks ``src > dest``; the virtual slots have
    no queries, so their rows are zero (causal, and visibly empty).
    """
    if pattern.ndim != 3:
        raise ValueError(f"expected a [head, pos, P+pos] pattern, got shape {tuple(pattern.shape)}.")
    H, T, K = pattern.shape
    if K != n_slots + T:
        raise ValueError(f"pattern has {K} keys but {n_slots} slots + {T} content positions = {n_slots + T}.")
    return torch.cat([pattern.new_zeros(H, n_slots, K), pattern], dim=1)


# --------------------------------------------------------------------------------------------- figures


def _example_tokens(model, tokens, prefix, example: int) -> Tensor:
    tokens = check_tokens(model, tokens, prefix)
    if not -tokens.shape[0] <= example < tokens.shape[0]:
        raise IndexError(f"example {example} is out of range for a batch of {tokens.shape[0]}.")
    return tokens


def _layers(model, layer: int | Sequence[int] | None) -> list[int]:
    n = int(model.cfg.n_layers)
    layers = list(range(n)) if layer is None else [layer] if isinstance(layer, int) else list(layer)
    for l in layers:
        if not 0 <= l < n:
            raise IndexError(f"layer {l} is out of range for a model with {n} layers.")
    return layers


def _heads(n_heads: int, head: int | Sequence[int] | None) -> list[int]:
    heads = list(range(n_heads)) if head is None else [head] if isinstance(head, int) else list(head)
    for h in heads:
        if not 0 <= h < n_heads:
            raise IndexError(f"head {h} is out of range for {n_heads} heads.")
    return heads


def _attention_view(title: str, pattern: Tensor, tokens: list[str], names: list[str], caption: str = "") -> Figure:
    """AttentionHeads for several heads, AttentionPattern for one."""
    pattern = pattern.detach().float().cpu()
    if pattern.shape[0] == 1:
        props = {"tokens": tokens, "attention": pattern[0], "maskUpperTri": True, "showAxisLabels": True}
        return Figure(title, "AttentionPattern", props, caption)
    props = {"tokens": tokens, "attention": pattern, "attentionHeadNames": names, "maskUpperTri": True}
    return Figure(title, "AttentionHeads", props, caption)


def attention_figure(
    model,
    tokens: Int[Tensor, "batch pos"],
    prefix: Prefix,
    layer: int | Sequence[int] | None = 0,
    head: int | Sequence[int] | None = None,
    example: int = 0,
    decomposition: HeadDecomposition | None = None,
) -> Row | list[Row]:
    """The paper's Figure 5 for one layer: three attention views side by side.

    1. the prefixed run's own pattern (``hook_pattern``), padded to ``[H, P+T, P+T]`` with the slots
       labelled ``<p0>…``; 2. its attention over the content renormalised to sum to one
       (``decomposition.content_pattern``); 3. the attention without the prefix for the same layer
       input (``decomposition.reference_pattern``; at layer 0 this is the plain run). Views 2 and 3
       are equal: a prefix only scales the content attention down. ``layer=None`` gives one
       :class:`Row` per layer; ``head`` selects heads (one head shows a single large pattern).
    """
    tokens = _example_tokens(model, tokens, prefix, example)
    layers = _layers(model, layer)
    heads = _heads(int(model.cfg.n_heads), head)
    P = prefix.length
    if decomposition is None:
        decomposition = decompose(model, tokens, prefix, reference=True)
    if decomposition.reference_pattern is None:
        raise ValueError("the decomposition has no reference_pattern; make it with decompose(..., reference=True).")
    if decomposition.n_slots != P or decomposition.content_pattern.shape[1] != tokens.shape[0]:
        raise ValueError("the decomposition does not belong to these tokens and this prefix.")
    names = {f"blocks.{l}.attn.hook_pattern" for l in layers}
    with torch.no_grad():
        _, cache = run_with_cache(model, tokens, prefix, names_filter=lambda n: n in names)
    content = token_labels(model, tokens[example])
    rows = []
    for l in layers:
        full = cache[f"blocks.{l}.attn.hook_pattern"][example][heads][:, P:]  # [H, T, P+T]
        head_names = [f"L{l}H{h}" for h in heads]
        mass = decomposition.prefix_attention[l, example][heads].mean()
        views = [
            _attention_view(
                f"with the prefix (P = {P})",
                pad_prefixed_pattern(full, P),
                slot_labels(P) + content,
                head_names,
                "rows of the virtual slots are empty",
            ),
            _attention_view(
                "with the prefix, content attention renormalised",
                decomposition.content_pattern[l, example][heads],
                content,
                head_names,
            ),
            _attention_view(
                "without the prefix" + (" (same layer input)" if l > 0 else ""),
                decomposition.reference_pattern[l, example][heads].nan_to_num(0.0),
                content,
                head_names,
            ),
        ]
        err = float(
            (decomposition.content_pattern[l, example][heads] - decomposition.reference_pattern[l, example][heads])
            .nan_to_num(0.0)
            .abs()
            .max()
        )
        rows.append(
            Row(
                f"Layer {l}: attention with and without the prefix",
                views,
                f"mean prefix attention mass A = {float(mass):.3f}; max |renormalised − without prefix| = {err:.2e}",
            )
        )
    return rows[0] if isinstance(layer, int) else rows


def prefix_mass_figure(
    decomposition: HeadDecomposition,
    tokens: Int[Tensor, "batch pos"] | Sequence[str] | None = None,
    model=None,
    example: int = 0,
    layer: int | Sequence[int] | None = None,
    interactive: bool = True,
) -> Figure | Row:
    """Per-head prefix attention mass ``A`` at every content position, as a heatmap (rows ``L·H``).

    ``tokens`` are the content ids (labelled with ``model`` when given) or ready-made labels. With
    ``interactive=True`` a CircuitsVis ``TextNeuronActivations`` view (pick a layer and head, the
    tokens are coloured by ``A``) is shown next to the heatmap.
    """
    A = decomposition.prefix_attention  # [layer, batch, head, pos]
    n_layers, B, H, T = A.shape
    if not -B <= example < B:
        raise IndexError(f"example {example} is out of range for a batch of {B}.")
    layers = list(range(n_layers)) if layer is None else [layer] if isinstance(layer, int) else list(layer)
    for l in layers:
        if not 0 <= l < n_layers:
            raise IndexError(f"layer {l} is out of range for {n_layers} layers.")
    labels = _content_labels(tokens, model, example, T)
    values = A[layers, example].detach().double().cpu()  # [L, H, T]
    row_names = [f"L{l}H{h}" for l in layers for h in range(H)]
    svg = _heatmap_svg(values.reshape(-1, T), row_names, labels, vmin=0.0, vmax=1.0)
    heat = Figure(
        f"Prefix attention mass A per head (P = {decomposition.n_slots})",
        "svg",
        {"markup": svg},
        "share of each head's attention on the prefix slots, at every content position (0 white, 1 dark)",
        data={"A": values, "rows": row_names, "tokens": labels},
    )
    if not interactive:
        return heat
    activations = values.permute(2, 0, 1).float()  # [pos, layer, head]
    neurons = Figure(
        "A by token (choose layer and head)",
        "TextNeuronActivations",
        {
            "tokens": labels,
            "activations": activations,
            "firstDimensionName": "Layer",
            "secondDimensionName": "Head",
            "firstDimensionLabels": [str(l) for l in layers],
        },
    )
    return Row("Prefix attention mass", [heat, neurons])


def _content_labels(tokens, model, example: int, T: int) -> list[str]:
    if tokens is None:
        return [str(i) for i in range(T)]
    if isinstance(tokens, Tensor):
        t = tokens if tokens.ndim == 1 else tokens[example]
        labels = token_labels(model, t) if model is not None else [str(int(i)) for i in t.tolist()]
    else:
        labels = [str(s) for s in tokens]
    if len(labels) != T:
        raise ValueError(f"got {len(labels)} token labels for {T} content positions.")
    return labels


def bias_shift_figure(
    model,
    tokens: Int[Tensor, "sample pos"],
    prefixes: Mapping[str, Prefix] | Sequence[Prefix],
    layer: int = 0,
    position: int = -1,
    title: str | None = None,
) -> Figure:
    """The paper's Figure 3: attention-block outputs (``blocks.{layer}.hook_attn_out``) at one content
    position, for every sample without a prefix and with each prefix, lines joining each sample's
    plain point to its prefixed ones.

    The plain run is the model on ``tokens`` alone. Points are projected to 2-D by PCA over all of
    them pooled (deterministic: SVD in float64, each component's largest loading made positive); a
    ``d_model = 2`` model is plotted as is, like the paper.
    """
    if isinstance(prefixes, Mapping):
        named = list(prefixes.items())
    else:
        named = [(f"prefix {i}", p) for i, p in enumerate(prefixes)]
    if not named:
        raise ValueError("give at least one prefix.")
    tokens = check_tokens(model, tokens)
    N, T = tokens.shape
    if not -T <= position < T:
        raise IndexError(f"position {position} is out of range for {T} content positions.")
    pos = position % T
    (layer,) = _layers(model, layer)
    name = f"blocks.{layer}.hook_attn_out"
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens, names_filter=lambda n: n == name)
        plain = cache[name][:, pos].detach().double().cpu()
        shifted = []
        for _, prefix in named:
            check_tokens(model, tokens, prefix)
            _, pcache = run_with_cache(model, tokens, prefix, names_filter=lambda n: n == name)
            shifted.append(pcache[name][:, prefix.length + pos].detach().double().cpu())
    points = torch.cat([plain] + shifted)  # [(K+1)·N, d_model]
    coords, axes = _project_2d(points)
    K = len(named)
    groups = [("without prefix", coords[:N])] + [(n, coords[(k + 1) * N : (k + 2) * N]) for k, (n, _) in enumerate(named)]
    svg = _scatter_svg(groups, axes)
    shift = torch.stack([(s - plain).norm(dim=-1) for s in shifted])  # [K, N]
    spread_plain = (plain - plain.mean(0)).norm(dim=-1).mean()
    caption = (
        f"layer {layer}, content position {pos}, {N} samples, {K} prefix(es); mean shift "
        + ", ".join(f"{n}: {float(shift[k].mean()):.3g}" for k, (n, _) in enumerate(named))
        + f" (mean spread without prefix {float(spread_plain):.3g})"
    )
    return Figure(
        title or "Attention-block outputs with and without prefixes",
        "svg",
        {"markup": svg},
        caption,
        data={"points": points, "coords": coords, "groups": [g for g, _ in groups], "axes": axes, "shift": shift},
    )


def summary_figure(decompositions: Mapping[str, HeadDecomposition], title: str = "Decomposition checks") -> Figure:
    """A table of each decomposition's errors and mean prefix attention, per layer."""
    head = ["prefix", "layer", "max |z − ((1−A)t + A b)|", "max |renormalised − without prefix|", "mean A", "layer-input shift"]
    rows = []
    for name, d in decompositions.items():
        s = d.summary()
        for l in range(d.n_layers):
            rel = s.get("relative_attention_error_per_layer")
            shift = s.get("cross_layer_shift_per_layer")
            rows.append(
                [
                    name,
                    str(l),
                    f"{s['reconstruction_error_per_layer'][l]:.2e}",
                    f"{rel[l]:.2e}" if rel else "–",
                    f"{s['mean_prefix_attention_per_layer'][l]:.3f}",
                    f"{shift[l]:.3f}" if shift else "–",
                ]
            )
    cells = "".join(f"<th>{_html.escape(h)}</th>" for h in head)
    body = "".join("<tr>" + "".join(f"<td>{_html.escape(c)}</td>" for c in r) + "</tr>" for r in rows)
    markup = f"<table class='pl-table'><thead><tr>{cells}</tr></thead><tbody>{body}</tbody></table>"
    return Figure(title, "html", {"markup": markup}, data={"rows": rows})


def svg_figure(title: str, svg: str, caption: str = "") -> Figure:
    """Wrap SVG markup you made yourself (it must not load anything)."""
    if not svg.lstrip().startswith("<svg"):
        raise ValueError("svg must be an <svg> element.")
    return Figure(title, "svg", {"markup": svg}, caption)


# ------------------------------------------------------------------------------------- projection, SVG


def _project_2d(points: Tensor) -> tuple[Tensor, list[str]]:
    """PCA to two dimensions (or the raw coordinates when there are only two)."""
    points = points.double()
    if points.shape[1] <= 2:
        coords = torch.zeros(points.shape[0], 2, dtype=torch.float64)
        coords[:, : points.shape[1]] = points
        return coords, ["dimension 0", "dimension 1"]
    centred = points - points.mean(0, keepdim=True)
    _, S, Vh = torch.linalg.svd(centred, full_matrices=False)
    comps = Vh[:2]
    signs = torch.sign(comps.gather(1, comps.abs().argmax(1, keepdim=True)))
    comps = comps * torch.where(signs == 0, torch.ones_like(signs), signs)
    coords = centred @ comps.T
    if coords.shape[1] < 2:
        coords = torch.cat([coords, torch.zeros(coords.shape[0], 2 - coords.shape[1], dtype=coords.dtype)], 1)
    var = S.square()
    frac = (var / var.sum()).tolist() if float(var.sum()) > 0 else [0.0, 0.0]
    frac += [0.0] * (2 - len(frac))
    return coords, [f"PC1 ({100 * frac[0]:.0f}% of variance)", f"PC2 ({100 * frac[1]:.0f}% of variance)"]


_PALETTE = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22"]


def _esc(s: str) -> str:
    return _html.escape(str(s), quote=True)


def _scatter_svg(groups: list[tuple[str, Tensor]], axes: list[str], width: int = 560, height: int = 420) -> str:
    """Scatter of ``groups[0]`` (grey, the plain points) and each other group, with links from plain."""
    left, right, top, bottom = 60, 170, 20, 50
    allc = torch.cat([c for _, c in groups])
    lo, hi = allc.min(0).values, allc.max(0).values
    span = torch.where(hi - lo > 0, hi - lo, torch.ones_like(hi))
    lo, span = lo - 0.05 * span, span * 1.1
    pw, ph = width - left - right, height - top - bottom

    def xy(p):
        return left + float((p[0] - lo[0]) / span[0]) * pw, top + ph - float((p[1] - lo[1]) / span[1]) * ph

    out = [
        f"<svg xmlns='http://www.w3.org/2000/svg' class='pl-svg' width='{width}' height='{height}' "
        f"viewBox='0 0 {width} {height}' font-family='sans-serif' font-size='12'>",
        f"<rect x='{left}' y='{top}' width='{pw}' height='{ph}' fill='#fafafa' stroke='#999'/>",
        f"<text x='{left + pw / 2}' y='{height - 12}' text-anchor='middle'>{_esc(axes[0])}</text>",
        f"<text x='16' y='{top + ph / 2}' text-anchor='middle' transform='rotate(-90 16 {top + ph / 2})'>{_esc(axes[1])}</text>",
    ]
    plain = groups[0][1]
    for k, (_, c) in enumerate(groups[1:]):
        colour = _PALETTE[k % len(_PALETTE)]
        for a, b in zip(plain, c):
            (x0, y0), (x1, y1) = xy(a), xy(b)
            out.append(f"<line x1='{x0:.1f}' y1='{y0:.1f}' x2='{x1:.1f}' y2='{y1:.1f}' stroke='{colour}' stroke-opacity='0.35'/>")
    for k, (name, c) in enumerate(groups):
        colour = "#777" if k == 0 else _PALETTE[(k - 1) % len(_PALETTE)]
        for i, p in enumerate(c):
            x, y = xy(p)
            out.append(f"<circle cx='{x:.1f}' cy='{y:.1f}' r='4' fill='{colour}'><title>{_esc(name)}, sample {i}</title></circle>")
        ly = top + 14 + 18 * k
        out.append(f"<circle cx='{width - right + 14}' cy='{ly - 4}' r='5' fill='{colour}'/>")
        out.append(f"<text x='{width - right + 24}' y='{ly}'>{_esc(name)}</text>")
    out.append("</svg>")
    return "".join(out)


def _colour(v: float, vmin: float, vmax: float) -> str:
    if not math.isfinite(v):
        return "#eeeeee"
    x = min(1.0, max(0.0, (v - vmin) / (vmax - vmin) if vmax > vmin else 0.0))
    r, g, b = (round(255 + (c - 255) * x) for c in (8, 48, 107))  # white -> dark blue
    return f"#{r:02x}{g:02x}{b:02x}"


def _heatmap_svg(values: Tensor, rows: list[str], cols: list[str], vmin: float, vmax: float) -> str:
    """A labelled ``[rows, cols]`` heatmap; values show on hover and, when the grid is small, in the cells."""
    n_r, n_c = values.shape
    cell = max(16, min(44, 720 // max(n_c, 1)))
    left, top = 60, 70
    width, height = left + n_c * cell + 10, top + n_r * cell + 10
    show_text = cell >= 30
    out = [
        f"<svg xmlns='http://www.w3.org/2000/svg' class='pl-svg' width='{width}' height='{height}' "
        f"viewBox='0 0 {width} {height}' font-family='sans-serif' font-size='11'>"
    ]
    for j, c in enumerate(cols):
        x = left + j * cell + cell / 2
        out.append(f"<text x='{x:.1f}' y='{top - 6}' transform='rotate(-60 {x:.1f} {top - 6})'>{_esc(c)}</text>")
    for i, r in enumerate(rows):
        out.append(f"<text x='{left - 6}' y='{top + i * cell + cell / 2 + 4:.1f}' text-anchor='end'>{_esc(r)}</text>")
        for j in range(n_c):
            v = float(values[i, j])
            fill = _colour(v, vmin, vmax)
            out.append(
                f"<rect x='{left + j * cell}' y='{top + i * cell}' width='{cell}' height='{cell}' fill='{fill}' "
                f"stroke='#fff'><title>{_esc(r)} · {_esc(cols[j])}: {v:.3f}</title></rect>"
            )
            if show_text:
                ink = "#fff" if (v - vmin) > 0.55 * (vmax - vmin) else "#222"
                out.append(
                    f"<text x='{left + j * cell + cell / 2}' y='{top + i * cell + cell / 2 + 4}' text-anchor='middle' "
                    f"fill='{ink}' font-size='9'>{v:.2f}</text>"
                )
    out.append("</svg>")
    return "".join(out)


# ---------------------------------------------------------------------------------------- document


@functools.lru_cache(maxsize=1)
def circuitsvis_bundle() -> str:
    """The CircuitsVis browser bundle, safe to inline in one ``<script>`` element.

    ``</script`` and ``<!--`` inside it are escaped (``<\\/script`` is the same string in JS), and the
    source-map comment is dropped so that not even developer tools look for a file next to the report.
    """
    import circuitsvis

    path = Path(circuitsvis.__file__).parent / "dist" / "cdn" / "iife.js"
    if not path.exists():
        raise FileNotFoundError(f"the CircuitsVis bundle is missing at {path}; reinstall circuitsvis.")
    js = path.read_text(encoding="utf-8")
    js = re.sub(r"</(script)", r"<\\/\1", js, flags=re.IGNORECASE)
    js = js.replace("<!--", "<\\!--")
    js = re.sub(r"^//# sourceMappingURL=.*$", "", js, flags=re.MULTILINE)
    return js


def _plain(value):
    """Tensors/arrays -> lists, non-finite floats -> None (JSON has no NaN)."""
    if isinstance(value, Tensor):
        value = value.detach().cpu()
        if value.is_floating_point():
            value = value.double()
        value = value.tolist()
    elif hasattr(value, "tolist") and not isinstance(value, (str, bytes)):
        value = value.tolist()
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items() if v is not None}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _js_props(props: Mapping[str, Any]) -> str:
    """JSON for a ``<script>`` element: ``<``, ``>``, ``&`` and line separators escaped."""
    text = json.dumps(_plain(props), allow_nan=False, separators=(",", ":"))
    for a, b in (("<", "\\u003c"), (">", "\\u003e"), ("&", "\\u0026"), ("\u2028", "\\u2028"), ("\u2029", "\\u2029")):
        text = text.replace(a, b)
    return text


_STYLE = """
.prefixlens-report{font-family:system-ui,-apple-system,'Segoe UI',sans-serif;color:#222;max-width:1500px}
.prefixlens-report h1{font-size:1.5em}.prefixlens-report h2{font-size:1.2em;margin:1.4em 0 .3em}
.prefixlens-report h3{font-size:1em;margin:.4em 0}
.prefixlens-report .pl-caption{color:#555;font-size:.9em;margin:.2em 0 .6em}
.prefixlens-report .pl-row{display:flex;flex-wrap:wrap;gap:18px;align-items:flex-start}
.prefixlens-report .pl-row>.pl-figure{flex:1 1 420px;min-width:380px}
.prefixlens-report .pl-figure{margin:8px 0 18px}
.prefixlens-report .pl-error{color:#b00;white-space:pre-wrap}
.prefixlens-report table.pl-table{border-collapse:collapse;font-size:.9em}
.prefixlens-report .pl-table th,.prefixlens-report .pl-table td{border:1px solid #ccc;padding:3px 8px;text-align:right}
"""


def _flatten(items) -> list[Figure | Row]:
    out: list[Figure | Row] = []
    for item in items:
        if isinstance(item, (Figure, Row)):
            out.append(item)
        elif isinstance(item, (list, tuple)):
            if all(isinstance(f, Figure) for f in item) and item:
                out.append(Row("", list(item)))
            else:
                out.extend(_flatten(item))
        else:
            raise TypeError(f"a report holds Figure and Row objects (or lists of them), got {type(item).__name__}.")
    return out


def _body(figures: Iterable, title: str, uid: str) -> str:
    parts = [f"<h1>{_esc(title)}</h1>"] if title else []
    counter = [0]

    def figure(f: Figure, level: str) -> str:
        i = counter[0]
        counter[0] += 1
        head = f"<{level}>{_esc(f.title)}</{level}>" if f.title else ""
        caption = f"<div class='pl-caption'>{_esc(f.caption)}</div>" if f.caption else ""
        if f.component in _MARKUP:
            return f"<div class='pl-figure' data-kind='{f.component}'>{head}{f.props['markup']}{caption}</div>"
        if not re.fullmatch(r"[A-Za-z][A-Za-z0-9]*", f.component):
            raise ValueError(f"not a CircuitsVis component name: {f.component!r}")
        div = f"{uid}-{i}"
        script = (
            "<script>(function(){var el=document.getElementById('" + div + "');try{"
            f"if(!window.CircuitsVis||!CircuitsVis.{f.component})throw new Error('CircuitsVis has no {f.component}');"
            f"CircuitsVis.render('{div}',CircuitsVis.{f.component},{_js_props(f.props)});"
            "}catch(e){el.className+=' pl-error';el.textContent='figure failed to render: '+e;}})();</script>"
        )
        return (
            f"<div class='pl-figure' data-kind='circuitsvis' data-component='{_esc(f.component)}'>{head}"
            f"<div id='{div}' class='pl-cv'></div>{caption}{script}</div>"
        )

    for item in _flatten(figures):
        if isinstance(item, Figure):
            parts.append(figure(item, "h2"))
        else:
            head = f"<h2>{_esc(item.title)}</h2>" if item.title else ""
            caption = f"<div class='pl-caption'>{_esc(item.caption)}</div>" if item.caption else ""
            inner = "".join(figure(f, "h3") for f in item.figures)
            parts.append(f"<section class='pl-section'>{head}{caption}<div class='pl-row'>{inner}</div></section>")
    return "\n".join(parts)


def _bundle_script() -> str:
    return f"<script>{circuitsvis_bundle()}\n</script>"


def render_html(figures: Iterable, title: str = "prefixlens report") -> str:
    """The whole report as one self-contained HTML document (the bundle inlined once, no outside URL)."""
    uid = "pl-" + uuid.uuid4().hex[:10]
    body = _body(figures, title, uid)
    return (
        "<!doctype html>\n<html lang='en'><head><meta charset='utf-8'>"
        f"<meta http-equiv='Content-Security-Policy' content=\"{CONTENT_SECURITY_POLICY}\">"
        "<meta name='viewport' content='width=device-width,initial-scale=1'>"
        f"<title>{_esc(title)}</title><style>{_STYLE}</style>\n{_bundle_script()}\n</head>"
        f"<body><div class='prefixlens-report'>\n{body}\n</div></body></html>\n"
    )


def html(path: str | os.PathLike, figures: Iterable, title: str = "prefixlens report") -> Path:
    """Write the report to ``path`` atomically and return the path."""
    return atomic_write_text(path, render_html(figures, title))


class Report:
    """A list of figures that writes itself to a file (:meth:`save`) and displays in Jupyter."""

    def __init__(self, figures: Iterable = (), title: str = "prefixlens report"):
        self.title = title
        self.figures: list[Figure | Row] = _flatten(list(figures))

    def add(self, *figures) -> "Report":
        self.figures.extend(_flatten(list(figures)))
        return self

    def to_html(self) -> str:
        return render_html(self.figures, self.title)

    def save(self, path: str | os.PathLike) -> Path:
        return html(path, self.figures, self.title)

    def _repr_html_(self) -> str:
        """A fragment for notebooks: style, the inlined bundle and the figures (no outside URL)."""
        uid = "pl-" + uuid.uuid4().hex[:10]
        return (
            f"<div class='prefixlens-report'><style>{_STYLE}</style>{_bundle_script()}"
            f"{_body(self.figures, self.title, uid)}</div>"
        )

    def __repr__(self) -> str:
        return f"Report(title={self.title!r}, figures={len(self.figures)})"
