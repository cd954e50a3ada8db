"""Declarative fields: one description of an option serves the YAML specs and the Python API.

A :class:`Field` says what a value must be (type, sign, choices) and its default.
:func:`validate` checks a mapping against a dict of fields and raises a
:class:`~pyro_sparse.errors.SpecError` that names the source file, the path inside it
(``layers[2].prior.scale``) and what was expected.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import yaml

from .errors import SpecError

REQUIRED = object()


def short_repr(value, limit: int = 80) -> str:
    """``repr(value)`` cut to ``limit`` characters, for error messages about arbitrary input."""
    try:
        text = repr(value)
    except Exception:  # e.g. an int with more digits than Python will print
        text = f"<{type(value).__name__}>"
    return text if len(text) <= limit else text[: limit - 3] + "..."


@dataclass(frozen=True)
class Field:
    kind: str  # "float" | "int" | "bool" | "str" | "choice" | "size" | "any" | "dict" | "list"
    default: Any = REQUIRED
    positive: bool = False  # > 0
    nonneg: bool = False  # >= 0
    choices: tuple | Callable[[], tuple] = ()  # a callable: read when checked (a registry's names)
    allow_none: bool = False
    doc: str = ""

    def options(self) -> tuple:
        """The allowed values of a choice (a callable ``choices`` is read now)."""
        return tuple(self.choices()) if callable(self.choices) else self.choices

    def expected(self) -> str:
        if self.kind == "choice":
            return "one of " + ", ".join(repr(c) for c in self.options())
        if self.kind == "size":
            return "a positive integer or 'auto'"
        sign = " > 0" if self.positive else (" >= 0" if self.nonneg else "")
        noun = {"float": "a number", "int": "an integer", "bool": "true or false", "str": "a string",
                "dict": "a mapping", "list": "a list"}.get(self.kind, "a value")
        return noun + sign

    def check(self, value, path: str, source: str | None):
        """Return the validated (possibly converted) value or raise SpecError."""
        def bad(why=None):
            raise SpecError(why or f"expected {self.expected()}, got {short_repr(value)}", source, path)

        if value is None:
            if self.allow_none:
                return None
            bad()
        kind = self.kind
        if kind == "any":
            return value
        if kind == "bool":
            if not isinstance(value, bool):
                bad()
            return value
        if kind == "str":
            if not isinstance(value, str):
                bad()
            return value
        if kind == "dict":
            if not isinstance(value, dict):
                bad()
            return value
        if kind == "list":
            if not isinstance(value, list):
                bad()
            return value
        if kind == "choice":
            if value not in self.options():
                bad()
            return value
        if kind == "size":
            if value == "auto":
                return value
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                bad()
            return value
        if kind in ("float", "int"):
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                # YAML reads 1e-3 (no dot) as a string: accept numeric strings for floats.
                if kind == "float" and isinstance(value, str):
                    try:
                        value = float(value)
                    except ValueError:
                        bad()
                else:
                    bad()
            if kind == "int":
                if isinstance(value, float):
                    if not (math.isfinite(value) and value.is_integer()):
                        bad()
                    value = int(value)
            else:
                try:
                    value = float(value)
                except OverflowError:  # an int too large for a float
                    bad()
                if not math.isfinite(value):
                    bad()
            if self.positive and not value > 0:
                bad()
            if self.nonneg and not value >= 0:
                bad()
            return value
        raise AssertionError(f"unknown field kind {kind}")


def validate(fields: dict[str, Field], values: dict, path: str = "", source: str | None = None,
             ignore: tuple = ()) -> dict:
    """Check ``values`` against ``fields``; return a dict with defaults filled in.

    Unknown keys and missing required keys are errors naming ``path``.
    """
    if not isinstance(values, dict):
        raise SpecError(f"expected a mapping, got {short_repr(values)}", source, path or None)
    prefix = f"{path}." if path else ""
    unknown = [k for k in values if k not in fields and k not in ignore]
    if unknown:
        raise SpecError(f"unknown key {short_repr(unknown[0])}; expected one of {sorted(fields)}",
                        source, prefix + short_repr(unknown[0]).strip("'"))
    out = {}
    for key, field in fields.items():
        if key in values:
            out[key] = field.check(values[key], prefix + key, source)
        elif field.default is REQUIRED:
            raise SpecError(f"missing required key {key!r} ({field.expected()})", source, path or None)
        else:
            out[key] = field.default
    return out


class Configurable:
    """Base for classes whose constructor arguments are declared as :class:`Field` s.

    ``fields`` lists the options in positional order; ``__init__`` validates them so the
    Python API gives the same clear errors as a YAML spec.
    """

    fields: dict[str, Field] = {}

    def __init__(self, *args, **kwargs):
        names = list(self.fields)
        if len(args) > len(names):
            raise TypeError(f"{type(self).__name__} takes at most {len(names)} positional arguments")
        for name, arg in zip(names, args):
            if name in kwargs:
                raise TypeError(f"{type(self).__name__} got two values for {name!r}")
            kwargs[name] = arg
        self.config = validate(self.fields, kwargs, path=type(self).__name__)
        for key, value in self.config.items():
            setattr(self, key, value)

    def __repr__(self):
        args = ", ".join(f"{k}={v!r}" for k, v in self.config.items())
        return f"{type(self).__name__}({args})"


def build_registered(registry: dict, spec, base: type, what: str, kind_label: str | None = None):
    """An instance from a registry of :class:`Configurable` classes: ``spec`` is an instance of
    ``base``, a registered name, or a ``{type: name, **options}`` mapping. Errors call the
    thing ``what`` ('prior') and its name ``kind_label`` ('prior type')."""
    if isinstance(spec, base):
        return spec
    if isinstance(spec, str):
        spec = {"type": spec}
    if not isinstance(spec, dict) or "type" not in spec:
        raise ValueError(f"expected a {base.__name__}, a {what} name or a mapping with 'type', got {spec!r}")
    options = dict(spec)
    kind = options.pop("type")
    if not isinstance(kind, str) or kind not in registry:
        raise ValueError(f"unknown {kind_label or what} {kind!r}; expected one of {sorted(registry)}")
    return registry[kind](**options)


def registrar(registry: dict):
    """Make the class decorator of a registry: ``@register("name")`` stores the class in
    ``registry`` under ``name`` (the ``type:`` a spec uses) and sets its ``spec_name``."""

    def register(name: str):
        def wrap(cls):
            cls.spec_name = name
            registry[name] = cls
            return cls

        return wrap

    return register


def load_yaml(path: str) -> dict:
    """Read a YAML mapping with the safe loader; errors name the file."""
    if not isinstance(path, (str, os.PathLike)):
        raise SpecError(f"expected a path to a YAML file, got {short_repr(path)}")
    try:
        with open(path) as f:
            data = yaml.safe_load(f)
    except FileNotFoundError:
        raise SpecError("no such file", path) from None
    except IsADirectoryError:
        raise SpecError("is a directory, expected a YAML file", path) from None
    except yaml.YAMLError as e:
        raise SpecError(f"invalid YAML: {e}", path) from None
    except UnicodeDecodeError as e:
        raise SpecError(f"not a text file ({e})", path) from None
    except (ValueError, RecursionError) as e:  # e.g. an integer with thousands of digits, deep nesting
        raise SpecError(f"invalid YAML: {type(e).__name__}: {str(e)[:200]}", path) from None
    except OSError as e:
        raise SpecError(f"cannot read: {e.strerror or e}", path) from None
    if not isinstance(data, dict):
        raise SpecError(f"expected a mapping at the top level, got {type(data).__name__}", path)
    return data
