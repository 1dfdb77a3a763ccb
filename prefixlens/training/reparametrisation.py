"""Li & Liang's MLP reparametrisation of a prefix."""

from __future__ import annotations

import torch
from torch import nn

from prefixlens.prefixes import KVPrefix, Prefix, ResidualPrefix
from prefixlens.signature import model_dtype_device, signature_of

__all__ = ["PrefixMLP"]


class PrefixMLP(nn.Module):
    """Li & Liang's reparametrisation: a small table ``[P, d_small]`` through an MLP gives the prefix.

    Residual form: ``[P, d_small] -> [P, n_layers·d_model]``; KV form: ``-> [P, 2·n_layers·n_kv·d_head]``.
    Call ``prefix()`` for the (differentiable) prefix, ``prefix().detach_copy`` via :meth:`export`.
    """

    def __init__(self, model, length: int, form: str = "residual", d_small: int = 64, hidden: int = 256, seed: int = 0):
        super().__init__()
        if form not in ("residual", "kv"):
            raise ValueError(f"the MLP reparametrisation supports form 'residual' or 'kv', got {form!r}.")
        s = signature_of(model)
        dtype, device = model_dtype_device(model)
        self.form, self.length, self.sig = form, length, s
        out = s.n_layers * s.d_model if form == "residual" else 2 * s.n_layers * s.n_kv_heads * s.d_head
        g = torch.Generator().manual_seed(seed)
        self.table = nn.Parameter(torch.randn(length, d_small, generator=g, dtype=torch.float64).to(dtype=dtype, device=device))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.mlp = nn.Sequential(nn.Linear(d_small, hidden), nn.Tanh(), nn.Linear(hidden, out)).to(dtype=dtype, device=device)

    def prefix(self) -> Prefix:
        s = self.sig
        flat = self.mlp(self.table)  # [P, out]
        if self.form == "residual":
            return ResidualPrefix(flat.reshape(self.length, s.n_layers, s.d_model).transpose(0, 1), s)
        kv = flat.reshape(self.length, 2, s.n_layers, s.n_kv_heads, s.d_head).permute(1, 2, 0, 3, 4)
        return KVPrefix(kv[0], kv[1], s)

    def export(self) -> Prefix:
        """The trained prefix as plain tensors (the MLP is no longer needed)."""
        with torch.no_grad():
            p = self.prefix()
        cls = type(p)
        return cls(**{n: getattr(p, n).detach().clone() for n in p.tensor_names}, signature=p.signature)
