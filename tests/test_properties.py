"""Property-based checks of the core identities over model family, dtype, prefix form, P, T and batch.

Hypothesis draws the cases (a fixed number per property, no deadline: bounded in time by
``max_examples``); the tolerances are the suite's (``tests/conftest.py``: 1e-5 in float32, 1e-10 / 1e-12
in float64). The largest error each property met is printed at the end of the module
(``pytest -s tests/test_properties.py``).
"""

from __future__ import annotations

import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import prefixlens as pl  # noqa: E402
from tests.conftest import DECOMPOSITION_TOL, FAMILIES, TOL, build, random_tokens  # noqa: E402

FORMS = {"kv": pl.KVPrefix, "residual": pl.ResidualPrefix, "soft": pl.SoftPrompt}
SETTINGS = settings(max_examples=25, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
LARGEST: dict[str, float] = {}


def record(name: str, err: float) -> float:
    LARGEST[name] = max(LARGEST.get(name, 0.0), err)
    return err


@pytest.fixture(scope="module", autouse=True)
def report_largest_errors():
    yield
    for name, err in sorted(LARGEST.items()):
        print(f"\nlargest error, {name}: {err:.2e}")


cases = st.fixed_dictionaries({
    "family": st.sampled_from(sorted(FAMILIES)),
    "dtype": st.sampled_from([torch.float32, torch.float64]),
    "form": st.sampled_from(sorted(FORMS)),
    "P": st.integers(1, 5),
    "T": st.integers(1, 9),
    "batch": st.integers(1, 3),
    "seed": st.integers(0, 2**16),
})


@SETTINGS
@given(case=cases)
def test_a_prefix_from_a_prompt_is_the_prompt(case):
    model = build(case["family"], case["dtype"])
    prompt = random_tokens((case["P"],), seed=case["seed"])
    x = random_tokens((case["batch"], case["T"]), seed=case["seed"] + 1)
    prefix = FORMS[case["form"]].from_prompt(model, prompt)
    with torch.no_grad():
        ours = pl.run_with_prefix(model, x, prefix)
        real = model(torch.cat([prompt.expand(case["batch"], -1), x], dim=1))[:, case["P"]:]
    err = record(f"prefix vs prompt ({case['dtype']})", (ours - real).abs().max().item())
    assert err <= TOL[case["dtype"]], case


@SETTINGS
@given(case=cases)
def test_every_head_decomposes_and_keeps_its_relative_attention(case):
    model = build(case["family"], case["dtype"])
    prefix = FORMS[case["form"]].random(model, case["P"], seed=case["seed"])
    x = random_tokens((case["batch"], case["T"]), seed=case["seed"] + 1)
    d = pl.decompose(model, x, prefix)
    tol = DECOMPOSITION_TOL[case["dtype"]]
    reconstruction = record(f"reconstruction ({case['dtype']})", d.reconstruction_error())
    relative = record(f"relative attention ({case['dtype']})", float(d.relative_attention_error().max()))
    assert reconstruction <= tol and relative <= tol, case


@SETTINGS
@given(case=cases, do_sample=st.booleans())
def test_cached_and_recomputed_generation_agree(case, do_sample):
    model = build(case["family"], case["dtype"])
    prefix = FORMS[case["form"]].random(model, case["P"], seed=case["seed"])
    x = random_tokens((case["batch"], case["T"]), seed=case["seed"] + 1)
    kwargs = dict(max_new_tokens=5, do_sample=do_sample, temperature=2.0, seed=case["seed"])
    assert torch.equal(pl.generate(model, x, prefix, **kwargs), pl.generate(model, x, prefix, use_cache=False, **kwargs))


@SETTINGS
@given(case=cases, side=st.sampled_from(["left", "right"]), lengths=st.lists(st.integers(1, 9), min_size=2, max_size=3))
def test_a_padded_batch_gives_each_row_what_it_gives_alone(case, side, lengths):
    model = build(case["family"], case["dtype"])
    prefix = FORMS[case["form"]].random(model, case["P"], seed=case["seed"])
    T = max(lengths)
    rows = [random_tokens((n,), seed=case["seed"] + i) for i, n in enumerate(lengths)]
    tokens = torch.zeros(len(rows), T, dtype=torch.long)
    mask = torch.zeros(len(rows), T, dtype=torch.long)
    for i, row in enumerate(rows):
        real = slice(T - len(row), T) if side == "left" else slice(0, len(row))
        tokens[i, real], mask[i, real] = row, 1
    with torch.no_grad():
        batched = pl.run_with_prefix(model, tokens, prefix, attention_mask=mask)
        for i, row in enumerate(rows):
            alone = pl.run_with_prefix(model, row[None], prefix)[0]
            err = record(f"padded row vs alone ({case['dtype']}, {side})", (batched[i][mask[i].bool()] - alone).abs().max().item())
            assert err <= TOL[case["dtype"]], (case, side, lengths)
