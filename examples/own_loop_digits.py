"""Your own training loop: a converted network trained by a plain PyTorch loop over a DataLoader,
against SVITrainer with the same settings.

The network is an ordinary ``nn.Sequential`` MLP (64-300-100-10) converted with
:func:`pyro_sparse.bayesian` under the Sparse VD prior (log-uniform, Molchanov et al. 2017). The
loop is the one a PyTorch user writes: a ``DataLoader``, an Adam optimiser over the guide's
parameters, a cosine schedule, gradient clipping, and ``loss = net.elbo_loss(guide, x, y,
num_data, kl_weight)`` -- the negative ELBO of the batch on the ELBO core (closed-form KL, local
reparameterisation), the objective SVITrainer minimises -- with the KL warmed up over the first
``--warmup`` epochs. Then both posteriors are pruned where log alpha > 3.

    python examples/own_loop_digits.py [--epochs 100] [--seed 0]

Prints the posterior predictive accuracy (10 draws), the compact network's accuracy and sparsity,
and the CPU milliseconds per step (one thread) of each.
"""

import argparse
import math
import time

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import pyro_sparse
from pyro_sparse import evaluation
from pyro_sparse.data import load_digits
from pyro_sparse.fitting import SVITrainer
from pyro_sparse.guides import MeanFieldGuide
from pyro_sparse.outcome import reduction_report
from pyro_sparse.recipe import parse_recipe
from pyro_sparse.reduction import reduce

LR, BATCH, CLIP, INIT_SCALE = 2e-3, 64, 100.0, 0.0067  # inference/svi_sparsevd.yaml


def mlp():
    return nn.Sequential(nn.Linear(64, 300), nn.ReLU(), nn.Linear(300, 100), nn.ReLU(), nn.Linear(100, 10))


def convert(seed):
    torch.manual_seed(seed)
    return pyro_sparse.bayesian(mlp(), prior={"type": "log_uniform"}, input_shape=(64,))


def own_loop(data, epochs, warmup, seed):
    """The plain PyTorch loop; returns (net, guide, CPU seconds per step)."""
    net = convert(seed)
    loader = DataLoader(TensorDataset(data.x_train, data.y_train), batch_size=BATCH, shuffle=True,
                        generator=torch.Generator().manual_seed(seed))
    guide = MeanFieldGuide(net.model, init_scale=INIT_SCALE).setup(data.x_train[:BATCH])
    optimizer = torch.optim.Adam(guide.parameters(), lr=LR)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, epochs)
    steps, cpu = 0, 0.0
    net.train()
    for epoch in range(epochs):
        start = time.process_time()
        for b, (x, y) in enumerate(loader):
            kl_weight = min(1.0, (epoch + b / len(loader)) / warmup)
            loss = net.elbo_loss(guide, x, y, num_data=len(loader.dataset), kl_weight=kl_weight)
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(guide.parameters(), CLIP)
            optimizer.step()
            steps += 1
        cpu += time.process_time() - start  # the epoch's steps with the loader's batching, as the trainer counts
        schedule.step()
    return net, guide, 1000 * cpu / steps


def trainer(data, epochs, warmup, seed):
    net = convert(seed)
    recipe = parse_recipe({"epochs": epochs, "batch_size": BATCH, "optimizer": {"name": "Adam", "lr": LR},
                           "schedule": {"name": "cosine"}, "kl_warmup_epochs": warmup, "grad_clip": CLIP,
                           "guide_options": {"init_scale": INIT_SCALE}, "seed": seed})
    fitted = SVITrainer(net, MeanFieldGuide(net.model, init_scale=INIT_SCALE), data, recipe, progress=False)
    metrics = fitted.fit()
    return net, fitted.guide, metrics["step_cpu_ms"]


def figures(net, guide, data):
    torch.manual_seed(0)
    predictive = evaluation.evaluate(evaluation.posterior_predictive(net, guide, 10), data.x_test, data.y_test,
                                     net.likelihood)
    from pyro_sparse.summary import summarize

    summary = summarize(net, guide)
    report = reduction_report(net, summary, reduce(summary, "log-alpha"), data.x_test, data.y_test)
    return predictive["accuracy"], report["test_accuracy_reduced"], report["sparsity"]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=100)
    parser.add_argument("--warmup", type=float, default=20.0)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    data = load_digits()
    rows = {"own loop (DataLoader, net.elbo_loss)": own_loop(data, args.epochs, args.warmup, args.seed),
            "SVITrainer": trainer(data, args.epochs, args.warmup, args.seed)}
    print(f"MLP 64-300-100-10, Sparse VD, digits, {args.epochs} epochs, seed {args.seed}, one thread")
    print(f"{'':38}{'predictive acc':>15}{'compact acc':>13}{'sparsity':>10}{'CPU ms/step':>13}")
    for name, (net, guide, step_ms) in rows.items():
        acc, compact_acc, sparsity = figures(net, guide, data)
        print(f"{name:38}{acc:>15.4f}{compact_acc:>13.4f}{sparsity:>10.4f}{step_ms:>13.2f}")
    assert all(math.isfinite(r[2]) for r in rows.values())


if __name__ == "__main__":
    main()
