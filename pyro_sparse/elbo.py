"""The evidence lower bound used for SVI, with analytic KL terms and local reparameterisation.

    ELBO = E_q[ log p(y | w) ] - beta * sum_sites KL( q(site) || p(site | parents) )

The data term sits in a subsampled plate, so a mini-batch's log-likelihood is scaled by N/B. The
KL of a site is taken in closed form where :mod:`pyro_sparse.kl` knows the pair and estimated with
the guide's draw otherwise, exactly as ``pyro.infer.TraceMeanField_ELBO`` does. Weight sites with
a closed-form KL are not drawn under local reparameterisation (Kingma, Salimans & Welling 2015;
Molchanov et al. 2017): their layers draw pre-activations. ``beta`` (``kl_weight``) is the KL
warm-up factor (Sonderby et al. 2016).

Two implementations of the same estimate, built on the same declarations (the priors'
:meth:`~pyro_sparse.priors.Prior.hyper_sites`, ``site_prior`` and ``parameter``; the likelihood's
``hyper_sites``; the guides' :meth:`~pyro_sparse.guides.Guide.posterior`):

* :class:`CoreELBO`, the one used for fitting: it draws from the guide in its site order, takes
  the KL of every site from the declarations (one fused autograd node for the Gaussian weights
  under local reparameterisation, one for all the hyper-sites, :mod:`pyro_sparse.kl`) and runs the
  network's own ``forward`` with those values handed to its priors
  (:func:`~pyro_sparse.priors.provided`), so every layer, guide and likelihood of the library runs
  on it, recurrent, attention and converted modules included, without Pyro's per-step cost;
* :class:`MeanFieldELBO`, the reference: guide and model run through Pyro's effect handlers
  (``elbo: pyro`` in a recipe). With the same torch seed both give the same loss and gradients.
"""

from __future__ import annotations

from contextlib import nullcontext

import pyro.poutine as poutine
import torch
from pyro.distributions.util import scale_and_mask
from pyro.infer import ELBO
from pyro.poutine.messenger import Messenger
from torch.distributions import kl_divergence

from .kl import (
    KERNELS,
    HyperLayout,
    NormalKLTerms,
    family,
    hyper_terms,
    kernel_for,
    kl_terms_for,
    local_terms,
    neg_log_density_for,
    point_terms,
    pruning_factors,
    reduced_normal,
)
from .local_reparam import GaussianWeight, LocalReparameterization
from .priors import Prior, Values, provided


class _SiteRecorder(Messenger):
    """A light ``poutine.trace`` (+ ``poutine.replay``) for the Pyro path's hot loop.

    Records each sample site's message by name, without building a ``Trace`` graph or copying
    messages; with ``replay`` (name -> guide message) it sets the value of latent sites from the
    guide, as ``ReplayMessenger`` does. ``traces()`` keeps returning real Pyro traces.
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


class _Loss:
    """``loss`` and ``loss_and_grads`` (the ``pyro.infer.SVI`` interface) from ``differentiable_loss``;
    ``last_terms`` holds the detached ``{"loglik", "kl"}`` of the last estimate."""

    kl_weight = 1.0

    def loss(self, model, guide, *args, **kwargs):
        with torch.no_grad():
            return float(self.differentiable_loss(model, guide, *args, **kwargs))

    def loss_and_grads(self, model, guide, *args, **kwargs):
        loss = self.differentiable_loss(model, guide, *args, **kwargs)
        loss.backward()
        return float(loss.detach())

    def differentiable_loss(self, model, guide, *args, **kwargs):
        """``kl_weight * KL - (N/B) log-likelihood`` of :meth:`terms`; sets ``last_terms``."""
        loglik, kl = self.terms(model, guide, *args, **kwargs)
        self.last_terms = {"loglik": torch.as_tensor(loglik).detach(), "kl": torch.as_tensor(kl).detach()}
        return (kl if self.kl_weight == 1 else self.kl_weight * kl) - loglik  # 1 * kl is kl: one node fewer


class MeanFieldELBO(_Loss, ELBO):
    """The negative ELBO through Pyro: the reference implementation, ``elbo: pyro``.

    Guide and model run through effect handlers (the guide first, the model replayed on its
    draws); the KL of each latent site is ``kl_divergence(q, p)`` where registered, else
    ``log q(v) - log p(v)`` at the draw; the observed site gives the data term. A drop-in
    ``loss`` for ``pyro.infer.SVI``; :meth:`terms` is ``(loglik, KL)``.

    Args:
        kl_weight: beta multiplying the KL (prior) terms; 1 is the ELBO.
        local_reparam: sample pre-activations instead of weights where possible.
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


