"""Assembly: figures -> one self-contained HTML document, or a notebook cell output.

Modelled on CircuitsVis's ``utils/render.py``, but offline: the CircuitsVis browser bundle
(``circuitsvis/dist/cdn/iife.js``) is inlined once per document and every figure calls
``CircuitsVis.render`` on its own element; nothing is loaded from unpkg or any other address. The
written file also carries a Content-Security-Policy that forbids every outside request. A document
or cell output with no CircuitsVis figure (only SVG/HTML) carries no JavaScript at all.
"""

from __future__ import annotations

import functools
import json
import math
import os
import re
import uuid
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from torch import Tensor

from prefixlens.report.base import MARKUP, Figure, Row
from prefixlens.report.svg import esc
from prefixlens.serialization import atomic_write_text

__all__ = ["CONTENT_SECURITY_POLICY", "STYLE", "circuitsvis_bundle", "render_html", "html", "fragment", "Report"]

#: Every outside request is refused by the browser; inline scripts/styles and data: images only.
CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'unsafe-inline' 'unsafe-eval'; style-src 'unsafe-inline'; "
    "img-src data: blob:; font-src data:; connect-src 'none'; frame-src 'none'; base-uri 'none'; form-action 'none'"
)

#: Styles scoped to ``.prefixlens-report`` (so a notebook's own styles are untouched). Figures shrink
#: to the page: a row wraps, an SVG scales down, a wide table scrolls inside its figure.
STYLE = """
.prefixlens-report{font-family:system-ui,-apple-system,'Segoe UI',sans-serif;color:#222;max-width:1500px;box-sizing:border-box}
.prefixlens-report *{box-sizing:border-box}
.prefixlens-report h1{font-size:1.5em}.prefixlens-report h2{font-size:1.2em;margin:1.4em 0 .3em}
.prefixlens-report h3{font-size:1em;margin:.4em 0}
.prefixlens-report .pl-caption{color:#555;font-size:.9em;margin:.2em 0 .6em}
.prefixlens-report .pl-row{display:flex;flex-wrap:wrap;gap:18px;align-items:flex-start}
.prefixlens-report .pl-row>.pl-figure{flex:1 1 0px;min-width:min(100%,320px)}
.prefixlens-report .pl-cv{padding:0 15px;max-width:100%}
.prefixlens-report .pl-row.pl-main-stack{display:grid;gap:0 24px;align-items:start}
.prefixlens-report .pl-main-stack>.pl-figure:first-child{grid-row:span var(--pl-stack)}
@media (max-width:900px){.prefixlens-report .pl-row.pl-main-stack{display:flex;flex-wrap:wrap}}
.prefixlens-report .pl-figure{margin:8px 0 18px;max-width:100%;min-width:0}
.prefixlens-report .pl-figure[data-kind='html']{overflow-x:auto}
.prefixlens-report .pl-error{color:#b00;white-space:pre-wrap}
.prefixlens-report table.pl-table{border-collapse:collapse;font-size:.9em}
.prefixlens-report .pl-table th,.prefixlens-report .pl-table td{border:1px solid #ccc;padding:3px 8px;text-align:right;vertical-align:top}
.prefixlens-report .pl-table td.pl-text,.prefixlens-report .pl-table th.pl-text{text-align:left;white-space:pre-wrap;max-width:38em}
.prefixlens-report .pl-lead{font-size:1em;line-height:1.45;max-width:75em}
.prefixlens-report code{background:#f4f4f4;padding:0 .2em;border-radius:3px;white-space:pre-wrap}
"""


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


def _needs_bundle(items: list[Figure | Row]) -> bool:
    figs = [f for item in items for f in (item.figures if isinstance(item, Row) else [item])]
    return any(f.component not in MARKUP for f in figs)


_SQUARE_VIEWS = ("AttentionPattern", "AttentionHeads")


