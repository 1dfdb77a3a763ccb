"""The toy-task scripts (table1-3, section6): aggregation, the results JSON contract, the committed
Markdown rendered from the committed JSON, the command line, and tiny end-to-end runs."""

import argparse
import dataclasses
import importlib
import json
import pickle
import re
import shutil
from pathlib import Path

import pytest

from prefixlens import cli
from prefixlens.experiment import COMMITTED_RESULTS, DEFAULT_OUT, NOTES_MARKER

ROOT = Path(__file__).resolve().parents[1]
ANALYSES = ROOT / "analyses"


def script(name: str):
    """``analyses/<name>.py``, imported as ``prefixlens run`` imports it."""
    return cli.load_analysis(name, ANALYSES)


script("table1")  # puts analyses/ on sys.path, as `prefixlens run` does
_common = importlib.import_module("_common")

ROWS = {
    "table1": {"pretrained", "full_finetune_descending", "prefix_descending"},
    "table2": {"pretrained"} | {f"prefix_{t}" for t in ("ascending", "descending", "add1", "add2")},
    "table3": {"pretrained"} | {f"prefix_{t}" for t in ("ascending", "descending", "add1", "add2", "ascending_add1", "histogram")},
    "section6": {"prefix", "lora", "prefix_mlp_matched", "lora_mlp_only"},
}
COLUMNS = {"ascending", "descending", "add1", "add2", "ascending_add1", "histogram"}
FIRST_SENTENCES = {
    "table1": "Table 1: pretrain on ascending sort; full fine-tuning vs prefix-tuning on descending sort.",
    "table2": "Table 2: pretrain on the four-task mixture (no task marker); one prefix per task elicits that task.",
    "table3": "Table 3: a 4-layer mixture model; prefixes for the four tasks, ascending-then-+1 (learnable) and "
              "histogram (not learnable); the full cross-task matrix.",
    "section6": "Section 6: histogram with a prefix vs LoRA at equal parameter counts.",
}
# cells of the committed results, as their Markdown shows them (mean [95% CI] (the paper's))
COMMITTED_CELLS = {
    "table1": ["| pretrained | 98.4 [97.6, 99.1] (91±5) | 0.0 [0.0, 0.1] (0±0) |",
               "| prefix_descending | 0.4 [0.0, 1.3] (0±0) | 0.0 [0.0, 0.1] (0–1) |"],
    "table2": ["| prefix_add2 | 0.0 [0.0, 0.1] (0±0) | 0.0 [0.0, 0.1] (0±0) | 0.0 [0.0, 0.1] (1±2) | 99.4 [97.6, 100.0] (98±5) |"],
    "table3": ["| 55.1 [20.3, 90.0] (93) |", "- met: prefix_ascending_add1 on ascending_add1 = 55.1% (target >= 50%)"],
    "section6": ["| lora (12288 params) | 95.4 [90.9, 99.8] (92.38) |",
                 "- met: lora_mlp_only on histogram = 83.5% (target >= 70%)"],
}


def test_cell_mean_and_interval():
    c = _common.cell([(900, 1000), (950, 1000), (1000, 1000)])
    assert c["mean"] == pytest.approx(0.95) and c["per_seed"] == [0.9, 0.95, 1.0]
    lo, hi = c["ci95"]
    assert lo < 0.9 and hi == 1.0
    z = _common.cell([(0, 1000)] * 3)
    assert z["mean"] == 0 and z["ci95"][0] == 0 and 0 < z["ci95"][1] < 0.002  # pooled Wilson, not [0, 0]
    agg = _common.aggregate([{"r": {"a": (1, 2)}}, {"r": {"a": (2, 2)}}])
    assert agg["r"]["a"]["mean"] == pytest.approx(0.75)


