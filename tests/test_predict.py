"""pyro-sparse predict: a run's posterior predictive or a compact network on new data files (with or
without labels), the run's input transform applied to raw inputs, regression means and standard
deviations in the data's units, and a spec that names a Python class (--allow-code)."""

import csv
import json
import os

import numpy as np
import pytest
import torch
import yaml

from pyro_sparse.cli import main
from pyro_sparse.data import load_dataset, load_digits
from pyro_sparse.reduced_runs import load_compact

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def centred_run(tmp_path_factory):
    """A run fitted on centred inputs (data: {inputs: center}) and its compact network."""
    root = tmp_path_factory.mktemp("predict")
    run = str(root / "run")
    assert main(["fit", "--model", os.path.join(ROOT, "models", "mlp_gaussian_centered.yaml"), "--data", "digits",
                 "--out", run, "--epochs", "3", "--quiet"]) == 0
    assert main(["reduce", run, "--method", "magnitude", "--sparsity", "0.5"]) == 0
    digits = load_digits()  # raw inputs in [0, 1], as a user has them
    labelled = str(root / "test.npz")
    np.savez(labelled, x=digits.x_test.numpy(), y=digits.y_test.numpy())
    unlabelled = str(root / "inputs.npz")
    np.savez(unlabelled, x=digits.x_test[:25].numpy())
    table = str(root / "inputs.csv")
    with open(table, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow([f"p{i}" for i in range(64)])
        writer.writerows(digits.x_test[:10].tolist())
    return {"run": run, "compact": os.path.join(run, "compact-magnitude-s0.5.pt"), "labelled": labelled,
            "unlabelled": unlabelled, "csv": table, "root": root}


def test_predict_a_labelled_file_with_a_centred_input_run(centred_run, capsys):
    out = str(centred_run["root"] / "compact.csv")
    assert main(["predict", centred_run["compact"], "--data", centred_run["labelled"], "--out", out]) == 0
    printed = capsys.readouterr().out
    report = json.load(open(os.path.join(centred_run["run"], "reduction-magnitude-s0.5.json")))
    # the raw inputs are centred as the run's were: the compact network scores what the reduction measured
    accuracy = float(printed.split("accuracy")[1].split()[0])
    assert accuracy == pytest.approx(report["test_accuracy_reduced"], abs=1e-4)
    table = rows(out)
    assert list(table[0]) == ["predicted"] + [f"prob_{k}" for k in range(10)] + ["label"]
    assert len(table) == 360
    probs = np.array([[float(r[f"prob_{k}"]) for k in range(10)] for r in table])
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-4)
    assert np.mean([int(r["predicted"]) == int(r["label"]) for r in table]) == pytest.approx(accuracy, abs=1e-4)
    # without the transform the same network would see other inputs: the compact file carries it
    module = load_compact(centred_run["compact"])
    transform = module.info["input_transform"]
    digits = load_digits()
    with torch.no_grad():
        raw = (module(digits.x_test).argmax(-1) == digits.y_test).float().mean().item()
        centred = (module(digits.x_test - torch.tensor(transform["mean"])).argmax(-1) == digits.y_test).float().mean()
    assert float(centred) == pytest.approx(accuracy, abs=1e-4) and raw != pytest.approx(accuracy, abs=1e-4)

    # the run's posterior predictive (S draws) on the same file
    out_run = str(centred_run["root"] / "run.csv")
    assert main(["predict", centred_run["run"], "--data", centred_run["labelled"], "--out", out_run,
                 "--samples", "20"]) == 0
    printed = capsys.readouterr().out
    assert "posterior predictive, 20 draw(s)" in printed
    assert float(printed.split("accuracy")[1].split()[0]) > 0.8


@pytest.mark.parametrize("kind", ["unlabelled", "csv"])
def test_predict_a_file_without_labels(centred_run, kind, capsys):
    out = str(centred_run["root"] / f"{kind}-pred.csv")
    assert main(["predict", centred_run["compact"], "--data", centred_run[kind], "--out", out]) == 0
    assert "accuracy" not in capsys.readouterr().out
    table = rows(out)
    assert len(table) == (25 if kind == "unlabelled" else 10) and "label" not in table[0]
    digits = load_digits()
    module = load_compact(centred_run["compact"])
    mean = torch.tensor(module.info["input_transform"]["mean"])
    with torch.no_grad():
        expected = torch.softmax(module(digits.x_test[:len(table)] - mean), -1)
    got = torch.tensor([[float(r[f"prob_{k}"]) for k in range(10)] for r in table])
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


