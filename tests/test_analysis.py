"""prefixlens.analysis: the §4 identities for every layer and head, and the slot statistics."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import prefixlens as pl
from prefixlens import analysis
from tests.conftest import DECOMPOSITION_TOL, build, n_attached_hooks, random_tokens


@pytest.mark.parametrize("family,P", [("gpt2", 1), ("llama_gqa", 1), ("llama_gqa", 3), ("native", 2)])
def test_identities_hold_every_layer_and_head(family, dtype, P):
    model = build(family, dtype)
    prefix = pl.ResidualPrefix.random(model, P, seed=1)
    tokens = random_tokens((5, 9), seed=2)
    check = analysis.check_identities(model, tokens, prefix, batch_size=2)
    L, H = int(model.cfg.n_layers), int(model.cfg.n_heads)
    assert check.relative_attention.shape == (L, H) and check.bias_only.shape == (L, H)
    tol = DECOMPOSITION_TOL[dtype]
    for name in check.ERRORS:
        err = getattr(check, name)
        if err is not None:
            assert float(err.max()) < tol, (name, float(err.max()))
    # the check is not vacuous: the prefix takes real attention, and it moves deeper layers' inputs
    assert float(check.mean_prefix_attention.min()) > 0.01
    assert float(check.cross_layer_shift[1:].min()) > 1e-3
    assert float(check.cross_layer_shift[0]) == 0.0
    assert n_attached_hooks(model) == 0


def test_chunking_does_not_change_the_result():
    model = build("llama_gqa", torch.float64)
    prefix = pl.KVPrefix.random(model, 2, seed=3)
    tokens = random_tokens((6, 7), seed=4)
    whole = analysis.check_identities(model, tokens, prefix, batch_size=6)
    chunks = analysis.check_identities(model, tokens, prefix, batch_size=4)
    torch.testing.assert_close(whole.mean_prefix_attention, chunks.mean_prefix_attention)
    torch.testing.assert_close(whole.max_prefix_attention, chunks.max_prefix_attention)
    torch.testing.assert_close(whole.cross_layer_shift, chunks.cross_layer_shift)
    torch.testing.assert_close(whole.z_scale, chunks.z_scale)
    # mean prefix attention equals decompose's directly
    d = pl.decompose(model, tokens, prefix, baseline=False)
    torch.testing.assert_close(whole.mean_prefix_attention, d.prefix_attention.mean(dim=(1, 3)))


def test_a_broken_identity_is_detected():
    """A hook that nudges one head's output in the prefixed run must show up in the bias-only error."""
    model = build("llama_gqa", torch.float64)
    prefix = pl.ResidualPrefix.random(model, 2, seed=0)
    tokens = random_tokens((3, 6), seed=1)

    def nudge(z, hook):
        z = z.clone()
        z[:, :, 1] += 1e-3
        return z

    with model.hooks(fwd_hooks=[("blocks.0.attn.hook_z", nudge)]):
        check = analysis.check_identities(model, tokens, prefix)
    assert float(check.bias_only[0, 1]) == pytest.approx(1e-3, rel=1e-6)
    assert float(check.bias_only[0, 0]) < 1e-12
    assert float(check.bias_only_scores[0, 1]) == pytest.approx(1e-3, rel=1e-6)
    assert check.max_error("relative_attention") < 1e-12  # layer-0 attention is untouched
    assert n_attached_hooks(model) == 0


def test_json_and_table():
    model = build("gpt2", torch.float32)
    check = analysis.check_identities(model, random_tokens((2, 5)), pl.KVPrefix.random(model, 1))
    js = check.to_json()
    assert js["dtype"] == "float32" and js["n_slots"] == 1 and len(js["per_layer"]) == model.cfg.n_layers
    assert js["max"]["bias_only"] == pytest.approx(max(r["bias_only"] for r in js["per_layer"]))
    assert np.array(js["per_head"]["relative_attention"]).shape == (model.cfg.n_layers, model.cfg.n_heads)


