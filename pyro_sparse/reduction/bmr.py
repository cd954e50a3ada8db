r"""Bayesian model reduction (BMR) for Gaussian posteriors and priors.

A model was fitted under a *full* prior :math:`p(\theta) = N(\eta, \Pi^{-1})` and gave the
Gaussian posterior :math:`q(\theta) = N(\mu, P^{-1})`. BMR asks how the evidence and the
posterior change if the prior is replaced by a *reduced* prior
:math:`\tilde p(\theta) = N(\tilde\eta, \tilde\Pi^{-1})`, without refitting
(Friston & Penny 2011, "Post hoc Bayesian model selection", NeuroImage 56; Friston, Parr &
Zeidman 2018, "Bayesian model reduction"; Markovic, Friston & Kiebel 2023, "Bayesian
sparsification for deep neural networks with Bayesian model reduction", arXiv:2309.12095).
Since :math:`\tilde q(\theta) \propto q(\theta)\, \tilde p(\theta) / p(\theta)`,

.. math::

    \tilde P &= P + \tilde\Pi - \Pi, \qquad
    \tilde\mu = \tilde P^{-1} (P\mu + \tilde\Pi\tilde\eta - \Pi\eta), \\
    \Delta F &= \ln \tilde p(y) - \ln p(y)
      = \tfrac12 \ln \frac{|P|\,|\tilde\Pi|}{|\Pi|\,|\tilde P|}
        - \tfrac12 \big(\mu^\top P\mu + \tilde\eta^\top\tilde\Pi\tilde\eta
                        - \eta^\top\Pi\eta - \tilde\mu^\top\tilde P\tilde\mu\big).

:math:`\Delta F > 0` means the reduced model has more evidence (prune). For a conjugate
Gaussian model (Bayesian linear regression with known noise) the formula is exact; for an
approximate posterior it is the change of the variational free energy.

Conventions of this module: a *vector* interface (precision of the same shape as the mean,
or broadcastable to it) means diagonal Gaussians, one independent scalar problem per
element, with element-wise results; a *matrix* interface (the posterior precision has one
more dimension than the mean and ends in ``(n, n)``) means full Gaussians over the last
dimension of the mean, with one :math:`\Delta F` per batch entry. The functions read only
these summaries; they know nothing about networks.
"""

import math
import warnings

import torch

from ._common import (
    as_float,
    check_no_nan,
    check_positive,
    common_dtype_device,
    first_bad,
    sum_over_groups,
)

__all__ = [
    "bmr_gaussian",
    "bmr_diagonal_zero_mean",
    "savage_dickey",
    "group_delta_f",
    "spike_slab_decision",
]


# --------------------------------------------------------------------------- helpers


def _is_full(loc, precision):
    """True when ``precision`` is a stack of ``(n, n)`` matrices for a ``loc`` of shape ``(..., n)``."""
    return (
        loc.dim() >= 1
        and precision.dim() == loc.dim() + 1
        and precision.shape[-1] == precision.shape[-2] == loc.shape[-1]
    )


def _as_matrix(name, x, n, dtype, device):
    x = as_float(x, dtype, device)
    if x.dim() == 0:
        return x * torch.eye(n, dtype=dtype, device=device)
    if x.dim() >= 2 and tuple(x.shape[-2:]) == (n, n):
        return x
    raise ValueError(
        f"{name}: with a full posterior precision over n={n} parameters this must be a scalar "
        f"or a matrix of shape (..., {n}, {n}) (use torch.diag_embed for a diagonal one); "
        f"got shape {tuple(x.shape)}"
    )


def _as_vector(name, x, n, dtype, device):
    x = as_float(x, dtype, device)
    if x.dim() == 0:
        return x.expand(n)
    if x.shape[-1] == n:
        return x
    raise ValueError(
        f"{name}: with a full posterior over n={n} parameters this must be a scalar or have "
        f"shape (..., {n}); got shape {tuple(x.shape)}"
    )


def _cholesky(name, matrix, what="must be positive definite"):
    chol, info = torch.linalg.cholesky_ex(matrix)
    if bool((info != 0).any()):
        batch = tuple(torch.nonzero(info != 0)[0].tolist())
        where = f" at batch index {batch}" if batch else ""
        minor = int(info[batch].item()) if batch else int(info.item())
        raise ValueError(f"{name}: {what}; Cholesky failed at leading minor {minor}{where}")
    return chol


def _logdet(chol):
    return 2.0 * torch.log(torch.diagonal(chol, dim1=-2, dim2=-1)).sum(-1)


def _quad(x, matrix):
    """``x' M x`` over the last dimension, with broadcasting."""
    return torch.einsum("...i,...ij,...j->...", x, matrix, x)


