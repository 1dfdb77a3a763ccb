"""The ``prefixlens`` command: ``prefixlens demo`` and ``prefixlens run <analysis>``.

``prefixlens demo`` turns an instruction into a prefix on SmolLM2-135M-Instruct (or attaches prefixes
to a random toy model, ``--model toy-gpt2``), checks it against the real prompt, decomposes every head,
prints the errors of the decomposition and writes a self-contained HTML report. ``prefixlens run NAME [options]`` runs
``analyses/NAME.py`` (its ``main(argv)``), the scripts that reproduce the paper's sections; they
live in the repository's ``analyses/`` folder next to the package (``pip install -e .``), or in the
folder named by ``--analyses-dir`` / ``$PREFIXLENS_ANALYSES``.
"""

from __future__ import annotations

import argparse
import ast
import importlib
import importlib.util
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from prefixlens.experiment import summary

__all__ = ["main", "find_analyses_dir", "list_analyses", "load_analysis", "demo", "CLIError", "call_main"]

ANALYSES_ENV = "PREFIXLENS_ANALYSES"


class CLIError(Exception):
    """A user-facing error: printed without a traceback, exit status 2."""


# ---------------------------------------------------------------------------------------- analyses


def find_analyses_dir(explicit: str | os.PathLike | None = None) -> Path:
    """The ``analyses/`` folder: ``explicit``, else ``$PREFIXLENS_ANALYSES``, else ``<repo>/analyses``."""
    given = explicit or os.environ.get(ANALYSES_ENV)
    if given:
        path = Path(given).expanduser()
        if not path.is_dir():
            raise CLIError(f"analyses folder {path} does not exist.")
        return path.resolve()
    repo = Path(__file__).resolve().parent.parent
    path = repo / "analyses"
    if not path.is_dir():
        raise CLIError(
            f"no analyses/ folder next to the prefixlens package (looked for {path}).\n"
            "The analysis scripts ship with the repository, not the wheel: clone it and install with "
            f"`pip install -e .`, or point --analyses-dir / ${ANALYSES_ENV} at the folder."
        )
    return path


def list_analyses(directory: Path) -> dict[str, str]:
    """``{name: first sentence of its docstring}`` for every ``*.py`` in ``directory`` defining ``main`` (parsed, not imported)."""
    found = {}
    for file in sorted(directory.glob("*.py")):
        if file.stem.startswith("_"):
            continue
        try:
            tree = ast.parse(file.read_text(encoding="utf-8"), filename=str(file))
        except (SyntaxError, UnicodeDecodeError) as err:
            found[file.stem] = f"(cannot be parsed: {err})"
            continue
        if any(isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.name == "main" for n in tree.body):
            found[file.stem] = summary(ast.get_docstring(tree))
    return found


def load_analysis(name: str, directory: Path):
    """Import ``directory/name.py`` (as ``analyses.<name>`` so sibling imports work) and return the module."""
    if not name.isidentifier():
        raise CLIError(f"{name!r} is not an analysis name (a Python module name such as table1).")
    file = directory / f"{name}.py"
    if not file.is_file():
        known = ", ".join(list_analyses(directory)) or "none"
        raise CLIError(f"no analysis {name!r} in {directory} (available: {known}).")
    for entry in (str(directory.parent), str(directory)):
        if entry not in sys.path:
            sys.path.insert(0, entry)
    package = sys.modules.get(directory.name)
    same_package = package is not None and any(
        Path(p).resolve() == directory for p in getattr(package, "__path__", [])
    )
    if directory.name == "analyses" and (package is None or same_package):
        module = importlib.import_module(f"analyses.{name}")
    else:  # another folder, or another 'analyses' package already imported: load by path
        spec = importlib.util.spec_from_file_location(f"_prefixlens_analysis_{name}", file)
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
    if not callable(getattr(module, "main", None)):
        raise CLIError(f"analysis {name!r} ({file}) has no main(argv=None) function.")
    return module


def _run(args: argparse.Namespace, rest: list[str]) -> int:
    directory = find_analyses_dir(args.analyses_dir)
    if args.list or not args.name:
        analyses = list_analyses(directory)
        if not args.list:
            print("prefixlens run: name an analysis; available ones:", file=sys.stderr)
        out = sys.stdout if args.list else sys.stderr
        if not analyses:
            print(f"(no analyses with a main() in {directory})", file=out)
        width = max((len(n) for n in analyses), default=0)
        for name, doc in analyses.items():
            print(f"  {name:<{width}}  {doc}".rstrip(), file=out)
        return 0 if args.list else 2
    module = load_analysis(args.name, directory)
    return call_main(module, rest)


