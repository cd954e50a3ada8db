"""The Laplace marginal likelihood and the prior precisions that maximise it.

The Laplace approximation around a MAP estimate ``theta`` (MacKay 1992; Immer et al. 2021,
"Scalable marginal likelihood estimation for model selection in deep learning") gives

    log p(D | delta) ~= log p(D | theta) + log p(theta | delta) - 0.5 log det(P / 2 pi)
                     =  log p(D | theta) - 0.5 [log det P - log det P0 + theta' P0 theta],

with the prior ``p(theta | delta) = N(0, P0^-1)``, ``P0 = diag(delta)``
(:mod:`pyro_sparse.laplace.prior`), and the posterior precision ``P = H + P0`` where ``H`` is a
GGN (or empirical Fisher) approximation of the Hessian of the negative log-likelihood
(:mod:`pyro_sparse.laplace.curvature`), diagonal or Kronecker-factored. Maximising it over
``log delta`` -- a few Adam steps every few epochs (:func:`optimize_prior_precision`), or MacKay's
fixed point for scalar and layer-wise precisions (:func:`fixed_point_prior_precision`) -- is the
online model selection of Immer et al. (2021) that SpaM (Dhahri et al. 2024, "Shaving Weights
with Occam's Razor") uses to learn sparsity-inducing prior precisions.

This module is the one place that evaluates and maximises the marginal likelihood; the online
trainer (:mod:`pyro_sparse.laplace.trainer`) and the post-hoc posterior
(:mod:`pyro_sparse.laplace.posterior`) call it.
"""

from __future__ import annotations

import torch

from ..descent import descend
from ..kron import psd_eigh, psd_eigvalsh, rows_of
from .prior import LayerwisePrior, PriorPrecision, ScalarPrior, as_theta

__all__ = [
    "posterior_precision_diag",
    "log_marglik_diag",
    "kfac_eig",
    "log_marglik_kfac",
    "log_marglik",
    "optimize_prior_precision",
    "fixed_point_prior_precision",
    "fit_prior_precision",
    "spectrum",
]


# --------------------------------------------------------------------------- helpers


def _check_prior(prior):
    if not isinstance(prior, PriorPrecision):
        raise ValueError(f"prior must be a PriorPrecision (see make_prior_precision), got {type(prior).__name__}")


def posterior_precision_diag(ggn_diag, prior):
    """Diagonal posterior precision ``P_ii = H_ii + delta_i`` per parameter (the input to OPD).

    Returns dict name -> tensor of the parameter's shape (differentiable in ``log delta``).
    """
    _check_prior(prior)
    ggn_diag = as_theta(ggn_diag, prior.names, "ggn_diag")
    return {name: ggn_diag[name] + delta.expand(prior.shapes[name]) for name, delta in prior.precision_dict().items()}


def _prior_terms(theta, prior):
    """``(log det P0, theta' P0 theta)`` for a diagonal prior, exactly."""
    logdet_prior, quad = 0.0, 0.0
    for name, log_delta in prior.full_log_precision_dict().items():
        logdet_prior = logdet_prior + log_delta.sum()
        quad = quad + (log_delta.exp() * theta[name].square()).sum()
    return logdet_prior, quad


def log_marglik_diag(log_lik, theta, ggn_diag, prior):
    """Laplace log marginal likelihood with a diagonal Hessian approximation.

        ``log p(D | delta) ~= log p(D | theta) - 0.5 [sum_i log(H_ii + delta_i) - sum_i log delta_i
        + sum_i delta_i theta_i^2]``

    (Immer et al. 2021, Eq. 3 with ``H`` diagonal; Dhahri et al. 2024). Differentiable in the
    prior's ``log delta``; ``theta`` (a dict or a Module, read detached) and ``ggn_diag`` are
    used as given. The approximation is exact for a linear-Gaussian model whose GGN is
    diagonal, at the posterior mode.

    Args:
        log_lik: scalar tensor ``log p(D | theta)``.
        theta: dict name -> tensor (or ``nn.Module``), the MAP estimate.
        ggn_diag: dict name -> tensor, e.g. :func:`pyro_sparse.curvature.diag_ggn`.
        prior: a :class:`PriorPrecision`.
    """
    _check_prior(prior)
    theta = as_theta(theta, prior.names, "theta")
    post = posterior_precision_diag(ggn_diag, prior)
    logdet_post = sum(p.log().sum() for p in post.values())
    logdet_prior, quad = _prior_terms(theta, prior)
    return log_lik - 0.5 * (logdet_post - logdet_prior + quad)


