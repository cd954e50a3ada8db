r"""One interface for every reduction rule: ``reduce(summary, method, ...) -> Decision``.

A rule reads only a :class:`~pyro_sparse.summary.PosteriorSummary` (per parameter tensor: the
Gaussian posterior marginals ``N(loc, 1/precision)`` and the Gaussian (conditional) prior
``N(prior_loc, 1/prior_precision)``) and returns a :class:`Decision`: a keep-mask per parameter
(True = keep), the per-weight evidence or score it ranked by, and the units it removed. Rules:

==================  =====================================================================  ==========
method              per-weight quantity (``Decision.scores``)                               prune where
==================  =====================================================================  ==========
``bmr``             :math:`\Delta F` of the reduced prior :math:`N(0, g^2)` (BMR)           dF > t (0)
``savage-dickey``   :math:`\Delta F = \ln q(0) - \ln p(0)` (reduced prior: point mass)      dF > t (0)
``spike-slab``      :math:`\Delta F` of ``bmr``; layer-wise spike-and-slab on it           dF > zeta
``log-alpha``       :math:`\log\alpha = \log\sigma^2 - \log\theta^2` (Sparse VD)            > t (3)
``opd``             :math:`s_i = P_{ii}\theta_i^2` (Optimal Posterior Damage)               lowest
``magnitude``       :math:`|\theta_i|`                                                      lowest
``random``          uniform(0, 1)                                                           lowest
==================  =====================================================================  ==========

(Friston & Penny 2011; Markovic, Friston & Kiebel 2023 for BMR, Savage-Dickey and the
spike-and-slab decision; Molchanov, Ashukha & Vetrov 2017 for log alpha; Dhahri et al. 2024
for OPD; the formulas live in :mod:`.bmr` and :mod:`.scores`.)

**Unstructured** rules (the default) act on *weights*: every parameter tensor whose name is not
``bias``. With ``sparsity=Q`` the lowest-ranked ``round(Q * N)`` weights are removed, ranked
globally (``scope="global"``) or within each tensor (``scope="layer"``); evidence rules rank by
``-dF`` / ``-log alpha``. Without ``sparsity`` the rule's threshold decides. **Biases are kept**
by unstructured rules: a unit whose incoming weights are all removed then outputs the constant
``act(b)``; :func:`~pyro_sparse.reduction.compact.compact` deletes such a unit and adds its
constant contribution to the next layer's bias, so predictions do not change.

**Structured** rules (``structured=True``) remove whole units (output neurons / conv filters):
the group of a unit is its row of the weight (every element along the ``unit`` axis index) and
its bias; the group quantity is the sum over the group (:math:`\Delta F_g = \sum_k \Delta F_k`
under a factorised posterior, :math:`S_g = \sum_i s_i` for OPD, :math:`\sum\theta_i^2` for
magnitude, one uniform draw per unit for random). Where the summary has a correlated block
(a low-rank or full posterior covariance), ``savage-dickey`` uses the joint term of each unit,
:math:`\ln N(0; \mu_g, \Sigma_g) - \ln p(0)`, instead of the sum of marginal terms, and ``opd``
reads :math:`P_{ii}` off the block's precision. ``sparsity`` is then the fraction of units
removed from each hidden layer. The last parametric layer of the summary is the network output
and never loses units.

Group variables (multiplicative ``z`` of the group normal-Jeffreys prior, Louizos et al. 2017;
gates of Lobacheva et al.) enter ``log-alpha`` through ``groups``: a dict ``site -> log alpha``
of the group variable, shaped to broadcast against the parameter (see
:func:`group_log_alpha`); a group whose log alpha exceeds the threshold removes every weight it
multiplies, and with ``structured=True`` the unit-shaped ones decide the units.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from numbers import Real

import torch

from .bmr import bmr_diagonal_zero_mean, bmr_gaussian, group_delta_f, savage_dickey, spike_slab_decision
from .scores import (
    magnitude_scores,
    mask_by_sparsity,
    opd_scores,
    random_scores,
)

__all__ = ["METHODS", "Decision", "reduce", "group_log_alpha", "DEFAULT_SHRINK"]

#: every rule ``reduce`` knows, in the order the CLI lists them
METHODS = ("bmr", "savage-dickey", "spike-slab", "log-alpha", "opd", "magnitude", "random")

#: default reduced prior of ``bmr``: N(0, (shrink * s)^2), s the prior standard deviation
DEFAULT_SHRINK = 1e-2

_DEFAULT_THRESHOLD = {"bmr": 0.0, "savage-dickey": 0.0, "log-alpha": 3.0}
#: the natural quantity of these rules says "prune" when it is *high*
_HIGH_PRUNES = {"bmr", "savage-dickey", "spike-slab", "log-alpha"}
_SCORE_NAME = {"bmr": "delta_f", "savage-dickey": "delta_f", "spike-slab": "delta_f",
               "log-alpha": "log_alpha", "opd": "opd", "magnitude": "magnitude", "random": "random"}


@dataclass
class Decision:
    """What a reduction rule decided.

    Attributes:
        method: the rule's name.
        masks: site name -> bool tensor shaped like the parameter, True = keep (every site of
            the summary, biases included).
        scores: weight site -> the per-weight quantity the rule ranked by (``score_name``):
            ``delta_f`` (evidence for removal), ``log_alpha``, ``opd``, ``magnitude`` or
            ``random``.
        score_name: what ``scores`` holds.
        units: layer -> bool tensor over its output units, True = kept. A unit counts as removed
            when its incoming weights are all removed (structured rules also remove its bias).
            The output layer keeps all its units. :func:`~.compact.compact` may remove more
            (units nothing reads) and reports what it physically deleted.
        group_scores: structured rules: layer -> the per-unit group quantity.
        options: the arguments the rule ran with (sparsity, threshold, scope, ...).
        zeta: spike-and-slab: weight site (or layer, structured) -> the fitted log-odds zeta.
    """

    method: str
    masks: dict
    scores: dict
    score_name: str
    units: dict
    group_scores: dict = field(default_factory=dict)
    options: dict = field(default_factory=dict)
    zeta: dict = field(default_factory=dict)

    # ------------------------------------------------------------------ counts
    def weight_sites(self):
        return [k for k in self.masks if _is_weight_name(k)]

    def counts(self, weights_only=True):
        """``(kept, total)`` over the weights (or every parameter)."""
        names = self.weight_sites() if weights_only else list(self.masks)
        kept = sum(int(self.masks[k].sum()) for k in names)
        total = sum(self.masks[k].numel() for k in names)
        return kept, total

    @property
    def sparsity(self) -> float:
        """Fraction of weights (biases excluded) removed."""
        kept, total = self.counts()
        return 1.0 - kept / total if total else 0.0

    @property
    def units_removed(self) -> dict:
        """layer -> number of units removed (see ``units``)."""
        return {k: int((~v).sum()) for k, v in self.units.items()}

    def summary(self) -> dict:
        """Plain numbers for reports and JSON."""
        kept, total = self.counts()
        kept_all, total_all = self.counts(weights_only=False)
        return {"method": self.method, "sparsity": self.sparsity, "weights_kept": kept, "weights_total": total,
                "params_kept": kept_all, "params_total": total_all,
                "units_removed": sum(self.units_removed.values()),
                "units_removed_per_layer": self.units_removed,
                "options": {k: v for k, v in self.options.items() if _jsonable(v)}}


def _jsonable(v):
    return v is None or isinstance(v, (bool, int, float, str))


def _is_weight_name(name: str) -> bool:
    return name.rsplit(".", 1)[-1] != "bias"


# --------------------------------------------------------------------------- checks


def _check_method(method):
    if method not in METHODS:
        raise ValueError(f"method: unknown reduction method {method!r}; expected one of {list(METHODS)}")


def _check_sparsity(sparsity):
    if sparsity is None:
        return None
    if isinstance(sparsity, bool) or not isinstance(sparsity, Real) or not 0.0 <= float(sparsity) < 1.0:
        raise ValueError(f"sparsity: must be a number in [0, 1), got {sparsity!r}")
    return float(sparsity)


def _check_threshold(threshold):
    if threshold is None:
        return None
    if isinstance(threshold, bool) or not isinstance(threshold, Real) or math.isnan(float(threshold)):
        raise ValueError(f"threshold: must be a number, got {threshold!r}")
    return float(threshold)


def _gaussian_parts(site, method):
    """Posterior precision and prior of a site, checked for what BMR needs."""
    if not bool(torch.isfinite(site.precision).all()):
        raise ValueError(
            f"method {method!r}: site {site.name!r} has an infinite posterior precision (a point "
            "estimate, e.g. a MAP/delta guide); BMR needs a Gaussian posterior: use an SVI or Laplace "
            "summary, or method 'magnitude'")
    prior_precision = site.prior_precision
    if not bool(((prior_precision > 0) & torch.isfinite(prior_precision)).all()):
        raise ValueError(
            f"method {method!r}: site {site.name!r} has no proper Gaussian prior (prior precision "
            f"{prior_precision.flatten()[0].item()!r}, e.g. the log-uniform prior); use method 'log-alpha'")
    return site.precision, site.prior_loc, prior_precision


# --------------------------------------------------------------------------- per-element quantities


def _delta_f(site, method, reduced_scale, shrink):
    """Element-wise evidence change for removing each element of ``site``: Savage-Dickey for
    ``method="savage-dickey"``, else BMR towards N(0, g^2) (``bmr``, ``spike-slab``)."""
    precision, prior_loc, prior_precision = _gaussian_parts(site, method)
    if method == "savage-dickey":
        return savage_dickey(site.loc, precision, prior_loc, prior_precision)
    # BMR towards N(0, g^2): g absolute, or shrink * (prior standard deviation)
    if not bool((prior_loc != 0).any()):  # zero-mean prior: the cheaper closed form, same value
        prior_scale = prior_precision.rsqrt()
        g = float(reduced_scale) if reduced_scale is not None else shrink * prior_scale
        return bmr_diagonal_zero_mean(site.loc, precision, prior_scale, g)
    if reduced_scale is not None:
        reduced_precision = torch.as_tensor(float(reduced_scale) ** -2, dtype=site.loc.dtype)
    else:
        reduced_precision = prior_precision / (shrink * shrink)
    delta_f, _, _ = bmr_gaussian(site.loc, precision, prior_loc, prior_precision, 0.0, reduced_precision)
    return delta_f


def _natural(site, method, reduced_scale, shrink, generator):
    """The rule's per-element quantity for one site (``Decision.scores``)."""
    if method in ("bmr", "savage-dickey", "spike-slab"):
        return _delta_f(site, method, reduced_scale, shrink)
    if method == "log-alpha":
        if site.log_alpha is None:
            raise ValueError(f"method 'log-alpha': site {site.name!r} has no log alpha (it needs a Gaussian "
                             "posterior with a variance, e.g. the mean-field guide)")
        return site.log_alpha
    if method == "opd":
        if not bool(torch.isfinite(site.precision).all()):
            raise ValueError(f"method 'opd': site {site.name!r} has an infinite posterior precision (a point "
                             "estimate); OPD needs a posterior precision (SVI or Laplace summary)")
        return opd_scores(site.loc, _precision_diagonal(site))
    if method == "magnitude":
        return magnitude_scores(site.loc)
    return random_scores(site.loc.shape, generator, dtype=site.loc.dtype, device=site.loc.device)


