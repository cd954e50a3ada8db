"""Sparsity priors: the sites they emit, their initialisation, summaries and pruning rules."""

import math

import pytest
import torch

from pyro_sparse.elbo import MeanFieldELBO
from pyro_sparse.errors import SpecError
from pyro_sparse.guides import MeanFieldGuide, latent_sites, prototype_trace
from pyro_sparse.layers import Conv2d, Flatten, Linear, ReLU
from pyro_sparse.network import BayesianNetwork
from pyro_sparse.priors import GroupLogUniform, Horseshoe, LogUniform
from pyro_sparse.reduction import reduce
from pyro_sparse.spec import build_network, parse_model_spec
from pyro_sparse.summary import summarize

X = torch.randn(6, 5)
Y = torch.randint(0, 3, (6,))


def site_shapes(net, x):
    trace = prototype_trace(net.model, x)
    return {s["name"]: tuple(s["value"].shape) for s in latent_sites(trace)}


LINEAR_GROUPS = {"weight": (4, 5), "unit": (4, 1), "input": (1, 5), "layer": (1, 1)}


@pytest.mark.parametrize("group", LINEAR_GROUPS)
def test_group_log_uniform_sites(group):
    net = BayesianNetwork([Linear(5, 4, prior=GroupLogUniform(group))])
    shapes = site_shapes(net, X)
    assert shapes == {f"fc1.weight.z_{group}": LINEAR_GROUPS[group], "fc1.weight": (4, 5), "fc1.bias": (4,)}


@pytest.mark.parametrize("group,shape", [("channel", (3, 1, 1, 1)), ("unit", (3, 1, 1, 1)),
                                         ("input", (1, 2, 1, 1)), ("weight", (3, 2, 3, 3))])
def test_group_priors_on_conv_channels(group, shape):
    net = BayesianNetwork([Conv2d(2, 3, 3, prior=GroupLogUniform(group)), Flatten()], input_shape=(2, 4, 4))
    assert site_shapes(net, torch.randn(2, 32))[f"conv1.weight.z_{group}"] == shape
    net = BayesianNetwork([Conv2d(2, 3, 3, prior=Horseshoe(group=group)), Flatten()], input_shape=(2, 4, 4))
    shapes = site_shapes(net, torch.randn(2, 32))
    assert shapes[f"conv1.weight.{group}_scale_a"] == shape and shapes["conv1.weight.global_scale_b"] == (1, 1, 1, 1)


@pytest.mark.parametrize("group", LINEAR_GROUPS)
def test_horseshoe_sites(group):
    gshape = LINEAR_GROUPS[group]
    net = BayesianNetwork([Linear(5, 4, prior=Horseshoe(0.1, group, regularized=True))])
    assert site_shapes(net, X) == {
        "fc1.weight.global_scale_a": (1, 1), "fc1.weight.global_scale_b": (1, 1),
        f"fc1.weight.{group}_scale_a": gshape, f"fc1.weight.{group}_scale_b": gshape,
        "fc1.weight.slab_variance": (1, 1), "fc1.weight": (4, 5), "fc1.bias": (4,)}
    net = BayesianNetwork([Linear(5, 4, prior=Horseshoe(0.1, group, decompose=False))])
    assert site_shapes(net, X) == {"fc1.weight.global_scale": (1, 1), f"fc1.weight.{group}_scale": gshape,
                                   "fc1.weight": (4, 5), "fc1.bias": (4,)}


def test_group_axis_must_exist():
    with pytest.raises(ValueError, match=r"group 'channel' is not an axis .*'unit', 'input'"):
        Linear(5, 4, prior=GroupLogUniform("channel"))
    spec = parse_model_spec({"layers": [{"type": "linear", "out": "auto",
                                         "prior": {"type": "horseshoe", "group": "channel"}}]}, "m.yaml")
    with pytest.raises(SpecError, match=r"m.yaml.*layers\[0\].*'channel'"):
        build_network(spec, (5,), 3, source="m.yaml")
    with pytest.raises(SpecError, match="layers\\[0\\].prior.group"):
        parse_model_spec({"layers": [{"type": "linear", "out": 3, "prior": {"type": "horseshoe", "group": "rows"}}]})


