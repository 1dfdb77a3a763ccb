"""prefixlens.train and prefixlens.lora on tiny models (short runs; identities, not accuracies)."""


import pytest
import torch

from prefixlens import models, tasks, train
from prefixlens.lora import MLP_TARGETS, REFERENCE_TARGETS, add_lora, lora_parameter_count

P = 2


def tiny(seed=0, **kw):
    kw = {"n_layers": 2, "d_model": 16, "n_heads": 2, **kw}
    return models.toy_gpt2(d_vocab=tasks.VOCAB, n_ctx=P + 20 + 2, seed=seed, **kw)


def cfg(**kw):
    return train.TrainConfig(**{"iters": 12, "lr": 1e-2, "batch_size": 16, "progress": False, **kw})


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_full_training_is_seeded_and_learns():
    a, b = tiny(), tiny()
    ra = train.train_model(a, "add1", P, cfg(iters=25))
    rb = train.train_model(b, "add1", P, cfg(iters=25))
    assert ra.losses == rb.losses
    assert sum(ra.losses[-5:]) < sum(ra.losses[:5])
    rc = train.train_model(tiny(), "add1", P, cfg(iters=25, seed=1))
    assert rc.losses != ra.losses
    assert not a.training  # returned in eval mode


@pytest.mark.parametrize("form", ["residual", "kv", "soft"])
def test_prefix_training_keeps_the_base_frozen(form):
    model = tiny()
    before = _state(model)
    init = train.PREFIX_FORMS[form].random(model, P, seed=0)
    prefix, res = train.train_prefix(model, "ascending", P, cfg(iters=6), form=form)
    assert all(not p.requires_grad for p in model.parameters())
    assert all(p.grad is None for p in model.parameters())  # no weight gradients were computed
    after = _state(model)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert res.n_trainable == prefix.n_parameters() == train.prefix_parameter_count(model, P, form)
    assert all(not torch.equal(getattr(prefix, n), getattr(init, n)) for n in prefix.tensor_names)
    assert not model._forward_hooks and all(not m._forward_hooks for m in model.modules())


def test_prefix_mlp_reparametrisation_exports_a_plain_prefix():
    model = tiny()
    prefix, res = train.train_prefix(model, "ascending", P, cfg(), reparam={"d_small": 8, "hidden": 16})
    assert isinstance(prefix, train.ResidualPrefix) and prefix.resid.grad_fn is None
    assert res.n_trainable > prefix.n_parameters()  # the MLP is trained, the prefix is its output
    kv, _ = train.train_prefix(model, "ascending", P, cfg(iters=3), form="kv", reparam={"d_small": 8, "hidden": 16})
    assert kv.keys.shape == (2, P, 2, 8)


def test_shorter_prefix_keeps_remaining_pads_and_too_long_is_refused():
    model = tiny()
    p, _ = train.train_prefix(model, "add2", P, cfg(iters=2), length=1)
    assert p.length == 1
    with pytest.raises(ValueError, match="prefix length"):
        train.train_prefix(model, "add2", P, cfg(iters=2), length=P + 1)


