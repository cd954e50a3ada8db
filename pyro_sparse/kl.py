"""KL divergences between the guides' posteriors and the priors: every kernel of the objective.

The ELBO's prior term is ``sum_sites KL(q(site) || p(site | parents))``. This module has

* the closed forms, registered with :func:`torch.distributions.kl.register_kl` so that
  ``kl_divergence(guide_fn, model_fn)`` (and Pyro's ``TraceMeanField_ELBO``, and the Pyro adapter
  :class:`~pyro_sparse.elbo.MeanFieldELBO`) use them: Gaussian against the log-uniform prior of
  Sparse VD (Molchanov, Ashukha, Vetrov 2017, eq. 14), log-normal against Gamma and
  inverse-gamma (the horseshoe's decomposed half-Cauchy scales and slab, Piironen & Vehtari 2017;
  Louizos, Ullrich, Welling 2017), Gaussian against Gaussian;
* the same KLs with their partial derivatives (``*_kl_terms``), which the fused autograd nodes of
  the ELBO core (:class:`~pyro_sparse.elbo.CoreELBO`) use so that a step costs a few kernels per
  tensor instead of autograd's many: :func:`local_terms` (the Gaussian weights of every layer
  under local reparameterisation, against fixed priors) and :func:`hyper_terms` (the draws and KL
  of every hyper-site of a network, log-normal against Gamma / inverse-gamma and Gaussian against
  log-uniform); :func:`neg_log_density_for` is a point mass's (the MAP prior term);
* the reduced Gaussians of weights pruned during training (iterative BMR).

Which path a site's KL takes is decided by one table, :data:`KERNELS`, keyed by the canonical
families of the posterior and the prior (:func:`family`), so a distribution written another way
takes the same path: ``Exponential(r)`` *is* ``Gamma(1, r)`` here (and ``Chi2(k)``, a torch
subclass of Gamma, ``Gamma(k/2, 1/2)``). A pair in the table has a closed form, and where its
parameters allow (one value per site, not learned) a fused node of the ELBO core; any other pair
is estimated by Monte Carlo at the draw. :meth:`CoreELBO.explain <pyro_sparse.elbo.CoreELBO.explain>`
reports each site's path.

Registrations are on the torch base classes, which also covers Pyro's wrappers
(``pyro.distributions.Normal`` subclasses ``torch.distributions.Normal`` and so on), and
``Independent``/``Independent`` sums them through ``.to_event``.
"""

import math
from dataclasses import dataclass

import pyro.distributions as dist
import torch
from torch.distributions import Exponential, Gamma, Independent, InverseGamma, LogNormal, Normal, kl_divergence
from torch.distributions.kl import register_kl

from .distributions import (
    _HALF_LOG_2PI,
    _K1,
    _K2,
    _K3,
    _LOG2E,
    _THETA2_EPS,
    LOG_ALPHA_MAX,
    LOG_ALPHA_MIN,
    LOG_SCALE_MAX,
    LOG_SCALE_MIN,
    LogScaleNormal,
    LogUniform,
    _constants,
)
from .local_reparam import GaussianWeight


def family(d) -> tuple[str, dict]:
    """``(family, parameters)`` of a distribution in the canonical form the KL kernels are keyed by
    (:data:`KERNELS`), through ``Independent``: ``normal`` (loc, scale), ``lognormal`` (loc, scale),
    ``log_uniform``, ``gamma`` (concentration, rate; also ``Exponential(r)`` as ``Gamma(1, r)``),
    ``inverse_gamma`` (concentration, rate); any other distribution is its class name and no
    parameters (no closed form known here)."""
    while isinstance(d, Independent):
        d = d.base_dist
    if isinstance(d, LogUniform):
        return "log_uniform", {}
    if isinstance(d, Exponential):
        return "gamma", {"concentration": d.rate.new_ones(()).expand(d.rate.shape), "rate": d.rate}
    if isinstance(d, Gamma):
        return "gamma", {"concentration": d.concentration, "rate": d.rate}
    if isinstance(d, InverseGamma):
        return "inverse_gamma", {"concentration": d.concentration, "rate": d.rate}
    if isinstance(d, LogNormal):
        return "lognormal", {"loc": d.loc, "scale": d.scale}
    if isinstance(d, Normal):
        return "normal", {"loc": d.loc, "scale": d.scale}
    return type(d).__name__, {}


@dataclass(frozen=True)
class Kernel:
    """One entry of :data:`KERNELS`: the closed-form KL of a (posterior, prior) family pair and
    the fused node of the ELBO core that computes it with its derivatives, where one exists
    (``local``: a layer's Gaussian weights, :func:`local_terms`; ``hyper``: the flat hyper-sites,
    :func:`hyper_terms`)."""

    name: str
    fused: str | None  # "local", "hyper" or None
    citation: str = ""


