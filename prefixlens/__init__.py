"""prefixlens: virtual prefixes, soft prompts and prefix-tuning, studied mechanistically on TransformerLens."""

from prefixlens.decomposition import HeadDecomposition, decompose
from prefixlens.generation import generate
from prefixlens.injection import Slots, attached, run_with_cache, run_with_prefix
from prefixlens.prefixes import KVPrefix, Prefix, ResidualPrefix, SoftPrompt
from prefixlens.signature import ModelSignature, signature_of
from prefixlens import analysis, capacity, constructions, lora, report, tasks, train  # noqa: E402  (report loads CircuitsVis only when writing)

__version__ = "0.1.0"

__all__ = [
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
    "lora",
    "decompose",
    "generate",
    "report",
    "run_with_cache",
    "run_with_prefix",
    "signature_of",
    "tasks",
    "train",
]
