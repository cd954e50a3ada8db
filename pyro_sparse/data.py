"""Data sets that work offline, and loaders for users' files.

Built in:

* ``digits``: scikit-learn's bundled 8x8 digits (1797 images), features scaled to [0, 1],
  a fixed stratified 80/20 train/test split. Flat vectors of 64; ``image_shape`` (1, 8, 8).
* ``mnist1d``: MNIST-1D (Greydanus 2020) generated locally with ``mnist1d.data.make_dataset``
  (never its download path): 4000/1000 sequences of length 40.
* ``sparse-regression``: y = X beta + noise with a known sparse support (``true_support``).

Users' files: ``.npz`` (``x_train``, ``y_train`` [, ``x_test``, ``y_test``]), ``.csv`` with a
header and a ``target`` column, and MNIST-format IDX files (a directory holding
``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``, ``t10k-images-idx3-ubyte``,
``t10k-labels-idx1-ubyte``, each optionally gzipped), and UTF-8 text corpora (``.txt``,
:func:`load_text`): non-overlapping character sequences for next-character prediction, the
inputs character ids :math:`x_{1..T}`, the targets the next characters :math:`y_t = x_{t+1}`
(task ``sequence``; the likelihood is
:class:`~pyro_sparse.likelihoods.SequenceCategorical`). Every loader checks what it reads and
raises :class:`~pyro_sparse.errors.DataError` naming the file and the problem.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import math
import os
import warnings
from collections import Counter
from dataclasses import dataclass, field, replace

import numpy as np
import torch

from .errors import DataError, PyroSparseWarning, SpecError
from .schema import Field, validate

BUILTIN = ("digits", "mnist1d", "sparse-regression")
#: most classes a label vector may imply (labels are class indices 0..K-1)
MAX_CLASSES = 100_000
_NUMERIC_KINDS = "biuf"  # bool, signed/unsigned int, float (not complex, time, text, object)


@dataclass
class Dataset:
    """Train/test tensors plus what a network needs to size itself."""

    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    task: str  # "classification" | "regression" | "sequence" (next-token targets per position, load_text)
    num_outputs: int  # classes, or regression targets
    image_shape: tuple | None = None
    extras: dict = field(default_factory=dict)

    def __post_init__(self):
        for key in ("x_train", "y_train", "x_test", "y_test"):
            t = getattr(self, key)
            if not torch.is_tensor(t) or t.dim() == 0 or len(t) == 0:
                raise DataError(f"{self.name}: {key} must be a non-empty tensor with one row per example, "
                                f"got {type(t).__name__}{tuple(t.shape) if torch.is_tensor(t) else ''}")
        for split in ("train", "test"):
            x, y = getattr(self, f"x_{split}"), getattr(self, f"y_{split}")
            if len(x) != len(y):
                raise DataError(f"{self.name}: x_{split} has {len(x)} rows but y_{split} has {len(y)}")
        if self.x_train.shape[1:] != self.x_test.shape[1:]:
            raise DataError(f"{self.name}: x_train rows have shape {tuple(self.x_train.shape[1:])} but x_test rows "
                            f"{tuple(self.x_test.shape[1:])}")
        if self.task not in ("classification", "regression", "sequence"):
            raise DataError(f"{self.name}: task must be 'classification', 'regression' or 'sequence', "
                            f"got {self.task!r}")
        if isinstance(self.num_outputs, bool) or not isinstance(self.num_outputs, int) or self.num_outputs < 1:
            raise DataError(f"{self.name}: num_outputs must be a positive integer, got {self.num_outputs!r}")

    @property
    def feature_shape(self) -> tuple:
        return tuple(self.x_train.shape[1:])

    def fingerprint(self) -> str:
        """SHA-256 of the arrays: identifies the data a run saw."""
        h = hashlib.sha256()
        for t in (self.x_train, self.y_train, self.x_test, self.y_test):
            a = t.detach().cpu().contiguous().numpy()
            h.update(str(a.shape).encode())
            h.update(a.tobytes())
        return h.hexdigest()

    def to(self, device):
        for key in ("x_train", "y_train", "x_test", "y_test"):
            setattr(self, key, getattr(self, key).to(device))
        return self


@dataclass
class Batches:
    r"""Data that arrive in mini-batches: any re-iterable of ``(x, y)`` batches (a
    ``torch.utils.data.DataLoader`` over a data set too large to hold as one tensor) with a known
    number of training examples ``num_train``.

    :class:`~pyro_sparse.fitting.SVITrainer` fits on it like on a :class:`Dataset`: the data
    plate of the model scales each batch's log-likelihood by ``num_train / B``, so the ELBO of a
    batch of ``B`` is an unbiased estimate of the full-data ELBO,

    .. math::

        \mathcal{L} pprox rac{N}{B}\sum_{b=1}^{B} \mathbb{E}_q \log p(y_b \mid x_b, w)
                            - \mathrm{KL}(q \,\|\, p),

    the same loss as the in-memory path gives for the same batch. One epoch is one pass over
    ``train`` in the order it yields (a ``DataLoader`` with ``shuffle=True`` reshuffles with its
    own generator). ``test``: held-out batches (or None). Build it with :func:`as_batches`.
    """

    name: str
    train: object
    num_train: int
    test: object = None
    task: str | None = None
    num_outputs: int | None = None
    extras: dict = field(default_factory=dict)
    feature_shape: tuple = ()

    def __post_init__(self):
        if isinstance(self.num_train, bool) or not isinstance(self.num_train, int) or self.num_train < 1:
            raise DataError(f"{self.name}: num_train (the number of training examples) must be a positive "
                            f"integer, got {self.num_train!r}")
        first = first_batch(self.train, self.name)
        self.feature_shape = tuple(first[0].shape[1:])

    def batches_per_epoch(self, batch_size: int) -> int:
        """``len(train)`` where known, else ``ceil(num_train / batch_size)``."""
        try:
            return len(self.train)
        except TypeError:
            return math.ceil(self.num_train / batch_size)

    def to(self, device):
        """Batches are moved to the device one at a time, as they are used."""
        return self


def index_batches(n: int, batch_size: int, generator: torch.Generator | None = None, steps: int | None = None,
                  device=None, shard=None, shuffle: bool = True) -> list:
    """The mini-batches of one epoch as index tensors: a random permutation of ``range(n)`` drawn
    from ``generator`` (``None``: torch's global one; ``shuffle=False``: in order), cut into
    ``steps`` consecutive slices of ``batch_size`` (default: enough to cover it; the last may be
    shorter). ``shard`` (e.g.
    :func:`pyro_sparse.distributed.shard`) takes this rank's part of the permutation first, which
    is the same on every rank. The library's one shuffle-and-batch: every trainer, the pretraining
    of a deterministic twin and the masked fine-tune draw their epochs here."""
    perm = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
    if shard is not None:
        perm = shard(perm)
    if device is not None:
        perm = perm.to(device)
    steps = math.ceil(len(perm) / batch_size) if steps is None else steps
    return [perm[b * batch_size:(b + 1) * batch_size] for b in range(steps)]


def _check_batch_size(batch_size):
    if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1):
        raise ValueError(f"batch_size must be a positive int or None, got batch_size={batch_size!r}")


def data_batches(x, y=None, batch_size=None, need_y=False) -> list:
    """``(x, y)`` batches in order (what a curvature or a predictive streams): chunks of
    ``batch_size`` rows of tensors ``x`` (and ``y``), or the batches of an iterable (a
    ``DataLoader``; then ``y`` is None). A list, so it can be walked twice."""
    _check_batch_size(batch_size)
    if torch.is_tensor(x):
        if x.dim() < 1 or x.shape[0] < 1:
            raise ValueError(f"x must be a tensor with a non-empty batch dimension, got x of shape {tuple(x.shape)}")
        if y is None and need_y:
            raise ValueError("y is required (got y=None)")
        if y is not None and (not torch.is_tensor(y) or y.dim() < 1 or y.shape[0] != x.shape[0]):
            raise ValueError(f"y must be a tensor with the same first dimension as x ({x.shape[0]}), "
                             f"got y of shape {getattr(y, 'shape', None)}")
        step = x.shape[0] if batch_size is None else batch_size
        return [(x[i:i + step], None if y is None else y[i:i + step]) for i in range(0, x.shape[0], step)]
    if y is not None:
        raise ValueError("data: give tensors x and y, or one iterable of (x, y) batches (a DataLoader) and no y")
    out = []
    try:
        items = iter(x)
    except TypeError:
        raise ValueError(f"x must be a tensor or an iterable of (x, y) batches, got {type(x).__name__}") from None
    for item in items:
        if not (isinstance(item, (tuple, list)) and len(item) >= 2 and torch.is_tensor(item[0])):
            raise ValueError(f"data: expected (x, y) batches, got {type(item).__name__}")
        if batch_size is None or len(item[0]) <= batch_size:
            out.append((item[0], item[1]))
        else:
            out.extend(data_batches(item[0], item[1], batch_size))
    if not out:
        raise ValueError("data: no batches")
    return out


def first_batch(batches, name="data"):
    """The first ``(x, y)`` batch of an iterable of batches (DataError if it yields no such thing)."""
    try:
        item = next(iter(batches))
    except StopIteration:
        raise DataError(f"{name}: the data yield no batches") from None
    except TypeError:
        raise DataError(f"{name}: expected an iterable of (x, y) batches, got {type(batches).__name__}") from None
    if not (isinstance(item, (tuple, list)) and len(item) >= 2 and all(torch.is_tensor(t) for t in item[:2])):
        raise DataError(f"{name}: each batch must be a pair of tensors (x, y), got {type(item).__name__}")
    return item[0], item[1]


def as_batches(train, test=None, batch_size: int = 64, num_train: int | None = None, shuffle: bool = True,
               seed: int = 0, name: str | None = None, task: str | None = None,
               num_outputs: int | None = None) -> "Batches":
    """:class:`Batches` from a ``torch.utils.data.Dataset`` (wrapped in a ``DataLoader`` of
    ``batch_size``, shuffled with a generator seeded by ``seed``), a ``DataLoader`` (used as it
    is), or any re-iterable of ``(x, y)`` batches (then ``num_train`` is required). ``test`` alike
    (never shuffled). ``num_train`` defaults to ``len(loader.dataset)``."""
    from torch.utils.data import DataLoader
    from torch.utils.data import Dataset as TorchDataset

    def loader(data, shuffled):
        if data is None or isinstance(data, DataLoader):
            return data
        if isinstance(data, TorchDataset) and hasattr(data, "__len__"):
            generator = torch.Generator().manual_seed(seed) if shuffled else None
            return DataLoader(data, batch_size=batch_size, shuffle=shuffled, generator=generator)
        if hasattr(data, "__iter__") and not torch.is_tensor(data):
            return data
        raise DataError(f"as_batches: expected a torch Dataset, a DataLoader or an iterable of (x, y) batches, "
                        f"got {type(data).__name__}")

    train_loader = loader(train, shuffle)
    if num_train is None:
        dataset = getattr(train_loader, "dataset", None)
        if dataset is None or not hasattr(dataset, "__len__"):
            raise DataError("as_batches: the number of training examples is not known; pass num_train=N "
                            "(the data plate scales each batch by N / batch size)")
        num_train = len(dataset)
    return Batches(name or type(train).__name__, train_loader, num_train, loader(test, False), task, num_outputs)


def _split(x, y, test_fraction, seed, stratify):
    from sklearn.model_selection import train_test_split

    return train_test_split(x, y, test_size=test_fraction, random_state=seed,
                            stratify=y if stratify else None)


def _finish(name, x_train, y_train, x_test, y_test, task, num_outputs=None, image_shape=None, source=None,
            extras=None):
    """Validate arrays and turn them into a :class:`Dataset`."""
    src = source or name
    arrays = {"x_train": x_train, "y_train": y_train, "x_test": x_test, "y_test": y_test}
    for key, a in arrays.items():
        a = np.asarray(a)
        if a.ndim == 0:
            raise DataError(f"{src}: {key} must be an array with one row per example, got a scalar")
        if a.size == 0 or len(a) == 0:
            raise DataError(f"{src}: {key} is empty (shape {a.shape})")
        if a.dtype.kind not in _NUMERIC_KINDS:
            raise DataError(f"{src}: {key} must be numeric (bool, integer or float), got dtype {a.dtype}")
        finite = np.isfinite(a.astype(np.float64))
        if not np.all(finite):
            raise DataError(f"{src}: {key} contains {int(np.sum(~finite))} NaN or infinite value(s)")
        if key.startswith("x") or task != "classification":
            big = np.abs(a.astype(np.float64)) > np.finfo(np.float32).max
            if np.any(big):
                raise DataError(f"{src}: {key} has {int(np.sum(big))} value(s) too large for float32 "
                                f"(|v| > {np.finfo(np.float32).max:.3g})")
        arrays[key] = a
    x_train, y_train, x_test, y_test = (arrays[k] for k in ("x_train", "y_train", "x_test", "y_test"))
    if x_train.ndim == 1 and x_test.ndim == 1:  # one feature per example
        x_train, x_test = x_train[:, None], x_test[:, None]
        arrays["x_train"], arrays["x_test"] = x_train, x_test
    for split in ("train", "test"):
        if len(arrays[f"x_{split}"]) != len(arrays[f"y_{split}"]):
            raise DataError(f"{src}: x_{split} has {len(arrays[f'x_{split}'])} rows but y_{split} has "
                            f"{len(arrays[f'y_{split}'])}")
    if x_train.shape[1:] != x_test.shape[1:]:
        raise DataError(f"{src}: x_train rows have shape {x_train.shape[1:]} but x_test rows {x_test.shape[1:]}")
    if task == "classification":
        for key in ("y_train", "y_test"):
            y = arrays[key].astype(np.float64)
            if y.ndim != 1:
                raise DataError(f"{src}: {key} must be a vector of class labels, got shape {y.shape}")
            if np.any(y != np.round(y)):
                bad = y[y != np.round(y)]
                raise DataError(f"{src}: {key} has {bad.size} non-integer class label(s) (e.g. {bad[0]:g}); a "
                                "classification likelihood (categorical, bernoulli) needs labels 0..K-1")
        for key in ("y_train", "y_test"):
            y = arrays[key]
            if y.min() < 0:
                values = sorted({int(v) for v in np.unique(y)})
                shown = ", ".join(map(str, values[:5])) + (", ..." if len(values) > 5 else "")
                raise DataError(f"{src}: {key} has {int((y < 0).sum())} negative class label(s) (labels found: "
                                f"{shown}); class labels must be 0..K-1"
                                + (" (for labels -1/1, map -1 to 0)" if values == [-1, 1] else ""))
        classes = num_outputs if num_outputs is not None else int(max(y_train.max(), y_test.max())) + 1
        for key in ("y_train", "y_test"):
            y = arrays[key]
            if y.max() >= classes:
                raise DataError(f"{src}: {key} has labels outside 0..{classes - 1} "
                                f"(found {int(y.min())}..{int(y.max())})")
        if classes > MAX_CLASSES:
            raise DataError(f"{src}: labels up to {classes - 1} imply {classes} classes (at most {MAX_CLASSES}); "
                            "class labels must be indices 0..K-1; real-valued targets need a float dtype or "
                            "a gaussian likelihood")
        _warn_unseen_classes(src, arrays["y_train"], arrays["y_test"])
        to_y = lambda y: torch.as_tensor(np.asarray(y, dtype=np.int64))  # noqa: E731
        num_outputs = classes
    else:
        y_train = y_train.reshape(len(y_train), -1)
        y_test = y_test.reshape(len(y_test), -1)
        if y_train.shape[1] != y_test.shape[1]:
            raise DataError(f"{src}: y_train has {y_train.shape[1]} targets but y_test {y_test.shape[1]}")
        num_outputs = y_train.shape[1]
        to_y = lambda y: torch.as_tensor(np.asarray(y, dtype=np.float32))  # noqa: E731
    to_x = lambda x: torch.as_tensor(np.asarray(x, dtype=np.float32))  # noqa: E731
    return Dataset(name, to_x(x_train), to_y(y_train), to_x(x_test), to_y(y_test), task, num_outputs,
                   image_shape, extras or {})


def _warn_unseen_classes(src, y_train, y_test):
    """A test set holding classes that never occur in training is legal (the network has an
    output for every label up to the largest) but makes the held-out figures measure a class the
    model could not learn: say so, naming the classes."""
    unseen = np.setdiff1d(np.unique(y_test), np.unique(y_train))
    if unseen.size:
        shown = ", ".join(str(int(c)) for c in unseen[:20]) + (", ..." if unseen.size > 20 else "")
        count = int(np.isin(y_test, unseen).sum())
        warnings.warn(f"{src}: the test set holds class(es) {shown} ({count} of {len(y_test)} test examples) that "
                      "never occur in the training set; the network cannot learn them and the held-out figures "
                      "count them as errors", PyroSparseWarning, stacklevel=3)


def _positions(mask, limit=5) -> str:
    """The first ``limit`` positions of True in ``mask``: 'row 3' for vectors, '[3, 1]' beyond."""
    where = np.argwhere(mask)[:limit]
    if mask.ndim == 1:
        text = ", ".join(str(int(i[0])) for i in where)
        label = "row" if len(where) == 1 else "rows"
    else:
        text = ", ".join("[" + ", ".join(str(int(j)) for j in i) + "]" for i in where)
        label = "at"
    return f"{label} {text}{', ...' if int(mask.sum()) > limit else ''}"


def _check_finite_as_read(src, key, a):
    """NaN/inf in an array as the file holds it (before any train/test split), with positions."""
    finite = np.isfinite(np.asarray(a).astype(np.float64))
    if not np.all(finite):
        raise DataError(f"{src}: {key} contains {int(np.sum(~finite))} NaN or infinite value(s) "
                        f"({_positions(~finite)})")


# ---------------------------------------------------------------------------- built in
def load_digits(test_fraction=0.2, seed=0) -> Dataset:
    from sklearn.datasets import load_digits as sk_digits

    d = sk_digits()
    x = d.data.astype(np.float32) / 16.0
    x_train, x_test, y_train, y_test = _split(x, d.target, test_fraction, seed, stratify=True)
    return _finish("digits", x_train, y_train, x_test, y_test, "classification", 10, image_shape=(1, 8, 8))


def load_mnist1d(num_samples=5000, seed=42) -> Dataset:
    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args()
    args.num_samples, args.seed = num_samples, seed
    d = make_dataset(args)  # generated locally; never mnist1d's download path
    return _finish("mnist1d", d["x"], d["y"], d["x_test"], d["y_test"], "classification", 10)


def load_sparse_regression(n=600, d=50, k=5, noise=0.5, seed=0, test_fraction=0.2) -> Dataset:
    """y = X beta + eps, X ~ N(0, I), beta with ``k`` non-zero entries of magnitude 1..3."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d)).astype(np.float32)
    beta = np.zeros(d, dtype=np.float32)
    support = np.sort(rng.choice(d, size=k, replace=False))
    beta[support] = rng.uniform(1, 3, size=k) * rng.choice([-1, 1], size=k)
    y = x @ beta + noise * rng.standard_normal(n).astype(np.float32)
    x_train, x_test, y_train, y_test = _split(x, y, test_fraction, seed, stratify=False)
    return _finish("sparse-regression", x_train, y_train, x_test, y_test, "regression",
                   extras={"true_support": support.tolist(), "true_beta": beta.tolist(), "noise": noise})


# ---------------------------------------------------------------------------- files
def _task_of(y):
    y = np.asarray(y)
    if np.issubdtype(y.dtype, np.integer) or y.dtype == bool:
        return "classification"
    return "regression"


def load_npz(path, test_fraction=0.2, seed=0, task=None) -> Dataset:
    """Arrays ``x_train``, ``y_train`` [, ``x_test``, ``y_test``, ``num_classes``] (no pickles).
    Inputs of shape (N, H, W) or (N, C, H, W) are images (``input_shape: image`` in a spec).

    ``task`` ('classification' or 'regression'; None: integer or boolean ``y_train`` are class
    labels, floats real-valued targets) says what ``y`` holds, whatever its dtype: the model
    spec's likelihood decides it (:func:`load_dataset`)."""
    try:
        with np.load(path, allow_pickle=False) as f:
            arrays = {k: f[k] for k in f.files}
    except ValueError as e:
        raise DataError(f"{path}: cannot read as .npz without pickles ({str(e)[:200]})") from None
    except Exception as e:  # zipfile.BadZipFile, OSError, EOFError, zlib.error, AttributeError (a .npy)
        raise DataError(f"{path}: not a readable .npz file ({type(e).__name__}: {str(e)[:200]})") from None
    for key in ("x_train", "y_train"):
        if key not in arrays:
            raise DataError(f"{path}: missing array {key!r} (found {sorted(arrays)})")
    for key in ("x_train", "y_train", "x_test", "y_test"):
        if key in arrays and arrays[key].ndim == 0:
            raise DataError(f"{path}: {key} must be an array with one row per example, got a scalar")
        if key in arrays and arrays[key].dtype.kind not in _NUMERIC_KINDS:
            raise DataError(f"{path}: {key} must be numeric (bool, integer or float), got dtype {arrays[key].dtype}")
    for key in ("x_train", "y_train", "x_test", "y_test"):
        if key in arrays:
            _check_finite_as_read(path, key, arrays[key])
    has_test = "x_test" in arrays or "y_test" in arrays
    if has_test and not ("x_test" in arrays and "y_test" in arrays):
        raise DataError(f"{path}: give both x_test and y_test, or neither")
    x, y = arrays["x_train"], arrays["y_train"]
    if len(x) != len(y):
        raise DataError(f"{path}: x_train has {len(x)} rows but y_train has {len(y)}")
    if len(x) == 0:
        raise DataError(f"{path}: x_train is empty")
    task = task or _task_of(y)
    if has_test:
        x_train, y_train, x_test, y_test = x, y, arrays["x_test"], arrays["y_test"]
    else:
        if len(x) < 2:
            raise DataError(f"{path}: need at least 2 rows to split off a test set")
        x_train, x_test, y_train, y_test = _split(x, y, test_fraction, seed, stratify=False)
    num_classes = None
    if "num_classes" in arrays:
        k = arrays["num_classes"]
        if k.size != 1 or k.dtype.kind not in "iu" or not 1 <= int(k.reshape(-1)[0]) <= MAX_CLASSES:
            raise DataError(f"{path}: num_classes must be one integer in 1..{MAX_CLASSES}, got "
                            f"{np.array2string(k.reshape(-1)[:5])} (dtype {k.dtype})")
        num_classes = int(k.reshape(-1)[0])
        if task != "classification":
            raise DataError(f"{path}: num_classes is given but the targets are real-valued (y_train dtype {y.dtype}"
                            f"{', and the task is regression' if np.issubdtype(y.dtype, np.integer) else ''}); "
                            "class labels need an integer dtype or a classification likelihood")
    # images: (N, H, W) or (N, C, H, W) inputs give the (C, H, W) that `input_shape: image` reads
    image_shape = (1, *x.shape[1:]) if x.ndim == 3 else tuple(x.shape[1:]) if x.ndim == 4 else None
    return _finish(os.path.basename(path), x_train, y_train, x_test, y_test, task, num_classes,
                   image_shape=image_shape, source=path)


def load_csv(path, target, test_fraction=0.2, seed=0, task=None) -> Dataset:
    """A CSV file with a header; ``target`` names the label column, the others are features.

    ``task`` ('classification' or 'regression') says what the target column holds; None
    (undecided) makes a column of whole numbers class labels and anything else real-valued
    targets. The model spec's likelihood decides it (:func:`load_dataset`), so whole-number
    regression targets (counts, prices) stay real-valued under a Gaussian likelihood."""
    if not target:
        raise DataError(f"{path}: a CSV needs --target naming the label column")
    try:
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.reader(f)
            rows = [(reader.line_num, r) for r in reader]  # (line number in the file, fields)
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not a UTF-8 text file ({e.reason} at byte {e.start})") from None
    except csv.Error as e:
        raise DataError(f"{path}: malformed CSV ({e})") from None
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror or e})") from None
    rows = [(n, r) for n, r in rows if any(c.strip() for c in r)]
    if not rows:
        raise DataError(f"{path}: the file is empty")
    header, body = [h.strip() for h in rows[0][1]], [r for _, r in rows[1:]]
    lines = [n for n, _ in rows[1:]]
    if target not in header:
        raise DataError(f"{path}: no column {target!r}; columns are {header}")
    if not body:
        raise DataError(f"{path}: no data rows after the header")
    values = np.empty((len(body), len(header)), dtype=np.float64)
    for i, row in enumerate(body):
        if len(row) != len(header):
            raise DataError(f"{path}: line {lines[i]} has {len(row)} fields, the header has {len(header)}")
        for j, cell in enumerate(row):
            try:
                values[i, j] = float(cell)
            except ValueError:
                raise DataError(f"{path}: line {lines[i]}, column {header[j]!r}: not a number: {cell!r}") from None
    if header.count(target) > 1:
        raise DataError(f"{path}: the header names the column {target!r} {header.count(target)} times")
    if len(header) < 2:
        raise DataError(f"{path}: no feature columns besides the target {target!r}")
    t = header.index(target)
    _check_csv_finite(path, header, values, t, lines)
    y = values[:, t]
    x = np.delete(values, t, axis=1)
    if len(x) < 2:
        raise DataError(f"{path}: need at least 2 rows to split off a test set")
    if task is None:
        task = "classification" if np.all(np.isfinite(y)) and np.all(y == np.round(y)) else "regression"
    if task == "classification" and np.all(np.isfinite(y)) and np.all(y == np.round(y)):
        y = y.astype(np.int64)
    x_train, x_test, y_train, y_test = _split(x, y, test_fraction, seed, stratify=False)
    return _finish(os.path.basename(path), x_train, y_train, x_test, y_test, task, source=path)


