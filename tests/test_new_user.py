"""What a new user hits (issue #17): each test replays one report through the CLI where the user
met it, on small files written here (scikit-learn's breast-cancer and diabetes data), and states
the behaviour that replaced it."""

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import yaml

from pyro_sparse.cli import main
from pyro_sparse.data import load_dataset
from pyro_sparse.errors import DataError, PyroSparseWarning, SpecError
from pyro_sparse.fitting import NumericalError, SVITrainer
from pyro_sparse.recipe import parse_recipe
from pyro_sparse.runs import build, load_run
from pyro_sparse.spec import parse_model_spec

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HIDDEN = [{"type": "linear", "in": "auto", "out": 16}, {"type": "relu"}]
RECIPES = {
    "core": {"guide": "meanfield", "local_reparam": True},
    "pyro": {"guide": "meanfield", "local_reparam": True, "elbo": "pyro"},
    "map": {"guide": "delta", "local_reparam": False},
}


def write(tmp_path, name, mapping):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(mapping))
    return str(path)


def model(tmp_path, likelihood, out="auto", data=None, name="m.yaml"):
    spec = {"layers": HIDDEN + [{"type": "linear", "out": out}], "likelihood": {"type": likelihood},
            "data": {"inputs": "standardize"} if data is None else data}
    return write(tmp_path, name, spec)


def recipe(tmp_path, name="r.yaml", **options):
    base = {"epochs": 4, "batch_size": 64, "optimizer": {"name": "Adam", "lr": 0.03}, "eval_samples": 4, "seed": 0,
            "num_threads": 1}
    return write(tmp_path, name, {**base, **options})


def fit(m, r, data, out, *extra):
    return main(["fit", "--model", m, "--inference", r, "--data", str(data), "--out", str(out), "--quiet", *extra])


def metrics(out):
    return json.load(open(os.path.join(out, "metrics.json")))


def breast_cancer(tmp_path, kind="csv", rows=240):
    """Breast-cancer data with 0/1 labels: CSV (integer labels), NPZ with int64 or float64 labels."""
    from sklearn.datasets import load_breast_cancer

    d = load_breast_cancer()
    idx = np.random.default_rng(0).permutation(len(d.target))[:rows]
    x, y = d.data[idx], d.target[idx]
    if kind == "csv":
        path = tmp_path / "breast_cancer.csv"
        header = ",".join([f"f{j}" for j in range(x.shape[1])] + ["target"])
        body = "\n".join(",".join([*(f"{v:.6g}" for v in row), str(int(label))]) for row, label in zip(x, y))
        path.write_text(header + "\n" + body + "\n")
    else:
        path = tmp_path / f"breast_cancer_{kind}.npz"
        np.savez(path, x_train=x, y_train=y.astype(np.int64 if kind == "npz-int" else np.float64))
    return str(path)


def diabetes_csv(tmp_path, rows=None):
    """scikit-learn's diabetes data (raw units) as a CSV whose target column holds whole numbers."""
    from sklearn.datasets import load_diabetes

    d = load_diabetes(scaled=False)
    x, y = d.data[:rows], d.target[:rows].astype(np.int64)
    path = tmp_path / "diabetes.csv"
    header = ",".join([*d.feature_names, "target"])
    path.write_text(header + "\n" + "\n".join(",".join([*(f"{v:.6g}" for v in row), str(t)])
                                              for row, t in zip(x, y)) + "\n")
    return str(path)


# ============================================================================ 1. Bernoulli from data files
@pytest.mark.parametrize("kind", ["csv", "npz-int", "npz-float"])
@pytest.mark.parametrize("how", ["core", "pyro", "map"])
def test_bernoulli_fits_integer_and_float_labels_from_files(tmp_path, kind, how):
    """0/1 labels, integer (CSV, int64 NPZ) or float (float64 NPZ), fit with a Bernoulli
    likelihood on the ELBO core, Pyro's ELBO and MAP; ``out: auto`` is one output."""
    data = breast_cancer(tmp_path, kind)
    out = tmp_path / "run"
    extra = ["--target", "target"] if kind == "csv" else []
    assert fit(model(tmp_path, "bernoulli"), recipe(tmp_path, **RECIPES[how]), data, out, *extra) == 0
    m = metrics(out)
    assert m["elbo_path"] == ("pyro" if how == "pyro" else "core")
    assert m["test_accuracy"] > 0.85 and m["test_nll"] < 0.5
    run = load_run(str(out))
    assert run.dataset.task == "classification" and run.dataset.y_train.dtype == torch.int64
    assert run.network.layers["fc2"].out_features == 1
    assert set(run.dataset.y_train.tolist()) == {0, 1}


