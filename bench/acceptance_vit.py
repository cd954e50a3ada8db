"""Acceptance figures of issue 11 on digits: tiny ViT and MLP-Mixer (CPU, one thread).

Run: PYTHONPATH=. python bench/acceptance_vit.py [--out DIR] [--arch vit,mixer] [--sparsevd]

For each architecture (``models/vit_tiny_gaussian.yaml``, ``models/mixer_tiny_gaussian.yaml``):

1. MAP (``inference/map_transformer.yaml``): test accuracy of the point estimate.
2. Iterative BMR (``inference/svi_bmr_iterative.yaml``, Markovic et al. 2023): the fitted run is
   reduced with its own rule (Savage-Dickey) by ``reduce_run``; fraction of weights removed,
   accuracy of the dense and of the compact posterior-mean network, max |logit difference|
   between the compact and the masked network, attention heads and MLP units removed per block.
3. With ``--sparsevd``: the ``*_tiny_sparsevd.yaml`` specs with their own recipe
   (``inference/svi_sparsevd_transformer.yaml``), reduced by log alpha > 3.

Accuracy "kept within 2 points" is measured against the MAP network. Evaluation during the SVI
fits runs every 5 epochs (``eval_every``), which does not change the fit. Writes
``DIR/acceptance_vit.json``.
"""

import argparse
import json
import os
import tempfile
import time

import torch
import yaml

from pyro_sparse.outcome import format_blocks
from pyro_sparse.reduced_runs import reduce_run
from pyro_sparse.runs import fit_run

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def recipe(name, directory, **changes):
    data = yaml.safe_load(open(os.path.join(ROOT, "inference", f"{name}.yaml")))
    data.update({"num_threads": 1, **changes})
    path = os.path.join(directory, f"{name}.yaml")
    with open(path, "w") as f:
        yaml.safe_dump(data, f)
    return path


def fit(model, recipe_path, out):
    t0 = time.perf_counter()
    _, metrics = fit_run(os.path.join(ROOT, "models", f"{model}.yaml"), recipe_path, "digits", out,
                         overwrite=True, progress=False)
    return metrics, time.perf_counter() - t0


def reduced(directory, method, map_accuracy):
    r = reduce_run(directory, method)
    row = {k: r[k] for k in ("sparsity", "weights_kept", "weights_total", "test_accuracy_dense",
                             "test_accuracy_reduced", "max_abs_output_diff", "units_removed_per_layer",
                             "flops_dense", "flops_compact", "params_dense", "params_compact")}
    row["blocks"] = r.get("blocks", {})
    row["points_below_map"] = 100 * (map_accuracy - r["test_accuracy_reduced"])
    print(f"  {method}: removed {r['sparsity']:.4f} of {r['weights_total']} weights; accuracy dense "
          f"{r['test_accuracy_dense']:.4f}, compact {r['test_accuracy_reduced']:.4f} "
          f"({row['points_below_map']:.2f} points below MAP); max |compact - masked| "
          f"{r['max_abs_output_diff']:.1e}; params {r['params_dense']} -> {r['params_compact']}, "
          f"FLOPs {r['flops_dense']} -> {r['flops_compact']}")
    print("\n".join("    " + line for line in format_blocks(r).splitlines()))
    return row


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None, help="directory for the runs (default: a temporary one)")
    parser.add_argument("--arch", default="vit,mixer", help="comma-separated: vit, mixer")
    parser.add_argument("--sparsevd", action="store_true", help="also fit the Sparse VD specs")
    args = parser.parse_args()
    torch.set_num_threads(1)
    out = args.out or tempfile.mkdtemp(prefix="acceptance-vit-")
    os.makedirs(out, exist_ok=True)
    mapr = recipe("map_transformer", out)
    bmr = recipe("svi_bmr_iterative", out, eval_every=5)
    svd = recipe("svi_sparsevd_transformer", out)
    results = {"out": out}
    for arch in [a.strip() for a in args.arch.split(",") if a.strip()]:
        print(f"== {arch}_tiny on digits")
        res = results[arch] = {}
        metrics, seconds = fit(f"{arch}_tiny_gaussian", mapr, os.path.join(out, f"{arch}-map"))
        map_acc = metrics["test_accuracy"]
        res["map"] = {"test_accuracy": map_acc, "fit_seconds": seconds}
        print(f"  MAP: test accuracy {map_acc:.4f} ({seconds:.0f} s)")
        directory = os.path.join(out, f"{arch}-bmr")
        metrics, seconds = fit(f"{arch}_tiny_gaussian", bmr, directory)
        print(f"  iterative BMR: removed {metrics['bmr_sparsity']:.4f} during training, posterior predictive "
              f"accuracy {metrics['test_accuracy']:.4f} ({seconds:.0f} s)")
        res["iterative_bmr"] = {"fit_seconds": seconds, "predictive_accuracy": metrics["test_accuracy"],
                                **reduced(directory, "savage-dickey", map_acc)}
        if args.sparsevd:
            directory = os.path.join(out, f"{arch}-sparsevd")
            metrics, seconds = fit(f"{arch}_tiny_sparsevd", svd, directory)
            print(f"  Sparse VD: posterior predictive accuracy {metrics['test_accuracy']:.4f} ({seconds:.0f} s)")
            res["sparsevd"] = {"fit_seconds": seconds, "predictive_accuracy": metrics["test_accuracy"],
                               **reduced(directory, "log-alpha", map_acc)}
    path = os.path.join(out, "acceptance_vit.json")
    with open(path, "w") as f:
        json.dump(results, f, indent=2, default=str)
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
