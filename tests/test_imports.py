"""The import graph has no cycles, every module imports on its own, and registries are filled by
the one loader (pyro_sparse.builtins), not as a side effect of importing a module."""

import ast
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(ROOT, "pyro_sparse")


def _modules() -> dict:
    """Module name -> file, for every module of the package."""
    out = {}
    for dirpath, _, files in os.walk(PACKAGE):
        for f in files:
            if f.endswith(".py"):
                name = os.path.relpath(os.path.join(dirpath, f), ROOT)[:-3].replace(os.sep, ".")
                out[name[:-len(".__init__")] if name.endswith(".__init__") else name] = os.path.join(dirpath, f)
    return out


def _import_graph(mods) -> dict:
    """Module -> the package modules it imports anywhere in its file (module level or inside a
    function), plus the packages whose ``__init__`` such an import runs."""
    graph = {}
    for mod, path in mods.items():
        package = mod if path.endswith("__init__.py") else mod.rsplit(".", 1)[0]
        edges = set()
        for node in ast.walk(ast.parse(open(path).read())):
            if isinstance(node, ast.ImportFrom):
                base = package.split(".")[:len(package.split(".")) - node.level + 1] if node.level else []
                target = ".".join(base + ([node.module] if node.module else []))
                edges.update(t for t in [target] + [f"{target}.{a.name}" for a in node.names] if t in mods)
            elif isinstance(node, ast.Import):
                edges.update(a.name for a in node.names if a.name in mods)
        for e in list(edges):  # importing a.b.c runs a.b's __init__
            parts = e.split(".")
            edges.update(p for p in (".".join(parts[:i]) for i in range(2, len(parts)))
                         if p in mods and not mod.startswith(p + ".") and p != mod)
        edges.discard(mod)
        graph[mod] = edges
    return graph


def _cycle(graph):
    """One cycle of the graph as a list of modules, or None (depth-first search)."""
    state, path = {}, []

    def visit(v):
        state[v] = 1
        path.append(v)
        for w in sorted(graph[v]):
            if state.get(w) == 1:
                return path[path.index(w):] + [w]
            if w not in state:
                found = visit(w)
                if found:
                    return found
        state[v] = 2
        path.pop()
        return None

    for v in sorted(graph):
        if v not in state:
            found = visit(v)
            if found:
                return found
    return None


def test_the_import_graph_has_no_cycles():
    graph = _import_graph(_modules())
    assert "pyro_sparse.builtins" not in set().union(*(graph[m] for m in graph if m != "pyro_sparse.cli")), \
        "only the command line may import the loader; registries run it when first read"
    assert _cycle(graph) is None, " -> ".join(_cycle(graph))
    # the check itself finds a cycle
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


def test_every_module_imports_alone_and_registers_nothing():
    """Each module imported first in a clean package state (fresh pyro_sparse modules, torch and
    pyro already loaded to keep it fast): no ImportError from a cycle, and the registries stay
    empty until one is read, when the loader fills them all."""
    names = sorted(m for m in _modules() if m not in ("pyro_sparse.__main__",))
    script = f"""
import importlib, sys
import torch, pyro  # noqa: F401  (third-party modules may stay loaded)
failures = []
for name in {names!r}:
    for key in [k for k in sys.modules if k == "pyro_sparse" or k.startswith("pyro_sparse.")]:
        del sys.modules[key]
    try:
        importlib.import_module(name)
    except Exception as e:
        failures.append(f"{{name}}: {{type(e).__name__}}: {{e}}")
        continue
    registry = sys.modules["pyro_sparse.registry"] if "pyro_sparse.registry" in sys.modules else None
    if registry is not None and name != "pyro_sparse.builtins" and any(
            r.loaded or r._items for r in registry.REGISTRIES.values()):
        failures.append(f"{{name}}: importing it filled a registry")
from pyro_sparse.registry import PRIORS, RULES, FITTERS, CONVERSIONS
assert "horseshoe" in PRIORS and not RULES.loaded  # the first read loads that registry alone
assert "opd" in RULES and "laplace" in FITTERS and "linear" in CONVERSIONS
print("\\n".join(failures) or "ok")
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "ok", out.stdout


def test_a_user_component_registers_by_name():
    from pyro_sparse.priors import Gaussian
    from pyro_sparse.registry import PRIORS

    class Wide(Gaussian):
        """A user's prior: a Gaussian with another default scale."""

    try:
        PRIORS.register(Wide, "wide_gaussian")
        assert PRIORS["wide_gaussian"] is Wide and Wide.spec_name == "wide_gaussian"
        from pyro_sparse.priors import build_prior

        assert isinstance(build_prior({"type": "wide_gaussian", "scale": 3.0}), Wide)
    finally:
        PRIORS._items.pop("wide_gaussian", None)
    with pytest.raises(ValueError, match="unknown prior type 'wide_gaussian'"):
        build_prior("wide_gaussian")
