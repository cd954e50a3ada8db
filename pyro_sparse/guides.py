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
from torch.distributions import kl_divergence

from .distributions import LogScaleNormal, _constants, clamp, log_alpha
from .local_reparam import GaussianWeight
from .registry import GUIDES

#: documented range of log sigma for every Gaussian/log-normal posterior scale: sigma in
#: [exp(-12), exp(4)] ~ [6e-6, 55]; keeps log-variances finite (Sparse VD can drive sigma to 0).
LOG_SCALE_MIN, LOG_SCALE_MAX = -12.0, 4.0



def _init_from_prior(site):
    init = site["infer"].get("ps_init")
    if init is not None:
        return init.detach().clone()
    return init_to_feasible(site)


def _key(name: str) -> str:
    return name.replace(".", "__")


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

    The observation site is hidden: without ``y`` it would otherwise look latent."""
    hidden = poutine.block(model, hide=["obs"])
    with torch.no_grad():
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
        self.locs[_key(name)] = nn.Parameter(loc.detach().clone())
        self.log_scales[_key(name)] = nn.Parameter(torch.full_like(loc, log_scale))
        q = self._distribution(family, self.locs[_key(name)], self.log_scales[_key(name)])
        self.sites[name] = {"family": family, "event_dim": value.dim(),
                            "local_reparam": self.local_reparam and family == "normal"
                            and site["infer"].get("ps_local_reparam_ok", False)
                            and _has_analytic_kl(q.to_event(value.dim()), site["fn"])}

    @staticmethod
    def _distribution(family, loc, log_scale):
        log_scale = clamp(log_scale, LOG_SCALE_MIN, LOG_SCALE_MAX)
        if family == "normal":
            return LogScaleNormal(loc, log_scale)  # a Normal that keeps log sigma (cheaper KL terms)
        return dist.LogNormal(loc, log_scale.exp())

    def distribution(self, name):
        """The posterior distribution of site ``name`` (without event dims)."""
        info = self.sites[name]
        return self._distribution(info["family"], self.locs[_key(name)], self.log_scales[_key(name)])

    def forward(self, *args, **kwargs):
        if not self.sites:
            self.setup(*args, **kwargs)
        for name, info in self.sites.items():
            pyro.sample(name, self.distribution(name).to_event(info["event_dim"]),
                        infer={"ps_local_reparam": info["local_reparam"]})

    def local_terms(self, names, kl_terms, pruning=None):
        """``([GaussianWeight(mu, sigma^2) per site], sum_sites sum KL(q || p))`` for the Gaussian
        sites ``names``, in one autograd node (:class:`_LocalTerms`): what layers under local
        reparameterisation and the ELBO's KL take from this guide, the KL of each site by its
        ``kl_terms`` (from :func:`~pyro_sparse.distributions.kl_terms_for` of the site's fixed
        prior). Same values and gradients as ``distribution(name)`` followed by its ``variance``
        and ``kl_divergence(..., prior).sum()``; used by :class:`~pyro_sparse.elbo.DirectELBO`.

        ``pruning``: per site None or the ``(keep, fill)`` of
        :func:`~pyro_sparse.distributions.pruning_factors` (a weight pruned by iterative BMR):
        a pruned element gets ``GaussianWeight(0, g_0^2)``, KL 0 (that of ``N(0, g_0^2)``
        against the reduced prior ``N(0, g_0^2)``, for Gaussian priors) and zero gradient, as
        :func:`~pyro_sparse.distributions.reduced_normal` of posterior and prior gives."""
        locs = [self.locs[_key(name)] for name in names]
        pruning = tuple(pruning) if pruning is not None else (None,) * len(names)
        out = _LocalTerms.apply(tuple(kl_terms), pruning, *locs, *(self.log_scales[_key(name)] for name in names))
        # a kept element's mean is mu * 1 = mu, a pruned one's mu * 0 = 0, and no gradient reaches it
        return ([GaussianWeight(loc if factors is None else loc * factors[0], var)
                 for loc, var, factors in zip(locs, out[:-1], pruning)], out[-1])

    @torch.no_grad()
    def reinitialize(self, *args, **kwargs):
        """Move every posterior mean to the value the model's priors propose now (after the
        network's layers were started at new values, e.g. pretrained weights) and every scale back
        to its initial value; the sites stay the same parameters (an optimiser keeps them)."""
        for name, value in self._start_values(*args, **kwargs).items():
            info = self.sites[name]
            self.locs[_key(name)].copy_(value if info["family"] == "normal" else value.log())
            self.log_scales[_key(name)].fill_(math.log(self.init_scale if info["family"] == "normal"
                                                       else self.init_scale_hyper))
        return self

    def median(self):
        out = {}
        for name, info in self.sites.items():
            loc = self.locs[_key(name)].detach()
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


class _LocalTerms(torch.autograd.Function):
    """Variances and total KL of mean-field Gaussian sites from their raw parameters
    ``(mu, log sigma)``: per site ``l = clamp(log sigma)``, ``var = exp(2 l)`` and the summed KL
    ``sum kl(mu, l)``, as one autograd node for all sites.

    Backward, with ``g_var`` from each layer and ``g_kl`` from the ELBO:
    ``d/d mu = g_kl dkl/dmu`` and ``d/d log sigma = [2 var g_var + g_kl dkl/dl] 1{clamp inactive}``,
    the partial derivatives of the KL formed in the forward pass: at most three passes over each
    site instead of autograd's clamp, exp and KL nodes, their sums and the kernels of each."""

    @staticmethod
    def forward(ctx, kl_terms, pruning, *params):
        ctx.set_materialize_grads(False)
        need = any(ctx.needs_input_grad)
        sites = len(kl_terms)
        variances, kls, saved = [], [], []
        for terms, factors, loc, raw in zip(kl_terms, pruning, params[:sites], params[sites:]):
            log_scale = raw.clamp(LOG_SCALE_MIN, LOG_SCALE_MAX)
            var = torch.mul(log_scale, _constants((2.0,), loc)[0]).exp_()  # exp(2 l), as LogScaleNormal.variance
            kl, d_loc, d_log_scale = terms(loc, log_scale, var, need)
            inside = log_scale.eq_(raw) if need else None  # 1.0 where the clamp is inactive
            out_var = var
            if factors is not None:  # pruned: N(0, g0^2) against N(0, g0^2): KL 0, variance g0^2, no gradient
                keep, fill = factors  # exact: x * 1 + 0 = x, x * 0 + g0^2 = g0^2 (x finite)
                kl = kl * keep
                out_var = torch.addcmul(fill, var, keep)
                if need:
                    d_loc = d_loc * keep
                    inside = inside.mul_(keep)
            kls.append(kl.sum())
            variances.append(out_var)
            if need:
                saved += [var, d_loc, d_log_scale, inside]
        if need:
            ctx.save_for_backward(*saved)
        return (*variances, torch.stack(kls).sum() if sites > 1 else kls[0])

    @staticmethod
    def backward(ctx, *grads):
        g_vars, g_kl = grads[:-1], grads[-1]
        saved = ctx.saved_tensors
        # the KL's gradient is usually exactly 1 (kl_weight 1): then skip multiplying by it (the
        # host read is free on the CPU); a saved tensor returned as a gradient is copied, not
        # aliased, by autograd if it becomes a .grad
        unit = g_kl is not None and g_kl.device.type == "cpu" and float(g_kl) == 1.0
        g_locs, g_log_scales = [], []
        for i, g_var in enumerate(g_vars):
            var, d_loc, d_log_scale, inside = saved[4 * i: 4 * i + 4]
            g_loc = g_log_scale = None
            if g_kl is not None:
                g_loc = d_loc if unit else d_loc * g_kl
                g_log_scale = d_log_scale if unit else d_log_scale * g_kl
            if g_var is not None:
                g_log_scale = (g_var * var * 2.0 if g_log_scale is None
                               else torch.addcmul(g_log_scale, g_var, var, value=2.0) if unit
                               else g_log_scale.addcmul_(g_var, var, value=2.0))
            if g_log_scale is not None:
                g_log_scale = g_log_scale * inside if g_log_scale is d_log_scale else g_log_scale.mul_(inside)
            g_locs.append(g_loc)
            g_log_scales.append(g_log_scale)
        return (None, None, *g_locs, *g_log_scales)


def _has_analytic_kl(q, p):
    try:
        kl_divergence(q, p)
        return True
    except NotImplementedError:
        return False


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

    def forward(self, *args, **kwargs):
        if not self.sites:
            self.setup(*args, **kwargs)
        for name, info in self.sites.items():
            pyro.sample(name, dist.Delta(self.value(name), event_dim=info["event_dim"]))

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

    def forward(self, *args, **kwargs):
        for name, info in self.sites.items():
            loc, var = self._marginals[name]
            pyro.sample(name, dist.Normal(loc, var.sqrt()).to_event(info["event_dim"]))

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

