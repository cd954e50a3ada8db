"""Size and latency of deployed compact networks against their dense networks (issue 24's figures).

For each fitted run directory given (default: fits the digits MLP and LeNet-5 with Sparse VD, their
specs' own recipes, seed 0, into ``--work``), the recipe's rule reduces it in memory and the script
prints, in one process:

* the compact file's bytes (as ``reduce`` writes it) against ``torch.save(dense.state_dict())``;
* latency at batch 1 and 256 (the test split's first examples), interleaved blocks
  (:func:`pyro_sparse.timing.interleaved`), one torch thread, ``torch.inference_mode``, median CPU
  time per call, of: the dense network (``network.deterministic`` at the posterior means), the
  compact network as ``reduce`` writes it, and -- to show where its speed comes from -- the same
  compact network with every layer dense (``storage="dense"``), and that one run through a plain
  ``nn.Sequential`` with torch's ``nn.MaxPool2d`` (no layer-loop or pooling change: what the
  compact network was before issue 24); the TorchScript and ONNX exports (ONNX Runtime, one
  thread);
* the like-for-like figure: the dense network run with the compact network's layer loop and
  pooling (:class:`~pyro_sparse.rebuild.CompactSequential`,
  :class:`~pyro_sparse.layers.StridedMaxPool2d`), so the ratio counts only what the kept weights
  save.

    python -m bench.bench_deploy [--runs DIR ...] [--repeats 21] [--work runs/bench-deploy]

Check ``uptime`` first: the figures are CPU time of one thread, which other processes on the same
cores still slow down (shared caches, SMT siblings).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import warnings
from collections import OrderedDict

import torch
from torch import nn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_SPECS = (("mlp-sparsevd", "models/mlp_sparsevd.yaml"), ("lenet5-sparsevd", "models/lenet5_sparsevd.yaml"))


def _fit(name, spec, work):
    out = os.path.join(work, name)
    if not os.path.exists(os.path.join(out, "metrics.json")):
        subprocess.run([sys.executable, "-m", "pyro_sparse", "fit", "--model", os.path.join(ROOT, spec), "--data",
                        "digits", "--seed", "0", "--out", out, "--quiet", "--overwrite"], check=True,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    return out


def _plain_loop(module):
    """The same layers in a plain ``nn.Sequential``, torch's max pooling: the compact network as it
    ran before issue 24 (modules shared, not copied)."""
    children = OrderedDict()
    for name, child in module.named_children():
        if type(child).__name__ == "StridedMaxPool2d":
            child = nn.MaxPool2d(child.kernel_size, child.stride, child.padding)
        children[name] = child
    return nn.Sequential(children).eval()


def _compact_loop(module):
    """The dense network with the compact network's layer loop and pooling."""
    from pyro_sparse.layers import StridedMaxPool2d
    from pyro_sparse.rebuild import CompactSequential

    children = OrderedDict()
    for name, child in module.named_children():
        if StridedMaxPool2d.applies(child):
            child = nn.MaxPool2d(child.kernel_size, child.stride, child.padding)
            child.__class__ = StridedMaxPool2d
        children[name] = child
    return CompactSequential(children).eval()


