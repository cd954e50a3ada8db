"""Sparse Variational Dropout (Molchanov et al. 2017) on digits: fit, prune where log alpha > 3.

    python examples/sparsevd_digits.py [--data mnist1d] [--epochs N] [--threshold 3]

Log-uniform prior on every weight (models/mlp_sparsevd.yaml), mean-field Gaussian posterior with
local reparameterisation (inference/svi_sparsevd.yaml). Prints the posterior predictive accuracy,
the accuracy of the pruned network (posterior means, pruned weights set to zero) and the
fraction of weights removed.
"""

from _common import fit, parse_args, prune_and_report

if __name__ == "__main__":
    args = parse_args(__doc__.splitlines()[0], "models/mlp_sparsevd.yaml", "inference/svi_sparsevd.yaml")
    net, guide, data, metrics = fit(args)
    prune_and_report(net, guide, data, metrics, "log-alpha", args.threshold)