def test_bad_input():
    model = build("gpt2", torch.float32)
    prefix = pl.KVPrefix.random(model, 2)
    with pytest.raises(ValueError, match="batch_size"):
        analysis.check_identities(model, random_tokens((2, 5)), prefix, batch_size=0)
    batched = pl.SoftPrompt(torch.zeros(2, 2, model.cfg.d_model), prefix.signature)
    with pytest.raises(ValueError, match="unbatched"):
        analysis.check_identities(model, random_tokens((2, 5)), batched)
    with pytest.raises(ValueError, match="unbatched"):
        analysis.slot_statistics(model, random_tokens((2, 5)), batched)
    with pytest.raises(ValueError, match="out of range"):
        analysis.slot_statistics(model, random_tokens((2, 5)), prefix, positions=5)
    with pytest.raises(ValueError, match="empty"):
        analysis.slot_statistics(model, random_tokens((2, 5)), prefix, positions=[])
    with pytest.raises(TypeError):
        analysis.check_identities(model, random_tokens((2, 5)).float(), prefix)
    assert n_attached_hooks(model) == 0


# --------------------------------------------------------------------------------------------------
# effective rank
# --------------------------------------------------------------------------------------------------


def test_effective_rank():
    g = torch.Generator().manual_seed(0)
    u, v = torch.randn(20, 1, generator=g, dtype=torch.float64), torch.randn(1, 7, generator=g, dtype=torch.float64)
    assert analysis.effective_rank(u @ v) == pytest.approx(1.0, abs=1e-9)
    assert analysis.effective_rank(torch.eye(5)) == pytest.approx(5.0)
    assert analysis.effective_rank(torch.zeros(4, 3)) == 0.0
    # a constant row plus noise: rank ~1 uncentred is not what the centred rank sees
    rows = torch.ones(50, 4) * 10 + 1e-3 * torch.randn(50, 4, generator=g)
    assert analysis.effective_rank(rows) < 1.01
    assert analysis.effective_rank(rows, center=True) > 3.0
    x = torch.randn(30, 6, generator=g) * torch.tensor([1.0, 1, 1, 0, 0, 0])
    assert analysis.numerical_rank(x) == 3
    assert 1.0 < analysis.effective_rank(x) <= 3.0


@pytest.mark.wrong_types_on_purpose  # a 1-D tensor where Float[Tensor, "n d"] is annotated
def test_effective_rank_refuses_a_vector():
    with pytest.raises(ValueError):
        analysis.effective_rank(torch.zeros(3))