def test_bernoulli_with_out_1_and_the_python_api(tmp_path):
    data = breast_cancer(tmp_path, "npz-float")
    out = tmp_path / "run"
    assert fit(model(tmp_path, "bernoulli", out=1), recipe(tmp_path), data, out) == 0
    assert metrics(out)["test_accuracy"] > 0.85
    # without a likelihood to say so, float labels are real values; task= makes them labels
    assert load_dataset(data).task == "regression"
    labels = load_dataset(data, task="classification")
    assert labels.task == "classification" and labels.num_outputs == 2 and labels.y_test.dtype == torch.int64
    with pytest.raises(DataError, match=r"y_train has 1 non-integer class label\(s\) \(e.g. 0.5\)"):
        np.savez(tmp_path / "half.npz", x_train=np.ones((6, 2)), y_train=np.r_[0.0, 1, 0.5, 1, 0, 1],
                 x_test=np.ones((2, 2)), y_test=np.r_[0.0, 1])
        load_dataset(str(tmp_path / "half.npz"), task="classification")


def test_a_failed_fit_leaves_no_partial_run_directory(tmp_path, capsys):
    """A fit that fails before its first checkpoint removes the directory it created; a
    directory the user already had stays (only fit's own files go)."""
    data = breast_cancer(tmp_path, "npz-int")
    m, r = model(tmp_path, "bernoulli"), recipe(tmp_path, optimizer={"name": "Adam", "lr": 1.0e6}, nan_retries=0)
    new = tmp_path / "new"
    assert fit(m, r, data, new) == 2
    assert "training diverged" in capsys.readouterr().err and not new.exists()
    mine = tmp_path / "mine"
    mine.mkdir()
    assert fit(m, r, data, mine) == 2
    assert mine.is_dir() and os.listdir(mine) == []
    # a run that failed after its first checkpoint is kept: --resume continues it
    good = recipe(tmp_path, "good.yaml", epochs=1)
    kept = tmp_path / "kept"
    assert fit(m, good, data, kept) == 0
    assert sorted(os.listdir(kept)) == ["checkpoint.pt", "inference.yaml", "metrics.json", "metrics.jsonl",
                                        "model.yaml", "run.json"]


# ============================================================================ 2. whole-number regression targets
def test_whole_number_targets_are_regression_targets_under_a_gaussian_likelihood(tmp_path):
    """Diabetes (integer targets) through the CLI with a Gaussian likelihood, ``out: 1`` and
    standardised inputs and targets; RMSE and NLL come out in the data's units."""
    data = diabetes_csv(tmp_path)
    m = model(tmp_path, "gaussian", out=1, data={"inputs": "standardize", "targets": "standardize"})
    r = recipe(tmp_path, epochs=30, optimizer={"name": "Adam", "lr": 0.01}, eval_samples=8)
    out = tmp_path / "run"
    assert fit(m, r, data, out, "--target", "target") == 0
    run = load_run(str(out))
    d = run.dataset
    assert d.task == "regression" and d.num_outputs == 1 and d.y_train.dtype == torch.float32
    y_train = d.y_train.double()
    t = d.extras["target_transform"]
    assert t["mode"] == "standardize"
    assert t["mean"] == pytest.approx([y_train.mean().item()], rel=1e-9)
    assert t["scale"] == pytest.approx([y_train.std(unbiased=False).item()], rel=1e-9)
    assert d.y_test.min() > 20 and float(d.y_test.max()) == float(d.y_test.max().round())  # raw units kept
    # the trainer's figures are those of the predictive in the data's units
    torch.manual_seed(3)
    got = run.trainer.evaluate()
    torch.manual_seed(3)
    raw = run.network.sample_outputs(d.x_test, run.guide, run.recipe["eval_samples"])  # standardised outputs
    mean, scale = t["mean"][0], t["scale"][0]
    pred = mean + scale * raw.mean(0)
    rmse = (pred - d.y_test).square().mean().sqrt().item()
    logp = torch.distributions.Normal(mean + scale * raw, scale).log_prob(d.y_test).sum(-1)
    nll = -(torch.logsumexp(logp, 0) - math.log(raw.shape[0])).mean().item()
    assert got["test_rmse"] == pytest.approx(rmse, rel=1e-5) and got["test_nll"] == pytest.approx(nll, rel=1e-5)
    # and it learned something: better than predicting the training mean, close to a linear model
    from sklearn.linear_model import BayesianRidge

    ridge = BayesianRidge().fit(d.x_train.numpy(), d.y_train[:, 0].numpy())
    ridge_rmse = float(np.sqrt(np.mean((ridge.predict(d.x_test.numpy()) - d.y_test[:, 0].numpy()) ** 2)))
    baseline = (d.y_test - y_train.mean()).square().mean().sqrt().item()
    assert metrics(out)["test_rmse"] < baseline and metrics(out)["test_rmse"] < 1.25 * ridge_rmse


