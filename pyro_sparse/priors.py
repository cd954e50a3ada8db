"""Priors over the parameters of Bayesian layers.

A prior owns the Pyro sample sites of one parameter tensor (a layer's weight or bias) and
returns the parameter the layer should use: a tensor, or under local reparameterisation a
:class:`~pyro_sparse.local_reparam.GaussianWeight`. Adding a prior means adding one class
registered in :data:`pyro_sparse.registry.PRIORS` (``PRIORS.register(MyPrior)``); layers never change.

Site naming (DESIGN.md): the parameter site is ``<layer>.<param>`` (``fc1.weight``);
scale sites append a suffix (``fc1.weight.unit_scale``, ``fc1.weight.global_scale``).

Group axes of a parameter: ``weight`` (one per element), ``layer`` (one for the tensor),
``unit`` (output neuron / out-channel), ``input`` (input feature / in-channel), for
recurrent layers ``gate`` and ``hidden``, and for attention projections ``head``. A layer
declares which tensor dimension each axis lives on.
"""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import torch

from .distributions import LogUniform as LogUniformDistribution
from .distributions import log_alpha
from .local_reparam import GaussianWeight, gaussian_posterior
from .registry import PRIORS
from .schema import Configurable, Field, build_registered


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


def sample_weight(name, prior_fn, init, role="weight", local_reparam=True, group_sites=()):
    """Emit the sample site of a real-valued parameter and return what the layer uses.

    ``prior_fn`` is a distribution with the parameter's full batch shape; ``init`` is the
    deterministic initial value the guide starts from. Under an active
    :class:`~pyro_sparse.local_reparam.LocalReparameterization` handler the return value is
    the site's Gaussian posterior (a GaussianWeight) instead of a sample.
    ``group_sites`` names the hyper-sites (emitted before this one) that set the scale of this
    parameter's groups; structured guides condition the weights on them
    (:class:`~pyro_sparse.structured_guides.StructuredGuide`).
    """
    infer = {"ps_role": role, "ps_init": init, "ps_local_reparam_ok": local_reparam}
    if group_sites:
        infer["ps_group_sites"] = tuple(group_sites)
    value = pyro.sample(name, prior_fn.to_event(init.dim()), infer=infer)
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

    def parameter_block(self, site: str, block: dict, values: dict) -> dict:
        """A low-rank block ``{"cov_factor": (n, r), "cov_diag": (n,)}`` over the sample site's
        flattened elements, mapped to the parameter (identity for centred priors)."""
        return block

    def check_axes(self, param: str, axes: dict):
        """Raise ValueError if this prior groups along an axis the parameter does not have."""
        group = getattr(self, "group", None)
        if group is not None and group not in ("weight", "layer") and group not in axes:
            raise ValueError(f"{self.spec_name} prior on the {param}: group {group!r} is not an axis of "
                             f"this parameter; expected one of {['weight', 'layer', *axes]}")

    def group_summary(self, site: str, guide, values: dict) -> dict:
        """What the prior's own reduction rule reads (:mod:`pyro_sparse.reduction.rules`):
        ``{rule name: one value per group}`` (group shape, broadcastable to the parameter), from
        the fitted guide and the posterior medians ``values``; ``{}`` for a prior without a rule
        of its own (a Gaussian). It goes into the posterior summary
        (:attr:`~pyro_sparse.summary.SiteSummary.groups`)."""
        return {}

    def fixed_distribution(self, init: torch.Tensor):
        """The prior of the parameter as one distribution of batch shape ``init.shape`` when it
        has no latent hyper-variables (then :meth:`sample` emits exactly one site with it), else
        None. :class:`~pyro_sparse.elbo.DirectELBO` takes the KL against it (for a delta guide: its
        log-density at the point value) without Pyro."""
        return None

    # ------------------------------------------------------------------ the pieces of sample()
    # A prior's sample() is: draw the hyper-sites from hyper_priors() in order, then the
    # parameter's own site <site> from site_prior() given their values, and hand the layer
    # parameter() of that site's value. DirectELBO calls the same three methods with the values
    # the guide drew, so both ELBO paths compute the same maths.

    def hyper_priors(self, site: str, init: torch.Tensor, axes: dict):
        """``{hyper-site name: its prior}`` (batch shape: the hyper-site's shape), in the order
        :meth:`sample` emits them: ``{}`` for a prior without hyper-sites, None where the prior does
        not describe its sites this way (then :class:`~pyro_sparse.elbo.DirectELBO` does not apply)."""
        return {} if self.fixed_distribution(init) is not None else None

    def fixed_site_prior(self, init: torch.Tensor):
        """The prior of the parameter's own site ``<site>`` when it depends on no hyper-value (the
        fixed distribution; ``N(0, 1)`` for a non-centred prior ``w = s * eps``), else None."""
        return self.fixed_distribution(init)

    def site_prior(self, site: str, init: torch.Tensor, values: dict):
        """``p(<site> | hyper-values)``, batch shape ``init.shape``, given the values of the
        hyper-sites (``values``: site name -> tensor, at least this prior's hyper-sites)."""
        fixed = self.fixed_site_prior(init)
        if fixed is None:
            raise NotImplementedError(f"{type(self).__name__} does not say the prior of {site} given its hyper-sites")
        return fixed

    def parameter(self, site: str, value, values: dict):
        """What the layer uses, from the value of the site ``<site>`` (a tensor, or under local
        reparameterisation a :class:`~pyro_sparse.local_reparam.GaussianWeight`) and the values of
        the hyper-sites: the value itself for a centred prior, ``s * eps`` for a non-centred one."""
        return value


