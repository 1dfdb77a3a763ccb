"""prefixlens: virtual prefixes, soft prompts and prefix-tuning, studied mechanistically on TransformerLens.

``import prefixlens as pl`` is cheap: the names below are imported on first use (PEP 562), so the
``prefixlens`` command's ``--help`` and scripts that need one module do not pay for torch,
TransformerLens and CircuitsVis up front. ``pl.decompose``, ``pl.models`` and the rest behave exactly
as if they had been imported eagerly.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

#: public name -> the module that defines it (imported on first access)
_DEFINED_IN = {
    "HeadDecomposition": "prefixlens.decomposition",
    "decompose": "prefixlens.decomposition",
    "generate": "prefixlens.generation",
    "Slots": "prefixlens.injection",
    "attached": "prefixlens.injection",
    "run_with_cache": "prefixlens.injection",
    "run_with_prefix": "prefixlens.injection",
    "FORMS": "prefixlens.prefixes",
    "KVPrefix": "prefixlens.prefixes",
    "Prefix": "prefixlens.prefixes",
    "ResidualPrefix": "prefixlens.prefixes",
    "SoftPrompt": "prefixlens.prefixes",
    "form_class": "prefixlens.prefixes",
    "ModelSignature": "prefixlens.signature",
    "signature_of": "prefixlens.signature",
    "train_prefix": "prefixlens.training",
}
#: submodules reachable as attributes (``pl.models``, ``pl.report``, ...)
_SUBMODULES = (
    "analysis",
    "capacity",
    "constructions",
    "lexicons",
    "lora",
    "models",
    "report",
    "tasks",
    "text",
    "train",
    "training",
)

__all__ = [
    "FORMS",
    "HeadDecomposition",
    "KVPrefix",
    "ModelSignature",
    "Prefix",
    "ResidualPrefix",
    "Slots",
    "SoftPrompt",
    "analysis",
    "attached",
    "capacity",
    "constructions",
    "decompose",
    "form_class",
    "generate",
    "lexicons",
    "lora",
    "models",
    "report",
    "run_with_cache",
    "run_with_prefix",
    "signature_of",
    "tasks",
    "text",
    "train",
    "train_prefix",
    "training",
]

if TYPE_CHECKING:  # what static tools (IDEs, type checkers, the API reference) see
    from prefixlens import (
        analysis,
        capacity,
        constructions,
        lexicons,
        lora,
        models,
        report,
        tasks,
        text,
        train,
        training,
    )
    from prefixlens.decomposition import HeadDecomposition, decompose
    from prefixlens.generation import generate
    from prefixlens.injection import Slots, attached, run_with_cache, run_with_prefix
    from prefixlens.prefixes import FORMS, KVPrefix, Prefix, ResidualPrefix, SoftPrompt, form_class
    from prefixlens.signature import ModelSignature, signature_of
    from prefixlens.training import train_prefix


def __getattr__(name: str) -> Any:
    if name in _DEFINED_IN:
        value = getattr(importlib.import_module(_DEFINED_IN[name]), name)
    elif name in _SUBMODULES:
        value = importlib.import_module(f"prefixlens.{name}")
    else:
        raise AttributeError(f"module 'prefixlens' has no attribute {name!r}")
    globals()[name] = value  # later accesses skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