def kfac_eig(kfac, values_only=False):
    """Eigendecompose every KFAC pair: layer -> ``(eigvals_A, eigvecs_A, eigvals_G, eigvecs_G)``
    (the eigenvectors None with ``values_only``, enough for a prior that is constant on each
    layer), by :func:`~pyro_sparse.kron.psd_eigh`: float64, robust to factors of rank far below
    their dimension and entries spanning many orders of magnitude (a jitter is added only where
    LAPACK does not converge). A ValueError names the layer whose factor is non-finite. Do this
    once and pass the result to :func:`log_marglik_kfac` when taking many steps on ``log delta``
    with fixed curvature; entries already decomposed are passed through."""
    out = {}
    for name, pair in kfac.items():
        if len(pair) == 4:
            out[name] = tuple(pair)
            continue
        a, g = pair
        if values_only:
            la, _ = psd_eigvalsh(a, f"layer {name}: the KFAC input factor A")
            lg, _ = psd_eigvalsh(g, f"layer {name}: the KFAC output factor G")
            out[name] = (la, None, lg, None)
        else:
            la, qa, _ = psd_eigh(a, f"layer {name}: the KFAC input factor A")
            lg, qg, _ = psd_eigh(g, f"layer {name}: the KFAC output factor G")
            out[name] = (la, qa, lg, qg)
    return out


def _constant_per_layer(prior):
    return isinstance(prior, (ScalarPrior, LayerwisePrior))