def test_lora_counts_match_prefix_sizes():
    model = tiny(n_layers=3, d_model=16)
    L, d = 3, 16
    assert lora_parameter_count(model, 1, REFERENCE_TARGETS) == L * 12 * d == train.prefix_parameter_count(model, 12)
    assert lora_parameter_count(model, 1, MLP_TARGETS) == L * 10 * d == train.prefix_parameter_count(model, 10)
    lora = add_lora(model, rank=2, targets="mlp")
    assert lora.n_parameters() == lora_parameter_count(model, 2, "mlp") == 2 * L * 10 * d
    lora.remove()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_lora_delta_orientation_and_exact_removal(dtype):
    model = tiny(dtype=dtype)
    x = torch.randint(0, 10, (3, 12))
    base = model(x).detach()
    W = model.blocks[0].mlp.out.original_component.weight.detach().clone()
    lora = add_lora(model, rank=1, targets=("mlp_out", "o", "q"), seed=3)
    assert torch.equal(model(x).detach(), base)  # B = 0 at initialisation
    with torch.no_grad():
        for d in lora.deltas.values():
            d.B.normal_()
    d = lora.deltas["0_mlp_out"]
    conv = model.blocks[0].mlp.out.original_component  # HF Conv1D, weight [in, out]
    expected = W + (d.B @ d.A).T * d.scaling
    tol = 1e-6 if dtype == torch.float32 else 1e-12
    assert torch.allclose(conv.weight, expected, atol=tol)
    h = torch.randn(4, W.shape[0], dtype=dtype)
    assert torch.allclose(conv(h), h @ expected + conv.bias, atol=tol * 10)
    q = model.blocks[0].attn.q.original_component  # nn.Linear, weight [out, in]
    dq = lora.deltas["0_q"]
    assert torch.allclose(q.weight - q.parametrizations.weight.original, dq.B @ dq.A * dq.scaling, atol=tol)
    assert not torch.allclose(model(x), base)
    lora.remove()
    assert torch.equal(model(x).detach(), base)
    assert torch.equal(conv.weight, W)


def test_lora_training_trains_only_the_adapters():
    model = tiny()
    before = _state(model)
    lora, res = train.train_lora(model, "histogram", P, cfg(iters=15, lr=2e-2), rank=1, targets="reference")
    assert res.n_trainable == lora.n_parameters() == lora_parameter_count(model, 1, "reference")
    assert res.losses[-1] < res.losses[0]
    base = [(n, p) for n, p in model.named_parameters() if ".parametrizations.weight.0." not in n]
    assert len(base) > 10 and all(p.grad is None and not p.requires_grad for _, p in base)
    lora.remove()
    after = _state(model)
    assert all(torch.equal(before[k], after[k]) for k in before)


@pytest.fixture(scope="module")
def add1_model():
    """A tiny model briefly trained on add1, its test set, and a random prefix (read-only)."""
    model = tiny()
    train.train_model(model, "add1", P, cfg(iters=30, lr=1e-2, batch_size=16))
    return model, tasks.test_set("add1", 48, P, seed=0), train.ResidualPrefix.random(model, P, seed=0)


def test_evaluate_greedy_equals_teacher_forced(add1_model):
    model, test, prefix = add1_model
    for pre in (None, prefix):
        g = train.evaluate(model, test, pre, method="greedy", batch_size=32)
        tf = train.evaluate(model, test, pre, method="teacher_forced")
        assert g.correct == tf.correct and g.n == 48
    acc = train.Accuracy(3, 10)
    assert acc.mean == 0.3 and acc.ci95[0] < 0.3 < acc.ci95[1]
    with pytest.raises(ValueError):
        train.evaluate(model, test, method="beam")


def test_predict_and_position_accuracy(add1_model):
    model, test, prefix = add1_model
    for pre in (None, prefix):
        greedy = train.predict(model, test, pre, batch_size=20)
        forced = train.predict(model, test, pre, method="teacher_forced")
        assert greedy.shape == forced.shape == test.answers.shape
        # the first answer token has no preceding answer, so both decoders see the same prompt
        assert torch.equal(greedy[:, 0], forced[:, 0])
        right = (forced == test.answers).all(1)
        assert torch.equal(greedy[right], forced[right])
        acc = train.position_accuracy(model, test, pre)
        assert acc.shape == (tasks.LENGTH,)
        assert torch.allclose(acc, (forced == test.answers).double().mean(0))
        assert train.evaluate(model, test, pre).mean <= acc.min().item()


def test_checkpoint_resume_is_exact(tmp_path):
    straight = tiny()
    r0 = train.train_model(straight, "add2", P, cfg(iters=20))
    model = tiny()
    r1 = train.train_model(model, "add2", P, cfg(iters=20, checkpoint_dir=str(tmp_path), checkpoint_every=10))
    (run_dir,) = tmp_path.iterdir()
    assert sorted(p.name for p in run_dir.iterdir()) == ["step_000000010.safetensors", "step_000000020.safetensors"]
    (run_dir / "step_000000020.safetensors").unlink()  # "interrupted" after step 10
    resumed = tiny()
    r2 = train.train_model(resumed, "add2", P, cfg(iters=20, checkpoint_dir=str(tmp_path), checkpoint_every=10))
    assert r2.resumed_from == 10 and r2.losses == r0.losses == r1.losses
    s0, s2 = straight.state_dict(), resumed.state_dict()
    assert all(torch.equal(s0[k], s2[k]) for k in s0 if ".qkv." not in k)


