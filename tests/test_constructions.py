"""The paper §3 constructions as hooked transformers: exactness, limits, and the real-token contrast."""

import pytest
import torch

import prefixlens as pl
from prefixlens import constructions
from prefixlens.decomposition import decompose
from prefixlens.generation import generate

DTYPES = [torch.float32, torch.float64]


def _ids(text):
    return torch.tensor([ord(c) - 32 for c in text])


def _text(ids):
    return "".join(chr(int(i) + 32) for i in ids)


def _no_hooks(model):
    return all(not hp._forward_hooks for hp in model.hook_dict.values())


# ---- Theorem 1 --------------------------------------------------------------------------------


def test_theorem1_reference_demo():
    model, vt = constructions.theorem1(_ids("I love transformers!"), V=94)
    out = generate(model, torch.tensor([[0]]), vt, max_new_tokens=20)
    assert _text(out[0, 1:]) == "I love transformers!"
    assert model.cfg.n_layers == 1 and vt.length == 1 and isinstance(vt, pl.SoftPrompt)
    assert _no_hooks(model)


def test_theorem1_exact_on_1000_random_sequences():
    builder = constructions.Theorem1(N=20, V=94)
    targets = torch.randint(0, 94, (1000, 20), generator=torch.Generator().manual_seed(1))
    out = builder.generate(builder.virtual_token(targets))
    assert torch.equal(out, targets)
    # one model, 1000 virtual tokens, (almost surely) 1000 distinct outputs: far more than V
    assert constructions.count_distinct(out) == constructions.count_distinct(targets) > 94
    b64 = constructions.Theorem1(N=20, V=94, dtype=torch.float64)
    assert torch.equal(_teacher_forced_theorem1(b64, targets), targets)


@pytest.mark.parametrize("dtype", DTYPES)
def test_theorem1_exact_by_design(dtype):
    """No tolerance anywhere: attention exactly one-hot on the slot, z exactly the code, logits integers."""
    builder = constructions.Theorem1(N=12, V=50, dtype=dtype)
    target = torch.randint(0, 50, (12,), generator=torch.Generator().manual_seed(2))
    tokens = torch.cat([torch.tensor([7]), target[:-1]])[None]
    logits, cache = pl.run_with_cache(builder.model, tokens, builder.virtual_token(target))
    pattern = cache["blocks.0.attn.hook_pattern"][0, 0, 1:]  # content rows
    assert torch.equal(pattern[:, 0], torch.ones(12, dtype=dtype))
    assert torch.equal(pattern[:, 1:], torch.zeros_like(pattern[:, 1:]))
    z = cache["blocks.0.hook_resid_post"][0, 1:, builder.model.layout.index("z")]
    assert torch.equal(z, target.to(dtype))
    assert torch.equal(logits, logits.round())
    assert torch.equal(logits[0].argmax(-1), target)


def _teacher_forced_theorem1(builder, targets):
    """Greedy generation reproduces ``targets`` iff every teacher-forced argmax does (induction)."""
    tokens = torch.cat([torch.zeros(targets.shape[0], 1, dtype=torch.long), targets[:, :-1]], dim=1)
    logits = pl.run_with_prefix(builder.model, tokens, builder.virtual_token(targets))
    return logits.argmax(-1)


