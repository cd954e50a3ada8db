"""Fitting: stochastic variational inference over mini-batches, with evaluation and checkpoints.

:class:`SVITrainer` owns the state of one run (network, guide, optimiser, schedule, random
generators, history). One optimisation step is

    loss = beta_t * KL(q || p) - (N / B) * sum_{n in batch} log p(y_n | x_n, w)
    loss.backward(); clip; optimizer.step()

with the loss from :class:`~pyro_sparse.elbo.MeanFieldELBO` (analytic KL, local
reparameterisation) and beta_t the KL warm-up. Each epoch it evaluates the posterior predictive
on held-out data, appends to ``metrics.jsonl`` and writes an atomic checkpoint from which
``resume`` continues bit-for-bit (the RNG states are part of it).
"""

from __future__ import annotations

import copy
import json
import math
import os
import time

import pyro
import torch
from tqdm.auto import tqdm

from .checkpoint import load_safe, save_atomic, write_text_atomic
from .elbo import MeanFieldELBO
from .errors import PyroSparseError
from .guides import DeltaGuide
from .recipe import make_optimizer, make_scheduler

CHECKPOINT = "checkpoint.pt"


class NumericalError(PyroSparseError):
    """Training produced NaN/inf and did not recover within the allowed retries."""


@torch.no_grad()
def evaluate(network, guide, x, y, num_samples=10, batch_size=2048) -> dict:
    """Posterior-predictive metrics on (x, y).

    Classification: accuracy of the predictive mean and NLL = -mean_n log (1/S) sum_s p(y_n | w_s).
    Regression: RMSE of the predictive mean and the same NLL.
    """
    if network.likelihood.task == "sequence":  # language models: per-character figures and BPC
        from .text import evaluate_sequences

        return evaluate_sequences(network, guide, x, y, num_samples)
    if isinstance(guide, DeltaGuide):
        num_samples = 1
    lik = network.likelihood
    correct, sq_err, nll, n = 0.0, 0.0, 0.0, 0
    for start in range(0, len(x), batch_size):
        xb, yb = x[start:start + batch_size], y[start:start + batch_size]
        outputs = network.sample_outputs(xb, guide, num_samples)
        mean = lik.predictive_mean(outputs)
        if lik.task == "regression":
            noise = guide.median().get("likelihood.noise") if getattr(lik, "learn_noise", False) else None
            nll -= lik.log_predictive(outputs, yb, noise).sum().item()
            sq_err += (mean - yb).square().sum().item()
        else:
            nll -= lik.log_predictive(outputs, yb).sum().item()
            pred = mean.argmax(-1) if lik.task == "classification" else (mean > 0.5).long()
            correct += (pred == yb.long()).sum().item()
        n += len(xb)
    if lik.task == "regression":
        return {"test_rmse": math.sqrt(sq_err / y.numel()), "test_nll": nll / n}
    return {"test_accuracy": correct / n, "test_nll": nll / n}


