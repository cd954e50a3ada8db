"""SpaM: online Laplace marglik training (LaplaceTrainer), the Laplace posterior summary, OPD masks.

Exact references: the Laplace evidence of Bayesian linear regression with an orthogonal design
is the exact evidence, and its maximiser over per-weight precisions is the ARD / relevance
vector solution in closed form; the per-weight optimum of the diagonal Laplace marglik is a root
of a quadratic; structured masks must act like physically removed units.
"""

import json
import os

import pytest
import torch
import yaml

from pyro_sparse.data import Dataset, load_digits
from pyro_sparse.errors import SpecError
from pyro_sparse.finetune import masked_fine_tune
from pyro_sparse.fitting import evaluate
from pyro_sparse.guides import DeltaGuide, MeanFieldGuide
from pyro_sparse.laplace.curvature import diag_ef, diag_ggn
from pyro_sparse.laplace.marglik import log_marglik_diag, optimize_prior_precision
from pyro_sparse.laplace.prior import make_prior_precision
from pyro_sparse.laplace.trainer import LaplaceTrainer, laplace_statistics
from pyro_sparse.layers import Conv2d, Flatten, Linear, ReLU
from pyro_sparse.likelihoods import Gaussian
from pyro_sparse.network import BayesianNetwork
from pyro_sparse.rebuild import compact
from pyro_sparse.recipe import parse_recipe
from pyro_sparse.reduction import bmr_diagonal_zero_mean, reduce, savage_dickey
from pyro_sparse.runs import build, fit_run, load_run, parse_specs
from pyro_sparse.summary import PosteriorSummary, SiteSummary

SMALL = {"layers": [{"type": "linear", "in": "auto", "out": 32}, {"type": "relu"},
                    {"type": "linear", "out": 16}, {"type": "relu"}, {"type": "linear", "out": "auto"}]}


def small_recipe(**laplace):
    options = {"structure": "parameterwise", "burn_in": 1, "marglik_frequency": 1, "hyper_steps": 5,
               "hyper_lr": 0.1, "curvature_subset": 256}
    options.update(laplace)
    return {"method": "laplace", "guide": "delta", "epochs": 4, "batch_size": 128,
            "optimizer": {"name": "Adam", "lr": 0.01}, "seed": 1, "laplace": options}


def make_trainer(digits, epochs=None, model=SMALL, **laplace):
    recipe = small_recipe(**laplace)
    if epochs:
        recipe["epochs"] = epochs
    spec, recipe = parse_specs(model, recipe)
    network, guide = build(spec, recipe, digits)
    return LaplaceTrainer(network, guide, digits, recipe, progress=False)


@pytest.fixture(scope="module")
def fitted(digits):
    trainer = make_trainer(digits, epochs=6)
    trainer.fit()
    return trainer


# --------------------------------------------------------------------------- runs, files, resume


def write_specs(tmp_path, **laplace):
    m, r = tmp_path / "m.yaml", tmp_path / "r.yaml"
    m.write_text(yaml.safe_dump(SMALL))
    r.write_text(yaml.safe_dump(small_recipe(**laplace)))
    return str(m), str(r)