def _check_csv_finite(path, header, values, target_col, lines):
    """NaN/inf cells counted on the file as read, per column (the target first), with lines."""
    bad = ~np.isfinite(values)
    if not bad.any():
        return
    order = [target_col] + [j for j in range(len(header)) if j != target_col]
    parts = []
    for j in order:
        rows = np.flatnonzero(bad[:, j])
        if rows.size:
            where = ", ".join(str(lines[i]) for i in rows[:5]) + (", ..." if rows.size > 5 else "")
            what = " (the target)" if j == target_col else ""
            parts.append(f"column {header[j]!r}{what}: {rows.size} (line{'s' if rows.size > 1 else ''} {where})")
    raise DataError(f"{path}: contains {int(bad.sum())} NaN or infinite value(s): " + "; ".join(parts[:5])
                    + ("; ..." if len(parts) > 5 else ""))


_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path) -> np.ndarray:
    """Read one IDX file (Y. LeCun's MNIST format), gzipped or not."""
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except Exception as e:  # OSError (incl. BadGzipFile), EOFError (truncated gzip), zlib.error
        raise DataError(f"{path}: cannot read IDX file ({type(e).__name__}: {e})") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise DataError(f"{path}: not an IDX file (bad magic number)")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{path}: truncated IDX header")
    shape = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    expected = math.prod(shape) * dtype.itemsize
    if len(raw) - header != expected:
        raise DataError(f"{path}: IDX data has {len(raw) - header} bytes, shape {shape} needs {expected}")
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape)


