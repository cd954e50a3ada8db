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

:class:`DirectELBO` computes the estimate of :class:`MeanFieldELBO` without Pyro for the models
where Pyro's run only relays distributions and draws (a mean-field guide under local
reparameterisation, with fixed priors or priors with hyper-sites; or a delta guide, i.e. MAP, with
fixed priors; sequential Linear/Conv networks, and converted modules whose Bayesian layers are
Linear/Conv layers each applied once per pass): same value, same random draws, a fraction of the
per-step overhead. :class:`MeanFieldELBO` stays the reference and the
path for every other model.
"""

from __future__ import annotations

from contextlib import nullcontext

import pyro.poutine as poutine
import torch
from pyro.distributions.util import scale_and_mask
from pyro.infer import ELBO
from pyro.poutine.messenger import Messenger
from torch.distributions import kl_divergence

from .distributions import (NormalKLTerms, kl_terms_for, neg_log_density_terms_for, pruning_factors,
                            reduced_normal, summed_neg_log_density)
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


_PRUNING_FACTORS = {}


def _cached_pruning_factors(mask, scale, like):
    """:func:`~pyro_sparse.distributions.pruning_factors`, computed again only when the mask
    tensor (object or contents: its version counter), the scale or ``like``'s dtype/device change."""
    key = (id(mask), float(scale), like.dtype, like.device)
    hit = _PRUNING_FACTORS.get(key)
    if hit is not None and hit[0] is mask and hit[1] == mask._version:
        return hit[2]
    if len(_PRUNING_FACTORS) > 64:  # masks replaced at each pruning step: drop the stale ones
        _PRUNING_FACTORS.clear()
    factors = pruning_factors(mask, scale, like)
    _PRUNING_FACTORS[key] = (mask, mask._version, factors)
    return factors


class _Plan:
    """What :class:`DirectELBO` needs to know about one (network, guide) pair, computed once.

    * ``steps``: per layer in order, ``(layer, None)`` for a parameter-free layer, else
      ``(layer, (weight site, bias site or None))``;
    * ``owners``: parameter site -> ``(prior, init)``, the :class:`~pyro_sparse.priors.Prior`
      object and the layer's deterministic initial value;
    * ``hyper``: hyper-site -> its prior distribution (from
      :meth:`~pyro_sparse.priors.Prior.hyper_priors`), in the guide's site order, which is the
      order the guide draws them in;
    * ``priors``: parameter site -> the prior of its own sample site when that does not depend on
      hyper-values (:meth:`~pyro_sparse.priors.Prior.fixed_site_prior`: a fixed prior, or the
      ``N(0, 1)`` of a non-centred one);
    * ``conditional``: the parameter sites whose prior depends on hyper-values (e.g. the Gaussian
      given a Gamma precision), in layer order;
    * ``point_mass``: the guide is a :class:`~pyro_sparse.guides.DeltaGuide`;
    * ``fused``: the ``(site, terms)`` of the sites in ``priors`` whose KL has a closed-form
      gradient, the ``terms`` from :func:`~pyro_sparse.distributions.kl_terms_for` (mean field) or
      :func:`~pyro_sparse.distributions.neg_log_density_terms_for` (point mass), and ``other``:
      the ``(site, prior)`` of the rest, both in layer order.
    """

    def __init__(self, network, guide):
        from .guides import DeltaGuide
        from .layers import _Stateless

        self.network, self.guide = network, guide
        self.point_mass = isinstance(guide, DeltaGuide)
        self.steps, self.priors, self.owners, self.conditional = [], {}, {}, []
        #: ``False`` for a converted module (:class:`~pyro_sparse.convert.BayesianModule`): its own
        #: ``forward`` runs, each Bayesian layer handed its values through a parameter scope
        self.sequential = hasattr(network, "layers")
        hyper = {}
        layers = network.layers.values() if self.sequential else [layer for _, layer in network.bayesian_layers()]
        for layer in layers:
            if isinstance(layer, _Stateless):
                self.steps.append((layer, None))
                continue
            priors = layer.priors()
            sites = []
            for param in ("weight", "bias"):
                if param not in priors:
                    sites.append(None)
                    continue
                site, prior, init = f"{layer.site}.{param}", priors[param], getattr(layer, f"{param}_init")
                self.owners[site] = (prior, init)
                hyper.update(prior.hyper_priors(site, init, layer.param_axes[param]))
                fixed = prior.fixed_site_prior(init)
                if fixed is None:
                    self.conditional.append(site)
                else:
                    self.priors[site] = fixed
                sites.append(site)
            self.steps.append((layer, tuple(sites)))
        self.hyper = {name: hyper[name] for name in guide.sites if name in hyper}
        self.fused, self.other = [], []
        terms_for = neg_log_density_terms_for if self.point_mass else kl_terms_for
        for site, prior in self.priors.items():
            terms = terms_for(prior)
            if terms is None:
                self.other.append((site, prior))
            else:
                self.fused.append((site, terms))