def log_marglik_kfac(log_lik, theta, kfac, prior):
    """Laplace log marginal likelihood with a KFAC Hessian ``H_l ~= kron(A_l, G_l)`` per layer.

    Layout as in :func:`pyro_sparse.laplace.curvature.kfac_ggn`: the block of layer ``l`` is over
    its rows ``[W | b]`` (:func:`~pyro_sparse.kron.rows_of`). With ``A = Q_A diag(lambda_A) Q_A'``
    and ``G = Q_G diag(lambda_G) Q_G'`` the eigenvectors of ``kron(A, G)`` are ``kron(Q_A, Q_G)``
    with eigenvalues ``lambda_A[k] lambda_G[m]``, so for a prior constant on the block
    (scalar, layer-wise):

        ``log det(kron(A, G) + delta I) = sum_{k,m} log(lambda_A[k] lambda_G[m] + delta)``   (exact).

    For a non-constant diagonal prior ``D = diag(d)`` on the block (parameter-wise, unit-wise)
    the prior is projected onto the Kronecker eigenbasis and only its diagonal kept
    (as in Immer et al. 2021 and Dhahri et al. 2024):

        ``log det P ~= sum_{k,m} log(lambda_A[k] lambda_G[m] + [Q' D Q]_{(k,m),(k,m)})``,
        ``[Q' D Q]_{(k,m),(k,m)} = sum_{i,j} Q_G[i,m]^2 d_{ij} Q_A[j,k]^2 = (Q_G^2' M Q_A^2)[m,k]``,

    where ``M[i, j] = d`` at output unit ``i``, input column ``j`` (bias last). This reduces to
    the exact formula when ``d`` is constant and, by Hadamard's inequality, never
    underestimates ``log det P`` (so it never overestimates the marginal likelihood given
    ``H = kron(A, G)``). ``log det P0`` and ``theta' P0 theta`` are exact.

    Args:
        log_lik: scalar tensor ``log p(D | theta)``.
        theta: dict name -> tensor (or ``nn.Module``), the MAP estimate.
        kfac: dict layer name -> ``(A, G)`` from :func:`pyro_sparse.laplace.curvature.kfac_ggn`, or
            the output of :func:`kfac_eig` (reused across calls).
        prior: a :class:`~pyro_sparse.laplace.prior.PriorPrecision` whose parameters are exactly the
            layers' weights and biases.
    """
    _check_prior(prior)
    theta = as_theta(theta, prior.names, "theta")
    decomposed = kfac_eig(kfac, values_only=_constant_per_layer(prior))
    log_delta = prior.full_log_precision_dict()
    covered = set()
    logdet_post = 0.0
    for layer, (la, qa, lg, qg) in decomposed.items():
        prefix = f"{layer}." if layer else ""
        w_name, b_name = f"{prefix}weight", f"{prefix}bias"
        if w_name not in log_delta:
            raise ValueError(f"kfac has layer {layer!r} but the prior has no parameter {w_name!r}")
        has_bias = b_name in log_delta
        d = rows_of(log_delta[w_name], log_delta[b_name] if has_bias else None).exp()  # M[i, j]
        n_out = prior.shapes[w_name][0]
        if d.numel() != la.numel() * lg.numel() or lg.numel() != n_out:
            raise ValueError(
                f"kfac[{layer!r}] factors of sizes {la.numel()} x {lg.numel()} do not match parameter "
                f"{w_name!r} of shape {prior.shapes[w_name]} (bias: {has_bias})"
            )
        la, lg = la.to(d.dtype), lg.to(d.dtype)
        if qa is None:  # a constant prior on the block: eigenvalues suffice
            projected = d
        else:
            projected = qg.to(d.dtype).square().T @ d @ qa.to(d.dtype).square()
        logdet_post = logdet_post + torch.log(torch.outer(lg, la) + projected).sum()
        covered.update({w_name, b_name} if has_bias else {w_name})
    uncovered = [name for name in prior.names if name not in covered]
    if uncovered:
        raise ValueError(f"kfac has no Kronecker factors for the prior's parameters {uncovered}")
    logdet_prior, quad = _prior_terms(theta, prior)
    return log_lik - 0.5 * (logdet_post - logdet_prior + quad)


def log_marglik(log_lik, theta, curv, prior, curvature="diag"):
    """The Laplace log marginal likelihood ``log p(D | delta)`` for a curvature ``curv`` of the kind
    ``curvature`` (``diag``: name -> ``H_ii``; ``kfac``: layer -> ``(A, G)``), differentiable in the
    prior's ``log delta``."""
    if curvature == "kfac":
        return log_marglik_kfac(log_lik, theta, curv, prior)
    return log_marglik_diag(log_lik, theta, curv, prior)


def optimize_prior_precision(log_lik, theta, curv, prior, optimizer, steps, curvature="diag"):
    """``steps`` gradient steps of ``optimizer`` (over ``prior``'s log precisions) on ``-log p(D | delta)``
    with ``theta`` and the curvature held fixed (Immer et al. 2021, Algorithm 1, inner loop).

    For the diagonal curvature the objective is evaluated on flat vectors,
    ``log p(D | theta) - 0.5 [sum log(H + delta) - sum log delta + sum delta theta^2]`` with
    ``H`` and ``theta^2`` concatenated once -- the formula of :func:`log_marglik_diag`, with
    fewer tensor operations per step. The KFAC factors are decomposed once for all steps.

    The steps are those of the library's one optimiser loop (:func:`~pyro_sparse.descent.descend`).
    Returns the trajectory of the log marginal likelihood, a tensor of ``steps + 1`` values:
    before each step, and after the last (the last by the general formula).
    """
    theta = {name: t.detach() for name, t in theta.items()}
    log_lik = torch.as_tensor(log_lik).detach()
    if curvature == "kfac":
        curv = kfac_eig(curv, values_only=_constant_per_layer(prior))  # once, reused by every step
        objective = lambda: log_marglik_kfac(log_lik, theta, curv, prior)  # noqa: E731
    else:
        h = torch.cat([curv[name].detach().reshape(-1) for name in prior.names])
        theta2 = torch.cat([theta[name].reshape(-1).square() for name in prior.names])

        def objective():
            log_delta = torch.cat([v.reshape(-1) for v in prior.full_log_precision_dict().values()])
            delta = log_delta.exp()
            return log_lik - 0.5 * ((h + delta).log().sum() - log_delta.sum() + (delta * theta2).sum())

    # the library's one optimiser loop, on -log p(D | delta); a non-finite value stops it before its update
    params = [p for group in optimizer.param_groups for p in group["params"]]
    _, _, losses = descend(lambda _: -objective(), range(steps), optimizer, params, record=True,
                           fault=lambda what, b, loss: FloatingPointError(
                               f"non-finite log marginal likelihood ({what}) at prior-precision step {b + 1}"))
    values = [-loss for loss in losses]
    with torch.no_grad():
        values.append(log_marglik(log_lik, theta, curv, prior, curvature).detach())
    return torch.stack(values)


