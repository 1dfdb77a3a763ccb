"""Padding masks, nesting, return types and sampling: every call gives the right answer or a clear error.

Independent references: a real prompt of the same tokens (``from_prompt``), each row run alone,
and PEFT's own forward with the same mask. Outputs at padded positions are undefined and never compared.
"""

import pytest
import torch

import prefixlens as pl
from prefixlens import analysis, models, tasks, train
from prefixlens.generation import sample_next
from tests.conftest import TOL, build, build_hf, n_attached_hooks, random_tokens

F64 = torch.float64
P, B, LEN = 3, 3, 6
FORMS = [pl.KVPrefix, pl.ResidualPrefix, pl.SoftPrompt]


def padded(side: str, seed: int = 2):
    """``[B, LEN]`` tokens and mask: row 0 unpadded, rows 1 and 2 padded by 2 and 3 on ``side``."""
    x = random_tokens((B, LEN), seed=seed)
    mask = torch.ones(B, LEN, dtype=torch.long)
    for row, n in ((1, 2), (2, 3)):
        if side == "left":
            mask[row, :n] = 0
        else:
            mask[row, LEN - n :] = 0
    return x.masked_fill(mask == 0, 0), mask


def alone(model, prompt, row):
    """The model on ``prompt + row`` (a real prompt), content positions only."""
    with torch.no_grad():
        return model(torch.cat([prompt, row])[None])[0, prompt.shape[0] :]


# HF's OPT attention may run its softmax in float32 even in a float64 model (see models.float64_throughout),
# so its float64 identities hold to float32 precision only.
F64_TOL = {"opt": 1e-6}


def tol(family):
    return F64_TOL.get(family, TOL[F64])


def any_model(family, dtype=F64):
    return build(family, dtype) if family in ("gpt2", "llama_gqa", "native") else build_hf(family, dtype)


# ---- item 1: masks in run_with_prefix / run_with_cache -------------------------------------------------


@pytest.mark.parametrize("family", ["gpt2", "llama_gqa", "native", "opt", "qwen2"])
@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("form", FORMS, ids=lambda c: c.__name__)
def test_padded_rows_equal_each_row_alone(family, side, form):
    model = any_model(family)
    before = n_attached_hooks(model)  # some bridges (OPT's) carry hooks of their own
    prompt = random_tokens((P,), seed=1)
    prefix = form.from_prompt(model, prompt)
    x, mask = padded(side)
    full = torch.cat([torch.ones(B, P, dtype=torch.long), mask], dim=1)
    with torch.no_grad():
        content = pl.run_with_prefix(model, x, prefix, attention_mask=mask)
        by_full = pl.run_with_prefix(model, x, prefix, attention_mask=full)
        cached, cache = pl.run_with_cache(model, x, prefix, attention_mask=mask.bool(),
                                          names_filter="blocks.0.hook_resid_pre")
    assert torch.equal(content, by_full) and torch.equal(content, cached)
    for r in range(B):
        real = mask[r].bool()
        expected = alone(model, prompt, x[r][real])
        for got in (content, cached):
            err = (got[r][real] - expected).abs().max().item()
            assert err <= tol(family), f"{family} {side} {form.__name__} row {r}: max |Δ| = {err:.2e}"
    assert cache["blocks.0.hook_resid_pre"].shape[:2] == (B, P + LEN)
    assert n_attached_hooks(model) == before


@pytest.mark.parametrize("family", ["gpt2", "llama_gqa", "native"])
def test_all_ones_mask_changes_nothing(family):
    model = build(family)
    prefix = pl.KVPrefix.random(model, P, seed=3)
    x = random_tokens((2, 5), seed=4)
    with torch.no_grad():
        plain = pl.run_with_prefix(model, x, prefix)
        for mask in (torch.ones(2, 5), torch.ones(2, 5, dtype=torch.bool), torch.ones(2, P + 5, dtype=torch.long)):
            assert torch.equal(pl.run_with_prefix(model, x, prefix, attention_mask=mask), plain)


