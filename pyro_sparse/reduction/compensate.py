r"""Reduction with compensation: remove weights by the evidence and move the kept ones to the
reduced posterior mean.

Bayesian model reduction (Friston & Penny 2011) of a Gaussian posterior :math:`N(\mu, \Sigma)` to
a prior that fixes the set :math:`S` of weights at zero gives the evidence change and the reduced
posterior in closed form:

.. math::

    \Delta F_S = \ln q(w_S = 0) - \ln p(w_S = 0), \qquad
    \tilde\mu = \mu - \Sigma_{:,S}\,\Sigma_{S,S}^{-1}\,\mu_S ,

the second being the Optimal Brain Surgeon update (Hassibi & Stork 1993): the kept weights move
to compensate for the removed ones. Removing one weight ``q`` at a time, the reduced posterior
stays Gaussian -- :math:`\Sigma \leftarrow \Sigma - \Sigma_{:,q}\Sigma_{q,:}/\Sigma_{qq}`,
:math:`\mu \leftarrow \mu - \Sigma_{:,q}\mu_q/\Sigma_{qq}` -- and :math:`\Delta F_S` is the sum of
the single-weight terms along the way, each read off the current *marginal*
:math:`N(\tilde\mu_q, \tilde\Sigma_{qq})` by the rule's own formula (Savage-Dickey
:math:`\ln N(0; \tilde\mu_q, \tilde\Sigma_{qq}) - \ln p(0)`, or BMR towards :math:`N(0, g^2)`).

**Rows.** The posterior precision of a layer is taken row by row, one output unit's
:math:`[W_i \mid b_i]` at a time, rows independent: :math:`P_i = s\,G_{ii} A + \mathrm{diag}(\delta_i)`
from Kronecker factors, or the exact row block of the GGN
(:mod:`pyro_sparse.kron`) -- the matrix ExactOBS and SparseGPT use, with the prior precision in the
place of their damping. The bias is in the row and never removed: it absorbs the mean of what
the removed inputs carried.

**Greedy and exact per row** (ExactOBS, Frantar & Alistarh 2022, "Optimal Brain Compression"):
each row removes, one at a time, the weight whose removal changes the evidence least
unfavourably (largest :math:`\Delta F`), with rank-one downdates of :math:`\Sigma_i`, all rows of
a layer at once; the whole removal order and its increments are recorded. **Blockwise with lazy
updates** (SparseGPT, Frantar & Alistarh 2023) for rows wider than :data:`MAX_EXACT`: the columns
are visited left to right in blocks of 128 with the Cholesky factor of one shared
:math:`H^{-1}`, :math:`H = A + \bar\delta I`; within a block the weights to remove are chosen by
:math:`\Delta F` at the block's start, and each column's removal error is pushed onto the columns
to its right.

**How many.** With a target ``sparsity`` the rows' removal sequences are cut where their prefix
scores (the running minimum of the increments) cross one threshold, chosen over all layers
(``scope="global"``: the evidence is one currency across layers) or per layer; with an ``n:m``
``pattern`` every block of ``m`` consecutive inputs of a row (input channels at every kernel
position of a convolution, as :func:`~pyro_sparse.reduction.scores.mask_n_m` blocks) keeps ``n``; with neither, the
evidence decides: each row stops where its cumulative :math:`\Delta F` (less ``threshold`` per
weight) is largest -- where removing more lowers the evidence.

**Layer by layer.** Given a ``calibration`` (the data and the network), the layers are processed
in order and each one's input second moment ``A`` is recomputed on the already-reduced network's
own activations (as OBC and SparseGPT do), so a layer compensates for what the layers before it
lost; without one, every layer uses the posterior as fitted (one shot).

**Output scale.** The Laplace posterior of a classifier trained to a confident fit is broad: the
softmax saturates on the training data, so the output factor ``G`` of the hidden layers is tiny
(mean diagonal 5e-4 on the digits MLP) and the learned prior dominates every weight. The reduced
posterior mean then barely moves, and the evidence favours removing units the network needs
(measured in ``bench/bench_posthoc.py``: 0.21 at 90% of the MLP's weights, against 0.97).
``output_scale="unit"`` (a classifier's default) reads each layer in its own output units: every
row's output precision is set to one -- unit Gaussian noise on every pre-activation, the
reconstruction objective of layer-wise OBS, ExactOBS and SparseGPT, with the prior of the fit in
the place of their damping -- so the rows of a layer are equally important and the evidence is a
currency across layers (measured: 0.97, 0.98 and 0.95 at 90% of the MLP, LeNet-5 and the residual
CNN, where keeping the shape of ``G`` in each layer gave 0.97, 0.98 and 0.75). ``"posterior"`` (a
regression's default: a Gaussian likelihood's
curvature does not saturate) keeps the posterior as fitted, and the evidence is then exact for a
linear-Gaussian model. The decision records which.
"""

