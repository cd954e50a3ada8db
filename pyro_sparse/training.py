"""The one training loop: the epochs of every fit, with evaluation, checkpoints and recovery.

:class:`Trainer` owns the state of one run (network, data, optimiser, schedule, random
generators, history) and runs its epochs; what differs between methods are hooks:

* :meth:`Trainer.setup` builds the method's own state (SVI: the guide, the ELBO and its
  optimiser; SpaM: the deterministic twin, the prior precisions and two optimisers);
* :meth:`Trainer.step_loss` is the loss of one mini-batch, :meth:`Trainer.step_parameters` what
  the optimiser updates; an epoch takes its steps through the library's one optimiser loop,
  :func:`~pyro_sparse.descent.descend`, over :meth:`Trainer.epoch_batches`;
* :meth:`Trainer.after_epoch` is the work between epochs (SpaM's marginal-likelihood step,
  iterative BMR's pruning step), timed as training;
* :meth:`Trainer.state_dict` / :meth:`Trainer.load_state_dict` add the method's state to the
  checkpoint, :meth:`Trainer.evaluate` gives its held-out figures.

The subclasses are :class:`~pyro_sparse.fitting.SVITrainer` (``method: svi``),
:class:`~pyro_sparse.laplace.trainer.LaplaceTrainer` (``method: laplace``) and
:class:`~pyro_sparse.iterative.IterativeBMRTrainer` (``method: svi_bmr``).

Inside a ``torch.distributed`` process group (``torchrun``) the same loop runs data-parallel:
each rank takes its shard of every epoch's permutation, ``batch_size`` is the global batch
(``ceil(batch_size / W)`` rows per rank), gradients are averaged over the ranks after
``backward`` (which makes the step the single-process step on the union batch; see
:mod:`pyro_sparse.distributed`), evaluation runs on rank 0 and only rank 0 writes files.

Numerical faults. Every step checks that the loss and the gradient norm are finite *before*
the optimiser applies the update (:func:`~pyro_sparse.descent.descend`: on the CPU at once, on
an accelerator through a device flag read with the epoch's loss). Either way the fault is
reported with its global step, epoch and batch; the trainer restores the last good checkpoint
(from disk when this trainer has written or resumed one, else from memory), multiplies the
learning rate by ``nan_lr_factor`` (recipe, default 0.5) and repeats the epoch with a fresh
Monte Carlo draw. After ``nan_retries`` (default 3) consecutive failed attempts it stops with
:class:`NumericalError`; when the data are far from unit scale (``|x|`` or a regression target
above :data:`DATA_MAGNITUDE`) its advice points at them rather than at the learning rate.

Divergence that stays finite is a fault too (recipe ``divergence_factor`` F, default 1000;
``null`` turns it off). A diverging run does not always produce a NaN: with a learning rate of
1e6 the weights jump to ~1e6 after one step and the loss per datum reaches 1e20 while every
number stays finite. The reference is L0, the loss per datum at the run's starting point
(:meth:`Trainer.reference_loss`; SVI: the negative-ELBO estimate with the full KL weight,
computed once on the first mini-batch with its own random draw, kept in the checkpoint). A step
whose loss per datum exceeds ``L0 + F * max(|L0|, 1)`` is refused before its update like a NaN
step. On held-out data a classifier's NLL per example above ``F * log K`` (K classes; log K is
the NLL of a uniform guess) counts the same way, as does a non-finite held-out figure. Trainers
without a reference (method laplace) have only the held-out check.
"""

from __future__ import annotations

import copy
import json
import math
import os
import sys
import time
import warnings

import pyro
import torch
from tqdm.auto import tqdm

from . import distributed, evaluation
from .checkpoint import load_safe, save_atomic, write_text_atomic
from .data import Batches, Dataset, as_batches, first_batch, index_batches
from .descent import NonFiniteStep, descend
from .errors import CheckpointError, DataError, PyroSparseError, PyroSparseWarning, SpecError
from .recipe import RECIPE_FIELDS, check_device, make_scheduler, parse_recipe
from .rundir import CHECKPOINT

__all__ = ["Trainer", "NumericalError", "NonFiniteStep", "DATA_MAGNITUDE", "as_training_data", "check_compatible",
           "apply_target_transform"]

#: data magnitude (largest |x|, or |y| of raw regression targets) above which a numerical fault's
#: advice points at the data first: float32 overflows at 3.4e38, and the local reparameterisation
#: squares the inputs, so inputs far from unit scale overflow long before the learning rate matters
DATA_MAGNITUDE = 1e4


class NumericalError(PyroSparseError):
    """Training produced NaN/inf and did not recover within the allowed retries."""


def as_training_data(data, batch_size=64, seed=0):
    """A :class:`~pyro_sparse.data.Dataset` as it is; a ``torch.utils.data.Dataset``,
    ``DataLoader`` or :class:`~pyro_sparse.data.Batches` as :class:`~pyro_sparse.data.Batches`
    (:func:`~pyro_sparse.data.as_batches`, with the recipe's batch size and seed)."""
    if isinstance(data, (Dataset, Batches)):
        return data
    from torch.utils.data import DataLoader
    from torch.utils.data import Dataset as TorchDataset

    if isinstance(data, (DataLoader, TorchDataset)):
        return as_batches(data, batch_size=batch_size, seed=seed)
    raise DataError(f"SVITrainer: dataset must be a pyro_sparse.data.Dataset, got {type(data).__name__} (or data in "
                    "batches: a torch Dataset, a DataLoader, pyro_sparse.data.Batches)")


