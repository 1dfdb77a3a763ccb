"""The prefix forms: torch modules whose tensors are the prefix; the model stays frozen and untouched.

Every form is injected the same way (see :mod:`prefixlens.injection`): the model runs on
``P`` placeholder tokens followed by the content, and at one HookPoint per layer the placeholder
positions ``0..P-1`` are overwritten with the prefix. Which HookPoint defines the form:

==================  ==================================  ===============================================
form                HookPoint overwritten at slots      tensor shape (one prefix; a batch adds ``B``)
==================  ==================================  ===============================================
``KVPrefix``        ``blocks.{L}.attn.hook_k``, ``hook_v``  keys, values ``[n_layers, P, n_kv_heads, d_head]``
``ResidualPrefix``  ``blocks.{L}.hook_resid_pre``      ``[n_layers, P, d_model]``
``SoftPrompt``      ``embed.hook_out`` (see below)      ``[P, d_model]``
==================  ==================================  ===============================================

**Soft-prompt space.** ``SoftPrompt.embeddings`` live where HuggingFace's ``inputs_embeds`` do: the
output of the model's input embedding module (``get_input_embeddings()``), *before* anything the family
applies to it afterwards (Bloom's ``word_embeddings_layernorm``) and *after* what the embedding module
itself applies (Gemma's √d scaling is inside its embedding module). So a soft prompt of rows ``R`` runs
exactly as ``hf_model(inputs_embeds=cat([R, embed(content)]))``. The HookPoint is ``embed.hook_out``
(:func:`soft_prompt_hook`; TransformerLens's ``hook_embed`` is an alias of it on every family but Bloom,
where it is the layer norm's output).

**Key convention.** ``KVPrefix.keys`` are stored as they appear at ``hook_k``: after ``W_K`` (and
``b_K``), *before* rotary. The model itself rotates them at positions ``0..P-1``, exactly as it
rotates the keys of a real prompt of length ``P``. Keys that are already rotated (HuggingFace / PEFT
caches) are un-rotated on import (:meth:`KVPrefix.from_peft`).

A prefix tensor may carry a leading batch dimension (one prefix per example, e.g. a batch of soft
tokens); then the content batch must have the same size.
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from collections.abc import Callable
from typing import ClassVar

import torch
from jaxtyping import Float, Integer
from torch import Tensor, nn

from prefixlens.runtime import cached_run, check_not_attached, check_token_ids, evaluation_mode, thread_hooks
from prefixlens.serialization import CorruptFileError, load_tensors, save_tensors
from prefixlens.signature import ModelSignature, model_dtype_device, signature_of
from prefixlens.text import chat_ids, tokens_and_mask

__all__ = [
    "Prefix",
    "KVPrefix",
    "ResidualPrefix",
    "SoftPrompt",
    "FORMS",
    "form_class",
    "soft_prompt_hook",
    "input_embeddings",
    "input_embedding_std",
]

Hook = tuple[str, Callable]
FORMAT_VERSION = "2"  # 2: the signature carries a weights fingerprint and the file a checksum

# The one registry of prefix forms, short name -> class ("kv", "residual", "soft"). A form registers
# itself by declaring ``name`` on its class (``Prefix.__init_subclass__``); every other lookup
# (``capacity.FORMS``, ``training.PREFIX_FORMS``, ``text.chat_prefix``, the analyses) is this dict or
# :func:`form_class`.
FORMS: dict[str, type[Prefix]] = {}


def form_class(name: str | type[Prefix]) -> type[Prefix]:
    """The prefix form called ``name``: its short name (``"kv"``, ``"residual"``, ``"soft"``), its class
    name (``"KVPrefix"``, what prefix files record), or the class itself. Raises ``ValueError`` naming
    the valid names."""
    if isinstance(name, type) and name in FORMS.values():
        return name
    if isinstance(name, str):
        if name in FORMS:
            return FORMS[name]
        for cls in FORMS.values():
            if name == cls.form:
                return cls
    raise ValueError(
        f"form must be one of {sorted(FORMS)} (or a class name: {sorted(c.form for c in FORMS.values())}), "
        f"got {name!r}."
    )


def _as_tensor_attr(module: nn.Module, name: str, value: Tensor) -> None:
    """Leaf tensors become trainable ``nn.Parameter``s; computed tensors (e.g. the output of a
    reparametrisation MLP) are kept as they are so gradients flow back to what produced them."""
    if isinstance(value, nn.Parameter) or value.grad_fn is None:
        setattr(module, name, nn.Parameter(value.detach().clone() if not isinstance(value, nn.Parameter) else value))
    else:
        setattr(module, name, value)


_INTEGER_DTYPES = (
    torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8, torch.uint16, torch.uint32, torch.uint64
)


def _require_weights(model, what: str, fix: str = "Load") -> None:
    """Refuse a model whose weights are on the meta device: they have shapes but no values, so
    anything computed from them is meaningless. (A model whose meta weights are loaded on the fly
    by accelerate's offloading hooks is left alone.)"""
    meta = [n for n, t in (*model.named_parameters(), *model.named_buffers()) if t.is_meta]
    if meta and not any(hasattr(m, "_hf_hook") for m in model.modules()):
        raise ValueError(
            f"{what}: the model is on the meta device ({len(meta)} weight tensors, e.g. {meta[0]!r}, have a "
            f"shape but no values), so the result would be meaningless. {fix} real weights first: build "
            f"or load the model on a real device (e.g. prefixlens.models.load(path, device='cpu')), or "
            f"model.to_empty(device='cpu') followed by model.load_state_dict(...)."
        )


def _prompt_tokens(model, tokens, where: str = "from_prompt", prepend_bos: bool | None = None) -> tuple[Tensor, bool]:
    """Check a prompt for ``from_prompt``; returns ``[batch, P]`` int64 ids on the model's device
    and whether the prompt was batched.

    A prompt is ``[P]`` or ``[batch, P]`` ids of any integer dtype (converted to int64), or text: a
    string (one prefix) or a list of strings (one prefix per example), encoded by
    :func:`prefixlens.text.tokens_and_mask` as the start of a sequence (``prepend_bos=None``: the
    model's default, i.e. BOS iff the checkpoint's tokenizer adds one). Strings of different token
    lengths are refused: prefix slots cannot be padded. The ids must fit the model (``check_tokens``,
    as for ``run_with_prefix``) and the model must have weights (not the meta device). Every error
    names the prompt and the call.
    """
    _require_weights(model, where)
    one_string = isinstance(tokens, str)
    try:
        tokens, mask = tokens_and_mask(model, tokens, prepend_bos=prepend_bos)
    except (TypeError, ValueError) as e:
        raise type(e)(f"{where}: {e}") from None
    if mask is not None:
        lengths = mask.sum(1).tolist()
        raise ValueError(
            f"{where}: the prompts encode to different numbers of tokens ({lengths}); a batched prefix needs "
            f"prompts of equal token length, since prefix slots cannot be padded. Make one prefix per prompt "
            f"(and run each with its own content), or pass equal-length prompts."
        )
    if one_string:
        tokens = tokens[0]  # one prompt: an unbatched prefix
    if not isinstance(tokens, Tensor):
        try:
            tokens = torch.as_tensor(tokens)
        except (TypeError, ValueError, RuntimeError) as e:
            raise TypeError(
                f"{where}: the prompt tokens must be a tensor or a (rectangular) list of integer ids; "
                f"got a {type(tokens).__name__} torch cannot read as one ({e})."
            ) from None
    if tokens.dtype not in _INTEGER_DTYPES:
        raise TypeError(
            f"{where}: prompt tokens must be integer ids, got dtype {tokens.dtype}; pass token ids "
            f"(e.g. tokenizer(text, return_tensors='pt').input_ids), not embeddings or a mask."
        )
    if tokens.ndim not in (1, 2) or 0 in tokens.shape:
        raise ValueError(
            f"{where}: prompt tokens must be [P] (one prefix) or [batch, P] (one prefix per example) with "
            f"batch >= 1 and P >= 1, got shape {tuple(tokens.shape)}."
        )
    batched = tokens.ndim == 2
    _check_length(model, tokens.shape[-1])
    # any integer dtype: the range check below runs on int64 (an out-of-range uint64 turns negative)
    tokens = tokens.to(device=model_dtype_device(model)[1], dtype=torch.long)
    try:
        tokens = check_token_ids(model, tokens)
    except (TypeError, ValueError) as e:
        raise type(e)(f"{where}: the prompt tokens do not fit this model: {e}") from None
    return tokens, batched


class Prefix(nn.Module):
    """Base class of the prefix forms.

    A form declares on its class its registry ``name`` (``"kv"``, ``"residual"``, ``"soft"``: the
    ``form=`` argument of training, capacity and ``chat_prefix``), its ``tensor_names`` (the tensors
    that make the prefix, in constructor order) and the dimensions below, and defines
    ``injection_hooks``. Declaring ``name`` registers the class in :data:`FORMS` (look forms up with
    :func:`form_class`). ``form``, the class name, is what error messages and prefix files say.

    ``content_bos``: the BOS policy of text after this prefix, as it was trained (``True``: a BOS after
    the prefix; ``False``: none; ``None``: not recorded, e.g. a prefix from a prompt: no BOS). Set by
    :func:`prefixlens.train_prefix` on text, kept by :meth:`save` / :meth:`load`, ``to_kv`` and
    ``batch_slice``, and applied by every entry point that takes text after a prefix
    (:func:`prefixlens.text.content_prepend_bos`; an explicit ``prepend_bos=`` wins).
    """

    name: ClassVar[str]  # the short name in FORMS
    form: ClassVar[str]  # the class name: error messages, and the "form" a prefix file records
    tensor_names: ClassVar[tuple[str, ...]]
    _unbatched_ndim: ClassVar[int]  # dims of one prefix's tensors
    _per_layer_ndim: ClassVar[int]  # dims of what one injection hook writes for one prefix ([P, ...])
    _slot_dim: ClassVar[int]  # the (negative) dim that indexes the P slots

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        if "name" not in cls.__dict__:  # an intermediate base (or a variant of a form): not registered
            return
        if not isinstance(cls.name, str) or not cls.name:
            raise TypeError(f"{cls.__qualname__}.name must be a non-empty string, got {cls.name!r}.")
        if "tensor_names" not in cls.__dict__:
            raise TypeError(f"prefix form {cls.__qualname__} declares name={cls.name!r} but no tensor_names.")
        taken = FORMS.get(cls.name)
        if taken is not None and taken.__qualname__ != cls.__qualname__:  # (re-running a class body replaces it)
            raise ValueError(f"prefix form name {cls.name!r} is taken by {taken.__qualname__}.")
        cls.form = cls.__name__
        cls._tensor_names = cls.tensor_names  # the former private name, for code written before
        FORMS[cls.name] = cls

    def __init__(self, signature: ModelSignature):
        super().__init__()
        self.signature = signature
        self.content_bos: bool | None = None

    def _keeps_policy(self, other: "Prefix") -> "Prefix":
        """``other`` (made from this prefix) with this prefix's ``content_bos``."""
        other.content_bos = self.content_bos
        return other

    # ---- shape -------------------------------------------------------------------------------
    @property
    def _main(self) -> Tensor:
        return getattr(self, self.tensor_names[0])

    @property
    def batched(self) -> bool:
        """Whether the prefix carries a leading batch dimension (one prefix per example)."""
        return self._main.ndim == self._unbatched_ndim + 1

    @property
    def batch_size(self) -> int | None:
        return self._main.shape[0] if self.batched else None

    @property
    def length(self) -> int:
        """P, the number of prefix slots."""
        return self._main.shape[self._slot_dim]

    @property
    def dtype(self) -> torch.dtype:
        return self._main.dtype

    @property
    def device(self) -> torch.device:
        return self._main.device

    @classmethod
    def from_chat(cls, model, system) -> "Prefix":
        """This form of prefix holding a system prompt (a string) or leading chat turns (a list of
        ``{"role", "content"}`` messages) as the tokenizer's chat template renders them; follow it with
        :func:`prefixlens.text.chat_continuation`. See :func:`prefixlens.text.chat_prefix`.

        Args:
            model (TransformerBridge): a model with a tokenizer that has a chat template.
            system (str | list[dict]): a system prompt, or the leading chat turns as ``{"role", "content"}``
                messages.
        """
        if getattr(cls, "name", None) is None:  # Prefix itself, or an intermediate base
            raise TypeError(f"call from_chat on a prefix form: {', '.join(c.form for c in FORMS.values())}.")
        ids = chat_ids(model, system, add_generation_prompt=False)
        return cls.from_prompt(model, torch.tensor(ids, device=model.cfg.device))

    def batch_slice(self, rows: slice | Tensor) -> "Prefix":
        """The prefixes of the selected batch rows (a batched prefix only); shares storage."""
        if not self.batched:
            raise ValueError(f"batch_slice needs a batched {self.form}; this one has no batch dimension.")
        return self._keeps_policy(type(self)(**{n: getattr(self, n)[rows] for n in self.tensor_names}, signature=self.signature))

    def n_parameters(self) -> int:
        """The number of scalars in the prefix (what a training run optimises)."""
        return sum(getattr(self, n).numel() for n in self.tensor_names)

    def _check_shapes(self) -> None:
        for name in self.tensor_names:
            t = getattr(self, name)
            if t.ndim not in (self._unbatched_ndim, self._unbatched_ndim + 1):
                raise ValueError(
                    f"{self.form}.{name} must have {self._unbatched_ndim} dims (or one more for a batch), "
                    f"got shape {tuple(t.shape)}."
                )
            if not t.is_floating_point():
                raise TypeError(f"{self.form}.{name} must be a floating-point tensor, got {t.dtype}.")
        if self.length < 1:
            raise ValueError(f"{self.form} needs at least one slot (P >= 1), got P = 0.")

    def _expand(self, t: Tensor, batch: int) -> Tensor:
        """``[P, ...]`` or ``[B, P, ...]`` → ``[batch, P, ...]``."""
        if t.ndim == self._per_layer_ndim:
            return t.unsqueeze(0).expand(batch, *t.shape)
        return t

    # ---- checks ------------------------------------------------------------------------------
    def validate(self, model) -> None:
        """Raise a clear error if this prefix cannot be used with ``model``.

        Shapes, dtype and device only (cheap enough for every forward pass). The weights
        fingerprint is checked where a prefix meets a model from disk (:meth:`load`), not here:
        in memory, running a prefix on other weights of the same shapes is a legitimate experiment.
        """
        theirs = signature_of(model, weights=False)
        problems = self.signature.mismatches(theirs)
        if problems:
            raise ValueError(
                f"This {self.form} was made for a different model: " + "; ".join(problems) + ". "
                f"Build or train a prefix for this model (e.g. {self.form}.random(model, length))."
            )
        dtype, device = model_dtype_device(model)
        if self.dtype != dtype:
            raise TypeError(
                f"dtype mismatch: the {self.form} is {self.dtype} but the model runs in {dtype}; "
                f"call prefix.to({dtype}) (or convert the model)."
            )
        if self.device.type != device.type or (
            self.device.index is not None and device.index is not None and self.device.index != device.index
        ):
            raise ValueError(
                f"device mismatch: the {self.form} is on {self.device} but the model is on {device}; "
                f"call prefix.to('{device}')."
            )

    # ---- injection ---------------------------------------------------------------------------
    def injection_hooks(self, model=None) -> list[Hook]:
        """``(hook_name, fn)`` pairs that write the prefix into slots ``0..P-1`` of ``model`` (the hook
        names of a :class:`SoftPrompt` depend on the model, so it needs one; the other forms do not)."""
        raise NotImplementedError

    def position_hooks(self, model) -> list:
        """Handles of hooks that remap the model's positions while the prefix is attached (none:
        slots at ``0..P-1``, content from ``P``); see :meth:`KVPrefix.from_prompt` with ``keep=``."""
        return []

    def _overwrite(self, value: Callable[[], Tensor]) -> Callable:
        P = self.length

        def hook(act: Tensor, hook) -> Tensor:
            v = self._expand(value(), act.shape[0])
            if v.shape[0] != act.shape[0]:
                raise ValueError(
                    f"batch mismatch: the {self.form} holds {v.shape[0]} prefixes but the input batch is "
                    f"{act.shape[0]}; use an unbatched prefix or a content batch of {v.shape[0]}."
                )
            if tuple(v.shape[1:]) != (P, *act.shape[2:]):
                raise ValueError(
                    f"{self.form} slot shape {tuple(v.shape[1:])} does not fit {hook.name} "
                    f"activation {tuple(act.shape)} (P = {P})."
                )
            return torch.cat([v.to(act.dtype), act[:, P:]], dim=1)

        return hook

    # ---- persistence -------------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> None:
        """Write the prefix to a safetensors file (atomically; through a symlink), with the model's
        signature (shapes and weights fingerprint), its ``content_bos`` policy and a checksum of the content."""
        meta = {
            "prefixlens_format": FORMAT_VERSION,
            "form": self.form,
            "signature": self.signature.to_json(),
            "key_convention": "hook_k (pre-rotary)",
        }
        if self.content_bos is not None:
            meta["content_bos"] = "true" if self.content_bos else "false"
        save_tensors(path, {n: getattr(self, n) for n in self.tensor_names}, meta)

    @classmethod
    def load(cls, path: str | os.PathLike, model, device=None, allow_other_weights: bool = False) -> "Prefix":
        """Read a prefix written by :meth:`save`, refusing one made for another model.

        Called on :class:`Prefix` it returns whichever form the file holds, in the model's dtype and on
        its device. The same weights in another dtype are the same model: a prefix saved on float32
        weights loads on their bfloat16 or float16 conversion (and the reverse), its tensors converted
        (the signature records the weights' fingerprint as converted to each dtype). Refused, with an error
        naming the file: a model of other shapes (always); other weights of the same shapes
        (the signature's weights fingerprint differs; ``allow_other_weights=True`` loads it anyway,
        e.g. to transfer a prefix to a fine-tuned model, and the prefix keeps the fingerprint of the
        model it was made for); a damaged file (checksum), a missing or unknown tensor, malformed
        metadata, a directory or a non-safetensors file. A file written before fingerprints
        (format 1) loads with a warning, as made for ``model`` (re-save it to record that);
        ``allow_other_weights=True`` silences the warning.
        """
        try:
            tensors, meta = load_tensors(path)
        except CorruptFileError as e:
            raise CorruptFileError(f"cannot load a prefix: {e}") from None
        form = meta.get("form")
        try:  # files record the class name ("KVPrefix"); the short name ("kv") is accepted too
            target = form_class(form) if isinstance(form, str) else None
        except ValueError:
            target = None
        if target is None:
            raise ValueError(
                f"{path} is not a prefixlens prefix file (metadata form={form!r}, expected one of "
                f"{sorted(c.form for c in FORMS.values())}); pass a file written by Prefix.save."
            )
        form = target.form
        if cls is not Prefix and cls is not target:
            raise TypeError(f"{path} holds a {form}, not a {cls.__name__}; use {form}.load or Prefix.load.")
        if "signature" not in meta:
            raise ValueError(f"{path} has no 'signature' metadata; it was not written by Prefix.save (or was edited).")
        try:
            saved = ModelSignature.from_json(meta["signature"])
        except (ValueError, TypeError) as e:
            raise ValueError(f"{path} has a malformed 'signature' metadata entry: {e} Re-save the prefix.") from None
        missing = [n for n in target.tensor_names if n not in tensors]
        extra = sorted(set(tensors) - set(target.tensor_names))
        if missing or extra:
            raise ValueError(
                f"{path} does not hold the tensors of a {form}: expected {list(target.tensor_names)}, "
                f"missing {missing}, unexpected {extra}."
            )
        theirs = signature_of(model)
        problems = saved.mismatches(theirs)
        if problems:
            raise ValueError(
                f"{path} holds a {form} made for a different model: " + "; ".join(problems) + "."
            )
        if saved.weights is None:
            if not allow_other_weights:
                warnings.warn(
                    f"{path} was written before prefix files recorded the model's weights fingerprint (and a "
                    f"checksum): it cannot be checked against this model's weights or for damage. It is loaded "
                    f"as made for this model (fingerprint {theirs.weights}); if it was, re-save it "
                    f"(prefix.save(path)) to record that. allow_other_weights=True silences this warning.",
                    UserWarning,
                    stacklevel=2,
                )
            saved = dataclasses.replace(saved, weights=theirs.weights, weights_dtype=theirs.weights_dtype,
                                        weights_as=theirs.weights_as)
        elif not allow_other_weights and not saved.same_weights(theirs):
            raise ValueError(
                f"{path} holds a {form} made for other weights of this architecture: "
                f"{saved.weights_mismatch(theirs)}. The model is another checkpoint, or its weights were changed "
                f"(training, edits, compatibility mode, attached adapters) since the prefix was made (the same "
                f"weights converted to another dtype are accepted: float32 -> bfloat16 / float16). Load it onto "
                f"the model it was made for, or pass allow_other_weights=True to use it on these weights anyway."
            )
        dtype, model_device = model_dtype_device(model)
        policy = meta.get("content_bos")
        if policy not in (None, "true", "false"):
            raise ValueError(f"{path} has a malformed 'content_bos' metadata entry {policy!r} (expected 'true' or "
                             f"'false'); re-save the prefix.")
        tensors = {k: v.to(dtype=dtype, device=device or model_device) for k, v in tensors.items()}
        try:
            prefix = target(**tensors, signature=saved)
        except (ValueError, TypeError) as e:
            raise ValueError(f"{path} holds tensors that do not form a valid {form}: {e}") from None
        prefix.content_bos = None if policy is None else policy == "true"
        return prefix

    def extra_repr(self) -> str:
        shapes = ", ".join(f"{n}={tuple(getattr(self, n).shape)}" for n in self.tensor_names)
        return f"P={self.length}, {shapes}, model={self.signature.architecture}"


class KVPrefix(Prefix):
    """Keys and values for every layer (Li & Liang / PEFT prefix-tuning).

    ``keys``, ``values``: ``[n_layers, P, n_kv_heads, d_head]`` (optionally a leading batch dim).
    Keys are pre-rotary, as at ``hook_k``.
    """

    name = "kv"
    tensor_names = ("keys", "values")
    _unbatched_ndim = 4
    _per_layer_ndim = 3
    _slot_dim = -3

    def __init__(
        self,
        keys: Float[Tensor, "*batch n_layers P n_kv_heads d_head"],
        values: Float[Tensor, "*batch n_layers P n_kv_heads d_head"],
        signature: ModelSignature,
    ):
        super().__init__(signature)
        if keys.shape != values.shape:
            raise ValueError(f"keys {tuple(keys.shape)} and values {tuple(values.shape)} must have one shape.")
        _as_tensor_attr(self, "keys", keys)
        _as_tensor_attr(self, "values", values)
        self._check_shapes()
        s = signature
        expected = (s.n_layers, self.length, s.n_kv_heads, s.d_head)
        if tuple(keys.shape[-4:]) != expected:
            raise ValueError(
                f"KVPrefix keys must be [n_layers, P, n_kv_heads, d_head] = {expected} for this model, "
                f"got {tuple(keys.shape)}."
            )

    def injection_hooks(self, model=None) -> list[Hook]:
        hooks = []
        for layer in range(self.signature.n_layers):
            hooks.append((f"blocks.{layer}.attn.hook_k", self._overwrite(lambda l=layer: self.layer_keys(l))))
            hooks.append((f"blocks.{layer}.attn.hook_v", self._overwrite(lambda l=layer: self.layer_values(l))))
        return hooks

    def layer_keys(self, layer: int) -> Float[Tensor, "*batch P n_kv_heads d_head"]:
        return self.keys[..., layer, :, :, :]

    def layer_values(self, layer: int) -> Float[Tensor, "*batch P n_kv_heads d_head"]:
        return self.values[..., layer, :, :, :]

    @classmethod
    def random(cls, model, length: int, seed: int = 0, scale: float = 1.0) -> "KVPrefix":
        """Gaussian keys and values with standard deviation ``scale``."""
        s = _check_length(model, length)
        dtype, device = model_dtype_device(model)
        g = torch.Generator().manual_seed(seed)
        shape = (s.n_layers, length, s.n_kv_heads, s.d_head)
        k = torch.randn(shape, generator=g, dtype=torch.float64) * scale
        v = torch.randn(shape, generator=g, dtype=torch.float64) * scale
        return cls(k.to(dtype=dtype, device=device), v.to(dtype=dtype, device=device), s)

    @classmethod
    def zeros(cls, model, length: int) -> "KVPrefix":
        s = _check_length(model, length)
        dtype, device = model_dtype_device(model)
        shape = (s.n_layers, length, s.n_kv_heads, s.d_head)
        return cls(torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device), s)

    @classmethod
    def from_prompt(cls, model, tokens: "Integer[Tensor, '*batch P'] | str | list[str] | list[int] | list[list[int]]", prepend_bos: bool | None = None, keep=None) -> "KVPrefix":
        """The keys and values a real-token prompt writes in every layer: the exact equivalent prefix.

        ``tokens``: ids ``[P]`` / ``[batch, P]``, a string, or a list of strings of equal token length
        (a batched prefix). Text is the start of the sequence: ``prepend_bos=None`` uses the model's
        default (BOS iff the checkpoint's tokenizer adds one; :mod:`prefixlens.text`).
        The prompt runs in eval mode (dropout off; each submodule's mode restored afterwards).

        ``keep``: positions of the prompt (``0..P-1``, any order, no repeats) whose keys and values
        the prefix keeps (Wang et al.'s hidden-anchor compression). They are computed in the *full*
        prompt, and the prefix remembers where they sat: while it is attached, slot ``i`` sits at
        position ``keep[i]`` and the content after it starts at ``P`` (the full prompt's length), in
        every entry point (``run_with_prefix``, ``generate``, ``decompose``, ...). So keeping every
        position equals the full prompt, and keeping a subset equals the full prompt with the
        content's attention to the dropped positions masked. Such a prefix cannot be saved.

        Args:
            model (TransformerBridge): the model the prompt runs through.
            tokens: the prompt: ids ``[P]`` or ``[batch, P]`` (a list of ints, or of equal-length lists,
                works too), a string, or a list of strings of equal token length.
            prepend_bos: give a text prompt a BOS token (``None``: the model's default).
            keep (Sequence[int] | None): the positions to keep (``None``: all).
        """
        tokens, batched = _prompt_tokens(model, tokens, f"{cls.__name__}.from_prompt", prepend_bos)
        s = _check_length(model, tokens.shape[-1])
        names = [f"blocks.{l}.attn.hook_{kv}" for l in range(s.n_layers) for kv in "kv"]
        with torch.no_grad(), evaluation_mode(model):
            _, cache = cached_run(model, tokens, names, return_type=None)
        k = torch.stack([cache[f"blocks.{l}.attn.hook_k"] for l in range(s.n_layers)], dim=1)
        v = torch.stack([cache[f"blocks.{l}.attn.hook_v"] for l in range(s.n_layers)], dim=1)
        kept = _kept_positions(keep, tokens.shape[-1])
        if kept is not None:
            index = torch.tensor(kept, device=k.device)
            k, v = k.index_select(2, index), v.index_select(2, index)
        prefix = cls(k if batched else k[0], v if batched else v[0], s)
        if kept is not None:
            prefix.slot_positions, prefix.content_start = kept, int(tokens.shape[-1])
        return prefix

    slot_positions: tuple[int, ...] | None = None  # set by from_prompt(keep=...): where each slot sat
    content_start: int | None = None  # ... and where the content starts (the full prompt's length)

    def position_hooks(self, model) -> list:
        """With ``from_prompt(keep=...)``: pre-hooks on the model's position component (``pos_embed``
        and/or ``rotary_emb``) that put slot ``i`` at ``slot_positions[i]`` and shift the content by
        ``content_start - P``; refused on a model whose positions are not exposed there."""
        if self.slot_positions is None:
            return []
        modules = [m for m in (getattr(model, "pos_embed", None), getattr(model, "rotary_emb", None)) if isinstance(m, nn.Module)]
        if not modules:
            raise ValueError(
                f"this KVPrefix keeps {self.length} positions of a {self.content_start}-token prompt, but the model "
                f"({type(model).__name__}) has no pos_embed or rotary_emb component whose position ids it could set, "
                "so its content would sit at the wrong positions. Use from_prompt without keep= on this model."
            )
        P, n_ctx = self.length, int(model.cfg.n_ctx)

        def remap(pos: Tensor) -> Tensor:
            if pos.shape[-1] < P:
                raise RuntimeError("a kept-positions KVPrefix is attached but the model ran fewer positions than its slots.")
            slots = torch.tensor(self.slot_positions, dtype=pos.dtype, device=pos.device).expand(*pos.shape[:-1], P)
            out = torch.cat([slots, pos[..., P:] + (self.content_start - P)], dim=-1)
            if int(out.max()) >= n_ctx:
                raise ValueError(f"the content after this kept-positions prefix reaches position {int(out.max())}, "
                                 f"beyond the model's context of {n_ctx}.")
            return out

        def pre_hook(module, args, kwargs):
            if "position_ids" in kwargs and kwargs["position_ids"] is not None:
                return args, {**kwargs, "position_ids": remap(kwargs["position_ids"])}
            if module is getattr(model, "pos_embed", None) and args and torch.is_tensor(args[0]):
                return (remap(args[0]), *args[1:]), kwargs
            if len(args) > 1 and torch.is_tensor(args[1]):
                return (args[0], remap(args[1]), *args[2:]), kwargs
            raise RuntimeError(f"{type(module).__name__} was called without position ids; a kept-positions KVPrefix cannot place its slots.")

        return [m.register_forward_pre_hook(pre_hook, with_kwargs=True) for m in modules]

    def batch_slice(self, rows: slice | Tensor) -> "KVPrefix":
        out = super().batch_slice(rows)
        out.slot_positions, out.content_start = self.slot_positions, self.content_start
        return out

    def save(self, path: str | os.PathLike) -> None:
        if self.slot_positions is not None:
            raise ValueError("a KVPrefix made with from_prompt(keep=...) carries its positions, which prefix files do not "
                             "record; build it again from the prompt instead of saving it.")
        super().save(path)

    @classmethod
    def from_peft(cls, peft_model_or_dir, model, **kwargs) -> "KVPrefix":
        """Import a HuggingFace PEFT prefix-tuning adapter; see :func:`prefixlens.peft_interop.kv_prefix_from_peft`.

        A convenience wrapper: the importer lives above this module (it builds a ``KVPrefix``), so it is
        imported when called, the one import of a higher prefixlens module here."""
        from prefixlens.peft_interop import kv_prefix_from_peft  # lazily: peft_interop imports this module

        return kv_prefix_from_peft(peft_model_or_dir, model, **kwargs)

    def to_kv(self, model=None) -> "KVPrefix":
        return self


