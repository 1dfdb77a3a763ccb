import math

import pytest
import torch

from prefixlens import models
from tests.conftest import FAMILIES, build


def test_toy_models_are_seeded_and_typed(family, dtype):
    a = build(family, dtype)
    b = FAMILIES[family](seed=7, init_range=0.3, dtype=dtype)
    x = torch.randint(3, 61, (2, 5))
    assert a(x).dtype == dtype
    assert torch.equal(a(x), b(x)), "the same seed must give the same weights"
    assert not a.training


def test_different_seeds_differ():
    x = torch.randint(3, 61, (1, 5))
    a = models.toy_gpt2(n_layers=1, d_model=16, n_heads=2, d_vocab=61, seed=1)
    b = models.toy_gpt2(n_layers=1, d_model=16, n_heads=2, d_vocab=61, seed=2)
    assert not torch.allclose(a(x), b(x))


def test_toy_llama_has_grouped_query_attention():
    m = build("llama_gqa")
    assert m.cfg.n_key_value_heads == 2 and m.cfg.n_heads == 4
    assert m.cfg.positional_embedding_type == "rotary" and m.cfg.normalization_type == "RMS"
    with pytest.raises(ValueError, match="multiple of n_kv_heads"):
        models.toy_llama(n_heads=4, n_kv_heads=3)


def test_native_attention_only():
    m = models.native(n_layers=1, d_model=16, n_heads=2, d_vocab=20, attn_only=True, seed=0)
    assert m.cfg.attn_only
    assert m(torch.tensor([[3, 4, 5]])).shape == (1, 3, 20)


def test_load_local_checkpoint_offline(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    hf = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=40, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64, attn_implementation="eager",
        )
    ).eval()
    hf.save_pretrained(tmp_path / "tiny")
    bridge = models.load(tmp_path / "tiny")
    x = torch.randint(0, 40, (2, 6))
    with torch.no_grad():
        assert (bridge(x) - hf(x).logits).abs().max() == 0
    assert bridge.cfg.n_key_value_heads == 2


def test_load_rejects_directory_without_config(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        models.load(tmp_path)


def test_float64_llama_softmax_is_float64():
    """HF/TL run LLaMA's softmax in float32; prefixlens keeps float64 models float64 throughout."""
    m = build("llama_gqa", torch.float64)
    x = torch.randint(3, 61, (1, 6))
    _, cache = m.run_with_cache(x, names_filter=lambda n: n.endswith(("hook_attn_scores", "hook_pattern")))
    scores = cache["blocks.0.attn.hook_attn_scores"]
    assert (cache["blocks.0.attn.hook_pattern"] - scores.softmax(-1)).abs().max() < 1e-15


def test_toy_gpt2_untied_unembedding_is_its_own_matrix():
    model = models.toy_gpt2(n_layers=1, d_model=16, n_heads=2, d_vocab=10, n_ctx=8, tie_embeddings=False)
    hf = model.original_model
    assert hf.lm_head.weight.data_ptr() != hf.transformer.wte.weight.data_ptr()
    x = torch.randint(0, 10, (2, 5), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        hf.lm_head.weight.mul_(2.0)  # the bridge reads the HF head, not a copy of the embedding
    torch.testing.assert_close(model(x), hf(x).logits, rtol=0, atol=0)
    torch.testing.assert_close(model.W_U, hf.lm_head.weight.T, rtol=0, atol=0)
    tied = models.toy_gpt2(n_layers=1, d_model=16, n_heads=2, d_vocab=10, n_ctx=8)
    assert tied.original_model.lm_head.weight.data_ptr() == tied.original_model.transformer.wte.weight.data_ptr()


@pytest.mark.parametrize("dtype,atol", [(torch.float32, 1e-6), (torch.float64, 1e-12)])
def test_toy_gpt2_mlp_is_mingpt_new_gelu(dtype, atol):
    """The fused tanh GELU computes minGPT's NewGELU, 0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³)))."""
    model = models.toy_gpt2(n_layers=1, d_model=16, n_heads=2, d_vocab=10, n_ctx=8, dtype=dtype)
    x = torch.linspace(-8, 8, 4001, dtype=dtype)
    new_gelu = 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x.pow(3))))
    act = model.original_model.transformer.h[0].mlp.act
    torch.testing.assert_close(act(x), new_gelu, rtol=0, atol=atol)
