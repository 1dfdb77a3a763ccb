"""Smoke tests of the benchmark scripts: they run end to end and print their ratio rows.

No timing assertions (timings depend on the machine); the full numbers live in benchmarks/results-core.md
and results/benchmark_real_model.md.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def test_core_benchmark_quick_prints_three_ratios(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    out = tmp_path / "results.md"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "core.py"), "--quick", "--out", str(out)],
        cwd=tmp_path, env=env, capture_output=True, text=True,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    for name in ("run_with_prefix", "decompose", "generate"):
        rows = [line for line in proc.stdout.splitlines() if line.startswith(f"| {name} |")]
        assert len(rows) == 1, f"no single row for {name} in:\n{proc.stdout}"
        ratio = rows[0].split("|")[5].strip()
        assert re.fullmatch(r"\d+\.\d{3}", ratio) and float(ratio) > 0, f"{name}: ratio {ratio!r} not measured"
    written = out.read_text()
    assert all(f"| {name} |" in written for name in ("run_with_prefix", "decompose", "generate"))


def test_real_model_benchmark_quick_runs_on_a_local_checkpoint(tmp_path):
    """benchmarks/real_model.py end to end on a tiny saved LLaMA (the real SmolLM2 run is the full one):
    ratio rows for decompose and generate (same tokens as HF's generate), peak memory, JSON + Markdown."""
    import json

    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(
        vocab_size=200, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, attn_implementation="eager", initializer_range=0.3,
    )).save_pretrained(tmp_path / "tiny")
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    out_json, out_md = tmp_path / "real.json", tmp_path / "real.md"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "real_model.py"), "--quick", "--model", str(tmp_path / "tiny"),
         "--out-json", str(out_json), "--out-md", str(out_md)],
        cwd=tmp_path, env=env, capture_output=True, text=True,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    for name in ("decompose", "generate"):
        rows = [line for line in proc.stdout.splitlines() if line.startswith(f"| {name} |")]
        assert len(rows) == 1, f"no single row for {name} in:\n{proc.stdout}"
        ratio = rows[0].split("|")[5].strip()
        assert re.fullmatch(r"\d+\.\d{3}", ratio) and float(ratio) > 0, f"{name}: ratio {ratio!r} not measured"
    result = json.loads(out_json.read_text())
    rows = {r["name"]: r for r in result["rows"]}
    assert "same tokens as HF: yes" in rows["generate"]["note"]
    assert rows["decompose"]["ratio"] > 0 and rows["generate"]["ratio"] > 0
    assert result["memory"]["peak_ratio"] > 0 and result["memory"]["peak_mb"]["decompose"] > 0
    assert result["environment"]["packages"]["torch"]
    assert "| generate |" in out_md.read_text()


def test_training_step_benchmark_records_its_clock_and_environment(tmp_path):
    """benchmarks/training_step.py on a tiny model: the result says which clock timed it (the process
    CPU time with one thread, robust to a loaded machine) and records its environment."""
    import json

    out = tmp_path / "step.json"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "training_step.py"), "--d-model", "16", "--n-layers", "1",
         "--n-heads", "2", "--n-pad", "2", "--batch", "4", "--repeats", "2", "--out", str(out)],
        cwd=tmp_path, env=env, capture_output=True, text=True,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["config"]["clock"] == "cpu" and result["environment"]["packages"]["torch"]
    assert all(v > 0 for v in result["median_ms"].values())


@pytest.mark.parametrize("script", sorted(p.name for p in (ROOT / "benchmarks").glob("*.py") if not p.name.startswith("_")))
def test_benchmarks_time_the_checkout_next_to_them(script, tmp_path):
    """Every benchmark script imports the prefixlens of its own checkout, even where another copy is
    installed (core.py and real_model.py preferred an installed copy: a rerun from a clean clone timed,
    and recorded the commit of, another checkout's code)."""
    other = tmp_path / "other" / "prefixlens"
    other.mkdir(parents=True)
    (other / "__init__.py").write_text('raise SystemExit("imported another prefixlens")\n')
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(tmp_path / "other"))
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), "--help"], cwd=tmp_path, env=env,
                          capture_output=True, text=True)
    assert "imported another prefixlens" not in proc.stderr
    assert proc.returncode == 0, proc.stderr[-2000:]