def _matvec(matrix, x):
    return (matrix @ x.unsqueeze(-1)).squeeze(-1)


# --------------------------------------------------------------------------- BMR


def bmr_gaussian(loc, precision, prior_loc, prior_precision, reduced_loc, reduced_precision):
    r"""Change of log evidence and reduced posterior when a Gaussian prior is replaced.

    Full prior :math:`N(\eta, \Pi^{-1})` (``prior_loc``, ``prior_precision``), reduced prior
    :math:`N(\tilde\eta, \tilde\Pi^{-1})` (``reduced_loc``, ``reduced_precision``), posterior
    under the full prior :math:`N(\mu, P^{-1})` (``loc``, ``precision``)
    (Friston & Penny 2011; Markovic, Friston & Kiebel 2023):

    .. math::

        \tilde P = P + \tilde\Pi - \Pi, \quad
        \tilde\mu = \tilde P^{-1}(P\mu + \tilde\Pi\tilde\eta - \Pi\eta),

        \Delta F = \tfrac12 \ln\frac{|P||\tilde\Pi|}{|\Pi||\tilde P|}
          - \tfrac12\big(\mu^\top P\mu + \tilde\eta^\top\tilde\Pi\tilde\eta
          - \eta^\top\Pi\eta - \tilde\mu^\top\tilde P\tilde\mu\big).

    The quadratic bracket is evaluated in the algebraically equal form
    :math:`(\mu-\tilde\mu)^\top P(\mu-\tilde\mu) + (\tilde\eta-\tilde\mu)^\top\tilde\Pi
    (\tilde\eta-\tilde\mu) - (\eta-\tilde\mu)^\top\Pi(\eta-\tilde\mu)` (expand and use
    :math:`\tilde P\tilde\mu = P\mu + \tilde\Pi\tilde\eta - \Pi\eta`), which avoids the
    cancellation of large terms.

    **Vector interface** (diagonal Gaussians): ``precision`` has the shape of ``loc`` or
    broadcasts with it; every argument is broadcast and the results are element-wise, one
    independent scalar reduction per element. The log-determinant ratio is evaluated as
    :math:`\ln(P/\Pi) - \operatorname{log1p}((P-\Pi)/\tilde\Pi)`, which reads, for the
    zero-mean case, exactly as the closed form of :func:`bmr_diagonal_zero_mean`.

    **Matrix interface** (full Gaussians): ``loc`` has shape ``(..., n)`` and ``precision``
    shape ``(..., n, n)``. The other precisions are scalars (times the identity) or
    ``(..., n, n)`` matrices; the other means are scalars or ``(..., n)``. Determinants and
    solves go through Cholesky factors (no explicit inverse). ``delta_f`` has the batch
    shape ``(...)``.

    All precisions must be positive (definite) and so must :math:`\tilde P`; otherwise the
    reduced prior is flatter than the full posterior allows and ``ValueError`` is raised.
    For the point-mass limit :math:`\tilde\Pi\to\infty` use :func:`savage_dickey`.

    Returns ``(delta_f, reduced_post_loc, reduced_post_precision)``; :math:`\Delta F > 0`
    means the reduced model has more evidence.
    """
    dtype, device = common_dtype_device(
        loc, precision, prior_loc, prior_precision, reduced_loc, reduced_precision
    )
    mu = as_float(loc, dtype, device)
    P = as_float(precision, dtype, device)

    if _is_full(mu, P):
        n = mu.shape[-1]
        eta = _as_vector("prior_loc", prior_loc, n, dtype, device)
        eta_r = _as_vector("reduced_loc", reduced_loc, n, dtype, device)
        Pi = _as_matrix("prior_precision", prior_precision, n, dtype, device)
        Pi_r = _as_matrix("reduced_precision", reduced_precision, n, dtype, device)
        L = _cholesky("precision", P)
        L_pi = _cholesky("prior_precision", Pi)
        L_pir = _cholesky("reduced_precision", Pi_r)
        P_r = P + Pi_r - Pi
        L_r = _cholesky(
            "reduced_precision",
            P_r,
            "the reduced posterior precision P + reduced_precision - prior_precision "
            "must be positive definite",
        )
        rhs = _matvec(P, mu) + _matvec(Pi_r, eta_r) - _matvec(Pi, eta)
        mu_r = torch.cholesky_solve(rhs.unsqueeze(-1), L_r).squeeze(-1)
        log_ratio = _logdet(L) + _logdet(L_pir) - _logdet(L_pi) - _logdet(L_r)
        quad = _quad(mu - mu_r, P) + _quad(eta_r - mu_r, Pi_r) - _quad(eta - mu_r, Pi)
        return 0.5 * log_ratio - 0.5 * quad, mu_r, P_r

    eta = as_float(prior_loc, dtype, device)
    eta_r = as_float(reduced_loc, dtype, device)
    Pi = as_float(prior_precision, dtype, device)
    Pi_r = as_float(reduced_precision, dtype, device)
    mu, P, eta, eta_r, Pi, Pi_r = torch.broadcast_tensors(mu, P, eta, eta_r, Pi, Pi_r)
    check_positive("precision", P)
    check_positive("prior_precision", Pi)
    check_positive("reduced_precision", Pi_r)
    first_bad(
        "reduced_precision",
        ~torch.isfinite(Pi_r),
        Pi_r,
        "must be finite (for a point-mass reduced prior use savage_dickey)",
    )
    P_r = P + Pi_r - Pi
    check_positive(
        "reduced_precision",
        P_r,
        "the reduced posterior precision P + reduced_precision - prior_precision must be positive",
    )
    mu_r = (P * mu + Pi_r * eta_r - Pi * eta) / P_r
    # ln(P Pi~ / (Pi P~)) with P~/Pi~ = 1 + (P - Pi)/Pi~.
    log_ratio = torch.log(P) - torch.log(Pi) - torch.log1p((P - Pi) / Pi_r)
    quad = P * (mu - mu_r) ** 2 + Pi_r * (eta_r - mu_r) ** 2 - Pi * (eta - mu_r) ** 2
    return 0.5 * log_ratio - 0.5 * quad, mu_r, P_r


