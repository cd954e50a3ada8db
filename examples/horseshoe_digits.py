"""Regularised ("tiered") horseshoe on digits: unit scales split in two; remove the shrunk units.

    python examples/horseshoe_digits.py [--epochs N] [--threshold T] [--out DIR]

models/mlp_horseshoe.yaml: unit-level local scales, tau0 = 0.01, slab InvGamma(2, 6), a single
scale on the output layer (Markovic et al. 2023). A unit is removed where its relative scale
lambda~ = s / tau (posterior medians) is below the threshold (the prior's rule, horseshoe-scale). Saves a
histogram of the hidden units' relative scales, which is bimodal: units the data need sit in the
Cauchy tail, the others near the prior's bulk, as ``DIR/horseshoe_unit_scales.png`` (default
``runs/examples/``, which git ignores: the example never writes into the source tree).
"""

import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from _common import ROOT, fit, parse_args, prune_and_report  # noqa: E402

#: where the figure goes unless --out says otherwise (git-ignored, like every run directory)
DEFAULT_OUT = os.path.join(ROOT, "runs", "examples")
FIGURE = "horseshoe_unit_scales.png"

if __name__ == "__main__":
    args = parse_args(__doc__.splitlines()[0], "models/mlp_horseshoe.yaml", "inference/svi_horseshoe.yaml",
                      [(("--out",), {"default": DEFAULT_OUT, "help": f"directory for {FIGURE}"})])
    os.makedirs(args.out, exist_ok=True)
    png = os.path.join(args.out, FIGURE)
    net, guide, data, metrics = fit(args)
    figures, _ = prune_and_report(net, guide, data, metrics, "horseshoe-scale", args.threshold)
    threshold = figures["threshold"]
    medians = guide.median()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    bins = np.linspace(-0.5, 1.75, 46)
    for name, (layer, param, prior) in net.param_sites().items():
        if param != "weight" or prior.group != "unit":
            continue
        rel = prior.relative_scale(name, medians).flatten().log10().numpy()
        ax.hist(rel, bins=bins, alpha=0.6, label=f"{layer.site} ({rel.size} units)")
        print(f"  {name}: {int((rel < np.log10(threshold)).sum())} of {rel.size} units below the threshold")
    ax.axvline(np.log10(threshold), color="k", ls="--", lw=1, label=f"threshold {threshold:g}")
    ax.set_xlabel("log10 relative unit scale  lambda~ = s / tau  (posterior median)")
    ax.set_ylabel("units")
    ax.set_title(f"Horseshoe on {data.name}: acc {figures['pruned_accuracy']:.3f} after removing "
                 f"{figures['hidden_units_removed']:.0%} of hidden units", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    print(f"histogram saved to {png}")
