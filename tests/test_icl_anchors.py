"""analyses/icl_anchors.py end to end on SmolLM2 in its smoke profile (slow: minutes on a shared CPU)."""

from __future__ import annotations

import json

import pytest


@pytest.mark.slow
def test_icl_anchors_smoke(tmp_path):
    from analyses import icl_anchors

    icl_anchors.main(["--profile", "smoke", "--out", str(tmp_path)])
    result = json.loads((tmp_path / "icl_anchors_smollm2.json").read_text())
    assert {p.name for p in tmp_path.iterdir()} >= {"icl_anchors_smollm2.json", "icl_anchors_smollm2.md", "icl_anchors_smollm2.png"}
    summary = result["accuracy"]["afinn-sentiment"]["k"]["1"]["summary"]
    for method in icl_anchors.METHODS:
        assert 0 <= summary[method]["accuracy"]["mean"] <= 1 and summary[method]["accuracy"]["n"] == 2
    assert summary["hidden_anchor"]["prefix_length"] < summary["demonstrations"]["prefix_length"]
    n_layers = result["model_shape"]["n_layers"]
    assert len(result["flow"]["summary"]["S_pq"]) == n_layers
    assert result["bridge"]["relative_attention_error"] < 1e-4  # float32: exact up to rounding
