"""Running an analysis: one command line, timing, the environment record and atomic result files.

Every script in ``analyses/`` is an :class:`Analysis`: what it adds to the command line, a ``run``
that returns a JSON-able result, and how that result reads as Markdown (and, optionally, as a
figure). :meth:`Analysis.main` does the rest the same way for all of them:

- the command line: the script's docstring as ``--help``, defaults shown, the options every analysis
  has (``--out``, ``--threads``, ``--render-only``, and ``--profile`` when it has profiles). Every
  numeric option is checked by argparse before anything runs, with the types below
  (:func:`positive_int`, :func:`non_negative_int`, :func:`int_at_least`, :func:`positive_float`,
  :func:`probability`, :func:`positive_ints`, :func:`seed_list`): a bad value is refused as
  ``error: argument --n-inputs: must be >= 1, got -3``, never found deep inside a run. ``--out`` is
  checked (a folder, created if missing, that can be written to) before the run too;
- the run: torch's thread count set for it and restored after, the global random state restored
  after (a run seeds what it needs itself), wall and CPU time measured;
- the record: the command, the profile's settings, the times and :func:`~prefixlens.environment.environment`
  are added to the result;
- the files: ``<out>/<stem>.json``, ``.md`` and ``.png``, each written atomically. ``--out`` defaults
  to the git-ignored ``runs/results/``; the committed results are refreshed only by asking for them,
  ``--out results``. ``--render-only`` rewrites the Markdown and figure from the JSON already there.
  Everything from the line :data:`NOTES_MARKER` on in an existing ``.md`` is written by people
  (how a profile was tuned, earlier runs and their commits) and is kept when the file is rewritten.

    analysis = Analysis(name="table1", doc=__doc__, run=run, markdown=markdown, profiles=PROFILES)

    def main(argv=None) -> dict:
        return analysis.main(argv)
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import math
import random
import shlex
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from prefixlens.environment import environment
from prefixlens.serialization import atomic_write_bytes, atomic_write_text

__all__ = [
    "Analysis", "HelpFormatter", "DEFAULT_OUT", "COMMITTED_RESULTS", "NOTES_MARKER",
    "summary", "cpu_seconds", "restored_state", "save_figure", "write_json", "kept_notes",
    "int_at_least", "positive_int", "non_negative_int", "positive_float", "probability", "positive_ints",
    "seed_list", "NUMERIC_TYPES", "check_out",
]

DEFAULT_OUT = "runs/results"
"""Where results go unless ``--out`` says otherwise (git-ignored)."""

COMMITTED_RESULTS = "results"
"""The committed results folder: written only when asked for with ``--out results``."""


NOTES_MARKER = "<!-- notes written by people, kept when the results are rewritten -->"
"""The line after which a results Markdown file is hand-written (kept across re-renders)."""


def kept_notes(path: Path) -> str:
    """The hand-written tail of an existing results Markdown file (from :data:`NOTES_MARKER` on), or ``""``."""
    if not path.is_file():
        return ""
    text = path.read_text(encoding="utf-8")
    return text[text.index(NOTES_MARKER):] if NOTES_MARKER in text else ""


# ----------------------------------------------------------------------------- checked option types


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None


def int_at_least(low: int, name: str | None = None) -> Callable[[str], int]:
    """An argparse ``type``: an integer ``>= low`` (refused with the value and the bound otherwise)."""

    def parse(text: str) -> int:
        value = _int(text)
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
        return value

    parse.__name__ = name or f"int_at_least({low})"
    parse.at_least = low  # type: ignore[attr-defined]  (what the tests read to try a value below)
    return parse


positive_int = int_at_least(1, "positive_int")
"""An integer ``>= 1`` (counts, sizes, lengths, steps)."""

non_negative_int = int_at_least(0, "non_negative_int")
"""An integer ``>= 0`` (seeds; ``--threads``, where 0 means torch's default)."""


def _float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be finite, got {text}")
    return value


def positive_float(text: str) -> float:
    """A finite number ``> 0`` (learning rates, scales, time budgets)."""
    value = _float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {value:g}")
    return value


def probability(text: str) -> float:
    """A number in ``[0, 1]``."""
    value = _float(text)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1], got {value:g}")
    return value


