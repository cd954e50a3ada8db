"""SpaM: online Laplace marginal-likelihood training, and its Laplace posterior summary.

Dhahri, Immer, Charpentier, Günnemann, Fortuin (2024), "Shaving Weights with Occam's Razor:
Bayesian Sparsification for Neural Networks Using the Marginal Likelihood" (SpaM), built on the
online model selection of Immer, Bauer, Fortuin, Rätsch, Khan (2021), "Scalable Marginal
Likelihood Estimation for Model Selection in Deep Learning" (their Algorithm 1).

**Training.** The weights ``theta`` of the network's deterministic twin
(:meth:`~pyro_sparse.network.BayesianNetwork.deterministic`, parameters named like the sample
sites, ``fc1.weight``) follow the MAP objective under a Gaussian prior ``N(0, diag(delta)^-1)``; on a
mini-batch ``B`` out of ``N`` training points

    ``loss(theta) = -(N / |B|) sum_{n in B} log p(y_n | f(x_n; theta)) - log N(theta; 0, diag(delta)^-1)``.

Every ``F`` epochs after a burn-in of ``E0`` epochs the Laplace approximation at the current
``theta`` is fitted -- a curvature ``H`` of the negative log-likelihood on the training data
(diagonal GGN, diagonal empirical Fisher, or KFAC; :mod:`pyro_sparse.curvature`) -- and ``K``
Adam steps on ``log delta`` raise the Laplace log marginal likelihood

    ``log p(D | delta) ~= log p(D | theta) - 0.5 [log det(H + P0) - log det P0 + theta' P0 theta]``,
    ``P0 = diag(delta)``

(:func:`pyro_sparse.laplace.log_marglik_diag`, :func:`~pyro_sparse.laplace.log_marglik_kfac`),
with ``H`` held fixed during the ``K`` steps. With parameter-wise or unit-wise precisions
(:func:`~pyro_sparse.laplace.make_prior_precision`) this is an automatic Occam's razor: the
evidence raises ``delta_i`` for weights the data do not determine, and the MAP steps then shrink
them towards 0. The spec's own priors are replaced by this learned Gaussian prior.

**Data-parallel.** Inside a ``torch.distributed`` process group (``torchrun``) the MAP steps run
like :class:`~pyro_sparse.fitting.SVITrainer`'s (each rank's shard of the epoch's permutation,
``batch_size`` the global batch, gradients averaged over the ranks), and the marglik step's
statistics -- the curvature and ``log p(D | theta)``, sums over the data -- are computed on a
partition of the rows and added with one all-reduce (:func:`laplace_statistics`); every rank
then takes the same steps on ``log delta``. Only rank 0 evaluates and writes.

**Posterior summary and pruning.** The fitted posterior ``N(theta, diag(H + delta)^-1)`` is
summarised like any other fit (``trainer.posterior_summary()`` -> :func:`laplace_summary`, a
:class:`~pyro_sparse.summary.PosteriorSummary` with the same site names as SVI), so every rule of
:mod:`pyro_sparse.reduction.rules` runs on it unchanged -- Optimal Posterior Damage
``s_i = P_ii theta_i^2`` (unstructured, or summed over a unit's row and bias when structured),
BMR, Savage-Dickey, magnitude. A short masked fine-tune (:func:`masked_fine_tune`) can follow;
masked weights stay exactly zero.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass

import torch
from torch import nn

from . import distributed, evaluation
from .curvature import LIKELIHOODS, check_supported, diag_ef, diag_ggn, kfac_ggn, log_likelihood
from .distributions import log_alpha
from .errors import SpecError
from .fitting import SVITrainer
from .guides import DeltaGuide, GaussianPosterior, _key
from .laplace import PRIOR_STRUCTURES, kfac_eig, log_marglik_diag, log_marglik_kfac, make_prior_precision
from .recipe import make_optimizer, make_scheduler
from .schema import Field, validate
from .summary import PosteriorSummary, SiteSummary

__all__ = [
    "LAPLACE_FIELDS",
    "LaplaceTrainer",
    "laplace_curvature",
    "laplace_log_marglik",
    "laplace_statistics",
    "optimize_prior_precision",
    "laplace_summary",
    "summary_from_curvature",
    "apply_masks",
    "masked_fine_tune",
]

CURVATURES = ("diag", "kfac")
HESSIANS = ("ggn", "ef")

#: options of the ``laplace:`` section of an inference recipe (``method: laplace``)
LAPLACE_FIELDS = {
    "structure": Field("choice", "parameterwise", choices=PRIOR_STRUCTURES,
                       doc="prior precision structure: scalar | layerwise | parameterwise | unitwise"),
    "curvature": Field("choice", "diag", choices=CURVATURES, doc="diag | kfac Hessian approximation"),
    "hessian": Field("choice", "ggn", choices=HESSIANS, doc="ggn (generalised Gauss-Newton) | ef (empirical Fisher)"),
    "prior_precision": Field("float", 1.0, positive=True, doc="initial (and, with hyper_steps 0, fixed) delta"),
    "burn_in": Field("int", 10, nonneg=True, doc="epochs of MAP training before the first marglik step"),
    "marglik_frequency": Field("int", 5, positive=True, doc="F: a marglik step every F epochs after burn_in"),
    "hyper_steps": Field("int", 50, nonneg=True, doc="K: Adam steps on log delta per marglik step (0: plain MAP)"),
    "hyper_lr": Field("float", 0.1, positive=True, doc="Adam learning rate of log delta"),
    "curvature_subset": Field("int", None, positive=True, allow_none=True,
                              doc="fit the curvature on this many random training points, scaled by N/m"),
    "mc_samples": Field("int", None, positive=True, allow_none=True,
                        doc="Monte Carlo GGN with this many sampled targets per input (null: exact)"),
    "curvature_batch_size": Field("int", None, positive=True, allow_none=True,
                                  doc="chunk size for the curvature pass (memory); null: all at once"),
}


def _check_options(options, source=None):
    if options["curvature"] == "kfac" and options["hessian"] != "ggn":
        raise SpecError("the KFAC curvature is a GGN; use hessian: ggn or curvature: diag", source,
                        "laplace.hessian")
    if options["mc_samples"] is not None and (options["curvature"], options["hessian"]) != ("diag", "ggn"):
        raise SpecError("mc_samples applies to the diagonal GGN only; use curvature: diag, hessian: ggn "
                        "or mc_samples: null", source, "laplace.mc_samples")
    return options


@dataclass(frozen=True)
class _LaplaceSection(Field):
    """The recipe's ``laplace:`` section, validated against :data:`LAPLACE_FIELDS` when the recipe
    is parsed (errors name ``laplace.<key>`` and the file)."""

    def check(self, value, path, source):
        return _check_options(validate(LAPLACE_FIELDS, {} if value is None else value, path, source), source)


LAPLACE_SECTION = _LaplaceSection("dict", validate(LAPLACE_FIELDS, {}), allow_none=True,
                                  doc="options of method laplace (SpaM)")


# --------------------------------------------------------------------------- networks and data


def _likelihood_of(network, source=None):
    """(curvature likelihood name, Gaussian noise std) of a network's likelihood."""
    lik = network.likelihood
    name = getattr(lik, "spec_name", None)
    if name not in LIKELIHOODS:
        raise SpecError(f"method laplace supports the likelihoods {LIKELIHOODS}, got {name!r}", source, "likelihood")
    if name == "gaussian":
        if lik.learn_noise:
            raise SpecError("method laplace needs a fixed Gaussian noise; set learn_noise: false", source,
                            "likelihood.learn_noise")
        return name, float(lik.noise)
    return name, 1.0


