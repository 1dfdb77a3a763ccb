"""prefixlens.training.pairs: train_prefix on (input, target) pairs, every method, and the KV cache route."""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F

from prefixlens import KVPrefix, ResidualPrefix, SoftPrompt, models, run_with_prefix, tasks, train
from prefixlens.training import fast_kv
from prefixlens.training.pairs import Pairs, Trained, pairs_loss

V = 61


@functools.cache
def toy(kind: str, dtype=torch.float32):
    make = models.toy_llama if kind == "llama" else models.toy_gpt2
    kw = {"n_kv_heads": 2} if kind == "llama" else {}
    model = make(n_layers=2, d_model=32, n_heads=4, d_vocab=V, n_ctx=64, seed=3, init_range=0.3, dtype=dtype, **kw)
    model.requires_grad_(False)
    return model


def ragged_pairs(n=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        a = int(torch.randint(2, 6, (1,), generator=g))
        b = int(torch.randint(1, 3, (1,), generator=g))
        out.append((torch.randint(3, V, (a,), generator=g).tolist(), torch.randint(3, V, (b,), generator=g).tolist()))
    return out


def cfg(**kw):
    return train.TrainConfig(**{"iters": 6, "lr": 3e-2, "batch_size": 6, "progress": False, "weight_decay": 0.0, **kw})


def snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_untouched(model, before, flags, modes):
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)  # bit-identical
    assert [p.requires_grad for p in model.parameters()] == flags
    assert [m.training for m in model.modules()] == modes
    assert all(p.grad is None for p in model.parameters())


# ---- the batch layout and the loss -----------------------------------------------------------------


def test_pairs_batch_left_pads_and_labels_only_targets():
    pairs = Pairs([[5, 6, 7], [8]], [[9], [10, 11]], pad_id=0)
    b = pairs.batch([0, 1])
    # rows: [5 6 7 9] and [0 8 10 11]; the model sees all but the last token
    assert b.tokens.tolist() == [[5, 6, 7], [0, 8, 10]]
    assert b.mask.tolist() == [[1, 1, 1], [0, 1, 1]]
    assert b.labels.tolist() == [[-1, -1, 9], [-1, 10, 11]]
    assert b.n_target_tokens == 3


def by_hand_loss(model, data, prompt, dtype):
    """Independent: each row alone, the real prompt before it, cross-entropy on its target tokens."""
    total, n = 0.0, 0
    for x, y in data:
        seq = torch.tensor(prompt + x + y)[None]
        logits = model(seq).to(torch.float64)[0]
        start = len(prompt) + len(x)
        total += float(F.cross_entropy(logits[start - 1 : -1], seq[0, start:], reduction="sum"))
        n += len(y)
    return total / n


@pytest.mark.parametrize("form", ["kv", "residual", "soft"])
@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_step0_loss_is_the_target_token_loss_of_the_equivalent_real_prompt(form, kind):
    model = toy(kind, torch.float64)
    data = ragged_pairs()
    prompt = [11, 12, 13]
    out = train.train_prefix(model, data, form=form, init="text", init_text=prompt, length=3, config=cfg(iters=1))
    assert isinstance(out, Trained) and out.form == form
    assert out.losses[0] == pytest.approx(by_hand_loss(model, data, prompt, torch.float64), abs=1e-10)


def test_loss_decreases_for_every_method_and_the_base_is_untouched():
    model = toy("llama")
    model.blocks[0].train()  # a mixed mode, to be handed back as it was
    before, flags, modes = snapshot(model), [p.requires_grad for p in model.parameters()], [m.training for m in model.modules()]
    rng = torch.get_rng_state()
    data = ragged_pairs(8)
    for form in ("kv", "residual", "soft", "lora", "full"):
        out = train.train_prefix(model, data, form=form, length=2, config=cfg(iters=8, batch_size=8, lr=1e-2 if form == "full" else 3e-2))
        assert out.losses[-1] < out.losses[0], form
        assert_untouched(model, before, flags, modes)
        assert torch.equal(torch.get_rng_state(), rng)
        assert all(not p.requires_grad and p.grad is None for p in out.trained.parameters())
    assert isinstance(out.model, torch.nn.Module) and out.model is not model
    model.blocks[0].eval()


