"""prefixlens.report: figure contents against independent computations, and a self-contained document."""

from __future__ import annotations

import math
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
    diff = (d.content_pattern[1, 2] - d.baseline_pattern[1, 2]).abs().max()
    assert diff < TOL[dtype]
    torch.testing.assert_close(plain.props["attention"], d.baseline_pattern[1, 2].float(), atol=0, rtol=0)


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
    with pytest.raises(ValueError, match="baseline"):
        report.attention_figure(model, tokens, prefix, decomposition=pl.decompose(model, tokens, prefix, baseline=False))
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
    assert svg.count("</title></rect>") == L * H * T  # one cell per head and position (plus a colour bar)
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
    picked = report.prefix_mass_figure(d, tokens, model=model, example=1, heads=[(1, 2), (0, 3)])
    heat2, neurons2 = picked.figures
    assert heat2.data["rows"] == ["L1H2", "L0H3"]
    torch.testing.assert_close(heat2.data["A"], d.prefix_attention[[1, 0], 1, [2, 3]].double().cpu(), atol=0, rtol=0)
    # the interactive view lists the chosen heads themselves, so it opens on the first of them
    assert neurons2.props["firstDimensionLabels"] == ["L1H2", "L0H3"]
    torch.testing.assert_close(neurons2.props["activations"][:, :, 0].T, heat2.data["A"].float(), atol=0, rtol=0)
    with pytest.raises(IndexError, match="head 4"):
        report.prefix_mass_figure(d, tokens, heads=[(0, 4)])


def test_prefix_mass_grid_figure(setup):
    model, tokens, _, prefixes, _ = setup
    d = pl.decompose(model, tokens, prefixes["prompt"], baseline=False)
    fig = report.prefix_mass_grid_figure(d, highlight=[(1, 2)])
    L, H = model.cfg.n_layers, model.cfg.n_heads
    torch.testing.assert_close(fig.data["A"], d.prefix_attention.double().mean(dim=(1, 3)), atol=0, rtol=0)
    svg = fig.props["markup"]
    assert svg.count("</title></rect>") == L * H and svg.count("pl-highlight") == 1
    assert f"H2 · L1: {float(fig.data['A'][1, 2]):.3f}" in svg  # rows are heads, columns layers
    one = report.prefix_mass_grid_figure(d, example=2)
    torch.testing.assert_close(one.data["A"], d.prefix_attention[:, 2].double().mean(-1), atol=0, rtol=0)
    assert "heads outlined" in fig.caption and "heads outlined" not in one.caption


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
    coords, axes = report.project_2d(pts)
    assert torch.equal(coords, pts) and axes == ["dimension 0", "dimension 1"]
    assert report._project_2d is report.project_2d  # the old private name still works


def test_attention_output_shift_matches_bias_shift_figure(setup):
    model, tokens, _, prefixes, _ = setup
    data = report.attention_output_shift(model, tokens, prefixes, layers=None, position=-1)
    assert data["layers"] == [0, 1] and data["names"] == ["prompt", "resid"] and data["position"] == T - 1
    fig = report.bias_shift_figure(model, tokens, prefixes, layer=1)
    K = len(prefixes)
    torch.testing.assert_close(fig.data["points"][:N], data["plain"][1], atol=0, rtol=0)
    torch.testing.assert_close(fig.data["points"][N:], data["shifted"][1].reshape(K * N, -1), atol=0, rtol=0)
    torch.testing.assert_close(fig.data["shift"], data["shift"][1], atol=0, rtol=0)
    plain = data["plain"][0]
    assert data["spread"][0] == pytest.approx(float((plain - plain.mean(0)).norm(dim=-1).mean()))


def test_readable_labels():
    assert report.readable_token(" in") == "·in"
    assert report.readable_token("\n") == "↵" and report.readable_token("\t x") == "⇥·x"
    assert report.readable_token("Ġthe") == "·the" and report.readable_token("▁the") == "·the"
    assert report.readable_token("Ċ") == "↵" and report.readable_token("") == "∅"
    assert report.readable_token("<|im_start|>") == "<|im_start|>"
    assert report.slot_labels(2, ["You", "·are"]) == ["[You]", "[·are]"]
    with pytest.raises(ValueError, match="slot names"):
        report.slot_labels(3, ["a"])
    assert report.head_label(12, 3) == "L12H3"


class _Tokenizer:
    """Decodes like a byte-level BPE tokenizer: spaces and newlines inside tokens."""

    def decode(self, ids):
        return {5: " Hello", 6: "\n", 7: "world"}[ids[0]]


