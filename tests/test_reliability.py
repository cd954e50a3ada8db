"""What happens when things go wrong: bad input, numerical faults, killed runs, untrusted files.

Each test states one guarantee of the README section "What happens when things go wrong".
"""

import json
import os
import pickle
import random
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import yaml

from pyro_sparse import checkpoint as ckpt_mod
from pyro_sparse.checkpoint import load_safe, save_atomic
from pyro_sparse.cli import main
from pyro_sparse.data import Dataset, load_dataset, load_digits
from pyro_sparse.distributions import LOG_ALPHA_MAX, LOG_ALPHA_MIN, log_alpha
from pyro_sparse.errors import CheckpointError, DataError, PyroSparseError, PyroSparseWarning, SpecError
from pyro_sparse.fitting import NumericalError, SVITrainer, evaluate
from pyro_sparse.guides import LOG_SCALE_MAX, LOG_SCALE_MIN, MeanFieldGuide, build_guide
from pyro_sparse.layers import Conv2d, Dropout, Linear, MaxPool2d
from pyro_sparse.likelihoods import Gaussian as GaussianLikelihood
from pyro_sparse.network import BayesianNetwork
from pyro_sparse.priors import GaussianGamma
from pyro_sparse.recipe import parse_recipe
from pyro_sparse.runs import build
from pyro_sparse.spec import load_model_spec, parse_model_spec

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = {"layers": [{"type": "linear", "in": "auto", "out": 16}, {"type": "relu"}, {"type": "linear", "out": "auto"}]}
RECIPE = {"epochs": 3, "batch_size": 128, "optimizer": {"name": "Adam", "lr": 0.01}, "eval_samples": 2, "seed": 1,
          "num_threads": 1}


def specs(tmp_path, model=None, **recipe):
    m, r = tmp_path / "m.yaml", tmp_path / "r.yaml"
    m.write_text(yaml.safe_dump(model or SMALL))
    r.write_text(yaml.safe_dump({**RECIPE, **recipe}))
    return str(m), str(r)


def fit_args(m, r, out, *extra, data="digits"):
    return ["fit", "--model", m, "--inference", r, "--data", data, "--out", str(out), "--no-progress", *extra]


def history(out):
    return [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]


def same_numbers(a_dir, b_dir):
    """Exact equality of the final metrics and of every epoch's loss/test figures."""
    a, b = (json.load(open(os.path.join(d, "metrics.json"))) for d in (a_dir, b_dir))
    for key in ("test_accuracy", "test_nll", "epochs", "steps"):
        assert a[key] == b[key], key
    keys = ("epoch", "steps", "loss", "lr", "test_accuracy", "test_nll")
    assert [[h[k] for k in keys] for h in history(a_dir)] == [[h[k] for k in keys] for h in history(b_dir)]


# ============================================================================ 1. input validation
CUDA = torch.cuda.is_available()


@pytest.mark.parametrize("extra,why", [
    (["--seed", "-1"], "--seed must be an integer in [0, 2**32), got -1"),
    (["--seed", str(2**40)], "--seed"),
    (["--epochs", "0"], "--epochs must be a positive integer, got 0"),
    (["--device", "tpu"], "--device: expected 'cpu', 'cuda' or 'cuda:N', got 'tpu'"),
    (["--device", "cuda:x"], "--device"),
    pytest.param(["--device", "cuda"], "CUDA is not available", marks=pytest.mark.skipif(CUDA, reason="has CUDA")),
])
def test_bad_flags_exit_2_before_anything_is_written(tmp_path, capsys, extra, why):
    m, r = specs(tmp_path)
    out = tmp_path / "run"
    assert main(fit_args(m, r, out, *extra)) == 2
    err = capsys.readouterr().err
    assert why in err and "Traceback" not in err and err.count("\n") == 1
    assert not out.exists()