def test_theorem1_float32_limit_V():
    """Largest V in float32: 4097 (every code decodes); at 4098 code 4097 decodes as 4096."""
    V = constructions.decoder_limit(torch.float32)
    assert V == 4097
    N = 256
    builder = constructions.Theorem1(N=N, V=V)
    codes = torch.randperm(V, generator=torch.Generator().manual_seed(3))
    rows = -(-V // N)
    targets = torch.cat([codes, codes[: rows * N - V]]).reshape(rows, N)  # every code at least once
    assert torch.equal(_teacher_forced_theorem1(builder, targets), targets)

    with pytest.raises(ValueError, match="exact-decoder limit"):
        constructions.Theorem1(N=4, V=V + 1)
    over = constructions.Theorem1(N=4, V=V + 1, strict=False)
    bad = torch.tensor([[4097, 4096, 5, 4097]])
    assert _teacher_forced_theorem1(over, bad).tolist() == [[4096, 4096, 5, 4096]]
    # float64 has room: the same code decodes exactly there
    assert torch.equal(_teacher_forced_theorem1(constructions.Theorem1(N=4, V=V + 1, dtype=torch.float64), bad), bad)


@pytest.mark.slow
def test_theorem1_long_sequence_generation():
    """N is not limited by precision (attention stays exactly one-hot): N = 200 by real generation."""
    builder = constructions.Theorem1(N=200, V=94)
    targets = torch.randint(0, 94, (4, 200), generator=torch.Generator().manual_seed(4))
    assert torch.equal(builder.generate(builder.virtual_token(targets)), targets)


@pytest.mark.slow
def test_theorem1_float32_limit_large_N_and_V():
    builder = constructions.Theorem1(N=2048, V=4097)
    targets = torch.randint(0, 4097, (2, 2048), generator=torch.Generator().manual_seed(5))
    assert torch.equal(_teacher_forced_theorem1(builder, targets), targets)


def test_theorem1_real_first_token_gives_at_most_V_outputs():
    builder = constructions.Theorem1(N=20, V=94)
    real = builder.real_token_outputs()
    assert real.shape == (94, 20)
    assert constructions.count_distinct(real) == 94  # the default table: token t counts up from t
    assert torch.equal(real[5, :3], torch.tensor([5, 6, 7]))
    zero = constructions.Theorem1(N=20, V=94, token_table=torch.zeros(94, 20, dtype=torch.long))
    assert constructions.count_distinct(zero.real_token_outputs()) == 1


# ---- Theorem 2 --------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
def test_theorem2_exact_on_every_input_for_random_maps(dtype):
    builder = constructions.Theorem2(V=94, dtype=dtype)
    maps = torch.randint(0, 94, (20, 94), generator=torch.Generator().manual_seed(6))
    assert torch.equal(builder.apply(builder.virtual_token(maps)), maps)


def test_theorem2_case_flip_dict_and_real_tokens():
    flip = {ord(c) - 32: ord(c.swapcase()) - 32 for c in "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"}
    model, vt = constructions.theorem2(flip, V=94)
    assert _text(generate(model, _ids("f")[None], vt, 1)[0, 1:]) == "F"
    builder = constructions.Theorem2(V=94)
    outputs = builder.apply(builder.virtual_token(flip))[0]
    expected = torch.tensor([flip.get(u, 0) for u in range(94)])
    assert torch.equal(outputs, expected)
    real = builder.real_token_outputs()
    assert constructions.count_distinct(real) == 94
    assert torch.equal(real[3], (torch.arange(94) + 3) % 94)


# ---- extensions -------------------------------------------------------------------------------


def _teacher_forced_long(builder, maps):
    """Argmax at every response position with the true response fed back (= greedy, by induction)."""
    n_maps, V, N0 = maps.shape
    tokens = torch.cat([torch.arange(V).repeat(n_maps)[:, None], maps.reshape(-1, N0)[:, :-1]], dim=1)
    emb = builder.virtual_tokens(maps).embeddings.detach().repeat_interleave(V, dim=0)
    logits = pl.run_with_prefix(builder.model, tokens, pl.SoftPrompt(emb, pl.signature_of(builder.model)))
    return logits.argmax(-1).reshape(n_maps, V, N0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_long_response_exact_for_random_maps(dtype):
    builder = constructions.LongResponse(V=94, N0=10, dtype=dtype)
    maps = torch.randint(0, 94, (10, 94, 10), generator=torch.Generator().manual_seed(7))
    assert torch.equal(_teacher_forced_long(builder, maps), maps)
    prefix = builder.virtual_tokens(maps[:2])
    assert prefix.length == 10
    assert torch.equal(builder.respond(prefix), maps[:2])  # real greedy generation


def test_long_response_reference_demo():
    words = {"b": "lueberries", "A": "lligator", "X": "ray tetra"}
    mapping = {ord(k) - 32: _ids(v.ljust(10)) for k, v in words.items()}
    model, prefix = constructions.long_response(mapping, V=94, N0=10)
    out = generate(model, _ids("b")[None], prefix, 10)
    assert _text(out[0]) == "blueberries"


def test_reference_two_token_map_matches_the_notebook():
    m = constructions.reference_two_token_map(0)
    shown = {"AB": "A", "AA": "F", "BA": "H", "DE": "D", "BB": "G", "BG": "H"}
    for key, value in shown.items():
        assert chr(int(m[ord(key[0]) - 65, ord(key[1]) - 65]) + 65) == value


@pytest.mark.parametrize("K", [None, 1, 3])
def test_two_token_exact_for_reference_seeds_and_random_maps(K):
    builder = constructions.TwoTokenInput(V=10, digits_per_coordinate=K)
    reference = torch.stack([constructions.reference_two_token_map(s) for s in range(10)])  # seeds 2, 3, 9 included
    random = torch.randint(0, 10, (10, 10, 10), generator=torch.Generator().manual_seed(8))
    # rows ending in zeros broke the reference's float unpacking; add the worst cases explicitly
    edge = torch.stack([torch.zeros(10, 10, dtype=torch.long), torch.full((10, 10), 9), torch.eye(10, dtype=torch.long)])
    maps = torch.cat([reference, random, edge])
    assert torch.equal(builder.apply(builder.virtual_token(maps)), maps)
    assert builder.model.cfg.n_layers == builder.K + 1


def test_two_token_packing_and_float64():
    b32 = constructions.TwoTokenInput(V=10)
    assert b32.K == 6 and b32.C == 2  # float32 holds 6 base-10 digits exactly (with headroom)
    b64 = constructions.TwoTokenInput(V=10, dtype=torch.float64)
    assert b64.K == 10 and b64.C == 1  # one number per row, as in the reference, exact in float64
    maps = torch.stack([constructions.reference_two_token_map(s) for s in (2, 3, 9)])
    assert torch.equal(b64.apply(b64.virtual_token(maps)), maps)
    with pytest.raises(ValueError, match="digits_per_coordinate"):
        constructions.TwoTokenInput(V=10, digits_per_coordinate=7)


def test_two_token_unpacking_is_done_by_the_network():
    """The digits of row u0 appear in the residual stream (exactly), computed by the MLP blocks."""
    builder = constructions.TwoTokenInput(V=10, digits_per_coordinate=3)
    m = constructions.reference_two_token_map(3)
    prefix = builder.virtual_token(m)
    _, cache = pl.run_with_cache(builder.model, torch.tensor([[4, 7]]), prefix)
    resid = cache[f"blocks.{builder.K - 1}.hook_resid_post"][0, -1]
    digits = []
    for c, cols in enumerate(builder.chunks):
        for b in range(len(cols)):
            column = torch.zeros(builder.model.cfg.d_model, dtype=torch.float32)
            builder._write_digit(column, c, b)
            digits.append(resid @ column)
    assert torch.equal(torch.stack(digits), m[4].float())
    assert cache["blocks.1.hook_attn_out"].abs().max() == 0  # unpacking blocks use their MLP only


def test_two_token_real_first_token_contrast():
    builder = constructions.TwoTokenInput(V=6)
    real = builder.real_token_outputs()
    assert real.shape == (6, 6, 6)
    assert constructions.count_distinct(real) <= 6
    maps = torch.randint(0, 6, (50, 6, 6), generator=torch.Generator().manual_seed(9))
    assert constructions.count_distinct(builder.apply(builder.virtual_token(maps))) == constructions.count_distinct(maps) > 6


# ---- the library works on them unchanged ------------------------------------------------------


def test_library_functions_on_a_construction():
    builder = constructions.Theorem2(V=12)
    mapping = torch.randint(0, 12, (12,), generator=torch.Generator().manual_seed(10))
    vt = builder.virtual_token(mapping)
    tokens = torch.arange(12)[:, None]
    logits = pl.run_with_prefix(builder.model, tokens, vt)
    assert torch.equal(logits[:, 0].argmax(-1), mapping)
    for other in (vt.to_kv(builder.model),):
        assert torch.equal(pl.run_with_prefix(builder.model, tokens, other), logits)
    d = decompose(builder.model, tokens, vt)
    assert d.reconstruction_error() == 0.0
    assert torch.equal(d.prefix_attention, torch.ones_like(d.prefix_attention))
    names = set(builder.model.hook_dict)
    for name in ("hook_embed", "blocks.0.hook_resid_pre", "blocks.0.attn.hook_k", "blocks.0.attn.hook_v",
                 "blocks.0.attn.hook_attn_scores", "blocks.0.attn.hook_pattern", "blocks.0.attn.hook_z"):
        assert name in names
    _, cache = pl.run_with_cache(builder.model, tokens[:2], vt)
    assert cache["blocks.0.attn.hook_q"].shape == (2, 2, 1, builder.model.cfg.d_head)
    assert cache["blocks.0.attn.hook_attn_scores"][0, 0, 0, 1] == float("-inf")  # causal, pre-softmax
    assert _no_hooks(builder.model)


def test_no_hooks_left_after_an_error():
    builder = constructions.Theorem2(V=5)
    vt = builder.virtual_token(torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError):
        pl.run_with_prefix(builder.model, torch.tensor([[1, 2, 3]]), vt)  # longer than n_ctx
    assert _no_hooks(builder.model)


def test_bad_inputs():
    builder = constructions.Theorem1(N=5, V=10)
    with pytest.raises(ValueError, match="ids in"):
        builder.virtual_token(torch.tensor([1, 2, 3, 4, 10]))
    with pytest.raises(ValueError, match="shape"):
        builder.virtual_token(torch.tensor([1, 2, 3]))
    with pytest.raises(TypeError, match="integer"):
        builder.virtual_token(torch.tensor([1.0, 2, 3, 4, 5]))
    with pytest.raises(TypeError, match="float32 or float64"):
        constructions.Theorem2(V=5, dtype=torch.float16)
    with pytest.raises(ValueError):
        constructions.LongResponse(V=5, N0=0)
    other = constructions.Theorem1(N=6, V=10)
    with pytest.raises(ValueError, match="different model"):
        pl.run_with_prefix(other.model, torch.tensor([[0]]), builder.virtual_token(torch.arange(5)))


def test_reports_render_a_construction(tmp_path):
    from prefixlens import report

    builder = constructions.Theorem2(V=8)
    vt = builder.virtual_token(torch.randint(0, 8, (8,), generator=torch.Generator().manual_seed(11)))
    tokens = torch.arange(8)[:, None]
    d = decompose(builder.model, tokens, vt)
    figures = [report.attention_figure(builder.model, tokens, vt, decomposition=d),
               report.prefix_mass_figure(d, tokens, builder.model), report.summary_figure({"theorem2": d})]
    path = report.html(tmp_path / "theorem2.html", figures, title="Theorem 2")
    assert path.stat().st_size > 0 and "Theorem 2" in path.read_text()
    assert _no_hooks(builder.model)
