"""Your own PyTorch model, sparsified two ways: a residual CNN written as an ordinary class.

The network below has skip connections and its own ``forward`` (no ``nn.Sequential`` of the
whole). It is trained by maximum likelihood (MAP with a small weight decay) on the bundled digits,
then

(a) converted with :func:`pyro_sparse.bayesian` and sparsified with Sparse Variational Dropout
    (log-uniform prior, Molchanov et al. 2017) starting from its trained weights, pruned where
    log alpha > 3;
(b) pruned post hoc, without retraining: a Laplace posterior around the trained weights (diagonal
    GGN, prior precision by the marginal likelihood) and Optimal Posterior Damage (Dhahri et al.
    2024) at 90% sparsity, then 2 epochs of masked fine-tuning.

Both results come back as modules of the user's class ``ResidualCNN`` whose ``state_dict`` loads
into a fresh ``ResidualCNN()``; the physically smaller version (the ``head`` chain's hidden units
deleted) is checked to predict the same. A table is printed; state dicts go to ``--out``
(default ``runs/examples/resnet_digits``, git-ignored).

    python examples/resnet_digits.py [--epochs 30] [--svi-epochs 60] [--out runs/examples/resnet_digits]

The class is importable (``examples.resnet_digits:ResidualCNN`` from the repository root), which is
what ``models/resnet_digits_sparsevd.yaml`` names for the command line.
"""

import argparse
import os
import time

import torch
import torch.nn.functional as F
from torch import nn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class ResidualBlock(nn.Module):
    """``relu(x + conv2(relu(conv1(x))))``: a skip connection around two 3x3 convolutions."""

    def __init__(self, channels):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        return F.relu(x + self.conv2(F.relu(self.conv1(x))))


class ResidualCNN(nn.Module):
    """8x8 digits: a stem convolution, two residual blocks, 2x2 max pooling, an MLP head."""

    def __init__(self, channels=16, hidden=64, classes=10):
        super().__init__()
        self.stem = nn.Conv2d(1, channels, 3, padding=1)
        self.block1 = ResidualBlock(channels)
        self.block2 = ResidualBlock(channels)
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(channels * 16, hidden), nn.ReLU(), nn.Linear(hidden, classes))

    def forward(self, x):
        x = x.reshape(x.shape[0], 1, 8, 8)  # x.shape[0], not len(x): an exported graph keeps the batch size free
        h = self.block2(self.block1(F.relu(self.stem(x))))
        return self.head(F.max_pool2d(h, 2))


def accuracy(model, x, y):
    model.eval()
    with torch.no_grad():
        return (model(x).argmax(-1) == y).float().mean().item()


