"""CoreELBO: the ELBO of every prior, guide, layer family and likelihood, computed from the
declarations without Pyro, against the Pyro adapter.

Reference: ``MeanFieldELBO`` (guide and model run through Pyro's effect handlers). Both draw the
same noise in the same order, so with the same torch seed the two give the same loss and the same
gradient up to float32 rounding (relative differences ~1e-7 here; the tests allow 1e-5), for the
mean-field, structured and low-rank guides, with and without local reparameterisation, on MLPs,
CNNs, LSTMs/GRUs with group variables, attention and mixer blocks, and with a learned noise. With
the delta guide nothing is drawn and both are the MAP objective
``-(N/B) sum log p(y | f(x; w)) - beta sum log p(w)``, hyper-sites included.
"""

import math
import os

import pyro
import pyro.distributions as dist
import pytest
import torch
from torch.distributions import kl_divergence

from pyro_sparse.distributions import LogUniform
from pyro_sparse.elbo import CoreELBO, MeanFieldELBO
from pyro_sparse.errors import SpecError
from pyro_sparse.guides import DeltaGuide, MeanFieldGuide
from pyro_sparse.kl import (
    NormalKLTerms,
    SparseVDKLTerms,
    kl_terms_for,
    local_terms,
    neg_log_density_for,
    normal_kl_terms,
    sparse_vd_kl_terms,
)
from pyro_sparse.layers import Linear, ReLU
from pyro_sparse.likelihoods import Bernoulli, Categorical, Gaussian
from pyro_sparse.network import BayesianNetwork
from pyro_sparse.priors import Gaussian as GaussianPrior
from pyro_sparse.priors import HyperSite, Prior, sample_hyper, sample_weight
from pyro_sparse.recipe import load_recipe, parse_recipe
from pyro_sparse.runs import build
from pyro_sparse.spec import load_model_spec, parse_model_spec

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def spec_path(name):
    return os.path.join(ROOT, "models", name)


def recipe_path(name):
    return os.path.join(ROOT, "inference", name)


def built(digits, model, recipe="svi_sparsevd.yaml", **overrides):
    """(network, guide set up on the first batch, recipe) as the trainer builds them."""
    spec = load_model_spec(spec_path(model)) if isinstance(model, str) else parse_model_spec(model)
    rec = load_recipe(recipe_path(recipe))
    rec.update(overrides)
    net, guide = build(spec, rec, digits)
    guide.setup(digits.x_train[:8], digits.y_train[:8], dataset_size=len(digits.x_train))
    return net, guide, rec


