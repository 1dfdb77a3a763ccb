"""Every Python snippet in the README and the docs runs as pasted.

Each ```python block of ``README.md`` and ``docs/**/*.md`` is executed on its own, in a fresh namespace
and a temporary working directory (files it writes stay there), with the random seeds fixed. A
snippet that needs a name defined nowhere in it fails here, as it would for a reader. Blocks that are
not meant to run (a signature, an excerpt) are fenced as ``text``, not ``python``.
"""

from __future__ import annotations

import re
import sys
import types
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
FENCE = re.compile(r"^```python\n(.*?)^```", re.S | re.M)


def _snippets() -> list:
    found = []
    for page in PAGES:
        text = page.read_text(encoding="utf-8")
        for match in FENCE.finditer(text):
            line = text[: match.start()].count("\n") + 1
            code = match.group(1)
            marks = [pytest.mark.slow] if "train_prefix(" in code or "prefixlens run" in code else []
            found.append(pytest.param(page, line, code, id=f"{page.relative_to(ROOT)}:{line}", marks=marks))
    return found


SNIPPETS = _snippets()


def test_the_pages_have_snippets():
    assert len(SNIPPETS) >= 10


@pytest.mark.parametrize(("page", "line", "code"), SNIPPETS)
def test_snippet_runs_as_pasted(page, line, code, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    module = types.ModuleType("__snippet__")  # a real module, so a snippet's dataclasses resolve their annotations
    monkeypatch.setitem(sys.modules, module.__name__, module)
    state = torch.get_rng_state()
    torch.manual_seed(0)
    try:
        exec(compile(code, f"{page.relative_to(ROOT)}:{line}", "exec"), module.__dict__)
    finally:
        torch.set_rng_state(state)
