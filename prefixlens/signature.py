"""What a prefix must know about the model it was made for, and the checks that use it."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass

import torch

__all__ = ["ModelSignature", "signature_of"]


@dataclass(frozen=True)
class ModelSignature:
    """The shape-defining facts of a model, stored with every prefix.

    ``weight_processing`` is ``"raw"`` or ``"compatibility"`` (``enable_compatibility_mode()`` folds
    norms and value biases, which shifts the values a prefix must carry).
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

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "ModelSignature":
        return cls(**json.loads(text))

    def mismatches(self, other: "ModelSignature") -> list[str]:
        """Human-readable differences, ``field: ours vs theirs``; empty when compatible."""
        return [
            f"{f.name}={getattr(self, f.name)!r} (prefix) vs {getattr(other, f.name)!r} (model)"
            for f in dataclasses.fields(self)
            if f.name not in ("n_ctx", "d_vocab") and getattr(self, f.name) != getattr(other, f.name)
        ]


def signature_of(model) -> ModelSignature:
    """Read a :class:`ModelSignature` off a ``TransformerBridge`` or any model with a TL-style ``cfg``."""
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
    )


def model_dtype_device(model) -> tuple[torch.dtype, torch.device]:
    """The dtype and device of the model's first floating-point parameter."""
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype, p.device
    return getattr(model.cfg, "dtype", torch.float32), torch.device(getattr(model.cfg, "device", "cpu"))
