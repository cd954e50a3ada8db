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

import math
from abc import abstractmethod
from contextlib import contextmanager
from dataclasses import dataclass

import pyro
import pyro.distributions as dist
import torch

from .distributions import LogUniform as LogUniformDistribution
from .distributions import log_alpha
from .local_reparam import GaussianWeight, gaussian_posterior
from .reduction.rules import GroupLogAlpha, HorseshoeScale, LogAlpha
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


#: values handed to the priors instead of sampling (:func:`provided`), innermost last
_PROVIDED: list = []


@contextmanager
def provided(values: dict):
    """Within the block no sample site is emitted: :meth:`Prior.sample` returns
    ``parameter(site, values[site], values)`` and :func:`sample_hyper` returns ``values[name]``.

    ``values`` maps every site of the model to what its emission would have returned: the value of
    a hyper-site, and for a parameter's own site a tensor or, where the weight is locally
    reparameterised, a :class:`~pyro_sparse.local_reparam.GaussianWeight`. This is how the ELBO core
    (:class:`~pyro_sparse.elbo.CoreELBO`) runs the network's own ``forward`` with the values it drew
    from the guide, for every layer (recurrent, attention, converted modules) without Pyro.
    ``values`` may carry ``logs`` (site -> log-value of a positive site, :func:`log_value`).
    """
    _PROVIDED.append(values)
    try:
        yield values
    finally:
        _PROVIDED.pop()


def given_values():
    """The innermost :func:`provided` values, or None outside such a block."""
    return _PROVIDED[-1] if _PROVIDED else None