class _ConvertibleToKV(Prefix):
    """Forms whose keys and values are a deterministic function of the prefix and the model."""

    def to_kv(self, model) -> KVPrefix:
        """The exact equivalent :class:`KVPrefix` (differentiable: gradients reach this prefix).

        The model runs in eval mode (dropout off; each submodule's mode restored afterwards)."""
        self.validate(model)
        _require_weights(model, f"{self.form}.to_kv")
        check_not_attached(model, f"{self.form}.to_kv")  # an attached prefix's hooks would write the slots too
        s = self.signature
        P = self.length
        captured: dict[str, Tensor] = {}

        def grab(name):
            def hook(act, hook):
                captured[name] = act[:, :P]

            return hook

        batch = self.batch_size or 1
        names = [f"blocks.{l}.attn.hook_{kv}" for l in range(s.n_layers) for kv in "kv"]
        # the slots alone, as inside ``prefixlens.attached`` (placeholder ids: the hooks overwrite them)
        placeholders = torch.zeros((batch, P), dtype=torch.long)
        # (hooks that act in this thread only: see prefixlens.runtime)
        with evaluation_mode(model), thread_hooks(model, self.injection_hooks(model), first=True):
            with thread_hooks(model, [(n, grab(n)) for n in names]):
                model(placeholders, return_type=None)
        k = torch.stack([captured[f"blocks.{l}.attn.hook_k"] for l in range(s.n_layers)], 1)
        v = torch.stack([captured[f"blocks.{l}.attn.hook_v"] for l in range(s.n_layers)], 1)
        return self._keeps_policy(KVPrefix(k if self.batched else k[0], v if self.batched else v[0], s))