def _keep_score(method, natural):
    """Higher = keep, for ranking to a target sparsity."""
    return -natural if method in _HIGH_PRUNES else natural


def _low_rank(site):
    """``(cov_factor (n, r), cov_diag (n,))`` of a site's low-rank block over ``loc.flatten()``,
    or None. A ``{"precision": (n, n)}`` block is turned into its Cholesky factor of the
    covariance (rank n, zero diagonal)."""
    block = site.block
    if not block:
        return None
    if "cov_factor" in block:
        return block["cov_factor"].to(site.loc.dtype), block["cov_diag"].to(site.loc.dtype)
    if "precision" in block:
        cov = torch.cholesky_inverse(torch.linalg.cholesky(block["precision"].to(site.loc.dtype)))
        return torch.linalg.cholesky(cov), torch.zeros(cov.shape[0], dtype=cov.dtype)
    return None


def _precision_diagonal(site):
    r""":math:`P_{ii}`, the diagonal of the posterior precision matrix (OPD reads this).

    Without a block it is the summary's (mean-field) precision. With a low-rank block
    :math:`\Sigma = D + FF^\top`, Woodbury gives
    :math:`P = D^{-1} - D^{-1}F(I + F^\top D^{-1}F)^{-1}F^\top D^{-1}`, whose diagonal costs
    :math:`O(nr^2)`; note :math:`P_{ii} \ge 1/\Sigma_{ii}`.
    """
    lr = _low_rank(site)
    if lr is None:
        return site.precision
    factor, diag = lr
    if not bool((diag > 0).all()):
        return torch.linalg.inv(diag.diag_embed() + factor @ factor.T).diagonal().reshape(site.loc.shape)
    u = factor / diag[:, None]  # D^-1 F
    k = torch.eye(factor.shape[1], dtype=factor.dtype) + factor.T @ u
    w = torch.linalg.solve_triangular(torch.linalg.cholesky(k), u.T, upper=False)  # L^-1 F^T D^-1
    return (diag.reciprocal() - w.square().sum(0)).reshape(site.loc.shape)


