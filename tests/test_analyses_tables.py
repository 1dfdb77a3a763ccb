"""The table scripts: aggregation, the results JSON contract, and a tiny end-to-end run."""

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "analyses"))

import _common as C  # noqa: E402

ROWS = {
    "table1": {"pretrained", "full_finetune_descending", "prefix_descending"},
    "table2": {"pretrained"} | {f"prefix_{t}" for t in ("ascending", "descending", "add1", "add2")},
    "table3": {"pretrained"} | {f"prefix_{t}" for t in ("ascending", "descending", "add1", "add2", "ascending_add1", "histogram")},
    "section6": {"prefix", "lora", "prefix_mlp_matched", "lora_mlp_only"},
}
COLUMNS = {"ascending", "descending", "add1", "add2", "ascending_add1", "histogram"}


def test_cell_mean_and_interval():
    c = C.cell([(900, 1000), (950, 1000), (1000, 1000)])
    assert c["mean"] == pytest.approx(0.95) and c["per_seed"] == [0.9, 0.95, 1.0]
    lo, hi = c["ci95"]
    assert lo < 0.9 and hi == 1.0
    z = C.cell([(0, 1000)] * 3)
    assert z["mean"] == 0 and z["ci95"][0] == 0 and 0 < z["ci95"][1] < 0.002  # pooled Wilson, not [0, 0]
    agg = C.aggregate([{"r": {"a": (1, 2)}}, {"r": {"a": (2, 2)}}])
    assert agg["r"]["a"]["mean"] == pytest.approx(0.75)


def _check_contract(data, name):
    assert data["experiment"] == name
    assert data["profile"] in ("quick", "paper")
    assert isinstance(data["seeds"], int) and data["seeds"] >= 1 and data["command"].startswith("python ")
    assert set(data["rows"]) == ROWS[name]
    for _row, cols in data["rows"].items():
        for col, c in cols.items():
            if col == "params":
                assert isinstance(c, int) and c > 0
                continue
            assert col in COLUMNS
            assert 0 <= c["ci95"][0] <= c["mean"] <= c["ci95"][1] <= 1
            assert len(c["per_seed"]) == data["seeds"]
            assert c["mean"] == pytest.approx(sum(c["per_seed"]) / data["seeds"])
    if name == "section6":
        r = data["rows"]
        assert r["prefix"]["params"] == r["lora"]["params"]
        assert r["prefix_mlp_matched"]["params"] == r["lora_mlp_only"]["params"]


@pytest.mark.parametrize("name", sorted(ROWS))
def test_committed_results_follow_the_contract(name):
    path = ROOT / "results" / f"{name}.json"
    assert path.exists(), f"{path} is missing: run analyses/{name}.py --profile quick and commit the result"
    data = json.loads(path.read_text())
    _check_contract(data, name)
    assert (ROOT / "results" / f"{name}.md").exists()


def _run_tiny(script, name: str, profile: dict, tmp_path, monkeypatch) -> dict:
    """Run ``script.main()`` with ``profile`` as its quick profile, 2 seeds, into ``tmp_path``; the
    JSON it wrote, checked against the contract."""
    monkeypatch.setitem(script.PROFILES, "quick", profile)
    monkeypatch.setattr(sys, "argv", [f"{name}.py", "--seeds", "2", "--jobs", "1", "--out", str(tmp_path),
                                      "--artifacts", str(tmp_path / "runs")])
    script.main()
    data = json.loads((tmp_path / f"{name}.json").read_text())
    _check_contract(data, name)
    return data


@pytest.mark.slow
def test_table1_end_to_end_tiny(tmp_path, monkeypatch):
    import table1

    tiny = dict(model=dict(n_layers=1, n_heads=1, d_model=16, dropout=0.0), n_pad=1, test_items=40,
                pretrain=dict(iters=6, lr=1e-2), finetune=dict(iters=4, lr=1e-2), prefix=dict(iters=4, lr=1e-2))
    _run_tiny(table1, "table1", tiny, tmp_path, monkeypatch)
    assert "91±5" in (tmp_path / "table1.md").read_text()