def test_fit_writes_run_directory_and_resume_is_identical(tmp_path, interrupted_run):
    m, r = write_specs(tmp_path)
    _, straight = fit_run(m, r, "digits", str(tmp_path / "a"), progress=False)
    for name in ("model.yaml", "inference.yaml", "metrics.jsonl", "checkpoint.pt", "metrics.json", "run.json"):
        assert os.path.exists(tmp_path / "a" / name), name
    metrics = json.load(open(tmp_path / "a" / "metrics.json"))
    for key in ("test_accuracy", "test_nll", "epochs", "steps", "train_wall_seconds", "step_wall_ms", "n_params"):
        assert key in metrics, key
    assert metrics["method"] == "laplace" and metrics["epochs"] == 4 and metrics["steps"] == 4 * 12
    assert "elbo_path" not in metrics  # SpaM fits no ELBO
    assert metrics["n_params"] == 64 * 32 + 32 + 32 * 16 + 16 + 16 * 10 + 10
    assert metrics["test_accuracy"] > 0.85
    lines = [json.loads(line) for line in open(tmp_path / "a" / "metrics.jsonl")]
    assert [x["epoch"] for x in lines] == [1, 2, 3, 4]
    # burn-in 1, F = 1: a marglik step after epochs 2, 3, 4 only
    assert ["log_marglik" in x for x in lines] == [False, True, True, True]
    torch.load(tmp_path / "a" / "checkpoint.pt", weights_only=True)

    # interrupt after 2 epochs, then resume to 4
    resumed = interrupted_run(m, r, tmp_path / "b", 4)
    for key in ("test_accuracy", "test_nll", "epochs", "steps"):
        assert resumed[key] == straight[key], key
    b = [json.loads(line) for line in open(tmp_path / "b" / "metrics.jsonl")]
    for key in ("loss", "log_marglik", "log_prior_precision_mean", "test_nll"):
        assert [x.get(key) for x in lines] == [x.get(key) for x in b], key

    # the run reloads, and the delta guide mirrors the trained weights
    run = load_run(str(tmp_path / "a"))
    assert isinstance(run.trainer, LaplaceTrainer)
    assert run.trainer.evaluate() == {k: straight[k] for k in ("test_accuracy", "test_nll")}
    via_guide = evaluate(run.network, run.guide, run.dataset.x_test, run.dataset.y_test, num_samples=1)
    assert via_guide["test_accuracy"] == straight["test_accuracy"]
    assert via_guide["test_nll"] == pytest.approx(straight["test_nll"], rel=1e-5)


def test_recipe_and_setup_errors_name_the_field(digits):
    with pytest.raises(SpecError, match="laplace.hessian"):
        parse_recipe({"method": "laplace", "guide": "delta", "laplace": {"curvature": "kfac", "hessian": "ef"}})
    with pytest.raises(SpecError, match="laplace.structure"):
        parse_recipe({"method": "laplace", "guide": "delta", "laplace": {"structure": "rowwise"}})
    with pytest.raises(SpecError, match="laplace.mc_samples"):
        parse_recipe({"method": "laplace", "guide": "delta", "laplace": {"hessian": "ef", "mc_samples": 2}})
    with pytest.raises(SpecError, match="laplace.hyper_lr"):
        parse_recipe({"method": "laplace", "guide": "delta", "laplace": {"hyper_lr": -1}})
    spec, recipe = parse_specs(SMALL, dict(small_recipe(), guide="meanfield"))
    network, guide = build(spec, recipe, digits)
    assert isinstance(guide, MeanFieldGuide)
    with pytest.raises(SpecError, match="guide: delta"):
        LaplaceTrainer(network, guide, digits, recipe, progress=False)


def test_a_network_without_curvature_is_refused_at_start_up():
    """An LSTM has no Laplace curvature here: the trainer says so when it is built (the method
    field, the layer), not at its first marginal-likelihood step after the burn-in epochs."""
    seq = Dataset("sequences", torch.randn(40, 5, 3), torch.randint(0, 2, (40,)), torch.randn(10, 5, 3),
                  torch.randint(0, 2, (10,)), "classification", 2)
    spec = {"input_shape": [5, 3], "layers": [{"type": "lstm", "hidden_size": 4}, {"type": "linear", "out": 2}]}
    spec, recipe = parse_specs(spec, small_recipe())
    network, guide = build(spec, recipe, seq)
    with pytest.raises(SpecError,
                       match=r"method: the Laplace curvature cannot be computed.*lstm1.*declares no curvature"):
        LaplaceTrainer(network, guide, seq, recipe, progress=False)