def check_compatible(network, dataset):
    """Raise :class:`DataError` if ``dataset`` cannot feed ``network`` (task, input size)."""
    lik = getattr(network, "likelihood", None)
    task = getattr(lik, "task", None)
    kind = getattr(lik, "spec_name", type(lik).__name__)
    if isinstance(dataset, Batches):  # what batches are for is not known beyond their shape
        shape = getattr(network, "input_shape", None)
        if shape is not None and math.prod(shape) != math.prod(dataset.feature_shape):
            raise DataError(f"{dataset.name}: examples have shape {list(dataset.feature_shape)} but the network "
                            f"takes input_shape {list(shape)}")
        return
    if (task == "sequence") != (dataset.task == "sequence"):
        raise DataError(f"{dataset.name}: the {kind} likelihood {'needs' if task == 'sequence' else 'cannot take'} "
                        "sequence data (a text corpus, targets at every position); a language model uses "
                        "likelihood: sequence_categorical")
    if task == "regression" and dataset.task != "regression":
        raise DataError(f"{dataset.name}: the {kind} likelihood needs real-valued targets but the data have "
                        f"class labels; use likelihood: categorical (or bernoulli), or for a data file read its "
                        f"whole numbers as real values (spec: data: {{task: regression}}; load_dataset(task=...))")
    if task in ("classification", "binary") and dataset.task != "classification":
        raise DataError(f"{dataset.name}: the {kind} likelihood needs class labels but the data have "
                        f"real-valued targets; use likelihood: gaussian, or for a data file read its targets "
                        f"as labels (spec: data: {{task: classification}}; load_dataset(task=...))")
    if task == "binary" and dataset.num_outputs > 2:
        raise DataError(f"{dataset.name}: the bernoulli likelihood needs labels 0/1 but the data have "
                        f"{dataset.num_outputs} classes; use likelihood: categorical")
    shape = getattr(network, "input_shape", None)
    if shape is not None and math.prod(shape) != math.prod(dataset.feature_shape):
        raise DataError(f"{dataset.name}: examples have shape {list(dataset.feature_shape)} but the network "
                        f"takes input_shape {list(shape)}")


def apply_target_transform(network, dataset):
    """Hand ``dataset.extras["target_transform"]`` (standardised regression targets, see
    :func:`~pyro_sparse.data.record_target_transform`) to the network's likelihood, or clear a
    previous one: the likelihood then fits the standardised targets and reports in data units."""
    transform = dataset.extras.get("target_transform")
    lik = network.likelihood
    if hasattr(lik, "set_target_transform"):
        lik.set_target_transform(transform)
    elif transform is not None:
        kind = getattr(lik, "spec_name", type(lik).__name__)
        raise DataError(f"{dataset.name}: standardised targets (data: {{targets: standardize}}) need the gaussian "
                        f"likelihood, not {kind}")


def _as_recipe(recipe) -> dict:
    """A parsed recipe: plain mappings from the Python API are validated like a YAML file."""
    if not isinstance(recipe, dict):
        raise SpecError(f"expected a recipe mapping (see parse_recipe), got {recipe!r}", None, "recipe")
    if all(key in recipe for key in RECIPE_FIELDS):
        return recipe
    return parse_recipe(recipe, "<recipe>")


class _EpochLines:
    """Progress for a log file: one line per epoch on stderr (what a tqdm bar would redraw)."""

    def __init__(self, total, initial):
        self.total, self.n, self.postfix, self.start = total, initial, {}, time.perf_counter()

    def set_postfix(self, values):
        self.postfix = dict(values)

    def update(self, n=1):
        self.n += n
        figures = "".join(f"  {k} {v}" for k, v in self.postfix.items())
        print(f"fit: epoch {self.n}/{self.total}{figures}  ({time.perf_counter() - self.start:.1f} s)",
              file=sys.stderr, flush=True)

    def close(self):
        pass


def _progress(show, total, initial):
    """A tqdm bar on a terminal; one line per epoch when stderr is a file or a pipe (a bar's
    redraws would flood a log); nothing when ``show`` is false or the environment variable
    ``PYRO_SPARSE_NO_PROGRESS`` is set to a non-empty value other than 0."""
    if not show or _quiet():
        return tqdm(total=total, initial=initial, disable=True)
    if getattr(sys.stderr, "isatty", lambda: False)():
        return tqdm(total=total, initial=initial, desc="fit", unit="epoch", dynamic_ncols=True)
    return _EpochLines(total, initial)


def _quiet() -> bool:
    """Whether ``PYRO_SPARSE_NO_PROGRESS`` silences progress and start-up lines."""
    return os.environ.get("PYRO_SPARSE_NO_PROGRESS", "") not in ("", "0")


