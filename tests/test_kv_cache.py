"""The key/value cache: cached and recomputed decoding agree on every family, and a cache that does not
hold the positions it should is an error, never a silent wrong answer."""

import threading

import pytest
import torch
from transformers import DynamicCache

import prefixlens as pl
from prefixlens import kv_cache, models, tasks, train
from prefixlens.kv_cache import KVCacheError, cached_forward
from tests.conftest import HF_FAMILIES, build, build_hf, n_attached_hooks, random_tokens
from tests.upstream import TL_CACHED_GENERATE_BROKEN, TL_CACHED_GENERATE_REASON


def any_model(family: str):
    return build(family) if family in ("gpt2", "llama_gqa") else build_hf(family)


def hooks_on(model) -> tuple[int, int]:
    """Hook-point hooks anywhere in ``model`` (some bridges, e.g. OPT's, carry hooks of their own), and
    the pre-hooks with which ``cached_forward`` hands the cache to the attention modules."""
    handing_over = [h for m in model.modules() for h in m._forward_pre_hooks.values()
                    if h is kv_cache._hand_cache_under_both_names]
    return n_attached_hooks(model), len(handing_over)


CACHED_FAMILIES = ["gpt2", "llama_gqa", *HF_FAMILIES]


@pytest.mark.parametrize("family", CACHED_FAMILIES)
@pytest.mark.parametrize("with_prefix", [True, False], ids=["prefix", "no-prefix"])
@pytest.mark.parametrize("do_sample", [False, True], ids=["greedy", "sampled"])
def test_cached_generation_equals_recomputed(family, with_prefix, do_sample):
    model = any_model(family)
    before = hooks_on(model)
    prefix = pl.KVPrefix.random(model, 3, seed=3) if with_prefix else None
    x = random_tokens((3, 5), seed=4)
    kwargs = dict(max_new_tokens=8, do_sample=do_sample, temperature=2.0, seed=5)
    cached = pl.generate(model, x, prefix, **kwargs)
    recomputed = pl.generate(model, x, prefix, use_cache=False, **kwargs)
    assert cached.shape == (3, 13)
    assert torch.equal(cached, recomputed)
    assert hooks_on(model) == before


@pytest.mark.parametrize("family", ["gpt2", "llama_gqa"])
def test_cached_forward_holds_every_position_and_matches_the_full_pass(family):
    model = build(family)
    x = random_tokens((2, 7), seed=6)
    before = hooks_on(model)
    logits, cache = cached_forward(model, x[:, :4])
    assert cache.get_seq_length() == 4
    step, cache = cached_forward(model, x[:, 4:], cache)
    assert cache.get_seq_length() == 7
    torch.testing.assert_close(step, model(x)[:, 4:], atol=1e-5, rtol=0)
    assert hooks_on(model) == before  # nothing is left on the model


@pytest.fixture
def cache_that_does_not_grow(monkeypatch):
    """What transformers 5.24 did to the bridge: the cache is handed to attention but never written."""
    monkeypatch.setattr(DynamicCache, "update", lambda self, key_states, value_states, *args, **kwargs: (
        key_states, value_states))


def test_generate_refuses_a_cache_that_does_not_grow(cache_that_does_not_grow):
    model = build("llama_gqa")
    before = hooks_on(model)
    with pytest.raises(KVCacheError, match=r"holds 0 positions after this step, expected 7 .*transformers \d"):
        pl.generate(model, random_tokens((2, 5), seed=1), pl.KVPrefix.random(model, 2, seed=0), max_new_tokens=3)
    assert hooks_on(model) == before
    # the recomputing path does not use the cache and stays available
    pl.generate(model, random_tokens((2, 5), seed=1), max_new_tokens=3, use_cache=False)


def test_shared_pads_training_refuses_a_cache_that_does_not_grow(cache_that_does_not_grow):
    model = models.toy_gpt2(d_vocab=tasks.VOCAB, n_ctx=24, seed=0, n_layers=2, d_model=16, n_heads=2)
    batch = tasks.make_batch("histogram", 8, 4, "train", torch.Generator().manual_seed(0))
    with pytest.raises(KVCacheError, match="share_pads=False"):
        train.batch_loss(model, batch, pl.ResidualPrefix.random(model, 2, seed=0), share_pads=True)
    train.batch_loss(model, batch, pl.ResidualPrefix.random(model, 2, seed=0), share_pads=False)


