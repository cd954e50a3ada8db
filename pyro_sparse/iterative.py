r"""Iterative Bayesian model reduction during training (Markovic, Friston & Kiebel 2023).

The schedule: train with SVI for ``warmup_epochs``; then, every ``every`` epochs, summarise
the posterior, compute the evidence for removing each weight (Savage-Dickey, BMR towards
:math:`N(0, g^2)`, or the layer-wise spike-and-slab decision) and prune where the reduced model
wins. A pruned weight *stays* pruned: its prior becomes the reduced prior
:math:`N(0, g_0^2)` with :math:`g_0` ~ 0 (``pruned_scale``), and its posterior the reduced
posterior, which for :math:`g_0 \to 0` is the same :math:`N(0, g_0^2)`; the next SVI block then
trains the remaining weights under the reduced model.

How pruned weights are held fixed. :class:`PrunedWeights` is an effect handler that, for every
sample site with a mask, replaces the Gaussian ``N(loc, scale)`` of both the model (the prior)
and the guide (the posterior) by

.. math::

    N\big(m \odot \mathrm{loc},\; m \odot \mathrm{scale} + (1 - m)\, g_0\big)

(``torch.where``, so nothing flows back to the guide's parameters of pruned weights). The
KL of a pruned element is then :math:`KL(N(0, g_0^2) \| N(0, g_0^2)) = 0` exactly, its value or
pre-activation contribution has mean 0 and variance :math:`g_0^2 x^2` (negligible), and its
gradient is exactly 0. At a pruning step the guide's own parameters of the newly pruned weights
are set to the reduced posterior (loc 0, scale :math:`g_0`) and their optimiser state is
zeroed, so with a zero gradient Adam leaves them where they are. The handler wraps the model
and the guide *callables* (``SVITrainer.objective``), so it acts before the local
reparameterisation handler records the guide's Gaussian. The ELBO core
(:class:`~pyro_sparse.elbo.CoreELBO`, told by :meth:`IterativeBMRTrainer.pruned_weights`) reads the
same masks dict and reduces the same elements without Pyro: same loss, draws and gradients.

Recipe (``inference/svi_bmr_iterative.yaml``)::

    method: svi_bmr
    reduction: {method: savage-dickey, warmup_epochs: 20, every: 5, pruned_scale: 1.0e-6}
"""

from __future__ import annotations

import math

import torch
from pyro.poutine.messenger import Messenger

from .errors import SpecError
from .fitting import SVITrainer, evaluate
from .guides import LOG_SCALE_MIN
from .kl import reduced_normal
from .reduction.rules import DEFAULT_SHRINK, reduce
from .registry import RULES
from .schema import Field, validate

__all__ = ["PrunedWeights", "IterativeBMRTrainer", "ITERATIVE_FIELDS"]

#: the recipe's ``reduction`` section for ``method: svi_bmr``
ITERATIVE_FIELDS = {
    "method": Field("choice", "savage-dickey", choices=lambda: evidence_rules(),
                    doc="the rule of each pruning step: a registered rule that decides by the evidence"),
    "warmup_epochs": Field("int", 10, nonneg=True, doc="SVI epochs before the first pruning step"),
    "every": Field("int", 5, positive=True, doc="SVI epochs between pruning steps"),
    "threshold": Field("float", 0.0, doc="prune where delta F > threshold (bmr, savage-dickey)"),
    "reduced_scale": Field("float", None, positive=True, allow_none=True,
                           doc="bmr: standard deviation of the reduced prior (default shrink * prior scale)"),
    "shrink": Field("float", DEFAULT_SHRINK, positive=True, doc="bmr: reduced prior scale / prior scale"),
    "pruned_scale": Field("float", math.exp(LOG_SCALE_MIN), positive=True,
                          doc="prior and posterior standard deviation of a pruned weight (~0)"),
    "last_step": Field("bool", False, doc="also prune after the last epoch (no retraining after it)"),
}


def evidence_rules() -> tuple:
    """The registered rules that decide by the evidence (``Rule.evidence``): what a pruning step
    may use (the built-ins ``bmr``, ``savage-dickey``, ``spike-slab``, and any registered since)."""
    return tuple(name for name, r in RULES.items() if r.evidence)


class PrunedWeights(Messenger):
    """Effect handler fixing masked elements of Gaussian sample sites at ``N(0, scale^2)``.

    ``masks``: site name -> bool tensor (True = keep), read at every site, so updating the dict
    in place changes what later runs see. Apply it to the model and the guide callables.
    """

    def __init__(self, masks: dict, scale: float):
        super().__init__()
        self.masks = masks
        self.scale = float(scale)

    def _pyro_sample(self, msg):
        mask = self.masks.get(msg["name"])
        if mask is None or msg["is_observed"]:
            return
        msg["fn"] = reduced_normal(msg["fn"], mask, self.scale, msg["name"])