def test_resume_never_picks_up_another_runs_checkpoint(tmp_path):
    train.train_model(tiny(), "ascending", P, cfg(checkpoint_dir=str(tmp_path), checkpoint_every=6), name="run")
    # same name and directory, another task / seed / base model: fresh runs
    for task, seed, model_seed in (("ascending_add1", 0, 0), ("ascending", 1, 0), ("ascending", 0, 5)):
        r = train.train_model(tiny(model_seed), task, P, cfg(seed=seed, checkpoint_dir=str(tmp_path)), name="run")
        assert r.resumed_from is None
    # same weights, another activation function: a fresh run
    other = tiny()
    other.cfg.act_fn = "relu"
    for block in other.original_model.transformer.h:
        block.mlp.act = torch.nn.ReLU()
    assert train.train_model(other, "ascending", P, cfg(checkpoint_dir=str(tmp_path)), name="run").resumed_from is None
    # a foreign checkpoint copied into this run's directory is ignored
    prefix_dir = tmp_path / "p"
    _, first = train.train_prefix(tiny(), "ascending", P, cfg(iters=4, checkpoint_dir=str(prefix_dir), checkpoint_every=4), name="x")
    (target,) = prefix_dir.iterdir()
    for src in tmp_path.glob("run-*/step_*.safetensors"):
        (target / ("step_999999999.safetensors")).write_bytes(src.read_bytes())
        break
    _, again = train.train_prefix(tiny(), "ascending", P, cfg(iters=4, checkpoint_dir=str(prefix_dir), checkpoint_every=4), name="x")
    assert again.resumed_from == 4 and again.losses == first.losses


def test_early_stopping_and_bad_inputs(tmp_path):
    model = tiny()
    kw = dict(iters=50, eval_every=5, eval_items=32, target_accuracy=0.0, checkpoint_dir=str(tmp_path))
    res = train.train_model(model, "add1", P, cfg(**kw))
    assert res.stopped_early and res.steps == 5 and res.evals[0][0] == 5
    again = tiny()
    res2 = train.train_model(again, "add1", P, cfg(**kw))  # a finished run is loaded, not continued
    assert res2.resumed_from == 5 and res2.steps == 5 and res2.losses == res.losses
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), again.parameters()))
    with pytest.raises(ValueError, match="form"):
        train.train_prefix(model, "add1", P, cfg(), form="lora")
    with pytest.raises(ValueError, match="targets"):
        add_lora(model, targets=("c_attn",))


def _loss_and_grads(model, batch, params, prefix, share):
    for p in params:
        p.grad = None
    loss = train.batch_loss(model, batch, prefix, share_pads=share)
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in params]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("method", ["full", "residual", "residual_all_pads", "kv", "soft", "lora"])
def test_shared_pads_give_the_full_pass_loss_and_gradients(method, dtype):
    n_pad = 4
    model = models.toy_gpt2(d_vocab=tasks.VOCAB, n_ctx=n_pad + 20, seed=0, n_layers=2, d_model=16, n_heads=2, dtype=dtype)
    batch = tasks.make_batch("histogram", 8, n_pad, "train", torch.Generator().manual_seed(0))
    model.eval()
    prefix = None
    if method == "full":
        model.requires_grad_(True)
        params = [p for n, p in model.named_parameters() if ".qkv." not in n]
    elif method == "lora":
        model.requires_grad_(False)
        lora = add_lora(model, rank=1, targets="reference")
        with torch.no_grad():
            for p in lora.parameters():
                p.add_(0.1 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1), dtype=p.dtype))
        params = list(lora.parameters())
    else:
        model.requires_grad_(False)
        form = "residual" if method.startswith("residual") else method
        prefix = train.PREFIX_FORMS[form].random(model, n_pad if method == "residual_all_pads" else 3, seed=0)
        params = list(prefix.parameters())
    assert train._can_share_pads(model, *_shared_args(batch, prefix))
    shared_loss, shared_grads = _loss_and_grads(model, batch, params, prefix, True)
    full_loss, full_grads = _loss_and_grads(model, batch, params, prefix, False)
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(shared_loss, full_loss, rtol=tol, atol=tol)
    for a, b in zip(shared_grads, full_grads):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol)
    assert not any(m._forward_hooks for m in model.modules())


