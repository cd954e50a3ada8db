"""Every shipped spec, with the recipe that fits it, through the command line as a user would run
it: fit (the spec's own recipe, or another run type) -> reduce with every rule that applies ->
the compact network equals the masked one -> export as TorchScript and ONNX (equal to the compact
network on the test split; loaded at the end in one interpreter without pyro-sparse) -> sweep ->
report -> compare. One epoch on small data (these check that every step works on every run type,
not the figures; those are in bench/).

A test per (spec, recipe); marked slow (about four minutes in all) but run by `make test`.
"""

import contextlib
import glob
import json
import os

import numpy as np
import pytest
import yaml

from pyro_sparse.cli import main
from pyro_sparse.data import load_digits
from pyro_sparse.reduction.rules import applicable_rules
from pyro_sparse.registry import RULES
from pyro_sparse.runs import load_run
from pyro_sparse.usercode import allow_code

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SPECS = sorted(os.path.splitext(os.path.basename(p))[0] for p in glob.glob(os.path.join(ROOT, "models", "*.yaml")))
#: run types beyond each spec's own recipe: (spec, recipe file or inline recipe changes)
OTHER_RUNS = [
    ("mlp_gaussian", "laplace_marglik"),       # SpaM: the Laplace posterior
    ("mlp_gaussian", "svi_bmr_iterative"),     # iterative BMR
    ("mlp_gaussian", "map"),                   # a point estimate
    ("mlp_horseshoe", {"guide": "structured"}),
    ("mlp_gaussian", {"guide": "lowrank", "guide_options": {"rank": 4, "max_params": 20000}}),
    ("lenet5_gaussian", "laplace_marglik"),
]
TOL = 1e-5
#: graphs exported by the spec tests: (graph, format, inputs .npy, the compact network's outputs .npy)
EXPORTED = []


def _has(module):
    try:
        __import__(module)
        return True
    except ImportError:
        return False


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Small data files for the specs that do not read digits: 28x28 images, 40-step sequences,
    a text corpus."""
    root = tmp_path_factory.mktemp("every-spec-data")
    g = np.random.default_rng(0)
    out = {}
    digits = load_digits()  # a subset: flat vectors for the MLPs, 1x8x8 images for `input_shape: image`
    for name, shape in (("digits", (64,)), ("digits_images", (1, 8, 8))):
        path = str(root / f"{name}.npz")
        np.savez(path, x_train=digits.x_train[:150].reshape(150, *shape).numpy(), y_train=digits.y_train[:150].numpy(),
                 x_test=digits.x_test[:60].reshape(60, *shape).numpy(), y_test=digits.y_test[:60].numpy())
        out[name] = path
    for name, shape in (("images28", (28, 28)), ("seq40", (40,))):
        path = str(root / f"{name}.npz")
        np.savez(path, x_train=g.normal(size=(60, *shape)).astype(np.float32), y_train=np.arange(60) % 10,
                 x_test=g.normal(size=(30, *shape)).astype(np.float32), y_test=np.arange(30) % 10)
        out[name] = path
    words = ["sparse", "prior", "gate", "lstm", "bayes"]
    text = " ".join(words[int(i)] for i in g.integers(0, len(words), 900))
    path = root / "corpus.txt"
    path.write_text(text)
    out["text"] = str(path)
    return out


def data_for(spec):
    if "_28_" in spec:
        return "images28"
    if spec.startswith(("lstm_", "gru_", "cnn_mnist1d")):
        return "seq40"
    if spec.startswith("char_lm"):
        return "text"
    image = yaml.safe_load(open(os.path.join(ROOT, "models", f"{spec}.yaml"))).get("input_shape") == "image"
    return "digits_images" if image else "digits"


def _fit_args(spec, recipe, tmp_path):
    """The fit command line: the spec's own recipe (no --inference), a shipped one, or a copy of
    the spec's own with changes; small sequence lengths for the language models."""
    model = os.path.join(ROOT, "models", f"{spec}.yaml")
    args = ["--model", model]
    if spec.startswith("char_lm"):  # a short corpus: short sequences
        content = yaml.safe_load(open(model))
        content["data"] = {"sequence_length": 20, "valid_fraction": 0.2}
        content["recipe"] = os.path.join(ROOT, "inference", os.path.basename(content["recipe"]))
        model = str(tmp_path / f"{spec}.yaml")
        with open(model, "w") as f:
            yaml.safe_dump(content, f)
        args = ["--model", model]
    if isinstance(recipe, str):
        args += ["--inference", os.path.join(ROOT, "inference", f"{recipe}.yaml")]
    elif isinstance(recipe, dict):
        own = yaml.safe_load(open(model))["recipe"]
        content = yaml.safe_load(open(os.path.join(os.path.dirname(model), own) if not os.path.isabs(own) else own))
        content.update(recipe)
        path = tmp_path / "recipe.yaml"
        with open(path, "w") as f:
            yaml.safe_dump(content, f)
        args += ["--inference", str(path)]
    return args


