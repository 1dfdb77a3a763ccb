"""``prefixlens demo``: an instruction turned into a prefix on the built-in real model, checked, decomposed
and shown as a self-contained HTML report (or three prefixes on a random toy model).

Importing this module is cheap (torch and the model load when :func:`demo` runs), so the CLI's
``--help`` stays fast.
"""

from __future__ import annotations

import os

__all__ = ["demo", "DemoError"]


class DemoError(ValueError):
    """A demo setting that cannot work (an unknown model, too few samples): printed without a traceback."""

#: ``--model`` choices; ``gpt2`` and ``llama`` are the toy models' earlier names, still accepted.
DEMO_MODELS = ("smollm2-135m", "toy-gpt2", "toy-llama")
_DEMO_ALIASES = {"gpt2": "toy-gpt2", "llama": "toy-llama"}

#: The real demo's instruction (a system message) and the user questions it is put in front of. The
#: questions have the same number of tokens (15 with the chat markup), so they batch without padding.
DEMO_INSTRUCTION = "You are a pirate. Talk like a pirate."
DEMO_QUESTIONS = (
    "What is your favourite food?",
    "What did you do yesterday?",
    "What is the weather like?",
    "Who is your best friend?",
    "Tell me about your ship.",
    "Where are you going next?",
    "How old are you now?",
    "Do you have any pets?",
)
#: What the real demo calls a pass (float32 model): the prefix against the real prompt, and the
#: decomposition's two identities. Measured: 0.0, 2.4e-6 and 0.0.
DEMO_TOLERANCES = {"logits": 1e-3, "reconstruction": 1e-4, "relative_attention": 1e-4}
#: How many heads the real demo shows in full (chosen by ``report.select_heads``).
DEMO_HEADS = 4


def demo(
    out: str | os.PathLike = "prefixlens-demo.html",
    model_kind: str = "smollm2-135m",
    seed: int = 0,
    n_samples: int = 8,
    quiet: bool = False,
    instruction: str | None = None,
    max_new_tokens: int = 20,
):
    """An end-to-end study; returns ``(report path, {prefix name: summary})``.

    ``model_kind="smollm2-135m"`` (the default): a real instruction on the built-in real model
    (:func:`_demo_real`); ``"toy-gpt2"`` / ``"toy-llama"``: three prefixes on a random toy model
    (:func:`_demo_toy`).

    Args:
        out: where to write the HTML report.
        model_kind: ``"smollm2-135m"``, ``"toy-gpt2"`` or ``"toy-llama"``.
        seed: the seed of the toy model and its inputs (toy demos).
        n_samples: how many inputs (questions on the real model) to run.
        quiet: print nothing.
        instruction: the real demo's instruction (``None``: the built-in one).
        max_new_tokens: how many tokens to generate per question (real demo).
    """
    kind = _DEMO_ALIASES.get(model_kind, model_kind)
    if kind not in DEMO_MODELS:
        raise DemoError(f"unknown demo model {model_kind!r}; choose one of {', '.join(DEMO_MODELS)}.")
    if kind == "smollm2-135m":
        return _demo_real(out, instruction or DEMO_INSTRUCTION, n_samples, max_new_tokens, quiet)
    return _demo_toy(out, kind.removeprefix("toy-"), seed, n_samples, quiet)


def _say(quiet: bool):
    def say(*a):
        if not quiet:
            print(*a, flush=True)

    return say


def _continuation(tokenizer, ids, eos: int | None) -> str:
    """Generated ids as text, up to (without) the first EOS."""
    ids = [int(i) for i in ids]
    if eos is not None and eos in ids:
        ids = ids[: ids.index(eos)]
    return tokenizer.decode(ids, skip_special_tokens=True).strip()


#: The report's explanation of the decomposition (real and toy demos).
WHAT_A_T_B = (
    "<p><b>What A, t and b are:</b> at every content position each head's output is "
    "<b>z = (1 − A)·t + A·b</b>, where <b>A</b> is the share of the head's attention that goes to the prefix "
    "slots, <b>t</b> is the output the head gives attending to the content alone (with the same attention as "
    "without the prefix, for the same layer input) and <b>b</b> is the attention-weighted average of the "
    "prefix's values, a bias the prefix adds (Petrov, Torr &amp; Bibi, ICLR 2024).</p>"
)