def test_bridge_generate_without_its_cache_agrees():
    """TransformerLens's own generate, recomputing every step, is an independent decoder."""
    model = build("llama_gqa")
    x = random_tokens((2, 4), seed=5)
    theirs = model.generate(x, max_new_tokens=8, do_sample=False, stop_at_eos=False, verbose=False,
                            use_past_kv_cache=False)
    assert torch.equal(pl.generate(model, x, max_new_tokens=8), theirs)


def test_bridge_generate_with_its_cache_agrees_on_prefixlens_bridges():
    """prefixlens's bridges hand the cache to their attention under both names for good, so the
    bridge's own cached generate is right on every supported transformers."""
    model = build("llama_gqa")
    assert hooks_on(model)[1] == model.cfg.n_layers
    x = random_tokens((2, 4), seed=5)
    theirs = model.generate(x, max_new_tokens=8, do_sample=False, stop_at_eos=False, verbose=False,
                            use_past_kv_cache=True)
    assert torch.equal(pl.generate(model, x, max_new_tokens=8), theirs)


def test_cached_forward_hands_the_cache_over_on_any_bridge():
    """A bridge booted without prefixlens carries no hand-over hooks: cached_forward adds them for the
    call only, and its cached steps are right."""
    model = plain_bridge()
    assert hooks_on(model) == (0, 0)
    x = random_tokens((2, 7), seed=6)
    _, cache = cached_forward(model, x[:, :4])
    step, cache = cached_forward(model, x[:, 4:], cache)
    torch.testing.assert_close(step, model(x)[:, 4:], atol=1e-5, rtol=0)
    assert hooks_on(model) == (0, 0)


def plain_bridge():
    """A tiny LLaMA bridge booted with TransformerBridge directly (as a user might), not by prefixlens."""
    from transformer_lens.model_bridge import TransformerBridge
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    hf = LlamaForCausalLM(LlamaConfig(vocab_size=61, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                      attn_implementation="eager", initializer_range=0.3)).eval()
    model = TransformerBridge.boot_transformers("plain-llama", hf_model=hf, tokenizer=models.toy_tokenizer(61))
    return model.eval()


@pytest.mark.xfail(TL_CACHED_GENERATE_BROKEN, reason=TL_CACHED_GENERATE_REASON, strict=True)
def test_bridge_generate_with_its_cache_agrees_on_a_plain_bridge():
    model = plain_bridge()
    x = random_tokens((2, 4), seed=5)
    theirs = model.generate(x, max_new_tokens=8, do_sample=False, stop_at_eos=False, verbose=False,
                            use_past_kv_cache=True)
    assert torch.equal(pl.generate(model, x, max_new_tokens=8), theirs)


def test_generate_prints_no_deprecation_warning():
    import warnings

    model = build("llama_gqa")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pl.generate(model, random_tokens((2, 4), seed=5), pl.KVPrefix.random(model, 2), max_new_tokens=4)
    assert not [w for w in caught if issubclass(w.category, FutureWarning)], [str(w.message) for w in caught]


def test_cache_handover_hooks_outlive_one_of_two_overlapping_generations():
    """On a bridge without the permanent hand-over (one not built by prefixlens.models), one thread's
    generation leaving must not take the hooks from under another's (transformers >= 5.24 would then
    see an empty cache)."""
    from prefixlens import models
    from prefixlens.kv_cache import _bridge_attention, _bridge_attention_reads_cache, _hands_cache_over

    model = models.toy_gpt2(n_layers=1, d_model=16, n_heads=2, d_vocab=31, n_ctx=16, seed=0)
    for m in _bridge_attention(model):  # strip the permanent hand-over
        m._forward_pre_hooks.clear()
    assert not any(_hands_cache_over(m) for m in _bridge_attention(model))
    first_in, second_in, first_out = threading.Event(), threading.Event(), threading.Event()

    def first():
        with _bridge_attention_reads_cache(model):
            first_in.set()
            second_in.wait(30)
        first_out.set()

    t = threading.Thread(target=first)
    t.start()
    assert first_in.wait(30)
    with _bridge_attention_reads_cache(model):
        second_in.set()
        assert first_out.wait(30)
        assert all(_hands_cache_over(m) for m in _bridge_attention(model))
    t.join()
    assert not any(_hands_cache_over(m) for m in _bridge_attention(model)), "removed by the last to leave"
