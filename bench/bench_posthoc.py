"""Post-hoc pruning of trained networks without retraining: the library's rules against the
baselines practitioners use, at 90% and 95% of the weights and at the evidence's own stopping
point, with the cost against one training epoch (a benchmark, not a test).

Three MAP-trained networks on the bundled digits, trained here with plain PyTorch (Adam, lr 1e-3,
weight decay 1e-4 = a Gaussian prior, batch 64): the MLP 64-300-100-10, a LeNet-5-style CNN
(conv 20 - pool - conv 50 - pool - fc 500 - 10, as models/lenet5_*.yaml) and the residual CNN of
``examples/resnet_digits.py``. Each is pruned post hoc on the 1437 training points and scored on
the 360 test points, no fine-tuning:

* ``bmr``: :func:`pyro_sparse.prune` with ``rule="bmr", curvature="kfac"`` -- a KFAC Laplace
  posterior (one Monte Carlo output column, scalar prior precision by the marginal likelihood),
  weights removed by the evidence with the kept ones moved to the reduced posterior mean, layer by
  layer on the pruned network's inputs; ``bmr-evidence``: the same with no target, the evidence
  deciding how many;
* ``opd``: Optimal Posterior Damage on the exact diagonal GGN (the library's previous default);
* baselines written here: ``magnitude`` (global |w|), ``wanda`` (Sun et al. 2023: |w_ij| times the
  norm of input j over the data, the same share removed from every output row) and ``obs``, a plain
  layer-wise Optimal Brain Surgeon (Hassibi & Stork 1993; OBC's ExactOBS, Frantar & Alistarh
  2022): per row, greedily remove the weight of least saliency w^2 / [H^-1]_jj under
  H = X X' + 1% of its mean diagonal (the damping of OBC and SparseGPT; no prior), moving the
  others by the OBS update, the same share per layer, layers in order on the pruned inputs.

One thread; wall times from time.perf_counter; "x epoch" is the pruning time over the mean time
of one training epoch of the same network.

Run: PYTHONPATH=. python bench/bench_posthoc.py [--seeds 0,1,2] [--networks mlp,lenet5,resnet]
     [--out runs/bench/posthoc.json]
"""

import argparse
import copy
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

#: the rules compared, library first, then the baselines of this file
METHODS = ("bmr", "opd", "magnitude", "wanda", "obs")
SPARSITIES = (0.9, 0.95)


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


def resnet():
    from examples.resnet_digits import ResidualCNN

    return ResidualCNN()


NETWORKS = {"mlp": (mlp, 60), "lenet5": (LeNet5, 30), "resnet": (resnet, 30)}


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


# --------------------------------------------------------------------------- baselines


def _layers(model):
    return [(name, m) for name, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]


def _rows(module, weight=None):
    w = module.weight if weight is None else weight
    return w.detach().reshape(w.shape[0], -1)


@torch.no_grad()
def _inputs(model, module, x):
    """The layer's inputs as columns (D, N*L): patches for a convolution."""
    seen = []
    hook = module.register_forward_hook(lambda m, a, o: seen.append(a[0]))
    model(x)
    hook.remove()
    a = seen[0]
    if isinstance(module, nn.Conv2d):
        a = F.unfold(a, module.kernel_size, module.dilation, module.padding, module.stride)  # (N, D, L)
        return a.transpose(0, 1).reshape(a.shape[1], -1)
    return a.reshape(-1, a.shape[-1]).T


@torch.no_grad()
def magnitude(model, data, sparsity):
    model = copy.deepcopy(model)
    weights = torch.cat([m.weight.abs().reshape(-1) for _, m in _layers(model)])
    threshold = weights.kthvalue(int(round(sparsity * len(weights)))).values
    for _, m in _layers(model):
        m.weight.mul_(m.weight.abs() > threshold)
    return model


@torch.no_grad()
def wanda(model, data, sparsity):
    """|w_ij| ||x_j||_2, the same share pruned in every output row (Sun et al. 2023)."""
    model = copy.deepcopy(model)
    for _, m in _layers(model):
        norms = _inputs(model, m, data.x_train).norm(dim=1)
        w = _rows(m)
        score = w.abs() * norms[None, :]
        k = int(round(sparsity * w.shape[1]))
        drop = score.topk(k, dim=1, largest=False).indices
        w.scatter_(1, drop, 0.0)
        m.weight.copy_(w.reshape(m.weight.shape))
    return model


@torch.no_grad()
def obs(model, data, sparsity, damping=0.01):
    """Layer-wise OBS, greedy per row (ExactOBS): remove the least w_q^2 / [H^-1]_qq, update the
    row by -w_q [H^-1]_{:,q} / [H^-1]_qq and H^-1 by its rank-one downdate; layers in order, each on
    the inputs of the already pruned network."""
    model = copy.deepcopy(model)
    for _, m in _layers(model):
        x = _inputs(model, m, data.x_train).double()
        h = x @ x.T
        h += damping * h.diagonal().mean() * torch.eye(len(h), dtype=h.dtype)
        w = _rows(m).double().clone()
        hinv = torch.cholesky_inverse(torch.linalg.cholesky(h)).expand(len(w), -1, -1).clone()
        alive = torch.ones_like(w, dtype=torch.bool)
        ar = torch.arange(len(w))
        for _ in range(int(round(sparsity * w.shape[1]))):
            d = hinv.diagonal(dim1=1, dim2=2)
            saliency = torch.where(alive, w.square() / d, torch.full_like(w, float("inf")))
            q = saliency.argmin(1)
            col = hinv[ar, :, q]
            w -= col * (w[ar, q] / d[ar, q])[:, None]
            hinv -= col[:, :, None] * col[:, None, :] / d[ar, q][:, None, None]
            alive[ar, q] = False
            w[~alive] = 0.0
        m.weight.copy_(w.reshape(m.weight.shape).to(m.weight.dtype))
    return model


