"""Scaling: SVI step time and peak memory of the Sparse VD MLP against the plain network, by width.

The network is ``models/mlp_sparsevd.yaml`` with both hidden layers of width ``h``
(64-h-h-10 on digits, batch 64): the Sparse VD step is the one
:class:`~pyro_sparse.fitting.SVITrainer` runs with ``inference/svi_sparsevd.yaml`` (mean-field
guide, local reparameterisation, analytic KL, Adam); the plain step is ``nn.Sequential`` +
cross-entropy + ``torch.optim.Adam`` of the same architecture.

Each (width, network) runs in its own child process, forked from a freshly spawned interpreter
that has only imported the library and loaded the data, so one measurement's memory cannot hide
in pages another measurement (or the rest of the benchmark) freed. **Peak memory** is the growth of
the child's anonymous memory at its peak: the child resets
its high-water mark (``echo 5 > /proc/self/clear_refs``, Linux >= 4.0), reads ``RssAnon``,
builds the network, guide and optimiser, runs the warm-up and the timed steps, and reports
``VmHWM - RssFile - RssShmem - RssAnon_before`` from ``/proc/self/status``. That counts what the
step allocates and keeps or touches at its peak (parameters, gradients, optimiser state,
activations, temporaries, allocator slack) but not the pages of the shared libraries' code the
child faults in as it runs (about 20 MiB of libtorch, which ``VmHWM - VmRSS_before`` would
include; that figure is kept as ``rss_growth_bytes``). torch's CPU allocator hands large blocks
back to the OS, so ``tracemalloc`` would see none of this. **Step time** is the median CPU time of
single steps (see :mod:`bench.timing`).
"""

from __future__ import annotations

import multiprocessing as mp
import os
import re

import torch

WIDTHS_QUICK = (100, 200, 400, 800, 1600, 3200)
WIDTHS_FULL = (100, 200, 400, 800, 1600, 3200)


_DATA = {}


def _prepare():
    """Imports and data that every child needs, loaded once in the parent before forking, so
    the children's memory growth is that of the network and its step alone."""
    import pyro  # noqa: F401
    import yaml  # noqa: F401

    from pyro_sparse.data import load_digits
    from pyro_sparse.fitting import SVITrainer  # noqa: F401
    from pyro_sparse.runs import build  # noqa: F401

    _DATA.setdefault("digits", load_digits())
    torch.set_num_threads(1)
    for kind in ("plain", "sparsevd"):  # lazy one-time initialisation of the code paths
        step, _ = _stepper(kind, 8)
        for _ in range(2):
            step()


def _status(field):
    with open("/proc/self/status") as f:
        return int(re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.M).group(1)) * 1024


def _measure(kind, width, budget_s, conn, device="cpu"):
    try:
        torch.set_num_threads(1)
        cuda = device.startswith("cuda")
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        anon_before, rss_before = _status("RssAnon"), _status("VmRSS")
        step, n_params = _stepper(kind, width, device)
        import time

        sync = torch.cuda.synchronize if cuda else (lambda: None)
        for _ in range(2):  # warm-up; the first step allocates the optimiser state
            step()
        sync()
        c0 = time.perf_counter() if cuda else time.thread_time()
        step()
        sync()
        estimate = max((time.perf_counter() if cuda else time.thread_time()) - c0, 1e-4)
        steps = int(min(50, max(5, budget_s / estimate)))
        from .timing import interleaved

        t = interleaved({"fn": step}, steps, 1, warmup=0, sync=sync)["fn"]
        peak = (torch.cuda.max_memory_allocated() if cuda else
                _status("VmHWM") - _status("RssFile") - _status("RssShmem") - anon_before)
        conn.send({"kind": kind, "width": width, "params": n_params, "steps": steps, **t, "device": device,
                   "peak_bytes": peak, "rss_growth_bytes": _status("VmHWM") - rss_before})
    except Exception as e:  # reported by the parent
        conn.send({"kind": kind, "width": width, "error": f"{type(e).__name__}: {e}"})
    finally:
        conn.close()