def perturb(guide, seed=3):
    """Move the guide away from its initialisation (larger, varied scales; some clamped; a
    structured guide's shifts and a low-rank guide's factors away from 0)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        sites = [(name, info) for name, info in guide.sites.items() if info.get("block") is None]
        for name, _ in sites:
            loc = guide.loc(name)
            loc.add_(0.05 * torch.randn(loc.shape, generator=g))
        for name, info in sites:
            p = guide.log_scale(name)
            # log-normal hyper-sites: log-space sd around 0.3, so their draws move the loss
            p.copy_((-1.2 + 0.3 * torch.randn(p.shape, generator=g)) if info["family"] == "lognormal"
                    else (-4.0 + 1.5 * torch.randn(p.shape, generator=g)))
        for name in ("shifts", "block_factors"):
            for p in getattr(guide, name, {}).values():
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
        for p in getattr(guide, "block_locs", {}).values():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
        for p in getattr(guide, "block_log_diag", {}).values():
            p.copy_(-4.0 + 1.0 * torch.randn(p.shape, generator=g))
        guide.log_scales[clamped_site(guide)].view(-1)[:5] = torch.tensor([-13.0, -12.5, 4.5, 5.0, -30.0])


def clamped_site(guide):
    """The first Gaussian site with at least 5 elements: ``perturb`` sets 5 log-scales beyond the
    clamp [-12, 4] there."""
    return next(key for key, p in guide.log_scales.items()
                if p.numel() >= 5 and guide.sites[key.replace("__", ".")]["family"] == "normal")


def estimates(runs, x, y, n, idx, params):
    """(loss, gradients wrt ``params``, last_terms) of each ``(elbo, model, guide)``, same seed."""
    out = []
    for elbo, model, guide in runs:
        torch.manual_seed(11)
        with pyro.validation_enabled(False):
            loss = elbo.differentiable_loss(model, guide, x, y, dataset_size=n, subsample=idx)
        out.append((loss.detach(), torch.autograd.grad(loss, params), elbo.last_terms))
    return out


def both(net, guide, x, y, n, idx, beta):
    """(loss, gradients, last_terms) of the Pyro path and of the direct path, same seed."""
    return estimates(((MeanFieldELBO(kl_weight=beta), net.model, guide), (CoreELBO(kl_weight=beta), net, guide)),
                     x, y, n, idx, list(guide.parameters()))


GAUSSIAN_GAMMA = {"input_shape": "auto", "prior": {"type": "gaussian_gamma", "group": "layer"},
                  "layers": [{"type": "linear", "out": 16}, {"type": "relu"}, {"type": "linear", "out": "auto"}],
                  "likelihood": {"type": "categorical"}}
GAUSSIAN_GAMMA_UNIT = {"input_shape": "auto", "prior": {"type": "gaussian_gamma", "group": "unit"},
                       "bias_prior": {"type": "gaussian_gamma", "group": "layer", "concentration": 3.0, "rate": 0.5},
                       "layers": [{"type": "linear", "out": 32}, {"type": "relu"}, {"type": "linear", "out": "auto"}],
                       "likelihood": {"type": "categorical"}}
#: the horseshoe with half-Cauchy sites (no closed-form KL: the one-sample estimate) and no slab
HORSESHOE_CAUCHY = {"input_shape": "auto",
                    "prior": {"type": "horseshoe", "tau0": 0.1, "group": "input", "decompose": False},
                    "layers": [{"type": "linear", "out": 24}, {"type": "tanh"}, {"type": "linear", "out": "auto"}],
                    "likelihood": {"type": "categorical"}}
#: a convolutional net with channel groups (no conv spec in models/ has a hierarchical prior)
CONV_HIER = {"input_shape": "image",
             "layers": [{"type": "conv2d", "out": 6, "kernel_size": 3, "padding": 1,
                         "prior": {"type": "group_log_uniform", "group": "channel"}},
                        {"type": "relu"}, {"type": "maxpool2d", "kernel_size": 2},
                        {"type": "conv2d", "out": 8, "kernel_size": 3,
                         "prior": {"type": "horseshoe", "tau0": 0.1, "group": "input", "regularized": True}},
                        {"type": "relu"}, {"type": "flatten"},
                        {"type": "linear", "out": "auto", "prior": {"type": "gaussian_gamma", "group": "unit"}}],
             "likelihood": {"type": "categorical"}}

#: an LSTM with weights, gates and neurons (Lobacheva et al. 2018) over the 8 rows of a digit
LSTM_WGN = {"input_shape": [8, 8], "prior": {"type": "log_uniform"}, "bias_prior": {"type": "gaussian", "scale": 1.0},
            "layers": [{"type": "lstm", "name": "lstm", "hidden_size": 12, "z_input": True, "z_hidden": True,
                        "z_gates": True},
                       {"type": "linear", "name": "fc", "out": "auto"}],
            "likelihood": {"type": "categorical"}}
#: a GRU whose weights have a learned precision per unit (a conditional prior on drawn weights) and
#: horseshoe gate variables
GRU_HIER = {"input_shape": [8, 8], "prior": {"type": "gaussian_gamma", "group": "unit"},
            "layers": [{"type": "gru", "name": "gru", "hidden_size": 10, "z_gates": True,
                        "z_prior": {"type": "horseshoe", "tau0": 0.5, "group": "weight"}},
                       {"type": "linear", "name": "fc", "out": "auto"}],
            "likelihood": {"type": "categorical"}}

#: name -> (model, recipe, recipe overrides) of every case checked against the Pyro path
CASES = {
    "mlp_sparsevd": ("mlp_sparsevd.yaml", "svi_sparsevd.yaml", {}),
    "mlp_gaussian": ("mlp_gaussian.yaml", "svi_sparsevd.yaml", {}),
    "lenet5_sparsevd": ("lenet5_sparsevd.yaml", "svi_sparsevd.yaml", {}),
    "mlp_group_loguniform": ("mlp_group_loguniform.yaml", "svi_group_loguniform.yaml", {}),
    "mlp_horseshoe": ("mlp_horseshoe.yaml", "svi_horseshoe.yaml", {}),
    "gaussian_gamma": (GAUSSIAN_GAMMA, "svi_meanfield.yaml", {}),
    "gaussian_gamma_unit": (GAUSSIAN_GAMMA_UNIT, "svi_meanfield.yaml", {}),
    "horseshoe_cauchy": (HORSESHOE_CAUCHY, "svi_horseshoe.yaml", {}),
    "conv_hier": (CONV_HIER, "svi_horseshoe.yaml", {}),
    # guides beyond mean field
    "horseshoe_structured": ("mlp_horseshoe.yaml", "svi_horseshoe.yaml", {"guide": "structured"}),
    "group_lu_structured": ("mlp_group_loguniform.yaml", "svi_group_loguniform.yaml", {"guide": "structured"}),
    "sparsevd_lowrank": ("mlp_sparsevd.yaml", "svi_sparsevd.yaml",
                         {"guide": "lowrank", "guide_options": {"rank": 3, "max_params": 2000}}),
    "horseshoe_lowrank": ("mlp_horseshoe.yaml", "svi_horseshoe.yaml",
                          {"guide": "lowrank", "guide_options": {"rank": 2, "max_params": 2000}}),
    # every weight drawn (no local reparameterisation), plain and structured
    "horseshoe_drawn": ("mlp_horseshoe.yaml", "svi_horseshoe.yaml", {"guide_options": {"local_reparam": False}}),
    "structured_drawn": ("mlp_group_loguniform.yaml", "svi_group_loguniform.yaml",
                         {"guide": "structured", "guide_options": {"local_reparam": False}}),
    # recurrent, attention and mixer layers
    "lstm_wgn": (LSTM_WGN, "svi_sparsevd_rnn.yaml", {}),
    "gru_hier": (GRU_HIER, "svi_meanfield.yaml", {}),
    "vit_sparsevd": ("vit_tiny_sparsevd.yaml", "svi_sparsevd.yaml", {}),
    "vit_horseshoe": ("vit_tiny_horseshoe.yaml", "svi_horseshoe.yaml", {}),
    "mixer_sparsevd": ("mixer_tiny_sparsevd.yaml", "svi_sparsevd.yaml", {}),
}
#: the cases of the first implementation (sequential Linear/Conv2d, mean-field)
MEAN_FIELD_CASES = [CASES[k] for k in ("mlp_sparsevd", "mlp_gaussian", "lenet5_sparsevd", "mlp_group_loguniform",
                                       "mlp_horseshoe", "gaussian_gamma", "gaussian_gamma_unit", "horseshoe_cauchy",
                                       "conv_hier")]


def case_id(case):
    found = next((name for name, c in CASES.items() if c is case), None)
    return found or "+".join(x.removesuffix(".yaml") for x in case[:2])


@pytest.mark.parametrize("case", list(CASES.values()), ids=case_id)
@pytest.mark.parametrize("beta", [0.3, 1.0])
def test_same_seed_same_loss_and_gradients(digits, case, beta):
    model, recipe, overrides = case
    net, guide, _ = built(digits, model, recipe, **overrides)
    assert CoreELBO.supports(net, guide) is None
    perturb(guide)
    n = len(digits.x_train)
    idx = torch.arange(100, 164)
    x, y = digits.x_train[idx], digits.y_train[idx]
    (l_ref, g_ref, t_ref), (l_dir, g_dir, t_dir) = both(net, guide, x, y, n, idx, beta)
    torch.testing.assert_close(l_dir, l_ref, rtol=1e-5, atol=0.0)
    for key in ("loglik", "kl"):
        torch.testing.assert_close(t_dir[key], t_ref[key], rtol=1e-5, atol=0.0)
    # a gradient that is zero in exact arithmetic (an attention key bias: softmax ignores a shift of
    # every key; a token-MLP output bias, which every later LayerNorm removes) is rounding noise of
    # cancelling terms: compared at 3e-8 of the largest gradient
    largest = max(g.abs().max().item() for g in g_ref)
    for (name, _), a, b in zip(guide.named_parameters(), g_dir, g_ref):
        scale = b.abs().max().item()
        assert scale > 0, name
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6 * max(scale, 3e-2 * largest),
                                   msg=lambda m: f"{name}: {m}")
    # the clamped log-scales get no gradient on either path
    k = [n for n, _ in guide.named_parameters()].index(f"log_scales.{clamped_site(guide)}")
    assert torch.equal(g_dir[k].view(-1)[:5], torch.zeros(5))
    # another seed gives another estimate: the agreement is not an accident of a constant loss
    torch.manual_seed(12)
    other = CoreELBO(kl_weight=beta).differentiable_loss(net, guide, x, y, dataset_size=n, subsample=idx)
    assert abs(other.item() - l_dir.item()) > 1e-3 * abs(t_dir["loglik"].item())


@pytest.mark.parametrize("case", [CASES[k] for k in ("mlp_sparsevd", "mlp_group_loguniform", "mlp_horseshoe",
                                                     "gaussian_gamma_unit", "horseshoe_cauchy", "horseshoe_structured",
                                                     "sparsevd_lowrank", "lstm_wgn", "vit_horseshoe")], ids=case_id)
def test_float64_agreement_is_tight(digits, case):
    """In double precision the two paths agree to ~1e-12: the same estimator, not just close."""
    model, recipe, overrides = case
    net, guide, _ = built(digits, model, recipe, **overrides)
    net.to(torch.float64)
    guide.to(torch.float64)
    perturb(guide)
    idx = torch.arange(32)
    x, y = digits.x_train[idx].double(), digits.y_train[idx]
    (l_ref, g_ref, _), (l_dir, g_dir, _) = both(net, guide, x, y, 500, idx, 0.7)
    torch.testing.assert_close(l_dir, l_ref, rtol=1e-12, atol=0.0)
    for a, b in zip(g_dir, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12 * b.abs().max().item())


# ------------------------------------------------------------------ the point-mass (MAP) objective


def perturb_points(guide, seed=3):
    """Move the delta guide's point values away from their initialisation."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in guide.values.values():
            p.add_(0.05 * torch.randn(p.shape, generator=g))