def positive_ints(text: str) -> list[int]:
    """A comma-separated list of integers ``>= 1`` (at least one): ``1,4,10``."""
    items = [t.strip() for t in text.split(",") if t.strip()]
    if not items:
        raise argparse.ArgumentTypeError(f"needs at least one integer >= 1 (comma-separated), got {text!r}")
    return [positive_int(t) for t in items]


def seed_list(text: str) -> list[int]:
    """Seeds: one number ``N >= 1`` is a count (seeds ``0, 1, ..., N-1``); a comma-separated list names
    them (``11,12,13``; one seed alone: ``7,``). Seeds are ``>= 0`` and distinct."""
    if "," not in text:
        return list(range(positive_int(text)))
    seeds = [non_negative_int(t.strip()) for t in text.split(",") if t.strip()]
    if not seeds:
        raise argparse.ArgumentTypeError(f"needs at least one seed, got {text!r}")
    if len(set(seeds)) != len(seeds):
        raise argparse.ArgumentTypeError(f"seeds must be distinct, got {text!r}")
    return seeds


NUMERIC_TYPES = (positive_int, non_negative_int, positive_float, probability, positive_ints, seed_list)
"""The checked types above (plus any :func:`int_at_least`); an analysis's numeric options use them,
never a bare ``int`` or ``float`` (a test checks every analysis)."""