def call_main(module, argv: list[str]) -> int:
    """Call ``module.main(argv)``; a ``main()`` without parameters reads ``sys.argv``, which is set to
    ``[script path, *argv]`` for the call (and restored). ``SystemExit`` (e.g. from ``--help``) becomes
    the returned status; one that carries a message instead of a status (``SystemExit("no results to
    render")``) has it printed to stderr and returns 1, as Python does at the top level. Every other
    exception propagates (with its traceback). A non-integer result counts as success."""
    import inspect

    main_fn = module.main
    try:
        params = inspect.signature(main_fn).parameters.values()
        takes_argv = any(p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.VAR_POSITIONAL) for p in params)
    except (TypeError, ValueError):
        takes_argv = True
    saved = sys.argv
    sys.argv = [getattr(module, "__file__", None) or module.__name__, *argv]
    try:
        result = main_fn(argv) if takes_argv else main_fn()
    except SystemExit as exit_:
        code = exit_.code
        if code is None or isinstance(code, int):
            return code or 0
        print(f"prefixlens run: error: {code}", file=sys.stderr)
        return 1
    finally:
        sys.argv = saved
    return result if isinstance(result, int) and not isinstance(result, bool) else 0


# -------------------------------------------------------------------------------------------- demo

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
        raise CLIError(f"unknown demo model {model_kind!r}; choose one of {', '.join(DEMO_MODELS)}.")
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


def _demo_real(out, instruction: str, n_samples: int, max_new_tokens: int, quiet: bool):
    """The instruction as a system message, turned into a :class:`~prefixlens.KVPrefix`, on SmolLM2-135M-Instruct.

    1. ``KVPrefix.from_prompt`` of the instruction's tokens; checked against the real prompt (max
       |Δ logits| at every content position, and the same greedy continuation);
    2. ``pl.decompose`` on every head of every layer (``z = (1 − A)·t + A·b`` and the unchanged
       relative attention);
    3. a report: the generated text with and without the prefix, the checks, ``A`` of every head,
       the attention of the heads furthest from uniform with the slots labelled by the instruction's
       tokens, ``A`` by token, and the shift of the attention-block output (paper Figure 3).
    """
    import time

    import torch

    import prefixlens as pl
    from prefixlens import models, report, text

    start = time.perf_counter()
    say = _say(quiet)
    if not 2 <= n_samples <= len(DEMO_QUESTIONS):
        raise CLIError(f"--samples must be between 2 and {len(DEMO_QUESTIONS)} for the smollm2-135m demo.")
    if max_new_tokens < 1:
        raise CLIError("--max-new-tokens must be at least 1.")
    try:
        model = models.load("smollm2-135m")
    except (ModuleNotFoundError, FileNotFoundError) as err:
        raise CLIError(f"{err}\nOr run the demo on a random toy model: prefixlens demo --model toy-gpt2") from None
    cfg = model.cfg
    say(
        f"model: SmolLM2-135M-Instruct ({cfg.n_layers} layers × {cfg.n_heads} heads, {getattr(cfg, 'n_key_value_heads', None) or cfg.n_heads} KV heads, "
        f"{str(cfg.dtype).removeprefix('torch.')}), loaded in {time.perf_counter() - start:.1f} s"
    )
    tokenizer = model.tokenizer
    eos = tokenizer.eos_token_id
    prompt_text = f"<|im_start|>system\n{instruction}<|im_end|>\n"
    questions = list(DEMO_QUESTIONS[:n_samples])
    contents = [f"<|im_start|>user\n{q}<|im_end|>\n<|im_start|>assistant\n" for q in questions]
    prompt = torch.tensor(text.encode(model, prompt_text))
    tokens, mask = text.tokens_and_mask(model, contents)
    if mask is not None:  # the built-in questions all have 15 tokens
        raise CLIError("the demo questions must have the same number of tokens.")
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
    s = dict(s, max_logit_error_vs_prompt=logit_error, same_greedy_continuation=all(same))
    texts = [(_continuation(tokenizer, a, eos), _continuation(tokenizer, b, eos)) for a, b in zip(gen_plain, gen_prefix)]
    for q, (plain, pirate) in list(zip(questions, texts))[:3]:
        say(f"  {q}\n    without: {plain!r}\n    with:    {pirate!r}")

    # 3. the report
    heads = report.select_heads(d, k=DEMO_HEADS)
    deficit = report.entropy_deficit(d)
    A_head = d.prefix_attention.double().mean(dim=(1, 3))
    shift = report.attention_output_shift(model, tokens, {name: prefix}, position=-1)
    ratio = {l: float(shift["shift"][l].mean()) / max(shift["spread"][l], 1e-12) for l in shift["layers"]}
    shift_layer = max(ratio, key=ratio.get)
    slots = report.token_labels(model, prompt)
    figures = _real_figures(
        report, model, tokens, prompt_text, prefix, d, s, questions, texts, same, heads, deficit, A_head,
        shift_layer, ratio, slots, name, max_new_tokens,
    )
    path = report.html(out, figures, title="prefixlens demo: an instruction as a prefix on SmolLM2-135M-Instruct")
    say(
        f"wrote {path} ({path.stat().st_size / 1e6:.2f} MB, self-contained; open it in a browser) "
        f"in {time.perf_counter() - start:.1f} s"
    )
    return path, {"instruction (KV prefix)": s}