def _check_contract(data, name):
    assert data["experiment"] == name
    assert data["profile"] in ("quick", "paper")
    assert isinstance(data["seeds"], int) and data["seeds"] >= 1
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
    assert path.exists(), f"{path} is missing: run `prefixlens run {name} --profile quick --out results` and commit it"
    data = json.loads(path.read_text())
    _check_contract(data, name)
    # the command of the committed run (older runs called the script directly)
    assert data["command"].startswith((f"prefixlens run {name} ", f"python analyses/{name}.py "))
    assert (ROOT / "results" / f"{name}.md").exists()


@pytest.mark.parametrize("name", sorted(ROWS))
def test_committed_markdown_is_rendered_from_the_committed_json(name, tmp_path):
    """``--render-only`` reproduces the committed Markdown from the committed JSON (the hand-written
    notes after the marker aside), and the generated part cites no commits."""
    shutil.copy(ROOT / "results" / f"{name}.json", tmp_path)
    script(name).main(["--render-only", "--out", str(tmp_path)])
    rendered = (tmp_path / f"{name}.md").read_text()
    committed = (ROOT / "results" / f"{name}.md").read_text()
    assert committed == rendered or committed.startswith(rendered + "\n" + NOTES_MARKER + "\n")
    assert json.loads((tmp_path / f"{name}.json").read_text()) == json.loads((ROOT / "results" / f"{name}.json").read_text())
    for cell in COMMITTED_CELLS[name]:
        assert cell in rendered
    notes = rendered.partition("\n## Notes\n")[2]  # the environment line names the run's own commit
    assert notes and not re.search(r"commit [0-9a-f]{7}", notes), "commit hashes belong in the notes after the marker"


@pytest.mark.parametrize("name", sorted(ROWS))
def test_help_shows_the_whole_first_sentence_and_every_option(name, help_text):
    module = script(name)
    text = help_text(module)
    assert FIRST_SENTENCES[name] in text and f"prefixlens run {name} --profile quick" in text
    assert cli.list_analyses(ANALYSES)[name] == FIRST_SENTENCES[name]  # what `prefixlens run --list` shows
    for option in ("--seeds", "--jobs", "--device", "--artifacts", "--progress", "--profile", "--out", "--threads",
                   "--render-only"):
        assert option in text
    for action in module.analysis.parser()._actions:
        assert action.help and action.help != argparse.SUPPRESS, action.dest
    assert "quick: A " in text and "paper: The reference's sizes" in text  # the profiles' docstrings


@pytest.mark.parametrize("name", sorted(ROWS))
def test_default_out_is_not_the_committed_results(name):
    args = script(name).analysis.parse_args([])
    assert args.out == DEFAULT_OUT != COMMITTED_RESULTS
    assert args.profile == "quick" and args.seeds == [0, 1, 2] and args.jobs == 2 and args.artifacts == "runs"
    # the worker processes get the arguments and the profile pickled
    assert pickle.loads(pickle.dumps(args)).settings == args.settings


def _run_tiny(name: str, tmp_path, monkeypatch, jobs: int = 1, seeds: str = "2", **profile) -> dict:
    """Run ``name`` with its quick profile changed by ``profile``, 2 seeds (or ``seeds``), into ``tmp_path``;
    the result it wrote, checked against the contract."""
    module = script(name)
    tiny = dataclasses.replace(module.PROFILES["quick"], **profile)
    monkeypatch.setitem(module.PROFILES, "quick", tiny)
    argv = ["--seeds", seeds, "--jobs", str(jobs), "--out", str(tmp_path), "--artifacts", str(tmp_path / "runs")]
    result = module.main(argv)
    data = json.loads((tmp_path / f"{name}.json").read_text())
    assert data == result
    _check_contract(data, name)
    assert data["command"] == "prefixlens run " + " ".join([name, *argv])
    assert data["settings"] == dataclasses.asdict(tiny) and data["wall_time_s"] >= 0 and "environment" in data
    assert (tmp_path / f"{name}.md").read_text() == module.markdown(data)
    return data


TINY_MODEL = dict(n_layers=1, n_heads=1, d_model=16, dropout=0.0)


