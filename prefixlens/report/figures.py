"""Figure data: what each figure shows, computed from a model, a prefix and a decomposition.

Every builder returns a :class:`~prefixlens.report.base.Figure` (or a :class:`~prefixlens.report.base.Row`
of them) whose ``data`` keeps the numbers; drawing is in :mod:`prefixlens.report.svg` and assembly in
:mod:`prefixlens.report.render`.
"""

from __future__ import annotations

import html as _html
import operator
from collections.abc import Mapping, Sequence

import torch
from jaxtyping import Float, Int
from torch import Tensor

from prefixlens.decomposition import HeadDecomposition, decompose
from prefixlens.injection import check_tokens, full_attention_mask, n_slots, run_with_cache
from prefixlens.prefixes import Prefix
from prefixlens.report.base import Figure, Row
from prefixlens.report.svg import heatmap_svg, scatter_svg
from prefixlens.text import tokens_and_mask

__all__ = [
    "readable_token",
    "slot_labels",
    "token_labels",
    "pad_prefixed_pattern",
    "head_label",
    "entropy_deficit",
    "select_heads",
    "attention_figure",
    "prefix_mass_figure",
    "prefix_mass_grid_figure",
    "attention_output_shift",
    "bias_shift_figure",
    "summary_figure",
    "table_figure",
    "svg_figure",
    "project_2d",
]


# --------------------------------------------------------------------------------------------- labels

_VISIBLE = {"\n": "↵", "\r": "⏎", "\t": "⇥", " ": "·"}


def readable_token(text: str) -> str:
    """A token's text made visible in a label: spaces ``·``, newline ``↵``, tab ``⇥``, CR ``⏎``;
    byte-level BPE markers (``Ġ`` space, ``Ċ`` newline) and SentencePiece's ``▁`` are turned into the
    same marks; an empty token is ``∅``."""
    if not text:
        return "∅"
    text = text.replace("Ġ", " ").replace("Ċ", "\n").replace("▁", " ")
    return "".join(_VISIBLE.get(ch, ch) for ch in text)


def slot_labels(n_slots: int, names: Sequence[str] | None = None) -> list[str]:
    """Labels of the virtual prefix slots: ``["<p0>", …]``, or ``[name]`` in brackets for each given
    name (e.g. the prompt tokens whose keys and values a ``from_prompt`` prefix holds)."""
    if names is None:
        return [f"<p{i}>" for i in range(n_slots)]
    names = list(names)
    if len(names) != n_slots:
        raise ValueError(
            f"slot_names: got {len(names)} slot names but the prefix has {n_slots} slots; give one name per slot "
            f"(or None for <p0>, <p1>, ...)."
        )
    return [f"[{n}]" for n in names]


def token_labels(model, tokens: Int[Tensor, " pos"]) -> list[str]:
    """One readable label per token id (:func:`readable_token` of its text): ``model.to_str_tokens``,
    else the tokenizer's ``decode`` of each id alone, else the ids."""
    ids = [int(t) for t in torch.as_tensor(tokens).reshape(-1).tolist()]
    labels = None
    try:
        got = model.to_str_tokens(torch.tensor(ids))
        if isinstance(got, list) and len(got) == len(ids) and all(isinstance(s, str) for s in got):
            labels = got
    except Exception:  # noqa: BLE001 - any tokenizer problem falls back to the next option
        pass
    tokenizer = getattr(model, "tokenizer", None)
    if labels is None and tokenizer is not None:
        try:
            labels = [tokenizer.decode([i]) for i in ids]
        except Exception:  # noqa: BLE001
            pass
    if labels is None:
        return [str(i) for i in ids]
    return [readable_token(s) for s in labels]


def pad_prefixed_pattern(pattern: Tensor, n_slots: int) -> Tensor:
    """``[H, T, P+T]`` content rows of a prefixed pattern -> square ``[H, P+T, P+T]``.

    CircuitsVis labels both axes from one token list and masks ``src > dest``; the virtual slots have
    no queries, so their rows are zero (causal, and visibly empty).
    """
    if pattern.ndim != 3:
        raise ValueError(f"expected a [head, pos, P+pos] pattern, got shape {tuple(pattern.shape)}.")
    H, T, K = pattern.shape
    if K != n_slots + T:
        raise ValueError(f"pattern has {K} keys but {n_slots} slots + {T} content positions = {n_slots + T}.")
    return torch.cat([pattern.new_zeros(H, n_slots, K), pattern], dim=1)