def test_argparse_errors_and_debug(tmp_path, capsys):
    m, r = specs(tmp_path)
    with pytest.raises(SystemExit) as e:
        main(fit_args(m, r, tmp_path / "run", "--epochs", "many"))
    assert e.value.code == 2 and "--epochs" in capsys.readouterr().err
    assert main(["fit", "--out", str(tmp_path / "run")]) == 2
    assert "fit needs --model, --data" in capsys.readouterr().err
    with pytest.raises(PyroSparseError, match="--seed"):
        main(["--debug", *fit_args(m, r, tmp_path / "run", "--seed", "-5")])
    assert main(["evaluate", str(tmp_path / "nothing")]) == 2
    assert "not a run directory" in capsys.readouterr().err
    for argv in (["evaluate", str(tmp_path), "--samples", "0"], ["report", str(tmp_path), "--seed", "-1"],
                 ["report", str(tmp_path), "--samples", "1"], ["compare", str(tmp_path), "--samples", "1"]):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert "--s" in err and "Traceback" not in err, argv


def _npz(tmp_path, **arrays):
    p = tmp_path / "d.npz"
    np.savez(p, **arrays)
    return str(p)


X = np.random.default_rng(0).random((10, 3))


@pytest.mark.parametrize("arrays,why", [
    ({"x_train": X, "y_train": np.r_[np.arange(9.0), np.nan]}, "contains 1 NaN or infinite"),
    ({"x_train": X, "y_train": np.r_[np.arange(9.0), np.inf]}, "contains 1 NaN or infinite"),
    ({"x_train": X, "y_train": np.arange(10) + 0.5j},
     "y_train must be numeric (bool, integer or float), got dtype complex"),
    ({"x_train": X, "y_train": np.arange(10).astype("M8[D]")}, "y_train must be numeric"),
    ({"x_train": X, "y_train": np.array(list("abcdefghij"))}, "y_train must be numeric"),
    ({"x_train": X, "y_train": np.zeros((10, 2), int)}, "vector of class labels"),
    ({"x_train": np.float64(3.0), "y_train": np.zeros(10, int)}, "x_train must be an array with one row"),
    ({"x_train": X, "y_train": np.full(10, 10**9)}, "imply 1000000001 classes"),
    ({"x_train": X * 1e300, "y_train": np.arange(10.0)}, "too large for float32"),
    ({"x_train": X, "y_train": np.arange(10) % 3, "num_classes": np.array(2.5)}, "num_classes must be one integer"),
    ({"x_train": X, "y_train": np.arange(10) % 3, "num_classes": np.array([3, 4])}, "num_classes must be one integer"),
])
def test_bad_data_files_name_file_key_and_value(tmp_path, arrays, why):
    path = _npz(tmp_path, **arrays)
    with pytest.raises(DataError) as e:
        load_dataset(path)
    assert path in str(e.value) and why in str(e.value)


def test_bad_csv_and_idx(tmp_path):
    binary = tmp_path / "b.csv"
    binary.write_bytes(b"a,y\n\xff\xfe,1\n")
    with pytest.raises(DataError, match="not a UTF-8 text file"):
        load_dataset(str(binary), target="y")
    only = tmp_path / "o.csv"
    only.write_text("y\n1\n2\n3\n")
    with pytest.raises(DataError, match="no feature columns besides the target 'y'"):
        load_dataset(str(only), target="y")
    nan_target = tmp_path / "n.csv"
    nan_target.write_text("a,y\n" + "".join(f"{i},{'nan' if i == 3 else i * 0.5}\n" for i in range(10)))
    with pytest.raises(DataError, match="contains 1 NaN"):
        load_dataset(str(nan_target), target="y")
    idx = tmp_path / "idx"
    idx.mkdir()
    (idx / "train-images-idx3-ubyte.gz").write_bytes(b"\x1f\x8b\x08\x00garbage")
    with pytest.raises(DataError, match="cannot read IDX file"):
        load_dataset(str(idx))
    with pytest.raises(DataError, match="expected a data set name or a path, got None"):
        load_dataset(None)


