"""Clocks and interleaved timing: what ``reduce``/``report`` (a compact network against the dense
one) and the benchmarks (``bench/``: the speed and scaling sections) measure with.

Every timed block records two clocks: ``time.thread_time()`` (CPU time of this thread) and
``time.perf_counter()`` (wall). With one torch thread the work runs on the calling thread, so
its CPU time is the cost of the work itself and, unlike wall time, does not grow when other
processes share the cores (the wall clock of a preempted thread keeps running). The tables
quote CPU time; wall times are kept in the JSON next to them.
"""

from __future__ import annotations

import statistics
import time

__all__ = ["interleaved", "timed", "block_calls", "compare_latency"]


def _block(fn, calls, sync):
    sync()
    c0, w0 = time.thread_time(), time.perf_counter()
    for _ in range(calls):
        fn()
    sync()
    return (time.thread_time() - c0) / calls, (time.perf_counter() - w0) / calls


def interleaved(fns: dict, repeats: int, calls: int, warmup: int = 3, sync=None) -> dict:
    """Median seconds per call of each function in ``fns`` (name -> callable), timed in
    alternating blocks of ``calls`` calls, ``repeats`` rounds (a, b, a, b, ...), so a slow
    spell of the machine hits all of them alike. ``sync`` (e.g. ``torch.cuda.synchronize``) runs
    before and after each block, so the wall time of work queued on a device is counted.
    Returns name -> {"cpu", "wall", "cpu_min"}."""
    sync = sync or (lambda: None)
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    cpu = {k: [] for k in fns}
    wall = {k: [] for k in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            c, w = _block(fn, calls, sync)
            cpu[name].append(c)
            wall[name].append(w)
    return {k: {"cpu": statistics.median(cpu[k]), "wall": statistics.median(wall[k]), "cpu_min": min(cpu[k])}
            for k in fns}


def timed(fn, repeats: int, calls: int = 1, warmup: int = 1) -> dict:
    """Median (and minimum) seconds per call of one function."""
    return interleaved({"fn": fn}, repeats, calls, warmup)["fn"]


def block_calls(fn, seconds: float = 2e-3, limit: int = 1000) -> int:
    """How many calls of ``fn`` make a timed block of about ``seconds`` (from one timed call
    after a warm-up call), at least 1 and at most ``limit``."""
    fn()
    t0 = time.perf_counter()
    fn()
    return max(1, min(limit, int(seconds / max(time.perf_counter() - t0, 1e-7))))


def compare_latency(modules: dict, inputs: dict, repeats: int = 7, seconds: float = 2e-3) -> dict:
    """Latency of each module of ``modules`` (name -> callable) on each input of ``inputs`` (label ->
    tensor, e.g. ``{"b1": x[:1], "b256": x[:256]}``): for every input the modules are timed in
    interleaved blocks (:func:`interleaved`, ``repeats`` rounds, blocks of about ``seconds``),
    with one torch thread (restored afterwards) under ``torch.inference_mode``. Returns
    ``label -> {name: microseconds per call (median CPU time of this thread)}``, plus
    ``<name>_wall`` (median wall time)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    out = {}
    try:
        with torch.inference_mode():
            for label, x in inputs.items():
                fns = {name: (lambda m=m, x=x: m(x)) for name, m in modules.items()}
                calls = min(block_calls(f, seconds) for f in fns.values())
                t = interleaved(fns, repeats, calls, warmup=2)
                row = {name: 1e6 * v["cpu"] for name, v in t.items()}
                row.update({f"{name}_wall": 1e6 * v["wall"] for name, v in t.items()})
                out[label] = row
    finally:
        torch.set_num_threads(threads)
    return out
