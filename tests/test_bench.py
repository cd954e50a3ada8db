"""The benchmark's own arithmetic (not the benchmark): ECE, NLL, recipe scaling, registry, masks."""

import math
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.metrics import classification_metrics, expected_calibration_error  # noqa: E402
from bench.registry import METHODS, MODELS, Derived, Model, resolve, scale_recipe  # noqa: E402


def test_ece_by_hand():
    # confidences 0.9 (bin 14 of 15: (13/15, 14/15]), 0.9, 0.6 and 0.55 (both bin 9: (8/15, 9/15])
    probs = torch.tensor([[0.9, 0.1], [0.1, 0.9], [0.6, 0.4], [0.45, 0.55]], dtype=torch.float64)
    y = torch.tensor([0, 0, 0, 1])  # right, wrong, right, right
    # bin 14: acc 1/2, conf 0.9 -> 2/4 * 0.4; bin 9: acc 1, conf 0.575 -> 2/4 * 0.425
    assert expected_calibration_error(probs, y) == pytest.approx(0.5 * 0.4 + 0.5 * 0.425, abs=1e-12)


def _ece_loop(probs, y, bins):
    """Reference: explicit bin edges (lo, hi], the first bin closed at 0."""
    conf, pred = probs.max(-1)
    total = 0.0
    for b in range(bins):
        lo, hi = b / bins, (b + 1) / bins
        inside = [i for i in range(len(y)) if (lo < conf[i] <= hi) or (b == 0 and conf[i] == 0)]
        if inside:
            acc = sum(float(pred[i] == y[i]) for i in inside) / len(inside)
            cnf = sum(float(conf[i]) for i in inside) / len(inside)
            total += len(inside) / len(y) * abs(acc - cnf)
    return total


@pytest.mark.parametrize("bins", [1, 5, 15])
def test_ece_matches_loop(bins):
    g = torch.Generator().manual_seed(0)
    probs = torch.softmax(3 * torch.randn(200, 10, generator=g, dtype=torch.float64), -1)
    y = torch.randint(0, 10, (200,), generator=g)
    assert expected_calibration_error(probs, y, bins) == pytest.approx(_ece_loop(probs, y, bins), abs=1e-12)


def test_ece_perfectly_calibrated_and_bad_arguments():
    # 10 predictions of confidence 0.7, 7 right: acc = conf in the only occupied bin
    probs = torch.tensor([[0.7, 0.3]] * 10, dtype=torch.float64)
    y = torch.tensor([0] * 7 + [1] * 3)
    assert expected_calibration_error(probs, y) == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(ValueError, match="bins"):
        expected_calibration_error(probs, y, bins=0)
    with pytest.raises(ValueError, match="probs"):
        expected_calibration_error(probs[:, 0], y)


def test_classification_metrics_averages_probabilities_over_draws():
    # two draws of logits for one point with 2 classes: p(y=0) = 0.5 * (sigmoid(2) + sigmoid(-1))
    outputs = torch.tensor([[[2.0, 0.0]], [[-1.0, 0.0]]])
    p0 = 0.5 * (1 / (1 + math.exp(-2)) + 1 / (1 + math.exp(1)))
    m = classification_metrics(outputs, torch.tensor([0]))
    assert m["nll"] == pytest.approx(-math.log(p0), rel=1e-12)
    assert m["accuracy"] == (1.0 if p0 > 0.5 else 0.0)
    assert m["ece"] == pytest.approx(abs(float(p0 > 0.5) - max(p0, 1 - p0)), abs=1e-12)


def test_scale_recipe_scales_the_schedule():
    recipe = {"epochs": 100, "kl_warmup_epochs": 10, "reduction": {"warmup_epochs": 20, "every": 5},
              "laplace": {"burn_in": 10, "marglik_frequency": 2}, "optimizer": {"lr": 0.1}}
    out = scale_recipe(recipe, 0.3)
    assert out["epochs"] == 30 and out["kl_warmup_epochs"] == 3 and out["eval_every"] == 30
    assert out["reduction"] == {"warmup_epochs": 6, "every": 2}
    assert out["laplace"] == {"burn_in": 3, "marglik_frequency": 1}  # periods stay >= 1
    assert recipe["epochs"] == 100 and out["optimizer"] == {"lr": 0.1}  # a copy; the rest unchanged
    with pytest.raises(ValueError, match="factor"):
        scale_recipe(recipe, 0)


def test_registry_resolves_files_and_skips_what_is_missing():
    entry = resolve(MODELS["digits-mlp"], METHODS["sparsevd"])
    assert entry.spec_source == "models/mlp_sparsevd.yaml" and entry.spec["prior"]["type"] == "log_uniform"
    missing = Model("m", "m", "digits", {"log_uniform": ("models/no_such_spec.yaml",)})
    skip = resolve(missing, METHODS["sparsevd"])
    assert not hasattr(skip, "spec") and "no_such_spec.yaml" in skip.reason
    derived = Model("d", "d", "digits", {"log_uniform": ("models/no_such_spec.yaml",
                                                         Derived("models/lenet5_gaussian.yaml",
                                                                 {"prior": {"type": "log_uniform"}}))})
    entry = resolve(derived, METHODS["sparsevd"])
    assert entry.spec["prior"] == {"type": "log_uniform"} and entry.spec["layers"][0]["type"] == "conv2d"
    unknown = Model("u", "u", "digits", {"log_uniform": (Derived("models/mlp_gaussian.yaml",
                                                                 {"prior": {"type": "no_such_prior"}}),)})
    assert "no_such_prior" in resolve(unknown, METHODS["sparsevd"]).reason