def test_data_that_does_not_fit_the_model_exit_2(tmp_path, capsys):
    reg = {**SMALL, "likelihood": {"type": "gaussian"}}
    m, r = specs(tmp_path, model=reg)
    assert main(fit_args(m, r, tmp_path / "a")) == 2
    assert "gaussian likelihood needs real-valued targets but the data have class labels" in capsys.readouterr().err
    m, r = specs(tmp_path)
    assert main(fit_args(m, r, tmp_path / "b", data="sparse-regression")) == 2
    assert "categorical likelihood needs class labels" in capsys.readouterr().err
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_recipe_values_torch_would_only_reject_later(tmp_path):
    for recipe, path in [({"optimizer": {"name": "Adam", "lr": 0.1, "betas": "fast"}}, "optimizer"),
                         ({"optimizer": {"name": "LBFGS", "lr": 0.1}}, "optimizer"),
                         ({"schedule": {"name": "step"}}, "schedule"),
                         ({"schedule": {"name": "exponential", "gamma": "x"}}, "schedule"),
                         ({"schedule": {"name": ["step"]}}, "schedule.name"),
                         ({"seed": 2**40}, "seed"), ({"nan_lr_factor": 2.0}, "nan_lr_factor"),
                         ({"device": "cuda:x"}, "device"), ({"num_threads": 10**6}, "num_threads"),
                         ({"grad_clip": 10**400}, "grad_clip")]:
        with pytest.raises(SpecError) as e:
            parse_recipe(recipe, "r.yaml")
        assert f"r.yaml: {path}" in str(e.value), (recipe, str(e.value))
    # YAML reads 1e-3 as a string; it is a number here
    assert parse_recipe({"optimizer": {"name": "Adam", "lr": "1e-3"}})["optimizer"]["lr"] == 1e-3


def test_spec_values_that_only_fail_when_sampling_or_building(tmp_path):
    bad_group = parse_model_spec({"layers": [{"type": "linear", "out": "auto",
                                              "bias_prior": {"type": "gaussian_gamma", "group": "input"}}]}, "s.yaml")
    from pyro_sparse.spec import build_network

    with pytest.raises(SpecError, match=r"s.yaml: layers\[0\]: .*group 'input' is not an axis"):
        build_network(bad_group, (5,), 3, source="s.yaml")
    with pytest.raises(SpecError, match=r"layers\[0\].type: unknown layer type \['linear'\]"):
        parse_model_spec({"layers": [{"type": ["linear"]}]})
    with pytest.raises(SpecError, match=r"layers\[0\].out: expected a positive integer"):
        parse_model_spec({"layers": [{"type": "linear", "out": 1.5}]})
    with pytest.raises(SpecError, match=r"prior.scale: expected a number > 0, got 1000000000"):
        parse_model_spec({**SMALL, "prior": {"type": "gaussian", "scale": 10**400}})


@pytest.fixture(scope="module")
def tiny_net():
    return BayesianNetwork([Linear(64, 10)])


@pytest.mark.parametrize("make,match", [
    (lambda net: Linear(0, 3), "Linear in_features must be a positive integer, got 0"),
    (lambda net: Linear(3, 3, bias="yes"), "Linear bias must be true or false, got 'yes'"),
    (lambda net: Linear(3, 3, prior=123), "expected a Prior, a prior name or a mapping with 'type', got 123"),
    (lambda net: Linear(3, 3, prior={"scale": 1.0}), "with 'type'"),
    (lambda net: Linear(3, 3, prior={"type": "gaussian", "scale": -1}), "Gaussian.scale: expected a number > 0"),
    (lambda net: Conv2d(1, 2, 3, padding=-1), "Conv2d padding must be an integer >= 0, got -1"),
    (lambda net: MaxPool2d(0), "MaxPool2d.kernel_size: expected an integer > 0, got 0"),
    (lambda net: Dropout(1.0), "dropout p must be in [0, 1), got 1.0"),
    (lambda net: GaussianGamma(group="row"), "GaussianGamma.group: expected one of"),
    (lambda net: GaussianLikelihood(noise=0.0), "Gaussian.noise: expected a number > 0, got 0.0"),
    (lambda net: BayesianNetwork([Linear(2, 2)], likelihood="poisson"), "unknown likelihood 'poisson'"),
    (lambda net: BayesianNetwork([Linear(2, 2)], input_shape=(0,)), "input_shape must be a sequence of positive"),
    (lambda net: BayesianNetwork([("a.b", Linear(2, 2))]), "without '.', got 'a.b'"),
    (lambda net: BayesianNetwork([("training", Linear(2, 2))]), "invalid layer name"),
    (lambda net: BayesianNetwork([]), "at least one layer"),
    (lambda net: MeanFieldGuide(net.model, init_scale=0), "MeanFieldGuide init_scale must be a positive number"),
    (lambda net: MeanFieldGuide(net.model, init_scale=10**400), "init_scale"),
    (lambda net: MeanFieldGuide(net.model, local_reparam="no"), "local_reparam must be true or false"),
    (lambda net: MeanFieldGuide(None), "model must be a callable Pyro model"),
    (lambda net: build_guide(["meanfield"], net.model), "unknown guide"),
])
def test_python_api_errors_name_the_argument_and_value(tiny_net, make, match):
    with pytest.raises(ValueError) as e:
        make(tiny_net)
    assert match in str(e.value)


