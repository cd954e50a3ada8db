"""Sparsity priors as Pyro distributions, with analytic KL terms.

The functions here are the probability pieces of two sparsification methods:

* Sparse Variational Dropout (Molchanov, Ashukha, Vetrov 2017, "Variational Dropout
  Sparsifies Deep Neural Networks", ICML): a Gaussian posterior N(theta, sigma^2) per weight
  against the improper log-uniform prior p(w) ∝ 1/|w|.
* The (regularised) horseshoe (Piironen & Vehtari 2017; Louizos, Ullrich, Welling 2017):
  log-normal posteriors on scales against Gamma / inverse-gamma hyperpriors.

Each KL is registered with :func:`torch.distributions.kl.register_kl`, so
``kl_divergence(guide_fn, model_fn)`` and therefore :class:`pyro.infer.TraceMeanField_ELBO`
use it. Registrations are on the torch base classes, which also covers Pyro's wrappers
(``pyro.distributions.Normal`` subclasses ``torch.distributions.Normal`` and so on), and
pyro's ``Independent``/``Independent`` rule sums them through ``.to_event``.
"""

import math

import torch
from torch.distributions import constraints
from torch.distributions import Gamma, Independent, InverseGamma, LogNormal, Normal
from torch.distributions.kl import register_kl
from torch.distributions.utils import lazy_property

import pyro.distributions as dist
from pyro.distributions import TorchDistribution

__all__ = [
    "LogUniform",
    "LogScaleNormal",
    "kl_normal_loguniform_log",
    "sparse_vd_kl_terms",
    "normal_kl_terms",
    "kl_terms_for",
    "SparseVDKLTerms",
    "NormalKLTerms",
    "neg_log_density_terms_for",
    "summed_neg_log_density",
    "NormalNegLogDensity",
    "LogUniformNegLogDensity",
    "clamp",
    "log_alpha",
    "kl_normal_loguniform",
    "kl_lognormal_gamma",
    "kl_lognormal_inverse_gamma",
    "kl_lognormal_halfcauchy_mc",
    "LOG_ALPHA_MIN",
    "LOG_ALPHA_MAX",
]

# Range that log alpha is clamped to. At +20 the Sparse-VD KL below is < 1e-8 (its limit is 0);
# at -20 the weight is essentially deterministic. Outside the range the gradient is zero.
LOG_ALPHA_MIN = -20.0
LOG_ALPHA_MAX = 20.0
_THETA2_EPS = 1e-16  # added to theta^2 so that theta = 0 gives a finite (clamped) log alpha

# Constants of the Sparse VD KL approximation (Molchanov et al. 2017, eq. 14).
_K1, _K2, _K3 = 0.63576, 1.87320, 1.48695

_HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)
_LOG2E = 1.0 / math.log(2.0)  # exp(x) = exp2(x * log2(e))


class _Clamp(torch.autograd.Function):
    """``torch.clamp`` with the same gradient (passed where ``lo <= x <= hi``), its mask built as
    floats (``clamp(x) == x``): torch's own backward goes through boolean kernels that cost ~5x
    a float pass on the CPU."""

    @staticmethod
    def forward(ctx, x, lo, hi):
        out = x.clamp(lo, hi)
        if ctx.needs_input_grad[0]:
            ctx.save_for_backward(x, out)
        return out

    @staticmethod
    def backward(ctx, grad):
        x, out = ctx.saved_tensors
        return grad * torch.eq(out, x, out=torch.empty_like(grad)), None, None


#: below this many elements torch's own kernels win (a Python autograd Function costs a few us)
FUSED_MIN_NUMEL = 2048


