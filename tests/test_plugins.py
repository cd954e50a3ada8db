"""Plugins: a new prior, layer or rule is one class in one file (examples/plugins/), registered by
the plugin loader from a spec's ``plugins:``, the command line's ``--plugins``, or an entry point;
each works end to end from the command line. The registries check the contract at registration."""

import json
import os

import numpy as np
import pytest
import torch
from torch import nn

from pyro_sparse.cli import main
from pyro_sparse.errors import SpecError
from pyro_sparse.plugins import load_plugins
from pyro_sparse.registry import CONVERSIONS, LAYERS, PRIORS, RULES
from pyro_sparse.usercode import allow_code

HERE = os.path.dirname(os.path.abspath(__file__))
PLUGINS = os.path.join(os.path.dirname(HERE), "examples", "plugins")
LAPLACE, CONV3D, SNR = (os.path.join(PLUGINS, f) for f in ("laplace_prior.py", "conv3d.py", "snr_rule.py"))


@pytest.fixture(scope="module", autouse=True)
def loaded():
    with allow_code():
        return load_plugins([LAPLACE, CONV3D, SNR])


def test_each_plugin_is_one_class_registered_where_its_base_says(loaded):
    assert loaded == ["prior:laplace", "layer:conv3d", "module conversion:conv3d", "reduction rule:snr"]
    assert PRIORS["laplace"].__name__ == "LaplacePrior" and LAYERS["conv3d"] is CONVERSIONS["conv3d"]
    assert RULES["snr"].name == "snr" and not RULES["snr"].evidence
    with allow_code():  # loading again registers nothing new
        assert load_plugins([SNR]) == ["reduction rule:snr"]


def test_plugins_are_code_and_need_allow_code(tmp_path, capsys):
    with pytest.raises(SpecError, match="plugins.*--allow-code"):
        load_plugins([SNR])
    spec = tmp_path / "m.yaml"
    spec.write_text(f"plugins: [{SNR}]\nlayers: [{{type: linear, out: 10}}]\n")
    assert main(["fit", "--model", str(spec), "--data", "digits", "--out", str(tmp_path / "r")]) == 2
    assert "plugins" in capsys.readouterr().err and not (tmp_path / "r").exists()
    with allow_code(), pytest.raises(SpecError, match="plugin file 'nowhere.py' not found"):
        load_plugins(["nowhere.py"])


def test_the_registry_refuses_a_component_that_breaks_the_contract():
    from pyro_sparse.priors import Prior
    from pyro_sparse.reduction.rules import Rule

    class NoSitePrior(Prior):
        spec_name = "no_site"

    class NoScores(Rule):
        name = "no-scores"

    with pytest.raises(ValueError, match="'NoSitePrior' does not define the required method site_prior"):
        PRIORS.register(NoSitePrior)
    with pytest.raises(ValueError, match="'NoScores' does not define the required method scores"):
        RULES.register(NoScores())
    assert "no_site" not in PRIORS and "no-scores" not in RULES


def _fit(tmp_path, spec_text, data="digits", extra=()):
    spec = tmp_path / "model.yaml"
    spec.write_text(spec_text)
    recipe = tmp_path / "svi.yaml"
    recipe.write_text("epochs: 2\nbatch_size: 64\nseed: 0\nkl_warmup_epochs: 1\neval_samples: 2\n")
    out = tmp_path / "run"
    assert main(["fit", "--model", str(spec), "--inference", str(recipe), "--data", data, "--out", str(out),
                 "--quiet", "--allow-code", *extra]) == 0
    return out


def test_the_laplace_prior_takes_the_fused_path_and_bmr_reads_it(tmp_path, capsys):
    out = _fit(tmp_path, f"plugins: [{LAPLACE}]\nprior: {{type: laplace, rate: 10.0, group: unit}}\n"
                         "layers: [{type: linear, out: 32}, {type: relu}, {type: linear, out: 10}]\n")
    paths = json.loads((out / "run.json").read_text())["kl_paths"]
    assert paths["fc1.weight.unit_variance"] == "fused hyper: lognormal || gamma (log-normal || Gamma KL)"
    assert paths["fc1.weight"].startswith("closed form: normal || normal")  # conditional on the variance
    capsys.readouterr()
    assert main(["reduce", str(out), "--method", "bmr", "--allow-code", "--no-latency"]) == 0
    report = json.loads(next(out.glob("reduction-bmr*.json")).read_text())
    assert 0 < report["sparsity"] < 1 and report["test_accuracy_reduced"] > 0.5


def test_exponential_and_gamma_one_are_the_same_prior_on_the_same_path():
    """Exponential(r) and Gamma(1, r) give the same loss and gradients, fused, as the Pyro reference."""
    import pyro.distributions as dist

    import pyro_sparse
    from pyro_sparse.data import load_digits
    from pyro_sparse.elbo import CoreELBO, MeanFieldELBO
    from pyro_sparse.guides import MeanFieldGuide

    LaplacePrior = PRIORS["laplace"]
    data = load_digits()
    x, y = data.x_train[:32], data.y_train[:32]
    losses = {}
    for kind in ("exponential", "gamma"):
        if kind == "gamma":  # the same prior written as Gamma(1, r)
            def hyper(self, site, init, axes, _orig=LaplacePrior.hyper_sites):
                (name, h), = _orig(self, site, init, axes).items()
                rate = h.prior.rate.reshape(-1)[0]  # one value, as the plugin writes it
                return {name: type(h)(dist.Gamma(torch.ones_like(rate), rate).expand(h.init.shape), h.init)}
            prior_cls = type("GammaLaplace", (LaplacePrior,), {"hyper_sites": hyper})
        else:
            prior_cls = LaplacePrior
        torch.manual_seed(1)
        net = pyro_sparse.bayesian(nn.Sequential(nn.Linear(64, 10)), prior=prior_cls(rate=5.0, group="unit"))
        guide = MeanFieldGuide(net.model)
        guide.setup(x, y, dataset_size=len(data.x_train))
        paths = CoreELBO.explain(net, guide)
        assert paths["0.weight.unit_variance"].startswith("fused hyper: lognormal || gamma")
        for name, elbo in (("core", CoreELBO()), ("pyro", MeanFieldELBO())):
            torch.manual_seed(0)
            model, g = (net, guide) if name == "core" else (net.model, guide)
            losses[kind, name] = float(elbo.differentiable_loss(model, g, x, y, dataset_size=len(data.x_train)))
    assert losses["exponential", "core"] == pytest.approx(losses["gamma", "core"], rel=1e-6)
    assert losses["exponential", "core"] == pytest.approx(losses["exponential", "pyro"], rel=1e-5)


