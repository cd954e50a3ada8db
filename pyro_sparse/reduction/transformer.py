r"""Reduction of transformer and MLP-Mixer layers: attention heads and MLP hidden units.

Given the masked parameter values of a layer (pruned entries exactly 0) and the decision's
keep-masks, these functions build the layer's compact form: fewer heads, narrower MLPs, the
same outputs as the masked layer. :func:`~pyro_sparse.reduction.compact.compact` calls them
through each layer's ``compact_entry`` hook (:mod:`pyro_sparse.transformer`); the width of the
residual stream D is never changed (every block reads and writes it).

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
:mod:`.report` does: per example with T tokens, ``2 T D (3 H d)`` for q, k, v, ``2 T H d D`` for
o, ``2 T^2 H d`` each for the scores and the weighted values, ``2 T (D M + M D)`` for an MLP
(token mixing: ``2 D (T M + M T)``). Normalisation, softmax, activations and biases are not
counted. ``sparse=True`` counts only the non-zero weights of the parametric maps.
"""

from __future__ import annotations

import torch

__all__ = ["attention_heads", "mlp_units", "compact_layer", "attention_flops", "block_flops", "layer_counts",
           "head_evidence", "remove_heads"]


def _mask(masks, name, like):
    m = masks.get(name)
    return torch.ones_like(like, dtype=torch.bool) if m is None else m.to(like.device).bool()


def _activation(name):
    from ..transformer import ACTIVATIONS

    return ACTIVATIONS[name]


@torch.no_grad()
def attention_heads(values: dict, masks: dict) -> dict:
    r"""Plan the removal of attention heads (see the module docstring).

    ``values``/``masks``: relative names ``q.weight`` ``(H, d, D)``, ``q.bias`` ``(H, d)``, k, v
    alike, ``o.weight`` ``(D, H, d)``, ``o.bias`` ``(D,)`` (biases optional). Returns ``{"keep"``
    (sorted kept head indices), ``"constant"`` (heads removed because their values are
    constant), ``"unread"`` (heads removed because ``o`` ignores them), ``"params"`` (the compact
    parameters, relative names; ``o.bias`` is present when the input had one or a constant head
    was folded into it), ``"folded"`` (whether ``o.bias`` received a contribution)``}``.
    """
    wv, wo = values["v.weight"], values["o.weight"]
    heads = wv.shape[0]
    constant = ~_mask(masks, "v.weight", wv).reshape(heads, -1).any(1)
    unread = ~_mask(masks, "o.weight", wo).transpose(0, 1).reshape(heads, -1).any(1)
    remove = constant | unread
    keep = torch.nonzero(~remove).squeeze(1)
    params = {}
    for p in ("q", "k", "v"):
        params[f"{p}.weight"] = values[f"{p}.weight"][keep].contiguous()
        if f"{p}.bias" in values:
            params[f"{p}.bias"] = values[f"{p}.bias"][keep].contiguous()
    params["o.weight"] = wo[:, keep].contiguous()
    bias = values.get("o.bias")
    fold = constant & ~unread
    folded = bool(fold.any()) and "v.bias" in values and bool((values["v.bias"][fold] != 0).any())
    if folded:
        contribution = torch.einsum("dhj,hj->d", wo[:, fold], values["v.bias"][fold])
        bias = contribution if bias is None else bias + contribution
    if bias is not None:
        params["o.bias"] = bias.contiguous()
    return {"keep": keep.tolist(), "constant": torch.nonzero(constant).squeeze(1).tolist(),
            "unread": torch.nonzero(unread & ~constant).squeeze(1).tolist(), "params": params, "folded": folded}


