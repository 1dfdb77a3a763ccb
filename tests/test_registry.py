"""One registry of prefix forms (``prefixlens.prefixes.FORMS``), and the prefix forms' place in the import graph."""

from __future__ import annotations

import ast
import inspect
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import prefixlens as pl
from prefixlens import capacity, constructions, prefixes, text, train, training
from prefixlens.prefixes import FORMS, form_class
from prefixlens.serialization import load_tensors, save_tensors
from tests.conftest import build

ROOT = Path(__file__).resolve().parents[1]
EXPECTED = {"kv": pl.KVPrefix, "residual": pl.ResidualPrefix, "soft": pl.SoftPrompt}


def test_the_registry_holds_exactly_the_three_forms_by_name():
    assert FORMS == EXPECTED and list(FORMS) == ["kv", "residual", "soft"]
    for name, cls in FORMS.items():
        assert cls.name == name and cls.form == cls.__name__
    assert "name" not in vars(prefixes._ConvertibleToKV) and getattr(pl.Prefix, "name", None) is None


@pytest.mark.parametrize("name", list(EXPECTED))
def test_tensor_names_are_the_tensors_of_the_form(name):
    cls = FORMS[name]
    model = build("gpt2")
    prefix = cls.random(model, 3, seed=0)
    # the constructor's tensor arguments, in order; the module's parameters; what save writes
    assert list(inspect.signature(cls.__init__).parameters)[1:-1] == list(cls.tensor_names)
    assert [n for n, _ in prefix.named_parameters()] == list(cls.tensor_names)
    assert prefix.n_parameters() == sum(getattr(prefix, n).numel() for n in cls.tensor_names)
    assert cls._tensor_names == cls.tensor_names  # the former private name still reads


def test_form_class_takes_the_short_name_the_class_name_or_the_class():
    for name, cls in EXPECTED.items():
        assert form_class(name) is cls and form_class(cls.__name__) is cls and form_class(cls) is cls


@pytest.mark.parametrize("bad", ["prompt", "KV", "", None, torch.nn.Linear, pl.Prefix])
def test_an_unknown_form_is_refused_naming_the_valid_ones(bad):
    with pytest.raises(ValueError, match=r"form must be one of \['kv', 'residual', 'soft'\].*KVPrefix"):
        form_class(bad)


def test_every_other_lookup_is_the_registry():
    assert capacity.FORMS is FORMS
    assert training.PREFIX_FORMS is FORMS and train.PREFIX_FORMS is FORMS
    assert training.methods.PREFIX_FORMS is FORMS and training.pairs.PREFIX_FORMS is FORMS
    assert capacity._form is form_class
    assert capacity.count_distinct is constructions.count_distinct  # one definition
    assert not hasattr(text, "_FORM_ALIASES")
    with pytest.raises(ValueError, match=r"form must be one of \['kv', 'residual', 'soft'\]"):
        text.chat_prefix(build("gpt2"), "hi", form="prompt")
    with pytest.raises(ValueError, match=r"form must be one of \['kv', 'residual', 'soft'\]"):
        capacity.real_token_prefixes(build("gpt2"), "prompt", torch.tensor([3, 4]))


def test_the_analyses_use_the_registry():
    source = (ROOT / "analyses" / "prefix_bias_only.py").read_text()
    assert "form_class(args.form)" in source and "choices=sorted(FORMS)" in source


def test_count_distinct_counts_rows_and_no_rows():
    rows = torch.tensor([[1, 2], [1, 2], [3, 4]])
    assert capacity.count_distinct(rows) == 2 and capacity.count_distinct(rows[:0]) == 0
    assert capacity.count_distinct(torch.zeros(3, 2, 2)) == 1  # flattened after the first dim


def test_a_form_registers_by_declaring_its_name_and_names_are_unique():
    class Variant(pl.KVPrefix):  # no name of its own: a variant, not a new form
        pass

    assert FORMS == EXPECTED and Variant.name == "kv"
    with pytest.raises(ValueError, match="'kv' is taken by KVPrefix"):
        class Clash(pl.SoftPrompt):
            name = "kv"
            tensor_names = ("embeddings",)
    with pytest.raises(TypeError, match="no tensor_names"):
        class Untensored(pl.SoftPrompt):
            name = "untensored"
    try:
        class Shifted(pl.SoftPrompt):
            name = "shifted"
            tensor_names = ("embeddings",)

        assert form_class("shifted") is Shifted and form_class("Shifted") is Shifted
    finally:
        FORMS.pop("shifted", None)
    assert FORMS == EXPECTED


