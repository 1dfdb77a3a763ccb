"""analyses/longer_prefixes.py: trains tiny prefixes, or analyses saved ones, and writes its tables."""

from __future__ import annotations

import json

import pytest
import torch

import prefixlens as pl
from prefixlens import models, tasks
from tests.test_prefix_bias_only import load_script


@pytest.fixture(scope="module")
def script():
    return load_script("longer_prefixes")


def test_trains_and_reports(script, tmp_path):
    result = script.main(["--pretrain-iters", "3", "--prefix-iters", "3", "--seeds", "0,1", "--length", "3",
                          "--n-inputs", "24", "--n-eval", "16", "--out", str(tmp_path),
                          "--save-prefixes", str(tmp_path / "p")])
    for ext in ("json", "md", "png"):
        assert (tmp_path / f"longer_prefixes.{ext}").stat().st_size > 500
    on_disk = json.loads((tmp_path / "longer_prefixes.json").read_text())
    assert on_disk["command"].startswith("python analyses/longer_prefixes.py --pretrain-iters 3")
    assert [p["seed"] for p in on_disk["prefixes"]] == [0, 1]
    L, H = script.TOY_GPT2["n_layers"], script.TOY_GPT2["n_heads"]
    # every head of every layer, for both queries, trained and init
    for q in ("last_input", "answer"):
        for kind in ("prefix", "init"):
            table = on_disk["per_layer"][q][kind]
            assert len(table["spread_p1_p99"]) == L
            assert all(0.0 <= x <= 1.0 for x in table["spread_p1_p99"] + table["top_slot_share"])
            assert all(x <= 3 + 1e-9 for x in table["value_rank"] + table["bias_erank"])
            heads = on_disk["per_head"][q][kind][0]
            assert torch.tensor(heads["top_slot_share"]).shape == (L, H)
    assert len(on_disk["slot_ranges"]) == 2 * L * H * 3
    assert all(r["p1"] <= r["median"] <= r["p99"] for r in on_disk["slot_ranges"])
    # a trained prefix differs from its initialisation; the init control is the trainer's init
    # (the prefix was trained on the pretrained model: onto the untrained one it loads only by override)
    path, untrained = tmp_path / "p" / "ascending_P3_seed0.safetensors", models.toy_gpt2(**script.TOY_GPT2)
    with pytest.raises(ValueError, match="other weights"):
        pl.Prefix.load(path, untrained)
    trained = pl.Prefix.load(path, untrained, allow_other_weights=True)
    init = pl.ResidualPrefix.random(models.toy_gpt2(**script.TOY_GPT2), 3, seed=0)
    assert 0 < float((trained.resid - init.resid).detach().abs().max()) < 1.0
    md = (tmp_path / "longer_prefixes.md").read_text()
    assert "0.016" in md and "| mean p99−p1 |" in md


def test_saved_prefixes_on_a_checkpoint(script, tmp_path):
    """--model DIR with --prefixes: no training, statistics only."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=tasks.VOCAB, n_positions=32, n_embd=32, n_layer=2, n_head=2, initializer_range=0.3)
    GPT2LMHeadModel(cfg).save_pretrained(tmp_path / "ckpt")
    model = models.load(tmp_path / "ckpt")
    paths = []
    for seed in (0, 1):
        paths.append(tmp_path / f"p{seed}.safetensors")
        pl.ResidualPrefix.random(model, 4, seed=seed).save(paths[-1])
    result = script.main(["--model", str(tmp_path / "ckpt"), "--prefixes", *map(str, paths), "--length", "4",
                          "--n-inputs", "20", "--n-eval", "8", "--out", str(tmp_path / "o")])
    assert [p["name"] for p in result["prefixes"]] == ["p0", "p1"]
    assert "init" not in result["per_layer"]["last_input"]
    assert len(result["per_layer"]["answer"]["prefix"]["bias_erank"]) == 2


def test_bad_arguments(script):
    with pytest.raises(SystemExit):
        script.main(["--length", "0"])
    with pytest.raises(SystemExit):
        script.main(["--seeds", ""])