def test_the_spec_decides_the_task_and_its_data_options_are_checked(tmp_path, capsys):
    data = diabetes_csv(tmp_path, rows=60)
    with pytest.warns(PyroSparseWarning, match=r"the test set holds class\(es\) 65, 69, 100"):
        assert load_dataset(data, target="target").task == "classification"  # nothing says otherwise: labels
    assert load_dataset(data, target="target", task="regression").task == "regression"
    assert load_dataset(data, target="target", options={"task": "regression"}, task="classification").task == \
        "regression"  # the spec's explicit data.task wins over the likelihood's
    with pytest.warns(PyroSparseWarning), pytest.raises(DataError, match="data targets: standardize applies to real"):
        load_dataset(data, target="target", options={"targets": "standardize"})  # labels: refused
    with pytest.raises(DataError, match="task must be one of"):
        load_dataset(data, target="target", task="ranking")
    with pytest.raises(SpecError, match=r"m.yaml: data.task: task classification contradicts the gaussian likelihood"):
        parse_model_spec({"layers": HIDDEN, "likelihood": "gaussian", "data": {"task": "classification"}}, "m.yaml")
    with pytest.raises(SpecError, match=r"data.targets: targets: standardize applies to regression targets"):
        parse_model_spec({"layers": HIDDEN, "likelihood": "categorical", "data": {"targets": "standardize"}})
    # through the CLI: one line, exit 2, nothing written
    bad = write(tmp_path, "bad.yaml", {"layers": HIDDEN + [{"type": "linear", "out": 1}], "likelihood": "bernoulli",
                                       "data": {"task": "regression"}})
    assert fit(bad, recipe(tmp_path), data, tmp_path / "a", "--target", "target") == 2
    err = capsys.readouterr().err
    assert "bad.yaml: data.task: task regression contradicts the bernoulli likelihood" in err and err.count("\n") == 1
    # method laplace fits raw targets: standardised ones are refused, naming the method
    m = model(tmp_path, "gaussian", out=1, data={"targets": "standardize"})
    laplace = recipe(tmp_path, "l.yaml", method="laplace", guide="delta")
    assert fit(m, laplace, data, tmp_path / "b", "--target", "target") == 2
    assert "method 'laplace' fits the raw targets" in capsys.readouterr().err
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


# ============================================================================ 3. divergence
def digits_trainer(out_dir=None, **options):
    from pyro_sparse.data import load_digits

    data = load_digits()
    spec = parse_model_spec({"layers": HIDDEN + [{"type": "linear", "out": "auto"}]})
    rec = parse_recipe({"epochs": 3, "batch_size": 128, "optimizer": {"name": "Adam", "lr": 0.01}, "eval_samples": 2,
                        "seed": 1, **options})
    net, guide = build(spec, rec, data)
    return SVITrainer(net, guide, data, rec, out_dir=out_dir, progress=False)


