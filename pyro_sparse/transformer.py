r"""Bayesian Vision Transformer and MLP-Mixer layers.

Markovic, Friston & Kiebel (2023) apply Bayesian model reduction from LeNet up to Vision
Transformers (Dosovitskiy et al. 2021, "An Image is Worth 16x16 Words") and MLP-Mixers
(Tolstikhin et al. 2021). The layers here give those architectures priors on every parameter.
Sequences are tensors ``(B, T, D)``: T tokens of width D; a Linear map acts on the last dim.

Layers (spec ``type`` in brackets):

* :class:`PatchEmbed` (``patch_embed``): ``(C, H, W) -> (T, D)``, a strided convolution with
  kernel = stride = ``patch_size`` (``mode: conv``), or the same map written as a Linear layer
  over flattened patches (``mode: linear``); both give identical outputs.
* :class:`ClassToken` (``class_token``): prepends a learned token, ``(T, D) -> (T + 1, D)``.
* :class:`PosEmbed` (``pos_embed``): adds a learned position embedding ``(T, D)``.
* :class:`LayerNorm` (``layernorm``): ``LN(x) = g * (x - mean) / sqrt(var + eps) + b`` over the
  last dim (Ba et al. 2016); gain ``g`` (site ``.weight``, default prior N(1, 1)) and bias ``b``
  (``.bias``, default N(0, 1)) may carry any prior.
* :class:`MultiHeadSelfAttention` (``self_attention``): H heads of width d,

  .. math::

      q_h = x W^q_h{}^\top + b^q_h,\ k_h, v_h \text{ alike},\qquad
      \mathrm{head}_h = \mathrm{softmax}\big(q_h k_h^\top / \sqrt{d}\big)\, v_h,\qquad
      y = \textstyle\sum_h \mathrm{head}_h W^o_h{}^\top + b^o

  (Vaswani et al. 2017). The four projections ``q, k, v, o`` are Bayesian linear layers with
  any prior. Their weights carry a ``head`` axis so priors can group by head: ``q.weight``
  (and k, v) has shape ``(H, d, D)`` with axes ``head`` (dim 0) and ``input`` (dim 2),
  ``q.bias`` ``(H, d)``; ``o.weight`` has shape ``(D, H, d)`` with axes ``unit`` (dim 0) and
  ``head`` (dim 1). (A query feature is a (head, feature) pair, so q/k/v have no single
  ``unit`` dim; group them by ``head``, ``input``, ``layer`` or ``weight``.)
* :class:`TransformerBlock` (``transformer_block``): the pre-LN encoder block
  ``x + Attn(LN1(x))`` then ``x + MLP(LN2(x))`` with ``MLP = fc2(act(fc1(.)))``.
* :class:`MixerBlock` (``mixer_block``): token mixing ``x + MLP_tok(LN1(x)^T)^T`` (an MLP over
  the token axis, shared by the channels) then channel mixing ``x + MLP_ch(LN2(x))``.
* :class:`TokenPool` (``token_pool``): global average over tokens (``mode: mean``) or the class
  token (``mode: cls``), ``(T, D) -> (D,)``.

Site names follow module paths: ``block1.ln1.weight``, ``block1.attn.q.weight``,
``block1.mlp.fc1.weight``, ``block1.token_mlp.fc2.bias``. A block is a :class:`Composite`
layer: its sub-layers are ordinary Bayesian layers whose ``site`` is the path, and
``BayesianNetwork.param_sites`` lists them (``leaves()``), so summaries, rules and diagnostics
see ``block1.mlp.fc1`` as a layer with its own units.

Local reparameterisation (Kingma, Salimans & Welling 2015) is used wherever the guide allows
it: every projection is a Linear map on the last dim, LayerNorm's gain and bias act
element-wise, and the embeddings add a Gaussian. Pre-activations are drawn independently per
token (per channel for token mixing): the marginal of each pre-activation is exact, the
correlation between tokens that share a weight is dropped, the same approximation as for
convolutions (Molchanov et al. 2017). A recipe with ``local_reparam: false`` samples weights
instead (exact, noisier). The position embedding and the class token are used once per
example, so for them per-example draws are exact.

Compaction: each layer here compacts itself (:class:`SelfCompaction`, its part of the protocol
of :mod:`pyro_sparse.compaction_protocol`): attention heads and MLP hidden units go by the rules in
:mod:`pyro_sparse.reduction.heads`, and ``build_compact`` rebuilds the compact module.
"""

from __future__ import annotations

import math
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from .compaction_protocol import Compaction
from .layers import Layer, Linear, _Parametric, _Stateless, image_channels, last_dim
from .local_reparam import GaussianWeight, _sample_preactivation, _split, gaussian_conv, gaussian_linear
from .priors import Gaussian, build_prior
from .schema import Field

__all__ = [
    "Composite", "LayerNorm", "PatchEmbed", "ClassToken", "PosEmbed", "QKVProjection", "OutProjection",
    "MultiHeadSelfAttention", "MLP", "TransformerBlock", "MixerBlock", "TokenPool", "ACTIVATIONS",
    "attention", "transformer_block", "mixer_block",
    "SplitHeads", "MergeHeads", "AttentionModule", "MLPModule", "TransformerBlockModule", "MixerBlockModule",
    "TorchMultiheadAttention", "CompactMultiheadAttention", "multihead_attention",
]

#: element-wise activations of the MLPs (``activation`` option); GELU is the exact (erf) one
ACTIVATIONS = {"gelu": F.gelu, "relu": F.relu, "tanh": torch.tanh}


# =========================================================================== checks


def _positive_int(owner, name, value):
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{owner} {name} must be a positive integer, got {value!r}")
    return value


def _flag(owner, name, value):
    if not isinstance(value, bool):
        raise ValueError(f"{owner} {name} must be true or false, got {value!r}")
    return value


def _activation_name(owner, value):
    if value not in ACTIVATIONS:
        raise ValueError(f"{owner} activation must be one of {sorted(ACTIVATIONS)}, got {value!r}")
    return value


def _positive_float(owner, name, value):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0 or math.isinf(value):
        raise ValueError(f"{owner} {name} must be a positive number, got {value!r}")
    return float(value)


def _sequence_shape(owner, in_shape, dim=None):
    if len(in_shape) != 2 or (dim is not None and in_shape[-1] != dim):
        want = f"(tokens, {dim})" if dim is not None else "(tokens, features)"
        raise ValueError(f"{owner} expects sequence inputs of shape {want}, got {tuple(in_shape)}")
    return tuple(in_shape)


# =========================================================================== the maths


def _reshape(param, shape):
    """A tensor or a :class:`GaussianWeight` viewed with another shape."""
    if param is None:
        return None
    if isinstance(param, GaussianWeight):
        return GaussianWeight(param.loc.reshape(shape), param.var.reshape(shape))
    return param.reshape(shape)


def gaussian_elementwise(x, gain=None, bias=None):
    r"""``x * g + b`` for ``g, b`` that may be :class:`GaussianWeight` (one draw per element):
    mean :math:`x\mu_g + \mu_b`, variance :math:`x^2\sigma_g^2 + \sigma_b^2`."""
    g_mean, g_var = _split(gain)
    b_mean, b_var = _split(bias)
    mean = x * g_mean if g_mean is not None else x
    if b_mean is not None:
        mean = mean + b_mean
    if g_var is None and b_var is None:
        return mean
    var = x * x * g_var if g_var is not None else torch.zeros_like(mean)
    if b_var is not None:
        var = var + b_var
    return _sample_preactivation(mean, var)


def attention(q, k, v, scale):
    r"""Scaled dot-product attention per head: ``(B, T, H, d)`` each -> ``(B, T, H, d)``,

    .. math:: \mathrm{head}_h = \mathrm{softmax}(q_h k_h^\top \cdot \mathrm{scale})\, v_h

    with ``scale = 1/sqrt(d)`` in a transformer. Zero heads give a ``(B, T, 0, d)`` result."""
    scores = torch.einsum("bthd,bshd->bhts", q, k) * scale
    return torch.einsum("bhts,bshd->bthd", scores.softmax(dim=-1), v)


