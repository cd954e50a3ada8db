"""The faults a new user met (issue 23), each through the command line: exit status 2 and one line
on stderr naming the file, key, shape or token at fault."""


import numpy as np
import pytest
import torch
import yaml

from pyro_sparse.cli import main
from pyro_sparse.data import load_digits
from pyro_sparse.fitting import SVITrainer

RECIPE = {"epochs": 1, "batch_size": 128, "optimizer": {"name": "Adam", "lr": 0.01}, "eval_samples": 2, "seed": 0}
MLP = {"layers": [{"type": "linear", "in": "auto", "out": 16}, {"type": "relu"}, {"type": "linear", "out": "auto"}]}


def write(tmp_path, name, obj):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(obj))
    return str(path)


def one_error_line(capsys, command, needle):
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"pyro-sparse {command}: error: "), err
    for part in needle if isinstance(needle, (list, tuple)) else [needle]:
        assert part in err[0], err[0]
    return err[0]


@pytest.fixture
def small_run(tmp_path, capsys):
    m, r = write(tmp_path, "m.yaml", MLP), write(tmp_path, "r.yaml", RECIPE)
    out = tmp_path / "run"
    assert main(["fit", "--model", m, "--inference", r, "--data", "digits", "--out", str(out), "--quiet"]) == 0
    capsys.readouterr()
    return out


def test_a_run_directory_deleted_during_the_fit_stops_it(tmp_path, capsys, monkeypatch):
    m, r = write(tmp_path, "m.yaml", MLP), write(tmp_path, "r.yaml", {**RECIPE, "epochs": 3})
    out = tmp_path / "run"
    train_epoch = SVITrainer.train_epoch

    def deleting(self):
        figures = train_epoch(self)
        if self.epoch == 1:  # during the second epoch
            import shutil

            shutil.rmtree(out)
        return figures

    monkeypatch.setattr(SVITrainer, "train_epoch", deleting)
    assert main(["fit", "--model", m, "--inference", r, "--data", "digits", "--out", str(out), "--quiet"]) == 2
    one_error_line(capsys, "fit", [str(out), "disappeared during the fit (after epoch 2)"])
    assert not out.exists()  # nothing recreated it


def test_a_token_outside_the_vocabulary_in_predict(tmp_path, capsys):
    g = np.random.default_rng(0)
    x = g.integers(0, 8, (60, 5))
    data = tmp_path / "tokens.npz"
    np.savez(data, x_train=x[:40], y_train=x[:40, 0] % 3, x_test=x[40:], y_test=x[40:, 0] % 3)
    spec = {"input_shape": [5], "layers": [{"type": "embedding", "num_tokens": 8, "dim": 4},
                                           {"type": "lstm", "hidden_size": 4}, {"type": "linear", "out": "auto"}]}
    m, r = write(tmp_path, "m.yaml", spec), write(tmp_path, "r.yaml", {**RECIPE, "batch_size": 20})
    out = tmp_path / "run"
    assert main(["fit", "--model", m, "--inference", r, "--data", str(data), "--out", str(out), "--quiet"]) == 0
    new = x[40:].copy()
    new[3, 2] = 11
    np.savez(tmp_path / "new.npz", x=new)
    capsys.readouterr()
    code = main(["predict", str(out), "--data", str(tmp_path / "new.npz"), "--out", str(tmp_path / "p.csv")])
    assert code == 2
    one_error_line(capsys, "predict", ["new.npz: token 11 at row 3, position 2", "token ids 0..7"])


def test_a_priors_pattern_that_matches_nothing_is_named(tmp_path, capsys):
    spec = {"module": "examples.bn_cnn_digits:BatchNormCNN", "kwargs": {"channels": 4, "hidden": 8},
            "prior": {"type": "log_uniform"}, "priors": {"haed.*": {"type": "gaussian"}},
            "deterministic": ["features.1", "features.6", "head.2"]}
    m, r = write(tmp_path, "m.yaml", spec), write(tmp_path, "r.yaml", RECIPE)
    args = ["fit", "--model", m, "--inference", r, "--data", "digits", "--out", str(tmp_path / "o"), "--allow-code"]
    assert main(args) == 2
    one_error_line(capsys, "fit", ["m.yaml: priors:", "'haed.*' matches no converted module"])


def test_garbage_checkpoints_are_corrupt_files_not_a_security_refusal(small_run, capsys):
    for name in ("checkpoint.pt", "checkpoint.pt.prev"):
        (small_run / name).write_bytes(bytes(range(256)) * 8)
    (small_run / "metrics.json").unlink()  # evaluate must load the checkpoint
    assert main(["evaluate", str(small_run)]) == 2
    line = one_error_line(capsys, "evaluate", ["checkpoint.pt: corrupt or truncated checkpoint, or not one",
                                               "the previous checkpoint is unusable too"])
    assert "could run code" not in line and "weights_only" not in line and line.count("torch.load stopped") == 2


def test_an_init_state_dict_of_another_width_names_the_key_and_shapes(tmp_path, capsys):
    from examples.bn_cnn_digits import BatchNormCNN

    torch.save(BatchNormCNN(channels=4, hidden=8).state_dict(), tmp_path / "narrow.pt")
    spec = {"module": "examples.bn_cnn_digits:BatchNormCNN", "kwargs": {"channels": 6, "hidden": 8},
            "init": "narrow.pt", "deterministic": ["features.1", "features.6", "head.2"]}
    m, r = write(tmp_path, "m.yaml", spec), write(tmp_path, "r.yaml", RECIPE)
    assert main(["fit", "--model", m, "--inference", r, "--data", "digits", "--out", str(tmp_path / "o"),
                 "--allow-code"]) == 2
    one_error_line(capsys, "fit", ["m.yaml: init:", "features.0.weight has shape [4, 1, 3, 3] in the file but "
                                   "[6, 1, 3, 3] in the module (and 12 more tensors of other shapes)"])


@pytest.mark.parametrize("labels, hint", [((-1, 0), ""), ((-1, 1), "map -1 to 0")])
def test_negative_labels_are_named_as_such(tmp_path, capsys, labels, hint):
    d = load_digits()
    y = np.where(d.y_train.numpy() % 2 == 0, *labels)
    path = tmp_path / "pm.npz"
    np.savez(path, x_train=d.x_train.numpy(), y_train=y, x_test=d.x_test.numpy(), y_test=d.y_test.numpy() % 2)
    m, r = write(tmp_path, "m.yaml", MLP), write(tmp_path, "r.yaml", RECIPE)
    assert main(["fit", "--model", m, "--inference", r, "--data", str(path), "--out", str(tmp_path / "o")]) == 2
    one_error_line(capsys, "fit", [f"y_train has {int((y < 0).sum())} negative class label(s) (labels found: "
                                   f"{labels[0]}, {labels[1]}); class labels must be 0..K-1", hint])
