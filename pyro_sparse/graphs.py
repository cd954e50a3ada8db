"""Reading the graphs ``pyro-sparse export`` writes (:mod:`pyro_sparse.deploy`): which kind a file
is and a function that runs it -- TorchScript through ``torch.jit``, ONNX through ONNX Runtime --
with the metadata the export stored beside it (likelihood, input shape and transform, source).
What ``pyro-sparse predict`` needs of a graph, without the export machinery.
"""

from __future__ import annotations

import json
import os
import warnings
import zipfile

import torch

from .errors import PyroSparseError

__all__ = ["METADATA_KEY", "graph_kind", "load_graph"]

#: the metadata's name: TorchScript extra file ``pyro_sparse.json``, ONNX ``metadata_props`` key ``pyro_sparse``
METADATA_KEY = "pyro_sparse"


def graph_kind(path) -> str | None:
    """``onnx`` or ``torchscript`` for an exported graph, None for anything else (a compact file)."""
    if not os.path.isfile(path):
        return None
    if str(path).lower().endswith(".onnx"):
        return "onnx"
    try:
        with zipfile.ZipFile(path) as z:
            names = z.namelist()
    except (zipfile.BadZipFile, OSError):
        return None
    if any(n.endswith(f"/extra/{METADATA_KEY}.json") for n in names) and any("/code/" in n for n in names):
        return "torchscript"
    return None


def load_graph(path, kind=None):
    """``(run, metadata)``: a function of raw inputs (a tensor) returning the graph's outputs (a
    tensor), and the graph's metadata, for a TorchScript or ONNX file written by
    :func:`export_graph` (``kind``: ``torchscript`` or ``onnx``; default: read off the file).
    ONNX needs ``onnxruntime``."""
    kind = kind or graph_kind(path)
    if kind == "torchscript":
        extra = {f"{METADATA_KEY}.json": ""}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # torch.jit.load's notice (torch 2.13)
            module = torch.jit.load(path, map_location="cpu", _extra_files=extra)
        module.eval()
        metadata = json.loads(extra[f"{METADATA_KEY}.json"] or "{}")

        def run(x):
            with torch.no_grad():
                return module(x)

        return run, metadata
    if kind == "onnx":
        try:
            import onnxruntime
        except ImportError:
            raise PyroSparseError(f"{path}: running an ONNX graph needs onnxruntime (pip install "
                                  "'pyro-sparse[onnx]')") from None
        session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
        meta = session.get_modelmeta().custom_metadata_map
        if METADATA_KEY not in meta:
            raise PyroSparseError(f"{path}: an ONNX file without pyro-sparse's metadata (not written by "
                                  "pyro-sparse export)")
        metadata = json.loads(meta[METADATA_KEY])
        name = session.get_inputs()[0].name

        def run(x):
            return torch.from_numpy(session.run(None, {name: x.numpy()})[0])

        return run, metadata
    raise PyroSparseError(f"{path}: not a graph written by pyro-sparse export (TorchScript with "
                          f"{METADATA_KEY}.json, or .onnx)")
