r"""The Laplace (double-exponential) prior as a scale mixture, in one class: a plugin.

The Bayesian lasso (Park & Casella 2008; Andrews & Mallows 1974): a Gaussian whose variance has
an exponential prior per group,

.. math::

    v_g \sim \mathrm{Exponential}(\lambda^2 / 2) \;(= \mathrm{Gamma}(1, \lambda^2 / 2)),
    \qquad w \mid v_g \sim N(0, v_g),

so that marginally :math:`w \sim \mathrm{Laplace}(0, 1/\lambda)` (with ``group: weight``). The
variance site gets a log-normal posterior and its KL the fused closed form of
:data:`pyro_sparse.kl.KERNELS` (``Exponential(r)`` is ``Gamma(1, r)`` there); the weights keep a
Gaussian conditional prior, so local reparameterisation, BMR and Savage-Dickey apply.

Use it from a model spec (``--allow-code`` on the command line)::

    plugins: [examples/plugins/laplace_prior.py]
    prior: {type: laplace, rate: 10.0, group: unit}

Its name ``laplace`` is a prior's: the fitting method ``laplace`` lives in another registry.
"""

import pyro.distributions as dist
import torch

from pyro_sparse.priors import HyperSite, Prior, group_shape, log_value
from pyro_sparse.schema import Field


class LaplacePrior(Prior):
    """Laplace prior ``w ~ Laplace(0, 1/rate)`` as ``N(0, v)``, ``v ~ Exponential(rate^2 / 2)`` per group."""

    spec_name = "laplace"
    conditional = True
    fields = {
        "rate": Field("float", 1.0, positive=True, doc="lambda: the marginal prior is Laplace(0, 1/lambda)"),
        "group": Field("choice", "weight", choices=("weight", "layer", "unit", "input", "channel"),
                       doc="one variance per weight (the Laplace prior itself), unit, input, ... or layer"),
    }

    def variance_site(self, site):
        return f"{site}.{self.group}_variance"

    def hyper_sites(self, site, init, axes):
        """The variance per group, starting at its prior mean ``2 / rate^2``."""
        shape = group_shape(init.shape, axes, self.group)
        rate = torch.tensor(self.rate ** 2 / 2, dtype=init.dtype, device=init.device)
        start = torch.full(tuple(shape), 1 / float(rate), dtype=init.dtype, device=init.device)
        return {self.variance_site(site): HyperSite(dist.Exponential(rate).expand(shape), start)}

    def site_prior(self, site, init, values):
        """``N(0, v_g)`` per element."""
        scale = log_value(values, self.variance_site(site)).mul(0.5).exp().expand(init.shape)
        return dist.Normal(torch.zeros_like(scale), scale)

    def gaussian_prior(self, site, values):
        """The conditional prior ``N(0, v_g)`` at the posterior median of the variance (BMR's full prior)."""
        return 0.0, values[self.variance_site(site)].sqrt()