@torch.no_grad()
def mlp_units(values: dict, masks: dict, activation: str = "gelu") -> dict:
    r"""Plan the removal of hidden units of ``fc2(act(fc1 x))`` (see the module docstring).

    ``values``/``masks``: ``fc1.weight`` ``(M, in)``, ``fc1.bias`` ``(M,)``, ``fc2.weight``
    ``(out, M)``, ``fc2.bias`` ``(out,)`` (biases optional). Returns ``{"keep", "constant",
    "unread", "params", "folded"}`` like :func:`attention_heads`.
    """
    w1, w2 = values["fc1.weight"], values["fc2.weight"]
    constant = ~_mask(masks, "fc1.weight", w1).any(1)
    unread = ~_mask(masks, "fc2.weight", w2).any(0)
    keep = torch.nonzero(~(constant | unread)).squeeze(1)
    params = {"fc1.weight": w1[keep].contiguous(), "fc2.weight": w2[:, keep].contiguous()}
    if "fc1.bias" in values:
        params["fc1.bias"] = values["fc1.bias"][keep].contiguous()
    bias = values.get("fc2.bias")
    fold = constant & ~unread
    folded = False
    if bool(fold.any()):
        b1 = values["fc1.bias"][fold] if "fc1.bias" in values else torch.zeros(int(fold.sum()), dtype=w1.dtype)
        out = _activation(activation)(b1)
        if bool((out != 0).any()):
            contribution = w2[:, fold] @ out
            bias = contribution if bias is None else bias + contribution
            folded = True
    if bias is not None:
        params["fc2.bias"] = bias.contiguous()
    return {"keep": keep.tolist(), "constant": torch.nonzero(constant).squeeze(1).tolist(),
            "unread": torch.nonzero(unread & ~constant).squeeze(1).tolist(), "params": params, "folded": folded}


def _join(prefix, name):
    return f"{prefix}.{name}" if prefix else name


# --------------------------------------------------------------------------- structured: heads


def _attention_layers(network):
    from ..transformer import MultiHeadSelfAttention

    return [m for m in network.modules() if isinstance(m, MultiHeadSelfAttention)]


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
    for attn in _attention_layers(network):
        v, o = decision.scores[f"{attn.site}.v.weight"], decision.scores[f"{attn.site}.o.weight"]
        out[attn.site] = (v.reshape(v.shape[0], -1).sum(1), o.transpose(0, 1).reshape(o.shape[1], -1).sum(1))
    return out


