"""pyro-sparse export: TorchScript and ONNX graphs of a compact network with its input transform, equal
to the compact network, loadable where pyro-sparse is not installed, readable by predict."""

import builtins
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import yaml

from pyro_sparse.cli import main
from pyro_sparse.data import apply_input_transform
from pyro_sparse.deploy import export_graph, graph_kind, load_graph
from pyro_sparse.errors import PyroSparseError
from pyro_sparse.reduced_runs import load_compact
from pyro_sparse.runs import fit_run, load_run

MODEL = {"name": "tiny", "input_shape": "auto", "data": {"inputs": "standardize"},
         "prior": {"type": "log_uniform"}, "bias_prior": {"type": "gaussian", "scale": 1.0},
         "layers": [{"type": "linear", "in": "auto", "out": 40}, {"type": "relu"}, {"type": "linear", "out": "auto"}],
         "likelihood": {"type": "categorical"}}
RECIPE = {"method": "svi", "guide": "meanfield", "guide_options": {"init_scale": 0.0067}, "local_reparam": True,
          "optimizer": {"name": "Adam", "lr": 0.01}, "epochs": 3, "batch_size": 128, "eval_samples": 2,
          "reduction": {"method": "magnitude", "sparsity": 0.9}}
TOL = 1e-5


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    model, recipe = root / "model.yaml", root / "recipe.yaml"
    model.write_text(yaml.safe_dump(MODEL))
    recipe.write_text(yaml.safe_dump(RECIPE))
    out = str(root / "run")
    fit_run(str(model), str(recipe), "digits", out, progress=False)
    assert main(["reduce", out, "--no-latency"]) == 0
    return out


@pytest.fixture(scope="module")
def raw_inputs(run_dir, tmp_path_factory):
    """The run's test inputs as a user has them (before the standardisation), in an .npz with labels."""
    run = load_run(run_dir)
    t = run.dataset.extras["input_transform"]
    x = run.dataset.x_test * torch.tensor(t["scale"]) + torch.tensor(t["mean"])
    path = str(tmp_path_factory.mktemp("raw") / "raw.npz")
    np.savez(path, x=x.numpy(), y=run.dataset.y_test.numpy())
    return path, x


def _compact(run_dir):
    return os.path.join(run_dir, "compact-magnitude-s0.9.pt")


@pytest.mark.parametrize("fmt", ["torchscript", "onnx"])
def test_export_writes_a_graph_equal_to_the_compact_network_with_its_input_transform(fmt, run_dir, raw_inputs,
                                                                                     tmp_path, capsys):
    if fmt == "onnx":
        pytest.importorskip("onnxruntime")
    out = str(tmp_path / f"net.{'onnx' if fmt == 'onnx' else 'pt'}")
    assert main(["export", _compact(run_dir), "--format", fmt, "--out", out]) == 0
    printed = capsys.readouterr().out
    assert f"wrote {out} ({fmt}" in printed and "of the compact network's on its run's test split (360" in printed
    assert graph_kind(out) == fmt and graph_kind(_compact(run_dir)) is None
    run, meta = load_graph(out)
    assert meta["input_transform"]["mode"] == "standardize" and meta["input_transform_applied"]
    assert meta["likelihood"] == {"type": "categorical"} and meta["feature_shape"] == [64]
    assert meta["input"] == {"name": "x", "dtype": "float32", "shape": ["batch", 64]}
    module = load_compact(_compact(run_dir))
    x = raw_inputs[1]
    transform = module.info["input_transform"]
    with torch.no_grad():
        expected = module(apply_input_transform(x, transform))
    for batch in (x[:1], x[:7], x):  # the batch dimension is dynamic
        assert (run(batch) - expected[: len(batch)]).abs().max().item() <= TOL
    # from the run directory (reduced with its recipe's rule): the same graph
    again = str(tmp_path / f"again.{'onnx' if fmt == 'onnx' else 'pt'}")
    result = export_graph(run_dir, again, fmt)
    assert result["max_abs_diff"] <= TOL and result["checked_on"] == "the run's test split"
    assert (load_graph(again)[0](x) - expected).abs().max().item() <= TOL


def test_predict_reads_an_exported_graph_like_the_compact_file(run_dir, raw_inputs, tmp_path, capsys):
    pytest.importorskip("onnxruntime")
    path, _ = raw_inputs
    figures = {}
    for name in ("compact", "ts", "onnx"):
        source = _compact(run_dir)
        if name != "compact":
            source = str(tmp_path / f"g.{'onnx' if name == 'onnx' else 'pt'}")
            export_graph(_compact(run_dir), source, "onnx" if name == "onnx" else "torchscript")
        out = str(tmp_path / f"{name}.npz")
        assert main(["predict", source, "--data", path, "--out", out]) == 0
        printed = capsys.readouterr().out
        assert ("exported graph" in printed) == (name != "compact") and "accuracy" in printed
        figures[name] = dict(np.load(out))
    for name in ("ts", "onnx"):
        assert figures[name].keys() == figures["compact"].keys()
        for column, values in figures["compact"].items():
            assert np.allclose(figures[name][column], values, atol=1e-5), column


