import pytest
import torch

from prefixlens.attention_math import causal_scores, combine, expand_kv_heads, prefix_mass, split_attention


def test_prefix_mass_is_stable_when_the_prefix_dominates():
    scores = torch.tensor([[60.0, 0.0, -5.0]], dtype=torch.float32)
    A = prefix_mass(scores, 1)
    assert 0.0 < 1 - float(A) < 1e-20 or float(A) == 1.0
    full = scores.double().softmax(-1)
    assert abs(float(A) - float(full[0, 0])) < 1e-7


def test_split_and_combine_equal_full_attention():
    g = torch.Generator().manual_seed(0)
    B, H, P, T, D = 2, 3, 2, 5, 4
    q, k = torch.randn(B, T, H, D, generator=g, dtype=torch.float64), torch.randn(B, P + T, H, D, generator=g, dtype=torch.float64)
    v = torch.randn(B, P + T, H, D, generator=g, dtype=torch.float64)
    scores = causal_scores(q, k, 2.0)
    z = torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), v)
    A, t, b, pattern = split_attention(scores, v, P)
    assert (combine(A, t, b) - z).abs().max() < 1e-14
    assert torch.allclose(pattern.sum(-1), torch.ones(()).double())
    # relative attention over the content equals the full pattern renormalised
    full = scores.softmax(-1)[..., P:]
    assert (full / full.sum(-1, keepdim=True) - pattern).abs().max() < 1e-14


def test_causal_scores_mask_future_content_only():
    q, k = torch.zeros(1, 3, 1, 2), torch.zeros(1, 5, 1, 2)
    s = causal_scores(q, k, 1.0)[0, 0]
    assert torch.isinf(s[0, 3:]).all() and torch.isfinite(s[0, :3]).all() and torch.isfinite(s[2]).all()


def test_expand_kv_heads_groups_consecutive_query_heads():
    x = torch.arange(2).float().view(1, 1, 2, 1)
    assert expand_kv_heads(x, 4).flatten().tolist() == [0, 0, 1, 1]
    with pytest.raises(ValueError, match="not a multiple"):
        expand_kv_heads(x, 3)


# --------------------------------------------------------------------------------------------------
# issue 16: attention_math is the one home of the per-head formulas
# --------------------------------------------------------------------------------------------------

import collections  # noqa: E402

import prefixlens as pl  # noqa: E402
from prefixlens import analysis, attention_math, decomposition  # noqa: E402
from prefixlens.attention_math import (  # noqa: E402
    attend,
    bias_term,
    content_pattern,
    content_term,
    identity_1_residual,
    identity_2_residual,
    prefix_pattern,
)
from tests.conftest import build, random_tokens  # noqa: E402


def _random_head(seed=0, B=2, H=3, P=2, T=5, D=4):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, T, H, D, generator=g, dtype=torch.float64)
    k = torch.randn(B, P + T, H, D, generator=g, dtype=torch.float64)
    v = torch.randn(B, P + T, H, D, generator=g, dtype=torch.float64)
    return causal_scores(q, k, 2.0), v, P


def test_the_pieces_compose_into_split_attention_and_combine():
    scores, v, P = _random_head()
    A, t, b, pattern = split_attention(scores, v, P)
    assert torch.equal(pattern, content_pattern(scores, P))
    assert torch.equal(t, attend(content_pattern(scores, P), v[:, P:]))
    assert torch.equal(b, attend(prefix_pattern(scores, P), v[:, :P]))
    assert torch.equal(combine(A, t, b), content_term(A, t) + bias_term(A, b))
    # attend takes any leading dimensions (e.g. a layer axis)
    stacked = attend(torch.stack([pattern, pattern]), torch.stack([v[:, P:], v[:, P:]]))
    assert torch.equal(stacked[1], t)


def test_both_identities_vanish_on_exact_attention_and_detect_a_wrong_one():
    scores, v, P = _random_head(seed=1)
    full = scores.softmax(-1)  # [b, h, q, P + T]: the "model's" prefixed pattern at the content queries
    baseline = content_pattern(scores, P)  # the content attention without the prefix (same scores)
    z = attend(full, v)
    assert identity_1_residual(full, baseline, P).abs().max() < 1e-15
    assert identity_2_residual(z, full, baseline, v, P).abs().max() < 1e-14
    wrong = baseline.roll(1, dims=-1)
    assert identity_1_residual(full, wrong, P).abs().max() > 1e-3
    assert identity_2_residual(z + 1e-3, full, baseline, v, P).abs().min() > 0.9e-3