# --------------------------------------------------------------------------- the marginal likelihood


def laplace_curvature(model, x, y, likelihood, noise=1.0, curvature="diag", hessian="ggn", subset=None,
                      mc_samples=None, batch_size=None, generator=None):
    """The curvature ``H`` of ``-log p(D | theta)`` for the Laplace approximation, summed over the data.

    ``curvature="diag"`` with ``hessian="ggn"``: :func:`~pyro_sparse.curvature.diag_ggn` (exact,
    or Monte Carlo with ``mc_samples`` sampled targets); ``hessian="ef"``: the empirical Fisher
    :func:`~pyro_sparse.curvature.diag_ef`; ``curvature="kfac"``: the Kronecker factors
    :func:`~pyro_sparse.curvature.kfac_ggn` (layer -> ``(A, G)``).

    With ``subset = m < N`` the curvature is fitted on ``m`` training points drawn without
    replacement (``generator``) and multiplied by ``N / m`` -- an unbiased estimate of the sum
    over all ``N`` (for KFAC the count-carrying factor ``A`` is scaled). This trades noise in
    ``H`` for a marglik step ``N / m`` times cheaper.

    Returns dict name -> tensor (diagonal) or layer -> ``(A, G)`` (KFAC).
    """
    if curvature not in CURVATURES:
        raise ValueError(f"curvature must be one of {CURVATURES}, got curvature={curvature!r}")
    if hessian not in HESSIANS:
        raise ValueError(f"hessian must be one of {HESSIANS}, got hessian={hessian!r}")
    n = x.shape[0]
    scale = 1.0
    if subset is not None and subset < n:
        idx = torch.randperm(n, generator=generator)[:subset].to(x.device)
        x, y = x[idx], y[idx]
        scale = n / subset
    if curvature == "kfac":
        if hessian != "ggn":
            raise ValueError(f"the KFAC curvature is a GGN; got hessian={hessian!r}")
        kfac = kfac_ggn(model, x, y, likelihood, noise, batch_size=batch_size)
        return {name: (a * scale, g) for name, (a, g) in kfac.items()}
    if hessian == "ef":
        diag = diag_ef(model, x, y, likelihood, noise, batch_size=batch_size)
    else:
        diag = diag_ggn(model, x, y, likelihood, noise, mc_samples=mc_samples, batch_size=batch_size,
                        generator=generator)
    return {name: h * scale for name, h in diag.items()} if scale != 1.0 else diag


