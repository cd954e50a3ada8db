"""Data: built-in sets, users' file formats written by the tests, and clear errors."""

import gzip
import struct

import numpy as np
import pytest
import torch

from pyro_sparse.data import load_dataset, load_digits, load_mnist1d, load_sparse_regression, read_idx
from pyro_sparse.errors import DataError


def test_digits():
    d = load_digits()
    assert d.x_train.shape == (1437, 64) and d.x_test.shape == (360, 64)
    assert 0 <= d.x_train.min() and d.x_train.max() <= 1
    assert d.num_outputs == 10 and d.image_shape == (1, 8, 8)
    assert d.fingerprint() == load_digits().fingerprint()  # fixed split


def test_mnist1d_is_generated_locally(monkeypatch):
    import requests

    monkeypatch.setattr(requests, "get", lambda *a, **k: pytest.fail("mnist1d tried to download"))
    d = load_mnist1d(num_samples=500)
    assert d.x_train.shape == (400, 40) and d.x_test.shape == (100, 40) and d.num_outputs == 10


def test_sparse_regression_support():
    d = load_sparse_regression()
    beta = np.array(d.extras["true_beta"])
    assert d.task == "regression" and np.count_nonzero(beta) == 5
    x, y = d.x_train.numpy(), d.y_train.numpy()[:, 0]
    resid = y - x @ beta
    assert abs(resid.std() - 0.5) < 0.06


def test_npz_with_and_without_test_split(tmp_path):
    rng = np.random.default_rng(0)
    p = tmp_path / "d.npz"
    np.savez(p, x_train=rng.random((50, 3)), y_train=rng.integers(0, 4, 50))
    d = load_dataset(str(p))
    assert d.task == "classification" and len(d.x_train) == 40 and len(d.x_test) == 10
    p2 = tmp_path / "r.npz"
    np.savez(p2, x_train=rng.random((30, 3)), y_train=rng.random(30), x_test=rng.random((5, 3)), y_test=rng.random(5))
    d2 = load_dataset(str(p2))
    assert d2.task == "regression" and d2.y_test.shape == (5, 1)


def test_csv(tmp_path):
    p = tmp_path / "d.csv"
    rows = ["a,b,label"] + [f"{i * 0.1},{i % 3},{i % 2}" for i in range(20)]
    p.write_text("\n".join(rows) + "\n")
    d = load_dataset(str(p), target="label")
    assert d.task == "classification" and d.num_outputs == 2 and d.x_train.shape[1] == 2
    with pytest.raises(DataError, match="no column 'y'"):
        load_dataset(str(p), target="y")
    with pytest.raises(DataError, match="--target"):
        load_dataset(str(p))
    bad = tmp_path / "bad.csv"
    bad.write_text("a,label\n1,0\nx,1\n")
    with pytest.raises(DataError, match=r"line 3, column 'a': not a number"):
        load_dataset(str(bad), target="label")


def _idx_bytes(arr, code):
    header = struct.pack(">BBBB", 0, 0, code, arr.ndim) + b"".join(struct.pack(">I", s) for s in arr.shape)
    return header + arr.astype(">u1" if code == 8 else arr.dtype).tobytes()


@pytest.mark.parametrize("gz", [False, True])
def test_idx_directory(tmp_path, gz):
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 12), ("t10k", 4)):
        images = rng.integers(0, 256, (n, 5, 5)).astype(np.uint8)
        labels = rng.integers(0, 10, n).astype(np.uint8)
        for stem, arr in ((f"{prefix}-images-idx3-ubyte", images), (f"{prefix}-labels-idx1-ubyte", labels)):
            data = _idx_bytes(arr, 8)
            if gz:
                (tmp_path / (stem + ".gz")).write_bytes(gzip.compress(data))
            else:
                (tmp_path / stem).write_bytes(data)
    d = load_dataset(str(tmp_path))
    assert d.x_train.shape == (12, 25) and d.image_shape == (1, 5, 5) and d.x_train.max() <= 1
    name = "train-images-idx3-ubyte" + (".gz" if gz else "")
    assert read_idx(str(tmp_path / name)).shape == (12, 5, 5)


def test_idx_errors(tmp_path):
    p = tmp_path / "x-idx1-ubyte"
    p.write_bytes(b"\x00\x00\x08\x01\x00\x00\x00\x05\x01\x02")
    with pytest.raises(DataError, match="needs 5"):
        read_idx(str(p))
    p.write_bytes(b"PK\x03\x04garbage")
    with pytest.raises(DataError, match="magic"):
        read_idx(str(p))
    with pytest.raises(DataError, match="missing IDX file"):
        load_dataset(str(tmp_path))


def _npz(tmp_path, **arrays):
    p = tmp_path / "bad.npz"
    np.savez(p, **arrays)
    return str(p)