def multihead_attention(q, k, v, scale, attn_mask=None, key_padding_mask=None, is_causal=False, dropout=0.0,
                        training=False, head_index=None):
    r"""Scaled dot-product attention with the masks of ``torch.nn.MultiheadAttention``: ``q``
    ``(B, L, H, d)``, ``k`` and ``v`` ``(B, S, H, d)`` -> heads ``(B, L, H, d)`` and the attention
    weights ``(B, H, L, S)``,

    .. math:: \mathrm{head}_h = \mathrm{dropout}\big(\mathrm{softmax}(q_h k_h^\top \cdot
              \mathrm{scale} + M_h)\big)\, v_h

    (Vaswani et al. 2017), ``M`` the sum of ``attn_mask`` (``(L, S)``, or ``(B * H0, L, S)`` per
    head) and ``key_padding_mask`` (``(B, S)``): a boolean mask is ``-inf`` where True, a float
    mask is added; ``is_causal`` without ``attn_mask`` masks the future. ``head_index``: the
    original indices of these heads among the ``H0`` a per-head ``attn_mask`` was written for (a
    compact attention with heads removed); ``dropout`` (on the weights) acts in ``training`` only."""
    B, L, H, _ = q.shape
    S = k.shape[1]
    scores = torch.einsum("blhd,bshd->bhls", q, k) * scale
    if attn_mask is None and is_causal:
        attn_mask = torch.ones(L, S, dtype=torch.bool, device=q.device).triu(1)
    if attn_mask is not None:
        mask = _additive(attn_mask, scores.dtype)
        if mask.dim() == 3:
            mask = mask.reshape(B, -1, L, S)
            if head_index is not None:
                mask = mask[:, head_index]
        scores = scores + mask
    if key_padding_mask is not None:
        scores = scores + _additive(key_padding_mask, scores.dtype)[:, None, None, :]
    weights = scores.softmax(dim=-1)
    if dropout and training:
        weights = F.dropout(weights, dropout, True)
    return torch.einsum("bhls,bshd->blhd", weights, v), weights


def _additive(mask, dtype):
    """A boolean mask (True: not attended) as ``-inf``/0, a float mask as it is."""
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(mask, float("-inf"))
    return mask.to(dtype)


def _mha_inputs(query, key, value, batch_first):
    """``torch.nn.MultiheadAttention``'s inputs as batch-first ``(B, L, E)`` tensors, and whether they
    came unbatched (``(L, E)``)."""
    unbatched = query.dim() == 2
    if unbatched:
        return query.unsqueeze(0), key.unsqueeze(0), value.unsqueeze(0), True
    if not batch_first:
        query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
    return query, key, value, False


def _mha_outputs(out, weights, batch_first, unbatched, need_weights, average):
    """``(output, weights or None)`` in the layout of ``torch.nn.MultiheadAttention``."""
    if need_weights:
        weights = weights.mean(dim=1) if average else weights
        weights = weights.squeeze(0) if unbatched else weights
    else:
        weights = None
    if unbatched:
        return out.squeeze(0), weights
    return (out if batch_first else out.transpose(0, 1)), weights


def transformer_block(x, ln1, attn, ln2, mlp):
    """The pre-LN encoder block: ``x + attn(ln1(x))`` then ``+ mlp(ln2(.))`` (Xiong et al. 2020)."""
    x = x + attn(ln1(x))
    return x + mlp(ln2(x))


def mixer_block(x, ln1, token_mlp, ln2, channel_mlp):
    """The Mixer block: token mixing on ``(B, D, T)`` then channel mixing (Tolstikhin et al. 2021)."""
    x = x + token_mlp(ln1(x).transpose(1, 2)).transpose(1, 2)
    return x + channel_mlp(ln2(x))


# =========================================================================== plain torch modules
# What ``deterministic(params)`` and ``build_compact(entry)`` return: the parameter names inside
# these modules equal the site names relative to the layer (``attn.q.weight``).


def _parameter(t):
    return nn.Parameter(t.detach().clone(), requires_grad=True)


class SplitHeads(nn.Module):
    """q/k/v projection: weight ``(H, d, D)``, bias ``(H, d)``; ``(..., D) -> (..., H, d)``."""

    def __init__(self, weight, bias=None):
        super().__init__()
        self.weight = _parameter(weight)
        self.bias = _parameter(bias) if bias is not None else None

    def forward(self, x):
        h, d, dim = self.weight.shape
        b = self.bias.reshape(h * d) if self.bias is not None else None
        return F.linear(x, self.weight.reshape(h * d, dim), b).unflatten(-1, (h, d))


class MergeHeads(nn.Module):
    """Output projection: weight ``(D, H, d)``, bias ``(D,)``; ``(..., H, d) -> (..., D)``."""

    def __init__(self, weight, bias=None):
        super().__init__()
        self.weight = _parameter(weight)
        self.bias = _parameter(bias) if bias is not None else None

    def forward(self, x):
        dim = self.weight.shape[0]
        return F.linear(x.flatten(-2), self.weight.reshape(dim, -1), self.bias)


class AttentionModule(nn.Module):
    """Plain multi-head self-attention with :class:`SplitHeads` q, k, v and :class:`MergeHeads` o."""

    def __init__(self, q, k, v, o, scale):
        super().__init__()
        self.q, self.k, self.v, self.o = q, k, v, o
        self.scale = float(scale)

    @property
    def heads(self):
        return self.q.weight.shape[0]

    def forward(self, x):
        return self.o(attention(self.q(x), self.k(x), self.v(x), self.scale))


class MLPModule(nn.Module):
    """Plain ``fc2(act(fc1(x)))``."""

    def __init__(self, fc1, fc2, activation="gelu"):
        super().__init__()
        self.fc1, self.fc2 = fc1, fc2
        self.activation = activation

    def forward(self, x):
        return self.fc2(ACTIVATIONS[self.activation](self.fc1(x)))


class TransformerBlockModule(nn.Module):
    """Plain pre-LN transformer encoder block (:func:`transformer_block`)."""

    def __init__(self, ln1, attn, ln2, mlp):
        super().__init__()
        self.ln1, self.attn, self.ln2, self.mlp = ln1, attn, ln2, mlp

    def forward(self, x):
        return transformer_block(x, self.ln1, self.attn, self.ln2, self.mlp)


class MixerBlockModule(nn.Module):
    """Plain MLP-Mixer block (:func:`mixer_block`)."""

    def __init__(self, ln1, token_mlp, ln2, channel_mlp):
        super().__init__()
        self.ln1, self.token_mlp, self.ln2, self.channel_mlp = ln1, token_mlp, ln2, channel_mlp

    def forward(self, x):
        return mixer_block(x, self.ln1, self.token_mlp, self.ln2, self.channel_mlp)


class PatchModule(nn.Module):
    """Plain patch embedding: conv with kernel = stride = p, then ``(B, D, h, w) -> (B, h*w, D)``."""

    def __init__(self, weight, bias=None):
        super().__init__()
        self.weight = _parameter(weight)
        self.bias = _parameter(bias) if bias is not None else None

    def forward(self, x):
        p = self.weight.shape[-1]
        return F.conv2d(x, self.weight, self.bias, stride=p).flatten(2).transpose(1, 2)


class AddEmbedding(nn.Module):
    """Plain ``x + weight`` (position embedding ``(T, D)``)."""

    def __init__(self, weight):
        super().__init__()
        self.weight = _parameter(weight)

    def forward(self, x):
        return x + self.weight


class PrependToken(nn.Module):
    """Plain class token: ``weight (1, D)`` prepended to every sequence."""

    def __init__(self, weight):
        super().__init__()
        self.weight = _parameter(weight)

    def forward(self, x):
        return torch.cat([self.weight.expand(x.shape[0], *self.weight.shape).to(x.dtype), x], dim=1)


