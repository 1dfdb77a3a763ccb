"""Upstream releases known to be broken in ways our tests can see, stated with their versions.

A test of an upstream package's own behaviour is marked ``xfail(strict=True)`` on exactly these
versions: it must fail there (so it cannot pass by accident), and runs as a plain test everywhere else.
"""

from importlib import metadata

from packaging.version import Version


def version(package: str) -> Version:
    return Version(metadata.version(package))


TRANSFORMERS, TRANSFORMER_LENS, PEFT = version("transformers"), version("transformer-lens"), version("peft")

# transformers 5.24 hands the cache to attention layers as `cache=`; TransformerLens 4.3's bridge attention
# reads only `past_key_values`, so the bridge's own cached `generate` decodes from an empty cache.
# (prefixlens's own cached calls, and the bridges prefixlens.models builds, hand the cache over under both
# names: prefixlens.kv_cache; a bridge booted directly with TransformerBridge is affected.)
TL_CACHED_GENERATE_BROKEN = TRANSFORMERS >= Version("5.24") and TRANSFORMER_LENS <= Version("4.3.0")
TL_CACHED_GENERATE_REASON = (
    f"TransformerLens {TRANSFORMER_LENS}'s cached generate ignores the cache under transformers {TRANSFORMERS} "
    "(the bridge attention reads `past_key_values`, transformers >= 5.24 passes `cache=`)"
)

# Under transformers 5.24, PEFT 0.21.2's prefix-tuning generate() ignores its prefix: it returns the base
# model's tokens (its forward, with the prefix passed as a cache, is still right).
PEFT_PREFIX_GENERATE_BROKEN = TRANSFORMERS >= Version("5.24") and PEFT <= Version("0.21.2")
PEFT_PREFIX_GENERATE_REASON = (
    f"PEFT {PEFT}'s prefix-tuning generate() ignores its prefix under transformers "
    f"{TRANSFORMERS}"
)