def _check_masks_are_refused(cases):
    model = build("gpt2")
    prefix = pl.KVPrefix.random(model, P)
    x = random_tokens((2, 5))
    for mask, match in cases:
        for call in (
            lambda: pl.run_with_prefix(model, x, prefix, attention_mask=mask),  # noqa: B023  (called in this iteration)
            lambda: pl.run_with_cache(model, x, prefix, attention_mask=mask),  # noqa: B023  (called in this iteration)
            lambda: pl.generate(model, x, prefix, attention_mask=mask, max_new_tokens=2),  # noqa: B023  (called in this iteration)
            lambda: pl.decompose(model, x, prefix, attention_mask=mask),  # noqa: B023  (called in this iteration)
        ):
            with pytest.raises(ValueError, match=match):
                call()
    assert n_attached_hooks(model) == 0


def test_bad_masks_are_refused():
    _check_masks_are_refused([
        (torch.ones(2, 4), "expected \\[batch, T\\]"),
        (torch.ones(2, 5) * 2, "only 0"),
        (torch.tensor([[1, 1, 1, 1, 1], [0, 0, 0, 0, 0]]), r"row\(s\) \[1\] have no real content token"),
        (torch.cat([torch.zeros(2, 1), torch.ones(2, P + 4)], dim=1), "masks a prefix slot"),
    ])


@pytest.mark.wrong_types_on_purpose  # masks whose batch or rank differ from Shaped[Tensor, "batch mask_pos"]
def test_masks_of_a_wrong_batch_or_rank_are_refused():
    _check_masks_are_refused([(torch.ones(3, 5), "expected"), (torch.ones(5), "expected")])


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_imported_peft_prefix_with_a_mask_equals_peft(kind):
    pytest.importorskip("peft")
    from prefixlens.peft_interop import kv_prefix_from_peft
    from tests.test_peft_interop import bridge_of, hf_model, prefix_peft

    peft_model = prefix_peft(hf_model(kind, torch.float32), False, torch.float32)
    x, mask = padded("left")
    x = x.clamp(max=49)
    mask[2] = torch.tensor([1, 1, 1, 1, 0, 0])  # one right-padded row too
    x[2, 4:] = 0
    content_positions = (mask.cumsum(-1) - 1).clamp_min(0)
    with torch.no_grad():  # PEFT's references first: the bridge built next wraps the same base model
        theirs = peft_model(input_ids=x, attention_mask=mask).logits
        theirs_hf_positions = peft_model(input_ids=x, attention_mask=mask, position_ids=content_positions).logits
    bridge = bridge_of(peft_model.get_base_model(), torch.float32)
    prefix = kv_prefix_from_peft(peft_model, bridge)
    real = mask.bool()
    with torch.no_grad():
        ours = pl.run_with_prefix(bridge, x, prefix, attention_mask=mask)
        ours_peft_positions = pl.run_with_prefix(bridge, x, prefix, attention_mask=mask, position_ids=torch.arange(LEN))
    # PEFT takes position_ids counted from the first content token (it adds P), and so do we.
    assert (ours - theirs_hf_positions)[real].abs().max() <= 1e-5
    assert (ours_peft_positions - theirs)[real].abs().max() <= 1e-5


# ---- item 1: decompose, the analysis functions and training -----------------------------------------


