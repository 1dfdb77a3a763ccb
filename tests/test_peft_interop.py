"""Importing HuggingFace PEFT prefix-tuning adapters: the imported KVPrefix reproduces PEFT's logits.

Reference logits come from the PEFT model itself. In float64 the LLaMA reference uses HF's ``sdpa``
attention: HF's *eager* LLaMA attention runs its softmax in float32 even for a float64 model (the bridge
differs from it by ~2e-6 with no prefix at all), which would hide the import's own float64 error.
"""

from __future__ import annotations

import json
import warnings

import pytest
import torch

pytest.importorskip("peft")
from peft import LoraConfig, PrefixTuningConfig, get_peft_model  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM  # noqa: E402

import prefixlens as pl  # noqa: E402
from prefixlens import models  # noqa: E402
from prefixlens.peft_interop import kv_prefix_from_peft  # noqa: E402
from tests.upstream import PEFT_PREFIX_GENERATE_BROKEN, PEFT_PREFIX_GENERATE_REASON  # noqa: E402

VOCAB, P, BATCH, T = 50, 3, 2, 6
TOL = {torch.float32: 1e-5, torch.float64: 1e-10}


def hf_model(kind: str, dtype: torch.dtype, seed: int = 0, n_layers: int = 2, d_model: int = 32, n_heads: int = 4,
             n_kv_heads: int = 2, attn: str = "sdpa"):
    torch.manual_seed(seed)
    if kind == "llama":
        config = LlamaConfig(
            vocab_size=VOCAB, hidden_size=d_model, intermediate_size=2 * d_model, num_hidden_layers=n_layers,
            num_attention_heads=n_heads, num_key_value_heads=n_kv_heads, head_dim=d_model // n_heads,
            initializer_range=0.3, max_position_embeddings=64, rope_theta=500.0, attn_implementation=attn,
            bos_token_id=1, eos_token_id=2, pad_token_id=0,
        )
        model = LlamaForCausalLM(config)
    else:
        config = GPT2Config(
            vocab_size=VOCAB, n_positions=64, n_embd=d_model, n_layer=n_layers, n_head=n_heads,
            initializer_range=0.3, attn_implementation="eager", bos_token_id=1, eos_token_id=2,
        )
        model = GPT2LMHeadModel(config)
    return model.to(dtype).eval()


