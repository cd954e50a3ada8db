r"""Prune a trained network post hoc: a Laplace posterior around its weights, any reduction rule,
an optional brief masked fine-tune, the pruned module of the user's own class.

:func:`prune` takes a trained deterministic ``torch.nn.Module`` (any class: residual
connections, branches, its own ``forward``; a bare ``nn.Linear``) and data, and

1. fits a **Laplace approximation** around the trained weights :math:`\theta` without retraining
   them (MacKay 1992; Daxberger et al. 2021, "Laplace Redux";
   :func:`~pyro_sparse.laplace.posterior.laplace_posterior`): a curvature :math:`H` of the negative
   log-likelihood on the data -- the diagonal GGN, Kronecker factors (KFAC) or exact row blocks
   (:mod:`pyro_sparse.laplace.curvature`) -- and a Gaussian prior
   :math:`N(0, \mathrm{diag}(\delta)^{-1})` whose precisions maximise the Laplace marginal
   likelihood at :math:`\theta` (Immer et al. 2021)

   .. math::

       \log p(D \mid \delta) \approx \log p(D \mid \theta)
          - \tfrac12\big[\log\det(H + P_0) - \log\det P_0 + \theta^\top P_0 \theta\big],
       \qquad P_0 = \mathrm{diag}(\delta);

2. summarises the posterior as a :class:`~pyro_sparse.summary.PosteriorSummary`, named like the
   module's parameters, with each layer's Kronecker factors or row blocks where the curvature has
   them;
3. applies any rule of the one registry (:func:`~pyro_sparse.reduction.rules.reduce`): Bayesian
   model reduction and Savage-Dickey -- on a structured posterior removing weights by the
   evidence and moving the kept ones to the reduced posterior mean
   (:mod:`pyro_sparse.reduction.compensate`), layer by layer on the pruned network's own inputs --,
   Optimal Posterior Damage :math:`s_i = P_{ii}\theta_i^2` (Dhahri et al. 2024), magnitude, ...;
4. optionally fine-tunes the kept weights for a few epochs (the pruned ones stay exactly 0;
   :func:`~pyro_sparse.finetune.masked_fine_tune`), and
5. returns the pruned module, a copy of the user's module of its own class whose ``state_dict``
   loads into a fresh instance (:class:`PrunedModel`; ``prune_masks=True`` adds
   ``torch.nn.utils.prune`` masks so that further training keeps the pruned weights at 0).

The Laplace approximation covers the trainable layers whose Bayesian counterpart declares a
curvature (Linear, Conv1d, Conv2d); every other parameter (a batch norm, an embedding, a
recurrent layer, the modules named in ``exclude``) is held fixed and not pruned. Data: tensors
``(x, y)`` or any iterable of ``(x, y)`` batches (a ``DataLoader``), streamed batch by batch.
"""

from __future__ import annotations

import os
import sys
import time
import warnings
from dataclasses import dataclass, field

import torch
from torch import nn

from . import evaluation
from .convert import BayesianModule
from .errors import PyroSparseWarning
from .finetune import masked_fine_tune
from .laplace.posterior import laplace_posterior
from .rebuild import add_prune_masks, compact, export
from .reduction.rules import reduce
from .summary import PosteriorSummary

__all__ = ["prune", "PrunedModel"]


def _peak_mb(reset=False):
    """The process's peak resident memory in MB since the last reset (Linux: ``VmHWM``, which
    ``reset`` sets back to the current size; elsewhere the peak since the start)."""
    try:
        if reset:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM")) / 1024
    except (OSError, StopIteration, ValueError):
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@dataclass
class PrunedModel:
    """What :func:`prune` returns.

    ``module``: the pruned network, a copy of the user's module (its own class; pruned weights
    exactly 0). ``network``: the :class:`~pyro_sparse.convert.BayesianModule` naming the sites;
    ``summary``: the Laplace posterior; ``decision``: the rule's
    :class:`~pyro_sparse.reduction.rules.Decision`; ``posterior``: the
    :class:`~pyro_sparse.laplace.posterior.LaplacePosterior`; ``info``: marginal likelihood,
    precisions, ``sparsity`` (fraction of covered weights that are 0) and seconds per stage."""

    module: nn.Module
    network: BayesianModule
    summary: PosteriorSummary
    decision: object
    info: dict = field(default_factory=dict)
    posterior: object = None

    def values(self) -> dict:
        """Site -> the pruned module's parameter (after any fine-tune)."""
        sites = self.network.param_sites()
        return {k: p.detach() for k, p in self.module.named_parameters() if k in sites}

    def compact(self):
        """The physically smaller module where the structure allows (the unit chains of
        :func:`~pyro_sparse.rebuild.compact`), of the user's class."""
        return compact(self.network, self.values(), self.decision)