def head_label(layer: int, head: int) -> str:
    """``"L{layer}H{head}"``, TransformerLens's usual name of a head."""
    return f"L{layer}H{head}"


# ------------------------------------------------------------------------------------- head selection


def entropy_deficit(
    decomposition: HeadDecomposition, example: int | None = None, min_keys: int = 3
) -> Float[Tensor, "layer head"]:
    """How far each head's attention over the content is from uniform: ``log n_i − H(p_i)`` in nats
    (0 for a uniform row, ``log n_i`` for a one-hot row), averaged over the content queries ``i`` that
    see at least ``min_keys`` keys, and over the examples (or one ``example``).

    ``p_i`` is the content attention renormalised (``decomposition.content_pattern``), which by the
    theorem is the attention without the prefix for the same layer input; ``n_i`` counts its keys with
    non-zero weight (so padded keys do not count).
    """
    pattern = decomposition.content_pattern.double()  # [L, B, H, T, T]
    if example is not None:
        example = _index_in_range(example, pattern.shape[1], "example")
        pattern = pattern[:, example : example + 1]
    n_keys = (pattern > 0).sum(-1)  # [L, B, H, T]
    entropy = -(pattern * pattern.clamp_min(1e-300).log()).sum(-1)
    deficit = n_keys.clamp_min(1).double().log() - entropy
    valid = (n_keys >= min_keys).double()
    count = valid.sum(dim=(1, 3))
    if bool((count == 0).any()):
        raise ValueError(f"no content query sees {min_keys} keys; use longer inputs or a smaller min_keys.")
    return (deficit * valid).sum(dim=(1, 3)) / count


def select_heads(
    decomposition: HeadDecomposition,
    k: int = 4,
    mass_range: tuple[float, float] = (0.1, 0.9),
    one_per_layer: bool = True,
    example: int | None = None,
) -> list[tuple[int, int]]:
    """The ``k`` heads whose content attention is furthest from uniform (:func:`entropy_deficit`),
    among those whose mean prefix mass ``A`` lies in ``mass_range`` (so that both the prefix slots
    and the content are visible in the attention view), at most one per layer by default.
    Returned in layer order. Falls back to all heads when too few have ``A`` in range.

    Args:
        decomposition: the decomposition of the prefixed run.
        k: how many heads to select.
        mass_range: the range the head's mean prefix mass ``A`` must lie in.
        one_per_layer: select at most one head per layer.
        example: the example to measure on (``None``: all of them).

    Returns:
        ``[(layer, head), …]`` in layer order.
    """
    deficit = entropy_deficit(decomposition, example=example)
    A = decomposition.prefix_attention.double()
    if example is not None:
        example = _index_in_range(example, A.shape[1], "example")
    A = (A if example is None else A[:, example : example + 1]).mean(dim=(1, 3))
    lo, hi = mass_range
    order = sorted(  # largest deficit first; ties in layer, then head order
        (-float(deficit[l, h]), l, h) for l in range(deficit.shape[0]) for h in range(deficit.shape[1])
    )
    chosen: list[tuple[int, int]] = []
    for in_range_only in (True, False):
        for _, l, h in order:
            if len(chosen) == k:
                break
            if (l, h) in chosen or (one_per_layer and any(c[0] == l for c in chosen)):
                continue
            if in_range_only and not lo <= float(A[l, h]) <= hi:
                continue
            chosen.append((l, h))
    return sorted(chosen)


# --------------------------------------------------------------------------------------------- figures


