"""The public API surface: every exported name imports, and every module is reachable as a module."""

from __future__ import annotations

import importlib
import os
import types
from pathlib import Path

import pytest

import intervene
from tests.test_layering import MODULES

IMPORTABLE = sorted(m for m in MODULES if m != "intervene.__main__")  # importing __main__ runs the CLI
PACKAGES_WITH_ALL = [m for m in IMPORTABLE if hasattr(importlib.import_module(m), "__all__")]


@pytest.mark.parametrize("name", sorted(intervene.__all__))
def test_every_exported_name_imports(name: str) -> None:
    ns: dict = {}
    exec(f"from intervene import {name}", ns)  # the statement users write, not just getattr
    assert ns[name] is getattr(intervene, name)


@pytest.mark.parametrize("module", PACKAGES_WITH_ALL)
def test_every_subpackage_all_imports(module: str) -> None:
    mod = importlib.import_module(module)
    missing = [n for n in mod.__all__ if not hasattr(mod, n)]
    assert not missing, f"{module}.__all__ names {missing}, which it does not define"


@pytest.mark.parametrize("module", IMPORTABLE)
def test_import_as_binds_the_module(module: str) -> None:
    """``import intervene.x.y as m`` must give the module, not a function that shadows it in a package."""
    ns: dict = {}
    exec(f"import {module} as m", ns)
    assert isinstance(ns["m"], types.ModuleType), f"`import {module} as m` binds {ns['m']!r}"
    assert ns["m"].__name__ == module


def test_bake_and_push_and_demo_model_are_functions_at_the_top() -> None:
    from intervene import bake_and_push, demo_model

    assert callable(bake_and_push) and callable(demo_model)
    assert isinstance(importlib.import_module("intervene.assets"), types.ModuleType)


def test_every_builtin_method_is_exported_and_registered() -> None:
    for type_name, cls in intervene.registered_types().items():
        if cls.__module__.startswith("intervene."):
            assert getattr(intervene, cls.__name__) is cls, f"{type_name}: {cls.__name__} is not exported"


def test_the_package_ships_type_information() -> None:
    assert (Path(intervene.__file__).parent / "py.typed").is_file()
    text = (Path(intervene.__file__).parent.parent / "pyproject.toml").read_text()
    assert "py.typed" in text


def test_the_lazy_table_matches_the_static_imports_and_all() -> None:
    """``intervene/__init__.py`` imports on first use (PEP 562): its name table, the imports type checkers read
    and ``__all__`` must name the same things."""
    import ast

    tree = ast.parse(Path(intervene.__file__).read_text())
    guarded = next(n for n in tree.body if isinstance(n, ast.If) and ast.unparse(n.test) == "TYPE_CHECKING")
    static = {}
    for node in guarded.body:
        for a in node.names:
            static[a.asname or a.name.rpartition(".")[2]] = a.name if isinstance(node, ast.Import) else node.module
    assert static == intervene._EXPORTS
    assert set(intervene.__all__) == set(static) | {"__version__"}


def test_import_intervene_is_light_and_loading_registers_the_methods(tmp_path: Path) -> None:
    """``import intervene`` imports no torch; a diff loads through the core alone (the registry registers the
    built-in methods on first lookup, intervene/autoload.py)."""
    import subprocess
    import sys

    root = Path(intervene.__file__).parent.parent
    code = ("import sys, intervene\nassert 'torch' not in sys.modules\n"
            "import torch\nfrom tests.tiny_models import tiny_model\n"
            "from intervene.methods.steering import Steering\n"
            "model = tiny_model('llama')\n"
            f"intervene.Intervenable(model, Steering({{'layers.1': torch.ones(32)}}), attach=False).save_pretrained({str(tmp_path / 'd')!r})\n")
    load = ("import sys\nfrom intervene.intervenable import Intervenable\nfrom tests.tiny_models import tiny_model\n"
            "assert 'intervene.methods' not in sys.modules\n"
            f"ivm = Intervenable.load({str(tmp_path / 'd')!r}, tiny_model('llama'))\n"
            "assert type(ivm.interventions[0]).__name__ == 'Steering'\n")
    env = {**os.environ, "PYTHONPATH": str(root)}
    for src in (code, load):
        r = subprocess.run([sys.executable, "-c", src], capture_output=True, text=True, cwd=root, env=env, timeout=300)
        assert r.returncode == 0, r.stderr[-3000:]