def bmr_diagonal_zero_mean(loc, precision, prior_scale, reduced_scale):
    r"""Closed-form BMR per weight for zero-mean priors given by their scales.

    Full prior :math:`N(0, s^2)`, reduced prior :math:`N(0, g^2)`, posterior
    :math:`N(\mu, 1/\pi)`; with :math:`\tilde\pi = \pi + 1/g^2 - 1/s^2`
    (Markovic, Friston & Kiebel 2023):

    .. math::

        \Delta F = -\tfrac12 \ln\big(1 + g^2(\pi - 1/s^2)\big) + \tfrac12 \ln(\pi s^2)
                   - \tfrac12 \pi\mu^2 + \tfrac12 \pi^2\mu^2/\tilde\pi .

    This is :func:`bmr_gaussian` with :math:`\eta = \tilde\eta = 0`, :math:`\Pi = 1/s^2`,
    :math:`\tilde\Pi = 1/g^2`. ``reduced_scale = 0`` is allowed and gives the Savage-Dickey
    limit :math:`\tfrac12\ln(\pi s^2) - \tfrac12\pi\mu^2`. Element-wise with broadcasting;
    returns ``delta_f`` only.
    """
    dtype, device = common_dtype_device(loc, precision, prior_scale, reduced_scale)
    mu = as_float(loc, dtype, device)
    pi = as_float(precision, dtype, device)
    s = as_float(prior_scale, dtype, device)
    g = as_float(reduced_scale, dtype, device)
    check_positive("precision", pi)
    check_positive("prior_scale", s, "must be a positive scale")
    first_bad("reduced_scale", ~(g >= 0), g, "must be a scale >= 0")
    g2, s2 = g * g, s * s
    shrink = g2 * (pi - 1.0 / s2)
    g, shrink = torch.broadcast_tensors(g, shrink)
    first_bad(
        "reduced_scale",
        ~(shrink > -1.0),
        g,
        "the reduced posterior precision pi + 1/g^2 - 1/s^2 must be positive "
        "(g is wider than the data allow)",
    )
    pi_r = pi + 1.0 / g2 - 1.0 / s2  # +inf when g == 0
    return (
        -0.5 * torch.log1p(shrink)
        + 0.5 * torch.log(pi * s2)
        - 0.5 * pi * mu**2
        + 0.5 * pi**2 * mu**2 / pi_r
    )