class Values(dict):
    """Site -> value, with ``logs``: site -> log-value of positive sites where the drawer has it
    (a log-normal draw is ``exp(m + s eps)``; its log is free), so priors need not take the log;
    the value of such a site is ``exp`` of its log-value, formed when first read."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.logs = {}

    def __missing__(self, name):
        log = self.logs.get(name)
        if log is None:
            raise KeyError(name)
        value = self[name] = log.exp()
        return value


def log_value(values, name):
    """``log values[name]``, read from ``values.logs`` when the drawer kept it."""
    logs = getattr(values, "logs", None)
    found = logs.get(name) if logs else None
    return found if found is not None else values[name].log()


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
    given = given_values()
    if given is not None:
        return given[name]
    infer = {"ps_role": role, "ps_init": init, "ps_local_reparam_ok": local_reparam}
    if group_sites:
        infer["ps_group_sites"] = tuple(group_sites)
    value = pyro.sample(name, prior_fn.to_event(init.dim()), infer=infer)
    posterior = gaussian_posterior(name) if local_reparam else None
    return posterior if posterior is not None else value


@dataclass(frozen=True)
class HyperSite:
    """A latent variable a prior (or a likelihood) adds besides the parameter: its prior
    distribution (batch shape: one value per group), the value the guide starts from, and its role
    (``scale``: a positive scale or precision, log-normal posterior; ``group``: a real
    multiplicative group variable)."""

    prior: object
    init: torch.Tensor
    role: str = "scale"


def sample_hyper(name, site: HyperSite):
    """Emit the sample site of a hyper-variable and return its value (inside :func:`provided`:
    the provided value)."""
    given = given_values()
    if given is not None:
        return given[name]
    return pyro.sample(name, site.prior.to_event(site.init.dim()), infer={"ps_role": site.role, "ps_init": site.init})


class Prior(Configurable):
    """Base class of all priors: a prior *declares* its model, and everything else derives from it.

    A prior over the parameter ``w`` at site ``<site>`` (``fc1.weight``) declares

    * :meth:`hyper_sites`: its hyper-variables ``h`` (name -> :class:`HyperSite`), in order;
    * :meth:`site_prior`: the prior of the parameter's own site given their values, ``p(v | h)``
      (``conditional``: whether it depends on them at all);
    * :meth:`parameter`: the parameter the layer uses, ``w = f(v, h)`` (``v`` itself for a centred
      prior, ``s(h) * v`` for a non-centred one), and :meth:`site_init`, where ``v`` starts;
    * :meth:`group_sites`: the hyper-sites that scale the parameter's groups (structured guides
      condition on them).

    :meth:`sample`, which the layer calls in its forward pass (inside the model, once per
    mini-batch), is derived from these: emit the hyper-sites, then ``<site>`` from ``site_prior``,
    and return ``parameter``. The ELBO core (:class:`~pyro_sparse.elbo.CoreELBO`) reads the same
    declarations and hands :meth:`sample` the values it drew (:func:`provided`), so the Pyro model
    and the core cannot drift apart. A new prior is one subclass declaring these (and ``fields``).
    """

    spec_name = "prior"

    #: the prior of the parameter's own site depends on hyper-values (else it is fixed)
    conditional = False
    #: the prior's own reduction rule (a :class:`~pyro_sparse.reduction.rules.Rule` class), which
    #: reads :meth:`group_summary`; None for a prior whose weights the generic rules judge
    rule = None

    # ------------------------------------------------------------------ declarations
    def hyper_sites(self, site: str, init: torch.Tensor, axes: dict) -> dict:
        """``{name: HyperSite}`` of the hyper-variables, in the order they are emitted; ``{}``
        for a prior without any."""
        return {}

    @abstractmethod
    def site_prior(self, site: str, init: torch.Tensor, values: dict):
        """``p(<site> | hyper-values)``, batch shape ``init.shape``; ``values`` maps at least this
        prior's hyper-sites to values (ignored unless ``conditional``). Required: the registry
        refuses a prior class that does not define it."""

    def site_init(self, site: str, init: torch.Tensor, values: dict) -> torch.Tensor:
        """Where the site ``<site>`` starts, given the parameter's initial value ``init`` and the
        hyper-sites' initial values: ``init`` itself for a centred prior."""
        return init

    def group_sites(self, site: str) -> tuple:
        """The hyper-sites that set the scale of the parameter's groups (emitted before it)."""
        return ()

    def parameter(self, site: str, value, values: dict):
        """What the layer uses, from the value of the site ``<site>`` (a tensor, or under local
        reparameterisation a :class:`~pyro_sparse.local_reparam.GaussianWeight`) and the values of
        the hyper-sites: the value itself for a centred prior, ``s * eps`` for a non-centred one."""
        return value

    # ------------------------------------------------------------------ derived
    def sample(self, site: str, init: torch.Tensor, axes: dict[str, int]):
        """Emit the sample sites of the parameter at ``site`` and return the parameter
        (inside :func:`provided`: the parameter of the provided values)."""
        given = given_values()
        if given is not None:
            return self.parameter(site, given[site], given)
        hyper = self.hyper_sites(site, init, axes)
        values = {name: sample_hyper(name, h) for name, h in hyper.items()}
        start = self.site_init(site, init, {name: h.init for name, h in hyper.items()})
        value = sample_weight(site, self.site_prior(site, init, values), start, group_sites=self.group_sites(site))
        return self.parameter(site, value, values)

    # ------------------------------------------------------------------ read-outs of a fit
    def gaussian_prior(self, site: str, values: dict):
        """``(loc, scale)`` of the parameter's Gaussian prior given fitted hyper-variables.

        ``values`` maps site names to point values (posterior medians) of this prior's scale
        sites. For hierarchical priors this is the conditional prior given those values; the
        reduction module reads it as the "full prior" of Bayesian model reduction. Tensors or
        floats broadcastable to the parameter.

        The default, ``(0, inf)``, is "not applicable": a prior that is not conditionally
        Gaussian has prior precision 0 in the summary, and the rules that need a Gaussian prior
        (BMR, Savage-Dickey) say so for its sites (``NotApplicable``) while the others apply.
        """
        return 0.0, math.inf

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
        """What the prior's own reduction rule (:attr:`rule`) reads: ``{rule.name: one value per
        group}`` (group shape, broadcastable to the parameter) of :meth:`group_values`, from the
        fitted guide and the posterior medians ``values``; ``{}`` for a prior without a rule of its
        own (a Gaussian). It goes into the posterior summary
        (:attr:`~pyro_sparse.summary.SiteSummary.groups`)."""
        if self.rule is None or not self.rule.reads_groups:
            return {}
        return {self.rule.name: self.group_values(site, guide, values)}

    def group_values(self, site: str, guide, values: dict) -> torch.Tensor:
        """The per-group quantity :attr:`rule` reads (required where ``rule`` reads groups)."""
        raise NotImplementedError(f"{type(self).__name__} names rule {self.rule.name!r} but defines no group_values")