def _demo_real(out, instruction: str, n_samples: int, max_new_tokens: int, quiet: bool):
    """The instruction as a system message, turned into a :class:`~prefixlens.KVPrefix`, on SmolLM2-135M-Instruct.

    1. ``KVPrefix.from_prompt`` of the instruction's tokens; checked against the real prompt (max
       |Δ logits| at every content position, and the same greedy continuation);
    2. ``pl.decompose`` on every head of every layer (``z = (1 − A)·t + A·b`` and the unchanged
       relative attention);
    3. where the prefix's attention goes: the attention sink (slot 0), the chat template and the
       instruction's own tokens, against the template alone (:mod:`prefixlens.attribution`);
    4. which heads' biases move the answer: each head's direct effect on the logit of the first
       answer token with the prefix against the one without it, net of the template;
    5. a report telling it in that order, then the attention of the heads with the largest effect
       and of the heads with the clearest patterns, ``A`` by token and the shift of the
       attention-block output (paper Figure 3).
    """
    import time

    import torch

    import prefixlens as pl
    from prefixlens import attribution, models, report, text

    start = time.perf_counter()
    say = _say(quiet)
    if not 2 <= n_samples <= len(DEMO_QUESTIONS):
        raise DemoError(f"--samples must be between 2 and {len(DEMO_QUESTIONS)} for the smollm2-135m demo.")
    if max_new_tokens < 1:
        raise DemoError("--max-new-tokens must be at least 1.")
    try:
        model = models.load("smollm2-135m")
    except (ModuleNotFoundError, FileNotFoundError) as err:
        raise DemoError(f"{err}\nOr run the demo on a random toy model: prefixlens demo --model toy-gpt2") from None
    cfg = model.cfg
    say(
        f"model: SmolLM2-135M-Instruct ({cfg.n_layers} layers × {cfg.n_heads} heads, {getattr(cfg, 'n_key_value_heads', None) or cfg.n_heads} KV heads, "
        f"{str(cfg.dtype).removeprefix('torch.')}), loaded in {time.perf_counter() - start:.1f} s"
    )
    tokenizer = model.tokenizer
    eos = tokenizer.eos_token_id
    prompt_text = f"<|im_start|>system\n{instruction}<|im_end|>\n"
    neutral_text = "<|im_start|>system\n<|im_end|>\n"
    questions = list(DEMO_QUESTIONS[:n_samples])
    contents = [f"<|im_start|>user\n{q}<|im_end|>\n<|im_start|>assistant\n" for q in questions]
    prompt = torch.tensor(text.encode(model, prompt_text))
    neutral = torch.tensor(text.encode(model, neutral_text))
    tokens, mask = text.tokens_and_mask(model, contents, continuation=True)  # the questions follow the prompt
    if mask is not None:  # the built-in questions all have 15 tokens
        raise DemoError("the demo questions must have the same number of tokens.")
    N, T, P = tokens.shape[0], tokens.shape[1], prompt.numel()
    name = "the instruction prefix"
    say(f"instruction: {instruction!r} as a system message, {P} tokens -> KVPrefix.from_prompt; {N} questions of {T} tokens")

    # 1. the prefix against the real prompt
    prefix = pl.KVPrefix.from_prompt(model, prompt)
    with_prompt = torch.cat([prompt.expand(N, -1), tokens], 1)
    with torch.no_grad():
        logit_error = float((pl.run_with_prefix(model, tokens, prefix) - model(with_prompt)[:, P:]).abs().max())
        gen_prefix = pl.generate(model, tokens, prefix, max_new_tokens=max_new_tokens, eos_token_id=eos)[:, T:]
        gen_prompt = pl.generate(model, with_prompt, None, max_new_tokens=max_new_tokens, eos_token_id=eos)[:, P + T :]
        gen_plain = pl.generate(model, tokens, None, max_new_tokens=max_new_tokens, eos_token_id=eos)[:, T:]
    same = [bool(torch.equal(a, b)) for a, b in zip(gen_prefix, gen_prompt)]
    say(
        f"prefix vs the real prompt: max |Δ logits| = {logit_error:.2e} over {N} × {T} positions "
        f"(tolerance {DEMO_TOLERANCES['logits']:g}); same greedy continuation ({max_new_tokens} tokens): "
        f"{sum(same)}/{N}"
    )

    # 2. the decomposition on every head
    d = pl.decompose(model, tokens, prefix)
    s = d.summary()
    rel = max(s["relative_attention_error_per_layer"])
    mean_A = float(d.prefix_attention.mean())
    say(f"{'prefix':<24} {'P':>2} {'reconstruction':>15} {'relative attn':>14} {'mean A':>7}")
    say(f"{'instruction (KV prefix)':<24} {P:>2} {s['reconstruction_error']:>15.2e} {rel:>14.2e} {mean_A:>7.3f}")
    texts = [(_continuation(tokenizer, a, eos), _continuation(tokenizer, b, eos)) for a, b in zip(gen_plain, gen_prefix)]
    for q, (plain, pirate) in list(zip(questions, texts))[:3]:
        say(f"  {q}\n    without: {plain!r}\n    with:    {pirate!r}")

    # 3-4. sink vs instruction, and the heads whose bias moves the answer (first token with vs without)
    story = attribution.compare_with_neutral(
        model, tokens, prompt, neutral, answer=gen_prefix[:, 0], contrast=gen_plain[:, 0]
    )
    story.split = attribution.slot_groups(d, story.groups)  # the same numbers, from the decomposition shown
    size = attribution.bias_size(d)
    shares = story.split.share()
    say(
        "where the prefix's attention goes (mean over heads): "
        + ", ".join(f"{g} {v:.3f}" for g, v in shares.items())
        + f"; the template alone takes {float(story.neutral_mass.mean()):.3f}"
    )
    say(
        f"direct effect of all heads' biases on the answer's logit difference: {float(story.effect.all_heads.mean()):+.3f} "
        f"(template alone {float(story.neutral_effect.all_heads.mean()):+.3f})"
    )
    s = dict(
        s, max_logit_error_vs_prompt=logit_error, same_greedy_continuation=all(same),
        attention_share=shares, **{k: v for k, v in story.summary().items() if not k.startswith("mass_")},
    )

    # 5. the report
    effect_heads = attribution.top_heads(story.net_effect(), k=DEMO_HEADS // 2)
    pattern_heads = [h for h in report.select_heads(d, k=DEMO_HEADS) if h not in effect_heads][: DEMO_HEADS - len(effect_heads)]
    deficit = report.entropy_deficit(d)
    shift = report.attention_output_shift(model, tokens, {name: prefix}, position=-1)
    ratio = {l: float(shift["shift"][l].mean()) / max(shift["spread"][l], 1e-12) for l in shift["layers"]}
    shift_layer = max(ratio, key=ratio.get)
    slots = report.token_labels(model, prompt)
    figures = _real_figures(
        report, model, tokens, prompt_text, prefix, d, s, questions, texts, same, effect_heads, pattern_heads,
        deficit, story, size, shift_layer, ratio, slots, name, max_new_tokens,
    )
    path = report.html(out, figures, title="prefixlens demo: an instruction as a prefix on SmolLM2-135M-Instruct")
    say(
        f"wrote {path} ({path.stat().st_size / 1e6:.2f} MB, self-contained; open it in a browser) "
        f"in {time.perf_counter() - start:.1f} s"
    )
    return path, {"instruction (KV prefix)": s}


def _real_figures(report, model, tokens, prompt_text, prefix, d, s, questions, texts, same, effect_heads,
                  pattern_heads, deficit, story, size, shift_layer, ratio, slots, name, max_new_tokens):
    import html as _html

    cfg = model.cfg
    L, H = int(cfg.n_layers), int(cfg.n_heads)
    N, T, P = tokens.shape[0], tokens.shape[1], prefix.length
    tol = DEMO_TOLERANCES
    rel = max(s["relative_attention_error_per_layer"])
    e = _html.escape
    A_head = d.prefix_attention.double().mean(dim=(1, 3))
    net = story.net_effect()
    mass = story.mass()
    shares = story.split.share()
    heads = sorted(set(effect_heads) | set(pattern_heads))

    def why(l, h):
        return "largest bias effect" if (l, h) in effect_heads else "clearest pattern"

    lead = (
        "<div class='pl-lead'>"
        f"<p>The instruction <code>{e(prompt_text)}</code> ({P} tokens) was turned into a key/value prefix with "
        f"<code>KVPrefix.from_prompt</code>: its keys and values in every layer, attached to SmolLM2-135M-Instruct "
        f"({L} layers × {H} heads) in front of {N} user questions in the chat format ({T} tokens each). "
        "Prefix slots are labelled with the instruction token they hold, in [brackets]; spaces show as ·, "
        "newlines as ↵.</p>"
        + WHAT_A_T_B
        + "<p><b>Read in this order:</b> the checks; the answers with and without the prefix; where the prefix's "
        "attention goes (most of A sits on the first slot, an <i>attention sink</i> that many heads use whatever "
        "token is there, not on the instruction); which heads' biases move the answer; then the attention of "
        f"{len(heads)} heads: {e(', '.join(f'{report.head_label(l, h)} ({why(l, h)})' for l, h in heads))}.</p></div>"
    )
    intro = report.Figure("", "html", {"markup": lead})
    checks = report.table_figure(
        "1. The checks",
        ["check", "measured", "tolerance", "passed"],
        [
            ["prefix vs the real prompt: max |Δ logits| at every content position", f"{s['max_logit_error_vs_prompt']:.2e}",
             f"{tol['logits']:g}", "yes" if s["max_logit_error_vs_prompt"] <= tol["logits"] else "NO"],
            [f"prefix vs the real prompt: same greedy continuation ({max_new_tokens} tokens)", f"{sum(same)}/{N}",
             f"{N}/{N}", "yes" if all(same) else "NO"],
            [f"max |z − ((1 − A)·t + A·b)| over all {L} × {H} heads", f"{s['reconstruction_error']:.2e}",
             f"{tol['reconstruction']:g}", "yes" if s["reconstruction_error"] <= tol["reconstruction"] else "NO"],
            ["max |renormalised content attention − attention without the prefix| (same layer input)", f"{rel:.2e}",
             f"{tol['relative_attention']:g}", "yes" if rel <= tol["relative_attention"] else "NO"],
        ],
        caption="float32; errors are absolute (logits, and hook_z in the residual stream's units); per-layer numbers "
        "at the end of the page",
        text_columns=[0],
    )
    generated = report.table_figure(
        "2. What the model answers, with and without the instruction prefix",
        ["question", "without the prefix", f"with {name}", "same as with the real prompt"],
        [[q, a, b, "yes" if ok else "NO"] for q, (a, b), ok in zip(questions, texts, same)],
        caption=f"greedy decoding, up to {max_new_tokens} new tokens or <|im_end|>; the prefixed run and the run "
        "on the real prompt + question give the same tokens",
        text_columns=[0, 1, 2],
    )
    groups = report.slot_groups_figure(
        story.split, story.neutral_mass, title="3. Where the prefix's attention goes: the sink, the template, the instruction"
    )
    group_table = report.table_figure(
        "How much of A is the instruction",
        ["slots", "tokens", "mean attention (share of all attention)"],
        [[g, " ".join(slots[i] for i in story.groups.get(g, [])) or "–", f"{v:.3f}"] for g, v in shares.items()]
        + [["the whole prefix (A)", f"{P} slots", f"{float(d.prefix_attention.mean()):.3f}"],
           ["the template alone, as its own prefix", "the prompt with an empty instruction", f"{float(story.neutral_mass.mean()):.3f}"]],
        caption="mean over all heads, content positions and questions. The first slot is an attention sink: heads "
        "that put their attention there with the prefix put it on the content's own first token without it; "
        "A counts it, so A overstates what the instruction itself receives",
        text_columns=[0, 1],
    )
    effect = report.head_effect_figure(
        net, highlight=effect_heads,
        title="4. Which heads' biases move the answer (net of the template)",
        caption="per head, the direct effect of its bias A·b·W_O on the logit of the first answer token with the prefix "
        "minus the first token without it (logits; mean over questions), with the instruction minus with the template "
        "alone; direct = through the final norm and unembedding only. All heads' biases together: "
        f"{float(story.effect.all_heads.mean()):+.2f} with the instruction, {float(story.neutral_effect.all_heads.mean()):+.2f} "
        "with the template alone; heads outlined in red are shown below",
    )
    from prefixlens.attribution import top_heads

    top = []
    for l, h in top_heads(net, k=8):
        top.append([
            report.head_label(l, h), f"{float(net[l, h]):+.3f}", f"{float(story.effect.mean()[l, h]):+.3f}",
            f"{float(A_head[l, h]):.3f}", f"{float(mass['instruction'][l, h]):.3f}" if "instruction" in mass else "–",
            f"{float(size.bias[l, h]):.2f}", f"{float(size.content[l, h]):.2f}",
        ])
    heads_table = report.table_figure(
        "The heads whose bias moves the answer most",
        ["head", "net effect (Δ logit)", "effect with the instruction", "A", "A on the instruction",
         "‖A·b·W_O‖", "‖(1 − A)·t·W_O‖"],
        top,
        caption="effects in logits of the answer-vs-contrast difference; the norms are mean vector norms in the residual "
        "stream (d_model units) over content positions and questions",
        text_columns=[0],
    )
    rows = []
    for l, h in heads:
        row = report.attention_figure(model, tokens, prefix, layer=l, head=h, example=0, decomposition=d,
                                      prefix_name=name, slot_names=slots)
        rows.append(report.Row(
            f"{row.title} — shown for its {why(l, h)}", row.figures,
            row.caption + f"; net bias effect {float(net[l, h]):+.3f} logits; content-attention entropy deficit "
            f"{float(deficit[l, h]):.2f} nats", layout=row.layout,
        ))
    grid = report.prefix_mass_grid_figure(d, highlight=heads, title=f"Prefix attention mass A of every head (P = {P})")
    per_token = report.prefix_mass_figure(d, tokens, model=model, example=0, heads=heads)
    bias = report.bias_shift_figure(
        model, tokens, {name: prefix}, layer=shift_layer, position=-1,
        title=f"L{shift_layer} attention-block output at the last position, with and without {name} (paper Figure 3)",
    )
    bias = report.Figure(
        bias.title, bias.component, bias.props,
        bias.caption + f"; layer {shift_layer} is where the mean shift is largest against the spread without the "
        f"prefix ({ratio[shift_layer]:.1f}×, of all {L} layers)",
        data=bias.data,
    )
    per_layer = report.summary_figure({name: d}, title="Decomposition checks per layer")
    return [intro, checks, generated, groups, group_table, effect, heads_table, *rows, grid, per_token, bias, per_layer]


def _demo_toy(out, model_kind: str, seed: int, n_samples: int, quiet: bool):
    """A small end-to-end study on a random toy model: three prefixes, every head decomposed."""
    import torch

    import prefixlens as pl
    from prefixlens import models, report

    say = _say(quiet)
    torch.manual_seed(seed)
    build = {"gpt2": models.toy_gpt2, "llama": models.toy_llama}[model_kind]
    model = build(n_layers=2, d_model=64, n_heads=4, d_vocab=101, seed=seed)
    say(f"model: toy {model_kind}, {model.cfg.n_layers} layers, {model.cfg.n_heads} heads, d_model {model.cfg.d_model}")
    gen = torch.Generator().manual_seed(seed)
    bos = torch.ones(n_samples, 1, dtype=torch.long)
    tokens = torch.cat([bos, torch.randint(3, 101, (n_samples, 9), generator=gen)], dim=1)
    prompt = torch.tensor([1, 11, 12, 13])

    prefixes = {
        "prompt (KV prefix)": pl.KVPrefix.from_prompt(model, prompt),
        "random residual prefix": pl.ResidualPrefix.random(model, 2, seed=seed + 1),
        "random soft prompt": pl.SoftPrompt.random(model, 3, seed=seed + 2),
    }
    with torch.no_grad():
        exact = (pl.run_with_prefix(model, tokens, prefixes["prompt (KV prefix)"]) - model(
            torch.cat([prompt.expand(n_samples, -1), tokens], 1))[:, prompt.numel():]).abs().max()
    say(f"KV prefix from a real prompt vs the prompt itself: max |Δ logits| = {float(exact):.2e}")

    decompositions, summaries = {}, {}
    say(f"{'prefix':<24} {'P':>2} {'reconstruction':>15} {'relative attn':>14} {'mean A':>7}")
    for name, prefix in prefixes.items():
        d = pl.decompose(model, tokens, prefix)
        decompositions[name] = d
        summaries[name] = s = d.summary()
        say(
            f"{name:<24} {prefix.length:>2} {s['reconstruction_error']:>15.2e} "
            f"{max(s['relative_attention_error_per_layer']):>14.2e} "
            f"{sum(s['mean_prefix_attention_per_layer']) / len(s['mean_prefix_attention_per_layer']):>7.3f}"
        )
    first, resid = "prompt (KV prefix)", "random residual prefix"
    lead = (
        f"<div class='pl-lead'><p>A random toy {model_kind} ({model.cfg.n_layers} layers × {model.cfg.n_heads} heads, "
        f"d_model {model.cfg.d_model}) with three prefixes in front of {n_samples} random token sequences: a key/value "
        "prefix made from a real prompt (exact against the prompt itself), a random residual-stream prefix and a "
        "random soft prompt. Tokens are shown by their ids.</p>" + WHAT_A_T_B + "</div>"
    )
    figures = [
        report.Figure("", "html", {"markup": lead}),
        report.summary_figure(decompositions),
        report.attention_figure(model, tokens, prefixes[first], layer=0, decomposition=decompositions[first],
                                prefix_name="the prompt prefix", slot_names=report.token_labels(model, prompt)),
        report.attention_figure(model, tokens, prefixes[resid], layer=1, head=0, decomposition=decompositions[resid],
                                prefix_name="the random residual prefix"),
        report.prefix_mass_figure(decompositions[first], tokens, model=model),
        report.bias_shift_figure(model, tokens, prefixes, layer=int(model.cfg.n_layers) - 1),
    ]
    path = report.html(out, figures, title=f"prefixlens demo: toy {model_kind}")
    say(f"wrote {path} ({path.stat().st_size / 1e6:.2f} MB, self-contained; open it in a browser)")
    return path, summaries