def test_trainer_arguments(digits, tiny_net):
    guide = MeanFieldGuide(tiny_net.model)
    with pytest.raises(DataError, match="dataset must be a pyro_sparse.data.Dataset, got tuple"):
        SVITrainer(tiny_net, guide, (digits.x_train, digits.y_train), {})
    with pytest.raises(SpecError, match="<recipe>: epochs: method svi trains for at least one epoch, got 0"):
        SVITrainer(tiny_net, guide, digits, {"epochs": 0})
    wrong = BayesianNetwork([Linear(5, 10)])
    with pytest.raises(DataError, match="digits: the network cannot run on these data"):
        SVITrainer(wrong, MeanFieldGuide(wrong.model), digits, {"epochs": 1})
    reg = BayesianNetwork([Linear(64, 1)], likelihood="gaussian")
    with pytest.raises(DataError, match="needs real-valued targets"):
        SVITrainer(reg, MeanFieldGuide(reg.model), digits, {"epochs": 1})
    # a plain mapping is validated and filled in like a YAML recipe
    t = SVITrainer(tiny_net, guide, digits, {"epochs": 1, "optimizer": {"name": "SGD", "lr": "1e-2"}}, progress=False)
    assert t.recipe["batch_size"] == 128 and t.optimizer.param_groups[0]["lr"] == 0.01
    with pytest.raises(SpecError, match="SVITrainer.fit.epochs: expected a positive integer, got 0"):
        t.fit(epochs=0)
    with pytest.raises(ValueError, match="evaluate: num_samples must be a positive integer, got 0"):
        evaluate(tiny_net, guide, digits.x_test, digits.y_test, num_samples=0)
    with pytest.raises(DataError, match="d: x_test has 3 rows but y_test has 2"):
        Dataset("d", torch.ones(4, 2), torch.zeros(4), torch.ones(3, 2), torch.zeros(2), "classification", 2)
    with pytest.raises(DataError, match="task must be 'classification', 'regression' or 'sequence', got 'ranking'"):
        Dataset("d", torch.ones(4, 2), torch.zeros(4), torch.ones(2, 2), torch.zeros(2), "ranking", 2)
    with pytest.raises(SpecError, match="expected a path to a YAML file, got 3"):
        load_model_spec(3)  # an int would otherwise be opened as a file descriptor


# ============================================================================ 2. numerical faults
def make_trainer(out_dir=None, epochs=3, **recipe):
    data = load_digits()
    spec = parse_model_spec(SMALL)
    rec = parse_recipe({**RECIPE, "epochs": epochs, **recipe})
    net, guide = build(spec, rec, data)
    return SVITrainer(net, guide, data, rec, out_dir=out_dir, progress=False)