def _volumes(tmp_path, n=240):
    g = np.random.default_rng(0)
    x = g.standard_normal((n, 1, 4, 6, 6)).astype(np.float32)
    y = (x[:, 0, :2, :3, :3].mean((1, 2, 3)) > 0).astype(np.int64)
    path = tmp_path / "volumes.npz"
    np.savez(path, x_train=x[:200], y_train=y[:200], x_test=x[200:], y_test=y[200:])
    return path


def test_conv3d_fits_reduces_and_compacts_from_the_command_line(tmp_path, capsys):
    out = _fit(tmp_path, f"plugins: [{CONV3D}]\ninput_shape: [1, 4, 6, 6]\nprior: {{type: log_uniform}}\n"
                         "layers: [{type: conv3d, out: 4, kernel_size: 3, padding: 1}, {type: relu}, "
                         "{type: flatten}, {type: linear, out: 2}]\n", data=str(_volumes(tmp_path)))
    capsys.readouterr()
    assert main(["reduce", str(out), "--method", "magnitude", "--sparsity", "0.5", "--allow-code",
                 "--no-latency"]) == 0
    report = json.loads(next(out.glob("reduction-magnitude*.json")).read_text())
    assert report["max_abs_output_diff"] < 1e-4 and report["sparsity"] == pytest.approx(0.5, abs=0.02)


def test_conv3d_shape_errors_name_its_axes():
    layer = LAYERS["conv3d"](2, 4, 3)
    with pytest.raises(ValueError, match=r"expects input of shape \(2, depth, height, width\)"):
        layer.out_shape((2, 8, 8))


def test_a_torch_conv3d_is_converted_and_pruned_post_hoc_with_kfac():
    import pyro_sparse

    torch.manual_seed(0)
    module = nn.Sequential(nn.Conv3d(1, 3, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 4 * 6 * 6, 2))
    x = torch.randn(64, 1, 4, 6, 6)
    y = (x[:, 0, :2, :3, :3].mean((1, 2, 3)) > 0).long()
    pruned = pyro_sparse.prune(module, x, y, rule="bmr", sparsity=0.5, curvature="kfac", hyper_steps=20,
                               verbose=False)
    params = dict(pruned.module.named_parameters())
    weights = torch.cat([params["0.weight"].reshape(-1), params["3.weight"].reshape(-1)])
    assert params["0.weight"].shape == (3, 1, 3, 3, 3) and bool((params["0.weight"] == 0).any())
    assert float((weights == 0).float().mean()) == pytest.approx(0.5, abs=0.01)  # global over both layers


def test_the_snr_rule_ranks_by_signal_to_noise(tmp_path, capsys):
    out = _fit(tmp_path, f"plugins: [{SNR}]\nprior: {{type: gaussian, scale: 1.0}}\n"
                         "layers: [{type: linear, out: 16}, {type: relu}, {type: linear, out: 10}]\n")
    capsys.readouterr()
    assert main(["reduce", str(out), "--method", "snr", "--sparsity", "0.8", "--allow-code", "--no-latency"]) == 0
    report = json.loads(next(out.glob("reduction-snr*.json")).read_text())
    assert report["rule_sparsity"] == pytest.approx(0.8, abs=0.01)
    from pyro_sparse.reduction.rules import reduce
    from pyro_sparse.runs import load_run

    with allow_code():
        run = load_run(str(out))
    summary = run.trainer.posterior_summary()
    decision = reduce(summary, "snr", sparsity=0.8)
    site = summary["fc1.weight"]
    snr = site.loc.abs() / site.precision.rsqrt()
    torch.testing.assert_close(decision.scores["fc1.weight"], snr)
    assert main(["list", "rules", "--plugins", SNR, "--allow-code"]) == 0
    assert "snr" in capsys.readouterr().out


def test_an_installed_package_registers_through_its_entry_point(tmp_path, monkeypatch):
    from importlib.metadata import EntryPoint

    from pyro_sparse import plugins

    package = tmp_path / "their_rules.py"
    package.write_text("from pyro_sparse.reduction.rules import Rule\n\n\n"
                       "class Absolute(Rule):\n    name = 'their-absolute'\n    quantity = '|theta|'\n"
                       "    prunes = 'below'\n\n    def scores(self, site, context):\n        return site.loc.abs()\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    point = EntryPoint("theirs", "their_rules", plugins.ENTRY_POINT_GROUP)
    monkeypatch.setattr(plugins, "entry_points", lambda group: [point] if group == plugins.ENTRY_POINT_GROUP else [])
    monkeypatch.setattr(plugins, "_entry_points_read", [False])
    plugins.load_entry_points()
    assert RULES["their-absolute"].quantity == "|theta|"
