"""ArviZ diagnostics: InferenceData layout, log-likelihood against the network, PSIS-LOO against
exact leave-one-out, shrinkage factors against the normal-means posterior, report and compare."""

import json
import math
import os
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
import yaml

with warnings.catch_warnings():
    warnings.simplefilter("ignore", FutureWarning)
    import arviz as az

from pyro_sparse import diagnostics as D
from pyro_sparse.cli import main
from pyro_sparse.guides import MeanFieldGuide
from pyro_sparse.layers import Conv2d, Flatten, Linear, ReLU
from pyro_sparse.likelihoods import Gaussian as GaussianLikelihood
from pyro_sparse.network import BayesianNetwork
from pyro_sparse.priors import Gaussian, GaussianGamma
from pyro_sparse.runs import fit_run, load_run

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TINY = {"layers": [{"type": "linear", "in": "auto", "out": 16}, {"type": "relu"}, {"type": "linear", "out": "auto"}],
        "bias_prior": {"type": "gaussian", "scale": 1.0}}
RECIPE = {"epochs": 3, "batch_size": 256, "optimizer": {"name": "Adam", "lr": 0.01}, "kl_warmup_epochs": 1,
          "eval_samples": 2, "seed": 0}
DRAWS = 20


def _fit(base, name, prior):
    spec = dict(TINY, name=name, prior=prior)
    m, r = base / f"{name}.yaml", base / f"{name}-recipe.yaml"
    m.write_text(yaml.safe_dump(spec))
    r.write_text(yaml.safe_dump(RECIPE))
    out = str(base / name)
    fit_run(str(m), str(r), "digits", out, progress=False)
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two tiny digits runs, each with a report of 20 draws: Sparse VD and unit-wise Gaussian-gamma."""
    torch.set_num_threads(1)
    base = tmp_path_factory.mktemp("diag")
    svd = _fit(base, "svd", {"type": "log_uniform"})
    gg = _fit(base, "gg", {"type": "gaussian_gamma", "group": "unit"})
    for d in (svd, gg):
        assert main(["report", d, "--samples", str(DRAWS)]) == 0
    return {"svd": svd, "gg": gg}


# ----------------------------------------------------------------------------- posterior.nc


def test_posterior_nc_groups_dims_coords(runs):
    idata = az.from_netcdf(os.path.join(runs["gg"], "posterior.nc"))
    for group in ("posterior", "log_likelihood", "posterior_predictive", "observed_data", "sample_stats",
                  "variational", "fit_history"):
        assert group in idata.groups(), group
    post = idata.posterior
    assert post.sizes["chain"] == 1 and post.sizes["draw"] == DRAWS
    assert post["fc1.weight"].dims == ("chain", "draw", "fc1_unit", "fc1_input")
    assert post["fc1.weight"].shape == (1, DRAWS, 16, 64)
    assert post["fc2.weight"].dims == ("chain", "draw", "fc2_unit", "fc2_input")
    assert post["fc1.bias"].dims == ("chain", "draw", "fc1_unit")
    # the unit precision (16, 1) keeps the unit dim, drops the singleton; its site shape is recorded
    assert post["fc1.weight.unit_precision"].dims == ("chain", "draw", "fc1_unit")
    assert list(post["fc1.weight.unit_precision"].attrs["site_shape"]) == [16, 1]
    assert post["fc1.weight.kappa"].dims == ("chain", "draw", "fc1_unit")
    np.testing.assert_array_equal(post["fc1_unit"], np.arange(16))
    np.testing.assert_array_equal(post["fc1_input"], np.arange(64))
    run = load_run(runs["gg"])
    n = len(run.dataset.y_train)
    assert idata.log_likelihood["obs"].dims == ("chain", "draw", "obs_id")
    assert idata.log_likelihood["obs"].shape == (1, DRAWS, n)
    np.testing.assert_array_equal(idata.observed_data["obs"], run.dataset.y_train.numpy())
    assert idata.posterior_predictive["obs"].shape == (1, DRAWS, n)
    assert set(np.unique(idata.posterior_predictive["obs"])) <= set(range(10))
    assert idata.variational["fc1.weight.log_alpha"].dims == ("fc1_unit", "fc1_input")
    np.testing.assert_array_equal(idata.fit_history["epoch"], [1, 2, 3])
    attrs = D.attributes(idata)
    assert attrs["method"] == "svi-meanfield" and attrs["observations"] == "train"
    assert attrs["priors"]["fc1.weight"] == {"type": "gaussian_gamma", "concentration": 2.0, "rate": 2.0,
                                             "group": "unit"}
    assert attrs["params_total"] == 64 * 16 + 16 + 16 * 10 + 10 and attrs["weights_total"] == 64 * 16 + 16 * 10
    assert attrs["rule_sparsity"] == 0.0 and attrs["sparsity"] == 0.0  # the dense model, as the report wrote it


def test_loo_and_summary_on_the_saved_file(runs):
    idata = az.from_netcdf(os.path.join(runs["svd"], "posterior.nc"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = az.loo(idata, pointwise=True)
        table = az.summary(idata, var_names=["fc2.bias"], round_to="none")
    ll = np.asarray(idata.log_likelihood["obs"])[0]  # (S, N)
    lppd = np.sum(np.log(np.mean(np.exp(ll), axis=0)))
    assert res.elpd_loo + res.p_loo == pytest.approx(lppd, rel=1e-9)  # ArviZ's identity, on our numbers
    assert res.elpd_loo <= lppd  # leaving a point out never raises its predictive density here
    draws = np.asarray(idata.posterior["fc2.bias"])[0]
    np.testing.assert_allclose(table["mean"].to_numpy(), draws.mean(0), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(table["sd"].to_numpy(), draws.std(0, ddof=1), rtol=1e-4)
    ours = D.loo(idata)
    assert ours["elpd_loo"] == pytest.approx(res.elpd_loo) and len(ours["pareto_k"]) == ll.shape[1]


def test_log_likelihood_is_the_network_at_the_stored_draws(runs):
    run = load_run(runs["svd"])
    idata = D.load(os.path.join(runs["svd"], "posterior.nc"))
    x, y = run.dataset.x_train, run.dataset.y_train
    for s in (0, DRAWS - 1):
        params = {k: torch.as_tensor(np.asarray(idata.posterior[k])[0, s]) for k in run.network.param_sites()}
        with torch.no_grad():
            logits = run.network.deterministic(params)(x)
        expected = torch.log_softmax(logits, -1).gather(1, y[:, None])[:, 0]
        np.testing.assert_allclose(np.asarray(idata.log_likelihood["obs"])[0, s], expected.numpy(),
                                   rtol=1e-5, atol=1e-5)


def test_masked_draws_are_zero_and_the_loglik_follows(runs):
    run = load_run(runs["svd"])
    torch.manual_seed(3)
    masks = {"fc1.weight": torch.rand(16, 64) < 0.3, "fc2.weight": torch.zeros(10, 16, dtype=torch.bool)}
    masks["fc2.weight"][:, :4] = True
    idata = D.run_inference_data(run, 5, masks=masks)
    w1 = np.asarray(idata.posterior["fc1.weight"])[0]
    assert np.all(w1[:, ~masks["fc1.weight"].numpy()] == 0) and np.all(w1[:, masks["fc1.weight"].numpy()] != 0)
    a = D.attributes(idata)
    kept = int(masks["fc1.weight"].sum()) + 40
    assert a["params_nonzero"] == kept + 16 + 10 and a["weights_kept"] == kept and a["masked"] == 1
    assert a["rule_sparsity"] == pytest.approx(1 - a["weights_kept"] / a["weights_total"])
    assert "lp" not in idata.sample_stats  # no joint density for a reduced model
    params = {k: torch.as_tensor(np.asarray(idata.posterior[k])[0, 2]) for k in run.network.param_sites()}
    with torch.no_grad():
        logits = run.network.deterministic(params)(run.dataset.x_train)
    expected = torch.log_softmax(logits, -1).gather(1, run.dataset.y_train[:, None])[:, 0]
    np.testing.assert_allclose(np.asarray(idata.log_likelihood["obs"])[0, 2], expected.numpy(), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="fc9.weight"):
        D.run_inference_data(run, 2, masks={"fc9.weight": masks["fc1.weight"]})
    with pytest.raises(ValueError, match=r"masks\['fc1.weight'\].*broadcast"):
        D.run_inference_data(run, 2, masks={"fc1.weight": torch.ones(3, dtype=torch.bool)})


# ----------------------------------------------------------------------------- exact LOO


def _conjugate(shift_sd=0.0, widen=1.0):
    """y_n = w x_n + N(0, 0.5^2), w ~ N(0, 1): q set to the exact posterior (optionally off)."""
    torch.manual_seed(0)
    n, sigma = 20, 0.5
    x = torch.linspace(-1, 1, n).reshape(n, 1)
    y = 0.8 * x + sigma * torch.randn(n, 1)
    y[3] += 2.0  # one influential point
    net = BayesianNetwork([Linear(1, 1, bias=False, prior=Gaussian(scale=1.0))],
                          likelihood=GaussianLikelihood(noise=sigma), input_shape=(1,))
    guide = MeanFieldGuide(net.model).setup(x, y)
    xs, ys = x[:, 0].double(), y[:, 0].double()
    P = 1.0 + (xs ** 2).sum() / sigma ** 2
    mu = (xs * ys).sum() / sigma ** 2 / P
    with torch.no_grad():
        guide.locs["fc1__weight"].fill_(mu.item() + shift_sd * P.item() ** -0.5)
        guide.log_scales["fc1__weight"].fill_(math.log(widen) - 0.5 * math.log(P.item()))
    # exact leave-one-out predictive: p(y_i | y_-i) = N(x_i mu_-i, sigma^2 + x_i^2 / P_-i)
    P_i = P - xs ** 2 / sigma ** 2
    mu_i = ((xs * ys).sum() - xs * ys) / sigma ** 2 / P_i
    var = sigma ** 2 + xs ** 2 / P_i
    exact = (-0.5 * torch.log(2 * math.pi * var) - 0.5 * (ys - xs * mu_i) ** 2 / var).sum().item()
    return net, guide, (x, y), exact


def _is_standard_error(idata):
    """Delta-method MC standard error of the (unsmoothed) importance-sampling LOO sum."""
    ll = np.asarray(idata.log_likelihood["obs"])[0]
    lr = np.asarray(idata.sample_stats["log_importance_ratio"]).reshape(-1)
    den = np.exp(lr - lr.max())[:, None] / np.exp(ll)
    se_i = den.std(0) / np.sqrt(len(lr)) / den.mean(0)
    return float(np.sqrt((se_i ** 2).sum()))


def test_psis_loo_matches_exact_leave_one_out_when_q_is_the_posterior():
    net, guide, data, exact = _conjugate()
    idata = D.to_inference_data(net, guide, data, num_samples=1000, seed=1)
    tol = 4 * _is_standard_error(idata)
    assert 0.01 < tol < 0.5
    assert D.loo(idata)["elpd_loo"] == pytest.approx(exact, abs=tol)
    corrected = D.importance_corrected_loo(idata)
    assert corrected["elpd_loo"] == pytest.approx(exact, abs=tol)
    assert corrected["vi_pareto_k"] < 0.5 and corrected["reliable"]


def test_importance_correction_recovers_exact_loo_from_a_wrong_q():
    """q wider and shifted: the uncorrected PSIS-LOO is off, the corrected one is not."""
    net, guide, data, exact = _conjugate(shift_sd=0.3, widen=1.5)
    idata = D.to_inference_data(net, guide, data, num_samples=1000, seed=1)
    tol = 4 * _is_standard_error(idata)
    plain, corrected = D.loo(idata)["elpd_loo"], D.importance_corrected_loo(idata)
    assert abs(plain - exact) > 5 * tol
    assert corrected["elpd_loo"] == pytest.approx(exact, abs=tol) and corrected["reliable"]


def test_no_correction_under_an_improper_prior(runs):
    idata = D.load(os.path.join(runs["svd"], "posterior.nc"))
    assert D.attributes(idata)["improper_prior_sites"] == ["fc1.weight", "fc2.weight"]
    res = D.importance_corrected_loo(idata)
    assert math.isnan(res["elpd_loo"]) and not res["reliable"]


# ----------------------------------------------------------------------------- shrinkage and dims


def test_shrinkage_is_the_normal_means_posterior_weight():
    """w_hat ~ N(w, 1/h), w ~ N(0, s^2): E[w | w_hat] = (1 - kappa) w_hat with kappa = 1/(1 + h s^2)."""
    prior = GaussianGamma(group="unit")
    precision = torch.tensor([[0.5], [4.0], [100.0]])  # lambda_g: s_g = lambda_g^-1/2 per unit
    h = torch.tensor([[1.0, 3.0], [0.2, 0.2], [10.0, 30.0]])  # data precision per weight
    kappa = D.shrinkage(prior, "fc1.weight", {"fc1.weight.unit_precision": precision}, h)
    assert kappa.shape == (3, 1)
    h_bar = h.mean(1, keepdim=True)
    w_hat = torch.tensor([[1.3], [-0.7], [2.0]])
    posterior_mean = h_bar * w_hat / (h_bar + precision)  # conjugate normal-normal update
    torch.testing.assert_close((1 - kappa) * w_hat, posterior_mean)
    # a layer-wide scale averages the data precision over the whole tensor
    k_layer = D.shrinkage(GaussianGamma(group="layer"), "fc1.weight",
                          {"fc1.weight.layer_precision": torch.tensor([[2.0]])}, h)
    torch.testing.assert_close(k_layer, 1 / (1 + h.mean() / 2.0).reshape(1, 1))


def test_site_dims_follow_param_axes():
    net = BayesianNetwork([Conv2d(1, 4, 3, prior=GaussianGamma(group="unit")), ReLU(), Flatten(),
                           Linear(4 * 6 * 6, 5)], likelihood=GaussianLikelihood(learn_noise=True),
                          input_shape=(1, 8, 8))
    shapes = {"conv1.weight.unit_precision": (4, 1, 1, 1), "conv1.weight": (4, 1, 3, 3), "conv1.bias": (4,),
              "fc1.weight": (5, 144), "fc1.bias": (5,), "likelihood.noise": (1,), "conv1.z_gate": (4,),
              "fc1.z": (7,)}
    dims = D.site_dims(net, shapes)
    assert dims["conv1.weight"] == ["conv1_unit", "conv1_input", "conv1_weight_dim2", "conv1_weight_dim3"]
    assert dims["conv1.bias"] == ["conv1_unit"]
    assert dims["conv1.weight.unit_precision"] == ["conv1_unit", None, None, None]
    assert dims["fc1.weight"] == ["fc1_unit", "fc1_input"]
    assert dims["likelihood.noise"] == [None]
    assert dims["conv1.z_gate"] == ["conv1_unit"]  # a layer's group variable, matched by size
    assert dims["fc1.z"] == ["fc1_z_dim0"]  # no axis of that size: its own dim


def test_conv_network_to_inference_data_squeezes_group_scales():
    torch.manual_seed(0)
    net = BayesianNetwork([Conv2d(1, 3, 3, prior=GaussianGamma(group="unit")), Flatten(), Linear(3 * 6 * 6, 4)],
                          input_shape=(1, 8, 8))
    x, y = torch.randn(12, 64), torch.randint(0, 4, (12,))
    guide = MeanFieldGuide(net.model).setup(x, y)
    idata = D.to_inference_data(net, guide, (x, y), num_samples=4)
    assert idata.posterior["conv1.weight"].dims == ("chain", "draw", "conv1_unit", "conv1_input",
                                                    "conv1_weight_dim2", "conv1_weight_dim3")
    assert idata.posterior["conv1.weight.unit_precision"].dims == ("chain", "draw", "conv1_unit")
    assert idata.posterior["conv1.weight.kappa"].shape == (1, 4, 3)


# ----------------------------------------------------------------------------- reports and compare


def test_report_files_and_links(runs):
    d = runs["svd"]
    text = open(os.path.join(d, "report.md")).read()
    for png in ("training.png", "scores.png", "sparsity.png", "accuracy_vs_sparsity.png", "forest.png"):
        assert os.path.getsize(os.path.join(d, png)) > 10_000, png
        assert f"]({png})" in text
    assert os.path.exists(os.path.join(d, "posterior-log-alpha-t3.nc"))  # the name reduce gives its files
    reduced = D.load(os.path.join(d, "posterior-log-alpha-t3.nc"))
    la = np.asarray(D.load(os.path.join(d, "posterior.nc")).variational["fc1.weight.log_alpha"])
    w = np.asarray(reduced.posterior["fc1.weight"])[0]
    assert np.all(w[:, la > 3] == 0) and np.all(w[:, la <= 3] != 0)
    assert "log-alpha-t3" in text
    # one definition of sparsity: the report's is the one reduce writes for the same rule
    assert main(["reduce", d, "--method", "log-alpha", "--overwrite"]) == 0
    written = json.load(open(os.path.join(d, "reduction-log-alpha-t3.json")))
    assert D.attributes(reduced)["sparsity"] == pytest.approx(written["sparsity"])
    # the ranking says what it rests on: PSIS-LOO only where every Pareto k-hat is at most 0.7
    unreliable = D.loo_reliability(D.loo(D.load(os.path.join(d, "posterior.nc")))) > 0
    assert ("PSIS-LOO is NOT reliable" in text) == unreliable
    assert ("stacking weights): every Pareto" in text) != unreliable


def test_compare_two_runs(runs, tmp_path, capsys):
    out = tmp_path / "cmp.md"
    entries = [runs["svd"], runs["gg"], f"{runs['svd']}:log-alpha-t3"]
    assert main(["compare", *entries, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "svd:log-alpha-t3" in printed and "test_accuracy" in printed and "sparsity" in printed
    assert "to the reference row, the best model" in printed
    header, first = printed.splitlines()[1:3]
    assert "reference" in header.split() and " yes " in first
    # a reduction written by reduce (no report file of it) is a compare entry too
    assert main(["reduce", runs["svd"], "--method", "opd", "--sparsity", "0.6", "--overwrite"]) == 0
    capsys.readouterr()
    assert main(["compare", runs["svd"], f"{runs['svd']}:opd-s0.6", "--samples", "4"]) == 0
    rows = capsys.readouterr().out.splitlines()
    written = json.load(open(os.path.join(runs["svd"], "reduction-opd-s0.6.json")))
    assert any(r.startswith("svd:opd-s0.6") and f"{written['sparsity']:.4g}" in r for r in rows)
    models = {"svd": D.load(os.path.join(runs["svd"], "posterior.nc")),
              "gg": D.load(os.path.join(runs["gg"], "posterior.nc"))}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        table = az.compare(models)
    loos = {k: D.loo(v)["elpd_loo"] for k, v in models.items()}
    best = max(loos, key=loos.get)
    assert table.index[0] == best
    assert table.loc[min(loos, key=loos.get), "elpd_diff"] == pytest.approx(abs(loos["svd"] - loos["gg"]))
    assert "| svd |" in out.read_text() and "| gg |" in out.read_text()


def test_compare_rejects_different_observations(runs, capsys):
    run = load_run(runs["gg"])
    test_obs = D.run_inference_data(run, 3, observations="test")
    train_obs = D.load(os.path.join(runs["gg"], "posterior.nc"))
    with pytest.raises(ValueError, match="share their observations"):
        D.compare({"train": train_obs, "test": test_obs})
    assert main(["compare", runs["gg"], runs["gg"] + ":nope"]) == 2
    assert "has no reduced model 'nope' (reduced models there: " in capsys.readouterr().err


def test_import_is_quiet_about_arviz_future_warning(tmp_path):
    """ArviZ 0.23 warns once a day at import; a fresh cache directory makes today's warning due."""
    env = dict(os.environ, XDG_CACHE_HOME=str(tmp_path), PYTHONPATH=ROOT)
    proc = subprocess.run([sys.executable, "-W", "error::FutureWarning", "-c", "import pyro_sparse.diagnostics"],
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "FutureWarning" not in proc.stderr
