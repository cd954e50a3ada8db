"""Variational families (guides) for Bayesian networks.

* :class:`MeanFieldGuide`: ``q(w) = prod_i N(w_i | mu_i, sigma_i^2)`` on real-valued sites and
  ``LogNormal`` on positive sites (scales, precisions). It samples ``Normal(loc, scale)``
  *directly at each site* (unlike Pyro's ``AutoNormal``, which samples an unconstrained copy and
  a ``Delta``), so ``TraceMeanField_ELBO`` and :class:`~pyro_sparse.elbo.MeanFieldELBO` use the
  analytic KL, and local reparameterisation can replace the weight draw. The scale is stored
  as ``log sigma``: the additive parameterisation (theta, log sigma^2) of Sparse VD
  (Molchanov et al. 2017), so ``log_alpha = log sigma^2 - log theta^2`` is read off directly.
* :class:`DeltaGuide`: a point mass per site, i.e. MAP estimation with the same model.

Guides discover the model's sites from one prototype run in which each site takes the
initial value its prior proposes (``infer["ps_init"]``: the usual deterministic initialisation
for weights), so a fresh mean-field network predicts like a freshly initialised deterministic one.
"""

from __future__ import annotations

import math
import sys

import pyro
import pyro.distributions as dist
import pyro.poutine as poutine
import torch
from pyro.distributions import constraints
from pyro.infer.autoguide.initialization import InitMessenger, init_to_feasible
from torch import nn

from .distributions import LOG_SCALE_MAX, LOG_SCALE_MIN, LogScaleNormal, clamp, log_alpha
from .evaluation import evaluation_mode
from .kl import HyperLayout, has_closed_form
from .registry import GUIDES


def _init_from_prior(site):
    init = site["infer"].get("ps_init")
    if init is not None:
        return init.detach().clone()
    return init_to_feasible(site)


def _key(name: str) -> str:
    return name.replace(".", "__")


def _base_distribution(fn):
    while isinstance(fn, dist.Independent):
        fn = fn.base_dist
    return fn


def _event_support(fn):
    while isinstance(fn, dist.Independent):
        fn = fn.base_dist
    return fn.support


def is_positive(support) -> bool:
    """True for (0, inf) and [0, inf) supports: sites that get a log-normal posterior."""
    if support is constraints.positive or support is constraints.nonnegative:
        return True
    return type(support).__name__ in ("_GreaterThan", "_GreaterThanEq") and float(support.lower_bound) == 0.0


def prototype_trace(model, *args, **kwargs):
    """Trace of ``model`` with every latent site at its initial value (no sampling).

    The observation site is hidden: without ``y`` it would otherwise look latent. The network
    (``model``'s owner, for ``net.model``) runs in evaluation mode, so the prototype run leaves
    a batch norm's running statistics alone."""
    hidden = poutine.block(model, hide=["obs"])
    owner = getattr(model, "__self__", None)
    with torch.no_grad(), evaluation_mode(owner if isinstance(owner, nn.Module) else None):
        return poutine.trace(InitMessenger(_init_from_prior)(hidden)).get_trace(*args, **kwargs)


def latent_sites(trace):
    """Latent sample sites of a trace, in execution order."""
    return [site for site in trace.nodes.values()
            if site["type"] == "sample" and not site["is_observed"]
            and type(site["fn"]).__name__ != "_Subsample"]