def neg_log_prior(net, guide):
    """-sum_sites log p(w_hat), by hand: 0.5 w^2 / s^2 + log s + 0.5 log(2 pi) for a Gaussian
    N(0, s^2) element, log|w| for a log-uniform one (its unnormalised density 1/|w|)."""
    total = 0.0
    for name, (layer, param, prior) in net.param_sites().items():
        w = guide.value(name).detach().double()
        if prior.spec_name == "log_uniform":
            total += w.abs().log().sum().item()
        else:
            assert prior.spec_name == "gaussian" and prior.loc == 0.0, prior
            total += (0.5 * w.square() / prior.scale ** 2 + math.log(prior.scale)
                      + 0.5 * math.log(2 * math.pi)).sum().item()
    return total


@pytest.mark.parametrize("model", ["mlp_gaussian.yaml", "mlp_sparsevd.yaml", "lenet5_sparsevd.yaml",
                                   "lenet5_gaussian.yaml"])
@pytest.mark.parametrize("beta", [0.3, 1.0])
def test_point_mass_same_loss_and_gradients(digits, model, beta):
    """Delta guide (inference/map.yaml): the direct MAP objective is the Pyro path's, value,
    terms and gradients, and its prior term is -sum log p(w_hat) by hand (so on the Pyro path
    KL(delta || p) = log delta(w_hat) - log p(w_hat) with log delta(w_hat) = 0)."""
    net, guide, rec = built(digits, model, "map.yaml")
    assert isinstance(guide, DeltaGuide) and rec["local_reparam"] is False
    assert CoreELBO.supports(net, guide) is None
    perturb_points(guide)
    n = len(digits.x_train)
    idx = torch.arange(100, 164)
    x, y = digits.x_train[idx], digits.y_train[idx]
    (l_ref, g_ref, t_ref), (l_dir, g_dir, t_dir) = estimates(
        ((MeanFieldELBO(kl_weight=beta, local_reparam=False), net.model, guide),
         (CoreELBO(kl_weight=beta), net, guide)),
        x, y, n, idx, list(guide.parameters()))
    torch.testing.assert_close(l_dir, l_ref, rtol=1e-5, atol=0.0)
    for key in ("loglik", "kl"):
        torch.testing.assert_close(t_dir[key], t_ref[key], rtol=1e-5, atol=0.0)
    assert t_dir["kl"].item() == pytest.approx(neg_log_prior(net, guide), rel=1e-5)
    # the data term: (N / B) log p(y | f(x; w_hat)) with the plain deterministic network
    with torch.no_grad():
        logits = net.deterministic(guide.median())(x)
    expected = (n / len(idx)) * torch.distributions.Categorical(logits=logits).log_prob(y).sum()
    torch.testing.assert_close(t_dir["loglik"], expected, rtol=1e-5, atol=0.0)
    for (name, _), a, b in zip(guide.named_parameters(), g_dir, g_ref):
        scale = b.abs().max().item()
        assert scale > 0, name
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6 * scale, msg=lambda m: f"{name}: {m}")
    # nothing is sampled: another seed gives the same value, bit for bit
    torch.manual_seed(12)
    again = CoreELBO(kl_weight=beta).differentiable_loss(net, guide, x, y, dataset_size=n, subsample=idx)
    assert torch.equal(again.detach(), l_dir)


def test_point_mass_float64_agreement_is_tight(digits):
    net, guide, _ = built(digits, "mlp_sparsevd.yaml", "map.yaml")
    net.to(torch.float64)
    guide.to(torch.float64)
    perturb_points(guide)
    idx = torch.arange(32)
    x, y = digits.x_train[idx].double(), digits.y_train[idx]
    params = list(guide.parameters())
    out = []
    for elbo, first in ((MeanFieldELBO(kl_weight=0.7), net.model), (CoreELBO(kl_weight=0.7), net)):
        with pyro.validation_enabled(False):
            loss = elbo.differentiable_loss(first, guide, x, y, dataset_size=500, subsample=idx)
        out.append((loss.detach(), torch.autograd.grad(loss, params)))
    (l_ref, g_ref), (l_dir, g_dir) = out
    torch.testing.assert_close(l_dir, l_ref, rtol=1e-12, atol=0.0)
    for a, b in zip(g_dir, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12 * b.abs().max().item())