def inject(trainer, at, kind="loss"):
    """Make the loss (or, with ``kind='gradient'``, only the gradient of fc1's weight loc) NaN at
    the given calls of the loss function (1-based). Returns the call counter."""
    calls = {"n": 0}
    original = trainer.elbo.differentiable_loss

    def loss_fn(*args, **kwargs):
        calls["n"] += 1
        loss = original(*args, **kwargs)
        if at == "always" or calls["n"] in at:
            if kind == "loss":
                return loss * float("nan")
            p = trainer.guide.locs["fc1__weight"]
            # forward value 0, backward NaN: d/dp sqrt(-(|p| + 1)) is NaN and where() passes 0 * NaN
            poison = torch.where(torch.zeros_like(p, dtype=torch.bool), (-(p.abs() + 1)).sqrt(), 0.0).sum()
            return loss + poison
        return loss

    trainer.elbo.differentiable_loss = loss_fn
    return calls


def test_nan_loss_detected_at_its_step_and_recovered_from_the_checkpoint(tmp_path):
    """12 steps per epoch; a NaN at step 17 (epoch 2, batch 5) stops the epoch there (no further
    steps), restores epoch 1's checkpoint from disk, halves the learning rate and carries on."""
    t = make_trainer(str(tmp_path))
    calls = inject(t, {17})
    with pytest.warns(PyroSparseWarning) as record:
        metrics = t.fit()
    msg = str(record[0].message)
    assert msg == (f"non-finite loss at step 17 (epoch 2, batch 5 of 12); restored checkpoint "
                   f"{tmp_path / 'checkpoint.pt'} (epoch 1) and lowered the learning rate to 0.005 (retry 1 of 3)")
    assert calls["n"] == 36 + 5  # three good epochs plus the five steps of the aborted attempt
    assert t.recoveries == [{"epoch": 2, "step": 17, "batch": 5, "what": "loss", "retry": 1, "lr": 0.005}]
    assert [h["lr"] for h in t.history] == [0.01, 0.005, 0.005]
    assert metrics["nan_recoveries"] == 1 and np.isfinite(metrics["test_nll"]) and metrics["steps"] == 36
    # the recovered run's first epoch is the uninterrupted run's first epoch
    clean = make_trainer(None)
    clean.fit()
    assert t.history[0]["loss"] == clean.history[0]["loss"]
    assert t.history[1]["loss"] != clean.history[1]["loss"]


def test_nan_gradient_detected_without_a_checkpoint(tmp_path):
    """With a finite loss and a NaN gradient, the step is refused before the update and the
    in-memory state is restored (no out_dir)."""
    t = make_trainer(None, epochs=2)
    calls = inject(t, {3}, kind="gradient")
    with pytest.warns(PyroSparseWarning, match=r"non-finite gradient of locs.fc1__weight at step 3 \(epoch 1, "
                                               r"batch 3 of 12\); restored the in-memory state of epoch 0"):
        t.fit()
    assert calls["n"] == 24 + 3 and t.recoveries[0]["what"] == "gradient of locs.fc1__weight"
    assert all(bool(p.isfinite().all()) for p in t.guide.parameters())


def test_deferred_check_reports_the_first_faulty_step(tmp_path):
    """The accelerator path (no host read per step): the epoch runs to its end, then the fault
    is reported with the index of the first faulty step, recorded on the device."""
    t = make_trainer(str(tmp_path))
    t.check_each_step = False
    calls = inject(t, {17, 20})
    with pytest.warns(PyroSparseWarning, match=r"non-finite loss or gradient at step 17 \(epoch 2, batch 5 of 12\)"):
        t.fit()
    assert calls["n"] == 36 + 12 and t.recoveries[0]["step"] == 17


def test_persistent_nan_stops_with_a_clear_message_after_the_retries(tmp_path):
    t = make_trainer(str(tmp_path), nan_retries=2, nan_lr_factor=0.1)
    calls = inject(t, set(range(13, 1000)))
    with pytest.warns(PyroSparseWarning), pytest.raises(NumericalError) as e:
        t.fit()
    msg = str(e.value)
    assert msg.startswith("training diverged: non-finite loss at step 13 (epoch 2, batch 1 of 12), and it did not "
                          "recover after 2 retries (nan_retries: 2), each restoring the last good state and "
                          "multiplying the learning rate by nan_lr_factor 0.1")
    assert f"the last good checkpoint is {tmp_path / 'checkpoint.pt'}" in msg and "Lower optimizer.lr" in msg
    assert calls["n"] == 12 + 3  # epoch 1, then three attempts that each fail at their first step
    assert [r["lr"] for r in t.recoveries] == pytest.approx([1e-3, 1e-4])  # checkpoint's 0.01 * 0.1, * 0.1**2
    assert load_safe(str(tmp_path / "checkpoint.pt"))["epoch"] == 1  # the good checkpoint is untouched
    # through the CLI: exit 2, one line
    t2 = make_trainer(None, nan_retries=0)
    inject(t2, "always")
    with pytest.raises(NumericalError, match=r"after 0 retries \(nan_retries: 0\)"):
        t2.fit()


