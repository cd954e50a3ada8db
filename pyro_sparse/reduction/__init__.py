"""Reduction: turn a Gaussian posterior summary into evidence, scores and masks, and a network
into a smaller one.

The maths reads only posterior/prior summaries (tensors of means and precisions) and knows
nothing about networks:

- :mod:`.bmr`: Bayesian model reduction (Friston & Penny 2011; Markovic, Friston & Kiebel
  2023), its Savage-Dickey limit, group sums and the layer-wise spike-and-slab decision;
- :mod:`.scores`: Optimal Posterior Damage (Dhahri et al. 2024), magnitude and random scores,
  and the rules that turn scores or evidence into keep-masks (True = keep).

On top of them, reading a :class:`~pyro_sparse.summary.PosteriorSummary`:

- :mod:`.rules`: one registered :class:`~.rules.Rule` per reduction rule and
  ``reduce(summary, rule, sparsity=None, threshold=None, structured=False)`` ->
  :class:`~.rules.Decision` (masks, evidence/scores, units removed);
- :mod:`.compact`: the masked network, the masked posterior predictive and ``compact()``, the
  deterministic network with removed units, gates and heads physically deleted (the protocol
  is :mod:`pyro_sparse.compaction`);
- :mod:`.report`: counts, FLOPs, bytes, accuracy and NLL before and after;
- :mod:`.workflow`: reduce / sweep a run directory, ``save_compact`` / ``load_compact``;
- :mod:`.iterative`: iterative BMR during training (recipe ``method: svi_bmr``);
- :mod:`.transformer`: the evidence for removing whole attention heads (``remove_heads``).
"""

from .bmr import (
    bmr_diagonal_zero_mean,
    bmr_gaussian,
    group_delta_f,
    savage_dickey,
    spike_slab_decision,
)
from .compact import add_prune_masks, compact, compact_plan, export, masked_module, masked_predictive, masked_values
from .report import reduction_report
from .rules import Decision, Rule, applicable_rules, reduce, rule
from .scores import (
    group_scores,
    magnitude_scores,
    mask_by_sparsity,
    mask_by_threshold,
    opd_scores,
    random_scores,
    structured_mask,
)
from .transformer import head_evidence, remove_heads
from .workflow import load_compact, reduce_run, save_compact, sweep_run

__all__ = [
    "Rule",
    "Decision",
    "reduce",
    "rule",
    "applicable_rules",
    "head_evidence",
    "remove_heads",
    "compact",
    "compact_plan",
    "export",
    "add_prune_masks",
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
