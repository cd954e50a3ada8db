"""Reduction with compensation against exact Bayesian linear regression, and its mechanics.

For y = X~ w + eps (X~ = [X, 1]), eps ~ N(0, sigma^2), w ~ N(0, I / delta) the evidence of any
nested model (a subset of the inputs) is a Gaussian density in closed form, so the evidence change
of removing inputs is known exactly; a bare nn.Linear at the posterior mean, with a Gaussian
likelihood, has an exact Laplace posterior (the GGN of a linear model is its Hessian) whether its
curvature is kept as Kronecker factors or as row blocks. The inputs are correlated (0.6), so the
diagonal precision P_ii is not the marginal one and the compensation has something to do.
"""

import math

import pytest
import torch
from torch import nn

from pyro_sparse.kron import KroneckerPrecision, RowPrecision
from pyro_sparse.laplace.posterior import laplace_posterior
from pyro_sparse.rebuild import compact, masked_module
from pyro_sparse.reduction import reduce
from pyro_sparse.reduction.bmr import savage_dickey
from pyro_sparse.reduction.compensate import greedy_rows, reduced_rows
from pyro_sparse.reduction.scores import parse_pattern

DT = torch.float64
SIGMA, DELTA = 0.5, 2.0
N, D = 60, 8


def correlated_regression(seed=0):
    g = torch.Generator().manual_seed(seed)
    cov = 0.4 * torch.eye(D, dtype=DT) + 0.6  # correlation 0.6 between every pair of inputs
    x = torch.randn(N, D, generator=g, dtype=DT) @ torch.linalg.cholesky(cov).T
    w = torch.tensor([1.5, 0.0, -1.0, 0.0, 0.05, 0.8, 0.0, -0.02], dtype=DT)
    y = x @ w + 0.3 + SIGMA * torch.randn(N, generator=g, dtype=DT)
    return x, y[:, None]


def design(x, keep=None):
    xt = torch.cat([x, torch.ones(len(x), 1, dtype=DT)], 1)
    return xt if keep is None else xt[:, keep]


def log_evidence(x, y, keep=None):
    """log N(y; 0, sigma^2 I + X~ X~' / delta) of the model with the columns ``keep`` of [X, 1]."""
    xt = design(x, keep)
    cov = SIGMA ** 2 * torch.eye(len(x), dtype=DT) + xt @ xt.T / DELTA
    return torch.distributions.MultivariateNormal(torch.zeros(len(x), dtype=DT), cov).log_prob(y[:, 0])


def posterior_mean(x, y, keep=None):
    xt = design(x, keep)
    p = xt.T @ xt / SIGMA ** 2 + DELTA * torch.eye(xt.shape[1], dtype=DT)
    return torch.linalg.solve(p, xt.T @ y[:, 0] / SIGMA ** 2)


def fitted(curvature):
    x, y = correlated_regression()
    model = nn.Linear(D, 1).to(DT)
    mean = posterior_mean(x, y)
    with torch.no_grad():
        model.weight.copy_(mean[:-1][None])
        model.bias.copy_(mean[-1:])
    posterior = laplace_posterior(model, x, y, likelihood="gaussian", noise=SIGMA, curvature=curvature,
                                  prior_precision=DELTA, hyper_steps=0)
    return x, y, posterior


