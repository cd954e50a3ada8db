"""The ELBO: plate scaling, analytic KL, agreement with Pyro's TraceMeanField_ELBO."""

import pyro
import pytest
import torch
from pyro.infer import TraceMeanField_ELBO
from torch.distributions import Normal, kl_divergence

from pyro_sparse.elbo import MeanFieldELBO
from pyro_sparse.guides import DeltaGuide, MeanFieldGuide
from pyro_sparse.layers import Linear, ReLU
from pyro_sparse.network import BayesianNetwork
from pyro_sparse.priors import Gaussian


def small_net(dtype=torch.float64):
    torch.manual_seed(0)
    net = BayesianNetwork([Linear(5, 7, prior=Gaussian(0.7)), ReLU(), Linear(7, 3)], "categorical")
    return net.to(dtype)


def toy_data(n=24, dtype=torch.float64):
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 5, generator=g, dtype=dtype), torch.randint(0, 3, (n,), generator=g)


def test_plate_scaling_minibatches_average_to_the_full_batch():
    """Sum_b (N/B) loglik_b over a partition / number of batches == full-data loglik,
    and the prior term is counted once in each (MAP objective, deterministic weights)."""
    net = small_net()
    x, y = toy_data()
    guide = DeltaGuide(net.model).setup(x, y)
    guide.to(torch.float64)
    elbo = MeanFieldELBO(local_reparam=False)
    full = elbo.differentiable_loss(net.model, guide, x, y, dataset_size=24)
    batches = [torch.arange(i, i + 6) for i in range(0, 24, 6)]
    mini = torch.stack([elbo.differentiable_loss(net.model, guide, x[b], y[b], dataset_size=24, subsample=b)
                        for b in batches])
    assert torch.allclose(mini.mean(), full, rtol=1e-12)
    # and each mini-batch estimate is different: the scaling is doing the work
    assert mini.std() > 1e-3
    loglik_full, prior_full = elbo.terms(net.model, guide, x, y, dataset_size=24)
    loglik_b, prior_b = elbo.terms(net.model, guide, x[:6], y[:6], dataset_size=24, subsample=batches[0])
    assert torch.allclose(prior_full, prior_b)  # prior counted once, whatever the batch


def test_analytic_kl_for_gaussian_sites():
    net = small_net()
    x, y = toy_data()
    guide = MeanFieldGuide(net.model, init_scale=0.3).setup(x, y)
    guide.to(torch.float64)
    with torch.no_grad():
        for p in guide.locs.values():
            p.add_(0.1)
    elbo = MeanFieldELBO()
    _, kl1 = elbo.terms(net.model, guide, x, y)
    _, kl2 = elbo.terms(net.model, guide, x, y)
    expected = 0.0
    for name, (layer, param, prior) in net.param_sites().items():
        q = guide.distribution(name)
        expected = expected + kl_divergence(q, Normal(torch.zeros_like(q.loc), prior.scale)).sum()
    assert kl1 == kl2  # no Monte Carlo noise: closed form
    assert torch.allclose(kl1, expected, rtol=1e-12)


def test_same_estimate_as_trace_mean_field_elbo_without_local_reparam():
    net = small_net()
    x, y = toy_data()
    guide = MeanFieldGuide(net.model, init_scale=0.2).setup(x, y)
    guide.to(torch.float64)
    pyro.set_rng_seed(3)
    ours = MeanFieldELBO(local_reparam=False).differentiable_loss(net.model, guide, x, y, dataset_size=100)
    pyro.set_rng_seed(3)
    theirs = TraceMeanField_ELBO().differentiable_loss(net.model, guide, x, y, dataset_size=100)
    assert torch.allclose(ours, theirs, rtol=1e-10)


def test_local_reparam_estimate_is_unbiased():
    """E[loss] with local reparameterisation == E[loss] with weight sampling (MC, many draws)."""
    net = small_net()
    x, y = toy_data(8)
    guide = MeanFieldGuide(net.model, init_scale=0.3).setup(x, y)
    guide.to(torch.float64)
    torch.manual_seed(0)
    with torch.no_grad():
        lr = torch.stack([MeanFieldELBO().differentiable_loss(net.model, guide, x, y) for _ in range(3000)])
        ws = torch.stack([MeanFieldELBO(local_reparam=False).differentiable_loss(net.model, guide, x, y)
                          for _ in range(3000)])
    se = (lr.var() / 3000 + ws.var() / 3000).sqrt()
    assert abs(lr.mean() - ws.mean()) < 4 * se
    assert lr.var() < ws.var()  # the point of the trick: lower variance


def test_kl_weight_scales_only_the_prior_term():
    net = small_net()
    x, y = toy_data()
    guide = DeltaGuide(net.model).setup(x, y)
    guide.to(torch.float64)
    elbo = MeanFieldELBO(local_reparam=False)
    loglik, kl = elbo.terms(net.model, guide, x, y)
    elbo.kl_weight = 0.25
    assert torch.allclose(elbo.differentiable_loss(net.model, guide, x, y), 0.25 * kl - loglik)


@pytest.mark.parametrize("guide_cls", [MeanFieldGuide, DeltaGuide])
def test_svi_from_pyro_accepts_the_loss(guide_cls):
    """MeanFieldELBO is a pyro.infer.ELBO: loss_and_grads populates gradients."""
    net = small_net()
    x, y = toy_data()
    guide = guide_cls(net.model).setup(x, y)
    guide.to(torch.float64)
    value = MeanFieldELBO().loss_and_grads(net.model, guide, x, y)
    assert isinstance(value, float)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in guide.parameters())
