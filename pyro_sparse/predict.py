r"""Predictions on new data: what ``pyro-sparse predict`` does.

From a **run directory**: the posterior predictive with ``S`` draws (the run's guide; a Laplace
fit's Gaussian posterior), :math:`\bar p(y \mid x) = \frac1S\sum_s p(y \mid f_s(x))`. From a
**compact file** (``reduce``'s ``compact-*.pt``): the deterministic compact network, one draw.
From an **exported graph** (``pyro-sparse export``: TorchScript, or ONNX with onnxruntime): the
same network as a graph, its metadata in place of the compact file's ``info``; the graph applies
the input transform itself.

Either way the inputs are raw data as the run was given them: the transform the run's inputs
went through (``data: {inputs: center}``; :func:`~pyro_sparse.data.transform_inputs`) is applied
first -- a run keeps it in its data set, a compact file in its ``info`` -- so a network fitted on
centred inputs sees centred inputs. Outputs:

* classification: the predictive class probabilities ``prob_<k>`` and the arg-max
  ``predicted`` (binary labels: ``prob_1``, ``predicted`` = ``prob_1 > 1/2``);
* regression: the predictive mean and standard deviation per target, in the data's units:
  with draws :math:`\mu_s = m + s_y f_s(x)` (standardised targets map back through the
  likelihood's target transform, :math:`m`, :math:`s_y`) the mean is :math:`\bar\mu` and the
  standard deviation :math:`\sqrt{\mathrm{Var}_s(\mu_s) + (s_y \sigma)^2}`, the law of total
  variance of the Gaussian mixture.

Where the file has labels the held-out figures (:func:`pyro_sparse.evaluation.evaluate`) are
returned too.
"""

from __future__ import annotations

import csv
import io
import math
import os

import torch
from torch import nn

from . import evaluation
from .data import apply_input_transform, load_inputs
from .errors import DataError, PyroSparseError
from .likelihoods import build_likelihood

__all__ = ["predict", "predictions_table", "write_predictions"]


def _is_run(path) -> bool:
    return os.path.isdir(path)


def predict(source: str, data: str, num_samples: int = 100, seed: int = 0, target: str | None = None,
            batch_size: int = 2048) -> dict:
    """Predict ``data`` (a ``.npz`` or ``.csv`` file; labels optional) with a run directory or a
    compact file. Returns ``{"columns": [...], "rows": tensor (N, C), "figures": {...} or None,
    "source": "run" | "compact", "samples": S}``."""
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
        raise PyroSparseError(f"--samples: must be a positive integer, got {num_samples!r}")
    if not os.path.exists(source):
        raise PyroSparseError(f"{source}: no such run directory or compact file")
    torch.manual_seed(seed)
    from .graphs import graph_kind

    if _is_run(source):
        outputs_of, likelihood, noise, shape, transform, kind, samples = _from_run(source, num_samples)
    elif graph_kind(source) is not None:
        outputs_of, likelihood, noise, shape, transform, kind, samples = _from_graph(source)
    else:
        outputs_of, likelihood, noise, shape, transform, kind, samples = _from_compact(source)
    labels = "regression" if likelihood.task == "regression" else "classification"
    x, y = load_inputs(data, target, shape, labels)
    x = apply_input_transform(x, transform)
    network = getattr(outputs_of, "network", None)  # an exported graph cannot be inspected
    check_tokens(x, vocabulary(network) if network is not None else None, data)
    outs = []
    with torch.no_grad():
        for start in range(0, len(x), batch_size):
            outs.append(outputs_of(x[start:start + batch_size]))
    outputs = torch.cat(outs, 1)  # (S, N, ...)
    columns, rows = predictions_table(outputs, likelihood, noise)
    figures = None
    if y is not None:
        classes = outputs.shape[-1] if likelihood.task != "binary" else 2
        if likelihood.task != "regression" and int(y.max()) >= classes:
            raise DataError(f"{data}: labels up to {int(y.max())} but the network predicts {classes} classes")
        figures = evaluation.evaluate_outputs(outputs, y, likelihood, noise)
        rows = torch.cat([rows, y.reshape(len(y), -1).to(rows.dtype)], 1)
        columns = columns + (["label"] if likelihood.task != "regression" else
                             [f"target_{j}" if y.reshape(len(y), -1).shape[1] > 1 else "target"
                              for j in range(y.reshape(len(y), -1).shape[1])])
    return {"columns": columns, "rows": rows, "figures": figures, "source": kind, "samples": samples,
            "examples": len(x)}


def _from_run(directory, num_samples):
    from .guides import DeltaGuide
    from .runs import load_run

    run = load_run(directory)
    network = run.network
    samples = 1 if isinstance(run.guide, DeltaGuide) and run.recipe["method"] != "laplace" else num_samples
    lik = network.likelihood
    noise = None
    if getattr(lik, "learn_noise", False):
        noise = run.guide.median().get("likelihood.noise")
    predictive = run.trainer.predictive(samples, torch.Generator().manual_seed(0))  # a Laplace fit: linearised

    def outputs_of(xb):
        return predictive(xb)

    outputs_of.network = network
    transform = run.dataset.extras.get("input_transform")
    return outputs_of, lik, noise, run.dataset.feature_shape, transform, "run", samples