def test_neg_log_density_is_the_log_prob_and_its_gradient():
    """neg_log_density_for against -prior.log_prob(w).sum() and autograd, float64: a scalar
    Gaussian with a mean and a scale, the standard normal, the improper log-uniform
    (-log p = log|w|) and a prior without a closed form here (a Laplace: log_prob itself)."""
    g = torch.Generator().manual_seed(0)
    f64 = {"dtype": torch.float64}
    priors = [GaussianPrior(scale=0.5, loc=2.0).site_prior("w", torch.zeros(4, 3, **f64), {}),
              GaussianPrior(scale=1.0).site_prior("w", torch.zeros(4, **f64), {}),
              LogUniform(torch.Size([5, 2, 3])),
              dist.Normal(torch.tensor(0.4, **f64), torch.tensor(1.7, **f64)).expand([4, 3]),
              dist.Laplace(torch.zeros(3, **f64), torch.full((3,), 0.3, **f64))]
    shapes = [(4, 3), (4,), (5, 2, 3), (4, 3), (3,)]
    ws = [torch.randn(s, generator=g, dtype=torch.float64).requires_grad_() for s in shapes]
    for prior, w in zip(priors, ws):
        got, ref = neg_log_density_for(prior)(w), -prior.log_prob(w).sum()
        torch.testing.assert_close(got, ref, rtol=1e-12, atol=0.0)
        torch.testing.assert_close(torch.autograd.grad(got, w)[0], torch.autograd.grad(ref, w)[0], rtol=1e-12,
                                   atol=1e-14)
    # by hand: log|w| summed for the log-uniform prior
    assert neg_log_density_for(priors[2])(ws[2]).item() == pytest.approx(ws[2].detach().abs().log().sum().item(),
                                                                          rel=1e-12)


class _LaplacePrior(Prior):
    """A fixed prior without closed-form terms here, declared by its site prior alone (a new
    prior is one class): the core scores it with log_prob."""

    def site_prior(self, site, init, values):
        return dist.Laplace(torch.zeros_like(init), torch.full_like(init, 0.3))


