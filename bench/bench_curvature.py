"""Timing of the curvature routines on a digits-sized MLP (not a test).

64-300-100-10 ReLU MLP, 1000 random 64-dimensional inputs (the size of sklearn's digits),
float32, categorical likelihood. Prints the minimum and median wall time over repeats in ms
(on a shared machine the median is noisy; the minimum is the figure to quote), and,
for reference, a per-sample brute force (torch.func vmap over jacrev) on 100 inputs.

Run: PYTHONPATH=. python bench/bench_curvature.py
"""

import statistics
import sys
import time

import torch
from torch import nn
from torch.func import functional_call, jacrev, vmap

from pyro_sparse.laplace.curvature import diag_ef, diag_ggn, kfac_ggn


def timed(fn, repeats=9):
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(1000 * (time.perf_counter() - start))
    return f"min {min(times):8.1f} ms   median {statistics.median(times):8.1f} ms"


def brute_force_diag(model, x):
    params = {k: v.detach() for k, v in model.named_parameters()}
    jac = vmap(jacrev(lambda p, xn: functional_call(model, p, (xn.unsqueeze(0),))[0]), in_dims=(None, 0))(params, x)
    p = torch.softmax(model(x), -1).detach()
    out = {}
    for k, j in jac.items():  # diag(J' (diag(p) - p p') J) = sum_c p_c J_c^2 - (sum_c p_c J_c)^2
        j = j.reshape(x.shape[0], p.shape[1], -1)
        diag = torch.einsum("nc,ncp->p", p, j.square()) - torch.einsum("nc,ncp->np", p, j).square().sum(0)
        out[k] = diag.reshape(params[k].shape)
    return out


def main():
    torch.manual_seed(0)
    if len(sys.argv) > 1:  # optional: number of intra-op threads
        torch.set_num_threads(int(sys.argv[1]))
    model = nn.Sequential(nn.Linear(64, 300), nn.ReLU(), nn.Linear(300, 100), nn.ReLU(), nn.Linear(100, 10))
    x = torch.randn(1000, 64)
    y = torch.randint(0, 10, (1000,))
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model 64-300-100-10 ({n_params} parameters), N = {len(x)}, float32, threads = {torch.get_num_threads()}")
    print(f"diag_ggn  (exact, 10 backward passes): {timed(lambda: diag_ggn(model, x, y, 'categorical'))}")
    print(f"diag_ggn  (mc_samples=1):              {timed(lambda: diag_ggn(model, x, y, 'categorical', mc_samples=1))}")
    print(f"diag_ef:                               {timed(lambda: diag_ef(model, x, y, 'categorical'))}")
    print(f"kfac_ggn:                              {timed(lambda: kfac_ggn(model, x, y, 'categorical'))}")
    xs = x[:100]
    ref = brute_force_diag(model, xs)
    got = diag_ggn(model, xs, None, "categorical")
    err = max(((ref[k] - got[k]).abs().max() / ref[k].abs().max()).item() for k in ref)
    print(f"brute force vmap(jacrev), N = 100:     {timed(lambda: brute_force_diag(model, xs), repeats=3)}"
          f"  (max rel. diff to diag_ggn {err:.1e})")


if __name__ == "__main__":
    main()