def prefix_peft(hf, projection: bool, dtype: torch.dtype, seed: int = 1, adapter_name: str = "default"):
    """A PEFT prefix-tuning model with a random (non-trivial) prompt encoder in ``dtype``."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = get_peft_model(
            hf,
            PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=P, prefix_projection=projection),
            adapter_name=adapter_name,
        )
    encoder = peft_model.prompt_encoder[adapter_name].to(dtype)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in encoder.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype))
    return peft_model.eval()


def tokens_for(seed: int = 2) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (BATCH, T), generator=g)


def bridge_of(hf, dtype):
    return models._bridge(f"test-{hf.config.model_type}", hf, dtype, None)


CASES = [(k, d, proj) for k in ("llama", "gpt2") for d in (torch.float32, torch.float64) for proj in (False, True)]


@pytest.mark.parametrize("kind,dtype,projection", CASES, ids=lambda v: str(v).replace("torch.", ""))
def test_imported_prefix_reproduces_peft_logits(kind, dtype, projection, tmp_path):
    peft_model = prefix_peft(hf_model(kind, dtype), projection, dtype)
    tokens = tokens_for()
    with torch.no_grad():
        reference = peft_model(input_ids=tokens).logits
        # PEFT prepends ones(B, P) to a given mask; the result must not change.
        masked = peft_model(input_ids=tokens, attention_mask=torch.ones_like(tokens)).logits
    assert torch.equal(reference, masked)
    peft_model.save_pretrained(tmp_path)

    # The bridge wraps the very base model PEFT ran (built after the reference logits were taken).
    bridge = bridge_of(peft_model.get_base_model(), dtype)
    with torch.no_grad():
        no_prefix = bridge(tokens)
    for source in (peft_model, tmp_path, str(tmp_path)):
        prefix = kv_prefix_from_peft(source, bridge)
        assert isinstance(prefix, pl.KVPrefix) and prefix.length == P and not prefix.batched
        assert prefix.dtype == dtype
        with torch.no_grad():
            logits = pl.run_with_prefix(bridge, tokens, prefix)
        err = (logits - reference).abs().max().item()
        assert err <= TOL[dtype], f"{kind} {dtype} projection={projection} from {type(source).__name__}: {err:.3g}"
    # The prefix matters (the test is not trivially satisfied by an empty prefix).
    assert (no_prefix - reference).abs().max().item() > 0.1
    assert bridge.hook_dict["blocks.0.attn.hook_k"].fwd_hooks == []
    assert pl.KVPrefix.from_peft(tmp_path, bridge).keys.shape == prefix.keys.shape


def test_text_after_an_imported_prefix_gets_pefts_bos(tmp_path):
    """Issue 21 (1), PEFT's side: PEFT runs ``tokenizer(text)`` after its prefix, with a BOS when the
    tokenizer adds one (the toy's does); on main ``run_with_prefix(bridge, text, prefix)`` put none."""
    peft_model = prefix_peft(hf_model("llama", torch.float32), False, torch.float32)
    bridge = bridge_of(peft_model.get_base_model(), torch.float32)
    assert bridge.cfg.default_prepend_bos
    with torch.no_grad():
        reference = peft_model(input_ids=torch.tensor([[1, 5, 6, 7]])).logits
    peft_model.save_pretrained(tmp_path)
    for prefix in (kv_prefix_from_peft(peft_model, bridge), kv_prefix_from_peft(tmp_path, bridge)):
        assert prefix.content_bos is True
        with torch.no_grad():
            torch.testing.assert_close(pl.run_with_prefix(bridge, "5 6 7", prefix), reference, rtol=0, atol=TOL[torch.float32])


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_a_peft_model_keeps_working_after_its_base_is_bridged(kind):
    """models' bridges wrap the HF modules in place; PEFT's prefix, handed to them as a cache, still applies."""
    peft_model = prefix_peft(hf_model(kind, torch.float32), False, torch.float32)
    tokens = tokens_for()
    with torch.no_grad():
        before = peft_model(input_ids=tokens).logits
        bridge_of(peft_model.get_base_model(), torch.float32)
        after = peft_model(input_ids=tokens).logits
    assert (after - before).abs().max().item() <= 1e-5


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_generation_with_an_imported_prefix_is_right(kind):
    """Our greedy decoding with the imported prefix, cached and recomputed, equals greedy decoding of
    the base model on PEFT's prefix run step by step through its (correct) forward."""
    peft_model = prefix_peft(hf_model(kind, torch.float32), False, torch.float32)
    tokens = tokens_for()
    sequence = tokens
    with torch.no_grad():
        for _ in range(6):
            sequence = torch.cat([sequence, peft_model(input_ids=sequence).logits[:, -1:].argmax(-1)], dim=1)
    bridge = bridge_of(peft_model.get_base_model(), torch.float32)
    prefix = kv_prefix_from_peft(peft_model, bridge)
    assert torch.equal(pl.generate(bridge, tokens, prefix, max_new_tokens=6), sequence)
    assert torch.equal(pl.generate(bridge, tokens, prefix, max_new_tokens=6, use_cache=False), sequence)


@pytest.mark.xfail(PEFT_PREFIX_GENERATE_BROKEN, reason=PEFT_PREFIX_GENERATE_REASON, strict=True)
@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_peft_generate_agrees_with_ours(kind):
    peft_model = prefix_peft(hf_model(kind, torch.float32), False, torch.float32)
    tokens = tokens_for()
    with torch.no_grad():
        theirs = peft_model.generate(input_ids=tokens, attention_mask=torch.ones_like(tokens), max_new_tokens=6,
                                     do_sample=False)
    bridge = bridge_of(peft_model.get_base_model(), torch.float32)
    assert torch.equal(pl.generate(bridge, tokens, kv_prefix_from_peft(peft_model, bridge), max_new_tokens=6), theirs)


def test_layout_and_unrotation_match_peft_cache():
    """Values (and GPT-2 keys) are PEFT's cache entries transposed; LLaMA keys re-rotate to PEFT's keys."""
    dtype = torch.float64
    for kind in ("gpt2", "llama"):
        peft_model = prefix_peft(hf_model(kind, dtype), False, dtype)
        cache = peft_model.get_prompt(1)
        bridge = bridge_of(peft_model.get_base_model(), dtype)
        prefix = kv_prefix_from_peft(peft_model, bridge)
        for layer in range(2):
            peft_k = cache.layers[layer].keys[0].transpose(0, 1)  # [P, n_kv, d_head]
            peft_v = cache.layers[layer].values[0].transpose(0, 1)
            assert torch.equal(prefix.values[layer], peft_v)
            if kind == "gpt2":
                assert torch.equal(prefix.keys[layer], peft_k)
            else:
                assert (prefix.keys[layer] - peft_k).abs().max() > 1e-3  # rotary keys are really un-rotated
        if kind == "llama":
            names = [f"blocks.{l}.attn.hook_rot_k" for l in range(2)]
            with torch.no_grad():
                _, cache_tl = pl.run_with_cache(bridge, tokens_for(), prefix, names_filter=names)
            for layer, name in enumerate(names):
                rotated = cache_tl[name][0, :P]  # the model's own rotation of the imported keys
                peft_k = cache.layers[layer].keys[0].transpose(0, 1)
                assert (rotated - peft_k).abs().max().item() <= 1e-12


def test_directory_with_prompt_encoder_weights(tmp_path):
    """A directory holding the MLP weights (not the ejected prompt) is evaluated through the MLP."""
    dtype = torch.float64
    peft_model = prefix_peft(hf_model("gpt2", dtype), True, dtype)
    config = peft_model.peft_config["default"].to_dict()
    config["peft_type"] = "PREFIX_TUNING"
    config["task_type"] = "CAUSAL_LM"
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    state = {f"prompt_encoder.{k}": v.detach().contiguous() for k, v in peft_model.prompt_encoder["default"].state_dict().items()}
    assert any("transform.2.weight" in k for k in state)
    save_file(state, str(tmp_path / "adapter_model.safetensors"))
    bridge = bridge_of(peft_model.get_base_model(), dtype)
    from_dir = kv_prefix_from_peft(tmp_path, bridge)
    in_memory = kv_prefix_from_peft(peft_model, bridge)
    assert (from_dir.keys - in_memory.keys).abs().max().item() <= 1e-12
    assert (from_dir.values - in_memory.values).abs().max().item() <= 1e-12


def test_named_adapter_in_subdirectory(tmp_path):
    dtype = torch.float32
    peft_model = prefix_peft(hf_model("llama", dtype), False, dtype, adapter_name="task")
    peft_model.save_pretrained(tmp_path)  # a non-default adapter goes to tmp_path/task/
    bridge = bridge_of(peft_model.get_base_model(), dtype)
    a = kv_prefix_from_peft(tmp_path, bridge, adapter_name="task")
    b = kv_prefix_from_peft(peft_model, bridge, adapter_name="task")
    assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)
    with pytest.raises(KeyError, match="no adapter 'default'"):
        kv_prefix_from_peft(peft_model, bridge)