def _find_idx(directory, stem):
    for name in (stem, stem + ".gz", stem.replace("-idx", ".idx"), stem.replace("-idx", ".idx") + ".gz"):
        p = os.path.join(directory, name)
        if os.path.exists(p):
            return p
    raise DataError(f"{directory}: missing IDX file {stem}[.gz]")


def load_idx_dir(directory) -> Dataset:
    parts = {}
    for split, prefix in (("train", "train"), ("test", "t10k")):
        images = read_idx(_find_idx(directory, f"{prefix}-images-idx3-ubyte"))
        labels = read_idx(_find_idx(directory, f"{prefix}-labels-idx1-ubyte"))
        if images.ndim != 3 or labels.ndim != 1:
            raise DataError(f"{directory}: {prefix} images must be 3-D and labels 1-D, got "
                            f"{images.shape} and {labels.shape}")
        if images.size == 0 or labels.size == 0:
            raise DataError(f"{directory}: {prefix} images or labels are empty ({images.shape}, {labels.shape})")
        if labels.dtype.kind not in "iu":
            raise DataError(f"{directory}: {prefix} labels must be integers, got IDX type {labels.dtype}")
        parts[split] = (images.reshape(len(images), -1).astype(np.float32) / 255.0, labels.astype(np.int64))
    h, w = read_idx(_find_idx(directory, "t10k-images-idx3-ubyte")).shape[1:]
    return _finish(os.path.basename(os.path.normpath(directory)), *parts["train"], *parts["test"],
                   "classification", image_shape=(1, h, w), source=directory)