#: (posterior family, prior family) -> its kernel; every other pair is estimated by Monte Carlo
KERNELS = {
    ("normal", "log_uniform"): Kernel("Sparse VD KL (Molchanov et al. 2017, eq. 14)", "local"),
    ("normal", "normal"): Kernel("Gaussian KL", "local"),
    ("lognormal", "gamma"): Kernel("log-normal || Gamma KL", "hyper"),
    ("lognormal", "inverse_gamma"): Kernel("log-normal || inverse-gamma KL", "hyper"),
}


def kernel_for(q, p) -> Kernel | None:
    """The :data:`KERNELS` entry of posterior ``q`` and prior ``p`` (by canonical family), or None."""
    return KERNELS.get((family(q)[0], family(p)[0]))


def has_closed_form(q, p) -> bool:
    """Whether ``kl_divergence(q, p)`` is registered (else the ELBO estimates it with the draw)."""
    try:
        kl_divergence(q, p)
        return True
    except NotImplementedError:
        return False


def sparse_vd_kl_terms(loc, log_scale, grad: bool = True):
    r"""Elementwise Sparse VD KL and its partial derivatives, from :math:`(\theta, \log\sigma)`.

    With :math:`\log\alpha = 2\log\sigma - \log(\theta^2 + \epsilon)` clamped to
    [LOG_ALPHA_MIN, LOG_ALPHA_MAX] and :math:`s = \mathrm{sigmoid}(k_2 + k_3\log\alpha)`
    (Molchanov et al. 2017, eq. 14):

    .. math::
        KL = k_1 (1 - s) + \tfrac12 \log(1 + \alpha^{-1}), \qquad
        \frac{\partial KL}{\partial\log\alpha} = -k_1 k_3 s(1 - s) - \tfrac12\,\mathrm{sigmoid}(-\log\alpha),

    :math:`\partial KL/\partial\log\sigma = 2\,\partial KL/\partial\log\alpha` and
    :math:`\partial KL/\partial\theta = -2\theta/(\theta^2 + \epsilon)\,\partial KL/\partial\log\alpha`,
    both zero where the clamp is active (as ``torch.clamp``'s gradient). Returns ``(kl, dkl_dloc,
    dkl_dlog_scale)``, the derivatives None when ``grad`` is False; nothing is recorded by autograd.

    Written for the CPU's cost model, where each kernel launch, each pass over a weight-sized
    tensor and each fresh weight-sized buffer cost more than the arithmetic: 20 kernels, 5 new
    buffers, no Python numbers (cached 0-dim constants). It works with ``nl = -log alpha``, takes
    :math:`\alpha^{-1}` as ``exp2(nl log2 e)`` (``exp2`` is several times cheaper than ``exp``;
    relative error < 1e-6 for ``|nl| <= 20``) and ``softplus(-log alpha)`` as ``log1p(1/alpha)``
    (``softplus``'s own formula below its threshold 20, which ``-log alpha <= 20`` never
    exceeds), ``s(1 - s)`` with sigmoid's own backward kernel, and builds the clamp mask as
    floats (boolean kernels are slow).
    """
    eps, k1, k2, log2e, half, neg_2k1k3 = _constants((_THETA2_EPS, _K1, _K2, _LOG2E, 0.5, -2 * _K1 * _K3), loc)
    with torch.no_grad():
        t = torch.addcmul(eps, loc, loc)  # theta^2 + eps
        nl_raw = t.log().sub_(log_scale, alpha=2.0)  # -log alpha, unclamped
        nl = nl_raw.clamp(-LOG_ALPHA_MAX, -LOG_ALPHA_MIN)
        s = torch.add(k2, nl, alpha=-_K3).sigmoid_()  # sigmoid(k2 + k3 log alpha)
        kl = torch.mul(nl, log2e).exp2_().log1p_().mul_(half).sub_(s, alpha=_K1).add_(k1)
        if not grad:
            return kl, None, None
        inside = nl_raw.eq_(nl)  # 1.0 where the clamp is inactive
        d_log_scale = torch.ops.aten.sigmoid_backward.grad_input(neg_2k1k3, s, grad_input=s)  # in place
        d_log_scale.sub_(nl.sigmoid_()).mul_(inside)
        d_loc = torch.div(loc, t, out=t).mul_(d_log_scale).neg_()  # in place of t
        return kl, d_loc, d_log_scale


def normal_kl_terms(loc, log_scale, var, loc0: float, scale0: float, grad: bool = True):
    r"""Elementwise :math:`KL(N(m, e^{2l}) \| N(m_0, s_0^2))` and its partial derivatives:

    .. math::
        KL = \log s_0 - l + \frac{e^{2l} + (m - m_0)^2}{2 s_0^2} - \tfrac12, \quad
        \frac{\partial KL}{\partial m} = \frac{m - m_0}{s_0^2}, \quad
        \frac{\partial KL}{\partial l} = \frac{e^{2l}}{s_0^2} - 1,

    for a fixed prior (``loc0``, ``scale0`` numbers) and ``var = exp(2 log_scale)``. Returns
    ``(kl, dkl_dloc, dkl_dlog_scale)`` as :func:`sparse_vd_kl_terms` does (``dkl_dloc`` is ``loc``
    itself for the standard normal prior).
    """
    precision0 = 1.0 / (scale0 * scale0)
    m0, half_p0, p0, c0, minus_one = _constants(
        (loc0, 0.5 * precision0, precision0, math.log(scale0) - 0.5, -1.0), loc)
    with torch.no_grad():
        diff = loc if loc0 == 0 else loc - m0
        kl = torch.addcmul(var, diff, diff).mul_(half_p0).sub_(log_scale).add_(c0)
        if not grad:
            return kl, None, None
        d_loc = diff if precision0 == 1 else diff * p0  # may be ``loc`` itself: do not modify in place
        return kl, d_loc, torch.add(minus_one, var, alpha=precision0)


