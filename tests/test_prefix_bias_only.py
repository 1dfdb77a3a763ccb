"""analyses/prefix_bias_only.py: runs end to end on a toy LLaMA, a saved checkpoint and a saved prefix."""

from __future__ import annotations

import importlib.util
import json
import sys
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
    sys.modules[spec.name] = module  # registered, as an import would (dataclasses look their module up)
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
                          "--low-precision-dtype", "", "--no-report", "--out", str(tmp_path)])
    on_disk = _check_result(result, tmp_path, [2], ["float32", "float64"])
    assert len(on_disk["runs"][0]["per_layer"]) == script.TOY_LLAMA["n_layers"]
    assert on_disk["command"].startswith("prefixlens run prefix_bias_only --n-inputs 3")
    assert on_disk["experiment"] == "prefix_bias_only" and on_disk["wall_time_s"] >= 0 and "environment" in on_disk
    assert on_disk["report"] == "skipped (--no-report)" and not (tmp_path / "prefix_bias_only.html").exists()
    md = (tmp_path / "prefix_bias_only.md").read_text()
    assert "Command: `prefixlens run prefix_bias_only --n-inputs 3" in md and "Environment: python" in md
    # the Markdown and figure come back from the JSON alone
    (tmp_path / "prefix_bias_only.md").unlink()
    again = script.main(["--render-only", "--out", str(tmp_path)])
    assert again["runs"] == on_disk["runs"] and (tmp_path / "prefix_bias_only.md").read_text() == md


def test_help_and_default_out(script, help_text):
    """--help shows the docstring's whole first sentence and the options; results go to runs/results by default."""
    from prefixlens.experiment import COMMITTED_RESULTS, DEFAULT_OUT

    text = help_text(script)
    assert "Paper §4 at scale: a prefix only rescales content attention and adds a bias — every layer and head." in text
    assert "prefixlens run prefix_bias_only --model smollm2-135m" in text and "python analyses" not in text
    assert "--low-precision-dtype" in text and "(default: float16)" in text and "--reference-dtype" not in text
    assert "--no-report" in text and f"(default: {DEFAULT_OUT})" in text
    args = script.parse_args([])
    assert args.out == DEFAULT_OUT != COMMITTED_RESULTS and args.stem == "prefix_bias_only"
    assert script.parse_args(["--model", "smollm2-135m"]).stem == "prefix_bias_only_smollm2"


def test_reference_dtype_is_a_deprecated_alias(script, capsys):
    """--reference-dtype (the old name of --low-precision-dtype) still works, with a warning."""
    assert script.parse_args(["--reference-dtype", "bfloat16"]).low_precision_dtype == "bfloat16"
    assert "deprecated: use --low-precision-dtype" in capsys.readouterr().err
    assert script.parse_args(["--reference-dtype", ""]).low_precision_dtype == ""
    assert script.parse_args([]).low_precision_dtype == "float16"
    with pytest.raises(SystemExit):
        script.parse_args(["--reference-dtype", "float8"])


def test_local_checkpoint_and_saved_prefix(script, llama_dir, tmp_path):
    model = models.load(llama_dir)
    prefix_path = tmp_path / "prefix.safetensors"
    pl.KVPrefix.random(model, 2, seed=3).save(prefix_path)
    result = script.main(["--model", str(llama_dir), "--prefix", str(prefix_path), "--n-inputs", "2",
                          "--seq-len", "5", "--low-precision-dtype", "", "--out", str(tmp_path / "o")])
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
    with pytest.raises(SystemExit):  # random ids have no text
        script.main(["--text"])
    with pytest.raises(SystemExit):  # the runner's --out, --threads and --render-only only; no --profile
        script.main(["--profile", "quick"])


def test_smollm2_real_sentences_every_head(script, tmp_path):
    """--model smollm2-135m: real sentences (own tokenizer, padded with a mask), both identities on all 30 × 9 heads."""
    result = script.main(["--model", "smollm2-135m", "--n-inputs", "2", "--lengths", "1,4", "--dtypes", "float32",
                          "--low-precision-dtype", "", "--no-report", "--threads", "2", "--out", str(tmp_path)])
    assert result["config"]["text"] and result["inputs"]["text"] == script.SENTENCES[:2]
    assert (tmp_path / "prefix_bias_only_smollm2.json").exists() and (tmp_path / "prefix_bias_only_smollm2.png").exists()
    md = (tmp_path / "prefix_bias_only_smollm2.md").read_text()
    assert "real English sentences" in md and "4.88e-04" in md and "9.16e-05" in md
    assert result["inputs"]["n_tokens"] == [15, 16] and "15–16 tokens" in md
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
    from prefixlens.experiment import save_figure

    seen = []

    def spy(pattern, baseline, n_slots):
        out = identity_1_residual(pattern, baseline, n_slots)
        seen.append(float(out.abs().max()))
        return out

    monkeypatch.setattr(script, "identity_1_residual", spy)
    args = script.parse_args(["--n-inputs", "2", "--seq-len", "5", "--lengths", "2"])
    save_figure(script.figure({"config": vars(args)}), tmp_path / "f.png")
    assert len(seen) == 2 and max(seen) < TOL[torch.float64]  # layer 0 and the last layer, float64
    assert (tmp_path / "f.png").stat().st_size > 1000