class DirectELBO(_LossFromDifferentiableLoss):
    r"""The estimate of :class:`MeanFieldELBO`, computed without Pyro, for a mean-field or a
    point-mass guide on a sequential network.

    For a sequential network of parameter-free layers and Linear/Conv2d-like layers
    (:class:`~pyro_sparse.layers._Parametric`) whose priors are fixed (Gaussian, log-uniform) or
    describe their hyper-sites (:meth:`~pyro_sparse.priors.Prior.hyper_priors`: Gaussian-Gamma,
    group log-uniform, horseshoe; mean-field guide only), the Pyro run of guide and model does
    nothing but draw the hyper-sites, hand each layer the guide's value of its parameters and
    record distributions for the prior term. Here that is done directly:

    .. math::

        -\mathcal{L} = \beta \sum_{\text{sites}} \mathrm{KL}(q(w) \,\|\, p(w))
                       - \frac{N}{B} \sum_{b=1}^{B} \log p(y_b \mid f(x_b)),

    with the network's output ``f(x)`` from the same
    :meth:`~pyro_sparse.layers._Parametric.compute` that each layer's ``forward`` calls, in the
    same order (so with the same torch seed both paths give the same loss and gradients), and the
    data term :meth:`~pyro_sparse.likelihoods.Likelihood.log_likelihood` times the data plate's
    scale N/B. What the guide hands the layers and the KL depend on the guide:

    * :class:`~pyro_sparse.guides.MeanFieldGuide` with every parameter site a Gaussian under local
      reparameterisation (Kingma, Salimans & Welling 2015; Molchanov et al. 2017): first the
      hyper-sites are drawn from the guide in its site order (:meth:`mean_field_terms`), then each
      layer gets :meth:`~pyro_sparse.priors.Prior.parameter` of ``GaussianWeight(mu, sigma^2)``
      given them (``s * eps`` for a non-centred prior) and samples its pre-activations; the KL of
      a parameter site is ``kl_divergence(guide.distribution(site), p(site | hyper-values))``,
      that of a hyper-site ``kl_divergence`` where registered, else the one-sample estimate. Where the prior's KL has known partial
      derivatives (:func:`~pyro_sparse.distributions.kl_terms_for`: log-uniform, scalar Gaussian)
      the variances and the KL of all such sites come from one autograd node
      (:meth:`~pyro_sparse.guides.MeanFieldGuide.local_terms`) whose backward is formed in the
      forward pass: on the CPU each kernel launch of the composed formula costs more than its
      arithmetic. This is ``MeanFieldELBO(local_reparam=True)``.
    * :class:`~pyro_sparse.guides.DeltaGuide` (MAP): each layer gets the point value ``w_hat``
      (plain tensors: nothing is sampled) and the KL of a point mass is
      ``log delta(w_hat) - log p(w_hat) = -log p(w_hat)`` (Pyro's registered
      ``kl_divergence(Delta, p)``; a ``Delta``'s log-density at its own value is 0), so

      .. math::

          -\mathcal{L} = -\beta \sum_{\text{sites}} \log p(\hat w)
                         - \frac{N}{B} \sum_b \log p(y_b \mid f(x_b; \hat w)),

      the MAP objective. ``log p`` is the prior's own ``log_prob``: for the improper log-uniform
      prior the unnormalised ``-log|w|``, as on the Pyro path. Where it has a known gradient
      (:func:`~pyro_sparse.distributions.neg_log_density_terms_for`: log-uniform, scalar
      Gaussian) the prior term of all such sites is one autograd node
      (:func:`~pyro_sparse.distributions.summed_neg_log_density`); other fixed priors go through
      ``log_prob``. Local reparameterisation does not apply (there is no variance), so this is
      ``MeanFieldELBO`` with either ``local_reparam``.

    Pyro's per-step cost (two traced runs through effect handlers, distribution objects, plates)
    is gone; :class:`MeanFieldELBO` remains the reference and the path for every other model.
    :meth:`supports` says whether a (network, guide) pair is eligible.

    Pruned weights (iterative BMR, :class:`~pyro_sparse.reduction.iterative.PrunedWeights`): with
    ``masks`` (site -> bool tensor, True = keep), both the posterior and the prior of a masked
    site are replaced elementwise by their reduced form,
    ``N(where(m, mu, 0), where(m, sigma, g_0)^2)``, as the handler does on the Pyro path; a pruned
    element then has ``KL(N(0, g_0^2) || N(0, g_0^2)) = 0``, a pre-activation contribution of
    variance ``g_0^2 x^2`` and a zero gradient. The dict is read at every call (the trainer
    updates it in place between epochs). Sites with a fixed scalar Gaussian prior, masked or not,
    stay in the fused node (masked ones through 0/1 factors,
    :func:`~pyro_sparse.distributions.pruning_factors`, cached per mask); other masked sites go
    through :func:`~pyro_sparse.distributions.reduced_normal` and ``kl_divergence``.

    Args:
        kl_weight: beta multiplying the KL terms (the trainer sets it every step).
        masks: site -> bool mask of the elements kept, or None (nothing pruned).
        pruned_scale: ``g_0``, the standard deviation of a pruned element (required with ``masks``).

    After each call ``last_terms`` holds the detached ``{"loglik", "kl"}`` of that estimate.
    """

    def __init__(self, kl_weight: float = 1.0, masks: dict | None = None, pruned_scale: float | None = None):
        if masks is not None and not (isinstance(pruned_scale, (int, float)) and pruned_scale > 0):
            raise ValueError(f"DirectELBO: pruned_scale must be a positive number with masks, got {pruned_scale!r}")
        self.kl_weight = kl_weight
        self.masks, self.pruned_scale = masks, (None if pruned_scale is None else float(pruned_scale))
        self.last_terms = {}
        self._plan = None

    # ------------------------------------------------------------------ eligibility
    @staticmethod
    def supports(network, guide) -> str | None:
        """None when the direct estimate equals the Pyro one for ``(network, guide)``, else a
        short reason why not. The guide must be set up (its sites known)."""
        from .convert import BayesianModule
        from .guides import DeltaGuide, MeanFieldGuide
        from .layers import _Parametric, _Stateless
        from .likelihoods import Likelihood
        from .network import BayesianNetwork

        base = next((b for b in (BayesianNetwork, BayesianModule) if isinstance(network, b)), None)
        if base is None:
            return f"the network is a {type(network).__name__}, neither a BayesianNetwork nor a BayesianModule"
        cls = type(network)
        if any(getattr(cls, m) is not getattr(base, m) for m in ("forward", "model", "_reshape")):
            return f"{cls.__name__} overrides the model or the forward pass"
        if type(guide) not in (MeanFieldGuide, DeltaGuide):
            return f"the guide is {type(guide).__name__}, neither the mean-field nor the delta guide"
        if guide.model != network.model:
            return "the guide was built for another model"
        if not guide.sites:
            return "the guide is not set up yet"
        if type(network.likelihood).observe is not Likelihood.observe:
            return f"the {type(network.likelihood).__name__} likelihood overrides observe"
        layers = network.layers.items() if base is BayesianNetwork else network.bayesian_layers()
        for name, layer in layers:
            if isinstance(layer, _Stateless):
                continue
            if not isinstance(layer, _Parametric):
                return f"layer {name!r} ({type(layer).__name__}) is neither parameter-free nor Linear/Conv2d-like"
            kind = type(layer)
            if (kind.forward is not _Parametric.forward or kind.sample_params is not _Parametric.sample_params
                    or kind.compute is _Parametric.compute):
                return f"layer {name!r} ({kind.__name__}) does not run compute(x, *sample_params())"
            if layer.shared:
                return (f"layer {name!r} is applied more than once per forward pass: its weights are drawn as "
                        "tensors shared by every application, not locally reparameterised")
        sites = network.param_sites()
        hyper = {}
        for site, (layer, param, prior) in sites.items():
            found = prior.hyper_priors(site, getattr(layer, f"{param}_init"), layer.param_axes[param])
            if found is None:
                return f"the {prior.spec_name} prior of {site} has hyper-variables the direct path does not know"
            if found and type(guide) is DeltaGuide:
                return f"the {prior.spec_name} prior of {site} has hyper-sites (the direct MAP objective has none)"
            hyper.update(found)
        if set(guide.sites) != set(sites) | set(hyper):
            extra = sorted(set(guide.sites) - set(sites) - set(hyper))
            return (f"the model has sites besides the layer parameters and their priors' hyper-sites: {extra[:3]}"
                    if extra else "the guide and the network's parameters differ")
        if type(guide) is DeltaGuide:
            for name, info in guide.sites.items():
                if info["family"] != "real":
                    return f"site {name} is not real-valued"
            return None
        for name, info in guide.sites.items():
            if name in hyper:
                if info["local_reparam"]:
                    return f"hyper-site {name} is under local reparameterisation"
            elif info["family"] != "normal" or not info["local_reparam"]:
                return f"site {name} is not a Gaussian under local reparameterisation"
        return None

    # ------------------------------------------------------------------ the estimate
    def plan(self, network, guide) -> _Plan:
        """The :class:`_Plan` of ``(network, guide)``, cached; ValueError when not supported."""
        plan = self._plan
        if plan is not None and plan.network is network and plan.guide is guide:
            return plan
        reason = self.supports(network, guide)
        if reason is not None:
            raise ValueError(f"DirectELBO does not apply: {reason}; use MeanFieldELBO")
        self._plan = plan = _Plan(network, guide)
        return plan

    @staticmethod
    def mean_field_terms(guide, plan, masks=None, pruned_scale=None):
        r"""``({site: what the layer uses}, sum_sites KL(q || p))`` of a mean-field guide, in the
        order of the Pyro path's random draws.

        1. The hyper-sites, in the guide's site order (as ``MeanFieldGuide.forward`` runs them):
           each is drawn from its posterior, ``v = q.rsample()`` (log-normal for scales and
           precisions, Gaussian for the ``z`` of the group log-uniform prior), and its KL is
           ``kl_divergence(q, p)`` where registered, else ``log q(v) - log p(v)`` with that draw
           (``MeanFieldELBO``'s rule).
        2. The parameter sites (local reparameterisation: nothing drawn): each gets
           ``GaussianWeight(mu, sigma^2)``; the KL against a prior that depends on no hyper-value
           comes from one fused node (:meth:`~pyro_sparse.guides.MeanFieldGuide.local_terms`)
           where :func:`~pyro_sparse.distributions.kl_terms_for` knows it, else from
           ``kl_divergence`` against :meth:`~pyro_sparse.priors.Prior.site_prior` given the drawn
           hyper-values.
        3. Each layer gets :meth:`~pyro_sparse.priors.Prior.parameter` of its site's Gaussian and
           the hyper-values (``s * eps`` for the non-centred priors), as ``Prior.sample`` hands it.

        A site with a mask in ``masks`` (see the class) has its posterior and prior reduced to
        ``N(0, pruned_scale^2)`` where the mask is False: in the fused node when its prior is a
        fixed scalar Gaussian (pruned elements: KL 0, variance ``pruned_scale^2``, no gradient),
        else with :func:`~pyro_sparse.distributions.reduced_normal` of both and their
        ``kl_divergence``, the Pyro path's term (which raises, as that path does, for a
        non-Gaussian prior).
        """
        masked = {} if not masks else {site: mask for site, mask in masks.items() if site in plan.owners}
        drawn, kl = {}, 0.0
        for name, p in plan.hyper.items():
            q = guide.distribution(name)
            v = drawn[name] = q.rsample()
            try:
                term = kl_divergence(q, p)
            except NotImplementedError:
                term = q.log_prob(v) - p.log_prob(v)
            kl = kl + term.sum()
        values = {}
        fused, elementwise = plan.fused, plan.other
        if masked:  # a Gaussian prior's masked site stays in the fused node; others are reduced below
            fused = [(site, terms) for site, terms in plan.fused
                     if site not in masked or isinstance(terms, NormalKLTerms)]
            elementwise = elementwise + [(site, plan.priors[site]) for site, terms in plan.fused
                                         if site in masked and not isinstance(terms, NormalKLTerms)]
        if fused:
            names = [site for site, _ in fused]
            pruning = None
            if masked:
                pruning = [None if site not in masked else
                           _cached_pruning_factors(masked[site], pruned_scale, guide.locs[site.replace(".", "__")])
                           for site in names]
            weights, fused_kl = guide.local_terms(names, [terms for _, terms in fused], pruning)
            values = dict(zip(names, weights))
            kl = fused_kl if not plan.hyper else kl + fused_kl
        for site, prior in elementwise:
            q = guide.distribution(site)
            if site in masked:
                q, prior = (reduced_normal(d, masked[site], pruned_scale, site) for d in (q, prior))
            values[site] = GaussianWeight(q.loc, q.variance)
            kl = kl + kl_divergence(q, prior).sum()
        for site in plan.conditional:
            prior, init = plan.owners[site]
            q, p = guide.distribution(site), prior.site_prior(site, init, drawn)
            if site in masked:
                q, p = (reduced_normal(d, masked[site], pruned_scale, site) for d in (q, p))
            values[site] = GaussianWeight(q.loc, q.variance)
            kl = kl + kl_divergence(q, p).sum()
        if drawn:
            for site, (prior, _) in plan.owners.items():
                values[site] = prior.parameter(site, values[site], drawn)
        return values, kl

    @staticmethod
    def point_mass_terms(guide, plan):
        """``({site: w_hat}, -sum_sites log p(w_hat))`` of a delta guide: the point values and
        ``KL(delta_{w_hat} || p) = log delta(w_hat) - log p(w_hat) = -log p(w_hat)``, one fused
        node (:func:`~pyro_sparse.distributions.summed_neg_log_density`) for the priors with a
        closed-form gradient, ``log_prob`` for the others."""
        values = {site: guide.value(site) for site in plan.priors}
        kl = 0.0
        if plan.fused:
            kl = summed_neg_log_density([terms for _, terms in plan.fused], [values[site] for site, _ in plan.fused])
        for site, prior in plan.other:
            kl = kl - prior.log_prob(values[site]).sum()
        return values, kl

    @staticmethod
    def forward(network, plan, values, x):
        """The network's output on ``x`` with the parameter values ``values`` (site -> tensor or
        GaussianWeight): each layer's ``compute``, as its ``forward`` would run it. A converted
        module runs its own ``forward`` with each layer handed its values through a parameter
        scope (:func:`~pyro_sparse.layers.param_scope`), so its layers compute in the order and
        with the random draws of the Pyro path."""
        if not plan.sequential:
            from .layers import param_scope

            given = {layer: (values[weight], None if bias is None else values[bias])
                     for layer, (weight, bias) in plan.steps}
            with param_scope(given):
                return network(x)
        h = network._reshape(x)
        for layer, sites in plan.steps:
            if sites is None:
                h = layer(h)
            else:
                weight, bias = sites
                h = layer.compute(h, values[weight], None if bias is None else values[bias])
        return h

    @staticmethod
    def data_term(network, out, y, dataset_size=None, subsample=None):
        """``(N / B) sum_b log p(y_b | out_b)``, the data plate's scale with ``N = dataset_size``
        (default: the batch) and ``B = len(subsample)`` (default: the batch)."""
        batch = out.shape[0]
        size = dataset_size if dataset_size is not None else batch
        scale = size / (len(subsample) if subsample is not None else batch)
        loglik = network.likelihood.log_likelihood(out, y)
        return loglik if scale == 1 else loglik * scale

    def terms(self, network, guide, x, y, dataset_size=None, subsample=None):
        """(expected log-likelihood estimate, total KL), both differentiable; the same as
        ``MeanFieldELBO(local_reparam=True).terms(network.model, guide, x, y, ...)``."""
        if not guide.sites:
            guide.setup(x, y, dataset_size=dataset_size, subsample=subsample)
        plan = self.plan(network, guide)
        if plan.point_mass:
            if self.masks:
                raise ValueError("DirectELBO: masks (pruned weights) need the mean-field guide, got a DeltaGuide")
            values, kl = self.point_mass_terms(guide, plan)
        else:
            values, kl = self.mean_field_terms(guide, plan, self.masks, self.pruned_scale)
        out = self.forward(network, plan, values, x)
        return self.data_term(network, out, y, dataset_size, subsample), kl

    def differentiable_loss(self, network, guide, x, y, dataset_size=None, subsample=None):
        """``kl_weight * KL - (N/B) log-likelihood``; sets ``last_terms``."""
        loglik, kl = self.terms(network, guide, x, y, dataset_size, subsample)
        self.last_terms = {"loglik": loglik.detach(), "kl": torch.as_tensor(kl).detach()}
        return (kl if self.kl_weight == 1 else self.kl_weight * kl) - loglik  # 1 * kl is kl: one node fewer