@dataclass(frozen=True)
class SparseVDKLTerms:
    """``kl_terms`` of the log-uniform prior: :func:`sparse_vd_kl_terms`."""

    def __call__(self, loc, log_scale, var, grad=True):
        return sparse_vd_kl_terms(loc, log_scale, grad)

    @staticmethod
    def point(w):
        """:math:`-\\sum_i \\log p(w_i) = \\sum_i \\log|w_i|` (the unnormalised ``1/|w|``, as
        :meth:`~pyro_sparse.distributions.LogUniform.log_prob`)."""
        return w.abs().log().sum()

    @staticmethod
    def point_grad(w, grad):
        """``grad / w``, the gradient of :meth:`point`."""
        return grad / w


@dataclass(frozen=True)
class NormalKLTerms:
    """``kl_terms`` of a fixed ``N(loc0, scale0^2)`` prior: :func:`normal_kl_terms`."""

    loc0: float
    scale0: float

    def __call__(self, loc, log_scale, var, grad=True):
        return normal_kl_terms(loc, log_scale, var, self.loc0, self.scale0, grad)

    def point(self, w):
        r""":math:`-\sum_i \log p(w_i) = \frac{1}{2 s_0^2}\sum_i (w_i - m_0)^2 + n(\log s_0 + \tfrac12\log 2\pi)`
        (one dot product)."""
        half_p0, const = _constants((0.5 / self.scale0 ** 2, w.numel() * (math.log(self.scale0) + _HALF_LOG_2PI)), w)
        diff = (w if self.loc0 == 0 else w - self.loc0).reshape(-1)
        return torch.addcmul(const, torch.dot(diff, diff), half_p0)

    def point_grad(self, w, grad):
        """``grad (w - m_0) / s_0^2``, the gradient of :meth:`point`."""
        p0, = _constants((1.0 / self.scale0 ** 2,), w)
        return (w if self.loc0 == 0 else w - self.loc0) * (grad * p0)


def kl_terms_for(prior):
    """``kl_terms(loc, log_scale, var, grad) -> (kl, dkl_dloc, dkl_dlog_scale)``: the elementwise
    KL of a Gaussian posterior against the fixed prior distribution ``prior`` and its partial
    derivatives (for fused gradients), or None where no such closed form is known here. Known:
    the log-uniform prior (:class:`SparseVDKLTerms`) and Gaussian priors with one mean and one
    scale for every element (:class:`NormalKLTerms`): the ``local`` kernels of :data:`KERNELS`."""
    kind, params = family(prior)
    if kind == "log_uniform":
        return SparseVDKLTerms()
    if kind == "normal" and not isinstance(prior, Independent):
        loc0, scale0 = _single_value(params["loc"]), _single_value(params["scale"])
        if loc0.dim() == 0 and scale0.dim() == 0 and not (loc0.requires_grad or scale0.requires_grad):
            return NormalKLTerms(float(loc0), float(scale0))
    return None


def neg_log_density_for(prior):
    r"""``f(w) = -sum_i log p(w_i)``, differentiable, for a point value under the prior ``prior``:
    the KL of a point mass, ``KL(delta_w || p) = log delta(w) - log p(w) = -log p(w)`` (Pyro's
    registered rule), the prior term of MAP; :func:`point_terms` where the prior's terms are known
    (:meth:`NormalKLTerms.point`, :meth:`SparseVDKLTerms.point`), else ``-prior.log_prob(w).sum()``."""
    terms = kl_terms_for(prior)
    if terms is not None:
        return lambda w: point_terms([w], [terms])
    return lambda w: -prior.log_prob(w).sum()


def point_terms(weights, terms):
    r""":math:`-\sum_k \sum_i \log p_k(w_{k,i})` of point values ``weights`` under fixed priors
    whose ``terms`` (:func:`kl_terms_for`) are known, in one autograd node (:class:`_PointTerms`):
    the prior term of a MAP step, one dot product per site forward and one product per site
    backward instead of autograd's few nodes per site and their sum."""
    return _PointTerms.apply(tuple(terms), *weights)


class _PointTerms(torch.autograd.Function):
    """``sum_k terms_k.point(w_k)`` forward; ``g * terms_k.point_grad(w_k)`` backward."""

    @staticmethod
    def forward(ctx, terms, *weights):
        ctx.terms = terms
        ctx.save_for_backward(*weights)
        with torch.no_grad():
            return torch.stack([t.point(w) for t, w in zip(terms, weights)]).sum()

    @staticmethod
    def backward(ctx, grad):
        return (None, *(t.point_grad(w, grad) if need else None
                        for t, w, need in zip(ctx.terms, ctx.saved_tensors, ctx.needs_input_grad[1:])))


