"""Acceptance figures of the reduction issue on the digits MLP (CPU, one thread).

Run: PYTHONPATH=. python bench/acceptance_reduction.py [--out DIR] [--quick]

1. One-shot reduction of ``models/mlp_gaussian.yaml`` fitted with ``inference/svi_meanfield.yaml``:
   Savage-Dickey, BMR (reduced prior N(0, (0.01 s)^2)) and the layer-wise spike-and-slab rule;
   fraction of weights removed and accuracy of the reduced posterior-mean network against the
   dense one. Repeated for narrower Gaussian prior scales s (the spec's 1.0, then 0.5, 0.4, 0.3;
   same recipe), since the evidence for removing a weight depends on the prior it is compared to.
2. OPD on the SVI posterior against one-shot global magnitude pruning of the MAP network
   (``inference/map.yaml``) at 90% and 95% sparsity; also OPD on an SVI posterior whose variances
   have converged (the same recipe with lr 0.01).
3. Iterative BMR (``inference/svi_bmr_iterative.yaml``): fraction removed and accuracy.

Writes ``DIR/acceptance.json`` and prints every figure.
"""

import argparse
import json
import os
import tempfile
import time

import torch
import yaml

from pyro_sparse.reduction import compact, masked_module, reduce
from pyro_sparse.runs import fit_run
from pyro_sparse.summary import summarize

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def accuracy(module, x, y):
    with torch.no_grad():
        return (module(x).argmax(-1) == y).float().mean().item()


def spec_with_scale(scale, directory):
    spec = yaml.safe_load(open(os.path.join(ROOT, "models", "mlp_gaussian.yaml")))
    spec["prior"]["scale"] = scale
    path = os.path.join(directory, f"mlp_gaussian_s{scale}.yaml")
    with open(path, "w") as f:
        yaml.safe_dump(spec, f)
    return path


def recipe_with(name, directory, **changes):
    recipe = yaml.safe_load(open(os.path.join(ROOT, "inference", f"{name}.yaml")))
    recipe.update(changes)
    path = os.path.join(directory, f"{name}-{'-'.join(f'{k}{v}' for k, v in changes.items())}.yaml")
    with open(path, "w") as f:
        yaml.safe_dump(recipe, f)
    return path


def fit(model, recipe, out):
    t0 = time.perf_counter()
    run, metrics = fit_run(model, recipe, "digits", out, overwrite=True, progress=False)
    return run, metrics, time.perf_counter() - t0


def one_shot(run):
    s = summarize(run.network, run.guide)
    x, y = run.dataset.x_test, run.dataset.y_test
    dense = accuracy(masked_module(run.network, s), x, y)
    rows = {}
    for method in ("savage-dickey", "bmr", "spike-slab"):
        d = reduce(s, method)
        module = compact(run.network, s, d)
        rows[method] = {"removed": d.sparsity, "accuracy": accuracy(module, x, y), "dense": dense,
                        "units_kept": {k: len(v) for k, v in module.plan.kept_units.items()}}
    return rows