class Trainer:
    """The epochs of a fit (see the module docstring): the loop, evaluation, checkpoints and
    recovery; a subclass gives the method.

    Args:
        network, guide: the model and its (not yet set up) guide.
        dataset: a :class:`~pyro_sparse.data.Dataset` (or data in batches where the method takes them).
        recipe: a parsed inference recipe (:func:`~pyro_sparse.recipe.parse_recipe`).
        out_dir: where ``metrics.jsonl`` and the checkpoint go (``None``: nowhere).
        progress: show progress: a tqdm bar on a terminal, one line per epoch on stderr otherwise.
    """

    #: the recipe's ``method`` this trainer fits, and the extra recipe sections it reads
    spec_name: str | None = None
    recipe_sections: dict = {}
    #: whether it fits data that arrive in batches (:class:`~pyro_sparse.data.Batches`, a DataLoader)
    accepts_batches = False
    #: whether a recipe of 0 epochs is a fit (the post-hoc Laplace posterior)
    allows_no_epochs = False
    #: whether it fits standardised regression targets (the likelihood reports in data units)
    fits_standardised_targets = True
    #: L0, the loss per datum at the run's start (see the module docstring); None without one
    loss_reference = None
    #: which ELBO implementation the steps use: "core" or "pyro"; None for other objectives
    elbo_path = None
    pretrained = None
    #: the output directory existed when fitting started or this trainer created it: if it
    #: disappears, saving stops the fit instead of recreating a directory with a checkpoint alone
    _watch_out_dir = False

    def __init__(self, network, guide, dataset, recipe, out_dir=None, progress=True):
        recipe = _as_recipe(recipe)
        if recipe["epochs"] < 1 and not self.allows_no_epochs:
            raise SpecError(f"method {recipe.get('method', 'svi')} trains for at least one epoch, got 0 (epochs: 0 is "
                            "the post-hoc Laplace posterior of method laplace)", recipe.get("_source") or "<recipe>",
                            "epochs")
        dataset = as_training_data(dataset, recipe["batch_size"], recipe["seed"])
        if isinstance(dataset, Batches) and not self.accepts_batches:
            raise DataError(f"{dataset.name}: data in batches (a DataLoader) are fitted by method svi; "
                            f"{type(self).__name__} needs a pyro_sparse.data.Dataset of tensors")
        for name, obj in (("network", network), ("guide", guide)):
            if not (isinstance(obj, torch.nn.Module) and callable(getattr(obj, "setup" if name == "guide"
                                                                            else "model", None))):
                raise SpecError(f"expected a pyro_sparse {name}, got {type(obj).__name__}", None,
                                f"{type(self).__name__}.{name}")
        if out_dir is not None and not isinstance(out_dir, (str, os.PathLike)):
            raise SpecError(f"expected a directory path or None, got {out_dir!r}", None,
                            f"{type(self).__name__}.out_dir")
        check_compatible(network, dataset)
        if dataset.extras.get("target_transform") and not self.fits_standardised_targets:
            raise SpecError(
                f"standardised targets (data: {{targets: standardize}} in the model spec) are fitted by "
                f"the SVI trainers (method svi, svi_bmr); method {recipe.get('method')!r} fits the raw "
                "targets: remove it",
                recipe.get("_source"),
                "method",
            )
        apply_target_transform(network, dataset)
        self.network, self.guide, self.data, self.recipe = network, guide, dataset, recipe
        self.out_dir, self.progress = (os.fspath(out_dir) if out_dir is not None else None), progress
        self._place(recipe, progress)
        self.generator = torch.Generator().manual_seed(recipe["seed"])
        self.epoch, self.steps, self.train_seconds, self.train_cpu_seconds = 0, 0, 0.0, 0.0
        self.history: list[dict] = []
        self.recoveries: list[dict] = []  # one entry per numerical fault survived
        #: check finiteness on the host at every step (CPU); else a device flag read once per epoch
        self.check_each_step = self.device.type == "cpu"
        self._good_state = None  # in-memory copy of the last good state, while none is on disk
        self._on_disk = False  # this trainer wrote or resumed checkpoint.pt: restore from there
        self._resumed_from_prev = False  # checkpoint.pt was corrupt: do not rotate it into .prev
        self._last_fault = None
        self.setup()
        self.scheduler = make_scheduler(self.optimizer, recipe["schedule"], max(recipe["epochs"], 1))

    # ------------------------------------------------------------------ the method's hooks
    def setup(self):
        """Build the method's state; must set ``self.optimizer`` (the scheduler wraps it)."""
        raise NotImplementedError

    def step_loss(self, batch):
        """The loss of one mini-batch (a scalar tensor whose gradient the step follows); ``batch`` is
        an item of :meth:`epoch_batches`."""
        raise NotImplementedError

    def step_parameters(self) -> list:
        """The parameters the optimiser updates (zeroed, measured and clipped by the loop)."""
        return [p for group in self.optimizer.param_groups for p in group["params"]]

    def trained_parameters(self):
        """``(name, parameter)`` checked for finite values after each epoch."""
        raise NotImplementedError

    def before_epoch(self):
        """Work before an epoch's steps (modes of the network, ...)."""

    def after_epoch(self) -> dict:
        """Work between epochs, timed as training (a marglik step, a pruning step); its figures go
        into the epoch's record."""
        return {}

    def reference_loss(self):
        """L0 (see the module docstring), or None."""
        return None

    def evaluate(self, num_samples=None) -> dict:
        raise NotImplementedError

    def log(self, line: str):
        """One start-up line on stderr (``fit: ...``), where progress is shown (rank 0, not
        silenced by ``PYRO_SPARSE_NO_PROGRESS``)."""
        if self.progress and not _quiet() and distributed.is_main_process():
            print(f"fit: {line}", file=sys.stderr, flush=True)

    # ------------------------------------------------------------------ placement
    def _place(self, recipe, progress):
        """Device, rank and threads; data and network moved to the device; the mini-batch plan:
        ``batch_size`` is the global batch, split over the ranks of a process group."""
        self.device = check_device(recipe["device"])
        self.world, self.rank = distributed.world_size(), distributed.rank()
        self.streaming = isinstance(self.data, Batches)
        if self.world > 1:
            if self.streaming:
                raise DataError(f"{self.data.name}: data in batches (a DataLoader) are fitted in one process; "
                                "data-parallel fits need a pyro_sparse.data.Dataset (or a DistributedSampler "
                                "of your own in a single-process fit per shard)")
            self.device = distributed.rank_device(self.device)
            self.progress = progress and distributed.is_main_process()
        if recipe.get("num_threads"):  # the process's torch threads (recipe num_threads, default 1; fit --threads)
            torch.set_num_threads(recipe["num_threads"])
        self.data.to(self.device)
        self.network.to(self.device)
        if self.streaming:
            self.num_train = self.num_local = self.data.num_train
            self.batch_size = recipe["batch_size"]
            self.steps_per_epoch = self.data.batches_per_epoch(self.batch_size)
            return
        self.num_train = len(self.data.x_train)
        # rows per epoch and per step on this rank (all of them when not distributed)
        self.num_local = math.ceil(self.num_train / self.world)
        self.batch_size = min(math.ceil(recipe["batch_size"] / self.world), self.num_local)
        self.steps_per_epoch = math.ceil(self.num_local / self.batch_size)

    def _first_batch(self):
        """``(x, y)`` of the first mini-batch (for setting up a guide and the reference loss)."""
        if self.streaming:
            x, y = first_batch(self.data.train, self.data.name)
            return x.to(self.device), y.to(self.device)
        return self.data.x_train[: self.batch_size], self.data.y_train[: self.batch_size]

    # ------------------------------------------------------------------ state
    def training_state(self) -> dict:
        """What every trainer checkpoints besides its model: optimiser, schedule, counters,
        random states and history (plain tensors and containers, loadable with weights_only)."""
        return {"format": 1, "epoch": self.epoch, "steps": self.steps, "train_seconds": self.train_seconds,
                "train_cpu_seconds": self.train_cpu_seconds,
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict() if self.scheduler else None,
                "rng_torch": torch.get_rng_state(), "rng_generator": self.generator.get_state(),
                "rng_cuda": torch.cuda.get_rng_state_all() if self.device.type == "cuda" else [],
                "history": self.history, "recoveries": self.recoveries, "loss_reference": self.loss_reference,
                "pretrained": self.pretrained}

    def load_training_state(self, state: dict):
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scheduler and state["scheduler"]:
            self.scheduler.load_state_dict(state["scheduler"])
        self.epoch, self.steps, self.train_seconds = state["epoch"], state["steps"], state["train_seconds"]
        if "train_cpu_seconds" in state:  # older checkpoints have none
            self.train_cpu_seconds = state["train_cpu_seconds"]
        torch.set_rng_state(state["rng_torch"])
        self.generator.set_state(state["rng_generator"])
        if state.get("rng_cuda"):
            torch.cuda.set_rng_state_all(state["rng_cuda"])
        self.history = list(state["history"])
        self.recoveries = list(state.get("recoveries", []))
        self.loss_reference = state.get("loss_reference")
        self.pretrained = state.get("pretrained")

    def state_dict(self) -> dict:
        """The checkpoint: :meth:`training_state` plus the method's own state (subclasses)."""
        return self.training_state()

    def load_state_dict(self, state: dict):
        self.load_training_state(state)

    def checkpoint_path(self):
        return os.path.join(self.out_dir, CHECKPOINT) if self.out_dir else None

    def _write_history(self):
        write_text_atomic(os.path.join(self.out_dir, "metrics.jsonl"),
                          "".join(json.dumps(h, sort_keys=True) + "\n" for h in self.history))

    def save(self):
        if self.out_dir and distributed.is_main_process():
            if self._watch_out_dir and not os.path.isdir(self.out_dir):
                raise PyroSparseError(f"{self.out_dir}: the run directory disappeared during the fit (after epoch "
                                      f"{self.epoch}); stopping instead of writing a checkpoint without the run's "
                                      "other files. Fit again into a new --out")
            save_atomic(self.state_dict(), self.checkpoint_path(), keep_previous=not self._resumed_from_prev)
            self._watch_out_dir = True
            self._resumed_from_prev, self._on_disk, self._good_state = False, True, None
            self._write_history()

    def _load_checked(self, path):
        """Load and apply one checkpoint file; CheckpointError if unreadable or for another model."""
        state = load_safe(path, map_location=self.device)
        required = ("epoch", "steps", "history")  # the rest is the trainer's load_state_dict's business
        if not isinstance(state, dict) or state.get("format") != 1 or any(k not in state for k in required):
            raise CheckpointError(f"{path}: not a pyro-sparse training checkpoint (format 1)")
        try:
            self.load_state_dict(state)
        except (KeyError, RuntimeError, ValueError, TypeError, IndexError) as e:
            msg = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise CheckpointError(f"{path}: does not match this model and recipe ({msg})") from None
        return state

    def resume(self):
        """Continue from ``out_dir``'s checkpoint; if it is corrupt, from ``checkpoint.pt.prev``
        (with a :class:`~pyro_sparse.errors.PyroSparseWarning`). Raises CheckpointError when
        neither can be loaded safely."""
        path = self.checkpoint_path()
        if path is None:
            raise PyroSparseError("resume needs the trainer's out_dir")
        try:
            self._load_checked(path)
            self._resumed_from_prev = False
        except PyroSparseError as first:
            prev = path + ".prev"
            if not os.path.exists(prev):
                raise
            try:
                state = self._load_checked(prev)
            except PyroSparseError as second:
                raise CheckpointError(f"{first}; the previous checkpoint is unusable too: {second}") from None
            warnings.warn(f"{first}; continuing from the previous good checkpoint {prev} "
                          f"(epoch {state['epoch']})", PyroSparseWarning, stacklevel=2)
            self._resumed_from_prev = True
        self._on_disk, self._good_state = True, None

    # ------------------------------------------------------------------ faults
    def _fault(self, what, b):
        return NonFiniteStep(what, self.steps + b + 1, self.epoch + 1, b + 1, self.steps_per_epoch)

    def _nonfinite_what(self, loss):
        """Name what went non-finite at this step (only called once a fault is known)."""
        if not torch.isfinite(loss).all():
            return "loss"
        for name, p in self.trained_parameters():
            if p.grad is not None and not torch.isfinite(p.grad).all():
                return f"gradient of {name}"
        return "gradient"

    @property
    def _loss_limit(self):
        """The largest acceptable loss of a step (a full-data estimate, so N times the limit per
        datum ``L0 + F max(|L0|, 1)``), or None without a reference or with ``divergence_factor: null``."""
        factor, ref = self.recipe.get("divergence_factor"), self.loss_reference
        if factor is None or ref is None or not math.isfinite(ref):
            return None
        return (ref + factor * max(abs(ref), 1.0)) * self.num_train

    def _divergent(self, loss, b, what="loss"):
        """The fault of a step (or epoch) whose loss is finite but above the divergence limit."""
        per_datum, limit = loss / self.num_train, self._loss_limit / self.num_train
        where = (f"at step {self.steps + b + 1} (epoch {self.epoch + 1}, batch {b + 1} of {self.steps_per_epoch})"
                 if what == "loss" else f"in epoch {self.epoch + 1}")
        return NonFiniteStep("loss above the divergence limit", self.steps + b + 1, self.epoch + 1, b + 1,
                             self.steps_per_epoch,
                             f"{what} {per_datum:.3g} per datum {where} exceeds the divergence limit {limit:.3g} "
                             f"(divergence_factor {self.recipe['divergence_factor']:g} x max(|L0|, 1) above the "
                             f"starting loss L0 = {self.loss_reference:.3g} per datum)")

    def _held_out_fault(self, record):
        """A fault for a non-finite held-out figure, or a classifier's held-out NLL per example
        above ``divergence_factor * log K`` (log K: the NLL of a uniform guess over K classes);
        None otherwise."""
        figures = {k: record[k] for k in ("test_nll", "test_rmse", "test_accuracy") if k in record}
        at = (self.steps, self.epoch, self.steps_per_epoch, self.steps_per_epoch)
        bad = [k for k, v in figures.items() if not math.isfinite(v)]
        if bad:
            return NonFiniteStep(f"held-out {bad[0]}", *at,
                                 text=f"non-finite held-out {bad[0]} ({figures[bad[0]]}) after epoch {self.epoch}")
        factor = self.recipe.get("divergence_factor")
        task = getattr(self.network.likelihood, "task", None)
        if factor is None or "test_nll" not in figures or task not in ("classification", "binary", "sequence"):
            return None
        classes = max(int(self.data.num_outputs or self.output_width()), 2)
        limit = factor * math.log(classes)
        if figures["test_nll"] <= limit:
            return None
        return NonFiniteStep("held-out NLL above the divergence limit", *at,
                             text=f"held-out NLL {figures['test_nll']:.3g} per example after epoch {self.epoch} "
                                  f"exceeds the divergence limit {limit:.3g} (divergence_factor "
                                  f"{factor:g} x log {classes}, the NLL of a uniform guess)")

    def output_width(self) -> int:
        """The network's number of outputs per example (the classes of streamed data, whose count
        is not given)."""
        raise NotImplementedError

    def _data_advice(self):
        """Advice naming the data when they are far from unit scale (checked once, cached), else None."""
        if not hasattr(self, "_data_note"):
            self._data_note = None
            if self.streaming:
                return None
            parts = [("inputs", "x", self.data.x_train, "data: {inputs: standardize}")]
            lik = self.network.likelihood
            if self.data.task == "regression" and getattr(lik, "target_transform", None) is None:
                parts.append(("regression targets", "y", self.data.y_train, "data: {targets: standardize}"))
            for what, sym, t, fix in parts:
                if not t.is_floating_point() or t.numel() == 0:
                    continue
                big = t.detach().abs().reshape(len(t), -1).amax(0)
                top = float(big.max())
                if top > DATA_MAGNITUDE:
                    column = int(big.argmax())
                    self._data_note = (f"the {what} reach |{sym}| = {top:.3g} ({sym}_train column {column}): data this "
                                       f"far from unit scale overflow float32 in the network's products and squares "
                                       f"before the learning rate matters; rescale them (the model spec's {fix}) "
                                       f"and check the data file")
                    break
        return self._data_note

    # ------------------------------------------------------------------ one epoch
    def epoch_batches(self):
        """``(b, idx, None)`` per mini-batch of a random permutation of the training rows
        (:func:`~pyro_sparse.data.index_batches`; data-parallel, this rank's shard), or
        ``(b, None, (x, y))`` per batch of streamed data (in the order the loader yields; the
        epoch's step count follows the loader, and ``steps_per_epoch`` is updated to it)."""
        if self.streaming:
            n = 0
            for n, item in enumerate(self.data.train, 1):
                yield n - 1, None, (item[0].to(self.device), item[1].to(self.device))
            self.steps_per_epoch = n
            return
        shard = distributed.shard if self.world > 1 else None  # the same permutation on every rank: r::W
        for b, idx in enumerate(
            index_batches(self.num_train, self.batch_size, self.generator, self.steps_per_epoch, self.device, shard)
        ):
            yield b, idx, None

    def _step_options(self, limit=None) -> dict:
        """How this trainer's steps go through :func:`~pyro_sparse.descent.descend`: clipping, the
        finiteness check on the host (CPU) or on the device, gradients averaged over the ranks
        (data-parallel: the averaged gradient, so its norm, is the same on every rank while the
        local loss is not, so only the norm decides), and the faults named by step and epoch."""
        averaged = (lambda: distributed.average_gradients(self.step_parameters())) if self.world > 1 else None
        return {
            "clip": self.recipe["grad_clip"],
            "check_host": self.check_each_step,
            "check_loss": self.world == 1,
            "limit": limit,
            "after_backward": averaged,
            "divergent": self._divergent,
            "fault": lambda what, b, loss: self._fault(self._nonfinite_what(loss), b),
        }

    def step(self, batch) -> torch.Tensor:
        """One optimisation step on ``batch`` (an item of :meth:`epoch_batches`, e.g. ``(0, idx,
        None)``), as an epoch takes it; returns its (detached) loss."""
        limit = self._loss_limit if self.world == 1 else None
        return descend(self.step_loss, [batch], self.optimizer, self.step_parameters(), **self._step_options(limit))[0]

    def train_epoch(self) -> dict:
        """One pass over the training data in a random order through the one optimiser loop
        (:func:`~pyro_sparse.descent.descend`), then :meth:`after_epoch`; returns the epoch's
        figures. Raises :class:`~pyro_sparse.descent.NonFiniteStep` naming the first faulty step."""
        start, cpu = time.perf_counter(), time.process_time()
        self.before_epoch()
        limit = self._loss_limit if self.world == 1 else None
        total, first_bad = descend(
            self.step_loss, self.epoch_batches(), self.optimizer, self.step_parameters(), **self._step_options(limit)
        )
        total = total.to(self.device)
        if self.world > 1:
            total = distributed.all_reduce_sum(total) / self.world  # the global estimate, on every rank
        total, first = torch.stack([total, first_bad.to(total)]).tolist()  # one host sync per epoch
        if first >= 0:
            fault = self._fault("loss or gradient", int(first))
            if limit is not None:  # the flag does not say which test failed
                fault = NonFiniteStep(
                    fault.what,
                    fault.step,
                    fault.epoch,
                    fault.batch,
                    self.steps_per_epoch,
                    f"{fault}, or a loss above the divergence limit {limit / self.num_train:.3g} per datum",
                )
            raise fault
        if not math.isfinite(total):  # e.g. another rank's local loss; the step is not known here
            raise self._fault("epoch loss (a step's loss was NaN/inf)", self.steps_per_epoch - 1)
        if limit is not None and total / self.steps_per_epoch > limit:
            raise self._divergent(total / self.steps_per_epoch, self.steps_per_epoch - 1, "the epoch's mean loss")
        for name, p in self.trained_parameters():
            if not torch.isfinite(p).all():
                raise NonFiniteStep(
                    f"parameter {name}",
                    self.steps + self.steps_per_epoch,
                    self.epoch + 1,
                    self.steps_per_epoch,
                    self.steps_per_epoch,
                )
        figures = {"loss": total / self.steps_per_epoch}
        figures.update(self.after_epoch())
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        figures["seconds"], figures["cpu_seconds"] = time.perf_counter() - start, time.process_time() - cpu
        return figures

    # ------------------------------------------------------------------ recovery
    def _restore_last_good(self) -> str:
        """Load the last good state: this run's checkpoint on disk, else the in-memory copy."""
        if self._on_disk:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", PyroSparseWarning)  # already reported on resume
                self.resume()
            return f"checkpoint {self.checkpoint_path()} (epoch {self.epoch})"
        self.load_state_dict(copy.deepcopy(self._good_state))
        return f"the in-memory state of epoch {self.epoch}"

    def _recover(self, retries):
        """After a numerical fault (``self._last_fault``, set by ``fit``): restore the last good
        state and lower the learning rate; NumericalError once ``retries`` reaches ``nan_retries``."""
        fault = self._last_fault or NonFiniteStep("value", self.steps, self.epoch + 1, 0, self.steps_per_epoch,
                                                  f"non-finite value in epoch {self.epoch + 1}")
        factor, allowed = self.recipe["nan_lr_factor"], self.recipe["nan_retries"]
        if retries >= allowed:
            where = (f"; the last good checkpoint is {self.checkpoint_path()}" if self._on_disk else "")
            data = self._data_advice()
            advice = (f"Likely cause: {data}" if data else
                      "Lower optimizer.lr, set grad_clip or lengthen kl_warmup_epochs")
            raise NumericalError(
                f"training diverged: {fault}, and it did not recover after {retries} "
                f"retr{'y' if retries == 1 else 'ies'} (nan_retries: {allowed}), each restoring the last good "
                f"state and multiplying the learning rate by nan_lr_factor {factor}{where}. {advice}")
        rng, recoveries = torch.get_rng_state(), list(self.recoveries)
        source = self._restore_last_good()
        torch.set_rng_state(rng)  # a different Monte Carlo draw on the retry
        self.recoveries = recoveries  # the restored state predates the faults: keep their record
        scale = factor ** (retries + 1)
        for group in self.optimizer.param_groups:
            group["lr"] *= scale
        if self.scheduler:
            self.scheduler.base_lrs = [lr * scale for lr in self.scheduler.base_lrs]
        lr = self.optimizer.param_groups[0]["lr"]
        self.recoveries.append({"epoch": fault.epoch, "step": fault.step, "batch": fault.batch,
                                "what": fault.what, "retry": retries + 1, "lr": lr})
        warnings.warn(f"{fault}; restored {source} and lowered the learning rate to {lr:.3g} "
                      f"(retry {retries + 1} of {allowed})", PyroSparseWarning, stacklevel=3)

    # ------------------------------------------------------------------ the loop
    def before_fit(self, resume: bool):
        """Work once before the first epoch of a fit (SVI: pretraining, the reference loss)."""
        if self.loss_reference is None:
            self.loss_reference = self.reference_loss()

    def fit(self, epochs=None, resume=False) -> dict:
        """Train to ``epochs`` (default: the recipe's); returns the final metrics.

        With ``resume``, continue from ``out_dir``'s checkpoint. ``epochs`` may then be more than
        the run was planned for (it is extended: see :meth:`_extend_schedule`) but not fewer
        than the epochs it has already done."""
        if epochs is not None and (isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1):
            raise SpecError(f"expected a positive integer, got {epochs!r}", None, f"{type(self).__name__}.fit.epochs")
        epochs = epochs or self.recipe["epochs"]
        torch.manual_seed(self.recipe["seed"])
        self._watch_out_dir = bool(self.out_dir) and os.path.isdir(self.out_dir)
        if resume:
            self.resume()
            if epochs < self.epoch:
                raise PyroSparseError(f"{self.out_dir}: the run has already done {self.epoch} epochs; it cannot be "
                                      f"resumed to {epochs} (a resumed run can only continue or be extended)")
            self._extend_schedule(epochs)
            if self.out_dir and distributed.is_main_process():
                self._write_history()  # metrics.jsonl may lag the checkpoint after a kill
        self.before_fit(resume)
        bar = _progress(self.progress, epochs, self.epoch)
        retries = 0
        with pyro.validation_enabled(False):
            while self.epoch < epochs:
                if self._good_state is None and not self._on_disk:
                    self._good_state = copy.deepcopy(self.state_dict())
                if self.world > 1:  # per-rank noise, a function of (seed, epoch, retry): resumable
                    torch.manual_seed(distributed.rank_seed(self.recipe["seed"], self.epoch, retries))
                try:
                    figures = self.train_epoch()
                except FloatingPointError as e:
                    self._last_fault = e if isinstance(e, NonFiniteStep) else NonFiniteStep(
                        "value", self.steps + self.steps_per_epoch, self.epoch + 1, self.steps_per_epoch,
                        self.steps_per_epoch, f"{e} in epoch {self.epoch + 1}")
                    self._recover(retries)
                    retries += 1
                    continue
                self.epoch += 1
                self.steps += self.steps_per_epoch
                self.train_seconds += figures["seconds"]
                if "cpu_seconds" in figures and self.train_cpu_seconds is not None:
                    self.train_cpu_seconds += figures["cpu_seconds"]
                record = self.epoch_record(figures)
                if self.epoch % self.recipe["eval_every"] == 0 or self.epoch == epochs:
                    record.update(self.evaluate())
                    fault = self._held_out_fault(record)
                    if fault is not None:  # restores the epoch counters with the rest of the state
                        self._last_fault = fault
                        self._recover(retries)
                        retries += 1
                        continue
                self.history.append(record)
                if self.scheduler:
                    self.scheduler.step()
                self.save()
                if not self._on_disk:
                    self._good_state = copy.deepcopy(self.state_dict())
                retries = 0
                bar.set_postfix({k: f"{record[k]:.4g}" for k in ("elbo_per_datum", "test_accuracy", "test_rmse")
                                 if k in record})
                bar.update(1)
        bar.close()
        return self.summary()

    def _extend_schedule(self, epochs):
        """On resume with more (or fewer) epochs than the checkpoint's cosine schedule was built
        for: the rest of the run follows the cosine schedule of an ``epochs``-long run,
        ``lr_t = eta_min + (lr_0 - eta_min) (1 + cos(pi t / epochs)) / 2`` from the epoch ``t``
        reached. A finished run extended from E to E' epochs thus restarts at the learning rate
        that epoch E has on the longer schedule (0.35 lr_0 for 15 -> 25) and anneals to
        ``eta_min`` again at E' (torch's own rule would stay at ``eta_min``: its update
        multiplies the current rate). Step, multistep and exponential schedules count epochs
        and do not depend on the total: they simply continue."""
        sched = self.scheduler
        if not isinstance(sched, torch.optim.lr_scheduler.CosineAnnealingLR) or sched.T_max == epochs:
            return
        sched.T_max = epochs
        t = sched.last_epoch
        for group, base in zip(self.optimizer.param_groups, sched.base_lrs):
            group["lr"] = sched.eta_min + (base - sched.eta_min) * (1 + math.cos(math.pi * t / epochs)) / 2
        sched._last_lr = [group["lr"] for group in self.optimizer.param_groups]

    def epoch_record(self, figures: dict) -> dict:
        """The ``metrics.jsonl`` line of the epoch just trained (held-out figures are added by
        ``fit``): the loss, times, learning rate and what :meth:`after_epoch` reported."""
        record = {
            "epoch": self.epoch,
            "steps": self.steps,
            "loss": figures["loss"],
            "epoch_wall_seconds": figures["seconds"],
            "epoch_cpu_seconds": figures["cpu_seconds"],
            "lr": self.optimizer.param_groups[0]["lr"],
        }
        record.update({k: v for k, v in figures.items() if k not in ("loss", "seconds", "cpu_seconds")})
        return record

    def evaluate_model(self, model) -> dict:
        """Held-out ``test_*`` figures of a deterministic network (one draw)."""
        was_training = model.training
        predict = evaluation.point_predictive(model)
        test = (self.data.test, None) if self.streaming else (self.data.x_test, self.data.y_test)
        figures = evaluation.evaluate(predict, *test, self.network.likelihood)
        model.train(was_training)
        return evaluation.prefixed(figures)

    #: what a run's ``test_*`` figures are (``metrics.json``'s ``test_figures``)
    def test_figures(self) -> str | None:
        return None

    def summary(self) -> dict:
        last = dict(self.history[-1]) if self.history else {}
        if "test_nll" not in last:
            last.update(self.evaluate())
        out = {k: last[k] for k in ("test_accuracy", "test_rmse", "test_nll", "test_bpc") if k in last}
        if self.test_figures():
            out["test_figures"] = self.test_figures()
        out.update({"epochs": self.epoch, "steps": self.steps, "train_wall_seconds": self.train_seconds,
                    "threads": torch.get_num_threads(), "n_params": self.network.num_weights(),
                    "nan_recoveries": len(self.recoveries)})
        if self.steps:
            out["step_wall_ms"] = 1000 * self.train_seconds / self.steps
        if self.train_cpu_seconds is not None:  # the process's CPU time, every thread (one thread: the step's cost)
            out["train_cpu_seconds"] = self.train_cpu_seconds
            if self.steps:
                out["step_cpu_ms"] = 1000 * self.train_cpu_seconds / self.steps
        frozen = sum(self.network.frozen_parameters().values())
        if frozen:
            out["n_frozen_params"] = frozen
        if "log_marglik" in last:  # a Laplace fit: the marginal likelihood of its last marglik step
            out["log_marglik"] = last["log_marglik"]
        if self.elbo_path is not None:
            out["elbo_path"] = self.elbo_path
        if self.pretrained:
            out.update(self.pretrained)
        return out
