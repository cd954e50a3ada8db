"""Reduction: turn a Gaussian posterior summary into evidence, scores and masks -- the pure maths,
which knows nothing about networks.

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
- :mod:`.compensate`: the reduced posterior mean of a structured posterior (the Optimal Brain
  Surgeon update), which moves the kept weights;
- :mod:`.heads`: the evidence for removing whole attention heads (``remove_heads``).

What is done with a decision lives beside this package: the network rebuilt smaller
(:mod:`pyro_sparse.rebuild`: the masked network and ``compact()``, units, gates and heads
physically deleted by the layers' :mod:`pyro_sparse.compaction_protocol`), the figures before and
after (:mod:`pyro_sparse.outcome`), run directories (:mod:`pyro_sparse.reduced_runs`) and
iterative BMR during training (:mod:`pyro_sparse.iterative`, a trainer).
"""

import importlib

#: name -> the submodule that defines it (imported on first use, so importing one submodule -- the
#: rules for a post-hoc prune -- does not import the others)
_LAZY = {
    "bmr_gaussian": ".bmr", "bmr_diagonal_zero_mean": ".bmr", "savage_dickey": ".bmr", "group_delta_f": ".bmr",
    "spike_slab_decision": ".bmr",
    "Decision": ".rules", "Rule": ".rules", "applicable_rules": ".rules", "reduce": ".rules", "rule": ".rules",
    "group_scores": ".scores", "magnitude_scores": ".scores", "mask_by_sparsity": ".scores",
    "mask_by_threshold": ".scores", "opd_scores": ".scores", "random_scores": ".scores",
    "structured_mask": ".scores",
    "head_evidence": ".heads", "remove_heads": ".heads",
}

__all__ = list(_LAZY)


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module 'pyro_sparse.reduction' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + __all__)
