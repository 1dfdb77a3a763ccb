"""The package's surface: ``import prefixlens as pl`` reaches every module, and each module's
``__all__`` lists exactly the public functions and classes it defines."""

import importlib
import inspect
import pkgutil

import pytest

import prefixlens as pl

MODULES = sorted(m.name for m in pkgutil.walk_packages(pl.__path__, "prefixlens."))


def test_top_level_reaches_the_modules():
    for name in ("models", "text", "analysis", "capacity", "constructions", "lora", "report", "tasks", "train"):
        assert inspect.ismodule(getattr(pl, name)), name
    assert pl.models.load is importlib.import_module("prefixlens.models").load


@pytest.mark.parametrize("name", MODULES)
def test_all_matches_what_the_module_defines(name):
    module = importlib.import_module(name)
    listed = getattr(module, "__all__", None)
    assert listed is not None, f"{name} has no __all__"
    missing = [n for n in listed if not hasattr(module, n)]
    assert not missing, f"{name}.__all__ names what it does not define: {missing}"
    assert len(set(listed)) == len(listed), f"{name}.__all__ repeats a name"
    defined = {
        n for n, obj in vars(module).items()
        if not n.startswith("_") and (inspect.isfunction(obj) or inspect.isclass(obj))
        and getattr(obj, "__module__", None) == name
    }
    unlisted = sorted(defined - set(listed))
    assert not unlisted, f"{name} defines public {unlisted} but its __all__ does not list them"


def _imported_after(code: str) -> set[str]:
    """The top-level modules a fresh interpreter has imported after running ``code``."""
    import json
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "-c", f"{code}\nimport json, sys; print(json.dumps(sorted(sys.modules)))"],
        capture_output=True, text=True, check=True,
    ).stdout
    return {name.split(".")[0] for name in json.loads(out.splitlines()[-1])}


@pytest.mark.parametrize(
    "code",
    ["import prefixlens", "from prefixlens.cli import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass"],
    ids=["import", "cli-help"],
)
def test_import_and_cli_help_load_no_heavy_dependency(code):
    """``import prefixlens`` and ``prefixlens --help`` stay fast: torch, TransformerLens, transformers
    and CircuitsVis are imported on first use of a name that needs them, not up front."""
    heavy = {"torch", "transformer_lens", "transformers", "circuitsvis", "peft", "safetensors"}
    assert not heavy & _imported_after(code)


def test_lazy_names_are_the_defining_modules_objects():
    assert sorted(pl.__all__) == sorted([*pl._DEFINED_IN, *pl._SUBMODULES])
    for name in pl.__all__:
        value = getattr(pl, name)
        if inspect.ismodule(value):
            assert value is importlib.import_module(f"prefixlens.{name}")
        else:
            assert value is getattr(importlib.import_module(pl._DEFINED_IN[name]), name)
    assert set(pl.__all__) <= set(dir(pl))
    with pytest.raises(AttributeError, match="no attribute 'decompse'"):
        pl.decompse  # noqa: B018