@pytest.mark.parametrize("curvature", ["kfac", "rows"])
def test_savage_dickey_and_bmr_equal_the_exact_evidence_of_a_correlated_linear_model(curvature):
    x, y, posterior = fitted(curvature)
    summary = posterior.summary()
    w = summary["weight"]
    assert isinstance(w.structure, KroneckerPrecision if curvature == "kfac" else RowPrecision) and w.marginal
    full = log_evidence(x, y)
    exact = torch.stack([log_evidence(x, y, [k for k in range(D + 1) if k != j]) - full for j in range(D)])
    # one weight at a time: the rules' scores are the exact log evidence ratios
    sd = reduce(summary, "savage-dickey", compensate=False)
    torch.testing.assert_close(sd.scores["weight"][0], exact, rtol=0, atol=1e-8)
    assert torch.equal(sd.masks["weight"][0], exact <= 0) and sd.approximation is None
    # BMR towards N(0, g^2): as g -> 0 its score tends to Savage-Dickey's; at g = 1e-6 s they agree to 1e-8
    bmr = reduce(summary, "bmr", compensate=False, shrink=1e-6)
    torch.testing.assert_close(bmr.scores["weight"][0], exact, rtol=0, atol=1e-8)
    # removing a set: the compensated reduction's joint evidence change and reduced posterior mean are
    # those of the reduced model, exactly
    for rule in ("savage-dickey", "bmr"):
        d = reduce(summary, rule, shrink=1e-9)
        removed = (~d.masks["weight"][0]).nonzero().reshape(-1).tolist()
        assert d.values and removed, rule  # the evidence removes the small inputs
        keep = [k for k in range(D + 1) if k not in removed]
        assert d.layers[""]["delta_f"] == pytest.approx(float(log_evidence(x, y, keep) - full), abs=1e-7)
        reduced = torch.zeros(D + 1, dtype=DT)
        reduced[keep] = posterior_mean(x, y, keep)
        torch.testing.assert_close(torch.cat([d.values["weight"][0], d.values["bias"]]), reduced, rtol=0, atol=1e-9)
        # and it is the best of the nested models the greedy passed: one removal more or fewer is worse
        for j in range(D):
            other = [k for k in keep if k != j] if j in keep else sorted(keep + [j])
            assert float(log_evidence(x, y, other)) <= float(log_evidence(x, y, keep)) + 1e-9


def test_a_diagonal_laplace_posterior_names_its_approximation():
    x, y, posterior = fitted("diag")
    summary = posterior.summary()
    assert not summary["weight"].marginal and summary["weight"].structure is None
    d = reduce(summary, "savage-dickey")
    assert not d.values and "P_ii read as the marginal" in d.approximation
    assert "P_ii read as the marginal" in d.summary()["approximation"]
    # it is an approximation: the correlated inputs make the conditional precision larger than the marginal
    exact = reduce(fitted("kfac")[2].summary(), "savage-dickey", compensate=False).scores["weight"]
    assert (d.scores["weight"] - exact).abs().max() > 0.1
    with pytest.raises(ValueError, match="no correlated posterior"):
        reduce(summary, "bmr", compensate=True)
    assert reduce(summary, "opd", sparsity=0.5).approximation is None  # OPD reads P_ii by definition


def test_greedy_increments_add_up_to_the_joint_evidence_of_the_removed_set():
    """Each step's increments, read off the conditioned Gaussian, sum to ln q(w_S = 0) - ln p(w_S = 0)
    for every prefix S of the removal order, one weight per step or several."""
    g = torch.Generator().manual_seed(0)
    rows, d = 6, 30
    x = torch.randn(d, 80, generator=g, dtype=DT) * torch.linspace(0.2, 2.0, d, dtype=DT)[:, None]
    precision = (x @ x.T)[None] * torch.rand(rows, 1, 1, generator=g, dtype=DT) + torch.eye(d, dtype=DT)
    sigma = torch.cholesky_inverse(torch.linalg.cholesky(precision))
    mu = torch.randn(rows, d, generator=g, dtype=DT)
    prior = torch.ones(rows, d, dtype=DT)
    removable = torch.ones(rows, d, dtype=torch.bool)
    removable[:, -1] = False

    def sd(m, v, p):
        return savage_dickey(m, v.reciprocal(), 0.0, p)

    for fraction in (0.0, 1 / 8):
        order, inc = greedy_rows(sigma, mu, prior, removable, sd, fraction=fraction)
        assert order.shape == (rows, d - 1) and torch.isfinite(inc).all()
        assert all(sorted(o.tolist()) == list(range(d - 1)) for o in order)
        for r in range(rows):
            for k in (1, 7, 20):
                s = order[r, :k]
                joint = torch.distributions.MultivariateNormal(mu[r, s], sigma[r][s][:, s]).log_prob(
                    torch.zeros(k, dtype=DT)) - torch.distributions.Normal(0.0, 1.0).log_prob(
                    torch.zeros(k, dtype=DT)).sum()
                assert float(inc[r, :k].sum()) == pytest.approx(float(joint), rel=1e-9, abs=1e-9)
                # the reduced mean of the prefix is the conditional mean
                removed = torch.zeros(1, d, dtype=torch.bool)
                removed[0, s] = True
                expected = mu[r] - sigma[r][:, s] @ torch.linalg.solve(sigma[r][s][:, s], mu[r, s])
                torch.testing.assert_close(reduced_rows(precision[r:r + 1], mu[r:r + 1], removed)[0],
                                           expected * ~removed[0], rtol=1e-9, atol=1e-9)


