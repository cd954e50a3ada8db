"""Priors over the parameters of Bayesian layers.

A prior owns the Pyro sample sites of one parameter tensor (a layer's weight or bias) and
returns the parameter the layer should use: a tensor, or under local reparameterisation a
:class:`~pyro_sparse.local_reparam.GaussianWeight`. Adding a prior means adding one class
with :func:`register_prior`; layers never change.

Site naming (DESIGN.md): the parameter site is ``<layer>.<param>`` (``fc1.weight``);
scale sites append a suffix (``fc1.weight.unit_scale``, ``fc1.weight.global_scale``).

Group axes of a parameter: ``weight`` (one per element), ``layer`` (one for the tensor),
``unit`` (output neuron / out-channel), ``input`` (input feature / in-channel), and for
recurrent layers ``gate`` and ``hidden``. A layer declares which tensor dimension each
axis lives on.
"""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import torch

from .distributions import LogUniform as LogUniformDistribution
from .local_reparam import gaussian_posterior
from .schema import Configurable, Field

PRIORS: dict[str, type["Prior"]] = {}


def register_prior(name: str):
    """Class decorator: make a prior available to specs as ``type: <name>``."""

    def wrap(cls):
        cls.spec_name = name
        PRIORS[name] = cls
        return cls

    return wrap


def group_shape(shape: torch.Size, axes: dict[str, int], group: str) -> torch.Size:
    """Shape of one variable per group, broadcastable against a parameter of ``shape``.

    ``group='weight'`` gives ``shape``; ``'layer'`` gives all ones; an axis name keeps
    that dimension and sets the others to one, e.g. unit groups of a (300, 64) weight
    give (300, 1).
    """
    if group == "weight":
        return torch.Size(shape)
    if group == "layer":
        return torch.Size([1] * len(shape))
    if group not in axes:
        raise ValueError(f"group {group!r} is not an axis of this parameter; axes are "
                         f"{['weight', 'layer', *axes]}")
    dim = axes[group]
    return torch.Size(s if i == dim else 1 for i, s in enumerate(shape))


def _full(shape, value, like):
    return torch.full(tuple(shape), float(value), dtype=like.dtype, device=like.device)


def sample_weight(name, prior_fn, init, role="weight", local_reparam=True):
    """Emit the sample site of a real-valued parameter and return what the layer uses.

    ``prior_fn`` is a distribution with the parameter's full batch shape; ``init`` is the
    deterministic initial value the guide starts from. Under an active
    :class:`~pyro_sparse.local_reparam.LocalReparameterization` handler the return value is
    the site's Gaussian posterior (a GaussianWeight) instead of a sample.
    """
    value = pyro.sample(name, prior_fn.to_event(init.dim()),
                        infer={"ps_role": role, "ps_init": init, "ps_local_reparam_ok": local_reparam})
    posterior = gaussian_posterior(name) if local_reparam else None
    return posterior if posterior is not None else value


def sample_scale(name, prior_fn, init):
    """Emit the sample site of a positive scale / precision variable (guide: log-normal)."""
    return pyro.sample(name, prior_fn.to_event(init.dim()), infer={"ps_role": "scale", "ps_init": init})


class Prior(Configurable):
    """Base class of all priors.

    Subclasses declare ``fields`` and implement :meth:`sample`. ``sample`` is called in the
    layer's forward, inside the model, once per mini-batch.
    """

    spec_name = "prior"

    def sample(self, site: str, init: torch.Tensor, axes: dict[str, int]):
        """Emit sample sites for the parameter at ``site``; return the parameter."""
        raise NotImplementedError

    def gaussian_prior(self, site: str, values: dict):
        """``(loc, scale)`` of the parameter's Gaussian prior given fitted hyper-variables.

        ``values`` maps site names to point values (posterior medians) of this prior's scale
        sites. For hierarchical priors this is the conditional prior given those values; the
        reduction module reads it as the "full prior" of Bayesian model reduction. Tensors or
        floats broadcastable to the parameter.
        """
        raise NotImplementedError(f"{type(self).__name__} is not conditionally Gaussian")

    def parameter_posterior(self, site: str, loc, var, values: dict):
        """Gaussian marginals ``(loc, var)`` of the *parameter* from those of its sample site.

        The identity for centred priors; a non-centred prior (w = scale * eps) maps the
        posterior of eps to that of w given the fitted scales in ``values``.
        """
        return loc, var


