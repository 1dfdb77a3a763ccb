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


# ---- user hooks next to a prefix (issue 21 items 3, 4) ---------------------------------------------------
# What a user hook sees: the activations as they are once the prefix is written, whatever the registration
# order or route. At the content positions that is exactly the real prompt's run; at the slots it is the
# prompt's wherever the form fixes the slots (a KVPrefix fixes each layer's keys and values only; a
# ResidualPrefix each layer's input, so also what that layer's attention computes from it; a SoftPrompt
# the embeddings, so everything after them).
HOOK_POINTS = ["attn.hook_k", "attn.hook_v", "hook_resid_pre", "attn.hook_z", "attn.hook_pattern"]
SLOTS_FIXED = {
    pl.KVPrefix: {"attn.hook_k", "attn.hook_v"},
    pl.ResidualPrefix: set(HOOK_POINTS),
    pl.SoftPrompt: set(HOOK_POINTS),
}
TWO_FAMILIES = ["gpt2", "llama_gqa"]


def _user_hook_routes(model, x, prefix, hooks):
    """Content logits of ``x`` after ``prefix`` with the user's ``hooks``, by every route a user combines them."""
    def around():  # model.hooks() registered before run_with_prefix attaches the prefix
        with model.hooks(fwd_hooks=hooks):
            return pl.run_with_prefix(model, x, prefix)

    def around_cache():
        with model.hooks(fwd_hooks=hooks):
            return pl.run_with_cache(model, x, prefix, names_filter=[])[0]

    def inside_run_with_hooks():
        with pl.attached(model, prefix) as slots:
            return slots.content(model.run_with_hooks(slots.prepend(x), fwd_hooks=hooks))

    def inside_hooks():
        with pl.attached(model, prefix) as slots, model.hooks(fwd_hooks=hooks):
            return slots.content(model(slots.prepend(x)))

    def added_before_attached():
        for name, fn in hooks:
            model.add_hook(name, fn)
        try:
            with pl.attached(model, prefix) as slots:
                return slots.content(model(slots.prepend(x)))
        finally:
            model.reset_hooks()

    return {f.__name__: f for f in (around, around_cache, inside_run_with_hooks, inside_hooks, added_before_attached)}


@pytest.mark.parametrize("point", HOOK_POINTS)
@pytest.mark.parametrize("form", FORMS, ids=lambda c: c.__name__)
@pytest.mark.parametrize("family", TWO_FAMILIES)
def test_user_hooks_see_the_prompts_activations_on_every_route(family, form, point):
    model = build(family, torch.float64)
    P, layer = 3, 1
    prompt, x = random_tokens((P,), seed=11), random_tokens((2, 5), seed=12)
    name = f"blocks.{layer}.{point}"
    pos = -2 if point.endswith("pattern") else 1  # the query axis
    seen = []
    record = [(name, lambda act, hook: seen.append(act.detach().clone()))]
    with torch.no_grad():
        model.run_with_hooks(torch.cat([prompt.expand(2, -1), x], 1), fwd_hooks=record)
        real = seen.pop()
        prefix = form.from_prompt(model, prompt)
        for route, run in _user_hook_routes(model, x, prefix, record).items():
            run()
            got = seen.pop()
            assert got.shape == real.shape
            content = (got - real).narrow(pos, P, 5).abs().max().item()
            assert content <= 1e-10, f"{route}: {name} at the content positions, max |Δ| = {content:.2e}"
            if point in SLOTS_FIXED[form]:
                slots = (got - real).narrow(pos, 0, P).abs().max().item()
                assert slots <= 1e-10, f"{route}: {name} at the slots (the {form.__name__}'s), max |Δ| = {slots:.2e}"
    assert n_attached_hooks(model) == 0


# (a KVPrefix's slot inputs feed nothing content reads: its keys and values are the prefix's in every layer)
EDITED = [(f, p) for f in FORMS for p in HOOK_POINTS if p in SLOTS_FIXED[f] or (f is pl.KVPrefix and p != "hook_resid_pre")]


@pytest.mark.parametrize(("form", "point"), EDITED, ids=lambda v: getattr(v, "__name__", v))
@pytest.mark.parametrize("family", TWO_FAMILIES)
def test_user_edits_at_the_slots_stick_on_every_route(family, form, point):
    """A hook that edits every position (steering, ablation) acts on the slots as the prefix wrote them,
    and the edit sticks: in the last layer (where the form fixes what content reads of the slots) the
    content logits equal the real prompt's run with the same hook, by every route."""
    model = build(family, torch.float64)
    P, layer = 3, int(model.cfg.n_layers) - 1
    prompt, x = random_tokens((P,), seed=13), random_tokens((2, 5), seed=14)
    name = f"blocks.{layer}.{point}"

    def edit(act, hook):
        delta = torch.randn(act.shape[1:], generator=torch.Generator().manual_seed(5), dtype=act.dtype)
        return act * 0.5 + delta if point.endswith("pattern") else act + delta

    hooks = [(name, edit)]
    with torch.no_grad():
        real = model.run_with_hooks(torch.cat([prompt.expand(2, -1), x], 1), fwd_hooks=hooks)[:, P:]
        assert (real - model(torch.cat([prompt.expand(2, -1), x], 1))[:, P:]).abs().max() > 1e-3
        prefix = form.from_prompt(model, prompt)
        for route, run in _user_hook_routes(model, x, prefix, hooks).items():
            err = (run() - real).abs().max().item()
            assert err <= 1e-10, f"{route}: {form.__name__} with an edit at {name}: max |Δ| = {err:.2e}"
    assert n_attached_hooks(model) == 0