class IterativeBMRTrainer(SVITrainer):
    """SVI with pruning steps: the iterative BMR schedule of Markovic et al. (2023).

    Reads the recipe's ``reduction`` section (:data:`ITERATIVE_FIELDS`). The masks are part of
    the checkpoint, so ``resume`` continues with the same pruned weights. Each pruning step is
    logged in ``bmr_history`` and the current fraction of weights removed is reported as
    ``bmr_sparsity`` with every evaluation.
    """

    accepts_batches = False  # it evaluates on the held-out tensors
    spec_name = "svi_bmr"
    #: its ``reduction:`` section says how to prune during training
    reduction_fields = ITERATIVE_FIELDS

    def __init__(self, network, guide, dataset, recipe, out_dir=None, progress=True):
        self.config = validate(ITERATIVE_FIELDS, recipe.get("reduction") or {}, "reduction", recipe.get("_source"))
        # before SVITrainer.__init__: make_elbo reads the masks (pruned_weights)
        self.masks: dict[str, torch.Tensor] = {}
        self.bmr_history: list[dict] = []
        self.pruner = PrunedWeights(self.masks, self.config["pruned_scale"])
        self._model = self.pruner(network.model)
        self._guide = self.pruner(guide)
        super().__init__(network, guide, dataset, recipe, out_dir, progress)
        if not (hasattr(guide, "locs") and hasattr(guide, "log_scales")):
            raise SpecError(f"iterative BMR needs the mean-field guide (locs and log-scales), got "
                            f"{type(guide).__name__}", recipe.get("_source"), "guide")

    # ------------------------------------------------------------------ hooks
    def objective(self):
        return self._model, self._guide

    def pruned_weights(self):
        """The wrapping of :meth:`objective` as masks for the ELBO core: ``(self.masks,
        pruned_scale)``, the same dict the handler reads (updated in place)."""
        return self.masks, self.config["pruned_scale"]

    def evaluate(self, num_samples=None):
        out = evaluate(self.network, self._guide, self.data.x_test, self.data.y_test,
                       num_samples or self.recipe["eval_samples"])
        out["bmr_sparsity"] = self.sparsity()
        return out

    def after_epoch(self) -> dict:
        """The pruning step when due: after epoch ``warmup_epochs`` and every ``every`` epochs after
        it (not after the last epoch unless ``last_step``), timed as training."""
        figures = super().after_epoch()
        epoch = self.epoch + 1  # the epoch just trained
        cfg, last = self.config, self.recipe["epochs"]
        due = epoch >= cfg["warmup_epochs"] and (epoch - cfg["warmup_epochs"]) % cfg["every"] == 0
        if due and (epoch < last or cfg["last_step"]):
            figures["bmr_removed"] = self.bmr_step(epoch)["removed"]
        return figures

    def state_dict(self):
        state = super().state_dict()
        state["bmr"] = {"masks": {k: v.clone() for k, v in self.masks.items()}, "history": list(self.bmr_history)}
        return state

    def load_state_dict(self, state):
        super().load_state_dict(state)
        bmr = state.get("bmr", {})
        self.masks.clear()  # in place: the handler holds this dict
        self.masks.update({k: v.to(self.device) for k, v in bmr.get("masks", {}).items()})
        self.bmr_history = list(bmr.get("history", []))

    def summary(self) -> dict:
        out = super().summary()
        out.update({"bmr_sparsity": self.sparsity(), "bmr_steps": len(self.bmr_history)})
        return out

    # ------------------------------------------------------------------ pruning
    def sparsity(self) -> float:
        """Fraction of weights (biases excluded) pruned so far."""
        total = sum(math.prod(layer.param_shapes()[param]) for layer, param, _ in self.network.param_sites().values()
                    if param != "bias")
        pruned = sum(int((~m).sum()) for m in self.masks.values())
        return pruned / total if total else 0.0

    @torch.no_grad()
    def bmr_step(self, epoch=None) -> dict:
        """Prune where the reduced model has more evidence; pruned weights stay pruned."""
        from .summary import summarize

        cfg = self.config
        summary = summarize(self.network, self.guide)
        options = {}
        if cfg["method"] != "spike-slab":
            options["threshold"] = cfg["threshold"]
        if cfg["method"] != "savage-dickey":
            options.update(reduced_scale=cfg["reduced_scale"], shrink=cfg["shrink"])
        decision = reduce(summary, cfg["method"], **options)
        newly = 0
        for name in decision.weight_sites():
            old = self.masks.get(name)
            new = decision.masks[name] if old is None else old & decision.masks[name]
            fresh = ~new if old is None else old & ~new
            if bool(fresh.any()):
                self._fix(name, fresh)
                newly += int(fresh.sum())
            self.masks[name] = new
        record = {"epoch": epoch if epoch is not None else self.epoch, "removed": newly,
                  "sparsity": self.sparsity()}
        self.bmr_history.append(record)
        return record

    def _fix(self, name, fresh):
        """Set the guide's parameters of newly pruned weights to the reduced posterior and zero
        their optimiser state."""
        key = name.replace(".", "__")
        loc, log_scale = self.guide.locs[key], self.guide.log_scales[key]
        loc.data[fresh] = 0.0
        log_scale.data[fresh] = math.log(self.config["pruned_scale"])
        for param in (loc, log_scale):
            for value in self.optimizer.state.get(param, {}).values():
                if torch.is_tensor(value) and value.shape == param.shape:
                    value[fresh] = 0

