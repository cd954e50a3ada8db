# %% [markdown]
# # Walkthrough: fit -> reduce -> report -> compare, on digits
#
# A notebook-style script (cells marked `# %%`; runs top to bottom as a plain script too).
# Two MLPs (64-300-100-10) are fitted by mean-field SVI on the scikit-learn digits:
#
# * **Sparse VD**: log-uniform prior on every weight (Molchanov et al. 2017), pruned where
#   log alpha > 3;
# * **Gaussian**: N(0, 1) prior on every weight, pruned by the Savage-Dickey evidence
#   dF = ln q(0) - ln p(0) > 0 (Bayesian model reduction towards a point mass; Friston & Penny 2011).
#
# Every reduced network gets its own ArviZ InferenceData (pruned weights fixed at 0), so ArviZ's
# PSIS-LOO ranks the dense, reduced and baseline networks. About a minute on 2 CPU cores:
#
#     python examples/walkthrough_digits.py [--out runs/walkthrough] [--samples 100]

# %%
import argparse
import os
import time

import torch

from pyro_sparse import diagnostics as D
from pyro_sparse import reduction
from pyro_sparse.checkpoint import write_json_atomic
from pyro_sparse.report import compare_entries, masked_values, point_metric, text_table, write_report
from pyro_sparse.runs import fit_run
from pyro_sparse.summary import summarize

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
parser = argparse.ArgumentParser(description="fit -> reduce -> report -> compare on digits")
parser.add_argument("--out", default=os.path.join(ROOT, "runs", "walkthrough"))
parser.add_argument("--samples", type=int, default=100, help="posterior draws per InferenceData")
parser.add_argument("--epochs-svd", type=int, default=100)
parser.add_argument("--epochs-gaussian", type=int, default=40)
args = parser.parse_args()
torch.set_num_threads(1)  # small MLPs are fastest on one thread
svd_dir, gauss_dir = os.path.join(args.out, "sparsevd"), os.path.join(args.out, "gaussian")

# %% [markdown]
# ## 1. Fit
# A model spec (architecture + priors) and an inference recipe (guide, optimiser, schedule) make a
# run directory with the checkpoint and the per-epoch history (`metrics.jsonl`).

# %%
start = time.perf_counter()
svd, svd_metrics = fit_run(os.path.join(ROOT, "models", "mlp_sparsevd.yaml"),
                           os.path.join(ROOT, "inference", "svi_sparsevd.yaml"), "digits", svd_dir,
                           epochs=args.epochs_svd, overwrite=True, progress=False)
gauss, gauss_metrics = fit_run(os.path.join(ROOT, "models", "mlp_gaussian.yaml"),
                               os.path.join(ROOT, "inference", "svi_meanfield.yaml"), "digits", gauss_dir,
                               epochs=args.epochs_gaussian, overwrite=True, progress=False)
print(f"fitted in {time.perf_counter() - start:.1f} s: Sparse VD test accuracy {svd_metrics['test_accuracy']:.4f}, "
      f"Gaussian {gauss_metrics['test_accuracy']:.4f}")

# %% [markdown]
# ## 2. Reduce
# Every rule reads only the posterior summary (Gaussian marginals + the prior that produced them).
# Masks are `site -> bool tensor` (True = keep) on the weight tensors; biases stay.
# A network-level `pyro_sparse.reduction.reduce` is used where the installed version has one.

# %%
def weight_masks(summary, rule):
    weights = {k: s for k, s in summary.items() if s.param == "weight"}
    if rule == "log-alpha":
        return reduction.mask_by_threshold({k: s.log_alpha for k, s in weights.items()}, 3.0, keep="below")
    if rule == "savage-dickey":
        dF = {k: reduction.savage_dickey(s.loc, s.precision, s.prior_loc, s.prior_precision) for k, s in weights.items()}
        return reduction.mask_by_threshold(dF, 0.0, keep="below")
    kind, sparsity = rule.rsplit("-", 1)
    sparsity = int(sparsity) / 100
    if kind == "opd":
        scores = {k: reduction.opd_scores(s.loc, s.precision) for k, s in weights.items()}
    elif kind == "magnitude":
        scores = {k: reduction.magnitude_scores(s.loc) for k, s in weights.items()}
    else:
        gen = torch.Generator().manual_seed(0)
        scores = {k: reduction.random_scores(s.loc.shape, gen) for k, s in weights.items()}
    return reduction.mask_by_sparsity(scores, sparsity)


