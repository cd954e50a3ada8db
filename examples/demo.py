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

from pyro_sparse.reduction import mask_by_threshold
from pyro_sparse.runs import fit_run
from pyro_sparse.summary import summarize

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

    summary = summarize(run.network, run.guide)
    weights = {name: s.log_alpha for name, s in summary.items() if s.param == "weight"}
    keep = mask_by_threshold(weights, 3.0, keep="below")
    values = run.guide.median()
    for name, mask in keep.items():
        values[name] = values[name] * mask
    data = run.dataset
    with torch.no_grad():
        dense = run.network.point_outputs(data.x_test, run.guide.median()).argmax(-1)
        pruned = run.network.point_outputs(data.x_test, values).argmax(-1)
    acc_dense = (dense == data.y_test).float().mean().item()
    acc_pruned = (pruned == data.y_test).float().mean().item()
    total = sum(m.numel() for m in keep.values())
    kept = sum(int(m.sum()) for m in keep.values())

    print()
    print("Sparse VD MLP on digits (64-300-100-10), log alpha > 3 pruned")
    print(f"{'':28}{'dense':>10}{'pruned':>10}")
    print(f"{'test accuracy':28}{acc_dense:>10.4f}{acc_pruned:>10.4f}")
    print(f"{'weights':28}{total:>10d}{kept:>10d}")
    print(f"{'fraction of weights removed':28}{'':>10}{1 - kept / total:>10.4f}")
    print(f"{'compression':28}{'':>10}{total / max(kept, 1):>9.1f}x")
    for name, mask in keep.items():
        print(f"  {name:26}{mask.numel():>10d}{int(mask.sum()):>10d}")
    print(f"fit time {fit_seconds:.1f} s ({metrics['epochs']} epochs, {metrics['step_ms']:.2f} ms/step); "
          f"run saved in {args.out}")


if __name__ == "__main__":
    main()
