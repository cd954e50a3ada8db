"""The registries: the names specs, recipes and the CLI use, and what implements them.

=============  ==============================================  ===============================
registry       a name such as                                   maps to
=============  ==============================================  ===============================
``PRIORS``     ``prior: {type: horseshoe}``                     a :class:`~pyro_sparse.priors.Prior` class
``LAYERS``     ``layers: [{type: lstm, ...}]``                  a :class:`~pyro_sparse.layers.Layer` class
``LIKELIHOODS`` ``likelihood: {type: bernoulli}``               a :class:`~pyro_sparse.likelihoods.Likelihood` class
``GUIDES``     ``guide: structured``                            a :class:`~pyro_sparse.guides.Guide` class
``FITTERS``    ``method: laplace``                              a trainer class (``SVITrainer``, ...)
``RULES``      ``pyro-sparse reduce --method opd``              a :class:`~pyro_sparse.reduction.rules.Rule`
``CONVERSIONS`` ``bayesian(module)`` on an ``nn.Linear``         the layer class whose ``torch_types`` it
                                                                converts (:mod:`pyro_sparse.convert`): every
                                                                layer that declares ``torch_types``
=============  ==============================================  ===============================

The modules that define these components register nothing themselves. The built-in ones are
registered by one explicit loader, :func:`pyro_sparse.builtins.register_builtins`, which every
registry runs for itself the first time it is read (:meth:`Registry.load`), importing only its
own components. This module imports nothing of the
package and the loader is imported by name, so the import graph stays free of cycles: a
component module may read a registry (``build_prior`` reads ``PRIORS``) without importing the
modules that fill it.

Users add their own components with ``PRIORS.register(MyPrior)`` (the name is the class's
``spec_name``) or ``PRIORS.register(MyPrior, "name")``; a module of components (one class per
new prior, layer or rule) is registered by the plugin loader, :mod:`pyro_sparse.plugins`, from
an installed package's entry point or a spec's ``plugins:``. Registering checks the contract:
the class attributes a registry ``declares`` and the base class's abstract methods.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Mapping

__all__ = ["Registry", "PRIORS", "LAYERS", "LIKELIHOODS", "GUIDES", "FITTERS", "RULES", "CONVERSIONS", "load",
           "LOADER", "REGISTRIES"]

#: the module whose ``register_builtins(registry)`` fills a registry with its built-in components
LOADER = "pyro_sparse.builtins"
#: the module that loads the plugins installed packages declare (entry points)
PLUGINS = "pyro_sparse.plugins"


def load():
    """Register the built-in components of every registry (each registry loads its own when read)."""
    for registry in REGISTRIES.values():
        registry.load()


def abstract_methods(obj) -> list[str]:
    """The methods of ``obj``'s class (or of ``obj``, a class) still abstract (``@abstractmethod`` in
    a base class and not defined by a subclass): the contract a component must fill."""
    cls = obj if isinstance(obj, type) else type(obj)
    names = {name for klass in cls.__mro__ for name in vars(klass)}
    return sorted(name for name in names
                  if getattr(inspect.getattr_static(cls, name, None), "__isabstractmethod__", False))


class Registry(Mapping):
    """Name -> component, filled by :func:`load` with the built-ins and by users with :meth:`register`.

    Components are classes (or, for ``RULES``, objects) with a ``spec_name`` (classes) or
    ``name`` (rules) attribute: the name a spec or the command line uses.
    """

    def __init__(self, kind: str, declares: dict | None = None):
        self.kind = kind
        #: class attributes every component must set (attribute -> what it is, for the message)
        self.declares = dict(declares or {})
        self._items: dict = {}
        self.loaded = False

    def load(self):
        """Register this registry's built-in components (once), by the one loader, then the plugin
        modules installed packages declare (:func:`pyro_sparse.plugins.load_entry_points`)."""
        if self.loaded:
            return
        self.loaded = True
        try:
            importlib.import_module(LOADER).register_builtins(self)
            importlib.import_module(PLUGINS).load_entry_points()
        except BaseException:
            self.loaded = False
            raise

    def register(self, obj=None, name: str | None = None):
        """Add ``obj`` under ``name`` (default: its ``spec_name`` or ``name``); returns ``obj``, so
        ``@REGISTRY.register`` works as a class decorator. A class gets ``spec_name = name``."""
        if obj is None:
            return lambda o: self.register(o, name)
        if isinstance(obj, str):  # @REGISTRY.register("name")
            return lambda o: self.register(o, obj)
        key = name or getattr(obj, "spec_name", None) or getattr(obj, "name", None)
        if not isinstance(key, str) or not key:
            raise ValueError(f"{self.kind} registry: {obj!r} needs a name (spec_name, name or the name argument)")
        for attr, what in self.declares.items():
            if getattr(obj, attr, NotImplemented) is NotImplemented:
                raise ValueError(f"{self.kind} registry: {getattr(obj, '__name__', obj)!r} declares no {attr!r}: set "
                                 f"the class attribute {attr} to {what}")
        missing = abstract_methods(obj)
        if missing:
            raise ValueError(f"{self.kind} registry: {getattr(obj, '__name__', type(obj).__name__)!r} does not define "
                             f"the required method{'s' if len(missing) > 1 else ''} {', '.join(missing)} of its base "
                             "class (see its docstring)")
        if isinstance(obj, type):
            obj.spec_name = key
        self._items[key] = obj
        return obj

    def __getitem__(self, name):
        self.load()
        return self._items[name]

    def __iter__(self):
        self.load()
        return iter(self._items)

    def __len__(self):
        self.load()
        return len(self._items)

    def __contains__(self, name):
        self.load()
        return name in self._items

    def names(self) -> list[str]:
        """The registered names, sorted."""
        return sorted(self)

    def lookup(self, name, what: str | None = None):
        """The component registered as ``name``; a ValueError that lists the names otherwise."""
        if not isinstance(name, str) or name not in self:
            raise ValueError(f"unknown {what or self.kind} {name!r}; expected one of {self.names()}")
        return self[name]

    def __repr__(self):
        return f"Registry({self.kind!r}, {sorted(self._items)})"


#: what a layer must say about the Laplace approximation (pyro_sparse.laplace.curvature)
_CURVATURE = ("a curvature backend of pyro_sparse.curvature_protocol (LINEAR for an affine map of the last axis, "
              "CONV for a convolution, or a CurvatureBackend of your own that cuts the input into patches), or to "
              "None where the Laplace approximation cannot cover the layer's parameters")

PRIORS = Registry("prior")
LAYERS = Registry("layer", declares={"curvature": _CURVATURE})
LIKELIHOODS = Registry("likelihood")
GUIDES = Registry("guide")
FITTERS = Registry("fitting method")
RULES = Registry("reduction rule")
CONVERSIONS = Registry("module conversion", declares={"curvature": _CURVATURE})

#: kind -> registry
REGISTRIES = {r.kind: r for r in (PRIORS, LAYERS, LIKELIHOODS, GUIDES, FITTERS, RULES, CONVERSIONS)}