# ---------------------------------------------------------------------------- the core
class _Site:
    """One guide site as the core treats it (:class:`_Plan`): a hyper-site with its prior, or a
    parameter's own site with its owner ``(prior, init)``; ``fixed`` is its prior when that
    depends on no hyper-value."""

    __slots__ = ("name", "prior", "owner", "fixed", "local", "fused", "point")

    def __init__(self, name, prior=None, owner=None):
        self.name, self.prior, self.owner = name, prior, owner
        self.fixed = (prior if owner is None else None if owner[0].conditional
                      else owner[0].site_prior(name, owner[1], {}))
        self.local = self.fused = False
        self.point = None  # a point mass's -log p(w), where the prior is fixed

    def prior_given(self, values):
        """``p(site | hyper-values)``."""
        return self.fixed if self.fixed is not None else self.owner[0].site_prior(self.name, self.owner[1], values)


class _Plan:
    """What :class:`CoreELBO` needs to know about one (network, guide) pair, computed once: every
    guide site in the guide's order (:class:`_Site`), sorted into

    * ``layout`` (:class:`~pyro_sparse.kl.HyperLayout`): the hyper-sites the mean-field guide
      stores flat, drawn and scored in one node (unless a drawn site of a structured guide depends
      on them, which needs them earlier);
    * ``local``: parameter sites under local reparameterisation (the guide decided at set-up), of
      which ``fused`` ones (a Gaussian posterior of the mean-field guide, or of the structured
      guide with its mean shifted by the hyper-values, and a fixed prior
      :func:`~pyro_sparse.kl.kl_terms_for` knows) go through :func:`~pyro_sparse.kl.local_terms`;
    * ``draw_order``: the sites drawn from ``guide.posterior``, in order;
    * with a point-mass guide (MAP) nothing is drawn: a site's KL is ``-log p(w_hat)``, in one
      node (:func:`~pyro_sparse.kl.point_terms`) for the ``fused_point`` sites whose fixed prior
      has known terms, else :func:`~pyro_sparse.kl.neg_log_density_for`.
    """

    def __init__(self, network, guide, local_reparam):
        from .guides import DeltaGuide

        self.network, self.guide = network, guide
        self.point_mass = isinstance(guide, DeltaGuide)
        declared = {}
        for site, (layer, param, prior) in network.param_sites().items():
            init = getattr(layer, f"{param}_init")
            declared.update((name, _Site(name, h.prior)) for name, h in
                            prior.hyper_sites(site, init, layer.param_axes[param]).items())
            declared[site] = _Site(site, owner=(prior, init))
        like = next(iter(guide.parameters()), torch.zeros(()))
        declared.update((name, _Site(name, h.prior)) for name, h in network.likelihood.hyper_sites(like).items())
        self.sites = [declared[name] for name in guide.sites]
        self.layout = None
        if self.point_mass:
            for s in self.sites:
                s.point = neg_log_density_for(s.fixed) if s.fixed is not None else None
                s.fused = s.point is not None and kl_terms_for(s.fixed) is not None
            self.fused_point = [(s.name, kl_terms_for(s.fixed)) for s in self.sites if s.fused]
            return
        early = any("group_sites" in info and not (local_reparam and info["local_reparam"])
                    for info in guide.sites.values())
        flat = {} if early else getattr(guide, "hyper", {})
        for s in self.sites:
            info = guide.sites[s.name]
            if s.owner is None:
                s.fused = s.name in flat
                continue
            s.local = local_reparam and info.get("local_reparam", False)
            plain = hasattr(guide, "locs") and info.get("block") is None  # a structured site: its mean shifts
            s.fused = s.local and plain and s.fixed is not None and kl_terms_for(s.fixed) is not None
        if flat and not early:
            self.layout = HyperLayout(guide, {s.name: s.prior for s in self.sites if s.fused and s.owner is None})
        self.draw_order = [s for s in self.sites if not s.local]
        self.fused_local = [(s.name, kl_terms_for(s.fixed)) for s in self.sites if s.fused and s.owner is not None]
        #: fused sites whose posterior mean depends on the hyper-values (structured guide): taken
        #: from ``guide.posterior(site, values)``, the others straight from the guide's parameter
        self.conditional_loc = {s.name for s in self.sites if s.fused and "group_sites" in guide.sites[s.name]}
        self.generic_local = [s for s in self.sites if s.local and not s.fused]

    def current(self) -> bool:
        """False once the guide's flat hyper-site parameters moved to another device or dtype
        (the fused node's constants and draw buffer were made for the old ones)."""
        if self.layout is None:
            return True
        loc = self.guide.hyper_locs
        return self.layout.options["device"] == loc.device and self.layout.options["dtype"] == loc.dtype


