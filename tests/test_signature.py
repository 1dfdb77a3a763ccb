"""Issue 14, items 3, 11 and 15: the weights fingerprint, and what Prefix.load refuses (by name)."""

import hashlib
import json
import warnings

import pytest
import torch
from safetensors.torch import save_file

import prefixlens as pl
from prefixlens import models
from prefixlens.serialization import CorruptFileError, load_tensors
from prefixlens.signature import _sample, weights_fingerprint
from tests.conftest import build

_TINY = dict(n_layers=2, d_model=32, n_heads=4, d_vocab=61, n_ctx=64)


def _independent_fingerprint(model) -> str:
    """The documented definition, written out on plain Python lists (no torch indexing)."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        if not t.is_floating_point():
            continue
        h.update(f"{name}:{tuple(t.shape)};".encode())
        flat = t.detach().double().contiguous().reshape(-1).tolist()
        if t.ndim <= 1 or t.shape[0] * (t.numel() // t.shape[0]) <= t.shape[0] + t.numel() // t.shape[0]:
            values = flat
        else:
            R, C = t.shape[0], t.numel() // t.shape[0]
            values = [flat[r * C + (r * 2654435761) % C] for r in range(R)]
            values += [flat[((c * 2654435761) % R) * C + c] for c in range(C)]
        h.update(torch.tensor(values, dtype=torch.float64).numpy().tobytes())
    return h.hexdigest()[:16]


def test_fingerprint_matches_its_definition_and_is_deterministic(family):
    model = build(family)
    fp = weights_fingerprint(model)
    assert fp == _independent_fingerprint(model) == weights_fingerprint(model)
    assert len(fp) == 16 and pl.signature_of(model).weights == fp
    assert pl.signature_of(model, weights=False).weights is None


def test_sample_covers_every_row_and_column_without_copying():
    for t in (torch.randn(7, 5, 3), torch.randn(11, 13).t(), torch.randn(4, 5, 6).permute(2, 0, 1)):
        m = t.contiguous().reshape(t.shape[0], -1)
        R, C = m.shape
        rows, cols = torch.arange(R), torch.arange(C)
        expected = torch.cat([m[rows, (rows * 2654435761) % C], m[(cols * 2654435761) % R, cols]])
        assert torch.equal(_sample(t), expected)
    assert torch.equal(_sample(torch.arange(5.0)), torch.arange(5.0))


def _param(model, *parts):
    """The one parameter of ``model`` whose name contains every one of ``parts``."""
    (p,) = [p for n, p in model.named_parameters() if all(x in n for x in parts)]
    return p


def test_fingerprint_tells_weights_apart_and_is_never_stale():
    a = models.toy_gpt2(**_TINY, seed=1)
    assert weights_fingerprint(a) != weights_fingerprint(models.toy_gpt2(**_TINY, seed=2))
    # the dtype enters only through the values: an exact float64 copy shares the fingerprint
    assert weights_fingerprint(models.toy_gpt2(**_TINY, seed=1, dtype=torch.float64)) == weights_fingerprint(a)
    assert weights_fingerprint(models.toy_gpt2(**_TINY, seed=1, dtype=torch.bfloat16)) != weights_fingerprint(a)
    before = weights_fingerprint(a)
    with torch.no_grad():
        wte = _param(a, "wte").data
        wte[[3, 10]] = wte[[10, 3]]  # two token embeddings swapped through .data (no version bump)
    after = weights_fingerprint(a)
    assert after != before
    with torch.no_grad():
        _param(a, "h.1.", "c_proj", "weight", "mlp")[5] += 1e-7  # one MLP neuron's output weights
    assert weights_fingerprint(a) not in (before, after)


def test_fingerprint_of_a_meta_model_is_none():
    assert weights_fingerprint(models.toy_gpt2(**_TINY).to("meta")) is None


# ---- item 3: a prefix file made on other weights is refused ------------------------------------------
def test_load_refuses_other_weights_of_the_same_architecture(tmp_path):
    a, b = models.toy_gpt2(**_TINY, seed=1), models.toy_gpt2(**_TINY, seed=2)
    path = tmp_path / "p.safetensors"
    prefix = pl.KVPrefix.random(a, 2)
    prefix.save(path)
    fa, fb = weights_fingerprint(a), weights_fingerprint(b)
    with pytest.raises(ValueError, match=f"p.safetensors holds a KVPrefix made for other weights.*{fa} \\(prefix\\) vs {fb} \\(model\\).*allow_other_weights=True"):
        pl.Prefix.load(path, b)
    other = pl.Prefix.load(path, b, allow_other_weights=True)
    assert torch.equal(other.keys, prefix.keys) and other.signature.weights == fa  # keeps its provenance
    assert pl.Prefix.load(path, a).signature == prefix.signature
    # the same model in float64 (exact copy of the weights) loads it
    a64 = models.toy_gpt2(**_TINY, seed=1, dtype=torch.float64)
    assert pl.Prefix.load(path, a64).keys.dtype == torch.float64
    # weights changed in place after the prefix was made: refused
    with torch.no_grad():
        _param(a, "ln_f", "weight").mul_(1.5)
    with pytest.raises(ValueError, match="made for other weights"):
        pl.Prefix.load(path, a)


@pytest.mark.parametrize("make", [models.toy_gpt2, models.toy_llama], ids=["gpt2", "llama"])
def test_a_prefix_saved_on_float32_loads_on_the_same_weights_in_half_precision_and_back(make, tmp_path):
    """Issue 21 (9): on main the same weights in bfloat16 / float16 were refused as "another checkpoint".
    The signature records the fingerprint of the weights converted to each dtype: the loaded prefix is
    the in-memory conversion, bit for bit, and gives the same outputs; other weights are still refused."""
    import copy

    a = make(**_TINY, seed=1)
    prefix = pl.KVPrefix.random(a, 2)
    prefix.save(tmp_path / "p.safetensors")
    x = torch.tensor([[3, 4, 5, 6]])
    for dtype in (torch.bfloat16, torch.float16):
        for half in (make(**_TINY, seed=1, dtype=dtype), make(**_TINY, seed=1).to(dtype)):
            loaded = pl.Prefix.load(tmp_path / "p.safetensors", half)
            converted = copy.deepcopy(prefix).to(dtype)
            assert loaded.dtype == dtype and torch.equal(loaded.keys, converted.keys)
            assert torch.equal(pl.run_with_prefix(half, x, loaded), pl.run_with_prefix(half, x, converted))
        # the reverse: made on the half-precision weights, loaded on the float32 ones they came from
        pl.KVPrefix.random(half, 2).save(tmp_path / "h.safetensors")
        assert pl.Prefix.load(tmp_path / "h.safetensors", a).dtype == torch.float32
        # another checkpoint in that dtype is refused, and the error names both dtypes
        other = make(**_TINY, seed=2, dtype=dtype)
        with pytest.raises(ValueError, match=f"made for other weights.*made on float32 weights and the model is {str(dtype)[6:]}"):
            pl.Prefix.load(tmp_path / "p.safetensors", other)
    # bfloat16 and float16 copies of one float32 model are not conversions of each other: refused, named
    pl.KVPrefix.random(make(**_TINY, seed=1, dtype=torch.bfloat16), 2).save(tmp_path / "b.safetensors")
    with pytest.raises(ValueError, match="made on bfloat16 weights and the model is float16"):
        pl.Prefix.load(tmp_path / "b.safetensors", make(**_TINY, seed=1, dtype=torch.float16))
    # weights changed after conversion: refused
    edited = make(**_TINY, seed=1, dtype=torch.bfloat16)
    with torch.no_grad():
        next(p for n, p in edited.named_parameters() if p.ndim == 2).mul_(1.5)
    with pytest.raises(ValueError, match="made for other weights"):
        pl.Prefix.load(tmp_path / "p.safetensors", edited)


def test_converted_fingerprints_match_their_definition():
    """``weights_as[dtype]`` is the exact fingerprint of the model converted to that dtype."""
    from prefixlens.signature import CONVERSION_DTYPES

    model = models.toy_llama(**_TINY, seed=1, dtype=torch.float64)
    sig = pl.signature_of(model)
    assert sig.weights_dtype == "float64" and sig.weights == weights_fingerprint(model)
    for dtype in CONVERSION_DTYPES:
        converted = models.toy_llama(**_TINY, seed=1, dtype=torch.float64).to(dtype)
        assert dict(sig.weights_as)[str(dtype)[6:]] == _independent_fingerprint(converted)
    assert pl.ModelSignature.from_json(sig.to_json()) == sig


def test_runtime_validation_checks_shapes_not_weights():
    """In memory a prefix runs on other weights of the same shapes (a transfer experiment); the
    per-call check stays shape-only and never hashes the weights."""
    a, b = models.toy_gpt2(**_TINY, seed=1), models.toy_gpt2(**_TINY, seed=2)
    prefix = pl.SoftPrompt.random(a, 2)
    x = torch.tensor([[3, 4, 5]])
    assert pl.run_with_prefix(b, x, prefix).shape == (1, 3, 61)


def test_old_prefix_files_load_with_a_warning_and_can_be_upgraded(tmp_path):
    model = build("gpt2")
    prefix = pl.ResidualPrefix.random(model, 2)
    sig = json.loads(prefix.signature.to_json())
    del sig["weights"]
    old = tmp_path / "old.safetensors"  # as format 1 wrote it: no fingerprint, no checksum
    save_file({"resid": prefix.resid.detach()}, str(old), metadata={
        "prefixlens_format": "1", "form": "ResidualPrefix", "signature": json.dumps(sig), "key_convention": "hook_k (pre-rotary)"})
    with pytest.warns(UserWarning, match="old.safetensors was written before .*weights fingerprint.*re-save it"):
        loaded = pl.Prefix.load(old, model)
    assert torch.equal(loaded.resid, prefix.resid) and loaded.signature.weights == weights_fingerprint(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pl.Prefix.load(old, model, allow_other_weights=True)
        loaded.save(old)  # upgraded: fingerprint and checksum recorded, no warning any more
        assert pl.Prefix.load(old, model).signature.weights == weights_fingerprint(model)
    with pytest.raises(ValueError, match="made for other weights"):
        pl.Prefix.load(old, models.toy_gpt2(**_TINY, seed=3))


# ---- item 11: a damaged file is refused by name -------------------------------------------------------
def test_a_flipped_data_byte_is_refused(tmp_path):
    model = build("gpt2")
    path = tmp_path / "p.safetensors"
    pl.KVPrefix.random(model, 2).save(path)
    data = bytearray(path.read_bytes())
    data[-7] ^= 0x40  # a byte of the last tensor's data
    path.write_bytes(bytes(data))
    with pytest.raises(CorruptFileError, match="p.safetensors is corrupt: its content does not match the checksum"):
        pl.Prefix.load(path, model)
    with pytest.raises(CorruptFileError, match="is corrupt"):
        load_tensors(path)


def test_edited_metadata_is_refused(tmp_path):
    model = build("gpt2")
    path = tmp_path / "p.safetensors"
    pl.SoftPrompt.random(model, 2).save(path)
    data = path.read_bytes()
    assert data.count(b'"n_layers\\": 2') == 1
    path.write_bytes(data.replace(b'"n_layers\\": 2', b'"n_layers\\": 3'))  # same length, valid JSON
    with pytest.raises(CorruptFileError, match="p.safetensors is corrupt"):
        pl.Prefix.load(path, model)


# ---- item 15: Prefix.load names the file and what is wrong ---------------------------------------------
def _write(path, tensors, **meta):
    save_file(tensors, str(path), metadata=meta)
    return path


@pytest.mark.parametrize("case", ["directory", "not_safetensors", "empty", "truncated", "bad_json", "bad_fields",
                                  "no_signature", "missing_tensor", "extra_tensor", "wrong_shape", "not_a_prefix"])
def test_load_names_the_file_and_the_problem(tmp_path, case):
    model = build("gpt2")
    good = pl.KVPrefix.random(model, 2)
    good.save(tmp_path / "good.safetensors")
    _, meta = load_tensors(tmp_path / "good.safetensors")
    meta.pop("prefixlens_sha256", None)
    k, v = good.keys.detach(), good.values.detach()
    path = tmp_path / f"{case}.safetensors"
    if case == "directory":
        path.mkdir()
        expected = (CorruptFileError, "directory.safetensors is a directory")
    elif case == "not_safetensors":
        path.write_text('{"keys": [1, 2, 3]}')
        expected = (CorruptFileError, "not_safetensors.safetensors is not a readable safetensors file")
    elif case == "empty":
        path.write_bytes(b"")
        expected = (CorruptFileError, "empty.safetensors is not a readable safetensors file")
    elif case == "truncated":
        path.write_bytes((tmp_path / "good.safetensors").read_bytes()[:-100])
        expected = (CorruptFileError, "truncated.safetensors is not a readable safetensors file")
    elif case == "bad_json":
        _write(path, {"keys": k, "values": v}, **{**meta, "signature": "{not json"})
        expected = (ValueError, "bad_json.safetensors has a malformed 'signature'.*not valid JSON")
    elif case == "bad_fields":
        _write(path, {"keys": k, "values": v}, **{**meta, "signature": json.dumps({"architecture": "x"})})
        expected = (ValueError, "bad_fields.safetensors has a malformed 'signature'.*missing fields \\['d_head'")
    elif case == "no_signature":
        _write(path, {"keys": k, "values": v}, form="KVPrefix")
        expected = (ValueError, "no_signature.safetensors has no 'signature' metadata")
    elif case == "missing_tensor":
        _write(path, {"keys": k}, **meta)
        expected = (ValueError, "missing_tensor.safetensors does not hold the tensors of a KVPrefix.*missing \\['values'\\]")
    elif case == "extra_tensor":
        _write(path, {"keys": k, "values": v, "bias": k[0].clone()}, **meta)
        expected = (ValueError, "extra_tensor.safetensors does not hold the tensors of a KVPrefix.*unexpected \\['bias'\\]")
    elif case == "wrong_shape":
        _write(path, {"keys": k[:1], "values": v[:1]}, **meta)
        expected = (ValueError, "wrong_shape.safetensors holds tensors that do not form a valid KVPrefix")
    else:
        _write(path, {"w": k}, foo="bar")
        expected = (ValueError, "not_a_prefix.safetensors is not a prefixlens prefix file")
    with pytest.raises(expected[0], match=expected[1]):
        pl.Prefix.load(path, model)
    with pytest.raises(FileNotFoundError, match="missing.safetensors"):
        pl.Prefix.load(tmp_path / "missing.safetensors", model)