def _index_in_range(value, n: int, what: str) -> int:
    """``value`` as an index into ``n`` items (``layer``, ``head``, ``example``, ...): an int (a numpy
    integer or a 0-d integer tensor too); negatives count from the end, as in Python (``-1``: the last).
    Anything else, or an index outside ``-n..n-1``, is refused with a message naming ``what`` and the
    valid range."""
    try:
        if isinstance(value, bool):  # True is not layer 1
            raise TypeError
        i = operator.index(value)
    except TypeError:
        raise TypeError(
            f"{what} must be an int in 0..{n - 1} (or -{n}..-1, counting from the end), got {value!r}."
        ) from None
    if not -n <= i < n:
        raise IndexError(f"{what} {i} is out of range: valid are 0..{n - 1} (or -{n}..-1, counting from the end).")
    return i % n


def _is_one_index(value) -> bool:
    """Whether ``value`` is one index (an int-like or a 0-d tensor), not ``None`` or a list of them."""
    if isinstance(value, Tensor):
        return value.ndim == 0
    return value is not None and (hasattr(value, "__index__") or not hasattr(value, "__iter__") or isinstance(value, str))


def _indices(value, n: int, what: str) -> list[int]:
    """``None`` (all), one index, or a sequence of them, each checked by ``_index_in_range``."""
    if value is None:
        return list(range(n))
    if _is_one_index(value):
        return [_index_in_range(value, n, what)]  # refuses a float or a string by name
    return [_index_in_range(v, n, what) for v in value]


def _content(model, tokens, prefix, continuation: bool | None = None):
    """Content ids ``[batch, pos]`` and the full ``[batch, P + pos]`` mask (or ``None``) for a figure:
    ids, a string or a list of strings (:func:`prefixlens.text.tokens_and_mask`; a ragged list is
    left-padded with a mask). Text after a prefix gets the prefix's BOS policy (none unless it was trained
    with one); without one (``prefix=None``) it starts the sequence, with the model's default BOS, unless
    ``continuation`` says otherwise."""
    continuation = prefix is not None if continuation is None else continuation
    # text after a prefix gets that prefix's BOS policy (a trained prefix's, else none)
    tokens, mask = tokens_and_mask(model, tokens, continuation=continuation, after=prefix if continuation else None)
    tokens = check_tokens(model, tokens, prefix)
    return tokens, full_attention_mask(mask, tokens, n_slots(prefix))


def _example_tokens(model, tokens, prefix, example: int) -> tuple[Tensor, int]:
    """The content of one example, unpadded (text is encoded), and its index in it."""
    tokens, mask = _content(model, tokens, prefix)
    example = _index_in_range(example, tokens.shape[0], "example")
    if mask is not None:  # the figure shows one example: its real tokens, without padding
        tokens = tokens[example : example + 1, mask[example, n_slots(prefix):].bool()]
        example = 0
    return tokens, example


def _layers(model, layer: int | Sequence[int] | None) -> list[int]:
    return _indices(layer, int(model.cfg.n_layers), "layer")


def _heads(n_heads: int, head: int | Sequence[int] | None) -> list[int]:
    return _indices(head, n_heads, "head")


def _heads_name(layer: int, heads: list[int], n_heads: int) -> str:
    if len(heads) == 1:
        return head_label(layer, heads[0])
    if heads == list(range(n_heads)):
        return f"L{layer}, all {n_heads} heads"
    return f"L{layer}, heads " + ", ".join(str(h) for h in heads)


#: what the colours of every CircuitsVis attention view mean (they draw no colour bar of their own)
PATTERN_SCALE = "colour: attention weight, from 0 (white) to 1 (full colour); grey: masked (a query cannot see that key)"


def _attention_view(title: str, pattern: Tensor, tokens: list[str], names: list[str], caption: str = "") -> Figure:
    """AttentionHeads for several heads, AttentionPattern for one; the caption ends with :data:`PATTERN_SCALE`."""
    caption = f"{caption}; {PATTERN_SCALE}" if caption else PATTERN_SCALE
    pattern = pattern.detach().float().cpu()
    if pattern.shape[0] == 1:
        props = {"tokens": tokens, "attention": pattern[0], "maskUpperTri": True, "showAxisLabels": True}
        return Figure(title, "AttentionPattern", props, caption)
    props = {"tokens": tokens, "attention": pattern, "attentionHeadNames": names, "maskUpperTri": True}
    return Figure(title, "AttentionHeads", props, caption)