class ResidualPrefix(_ConvertibleToKV):
    """One residual-stream vector per layer and slot that replaces the input of the attention block
    at the slots (the reference code's form: it passes through that layer's norm, ``W_K`` and ``W_V``).

    ``resid``: ``[n_layers, P, d_model]`` (optionally a leading batch dim).
    """

    name = "residual"
    tensor_names = ("resid",)
    _unbatched_ndim = 3
    _per_layer_ndim = 2
    _slot_dim = -2

    def __init__(self, resid: Float[Tensor, "*batch n_layers P d_model"], signature: ModelSignature):
        super().__init__(signature)
        _as_tensor_attr(self, "resid", resid)
        self._check_shapes()
        expected = (signature.n_layers, signature.d_model)
        if (resid.shape[-3], resid.shape[-1]) != expected:
            raise ValueError(
                f"ResidualPrefix must be [n_layers, P, d_model] with (n_layers, d_model) = {expected}, "
                f"got {tuple(resid.shape)}."
            )

    def injection_hooks(self, model=None) -> list[Hook]:
        return [
            (f"blocks.{l}.hook_resid_pre", self._overwrite(lambda l=l: self.resid[..., l, :, :]))
            for l in range(self.signature.n_layers)
        ]

    @classmethod
    def random(cls, model, length: int, seed: int = 0, scale: float = 1.0) -> "ResidualPrefix":
        """Gaussian residual vectors with standard deviation ``scale`` (the reference uses 1)."""
        s = _check_length(model, length)
        dtype, device = model_dtype_device(model)
        g = torch.Generator().manual_seed(seed)
        r = torch.randn((s.n_layers, length, s.d_model), generator=g, dtype=torch.float64) * scale
        return cls(r.to(dtype=dtype, device=device), s)

    @classmethod
    def zeros(cls, model, length: int) -> "ResidualPrefix":
        s = _check_length(model, length)
        dtype, device = model_dtype_device(model)
        return cls(torch.zeros((s.n_layers, length, s.d_model), dtype=dtype, device=device), s)

    @classmethod
    def from_prompt(cls, model, tokens: "Integer[Tensor, '*batch P'] | str | list[str] | list[int] | list[list[int]]", prepend_bos: bool | None = None) -> "ResidualPrefix":
        """The residual stream a real-token prompt has at every layer's input (run in eval mode, dropout off).
        ``tokens``: ids, a string or a list of strings, as for :meth:`KVPrefix.from_prompt`.

        Args:
            model (TransformerBridge): the model the prompt runs through.
            tokens: the prompt: ids ``[P]`` or ``[batch, P]`` (a list of ints, or of equal-length lists,
                works too), a string, or a list of strings of equal token length.
            prepend_bos: give a text prompt a BOS token (``None``: the model's default).
        """
        tokens, batched = _prompt_tokens(model, tokens, f"{cls.__name__}.from_prompt", prepend_bos)
        s = _check_length(model, tokens.shape[-1])
        names = [f"blocks.{l}.hook_resid_pre" for l in range(s.n_layers)]
        with torch.no_grad(), evaluation_mode(model):
            _, cache = cached_run(model, tokens, names, return_type=None)
        r = torch.stack([cache[n] for n in names], dim=1)
        return cls(r if batched else r[0], s)


