"""Paper §3 constructions as real hooked transformers (see :mod:`prefixlens.constructions.theorems`)."""

from prefixlens.constructions.model import ConstructionConfig, HookedConstruction, Layout
from prefixlens.constructions.theorems import (
    DEFAULT_GAP,
    Construction,
    LongResponse,
    Theorem1,
    Theorem2,
    TwoTokenInput,
    count_distinct,
    decoder_limit,
    long_response,
    max_digits_per_coordinate,
    reference_two_token_map,
    theorem1,
    theorem2,
    two_token_input,
)

__all__ = [
    "ConstructionConfig",
    "HookedConstruction",
    "Layout",
    "DEFAULT_GAP",
    "Construction",
    "LongResponse",
    "Theorem1",
    "Theorem2",
    "TwoTokenInput",
    "count_distinct",
    "decoder_limit",
    "long_response",
    "max_digits_per_coordinate",
    "reference_two_token_map",
    "theorem1",
    "theorem2",
    "two_token_input",
]
