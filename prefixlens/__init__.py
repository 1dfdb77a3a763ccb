"""prefixlens: virtual prefixes, soft prompts and prefix-tuning, studied mechanistically on TransformerLens."""

from prefixlens.decomposition import HeadDecomposition, decompose
from prefixlens.generation import generate
from prefixlens.injection import Slots, attached, run_with_cache, run_with_prefix
from prefixlens.prefixes import FORMS, KVPrefix, Prefix, ResidualPrefix, SoftPrompt, form_class
from prefixlens.signature import ModelSignature, signature_of
from prefixlens.training import train_prefix
from prefixlens import (  # noqa: E402  (report loads CircuitsVis only when writing)
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

__version__ = "0.1.0"

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