@pytest.mark.slow
def test_table1_end_to_end_tiny(tmp_path, monkeypatch):
    _run_tiny("table1", tmp_path, monkeypatch, model=TINY_MODEL, test_items=40, pretrain=dict(iters=6, lr=1e-2),
              finetune=dict(iters=4, lr=1e-2), prefix=dict(iters=4, lr=1e-2))
    assert "91±5" in (tmp_path / "table1.md").read_text()


@pytest.mark.slow
def test_table2_end_to_end_tiny_in_worker_processes(tmp_path, monkeypatch):
    """Two seeds in two spawned worker processes (the profile and ``run_seed`` pickled); seed 0
    writes the mechanism record and Figure 3 under ``<out>/figures``."""
    data = _run_tiny("table2", tmp_path, monkeypatch, jobs=2, model=TINY_MODEL, n_pad=1, test_items=40,
                     pretrain=dict(iters=6, lr=1e-2), prefix=dict(iters=4, lr=1e-2))
    assert len(data["per_seed_logs"]) == 2 and data["mechanism"]["figure3"]["mean_shift_norm"]
    assert (tmp_path / "figures" / "table2_figure3.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((tmp_path / "figures" / "table2_mechanism.json").read_text())["figure3"] == data["mechanism"]["figure3"]


@pytest.mark.parametrize("name", sorted(ROWS))
def test_seeds_take_a_count_or_an_explicit_list(name):
    """``--seeds 3`` is seeds 0, 1, 2; ``--seeds 11,12,13`` runs exactly those (issue 24), and the run
    records which (``seed_values``; the page names them when they are not 0 .. N-1)."""
    parse = script(name).analysis.parse_args
    assert parse(["--seeds", "3"]).seeds == [0, 1, 2]
    args = parse(["--seeds", "11,12,13", "--jobs", "1"])
    assert args.seeds == [11, 12, 13]
    assert _common.run_seeds(_seed_of, args) == [11, 12, 13]
    assert _common.seed_record(args) == {"seeds": 3, "seed_values": [11, 12, 13]}
    assert _common.seeds_label({"seeds": 3, "seed_values": [11, 12, 13]}) == "3 seeds: 11, 12, 13"
    assert _common.seeds_label({"seeds": 3}) == "3 seeds"  # results made before seed_values was recorded


def _seed_of(args, seed: int) -> int:
    return seed


@pytest.mark.slow
def test_a_rerun_gives_bit_identical_numbers(tmp_path, monkeypatch):
    """Rerunning an analysis with the same command (same commit, lock and machine) gives bit-identical
    numbers: two fresh runs of a tiny table 1 on explicit seeds (no checkpoint shared between them, so
    the second trains again) agree in every accuracy, loss and evaluation, not only approximately."""
    runs = []
    for i in (1, 2):
        out = tmp_path / f"run{i}"
        runs.append(_run_tiny("table1", out, monkeypatch, seeds="5,3", model=TINY_MODEL, test_items=40,
                              pretrain=dict(iters=6, lr=1e-2), finetune=dict(iters=4, lr=1e-2),
                              prefix=dict(iters=4, lr=1e-2)))
    first, second = runs
    assert first["seed_values"] == [5, 3] and "2 seeds: 5, 3" in (tmp_path / "run1" / "table1.md").read_text()
    for key in ("rows", "per_seed_logs", "params"):
        assert json.dumps(first[key]) == json.dumps(second[key]), key
    assert first["per_seed_logs"][0] != first["per_seed_logs"][1]  # the seeds differ: not a trivially equal run


def test_section6_prefix_lengths_match_the_lora_sizes():
    section6 = script("section6")

    from prefixlens import models, tasks

    reference = models.toy_gpt2(n_layers=4, n_heads=4, d_model=256, d_vocab=tasks.VOCAB, n_ctx=31, seed=0)
    assert section6.equal_size_prefix_length(reference, 1, "reference") == 12  # the reference's notebook 04
    assert section6.equal_size_prefix_length(reference, 1, "mlp") == 10
    quick = models.toy_gpt2(n_layers=4, n_heads=4, d_model=64, d_vocab=tasks.VOCAB, n_ctx=68, seed=0)
    assert section6.equal_size_prefix_length(quick, 4, "reference") == 48
    assert section6.equal_size_prefix_length(quick, 4, "mlp") == 40


def test_table3_quick_shares_section6_pretraining_and_histogram_prefix():
    """Table 3's quick profile runs on section 6's model: same shape, pads and pretraining config, and
    its histogram prefix is section 6's MLP-matched one (same length and config; both scripts name runs
    with ``_common.prefix_run_name``), so the checkpoints are trained once for both. Its prefixes keep
    the reference's parameter count."""
    section6, table3 = script("section6"), script("table3")

    from prefixlens import models, tasks, train

    t3, s6 = table3.PROFILES["quick"], section6.PROFILES["quick"]
    assert t3.model == s6.model and t3.pretrain == s6.pretrain
    shape = models.toy_gpt2(d_vocab=tasks.VOCAB, n_ctx=68, seed=0, **s6.model)
    assert t3.n_pad == section6.equal_size_prefix_length(shape, s6.rank, "reference")
    assert t3.prefix_length == section6.equal_size_prefix_length(shape, s6.rank, "mlp")
    assert {**t3.prefix, **t3.prefix_overrides["histogram"]} == s6.prefix
    ref = table3.PROFILES["paper"]
    reference = models.toy_gpt2(d_vocab=tasks.VOCAB, n_ctx=ref.n_pad + 20, seed=0, **ref.model)
    assert train.prefix_parameter_count(shape, t3.prefix_length) == train.prefix_parameter_count(reference, ref.n_pad)


@pytest.mark.slow
def test_section6_end_to_end_tiny(tmp_path, monkeypatch):
    from prefixlens import tasks

    data = _run_tiny("section6", tmp_path, monkeypatch, model=TINY_MODEL, rank=1, test_items=40,
                     pretrain=dict(iters=6, lr=1e-2), prefix=dict(iters=4, lr=1e-2),
                     lora=dict(iters=4, lr=1e-2, eval_every=2), lora_overrides={})
    assert data["rows"]["prefix"]["params"] == 12 * 16 and data["rows"]["lora_mlp_only"]["params"] == 10 * 16
    assert all(len(log["lora"]["position_accuracy"]) == tasks.LENGTH for log in data["per_seed_logs"])


def test_mechanism_on_a_tiny_model(tmp_path):
    from prefixlens import models, tasks, train

    model = models.toy_gpt2(n_layers=2, d_model=16, n_heads=2, d_vocab=tasks.VOCAB, n_ctx=22, seed=0)
    model.requires_grad_(False)
    prefixes = {"pretrained": None, "prefix_add1": train.ResidualPrefix.random(model, 2, seed=1),
                "prefix_add2": train.ResidualPrefix.random(model, 1, seed=2)}
    args = argparse.Namespace(out=str(tmp_path))
    rep = _common.mechanism(args, "tiny", model, prefixes, n_pad=2, seed=0, n_items=16)
    for key in ("prefix_add1", "prefix_add2"):
        assert max(rep["relative_attention_error"][key]["float64"]) < 1e-12
        assert max(rep["relative_attention_error"][key]["float32"]) < 1e-5
        assert rep["figure3"]["mean_shift_norm"][key] > 0
    assert (tmp_path / "figures" / "tiny_figure3.png").stat().st_size > 1000
    assert (tmp_path / "figures" / "tiny_mechanism.json").exists()
    assert sorted(p.name for p in (tmp_path / "figures").iterdir()) == [
        "tiny_figure3.png", "tiny_figure3.safetensors", "tiny_mechanism.json"]  # no temporary files left
    notes = _common.mechanism_notes(rep)
    assert len(notes) == 2 and "float64" in notes[0]
    # no HookPoint keeps a hook (HF's own lazily installed output-capturing hooks are not ours)
    assert all(not hp._forward_hooks for hp in model.hook_dict.values())
