"""Time one SVI step against a plain-PyTorch training step of the same network (CPU).

Run: PYTHONPATH=. python bench/bench_svi_step.py [--batch 64] [--repeats 30] [--steps 20] [--threads 1]

Comparisons, each in one process with the two steps interleaved (block of ``--steps`` steps
of one, then of the other, ``--repeats`` times), reported as the median time per step and
the ratio of medians:

1. Sparse VD MLP (models/mlp_sparsevd.yaml, 64-300-100-10 on digits): the step that
   :class:`~pyro_sparse.fitting.SVITrainer` runs (mean-field guide, analytic KL, local
   reparameterisation, Adam; the ELBO core, :class:`~pyro_sparse.elbo.CoreELBO`) against
   ``nn.Sequential`` + cross-entropy + Adam of the same deterministic network on the same
   mini-batch. Target ratio <= 2.5 (local reparameterisation needs a second matmul per layer,
   so ~2 is the floor). Then the same trainer step on the Pyro path (``elbo: pyro``, the
   reference :class:`~pyro_sparse.elbo.MeanFieldELBO`), and the same Sparse VD step written by
   hand in PyTorch (no library code but the fused KL; the floor the maths sets), each against
   the plain step.
2. Mean-field Gaussian MLP (models/mlp_gaussian.yaml) SVI step against the MAP step of the same
   model (DeltaGuide, inference/map.yaml; also the direct ELBO), and that MAP step against the
   plain step (the MAP objective adds only the prior's log-density to the plain loss).
"""

import argparse
import statistics
import time

import pyro
import torch
import torch.nn.functional as F
from torch import nn

from pyro_sparse.data import load_digits
from pyro_sparse.fitting import SVITrainer
from pyro_sparse.recipe import load_recipe
from pyro_sparse.runs import build
from pyro_sparse.spec import load_model_spec


def svi_stepper(model_path, recipe_path, data, batch, elbo="auto", expect=None):
    """One trainer step of the recipe on random mini-batches; ``elbo`` overrides the recipe's
    (``pyro``: the reference path); ``expect``: the ``elbo_path`` the trainer must have chosen."""
    spec, recipe = load_model_spec(model_path), load_recipe(recipe_path)
    recipe["batch_size"] = batch
    recipe["elbo"] = elbo
    net, guide = build(spec, recipe, data)
    trainer = SVITrainer(net, guide, data, recipe, progress=False)
    if expect is not None and trainer.elbo_path != expect:
        raise RuntimeError(f"{model_path}: the trainer took the {trainer.elbo_path} path ({trainer.elbo_reason}), "
                           f"expected {expect}")
    gen = torch.Generator().manual_seed(0)
    n = len(data.x_train)

    def step():
        idx = torch.randint(n, (batch,), generator=gen)
        trainer._step(idx, 1.0)

    return step


