"""Model specs and inference recipes: parsing, building, and every error naming file + path."""

import os

import pytest
import torch
import yaml

from pyro_sparse.errors import SpecError
from pyro_sparse.layers import Conv2d, Linear
from pyro_sparse.network import BayesianNetwork
from pyro_sparse.priors import Gaussian, GaussianGamma
from pyro_sparse.recipe import load_recipe, parse_recipe
from pyro_sparse.spec import build_network, load_model_spec, parse_model_spec

MLP = {"layers": [{"type": "linear", "in": "auto", "out": 30}, {"type": "relu"},
                  {"type": "linear", "out": "auto"}]}


def write(tmp_path, data, name="spec.yaml"):
    p = tmp_path / name
    p.write_text(yaml.safe_dump(data) if not isinstance(data, str) else data)
    return str(p)


@pytest.mark.parametrize("spec", ["mlp_gaussian", "lenet5_gaussian"])
def test_shipped_specs_build_for_digits(root, digits, spec):
    s = load_model_spec(os.path.join(root, "models", f"{spec}.yaml"))
    net = build_network(s, digits.feature_shape, digits.num_outputs, digits.image_shape)
    assert net(digits.x_train[:5]).shape == (5, 10)


def test_auto_sizes_follow_the_data(root):
    s = load_model_spec(os.path.join(root, "models", "mlp_gaussian.yaml"))
    a = build_network(s, (64,), 10)
    b = build_network(s, (40,), 3)
    assert (a.layers["fc1"].in_features, a.layers["fc3"].out_features) == (64, 10)
    assert (b.layers["fc1"].in_features, b.layers["fc3"].out_features) == (40, 3)
    assert a.num_weights() == 64 * 300 + 300 + 300 * 100 + 100 + 100 * 10 + 10


def test_python_api_builds_the_same_network():
    net = BayesianNetwork([Linear(64, 30, prior=GaussianGamma()), Linear(30, 10, prior=Gaussian(0.5))])
    assert list(net.param_sites()) == ["fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"]
    spec = parse_model_spec({**MLP, "layers": [{"type": "linear", "in": 64, "out": 30,
                                                "prior": {"type": "gaussian_gamma"}},
                                               {"type": "linear", "out": "auto", "prior": {"type": "gaussian",
                                                                                          "scale": 0.5}}]})
    net2 = build_network(spec, (64,), 10)
    assert list(net2.param_sites()) == list(net.param_sites())
    assert net2.layers["fc2"].weight_prior.scale == 0.5


def test_conv_spec_reshapes_flat_images():
    spec = parse_model_spec({"input_shape": [1, 8, 8], "layers": [
        {"type": "conv2d", "out": 4, "kernel_size": 3}, {"type": "flatten"}, {"type": "linear", "out": "auto"}]})
    net = build_network(spec, (64,), 10)
    assert isinstance(net.layers["conv1"], Conv2d)
    assert net.layers["fc1"].in_features == 4 * 6 * 6
    assert net(torch.rand(2, 64)).shape == (2, 10)


ERRORS = [
    ({**MLP, "colour": "red"}, "colour", "unknown key"),
    ({"layers": [{"type": "dense", "out": 3}]}, "layers[0].type", "unknown layer type"),
    ({"layers": [{"type": "linear", "out": 3, "prior": {"type": "cauchy"}}]}, "layers[0].prior.type",
     "unknown prior type"),
    ({"layers": [{"type": "linear", "in": "auto", "out": 30}, {"type": "relu"},
                 {"type": "linear", "out": "auto", "prior": {"type": "gaussian", "scale": -1}}]},
     "layers[2].prior.scale", "> 0"),
    ({"layers": [{"type": "linear", "out": 3, "prior": {"type": "gaussian", "width": 1}}]},
     "layers[0].prior.width", "unknown key"),
    ({"layers": [{"type": "linear", "out": -3}]}, "layers[0].out", "positive integer"),
    ({"layers": [{"type": "linear", "out": "auto"}, {"type": "linear", "out": 3}]}, "layers[0].out", "last layer"),
    ({"layers": []}, "layers", "at least one layer"),
    ({"prior": {"type": "gaussian", "scale": "big"}, **MLP}, "prior.scale", "number"),
    ({**MLP, "likelihood": {"type": "poisson"}}, "likelihood.type", "unknown likelihood"),
    ({**MLP, "input_shape": [0, 3]}, "input_shape", "positive integers"),
]


@pytest.mark.parametrize("data,path,why", ERRORS)
def test_spec_errors_name_file_and_path(tmp_path, data, path, why):
    f = write(tmp_path, data)
    with pytest.raises(SpecError) as e:
        load_model_spec(f)
    assert f in str(e.value) and path in str(e.value) and why in str(e.value)


