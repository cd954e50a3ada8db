"""Property-based tests: random and malformed input to every parser and loader.

The property is the same everywhere: the outcome is a valid object or the library's own
:class:`~pyro_sparse.errors.PyroSparseError`, never another exception (a KeyError, a
TypeError from deep inside torch, a traceback). Examples are drawn in two ways: free-form
values (nested dicts, lists, scalars, strings) and *mutations* of a valid spec, recipe or data
file (one key replaced by a value of the wrong type, an unknown key added, an array of a random
dtype/shape, truncated bytes), because mutations reach the deep checks that random trees
rarely get past.
"""

import gzip
import io
import os
import string
import struct

import numpy as np
import pytest
import torch
import yaml
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from pyro_sparse.data import Dataset, load_dataset, read_idx
from pyro_sparse.errors import PyroSparseError
from pyro_sparse.guides import MeanFieldGuide
from pyro_sparse.recipe import RECIPE_FIELDS, make_optimizer, make_scheduler, parse_recipe
from pyro_sparse.spec import build_network, load_model_spec, parse_model_spec

SETTINGS = settings(max_examples=60, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

# ----------------------------------------------------------------------------- values
scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-(10**30), 10**30), st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=8), st.sampled_from(["auto", "image", "gaussian", "linear", "relu", "Adam", "cosine",
                                          "cpu", "cuda", "1e-3", "nan", "-1", "0", "layer", "unit"]),
    st.integers(-3, 300))
keys = st.one_of(st.text(string.ascii_lowercase + "_", min_size=1, max_size=10),
                 st.sampled_from(["type", "in", "out", "prior", "bias_prior", "scale", "loc", "group", "layers",
                                  "likelihood", "input_shape", "name", "lr", "kernel_size", "noise", "bias"]),
                 st.integers(-2, 2), st.none(), st.booleans())
trees = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                       st.dictionaries(keys, inner, max_size=4)),
                     max_leaves=12)

VALID_SPEC = {
    "name": "m", "input_shape": "auto",
    "prior": {"type": "gaussian", "scale": 1.0}, "bias_prior": {"type": "gaussian", "scale": 1.0},
    "layers": [{"type": "linear", "in": "auto", "out": 6, "prior": {"type": "gaussian_gamma", "group": "unit"}},
               {"type": "relu"}, {"type": "dropout", "p": 0.1},
               {"type": "linear", "out": "auto", "bias_prior": {"type": "log_uniform"}}],
    "likelihood": {"type": "categorical"},
}
IMAGE_SPEC = {
    "input_shape": [1, 6, 6],
    "layers": [{"type": "conv2d", "out": 2, "kernel_size": 3, "padding": 1}, {"type": "maxpool2d", "kernel_size": 2},
               {"type": "tanh"}, {"type": "flatten"}, {"type": "linear", "out": "auto"}],
}
VALID_RECIPE = {
    "method": "svi", "guide": "meanfield", "guide_options": {"init_scale": 0.01}, "local_reparam": True,
    "optimizer": {"name": "Adam", "lr": 0.01, "betas": [0.9, 0.99]}, "schedule": {"name": "step", "step_size": 3},
    "epochs": 3, "batch_size": 16, "kl_warmup_epochs": 1.0, "grad_clip": 5.0, "eval_samples": 2, "eval_every": 1,
    "seed": 3, "device": "cpu", "num_threads": 1, "nan_retries": 2, "nan_lr_factor": 0.5,
}


def paths(tree, prefix=()):
    """Every location (a tuple of keys/indices) inside nested dicts and lists."""
    yield prefix
    if isinstance(tree, dict):
        for k, v in tree.items():
            yield from paths(v, prefix + (k,))
    elif isinstance(tree, list):
        for i, v in enumerate(tree):
            yield from paths(v, prefix + (i,))


def mutate(tree, where, how, value):
    """A copy of ``tree`` with the node at ``where`` replaced, deleted, or given an extra key."""
    if not where:
        return value if how == "replace" else tree
    import copy

    out = copy.deepcopy(tree)
    node = out
    for k in where[:-1]:
        node = node[k]
    last = where[-1]
    if how == "replace":
        node[last] = value
    elif how == "delete":
        del node[last]
    elif how == "extra" and isinstance(node[last], dict):
        node[last]["zz_unknown"] = value
    return out


def mutations(valid):
    locs = list(paths(valid))
    return st.tuples(st.sampled_from(locs), st.sampled_from(["replace", "replace", "delete", "extra"]), trees).map(
        lambda t: mutate(valid, *t))


def outcome(fn, *args, **kwargs):
    """Call ``fn``; return its value or the PyroSparseError it raised. Anything else fails."""
    try:
        return fn(*args, **kwargs)
    except PyroSparseError as e:
        assert str(e), "an error without a message"
        return e