#: options of the spec's ``data:`` section for array data (built-in sets, .npz, .csv, IDX)
INPUT_FIELDS = {
    "inputs": Field("choice", "raw", choices=("raw", "center", "standardize"),
                    doc="raw: as loaded; center: subtract the training mean of every feature; "
                        "standardize: also divide by its training standard deviation"),
    "task": Field("choice", "auto", choices=("auto", "classification", "regression"),
                  doc="what a data file's targets are: auto: what the spec's likelihood needs (gaussian: "
                      "real-valued targets, categorical/bernoulli: class labels), or by dtype where no "
                      "likelihood says; classification: class labels 0..K-1; regression: real values"),
    "targets": Field("choice", "raw", choices=("raw", "standardize"),
                     doc="regression targets: raw, or standardize (the Gaussian likelihood models "
                         "(y - mean) / sd with training statistics; figures stay in the data's units)"),
}
#: the tasks a data file's targets can be read as (``task:`` above, or ``load_dataset(task=...)``)
FILE_TASKS = ("classification", "regression")


def transform_inputs(dataset: Dataset, mode: str = "raw") -> Dataset:
    r"""Centre (or standardise) every input feature with training-set statistics.

    ``center``: :math:`x \mapsto x - \bar x_{train}`; ``standardize``:
    :math:`x \mapsto (x - \bar x_{train}) / \max(s_{train}, 10^{-2})` (the floor keeps constant
    pixels constant instead of dividing by zero). Test inputs use the training statistics.

    Why it matters for reduction: with inputs that are all >= 0 (pixel intensities), the many
    small posterior means that Savage-Dickey/BMR judge individually negligible add up to a
    coherent shift of every first-layer pre-activation; with centred inputs the same removal
    shifts them by a zero-mean amount. The statistics are kept in
    ``dataset.extras["input_transform"]``: a network fitted on transformed inputs, and the compact
    module built from it, expect inputs transformed the same way.
    """
    if mode not in INPUT_FIELDS["inputs"].choices:
        raise DataError(f"{dataset.name}: data inputs must be one of {list(INPUT_FIELDS['inputs'].choices)}, "
                        f"got {mode!r}")
    if mode == "raw":
        return dataset
    if not dataset.x_train.is_floating_point():
        raise DataError(f"{dataset.name}: data inputs: {mode} needs real-valued inputs, got {dataset.x_train.dtype}")
    mean = dataset.x_train.mean(0)
    scale = dataset.x_train.std(0).clamp_min(1e-2) if mode == "standardize" else torch.ones_like(mean)
    extras = {**dataset.extras, "input_transform": {"mode": mode, "mean": mean.tolist(), "scale": scale.tolist()}}
    return replace(dataset, x_train=(dataset.x_train - mean) / scale, x_test=(dataset.x_test - mean) / scale,
                   extras=extras)