def test_documented_clamps():
    """Guide scales live in [exp(LOG_SCALE_MIN), exp(LOG_SCALE_MAX)] = [exp(-12), exp(4)];
    log alpha in [LOG_ALPHA_MIN, LOG_ALPHA_MAX] = [-20, 20]."""
    assert (LOG_SCALE_MIN, LOG_SCALE_MAX, LOG_ALPHA_MIN, LOG_ALPHA_MAX) == (-12.0, 4.0, -20.0, 20.0)
    q = MeanFieldGuide._distribution("normal", torch.zeros(3), torch.tensor([-100.0, 0.0, 100.0]))
    assert torch.equal(q.scale, torch.tensor([-12.0, 0.0, 4.0]).exp())
    la = log_alpha(torch.tensor([0.0, 1e6, 1.0]), torch.tensor([1.0, 1e-6, 1.0]))
    assert la.tolist() == [20.0, -20.0, 0.0]


# ============================================================================ 3. checkpoints
def test_save_atomic_keeps_a_loadable_checkpoint_at_every_instant(tmp_path, monkeypatch):
    path = str(tmp_path / "c.pt")
    save_atomic({"v": torch.tensor(1)}, path)
    save_atomic({"v": torch.tensor(2)}, path)
    assert load_safe(path)["v"] == 2 and load_safe(path + ".prev")["v"] == 1

    def torn(obj, f):  # the process dies half-way through writing the new file
        f.write(b"PK\x03\x04partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", torn)
    with pytest.raises(KeyboardInterrupt):
        save_atomic({"v": torch.tensor(3)}, path)
    monkeypatch.undo()
    assert load_safe(path)["v"] == 2 and load_safe(path + ".prev")["v"] == 2
    assert sorted(os.listdir(tmp_path)) == ["c.pt", "c.pt.prev"]  # no temporary file left behind

    def dies_after_rotation(p, write):  # killed after .prev was updated, before the new file exists
        raise KeyboardInterrupt

    monkeypatch.setattr(ckpt_mod, "_atomic_write", dies_after_rotation)
    with pytest.raises(KeyboardInterrupt):
        save_atomic({"v": torch.tensor(4)}, path)
    assert load_safe(path)["v"] == 2  # checkpoint.pt was never missing