def _walk(spec, recipe, data, tmp_path, capsys):
    run = str(tmp_path / "run")
    # a spec that names a Python class (module:) imports its code: every command needs --allow-code
    code = ["--allow-code"] if yaml.safe_load(open(os.path.join(ROOT, "models", f"{spec}.yaml"))).get("module") else []

    def cli(argv):
        return main([*argv, *code])

    # the class of a module spec (examples.resnet_digits:ResidualCNN) imports from the repository root
    with contextlib.chdir(ROOT):
        summary = _fit_and_summary(cli, spec, recipe, data, tmp_path, capsys, run)
        reports = _reductions(cli, run, summary, capsys)
        if recipe is None:  # each spec's compact network as a graph
            _export(cli, reports[0]["compact_path"], run, capsys)
        return reports


def _export(main, compact_path, run, capsys):
    """Export as TorchScript and ONNX (export itself checks the graph against the compact network
    on the run's test split, to 1e-5) and keep inputs and outputs for the interpreter without
    pyro-sparse."""
    import torch

    from pyro_sparse.data import apply_input_transform
    from pyro_sparse.reduced_runs import load_compact

    with allow_code():
        module = load_compact(compact_path)
        x = load_run(run).dataset.x_test[:20]
    transform = module.info.get("input_transform")
    if transform and x.is_floating_point():  # the run keeps its test inputs transformed: back to raw ones
        x = x * torch.tensor(transform["scale"]) + torch.tensor(transform["mean"])
    with torch.no_grad():
        expected = module(apply_input_transform(x, transform) if x.is_floating_point() else x)
    np.save(os.path.join(run, "x.npy"), x.numpy())
    np.save(os.path.join(run, "expected.npy"), expected.numpy())
    for fmt in ("torchscript", "onnx") if _has("onnxruntime") else ("torchscript",):
        out = os.path.join(run, f"graph.{fmt}")
        assert main(["export", compact_path, "--format", fmt, "--out", out]) == 0, capsys.readouterr().err
        assert "of the compact network's on its run's test split" in capsys.readouterr().out
        EXPORTED.append((out, fmt, os.path.join(run, "x.npy"), os.path.join(run, "expected.npy")))


def _fit_and_summary(main, spec, recipe, data, tmp_path, capsys, run):
    assert main(["fit", *_fit_args(spec, recipe, tmp_path), "--data", data[data_for(spec)], "--out", run,
                 "--epochs", "1", "--quiet"]) == 0, capsys.readouterr().err
    with allow_code():
        return load_run(run).trainer.posterior_summary()