def test_point_mass_with_a_prior_without_closed_form_terms():
    """A Laplace prior on the first layer's weight goes through prior.log_prob; the rest is fused."""
    torch.manual_seed(0)
    net = BayesianNetwork([Linear(3, 4, prior=_LaplacePrior()), ReLU(), Linear(4, 2, prior={"type": "log_uniform"})])
    x, y = torch.randn(6, 3), torch.randint(0, 2, (6,))
    guide = DeltaGuide(net.model).setup(x, y)
    elbo = CoreELBO(kl_weight=0.6)
    assert CoreELBO.supports(net, guide) is None
    plan = elbo.plan(net, guide)
    assert [s.name for s in plan.sites if s.point is None] == []  # a fixed Laplace prior: its log_prob
    params = list(guide.parameters())
    out = []
    for e, first in ((MeanFieldELBO(kl_weight=0.6), net.model), (elbo, net)):
        loss = e.differentiable_loss(first, guide, x, y, dataset_size=60)
        out.append((loss.detach(), torch.autograd.grad(loss, params), e.last_terms["kl"]))
    (l_ref, g_ref, kl_ref), (l_dir, g_dir, kl_dir) = out
    torch.testing.assert_close(l_dir, l_ref, rtol=1e-6, atol=0.0)
    w1 = guide.value("fc1.weight").detach()
    laplace = (w1.abs() / 0.3 + math.log(2 * 0.3)).sum()  # -log Laplace(w; 0, 0.3)
    rest = sum(-p.site_prior(s, getattr(l, f"{n}_init"), {}).log_prob(guide.value(s).detach()).sum()
               for s, (l, n, p) in net.param_sites().items() if s != "fc1.weight")
    torch.testing.assert_close(kl_dir, laplace + rest, rtol=1e-6, atol=0.0)
    torch.testing.assert_close(kl_ref, kl_dir, rtol=1e-6, atol=0.0)
    for a, b in zip(g_dir, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_data_term_scaling_matches_the_plate():
    """(N / B) sum_b log p(y_b | f(x_b)) with N = dataset_size (or the batch), B = len(subsample)."""
    torch.manual_seed(0)
    net = BayesianNetwork([Linear(4, 5), ReLU(), Linear(5, 3)])
    x, y = torch.randn(6, 4), torch.randint(0, 3, (6,))
    guide = MeanFieldGuide(net.model).setup(x, y)
    for kwargs in ({}, {"dataset_size": 60}, {"dataset_size": 60, "subsample": torch.arange(10, 16)}):
        values = []
        for elbo, first in ((MeanFieldELBO(), net.model), (CoreELBO(), net)):
            torch.manual_seed(4)
            elbo.differentiable_loss(first, guide, x, y, **kwargs)
            values.append(elbo.last_terms["loglik"])
        torch.testing.assert_close(values[1], values[0], rtol=1e-6, atol=0.0)
    assert values[0] < 0


def test_local_terms_gradient_is_the_autograd_gradient_of_the_reference():
    """kl.local_terms (one fused node) against guide.distribution + variance + kl_divergence,
    in float64, with clamped log-scales and log alphas, weights of 0 and kl_weight != 1."""
    torch.manual_seed(0)
    net = BayesianNetwork([Linear(3, 4, prior={"type": "log_uniform"}, bias_prior=GaussianPrior(0.5, 0.2)),
                           ReLU(), Linear(4, 2)]).to(torch.float64)
    guide = MeanFieldGuide(net.model).setup(torch.randn(2, 3, dtype=torch.float64))
    guide.to(torch.float64)
    with torch.no_grad():
        guide.locs["fc1__weight"].copy_(torch.tensor([[0.3, -1.2, 0.0], [2.0, 0.05, -0.4],
                                                      [1e-9, 0.7, -0.01], [0.2, 0.2, 0.2]]))
        guide.log_scales["fc1__weight"].copy_(torch.tensor([[-2.0, 0.3, -1.0], [-13.0, -3.0, 5.0],
                                                            [-1.0, -12.5, -4.0], [-20.0, 4.5, -0.5]]))
        guide.log_scales["fc1__bias"].copy_(torch.tensor([-1.0, 0.5, -3.0, 6.0]))
    names = list(guide.sites)
    priors = {name: prior.site_prior(name, getattr(layer, f"{param}_init"), {})
              for name, (layer, param, prior) in net.param_sites().items()}
    terms = [kl_terms_for(priors[name]) for name in names]
    g = torch.Generator().manual_seed(5)
    weights = {name: torch.randn(guide.locs[name.replace(".", "__")].shape, generator=g, dtype=torch.float64)
               for name in names}

    keys = [name.replace(".", "__") for name in names]

    def fused_terms():
        return local_terms([guide.locs[k] for k in keys], [guide.log_scales[k] for k in keys], terms)

    def objective(fused):
        if fused:
            values, kl = fused_terms()
            variances = [v.var for v in values]
        else:
            qs = [guide.distribution(name) for name in names]
            variances = [q.variance for q in qs]
            kl = sum(kl_divergence(q, priors[name]).sum() for q, name in zip(qs, names))
        return 0.37 * kl + sum((v * weights[name]).sum() for v, name in zip(variances, names)), kl

    params = list(guide.parameters())
    (ref, kl_ref), (got, kl_got) = objective(False), objective(True)
    torch.testing.assert_close(kl_got, kl_ref, rtol=1e-12, atol=0.0)
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=0.0)
    for a, b in zip(torch.autograd.grad(got, params), torch.autograd.grad(ref, params)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    # the same with a KL gradient of exactly 1 (the unit shortcut in backward)
    got1 = fused_terms()[1]
    ref1 = sum(kl_divergence(guide.distribution(n), priors[n]).sum() for n in names)
    for a, b in zip(torch.autograd.grad(got1, params), torch.autograd.grad(ref1, params)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_kl_terms_are_the_partial_derivatives():
    """sparse_vd_kl_terms and normal_kl_terms return the KL and its exact partial derivatives."""
    loc = torch.tensor([0.3, -1.2, 1e-9, 2.0, 0.05, -0.7], dtype=torch.float64, requires_grad=True)
    ls = torch.tensor([-2.0, 0.3, -1.0, -12.0, -3.0, 1.1], dtype=torch.float64, requires_grad=True)
    kl, d_loc, d_ls = sparse_vd_kl_terms(loc, ls)
    ref = kl_divergence(torch.distributions.Normal(loc, ls.exp()), LogUniform(loc.shape))
    torch.testing.assert_close(kl, ref.detach(), rtol=1e-12, atol=1e-14)
    g = torch.autograd.grad(ref.sum(), [loc, ls])
    torch.testing.assert_close(d_loc, g[0], rtol=1e-9, atol=1e-14)
    torch.testing.assert_close(d_ls, g[1], rtol=1e-9, atol=1e-14)
    var = torch.exp(2 * ls)
    kl, d_loc, d_ls = normal_kl_terms(loc, ls, var.detach(), 0.4, 1.7)
    prior = torch.distributions.Normal(torch.tensor(0.4, dtype=torch.float64), torch.tensor(1.7, dtype=torch.float64))
    ref = kl_divergence(torch.distributions.Normal(loc, var.sqrt()), prior)
    torch.testing.assert_close(kl, ref.detach(), rtol=1e-12, atol=1e-14)
    g = torch.autograd.grad(ref.sum(), [loc, ls])
    torch.testing.assert_close(d_loc, g[0], rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(d_ls, g[1], rtol=1e-12, atol=1e-14)
    assert kl_terms_for(LogUniform((3,))) == SparseVDKLTerms()
    assert kl_terms_for(GaussianPrior(2.0, 0.5).site_prior("w", torch.zeros(4), {})) == NormalKLTerms(0.5, 2.0)
    per_element = torch.distributions.Normal(torch.zeros(4), torch.arange(1.0, 5.0))
    assert kl_terms_for(per_element) is None


@pytest.mark.parametrize("likelihood, y", [
    (Categorical(), torch.tensor([0, 2, 1, 1, 0])),
    (Bernoulli(), torch.tensor([0.0, 1.0, 1.0, 0.0, 1.0])),
    (Gaussian(noise=0.7), torch.linspace(-1, 1, 15).reshape(5, 3)),
])
def test_log_likelihood_is_the_observation_log_density(likelihood, y):
    torch.manual_seed(0)
    width = {Categorical: 3, Bernoulli: 1, Gaussian: 3}[type(likelihood)]
    out = torch.randn(5, width)
    expected = likelihood.distribution(out).log_prob(y).sum()
    torch.testing.assert_close(likelihood.log_likelihood(out, y), expected, rtol=1e-6, atol=0.0)


# ------------------------------------------------------------------ eligibility


class _ScaledPrior(Prior):
    """A prior that samples a hyper-site it does not declare: ``w ~ N(0, s^2)``, ``s ~ Gamma(2, 2)``
    emitted in its own ``sample``."""

    spec_name = "scaled"

    def sample(self, site, init, axes):
        s = sample_hyper(f"{site}.s", HyperSite(dist.Gamma(torch.tensor(2.0), torch.tensor(2.0)), torch.tensor(1.0)))
        return sample_weight(site, dist.Normal(torch.zeros_like(init), s.expand(init.shape)), init)


class _DeclaredScaledPrior(Prior):
    """The same prior, declared: one class with its hyper-site, site prior and nothing else."""

    spec_name = "scaled"
    conditional = True

    def hyper_sites(self, site, init, axes):
        return {f"{site}.s": HyperSite(dist.Gamma(torch.tensor(2.0), torch.tensor(2.0)), torch.tensor(1.0))}

    def site_prior(self, site, init, values):
        return dist.Normal(torch.zeros_like(init), values[f"{site}.s"].expand(init.shape))


class _NoisyLinear(Linear):
    """A layer that samples a site of its own besides its priors' (a multiplicative noise)."""

    def compute(self, x, weight, bias):
        import pyro

        gain = pyro.sample(f"{self.site}.gain", dist.LogNormal(torch.tensor(0.0), torch.tensor(0.1)))
        return super().compute(x, weight, bias) * gain


class _OwnModel(BayesianNetwork):
    def model(self, x, y=None, dataset_size=None, subsample=None):
        return super().model(x, y, dataset_size, subsample)


def _set_up(net, x, y):
    return net, MeanFieldGuide(net.model).setup(x, y)


def test_supports_names_what_the_core_cannot_read():
    """Only what bypasses the declarations stays on the Pyro path, and the reason names it: a prior
    with its own sample(), a site no prior declares, an overridden model()."""
    torch.manual_seed(0)
    x, y = torch.randn(5, 3), torch.randint(0, 2, (5,))
    net, guide = _set_up(BayesianNetwork([Linear(3, 4, prior=_ScaledPrior()), ReLU(), Linear(4, 2)]), x, y)
    assert "fc1.weight.s" in guide.sites
    assert CoreELBO.supports(net, guide) == ("the scaled prior of fc1.weight defines its own sample(): the core "
                                             "reads the sites a prior declares (hyper_sites, site_prior, parameter)")
    with pytest.raises(ValueError, match="CoreELBO does not apply: the scaled prior of fc1.weight"):
        CoreELBO().differentiable_loss(net, guide, x, y)
    net, guide = _set_up(BayesianNetwork([_NoisyLinear(3, 4), ReLU(), Linear(4, 2)]), x, y)
    reason = CoreELBO.supports(net, guide)
    assert reason.startswith("site 'fc1.gain' is declared by no prior and no likelihood"), reason
    net, guide = _set_up(_OwnModel([Linear(3, 4), ReLU(), Linear(4, 2)]), x, y)
    assert CoreELBO.supports(net, guide).startswith("_OwnModel overrides model()")
    # a network that only overrides forward runs on the core
    class Doubled(BayesianNetwork):
        def forward(self, x):
            return 2 * super().forward(x)

    net, guide = _set_up(Doubled([Linear(3, 4), ReLU(), Linear(4, 2)]), x, y)
    assert CoreELBO.supports(net, guide) is None


@pytest.mark.parametrize("beta", [0.4, 1.0])
def test_a_declared_prior_runs_on_the_core(beta):
    """The prior of _ScaledPrior written as declarations: the Pyro model derived from them and the
    core agree (a Gamma scale with a log-normal posterior: the fused hyper node)."""
    torch.manual_seed(0)
    x, y = torch.randn(12, 3), torch.randint(0, 2, (12,))
    net, guide = _set_up(BayesianNetwork([Linear(3, 4, prior=_DeclaredScaledPrior()), ReLU(), Linear(4, 2)]), x, y)
    assert CoreELBO.supports(net, guide) is None
    assert list(guide.sites)[:2] == ["fc1.weight.s", "fc1.weight"]
    assert CoreELBO().plan(net, guide).layout.names == ["fc1.weight.s"]
    perturb(guide)
    (l_ref, g_ref, _), (l_core, g_core, _) = both(net, guide, x, y, 120, torch.arange(12), beta)
    torch.testing.assert_close(l_core, l_ref, rtol=1e-5, atol=0.0)
    for a, b in zip(g_core, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6 * b.abs().max().item())


@pytest.mark.parametrize("guide_name", ["meanfield", "delta"])
def test_learned_likelihood_noise(guide_name):
    """A Gaussian likelihood with a learned noise scale (a half-normal hyper-site of the likelihood,
    no closed-form KL against a log-normal: the one-sample estimate) on the core and through Pyro."""
    from pyro_sparse.guides import build_guide

    torch.manual_seed(0)
    net = BayesianNetwork([Linear(3, 4), ReLU(), Linear(4, 2)], Gaussian(noise=0.5, learn_noise=True))
    x, y = torch.randn(10, 3), torch.randn(10, 2)
    guide = build_guide(guide_name, net.model).setup(x, y)
    assert "likelihood.noise" in guide.sites and CoreELBO.supports(net, guide) is None
    if guide_name == "meanfield":
        perturb(guide)
    local = guide_name == "meanfield"
    (l_ref, g_ref, t_ref), (l_core, g_core, t_core) = estimates(
        ((MeanFieldELBO(kl_weight=0.7, local_reparam=local), net.model, guide), (CoreELBO(kl_weight=0.7), net, guide)),
        x, y, 100, torch.arange(10), list(guide.parameters()))
    torch.testing.assert_close(l_core, l_ref, rtol=1e-5, atol=0.0)
    for a, b in zip(g_core, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6 * b.abs().max().item())
    noise_grad = g_core[[n for n, _ in guide.named_parameters()].index(
        "locs.likelihood__noise" if local else "values.likelihood__noise")]
    assert noise_grad.abs().item() > 0


@pytest.mark.parametrize("model", ["mlp_horseshoe.yaml", "mlp_group_loguniform.yaml", GAUSSIAN_GAMMA, LSTM_WGN,
                                   "vit_tiny_gaussian.yaml"])
def test_map_with_hyper_sites_and_any_layer(digits, model):
    """MAP (a point mass per site) of priors with hyper-sites and of recurrent and attention layers:
    the same objective on the core and through Pyro, hyper-sites scored by -log p at their point."""
    net, guide, _ = built(digits, model, "map.yaml")
    assert isinstance(guide, DeltaGuide) and CoreELBO.supports(net, guide) is None
    perturb_points(guide)
    idx = torch.arange(100, 132)
    x, y = digits.x_train[idx], digits.y_train[idx]
    (l_ref, g_ref, t_ref), (l_core, g_core, t_core) = estimates(
        ((MeanFieldELBO(kl_weight=0.6, local_reparam=False), net.model, guide), (CoreELBO(kl_weight=0.6), net, guide)),
        x, y, len(digits.x_train), idx, list(guide.parameters()))
    torch.testing.assert_close(l_core, l_ref, rtol=1e-5, atol=0.0)
    torch.testing.assert_close(t_core["kl"], t_ref["kl"], rtol=1e-5, atol=0.0)
    largest = max(g.abs().max().item() for g in g_ref)
    for a, b in zip(g_core, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6 * max(b.abs().max().item(), 3e-2 * largest))


# ------------------------------------------------------------------ the trainer


def trainer_for(digits, model, recipe, **overrides):
    spec = load_model_spec(spec_path(model)) if isinstance(model, str) else parse_model_spec(model)
    rec = load_recipe(recipe_path(recipe))
    rec.update(overrides)
    net, guide = build(spec, rec, digits)
    from pyro_sparse.runs import FITTERS

    return FITTERS[rec["method"]](net, guide, digits, rec, progress=False)


def test_trainer_chooses_the_path(digits):
    """Every shipped prior, guide and layer family fits on the core; ``elbo: pyro`` is the explicit
    reference; iterative BMR hands the core its masks."""
    import warnings

    from pyro_sparse.fitting import CoreFallbackWarning

    with warnings.catch_warnings():
        warnings.simplefilter("error", CoreFallbackWarning)  # none of these falls back
        for model, recipe, overrides in CASES.values():
            t = trainer_for(digits, model, recipe, **overrides)
            assert (t.elbo_path, t.elbo_reason, type(t.elbo)) == ("core", None, CoreELBO), (model, overrides)
        for model in ("mlp_gaussian.yaml", "lenet5_sparsevd.yaml", "mlp_horseshoe.yaml", GAUSSIAN_GAMMA, LSTM_WGN):
            t = trainer_for(digits, model, "map.yaml")
            assert (t.elbo_path, t.elbo_reason, type(t.elbo)) == ("core", None, CoreELBO)
        t = trainer_for(digits, "mlp_sparsevd.yaml", "svi_sparsevd.yaml", local_reparam=False)
        assert t.elbo_path == "core" and t.elbo.local_reparam is False
        t = trainer_for(digits, "mlp_gaussian.yaml", "svi_bmr_iterative.yaml")
        assert (t.elbo_path, t.elbo_reason, type(t.elbo)) == ("core", None, CoreELBO)
        assert t.elbo.masks is t.masks and t.elbo.pruned_scale == t.config["pruned_scale"] == 1e-6
        t = trainer_for(digits, "mlp_horseshoe.yaml", "svi_bmr_iterative.yaml", guide="structured")
        assert t.elbo_path == "core" and t.elbo.masks is t.masks
        for recipe in ("svi_sparsevd.yaml", "svi_bmr_iterative.yaml", "map.yaml"):
            t = trainer_for(digits, "mlp_gaussian.yaml", recipe, elbo="pyro")
            assert (t.elbo_path, type(t.elbo)) == ("pyro", MeanFieldELBO) and "elbo: pyro" in t.elbo_reason


def test_a_model_off_the_core_warns_at_start_up(digits):
    """No silent fallback: a prior that samples what it does not declare fits through Pyro, and the
    trainer says so once, naming the prior and the site; elbo: pyro says nothing."""
    import warnings

    from pyro_sparse.data import Dataset
    from pyro_sparse.fitting import CoreFallbackWarning, SVITrainer

    torch.manual_seed(0)
    rec = parse_recipe({"epochs": 1, "batch_size": 32})
    net = BayesianNetwork([Linear(64, 8, prior=_ScaledPrior()), ReLU(), Linear(8, 10)])
    with pytest.warns(CoreFallbackWarning) as caught:
        t = SVITrainer(net, MeanFieldGuide(net.model), digits, rec, progress=False)
    assert t.elbo_path == "pyro" and len(caught) == 1
    assert "the scaled prior of fc1.weight defines its own sample()" in str(caught[0].message)
    with warnings.catch_warnings():
        warnings.simplefilter("error", CoreFallbackWarning)
        net = BayesianNetwork([Linear(64, 8, prior=_ScaledPrior()), ReLU(), Linear(8, 10)])
        t = SVITrainer(net, MeanFieldGuide(net.model), digits, dict(rec, elbo="pyro"), progress=False)
        assert t.elbo_path == "pyro"
    assert isinstance(digits, Dataset)


def test_a_trainer_that_wraps_the_objective_otherwise_takes_the_pyro_path(digits):
    """Overriding ``objective`` without ``pruned_weights`` (an unknown wrapping) keeps the Pyro
    path, with a warning, for a subclass of SVITrainer and for one of IterativeBMRTrainer alike."""
    from pyro_sparse.fitting import CoreFallbackWarning, SVITrainer
    from pyro_sparse.iterative import IterativeBMRTrainer

    class Wrapped(SVITrainer):
        def objective(self):
            return pyro.poutine.scale(self.network.model, 0.5), self.guide

    class WrappedBMR(IterativeBMRTrainer):
        def objective(self):
            return pyro.poutine.scale(self._model, 0.5), self._guide

    spec = load_model_spec(spec_path("mlp_gaussian.yaml"))
    for cls in (Wrapped, WrappedBMR):
        rec = load_recipe(recipe_path("svi_bmr_iterative.yaml"))
        net, guide = build(spec, rec, digits)
        with pytest.warns(CoreFallbackWarning, match=f"{cls.__name__} wraps the model and guide"):
            t = cls(net, guide, digits, rec, progress=False)
        assert t.elbo_path == "pyro"
        assert t.elbo_reason == (f"{cls.__name__} wraps the model and guide (objective()) without describing it "
                                 "(pruned_weights())")


def _fit_on_both_paths(digits, spec, recipe, **overrides):
    """(history, final guide state, initial guide state) of a 2-epoch fit with ``elbo: auto``
    (direct) and with ``elbo: pyro``."""
    runs = []
    for path in ("auto", "pyro"):
        t = trainer_for(digits, spec, recipe, elbo=path, epochs=2, **overrides)
        init = {k: v.clone() for k, v in t.guide.state_dict().items()}
        assert t.fit()["elbo_path"] == ("core" if path == "auto" else "pyro")
        assert len(t.history) == 2
        runs.append((t.history, {k: v.clone() for k, v in t.guide.state_dict().items()}, init))
    return runs


@pytest.mark.parametrize("case", [CASES[k] for k in ("mlp_sparsevd", "mlp_group_loguniform", "mlp_horseshoe",
                                                     "gaussian_gamma", "horseshoe_structured", "lstm_wgn")],
                         ids=case_id)
def test_two_epochs_on_either_path_give_the_same_run(digits, case):
    """Same seed: the same mini-batches, the same noise, so the same history and parameters
    (KL warm-up, gradient clipping and the schedule included)."""
    model, recipe, overrides = case
    (h_direct, p_direct, _), (h_pyro, p_pyro, _) = _fit_on_both_paths(digits, model, recipe, eval_samples=2,
                                                                       **overrides)
    for a, b in zip(h_direct, h_pyro):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4)
        assert a["kl_weight"] == b["kl_weight"]
    assert h_direct[1]["loss"] != pytest.approx(h_direct[0]["loss"], rel=1e-3)  # it did train
    for key in p_pyro:
        torch.testing.assert_close(p_direct[key], p_pyro[key], rtol=1e-4, atol=1e-4)


def test_two_epochs_of_map_on_either_path_give_the_same_run(digits):
    """MAP (inference/map.yaml, cosine schedule, gradient clipping): the same mini-batches and the
    same objective, so the same history and parameters on both paths."""
    (h_direct, p_direct, init), (h_pyro, p_pyro, _) = _fit_on_both_paths(digits, "mlp_gaussian.yaml", "map.yaml")
    for a, b in zip(h_direct, h_pyro):
        for key in ("loss", "test_accuracy", "test_nll"):
            assert a[key] == pytest.approx(b[key], rel=1e-4), key
        assert a["kl_weight"] == b["kl_weight"]
    assert h_direct[1]["loss"] != pytest.approx(h_direct[0]["loss"], rel=1e-3)  # it did train
    for key in p_pyro:
        torch.testing.assert_close(p_direct[key], p_pyro[key], rtol=1e-4, atol=1e-5)
    moved = max((p_direct[k] - init[k]).abs().max().item() for k in init)
    assert moved > 1e-2  # the parameters moved far more than the tolerance


def test_bad_elbo_value_names_the_field():
    with pytest.raises(SpecError, match="elbo") as info:
        parse_recipe({"elbo": "fast"}, "recipe.yaml")
    assert "'auto'" in str(info.value) and "'pyro'" in str(info.value) and "'fast'" in str(info.value)
    assert parse_recipe({})["elbo"] == "auto"


def pruning_masks(guide, seed=5):
    """Bool masks (True = kept) for every weight site: about a third of the elements pruned at
    random and the whole first row of each pruned too."""
    g = torch.Generator().manual_seed(seed)
    masks = {}
    for name in guide.sites:
        if name.endswith(".weight"):
            shape = guide.locs[name.replace(".", "__")].shape
            mask = torch.rand(shape, generator=g) > 0.35
            mask[0] = False
            masks[name] = mask
    return masks


@pytest.mark.parametrize("case", [("mlp_gaussian.yaml", "svi_bmr_iterative.yaml", {}), CASES["gaussian_gamma"],
                                  CASES["mlp_horseshoe"], CASES["horseshoe_structured"], CASES["horseshoe_drawn"]],
                         ids=case_id)
@pytest.mark.parametrize("beta", [0.3, 1.0])
def test_pruned_weights_same_seed_same_loss_and_gradients(digits, case, beta):
    """Iterative BMR's masks: the direct path reduces masked elements to N(0, g0^2) in posterior
    and prior as ``PrunedWeights`` does on the Pyro path: same loss, terms and gradients, and
    exactly zero gradient for every pruned element on both paths."""
    from pyro_sparse.iterative import PrunedWeights

    g0 = 1e-6
    model, recipe, overrides = case
    net, guide, _ = built(digits, model, recipe, **overrides)
    perturb(guide)
    masks = pruning_masks(guide)
    assert len(masks) >= 2
    n = len(digits.x_train)
    idx = torch.arange(100, 164)
    x, y = digits.x_train[idx], digits.y_train[idx]
    pruner = PrunedWeights(masks, g0)
    (l_ref, g_ref, t_ref), (l_dir, g_dir, t_dir) = estimates(
        ((MeanFieldELBO(kl_weight=beta), pruner(net.model), pruner(guide)),
         (CoreELBO(kl_weight=beta, masks=masks, pruned_scale=g0), net, guide)),
        x, y, n, idx, list(guide.parameters()))
    torch.testing.assert_close(l_dir, l_ref, rtol=1e-5, atol=0.0)
    for key in ("loglik", "kl"):
        torch.testing.assert_close(t_dir[key], t_ref[key], rtol=1e-5, atol=0.0)
    names = [name for name, _ in guide.named_parameters()]
    largest = max(g.abs().max().item() for g in g_ref)  # float32 sums in another order: see above
    for name, a, b in zip(names, g_dir, g_ref):
        scale = b.abs().max().item()
        assert scale > 0, name
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6 * max(scale, 3e-2 * largest),
                                   msg=lambda m: f"{name}: {m}")
    for site, mask in masks.items():
        for kind in ("locs", "log_scales"):
            k = names.index(f"{kind}.{site.replace('.', '__')}")
            assert torch.equal(g_dir[k][~mask], torch.zeros(int((~mask).sum()))), (site, kind)
            assert torch.equal(g_ref[k][~mask], torch.zeros(int((~mask).sum()))), (site, kind)
            assert bool((g_dir[k][mask] != 0).any())
    # the masks matter: without them the estimate differs
    torch.manual_seed(11)
    plain = CoreELBO(kl_weight=beta).differentiable_loss(net, guide, x, y, dataset_size=n, subsample=idx)
    assert abs(plain.item() - l_dir.item()) > 1e-3 * abs(l_dir.item())
    # the dict is read at every call: emptied in place, the estimate is the unpruned one
    elbo = CoreELBO(kl_weight=beta, masks=masks, pruned_scale=g0)
    masks.clear()
    torch.manual_seed(11)
    again = elbo.differentiable_loss(net, guide, x, y, dataset_size=n, subsample=idx)
    assert again.item() == plain.item()


def test_pruned_weights_under_a_log_uniform_prior_fail_on_both_paths(digits):
    """PrunedWeights can only reduce Gaussian priors: with the log-uniform prior both paths
    raise the same error naming the site."""
    from pyro_sparse.errors import PyroSparseError
    from pyro_sparse.iterative import PrunedWeights

    net, guide, _ = built(digits, "mlp_sparsevd.yaml")
    masks = pruning_masks(guide)
    x, y = digits.x_train[:16], digits.y_train[:16]
    pruner = PrunedWeights(masks, 1e-6)
    messages = []
    for elbo, first, second in ((MeanFieldELBO(), pruner(net.model), pruner(guide)),
                                (CoreELBO(masks=masks, pruned_scale=1e-6), net, guide)):
        with pytest.raises(PyroSparseError, match="LogUniform distribution") as info:
            elbo.differentiable_loss(first, second, x, y)
        messages.append(str(info.value))
    assert messages[0] == messages[1]
    with pytest.raises(ValueError, match="pruned_scale"):
        CoreELBO(masks=masks, pruned_scale=0.0)