class Guide(nn.Module):
    """Base class: set up lazily from the model's first call (or :meth:`setup`)."""

    def __init__(self, model):
        super().__init__()
        if not callable(model):
            raise ValueError(f"{type(self).__name__}: model must be a callable Pyro model (e.g. net.model), "
                             f"got {type(model).__name__}")
        # stored in a tuple so nn.Module does not register the network as a submodule
        self._model = (model,)
        self.sites: dict[str, dict] = {}

    @property
    def model(self):
        return self._model[0]

    def setup(self, *args, **kwargs):
        if self.sites:
            return self
        trace = prototype_trace(self.model, *args, **kwargs)
        for site in latent_sites(trace):
            self._add_site(site)
        if not self.sites:
            raise ValueError("the model has no latent sample sites")
        return self

    def _add_site(self, site):
        raise NotImplementedError

    def posterior(self, name: str, values: dict):
        """``q(site | values of the sites before it)``, batch shape of the site (no event dims):
        the one definition of the family, which :meth:`forward` samples for Pyro and the ELBO core
        (:class:`~pyro_sparse.elbo.CoreELBO`) draws from directly."""
        raise NotImplementedError

    def forward(self, *args, **kwargs):
        """The Pyro guide: each site in order from :meth:`posterior` given the earlier draws."""
        if not self.sites:
            self.setup(*args, **kwargs)
        values = {}
        for name, info in self.sites.items():
            values[name] = pyro.sample(name, self.posterior(name, values).to_event(info["event_dim"]),
                                       infer={"ps_local_reparam": info.get("local_reparam", False)})

    def _start_values(self, *args, **kwargs) -> dict:
        """Site -> the initial value the model's priors propose now (one prototype run)."""
        trace = prototype_trace(self.model, *args, **kwargs)
        return {site["name"]: site["value"] for site in latent_sites(trace)}

    def median(self) -> dict[str, torch.Tensor]:
        """Point value per site (posterior median), e.g. for deterministic predictions."""
        raise NotImplementedError

    def site_posterior(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Gaussian marginals ``(loc, var)`` of a real-valued site's posterior (detached)."""
        raise NotImplementedError


class MeanFieldGuide(Guide):
    """Fully factorised Gaussian / log-normal guide.

    Args:
        model: the Pyro model (``net.model``).
        init_scale: initial posterior standard deviation of weights. The default
            ``exp(-5)`` gives log sigma^2 = -10, the Sparse VD initialisation.
        init_scale_hyper: initial log-space standard deviation of positive sites.
        local_reparam: let analytically tractable weight sites be replaced by their
            pre-activations when a :class:`~pyro_sparse.local_reparam.LocalReparameterization`
            handler is active.

    Storage: the mean and ``log sigma`` of a weight site are the parameters ``locs[<key>]`` and
    ``log_scales[<key>]`` (``<key>``: the site name with ``__`` for ``.``). The hyper-sites whose KL
    the ELBO core takes in its fused node (:meth:`~pyro_sparse.kl.HyperLayout.joins`: the scales,
    precisions and group variables of the library's priors) are stored together in two flat
    parameters, ``hyper_locs`` and ``hyper_log_scales`` (log-normal sites first, then Gaussian
    ones, each in site order; ``hyper`` maps a site to its ``(offset, numel, shape)``): a horseshoe
    layer has five such sites, and two parameters instead of ten spare the optimiser, the gradient
    norm and autograd a pass per tensor. :meth:`loc` and :meth:`log_scale` read either.

    Clamp: every posterior scale is ``exp(clamp(log_scale, LOG_SCALE_MIN, LOG_SCALE_MAX))``,
    i.e. sigma in [exp(-12), exp(4)] ~ [6.1e-6, 54.6] and log sigma^2 in [-24, 8], so a
    variance can neither underflow to 0 (log alpha = -inf, division by zero in the KL) nor
    overflow. Outside the range the gradient with respect to ``log_scale`` is 0; the stored
    parameter may sit beyond the bound, the distribution never does.
    """

    spec_name = "meanfield"

    def __init__(self, model, init_scale: float = math.exp(-5.0), init_scale_hyper: float = 0.1,
                 local_reparam: bool = True):
        super().__init__(model)
        for name, v in (("init_scale", init_scale), ("init_scale_hyper", init_scale_hyper)):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v <= sys.float_info.max:
                raise ValueError(f"MeanFieldGuide {name} must be a positive number, got {v!r}")
        if not isinstance(local_reparam, bool):
            raise ValueError(f"MeanFieldGuide local_reparam must be true or false, got {local_reparam!r}")
        self.init_scale = float(init_scale)
        self.init_scale_hyper = float(init_scale_hyper)
        self.local_reparam = local_reparam
        self.locs = nn.ParameterDict()
        self.log_scales = nn.ParameterDict()
        self.hyper: dict[str, tuple] = {}
        self._staged: dict = {}

    def _add_site(self, site):
        name, value = site["name"], site["value"]
        support = _event_support(site["fn"])
        if support is constraints.real:
            family, loc, log_scale = "normal", value, math.log(self.init_scale)
        elif is_positive(support):
            family, loc, log_scale = "lognormal", value.log(), math.log(self.init_scale_hyper)
        else:
            raise NotImplementedError(f"MeanFieldGuide: site {name!r} has support {support}; "
                                      "only real and positive sites are supported")
        loc = loc.detach().clone()
        log_scale = torch.full_like(loc, log_scale)
        q = self._distribution(family, loc, log_scale)
        prior = _base_distribution(site["fn"])
        if site["infer"].get("ps_role") in ("scale", "group") and HyperLayout.joins(q, prior):
            self._staged[name] = (loc, log_scale)
        else:
            self.locs[_key(name)] = nn.Parameter(loc)
            self.log_scales[_key(name)] = nn.Parameter(log_scale)
        self.sites[name] = {"family": family, "event_dim": value.dim(),
                            "local_reparam": self.local_reparam and family == "normal"
                            and site["infer"].get("ps_local_reparam_ok", False)
                            and has_closed_form(q.to_event(value.dim()), site["fn"])}

    def setup(self, *args, **kwargs):
        if self.sites:
            return self
        super().setup(*args, **kwargs)
        if self._staged:  # the flat hyper-site parameters: log-normal sites, then Gaussian ones
            order = sorted(self._staged, key=lambda n: self.sites[n]["family"] != "lognormal")
            offset = 0
            for name in order:
                n = self._staged[name][0].numel()
                self.hyper[name] = (offset, n, self._staged[name][0].shape)
                offset += n
            self.hyper_locs = nn.Parameter(torch.cat([self._staged[n][0].reshape(-1) for n in order]))
            self.hyper_log_scales = nn.Parameter(torch.cat([self._staged[n][1].reshape(-1) for n in order]))
            self._staged = {}
        return self

    def loc(self, name):
        """The posterior mean parameter of site ``name`` (log-space for a log-normal site): its
        own parameter, or a view of ``hyper_locs``."""
        place = self.hyper.get(name)
        if place is None:
            return self.locs[_key(name)]
        offset, n, shape = place
        return self.hyper_locs[offset: offset + n].view(shape)

    def log_scale(self, name):
        """The unclamped ``log sigma`` parameter of site ``name`` (a view for a flat hyper-site)."""
        place = self.hyper.get(name)
        if place is None:
            return self.log_scales[_key(name)]
        offset, n, shape = place
        return self.hyper_log_scales[offset: offset + n].view(shape)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        """Reads checkpoints written before hyper-sites were stored flat (one entry per site)."""
        if self.hyper and prefix + "hyper_locs" not in state_dict:
            keys = [(f"{prefix}locs.{_key(n)}", f"{prefix}log_scales.{_key(n)}") for n in self.hyper]
            if all(k in state_dict for pair in keys for k in pair):
                state_dict[prefix + "hyper_locs"] = torch.cat([state_dict.pop(a).reshape(-1) for a, _ in keys])
                state_dict[prefix + "hyper_log_scales"] = torch.cat([state_dict.pop(b).reshape(-1) for _, b in keys])
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @staticmethod
    def _distribution(family, loc, log_scale):
        log_scale = clamp(log_scale, LOG_SCALE_MIN, LOG_SCALE_MAX)
        if family == "normal":
            return LogScaleNormal(loc, log_scale)  # a Normal that keeps log sigma (cheaper KL terms)
        return dist.LogNormal(loc, log_scale.exp())

    def distribution(self, name):
        """The posterior distribution of site ``name`` (without event dims)."""
        info = self.sites[name]
        return self._distribution(info["family"], self.loc(name), self.log_scale(name))

    def posterior(self, name, values):
        return self.distribution(name)

    @torch.no_grad()
    def reinitialize(self, *args, **kwargs):
        """Move every posterior mean to the value the model's priors propose now (after the
        network's layers were started at new values, e.g. pretrained weights) and every scale back
        to its initial value; the sites stay the same parameters (an optimiser keeps them)."""
        for name, value in self._start_values(*args, **kwargs).items():
            info = self.sites[name]
            self.loc(name).copy_(value if info["family"] == "normal" else value.log())
            self.log_scale(name).fill_(math.log(self.init_scale if info["family"] == "normal"
                                                else self.init_scale_hyper))
        return self

    def median(self):
        out = {}
        for name, info in self.sites.items():
            loc = self.loc(name).detach()
            out[name] = loc if info["family"] == "normal" else loc.exp()
        return out

    def site_posterior(self, name):
        q = self.distribution(name)
        return q.loc.detach(), q.scale.detach().square()

    def log_alpha(self, name):
        """log alpha = log sigma^2 - log theta^2 of a Gaussian site (Molchanov et al. 2017)."""
        if self.sites[name]["family"] != "normal":
            raise ValueError(f"site {name!r} is not Gaussian")
        q = self.distribution(name)
        return log_alpha(q.loc, q.scale).detach()


class DeltaGuide(Guide):
    """Point-mass guide ``q(w) = delta(w - w_hat)``: the ELBO becomes the MAP objective
    ``log p(y | w_hat) + log p(w_hat)``. Positive sites are stored as logs."""

    spec_name = "delta"

    def __init__(self, model):
        super().__init__(model)
        self.values = nn.ParameterDict()

    def _add_site(self, site):
        name, value = site["name"], site["value"]
        support = _event_support(site["fn"])
        if support is constraints.real:
            family, raw = "real", value
        elif is_positive(support):
            family, raw = "positive", value.log()
        else:
            raise NotImplementedError(f"DeltaGuide: site {name!r} has support {support}")
        self.values[_key(name)] = nn.Parameter(raw.detach().clone())
        self.sites[name] = {"family": family, "event_dim": value.dim()}

    @torch.no_grad()
    def reinitialize(self, *args, **kwargs):
        """Move every point value to the value the model's priors propose now (see
        :meth:`MeanFieldGuide.reinitialize`)."""
        for name, value in self._start_values(*args, **kwargs).items():
            self.values[_key(name)].copy_(value if self.sites[name]["family"] == "real" else value.log())
        return self

    def value(self, name):
        """The point value ``w_hat`` of site ``name`` (differentiable in the guide's parameters):
        the parameter itself for a real site, its exponential for a positive one."""
        raw = self.values[_key(name)]
        return raw if self.sites[name]["family"] == "real" else raw.exp()

    def posterior(self, name, values):
        return dist.Delta(self.value(name))

    def median(self):
        return {name: self.value(name).detach() for name in self.sites}

    def site_posterior(self, name):
        """A point mass: variance 0 (infinite precision). Rules that need a posterior
        precision should use a Laplace approximation of a MAP fit instead."""
        value = self.value(name).detach()
        return value, torch.zeros_like(value)


class GaussianPosterior(Guide):
    """A fixed Gaussian posterior ``N(loc, var)`` per site, as a Pyro guide: what a Laplace fit's
    posterior is sampled with (posterior draws, the posterior predictive, ArviZ data). It has no
    trainable parameters; ``method`` names where the Gaussians came from (``laplace-...``)."""

    def __init__(self, model, marginals: dict, method: str = "gaussian"):
        super().__init__(model)
        self.method = method
        self.spec_name = method
        self._marginals = {}
        for name, (loc, var) in marginals.items():
            self._marginals[name] = (loc.detach().clone(), var.detach().clone())
            self.sites[name] = {"family": "normal", "event_dim": loc.dim()}

    def setup(self, *args, **kwargs):
        return self

    def posterior(self, name, values):
        loc, var = self._marginals[name]
        return dist.Normal(loc, var.sqrt())

    def median(self):
        return {name: loc for name, (loc, _) in self._marginals.items()}

    def site_posterior(self, name):
        return self._marginals[name]

    def log_alpha(self, name):
        loc, var = self._marginals[name]
        return log_alpha(loc, var.sqrt())


def build_guide(name: str, model, **options) -> Guide:
    if not isinstance(name, str) or name not in GUIDES:
        raise ValueError(f"unknown guide {name!r}; expected one of {sorted(GUIDES)}")
    return GUIDES[name](model, **options)