def plain_stepper(data, batch, sizes=(300, 100)):
    layers, d = [], data.x_train.shape[1]
    for h in sizes:
        layers += [nn.Linear(d, h), nn.ReLU()]
        d = h
    net = nn.Sequential(*layers, nn.Linear(d, data.num_outputs))
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(0)
    n = len(data.x_train)

    def step():
        idx = torch.randint(n, (batch,), generator=gen)
        loss = F.cross_entropy(net(data.x_train[idx]), data.y_train[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def handwritten_sparsevd_stepper(data, batch, sizes=(300, 100)):
    """The same Sparse VD step written directly in PyTorch (no Pyro): local reparameterisation,
    the library's fused Sparse VD KL, Gaussian KL of the biases, fused Adam. The floor that the
    maths alone sets for the SVI step."""
    from pyro_sparse.kl import kl_normal_loguniform_log

    dims = [data.x_train.shape[1], *sizes, data.num_outputs]
    params = []
    for d_in, d_out in zip(dims[:-1], dims[1:]):
        layer = nn.Linear(d_in, d_out)
        params += [nn.Parameter(layer.weight.detach().clone()), nn.Parameter(torch.full((d_out, d_in), -5.0)),
                   nn.Parameter(layer.bias.detach().clone()), nn.Parameter(torch.full((d_out,), -5.0))]
    opt = torch.optim.Adam(params, lr=1e-3, fused=True)
    gen = torch.Generator().manual_seed(0)
    n = len(data.x_train)

    def step():
        idx = torch.randint(n, (batch,), generator=gen)
        h, kl = data.x_train[idx], 0.0
        for k in range(len(dims) - 1):
            w, w_ls, b, b_ls = params[4 * k: 4 * k + 4]
            w_ls, b_ls = w_ls.clamp(-12, 4), b_ls.clamp(-12, 4)
            mean = F.linear(h, w, b)
            var = F.linear(h * h, torch.exp(2 * w_ls)) + torch.exp(2 * b_ls)
            h = mean + var.sqrt() * torch.randn_like(mean)
            if k < len(dims) - 2:
                h = F.relu(h)
            kl = kl + kl_normal_loguniform_log(w, w_ls).sum() + (0.5 * (torch.exp(2 * b_ls) + b * b) - b_ls - 0.5).sum()
        loss = F.cross_entropy(h, data.y_train[idx], reduction="sum") * (n / batch) + kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def interleaved(a, b, repeats, steps, clock):
    """Median seconds per step of ``a`` and ``b``, timed in alternating blocks with ``clock``."""
    for _ in range(3):  # warm-up
        a(), b()
    ta, tb = [], []
    for _ in range(repeats):
        for fn, out in ((a, ta), (b, tb)):
            start = clock()
            for _ in range(steps):
                fn()
            out.append((clock() - start) / steps)
    return statistics.median(ta), statistics.median(tb)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                        help="wall: perf_counter; cpu: this thread's CPU time (robust to other "
                             "processes on a shared machine; needs --threads 1)")
    args = parser.parse_args(argv)
    clock = time.perf_counter if args.clock == "wall" else time.thread_time
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    data = load_digits()
    rows = []
    with pyro.validation_enabled(False):
        svd = svi_stepper("models/mlp_sparsevd.yaml", "inference/svi_sparsevd.yaml", data, args.batch,
                          expect="core")
        plain = plain_stepper(data, args.batch)
        t_svd, t_plain = interleaved(svd, plain, args.repeats, args.steps, clock)
        rows.append(("Sparse VD SVI step (direct)", t_svd, "plain PyTorch step", t_plain))
        svd_pyro = svi_stepper("models/mlp_sparsevd.yaml", "inference/svi_sparsevd.yaml", data, args.batch,
                               elbo="pyro", expect="pyro")
        t_pyro, t_plain1 = interleaved(svd_pyro, plain, args.repeats, args.steps, clock)
        rows.append(("Sparse VD SVI step (Pyro path)", t_pyro, "plain PyTorch step", t_plain1))
        hand = handwritten_sparsevd_stepper(data, args.batch)
        t_hand, t_plain2 = interleaved(hand, plain, args.repeats, args.steps, clock)
        rows.append(("hand-written Sparse VD step", t_hand, "plain PyTorch step", t_plain2))
        mf = svi_stepper("models/mlp_gaussian.yaml", "inference/svi_meanfield.yaml", data, args.batch)
        map_ = svi_stepper("models/mlp_gaussian.yaml", "inference/map.yaml", data, args.batch, expect="core")
        t_mf, t_map = interleaved(mf, map_, args.repeats, args.steps, clock)
        rows.append(("mean-field Gaussian SVI step", t_mf, "MAP (delta guide) step", t_map))
        t_map1, t_plain3 = interleaved(map_, plain, args.repeats, args.steps, clock)
        rows.append(("MAP (delta guide) step", t_map1, "plain PyTorch step", t_plain3))
    print(f"MLP 64-300-100-10 on digits, batch {args.batch}, {args.threads} thread(s), "
          f"median of {args.repeats} blocks of {args.steps} steps, {args.clock} clock")
    for name_a, ta, name_b, tb in rows:
        print(f"  {name_a:<31} {1e3 * ta:7.3f} ms | {name_b:<24} {1e3 * tb:7.3f} ms | ratio {ta / tb:5.2f}x")


if __name__ == "__main__":
    main()