class SoftPrompt(_ConvertibleToKV):
    """Input embeddings at the slots, layer 0 only (prompt tuning, Lester et al.).

    ``embeddings``: ``[P, d_model]`` (optionally a leading batch dim), in HuggingFace's ``inputs_embeds``
    space: the output of the model's input embedding module, before any normalisation the family applies
    after it (Bloom) and including any scaling inside it (Gemma's √d); see the module docstring. They
    replace the *token* embedding at :func:`soft_prompt_hook`; models with learned positions still add the
    positions ``0..P-1``.
    """

    name = "soft"
    tensor_names = ("embeddings",)
    _unbatched_ndim = 2
    _per_layer_ndim = 2
    _slot_dim = -2

    def __init__(self, embeddings: Float[Tensor, "*batch P d_model"], signature: ModelSignature):
        super().__init__(signature)
        _as_tensor_attr(self, "embeddings", embeddings)
        self._check_shapes()
        if embeddings.shape[-1] != signature.d_model:
            raise ValueError(
                f"SoftPrompt must be [P, d_model] with d_model = {signature.d_model}, got {tuple(embeddings.shape)}."
            )

    def injection_hooks(self, model=None) -> list[Hook]:
        if model is None:
            raise TypeError(
                "SoftPrompt.injection_hooks(model): a soft prompt's hook point depends on the model (where its "
                "input embedding ends; see prefixlens.prefixes.soft_prompt_hook); pass the model."
            )
        return [(soft_prompt_hook(model), self._overwrite(lambda: self.embeddings))]

    @classmethod
    def random(cls, model, length: int, seed: int = 0, scale: float | None = None) -> "SoftPrompt":
        """Gaussian embeddings; ``scale`` defaults to the standard deviation of the input embeddings of
        the whole vocabulary in the soft prompt's space (:func:`input_embeddings`: e.g. Gemma's √d-scaled
        rows, not its raw ``W_E``)."""
        s = _check_length(model, length)
        dtype, device = model_dtype_device(model)
        if scale is None:
            _require_weights(model, "SoftPrompt.random", "Pass scale= explicitly (its default is read off the embeddings), or load")
            scale = input_embedding_std(model)
        g = torch.Generator().manual_seed(seed)
        e = torch.randn((length, s.d_model), generator=g, dtype=torch.float64) * scale
        return cls(e.to(dtype=dtype, device=device), s)

    @classmethod
    def zeros(cls, model, length: int) -> "SoftPrompt":
        s = _check_length(model, length)
        dtype, device = model_dtype_device(model)
        return cls(torch.zeros((length, s.d_model), dtype=dtype, device=device), s)

    @classmethod
    def from_prompt(cls, model, tokens: "Integer[Tensor, '*batch P'] | str | list[str] | list[int] | list[list[int]]", prepend_bos: bool | None = None) -> "SoftPrompt":
        """The input embeddings of a real prompt, as HuggingFace's ``inputs_embeds`` holds them (read at
        :func:`soft_prompt_hook`; run in eval mode, dropout off). ``tokens``: ids, a string or a list of
        strings, as for :meth:`KVPrefix.from_prompt`.

        Args:
            model (TransformerBridge): the model the prompt runs through.
            tokens: the prompt: ids ``[P]`` or ``[batch, P]`` (a list of ints, or of equal-length lists,
                works too), a string, or a list of strings of equal token length.
            prepend_bos: give a text prompt a BOS token (``None``: the model's default).
        """
        tokens, batched = _prompt_tokens(model, tokens, f"{cls.__name__}.from_prompt", prepend_bos)
        s = _check_length(model, tokens.shape[-1])
        name = soft_prompt_hook(model)
        with torch.no_grad(), evaluation_mode(model):
            _, cache = cached_run(model, tokens, [name], return_type=None)
        e = cache[name]
        return cls(e if batched else e[0], s)