def _shared_args(batch, prefix):
    tokens, _ = train._content(batch.tokens, batch.targets, batch.n_pad, prefix)
    return tokens, batch.n_pad - (prefix.length if prefix is not None else 0), prefix


def test_shared_pads_are_not_used_when_rows_differ():
    model = tiny(dropout=0.1)
    batch = tasks.make_batch("ascending", 4, P, "train", torch.Generator().manual_seed(0))
    model.train()  # dropout makes the pad positions differ between rows
    assert not train._can_share_pads(model, *_shared_args(batch, None))
    model.eval()
    assert train._can_share_pads(model, *_shared_args(batch, None))
    tokens = batch.tokens.clone()
    tokens[0, 0] = 5  # pads that differ between rows
    assert not train._can_share_pads(model, tokens, P, None)


# ---- issue 14: argument checks (case 17) and state left behind by training (case 19) ---------------


@pytest.mark.parametrize(
    "kw,match",
    [
        ({"batch_size": 0}, "batch_size"),
        ({"batch_size": -4}, "batch_size"),
        pytest.param({"batch_size": 2.5}, "batch_size", marks=pytest.mark.wrong_types_on_purpose),
        ({"iters": -1}, "iters"),
        ({"lr": 0.0}, "lr"),
        ({"lr": -1e-3}, "lr"),
        ({"lr": float("nan")}, "lr"),
        ({"betas": (0.9, 1.0)}, "betas"),
        ({"weight_decay": -0.1}, "weight_decay"),
        ({"grad_clip": -1.0}, "grad_clip"),
        ({"eval_every": -1}, "eval_every"),
        ({"eval_items": 0}, "eval_items"),
        ({"target_accuracy": 1.5, "eval_every": 5}, "target_accuracy"),
        ({"target_accuracy": 0.9}, "eval_every"),  # would silently never stop early
        ({"schedule": "linear"}, "schedule"),
        ({"checkpoint_every": -1}, "checkpoint_every"),
        # issue 21 (14): finite but out of range, found only when torch overflowed
        ({"lr": 3e38}, "lr"),
        ({"lr": 11.0}, "lr"),
        ({"lr": float("inf")}, "lr"),
        ({"lr": 1.0, "weight_decay": 2.0}, "lr \\* weight_decay"),
        ({"seed": -1}, "seed"),
        ({"seed": 2**70}, "seed"),
        ({"grad_clip": float("inf")}, "grad_clip"),
    ],
)
def test_train_config_refuses_bad_settings(kw, match):
    with pytest.raises(ValueError, match=match):
        cfg(**kw)


@pytest.mark.parametrize(
    "kw,match",
    [
        ({"init_scale": float("nan")}, "init_scale"),
        ({"init_scale": float("inf")}, "init_scale"),
        ({"init_scale": -1.0}, "init_scale"),
        ({"reparam": {"d_small": -1, "hidden": 8}}, "reparam"),
        ({"reparam": {"d_small": 0, "hidden": 8}}, "reparam"),
        ({"reparam": {"width": 8}}, "reparam"),
    ],
)
@pytest.mark.parametrize("entry", ["task", "pairs"])
def test_train_prefix_refuses_bad_numeric_arguments_up_front(kw, match, entry):
    """Issue 21 (14): the arguments of train_prefix are checked before anything runs (a nan/inf
    init_scale failed as "loss became nan", a negative reparam width deep inside torch, a zero
    width trained silently)."""
    model = tiny()
    form = "kv" if "reparam" in kw else "residual"
    with pytest.raises(ValueError, match=match):
        if entry == "task":
            train.train_prefix(model, "add1", P, cfg(iters=1), form=form, **kw)
        else:
            train.train_prefix(model, [([5, 6], [7])], form=form, length=P, config=cfg(iters=1, batch_size=1), **kw)