def test_a_diverging_marglik_step_is_retried_with_a_lower_learning_rate(digits, monkeypatch):
    """NaN handling is SVITrainer's: restore the last good state, lower the learning rate, retry."""
    trainer = make_trainer(digits, epochs=3)
    original, calls = LaplaceTrainer.marglik_step, []

    def flaky(self):
        calls.append(self.epoch)
        if len(calls) == 1:
            with torch.no_grad():
                next(iter(self.prior.parameters())).fill_(float("nan"))
            raise FloatingPointError("non-finite log marginal likelihood")
        return original(self)

    monkeypatch.setattr(LaplaceTrainer, "marglik_step", flaky)
    trainer.fit()
    assert calls == [1, 1, 2]  # epoch 2's marglik step failed once, then epochs 2 and 3 went through
    assert trainer.epoch == 3 and all(torch.isfinite(p).all() for p in trainer.prior.parameters())
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(0.01 * 0.5)
    assert trainer.hyper_optimizer.param_groups[0]["lr"] == pytest.approx(0.1 * 0.5)
    assert [h["epoch"] for h in trainer.history] == [1, 2, 3]


# --------------------------------------------------------------------------- the marginal likelihood

SIGMA, N, D = 0.5, 20, 4


def regression_problem():
    """Orthogonal design with distinct column norms: X'X = diag(s^2), so the diagonal GGN is exact."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N, D, generator=g, dtype=torch.float64)
    x = torch.linalg.qr(x).Q * torch.tensor([3.0, 2.0, 1.5, 2.5], dtype=torch.float64)
    w = torch.tensor([1.0, -0.5, 0.5, 0.8], dtype=torch.float64)
    y = (x @ w + SIGMA * torch.randn(N, generator=g, dtype=torch.float64)).unsqueeze(1)
    return x, y


def exact_log_evidence(x, y, delta):
    cov = SIGMA**2 * torch.eye(N, dtype=x.dtype) + (x / delta) @ x.T
    return torch.distributions.MultivariateNormal(torch.zeros(N, dtype=x.dtype), cov).log_prob(y[:, 0])


def regression_trainer(x, y, **overrides):
    data = Dataset("linreg", x.float(), y.float(), x.float(), y.float(), "regression", 1)
    torch.manual_seed(0)
    network = BayesianNetwork([Linear(D, 1, bias=False)], likelihood=Gaussian(noise=SIGMA))
    recipe = {"method": "laplace", "guide": "delta", "epochs": 200, "batch_size": N, "eval_every": 1000,
              "optimizer": {"name": "Adam", "lr": 0.05}, "schedule": {"name": "cosine"},
              "laplace": {"structure": "parameterwise", "burn_in": 0, "marglik_frequency": 1, "hyper_steps": 20,
                          "hyper_lr": 0.1, "curvature_subset": None, **overrides}}
    return LaplaceTrainer(network, DeltaGuide(network.model), data, parse_recipe(recipe), progress=False)


@pytest.mark.parametrize("structure", ["scalar", "parameterwise", "unitwise"])
def test_trainer_marglik_is_the_exact_evidence_of_linear_regression(structure):
    """Through the trainer's own code path (deterministic twin, likelihood, curvature, prior)."""
    x, y = regression_problem()
    trainer = regression_trainer(x, y, structure=structure)
    with torch.no_grad():
        for p in trainer.prior.parameters():
            p.copy_(torch.linspace(-0.5, 1.0, p.numel()).reshape(p.shape))
    delta = trainer.prior.precision_dict()["fc1.weight"].detach().double().expand(1, D).reshape(-1)
    mode = torch.linalg.solve(x.T @ x / SIGMA**2 + torch.diag(delta), x.T @ y[:, 0] / SIGMA**2)
    with torch.no_grad():
        trainer.net.fc1.weight.copy_(mode.reshape(1, D))
    lml = trainer.log_marglik()
    assert lml.requires_grad  # differentiable in log delta
    assert lml.item() == pytest.approx(exact_log_evidence(x, y, delta).item(), rel=1e-5)


