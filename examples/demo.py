"""The main demo: fit a sparse Bayesian MLP on digits, prune it by the evidence, print a table.

Sparse Variational Dropout (Molchanov et al. 2017): a log-uniform prior on every weight, a
Gaussian posterior, and the rule "drop a weight when its posterior is mostly noise",
log alpha = log sigma^2 - log theta^2 > 3. Runs in about a minute on 2 CPU cores.

    python examples/demo.py [--epochs 100] [--out runs/demo]
"""

import argparse
import os
import time

import torch

from pyro_sparse.reduced_runs import reduce_run
from pyro_sparse.runs import fit_run

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=100)
    parser.add_argument("--out", default=os.path.join(ROOT, "runs", "demo"))
    args = parser.parse_args()
    torch.set_num_threads(1)  # a 64-300-100-10 MLP is fastest on one thread

    start = time.perf_counter()
    run, metrics = fit_run(os.path.join(ROOT, "models", "mlp_sparsevd.yaml"),
                           os.path.join(ROOT, "inference", "svi_sparsevd.yaml"), "digits", args.out,
                           epochs=args.epochs, overwrite=True)
    fit_seconds = time.perf_counter() - start
    # what `pyro-sparse reduce DIR` does: the recipe's rule (log-alpha, threshold 3), compact network
    report = reduce_run(args.out)

    print()
    print("Sparse VD MLP on digits (64-300-100-10), log alpha > 3 pruned")
    print(f"{'':28}{'dense':>10}{'compact':>10}")
    print(f"{'test accuracy (mean net)':28}{report['test_accuracy_dense']:>10.4f}"
          f"{report['test_accuracy_reduced']:>10.4f}")
    print(f"{'weights':28}{report['weights_total']:>10d}{report['weights_kept']:>10d}")
    print(f"{'fraction of weights removed':28}{'':>10}{report['sparsity']:>10.4f}")
    print(f"{'compression':28}{'':>10}{report['compression_ratio']:>9.1f}x")
    for name, layer in report["layers"].items():
        print(f"  {name + ' weights':26}{layer['weights_total']:>10d}{layer['weights_kept']:>10d}"
              f"   units {layer['units_kept']}/{layer['units_total']}")
    print(f"fit time {fit_seconds:.1f} s ({metrics['epochs']} epochs, {metrics['step_wall_ms']:.2f} ms/step); "
          f"run saved in {args.out}, compact network in {report['compact_path']}")


if __name__ == "__main__":
    main()