BASELINES = {"magnitude": magnitude, "wanda": wanda, "obs": obs}


# --------------------------------------------------------------------------- the run


def run_method(method, model, data, sparsity, seed):
    """``(pruned module, sparsity of the covered weights, seconds, details)``."""
    from pyro_sparse.posthoc import prune

    start = time.perf_counter()
    if method in BASELINES:
        pruned = BASELINES[method](model, data, sparsity)
        seconds = time.perf_counter() - start
        kept = sum(int((m.weight != 0).sum()) for _, m in _layers(pruned))
        total = sum(m.weight.numel() for _, m in _layers(pruned))
        return pruned, 1 - kept / total, seconds, {}
    if method == "opd":
        result = prune(model, data.x_train, data.y_train, rule="opd", sparsity=sparsity, seed=seed)
    else:  # bmr: KFAC, one Monte Carlo column, compensated, layer by layer
        result = prune(model, data.x_train, data.y_train, rule="bmr", sparsity=sparsity, curvature="kfac",
                       mc_samples=1, seed=seed)
    details = {"curvature_seconds": result.info["curvature_seconds"],
               "marglik_seconds": result.info["marglik_seconds"], "rule_seconds": result.info["rule_seconds"]}
    if result.decision.layers:
        details["layer_sparsity"] = {k: v["removed"] / v["total"] for k, v in result.decision.layers.items()}
    return result.module, result.info["sparsity"], result.info["seconds"], details


def main():
    from pyro_sparse.data import load_dataset

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--networks", default="mlp,lenet5,resnet")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--out", default=os.path.join(ROOT, "runs", "bench", "posthoc.json"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    data = load_dataset("digits")
    networks = [n.strip() for n in args.networks.split(",") if n.strip()]
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    rows = []
    for name in networks:
        make, epochs = NETWORKS[name]
        for seed in (int(s) for s in args.seeds.split(",")):
            torch.manual_seed(seed)
            model, epoch_seconds = train(make(), data, epochs, seed)
            dense = accuracy(model, data)
            targets = [(m, s) for m in methods for s in SPARSITIES]
            if "bmr" in methods:
                targets.append(("bmr-evidence", None))
            for method, sparsity in targets:
                pruned, achieved, seconds, details = run_method(method.split("-")[0], model, data, sparsity, seed)
                rows.append({"network": name, "seed": seed, "method": method, "target": sparsity,
                             "dense_accuracy": dense, "accuracy": accuracy(pruned, data), "sparsity": achieved,
                             "prune_seconds": seconds, "epoch_seconds": epoch_seconds, "epochs_trained": epochs,
                             **details})
                r = rows[-1]
                print(f"{name:7} seed {seed} {method:12} {str(sparsity):>5}: acc {r['accuracy']:.4f} "
                      f"(dense {dense:.4f}) "
                      f"sparsity {achieved:.4f} prune {seconds:.2f} s = {seconds / epoch_seconds:.1f} x epoch "
                      f"({epoch_seconds:.3f} s)" + (
                          f" layers {json.dumps({k: round(v, 3) for k, v in details['layer_sparsity'].items()})}"
                                                     if "layer_sparsity" in details else ""), flush=True)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(rows, f, indent=1)
    print("\nmean over seeds: test accuracy, no fine-tuning (prune seconds / one training epoch)")
    labels = [m for m in methods]
    print(f"{'network':8}{'target':>8}" + "".join(f"{m:>17}" for m in labels) + f"{'dense':>8}")
    for name in networks:
        dense = statistics.mean(r["dense_accuracy"] for r in rows if r["network"] == name)
        for sparsity in SPARSITIES:
            cells = []
            for m in labels:
                sel = [r for r in rows if (r["network"], r["target"], r["method"]) == (name, sparsity, m)]
                if not sel:
                    cells.append("-")
                    continue
                acc = statistics.mean(r["accuracy"] for r in sel)
                ratio = statistics.mean(r["prune_seconds"] / r["epoch_seconds"] for r in sel)
                cells.append(f"{acc:.4f} ({ratio:5.1f}x)")
            print(f"{name:8}{sparsity:>8.2f}" + "".join(f"{c:>17}" for c in cells) + f"{dense:>8.4f}")
        sel = [r for r in rows if r["network"] == name and r["method"] == "bmr-evidence"]
        if sel:
            layers = {k: statistics.mean(r["layer_sparsity"][k] for r in sel) for k in sel[0]["layer_sparsity"]}
            print(f"{name:8}{'evidence':>8}  bmr's own stopping point: accuracy "
                  f"{statistics.mean(r['accuracy'] for r in sel):.4f} at sparsity "
                  f"{statistics.mean(r['sparsity'] for r in sel):.4f}; per layer "
                  + ", ".join(f"{k} {v:.3f}" for k, v in layers.items()))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
