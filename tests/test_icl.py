"""prefixlens.icl on toy models (a word-level toy tokenizer: every id is its own word), checked
against independent computations: the full prompt run directly, finite differences, hand counts."""

from __future__ import annotations

import pytest
import torch

from prefixlens import icl, run_with_prefix
from prefixlens.lexicons import LexiconTask
from prefixlens.text import encode
from tests.conftest import build

# the toy tokenizer's words are the ids 0..60 ("1" and "2" are BOS/EOS: "12" splits into two tokens)
WORDS = [str(n) for n in range(33, 61) if not set(str(n)) & set("12")][:24]


def toy_task(labels=("8", "9")) -> LexiconTask:
    """24 one-token words; label = parity (a toy with the shape of a LexiconTask)."""
    pairs = [(w, labels[int(w) % 2]) for w in WORDS]
    return LexiconTask(name="toy", template="7 {word} 6", labels=tuple(labels), train=tuple(pairs[:12]),
                       test=tuple(pairs[12:]), source="toy")


@pytest.mark.parametrize("family", ["gpt2", "llama_gqa"])
def test_demonstrations_positions_and_full_prompt(family):
    model = build(family, torch.float64)
    task = toy_task()
    pairs = icl.draw_demonstrations(task, 2, seed=1)
    assert sorted(y for _, y in pairs) == ["8", "8", "9", "9"] and set(pairs) <= set(task.train)
    assert pairs == icl.draw_demonstrations(task, 2, seed=1) != icl.draw_demonstrations(task, 2, seed=2)
    demos = icl.build_demonstrations(model, task, pairs, separator=" 3")
    text = " ".join(f"7 {w} 6 {y} 3" for w, y in pairs)
    assert list(demos.tokens) == encode(model, text)  # pieces = the whole prompt's encoding
    assert [demos.tokens[p] for p in demos.label_positions] == [int(y) for _, y in pairs]
    assert [demos.tokens[p] for p in demos.word_positions] == [int(w) for w, _ in pairs]
    assert set(demos.anchor_positions) == set(range(demos.length)) - set(demos.word_positions)

    # scored after the demonstrations as a prefix == the full prompt run directly, row by row
    words = [w for w, _ in task.test[:5]]
    got = icl.label_logits(model, task, words, icl.compression_prefixes(model, demos)["demonstrations"], batch_size=3)
    zero = icl.label_logits(model, task, words, None)
    ids = icl.label_ids(model, task)
    for row, w in enumerate(words):
        full = torch.tensor([list(demos.tokens) + icl.query_tokens(model, task, w)])
        assert (model(full)[0, -1, ids] - got[row]).abs().max() < 1e-10
        alone = torch.tensor([icl.query_tokens(model, task, w, zero_shot=True)])
        assert (model(alone)[0, -1, ids] - zero[row]).abs().max() < 1e-10
    correct, n = icl.accuracy(got, task, [y for _, y in task.test[:5]])
    assert n == 5 and correct == int((got.argmax(-1) == torch.tensor([task.label_index(y) for _, y in task.test[:5]])).sum())


def test_compression_prefixes():
    model = build("llama_gqa", torch.float64)
    task = toy_task()
    demos = icl.build_demonstrations(model, task, icl.draw_demonstrations(task, 2, seed=0), separator=" 3")
    p = icl.compression_prefixes(model, demos, seed=0)
    assert p["hidden_anchor"].slot_positions == demos.anchor_positions
    assert p["text_anchor"].length == len(demos.anchor_positions) and p["text_anchor"].slot_positions is None
    kept = set(p["hidden_random"].slot_positions)
    assert len(kept) == len(demos.anchor_positions) and not kept & set(demos.label_positions)
    assert set(demos.formatting_positions) <= kept
    # every prefix scores as run_with_prefix does (label_logits runs the slots once, on the model's cache)
    words = ["44", "12", "46"]  # "12" is two tokens: a left-padded row
    ids = icl.label_ids(model, task)
    for prefix in p.values():
        rows = [icl.query_tokens(model, task, w) for w in words]
        tokens, mask = icl.pad_left(rows)
        ref = run_with_prefix(model, tokens, prefix, attention_mask=mask)[:, -1, ids]
        assert (icl.label_logits(model, task, words, prefix) - ref).abs().max() < 1e-10
    # Text_anchor is the anchor tokens as a real prompt
    words = ["44", "45"]
    got = icl.label_logits(model, task, words, p["text_anchor"])
    ids = icl.label_ids(model, task)
    anchors = [demos.tokens[i] for i in demos.anchor_positions]
    for row, w in enumerate(words):
        full = torch.tensor([anchors + icl.query_tokens(model, task, w)])
        assert (model(full)[0, -1, ids] - got[row]).abs().max() < 1e-10


