"""Group normal-Jeffreys prior (Louizos et al. 2017) on digits: remove hidden units by the log alpha of z.

    python examples/group_loguniform_digits.py [--epochs N] [--threshold T]

One multiplicative z per unit with a log-uniform prior (models/mlp_group_loguniform.yaml). A unit
is removed where the log alpha of its z exceeds the threshold (the prior's rule, group-log-alpha). Prints
the accuracy, the fraction of hidden units removed and of weights removed.
"""

import torch
from _common import fit, parse_args, prune_and_report

if __name__ == "__main__":
    args = parse_args(__doc__.splitlines()[0], "models/mlp_group_loguniform.yaml",
                      "inference/svi_group_loguniform.yaml")
    net, guide, data, metrics = fit(args)
    prune_and_report(net, guide, data, metrics, "group-log-alpha", args.threshold)
    for name, (layer, param, prior) in net.param_sites().items():
        if hasattr(prior, "group_log_alpha"):
            la = prior.group_log_alpha(name, guide).flatten()
            q = torch.quantile(la, torch.tensor([0.1, 0.5, 0.9]))
            print(f"  {name}: log alpha of z, 10/50/90%: {q[0]:.2f} / {q[1]:.2f} / {q[2]:.2f}")