@pytest.mark.parametrize("family", ["gpt2", "llama_gqa", "native", "opt"])
def test_decompose_with_a_mask_equals_each_row_alone(family):
    model = any_model(family)
    prefix = pl.KVPrefix.random(model, P, seed=3)
    for side in ("left", "right"):
        x, mask = padded(side)
        d = pl.decompose(model, x, prefix, attention_mask=mask)
        assert d.reconstruction_error() <= tol(family)
        assert float(d.relative_attention_error().max()) <= tol(family)
        for r in range(B):
            real = mask[r].bool()
            a = pl.decompose(model, x[r][real], prefix)
            pairs = [
                (d.prefix_attention[:, r][..., real], a.prefix_attention[:, 0]),
                (d.z[:, r][:, real], a.z[:, 0]),
                (d.content_output[:, r][:, real], a.content_output[:, 0]),
                (d.prefix_bias[:, r][:, real], a.prefix_bias[:, 0]),
                (d.content_pattern[:, r][:, :, real][..., real], a.content_pattern[:, 0]),
                (d.baseline_pattern[:, r][:, :, real][..., real], a.baseline_pattern[:, 0]),
                (d.layer_input_shift[:, r][:, real], a.layer_input_shift[:, 0]),
            ]
            err = max((got - want).abs().max().item() for got, want in pairs)
            assert err <= tol(family), f"{family} {side} row {r}: max |Δ| = {err:.2e}"
        # padded query positions are 0, never NaN
        assert torch.isfinite(d.z).all() and torch.isfinite(d.baseline_pattern).all()


def test_analysis_functions_take_a_mask():
    model = build("llama_gqa", F64)
    prefix = pl.KVPrefix.random(model, P, seed=3)
    x, mask = padded("left")
    check = analysis.check_identities(model, x, prefix, attention_mask=mask, batch_size=2)
    assert check.max_error() <= 1e-10
    rows = [analysis.check_identities(model, x[r][mask[r].bool()], prefix) for r in range(B)]
    n_real = mask.sum(1).double()
    expected = sum(c.mean_prefix_attention * n for c, n in zip(rows, n_real)) / n_real.sum()
    assert torch.allclose(check.mean_prefix_attention.double(), expected, atol=1e-10)
    stats = analysis.slot_statistics(model, x, prefix, positions=-1, attention_mask=mask, batch_size=2)
    for r in range(B):
        one = analysis.slot_statistics(model, x[r][mask[r].bool()], prefix, positions=-1)
        assert torch.allclose(stats.weights[:, :, r], one.weights[:, :, 0], atol=1e-10)
        assert torch.allclose(stats.prefix_mass[:, :, r], one.prefix_mass[:, :, 0], atol=1e-10)
    right, right_mask = padded("right")
    with pytest.raises(ValueError, match="padding in some rows"):
        analysis.slot_statistics(model, right, prefix, positions=-1, attention_mask=right_mask)


def test_training_loss_with_a_mask_equals_rows_alone():
    model = models.toy_llama(d_vocab=tasks.VOCAB, n_ctx=32, n_layers=2, d_model=16, n_heads=2, n_kv_heads=1,
                             init_range=0.3, seed=0, dtype=F64)
    batch = tasks.make_batch("histogram", 3, 4, "train", torch.Generator().manual_seed(0))
    prefix = pl.ResidualPrefix.random(model, 2, seed=1)
    tokens, targets = train._content(batch.tokens, batch.targets, batch.n_pad, prefix)
    mask = torch.ones_like(tokens)
    mask[1, :2] = 0  # row 1: its first two content tokens are padding
    full = torch.cat([torch.ones(3, 2, dtype=torch.long), mask], dim=1)
    with torch.no_grad():
        got = train.batch_loss(model, batch, prefix, attention_mask=mask)
        assert torch.equal(got, train.batch_loss(model, batch, prefix, attention_mask=full))
        total, count = 0.0, 0
        for r in range(3):
            real = mask[r].bool()
            logits = pl.run_with_prefix(model, tokens[r][real], prefix)[0]
            want = targets[r][real]
            keep = want != tasks.IGNORE
            total += torch.nn.functional.cross_entropy(logits[keep], want[keep], reduction="sum")
            count += int(keep.sum())
    assert abs(float(got) - float(total / count)) <= 1e-10
    with torch.no_grad():
        ones = train.batch_loss(model, batch, prefix, attention_mask=torch.ones_like(tokens))
    assert torch.equal(ones, train.batch_loss(model, batch, prefix, share_pads=False))