def test_n_m_patterns_keep_n_of_every_m():
    assert parse_pattern("2:4") == (2, 4)
    for bad in ("4:2", "2-4", "0:4"):
        with pytest.raises(ValueError, match="pattern"):
            parse_pattern(bad)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 3))
    x, y = torch.randn(200, 16), torch.randint(0, 3, (200,))
    posterior = laplace_posterior(model, x, y, curvature="kfac")
    d = reduce(posterior.summary(), "savage-dickey", pattern="2:4")
    for site in ("0.weight", "2.weight"):
        kept = d.masks[site].reshape(d.masks[site].shape[0], -1, 4).sum(-1)
        assert (kept == 2).all(), site
    # and a convolution is blocked along its input channels at every kernel position, as mask_n_m blocks
    conv = nn.Sequential(nn.Conv2d(8, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(16, 3))
    xc = torch.randn(100, 8, 4, 4)
    d = reduce(laplace_posterior(conv, xc, y[:100], curvature="kfac").summary(), "bmr", pattern="2:4")
    kept = d.masks["0.weight"].reshape(4, 2, 4, 3, 3).sum(2)  # (out, channel groups, kh, kw)
    assert (kept == 2).all()
    with pytest.raises(ValueError, match="pattern: with compensation"):
        reduce(posterior.summary(), "bmr", sparsity=0.5, pattern="2:4")


def test_compensated_decisions_compact_to_the_masked_network_and_move_the_kept_weights():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(10, 20), nn.Tanh(), nn.Linear(20, 20), nn.ReLU(), nn.Linear(20, 4))
    x, y = torch.randn(300, 10), torch.randint(0, 4, (300,))
    posterior = laplace_posterior(model, x, y, curvature="kfac")
    summary = posterior.summary()
    d = reduce(summary, "bmr", sparsity=0.6, calibration=posterior.calibration(x))
    assert d.sparsity == pytest.approx(0.6, abs=0.01) and d.options["layer_by_layer"]
    moved = [(d.values[k] - summary[k].loc)[d.masks[k]].abs().max() for k in d.values]
    assert max(moved) > 1e-3  # the kept weights compensate
    for k, v in d.values.items():
        assert torch.all(v[~d.masks[k]] == 0)
    masked = masked_module(posterior.network, summary, d)
    small = compact(posterior.network, summary, d)
    with torch.no_grad():
        assert (small(x) - masked(x)).abs().max() <= 1e-5
    assert set(d.summary()["layers"]) == {"0", "2", "4"}
    # without compensation the summary's means stand
    plain = reduce(summary, "bmr", sparsity=0.6, compensate=False)
    assert not plain.values and "compensated" in plain.summary() and not plain.summary()["compensated"]


def test_wide_rows_go_blockwise_and_keep_the_target():
    from pyro_sparse.reduction import compensate

    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(40, 6), nn.ReLU(), nn.Linear(6, 3))
    x, y = torch.randn(400, 40), torch.randint(0, 3, (400,))
    summary = laplace_posterior(model, x, y, curvature="kfac").summary()
    old = compensate.MAX_EXACT
    compensate.MAX_EXACT = 16  # the first layer's rows (41 entries) go blockwise
    try:
        d = reduce(summary, "savage-dickey", sparsity=0.5)
    finally:
        compensate.MAX_EXACT = old
    assert d.layers["0"]["path"] == "blockwise" and d.layers["2"]["path"] == "exact"
    assert d.sparsity == pytest.approx(0.5, abs=0.02)
    assert all(torch.all(v[~d.masks[k]] == 0) for k, v in d.values.items())
    assert math.isfinite(d.layers["0"]["delta_f"])