def sweep(run, method, sparsities=(0.8, 0.9, 0.95, 0.98)):
    s = summarize(run.network, run.guide)
    x, y = run.dataset.x_test, run.dataset.y_test
    return {q: accuracy(masked_module(run.network, s, reduce(s, method, sparsity=q)), x, y) for q in sparsities}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None, help="directory for the runs (default: a temporary one)")
    parser.add_argument("--quick", action="store_true", help="only the spec's prior scale 1.0")
    args = parser.parse_args()
    torch.set_num_threads(1)
    out = args.out or tempfile.mkdtemp(prefix="acceptance-")
    results = {"out": out}
    svi = os.path.join(ROOT, "inference", "svi_meanfield.yaml")
    mapr = os.path.join(ROOT, "inference", "map.yaml")

    print("== 1. one-shot reduction, mlp_gaussian + svi_meanfield (60 epochs)")
    scales = (1.0,) if args.quick else (1.0, 0.5, 0.4, 0.3)
    results["one_shot"] = {}
    runs = {}
    for scale in scales:
        model = os.path.join(ROOT, "models", "mlp_gaussian.yaml") if scale == 1.0 else spec_with_scale(scale, out)
        run, metrics, seconds = fit(model, svi, os.path.join(out, f"svi-s{scale}"))
        runs[scale] = run
        rows = one_shot(run)
        results["one_shot"][scale] = {"fit_seconds": seconds, "fit_accuracy": metrics["test_accuracy"], **rows}
        for method, r in rows.items():
            print(f"prior scale {scale:<4} {method:<14} removed {r['removed']:.4f}  accuracy {r['accuracy']:.4f}  "
                  f"(dense posterior mean {r['dense']:.4f}, diff {100 * (r['accuracy'] - r['dense']):+.2f} points)  "
                  f"units kept {r['units_kept']}")

    print("\n== 2. OPD on the SVI posterior vs magnitude pruning of the MAP network (global ranking)")
    map_run, _, _ = fit(os.path.join(ROOT, "models", "mlp_gaussian.yaml"), mapr, os.path.join(out, "map"))
    fast = recipe_with("svi_meanfield", out, optimizer={"name": "Adam", "lr": 0.01})
    conv_run, conv_metrics, _ = fit(os.path.join(ROOT, "models", "mlp_gaussian.yaml"), fast,
                                    os.path.join(out, "svi-lr0.01"))
    table = {"map magnitude": sweep(map_run, "magnitude"), "svi opd": sweep(runs[1.0], "opd"),
             "svi magnitude": sweep(runs[1.0], "magnitude"), "svi(lr 0.01) opd": sweep(conv_run, "opd")}
    results["opd_vs_map"] = table
    print(f"{'':<18}" + "".join(f"{q:>8}" for q in (0.8, 0.9, 0.95, 0.98)))
    for name, row in table.items():
        print(f"{name:<18}" + "".join(f"{row[q]:>8.4f}" for q in (0.8, 0.9, 0.95, 0.98)))
    for name in ("svi opd", "svi(lr 0.01) opd"):
        gaps = {q: 100 * (table[name][q] - table["map magnitude"][q]) for q in (0.9, 0.95)}
        print(f"{name} - map magnitude: " + ", ".join(f"{q}: {g:+.1f} points" for q, g in gaps.items()))

    print("\n== 3. iterative BMR, mlp_gaussian + svi_bmr_iterative")
    it_run, it_metrics, seconds = fit(os.path.join(ROOT, "models", "mlp_gaussian.yaml"),
                                      os.path.join(ROOT, "inference", "svi_bmr_iterative.yaml"),
                                      os.path.join(out, "iterative"))
    s = summarize(it_run.network, it_run.guide)
    module = compact(it_run.network, s, reduce(s, "savage-dickey"))
    x, y = it_run.dataset.x_test, it_run.dataset.y_test
    results["iterative"] = {"removed_during_training": it_metrics["bmr_sparsity"],
                            "predictive_accuracy": it_metrics["test_accuracy"],
                            "compact_accuracy": accuracy(module, x, y), "fit_seconds": seconds,
                            "units_kept": {k: len(v) for k, v in module.plan.kept_units.items()}}
    r = results["iterative"]
    print(f"removed {r['removed_during_training']:.4f}  posterior predictive accuracy {r['predictive_accuracy']:.4f}  "
          f"compact (posterior mean) accuracy {r['compact_accuracy']:.4f}  units kept {r['units_kept']}  "
          f"({seconds:.0f} s)")
    with open(os.path.join(out, "acceptance.json"), "w") as f:
        json.dump(results, f, indent=2, default=str)
    print(f"\nwrote {os.path.join(out, 'acceptance.json')}")


if __name__ == "__main__":
    main()
