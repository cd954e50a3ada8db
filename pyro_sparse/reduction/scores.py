r"""Pruning scores and the rules that turn scores into masks.

Scores read only the posterior summary (means, diagonal precisions). Mask builders take dicts
``name -> tensor`` and return dicts ``name -> bool tensor`` of the same shapes, True = keep.
Everything is vectorised: a selection over a million weights costs one ``kthvalue`` and a few
element-wise passes, never a per-weight Python loop.

- Optimal Posterior Damage (OPD; Dhahri, Immer, Charpentier, Günnemann, Fortuin 2024,
  "Shaving weights with Occam's razor: Bayesian sparsification for neural networks using the
  marginal likelihood", arXiv:2402.15978): :math:`s_i = P_{ii}\,\theta_i^2`, the OBD-like
  saliency with the Laplace posterior precision in place of the Hessian; for a group
  :math:`S_g = \sum_{i \in g} s_i`.
- Magnitude :math:`|\theta_i|` and uniform random scores as baselines.
- N:M patterns (:func:`mask_n_m`): keep the N highest-scoring of every M consecutive weights along
  the input dimension (2:4 is what sparse tensor cores execute: Mishra et al. 2021, "Accelerating
  Sparse Deep Neural Networks", arXiv:2104.08378; Zhou et al. 2021, "Learning N:M Fine-grained
  Structured Sparse Neural Networks From Scratch").
"""

import math
from numbers import Real

import torch

from ._common import check_no_nan, sum_over_groups

__all__ = [
    "opd_scores",
    "group_scores",
    "magnitude_scores",
    "random_scores",
    "mask_by_sparsity",
    "mask_by_threshold",
    "structured_mask",
    "mask_n_m",
    "parse_pattern",
]


# --------------------------------------------------------------------------- scores


def opd_scores(loc, precision):
    r"""Optimal Posterior Damage score :math:`s_i = P_{ii}\,\theta_i^2` (Dhahri et al. 2024).

    ``loc`` holds the posterior means (the MAP weights) :math:`\theta`; ``precision`` the
    diagonal of the posterior precision :math:`P = H + P_0` with the shape of ``loc`` (or
    broadcastable to it), or a full ``(..., n, n)`` precision for ``loc`` of shape
    ``(..., n)``, whose diagonal is used. A weight that is large *and* well determined
    scores high; low scores are pruned first.
    """
    loc = torch.as_tensor(loc)
    precision = torch.as_tensor(precision)
    if (
        loc.dim() >= 1
        and precision.dim() == loc.dim() + 1
        and precision.shape[-1] == precision.shape[-2] == loc.shape[-1]
    ):
        precision = torch.diagonal(precision, dim1=-2, dim2=-1)
    return precision * loc * loc


def group_scores(scores, dim=None, *, groups=None, num_groups=None, keepdim=False):
    r"""Group score :math:`S_g = \sum_{i \in g} s_i` (Dhahri et al. 2024, structured OPD).

    ``dim`` is summed over: a unit of a Linear weight ``(out, in)`` is ``dim=1``, a conv
    filter of ``(out, in, kh, kw)`` is ``dim=(1, 2, 3)``; the default (``None``) sums every
    dimension but the first, i.e. one group per output unit or filter. Alternatively
    ``groups`` is an integer tensor of group ids ``0..G-1`` giving a ``(G,)`` result.
    ``keepdim=True`` keeps the summed dimensions, so a group mask broadcasts back onto the
    weight.
    """
    return sum_over_groups(
        scores, dim=dim, groups=groups, num_groups=num_groups, keepdim=keepdim, name="scores"
    )


def magnitude_scores(loc):
    r"""Magnitude score :math:`|\theta_i|` (the classical pruning baseline)."""
    return torch.as_tensor(loc).abs()


def random_scores(shape, generator=None, *, dtype=None, device=None):
    """Uniform(0, 1) scores of the given shape: the random-pruning baseline.

    Pass a seeded ``torch.Generator`` for reproducible masks.
    """
    return torch.rand(shape, generator=generator, dtype=dtype, device=device)


# --------------------------------------------------------------------------- mask helpers


