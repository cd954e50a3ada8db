"""The evidence lower bound used for SVI, with analytic KL terms and local reparameterisation.

    ELBO = E_q[ log p(y | w) ] - beta * sum_sites KL( q(w_site) || p(w_site | parents) )

The data term is Pyro's: the likelihood sits in a subsampled plate, so a mini-batch's
log-likelihood is scaled by N/B. The KL of a site is taken in closed form when
``torch.distributions.kl_divergence`` knows the pair (Normal-Normal, Normal-LogUniform,
LogNormal-Gamma, ...) and estimated with the guide's sample otherwise, exactly as
``pyro.infer.TraceMeanField_ELBO`` does. Two differences make it the fast path:

* it computes no log-densities it does not need (``TraceMeanField_ELBO`` scores every site of
  both traces before it looks for a KL), and
* it activates :class:`~pyro_sparse.local_reparam.LocalReparameterization`, so weight
  sites with a closed-form KL are never sampled: layers sample their pre-activations.

``beta`` (``kl_weight``) is the KL warm-up factor (Sonderby et al. 2016; Molchanov et al. 2017).
With ``kl_weight=1`` and ``local_reparam=False`` the estimate has the same distribution as
``TraceMeanField_ELBO``'s.

:class:`DirectELBO` computes the estimate of ``MeanFieldELBO(local_reparam=True)`` without Pyro
for the models where Pyro's run only relays distributions (mean-field guide, fixed priors,
sequential Linear/Conv2d networks): same value, same random draws, a fraction of the per-step
overhead. :class:`MeanFieldELBO` stays the reference and the path for every other model.
"""

from __future__ import annotations

from contextlib import nullcontext

import pyro.poutine as poutine
import torch
from pyro.distributions.util import scale_and_mask
from pyro.infer import ELBO
from pyro.poutine.messenger import Messenger
from torch.distributions import kl_divergence

from .distributions import kl_terms_for
from .local_reparam import GaussianWeight, LocalReparameterization


class _SiteRecorder(Messenger):
    """A light ``poutine.trace`` (+ ``poutine.replay``) for the ELBO's hot path.

    Records each sample site's message by name, without building a ``Trace`` graph or copying
    messages; with ``replay`` (name -> guide message) it sets the value of latent sites from the
    guide, as ``ReplayMessenger`` does. One SVI step runs it twice; ``traces()`` keeps returning
    real Pyro traces for anyone who wants them.
    """

    def __init__(self, replay=None):
        super().__init__()
        self.sites = {}
        self.replay = replay

    def _pyro_sample(self, msg):
        if self.replay is not None and not msg["is_observed"]:
            guide_msg = self.replay.get(msg["name"])
            if guide_msg is not None:
                msg["done"] = True
                msg["value"] = guide_msg["value"]

    def _pyro_post_sample(self, msg):
        if msg["name"] in self.sites:
            raise RuntimeError(f"Multiple sample sites named {msg['name']!r}")
        self.sites[msg["name"]] = msg


class _LossFromDifferentiableLoss:
    """``loss`` and ``loss_and_grads`` (the ``pyro.infer.SVI`` interface) from ``differentiable_loss``."""

    def loss(self, model, guide, *args, **kwargs):
        with torch.no_grad():
            return float(self.differentiable_loss(model, guide, *args, **kwargs))

    def loss_and_grads(self, model, guide, *args, **kwargs):
        loss = self.differentiable_loss(model, guide, *args, **kwargs)
        loss.backward()
        return float(loss.detach())


class MeanFieldELBO(_LossFromDifferentiableLoss, ELBO):
    """Negative ELBO as a differentiable loss; a drop-in ``loss`` for ``pyro.infer.SVI``.

    Args:
        kl_weight: beta multiplying the KL (prior) terms; 1 is the ELBO.
        local_reparam: sample pre-activations instead of weights where possible.

    After each call ``last_terms`` holds the detached ``{"loglik", "kl"}`` of that estimate.
    """

    def __init__(self, kl_weight: float = 1.0, local_reparam: bool = True):
        super().__init__(num_particles=1)
        self.kl_weight = kl_weight
        self.local_reparam = local_reparam
        self.last_terms = {}

    def traces(self, model, guide, *args, **kwargs):
        """(model_trace, guide_trace) of one joint run, guide first, model replayed on it."""
        with LocalReparameterization() if self.local_reparam else nullcontext():
            guide_trace = poutine.trace(guide).get_trace(*args, **kwargs)
            model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(*args, **kwargs)
        return model_trace, guide_trace

    def _get_trace(self, model, guide, args, kwargs):
        return self.traces(model, guide, *args, **kwargs)

    def terms(self, model, guide, *args, **kwargs):
        """(expected log-likelihood estimate, total KL estimate), both differentiable."""
        with LocalReparameterization() if self.local_reparam else nullcontext():
            with _SiteRecorder() as guide_rec:
                guide(*args, **kwargs)
            with _SiteRecorder(replay=guide_rec.sites) as model_rec:
                model(*args, **kwargs)
        loglik, kl = 0.0, 0.0
        for name, site in model_rec.sites.items():
            if type(site["fn"]).__name__ == "_Subsample":
                continue
            if site["is_observed"]:
                term = site["fn"].log_prob(site["value"])
                loglik = loglik + scale_and_mask(term, site["scale"], site["mask"]).sum()
                continue
            guide_site = guide_rec.sites[name]
            try:
                term = kl_divergence(guide_site["fn"], site["fn"])
            except NotImplementedError:
                term = guide_site["fn"].log_prob(guide_site["value"]) - site["fn"].log_prob(site["value"])
            kl = kl + scale_and_mask(term, guide_site["scale"], guide_site["mask"]).sum()
        return loglik, kl

    def differentiable_loss(self, model, guide, *args, **kwargs):
        loglik, kl = self.terms(model, guide, *args, **kwargs)
        self.last_terms = {"loglik": torch.as_tensor(loglik).detach(), "kl": torch.as_tensor(kl).detach()}
        return self.kl_weight * kl - loglik