def test_a_config_changed_after_construction_is_checked_before_anything_changes():
    model = tiny()
    config = cfg(iters=2)
    config.batch_size = 0
    before = [p.requires_grad for p in model.parameters()]
    for call in (
        lambda: train.train_model(model, "add1", P, config),
        lambda: train.train_prefix(model, "add1", P, config),
        lambda: train.train_lora(model, "add1", P, config),
    ):
        with pytest.raises(ValueError, match="batch_size"):
            call()
        assert [p.requires_grad for p in model.parameters()] == before
        assert not any("parametrizations" in m._modules for m in model.original_model.modules())


def _modes(model):
    return [m.training for m in model.modules()] + [m.training for m in model.original_model.modules()]


def _mixed_state(model):
    """A state no training method would leave: some parameters frozen, train mode except one block."""
    for i, p in enumerate(model.parameters()):
        p.requires_grad_(i % 3 != 0)
    model.train()
    model.blocks[1].eval()
    model.original_model.transformer.h[1].eval()
    return [p.requires_grad for p in model.parameters()], _modes(model)


def test_train_model_restores_flags_modes_grads_and_the_global_rng():
    model = tiny(dropout=0.1)
    flags, modes = _mixed_state(model)
    torch.manual_seed(1234)
    rng = torch.get_rng_state()
    train.train_model(model, "add1", P, cfg(iters=2, batch_size=4))
    assert torch.equal(torch.get_rng_state(), rng)  # was reseeded to config.seed
    assert [p.requires_grad for p in model.parameters()] == flags  # were all True
    assert _modes(model) == modes  # was eval everywhere
    assert all(p.grad is None for p in model.parameters())  # no stale gradients of the last step


def test_train_model_restores_everything_when_training_raises(monkeypatch):
    model = tiny(dropout=0.1)
    flags, modes = _mixed_state(model)
    rng = torch.get_rng_state()

    def boom(*a, **k):
        raise RuntimeError("boom")

    monkeypatch.setattr("prefixlens.training.methods.batch_loss", boom)  # where the methods look it up
    for call in (
        lambda: train.train_model(model, "add1", P, cfg(iters=2, batch_size=4)),
        lambda: train.train_prefix(model, "add1", P, cfg(iters=2, batch_size=4)),
        lambda: train.train_lora(model, "add1", P, cfg(iters=2, batch_size=4)),
    ):
        with pytest.raises(RuntimeError, match="boom"):
            call()
        assert [p.requires_grad for p in model.parameters()] == flags
        assert _modes(model) == modes
        assert torch.equal(torch.get_rng_state(), rng)
        assert not any("parametrizations" in m._modules for m in model.original_model.modules())


@pytest.mark.parametrize("method", ["prefix", "lora"])
def test_prefix_and_lora_training_restore_the_mode_and_the_global_rng(method):
    model = tiny(dropout=0.1)
    _, modes = _mixed_state(model)
    modules = list(model.modules()) + list(model.original_model.modules())  # (before the LoRA's own)
    torch.manual_seed(99)
    rng = torch.get_rng_state()
    if method == "prefix":
        out, _ = train.train_prefix(model, "add1", P, cfg(iters=2, batch_size=4))
    else:
        out, _ = train.train_lora(model, "add1", P, cfg(iters=2, batch_size=4))
    assert torch.equal(torch.get_rng_state(), rng)
    assert [m.training for m in modules] == modes  # trained in eval mode, handed back in the caller's mode
    assert all(not p.requires_grad for p in model.parameters())  # the base is left frozen (documented)
    assert all(p.grad is None for p in out.parameters())
    if method == "lora":
        out.remove()


