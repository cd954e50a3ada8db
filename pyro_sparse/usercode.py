"""Importing code that a file names (a model spec's ``module: package.path:ClassName``).

Importing a module runs it, so a spec that names a class is code, not data: nothing here imports
unless the caller allowed it. The command line allows it with ``--allow-code``; in Python::

    from pyro_sparse.usercode import allow_code
    with allow_code():
        run, metrics = fit_run("models/my_resnet.yaml", None, "digits", "runs/x")

Otherwise :func:`import_object` raises a :class:`~pyro_sparse.errors.SpecError` that says so.
A name that does not import as it stands is looked for beside the spec file and in the current
directory as well (``examples.resnet_digits:ResidualCNN`` from the repository root).
"""

from __future__ import annotations

import importlib
import os
import sys
from contextlib import contextmanager

from .errors import SpecError

__all__ = ["allow_code", "code_allowed", "import_object", "import_module", "check_reference"]

_ALLOWED = [False]


@contextmanager
def allow_code(allowed: bool = True):
    """Within the block, specs may name code to import (``allowed=False``: they may not)."""
    _ALLOWED.append(bool(allowed))
    try:
        yield
    finally:
        _ALLOWED.pop()


def code_allowed() -> bool:
    return _ALLOWED[-1]


def check_reference(ref, source=None, path="module") -> str:
    """``ref`` if it reads ``package.module:Name`` (``Name`` may be dotted); SpecError otherwise."""
    module, sep, name = ref.partition(":") if isinstance(ref, str) else ("", "", "")
    parts = module.split(".") + name.split(".")
    if not sep or not all(p.isidentifier() for p in parts):
        raise SpecError(f"expected 'package.module:ClassName', got {ref!r}", source, path)
    return ref


def import_object(ref: str, source=None, path="module"):
    """The object ``package.module:Name`` names (imported; needs :func:`allow_code`)."""
    check_reference(ref, source, path)
    module_name, _, name = ref.partition(":")
    obj = import_module(module_name, source, path, what=ref)
    for part in name.split("."):
        if not hasattr(obj, part):
            raise SpecError(f"module {module_name!r} has no {name!r}", source, path)
        obj = getattr(obj, part)
    return obj


def import_module(module_name: str, source=None, path="module", what: str | None = None):
    """The module ``module_name``, imported (needs :func:`allow_code`); not on ``sys.path`` as it
    stands, it is looked for beside the spec file ``source`` and in the current directory."""
    if not code_allowed():
        raise SpecError(f"importing {what or module_name!r} runs its code; allow it with --allow-code (Python: "
                        "`with pyro_sparse.usercode.allow_code(): ...`)", source, path)
    extra = [os.path.dirname(os.path.abspath(source))] if isinstance(source, str) else []
    extra.append(os.getcwd())
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name is None or not module_name.startswith(e.name):
            raise SpecError(f"importing {module_name!r} failed: {e}", source, path) from None
        added = [d for d in extra if d not in sys.path]
        sys.path[:0] = added
        try:
            return importlib.import_module(module_name)
        except ModuleNotFoundError:
            raise SpecError(f"no module named {module_name!r} (looked on sys.path, beside the spec and in "
                            f"{os.getcwd()})", source, path) from None
        except Exception as e2:  # the module's own code failed
            raise SpecError(f"importing {module_name!r} failed: {type(e2).__name__}: {e2}", source, path) from None
        finally:
            for d in added:
                if d in sys.path:
                    sys.path.remove(d)
    except Exception as e:
        raise SpecError(f"importing {module_name!r} failed: {type(e).__name__}: {e}", source, path) from None
