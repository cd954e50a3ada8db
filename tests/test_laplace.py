"""Laplace marginal likelihood against the exact evidence of Bayesian linear regression.

For y = X w + eps, eps ~ N(0, sigma^2 I), w ~ N(0, diag(delta)^-1) the evidence is
log N(y; 0, sigma^2 I + X diag(delta)^-1 X'). The log joint is quadratic in w with Hessian
X'X / sigma^2 + diag(delta), so the Laplace approximation at the posterior mode is exact
whenever the curvature it uses equals X'X / sigma^2: the diagonal GGN when X has orthogonal
columns, KFAC always (one Linear layer, one output: G = 1 / sigma^2 is a scalar).
"""


import math

import pytest
import torch
from torch import nn

from pyro_sparse.kron import rows_of
from pyro_sparse.laplace.curvature import diag_ggn, kfac_ggn, log_likelihood
from pyro_sparse.laplace.marglik import kfac_eig, log_marglik_diag, log_marglik_kfac, posterior_precision_diag
from pyro_sparse.laplace.prior import (
    LayerwisePrior,
    ParameterwisePrior,
    ScalarPrior,
    UnitwisePrior,
    make_prior_precision,
)


def kfac_flatten(weight, bias=None):
    """vec([W | b]) column-major: the order in which a KFAC block is kron(A, G)."""
    return rows_of(weight, bias).T.reshape(-1)

DT = torch.float64
SIGMA = 0.5
N, D = 20, 4


def design(orthogonal, n=N, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, D, generator=g, dtype=DT)
    if orthogonal:  # orthonormal columns, then distinct column norms: X'X = diag(scales^2)
        x = torch.linalg.qr(x).Q * torch.tensor([3.0, 1.5, 0.8, 0.3], dtype=DT)
    w = torch.tensor([1.0, -0.5, 0.25, 0.0], dtype=DT)
    y = x @ w + SIGMA * torch.randn(n, generator=g, dtype=DT)
    return x, y.unsqueeze(1)


def regression_model():
    return nn.Sequential(nn.Linear(D, 1, bias=False)).to(DT)


def weight_precision(prior):
    return prior.precision_dict()["0.weight"].expand(1, D).reshape(-1)


def exact_log_evidence(x, y, delta):
    cov = SIGMA**2 * torch.eye(x.shape[0], dtype=DT) + (x / delta) @ x.T
    return torch.distributions.MultivariateNormal(torch.zeros(x.shape[0], dtype=DT), cov).log_prob(y[:, 0])


def set_map(model, x, y, delta):
    """Posterior mode (= mean) (X'X / sigma^2 + diag(delta))^-1 X'y / sigma^2, written into the model."""
    prec = x.T @ x / SIGMA**2 + torch.diag(delta.detach())
    with torch.no_grad():
        model[0].weight.copy_(torch.linalg.solve(prec, x.T @ y[:, 0] / SIGMA**2).reshape(1, D))