def _unit_index(shape, unit_dim):
    """(G, m) indices into ``flatten()`` of the elements of each unit."""
    return torch.arange(math.prod(shape)).reshape(shape).movedim(unit_dim, 0).reshape(shape[unit_dim], -1)


def _group_savage_dickey_block(site, unit_dim):
    r"""Savage-Dickey for removing each unit jointly under a low-rank block posterior.

    For unit g with posterior :math:`N(\mu_g, \Sigma_g)`, :math:`\Sigma_g = D_g + F_gF_g^\top`
    (the unit's rows of the block), and diagonal prior :math:`N(\eta_g, \Pi_g^{-1})`:
    :math:`\Delta F_g = \ln N(0; \mu_g, \Sigma_g) - \ln N(0; \eta_g, \Pi_g^{-1})` (the joint term,
    not the sum of marginal terms), with the determinant lemma and Woodbury:
    :math:`\ln|\Sigma_g| = \ln|D_g| + \ln|I + F_g^\top D_g^{-1}F_g|`,
    :math:`\mu^\top\Sigma_g^{-1}\mu = \mu^\top D_g^{-1}\mu - c^\top c`,
    :math:`c = L^{-1}F_g^\top D_g^{-1}\mu`, :math:`LL^\top = I + F_g^\top D_g^{-1}F_g`.
    """
    factor, diag = _low_rank(site)
    idx = _unit_index(site.loc.shape, unit_dim)
    mu = site.loc.reshape(-1)[idx]
    prior_loc = torch.broadcast_to(site.prior_loc, site.loc.shape).reshape(-1)[idx]
    prior_precision = torch.broadcast_to(site.prior_precision, site.loc.shape).reshape(-1)[idx]
    f, d = factor[idx], diag[idx]  # (G, m, r), (G, m)
    if not bool((d > 0).all()):
        cov = f @ f.transpose(1, 2) + d.diag_embed()
        return savage_dickey(mu, torch.linalg.inv(cov), prior_loc, prior_precision.diag_embed())
    u = f / d[..., None]
    k = torch.eye(f.shape[-1], dtype=f.dtype) + f.transpose(1, 2) @ u
    chol = torch.linalg.cholesky(k)
    logdet = d.log().sum(-1) + 2 * chol.diagonal(dim1=-2, dim2=-1).log().sum(-1)
    c = torch.linalg.solve_triangular(chol, (u.transpose(1, 2) @ mu[..., None]), upper=False)[..., 0]
    quad = (mu * mu / d).sum(-1) - c.square().sum(-1)
    return (-0.5 * logdet - 0.5 * quad - 0.5 * prior_precision.log().sum(-1)
            + 0.5 * (prior_precision * prior_loc.square()).sum(-1))


