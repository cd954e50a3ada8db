"""Reduction: turn a Gaussian posterior summary into evidence, scores and masks.

The functions here read only posterior/prior summaries (tensors of means and precisions) and
know nothing about networks:

- :mod:`.bmr`: Bayesian model reduction (Friston & Penny 2011; Markovic, Friston & Kiebel
  2023), its Savage-Dickey limit, group sums and the layer-wise spike-and-slab decision;
- :mod:`.scores`: Optimal Posterior Damage (Dhahri et al. 2024), magnitude and random scores,
  and the rules that turn scores or evidence into keep-masks (True = keep).

On top of them, reading a :class:`~pyro_sparse.summary.PosteriorSummary`:

- :mod:`.rules`: ``reduce(summary, method, sparsity=None, threshold=None, structured=False)``
  -> :class:`Decision` (masks, evidence/scores, units removed);
- :mod:`.compact`: the masked network, the masked posterior predictive and ``compact()``, the
  deterministic network with removed units physically deleted;
- :mod:`.report`: counts, FLOPs, bytes, accuracy and NLL before and after;
- :mod:`.workflow`: reduce / sweep a run directory, ``save_compact`` / ``load_compact``;
- :mod:`.iterative`: iterative BMR during training (recipe ``method: svi_bmr``);
- :mod:`.transformer`: attention heads and MLP units of transformer / Mixer blocks (used by
  ``compact``), and the group evidence for removing whole heads (``remove_heads``).
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

from .compact import compact, compact_plan, masked_module, masked_predictive, masked_values
from .report import reduction_report
from .rules import METHODS, Decision, group_log_alpha, reduce
from .transformer import head_evidence, remove_heads
from .workflow import load_compact, reduce_run, save_compact, sweep_run

__all__ = [
    "METHODS",
    "Decision",
    "reduce",
    "group_log_alpha",
    "head_evidence",
    "remove_heads",
    "compact",
    "compact_plan",
    "masked_module",
    "masked_predictive",
    "masked_values",
    "reduction_report",
    "reduce_run",
    "sweep_run",
    "save_compact",
    "load_compact",
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