@torch.no_grad()
def fixed_point_prior_precision(log_lik, theta, curv, prior, iterations=200, tol=1e-8):
    r"""Maximise the diagonal Laplace marginal likelihood in a scalar or layer-wise prior precision
    by MacKay's fixed point (MacKay 1992): for a group ``g`` of parameters sharing :math:`\delta_g`,
    :math:`\partial_{\delta_g} \log p(D \mid \delta) = 0` reads

    .. math::

        \delta_g = \gamma_g / \lVert\theta_g\rVert^2, \qquad
        \gamma_g = \sum_{i \in g} \frac{H_{ii}}{H_{ii} + \delta_g}

    (:math:`\gamma_g` the effective number of parameters the data determine), iterated until
    :math:`\delta` changes by less than ``tol`` relatively (at most ``iterations`` times). The same
    optimum the Adam steps of :func:`optimize_prior_precision` approach, a few passes over the
    parameters instead of hundreds. Returns the log marginal likelihood before and after, as
    that function does."""
    names = prior.names
    if isinstance(prior, ScalarPrior):
        group = {name: 0 for name in names}
    elif isinstance(prior, LayerwisePrior):
        group = dict(prior._index)
    else:
        raise ValueError(f"the fixed point applies to scalar and layer-wise precisions, not {type(prior).__name__}")
    k = int(prior.log_delta.numel())
    index = torch.cat([torch.full((theta[n].numel(),), group[n], dtype=torch.long) for n in names])
    h = torch.cat([curv[n].reshape(-1) for n in names]).to(prior.log_delta.dtype)
    t2 = torch.cat([theta[n].reshape(-1).square() for n in names]).to(h.dtype)
    norm = torch.zeros(k, dtype=h.dtype).index_add_(0, index, t2).clamp_min(torch.finfo(h.dtype).tiny)
    before = log_marglik_diag(log_lik, theta, curv, prior)
    delta = prior.log_delta.detach().exp().reshape(-1).clone()
    tol = max(tol, 100 * torch.finfo(h.dtype).eps)  # float32 rounding: no closer than ~1e-5 relatively
    for _ in range(iterations):
        gamma = torch.zeros(k, dtype=h.dtype).index_add_(0, index, h / (h + delta[index]))
        new = (gamma / norm).clamp_min(torch.finfo(h.dtype).tiny)
        done = bool(((new - delta).abs() <= tol * delta).all())
        delta = new
        if done:
            break
    prior.log_delta.copy_(delta.log().reshape(prior.log_delta.shape))
    return torch.stack([torch.as_tensor(before).detach(), log_marglik_diag(log_lik, theta, curv, prior).detach()])