def _reductions(main, run, summary, capsys):
    applies = [name for name, why in applicable_rules(summary).items() if why is None]
    assert {"magnitude", "random"} <= set(applies)  # every posterior has means
    reports = []
    for i, name in enumerate(applies):
        options = ["--sparsity", "0.5"] if RULES[name].threshold is None and RULES[name].ranks else []
        options += [] if i == 0 else ["--no-latency"]  # latency measured once per run
        assert main(["reduce", run, "--method", name, *options]) == 0, (name, capsys.readouterr().err)
        path = capsys.readouterr().out.strip().splitlines()[-1].split()[1]
        report = json.load(open(path))
        assert report["max_abs_output_diff"] <= TOL, (name, report["max_abs_output_diff"])
        # every parametric layer is covered, and kept weights are those of the compact network
        with allow_code():
            assert set(report["layers"]) == {n for n, _ in load_run(run).network.bayesian_layers()}
        assert report["weights_kept"] <= report["rule_weights_kept"]
        reports.append(report)
    ranking = [name for name in applies if RULES[name].ranks]
    assert main(["sweep", run, "--method", ",".join(ranking[:2]), "--sparsities", "0.5,0.9", "--no-plot"]) == 0
    assert main(["report", run, "--samples", "3"]) == 0, capsys.readouterr().err
    result = json.load(open(os.path.join(run, "report.json")))
    assert "training" in result["figures"] and result["rules"], result["figures"]
    first = result["rules"][0]["rule"]
    weights = {k for k, s in summary.items() if s.role == "weight"}
    assert {k for k in result["rules"][0] if k.startswith("kept ")} >= {f"kept {k}" for k in weights}
    capsys.readouterr()
    assert main(["compare", run, f"{run}:{first}", "--samples", "3"]) == 0, capsys.readouterr().err
    return reports


@pytest.mark.slow
@pytest.mark.parametrize("spec", SPECS)
def test_every_spec_with_its_own_recipe_through_the_cli(spec, data, tmp_path, capsys):
    assert yaml.safe_load(open(os.path.join(ROOT, "models", f"{spec}.yaml"))).get("recipe"), \
        f"models/{spec}.yaml names no recipe"
    _walk(spec, None, data, tmp_path, capsys)


@pytest.mark.slow
@pytest.mark.parametrize("spec,recipe", OTHER_RUNS, ids=lambda v: v if isinstance(v, str) else v["guide"])
def test_other_run_types_through_the_cli(spec, recipe, data, tmp_path, capsys):
    reports = _walk(spec, recipe, data, tmp_path, capsys)
    if recipe == "laplace_marglik":  # the Laplace posterior: every rule with a Gaussian posterior applies
        assert {r["method"] for r in reports} >= {"opd", "savage-dickey", "bmr", "magnitude"}
    if recipe == "map":  # a point estimate: no precision, no evidence
        assert {r["method"] for r in reports} == {"magnitude", "random"}


@pytest.mark.slow
def test_every_exported_graph_runs_in_an_interpreter_without_pyro_sparse(tmp_path):
    """The graphs the spec tests above exported, run in one fresh, isolated interpreter (``-I``) in
    which importing pyro_sparse fails: TorchScript with torch only, ONNX with onnxruntime only."""
    if not EXPORTED:
        pytest.skip("no spec test exported a graph in this session")
    import subprocess
    import sys

    listing = tmp_path / "graphs.json"
    listing.write_text(json.dumps(EXPORTED))
    script = f"""
import json, sys
sys.modules["pyro_sparse"] = None  # importing pyro_sparse fails
import numpy as np
worst = {{}}
for path, fmt, xs, expected in json.load(open({str(listing)!r})):
    x, ref = np.load(xs), np.load(expected)
    if fmt == "torchscript":
        import torch
        with torch.no_grad():
            out = torch.jit.load(path)(torch.from_numpy(x)).numpy()
    else:
        import onnxruntime
        session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
        out = session.run(None, {{"x": x}})[0]
    worst[path] = float(np.abs(out - ref).max()) / max(1.0, float(np.abs(ref).max()))  # float32 rounding scales
print(json.dumps(worst))
"""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    done = subprocess.run([sys.executable, "-I", "-W", "ignore", "-c", script], capture_output=True, text=True,
                          cwd=str(tmp_path), env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    worst = json.loads(done.stdout.strip().splitlines()[-1])
    assert len(worst) == len(EXPORTED)
    assert max(worst.values()) <= TOL, {k: v for k, v in worst.items() if v > TOL}  # relative to max(1, |output|)
