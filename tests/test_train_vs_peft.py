"""analyses/train_vs_peft.py on the runner: its command line, and its report rendered from the committed JSON
(the run itself loads SmolLM2 and trains for minutes: ``prefixlens run train_vs_peft --steps 2 --batch 4
--eval-every 1 --n-train 8 --n-test-per-class 4`` is its smoke test)."""

from __future__ import annotations

import importlib.util
import json
import shutil
import sys
from pathlib import Path

import pytest

from prefixlens.experiment import COMMITTED_RESULTS, DEFAULT_OUT, NOTES_MARKER

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def script():
    spec = importlib.util.spec_from_file_location("analyses_train_vs_peft", ROOT / "analyses" / "train_vs_peft.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_help_and_default_out(script, help_text):
    """--help shows the docstring's whole first sentence and every option; results go to runs/results by default."""
    text = help_text(script)
    assert ("prefixlens KV prefix-tuning vs HuggingFace PEFT prefix tuning on SmolLM2: same data, steps, optimiser."
            in text)
    assert "prefixlens run train_vs_peft --steps 30 --eval-every 10" in text and "python analyses" not in text
    assert "held-out words per label (default: 32)" in text and f"(default: {DEFAULT_OUT})" in text
    assert script.analysis.parse_args([]).out == DEFAULT_OUT != COMMITTED_RESULTS


def test_committed_results_render(script, tmp_path):
    """The committed JSON (written before the runner) renders: the same numbers, the notes kept under the marker."""
    for suffix in (".json", ".md"):
        shutil.copy(ROOT / "results" / f"train_vs_peft{suffix}", tmp_path)
    committed = (tmp_path / "train_vs_peft.md").read_text()
    result = script.main(["--render-only", "--out", str(tmp_path)])
    md = (tmp_path / "train_vs_peft.md").read_text()
    assert md == committed  # the committed Markdown is this rendering
    assert result["step0_abs_diff"] < 1e-4 and "| 30 | 0.0009 | 0.0009 | 0.2970 / 95.3% | 0.2962 / 95.3% |" in md
    assert md.index(NOTES_MARKER) > md.index("Command: `python analyses/train_vs_peft.py --steps 30")
    assert "3.0574" in md[md.index(NOTES_MARKER):] and "3.0574" not in md[: md.index(NOTES_MARKER)]
    assert (tmp_path / "train_vs_peft.png").read_bytes()[:4] == b"\x89PNG"
    assert json.loads((tmp_path / "train_vs_peft.json").read_text()) == result