class Gaussian(Prior):
    """Independent Gaussian prior ``w ~ N(loc, scale^2)`` on every element."""

    spec_name = "gaussian"

    fields = {
        "scale": Field("float", 1.0, positive=True, doc="prior standard deviation"),
        "loc": Field("float", 0.0, doc="prior mean"),
    }

    def site_prior(self, site, init, values):
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

    conditional = True

    def hyper_sites(self, site, init, axes):
        """The precision per group, starting at its prior mean ``concentration / rate``."""
        gshape = group_shape(init.shape, axes, self.group)
        prior = dist.Gamma(_full((), self.concentration, init), _full((), self.rate, init)).expand(gshape)
        return {self.precision_site(site): HyperSite(prior, _full(gshape, self.concentration / self.rate, init))}

    def site_prior(self, site, init, values):
        """``N(0, 1 / lambda_g)`` per element, lambda_g the group's precision."""
        scale = log_value(values, self.precision_site(site)).mul(-0.5).exp().expand(init.shape)
        return dist.Normal(torch.zeros_like(scale), scale)

    def gaussian_prior(self, site, values):
        return 0.0, values[self.precision_site(site)].rsqrt()


class LogUniform(Prior):
    """Sparse Variational Dropout prior: improper log-uniform ``p(w) ∝ 1/|w|`` per weight
    (Molchanov, Ashukha, Vetrov 2017).

    With a Gaussian posterior N(theta, sigma^2) the KL is the registered closed-form
    approximation in :mod:`pyro_sparse.distributions`, so local reparameterisation applies.
    Its rule is :class:`~pyro_sparse.reduction.rules.LogAlpha` (``log-alpha``): prune where
    ``log alpha = log sigma^2 - log theta^2`` exceeds 3. As a Gaussian the prior is the flat
    limit (precision 0), which is what :meth:`gaussian_prior` reports.
    """

    spec_name = "log_uniform"
    rule = LogAlpha  # reads the summary's per-weight log alpha

    fields = {}

    def site_prior(self, site, init, values):
        return LogUniformDistribution(init.shape)


#: group axes a group prior accepts; a layer checks the axis exists (``Prior.check_axes``)
GROUP_CHOICES = ("weight", "layer", "unit", "input", "channel", "gate", "hidden", "head")


def _scale_param(param, scale):
    """``scale * param`` for a tensor or a :class:`GaussianWeight` (given the scale)."""
    return param.scaled(scale) if isinstance(param, GaussianWeight) else param * scale


def scale_by_log_square(param, terms, slab=None):
    r"""``s * param`` for a non-centred parameter whose scale is given in log space,

    .. math::
        \log s^2 = u - \mathrm{softplus}(u - \log c^2), \qquad u = \sum_k c_k \log h_k,

    (without ``slab``, :math:`\log s^2 = u`): the regularised horseshoe's
    :math:`s^2 = c^2 \tau^2\lambda^2 / (c^2 + \tau^2\lambda^2)` (Piironen & Vehtari 2017) from the
    log-values of its sites, ``terms`` the pairs ``(log h_k, c_k)`` (group shapes broadcastable to
    the parameter's), ``slab`` :math:`\log c^2`. ``param`` is a tensor (``s * eps``) or a
    :class:`~pyro_sparse.local_reparam.GaussianWeight` (``N(s mu, s^2 sigma^2)``). One autograd node
    (:class:`_ScaledByLogSquare`): with :math:`g_u = \sum_{\text{group}} (\tfrac12 g_\mu \mu' + g_v v')`
    for the scaled mean :math:`\mu'` and variance :math:`v'`, the gradients are
    :math:`g_u (1 - \sigma(u - \log c^2))\,c_k` summed to each :math:`h_k`'s shape and
    :math:`g_u\,\sigma(u - \log c^2)` for the slab."""
    gaussian = isinstance(param, GaussianWeight)
    coefficients = tuple(c for _, c in terms)
    logs = [x for x, _ in terms]
    out = _ScaledByLogSquare.apply(coefficients, slab is not None, param.loc if gaussian else param,
                                   param.var if gaussian else None, *logs, *(() if slab is None else (slab,)))
    return GaussianWeight(out[0], out[1]) if gaussian else out[0]


