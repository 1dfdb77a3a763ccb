"""What a prefix must know about the model it was made for, and the checks that use it."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass

import torch

__all__ = [
    "ModelSignature", "signature_of", "weights_fingerprint", "weights_fingerprints", "module_roots", "model_dtype_device",
    "CONVERSION_DTYPES",
]

# The dtypes a model is commonly converted to; a signature records its weights' fingerprint as converted
# to each, so a prefix made on float32 weights loads on the same weights in bfloat16 / float16.
CONVERSION_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@dataclass(frozen=True)
class ModelSignature:
    """The shape-defining facts of a model, stored with every prefix.

    ``weight_processing`` is ``"raw"`` or ``"compatibility"`` (``enable_compatibility_mode()`` folds
    norms and value biases, which shifts the values a prefix must carry).

    ``weights`` is the :func:`weights_fingerprint` of the model's weights (``None`` for signatures
    read from files written before fingerprints existed); ``weights_dtype`` the dtype they were in, and
    ``weights_as`` their fingerprints once converted to each of :data:`CONVERSION_DTYPES` (``(dtype,
    fingerprint)`` pairs; ``None`` in files written before). :meth:`mismatches` compares the shapes
    only; :meth:`weights_mismatch` compares the fingerprints (checked on ``Prefix.load`` and when a
    training run resumes, not on every forward pass: in memory, running a prefix on other weights
    is a legitimate experiment, e.g. transfer to a fine-tuned model), and accepts the same weights
    converted to another dtype (float32 weights and their bfloat16 copy).
    """

    architecture: str
    n_layers: int
    n_heads: int
    n_kv_heads: int
    d_head: int
    d_model: int
    d_vocab: int
    n_ctx: int
    positional: str
    weight_processing: str = "raw"
    weights: str | None = None
    weights_dtype: str | None = None
    weights_as: tuple[tuple[str, str], ...] | None = None

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "ModelSignature":
        """Parse :meth:`to_json`'s output; a clear ``ValueError`` for malformed text or fields."""
        try:
            data = json.loads(text)
        except (TypeError, json.JSONDecodeError) as e:
            raise ValueError(f"the signature is not valid JSON ({e}).") from None
        if not isinstance(data, dict):
            raise ValueError(f"the signature must be a JSON object, got {type(data).__name__}.")
        names = {f.name for f in dataclasses.fields(cls)}
        required = {f.name for f in dataclasses.fields(cls) if f.default is dataclasses.MISSING}
        missing, extra = sorted(required - set(data)), sorted(set(data) - names)
        if missing or extra:
            raise ValueError(f"the signature has missing fields {missing} / unknown fields {extra}.")
        if data.get("weights_as") is not None:
            try:
                data["weights_as"] = tuple((str(d), str(f)) for d, f in data["weights_as"])
            except (TypeError, ValueError):
                raise ValueError(f"the signature's weights_as must be [dtype, fingerprint] pairs, got {data['weights_as']!r:.80}.") from None
        return cls(**data)

    def mismatches(self, other: "ModelSignature") -> list[str]:
        """Human-readable differences, ``field: ours vs theirs``; empty when compatible."""
        return [
            f"{f.name}={getattr(self, f.name)!r} (prefix) vs {getattr(other, f.name)!r} (model)"
            for f in dataclasses.fields(self)
            if f.name not in ("n_ctx", "d_vocab", "weights", "weights_dtype", "weights_as")
            and getattr(self, f.name) != getattr(other, f.name)
        ]

    def same_weights(self, other: "ModelSignature") -> bool:
        """Whether both fingerprints are known and the weights are the same, possibly converted: equal
        fingerprints, or one side's weights converted to the other's dtype give the other's."""
        if self.weights is None or other.weights is None:
            return False
        if self.weights == other.weights:
            return True
        return any(
            a.weights_dtype is not None and dict(b.weights_as or ()).get(a.weights_dtype) == a.weights
            for a, b in ((self, other), (other, self))
        )

    def weights_mismatch(self, other: "ModelSignature") -> str | None:
        """``None`` when both fingerprints are known and equal, else what differs (``self`` is the
        prefix / file side, ``other`` the model)."""
        if self.same_weights(other):
            return None
        def show(fp: str | None, side: str) -> str:
            return fp if fp is not None else f"none ({side} weights not fingerprinted: an old file, or a meta-device model)"

        out = f"weights fingerprint {show(self.weights, 'prefix')} (prefix) vs {show(other.weights, 'model')} (model)"
        if self.weights_dtype and other.weights_dtype and self.weights_dtype != other.weights_dtype:
            out += (
                f"; the prefix was made on {self.weights_dtype} weights and the model is {other.weights_dtype}, and "
                f"the model's weights are not the prefix's converted to {other.weights_dtype} (nor the reverse)"
            )
        return out