def test_exported_graphs_load_in_an_interpreter_without_pyro_sparse(run_dir, raw_inputs, tmp_path):
    """A fresh, isolated interpreter (-I: no user site, no current directory on the path) in which
    importing pyro_sparse fails: TorchScript needs torch only, ONNX onnxruntime only."""
    formats = ["torchscript"] + (["onnx"] if _has("onnxruntime") else [])
    x = raw_inputs[1][:50]
    module = load_compact(_compact(run_dir))
    with torch.no_grad():
        expected = module(apply_input_transform(x, module.info["input_transform"])).numpy()
    np.save(tmp_path / "x.npy", x.numpy())
    np.save(tmp_path / "expected.npy", expected)
    for fmt in formats:
        export_graph(_compact(run_dir), str(tmp_path / f"net.{fmt}"), fmt)
    script = f"""
import importlib.util, json, sys
sys.modules["pyro_sparse"] = None  # no pyro-sparse: importing it fails
try:
    import pyro_sparse
    raise SystemExit("pyro_sparse is importable")
except ImportError:
    pass
import numpy as np
x, expected = np.load({str(tmp_path / 'x.npy')!r}), np.load({str(tmp_path / 'expected.npy')!r})
out = {{}}
if "torchscript" in {formats!r}:
    import torch
    extra = {{"pyro_sparse.json": ""}}
    m = torch.jit.load({str(tmp_path / 'net.torchscript')!r}, _extra_files=extra)
    with torch.no_grad():
        out["torchscript"] = float(np.abs(m(torch.from_numpy(x)).numpy() - expected).max())
    out["meta"] = json.loads(extra["pyro_sparse.json"])["likelihood"]
if "onnx" in {formats!r}:
    import onnxruntime
    s = onnxruntime.InferenceSession({str(tmp_path / 'net.onnx')!r}, providers=["CPUExecutionProvider"])
    out["onnx"] = float(np.abs(s.run(None, {{"x": x}})[0] - expected).max())
    out["onnx_meta"] = json.loads(s.get_modelmeta().custom_metadata_map["pyro_sparse"])["feature_shape"]
print(json.dumps(out))
"""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    done = subprocess.run([sys.executable, "-I", "-c", script], capture_output=True, text=True, cwd=str(tmp_path),
                          env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["torchscript"] <= TOL and result["meta"] == {"type": "categorical"}
    if "onnx" in formats:
        assert result["onnx"] <= TOL and result["onnx_meta"] == [64]


def _has(name):
    try:
        __import__(name)
        return True
    except ImportError:
        return False


def test_export_errors_name_the_flag_or_file_and_exit_2(run_dir, tmp_path, capsys, monkeypatch):
    out = str(tmp_path / "g.pt")
    assert main(["export", _compact(run_dir), "--format", "tflite", "--out", out]) == 2
    assert "--format: expected torchscript or onnx, got 'tflite'" in capsys.readouterr().err
    assert main(["export", str(tmp_path / "nothing.pt"), "--format", "onnx", "--out", out]) == 2
    assert "nothing.pt: no such run directory or compact file" in capsys.readouterr().err
    open(out, "w").write("mine")
    assert main(["export", _compact(run_dir), "--format", "torchscript", "--out", out]) == 2
    assert "g.pt: exists; use --overwrite" in capsys.readouterr().err and open(out).read() == "mine"
    assert main(["export", _compact(run_dir), "--format", "torchscript", "--out", out + "2", "--method", "opd"]) == 2
    assert "is a compact file, already reduced" in capsys.readouterr().err and not os.path.exists(out + "2")
    assert main(["export", _compact(run_dir), "--format", "onnx", "--out", str(tmp_path / "no" / "g.onnx")]) == 2
    assert "no such directory" in capsys.readouterr().err
    real_import = builtins.__import__

    def no_onnx(name, *args, **kwargs):
        if name.split(".")[0] in ("onnx", "onnxruntime"):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_onnx)
    assert main(["export", _compact(run_dir), "--format", "onnx", "--out", str(tmp_path / "g.onnx")]) == 2
    err = capsys.readouterr().err
    assert "--format onnx: needs the 'onnx' package (pip install 'pyro-sparse[onnx]'" in err
    assert not os.path.exists(tmp_path / "g.onnx") and not [p for p in os.listdir(tmp_path) if ".tmp-" in p]
    monkeypatch.setattr(builtins, "__import__", real_import)
    if _has("onnxruntime"):
        path = str(tmp_path / "ok.onnx")
        export_graph(_compact(run_dir), path, "onnx")
        monkeypatch.setattr(builtins, "__import__", no_onnx)
        with pytest.raises(PyroSparseError, match="running an ONNX graph needs onnxruntime"):
            load_graph(path)
