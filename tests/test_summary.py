"""The posterior summary read off a fitted guide."""

import math

import torch

from pyro_sparse.guides import DeltaGuide, MeanFieldGuide
from pyro_sparse.layers import Linear, ReLU
from pyro_sparse.network import BayesianNetwork
from pyro_sparse.priors import Gaussian, GaussianGamma
from pyro_sparse.summary import summarize


def test_meanfield_summary_matches_guide_parameters():
    torch.manual_seed(0)
    net = BayesianNetwork([Linear(4, 3, prior=Gaussian(0.5)), ReLU(), Linear(3, 2, prior=GaussianGamma(3.0, 2.0))])
    x = torch.randn(5, 4)
    guide = MeanFieldGuide(net.model, init_scale=0.1).setup(x)
    s = summarize(net, guide)
    assert list(s) == ["fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"]
    w = s["fc1.weight"]
    assert torch.equal(w.loc, guide.locs["fc1__weight"].detach())
    assert torch.allclose(w.precision, torch.full((3, 4), 100.0))
    assert torch.allclose(w.prior_precision, torch.tensor(4.0))  # 1 / 0.5^2
    assert w.axes == {"unit": 0, "input": 1}
    assert torch.allclose(w.log_alpha, 2 * math.log(0.1) - w.loc.square().log(), atol=1e-5)
    # the learned-precision prior: conditional prior given the fitted precision (median = init 3/2)
    assert torch.allclose(s["fc2.weight"].prior_precision, torch.tensor(1.5))
    assert s.num_weights() == 12 + 3 + 6 + 2


def test_delta_summary_has_infinite_precision():
    net = BayesianNetwork([Linear(4, 3)])
    guide = DeltaGuide(net.model).setup(torch.randn(2, 4))
    s = summarize(net, guide)
    assert torch.isinf(s["fc1.weight"].precision).all()
