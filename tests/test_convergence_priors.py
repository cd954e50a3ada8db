"""Short convergence runs on digits, one per sparsity prior (marked slow; ~10 s each on one core).

A 64-100-10 MLP, 60 epochs of batch 128 with a cosine schedule (smaller and shorter than the
shipped recipes, whose figures are in the examples). Thresholds sit well inside what the runs
reach on this seed (measured in the comments), so a broken prior, guide or KL fails them.
"""

import pytest
import torch

from pyro_sparse.data import load_digits
from pyro_sparse.fitting import SVITrainer
from pyro_sparse.reduction import reduce
from pyro_sparse.runs import build, parse_specs
from pyro_sparse.summary import summarize

RECIPE = {"epochs": 60, "batch_size": 128, "optimizer": {"name": "Adam", "lr": 0.01}, "kl_warmup_epochs": 5,
          "guide_options": {"init_scale": 0.0067}, "schedule": {"name": "cosine"}, "eval_every": 100}


def fit(prior, rule, last_prior=None, recipe=None):
    """Fit, then prune with the prior's own rule (by name, through the one rule registry)."""
    layers = [{"type": "linear", "out": 100}, {"type": "relu"},
              {"type": "linear", "out": "auto", **({"prior": last_prior} if last_prior else {})}]
    spec, rec = parse_specs({"prior": prior, "layers": layers}, {**RECIPE, **(recipe or {})})
    data = load_digits()
    net, guide = build(spec, rec, data)
    metrics = SVITrainer(net, guide, data, rec, progress=False).fit()
    s = summarize(net, guide)
    masks = {k: m for k, m in reduce(s, rule).masks.items() if k.endswith("weight")}
    with torch.no_grad():
        pruned = net.deterministic({k: s[k].loc * masks[k] if k in masks else s[k].loc for k in s})
        acc = (pruned(data.x_test).argmax(-1) == data.y_test).float().mean().item()
    return net, guide, masks, metrics, acc


@pytest.mark.slow
def test_sparse_vd_prunes_most_weights():
    net, guide, masks, metrics, acc = fit({"type": "log_uniform"}, "log-alpha")
    removed = 1 - sum(int(m.sum()) for m in masks.values()) / sum(m.numel() for m in masks.values())
    # measured: predictive 0.95, pruned 0.95, 93% of weights removed
    assert metrics["test_accuracy"] >= 0.92 and acc >= 0.92
    assert removed >= 0.85


@pytest.mark.slow
def test_group_log_uniform_removes_units():
    net, guide, masks, metrics, acc = fit({"type": "group_log_uniform", "group": "unit"}, "group-log-alpha")
    la = net.layers["fc1"].weight_prior.group_log_alpha("fc1.weight", guide).flatten()
    # measured: 21 of 100 units with log alpha_z > 10, 79 below 0.5; accuracy 0.96
    assert acc >= 0.93
    assert int((la > 5).sum()) >= 10 and int((la < 0).sum()) >= 50
    assert int(masks["fc1.weight"].any(1).sum()) <= 90


@pytest.mark.slow
def test_horseshoe_splits_the_unit_scales():
    hs = {"type": "horseshoe", "tau0": 0.01, "regularized": True, "slab_df": 4.0, "slab_scale": 1.7320508}
    net, guide, masks, metrics, acc = fit(hs, "horseshoe-scale", {**hs, "group": "layer"})
    rel = net.layers["fc1"].weight_prior.relative_scale("fc1.weight", guide.median()).flatten()
    # measured: 30 units with lambda~ in [1.0, 1.6], 68 in [2.7, 18]; accuracy 0.96
    assert acc >= 0.93
    assert int((rel < 2).sum()) >= 15 and int((rel > 4).sum()) >= 40
    assert int(masks["fc1.weight"].any(1).sum()) < 100
