"""Prefix forms: constructors, shapes, persistence and the errors for the wrong model."""

import pytest
import torch

import prefixlens as pl
from prefixlens import models
from tests.conftest import build, random_tokens


def test_shapes_follow_the_model(family):
    model = build(family)
    s = pl.signature_of(model)
    kv = pl.KVPrefix.random(model, 5, seed=0)
    assert kv.keys.shape == (s.n_layers, 5, s.n_kv_heads, s.d_head) == kv.values.shape
    assert pl.ResidualPrefix.zeros(model, 5).resid.shape == (s.n_layers, 5, s.d_model)
    assert pl.SoftPrompt.random(model, 5).embeddings.shape == (5, s.d_model)
    assert kv.length == 5 and not kv.batched and kv.n_parameters() == 2 * s.n_layers * 5 * s.n_kv_heads * s.d_head


def test_gqa_prefix_has_kv_heads_only():
    assert pl.KVPrefix.zeros(build("llama_gqa"), 2).keys.shape[-2] == 2


def test_random_is_seeded():
    model = build("gpt2")
    assert torch.equal(pl.KVPrefix.random(model, 3, seed=1).keys, pl.KVPrefix.random(model, 3, seed=1).keys)
    assert not torch.equal(pl.KVPrefix.random(model, 3, seed=1).keys, pl.KVPrefix.random(model, 3, seed=2).keys)


