"""Fitting by stochastic variational inference: the ``method: svi`` trainer.

:class:`SVITrainer` is the :class:`~pyro_sparse.training.Trainer` (the library's one epoch loop,
with evaluation, checkpoints, divergence handling and data-parallel steps) whose step loss is the
negative ELBO of one mini-batch,

    loss = beta_t * KL(q || p) - (N / B) * sum_{n in batch} log p(y_n | x_n, w),

from the ELBO core, :class:`~pyro_sparse.elbo.CoreELBO` (analytic KL, local
reparameterisation, no per-step Pyro overhead; every prior, guide, layer and likelihood of the
library), and beta_t the KL warm-up. ``elbo: pyro`` in the recipe takes the reference
:class:`~pyro_sparse.elbo.MeanFieldELBO` (same value and draws through Pyro's effect handlers); a
model the core cannot run (a prior or layer that samples sites it does not declare) takes that
path too, with a :class:`CoreFallbackWarning` at start-up saying why. ``trainer.elbo_path`` says
which ran, and ``trainer.kl_paths`` (:meth:`CoreELBO.explain <pyro_sparse.elbo.CoreELBO.explain>`)
which KL each site takes. Each epoch it evaluates the posterior predictive on held-out data,
appends to ``metrics.jsonl`` and writes an atomic checkpoint from which ``resume`` continues
bit-for-bit (the RNG states are part of it). Numerical faults and divergence are handled by the
loop (:mod:`pyro_sparse.training`); the reference loss L0 of the divergence check is the
negative-ELBO estimate per datum with the full KL weight.

The guide keeps every ``log sigma`` in ``[LOG_SCALE_MIN,
LOG_SCALE_MAX]`` = [-12, 4] (:mod:`pyro_sparse.guides`) and ``log alpha`` is clamped to
[-20, 20] (:mod:`pyro_sparse.distributions`), so variances can neither underflow to 0 nor
overflow.
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass

import pyro
import torch

from . import distributed, evaluation
from .data import index_batches
from .descent import NonFiniteStep, descend
from .elbo import CoreELBO, MeanFieldELBO
from .errors import DataError, PyroSparseError, PyroSparseWarning, SpecError
from .evaluation import evaluation_mode
from .guides import DeltaGuide
from .recipe import guide_param_groups, make_optimizer
from .schema import Field, validate
from .summary import summarize
from .training import NumericalError, Trainer

__all__ = ["SVITrainer", "CoreFallbackWarning", "PRETRAIN_FIELDS", "evaluate", "NumericalError", "NonFiniteStep"]

#: options of the recipe's ``pretrain:`` section (start SVI from a MAP network; :meth:`SVITrainer.pretrain`)
PRETRAIN_FIELDS = {
    "epochs": Field("int", 30, positive=True, doc="epochs of maximum-likelihood training of the deterministic twin"),
    "lr": Field("float", 1e-3, positive=True, doc="Adam learning rate"),
    "weight_decay": Field("float", 0.0, nonneg=True, doc="L2 penalty (Adam's weight_decay)"),
    "batch_size": Field("int", None, positive=True, allow_none=True, doc="default: the recipe's batch_size"),
}


@dataclass(frozen=True)
class _PretrainSection(Field):
    """The recipe's ``pretrain:`` section, validated against :data:`PRETRAIN_FIELDS`."""

    def check(self, value, path, source):
        if value is None:
            return None
        return validate(PRETRAIN_FIELDS, value, path, source)


PRETRAIN_SECTION = _PretrainSection("dict", None, allow_none=True,
                                    doc="pretrain the deterministic network (maximum likelihood), then start the "
                                        "posterior means there")


class CoreFallbackWarning(PyroSparseWarning):
    """A trainer fits through Pyro because its model does not run on the ELBO core (the message
    says what is missing)."""


def _defined_in(cls, name):
    """The class in ``cls``'s method resolution order whose body defines ``name``."""
    return next(k for k in cls.__mro__ if name in vars(k))


def evaluate(network, guide, x, y, num_samples=10, batch_size=None) -> dict:
    """``test_*`` figures of the posterior predictive of ``guide`` with ``num_samples`` draws
    (one for a point-mass guide): :func:`pyro_sparse.evaluation.evaluate`."""
    predict = evaluation.posterior_predictive(network, guide, num_samples)
    if isinstance(guide, DeltaGuide):  # every draw is the same network
        predict = evaluation.posterior_predictive(network, guide, 1)
    lik = network.likelihood
    noise = guide.median().get("likelihood.noise") if getattr(lik, "learn_noise", False) else None
    return evaluation.prefixed(evaluation.evaluate(predict, x, y, lik, noise, batch_size))