def clamp(x: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
    """``x.clamp(lo, hi)``: same value, same gradient, cheaper backward (see :class:`_Clamp`)."""
    if x.numel() >= FUSED_MIN_NUMEL and x.requires_grad and torch.is_grad_enabled():
        return _Clamp.apply(x, lo, hi)
    return x.clamp(lo, hi)


class LogUniform(TorchDistribution):
    r"""Improper log-uniform prior :math:`p(w) \propto 1/|w|` on the real line.

    The scale-invariant prior of Sparse Variational Dropout (Molchanov, Ashukha, Vetrov 2017).
    It has no normalising constant, so :meth:`log_prob` returns the *unnormalised*
    :math:`\log p(w) = -\log|w|`, and it has no sampler. It is meant to be paired with a
    Gaussian guide, whose KL against it is known in closed form up to an additive constant
    (:func:`kl_normal_loguniform`).

    The distribution holds no tensor: ``log_prob`` takes device and dtype from its argument,
    the KL from the guide's parameters. Use it as any other prior::

        pyro.sample("fc1.weight", LogUniform().expand([out, inp]).to_event(2))

    :param batch_shape: batch shape (default ``()``); usually set with ``.expand``.
    """

    arg_constraints = {}
    support = constraints.real
    has_rsample = False

    def __init__(self, batch_shape=torch.Size(), validate_args=None):
        try:
            batch_shape = torch.Size(batch_shape)
        except TypeError:
            raise ValueError(f"LogUniform: batch_shape must be a sequence of ints, got {batch_shape!r}")
        if any(n < 0 for n in batch_shape):
            raise ValueError(f"LogUniform: batch_shape must be non-negative, got {tuple(batch_shape)}")
        super().__init__(batch_shape, validate_args=validate_args)

    def expand(self, batch_shape, _instance=None):
        batch_shape = torch.Size(batch_shape)
        try:
            ok = torch.broadcast_shapes(self.batch_shape, batch_shape) == batch_shape
        except RuntimeError:
            ok = False
        if not ok:
            raise ValueError(
                f"LogUniform.expand: cannot expand batch_shape {tuple(self.batch_shape)} "
                f"to {tuple(batch_shape)}"
            )
        new = self._get_checked_instance(LogUniform, _instance)
        super(LogUniform, new).__init__(batch_shape, validate_args=False)
        new._validate_args = self._validate_args
        return new

    def __repr__(self):
        return f"LogUniform(batch_shape={tuple(self.batch_shape)})"

    def log_prob(self, value):
        """Unnormalised log density ``-log|value|`` (``+inf`` at 0)."""
        if self._validate_args:
            self._validate_sample(value)
        lp = -value.abs().log()
        return lp.expand(torch.broadcast_shapes(lp.shape, self.batch_shape))

    def sample(self, sample_shape=torch.Size()):
        raise NotImplementedError(
            "LogUniform is an improper prior and has no sampler; use it as a prior with a guide"
        )

    rsample = sample


class LogScaleNormal(dist.Normal):
    r"""``Normal(loc, exp(log_scale))`` that keeps :math:`\log\sigma`.

    The mean-field guide stores every Gaussian posterior as :math:`(\mu, \log\sigma)`. With this
    class the KL terms (Sparse VD, Gaussian prior) and the local-reparameterisation variance
    :math:`\sigma^2 = e^{2\log\sigma}` are computed from :math:`\log\sigma` directly; ``scale``
    is only materialised when something asks for it (sampling, ``log_prob``). Behaves as a
    ``Normal`` everywhere else (``isinstance(d, Normal)`` holds).
    """

    arg_constraints = {"loc": constraints.real, "log_scale": constraints.real}

    def __init__(self, loc, log_scale, validate_args=None):
        if loc.shape != log_scale.shape:
            loc, log_scale = torch.broadcast_tensors(loc, log_scale)
        self.loc, self.log_scale = loc, log_scale
        torch.distributions.Distribution.__init__(self, loc.shape, validate_args=validate_args)

    @lazy_property
    def scale(self):
        return self.log_scale.exp()

    @lazy_property
    def variance(self):
        return torch.exp(2 * self.log_scale)

    def expand(self, batch_shape, _instance=None):
        batch_shape = torch.Size(batch_shape)
        return LogScaleNormal(self.loc.expand(batch_shape), self.log_scale.expand(batch_shape),
                              validate_args=False)

    def log_prob(self, value):
        if self._validate_args:
            self._validate_sample(value)
        z = (value - self.loc) * torch.exp(-self.log_scale)
        return -0.5 * z * z - self.log_scale - _HALF_LOG_2PI

    def entropy(self):
        return 0.5 + _HALF_LOG_2PI + self.log_scale


def log_alpha(loc, scale):
    r"""Dropout rate of a Gaussian weight posterior, in log space.

    :math:`\log\alpha = \log\sigma^2 - \log(\theta^2 + \epsilon)` with :math:`\epsilon = 10^{-16}`,
    clamped to ``[LOG_ALPHA_MIN, LOG_ALPHA_MAX] = [-20, 20]`` (Molchanov et al. 2017, sec. 4.1;
    a weight is pruned where :math:`\log\alpha > 3`).

    :param loc: posterior mean :math:`\theta`.
    :param scale: posterior standard deviation :math:`\sigma > 0`.
    """
    la = 2 * scale.log() - (loc * loc + _THETA2_EPS).log()
    return la.clamp(LOG_ALPHA_MIN, LOG_ALPHA_MAX)


_CONSTANTS: dict = {}


def _constants(values: tuple, like: torch.Tensor) -> tuple:
    """``values`` as 0-dim tensors of ``like``'s dtype and device, cached: a Python number in a
    tensor op is wrapped into a double tensor and cast at every call (~1 us per op on the CPU)."""
    key = (values, like.dtype, like.device)
    out = _CONSTANTS.get(key)
    if out is None:
        out = _CONSTANTS[key] = tuple(torch.tensor(v, dtype=like.dtype, device=like.device) for v in values)
    return out


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


class _ParameterFree:
    """Equality, hash and repr of a callable without parameters: all its instances are equal."""

    def __eq__(self, other):
        return type(other) is type(self)

    def __hash__(self):
        return hash(type(self))

    def __repr__(self):
        return f"{type(self).__name__}()"


class SparseVDKLTerms(_ParameterFree):
    """``kl_terms`` of the log-uniform prior: :func:`sparse_vd_kl_terms` (all instances equal)."""

    def __call__(self, loc, log_scale, var, grad=True):
        return sparse_vd_kl_terms(loc, log_scale, grad)


class NormalKLTerms:
    """``kl_terms`` of a fixed ``N(loc0, scale0^2)`` prior: :func:`normal_kl_terms`."""

    def __init__(self, loc0: float, scale0: float):
        self.loc0, self.scale0 = float(loc0), float(scale0)

    def __call__(self, loc, log_scale, var, grad=True):
        return normal_kl_terms(loc, log_scale, var, self.loc0, self.scale0, grad)

    def __eq__(self, other):
        return type(other) is NormalKLTerms and (other.loc0, other.scale0) == (self.loc0, self.scale0)

    def __hash__(self):
        return hash((self.loc0, self.scale0))

    def __repr__(self):
        return f"NormalKLTerms(loc0={self.loc0}, scale0={self.scale0})"


def kl_terms_for(prior):
    """``kl_terms(loc, log_scale, var, grad) -> (kl, dkl_dloc, dkl_dlog_scale)``: the elementwise
    KL of a Gaussian posterior against the fixed prior distribution ``prior`` and its partial
    derivatives (for fused gradients), or None where no such closed form is known here. Known:
    the log-uniform prior (:class:`SparseVDKLTerms`) and Gaussian priors with one mean and one
    scale for every element (:class:`NormalKLTerms`)."""
    if isinstance(prior, LogUniform):
        return SparseVDKLTerms()
    if type(prior) in (Normal, dist.Normal):
        loc0, scale0 = _single_value(prior.loc), _single_value(prior.scale)
        if loc0.dim() == 0 and scale0.dim() == 0 and not (loc0.requires_grad or scale0.requires_grad):
            return NormalKLTerms(float(loc0), float(scale0))
    return None


class NormalNegLogDensity:
    r"""``terms`` of a fixed ``N(loc0, scale0^2)`` prior at a point value (for a delta guide):

    .. math::
        -\sum_i \log N(w_i; m_0, s_0^2) = \frac{1}{2 s_0^2} \sum_i (w_i - m_0)^2
            + n \left(\log s_0 + \tfrac12 \log 2\pi\right), \qquad
        \frac{\partial}{\partial w_i} = \frac{w_i - m_0}{s_0^2}.

    Called as ``(w, grad=True) -> (sum, d/dw)`` (``d/dw`` is ``w`` itself for the standard normal
    prior: do not modify it in place; None when ``grad`` is False); nothing is recorded by autograd."""

    def __init__(self, loc0: float, scale0: float):
        self.loc0, self.scale0 = float(loc0), float(scale0)

    def __call__(self, w, grad=True):
        precision0 = 1.0 / (self.scale0 * self.scale0)
        m0, half_p0, p0 = _constants((self.loc0, 0.5 * precision0, precision0), w)
        with torch.no_grad():
            diff = w if self.loc0 == 0 else w - m0
            flat = diff.reshape(-1)
            const = w.numel() * (math.log(self.scale0) + _HALF_LOG_2PI)
            total = torch.dot(flat, flat).mul_(half_p0).add_(const)  # one pass: no squared buffer
            if not grad:
                return total, None
            # ``w`` itself, not a view of it: autograd copies a gradient that shares its storage
            # with a live tensor only when it sees the extra references (a view hides them)
            return total, (diff if precision0 == 1 else diff * p0)

    def __eq__(self, other):
        return type(other) is NormalNegLogDensity and (other.loc0, other.scale0) == (self.loc0, self.scale0)

    def __hash__(self):
        return hash((NormalNegLogDensity, self.loc0, self.scale0))

    def __repr__(self):
        return f"NormalNegLogDensity(loc0={self.loc0}, scale0={self.scale0})"


class LogUniformNegLogDensity(_ParameterFree):
    r"""``terms`` of the improper log-uniform prior at a point value: with its unnormalised
    density :math:`p(w) \propto 1/|w|` (as :meth:`LogUniform.log_prob`),
    :math:`-\sum_i \log p(w_i) = \sum_i \log|w_i|` and :math:`\partial/\partial w_i = 1/w_i`.
    Called as :class:`NormalNegLogDensity` is (all instances equal)."""

    def __call__(self, w, grad=True):
        with torch.no_grad():
            total = w.abs().log_().sum()
            return total, (torch.reciprocal(w) if grad else None)


def neg_log_density_terms_for(prior):
    """``terms(w, grad) -> (-sum_i log p(w_i), d/dw)``: the summed negative log-density of the
    fixed prior distribution ``prior`` at a point value and its gradient (for fused gradients),
    or None where no such closed form is known here. Known, as for :func:`kl_terms_for`: the
    log-uniform prior (:class:`LogUniformNegLogDensity`) and Gaussian priors with one mean and
    one scale for every element (:class:`NormalNegLogDensity`). The value is ``prior.log_prob``'s,
    negated and summed."""
    if isinstance(prior, LogUniform):
        return LogUniformNegLogDensity()
    normal = kl_terms_for(prior)
    if isinstance(normal, NormalKLTerms):
        return NormalNegLogDensity(normal.loc0, normal.scale0)
    return None


class _SummedNegLogDensity(torch.autograd.Function):
    """``sum_sites terms_k(w_k)`` (each :func:`neg_log_density_terms_for`) as one autograd node,
    the gradient of each site formed in the forward pass: ``g * d/dw_k`` (``d/dw_k`` itself when
    ``g`` is exactly 1, the usual ``kl_weight``; autograd copies a saved tensor it makes a
    ``.grad``)."""

    @staticmethod
    def forward(ctx, terms, *weights):
        ctx.set_materialize_grads(False)
        need = any(ctx.needs_input_grad)
        totals, grads = [], []
        for fn, w in zip(terms, weights):
            total, d_w = fn(w, need)
            totals.append(total)
            grads.append(d_w)
        if need:
            ctx.save_for_backward(*grads)
        return torch.stack(totals).sum() if len(totals) > 1 else totals[0]

    @staticmethod
    def backward(ctx, grad):
        if grad is None:
            return (None,) * (1 + len(ctx.saved_tensors))
        unit = grad.device.type == "cpu" and float(grad) == 1.0
        return (None, *(d if unit else d * grad for d in ctx.saved_tensors))


def summed_neg_log_density(terms, weights):
    r""":math:`-\sum_k \sum_i \log p_k(w_{k,i})` for point values ``weights`` under fixed priors
    whose ``terms`` (:func:`neg_log_density_terms_for`) are known, in one autograd node: the prior
    term of the MAP objective (the KL of a delta guide). Same value and gradient as
    ``sum(-prior.log_prob(w).sum())``."""
    return _SummedNegLogDensity.apply(tuple(terms), *weights)


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


def _lognormal_entropy(loc, scale):
    # H[LogNormal(m, s)] = m + 1/2 + log s + 1/2 log(2 pi)
    return loc + 0.5 + scale.log() + _HALF_LOG_2PI


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


def kl_lognormal_halfcauchy_mc(loc, scale, cauchy_scale, num_samples=1):
    r"""Monte Carlo estimate of :math:`KL(\mathrm{LogNormal}(m, s)\,\|\,C^+(0, \gamma))`.

    There is no closed form. With :math:`x_i = e^{m + s\epsilon_i}`, :math:`\epsilon_i\sim N(0,1)`
    (reparameterised, so the estimate is differentiable) and
    :math:`\log C^+(x; \gamma) = \log(2/\pi) - \log\gamma - \log(1 + x^2/\gamma^2)`:

    .. math::
        \widehat{KL} = -H[q] - \frac1N\sum_i \log C^+(x_i; \gamma).

    The entropy is exact, so only the cross term is noisy. Not registered with ``register_kl``:
    ``TraceMeanField_ELBO`` already falls back to a one-sample estimate for this pair. Uses the
    global torch RNG; the sample axis is the leading one.
    """
    if int(num_samples) < 1:
        raise ValueError(f"kl_lognormal_halfcauchy_mc: num_samples must be >= 1, got {num_samples!r}")
    log_gamma = torch.as_tensor(cauchy_scale, dtype=loc.dtype, device=loc.device).log()
    shape = torch.broadcast_shapes(loc.shape, scale.shape, log_gamma.shape)
    eps = torch.randn((int(num_samples),) + shape, dtype=loc.dtype, device=loc.device)
    log_x = loc + scale * eps
    # log(1 + x^2/gamma^2) = softplus(2 (log x - log gamma)), stable for large x
    log_p = math.log(2 / math.pi) - log_gamma - torch.nn.functional.softplus(2 * (log_x - log_gamma))
    return -_lognormal_entropy(loc, scale) - log_p.mean(0)


@register_kl(Normal, LogUniform)
def _kl_normal_loguniform(p, q):
    kl = kl_normal_loguniform(p.loc, p.scale)
    return kl.expand(torch.broadcast_shapes(kl.shape, q.batch_shape))


@register_kl(LogNormal, Gamma)
def _kl_lognormal_gamma(p, q):
    return kl_lognormal_gamma(p.loc, p.scale, q.concentration, q.rate)


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
    :meth:`~pyro_sparse.guides.MeanFieldGuide.local_terms`: ``keep = 1{m}`` and
    ``fill = (1 - keep) g_0^2`` in ``like``'s dtype and device, so that ``mu * keep`` and
    ``fill + sigma^2 keep`` are exactly the mean and variance of :func:`reduced_normal`
    (``where(m, mu, 0)``, ``where(m, sigma, g_0)^2``) and ``d * keep`` zeroes a pruned element's
    gradient. Products with a 0/1 tensor, not ``torch.where``: on the CPU ``where`` and the
    bool-to-float cast are each ~10x a multiplication, so callers cache these per mask."""
    keep = mask.to(dtype=like.dtype, device=like.device)
    g0_sq = torch.tensor(scale, dtype=like.dtype, device=like.device).square()  # as Normal(0, g0).variance
    return keep, (1 - keep) * g0_sq