def _stepper(kind, width, device="cpu"):
    import pyro
    import torch.nn.functional as F
    import yaml

    from .registry import ROOT

    data = _DATA["digits"]
    gen = torch.Generator().manual_seed(0)
    n = len(data.x_train)
    if kind == "plain":
        d = data.x_train.shape[1]
        net = torch.nn.Sequential(torch.nn.Linear(d, width), torch.nn.ReLU(), torch.nn.Linear(width, width),
                                  torch.nn.ReLU(), torch.nn.Linear(width, data.num_outputs)).to(device)
        opt = torch.optim.Adam(net.parameters(), lr=2e-3)
        x, y = data.x_train.to(device), data.y_train.to(device)

        def step():
            idx = torch.randint(n, (64,), generator=gen).to(device)
            loss = F.cross_entropy(net(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        return step, sum(p.numel() for p in net.parameters())
    from pyro_sparse.fitting import SVITrainer
    from pyro_sparse.runs import build, parse_specs

    spec = yaml.safe_load(open(os.path.join(ROOT, "models", "mlp_sparsevd.yaml")))
    linears = [layer for layer in spec["layers"] if layer["type"] == "linear"]
    for layer in linears[:-1]:
        layer["out"] = width
    recipe = yaml.safe_load(open(os.path.join(ROOT, "inference", "svi_sparsevd.yaml")))
    recipe["num_threads"], recipe["device"] = 1, device
    spec, recipe = parse_specs(spec, recipe)
    network, guide = build(spec, recipe, data)
    trainer = SVITrainer(network, guide, data, recipe, progress=False)
    pyro.enable_validation(False)

    def step():
        trainer._step(torch.randint(n, (recipe["batch_size"],), generator=gen).to(trainer.device), 1.0)

    return step, network.num_weights()


def _server(widths, budget_s, conn, device="cpu"):
    """In a fresh (spawned) interpreter: prepare once, then fork one child per measurement."""
    rows = []
    try:
        _prepare()
        ctx = mp.get_context("fork")
        for width in widths:
            for kind in ("plain", "sparsevd"):
                parent, child = ctx.Pipe(duplex=False)
                p = ctx.Process(target=_measure, args=(kind, width, budget_s, child, device))
                p.start()
                child.close()
                try:
                    row = parent.recv()
                except EOFError:
                    row = {"kind": kind, "width": width, "error": f"child exited with code {p.exitcode}"}
                p.join()
                rows.append(row)
                conn.send(("row", row))
    except Exception as e:
        conn.send(("error", f"{type(e).__name__}: {e}"))
    conn.send(("done", None))
    conn.close()


def run(widths=WIDTHS_QUICK, budget_s=1.0, log=print, device="cpu") -> list:
    """One row per (width, kind in plain / sparsevd), each measured in a fresh forked child of a
    freshly spawned interpreter (the caller's heap, with the free memory of earlier work, would
    let a forked child grow without touching new pages)."""
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe(duplex=False)
    server = ctx.Process(target=_server, args=(tuple(widths), budget_s, child, device))
    server.start()
    child.close()
    rows = []
    while True:
        try:
            kind, value = parent.recv()
        except EOFError:
            log(f"  scaling: the measuring process exited with code {server.exitcode}")
            break
        if kind == "done":
            break
        if kind == "error":
            log(f"  scaling: {value}")
            continue
        row = value
        rows.append(row)
        if "error" in row:
            log(f"  scaling {row['kind']} h={row['width']}: {row['error']}")
        else:
            clock = row["wall"] if device.startswith("cuda") else row["cpu"]
            log(f"  scaling {row['kind']} h={row['width']}: {1e3 * clock:.2f} ms/step, "
                f"peak +{row['peak_bytes'] / 2**20:.1f} MiB")
    server.join()
    return rows