# ----------------------------------------------------------------------------- specs
@SETTINGS
@given(data=st.one_of(trees, mutations(VALID_SPEC), mutations(IMAGE_SPEC)))
def test_model_specs_parse_or_raise_spec_error(data):
    spec = outcome(parse_model_spec, data, "<fuzz>")
    if isinstance(spec, PyroSparseError):
        assert "<fuzz>" in str(spec)
        return
    # a spec that parsed must build (small sizes only: the parser accepts any positive size) or say why
    sizes = [l.get(k) for l in spec["layers"] for k in ("in", "out", "kernel_size")]
    assume(all(not isinstance(s, int) or s <= 512 for s in sizes))
    image = spec["input_shape"] if isinstance(spec["input_shape"], list) else None
    assume(image is None or np.prod(image) <= 4096)
    for feature_shape, image_shape in (((36,), (1, 6, 6)), ((5,), None)):
        net = outcome(build_network, spec, feature_shape, 3, image_shape)
        if isinstance(net, PyroSparseError):
            continue
        # a network that built runs: the guide's prototype pass and a posterior draw
        guide = MeanFieldGuide(net.model).setup(torch.zeros(2, *feature_shape), None)
        out = net.sample_outputs(torch.zeros(2, *feature_shape), guide, 1)
        assert out.shape[:2] == (1, 2)


@SETTINGS
@given(text=st.one_of(st.text(max_size=200), mutations(VALID_SPEC).map(yaml.safe_dump),
                      st.binary(max_size=200).map(lambda b: b.decode("latin-1"))))
def test_spec_files_with_random_text(tmp_path, text):
    p = tmp_path / "spec.yaml"
    p.write_text(text, encoding="utf-8", errors="surrogateescape")
    spec = outcome(load_model_spec, str(p))
    assert isinstance(spec, (dict, PyroSparseError))


# ----------------------------------------------------------------------------- recipes
@SETTINGS
@given(data=st.one_of(trees, mutations(VALID_RECIPE)))
def test_recipes_parse_or_raise_spec_error(data):
    recipe = outcome(parse_recipe, data, "<fuzz>")
    if isinstance(recipe, PyroSparseError):
        assert "<fuzz>" in str(recipe)
    else:
        assert set(RECIPE_FIELDS) <= set(recipe)
        usable(recipe)


def usable(recipe):
    """A recipe that parsed gives an optimiser and schedule that step without error."""
    p = torch.nn.Parameter(torch.ones(3))
    opt = make_optimizer([p], recipe["optimizer"])
    sched = make_scheduler(opt, recipe["schedule"], recipe["epochs"])
    for _ in range(3):
        p.grad = torch.ones(3)
        opt.step()
        if sched is not None:
            sched.step()
    assert bool(p.isfinite().all())


@SETTINGS
@given(key=st.sampled_from(sorted(VALID_RECIPE)), value=trees)
def test_every_recipe_key_with_a_wrong_value(key, value):
    recipe = outcome(parse_recipe, {**VALID_RECIPE, key: value}, "<fuzz>")
    if isinstance(recipe, PyroSparseError):
        # the message names the field (optimizer/schedule options are checked as a section)
        assert key in str(recipe)
    else:
        usable(recipe)


@SETTINGS
@given(opts=st.dictionaries(st.sampled_from(["lr", "betas", "eps", "weight_decay", "amsgrad", "momentum",
                                             "foreach", "maximize"]), trees, max_size=3),
       name=st.sampled_from(["Adam", "SGD", "AdamW", "RMSprop", "LBFGS", "Optimizer", "SparseAdam"]),
       sched=st.dictionaries(st.sampled_from(["name", "step_size", "gamma", "milestones", "eta_min"]), trees,
                             max_size=3))
def test_optimizer_and_schedule_options(name, opts, sched):
    recipe = outcome(parse_recipe, {"optimizer": {"name": name, **opts}, "schedule": sched}, "<fuzz>")
    if not isinstance(recipe, PyroSparseError):
        usable(recipe)


# ----------------------------------------------------------------------------- data files
dtypes = st.one_of(hnp.boolean_dtypes(), hnp.integer_dtypes(), hnp.unsigned_integer_dtypes(),
                   hnp.floating_dtypes(), hnp.complex_number_dtypes(), hnp.datetime64_dtypes(),
                   hnp.timedelta64_dtypes(), hnp.byte_string_dtypes(max_len=3), hnp.unicode_string_dtypes(max_len=3))
arrays = dtypes.flatmap(lambda dt: hnp.arrays(dt, hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=5)))
small_ints = hnp.arrays(np.int64, st.integers(1, 12), elements=st.integers(-1, 4))
small_floats = hnp.arrays(np.float64, st.tuples(st.integers(1, 12), st.integers(1, 3)),
                          elements=st.one_of(st.floats(-1e40, 1e40),
                                             st.sampled_from([np.nan, np.inf, -np.inf, 0.5, 2.0])))