def spectrum(curv, curvature):
    """``[(parameter names, eigenvalues of H on them)]``: one entry per parameter (``diag``) or per
    layer (``kfac``: :math:`\\lambda_{G,m}\\lambda_{A,k}`; ``rows``: every row block's). With a prior
    precision constant on each entry's parameters, :math:`\\log\\det(H + \\delta I)` is
    :math:`\\sum \\log(\\lambda + \\delta)` exactly."""
    out = []
    for name, value in curv.items():
        prefix = f"{name}." if name else ""
        if curvature == "diag":
            out.append(((name,), value.detach().reshape(-1)))
        elif curvature == "kfac":
            la, _ = psd_eigvalsh(value[0], f"layer {name}: the KFAC input factor A")
            lg, _ = psd_eigvalsh(value[1], f"layer {name}: the KFAC output factor G")
            out.append(((f"{prefix}weight", f"{prefix}bias"), torch.outer(lg, la).reshape(-1)))
        else:
            vals, _ = psd_eigvalsh(value[1], f"layer {name}: the row blocks")
            out.append(((f"{prefix}weight", f"{prefix}bias"), vals.reshape(-1)))
    return out


def _eigen_fixed_point(log_lik, theta, curv, curvature, prior, iterations=200, tol=1e-8):
    r"""MacKay's fixed point :math:`\delta_g = \gamma_g / \lVert\theta_g\rVert^2`,
    :math:`\gamma_g = \sum_k \lambda_k / (\lambda_k + \delta_g)` over the eigenvalues of ``H`` on the
    parameters of group ``g`` (scalar: all; layer-wise: a layer's), for a kfac or rows curvature;
    returns the log marginal likelihood before and after (exact for these priors)."""
    names = prior.names
    group = {n: 0 for n in names} if isinstance(prior, ScalarPrior) else dict(prior._index)
    parts = [(list(ns), vals.to(torch.float64)) for ns, vals in spectrum(curv, curvature)]
    k = int(prior.log_delta.numel())
    norm = torch.zeros(k, dtype=torch.float64)
    for n in names:
        norm[group[n]] += theta[n].detach().to(torch.float64).square().sum()
    norm = norm.clamp_min(1e-300)
    count = torch.zeros(k, dtype=torch.float64)
    for n in names:
        count[group[n]] += theta[n].numel()

    def value(delta):
        logdet = sum((vals + delta[group[ns[0]]]).log().sum() for ns, vals in parts)
        return float(log_lik) - 0.5 * (float(logdet) - float((count * delta.log()).sum()) + float((delta * norm).sum()))

    delta = prior.log_delta.detach().to(torch.float64).exp().reshape(-1).clone()
    before = value(delta)
    for _ in range(iterations):
        gamma = torch.zeros(k, dtype=torch.float64)
        for ns, vals in parts:
            g = group[ns[0]]
            gamma[g] += (vals / (vals + delta[g])).sum()
        new = (gamma / norm).clamp_min(1e-300)
        done = bool(((new - delta).abs() <= tol * delta).all())
        delta = new
        if done:
            break
    with torch.no_grad():
        prior.log_delta.copy_(delta.log().reshape(prior.log_delta.shape).to(prior.log_delta.dtype))
    return torch.tensor([before, value(delta)], dtype=torch.float64)


def fit_prior_precision(log_lik, theta, curv, curvature, prior, steps=200, lr=0.1):
    """Fit ``prior`` to the Laplace marginal likelihood at ``theta``: MacKay's fixed point for
    scalar and layer-wise precisions (any curvature), else ``steps`` Adam steps at rate ``lr`` on
    ``log delta`` (diag, kfac). Returns the log marginal likelihood before and after."""
    if steps == 0:
        return torch.tensor([float("nan"), float("nan")])
    if isinstance(prior, (ScalarPrior, LayerwisePrior)):
        if curvature == "diag":
            return fixed_point_prior_precision(log_lik, theta, curv, prior, steps)
        return _eigen_fixed_point(log_lik, theta, curv, curvature, prior, steps)
    if curvature == "rows":
        raise ValueError("structure: the rows curvature fits scalar and layer-wise prior precisions; "
                         f"got {type(prior).__name__}")
    return optimize_prior_precision(log_lik, theta, curv, prior, torch.optim.Adam(prior.parameters(), lr=lr), steps,
                                    curvature)