def _group_sum(method, weight_q, bias_q, unit_dim):
    """Per-unit group quantity: the sum over the unit's weights (and its bias)."""
    if method == "magnitude":
        weight_q, bias_q = weight_q.square(), None if bias_q is None else bias_q.square()
    dims = tuple(d for d in range(weight_q.dim()) if d != unit_dim)
    total = group_delta_f(weight_q, dim=dims) if dims else weight_q.clone()
    if bias_q is not None:
        total = total + bias_q
    return total


def group_log_alpha(network, guide) -> dict:
    r"""Log alpha of the real-valued group variables of a fitted guide, per parameter site.

    A group variable is a Gaussian guide site named ``<param site>.<suffix>`` (e.g. the
    ``z`` of the group normal-Jeffreys prior, Louizos, Ullrich & Welling 2017, or the gates
    ``z`` of Lobacheva et al.), multiplying the parameter along a group axis. Its
    :math:`\log\alpha_z = \log\sigma_z^2 - \log\mu_z^2` is returned shaped to broadcast
    against the parameter: the variable's shape as it is when it already broadcasts, else read
    along the ``unit`` axis. Sites of other families (log-normal scales) are left out. A prior
    with a ``group_log_alpha(site, guide)`` method (group priors) is asked directly instead.
    Returns
    ``{param site: [log alpha tensors]}`` (empty when the guide has none).
    """
    out = {}
    sites = getattr(guide, "sites", {})
    for name, (layer, param, prior) in network.param_sites().items():
        shape = torch.Size(layer.param_shapes()[param])
        if hasattr(prior, "group_log_alpha"):  # a group prior that knows its own group variable
            out[name] = [prior.group_log_alpha(name, guide)]
            continue
        for gname, info in sites.items():
            if not gname.startswith(name + ".") or info.get("family") != "normal":
                continue
            loc, var = guide.site_posterior(gname)
            la = var.log() - loc.square().log()
            if la.dim() < len(shape) or _broadcasts(la.shape, shape) is False:
                unit = layer.param_axes[param].get("unit", 0)
                if la.numel() != shape[unit]:
                    continue
                view = [1] * len(shape)
                view[unit] = shape[unit]
                la = la.reshape(view)
            out.setdefault(name, []).append(la)
    return out


