"""prefixlens.report: figure contents against independent computations, and a self-contained document."""

from __future__ import annotations

import os
import re
import stat

import pytest
import torch

import prefixlens as pl
from prefixlens import models, report

T, N = 7, 5


def _hook_count(model) -> int:
    return sum(len(hp.fwd_hooks) + len(hp.bwd_hooks) for hp in model.hook_dict.values())


@pytest.fixture(scope="module", params=[torch.float32, torch.float64], ids=["fp32", "fp64"])
def setup(request):
    dtype = request.param
    model = models.toy_gpt2(n_layers=2, d_model=32, n_heads=4, d_vocab=50, seed=0, dtype=dtype)
    gen = torch.Generator().manual_seed(1)
    tokens = torch.cat([torch.ones(N, 1, dtype=torch.long), torch.randint(3, 50, (N, T - 1), generator=gen)], 1)
    prompt = torch.tensor([1, 9, 10])
    prefixes = {"prompt": pl.KVPrefix.from_prompt(model, prompt), "resid": pl.ResidualPrefix.random(model, 2, seed=3)}
    return model, tokens, prompt, prefixes, dtype


TOL = {torch.float32: 1e-5, torch.float64: 1e-12}


def test_pad_prefixed_pattern():
    pattern = torch.rand(3, 4, 6).softmax(-1)
    padded = report.pad_prefixed_pattern(pattern, 2)
    assert padded.shape == (3, 6, 6)
    assert torch.equal(padded[:, 2:], pattern) and torch.equal(padded[:, :2], torch.zeros(3, 2, 6))
    with pytest.raises(ValueError, match="keys"):
        report.pad_prefixed_pattern(pattern, 3)
    with pytest.raises(ValueError, match="pattern"):
        report.pad_prefixed_pattern(pattern[0], 2)
    assert report.slot_labels(3) == ["<p0>", "<p1>", "<p2>"]


def test_attention_figure_views(setup):
    model, tokens, _, prefixes, dtype = setup
    prefix = prefixes["resid"]
    P = prefix.length
    row = report.attention_figure(model, tokens, prefix, layer=1, example=2)
    assert _hook_count(model) == 0
    assert isinstance(row, report.Row) and len(row.figures) == 3
    full, renorm, plain = row.figures
    assert [f.component for f in row.figures] == ["AttentionHeads"] * 3
    labels = report.token_labels(model, tokens[2])
    assert labels == [str(int(t)) for t in tokens[2]]  # the toy tokenizer's tokens are the ids
    assert full.props["tokens"] == report.slot_labels(P) + labels
    assert renorm.props["tokens"] == plain.props["tokens"] == labels
    A_full = full.props["attention"]
    assert A_full.shape == (4, P + T, P + T)
    assert torch.equal(A_full[:, :P], torch.zeros_like(A_full[:, :P]))
    torch.testing.assert_close(A_full[:, P:].sum(-1), torch.ones(4, T), atol=1e-5, rtol=0)
    # the model's own pattern over the content, renormalised, is the decomposition's content pattern ...
    content = A_full[:, P:, P:].double()
    renormalised = content / content.sum(-1, keepdim=True)
    torch.testing.assert_close(renormalised, renorm.props["attention"].double(), atol=1e-5, rtol=0)
    # ... which equals the attention without the prefix for the same layer input (the theorem)
    d = pl.decompose(model, tokens, prefix)
    diff = (d.content_pattern[1, 2] - d.reference_pattern[1, 2]).abs().max()
    assert diff < TOL[dtype]
    torch.testing.assert_close(plain.props["attention"], d.reference_pattern[1, 2].float(), atol=0, rtol=0)


