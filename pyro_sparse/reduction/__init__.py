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

import importlib

# the function shares its name with its module: bound here, or the submodule would shadow it
from .compact import compact

#: name -> the submodule that defines it (imported on first use, so importing one submodule -- the
#: rules for a post-hoc prune -- does not import the run-directory workflow and the trainers)
_LAZY = {
    "bmr_gaussian": ".bmr", "bmr_diagonal_zero_mean": ".bmr", "savage_dickey": ".bmr", "group_delta_f": ".bmr",
    "spike_slab_decision": ".bmr",
    "add_prune_masks": ".compact", "compact_plan": ".compact", "export": ".compact",
    "masked_module": ".compact", "masked_predictive": ".compact", "masked_values": ".compact",
    "reduction_report": ".report",
    "Decision": ".rules", "Rule": ".rules", "applicable_rules": ".rules", "reduce": ".rules", "rule": ".rules",
    "group_scores": ".scores", "magnitude_scores": ".scores", "mask_by_sparsity": ".scores",
    "mask_by_threshold": ".scores", "opd_scores": ".scores", "random_scores": ".scores",
    "structured_mask": ".scores",
    "head_evidence": ".transformer", "remove_heads": ".transformer",
    "load_compact": ".workflow", "reduce_run": ".workflow", "save_compact": ".workflow", "sweep_run": ".workflow",
}

__all__ = ["compact", *_LAZY]


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module 'pyro_sparse.reduction' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + __all__)