class _SparseVDKL(torch.autograd.Function):
    """Elementwise Sparse VD KL (:func:`sparse_vd_kl_terms`) with its gradient formed in the
    forward pass: autograd through the composed formula runs ~35 small kernels over every weight
    per step, this ~25 (mostly in place) in forward and two in backward; the KL of a Sparse VD
    network is the largest elementwise cost of its SVI step."""

    @staticmethod
    def forward(ctx, loc, log_scale):
        kl, d_loc, d_ls = sparse_vd_kl_terms(loc, log_scale, grad=any(ctx.needs_input_grad))
        if d_loc is not None:
            ctx.save_for_backward(d_loc, d_ls)
        return kl

    @staticmethod
    def backward(ctx, grad):
        g_loc, g_log_scale = ctx.saved_tensors
        return grad * g_loc, grad * g_log_scale


def kl_normal_loguniform_log(loc, log_scale):
    r"""Elementwise :math:`KL(N(\theta, \sigma^2)\,\|\,\text{LogUniform})` from
    :math:`(\theta, \log\sigma)`, the additive parameterisation of Sparse VD.

    Same value as :func:`kl_normal_loguniform` (Molchanov et al. 2017, eq. 14) with
    :math:`\log\alpha = 2\log\sigma - \log(\theta^2 + 10^{-16})` clamped to [-20, 20], computed
    without the exp/log round trip and with a fused backward: the KL of a Sparse VD layer is the
    largest elementwise cost of an SVI step.
    """
    return _SparseVDKL.apply(loc, log_scale)


def kl_normal_loguniform(loc, scale):
    r"""Elementwise :math:`KL(N(\theta, \sigma^2)\,\|\,\text{LogUniform})` up to a constant.

    The approximation of Molchanov, Ashukha, Vetrov (2017, eq. 14):

    .. math::
        -KL \approx k_1\,\mathrm{sigmoid}(k_2 + k_3 \log\alpha)
                    - \tfrac12 \log(1 + \alpha^{-1}) - k_1,

    :math:`k_1 = 0.63576,\ k_2 = 1.87320,\ k_3 = 1.48695`, with
    :math:`\log\alpha` from :func:`log_alpha`. The exact KL is
    :math:`-\tfrac12\log\alpha + E_{\epsilon\sim N(1,\alpha)}\log|\epsilon| + C`; the
    approximation matches it up to a constant. The result is >= 0 and tends to 0 as
    :math:`\alpha\to\infty`.
    """
    return kl_normal_loguniform_log(loc, scale.log())


def _prior_constants(concentration, rate, like):
    """``(a, b, log Gamma(a) - a log b - 1/2 - 1/2 log 2 pi)`` of a Gamma or inverse-gamma prior:
    its parameters as the 0-dim view where they are expanded from one value (a hyperprior
    ``.expand``-ed to a group shape), so the constant is computed once, not once per element."""
    a = _single_value(torch.as_tensor(concentration, dtype=like.dtype, device=like.device))
    b = _single_value(torch.as_tensor(rate, dtype=like.dtype, device=like.device))
    return a, b, torch.lgamma(a) - a * b.log() - (0.5 + _HALF_LOG_2PI)


def kl_lognormal_gamma(loc, scale, concentration, rate):
    r""":math:`KL(\mathrm{LogNormal}(m, s)\,\|\,\mathrm{Gamma}(a, b))` in closed form (rate ``b``).

    With :math:`E_q\log x = m`, :math:`E_q x = e^{m + s^2/2}` and
    :math:`H[q] = m + \tfrac12 + \log s + \tfrac12\log 2\pi`:

    .. math::
        KL = -H[q] - a\log b + \log\Gamma(a) - (a - 1)\,m + b\,e^{m + s^2/2}
           = \log\Gamma(a) - a\log b - \tfrac12 - \tfrac12\log 2\pi - a\,m - \log s + b\,e^{m + s^2/2},

    computed in the second form (the constant once per prior, four passes over the elements).
    """
    a, b, const = _prior_constants(concentration, rate, loc)
    return const - a * loc - scale.log() + b * torch.exp(loc + 0.5 * scale * scale)


def kl_lognormal_inverse_gamma(loc, scale, concentration, rate):
    r""":math:`KL(\mathrm{LogNormal}(m, s)\,\|\,\mathrm{InvGamma}(a, b))` in closed form.

    The inverse-gamma density is :math:`b^a x^{-a-1} e^{-b/x} / \Gamma(a)`; with
    :math:`E_q\log x = m` and :math:`E_q[1/x] = e^{-m + s^2/2}`:

    .. math::
        KL = -H[q] - a\log b + \log\Gamma(a) + (a + 1)\,m + b\,e^{-m + s^2/2}
           = \log\Gamma(a) - a\log b - \tfrac12 - \tfrac12\log 2\pi + a\,m - \log s + b\,e^{-m + s^2/2},

    computed in the second form. The horseshoe slab :math:`c^2 \sim \mathrm{InvGamma}(\nu/2, \nu s^2/2)`
    (Piironen & Vehtari 2017) is the typical use.
    """
    a, b, const = _prior_constants(concentration, rate, loc)
    return const + a * loc - scale.log() + b * torch.exp(0.5 * scale * scale - loc)


