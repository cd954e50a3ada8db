"""Post-hoc pruning of trained networks (pyro_sparse.posthoc.prune): OPD on a Laplace posterior vs
magnitude, at 90% and 95% of the weights, and the cost against one training epoch (not a test).

Two MAP-trained networks on the bundled digits, trained here with plain PyTorch (Adam, lr 1e-3,
weight decay 1e-4 = a Gaussian prior, batch 64): the MLP 64-300-100-10 and a LeNet-5-style CNN
(conv 20 - pool - conv 50 - pool - fc 500 - 10, as models/lenet5_*.yaml). Each is pruned post hoc
without retraining (diagonal GGN on the 1437 training points -- exact, or a one-sample Monte
Carlo estimate -- and a scalar prior precision from the Laplace marginal likelihood by MacKay's
fixed point), then optionally fine-tuned for 2 epochs (pruned weights held at 0). One thread;
wall times from time.perf_counter; "x epoch" is the pruning time (curvature + marglik + rule +
export, no fine-tune) over the mean time of one training epoch of the same network.

Run: PYTHONPATH=. python bench/bench_posthoc.py [--seeds 0,1,2] [--out runs/bench/posthoc.json]
"""

import argparse
import json
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


#: (label, rule, prune options): OPD on the exact diagonal GGN, OPD on a one-sample Monte Carlo GGN
#: (one backward pass per input instead of one per class), magnitude
VARIANTS = [("opd", "opd", {}), ("opd-mc1", "opd", {"mc_samples": 1}), ("magnitude", "magnitude", {})]


def mlp():
    return nn.Sequential(nn.Linear(64, 300), nn.ReLU(), nn.Linear(300, 100), nn.ReLU(), nn.Linear(100, 10))


class LeNet5(nn.Module):
    """LeNet-5 on 8x8 digits, written as a class (its forward reshapes the flat inputs)."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 20, 3, padding=1)
        self.conv2 = nn.Conv2d(20, 50, 3, padding=1)
        self.fc1 = nn.Linear(50 * 2 * 2, 500)
        self.fc2 = nn.Linear(500, 10)

    def forward(self, x):
        h = F.max_pool2d(F.relu(self.conv1(x.reshape(len(x), 1, 8, 8))), 2)
        h = F.max_pool2d(F.relu(self.conv2(h)), 2)
        return self.fc2(F.relu(self.fc1(h.flatten(1))))


def train(model, data, epochs, seed):
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, weight_decay=1e-4)
    n, times = len(data.x_train), []
    model.train()
    for _ in range(epochs):
        start = time.perf_counter()
        perm = torch.randperm(n, generator=generator)
        for i in range(0, n, 64):
            idx = perm[i:i + 64]
            loss = F.cross_entropy(model(data.x_train[idx]), data.y_train[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        times.append(time.perf_counter() - start)
    return model.eval(), statistics.mean(times)


def accuracy(model, data):
    with torch.no_grad():
        return (model(data.x_test).argmax(-1) == data.y_test).float().mean().item()


def main():
    from pyro_sparse.data import load_dataset
    from pyro_sparse.posthoc import prune

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--out", default=os.path.join(ROOT, "runs", "bench", "posthoc.json"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    data = load_dataset("digits")
    rows = []
    for name, make, epochs in (("mlp", mlp, 60), ("lenet5", LeNet5, 30)):
        for seed in (int(s) for s in args.seeds.split(",")):
            torch.manual_seed(seed)
            model, epoch_seconds = train(make(), data, epochs, seed)
            dense = accuracy(model, data)
            for sparsity in (0.9, 0.95):
                for label, rule, options in VARIANTS:
                    for fine_tune in (0, 2):
                        result = prune(model, data.x_train, data.y_train, rule=rule, sparsity=sparsity,
                                       fine_tune_epochs=fine_tune, lr=1e-3, seed=seed, **options)
                        prune_seconds = result.info["seconds"] - result.info["fine_tune_seconds"]
                        rows.append({"network": name, "seed": seed, "rule": label, "target": sparsity,
                                     "fine_tune_epochs": fine_tune, "dense_accuracy": dense,
                                     "accuracy": accuracy(result.module, data), "sparsity": result.info["sparsity"],
                                     "prune_seconds": prune_seconds,
                                     "curvature_seconds": result.info["curvature_seconds"],
                                     "marglik_seconds": result.info["marglik_seconds"],
                                     "fine_tune_seconds": result.info["fine_tune_seconds"],
                                     "epoch_seconds": epoch_seconds, "epochs_trained": epochs})
                        r = rows[-1]
                        print(f"{name:7} seed {seed} {label:9} {sparsity:.2f} ft {fine_tune}: acc {r['accuracy']:.4f} "
                              f"(dense {dense:.4f}) sparsity {r['sparsity']:.4f} prune {prune_seconds:.2f} s = "
                              f"{prune_seconds / epoch_seconds:.1f} x epoch ({epoch_seconds:.3f} s)", flush=True)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(rows, f, indent=1)
    print("\nmean over seeds: test accuracy (prune seconds / one training epoch)")
    labels = "".join(f"{label:>16}" for label, _, _ in VARIANTS)
    print(f"{'network':8}{'target':>7}{'ft':>4}{labels}{'dense':>8}")
    for name in ("mlp", "lenet5"):
        for sparsity in (0.9, 0.95):
            for ft in (0, 2):
                cells = []
                for label, _, _ in VARIANTS:
                    sel = [r for r in rows if (r["network"], r["target"], r["fine_tune_epochs"], r["rule"])
                           == (name, sparsity, ft, label)]
                    acc = statistics.mean(r["accuracy"] for r in sel)
                    ratio = statistics.mean(r["prune_seconds"] / r["epoch_seconds"] for r in sel)
                    cells.append(f"{acc:.4f} ({ratio:4.1f}x)")
                dense = statistics.mean(r["dense_accuracy"] for r in rows if r["network"] == name)
                print(f"{name:8}{sparsity:>7.2f}{ft:>4}" + "".join(f"{c:>16}" for c in cells) + f"{dense:>8.4f}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