def soft_prompt_hook(model) -> str:
    """The HookPoint a :class:`SoftPrompt` is written at: the output of the model's input embedding
    (``embed.hook_out`` on a TransformerBridge: HuggingFace's ``inputs_embeds``, before Bloom's
    ``word_embeddings_layernorm``; ``hook_embed`` on a model without an ``embed`` module, such as the
    construction models). Refuses a model whose embedding output is not ``d_model`` wide (OPT with
    ``word_embed_proj_dim != hidden_size``, whose ``project_in`` follows the embedding)."""
    name = "embed.hook_out" if "embed.hook_out" in model.hook_dict else "hook_embed"
    module = _embedding_module(model)
    width = getattr(module, "embedding_dim", None)
    if width is not None and width != model.cfg.d_model:
        raise ValueError(
            f"this model's input embedding is {width} wide but its residual stream is d_model = "
            f"{model.cfg.d_model} (a projection such as OPT's project_in follows the embedding), so a "
            f"SoftPrompt [P, d_model] has no inputs_embeds equivalent here; use a ResidualPrefix or a KVPrefix."
        )
    return name


def _embedding_module(model):
    """The module whose output is HuggingFace's ``inputs_embeds`` (``None`` for a model without one)."""
    embed = getattr(model, "embed", None)
    return getattr(embed, "original_component", None) if isinstance(embed, nn.Module) else None