def explode(trainer, at, factor=1e9):
    """Multiply the loss of the given steps (1-based calls of the trainer's loss) by ``factor``."""
    calls = {"n": 0}
    original = trainer.elbo.differentiable_loss

    def loss_fn(*args, **kwargs):
        calls["n"] += 1
        loss = original(*args, **kwargs)
        return loss * factor if calls["n"] in at else loss

    trainer.elbo.differentiable_loss = loss_fn
    return calls


def test_a_huge_learning_rate_is_caught_and_exits_2(tmp_path, capsys):
    """lr 1e6: the loss per datum jumps to ~1e20 while staying finite; it is refused like a NaN,
    retried at lower learning rates, then NumericalError -> exit 2 (README)."""
    m = model(tmp_path, "categorical", data={})
    r = recipe(tmp_path, optimizer={"name": "Adam", "lr": 1.0e6}, nan_retries=1)
    assert fit(m, r, "digits", tmp_path / "run") == 2
    err = capsys.readouterr().err
    assert "warning: loss" in err and "at step 2 (epoch 1, batch 2 of 23) exceeds the divergence limit" in err
    assert "error: training diverged: loss" in err and "Lower optimizer.lr" in err
    assert not (tmp_path / "run").exists()


def test_an_exploding_step_is_refused_and_recovered_like_a_nan(tmp_path):
    t = digits_trainer(str(tmp_path))
    calls = explode(t, {17})
    with pytest.warns(PyroSparseWarning, match=r"at step 17 \(epoch 2, batch 5 of 12\) exceeds the divergence "
                                               r"limit .* restored checkpoint .* \(epoch 1\)"):
        out = t.fit()
    assert calls["n"] == 36 + 5  # the faulty step is refused before its update; epoch 2 is repeated
    assert t.recoveries == [{"epoch": 2, "step": 17, "batch": 5, "what": "loss above the divergence limit",
                             "retry": 1, "lr": 0.005}]
    assert out["nan_recoveries"] == 1 and out["test_accuracy"] > 0.5
    # the limit: L0 + 1000 max(|L0|, 1) per datum, L0 at the start with the full KL weight
    l0 = t.loss_reference
    assert 1 < l0 < 1e3 and t._loss_limit == pytest.approx((l0 + 1000 * abs(l0)) * t.num_train)
    # a growth by less than the factor is a legitimate loss
    quiet = digits_trainer(None)
    explode(quiet, {17}, factor=50.0)
    quiet.fit()
    assert quiet.recoveries == []


def test_the_deferred_check_and_the_off_switch(tmp_path):
    t = digits_trainer(None)
    t.check_each_step = False  # the accelerator path: one flag per step, read with the epoch's loss
    explode(t, {14, 15})
    with pytest.warns(PyroSparseWarning, match=r"non-finite loss or gradient at step 14 \(epoch 2, batch 2 of 12\), "
                                               r"or a loss above the divergence limit"):
        t.fit()
    off = digits_trainer(None, divergence_factor=None)
    explode(off, {14}, factor=1e6)
    off.fit()
    assert off.recoveries == [] and off._loss_limit is None


def test_the_reference_loss_does_not_change_the_run(monkeypatch):
    """L0 is computed with a random draw of its own: a run's numbers are those it had without it."""
    with_ref = digits_trainer(None, epochs=2)
    with_ref.fit()
    monkeypatch.setattr(SVITrainer, "reference_loss", lambda self: None)
    without = digits_trainer(None, epochs=2)
    without.fit()
    assert with_ref.loss_reference is not None and without.loss_reference is None
    assert [h["loss"] for h in with_ref.history] == [h["loss"] for h in without.history]


def test_an_exploding_held_out_nll_is_a_fault(tmp_path):
    t = digits_trainer(None, epochs=2)
    original, calls = t.evaluate, {"n": 0}

    def evaluate(num_samples=None):
        calls["n"] += 1
        figures = original(num_samples)
        return {**figures, "test_nll": 7e20} if calls["n"] == 1 else figures

    t.evaluate = evaluate
    with pytest.warns(PyroSparseWarning, match=r"held-out NLL 7e\+20 per example after epoch 1 exceeds the divergence "
                                               r"limit 2.3e\+03 \(divergence_factor 1000 x log 10"):
        t.fit()
    assert t.recoveries[0]["what"] == "held-out NLL above the divergence limit" and t.epoch == 2
    stuck = digits_trainer(None, epochs=1, nan_retries=0)
    stuck.evaluate = lambda num_samples=None: {"test_accuracy": 0.1, "test_nll": float("nan")}
    with pytest.raises(NumericalError, match="non-finite held-out test_nll"):
        stuck.fit()


