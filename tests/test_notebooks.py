"""The notebooks: in sync with their builder, valid, unexecuted; and they run top to bottom (the tour on
SmolLM2 in the default run, the section notebooks, which train, marked slow)."""

from __future__ import annotations

import ast
import importlib.util
import os
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[1]
NAMES = ["demo", "section4_bias_only", "section5_toy_tasks", "section6_prefix_vs_lora", "appendixB_longer_prefixes"]


def builder():
    spec = importlib.util.spec_from_file_location("build_notebooks", ROOT / "analyses" / "_build_notebooks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("name", NAMES)
def test_notebook_is_current_and_valid(name):
    path = ROOT / "analyses" / f"{name}.ipynb"
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    assert nb == builder().build(name), f"{path.name} is out of date: run python analyses/_build_notebooks.py"
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code and all(not c.outputs for c in code)
    for cell in code:
        ast.parse(cell.source)
    assert any("import prefixlens" in c.source for c in code)


@pytest.mark.parametrize("name", [pytest.param(n, marks=[] if n == "demo" else [pytest.mark.slow]) for n in NAMES])
def test_notebook_runs(name, tmp_path_factory, monkeypatch):
    """Execute the notebook in a fresh python3 kernel. The notebooks share one cache of trained models
    (a temporary directory for the session); PREFIXLENS_NOTEBOOK_SCALE (default 1, the notebooks'
    own small settings) can shorten the training runs."""
    from nbclient import NotebookClient

    cache = tmp_path_factory.getbasetemp() / "notebook-cache"
    monkeypatch.setenv("PREFIXLENS_NOTEBOOK_CACHE", str(cache))
    monkeypatch.setenv("PREFIXLENS_NOTEBOOK_SCALE", os.environ.get("PREFIXLENS_NOTEBOOK_SCALE", "1"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    nb = nbformat.read(ROOT / "analyses" / f"{name}.ipynb", as_version=4)
    NotebookClient(nb, timeout=None, kernel_name="python3", resources={"metadata": {"path": str(ROOT / "analyses")}}).execute()
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert not errors
    text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    if name == "demo":  # the tour: exact against the prompt, every head decomposed, heads ranked by effect
        assert "max |Δ logits| prefix vs real prompt:" in text and "heads by effect:" in text
        assert float(text.split("max |Δ logits| prefix vs real prompt:")[1].split()[0]) <= 1e-3
    if name == "section4_bias_only":
        assert "identity 1, max error" in text and "float64" in text
    if name == "section6_prefix_vs_lora":
        assert "LoRA:" in text and "prefix:" in text