def measure(run_dir, repeats=21, log=print) -> dict:
    from pyro_sparse.deploy import write_graph
    from pyro_sparse.outcome import saved_bytes
    from pyro_sparse.rebuild import compact, masked_module
    from pyro_sparse.reduced_runs import _decide, compact_payload, run_rule
    from pyro_sparse.runs import load_run
    from pyro_sparse.timing import interleaved

    torch.set_num_threads(1)
    run = load_run(run_dir)
    method, threshold, sparsity, structured = run_rule(run)
    summary = run.trainer.posterior_summary()
    decision = _decide(summary, method, sparsity=sparsity, threshold=threshold, structured=structured)
    dense = masked_module(run.network, summary)
    small = compact(run.network, summary, decision)
    small_dense = compact(run.network, summary, decision, storage="dense")
    x = run.dataset.x_test
    out = {"run": run_dir, "rule": method, "sparsity": decision.sparsity,
           "bytes_dense": saved_bytes(dense.state_dict()), "bytes_compact": saved_bytes(compact_payload(small, {})),
           "bytes_compact_dense_storage": saved_bytes(compact_payload(small_dense, {})),
           "storage": {k: (v["storage"]["storage"] if v["storage"]["layer"] == "compact" else "plain",
                           v["storage"].get("kernels"), v["storage"].get("switch_rows"))
                       for k, v in small.plan.layers.items() if "storage" in v}}
    fns = {"dense": dense, "dense, compact loop": _compact_loop(dense), "compact": small,
           "compact, dense storage": small_dense, "compact, dense storage, plain loop": _plain_loop(small_dense)}
    with tempfile.TemporaryDirectory() as tmp:
        write_graph(small, x[:2], os.path.join(tmp, "g.pt"), "torchscript")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            fns["torchscript"] = torch.jit.load(os.path.join(tmp, "g.pt")).eval()
        try:
            import onnxruntime

            write_graph(small, x[:2], os.path.join(tmp, "g.onnx"), "onnx")
            options = onnxruntime.SessionOptions()
            options.intra_op_num_threads = options.inter_op_num_threads = 1
            session = onnxruntime.InferenceSession(os.path.join(tmp, "g.onnx"), options,
                                                   providers=["CPUExecutionProvider"])
            fns["onnx"] = lambda xb: session.run(None, {"x": xb.numpy()})[0]
        except ImportError:
            pass
        out["latency"] = {}
        for b, calls in ((1, 200), (256, 10)):
            xb = x[:b]
            with torch.inference_mode():
                t = interleaved({k: (lambda f=f: f(xb)) for k, f in fns.items()}, repeats, calls)
            out["latency"][f"b{b}"] = {k: 1e6 * v["cpu"] for k, v in t.items()}
            out["latency"][f"b{b}_wall"] = {k: 1e6 * v["wall"] for k, v in t.items()}
    return out


def report(r) -> str:
    lines = [f"{r['run']} ({r['rule']}, {100 * r['sparsity']:.2f}% of weights removed by the rule)",
             f"  compact file {r['bytes_compact']:,} B (every layer dense: {r['bytes_compact_dense_storage']:,} B) "
             f"against the dense state_dict's {r['bytes_dense']:,} B: {r['bytes_dense'] / r['bytes_compact']:.1f}x "
             "smaller",
             "  storage: " + ", ".join(f"{k} {s}{'' if kern is None else ' ' + '/'.join(kern)}"
                                       f"{'' if sw is None else f' (switch at {sw} rows)'}"
                                       for k, (s, kern, sw) in r["storage"].items())]
    for b in ("b1", "b256"):
        t = r["latency"][b]
        base = t["dense"]
        lines.append(f"  batch {b[1:]} (median CPU us per call; speed-up against the dense network):")
        for k, v in t.items():
            lines.append(f"    {k:<36} {v:9.1f}  {base / v:5.2f}x")
        lines.append(f"    like-for-like (dense with the compact loop / compact): "
                     f"{t['dense, compact loop'] / t['compact']:.2f}x")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", nargs="*", help="fitted run directories (default: fit the digits MLP and LeNet-5 "
                                                   "Sparse VD into --work)")
    parser.add_argument("--work", default=os.path.join(ROOT, "runs", "bench-deploy"))
    parser.add_argument("--repeats", type=int, default=21)
    args = parser.parse_args(argv)
    runs = args.runs or [_fit(name, spec, args.work) for name, spec in DEFAULT_SPECS]
    print(f"load average {os.getloadavg()[0]:.2f} (1 min) on {os.cpu_count()} cores")
    for run in runs:
        print(report(measure(run, args.repeats)))
    print(f"load average {os.getloadavg()[0]:.2f} (1 min) at the end")


if __name__ == "__main__":
    main()