def test_training_is_deterministic_whatever_the_callers_rng():
    """The run seeds its own (forked) RNG from config.seed: the caller's RNG state does not matter,
    dropout included, and the caller's RNG is not consumed."""
    losses = []
    for caller_seed in (1, 2):
        model = tiny(dropout=0.2)
        torch.manual_seed(caller_seed)
        losses.append(train.train_model(model, "add1", P, cfg(iters=3, batch_size=4)).losses)
        assert torch.equal(torch.get_rng_state(), torch.manual_seed(caller_seed).get_state())
    assert losses[0] == losses[1]


# ---- issue 14, items 3 and 15: run identity covers the weights exactly; a bad newest checkpoint ----------
def _swap_embedding_rows(model, i, j):
    (wte,) = [p for n, p in model.named_parameters() if "wte" in n]
    with torch.no_grad():
        wte[[i, j]] = wte[[j, i]]
    return model


def test_resume_refuses_other_weights_that_sums_cannot_tell_apart(tmp_path):
    """Two token embeddings swapped (rows 7 apart: every sum the old digest took is unchanged)
    is another model: its run must not pick up the first model's finished run."""
    kw = dict(iters=4, checkpoint_dir=str(tmp_path), checkpoint_every=4)
    first, r1 = train.train_prefix(tiny(), "add1", P, cfg(**kw), name="x")
    other = _swap_embedding_rows(tiny(), 1, 8)
    assert train._fingerprint(other) == train._fingerprint(tiny())  # the old digest collides
    prefix, r2 = train.train_prefix(other, "add1", P, cfg(**kw), name="x")
    assert r2.resumed_from is None and len(list(tmp_path.iterdir())) == 2
    assert prefix.signature.weights != first.signature.weights
    assert train.train_prefix(tiny(), "add1", P, cfg(**kw), name="x")[1].resumed_from == 4  # the same model resumes


def test_resume_keeps_float32_and_float64_runs_apart(tmp_path):
    kw = dict(iters=4, checkpoint_dir=str(tmp_path), checkpoint_every=4)
    train.train_prefix(tiny(), "add1", P, cfg(**kw), name="x")
    _, r = train.train_prefix(tiny(dtype=torch.float64), "add1", P, cfg(**kw), name="x")
    assert r.resumed_from is None