def attention_figure(
    model,
    tokens: "Int[Tensor, 'batch pos'] | str | list[str]",
    prefix: Prefix | None,
    layer: int | Sequence[int] | None = 0,
    head: int | Sequence[int] | None = None,
    example: int = 0,
    decomposition: HeadDecomposition | None = None,
    prefix_name: str = "prefix",
    slot_names: Sequence[str] | None = None,
) -> Row | list[Row]:
    """The paper's Figure 5 for one layer: three attention views side by side.

    1. the prefixed run's own pattern (``hook_pattern``), padded to ``[H, P+T, P+T]`` with the slots
       labelled ``<p0>…`` (or ``[name]`` with ``slot_names``, e.g. the prompt's tokens);
    2. its attention over the content renormalised to sum to one (``decomposition.content_pattern``);
    3. the attention without the prefix for the same layer input (``decomposition.baseline_pattern``;
       at layer 0 this is the plain run).
    Views 2 and 3 are equal: a prefix only scales the content attention down. Every view's title
    names the head(s) and the prefix (``prefix_name``). ``layer=None`` gives one :class:`Row` per
    layer; ``head`` selects heads (one head shows a single large pattern).

    Args:
        model (TransformerBridge): the model to run.
        tokens: the content: ``[batch, pos]`` token ids, a string or a list of strings (after a prefix
            no BOS, without one the model's default; a ragged list shows the chosen example without its
            padding).
        prefix: the prefix the content runs after (``None``: the plain run, ``P = 0``).
        layer: the layer, several layers, or ``None`` for every layer (negatives count from the end).
        head: the head(s) to show (``None``: all).
        example: the row of ``tokens`` to show.
        decomposition: the decomposition of this run, if already made (``None``: made here).
        prefix_name: the prefix's name in the titles.
        slot_names: a label for each prefix slot (default ``<p0>, <p1>, …``).

    Returns:
        One row of three views, or one row per layer when ``layer`` is a list or ``None``.
    """
    tokens, example = _example_tokens(model, tokens, prefix, example)
    layers = _layers(model, layer)
    n_heads = int(model.cfg.n_heads)
    heads = _heads(n_heads, head)
    P = n_slots(prefix)
    slots = slot_labels(P, slot_names)
    if decomposition is None:
        decomposition = decompose(model, tokens, prefix, baseline=True)
    if not decomposition.has_baseline:
        raise ValueError("the decomposition has no baseline_pattern; make it with decompose(..., baseline=True).")
    if decomposition.n_slots != P or decomposition.content_pattern.shape[1] != tokens.shape[0]:
        raise ValueError("the decomposition does not belong to these tokens and this prefix.")
    names = {f"blocks.{l}.attn.hook_pattern" for l in layers}
    with torch.no_grad():
        _, cache = run_with_cache(model, tokens, prefix, names_filter=lambda n: n in names)
    content = token_labels(model, tokens[example])
    rows = []
    for l in layers:
        full = cache[f"blocks.{l}.attn.hook_pattern"][example][heads][:, P:]  # [H, T, P+T]
        head_names = [head_label(l, h) for h in heads]
        who = _heads_name(l, heads, n_heads)
        mass = decomposition.prefix_attention[l, example][heads].mean()
        content_pattern = decomposition.content_pattern[l, example][heads]
        baseline = decomposition.baseline_pattern[l, example][heads].nan_to_num(0.0)
        views = [
            _attention_view(
                f"{who} · with {prefix_name} (P = {P})",
                pad_prefixed_pattern(full, P),
                slots + content,
                head_names,
                f"the first {P} columns are the prefix slots; their rows are empty (slots have no queries)",
            ),
            _attention_view(
                f"{who} · with {prefix_name}: content attention renormalised",
                content_pattern,
                content,
                head_names,
            ),
            _attention_view(
                f"{who} · without {prefix_name}" + (" (same layer input)" if l > 0 else ""),
                baseline,
                content,
                head_names,
            ),
        ]
        err = float((content_pattern - baseline).nan_to_num(0.0).abs().max())
        rows.append(
            Row(
                f"{who}: attention with and without {prefix_name}",
                views,
                f"prefix attention mass A = {float(mass):.3f} (mean over content positions); "
                f"max |renormalised − without prefix| = {err:.2e}",
                layout="main-stack",
            )
        )
    return rows[0] if _is_one_index(layer) else rows


