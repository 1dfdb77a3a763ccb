"""Every head's output = (1 − A)·t + A·b; the relative content attention is unchanged."""

import pytest
import torch

import prefixlens as pl
from tests.conftest import DECOMPOSITION_TOL, build, n_attached_hooks, random_tokens


@pytest.mark.parametrize("P", [1, 4])
def test_identities_hold_for_every_layer_and_head(family, dtype, P):
    model = build(family, dtype)
    x = random_tokens((3, 7), seed=P)
    prefix = pl.ResidualPrefix.random(model, P, seed=1)
    d = pl.decompose(model, x, prefix)
    L, H = model.cfg.n_layers, model.cfg.n_heads
    assert d.prefix_attention.shape == (L, 3, H, 7)
    assert d.content_output.shape == d.prefix_bias.shape == d.z.shape == (L, 3, 7, H, model.cfg.d_head)
    assert d.content_pattern.shape == d.baseline_pattern.shape == (L, 3, H, 7, 7)
    tol = DECOMPOSITION_TOL[dtype]
    assert d.reconstruction_error() <= tol
    assert d.residual_reconstruction_error().max() <= 10 * tol
    assert d.relative_attention_error().max() <= tol
    # The prefix matters: attention on it is substantial and deeper layer inputs move.
    assert 0.05 < float(d.prefix_attention.mean()) < 0.95
    assert d.cross_layer_shift()[0] <= tol and d.cross_layer_shift()[1] > 0.01
    assert n_attached_hooks(model) == 0


def test_z_is_the_models_own_hook_z(family):
    model = build(family)
    x = random_tokens((2, 5))
    prefix = pl.KVPrefix.random(model, 2, seed=3)
    d = pl.decompose(model, x, prefix, baseline=False)
    _, cache = pl.run_with_cache(model, x, prefix, names_filter=lambda n: n == "blocks.1.attn.hook_z")
    assert torch.equal(d.z[1], cache["blocks.1.attn.hook_z"][:, 2:])
    with pytest.raises(ValueError, match="baseline=False"):
        d.relative_attention_error()


def test_reconstruction_detects_a_wrong_bias(family):
    """The check can fail: corrupting the prefix bias breaks the identity."""
    model = build(family, torch.float64)
    d = pl.decompose(model, random_tokens((2, 5)), pl.KVPrefix.random(model, 2, seed=4).to(torch.float64))
    d.prefix_bias = d.prefix_bias + 1e-3
    assert d.reconstruction_error() > 1e-5


def test_a_real_prompt_is_a_prefix_too():
    """A real-token prompt obeys the same decomposition (prompting is prefixing)."""
    model = build("llama_gqa", torch.float64)
    prompt, x = random_tokens((3,), seed=5), random_tokens((2, 6), seed=6)
    d = pl.decompose(model, x, pl.KVPrefix.from_prompt(model, prompt))
    assert d.reconstruction_error() <= 1e-12 and d.relative_attention_error().max() <= 1e-12


def test_relative_attention_changes_without_patching():
    """Sanity: comparing against the plain run (no input patching) shows a real difference in layer 1."""
    model = build("gpt2", torch.float64)
    x = random_tokens((2, 6), seed=9)
    prefix = pl.ResidualPrefix.random(model, 2, seed=2).to(torch.float64)
    d = pl.decompose(model, x, prefix)
    _, plain = model.run_with_cache(x, names_filter=lambda n: n == "blocks.1.attn.hook_pattern",
                                    position_ids=torch.arange(2, 8).expand(2, 6))
    assert (d.content_pattern[1] - plain["blocks.1.attn.hook_pattern"]).abs().max() > 1e-3


def test_summary_is_plain_numbers():
    d = pl.decompose(build("native"), random_tokens((1, 4)), pl.SoftPrompt.random(build("native"), 2))
    s = d.summary()
    assert isinstance(s["reconstruction_error"], float)
    assert len(s["relative_attention_error_per_layer"]) == 2


# --- every attention implementation the bridges use (issue 14, item 2) -----------------------------

from tests.conftest import HF_FAMILIES, build_hf  # noqa: E402

ALL_FAMILIES = [("build", f) for f in ("gpt2", "llama_gqa", "native")] + [("build_hf", f) for f in HF_FAMILIES]