@register_kl(Normal, LogUniform)
def _kl_normal_loguniform(p, q):
    kl = kl_normal_loguniform(p.loc, p.scale)
    return kl.expand(torch.broadcast_shapes(kl.shape, q.batch_shape))


@register_kl(LogNormal, Gamma)
def _kl_lognormal_gamma(p, q):
    return kl_lognormal_gamma(p.loc, p.scale, q.concentration, q.rate)


@register_kl(LogNormal, Exponential)
def _kl_lognormal_exponential(p, q):
    """``Exponential(r)`` is ``Gamma(1, r)`` (:func:`family`)."""
    return kl_lognormal_gamma(p.loc, p.scale, q.rate.new_ones(()).expand(q.rate.shape), q.rate)


@register_kl(LogNormal, InverseGamma)
def _kl_lognormal_inverse_gamma(p, q):
    return kl_lognormal_inverse_gamma(p.loc, p.scale, q.concentration, q.rate)


@register_kl(LogScaleNormal, LogUniform)
def _kl_logscalenormal_loguniform(p, q):
    kl = kl_normal_loguniform_log(p.loc, p.log_scale)
    if kl.shape == q.batch_shape:  # the usual case; broadcast_shapes costs ~40 us
        return kl
    return kl.expand(torch.broadcast_shapes(kl.shape, q.batch_shape))


@register_kl(LogScaleNormal, Normal)
def _kl_logscalenormal_normal(p, q):
    """KL(N(m, e^{2l}) || N(m0, s0^2)) = log s0 - l + (e^{2l} + (m - m0)^2) / (2 s0^2) - 1/2."""
    q_loc, q_scale = _single_value(q.loc), _single_value(q.scale)  # a prior expanded from scalars
    if isinstance(q, LogScaleNormal):
        log_s0, precision0 = q.log_scale, torch.exp(-2 * q.log_scale)
    else:
        log_s0, precision0 = q_scale.log(), q_scale.square().reciprocal()
    kl = (p.variance + (p.loc - q_loc).square()) * (0.5 * precision0) + (log_s0 - 0.5) - p.log_scale
    return kl if kl.shape == q.batch_shape else kl.expand(torch.broadcast_shapes(kl.shape, q.batch_shape))


def _single_value(t):
    """The 0-dim view of a tensor expanded from one value (all strides 0), else ``t`` itself:
    elementwise work on the expanded view would be done once per element."""
    if t.dim() and not any(t.stride()):
        return t.as_strided((), ())
    return t


def reduced_normal(fn, mask, scale: float, name: str):
    r"""``fn`` (a Gaussian, possibly ``Independent``) with the elements where ``mask`` is False
    replaced by the reduced Gaussian :math:`N(0, g_0^2)`, ``g_0 = scale``:

    .. math::

        N\big(\mathrm{where}(m, \mu, 0),\; \mathrm{where}(m, \sigma, g_0)^2\big),

    the prior and posterior of a weight pruned by iterative Bayesian model reduction (Markovic,
    Friston & Kiebel 2023) as ``g_0 -> 0``. ``torch.where`` passes no gradient to the pruned
    elements of ``mu`` and ``sigma``. ``name`` (the site) is for the error raised when ``fn`` is
    not Gaussian.
    """
    from .errors import PyroSparseError

    depth = 0
    base = fn
    while isinstance(base, Independent):
        depth += base.reinterpreted_batch_ndims
        base = base.base_dist
    if not isinstance(base, Normal):
        raise PyroSparseError(f"iterative BMR: site {name!r} has a {type(base).__name__} distribution; pruned "
                              "weights can only be fixed for Gaussian priors and posteriors")
    mask = mask.to(base.loc.device)
    loc = torch.where(mask, base.loc, torch.zeros((), dtype=base.loc.dtype, device=base.loc.device))
    sd = torch.where(mask, base.scale, torch.full((), scale, dtype=base.scale.dtype, device=base.scale.device))
    new = dist.Normal(loc, sd)
    return new.to_event(depth) if depth else new


def pruning_factors(mask, scale: float, like: torch.Tensor):
    r"""``(keep, fill)`` of a pruning mask (bool, True = kept) for
    :func:`local_terms`: ``keep = 1{m}`` and
    ``fill = (1 - keep) g_0^2`` in ``like``'s dtype and device, so that ``mu * keep`` and
    ``fill + sigma^2 keep`` are exactly the mean and variance of :func:`reduced_normal`
    (``where(m, mu, 0)``, ``where(m, sigma, g_0)^2``) and ``d * keep`` zeroes a pruned element's
    gradient. Products with a 0/1 tensor, not ``torch.where``: on the CPU ``where`` and the
    bool-to-float cast are each ~10x a multiplication, so callers cache these per mask."""
    keep = mask.to(dtype=like.dtype, device=like.device)
    g0_sq = torch.tensor(scale, dtype=like.dtype, device=like.device).square()  # as Normal(0, g0).variance
    return keep, (1 - keep) * g0_sq