def _content_labels(tokens, model, example: int, T: int, P: int = 0) -> list[str]:
    if tokens is None:
        return [str(i) for i in range(T)]
    if isinstance(tokens, str):
        if model is None:
            raise ValueError(
                "tokens: a string needs model= to be tokenized (or pass the ids, or a list of ready-made labels)."
            )
        tokens, mask = tokens_and_mask(model, tokens, continuation=P > 0)
    if isinstance(tokens, Tensor):
        t = tokens if tokens.ndim == 1 else tokens[example]
        labels = token_labels(model, t) if model is not None else [str(int(i)) for i in t.tolist()]
    else:
        labels = [str(s) for s in tokens]
    if len(labels) != T:
        raise ValueError(
            f"tokens: got {len(labels)} token labels but the decomposition has {T} content positions; pass the "
            f"content the decomposition was made on (its ids, its text, or one label per position)."
        )
    return labels


def prefix_mass_figure(
    decomposition: HeadDecomposition,
    tokens: Int[Tensor, "batch pos"] | Sequence[str] | None = None,
    model=None,
    example: int = 0,
    layer: int | Sequence[int] | None = None,
    interactive: bool = True,
    heads: Sequence[tuple[int, int]] | None = None,
) -> Figure | Row:
    """Per-head prefix attention mass ``A`` at every content position, as a heatmap (rows ``L·H``).

    ``tokens`` are the content ids (labelled with ``model`` when given) or ready-made labels.
    ``layer`` keeps every head of some layers; ``heads`` (``[(layer, head), …]``) keeps just those
    rows. With ``interactive=True`` a CircuitsVis ``TextNeuronActivations`` view (pick a layer and head,
    the tokens are coloured by ``A``) of every selected layer is shown next to the heatmap.

    Args:
        decomposition: the decomposition of the prefixed run.
        tokens: the content ids ``[batch, pos]``, its text (one string, tokenized with ``model``), or
            one label per content position.
        model (TransformerBridge | None): the model whose tokenizer labels the ids.
        example: the row to show.
        layer: keep every head of this layer or these layers (``None``: all layers).
        interactive: add the CircuitsVis view next to the heatmap.
        heads: keep only these ``(layer, head)`` rows.

    Returns:
        The heatmap, or a row of the heatmap and the interactive view.
    """
    A = decomposition.prefix_attention  # [layer, batch, head, pos]
    n_layers, B, H, T = A.shape
    example = _index_in_range(example, B, "example")
    if heads is not None:
        pairs = [(_index_in_range(l, n_layers, "heads: layer"), _index_in_range(h, H, "heads: head")) for l, h in heads]
        layers = sorted({l for l, _ in pairs})
    else:
        layers = _indices(layer, n_layers, "layer")
        pairs = [(l, h) for l in layers for h in range(H)]
    labels = _content_labels(tokens, model, example, T, decomposition.n_slots)
    values = A[layers, example].detach().double().cpu()  # [L, H, T]
    rows = torch.stack([A[l, example, h].detach().double().cpu() for l, h in pairs])  # [rows, T]
    row_names = [head_label(l, h) for l, h in pairs]
    svg = heatmap_svg(rows, row_names, labels, vmin=0.0, vmax=1.0, legend="A")
    heat = Figure(
        f"Prefix attention mass A per head and content position (P = {decomposition.n_slots})",
        "svg",
        {"markup": svg},
        "share of each head's attention that goes to the prefix slots, at every content position (0 white, 1 dark)",
        data={"A": values if heads is None else rows, "rows": row_names, "tokens": labels},
    )
    if not interactive:
        return heat
    if heads is None:
        activations = values.permute(2, 0, 1).float()  # [pos, layer, head]
        props = {"firstDimensionName": "Layer", "secondDimensionName": "Head", "firstDimensionLabels": [str(l) for l in layers]}
    else:  # the chosen heads themselves, so the view opens on one of them
        activations = rows.T[:, :, None].float()  # [pos, chosen head, 1]
        props = {
            "firstDimensionName": "Head", "secondDimensionName": "Example",
            "firstDimensionLabels": row_names, "secondDimensionLabels": [str(example)],
        }
    # CircuitsVis writes the tokens one after another: bare ids (a toy tokenizer's) would run together
    shown = [f"{t} " for t in labels] if all(t.isdigit() for t in labels) else labels
    neurons = Figure(
        "A by token (choose layer and head)" if heads is None else "A by token (choose one of the heads above)",
        "TextNeuronActivations",
        {"tokens": shown, "activations": activations, **props},
    )
    return Row("Prefix attention mass", [heat, neurons])