from __future__ import annotations

import math

import torch

from ..kron import rows_of
from .scores import parse_pattern

__all__ = ["compensated_reduction", "MAX_EXACT", "OUTPUT_SCALES", "greedy_rows",
           "reduced_rows"]

#: widest row (entries, bias included) reduced greedily and exactly; wider rows go blockwise
MAX_EXACT = 640
#: columns per block of the blockwise (SparseGPT) path
BLOCK = 128
#: share of a row's remaining weights removed per greedy step: in the pass that reduces, and in the
#: first pass that only apportions a global target among the layers
STEP_FRACTION = 1 / 16
ALLOCATION_FRACTION = 1 / 16
OUTPUT_SCALES = ("unit", "posterior")
_ROW_BUDGET = 1 << 24  # float64 entries of the row covariances held at once (128 MiB)


# --------------------------------------------------------------------------- one layer, exact


def greedy_rows(sigma, mu, prior_precision, removable, delta_f, nm=None, fraction=1 / 16, blocks=None):
    r"""Greedy removal per row under full row covariances (ExactOBS with the rule's evidence).

    ``sigma`` ``(R, d, d)``, ``mu`` ``(R, d)``, ``prior_precision`` ``(R, d)``, ``removable``
    ``(R, d)`` bool; ``delta_f(mu, var, prior_precision)`` the single-weight evidence change on the
    current marginals. Each step removes from every row its ``max(1, fraction * remaining)`` best
    weights (``fraction=0``: one at a time, ExactOBS's order exactly) and conditions the row's
    Gaussian on them being 0 (a rank-``k`` downdate of :math:`\Sigma` and :math:`\mu`). Within a
    step the ``k`` removals are taken best first, each one's increment conditional on the ones
    before (the innovations of the Cholesky factor of :math:`\Sigma_{SS}`), so the increments are
    exactly those of removing them one by one in that order. The covariances shrink to the entries
    still in play whenever a quarter of them has gone, so the work falls with the cube of what is
    left.

    ``nm = (n, m)``: only weights whose block (``blocks``, a block id per column; default ``m``
    consecutive columns) still keeps more than ``n`` may go, one at a time, and the sequence ends
    when every block keeps ``n``.

    Returns ``(order, increments)`` ``(R, k)``: the removal order (column indices) and each
    removal's :math:`\Delta F` (``-inf`` padding where a row ran out of removable weights).
    """
    rows, d = mu.shape
    tiny = torch.finfo(mu.dtype).tiny
    if rows == 0:
        return torch.zeros(0, 0, dtype=torch.long), torch.zeros(0, 0, dtype=mu.dtype)
    if nm is not None:
        fraction = 0.0
    sigma, mu, prior, can = sigma.clone(), mu.clone(), prior_precision, removable.clone()
    active = torch.arange(d).expand(rows, d)  # original column of each entry still held
    n_rem = int(removable.sum(1).max())
    if nm is not None:
        n, m = nm
        block = (active // m) if blocks is None else blocks.to(active.device)[active]
        kept = torch.zeros(rows, int(block.max()) + 1, dtype=torch.long).scatter_add_(1, block, can.long())
        n_rem = int((kept - n).clamp_min(0).sum(1).max())
    orders, incs = [], []
    ar = torch.arange(rows)
    done = 0
    alive = torch.ones(rows, d, dtype=torch.bool)
    neg = torch.tensor(-math.inf, dtype=mu.dtype)
    while done < n_rem:
        var = sigma.diagonal(dim1=1, dim2=2).clamp_min(tiny)
        allowed = can if nm is None else can & (torch.gather(kept, 1, block) > n)
        df = torch.where(allowed, delta_f(mu, var, prior), neg)
        remaining = int(allowed.sum(1).max())
        if remaining == 0:
            break
        k = 1 if fraction <= 0 else max(1, min(remaining, int(fraction * remaining)))
        top, pick = torch.topk(df, k, dim=1)  # best first
        ok = torch.isfinite(top)
        if k == 1:
            q = pick[:, 0]
            s_col = sigma[ar, :, q] * ok
            sqq = s_col[ar, q].clamp_min(tiny)
            mu.sub_(s_col * (mu[ar, q] / sqq)[:, None])
            sigma.baddbmm_(s_col.unsqueeze(2), (s_col / sqq[:, None]).unsqueeze(1), alpha=-1)
            inc = top
        else:
            s_all = torch.gather(sigma, 2, pick[:, None, :].expand(-1, sigma.shape[1], -1))  # (R, a, k)
            s_ss = torch.gather(s_all, 1, pick[:, :, None].expand(-1, -1, k))  # (R, k, k)
            chol, info = torch.linalg.cholesky_ex(s_ss)
            good = ok.all(1) & (info == 0)
            chol = torch.where(good[:, None, None], chol, torch.eye(k, dtype=mu.dtype))
            z = torch.linalg.solve_triangular(chol, torch.gather(mu, 1, pick).unsqueeze(-1), upper=False)[..., 0]
            diag = chol.diagonal(dim1=1, dim2=2)
            inc = torch.where(good[:, None], delta_f(diag * z, diag.square().clamp_min(tiny),
                                                     torch.gather(prior, 1, pick)), neg)
            coef = torch.linalg.solve_triangular(chol, s_all.transpose(1, 2), upper=False)  # L^-1 S_{S,a}: (R, k, a)
            coef = coef * good[:, None, None]
            mu.sub_((coef.transpose(1, 2) @ z.unsqueeze(-1))[..., 0])
            sigma.baddbmm_(coef.transpose(1, 2), coef, alpha=-1)
        orders.append(torch.gather(active, 1, pick))
        incs.append(inc)
        can.scatter_(1, pick, False)
        alive.scatter_(1, pick, False)
        if nm is not None:
            kept.scatter_add_(1, torch.gather(block, 1, pick), -ok.long())
        done += k
        count = alive.sum(1)
        width = alive.shape[1]
        if int(count.min()) == int(count.max()) and 0 < int(count[0]) < 0.75 * width:  # drop what has gone
            left = torch.argsort((~alive).to(torch.int8), dim=1, stable=True)[:, :int(count[0])]
            a = left.shape[1]
            sigma = torch.gather(torch.gather(sigma, 1, left[:, :, None].expand(-1, -1, width)), 2,
                                 left[:, None, :].expand(-1, a, -1))
            mu, can, alive = torch.gather(mu, 1, left), torch.gather(can, 1, left), torch.gather(alive, 1, left)
            prior, active = torch.gather(prior, 1, left), torch.gather(active, 1, left)
            if nm is not None:
                block = torch.gather(block, 1, left)
    if not orders:
        return torch.zeros(rows, 0, dtype=torch.long), torch.zeros(rows, 0, dtype=mu.dtype)
    return torch.cat(orders, 1), torch.cat(incs, 1)


def reduced_rows(precision, mu, removed):
    r"""The reduced posterior mean of every row for the removed entries ``removed`` ``(R, d)``:
    :math:`\tilde\mu_K = \mu_K + P_{KK}^{-1}P_{KS}\mu_S`, :math:`\tilde\mu_S = 0` (the OBS update in
    precision form: the kept block of ``P`` is well conditioned, the removed block of
    :math:`\Sigma` need not be)."""
    keep = ~removed
    pk = torch.where(keep[:, :, None] & keep[:, None, :], precision, torch.zeros((), dtype=precision.dtype))
    pk = pk + torch.diag_embed(removed.to(precision.dtype))
    rhs = (precision @ (mu * removed).unsqueeze(-1)).squeeze(-1) * keep
    return (mu + torch.linalg.solve(pk, rhs.unsqueeze(-1)).squeeze(-1)) * keep


def _chunks(rows, width):
    step = max(1, _ROW_BUDGET // max(width * width, 1))
    return [slice(i, min(i + step, rows)) for i in range(0, rows, step)]


def _exact_layer(precision, mu, prior_precision, removable, delta_f, nm, fraction=1 / 16, blocks=None):
    """Greedy trajectories of a layer's rows, in chunks of rows: ``(order, increments)``."""
    orders, incs = [], []
    for sl in _chunks(mu.shape[0], mu.shape[1]):
        chol = torch.linalg.cholesky(precision[sl])
        order, inc = greedy_rows(torch.cholesky_inverse(chol), mu[sl], prior_precision[sl], removable[sl], delta_f, nm,
                                 fraction, blocks)
        orders.append(order)
        incs.append(inc)
    k = max(o.shape[1] for o in orders)
    pad = lambda t, value: torch.nn.functional.pad(t, (0, k - t.shape[1]), value=value)  # noqa: E731
    return torch.cat([pad(o, 0) for o in orders]), torch.cat([pad(i, -math.inf) for i in incs])


def _prefix_scores(incs):
    """Running minimum of each row's increments: cutting a row where it crosses a threshold keeps
    every removal before the cut at least that good."""
    return torch.cummin(incs, dim=1).values


def _cut(incs, count=None, threshold=0.0):
    """``k`` ``(R,)``: how many of each row's removals to make, from a count over the layer (the
    ``count`` highest prefix scores) or, without one, where the cumulative evidence less
    ``threshold`` per removal is largest."""
    rows, steps = incs.shape
    if count is not None:
        scores = _prefix_scores(incs)
        if count <= 0 or steps == 0:
            k = torch.zeros(rows, dtype=torch.long)
        else:
            flat = scores.reshape(-1)
            top = torch.topk(flat, min(count, flat.numel())).indices
            chosen = torch.zeros_like(flat, dtype=torch.bool)
            chosen[top] = True
            k = chosen.reshape(rows, steps).sum(1)
    else:
        finite = torch.isfinite(incs)
        gain = torch.where(finite, incs - threshold, torch.zeros_like(incs))
        cumulative = torch.cat([torch.zeros(rows, 1, dtype=incs.dtype), gain.cumsum(1)], 1)
        cumulative = torch.where(torch.cat([torch.ones(rows, 1, dtype=torch.bool), finite], 1), cumulative,
                                 torch.full_like(cumulative, -math.inf))
        k = cumulative.argmax(1)
    return k


def _removed_from(order, k, width):
    removed = torch.zeros(order.shape[0], width, dtype=torch.bool)
    for i in range(order.shape[0]):
        removed[i, order[i, :int(k[i])]] = True
    return removed


# --------------------------------------------------------------------------- one layer, blockwise


def _blockwise_layer(hinv, var, scale, mu, prior_precision, removable, delta_f, keep_counts=None, threshold=0.0,
                     nm=None, blocks=None):
    r"""SparseGPT's pass over one layer with the shared :math:`H` (rows' precisions
    :math:`P_i \approx s_i H`, ``scale`` the ``s_i``; ``hinv`` its inverse, ``var`` the single-weight
    variances, :func:`_shared`): returns ``(values, removed, delta_f_total)``.

    The removed set: chosen up front by the single-weight :math:`\Delta F` under the shared
    :math:`H`, each row's ``keep_counts`` largest, or with ``nm`` all but the ``n`` smallest of every
    block (``blocks``: a block id per column); else per block of columns, at the block's start,
    where :math:`\Delta F >` ``threshold``. Columns are then eliminated left to right, each removal's
    error pushed onto the columns to its right (earlier columns stay as they are: the lazy
    updates that make the pass :math:`O(d^3 + R d^2)`)."""
    rows, d = mu.shape
    tiny = torch.finfo(mu.dtype).tiny
    u = torch.linalg.cholesky(hinv, upper=True)  # H^-1 = U' U
    w = mu.clone()
    removed = torch.zeros_like(removable)
    if keep_counts is not None or nm is not None:  # the removed set chosen up front
        df = torch.where(removable, delta_f(mu, var, prior_precision), torch.full_like(mu, -math.inf))
        if nm is not None:  # in every block, the ones beyond its n with the largest evidence for removal
            removed = ~_keep_per_block(-df, removable, nm, blocks)
        else:
            ranked = torch.argsort(df, dim=1, descending=True)
            first = torch.arange(d)[None, :] < keep_counts[:, None]
            removed.scatter_(1, ranked, first)
        removed &= removable
    total = torch.zeros((), dtype=mu.dtype)
    for i1 in range(0, d, BLOCK):
        i2 = min(i1 + BLOCK, d)
        w1, u1 = w[:, i1:i2].clone(), u[i1:i2, i1:i2]
        # of each column given the ones before fixed, never above the prior's
        var = torch.minimum(u1.diagonal().square()[None, :] / scale.clamp_min(tiny)[:, None],
                            prior_precision[:, i1:i2].reciprocal())
        df = delta_f(w1, var.expand_as(w1), prior_precision[:, i1:i2])
        can = removable[:, i1:i2]
        df = torch.where(can, df, torch.full_like(df, -math.inf))
        if keep_counts is not None or nm is not None:
            cut = removed[:, i1:i2]
        else:
            cut = can & (df > threshold)
        total = total + df[cut].sum()
        errors = torch.zeros_like(w1)
        for j in range(i2 - i1):
            col = w1[:, j]
            err = torch.where(cut[:, j], col, torch.zeros_like(col)) / u1[j, j]
            w1[:, j:] -= err[:, None] * u1[j, j:][None, :]
            w1[:, j] = torch.where(cut[:, j], torch.zeros_like(col), w1[:, j])
            errors[:, j] = err
        w[:, i1:i2] = w1
        w[:, i2:] -= errors @ u[i1:i2, i2:]
        removed[:, i1:i2] = cut
    return w, removed, total


def _keep_per_block(keep_score, removable, nm, blocks):
    """``(R, d)`` bool: in every row and block (``blocks``, a block id per column) the ``n`` removable
    entries of highest ``keep_score`` are kept (True), the other removable ones not; the rest True."""
    n, _ = nm
    rows, d = keep_score.shape
    score = torch.where(removable, keep_score, torch.full_like(keep_score, math.inf))  # non-removable first
    order = torch.argsort(score, dim=1, descending=True)
    keep = torch.ones(rows, d, dtype=torch.bool)
    counted = torch.zeros(rows, int(blocks.max()) + 1, dtype=torch.long)
    for j in range(d):  # walk each row from its highest score down, a block keeps n removable entries
        col = order[:, j]
        b = blocks[col]
        can = removable[torch.arange(rows), col]
        full = counted[torch.arange(rows), b] >= n
        keep[torch.arange(rows), col] = ~(can & full)
        counted[torch.arange(rows), b] += can.long()
    return keep


def pattern_blocks(structure, m):
    """A block id per entry of a layer's row for an n:m pattern: ``m`` consecutive input features
    (for a convolution, input channels at every kernel position), as
    :func:`~pyro_sparse.reduction.scores.mask_n_m` blocks a weight's input axis; the bias its own."""
    shape = structure.weight_shape
    taps = math.prod(shape[2:]) if len(shape) > 2 else 1
    j = torch.arange(math.prod(shape[1:]))
    blocks = (j // taps // m) * taps + j % taps
    if structure.has_bias:
        blocks = torch.cat([blocks, blocks.max().reshape(1) + 1])
    return blocks


# --------------------------------------------------------------------------- the network


def _layers(summary):
    """The structures of the summary's weight sites, in network order (one per layer)."""
    out = []
    for site in summary.values():
        if site.role == "weight" and site.structure is not None and all(s is not site.structure for s in out):
            out.append(site.structure)
    return out


def _row_inputs(structure, summary):
    mu = rows_of(summary[structure.weight_site].loc.double(),
                 summary[structure.bias_site].loc.double() if structure.has_bias else None)
    prior = rows_of(summary[structure.weight_site].prior_precision.double().expand(structure.weight_shape),
                    summary[structure.bias_site].prior_precision.double().expand(structure.out)
                    if structure.has_bias else None)
    removable = torch.ones_like(mu, dtype=torch.bool)
    if structure.has_bias:
        removable[:, -1] = False
    return mu, prior, removable


def _row_precisions(structure, output_scale, input_moment=None):
    r"""The row blocks ``(out, D', D')`` the reduction works on.

    ``posterior``: :math:`P_i` as fitted (``input_moment`` in place of ``A`` for Kronecker factors).
    ``unit``: every row of the layer in the units of its pre-activation, with unit noise:
    :math:`A + \mathrm{diag}(\delta_i)` for Kronecker factors (the output factor set to the
    identity: the reconstruction objective of layer-wise OBS), and each exact row block divided by
    its own output precision :math:`\mathrm{tr}(H_i)/\mathrm{tr}(A)`."""
    delta = torch.diag_embed(structure.delta)
    if output_scale == "posterior":
        if structure.kind == "rows":
            return structure.P
        return structure.rows(input_moment=input_moment)
    if structure.kind == "rows":
        if structure.A is None:
            raise ValueError(f"{structure.layer}: row blocks without their input moment cannot be read in unit output "
                             "scale; use output_scale='posterior'")
        h = structure.P - delta
        g = h.diagonal(dim1=1, dim2=2).sum(1) / structure.A.diagonal().sum().clamp_min(1e-300)
        return h / g.clamp_min(1e-300)[:, None, None] + delta
    a = structure.A if input_moment is None else input_moment.detach().to(torch.float64)
    return a[None] + delta


def compensated_reduction(summary, delta_f, *, sparsity=None, threshold=0.0, scope="global", pattern=None,
                          calibration=None, output_scale="unit", max_exact=None):
    """Reduce every layer with a structured posterior (see the module docstring).

    ``delta_f(mu, var, prior_precision)``: the rule's single-weight evidence change on a marginal.
    ``sparsity``: target fraction of the weights (``scope`` global or layer); ``pattern``: ``n:m``;
    neither: the evidence decides (``threshold`` per removal, default 0). ``calibration``: an
    object whose ``input_moment(layer, values)`` is the layer's input second moment ``A`` on the
    network holding ``values`` (site -> tensor), for the layer-by-layer pass.

    Returns ``(masks, values, info)``: site -> keep-mask and site -> reduced posterior mean (the
    weights and biases of every reduced layer; removed entries exactly 0), and per layer ``info``
    (``removed``, ``total``, ``delta_f``: the evidence change of the removal, ``path``: exact or
    blockwise, ``output_scale``, ``refit``: whether ``A`` came from the reduced network).
    """
    if output_scale not in OUTPUT_SCALES:
        raise ValueError(f"output_scale: expected one of {OUTPUT_SCALES}, got {output_scale!r}")
    nm = parse_pattern(pattern) if pattern is not None else None
    max_exact = MAX_EXACT if max_exact is None else max_exact
    layers = _layers(summary)
    counts = {}
    if sparsity is not None and nm is None:
        if scope == "layer":
            counts = {s.layer: int(round(sparsity * math.prod(s.weight_shape))) for s in layers}
        else:  # one threshold on the prefix scores of every row of every layer, on the posterior as fitted
            scores = {}
            for s in layers:
                mu, prior, removable = _row_inputs(s, summary)
                if s.width <= max_exact:
                    p = _row_precisions(s, output_scale)
                    _, inc = _exact_layer(p, mu, prior, removable, delta_f, None, ALLOCATION_FRACTION)
                    scores[s.layer] = _prefix_scores(inc)
                else:  # single-weight evidence on the shared H, sorted: a prefix score per row
                    var = _shared(s, output_scale)[0]
                    df = torch.where(removable, delta_f(mu, var, prior), torch.full_like(mu, -math.inf))
                    scores[s.layer] = df.sort(1, descending=True).values
            flat = torch.cat([v.reshape(-1) for v in scores.values()])
            total = sum(math.prod(s.weight_shape) for s in layers)
            m = int(round(sparsity * total))
            if m <= 0:
                counts = {s.layer: 0 for s in layers}
            else:
                thr = torch.topk(flat, min(m, flat.numel())).values[-1]
                counts = {name: int((v >= thr).sum()) for name, v in scores.items()}
                excess = sum(counts.values()) - m  # ties at the threshold: take them off the last layers
                for name in reversed(list(counts)):
                    if excess <= 0:
                        break
                    ties = int((scores[name] == thr).sum())
                    cut = min(excess, ties, counts[name])
                    counts[name] -= cut
                    excess -= cut
    masks, values, info = {}, {}, {}
    current = {k: s.loc for k, s in summary.items()}
    for s in layers:
        mu, prior, removable = _row_inputs(s, summary)
        a = calibration.input_moment(s.layer, current) if calibration is not None and s.kind == "kronecker" else None
        if s.width <= max_exact:
            p = _row_precisions(s, output_scale, a)
            order, inc = _exact_layer(p, mu, prior, removable, delta_f, nm, STEP_FRACTION,
                                      pattern_blocks(s, nm[1]) if nm is not None else None)
            if nm is not None:
                k = torch.isfinite(inc).sum(1)
            elif s.layer in counts:
                k = _cut(inc, count=counts[s.layer])
            else:
                k = _cut(inc, threshold=threshold)
            removed = _removed_from(order, k, s.width)
            new = reduced_rows(p, mu, removed)
            total_df = float(torch.where(torch.arange(inc.shape[1])[None, :] < k[:, None], inc,
                                         torch.zeros_like(inc)).sum()) if inc.numel() else 0.0
            path = "exact"
        else:
            var, hinv, row_scale = _shared(s, output_scale, a)
            keep_counts = None
            if s.layer in counts and nm is None:  # per-row counts from the sorted single-weight evidence
                df = torch.where(removable, delta_f(mu, var, prior), torch.full_like(mu, -math.inf))
                keep_counts = _cut(df.sort(1, descending=True).values, count=counts[s.layer])
            new, removed, total_df = _blockwise_layer(hinv, var, row_scale, mu, prior, removable, delta_f,
                                                      keep_counts, threshold, nm,
                                                      pattern_blocks(s, nm[1]) if nm is not None else None)
            del hinv
            total_df = float(total_df)
            path = "blockwise"
        for site, value in s.split(new).items():
            values[site] = value.to(summary[site].loc.dtype)
        for site, keep in s.split(~removed).items():
            masks[site] = keep
        current.update({site: values[site] for site in s.sites()})
        info[s.layer] = {"removed": int(removed.sum()), "total": math.prod(s.weight_shape),
                              "delta_f": total_df, "path": path, "output_scale": output_scale,
                         "refit": a is not None}
    return masks, values, info


def _shared(structure, output_scale, input_moment=None):
    r"""For the blockwise path, without forming the row blocks: the inverse of the shared :math:`H`
    with :math:`P_i \approx s_i H`, the per-row ``s_i`` and the marginal variances of single weights
    under it, ``(var, H^-1, s)``. Kronecker factors: :math:`H = A + \bar\delta I` with
    :math:`\bar\delta = \mathrm{mean}(\delta) / \mathrm{mean}(s)` and :math:`s_i = G_{ii}` as
    fitted, or :math:`s_i = 1` in unit output scale (exact but for the prior's spread); exact row
    blocks: the mean of :math:`P_i / s_i`, :math:`s_i` the mean of :math:`P_i`'s diagonal. A variance
    is never above the prior's (a row the data do not reach keeps its prior). Wide layers are the
    point of this path, so no more than two matrices of the layer's width are held at once."""
    tiny = torch.finfo(torch.float64).tiny
    if structure.kind == "kronecker":
        a = structure.A if input_moment is None else input_moment.detach().to(torch.float64)
        s = torch.ones(structure.out, dtype=a.dtype) if output_scale == "unit" else structure.G.diagonal().clone()
        h = a.clone()
        h.diagonal().add_(float(structure.delta.mean()) / max(float(s.mean()), tiny))
    else:
        p = _row_precisions(structure, output_scale)
        s = p.diagonal(dim1=1, dim2=2).mean(1)
        h = (p / s.clamp_min(tiny)[:, None, None]).mean(0)
    chol = torch.linalg.cholesky(h)
    del h
    hinv = torch.cholesky_inverse(chol)
    del chol
    var = torch.minimum(hinv.diagonal()[None, :] / s.clamp_min(tiny)[:, None], structure.delta.reciprocal())
    return var, hinv, s