def test_trainer_finds_the_type2_maximum_likelihood_precisions():
    """ARD on an orthogonal design: log evidence = sum_j -0.5 log(sigma^2 + v_j) - 0.5 z_j^2 / (sigma^2 + v_j)
    + const with v_j = s_j^2 / delta_j, z_j = u_j'y; maximised at v_j = z_j^2 - sigma^2 (delta_j -> inf
    where that is negative). Online training must reach it: alternating exact MAP and exact marglik steps."""
    x, y = regression_problem()
    s2 = (x * x).sum(0)
    z = (x / s2.sqrt()).T @ y[:, 0]
    v = z.square() - SIGMA**2
    relevant = v > 0
    assert relevant.tolist() == [True, False, False, True]  # the draw has two irrelevant directions
    trainer = regression_trainer(x, y)
    trainer.fit()
    delta = trainer.prior.precision_dict()["fc1.weight"].detach().double().reshape(-1)
    torch.testing.assert_close(delta[relevant], s2[relevant] / v[relevant], rtol=2e-3, atol=0)
    assert (delta[~relevant] > 1e3).all()  # Occam's razor: the irrelevant weights are switched off
    best = torch.where(relevant, s2 / v.clamp_min(1e-12), torch.full_like(v, 1e8))
    assert trainer.history[-1]["log_marglik"] == pytest.approx(exact_log_evidence(x, y, best).item(), abs=1e-3)


def test_hyper_steps_raise_the_marglik_to_its_closed_form_optimum(fitted):
    """Diagonal GGN, per-weight precision: d/d delta [0.5 log delta - 0.5 log(H + delta) - 0.5 delta theta^2] = 0
    at delta* = (-H + sqrt(H^2 + 4 H / theta^2)) / 2; the Laplace marglik is concave in log delta."""
    net = fitted.net
    theta = {k: p.detach().double() for k, p in net.named_parameters()}
    h = {k: v.double() for k, v in diag_ggn(net, fitted.x_train, None, "categorical").items()}
    prior = make_prior_precision("parameterwise", net, init=1.0).double()
    optimizer = torch.optim.Adam(prior.parameters(), lr=0.1)
    trajectory = optimize_prior_precision(torch.tensor(-100.0, dtype=torch.float64), theta, h, prior, optimizer, 1500)
    assert trajectory[-1] > trajectory[0] + 100
    assert (trajectory.diff() > -1e-6 * trajectory.abs()[1:]).float().mean() > 0.99
    # the flat fast path and the general formula agree
    assert trajectory[-1].item() == pytest.approx(
        log_marglik_diag(torch.tensor(-100.0, dtype=torch.float64), theta, h, prior).item(), rel=1e-12)
    for name in ("fc2.weight", "fc3.bias"):
        hh, t2 = h[name], theta[name].square()
        ok = (hh > 1e-3) & (t2 > 1e-6)  # where the optimum is finite and reached in 1500 steps
        best = (-hh + (hh.square() + 4 * hh / t2).sqrt()) / 2
        got = prior.precision_dict()[name].detach()
        torch.testing.assert_close(got[ok], best[ok], rtol=2e-2, atol=0)


def test_log_delta_moves_and_every_marglik_step_raises_the_marglik(fitted, digits):
    init = make_prior_precision("parameterwise", fitted.net, init=1.0)
    moved = [(p - q).abs().max().item() for p, q in zip(fitted.prior.parameters(), init.parameters())]
    assert min(moved) > 0.1
    steps = [h for h in fitted.history if "log_marglik" in h]
    assert len(steps) == 5
    for h in steps:
        assert h["log_marglik"] > h["log_marglik_start"]
    # KFAC and the empirical Fisher train as well
    for options in ({"curvature": "kfac", "structure": "unitwise"}, {"hessian": "ef", "structure": "layerwise"}):
        trainer = make_trainer(digits, epochs=3, **options)
        trainer.fit()
        steps = [h for h in trainer.history if "log_marglik" in h]
        assert steps and all(h["log_marglik"] > h["log_marglik_start"] for h in steps), options