@torch.no_grad()
def input_embeddings(model, tokens: Integer[Tensor, "*shape"]) -> Float[Tensor, "*shape d_model"]:
    """The input embeddings of ``tokens`` in the :class:`SoftPrompt` space (HuggingFace's
    ``inputs_embeds``: the embedding module's output, e.g. Gemma's rows times √d), without running the
    model or its hooks."""
    module = _embedding_module(model)
    return module(tokens) if module is not None else model.W_E[tokens]


@torch.no_grad()
def input_embedding_std(model, chunk: int = 8192) -> float:
    """The standard deviation of all entries of :func:`input_embeddings` over the vocabulary: the scale
    of real soft tokens. A plain ``nn.Embedding`` (or a model without an embedding module): the weight's
    std, as ``W_E.std()`` in float64; any other embedding module (Gemma's scaled one): computed on its
    outputs, in chunks of ``chunk`` tokens (two passes in float64: the mean, then the squared deviations)."""
    soft_prompt_hook(model)  # refuses a model without an inputs_embeds-shaped embedding
    module = _embedding_module(model)
    if module is None or type(module) is nn.Embedding:
        weight = model.W_E if module is None else module.weight
        return float(weight.detach().double().std())
    V, n = int(model.cfg.d_vocab), int(model.cfg.d_vocab) * int(model.cfg.d_model)
    device = model_dtype_device(model)[1]
    chunks = [torch.arange(start, min(V, start + chunk), device=device) for start in range(0, V, chunk)]
    mean = sum(float(input_embeddings(model, ids).double().sum()) for ids in chunks) / n
    squares = sum(float((input_embeddings(model, ids).double() - mean).square().sum()) for ids in chunks)
    return (squares / (n - 1)) ** 0.5


def _kept_positions(keep, P: int) -> tuple[int, ...] | None:
    """``keep`` checked against a prompt of ``P`` positions, sorted; ``None`` when it keeps them all."""
    if keep is None:
        return None
    kept = [int(i) for i in (keep.tolist() if torch.is_tensor(keep) else keep)]
    if not kept or len(set(kept)) != len(kept) or min(kept) < 0 or max(kept) >= P:
        raise ValueError(f"keep= must be distinct positions in 0..{P - 1} of the prompt (at least one), got {kept}.")
    kept = tuple(sorted(kept))
    return None if kept == tuple(range(P)) else kept


def _check_length(model, length: int) -> ModelSignature:
    s = signature_of(model)
    if not isinstance(length, int) or length < 1:
        raise ValueError(f"a prefix needs at least one slot: length must be an int >= 1, got {length!r}.")
    if length >= s.n_ctx:
        raise ValueError(
            f"prefix length {length} leaves no room for content in the model's context of {s.n_ctx} positions."
        )
    return s

