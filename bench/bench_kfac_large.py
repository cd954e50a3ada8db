"""KFAC Laplace and compensated pruning of a larger convolutional network: time and peak memory
(a benchmark, not a test; issue 27).

The network is shaped like the sequence models users brought: a 1-D CNN over one-hot sequences of
4 channels and length 256 -- a 32-tap convolution to 128 channels, batch norm, ReLU, max pooling by
4, a 64-tap convolution over those 128 channels to 64 (a Kronecker input factor of 8,193 x 8,193),
batch norm, ReLU, global average pooling, and a linear head with 300 outputs -- about 0.56M
parameters. It is trained for a few epochs on synthetic data (each class plants one motif), then
``pyro_sparse.prune(net, x, y, rule="bmr", sparsity=0.7, curvature="kfac")`` runs on 512 inputs:
one Monte Carlo output column (300 outputs: ``mc_samples="auto"``), the batch norms held fixed,
the 8,193-wide rows of the big convolution reduced blockwise.

Run: PYTHONPATH=. python bench/bench_kfac_large.py [--inputs 512] [--threads 2]
Peak memory is the process's maximum resident set size (``resource.getrusage``).
"""

import argparse
import resource
import time

import torch
import torch.nn.functional as F
from torch import nn


class SeqCNN(nn.Module):
    def __init__(self, classes=300):
        super().__init__()
        self.conv1 = nn.Conv1d(4, 128, 32, padding=16)
        self.bn1 = nn.BatchNorm1d(128)
        self.conv2 = nn.Conv1d(128, 64, 64, padding=32)
        self.bn2 = nn.BatchNorm1d(64)
        self.head = nn.Linear(64, classes)

    def forward(self, x):
        h = F.max_pool1d(F.relu(self.bn1(self.conv1(x))), 4)
        h = F.relu(self.bn2(self.conv2(h)))
        return self.head(h.mean(-1))


def synthetic(n, classes=300, length=256, seed=0, copies=4):
    """One-hot sequences in which the class's motif (a fixed 12-mer, the same for every split) is
    planted ``copies`` times at random places."""
    motifs = torch.randint(0, 4, (classes, 12), generator=torch.Generator().manual_seed(1234))
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, classes, (n,), generator=g)
    seq = torch.randint(0, 4, (n, length), generator=g)
    at = torch.randint(0, length - 12, (n, copies), generator=g)
    for i in range(n):
        for j in at[i]:
            seq[i, j:j + 12] = motifs[y[i]]
    return F.one_hot(seq, 4).transpose(1, 2).float(), y


def peak_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main():
    from pyro_sparse.posthoc import prune

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--inputs", type=int, default=512)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    net = SeqCNN()
    print(f"parameters: {sum(p.numel() for p in net.parameters()):,}", flush=True)
    x, y = synthetic(4096)
    optimizer = torch.optim.Adam(net.parameters(), lr=3e-3)
    start = time.perf_counter()
    for _ in range(args.epochs):
        for i in range(0, len(x), 64):
            loss = F.cross_entropy(net(x[i:i + 64]), y[i:i + 64])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    epoch = (time.perf_counter() - start) / args.epochs
    net.eval()
    xt, yt = synthetic(512, seed=1)
    with torch.no_grad():
        dense = (net(xt).argmax(-1) == yt).float().mean().item()
    print(f"trained {args.epochs} epochs of 4096 ({epoch:.1f} s each): held-out accuracy {dense:.3f}; "
          f"peak {peak_mb():.0f} MB so far", flush=True)
    before = peak_mb()
    start = time.perf_counter()
    result = prune(net, x[:args.inputs], y[:args.inputs], rule="bmr", sparsity=0.7, curvature="kfac",
                   validation=(xt, yt))
    seconds = time.perf_counter() - start
    info = result.info
    print(f"prune from {args.inputs} inputs: {seconds:.1f} s (curvature {info['curvature_seconds']:.1f} s, prior "
          f"{info['marglik_seconds']:.1f} s, rule {info['rule_seconds']:.1f} s); peak resident memory "
          f"{peak_mb():.0f} MB (before {before:.0f} MB); sparsity {info['sparsity']:.3f}; held-out accuracy "
          f"{info['quality']['reduced']:.3f} (dense {info['quality']['dense']:.3f}); paths "
          + ", ".join(f"{k} {v['path']}" for k, v in result.decision.layers.items()), flush=True)


if __name__ == "__main__":
    main()
