"""analyses/constructions.ipynb runs top to bottom with small settings and shows what it claims."""

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_constructions_notebook_executes(monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    monkeypatch.setenv("PREFIXLENS_NOTEBOOK_SMALL", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    nb = nbformat.read(ROOT / "analyses" / "constructions.ipynb", as_version=4)
    for cell in nb.cells:  # run the source, not stored outputs
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None
    client = nbclient.NotebookClient(nb, timeout=900, kernel_name="python3",
                                     resources={"metadata": {"path": str(ROOT / "analyses")}})
    client.execute()
    text = "\n".join(
        o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "stream"
    )
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert not errors
    assert "'I love transformers!'" in text
    assert "50 / 50 random targets reproduced exactly" in text
    assert "50 / 50 random maps exact on all 94 inputs" in text
    assert "blueberries" in text and "BG -> H" in text
    for seed in range(10):
        assert f"seed {seed}: 100 / 100 correct" in text
    assert "max |hook_z − ((1 − A)·t + A·b)|: 0.0" in text
    assert "with a real first token: 94 distinct outputs" in text
    assert "exact = True" in text
    lines = text.splitlines()
    row = [l for l in lines if l.startswith("row 4 read")][0].split(":")[1]
    ref = [l for l in lines if l.startswith("row 4 of the map")][0].split(":")[1]
    assert row.strip() == ref.strip()