class Gaussian(Prior):
    """Independent Gaussian prior ``w ~ N(loc, scale^2)`` on every element."""

    spec_name = "gaussian"

    fields = {
        "scale": Field("float", 1.0, positive=True, doc="prior standard deviation"),
        "loc": Field("float", 0.0, doc="prior mean"),
    }

    def sample(self, site, init, axes):
        return sample_weight(site, self.fixed_distribution(init), init)

    def fixed_distribution(self, init):
        return dist.Normal(_full((), self.loc, init), _full((), self.scale, init)).expand(init.shape)

    def gaussian_prior(self, site, values):
        return self.loc, self.scale


class GaussianGamma(Prior):
    """Gaussian prior with a learned precision per group (Markovic et al. 2023).

        lambda_g ~ Gamma(concentration, rate),   w | lambda_g ~ N(0, 1 / lambda_g)

    with one precision per ``group`` (default: one per layer). The precision site is
    ``<site>.<group>_precision`` and gets a log-normal posterior in the mean-field guide.
    Given lambda, the KL of the Gaussian weights is analytic and local reparameterisation
    still applies.
    """

    spec_name = "gaussian_gamma"

    fields = {
        "concentration": Field("float", 2.0, positive=True),
        "rate": Field("float", 2.0, positive=True),
        "group": Field("choice", "layer", choices=("layer", "unit", "input", "weight", "head")),
    }

    def precision_site(self, site):
        return f"{site}.{self.group}_precision"

    def hyper_priors(self, site, init, axes):
        gshape = group_shape(init.shape, axes, self.group)
        return {self.precision_site(site):
                dist.Gamma(_full((), self.concentration, init), _full((), self.rate, init)).expand(gshape)}

    def site_prior(self, site, init, values):
        """``N(0, 1 / lambda_g)`` per element, lambda_g the group's precision."""
        scale = values[self.precision_site(site)].rsqrt().expand(init.shape)
        return dist.Normal(torch.zeros_like(scale), scale)

    def sample(self, site, init, axes):
        (name, hyper), = self.hyper_priors(site, init, axes).items()
        precision = sample_scale(name, hyper, _full(hyper.batch_shape, self.concentration / self.rate, init))
        return sample_weight(site, self.site_prior(site, init, {name: precision}), init)

    def gaussian_prior(self, site, values):
        return 0.0, values[self.precision_site(site)].rsqrt()