def _check_dict(name, values):
    if not isinstance(values, dict) or not values:
        raise ValueError(f"{name}: must be a non-empty dict name -> tensor, got {type(values).__name__}")
    out = {}
    for key, value in values.items():
        value = torch.as_tensor(value)
        if value.is_floating_point():
            check_no_nan(f"{name}[{key!r}]", value)
        elif value.dtype == torch.bool or value.is_complex():
            raise ValueError(f"{name}[{key!r}]: must be real numbers, got dtype {value.dtype}")
        out[key] = value
    return out


def _check_fraction(name, value):
    if isinstance(value, bool) or not isinstance(value, Real) or not 0.0 <= float(value) <= 1.0:
        raise ValueError(f"{name}: must be a number in [0, 1], got {value!r}")
    return float(value)


def _count(fraction, n):
    """Nearest integer to ``fraction * n`` (halves round up)."""
    return min(n, max(0, math.floor(fraction * n + 0.5)))


def _lowest(flat, k):
    """Bool mask of the ``k`` smallest entries of a 1-D tensor, ties broken by position.

    The threshold is the k-th smallest value (one ``kthvalue``); everything strictly below
    it is taken, and of the entries equal to it the first ones in index order until there
    are exactly ``k``.
    """
    n = flat.numel()
    if k <= 0:
        return torch.zeros(n, dtype=torch.bool, device=flat.device)
    if k >= n:
        return torch.ones(n, dtype=torch.bool, device=flat.device)
    t = torch.kthvalue(flat, k).values
    lowest = flat < t
    need = k - int(lowest.sum())
    tied = torch.nonzero(flat == t).squeeze(1)  # increasing positions
    lowest[tied[:need]] = True
    return lowest


# --------------------------------------------------------------------------- mask builders


def mask_by_sparsity(scores_dict, sparsity, scope="global"):
    """Keep the highest scores so that the removed fraction is as close as possible to ``sparsity``.

    ``scope="global"`` ranks all weights of all tensors together and removes
    ``round(sparsity * N)`` of them (N the total count); ``scope="layer"`` removes
    ``round(sparsity * n_l)`` from each tensor separately. Ties at the threshold are broken
    deterministically: the earliest in the order of the dict, then row-major order within a
    tensor, is removed first. For quantities where *high* means prune (log alpha, BMR
    ``delta_f``) pass their negation, or use :func:`mask_by_threshold`.

    Returns ``name -> bool tensor`` (True = keep), shaped like the scores.
    """
    scores = _check_dict("scores_dict", scores_dict)
    sparsity = _check_fraction("sparsity", sparsity)
    if scope == "layer":
        return {
            key: ~_lowest(value.reshape(-1), _count(sparsity, value.numel())).reshape(value.shape)
            for key, value in scores.items()
        }
    if scope != "global":
        raise ValueError(f"scope: must be 'global' or 'layer', got {scope!r}")
    flat = torch.cat([value.reshape(-1) for value in scores.values()])
    removed = _lowest(flat, _count(sparsity, flat.numel()))
    pieces = torch.split(removed, [value.numel() for value in scores.values()])
    return {
        key: ~piece.reshape(value.shape)
        for (key, value), piece in zip(scores.items(), pieces)
    }


def mask_by_threshold(values, threshold, keep="below"):
    """Keep the entries on one side of a threshold (the threshold itself is kept).

    ``keep="below"`` keeps ``value <= threshold`` (log alpha with threshold 3, Molchanov et
    al. 2017; BMR ``delta_f`` with threshold 0, or the spike-and-slab ``zeta``);
    ``keep="above"`` keeps ``value >= threshold`` (scores). ``threshold`` is a number or a
    dict ``name -> number`` (or broadcastable tensor) with an entry for every name.

    Returns ``name -> bool tensor`` (True = keep).
    """
    values = _check_dict("values", values)
    if keep not in ("below", "above"):
        raise ValueError(f"keep: must be 'below' or 'above', got {keep!r}")
    out = {}
    for key, value in values.items():
        if isinstance(threshold, dict):
            if key not in threshold:
                raise ValueError(f"threshold: no entry for {key!r} (has {sorted(threshold)})")
            t = threshold[key]
        else:
            t = threshold
        t = torch.as_tensor(t, device=value.device)
        if t.is_floating_point() and bool(torch.isnan(t).any()):
            raise ValueError(f"threshold: is NaN for {key!r}")
        out[key] = value <= t if keep == "below" else value >= t
    return out


