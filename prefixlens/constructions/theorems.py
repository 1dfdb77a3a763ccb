"""Petrov, Torr & Bibi (ICLR 2024) §3 as real hooked transformers: one virtual token controls the output.

Each construction is a fixed :class:`~prefixlens.constructions.model.HookedConstruction` (it depends
only on the sizes: N, V, ...) plus a :class:`~prefixlens.SoftPrompt` that selects *what* it does:

=====================  ==========================================  =====================================
construction           what the virtual token(s) choose            model
=====================  ==========================================  =====================================
:class:`Theorem1`      any sequence of N tokens over V (V**N)      1 layer, 1 head, ReLU MLP (N neurons)
:class:`Theorem2`      any map user token -> response token (V**V)  1 layer, 1 head, ReLU MLP (V neurons)
:class:`LongResponse`  any map token -> N0 tokens (N0 virtual tok.)  1 layer, 2 heads
:class:`TwoTokenInput` any map (u0, u1) -> token (V**(V*V))          K+1 layers, 2 heads; the network
                                                                     unpacks base-V digits itself
=====================  ==========================================  =====================================

How they differ from the reference NumPy notebook (reference-spec §5): a residual stream (so no
"positional" or "self" head is needed: the position and the current token are already in the
stream), a causal mask, no sequence-length scaling (the sharpness ``gap`` is folded into ``W_Q``),
the output decoded from one residual coordinate ``z`` by the linear unembedding
``logit_t(z) = 2tz - t^2`` (argmax = round(z)), and **integer codes**: the virtual token stores the
token ids themselves (not ``id / V``), and the selection MLPs use ``ReLU(x + V*onehot - V)``. Every
intermediate value is then an integer that float32 represents exactly, and attention is exactly
one-hot (a score gap of ``gap >= 104`` makes ``exp(-gap)`` underflow to 0 in float32; ``gap = 1000``
also in float64), so the constructions are exact by design, not up to a tolerance.

Limits in float32 (see :func:`decoder_limit`, :func:`max_digits_per_coordinate`):
the decoder's logits ``2tz - t^2`` are exact integers for ``V <= 4097`` (``(V-1)^2 <= 2^24``; at
V = 4098 the bias ``-4097^2`` rounds and token 4097 decodes as 4096);
N is not limited by precision (attention stays exactly one-hot at any length), only by memory;
the two-token construction packs ``K`` base-V digits per coordinate with ``V**K <= 2^22``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from jaxtyping import Int
from torch import Tensor

from prefixlens.constructions.model import ConstructionConfig, HookedConstruction, Layout
from prefixlens.prefixes import SoftPrompt
from prefixlens.signature import signature_of

__all__ = [
    "Theorem1",
    "Theorem2",
    "LongResponse",
    "TwoTokenInput",
    "Construction",
    "theorem1",
    "theorem2",
    "long_response",
    "two_token_input",
    "decoder_limit",
    "max_digits_per_coordinate",
    "reference_two_token_map",
    "count_distinct",
    "DEFAULT_GAP",
]

DEFAULT_GAP = 1000.0
_MANTISSA = {torch.float32: 24, torch.float64: 53}


def _check_dtype(dtype: torch.dtype) -> int:
    if dtype not in _MANTISSA:
        raise TypeError(f"constructions are exact in float32 or float64 only, got {dtype}.")
    return _MANTISSA[dtype]


def decoder_limit(dtype: torch.dtype = torch.float32) -> int:
    """The largest V for which the decoder logits ``2tz - t^2`` (t, z < V) are exact in ``dtype``.

    With ``t, z <= 2^(p/2)``: ``t^2 <= 2^p``, ``2tz`` is even and ``<= 2^(p+1)``, and the logit
    ``t(2z - t)`` lies in ``[-t^2, z^2]``, so every value is representable (float32: V <= 4097;
    at V = 4098 the bias ``-4097^2`` rounds and z = 4097 decodes as 4096)."""
    p = _check_dtype(dtype)
    return math.isqrt(2**p) + 1


def max_digits_per_coordinate(V: int, dtype: torch.dtype = torch.float32) -> int:
    """How many base-V digits one coordinate can hold so that the unpacking stays exact (``V**K <= 2^(p-2)``)."""
    p = _check_dtype(dtype)
    if V < 2:
        raise ValueError(f"V must be >= 2, got {V}.")
    K = 0
    while V ** (K + 1) <= 2 ** (p - 2):
        K += 1
    return K


def count_distinct(outputs: Tensor) -> int:
    """The number of distinct rows of ``outputs`` (flattened after the first dim; 0 for no rows).

    The one definition: :func:`prefixlens.capacity.count_distinct` (distinct completions) is this."""
    if outputs.shape[0] == 0:
        return 0
    return int(torch.unique(outputs.reshape(outputs.shape[0], -1), dim=0).shape[0])


def reference_two_token_map(seed: int, V: int = 10) -> Int[Tensor, "V V"]:
    """The reference notebook's random 2-token map: ``np.random.seed(seed)``, then ``randint(V)`` for
    every key ``chr(i+65)+chr(j+65)`` in order i, j = 0..V-1. Returns ``table[i, j]``."""
    import numpy as np

    state = np.random.RandomState(seed)  # the legacy global generator np.random.seed seeds
    return torch.tensor([[state.randint(V) for _ in range(V)] for _ in range(V)], dtype=torch.long)


# ---------------------------------------------------------------------------------------------
# shared wiring
# ---------------------------------------------------------------------------------------------


@dataclass
class Construction:
    """A built construction: ``model, prefix = construction`` unpacks it."""

    builder: "_Builder"
    prefix: SoftPrompt

    @property
    def model(self) -> HookedConstruction:
        return self.builder.model

    def __iter__(self):
        return iter((self.model, self.prefix))


class _Builder:
    model: HookedConstruction
    V: int

    def _new_model(self, name, layout, n_layers, n_heads, d_head, d_mlp, n_ctx, dtype, device, info):
        cfg = ConstructionConfig(
            n_layers=n_layers,
            n_heads=n_heads,
            d_head=d_head,
            d_model=layout.size,
            d_mlp=d_mlp,
            d_vocab=self.V,
            n_ctx=n_ctx,
            dtype=dtype,
            model_name=name,
            extra=info,
        )
        model = HookedConstruction(cfg, layout)
        model.info = dict(info, construction=name)
        with torch.no_grad():
            for p in range(n_ctx):
                model.W_pos[p, layout.index("pos", p)] = 1.0
            self._set_decoder(model, layout.index("z"))
        return model.to(device)

    def _set_decoder(self, model, z: int) -> None:
        limit = decoder_limit(model.cfg.dtype)
        if self.V > limit and getattr(self, "strict", True):
            raise ValueError(
                f"V = {self.V} exceeds the exact-decoder limit V <= {limit} in {model.cfg.dtype}: the logits "
                f"2tz - t^2 would be rounded. Use float64, or strict=False to build it anyway (Theorem1/2)."
            )
        t = torch.arange(self.V, dtype=torch.float64)
        model.W_U[z] = (2 * t).to(model.cfg.dtype)
        model.b_U[:] = (-t * t).to(model.cfg.dtype)

    @staticmethod
    def _attend_to_position(attn, head: int, layout: Layout, source: int, gap: float, queries=None) -> None:
        """Head ``head`` sends every query position (or those in ``queries``) to position ``source``."""
        n = layout["pos"].stop - layout["pos"].start
        for p in queries if queries is not None else range(n):
            attn.W_Q[head, layout.index("pos", p), 0] = gap
        attn.W_K[head, layout.index("pos", source), 0] = 1.0

    @staticmethod
    def _copy(attn, head: int, layout: Layout, src: str, dst: str) -> None:
        width = layout[src].stop - layout[src].start
        for i in range(width):
            attn.W_V[head, layout.index(src, i), i] = 1.0
            attn.W_O[head, i, layout.index(dst, i)] = 1.0

    def _codes(self, values, shape: tuple[int, ...], what: str) -> Tensor:
        """Validate integer codes in ``[0, V)`` of shape ``shape`` or ``[B, *shape]``."""
        t = torch.as_tensor(values)
        if t.dtype.is_floating_point or t.dtype == torch.bool:
            raise TypeError(f"{what} must hold integer token ids, got dtype {t.dtype}.")
        t = t.long()
        if tuple(t.shape[-len(shape):]) != shape or t.ndim not in (len(shape), len(shape) + 1):
            raise ValueError(f"{what} must have shape {shape} (or [batch, *{shape}]), got {tuple(t.shape)}.")
        if t.numel() and (int(t.min()) < 0 or int(t.max()) >= self.V):
            raise ValueError(f"{what} must hold ids in [0, {self.V}), got min {int(t.min())}, max {int(t.max())}.")
        return t

    def _map_codes(self, mapping, shape, what) -> Tensor:
        if isinstance(mapping, Mapping):
            table = torch.zeros(shape, dtype=torch.long)
            for key, value in mapping.items():
                table[key] = torch.as_tensor(value)
            mapping = table
        return self._codes(mapping, shape, what)

    def _soft_prompt(self, embeddings: Tensor) -> SoftPrompt:
        m = self.model
        return SoftPrompt(embeddings.to(dtype=m.cfg.dtype, device=m.W_E.device), signature_of(m))

    def _with(self, prefix: SoftPrompt) -> Construction:
        return Construction(self, prefix)

    def _generate(self, tokens: Tensor, prefix: SoftPrompt | None, n: int, batch_size: int | None = None) -> Tensor:
        from prefixlens.generation import generate

        tokens = tokens.to(self.model.W_E.device)
        out = generate(self.model, tokens, prefix, max_new_tokens=n, batch_size=batch_size)
        return out[:, tokens.shape[1]:]


# ---------------------------------------------------------------------------------------------
# Theorem 1
# ---------------------------------------------------------------------------------------------


class Theorem1(_Builder):
    """Theorem 1: one virtual token makes the model generate any sequence of N tokens over V.

    Residual stream: ``seq`` (N, the codes a token embedding carries), ``copy`` (N, what the head
    copies from position 0), ``pos`` (one-hot position), ``z`` (the decoded value). The head sends
    every position to position 0 and copies its ``seq``; MLP neuron k fires only at position k+1
    (``ReLU(copy_k + V*pos_{k+1} - V)``) and writes ``copy_k`` to ``z``. With the virtual token at
    slot 0 and any start token at position 1, greedy decoding emits ``target[0..N-1]``.

    ``token_table`` (``[V, N]`` ids) is what a *real* first token carries in ``seq``; default
    ``(t + k) mod V`` (token t makes the model count up from t). Whatever it is, a real first token
    can select at most V of the V**N sequences.
    """

    def __init__(self, N: int, V: int, token_table=None, gap: float = DEFAULT_GAP,
                 dtype: torch.dtype = torch.float32, device=None, strict: bool = True):
        self.strict = strict
        if N < 1 or V < 2:
            raise ValueError(f"need N >= 1 and V >= 2, got N={N}, V={V}.")
        _check_dtype(dtype)
        self.N, self.V, self.gap = N, V, gap
        if token_table is None:
            token_table = (torch.arange(V)[:, None] + torch.arange(N)[None]) % V
        token_table = self._codes(token_table, (V, N), "token_table")
        n_ctx = N + 2  # slot, start token, N generated (the last one is never fed back)
        L = Layout()
        L.add("seq", N), L.add("copy", N), L.add("pos", n_ctx), L.add("z", 1)
        self.model = m = self._new_model("theorem1", L, 1, 1, N, N, n_ctx, dtype, device,
                                         dict(N=N, V=V, gap=gap))
        with torch.no_grad():
            m.W_E[:, L["seq"]] = token_table.to(m.W_E)
            attn, mlp = m.blocks[0].attn, m.blocks[0].mlp
            self._attend_to_position(attn, 0, L, source=0, gap=gap)
            self._copy(attn, 0, L, "seq", "copy")
            for k in range(N):
                mlp.W_in[L.index("copy", k), k] = 1.0
                mlp.W_in[L.index("pos", k + 1), k] = V
                mlp.b_in[k] = -V
                mlp.W_out[k, L.index("z")] = 1.0

    def virtual_token(self, target) -> SoftPrompt:
        """The virtual token(s) for ``target`` ``[N]`` (or ``[batch, N]``: a batched prefix)."""
        target = self._codes(target, (self.N,), "target")
        emb = torch.zeros(*target.shape[:-1], 1, self.model.cfg.d_model, dtype=torch.float64)
        emb[..., 0, self.model.layout["seq"]] = target.double()
        return self._soft_prompt(emb)

    def generate(self, prefix: SoftPrompt, start_token: int = 0, batch_size: int | None = None) -> Int[Tensor, "batch N"]:
        """Greedy generation of N tokens after ``[virtual token, start_token]``."""
        B = prefix.batch_size or 1
        return self._generate(torch.full((B, 1), start_token), prefix, self.N, batch_size)

    def real_token_outputs(self, start_token: int = 0) -> Int[Tensor, "V N"]:
        """What the same model generates with each real token ``t`` in slot 0 instead: row t."""
        tokens = torch.stack([torch.arange(self.V), torch.full((self.V,), start_token)], dim=1)
        return self._generate(tokens, None, self.N)


def theorem1(target, V: int, **kwargs) -> Construction:
    """Theorem 1 for one target sequence (ids in ``[0, V)``): ``model, prefix = theorem1(target, V)``."""
    target = torch.as_tensor(target)
    builder = Theorem1(int(target.shape[-1]), V, **kwargs)
    return builder._with(builder.virtual_token(target))


# ---------------------------------------------------------------------------------------------
# Theorem 2
# ---------------------------------------------------------------------------------------------


class Theorem2(_Builder):
    """Theorem 2: one virtual token makes the model implement any map user token -> response token.

    Residual stream: ``tok`` (one-hot token), ``table`` (V codes a token embedding carries),
    ``copy`` (the table copied from slot 0), ``pos``, ``z``. The head copies the virtual token's
    table to every position; MLP neuron k fires only when the current token is k
    (``ReLU(copy_k + V*tok_k - V)``) and writes ``table[k]`` to ``z``. Input ``[u]`` after the
    virtual token gives ``m(u)``.

    ``token_table`` (``[V, V]``): the map a real token in slot 0 carries; default ``u -> (u + t) mod V``.
    """

    def __init__(self, V: int, token_table=None, gap: float = DEFAULT_GAP,
                 dtype: torch.dtype = torch.float32, device=None, strict: bool = True):
        self.strict = strict
        if V < 2:
            raise ValueError(f"need V >= 2, got {V}.")
        _check_dtype(dtype)
        self.V, self.gap = V, gap
        if token_table is None:
            token_table = (torch.arange(V)[:, None] + torch.arange(V)[None]) % V
        token_table = self._codes(token_table, (V, V), "token_table")
        n_ctx = 3
        L = Layout()
        L.add("tok", V), L.add("table", V), L.add("copy", V), L.add("pos", n_ctx), L.add("z", 1)
        self.model = m = self._new_model("theorem2", L, 1, 1, V, V, n_ctx, dtype, device, dict(V=V, gap=gap))
        with torch.no_grad():
            m.W_E[:, L["tok"]] = torch.eye(V, dtype=m.cfg.dtype)
            m.W_E[:, L["table"]] = token_table.to(m.W_E)
            attn, mlp = m.blocks[0].attn, m.blocks[0].mlp
            self._attend_to_position(attn, 0, L, source=0, gap=gap)
            self._copy(attn, 0, L, "table", "copy")
            for k in range(V):
                mlp.W_in[L.index("copy", k), k] = 1.0
                mlp.W_in[L.index("tok", k), k] = V
                mlp.b_in[k] = -V
                mlp.W_out[k, L.index("z")] = 1.0

    def virtual_token(self, mapping) -> SoftPrompt:
        """The virtual token for ``mapping``: ``[V]`` ids (``mapping[u] = m(u)``), ``[batch, V]``, or a
        dict ``{u: m(u)}`` (missing keys map to 0)."""
        table = self._map_codes(mapping, (self.V,), "mapping")
        emb = torch.zeros(*table.shape[:-1], 1, self.model.cfg.d_model, dtype=torch.float64)
        emb[..., 0, self.model.layout["table"]] = table.double()
        return self._soft_prompt(emb)

    def apply(self, prefix: SoftPrompt, inputs=None) -> Int[Tensor, "batch n_inputs"]:
        """``m(u)`` for every ``u`` in ``inputs`` (default all V), by greedy generation; one row per prefix."""
        inputs = torch.arange(self.V) if inputs is None else self._codes(inputs, (len(inputs),), "inputs")
        B = prefix.batch_size or 1
        if prefix.batched:  # one prefix per row: repeat each prefix for every input
            emb = prefix.embeddings.detach().repeat_interleave(len(inputs), dim=0)
            prefix = SoftPrompt(emb, prefix.signature)
        tokens = inputs.repeat(B)[:, None]
        return self._generate(tokens, prefix, 1).reshape(B, len(inputs))

    def real_token_outputs(self) -> Int[Tensor, "V V"]:
        """Row t: the map ``u -> output`` the same model implements with real token t in slot 0."""
        t, u = torch.meshgrid(torch.arange(self.V), torch.arange(self.V), indexing="ij")
        tokens = torch.stack([t.reshape(-1), u.reshape(-1)], dim=1)
        return self._generate(tokens, None, 1).reshape(self.V, self.V)


def theorem2(mapping, V: int, **kwargs) -> Construction:
    """Theorem 2 for one map: ``model, prefix = theorem2(mapping, V)``."""
    builder = Theorem2(V, **kwargs)
    return builder._with(builder.virtual_token(mapping))


# ---------------------------------------------------------------------------------------------
# Extension: longer responses (N0 virtual tokens)
# ---------------------------------------------------------------------------------------------


class LongResponse(_Builder):
    """A response of ``N0`` tokens per user token, from ``N0`` virtual tokens (reference-spec §5.3).

    Virtual token k holds the table ``u -> m(u)[k]``. Head 0 sends position ``N0 + k`` (where
    response token k is predicted) to slot k and copies its table; head 1 copies the user token (at
    position N0) to every later position. The MLP then looks up ``table_k[u]`` as in Theorem 2.
    """

    def __init__(self, V: int, N0: int, token_table=None, gap: float = DEFAULT_GAP,
                 dtype: torch.dtype = torch.float32, device=None):
        if V < 2 or N0 < 1:
            raise ValueError(f"need V >= 2 and N0 >= 1, got V={V}, N0={N0}.")
        _check_dtype(dtype)
        self.V, self.N0, self.gap = V, N0, gap
        if token_table is None:
            token_table = (torch.arange(V)[:, None] + torch.arange(V)[None]) % V
        token_table = self._codes(token_table, (V, V), "token_table")
        n_ctx = 2 * N0 + 1
        L = Layout()
        L.add("tok", V), L.add("table", V), L.add("copy", V), L.add("user", V), L.add("pos", n_ctx), L.add("z", 1)
        self.model = m = self._new_model("long_response", L, 1, 2, max(V, N0), V, n_ctx, dtype, device,
                                         dict(V=V, N0=N0, gap=gap))
        with torch.no_grad():
            m.W_E[:, L["tok"]] = torch.eye(V, dtype=m.cfg.dtype)
            m.W_E[:, L["table"]] = token_table.to(m.W_E)
            attn, mlp = m.blocks[0].attn, m.blocks[0].mlp
            for k in range(N0):  # head 0: position N0 + k reads slot k
                attn.W_Q[0, L.index("pos", N0 + k), k] = gap
                attn.W_K[0, L.index("pos", k), k] = 1.0
            self._copy(attn, 0, L, "table", "copy")
            self._attend_to_position(attn, 1, L, source=N0, gap=gap)  # head 1: read the user token
            self._copy(attn, 1, L, "tok", "user")
            for k in range(V):
                mlp.W_in[L.index("copy", k), k] = 1.0
                mlp.W_in[L.index("user", k), k] = V
                mlp.b_in[k] = -V
                mlp.W_out[k, L.index("z")] = 1.0

    def virtual_tokens(self, mapping) -> SoftPrompt:
        """``N0`` virtual tokens for ``mapping`` ``[V, N0]`` (row u = the response to u), or
        ``[batch, V, N0]``, or a dict ``{u: [N0 ids]}`` (missing keys respond with zeros)."""
        table = self._map_codes(mapping, (self.V, self.N0), "mapping")
        emb = torch.zeros(*table.shape[:-2], self.N0, self.model.cfg.d_model, dtype=torch.float64)
        emb[..., self.model.layout["table"]] = table.transpose(-1, -2).double()
        return self._soft_prompt(emb)

    def respond(self, prefix: SoftPrompt, inputs=None) -> Int[Tensor, "batch n_inputs N0"]:
        """The N0-token responses to every ``u`` in ``inputs`` (default all V)."""
        inputs = torch.arange(self.V) if inputs is None else self._codes(inputs, (len(inputs),), "inputs")
        B = prefix.batch_size or 1
        if prefix.batched:
            prefix = SoftPrompt(prefix.embeddings.detach().repeat_interleave(len(inputs), dim=0), prefix.signature)
        out = self._generate(inputs.repeat(B)[:, None], prefix, self.N0)
        return out.reshape(B, len(inputs), self.N0)


def long_response(mapping, V: int, N0: int, **kwargs) -> Construction:
    """The longer-response extension for one map ``[V, N0]``: ``model, prefix = long_response(...)``."""
    builder = LongResponse(V, N0, **kwargs)
    return builder._with(builder.virtual_tokens(mapping))


# ---------------------------------------------------------------------------------------------
# Extension: two user tokens, the table packed in base V and unpacked by the network
# ---------------------------------------------------------------------------------------------


class TwoTokenInput(_Builder):
    """Any map ``(u0, u1) -> token`` from one virtual token of ``V * ceil(V / K)`` packed numbers.

    Row i of the table (``m(i, 0..V-1)``) is cut into chunks of K columns; each chunk is stored
    as one integer ``sum_b m(i, cK+b) * V**(K_c-1-b)`` in coordinate ``(i, c)`` of the virtual
    token. The network unpacks it with exact integer arithmetic:

    - block 0, attention: head 0 copies the packed table from slot 0, head 1 copies ``u0`` (at
      position 1) into the ``u0`` subspace; MLP: ``r_c = ReLU(packed[i,c] + B*u0_i - B)`` summed
      over i selects row ``u0`` (``B = V**K``);
    - blocks 1..K-1 (attention off): block 1+b extracts digit b of every chunk with unit steps
      ``s_n = ReLU(x - n*w + 1) - ReLU(x - n*w)`` (exactly 0 or 1 on integers), ``n = 1..V-1``,
      where ``x = r_c - sum_{b'<b} w_{b'} * digit_{b'}`` is the remainder and ``w = V**(K_c-1-b)``;
      digit b is ``sum_n s_n`` and the last digit is the final remainder (both linear in the stream);
    - block K: the lookup ``ReLU(digit_j + V*u1_j - V)`` summed into ``z``, then the decoder.

    Every intermediate is an integer of magnitude at most ``2 B <= 2^(p-1)``, so the result is exact
    for every map when ``V**K <= 2^(p-2)`` (:func:`max_digits_per_coordinate`; float32, V = 10:
    K <= 6, i.e. 2 numbers per row; the reference's one number per row needs 10 digits, which
    float32 cannot hold). ``K = 1`` stores the table unpacked (V*V coordinates, 2 layers).
    Input ``[u0, u1]`` after the virtual token gives ``m(u0, u1)`` at position 2.
    """

    def __init__(self, V: int = 10, digits_per_coordinate: int | None = None, token_table=None,
                 gap: float = DEFAULT_GAP, dtype: torch.dtype = torch.float32, device=None):
        if V < 2:
            raise ValueError(f"need V >= 2, got {V}.")
        K_max = max_digits_per_coordinate(V, dtype)
        K = min(K_max, V) if digits_per_coordinate is None else int(digits_per_coordinate)
        if not 1 <= K <= min(K_max, V):
            raise ValueError(
                f"digits_per_coordinate must be in [1, {min(K_max, V)}] for V={V} in {dtype} "
                f"(V**K <= 2^{_check_dtype(dtype) - 2} keeps the unpacking exact), got {K}."
            )
        self.V, self.K, self.gap = V, K, gap
        self.C = C = -(-V // K)
        self.chunks = [list(range(c * K, min(V, (c + 1) * K))) for c in range(C)]
        if token_table is None:
            i, j = torch.meshgrid(torch.arange(V), torch.arange(V), indexing="ij")
            token_table = (i[None] + j[None] + torch.arange(V)[:, None, None]) % V
        token_table = self._codes(token_table, (V, V, V), "token_table")
        n_ctx = 4  # slot, u0, u1, answer
        L = Layout()
        L.add("tok", V), L.add("packed", V * C), L.add("pcopy", V * C), L.add("u0", V), L.add("pos", n_ctx)
        L.add("r", C)
        self._step_index: dict[tuple[int, int, int], int] = {}
        n_steps = sum((len(cols) - 1) * (V - 1) for cols in self.chunks)
        if n_steps:
            L.add("steps", n_steps)
        for c, cols in enumerate(self.chunks):
            for b in range(len(cols) - 1):
                for n in range(1, V):
                    self._step_index[(c, b, n)] = L.index("steps", len(self._step_index))
        L.add("z", 1)
        d_mlp = max(V * C, 2 * (V - 1) * C, V)
        self.model = m = self._new_model("two_token_input", L, K + 1, 2, max(V * C, V), d_mlp, n_ctx, dtype,
                                         device, dict(V=V, K=K, gap=gap))
        B = V ** K
        with torch.no_grad():
            m.W_E[:, L["tok"]] = torch.eye(V, dtype=m.cfg.dtype)
            m.W_E[:, L["packed"]] = self._pack(token_table).to(m.W_E)
            attn, mlp = m.blocks[0].attn, m.blocks[0].mlp
            self._attend_to_position(attn, 0, L, source=0, gap=gap)
            self._copy(attn, 0, L, "packed", "pcopy")
            self._attend_to_position(attn, 1, L, source=1, gap=gap)
            self._copy(attn, 1, L, "tok", "u0")
            for i in range(V):  # select row u0
                for c in range(C):
                    h = i * C + c
                    mlp.W_in[L.index("pcopy", h), h] = 1.0
                    mlp.W_in[L.index("u0", i), h] = B
                    mlp.b_in[h] = -B
                    mlp.W_out[h, L.index("r", c)] = 1.0
            for b in range(K - 1):  # block 1 + b extracts digit b of every chunk
                mlp = m.blocks[1 + b].mlp
                h = 0
                for c, cols in enumerate(self.chunks):
                    if b >= len(cols) - 1:
                        continue
                    w = V ** (len(cols) - 1 - b)
                    for n in range(1, V):
                        for neuron, bias, sign in ((h, 1.0, 1.0), (h + 1, 0.0, -1.0)):
                            self._write_remainder(mlp.W_in[:, neuron], c, b)
                            mlp.b_in[neuron] = bias - n * w
                            mlp.W_out[neuron, self._step_index[(c, b, n)]] = sign
                        h += 2
            mlp = m.blocks[K].mlp  # lookup m(u0, u1)
            for c, cols in enumerate(self.chunks):
                for b, j in enumerate(cols):
                    self._write_digit(mlp.W_in[:, j], c, b)
                    mlp.W_in[L.index("tok", j), j] = V
                    mlp.b_in[j] = -V
                    mlp.W_out[j, L.index("z")] = 1.0

    def _write_remainder(self, column: Tensor, c: int, b: int) -> None:
        """``column · resid`` = ``r_c - sum_{b'<b} w_{b'} digit_{b'}`` (the remainder before digit b)."""
        cols = self.chunks[c]
        column[self.model.layout.index("r", c)] = 1.0
        for bp in range(b):
            w = self.V ** (len(cols) - 1 - bp)
            for n in range(1, self.V):
                column[self._step_index[(c, bp, n)]] = -w

    def _write_digit(self, column: Tensor, c: int, b: int) -> None:
        """``column · resid`` = digit b of chunk c of the selected row."""
        if b == len(self.chunks[c]) - 1:
            self._write_remainder(column, c, b)
        else:
            for n in range(1, self.V):
                column[self._step_index[(c, b, n)]] = 1.0

    def _pack(self, tables: Int[Tensor, "*batch V V"]) -> Tensor:
        """``[*, V, V]`` tables -> ``[*, V*C]`` packed integers (exact, in float64)."""
        out = torch.zeros(*tables.shape[:-2], self.V, self.C, dtype=torch.float64)
        for c, cols in enumerate(self.chunks):
            acc = torch.zeros(tables.shape[:-1], dtype=torch.long)
            for j in cols:
                acc = acc * self.V + tables[..., j]
            out[..., c] = acc.double()
        return out.reshape(*tables.shape[:-2], self.V * self.C)

    def virtual_token(self, mapping) -> SoftPrompt:
        """The virtual token for ``mapping`` ``[V, V]`` (``mapping[u0, u1]``), ``[batch, V, V]``, or a
        dict ``{(u0, u1): id}`` (missing keys map to 0)."""
        table = self._map_codes(mapping, (self.V, self.V), "mapping")
        emb = torch.zeros(*table.shape[:-2], 1, self.model.cfg.d_model, dtype=torch.float64)
        emb[..., 0, self.model.layout["packed"]] = self._pack(table)
        return self._soft_prompt(emb)

    def apply(self, prefix: SoftPrompt) -> Int[Tensor, "batch V V"]:
        """The table ``[u0, u1] -> output`` the model implements with ``prefix`` (all V*V inputs)."""
        V = self.V
        u0, u1 = torch.meshgrid(torch.arange(V), torch.arange(V), indexing="ij")
        inputs = torch.stack([u0.reshape(-1), u1.reshape(-1)], dim=1)
        B = prefix.batch_size or 1
        if prefix.batched:
            prefix = SoftPrompt(prefix.embeddings.detach().repeat_interleave(V * V, dim=0), prefix.signature)
        return self._generate(inputs.repeat(B, 1), prefix, 1).reshape(B, V, V)

    def real_token_outputs(self) -> Int[Tensor, "V V V"]:
        """Entry ``[t, u0, u1]``: the output with real token t in slot 0 instead of the virtual token."""
        V = self.V
        grid = torch.cartesian_prod(torch.arange(V), torch.arange(V), torch.arange(V))
        return self._generate(grid, None, 1).reshape(V, V, V)


def two_token_input(mapping, V: int = 10, **kwargs) -> Construction:
    """The two-user-token extension for one ``[V, V]`` map: ``model, prefix = two_token_input(...)``."""
    builder = TwoTokenInput(V, **kwargs)
    return builder._with(builder.virtual_token(mapping))