def _remove_everything(model):
    """Every way TransformerLens removes hooks, as a user would call it inside an ``attached`` block."""
    points = {id(hp): hp for hp in model.hook_dict.values()}.values()

    def hooks_context_exit():
        with model.hooks(fwd_hooks=[("blocks.0.hook_resid_pre", lambda a, hook: None)]):
            pass

    return {
        "reset_hooks()": lambda: model.reset_hooks(),
        "reset_hooks(including_permanent=True)": lambda: model.reset_hooks(including_permanent=True),
        "remove_all_hook_fns(including_permanent=True)": lambda: model.remove_all_hook_fns(including_permanent=True),
        "HookPoint.remove_hooks('both', including_permanent=True)": lambda: [
            hp.remove_hooks("both", including_permanent=True) for hp in points
        ],
        "model.hooks() context exit": hooks_context_exit,
    }


@pytest.mark.parametrize("form", FORMS, ids=lambda c: c.__name__)
@pytest.mark.parametrize("family", TWO_FAMILIES)
def test_removing_hooks_inside_attached_keeps_the_prefix(family, form):
    model = build(family)
    x = random_tokens((2, 5), seed=15)
    prefix = form.random(model, 3, seed=16)
    with torch.no_grad():
        expected = pl.run_with_prefix(model, x, prefix)
        before = n_attached_hooks(model)
        for what, remove in _remove_everything(model).items():
            with pl.attached(model, prefix) as slots:
                remove()
                got = slots.content(model(slots.prepend(x)))
                err = (got - expected).abs().max().item()
                assert err == 0, f"{what} inside attached: the prefix is gone (max |Δ| = {err:.2e})"
                cached = slots.content(model.run_with_cache(slots.prepend(x), names_filter=[])[0])
                assert torch.equal(cached, expected), what
            assert n_attached_hooks(model) == before, f"{what}: hooks left behind"


@pytest.mark.parametrize("point", HOOK_POINTS)
@pytest.mark.parametrize("form", FORMS, ids=lambda c: c.__name__)
def test_user_edits_at_the_content_positions_equal_the_real_prompt(form, point):
    """An edit of the content positions only, in the first layer, is the real prompt's run with that edit."""
    model = build("llama_gqa", torch.float64)
    P = 3
    prompt, x = random_tokens((P,), seed=17), random_tokens((2, 5), seed=18)
    name = f"blocks.0.{point}"
    pos = -2 if point.endswith("pattern") else 1

    def edit(act, hook):
        n = act.shape[pos]  # the content is the last 5 positions, on the real prompt and with the slots alike
        delta = torch.randn(act.narrow(pos, n - 5, 5).shape, generator=torch.Generator().manual_seed(6), dtype=act.dtype)
        return torch.cat([act.narrow(pos, 0, n - 5), act.narrow(pos, n - 5, 5) * 0.5 + delta], dim=pos)

    with torch.no_grad():
        real = model.run_with_hooks(torch.cat([prompt.expand(2, -1), x], 1), fwd_hooks=[(name, edit)])[:, P:]
        prefix = form.from_prompt(model, prompt)
        for route, run in _user_hook_routes(model, x, prefix, [(name, edit)]).items():
            err = (run() - real).abs().max().item()
            assert err <= 1e-10, f"{route}: {form.__name__} with a content edit at {name}: max |Δ| = {err:.2e}"


def test_removing_the_prefix_hooks_below_transformerlens_is_reported_at_exit(family):
    """Clearing a HookPoint's torch hooks directly does take the prefix away: the block's exit says so."""
    model = build(family)
    x = random_tokens((1, 4), seed=19)
    prefix = pl.KVPrefix.random(model, 2, seed=20)
    points = {id(hp): hp for hp in model.hook_dict.values()}.values()
    with pytest.raises(RuntimeError, match=r"removed inside the block .*_forward_hooks\.clear\(\)"):
        with pl.attached(model, prefix) as slots:
            for hp in points:
                hp._forward_hooks.clear()
            model(slots.prepend(x))
    assert n_attached_hooks(model) == 0