@pytest.mark.parametrize("builder,family", ALL_FAMILIES, ids=[f for _, f in ALL_FAMILIES])
def test_decomposition_is_exact_on_every_family(builder, family):
    """Checked against the model's own hook_z and hook_pattern, whatever hook_attn_scores carries
    (OPT and GPT-J fire the post-softmax pattern under that name)."""
    model = (build if builder == "build" else build_hf)(family)
    hooks_before = n_attached_hooks(model)  # OPT's bridge keeps hooks of its own on the MLP
    P, x = 3, random_tokens((2, 6), seed=11)
    prefix = pl.KVPrefix.random(model, P, seed=5)
    d = pl.decompose(model, x, prefix)
    assert d.reconstruction_error() <= 1e-5, family
    assert float(d.relative_attention_error().max()) <= 1e-5, family
    names = lambda n: n.endswith(("hook_pattern", "hook_z"))  # noqa: E731
    _, cache = pl.run_with_cache(model, x, prefix, names_filter=names)
    L = int(model.cfg.n_layers)
    pattern = torch.stack([cache[f"blocks.{l}.attn.hook_pattern"] for l in range(L)])[:, :, :, P:]
    own_mass = pattern[..., :P].sum(-1)  # [l, b, h, q]
    assert (d.prefix_attention - own_mass).abs().max() <= 1e-5, family
    assert 0.05 < float(own_mass.mean()) < 0.95  # not vacuous
    own_content = pattern[..., P:] / pattern[..., P:].sum(-1, keepdim=True)
    assert (d.content_pattern - own_content).abs().max() <= 1e-5, family
    z = torch.stack([cache[f"blocks.{l}.attn.hook_z"] for l in range(L)])[:, :, P:]
    assert torch.equal(d.z, z)
    assert n_attached_hooks(model) == hooks_before


def test_post_softmax_bridges_are_found_by_probing_not_by_name():
    from prefixlens.decomposition import attention_sources

    assert attention_sources(build_hf("opt")) == ["pattern", "pattern"]
    assert attention_sources(build_hf("gptj")) == ["pattern", "pattern"]
    assert attention_sources(build_hf("bloom")) == ["scores", "scores"]
    assert attention_sources(build("llama_gqa")) == ["scores", "scores"]
    assert not pl.decomposition.fires_pre_softmax_scores(build_hf("opt"))


def test_unusable_attention_hooks_are_refused_by_name(monkeypatch):
    """A bridge whose attention fires no pattern (sdpa / flash), or scores that are neither the
    logits nor the pattern, is refused with the architecture named."""
    from prefixlens import models
    from prefixlens.decomposition import attention_sources

    model = models.toy_gpt2(n_layers=1, d_model=16, n_heads=2, d_vocab=20, n_ctx=16)
    original = pl.decomposition.cached_run  # the probe's (thread-local) caching run

    def without_pattern(*args, **kwargs):
        logits, cache = original(*args, **kwargs)
        return logits, {k: v for k, v in cache.items() if not k.endswith("hook_pattern")}

    monkeypatch.setattr(pl.decomposition, "cached_run", without_pattern)
    with pytest.raises(ValueError, match=r"GPT2LMHeadModel: layer 0's attention fires no hook_pattern.*eager"):
        pl.decompose(model, random_tokens((1, 4), high=20), pl.KVPrefix.random(model, 2))

    def garbled_scores(*args, **kwargs):
        logits, cache = original(*args, **kwargs)
        return logits, {k: (v * 0.5 if k.endswith("hook_attn_scores") else v) for k, v in cache.items()}

    monkeypatch.setattr(pl.decomposition, "cached_run", garbled_scores)
    with pytest.raises(ValueError, match=r"GPT2LMHeadModel: layer 0's hook_attn_scores is neither"):
        attention_sources(model)


def test_pattern_only_bridges_refuse_an_underflowed_split():
    """From the pattern alone, t is lost where the content's attention underflows to 0: refused, not NaN."""
    model = build_hf("opt")
    prefix = pl.KVPrefix.random(model, 2, seed=1)
    u = torch.randn(prefix.keys.shape[-1], generator=torch.Generator().manual_seed(0))
    prefix.keys.data[..., 0, :, :] = 1e6 * u  # every query scores one slot ~1e6 above the content
    prefix.keys.data[..., 1, :, :] = -1e6 * u
    with pytest.raises(ValueError, match="OPTForCausalLM fires only the post-softmax .* content output t .* float64"):
        pl.decompose(model, random_tokens((2, 5)), prefix, baseline=False)
    # where the bridge fires the pre-softmax scores, the same prefix decomposes exactly
    llama = build("llama_gqa")
    p2 = pl.KVPrefix.random(llama, 2, seed=1)
    p2.keys.data[..., 0, :, :] = 1e6 * u[: p2.keys.shape[-1]]
    p2.keys.data[..., 1, :, :] = -1e6 * u[: p2.keys.shape[-1]]
    assert pl.decompose(llama, random_tokens((2, 5)), p2, baseline=False).reconstruction_error() <= 1e-5