def local_terms(locs, log_scales, kl_terms, pruning=None):
    """``([GaussianWeight(mu, sigma^2) per site], sum_sites sum KL(q || p))`` of mean-field
    Gaussian sites (their ``mu`` and unclamped ``log sigma`` parameters), in one autograd node
    (:class:`_LocalTerms`): what layers under local reparameterisation and the ELBO take, the KL of
    each site by its ``kl_terms`` (:func:`kl_terms_for` of the site's fixed prior). Same values and
    gradients as the guide's ``LogScaleNormal`` followed by its ``variance`` and
    ``kl_divergence(..., prior).sum()``. Sites with the same prior are computed as one flat vector
    (a few kernels for all of them, not a few per site).

    ``pruning``: per site None or the ``(keep, fill)`` of :func:`pruning_factors` (a weight pruned
    by iterative BMR): a pruned element gets ``GaussianWeight(0, g_0^2)``, KL 0 (that of
    ``N(0, g_0^2)`` against the reduced prior ``N(0, g_0^2)``, for Gaussian priors) and zero
    gradient, as :func:`reduced_normal` of posterior and prior gives."""
    pruning = tuple(pruning) if pruning is not None else (None,) * len(locs)
    groups = {}
    for i, (terms, factors) in enumerate(zip(kl_terms, pruning)):
        groups.setdefault((terms, i) if factors is not None else terms, []).append(i)
    plan = tuple((kl_terms[idx[0]], tuple(idx)) for idx in groups.values())
    out = _LocalTerms.apply(plan, pruning, *locs, *log_scales)
    # a kept element's mean is mu * 1 = mu, a pruned one's mu * 0 = 0, and no gradient reaches it
    return ([GaussianWeight(loc if factors is None else loc * factors[0], var)
             for loc, var, factors in zip(locs, out[:-1], pruning)], out[-1])


def _flat(tensors):
    return tensors[0].reshape(-1) if len(tensors) == 1 else torch.cat([t.reshape(-1) for t in tensors])


class _LocalTerms(torch.autograd.Function):
    """Variances and total KL of mean-field Gaussian sites from their raw parameters
    ``(mu, log sigma)``: ``l = clamp(log sigma)``, ``var = exp(2 l)`` and the summed KL
    ``sum kl(mu, l)``, as one autograd node for all sites, each group of sites with the same
    prior as one flat vector (``plan``: ``(kl_terms, site indices)`` per group).

    Backward, with ``g_var`` from each layer and ``g_kl`` from the ELBO:
    ``d/d mu = g_kl dkl/dmu`` and ``d/d log sigma = [2 var g_var + g_kl dkl/dl] 1{clamp inactive}``,
    the partial derivatives of the KL formed in the forward pass: at most three passes over each
    group instead of autograd's clamp, exp and KL nodes, their sums and the kernels of each."""

    @staticmethod
    def forward(ctx, plan, pruning, *params):
        ctx.set_materialize_grads(False)
        need = any(ctx.needs_input_grad)
        sites = len(pruning)
        variances, kls, saved = [None] * sites, [], []
        for terms, idx in plan:
            loc, raw = _flat([params[i] for i in idx]), _flat([params[sites + i] for i in idx])
            log_scale = raw.clamp(LOG_SCALE_MIN, LOG_SCALE_MAX)
            var = torch.mul(log_scale, _constants((2.0,), loc)[0]).exp_()  # exp(2 l), as LogScaleNormal.variance
            kl, d_loc, d_log_scale = terms(loc, log_scale, var, need)
            if d_loc is loc and len(idx) == 1:  # a view of the parameter itself: not a gradient to hand back
                d_loc = loc.clone()
            inside = log_scale.eq_(raw) if need else None  # 1.0 where the clamp is inactive
            out_var = var
            factors = pruning[idx[0]]
            if factors is not None:  # pruned: N(0, g0^2) against N(0, g0^2): KL 0, variance g0^2, no gradient
                keep, fill = (f.reshape(-1) for f in factors)  # exact: x * 1 + 0 = x, x * 0 + g0^2 = g0^2
                kl = kl * keep
                out_var = torch.addcmul(fill, var, keep)
                if need:
                    d_loc = d_loc * keep
                    inside = inside.mul_(keep)
            kls.append(kl.sum())
            for i, v in zip(idx, out_var.split([params[i].numel() for i in idx])):
                variances[i] = v.view(params[i].shape)
            if need:
                saved += [var, d_loc, d_log_scale, inside]
        if need:
            ctx.save_for_backward(*saved)
            ctx.plan, ctx.shapes = plan, [p.shape for p in params[:sites]]
        return (*variances, torch.stack(kls).sum() if len(kls) > 1 else kls[0])

    @staticmethod
    def backward(ctx, *grads):
        g_vars, g_kl = grads[:-1], grads[-1]
        saved, shapes = ctx.saved_tensors, ctx.shapes
        # the KL's gradient is usually exactly 1 (kl_weight 1): then skip multiplying by it (the
        # host read is free on the CPU); a saved tensor returned as a gradient is copied, not
        # aliased, by autograd if it becomes a .grad
        unit = g_kl is not None and g_kl.device.type == "cpu" and float(g_kl) == 1.0
        g_locs, g_log_scales = [None] * len(shapes), [None] * len(shapes)
        for k, (_, idx) in enumerate(ctx.plan):
            var, d_loc, d_log_scale, inside = saved[4 * k: 4 * k + 4]
            g_var = None
            if any(g_vars[i] is not None for i in idx):
                g_var = _flat([g_vars[i] if g_vars[i] is not None else var.new_zeros(shapes[i]) for i in idx])
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
            sizes = [shapes[i].numel() for i in idx]
            for out, g in ((g_locs, g_loc), (g_log_scales, g_log_scale)):
                if g is not None:
                    for i, part in zip(idx, g.split(sizes)):
                        out[i] = part.view(shapes[i])
        return (None, None, *g_locs, *g_log_scales)