def test_subset_curvature_is_the_rescaled_curvature_of_the_subset(fitted):
    x, y, lik = fitted.x_train, fitted.data.y_train, fitted.likelihood
    full, ll = laplace_statistics(fitted.net, x, y, lik)
    torch.testing.assert_close(full["fc1.weight"], diag_ggn(fitted.net, x, None, "categorical")["fc1.weight"])
    idx = torch.randperm(len(x), generator=torch.Generator().manual_seed(3))[:100]
    sub, ll_sub = laplace_statistics(fitted.net, x, y, lik, rows=idx)
    ref = diag_ggn(fitted.net, x[idx], None, "categorical")
    for name in full:
        torch.testing.assert_close(sub[name], ref[name] * len(x) / 100)
    torch.testing.assert_close(ll_sub, ll)  # the log-likelihood always runs over every row
    kfac, _ = laplace_statistics(fitted.net, x, y, lik, curvature="kfac", rows=idx)
    assert set(kfac) == {"fc1", "fc2", "fc3"}


# --------------------------------------------------------------------------- the posterior summary


def test_summary_sites_shapes_and_precisions(fitted):
    summary = fitted.posterior_summary()
    network = fitted.network
    assert list(summary) == list(network.param_sites()) == ["fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias",
                                                            "fc3.weight", "fc3.bias"]
    ggn = diag_ggn(fitted.net, fitted.x_train, None, "categorical")
    deltas = fitted.prior.precision_dict()
    params = dict(fitted.net.named_parameters())
    for name, site in summary.items():
        layer, param = name.split(".")
        assert (site.layer, site.param) == (layer, param)
        assert site.loc.shape == params[name].shape == site.precision.shape
        torch.testing.assert_close(site.loc, params[name].detach())
        torch.testing.assert_close(site.precision, ggn[name] + deltas[name].detach())  # P = H + delta
        torch.testing.assert_close(site.prior_precision, deltas[name].detach().expand(site.loc.shape))
        assert float(site.prior_loc) == 0.0
        assert site.axes == network.param_sites()[name][0].param_axes[param]
        # every reduction rule runs on it unchanged
        assert torch.isfinite(savage_dickey(site.loc, site.precision, site.prior_loc, site.prior_precision)).all()
        bmr = bmr_diagonal_zero_mean(site.loc, site.precision, site.prior_precision.rsqrt(), 1e-3)
        assert bmr.shape == site.loc.shape
    assert summary.method == "laplace-parameterwise-diag"
    assert not any(site.marginal for site in summary.values())  # a diagonal curvature: conditional precisions
    assert summary.num_weights() == network.num_weights()
    # the empirical-Fisher recipe summarises with the empirical Fisher
    ef = make_trainer(fitted.data, epochs=1, hessian="ef")
    ef.net.load_state_dict(fitted.net.state_dict())
    ef.prior.load_state_dict(fitted.prior.state_dict())
    reference = diag_ef(ef.net, ef.x_train, ef.data.y_train, "categorical")
    torch.testing.assert_close(ef.posterior_summary()["fc2.weight"].precision,
                               reference["fc2.weight"] + deltas["fc2.weight"].detach())


# --------------------------------------------------------------------------- pruning


def test_unstructured_opd_removes_the_lowest_scores(fitted):
    """OPD on the Laplace summary is the library's one ``opd`` rule: the lowest P theta^2 of the
    weights go (biases are kept)."""
    summary = fitted.posterior_summary()
    d = reduce(summary, "opd", sparsity=0.9)
    assert d.sparsity == pytest.approx(0.9, abs=1e-4)
    weights = [k for k in summary if k.endswith("weight")]
    scores = torch.cat([(summary[k].precision * summary[k].loc.square()).reshape(-1) for k in weights])
    kept = torch.cat([d.masks[k].reshape(-1) for k in weights])
    assert scores[kept].min() >= scores[~kept].max()
    assert all(bool(d.masks[k].all()) for k in summary if k.endswith("bias"))