# --- non-finite values surface (issue 14, item 5) ---------------------------------------------------

import math  # noqa: E402


def test_nan_in_a_prefix_shows_in_every_error():
    """A NaN key in layer 0 makes layer 0's prefix attention and output NaN and every pattern of
    layer 1 NaN (its input is NaN): each error of those layers is NaN, never a masked small number."""
    model = build("gpt2")
    prefix = pl.KVPrefix.random(model, 2, seed=1)
    prefix.keys.data[0, 0, 0, 0] = float("nan")
    d = pl.decompose(model, random_tokens((2, 5)), prefix)
    assert torch.isnan(d.baseline_pattern[1]).all()
    rel = d.relative_attention_error()
    assert torch.isfinite(rel[0]) and torch.isnan(rel[1])  # layer 0's content scores never see the slots
    for per_head in (d.reconstruction_error_per_head(), d.residual_reconstruction_error()):
        assert torch.isnan(per_head[0, 0]) and torch.isfinite(per_head[0, 1:]).all()  # only head 0 sees the NaN
        assert torch.isnan(per_head[1]).all()
    assert math.isnan(d.reconstruction_error())
    assert torch.isnan(d.cross_layer_shift()[1])
    s = d.summary()
    assert math.isnan(s["relative_attention_error_per_layer"][1]) and math.isnan(s["reconstruction_error"])
    assert math.isnan(s["mean_prefix_attention_per_layer"][0])
    assert "nan" in repr(d)


# --- train mode: eval semantics, mode restored (issue 14, item 6) -----------------------------------


def _modes(model):
    mods = list(model.modules()) + list(model.original_model.modules())
    return [m.training for m in mods]


def test_decompose_and_from_prompt_use_eval_semantics_and_restore_the_mode():
    from prefixlens import models

    model = models.toy_gpt2(n_layers=2, d_model=32, n_heads=4, d_vocab=61, n_ctx=64, dropout=0.1, seed=3)
    x, prompt = random_tokens((2, 6), seed=1), random_tokens((3,), seed=2)
    expected = [pl.KVPrefix.from_prompt(model, prompt), pl.ResidualPrefix.from_prompt(model, prompt)]
    eval_d = pl.decompose(model, x, expected[0])
    model.train()
    model.original_model.transformer.h[1].attn.attn_dropout.eval()  # a mixed state, restored exactly
    before = _modes(model)
    torch.manual_seed(0)
    kv, resid = pl.KVPrefix.from_prompt(model, prompt), pl.ResidualPrefix.from_prompt(model, prompt)
    assert torch.equal(kv.keys, expected[0].keys) and torch.equal(kv.values, expected[0].values)
    assert torch.equal(resid.resid, expected[1].resid)
    torch.testing.assert_close(resid.to_kv(model).keys, kv.keys, rtol=0, atol=1e-5)
    d = pl.decompose(model, x, kv)
    assert d.reconstruction_error() <= 1e-5
    assert torch.equal(d.z, eval_d.z) and torch.equal(d.prefix_attention, eval_d.prefix_attention)
    assert torch.equal(d.baseline_pattern, eval_d.baseline_pattern)  # the deferred pass too
    assert _modes(model) == before


def test_repr_is_a_short_summary():
    model = build("llama_gqa")
    d = pl.decompose(model, random_tokens((3, 7)), pl.KVPrefix.random(model, 4))
    r = repr(d)
    assert len(r) < 400 and "\n" not in r
    for part in ("layers=2", "batch=3", "n_slots=4", "positions=7", "heads=4", "dtype=float32", "reconstruction_error="):
        assert part in r
    assert "not computed" in r
    d.relative_attention_error()
    assert "relative_attention_error=" in repr(d) and "not computed" not in repr(d)


# --- "baseline" (the run without the prefix) was once called "reference": old spellings warn -------


