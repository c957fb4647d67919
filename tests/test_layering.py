"""The import graph follows an explicit layer order and has no cycles (docs/architecture.md, "Layers").

Every module under ``intervene/`` is parsed; every import counts — at module level, inside functions
and under ``TYPE_CHECKING`` — because a lazy import is still a dependency. A module may import from
its own layer or any layer below it, never above; and no two modules, nor two packages, may depend
on each other in a cycle.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent / "intervene"

# Lowest first. A module belongs to the entry that is the longest prefix of its dotted name.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("foundation", ("intervene.errors", "intervene.fileio", "intervene.version", "intervene.hparams",
                    "intervene.autoload", "intervene.htmlpage", "intervene.safeio", "intervene.schemas", "intervene.tensorfile")),
    ("core: sites, positions, hooks", ("intervene.positions", "intervene.sites", "intervene.hooks")),
    ("core: interventions", ("intervene.intervention", "intervene.registry")),
    ("core: diffs and baking", ("intervene.cards", "intervene.load_sites", "intervene.diff_format", "intervene.hubio",
                                "intervene.bake")),
    ("core: the engine", ("intervene.intervenable",)),
    ("substrate", ("intervene.assets", "intervene.data", "intervene.probes", "intervene.activations")),
    ("toolkits", ("intervene.evaluate", "intervene.features", "intervene.publish", "intervene.command",
                  "intervene.training")),
    ("methods", ("intervene.methods",)),
    ("interop", ("intervene.interop",)),
    ("applications", ("intervene.demo", "intervene.elicit", "intervene.plots", "intervene.cli")),
    ("public API", ("intervene", "intervene.__main__")),
]
CORE = {"intervene.errors", "intervene.fileio", "intervene.sites", "intervene.positions", "intervene.hooks",
        "intervene.intervention", "intervene.intervenable", "intervene.diff_format"}


def modules() -> dict[str, Path]:
    out = {}
    for path in sorted(ROOT.rglob("*.py")):
        parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


MODULES = modules()


def _resolve(name: str) -> str | None:
    """The intervene module ``name`` refers to (a module, or the package holding an attribute)."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def imports_of(module: str, path: Path) -> set[str]:
    """Every intervene module ``module`` imports (``from pkg import sub`` counts as ``pkg.sub``)."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base_parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(base_parts + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            # `from pkg import name`: the submodule pkg.name if there is one, else pkg itself
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]
        else:
            continue
        for t in targets:
            if t == "intervene" or t.startswith("intervene."):
                r = _resolve(t)
                if r is not None and r != module:
                    out.add(r)
    return out


GRAPH = {m: imports_of(m, p) for m, p in MODULES.items()}


def layer_of(module: str) -> int:
    best, best_len = None, -1
    for i, (_, prefixes) in enumerate(LAYERS):
        for pre in prefixes:
            if pre == "intervene" and module != "intervene":
                continue  # the package itself is the public API; its modules must be listed
            if (module == pre or module.startswith(pre + ".")) and len(pre) > best_len:
                best, best_len = i, len(pre)
    assert best is not None, f"{module} is in no layer: add it to LAYERS in {__file__}"
    return best


def package_of(module: str) -> str:
    """The unit of the package-level cycle check: ``intervene.methods.<name>``, ``intervene.<sub>``."""
    parts = module.split(".")
    if len(parts) >= 3 and parts[1] == "methods":
        return ".".join(parts[:3])
    return ".".join(parts[:2])


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one node (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_every_module_has_a_layer() -> None:
    for m in MODULES:
        layer_of(m)


def test_imports_go_down_the_layers() -> None:
    bad = [f"{m} ({LAYERS[layer_of(m)][0]}) imports {t} ({LAYERS[layer_of(t)][0]})"
           for m, targets in GRAPH.items() for t in sorted(targets) if layer_of(t) > layer_of(m)]
    assert not bad, "upward imports:\n" + "\n".join(bad)


def test_the_core_imports_no_method_cli_evaluation_or_publishing() -> None:
    banned = ("intervene.methods", "intervene.cli", "intervene.evaluate", "intervene.publish", "intervene.demo",
              "intervene.elicit", "intervene.features", "intervene.interop")
    bad = [f"{m} imports {t}" for m in CORE for t in GRAPH[m] if t.startswith(banned)]
    assert not bad, bad


def test_no_import_cycles_between_modules() -> None:
    assert _cycles(GRAPH) == []


def test_no_import_cycles_between_packages() -> None:
    packages: dict[str, set[str]] = {}
    for m, targets in GRAPH.items():
        pm = package_of(m)
        packages.setdefault(pm, set()).update(package_of(t) for t in targets if package_of(t) != pm)
    # the public API package imports everything by design; it is the top, not part of a cycle
    packages.pop("intervene", None)
    assert _cycles(packages) == []


def test_methods_do_not_import_each_other_except_through_their_packages() -> None:
    """A method imports another method only through that method's public package (never its internals),
    so a package can rearrange its modules freely."""
    bad = []
    for m, targets in GRAPH.items():
        if not m.startswith("intervene.methods."):
            continue
        own = package_of(m)
        for t in targets:
            if t.startswith("intervene.methods.") and package_of(t) != own and t != package_of(t):
                bad.append(f"{m} imports {t}")
    assert not bad, bad


def test_the_checker_sees_lazy_and_type_checking_imports(tmp_path: Path) -> None:
    src = ("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from intervene.cli import demo\n"
           "def f():\n    import intervene.methods.iti.fit\n    from intervene.bake import bake\n")
    p = tmp_path / "mod.py"
    p.write_text(src)
    assert imports_of("intervene.sites", p) >= {"intervene.cli.demo", "intervene.methods.iti.fit", "intervene.bake"}