def _likelihood(path, info, what):
    if not info.get("likelihood"):
        raise PyroSparseError(f"{path}: the {what} records no likelihood (reduce the run again to rebuild it)")
    lik = build_likelihood(info["likelihood"])
    if hasattr(lik, "set_target_transform"):
        lik.set_target_transform(info.get("target_transform"))
    noise = torch.tensor([info["noise"]]) if info.get("noise") is not None else None
    return lik, noise


def _from_compact(path):
    from .reduced_runs import load_compact

    module = load_compact(path)
    info = getattr(module, "info", {}) or {}
    lik, noise = _likelihood(path, info, "compact file")
    shape = info.get("feature_shape")

    def outputs_of(xb):
        return module(xb).unsqueeze(0)

    outputs_of.network = module
    return outputs_of, lik, noise, tuple(shape) if shape else None, info.get("input_transform"), "compact", 1


def vocabulary(module) -> int | None:
    """The number of token ids a network reads where its first module reading the input is a
    token table (an embedding or a one-hot encoding: its ``num_tokens`` / ``num_embeddings``),
    else None."""
    from .recurrent import Embedding, OneHot, _OneHotModule

    for m in module.modules():
        if isinstance(m, nn.Embedding):
            return m.num_embeddings
        if isinstance(m, Embedding):
            return m.num_tokens
        if isinstance(m, (_OneHotModule, OneHot)):
            return m.num_tokens if isinstance(m, _OneHotModule) else m.options["num_tokens"]
    return None


def check_tokens(x, vocab, data):
    """DataError naming the first input that is not a token id of a network with ``vocab`` tokens
    (a whole number in 0..vocab-1), its row and position; nothing for ``vocab`` None."""
    if vocab is None:
        return
    bad = (x != x.round()) | (x < 0) | (x >= vocab)
    if bool(bad.any()):
        where = bad.reshape(len(x), -1).nonzero()[0].tolist()
        value = x.reshape(len(x), -1)[where[0], where[1]].item()
        raise DataError(f"{data}: token {value:g} at row {where[0]}, position {where[1]} is not in the network's "
                        f"vocabulary (token ids 0..{vocab - 1}); {int(bad.sum())} input(s) like it")


def _from_graph(path):
    from .graphs import load_graph

    run, info = load_graph(path)
    lik, noise = _likelihood(path, info, "graph's metadata")
    shape = info.get("feature_shape")
    dtype = getattr(torch, (info.get("input") or {}).get("dtype", "float32"), torch.float32)

    def outputs_of(xb):
        return run(xb.to(dtype)).unsqueeze(0)

    # the graph applies the input transform itself: the raw inputs go in as they are
    return outputs_of, lik, noise, tuple(shape) if shape else None, None, "graph", 1


def predictions_table(outputs, likelihood, noise=None):
    """``(columns, rows (N, C))`` of stacked outputs ``(S, N, ...)`` (see the module docstring)."""
    task = likelihood.task
    if task == "regression":
        affine = likelihood._affine(outputs) if hasattr(likelihood, "_affine") else None
        mu = outputs if affine is None else affine[0] + affine[1] * outputs
        mean = mu.mean(0)
        spread = mu.var(0, unbiased=False) if mu.shape[0] > 1 else torch.zeros_like(mean)
        sigma = torch.as_tensor(likelihood.noise if noise is None else noise, dtype=mean.dtype).reshape(-1)
        if affine is not None:
            sigma = sigma * affine[1]
        sd = (spread + sigma.square()).sqrt()
        k = mean.shape[-1]
        names = ["mean", "sd"] if k == 1 else [n for j in range(k) for n in (f"mean_{j}", f"sd_{j}")]
        rows = torch.stack([mean, sd], -1).reshape(len(mean), -1)
        return names, rows
    if task == "binary":
        p1 = torch.sigmoid(outputs.squeeze(-1)).mean(0)
        return ["predicted", "prob_1"], torch.stack([(p1 > 0.5).to(p1.dtype), p1], 1)
    if task == "sequence":
        raise PyroSparseError("predict: sequence models (language models) are not supported; it writes one row "
                              "per example")
    probs = torch.softmax(outputs, -1).mean(0)
    return ["predicted"] + [f"prob_{k}" for k in range(probs.shape[-1])], \
        torch.cat([probs.argmax(-1, keepdim=True).to(probs.dtype), probs], 1)


def write_predictions(result: dict, path: str, overwrite: bool = False):
    """Write the table of :func:`predict`: a ``.npz`` path gets one array per column (``predicted``
    as integers), any other path CSV. A file is replaced only with ``overwrite``."""
    if os.path.exists(path) and not (overwrite and os.path.isfile(path)):
        raise PyroSparseError(f"{path}: exists; use --overwrite to replace it" if os.path.isfile(path)
                              else f"{path}: exists and is not a file")
    from .checkpoint import _atomic_write, write_text_atomic

    integral = {"predicted", "label"}
    if path.lower().endswith(".npz"):
        import numpy as np

        rows = result["rows"].detach().cpu().numpy()
        arrays = {c: rows[:, j].astype(np.int64) if c in integral else rows[:, j]
                  for j, c in enumerate(result["columns"])}
        _atomic_write(path, lambda f: np.savez(f, **arrays))
        return
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(result["columns"])
    for row in result["rows"].tolist():
        writer.writerow([str(int(v)) if c in integral and math.isfinite(v) else f"{v:.6g}"
                         for c, v in zip(result["columns"], row)])
    write_text_atomic(path, buf.getvalue())
