"""Shared by the example scripts: fit a spec + recipe, reduce with the prior's own rule, report.

Not part of the library; each example is a few lines on top of this.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pyro_sparse.data import load_dataset  # noqa: E402
from pyro_sparse.fitting import SVITrainer  # noqa: E402
from pyro_sparse.outcome import reduction_report  # noqa: E402
from pyro_sparse.rebuild import compact  # noqa: E402
from pyro_sparse.recipe import load_recipe  # noqa: E402
from pyro_sparse.reduction import reduce  # noqa: E402
from pyro_sparse.runs import build  # noqa: E402
from pyro_sparse.spec import load_model_spec  # noqa: E402
from pyro_sparse.summary import summarize  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def parse_args(description, model, recipe, extra=None):
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--model", default=os.path.join(ROOT, model))
    p.add_argument("--inference", default=os.path.join(ROOT, recipe))
    p.add_argument("--data", default="digits")
    p.add_argument("--epochs", type=int, help="override the recipe's epochs")
    p.add_argument("--seed", type=int, help="override the recipe's seed")
    p.add_argument("--threshold", type=float, help="override the prior's pruning threshold")
    p.add_argument("--progress", action="store_true")
    for args, kwargs in (extra or []):
        p.add_argument(*args, **kwargs)
    return p.parse_args()


def fit(args):
    """Fit ``args.model`` with ``args.inference`` on ``args.data``; returns (net, guide, data, metrics)."""
    torch.set_num_threads(1)
    spec, recipe = load_model_spec(args.model), load_recipe(args.inference)
    if args.epochs:
        recipe["epochs"] = args.epochs
    if args.seed is not None:
        recipe["seed"] = args.seed
    data = load_dataset(args.data)
    net, guide = build(spec, recipe, data)
    start = time.perf_counter()
    metrics = SVITrainer(net, guide, data, recipe, progress=args.progress).fit()
    metrics["wall_seconds"] = time.perf_counter() - start
    return net, guide, data, metrics


@torch.no_grad()
def prune_and_report(net, guide, data, metrics, rule, threshold=None):
    """Reduce with ``rule`` (a registered rule, by name; ``threshold``: default the rule's own),
    compact, and print accuracy and what was removed; returns (figures, decision)."""
    summary = summarize(net, guide)
    decision = reduce(summary, rule, threshold=threshold)
    module = compact(net, summary, decision)
    report = reduction_report(net, summary, decision, data.x_test, data.y_test, module=module)
    hidden = {k: v for k, v in report["layers"].items() if k != list(report["layers"])[-1]}
    units = sum(v["units_total"] for v in hidden.values())
    alive = sum(v["units_kept"] for v in hidden.values())
    figures = {"test_accuracy": metrics["test_accuracy"], "pruned_accuracy": report["test_accuracy_reduced"],
               "weights_removed": report["sparsity"], "weights_kept": report["weights_kept"],
               "weights_total": report["weights_total"], "threshold": decision.options["threshold"],
               "hidden_units_removed": 1 - alive / units if units else 0.0,
               "hidden_units_alive": alive, "hidden_units": units,
               "epochs": metrics["epochs"], "train_wall_seconds": metrics["train_wall_seconds"],
               "step_wall_ms": metrics["step_wall_ms"]}
    print(f"data {data.name}: posterior predictive accuracy {figures['test_accuracy']:.4f}, "
          f"compact network ({rule} at {figures['threshold']:g}) accuracy {figures['pruned_accuracy']:.4f}")
    print(f"weights removed {figures['weights_removed']:.2%} ({report['weights_total'] - report['weights_kept']} of "
          f"{report['weights_total']}); hidden units removed {figures['hidden_units_removed']:.2%} "
          f"({units - alive} of {units}, alive {alive})")
    print(f"{metrics['epochs']} epochs, {metrics['train_wall_seconds']:.1f} s training, "
          f"{metrics['step_wall_ms']:.2f} ms/step")
    return figures, decision
