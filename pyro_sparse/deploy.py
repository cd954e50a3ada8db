r"""Export a compact network as a graph that runs without pyro-sparse: TorchScript or ONNX.

What ``pyro-sparse export RUN_OR_COMPACT --format torchscript|onnx --out FILE`` writes (Python:
:func:`export_graph`; not to be confused with :func:`pyro_sparse.export`, which returns the
reduced network as a module of your own class):

* the graph of the compact network (:func:`pyro_sparse.rebuild`; a run directory is
  reduced first with its recipe's rule, or ``method`` and its options) preceded by the run's
  input transform, so it takes **raw inputs** shaped like the data's examples, ``(batch,
  *feature_shape)`` (float32; token ids as int64 for a language model), and returns the compact
  network's outputs (logits; a regression network's standardised outputs where the spec
  standardises targets: ``y = mean + scale * output``, the metadata's ``target_transform``);
  the batch dimension is dynamic (and the sequence length, for sequence inputs);
* ``pyro_sparse.json`` metadata: the likelihood, feature shape, transforms, learned noise,
  where it came from, the graph's input and output, and each layer's storage. TorchScript keeps
  it as an extra file (``torch.jit.load(path, _extra_files={"pyro_sparse.json": ""})``), ONNX as
  the model's ``metadata_props`` entry ``pyro_sparse``.

TorchScript is written by ``torch.jit.trace`` (deprecated in torch 2.13 in favour of
``torch.export``, still supported; its warning is silenced here), ONNX by torch's
TorchScript-based exporter (``torch.onnx.export(..., dynamo=False)``, opset 17), which needs the
``onnx`` package; with ``onnxruntime`` installed the file is checked in an ONNX Runtime session
(``pip install 'pyro-sparse[onnx]'`` installs both). Either way the graph computes every layer
with its dense kernel over the kept units (:func:`pyro_sparse.storage.dense_twin`: ONNX has no
sparse product); ONNX Runtime and TorchScript then run it without Python in the loop.

After writing, the graph is run on the check inputs -- the run's test split (a compact file:
its run's, if it is still there; ``data``: a file of yours), at batch 1 and in batches of 256 --
and its outputs compared with the compact network's: a difference above ``tolerance`` (1e-5)
times ``max(1, largest |output|)`` (float32 rounding grows with the outputs' size: ONNX Runtime's
convolutions sum in another order than torch's) removes the file and is an error.
"""

from __future__ import annotations

import json
import os
import warnings

import torch
from torch import nn

from .errors import PyroSparseError
from .graphs import METADATA_KEY, graph_kind, load_graph

__all__ = ["export_graph", "write_graph", "load_graph", "graph_kind", "DeployedNetwork", "FORMATS", "METADATA_KEY"]

FORMATS = ("torchscript", "onnx")
#: opset of the ONNX files
OPSET = 17


class DeployedNetwork(nn.Module):
    """Raw inputs -> the input transform ``(x - mean) / scale`` (where the run had one) -> the
    compact network: the module the exporters trace."""

    def __init__(self, network: nn.Module, transform: dict | None = None):
        super().__init__()
        self.network = network
        self.transformed = bool(transform) and transform.get("mode", "raw") != "raw"
        if self.transformed:
            self.register_buffer("mean", torch.as_tensor(transform["mean"], dtype=torch.float32))
            self.register_buffer("scale", torch.as_tensor(transform["scale"], dtype=torch.float32))

    def forward(self, x):
        if self.transformed:
            x = (x - self.mean) / self.scale
        return self.network(x)


# --------------------------------------------------------------------------- sources


def _from_compact(path):
    from .reduced_runs import load_compact

    module = load_compact(path)
    info = dict(getattr(module, "info", {}) or {})
    return module, info


def _from_run(directory, method=None, threshold=None, sparsity=None, structured=False, storage="auto",
              **rule_options):
    from .rebuild import align_pattern, compact
    from .reduced_runs import _decide, _load, _run_extras, run_rule

    run = _load(directory)
    method, threshold, sparsity, structured = run_rule(run, method, threshold, sparsity, structured)
    summary = run.trainer.posterior_summary()
    decision = _decide(summary, method, sparsity=sparsity, threshold=threshold, structured=structured,
                       **rule_options)
    if rule_options.get("pattern"):
        decision = align_pattern(run.network, summary, decision)
    module = compact(run.network, summary, decision, storage=storage)
    info = {"method": method, "run": os.path.abspath(directory), "sparsity": decision.sparsity,
            "options": decision.summary()["options"], **_run_extras(run)}
    return module, info, run.dataset.x_test


