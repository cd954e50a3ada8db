"""SpaM: online Laplace marginal-likelihood training of a network's deterministic twin.

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
(diagonal GGN, diagonal empirical Fisher, or KFAC; :mod:`pyro_sparse.laplace.curvature`) -- and ``K``
Adam steps on ``log delta`` raise the Laplace log marginal likelihood
(:mod:`pyro_sparse.laplace.marglik`) with ``H`` held fixed during the ``K`` steps. With
parameter-wise or unit-wise precisions (:mod:`pyro_sparse.laplace.prior`) this is an automatic
Occam's razor: the evidence raises ``delta_i`` for weights the data do not determine, and the MAP
steps then shrink them towards 0. The spec's own priors are replaced by this learned Gaussian
prior. A recipe with ``epochs: 0`` trains nothing: the prior precision is fitted once at the
starting weights (a spec's ``init:`` trained weights) -- the post-hoc Laplace posterior of the
command line.

**Data-parallel.** Inside a ``torch.distributed`` process group (``torchrun``) the MAP steps run
through the one loop of :class:`~pyro_sparse.training.Trainer` (each rank's shard of the epoch's
permutation, ``batch_size`` the global batch, gradients averaged over the ranks), and the marglik step's
statistics -- the curvature and ``log p(D | theta)``, sums over the data -- are computed on a
partition of the rows and added with one all-reduce (:func:`laplace_statistics`); every rank
then takes the same steps on ``log delta``. Only rank 0 evaluates and writes.

**The posterior.** ``trainer.posterior()`` is the fitted
:class:`~pyro_sparse.laplace.posterior.LaplacePosterior` on the whole training set, with the
curvature the recipe's ``laplace.posterior`` names (default: its ``curvature``; ``rows`` for the
exact row blocks); its summary (``trainer.posterior_summary()``) is what every rule of
:mod:`pyro_sparse.reduction.rules` reads -- OPD, BMR and Savage-Dickey (compensated on a
structured posterior), magnitude -- and its predictive (linearised by default) is what
``evaluate --samples`` and ``predict --samples`` draw from.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass

import torch

from .. import distributed, evaluation
from ..data import data_batches
from ..errors import SpecError
from ..finetune import apply_masks, masked_fine_tune
from ..guides import DeltaGuide, GaussianPosterior, _key
from ..recipe import make_optimizer
from ..schema import Field, validate
from ..summary import PosteriorSummary
from ..training import Trainer
from .curvature import check_supported, log_likelihood
from .marglik import fit_prior_precision, log_marglik, optimize_prior_precision
from .posterior import LaplacePosterior, curvature_of
from .prior import PRIOR_STRUCTURES, make_prior_precision

__all__ = [
    "LAPLACE_FIELDS",
    "LaplaceTrainer",
    "laplace_statistics",
]

CURVATURES = ("diag", "kfac")  # of the marglik steps
POSTERIORS = ("diag", "kfac", "rows")
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
    "posterior": Field("choice", None, choices=POSTERIORS, allow_none=True,
                       doc="curvature of the posterior the reduction rules read: diag | kfac | rows (null: "
                           "curvature's; kfac and rows give the compensated bmr and savage-dickey)"),
}


def _check_options(options, source=None):
    if options["curvature"] == "kfac" and options["hessian"] != "ggn":
        raise SpecError("the KFAC curvature is a GGN; use hessian: ggn or curvature: diag", source,
                        "laplace.hessian")
    if options["mc_samples"] is not None and options["hessian"] != "ggn":
        raise SpecError("mc_samples applies to the GGN; use hessian: ggn or mc_samples: null", source,
                        "laplace.mc_samples")
    if options["posterior"] not in (None, "diag") and options["hessian"] != "ggn":
        raise SpecError("the kfac and rows posteriors are GGNs; use hessian: ggn or posterior: diag", source,
                        "laplace.posterior")
    if options["posterior"] == "rows" and options["structure"] not in ("scalar", "layerwise"):
        raise SpecError("the rows posterior takes scalar or layer-wise prior precisions; got structure: "
                        f"{options['structure']}", source, "laplace.posterior")
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
    """The network's likelihood, checked to have an output Hessian (SpecError naming the field)."""
    try:
        network.likelihood.check_curvature()
    except ValueError as e:
        raise SpecError(f"method laplace: {e}", source, "likelihood") from None
    return network.likelihood


