"""Likelihoods: the observation model at the end of a network.

Each likelihood puts the observations in ``pyro.plate("data", size=N, subsample=idx)``:
with a mini-batch of B rows out of N, Pyro scales the data term by N/B, so the ELBO of a
mini-batch is an unbiased estimate of the full-data ELBO while the prior/KL terms, which
sit outside the plate, are counted once.
"""

from __future__ import annotations

import math

import pyro
import pyro.distributions as dist
import torch
import torch.nn.functional as F

from .priors import HyperSite, given_values, sample_hyper
from .registry import LIKELIHOODS
from .schema import Configurable, Field, build_registered

#: the site of a learned observation noise scale
NOISE_SITE = "likelihood.noise"


class Likelihood(Configurable):
    """Base class. ``task`` is 'classification', 'regression' or 'binary'."""

    task = "classification"

    def distribution(self, output: torch.Tensor):
        """The observation distribution given the network output (batch first)."""
        raise NotImplementedError

    def hyper_sites(self, like: torch.Tensor) -> dict:
        """The likelihood's own latent variables (name -> :class:`~pyro_sparse.priors.HyperSite`),
        ``like`` giving dtype and device: none, unless a subclass learns some (a noise scale)."""
        return {}

    def output_dim(self, num_outputs: int) -> int:
        return num_outputs

    def output_shape(self, num_outputs: int, shape: tuple) -> tuple:
        """Per-example network output shape this likelihood needs (``shape``: the network's)."""
        return (self.output_dim(num_outputs),)

    def observed(self, y: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
        """``y`` as the observation distribution takes it (here unchanged; Bernoulli wants floats)."""
        return y

    def observe(self, output, y=None, dataset_size=None, subsample=None):
        """Emit the ``obs`` site inside the data plate; return the distribution."""
        batch = output.shape[0]
        size = dataset_size if dataset_size is not None else batch
        if subsample is None:
            subsample = torch.arange(batch, device=output.device)
        fn = self.distribution(output)
        with pyro.plate("data", size=size, subsample=subsample):
            pyro.sample("obs", fn, obs=None if y is None else self.observed(y, output))
        return fn

    def log_likelihood(self, output: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """``sum_b log p(y_b | output_b)`` over a mini-batch, differentiable: the value of the
        ``obs`` site that :meth:`observe` emits, before the plate's scale N/B."""
        return self.distribution(output).log_prob(self.observed(y, output)).sum()

    def predictive_mean(self, outputs: torch.Tensor) -> torch.Tensor:
        """Posterior predictive mean from S stacked outputs of shape (S, B, ...)."""
        raise NotImplementedError

    def log_predictive(self, outputs: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Per-point log posterior predictive log (1/S) sum_s p(y | output_s), shape (B,)."""
        raise NotImplementedError

    def pointwise_log_likelihood(self, outputs, y):
        """log p(y_n | output_s) for stacked outputs (S, B, ...): shape (S, B)."""
        raise NotImplementedError

    # ------------------------------------------------------------------ curvature (Laplace)
    # The Hessian Lambda_n of -log p(y_n | f_n) with respect to the flat output f_n (K numbers)
    # for the GGN H = sum_n J_n' Lambda_n J_n (pyro_sparse.laplace.curvature), given as columns of
    # a square root, Lambda_n = S_n S_n'. A likelihood without them has no Laplace approximation.

    def check_curvature(self):
        """Raise ValueError where this likelihood has no output Hessian for the Laplace approximation."""
        raise ValueError(f"likelihood {self.spec_name!r} has no output Hessian for the Laplace approximation "
                         "(categorical, bernoulli and gaussian with a fixed noise have one)")

    def hessian_sqrt(self, output):
        """Columns ``(K, N, K)`` of a square root of ``Lambda_n``: ``sum_k s_k s_k' = Lambda_n``, for
        the flat outputs ``(N, K)``."""
        self.check_curvature()

    def sampled_hessian_sqrt(self, output, m, generator=None):
        """``m`` Monte Carlo columns ``(m, N, K)``, ``(d/df) NLL(y~; f) / sqrt(m)`` with
        ``y~ ~ p(y | f)``, whose outer products average to ``Lambda_n`` (the Fisher identity
        ``E[r r'] = Lambda`` of these exponential families)."""
        self.check_curvature()

    def nll_gradient(self, output, y):
        """``r_n = d(-log p(y_n | f_n)) / d f_n`` ``(N, K)`` (the empirical Fisher's column)."""
        self.check_curvature()


def categorical_log_likelihood(logits, y):
    """log softmax(logits)[y], broadcasting ``y`` over leading sample dimensions of ``logits``."""
    logp = F.log_softmax(logits, -1)
    return logp.gather(-1, y.expand(logp.shape[:-1]).unsqueeze(-1)).squeeze(-1)


def _log_mean_exp(logp, dim=0):
    return torch.logsumexp(logp, dim) - math.log(logp.shape[dim])


class Categorical(Likelihood):
    """``y ~ Categorical(softmax(f(x)))`` for classification."""

    spec_name = "categorical"

    fields = {}

    def distribution(self, output):
        return dist.Categorical(logits=output)

    def log_likelihood(self, output, y):
        """``sum log softmax(logits)[y]`` over every position: one fused cross-entropy kernel."""
        if y.is_floating_point():  # class indices stored as floats: the distribution's rule
            return super().log_likelihood(output, y)
        return -F.cross_entropy(output.reshape(-1, output.shape[-1]), y.reshape(-1), reduction="sum")

    def pointwise_log_likelihood(self, outputs, y):
        return categorical_log_likelihood(outputs, y)

    def predictive_mean(self, outputs):
        return F.softmax(outputs, -1).mean(0)

    def log_predictive(self, outputs, y):
        return _log_mean_exp(self.pointwise_log_likelihood(outputs, y))

    def check_curvature(self):
        pass

    def hessian_sqrt(self, output):
        """``Lambda = diag(p) - p p'`` (``p = softmax(f)``) has the square root with columns
        ``s_k = sqrt(p_k) (e_k - p)``, because ``sum_k p_k (e_k - p)(e_k - p)' = diag(p) - p p'``."""
        p = torch.softmax(output, dim=-1)  # (N, K)
        eye = torch.eye(p.shape[1], dtype=p.dtype, device=p.device)
        return p.T.sqrt().unsqueeze(-1) * (eye.unsqueeze(1) - p.unsqueeze(0))

    def sampled_hessian_sqrt(self, output, m, generator=None):
        p = torch.softmax(output, dim=-1)
        ys = torch.multinomial(p, m, replacement=True, generator=generator).T  # (m, N)
        return (p.unsqueeze(0) - F.one_hot(ys, p.shape[1]).to(p.dtype)) / math.sqrt(m)

    def nll_gradient(self, output, y):
        return torch.softmax(output, dim=-1) - F.one_hot(y.long().reshape(-1), output.shape[1]).to(output.dtype)


class Bernoulli(Likelihood):
    """``y ~ Bernoulli(sigmoid(f(x)))`` for binary labels; the network has one output.

    Labels are 0/1, stored as integers (what the data loaders make of class labels, whatever
    the file's dtype) or floats; :meth:`observed` hands the distribution floats of the
    output's dtype, as ``binary_cross_entropy_with_logits`` requires.
    """

    spec_name = "bernoulli"

    task = "binary"
    fields = {}

    def output_dim(self, num_outputs):
        return 1

    def observed(self, y, output):
        return y.to(output.dtype)

    def distribution(self, output):
        return dist.Bernoulli(logits=output.squeeze(-1))

    def pointwise_log_likelihood(self, outputs, y):
        logits = outputs.squeeze(-1)
        return -F.binary_cross_entropy_with_logits(logits, y.expand(logits.shape).to(logits.dtype),
                                                   reduction="none")

    def predictive_mean(self, outputs):
        return torch.sigmoid(outputs.squeeze(-1)).mean(0)

    def log_predictive(self, outputs, y):
        return _log_mean_exp(self.pointwise_log_likelihood(outputs, y))

    def check_curvature(self):
        pass

    def hessian_sqrt(self, output):
        """One independent Bernoulli per output: ``Lambda = diag(p (1 - p))``, columns
        ``sqrt(p_k (1 - p_k)) e_k`` (``p = sigmoid(f)``)."""
        p = torch.sigmoid(output)
        eye = torch.eye(p.shape[1], dtype=p.dtype, device=p.device)
        return eye.unsqueeze(1) * (p * (1 - p)).sqrt().unsqueeze(0)

    def sampled_hessian_sqrt(self, output, m, generator=None):
        p = torch.sigmoid(output)
        ys = torch.bernoulli(p.expand(m, *p.shape), generator=generator)
        return (p.unsqueeze(0) - ys) / math.sqrt(m)

    def nll_gradient(self, output, y):
        return torch.sigmoid(output) - y.to(output.dtype).reshape(output.shape)


class Gaussian(Likelihood):
    """``y ~ N(f(x), sigma^2)`` for regression; fixed ``noise`` or learned.

    With ``learn_noise: true`` the noise scale is a latent site ``likelihood.noise`` with a
    half-normal prior of scale ``noise`` (log-normal posterior in the mean-field guide).

    Standardised targets (the spec's ``data: {targets: standardize}``): after
    :meth:`set_target_transform` with the training mean ``m`` and standard deviation ``s`` of
    every target column, the model is ``y ~ N(m + s f(x), (s sigma)^2)``: the network fits
    ``(y - m) / s`` with ``sigma`` (``noise``) in those standardised units, and every density,
    predictive mean, RMSE and NLL is in the data's own units. The log-density differs from the
    standardised one by the constant ``-sum log s`` per example, so the fit is the same.
    """

    spec_name = "gaussian"

    task = "regression"
    fields = {"noise": Field("float", 1.0, positive=True), "learn_noise": Field("bool", False)}
    target_transform = None  # {"mode", "mean", "scale"} once set_target_transform is called

    def set_target_transform(self, transform: dict | None):
        """Model ``y = mean + scale * (f(x) + noise)`` per target column (``transform`` as in
        ``dataset.extras["target_transform"]``; None: the raw targets)."""
        self.target_transform = None if transform is None else {
            "mode": transform["mode"], "mean": [float(v) for v in transform["mean"]],
            "scale": [float(v) for v in transform["scale"]]}
        self._affine_cache = {}

    def _affine(self, like):
        """``(mean, scale)`` tensors on ``like``'s device and dtype (cached), or None."""
        if self.target_transform is None:
            return None
        key = (like.device, like.dtype)
        if key not in self._affine_cache:
            t = self.target_transform
            self._affine_cache[key] = (like.new_tensor(t["mean"]), like.new_tensor(t["scale"]))
        return self._affine_cache[key]

    def _normal(self, output, noise):
        affine = self._affine(output)
        if affine is None:
            return dist.Normal(output, noise)
        mean, scale = affine
        return dist.Normal(mean + scale * output, noise * scale)

    def observed(self, y, output):
        """``y`` shaped like the output: a one-target regression's ``(N,)`` targets as ``(N, 1)``."""
        if y.shape != output.shape and y.numel() == output.numel():
            return y.reshape(output.shape)
        return y

    def hyper_sites(self, like):
        """``{"likelihood.noise": HyperSite}`` with a learned noise (half-normal prior of scale
        ``noise``, starting there), else ``{}``."""
        if not self.learn_noise:
            return {}
        prior = dist.HalfNormal(like.new_tensor(self.noise)).expand([1])
        return {NOISE_SITE: HyperSite(prior, like.new_full((1,), self.noise))}

    def noise_scale(self, like):
        if not self.learn_noise:
            return like.new_tensor(self.noise)
        given = given_values()  # inside the ELBO core: its draw, without building the prior
        if given is not None:
            return given[NOISE_SITE]
        return sample_hyper(NOISE_SITE, self.hyper_sites(like)[NOISE_SITE])

    def distribution(self, output, noise=None):
        if noise is None:
            noise = self.noise_scale(output)
        return self._normal(output, noise).to_event(1)

    def pointwise_log_likelihood(self, outputs, y, noise=None):
        noise = outputs.new_tensor(self.noise) if noise is None else noise
        return self._normal(outputs, noise).log_prob(y.expand(outputs.shape)).sum(-1)

    def predictive_mean(self, outputs):
        affine = self._affine(outputs)
        mean = outputs.mean(0)
        return mean if affine is None else affine[0] + affine[1] * mean

    def log_predictive(self, outputs, y, noise=None):
        return _log_mean_exp(self.pointwise_log_likelihood(outputs, y, noise))

    def check_curvature(self):
        if self.learn_noise:
            raise ValueError("the Laplace approximation needs a fixed Gaussian noise; set learn_noise: false")
        if self.target_transform is not None:
            raise ValueError("the Laplace approximation fits raw regression targets; remove data: "
                             "{targets: standardize}")

    def hessian_sqrt(self, output):
        """``Lambda = I / sigma^2``: columns ``e_k / sigma``."""
        self.check_curvature()
        eye = torch.eye(output.shape[1], dtype=output.dtype, device=output.device)
        return (eye / float(self.noise)).unsqueeze(1).expand(-1, output.shape[0], -1)

    def sampled_hessian_sqrt(self, output, m, generator=None):
        self.check_curvature()
        eps = torch.randn((m, *output.shape), dtype=output.dtype, device=output.device, generator=generator)
        return eps / (float(self.noise) * math.sqrt(m))

    def nll_gradient(self, output, y):
        self.check_curvature()
        return (output - y.to(output.dtype).reshape(output.shape)) / float(self.noise) ** 2


class SequenceCategorical(Categorical):
    """``y_t ~ Categorical(softmax(f(x)_t))`` at every position of a sequence (language models).

    The network outputs logits (B, T, V); ``y`` is (B, T). The data plate is over sequences and
    the T positions form the event, so the mini-batch scale N/B multiplies whole sequences.
    """

    spec_name = "sequence_categorical"

    task = "sequence"
    fields = {}

    def output_shape(self, num_outputs, shape):
        if len(shape) != 2:
            raise ValueError(f"sequence_categorical needs per-step outputs (time, {num_outputs}), "
                             f"got shape {list(shape)}; set return_sequence: true on the recurrent layer")
        return (shape[0], num_outputs)

    def distribution(self, output):
        return dist.Categorical(logits=output).to_event(1)

    def pointwise_log_likelihood(self, outputs, y):
        """Per-sequence log-likelihood sum_t log p(y_t | ...): (S, B, T, V) outputs -> (S, B)."""
        return self.token_log_likelihood(outputs, y).sum(-1)

    def check_curvature(self):
        Likelihood.check_curvature(self)

    @staticmethod
    def token_log_likelihood(outputs, y):
        """log p(y_t | ...) at every position: (S, B, T, V) outputs -> (S, B, T)."""
        return categorical_log_likelihood(outputs, y)


def build_likelihood(spec) -> Likelihood:
    """A likelihood from an instance, a type name, or a ``{type: ..., **options}`` mapping."""
    return build_registered(LIKELIHOODS, spec, Likelihood, "likelihood")