@pytest.mark.parametrize("stored", ["class", "short"])
@pytest.mark.parametrize("name", list(EXPECTED))
def test_files_load_whichever_form_name_they_record(tmp_path, name, stored):
    model = build("gpt2")
    prefix = FORMS[name].random(model, 2, seed=1)
    prefix.save(tmp_path / "p.safetensors")
    tensors, meta = load_tensors(tmp_path / "p.safetensors")
    assert meta["form"] == prefix.form  # files keep recording the class name (readable by older versions)
    meta.pop("prefixlens_sha256")
    meta["form"] = prefix.form if stored == "class" else name
    save_tensors(tmp_path / "q.safetensors", tensors, meta)
    again = pl.Prefix.load(tmp_path / "q.safetensors", model)
    assert type(again) is FORMS[name]
    assert all(torch.equal(getattr(again, n), getattr(prefix, n)) for n in prefix.tensor_names)
    with pytest.raises(TypeError, match=f"holds a {prefix.form}, not a"):
        FORMS["soft" if name != "soft" else "kv"].load(tmp_path / "q.safetensors", model)


def test_length_needs_no_class_name_checks():
    model = build("llama_gqa")
    for cls in FORMS.values():
        p = cls.random(model, 3, seed=0)
        batch = type(p)(**{n: torch.stack([getattr(p, n)] * 2) for n in cls.tensor_names}, signature=p.signature)
        assert p.length == 3 and batch.length == 3 and batch.batch_size == 2 and batch.batch_slice(slice(1)).length == 3
    source = inspect.getsource(prefixes.Prefix)
    for check in ("self.form ==", "self.form !=", "[self.form]", "__name__ =="):
        assert check not in source, check


# ---- the import graph -------------------------------------------------------------------------------

# What the prefix forms may import of prefixlens: modules below them (none of which imports a form).
BELOW = {"prefixlens.runtime", "prefixlens.serialization", "prefixlens.signature", "prefixlens.text"}


def test_prefixes_imports_only_modules_below_it():
    """Statically, at any level: the one exception is ``KVPrefix.from_peft``, a documented convenience
    wrapper around the importer above it."""
    tree = ast.parse((ROOT / "prefixlens" / "prefixes.py").read_text())
    found = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("prefixlens"):
            found.setdefault(node.module, []).append(node.lineno)
        elif isinstance(node, ast.Import):
            assert not any(a.name.startswith("prefixlens") for a in node.names)
    above = {m: lines for m, lines in found.items() if m not in BELOW}
    assert set(above) == {"prefixlens.peft_interop"} and len(above["prefixlens.peft_interop"]) == 1
    from_peft = inspect.getsource(pl.KVPrefix.from_peft)
    assert "from prefixlens.peft_interop import kv_prefix_from_peft" in from_peft
    for lower in BELOW:  # and nothing below imports a form at module level
        source = ast.parse((ROOT / (lower.replace(".", "/") + ".py")).read_text())
        top = [n.module for n in source.body if isinstance(n, ast.ImportFrom) and n.module]
        assert "prefixlens.prefixes" not in top and "prefixlens.injection" not in top, lower


_FRESH = r"""
import importlib.util, sys, types

# the package's own __init__ imports every module (the public API); load the forms without it
spec = importlib.util.find_spec("prefixlens")
package = types.ModuleType("prefixlens")
package.__path__ = list(spec.submodule_search_locations)
sys.modules["prefixlens"] = package

from prefixlens import prefixes

loaded = sorted(m for m in sys.modules if m.startswith("prefixlens."))
print("LOADED", loaded)
assert set(loaded) <= {"prefixlens.prefixes", "prefixlens.runtime", "prefixlens.serialization",
                       "prefixlens.signature", "prefixlens.text"}, loaded

# and what used to import upwards inside functions (from_prompt, to_kv, from_chat) no longer does
from prefixlens import models
import torch
model = models.toy_gpt2(n_layers=2, d_model=32, n_heads=4, d_vocab=61, n_ctx=64, seed=7)
tokens = torch.tensor([3, 4, 5])
for cls in prefixes.FORMS.values():
    prefix = cls.from_prompt(model, tokens)
    kv = prefix.to_kv(model)
    assert torch.allclose(kv.keys, prefixes.KVPrefix.from_prompt(model, tokens).keys, atol=1e-5)
for name in ("prefixlens.injection", "prefixlens.peft_interop", "prefixlens.decomposition",
             "prefixlens.generation", "prefixlens.analysis", "prefixlens.capacity"):
    assert name not in sys.modules, name
print("OK")
"""


def test_importing_the_forms_does_not_import_injection_or_peft_interop():
    run = subprocess.run([sys.executable, "-c", _FRESH], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and "OK" in run.stdout, run.stdout[-2000:] + run.stderr[-4000:]


def test_to_kv_is_refused_inside_an_attached_block():
    model = build("gpt2")
    outer = pl.KVPrefix.random(model, 2)
    with pl.attached(model, outer):
        with pytest.raises(RuntimeError, match="ResidualPrefix.to_kv inside a `prefixlens.attached` block"):
            pl.ResidualPrefix.random(model, 2).to_kv(model)
    assert pl.ResidualPrefix.random(model, 2).to_kv(model).length == 2


def test_metadata_written_is_unchanged(tmp_path):
    model = build("gpt2")
    pl.SoftPrompt.random(model, 2).save(tmp_path / "p.safetensors")
    _, meta = load_tensors(tmp_path / "p.safetensors")
    assert meta["form"] == "SoftPrompt" and json.loads(meta["signature"])