PRIORS = [LogUniform(), GroupLogUniform("unit"), GroupLogUniform("input"), Horseshoe(0.01, "unit", regularized=True),
          Horseshoe(1.0, "weight", decompose=False), Horseshoe(0.1, "layer")]


@pytest.mark.parametrize("prior", PRIORS, ids=repr)
def test_fresh_guide_predicts_like_the_deterministic_init(prior):
    torch.manual_seed(0)
    net = BayesianNetwork([Linear(5, 7, prior=prior), ReLU(), Linear(7, 3, prior=prior)])
    guide = MeanFieldGuide(net.model).setup(X, Y)
    plain = net.deterministic({f"{n}.{p}": getattr(l, f"{p}_init") for n, l in net.bayesian_layers()
                               for p in l.priors()})
    torch.testing.assert_close(net.point_outputs(X, guide.median()), plain(X), rtol=1e-5, atol=1e-6)
    # ... and the summary's parameter means are the initial weights
    s = summarize(net, guide)
    torch.testing.assert_close(s["fc1.weight"].loc, net.layers["fc1"].weight_init, rtol=1e-5, atol=1e-7)


def test_group_log_uniform_summary_is_conditional_on_z():
    net = BayesianNetwork([Linear(5, 4, prior=GroupLogUniform("unit"))])
    guide = MeanFieldGuide(net.model, init_scale=0.1).setup(X)
    z = torch.tensor([[2.0], [-0.5], [1.0], [0.1]])
    with torch.no_grad():
        guide.loc("fc1.weight.z_unit").copy_(z)
    s = summarize(net, guide)["fc1.weight"]
    mu = guide.locs["fc1__weight"].detach()
    torch.testing.assert_close(s.loc, z * mu)
    torch.testing.assert_close(s.precision, 1 / (z**2 * 0.01).expand(4, 5))
    torch.testing.assert_close(s.prior_precision, 1 / z**2)
    # log alpha of w is that of w~ (the z cancel); the group log alpha is that of z
    torch.testing.assert_close(s.log_alpha, 2 * math.log(0.1) - mu.square().log(), atol=1e-4, rtol=1e-5)
    la_z = net.layers["fc1"].weight_prior.group_log_alpha("fc1.weight", guide)
    torch.testing.assert_close(la_z, 2 * math.log(0.1) - z.square().log())


def test_regularised_horseshoe_scale_formula():
    prior = Horseshoe(0.01, "unit", regularized=True, slab_df=4.0, slab_scale=math.sqrt(3.0))
    assert prior.slab_concentration_rate() == pytest.approx((2.0, 6.0))  # InvGamma(2, 6), Markovic et al.
    v = {"w.global_scale_a": torch.tensor([[0.3]]), "w.global_scale_b": torch.tensor([[0.02]]),
         "w.unit_scale_a": torch.tensor([[0.5], [4.0]]), "w.unit_scale_b": torch.tensor([[2.0], [30.0]]),
         "w.slab_variance": torch.tensor([[1.5]])}
    tau2 = 0.3 * 0.02
    lam2 = torch.tensor([[1.0], [120.0]])
    c2 = 1.5
    expected = (c2 * tau2 * lam2 / (c2 + tau2 * lam2)).sqrt()  # Piironen & Vehtari (2017)
    torch.testing.assert_close(prior.group_scale("w", v), expected)
    torch.testing.assert_close(prior.relative_scale("w", v), expected / math.sqrt(tau2))
    plain = Horseshoe(0.01, "unit")
    torch.testing.assert_close(plain.group_scale("w", v), (tau2 * lam2).sqrt())


def test_horseshoe_summary_maps_eps_to_w():
    net = BayesianNetwork([Linear(5, 4, prior=Horseshoe(0.1, "unit", regularized=True))])
    guide = MeanFieldGuide(net.model, init_scale=0.2).setup(X)
    prior = net.layers["fc1"].weight_prior
    s_g = prior.group_scale("fc1.weight", guide.median())
    assert s_g.shape == (4, 1)
    s = summarize(net, guide)["fc1.weight"]
    torch.testing.assert_close(s.loc, s_g * guide.locs["fc1__weight"].detach())
    torch.testing.assert_close(s.precision, 1 / (s_g**2 * 0.04).expand(4, 5))
    torch.testing.assert_close(s.prior_precision, 1 / s_g**2)


