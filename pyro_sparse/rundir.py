"""The layout of a run directory, and the checks on one that need nothing but the file system.

A run directory (``pyro-sparse fit --out DIR``) holds ``model.yaml`` and ``inference.yaml``
(the specs as run), ``run.json`` (versions, seed, data and its fingerprint), ``metrics.jsonl``
(one line per epoch), ``checkpoint.pt`` (and ``checkpoint.pt.prev``) and ``metrics.json``.
These checks import no numerical library, so the command line refuses a wrong directory at
once, before it loads torch, Pyro or a model.
"""

from __future__ import annotations

import os

from .errors import PyroSparseError

CHECKPOINT = "checkpoint.pt"
#: the files without which a directory is not a fitted run
RUN_FILES = ("model.yaml", "inference.yaml", "run.json")


def check_out_dir(out_dir, resume, overwrite):
    """Refuse to write into a non-empty directory unless resuming it or told to overwrite a run."""
    if not isinstance(out_dir, (str, os.PathLike)) or not os.fspath(out_dir):
        raise PyroSparseError(f"the output directory must be a path, got {out_dir!r}")
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise PyroSparseError(f"{out_dir}: exists and is not a directory")
    if resume:
        ckpt = os.path.join(out_dir, CHECKPOINT)
        if not (os.path.exists(ckpt) or os.path.exists(ckpt + ".prev")):
            raise PyroSparseError(f"{out_dir}: nothing to resume (no {CHECKPOINT})")
        return
    if os.path.isdir(out_dir) and os.listdir(out_dir):
        if not overwrite:
            raise PyroSparseError(f"{out_dir}: output directory exists and is not empty; "
                                  "use --resume to continue it or --overwrite to replace it")
        if not os.path.exists(os.path.join(out_dir, "run.json")):
            raise PyroSparseError(f"{out_dir}: --overwrite only replaces a previous run directory (one with "
                                  "run.json); this one is not, so it is left alone")


def check_run_dir(directory) -> str:
    """``directory`` if it holds a fitted run (its files and a checkpoint), else a
    PyroSparseError naming what is missing."""
    if not isinstance(directory, (str, os.PathLike)) or not os.path.isdir(directory):
        raise PyroSparseError(f"{directory}: not a run directory (no such directory)")
    directory = os.fspath(directory)
    for name in RUN_FILES:
        if not os.path.exists(os.path.join(directory, name)):
            raise PyroSparseError(f"{directory}: not a run directory (missing {name})")
    if not any(os.path.exists(os.path.join(directory, CHECKPOINT + s)) for s in ("", ".prev")):
        raise PyroSparseError(f"{directory}: not a run directory (missing {CHECKPOINT})")
    return directory