def test_absurd_inputs_point_the_advice_at_the_data(tmp_path, capsys):
    rng = np.random.default_rng(0)
    x = rng.random((120, 5))
    x[:, 2] *= 1e36
    path = tmp_path / "absurd.npz"
    np.savez(path, x_train=x, y_train=rng.integers(0, 2, 120))
    assert fit(model(tmp_path, "categorical", data={}), recipe(tmp_path, nan_retries=1), path, tmp_path / "run") == 2
    err = capsys.readouterr().err.splitlines()[-1]
    assert "training diverged: non-finite loss at step 1" in err
    assert "Likely cause: the inputs reach |x| = 9.95e+35 (x_train column 2)" in err
    assert "data: {inputs: standardize}" in err and "Lower optimizer.lr" not in err


# ============================================================================ 6. resume corners
def test_resume_extends_a_finished_run_and_stretches_its_cosine_schedule(tmp_path, capsys):
    m = model(tmp_path, "categorical", data={})
    r = recipe(tmp_path, epochs=2, schedule={"name": "cosine"}, optimizer={"name": "Adam", "lr": 0.01})
    out = tmp_path / "run"
    assert fit(m, r, "digits", out) == 0
    assert main(["fit", "--resume", "--out", str(out), "--epochs", "4", "--quiet"]) == 0
    assert metrics(out)["epochs"] == 4
    lrs = [json.loads(line)["lr"] for line in open(out / "metrics.jsonl")]
    # epochs 1-2 on the 2-epoch cosine, 3-4 on the 4-epoch one from where it stands (t = 2, 3)
    assert lrs == pytest.approx([0.01, 0.005, 0.01 * (1 + math.cos(math.pi / 2)) / 2,
                                 0.01 * (1 + math.cos(3 * math.pi / 4)) / 2])
    assert yaml.safe_load(open(out / "inference.yaml"))["epochs"] == 4
    assert json.load(open(out / "run.json"))["epoch_changes"] == [{"from": 2, "to": 4, "epochs_done": 2}]
    # a later plain resume keeps the new length; lowering below the epochs done is refused
    assert main(["fit", "--resume", "--out", str(out), "--quiet"]) == 0 and metrics(out)["epochs"] == 4
    capsys.readouterr()
    assert main(["fit", "--resume", "--out", str(out), "--epochs", "3"]) == 2
    err = capsys.readouterr().err
    assert "--epochs 3 is below the 4 epochs this run has already done" in err and err.count("\n") == 1


def test_resume_refuses_other_specs_or_data_naming_the_difference(tmp_path, capsys):
    m = model(tmp_path, "categorical", data={})
    r = recipe(tmp_path, epochs=1)
    out = tmp_path / "run"
    assert fit(m, r, "digits", out, "--epochs", "1") == 0
    capsys.readouterr()
    other = write(tmp_path, "other.yaml", {"layers": [{"type": "linear", "in": "auto", "out": 32}, {"type": "relu"},
                                                      {"type": "linear", "out": "auto"}]})
    faster = recipe(tmp_path, "faster.yaml", epochs=1, optimizer={"name": "Adam", "lr": 0.1})
    for flag, value, why in [("--model", other, "layers[0].out: 16 vs 32"),
                             ("--inference", faster, "optimizer.lr: 0.03 vs 0.1"),
                             ("--data", "mnist1d", "'digits' vs 'mnist1d'")]:
        assert main(["fit", "--resume", "--out", str(out), flag, value]) == 2, flag
        err = capsys.readouterr().err
        assert f"{flag} {value} differs from this run's" in err and why in err and err.count("\n") == 1, err
    # the run's own files (the recipe's flag-set keys aside) are accepted
    assert main(["fit", "--resume", "--out", str(out), "--model", m, "--inference", r, "--data", "digits",
                 "--quiet"]) == 0