def savage_dickey(loc, precision, prior_loc, prior_precision):
    r"""Savage-Dickey ratio: BMR towards a point mass at zero.

    The limit :math:`\tilde\Pi \to \infty`, :math:`\tilde\eta = 0` of :func:`bmr_gaussian`
    (Dickey 1971; Friston & Penny 2011), where the reduced model fixes the parameters at 0:

    .. math::

        \Delta F = \ln q(0) - \ln p(0)
          = \tfrac12 \ln\frac{|P|}{|\Pi|} - \tfrac12 \mu^\top P\mu + \tfrac12 \eta^\top\Pi\eta .

    Vector interface (diagonal, element-wise): per element
    :math:`\tfrac12\ln(P/\Pi) - \tfrac12 P\mu^2 + \tfrac12\Pi\eta^2`; with :math:`\eta = 0`,
    :math:`\Pi = 1/s^2` this is :math:`\tfrac12\ln(\pi s^2) - \tfrac12\pi\mu^2`. Matrix
    interface (``precision`` of shape ``(..., n, n)``): the joint term for the whole block,
    :math:`\ln N(0;\mu,P^{-1}) - \ln N(0;\eta,\Pi^{-1})`, one value per batch entry. Same
    shape conventions as :func:`bmr_gaussian`. :math:`\Delta F > 0` favours removal.
    """
    dtype, device = common_dtype_device(loc, precision, prior_loc, prior_precision)
    mu = as_float(loc, dtype, device)
    P = as_float(precision, dtype, device)
    if _is_full(mu, P):
        n = mu.shape[-1]
        eta = _as_vector("prior_loc", prior_loc, n, dtype, device)
        Pi = _as_matrix("prior_precision", prior_precision, n, dtype, device)
        L = _cholesky("precision", P)
        L_pi = _cholesky("prior_precision", Pi)
        return 0.5 * (_logdet(L) - _logdet(L_pi)) - 0.5 * _quad(mu, P) + 0.5 * _quad(eta, Pi)
    eta = as_float(prior_loc, dtype, device)
    Pi = as_float(prior_precision, dtype, device)
    check_positive("precision", P)
    check_positive("prior_precision", Pi)
    return 0.5 * (torch.log(P) - torch.log(Pi)) - 0.5 * P * mu**2 + 0.5 * Pi * eta**2


def group_delta_f(delta_f, dim=None, *, groups=None, num_groups=None, keepdim=False):
    r"""Evidence change for removing whole groups, under a factorised posterior.

    When prior and posterior factorise over the elements of a group, the reduced model that
    removes the group has the product of the element-wise evidence ratios, so
    :math:`\Delta F_g = \sum_{k \in g} \Delta F_k` (Markovic, Friston & Kiebel 2023). This is
    only valid for element-wise ``delta_f`` from the vector interface; a correlated block
    needs :func:`bmr_gaussian` with the block's full precision.

    Grouping: ``dim`` sums over those dimensions (``dim=1`` for the units of a Linear weight
    ``(out, in)``, ``dim=(1, 2, 3)`` for the filters of a conv weight); ``groups`` is an
    integer tensor of group ids ``0..G-1`` (broadcastable to ``delta_f``) and gives a
    ``(G,)`` result. With neither, one group per leading index (per output unit / filter).
    """
    return sum_over_groups(
        delta_f, dim=dim, groups=groups, num_groups=num_groups, keepdim=keepdim, name="delta_f"
    )


# --------------------------------------------------------------------------- spike-and-slab


def _fixed_point_newton(fn, x0, max_iter, tol):
    """Fixed point of an increasing scalar map ``f`` with ``f' < 1``, by safeguarded Newton.

    ``fn(x)`` returns ``(f(x), f'(x))``. The root of the decreasing ``h(x) = f(x) - x`` is
    sought with Newton steps ``x + h / (1 - f')``; once it is bracketed (a point with
    ``h > 0`` and one with ``h < 0`` are known) a step that leaves the bracket is replaced by
    bisection, so the iteration cannot diverge (the ``rtsafe`` scheme of Press et al.,
    Numerical Recipes). Should rounding give ``f' >= 1`` the plain update ``x <- f(x)`` is
    used, which never passes the fixed point. Stops when a step is shorter than ``tol``.
    Returns ``(x, converged, last_step)``.
    """
    x = float(x0)
    f, df = fn(x)
    lo = hi = None  # lo: a point with h > 0 (left of the root); hi: one with h < 0
    step = math.inf
    for _ in range(max_iter):
        h = f - x
        if h == 0.0:
            return x, True, 0.0
        if h > 0:
            lo = x
        else:
            hi = x
        proposal = x + h / (1.0 - df) if df < 1.0 else f
        if lo is not None and hi is not None and not lo < proposal < hi:
            proposal = 0.5 * (lo + hi)
        step = proposal - x
        x = proposal
        f, df = fn(x)
        if abs(step) < tol:
            return x, True, abs(step)
    return x, f == x, abs(step)