def apply_input_transform(x: torch.Tensor, transform: dict | None) -> torch.Tensor:
    """Raw inputs ``x`` (N, ...) transformed as a run's training inputs were
    (:func:`transform_inputs`'s ``input_transform``: ``(x - mean) / scale`` with the training
    statistics); unchanged for ``transform`` None."""
    if not transform or transform.get("mode", "raw") == "raw":
        return x
    mean = torch.as_tensor(transform["mean"], dtype=x.dtype, device=x.device)
    scale = torch.as_tensor(transform["scale"], dtype=x.dtype, device=x.device)
    if tuple(mean.shape) != tuple(x.shape[1:]):
        raise DataError(f"the input transform has {tuple(mean.shape)} features per example but the data have "
                        f"{tuple(x.shape[1:])}")
    return (x - mean) / scale


def load_inputs(path: str, target: str | None = None, feature_shape=None, labels: str = "classification"):
    """Inputs to predict on, with their labels where the file has them: ``(x, y or None)``.

    * ``.npz``: ``x`` (and ``y``), or else ``x_test`` (and ``y_test``), or else ``x_train``
      (and ``y_train``); no pickles.
    * ``.csv`` with a header: the column ``target`` (default ``"target"``) holds labels when
      present; every other column is a feature, so a file without the target column is all
      inputs.

    ``feature_shape``: the per-example shape the network was fitted on (the data are reshaped to
    it; a different number of features is a DataError naming both). ``labels``: how to read
    ``y`` (``classification``: integer class labels; ``regression``: real values).
    """
    if not isinstance(path, (str, os.PathLike)) or not os.path.exists(path):
        hint = (f" ({path!r} is a built-in data set: `pyro-sparse evaluate` scores a run on its test split)"
                if path in BUILTIN else "")
        raise DataError(f"{path}: no such file{hint}")
    path = os.fspath(path)
    if path.endswith(".npz"):
        try:
            with np.load(path, allow_pickle=False) as f:
                arrays = {k: f[k] for k in f.files}
        except Exception as e:
            raise DataError(f"{path}: not a readable .npz file without pickles "
                            f"({type(e).__name__}: {str(e)[:200]})") from None
        for xk, yk in (("x", "y"), ("x_test", "y_test"), ("x_train", "y_train")):
            if xk in arrays:
                x, y = arrays[xk], arrays.get(yk)
                break
        else:
            raise DataError(f"{path}: no array 'x' (nor x_test, x_train) to predict on; found {sorted(arrays)}")
        key = xk
    elif path.endswith(".csv"):
        target = target or "target"
        try:
            with open(path, newline="", encoding="utf-8") as f:
                rows = [r for r in csv.reader(f) if any(c.strip() for c in r)]
        except (OSError, UnicodeDecodeError, csv.Error) as e:
            raise DataError(f"{path}: cannot read as CSV ({e})") from None
        if len(rows) < 2:
            raise DataError(f"{path}: expected a header and at least one row")
        header = [h.strip() for h in rows[0]]
        try:
            values = np.array([[float(c) for c in r] for r in rows[1:]], dtype=np.float64)
        except ValueError as e:
            raise DataError(f"{path}: not a table of numbers ({e})") from None
        if values.ndim != 2 or values.shape[1] != len(header):
            raise DataError(f"{path}: every row needs {len(header)} fields (the header's)")
        if target in header:
            t = header.index(target)
            x, y = np.delete(values, t, axis=1), values[:, t]
        else:
            x, y = values, None
        key = "features"
    else:
        raise DataError(f"{path}: expected a .npz or .csv file")
    if x.dtype.kind not in _NUMERIC_KINDS or len(x) == 0:
        raise DataError(f"{path}: {key} must be a non-empty numeric array, got dtype {x.dtype}, shape {x.shape}")
    _check_finite_as_read(path, key, x)
    x = torch.as_tensor(np.asarray(x, dtype=np.float32))
    if x.dim() == 1:
        x = x[:, None]
    if feature_shape is not None:
        size = math.prod(feature_shape)
        if math.prod(x.shape[1:]) != size:
            raise DataError(f"{path}: examples have {math.prod(x.shape[1:])} features (shape {list(x.shape[1:])}) but "
                            f"the network was fitted on {size} (shape {list(feature_shape)})")
        x = x.reshape(len(x), *feature_shape)
    if y is not None:
        y = np.asarray(y)
        if len(y) != len(x):
            raise DataError(f"{path}: {len(x)} inputs but {len(y)} labels")
        _check_finite_as_read(path, "labels", y)
        if labels == "regression":
            y = torch.as_tensor(np.asarray(y, dtype=np.float32)).reshape(len(y), -1)
        else:
            if np.any(y != np.round(y)):
                raise DataError(f"{path}: the labels are not whole numbers (class labels 0..K-1)")
            y = torch.as_tensor(np.asarray(y, dtype=np.int64)).reshape(-1)
    return x, y


