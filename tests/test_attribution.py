"""Slot groups, bias size and the bias's direct effect, each against an independent computation."""

import pytest
import torch

import prefixlens as pl
from prefixlens import attribution as at
from prefixlens.attention_math import bias_term
from tests.conftest import build, random_tokens

GROUPS = {"sink": [0], "middle": [1, 2]}  # slot 3 (and up) is left over: "other"


def _setup(family, dtype, P=5, B=2, T=6):
    model = build(family, dtype)
    prompt = random_tokens((P,), seed=1)
    content = random_tokens((B, T), seed=2)
    return model, prompt, content, pl.decompose(model, content, pl.KVPrefix.from_prompt(model, prompt), baseline=False)


def test_groups_partition_A_and_the_bias_term_exactly(family, dtype):
    _, _, _, d = _setup(family, dtype)
    split = at.slot_groups(d, GROUPS)
    assert split.names == ["sink", "middle", "other"] and split.slots[-1] == [3, 4]
    tol = {torch.float32: 1e-6, torch.float64: 1e-14}[dtype]
    assert (split.mass.sum(0) - d.prefix_attention).abs().max() <= tol
    assert (split.term.sum(0) - bias_term(d.prefix_attention, d.prefix_bias)).abs().max() <= tol
    assert abs(sum(split.share().values()) - float(d.prefix_attention.mean())) <= tol


def test_group_mass_is_the_real_prompts_attention_on_those_tokens(family):
    """Oracle: the model's own pattern on ``prompt + content``, summed over the group's columns."""
    model, prompt, content, d = _setup(family, torch.float64)
    split = at.slot_groups(d, GROUPS)
    P = prompt.numel()
    full = torch.cat([prompt.expand(content.shape[0], -1), content], 1)
    _, cache = model.run_with_cache(full, names_filter=lambda n: n.endswith("hook_pattern"))
    for l in range(model.cfg.n_layers):
        pattern = cache[f"blocks.{l}.attn.hook_pattern"][:, :, P:]  # batch head pos key
        for g, slots in enumerate(split.slots):
            assert (split.mass[g, l] - pattern[..., slots].sum(-1)).abs().max() <= 1e-12


def test_group_errors_name_the_problem(family):
    _, _, _, d = _setup(family, torch.float32)
    with pytest.raises(ValueError, match="slots 0..4"):
        at.slot_groups(d, {"a": [5]})
    with pytest.raises(ValueError, match="must not overlap"):
        at.slot_groups(d, {"a": [0, 1], "b": [1]})
    with pytest.raises(ValueError, match="'other'"):
        at.slot_groups(d, {"other": [0]})


def test_instruction_groups_find_the_instruction_between_the_shared_template():
    prompt = [1, 9, 5, 40, 41, 42, 2, 5]
    neutral = [1, 9, 5, 2, 5]
    assert at.instruction_groups(prompt, neutral) == {"sink": [0], "template": [1, 2, 6, 7], "instruction": [3, 4, 5]}
    assert at.instruction_groups(prompt, neutral, sink_slots=0)["template"] == [0, 1, 2, 6, 7]
    with pytest.raises(ValueError, match="no instruction"):
        at.instruction_groups(neutral, neutral)


def test_bias_size_is_the_norm_of_each_heads_terms(family):
    """Oracle: the bias and content terms recomputed head by head from hook_z's parts and W_O."""
    model, _, _, d = _setup(family, torch.float64)
    size = at.bias_size(d)
    A, t, b = d.prefix_attention, d.content_output, d.prefix_bias  # layer batch head pos / layer batch pos head d
    for l in range(model.cfg.n_layers):
        for h in range(model.cfg.n_heads):
            a = A[l, :, h, :, None]
            bias = (a * b[l, :, :, h]) @ d.W_O[l, h]
            content = ((1 - a) * t[l, :, :, h]) @ d.W_O[l, h]
            assert abs(float(bias.norm(dim=-1).mean()) - float(size.bias[l, h])) <= 1e-12
            assert abs(float(content.norm(dim=-1).mean()) - float(size.content[l, h])) <= 1e-12
    assert torch.equal(size.ratio(), size.bias / size.content)


