"""Time each reduction rule on about one million weights spread over a few layers (CPU).

Run: PYTHONPATH=. python bench/bench_reduction_rules.py [--dtype float32|float64] [--repeats N]
     [--threads T]
Prints the median and the minimum wall time of each rule in milliseconds (the minimum is
the better figure on a shared machine). The target is well under 200 ms
per rule for a 1M-weight dict.

The second table times the whole interface, ``reduce(summary, method, ...)`` on a synthetic
posterior summary of the same shapes (Gaussian prior N(0, 1), mean-field posterior): the rule,
the masks, biases and the per-layer unit counts, i.e. everything but building the network.
"""

import argparse
import statistics
import time

import torch

from pyro_sparse.reduction import (
    bmr_gaussian,
    group_scores,
    magnitude_scores,
    mask_by_sparsity,
    mask_by_threshold,
    opd_scores,
    random_scores,
    reduce,
    savage_dickey,
    spike_slab_decision,
    structured_mask,
)

SHAPES = {
    "conv1.weight": (64, 32, 3, 3),
    "fc1.weight": (1024, 512),
    "fc2.weight": (512, 820),
    "fc2.bias": (512,),
    "fc3.weight": (100, 512),
}

AXES = {"weight": {"unit": 0, "input": 1}, "bias": {"unit": 0}}


def synthetic_summary(dtype, generator):
    """A PosteriorSummary of SHAPES (plus biases), prior N(0, 1), posterior sd in [0.03, 1]."""
    from pyro_sparse.summary import PosteriorSummary, SiteSummary

    shapes = dict(SHAPES)
    for name, shape in SHAPES.items():
        layer = name.split(".")[0]
        shapes.setdefault(f"{layer}.bias", (shape[0],))
    out = PosteriorSummary(method="synthetic")
    for name in sorted(shapes, key=lambda k: (k.split(".")[0], k.endswith("bias"))):
        layer, param = name.split(".")
        shape = shapes[name]
        loc = torch.randn(shape, generator=generator, dtype=dtype) * 0.3
        sd = 0.03 + torch.rand(shape, generator=generator, dtype=dtype)
        precision = sd.square().reciprocal()
        out[name] = SiteSummary(layer, param, loc, precision, torch.zeros((), dtype=dtype),
                                torch.ones((), dtype=dtype), dict(AXES[param]),
                                sd.square().log() - loc.square().log(), None)
    return out


def timed(fn, repeats):
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times), 1e3 * min(times)


def reduce_calls(summary) -> dict:
    """name -> a call of ``reduce`` on ``summary``, one per rule (also used by ``python -m bench``)."""
    return {
        "bmr (threshold 0)": lambda: reduce(summary, "bmr"),
        "savage-dickey (threshold 0)": lambda: reduce(summary, "savage-dickey"),
        "spike-slab (layer-wise)": lambda: reduce(summary, "spike-slab"),
        "log-alpha (threshold 3)": lambda: reduce(summary, "log-alpha"),
        "opd global 0.9": lambda: reduce(summary, "opd", sparsity=0.9),
        "opd structured 0.5": lambda: reduce(summary, "opd", sparsity=0.5, structured=True),
        "magnitude global 0.9": lambda: reduce(summary, "magnitude", sparsity=0.9),
        "magnitude layer 0.9": lambda: reduce(summary, "magnitude", sparsity=0.9, scope="layer"),
        "random global 0.9": lambda: reduce(summary, "random", sparsity=0.9),
        "savage-dickey structured": lambda: reduce(summary, "savage-dickey", structured=True),
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    g = torch.Generator().manual_seed(0)
    loc = {k: torch.randn(s, generator=g, dtype=dtype) for k, s in SHAPES.items()}
    prec = {k: torch.rand(s, generator=g, dtype=dtype) * 10 + 0.1 for k, s in SHAPES.items()}
    n = sum(v.numel() for v in loc.values())
    print(f"{n} weights in {len(SHAPES)} tensors, {args.dtype}, {torch.get_num_threads()} threads")

    opd = {k: opd_scores(loc[k], prec[k]) for k in loc}
    groups = {k: group_scores(v) for k, v in opd.items()}
    dF = {k: savage_dickey(loc[k], prec[k], 0.0, 1.0) for k in loc}
    rules = {
        "opd_scores": lambda: {k: opd_scores(loc[k], prec[k]) for k in loc},
        "magnitude_scores": lambda: {k: magnitude_scores(v) for k, v in loc.items()},
        "random_scores": lambda: {k: random_scores(s, g, dtype=dtype) for k, s in SHAPES.items()},
        "group_scores (per unit)": lambda: {k: group_scores(v) for k, v in opd.items()},
        "bmr_gaussian (diagonal)": lambda: {
            k: bmr_gaussian(loc[k], prec[k], 0.0, 1.0, 0.0, 100.0) for k in loc
        },
        "savage_dickey (diagonal)": lambda: {k: savage_dickey(loc[k], prec[k], 0.0, 1.0) for k in loc},
        "spike_slab_decision (per layer)": lambda: {k: spike_slab_decision(v) for k, v in dF.items()},
        "mask_by_sparsity global 0.9": lambda: mask_by_sparsity(opd, 0.9),
        "mask_by_sparsity layer 0.9": lambda: mask_by_sparsity(opd, 0.9, scope="layer"),
        "mask_by_threshold below 0": lambda: mask_by_threshold(dF, 0.0),
        "structured_mask 0.5 (+ expand)": lambda: structured_mask(groups, 0.5, shapes=SHAPES),
    }
    width = max(len(name) for name in rules)
    print(f"{'rule':<{width}}  {'median':>8}  {'min':>8}")
    for name, fn in rules.items():
        median, best = timed(fn, args.repeats)
        print(f"{name:<{width}}  {median:8.1f}  {best:8.1f} ms")

    summary = synthetic_summary(dtype, g)
    print(f"\nreduce(summary, ...) on a synthetic summary: {summary.num_weights()} parameters "
          f"in {len(summary)} sites")
    calls = reduce_calls(summary)
    width = max(len(name) for name in calls)
    print(f"{'reduce(...)':<{width}}  {'median':>8}  {'min':>8}")
    for name, fn in calls.items():
        median, best = timed(fn, args.repeats)
        print(f"{name:<{width}}  {median:8.1f}  {best:8.1f} ms")


if __name__ == "__main__":
    main()
