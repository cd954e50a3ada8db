"""pyro-sparse reduce / sweep on a tiny fitted run: files written, numbers consistent, errors exit 2."""

import csv
import json
import os

import pytest
import torch
import yaml

from pyro_sparse.cli import main
from pyro_sparse.reduced_runs import load_compact
from pyro_sparse.runs import fit_run, load_run

MODEL = {"name": "tiny", "input_shape": "auto", "prior": {"type": "gaussian", "scale": 1.0},
         "layers": [{"type": "linear", "in": "auto", "out": 16}, {"type": "relu"},
                    {"type": "linear", "out": "auto"}],
         "likelihood": {"type": "categorical"}}
RECIPE = {"method": "svi", "guide": "meanfield", "guide_options": {"init_scale": 0.0067},
          "optimizer": {"name": "Adam", "lr": 0.01}, "epochs": 2, "batch_size": 256, "eval_samples": 2,
          "reduction": {"method": "savage-dickey"}}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("reduce-cli")
    model, recipe = root / "model.yaml", root / "recipe.yaml"
    model.write_text(yaml.safe_dump(MODEL))
    recipe.write_text(yaml.safe_dump(RECIPE))
    out = str(root / "run")
    fit_run(str(model), str(recipe), "digits", out, progress=False)
    return out


def test_reduce_writes_the_report_and_a_loadable_compact_network(run_dir, capsys):
    assert main(["reduce", run_dir, "--method", "opd", "--sparsity", "0.7", "--samples", "3"]) == 0
    printed = capsys.readouterr().out
    assert "test_accuracy_reduced" in printed and "units kept per layer" in printed
    report = json.load(open(os.path.join(run_dir, "reduction-opd-s0.7.json")))
    for key in ("sparsity", "units_removed", "compression_ratio", "test_accuracy_dense", "test_accuracy_reduced",
                "test_nll_dense", "test_nll_reduced", "flops_dense", "flops_compact", "param_bytes_dense",
                "param_bytes_compact", "layers", "test_accuracy_predictive_reduced"):
        assert key in report
    n_weights = 64 * 16 + 16 * 10
    assert report["weights_total"] == n_weights
    # the rule removed 70%; compaction also drops the weights of units it deleted
    assert report["rule_weights_kept"] == n_weights - round(0.7 * n_weights) >= report["weights_kept"]
    assert report["rule_sparsity"] == pytest.approx(round(0.7 * n_weights) / n_weights)
    assert report["sparsity"] == pytest.approx(1 - report["weights_kept"] / n_weights)
    assert report["max_abs_output_diff"] <= 1e-5
    raw = torch.load(os.path.join(run_dir, "compact-opd-s0.7.pt"), weights_only=True)
    assert [entry["type"] for entry in raw["spec"]["layers"]] == ["linear", "relu", "linear"]
    module = load_compact(os.path.join(run_dir, "compact-opd-s0.7.pt"))
    assert sum(int((m.weight != 0).sum()) for m in module if isinstance(m, torch.nn.Linear)) == report["weights_kept"]
    linears = [m for m in module if isinstance(m, torch.nn.Linear)]
    assert linears[0].out_features == report["layers"]["fc1"]["units_kept"]
    run = load_run(run_dir)
    with torch.no_grad():
        acc = (module(run.dataset.x_test).argmax(-1) == run.dataset.y_test).float().mean().item()
    assert acc == pytest.approx(report["test_accuracy_reduced"])


def test_reduce_defaults_to_the_recipe_rule(run_dir, capsys):
    assert main(["reduce", run_dir]) == 0
    assert "savage-dickey" in capsys.readouterr().out
    assert os.path.exists(os.path.join(run_dir, "reduction-savage-dickey-t0.json"))
    assert main(["reduce", run_dir, "--method", "opd", "--sparsity", "0.5", "--structured"]) == 0
    report = json.load(open(os.path.join(run_dir, "reduction-opd-s0.5-structured.json")))
    assert report["layers"]["fc1"]["units_kept"] == 8 and report["layers"]["fc2"]["units_kept"] == 10


def test_sweep_writes_table_csv_and_plot(run_dir, capsys):
    assert main(["sweep", run_dir, "--method", "magnitude,random", "--sparsities", "0.5,0.9"]) == 0
    out = capsys.readouterr().out
    assert "dense posterior-mean network" in out and out.count("magnitude") >= 2
    base = os.path.join(run_dir, "sweep-magnitude+random")
    result = json.load(open(base + ".json"))
    assert [(r["method"], r["target_sparsity"]) for r in result["rows"]] == [
        ("magnitude", 0.5), ("magnitude", 0.9), ("random", 0.5), ("random", 0.9)]
    rows = list(csv.DictReader(open(base + ".csv")))
    assert len(rows) == 4 and float(rows[1]["sparsity"]) == pytest.approx(result["rows"][1]["sparsity"])
    with open(base + ".png", "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("argv,message", [
    (["reduce", "{run}", "--method", "obd"], "--method: unknown method 'obd'"),
    (["reduce", "{run}", "--method", "opd", "--sparsity", "1.0"], "--sparsity: must be a fraction in [0, 1), got 1.0"),
    (["reduce", "{run}", "--method", "opd", "--sparsity", "-0.5"], "--sparsity: must be a fraction"),
    (["reduce", "{run}", "--method", "magnitude"], "--sparsity: rule 'magnitude' ranks weights"),
    (["reduce", "{run}", "--method", "spike-slab", "--threshold", "1"], "--threshold: the spike-slab rule"),
    (["reduce", "{missing}", "--method", "opd", "--sparsity", "0.5"], "not a run directory (no such directory)"),
    (["reduce", "{run}", "--method", "opd", "--sparsity", "0.5", "--scope", "unit"], "--scope: expected"),
    (["sweep", "{run}", "--method", "spike-slab"], "--method: unknown method 'spike-slab'"),
    (["sweep", "{run}", "--method", "opd", "--sparsities", "0.5,1.2"], "--sparsities: must be a fraction"),
    (["sweep", "{run}", "--method", "opd", "--sparsities", "0.5,x"], "--sparsities: 'x' is not a number"),
])
def test_bad_flags_exit_2_naming_the_flag(run_dir, tmp_path, capsys, argv, message):
    argv = [a.format(run=run_dir, missing=str(tmp_path / "nope")) for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