def prefix_mass_grid_figure(
    decomposition: HeadDecomposition,
    example: int | None = None,
    highlight: Sequence[tuple[int, int]] = (),
    title: str | None = None,
    caption: str | None = None,
) -> Figure:
    """The mean prefix attention mass ``A`` of every head as one ``head × layer`` heatmap (layers
    across, so a deep model fits the page), averaged over the content positions and the examples (or
    one ``example``). ``highlight`` outlines some heads (``[(layer, head), …]``) in red.

    Args:
        decomposition: the decomposition of the prefixed run.
        example: the row to average over (``None``: all examples).
        highlight: ``(layer, head)`` cells to outline.
        title: the figure's title (default: a description of the view).
        caption: the figure's caption (default: what the grid averages over).
    """
    A = decomposition.prefix_attention.double().cpu()  # [L, B, H, T]
    L, B, H, _ = A.shape
    if example is not None:
        example = _index_in_range(example, B, "example")
        A = A[:, example : example + 1]
    grid = A.mean(dim=(1, 3))  # [L, H]
    highlight = [(_index_in_range(l, L, "highlight: layer"), _index_in_range(h, H, "highlight: head")) for l, h in highlight]
    svg = heatmap_svg(
        grid.T,
        [f"H{h}" for h in range(H)],
        [f"L{l}" for l in range(L)],
        vmin=0.0,
        vmax=1.0,
        highlight=[(h, l) for l, h in highlight],
        legend="A",
    )
    where = "all examples" if example is None else f"example {example}"
    return Figure(
        title or f"Prefix attention mass A of every head (P = {decomposition.n_slots})",
        "svg",
        {"markup": svg},
        caption
        or f"mean over the content positions and {where}; rows are heads, columns layers"
        + ("; heads outlined in red are shown below" if highlight else ""),
        data={"A": grid, "highlight": list(highlight)},
    )


def attention_output_shift(
    model,
    tokens: "Int[Tensor, 'sample pos'] | str | list[str]",
    prefixes: Mapping[str, Prefix] | Sequence[Prefix],
    layers: int | Sequence[int] | None = None,
    position: int = -1,
) -> dict:
    """Attention-block outputs (``blocks.{L}.hook_attn_out``) at one content position for every sample,
    without a prefix and with each prefix, for several layers in one pass per prefix.

    Returns ``{"names", "position", "layers", "plain": {L: [N, d_model]}, "shifted": {L: [K, N, d_model]},
    "shift": {L: [K, N]} (‖prefixed − plain‖), "spread": {L: float} (mean ‖plain − mean plain‖)}``
    (float64, CPU). The plain run is the model on ``tokens`` alone.

    Args:
        model (TransformerBridge): the model to run.
        tokens: the samples: ``[sample, pos]`` token ids, or a list of strings (content after the
            prefixes, no BOS; a ragged list is left-padded with a mask).
        prefixes: the prefixes by name, or a sequence of them (named by position).
        layers: the layer(s) to read (``None``: all).
        position: the content position to read (``-1``: the last).
    """
    named = list(prefixes.items()) if isinstance(prefixes, Mapping) else [(f"prefix {i}", p) for i, p in enumerate(prefixes)]
    if not named:
        raise ValueError("give at least one prefix.")
    tokens, mask = _content(model, tokens, None, continuation=True)  # the content after each prefix
    N, T = tokens.shape
    pos = _index_in_range(position, T, "position")
    if mask is not None and not bool(mask[:, pos].all()):
        raise ValueError(
            f"position {position} is padding in some rows of the (ragged) text; choose a position that is a real "
            f"token in every row (with left padding, -1 is the last real token of every row)."
        )
    layers = _layers(model, layers)
    names = {f"blocks.{l}.hook_attn_out": l for l in layers}
    with torch.no_grad():
        # the plain run: the same content tokens (no BOS: they are the content after each prefix)
        _, cache = run_with_cache(model, tokens, None, names_filter=lambda n: n in names, attention_mask=mask)
        plain = {l: cache[n][:, pos].detach().double().cpu() for n, l in names.items()}
        shifted = {l: [] for l in layers}
        for _, prefix in named:
            check_tokens(model, tokens, prefix)
            _, pcache = run_with_cache(
                model, tokens, prefix, names_filter=lambda n: n in names, attention_mask=mask
            )
            for n, l in names.items():
                shifted[l].append(pcache[n][:, prefix.length + pos].detach().double().cpu())
    shifted = {l: torch.stack(v) for l, v in shifted.items()}
    return {
        "names": [n for n, _ in named],
        "position": pos,
        "layers": layers,
        "plain": plain,
        "shifted": shifted,
        "shift": {l: (shifted[l] - plain[l]).norm(dim=-1) for l in layers},
        "spread": {l: float((plain[l] - plain[l].mean(0)).norm(dim=-1).mean()) for l in layers},
    }