class LogUniform(Prior):
    """Sparse Variational Dropout prior: improper log-uniform ``p(w) ∝ 1/|w|`` per weight
    (Molchanov, Ashukha, Vetrov 2017).

    With a Gaussian posterior N(theta, sigma^2) the KL is the registered closed-form
    approximation in :mod:`pyro_sparse.distributions`, so local reparameterisation applies.
    Its rule is ``log-alpha`` (:mod:`pyro_sparse.reduction.rules`): prune where
    ``log alpha = log sigma^2 - log theta^2`` exceeds 3. As a Gaussian the prior is the flat
    limit (precision 0), which is what :meth:`gaussian_prior` reports.
    """

    spec_name = "log_uniform"

    fields = {}

    def sample(self, site, init, axes):
        return sample_weight(site, self.fixed_distribution(init), init)

    def fixed_distribution(self, init):
        return LogUniformDistribution(init.shape)

    def gaussian_prior(self, site, values):
        return 0.0, float("inf")


#: group axes a group prior accepts; a layer checks the axis exists (``Prior.check_axes``)
GROUP_CHOICES = ("weight", "layer", "unit", "input", "channel", "gate", "hidden", "head")


def _scale_param(param, scale):
    """``scale * param`` for a tensor or a :class:`GaussianWeight` (given the scale)."""
    return param.scaled(scale) if isinstance(param, GaussianWeight) else param * scale


def _standard_normal(init):
    return dist.Normal(_full((), 0.0, init), _full((), 1.0, init)).expand(init.shape)


class GroupLogUniform(Prior):
    """Group normal-Jeffreys prior (Louizos, Ullrich, Welling 2017, "Bayesian Compression").

    One multiplicative variable per group with the scale-invariant log-uniform prior and
    Gaussian weights given it::

        p(z_g) ∝ 1/|z_g|,   p(w_ij | z_g) = N(0, z_g^2)

    written non-centred, ``w = z * w~`` with ``w~ ~ N(0, 1)``. Sites: ``<site>.z_<group>``
    (z, one per group, e.g. ``fc1.weight.z_unit`` of shape (300, 1)) and ``<site>`` (w~).
    With Gaussian posteriors q(z_g) = N(mu_z, sigma_z^2) and q(w~) = N(mu, sigma^2) this is the
    paper's q(z) q(w | z) with q(w_ij | z_g) = N(z_g mu_ij, z_g^2 sigma_ij^2); the KL of w~ is
    Normal-Normal in closed form (the z_g cancel) and the KL of z is the Sparse VD
    approximation (Molchanov et al. 2017). Its rule, ``group-log-alpha``
    (:class:`~pyro_sparse.reduction.rules.GroupLogAlpha`), prunes a group where
    ``log alpha_z = log sigma_z^2 - log mu_z^2`` exceeds a threshold (:meth:`group_summary`).

    Local reparameterisation: z is sampled once per mini-batch (one draw shared by the batch,
    a simplification of the paper's per-example draw); given z the pre-activations are Gaussian,
    so the layer gets ``GaussianWeight(z mu, z^2 sigma^2)``.
    """

    spec_name = "group_log_uniform"

    fields = {"group": Field("choice", "unit", choices=GROUP_CHOICES, doc="one z per group along this axis")}

    def z_site(self, site):
        return f"{site}.z_{self.group}"

    def hyper_priors(self, site, init, axes):
        return {self.z_site(site): LogUniformDistribution(group_shape(init.shape, axes, self.group))}

    def fixed_site_prior(self, init):
        """``w~ ~ N(0, 1)``."""
        return _standard_normal(init)

    def parameter(self, site, value, values):
        """``w = z * w~``."""
        return _scale_param(value, values[self.z_site(site)])

    def sample(self, site, init, axes):
        (name, hyper), = self.hyper_priors(site, init, axes).items()
        gshape = hyper.batch_shape
        z = pyro.sample(name, hyper.to_event(len(gshape)),
                        infer={"ps_role": "group", "ps_init": _full(gshape, 1.0, init)})
        w_tilde = sample_weight(site, self.site_prior(site, init, {name: z}), init, group_sites=(name,))
        return self.parameter(site, w_tilde, {name: z})

    def gaussian_prior(self, site, values):
        """Conditional prior N(0, z^2) at the posterior median of z."""
        return 0.0, values[self.z_site(site)].abs()

    def parameter_posterior(self, site, loc, var, values):
        """q(w | z) = N(z mu, z^2 sigma^2) at the posterior median of z."""
        z = values[self.z_site(site)]
        return z * loc, z * z * var

    def parameter_block(self, site, block, values):
        return _scale_block(block, values[self.z_site(site)])

    def group_log_alpha(self, site, guide):
        """``log alpha`` of every group's z (group shape), from the guide's Gaussian q(z)."""
        loc, var = guide.site_posterior(self.z_site(site))
        return log_alpha(loc, var.sqrt())

    def group_summary(self, site, guide, values):
        """``{"group-log-alpha": log alpha_z}`` per group."""
        return {"group-log-alpha": self.group_log_alpha(site, guide)}