def test_lora_result_reproduces_its_last_loss_when_attached():
    model = toy("gpt2")
    data = ragged_pairs(6)
    out = train.train_prefix(model, data, form="lora", rank=2, config=cfg(iters=3))
    pairs = Pairs.from_data(model, data)
    b = pairs.batch(range(len(pairs)))
    plain = float(pairs_loss(model, b))
    with out.lora:
        adapted = float(pairs_loss(model, b))
    assert adapted != plain
    assert float(pairs_loss(model, b)) == plain  # removed again


# ---- the KV prefix as the key/value cache ----------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_cache_route_gives_the_placeholder_loss_and_gradients(kind, dtype):
    model = toy(kind, dtype)
    assert fast_kv.supports_cache_prefix(model)
    pairs = Pairs.from_data(model, ragged_pairs(5))
    batch = pairs.batch(range(5))
    assert batch.mask is not None  # ragged: the masked path is the one under test
    prefix = KVPrefix.random(model, 3, seed=1, scale=0.5).to(dtype)
    grads = {}
    for route in (True, False):
        loss = pairs_loss(model, batch, prefix, cache_prefix=route)
        grads[route] = (loss.detach(), *torch.autograd.grad(loss, [prefix.keys, prefix.values]))
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    for a, b in zip(grads[True], grads[False]):
        assert (a - b).abs().max() <= tol * max(1.0, float(b.abs().max()))


def test_cache_route_logits_equal_run_with_prefix_with_rotated_keys():
    model = toy("llama")
    prefix = KVPrefix.random(model, 4, seed=2)
    tokens = torch.randint(3, V, (2, 5), generator=torch.Generator().manual_seed(1))
    a = run_with_prefix(model, tokens, prefix)
    b = fast_kv.logits_with_cache_prefix(model, tokens, prefix)
    assert (a - b).abs().max() <= 1e-5
    # the rotated keys are what a real prompt leaves in the HF cache
    prompt = torch.tensor([[7, 8, 9, 10]])
    from prefixlens.kv_cache import cached_forward

    _, cache = cached_forward(model, prompt)
    ours = fast_kv.prefix_cache(model, KVPrefix.from_prompt(model, prompt[0]), 1)
    for layer in range(2):
        assert (cache.layers[layer].keys - ours.layers[layer].keys).abs().max() <= 1e-5
        assert (cache.layers[layer].values - ours.layers[layer].values).abs().max() <= 1e-5


def test_native_bridges_use_the_placeholder_route():
    model = models.native(n_layers=1, d_model=16, n_heads=2, d_vocab=V, n_ctx=32, seed=0)
    assert not fast_kv.supports_cache_prefix(model)
    out = train.train_prefix(model, ragged_pairs(4), form="kv", length=2, config=cfg(iters=2, batch_size=4))
    assert len(out.losses) == 2


# ---- issue 21 (1): the BOS policy a prefix was trained with is the one its text is run with ------------


def text_pairs(n=6, seed=0):
    """Text pairs for the toy tokenizer (word-level on the integers; it adds BOS, token 1)."""
    return [(" ".join(map(str, x)), " " + " ".join(map(str, y))) for x, y in ragged_pairs(n, seed)]


def no_bos_toy():
    """A toy whose checkpoint tokenizer adds no BOS (SmolLM2's kind): ``cfg.default_prepend_bos = False``."""
    model = models.toy_llama(n_layers=2, d_model=32, n_heads=4, n_kv_heads=2, d_vocab=V, n_ctx=64, seed=3, init_range=0.3)
    model.requires_grad_(False)
    model.cfg.default_prepend_bos = False
    return model