def bias_shift_figure(
    model,
    tokens: "Int[Tensor, 'sample pos'] | str | list[str]",
    prefixes: Mapping[str, Prefix] | Sequence[Prefix],
    layer: int = 0,
    position: int = -1,
    title: str | None = None,
) -> Figure:
    """The paper's Figure 3: attention-block outputs (``blocks.{layer}.hook_attn_out``) at one content
    position, for every sample without a prefix and with each prefix, lines joining each sample's
    plain point to its prefixed ones.

    The plain run is the model on ``tokens`` alone. Points are projected to 2-D by PCA over all of
    them pooled (deterministic: SVD in float64, each component's largest loading made positive); a
    ``d_model = 2`` model is plotted as is, like the paper.

    Args:
        model (TransformerBridge): the model to run.
        tokens: the samples: ``[sample, pos]`` token ids, or a list of strings, as in
            :func:`attention_output_shift`.
        prefixes: the prefixes by name, or a sequence of them (named by position).
        layer: the layer whose attention output is shown.
        position: the content position to read (``-1``: the last).
        title: the figure's title (default: a description of the view).
    """
    if not _is_one_index(layer):
        raise TypeError(f"layer must be one int (bias_shift_figure shows one layer), got {layer!r}.")
    (layer,) = _layers(model, layer)
    shift_data = attention_output_shift(model, tokens, prefixes, layers=[layer], position=position)
    names, pos = shift_data["names"], shift_data["position"]
    plain, shifted = shift_data["plain"][layer], shift_data["shifted"][layer]
    N, K = plain.shape[0], len(names)
    points = torch.cat([plain, *shifted])  # [(K+1)·N, d_model]
    coords, axes = project_2d(points)
    groups = [("without prefix", coords[:N])] + [(n, coords[(k + 1) * N : (k + 2) * N]) for k, n in enumerate(names)]
    svg = scatter_svg(groups, axes)
    shift = shift_data["shift"][layer]  # [K, N]
    prefixes_said = "1 prefix" if K == 1 else f"{K} prefixes"
    caption = (
        f"layer {layer}, content position {pos}, {N} samples, {prefixes_said}. Mean shift ‖with − without‖ of the "
        "attention-block output (L2 norm, residual-stream units): "
        + ", ".join(f"{n} {float(shift[k].mean()):.3g}" for k, n in enumerate(names))
        + f"; for scale, the samples' mean distance from their mean without a prefix is {shift_data['spread'][layer]:.3g}"
    )
    return Figure(
        title or f"L{layer} attention-block output with and without the prefix (paper Figure 3)",
        "svg",
        {"markup": svg},
        caption,
        data={"points": points, "coords": coords, "groups": [g for g, _ in groups], "axes": axes, "shift": shift},
    )