def _weight(f: Figure) -> int:
    """A figure's share of its row's width: an attention view's number of tokens (so the cells of the
    views in a row are the same size and a longer, prefixed view gets room for every label), else 15."""
    if f.component in _SQUARE_VIEWS and isinstance(f.props.get("tokens"), (list, tuple)):
        return max(1, len(f.props["tokens"]))
    return 15


def _body(items: list[Figure | Row], title: str, uid: str) -> str:
    parts = [f"<h1>{esc(title)}</h1>"] if title else []
    counter = [0]

    def figure(f: Figure, level: str, in_row: bool = False) -> str:
        i = counter[0]
        counter[0] += 1
        head = f"<{level}>{esc(f.title)}</{level}>" if f.title else ""
        caption = f"<div class='pl-caption'>{esc(f.caption)}</div>" if f.caption else ""
        style = f" style='flex-grow:{_weight(f)}'" if in_row else ""
        if f.component in MARKUP:
            return f"<div class='pl-figure' data-kind='{f.component}'{style}>{head}{f.props['markup']}{caption}</div>"
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
            f"<div class='pl-figure' data-kind='circuitsvis' data-component='{esc(f.component)}'{style}>{head}"
            f"<div id='{div}' class='pl-cv'></div>{caption}{script}</div>"
        )

    for item in items:
        if isinstance(item, Figure):
            parts.append(figure(item, "h2"))
        else:
            head = f"<h2>{esc(item.title)}</h2>" if item.title else ""
            caption = f"<div class='pl-caption'>{esc(item.caption)}</div>" if item.caption else ""
            inner = "".join(figure(f, "h3", in_row=True) for f in item.figures)
            row = "<div class='pl-row'>"
            if item.layout == "main-stack" and len(item.figures) > 1:
                main, rest = _weight(item.figures[0]), max(_weight(f) for f in item.figures[1:])
                row = (
                    f"<div class='pl-row pl-main-stack' style='grid-template-columns:minmax(0,{main}fr) "
                    f"minmax(0,{rest}fr);--pl-stack:{len(item.figures) - 1}'>"
                )
            parts.append(f"<section class='pl-section'>{head}{caption}{row}{inner}</div></section>")
    return "\n".join(parts)


def _bundle_script() -> str:
    return f"<script>{circuitsvis_bundle()}\n</script>"


def render_html(figures: Iterable, title: str = "prefixlens report") -> str:
    """The whole report as one self-contained HTML document (the bundle inlined once if any figure
    needs it, no outside URL)."""
    items = _flatten(list(figures))
    uid = "pl-" + uuid.uuid4().hex[:10]
    body = _body(items, title, uid)
    bundle = _bundle_script() if _needs_bundle(items) else ""
    return (
        "<!doctype html>\n<html lang='en'><head><meta charset='utf-8'>"
        f"<meta http-equiv='Content-Security-Policy' content=\"{CONTENT_SECURITY_POLICY}\">"
        "<meta name='viewport' content='width=device-width,initial-scale=1'>"
        f"<title>{esc(title)}</title><style>{STYLE}</style>\n{bundle}\n</head>"
        f"<body><div class='prefixlens-report'>\n{body}\n</div></body></html>\n"
    )


def fragment(figures: Iterable, title: str = "") -> str:
    """A notebook cell output: the style, the CircuitsVis bundle (only if a figure needs it) and the
    figures, in one ``<div>`` with fresh element ids. It renders by itself — in Jupyter, in a saved
    notebook, in an ``<iframe>`` or written alone to a file — with no outside URL."""
    items = _flatten(list(figures))
    uid = "pl-" + uuid.uuid4().hex[:10]
    bundle = _bundle_script() if _needs_bundle(items) else ""
    return f"<div class='prefixlens-report'><style>{STYLE}</style>{bundle}{_body(items, title, uid)}</div>"


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
        return fragment(self.figures, self.title)

    def __repr__(self) -> str:
        return f"Report(title={self.title!r}, figures={len(self.figures)})"