# ---- item 1 / 12: generation with left padding ---------------------------------------------------------


@pytest.mark.parametrize("family", ["gpt2", "llama_gqa", "native", "opt"])
@pytest.mark.parametrize("use_cache", [True, False], ids=["cached", "recomputed"])
def test_generate_left_padded_equals_each_row_alone(family, use_cache):
    model = any_model(family)
    prompt = random_tokens((P,), seed=1)
    prefix = pl.KVPrefix.from_prompt(model, prompt)
    x, mask = padded("left")
    out = pl.generate(model, x, prefix, max_new_tokens=8, attention_mask=mask, use_cache=use_cache)
    assert out.shape == (B, LEN + 8)
    assert torch.equal(out[:, :LEN], x)
    for r in range(B):
        row = x[r][mask[r].bool()]
        one = pl.generate(model, row, prefix, max_new_tokens=8, use_cache=use_cache)
        assert torch.equal(out[r, LEN:], one[0, row.shape[0]:]), f"{family} row {r}"
        real_prompt = pl.generate(model, torch.cat([prompt, row]), max_new_tokens=8, use_cache=False)
        assert torch.equal(out[r, LEN:], real_prompt[0, P + row.shape[0]:])
    right, right_mask = padded("right")
    with pytest.raises(ValueError, match="pad on the left"):
        pl.generate(model, right, prefix, attention_mask=right_mask)


# ---- item 4 / 12: prefixes do not nest ------------------------------------------------------------------


def test_nested_prefixes_are_refused_and_leave_nothing_behind(family):
    model = build(family)
    p, q = pl.KVPrefix.random(model, 2, seed=1), pl.ResidualPrefix.random(model, 3, seed=2)
    x = random_tokens((2, 4))
    with torch.no_grad():
        expected = pl.run_with_prefix(model, x, q)
        with pl.attached(model, q) as slots:
            hooks = n_attached_hooks(model)
            with pytest.raises(RuntimeError, match="prefixes do not nest"):
                with pl.attached(model, p):
                    pass
            for call in (
                lambda: pl.run_with_prefix(model, x, p),
                lambda: pl.run_with_cache(model, x, p),
                lambda: pl.generate(model, x, p, max_new_tokens=2),
                lambda: pl.generate(model, x, max_new_tokens=2),
                lambda: pl.decompose(model, x, p),
            ):
                with pytest.raises(RuntimeError, match="do not nest"):
                    call()
            assert n_attached_hooks(model) == hooks
            assert (slots.content(model(slots.prepend(x))) - expected).abs().max() <= TOL[torch.float32]
    assert n_attached_hooks(model) == 0
    with torch.no_grad():
        assert torch.equal(pl.run_with_prefix(model, x, p), pl.run_with_prefix(model, x, p))


def test_transformer_lens_cached_generate_inside_attached_is_refused():
    model = build("llama_gqa")
    prefix = pl.KVPrefix.random(model, 2, seed=1)
    x = random_tokens((1, 4))
    with pl.attached(model, prefix) as slots:
        with pytest.raises(RuntimeError, match="key/value cache inside `prefixlens.attached`"):
            model.generate(slots.prepend(x), max_new_tokens=3, do_sample=False, stop_at_eos=False, verbose=False,
                           use_past_kv_cache=True)
        # recomputing every step is the documented way, and is right
        theirs = model.generate(slots.prepend(x), max_new_tokens=3, do_sample=False, stop_at_eos=False,
                                verbose=False, use_past_kv_cache=False)
    assert torch.equal(slots.content(theirs), pl.generate(model, x, prefix, max_new_tokens=3))
    assert n_attached_hooks(model) == 0
    assert not [h for h in model._forward_pre_hooks.values()]


# ---- item 13: return types and position_ids ----------------------------------------------------------------