def _real_figures(report, model, tokens, prompt_text, prefix, d, s, questions, texts, same, heads, deficit, A_head,
                  shift_layer, ratio, slots, name, max_new_tokens):
    import html as _html

    cfg = model.cfg
    L, H = int(cfg.n_layers), int(cfg.n_heads)
    N, T, P = tokens.shape[0], tokens.shape[1], prefix.length
    tol = DEMO_TOLERANCES
    rel = max(s["relative_attention_error_per_layer"])
    e = _html.escape
    chosen = ", ".join(
        f"{report.head_label(l, h)} ({float(deficit[l, h]):.2f} nats, A = {float(A_head[l, h]):.2f})" for l, h in heads
    )
    lead = (
        "<div class='pl-lead'>"
        f"<p>The instruction <code>{e(prompt_text)}</code> ({P} tokens) was turned into a key/value prefix with "
        f"<code>KVPrefix.from_prompt</code>: its keys and values in every layer, attached to SmolLM2-135M-Instruct "
        f"({L} layers × {H} heads) in front of {N} user questions in the chat format ({T} tokens each). "
        "Prefix slots are labelled with the instruction token they hold, in [brackets]; spaces show as ·, "
        "newlines as ↵.</p>"
        "<p><b>What A, t and b are:</b> at every content position each head's output is "
        "<b>z = (1 − A)·t + A·b</b>, where <b>A</b> is the share of the head's attention that goes to the prefix "
        "slots, <b>t</b> is the output the head gives attending to the content alone (with the same attention as "
        "without the prefix, for the same layer input) and <b>b</b> is the attention-weighted average of the "
        "prefix's values, a bias the prefix adds (Petrov, Torr &amp; Bibi, ICLR 2024).</p>"
        f"<p><b>Heads shown:</b> the {len(heads)} whose content attention is furthest from uniform (mean entropy "
        "deficit log n − H over the content queries that see at least 3 keys, over all questions), among the heads "
        "with mean A between 0.1 and 0.9 so that both the slots and the content are visible, at most one per layer: "
        f"{e(chosen)}.</p></div>"
    )
    intro = report.Figure("", "html", {"markup": lead})
    checks = report.table_figure(
        "The checks",
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
            ["mean prefix attention mass A (all heads, positions, questions)", f"{float(d.prefix_attention.mean()):.3f}",
             "–", "–"],
        ],
        caption="float32; the model's own hook_z against the decomposition; per-layer numbers at the end of the page",
        text_columns=[0],
    )
    generated = report.table_figure(
        "What the model answers, with and without the instruction prefix",
        ["question", "without the prefix", f"with {name}", "same as with the real prompt"],
        [[q, a, b, "yes" if ok else "NO"] for q, (a, b), ok in zip(questions, texts, same)],
        caption=f"greedy decoding, up to {max_new_tokens} new tokens or <|im_end|>; the prefixed run and the run "
        "on the real prompt + question give the same tokens",
        text_columns=[0, 1, 2],
    )
    grid = report.prefix_mass_grid_figure(d, highlight=heads)
    rows = []
    for l, h in heads:
        rows.append(
            report.attention_figure(model, tokens, prefix, layer=l, head=h, example=0, decomposition=d,
                                    prefix_name=name, slot_names=slots)
        )
    mass = report.prefix_mass_figure(d, tokens, model=model, example=0, heads=heads)
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
    return [intro, checks, generated, grid, *rows, mass, bias, per_layer]


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
    figures = [
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


# -------------------------------------------------------------------------------------------- main


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="prefixlens",
        description="Prompting, soft prompting and prefix-tuning, studied mechanistically on TransformerLens.",
    )
    from prefixlens import __version__

    parser.add_argument("--version", action="version", version=f"prefixlens {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    d = sub.add_parser(
        "demo",
        help="an instruction turned into a prefix on a real model, every head decomposed, as an HTML report",
        description="Turn an instruction into a key/value prefix on SmolLM2-135M-Instruct (the built-in real model; "
        "--model toy-gpt2 / toy-llama: three prefixes on a random toy model instead), check it against the real "
        "prompt, decompose every head, print the errors and write an offline HTML report (the answers with and "
        "without the prefix, A of every head, attention with the prefix slots labelled, attention-block shift).",
    )
    d.add_argument("--out", default="prefixlens-demo.html", help="report path (default: %(default)s)")
    d.add_argument(
        "--model", choices=[*DEMO_MODELS, *_DEMO_ALIASES], default="smollm2-135m", metavar="{" + ",".join(DEMO_MODELS) + "}",
        help="the built-in real model, or a random toy model (default: %(default)s)",
    )
    d.add_argument("--instruction", help=f"smollm2-135m: the system instruction to turn into a prefix (default: {DEMO_INSTRUCTION!r})")
    d.add_argument("--max-new-tokens", type=int, default=20, help="smollm2-135m: tokens to generate per question (default: %(default)s)")
    d.add_argument("--seed", type=int, default=0, help="toy models: seed for the model, inputs and prefixes (default: %(default)s)")
    d.add_argument("--samples", type=int, default=8, help="number of input sequences (default: %(default)s)")
    d.add_argument(
        "--threads", type=int, default=1,
        help="torch CPU threads; 0 = torch's default (default: %(default)s: the demo's models are small, and on a "
        "busy machine torch's threads made it 8× slower)",
    )
    d.add_argument("--quiet", action="store_true", help="print nothing")
    r = sub.add_parser(
        "run",
        help="run an analysis script from analyses/ (prefixlens run --list)",
        description="Run analyses/NAME.py's main() with the remaining arguments; "
        "`prefixlens run NAME --help` shows the analysis's own options.",
        usage="prefixlens run [--list] [--analyses-dir DIR] NAME [ANALYSIS OPTIONS ...]",
    )
    r.add_argument("--list", action="store_true", help="list the available analyses")
    r.add_argument("--analyses-dir", help=f"folder of analysis scripts (default: ${ANALYSES_ENV} or <repo>/analyses)")
    r.add_argument("name", nargs="?", help="analysis module name, e.g. table1")
    return parser