class _ScaledByLogSquare(torch.autograd.Function):
    """:func:`scale_by_log_square` with its gradient formed in the forward pass."""

    @staticmethod
    def forward(ctx, coefficients, has_slab, loc, var, *logs):
        ctx.set_materialize_grads(False)
        xs = logs[:len(coefficients)]
        u = xs[0] * coefficients[0] if coefficients[0] != 1 else xs[0]
        for x, c in zip(xs[1:], coefficients[1:]):
            u = u + x if c == 1 else torch.add(u, x, alpha=c)
        sig = None
        if has_slab:
            d = u - logs[-1]
            sig = torch.sigmoid(d)
            u = u - torch.nn.functional.softplus(d)
        s = torch.exp(u * 0.5)
        loc_out = loc * s
        var_out = var * (s * s) if var is not None else None
        ctx.coefficients, ctx.shapes = coefficients, [x.shape for x in logs]
        ctx.save_for_backward(s, loc_out, var_out, sig)
        return loc_out, var_out

    @staticmethod
    def backward(ctx, g_loc, g_var):
        s, loc_out, var_out, sig = ctx.saved_tensors
        group = s.shape
        g_u = None
        if g_loc is not None:
            g_u = (g_loc * loc_out).sum_to_size(group) * 0.5
        if g_var is not None:
            part = (g_var * var_out).sum_to_size(group)
            g_u = part if g_u is None else g_u + part
        g_loc_in = g_loc * s if g_loc is not None else None
        g_var_in = g_var * (s * s) if g_var is not None else None
        if g_u is None:
            return (None, None, g_loc_in, g_var_in) + (None,) * len(ctx.shapes)
        grads = []
        g_lin = g_u
        if sig is not None:
            g_lin = g_u - g_u * sig
        for shape, c in zip(ctx.shapes, ctx.coefficients):
            g = g_lin.sum_to_size(shape)
            grads.append(g if c == 1 else g * c)
        if sig is not None:
            grads.append((g_u * sig).sum_to_size(ctx.shapes[-1]))
        return (None, None, g_loc_in, g_var_in, *grads)


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

    def hyper_sites(self, site, init, axes):
        """``z`` per group, starting at 1 (so ``w = w~`` at the start)."""
        gshape = group_shape(init.shape, axes, self.group)
        return {self.z_site(site): HyperSite(LogUniformDistribution(gshape), _full(gshape, 1.0, init), "group")}

    def site_prior(self, site, init, values):
        """``w~ ~ N(0, 1)``."""
        return _standard_normal(init)

    def group_sites(self, site):
        return (self.z_site(site),)

    def parameter(self, site, value, values):
        """``w = z * w~``."""
        return _scale_param(value, values[self.z_site(site)])

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

    rule = GroupLogAlpha

    def group_values(self, site, guide, values):
        """``log alpha_z`` per group."""
        return self.group_log_alpha(site, guide)


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
            return log_value(values, names[0]) + log_value(values, names[1])
        return 2 * log_value(values, names[0])

    def log_scale2(self, site, values):
        """log s_g^2 of every group (group shape) given values of the hyper-sites.

        ``log s^2 = log v - softplus(log v - log c^2)`` with ``v = tau^2 lambda^2`` in the
        regularised case (= log(c^2 v / (c^2 + v))), ``log v`` otherwise."""
        log_v = self._log_square(self.global_sites(site), values) + self._log_square(self.local_sites(site), values)
        if self.regularized:
            log_v = log_v - torch.nn.functional.softplus(log_v - log_value(values, self.slab_site(site)))
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

    def hyper_sites(self, site, init, axes):
        """The global scale's sites (shape ones), the local scales' (group shape), the slab, each
        started at :meth:`initial_values`."""
        gshape = group_shape(init.shape, axes, self.group)
        lshape = torch.Size([1] * init.dim())
        shapes = {name: gshape for name in self.local_sites(site)}
        start = self.initial_values(site, init, gshape)
        return {name: HyperSite(fn.expand(shapes.get(name, lshape)), start[name])
                for name, fn in self._hyperpriors(site, init).items()}

    def site_prior(self, site, init, values):
        """``eps ~ N(0, 1)``."""
        return _standard_normal(init)

    def site_init(self, site, init, values):
        """``eps = w_init / s_g`` at the scales' initial values."""
        return init / self.group_scale(site, values)

    def group_sites(self, site):
        return tuple(self.local_sites(site))

    def parameter(self, site, value, values):
        """``w = s_g * eps`` with ``s_g`` from :meth:`log_scale2` (:func:`scale_by_log_square`)."""
        c = 1 if self.decompose else 2
        terms = [(log_value(values, name), c) for name in self.global_sites(site) + self.local_sites(site)]
        slab = log_value(values, self.slab_site(site)) if self.regularized else None
        return scale_by_log_square(value, terms, slab)

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

    rule = HorseshoeScale

    def group_values(self, site, guide, values):
        """``lambda~_g``, the relative scale per group at the posterior medians."""
        return self.relative_scale(site, values)


def build_prior(spec) -> Prior:
    """A prior from an instance, a type name, or a ``{type: ..., **options}`` mapping."""
    return build_registered(PRIORS, spec, Prior, "prior", "prior type")
