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