@pytest.mark.parametrize("family", ["gpt2", "llama_gqa", "native"])
def test_return_types_match_the_model_on_a_real_prompt(family):
    model = build(family, F64)
    prompt, x = random_tokens((P,), seed=1), random_tokens((2, 6), seed=2)
    prefix = pl.SoftPrompt.from_prompt(model, prompt)
    full = torch.cat([prompt.expand(2, -1), x], dim=1)
    with torch.no_grad():
        own = model(full, return_type="loss", loss_per_token=True)[:, P:]  # content token t predicting t + 1
        loss = pl.run_with_prefix(model, x, prefix, return_type="loss")
        per_token = pl.run_with_prefix(model, x, prefix, return_type="loss", loss_per_token=True)
        logits, both = pl.run_with_prefix(model, x, prefix, return_type="both")
        none = pl.run_with_prefix(model, x, prefix, return_type=None)
        cached_loss, _ = pl.run_with_cache(model, x, prefix, return_type="loss")
    assert per_token.shape == (2, 5) and (per_token - own).abs().max() <= TOL[F64]
    assert abs(float(loss) - float(own.mean())) <= TOL[F64]
    assert float(both) == float(loss) and float(cached_loss) == float(loss)
    assert (logits - model(full)[:, P:]).abs().max() <= TOL[F64]
    assert none is None
    # with padding: the loss covers real next-token pairs only, each as in its row alone
    x_pad, mask = padded("left")
    with torch.no_grad():
        padded_loss = pl.run_with_prefix(model, x_pad, prefix, attention_mask=mask, return_type="loss",
                                         loss_per_token=True)
        for r in range(B):
            real = mask[r].bool()
            one = pl.run_with_prefix(model, x_pad[r][real], prefix, return_type="loss", loss_per_token=True)[0]
            assert (padded_loss[r][real[:-1] & real[1:]] - one).abs().max() <= TOL[F64]
    for bad in ("predictions", "logits_and_cache", "str"):
        with pytest.raises(ValueError, match="return_type"):
            pl.run_with_prefix(model, x, prefix, return_type=bad)


@pytest.mark.parametrize("family", ["gpt2", "llama_gqa", "native"])
def test_position_ids_match_a_real_prompt(family):
    model = build(family, F64)
    prompt, x = random_tokens((P,), seed=1), random_tokens((2, 5), seed=2)
    prefix = pl.KVPrefix.from_prompt(model, prompt)
    content = torch.tensor([[0, 1, 2, 3, 4], [2, 3, 4, 5, 6]])  # counted from the first content token
    full = torch.cat([torch.arange(P).expand(2, P), content + P], dim=1)
    with torch.no_grad():
        expected = model(torch.cat([prompt.expand(2, -1), x], dim=1), position_ids=full)[:, P:]
        for pos in (content, full):
            got = pl.run_with_prefix(model, x, prefix, position_ids=pos)
            assert (got - expected).abs().max() <= TOL[F64]
        assert torch.equal(pl.run_with_prefix(model, x, prefix, position_ids=torch.arange(5)),
                           pl.run_with_prefix(model, x, prefix))
    with pytest.raises(ValueError, match="position_ids"):
        pl.run_with_prefix(model, x, prefix, position_ids=torch.zeros(2, 4, dtype=torch.long))


# ---- item 9: sampling ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["gpt2", "native"])
def test_batch_size_never_changes_sampled_tokens(family):
    model = build(family)
    prefix = pl.SoftPrompt.from_prompt(model, random_tokens((5, 2), seed=6))
    x = random_tokens((5, 3), seed=7)
    kwargs = dict(max_new_tokens=6, do_sample=True, temperature=1.5, seed=11)
    whole = pl.generate(model, x, prefix, **kwargs)
    for batch_size in (1, 2, 3, 5, 8):
        assert torch.equal(pl.generate(model, x, prefix, batch_size=batch_size, **kwargs), whole)
    assert torch.equal(pl.generate(model, x, prefix, use_cache=False, batch_size=2, **kwargs), whole)
    assert not torch.equal(pl.generate(model, x, prefix, **{**kwargs, "seed": 12}), whole)


