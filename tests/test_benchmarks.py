"""Smoke test of the benchmark script: it runs end to end and prints its three ratio rows.

No timing assertions (timings depend on the machine); the full numbers live in benchmarks/results-core.md.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

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
