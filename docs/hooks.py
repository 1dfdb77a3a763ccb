"""MkDocs hook: the results pages are the committed ``results/*.md`` (and ``benchmarks/results-core.md``),
added to the site at build time so that there is one copy of each. Nothing is written into ``docs/``.

- A results page whose experiment also wrote a figure (``results/NAME.png``) shows it under the table, as
  wide as the content column, linked to the full-size file (click to enlarge).
- A results file that mkdocs.yml's nav does not list yet is added to the end of its "Results" section,
  titled by its first heading, so that a new experiment never breaks ``mkdocs build --strict``.
- The files are written by the analyses, not for MkDocs: ``[a][b]`` in their prose (e.g. "[layer][head]")
  is escaped so that it is not read as a reference link.
"""

from __future__ import annotations

import re
from pathlib import Path

from mkdocs.structure.files import File

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "results"
EXTRA = {"results/benchmark-core.md": ROOT / "benchmarks" / "results-core.md"}
CODE_SPAN = re.compile(r"(`+)(?:.|\n)*?\1")


def _escape_reference_links(text: str) -> str:
    out, last = [], 0
    for m in CODE_SPAN.finditer(text):
        out.append(text[last : m.start()].replace("][", "]\\["))
        out.append(m.group(0))
        last = m.end()
    out.append(text[last:].replace("][", "]\\["))
    return "".join(out)


def _page(config, uri: str, source: Path) -> File:
    text = _escape_reference_links(source.read_text(encoding="utf-8"))
    figure = source.with_suffix(".png")
    if figure.parent == RESULTS and figure.exists():
        # click to enlarge: the figure links to its own full-size file
        text += f"\n\n[![{source.stem}]({figure.name})]({figure.name}){{ .pl-figure }}\n"
    text += f"\n\n*This page is `{source.relative_to(ROOT).as_posix()}` in the repository.*\n"
    return File.generated(config, uri, content=text)


def _title(source: Path) -> str:
    for line in source.read_text(encoding="utf-8").splitlines():
        if line.startswith("# "):
            return line[2:].strip()
    return source.stem


def on_config(config, **kwargs):
    for section in config.nav or []:
        if isinstance(section, dict) and isinstance(section.get("Results"), list):
            entries = section["Results"]
            listed = {next(iter(e.values())) if isinstance(e, dict) else e for e in entries}
            for source in sorted(RESULTS.glob("*.md")):
                uri = f"results/{source.name}"
                if uri not in listed:
                    entries.append({_title(source): uri})
    return config


def on_files(files, config, **kwargs):
    for source in sorted(RESULTS.glob("*.md")):
        files.append(_page(config, f"results/{source.name}", source))
    for figure in sorted([*RESULTS.glob("*.png"), *RESULTS.glob("figures/*.png")]):
        uri = f"results/{figure.relative_to(RESULTS).as_posix()}"
        files.append(File.generated(config, uri, abs_src_path=str(figure)))
    for uri, source in EXTRA.items():
        files.append(_page(config, uri, source))
    return files