def test_decompose_and_slot_statistics_agree_with_attention_math_on_the_models_own_pattern():
    """Independent of the scores hooks: attention_math's functions on ``log(hook_pattern)`` of a real
    prefixed forward (equal to the scores up to a per-row constant) give decompose's A, t, b and
    slot_statistics' weights, biases and mass; the identities hold on the model's z."""
    model = build("llama_gqa", torch.float64)
    P, tokens = 3, random_tokens((3, 6), seed=2)
    prefix = pl.KVPrefix.random(model, P, seed=4)
    L, H = int(model.cfg.n_layers), int(model.cfg.n_heads)
    _, cache = pl.run_with_cache(model, tokens, prefix, names_filter=lambda n: n.split(".")[-1] in ("hook_pattern", "hook_v", "hook_z"))
    d = pl.decompose(model, tokens, prefix, baseline=True)
    stats = analysis.slot_statistics(model, tokens, prefix, positions=None)
    for l in range(L):
        pattern = cache[f"blocks.{l}.attn.hook_pattern"][:, :, P:]  # content queries, all keys
        v = expand_kv_heads(cache[f"blocks.{l}.attn.hook_v"], H)
        A, t, b, content = split_attention(pattern.log(), v, P)
        torch.testing.assert_close(d.prefix_attention[l], A, rtol=0, atol=1e-12)
        torch.testing.assert_close(d.content_output[l], t, rtol=0, atol=1e-12)
        torch.testing.assert_close(d.prefix_bias[l], b, rtol=0, atol=1e-12)
        torch.testing.assert_close(d.content_pattern[l], content, rtol=0, atol=1e-12)
        z = cache[f"blocks.{l}.attn.hook_z"][:, P:]
        torch.testing.assert_close(combine(A, t, b), z, rtol=0, atol=1e-12)
        assert identity_1_residual(pattern, d.baseline_pattern[l], P).abs().max() < 1e-12
        assert identity_2_residual(z, pattern, d.baseline_pattern[l], v, P).abs().max() < 1e-12
        w = prefix_pattern(pattern.log(), P)  # [b, h, q, p]
        torch.testing.assert_close(stats.weights[l], w.transpose(0, 1).flatten(1, 2), rtol=0, atol=1e-12)
        biases = attend(w, v[:, :P]).permute(2, 0, 1, 3).flatten(1, 2)  # [h, b·q, d]
        torch.testing.assert_close(stats.biases[l], biases, rtol=0, atol=1e-12)
        torch.testing.assert_close(stats.prefix_mass[l], prefix_mass(pattern.log(), P).transpose(0, 1).flatten(1, 2),
                                   rtol=0, atol=1e-12)


@pytest.fixture
def spied(monkeypatch):
    """Count every call of attention_math's functions and of the one prefixed forward
    (``decomposition.prefixed_cache``), wherever the modules that use them bound them."""
    calls = collections.Counter()
    targets = [(attention_math, name) for name in attention_math.__all__] + [(decomposition, "prefixed_cache")]
    for home, name in targets:
        fn = getattr(home, name)

        def wrapper(*args, _fn=fn, _name=name, **kwargs):
            calls[_name] += 1
            return _fn(*args, **kwargs)

        for module in (attention_math, analysis, decomposition):
            if getattr(module, name, None) is fn:
                monkeypatch.setattr(module, name, wrapper)
    return calls


def test_the_formulas_are_not_written_again(spied):
    """decompose, HeadDecomposition, check_identities and slot_statistics compute every per-head
    formula by calling attention_math (and run the prefixed model through one helper): a copy of
    the math written into any of them would leave these counts short."""
    model = build("llama_gqa", torch.float64)
    L, P, tokens = int(model.cfg.n_layers), 2, random_tokens((4, 5), seed=3)
    prefix = pl.ResidualPrefix.random(model, P, seed=1)
    decomposition.attention_sources(model)  # the cached probe pass is not a prefixed run

    spied.clear()
    d = pl.decompose(model, tokens, prefix, baseline=False)
    assert spied["prefixed_cache"] == 1 and spied["split_attention"] == L
    # prefix_pattern twice per layer: inside split_attention (for b), and kept per slot (slot groups)
    assert spied["attend"] == 2 * L and spied["prefix_pattern"] == 2 * L and spied["content_pattern"] == L
    assert spied["prefix_mass"] == L

    spied.clear()
    d.reconstruction(), d.head_contributions()
    assert spied["combine"] == 1 and spied["content_term"] == 2 and spied["bias_term"] == 2
    assert spied["head_residual"] == 2

    spied.clear()
    analysis.check_identities(model, tokens, prefix, batch_size=2)  # two chunks
    assert spied["prefixed_cache"] == 2 * 2  # decompose's run and the pattern run, per chunk
    assert spied["identity_1_residual"] == 2 * L and spied["identity_2_residual"] == 2 * L
    assert spied["combine"] >= 2  # the score-based errors, in every chunk

    spied.clear()
    analysis.slot_statistics(model, tokens, prefix, batch_size=2)
    assert spied["prefixed_cache"] == 2 and spied["prefix_pattern"] == 2 and spied["attend"] == 2
    assert spied["prefix_mass"] == 2