@pytest.mark.parametrize(
    "form,tokenizer,bos",
    [(f, "adds_bos", None) for f in ("kv", "residual", "soft")]
    + [("kv", "adds_bos", False), ("kv", "no_bos", None), ("kv", "no_bos", True)],
)
def test_the_documented_call_on_text_reproduces_the_training_format_loss(form, tokenizer, bos):
    """On main ``run_with_prefix(model, text, prefix)`` gave text after a prefix no BOS while training had
    put one there (a toy whose tokenizer adds BOS): the trained prefix scored 26.6 % instead of 78.1 %
    on its own training set. The policy now travels with the prefix (and its file)."""
    model = toy("llama") if tokenizer == "adds_bos" else no_bos_toy()
    data = text_pairs()
    out = train.train_prefix(model, data, form=form, length=3, prepend_bos=bos, config=cfg(iters=3))
    policy = (tokenizer == "adds_bos") if bos is None else bos
    assert out.settings["prepend_bos"] is policy and out.prefix.content_bos is policy
    pairs = Pairs.from_data(model, data, bos)
    for i, (x, y) in enumerate(data):
        batch = pairs.batch([i])  # one row: no padding; the training format's ids
        trained_format = pairs_loss(model, batch, out.prefix, cache_prefix=False)
        documented = run_with_prefix(model, x + y, out.prefix)[:, :-1]  # input + target, as text
        assert documented.shape[1] == batch.tokens.shape[1]
        # the same ids (one trailing token more, which causal attention hides): float32 precision
        torch.testing.assert_close(F.cross_entropy(documented[0], batch.labels[0], ignore_index=tasks.IGNORE), trained_format)


def test_every_text_entry_point_after_a_trained_prefix_uses_its_policy_and_prepend_bos_wins(tmp_path):
    from prefixlens import analysis, decompose, generate, run_with_cache
    from prefixlens.prefixes import Prefix

    model = toy("llama")
    prefix = train.train_prefix(model, text_pairs(), form="kv", length=3, config=cfg(iters=2)).prefix
    assert prefix.content_bos is True
    prefix.save(tmp_path / "p.safetensors")
    loaded = Prefix.load(tmp_path / "p.safetensors", model)
    text = ["5 6 7", "8 9"]
    calls = {
        "run_with_prefix": lambda p, **kw: run_with_prefix(model, text, p, **kw),
        "run_with_cache": lambda p, **kw: run_with_cache(model, text, p, **kw)[0],
        "generate": lambda p, **kw: generate(model, text, p, max_new_tokens=2, **kw),
        "decompose": lambda p, **kw: decompose(model, text, p, **kw).prefix_attention,
        "check_identities": lambda p, **kw: analysis.check_identities(model, text, p, **kw).cross_layer_shift,
        "slot_statistics": lambda p, **kw: analysis.slot_statistics(model, text, p, **kw).weights,
    }
    for name, call in calls.items():
        with_bos, without = call(prefix, prepend_bos=True), call(prefix, prepend_bos=False)
        assert with_bos.shape != without.shape or not torch.equal(with_bos, without), name
        for p in (prefix, loaded, prefix.to_kv() if hasattr(prefix, "to_kv") else prefix):
            assert torch.equal(call(p), with_bos), name  # the default is the trained policy
    # forms converted or sliced keep it; a prefix from a prompt records none (no BOS after it)
    soft = train.train_prefix(model, text_pairs(), form="soft", length=3, config=cfg(iters=1)).prefix
    assert soft.to_kv(model).content_bos is True
    assert KVPrefix.from_prompt(model, "5 6").content_bos is None
    torch.testing.assert_close(run_with_prefix(model, "7 8", KVPrefix.from_prompt(model, "5 6")),
                               model(torch.tensor([[1, 5, 6, 7, 8]]))[:, 3:])


def test_prefix_files_keep_the_bos_policy_and_refuse_a_malformed_one(tmp_path):
    from prefixlens.prefixes import Prefix
    from prefixlens.serialization import load_tensors, save_tensors

    model = toy("llama")
    for policy in (True, False, None):
        p = KVPrefix.random(model, 2)
        p.content_bos = policy
        p.save(tmp_path / "p.safetensors")
        assert Prefix.load(tmp_path / "p.safetensors", model).content_bos is policy
    tensors, meta = load_tensors(tmp_path / "p.safetensors")
    save_tensors(tmp_path / "bad.safetensors", tensors, {**meta, "content_bos": "yes"})
    with pytest.raises(ValueError, match="content_bos"):
        Prefix.load(tmp_path / "bad.safetensors", model)


