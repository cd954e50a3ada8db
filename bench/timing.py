"""Clocks and interleaved timing shared by the speed and scaling sections.

Every timed block records two clocks: ``time.thread_time()`` (CPU time of this thread) and
``time.perf_counter()`` (wall). With one torch thread the work runs on the calling thread, so
its CPU time is the cost of the work itself and, unlike wall time, does not grow when other
processes share the cores (the wall clock of a preempted thread keeps running). The tables
quote CPU time; wall times are kept in the JSON next to them.
"""

from __future__ import annotations

import statistics
import time


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
