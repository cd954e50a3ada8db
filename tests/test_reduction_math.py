"""Tests of the reduction maths against exact answers, in float64.

The reference is Bayesian linear regression with known noise, y = X w + e, e ~ N(0, s2 I):
under a prior N(eta, Pi^-1) the posterior is Gaussian and the log evidence is exactly
log N(y; X eta, s2 I + X Pi^-1 X'), so Bayesian model reduction must reproduce differences of
exact log evidences and the exact posterior under the reduced prior.
"""

import math

import pytest
import torch
from torch.distributions import MultivariateNormal, Normal

from pyro_sparse.reduction import (
    bmr_diagonal_zero_mean,
    bmr_gaussian,
    group_delta_f,
    group_scores,
    magnitude_scores,
    mask_by_sparsity,
    mask_by_threshold,
    opd_scores,
    random_scores,
    savage_dickey,
    spike_slab_decision,
    structured_mask,
)
from pyro_sparse.reduction.bmr import _fixed_point_newton
from pyro_sparse.reduction.bmr import _zeta_map as _zeta_map_and_slope

D = torch.float64
NOISE_VAR = 0.7


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _spd(d, g, jitter=0.5):
    a = torch.randn(d, d, generator=g, dtype=D)
    return a @ a.T / d + jitter * torch.eye(d, dtype=D)


def _posterior(X, y, eta, Pi):
    """Exact posterior N(mu, P^-1) of linear regression under the prior N(eta, Pi^-1)."""
    P = Pi + X.T @ X / NOISE_VAR
    mu = torch.linalg.solve(P, Pi @ eta + X.T @ y / NOISE_VAR)
    return mu, P


def _log_evidence(X, y, eta, Pi):
    """Exact log N(y; X eta, s2 I + X Pi^-1 X')."""
    cov = NOISE_VAR * torch.eye(len(y), dtype=D) + X @ torch.linalg.inv(Pi) @ X.T
    return MultivariateNormal(X @ eta, covariance_matrix=cov).log_prob(y)