def test_structured_masks_remove_whole_units(fitted):
    summary = fitted.posterior_summary()
    d = reduce(summary, "opd", sparsity=0.5, structured=True)
    masks = d.masks
    w1, b1, w2, b2, w3 = (masks[k] for k in ("fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias", "fc3.weight"))
    keep1, keep2 = d.units["fc1"], d.units["fc2"]
    assert (w1 == keep1[:, None]).all() and (b1 == keep1).all()  # whole rows, bias with its row
    assert (w2 == keep2[:, None]).all() and (b2 == keep2).all()
    assert int(keep1.sum()) == 16 and int(keep2.sum()) == 8 and masks["fc3.bias"].all() and w3.all()
    # the removed units are the lowest S_g = sum over the row and bias of P theta^2
    s1 = (summary["fc1.weight"].precision * summary["fc1.weight"].loc.square()).sum(1) \
        + summary["fc1.bias"].precision * summary["fc1.bias"].loc.square()
    assert s1[keep1].min() >= s1[~keep1].max()
    # masking acts exactly like physically removing the units, and compaction removes them
    module = compact(fitted.network, summary, d)
    assert module.fc1.out_features == 16 and module.fc2.in_features == 16 and module.fc2.out_features == 8
    pruned = fitted.pruned(masks)
    torch.testing.assert_close(module(fitted.x_test), pruned(fitted.x_test).detach(), rtol=1e-5, atol=1e-5)
    p = dict(fitted.net.named_parameters())
    h = torch.relu(fitted.x_test @ p["fc1.weight"][keep1].T + p["fc1.bias"][keep1])
    h = torch.relu(h @ p["fc2.weight"][keep2][:, keep1].T + p["fc2.bias"][keep2])
    small = h @ p["fc3.weight"][:, keep2].T + p["fc3.bias"]
    torch.testing.assert_close(pruned(fitted.x_test), small.detach(), rtol=1e-5, atol=1e-5)


def test_structured_reduction_follows_channels_through_flatten():
    """A removed conv channel takes its block of H*W columns of the next linear layer with it."""
    torch.manual_seed(0)
    network = BayesianNetwork([Conv2d(1, 4, 3), ReLU(), Flatten(), Linear(4 * 6 * 6, 10)], input_shape=(1, 8, 8))
    values = {f"{layer}.{param}": getattr(network.layers[layer], f"{param}_init")
              for layer in ("conv1", "fc1") for param in ("weight", "bias")}
    summary = PosteriorSummary()
    for name, (layer, param, _) in network.param_sites().items():
        v = values[name]
        summary[name] = SiteSummary(layer.site, param, v, torch.ones_like(v), torch.zeros(()), torch.ones(()),
                                    dict(layer.param_axes[param]))
    d = reduce(summary, "magnitude", sparsity=0.5, structured=True)
    keep = d.units["conv1"]
    assert int(keep.sum()) == 2
    module = compact(network, summary, d)
    assert module.conv1.out_channels == 2 and module.fc1.in_features == 2 * 36
    x = torch.rand(5, 1, 8, 8)
    conv = torch.nn.functional.conv2d(x, values["conv1.weight"][keep], values["conv1.bias"][keep])
    small = torch.relu(conv).flatten(1) @ values["fc1.weight"].reshape(10, 4, 36)[:, keep].reshape(10, -1).T \
        + values["fc1.bias"]
    torch.testing.assert_close(module(x), small.detach(), rtol=1e-5, atol=1e-5)


