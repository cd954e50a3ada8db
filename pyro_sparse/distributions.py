"""The distributions of sparsification that torch and Pyro do not have.

* :class:`LogUniform`: the improper log-uniform prior ``p(w) ∝ 1/|w|`` of Sparse Variational
  Dropout (Molchanov, Ashukha, Vetrov 2017, "Variational Dropout Sparsifies Deep Neural
  Networks", ICML);
* :class:`LogScaleNormal`: a Gaussian kept as ``(mu, log sigma)``, the mean-field guide's;
* :func:`log_alpha`, the dropout rate of a Gaussian weight posterior, and :func:`clamp`.

Their KL divergences against the priors (closed forms, partial derivatives, the fused autograd
nodes of the ELBO core) are in :mod:`pyro_sparse.kl`.
"""

import math

import pyro.distributions as dist
import torch
from pyro.distributions import TorchDistribution
from torch.distributions import constraints
from torch.distributions.utils import lazy_property

__all__ = ["LogUniform", "LogScaleNormal", "clamp", "log_alpha", "LOG_ALPHA_MIN", "LOG_ALPHA_MAX"]

# Range that log alpha is clamped to. At +20 the Sparse-VD KL below is < 1e-8 (its limit is 0);
# at -20 the weight is essentially deterministic. Outside the range the gradient is zero.
LOG_ALPHA_MIN = -20.0
LOG_ALPHA_MAX = 20.0
#: documented range of log sigma for every Gaussian/log-normal posterior scale: sigma in
#: [exp(-12), exp(4)] ~ [6e-6, 55]; keeps log-variances finite (Sparse VD can drive sigma to 0).
LOG_SCALE_MIN, LOG_SCALE_MAX = -12.0, 4.0
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
