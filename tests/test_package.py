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
