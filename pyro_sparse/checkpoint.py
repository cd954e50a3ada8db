"""Atomic, safe checkpoints.

Writes go to a temporary file in the same directory, are flushed to disk and then renamed
over the target (``os.replace`` is atomic on POSIX), so a crash leaves either the old or the
new file, never a torn one; the previous good checkpoint is kept as ``<name>.prev``. The old
file is *linked* (or copied) to ``.prev`` before the new one replaces it, so at every instant
``<name>`` itself exists once it has been written: a SIGKILL at any point leaves a loadable
checkpoint.
Reads use ``torch.load(weights_only=True)``: a file from someone else cannot run code, and a
crafted pickle is refused with :class:`~pyro_sparse.errors.CheckpointError`.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile

import torch

from .errors import CheckpointError, PyroSparseError


def _umask() -> int:
    """The process's umask: from /proc on Linux, else by setting it and putting it back (the
    portable way, which changes it for an instant under other threads)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _atomic_write(path: str, write):
    """Write ``path`` through a temporary file in its directory, fsync, rename over it.

    ``mkstemp`` creates the temporary file with mode 0600 whatever the umask; it is set to
    ``0666 & ~umask`` first, so run files get the permissions an ordinary ``open()`` would
    give them (e.g. readable by a group that shares a results directory)."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), 0o666 & ~_umask())
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _keep_copy(path: str, copy_path: str):
    """Atomically make ``copy_path`` a copy of ``path`` (a hard link where possible)."""
    directory = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(directory, f".tmp-link-{os.getpid()}-{os.path.basename(copy_path)}")
    if os.path.lexists(tmp):
        os.unlink(tmp)
    try:
        os.link(path, tmp)
    except OSError:  # file systems without hard links
        shutil.copyfile(path, tmp)
    os.replace(tmp, copy_path)


def save_atomic(obj, path: str, keep_previous: bool = True):
    """``torch.save(obj)`` to ``path`` atomically; keep the old file as ``path + '.prev'``.

    Order of operations: (1) the current ``path`` is linked to ``path.prev`` (atomic replace),
    (2) the new state is written to a temporary file and fsynced, (3) it is renamed over
    ``path``. A crash between any two steps leaves ``path`` loadable (old or new) and
    ``path.prev`` loadable. Pass ``keep_previous=False`` to leave ``path.prev`` untouched
    (used after resuming from ``.prev`` because ``path`` was corrupt: the corrupt file must
    not become the "previous good" one).
    """
    if keep_previous and os.path.exists(path):
        _keep_copy(path, path + ".prev")
    _atomic_write(path, lambda f: torch.save(obj, f))


def write_text_atomic(path: str, text: str):
    _atomic_write(path, lambda f: f.write(text.encode()))


def write_json_atomic(path: str, obj):
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def load_error(path, e: Exception, what: str = "checkpoint") -> str:
    """One line saying why ``torch.load(path, weights_only=True)`` failed with ``e``: a file holding
    Python objects other than tensors and plain containers (a pickle that names a class or a
    function: loading it could run code) is *refused*; any other failure (random bytes, a text
    file, a truncated archive: torch's unpickler stops at an opcode or record it does not know) is
    a corrupt file or not one of ours. Only torch's specific line is quoted, never its paragraph of
    advice about ``weights_only=False``."""
    lines = [line.split("  (Could this error message be improved?")[0].strip() for line in str(e).splitlines()]
    lines = [line for line in lines if line]
    named = next((line for line in lines if "GLOBAL" in line or "Unsupported global" in line), None)
    if named is not None:
        return (f"{path}: refused: the file contains objects other than tensors and plain containers, which could run "
                f"code ({named})")
    if lines and lines[0].startswith("Weights only load failed"):
        detail = next((line for line in lines[1:] if not line.startswith(("Please file", "Check the documentation"))),
                      "unknown pickle content")
        return f"{path}: corrupt or truncated {what}, or not one (torch.load stopped at: {detail})"
    return (f"{path}: corrupt or truncated {what}, or not one "
            f"({type(e).__name__}: {lines[0] if lines else type(e).__name__})")


def load_safe(path: str, map_location="cpu"):
    """Load a checkpoint with ``weights_only=True``; clear errors for missing/corrupt/unsafe files
    (:func:`load_error`)."""
    if not os.path.exists(path):
        raise CheckpointError(f"{path}: no such checkpoint")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # UnpicklingError, RuntimeError (truncated zip), EOFError, ...
        raise CheckpointError(load_error(path, e)) from None


def read_json(path: str, what: str = "file") -> dict:
    """Read a JSON mapping written by this library; errors name the file instead of a traceback."""
    try:
        with open(path) as f:
            data = json.load(f)
    except FileNotFoundError:
        raise PyroSparseError(f"{path}: missing {what}") from None
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise PyroSparseError(f"{path}: unreadable {what} ({type(e).__name__}: {e})") from None
    if not isinstance(data, dict):
        raise PyroSparseError(f"{path}: unreadable {what} (expected a JSON object, got {type(data).__name__})")
    return data