def test_attention_figure_layers_heads_and_errors(setup):
    model, tokens, _, prefixes, _ = setup
    prefix = prefixes["prompt"]
    d = pl.decompose(model, tokens, prefix)
    rows = report.attention_figure(model, tokens, prefix, layer=None, decomposition=d)
    assert isinstance(rows, list) and len(rows) == model.cfg.n_layers
    one = report.attention_figure(model, tokens, prefix, layer=0, head=3, decomposition=d)
    assert [f.component for f in one.figures] == ["AttentionPattern"] * 3
    assert one.figures[1].props["attention"].shape == (T, T)
    with pytest.raises(IndexError, match="layer 5"):
        report.attention_figure(model, tokens, prefix, layer=5, decomposition=d)
    with pytest.raises(IndexError, match="head 9"):
        report.attention_figure(model, tokens, prefix, head=9, decomposition=d)
    with pytest.raises(ValueError, match="does not belong"):
        report.attention_figure(model, tokens[:2], prefix, decomposition=d)
    with pytest.raises(ValueError, match="reference"):
        report.attention_figure(model, tokens, prefix, decomposition=pl.decompose(model, tokens, prefix, reference=False))
    assert _hook_count(model) == 0


def test_prefix_mass_figure(setup):
    model, tokens, _, prefixes, _ = setup
    d = pl.decompose(model, tokens, prefixes["prompt"])
    row = report.prefix_mass_figure(d, tokens, model=model, example=1)
    heat, neurons = row.figures
    L, H = model.cfg.n_layers, model.cfg.n_heads
    torch.testing.assert_close(heat.data["A"], d.prefix_attention[:, 1].double().cpu(), atol=0, rtol=0)
    assert heat.data["rows"] == [f"L{l}H{h}" for l in range(L) for h in range(H)]
    svg = heat.props["markup"]
    assert svg.count("<rect") == L * H * T
    first = float(d.prefix_attention[0, 1, 0, 0])
    assert f"L0H0 · {int(tokens[1, 0])}: {first:.3f}" in svg
    assert neurons.component == "TextNeuronActivations"
    assert neurons.props["activations"].shape == (T, L, H)
    only = report.prefix_mass_figure(d, [f"t{i}" for i in range(T)], layer=1, interactive=False)
    assert isinstance(only, report.Figure) and only.data["A"].shape == (1, H, T)
    with pytest.raises(ValueError, match="labels"):
        report.prefix_mass_figure(d, ["a", "b"])
    with pytest.raises(IndexError):
        report.prefix_mass_figure(d, tokens, example=N)


def test_bias_shift_figure(setup):
    model, tokens, prompt, prefixes, dtype = setup
    fig = report.bias_shift_figure(model, tokens, prefixes, layer=1)
    assert _hook_count(model) == 0
    pts, coords = fig.data["points"], fig.data["coords"]
    K = len(prefixes)
    assert pts.shape == ((K + 1) * N, model.cfg.d_model) and coords.shape == ((K + 1) * N, 2)
    assert fig.data["groups"] == ["without prefix", "prompt", "resid"]
    name = "blocks.1.hook_attn_out"
    with torch.no_grad():
        _, plain = model.run_with_cache(tokens, names_filter=name)
        # the KV prefix of a real prompt gives the run on prompt + tokens: an independent reference
        _, real = model.run_with_cache(torch.cat([prompt.expand(N, -1), tokens], 1), names_filter=name)
    torch.testing.assert_close(pts[:N], plain[name][:, -1].double(), atol=TOL[dtype], rtol=0)
    torch.testing.assert_close(pts[N : 2 * N], real[name][:, -1].double(), atol=10 * TOL[dtype], rtol=0)
    # PCA: centred projections onto orthonormal directions, PC1 carries at least PC2's variance
    centred = pts - pts.mean(0)
    comps = torch.linalg.lstsq(centred, coords).solution.T  # recover the directions
    torch.testing.assert_close(comps @ comps.T, torch.eye(2, dtype=torch.float64), atol=1e-6, rtol=0)
    assert coords[:, 0].var() >= coords[:, 1].var()
    again = report.bias_shift_figure(model, tokens, prefixes, layer=1)
    assert torch.equal(again.data["coords"], coords)  # deterministic
    svg = fig.props["markup"]
    assert svg.count("<line") == K * N and svg.count("<circle") == (K + 1) * N + (K + 1)
    with pytest.raises(ValueError, match="at least one"):
        report.bias_shift_figure(model, tokens, {})
    with pytest.raises(IndexError):
        report.bias_shift_figure(model, tokens, prefixes, position=T)