def check_dataset(d):
    if isinstance(d, PyroSparseError):
        return
    assert isinstance(d, Dataset)
    for t in (d.x_train, d.x_test):
        assert t.dtype.is_floating_point and bool(t.isfinite().all())
    assert len(d.x_train) == len(d.y_train) and len(d.x_test) == len(d.y_test)
    if d.task == "classification":
        assert 0 <= int(d.y_train.min()) and int(d.y_train.max()) < d.num_outputs
    else:
        assert bool(d.y_train.isfinite().all())


@SETTINGS
@given(npz=st.dictionaries(st.sampled_from(["x_train", "y_train", "x_test", "y_test", "num_classes", "other"]),
                           st.one_of(arrays, small_ints, small_floats), max_size=5))
def test_npz_files_with_random_arrays(tmp_path, npz):
    p = tmp_path / "d.npz"
    np.savez(p, **npz)
    check_dataset(outcome(load_dataset, str(p)))


@SETTINGS
@given(x=st.one_of(small_floats, arrays), y=st.one_of(small_ints, small_floats.map(lambda a: a[:, 0]), arrays))
def test_npz_with_both_required_arrays(tmp_path, x, y):
    p = tmp_path / "d.npz"
    np.savez(p, x_train=x, y_train=y)
    check_dataset(outcome(load_dataset, str(p)))


@SETTINGS
@given(raw=st.binary(max_size=300), cut=st.integers(0, 400))
def test_npz_random_and_truncated_bytes(tmp_path, raw, cut):
    good = io.BytesIO()
    np.savez(good, x_train=np.ones((6, 2)), y_train=np.arange(6) % 2)
    for content in (raw, good.getvalue()[:cut], b"\x93NUMPY" + raw):
        p = tmp_path / "d.npz"
        p.write_bytes(content)
        check_dataset(outcome(load_dataset, str(p)))


cells = st.one_of(st.floats(allow_nan=True, allow_infinity=True).map(repr), st.integers(-3, 3).map(str),
                  st.text(max_size=4), st.sampled_from(["", "nan", "inf", "-1", "1e999", " 2 ", '"', "a,b"]))


@SETTINGS
@given(header=st.lists(st.sampled_from(["a", "b", "y", "c", ""]), min_size=0, max_size=4),
       rows=st.lists(st.lists(cells, min_size=0, max_size=5), max_size=8),
       junk=st.one_of(st.just(b""), st.binary(max_size=20)))
def test_csv_files_with_random_content(tmp_path, header, rows, junk):
    p = tmp_path / "d.csv"
    text = "\n".join(",".join(r) for r in [header] + rows)
    p.write_bytes(text.encode("utf-8", "surrogatepass") + junk)
    check_dataset(outcome(load_dataset, str(p), target="y"))


def idx_bytes(arr, code=0x08):
    header = struct.pack(">BBBB", 0, 0, code, arr.ndim) + b"".join(struct.pack(">I", s) for s in arr.shape)
    return header + arr.astype({0x08: ">u1", 0x0D: ">f4"}[code]).tobytes()


@SETTINGS
@given(raw=st.binary(max_size=80), cut=st.integers(0, 120), gz=st.booleans(), which=st.integers(0, 3),
       n=st.integers(0, 4), float_labels=st.booleans())
def test_idx_random_truncated_and_inconsistent(tmp_path, raw, cut, gz, which, n, float_labels):
    rng = np.random.default_rng(0)
    files = {}
    for prefix, rows in (("train", n), ("t10k", 2)):
        files[f"{prefix}-images-idx3-ubyte"] = idx_bytes(rng.integers(0, 256, (rows, 3, 3)))
        labels = rng.integers(0, 3, rows)
        files[f"{prefix}-labels-idx1-ubyte"] = idx_bytes(labels, 0x0D if float_labels else 0x08)
    names = sorted(files)
    victim = names[which]
    files[victim] = files[victim][:cut] + raw if raw else files[victim][:cut]
    d = tmp_path / "idx"
    d.mkdir(exist_ok=True)
    for f in os.listdir(d):
        os.unlink(d / f)
    for name, content in files.items():
        if gz:
            content = gzip.compress(content)[: cut + 10] if name == victim else gzip.compress(content)
        (d / (name + (".gz" if gz else ""))).write_bytes(content)
    check_dataset(outcome(load_dataset, str(d)))
    victim_path = d / (victim + (".gz" if gz else ""))
    arr = outcome(read_idx, str(victim_path))
    assert isinstance(arr, (np.ndarray, PyroSparseError))


@SETTINGS
@given(name=st.one_of(trees, st.text(max_size=10)), target=st.one_of(st.none(), scalars), seed=scalars)
def test_load_dataset_arguments(tmp_path, name, target, seed):
    os.chdir(tmp_path)  # relative names that happen to exist are only ever under tmp_path
    assume(name not in ("digits", "mnist1d", "sparse-regression"))
    out = outcome(load_dataset, name, target=target, seed=seed)
    assert isinstance(out, PyroSparseError)


@pytest.fixture(autouse=True)
def _restore_cwd():
    cwd = os.getcwd()
    yield
    os.chdir(cwd)