class TokenPoolModule(nn.Module):
    """Mean over tokens, or the first (class) token."""

    def __init__(self, mode="mean"):
        super().__init__()
        self.mode = mode

    def forward(self, x):
        return x.mean(dim=1) if self.mode == "mean" else x[:, 0]


def _layer_norm_module(weight, bias, eps):
    m = nn.LayerNorm(weight.shape[0], eps=eps, bias=bias is not None, device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        m.weight.copy_(weight)
        if bias is not None:
            m.bias.copy_(bias)
    return m


def _linear_module(weight, bias):
    with warnings.catch_warnings():  # an MLP whose hidden units were all removed has no weights
        warnings.filterwarnings("ignore", "Initializing zero-element tensors")
        m = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device=weight.device,
                      dtype=weight.dtype)
    with torch.no_grad():
        m.weight.copy_(weight)
        if bias is not None:
            m.bias.copy_(bias)
    return m


# =========================================================================== compaction


def _mask(masks, name, like):
    m = masks.get(name)
    return torch.ones_like(like, dtype=torch.bool) if m is None else m.to(like.device).bool()


@torch.no_grad()
def attention_heads(values: dict, masks: dict) -> dict:
    r"""Plan the removal of attention heads (see :mod:`pyro_sparse.reduction.heads`).

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
    r"""Plan the removal of hidden units of ``fc2(act(fc1 x))`` (see :mod:`pyro_sparse.reduction.heads`).

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
        out = ACTIVATIONS[activation](b1)
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


def _sub(d: dict, prefix: str) -> dict:
    """The entries of ``d`` under ``prefix`` with the prefix stripped (all of ``d`` for "")."""
    if not prefix:
        return dict(d)
    n = len(prefix) + 1
    return {k[n:]: v for k, v in d.items() if k.startswith(prefix + ".")}


def _units_info(plan, total):
    return {"total": total, "kept": plan["keep"], "removed": total - len(plan["keep"]),
            "constant": len(plan["constant"]), "unread": len(plan["unread"])}


def _n(w, sparse):
    return int((w != 0).sum()) if sparse else w.numel()


def attention_flops(params: dict, tokens: int, sparse=False) -> int:
    """FLOPs per example of self-attention with parameters ``params`` (relative names) on
    ``tokens`` tokens (:mod:`pyro_sparse.reduction.heads`)."""
    h, d, _ = params["q.weight"].shape
    proj = sum(_n(params[f"{p}.weight"], sparse) for p in "qkvo")
    return 2 * tokens * proj + 4 * tokens * tokens * h * d


def mlp_flops(params: dict, prefix: str, positions: int, sparse=False) -> int:
    """FLOPs per example of the MLP at ``prefix`` applied at ``positions`` positions."""
    return 2 * positions * (_n(params[f"{prefix}.fc1.weight"], sparse) + _n(params[f"{prefix}.fc2.weight"], sparse))


class SelfCompaction(Compaction):
    """The compaction of a layer that compacts only itself (its input and output widths stay):
    :meth:`build` is the layer's ``compact_parts(values, masks)``."""

    def __init__(self, name, layer, values, masks, in_shape, out_shape):
        super().__init__(name, layer, in_shape, out_shape)
        self.values = {k: v.detach() * masks[k].to(v.dtype) if k in masks else v.detach() for k, v in values.items()}
        self.masks = masks

    def build(self):
        entry, params, info = self.layer.compact_parts(self.values, self.masks)
        info["flops"] = self.layer.flops(params, self.in_shape)
        info["flops_sparse"] = self.layer.flops(params, self.in_shape, sparse=True)
        return entry, params, info


class _Compactable:
    """The compaction protocol of the layers here (:mod:`pyro_sparse.compaction_protocol`): each compacts
    only itself (:class:`SelfCompaction`); ``compact_parts`` gives ``(entry, params, info)``
    (default: the same shape, the masked values), the class method ``build_compact(entry)``
    rebuilds the plain module and ``flops`` counts its cost."""

    def compaction(self, name, values, masks, in_shape, out_shape):
        return SelfCompaction(name, self, values, masks, in_shape, out_shape)

    def compact_parts(self, values: dict, masks: dict):
        return self.compact_spec(), {k: v.contiguous() for k, v in values.items()}, {}


def _compact_heads(layer_entry, values, masks, params, info, prefix=""):
    """Remove attention heads (:func:`attention_heads`) of the attention at ``prefix``."""
    sub = _sub(values, prefix)
    plan = attention_heads(sub, _sub(masks, prefix))
    for k in [k for k in params if not prefix or k.startswith(prefix + ".")]:
        del params[k]
    params.update({_join(prefix, k): v for k, v in plan["params"].items()})
    total = sub["v.weight"].shape[0]
    layer_entry["heads"] = len(plan["keep"])
    layer_entry["out_bias"] = _join(prefix, "o.bias") in params
    info.update({"heads_total": total, "heads_kept": plan["keep"],
                 "heads_removed": sorted(set(range(total)) - set(plan["keep"]))})
    if plan["folded"]:
        info.setdefault("folded", []).append(_join(prefix, "o"))


def _compact_units(layer_entry, values, masks, params, info, prefix, activation):
    """Remove hidden units (:func:`mlp_units`) of the MLP at ``prefix``."""
    sub = _sub(values, prefix)
    plan = mlp_units(sub, _sub(masks, prefix), activation)
    for k in [k for k in params if k.startswith(prefix + ".")]:
        del params[k]
    params.update({_join(prefix, k): v for k, v in plan["params"].items()})
    layer_entry[prefix] = len(plan["keep"])
    layer_entry[f"{prefix}_bias"] = f"{prefix}.fc1.bias" in params
    layer_entry[f"{prefix}_out_bias"] = f"{prefix}.fc2.bias" in params
    info.setdefault("units", {})[f"{prefix}.fc1"] = _units_info(plan, sub["fc1.weight"].shape[0])
    if plan["folded"]:
        info.setdefault("folded", []).append(f"{prefix}.fc2")


# =========================================================================== composite layers


class Composite(Layer):
    """A Bayesian layer made of named Bayesian sub-layers (``attn``, ``mlp``, ``ln1``, ...).

    The sub-layers' sites are ``<site>.<child>`` (set whenever ``site`` is), ``priors()``,
    ``param_shapes()`` and ``param_axes`` list their parameters by relative path
    (``attn.q.weight``), and :meth:`leaves` gives the Bayesian leaf layers (each with its own
    ``site`` and group axes), which is what ``BayesianNetwork.param_sites`` enumerates.
    """

    curvature = None  # not covered by the Laplace curvature

    @property
    def site(self):
        return self.__dict__.get("_site", self.prefix)

    @site.setter
    def site(self, value):
        self.__dict__["_site"] = value
        for name, child in self.sublayers().items():
            child.site = f"{value}.{name}"

    def sublayers(self) -> dict:
        """Direct sub-layers, in order (``name -> Layer``)."""
        return {n: m for n, m in self._modules.items() if isinstance(m, Layer)}

    def leaves(self) -> list:
        return [leaf for child in self.sublayers().values() for leaf in child.leaves() if leaf.priors()]

    def _flat(self, method):
        return {f"{n}.{p}": v for n, child in self.sublayers().items() for p, v in method(child).items()}

    def priors(self):
        return self._flat(lambda c: c.priors())

    def param_shapes(self):
        return self._flat(lambda c: c.param_shapes())

    @property
    def param_axes(self):
        return self._flat(lambda c: {p: c.param_axes[p] for p in c.priors()})

    def set_prior(self, param: str, prior):
        """Give the sub-layer's parameter ``param`` (``q.weight``) another prior."""
        child, _, name = param.partition(".")
        if child not in self.sublayers() or not name:
            raise ValueError(f"{type(self).__name__} has no parameter {param!r} (parameters: {sorted(self.priors())})")
        self.sublayers()[child].set_prior(name, prior)
        return self

    def _own(self, params, child):
        """The parameters of sub-layer ``child`` from the composite's (relative names)."""
        return {p: params[f"{child}.{p}"] for p in getattr(self, child).priors()}

    def _children_deterministic(self, params):
        return {n: c.deterministic(self._own(params, n)) for n, c in self.sublayers().items()}


