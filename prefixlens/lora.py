"""Low-rank adaptation (LoRA) of a bridge's weight matrices, with ``torch.nn.utils.parametrize``.

``W' = W + scaling · ΔW`` with ``ΔW = B @ A`` in the ``[out, in]`` convention (minLoRA / the
reference): ``A`` ``[r, in]`` Kaiming-uniform, ``B`` ``[out, r]`` zeros, ``scaling = alpha / r``.
HuggingFace GPT-2 keeps ``Conv1D`` weights as ``[in, out]``; there ``ΔW`` is transposed. The base
weights stay in place and frozen; :meth:`LoRA.remove` restores the model exactly.

Targets are named by role, per layer (the bridge's components)::

    "q", "k", "v"   blocks.L.attn.{q,k,v}     (the bridge's split query/key/value projections)
    "o"             blocks.L.attn.o           (attention output, GPT-2 ``attn.c_proj``)
    "mlp_in"        blocks.L.mlp.in           (GPT-2 ``mlp.c_fc``)
    "mlp_out"       blocks.L.mlp.out          (GPT-2 ``mlp.c_proj``)

``REFERENCE_TARGETS = ("o", "mlp_in", "mlp_out")`` is what the reference's
``add_lora_by_name(model, ["c_proj", "c_fc"])`` hits (its substring match also catches the attention
output projection); ``MLP_TARGETS = ("mlp_in", "mlp_out")`` is LoRA on the MLP only, which is what
the paper's text describes.
"""

from __future__ import annotations

import math
import operator

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

__all__ = ["LoRA", "add_lora", "REFERENCE_TARGETS", "MLP_TARGETS", "lora_parameter_count"]

REFERENCE_TARGETS = ("o", "mlp_in", "mlp_out")
MLP_TARGETS = ("mlp_in", "mlp_out")
_ROLES = ("q", "k", "v", "o", "mlp_in", "mlp_out")


class _LowRankDelta(nn.Module):
    """The parametrisation ``W -> W + scaling · ΔW`` of one weight."""

    def __init__(self, fan_in: int, fan_out: int, rank: int, alpha: float, transposed: bool, dtype, device):
        super().__init__()
        self.A = nn.Parameter(torch.empty(rank, fan_in, dtype=dtype, device=device))
        self.B = nn.Parameter(torch.zeros(fan_out, rank, dtype=dtype, device=device))
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))
        self.scaling = alpha / rank
        self.transposed = transposed

    def delta(self) -> Tensor:
        d = self.B @ self.A  # [out, in]
        return (d.T if self.transposed else d) * self.scaling

    def forward(self, W: Tensor) -> Tensor:
        return W + self.delta()


def _find_linear(model, layer: int, role: str) -> nn.Module:
    block = model.blocks[layer]
    comp = {
        "q": lambda: block.attn.q,
        "k": lambda: block.attn.k,
        "v": lambda: block.attn.v,
        "o": lambda: block.attn.o,
        "mlp_in": lambda: getattr(block.mlp, "in"),
        "mlp_out": lambda: block.mlp.out,
    }[role]()
    inner = getattr(comp, "original_component", comp)
    if not hasattr(inner, "weight") and not parametrize.is_parametrized(inner, "weight"):
        raise TypeError(f"blocks.{layer} {role}: {type(inner).__name__} has no weight to adapt.")
    return inner


def _fans(module: nn.Module) -> tuple[int, int, bool]:
    """``(fan_in, fan_out, transposed)``: HF ``Conv1D`` stores ``[in, out]``, ``nn.Linear`` ``[out, in]``."""
    W = module.weight
    if isinstance(module, nn.Linear):
        return W.shape[1], W.shape[0], False
    if any(c.__name__ == "Conv1D" for c in type(module).__mro__):  # also when already parametrised
        return W.shape[0], W.shape[1], True
    raise TypeError(f"LoRA supports nn.Linear and HF Conv1D, got {type(module).__name__}.")