def test_decomposed_horseshoe_kl_is_analytic_and_cauchy_is_not():
    torch.manual_seed(0)
    for decompose, analytic in ((True, True), (False, False)):
        net = BayesianNetwork([Linear(5, 4, prior=Horseshoe(0.1, "unit", regularized=True, decompose=decompose))])
        guide = MeanFieldGuide(net.model).setup(X, Y)
        elbo = MeanFieldELBO()
        kls = []
        for _ in range(2):
            elbo.differentiable_loss(net.model, guide, X, Y)
            kls.append(elbo.last_terms["kl"].item())
        assert (kls[0] == kls[1]) is analytic, kls


def test_each_prior_contributes_its_rule_to_the_one_registry():
    """The priors' own rules are reduction rules like any other: ``reduce(summary, name)`` reads
    the group quantity the prior put into the summary, judges that prior's weights only, and
    uses the rule's one default threshold."""
    net = BayesianNetwork([Linear(5, 4, prior=LogUniform()), ReLU(), Linear(4, 3, prior=GroupLogUniform("unit")),
                           ReLU(), Linear(3, 2, prior=Horseshoe(0.1, "input"))])
    guide = MeanFieldGuide(net.model, init_scale=0.1).setup(X)
    with torch.no_grad():
        guide.locs["fc1__weight"].copy_(torch.tensor([[1.0, 0.1, 0.01, 0.0, 2.0]]).expand(4, 5))
        guide.loc("fc2.weight.z_unit").copy_(torch.tensor([[1.0], [0.001], [0.5]]))
        # lambda^2 = a * b with the horseshoe's input groups: relative scales 10, 1, 3
        guide.loc("fc3.weight.input_scale_a").copy_(torch.zeros(1, 3))
        guide.loc("fc3.weight.input_scale_b").copy_(torch.tensor([[100.0, 1.0, 9.0]]).log())
    summary = summarize(net, guide)
    # log alpha = log 0.01 - log theta^2: kept iff theta^2 > 0.01 e^-3
    assert reduce(summary, "log-alpha").masks["fc1.weight"][0].tolist() == [True, True, False, False, True]
    # log alpha_z = log 0.01 - log z^2 = -4.6, 9.2, -3.2; only the group prior's weights are judged
    group = reduce(summary, "group-log-alpha")
    assert group.masks["fc2.weight"].shape == (3, 4) and group.masks["fc2.weight"][:, 0].tolist() == [True, False, True]
    assert bool(group.masks["fc1.weight"].all()) and bool(group.masks["fc3.weight"].all())
    assert group.options["threshold"] == 0.0
    torch.testing.assert_close(net.layers["fc3"].weight_prior.relative_scale("fc3.weight", guide.median()),
                               torch.tensor([[10.0, 1.0, 3.0]]))
    scale = reduce(summary, "horseshoe-scale")
    assert scale.masks["fc3.weight"][0].tolist() == [True, False, True] and scale.options["threshold"] == 3.0
    assert bool(scale.masks["fc2.weight"].all())
    assert reduce(summary, "horseshoe-scale", threshold=5.0).masks["fc3.weight"][0].tolist() == [True, False, False]
    assert reduce(summary, "group-log-alpha", threshold=-4.0).masks["fc2.weight"][:, 0].tolist() == [True, False, False]
    # a prior's rule on a summary without that prior says so
    plain = summarize(*_gaussian_net())
    with pytest.raises(ValueError, match="group-log-alpha.*no site"):
        reduce(plain, "group-log-alpha")


def _gaussian_net():
    net = BayesianNetwork([Linear(5, 4), ReLU(), Linear(4, 2)])
    return net, MeanFieldGuide(net.model, init_scale=0.1).setup(X)
