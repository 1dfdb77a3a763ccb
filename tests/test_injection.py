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


def test_no_prefix_is_the_plain_run(family, dtype):
    """``prefix=None`` is ``model(x)``: ids, an explicit mask on a ragged batch (each row equals the row
    alone, at its real positions), the loss, and ``run_with_cache``."""
    model = build(family, dtype)
    x = random_tokens((3, 6), seed=5)
    with torch.no_grad():
        assert (pl.run_with_prefix(model, x, None) - model(x)).abs().max() <= TOL[dtype]
        loss = pl.run_with_prefix(model, x, None, return_type="loss")
        assert (loss - model(x, return_type="loss")).abs() <= TOL[dtype]
        logits, cache = pl.run_with_cache(model, x, None, names_filter="blocks.1.hook_resid_pre")
        _, own = model.run_with_cache(x, names_filter="blocks.1.hook_resid_pre")
        assert (logits - model(x)).abs().max() <= TOL[dtype]
        assert (cache["blocks.1.hook_resid_pre"] - own["blocks.1.hook_resid_pre"]).abs().max() <= TOL[dtype]
        lengths = [6, 2, 4]  # left padding
        mask = torch.stack([(torch.arange(6) >= 6 - n).long() for n in lengths])
        padded = pl.run_with_prefix(model, x, None, attention_mask=mask)
        for i, n in enumerate(lengths):
            alone = model(x[i : i + 1, -n:])
            assert (padded[i, -n:] - alone[0]).abs().max() <= TOL[dtype], (family, i)
    assert n_attached_hooks(model) == 0


@pytest.mark.parametrize("family", ["gpt2", "llama_gqa"])
def test_no_prefix_takes_text_as_the_start_of_a_sequence(family):
    """Text without a prefix starts the sequence: the model's default BOS, as ``model(text)`` and
    ``generate`` without a prefix; a ragged list equals each row alone."""
    model = build(family)
    with torch.no_grad():
        assert (pl.run_with_prefix(model, "3 5 7", None) - model("3 5 7")).abs().max() <= 1e-5
        texts = ["3 5 7 9", "39", "43 45"]
        batch = pl.run_with_prefix(model, texts, None)
        loss = pl.run_with_prefix(model, texts, None, return_type="loss", loss_per_token=True)
        for i, t in enumerate(texts):
            n = len(t.split()) + 1  # BOS
            assert (batch[i, -n:] - model(t)[0]).abs().max() <= 1e-5
            assert (loss[i, -(n - 1):] - model(t, return_type="loss", loss_per_token=True)[0]).abs().max() <= 1e-5
        no_bos = pl.run_with_prefix(model, "3 5 7", None, prepend_bos=False)
        assert (no_bos - model(ids_of("3 5 7"))).abs().max() <= 1e-5


def ids_of(text: str):
    return torch.tensor([[int(t) for t in text.split()]])