def test_truncated_checkpoint_is_detected_and_the_previous_one_used(tmp_path, capsys):
    m, r = specs(tmp_path, epochs=2)
    assert main(fit_args(m, r, tmp_path / "straight")) == 0
    out = tmp_path / "cut"
    assert main(fit_args(m, r, out)) == 0
    (out / "metrics.json").unlink()
    raw = (out / "checkpoint.pt").read_bytes()
    (out / "checkpoint.pt").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(CheckpointError, match=r"checkpoint.pt: corrupt or truncated checkpoint"):
        load_safe(str(out / "checkpoint.pt"))
    capsys.readouterr()
    assert main(["fit", "--resume", "--out", str(out), "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert "warning:" in err and "corrupt or truncated" in err and "checkpoint.pt.prev (epoch 1)" in err
    same_numbers(tmp_path / "straight", out)
    # the corrupt file never became the "previous good" one
    assert load_safe(str(out / "checkpoint.pt.prev"))["epoch"] == 1
    assert load_safe(str(out / "checkpoint.pt"))["epoch"] == 2
    # both unusable: a clear error naming both, exit 2
    (out / "checkpoint.pt").write_bytes(b"")
    (out / "checkpoint.pt.prev").write_bytes(raw[:100])
    assert main(["fit", "--resume", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "checkpoint.pt: corrupt" in err and "the previous checkpoint is unusable too" in err


class Evil:
    """Unpickling this runs a shell command (the classic pickle exploit)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("how", ["pickle", "torch.save"])
def test_crafted_pickle_checkpoint_is_refused_and_never_runs(tmp_path, capsys, how):
    m, r = specs(tmp_path, epochs=1)
    out = tmp_path / "run"
    assert main(fit_args(m, r, out)) == 0
    marker = tmp_path / "pwned"
    payload = {"format": 1, "guide": Evil(marker)}
    for name in ("checkpoint.pt", "checkpoint.pt.prev"):
        with open(out / name, "wb") as f:
            pickle.dump(payload, f, protocol=2) if how == "pickle" else torch.save(payload, f)
    with pytest.raises(CheckpointError, match="refused: the file contains objects other than tensors"):
        load_safe(str(out / "checkpoint.pt"))
    (out / "metrics.json").unlink()  # so that evaluate has to load the checkpoint
    capsys.readouterr()
    assert main(["evaluate", str(out)]) == 2
    assert "refused" in capsys.readouterr().err
    assert main(["fit", "--resume", "--out", str(out)]) == 2
    assert "refused" in capsys.readouterr().err
    assert not marker.exists()


def test_sigkill_at_a_random_point_then_resume_matches_an_uninterrupted_run(tmp_path):
    """``python -m pyro_sparse fit`` in a subprocess, SIGKILLed at a random moment after a
    random epoch's checkpoint; ``fit --resume`` then ends with exactly the figures of an
    uninterrupted run with the same seed."""
    epochs = 12
    m, r = specs(tmp_path, epochs=epochs)
    assert main(fit_args(m, r, tmp_path / "straight")) == 0
    rng = random.Random(int.from_bytes(os.urandom(4), "little"))
    after_epoch, delay = rng.randint(1, epochs // 2), rng.uniform(0.0, 0.05)
    out = tmp_path / "killed"
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.Popen([sys.executable, "-m", "pyro_sparse", *fit_args(m, r, out)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while not ((out / "metrics.jsonl").exists() and len(history(out)) >= after_epoch):
            assert proc.poll() is None, proc.stderr.read().decode()
            assert time.monotonic() < deadline, "the subprocess made no progress"
            time.sleep(0.002)
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, f"finished before the kill (epoch {after_epoch} + {delay:.3f}s)"
    assert not (out / "metrics.json").exists()
    done = load_safe(str(out / "checkpoint.pt"))["epoch"]
    assert after_epoch <= done < epochs
    assert main(["fit", "--resume", "--out", str(out), "--no-progress"]) == 0
    same_numbers(tmp_path / "straight", out)
    assert not [f for f in os.listdir(out) if f.startswith(".tmp-")]


# ============================================================================ 4. no overwrite
def test_output_directories_are_never_overwritten_without_overwrite(tmp_path, capsys):
    """``fit`` refuses a non-empty --out, ``compare --out`` an existing file; ``report`` only adds
    its own files to a run directory."""
    m, r = specs(tmp_path, epochs=1)
    run = tmp_path / "run"
    assert main(fit_args(m, r, run)) == 0
    before = {f: (run / f).read_bytes() for f in os.listdir(run)}
    assert main(fit_args(m, r, run, "--seed", "5")) == 2
    assert "exists and is not empty; use --resume to continue it or --overwrite" in capsys.readouterr().err
    # --overwrite with a bad spec: validated first, the old run is still intact
    bad = tmp_path / "bad.yaml"
    bad.write_text("layers: [{type: linear, out: -1}]")
    assert main(["fit", "--model", str(bad), "--inference", r, "--data", "digits", "--out", str(run),
                 "--overwrite"]) == 2
    assert {f: (run / f).read_bytes() for f in os.listdir(run)} == before
    # --overwrite replaces a previous run ...
    assert main(fit_args(m, r, run, "--seed", "5", "--overwrite")) == 0
    assert json.load(open(run / "run.json"))["seed"] == 5
    # ... but never a directory that is not a run
    other = tmp_path / "home"
    other.mkdir()
    (other / "thesis.tex").write_text("precious")
    assert main(fit_args(m, r, other, "--overwrite")) == 2
    assert "only replaces a previous run directory" in capsys.readouterr().err
    assert (other / "thesis.tex").read_text() == "precious" and len(os.listdir(other)) == 1
    afile = tmp_path / "file"
    afile.write_text("x")
    assert main(fit_args(m, r, afile, "--overwrite")) == 2 and afile.read_text() == "x"
    # compare --out never replaces an existing file without --overwrite
    table = tmp_path / "table.md"
    table.write_text("mine")
    capsys.readouterr()
    assert main(["compare", str(run), "--out", str(table)]) == 2
    assert "table.md: exists; use --overwrite to replace it" in capsys.readouterr().err
    assert table.read_text() == "mine"
    # predict --out never replaces an existing file without --overwrite
    inputs = tmp_path / "inputs.npz"
    np.savez(inputs, x=load_digits().x_test[:5].numpy())
    predictions = tmp_path / "pred.csv"
    predictions.write_text("mine")
    assert main(["predict", str(run), "--data", str(inputs), "--out", str(predictions)]) == 2
    assert "pred.csv: exists; use --overwrite to replace it" in capsys.readouterr().err
    assert predictions.read_text() == "mine"
    # export --out never replaces an existing file without --overwrite
    graph = tmp_path / "net.pt"
    graph.write_text("mine")
    assert main(["export", str(run), "--format", "torchscript", "--out", str(graph)]) == 2
    assert "net.pt: exists; use --overwrite to replace it" in capsys.readouterr().err
    assert graph.read_text() == "mine"
    # report adds its own files to a run directory and never modifies the run's files
    before = {f: (run / f).read_bytes() for f in os.listdir(run)}
    assert main(["report", str(run), "--samples", "4", "--threads", "1"]) == 0
    assert {f: (run / f).read_bytes() for f in before} == before and (run / "report.md").exists()
    # every subcommand with an output option is covered here
    from pyro_sparse.cli import build_parser

    sub = next(a for a in build_parser()._actions if a.dest == "command")
    writers = {name for name, p in sub.choices.items() if any("--out" in a.option_strings for a in p._actions)}
    covered = {"fit", "compare", "predict", "export"}
    assert writers == covered, f"new writing commands {writers - covered} need a test here"


# ============================================================================ 5. reproducibility
def test_run_json_and_the_fingerprint_warning_of_evaluate(tmp_path, capsys):
    m, r = specs(tmp_path, epochs=1)
    run = tmp_path / "run"
    assert main(fit_args(m, r, run)) == 0
    info = json.load(open(run / "run.json"))
    assert info["seed"] == 1 and info["data"] == "digits"
    assert info["data_fingerprint"] == load_digits().fingerprint()
    assert info["versions"]["torch"] == torch.__version__.split("+")[0] or info["versions"]["torch"]
    assert set(info["versions"]) >= {"pyro_sparse", "python", "torch", "pyro-ppl", "numpy"}
    assert info["model_spec"]["layers"][0]["out"] == 16 and info["recipe"]["epochs"] == 1
    capsys.readouterr()
    assert main(["evaluate", str(run), "--data", "digits"]) == 0
    assert "warning" not in capsys.readouterr().err
    d = load_digits()
    other = _npz(tmp_path, x_train=d.x_train.numpy(), y_train=d.y_train.numpy(), x_test=d.x_test.numpy()[::-1],
                 y_test=d.y_test.numpy()[::-1])
    assert main(["evaluate", str(run), "--data", other]) == 0
    captured = capsys.readouterr()
    assert captured.err.count("\n") == 1
    assert captured.err.startswith(f"pyro-sparse evaluate: warning: {run}: evaluating on '{other}', whose "
                                   "fingerprint differs from the data this run was fitted on ('digits'")
    assert "test_accuracy" in captured.out
