"""torch.compile on the CPU: compile time and step time, plain PyTorch and the ELBO core.

Run: PYTHONPATH=. python bench/bench_compile.py [--models mlp_sparsevd,mlp_horseshoe] [--repeats 11]

For each spec (digits, batch 64, one thread):

* **plain**: the deterministic twin's training step (``nn.Sequential``, cross-entropy, Adam), eager
  and with its loss function compiled (``torch.compile``, default mode);
* **core**: the library's ELBO core (:class:`~pyro_sparse.elbo.CoreELBO`) loss of the spec's recipe,
  eager (fused autograd nodes) and compiled (``torch.compile`` of ``differentiable_loss``); dynamo
  cannot trace the core's custom autograd nodes (they write their gradients into buffers in place
  and read the KL's gradient on the host), so a second variant, **core, fused nodes eager**, marks
  those nodes ``torch.compiler.disable`` and compiles the rest (the graph breaks around them).

Prints the first compiled call's wall time (the compile) and the median step times of interleaved
blocks (CPU time of this thread), and the break-even: the number of steps after which the compiled
step has paid for its compilation (never, when it is not faster).

Measured on the 2-core development VM (torch 2.13 CPU, 2026-12-03): the plain step compiles in
1.0 s and runs at 0.92x its eager speed; the core does not compile (dynamo: an intermediate that
aliases an input inside a fused node); with the fused nodes left eager it compiles (13.2 s cold,
1.9 s from inductor's cache) and runs at 0.67x (Sparse VD MLP) and 0.66x (horseshoe MLP) its eager
speed. Compilation does not pay on this CPU, so no recipe option enables it.
"""

import argparse
import time

import torch
import torch.nn.functional as F

from bench.timing import interleaved


def build(model, recipe):
    from pyro_sparse.data import load_digits
    from pyro_sparse.recipe import load_recipe
    from pyro_sparse.runs import build as build_run
    from pyro_sparse.spec import load_model_spec
    from pyro_sparse.summary import summarize

    data = load_digits()
    spec, rec = load_model_spec(f"models/{model}.yaml"), load_recipe(f"inference/{recipe}.yaml")
    net, guide = build_run(spec, rec, data)
    guide.setup(data.x_train[:64], data.y_train[:64], dataset_size=len(data.x_train))
    twin = net.deterministic(summarize(net, guide).locs()).train()
    for p in twin.parameters():
        p.requires_grad_(True)
    return data, net, guide, twin


def steppers(data, net, guide, twin):
    from pyro_sparse.elbo import CoreELBO

    gen = torch.Generator().manual_seed(0)
    n = len(data.x_train)
    x_all, y_all = data.x_train, data.y_train
    plain_opt = torch.optim.Adam(twin.parameters(), lr=1e-3)
    core_opt = torch.optim.Adam(guide.parameters(), lr=1e-3, fused=True)
    elbo = CoreELBO()
    elbo.plan(net, guide)

    def plain_loss(x, y):
        return F.cross_entropy(twin(x), y)

    def core_loss(x, y, idx):
        return elbo.differentiable_loss(net, guide, x, y, n, idx)

    def plain_step(loss_fn):
        def step():
            idx = torch.randint(n, (64,), generator=gen)
            loss = loss_fn(x_all[idx], y_all[idx])
            plain_opt.zero_grad(set_to_none=True)
            loss.backward()
            plain_opt.step()
        return step

    def core_step(loss_fn):
        def step():
            idx = torch.randint(n, (64,), generator=gen)
            loss = loss_fn(x_all[idx], y_all[idx], idx)
            core_opt.zero_grad(set_to_none=True)
            loss.backward()
            core_opt.step()
        return step

    return {"plain": (plain_step, plain_loss), "core": (core_step, core_loss),
            "core, fused nodes eager": (core_step, core_loss)}


def leave_fused_nodes_eager():
    """Mark the functions that apply the core's custom autograd nodes ``torch.compiler.disable``
    (where they are defined and where they are imported): dynamo runs them eagerly between the
    graphs it compiles."""
    from pyro_sparse import elbo, kl, local_reparam, priors, transformer

    for module, names in ((kl, ("local_terms", "hyper_terms", "point_terms", "kl_normal_loguniform_log")),
                          (elbo, ("local_terms", "hyper_terms", "point_terms")),
                          (local_reparam, ("_sample_preactivation",)), (transformer, ("_sample_preactivation",)),
                          (priors, ("scale_by_log_square",))):
        for name in names:
            setattr(module, name, torch.compiler.disable(getattr(module, name)))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="mlp_sparsevd:svi_sparsevd,mlp_horseshoe:svi_horseshoe")
    parser.add_argument("--repeats", type=int, default=11)
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    runs = {item: steppers(*build(*item.split(":"))) for item in args.models.split(",")}
    for kind in ("plain", "core", "core, fused nodes eager"):  # the last patches the library: last
        if kind == "core, fused nodes eager":
            leave_fused_nodes_eager()
            torch._dynamo.reset()
        for item, kinds in runs.items():
            model = item.split(":")[0]
            make, loss_fn = kinds[kind]
            eager = make(loss_fn)
            compiled = make(torch.compile(loss_fn, dynamic=False))
            t0 = time.perf_counter()
            try:
                compiled()
            except Exception as e:  # reported, not raised: the figure is that it does not compile
                print(f"{model} {kind}: torch.compile failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}")
                continue
            compile_s = time.perf_counter() - t0
            t = interleaved({"eager": eager, "compiled": compiled}, args.repeats, args.steps)
            e, c = t["eager"]["cpu"], t["compiled"]["cpu"]
            gain = e - c
            even = f"{compile_s / gain:.0f} steps" if gain > 0 else "never"
            print(f"{model} {kind}: compile {compile_s:.1f} s; step eager {1e3 * e:.3f} ms, compiled {1e3 * c:.3f} ms "
                  f"({e / c:.2f}x); break-even after {even}", flush=True)


if __name__ == "__main__":
    main()
