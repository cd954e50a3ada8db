r"""Held-out figures of a predictive distribution: the one evaluation routine of the library.

Every figure the library reports -- a run's ``metrics.json``, a reduction report, a sweep, a
run report -- comes from :func:`evaluate`, applied to a *predictive*: a function that maps a
batch of inputs to ``S`` stacked network outputs ``(S, B, ...)``. Two kinds are used, and the
reports name which one a figure is:

* the **posterior predictive** with ``S`` draws (:func:`posterior_predictive`): the outputs of
  ``S`` weight draws from the posterior (SVI: the guide; a Laplace fit: its Gaussian), and
* the **posterior-mean network** (:func:`point_predictive`): one deterministic network at the
  posterior means (``S = 1``), which is what a compact network reproduces.

With outputs :math:`f_s(x_n)`, :math:`s = 1..S`:

* NLL :math:`= -\frac{1}{N}\sum_n \log \frac{1}{S}\sum_s p(y_n \mid f_s(x_n))` (nats per
  example; per character for a language model);
* classification accuracy: the arg-max of the predictive mean
  :math:`\frac{1}{S}\sum_s \mathrm{softmax}(f_s(x_n))` (for binary labels: mean > 1/2);
* regression RMSE of the predictive mean :math:`\frac{1}{S}\sum_s f_s(x_n)`;
* a language model (task ``sequence``) reports accuracy and NLL per character and bits per
  character :math:`\mathrm{BPC} = \mathrm{NLL} / \ln 2` (Graves 2013).
"""

from __future__ import annotations

import math

import torch

__all__ = ["evaluate", "evaluate_outputs", "posterior_predictive", "point_predictive", "prefixed", "quality",
           "WARN_DROP"]

#: a reduced network this far below the dense one (accuracy as a fraction; NLL per example for
#: regression) is reported (:func:`quality`)
WARN_DROP = 0.05


@torch.no_grad()
def evaluate(predict, x, y, likelihood, noise=None, batch_size: int | None = None) -> dict:
    """Figures of the predictive ``predict`` on ``(x, y)``: ``{"accuracy", "nll"}`` for
    classification (``"bpc"`` too for sequences), ``{"rmse", "nll"}`` for regression.

    ``predict(xb)`` returns outputs ``(S, B, ...)``; ``likelihood`` is the network's
    :class:`~pyro_sparse.likelihoods.Likelihood`; ``noise``: the Gaussian likelihood's fitted
    noise scale where it was learned (else the likelihood's own). ``batch_size``: examples per
    call of ``predict`` (default 2048, 256 sequences). ``x`` may also be an iterable of
    ``(x, y)`` batches (a ``DataLoader``; then ``y`` is None): the sums run batch by batch, so
    the data never need to be in memory at once.
    """
    if not torch.is_tensor(x):
        if y is not None:
            raise ValueError("evaluate: give tensors x and y, or an iterable of (x, y) batches and y=None")
        totals = None
        for item in x:
            xb, yb = item[0], item[1]
            device = _device_of(predict)
            if device is not None:
                xb, yb = xb.to(device), yb.to(device)
            part = _sums(predict(xb), yb, likelihood, noise)
            totals = part if totals is None else {k: totals[k] + v for k, v in part.items()}
        if totals is None:
            raise ValueError("evaluate: the held-out data yield no batches")
        return _figures(totals, likelihood)
    if batch_size is None:
        batch_size = 256 if likelihood.task == "sequence" else 2048
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"evaluate: batch_size must be a positive integer, got {batch_size!r}")
    totals = None
    for start in range(0, len(x), batch_size):
        yb = y[start:start + batch_size]
        part = _sums(predict(x[start:start + batch_size]), yb, likelihood, noise)
        totals = part if totals is None else {k: totals[k] + v for k, v in part.items()}
    return _figures(totals, likelihood)


@torch.no_grad()
def evaluate_outputs(outputs, y, likelihood, noise=None) -> dict:
    """:func:`evaluate` of outputs already computed, ``(S, N, ...)`` for all of ``y``."""
    return _figures(_sums(outputs, y, likelihood, noise), likelihood)