def _prior_or(value, default):
    """``value`` if given, else ``default`` (None: the sub-layer's own default, a Gaussian)."""
    value = value if value is not None else default
    return build_prior(value) if value is not None else None


# =========================================================================== leaf layers


class LayerNorm(_Compactable, _Parametric):
    r"""Bayesian layer normalisation over the last dim (Ba, Kiros & Hinton 2016):
    :math:`y = g \odot (x - \bar x)/\sqrt{\mathrm{Var}(x) + \epsilon} + b`.

    Gain ``weight`` (prior ``prior``, default N(1, 1): the identity map a priori) and ``bias``
    (default N(0, 1)), both ``(D,)`` on the ``unit`` axis. Under local reparameterisation the
    output is drawn element-wise (:func:`gaussian_elementwise`)."""

    curvature = None  # not covered by the Laplace curvature

    spec_name = "layernorm"

    prefix = "ln"
    fields = {"dim": Field("size", "auto"), "eps": Field("float", 1e-5, positive=True),
              "bias": Field("bool", True),
              "gain_prior": Field("any", None, allow_none=True), "bias_prior": Field("any", None, allow_none=True)}
    param_axes = {"weight": {"unit": 0}, "bias": {"unit": 0}}

    def __init__(self, dim: int, eps: float = 1e-5, bias: bool = True, gain_prior=None, bias_prior=None):
        _positive_int("LayerNorm", "dim", dim)
        eps = _positive_float("LayerNorm", "eps", eps)
        _flag("LayerNorm", "bias", bias)
        gain_prior = gain_prior if gain_prior is not None else Gaussian(scale=1.0, loc=1.0)
        super().__init__(nn.LayerNorm(dim, eps=eps, bias=bias), gain_prior, bias_prior)
        self.dim, self.eps = dim, eps

    @classmethod
    def from_config(cls, cfg, in_shape):
        cfg = dict(cfg)
        return cls(last_dim(cfg.pop("dim"), in_shape, "dim"), **cfg)

    def out_shape(self, in_shape):
        if not in_shape or in_shape[-1] != self.dim:
            raise ValueError(f"LayerNorm expects inputs whose last dimension is {self.dim}, got {tuple(in_shape)}")
        return tuple(in_shape)

    def compute(self, x, gain, bias):
        return gaussian_elementwise(F.layer_norm(x, (self.dim,), eps=self.eps), gain, bias)

    def deterministic(self, params):
        return _layer_norm_module(params["weight"], params.get("bias"), self.eps)

    torch_types = (nn.LayerNorm,)

    @classmethod
    def from_torch(cls, module, priors):
        if len(module.normalized_shape) != 1 or not module.elementwise_affine:
            raise ValueError(f"nn.LayerNorm{tuple(module.normalized_shape)} (elementwise_affine="
                             f"{module.elementwise_affine}) has no Bayesian counterpart: one normalised dimension "
                             "with a gain is needed; leave it deterministic")
        layer = cls(module.normalized_shape[0], module.eps, bias=module.bias is not None,
                    gain_prior=priors.get("weight"), bias_prior=priors.get("bias"))
        return cls._converted(module, priors, layer)

    def compact_spec(self):
        return {"type": "layernorm", "dim": self.dim, "eps": self.eps, "bias": self.has_bias}

    @classmethod
    def build_compact(cls, entry):
        dim = entry["dim"]
        return _layer_norm_module(torch.ones(dim), torch.zeros(dim) if entry["bias"] else None, entry["eps"])

    def flops(self, params, in_shape, sparse=False):
        return 0  # element-wise, like activations (not counted)


