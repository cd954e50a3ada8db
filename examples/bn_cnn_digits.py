"""A CNN with batch normalisation and dropout, written as an ordinary PyTorch class.

``BatchNormCNN`` is what a user brings: conv -> BatchNorm2d -> ReLU -> max-pool -> Dropout, then
an MLP head with BatchNorm1d and Dropout. Its batch norms and dropout behave differently in
training and evaluation mode, which is what the conversion (:func:`pyro_sparse.bayesian`) must
respect: while fitting, the Bayesian network runs them as in training (batch statistics, which
update the running statistics; dropout on), and at evaluation, in reduction, compaction, export
and ``predict`` as at evaluation (running statistics; dropout off), whatever mode the module was
in when it was converted.

    python examples/bn_cnn_digits.py --out runs/examples/bn_cnn_map.pt   # MAP-train it, save the state_dict

The saved ``state_dict`` is what a spec's ``init:`` names (``models/bn_cnn_digits_sparsevd.yaml``
fits from a pretrained start without one).
"""

import argparse
import os

import torch
import torch.nn.functional as F
from torch import nn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class BatchNormCNN(nn.Module):
    """8x8 digits: two conv / batch-norm / ReLU blocks with pooling and dropout, an MLP head with a
    1-D batch norm and dropout."""

    def __init__(self, channels=16, hidden=64, classes=10, p=0.2):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, channels, 3, padding=1), nn.BatchNorm2d(channels), nn.ReLU(), nn.MaxPool2d(2),
            nn.Dropout(p),
            nn.Conv2d(channels, 2 * channels, 3, padding=1), nn.BatchNorm2d(2 * channels), nn.ReLU(), nn.MaxPool2d(2))
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(2 * channels * 4, hidden), nn.BatchNorm1d(hidden), nn.ReLU(),
                                  nn.Dropout(p), nn.Linear(hidden, classes))

    def forward(self, x):
        return self.head(self.features(x.reshape(x.shape[0], 1, 8, 8)))


def train_map(model, x, y, epochs=30, lr=2e-3, batch_size=64, seed=0):
    """Plain PyTorch training (cross-entropy, Adam); leaves the model in eval mode."""
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(len(x), generator=generator)
        for i in range(0, len(x), batch_size):
            idx = perm[i:i + batch_size]
            loss = F.cross_entropy(model(x[idx]), y[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return model.eval()


def main():
    from pyro_sparse.data import load_digits

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=os.path.join(ROOT, "runs", "examples", "bn_cnn_map.pt"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(args.seed)
    data = load_digits()
    model = train_map(BatchNormCNN(), data.x_train, data.y_train, args.epochs, seed=args.seed)
    with torch.no_grad():
        acc = (model(data.x_test).argmax(-1) == data.y_test).float().mean().item()
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    torch.save(model.state_dict(), args.out)
    print(f"BatchNormCNN, {args.epochs} epochs MAP: test accuracy {acc:.4f}; wrote {args.out}")


if __name__ == "__main__":
    main()