def record_target_transform(dataset: Dataset, mode: str = "raw") -> Dataset:
    r"""Record training-set statistics of regression targets for the likelihood to standardise with.

    ``standardize``: per target column the training mean :math:`m` and standard deviation
    :math:`s` (floored at :math:`10^{-12}` times the largest :math:`|y|`, and at the smallest
    normal float, so a constant column does not divide by zero), kept in
    ``dataset.extras["target_transform"]`` as ``{"mode", "mean", "scale"}`` like
    ``input_transform``. Unlike the inputs, the targets themselves are left as they are: the
    Gaussian likelihood (:meth:`~pyro_sparse.likelihoods.Gaussian.set_target_transform`, called
    by the trainer) models :math:`y = m + s\,(f(x) + \sigma\varepsilon)`, i.e. the network
    fits the standardised targets :math:`(y - m)/s` with noise :math:`\sigma` in standardised
    units, while every figure computed from the likelihood (ELBO, RMSE, NLL, LOO, reduction
    reports) is in the data's own units, comparable with other tools fitted on the raw data.
    A network's raw output (and a compact module built from it) is the standardised prediction.
    """
    if mode not in INPUT_FIELDS["targets"].choices:
        raise DataError(f"{dataset.name}: data targets must be one of {list(INPUT_FIELDS['targets'].choices)}, "
                        f"got {mode!r}")
    if mode == "raw":
        return dataset
    if dataset.task != "regression":
        raise DataError(f"{dataset.name}: data targets: {mode} applies to real-valued (regression) targets, but "
                        f"the data have {'class labels' if dataset.task == 'classification' else 'token sequences'}")
    y = dataset.y_train.double().reshape(len(dataset.y_train), -1)
    mean = y.mean(0)
    spread = y.std(0, unbiased=False) if len(y) > 1 else torch.zeros_like(mean)
    floor = torch.clamp_min(1e-12 * y.abs().amax(0), torch.finfo(torch.float32).tiny)
    scale = torch.maximum(spread, floor)
    extras = {**dataset.extras, "target_transform": {"mode": mode, "mean": mean.tolist(), "scale": scale.tolist()}}
    return replace(dataset, extras=extras)


