"""Atomic, safe checkpoints.

Writes go to a temporary file in the same directory, are flushed to disk and then renamed
over the target (``os.replace`` is atomic on POSIX), so a crash leaves either the old or the
new file, never a torn one; the previous good checkpoint is kept as ``<name>.prev``.
Reads use ``torch.load(weights_only=True)``: a file from someone else cannot run code, and a
crafted pickle is refused with :class:`~pyro_sparse.errors.CheckpointError`.
"""

from __future__ import annotations

import json
import os
import tempfile

import torch

from .errors import CheckpointError


def _atomic_write(path: str, write):
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save_atomic(obj, path: str, keep_previous: bool = True):
    """``torch.save(obj)`` to ``path`` atomically; keep the old file as ``path + '.prev'``."""
    if keep_previous and os.path.exists(path):
        os.replace(path, path + ".prev")
    _atomic_write(path, lambda f: torch.save(obj, f))


def write_text_atomic(path: str, text: str):
    _atomic_write(path, lambda f: f.write(text.encode()))


def write_json_atomic(path: str, obj):
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def load_safe(path: str, map_location="cpu"):
    """Load a checkpoint with ``weights_only=True``; clear errors for missing/corrupt/unsafe files."""
    if not os.path.exists(path):
        raise CheckpointError(f"{path}: no such checkpoint")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # UnpicklingError, RuntimeError (truncated zip), EOFError, ...
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        if "weights_only" in str(e) or "Unsupported global" in str(e):
            raise CheckpointError(f"{path}: refused: the file contains objects other than tensors and "
                                  f"plain containers, which could run code ({msg})") from None
        raise CheckpointError(f"{path}: corrupt or truncated checkpoint ({type(e).__name__}: {msg})") from None