@pytest.mark.parametrize("arrays,why", [
    ({"x_train": np.array([[1.0, np.nan]] * 4), "y_train": np.zeros(4, int)}, "NaN or infinite"),
    ({"x_train": np.array([[1.0, np.inf]] * 4), "y_train": np.zeros(4, int)}, "NaN or infinite"),
    ({"x_train": np.ones((4, 2)), "y_train": np.zeros(3, int)}, "4 rows but y_train has 3"),
    ({"x_train": np.ones((4, 2)), "y_train": np.array([0, 1, -1, 0])}, "negative class label"),
    ({"x_train": np.ones((4, 2)), "y_train": np.array([0, 1, 5, 0]), "num_classes": np.array(3)},
     "labels outside 0..2"),
    ({"x_train": np.ones((0, 2)), "y_train": np.zeros(0, int)}, "empty"),
    ({"y_train": np.zeros(4, int)}, "missing array 'x_train'"),
    ({"x_train": np.ones((4, 2)), "y_train": np.zeros(4, int), "x_test": np.ones((2, 2))}, "both x_test and y_test"),
    ({"x_train": np.ones((4, 2)), "y_train": np.zeros(4, int), "x_test": np.ones((2, 3)), "y_test": np.zeros(2, int)},
     "x_test rows"),
])
def test_bad_data_errors(tmp_path, arrays, why):
    with pytest.raises(DataError, match=why):
        load_dataset(_npz(tmp_path, **arrays))


def test_missing_empty_and_unknown_files(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        load_dataset(str(tmp_path / "nope.npz"))
    empty = tmp_path / "e.csv"
    empty.write_text("")
    with pytest.raises(DataError, match="empty"):
        load_dataset(str(empty), target="y")
    other = tmp_path / "d.parquet"
    other.write_text("x")
    with pytest.raises(DataError, match="unknown data format"):
        load_dataset(str(other))
    pickled = tmp_path / "p.npz"
    np.savez(pickled, x_train=np.array([{"a": 1}] * 3, dtype=object), y_train=np.zeros(3))
    with pytest.raises(DataError, match="pickles"):
        load_dataset(str(pickled))
    assert torch.is_tensor(load_digits().x_train)


def test_center_and_standardize_use_training_statistics(tmp_path):
    rng = np.random.default_rng(0)
    x_train = rng.uniform(0, 4, size=(50, 3)).astype(np.float32)
    x_train[:, 2] = 7.0  # a constant feature: standardize must not divide by 0
    x_test = rng.uniform(0, 4, size=(20, 3)).astype(np.float32)
    y_train, y_test = rng.integers(0, 2, 50), rng.integers(0, 2, 20)
    path = tmp_path / "d.npz"
    np.savez(path, x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)
    mean = x_train.mean(0)
    raw = load_dataset(str(path))
    assert torch.equal(raw.x_train, torch.from_numpy(x_train)) and "input_transform" not in raw.extras
    c = load_dataset(str(path), options={"inputs": "center"})
    np.testing.assert_allclose(c.x_train.numpy(), x_train - mean, atol=1e-5)
    np.testing.assert_allclose(c.x_test.numpy(), x_test - mean, atol=1e-5)  # training mean, not the test mean
    assert c.x_train.mean(0).abs().max() < 1e-5 and c.x_test.mean(0).abs().max() > 1e-3
    s = load_dataset(str(path), options={"inputs": "standardize"})
    sd = np.maximum(x_train.std(0, ddof=1), 1e-2)
    np.testing.assert_allclose(s.x_test.numpy(), (x_test - mean) / sd, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(s.x_train.numpy()[:, :2].std(0, ddof=1), 1.0, rtol=1e-4)
    assert torch.all(s.x_train[:, 2] == 0)
    info = s.extras["input_transform"]
    assert info["mode"] == "standardize"
    np.testing.assert_allclose(info["mean"], mean, rtol=1e-5)
    np.testing.assert_allclose(info["scale"], sd, rtol=1e-4)
    assert torch.equal(c.y_train, raw.y_train) and torch.equal(c.y_test, raw.y_test)


def test_data_options_are_checked(tmp_path):
    with pytest.raises(DataError, match=r"data options \['sequence_length'\] do not apply"):
        load_dataset("digits", options={"sequence_length": 10})
    corpus = tmp_path / "c.txt"
    corpus.write_text("abcabcabc " * 50)
    with pytest.raises(DataError, match=r"data options \['inputs'\] do not apply"):
        load_dataset(str(corpus), options={"inputs": "center"})
    with pytest.raises(DataError, match="inputs must be one of"):
        from pyro_sparse.data import transform_inputs
        transform_inputs(load_digits(), "whiten")