def test_prefix_tensors_are_trainable_parameters():
    model = build("gpt2")
    prefix = pl.ResidualPrefix.random(model, 2)
    assert [n for n, _ in prefix.named_parameters()] == ["resid"]
    assert all(not p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("form", [pl.KVPrefix, pl.ResidualPrefix, pl.SoftPrompt], ids=lambda c: c.__name__)
def test_save_and_load_round_trip(tmp_path, family, form):
    model = build(family)
    prefix = form.random(model, 3, seed=5)
    prefix.save(tmp_path / "p.safetensors")
    again = pl.Prefix.load(tmp_path / "p.safetensors", model)
    assert type(again) is form and again.signature == prefix.signature
    for name in prefix.tensor_names:
        assert torch.equal(getattr(again, name), getattr(prefix, name))
    assert not list(tmp_path.glob("*.tmp")), "no temporary file is left behind"


def test_loading_into_another_model_is_refused(tmp_path):
    prefix = pl.KVPrefix.random(build("gpt2"), 2)
    prefix.save(tmp_path / "p.safetensors")
    with pytest.raises(ValueError, match="different model.*architecture"):
        pl.Prefix.load(tmp_path / "p.safetensors", build("native"))
    wider = models.toy_gpt2(n_layers=3, d_model=32, n_heads=4, d_vocab=61, n_ctx=64)
    with pytest.raises(ValueError, match="n_layers=2 \\(prefix\\) vs 3 \\(model\\)"):
        pl.Prefix.load(tmp_path / "p.safetensors", wider)
    with pytest.raises(TypeError, match="holds a KVPrefix, not a SoftPrompt"):
        pl.SoftPrompt.load(tmp_path / "p.safetensors", build("gpt2"))


def test_wrong_model_dtype_and_device_errors():
    gpt2 = build("gpt2")
    x = random_tokens((1, 4))
    with pytest.raises(ValueError, match="different model"):
        pl.run_with_prefix(build("llama_gqa"), x, pl.KVPrefix.random(gpt2, 2))
    with pytest.raises(ValueError, match="d_model=32 \\(prefix\\) vs 48"):
        pl.run_with_prefix(models.toy_gpt2(n_layers=2, d_model=48, n_heads=4, d_vocab=61), x, pl.SoftPrompt.random(gpt2, 2))
    with pytest.raises(TypeError, match="dtype mismatch: .*float64 but the model runs in torch.float32"):
        pl.run_with_prefix(gpt2, x, pl.KVPrefix.random(gpt2, 2).to(torch.float64))
    meta = pl.KVPrefix.random(gpt2, 2).to("meta")
    with pytest.raises(ValueError, match="device mismatch: .* on meta but the model is on cpu"):
        pl.run_with_prefix(gpt2, x, meta)


def test_bad_inputs_are_refused():
    model = build("gpt2")
    prefix = pl.KVPrefix.random(model, 2)
    with pytest.raises(ValueError, match="empty input"):
        pl.run_with_prefix(model, torch.zeros((1, 0), dtype=torch.long), prefix)
    with pytest.raises(ValueError, match="exceeds the model's context of 64"):
        pl.run_with_prefix(model, random_tokens((1, 63)), prefix)
    with pytest.raises(ValueError, match="at least one slot"):
        pl.KVPrefix.zeros(model, 0)
    with pytest.raises(ValueError, match="P >= 1"):
        pl.KVPrefix(torch.zeros(2, 0, 4, 8), torch.zeros(2, 0, 4, 8), prefix.signature)
    with pytest.raises(ValueError, match="n_layers, P, n_kv_heads, d_head"):
        pl.KVPrefix(torch.zeros(3, 2, 4, 8), torch.zeros(3, 2, 4, 8), prefix.signature)
    with pytest.raises(ValueError, match="token ids must lie in"):
        pl.run_with_prefix(model, torch.tensor([[1, 99]]), prefix)


@pytest.mark.wrong_types_on_purpose  # float ids; a tensor where a Prefix is annotated
def test_bad_input_types_are_refused():
    model = build("gpt2")
    prefix = pl.KVPrefix.random(model, 2)
    with pytest.raises(TypeError, match="integer ids"):
        pl.run_with_prefix(model, torch.zeros((1, 3)), prefix)
    with pytest.raises(TypeError, match="expected a prefixlens prefix"):
        pl.run_with_prefix(model, random_tokens((1, 3)), torch.zeros(3))


def test_batch_slice_selects_rows():
    model = build("gpt2")
    prefix = pl.SoftPrompt.from_prompt(model, random_tokens((4, 2)))
    part = prefix.batch_slice(slice(1, 3))
    assert part.batch_size == 2 and torch.equal(part.embeddings, prefix.embeddings[1:3])
    with pytest.raises(ValueError, match="needs a batched"):
        pl.SoftPrompt.random(model, 2).batch_slice(slice(0, 1))


# ---- issue 14, items 10 and 14: from_prompt refuses a model without weights and bad prompts ------------
FORM_CLASSES = [pl.KVPrefix, pl.ResidualPrefix, pl.SoftPrompt]
_TINY = dict(n_layers=1, d_model=16, n_heads=2, d_vocab=20, n_ctx=16)


@pytest.mark.parametrize("how", ["gpt2.to(meta)", "llama(device=meta)", "native(device=meta)"])
def test_weight_dependent_constructors_refuse_a_meta_model(how):
    """A model on the meta device has shapes but no values: from_prompt, to_kv and SoftPrompt.random's
    default scale would read uninitialised weights, so they refuse; random/zeros (which do not read
    the weights) give a shape-only meta prefix, as torch does for meta modules."""
    if how == "gpt2.to(meta)":
        model = models.toy_gpt2(**_TINY).to("meta")
    elif how == "llama(device=meta)":
        model = models.toy_llama(n_kv_heads=1, **_TINY, device="meta")
    else:
        model = models.native(**_TINY, device="meta")
    prompt = torch.tensor([3, 4, 5])
    for form in FORM_CLASSES:
        with pytest.raises(ValueError, match=f"{form.__name__}.from_prompt: the model is on the meta device.*no values"):
            form.from_prompt(model, prompt)
        with pytest.raises(ValueError, match="meta device"):
            form.from_prompt(model, prompt[None].expand(2, 3))
    with pytest.raises(ValueError, match="ResidualPrefix.to_kv: the model is on the meta device.*load_state_dict"):
        pl.ResidualPrefix.random(model, 2).to_kv(model)
    with pytest.raises(ValueError, match="SoftPrompt.random: the model is on the meta device.*Pass scale="):
        pl.SoftPrompt.random(model, 2)
    soft = pl.SoftPrompt.random(model, 2, scale=1.0)
    assert soft.device.type == "meta" and soft.embeddings.shape == (2, 16)
    with pytest.raises(ValueError, match="SoftPrompt.to_kv: the model is on the meta device"):
        soft.to_kv(model)
    kv = pl.KVPrefix.zeros(model, 2)
    assert kv.device.type == "meta" and kv.n_parameters() == 2 * 1 * 2 * kv.keys.shape[-2] * 8


@pytest.mark.parametrize("form", FORM_CLASSES, ids=lambda c: c.__name__)
@pytest.mark.parametrize(
    "tokens,error,match",
    [
        (torch.tensor([[-1, 4]]), ValueError, r"prompt tokens do not fit this model: token ids must lie in \[0, 61\)"),
        (torch.tensor([[3, 61]]), ValueError, r"prompt tokens do not fit this model: token ids must lie in \[0, 61\)"),
        (torch.tensor([3, 200], dtype=torch.uint8), ValueError, r"token ids must lie in \[0, 61\), got min 3, max 200"),
        (torch.tensor([[3, -5]], dtype=torch.int16), ValueError, r"token ids must lie in \[0, 61\), got min -5"),
        pytest.param(torch.tensor([[3.0, 4.0]]), TypeError, "prompt tokens must be integer ids, got dtype torch.float32",
                     marks=pytest.mark.wrong_types_on_purpose),
        pytest.param(torch.tensor([True, False]), TypeError, "prompt tokens must be integer ids, got dtype torch.bool",
                     marks=pytest.mark.wrong_types_on_purpose),
        (torch.zeros((0, 3), dtype=torch.long), ValueError, r"batch >= 1 and P >= 1, got shape \(0, 3\)"),
        (torch.zeros((2, 0), dtype=torch.long), ValueError, r"batch >= 1 and P >= 1, got shape \(2, 0\)"),
        (torch.zeros((0,), dtype=torch.long), ValueError, r"batch >= 1 and P >= 1, got shape \(0,\)"),
        pytest.param(torch.tensor(3), ValueError, r"\[P\] \(one prefix\) or \[batch, P\].*got shape \(\)", marks=pytest.mark.wrong_types_on_purpose),
        (torch.zeros((1, 2, 3), dtype=torch.long), ValueError, r"got shape \(1, 2, 3\)"),
        ([[3, 4], [5]], TypeError, "rectangular"),
        (torch.full((64,), 5), ValueError, "leaves no room for content"),
    ],
    ids=["minus1", "eq_vocab", "uint8_over", "int16_neg", "float", "bool", "batch0", "P0", "empty1d", "scalar",
         "3d", "ragged", "too_long"],
)
def test_from_prompt_refuses_bad_prompts_by_name(form, tokens, error, match):
    model = build("gpt2")
    with pytest.raises(error, match=match) as info:
        form.from_prompt(model, tokens)
    assert f"{form.__name__}.from_prompt" in str(info.value) or match == "leaves no room for content"


def test_from_prompt_accepts_any_integer_dtype():
    """Valid ids in any integer dtype (or a list) give exactly the int64 result; SoftPrompt is also
    checked against the embedding matrix itself."""
    model = build("llama_gqa")
    ids = random_tokens((2, 3), seed=3)
    kv, resid = pl.KVPrefix.from_prompt(model, ids), pl.ResidualPrefix.from_prompt(model, ids[0])
    for dtype in (torch.int8, torch.int16, torch.int32, torch.uint8):
        got = pl.KVPrefix.from_prompt(model, ids.to(dtype))
        assert torch.equal(got.keys, kv.keys) and torch.equal(got.values, kv.values), dtype
        soft = pl.SoftPrompt.from_prompt(model, ids.to(dtype))
        assert soft.batched and torch.equal(soft.embeddings, model.W_E[ids]), dtype
    for given in (ids[0].to(torch.int16), ids[0].tolist()):
        got = pl.ResidualPrefix.from_prompt(model, given)
        assert not got.batched and torch.equal(got.resid, resid.resid)


def _model_of(family, dtype):
    from tests.conftest import build_hf

    return build(family, dtype) if family in ("gpt2", "llama_gqa", "native") else build_hf(family, dtype)


@pytest.mark.parametrize(
    "family",
    ["gpt2", "llama_gqa", "native", "qwen2", "qwen3", "mistral", "gemma", "gemma2", "phi", "phi3", "gpt_neox",
     "gptj", "opt", "bloom"],
)
def test_soft_prompt_lives_in_hf_inputs_embeds_space(family, dtype):
    """A SoftPrompt of rows R runs as HuggingFace's own ``model(inputs_embeds=[R, embed(content)])`` on every
    family (Bloom: before ``word_embeddings_layernorm``; Gemma: the √d-scaled rows), for real token rows and
    for arbitrary rows; ``from_prompt`` gives HF's rows and ``random`` draws at their scale. The native bridge
    has no HF model: its oracle is the real prompt and its embedding matrix."""
    from tests.conftest import TOL

    model = _model_of(family, dtype)
    slots, content = random_tokens((3,), seed=1), random_tokens((2, 5), seed=2)
    hf = None if family == "native" else model.original_model
    with torch.no_grad():
        if hf is None:  # native
            real = model.W_E[slots]
            expected_real = model(torch.cat([slots.expand(2, -1), content], 1))[:, 3:]
            vocab = model.W_E
        else:
            embed = hf.get_input_embeddings()
            real = embed(slots)
            expected_real = hf(inputs_embeds=torch.cat([real.expand(2, -1, -1), embed(content)], 1)).logits[:, 3:]
            vocab = embed(torch.arange(model.cfg.d_vocab))
            arbitrary = torch.randn(3, model.cfg.d_model, generator=torch.Generator().manual_seed(3), dtype=dtype)
            got = pl.run_with_prefix(model, content, pl.SoftPrompt(arbitrary, pl.signature_of(model)))
            want = hf(inputs_embeds=torch.cat([arbitrary.expand(2, -1, -1), embed(content)], 1)).logits[:, 3:]
            assert (got - want).abs().max() <= TOL[dtype], family
        got_real = pl.run_with_prefix(model, content, pl.SoftPrompt(real.clone(), pl.signature_of(model)))
        assert (got_real - expected_real).abs().max() <= TOL[dtype], family
        assert (pl.SoftPrompt.from_prompt(model, slots).embeddings - real).abs().max() <= TOL[dtype], family
        drawn = pl.SoftPrompt.random(model, 4, seed=5).embeddings
        at_hf_scale = pl.SoftPrompt.random(model, 4, seed=5, scale=float(vocab.double().std())).embeddings
        assert (drawn - at_hf_scale).abs().max() <= TOL[dtype], family


def test_soft_prompt_refuses_a_projected_embedding():
    """OPT with word_embed_proj_dim != hidden_size: inputs_embeds is narrower than d_model (project_in
    follows), so a [P, d_model] soft prompt has no inputs_embeds equivalent: refused by name."""
    import transformers

    config = transformers.OPTConfig(
        vocab_size=61, hidden_size=32, ffn_dim=64, word_embed_proj_dim=16, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=64,
    )
    torch.manual_seed(0)
    model = models._bridge("prefixlens-test-opt-proj", transformers.OPTForCausalLM(config), torch.float32, None)
    soft = pl.SoftPrompt.zeros(model, 2)
    with pytest.raises(ValueError, match="project_in.*ResidualPrefix or a KVPrefix"):
        pl.run_with_prefix(model, random_tokens((1, 4)), soft)
    with pytest.raises(ValueError, match="project_in"):
        pl.SoftPrompt.random(model, 2)