class LoRA(nn.Module):
    """The LoRA adapters attached to a model; its parameters are the only trainable ones.

    Use :func:`add_lora` to make one. ``remove()`` (or leaving a ``with`` block) takes the
    parametrisations off and leaves the base weights exactly as they were.
    """

    def __init__(self, model, rank: int, targets: tuple[str, ...], layers: list[int], alpha: float):
        super().__init__()
        self.rank, self.targets, self.layers, self.alpha = rank, tuple(targets), list(layers), alpha
        self.deltas = nn.ModuleDict()
        self._modules_adapted: list[nn.Module] = []
        seen: dict[int, str] = {}  # one adapter per module: a repeated (layer, role) would pair deltas wrongly
        for layer in self.layers:
            for role in self.targets:
                lin = _find_linear(model, layer, role)
                if id(lin) in seen:
                    raise ValueError(
                        f"blocks.{layer} {role} is the same module as {seen[id(lin)]}; each weight can carry one "
                        "adapter: pass each (layer, role) once."
                    )
                seen[id(lin)] = f"blocks.{layer} {role}"
                if parametrize.is_parametrized(lin, "weight"):
                    raise RuntimeError(
                        f"blocks.{layer} {role} already carries a parametrisation (LoRA attached twice?): "
                        "remove() the other LoRA first."
                    )
                fan_in, fan_out, transposed = _fans(lin)
                delta = _LowRankDelta(fan_in, fan_out, rank, alpha, transposed, lin.weight.dtype, lin.weight.device)
                self.deltas[f"{layer}_{role}"] = delta
                self._modules_adapted.append(lin)
        # parametrising moves ``weight`` to the end of the module's parameters; remove() puts it back
        # in place, so parameter and state_dict order are the same as before
        self._param_order = [list(lin._parameters) for lin in self._modules_adapted]
        self.attached = False
        self.attach()

    def _pairs(self) -> list[tuple[str, nn.Module, "_LowRankDelta"]]:
        deltas = list(self.deltas.items())
        if len(deltas) != len(self._modules_adapted):  # an invariant; a mismatch would misplace adapters
            raise RuntimeError(f"LoRA has {len(deltas)} adapters for {len(self._modules_adapted)} modules.")
        return [(key, lin, delta) for (key, delta), lin in zip(deltas, self._modules_adapted)]

    @staticmethod
    def _carries(lin: nn.Module, delta: nn.Module) -> bool:
        return parametrize.is_parametrized(lin, "weight") and any(p is delta for p in lin.parametrizations.weight)

    def attach(self) -> "LoRA":
        """Put the adapters (back) on the model; all or nothing (on an error none stays attached)."""
        if self.attached:
            return self
        pairs = self._pairs()
        for key, lin, _ in pairs:
            if parametrize.is_parametrized(lin, "weight"):
                raise RuntimeError(
                    f"the module of adapter {key} already carries a parametrisation (another LoRA attached?): "
                    "remove() it first."
                )
        done = []
        try:
            for _, lin, delta in pairs:
                parametrize.register_parametrization(lin, "weight", delta, unsafe=True)
                done.append(lin)
        except BaseException:
            for lin in done:
                parametrize.remove_parametrizations(lin, "weight", leave_parametrized=False)
            raise
        self.attached = True
        return self

    def remove(self) -> None:
        """Take the adapters off the model, restoring the original weights (the adapters are kept).

        Every module is visited even if one fails; ``attached`` is ``False`` afterwards exactly when
        no adapter of this LoRA is left on the model (otherwise the error names the ones left).
        """
        if not self.attached:
            return
        failed = []
        for (key, lin, delta), order in zip(self._pairs(), self._param_order):
            if not self._carries(lin, delta):
                self._restore_order(lin, order)
                continue  # already off (e.g. removed by hand)
            if len(lin.parametrizations.weight) != 1:
                failed.append(f"{key} (the weight carries {len(lin.parametrizations.weight)} parametrisations; "
                              "remove the others first)")
                continue
            try:
                parametrize.remove_parametrizations(lin, "weight", leave_parametrized=False)
            except Exception as e:  # noqa: BLE001 - reported below, after the other modules
                failed.append(f"{key} ({type(e).__name__}: {e})")
            else:
                self._restore_order(lin, order)
        if failed:
            raise RuntimeError("LoRA.remove() could not take off the adapters " + "; ".join(failed) + ".")
        self.attached = False

    @staticmethod
    def _restore_order(lin: nn.Module, order: list[str]) -> None:
        params = lin._parameters
        if set(params) == set(order) and list(params) != order:
            items = [(k, params[k]) for k in order]
            params.clear()
            params.update(items)

    def __enter__(self) -> "LoRA":
        return self.attach()

    def __exit__(self, *exc) -> None:
        self.remove()

    def n_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def state_tensors(self) -> dict[str, Tensor]:
        return {f"{k}.{n}": p.detach() for k, d in self.deltas.items() for n, p in (("A", d.A), ("B", d.B))}

    def load_state_tensors(self, tensors: dict[str, Tensor]) -> None:
        """Copy ``state_tensors()``-style tensors in; keys and shapes must match exactly."""
        expected = {k: tuple(v.shape) for k, v in self.state_tensors().items()}
        missing = sorted(set(expected) - set(tensors))
        unexpected = sorted(set(tensors) - set(expected))
        wrong = [f"{k} {tuple(tensors[k].shape)} (expected {expected[k]})" for k in expected
                 if k in tensors and tuple(tensors[k].shape) != expected[k]]
        if missing or unexpected or wrong:
            raise ValueError(
                f"these tensors do not fit this LoRA (rank={self.rank}, targets={self.targets}, layers={self.layers}): "
                + "; ".join(x for x in (f"missing {missing}" if missing else "",
                                         f"unexpected {unexpected}" if unexpected else "",
                                         f"wrong shape {wrong}" if wrong else "") if x)
                + "."
            )
        with torch.no_grad():
            for k, d in self.deltas.items():
                d.A.copy_(tensors[f"{k}.A"])
                d.B.copy_(tensors[f"{k}.B"])

    def extra_repr(self) -> str:
        return f"rank={self.rank}, targets={self.targets}, layers={self.layers}, params={self.n_parameters()}"


