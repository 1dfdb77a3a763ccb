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
    assert d.content_pattern.shape == d.reference_pattern.shape == (L, 3, H, 7, 7)
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
    d = pl.decompose(model, x, prefix, reference=False)
    _, cache = pl.run_with_cache(model, x, prefix, names_filter=lambda n: n == "blocks.1.attn.hook_z")
    assert torch.equal(d.z[1], cache["blocks.1.attn.hook_z"][:, 2:])
    with pytest.raises(ValueError, match="reference=False"):
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