def _scale_block(block, scale):
    """The low-rank block of ``scale * x`` from that of x. ``block["shape"]`` is x's shape;
    ``scale`` broadcasts against it (one value per group)."""
    f = torch.as_tensor(scale).expand(block["shape"]).reshape(-1)
    return {**block, "cov_factor": block["cov_factor"] * f[:, None], "cov_diag": block["cov_diag"] * f * f}


HALF = 0.5


class Horseshoe(Prior):
    """(Regularised) horseshoe prior, non-centred (Carvalho et al. 2010; Piironen & Vehtari
    2017; Louizos et al. 2017; Ghosh et al. 2019).

    ::

        tau ~ C+(0, tau0)                    one global scale for the parameter tensor
        lambda_g ~ C+(0, 1)                  one local scale per group
        w = s_g * eps,  eps ~ N(0, 1)        with s_g = tau * lambda_g

    With ``regularized=True`` a slab ``c^2 ~ InvGamma(slab_df/2, slab_df * slab_scale^2 / 2)``
    bounds the scales: ``lambda~_g^2 = c^2 lambda_g^2 / (c^2 + tau^2 lambda_g^2)`` and
    ``s_g = tau * lambda~_g``, i.e. ``1/s_g^2 = 1/c^2 + 1/(tau^2 lambda_g^2)``.

    With ``decompose=True`` (default) each half-Cauchy is written as a product of a Gamma and an
    inverse-gamma variable (Louizos et al. 2017; Ghosh et al. 2019): if
    ``a ~ Gamma(1/2, rate=1/b^2)`` and ``c ~ InvGamma(1/2, 1)`` then ``sqrt(a c) ~ C+(0, b)``.
    Sites (``<site>`` = ``fc1.weight``)::

        <site>.global_scale_a ~ Gamma(1/2, rate 1/tau0^2)    tau^2 = global_scale_a * global_scale_b
        <site>.global_scale_b ~ InvGamma(1/2, 1)
        <site>.<group>_scale_a ~ Gamma(1/2, 1)              lambda^2 = <group>_scale_a * <group>_scale_b
        <site>.<group>_scale_b ~ InvGamma(1/2, 1)
        <site>.slab_variance ~ InvGamma(...)                 c^2 (regularised only)
        <site>                ~ N(0, 1)                      eps

    so that with log-normal posteriors on the positive sites every KL term is in closed form
    (:mod:`pyro_sparse.distributions`). With ``decompose=False`` the sites are
    ``<site>.global_scale ~ C+(0, tau0)`` and ``<site>.<group>_scale ~ C+(0, 1)``, whose KL the
    ELBO estimates by Monte Carlo. Given the scales (sampled once per mini-batch) the weights
    are Gaussian, so local reparameterisation applies.

    The "tiered" horseshoe of Markovic et al. (2023): ``group: unit``, ``tau0: 0.01``,
    ``regularized: true``, slab InvGamma(2, 6) (``slab_df: 4, slab_scale: sqrt(3)``), and on the
    output layer ``group: layer`` (a single scale); see ``models/mlp_horseshoe.yaml``.
    Its rule, ``horseshoe-scale`` (:class:`~pyro_sparse.reduction.rules.HorseshoeScale`), keeps
    the groups whose relative scale ``s_g / tau`` (at the posterior medians) is large enough
    (:meth:`group_summary`).
    """

    spec_name = "horseshoe"

    fields = {
        "tau0": Field("float", 1.0, positive=True, doc="scale of the half-Cauchy prior of the global scale"),
        "group": Field("choice", "unit", choices=GROUP_CHOICES, doc="one local scale per group along this axis"),
        "regularized": Field("bool", False, doc="add the Piironen-Vehtari slab"),
        "slab_df": Field("float", 4.0, positive=True, doc="nu of the slab c^2 ~ InvGamma(nu/2, nu s^2/2)"),
        "slab_scale": Field("float", 2.0, positive=True, doc="s of the slab"),
        "decompose": Field("bool", True, doc="half-Cauchy as Gamma x InvGamma (closed-form KL terms)"),
    }

    # ---------------------------------------------------------------- site names
    def global_sites(self, site):
        return [f"{site}.global_scale_a", f"{site}.global_scale_b"] if self.decompose else [f"{site}.global_scale"]

    def local_sites(self, site):
        g = f"{site}.{self.group}_scale"
        return [f"{g}_a", f"{g}_b"] if self.decompose else [g]

    def slab_site(self, site):
        return f"{site}.slab_variance"

    def slab_concentration_rate(self):
        return 0.5 * self.slab_df, 0.5 * self.slab_df * self.slab_scale ** 2

    # ---------------------------------------------------------------- maths
    def _log_square(self, names, values):
        """log tau^2 (or log lambda^2) from the values of its sites."""
        if self.decompose:
            return values[names[0]].log() + values[names[1]].log()
        return 2 * values[names[0]].log()

    def log_scale2(self, site, values):
        """log s_g^2 of every group (group shape) given values of the hyper-sites.

        ``log s^2 = log v - softplus(log v - log c^2)`` with ``v = tau^2 lambda^2`` in the
        regularised case (= log(c^2 v / (c^2 + v))), ``log v`` otherwise."""
        log_v = self._log_square(self.global_sites(site), values) + self._log_square(self.local_sites(site), values)
        if self.regularized:
            log_v = log_v - torch.nn.functional.softplus(log_v - values[self.slab_site(site)].log())
        return log_v

    def group_scale(self, site, values):
        """Effective scale ``s_g = tau * lambda~_g`` per group (group shape)."""
        return torch.exp(0.5 * self.log_scale2(site, values))

    # ---------------------------------------------------------------- sites
    def initial_values(self, site, init, gshape):
        """Initial values of the hyper-sites: tau = tau0, c^2 at the slab's mode, and lambda such
        that ``tau * lambda`` is the root-mean-square of the deterministic initial weights (so the
        initial eps = w_init / s is of order one, like its N(0, 1) prior). A decomposed
        half-Cauchy ``sqrt(a b)`` starts with ``a`` at its prior mean and ``b`` making up the rest."""
        lshape = [1] * init.dim()
        rms = float(init.square().mean().sqrt().clamp_min(1e-6))
        tau, lam = self.tau0, rms / self.tau0
        values = {}
        for names, scale, value, shape in ((self.global_sites(site), self.tau0, tau, lshape),
                                           (self.local_sites(site), 1.0, lam, gshape)):
            if self.decompose:
                a = HALF * scale ** 2  # mean of Gamma(1/2, rate 1/scale^2)
                values[names[0]], values[names[1]] = _full(shape, a, init), _full(shape, value ** 2 / a, init)
            else:
                values[names[0]] = _full(shape, value, init)
        if self.regularized:
            a, b = self.slab_concentration_rate()
            values[self.slab_site(site)] = _full(lshape, b / (a + 1), init)  # mode of InvGamma(a, b)
        return values

    def _hyperpriors(self, site, like):
        """Prior distribution (batch shape ()) of every hyper-site."""
        def full(v):
            return _full((), v, like)

        out = {}
        for names, scale in ((self.global_sites(site), self.tau0), (self.local_sites(site), 1.0)):
            if self.decompose:
                out[names[0]] = dist.Gamma(full(HALF), full(1.0 / scale ** 2))
                out[names[1]] = dist.InverseGamma(full(HALF), full(1.0))
            else:
                out[names[0]] = dist.HalfCauchy(full(scale))
        if self.regularized:
            a, b = self.slab_concentration_rate()
            out[self.slab_site(site)] = dist.InverseGamma(full(a), full(b))
        return out

    def hyper_priors(self, site, init, axes):
        gshape = group_shape(init.shape, axes, self.group)
        lshape = torch.Size([1] * init.dim())
        shapes = {name: lshape for name in self.global_sites(site)}
        shapes.update({name: gshape for name in self.local_sites(site)})
        return {name: fn.expand(shapes.get(name, lshape)) for name, fn in self._hyperpriors(site, init).items()}

    def fixed_site_prior(self, init):
        """``eps ~ N(0, 1)``."""
        return _standard_normal(init)

    def parameter(self, site, value, values):
        """``w = s_g * eps`` with ``s_g`` from :meth:`group_scale`."""
        return _scale_param(value, self.group_scale(site, values))

    def sample(self, site, init, axes):
        gshape = group_shape(init.shape, axes, self.group)
        start = self.initial_values(site, init, gshape)
        values = {name: sample_scale(name, fn, start[name]) for name, fn in self.hyper_priors(site, init, axes).items()}
        eps_init = init / self.group_scale(site, start)
        eps = sample_weight(site, self.site_prior(site, init, values), eps_init,
                            group_sites=tuple(self.local_sites(site)))
        return self.parameter(site, eps, values)

    # ---------------------------------------------------------------- summary
    def gaussian_prior(self, site, values):
        """Conditional prior N(0, s_g^2) at the posterior medians of the scales."""
        return 0.0, self.group_scale(site, values)

    def parameter_posterior(self, site, loc, var, values):
        s = self.group_scale(site, values)
        return s * loc, s * s * var

    def parameter_block(self, site, block, values):
        return _scale_block(block, self.group_scale(site, values))

    def global_scale(self, site, values):
        """The global scale tau (a one-element tensor of the parameter's rank)."""
        return torch.exp(0.5 * self._log_square(self.global_sites(site), values))

    def relative_scale(self, site, values):
        """``lambda~_g = s_g / tau`` per group: the (regularised) local scale on the prior's
        C+(0, 1) scale."""
        return self.group_scale(site, values) / self.global_scale(site, values)

    def group_summary(self, site, guide, values):
        """``{"horseshoe-scale": lambda~_g}``, the relative scale per group at the posterior medians."""
        return {"horseshoe-scale": self.relative_scale(site, values)}


def build_prior(spec) -> Prior:
    """A prior from an instance, a type name, or a ``{type: ..., **options}`` mapping."""
    return build_registered(PRIORS, spec, Prior, "prior", "prior type")