def _check_inputs(info, data=None):
    """The raw inputs to check the graph on: ``data`` (a .npz/.csv file), the test split of the run a
    compact file came from, or None."""
    from .data import load_inputs

    shape = tuple(info["feature_shape"]) if info.get("feature_shape") else None
    if data is not None:
        likelihood = (info.get("likelihood") or {}).get("type")
        return load_inputs(data, None, shape, "regression" if likelihood == "gaussian" else "classification")[0]
    run = info.get("run")
    if run and os.path.isdir(run):
        try:
            from .runs import load_run

            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                return load_run(run).dataset.x_test
        except Exception:  # the run moved or changed: check on random inputs instead
            return None
    return None


def _example(x, info, n=2):
    """A small raw batch for tracing: the first ``n`` check inputs, else random ones of the feature shape."""
    if x is not None and len(x):
        return x[:n]
    shape = tuple(info.get("feature_shape") or ())
    if not shape:
        raise PyroSparseError("export: the compact file records no feature shape and no data to check on; "
                              "give --data")
    return torch.randn(n, *shape, generator=torch.Generator().manual_seed(0))


def _raw(x, transform):
    """Raw inputs back from the transformed test split a run keeps."""
    if not transform or transform.get("mode", "raw") == "raw" or x is None or not x.is_floating_point():
        return x
    mean = torch.as_tensor(transform["mean"], dtype=x.dtype)
    scale = torch.as_tensor(transform["scale"], dtype=x.dtype)
    return x * scale + mean


# --------------------------------------------------------------------------- writing


def _metadata(info, module, source, fmt, example) -> dict:
    plan = getattr(module, "plan", None)
    storage = {k: v["storage"].get("storage") if v["storage"].get("layer") == "compact" else "plain"
               for k, v in (plan.layers.items() if plan is not None else ()) if "storage" in v}
    if not storage:
        from .storage import CSRState

        storage = {name: ("csr" if getattr(m, "csr_storage", True) else "dense")
                   for name, m in module.named_modules() if isinstance(m, CSRState)}
    from . import __version__

    return {"format": "pyro-sparse-graph/1", "graph": fmt, "pyro_sparse_version": __version__,
            "torch_version": torch.__version__, "source": os.path.abspath(source),
            "method": info.get("method"), "sparsity": info.get("sparsity"),
            "likelihood": info.get("likelihood"), "feature_shape": info.get("feature_shape"),
            "input_transform": info.get("input_transform"), "input_transform_applied": True,
            "target_transform": info.get("target_transform"), "noise": info.get("noise"),
            "input": {"name": "x", "dtype": str(example.dtype).replace("torch.", ""),
                      "shape": ["batch", *example.shape[1:]]},
            "output": {"name": "y", "meaning": "the compact network's outputs (logits; standardised regression "
                                               "outputs where target_transform is set)"},
            "storage_in_pyro_sparse": storage,
            "graph_compute": "dense kernels over the kept units"}


def _dynamic_axes(example):
    axes = {0: "batch"}
    if example.dim() == 2 and not example.is_floating_point():  # token ids (batch, time)
        axes[1] = "time"
    return axes


def _write_torchscript(deployed, example, out, metadata):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit.trace's deprecation notice and tracer warnings
        traced = torch.jit.trace(deployed, (example,), check_trace=False)
        torch.jit.save(traced, out, _extra_files={f"{METADATA_KEY}.json": json.dumps(metadata)})


def _write_onnx(deployed, example, out, metadata):
    try:
        import onnx
    except ImportError:
        raise PyroSparseError("--format onnx: needs the 'onnx' package (pip install 'pyro-sparse[onnx]', which "
                              "also installs onnxruntime to check the file)") from None
    axes = _dynamic_axes(example)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript-based exporter's deprecation notice
        torch.onnx.export(deployed, (example,), out, dynamo=False, opset_version=OPSET, input_names=["x"],
                          output_names=["y"], dynamic_axes={"x": axes, "y": {0: "batch", **(
                              {1: "time"} if 1 in axes else {})}})
    model = onnx.load(out)
    entry = model.metadata_props.add()
    entry.key, entry.value = METADATA_KEY, json.dumps(metadata)
    onnx.save(model, out)


def write_graph(module: nn.Module, example: torch.Tensor, path, format: str, transform=None, metadata=None):
    """Write ``module`` (a compact network) behind the input ``transform`` as a ``format`` graph at
    ``path``, traced on the raw ``example`` batch (its layers' plain twins,
    :func:`pyro_sparse.storage.dense_twin`); what :func:`export_graph` writes, without its checks."""
    from .storage import dense_twin

    deployed = DeployedNetwork(dense_twin(module).eval(), transform).eval()
    (_write_torchscript if format == "torchscript" else _write_onnx)(deployed, example, path, metadata or {})