def signature_of(model, weights: bool = True) -> ModelSignature:
    """Read a :class:`ModelSignature` off a ``TransformerBridge`` or any model with a TL-style ``cfg``.

    ``weights=False`` skips the fingerprint (``weights=None``): the shape-only signature that the
    checks on every forward pass use.
    """
    cfg = model.cfg
    n_heads = int(cfg.n_heads)
    return ModelSignature(
        architecture=str(getattr(cfg, "architecture", None) or type(model).__name__),
        n_layers=int(cfg.n_layers),
        n_heads=n_heads,
        n_kv_heads=int(getattr(cfg, "n_key_value_heads", None) or n_heads),
        d_head=int(cfg.d_head),
        d_model=int(cfg.d_model),
        d_vocab=int(cfg.d_vocab),
        n_ctx=int(cfg.n_ctx),
        positional=str(getattr(cfg, "positional_embedding_type", "standard")),
        weight_processing="compatibility" if getattr(model, "compatibility_mode", False) else "raw",
        **(_weights_fields(model) if weights else {}),
    )


def _weights_fields(model) -> dict:
    prints = weights_fingerprints(model)
    if prints is None:
        return {"weights": None}
    exact = prints.pop(None)
    return {"weights": exact, "weights_dtype": str(model_dtype_device(model)[0]).removeprefix("torch."),
            "weights_as": tuple(sorted(prints.items()))}


_KNUTH = 2654435761  # spreads the sampled column (row) of consecutive rows (columns)


def _sample(t: torch.Tensor) -> torch.Tensor:
    """One element of every row and one of every column of ``t`` seen as ``[shape[0], -1]``
    (all of it when that is no more); 1-D tensors whole. Indexes ``t`` in place (no copy of a
    non-contiguous tensor)."""
    if t.ndim <= 1:
        return t.reshape(-1)
    R = t.shape[0]
    C = t[0].numel()
    if R * C <= R + C:
        return t.reshape(-1)
    rows = torch.arange(R, device=t.device)
    cols = torch.arange(C, device=t.device)
    # torch.take indexes the logical row-major order without copying a non-contiguous tensor (and,
    # unlike t[rows, cols] on torch 2.13's CPU, without a multi-threading slowdown of ~100x)
    flat = torch.cat([rows * C + (rows * _KNUTH) % C, ((cols * _KNUTH) % R) * C + cols])
    return torch.take(t, flat)


def weights_fingerprint(model) -> str | None:
    """A 16-hex-digit fingerprint of the model's weights: sha256 over the name and shape of every
    floating-point tensor of ``model.state_dict()`` and the exact float64 values of one element of
    each of its rows and each of its columns (1-D tensors: every element).

    Cheap (``O(rows + columns)`` per tensor, never a pass over the weights: a few ms on the toy
    models) and recomputed on every call, so weights changed in place (training, ``.data``
    edits) never give a stale fingerprint. It changes with any training, fine-tuning, merged
    adapter or edit of a whole row or column (a token's embedding, a neuron), with compatibility
    mode (folded weights) and with attached LoRA adapters; an edit of isolated single elements can
    go unnoticed. The dtype enters only through the values: a float32 model and its float64 copy
    (exact) share a fingerprint, a float32 checkpoint rounded to bfloat16 does not. The device
    does not enter. ``None`` for a model whose weights are not materialised (meta device).
    (:func:`weights_fingerprints` adds the fingerprints of the weights converted to other dtypes.)
    """
    prints = weights_fingerprints(model, ())
    return None if prints is None else prints[None]


def weights_fingerprints(model, dtypes=CONVERSION_DTYPES) -> dict | None:
    """``{None: weights_fingerprint(model), "bfloat16": ..., ...}``: the fingerprint of the weights as
    they are and as converted to each of ``dtypes`` (every floating-point tensor cast, as
    ``model.to(dtype)`` does: the fingerprint a copy converted to that dtype has), in one pass over
    the sampled elements. ``None`` for a model on the meta device."""
    hashes = {None: hashlib.sha256(), **{str(d).removeprefix("torch."): hashlib.sha256() for d in dtypes}}
    casts = {None: None, **{str(d).removeprefix("torch."): d for d in dtypes}}
    with torch.no_grad():
        for name, t in sorted(model.state_dict().items()):
            if not torch.is_tensor(t) or not t.is_floating_point():
                continue
            if t.is_meta:
                return None
            sample = _sample(t.detach()).to("cpu")
            for key, h in hashes.items():
                x = sample if casts[key] is None else sample.to(casts[key])
                h.update(f"{name}:{tuple(t.shape)};".encode())
                h.update(x.to(torch.float64).contiguous().numpy().tobytes())
    return {k: h.hexdigest()[:16] for k, h in hashes.items()}


def module_roots(model) -> list[torch.nn.Module]:
    """``model`` and, for a ``TransformerBridge``, its HF ``original_model``, which the bridge keeps
    outside its registered module tree (so ``model.modules()`` / ``.parameters()`` miss its own)."""
    original = model.__dict__.get("original_model", getattr(model, "original_model", None))
    return [model] + ([original] if isinstance(original, torch.nn.Module) else [])


def model_dtype_device(model) -> tuple[torch.dtype, torch.device]:
    """The dtype and device of the model's first floating-point parameter."""
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype, p.device
    return getattr(model.cfg, "dtype", torch.float32), torch.device(getattr(model.cfg, "device", "cpu"))
