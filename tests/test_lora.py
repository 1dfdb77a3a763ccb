"""prefixlens.lora: one adapter per weight, in the right place, and nothing left behind (issue 14, case 8)."""

from __future__ import annotations

import pytest
import torch
from torch.nn.utils import parametrize

from prefixlens import models, tasks
from prefixlens.lora import add_lora, lora_parameter_count


def tiny(seed=0):
    return models.toy_gpt2(d_vocab=tasks.VOCAB, n_ctx=24, seed=seed, n_layers=2, d_model=16, n_heads=2)


def _o(model, layer):
    return model.blocks[layer].attn.o.original_component  # HF Conv1D, weight [in, out]


def _nothing_attached(model):
    return not any(parametrize.is_parametrized(m) for m in model.original_model.modules())


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(targets=("o", "o")), "named more than once"),
        (dict(targets=("q", "mlp_in", "q")), "named more than once"),
        (dict(targets=("o",), layers=[0, 0]), "named more than once"),
        (dict(targets=("o",), layers=[]), "empty"),
        pytest.param(dict(targets=("o",), layers=[0.0]), "ints", marks=pytest.mark.wrong_types_on_purpose),
        (dict(targets=("o",), alpha=0.0), "alpha"),
        (dict(targets=("o",), rank=True), "rank"),
        (dict(targets="bogus"), "targets"),
    ],
)
def test_repeated_or_bad_targets_are_refused_and_nothing_is_attached(kwargs, match):
    model = tiny()
    with pytest.raises(ValueError, match=match):
        add_lora(model, **kwargs)
    assert _nothing_attached(model)


def test_lora_parameter_count_refuses_like_add_lora():
    model = tiny()
    with pytest.raises(ValueError, match="targets"):
        lora_parameter_count(model, 1, "bogus")  # was a bare KeyError
    with pytest.raises(ValueError, match="named more than once"):
        lora_parameter_count(model, 1, ("o", "o"))


def test_every_adapter_sits_on_its_own_layer():
    """Independent check: each layer's weight is W + scaling·(B A)^T of the adapter keyed by that layer."""
    model = tiny()
    W = [_o(model, l).weight.detach().clone() for l in range(2)]
    lora = add_lora(model, rank=1, targets=("o",), seed=0)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for d in lora.deltas.values():
            d.B.copy_(torch.randn(d.B.shape, generator=g))
    for layer in range(2):
        d = lora.deltas[f"{layer}_o"]
        expected = W[layer] + (d.B @ d.A).T.detach() * d.scaling
        assert torch.allclose(_o(model, layer).weight, expected, atol=1e-6)
        assert len(_o(model, layer).parametrizations.weight) == 1
    lora.remove()
    assert not lora.attached and _nothing_attached(model)
    assert all(torch.equal(_o(model, l).weight, W[l]) for l in range(2))


def test_remove_is_consistent_when_something_fails():
    model = tiny()
    W = [_o(model, l).weight.detach().clone() for l in range(2)]
    lora = add_lora(model, rank=1, targets=("o",))
    # one adapter taken off by hand: remove() takes off the rest and reports success
    parametrize.remove_parametrizations(_o(model, 0), "weight", leave_parametrized=False)
    lora.remove()
    assert not lora.attached and _nothing_attached(model)
    # another parametrisation stacked on top of one adapter: the rest come off, the error names it,
    # and `attached` stays True (an adapter is still on the model) until it can come off
    lora.attach()
    parametrize.register_parametrization(_o(model, 1), "weight", torch.nn.Identity(), unsafe=True)
    with pytest.raises(RuntimeError, match="1_o"):
        lora.remove()
    assert lora.attached and not parametrize.is_parametrized(_o(model, 0))
    assert torch.equal(_o(model, 0).weight, W[0])
    _o(model, 1).parametrizations.weight.pop(-1)  # take the foreign one off
    lora.remove()
    assert not lora.attached and _nothing_attached(model)
    assert all(torch.equal(_o(model, l).weight, W[l]) for l in range(2))


def test_attach_is_all_or_nothing():
    model = tiny()
    first = add_lora(model, rank=1, targets=("o", "mlp_out"))
    first.remove()
    second = add_lora(model, rank=1, targets=("mlp_out",), layers=[1])
    with pytest.raises(RuntimeError, match="already carries a parametrisation"):
        first.attach()  # would stack two adapters on blocks.1 mlp_out
    assert not first.attached
    # (own parametrisations only: the bridge's wrappers forward attribute lookups to the HF module)
    assert sum("parametrizations" in m._modules for m in model.original_model.modules()) == 1
    second.remove()
    assert _nothing_attached(model)


def test_load_state_tensors_checks_keys_and_shapes():
    model = tiny()
    lora = add_lora(model, rank=2, targets=("o",))
    state = {k: v.clone() for k, v in lora.state_tensors().items()}
    lora.load_state_tensors(state)
    small = {k: v[:1] for k, v in state.items()}  # rank-1 tensors would broadcast silently into rank 2
    with pytest.raises(ValueError, match="wrong shape"):
        lora.load_state_tensors(small)
    with pytest.raises(ValueError, match="missing"):
        lora.load_state_tensors({k: v for k, v in state.items() if not k.startswith("1_")})
    lora.remove()


def test_remove_restores_the_parameter_and_state_dict_order():
    model = tiny()
    names = [n for n, _ in model.named_parameters()]
    keys = list(model.state_dict())
    lora = add_lora(model, rank=1, targets="reference")
    lora.remove()
    assert [n for n, _ in model.named_parameters()] == names
    assert list(model.state_dict()) == keys