class DirectELBO(_LossFromDifferentiableLoss):
    r"""The estimator of ``MeanFieldELBO(local_reparam=True)``, computed without Pyro.

    For a sequential network of parameter-free layers and Linear/Conv2d-like layers
    (:class:`~pyro_sparse.layers._Parametric`), a :class:`~pyro_sparse.guides.MeanFieldGuide`
    whose every site is a Gaussian weight or bias under local reparameterisation, and fixed
    priors (Gaussian, log-uniform: no hyper-sites), the Pyro run of guide and model does nothing
    but hand each layer the guide's ``N(mu, sigma^2)`` and record distributions for the KL. Here
    that is done directly (Kingma, Salimans & Welling 2015; Molchanov et al. 2017):

    .. math::

        -\mathcal{L} = \beta \sum_{\text{sites}} \mathrm{KL}(q(w) \,\|\, p(w))
                       - \frac{N}{B} \sum_{b=1}^{B} \log p(y_b \mid f(x_b)),

    where each layer samples its pre-activations from ``GaussianWeight(mu, sigma^2)`` through the
    same :meth:`~pyro_sparse.layers._Parametric.compute` that its ``forward`` calls, in the same
    order (so with the same torch seed both give the same loss and gradients), the KL of each site
    is ``kl_divergence(guide.distribution(site), prior.fixed_distribution(init))`` and the data
    term is :meth:`~pyro_sparse.likelihoods.Likelihood.log_likelihood` times the data plate's
    scale N/B. Pyro's per-step cost (two traced runs through effect handlers, distribution
    objects, plates) is gone; :class:`MeanFieldELBO` remains the reference and the path for every
    other model. :meth:`supports` says whether a (network, guide) pair is eligible.

    Where the prior's KL has known partial derivatives
    (:func:`~pyro_sparse.distributions.kl_terms_for`: log-uniform, scalar Gaussian) the guide's
    variances and the KL of all such sites come from one autograd node
    (:meth:`~pyro_sparse.guides.MeanFieldGuide.local_terms`) whose backward is formed in the
    forward pass: on the CPU each kernel launch of the composed formula costs more than its
    arithmetic. Other fixed priors go through ``kl_divergence``.

    Args:
        kl_weight: beta multiplying the KL terms (the trainer sets it every step).

    After each call ``last_terms`` holds the detached ``{"loglik", "kl"}`` of that estimate.
    """

    def __init__(self, kl_weight: float = 1.0):
        self.kl_weight = kl_weight
        self.last_terms = {}
        self._plan = None

    # ------------------------------------------------------------------ eligibility
    @staticmethod
    def supports(network, guide) -> str | None:
        """None when the direct estimate equals the Pyro one for ``(network, guide)``, else a
        short reason why not. The guide must be set up (its sites known)."""
        from .guides import MeanFieldGuide
        from .layers import _Parametric, _Stateless
        from .likelihoods import Likelihood
        from .network import BayesianNetwork

        if not isinstance(network, BayesianNetwork):
            return f"the network is a {type(network).__name__}, not a BayesianNetwork"
        cls = type(network)
        if any(getattr(cls, m) is not getattr(BayesianNetwork, m) for m in ("forward", "model", "_reshape")):
            return f"{cls.__name__} overrides the model or the forward pass"
        if type(guide) is not MeanFieldGuide:
            return f"the guide is {type(guide).__name__}, not the mean-field guide"
        if guide.model != network.model:
            return "the guide was built for another model"
        if not guide.sites:
            return "the guide is not set up yet"
        if type(network.likelihood).observe is not Likelihood.observe:
            return f"the {type(network.likelihood).__name__} likelihood overrides observe"
        sites = network.param_sites()
        if set(guide.sites) != set(sites):
            extra = sorted(set(guide.sites) - set(sites))
            return (f"the model has sites besides the layer parameters: {extra[:3]}" if extra
                    else "the guide and the network's parameters differ")
        for name, layer in network.layers.items():
            if isinstance(layer, _Stateless):
                continue
            if not isinstance(layer, _Parametric):
                return f"layer {name!r} ({type(layer).__name__}) is neither parameter-free nor Linear/Conv2d-like"
            kind = type(layer)
            if (kind.forward is not _Parametric.forward or kind.sample_params is not _Parametric.sample_params
                    or kind.compute is _Parametric.compute):
                return f"layer {name!r} ({kind.__name__}) does not run compute(x, *sample_params())"
            for param, prior in layer.priors().items():
                site = f"{layer.site}.{param}"
                if prior.fixed_distribution(getattr(layer, f"{param}_init")) is None:
                    return f"the {prior.spec_name} prior of {site} has hyper-variables"
        for name, info in guide.sites.items():
            if info["family"] != "normal" or not info["local_reparam"]:
                return f"site {name} is not a Gaussian under local reparameterisation"
        return None

    # ------------------------------------------------------------------ the estimate
    def _steps(self, network, guide):
        """Cached per (network, guide): the steps, ``(layer, None)`` for a parameter-free layer,
        else ``(layer, (weight, bias))`` with ``(site, prior distribution, kl_terms)`` per parameter
        (None for an absent bias; ``kl_terms`` None where the KL goes through ``kl_divergence``),
        and the ``(site, kl_terms)`` of the sites whose KL has a closed-form gradient."""
        plan = self._plan
        if plan is not None and plan[0] is network and plan[1] is guide:
            return plan[2]
        reason = self.supports(network, guide)
        if reason is not None:
            raise ValueError(f"DirectELBO does not apply: {reason}; use MeanFieldELBO")
        from .layers import _Stateless

        steps = []
        for layer in network.layers.values():
            if isinstance(layer, _Stateless):
                steps.append((layer, None))
                continue
            priors = layer.priors()
            params = []
            for param in ("weight", "bias"):
                if param not in priors:
                    params.append(None)
                    continue
                prior = priors[param].fixed_distribution(getattr(layer, f"{param}_init"))
                params.append((f"{layer.site}.{param}", prior, kl_terms_for(prior)))
            steps.append((layer, tuple(params)))
        fused = [(entry[0], entry[2]) for _, params in steps if params for entry in params
                 if entry is not None and entry[2] is not None]
        self._plan = (network, guide, (steps, fused))
        return steps, fused

    def terms(self, network, guide, x, y, dataset_size=None, subsample=None):
        """(expected log-likelihood estimate, total KL), both differentiable; the same as
        ``MeanFieldELBO(local_reparam=True).terms(network.model, guide, x, y, ...)``."""
        if not guide.sites:
            guide.setup(x, y, dataset_size=dataset_size, subsample=subsample)
        steps, fused = self._steps(network, guide)
        # the guide's Gaussians and their KL: one node for every site with a closed-form KL
        # gradient, kl_divergence for the others (no random draws, so the order is free)
        values, kl = {}, 0.0
        if fused:
            weights, kl = guide.local_terms([site for site, _ in fused], [terms for _, terms in fused])
            values = dict(zip((site for site, _ in fused), weights))
        h = network._reshape(x)
        for layer, params in steps:
            if params is None:
                h = layer(h)
                continue
            args = []
            for entry in params:
                if entry is None:
                    args.append(None)
                    continue
                site, prior, kl_terms = entry
                if kl_terms is None:
                    q = guide.distribution(site)
                    values[site] = GaussianWeight(q.loc, q.variance)
                    kl = kl + kl_divergence(q, prior).sum()
                args.append(values[site])
            h = layer.compute(h, *args)
        batch = h.shape[0]
        size = dataset_size if dataset_size is not None else batch
        scale = size / (len(subsample) if subsample is not None else batch)  # the data plate's N / B
        loglik = network.likelihood.log_likelihood(h, y)
        return (loglik if scale == 1 else loglik * scale), kl

    def differentiable_loss(self, network, guide, x, y, dataset_size=None, subsample=None):
        """``kl_weight * KL - (N/B) log-likelihood``; sets ``last_terms``."""
        loglik, kl = self.terms(network, guide, x, y, dataset_size, subsample)
        self.last_terms = {"loglik": loglik.detach(), "kl": torch.as_tensor(kl).detach()}
        return (kl if self.kl_weight == 1 else self.kl_weight * kl) - loglik  # 1 * kl is kl: one node fewer
