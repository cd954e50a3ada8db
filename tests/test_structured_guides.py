"""Structured and low-rank guides: they run, their ELBO terms are right, the summary sees them."""

import math

import pyro
import pyro.poutine as poutine
import pytest
import torch

from pyro_sparse.elbo import MeanFieldELBO
from pyro_sparse.guides import GUIDES, MeanFieldGuide, build_guide
from pyro_sparse.layers import Linear, ReLU
from pyro_sparse.local_reparam import LocalReparameterization
from pyro_sparse.network import BayesianNetwork
from pyro_sparse.priors import Gaussian, GroupLogUniform, Horseshoe, LogUniform
from pyro_sparse.structured_guides import LowRankGuide, StructuredGuide, lowrank_total_correlation
from pyro_sparse.summary import summarize

X = torch.randn(16, 5)
Y = torch.randint(0, 3, (16,))
PRIORS = [LogUniform(), Gaussian(0.5), GroupLogUniform("unit"), Horseshoe(0.01, "unit", regularized=True)]


def net_with(prior):
    torch.manual_seed(0)
    return BayesianNetwork([Linear(5, 6, prior=prior), ReLU(), Linear(6, 3, prior=prior)])


def test_registered_for_recipes():
    assert GUIDES["structured"] is StructuredGuide and GUIDES["lowrank"] is LowRankGuide


@pytest.mark.parametrize("name,opts", [("structured", {}), ("lowrank", {"rank": 2, "max_params": 40})])
@pytest.mark.parametrize("prior", PRIORS, ids=repr)
def test_guides_run_with_finite_elbo_and_gradients(name, opts, prior):
    net = net_with(prior)
    guide = build_guide(name, net.model, **opts).setup(X, Y)
    loss = MeanFieldELBO().differentiable_loss(net.model, guide, X, Y)
    assert torch.isfinite(loss)
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in guide.parameters())
    assert torch.isfinite(MeanFieldELBO(local_reparam=False).differentiable_loss(net.model, guide, X, Y))


@pytest.mark.parametrize("prior", PRIORS[2:], ids=repr)
def test_structured_starts_as_mean_field(prior):
    net = net_with(prior)
    mf = MeanFieldGuide(net.model).setup(X, Y)
    st = StructuredGuide(net.model).setup(X, Y)
    st.load_state_dict(mf.state_dict(), strict=False)
    assert set(st.shifts) == {"fc1__weight", "fc2__weight"}
    losses = []
    for guide in (mf, st):
        pyro.set_rng_seed(5)
        losses.append(MeanFieldELBO().differentiable_loss(net.model, guide, X, Y).item())
    assert losses[0] == losses[1]


def test_structured_conditional_mean_shifts_with_the_group_scale():
    net = net_with(Horseshoe(0.1, "unit"))
    guide = StructuredGuide(net.model, init_scale_hyper=0.3).setup(X, Y)
    beta = torch.randn(6, 5)
    with torch.no_grad():
        guide.shifts["fc1__weight"].copy_(beta)
    with LocalReparameterization() as lr:
        trace = poutine.trace(guide).get_trace(X, Y)
    # xi = standardised deviation of log lambda^2 = log a + log b from its posterior mean
    names = ["fc1.weight.unit_scale_a", "fc1.weight.unit_scale_b"]
    dev = sum(trace.nodes[n]["value"].log() - guide.loc(n) for n in names)
    xi = dev / math.sqrt(2 * 0.3**2)
    expected = guide.locs["fc1__weight"] + beta * xi
    torch.testing.assert_close(lr.posteriors["fc1.weight"].loc, expected.detach(), rtol=1e-5, atol=1e-6)
    # the weights stay Gaussian given the scales: local reparameterisation still applies
    assert "fc1.weight" in lr.posteriors and "fc1.bias" in lr.posteriors
    loc, var = guide.marginal_site_posterior("fc1.weight")
    torch.testing.assert_close(var, guide.site_posterior("fc1.weight")[1] + beta**2)


def test_lowrank_total_correlation_matches_slogdet():
    torch.manual_seed(1)
    f = torch.randn(7, 3, dtype=torch.float64)
    d = torch.rand(7, dtype=torch.float64) + 0.1
    cov = f @ f.T + torch.diag(d)
    expected = 0.5 * cov.diagonal().log().sum() - 0.5 * torch.linalg.slogdet(cov)[1]
    torch.testing.assert_close(lowrank_total_correlation(f, d), expected)