def _regression(n, d, g, X=None):
    if X is None:
        X = torch.randn(n, d, generator=g, dtype=D)
    w = torch.randn(d, generator=g, dtype=D)
    w[: d // 2] = 0.0  # some coefficients truly absent
    y = X @ w + math.sqrt(NOISE_VAR) * torch.randn(n, generator=g, dtype=D)
    return X, y


def _orthogonal_design(n, d, g):
    """X with orthogonal columns of different norms, so X'X is diagonal."""
    q, _ = torch.linalg.qr(torch.randn(n, d, generator=g, dtype=D))
    return q * torch.linspace(0.5, 3.0, d, dtype=D)


# ----------------------------------------------------------------- BMR: full Gaussians


def test_bmr_full_matches_exact_evidence_and_posterior():
    g = _gen(0)
    d = 5
    X, y = _regression(40, d, g)
    eta, Pi = torch.randn(d, generator=g, dtype=D), _spd(d, g)
    eta_r, Pi_r = 0.3 * torch.randn(d, generator=g, dtype=D), 4.0 * _spd(d, g)
    mu, P = _posterior(X, y, eta, Pi)

    delta_f, mu_r, P_r = bmr_gaussian(mu, P, eta, Pi, eta_r, Pi_r)

    exact = _log_evidence(X, y, eta_r, Pi_r) - _log_evidence(X, y, eta, Pi)
    assert delta_f.shape == ()
    assert abs(exact) > 0.1  # a non-trivial difference to compare
    torch.testing.assert_close(delta_f, exact, rtol=1e-6, atol=1e-9)
    mu_exact, P_exact = _posterior(X, y, eta_r, Pi_r)
    torch.testing.assert_close(mu_r, mu_exact, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(P_r, P_exact, rtol=1e-10, atol=1e-10)


def test_bmr_full_batched_and_scalar_precisions():
    g = _gen(1)
    d = 3
    problems = [_regression(25, d, g) for _ in range(2)]
    Pi = _spd(d, g)  # shared full prior, zero mean
    posts = [_posterior(X, y, torch.zeros(d, dtype=D), Pi) for X, y in problems]
    loc = torch.stack([m for m, _ in posts])
    prec = torch.stack([p for _, p in posts])

    delta_f, mu_r, _ = bmr_gaussian(loc, prec, 0.0, Pi, 0.0, 10.0)  # reduced: N(0, I/10)

    assert delta_f.shape == (2,) and mu_r.shape == (2, d)
    reduced_Pi = 10.0 * torch.eye(d, dtype=D)
    for b, (X, y) in enumerate(problems):
        zero = torch.zeros(d, dtype=D)
        exact = _log_evidence(X, y, zero, reduced_Pi) - _log_evidence(X, y, zero, Pi)
        torch.testing.assert_close(delta_f[b], exact, rtol=1e-6, atol=1e-9)
        torch.testing.assert_close(mu_r[b], _posterior(X, y, zero, reduced_Pi)[0])


def test_bmr_full_rejects_improper_reduced_posterior():
    d = 2
    P = torch.eye(d, dtype=D)
    with pytest.raises(ValueError, match="reduced_precision"):
        # P + Pi~ - Pi = I + 0.1 I - 5 I is not positive definite.
        bmr_gaussian(torch.zeros(d, dtype=D), P, 0.0, 5.0, 0.0, 0.1)
    with pytest.raises(ValueError, match="prior_precision"):
        bmr_gaussian(torch.zeros(d, dtype=D), P, 0.0, torch.ones(3, dtype=D), 0.0, 1.0)


# ----------------------------------------------------------------- BMR: diagonal Gaussians


def _diagonal_problem(seed, d=6):
    g = _gen(seed)
    X, y = _regression(30, d, g, X=_orthogonal_design(30, d, g))
    eta = 0.5 * torch.randn(d, generator=g, dtype=D)
    pi = torch.linspace(0.2, 2.0, d, dtype=D)  # diagonal prior precision
    mu, P = _posterior(X, y, eta, torch.diag(pi))
    off_diagonal = P - torch.diag(torch.diagonal(P))
    assert off_diagonal.abs().max() < 1e-12  # the posterior factorises
    return X, y, eta, pi, mu, torch.diagonal(P).clone()


def test_bmr_diagonal_elementwise_matches_exact_evidence():
    X, y, eta, pi, mu, P = _diagonal_problem(2)
    d = len(mu)
    eta_r = torch.zeros(d, dtype=D)
    pi_r = torch.linspace(5.0, 50.0, d, dtype=D)
    delta_f, mu_r, P_r = bmr_gaussian(mu, P, eta, pi, eta_r, pi_r)
    assert delta_f.shape == (d,)
    full = _log_evidence(X, y, eta, torch.diag(pi))

    # Reducing element j alone changes the evidence by exactly delta_f[j] ...
    for j in range(d):
        eta_j, pi_j = eta.clone(), pi.clone()
        eta_j[j], pi_j[j] = eta_r[j], pi_r[j]
        exact = _log_evidence(X, y, eta_j, torch.diag(pi_j)) - full
        torch.testing.assert_close(delta_f[j], exact, rtol=1e-6, atol=1e-9)
    # ... an unchanged element contributes exactly 0 ...
    unchanged, _, _ = bmr_gaussian(mu, P, eta, pi, eta, pi)
    assert unchanged.abs().max() < 1e-12
    # ... and reducing all at once adds up (factorised posterior).
    exact_all = _log_evidence(X, y, eta_r, torch.diag(pi_r)) - full
    torch.testing.assert_close(delta_f.sum(), exact_all, rtol=1e-6, atol=1e-9)
    # The reduced posterior is the exact posterior under the reduced prior.
    mu_exact, P_exact = _posterior(X, y, eta_r, torch.diag(pi_r))
    torch.testing.assert_close(mu_r, mu_exact)
    torch.testing.assert_close(P_r, torch.diagonal(P_exact))


def test_group_delta_f_is_exact_for_a_group_under_factorised_posterior():
    X, y, eta, pi, mu, P = _diagonal_problem(3)
    d = len(mu)
    pi_r = torch.full((d,), 30.0, dtype=D)
    delta_f, _, _ = bmr_gaussian(mu, P, eta, pi, 0.0, pi_r)
    groups = torch.tensor([0, 1, 0, 1, 2, 2])
    per_group = group_delta_f(delta_f, groups=groups)
    assert per_group.shape == (3,)
    full = _log_evidence(X, y, eta, torch.diag(pi))
    for k in range(3):
        members = groups == k
        eta_k = torch.where(members, torch.zeros_like(eta), eta)
        pi_k = torch.where(members, pi_r, pi)
        exact = _log_evidence(X, y, eta_k, torch.diag(pi_k)) - full
        torch.testing.assert_close(per_group[k], exact, rtol=1e-6, atol=1e-9)


def test_group_delta_f_dims():
    dF = torch.arange(24, dtype=D).reshape(2, 3, 4)
    torch.testing.assert_close(group_delta_f(dF), dF.sum((1, 2)))  # one group per leading index
    torch.testing.assert_close(group_delta_f(dF, dim=0), dF.sum(0))
    assert group_delta_f(dF, dim=(1, 2), keepdim=True).shape == (2, 1, 1)
    with pytest.raises(ValueError, match="groups"):
        group_delta_f(dF, dim=1, groups=torch.zeros(2, 3, 4, dtype=torch.long))


def test_diagonal_closed_form_equals_general_formula():
    g = _gen(4)
    n = 200
    mu = 2.0 * torch.randn(n, generator=g, dtype=D)
    pi = torch.exp(3.0 * torch.rand(n, generator=g, dtype=D) - 1.0)
    s = torch.exp(torch.rand(n, generator=g, dtype=D))  # prior scale
    gsc = s * torch.rand(n, generator=g, dtype=D).clamp_min(1e-3)  # reduced scale g < s

    closed = bmr_diagonal_zero_mean(mu, pi, s, gsc)
    general, mu_r, P_r = bmr_gaussian(mu, pi, 0.0, 1 / s**2, 0.0, 1 / gsc**2)
    # DESIGN.md's general formula written out literally (eta = eta~ = 0).
    Pi, Pi_r = 1 / s**2, 1 / gsc**2
    P_lit = pi + Pi_r - Pi
    mu_lit = pi * mu / P_lit
    literal = 0.5 * torch.log(pi * Pi_r / (Pi * P_lit)) - 0.5 * (pi * mu**2 - P_lit * mu_lit**2)

    torch.testing.assert_close(closed, literal, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(general, literal, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(P_r, P_lit)
    torch.testing.assert_close(mu_r, mu_lit)


def test_diagonal_rejects_bad_values_naming_the_argument():
    with pytest.raises(ValueError, match=r"prior_precision.*-1\.0"):
        bmr_gaussian(torch.zeros(3, dtype=D), 1.0, 0.0, torch.tensor([1.0, -1.0, 1.0], dtype=D), 0.0, 2.0)
    with pytest.raises(ValueError, match="reduced_precision"):
        bmr_gaussian(torch.zeros(3, dtype=D), 1.0, 0.0, 5.0, 0.0, 0.5)  # 1 + 0.5 - 5 < 0


# ----------------------------------------------------------------- Savage-Dickey


def test_savage_dickey_diagonal_is_point_mass_limit():
    g = _gen(5)
    n = 50
    mu = torch.randn(n, generator=g, dtype=D)
    pi = torch.exp(2.0 * torch.rand(n, generator=g, dtype=D))
    s = torch.exp(torch.rand(n, generator=g, dtype=D) - 0.5)

    sd = savage_dickey(mu, pi, 0.0, 1 / s**2)
    reference = Normal(mu, pi.rsqrt()).log_prob(torch.zeros(n, dtype=D)) - Normal(0.0, s).log_prob(
        torch.zeros(n, dtype=D)
    )
    torch.testing.assert_close(sd, reference, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(sd, 0.5 * torch.log(pi * s**2) - 0.5 * pi * mu**2)
    # The g -> 0 limit of BMR (g = 1e-6): the gap is O(g^2 * pi).
    limit, _, _ = bmr_gaussian(mu, pi, 0.0, 1 / s**2, 0.0, 1e12)
    torch.testing.assert_close(sd, limit, rtol=0, atol=1e-9)
    torch.testing.assert_close(sd, bmr_diagonal_zero_mean(mu, pi, s, 0.0), rtol=1e-12, atol=1e-12)
    # ... and the limit is approached, not just matched at one point.
    far, _, _ = bmr_gaussian(mu, pi, 0.0, 1 / s**2, 0.0, 1e2)
    assert (far - sd).abs().max() > 1e-4


def test_savage_dickey_with_nonzero_prior_mean():
    mu = torch.tensor([0.3, -1.2], dtype=D)
    pi = torch.tensor([4.0, 9.0], dtype=D)
    eta = torch.tensor([0.5, -0.4], dtype=D)
    Pi = torch.tensor([2.0, 0.5], dtype=D)
    zero = torch.zeros(2, dtype=D)
    reference = Normal(mu, pi.rsqrt()).log_prob(zero) - Normal(eta, Pi.rsqrt()).log_prob(zero)
    torch.testing.assert_close(savage_dickey(mu, pi, eta, Pi), reference, rtol=1e-12, atol=1e-12)


def test_savage_dickey_diagonal_equals_exact_evidence_of_dropping_a_column():
    X, y, eta, pi, mu, P = _diagonal_problem(6)
    eta = torch.zeros_like(eta)  # zero prior means
    mu, P = _posterior(X, y, eta, torch.diag(pi))
    P = torch.diagonal(P)
    sd = savage_dickey(mu, P, 0.0, pi)
    full = _log_evidence(X, y, eta, torch.diag(pi))
    for j in range(len(mu)):
        keep = torch.arange(len(mu)) != j
        dropped = _log_evidence(X[:, keep], y, eta[keep], torch.diag(pi[keep]))
        torch.testing.assert_close(sd[j], dropped - full, rtol=1e-6, atol=1e-9)


def test_savage_dickey_full_block():
    g = _gen(7)
    d = 4
    X, y = _regression(30, d, g)
    eta, Pi = 0.2 * torch.randn(d, generator=g, dtype=D), _spd(d, g)
    mu, P = _posterior(X, y, eta, Pi)
    zero = torch.zeros(d, dtype=D)

    sd = savage_dickey(mu, P, eta, Pi)
    reference = MultivariateNormal(mu, precision_matrix=P).log_prob(zero) - MultivariateNormal(
        eta, precision_matrix=Pi
    ).log_prob(zero)
    assert sd.shape == ()
    torch.testing.assert_close(sd, reference, rtol=1e-10, atol=1e-10)
    limit, _, _ = bmr_gaussian(mu, P, eta, Pi, 0.0, 1e12)
    torch.testing.assert_close(sd, limit, rtol=0, atol=1e-7)
    # Exact: the reduced model is the regression with all coefficients fixed at 0.
    exact = MultivariateNormal(torch.zeros(len(y), dtype=D), NOISE_VAR * torch.eye(len(y), dtype=D)).log_prob(
        y
    ) - _log_evidence(X, y, eta, Pi)
    torch.testing.assert_close(sd, exact, rtol=1e-6, atol=1e-9)


# ----------------------------------------------------------------- spike-and-slab


def _zeta_map(zeta, delta_f):
    q = torch.sigmoid(zeta - delta_f)
    return torch.digamma(1 + q.sum()) - torch.digamma(1 + (1 - q).sum())


def test_spike_slab_bimodal_split_and_fixed_point():
    g = _gen(8)
    needed = -20.0 + torch.randn(30, generator=g, dtype=D)  # removing them costs evidence
    redundant = 5.0 + torch.randn(170, generator=g, dtype=D)  # removing them gains evidence
    delta_f = torch.cat([needed, redundant]).reshape(20, 10)

    keep, zeta = spike_slab_decision(delta_f)

    assert keep.shape == (20, 10) and keep.dtype == torch.bool
    expected = torch.zeros(200, dtype=torch.bool)
    expected[:30] = True
    assert torch.equal(keep.reshape(-1), expected)
    assert abs(float(_zeta_map(zeta, delta_f.reshape(-1)) - zeta)) < 1e-8
    # With q ~ 0/1: zeta ~ digamma(31) - digamma(171), the log-odds of a kept weight.
    assert abs(float(zeta) - (math.log(30.5) - math.log(170.5))) < 0.05


@pytest.mark.parametrize("case", ["bimodal", "similar", "skewed_slow"])
def test_spike_slab_reaches_the_limit_of_the_plain_iteration(case):
    g = _gen(16)
    if case == "bimodal":
        delta_f = torch.cat([-8 + torch.randn(300, generator=g, dtype=D), 2 + torch.randn(700, generator=g, dtype=D)])
    elif case == "similar":
        delta_f = 1.0 + 0.5 * torch.randn(2000, generator=g, dtype=D)
    else:  # Savage-Dickey dF of a typical posterior: f'(zeta*) ~ 0.9, the plain map crawls
        mu, pi = torch.randn(2000, generator=g, dtype=D), 0.1 + 10 * torch.rand(2000, generator=g, dtype=D)
        delta_f = savage_dickey(mu, pi, 0.0, 1.0)
    zeta_plain = torch.zeros((), dtype=D)
    for steps in range(20000):  # the update exactly as written in the paper
        new = _zeta_map(zeta_plain, delta_f)
        if abs(float(new - zeta_plain)) < 1e-13:
            break
        zeta_plain = new
    else:
        raise AssertionError("reference iteration did not converge")
    if case == "skewed_slow":
        assert steps > 150

    keep, zeta = spike_slab_decision(delta_f, max_iter=50)

    assert abs(float(zeta - zeta_plain)) < 1e-7
    assert torch.equal(keep, delta_f <= zeta_plain)


def test_fixed_point_solver_survives_where_plain_newton_diverges():
    # f(x) = x - arctan(x - 3): increasing, f' < 1, fixed point 3. Plain Newton on
    # h = -arctan(x - 3) from 0 diverges (|x0 - root| > 1.39); the bracket must save it.
    def fn(x):
        return x - math.atan(x - 3.0), 1.0 - 1.0 / (1.0 + (x - 3.0) ** 2)

    x, steps = 0.0, []
    for _ in range(4):
        f, df = fn(x)
        x = x + (f - x) / (1.0 - df)
        steps.append(x)
    assert abs(steps[-1] - 3.0) > 100  # unguarded Newton runs away

    root, converged, _ = _fixed_point_newton(fn, 0.0, max_iter=100, tol=1e-12)
    assert converged and abs(root - 3.0) < 1e-10


def test_spike_slab_map_has_slope_below_one():
    # The uniqueness argument in the docstring: 0 < f'(zeta) < 1 everywhere.
    g = _gen(17)
    for n, spread in [(1, 1.0), (7, 0.1), (300, 3.0), (3000, 10.0)]:
        delta_f = spread * torch.randn(n, generator=g, dtype=D)
        for zeta in torch.linspace(-30, 30, 25).tolist():
            _, slope = _zeta_map_and_slope(delta_f, zeta)
            assert 0 < slope < 1


def test_spike_slab_differs_from_the_zero_threshold():
    # A layer where most weights are redundant prunes a weight with slightly negative dF ...
    mostly_pruned = torch.cat([torch.full((20,), -20.0), torch.full((180,), 6.0), torch.tensor([-0.5])])
    keep, zeta = spike_slab_decision(mostly_pruned.double())
    assert zeta < -0.5 and not keep[-1] and keep[:20].all()
    # ... and a layer where most are needed keeps a weight with slightly positive dF.
    mostly_kept = torch.cat([torch.full((180,), -20.0), torch.full((20,), 6.0), torch.tensor([0.5])])
    keep, zeta = spike_slab_decision(mostly_kept.double())
    assert zeta > 0.5 and keep[-1] and not keep[180:200].any()


def test_spike_slab_warns_without_convergence_and_checks_arguments():
    delta_f = torch.tensor([-10.0, 3.0, 4.0], dtype=D)
    with pytest.warns(RuntimeWarning, match="max_iter"):
        spike_slab_decision(delta_f, max_iter=1)
    with pytest.raises(ValueError, match="max_iter"):
        spike_slab_decision(delta_f, max_iter=0)
    with pytest.raises(ValueError, match="delta_f"):
        spike_slab_decision(torch.tensor([0.0, float("nan")]))


# ----------------------------------------------------------------- scores


def test_opd_scores_values_and_ranking():
    loc = torch.tensor([2.0, 0.1, -1.0, 0.5], dtype=D)
    prec = torch.tensor([50.0, 1.0, 1.0, 100.0], dtype=D)
    s = opd_scores(loc, prec)
    torch.testing.assert_close(s, torch.tensor([200.0, 0.01, 1.0, 25.0], dtype=D))
    assert s[0] > s[1]  # large mean and high precision beats small
    # OPD and magnitude disagree on weights 2 and 3; each removes the one it scores lower.
    sub = {"w": s[2:]}
    assert torch.equal(mask_by_sparsity(sub, 0.5)["w"], torch.tensor([False, True]))
    mag = {"w": magnitude_scores(loc[2:])}
    assert torch.equal(mask_by_sparsity(mag, 0.5)["w"], torch.tensor([True, False]))
    # A full precision contributes its diagonal.
    full = torch.diag(prec) + 0.01
    torch.testing.assert_close(opd_scores(loc, full), (prec + 0.01) * loc**2)


def test_group_scores_units_and_filters():
    g = _gen(9)
    lin = torch.rand(5, 7, generator=g, dtype=D)
    torch.testing.assert_close(group_scores(lin, dim=1), lin.sum(1))
    torch.testing.assert_close(group_scores(lin), lin.sum(1))
    conv = torch.rand(4, 3, 2, 2, generator=g, dtype=D)
    torch.testing.assert_close(group_scores(conv), conv.sum((1, 2, 3)))
    ids = torch.tensor([0, 0, 1, 2, 2, 2, 1])  # column groups of the Linear weight
    torch.testing.assert_close(
        group_scores(lin, groups=ids), torch.stack([lin[:, ids == k].sum() for k in range(3)])
    )


def test_random_scores_reproducible():
    a = random_scores((3, 4), _gen(10), dtype=D)
    b = random_scores((3, 4), _gen(10), dtype=D)
    assert torch.equal(a, b) and a.shape == (3, 4) and (a >= 0).all() and (a < 1).all()


# ----------------------------------------------------------------- masks


def _layers(seed):
    g = _gen(seed)
    return {
        "fc1.weight": torch.randn(7, 13, generator=g, dtype=D),
        "fc1.bias": torch.randn(5, generator=g, dtype=D),
        "conv.weight": torch.randn(3, 4, 2, generator=g, dtype=D),
    }


@pytest.mark.parametrize("sparsity", [0.0, 0.1, 0.37, 0.5, 0.93, 1.0])
def test_mask_by_sparsity_global(sparsity):
    scores = _layers(11)
    masks = mask_by_sparsity(scores, sparsity)
    assert set(masks) == set(scores)
    n = sum(v.numel() for v in scores.values())
    removed = sum(int((~m).sum()) for m in masks.values())
    assert abs(removed - sparsity * n) <= 0.5  # nearest integer, so within one element
    kept_s = torch.cat([s[m] for s, m in zip(scores.values(), masks.values())])
    cut_s = torch.cat([s[~m] for s, m in zip(scores.values(), masks.values())])
    if len(kept_s) and len(cut_s):
        assert cut_s.max() <= kept_s.min()  # the highest scores are kept
    for name, m in masks.items():
        assert m.shape == scores[name].shape and m.dtype == torch.bool


@pytest.mark.parametrize("sparsity", [0.1, 0.37, 0.5, 0.8])
def test_mask_by_sparsity_per_layer(sparsity):
    scores = _layers(12)
    masks = mask_by_sparsity(scores, sparsity, scope="layer")
    for name, s in scores.items():
        m = masks[name]
        assert abs(int((~m).sum()) - sparsity * s.numel()) <= 0.5
        assert s[~m].max() <= s[m].min()


def test_mask_by_sparsity_ties_are_exact_and_deterministic():
    scores = {"a": torch.zeros(4), "b": torch.tensor([[0.0, 1.0, 0.0], [1.0, 0.0, 2.0]])}
    masks = mask_by_sparsity(scores, 0.3)  # 10 weights, remove 3 of the 7 zeros
    assert torch.equal(masks["a"], torch.tensor([False, False, False, True]))
    assert torch.equal(masks["b"], torch.ones(2, 3, dtype=torch.bool))
    again = mask_by_sparsity(scores, 0.3)
    assert all(torch.equal(masks[k], again[k]) for k in masks)
    g = _gen(13)
    ints = {"x": torch.randint(0, 3, (50, 20), generator=g), "y": torch.randint(0, 3, (333,), generator=g)}
    for sparsity in (0.25, 0.5, 0.61):
        masks = mask_by_sparsity(ints, sparsity)
        removed = sum(int((~m).sum()) for m in masks.values())
        assert removed == math.floor(sparsity * 1333 + 0.5)  # nearest, halves up


def test_mask_by_sparsity_rejects_bad_arguments():
    with pytest.raises(ValueError, match=r"sparsity.*1\.5"):
        mask_by_sparsity(_layers(14), 1.5)
    with pytest.raises(ValueError, match="scope"):
        mask_by_sparsity(_layers(14), 0.5, scope="row")
    with pytest.raises(ValueError, match="fc1"):
        mask_by_sparsity({"fc1": torch.tensor([1.0, float("nan")])}, 0.5)


def test_mask_by_threshold():
    values = {"a": torch.tensor([-1.0, 3.0, 3.5]), "b": torch.tensor([[0.0, 5.0]])}
    below = mask_by_threshold(values, 3.0)
    assert torch.equal(below["a"], torch.tensor([True, True, False]))
    assert torch.equal(below["b"], torch.tensor([[True, False]]))
    above = mask_by_threshold(values, 3.0, keep="above")
    assert torch.equal(above["a"], torch.tensor([False, True, True]))
    per_layer = mask_by_threshold(values, {"a": 0.0, "b": 10.0})
    assert torch.equal(per_layer["a"], torch.tensor([True, False, False]))
    assert per_layer["b"].all()
    with pytest.raises(ValueError, match="keep"):
        mask_by_threshold(values, 3.0, keep="under")
    with pytest.raises(ValueError, match="'b'"):
        mask_by_threshold(values, {"a": 0.0})


def test_structured_mask_removes_whole_rows_and_filters():
    g = _gen(15)
    w_loc, w_prec = torch.randn(6, 4, generator=g, dtype=D), torch.rand(6, 4, generator=g, dtype=D) + 0.1
    c_loc, c_prec = torch.randn(9, 2, 3, 3, generator=g, dtype=D), torch.ones(9, 2, 3, 3, dtype=D)
    groups = {
        "fc.weight": group_scores(opd_scores(w_loc, w_prec), dim=1),
        "conv.weight": group_scores(opd_scores(c_loc, c_prec), dim=(1, 2, 3), keepdim=True),
    }
    shapes = {"fc.weight": w_loc.shape, "conv.weight": c_loc.shape}

    masks = structured_mask(groups, 1 / 3, shapes=shapes)

    fc = masks["fc.weight"]
    assert fc.shape == (6, 4)
    rows = fc.all(1)
    assert torch.equal(rows, fc.any(1))  # every row entirely kept or entirely removed
    assert int((~rows).sum()) == 2
    removed_rows = torch.argsort(groups["fc.weight"])[:2]
    assert not rows[removed_rows].any()
    conv = masks["conv.weight"]
    filters = conv.reshape(9, -1)
    assert torch.equal(filters.all(1), filters.any(1)) and int((~filters.all(1)).sum()) == 3
    group_level = structured_mask(groups, 1 / 3)
    assert group_level["fc.weight"].shape == (6,)
    with pytest.raises(ValueError, match="fraction"):
        structured_mask(groups, -0.1)


def test_closed_form_rejects_bad_scales_naming_the_argument():
    with pytest.raises(ValueError, match=r"reduced_scale.*-0\.5"):
        bmr_diagonal_zero_mean(torch.zeros(2, dtype=D), 1.0, 1.0, torch.tensor([0.1, -0.5], dtype=D))
    # pi = 0.1, s = 1, g = 10: 1 + g^2 (pi - 1/s^2) = -89 < 0, the reduced posterior is improper.
    with pytest.raises(ValueError, match=r"reduced_scale.*10\.0"):
        bmr_diagonal_zero_mean(torch.zeros(2, dtype=D), 0.1, 1.0, torch.tensor([0.5, 10.0], dtype=D))
    with pytest.raises(ValueError, match=r"reduced_precision.*inf"):
        bmr_gaussian(torch.zeros(2, dtype=D), 1.0, 0.0, 1.0, 0.0, torch.tensor([1.0, math.inf], dtype=D))
