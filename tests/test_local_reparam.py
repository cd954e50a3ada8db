"""Local reparameterisation matches the mean and variance of explicit weight sampling."""

import pyro.poutine as poutine
import torch

from pyro_sparse.guides import MeanFieldGuide
from pyro_sparse.layers import Conv2d, Linear
from pyro_sparse.local_reparam import GaussianWeight, LocalReparameterization, gaussian_conv, gaussian_linear
from pyro_sparse.network import BayesianNetwork


def _moments(samples):
    return samples.mean(0), samples.var(0)


def test_linear_preactivation_moments():
    torch.manual_seed(0)
    x = torch.randn(4, 6, dtype=torch.float64)
    loc, scale = torch.randn(3, 6, dtype=torch.float64), torch.rand(3, 6, dtype=torch.float64)
    bloc, bscale = torch.randn(3, dtype=torch.float64), torch.rand(3, dtype=torch.float64)
    S = 40000
    lr = torch.stack([gaussian_linear(x, GaussianWeight(loc, scale**2), GaussianWeight(bloc, bscale**2))
                      for _ in range(S)])
    w = loc + scale * torch.randn(S, 3, 6, dtype=torch.float64)
    b = bloc + bscale * torch.randn(S, 3, dtype=torch.float64)
    explicit = torch.einsum("ni,sji->snj", x, w) + b[:, None, :]
    m1, v1 = _moments(lr)
    m2, v2 = _moments(explicit)
    exact_mean = x @ loc.T + bloc
    exact_var = (x**2) @ (scale**2).T + bscale**2
    for m, v in ((m1, v1), (m2, v2)):
        assert torch.allclose(m, exact_mean, atol=5 * (exact_var / S).sqrt().max())
        assert torch.allclose(v, exact_var, rtol=0.05)


def test_conv_preactivation_moments():
    torch.manual_seed(1)
    x = torch.randn(2, 2, 5, 5, dtype=torch.float64)
    loc = torch.randn(3, 2, 3, 3, dtype=torch.float64)
    scale = 0.5 * torch.rand(3, 2, 3, 3, dtype=torch.float64)
    S = 20000
    lr = torch.stack([gaussian_conv(x, GaussianWeight(loc, scale**2), padding=1) for _ in range(S)])
    exact_mean = torch.nn.functional.conv2d(x, loc, padding=1)
    exact_var = torch.nn.functional.conv2d(x**2, scale**2, padding=1)
    w = loc + scale * torch.randn(2000, *loc.shape, dtype=torch.float64)
    explicit = torch.stack([torch.nn.functional.conv2d(x, wi, padding=1) for wi in w])
    assert torch.allclose(lr.mean(0), exact_mean, atol=5 * (exact_var.max() / S) ** 0.5)
    assert torch.allclose(lr.var(0), exact_var, rtol=0.06)
    assert torch.allclose(explicit.var(0), exact_var, rtol=0.2)


def test_layers_use_the_guide_posterior_under_the_handler():
    """Inside the handler the weight site is not sampled and the layer sees q's moments."""
    torch.manual_seed(0)
    net = BayesianNetwork([Linear(4, 2, bias=False)], "categorical")
    x = torch.randn(3, 4)
    guide = MeanFieldGuide(net.model, init_scale=0.5).setup(x)
    with LocalReparameterization() as handler:
        tr = poutine.trace(guide).get_trace(x)
        assert torch.equal(tr.nodes["fc1.weight"]["value"], guide.locs["fc1__weight"])  # placeholder, no draw
        assert "fc1.weight" in handler.posteriors
    # without the handler: a real sample
    tr = poutine.trace(guide).get_trace(x)
    assert not torch.equal(tr.nodes["fc1.weight"]["value"], guide.locs["fc1__weight"])


def test_switch_off_local_reparam_in_the_guide():
    net = BayesianNetwork([Conv2d(1, 2, 3)], "categorical", input_shape=(1, 3, 3))
    x = torch.randn(2, 9)
    guide = MeanFieldGuide(net.model, local_reparam=False).setup(x)
    assert not any(info["local_reparam"] for info in guide.sites.values())
    guide_on = MeanFieldGuide(net.model).setup(x)
    assert all(info["local_reparam"] for info in guide_on.sites.values())