def laplace_statistics(model, x, y, likelihood, noise=1.0, curvature="diag", hessian="ggn", rows=None,
                       mc_samples=None, batch_size=None, generator=None):
    """The data statistics of one marglik step: the curvature ``H`` of :func:`laplace_curvature`
    and the log-likelihood ``log p(D | theta) = sum_{n=1}^N log p(y_n | f(x_n; theta))`` at the
    current weights, both sums over the data -- data-parallel inside a process group.

    ``rows`` (an index tensor of ``m`` training rows, or None for all ``N``) is the curvature
    subset, the same on every rank; ``H`` is fitted on it and multiplied by ``N / m`` as in
    :func:`laplace_curvature`. The log-likelihood always runs over all ``N`` rows.

    With ``W`` ranks each rank takes the strided part ``r::W`` of the curvature rows and of the
    training rows (:func:`~pyro_sparse.distributed.shard` without padding: a partition) and
    computes its partial sums; one :func:`~pyro_sparse.distributed.all_reduce_sum` adds them, so
    every rank holds the statistics of the whole set. Diagonal curvatures and ``log p(D | theta)``
    are plain sums. Of the KFAC factors ``A = sum_{n,l} a~ a~'`` carries the count and adds up,
    while ``G = 1/(N L) sum_{n,l,k} g g'`` is a mean: rank ``r`` with ``m_r`` of the ``m`` rows
    contributes ``(m_r / m) G_r``, so the sum is the mean over all ``m`` rows (``L``, the positions
    per example, is the same on every rank). ``generator`` drives the Monte Carlo GGN draws
    (``mc_samples``); under a process group give each rank its own.

    Returns ``(curvature, log_lik)``: dict as :func:`laplace_curvature`, and a 0-d tensor.
    """
    n = x.shape[0]
    world = distributed.world_size()
    scale = 1.0
    if rows is not None:
        rows = torch.as_tensor(rows, device=x.device)
        scale = n / len(rows)
    m = n if rows is None else len(rows)
    if world > 1:
        if m < world:
            raise ValueError(f"the curvature needs at least one row per rank: {m} rows for {world} ranks")
        rows = distributed.shard(torch.arange(n, device=x.device) if rows is None else rows, pad=False)
        x_ll, y_ll = x[distributed.rank()::world], y[distributed.rank()::world]
    else:
        x_ll, y_ll = x, y
    x_h, y_h = (x, y) if rows is None else (x[rows], y[rows])
    curv = laplace_curvature(model, x_h, y_h, likelihood, noise, curvature, hessian, None, mc_samples,
                             batch_size, generator)
    with torch.no_grad():
        log_lik = log_likelihood(model, x_ll, y_ll, likelihood, noise)
    if world > 1:
        names = list(curv)
        if curvature == "kfac":
            weight = len(rows) / m  # this rank's share of the rows over which G is a mean
            parts = [t for name in names for t in (curv[name][0], curv[name][1] * weight)]
        else:
            parts = [curv[name] for name in names]
        parts = distributed.all_reduce_sum([t.contiguous() for t in parts] + [log_lik.reshape(1)])
        log_lik = parts.pop().reshape(())
        if curvature == "kfac":
            curv = {name: (parts[2 * i], parts[2 * i + 1]) for i, name in enumerate(names)}
        else:
            curv = dict(zip(names, parts))
    if scale != 1.0:
        if curvature == "kfac":
            curv = {name: (a * scale, g) for name, (a, g) in curv.items()}
        else:
            curv = {name: h * scale for name, h in curv.items()}
    return curv, log_lik