def test_masked_fine_tune_keeps_pruned_weights_at_zero(fitted):
    summary = fitted.posterior_summary()
    masks = reduce(summary, "random", sparsity=0.8, seed=0).masks
    before = {k: p.detach().clone() for k, p in fitted.net.named_parameters()}
    pruned = fitted.pruned(masks)
    tuned = fitted.pruned(masks, fine_tune_epochs=5, lr=3e-3)
    changed, kept = 0, 0
    for name, p in tuned.named_parameters():
        assert (p[~masks[name]] == 0).all(), name
        changed += int((p != dict(pruned.named_parameters())[name])[masks[name]].sum())
        kept += int(masks[name].sum())
    assert changed > 0.9 * kept  # the kept weights did train
    for name, p in fitted.net.named_parameters():  # the trainer's network is untouched
        assert torch.equal(p, before[name])
    assert fitted.evaluate_model(tuned)["test_nll"] < fitted.evaluate_model(pruned)["test_nll"]
    with pytest.raises(ValueError, match="epochs"):
        masked_fine_tune(pruned, masks, fitted.x_train, fitted.data.y_train, fitted.likelihood, epochs=-1)


def test_the_rules_score_the_laplace_summary(fitted):
    summary = fitted.posterior_summary()
    s = summary["fc2.weight"]
    torch.testing.assert_close(reduce(summary, "opd", sparsity=0.5).scores["fc2.weight"], s.precision * s.loc.square())
    torch.testing.assert_close(reduce(summary, "magnitude", sparsity=0.5).scores["fc2.weight"], s.loc.abs())
    a, b = (reduce(summary, "random", sparsity=0.5, seed=1).scores for _ in range(2))
    assert all(torch.equal(a[k], b[k]) for k in a)


# --------------------------------------------------------------------------- convergence


@pytest.mark.slow
def test_spam_opd_keeps_accuracy_at_high_sparsity(root):
    """Digits MLP 64-300-100-10 with the shipped recipe: SpaM + OPD at 95% sparsity keeps >= 0.93
    accuracy and beats magnitude pruning of the MAP network (same loop, fixed prior) at 90/95/98%."""
    data = load_digits()
    spec = yaml.safe_load(open(os.path.join(root, "models", "mlp_gaussian.yaml")))
    recipe = yaml.safe_load(open(os.path.join(root, "inference", "laplace_marglik.yaml")))
    trainers = {}
    for name, hyper_steps in (("map", 0), ("spam", recipe["laplace"]["hyper_steps"])):
        r = dict(recipe, laplace=dict(recipe["laplace"], hyper_steps=hyper_steps), eval_every=1000)
        m, r = parse_specs(spec, r)
        network, guide = build(m, r, data)
        trainers[name] = LaplaceTrainer(network, guide, data, r, progress=False)
        trainers[name].fit()
    spam, map_ = trainers["spam"], trainers["map"]
    s_spam, s_map = spam.posterior_summary(), map_.posterior_summary()
    acc = {}
    for sparsity in (0.9, 0.95, 0.98):
        acc["spam", sparsity] = spam.evaluate_model(spam.pruned(reduce(s_spam, "opd", sparsity=sparsity).masks))[
            "test_accuracy"]
        acc["map", sparsity] = map_.evaluate_model(map_.pruned(reduce(s_map, "magnitude", sparsity=sparsity).masks))[
            "test_accuracy"]
    assert acc["spam", 0.95] >= 0.93, acc
    for sparsity in (0.9, 0.95, 0.98):
        assert acc["spam", sparsity] > acc["map", sparsity], acc


def test_a_nan_map_step_is_caught_at_that_step_before_the_update(digits, monkeypatch):
    """The MAP phase checks every step (on the CPU): the fault names its step and no NaN reaches
    the weights; the epoch is retried from the last good state."""
    trainer = make_trainer(digits, epochs=2)
    original, calls = LaplaceTrainer.map_loss, []

    def poisoned(self, idx):
        calls.append(self.steps)
        loss = original(self, idx)
        return loss * float("nan") if len(calls) == 3 else loss

    monkeypatch.setattr(LaplaceTrainer, "map_loss", poisoned)
    trainer.fit()
    fault = trainer._last_fault
    assert (fault.what, fault.step, fault.epoch, fault.batch) == ("loss", 3, 1, 3)
    assert trainer.epoch == 2 and all(torch.isfinite(p).all() for p in trainer.net.parameters())