class PatchEmbed(_Compactable, _Parametric):
    r"""Patch embedding ``(C, H, W) -> (T, D)``, ``T = (H/p)(W/p)`` (Dosovitskiy et al. 2021).

    Weight ``(D, C, p, p)`` (axes ``unit``/``channel`` 0, ``input`` 1), bias ``(D,)``. ``mode:
    conv`` runs a convolution with kernel = stride = p; ``mode: linear`` runs the same map as a
    Linear layer on the flattened patches (``F.unfold``, features in (c, i, j) order). Tokens are
    in row-major patch order."""

    curvature = None  # not covered by the Laplace curvature

    spec_name = "patch_embed"

    prefix = "patch"
    fields = {"in": Field("size", "auto"), "dim": Field("int", positive=True),
              "patch_size": Field("int", positive=True), "mode": Field("choice", "conv", choices=("conv", "linear")),
              "bias": Field("bool", True),
              "prior": Field("any", None, allow_none=True), "bias_prior": Field("any", None, allow_none=True)}
    param_axes = {"weight": {"unit": 0, "channel": 0, "input": 1}, "bias": {"unit": 0, "channel": 0}}

    def __init__(self, in_channels: int, dim: int, patch_size: int, mode: str = "conv", bias: bool = True,
                 prior=None, bias_prior=None):
        for name, v in (("in_channels", in_channels), ("dim", dim), ("patch_size", patch_size)):
            _positive_int("PatchEmbed", name, v)
        if mode not in ("conv", "linear"):
            raise ValueError(f"PatchEmbed mode must be 'conv' or 'linear', got {mode!r}")
        _flag("PatchEmbed", "bias", bias)
        super().__init__(nn.Conv2d(in_channels, dim, patch_size, patch_size, bias=bias), prior, bias_prior)
        self.in_channels, self.dim, self.patch_size, self.mode = in_channels, dim, patch_size, mode

    @classmethod
    def from_config(cls, cfg, in_shape):
        cfg = dict(cfg)
        return cls(image_channels(cfg.pop("in"), in_shape, "patch_embed"), cfg.pop("dim"), cfg.pop("patch_size"), **cfg)

    def out_shape(self, in_shape):
        if len(in_shape) != 3 or in_shape[0] != self.in_channels:
            raise ValueError(f"PatchEmbed expects input of shape ({self.in_channels}, height, width), "
                             f"got {tuple(in_shape)}")
        _, h, w = in_shape
        p = self.patch_size
        if h % p or w % p:
            raise ValueError(f"patch_size {p} does not divide the image size {h}x{w}")
        return ((h // p) * (w // p), self.dim)

    def compute(self, x, weight, bias):
        p = self.patch_size
        if self.mode == "conv":
            return gaussian_conv(x, weight, bias, stride=p).flatten(2).transpose(1, 2)
        patches = F.unfold(x, p, stride=p).transpose(1, 2)  # (B, T, C*p*p)
        return gaussian_linear(patches, _reshape(weight, (self.dim, -1)), bias)

    def deterministic(self, params):
        return PatchModule(params["weight"], params.get("bias"))

    def compact_spec(self):
        return {"type": "patch_embed", "in": self.in_channels, "dim": self.dim, "patch_size": self.patch_size,
                "bias": self.has_bias}

    @classmethod
    def build_compact(cls, entry):
        p = entry["patch_size"]
        return PatchModule(torch.empty(entry["dim"], entry["in"], p, p),
                           torch.empty(entry["dim"]) if entry["bias"] else None)

    def flops(self, params, in_shape, sparse=False):
        w = params["weight"]
        n = int((w != 0).sum()) if sparse else w.numel()
        return 2 * n * self.out_shape(in_shape)[0]


class _Embedding(_Compactable, Layer):
    """A Bayesian embedding tensor ``weight`` (axes ``token`` 0, ``unit`` 1), ViT initialisation
    N(0, 0.02^2) truncated at two standard deviations."""

    curvature = None  # not covered by the Laplace curvature

    fields = {"prior": Field("any", None, allow_none=True), "bias_prior": Field("any", None, allow_none=True)}
    param_axes = {"weight": {"token": 0, "unit": 1}}

    def __init__(self, shape, prior=None):
        super().__init__()
        self.prior = build_prior(prior if prior is not None else Gaussian())
        self.register_buffer("weight_init", nn.init.trunc_normal_(torch.empty(shape), std=0.02, a=-0.04, b=0.04),
                             persistent=False)

    @classmethod
    def from_config(cls, cfg, in_shape):
        cfg = dict(cfg)
        cfg.pop("bias_prior", None)  # an embedding has no bias (the spec's default bias prior lands here)
        return cls(*cls.sizes(_sequence_shape(cls.__name__, in_shape)), **cfg)

    def priors(self):
        return {"weight": self.prior}

    def sample_embedding(self, batch):
        """The embedding, one draw per example under local reparameterisation: ``(B|1, *shape)``."""
        w = self.prior.sample(f"{self.site}.weight", self.weight_init, self.param_axes["weight"])
        if isinstance(w, GaussianWeight):
            noise = torch.randn((batch, *w.loc.shape), dtype=w.loc.dtype, device=w.loc.device)
            return w.loc + w.var.clamp_min(1e-16).sqrt() * noise
        return w.unsqueeze(0)

    def flops(self, params, in_shape, sparse=False):
        return 0


class PosEmbed(_Embedding):
    """Learned position embedding: ``x + E``, ``E`` of shape ``(T, D)``."""

    spec_name = "pos_embed"

    prefix = "pos"

    @staticmethod
    def sizes(in_shape):
        return in_shape

    def __init__(self, tokens: int, dim: int, prior=None):
        _positive_int("PosEmbed", "tokens", tokens)
        _positive_int("PosEmbed", "dim", dim)
        super().__init__((tokens, dim), prior)
        self.tokens, self.dim = tokens, dim

    def out_shape(self, in_shape):
        _sequence_shape("PosEmbed", in_shape)
        if tuple(in_shape) != (self.tokens, self.dim):
            raise ValueError(f"PosEmbed expects inputs of shape ({self.tokens}, {self.dim}), got {tuple(in_shape)}")
        return tuple(in_shape)

    def forward(self, x):
        return x + self.sample_embedding(x.shape[0])

    def deterministic(self, params):
        return AddEmbedding(params["weight"])

    def compact_spec(self):
        return {"type": "pos_embed", "tokens": self.tokens, "dim": self.dim}

    @classmethod
    def build_compact(cls, entry):
        return AddEmbedding(torch.empty(entry["tokens"], entry["dim"]))


class ClassToken(_Embedding):
    """A learned class token ``(1, D)`` prepended to every sequence: ``(T, D) -> (T + 1, D)``."""

    spec_name = "class_token"

    prefix = "cls"

    @staticmethod
    def sizes(in_shape):
        return (in_shape[-1],)

    def __init__(self, dim: int, prior=None):
        _positive_int("ClassToken", "dim", dim)
        super().__init__((1, dim), prior)
        self.dim = dim

    def out_shape(self, in_shape):
        _sequence_shape("ClassToken", in_shape, self.dim)
        return (in_shape[0] + 1, self.dim)

    def forward(self, x):
        token = self.sample_embedding(x.shape[0]).expand(x.shape[0], 1, self.dim)
        return torch.cat([token.to(x.dtype), x], dim=1)

    def deterministic(self, params):
        return PrependToken(params["weight"])

    def compact_spec(self):
        return {"type": "class_token", "dim": self.dim}

    @classmethod
    def build_compact(cls, entry):
        return PrependToken(torch.empty(1, entry["dim"]))


class TokenPool(_Stateless):
    """Global average pooling over tokens (``mode: mean``) or the class token (``mode: cls``)."""

    spec_name = "token_pool"

    prefix = "pool"
    fields = {"mode": Field("choice", "mean", choices=("mean", "cls"))}

    def __init__(self, mode="mean"):
        if mode not in ("mean", "cls"):
            raise ValueError(f"token_pool mode must be 'mean' or 'cls', got {mode!r}")
        super().__init__(mode=mode)

    def _module(self):
        return TokenPoolModule(self.options["mode"])

    def out_shape(self, in_shape):
        _sequence_shape("TokenPool", in_shape)
        return (in_shape[-1],)


class QKVProjection(_Parametric):
    """Bayesian query/key/value projection: a Linear map ``D -> H*d`` whose weight is kept as
    ``(H, d, D)`` (axes ``head`` 0, ``input`` 2) and bias as ``(H, d)`` (``head`` 0), so priors
    can group by head. Output ``(..., H, d)``."""

    curvature = None  # not covered by the Laplace curvature

    prefix = "q"
    param_axes = {"weight": {"head": 0, "input": 2}, "bias": {"head": 0}}
    readable = ()  # its weight is (H, d, D), not a torch module's layout

    def __init__(self, dim, heads, head_dim, bias=True, prior=None, bias_prior=None):
        super().__init__(nn.Linear(dim, heads * head_dim, bias=bias), prior, bias_prior)
        self.weight_init = self.weight_init.reshape(heads, head_dim, dim)
        if self.has_bias:
            self.bias_init = self.bias_init.reshape(heads, head_dim)
        self.dim, self.heads, self.head_dim = dim, heads, head_dim

    def compute(self, x, weight, bias):
        hd = self.heads * self.head_dim
        out = gaussian_linear(x, _reshape(weight, (hd, self.dim)), _reshape(bias, (hd,)))
        return out.unflatten(-1, (self.heads, self.head_dim))

    def deterministic(self, params):
        return SplitHeads(params["weight"], params.get("bias"))


class OutProjection(_Parametric):
    """Bayesian output projection of attention: a Linear map ``H*d -> D`` whose weight is kept
    as ``(D, H, d)`` (axes ``unit`` 0, ``head`` 1); bias ``(D,)``. Input ``(..., H, d)``."""

    curvature = None  # not covered by the Laplace curvature

    prefix = "o"
    param_axes = {"weight": {"unit": 0, "head": 1}, "bias": {"unit": 0}}
    readable = ()

    def __init__(self, dim, heads, head_dim, bias=True, prior=None, bias_prior=None):
        super().__init__(nn.Linear(heads * head_dim, dim, bias=bias), prior, bias_prior)
        self.weight_init = self.weight_init.reshape(dim, heads, head_dim)
        self.dim, self.heads, self.head_dim = dim, heads, head_dim

    def compute(self, x, weight, bias):
        return gaussian_linear(x.flatten(-2), _reshape(weight, (self.dim, self.heads * self.head_dim)), bias)

    def deterministic(self, params):
        return MergeHeads(params["weight"], params.get("bias"))


# =========================================================================== composites


def _resolve_head_dim(owner, dim, heads, head_dim):
    _positive_int(owner, "heads", heads)
    if head_dim in (None, "auto"):
        if dim % heads:
            raise ValueError(f"{owner}: dim {dim} is not divisible by heads {heads}; give head_dim")
        return dim // heads
    return _positive_int(owner, "head_dim", head_dim)


class MultiHeadSelfAttention(_Compactable, Composite):
    """Bayesian multi-head self-attention ``(T, D) -> (T, D)`` (no residual; see
    :class:`TransformerBlock`). Sub-layers ``q``, ``k``, ``v`` (:class:`QKVProjection`) and ``o``
    (:class:`OutProjection`); ``prior``/``bias_prior`` apply to all four."""

    spec_name = "self_attention"

    prefix = "attn"
    fields = {"dim": Field("size", "auto"), "heads": Field("int", positive=True), "head_dim": Field("size", "auto"),
              "bias": Field("bool", True),
              "prior": Field("any", None, allow_none=True), "bias_prior": Field("any", None, allow_none=True)}

    def __init__(self, dim: int, heads: int, head_dim="auto", bias: bool = True, prior=None, bias_prior=None):
        super().__init__()
        _positive_int("MultiHeadSelfAttention", "dim", dim)
        head_dim = _resolve_head_dim("MultiHeadSelfAttention", dim, heads, head_dim)
        _flag("MultiHeadSelfAttention", "bias", bias)
        for name in ("q", "k", "v"):
            setattr(self, name, QKVProjection(dim, heads, head_dim, bias, prior, bias_prior))
        self.o = OutProjection(dim, heads, head_dim, bias, prior, bias_prior)
        self.dim, self.heads, self.head_dim, self.has_bias = dim, heads, head_dim, bias
        self.scale = head_dim ** -0.5
        self.site = self.site

    @classmethod
    def from_config(cls, cfg, in_shape):
        cfg = dict(cfg)
        dim = cfg.pop("dim")
        if dim == "auto":
            dim = _sequence_shape("self_attention", in_shape)[-1]
        return cls(dim, **cfg)

    def out_shape(self, in_shape):
        return _sequence_shape("MultiHeadSelfAttention", in_shape, self.dim)

    def forward(self, x):
        return self.o(attention(self.q(x), self.k(x), self.v(x), self.scale))

    def deterministic(self, params):
        c = self._children_deterministic(params)
        return AttentionModule(c["q"], c["k"], c["v"], c["o"], self.scale)

    def compact_spec(self):
        return {"type": "self_attention", "dim": self.dim, "heads": self.heads, "head_dim": self.head_dim,
                "bias": self.has_bias}

    @classmethod
    def build_compact(cls, entry):
        return _attention_from_entry(entry)

    def compact_parts(self, values, masks):
        entry, params, info = self.compact_spec(), dict(values), {}
        _compact_heads(entry, values, masks, params, info)
        return entry, params, info

    def flops(self, params, in_shape, sparse=False):
        return attention_flops(params, in_shape[0], sparse)


def _attention_from_entry(entry):
    dim, heads, hd = entry["dim"], entry["heads"], entry["head_dim"]
    bias = entry["bias"]

    def split():
        return SplitHeads(torch.empty(heads, hd, dim), torch.empty(heads, hd) if bias else None)

    out_bias = entry.get("out_bias", bias)
    return AttentionModule(split(), split(), split(),
                           MergeHeads(torch.empty(dim, heads, hd), torch.empty(dim) if out_bias else None),
                           entry.get("scale", hd ** -0.5))


class MLP(Composite):
    """Bayesian two-layer perceptron ``fc2(act(fc1(x)))`` on the last dim: ``in -> hidden -> out``."""

    prefix = "mlp"

    def __init__(self, in_features, hidden, out_features=None, activation="gelu", bias=True, prior=None,
                 bias_prior=None):
        super().__init__()
        out_features = in_features if out_features is None else out_features
        _activation_name("MLP", activation)
        self.fc1 = Linear(in_features, hidden, bias, prior, bias_prior)
        self.fc2 = Linear(hidden, out_features, bias, prior, bias_prior)
        self.activation = activation
        self.site = self.site

    def forward(self, x):
        return self.fc2(ACTIVATIONS[self.activation](self.fc1(x)))

    def deterministic(self, params):
        c = self._children_deterministic(params)
        return MLPModule(c["fc1"], c["fc2"], self.activation)


def _mlp_from_entry(entry, key):
    size_in, hidden, size_out = entry[f"{key}_in"], entry[key], entry[f"{key}_out"]
    b1, b2 = entry.get(f"{key}_bias", entry["bias"]), entry.get(f"{key}_out_bias", entry["bias"])
    fc1 = _linear_module(torch.empty(hidden, size_in), torch.empty(hidden) if b1 else None)
    fc2 = _linear_module(torch.empty(size_out, hidden), torch.empty(size_out) if b2 else None)
    return MLPModule(fc1, fc2, entry["activation"])


_NORM_FIELDS = {"eps": Field("float", 1e-5, positive=True),
                "norm_prior": Field("any", None, allow_none=True),
                "norm_bias_prior": Field("any", None, allow_none=True)}


def _norm(dim, eps, norm_prior, norm_bias_prior):
    return LayerNorm(dim, eps, True, norm_prior, norm_bias_prior)


class TransformerBlock(_Compactable, Composite):
    r"""Bayesian pre-LN transformer encoder block on ``(T, D)`` (:func:`transformer_block`).

    Sub-layers ``ln1``, ``attn`` (:class:`MultiHeadSelfAttention`, ``heads`` heads of width
    ``head_dim``, default D/heads), ``ln2``, ``mlp`` (``D -> mlp -> D``, ``activation``).
    Priors: ``attn_prior`` for q/k/v/o weights, ``mlp_prior`` for fc1/fc2 weights (both default
    to ``prior``, the spec's default weight prior), ``bias_prior`` for every projection bias,
    ``norm_prior``/``norm_bias_prior`` for the LayerNorm gains/biases (default N(1, 1), N(0, 1)).
    """

    spec_name = "transformer_block"

    prefix = "block"
    fields = {"dim": Field("size", "auto"), "heads": Field("int", positive=True), "head_dim": Field("size", "auto"),
              "mlp": Field("int", positive=True), "activation": Field("choice", "gelu", choices=tuple(ACTIVATIONS)),
              "bias": Field("bool", True), **_NORM_FIELDS,
              "prior": Field("any", None, allow_none=True), "bias_prior": Field("any", None, allow_none=True),
              "attn_prior": Field("any", None, allow_none=True), "mlp_prior": Field("any", None, allow_none=True)}

    def __init__(self, dim: int, heads: int, mlp: int, head_dim="auto", activation="gelu", bias=True, eps=1e-5,
                 prior=None, bias_prior=None, attn_prior=None, mlp_prior=None, norm_prior=None,
                 norm_bias_prior=None):
        super().__init__()
        _positive_int("TransformerBlock", "dim", dim)
        _positive_int("TransformerBlock", "mlp", mlp)
        _flag("TransformerBlock", "bias", bias)
        self.ln1 = _norm(dim, eps, norm_prior, norm_bias_prior)
        self.attn = MultiHeadSelfAttention(dim, heads, head_dim, bias, _prior_or(attn_prior, prior), bias_prior)
        self.ln2 = _norm(dim, eps, norm_prior, norm_bias_prior)
        self.mlp = MLP(dim, mlp, dim, activation, bias, _prior_or(mlp_prior, prior), bias_prior)
        self.dim, self.heads, self.head_dim, self.hidden = dim, heads, self.attn.head_dim, mlp
        self.activation, self.has_bias, self.eps = activation, bias, self.ln1.eps
        self.site = self.site

    @classmethod
    def from_config(cls, cfg, in_shape):
        cfg = dict(cfg)
        dim = cfg.pop("dim")
        if dim == "auto":
            dim = _sequence_shape("transformer_block", in_shape)[-1]
        return cls(dim, cfg.pop("heads"), cfg.pop("mlp"), **cfg)

    def out_shape(self, in_shape):
        return _sequence_shape("TransformerBlock", in_shape, self.dim)

    def forward(self, x):
        return transformer_block(x, self.ln1, self.attn, self.ln2, self.mlp)

    def deterministic(self, params):
        c = self._children_deterministic(params)
        return TransformerBlockModule(c["ln1"], c["attn"], c["ln2"], c["mlp"])

    def compact_spec(self):
        return {"type": "transformer_block", "dim": self.dim, "heads": self.heads, "head_dim": self.head_dim,
                "mlp": self.hidden, "mlp_in": self.dim, "mlp_out": self.dim, "activation": self.activation,
                "bias": self.has_bias, "eps": self.eps}

    @classmethod
    def build_compact(cls, entry):
        dim, eps = entry["dim"], entry["eps"]
        attn = _attention_from_entry({**entry, "out_bias": entry.get("out_bias", entry["bias"])})
        return TransformerBlockModule(_layer_norm_module(torch.ones(dim), torch.zeros(dim), eps), attn,
                                      _layer_norm_module(torch.ones(dim), torch.zeros(dim), eps),
                                      _mlp_from_entry(entry, "mlp"))

    def compact_parts(self, values, masks):
        entry, params, info = self.compact_spec(), dict(values), {}
        _compact_heads(entry, values, masks, params, info, "attn")
        _compact_units(entry, values, masks, params, info, "mlp", self.activation)
        return entry, params, info

    def flops(self, params, in_shape, sparse=False):
        tokens = in_shape[0]
        return attention_flops(_sub(params, "attn"), tokens, sparse) + mlp_flops(params, "mlp", tokens, sparse)


class MixerBlock(_Compactable, Composite):
    r"""Bayesian MLP-Mixer block on ``(T, D)`` (:func:`mixer_block`; Tolstikhin et al. 2021).

    Sub-layers ``ln1``, ``token_mlp`` (``T -> token_mlp -> T``, applied to every channel),
    ``ln2``, ``channel_mlp`` (``D -> channel_mlp -> D``, applied to every token). Priors:
    ``token_prior``/``channel_prior`` for the two MLPs' weights (default ``prior``),
    ``bias_prior``, ``norm_prior``/``norm_bias_prior`` as in :class:`TransformerBlock`.
    """

    spec_name = "mixer_block"

    prefix = "block"
    fields = {"tokens": Field("size", "auto"), "dim": Field("size", "auto"),
              "token_mlp": Field("int", positive=True), "channel_mlp": Field("int", positive=True),
              "activation": Field("choice", "gelu", choices=tuple(ACTIVATIONS)), "bias": Field("bool", True),
              **_NORM_FIELDS,
              "prior": Field("any", None, allow_none=True), "bias_prior": Field("any", None, allow_none=True),
              "token_prior": Field("any", None, allow_none=True), "channel_prior": Field("any", None, allow_none=True)}

    def __init__(self, tokens: int, dim: int, token_mlp: int, channel_mlp: int, activation="gelu", bias=True,
                 eps=1e-5, prior=None, bias_prior=None, token_prior=None, channel_prior=None, norm_prior=None,
                 norm_bias_prior=None):
        super().__init__()
        for name, v in (("tokens", tokens), ("dim", dim), ("token_mlp", token_mlp), ("channel_mlp", channel_mlp)):
            _positive_int("MixerBlock", name, v)
        _flag("MixerBlock", "bias", bias)
        self.ln1 = _norm(dim, eps, norm_prior, norm_bias_prior)
        self.token_mlp = MLP(tokens, token_mlp, tokens, activation, bias, _prior_or(token_prior, prior), bias_prior)
        self.ln2 = _norm(dim, eps, norm_prior, norm_bias_prior)
        self.channel_mlp = MLP(dim, channel_mlp, dim, activation, bias, _prior_or(channel_prior, prior), bias_prior)
        self.tokens, self.dim, self.token_hidden, self.channel_hidden = tokens, dim, token_mlp, channel_mlp
        self.activation, self.has_bias, self.eps = activation, bias, self.ln1.eps
        self.site = self.site

    @classmethod
    def from_config(cls, cfg, in_shape):
        cfg = dict(cfg)
        tokens, dim = cfg.pop("tokens"), cfg.pop("dim")
        if tokens == "auto" or dim == "auto":
            _sequence_shape("mixer_block", in_shape)
        tokens = in_shape[0] if tokens == "auto" else tokens
        dim = in_shape[-1] if dim == "auto" else dim
        return cls(tokens, dim, cfg.pop("token_mlp"), cfg.pop("channel_mlp"), **cfg)

    def out_shape(self, in_shape):
        _sequence_shape("MixerBlock", in_shape)
        if tuple(in_shape) != (self.tokens, self.dim):
            raise ValueError(f"MixerBlock expects inputs of shape ({self.tokens}, {self.dim}), got {tuple(in_shape)}")
        return tuple(in_shape)

    def forward(self, x):
        return mixer_block(x, self.ln1, self.token_mlp, self.ln2, self.channel_mlp)

    def deterministic(self, params):
        c = self._children_deterministic(params)
        return MixerBlockModule(c["ln1"], c["token_mlp"], c["ln2"], c["channel_mlp"])

    def compact_spec(self):
        return {"type": "mixer_block", "tokens": self.tokens, "dim": self.dim,
                "token_mlp": self.token_hidden, "token_mlp_in": self.tokens, "token_mlp_out": self.tokens,
                "channel_mlp": self.channel_hidden, "channel_mlp_in": self.dim, "channel_mlp_out": self.dim,
                "activation": self.activation, "bias": self.has_bias, "eps": self.eps}

    @classmethod
    def build_compact(cls, entry):
        dim, eps = entry["dim"], entry["eps"]
        return MixerBlockModule(_layer_norm_module(torch.ones(dim), torch.zeros(dim), eps),
                                _mlp_from_entry(entry, "token_mlp"),
                                _layer_norm_module(torch.ones(dim), torch.zeros(dim), eps),
                                _mlp_from_entry(entry, "channel_mlp"))

    def compact_parts(self, values, masks):
        entry, params, info = self.compact_spec(), dict(values), {}
        _compact_units(entry, values, masks, params, info, "token_mlp", self.activation)
        _compact_units(entry, values, masks, params, info, "channel_mlp", self.activation)
        return entry, params, info

    def flops(self, params, in_shape, sparse=False):
        tokens, dim = in_shape  # token mixing runs once per channel, channel mixing once per token
        return mlp_flops(params, "token_mlp", dim, sparse) + mlp_flops(params, "channel_mlp", tokens, sparse)


# =========================================================================== torch.nn.MultiheadAttention


class TorchMultiheadAttention(Composite):
    r"""The Bayesian counterpart of ``torch.nn.MultiheadAttention`` (what
    :func:`pyro_sparse.bayesian` puts in its place, so ``nn.TransformerEncoderLayer`` models convert),
    with the torch interface: ``attn_output, attn_weights = self.attn(query, key, value,
    key_padding_mask=None, need_weights=True, attn_mask=None, average_attn_weights=True,
    is_causal=False)``, batch-first or not, batched or not, attention dropout in training mode.

    Maths (:func:`multihead_attention`): H heads of width d = E / H, each projection a Bayesian
    linear map under local reparameterisation. Sites: ``<path>.q.weight`` ``(H, d, E)`` and
    ``q.bias`` ``(H, d)`` (k, v alike, of width ``kdim``/``vdim``), split from torch's
    ``in_proj_weight``/``in_proj_bias`` (or ``q_proj_weight`` ...), and ``<path>.o.weight``
    ``(E, H, d)``, ``o.bias`` ``(E,)`` from ``out_proj``. The head is an axis of every projection
    (q, k, v: ``head`` 0, ``input`` 2; o: ``unit`` 0, ``head`` 1), so a prior may group by head
    (``{type: group_log_uniform, group: head}``, whose rule ``group-log-alpha`` then removes
    heads), as in :class:`MultiHeadSelfAttention`.

    Compaction deletes the heads whose values are all pruned (their constant output folded into
    ``o``'s bias) or that ``o`` no longer reads (:func:`attention_heads`), and the compact module
    (:class:`CompactMultiheadAttention`) keeps the torch interface. ``add_bias_kv`` and
    ``add_zero_attn`` have no counterpart (ValueError)."""

    spec_name = "torch_multihead_attention"
    prefix = "attn"
    torch_types = (nn.MultiheadAttention,)

    def __init__(self, embed_dim, num_heads, kdim=None, vdim=None, bias=True, dropout=0.0, batch_first=False,
                 prior=None, bias_prior=None):
        super().__init__()
        head_dim = _resolve_head_dim("MultiheadAttention", embed_dim, num_heads, "auto")
        kdim, vdim = kdim or embed_dim, vdim or embed_dim
        for name, dim in (("q", embed_dim), ("k", kdim), ("v", vdim)):
            setattr(self, name, QKVProjection(dim, num_heads, head_dim, bias, prior, bias_prior))
        self.o = OutProjection(embed_dim, num_heads, head_dim, bias, prior, bias_prior)
        self.embed_dim, self.num_heads, self.head_dim, self.kdim, self.vdim = embed_dim, num_heads, head_dim, kdim, vdim
        self.has_bias, self.dropout, self.batch_first = bias, float(dropout), bool(batch_first)
        self.scale = head_dim ** -0.5
        self.site = self.site

    @classmethod
    def from_torch(cls, module, priors):
        if module.bias_k is not None or module.add_zero_attn:
            raise ValueError("nn.MultiheadAttention with add_bias_kv or add_zero_attn has no Bayesian counterpart; "
                             "leave it deterministic")
        bias = module.in_proj_bias is not None
        if bias != (module.out_proj.bias is not None):
            raise ValueError("nn.MultiheadAttention with a bias on only one of in_proj and out_proj has no Bayesian "
                             "counterpart; leave it deterministic")
        layer = cls(module.embed_dim, module.num_heads, module.kdim, module.vdim, bias, module.dropout,
                    module.batch_first, priors.get("weight"), priors.get("bias"))
        values = layer.torch_values(module)
        for name, child in layer.sublayers().items():
            child.start_at({p: values[f"{name}.{p}"] for p in child.priors()})
        return layer

    def torch_values(self, module):
        H, d, E = self.num_heads, self.head_dim, self.embed_dim
        if module._qkv_same_embed_dim:
            weights = module.in_proj_weight.detach().chunk(3)
        else:
            weights = (module.q_proj_weight.detach(), module.k_proj_weight.detach(), module.v_proj_weight.detach())
        out = {f"{n}.weight": w.reshape(H, d, -1) for n, w in zip("qkv", weights)}
        out["o.weight"] = module.out_proj.weight.detach().reshape(E, H, d)
        if self.has_bias:
            out.update({f"{n}.bias": b.reshape(H, d) for n, b in zip("qkv", module.in_proj_bias.detach().chunk(3))})
            out["o.bias"] = module.out_proj.bias.detach()
        return {k: v for k, v in out.items() if k in self.priors()}

    @torch.no_grad()
    def write_torch(self, module, params):
        E = self.embed_dim
        w = [params[f"{n}.weight"].reshape(E, -1) for n in "qkv"]
        if module._qkv_same_embed_dim:
            module.in_proj_weight.copy_(torch.cat(w))
        else:
            for n, value in zip("qkv", w):
                getattr(module, f"{n}_proj_weight").copy_(value)
        module.out_proj.weight.copy_(params["o.weight"].reshape(E, E))
        if self.has_bias:
            module.in_proj_bias.copy_(torch.cat([params[f"{n}.bias"].reshape(E) for n in "qkv"]))
            module.out_proj.bias.copy_(params["o.bias"])

    def deterministic(self, params):
        ref = params["q.weight"]
        module = nn.MultiheadAttention(self.embed_dim, self.num_heads, self.dropout, self.has_bias, kdim=self.kdim,
                                       vdim=self.vdim, batch_first=self.batch_first, device=ref.device,
                                       dtype=ref.dtype)
        self.write_torch(module, params)
        return module

    def forward(self, query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
                average_attn_weights=True, is_causal=False):
        query, key, value, unbatched = _mha_inputs(query, key, value, self.batch_first)
        heads, weights = multihead_attention(self.q(query), self.k(key), self.v(value), self.scale, attn_mask,
                                             key_padding_mask, is_causal, self.dropout, self.training)
        return _mha_outputs(self.o(heads), weights, self.batch_first, unbatched, need_weights, average_attn_weights)

    def compact_module(self, values: dict, masks: dict, in_shape, out_shape):
        """``(entry, module, info)``: the :class:`CompactMultiheadAttention` at point ``values`` with
        keep ``masks`` (relative names), its heads planned by :func:`attention_heads`."""
        values = {k: v.detach() * masks[k].to(v.dtype) if k in masks else v.detach() for k, v in values.items()}
        plan = attention_heads(values, masks)
        p = plan["params"]
        module = CompactMultiheadAttention(SplitHeads(p["q.weight"], p.get("q.bias")),
                                           SplitHeads(p["k.weight"], p.get("k.bias")),
                                           SplitHeads(p["v.weight"], p.get("v.bias")),
                                           MergeHeads(p["o.weight"], p.get("o.bias")), self.scale, self.num_heads,
                                           plan["keep"], self.dropout, self.batch_first)
        entry = {"type": self.spec_name, "embed_dim": self.embed_dim, "kdim": self.kdim, "vdim": self.vdim,
                 "head_dim": self.head_dim, "heads_total": self.num_heads, "heads": len(plan["keep"]),
                 "bias": self.has_bias, "out_bias": "o.bias" in p, "dropout": self.dropout,
                 "batch_first": self.batch_first}
        tokens = in_shape[0] if len(in_shape) == 2 else 1
        info = {"heads_total": self.num_heads, "heads_kept": plan["keep"],
                "heads_removed": sorted(set(range(self.num_heads)) - set(plan["keep"])),
                "flops": attention_flops(p, tokens), "flops_sparse": attention_flops(p, tokens, sparse=True)}
        if plan["folded"]:
            info["folded"] = ["o"]
        return entry, module.eval(), info

    @classmethod
    def build_compact(cls, entry):
        return CompactMultiheadAttention.empty(entry)

    def flops(self, params, in_shape, sparse=False):
        return attention_flops(params, in_shape[0] if len(in_shape) == 2 else 1, sparse)


class CompactMultiheadAttention(nn.Module):
    """The compact form of a converted ``torch.nn.MultiheadAttention`` with the torch interface
    (:class:`TorchMultiheadAttention`): the kept heads' q/k/v (:class:`SplitHeads`) and the output
    projection over them (:class:`MergeHeads`); ``head_index`` the original indices of the kept
    heads (a per-head ``attn_mask`` is read at those), ``num_heads`` how many are left. Its
    ``in_proj_weight`` and ``in_proj_bias`` are None, which keeps ``nn.TransformerEncoderLayer``
    off its fused fast path (it runs this module instead)."""

    in_proj_weight = in_proj_bias = None
    _qkv_same_embed_dim = False

    def __init__(self, q, k, v, o, scale, heads_total, head_index, dropout=0.0, batch_first=False):
        super().__init__()
        self.q, self.k, self.v, self.o = q, k, v, o
        self.scale, self.heads_total, self.dropout = float(scale), int(heads_total), float(dropout)
        self.batch_first = bool(batch_first)
        self.register_buffer("head_index", torch.as_tensor(list(head_index), dtype=torch.long))

    @property
    def num_heads(self):
        return self.q.weight.shape[0]

    @property
    def embed_dim(self):
        return self.o.weight.shape[0]

    @classmethod
    def empty(cls, entry: dict):
        """Of the sizes of a compact entry (parameters uninitialised)."""
        heads, hd, dim = entry["heads"], entry["head_dim"], entry["embed_dim"]
        bias = entry["bias"]

        def split(width):
            return SplitHeads(torch.empty(heads, hd, width), torch.empty(heads, hd) if bias else None)

        return cls(split(dim), split(entry["kdim"]), split(entry["vdim"]),
                   MergeHeads(torch.empty(dim, heads, hd), torch.empty(dim) if entry["out_bias"] else None),
                   hd ** -0.5, entry["heads_total"], range(heads), entry["dropout"], entry["batch_first"])

    def forward(self, query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
                average_attn_weights=True, is_causal=False):
        query, key, value, unbatched = _mha_inputs(query, key, value, self.batch_first)
        index = self.head_index if self.num_heads != self.heads_total else None
        heads, weights = multihead_attention(self.q(query), self.k(key), self.v(value), self.scale, attn_mask,
                                             key_padding_mask, is_causal, self.dropout, self.training, index)
        return _mha_outputs(self.o(heads), weights, self.batch_first, unbatched, need_weights, average_attn_weights)