def check_out(out: Path) -> None:
    """Make sure ``out`` is a folder results can be written to (created if missing), before any work:
    raises ``ValueError`` naming the problem otherwise."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out} exists and is not a folder; give a folder (it is created if missing)")
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out, prefix=".write-check-"):
            pass
    except OSError as err:
        raise ValueError(f"cannot write to {out} ({err.strerror or err}); give a folder you can write to") from None


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The docstring as written (paragraphs and command examples kept), and every option's default
    (not for flags and options without one: their help says what leaving them out means)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)


def summary(doc: str | None) -> str:
    """The first sentence of a docstring, whole, on one line (however many lines it spans)."""
    paragraph = " ".join((doc or "").strip().split("\n\n")[0].split())
    return paragraph[: paragraph.index(". ") + 1] if ". " in paragraph else paragraph


def cpu_seconds() -> float:
    """User + system CPU time of this process and its finished children (worker processes)."""
    import resource

    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


@contextmanager
def restored_state(threads: int | None) -> Iterator[None]:
    """Run with ``threads`` torch threads (``None`` or 0: unchanged); afterwards restore the thread
    count and the global random states (torch's CPU generator, Python's ``random``)."""
    saved_threads, saved_torch, saved_python = torch.get_num_threads(), torch.get_rng_state(), random.getstate()
    if threads:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(saved_threads)
        torch.set_rng_state(saved_torch)
        random.setstate(saved_python)


def save_figure(figure, path: str | Path, dpi: int = 110) -> Path:
    """Save a matplotlib figure as a PNG atomically (rendered in memory, then renamed into place)
    and close it."""
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    try:
        figure.savefig(buffer, format="png", dpi=dpi)
    finally:
        plt.close(figure)
    return atomic_write_bytes(path, buffer.getvalue())


def write_json(path: str | Path, data: Mapping[str, Any]) -> Path:
    """``data`` as indented JSON, written atomically."""
    return atomic_write_text(path, json.dumps(data, indent=1) + "\n")


@dataclasses.dataclass(frozen=True)
class Analysis:
    """One analysis script: its command line, its run, and how its result reads.

    ``run(args)`` returns the JSON-able result (``args.settings`` holds the chosen profile);
    ``markdown(result)`` the report; ``figure(result)`` a matplotlib figure or ``None``;
    ``add_arguments(parser)`` the analysis's own options; ``profiles`` maps names to frozen
    dataclasses of settings (the first is the default unless ``default_profile``); ``stem(args)``
    names the output files (default: the analysis's name); ``threads`` is ``--threads``'s default.
    """

    name: str
    doc: str | None
    run: Callable[[argparse.Namespace], dict]
    markdown: Callable[[dict], str]
    figure: Callable[[dict], Any] | None = None
    add_arguments: Callable[[argparse.ArgumentParser], None] | None = None
    profiles: Mapping[str, Any] | None = None
    default_profile: str | None = None
    stem: Callable[[argparse.Namespace], str] | None = None
    threads: int = 1
    dpi: int = 110

    @property
    def summary(self) -> str:
        return summary(self.doc)

    def parser(self) -> argparse.ArgumentParser:
        parser = argparse.ArgumentParser(
            prog=f"prefixlens run {self.name}", description=(self.doc or "").strip(), formatter_class=HelpFormatter
        )
        if self.profiles:
            names = list(self.profiles)
            parser.add_argument("--profile", choices=names, default=self.default_profile or names[0],
                                help="settings of the run: " + "; ".join(
                                    f"{n}: {summary(type(p).__doc__ or '').rstrip('.') or n}" for n, p in self.profiles.items()))
        if self.add_arguments is not None:
            self.add_arguments(parser)
        parser.add_argument("--out", default=DEFAULT_OUT,
                            help=f"folder for <stem>.json, .md and .png (git-ignored by default; "
                                 f"'--out {COMMITTED_RESULTS}' refreshes the committed results)")
        parser.add_argument("--threads", type=non_negative_int, default=self.threads,
                            help="torch CPU threads for the run (0: torch's default); restored afterwards")
        parser.add_argument("--render-only", action="store_true",
                            help="no run: rewrite the Markdown and figure from the JSON already in --out")
        return parser

    def parse_args(self, argv: list[str] | None = None) -> argparse.Namespace:
        args = self.parser().parse_args(argv)
        args.settings = self.profiles[args.profile] if self.profiles else None
        return args

    def output_stem(self, args: argparse.Namespace) -> str:
        return self.stem(args) if self.stem is not None else self.name

    def command_line(self, argv: list[str] | None) -> str:
        argv = sys.argv[1:] if argv is None else list(argv)
        return shlex.join(["prefixlens", "run", self.name, *argv])

    def main(self, argv: list[str] | None = None) -> dict:
        """Parse ``argv`` (default: ``sys.argv[1:]``), run, record, write; return the result."""
        args = self.parse_args(argv)
        out, stem = Path(args.out), self.output_stem(args)
        if args.render_only:
            path = out / f"{stem}.json"
            if not path.is_file():
                raise SystemExit(f"--render-only: no {path} to render; run the analysis first (or pass its --out).")
            try:
                result = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
                raise SystemExit(f"--render-only: cannot read {path}: {err}") from None
        try:
            check_out(out)
        except ValueError as err:
            self.parser().error(f"argument --out: {err}")
        if not args.render_only:
            result = self.record(args, argv)
            write_json(out / f"{stem}.json", result)
        self.render(result, out, stem)
        written = ([] if args.render_only else [".json"]) + [".md"] + ([".png"] if self.figure else [])
        print(f"wrote {out / stem}" + ", ".join(written))
        return result

    def record(self, args: argparse.Namespace, argv: list[str] | None = None) -> dict:
        """Run and return the result with the command, settings, times and environment added."""
        wall0, cpu0 = time.perf_counter(), cpu_seconds()
        with restored_state(args.threads):
            result = self.run(args)
        record = {"experiment": self.name, "command": self.command_line(argv)}
        if self.profiles:
            record["profile"] = args.profile
            record["settings"] = dataclasses.asdict(args.settings)
        record.update(result)
        record.setdefault("wall_time_s", round(time.perf_counter() - wall0, 1))
        record.setdefault("cpu_time_s", round(cpu_seconds() - cpu0, 1))
        record.setdefault("environment", environment())
        return record

    def render(self, result: dict, out: Path, stem: str) -> None:
        """Write ``<stem>.md`` (and ``<stem>.png``) of ``result`` into ``out``."""
        path = out / f"{stem}.md"
        text, notes = self.markdown(result).rstrip("\n") + "\n", kept_notes(path)
        atomic_write_text(path, text + ("\n" + notes.rstrip("\n") + "\n" if notes else ""))
        if self.figure is not None:
            figure = self.figure(result)
            if figure is not None:
                save_figure(figure, out / f"{stem}.png", dpi=self.dpi)
