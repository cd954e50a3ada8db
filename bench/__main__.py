"""``python -m bench [--quick | --full]``: the library against the papers' baselines and plain PyTorch.

Sections (``--sections``, default all):

* ``quality``: every registry entry (model x method, ``bench/registry.py``) fitted, reduced by
  its rules and measured (accuracy, NLL, ECE, weights and units removed, compact size), plus
  accuracy-vs-sparsity curves of the threshold-free rules (``bench/quality.py``);
* ``speed``: fitting step vs plain PyTorch, reduction rules on ~1M weights, compact vs dense
  inference latency (``bench/speed.py``);
* ``scaling``: Sparse VD SVI step time and peak memory against the plain network as the
  width grows (``bench/scaling.py``).

``--quick`` (the default) shortens every recipe to its model's ``quick_scale`` of the epochs
(warm-up schedules scaled alike), runs three seeds of the headline model and one of the others,
and fewer timing repeats; it is meant to finish within 10 minutes on 2 cores. ``--full`` runs the
recipes as written, three seeds everywhere. Writes ``bench/RESULTS.md`` (quick) or
``bench/RESULTS-full.md`` (full), plots into ``bench/plots/`` and the raw numbers next to the
markdown as ``results-<mode>.json``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import multiprocessing as mp
import os
import platform
import resource
import shlex
import shutil
import subprocess
import sys
import tempfile
import time

import torch

from . import quality, report, scaling, speed
from .registry import METHODS, MODELS, ROOT

HERE = os.path.dirname(os.path.abspath(__file__))


def log(msg):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _cpu_seconds():
    own = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def machine() -> dict:
    cpu = platform.processor() or "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    memory = "memory unknown"
    try:
        with open("/proc/meminfo") as f:
            kb = int(next(line.split()[1] for line in f if line.startswith("MemTotal")))
        memory = f"{kb / 2**20:.0f} GiB RAM"
    except (OSError, StopIteration):
        pass
    try:
        commit = subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, timeout=10).stdout.strip() or "unknown"
        dirty = subprocess.run(["git", "-C", ROOT, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        commit += "+local changes" if dirty else ""
    except (OSError, subprocess.SubprocessError):
        commit = "unknown"
    from pyro_sparse.runs import versions

    return {"cpu": cpu, "cores": os.cpu_count(), "memory": memory,
            "os": f"{platform.system()} {platform.release()}", "versions": versions(), "commit": commit}


def gpu_text(device):
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name(0)
        if device.startswith("cuda"):
            return name, (f"The quality fits, the step ratios and the scaling sweep ran on {name} "
                          f"(`--device {device}`): their times are wall-clock, each block closed by "
                          "`torch.cuda.synchronize()`; the reduction rules and the inference latency ran on the CPU.")
        return name, (f"{name} is present but this run used the CPU; run `python -m bench --full --device cuda` "
                      "for the GPU figures.")
    return ("none: this machine has no GPU (torch.cuda.is_available() is False)",
            "No GPU on the machine that produced this file, so there are no GPU figures. On a machine with "
            "one, `python -m bench --full --device cuda` runs the quality fits there (that path has not been "
            "run yet) and its results should be committed as a separate section marked with the device.")


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="short recipes, 3 seeds for the headline (default)")
    mode.add_argument("--full", action="store_true", help="the recipes as written, 3 seeds everywhere")
    parser.add_argument("--sections", default="quality,speed,scaling",
                        help="comma-separated subset of quality,speed,scaling")
    parser.add_argument("--models", default=None, help=f"comma-separated subset of {','.join(MODELS)}")
    parser.add_argument("--methods", default=None, help=f"comma-separated subset of {','.join(METHODS)}")
    parser.add_argument("--seeds", default=None, help="seeds of every model, e.g. 0,1,2 (default: by mode)")
    parser.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1),
                        help="worker processes for the quality fits (one torch thread each)")
    parser.add_argument("--device", default="cpu",
                        help="device of the quality fits, the step ratios and the scaling sweep (cpu, cuda)")
    parser.add_argument("--widths", default=None, help="hidden widths of the scaling section, e.g. 100,400")
    parser.add_argument("--results", default=None, help="markdown file to write (default bench/RESULTS.md, "
                                                         "bench/RESULTS-full.md with --full)")
    parser.add_argument("--from-json", default=None, metavar="PATH",
                        help="only write the markdown and plots again from a results-*.json of an earlier run")
    args = parser.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: no GPU here (torch.cuda.is_available() is False)")
    if args.from_json:
        with open(args.from_json) as f:
            results = json.load(f)
        name = results["meta"]["mode"]
        path = args.results or os.path.join(os.path.dirname(os.path.abspath(args.from_json)),
                                            "RESULTS-full.md" if name == "full" else "RESULTS.md")
        plots = report.write(results, path, os.path.join(os.path.dirname(os.path.abspath(path)), "plots"),
                             prefix=f"{name}-")
        log(f"wrote {path} and {len(plots)} plot(s) from {args.from_json}")
        return
    full = args.full
    name = "full" if full else "quick"
    sections = {s.strip() for s in args.sections.split(",") if s.strip()}
    unknown = sections - {"quality", "speed", "scaling"}
    if unknown:
        parser.error(f"--sections: unknown {sorted(unknown)}")
    models = args.models.split(",") if args.models else list(MODELS)
    methods = args.methods.split(",") if args.methods else list(METHODS)
    for value, table, flag in ((models, MODELS, "--models"), (methods, METHODS, "--methods")):
        bad = [v for v in value if v not in table]
        if bad:
            parser.error(f"{flag}: unknown {bad}; expected some of {list(table)}")
    if args.jobs < 1:
        parser.error(f"--jobs: must be >= 1, got {args.jobs}")
    if args.seeds:
        seeds = {m: tuple(int(s) for s in args.seeds.split(",")) for m in models}
    else:
        seeds = {m: (0, 1, 2) if full or MODELS[m].headline else (0,) for m in models}
    results_path = args.results or os.path.join(HERE, "RESULTS-full.md" if full else "RESULTS.md")
    plot_dir = os.path.join(os.path.dirname(os.path.abspath(results_path)), "plots")

    torch.set_num_threads(1)
    os.environ.setdefault("PYRO_SPARSE_NO_PROGRESS", "1")
    wall0, cpu0 = time.perf_counter(), _cpu_seconds()
    load = os.getloadavg()[0]
    gpu, gpu_section = gpu_text(args.device)
    command = "python -m bench " + " ".join(shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))
    meta = {"mode": name, "command": command.strip(), "date": datetime.datetime.now().strftime("%Y-%m-%d %H:%M"),
            "gpu": gpu, "gpu_section": gpu_section, "jobs": args.jobs,
            "seeds": {m: list(s) for m, s in seeds.items()}, **machine()}
    meta["epochs_note"] = ("the recipes' epochs as written." if full else
                           "quick mode shortens each recipe to a fraction of its epochs, with its warm-up "
                           "schedules scaled alike: " + ", ".join(f"{m} {MODELS[m].quick_scale:g}" for m in models)
                           + " (see the table at the end; `--full` runs the recipes as written).")
    results = {"meta": meta}
    compact_dir = tempfile.mkdtemp(prefix="bench-compact-")
    try:
        if "quality" in sections:
            fitted = models if args.models else [m for m in models if MODELS[m].quality]
            todo, skipped = quality.tasks(name, seeds, compact_dir, fitted, methods,
                                          samples=30 if full else 10, device=args.device)
            results["skipped"] = skipped
            for s in skipped:
                log(f"skip {s['model']}/{s['method']}: {s['reason']}")

            def cost(t):
                return MODELS[t["model"]].cost * METHODS[t["method"]].cost * t["scale"]

            todo.sort(key=cost, reverse=True)
            log(f"quality: {len(todo)} fits on {args.jobs} worker(s)")
            out = []
            ctx = mp.get_context("fork")
            with ctx.Pool(args.jobs) as pool:
                for r in pool.imap_unordered(quality.run_task, todo):
                    if "error" in r:
                        log(r["traceback"])
                    r.pop("traceback", None)
                    out.append(r)
                    what = r.get("error") or ", ".join(
                        f"{k} {v['point']['accuracy']:.3f}@{v['sparsity']:.2f}" for k, v in r["rules"].items()
                        if "point" in v)
                    log(f"  [{len(out)}/{len(todo)}] {r['model']}/{r['method']} seed {r['seed']} "
                        f"({r['task_cpu_s']:.0f} s CPU): {what}")
            results["quality"] = sorted(out, key=lambda r: (list(MODELS).index(r["model"]),
                                                            list(METHODS).index(r["method"]), r["seed"]))
        if "speed" in sections:
            repeats, calls = (31, 20) if full else (11, 10)
            step_models = models if full else [m for m in ("digits-mlp", "digits-lenet5", "mnist1d-lstm", "digits-vit",
                                                           "digits-mixer") if m in models]
            log(f"speed: step ratios on {args.device}")
            results["speed"] = {"step_repeats": repeats, "step_calls": calls, "device": args.device,
                                "steps": speed.step_ratios(step_models, repeats, calls, methods, log=log,
                                                           device=args.device)}
            log("speed: reduction rules on ~1M weights")
            results["speed"]["rule_repeats"] = 7 if full else 3
            results["speed"]["rules"] = speed.reduction_rules(results["speed"]["rule_repeats"], log=log)
            if results.get("quality"):
                log("speed: inference latency")
                results["speed"]["latency"] = speed.latency(results["quality"], 31 if full else 11, log=log)
        if "scaling" in sections:
            log("scaling: width sweep")
            widths = (tuple(int(w) for w in args.widths.split(",")) if args.widths else
                      scaling.WIDTHS_FULL if full else scaling.WIDTHS_QUICK)
            results["scaling"] = scaling.run(widths, budget_s=3.0 if full else 1.0, log=log, device=args.device)
    finally:
        shutil.rmtree(compact_dir, ignore_errors=True)
    meta["wall_s"], meta["cpu_s"] = time.perf_counter() - wall0, _cpu_seconds() - cpu0
    end_load = os.getloadavg()[0]
    meta["load"] = (f"shared with other work (1-minute load average {load:.1f} at the start, {end_load:.1f} at "
                    f"the end, on {os.cpu_count()} cores)" if max(load, end_load) > 0.5 else "otherwise idle")
    plots = report.write(results, results_path, plot_dir, prefix=f"{name}-")
    json_path = os.path.join(os.path.dirname(os.path.abspath(results_path)), f"results-{name}.json")
    with open(json_path, "w") as f:
        json.dump(results, f, indent=1, default=str)
    log(f"wrote {results_path}, {json_path} and {len(plots)} plot(s) in {plot_dir}; "
        f"{meta['wall_s']:.0f} s wall, {meta['cpu_s']:.0f} s CPU")


if __name__ == "__main__":
    main()
