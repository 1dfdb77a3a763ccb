"""Generation with a prefix: same tokens as decoding the real prompt, cached or not."""

import pytest
import torch

import prefixlens as pl
from prefixlens.generation import sample_next
from prefixlens.kv_cache import has_kv_cache
from tests.conftest import build, n_attached_hooks, random_tokens


@pytest.mark.parametrize("form", [pl.KVPrefix, pl.ResidualPrefix, pl.SoftPrompt], ids=lambda c: c.__name__)
def test_greedy_matches_real_prompt(family, form):
    model = build(family)
    prompt, x = random_tokens((3,), seed=1), random_tokens((2, 4), seed=2)
    got = pl.generate(model, x, form.from_prompt(model, prompt), max_new_tokens=12)
    full = torch.cat([prompt.expand(2, -1), x], dim=1)
    expected = pl.generate(model, full, max_new_tokens=12, use_cache=False)[:, 3:]
    assert got.shape == (2, 16)
    assert torch.equal(got, expected)
    assert n_attached_hooks(model) == 0


def test_only_hf_backed_bridges_have_a_cache():
    assert has_kv_cache(build("gpt2")) and has_kv_cache(build("llama_gqa"))
    assert not has_kv_cache(build("native"))


def test_sampling_is_seeded_and_batch_size_chunks():
    model = build("gpt2")
    prefix = pl.SoftPrompt.from_prompt(model, random_tokens((6, 2), seed=6))
    x = random_tokens((6, 3), seed=7)
    a = pl.generate(model, x, prefix, max_new_tokens=6, do_sample=True, temperature=1.5, seed=11)
    b = pl.generate(model, x, prefix, max_new_tokens=6, do_sample=True, temperature=1.5, seed=11)
    assert torch.equal(a, b)
    whole = pl.generate(model, x, prefix, max_new_tokens=6)
    chunked = pl.generate(model, x, prefix, max_new_tokens=6, batch_size=4)
    assert torch.equal(whole, chunked)


def test_eos_pads_finished_rows():
    model = build("gpt2")
    x = random_tokens((2, 3), seed=8)
    free = pl.generate(model, x, max_new_tokens=6)
    eos = int(free[0, 4])  # the second generated token of row 0 acts as EOS
    out = pl.generate(model, x, max_new_tokens=6, eos_token_id=eos)
    row = out[0, 3:]
    first = int((row == eos).nonzero()[0])
    assert (row[first:] == eos).all()


def test_sample_next_filters():
    logits = torch.tensor([[0.0, 1.0, 5.0, 2.0]])
    assert int(sample_next(logits)) == 2
    g = torch.Generator().manual_seed(0)
    draws = {int(sample_next(logits, do_sample=True, top_k=1, generator=g)) for _ in range(20)}
    assert draws == {2}
    draws = {int(sample_next(logits, do_sample=True, top_p=0.5, generator=g)) for _ in range(20)}
    assert draws == {2}
    with pytest.raises(ValueError, match="temperature"):
        sample_next(logits, do_sample=True, temperature=0)


def test_generation_errors():
    model = build("gpt2")
    with pytest.raises(ValueError, match="exceeds the model's context"):
        pl.generate(model, random_tokens((1, 60)), pl.KVPrefix.random(model, 2), max_new_tokens=5)
    with pytest.raises(ValueError, match="max_new_tokens"):
        pl.generate(model, random_tokens((1, 3)), max_new_tokens=0)