def test_reparametrised_and_id_trained_prefixes_record_their_policy():
    model = toy("llama")
    mlp = train.train_prefix(model, text_pairs(), form="kv", length=2, reparam={"d_small": 4, "hidden": 8}, config=cfg(iters=1))
    assert mlp.prefix.content_bos is True and mlp.settings["prepend_bos"] is True
    ids = train.train_prefix(model, ragged_pairs(), form="kv", length=2, config=cfg(iters=1))
    assert ids.prefix.content_bos is None and ids.settings["prepend_bos"] is None  # ids are used as given


# ---- initialisation, evaluation, checkpoints, dispatch ---------------------------------------------------


def test_initialisations():
    model = toy("llama")
    data = ragged_pairs(4)
    one = functools.partial(train.train_prefix, model, data, form="kv", length=5, config=cfg(iters=1))
    # text: PEFT's TEXT init, the words repeated to the length; the prefix a real prompt would leave
    from prefixlens.training.pairs import initial_prefix

    p = initial_prefix(model, "kv", 5, "text", 0, init_text=[20, 21])
    ref = KVPrefix.from_prompt(model, torch.tensor([20, 21, 20, 21, 20]))
    assert torch.equal(p.keys, ref.keys) and torch.equal(p.values, ref.values) and p.keys.requires_grad
    v1, v2 = initial_prefix(model, "soft", 3, "vocab", 0), initial_prefix(model, "soft", 3, "vocab", 0)
    assert torch.equal(v1.embeddings, v2.embeddings)
    assert not torch.equal(v1.embeddings, initial_prefix(model, "soft", 3, "vocab", 1).embeddings)
    z = initial_prefix(model, "residual", 2, "zeros", 0)
    assert isinstance(z, ResidualPrefix) and not z.resid.any()
    start = SoftPrompt.random(model, 2, seed=4)
    out = train.train_prefix(model, data, form="soft", init=start, config=cfg(iters=2))
    assert out.prefix.length == 2 and not torch.equal(out.prefix.embeddings, start.embeddings)
    assert start.embeddings.grad is None  # the given prefix is copied, not trained
    kv_from_soft = initial_prefix(model, "kv", 2, start, 0)  # converted to the form
    assert isinstance(kv_from_soft, KVPrefix)
    assert len(one(init="vocab").losses) == 1
    with pytest.raises(ValueError, match="init_text"):
        one(init="text")
    with pytest.raises(ValueError, match="init must be"):
        one(init="glove")


def test_eval_callback_and_eval_data_are_logged():
    model = toy("gpt2")
    seen = []

    def callback(step, prefix):
        seen.append((step, type(prefix).__name__, torch.is_grad_enabled()))
        return {"norm": float(prefix.keys.norm())}

    out = train.train_prefix(model, ragged_pairs(6), form="kv", length=2, eval_fn=callback, eval_data=ragged_pairs(3, seed=9),
                          config=cfg(iters=5, eval_every=2))
    assert [s for s, _, _ in seen] == [2, 4, 5] and all(n == "KVPrefix" and not g for _, n, g in seen)
    assert [e[0] for e in out.evals] == [2, 4, 5]
    assert set(out.evals[0][1]) == {"norm", "eval_loss"}


def test_checkpoints_resume_exactly(tmp_path, monkeypatch):
    model = toy("llama")
    data = ragged_pairs(6)
    kw = dict(form="kv", length=2)
    full = train.train_prefix(model, data, config=cfg(iters=6, batch_size=4, checkpoint_dir=str(tmp_path / "a"), checkpoint_every=2), **kw)
    import prefixlens.training.pairs as pairs_module

    real, calls = pairs_module.pairs_loss, []

    def dies_at_step_5(*a, **k):
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(pairs_module, "pairs_loss", dies_at_step_5)
    config = cfg(iters=6, batch_size=4, checkpoint_dir=str(tmp_path / "b"), checkpoint_every=2)
    with pytest.raises(KeyboardInterrupt):
        train.train_prefix(model, data, config=config, **kw)
    monkeypatch.setattr(pairs_module, "pairs_loss", real)
    resumed = train.train_prefix(model, data, config=config, **kw)
    assert resumed.result.resumed_from == 4
    assert resumed.losses == full.losses
    assert torch.equal(resumed.prefix.keys, full.prefix.keys) and torch.equal(resumed.prefix.values, full.prefix.values)


