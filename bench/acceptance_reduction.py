"""Acceptance figures of the reduction issue on the digits MLP (CPU, one thread).

Run: PYTHONPATH=. python bench/acceptance_reduction.py [--out DIR] [--quick] [--seeds 0,1,2,3,4]

1. One-shot reduction of ``models/mlp_gaussian_centered.yaml`` (Gaussian prior N(0, 0.3^2), inputs
   centred) fitted with ``inference/svi_meanfield_converged.yaml`` (lr 1e-2, 100 epochs), one fit
   per seed: Savage-Dickey, BMR (reduced prior N(0, (0.01 s)^2)) and the layer-wise
   spike-and-slab rule; fraction of weights removed and accuracy of the compact network against the
   dense posterior mean. For reference, the same rules on ``models/mlp_gaussian.yaml`` +
   ``inference/svi_meanfield.yaml`` (raw inputs, prior N(0, 1), lr 1e-3: scales not converged).
2. OPD on the converged SVI posterior against one-shot magnitude pruning of the MAP network
   (``inference/map.yaml``, same spec and data) at 80/90/95/98% sparsity, global and per-layer
   ranking; and against the MAP network of the raw-input ``mlp_gaussian`` spec.
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

from pyro_sparse.rebuild import compact, masked_module
from pyro_sparse.reduction import reduce
from pyro_sparse.runs import fit_run
from pyro_sparse.summary import summarize

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def accuracy(module, x, y):
    with torch.no_grad():
        return (module(x).argmax(-1) == y).float().mean().item()


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


def sweep(run, method, sparsities=(0.8, 0.9, 0.95, 0.98), scope="global"):
    s = summarize(run.network, run.guide)
    x, y = run.dataset.x_test, run.dataset.y_test
    return {q: accuracy(masked_module(run.network, s, reduce(s, method, sparsity=q, scope=scope)), x, y)
            for q in sparsities}


def print_rows(label, rows):
    for method, r in rows.items():
        print(f"{label:<10} {method:<14} removed {r['removed']:.4f}  accuracy {r['accuracy']:.4f}  "
              f"(dense posterior mean {r['dense']:.4f}, diff {100 * (r['accuracy'] - r['dense']):+.2f} points)  "
              f"units kept {r['units_kept']}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None, help="directory for the runs (default: a temporary one)")
    parser.add_argument("--quick", action="store_true", help="seed 0 only, no reference fits")
    parser.add_argument("--seeds", default="0,1,2,3,4", help="seeds of the one-shot fits")
    args = parser.parse_args()
    torch.set_num_threads(1)
    out = args.out or tempfile.mkdtemp(prefix="acceptance-")
    results = {"out": out}
    model = os.path.join(ROOT, "models", "mlp_gaussian_centered.yaml")
    raw_model = os.path.join(ROOT, "models", "mlp_gaussian.yaml")
    seeds = [0] if args.quick else [int(s) for s in args.seeds.split(",")]

    print("== 1. one-shot reduction, mlp_gaussian_centered + svi_meanfield_converged")
    results["one_shot"], runs = {}, {}
    for seed in seeds:
        recipe = recipe_with("svi_meanfield_converged", out, seed=seed)
        run, metrics, seconds = fit(model, recipe, os.path.join(out, f"svi-converged-seed{seed}"))
        runs[seed] = run
        rows = one_shot(run)
        results["one_shot"][seed] = {"fit_seconds": seconds, "fit_accuracy": metrics["test_accuracy"], **rows}
        print_rows(f"seed {seed}", rows)
    if not args.quick:
        print("reference: mlp_gaussian (raw inputs, prior N(0, 1)) + svi_meanfield (lr 1e-3, 60 epochs)")
        ref, metrics, seconds = fit(raw_model, os.path.join(ROOT, "inference", "svi_meanfield.yaml"),
                                    os.path.join(out, "svi-reference"))
        rows = one_shot(ref)
        results["one_shot_reference"] = {"fit_seconds": seconds, "fit_accuracy": metrics["test_accuracy"], **rows}
        print_rows("reference", rows)

    print("\n== 2. OPD on the SVI posterior vs one-shot magnitude pruning of the MAP network")
    quantiles = (0.8, 0.9, 0.95, 0.98)
    table = {}
    for seed in seeds:
        map_recipe = recipe_with("map", out, seed=seed)
        map_run, _, _ = fit(model, map_recipe, os.path.join(out, f"map-seed{seed}"))
        for scope in ("global", "layer"):
            table[f"seed {seed} map magnitude ({scope})"] = sweep(map_run, "magnitude", quantiles, scope)
            table[f"seed {seed} svi opd ({scope})"] = sweep(runs[seed], "opd", quantiles, scope)
        if not args.quick:
            raw_map, _, _ = fit(raw_model, map_recipe, os.path.join(out, f"map-raw-seed{seed}"))
            table[f"seed {seed} map magnitude, raw inputs (global)"] = sweep(raw_map, "magnitude", quantiles)
    results["opd_vs_map"] = table
    print(f"{'':<44}" + "".join(f"{q:>8}" for q in quantiles))
    for name, row in table.items():
        print(f"{name:<44}" + "".join(f"{row[q]:>8.4f}" for q in quantiles))
    for seed in seeds:
        for scope in ("global", "layer"):
            opd, mag = table[f"seed {seed} svi opd ({scope})"], table[f"seed {seed} map magnitude ({scope})"]
            print(f"seed {seed} OPD - MAP magnitude ({scope}): "
                  + ", ".join(f"{q}: {100 * (opd[q] - mag[q]):+.1f} points" for q in (0.9, 0.95)))

    print("\n== 3. iterative BMR, mlp_gaussian + svi_bmr_iterative")
    it_run, it_metrics, seconds = fit(raw_model,
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