def test_project_2d_keeps_two_dimensions():
    pts = torch.randn(6, 2, dtype=torch.float64)
    coords, axes = report._project_2d(pts)
    assert torch.equal(coords, pts) and axes == ["dimension 0", "dimension 1"]


def _doc_without_bundle(text: str) -> str:
    bundle = report.circuitsvis_bundle()
    assert text.count(bundle) == 1, "the CircuitsVis bundle must be inlined exactly once"
    return text.replace(bundle, "")


def test_html_is_self_contained(setup, tmp_path):
    model, tokens, _, prefixes, _ = setup
    nasty = "</script><script>alert(1)</script>"
    d = pl.decompose(model, tokens, prefixes["prompt"])
    figures = [
        report.summary_figure({"p": d}),
        report.attention_figure(model, tokens, prefixes["prompt"], layer=0, decomposition=d),
        report.Figure("labels", "ColoredTokens", {"tokens": [nasty, "b"], "values": [float("nan"), 0.5]}),
        report.bias_shift_figure(model, tokens, prefixes),
    ]
    path = report.html(tmp_path / "sub" / "r.html", figures, title="a <b>title</b>")
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o666 & ~_umask()
    assert not [p for p in path.parent.iterdir() if p.name != "r.html"], "temporary files left behind"
    text = path.read_text(encoding="utf-8")
    rest = _doc_without_bundle(text)
    assert "var CircuitsVis=" not in rest
    assert re.search(r"<script[^>]*\bsrc=", text, re.I) is None and "<link" not in rest
    assert "unpkg" not in text and "import " not in rest
    # the only URL outside the bundle is the SVG namespace; the bundle's are namespaces and doc links
    assert set(re.findall(r"https?://[^\s'\"<>)]+", rest)) <= {"http://www.w3.org/2000/svg"}
    n_cv = rest.count("data-kind='circuitsvis'")
    assert n_cv == 4
    assert rest.lower().count("</script") == n_cv + 1 and rest.lower().count("<script") == n_cv + 1
    assert "</script" not in report.circuitsvis_bundle().lower()
    assert "<script>alert" not in text and "\\u003c/script\\u003e" in rest and "null" in rest
    assert "a &lt;b&gt;title&lt;/b&gt;" in rest
    assert report.CONTENT_SECURITY_POLICY in rest and "default-src 'none'" in report.CONTENT_SECURITY_POLICY
    assert "sourceMappingURL" not in text


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_report_object_and_notebook_display(setup):
    model, tokens, _, prefixes, _ = setup
    d = pl.decompose(model, tokens, prefixes["prompt"])
    rep = report.Report([report.prefix_mass_figure(d, tokens, model=model)], title="nb")
    rep.add(report.summary_figure({"p": d}), [report.svg_figure("s", "<svg></svg>"), report.svg_figure("t", "<svg/>")])
    assert len(rep.figures) == 3 and "figures=3" in repr(rep)
    a, b = rep._repr_html_(), rep._repr_html_()
    assert _doc_without_bundle(a).count("data-kind='circuitsvis'") == 1
    ids = lambda s: set(re.findall(r"id='(pl-[0-9a-f]+-\d+)'", s))
    assert ids(a) and not ids(a) & ids(b), "two displays in one notebook must not share element ids"
    assert rep.to_html().startswith("<!doctype html>")


def test_bad_figures():
    with pytest.raises(ValueError, match="markup"):
        report.Figure("x", "svg", {})
    with pytest.raises(TypeError, match="Figure and Row"):
        report.render_html([42])
    with pytest.raises(ValueError, match="component"):
        report.render_html([report.Figure("x", "Bad name();", {})])
    with pytest.raises(ValueError, match="svg"):
        report.svg_figure("x", "<div/>")
