"""A small hand-wired transformer with the standard TransformerLens hook names.

:class:`HookedConstruction` is a causal decoder with a residual stream, multi-head attention, a
one-hidden-layer ReLU MLP per block, learned (here: hand-set) absolute positions, no LayerNorm and
a linear unembedding. Its weights are set by the Theorem 1/2 constructions
(:mod:`prefixlens.constructions.theorems`); every prefixlens function that works on a
``TransformerBridge`` (``run_with_prefix``, ``generate``, ``decompose``, reports) works on it
unchanged, because it exposes the same HookPoints and a TL-style ``cfg``:

``hook_embed``, ``hook_pos_embed``, ``blocks.{L}.hook_resid_pre``, ``blocks.{L}.attn.hook_q``,
``hook_k``, ``hook_v`` ``[batch, pos, head, d_head]``, ``blocks.{L}.attn.hook_attn_scores``
(pre-softmax, causally masked, ``[batch, head, q, k]``), ``hook_pattern`` (post-softmax),
``hook_z`` ``[batch, pos, head, d_head]``, ``hook_result`` ``[batch, pos, head, d_model]``,
``blocks.{L}.hook_attn_out``, ``hook_resid_mid``, ``blocks.{L}.mlp.hook_pre``, ``mlp.hook_post``,
``blocks.{L}.hook_mlp_out``, ``blocks.{L}.hook_resid_post``.

Attention scores are ``q·k / attn_scale`` with ``attn_scale = 1``: the sharpness of a construction
is folded into ``W_Q``. Masked entries of ``hook_attn_scores`` are ``-inf``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from jaxtyping import Float, Int
from torch import Tensor, nn
from transformer_lens import HookedRootModule
from transformer_lens.hook_points import HookPoint

__all__ = ["ConstructionConfig", "HookedConstruction", "Layout", "ConstructionAttention", "ConstructionBlock", "ConstructionMLP"]


@dataclass
class ConstructionConfig:
    """The TL-style configuration read by prefixlens (``signature_of``, injection, generation)."""

    n_layers: int
    n_heads: int
    d_head: int
    d_model: int
    d_mlp: int
    d_vocab: int
    n_ctx: int
    architecture: str = "PrefixlensConstruction"
    positional_embedding_type: str = "standard"
    normalization_type: str | None = None
    act_fn: str = "relu"
    attn_only: bool = False
    n_key_value_heads: int | None = None
    dtype: torch.dtype = torch.float32
    device: str = "cpu"
    d_vocab_out: int | None = None
    model_name: str = "construction"
    default_prepend_bos: bool = False
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.n_key_value_heads is None:
            self.n_key_value_heads = self.n_heads
        if self.d_vocab_out is None:
            self.d_vocab_out = self.d_vocab


class Layout:
    """Named, disjoint subspaces of the residual stream (``layout["pos"]`` is a ``slice``)."""

    def __init__(self):
        self.spaces: dict[str, slice] = {}
        self.size = 0

    def add(self, name: str, width: int) -> slice:
        if name in self.spaces:
            raise ValueError(f"subspace {name!r} already allocated.")
        if width < 1:
            raise ValueError(f"subspace {name!r} needs width >= 1, got {width}.")
        self.spaces[name] = slice(self.size, self.size + width)
        self.size += width
        return self.spaces[name]

    def __getitem__(self, name: str) -> slice:
        return self.spaces[name]

    def __contains__(self, name: str) -> bool:
        return name in self.spaces

    def index(self, name: str, i: int = 0) -> int:
        s = self.spaces[name]
        if not 0 <= i < s.stop - s.start:
            raise IndexError(f"index {i} outside subspace {name!r} of width {s.stop - s.start}.")
        return s.start + i

    def describe(self) -> dict[str, tuple[int, int]]:
        """``{name: (start, stop)}``, for documentation and reports."""
        return {k: (v.start, v.stop) for k, v in self.spaces.items()}


def _param(*shape, dtype) -> nn.Parameter:
    return nn.Parameter(torch.zeros(*shape, dtype=dtype), requires_grad=False)


class ConstructionAttention(nn.Module):
    """Causal multi-head attention with explicit ``W_Q, W_K, W_V [head, d_model, d_head]``, ``W_O``."""

    def __init__(self, cfg: ConstructionConfig):
        super().__init__()
        h, d, dh, dt = cfg.n_heads, cfg.d_model, cfg.d_head, cfg.dtype
        self.cfg = cfg
        self.W_Q, self.W_K, self.W_V = _param(h, d, dh, dtype=dt), _param(h, d, dh, dtype=dt), _param(h, d, dh, dtype=dt)
        self.b_Q, self.b_K, self.b_V = _param(h, dh, dtype=dt), _param(h, dh, dtype=dt), _param(h, dh, dtype=dt)
        self.W_O, self.b_O = _param(h, dh, d, dtype=dt), _param(d, dtype=dt)
        self.attn_scale = 1.0
        self.hook_q, self.hook_k, self.hook_v = HookPoint(), HookPoint(), HookPoint()
        self.hook_attn_scores, self.hook_pattern = HookPoint(), HookPoint()
        self.hook_z, self.hook_result = HookPoint(), HookPoint()

    def _project(self, x: Tensor, W: Tensor, b: Tensor) -> Tensor:
        h, d, e = W.shape
        return (x @ W.permute(1, 0, 2).reshape(d, h * e)).view(*x.shape[:2], h, e) + b

    def forward(self, x: Float[Tensor, "batch pos d_model"]) -> Float[Tensor, "batch pos d_model"]:
        q = self.hook_q(self._project(x, self.W_Q, self.b_Q))
        k = self.hook_k(self._project(x, self.W_K, self.b_K))
        v = self.hook_v(self._project(x, self.W_V, self.b_V))
        T = x.shape[1]
        scores = torch.einsum("bqhe,bkhe->bhqk", q, k) / self.attn_scale
        mask = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
        scores = self.hook_attn_scores(scores.masked_fill(~mask, float("-inf")))
        pattern = self.hook_pattern(scores.softmax(dim=-1))
        z = self.hook_z(torch.einsum("bhqk,bkhe->bqhe", pattern, v))
        if self.hook_result.has_hooks():  # per-head outputs only when someone looks at them
            return self.hook_result(torch.einsum("bqhe,hed->bqhd", z, self.W_O)).sum(dim=2) + self.b_O
        h, e, d = self.W_O.shape
        return z.reshape(*z.shape[:2], h * e) @ self.W_O.reshape(h * e, d) + self.b_O


class ConstructionMLP(nn.Module):
    """``ReLU(x W_in + b_in) W_out + b_out`` (one hidden layer)."""

    def __init__(self, cfg: ConstructionConfig):
        super().__init__()
        d, m, dt = cfg.d_model, cfg.d_mlp, cfg.dtype
        self.W_in, self.b_in = _param(d, m, dtype=dt), _param(m, dtype=dt)
        self.W_out, self.b_out = _param(m, d, dtype=dt), _param(d, dtype=dt)
        self.hook_pre, self.hook_post = HookPoint(), HookPoint()

    def forward(self, x: Float[Tensor, "batch pos d_model"]) -> Float[Tensor, "batch pos d_model"]:
        pre = self.hook_pre(x @ self.W_in + self.b_in)
        post = self.hook_post(torch.relu(pre))
        return post @ self.W_out + self.b_out


class ConstructionBlock(nn.Module):
    def __init__(self, cfg: ConstructionConfig):
        super().__init__()
        self.attn = ConstructionAttention(cfg)
        self.mlp = ConstructionMLP(cfg)
        self.hook_resid_pre, self.hook_attn_out = HookPoint(), HookPoint()
        self.hook_resid_mid, self.hook_mlp_out, self.hook_resid_post = HookPoint(), HookPoint(), HookPoint()

    def forward(self, resid: Float[Tensor, "batch pos d_model"]) -> Float[Tensor, "batch pos d_model"]:
        resid = self.hook_resid_pre(resid)
        resid = self.hook_resid_mid(resid + self.hook_attn_out(self.attn(resid)))
        return self.hook_resid_post(resid + self.hook_mlp_out(self.mlp(resid)))


class HookedConstruction(HookedRootModule):
    """A hand-wired causal transformer exposing the standard TransformerLens hook names.

    All weights are frozen ``nn.Parameter``s (zeros until a construction sets them). ``layout``
    names the residual subspaces the construction uses; ``info`` holds its parameters.
    """

    def __init__(self, cfg: ConstructionConfig, layout: Layout | None = None):
        super().__init__()
        self.cfg = cfg
        self.layout = layout or Layout()
        d, dt = cfg.d_model, cfg.dtype
        self.embed = nn.Module()
        self.embed.W_E = _param(cfg.d_vocab, d, dtype=dt)
        self.pos_embed = nn.Module()
        self.pos_embed.W_pos = _param(cfg.n_ctx, d, dtype=dt)
        self.hook_embed, self.hook_pos_embed = HookPoint(), HookPoint()
        self.blocks = nn.ModuleList([ConstructionBlock(cfg) for _ in range(cfg.n_layers)])
        self.unembed = nn.Module()
        self.unembed.W_U = _param(d, cfg.d_vocab_out, dtype=dt)
        self.unembed.b_U = _param(cfg.d_vocab_out, dtype=dt)
        self.info: dict = {}
        self.setup()
        self.eval()

    # TL-style weight accessors
    @property
    def W_E(self) -> Float[Tensor, "d_vocab d_model"]:
        return self.embed.W_E

    @property
    def W_pos(self) -> Float[Tensor, "n_ctx d_model"]:
        return self.pos_embed.W_pos

    @property
    def W_U(self) -> Float[Tensor, "d_model d_vocab"]:
        return self.unembed.W_U

    @property
    def b_U(self) -> Float[Tensor, " d_vocab"]:
        return self.unembed.b_U

    def _stacked(self, name: str) -> Tensor:
        return torch.stack([getattr(b.attn, name) for b in self.blocks])

    @property
    def W_Q(self) -> Float[Tensor, "layer head d_model d_head"]:
        return self._stacked("W_Q")

    @property
    def W_K(self) -> Float[Tensor, "layer head d_model d_head"]:
        return self._stacked("W_K")

    @property
    def W_V(self) -> Float[Tensor, "layer head d_model d_head"]:
        return self._stacked("W_V")

    @property
    def W_O(self) -> Float[Tensor, "layer head d_head d_model"]:
        return self._stacked("W_O")

    @property
    def W_in(self) -> Float[Tensor, "layer d_model d_mlp"]:
        return torch.stack([b.mlp.W_in for b in self.blocks])

    @property
    def W_out(self) -> Float[Tensor, "layer d_mlp d_model"]:
        return torch.stack([b.mlp.W_out for b in self.blocks])

    def forward(
        self,
        input: Int[Tensor, "batch pos"],
        return_type: str | None = "logits",
        position_ids: Int[Tensor, "batch pos"] | None = None,
    ) -> Float[Tensor, "batch pos d_vocab"] | None:
        """Logits ``[batch, pos, d_vocab]`` (``return_type=None`` runs the hooks and returns None).

        ``position_ids`` (default ``0..pos-1``) choose the rows of ``W_pos``, as in HF models."""
        tokens = torch.as_tensor(input, device=self.W_E.device)
        if tokens.ndim == 1:
            tokens = tokens[None]
        T = tokens.shape[1]
        if position_ids is None:
            position_ids = torch.arange(T, device=tokens.device)[None].expand(tokens.shape[0], T)
        if int(position_ids.max()) >= self.cfg.n_ctx or T > self.cfg.n_ctx:
            raise ValueError(f"input of {T} positions exceeds the construction's context of {self.cfg.n_ctx}.")
        resid = self.hook_embed(self.W_E[tokens]) + self.hook_pos_embed(self.W_pos[position_ids])
        for block in self.blocks:
            resid = block(resid)
        if return_type is None:
            return None
        if return_type != "logits":
            raise ValueError(f"return_type must be 'logits' or None, got {return_type!r}.")
        return resid @ self.W_U + self.b_U

    def extra_repr(self) -> str:
        c = self.cfg
        return (
            f"{c.model_name}: n_layers={c.n_layers}, n_heads={c.n_heads}, d_head={c.d_head}, d_model={c.d_model}, "
            f"d_mlp={c.d_mlp}, d_vocab={c.d_vocab}, n_ctx={c.n_ctx}, dtype={c.dtype}"
        )
