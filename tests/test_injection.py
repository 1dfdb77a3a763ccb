"""A virtual prefix equals a real prompt, through every form, on every model family."""

import pytest
import torch

import prefixlens as pl
from tests.conftest import TOL, build, n_attached_hooks, random_tokens

FORMS = [pl.KVPrefix, pl.ResidualPrefix, pl.SoftPrompt]


@pytest.mark.parametrize("P", [1, 3])
@pytest.mark.parametrize("form", FORMS, ids=lambda c: c.__name__)
def test_prefix_from_prompt_equals_real_prompt(family, dtype, form, P):
    model = build(family, dtype)
    prompt, x = random_tokens((P,), seed=1), random_tokens((3, 6), seed=2)
    with torch.no_grad():
        expected = model(torch.cat([prompt.expand(3, -1), x], dim=1))[:, P:]
        prefix = form.from_prompt(model, prompt)
        got = pl.run_with_prefix(model, x, prefix)
        plain = model(x)
    err = (got - expected).abs().max().item()
    assert err <= TOL[dtype], f"{form.__name__} on {family}: max |Δ| = {err:.2e}"
    assert (plain - expected).abs().max() > 1.0, "the prompt must matter, or the test proves nothing"
    assert n_attached_hooks(model) == 0


@pytest.mark.parametrize("form", [pl.ResidualPrefix, pl.SoftPrompt], ids=lambda c: c.__name__)
def test_to_kv_is_exact(family, dtype, form):
    model = build(family, dtype)
    x = random_tokens((2, 5), seed=3)
    prefix = form.random(model, 3, seed=4)
    kv = prefix.to_kv(model)
    assert isinstance(kv, pl.KVPrefix) and kv.length == 3
    with torch.no_grad():
        err = (pl.run_with_prefix(model, x, prefix) - pl.run_with_prefix(model, x, kv)).abs().max().item()
    assert err <= TOL[dtype], f"{form.__name__}.to_kv on {family}: max |Δ| = {err:.2e}"


def test_batched_prefix_one_per_example(family):
    model = build(family)
    prompts, x = random_tokens((3, 2), seed=5), random_tokens((3, 4), seed=6)
    with torch.no_grad():
        expected = model(torch.cat([prompts, x], dim=1))[:, 2:]
        for form in FORMS:
            prefix = form.from_prompt(model, prompts)
            assert prefix.batched and prefix.batch_size == 3
            assert (pl.run_with_prefix(model, x, prefix) - expected).abs().max() <= TOL[torch.float32]
            with pytest.raises(ValueError, match="batch mismatch"):
                pl.run_with_prefix(model, x[:2], prefix)


def test_run_with_cache_covers_slots_and_content(family):
    model = build(family)
    prefix = pl.KVPrefix.random(model, 2, seed=0)
    x = random_tokens((2, 5))
    logits, cache = pl.run_with_cache(model, x, prefix, names_filter=lambda n: n.endswith("hook_pattern"))
    assert logits.shape == (2, 5, 61)
    assert cache["blocks.0.attn.hook_pattern"].shape == (2, 4, 7, 7)
    assert torch.allclose(logits, pl.run_with_prefix(model, x, prefix))
    assert n_attached_hooks(model) == 0


def test_attached_lets_users_run_their_own_hooks(family):
    model = build(family)
    prefix = pl.ResidualPrefix.random(model, 2, seed=1)
    x = random_tokens((1, 4))
    seen = []
    with pl.attached(model, prefix) as slots:
        logits = model.run_with_hooks(
            slots.prepend(x), fwd_hooks=[("blocks.0.hook_resid_pre", lambda a, hook: seen.append(a.clone()))]
        )
        assert n_attached_hooks(model) > 0, "the prefix stays attached between calls inside the block"
    assert n_attached_hooks(model) == 0
    assert torch.allclose(seen[0][0, :2], prefix.resid[0]), "slots carry the prefix"
    assert torch.allclose(slots.content(logits), pl.run_with_prefix(model, x, prefix))


def test_hooks_removed_after_errors(family):
    model = build(family)
    prefix = pl.KVPrefix.random(model, 2)
    with pytest.raises(RuntimeError, match="boom"):
        with pl.attached(model, prefix):
            raise RuntimeError("boom")
    assert n_attached_hooks(model) == 0
    user = model.hook_dict["blocks.0.hook_resid_pre"]
    user.add_hook(lambda a, hook: None)  # a hook the user attached before must survive
    try:
        with pytest.raises(ValueError, match="exceeds the model's context"):
            pl.run_with_prefix(model, random_tokens((1, 63)), prefix)
        with pl.attached(model, prefix):
            pass
        assert n_attached_hooks(model) == 1
    finally:
        user.remove_hooks()
    assert n_attached_hooks(model) == 0


def test_gradients_reach_the_prefix_only(family):
    model = build(family)
    prefix = pl.ResidualPrefix.random(model, 2, seed=0)
    x = random_tokens((2, 5))
    loss = pl.run_with_prefix(model, x, prefix).logsumexp(-1).mean()
    loss.backward()
    assert prefix.resid.grad is not None and prefix.resid.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.parameters())
