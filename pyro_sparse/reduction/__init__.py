"""Reduction: turn a Gaussian posterior summary into evidence, scores and masks.

The functions here read only posterior/prior summaries (tensors of means and precisions) and
know nothing about networks:

- :mod:`.bmr`: Bayesian model reduction (Friston & Penny 2011; Markovic, Friston & Kiebel
  2023), its Savage-Dickey limit, group sums and the layer-wise spike-and-slab decision;
- :mod:`.scores`: Optimal Posterior Damage (Dhahri et al. 2024), magnitude and random scores,
  and the rules that turn scores or evidence into keep-masks (True = keep).
"""

from .bmr import (
    bmr_diagonal_zero_mean,
    bmr_gaussian,
    group_delta_f,
    savage_dickey,
    spike_slab_decision,
)
from .scores import (
    group_scores,
    magnitude_scores,
    mask_by_sparsity,
    mask_by_threshold,
    opd_scores,
    random_scores,
    structured_mask,
)

__all__ = [
    "bmr_gaussian",
    "bmr_diagonal_zero_mean",
    "savage_dickey",
    "group_delta_f",
    "spike_slab_decision",
    "opd_scores",
    "group_scores",
    "magnitude_scores",
    "random_scores",
    "mask_by_sparsity",
    "mask_by_threshold",
    "structured_mask",
]