def _sums(outputs, y, likelihood, noise):
    """Sums over a batch: negative log predictive, correct predictions or squared error, counts."""
    regression = likelihood.task == "regression"
    log_p = likelihood.log_predictive(outputs, y, noise) if regression else likelihood.log_predictive(outputs, y)
    mean = likelihood.predictive_mean(outputs)
    if regression:
        hits = (mean - y).square().sum().item()
    else:
        pred = (mean > 0.5).long() if likelihood.task == "binary" else mean.argmax(-1)
        hits = (pred == y.long()).sum().item()
    return {"nll": -log_p.sum().item(), "hits": hits, "examples": len(y), "units": y.numel()}


def _figures(t, likelihood) -> dict:
    if likelihood.task == "regression":
        return {"rmse": math.sqrt(t["hits"] / t["units"]), "nll": t["nll"] / t["examples"]}
    if likelihood.task == "sequence":  # per character: the log-likelihood of a sequence sums its T positions
        nll = t["nll"] / t["units"]
        return {"accuracy": t["hits"] / t["units"], "nll": nll, "bpc": nll / math.log(2)}
    return {"accuracy": t["hits"] / t["units"], "nll": t["nll"] / t["examples"]}


def _device_of(predict):
    """The device a predictive's network lives on (batches from a loader are moved there)."""
    return getattr(predict, "device", None)


class _Predictive:
    def __init__(self, fn, module):
        self.fn = fn
        tensors = []
        if isinstance(module, torch.nn.Module):
            tensors = [t for t in (next(module.parameters(), None), next(module.buffers(), None)) if t is not None]
        self.device = tensors[0].device if tensors else None

    def __call__(self, xb):
        return self.fn(xb)


def posterior_predictive(network, guide, num_samples: int):
    """The posterior predictive of a guide: ``xb -> network.sample_outputs(xb, guide, S)``."""
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"evaluate: num_samples must be a positive integer, got {num_samples!r}")
    return _Predictive(lambda xb: network.sample_outputs(xb, guide, num_samples), network)


def point_predictive(module):
    """A deterministic network as a predictive with one draw: ``xb -> module(xb)[None]``."""
    module.eval()
    return _Predictive(lambda xb: module(xb).unsqueeze(0), module)


def prefixed(figures: dict, prefix: str = "test_") -> dict:
    """``{"accuracy": a}`` -> ``{"test_accuracy": a}``."""
    return {prefix + k: v for k, v in figures.items()}


def quality(dense: dict, reduced: dict, max_drop=None, advice: str = "") -> dict:
    """How far a reduced network falls below the dense one on held-out figures (:func:`evaluate`'s):
    ``{"metric", "dense", "reduced", "drop", "warning"}``, ``drop`` in accuracy (classification) or
    the NLL increase per example (regression); ``warning`` a sentence where the drop exceeds
    :data:`WARN_DROP` (``advice`` appended), else None. A drop above ``max_drop`` raises
    :class:`~pyro_sparse.errors.QualityError` (the command line exits 3)."""
    from .errors import QualityError

    if "accuracy" in dense:
        metric, d, r = "test_accuracy", dense["accuracy"], reduced["accuracy"]
        drop = d - r
        said = f"test accuracy {r:.4f} against {d:.4f} for the dense network ({100 * drop:.1f} points lower)"
    else:
        metric, d, r = "test_nll", dense["nll"], reduced["nll"]
        drop = r - d
        said = f"test NLL {r:.4f} against {d:.4f} for the dense network (+{drop:.4f} per example)"
    if max_drop is not None and drop > max_drop:
        raise QualityError(f"--max-drop {max_drop:g}: the reduced network's {said}; nothing was written")
    warning = f"the reduced network lost quality: {said}{advice}" if drop > WARN_DROP else None
    return {"metric": metric, "dense": d, "reduced": r, "drop": drop, "warning": warning}


class evaluation_mode:
    """Within the block ``module`` (any ``torch.nn.Module``, or None: nothing) is in ``eval`` mode:
    dropout is the identity and a batch norm uses (and does not update) its running statistics,
    as in the deterministic twin. Predictions, the guide's prototype run and the trainer's
    reference loss run so; the previous mode of every submodule is restored afterwards.

    Training mode is the other one: :class:`~pyro_sparse.fitting.SVITrainer` fits with the network
    in training mode (dropout on, batch norms on batch statistics, updating the running ones), as
    the user's module would train."""

    def __init__(self, module):
        self.module = module

    def __enter__(self):
        if self.module is None:
            return self
        self.modes = [m.training for m in self.module.modules()]
        self.module.eval()
        return self

    def __exit__(self, *exc):
        if self.module is None:
            return False
        for m, mode in zip(self.module.modules(), self.modes):
            m.training = mode
        return False
