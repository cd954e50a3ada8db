"""Local reparameterisation as a Pyro effect handler.

Kingma, Salimans & Welling (2015), "Variational Dropout and the Local Reparameterization
Trick". For a layer ``b = x W^T`` with a factorised Gaussian posterior
``q(W_ij) = N(mu_ij, sigma_ij^2)`` the pre-activations are Gaussian too:

    b_mj ~ N( sum_i x_mi mu_ji ,  sum_i x_mi^2 sigma_ji^2 )

so one can sample ``b`` directly (one draw per data point, lower gradient variance) instead of
sampling ``W``: two matmuls instead of a weight draw plus one matmul.

How it works here. While :class:`LocalReparameterization` is active,

* a guide sample site that carries ``infer={"ps_local_reparam": True}`` and a (possibly
  ``Independent``) ``Normal`` posterior is *not* sampled: the handler records the posterior
  and returns its mean as a placeholder value. The placeholder is never used numerically:
  the ELBO takes the KL of such a site in closed form from the distributions alone;
* the prior that owns the site asks :func:`gaussian_posterior` for that record and hands the
  layer a :class:`GaussianWeight` (mean and variance) instead of a tensor, and the layer then
  samples the pre-activations with :func:`gaussian_linear` / :func:`gaussian_conv` (1-, 2- or
  3-D).

When the handler is not active (plain ``TraceMeanField_ELBO``, predictions with fixed weights)
everything falls back to ordinary weight samples.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from pyro.distributions import Independent, Normal
from pyro.poutine.messenger import Messenger
from pyro.poutine.runtime import _PYRO_STACK

from .distributions import _constants


@dataclass
class GaussianWeight:
    """A weight tensor known only through its Gaussian marginals ``N(loc, var)``."""

    loc: torch.Tensor
    var: torch.Tensor

    def scaled(self, factor):
        """The distribution of ``factor * W``: ``N(factor*loc, factor^2*var)``."""
        return GaussianWeight(self.loc * factor, self.var * factor * factor)

    @property
    def shape(self):
        return self.loc.shape


def _base_normal(fn):
    while isinstance(fn, Independent):
        fn = fn.base_dist
    return fn if isinstance(fn, Normal) else None


class LocalReparameterization(Messenger):
    """Effect handler that lets Bayesian layers sample pre-activations instead of weights.

    Use it around one evaluation of guide and model (the ELBO in :mod:`pyro_sparse.elbo` does)::

        with LocalReparameterization():
            loss = MeanFieldELBO().differentiable_loss(net.model, guide, x, y)
    """

    def __init__(self):
        super().__init__()
        self.posteriors: dict[str, Normal] = {}

    def __enter__(self):
        self.posteriors = {}
        return super().__enter__()

    def _pyro_sample(self, msg):
        if msg["is_observed"] or msg["value"] is not None:
            return
        if not msg["infer"].get("ps_local_reparam", False):
            return
        normal = _base_normal(msg["fn"])
        if normal is None:
            return
        self.posteriors[msg["name"]] = normal
        msg["value"] = normal.loc


def _active_handler():
    for frame in reversed(_PYRO_STACK):
        if isinstance(frame, LocalReparameterization):
            return frame
    return None


def gaussian_posterior(name: str) -> GaussianWeight | None:
    """The recorded Gaussian posterior of site ``name`` as a :class:`GaussianWeight`, if any."""
    handler = _active_handler()
    if handler is None:
        return None
    normal = handler.posteriors.get(name)
    if normal is None:
        return None
    return GaussianWeight(normal.loc, normal.variance)


class _PreactivationSample(torch.autograd.Function):
    """``mean + sqrt(max(var, 1e-16)) * eps``, ``eps = randn_like(mean)`` drawn here, as one
    autograd node: the gradient is ``g`` for ``mean`` and ``g eps / (2 sd)`` for ``var`` where
    ``var >= 1e-16`` (0 elsewhere, as for ``clamp_min``), the factor formed in the forward pass
    with a float mask (torch's ``clamp_min`` backward goes through slow boolean kernels)."""

    @staticmethod
    def forward(ctx, mean, var):
        ctx.set_materialize_grads(False)
        floor, two = _constants((1e-16, 2.0), var)
        sd = var.clamp_min(1e-16).sqrt_()
        eps = torch.randn_like(mean)
        out = torch.addcmul(mean, sd, eps)
        if ctx.needs_input_grad[1]:
            d_var = eps.div_(sd.mul_(two))
            d_var.mul_(torch.ge(var, floor, out=sd))
            ctx.save_for_backward(d_var)
        return out

    @staticmethod
    def backward(ctx, grad):
        if grad is None:
            return None, None
        d_var = ctx.saved_tensors[0] if ctx.needs_input_grad[1] else None
        return grad if ctx.needs_input_grad[0] else None, grad * d_var if d_var is not None else None


def _sample_preactivation(mean, var):
    """``mean + sqrt(var) * eps``, ``eps ~ N(0, I)`` (variances floored at 1e-16)."""
    if torch.is_grad_enabled() and (mean.requires_grad or var.requires_grad):
        return _PreactivationSample.apply(mean, var)
    return mean + var.clamp_min(1e-16).sqrt() * torch.randn_like(mean)


def _split(param):
    """(mean, var) of a parameter that is a tensor, a GaussianWeight or None."""
    if param is None:
        return None, None
    if isinstance(param, GaussianWeight):
        return param.loc, param.var
    return param, None


def gaussian_linear(x, weight, bias=None):
    """``F.linear`` for weights and biases that may be :class:`GaussianWeight`.

    mean = x mu_W^T + mu_b ; var = x^2 sigma_W^2^T + sigma_b^2 ; one draw per row of ``x``.
    """
    w_mean, w_var = _split(weight)
    b_mean, b_var = _split(bias)
    mean = F.linear(x, w_mean, b_mean)
    if w_var is None and b_var is None:
        return mean
    if w_var is not None:
        var = F.linear(x * x, w_var, b_var)
    else:
        var = torch.zeros_like(mean) + b_var
    return _sample_preactivation(mean, var)


#: spatial dimensions -> torch's convolution
_CONVOLUTIONS = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


def gaussian_conv(x, weight, bias=None, **conv_kwargs):
    """``F.conv1d`` / ``conv2d`` / ``conv3d`` (by the weight's dimensions) for weights and biases
    that may be :class:`GaussianWeight`, the rule of :func:`gaussian_linear`: mean
    ``conv(x, mu_W) + mu_b``, variance ``conv(x^2, sigma_W^2) + sigma_b^2``, one draw per output."""
    conv = _CONVOLUTIONS[len(weight.shape) - 2]
    w_mean, w_var = _split(weight)
    b_mean, b_var = _split(bias)
    mean = conv(x, w_mean, b_mean, **conv_kwargs)
    if w_var is None and b_var is None:
        return mean
    if w_var is not None:
        var = conv(x * x, w_var, b_var, **conv_kwargs)
    else:
        var = torch.zeros_like(mean) + b_var.view(1, -1, *([1] * (mean.dim() - 2)))
    return _sample_preactivation(mean, var)


class shared_weights(Messenger):
    """Mark every latent site sampled inside as *not* locally reparameterisable.

    The mean-field guide reads ``infer["ps_local_reparam_ok"]`` when it sets up a site; with it
    False, the guide samples a real weight tensor even under :class:`LocalReparameterization`.
    Used where one weight draw must serve several applications of the weight: a recurrent layer
    (one draw per mini-batch shared by all time steps, Lobacheva et al. 2017, sec. 3) and a
    module that a converted network's ``forward`` calls more than once
    (:class:`~pyro_sparse.convert.BayesianModule`).
    """

    def _pyro_sample(self, msg):
        if not msg["is_observed"]:
            msg["infer"]["ps_local_reparam_ok"] = False


def realize(param):
    """A weight tensor from a prior's return value: a :class:`GaussianWeight` (a guide set up
    without :class:`shared_weights`) becomes one draw ``loc + sqrt(var) * eps`` for the whole
    mini-batch."""
    if isinstance(param, GaussianWeight):
        return param.loc + param.var.clamp_min(0).sqrt() * torch.randn_like(param.loc)
    return param


def as_tensor(param):
    """A plain tensor for a parameter: the mean of a :class:`GaussianWeight`, else itself."""
    return param.loc if isinstance(param, GaussianWeight) else param