def test_evaluate_on_data_with_other_features_says_so(tmp_path, capsys):
    m = model(tmp_path, "categorical", data={})
    out = tmp_path / "run"
    assert fit(m, recipe(tmp_path, epochs=1), "digits", out) == 0
    rng = np.random.default_rng(0)
    narrow = tmp_path / "narrow.npz"
    np.savez(narrow, x_train=rng.random((40, 10)), y_train=rng.integers(0, 10, 40))
    capsys.readouterr()
    assert main(["evaluate", str(out), "--data", str(narrow)]) == 2
    err = capsys.readouterr().err
    assert (f"narrow.npz: examples have 10 feature(s) but the network of {out} was fitted on examples with 64 "
            "feature(s) ('digits'); the features do not match the network") in err
    assert "corrupt" not in err and err.count("\n") == 1
    # fewer classes than the network has are fine: it keeps its 10 outputs
    three = tmp_path / "three.npz"
    np.savez(three, x_train=rng.random((40, 64)), y_train=np.arange(40) % 3)
    assert main(["evaluate", str(out), "--data", str(three)]) == 0
    assert "test_accuracy" in capsys.readouterr().out


# ============================================================================ 8. logs, files, examples, data errors
def test_progress_is_one_line_per_epoch_when_stderr_is_not_a_terminal(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("PYRO_SPARSE_NO_PROGRESS", raising=False)
    m, r = model(tmp_path, "categorical", data={}), recipe(tmp_path, epochs=2)
    args = ["fit", "--model", m, "--inference", r, "--data", "digits", "--out"]
    assert main([*args, str(tmp_path / "a")]) == 0
    lines = capsys.readouterr().err.splitlines()
    # one start-up line saying how each site's KL is computed, then one line per epoch
    assert lines[0].startswith("fit: KL paths: ") and "fused local" in lines[0]
    lines = lines[1:]
    assert [line.split("  ")[0] for line in lines] == ["fit: epoch 1/2", "fit: epoch 2/2"]
    assert "test_accuracy" in lines[1] and "\r" not in "".join(lines)
    for flag in ("--quiet", "--no-progress"):
        assert main([*args, str(tmp_path / flag), flag]) == 0
        assert capsys.readouterr().err == ""


@pytest.mark.parametrize("umask,mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_run_files_honour_the_umask(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        out = tmp_path / "run"
        assert fit(model(tmp_path, "categorical", data={}), recipe(tmp_path, epochs=1), "digits", out) == 0
    finally:
        os.umask(old)
    modes = {name: os.stat(out / name).st_mode & 0o777 for name in os.listdir(out)}
    assert len(modes) == 6 and set(modes.values()) == {mode}, modes


def test_the_horseshoe_example_writes_into_its_output_directory(tmp_path):
    """It never writes into the source tree: the figure goes to --out (default runs/examples/,
    git-ignored), and the figure it used to overwrite is no longer tracked."""
    sys.path.insert(0, os.path.join(ROOT, "examples"))
    try:
        import horseshoe_digits
    finally:
        sys.path.pop(0)
    assert horseshoe_digits.DEFAULT_OUT == os.path.join(ROOT, "runs", "examples")
    assert "runs/" in open(os.path.join(ROOT, ".gitignore")).read().split()
    if os.path.isdir(os.path.join(ROOT, ".git")) or os.path.isfile(os.path.join(ROOT, ".git")):
        tracked = subprocess.run(["git", "-C", ROOT, "ls-files", "examples"], capture_output=True, text=True)
        assert tracked.returncode != 0 or not [f for f in tracked.stdout.split() if f.endswith(".png")]
    env = {**os.environ, "PYTHONPATH": ROOT}
    done = subprocess.run([sys.executable, os.path.join(ROOT, "examples", "horseshoe_digits.py"), "--epochs", "1",
                           "--out", str(tmp_path / "figs")], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert os.listdir(tmp_path / "figs") == ["horseshoe_unit_scales.png"]


def test_nan_counts_are_those_of_the_file_as_read(tmp_path):
    """The count (and where) is that of the file, not of the train/test parts it is split into."""
    rng = np.random.default_rng(0)
    y = rng.random(20)
    y[[2, 9, 14, 17]] = np.nan
    path = tmp_path / "d.npz"
    np.savez(path, x_train=rng.random((20, 3)), y_train=y)
    with pytest.raises(DataError, match=r"d.npz: y_train contains 4 NaN or infinite value\(s\) \(rows 2, 9, 14, 17\)$"):
        load_dataset(str(path))
    csv = tmp_path / "d.csv"
    rows = [f"{i},{'nan' if i in (3, 7) else i * 2},{'inf' if i == 5 else i % 2}" for i in range(12)]
    csv.write_text("a,bmi,y\n\n" + "\n".join(rows) + "\n")  # a blank line 2: data start on line 3
    with pytest.raises(DataError) as e:
        load_dataset(str(csv), target="y")
    assert str(e.value) == (f"{csv}: contains 3 NaN or infinite value(s): column 'y' (the target): 1 (line 8); "
                            "column 'bmi': 2 (lines 6, 10)")


def test_test_classes_never_seen_in_training_warn(tmp_path, capsys):
    rng = np.random.default_rng(0)
    path = tmp_path / "d.npz"
    np.savez(path, x_train=rng.random((30, 4)), y_train=np.arange(30) % 2, x_test=rng.random((6, 4)),
             y_test=np.array([0, 1, 2, 3, 3, 1]))
    with pytest.warns(PyroSparseWarning, match=r"the test set holds class\(es\) 2, 3 \(3 of 6 test examples\) that "
                                               "never occur in the training set"):
        load_dataset(str(path))
    assert fit(model(tmp_path, "categorical", data={}), recipe(tmp_path, epochs=1), path, tmp_path / "run") == 0
    assert "fit: warning: " in capsys.readouterr().err


def test_lbfgs_is_refused_in_the_recipe(tmp_path, capsys):
    with pytest.raises(SpecError, match=r"r.yaml: optimizer.name: LBFGS needs a closure .* not supported for "
                                        "mini-batch SVI"):
        parse_recipe({"optimizer": {"name": "LBFGS", "lr": 0.1}}, "r.yaml")
    r = recipe(tmp_path, optimizer={"name": "LBFGS"})
    assert fit(model(tmp_path, "categorical", data={}), r, "digits", tmp_path / "run") == 2
    err = capsys.readouterr().err
    assert "optimizer.name: LBFGS needs a closure" in err and err.count("\n") == 1


# ============================================================================ 4. results not overwritten
def test_reduction_files_name_their_options_and_are_not_replaced(tmp_path, capsys):
    m, r = model(tmp_path, "categorical"), recipe(tmp_path, epochs=2)
    assert fit(m, r, "digits", tmp_path / "run") == 0
    run = str(tmp_path / "run")
    for q in ("0.9", "0.99"):
        assert main(["reduce", run, "--method", "opd", "--sparsity", q]) == 0
    assert os.path.exists(os.path.join(run, "reduction-opd-s0.9.json"))
    assert os.path.exists(os.path.join(run, "compact-opd-s0.99.pt"))
    report = json.load(open(os.path.join(run, "reduction-opd-s0.9.json")))
    assert report["rule_sparsity"] == pytest.approx(0.9, abs=1e-3)
    before = open(os.path.join(run, "reduction-opd-s0.9.json")).read()
    capsys.readouterr()
    assert main(["reduce", run, "--method", "opd", "--sparsity", "0.9", "--seed", "3"]) == 2
    err = capsys.readouterr().err
    assert "reduction-opd-s0.9.json: exists" in err and "--overwrite" in err
    assert open(os.path.join(run, "reduction-opd-s0.9.json")).read() == before
    assert main(["reduce", run, "--method", "opd", "--sparsity", "0.9", "--structured"]) == 0  # another name
    assert main(["reduce", run, "--method", "opd", "--sparsity", "0.9", "--overwrite"]) == 0
    assert main(["sweep", run, "--method", "opd", "--sparsities", "0.5"]) == 0
    assert main(["sweep", run, "--method", "opd", "--sparsities", "0.5"]) == 2


# ============================================================================ 5. self-contained run directories
def test_a_run_finds_its_data_from_anywhere_and_takes_data_when_it_moved(tmp_path, capsys, monkeypatch):
    csv = breast_cancer(tmp_path)
    m = model(tmp_path, "bernoulli", data={"inputs": "center"})
    r = recipe(tmp_path, epochs=2)
    monkeypatch.chdir(tmp_path)
    assert fit(m, r, "breast_cancer.csv", "run", "--target", "target") == 0  # a relative path, as typed
    info = json.load(open(tmp_path / "run" / "run.json"))
    assert info["data"] == os.path.abspath(csv) and info["data_as_given"] == "breast_cancer.csv"
    assert info["input_transform"]["mode"] == "center" and len(info["input_transform"]["mean"]) == 30
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    run = str(tmp_path / "run")
    assert main(["reduce", run, "--method", "log-alpha"]) == 0  # found by its absolute path
    compact = torch.load(os.path.join(run, "compact-log-alpha-t3.pt"), weights_only=True)
    assert compact["info"]["input_transform"] == info["input_transform"]  # the compact file carries it
    moved = tmp_path / "moved.csv"
    os.rename(csv, moved)
    capsys.readouterr()
    assert main(["report", run, "--samples", "3"]) == 2
    err = capsys.readouterr().err
    assert "is not there any more" in err and "--data" in err
    assert main(["report", run, "--samples", "3", "--data", str(moved)]) == 0
    assert "fingerprint" not in capsys.readouterr().err  # the same data, so no warning
    assert main(["sweep", run, "--method", "magnitude", "--sparsities", "0.5", "--data", str(moved)]) == 0


# ============================================================================ 7. honest comparisons
def test_compare_says_when_psis_loo_is_unreliable_and_ranks_by_held_out_density(tmp_path, capsys):
    from pyro_sparse import diagnostics as D

    m, r = model(tmp_path, "categorical", data={"inputs": "raw"}), recipe(tmp_path, epochs=3)
    assert fit(m, r, "digits", tmp_path / "a") == 0
    assert fit(m, recipe(tmp_path, "r2.yaml", epochs=3, seed=1), "digits", tmp_path / "b") == 0
    capsys.readouterr()
    assert main(["compare", str(tmp_path / "a"), str(tmp_path / "b"), "--samples", "20", "--out",
                 str(tmp_path / "cmp.md")]) == 0
    out = capsys.readouterr().out
    run = load_run(str(tmp_path / "a"))
    idata = D.run_inference_data(run, 20)
    share = D.loo_reliability(D.loo(idata))
    assert share > 0  # a network with 1,210 weights and 20 draws: PSIS-LOO fails
    assert "PSIS-LOO is NOT reliable" in out and "held-out log predictive density" in out
    assert "weight" not in out.split("\n")[1].split()  # no stacking weights column
    h = D.held_out(idata)
    lpd = np.asarray(idata.held_out["lpd"])
    assert h["n"] == len(run.dataset.y_test) and h["elpd"] == pytest.approx(lpd.sum())
    assert h["se"] == pytest.approx(math.sqrt(lpd.size * lpd.var()))
    text = (tmp_path / "cmp.md").read_text()
    assert "PSIS-LOO is NOT reliable" in text and "elpd_test" in text


def test_small_scales_are_not_rounded_to_zero_in_the_report(tmp_path):
    from pyro_sparse.report import _fmt

    assert _fmt(1.2e-4) == "1.200e-04" and _fmt(0.0) == "0" and _fmt(0.5) == "0.5"


# ============================================================================ 8. a fast front door
def test_the_command_line_checks_flags_and_paths_before_importing_torch(tmp_path):
    """`pyro-sparse --help` and a wrong flag or path answer before torch is imported (measured:
    0.14 s for --help against 4.6 s before; see `python -X importtime -m pyro_sparse --help`)."""
    script = """
import sys
from pyro_sparse.cli import main
codes = [main(["fit", "--model", "/no/such.yaml", "--data", "digits", "--out", "OUT"]),
         main(["reduce", "/no/such/run", "--method", "opd"]), main(["report", "/no/such/run"]),
         main(["evaluate", "/no/such/run"]), main(["fit", "--model", "M", "--data", "no/such.csv", "--out", "OUT"])]
assert codes == [2] * 5, codes
assert "torch" not in sys.modules, "the command line imported torch before checking its arguments"
print("ok")
""".replace("OUT", str(tmp_path / "out")).replace('"M"', repr(__file__))
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "ok", out.stdout + out.stderr
    assert "--data: no/such.csv: no such file" in out.stderr