class SVITrainer(Trainer):
    """Runs SVI for a network + guide on a data set according to a recipe (a parsed dict): the
    one loop of :class:`~pyro_sparse.training.Trainer` with the negative ELBO as the step loss.

    Args:
        network, guide: the model and its (not yet set up) guide.
        dataset: a :class:`~pyro_sparse.data.Dataset`, or data in batches (a DataLoader).
        recipe: a parsed inference recipe (:func:`~pyro_sparse.recipe.parse_recipe`).
        out_dir: where ``metrics.jsonl`` and the checkpoint go (``None``: nowhere).
        progress: show progress: a tqdm bar on a terminal, one line per epoch on stderr otherwise.
    """

    spec_name = "svi"
    recipe_sections: dict = {"pretrain": PRETRAIN_SECTION}
    accepts_batches = True

    # ------------------------------------------------------------------ the method
    def setup(self):
        """Set the guide up on the first batch, choose the ELBO (:meth:`make_elbo`), record each
        site's KL path and build the optimiser over the guide's parameter groups."""
        try:
            self.guide.setup(*self._first_batch(), dataset_size=self.num_train)
        except (RuntimeError, ValueError, TypeError, IndexError) as e:
            if isinstance(e, PyroSparseError):
                raise
            msg = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise DataError(f"{self.data.name}: the network cannot run on these data ({msg})") from None
        self.guide.to(self.device)
        if self.world > 1:
            distributed.broadcast_parameters(self.guide.parameters())
        self.elbo, self.elbo_path, self.elbo_reason = self.make_elbo()
        if self.elbo_path == "pyro" and self.recipe.get("elbo", "auto") != "pyro":
            warnings.warn(f"{type(self).__name__}: this model does not run on the ELBO core ({self.elbo_reason}); "
                          "fitting through Pyro, several times slower per step (elbo: pyro in the recipe chooses "
                          "that path without this warning)", CoreFallbackWarning, stacklevel=4)
        #: site -> the KL path it takes ("fused", "closed form", "monte carlo", with the kernel's name)
        self.kl_paths = CoreELBO.explain(self.network, self.guide) if self.elbo_path == "core" else {}
        self.optimizer = make_optimizer(
            guide_param_groups(self.guide, self.recipe["optimizer"], self.recipe.get("scale_lr_factor", 1.0)),
            self.recipe["optimizer"])

    def kl_weight(self, epoch_float: float) -> float:
        """beta_t: 0 for ``kl_free_epochs`` (pre-training on the data term), then a linear
        rise to 1 over ``kl_warmup_epochs``."""
        epoch_float -= self.recipe.get("kl_free_epochs", 0.0)
        if epoch_float < 0:
            return 0.0
        warm = self.recipe["kl_warmup_epochs"]
        return 1.0 if warm <= 0 else min(1.0, epoch_float / warm)

    def make_elbo(self):
        """(elbo, path, reason): :class:`~pyro_sparse.elbo.CoreELBO` ("core"), unless the recipe
        sets ``elbo: pyro``, the trainer wraps the model and guide in a way it does not describe
        (:meth:`objective` overridden without :meth:`pruned_weights`), or
        :meth:`CoreELBO.supports <pyro_sparse.elbo.CoreELBO.supports>` names what the model lacks;
        then :class:`~pyro_sparse.elbo.MeanFieldELBO` ("pyro") and why."""
        recipe = self.recipe
        local = recipe["local_reparam"]
        pruned = None
        if recipe.get("elbo", "auto") == "pyro":
            reason = "the recipe sets elbo: pyro"
        elif not issubclass(_defined_in(type(self), "pruned_weights"), _defined_in(type(self), "objective")):
            reason = (f"{type(self).__name__} wraps the model and guide (objective()) without describing it "
                      "(pruned_weights())")
        else:
            pruned = self.pruned_weights()
            reason = CoreELBO.supports(self.network, self.guide)
            if reason is None and pruned is not None and isinstance(self.guide, DeltaGuide):
                reason = "pruned weights need the mean-field guide"
        if reason is None:
            masks, scale = pruned if pruned is not None else (None, None)
            return CoreELBO(local_reparam=local, masks=masks, pruned_scale=scale), "core", None
        return MeanFieldELBO(local_reparam=local), "pyro", reason

    def pruned_weights(self):
        """None, or ``(masks, pruned_scale)`` when :meth:`objective` wraps the model and guide in
        :class:`~pyro_sparse.iterative.PrunedWeights` and nothing else: then the direct
        ELBO applies the same masks (site -> bool tensor, True = kept; a dict the trainer may
        update in place, read at every step). A subclass that overrides :meth:`objective` takes
        the Pyro path unless it overrides this too."""
        return None

    def objective(self):
        """The ``(model, guide)`` callables the ELBO is evaluated on; subclasses may wrap them
        in effect handlers (iterative BMR fixes pruned weights this way)."""
        return self.network.model, self.guide

    def step_loss(self, batch):
        """The negative ELBO estimate of one mini-batch: rows ``idx`` of the training set, or a
        batch of streamed data; either way the data term is scaled by N / batch size and the KL
        by the warm-up weight of this point of the epoch."""
        b, idx, streamed = batch
        self.elbo.kl_weight = self.kl_weight(self.epoch + b / self.steps_per_epoch)
        x, y = streamed if streamed is not None else (self.data.x_train[idx], self.data.y_train[idx])
        model, guide = (self.network, self.guide) if self.elbo_path == "core" else self.objective()
        return self.elbo.differentiable_loss(model, guide, x, y, dataset_size=self.num_train, subsample=idx)

    def trained_parameters(self):
        return self.guide.named_parameters()

    def before_epoch(self):
        self.network.train()  # dropout and batch norms as the user's module trains (evaluation restores eval)

    def epoch_record(self, figures: dict) -> dict:
        record = super().epoch_record(figures)
        record.update({"elbo_per_datum": -figures["loss"] / self.num_train, "kl_weight": self.kl_weight(self.epoch)})
        return record

    @torch.no_grad()
    def reference_loss(self):
        """L0: this trainer's loss estimate per datum at the current parameters with the full KL
        weight, on the first mini-batch of the training set, with a random draw of its own
        (seeded by the recipe's seed; the random-number states of the run are restored after), with
        the network in evaluation mode (so a batch norm's running statistics stay as they are).
        None when the estimate fails."""
        elbo, path, _ = self.make_elbo()  # an ELBO of its own: the trainer's keeps its state
        elbo.kl_weight = 1.0
        x, y = self._first_batch()
        idx = None if self.streaming else torch.arange(len(x), device=self.device)
        devices = [self.device] if self.device.type == "cuda" else []
        model, guide = (self.network, self.guide) if path == "core" else self.objective()
        with torch.random.fork_rng(devices=devices), pyro.validation_enabled(False), evaluation_mode(self.network):
            torch.manual_seed(self.recipe["seed"])
            try:
                loss = elbo.differentiable_loss(model, guide, x, y, dataset_size=self.num_train, subsample=idx)
                value = float(loss) / self.num_train
            except (RuntimeError, ValueError):
                return None
        return value if math.isfinite(value) else None

    def output_width(self) -> int:
        """The network's number of outputs per example, from one run on the first batch at the
        guide's point values."""
        if getattr(self, "_width", None) is None:
            x, _ = self._first_batch()
            with torch.no_grad(), pyro.validation_enabled(False):
                self._width = int(self.network.point_outputs(x[:1], self.guide.median()).shape[-1])
        return self._width

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        """The training state, the guide's and the network's deterministic state (``network``:
        :meth:`~pyro_sparse.network.PyroNetwork.frozen_state`, e.g. batch-norm running statistics;
        present only where the network has some)."""
        state = {**self.training_state(), "guide": self.guide.state_dict()}
        frozen = self.network.frozen_state()
        if frozen:
            state["network"] = frozen
        return state

    def load_state_dict(self, state: dict):
        self.guide.load_state_dict(state["guide"])
        if "network" in state:  # a checkpoint without it (an older one) leaves the module's own values
            self.network.load_frozen_state(state["network"])
        self.load_training_state(state)

    # ------------------------------------------------------------------ pretraining
    def before_fit(self, resume: bool):
        if self.kl_paths:  # start-up: how each site's KL is computed, counted by path and kernel
            counts = {}
            for path in self.kl_paths.values():
                counts[path] = counts.get(path, 0) + 1
            self.log("KL paths: " + "; ".join(f"{n} site{'s' if n > 1 else ''} {path}" for path, n in counts.items()))
        elif self.elbo_path == "pyro":
            self.log(f"objective: Pyro's ELBO ({self.elbo_reason})")
        if not resume and self.epoch == 0 and self.recipe.get("pretrain") and not self.pretrained:
            self.pretrain()
        super().before_fit(resume)

    def pretrain(self) -> dict:
        """Pretrain, then start the posterior there (recipe ``pretrain:``; Molchanov et al. 2017 train
        Sparse VD from a pretrained network): the network's deterministic twin is trained by maximum
        likelihood (Adam on the mean negative log-likelihood, optional weight decay) for
        ``pretrain.epochs`` epochs from the network's starting values, through the library's one
        optimiser loop (:func:`~pyro_sparse.descent.descend`), the Bayesian layers start at
        the trained weights (:meth:`~pyro_sparse.network.PyroNetwork.start_at`) and the guide is set up
        again from them (``reinitialize``): its means there, its scales at their initial values.
        Runs once, before the first epoch; the figures go into ``self.pretrained`` (and
        ``metrics.json`` via :meth:`summary`)."""
        options = self.recipe["pretrain"]
        if not hasattr(self.guide, "reinitialize"):
            raise SpecError(f"pretrain: the {self.recipe['guide']} guide cannot be restarted at pretrained weights; "
                            "use guide meanfield or delta", self.recipe.get("_source"), "pretrain")
        start = time.perf_counter()
        twin = self.network.deterministic(self.network.starting_values()).to(self.device)
        try:
            self.network.twin_values(twin)  # the twin's parameters can be read back as sites
        except ValueError as e:
            raise SpecError(f"pretrain: {e}", self.recipe.get("_source"), "pretrain") from None
        params = [p for p in twin.parameters() if p.requires_grad]
        optimizer = torch.optim.Adam(params, lr=options["lr"], weight_decay=options["weight_decay"])
        generator = torch.Generator().manual_seed(self.recipe["seed"] + 0x5EED)
        batch_size = options["batch_size"] or self.batch_size
        lik = self.network.likelihood

        def loss_of(batch):
            xb, yb = batch
            return -lik.log_likelihood(twin(xb), yb) / len(xb)

        def fault(what, b, loss):
            return NumericalError(f"pretrain: non-finite {what} at step {b + 1} of a pretraining epoch; lower "
                                  f"pretrain.lr (now {options['lr']:g}) or check the data")

        twin.train()
        with pyro.validation_enabled(False):
            for _ in range(options["epochs"]):
                if self.streaming:
                    batches = ((xb.to(self.device), yb.to(self.device)) for xb, yb, *_ in self.data.train)
                else:
                    batches = ((self.data.x_train[idx], self.data.y_train[idx])
                               for idx in index_batches(self.num_train, batch_size, generator, device=self.device))
                descend(loss_of, batches, optimizer, params, fault=fault)
        twin.eval()
        self.network.start_at(self.network.twin_values(twin))
        self.network.load_frozen_state(self.network.twin_frozen_state(twin))  # batch norms trained too
        x, y = self._first_batch()
        self.guide.reinitialize(x, y, dataset_size=self.num_train)
        figures = self.evaluate_model(twin) if not self.streaming or self.data.test is not None else {}
        self.pretrained = {"pretrain_epochs": options["epochs"], "pretrain_seconds": time.perf_counter() - start,
                           **{f"pretrain_{k}": v for k, v in figures.items()}}
        return self.pretrained

    # ------------------------------------------------------------------ the posterior
    def posterior_summary(self):
        """The fitted posterior as a :class:`~pyro_sparse.summary.PosteriorSummary`, what every
        reduction rule reads: here the guide's (:func:`~pyro_sparse.summary.summarize`); a
        Laplace fit gives its Laplace posterior."""
        return summarize(self.network, self.guide)

    def posterior_guide(self):
        """A Pyro guide that draws from the fitted posterior (here the guide itself)."""
        return self.guide

    def predictive(self, num_samples=None, generator=None):
        """``x -> outputs (S, B, ...)``: the posterior predictive with ``num_samples`` draws (default
        the recipe's ``eval_samples``; one for a point estimate), what ``evaluate`` and ``predict``
        read. A Laplace fit gives its linearised predictive instead."""
        samples = 1 if isinstance(self.guide, DeltaGuide) else num_samples or self.recipe["eval_samples"]
        return evaluation.posterior_predictive(self.network, self.guide, samples)

    def evaluate(self, num_samples=None):
        if self.streaming:
            if self.data.test is None:
                return {}
            return evaluate(self.network, self.guide, self.data.test, None, num_samples or self.recipe["eval_samples"])
        args = (self.network, self.guide, self.data.x_test, self.data.y_test,
                num_samples or self.recipe["eval_samples"])
        return evaluate(*args) if self.world == 1 else distributed.on_main(evaluate, *args)

    def test_figures(self):
        if type(self).evaluate is not SVITrainer.evaluate:  # a trainer with its own evaluate says
            return None
        return ("the MAP network (a point estimate)" if isinstance(self.guide, DeltaGuide) else
                f"the posterior predictive, {self.recipe['eval_samples']} draws")
