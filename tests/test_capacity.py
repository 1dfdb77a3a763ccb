"""Distinct completions from real vs virtual first positions (prefixlens.capacity + the analysis script)."""

import functools
import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

import prefixlens as pl
from prefixlens import capacity as cap
from prefixlens import models

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def llama():
    return models.toy_llama(n_layers=2, d_model=32, n_heads=4, n_kv_heads=2, d_vocab=13, n_ctx=32, seed=1)


@pytest.fixture(scope="module")
def gpt2():
    return models.toy_gpt2(n_layers=1, d_model=32, n_heads=2, d_vocab=7, n_ctx=32, init_range=0.5, seed=2)


def test_count_and_curve():
    c = torch.tensor([[1, 2], [1, 2], [3, 4], [1, 2], [5, 6]])
    assert cap.count_distinct(c) == 3
    assert cap.distinct_curve(c, [1, 2, 3, 5]) == [1, 1, 2, 3]


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_real_token_prefixes_reproduce_the_token_arm(name, request):
    """A prefix made from a real token is that token: identical completions, in both protocols."""
    model = request.getfixturevalue(name)
    tokens = torch.arange(int(model.cfg.d_vocab))
    plain = cap.greedy_completions(model, tokens, 4, batch_size=8)
    assert plain.shape == (len(tokens), 4)
    for form in ("soft", "residual"):
        assert torch.equal(cap.greedy_completions(model, cap.real_token_prefixes(model, form, tokens), 4, batch_size=8), plain)
    with_c = cap.greedy_completions(model, tokens, 3, content_token=1)
    for form in ("soft", "residual", "kv"):
        prefixes = cap.real_token_prefixes(model, form, tokens)
        assert torch.equal(cap.greedy_completions(model, prefixes, 3, content_token=1), with_c)
    # and the first arm agrees with plain pl.generate on a real prompt
    assert torch.equal(pl.generate(model, tokens[:3, None], None, 4)[:, 1:], plain[:3])


def test_kv_prefix_needs_a_content_token(llama):
    kv = cap.sample_prefixes(llama, "kv", 4)
    with pytest.raises(ValueError, match="content_token"):
        cap.greedy_completions(llama, kv, 3)
    with pytest.raises(ValueError, match="one-slot"):
        cap.greedy_completions(llama, pl.SoftPrompt.random(llama, 2), 3)


def test_gaussian_sampler_matches_the_embedding_statistics(llama):
    n = 4000
    soft = cap.sample_prefixes(llama, "soft", n, "gaussian", seed=3)
    assert soft.batched and soft.batch_size == n and soft.length == 1
    X = pl.SoftPrompt.from_prompt(llama, torch.arange(13)[:, None]).embeddings.detach()[:, 0].double()
    S = soft.embeddings.detach()[:, 0].double()
    sd = X.std(0)
    assert ((S.mean(0) - X.mean(0)).abs() / sd).max() < 0.15  # ~ 4.5 standard errors at n = 4000
    assert ((S.std(0) / sd) - 1).abs().max() < 0.15
    # samples lie in the span of the centred embeddings (rank <= M - 1)
    centred = X - X.mean(0)
    resid = (S - X.mean(0)) - (S - X.mean(0)) @ torch.linalg.pinv(centred) @ centred
    assert resid.abs().max() < 1e-5
    again = cap.sample_prefixes(llama, "soft", n, "gaussian", seed=3)
    assert torch.equal(again.embeddings, soft.embeddings)
    assert not torch.equal(cap.sample_prefixes(llama, "soft", n, "gaussian", seed=4).embeddings, soft.embeddings)


def test_convex_sampler(llama):
    kv = cap.sample_prefixes(llama, "kv", 50, "convex", seed=5, k=1)  # k = 1: exactly a real token's keys
    real = cap.real_token_prefixes(llama, "kv", torch.arange(13))
    for i in range(5):
        assert any(torch.allclose(kv.keys[i], real.keys[j], atol=1e-6) and torch.allclose(kv.values[i], real.values[j], atol=1e-6)
                   for j in range(13))
    res = cap.sample_prefixes(llama, "residual", 200, "convex", seed=5, k=4)
    R = cap.real_token_prefixes(llama, "residual", torch.arange(13)).resid.detach()
    lo, hi = R.min(0).values, R.max(0).values
    assert ((res.resid >= lo - 1e-5) & (res.resid <= hi + 1e-5)).all()  # inside the bounding box of the hull
    with pytest.raises(ValueError, match="k must be"):
        cap.sample_prefixes(llama, "soft", 2, "convex", k=100)
    with pytest.raises(ValueError, match="sampler"):
        cap.sample_prefixes(llama, "soft", 2, "uniform")
    with pytest.raises(ValueError, match="form"):
        cap.sample_prefixes(llama, "lora", 2)


