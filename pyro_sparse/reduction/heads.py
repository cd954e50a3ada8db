r"""Reduction of transformer and MLP-Mixer layers: attention heads and MLP hidden units.

The layers of :mod:`pyro_sparse.transformer` compact themselves (their part of the compaction
protocol, :mod:`pyro_sparse.compaction_protocol`): given the masked parameter values of a layer (pruned
entries exactly 0) and the decision's keep-masks they build their compact form -- fewer heads,
narrower MLPs, the same outputs as the masked layer -- by the rules below; the width of the
residual stream D is never changed (every block reads and writes it). This module adds the
structured reduction of whole heads by their evidence (:func:`head_evidence`,
:func:`remove_heads`).

**Heads.** Head h contributes :math:`W^o_h\,\mathrm{softmax}(q_h k_h^\top/\sqrt d)\,v_h` to the
attention output. It is removed when

* every weight of :math:`W^v_h` is pruned: then :math:`v_h = b^v_h` for every token, and since
  every row of the attention matrix sums to one the head outputs the constant :math:`b^v_h`
  whatever q and k are; its contribution :math:`W^o_h b^v_h` is added to the bias of ``o``
  (so a head whose q, k and v weights are all pruned, or whose group variable on v is, goes);
* or every weight of :math:`W^o_h` is pruned: nothing reads the head.

(Pruning only :math:`W^q_h` and :math:`W^k_h` leaves a uniform attention over the values, which
still depends on the input, so such a head is kept.)

**MLP units.** In ``fc2(act(fc1 x))`` hidden unit u is removed when every incoming weight
:math:`W^1_{u\cdot}` is pruned (it outputs the constant :math:`\mathrm{act}(b^1_u)`, whose
contribution :math:`W^2_{\cdot u}\,\mathrm{act}(b^1_u)` is added to the bias of ``fc2``) or
every outgoing weight :math:`W^2_{\cdot u}` is pruned (nothing reads it). The same rule removes
the hidden units of the Mixer's token-mixing MLP (which acts on the token axis; its ``fc2``
bias is shared by the channels, so the fold is exact as well).

Both folds are exact in exact arithmetic; in floating point the compact outputs differ from
the masked ones by rounding only (the tests bound the difference by 1e-5).

FLOPs (:func:`attention_flops`, :func:`block_flops`) count multiply-adds as 2 operations, as
:mod:`.outcome` does: per example with T tokens, ``2 T D (3 H d)`` for q, k, v, ``2 T H d D`` for
o, ``2 T^2 H d`` each for the scores and the weighted values, ``2 T (D M + M D)`` for an MLP
(token mixing: ``2 D (T M + M T)``). Normalisation, softmax, activations and biases are not
counted. ``sparse=True`` counts only the non-zero weights of the parametric maps.
"""

from __future__ import annotations

import torch

__all__ = ["head_evidence", "remove_heads"]


# --------------------------------------------------------------------------- structured: heads


def _attention_layers(network, scores):
    """The attention layers of ``network`` the decision judged: modules with heads (``heads``, or
    ``num_heads`` for the torch interface) whose value and output projection sites
    (``<site>.v.weight``, ``<site>.o.weight``) are among ``scores``."""
    return [m for m in network.modules() if (getattr(m, "heads", None) or getattr(m, "num_heads", None))
            and isinstance(getattr(m, "site", None), str)
            and f"{m.site}.v.weight" in scores and f"{m.site}.o.weight" in scores]


def head_evidence(network, decision) -> dict:
    r"""Evidence for removing each attention head, from a decision of an evidence rule.

    Under a factorised posterior the change in free energy of setting a group of weights to
    zero is the sum over the group (Friston & Penny 2011; Markovic et al. 2023). A head goes
    when its values are zero (:math:`W^v_h = 0`, the head then outputs the constant
    :math:`b^v_h`) or when nothing reads it (:math:`W^o_{\cdot h} = 0`), so its evidence is

    .. math:: \Delta F_h = \max\Big(\sum_{k \in W^v_h} \Delta F_k,\ \sum_{k \in W^o_{\cdot h}} \Delta F_k\Big)

    with :math:`\Delta F_k` the per-weight evidence in ``decision.scores`` (``bmr``,
    ``savage-dickey`` or ``spike-slab``). Returns ``{attention site: (v_sum (H,), o_sum (H,))}``.
    Read it on a posterior that was not pruned during training: a weight pruned by iterative BMR
    has a point-mass posterior and an evidence of about ``-ln(pruned_scale)`` for the zero it
    already is.
    """
    if decision.score_name != "delta_f":
        raise ValueError(f"decision: head evidence sums per-weight delta F; method {decision.method!r} gives "
                         f"{decision.score_name!r} (use bmr, savage-dickey or spike-slab)")
    out = {}
    for attn in _attention_layers(network, decision.scores):
        v, o = decision.scores[f"{attn.site}.v.weight"], decision.scores[f"{attn.site}.o.weight"]
        out[attn.site] = (v.reshape(v.shape[0], -1).sum(1), o.transpose(0, 1).reshape(o.shape[1], -1).sum(1))
    return out


def remove_heads(network, decision, threshold: float = 0.0):
    r"""The decision with whole attention heads removed where :math:`\Delta F_h > ` ``threshold``
    (:func:`head_evidence`): the head's value weights (or, where that side has more evidence,
    its output columns) are masked, so :func:`~pyro_sparse.rebuild.compact` deletes the head. Weights the
    decision already removed stay removed. Returns a new :class:`~.rules.Decision` whose
    ``group_scores`` hold ``<attention site>.heads`` -> :math:`\Delta F_h`."""
    from dataclasses import replace

    masks = {k: v.clone() for k, v in decision.masks.items()}
    groups = dict(decision.group_scores)
    for site, (v_sum, o_sum) in head_evidence(network, decision).items():
        evidence = torch.maximum(v_sum, o_sum)
        groups[f"{site}.heads"] = evidence
        gone = evidence > threshold
        by_v, by_o = gone & (v_sum >= o_sum), gone & (v_sum < o_sum)
        masks[f"{site}.v.weight"][by_v] = False
        masks[f"{site}.o.weight"][:, by_o] = False
    return replace(decision, masks=masks, group_scores=groups,
                   options={**decision.options, "heads_threshold": float(threshold)})
