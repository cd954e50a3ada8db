"""How many torch threads `pyro-sparse fit` should use: the step time of the demo MLP (Sparse VD,
64-300-100-10) and of LeNet-5 (Sparse VD) with 1, 2, ... threads and with the default, on an idle
machine or under load.

    python bench/bench_threads.py [--threads default,1,2] [--load 2] [--repeats 2] [--out runs/bench/threads.json]

Each configuration is one `pyro-sparse fit` process (a few epochs, --quiet); the figures are the
wall-clock and CPU milliseconds per training step of its metrics.json (``step_wall_ms``,
``step_cpu_ms``: the process's CPU time in the steps, every thread), the whole process's CPU and
wall seconds (start-up and evaluation included), and the load average before it ran.
``--load N`` starts N busy loops (one Python process each, the "stress -c N" of the issue) for the
duration, so the fits compete for the cores as on a shared machine. Configurations are
interleaved over the repeats, so a change in the machine's load hits all of them alike.
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODELS = {  # name: (spec, recipe, epochs)
    "demo MLP": ("models/mlp_sparsevd.yaml", "inference/svi_sparsevd.yaml", 4),
    "LeNet-5": ("models/lenet5_sparsevd.yaml", "inference/svi_lenet5_sparsevd.yaml", 2),
}


def busy_loops(n):
    return [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]


def fit(spec, recipe, epochs, threads, out):
    args = [sys.executable, "-m", "pyro_sparse", "fit", "--model", os.path.join(ROOT, spec), "--inference",
            os.path.join(ROOT, recipe), "--data", "digits", "--out", out, "--epochs", str(epochs), "--quiet",
            "--overwrite"]
    if threads != "default":
        args += ["--threads", str(threads)]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    subprocess.run(args, check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    with open(os.path.join(out, "metrics.json")) as f:
        metrics = json.load(f)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    steps = metrics["steps"]
    return {"step_wall_ms": metrics["step_wall_ms"], "step_cpu_ms": metrics["step_cpu_ms"], "process_cpu_s": cpu,
            "process_wall_s": wall, "steps": steps}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", default="default,1,2")
    parser.add_argument("--load", type=int, default=0, help="busy loops to run alongside")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--out", default=os.path.join(ROOT, "runs", "bench", "threads.json"))
    args = parser.parse_args()
    configs = [t if t == "default" else int(t) for t in args.threads.split(",")]
    loops = busy_loops(args.load)
    rows = []
    try:
        time.sleep(1.0 if loops else 0.0)
        with tempfile.TemporaryDirectory() as tmp:
            for repeat in range(args.repeats):
                for model in args.models.split(","):
                    spec, recipe, epochs = MODELS[model]
                    for threads in configs:
                        load = os.getloadavg()[0]
                        row = {"model": model, "threads": threads, "repeat": repeat, "load_before": load,
                               "busy_loops": args.load,
                               **fit(spec, recipe, epochs, threads, os.path.join(tmp, "run"))}
                        rows.append(row)
                        print(f"{model:9} threads {str(threads):7} load {load:4.2f}: "
                              f"{row['step_wall_ms']:7.2f} ms/step "
                              f"wall, {row['step_cpu_ms']:7.2f} ms/step CPU (all threads)", flush=True)
    finally:
        for p in loops:
            p.kill()
            p.wait()
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"nproc": os.cpu_count(), "rows": rows}, f, indent=2)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