# --------------------------------------------------------------------------------------------------
# slot statistics
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fam", ["llama_gqa", "native"])
def test_slot_statistics_agree_with_decompose(fam):
    model = build(fam, torch.float64)
    prefix = pl.ResidualPrefix.random(model, 4, seed=5)
    tokens = random_tokens((7, 6), seed=6)
    stats = analysis.slot_statistics(model, tokens, prefix, positions=[-1, 2], batch_size=3)
    L, H = int(model.cfg.n_layers), int(model.cfg.n_heads)
    assert stats.weights.shape == (L, H, 14, 4) and stats.positions == [5, 2]
    torch.testing.assert_close(stats.weights.sum(-1), torch.ones(L, H, 14, dtype=torch.float64))
    d = pl.decompose(model, tokens, prefix, baseline=False)
    # queries are ordered (input, position): input 0 pos 5, input 0 pos 2, input 1 pos 5, ...
    b = d.prefix_bias[:, :, [5, 2]].permute(0, 3, 1, 2, 4).flatten(2, 3)  # [l, h, n, d]
    torch.testing.assert_close(stats.biases, b)
    A = d.prefix_attention[..., [5, 2]].permute(0, 2, 1, 3).flatten(2, 3)
    torch.testing.assert_close(stats.prefix_mass, A)
    # the values are the prefix's own (as a KV prefix, expanded to query heads)
    kv = prefix.to_kv(model)
    v = kv.values.repeat_interleave(H // kv.values.shape[-2], dim=-2).permute(0, 2, 1, 3)
    torch.testing.assert_close(stats.values, v)
    # realised biases lie in the span of the values: rank bounded by P
    assert float(stats.bias_erank().max()) <= float(stats.value_rank().max()) + 1e-9


def test_slot_statistics_summaries():
    model = build("gpt2", torch.float64)
    tokens = random_tokens((40, 5), seed=7)
    one = analysis.slot_statistics(model, tokens, pl.KVPrefix.random(model, 1, seed=1))
    assert float(one.spread().abs().max()) == 0.0  # one slot always gets weight 1
    assert float(one.top_slot_share().min()) == pytest.approx(1.0)
    # identical values in every slot: the bias is one fixed vector whatever the weights
    kv = pl.KVPrefix.random(model, 5, seed=2)
    same = pl.KVPrefix(kv.keys.detach(), kv.values.detach()[:, :1].expand_as(kv.values).clone(), kv.signature)
    st = analysis.slot_statistics(model, tokens, same, positions=None)
    assert float(st.value_rank().max()) == 1.0
    assert float(st.bias_erank().max()) == pytest.approx(1.0, abs=1e-6)
    assert float(st.bias_variation().max()) < 1e-10
    assert float(st.weight_erank().min()) > 1.0  # the weights themselves still vary
    # quantiles match numpy's
    q = st.quantiles((0.01, 0.99))
    w = st.weights[0, 0].numpy()
    np.testing.assert_allclose(q[0, 0].numpy(), np.quantile(w, [0.01, 0.99], axis=0).T, rtol=1e-12)
    summ = st.summary()
    assert set(summ) >= {"spread_p1_p99", "top_slot_share", "bias_erank", "value_rank", "weight_erank"}
    assert all(len(v) == model.cfg.n_layers for v in summ.values())
    p = st.slot_entropy_perplexity()
    assert float(p.min()) >= 1.0 and float(p.max()) <= 5.0 + 1e-9


# --------------------------------------------------------------------------------------------------
# issue 14: every attention implementation, non-finite values, train mode, short reprs
# --------------------------------------------------------------------------------------------------

import math  # noqa: E402

from tests.conftest import HF_FAMILIES, build_hf  # noqa: E402

_ALL = [("build", f) for f in ("gpt2", "llama_gqa", "native")] + [("build_hf", f) for f in HF_FAMILIES]


@pytest.mark.parametrize("builder,fam", _ALL, ids=[f for _, f in _ALL])
def test_slot_statistics_match_the_models_own_pattern_on_every_family(builder, fam):
    """Slot weights and prefix mass equal those of the model's hook_pattern, and check_identities
    holds, also where hook_attn_scores carries the post-softmax pattern (OPT, GPT-J)."""
    model = (build if builder == "build" else build_hf)(fam)
    P, tokens = 3, random_tokens((3, 6), seed=8)
    prefix = pl.KVPrefix.random(model, P, seed=5)
    stats = analysis.slot_statistics(model, tokens, prefix, positions=None)
    _, cache = pl.run_with_cache(model, tokens, prefix, names_filter=lambda n: n.endswith("hook_pattern"))
    L = int(model.cfg.n_layers)
    on_slots = torch.stack([cache[f"blocks.{l}.attn.hook_pattern"] for l in range(L)])[:, :, :, P:, :P]
    mass = on_slots.sum(-1)  # [l, b, h, q]
    own_weights = (on_slots / mass.unsqueeze(-1)).permute(0, 2, 1, 3, 4).flatten(2, 3)
    assert (stats.weights - own_weights).abs().max() <= 1e-5, fam
    assert (stats.prefix_mass - mass.permute(0, 2, 1, 3).flatten(2, 3)).abs().max() <= 1e-5, fam
    check = analysis.check_identities(model, tokens, prefix)
    assert check.max_error() <= 1e-5, (fam, check.max_error())


def test_non_finite_values_surface_in_check_identities_and_slot_statistics():
    model = build("gpt2", torch.float32)
    prefix = pl.KVPrefix.random(model, 2, seed=1)
    prefix.keys.data[0, 0, 0, 0] = float("nan")  # layer 0, slot 0, head 0: layer 1 sees a NaN input
    tokens = random_tokens((2, 5))
    check = analysis.check_identities(model, tokens, prefix)
    for name in check.ERRORS:
        err = getattr(check, name)
        if err is not None:
            assert torch.isnan(err[1]).all(), name  # every pattern of layer 1 is NaN
    assert math.isnan(check.max_error()) and math.isnan(check.max_error("renormalised_attention"))
    assert math.isnan(check.per_layer()[1]["relative_attention"]) and math.isnan(check.to_json()["max"]["bias_only"])
    stats = analysis.slot_statistics(model, tokens, prefix)
    assert torch.isnan(stats.weights[1]).all() and torch.isnan(stats.prefix_mass[1]).all()
    assert torch.isnan(stats.bias_erank()[1]).all() and torch.isfinite(stats.value_rank()).all()  # values are finite
    stats.values[1, 0, 0, 0] = float("nan")
    assert torch.isnan(stats.value_rank()[1, 0]) and torch.isnan(stats.value_erank()[1, 0])
    assert math.isnan(analysis.effective_rank(torch.full((3, 2), float("nan"))))
    with pytest.raises(ValueError, match="NaN or infinite"):
        analysis.numerical_rank(torch.full((3, 2), float("inf")))
    summary = stats.summary()
    assert math.isnan(summary["prefix_mass"][1]) and math.isnan(summary["bias_erank"][1])


def test_analysis_runs_in_eval_mode_and_restores_the_mode():
    from prefixlens import models

    model = models.toy_gpt2(n_layers=2, d_model=32, n_heads=4, d_vocab=61, n_ctx=64, dropout=0.1, seed=3)
    prefix, tokens = pl.KVPrefix.random(model, 2, seed=1), random_tokens((3, 5), seed=2)
    expected_check = analysis.check_identities(model, tokens, prefix)
    expected_stats = analysis.slot_statistics(model, tokens, prefix, positions=None)
    model.train()
    torch.manual_seed(0)
    check = analysis.check_identities(model, tokens, prefix)
    stats = analysis.slot_statistics(model, tokens, prefix, positions=None)
    assert model.training and model.original_model.transformer.h[0].attn.attn_dropout.training
    assert check.max_error() <= 1e-5
    for name in check.ERRORS:
        if getattr(check, name) is not None:
            assert torch.equal(getattr(check, name), getattr(expected_check, name)), name
    assert torch.equal(stats.weights, expected_stats.weights) and torch.equal(stats.biases, expected_stats.biases)


def test_reprs_are_short():
    model = build("llama_gqa", torch.float32)
    prefix, tokens = pl.KVPrefix.random(model, 3), random_tokens((4, 6))
    check = analysis.check_identities(model, tokens, prefix)
    stats = analysis.slot_statistics(model, tokens, prefix, positions=None)
    for r in (repr(check), repr(stats)):
        assert len(r) < 500 and "\n" not in r and "tensor" not in r
    assert "IdentityCheck(dtype=float32, layers=2, heads=4, n_slots=3" in repr(check)
    assert "SlotStatistics(layers=2, heads=4, queries=24, n_slots=3" in repr(stats)


def test_no_prefix_in_the_analyses():
    """``check_identities`` without a prefix checks the plain run (A = 0: both identities hold to
    rounding); ``slot_statistics`` has no slots to study and says what to call instead."""
    model = build("llama_gqa", torch.float64)
    x = random_tokens((3, 5), seed=2)
    check = analysis.check_identities(model, x, None)
    assert check.n_slots == 0 and float(check.mean_prefix_attention.max()) == 0.0
    assert float(check.relative_attention.max()) <= DECOMPOSITION_TOL[torch.float64]
    assert float(check.bias_only.max()) <= DECOMPOSITION_TOL[torch.float64]
    with pytest.raises(ValueError, match="prefix=None has none.*decompose"):
        analysis.slot_statistics(model, x, None)


@pytest.mark.wrong_types_on_purpose  # a float and a 0-d tensor where positions is annotated int | list[int]
def test_slot_statistics_positions_name_the_argument_and_the_range():
    model = build("gpt2")
    x, prefix = random_tokens((2, 5), seed=2), pl.KVPrefix.random(model, 2)
    with pytest.raises(ValueError, match=r"positions: content position 5 is out of range: valid are 0\.\.4 \(or -5\.\.-1"):
        analysis.slot_statistics(model, x, prefix, positions=[5])
    with pytest.raises(TypeError, match=r"positions: content positions must be ints, got 1\.0"):
        analysis.slot_statistics(model, x, prefix, positions=1.0)
    last = analysis.slot_statistics(model, x, prefix, positions=torch.tensor(-1))
    assert last.positions == [4]