def laplace_log_marglik(log_lik, theta, curv, prior, curvature="diag"):
    """Laplace log marginal likelihood ``log p(D | delta)`` for a curvature from
    :func:`laplace_curvature` (differentiable in the prior's ``log delta``)."""
    if curvature == "kfac":
        return log_marglik_kfac(log_lik, theta, curv, prior)
    return log_marglik_diag(log_lik, theta, curv, prior)


def optimize_prior_precision(log_lik, theta, curv, prior, optimizer, steps, curvature="diag"):
    """``steps`` gradient steps of ``optimizer`` (over ``prior``'s log precisions) on ``-log p(D | delta)``
    with ``theta`` and the curvature held fixed (Immer et al. 2021, Algorithm 1, inner loop).

    For the diagonal curvature the objective is evaluated on flat vectors,
    ``log p(D | theta) - 0.5 [sum log(H + delta) - sum log delta + sum delta theta^2]`` with
    ``H`` and ``theta^2`` concatenated once -- the formula of
    :func:`~pyro_sparse.laplace.log_marglik_diag`, with fewer tensor operations per step.

    Returns the trajectory of the log marginal likelihood, a tensor of ``steps + 1`` values:
    before each step, and after the last (the last by the general formula).
    """
    theta = {name: t.detach() for name, t in theta.items()}
    log_lik = torch.as_tensor(log_lik).detach()
    if curvature == "kfac":
        curv = kfac_eig(curv)  # once, reused by every step
        objective = lambda: laplace_log_marglik(log_lik, theta, curv, prior, curvature)  # noqa: E731
    else:
        h = torch.cat([curv[name].detach().reshape(-1) for name in prior.names])
        theta2 = torch.cat([theta[name].reshape(-1).square() for name in prior.names])

        def objective():
            log_delta = torch.cat([v.reshape(-1) for v in prior.full_log_precision_dict().values()])
            delta = log_delta.exp()
            return log_lik - 0.5 * ((h + delta).log().sum() - log_delta.sum() + (delta * theta2).sum())

    values = []
    for _ in range(steps):
        optimizer.zero_grad(set_to_none=True)
        lml = objective()
        (-lml).backward()
        optimizer.step()
        values.append(lml.detach())
    with torch.no_grad():
        values.append(laplace_log_marglik(log_lik, theta, curv, prior, curvature).detach())
    return torch.stack(values)


# --------------------------------------------------------------------------- the posterior summary


def laplace_summary(network, model, prior, x, y, likelihood, noise=1.0, hessian="ggn", batch_size=None,
                    method="laplace"):
    """The diagonal Laplace posterior of ``model`` (the deterministic twin of ``network``) as a
    :class:`~pyro_sparse.summary.PosteriorSummary`.

    Per site: ``loc = theta`` (the MAP), ``precision = H_ii + delta_i`` with ``H`` the diagonal
    GGN (``hessian="ggn"``) or empirical Fisher (``"ef"``) on ``(x, y)``, ``prior_loc = 0``,
    ``prior_precision = delta`` (full shape), the network's group axes, and
    ``log_alpha = log(1 / P_ii) - log theta_i^2``.
    """
    if hessian == "ef":
        curv = diag_ef(model, x, y, likelihood, noise, batch_size=batch_size)
    elif hessian == "ggn":
        curv = diag_ggn(model, x, y, likelihood, noise, batch_size=batch_size)
    else:
        raise ValueError(f"hessian must be one of {HESSIANS}, got hessian={hessian!r}")
    return summary_from_curvature(network, model, curv, prior, method)


@torch.no_grad()
def summary_from_curvature(network, model, curv, prior, method="laplace"):
    """The diagonal Laplace posterior of :func:`laplace_summary` from a curvature diagonal already
    computed (``curv``: parameter name -> ``H_ii``, any estimate: exact GGN, empirical Fisher,
    the diagonal of a KFAC)."""
    deltas = {name: d.detach() for name, d in prior.precision_dict().items()}
    params = dict(model.named_parameters())
    out = PosteriorSummary(method=method)
    for name, (layer, param, _) in network.param_sites().items():
        if name not in params or name not in deltas:
            raise ValueError(f"model / prior lack the network parameter {name!r}")
        loc = params[name].detach().clone()
        delta = deltas[name].expand(loc.shape).clone()
        precision = curv[name].detach() + delta
        out[name] = SiteSummary(layer.site, param, loc, precision, torch.zeros((), dtype=loc.dtype, device=loc.device),
                                delta, dict(layer.param_axes[param]), log_alpha(loc, precision.rsqrt()))
    return out


# --------------------------------------------------------------------------- pruning