def test_virtual_first_positions_exceed_V(gpt2):
    """The paper's point on a model with V = 7: real tokens give at most 7 completions, soft tokens more."""
    token = cap.run_arm(gpt2, "token", 64, length=6)
    assert token.n == 7 and token.distinct <= 7
    soft = cap.run_arm(gpt2, "soft-gaussian", 64, length=6, seed=1)
    assert soft.n == 64 and soft.distinct > 7
    assert soft.curve[-1] == soft.distinct and soft.ns[-1] == 64
    assert all(a <= b for a, b in zip(soft.curve, soft.curve[1:]))


@functools.cache
def _script():
    spec = importlib.util.spec_from_file_location("analyses_token_vs_soft_token", ROOT / "analyses" / "token_vs_soft_token.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # (dataclasses look their module up while the class is made)
    spec.loader.exec_module(module)
    return module


def test_script_help_and_default_out(help_text):
    """--help shows the docstring's whole first sentence, the profiles and the options; results go to runs/results."""
    from prefixlens.experiment import COMMITTED_RESULTS, DEFAULT_OUT

    script = _script()
    text = help_text(script)
    assert ("Paper §3: distinct greedy completions from a real first token vs a virtual one (soft / residual / KV)."
            in text)
    assert "prefixlens run token_vs_soft_token --model smollm2-135m" in text and "python analyses" not in text
    assert "{auto,one-shot,quick,full}" in text and "(default: auto)" in text
    assert f"(default: {DEFAULT_OUT})" in text and "--render-only" in text and "--render JSON" not in text
    assert script.parse_args([]).out == DEFAULT_OUT != COMMITTED_RESULTS


def test_script_on_a_local_llama_checkpoint(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    hf = LlamaForCausalLM(LlamaConfig(vocab_size=19, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                                      bos_token_id=1, eos_token_id=2, pad_token_id=0))
    hf.save_pretrained(tmp_path / "llama")
    out = tmp_path / "results"
    argv = ["--model", str(tmp_path / "llama"), "--n", "24", "--length", "3", "--out", str(out),
            "--artifacts", str(tmp_path / "art")]
    result = _script().main(argv)
    data = json.loads((out / "token_vs_soft_token.json").read_text())
    assert data["command"] == "prefixlens run token_vs_soft_token " + " ".join(argv)
    assert data["profile"] == "one-shot" and data["settings"] == {"n": 24, "fit_tokens": 4096}
    assert data["experiment"] == "token_vs_soft_token" and data["wall_time_s"] >= 0 and data["environment"]["packages"]
    assert data["reference"]["token"]["distinct"] == 24426
    arms = {(p, row["arm"]): row for p, b in data["models"][0]["protocols"].items() for row in b["arms"]}
    assert set(arms) == {("reference", "token"), ("reference", "soft-gaussian"), ("reference", "soft-convex"),
                         ("reference", "residual-gaussian"), ("prefix", "token"), ("prefix", "soft-gaussian"),
                         ("prefix", "residual-gaussian"), ("prefix", "kv-gaussian")}
    assert arms[("reference", "token")]["n"] == 19 and arms[("prefix", "kv-gaussian")]["n"] == 24
    assert all(1 <= r["distinct"] <= r["n"] for r in arms.values())
    assert all(r["distinct_at_token_n"] <= min(r["distinct"], 19) for r in arms.values())
    assert data["models"][0]["protocols"]["prefix"]["content_token"] == 1
    md = (out / "token_vs_soft_token.md").read_text()
    assert "24,426" in md and "46,812" in md and "kv-gaussian" in md
    assert (out / "token_vs_soft_token.png").read_bytes()[:4] == b"\x89PNG"
    assert result["models"][0]["d_vocab"] == 19
    (out / "token_vs_soft_token.md").unlink()  # the Markdown comes back from the JSON alone
    _script().main(["--render-only", "--out", str(out)])
    assert (out / "token_vs_soft_token.md").read_text() == md


def test_script_trains_and_caches_the_toy_model(tmp_path):
    script = _script()
    args = script.parse_args(["--train-iters", "2", "--artifacts", str(tmp_path)])
    model, desc = script.trained_toy(args)
    assert "final loss" in desc and int(model.cfg.d_vocab) == 10
    again, desc2 = script.trained_toy(args)
    assert "cached" in desc2 and desc2.split("final loss")[1].strip(" )") == desc.split("final loss")[1].strip(" )")
    tokens = torch.arange(10)[:, None]
    assert torch.equal(model(tokens), again(tokens))


def test_sample_prefixes_is_fit_then_draw(llama):
    """sample_prefixes = fit_real_tokens + draw_prefixes with one generator (what the block sampler reuses)."""
    for form, sampler in (("residual", "gaussian"), ("kv", "convex")):
        one = cap.sample_prefixes(llama, form, 6, sampler, seed=7, fit_tokens=8)
        g = torch.Generator().manual_seed(7)
        fit = cap._fit(llama, form, g, 8)
        two = cap.draw_prefixes(fit, 6, sampler, g)
        assert all(torch.equal(a, b) for a, b in zip(cap._flat(one), cap._flat(two)))
        assert torch.equal(fit.tokens, cap.fit_real_tokens(llama, form, seed=7, fit_tokens=8).tokens)


def test_profile_defaults_and_file_names():
    """smollm2-135m defaults to the quick profile; quick and full share their checkpoints (in the folder the
    earlier runs wrote); toy runs keep the one-shot mode and the committed file names."""
    script = _script()
    quick = script.parse_args(["--model", "smollm2-135m"])
    assert quick.profile == "quick" and quick.fit_tokens == 1024 and quick.n == 256
    assert script.default_stem(quick) == script.stem(quick) == "token_vs_soft_token_smollm2_quick"
    full = script.parse_args(["--model", "smollm2-135m", "--profile", "full", "--batch-size", "1024", "--n", "4096"])
    assert script.default_stem(full) == "token_vs_soft_token_smollm2"
    assert script.checkpoint_dir("smollm2-135m", full) == script.checkpoint_dir("smollm2-135m", quick) == (
        ROOT / "artifacts" / "token_vs_soft_token" / "smollm2" / "L10-seed0-fit1024-k4-float32-block256")
    assert script.parse_args(["--model", "smollm2-135m", "--profile", "full"]).n is None  # N = V
    toy = script.parse_args([])
    assert toy.profile == "one-shot" and toy.n == 512 and toy.fit_tokens == 4096 and toy.model == ["toy-trained"]
    assert script.default_stem(toy) == "token_vs_soft_token"
    assert script.stem(script.parse_args(["--model", "smollm2-135m", "--profile", "one-shot"])) == "token_vs_soft_token"
    assert script.stem(script.parse_args(["--profile", "full", "--stem", "mine"])) == "mine"
    assert script.resolve(script.resolve(quick)) is quick and quick.settings.n == 256  # idempotent
    with pytest.raises(SystemExit):
        script.parse_args(["--model", "smollm2-135m", "--block", "0"])


@pytest.mark.slow
def test_profile_blocks_checkpoint_and_resume(tmp_path, monkeypatch):
    """--profile: frozen blocks, quick is the full run's first block, a time budget stops between rounds with
    equal N in every arm, and a rerun resumes from the checkpoints without regenerating them."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    hf = LlamaForCausalLM(LlamaConfig(vocab_size=21, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                                      bos_token_id=1, eos_token_id=2, pad_token_id=0))
    hf.save_pretrained(tmp_path / "llama")
    script = _script()
    common = ["--model", str(tmp_path / "llama"), "--block", "8", "--batch-size", "8", "--length", "3", "--fit-tokens", "12",
              "--out", str(tmp_path / "results"), "--artifacts", str(tmp_path / "art")]
    quick = script.main(common + ["--profile", "quick", "--n", "8"])["models"][0]
    assert quick["status"] == "complete" and quick["n_done"] == 8
    stem = script.default_stem(script.parse_args(common + ["--profile", "quick"]))
    assert stem.startswith("token_vs_soft_token_llama-") and stem.endswith("_quick")
    assert (tmp_path / "results" / f"{stem}.png").exists()
    arms = {(p, r["arm"]) for p, b in quick["protocols"].items() for r in b["arms"]}
    assert arms == {("reference", "token"), ("reference", "soft-gaussian"), ("reference", "soft-convex"),
                    ("reference", "residual-gaussian"), ("prefix", "token"), ("prefix", "kv-gaussian")}

    partial = script.main(common + ["--profile", "full", "--time-budget", "0"])["models"][0]
    assert partial["n_done"] == 8 and partial["status"].startswith("partial: 8 of 21")  # round 1 came from quick
    assert partial["generated_this_invocation_s"] == 0 and partial["projected_full_run_s"] is not None
    full_md = tmp_path / "results" / f"{stem[:-len('_quick')]}.md"
    assert "Projected wall time of the full run" in full_md.read_text()  # the vocabulary is not covered yet

    full = script.main(common + ["--profile", "full"])["models"][0]
    assert full["status"] == "complete" and full["n_done"] == 21
    rows = {(p, r["arm"]): r for p, b in full["protocols"].items() for r in b["arms"]}
    assert all(r["n"] == 21 and 1 <= r["distinct"] <= 21 for r in rows.values())
    qrows = {(p, r["arm"]): r for p, b in quick["protocols"].items() for r in b["arms"]}
    assert all(rows[a]["examples"] == qrows[a]["examples"] for a in rows)  # quick = the first block of full
    data = json.loads((tmp_path / "results" / f"{stem[:-len('_quick')]}.json").read_text())
    assert data["profile"] == "full" and data["environment"]["packages"] and data["wall_time_s"] > 0
    assert data["command"].startswith("prefixlens run token_vs_soft_token --model ")

    def refuse(*a, **k):
        raise AssertionError("a checkpointed block was regenerated")

    monkeypatch.setattr(cap, "greedy_completions", refuse)
    again = script.main(common + ["--profile", "full"])["models"][0]
    assert again["generated_this_invocation_s"] == 0
    assert {(p, r["arm"]): r["distinct"] for p, b in again["protocols"].items() for r in b["arms"]} == \
        {a: r["distinct"] for a, r in rows.items()}
    md = full_md.read_text()
    assert full["n_done"] == full["d_vocab"]  # every first token: nothing left to project
    assert "24,426" in md and "46,812" in md and "complete" in md and "Projected wall time" not in md
    full_md.unlink()
    script.main(common + ["--profile", "full", "--render-only"])  # no model, no run
    assert full_md.read_text() == md


# --- SmolLM2-135M (the built-in real model; loading it takes ~10 s, these tests ~1 min on 2 cores) ----------


@pytest.fixture(scope="module")
def smollm2():
    return models.load("smollm2-135m")


SMOL_TOKENS = torch.tensor([26843, 504, 1000, 2000, 4000, 12345, 30000, 49151])  # "Hi", " the", ...


@pytest.mark.slow
def test_smollm2_batched_greedy_equals_hf_generate(smollm2):
    """Batched greedy completions (KV cache, no BOS) equal HF generate(do_sample=False) token for token."""
    ours = cap.greedy_completions(smollm2, SMOL_TOKENS, 10, batch_size=5)  # two chunks of different sizes
    hf = smollm2.original_model
    eos = hf.generation_config.eos_token_id
    for t, row in zip(SMOL_TOKENS, ours):
        ids = torch.tensor([[int(t)]])
        with torch.inference_mode():
            theirs = hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=10,
                                 pad_token_id=0)[0, 1:]
        n = theirs.shape[0]  # HF stops at EOS; ours keeps going greedily
        assert torch.equal(row[:n], theirs), (int(t), row.tolist(), theirs.tolist())
        assert n == 10 or int(theirs[-1]) in ([eos] if isinstance(eos, int) else list(eos))


@pytest.mark.slow
def test_smollm2_real_token_prefixes_give_the_tokens_completion(smollm2):
    """A one-slot soft / residual prefix built from a real token (from_prompt) completes like the token itself
    (reference protocol); a one-slot KV prefix like the token with the content token after it."""
    tokens = SMOL_TOKENS[:6]
    plain = cap.greedy_completions(smollm2, tokens, 10)
    for form in ("soft", "residual"):
        virtual = cap.greedy_completions(smollm2, cap.real_token_prefixes(smollm2, form, tokens), 10)
        assert torch.equal(virtual, plain), form
    c = 1
    with_c = cap.greedy_completions(smollm2, tokens, 10, content_token=c)
    assert torch.equal(cap.greedy_completions(smollm2, cap.real_token_prefixes(smollm2, "kv", tokens), 10,
                                              content_token=c), with_c)
    assert torch.equal(pl.generate(smollm2, torch.stack([tokens, torch.full_like(tokens, c)], 1), None, 10)[:, 2:],
                       with_c)