def test_refuses_non_prefix_adapters(tmp_path):
    dtype = torch.float32
    hf = hf_model("llama", dtype)
    bridge = bridge_of(hf_model("llama", dtype), dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lora = get_peft_model(hf, LoraConfig(task_type="CAUSAL_LM", r=2, target_modules=["q_proj"]))
    lora.save_pretrained(tmp_path)
    with pytest.raises((ValueError, TypeError), match="prefix-tuning|PeftModel"):
        kv_prefix_from_peft(lora, bridge)
    with pytest.raises(ValueError, match="only PEFT prefix-tuning adapters.*LORA"):
        kv_prefix_from_peft(tmp_path, bridge)
    with pytest.raises(FileNotFoundError):
        kv_prefix_from_peft(tmp_path / "missing", bridge)
    with pytest.raises(TypeError, match="expected a peft PeftModel"):
        kv_prefix_from_peft(torch.zeros(3), bridge)


@pytest.mark.parametrize(
    "change,match",
    [
        ({"n_layers": 3}, "num_layers=2"),
        ({"n_kv_heads": 4}, "n_kv_heads=4"),
        ({"d_model": 48, "n_heads": 6}, "hidden size=32"),  # same key/value shape, different base model
    ],
    ids=["layers", "kv-heads", "hidden-size"],
)
def test_refuses_base_model_mismatch(change, match, tmp_path):
    dtype = torch.float32
    peft_model = prefix_peft(hf_model("llama", dtype), False, dtype)
    other = bridge_of(hf_model("llama", dtype, seed=3, **change), dtype)
    with pytest.raises(ValueError, match=match):
        kv_prefix_from_peft(peft_model, other)
    if "d_model" not in change:  # a directory carries only the shapes of the keys and values
        peft_model.save_pretrained(tmp_path)
        with pytest.raises(ValueError, match="does not fit the model"):
            kv_prefix_from_peft(tmp_path, other)


def test_refuses_processed_weights(tmp_path):
    dtype = torch.float32
    peft_model = prefix_peft(hf_model("gpt2", dtype), False, dtype)
    peft_model.save_pretrained(tmp_path)
    bridge = bridge_of(hf_model("gpt2", dtype), dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        bridge.enable_compatibility_mode()
    with pytest.raises(ValueError, match="weight processing"):
        kv_prefix_from_peft(tmp_path, bridge)


# ---- issue 14: the wrong base model (case 7) and clear errors (case 16) ------------------------------


def test_refuses_an_adapter_of_another_model_type_with_equal_sizes(tmp_path):
    """A GPT-2 adapter fits a LLaMA bridge of equal sizes shape for shape (GPT-2 keys are not rotary:
    the import would un-rotate them into garbage)."""
    dtype = torch.float32
    gpt2 = prefix_peft(hf_model("gpt2", dtype), False, dtype)
    llama = bridge_of(hf_model("llama", dtype, n_kv_heads=4), dtype)
    with pytest.raises(ValueError, match="'gpt2' model and the bridge is a 'llama' model"):
        kv_prefix_from_peft(gpt2, llama)
    # a directory naming its base (a local checkpoint directory) is checked the same way
    gpt2.get_base_model().config.save_pretrained(tmp_path / "base")
    gpt2.save_pretrained(tmp_path / "adapter")
    config_file = tmp_path / "adapter" / "adapter_config.json"
    config = json.loads(config_file.read_text())
    config["base_model_name_or_path"] = str(tmp_path / "base")
    config_file.write_text(json.dumps(config))
    with pytest.raises(ValueError, match="'gpt2' model and the bridge is a 'llama' model"):
        kv_prefix_from_peft(tmp_path / "adapter", llama)
    # ...and still imports onto its own base: right against PEFT
    tokens = tokens_for()
    with torch.no_grad():
        reference = gpt2(input_ids=tokens).logits
    own = bridge_of(gpt2.get_base_model(), dtype)
    with torch.no_grad():
        logits = pl.run_with_prefix(own, tokens, kv_prefix_from_peft(tmp_path / "adapter", own))
    assert (logits - reference).abs().max().item() <= TOL[dtype]


def test_refuses_a_tl_native_bridge_by_name(tmp_path):
    dtype = torch.float32
    peft_model = prefix_peft(hf_model("llama", dtype, n_kv_heads=4), False, dtype)
    peft_model.save_pretrained(tmp_path)
    native = models.native(n_layers=2, d_model=32, n_heads=4, d_vocab=VOCAB, n_ctx=64)  # equal shapes
    for source in (tmp_path, peft_model):
        with pytest.raises(ValueError, match="TL-native bridge"):
            kv_prefix_from_peft(source, native)


def test_refuses_an_in_memory_base_with_other_weights():
    dtype = torch.float32
    peft_model = prefix_peft(hf_model("llama", dtype), False, dtype)
    other = bridge_of(hf_model("llama", dtype, seed=5), dtype)  # same architecture and sizes
    with pytest.raises(ValueError, match="other weights.*check_base_weights=False"):
        kv_prefix_from_peft(peft_model, other)
    moved = kv_prefix_from_peft(peft_model, other, check_base_weights=False)  # deliberate transplant
    same = kv_prefix_from_peft(peft_model, bridge_of(peft_model.get_base_model(), dtype))
    assert torch.equal(moved.values, same.values)
    # a separately loaded copy of the same weights (here in float64) is the same base
    twin = hf_model("llama", torch.float64)
    kv_prefix_from_peft(peft_model, bridge_of(twin, torch.float64))


def test_unknown_adapter_names_are_refused_with_the_names_there_are(tmp_path):
    dtype = torch.float32
    peft_model = prefix_peft(hf_model("llama", dtype), False, dtype)
    bridge = bridge_of(peft_model.get_base_model(), dtype)
    peft_model.save_pretrained(tmp_path)
    with pytest.raises(KeyError, match=r"no adapter 'nope'.*\['default'\]"):
        kv_prefix_from_peft(tmp_path, bridge, adapter_name="nope")  # was: silently the default one
    with pytest.raises(KeyError, match=r"no adapter 'nope'.*\['default'\]"):
        kv_prefix_from_peft(peft_model, bridge, adapter_name="nope")
    # a directory holding only a named adapter: 'default' is refused, listing the one there is
    named = prefix_peft(hf_model("llama", dtype), False, dtype, adapter_name="task")
    named.save_pretrained(tmp_path / "named")
    with pytest.raises(KeyError, match=r"\['task'\]"):
        kv_prefix_from_peft(tmp_path / "named", bridge_of(named.get_base_model(), dtype))


def test_an_omitted_adapter_name_never_silently_picks_another_than_peft_runs():
    dtype = torch.float32
    peft_model = prefix_peft(hf_model("llama", dtype), False, dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model.add_adapter("task", PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=P))
    g = torch.Generator().manual_seed(9)
    with torch.no_grad():
        for p in peft_model.prompt_encoder["task"].parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    peft_model.set_adapter("task")
    peft_model.eval()
    tokens = tokens_for()
    with torch.no_grad():
        reference = peft_model(input_ids=tokens).logits  # runs the active adapter, 'task'
    bridge = bridge_of(peft_model.get_base_model(), dtype)  # (after the reference, as above)
    with pytest.raises(ValueError, match="active adapter is 'task'"):
        kv_prefix_from_peft(peft_model, bridge)
    with torch.no_grad():
        logits = pl.run_with_prefix(bridge, tokens, kv_prefix_from_peft(peft_model, bridge, adapter_name="task"))
        other = pl.run_with_prefix(bridge, tokens, kv_prefix_from_peft(peft_model, bridge, adapter_name="default"))
    assert (logits - reference).abs().max().item() <= TOL[dtype]
    assert (other - reference).abs().max().item() > 0.1


def test_an_in_memory_lora_model_is_named_as_lora(tmp_path):
    dtype = torch.float32
    bridge = bridge_of(hf_model("llama", dtype), dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lora = get_peft_model(hf_model("llama", dtype), LoraConfig(task_type="CAUSAL_LM", r=2, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="is a LORA adapter, not prefix tuning"):
        kv_prefix_from_peft(lora, bridge)  # was: "expected a peft PeftModel, got PeftModelForCausalLM"
    with pytest.raises(TypeError, match="plain transformers model"):
        kv_prefix_from_peft(lora.get_base_model(), bridge)


def test_malformed_adapter_files_are_named(tmp_path):
    dtype = torch.float32
    peft_model = prefix_peft(hf_model("gpt2", dtype), False, dtype)
    bridge = bridge_of(peft_model.get_base_model(), dtype)
    peft_model.save_pretrained(tmp_path)
    config_file = tmp_path / "adapter_config.json"
    good = config_file.read_text()
    config_file.write_text(good[: len(good) // 2])  # truncated JSON
    with pytest.raises(ValueError, match="adapter_config.json is not valid JSON"):
        kv_prefix_from_peft(tmp_path, bridge)
    config_file.write_text("[1, 2]")
    with pytest.raises(ValueError, match="adapter_config.json holds a JSON list"):
        kv_prefix_from_peft(tmp_path, bridge)
    config_file.write_text(json.dumps({**json.loads(good), "num_virtual_tokens": "3"}))
    with pytest.raises(ValueError, match="adapter_config.json: num_virtual_tokens='3'"):
        kv_prefix_from_peft(tmp_path, bridge)
    config_file.write_text(good)
    weights = tmp_path / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:40])  # truncated weights
    with pytest.raises(ValueError, match="adapter_model.safetensors"):
        kv_prefix_from_peft(tmp_path, bridge)


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_peft_agreement_under_left_padding_depends_on_the_position_convention(kind):
    """docs/reliability.md's statement, both halves. PEFT's forward without ``position_ids`` puts content
    token ``t`` at ``P + t`` counting the padding columns; prefixlens by default derives positions from the
    mask (each row as it runs alone). So: unpadded and right-padded rows agree by default; a left-padded row
    agrees only when PEFT gets ``position_ids = cumsum(mask) - 1`` (HF generate's convention), or prefixlens
    gets ``position_ids = arange(T)`` (PEFT's default), and differs by O(1) otherwise."""
    from tests.test_masks import LEN, padded

    peft_model = prefix_peft(hf_model(kind, torch.float32), False, torch.float32)
    x, mask = padded("left")
    x = x.clamp(max=49)
    mask[2] = torch.tensor([1, 1, 1, 1, 0, 0])  # row 2 right-padded; row 1 left-padded by 2; row 0 unpadded
    x[2, 4:] = 0
    with torch.no_grad():
        peft_default = peft_model(input_ids=x, attention_mask=mask).logits
        peft_mask_positions = peft_model(input_ids=x, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp_min(0)).logits
    bridge = bridge_of(peft_model.get_base_model(), torch.float32)
    prefix = kv_prefix_from_peft(peft_model, bridge)
    with torch.no_grad():
        ours = pl.run_with_prefix(bridge, x, prefix, attention_mask=mask)
        ours_arange = pl.run_with_prefix(bridge, x, prefix, attention_mask=mask, position_ids=torch.arange(LEN))
    real = mask.bool()
    for row in (0, 2):  # unpadded, right-padded: the default conventions agree
        assert (ours[row] - peft_default[row])[real[row]].abs().max() <= 1e-5
    assert (ours[1] - peft_default[1])[real[1]].abs().max() > 0.1  # left-padded: they do not
    assert (ours - peft_mask_positions)[real].abs().max() <= 1e-5
    assert (ours_arange - peft_default)[real].abs().max() <= 1e-5
