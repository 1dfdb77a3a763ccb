"""Self-contained, offline HTML reports of what a prefix does to attention (CircuitsVis + inline SVG).

Figure builders return small :class:`Figure` objects (``title, component, props``); a list of them
(a nested list or :class:`Row` puts figures side by side) becomes one HTML file with
:func:`html`, or a notebook cell output with :class:`Report`; a single figure or row is also displayed
by itself as the last expression of a Jupyter cell::

    import prefixlens as pl
    from prefixlens import report
    figs = [
        report.attention_figure(model, tokens, prefix, layer=0),      # paper Figure 5, every head
        report.prefix_mass_grid_figure(d),                            # A of every head, layer × head
        report.prefix_mass_figure(pl.decompose(model, tokens, prefix), model=model, tokens=tokens),
        report.bias_shift_figure(model, batch_tokens, {"task A": p_a, "task B": p_b}, layer=0),  # Figure 3
    ]
    report.html("report.html", figs, title="my prefix")        # one file, works offline
    report.Report(figs)                                          # displays in Jupyter

The package is split like CircuitsVis's ``attention.py`` / ``utils/render.py``:

- :mod:`prefixlens.report.figures` — what each figure shows (the numbers, from a model, prefix and
  decomposition), token labels, head selection;
- :mod:`prefixlens.report.attribution` — the figures of :mod:`prefixlens.attribution` (where the
  prefix's attention goes: sink, template, instruction; which heads' biases move the answer);
- :mod:`prefixlens.report.svg` — drawing: heatmaps and scatter plots as inline SVG, no JavaScript;
- :mod:`prefixlens.report.render` — assembly: the HTML document, the notebook output, the inlined
  CircuitsVis bundle (``circuitsvis/dist/cdn/iife.js``, once per document; nothing is loaded from
  unpkg or any other address) and the Content-Security-Policy that forbids every outside request;
- :mod:`prefixlens.report.base` — the :class:`Figure` and :class:`Row` types.
"""

from __future__ import annotations

from prefixlens.report.attribution import head_effect_figure, slot_groups_figure
from prefixlens.report.base import Figure, Row
from prefixlens.report.figures import (
    _project_2d as _project_2d,  # the old private name (tests, older scripts)
)
from prefixlens.report.figures import (
    attention_figure,
    attention_output_shift,
    bias_shift_figure,
    entropy_deficit,
    head_label,
    pad_prefixed_pattern,
    prefix_mass_figure,
    prefix_mass_grid_figure,
    project_2d,
    readable_token,
    select_heads,
    slot_labels,
    summary_figure,
    svg_figure,
    table_figure,
    token_labels,
)
from prefixlens.report.render import CONTENT_SECURITY_POLICY, Report, circuitsvis_bundle, fragment, html, render_html

__all__ = [
    "Figure",
    "Row",
    "Report",
    "attention_figure",
    "prefix_mass_figure",
    "prefix_mass_grid_figure",
    "bias_shift_figure",
    "attention_output_shift",
    "summary_figure",
    "slot_groups_figure",
    "head_effect_figure",
    "table_figure",
    "svg_figure",
    "html",
    "render_html",
    "fragment",
    "slot_labels",
    "token_labels",
    "readable_token",
    "head_label",
    "entropy_deficit",
    "select_heads",
    "pad_prefixed_pattern",
    "project_2d",
    "circuitsvis_bundle",
    "CONTENT_SECURITY_POLICY",
]
