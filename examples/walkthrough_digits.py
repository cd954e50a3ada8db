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
from pyro_sparse import reduced_runs, reduction
from pyro_sparse.report import compare_entries, rank_models, text_table, write_report
from pyro_sparse.runs import fit_run

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
# Every rule reads only the run's posterior summary (Gaussian marginals + the prior that produced
# them) and is one registered object (`pyro_sparse.registry.RULES`). `reduce_run` is what
# `pyro-sparse reduce DIR --method RULE` does: decide, build the compact network (units physically
# removed), write `reduction-<rule>.json` and `compact-<rule>.pt`.

# %%
rules = {svd_dir: [("log-alpha", None)],
         gauss_dir: [("savage-dickey", None), ("opd", 0.95), ("magnitude", 0.95), ("random", 0.95)]}
for directory, todo in rules.items():
    for rule, sparsity in todo:
        r = reduced_runs.reduce_run(directory, rule, sparsity=sparsity, overwrite=True)
        print(f"{os.path.basename(directory):>10} {rule:>14}: weight sparsity {r['sparsity']:.3f}, "
              f"units removed {r['units_removed']}, compact posterior-mean network accuracy "
              f"{r['test_accuracy_reduced']:.4f}")

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
rows, note = compare_entries([svd_dir, f"{svd_dir}:log-alpha-3", gauss_dir, f"{gauss_dir}:savage-dickey-0"])
print(note)
print(text_table(rows, ["model", "rank", "elpd_test", "se_test", "elpd_test_diff", "dse_test", "elpd_loo",
                        "k > 0.7", "test_accuracy", "sparsity", "nonzero"]))

# %% [markdown]
# Then in memory, for the Gaussian network: dense vs the evidence-based reduction vs OPD and two
# baselines at 95% sparsity. Each reduced InferenceData fixes its pruned weights at zero.

# %%
summary = gauss.trainer.posterior_summary()
models = {"dense": D.run_inference_data(gauss, args.samples)}
for rule, sparsity in rules[gauss_dir]:
    name = rule if sparsity is None else f"{rule}-{round(100 * sparsity)}"
    masks = reduction.reduce(summary, rule, sparsity=sparsity).masks
    models[name] = D.run_inference_data(gauss, args.samples, masks=masks)
rows, note = rank_models(models)  # PSIS-LOO where reliable, else held-out log predictive density
print(note)
for row in rows:
    print(f"{row['model']:>13}: rank {row['rank']}, elpd_test {row.get('elpd_test', float('nan')):9.2f} "
          f"(paired se of the difference {row.get('dse_test', float('nan')):.2f}), share of k-hat > 0.7 "
          f"{row['k > 0.7']:.0%}, test accuracy {row['test_accuracy']:.4f}, sparsity {row['sparsity']:.3f}")