def test_section6_prefix_lengths_match_the_lora_sizes():
    import section6

    from prefixlens import models
    from prefixlens import tasks as T

    reference = models.toy_gpt2(n_layers=4, n_heads=4, d_model=256, d_vocab=T.VOCAB, n_ctx=31, seed=0)
    assert section6.equal_size_prefix_length(reference, 1, "reference") == 12  # the reference's notebook 04
    assert section6.equal_size_prefix_length(reference, 1, "mlp") == 10
    quick = models.toy_gpt2(n_layers=4, n_heads=4, d_model=64, d_vocab=T.VOCAB, n_ctx=68, seed=0)
    assert section6.equal_size_prefix_length(quick, 4, "reference") == 48
    assert section6.equal_size_prefix_length(quick, 4, "mlp") == 40


def test_table3_quick_shares_section6_pretraining_and_histogram_prefix():
    """Table 3's quick profile runs on section 6's model: same shape, pads and pretraining config, and
    its histogram prefix is section 6's MLP-matched one (same length and config; both scripts name runs
    with ``_common.prefix_run_name``), so the checkpoints are trained once for both. Its prefixes keep
    the reference's parameter count."""
    import section6
    import table3

    from prefixlens import models
    from prefixlens import tasks as T
    from prefixlens import train as TR

    t3, s6 = table3.PROFILES["quick"], section6.PROFILES["quick"]
    assert t3["model"] == s6["model"] and t3["pretrain"] == s6["pretrain"]
    shape = models.toy_gpt2(d_vocab=T.VOCAB, n_ctx=68, seed=0, **s6["model"])
    assert t3["n_pad"] == section6.equal_size_prefix_length(shape, s6["rank"], "reference")
    assert t3["prefix_length"] == section6.equal_size_prefix_length(shape, s6["rank"], "mlp")
    assert {**t3["prefix"], **t3["prefix_overrides"]["histogram"]} == s6["prefix"]
    ref = table3.PROFILES["paper"]
    reference = models.toy_gpt2(d_vocab=T.VOCAB, n_ctx=ref["n_pad"] + 20, seed=0, **ref["model"])
    assert TR.prefix_parameter_count(shape, t3["prefix_length"]) == TR.prefix_parameter_count(reference, ref["n_pad"])


@pytest.mark.slow
def test_section6_end_to_end_tiny(tmp_path, monkeypatch):
    import section6

    from prefixlens import tasks as T

    tiny = dict(model=dict(n_layers=1, n_heads=1, d_model=16, dropout=0.0), rank=1, test_items=40,
                pretrain=dict(iters=6, lr=1e-2), prefix=dict(iters=4, lr=1e-2),
                lora=dict(iters=4, lr=1e-2, eval_every=2))
    data = _run_tiny(section6, "section6", tiny, tmp_path, monkeypatch)
    assert data["rows"]["prefix"]["params"] == 12 * 16 and data["rows"]["lora_mlp_only"]["params"] == 10 * 16
    assert all(len(l["lora"]["position_accuracy"]) == T.LENGTH for l in data["per_seed_logs"])


def test_mechanism_on_a_tiny_model(tmp_path):
    import argparse

    from prefixlens import models
    from prefixlens import tasks as T
    from prefixlens import train as TR

    model = models.toy_gpt2(n_layers=2, d_model=16, n_heads=2, d_vocab=T.VOCAB, n_ctx=22, seed=0)
    model.requires_grad_(False)
    prefixes = {"pretrained": None, "prefix_add1": TR.ResidualPrefix.random(model, 2, seed=1),
                "prefix_add2": TR.ResidualPrefix.random(model, 1, seed=2)}
    args = argparse.Namespace(out=str(tmp_path))
    rep = C.mechanism(args, "tiny", model, prefixes, n_pad=2, seed=0, n_items=16)
    for key in ("prefix_add1", "prefix_add2"):
        assert max(rep["relative_attention_error"][key]["float64"]) < 1e-12
        assert max(rep["relative_attention_error"][key]["float32"]) < 1e-5
        assert rep["figure3"]["mean_shift_norm"][key] > 0
    assert (tmp_path / "figures" / "tiny_figure3.png").stat().st_size > 1000
    assert (tmp_path / "figures" / "tiny_mechanism.json").exists()
    notes = C.mechanism_notes(rep)
    assert len(notes) == 2 and "float64" in notes[0]
    # no HookPoint keeps a hook (HF's own lazily installed output-capturing hooks are not ours)
    assert all(not hp._forward_hooks for hp in model.hook_dict.values())