class SVITrainer:
    """Runs SVI for a network + guide on a data set according to a recipe (a parsed dict).

    Args:
        network, guide: the model and its (not yet set up) guide.
        dataset: a :class:`~pyro_sparse.data.Dataset`.
        recipe: a parsed inference recipe (:func:`~pyro_sparse.recipe.parse_recipe`).
        out_dir: where ``metrics.jsonl`` and the checkpoint go (``None``: nowhere).
        progress: show a tqdm bar.
    """

    def __init__(self, network, guide, dataset, recipe, out_dir=None, progress=True):
        self.network, self.guide, self.data, self.recipe = network, guide, dataset, recipe
        self.out_dir, self.progress = out_dir, progress
        self.device = torch.device(recipe["device"])
        if recipe.get("num_threads"):
            torch.set_num_threads(recipe["num_threads"])
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise PyroSparseError(f"device {recipe['device']!r} requested but CUDA is not available")
        self.data.to(self.device)
        self.network.to(self.device)
        self.num_train = len(self.data.x_train)
        self.batch_size = min(recipe["batch_size"], self.num_train)
        self.steps_per_epoch = math.ceil(self.num_train / self.batch_size)
        self.guide.setup(self.data.x_train[: self.batch_size], self.data.y_train[: self.batch_size],
                         dataset_size=self.num_train)
        self.guide.to(self.device)
        self.elbo = MeanFieldELBO(local_reparam=recipe["local_reparam"])
        self.optimizer = make_optimizer(self.guide.parameters(), recipe["optimizer"])
        self.scheduler = make_scheduler(self.optimizer, recipe["schedule"], recipe["epochs"])
        self.generator = torch.Generator().manual_seed(recipe["seed"])
        self.epoch, self.steps, self.train_seconds = 0, 0, 0.0
        self.history: list[dict] = []
        self._good_state = None

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        return {"format": 1, "epoch": self.epoch, "steps": self.steps, "train_seconds": self.train_seconds,
                "guide": self.guide.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict() if self.scheduler else None,
                "rng_torch": torch.get_rng_state(), "rng_generator": self.generator.get_state(),
                "rng_cuda": torch.cuda.get_rng_state_all() if self.device.type == "cuda" else [],
                "history": self.history}

    def load_state_dict(self, state: dict):
        self.guide.load_state_dict(state["guide"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scheduler and state["scheduler"]:
            self.scheduler.load_state_dict(state["scheduler"])
        self.epoch, self.steps, self.train_seconds = state["epoch"], state["steps"], state["train_seconds"]
        torch.set_rng_state(state["rng_torch"])
        self.generator.set_state(state["rng_generator"])
        if state.get("rng_cuda"):
            torch.cuda.set_rng_state_all(state["rng_cuda"])
        self.history = list(state["history"])

    def checkpoint_path(self):
        return os.path.join(self.out_dir, CHECKPOINT) if self.out_dir else None

    def save(self):
        if self.out_dir:
            save_atomic(self.state_dict(), self.checkpoint_path())
            write_text_atomic(os.path.join(self.out_dir, "metrics.jsonl"),
                              "".join(json.dumps(h, sort_keys=True) + "\n" for h in self.history))

    def resume(self):
        """Continue from ``out_dir``'s checkpoint (falls back to the previous one if corrupt)."""
        path = self.checkpoint_path()
        try:
            state = load_safe(path, map_location=self.device)
        except PyroSparseError:
            if not os.path.exists(path + ".prev"):
                raise
            state = load_safe(path + ".prev", map_location=self.device)
        self.load_state_dict(state)

    # ------------------------------------------------------------------ training
    def kl_weight(self, epoch_float: float) -> float:
        """beta_t: 0 for ``kl_free_epochs`` (pre-training on the data term), then a linear
        rise to 1 over ``kl_warmup_epochs``."""
        epoch_float -= self.recipe.get("kl_free_epochs", 0.0)
        if epoch_float < 0:
            return 0.0
        warm = self.recipe["kl_warmup_epochs"]
        return 1.0 if warm <= 0 else min(1.0, epoch_float / warm)

    def _step(self, idx, beta):
        x, y = self.data.x_train[idx], self.data.y_train[idx]
        self.elbo.kl_weight = beta
        loss = self.elbo.differentiable_loss(self.network.model, self.guide, x, y,
                                             dataset_size=self.num_train, subsample=idx)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.recipe["grad_clip"]:
            torch.nn.utils.clip_grad_norm_(self.guide.parameters(), self.recipe["grad_clip"])
        self.optimizer.step()
        return loss.detach()

    def train_epoch(self):
        """One pass over the training data in a random order; returns the epoch's figures."""
        perm = torch.randperm(self.num_train, generator=self.generator).to(self.device)
        total = torch.zeros((), device=self.device)
        start = time.perf_counter()
        for b in range(self.steps_per_epoch):
            idx = perm[b * self.batch_size:(b + 1) * self.batch_size]
            beta = self.kl_weight(self.epoch + b / self.steps_per_epoch)
            total = total + self._step(idx, beta)
        total = total.item()  # one host sync per epoch
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        if not math.isfinite(total):
            raise FloatingPointError("non-finite loss")
        for p in self.guide.parameters():
            if not torch.isfinite(p).all():
                raise FloatingPointError("non-finite parameter")
        return {"loss": total / self.steps_per_epoch, "seconds": seconds}

    def evaluate(self, num_samples=None):
        return evaluate(self.network, self.guide, self.data.x_test, self.data.y_test,
                        num_samples or self.recipe["eval_samples"])

    def _recover(self, retries):
        """Restore the last good state and lower the learning rate after a numerical fault."""
        if retries >= self.recipe["nan_retries"]:
            raise NumericalError(
                f"training diverged (NaN/inf) at epoch {self.epoch + 1} and did not recover after "
                f"{retries} retries with the learning rate lowered by {self.recipe['nan_lr_factor']} each time; "
                "lower optimizer.lr, enable grad_clip or lengthen kl_warmup_epochs")
        rng = torch.get_rng_state()
        self.load_state_dict(copy.deepcopy(self._good_state))
        torch.set_rng_state(rng)  # a different draw on the retry
        for group in self.optimizer.param_groups:
            group["lr"] *= self.recipe["nan_lr_factor"] ** (retries + 1)
        if self.scheduler:
            self.scheduler.base_lrs = [lr * self.recipe["nan_lr_factor"] ** (retries + 1)
                                       for lr in self.scheduler.base_lrs]

    def fit(self, epochs=None, resume=False) -> dict:
        """Train to ``epochs`` (default: the recipe's); returns the final metrics."""
        epochs = epochs or self.recipe["epochs"]
        torch.manual_seed(self.recipe["seed"])
        if resume:
            self.resume()
        bar = tqdm(total=epochs, initial=self.epoch, desc="fit", unit="epoch", disable=not self.progress,
                   dynamic_ncols=True)
        retries = 0
        with pyro.validation_enabled(False):
            while self.epoch < epochs:
                if self._good_state is None:
                    self._good_state = copy.deepcopy(self.state_dict())
                try:
                    figures = self.train_epoch()
                except FloatingPointError as e:
                    bar.write(f"epoch {self.epoch + 1}: {e}; restoring the last good state "
                              f"and lowering the learning rate (retry {retries + 1})")
                    self._recover(retries)
                    retries += 1
                    continue
                self.epoch += 1
                self.steps += self.steps_per_epoch
                self.train_seconds += figures["seconds"]
                record = {"epoch": self.epoch, "steps": self.steps, "loss": figures["loss"],
                          "elbo_per_datum": -figures["loss"] / self.num_train,
                          "epoch_seconds": figures["seconds"], "lr": self.optimizer.param_groups[0]["lr"],
                          "kl_weight": self.kl_weight(self.epoch)}
                if self.epoch % self.recipe["eval_every"] == 0 or self.epoch == epochs:
                    record.update(self.evaluate())
                self.history.append(record)
                if self.scheduler:
                    self.scheduler.step()
                self.save()
                self._good_state = copy.deepcopy(self.state_dict())
                retries = 0
                bar.set_postfix({k: f"{record[k]:.4g}" for k in ("elbo_per_datum", "test_accuracy", "test_rmse")
                                 if k in record})
                bar.update(1)
        bar.close()
        return self.summary()

    def summary(self) -> dict:
        last = dict(self.history[-1]) if self.history else {}
        if "test_nll" not in last:
            last.update(self.evaluate())
        out = {k: last[k] for k in ("test_accuracy", "test_rmse", "test_nll", "test_bpc") if k in last}
        out.update({"epochs": self.epoch, "steps": self.steps, "train_seconds": self.train_seconds,
                    "step_ms": 1000 * self.train_seconds / max(self.steps, 1),
                    "n_weights": self.network.num_weights()})
        return out