class CoreELBO(_Loss):
    r"""The ELBO of any network of the library, computed from the declarations without Pyro.

    .. math::

        -\mathcal{L} = \beta \sum_{\text{sites}} \mathrm{KL}(q \,\|\, p)
                       - \frac{N}{B} \sum_{b=1}^{B} \log p(y_b \mid f(x_b)),

    in four steps per mini-batch (:class:`_Plan` sorts the sites once):

    1. **Draws**, in the guide's site order, the order the Pyro guide consumes the random stream
       (so with the same torch seed :class:`MeanFieldELBO` gives the same loss and gradients): a
       flat hyper-site's standard-normal noise (:meth:`~pyro_sparse.kl.HyperLayout.draw`), any
       other drawn site's ``guide.posterior(site, earlier values).rsample()``. Sites under local
       reparameterisation are not drawn; a point-mass guide (MAP) draws nothing.
    2. **Hyper-sites** of the fused node: log-values and KL (:func:`~pyro_sparse.kl.hyper_terms`).
    3. **KL of the other sites** against ``p(site | hyper-values)`` (the prior's
       :meth:`~pyro_sparse.priors.Prior.site_prior`, or a hyper-site's own prior): closed form where
       registered, else ``log q(v) - log p(v)`` at the draw; a point mass's ``-log p(w_hat)``. A
       site under local reparameterisation hands its layer ``GaussianWeight(mu, sigma^2)`` of
       ``guide.posterior`` (a structured guide's conditional mean included); those with a plain
       mean-field posterior and a fixed prior get theirs, and their KL, from one node
       (:func:`~pyro_sparse.kl.local_terms`).
    4. **Data term**: the network's own ``forward`` under :func:`~pyro_sparse.priors.provided`,
       so each prior's ``sample`` returns ``parameter(site, value, hyper-values)`` of these values
       (``s * eps`` for non-centred priors, one shared draw for a recurrent layer, ...), then the
       likelihood's :meth:`~pyro_sparse.likelihoods.Likelihood.log_likelihood` times N/B.

    Pruned weights (iterative BMR, :class:`~pyro_sparse.iterative.PrunedWeights`):
    ``masks`` (site -> bool tensor, True = keep, read at every call) replace the posterior and the
    prior of a masked element by ``N(0, g_0^2)`` (:func:`~pyro_sparse.kl.reduced_normal`; in the
    fused node by 0/1 factors, :func:`~pyro_sparse.kl.pruning_factors`), as the handler does on the
    Pyro path. :meth:`supports` says whether a (network, guide) pair runs here, and if not why.

    Args:
        kl_weight: beta multiplying the KL terms (the trainer sets it every step).
        local_reparam: draw pre-activations of the sites the guide marked for it.
        masks: site -> bool mask of the elements kept, or None (nothing pruned).
        pruned_scale: ``g_0``, the standard deviation of a pruned element (required with ``masks``).
    """

    def __init__(self, kl_weight: float = 1.0, local_reparam: bool = True, masks: dict | None = None,
                 pruned_scale: float | None = None):
        if masks is not None and not (isinstance(pruned_scale, (int, float)) and pruned_scale > 0):
            raise ValueError(f"CoreELBO: pruned_scale must be a positive number with masks, got {pruned_scale!r}")
        self.kl_weight, self.local_reparam = kl_weight, local_reparam
        self.masks, self.pruned_scale = masks, (None if pruned_scale is None else float(pruned_scale))
        self.last_terms, self._plan, self._pruning = {}, None, {}

    @staticmethod
    def supports(network, guide) -> str | None:
        """None when ``(network, guide)`` runs on the core, else what is missing, naming the site
        or the class. The guide must be set up (its sites known)."""
        from .guides import Guide
        from .likelihoods import Likelihood

        if not (hasattr(network, "param_sites") and isinstance(getattr(network, "likelihood", None), Likelihood)):
            return f"the network is a {type(network).__name__}, not a network of this library"
        for obj, method, what in ((network, "model", "the core evaluates forward() and the likelihood"),
                                  (network.likelihood, "observe", "the core reads log_likelihood()")):
            owner = next(c for c in type(obj).__mro__ if method in vars(c))
            if not owner.__module__.startswith("pyro_sparse."):
                return f"{owner.__name__} overrides {method}(): {what}"
        if not isinstance(guide, Guide) or type(guide).posterior is Guide.posterior:
            return f"the guide is a {type(guide).__name__}, which does not define posterior()"
        if guide.model != network.model or not guide.sites:
            return "the guide was built for another model" if guide.sites else "the guide is not set up yet"
        declared = set(network.likelihood.hyper_sites(torch.zeros(())))
        for site, (layer, param, prior) in network.param_sites().items():
            if type(prior).sample is not Prior.sample:
                return (f"the {prior.spec_name} prior of {site} defines its own sample(): the core reads the sites a "
                        "prior declares (hyper_sites, site_prior, parameter)")
            declared.add(site)
            declared.update(prior.hyper_sites(site, getattr(layer, f"{param}_init"), layer.param_axes[param]))
        extra = [name for name in guide.sites if name not in declared]
        if extra:
            return (f"site {extra[0]!r} is declared by no prior and no likelihood (a layer or model samples it "
                    "itself); declare it as a prior's hyper_sites")
        missing = sorted(declared - set(guide.sites))
        return f"the guide has no site {missing[0]!r}" if missing else None

    @classmethod
    def explain(cls, network, guide, local_reparam: bool = True) -> dict[str, str]:
        """Site -> the path its KL takes on the core, in the guide's order:

        * ``fused local: q || p (kernel)`` -- a layer's Gaussian weights in one node with their
          derivatives (:func:`~pyro_sparse.kl.local_terms`);
        * ``fused hyper: q || p (kernel)`` -- a hyper-site of the flat node
          (:func:`~pyro_sparse.kl.hyper_terms`);
        * ``closed form: q || p (kernel)`` -- ``kl_divergence`` of the site's distributions;
        * ``monte carlo: q || p`` -- ``log q(v) - log p(v)`` at the draw (no closed form known);
        * ``point mass: -log p(w)`` -- a MAP guide (``fused`` when one node takes it).

        ``q`` and ``p`` are the canonical families (:func:`~pyro_sparse.kl.family`; an
        ``Exponential(r)`` prior is ``gamma``), the kernel their entry of
        :data:`~pyro_sparse.kl.KERNELS`. The drawn sites' paths come from one evaluation of the
        prior terms with a draw of its own (the random state is restored), so they are the paths a
        step takes. ValueError (naming what is missing) when the pair does not run on the core."""
        reason = cls.supports(network, guide)
        if reason is not None:
            raise ValueError(f"CoreELBO does not apply: {reason}")
        plan = _Plan(network, guide, local_reparam)

        def pair(q_family, prior):
            p_family = family(prior)[0]
            kernel = KERNELS.get((q_family, p_family))
            return f"{q_family} || {p_family}" + (f" ({kernel.name})" if kernel else "")

        if plan.point_mass:
            return {s.name: "point mass: -log p(w)" + (" (fused)" if s.fused else "") for s in plan.sites}
        out = {}
        flat = set(plan.layout.names) if plan.layout is not None else set()
        for s in plan.sites:
            if s.name in flat:
                q_family = "lognormal" if guide.sites[s.name]["family"] == "lognormal" else "normal"
                out[s.name] = "fused hyper: " + pair(q_family, s.prior)
            elif s.fused:
                out[s.name] = "fused local: " + pair("normal", s.fixed)
        record = {}
        with torch.random.fork_rng(), torch.no_grad():
            cls(local_reparam=local_reparam).mean_field_terms(plan, guide, {}, record)
        out.update(record)
        return {s.name: out[s.name] for s in plan.sites if s.name in out}

    def plan(self, network, guide) -> _Plan:
        """The :class:`_Plan` of ``(network, guide)``, cached; ValueError when not supported."""
        plan = self._plan
        if plan is not None and plan.network is network and plan.guide is guide and plan.current():
            return plan
        reason = self.supports(network, guide)
        if reason is not None:
            raise ValueError(f"CoreELBO does not apply: {reason}; use MeanFieldELBO (elbo: pyro)")
        self._plan = plan = _Plan(network, guide, self.local_reparam)
        return plan

    def _pruning_factors(self, mask, like):
        """:func:`~pyro_sparse.kl.pruning_factors`, again only when the mask tensor (object or
        contents: its version counter), the scale or ``like``'s dtype/device change."""
        key = (id(mask), self.pruned_scale, like.dtype, like.device)
        hit = self._pruning.get(key)
        if hit is None or hit[0] is not mask or hit[1] != mask._version:
            if len(self._pruning) > 64:  # masks replaced at each pruning step: drop the stale ones
                self._pruning.clear()
            hit = self._pruning[key] = (mask, mask._version, pruning_factors(mask, self.pruned_scale, like))
        return hit[2]

    def _reduced(self, fn, mask, name):
        return fn if mask is None else reduced_normal(fn, mask, self.pruned_scale, name)

    def mean_field_terms(self, plan, guide, masks, record=None):
        """``(values, [KL terms])`` of a guide that draws (steps 1-3 of the class docstring);
        ``record`` (a dict) receives the path of each site not fused (:meth:`explain`)."""
        values, kls, drawn = Values(), [], []
        layout = plan.layout
        for s in plan.draw_order:  # 1. draws in the guide's order
            if s.fused:
                layout.draw(s.name)
            else:
                q = self._reduced(guide.posterior(s.name, values), masks.get(s.name), s.name)
                values[s.name] = v = q.rsample()
                drawn.append((s, q, v))
        if layout is not None:  # 2. the fused hyper-sites; log-normal ones give log-values
            draws, kl = hyper_terms(layout, guide.hyper_locs, guide.hyper_log_scales)
            split = layout.lognormal_sites
            values.logs.update(zip(layout.names[:split], draws[:split]))
            values.update(zip(layout.names[split:], draws[split:]))
            kls.append(kl)
        for s, q, v in drawn:  # 3. the KL of the other sites
            p = self._reduced(s.prior_given(values), masks.get(s.name), s.name)
            try:
                kls.append(kl_divergence(q, p).sum())
                path = "closed form"
            except NotImplementedError:  # no closed form: the one-sample estimate, as Pyro's
                kls.append((q.log_prob(v) - p.log_prob(v)).sum())
                path = "monte carlo"
            if record is not None:
                kernel = kernel_for(q, p)
                named = f" ({kernel.name})" if kernel and path == "closed form" else ""
                record[s.name] = f"{path}: {family(q)[0]} || {family(p)[0]}{named}"
        if plan.fused_local:
            names = [name for name, _ in plan.fused_local]
            locs = [guide.posterior(name, values).loc if name in plan.conditional_loc
                    else guide.locs[name.replace(".", "__")] for name in names]
            pruning = None
            if masks:
                for name, terms in plan.fused_local:  # a non-Gaussian prior cannot be reduced: raises as Pyro does
                    if name in masks and not isinstance(terms, NormalKLTerms):
                        reduced_normal(next(s for s in plan.sites if s.name == name).fixed, masks[name], 1.0, name)
                pruning = [self._pruning_factors(masks[n], loc) if n in masks else None for n, loc in zip(names, locs)]
            weights, kl = local_terms(locs, [guide.log_scales[name.replace(".", "__")] for name in names],
                                      [t for _, t in plan.fused_local], pruning)
            values.update(zip(names, weights))
            kls.append(kl)
        for s in plan.generic_local:
            mask = masks.get(s.name)
            q = self._reduced(guide.posterior(s.name, values), mask, s.name)
            values[s.name] = GaussianWeight(q.loc, q.variance)
            p = self._reduced(s.prior_given(values), mask, s.name)
            kls.append(kl_divergence(q, p).sum())
            if record is not None:
                kernel = kernel_for(q, p)
                named = f" ({kernel.name})" if kernel else ""
                record[s.name] = f"closed form: {family(q)[0]} || {family(p)[0]}{named}"
        return values, kls

    @staticmethod
    def point_mass_terms(plan, guide):
        """``(values, [KL terms])`` of a point-mass guide: ``KL(delta || p) = -log p(w_hat)`` per
        site, given the hyper-values."""
        values = Values((s.name, guide.value(s.name)) for s in plan.sites)
        kls = [point_terms([values[name] for name, _ in plan.fused_point], [t for _, t in plan.fused_point])
               ] if plan.fused_point else []
        return values, kls + [s.point(values[s.name]) if s.point is not None else -s.prior_given(values).log_prob(
            values[s.name]).sum() for s in plan.sites if not s.fused]

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
        ``MeanFieldELBO(local_reparam=...).terms(network.model, guide, x, y, ...)``."""
        if not guide.sites:
            guide.setup(x, y, dataset_size=dataset_size, subsample=subsample)
        plan = self.plan(network, guide)
        if plan.point_mass:
            if self.masks:
                raise ValueError("CoreELBO: masks (pruned weights) need the mean-field guide, got a DeltaGuide")
            values, kls = self.point_mass_terms(plan, guide)
        else:
            values, kls = self.mean_field_terms(plan, guide, self.masks or {})
        with provided(values):
            out = network(x)
            loglik = self.data_term(network, out, y, dataset_size, subsample)
        return loglik, (sum(kls[1:], kls[0]) if kls else torch.zeros((), dtype=out.dtype))