def test_train_prefix_dispatches_on_a_task_name_and_refuses_bad_data():
    model = models.toy_gpt2(n_layers=1, d_model=16, n_heads=2, d_vocab=10, n_ctx=26, seed=0)
    prefix, result = train.train_prefix(model, "add1", 2, train.TrainConfig(iters=2, batch_size=4, progress=False))
    assert isinstance(prefix, ResidualPrefix) and len(result.losses) == 2
    with pytest.raises(TypeError, match="pairs"):
        train.train_prefix(model, 5, form="kv")
    with pytest.raises(ValueError, match="empty"):
        train.train_prefix(model, [], form="kv")
    with pytest.raises(ValueError, match="form must be"):
        train.train_prefix(model, [([1], [2])], form="prompt")
    with pytest.raises(ValueError, match="outside"):
        train.train_prefix(model, [([1], [20])], form="kv")
    with pytest.raises(ValueError, match="input' and 'target"):
        train.train_prefix(model, [{"x": [1]}], form="kv")


# ---- SmolLM2: a small real objective ---------------------------------------------------------------------

SENTIMENT = [
    ("Word: great\nSentiment:", " positive"),
    ("Word: awful\nSentiment:", " negative"),
    ("Word: wonderful\nSentiment:", " positive"),
    ("Word: terrible\nSentiment:", " negative"),
    ("Word: happy\nSentiment:", " positive"),
    ("Word: sad\nSentiment:", " negative"),
]
TASK_WORDS = "Classify the sentiment of the word"


@pytest.fixture(scope="module")
def smollm2():
    model = models.load("smollm2-135m")
    model.requires_grad_(False)
    return model


def test_smollm2_kv_prefix_learns_the_target_tokens_and_leaves_the_base_untouched(smollm2):
    model = smollm2
    before, flags, modes = snapshot(model), [p.requires_grad for p in model.parameters()], [m.training for m in model.modules()]
    out = train.train_prefix(model, SENTIMENT, form="kv", init="text", init_text=TASK_WORDS, length=6,
                          config=cfg(iters=3, lr=1e-2, batch_size=6))
    assert out.losses[-1] < out.losses[0]
    # independent: the HF model itself on prompt + input + target, the prefix's real prompt in front
    prompt = out.settings["init_text"]
    hf = model.original_model
    total, n = 0.0, 0
    from prefixlens.text import encode

    with torch.no_grad():
        for x, y in SENTIMENT:
            xi, yi = encode(model, x), encode(model, y, False)
            ids = torch.tensor(prompt + xi + yi)[None]
            logits = hf(ids).logits[0].double()
            s = len(prompt) + len(xi)
            total += float(F.cross_entropy(logits[s - 1 : -1], ids[0, s:], reduction="sum"))
            n += len(yi)
    assert out.losses[0] == pytest.approx(total / n, abs=2e-4)
    assert_untouched(model, before, flags, modes)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_smollm2_cache_route_gives_the_placeholder_loss_and_gradients(smollm2, dtype):
    model = smollm2 if dtype == torch.float32 else models.load("smollm2-135m", dtype=torch.float64)
    model.requires_grad_(False)
    pairs = Pairs.from_data(model, SENTIMENT[:4] + [("Word: a long and winding road\nSentiment:", " positive")])
    batch = pairs.batch(range(5))
    assert batch.mask is not None
    prefix = KVPrefix.from_prompt(model, torch.tensor(pairs.inputs[0][:4]))
    out = {}
    for route in (True, False):
        loss = pairs_loss(model, batch, prefix, cache_prefix=route)
        out[route] = (loss.detach(), *torch.autograd.grad(loss, [prefix.keys, prefix.values]))
    tol = 1e-4 if dtype == torch.float32 else 1e-10
    for a, b in zip(out[True], out[False]):
        assert (a - b).abs().max() <= tol * max(1.0, float(b.abs().max()))