def test_predict_writes_npz_arrays_when_asked(centred_run, tmp_path):
    """--out PATH.npz: one array per column (the CSV's), ``predicted`` and ``label`` as integers."""
    csv_out, npz_out = str(tmp_path / "p.csv"), str(tmp_path / "p.npz")
    for out in (csv_out, npz_out):
        assert main(["predict", centred_run["compact"], "--data", centred_run["labelled"], "--out", out]) == 0
    table = rows(csv_out)
    with np.load(npz_out, allow_pickle=False) as f:
        arrays = {k: f[k] for k in f.files}
    assert sorted(arrays) == sorted(table[0])
    assert arrays["predicted"].dtype == np.int64 and arrays["label"].dtype == np.int64
    np.testing.assert_array_equal(arrays["predicted"], [int(r["predicted"]) for r in table])
    np.testing.assert_allclose(arrays["prob_3"], [float(r["prob_3"]) for r in table], rtol=1e-5)


def test_predict_refuses_to_overwrite_and_names_bad_input(centred_run, tmp_path, capsys):
    out = str(tmp_path / "p.csv")
    open(out, "w").write("keep me")
    assert main(["predict", centred_run["compact"], "--data", centred_run["labelled"], "--out", out]) == 2
    assert "--overwrite" in capsys.readouterr().err and open(out).read() == "keep me"
    assert main(["predict", centred_run["compact"], "--data", centred_run["labelled"], "--out", out,
                 "--overwrite"]) == 0
    bad = str(tmp_path / "bad.npz")
    np.savez(bad, x=np.zeros((3, 10), dtype=np.float32))
    assert main(["predict", centred_run["compact"], "--data", bad, "--out", str(tmp_path / "q.csv")]) == 2
    assert "10 features" in capsys.readouterr().err
    assert main(["predict", str(tmp_path / "missing"), "--data", bad, "--out", str(tmp_path / "q.csv")]) == 2


def test_predict_regression_with_standardised_targets_in_data_units(tmp_path, capsys):
    spec = {"name": "reg", "input_shape": "auto", "data": {"targets": "standardize"},
            "prior": {"type": "gaussian", "scale": 1.0},
            "layers": [{"type": "linear", "in": "auto", "out": 16}, {"type": "tanh"},
                       {"type": "linear", "out": "auto"}],
            "likelihood": {"type": "gaussian", "noise": 0.3}}
    spec_path = tmp_path / "reg.yaml"
    spec_path.write_text(yaml.safe_dump(spec))
    run = str(tmp_path / "run")
    assert main(["fit", "--model", str(spec_path), "--inference", os.path.join(ROOT, "inference", "map.yaml"),
                 "--data", "sparse-regression", "--out", run, "--epochs", "20", "--quiet"]) == 0
    assert main(["reduce", run, "--method", "magnitude", "--sparsity", "0.3"]) == 0
    report = json.load(open(os.path.join(run, "reduction-magnitude-s0.3.json")))
    data = load_dataset("sparse-regression")
    test = str(tmp_path / "test.npz")
    np.savez(test, x=data.x_test.numpy(), y=data.y_test.numpy())
    out = str(tmp_path / "pred.csv")
    capsys.readouterr()
    assert main(["predict", os.path.join(run, "compact-magnitude-s0.3.pt"), "--data", test, "--out", out]) == 0
    printed = capsys.readouterr().out
    assert float(printed.split("rmse")[1].split()[0]) == pytest.approx(report["test_rmse_reduced"], rel=1e-4)
    table = rows(out)
    assert list(table[0]) == ["mean", "sd", "target"]
    scale = float(np.std(data.y_train.numpy()))
    # a deterministic network: the predictive sd is the noise, 0.3 in standardised units
    assert float(table[0]["sd"]) == pytest.approx(0.3 * scale, rel=1e-3)
    assert abs(np.mean([float(r["mean"]) for r in table]) - float(data.y_test.mean())) < 3 * scale


def test_a_spec_that_names_a_class_needs_allow_code(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    run = str(tmp_path / "run")
    argv = ["fit", "--model", os.path.join(ROOT, "models", "resnet_digits_sparsevd.yaml"),
            "--inference", os.path.join(ROOT, "inference", "map.yaml"), "--data", "digits", "--out", run,
            "--epochs", "1", "--quiet"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "--allow-code" in err and "examples.resnet_digits:ResidualCNN" in err and not os.path.exists(run)
    assert main([*argv, "--allow-code"]) == 0
    assert main(["reduce", run, "--method", "magnitude", "--sparsity", "0.5"]) == 2  # loading the run imports it
    assert "--allow-code" in capsys.readouterr().err
    assert main(["reduce", run, "--method", "magnitude", "--sparsity", "0.5", "--allow-code"]) == 0
    compact = os.path.join(run, "compact-magnitude-s0.5.pt")
    test = str(tmp_path / "x.npz")
    np.savez(test, x=load_digits().x_test[:7].numpy())
    out = str(tmp_path / "p.csv")
    assert main(["predict", compact, "--data", test, "--out", out]) == 2
    assert main(["predict", compact, "--data", test, "--out", out, "--allow-code"]) == 0
    assert len(rows(out)) == 7