def test_sizes_that_do_not_chain(tmp_path):
    f = write(tmp_path, {"layers": [{"type": "linear", "in": 64, "out": 30}, {"type": "linear", "in": 20, "out": 10}]})
    spec = load_model_spec(f)
    with pytest.raises(SpecError) as e:
        build_network(spec, (64,), 10)
    assert f in str(e.value) and "layers[1]" in str(e.value) and "20" in str(e.value)
    f2 = write(tmp_path, {"layers": [{"type": "linear", "in": 64, "out": 7}]}, "b.yaml")
    with pytest.raises(SpecError, match=r"layers\[0\]\.out.*\(10,\)"):
        build_network(load_model_spec(f2), (64,), 10)
    f3 = write(tmp_path, {"input_shape": [1, 5, 5], "layers": [{"type": "conv2d", "out": 2, "kernel_size": 3},
                                                               {"type": "flatten"}, {"type": "linear", "out": "auto"}]},
               "c.yaml")
    with pytest.raises(SpecError, match="input_shape"):
        build_network(load_model_spec(f3), (64,), 10)


def test_yaml_problems(tmp_path):
    with pytest.raises(SpecError, match="no such file"):
        load_model_spec(str(tmp_path / "missing.yaml"))
    with pytest.raises(SpecError, match="invalid YAML"):
        load_model_spec(write(tmp_path, "layers: [unclosed"))
    with pytest.raises(SpecError, match="mapping at the top level"):
        load_model_spec(write(tmp_path, "- a\n- b\n"))
    # a YAML tag that would construct a Python object is refused by the safe loader
    with pytest.raises(SpecError, match="invalid YAML"):
        load_model_spec(write(tmp_path, "layers: !!python/object/apply:os.system ['true']"))


RECIPE_ERRORS = [
    ({"optimizer": {"name": "Adamm", "lr": 0.1}}, "optimizer.name"),
    ({"optimizer": {"name": "Adam", "lr": -1}}, "optimizer.lr"),
    ({"optimizer": {"name": "Adam", "momentum": 0.9}}, "optimizer.momentum"),
    ({"schedule": {"name": "warp"}}, "schedule.name"),
    ({"schedule": {"name": "step", "size": 3}}, "schedule.size"),
    ({"epochs": -1}, "epochs"),
    ({"batch_size": 2.5}, "batch_size"),
    ({"guide": "fancy"}, "guide"),
    ({"device": "tpu"}, "device"),
    ({"kl_warmup_epochs": -1}, "kl_warmup_epochs"),
    ({"epoch": 3}, "epoch"),
]


@pytest.mark.parametrize("data,path", RECIPE_ERRORS)
def test_recipe_errors_name_the_field(tmp_path, data, path):
    f = write(tmp_path, data, "recipe.yaml")
    with pytest.raises(SpecError) as e:
        load_recipe(f)
    assert f in str(e.value) and path in str(e.value)


def test_shipped_recipes_parse(root):
    for name in os.listdir(os.path.join(root, "inference")):
        r = load_recipe(os.path.join(root, "inference", name))
        assert r["epochs"] > 0 or r["method"] == "laplace"  # epochs 0: the post-hoc Laplace posterior


def test_recipe_defaults_and_numeric_strings():
    r = parse_recipe({"optimizer": {"name": "SGD", "lr": 0.1, "momentum": 0.9}, "grad_clip": "1e3"})
    assert r["grad_clip"] == 1000.0 and r["guide"] == "meanfield" and r["batch_size"] == 128


def test_scale_lr_factor_gives_the_scales_their_own_learning_rate():
    from pyro_sparse.guides import MeanFieldGuide
    from pyro_sparse.recipe import guide_param_groups, make_optimizer

    net = BayesianNetwork([Linear(4, 3)])
    guide = MeanFieldGuide(net.model).setup(torch.randn(2, 4))
    opt = make_optimizer(guide_param_groups(guide, {"lr": 0.002}, 5.0), {"name": "Adam", "lr": 0.002})
    assert [g["lr"] for g in opt.param_groups] == [0.002, 0.01]
    assert len(opt.param_groups[1]["params"]) == 2  # log-scales of fc1.weight and fc1.bias
    plain = make_optimizer(guide_param_groups(guide, {"lr": 0.002}), {"name": "Adam", "lr": 0.002})
    assert len(plain.param_groups) == 1


def test_data_inputs_option_is_validated_and_kept(root):
    import copy

    from pyro_sparse.spec import parse_model_spec

    spec = yaml.safe_load(open(os.path.join(root, "models", "mlp_gaussian_centered.yaml")))
    assert parse_model_spec(copy.deepcopy(spec))["data"] == {"inputs": "center"}
    spec["data"] = {"inputs": "whiten"}
    with pytest.raises(SpecError, match=r"x.yaml: data.inputs: expected one of 'raw', 'center', 'standardize'"):
        parse_model_spec(spec, "x.yaml")


@pytest.mark.parametrize("layer, name", [({"type": "conv2d", "out": 2, "kernel_size": 3}, "conv2d"),
                                         ({"type": "patch_embed", "dim": 8, "patch_size": 2}, "patch_embed")])
def test_auto_channels_need_an_image_input(tmp_path, layer, name):
    f = write(tmp_path, {"layers": [layer, {"type": "flatten"}, {"type": "linear", "out": "auto"}]})
    with pytest.raises(SpecError, match=rf"layers\[0\].*{name} expects \(channels, height, width\) input, "
                                        r"got shape \[64\]; set input_shape: image"):
        build_network(load_model_spec(f), (64,), 10)