def prune(module: nn.Module, x, y: torch.Tensor | None = None, rule: str = "opd", sparsity: float | None = None,
          threshold: float | None = None, structured: bool = False, likelihood: str = "categorical",
          noise: float = 1.0, curvature: str = "diag", structure: str = "scalar", prior_precision: float = 1.0,
          hyper_steps: int = 200, hyper_lr: float = 0.1, fine_tune_epochs: int = 0, lr: float = 1e-3,
          batch_size: int = 64, seed: int = 0, exclude=(), prune_masks: bool = False, input_shape=None,
          curvature_batch_size: int | None = None, mc_samples: int | str | None = "auto", validation=None,
          max_drop: float | None = None, verbose: bool | None = None, **rule_options) -> PrunedModel:
    """Prune a trained ``module`` post hoc (see the module docstring): Laplace posterior
    (:func:`~pyro_sparse.laplace.posterior.laplace_posterior`: ``curvature``, ``structure``,
    ``prior_precision``, ``hyper_steps``, ``mc_samples``, ``curvature_batch_size``), the rule
    ``rule`` at ``sparsity`` (or ``threshold``; ``structured`` for whole units; further options of
    :func:`~pyro_sparse.reduction.rules.reduce` as keywords), an optional masked fine-tune of
    ``fine_tune_epochs`` epochs (Adam at ``lr``, batches of ``batch_size``, under the fitted
    Gaussian prior), and the pruned module of the user's class. ``module`` is not changed.

    ``validation``: held-out data (tensors ``(x, y)`` or a ``DataLoader``): the pruned module is
    scored against the dense one there (``info["quality"]``, :func:`~pyro_sparse.evaluation.quality`)
    and a fall of more than 5 points (NLL 0.05 for regression) is warned about; with ``max_drop`` a
    larger fall raises :class:`~pyro_sparse.errors.QualityError`.

    ``info`` records the seconds of each stage (``curvature_seconds``, ``marglik_seconds``,
    ``rule_seconds``, ``fine_tune_seconds``, ``seconds``) and the peak resident memory in MB (``peak_mb``;
    ``laplace_peak_mb`` up to the fitted posterior); with ``verbose`` (default: unless
    ``PYRO_SPARSE_NO_PROGRESS`` is set) one line on stderr says them.
    """
    if verbose is None:
        verbose = not os.environ.get("PYRO_SPARSE_NO_PROGRESS")
    started = time.perf_counter()
    _peak_mb(reset=True)
    posterior = laplace_posterior(module, x, y, likelihood, noise, curvature, structure, prior_precision, hyper_steps,
                                  hyper_lr, exclude, input_shape, curvature_batch_size, mc_samples, seed)
    network, summary, info = posterior.network, posterior.summary(), dict(posterior.info)
    info["laplace_peak_mb"] = _peak_mb()
    start = time.perf_counter()
    rule_options.setdefault("calibration", posterior.calibration(x))  # layer by layer, where compensating
    decision = reduce(summary, rule, sparsity=sparsity, threshold=threshold, structured=structured, seed=seed,
                      **rule_options)
    info["rule_seconds"] = time.perf_counter() - start
    info["peak_mb"] = _peak_mb()
    pruned = export(network, summary, decision)
    start = time.perf_counter()
    if fine_tune_epochs:
        sites = network.param_sites()
        frozen = [p for name, p in pruned.named_parameters() if name not in sites and p.requires_grad]
        for p in frozen:
            p.requires_grad_(False)
        generator = torch.Generator().manual_seed(seed)
        masked_fine_tune(pruned, decision.masks, x, y, posterior.likelihood, posterior.prior, fine_tune_epochs,
                         batch_size, lr, generator)
        for p in frozen:
            p.requires_grad_(True)
    info["fine_tune_seconds"] = time.perf_counter() - start
    pruned.eval()
    kept, total = 0, 0
    for name, p in pruned.named_parameters():
        if name in decision.masks and name.rsplit(".", 1)[-1] == "weight":
            kept += int((p != 0).sum())
            total += p.numel()
    info.update({"rule": decision.method, "sparsity": 1.0 - kept / max(total, 1), "weights_total": total,
                 "weights_kept": kept, "seconds": time.perf_counter() - started})
    if verbose:
        print(f"prune: {info['seconds']:.1f} s (curvature {info['curvature_seconds']:.1f} s, prior precision "
              f"{info['marglik_seconds']:.1f} s, {decision.method} {info['rule_seconds']:.1f} s"
              + (f", fine-tune {info['fine_tune_seconds']:.1f} s" if fine_tune_epochs else "")
              + f"); peak memory {info['peak_mb']:.0f} MB; {100 * info['sparsity']:.1f}% of {total} weights removed",
              file=sys.stderr)
    if validation is not None:
        x_val, y_val = validation if isinstance(validation, (tuple, list)) else (validation, None)
        lik = posterior.likelihood
        dense = evaluation.evaluate(evaluation.point_predictive(posterior.model), x_val, y_val, lik)
        reduced = evaluation.evaluate(evaluation.point_predictive(pruned), x_val, y_val, lik)
        info["quality"] = evaluation.quality(dense, reduced, max_drop)
        if info["quality"]["warning"]:
            warnings.warn(info["quality"]["warning"], PyroSparseWarning, stacklevel=2)
    if prune_masks:
        add_prune_masks(pruned, decision.masks)
    return PrunedModel(pruned, network, summary, decision, info, posterior)