def test_seed_none_draws_fresh_randomness_from_the_global_rng():
    model = build("gpt2")
    x = random_tokens((4, 3), seed=7)
    kwargs = dict(max_new_tokens=12, do_sample=True, temperature=2.0)
    a, b = pl.generate(model, x, **kwargs), pl.generate(model, x, **kwargs)
    assert not torch.equal(a, b), "seed=None must not mean a fixed seed"
    torch.manual_seed(5)
    c = pl.generate(model, x, **kwargs)
    torch.manual_seed(5)
    assert torch.equal(pl.generate(model, x, **kwargs), c), "reproducible under torch.manual_seed"
    assert not torch.equal(pl.generate(model, x, seed=0, **kwargs), pl.generate(model, x, seed=1, **kwargs))


# ---- item 12: EOS with chunks ------------------------------------------------------------------------------


@pytest.mark.parametrize("use_cache", [True, False], ids=["cached", "recomputed"])
def test_eos_with_chunks_that_finish_at_different_steps(use_cache):
    model = build("gpt2")
    x = random_tokens((4, 3), seed=8)
    free = pl.generate(model, x, max_new_tokens=8)
    new = free[:, 3:]
    # an EOS that row 0 emits early and some other row never emits, so chunks finish at different steps
    eos = next(int(t) for t in new[0, :3] if any(int(t) not in new[r].tolist() for r in range(1, 4)))
    whole = pl.generate(model, x, max_new_tokens=8, eos_token_id=eos, use_cache=use_cache)
    assert whole.shape == (4, 11)
    for batch_size in (1, 2, 3):
        chunked = pl.generate(model, x, max_new_tokens=8, eos_token_id=eos, batch_size=batch_size,
                              use_cache=use_cache)
        assert torch.equal(chunked, whole)
    for r in range(4):
        row = whole[r, 3:]
        hits = (row == eos).nonzero()
        if len(hits):
            assert (row[int(hits[0]):] == eos).all()
            assert torch.equal(row[: int(hits[0])], new[r, : int(hits[0])])
        else:
            assert torch.equal(row, new[r])


# ---- item 17: argument checks ------------------------------------------------------------------------------


@pytest.mark.wrong_types_on_purpose  # a float where top_k: int | None is annotated
def test_a_fractional_top_k_is_refused():
    with pytest.raises(ValueError, match="top_k"):
        pl.generate(build("gpt2"), random_tokens((2, 3)), max_new_tokens=2, do_sample=True, top_k=2.5)


def test_sampling_and_batch_arguments_are_checked():
    model = build("gpt2")
    x = random_tokens((2, 3))
    for kwargs, name in [
        (dict(top_k=0), "top_k"), (dict(top_k=-3), "top_k"),
        (dict(top_p=0.0), "top_p"), (dict(top_p=1.5), "top_p"), (dict(top_p=-0.2), "top_p"),
        (dict(batch_size=0), "batch_size"), (dict(batch_size=-1), "batch_size"),
        (dict(temperature=0.0), "temperature"),
    ]:
        with pytest.raises(ValueError, match=name):
            pl.generate(model, x, max_new_tokens=2, do_sample=True, **kwargs)
    logits = torch.tensor([[0.0, 1.0, 5.0, 2.0]])
    with pytest.raises(ValueError, match="top_k"):
        sample_next(logits, do_sample=True, top_k=0)
    with pytest.raises(ValueError, match="top_p"):
        sample_next(logits, do_sample=True, top_p=0)
    g = torch.Generator().manual_seed(0)
    assert int(sample_next(logits, do_sample=True, top_p=1.0, top_k=1, generator=g)) == 2
