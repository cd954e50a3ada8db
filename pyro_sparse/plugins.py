"""Plugins: priors, layers, likelihoods, guides, fitting methods and reduction rules from outside
the package, registered by one explicit loader.

A plugin is a Python module. Its components are the classes it *defines* (not those it imports)
whose own body sets ``spec_name`` (a rule: ``name``), whose name does not start with ``_``, and
which subclass one of the library's bases; each goes to the registry of its base
(:data:`BASES`): a :class:`~pyro_sparse.priors.Prior` to ``PRIORS``, a
:class:`~pyro_sparse.layers.Layer` to ``LAYERS`` (and to ``CONVERSIONS`` when it declares the
``torch_types`` it converts), a :class:`~pyro_sparse.reduction.rules.Rule` to ``RULES`` (as an
instance), and so on. Registering checks the contract of the registry (a prior must define
``site_prior``, a layer must declare its ``curvature``; :meth:`pyro_sparse.registry.Registry.register`).
So a new prior, layer or rule is one class in one file::

    # my_priors.py
    class DoubleExponential(Prior):
        spec_name = "double_exponential"
        ...

Two ways to load one:

* an installed package declares an entry point in the group :data:`ENTRY_POINT_GROUP`
  (``pyproject.toml``: ``[project.entry-points."pyro_sparse.plugins"] mine = "my_pkg.my_priors"``);
  every such module is loaded with the built-ins, the first time any registry is read;
* a model spec or a recipe names it: ``plugins: [my_priors]`` (a module on the path, or beside the
  spec) or ``plugins: [path/to/my_priors.py]``. Importing a module runs its code, so this needs
  :func:`~pyro_sparse.usercode.allow_code` (``--allow-code`` on the command line), like a spec's
  ``module:``.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import os
import sys
from importlib.metadata import entry_points

from .errors import SpecError
from .registry import REGISTRIES

__all__ = ["ENTRY_POINT_GROUP", "BASES", "components", "register_module", "load_plugins", "parse_plugins",
           "load_entry_points"]

#: the entry-point group installed packages declare their plugin modules in
ENTRY_POINT_GROUP = "pyro_sparse.plugins"

#: "module:Base" -> the registry kind its subclasses go to (read in this order)
BASES = {
    "pyro_sparse.priors:Prior": "prior",
    "pyro_sparse.layers:Layer": "layer",
    "pyro_sparse.likelihoods:Likelihood": "likelihood",
    "pyro_sparse.guides:Guide": "guide",
    "pyro_sparse.training:Trainer": "fitting method",
    "pyro_sparse.reduction.rules:Rule": "reduction rule",
}

_loaded: dict[str, list[str]] = {}  # module name -> what it registered ("kind:name")
_entry_points_read = [False]


def _base(ref):
    module, _, attr = ref.partition(":")
    return getattr(importlib.import_module(module), attr)


def components(module) -> list[tuple[str, object]]:
    """``(registry kind, component)`` of every component ``module`` defines (see the module
    docstring); a layer that converts torch modules also as a ``module conversion``."""
    out = []
    bases = [(_base(ref), kind) for ref, kind in BASES.items()]
    for name, obj in vars(module).items():
        if not (inspect.isclass(obj) and obj.__module__ == module.__name__ and not name.startswith("_")):
            continue
        kind = next((k for base, k in bases if issubclass(obj, base) and obj is not base), None)
        if kind is None or not ({"spec_name", "name"} & set(vars(obj))):
            continue
        out.append((kind, obj() if kind == "reduction rule" else obj))
        if kind == "layer" and getattr(obj, "torch_types", ()):
            out.append(("module conversion", obj))
    return out


def register_module(module) -> list[str]:
    """Register the components of ``module`` (:func:`components`); returns ``"kind:name"`` of each."""
    names = []
    for kind, obj in components(module):
        registry = REGISTRIES[kind]
        registry.register(obj)
        names.append(f"{kind}:{getattr(obj, 'spec_name', None) or obj.name}")
    _loaded[module.__name__] = names
    return names


def _import_file(path, source, where):
    name = "pyro_sparse_plugin_" + os.path.splitext(os.path.basename(path))[0]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as e:
        del sys.modules[name]
        raise SpecError(f"plugin {path}: importing it failed: {type(e).__name__}: {e}", source, where) from None
    return module


def plugin_file(ref: str, source=None, where="plugins") -> str:
    """The absolute path of a plugin ``.py`` file: beside the spec ``source``, else from the current
    directory; SpecError where there is none."""
    base = os.path.dirname(os.path.abspath(source)) if isinstance(source, str) else os.getcwd()
    file = next((p for p in (os.path.join(base, ref), os.path.abspath(ref)) if os.path.isfile(p)), None)
    if file is None:
        raise SpecError(f"plugin file {ref!r} not found (looked beside the spec and in {os.getcwd()})", source, where)
    return file


def parse_plugins(data, source=None) -> list | None:
    """Load the ``plugins:`` a spec or recipe mapping names, before the rest of it is read (its
    ``prior:``, ``layers:`` and ``method:`` may name what they register); returns the list with
    ``.py`` paths made absolute (a run directory's copy of the spec still finds them)."""
    refs = data.get("plugins") if isinstance(data, dict) else None
    if refs is None:
        return None
    load_plugins(refs, source)
    return [plugin_file(r, source, f"plugins[{i}]") if r.endswith(".py") else r for i, r in enumerate(refs)]


def load_plugins(refs, source: str | None = None, path: str = "plugins") -> list[str]:
    """Load the plugin modules a spec or recipe names (``plugins:``): module names or ``.py``
    paths (relative to the spec's directory, then to the current one). Needs
    :func:`~pyro_sparse.usercode.allow_code`; a module already loaded is not loaded again.
    Returns what was registered (``"kind:name"``)."""
    from .usercode import code_allowed

    if refs is None:
        return []
    if not isinstance(refs, list) or not all(isinstance(r, str) and r for r in refs):
        raise SpecError(f"expected a list of module names or .py paths, got {refs!r}", source, path)
    if refs and not code_allowed():
        raise SpecError(f"loading plugins {refs} runs their code; allow it with --allow-code (Python: "
                        "`with pyro_sparse.usercode.allow_code(): ...`)", source, path)
    names = []
    for i, ref in enumerate(refs):
        where = f"{path}[{i}]"
        if ref.endswith(".py"):
            file = plugin_file(ref, source, where)
            key = "pyro_sparse_plugin_" + os.path.splitext(os.path.basename(file))[0]
            module = sys.modules.get(key) or _import_file(file, source, where)
        else:
            if not all(part.isidentifier() for part in ref.split(".")):
                raise SpecError(f"expected a module name (package.module) or a .py path, got {ref!r}", source, where)
            from .usercode import import_module

            module = import_module(ref, source, where)
        if module.__name__ in _loaded:
            names += _loaded[module.__name__]
            continue
        try:
            names += register_module(module)
        except ValueError as e:
            raise SpecError(f"plugin {ref}: {e}", source, where) from None
    return names


def load_entry_points():
    """Register the plugin modules installed packages declare in :data:`ENTRY_POINT_GROUP`
    (once; :meth:`~pyro_sparse.registry.Registry.load` calls it after the built-ins)."""
    if _entry_points_read[0]:
        return
    _entry_points_read[0] = True
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        module = ep.load()
        if inspect.ismodule(module) and module.__name__ not in _loaded:
            register_module(module)
