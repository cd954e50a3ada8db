"""The SVI runner and the CLI: files written, resume, determinism, convergence, errors."""

import json
import os

import pytest
import torch
import yaml

from pyro_sparse.cli import main
from pyro_sparse.data import load_digits
from pyro_sparse.fitting import SVITrainer, evaluate
from pyro_sparse.recipe import parse_recipe
from pyro_sparse.runs import build, fit_run, load_run
from pyro_sparse.spec import parse_model_spec

SMALL = {"layers": [{"type": "linear", "in": "auto", "out": 32}, {"type": "relu"}, {"type": "linear", "out": "auto"}]}


def write_specs(tmp_path, recipe_overrides=None, model=None):
    m, r = tmp_path / "m.yaml", tmp_path / "r.yaml"
    m.write_text(yaml.safe_dump(model or SMALL))
    recipe = {"epochs": 4, "batch_size": 128, "optimizer": {"name": "Adam", "lr": 0.01}, "kl_warmup_epochs": 2,
              "eval_samples": 3, "seed": 1}
    recipe.update(recipe_overrides or {})
    r.write_text(yaml.safe_dump(recipe))
    return str(m), str(r)


def test_fit_writes_run_directory(tmp_path):
    m, r = write_specs(tmp_path)
    out = str(tmp_path / "run")
    assert main(["fit", "--model", m, "--inference", r, "--data", "digits", "--out", out, "--no-progress"]) == 0
    for name in ("model.yaml", "inference.yaml", "metrics.jsonl", "checkpoint.pt", "metrics.json", "run.json"):
        assert os.path.exists(os.path.join(out, name)), name
    metrics = json.load(open(os.path.join(out, "metrics.json")))
    for key in ("test_accuracy", "test_nll", "epochs", "steps", "train_wall_seconds", "step_wall_ms",
                "train_cpu_seconds", "step_cpu_ms", "threads", "n_params"):
        assert key in metrics
    assert metrics["epochs"] == 4 and metrics["steps"] == 4 * 12 and metrics["n_params"] == 64 * 32 + 32 + 330
    assert metrics["step_wall_ms"] == 1000 * metrics["train_wall_seconds"] / metrics["steps"]
    lines = open(os.path.join(out, "metrics.jsonl")).read().splitlines()
    assert [json.loads(l)["epoch"] for l in lines] == [1, 2, 3, 4]
    assert metrics["test_accuracy"] > 0.8
    run = json.load(open(os.path.join(out, "run.json")))
    assert run["seed"] == 1 and len(run["data_fingerprint"]) == 64 and run["versions"]["torch"]
    # the checkpoint is plain tensors: loadable with weights_only=True
    torch.load(os.path.join(out, "checkpoint.pt"), weights_only=True)


def test_resume_gives_the_same_final_metrics(tmp_path, interrupted_run):
    m, r = write_specs(tmp_path)
    _, straight = fit_run(m, r, "digits", str(tmp_path / "a"), progress=False)
    # interrupt after 2 epochs, then continue to the recipe's 4
    resumed = interrupted_run(m, r, tmp_path / "b", 4)
    for key in ("test_accuracy", "test_nll", "epochs", "steps"):
        assert resumed[key] == straight[key], key
    a = [json.loads(l) for l in open(tmp_path / "a" / "metrics.jsonl")]
    b = [json.loads(l) for l in open(tmp_path / "b" / "metrics.jsonl")]
    assert [x["loss"] for x in a] == [x["loss"] for x in b]


def test_same_seed_same_numbers_and_seed_matters(tmp_path):
    m, r = write_specs(tmp_path, {"epochs": 2})
    _, one = fit_run(m, r, "digits", str(tmp_path / "1"), progress=False)
    _, two = fit_run(m, r, "digits", str(tmp_path / "2"), progress=False)
    _, other = fit_run(m, r, "digits", str(tmp_path / "3"), seed=7, progress=False)
    assert one["test_nll"] == two["test_nll"]
    assert other["test_nll"] != one["test_nll"]


def test_evaluate_reprints_and_recomputes(tmp_path, capsys):
    m, r = write_specs(tmp_path, {"epochs": 2})
    out = str(tmp_path / "run")
    _, metrics = fit_run(m, r, "digits", out, progress=False)
    assert main(["evaluate", out]) == 0
    assert f"{metrics['test_accuracy']:.4f}" in capsys.readouterr().out
    run = load_run(out)
    again = run.trainer.evaluate(50)
    assert abs(again["test_accuracy"] - metrics["test_accuracy"]) < 0.05


def test_cli_errors_exit_2_without_traceback(tmp_path, capsys):
    m, r = write_specs(tmp_path)
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"layers": [{"type": "linear", "out": 3, "prior": {"type": "gaussian",
                                                                                      "scale": -2}}]}))
    assert main(["fit", "--model", str(bad), "--inference", r, "--data", "digits", "--out",
                 str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "layers[0].prior.scale" in err and str(bad) in err and "Traceback" not in err
    assert main(["fit", "--model", m, "--inference", r, "--data", "nosuch.npz", "--out", str(tmp_path / "y")]) == 2
    assert "nosuch.npz" in capsys.readouterr().err
    out = tmp_path / "z"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    assert main(["fit", "--model", m, "--inference", r, "--data", "digits", "--out", str(out)]) == 2
    assert "--overwrite" in capsys.readouterr().err and (out / "keep.txt").read_text() == "precious"
    assert main(["fit", "--model", m, "--inference", r, "--data", "digits", "--out", str(out), "--resume"]) == 2


def test_python_api_without_yaml():
    data = load_digits()
    spec, recipe = parse_model_spec(SMALL), parse_recipe({"epochs": 2, "optimizer": {"name": "Adam", "lr": 0.01}})
    net, guide = build(spec, recipe, data)
    metrics = SVITrainer(net, guide, data, recipe, progress=False).fit()
    assert metrics["test_accuracy"] > 0.7
    assert evaluate(net, guide, data.x_test, data.y_test)["test_accuracy"] > 0.7


def test_regression_with_learned_noise():
    from pyro_sparse.data import load_sparse_regression

    data = load_sparse_regression()
    spec = parse_model_spec({"layers": [{"type": "linear", "in": "auto", "out": "auto"}],
                             "likelihood": {"type": "gaussian", "learn_noise": True}})
    recipe = parse_recipe({"epochs": 40, "optimizer": {"name": "Adam", "lr": 0.05}, "batch_size": 64})
    net, guide = build(spec, recipe, data)
    metrics = SVITrainer(net, guide, data, recipe, progress=False).fit()
    assert metrics["test_rmse"] < 0.7  # the noise is 0.5
    assert 0.35 < guide.median()["likelihood.noise"].item() < 0.7


@pytest.mark.slow
@pytest.mark.parametrize("recipe,threshold", [("svi_meanfield", 0.96), ("map", 0.97)])
def test_digits_mlp_reaches_the_issue_accuracy(root, tmp_path, recipe, threshold):
    """Acceptance: default epochs of the shipped recipes on digits."""
    _, metrics = fit_run(os.path.join(root, "models", "mlp_gaussian.yaml"),
                         os.path.join(root, "inference", f"{recipe}.yaml"), "digits", str(tmp_path / recipe),
                         progress=False)
    assert metrics["test_accuracy"] >= threshold