def train_map(model, data, epochs, lr=2e-3, weight_decay=1e-4, seed=0):
    """Plain PyTorch training; returns the seconds per epoch."""
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    n = len(data.x_train)
    start = time.perf_counter()
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(n, generator=generator)
        for i in range(0, n, 64):
            idx = perm[i:i + 64]
            loss = F.cross_entropy(model(data.x_train[idx]), data.y_train[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    model.eval()
    return (time.perf_counter() - start) / epochs


def nonzero(module, names):
    params = dict(module.named_parameters())
    return sum(int((params[n] != 0).sum()) for n in names), sum(params[n].numel() for n in names)


def main():
    from pyro_sparse.convert import bayesian
    from pyro_sparse.data import load_dataset
    from pyro_sparse.fitting import SVITrainer
    from pyro_sparse.guides import MeanFieldGuide
    from pyro_sparse.posthoc import prune
    from pyro_sparse.rebuild import compact, export
    from pyro_sparse.recipe import load_recipe
    from pyro_sparse.reduction import reduce

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=30, help="MAP training epochs")
    parser.add_argument("--svi-epochs", type=int, default=60, help="Sparse VD epochs from the trained weights")
    parser.add_argument("--out", default=os.path.join(ROOT, "runs", "examples", "resnet_digits"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    os.makedirs(args.out, exist_ok=True)
    data = load_dataset("digits")
    x, y = data.x_test, data.y_test

    model = ResidualCNN()
    epoch_seconds = train_map(model, data, args.epochs)
    rows = [("MAP (trained)", accuracy(model, x, y), *nonzero(model, [n for n, _ in model.named_parameters()
                                                                          if n.endswith("weight")]),
             sum(p.numel() for p in model.parameters()), args.epochs * epoch_seconds)]

    # (a) convert, start from the trained weights, Sparse VD, prune where log alpha > 3
    start = time.perf_counter()
    net = bayesian(model, prior={"type": "log_uniform"}, likelihood="categorical", input_shape=(1, 8, 8))
    recipe = load_recipe(os.path.join(ROOT, "inference", "svi_sparsevd.yaml"))
    recipe.update(epochs=args.svi_epochs, kl_warmup_epochs=min(30, args.svi_epochs))
    recipe["optimizer"]["lr"] = 1e-3
    guide = MeanFieldGuide(net.model, init_scale=recipe["guide_options"]["init_scale"])
    trainer = SVITrainer(net, guide, data, recipe, progress=False)
    trainer.fit()
    summary = trainer.posterior_summary()
    decision = reduce(summary, "log-alpha", threshold=3.0)
    svd = export(net, summary, decision)  # a ResidualCNN with the pruned weights at 0
    svd_small = compact(net, summary, decision)
    svd_seconds = time.perf_counter() - start
    weights = [n for n in net.param_sites() if n.endswith("weight")]
    rows.append(("Sparse VD from trained", accuracy(svd, x, y), *nonzero(svd, weights),
                 sum(p.numel() for p in svd_small.parameters()), svd_seconds))

    # (b) post hoc: Laplace + OPD at 90%, 2 epochs of masked fine-tuning
    result = prune(model, data.x_train, data.y_train, rule="opd", sparsity=0.9, fine_tune_epochs=2, lr=3e-3)
    opd_small = result.compact()
    rows.append(("Laplace + OPD 90% (+2 ep)", accuracy(result.module, x, y), *nonzero(result.module, weights),
                 sum(p.numel() for p in opd_small.parameters()), result.info["seconds"]))

    # the user's class round trip: a fresh instance loads the state dict and predicts the same
    for name, module, small in (("sparsevd", svd, svd_small), ("opd", result.module, opd_small)):
        fresh = ResidualCNN()
        fresh.load_state_dict(module.state_dict())
        fresh.eval()
        with torch.no_grad():
            assert torch.allclose(fresh(x), module(x), atol=1e-5), name
            assert torch.allclose(small(x), module(x), atol=1e-4), name
        torch.save(module.state_dict(), os.path.join(args.out, f"{name}_resnet.pt"))
    torch.save(model.state_dict(), os.path.join(args.out, "map_resnet.pt"))

    print()
    print("Residual CNN (a plain PyTorch class) on digits: trained, then sparsified two ways")
    print(f"{'':28}{'test acc':>9}{'weights kept':>14}{'sparsity':>10}{'params (compact)':>18}{'seconds':>9}")
    for label, acc, kept, total, compact_params, seconds in rows:
        print(f"{label:28}{acc:>9.4f}{f'{kept}/{total}':>14}{1 - kept / total:>10.3f}{compact_params:>18d}"
              f"{seconds:>9.1f}")
    print(f"one MAP training epoch: {epoch_seconds:.2f} s; post-hoc Laplace + OPD (no fine-tune part): "
          f"{result.info['seconds'] - result.info['fine_tune_seconds']:.2f} s")
    print(f"head hidden units kept: Sparse VD {svd_small.head[1].out_features}/64, "
          f"OPD {opd_small.head[1].out_features}/64; state dicts in {args.out}")


if __name__ == "__main__":
    main()