@pytest.mark.parametrize("damage", ["truncated", "flipped_byte", "empty"])
def test_resume_falls_back_from_a_damaged_newest_checkpoint(tmp_path, damage):
    straight = train.train_model(tiny(), "add2", P, cfg(iters=20))
    kw = dict(iters=20, checkpoint_dir=str(tmp_path), checkpoint_every=10)
    train.train_model(tiny(), "add2", P, cfg(**kw))
    (run_dir,) = tmp_path.iterdir()
    newest = run_dir / "step_000000020.safetensors"
    data = newest.read_bytes()
    if damage == "truncated":
        newest.write_bytes(data[: len(data) // 2])
    elif damage == "flipped_byte":
        newest.write_bytes(data[:-9] + bytes([data[-9] ^ 0x10]) + data[-8:])
    else:
        newest.write_bytes(b"")
    model = tiny()
    with pytest.warns(UserWarning, match="skipping an unreadable checkpoint.*step_000000020.safetensors"):
        r = train.train_model(model, "add2", P, cfg(**kw))
    assert r.resumed_from == 10 and r.losses == straight.losses
    assert train.train_model(tiny(), "add2", P, cfg(**kw)).resumed_from == 20  # the bad file was rewritten


# ---- issue 21 (6, 8): half-precision training --------------------------------------------------------

HALF = [torch.float16, torch.bfloat16]
PAIRS = [([5, 6, 7], [8]), ([9, 3], [4, 2]), ([3, 4, 5, 6], [7])]


def _finite(module) -> bool:
    return all(bool(torch.isfinite(p).all()) for p in module.parameters())


@pytest.mark.parametrize("dtype", HALF, ids=["fp16", "bf16"])
@pytest.mark.parametrize(
    "entry,form",
    [("task", f) for f in ("kv", "residual", "soft", "lora", "full")] + [("pairs", f) for f in ("kv", "residual", "soft", "lora", "full")],
)
def test_half_precision_training_returns_finite_trained_values(entry, form, dtype):
    """On main, one float16 AdamW step turned every trained value into nan/-inf (eps = 1e-8 underflows)
    and iters=1 returned them without an error. Half-precision tensors now train through float32
    masters: finite, still in the model's dtype, and moved by the step."""
    model = tiny(dtype=dtype)
    model.requires_grad_(False)
    config = cfg(iters=2, batch_size=3)
    before = _state(model)
    if entry == "task":
        if form == "full":
            train.train_model(model, "add1", P, config)
            trained = model
        elif form == "lora":
            trained, _ = train.train_lora(model, "add1", P, config)
            trained.remove()
        else:
            trained, _ = train.train_prefix(model, "add1", P, config, form=form)
    else:
        trained = train.train_prefix(model, PAIRS, form=form, length=P, config=config).trained
    assert _finite(trained)
    assert all(p.dtype == dtype for p in trained.parameters())
    if form == "full":
        changed = [k for k in before if not torch.equal(before[k], trained.state_dict()[k])]
        assert changed and all(bool(torch.isfinite(v).all()) for v in trained.state_dict().values() if v.is_floating_point())
    else:
        assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # the base is untouched


@pytest.mark.parametrize("dtype", HALF, ids=["fp16", "bf16"])
def test_half_precision_first_step_is_adamw_in_float32_rounded_to_the_models_dtype(dtype):
    """AdamW's first step moves every value by lr·g/(|g| + eps) (bias-corrected): computed here in
    float32 from the gradient of the model's own half-precision loss, then rounded to the model's dtype."""
    from prefixlens.training.pairs import Pairs, initial_prefix, pairs_loss

    model = tiny(dtype=dtype)
    model.requires_grad_(False)
    config = cfg(iters=1, batch_size=3, grad_clip=0.0, weight_decay=0.0, lr=1e-3)
    trained = train.train_prefix(model, PAIRS, form="kv", length=P, config=config).prefix
    start = initial_prefix(model, "kv", P, "random", config.seed)
    batch = next(Pairs.from_data(model, PAIRS).stream(config.batch_size, config.seed))
    pairs_loss(model, batch, start).backward()
    for n in start.tensor_names:
        x, g = getattr(start, n).detach().float(), getattr(start, n).grad.float()
        expected = (x - config.lr * g / (g.abs() + 1e-8)).to(dtype)
        assert torch.equal(getattr(trained, n), expected), n


def test_a_step_that_makes_a_trained_value_non_finite_is_refused_the_last_one_too():
    """The trained values are checked after every step: here the second (last) step takes a float16
    value (65504 + 10 + 10 in its float32 master) past 65504 (inf); on main the run returned nan
    (eps underflow) without an error."""
    x = torch.nn.Parameter(torch.tensor([65500.0], dtype=torch.float16))

    def stream(gen, start):
        while True:
            yield None

    with pytest.raises(FloatingPointError, match=r"step 1 .*'x' non-finite.*float16.*65504.*bfloat16"):
        train.train_loop({"x": x}, lambda b: -(x.float() * 1e-3).sum(), stream, cfg(iters=2, lr=10.0),
                         "run", "overflow", weight_decay=0.0)


def test_float16_non_finite_loss_says_why_and_what_to_do():
    """Issue 21 (8): on main "loss became nan at step 1." without a reason or a fix. Fine-tuning a float16
    model at lr 10 overflows its activations after one step."""
    model = tiny(dtype=torch.float16)
    model.requires_grad_(False)
    with pytest.raises(FloatingPointError, match=r"loss became nan at step 1: .*lr 10.*float16.*65504.*bfloat16.*float32"):
        train.train_prefix(model, PAIRS, form="full", config=cfg(iters=30, batch_size=3, lr=10.0, weight_decay=0.0))


def test_non_finite_starting_values_are_refused_before_the_first_step():
    model = tiny(dtype=torch.float16)
    model.requires_grad_(False)
    with pytest.raises(ValueError, match="inf/nan before the first step.*float16.*65504"):
        train.train_prefix(model, PAIRS, form="residual", length=P, init_scale=1e6, config=cfg(iters=1, batch_size=3))