def test_bias_logit_effect_matches_the_model_with_the_term_removed(family):
    """Oracle: the model's own forward pass with the head's ``A·b·W_O`` subtracted from the last
    layer's output at the read position (so only the final norm and unembedding see it)."""
    model, _, content, d = _setup(family, torch.float64)
    prefix = pl.KVPrefix.from_prompt(model, random_tokens((5,), seed=1))
    answer, contrast = torch.tensor([7, 11]), 13
    effect = at.bias_logit_effect(model, d, answer, contrast)
    last = f"blocks.{model.cfg.n_layers - 1}.hook_resid_post"
    terms = torch.einsum("lbhd,lhdm->lbhm", bias_term(d.prefix_attention, d.prefix_bias)[:, :, -1], d.W_O)

    def logit_diff(remove=None):
        def hook(resid, hook):
            resid = resid.clone()
            resid[:, -1] -= remove
            return resid

        hooks = [] if remove is None else [(last, hook)]
        with pl.attached(model, prefix) as slots:
            logits = model.run_with_hooks(slots.prepend(content), fwd_hooks=hooks)[:, -1]
        return logits[torch.arange(2), answer] - logits[:, contrast]

    base = logit_diff()
    assert (effect.answer_logit - base).abs().max() <= 1e-10
    for l, h in [(0, 0), (model.cfg.n_layers - 1, model.cfg.n_heads - 1)]:
        assert (effect.per_head[l, :, h] - (base - logit_diff(terms[l, :, h]))).abs().max() <= 1e-10
    assert (effect.all_heads - (base - logit_diff(terms.sum(dim=(0, 2))))).abs().max() <= 1e-10


def test_bias_logit_effect_refuses_padding_and_bad_ids():
    model = build("llama_gqa")
    prefix = pl.KVPrefix.from_prompt(model, random_tokens((3,), seed=1))
    tokens = random_tokens((2, 4), seed=2)
    mask = torch.tensor([[1, 1, 1, 1], [0, 1, 1, 1]])
    d = pl.decompose(model, tokens, prefix, attention_mask=mask, baseline=False)
    at.bias_logit_effect(model, d, 5)  # the last position is real in every row
    with pytest.raises(ValueError, match="padding in rows \\[1\\]"):
        at.bias_logit_effect(model, d, 5, position=0)
    with pytest.raises(ValueError, match="out of range"):
        at.bias_logit_effect(model, d, 5, position=4)
    with pytest.raises(ValueError, match="one per row"):
        at.bias_logit_effect(model, d, [1, 2, 3])
    with pytest.raises(ValueError, match="answer ids must be in"):
        at.bias_logit_effect(model, d, 10_000)


def test_top_heads_orders_by_magnitude():
    score = torch.tensor([[0.1, -3.0], [2.0, 0.0]])
    assert at.top_heads(score, 2) == [(0, 1), (1, 0)]
    assert at.top_heads(score, 1, by_magnitude=False) == [(1, 0)]


def test_compare_with_neutral_splits_the_prompt_and_measures_both(family):
    model = build(family)
    neutral = [1, 9, 5, 2, 5]
    prompt = [1, 9, 5, 40, 41, 42, 2, 5]
    content = random_tokens((2, 4), seed=3)
    c = at.compare_with_neutral(model, content, prompt, neutral, answer=7)
    assert c.groups["instruction"] == [3, 4, 5]
    d = pl.decompose(model, content, pl.KVPrefix.from_prompt(model, torch.tensor(prompt)), baseline=False)
    mass = c.mass()
    assert torch.allclose(sum(mass.values()), d.prefix_attention.mean(dim=(1, 3)), atol=1e-6)
    d0 = pl.decompose(model, content, pl.KVPrefix.from_prompt(model, torch.tensor(neutral)), baseline=False)
    assert torch.allclose(c.neutral_mass, d0.prefix_attention.mean(dim=(1, 3)), atol=1e-6)
    assert c.net_effect().shape == (model.cfg.n_layers, model.cfg.n_heads)
    assert set(c.summary()) >= {"mass_sink", "mass_instruction", "mass_neutral_prefix", "direct_effect_all_heads"}