def test_reference_keyword_is_a_deprecated_spelling_of_baseline():
    model = build("gpt2", torch.float64)
    x, prefix = random_tokens((2, 5), seed=2), pl.KVPrefix.random(model, 2, seed=3).to(torch.float64)
    new = pl.decompose(model, x, prefix, baseline=True)
    with pytest.warns(DeprecationWarning, match=r"decompose\(\.\.\., baseline=\.\.\.\)") as caught:
        old = pl.decompose(model, x, prefix, reference=True)
    assert caught[0].filename == __file__  # points at the caller
    assert old.has_baseline
    assert torch.equal(old.z, new.z) and torch.equal(old.baseline_pattern, new.baseline_pattern)
    assert torch.equal(old.layer_input_shift, new.layer_input_shift)
    with pytest.warns(DeprecationWarning, match="baseline="):
        off = pl.decompose(model, x, prefix, reference=False)
    assert not off.has_baseline
    with pytest.raises(ValueError, match="baseline=False"):
        _ = off.baseline_pattern
    for both in ({"baseline": True, "reference": True}, {"baseline": False, "reference": True}):
        with pytest.raises(TypeError, match="both baseline and reference"):
            pl.decompose(model, x, prefix, **both)
    with pytest.raises(TypeError, match="both baseline and reference"):
        pl.decompose(model, x, prefix, False, reference=False)  # baseline given by position


def test_reference_attributes_are_deprecated_spellings_of_baseline():
    model = build("llama_gqa")
    x, prefix = random_tokens((2, 5), seed=4), pl.ResidualPrefix.random(model, 2, seed=5)
    d = pl.decompose(model, x, prefix)
    with pytest.warns(DeprecationWarning, match="HeadDecomposition.baseline_pattern"):
        old = d.reference_pattern
    assert old is d.baseline_pattern
    with pytest.warns(DeprecationWarning, match="HeadDecomposition.has_baseline"):
        assert d.has_reference is d.has_baseline is True
    off = pl.decompose(model, x, prefix, baseline=False)
    with pytest.warns(DeprecationWarning, match="has_baseline"):
        assert off.has_reference is off.has_baseline is False
    with pytest.warns(DeprecationWarning), pytest.raises(ValueError, match="baseline=False"):
        _ = off.reference_pattern


@pytest.mark.parametrize("family", ["gpt2", "llama_gqa", "native", "opt", "gptj", "bloom", "gemma2"])
def test_decompose_without_a_prefix_is_the_plain_run(family, dtype):
    """``prefix=None``: no slots, so A = 0, t = the head output z of the plain run (``model(x)``'s own
    hook_z), b = 0 (undefined, reported as 0), the content pattern is the model's own pattern and the
    baseline checks are 0. OPT and GPT-J fire only the post-softmax pattern (no slots is not an underflow)."""
    from tests.conftest import FAMILIES, build_hf

    model = build(family, dtype) if family in FAMILIES else build_hf(family, dtype)
    x = random_tokens((2, 5), seed=4)
    hooks_before = n_attached_hooks(model)  # the OPT bridge keeps 4 MLP hooks of its own
    d = pl.decompose(model, x, None)
    names = [f"blocks.{l}.attn.hook_{h}" for l in range(model.cfg.n_layers) for h in ("z", "pattern")]
    with torch.no_grad():
        _, cache = model.run_with_cache(x, names_filter=lambda n: n in names)
    # HF's OPT attention runs its softmax in float32 even in a float64 model (tests/test_masks.py: F64_TOL)
    tol = 1e-6 if family == "opt" and dtype == torch.float64 else DECOMPOSITION_TOL[dtype]
    assert d.n_slots == 0
    assert torch.equal(d.prefix_attention, torch.zeros_like(d.prefix_attention))
    assert torch.equal(d.prefix_bias, torch.zeros_like(d.prefix_bias))
    for l in range(model.cfg.n_layers):
        assert (d.content_output[l] - cache[f"blocks.{l}.attn.hook_z"]).abs().max() <= tol
        assert (d.z[l] - cache[f"blocks.{l}.attn.hook_z"]).abs().max() <= tol
        assert (d.content_pattern[l] - cache[f"blocks.{l}.attn.hook_pattern"]).abs().max() <= tol
    assert d.reconstruction_error() <= tol
    assert float(d.relative_attention_error().max()) <= tol and float(d.cross_layer_shift().max()) <= tol
    assert n_attached_hooks(model) == hooks_before