def describe(run, rule, masks):
    """What a reduction-*.json holds: the rule, sizes per layer and the point accuracy."""
    data = run.dataset
    acc = point_metric(run.network, masked_values(run.guide.median(), masks), data.x_test, data.y_test)
    total = sum(m.numel() for m in masks.values())
    kept = sum(int(m.sum()) for m in masks.values())
    return {"rule": rule, "weight_sparsity": 1 - kept / total, "test_accuracy_point": acc,
            "layers": {k: {"kept": int(m.sum()), "total": m.numel(), "units_kept": int(m.any(1).sum()),
                           "units": m.shape[0]} for k, m in masks.items()}}


reduce_fn = getattr(reduction, "reduce", None)  # network-level reduction, where available
decisions = {}
for run, rules in ((svd, ["log-alpha"]), (gauss, ["savage-dickey", "opd-95", "magnitude-95", "random-95"])):
    summary = summarize(run.network, run.guide)
    for rule in rules:
        masks = weight_masks(summary, rule)
        decisions[(run.directory, rule)] = masks
        info = describe(run, rule, masks)
        write_json_atomic(os.path.join(run.directory, f"reduction-{rule}.json"), info)
        print(f"{os.path.basename(run.directory):>10} {rule:>14}: weight sparsity {info['weight_sparsity']:.3f}, "
              f"point test accuracy {info['test_accuracy_point']:.4f}")
if reduce_fn is not None:
    print("pyro_sparse.reduction.reduce is available; see its Decision for the network-level masks")

# %% [markdown]
# ## 3. Report
# `pyro-sparse report DIR` does the same: `posterior.nc` (ArviZ), one `posterior-<rule>.nc` per
# reduced model, five PNG figures and `report.md` (which also lists the `reduction-*.json` above).

# %%
for run in (svd, gauss):
    start = time.perf_counter()
    result = write_report(run.directory, num_samples=args.samples)
    print(f"   see {os.path.join(run.directory, 'report.md')} ({time.perf_counter() - start:.1f} s)")

# %% [markdown]
# ## 4. Compare
# By PSIS-LOO on the training observations (`az.compare`, stacking weights), next to held-out
# accuracy and size. First the files the reports wrote (`pyro-sparse compare DIR DIR:RULE ...`):

# %%
rows = compare_entries([svd_dir, f"{svd_dir}:log-alpha-3", gauss_dir, f"{gauss_dir}:savage-dickey"])
print(text_table(rows, ["model", "rank", "elpd_loo", "se", "p_loo", "elpd_diff", "weight", "max k",
                        "test_accuracy", "sparsity", "nonzero"]))

# %% [markdown]
# Then in memory, for the Gaussian network: dense vs the evidence-based reduction vs OPD and two
# baselines at 95% sparsity. Each reduced InferenceData fixes its pruned weights at zero.

# %%
models = {"dense": D.run_inference_data(gauss, args.samples)}
for rule in ("savage-dickey", "opd-95", "magnitude-95", "random-95"):
    name = "bmr" if rule == "savage-dickey" else rule
    models[name] = D.run_inference_data(gauss, args.samples, masks=decisions[(gauss_dir, rule)])
table = D.compare(models)
for name in table.index:
    a, loo = D.attributes(models[name]), D.loo(models[name])
    print(f"{name:>13}: rank {table.loc[name, 'rank']}, elpd_loo {table.loc[name, 'elpd_loo']:9.2f} "
          f"(se {table.loc[name, 'se']:.2f}), max Pareto k {loo['pareto_k_max']:.2f}, "
          f"test accuracy {a['test_accuracy']:.4f}, sparsity {a['sparsity']:.3f}")
