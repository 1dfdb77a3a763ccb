"""``KVPrefix.from_prompt(model, prompt, keep=...)``: hidden-anchor compression, checked against HuggingFace.

The reference is the HF model itself on the *full* prompt + content, with a 4-D boolean mask that is
causal everywhere except that the content's rows do not see the dropped prompt positions (the
prompt's own rows are untouched: the kept keys and values are those of the full prompt)."""

from __future__ import annotations

import pytest
import torch

from prefixlens import KVPrefix, decompose, generate, run_with_prefix
from tests.conftest import TOL, build, random_tokens

P, T = 12, 5
KEEP = [0, 2, 3, 7, 11]
FAMILIES = ["gpt2", "llama_gqa"]  # absolute positions, rotary + grouped-query attention


def n_pre_hooks(model) -> int:
    return sum(len(m._forward_pre_hooks) for m in model.modules())


def hf_masked(model, full: torch.Tensor, P: int, keep) -> torch.Tensor:
    """HF logits of ``full`` (every row: positions 0..N-1) with rows >= P blind to the dropped columns < P."""
    N = full.shape[1]
    allowed = torch.tril(torch.ones(N, N, dtype=torch.bool))
    allowed[P:, [i for i in range(P) if i not in keep]] = False
    with torch.no_grad():
        return model.original_model(full, attention_mask=allowed[None, None].expand(full.shape[0], 1, N, N),
                                    position_ids=torch.arange(N).expand(full.shape[0], N)).logits


@pytest.mark.parametrize("family", FAMILIES)
def test_keep_subset_equals_full_prompt_with_dropped_columns_masked(family):
    model = build(family, torch.float64)
    full = random_tokens((1, P + T), seed=3)
    ref = hf_masked(model, full, P, KEEP)[:, P:]
    kept = KVPrefix.from_prompt(model, full[0, :P], keep=KEEP)
    assert kept.length == len(KEEP) and kept.slot_positions == tuple(KEEP) and kept.content_start == P
    got = run_with_prefix(model, full[:, P:], kept)
    assert (got - ref).abs().max() < TOL[torch.float64]
    # the masking matters (so the check has power): the full prompt gives other logits
    assert (model.original_model(full).logits[:, P:] - ref).abs().max() > 1e-3
    # and so do the positions: the same keys and values at slots 0..4, content from 5, are wrong
    naive = KVPrefix(kept.keys, kept.values, kept.signature)
    assert (run_with_prefix(model, full[:, P:], naive) - ref).abs().max() > 1e-3


@pytest.mark.parametrize("family", FAMILIES)
def test_keep_every_position_equals_full_prompt(family):
    model = build(family, torch.float64)
    full = random_tokens((1, P + T), seed=4)
    ref = model.original_model(full).logits[:, P:]
    for keep in (list(range(P)), torch.arange(P - 1, -1, -1)):  # any order, list or tensor
        got = run_with_prefix(model, full[:, P:], KVPrefix.from_prompt(model, full[0, :P], keep=keep))
        assert (got - ref).abs().max() < TOL[torch.float64]


@pytest.mark.parametrize("family", FAMILIES)
def test_keep_padded_batch_and_generate_and_decompose(family):
    model = build(family, torch.float64)
    before = n_pre_hooks(model)
    prompt = random_tokens((P,), seed=5)
    kept = KVPrefix.from_prompt(model, prompt, keep=KEEP)
    a, b = random_tokens((1, T), seed=6), random_tokens((1, T - 2), seed=7)
    batch = torch.cat([a, torch.cat([torch.zeros(1, 2, dtype=torch.long), b], 1)])  # row 1 left-padded
    mask = torch.tensor([[1] * T, [0, 0] + [1] * (T - 2)])
    got = run_with_prefix(model, batch, kept, attention_mask=mask)
    for row, q in ((0, a), (1, b)):
        ref = hf_masked(model, torch.cat([prompt[None], q], 1), P, KEEP)[0, P:]
        assert (got[row, -q.shape[1]:] - ref).abs().max() < TOL[torch.float64]
    # greedy generation: the HF masked run, one token at a time
    seq = torch.cat([prompt[None], a], 1)
    for _ in range(4):
        seq = torch.cat([seq, hf_masked(model, seq, P, KEEP)[:, -1].argmax(-1, keepdim=True)], 1)
    assert generate(model, a, kept, max_new_tokens=4).tolist() == seq[:, P:].tolist()
    # decomposition: exact, and the relative attention over the content is unchanged
    d = decompose(model, a, kept)
    assert d.reconstruction_error() < 1e-10
    assert float(d.relative_attention_error().max()) < 1e-10
    assert n_pre_hooks(model) == before  # nothing left behind


def test_keep_refusals(tmp_path):
    model = build("llama_gqa", torch.float64)
    before = n_pre_hooks(model)
    prompt = random_tokens((P,), seed=8)
    for bad in ([], [0, 0], [P], [-1]):
        with pytest.raises(ValueError, match="keep="):
            KVPrefix.from_prompt(model, prompt, keep=bad)
    kept = KVPrefix.from_prompt(model, prompt, keep=KEEP)
    with pytest.raises(ValueError, match="cannot be saved|carries its positions"):
        kept.save(tmp_path / "p.safetensors")
    with pytest.raises(ValueError, match="beyond the model's context"):
        run_with_prefix(model, random_tokens((1, 55), seed=9), kept)  # 5 slots + 55 fit, 12 + 55 positions do not
    assert n_pre_hooks(model) == before


@pytest.mark.slow
def test_keep_on_smollm2():
    from prefixlens import models

    model = models.load("smollm2-135m", dtype=torch.float32)
    full = torch.tensor([model.tokenizer("Word: happy\nSentiment: positive\nWord: sad\nSentiment: negative\n"
                                         "Word: glad\nSentiment:")["input_ids"]])
    P = int(full.shape[1]) - 5
    keep = [i for i in range(P) if i % 3 != 1]
    ref = hf_masked(model, full, P, keep)[:, P:]
    got = run_with_prefix(model, full[:, P:], KVPrefix.from_prompt(model, full[0, :P], keep=keep))
    assert (got - ref).abs().max() < 1e-3 * ref.abs().max()