# ---------------------------------------------------------------------------- hyper-sites, fused
def _lognormal_sign(prior):
    """The sign s of a Gamma (1; ``Exponential(r)`` is ``Gamma(1, r)``) or inverse-gamma (-1) prior
    in the log-normal KL of :class:`HyperLayout`, None for other priors (by :func:`family`)."""
    return {"gamma": 1.0, "inverse_gamma": -1.0}.get(family(prior)[0])


class HyperLayout:
    r"""The hyper-sites of one network whose KL :func:`hyper_terms` takes, as the mean-field guide
    stores them: one flat vector of means and one of ``log sigma`` (``guide.hyper_locs``,
    ``guide.hyper_log_scales``), log-normal sites first, then Gaussian ones. A hyper-site joins
    (:meth:`joins`) when its prior is one of

    * :math:`\mathrm{Gamma}(a, b)` (rate ``b``, sign :math:`s = 1`) or :math:`\mathrm{InvGamma}(a, b)`
      (:math:`s = -1`), one ``a`` and one ``b`` for the site (a hyperprior expanded to the group
      shape), with the log-normal posterior :math:`q = \mathrm{LogNormal}(m, \sigma^2)`:

      .. math::
          KL = -s\,a\,m + b\,e^{s m + \sigma^2/2} - \log\sigma + \log\Gamma(a) - a\log b
               - \tfrac12 - \tfrac12\log 2\pi

      (:func:`kl_lognormal_gamma`, :func:`kl_lognormal_inverse_gamma` for the two signs), so
      :math:`\partial KL/\partial m = s(b\,e^{s m + \sigma^2/2} - a)` and
      :math:`\partial KL/\partial\log\sigma = b\,e^{s m + \sigma^2/2}\sigma^2 - 1`;
    * the log-uniform prior with a Gaussian posterior (the ``z`` of the group log-uniform prior):
      the Sparse VD approximation, :func:`sparse_vd_kl_terms`.

    ``eps`` holds each site's standard-normal draw at its offset, drawn by :meth:`draw` in the
    guide's site order, the order Pyro's ``rsample`` of the same sites consumes the random stream
    (a slice of a buffer filled by ``normal_`` holds the numbers a fresh tensor of its shape would).
    """

    def __init__(self, guide, priors: dict):
        """``priors``: site -> its prior distribution, as the model declares it now."""
        like = guide.hyper_locs
        self.names = list(guide.hyper)
        self.offsets = dict(guide.hyper)
        self.sizes = [guide.hyper[n][1] for n in self.names]
        self.shapes = [torch.Size(guide.hyper[n][2]) for n in self.names]
        lognormal = [n for n in self.names if guide.sites[n]["family"] == "lognormal"]
        self.lognormal_sites = len(lognormal)
        self.numel = like.numel()
        self.num_lognormal = sum(guide.hyper[n][1] for n in lognormal)
        a, b, sign, const = [], [], [], 0.0
        for name in lognormal:
            prior, n = priors[name], guide.hyper[name][1]
            params = family(prior)[1]
            ai, bi = float(_single_value(params["concentration"])), float(_single_value(params["rate"]))
            a.append(torch.full((n,), ai, dtype=torch.float64))
            b.append(torch.full((n,), bi, dtype=torch.float64))
            sign.append(torch.full((n,), _lognormal_sign(prior), dtype=torch.float64))
            const += n * (math.lgamma(ai) - ai * math.log(bi) - 0.5 - _HALF_LOG_2PI)
        self.options = {"dtype": like.dtype, "device": like.device}
        flat = (lambda parts: torch.cat(parts).to(**self.options)) if a else (lambda parts: like.new_zeros(0))
        self.a, self.b, self.sign = flat(a), flat(b), flat(sign)
        self.sign_a = self.sign * self.a
        self.const = const
        # the draw buffer, kept from one evaluation to the next (the node reads it in its forward
        # pass and keeps nothing of it), and each site's view of it
        self.eps = torch.empty(self.numel, **self.options)
        self.noise = {name: self.eps[o: o + n].view(shape) for name, (o, n, shape) in self.offsets.items()}

    @staticmethod
    def joins(q, prior) -> bool:
        """Whether a hyper-site with posterior ``q`` (batch shape of the site) and prior ``prior``
        has its KL here."""
        if type(prior) is LogUniform:
            return type(q) is LogScaleNormal
        if _lognormal_sign(prior) is None or type(q) is not dist.LogNormal:
            return False
        params = family(prior)[1]
        a, b = _single_value(params["concentration"]), _single_value(params["rate"])
        return a.dim() == 0 and b.dim() == 0 and not (a.requires_grad or b.requires_grad)

    def draw(self, name):
        """Draw site ``name``'s standard-normal noise into its slice (in the guide's order)."""
        self.noise[name].normal_()