class _Model:
    tokenizer = _Tokenizer()

    def to_str_tokens(self, tokens):
        raise RuntimeError("no to_str_tokens")


def test_token_labels_are_readable():
    assert report.token_labels(_Model(), torch.tensor([5, 6, 7])) == ["·Hello", "↵", "world"]


def _synthetic_decomposition(pattern, A):
    L, B, H, T, _ = pattern.shape
    zeros = torch.zeros(L, B, T, H, 2, dtype=torch.float64)
    return pl.HeadDecomposition(n_slots=1, prefix_attention=A, content_output=zeros, prefix_bias=zeros, z=zeros,
                                content_pattern=pattern)


def test_entropy_deficit_and_head_selection():
    T = 4
    causal = torch.tril(torch.ones(T, T, dtype=torch.float64))
    uniform = causal / causal.sum(-1, keepdim=True)
    scores = torch.randn(T, T, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 3
    peaked = scores.masked_fill(causal == 0, float("-inf")).softmax(-1)
    # layer 0: head 0 uniform, head 1 peaked; layer 1: head 0 peaked, head 1 uniform
    pattern = torch.stack([torch.stack([uniform, peaked]), torch.stack([peaked, uniform])])[:, None]  # [L, B, H, T, T]
    A = torch.tensor([[0.5, 0.5], [0.95, 0.5]], dtype=torch.float64)[:, None, :, None].expand(2, 1, 2, T).clone()
    d = _synthetic_decomposition(pattern, A)
    deficit = report.entropy_deficit(d)
    # independently: log n - H over the queries that see >= 3 keys (n = 3, 4)
    rows = [peaked[i, : i + 1] for i in (2, 3)]
    expected = sum(math.log(len(r)) + float((r * r.log()).sum()) for r in rows) / 2
    assert expected > 0.1
    torch.testing.assert_close(deficit, torch.tensor([[0.0, expected], [expected, 0.0]], dtype=torch.float64))
    assert report.select_heads(d, k=1) == [(0, 1)]
    # L1H0 has A = 0.95, outside the default range, so the second head is L1H1
    assert report.select_heads(d, k=2) == [(0, 1), (1, 1)]
    assert report.select_heads(d, k=2, mass_range=(0.0, 1.0)) == [(0, 1), (1, 0)]
    assert report.select_heads(d, k=3, one_per_layer=False, mass_range=(0.0, 1.0)) == [(0, 0), (0, 1), (1, 0)]
    # too few heads in range: the rest are filled from all heads, still in deficit order
    assert report.select_heads(d, k=2, mass_range=(0.9, 1.0)) == [(0, 1), (1, 0)]
    with pytest.raises(ValueError, match="keys"):
        report.entropy_deficit(d, min_keys=T + 1)


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

    def ids(s):
        return set(re.findall(r"id='(pl-[0-9a-f]+-\d+)'", s))

    assert ids(a) and not ids(a) & ids(b), "two displays in one notebook must not share element ids"
    assert rep.to_html().startswith("<!doctype html>")


def _ids(html: str) -> set[str]:
    return set(re.findall(r"id='(pl-[0-9a-f]+-\d+)'", html))


def test_figure_displays_by_itself(setup):
    """Each figure and row is a self-contained notebook output: style, the bundle only if needed, fresh ids."""
    model, tokens, _, prefixes, _ = setup
    d = pl.decompose(model, tokens, prefixes["prompt"])
    row = report.attention_figure(model, tokens, prefixes["prompt"], layer=0, decomposition=d)
    for item in (row, row.figures[0]):
        a, b = item._repr_html_(), item._repr_html_()
        rest = _doc_without_bundle(a)  # the bundle exactly once
        assert rest.startswith("<div class='prefixlens-report'><style>") and rest.endswith("</div>")
        assert "CircuitsVis.render(" in rest and "<script" in rest and "src=" not in rest
        assert _ids(a) and not _ids(a) & _ids(b)
    svg = report.prefix_mass_grid_figure(d)._repr_html_()
    assert "<script" not in svg and "<svg" in svg  # no JavaScript where none is needed
    table = report.summary_figure({"p": d})._repr_html_()
    assert "<script" not in table and "<table" in table


def test_jupyter_displays_a_figure_as_html(setup):
    """IPython's display machinery (what shows the last expression of a cell) gives a figure, a row and a
    report their self-contained HTML."""
    formatters = pytest.importorskip("IPython.core.formatters")
    model, tokens, _, prefixes, _ = setup
    d = pl.decompose(model, tokens, prefixes["prompt"])
    html_of = formatters.HTMLFormatter()
    row = report.attention_figure(model, tokens, prefixes["prompt"], layer=0, head=1, decomposition=d)
    for item in (row, row.figures[1], report.Report([row])):
        out = html_of(item)
        assert out and out.count(report.circuitsvis_bundle()) == 1 and "CircuitsVis.render(" in out
    assert "<svg" in html_of(report.prefix_mass_grid_figure(d))


def test_attention_views_name_head_and_prefix(setup):
    model, tokens, prompt, prefixes, _ = setup
    d = pl.decompose(model, tokens, prefixes["prompt"])
    row = report.attention_figure(model, tokens, prefixes["prompt"], layer=1, head=2, decomposition=d,
                                  prefix_name="the prompt", slot_names=["a", "b", "c"])
    assert row.title.startswith("L1H2") and "the prompt" in row.title
    assert all(f.title.startswith("L1H2 · ") and "the prompt" in f.title for f in row.figures)
    assert row.figures[0].props["tokens"][:3] == ["[a]", "[b]", "[c]"]
    every = report.attention_figure(model, tokens, prefixes["prompt"], layer=0, decomposition=d)
    assert all(f.title.startswith("L0, all 4 heads") for f in every.figures)
    with pytest.raises(ValueError, match="slot names"):
        report.attention_figure(model, tokens, prefixes["prompt"], layer=0, decomposition=d, slot_names=["a"])
    # in a row, an attention view's width follows its number of tokens (equal cells, room for labels)
    text = report.render_html([row])
    P = prefixes["prompt"].length
    assert text.count(f"style='flex-grow:{P + T}'") == 1 and text.count(f"style='flex-grow:{T}'") == 2


def test_table_figure_escapes_and_aligns():
    fig = report.table_figure("t", ["q", "n"], [["<b>x</b>\ny", 1.5]], caption="c", text_columns=[0])
    markup = fig.props["markup"]
    assert "&lt;b&gt;x&lt;/b&gt;\ny" in markup and "<b>" not in markup
    assert markup.count("class='pl-text'") == 2 and fig.data["rows"] == [["<b>x</b>\ny", 1.5]]


def test_bad_figures():
    with pytest.raises(ValueError, match="markup"):
        report.Figure("x", "svg", {})
    with pytest.raises(TypeError, match="Figure and Row"):
        report.render_html([42])
    with pytest.raises(ValueError, match="component"):
        report.render_html([report.Figure("x", "Bad name();", {})])
    with pytest.raises(ValueError, match="svg"):
        report.svg_figure("x", "<div/>")


def test_figures_take_text_like_the_rest_of_the_api(setup):
    """A string or a list of strings works wherever ids do (content after the prefix: no BOS), and gives
    the figure the ids give; a ragged list shows the chosen example without its padding."""
    model, _, _, prefixes, dtype = setup
    prefix = prefixes["prompt"]
    # ids without the digits 0, 1, 2: the toy tokenizer's special tokens "0", "1", "2" split words like "14"
    tokens = torch.tensor([[3, 5, 7, 9, 33, 35], [4, 6, 8, 34, 36, 38], [39, 44, 45, 46, 47, 48]])
    texts = [" ".join(str(int(t)) for t in row) for row in tokens]
    by_ids = report.attention_figure(model, tokens[1:2], prefix, layer=1)
    by_text = report.attention_figure(model, texts[1], prefix, layer=1)
    for a, b in zip(by_ids.figures, by_text.figures):
        assert a.props["tokens"] == b.props["tokens"] and torch.equal(a.props["attention"], b.props["attention"])
    ragged = [texts[0], " ".join(texts[1].split()[:3])]
    short = report.attention_figure(model, ragged, prefix, layer=1, example=1)
    alone = report.attention_figure(model, tokens[1:2, :3], prefix, layer=1)
    for a, b in zip(short.figures, alone.figures):
        assert a.props["tokens"] == b.props["tokens"]
        torch.testing.assert_close(a.props["attention"], b.props["attention"], atol=TOL[dtype], rtol=0)
    fig_t = report.bias_shift_figure(model, texts, prefixes, layer=1)
    fig_i = report.bias_shift_figure(model, tokens, prefixes, layer=1)
    torch.testing.assert_close(fig_t.data["points"], fig_i.data["points"], atol=0, rtol=0)
    d = pl.decompose(model, tokens[:1], prefix)
    mass_t = report.prefix_mass_figure(d, texts[0], model=model, interactive=False)
    mass_i = report.prefix_mass_figure(d, tokens[:1], model=model, interactive=False)
    assert mass_t.data["tokens"] == mass_i.data["tokens"]
    with pytest.raises(ValueError, match="needs model="):
        report.prefix_mass_figure(d, texts[0])
    assert _hook_count(model) == 0


def test_figures_without_a_prefix(setup):
    """``prefix=None``: the plain run's attention, P = 0 (the baseline view)."""
    model, tokens, _, _, dtype = setup
    row = report.attention_figure(model, tokens, None, layer=1, head=0)
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens[:1], names_filter="blocks.1.attn.hook_pattern")
    own = cache["blocks.1.attn.hook_pattern"][0, 0]
    torch.testing.assert_close(row.figures[0].props["attention"], own.float(), atol=TOL[dtype], rtol=0)
    assert "P = 0" in row.figures[0].title
    text_row = report.attention_figure(model, "3 5 7", None, layer=1)  # text starts the sequence: BOS first
    assert len(text_row.figures[1].props["tokens"]) == 4


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda m, t, p, d: report.attention_figure(m, t, p, layer=2, decomposition=d), IndexError, r"layer 2 .*0\.\.1"),
        pytest.param(lambda m, t, p, d: report.attention_figure(m, t, p, layer=1.0, decomposition=d), TypeError, r"layer must be an int in 0\.\.1", marks=pytest.mark.wrong_types_on_purpose),
        pytest.param(lambda m, t, p, d: report.attention_figure(m, t, p, layer="1", decomposition=d), TypeError, "layer must be an int", marks=pytest.mark.wrong_types_on_purpose),
        (lambda m, t, p, d: report.attention_figure(m, t, p, head=-5, decomposition=d), IndexError, r"head -5 .*-4\.\.-1"),
        (lambda m, t, p, d: report.attention_figure(m, t, p, example=N, decomposition=d), IndexError, r"example 5 .*0\.\.4"),
        pytest.param(lambda m, t, p, d: report.prefix_mass_figure(d, layer=2.5), TypeError, "layer must be an int", marks=pytest.mark.wrong_types_on_purpose),
        (lambda m, t, p, d: report.prefix_mass_figure(d, heads=[(2, 0)]), IndexError, "heads: layer 2"),
        (lambda m, t, p, d: report.prefix_mass_grid_figure(d, example=N), IndexError, r"example 5 .*0\.\.4"),
        (lambda m, t, p, d: report.prefix_mass_grid_figure(d, highlight=[(0, 4)]), IndexError, "highlight: head 4"),
        (lambda m, t, p, d: report.select_heads(d, example=N), IndexError, r"example 5 .*0\.\.4"),
        pytest.param(lambda m, t, p, d: report.bias_shift_figure(m, t, [p], layer=[0, 1]), TypeError, "layer must be one int", marks=pytest.mark.wrong_types_on_purpose),
        (lambda m, t, p, d: report.attention_output_shift(m, t, [p], layers=[3]), IndexError, r"layer 3 .*0\.\.1"),
        (lambda m, t, p, d: report.prefix_mass_figure(d, ["a", "b"]), ValueError, "tokens: got 2 token labels.*7 content"),
        (lambda m, t, p, d: report.attention_figure(m, t, p, slot_names=["a"], decomposition=d), ValueError, "slot_names: got 1"),
        (lambda m, t, p, d: report.svg.heatmap_svg(torch.zeros(2, 3), ["a", "b"], ["x"], 0, 1), ValueError, "cols: 1 labels for 3"),
    ],
)
def test_index_and_label_errors_name_the_argument_and_the_range(setup, call, error, match):
    model, tokens, _, prefixes, _ = setup
    d = pl.decompose(model, tokens, prefixes["prompt"])
    with pytest.raises(error, match=match):
        call(model, tokens, prefixes["prompt"], d)


def test_negative_layer_and_head_count_from_the_end(setup):
    model, tokens, _, prefixes, _ = setup
    d = pl.decompose(model, tokens, prefixes["prompt"])
    last = report.attention_figure(model, tokens, prefixes["prompt"], layer=-1, head=-1, decomposition=d)
    explicit = report.attention_figure(model, tokens, prefixes["prompt"], layer=1, head=3, decomposition=d)
    assert last.title == explicit.title and torch.equal(last.figures[0].props["attention"], explicit.figures[0].props["attention"])
    grid = report.prefix_mass_grid_figure(d, example=-1)
    torch.testing.assert_close(grid.data["A"], d.prefix_attention[:, N - 1].double().mean(-1), atol=0, rtol=0)
