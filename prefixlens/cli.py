"""The ``prefixlens`` command: ``prefixlens demo`` and ``prefixlens run <analysis>``.

``prefixlens demo`` (:mod:`prefixlens.demo`) turns an instruction into a prefix on SmolLM2-135M-Instruct
(or attaches prefixes to a random toy model, ``--model toy-gpt2``), checks it against the real prompt,
decomposes every head, prints the errors of the decomposition and writes a self-contained HTML report. ``prefixlens run NAME [options]`` runs
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

__all__ = ["main", "find_analyses_dir", "list_analyses", "load_analysis", "CLIError", "call_main"]

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
    from prefixlens.experiment import summary

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


# -------------------------------------------------------------------------------------------- main


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="prefixlens",
        description="Prompting, soft prompting and prefix-tuning, studied mechanistically on TransformerLens.",
    )
    from prefixlens import __version__
    from prefixlens.demo import _DEMO_ALIASES, DEMO_INSTRUCTION, DEMO_MODELS

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

            from prefixlens import demo

            threads = torch.get_num_threads()
            if args.threads:
                torch.set_num_threads(args.threads)
            try:
                demo.demo(args.out, args.model, args.seed, args.samples, args.quiet, args.instruction, args.max_new_tokens)
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
    except ValueError as err:
        from prefixlens.demo import DemoError

        if not isinstance(err, DemoError):
            raise
        print(f"prefixlens: error: {err}", file=sys.stderr)
        return 2


#: names that moved to :mod:`prefixlens.demo` (still reachable here, with a DeprecationWarning)
_MOVED_TO_DEMO = ("demo", "DEMO_MODELS", "DEMO_INSTRUCTION", "DEMO_QUESTIONS", "DEMO_TOLERANCES", "DEMO_HEADS")


def __getattr__(name: str):
    if name in _MOVED_TO_DEMO:
        import warnings

        from prefixlens import demo

        warnings.warn(f"prefixlens.cli.{name} is deprecated: it is prefixlens.demo.{name}.", DeprecationWarning, stacklevel=2)
        return getattr(demo, name)
    raise AttributeError(f"module 'prefixlens.cli' has no attribute {name!r}")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