def hyper_terms(layout: HyperLayout, loc, log_scale):
    r"""``(draws, sum KL)`` of the hyper-sites of ``layout`` from the guide's flat means ``m`` and
    unclamped ``log sigma`` and the noise drawn into ``layout.eps``: per site (``layout.names``)
    the draw ``x = m + sigma eps``, the *log*-value of a log-normal site (its value is ``e^x``, as
    the guide's ``rsample`` gives) and the value of a Gaussian one; the KL is the closed form of
    :class:`HyperLayout`. One autograd node for all of them (:class:`_HyperTerms`): a horseshoe
    layer has five log-normal sites, each a handful of kernels and autograd nodes on the per-site
    path, and its scales are formed from the log-values (:func:`~pyro_sparse.priors.log_value`)."""
    out = _HyperTerms.apply(layout, layout.eps, loc, log_scale)
    return out[:-1], out[-1]


class _HyperTerms(torch.autograd.Function):
    """Forward: ``x = m + e^l eps`` (``l = clamp(log sigma)``) per site and the KL
    (:class:`HyperLayout`), on the flat vectors. Backward, with ``g_x`` per site and ``g_kl``:
    ``d/dm = g_kl dKL/dm + g_x`` and
    ``d/d log sigma = (g_kl dKL/dl + g_x e^l eps) 1{clamp inactive}``."""

    @staticmethod
    def forward(ctx, layout, eps, loc, raw):
        ctx.set_materialize_grads(False)
        n1 = layout.num_lognormal
        need = any(ctx.needs_input_grad)
        log_scale = raw.clamp(LOG_SCALE_MIN, LOG_SCALE_MAX)
        scale = log_scale.exp()
        x = torch.addcmul(loc, scale, eps)
        kl = None
        if need:
            d_loc, d_log_scale = torch.empty_like(loc), torch.empty_like(loc)
        if n1:
            m, sq = loc[:n1], scale[:n1].square()
            t = torch.addcmul(m * layout.sign, sq, _constants((0.5,), loc)[0]).exp_().mul_(layout.b)  # b e^{sm+s^2/2}
            kl = (t - layout.sign_a * m - log_scale[:n1]).sum() + layout.const
            if need:
                torch.mul(t.sub_(layout.a), layout.sign, out=d_loc[:n1])  # s (b e^{..} - a)
                torch.mul(t.add_(layout.a), sq, out=d_log_scale[:n1]).sub_(1.0)  # b e^{..} sigma^2 - 1
        if n1 < layout.numel:
            kl_z, d_m, d_l = sparse_vd_kl_terms(loc[n1:], log_scale[n1:], need)
            kl = kl_z.sum() if kl is None else kl + kl_z.sum()
            if need:
                d_loc[n1:], d_log_scale[n1:] = d_m, d_l
        if need:
            inside = log_scale.eq_(raw)  # 1.0 where the clamp is inactive
            ctx.save_for_backward(scale.mul_(eps).mul_(inside), d_loc, d_log_scale.mul_(inside))
            ctx.layout = layout
        return (*(v.view(s) for v, s in zip(x.split(layout.sizes), layout.shapes)), kl)

    @staticmethod
    def backward(ctx, *grads):
        layout = ctx.layout
        dx_dl, d_loc, d_log_scale = ctx.saved_tensors
        g_x, g_kl = grads[:-1], grads[-1]
        g = None
        if any(t is not None for t in g_x):
            g = torch.cat([dx_dl.new_zeros(n) if t is None else t.reshape(-1) for t, n in zip(g_x, layout.sizes)])
        g_loc = g_raw = None
        if g_kl is not None:
            unit = g_kl.device.type == "cpu" and float(g_kl) == 1.0
            g_loc, g_raw = (d_loc, d_log_scale) if unit else (d_loc * g_kl, d_log_scale * g_kl)
            if g is not None:
                g_loc, g_raw = torch.add(g_loc, g), torch.addcmul(g_raw, g, dx_dl)
        elif g is not None:
            g_loc, g_raw = g, g * dx_dl
        return None, None, g_loc, g_raw