@register_prior("gaussian")
class Gaussian(Prior):
    """Independent Gaussian prior ``w ~ N(loc, scale^2)`` on every element."""

    fields = {
        "scale": Field("float", 1.0, positive=True, doc="prior standard deviation"),
        "loc": Field("float", 0.0, doc="prior mean"),
    }

    def sample(self, site, init, axes):
        prior = dist.Normal(_full((), self.loc, init), _full((), self.scale, init)).expand(init.shape)
        return sample_weight(site, prior, init)

    def gaussian_prior(self, site, values):
        return self.loc, self.scale


@register_prior("gaussian_gamma")
class GaussianGamma(Prior):
    """Gaussian prior with a learned precision per group (Markovic et al. 2023).

        lambda_g ~ Gamma(concentration, rate),   w | lambda_g ~ N(0, 1 / lambda_g)

    with one precision per ``group`` (default: one per layer). The precision site is
    ``<site>.<group>_precision`` and gets a log-normal posterior in the mean-field guide.
    Given lambda, the KL of the Gaussian weights is analytic and local reparameterisation
    still applies.
    """

    fields = {
        "concentration": Field("float", 2.0, positive=True),
        "rate": Field("float", 2.0, positive=True),
        "group": Field("choice", "layer", choices=("layer", "unit", "input", "weight")),
    }

    def precision_site(self, site):
        return f"{site}.{self.group}_precision"

    def sample(self, site, init, axes):
        gshape = group_shape(init.shape, axes, self.group)
        hyper = dist.Gamma(_full((), self.concentration, init), _full((), self.rate, init)).expand(gshape)
        precision = sample_scale(self.precision_site(site), hyper,
                                 _full(gshape, self.concentration / self.rate, init))
        scale = precision.rsqrt().expand(init.shape)
        prior = dist.Normal(torch.zeros_like(scale), scale)
        return sample_weight(site, prior, init)

    def gaussian_prior(self, site, values):
        return 0.0, values[self.precision_site(site)].rsqrt()


@register_prior("log_uniform")
class LogUniform(Prior):
    """Sparse Variational Dropout prior: improper log-uniform ``p(w) ∝ 1/|w|`` per weight
    (Molchanov, Ashukha, Vetrov 2017).

    With a Gaussian posterior N(theta, sigma^2) the KL is the registered closed-form
    approximation in :mod:`pyro_sparse.distributions`, so local reparameterisation applies.
    Prune where ``log alpha = log sigma^2 - log theta^2 > 3``. As a Gaussian the prior is the
    flat limit (precision 0), which is what :meth:`gaussian_prior` reports.
    """

    fields = {}

    def sample(self, site, init, axes):
        return sample_weight(site, LogUniformDistribution(init.shape), init)

    def gaussian_prior(self, site, values):
        return 0.0, float("inf")


def build_prior(spec) -> Prior:
    """A prior from an instance, a type name, or a ``{type: ..., **options}`` mapping."""
    if isinstance(spec, Prior):
        return spec
    if isinstance(spec, str):
        spec = {"type": spec}
    if not isinstance(spec, dict) or "type" not in spec:
        raise ValueError(f"expected a Prior, a prior name or a mapping with 'type', got {spec!r}")
    options = dict(spec)
    kind = options.pop("type")
    if not isinstance(kind, str) or kind not in PRIORS:
        raise ValueError(f"unknown prior type {kind!r}; expected one of {sorted(PRIORS)}")
    return PRIORS[kind](**options)