def structured_mask(group_scores_dict, fraction, shapes=None):
    """Remove the lowest-scoring ``fraction`` of groups in each layer.

    ``group_scores_dict`` maps a name to its group scores (e.g. :func:`group_scores` of
    :func:`opd_scores`: one entry per unit or filter). From every layer
    ``round(fraction * G_l)`` groups are removed, ties broken as in :func:`mask_by_sparsity`.

    Without ``shapes`` the result is the group-level mask. With ``shapes`` (``name ->``
    parameter shape) each group mask is broadcast onto the parameter: a mask of shape
    ``(G,)`` is read along the leading dimension (``(out,)`` -> whole rows / filters), and a
    mask from ``group_scores(..., keepdim=True)`` broadcasts as is.

    Returns ``name -> bool tensor`` (True = keep).
    """
    fraction = _check_fraction("fraction", fraction)
    masks = mask_by_sparsity(group_scores_dict, fraction, scope="layer")
    if shapes is None:
        return masks
    out = {}
    for key, mask in masks.items():
        if key not in shapes:
            raise ValueError(f"shapes: no entry for {key!r} (has {sorted(shapes)})")
        shape = torch.Size(shapes[key])
        if mask.dim() < len(shape):
            mask = mask.reshape(mask.shape + (1,) * (len(shape) - mask.dim()))
        try:
            out[key] = mask.expand(shape).clone()  # a real tensor, not a view
        except RuntimeError as exc:
            raise ValueError(
                f"shapes[{key!r}]: group mask of shape {tuple(mask.shape)} does not broadcast "
                f"onto the parameter shape {tuple(shape)}"
            ) from exc
    return out


# --------------------------------------------------------------------------- N:M patterns


def parse_pattern(pattern):
    """``"2:4"`` (or ``(2, 4)``) -> ``(2, 4)``: keep N of every M, ``0 < N < M``; ValueError naming
    the value otherwise."""
    if isinstance(pattern, str):
        head, sep, tail = pattern.partition(":")
        try:
            n, m = int(head), int(tail)
        except ValueError:
            n = m = None
        if not sep or n is None:
            raise ValueError(f"pattern: expected 'N:M' with whole numbers (keep N of every M, e.g. 2:4), "
                             f"got {pattern!r}")
    elif isinstance(pattern, (tuple, list)) and len(pattern) == 2 and all(
            isinstance(v, int) and not isinstance(v, bool) for v in pattern):
        n, m = pattern
    else:
        raise ValueError(f"pattern: expected 'N:M' (e.g. '2:4'), got {pattern!r}")
    if not 0 < n < m:
        raise ValueError(f"pattern: N:M must have 0 < N < M (keep N of every M weights), got {n}:{m}")
    return n, m


def mask_n_m(keep_scores, n, m, dim=-1):
    r"""Keep the ``n`` highest ``keep_scores`` of every ``m`` consecutive entries along ``dim`` (an
    N:M pattern; for a weight ``(out, in)`` ``dim=1`` blocks the inputs of every unit, for a
    convolution ``(out, in, kh, kw)`` ``dim=1`` blocks the input channels at every kernel position).
    A last block of fewer than ``m`` entries keeps at most ``n`` of them. Ties are broken by
    position (the earlier entry is kept). Returns a bool tensor shaped like ``keep_scores``
    (True = keep): every block holds exactly ``min(n, block size)`` kept entries."""
    scores = torch.as_tensor(keep_scores)
    if not scores.is_floating_point():
        scores = scores.float()
    check_no_nan("keep_scores", scores)
    n, m = parse_pattern((n, m))
    if scores.dim() == 0:
        raise ValueError("keep_scores: needs at least one dimension to block")
    dim = dim % scores.dim()
    moved = scores.movedim(dim, -1)
    size = moved.shape[-1]
    pad = (-size) % m
    if pad:  # padding ranks below every real entry, and is dropped afterwards
        moved = torch.cat([moved, moved.new_full((*moved.shape[:-1], pad), -math.inf)], -1)
    blocks = moved.reshape(*moved.shape[:-1], -1, m)
    order = torch.argsort(-blocks, dim=-1, stable=True)  # highest first, ties in position order
    keep = torch.zeros_like(blocks, dtype=torch.bool).scatter_(-1, order[..., :n], True)
    keep = keep.reshape(*moved.shape[:-1], -1)[..., :size]
    return keep.movedim(-1, dim).contiguous()