def perturb(prior, seed=1):
    """Give every log precision a distinct value so non-scalar structures are really non-scalar."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in prior.parameters():
            p.add_(0.8 * torch.randn(p.shape, generator=g, dtype=DT))
    return prior


def at_map(orthogonal, structure, init=2.0, n=N, perturbed=True):
    """A regression design, its one-layer model at the posterior mode under a ``structure`` prior
    precision (distinct values when ``perturbed``): ``(x, y, model, prior, delta)``."""
    x, y = design(orthogonal=orthogonal, n=n)
    model = regression_model()
    prior = make_prior_precision(structure, model, init=init)
    if perturbed:
        prior = perturb(prior)
    delta = weight_precision(prior)
    set_map(model, x, y, delta)
    return x, y, model, prior, delta


STRUCTURES = ["scalar", "layerwise", "parameterwise", "unitwise"]


@pytest.mark.parametrize("structure", STRUCTURES)
def test_diag_marglik_is_exact_evidence_for_orthogonal_design(structure):
    x, y, model, prior, delta = at_map(True, structure)
    ggn = diag_ggn(model, x, y, "gaussian", noise=SIGMA)
    lml = log_marglik_diag(log_likelihood(model, x, y, "gaussian", SIGMA), model, ggn, prior)
    torch.testing.assert_close(lml, exact_log_evidence(x, y, delta), rtol=0, atol=1e-6)
    # P = X'X / sigma^2 + delta on the diagonal
    post = posterior_precision_diag(ggn, prior)["0.weight"].reshape(-1)
    torch.testing.assert_close(post, torch.diagonal(x.T @ x) / SIGMA**2 + delta)


def test_diag_marglik_is_not_exact_for_correlated_design():
    """Guard: the diagonal GGN drops X'X's off-diagonal, and the identity above then fails."""
    x, y, model, prior, delta = at_map(False, "scalar", perturbed=False)
    ggn = diag_ggn(model, x, y, "gaussian", noise=SIGMA)
    lml = log_marglik_diag(log_likelihood(model, x, y, "gaussian", SIGMA), model, ggn, prior)
    assert (lml - exact_log_evidence(x, y, delta)).abs() > 1e-3


@pytest.mark.parametrize("orthogonal,structure",
                         [(False, "scalar"), (False, "layerwise"), (True, "parameterwise"), (True, "unitwise")])
def test_kfac_marglik_is_exact_evidence(orthogonal, structure):
    """KFAC is exact here; the eigenbasis projection of a non-scalar prior is exact when A is diagonal."""
    x, y, model, prior, delta = at_map(orthogonal, structure)
    kfac = kfac_ggn(model, x, y, "gaussian", noise=SIGMA)
    lml = log_marglik_kfac(log_likelihood(model, x, y, "gaussian", SIGMA), model, kfac, prior)
    torch.testing.assert_close(lml, exact_log_evidence(x, y, delta), rtol=0, atol=1e-6)


@pytest.mark.parametrize("structure", ["scalar", "parameterwise"])
def test_kfac_marglik_single_data_point(structure):
    x, y, model, prior, delta = at_map(False, structure, init=0.7, n=1, perturbed=False)
    kfac = kfac_ggn(model, x, y, "gaussian", noise=SIGMA)
    lml = log_marglik_kfac(log_likelihood(model, x, y, "gaussian", SIGMA), model, kfac, prior)
    torch.testing.assert_close(lml, exact_log_evidence(x, y, delta), rtol=0, atol=1e-6)


def test_kfac_eigenbasis_projection_bounds_evidence_for_correlated_design():
    """Non-scalar prior, non-diagonal A: approximation <= exact (Hadamard), and strictly here."""
    x, y = design(orthogonal=False)
    x = x + 2.0 * x[:, :1]  # strongly correlated columns
    model = regression_model()
    prior = make_prior_precision("parameterwise", model)
    with torch.no_grad():  # precisions spread over three orders of magnitude
        prior.log_deltas[0].copy_(torch.tensor([[0.0, 6.0, 2.0, 4.0]], dtype=DT))
    delta = weight_precision(prior)
    set_map(model, x, y, delta)
    kfac = kfac_ggn(model, x, y, "gaussian", noise=SIGMA)
    lml = log_marglik_kfac(log_likelihood(model, x, y, "gaussian", SIGMA), model, kfac, prior)
    exact = exact_log_evidence(x, y, delta)
    assert lml < exact - 0.05  # the gap is about 0.1 nats here


@pytest.mark.parametrize("structure", STRUCTURES)
def test_kfac_logdet_matches_dense_construction_on_mlp(structure):
    """Deep MLP with biases: log det P from factors equals the dense eigenbasis formula.

    Dense: Q = kron(Q_A, Q_G); log det P ~= sum log diag(Q' (kron(A, G) + diag(d)) Q), with
    d laid out by kfac_flatten; for scalar/layerwise this is log det(kron(A, G) + delta I) too.
    """
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)).to(DT)
    x = torch.randn(6, 3, dtype=DT)
    y = torch.randint(0, 2, (6,))
    prior = perturb(make_prior_precision(structure, model, init=1.5))
    kfac = kfac_ggn(model, x, y, "categorical")
    theta = {k: torch.zeros_like(v) for k, v in model.named_parameters()}  # isolates the log det terms
    lml = log_marglik_kfac(torch.tensor(0.0, dtype=DT), theta, kfac, prior)
    log_delta = prior.full_log_precision_dict()
    logdet_post, logdet_prior = 0.0, sum(v.sum() for v in log_delta.values())
    for layer, (a, g) in kfac.items():
        d = kfac_flatten(log_delta[f"{layer}.weight"], log_delta[f"{layer}.bias"]).exp()
        p = torch.kron(a, g) + torch.diag(d)
        q = torch.kron(torch.linalg.eigh(a).eigenvectors, torch.linalg.eigh(g).eigenvectors)
        logdet_post = logdet_post + torch.diagonal(q.T @ p @ q).log().sum()
        if structure in ("scalar", "layerwise"):
            torch.testing.assert_close(torch.diagonal(q.T @ p @ q).log().sum(), torch.logdet(p))
    torch.testing.assert_close(lml, -0.5 * (logdet_post - logdet_prior))
    # precomputed eigendecompositions give the same value
    torch.testing.assert_close(log_marglik_kfac(torch.tensor(0.0, dtype=DT), theta, kfac_eig(kfac), prior), lml)


# ----------------------------------------------------------------------------- priors


def conv_model():
    torch.manual_seed(2)
    return nn.Sequential(nn.Conv2d(2, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(12, 5)).to(DT)


@pytest.mark.parametrize("structure", STRUCTURES)
def test_log_prior_matches_torch_normal(structure):
    model = conv_model()
    prior = perturb(make_prior_precision(structure, model, init=3.0))
    theta = dict(model.named_parameters())
    expected = sum(
        torch.distributions.Normal(0.0, prior.precision_dict()[k].expand_as(v).rsqrt()).log_prob(v).sum()
        for k, v in theta.items()
    )
    torch.testing.assert_close(prior.log_prior(theta), expected)


def test_prior_structures_shapes_and_counts():
    model = conv_model()
    counts = {s: sum(p.numel() for p in make_prior_precision(s, model).parameters()) for s in STRUCTURES}
    n_params = sum(p.numel() for p in model.parameters())
    assert counts == {"scalar": 1, "layerwise": 2, "parameterwise": n_params, "unitwise": (3 + 2) + 3 + (5 + 12) + 5}
    for s in STRUCTURES:
        prior = make_prior_precision(s, model, init=3.0)
        for name, p in model.named_parameters():
            full = prior.precision_dict()[name].expand(p.shape)
            torch.testing.assert_close(full, torch.full_like(p, 3.0))


def test_unitwise_is_row_plus_column():
    model = conv_model()
    prior = perturb(UnitwisePrior(model))
    logs = prior.full_log_precision_dict()
    a, b = prior.row_logs[0], prior.col_logs[0]  # conv weight (3, 2, 3, 3)
    torch.testing.assert_close(logs["0.weight"], (a[:, None] + b[None, :])[:, :, None, None].expand(3, 2, 3, 3))
    torch.testing.assert_close(logs["0.bias"], prior.row_logs[1])
    a, b = prior.row_logs[2], prior.col_logs[2]  # linear weight (5, 12)
    torch.testing.assert_close(logs["3.weight"], a[:, None] + b[None, :])


def test_layerwise_shares_weight_and_bias():
    prior = perturb(LayerwisePrior(conv_model()))
    logs = prior.log_precision_dict()
    assert prior.layers == ["0", "3"]
    assert logs["0.weight"] is not logs["3.weight"]
    torch.testing.assert_close(logs["0.weight"], logs["0.bias"])
    assert isinstance(make_prior_precision("scalar", conv_model()), ScalarPrior)
    assert isinstance(make_prior_precision("parameterwise", conv_model()), ParameterwisePrior)


# ----------------------------------------------------------------------------- gradients in log delta


@pytest.mark.parametrize("route", ["diag", "kfac"])
@pytest.mark.parametrize("structure", ["scalar", "unitwise"])
def test_gradient_wrt_log_delta_equals_exact_evidence_gradient(route, structure):
    """At the posterior mode, d/d log delta of the Laplace marglik (theta held fixed) equals that of
    the exact evidence: the mode maximises the log joint, so its own dependence on delta drops out."""
    x, y, model, prior, _ = at_map(True, structure)
    log_lik = log_likelihood(model, x, y, "gaussian", SIGMA).detach()
    if route == "diag":
        lml = log_marglik_diag(log_lik, model, diag_ggn(model, x, y, "gaussian", noise=SIGMA), prior)
    else:
        lml = log_marglik_kfac(log_lik, model, kfac_ggn(model, x, y, "gaussian", noise=SIGMA), prior)
    params = list(prior.parameters())
    got = torch.autograd.grad(lml, params)
    expected = torch.autograd.grad(exact_log_evidence(x, y, weight_precision(prior)), params)
    for g, e in zip(got, expected):
        assert g.abs().sum() > 0
        torch.testing.assert_close(g, e, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("route", ["diag", "kfac"])
def test_adam_on_log_delta_reaches_evidence_optimum(route):
    """Online marglik in miniature: refit the mode, take an Adam step on log delta, repeat.

    Converges to the argmax of the exact evidence over a scalar precision, found by a 1-D grid
    (spacing 0.004 in log delta)."""
    x, y = design(orthogonal=True)
    grid = torch.linspace(-6, 6, 3001, dtype=DT)
    evidence = torch.stack([exact_log_evidence(x, y, torch.full((D,), v.exp(), dtype=DT)) for v in grid])
    best = evidence.argmax()
    assert 0 < best < len(grid) - 1  # interior optimum
    model = regression_model()
    prior = ScalarPrior(model, init=1.0)
    opt = torch.optim.Adam(prior.parameters(), lr=0.1)
    first = None
    for _ in range(300):
        set_map(model, x, y, weight_precision(prior))
        log_lik = log_likelihood(model, x, y, "gaussian", SIGMA).detach()
        if route == "diag":
            lml = log_marglik_diag(log_lik, model, diag_ggn(model, x, y, "gaussian", noise=SIGMA), prior)
        else:
            lml = log_marglik_kfac(log_lik, model, kfac_ggn(model, x, y, "gaussian", noise=SIGMA), prior)
        first = lml.item() if first is None else first
        opt.zero_grad()
        (-lml).backward()
        opt.step()
    assert abs(prior.log_delta.item() - grid[best].item()) < 0.01
    assert exact_log_evidence(x, y, weight_precision(prior)).item() > first + 1e-3
    assert exact_log_evidence(x, y, weight_precision(prior)).item() == pytest.approx(evidence[best].item(), abs=1e-4)


# ----------------------------------------------------------------------------- bad input


def test_bad_arguments_name_the_argument():
    model = conv_model()
    with pytest.raises(ValueError, match="structure"):
        make_prior_precision("blockwise", model)
    with pytest.raises(ValueError, match="init"):
        make_prior_precision("scalar", model, init=0.0)
    prior = make_prior_precision("scalar", model)
    with pytest.raises(ValueError, match="theta lacks"):
        prior.log_prior({"0.weight": model[0].weight})
    with pytest.raises(ValueError, match="prior must"):
        log_marglik_diag(torch.tensor(0.0), model, {}, prior=1.0)
    with pytest.raises(ValueError, match="unitwise"):
        UnitwisePrior(nn.Sequential(nn.BatchNorm1d(3)))
    kfac = {"0": (torch.eye(3, dtype=DT), torch.eye(2, dtype=DT))}
    with pytest.raises(ValueError, match="do not match"):
        log_marglik_kfac(torch.tensor(0.0), model, kfac, prior)
    small = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))
    with pytest.raises(ValueError, match="no Kronecker factors"):
        log_marglik_kfac(torch.tensor(0.0), small, {"0": (torch.eye(3), torch.eye(2))},
                         make_prior_precision("scalar", small))


def test_kronecker_factors_of_low_rank_and_wide_range_decompose_and_fit_the_prior():
    """A factor estimated from fewer rows than its dimension (rank 20 of 300) with inputs spanning
    16 orders of magnitude in A decomposes in float64 (a jitter only where LAPACK fails) into the
    eigenvalues of the rows' own SVD, and the prior-precision search on the marginal likelihood runs
    and matches a dense float64 computation. Rounded to float32 (what a float32 pass holds: its
    smallest eigenvalues are then round-off, some negative) it still runs, clipped to a PSD factor."""
    from pyro_sparse.kron import psd_eigh
    from pyro_sparse.laplace.marglik import fit_prior_precision, kfac_eig

    g = torch.Generator().manual_seed(0)
    rows = torch.randn(20, 300, generator=g, dtype=DT) * torch.logspace(-4, 4, 300, dtype=DT)
    a = rows.T @ rows
    assert a.abs().max() / a.abs()[a != 0].min() > 1e8
    gfac = torch.tensor([[2.0, 0.3], [0.3, 0.5]], dtype=DT)
    model = nn.Linear(299, 2).to(DT)
    theta = {k: v.detach() for k, v in model.named_parameters()}
    norm = sum(float(v.square().sum()) for v in theta.values())
    for factor in (a, a.float()):
        (la, qa, lg, qg), = kfac_eig({"layer": (factor, gfac)}).values()
        assert (la >= 0).all() and torch.isfinite(qa).all() and torch.isfinite(la).all()
        vals, vecs, jitter = psd_eigh(factor, "A")
        assert jitter >= 0
        prior = ScalarPrior(model, init=1.0)
        trajectory = fit_prior_precision(torch.tensor(-10.0, dtype=DT), theta, {"": (factor, gfac)}, "kfac", prior)
        assert torch.isfinite(trajectory).all() and trajectory[1] >= trajectory[0]
    # the float64 factor against float64 references
    (la, qa, lg, qg), = kfac_eig({"layer": (a, gfac)}).values()
    reference = torch.linalg.svdvals(rows).square()
    torch.testing.assert_close(la.flip(0)[:20], reference, rtol=1e-8, atol=1e-8 * float(reference.max()))
    prior = ScalarPrior(model, init=1.0)
    trajectory = fit_prior_precision(torch.tensor(-10.0, dtype=DT), theta, {"": (a, gfac)}, "kfac", prior)
    delta = float(prior.log_delta.detach().exp())
    dense = torch.kron(gfac, a) + delta * torch.eye(600, dtype=DT)  # the entries (i, j) row-major
    expected = -10.0 - 0.5 * (float(torch.linalg.slogdet(dense)[1]) - 600 * math.log(delta) + delta * norm)
    assert float(trajectory[1]) == pytest.approx(expected, rel=1e-9)
    # and the fixed point is the optimum: the derivative of the marginal likelihood in delta is ~0
    eig = torch.linalg.eigvalsh(torch.kron(gfac, a)).clamp_min(0)
    assert float((eig / (eig + delta)).sum() / norm) == pytest.approx(delta, rel=1e-6)
