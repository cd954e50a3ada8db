r"""The signal-to-noise rule in one class: a plugin.

Blundell, Cornebise, Kavukcuoglu & Wierstra (2015), "Weight Uncertainty in Neural Networks",
prune the weights of a Gaussian posterior by their signal-to-noise ratio

.. math::  \mathrm{SNR}_i = |\theta_i| / \sigma_i,

lowest first (:math:`\mathrm{SNR}^2 = 1/\alpha`: the ranking of Sparse VD's ``log-alpha``, for
any Gaussian posterior and prior). It reads the marginal standard deviation, so on a Laplace
posterior whose summary holds the diagonal of a precision matrix it names that approximation.

Use it (``--allow-code``)::

    pyro-sparse reduce RUN --method snr --sparsity 0.9 --allow-code  # with plugins: [...] in the spec
    pyro-sparse list rules --plugins examples/plugins/snr_rule.py --allow-code
"""

import torch

from pyro_sparse.reduction.rules import NotApplicable, Rule


class SignalToNoise(Rule):
    """Signal-to-noise ratio |theta| / sigma of each weight (Blundell et al. 2015); low values are pruned."""

    name = "snr"
    quantity = "signal-to-noise ratio |theta| / sigma"
    score_name = "snr"
    prunes = "below"
    plot = "log10"
    reads_marginal = True

    def scores(self, site, context):
        if not bool(torch.isfinite(site.precision).all()):
            raise NotApplicable(f"rule 'snr': site {site.name!r} has no posterior variance (a point estimate); "
                                "use an SVI or Laplace fit")
        return site.loc.abs() * site.precision.sqrt()
