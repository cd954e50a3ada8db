"""Cost of marginal-likelihood training (SpaM) against MAP training at the same epochs (not a test).

Digits MLP 64-300-100-10 (models/mlp_gaussian.yaml), recipe inference/laplace_marglik.yaml.
MAP is the same LaplaceTrainer loop with the fixed prior (``hyper_steps: 0``: no curvature, no
steps on log delta); SpaM adds a marglik step (curvature + K Adam steps on log delta) every F
epochs after the burn-in. Both run in this process, on one thread, interleaved ``--repeats``
times; the figure is the trainer's ``train_seconds`` (MAP passes + marglik steps; evaluation and
checkpoints excluded). On a shared machine whole-run times are noisy: the minimum and median
are printed, and a ratio composed from the cheapest MAP epoch and the cheapest marglik step
(each the least-disturbed measurement of its component).

Run: PYTHONPATH=. python bench/bench_spam.py [--repeats 3] [--epochs 100] [--structure parameterwise]
"""

import argparse
import os
import statistics
import sys

import torch
import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def fit_seconds(spec, recipe, data, **laplace):
    from pyro_sparse.laplace.trainer import LaplaceTrainer
    from pyro_sparse.runs import build, parse_specs

    r = dict(recipe, laplace=dict(recipe["laplace"], **laplace), eval_every=10_000)
    m, r = parse_specs(spec, r)
    network, guide = build(m, r, data)
    trainer = LaplaceTrainer(network, guide, data, r, progress=False)
    trainer.fit()
    marglik = sum(h.get("marglik_seconds", 0.0) for h in trainer.history)
    n_marglik = sum("marglik_seconds" in h for h in trainer.history)
    map_epochs = [h["epoch_wall_seconds"] - h.get("marglik_seconds", 0.0) for h in trainer.history]
    steps = [h["marglik_seconds"] for h in trainer.history if "marglik_seconds" in h]
    return trainer.train_seconds, marglik, n_marglik, map_epochs, steps


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=None, help="override the recipe's epochs")
    parser.add_argument("--structure", default=None, help="override the recipe's prior structure")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    from pyro_sparse.data import load_digits

    data = load_digits()
    spec = yaml.safe_load(open(os.path.join(ROOT, "models", "mlp_gaussian.yaml")))
    recipe = yaml.safe_load(open(os.path.join(ROOT, "inference", "laplace_marglik.yaml")))
    if args.epochs:
        recipe["epochs"] = args.epochs
    if args.structure:
        recipe["laplace"]["structure"] = args.structure
    o = recipe["laplace"]
    print(f"digits MLP 64-300-100-10, {recipe['epochs']} epochs, batch {recipe['batch_size']}, "
          f"structure {o['structure']}, curvature {o['curvature']}/{o['hessian']}, burn-in {o['burn_in']}, "
          f"F {o['marglik_frequency']}, K {o['hyper_steps']}, curvature subset {o['curvature_subset']}; "
          f"torch threads {torch.get_num_threads()}")
    fit_seconds(spec, dict(recipe, epochs=2), data)  # warm-up (imports, allocator)
    maps, spams, margliks, epoch_times, step_times = [], [], [], [], []
    for _ in range(args.repeats):
        total, _, _, map_epochs, _ = fit_seconds(spec, recipe, data, hyper_steps=0)
        maps.append(total)
        epoch_times += map_epochs
        total, marglik, n_marglik, map_epochs, steps = fit_seconds(spec, recipe, data)
        spams.append(total)
        margliks.append(marglik)
        epoch_times += map_epochs
        step_times += steps
    print(f"MAP  train seconds: min {min(maps):.3f}  median {statistics.median(maps):.3f}  "
          f"({1000 * min(maps) / recipe['epochs']:.1f} ms/epoch)")
    print(f"SpaM train seconds: min {min(spams):.3f}  median {statistics.median(spams):.3f}  "
          f"(of which {n_marglik} marglik steps: min {min(margliks):.3f} s, "
          f"{1000 * min(margliks) / n_marglik:.1f} ms each)")
    print(f"ratio SpaM / MAP: {min(spams) / min(maps):.2f} (min / min), "
          f"{statistics.median(spams) / statistics.median(maps):.2f} (median / median)")
    # Robust to a busy machine: the cheapest MAP epoch and the cheapest marglik step, composed.
    epoch, step = min(epoch_times), min(step_times)
    epochs = recipe["epochs"]
    print(f"per component: MAP epoch min {1000 * epoch:.1f} ms, marglik step min {1000 * step:.1f} ms -> "
          f"ratio (E*epoch + M*step) / (E*epoch) = {(epochs * epoch + n_marglik * step) / (epochs * epoch):.2f} "
          f"(E={epochs}, M={n_marglik})")


if __name__ == "__main__":
    main()