def test_refusals():
    model = build("gpt2", torch.float64)
    with pytest.raises(ValueError, match="label word '12' is 2 tokens"):
        icl.label_ids(model, toy_task(labels=("12", "9")))
    with pytest.raises(ValueError, match="k=8 needs more"):
        icl.draw_demonstrations(toy_task(), 8, seed=0)
    bad = LexiconTask(name="x", template="7 6", labels=("8", "9"), train=(), test=(), source="")
    with pytest.raises(ValueError, match="contain"):
        icl.query_tokens(model, bad, "33")


@pytest.mark.parametrize("family", ["gpt2", "llama_gqa"])
def test_saliency_is_the_gradient_times_attention(family):
    """``I_l[i, j]`` against a finite difference: scale every head's A[i, j] in layer l by (1 + ε)."""
    model = build(family, torch.float64)
    tokens = torch.tensor([1, 7, 34, 6, 9, 3, 7, 45, 6, 8])
    target = 8
    I = icl.saliency(model, tokens, target)
    assert I.shape == (model.cfg.n_layers, 10, 10) and not any(p.grad is not None for p in model.parameters())

    def loss(layer, i, j, eps):
        def hook(pattern, hook):
            pattern = pattern.clone()
            pattern[:, :, i, j] *= 1 + eps
            return pattern

        logits = model.run_with_hooks(tokens[None], fwd_hooks=[(f"blocks.{layer}.attn.hook_pattern", hook)])
        return float(torch.nn.functional.cross_entropy(logits[0, -1:], torch.tensor([target])))

    # ε = 1e-3: HF LLaMA's RMSNorm runs in float32 even in a float64 model, too coarse for a smaller step
    for layer, i, j in [(0, 9, 4), (1, 9, 2), (1, 5, 1), (0, 3, 3), (0, 0, 0)]:
        fd = (loss(layer, i, j, 1e-3) - loss(layer, i, j, -1e-3)) / 2e-3
        assert abs(abs(fd) - float(I[layer, i, j])) < 1e-3 * max(0.1, abs(fd))
    assert float(I[:, :, :].triu(1).abs().max()) == 0.0  # causal: nothing above the diagonal


def test_information_flow_by_hand():
    I = torch.arange(36, dtype=torch.float64).reshape(1, 6, 6).tril()
    flows = icl.information_flow(I, [2, 4])
    # S_wp: rows 2 (cols 0, 1) and 4 (cols 0..3); Σ p_k = 6
    assert flows["S_wp"][0] == pytest.approx((12 + 13 + 24 + 25 + 26 + 27) / 6)
    assert flows["S_pq"][0] == pytest.approx((32 + 34) / 2)  # q = 5
    rest = [(1, 0), (3, 0), (3, 1), (3, 2), (5, 0), (5, 1), (5, 3)]
    assert flows["S_ww"][0] == pytest.approx(sum(6 * i + j for i, j in rest) / len(rest))


def test_prefix_bridge_exact():
    model = build("llama_gqa", torch.float64)
    task = toy_task()
    demos = icl.build_demonstrations(model, task, icl.draw_demonstrations(task, 1, seed=0), separator=" 3")
    out = icl.prefix_bridge(model, task, demos, ["35", "44", "57"])
    assert out["relative_attention_error"] < 1e-10 and out["reconstruction_error"] < 1e-10
    L, H = model.cfg.n_layers, model.cfg.n_heads
    assert torch.tensor(out["bias_share"]).shape == (L, H) and torch.tensor(out["label_share"]).shape == (L, H)
    assert 0 <= min(map(min, out["label_share"])) and max(map(max, out["label_share"])) <= 1 + 1e-12


def test_mean_and_interval():
    s = icl.mean_and_interval([0.5, 0.7, 0.6])
    assert s["mean"] == pytest.approx(0.6) and s["sd"] == pytest.approx(0.1)
    assert s["ci95"][1] - 0.6 == pytest.approx(4.303 * 0.1 / 3 ** 0.5)