def _resolve_targets(targets) -> tuple[str, ...]:
    named = {"reference": REFERENCE_TARGETS, "mlp": MLP_TARGETS}
    if isinstance(targets, str):
        if targets not in named:
            raise ValueError(
                f"targets must be a tuple of roles {_ROLES} or one of {list(named)}, got {targets!r}."
            )
        return named[targets]
    targets = tuple(targets)
    bad = [t for t in targets if t not in _ROLES]
    if bad or not targets:
        raise ValueError(f"unknown LoRA targets {bad or targets}; roles are {_ROLES}.")
    repeated = sorted({t for t in targets if targets.count(t) > 1})
    if repeated:
        raise ValueError(f"LoRA targets {repeated} are named more than once in {targets}; name each role once.")
    return targets


def _resolve_layers(model, layers) -> list[int]:
    n_layers = int(model.cfg.n_layers)
    layers = list(range(n_layers)) if layers is None else list(layers)
    if not layers:
        raise ValueError("layers is empty: pass None (all layers) or some of 0..n_layers-1.")
    try:
        if any(isinstance(l, bool) for l in layers):
            raise TypeError
        layers = [operator.index(l) for l in layers]
    except TypeError:
        raise ValueError(f"layers must be ints in 0..{n_layers - 1}, got {layers}.") from None
    if any(not 0 <= l < n_layers for l in layers):
        raise ValueError(f"layers must be ints in 0..{n_layers - 1}, got {layers}.")
    repeated = sorted({l for l in layers if layers.count(l) > 1})
    if repeated:
        raise ValueError(f"layers {repeated} are named more than once in {layers}; name each layer once.")
    return layers


def add_lora(
    model,
    rank: int = 1,
    targets: tuple[str, ...] | str = REFERENCE_TARGETS,
    layers: list[int] | None = None,
    alpha: float = 1.0,
    seed: int = 0,
) -> LoRA:
    """Attach rank-``rank`` LoRA to ``targets`` in ``layers`` (default all) of ``model``.

    ``targets``: roles (see the module docstring), or ``"reference"`` / ``"mlp"``. ``alpha`` gives
    ``scaling = alpha / rank`` (the reference: alpha 1). ``A`` is initialised from ``seed`` (the
    caller's global RNG is left as it was). A role or layer named twice is refused (one adapter per
    weight). On an error nothing is attached.

    Args:
        model (TransformerBridge): the model to adapt (its weights are not changed).
        rank: the rank of each adapter.
        targets: the roles to adapt, or ``"reference"`` / ``"mlp"``.
        layers: the layers to adapt (``None``: all).
        alpha: the scale numerator: ``scaling = alpha / rank``.
        seed: the seed of ``A``'s initialisation.

    Returns:
        The attached adapters (``.remove()`` detaches them).
    """
    targets = _resolve_targets(targets)
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"rank must be an int >= 1, got {rank!r}.")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha) or alpha == 0:
        raise ValueError(f"alpha must be a finite nonzero number (scaling = alpha / rank), got {alpha!r}.")
    layers = _resolve_layers(model, layers)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return LoRA(model, rank, tuple(targets), layers, alpha)


def lora_parameter_count(model, rank: int, targets: tuple[str, ...] | str = REFERENCE_TARGETS, layers=None) -> int:
    """The number of LoRA parameters :func:`add_lora` would create (without attaching anything)."""
    targets = _resolve_targets(targets)
    layers = _resolve_layers(model, layers)
    total = 0
    for layer in layers:
        for role in targets:
            fan_in, fan_out, _ = _fans(_find_linear(model, layer, role))
            total += rank * (fan_in + fan_out)
    return total