def _check(path, fmt, module, transform, x, tolerance, batch_size=256):
    """``(largest difference between the graph's outputs on raw x and the compact network's, largest
    |output| of the compact network)``; ONNX unchecked (None, None) without onnxruntime."""
    from .data import apply_input_transform

    if fmt == "onnx":
        try:
            import onnxruntime  # noqa: F401
        except ImportError:
            return None, None
    run, _ = load_graph(path, fmt)
    worst = scale = 0.0
    batches = [x[:1]] + [x[start:start + batch_size] for start in range(0, len(x), batch_size)]
    with torch.no_grad():
        for xb in batches:
            ref = module(apply_input_transform(xb, transform) if xb.is_floating_point() else xb)
            try:
                out = run(xb)
            except Exception as e:  # a graph traced with its batch size fixed fails on another one
                raise PyroSparseError(
                    f"export: the {fmt} graph fails on a batch of {len(xb)} ({type(e).__name__}: "
                    f"{str(e).strip().splitlines()[-1][:200]}); the tracer fixes any shape the network's forward "
                    "turns into a Python number (len(x), int(x.shape[0])): write x.shape[0] there") from None
            worst = max(worst, float((out.to(ref.dtype) - ref).abs().max()))
            scale = max(scale, float(ref.abs().max()))
    return worst, scale


def export_graph(source: str, out: str, format: str = "onnx", overwrite: bool = False, data: str | None = None,
                 tolerance: float = 1e-5, method: str | None = None, threshold: float | None = None,
                 sparsity: float | None = None, structured: bool = False, **rule_options) -> dict:
    """Write the compact network of ``source`` (a compact file, or a run directory reduced with
    ``method``/``threshold``/``sparsity``, default its recipe's rule) as a ``format`` graph
    (``torchscript`` or ``onnx``) at ``out``, with the input transform in the graph (see the module
    docstring). Returns ``{"path", "format", "bytes", "checked_on", "max_abs_diff", "metadata"}``;
    ``max_abs_diff`` is None where it could not be checked (ONNX without onnxruntime). ``out`` is
    never replaced without ``overwrite``."""
    if format not in FORMATS:
        raise PyroSparseError(f"--format: expected one of {', '.join(FORMATS)}, got {format!r}")
    if os.path.exists(out) and not (overwrite and os.path.isfile(out)):
        raise PyroSparseError(f"{out}: exists; use --overwrite to replace it" if os.path.isfile(out)
                              else f"{out}: exists and is not a file")
    if not os.path.exists(source):
        raise PyroSparseError(f"{source}: no such run directory or compact file")
    parent = os.path.dirname(os.path.abspath(out))
    if not os.path.isdir(parent):
        raise PyroSparseError(f"--out: {out}: no such directory {parent}")
    if os.path.isdir(source):
        module, info, x_test = _from_run(source, method, threshold, sparsity, structured, **rule_options)
        x = _raw(x_test, info.get("input_transform"))
        checked_on = "the run's test split"
    else:
        if method is not None or threshold is not None or sparsity is not None:
            raise PyroSparseError(f"--method: {source} is a compact file, already reduced; rule options apply to a "
                                  "run directory")
        module, info = _from_compact(source)
        x = _check_inputs(info, data)
        checked_on = data if data is not None else ("its run's test split" if x is not None else None)
        x = _raw(x, info.get("input_transform")) if data is None else x
    if data is not None and os.path.isdir(source):
        x, checked_on = _check_inputs(info, data), data
    example = _example(x, info)
    if x is None:
        x, checked_on = _example(None, info, 64), "64 random inputs (no data found: give --data)"
    metadata = _metadata(info, module, source, format, example)
    tmp = os.path.join(parent, f".{os.path.basename(out)}.tmp-{os.getpid()}")
    try:
        write_graph(module, example, tmp, format, info.get("input_transform"), metadata)
        diff, scale = _check(tmp, format, module.eval(), info.get("input_transform"), x, tolerance)
        if diff is not None and not diff <= tolerance * max(1.0, scale):
            raise PyroSparseError(f"{out}: the exported graph's outputs differ from the compact network's by "
                                  f"{diff:.3g} (> {tolerance:g} x max(1, largest |output| {scale:.3g})) on "
                                  f"{checked_on}; nothing written")
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return {"path": out, "format": format, "bytes": os.path.getsize(out), "checked_on": checked_on,
            "max_abs_diff": diff, "max_abs_output": scale, "examples": len(x), "metadata": metadata}