@torch.no_grad()
def apply_masks(model, masks):
    """Zero the masked-out parameters of ``model`` in place (names as in ``model.named_parameters()``)."""
    for name, p in model.named_parameters():
        if name in masks:
            p.mul_(masks[name].to(p.dtype))
    return model


def masked_fine_tune(model, masks, x, y, likelihood, noise=1.0, prior=None, epochs=5, batch_size=64, lr=1e-3,
                     generator=None):
    """Retrain the kept weights of ``model`` in place on the MAP objective, the pruned ones held at 0.

    ``(x, y)``: tensors, or ``x`` an iterable of ``(x, y)`` batches (a ``DataLoader``) and ``y``
    None. Parameters that do not require gradients stay as they are. Adam on
    ``-(N/|B|) sum log p(y | f(x)) + 0.5 sum_i delta_i theta_i^2`` (``delta`` from
    ``prior``, fixed; no prior term with ``prior=None``). The masked weights start at 0, their
    gradients are multiplied by the mask before every step (so Adam's moments stay 0 for them),
    and the mask is re-applied after every step, so they are exactly 0 at the end.
    """
    for name, value in (("epochs", epochs), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < (0 if name == "epochs" else 1):
            raise ValueError(f"{name} must be a {'non-negative' if name == 'epochs' else 'positive'} int, "
                             f"got {name}={value!r}")
    if not (isinstance(lr, (int, float)) and lr > 0):
        raise ValueError(f"lr must be a number > 0, got lr={lr!r}")
    apply_masks(model, masks)
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    keep = {name: masks[name].to(p.dtype) for name, p in params.items() if name in masks}
    deltas = {} if prior is None else {name: d.detach() for name, d in prior.precision_dict().items()
                                       if name in params}
    optimizer = torch.optim.Adam(params.values(), lr=lr)
    if torch.is_tensor(x):
        n = x.shape[0]
        batch_size = min(batch_size, n)

        def epoch_batches():
            perm = torch.randperm(n, generator=generator).to(x.device)
            for start in range(0, n, batch_size):
                idx = perm[start:start + batch_size]
                yield x[idx], y[idx]
    else:  # an iterable of (x, y) batches (a DataLoader), in its own order
        n = len(x.dataset) if hasattr(x, "dataset") else sum(len(b[0]) for b in x)

        def epoch_batches():
            for item in x:
                yield item[0], item[1]
    model.train()
    for _ in range(epochs):
        for xb, yb in epoch_batches():
            loss = -(n / len(xb)) * log_likelihood(model, xb, yb, likelihood, noise)
            for name, delta in deltas.items():
                loss = loss + 0.5 * (delta * params[name].square()).sum()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            for name, m in keep.items():
                params[name].grad.mul_(m)
            optimizer.step()
            apply_masks(model, masks)
    model.eval()
    return model


# --------------------------------------------------------------------------- the trainer


class LaplaceTrainer(SVITrainer):
    """Online marginal-likelihood training (SpaM) of a network's deterministic twin.

    Same interface and files as :class:`~pyro_sparse.fitting.SVITrainer` (``fit(epochs,
    resume)``, ``metrics.jsonl`` each epoch, atomic checkpoints that resume bit-for-bit, NaN
    recovery, ``summary()``), whose loop it reuses; one epoch is the MAP pass over mini-batches
    followed, when due, by a marglik step (:meth:`marglik_step`), whose time counts as training
    time. The recipe needs ``method: laplace``, ``guide: delta`` and reads its ``laplace:``
    section (:data:`LAPLACE_FIELDS`). The delta guide is kept equal to the current weights, so
    :func:`~pyro_sparse.runs.load_run` and every guide-based tool see the MAP network.
    Held-out figures are those of the MAP network. Inside a process group it trains
    data-parallel (see :meth:`train_epoch` and :meth:`statistics`); only rank 0 writes.

    Attributes: ``net`` (the ``nn.Sequential`` being trained, parameters named like sites),
    ``prior`` (a :class:`~pyro_sparse.laplace.PriorPrecision`), ``options`` (the laplace section).
    """

    spec_name = "laplace"
    recipe_sections = {"laplace": LAPLACE_SECTION}

    def __init__(self, network, guide, dataset, recipe, out_dir=None, progress=True):
        source = recipe.get("_source")
        self.network, self.guide, self.data, self.recipe = network, guide, dataset, recipe
        self.out_dir, self.progress = out_dir, progress
        self.options = _check_options(validate(LAPLACE_FIELDS, recipe.get("laplace") or {}, "laplace", source),
                                      source)
        if not isinstance(guide, DeltaGuide):
            raise SpecError(f"method laplace trains a point estimate: set guide: delta (got {recipe['guide']!r})",
                            source, "guide")
        if recipe.get("pretrain"):
            raise SpecError("pretrain starts an SVI posterior at a MAP network; method laplace trains the MAP "
                            "network itself: remove the pretrain section", source, "pretrain")
        self.likelihood, self.noise = _likelihood_of(network, source)
        self._place(recipe, progress)
        rows = min(self.options["curvature_subset"] or self.num_train, self.num_train)
        if rows < self.world:
            raise SpecError(f"the curvature is fitted on {rows} rows, fewer than the {self.world} ranks; "
                            "raise laplace.curvature_subset or use fewer processes", source,
                            "laplace.curvature_subset")
        self.x_train, self.x_test = self.data.x_train, self.data.x_test
        self.guide.setup(self.data.x_train[: self.batch_size], self.data.y_train[: self.batch_size],
                         dataset_size=self.num_train)
        self.guide.to(self.device)
        init = self.guide.median()
        missing = [name for name in network.param_sites() if name not in init]
        if missing:
            raise SpecError(f"method laplace needs centred priors whose sample sites are the layer parameters; "
                            f"the guide has no sites {missing}", source, "prior")
        self.net = network.deterministic(init).to(self.device)
        sites = set(network.param_sites())
        for name, p in self.net.named_parameters():  # a converted module's other parameters stay fixed
            p.requires_grad_(name in sites)
        try:
            check_supported(self.net)
        except ValueError as e:
            raise SpecError(f"the Laplace curvature cannot be computed for this network: {e}", source,
                            "method") from None
        self.prior = make_prior_precision(self.options["structure"], self.net,
                                          init=self.options["prior_precision"]).to(self.device)
        self.optimizer = make_optimizer([p for _, p in self.site_parameters()], recipe["optimizer"])
        self.hyper_optimizer = torch.optim.Adam(self.prior.parameters(), lr=self.options["hyper_lr"])
        self.scheduler = make_scheduler(self.optimizer, recipe["schedule"], recipe["epochs"])
        self.generator = torch.Generator().manual_seed(recipe["seed"])
        self.epoch, self.steps, self.train_seconds = 0, 0, 0.0
        self.history: list[dict] = []
        self._good_state = None
        if self.world > 1:  # the same starting point on every rank
            distributed.broadcast_parameters(list(self.net.parameters()) + list(self.prior.parameters()))
        self._refresh_prior()

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        return {**self.training_state(), "method": "laplace", "weights": self.net.state_dict(),
                "prior": self.prior.state_dict(), "hyper_optimizer": self.hyper_optimizer.state_dict()}

    def load_state_dict(self, state: dict):
        self.net.load_state_dict(state["weights"])
        self.prior.load_state_dict(state["prior"])
        self.hyper_optimizer.load_state_dict(state["hyper_optimizer"])
        self.load_training_state(state)
        self._refresh_prior()
        self._sync_guide()

    def _refresh_prior(self):
        """Cache the (detached) precisions used by the MAP steps until the next marglik step."""
        with torch.no_grad():
            self._deltas = {name: d.detach() for name, d in self.prior.precision_dict().items()}
            full = self.prior.full_log_precision_dict()
            self._log_prior_const = sum(float(v.sum()) for v in full.values()) * 0.5 \
                - 0.5 * math.log(2 * math.pi) * sum(v.numel() for v in full.values())

    def site_parameters(self):
        """``(site, parameter)`` of the network being trained: its parameters named like the sites
        (a converted module's twin has others too, held fixed)."""
        return [(name, p) for name, p in self.net.named_parameters() if p.requires_grad]

    @torch.no_grad()
    def _sync_guide(self):
        for name, p in self.site_parameters():
            self.guide.values[_key(name)].copy_(p)

    def values(self) -> dict:
        """Site -> current weight (detached), e.g. for ``compact()``."""
        return {name: p.detach().clone() for name, p in self.site_parameters()}

    # ------------------------------------------------------------------ training
    def map_loss(self, idx):
        """``-(N/|B|) sum_B log p(y | f(x; theta)) - log N(theta; 0, diag(delta)^-1)`` on the rows ``idx``."""
        ll = log_likelihood(self.net, self.x_train[idx], self.data.y_train[idx], self.likelihood, self.noise)
        quad = 0.0
        for name, p in self.site_parameters():
            quad = quad + (self._deltas[name] * p.square()).sum()
        return -(self.num_train / len(idx)) * ll - (self._log_prior_const - 0.5 * quad)

    def marglik_due(self, epoch: int) -> bool:
        """A marglik step follows epoch ``epoch`` (1-based) at ``burn_in + F, burn_in + 2F, ...``."""
        o = self.options
        return o["hyper_steps"] > 0 and epoch > o["burn_in"] and (epoch - o["burn_in"]) % o["marglik_frequency"] == 0

    def statistics(self):
        """``(curvature, log p(D | theta))`` per the recipe at the current weights
        (:func:`laplace_statistics`): the curvature on all training rows or on the random
        ``curvature_subset`` (drawn from the trainer's generator, the same on every rank), summed
        over the ranks with one all-reduce when data-parallel."""
        o = self.options
        m = o["curvature_subset"]
        rows = torch.randperm(self.num_train, generator=self.generator)[:m] if m is not None and m < self.num_train \
            else None
        generator = self.generator
        if self.world > 1 and o["mc_samples"] is not None:
            # the MC draws of a shard must not advance the shared generator by a shard-dependent
            # amount: each rank draws from its own stream, a function of (seed, epoch, rank)
            generator = torch.Generator().manual_seed(distributed.rank_seed(self.recipe["seed"], self.epoch, 0x4D43))
        return laplace_statistics(self.net, self.x_train, self.data.y_train, self.likelihood, self.noise,
                                  o["curvature"], o["hessian"], rows, o["mc_samples"], o["curvature_batch_size"],
                                  generator)

    def curvature(self):
        """The training curvature per the recipe (:func:`laplace_curvature`) at the current weights
        (summed over the ranks when data-parallel)."""
        return self.statistics()[0]

    def _log_lik(self):
        """``log p(D | theta)`` on the whole training set (summed over the ranks' shards)."""
        world = self.world
        with torch.no_grad():
            ll = log_likelihood(self.net, self.x_train[self.rank::world], self.data.y_train[self.rank::world],
                                self.likelihood, self.noise)
        return distributed.all_reduce_sum(ll) if world > 1 else ll

    def log_marglik(self, curv=None):
        """The Laplace log marginal likelihood at the current weights and precisions (a tensor,
        differentiable in ``log delta``), with the recipe's curvature unless ``curv`` is given."""
        curv, ll = self.statistics() if curv is None else (curv, self._log_lik())
        theta = {name: p.detach() for name, p in self.site_parameters()}
        return laplace_log_marglik(ll, theta, curv, self.prior, self.options["curvature"])

    def marglik_step(self) -> dict:
        """Fit the Laplace approximation and take ``hyper_steps`` Adam steps on ``log delta``.

        Data-parallel, the statistics are summed over the ranks (:meth:`statistics`) and every
        rank then takes the same deterministic steps on the same numbers; rank 0's ``log delta``
        is broadcast at the end all the same, so floating-point differences between devices can
        never let the ranks' priors drift apart."""
        start = time.perf_counter()
        curv, ll = self.statistics()
        theta = {name: p.detach() for name, p in self.site_parameters()}
        trajectory = optimize_prior_precision(ll, theta, curv, self.prior, self.hyper_optimizer,
                                              self.options["hyper_steps"], self.options["curvature"])
        if self.world > 1:
            distributed.broadcast_parameters(self.prior.parameters())
        self._refresh_prior()
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        first, last = trajectory[0].item(), trajectory[-1].item()
        if not (math.isfinite(first) and math.isfinite(last)):
            raise FloatingPointError("non-finite log marginal likelihood")
        log_delta = torch.cat([v.reshape(-1) for v in self.prior.full_log_precision_dict().values()])
        return {"log_marglik": last, "log_marglik_start": first, "log_marglik_per_datum": last / self.num_train,
                "log_prior_precision_mean": log_delta.mean().item(), "marglik_seconds": time.perf_counter() - start}

    def train_epoch(self):
        """One MAP pass over the training data in a random order, then a marglik step when due.

        Data-parallel as :meth:`SVITrainer.train_epoch <pyro_sparse.fitting.SVITrainer.train_epoch>`:
        rank ``r`` steps on its shard ``perm[r::W]`` of the shared permutation, and the gradients
        of the weights are averaged over the ranks after ``backward`` (before clipping), which
        makes each step the single-process step on the union batch (the prior term is the same on
        every rank and its average is itself)."""
        perm = torch.randperm(self.num_train, generator=self.generator)
        if self.world > 1:
            perm = distributed.shard(perm)  # same permutation on every rank; rank r takes r::W
        perm = perm.to(self.device)
        total = torch.zeros((), device=self.device)
        start = time.perf_counter()
        self.net.train()
        for b in range(self.steps_per_epoch):
            idx = perm[b * self.batch_size:(b + 1) * self.batch_size]
            loss = self.map_loss(idx)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if self.world > 1:
                distributed.average_gradients(self.net.parameters())
            # the gradient norm (clipped or not) doubles as the finiteness check of this step
            norm = torch.nn.utils.clip_grad_norm_(self.net.parameters(), self.recipe["grad_clip"] or math.inf)
            # data-parallel: decide on the averaged gradient's norm, the same on every rank (a
            # non-finite local loss shows in the all-reduced epoch loss below)
            ok = torch.isfinite(norm) if self.world > 1 else torch.isfinite(loss) & torch.isfinite(norm)
            if self.check_each_step and not bool(ok):
                raise self._fault("loss" if not torch.isfinite(loss) else "gradient", b)  # before the update
            self.optimizer.step()
            total = total + loss.detach()
        if self.world > 1:
            total = distributed.all_reduce_sum(total) / self.world  # the global estimate, on every rank
        total = total.item()
        if not math.isfinite(total):
            raise FloatingPointError("non-finite loss")
        for p in self.net.parameters():
            if not torch.isfinite(p).all():
                raise FloatingPointError("non-finite parameter")
        figures = {"loss": total / self.steps_per_epoch}
        if self.marglik_due(self.epoch + 1):
            figures.update(self.marglik_step())
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        figures["seconds"] = time.perf_counter() - start
        self._sync_guide()
        return figures

    def _recover(self, retries):
        """SVITrainer's recovery (last good state, lower weight learning rate), and the same
        reduction of the log-delta learning rate: a marglik step can diverge too."""
        super()._recover(retries)
        for group in self.hyper_optimizer.param_groups:
            group["lr"] *= self.recipe["nan_lr_factor"] ** (retries + 1)

    def epoch_record(self, figures: dict) -> dict:
        record = {"epoch": self.epoch, "steps": self.steps, "loss": figures["loss"],
                  "neg_log_joint_per_datum": figures["loss"] / self.num_train,
                  "epoch_seconds": figures["seconds"], "lr": self.optimizer.param_groups[0]["lr"]}
        record.update({k: v for k, v in figures.items() if k not in ("loss", "seconds")})
        return record

    def evaluate(self, num_samples=None):
        """Held-out metrics of the MAP network (``num_samples`` is ignored: a point estimate);
        data-parallel, rank 0 evaluates and hands the figures to every rank."""
        return self.evaluate_model(self.net) if self.world == 1 else distributed.on_main(self.evaluate_model, self.net)

    # ------------------------------------------------------------------ the posterior and pruning
    def posterior_summary(self, batch_size=None) -> PosteriorSummary:
        """:func:`laplace_summary` on the whole training set (curvature: the recipe's ``hessian``,
        always the exact diagonal)."""
        return laplace_summary(self.network, self.net, self.prior, self.x_train, self.data.y_train,
                               self.likelihood, self.noise, self.options["hessian"],
                               batch_size or self.options["curvature_batch_size"],
                               method=f"laplace-{self.options['structure']}")

    def posterior_guide(self):
        """The Laplace posterior ``N(theta, diag(H + delta)^-1)`` as a Pyro guide
        (:class:`~pyro_sparse.guides.GaussianPosterior`), for posterior draws and ArviZ data."""
        summary = self.posterior_summary()
        return GaussianPosterior(self.network.model, {k: (s.loc, s.variance) for k, s in summary.items()},
                                 method=summary.method)

    def pruned(self, masks, fine_tune_epochs=0, lr=None, seed=None) -> nn.Sequential:
        """A masked copy of ``net`` (the trainer is unchanged), optionally fine-tuned for
        ``fine_tune_epochs`` epochs by :func:`masked_fine_tune` with the current fixed prior."""
        model = apply_masks(copy.deepcopy(self.net), masks)
        if fine_tune_epochs:
            generator = torch.Generator().manual_seed(self.recipe["seed"] if seed is None else seed)
            masked_fine_tune(model, masks, self.x_train, self.data.y_train, self.likelihood, self.noise,
                             self.prior, fine_tune_epochs, self.batch_size,
                             lr or self.recipe["optimizer"].get("lr", 1e-3), generator)
        return model.eval()

    def evaluate_model(self, model) -> dict:
        """Held-out ``test_*`` metrics of a deterministic twin (the MAP network, a pruned copy)."""
        was_training = model.training
        figures = evaluation.evaluate(evaluation.point_predictive(model), self.x_test, self.data.y_test,
                                      self.network.likelihood)
        model.train(was_training)
        return evaluation.prefixed(figures)