def test_lowrank_block_kl_is_the_exact_gaussian_kl():
    # one layer, Gaussian priors N(0, 0.5^2): the block's KL in the ELBO equals the closed-form
    # KL(N(mu, F F^T + D) || N(0, 0.25 I)) over the layer's 5*3 + 3 parameters
    torch.manual_seed(2)
    net = BayesianNetwork([Linear(5, 3, prior=Gaussian(0.5), bias_prior=Gaussian(0.5))])
    guide = LowRankGuide(net.model, rank=2, max_params=100).setup(X)
    with torch.no_grad():
        guide.block_factors["fc1"].normal_(0, 0.1)
        guide.block_log_diag["fc1"].uniform_(-3, -1)
    loc, f, d = (t.detach().double() for t in guide.block_params("fc1"))
    cov = f @ f.T + torch.diag(d)
    p = torch.distributions.MultivariateNormal(torch.zeros(18, dtype=torch.float64),
                                               0.25 * torch.eye(18, dtype=torch.float64))
    exact = torch.distributions.kl_divergence(torch.distributions.MultivariateNormal(loc, cov), p)
    elbo = MeanFieldELBO()
    elbo.differentiable_loss(net.model, guide, X, Y)
    assert abs(elbo.last_terms["kl"].item() - exact.item()) < 1e-3 * abs(exact.item())


def test_lowrank_falls_back_to_mean_field_and_samples_weights():
    net = BayesianNetwork([Linear(5, 6, prior=LogUniform()), ReLU(), Linear(6, 3, prior=LogUniform())])
    guide = LowRankGuide(net.model, rank=2, max_params=25).setup(X, Y)  # fc1 has 36 parameters, fc2 21
    assert list(guide.blocks) == ["fc2"] and "fc1__weight" in guide.locs and "fc2__weight" not in guide.locs
    with LocalReparameterization() as lr:
        poutine.trace(guide).get_trace(X, Y)
    assert set(lr.posteriors) == {"fc1.weight", "fc1.bias"}  # the block layer is sampled, not reparameterised
    s = summarize(net, guide)
    assert s["fc1.weight"].block is None
    blk = s["fc2.weight"].block
    assert blk["cov_factor"].shape == (18, 2) and blk["cov_diag"].shape == (18,) and blk["shape"] == (3, 6)
    assert s["fc2.bias"].block["cov_factor"].shape == (3, 2)
    # marginal variances are the diagonal of the block
    torch.testing.assert_close(s["fc2.weight"].variance.reshape(-1),
                               blk["cov_diag"] + blk["cov_factor"].square().sum(-1))
    assert torch.isfinite(s["fc2.weight"].log_alpha).all()


def test_lowrank_block_of_a_noncentred_prior_is_scaled():
    net = BayesianNetwork([Linear(5, 3, prior=Horseshoe(0.1, "unit"))])
    guide = LowRankGuide(net.model, rank=2).setup(X)
    with torch.no_grad():
        guide.block_factors["fc1"].normal_()
    s = summarize(net, guide)["fc1.weight"]
    scale = net.layers["fc1"].weight_prior.group_scale("fc1.weight", guide.median())  # (3, 1)
    raw = guide.site_block("fc1.weight")
    f = scale.expand(3, 5).reshape(-1)
    torch.testing.assert_close(s.block["cov_factor"], raw["cov_factor"] * f[:, None])
    torch.testing.assert_close(s.block["cov_diag"], raw["cov_diag"] * f**2)


def test_lowrank_options_are_checked():
    net = net_with(LogUniform())
    with pytest.raises(ValueError, match="rank must be a positive integer, got 0"):
        LowRankGuide(net.model, rank=0)
    with pytest.raises(ValueError, match="max_params"):
        LowRankGuide(net.model, max_params=-3)


@pytest.mark.parametrize("guide,opts", [("structured", {}), ("lowrank", {"rank": 2, "max_params": 400})])
def test_recipes_select_the_guides_and_runs_resume(tmp_path, guide, opts):
    import yaml

    from pyro_sparse.runs import fit_run, load_run

    m, r = tmp_path / "m.yaml", tmp_path / "r.yaml"
    m.write_text(yaml.safe_dump({"prior": {"type": "horseshoe", "tau0": 0.1, "group": "unit"},
                                 "layers": [{"type": "linear", "out": 16}, {"type": "relu"},
                                            {"type": "linear", "out": "auto"}]}))
    r.write_text(yaml.safe_dump({"guide": guide, "guide_options": opts, "epochs": 2, "batch_size": 256,
                                 "optimizer": {"name": "Adam", "lr": 0.01}, "eval_samples": 2}))
    run, metrics = fit_run(str(m), str(r), "digits", str(tmp_path / "run"), progress=False)
    assert type(run.guide).spec_name == guide and math.isfinite(metrics["test_nll"])
    if guide == "lowrank":
        assert list(run.guide.blocks) == ["fc2"]  # fc1 has 64*16 + 16 > 400 parameters
    again = load_run(str(tmp_path / "run"))
    for (k, a), (_, b) in zip(run.guide.state_dict().items(), again.guide.state_dict().items()):
        assert torch.equal(a, b), k
    assert summarize(again.network, again.guide)["fc2.weight"].loc.shape == (10, 16)
