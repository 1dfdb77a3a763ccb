"""The analysis runner: command line, record, atomic files, state restored."""

from __future__ import annotations

import dataclasses
import json
import random
from importlib.metadata import version

import pytest
import torch

from prefixlens.experiment import COMMITTED_RESULTS, DEFAULT_OUT, NOTES_MARKER, Analysis, summary

DOC = """A toy analysis: counts to
n and reports it.

    prefixlens run toy --n 3
"""


@dataclasses.dataclass(frozen=True)
class Small:
    """Few steps, for a laptop. More words."""

    n: int = 2


@dataclasses.dataclass(frozen=True)
class Large:
    """Many steps."""

    n: int = 50


def _analysis(figure=False, **over) -> Analysis:
    def run(args):
        torch.manual_seed(123)  # a run seeds itself; the runner restores the caller's state
        random.seed(5)
        return {"count": args.settings.n + args.extra, "threads_inside": torch.get_num_threads()}

    def add_arguments(parser):
        parser.add_argument("--extra", type=int, default=0, help="added to n")
        parser.add_argument("--model", help="a checkpoint (none: a toy model)")

    def plot(result):
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots()
        ax.plot([0, result["count"]])
        return fig

    return Analysis(name="toy", doc=DOC, run=run, markdown=lambda r: f"# toy\n\ncount {r['count']}",
                    figure=plot if figure else None, add_arguments=add_arguments,
                    profiles={"small": Small(), "large": Large()}, **over)


def test_summary_is_the_whole_first_sentence():
    assert summary(DOC) == "A toy analysis: counts to n and reports it."
    assert summary("Table 1: pretrain on ascending sort; fine-tune\non descending.\n\nMore.") == (
        "Table 1: pretrain on ascending sort; fine-tune on descending.")
    assert summary("Counts the\nrows. Then more.") == "Counts the rows."
    assert summary(None) == ""


def test_help_shows_the_docstring_defaults_and_common_options(capsys):
    with pytest.raises(SystemExit) as exit_:
        _analysis().main(["--help"])
    assert exit_.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "A toy analysis: counts to n and reports it." in text
    assert "prefixlens run toy --n 3" in text
    assert "(default: small)" in text and "small: Few steps, for a laptop; large: Many steps" in text
    assert f"(default: {DEFAULT_OUT})" in text and f"'--out {COMMITTED_RESULTS}'" in text
    assert "added to n (default: 0)" in text
    assert "(none: a toy model)" in text and "default: None" not in text and "default: False" not in text


def test_default_out_is_not_the_committed_results():
    args = _analysis().parse_args([])
    assert args.out == DEFAULT_OUT != COMMITTED_RESULTS


def test_main_records_and_writes_atomically(tmp_path):
    result = _analysis(figure=True).main(["--profile", "large", "--extra", "1", "--out", str(tmp_path), "--threads", "1"])
    assert result["count"] == 51 and result["threads_inside"] == 1
    assert result["experiment"] == "toy" and result["profile"] == "large" and result["settings"] == {"n": 50}
    assert result["command"] == "prefixlens run toy --profile large --extra 1 --out " + str(tmp_path) + " --threads 1"
    assert result["wall_time_s"] >= 0 and result["cpu_time_s"] >= 0
    assert result["environment"]["packages"]["torch"] == version("torch")  # the distribution's (no "+cu130")
    assert json.loads((tmp_path / "toy.json").read_text()) == result
    assert (tmp_path / "toy.md").read_text() == "# toy\n\ncount 51\n"
    assert (tmp_path / "toy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["toy.json", "toy.md", "toy.png"]  # no temp files left


def test_render_only_rewrites_from_the_json(tmp_path):
    analysis = _analysis()
    analysis.main(["--out", str(tmp_path)])
    data = json.loads((tmp_path / "toy.json").read_text())
    data["count"] = 99
    (tmp_path / "toy.json").write_text(json.dumps(data))
    again = analysis.main(["--out", str(tmp_path), "--render-only"])
    assert again["count"] == 99 and (tmp_path / "toy.md").read_text() == "# toy\n\ncount 99\n"


def test_render_only_without_a_json_names_the_problem(tmp_path):
    with pytest.raises(SystemExit, match="no .*toy.json to render"):
        _analysis().main(["--out", str(tmp_path), "--render-only"])


@pytest.mark.python_random_state
def test_threads_and_random_state_are_restored(tmp_path):
    threads = torch.get_num_threads()
    torch.manual_seed(7)
    random.seed(7)
    expected_torch, expected_python = torch.rand(3), random.random()
    torch.manual_seed(7)
    random.seed(7)
    _analysis().main(["--out", str(tmp_path), "--threads", "1" if threads != 1 else "2"])
    assert torch.get_num_threads() == threads
    assert torch.equal(torch.rand(3), expected_torch) and random.random() == expected_python


def test_state_is_restored_when_the_run_fails(tmp_path):
    def run(args):
        torch.manual_seed(0)
        raise RuntimeError("boom")

    threads = torch.get_num_threads()
    before = torch.get_rng_state()
    with pytest.raises(RuntimeError, match="boom"):
        Analysis(name="bad", doc="Fails.", run=run, markdown=str).main(["--out", str(tmp_path), "--threads", "1"])
    assert torch.get_num_threads() == threads and torch.equal(torch.get_rng_state(), before)
    assert not (tmp_path / "bad.json").exists()


def test_stem_names_the_files(tmp_path):
    analysis = dataclasses.replace(_analysis(), stem=lambda args: f"toy_{args.profile}")
    analysis.main(["--out", str(tmp_path)])
    assert (tmp_path / "toy_small.json").is_file() and (tmp_path / "toy_small.md").is_file()


def test_hand_written_notes_survive_a_rewrite(tmp_path):
    analysis = _analysis()
    analysis.main(["--out", str(tmp_path)])
    md = tmp_path / "toy.md"
    notes = f"{NOTES_MARKER}\n\n## How the profile was tuned\n\nAt commit abc1234 it reached 90%.\n"
    md.write_text(md.read_text() + "\n" + notes)
    analysis.main(["--out", str(tmp_path), "--extra", "4"])
    assert md.read_text() == "# toy\n\ncount 6\n\n" + notes
    analysis.main(["--out", str(tmp_path), "--render-only"])
    assert md.read_text() == "# toy\n\ncount 6\n\n" + notes