def _broadcasts(a, b):
    try:
        return torch.broadcast_shapes(a, b) == torch.Size(b)
    except RuntimeError:
        return False


# --------------------------------------------------------------------------- the interface


def reduce(summary, method, sparsity=None, threshold=None, structured=False, *, scope="global",
           reduced_scale=None, shrink=DEFAULT_SHRINK, groups=None, seed=0, generator=None) -> Decision:
    r"""Decide which weights (or units) of a posterior summary to remove.

    Args:
        summary: a :class:`~pyro_sparse.summary.PosteriorSummary` (site -> SiteSummary).
        method: one of :data:`METHODS`.
        sparsity: target fraction in [0, 1) of weights to remove (structured: of units per hidden
            layer), ranked by the rule's quantity. Required for ``opd``, ``magnitude`` and
            ``random`` unless ``threshold`` is given; optional for the evidence rules, which
            otherwise use their threshold; not accepted by ``spike-slab`` (it decides itself).
        threshold: the rule's threshold: prune ``delta_f > threshold`` (default 0) for ``bmr`` and
            ``savage-dickey``, ``log_alpha > threshold`` (default 3) for ``log-alpha``, score
            ``< threshold`` for ``opd``/``magnitude``/``random``. Not with ``sparsity``.
        structured: remove whole units/filters instead of single weights.
        scope: ``"global"`` (rank all weights together) or ``"layer"`` (the same fraction per
            tensor), for unstructured ``sparsity``.
        reduced_scale: ``bmr``/``spike-slab``: standard deviation ``g`` of the reduced prior
            :math:`N(0, g^2)`; default ``shrink`` times the prior's standard deviation.
        shrink: relative scale of the reduced prior when ``reduced_scale`` is not given (a shrunk
            copy of the full prior, Markovic et al. 2023), in (0, 1).
        groups: ``log-alpha`` only: ``site -> [log alpha of group variables]`` (:func:`group_log_alpha`).
        seed, generator: the random stream of ``random``.

    Returns a :class:`Decision`.
    """
    _check_method(method)
    sparsity = _check_sparsity(sparsity)
    threshold = _check_threshold(threshold)
    if sparsity is not None and threshold is not None:
        raise ValueError(f"threshold: give either sparsity ({sparsity}) or threshold ({threshold}), not both")
    if scope not in ("global", "layer"):
        raise ValueError(f"scope: must be 'global' or 'layer', got {scope!r}")
    if method == "spike-slab" and (sparsity is not None or threshold is not None):
        bad = "sparsity" if sparsity is not None else "threshold"
        raise ValueError(f"{bad}: the spike-slab rule decides its own layer-wise threshold zeta; "
                         f"got {bad}={sparsity if sparsity is not None else threshold!r}")
    if method not in _DEFAULT_THRESHOLD and method != "spike-slab" and sparsity is None and threshold is None:
        raise ValueError(f"sparsity: method {method!r} ranks weights and needs a target sparsity "
                         "(or a threshold on its score)")
    if reduced_scale is not None and not (isinstance(reduced_scale, Real) and reduced_scale > 0):
        raise ValueError(f"reduced_scale: must be a positive number, got {reduced_scale!r}")
    if not (isinstance(shrink, Real) and 0 < shrink < 1):
        raise ValueError(f"shrink: must be in (0, 1), got {shrink!r}")
    if not summary:
        raise ValueError("summary: has no sites")
    if generator is None:
        generator = torch.Generator().manual_seed(int(seed))

    options = {"sparsity": sparsity, "threshold": threshold, "structured": bool(structured), "scope": scope,
               "reduced_scale": reduced_scale, "shrink": shrink if method in ("bmr", "spike-slab") else None,
               "seed": seed}
    if threshold is None and sparsity is None and method in _DEFAULT_THRESHOLD:
        threshold = _DEFAULT_THRESHOLD[method]
        options["threshold"] = threshold

    weights = {k: s for k, s in summary.items() if _is_weight_name(k)}
    biases = {s.layer: s for k, s in summary.items() if not _is_weight_name(k)}
    if not weights:
        raise ValueError("summary: has no weight sites")
    output_layer = list(weights.values())[-1].layer
    natural = {k: _natural(s, method, reduced_scale, shrink, generator) for k, s in weights.items()}
    masks = {k: torch.ones_like(s.loc, dtype=torch.bool) for k, s in summary.items()}
    zeta, group_q = {}, {}

    if not structured:
        if sparsity is not None:
            masks.update(mask_by_sparsity({k: _keep_score(method, v) for k, v in natural.items()}, sparsity,
                                          scope=scope))
        elif method == "spike-slab":
            for k, v in natural.items():
                keep, z = spike_slab_decision(v)
                masks[k], zeta[k] = keep, float(z)
        elif method in _HIGH_PRUNES:
            masks.update({k: v <= threshold for k, v in natural.items()})
        else:
            masks.update({k: v >= threshold for k, v in natural.items()})
        if method == "log-alpha" and groups:
            for k, tensors in groups.items():
                if k in masks:
                    for la in tensors:
                        keep = la.to(masks[k].device) <= (3.0 if threshold is None else threshold)
                        masks[k] = masks[k] & keep.expand_as(masks[k])
    else:
        hidden = {k: s for k, s in weights.items() if s.layer != output_layer and "unit" in s.axes}
        for k, s in hidden.items():
            unit_dim = s.axes["unit"]
            if method == "log-alpha":
                unit_la = _unit_group_log_alpha(k, s, groups)
                group_q[s.layer] = unit_la
                continue
            bias = biases.get(s.layer)
            if method == "random":
                group_q[s.layer] = random_scores((s.loc.shape[unit_dim],), generator, dtype=s.loc.dtype)
                continue
            bias_q = _natural(bias, method, reduced_scale, shrink, generator) if bias is not None else None
            if method == "savage-dickey" and _low_rank(s) is not None:
                # a correlated block: the joint term of each unit's weights (plus its bias' term)
                _gaussian_parts(s, method)
                joint = _group_savage_dickey_block(s, unit_dim)
                group_q[s.layer] = joint + bias_q if bias_q is not None else joint
                continue
            group_q[s.layer] = _group_sum(method, natural[k], bias_q, unit_dim)
        if sparsity is not None:
            keep_units = mask_by_sparsity({L: _keep_score(method, q) for L, q in group_q.items()}, sparsity,
                                          scope="layer")
        elif method == "spike-slab":
            keep_units = {}
            for L, q in group_q.items():
                keep_units[L], z = spike_slab_decision(q)
                zeta[L] = float(z)
        elif method in _HIGH_PRUNES:
            keep_units = {L: q <= threshold for L, q in group_q.items()}
        else:
            keep_units = {L: q >= threshold for L, q in group_q.items()}
        for k, s in hidden.items():
            masks[k] = _expand_units(keep_units[s.layer], s.loc.shape, s.axes["unit"])
            bias = biases.get(s.layer)
            if bias is not None:
                masks[bias.name] = keep_units[s.layer].clone()

    units = {}
    for k, s in weights.items():
        if "unit" not in s.axes:
            continue
        unit_dim = s.axes["unit"]
        dims = tuple(d for d in range(s.loc.dim()) if d != unit_dim)
        kept = masks[k].any(dim=dims) if dims else masks[k].clone()
        if s.layer == output_layer:
            kept = torch.ones_like(kept)
        units[s.layer] = kept
    return Decision(method, masks, natural, _SCORE_NAME[method], units, group_q, options, zeta)


def _unit_group_log_alpha(name, site, groups):
    unit_dim = site.axes["unit"]
    n = site.loc.shape[unit_dim]
    for la in (groups or {}).get(name, []):
        dims = [d for d in range(la.dim()) if la.shape[d] != 1]
        if dims == [unit_dim] or (not dims and n == 1):
            return la.reshape(-1).expand(n).clone() if la.numel() == 1 else la.reshape(n)
    raise ValueError(f"structured: method 'log-alpha' removes units through unit group variables, and site "
                     f"{name!r} has none (fit a model with a group prior, or use an unstructured rule)")


def _expand_units(keep, shape, unit_dim):
    view = [1] * len(shape)
    view[unit_dim] = shape[unit_dim]
    return keep.reshape(view).expand(shape).clone()
