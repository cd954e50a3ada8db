"""The post-hoc path through the command line: a MAP network, its Laplace posterior with no training
(``epochs: 0``, ``fit --init``), compensated Bayesian model reduction with and without a target,
the Laplace predictive behind ``evaluate --samples``, and ``--max-drop``."""

import json
import os

import pytest
import torch
import yaml

from pyro_sparse.cli import main
from pyro_sparse.reduced_runs import load_compact
from pyro_sparse.runs import load_run

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL = {"name": "small", "input_shape": "auto", "prior": {"type": "gaussian", "scale": 1.0},
         "layers": [{"type": "linear", "in": "auto", "out": 32}, {"type": "relu"},
                    {"type": "linear", "out": "auto"}],
         "likelihood": {"type": "categorical"}}
MAP = {"method": "svi", "guide": "delta", "local_reparam": False, "optimizer": {"name": "Adam", "lr": 0.01},
       "epochs": 8, "batch_size": 64, "eval_samples": 1}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("posthoc-cli")
    model, recipe = root / "model.yaml", root / "map.yaml"
    model.write_text(yaml.safe_dump(MODEL))
    recipe.write_text(yaml.safe_dump(MAP))
    trained = str(root / "map")
    assert main(["fit", "--model", str(model), "--inference", str(recipe), "--data", "digits", "--out", trained,
                 "--quiet"]) == 0
    posthoc = str(root / "posthoc")
    assert main(["fit", "--model", str(model), "--inference", os.path.join(ROOT, "inference", "laplace_posthoc.yaml"),
                 "--init", trained, "--data", "digits", "--out", posthoc, "--quiet"]) == 0
    return trained, posthoc


def test_a_laplace_recipe_of_no_epochs_is_the_posterior_of_the_trained_weights(runs):
    trained, posthoc = runs
    metrics = json.load(open(os.path.join(posthoc, "metrics.json")))
    assert metrics["epochs"] == 0 and metrics["steps"] == 0 and "step_wall_ms" not in metrics
    assert metrics["log_marglik"] < 0
    a, b = load_run(trained), load_run(posthoc)
    before = a.trainer.posterior_summary().locs()
    after = b.trainer.posterior_summary()
    for site, value in before.items():  # nothing trained: the Laplace posterior sits at the MAP weights
        torch.testing.assert_close(after[site].loc, value)
    assert after["fc1.weight"].structure is not None and after.method.startswith("laplace-scalar-kfac")
    assert b.trainer.prior.log_delta.item() != 0.0  # the prior precision was fitted (from 1.0)


def test_reduce_compensates_on_the_laplace_run_with_a_target_and_by_the_evidence(runs, capsys):
    _, posthoc = runs
    assert main(["reduce", posthoc, "--method", "bmr", "--sparsity", "0.8"]) == 0
    printed = capsys.readouterr().out
    assert "compensated" in printed and "approximation: row blocks of the kronecker posterior" in printed
    report = json.load(open(os.path.join(posthoc, "reduction-bmr-s0.8.json")))
    assert report["compensated"] and report["rule_sparsity"] == pytest.approx(0.8, abs=0.01)
    assert set(report["compensation"]) == {"fc1", "fc2"} and report["options"]["layer_by_layer"]
    assert report["max_abs_output_diff"] <= 1e-5 and report["quality"]["warning"] is None
    compact = load_compact(os.path.join(posthoc, "compact-bmr-s0.8.pt"))
    run = load_run(posthoc)
    with torch.no_grad():
        assert (compact(run.dataset.x_test).argmax(-1) == run.dataset.y_test).float().mean().item() == \
            pytest.approx(report["test_accuracy_reduced"])
    # no target: the evidence decides; its per-layer sparsities are in the report
    assert main(["reduce", posthoc, "--method", "bmr"]) == 0
    evidence = json.load(open(os.path.join(posthoc, "reduction-bmr-t0.json")))
    assert 0 < evidence["rule_sparsity"] < 1 and all(0 <= v["sparsity"] <= 1 for v in evidence["compensation"].values())
    # asked not to compensate: the same rule on the marginals, in its own files
    assert main(["reduce", posthoc, "--method", "bmr", "--sparsity", "0.8", "--compensate", "no"]) == 0
    plain = json.load(open(os.path.join(posthoc, "reduction-bmr-s0.8-plain.json")))
    assert not plain["compensated"]
    assert main(["reduce", posthoc, "--method", "savage-dickey", "--pattern", "2:4"]) == 0
    nm = json.load(open(os.path.join(posthoc, "reduction-savage-dickey-2of4.json")))
    assert nm["rule_sparsity"] == pytest.approx(0.5, abs=0.01)
    assert main(["reduce", posthoc, "--method", "bmr", "--sparsity", "0.5", "--pattern", "2:4"]) == 2
    assert "--pattern: with compensation an n:m pattern is the whole target" in capsys.readouterr().err


def test_evaluate_samples_uses_the_laplace_predictive(runs, capsys):
    _, posthoc = runs
    assert main(["evaluate", posthoc, "--samples", "5"]) == 0
    out = capsys.readouterr().out
    accuracy = float(next(line.split()[-1] for line in out.splitlines() if "test_accuracy" in line))
    run = load_run(posthoc)
    figures = run.trainer.evaluate(5)
    assert accuracy == pytest.approx(figures["test_accuracy"], abs=1e-4)
    assert figures != run.trainer.evaluate()  # not the MAP network's figures


def test_max_drop_fails_with_exit_3_and_writes_nothing(runs, capsys):
    trained, _ = runs
    assert main(["reduce", trained, "--method", "random", "--sparsity", "0.97", "--max-drop", "0"]) == 3
    err = capsys.readouterr().err
    assert "--max-drop 0: the reduced network's test accuracy" in err and "nothing was written" in err
    assert not os.path.exists(os.path.join(trained, "reduction-random-s0.97.json"))
    # without the flag the same fall is a warning on stderr and in the file
    assert main(["reduce", trained, "--method", "random", "--sparsity", "0.97"]) == 0
    assert "warning: the reduced network lost quality" in capsys.readouterr().err
    report = json.load(open(os.path.join(trained, "reduction-random-s0.97.json")))
    assert report["quality"]["drop"] > 0.05 and "lost quality" in report["quality"]["warning"]
    assert main(["reduce", trained, "--method", "random", "--sparsity", "0.5", "--max-drop", "-1"]) == 2


def test_init_must_exist(tmp_path, capsys):
    assert main(["fit", "--model", os.path.join(ROOT, "models", "mlp_gaussian.yaml"), "--data", "digits",
                 "--init", str(tmp_path / "nothing"), "--out", str(tmp_path / "out")]) == 2
    assert "--init" in capsys.readouterr().err and not os.path.exists(tmp_path / "out")
