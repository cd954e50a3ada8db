"""Shared by the example scripts: fit a spec + recipe, prune with each prior's own rule, report.

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
from pyro_sparse.priors import prior_masks  # noqa: E402
from pyro_sparse.recipe import load_recipe  # noqa: E402
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
def prune_and_report(net, guide, data, metrics, prior_name, threshold=None):
    """Masks from the priors' own rules; prints accuracy and sparsity; returns the figures."""
    masks = prior_masks(net, guide, {prior_name: threshold} if threshold is not None else None)
    summary = summarize(net, guide)
    params = {k: s.loc * masks[k] if k in masks else s.loc for k, s in summary.items()}
    pruned = net.deterministic(params)
    acc = (pruned(data.x_test).argmax(-1) == data.y_test).float().mean().item()
    weights = [k for k in summary if k.endswith(".weight")]
    total = sum(summary[k].loc.numel() for k in weights)
    kept = sum(int(masks[k].sum()) if k in masks else summary[k].loc.numel() for k in weights)
    # a hidden unit is gone when all its incoming or all its outgoing weights are pruned
    alive_units, units = 0, 0
    for k, nxt in zip(weights[:-1], weights[1:]):
        m_in = masks.get(k, torch.ones_like(summary[k].loc, dtype=torch.bool))
        m_out = masks.get(nxt, torch.ones_like(summary[nxt].loc, dtype=torch.bool))
        if m_in.dim() != 2 or m_out.dim() != 2:
            continue
        alive = m_in.any(1) & m_out.any(0)
        alive_units += int(alive.sum())
        units += alive.numel()
    figures = {"test_accuracy": metrics["test_accuracy"], "pruned_accuracy": acc,
               "weights_removed": 1 - kept / total, "weights_kept": kept, "weights_total": total,
               "hidden_units_removed": 1 - alive_units / units if units else 0.0,
               "hidden_units_alive": alive_units, "hidden_units": units,
               "epochs": metrics["epochs"], "train_seconds": metrics["train_seconds"],
               "step_ms": metrics["step_ms"]}
    print(f"data {data.name}: posterior predictive accuracy {figures['test_accuracy']:.4f}, "
          f"pruned network accuracy {acc:.4f}")
    print(f"weights removed {figures['weights_removed']:.2%} ({total - kept} of {total}); hidden units removed "
          f"{figures['hidden_units_removed']:.2%} ({units - alive_units} of {units}, alive {alive_units})")
    print(f"{metrics['epochs']} epochs, {metrics['train_seconds']:.1f} s training, {metrics['step_ms']:.2f} ms/step")
    return figures, masks