def _zeta_map(flat, zeta):
    """``f(zeta) = psi(alpha) - psi(beta)`` and its derivative, for a float64 ``flat``.

    One pass: ``q = sigmoid(zeta - flat)``, ``A = sum q``, ``sum (1 - q) = N - A`` and
    ``sum q (1 - q) = A - sum q^2``. The subtractions lose at most about ``N * eps`` in
    absolute terms, which is harmless because ``alpha, beta >= 1``.
    """
    q = torch.sigmoid(zeta - flat)  # q_k = q(z_k = 1)
    kept = q.sum()
    alpha = 1.0 + kept
    beta = 1.0 + (flat.numel() - kept)
    f = torch.digamma(alpha) - torch.digamma(beta)
    # d alpha / d zeta = sum q(1-q) = -d beta / d zeta
    spread = (kept - torch.dot(q, q)).clamp_min(0.0)
    df = (torch.polygamma(1, alpha) + torch.polygamma(1, beta)) * spread
    return float(f), float(df)


def spike_slab_decision(delta_f, max_iter=100, tol=1e-8):
    r"""Layer-wise spike-and-slab decision on BMR evidence changes (Markovic et al. 2023).

    Each weight k of a layer is either kept (slab, :math:`z_k = 1`) or removed (spike,
    :math:`z_k = 0`), with :math:`z_k \sim \mathrm{Bernoulli}(\rho)` and a layer-wide
    inclusion probability :math:`\rho \sim \mathrm{Beta}(1, 1)`. Since
    :math:`\Delta F_k = \ln p(y \mid z_k=0) - \ln p(y \mid z_k=1)`, the mean-field updates are

    .. math::

        q_k = q(z_k = 1) = \sigma(\zeta - \Delta F_k), \quad
        \alpha = 1 + \textstyle\sum_k q_k, \quad \beta = 1 + \sum_k (1 - q_k), \quad
        \zeta = \mathbb{E}[\ln\rho - \ln(1-\rho)] = \psi(\alpha) - \psi(\beta),

    so :math:`q_k` is the posterior probability that weight k is *kept* (in the slab),
    :math:`q(\rho) = \mathrm{Beta}(\alpha, \beta)` and :math:`\zeta` is the expected prior
    log-odds of keeping a weight of this layer. A weight is kept when :math:`q_k \ge 1/2`,
    i.e. when ``delta_f <= zeta``. All elements of ``delta_f`` (any shape) form one layer.

    Solving for :math:`\zeta`: write the update as :math:`\zeta \leftarrow f(\zeta)`, with
    :math:`f'(\zeta) = (\psi_1(\alpha) + \psi_1(\beta)) \sum_k q_k(1-q_k)`. With
    :math:`A = \sum q_k`, :math:`B = \sum (1-q_k)`, Jensen gives
    :math:`\sum q_k(1-q_k) \le AB/(A+B)` and :math:`\psi_1(1+x) < 1/x`, so
    :math:`0 < f' < 1`: :math:`h(\zeta) = f(\zeta) - \zeta` is strictly decreasing, the fixed
    point is unique, and the plain iteration from :math:`\zeta_0 = 0` (the Beta(1, 1) value)
    converges to it monotonically. But where :math:`f' \approx 1` (typical for a layer of
    many similar :math:`\Delta F_k`) the plain iteration needs hundreds of passes; the same
    fixed point is found here by Newton steps on :math:`h`, safeguarded by bisection once
    the root is bracketed, in about ten passes over ``delta_f``. Sums are computed
    in float64. Iteration stops when :math:`|\Delta\zeta| <` ``tol``, with a
    ``RuntimeWarning`` if ``max_iter`` steps do not get there.

    Returns ``(keep_mask, zeta)``: a bool tensor shaped like ``delta_f`` (True = keep) and a
    0-d float64 tensor.
    """
    d = torch.as_tensor(delta_f)
    if d.numel() == 0:
        raise ValueError("delta_f: must contain at least one element")
    if d.is_floating_point():
        check_no_nan("delta_f", d)
    if isinstance(max_iter, bool) or int(max_iter) != max_iter or max_iter < 1:
        raise ValueError(f"max_iter: must be a positive integer, got {max_iter!r}")
    if not tol > 0:
        raise ValueError(f"tol: must be positive, got {tol!r}")
    flat = d.reshape(-1).to(torch.float64)

    zeta, converged, step = _fixed_point_newton(
        lambda z: _zeta_map(flat, z), 0.0, int(max_iter), tol
    )
    if not converged:
        warnings.warn(
            f"spike_slab_decision: zeta not converged after max_iter={max_iter} "
            f"(last step {step:.3g} >= tol={tol})",
            RuntimeWarning,
            stacklevel=2,
        )
    zeta = torch.tensor(zeta, dtype=torch.float64, device=d.device)
    return flat.reshape(d.shape) <= zeta, zeta
