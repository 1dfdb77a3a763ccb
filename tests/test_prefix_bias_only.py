"""analyses/prefix_bias_only.py: runs end to end on a toy LLaMA, a saved checkpoint and a saved prefix."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

import prefixlens as pl
from prefixlens import models
from tests.conftest import TOL

ROOT = Path(__file__).resolve().parents[1]


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(f"analyses_{name}", ROOT / "analyses" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def script():
    return load_script("prefix_bias_only")


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    """A tiny LLaMA written by save_pretrained: the stand-in for a real local checkpoint."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, initializer_range=0.2,
    )
    path = tmp_path_factory.mktemp("llama")
    LlamaForCausalLM(config).save_pretrained(path)
    return path


def _check_result(result, out: Path, lengths, dtypes):
    assert (out / "prefix_bias_only.json").exists() and (out / "prefix_bias_only.md").exists()
    assert (out / "prefix_bias_only.png").stat().st_size > 1000
    on_disk = json.loads((out / "prefix_bias_only.json").read_text())
    assert on_disk["runs"] == json.loads(json.dumps(result["runs"]))
    seen = {(r["n_slots"], r["dtype"]) for r in result["runs"]}
    assert seen == {(P, d) for P in lengths for d in dtypes}
    for r in result["runs"]:
        tol = TOL[getattr(torch, r["dtype"])]
        assert r["max"]["relative_attention"] < tol and r["max"]["bias_only"] < tol, r["max"]
    md = (out / "prefix_bias_only.md").read_text()
    assert "4.88e-04" in md and "| layer |" in md
    return on_disk


def test_default_toy_llama(script, tmp_path):
    result = script.main(["--n-inputs", "3", "--seq-len", "6", "--lengths", "2", "--batch-size", "2",
                          "--reference-dtype", "", "--no-report", "--out", str(tmp_path)])
    on_disk = _check_result(result, tmp_path, [2], ["float32", "float64"])
    assert len(on_disk["runs"][0]["per_layer"]) == script.TOY_LLAMA["n_layers"]
    assert on_disk["command"].startswith("python analyses/prefix_bias_only.py --n-inputs 3")


def test_local_checkpoint_and_saved_prefix(script, llama_dir, tmp_path):
    model = models.load(llama_dir)
    prefix_path = tmp_path / "prefix.safetensors"
    pl.KVPrefix.random(model, 2, seed=3).save(prefix_path)
    result = script.main(["--model", str(llama_dir), "--prefix", str(prefix_path), "--n-inputs", "2",
                          "--seq-len", "5", "--reference-dtype", "", "--out", str(tmp_path / "o")])
    _check_result(result, tmp_path / "o", [2], ["float32", "float64"])
    page = (tmp_path / "o" / "prefix_bias_only.html").read_text()
    assert result["report"].endswith("prefix_bias_only.html") and "CircuitsVis" in page and "unpkg.com" not in page
    assert result["runs"][0]["prefix"].startswith("KVPrefix from")
    assert len(result["runs"][0]["per_layer"]) == 2


def test_bad_arguments(script):
    with pytest.raises(SystemExit):
        script.main(["--dtypes", "float8"])
    with pytest.raises(SystemExit):
        script.main(["--lengths", "0"])


def test_smollm2_real_sentences_every_head(script, tmp_path):
    """--model smollm2-135m: real sentences (own tokenizer, padded with a mask), both identities on all 30 × 9 heads."""
    result = script.main(["--model", "smollm2-135m", "--n-inputs", "2", "--lengths", "1,4", "--dtypes", "float32",
                          "--reference-dtype", "", "--no-report", "--threads", "2", "--out", str(tmp_path)])
    assert result["config"]["text"] and result["inputs"]["text"] == script.SENTENCES[:2]
    assert (tmp_path / "prefix_bias_only_smollm2.json").exists() and (tmp_path / "prefix_bias_only_smollm2.png").exists()
    md = (tmp_path / "prefix_bias_only_smollm2.md").read_text()
    assert "real English sentences" in md and "4.88e-04" in md and "9.16e-05" in md
    assert {r["n_slots"] for r in result["runs"]} == {1, 4}
    for r in result["runs"]:
        assert r["dtype"] == "float32"
        for name in ("relative_attention", "bias_only"):
            per_head = torch.tensor(r["per_head"][name])
            assert per_head.shape == (30, 9)
            assert bool((per_head < 1e-4).all()), (name, r["n_slots"], float(per_head.max()))
        assert 0 < r["mean_A"] < 1


def test_figure_uses_attention_maths_identity_1(script, tmp_path, monkeypatch):
    """The figure's identity-1 panel is attention_math.identity_1_residual, not the formula written again."""
    from prefixlens.attention_math import identity_1_residual

    seen = []

    def spy(pattern, reference, n_slots):
        out = identity_1_residual(pattern, reference, n_slots)
        seen.append(float(out.abs().max()))
        return out

    monkeypatch.setattr(script, "identity_1_residual", spy)
    args = script.parse_args(["--n-inputs", "2", "--seq-len", "5", "--lengths", "2"])
    script.figure(args, tmp_path / "f.png")
    assert len(seen) == 2 and max(seen) < TOL[torch.float64]  # layer 0 and the last layer, float64
    assert (tmp_path / "f.png").stat().st_size > 1000