def load_dataset(name_or_path: str, target: str | None = None, seed: int = 0, options: dict | None = None,
                 task: str | None = None) -> Dataset:
    """A built-in data set by name, or a user's ``.npz`` / ``.csv`` / ``.txt`` file or IDX directory.

    ``options`` (the model spec's ``data:`` section): for array data ``inputs`` (raw, center,
    standardize; :func:`transform_inputs`), ``task`` (auto, classification, regression) and
    ``targets`` (raw, standardize; :func:`record_target_transform`); for a text corpus those of
    :func:`load_text` (sequence_length, valid_fraction, max_vocab).

    ``task``: what the model's likelihood needs ('classification' or 'regression'; None: not
    known), passed by :mod:`pyro_sparse.runs` from the spec (:func:`pyro_sparse.spec.data_task`).
    A data file's targets are read that way -- whole numbers as regression targets under a
    Gaussian likelihood, 0/1 floats as labels under a Bernoulli one -- unless ``options`` name a
    task other than ``auto``. Where neither says, integers are class labels and floats real
    values. The built-in sets and IDX files have a fixed task.
    """
    if not isinstance(name_or_path, (str, os.PathLike)):
        raise DataError(f"load_dataset: expected a data set name or a path, got {name_or_path!r}")
    if target is not None and not isinstance(target, str):
        raise DataError(f"load_dataset: target must be a column name, got {target!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**32:
        raise DataError(f"load_dataset: seed must be an integer in [0, 2**32), got {seed!r}")
    if task is not None and task not in FILE_TASKS:
        raise DataError(f"load_dataset: task must be one of {list(FILE_TASKS)} or None, got {task!r}")
    name_or_path = os.fspath(name_or_path)
    options = dict(options or {})
    is_text = name_or_path.endswith(".txt")
    wrong = sorted(k for k in options if (k in INPUT_FIELDS) == is_text and options[k] is not None)
    if wrong:
        kind = "array data (built-in sets, .npz, .csv, IDX)" if not is_text else ".txt corpora"
        raise DataError(f"{name_or_path}: the spec's data options {wrong} do not apply to this data set; "
                        f"options for {kind}: {sorted(INPUT_FIELDS if not is_text else TEXT_FIELDS)}")
    if not is_text:
        given = options.get("task") or "auto"
        if given not in ("auto", *FILE_TASKS):
            raise DataError(f"{name_or_path}: data task must be one of {list(INPUT_FIELDS['task'].choices)}, "
                            f"got {given!r}")
        dataset = _load_arrays(name_or_path, target, seed, task if given == "auto" else given)
        dataset = record_target_transform(dataset, options.get("targets") or "raw")
        return transform_inputs(dataset, options.get("inputs") or "raw")
    return load_text(name_or_path, **{k: v for k, v in options.items() if k not in INPUT_FIELDS})


def _load_arrays(name_or_path, target, seed, task=None) -> Dataset:
    """The built-in sets have a fixed task; a file's targets are read as ``task`` says."""
    if name_or_path == "digits":
        return load_digits(seed=seed)
    if name_or_path == "mnist1d":
        return load_mnist1d()
    if name_or_path == "sparse-regression":
        return load_sparse_regression(seed=seed)
    path = name_or_path
    if not os.path.exists(path):
        raise DataError(f"{path}: no such file, and not a built-in data set ({', '.join(BUILTIN)})")
    if os.path.isdir(path):
        return load_idx_dir(path)
    if os.path.getsize(path) == 0:
        raise DataError(f"{path}: the file is empty")
    if path.endswith(".npz"):
        return load_npz(path, seed=seed, task=task)
    if path.endswith(".csv"):
        return load_csv(path, target, seed=seed, task=task)
    raise DataError(f"{path}: unknown data format; expected .npz, .csv, .txt or a directory of IDX files")


# --------------------------------------------------------------------------- text corpora

#: options of the spec's ``data:`` section for a text corpus
TEXT_FIELDS = {
    "sequence_length": Field("int", 100, positive=True, doc="characters per training sequence"),
    "valid_fraction": Field("float", 0.1, positive=True, doc="trailing fraction of the text held out"),
    "max_vocab": Field("int", None, positive=True, allow_none=True,
                       doc="keep the most frequent training characters; the rest map to <unk>"),
}
#: the token that stands for characters outside the vocabulary
UNKNOWN = "<unk>"


def load_text(path: str, sequence_length: int = 100, valid_fraction: float = 0.1, max_vocab=None) -> Dataset:
    """A character corpus from a UTF-8 text file, as next-character prediction sequences.

    Returns a :class:`Dataset` with ``task='sequence'``: ``x`` (N, T) float
    character ids, ``y`` (N, T) long next-character ids, ``num_outputs`` the vocabulary size,
    ``extras = {"vocabulary": [...], "sequence_length": T, "train_characters": .., "test_characters": ..}``.
    An ``<unk>`` token is added (last id) only if some held-out or rare character needs it.
    """
    options = validate(TEXT_FIELDS, {"sequence_length": sequence_length, "valid_fraction": valid_fraction,
                                     "max_vocab": max_vocab}, "data", None)
    seq, frac = options["sequence_length"], options["valid_fraction"]
    if frac >= 1:
        raise SpecError(f"expected a fraction in (0, 1), got {frac!r}", None, "data.valid_fraction")
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror})") from None
    split = int(round(len(text) * (1 - frac)))
    train, valid = text[:split], text[split:]
    for part, chars in (("training", train), ("held-out", valid)):
        if len(chars) < seq + 1:
            raise DataError(f"{path}: the {part} part has {len(chars)} characters, fewer than "
                            f"sequence_length + 1 = {seq + 1} (file has {len(text)} characters, "
                            f"valid_fraction {frac})")
    counts = Counter(train)
    chars = sorted(counts, key=lambda c: (-counts[c], c))
    if options["max_vocab"] is not None:
        chars = chars[: options["max_vocab"]]
    chars = sorted(chars)
    needs_unknown = len(chars) < len(counts) or any(c not in counts for c in set(valid))
    vocabulary = chars + ([UNKNOWN] if needs_unknown else [])
    index = {c: i for i, c in enumerate(chars)}
    unk = len(chars)

    def encode(s):
        return torch.tensor([index.get(c, unk) for c in s], dtype=torch.long)

    def sequences(ids):
        n = (len(ids) - 1) // seq
        x = ids[: n * seq].view(n, seq)
        y = ids[1: n * seq + 1].view(n, seq)
        return x.to(torch.float32), y

    x_train, y_train = sequences(encode(train))
    x_test, y_test = sequences(encode(valid))
    return Dataset(os.path.basename(path), x_train, y_train, x_test, y_test, "sequence", len(vocabulary),
                   extras={"vocabulary": vocabulary, "sequence_length": seq,
                           "train_characters": y_train.numel(), "test_characters": y_test.numel()})