# --------------------------------------------------------------------------- the marginal likelihood


def laplace_statistics(model, x, y, likelihood, curvature="diag", hessian="ggn", rows=None, mc_samples=None,
                       batch_size=None, generator=None, network=None):
    """The data statistics of one marglik step: the curvature ``H``
    (:func:`~pyro_sparse.laplace.posterior.curvature_of`) and the log-likelihood
    ``log p(D | theta) = sum_{n=1}^N log p(y_n | f(x_n; theta))`` at the current weights, both sums
    over the data -- data-parallel inside a process group.

    ``rows`` (an index tensor of ``m`` training rows, or None for all ``N``) is the curvature
    subset, the same on every rank; ``H`` is fitted on it and multiplied by ``N / m`` (for KFAC the
    count-carrying factor ``A``), an unbiased estimate of the sum over all ``N`` that trades noise
    in ``H`` for a marglik step ``N / m`` times cheaper. The log-likelihood always runs over all
    ``N`` rows.

    With ``W`` ranks each rank takes the strided part ``r::W`` of the curvature rows and of the
    training rows (:func:`~pyro_sparse.distributed.shard` without padding: a partition) and
    computes its partial sums; one :func:`~pyro_sparse.distributed.all_reduce_sum` adds them, so
    every rank holds the statistics of the whole set. Diagonal curvatures and ``log p(D | theta)``
    are plain sums. Of the KFAC factors ``A = sum_{n,l} a~ a~'`` carries the count and adds up,
    while ``G = 1/(N L) sum_{n,l,k} g g'`` is a mean: rank ``r`` with ``m_r`` of the ``m`` rows
    contributes ``(m_r / m) G_r``, so the sum is the mean over all ``m`` rows (``L``, the positions
    per example, is the same on every rank). ``generator`` drives the Monte Carlo GGN draws
    (``mc_samples``); under a process group give each rank its own.

    Returns ``(curvature, log_lik)``: a dict as ``curvature_of``'s, and a 0-d tensor.
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
    curv = curvature_of(model, data_batches(x_h, y_h, batch_size), likelihood, curvature, hessian, mc_samples,
                        generator, network)
    with torch.no_grad():
        log_lik = log_likelihood(model, x_ll, y_ll, likelihood)
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


# --------------------------------------------------------------------------- the trainer


class LaplaceTrainer(Trainer):
    """Online marginal-likelihood training (SpaM) of a network's deterministic twin.

    A :class:`~pyro_sparse.training.Trainer` (``fit(epochs, resume)``, ``metrics.jsonl`` each
    epoch, atomic checkpoints that resume bit-for-bit, NaN recovery, ``summary()``): one epoch is
    the MAP pass over mini-batches (:meth:`step_loss`) followed, when due, by a marglik step
    (:meth:`after_epoch`, :meth:`marglik_step`), whose time counts as training time. The recipe
    needs ``method: laplace``, ``guide: delta`` and reads its ``laplace:`` section
    (:data:`LAPLACE_FIELDS`). The delta guide is kept equal to the current weights, so
    :func:`~pyro_sparse.runs.load_run` and every guide-based tool see the MAP network.
    Held-out figures are those of the MAP network. Inside a process group it trains
    data-parallel (see :meth:`step_loss` and :meth:`statistics`); only rank 0 writes.

    Attributes: ``net`` (the deterministic twin being trained, parameters named like sites),
    ``prior`` (a :class:`~pyro_sparse.laplace.prior.PriorPrecision`), ``options`` (the laplace section).
    """

    spec_name = "laplace"
    recipe_sections = {"laplace": LAPLACE_SECTION}

    allows_no_epochs = True  # epochs: 0 is the post-hoc Laplace posterior of the starting weights
    fits_standardised_targets = False

    def setup(self):
        """Check the recipe's ``laplace:`` section and the guide; build the deterministic twin
        (its parameters named like the sites), the prior precisions and the two optimisers
        (weights; ``log delta`` for the marglik steps)."""
        recipe, network, guide = self.recipe, self.network, self.guide
        source = recipe.get("_source")
        self.options = _check_options(validate(LAPLACE_FIELDS, recipe.get("laplace") or {}, "laplace", source),
                                      source)
        if not isinstance(guide, DeltaGuide):
            raise SpecError(f"method laplace trains a point estimate: set guide: delta (got {recipe['guide']!r})",
                            source, "guide")
        if recipe.get("pretrain"):
            raise SpecError("pretrain starts an SVI posterior at a MAP network; method laplace trains the MAP "
                            "network itself: remove the pretrain section", source, "pretrain")
        self.likelihood = _likelihood_of(network, source)
        rows = min(self.options["curvature_subset"] or self.num_train, self.num_train)
        if rows < self.world:
            raise SpecError(f"the curvature is fitted on {rows} rows, fewer than the {self.world} ranks; "
                            "raise laplace.curvature_subset or use fewer processes", source,
                            "laplace.curvature_subset")
        self.x_train, self.x_test = self.data.x_train, self.data.x_test
        guide.setup(self.data.x_train[: self.batch_size], self.data.y_train[: self.batch_size],
                    dataset_size=self.num_train)
        guide.to(self.device)
        init = guide.median()
        missing = [name for name in network.param_sites() if name not in init]
        if missing:
            raise SpecError(f"method laplace needs centred priors whose sample sites are the layer parameters; "
                            f"the guide has no sites {missing}", source, "prior")
        self.net = network.deterministic(init).to(self.device)
        sites = set(network.param_sites())
        for name, p in self.net.named_parameters():  # a converted module's other parameters stay fixed
            p.requires_grad_(name in sites)
        try:
            check_supported(self.net, network)
        except ValueError as e:
            raise SpecError(f"the Laplace curvature cannot be computed for this network: {e}", source,
                            "method") from None
        self.prior = make_prior_precision(self.options["structure"], self.net,
                                          init=self.options["prior_precision"]).to(self.device)
        self.optimizer = make_optimizer([p for _, p in self.site_parameters()], recipe["optimizer"])
        self.hyper_optimizer = torch.optim.Adam(self.prior.parameters(), lr=self.options["hyper_lr"])
        self._posterior = None
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
        self._posterior = None
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
        """The delta guide at the current weights, and the network's deterministic state (a batch
        norm's running statistics) at the trained twin's, so every guide-based tool and the
        checkpoint see the network being trained."""
        for name, p in self.site_parameters():
            self.guide.values[_key(name)].copy_(p)
        self.network.load_frozen_state(self.network.twin_frozen_state(self.net))

    def values(self) -> dict:
        """Site -> current weight (detached), e.g. for ``compact()``."""
        return {name: p.detach().clone() for name, p in self.site_parameters()}

    # ------------------------------------------------------------------ training
    def map_loss(self, idx):
        """``-(N/|B|) sum_B log p(y | f(x; theta)) - log N(theta; 0, diag(delta)^-1)`` on the rows ``idx``."""
        ll = self.likelihood.log_likelihood(self.net(self.x_train[idx]), self.data.y_train[idx])
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
        return laplace_statistics(self.net, self.x_train, self.data.y_train, self.likelihood, o["curvature"],
                                  o["hessian"], rows, o["mc_samples"], o["curvature_batch_size"], generator,
                                  self.network)

    def curvature(self):
        """The training curvature per the recipe at the current weights (summed over the ranks when
        data-parallel)."""
        return self.statistics()[0]

    def _log_lik(self):
        """``log p(D | theta)`` on the whole training set (summed over the ranks' shards)."""
        world = self.world
        with torch.no_grad():
            ll = log_likelihood(self.net, self.x_train[self.rank::world], self.data.y_train[self.rank::world],
                                self.likelihood)
        return distributed.all_reduce_sum(ll) if world > 1 else ll

    def log_marglik(self, curv=None):
        """The Laplace log marginal likelihood at the current weights and precisions (a tensor,
        differentiable in ``log delta``), with the recipe's curvature unless ``curv`` is given."""
        curv, ll = self.statistics() if curv is None else (curv, self._log_lik())
        theta = {name: p.detach() for name, p in self.site_parameters()}
        return log_marglik(ll, theta, curv, self.prior, self.options["curvature"])

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

    def step_loss(self, batch):
        """The MAP loss of one mini-batch (:meth:`map_loss`). Data-parallel, rank ``r`` steps on its
        shard ``perm[r::W]`` of the shared permutation and the loop averages the gradients over the
        ranks after ``backward``, which makes each step the single-process step on the union batch
        (the prior term is the same on every rank and its average is itself)."""
        return self.map_loss(batch[1])

    def trained_parameters(self):
        return self.net.named_parameters()

    def before_epoch(self):
        self.net.train()

    def after_epoch(self) -> dict:
        """The marglik step when due (:meth:`marglik_step`, timed as training); the delta guide and
        the network's deterministic state follow the trained twin."""
        figures = self.marglik_step() if self.marglik_due(self.epoch + 1) else {}
        self._sync_guide()
        return figures

    def output_width(self) -> int:
        with torch.no_grad():
            return int(self.net(self.x_train[:1]).shape[-1])

    def _recover(self, retries):
        """The loop's recovery (last good state, lower weight learning rate), and the same
        reduction of the log-delta learning rate: a marglik step can diverge too."""
        super()._recover(retries)
        for group in self.hyper_optimizer.param_groups:
            group["lr"] *= self.recipe["nan_lr_factor"] ** (retries + 1)

    def epoch_record(self, figures: dict) -> dict:
        return {**super().epoch_record(figures), "neg_log_joint_per_datum": figures["loss"] / self.num_train}

    def test_figures(self):
        return "the MAP network (a point estimate); evaluate --samples S: the linearised Laplace predictive"

    def evaluate(self, num_samples=None):
        """Held-out metrics: of the MAP network, or with ``num_samples`` of the posterior predictive
        (:meth:`predictive`: the linearised Laplace predictive with that many draws); data-parallel,
        rank 0 evaluates and hands the figures to every rank."""
        if num_samples:
            figures = evaluation.evaluate(self.predictive(num_samples), self.x_test, self.data.y_test,
                                          self.network.likelihood)
            return evaluation.prefixed(figures)
        return self.evaluate_model(self.net) if self.world == 1 else distributed.on_main(self.evaluate_model, self.net)

    def fit(self, epochs=None, resume=False) -> dict:
        """Train to ``epochs`` (see :meth:`Trainer.fit <pyro_sparse.training.Trainer.fit>`). With
        ``epochs: 0`` nothing is trained: the prior precision is fitted once to the marginal
        likelihood at the starting weights (:func:`~pyro_sparse.laplace.marglik.fit_prior_precision`,
        ``hyper_steps`` iterations) and saved -- the post-hoc Laplace posterior of a spec's
        ``init:`` weights."""
        epochs = self.recipe["epochs"] if epochs is None else epochs
        if epochs or resume:
            return super().fit(epochs, resume)
        start = time.perf_counter()
        o = self.options
        curv, ll = self.statistics()
        theta = {name: p.detach() for name, p in self.site_parameters()}
        trajectory = fit_prior_precision(ll, theta, curv, o["curvature"], self.prior, o["hyper_steps"], o["hyper_lr"])
        self._refresh_prior()
        self.train_seconds = time.perf_counter() - start
        self.history.append({"epoch": 0, "steps": 0, "log_marglik": float(trajectory[-1]),
                             "log_marglik_start": float(trajectory[0]), "marglik_seconds": self.train_seconds,
                             **self.evaluate()})
        self._sync_guide()
        self.save()
        return self.summary()

    # ------------------------------------------------------------------ the posterior
    def posterior(self) -> LaplacePosterior:
        """The Laplace posterior at the current weights and prior on the whole training set (kept
        until the weights or the prior change): the curvature the recipe's ``laplace.posterior``
        names (default its ``curvature``; the recipe's ``hessian`` for a diagonal one), the exact
        GGN columns unless ``mc_samples`` is set."""
        if self._posterior is None:
            o = self.options
            kind = o["posterior"] or o["curvature"]
            data = data_batches(self.x_train, self.data.y_train, o["curvature_batch_size"])
            generator = torch.Generator().manual_seed(self.recipe["seed"])
            start = time.perf_counter()
            curv = curvature_of(self.net, data, self.likelihood, kind, o["hessian"] if kind == "diag" else "ggn",
                                o["mc_samples"], generator, self.network)
            info = {"curvature_seconds": time.perf_counter() - start, "curvature": kind}
            self._posterior = LaplacePosterior(self.network, self.net, self.likelihood, self.prior, kind, curv,
                                               info=info, method=f"laplace-{o['structure']}-{kind}")
        return self._posterior

    def posterior_summary(self) -> PosteriorSummary:
        """The summary of :meth:`posterior`."""
        return self.posterior().summary()

    def calibration(self):
        """The training inputs for the compensated reduction's layer-by-layer pass
        (:meth:`~pyro_sparse.laplace.posterior.LaplacePosterior.calibration`)."""
        return self.posterior().calibration(self.x_train)

    def predictive(self, num_samples=None, generator=None):
        """``x -> outputs (S, B, ...)``: the linearised Laplace predictive with ``num_samples`` draws
        (:meth:`~pyro_sparse.laplace.posterior.LaplacePosterior.predictive`), or the MAP network's
        outputs without."""
        if not num_samples:
            return evaluation.point_predictive(self.net)
        posterior = self.posterior()
        generator = generator or torch.Generator().manual_seed(self.recipe["seed"])
        return lambda x: posterior.predictive(x, num_samples, generator=generator)

    def posterior_guide(self):
        """The Laplace posterior's marginals ``N(theta, 1/precision)`` as a Pyro guide
        (:class:`~pyro_sparse.guides.GaussianPosterior`), for posterior draws and ArviZ data."""
        summary = self.posterior_summary()
        return GaussianPosterior(self.network.model, {k: (s.loc, s.variance) for k, s in summary.items()},
                                 method=summary.method)

    def pruned(self, masks, fine_tune_epochs=0, lr=None, seed=None, values=None):
        """A masked copy of ``net`` (the trainer is unchanged; ``values``: site -> weight to start
        from, e.g. a compensated decision's), optionally fine-tuned for ``fine_tune_epochs`` epochs
        by :func:`~pyro_sparse.finetune.masked_fine_tune` with the current fixed prior."""
        model = copy.deepcopy(self.net)
        if values:
            with torch.no_grad():
                params = dict(model.named_parameters())
                for name, value in values.items():
                    params[name].copy_(value)
        apply_masks(model, masks)
        if fine_tune_epochs:
            generator = torch.Generator().manual_seed(self.recipe["seed"] if seed is None else seed)
            lr = lr or self.recipe["optimizer"].get("lr", 1e-3)
            masked_fine_tune(model, masks, self.x_train, self.data.y_train, self.likelihood, self.prior,
                             fine_tune_epochs, self.batch_size, lr, generator)
        return model.eval()