def remove_heads(network, decision, threshold: float = 0.0):
    r"""The decision with whole attention heads removed where :math:`\Delta F_h > ` ``threshold``
    (:func:`head_evidence`): the head's value weights (or, where that side has more evidence,
    its output columns) are masked, so :func:`~.compact.compact` deletes the head. Weights the
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


def _sub(d: dict, prefix: str) -> dict:
    """The entries of ``d`` under ``prefix`` with the prefix stripped (all of ``d`` for "")."""
    if not prefix:
        return dict(d)
    n = len(prefix) + 1
    return {k[n:]: v for k, v in d.items() if k.startswith(prefix + ".")}


def _units_info(plan, total):
    return {"total": total, "kept": plan["keep"], "removed": total - len(plan["keep"]),
            "constant": len(plan["constant"]), "unread": len(plan["unread"])}


@torch.no_grad()
def compact_layer(layer, values: dict, masks: dict):
    """The compact form of a transformer-family layer: ``(entry, params, info)``.

    ``entry``: the layer's compact spec (plain containers; ``type`` names the layer class, whose
    ``build_compact(entry)`` rebuilds the module), ``params``: the compact module's parameters
    (relative names), ``info``: what was removed (``heads_total``, ``heads_kept``,
    ``heads_removed``; ``units``: MLP -> total/kept/removed; ``folded``: projections whose bias
    received constant contributions). Layers without heads or hidden units keep their shape and
    their masked values.
    """
    from ..transformer import MixerBlock, MultiHeadSelfAttention, TransformerBlock

    entry = layer.compact_spec()
    params = {k: v.contiguous() for k, v in values.items()}
    info: dict = {}
    folded = []

    def replace(prefix, new):
        for k in [k for k in params if not prefix or k.startswith(prefix + ".")]:
            del params[k]
        params.update({_join(prefix, k): v for k, v in new.items()})

    def heads(prefix):
        sub = _sub(values, prefix)
        plan = attention_heads(sub, _sub(masks, prefix))
        replace(prefix, plan["params"])
        total = sub["v.weight"].shape[0]
        entry["heads"] = len(plan["keep"])
        entry["out_bias"] = _join(prefix, "o.bias") in params
        info.update({"heads_total": total, "heads_kept": plan["keep"],
                     "heads_removed": sorted(set(range(total)) - set(plan["keep"]))})
        if plan["folded"]:
            folded.append(_join(prefix, "o"))

    def units(prefix):
        sub = _sub(values, prefix)
        plan = mlp_units(sub, _sub(masks, prefix), layer.activation)
        replace(prefix, plan["params"])
        entry[prefix] = len(plan["keep"])
        entry[f"{prefix}_bias"] = f"{prefix}.fc1.bias" in params
        entry[f"{prefix}_out_bias"] = f"{prefix}.fc2.bias" in params
        info.setdefault("units", {})[f"{prefix}.fc1"] = _units_info(plan, sub["fc1.weight"].shape[0])
        if plan["folded"]:
            folded.append(f"{prefix}.fc2")

    if isinstance(layer, TransformerBlock):
        heads("attn")
        units("mlp")
    elif isinstance(layer, MixerBlock):
        units("token_mlp")
        units("channel_mlp")
    elif isinstance(layer, MultiHeadSelfAttention):
        heads("")
    info["folded"] = folded
    return entry, params, info


# --------------------------------------------------------------------------- costs


def _n(w, sparse):
    return int((w != 0).sum()) if sparse else w.numel()


def attention_flops(params: dict, tokens: int, sparse=False) -> int:
    """FLOPs per example of self-attention with parameters ``params`` (relative names) on
    ``tokens`` tokens (module docstring)."""
    h, d, _ = params["q.weight"].shape
    proj = sum(_n(params[f"{p}.weight"], sparse) for p in "qkvo")
    return 2 * tokens * proj + 4 * tokens * tokens * h * d


def block_flops(layer, params: dict, in_shape, sparse=False) -> int:
    """FLOPs per example of a :class:`~pyro_sparse.transformer.TransformerBlock` or
    :class:`~pyro_sparse.transformer.MixerBlock` with parameters ``params`` (relative names)."""
    from ..transformer import MixerBlock

    tokens, dim = in_shape
    if isinstance(layer, MixerBlock):
        tok = _n(params["token_mlp.fc1.weight"], sparse) + _n(params["token_mlp.fc2.weight"], sparse)
        ch = _n(params["channel_mlp.fc1.weight"], sparse) + _n(params["channel_mlp.fc2.weight"], sparse)
        return 2 * dim * tok + 2 * tokens * ch
    mlp = _n(params["mlp.fc1.weight"], sparse) + _n(params["mlp.fc2.weight"], sparse)
    return attention_flops(_sub(params, "attn"), tokens, sparse) + 2 * tokens * mlp


def _is_bias(name):
    return name.rsplit(".", 1)[-1] == "bias"


def layer_counts(layer, values: dict, masks: dict, compact_params: dict, info: dict, in_shape) -> dict:
    """The report's per-layer entry (:func:`~pyro_sparse.reduction.reduction_report`) of a
    transformer-family layer: weights/biases kept, units (MLP hidden units) and heads kept,
    parameters and FLOPs dense / compact / non-zero."""
    def count(names, which):
        return sum(int(which[k].sum()) if which is masks else which[k].numel() for k in names)

    weights = [k for k in values if not _is_bias(k)]
    biases = [k for k in values if _is_bias(k)]
    mlps = info.get("units", {})
    entry = {
        "weights_kept": count(weights, masks), "weights_total": count(weights, values),
        "biases_kept": count(biases, masks), "biases_total": count(biases, values),
        "units_kept": sum(len(u["kept"]) for u in mlps.values()),
        "units_total": sum(u["total"] for u in mlps.values()),
        "params_dense": sum(v.numel() for v in values.values()),
        "params_nonzero": sum(int((v != 0).sum()) for v in compact_params.values()),
        "params_compact": sum(v.numel() for v in compact_params.values()),
        "flops_dense": layer.flops(values, in_shape),
        "flops_compact": layer.flops(compact_params, in_shape),
        "flops_sparse": layer.flops(compact_params, in_shape, sparse=True),
    }
    entry["units_removed"] = entry["units_total"] - entry["units_kept"]
    entry["sparsity"] = 1.0 - entry["weights_kept"] / entry["weights_total"] if entry["weights_total"] else 0.0
    if "heads_total" in info:
        entry.update({"heads_total": info["heads_total"], "heads_kept": len(info["heads_kept"]),
                      "heads_removed": len(info["heads_removed"])})
    return entry