def _split_run(argv: list[str]) -> tuple[list[str], list[str]]:
    """Split ``run`` arguments into ours (before NAME, plus NAME) and the analysis's (after NAME)."""
    i = 1  # argv[0] == "run"
    while i < len(argv):
        a = argv[i]
        if a == "--analyses-dir":
            i += 2
        elif a.startswith("-"):
            i += 1
        else:
            return argv[: i + 1], argv[i + 1 :]
    return argv, []


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``prefixlens`` command; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = _parser()
    rest: list[str] = []
    if argv and argv[0] == "run":
        argv, rest = _split_run(argv)
    args = parser.parse_args(argv)
    try:
        if args.command == "demo":
            os.environ.setdefault("HF_HUB_OFFLINE", "1")
            if args.samples < 2:
                raise CLIError("--samples must be at least 2.")
            if args.threads < 0:
                raise CLIError("--threads must be 0 (torch's default) or more.")
            import torch

            threads = torch.get_num_threads()
            if args.threads:
                torch.set_num_threads(args.threads)
            try:
                demo(args.out, args.model, args.seed, args.samples, args.quiet, args.instruction, args.max_new_tokens)
            finally:  # main() may be called in a longer-lived process (tests, notebooks)
                torch.set_num_threads(threads)
            return 0
        if args.command == "run":
            return _run(args, rest)
        parser.print_help()
        return 2
    except CLIError as err:
        print(f"prefixlens: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