def summary_figure(decompositions: Mapping[str, HeadDecomposition], title: str = "Decomposition checks") -> Figure:
    """A table of each decomposition's errors and mean prefix attention, per layer."""
    head = ["prefix", "layer", "max |z − ((1−A)t + A b)|", "max |renormalised − without prefix|", "mean A", "layer-input shift"]
    rows = []
    for name, d in decompositions.items():
        s = d.summary()
        for l in range(d.n_layers):
            rel = s.get("relative_attention_error_per_layer")
            shift = s.get("cross_layer_shift_per_layer")
            rows.append(
                [
                    name,
                    str(l),
                    f"{s['reconstruction_error_per_layer'][l]:.2e}",
                    f"{rel[l]:.2e}" if rel else "–",
                    f"{s['mean_prefix_attention_per_layer'][l]:.3f}",
                    f"{shift[l]:.3f}" if shift else "–",
                ]
            )
    fig = table_figure(title, head, rows)
    return Figure(fig.title, fig.component, fig.props, fig.caption, data={"rows": rows})


def table_figure(
    title: str,
    header: Sequence[str],
    rows: Sequence[Sequence[object]],
    caption: str = "",
    text_columns: Sequence[int] = (),
) -> Figure:
    """A plain HTML table (cells escaped). Columns in ``text_columns`` are left-aligned and wrap,
    with their line breaks kept (for generated text); the others are right-aligned (numbers).

    Args:
        title: the table's title.
        header: the column names.
        rows: the cells, one sequence per row.
        caption: a caption under the table.
        text_columns: the indices of the text columns.
    """
    text = set(text_columns)

    def cls(j):
        return " class='pl-text'" if j in text else ""

    cells = "".join(f"<th{cls(j)}>{_html.escape(str(h))}</th>" for j, h in enumerate(header))
    body = "".join(
        "<tr>" + "".join(f"<td{cls(j)}>{_html.escape(str(c))}</td>" for j, c in enumerate(r)) + "</tr>" for r in rows
    )
    markup = f"<table class='pl-table'><thead><tr>{cells}</tr></thead><tbody>{body}</tbody></table>"
    return Figure(title, "html", {"markup": markup}, caption, data={"header": list(header), "rows": [list(r) for r in rows]})


def svg_figure(title: str, svg: str, caption: str = "") -> Figure:
    """Wrap SVG markup you made yourself (it must not load anything)."""
    if not svg.lstrip().startswith("<svg"):
        raise ValueError("svg must be an <svg> element.")
    return Figure(title, "svg", {"markup": svg}, caption)


# -------------------------------------------------------------------------------------------- projection


def project_2d(points: Tensor) -> tuple[Tensor, list[str]]:
    """PCA to two dimensions (or the raw coordinates when there are only two).

    Deterministic: SVD of the centred points in float64, each component's largest loading made
    positive. Returns the ``[N, 2]`` coordinates and the two axis labels (with the share of variance).
    """
    points = points.double()
    if points.shape[1] <= 2:
        coords = torch.zeros(points.shape[0], 2, dtype=torch.float64)
        coords[:, : points.shape[1]] = points
        return coords, ["dimension 0", "dimension 1"]
    centred = points - points.mean(0, keepdim=True)
    _, S, Vh = torch.linalg.svd(centred, full_matrices=False)
    comps = Vh[:2]
    signs = torch.sign(comps.gather(1, comps.abs().argmax(1, keepdim=True)))
    comps = comps * torch.where(signs == 0, torch.ones_like(signs), signs)
    coords = centred @ comps.T
    if coords.shape[1] < 2:
        coords = torch.cat([coords, torch.zeros(coords.shape[0], 2 - coords.shape[1], dtype=coords.dtype)], 1)
    var = S.square()
    frac = (var / var.sum()).tolist() if float(var.sum()) > 0 else [0.0, 0.0]
    frac += [0.0] * (2 - len(frac))
    return coords, [f"PC1 ({100 * frac[0]:.0f}% of variance)", f"PC2 ({100 * frac[1]:.0f}% of variance)"]


_project_2d = project_2d  # the old private name
