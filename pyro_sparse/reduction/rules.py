r"""The reduction rules, one registered object each, and ``reduce(summary, rule, ...) -> Decision``.

A rule reads only a :class:`~pyro_sparse.summary.PosteriorSummary` (per parameter tensor: the
Gaussian posterior marginals ``N(loc, 1/precision)``, the Gaussian (conditional) prior
``N(prior_loc, 1/prior_precision)``, and the group quantities of priors with a rule of their
own) and gives a per-element quantity; :func:`reduce` turns it into a :class:`Decision` by the
rule's threshold or by a target sparsity. Each rule's default threshold is written once, on
its class:

=====================  ===============================================================  ============
rule                   per-element quantity (``Decision.scores``)                       prune where
=====================  ===============================================================  ============
``bmr``                :math:`\Delta F` of the reduced prior :math:`N(0, g^2)` (BMR)    dF > 0
``savage-dickey``      :math:`\Delta F = \ln q(0) - \ln p(0)` (point-mass reduced prior)  dF > 0
``spike-slab``         :math:`\Delta F` of ``bmr``; layer-wise spike-and-slab on it      dF > zeta
``log-alpha``          :math:`\log\alpha = \log\sigma^2 - \log\theta^2` (Sparse VD)      > 3
``opd``                :math:`s_i = P_{ii}\theta_i^2` (Optimal Posterior Damage)          lowest
``magnitude``          :math:`|\theta_i|`                                                lowest
``random``             uniform(0, 1)                                                     lowest
``group-log-alpha``    :math:`\log\alpha_z` of the group's z (group log-uniform prior)   > 0
``horseshoe-scale``    relative scale :math:`\tilde\lambda_g = s_g/\tau` (horseshoe)      < 3
=====================  ===============================================================  ============

(Friston & Penny 2011; Markovic, Friston & Kiebel 2023 for BMR, Savage-Dickey and the
spike-and-slab decision; Molchanov, Ashukha & Vetrov 2017 for log alpha; Dhahri et al. 2024
for OPD; Louizos, Ullrich & Welling 2017 for the group log alpha; Carvalho, Polson & Scott 2010
and Piironen & Vehtari 2017 for the horseshoe scales; the formulas live in :mod:`.bmr` and
:mod:`.scores`.)

**What a rule judges.** Unstructured rules act on the *weights* (sites whose role is
``weight``) and, where they can score them, on the multiplicative *group variables* of a layer
(role ``group``: the :math:`z^x, z^h, \hat z` of a gated LSTM, Lobacheva et al. 2018); biases
are kept. The priors' own rules judge the weights whose prior gave the group quantity they
read (:meth:`~pyro_sparse.priors.Prior.group_summary`) and keep the rest. With ``sparsity=Q``
the lowest-ranked ``round(Q * N)`` weights are removed, ranked globally (``scope="global"``) or
within each tensor (``scope="layer"``); evidence rules rank by ``-dF`` / ``-log alpha``. A unit
whose incoming weights are all removed outputs the constant ``act(b)``, and compaction
(:mod:`pyro_sparse.compaction_protocol`) deletes it, folding that constant into the next layer's bias;
it also turns removed recurrent group variables into removed neurons and constant gates.

**Structured** rules (``structured=True``) remove whole units (output neurons / conv filters):
the group of a unit is its row of the weight and its bias; the group quantity is the sum over
the group (:math:`\Delta F_g = \sum_k \Delta F_k` under a factorised posterior,
:math:`S_g = \sum_i s_i` for OPD, :math:`\sum\theta_i^2` for magnitude, one uniform draw per
unit for random; the priors' rules read their per-unit quantity directly). Where the summary
has a correlated block (a low-rank or full posterior covariance), ``savage-dickey`` uses the
joint term of each unit, :math:`\ln N(0; \mu_g, \Sigma_g) - \ln p(0)`, and ``opd`` reads
:math:`P_{ii}` off the block's precision. ``sparsity`` is then the fraction of units removed
from each hidden layer. The last parametric layer of the summary is the network output and
never loses units.

New rules subclass :class:`Rule` and are registered in :data:`pyro_sparse.registry.RULES`.
"""

from __future__ import annotations

import math
from abc import abstractmethod
from dataclasses import dataclass, field
from numbers import Real

import torch

from ..registry import RULES
from ..summary import param_role
from .bmr import bmr_diagonal_zero_mean, bmr_gaussian, group_delta_f, savage_dickey, spike_slab_decision
from .scores import magnitude_scores, mask_by_sparsity, mask_n_m, opd_scores, parse_pattern, random_scores

__all__ = ["Rule", "Decision", "reduce", "rule", "applicable_rules", "DEFAULT_SHRINK",
           "BMR", "SavageDickey", "SpikeSlab", "LogAlpha", "OPD", "Magnitude", "Random", "GroupLogAlpha",
           "HorseshoeScale"]

#: default reduced prior of ``bmr``: N(0, (shrink * s)^2), s the prior standard deviation
DEFAULT_SHRINK = 1e-2


class NotApplicable(ValueError):
    """A rule cannot judge a posterior summary (names the site and why)."""


# =========================================================================== the rules


class Rule:
    """A reduction rule: a per-element quantity read off the posterior summary, the side of its
    threshold that is pruned, and its default threshold (``None``: it only ranks to a sparsity).

    Attributes: ``name`` (what ``--method`` and a recipe's ``reduction.method`` say),
    ``quantity`` (what the score is, for reports), ``score_name`` (``Decision.score_name``),
    ``prunes`` (``"above"``: high values are pruned, like evidence for removal; ``"below"``: low
    scores are pruned), ``threshold`` (the default), ``ranks`` (a target sparsity may be asked
    for), ``plot`` (``"symlog"``, ``"log10"`` or None: how a histogram shows the quantity).
    """

    name = "rule"
    quantity = ""
    score_name = "score"
    prunes = "above"
    threshold: float | None = None
    ranks = True
    plot: str | None = None
    #: reads marginal variances (a diagonal Laplace precision is then an approximation it names)
    reads_marginal = False
    #: removes weights by the evidence with the reduced posterior mean on a structured summary
    #: (:meth:`compensated_delta_f`)
    compensates = False
    #: decides by the evidence (a change in free energy) of a Gaussian posterior against a Gaussian
    #: prior: the rules iterative BMR can prune with during training
    evidence = False
    #: reads a per-group quantity a prior puts into the summary (``site.groups[name]``)
    reads_groups = False

    def compensated_delta_f(self, context):
        """``delta_f(mu, var, prior_precision)``: the rule's single-weight evidence change on a
        marginal ``N(mu, var)`` under the zero-mean prior ``N(0, 1/prior_precision)``, element-wise;
        what the compensated reduction (:mod:`.compensate`) removes by."""
        raise NotImplementedError

    @abstractmethod
    def scores(self, site, context) -> torch.Tensor | None:
        """The quantity per element of ``site`` (broadcastable to ``site.loc``), or None where the
        rule does not judge this site (it is kept). Raise :class:`NotApplicable` where it should
        but cannot (a weight without what the rule needs)."""
        raise NotImplementedError

    def judges(self, site) -> bool:
        """Whether the rule looks at ``site`` at all: weights, and group variables for rules that
        score them."""
        return site.role == "weight"

    def unit_scores(self, site, bias, unit_dim, context):
        """The per-unit quantity of structured reduction: the sum over the unit's weights and its
        bias (``bias``: the bias site or None)."""
        weight_q = self.scores(site, context)
        bias_q = self.scores(bias, context) if bias is not None else None
        dims = tuple(d for d in range(weight_q.dim()) if d != unit_dim)
        total = group_delta_f(weight_q, dim=dims) if dims else weight_q.clone()
        return total + bias_q if bias_q is not None else total

    def keep_score(self, natural):
        """Higher = keep, for ranking to a target sparsity."""
        return -natural if self.prunes == "above" else natural

    def keep(self, natural, threshold):
        return natural <= threshold if self.prunes == "above" else natural >= threshold

    def __repr__(self):
        return f"<rule {self.name}>"


def _gaussian_parts(site, rule):
    """Posterior precision and prior of a site, checked for what BMR needs."""
    if not bool(torch.isfinite(site.precision).all()):
        raise NotApplicable(
            f"rule {rule!r}: site {site.name!r} has an infinite posterior precision (a point estimate, e.g. a "
            "MAP/delta guide); it needs a Gaussian posterior: use an SVI or Laplace fit, or rule 'magnitude'")
    prior_precision = site.prior_precision
    if not bool(((prior_precision > 0) & torch.isfinite(prior_precision)).all()):
        raise NotApplicable(
            f"rule {rule!r}: site {site.name!r} has no proper Gaussian prior (prior precision "
            f"{prior_precision.flatten()[0].item()!r}, e.g. the log-uniform prior); use rule 'log-alpha'")
    return site.precision, site.prior_loc, prior_precision


def _proper(site):
    return (bool(torch.isfinite(site.precision).all())
            and bool(((site.prior_precision > 0) & torch.isfinite(site.prior_precision)).all()))


class _Evidence(Rule):
    """Rules on the change in free energy :math:`\\Delta F` of removing each element."""

    score_name = "delta_f"
    prunes = "above"
    threshold = 0.0
    plot = "symlog"
    reads_marginal = True
    evidence = True

    def judges(self, site):
        return site.role in ("weight", "group")

    def scores(self, site, context):
        if site.role == "group" and not _proper(site):
            return None  # a group variable under an improper prior: left to log-alpha
        return self.delta_f(site, context)

    def delta_f(self, site, context):
        raise NotImplementedError


class BMR(_Evidence):
    r"""Bayesian model reduction towards the reduced prior :math:`N(0, g^2)` (Friston & Penny 2011):
    :math:`\Delta F = \ln p(y \mid \tilde m) - \ln p(y \mid m)`, diagonal closed form; ``g`` is
    ``reduced_scale`` or ``shrink`` times the prior's standard deviation."""

    name = "bmr"
    quantity = "BMR dF of the reduced prior N(0, g^2)"

    def delta_f(self, site, context):
        precision, prior_loc, prior_precision = _gaussian_parts(site, self.name)
        reduced_scale, shrink = context["reduced_scale"], context["shrink"]
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

    compensates = True

    def compensated_delta_f(self, context):
        reduced_scale, shrink = context["reduced_scale"], context["shrink"]

        def delta_f(mu, var, prior_precision):
            prior_scale = prior_precision.rsqrt()
            g = float(reduced_scale) if reduced_scale is not None else shrink * prior_scale
            return bmr_diagonal_zero_mean(mu, var.reciprocal(), prior_scale, g)

        return delta_f


class SavageDickey(_Evidence):
    r"""Savage-Dickey: the BMR limit of a point-mass reduced prior,
    :math:`\Delta F = \ln q(0) - \ln p(0)`; per unit under a correlated block, the joint term."""

    name = "savage-dickey"
    quantity = "Savage-Dickey dF = ln q(0) - ln p(0)"

    def delta_f(self, site, context):
        precision, prior_loc, prior_precision = _gaussian_parts(site, self.name)
        return savage_dickey(site.loc, precision, prior_loc, prior_precision)

    compensates = True

    def compensated_delta_f(self, context):
        def delta_f(mu, var, prior_precision):
            return savage_dickey(mu, var.reciprocal(), 0.0, prior_precision)

        return delta_f

    def unit_scores(self, site, bias, unit_dim, context):
        if _low_rank(site) is None:
            return super().unit_scores(site, bias, unit_dim, context)
        _gaussian_parts(site, self.name)
        joint = _group_savage_dickey_block(site, unit_dim)
        return joint + self.scores(bias, context) if bias is not None else joint


class SpikeSlab(BMR):
    r"""The layer-wise spike-and-slab decision on the BMR evidence (Markovic et al. 2023): the
    log prior odds :math:`\zeta` of each layer are fitted to its :math:`\Delta F` and a weight
    goes where :math:`\Delta F > \zeta`; no threshold, no target sparsity."""

    name = "spike-slab"
    quantity = "BMR dF, layer-wise spike-and-slab threshold zeta"
    threshold = None
    ranks = False
    compensates = False


class LogAlpha(Rule):
    r"""Sparse variational dropout (Molchanov, Ashukha & Vetrov 2017): prune where
    :math:`\log\alpha = \log\sigma^2 - \log\theta^2 > 3`, i.e. where the multiplicative noise
    variance is 20 times the signal's (a Gaussian dropout rate above 0.95). Applies to weights
    and to group variables with a Gaussian posterior (the gates and neurons of Lobacheva et al.
    2018)."""

    name = "log-alpha"
    quantity = "log alpha = log sigma^2 - log theta^2"
    score_name = "log_alpha"
    prunes = "above"
    threshold = 3.0
    reads_marginal = True

    def judges(self, site):
        return site.role in ("weight", "group")

    def scores(self, site, context):
        if site.log_alpha is None:
            if site.role == "group":
                return None
            raise NotApplicable(f"rule 'log-alpha': site {site.name!r} has no log alpha (it needs a Gaussian "
                                "posterior with a variance, e.g. the mean-field guide or a Laplace fit)")
        return site.log_alpha

    def unit_scores(self, site, bias, unit_dim, context):
        raise NotApplicable("structured: rule 'log-alpha' judges single weights; whole units go by the group "
                            "rule of a group prior (group-log-alpha, horseshoe-scale), or by the unstructured rule "
                            "when the removed weights leave a unit without inputs or outputs")


class OPD(Rule):
    r"""Optimal Posterior Damage (Dhahri et al. 2024): the saliency :math:`s_i = P_{ii}\theta_i^2`
    with the posterior precision :math:`P`; the lowest scores are pruned to a target sparsity."""

    name = "opd"
    quantity = "OPD score P theta^2"
    score_name = "opd"
    prunes = "below"
    plot = "log10"

    def scores(self, site, context):
        if not bool(torch.isfinite(site.precision).all()):
            raise NotApplicable(f"rule 'opd': site {site.name!r} has an infinite posterior precision (a point "
                                "estimate); OPD needs a posterior precision (SVI or Laplace fit)")
        return opd_scores(site.loc, site.precision_diagonal() if site.structure is not None
                          else _precision_diagonal(site))


class Magnitude(Rule):
    """The magnitude baseline :math:`|\\theta_i|` (per unit: :math:`\\sum\\theta_i^2`)."""

    name = "magnitude"
    quantity = "|theta|"
    score_name = "magnitude"
    prunes = "below"
    plot = "log10"

    def scores(self, site, context):
        return magnitude_scores(site.loc)

    def unit_scores(self, site, bias, unit_dim, context):
        dims = tuple(d for d in range(site.loc.dim()) if d != unit_dim)
        total = site.loc.square().sum(dims) if dims else site.loc.square()
        return total + bias.loc.square() if bias is not None else total


class Random(Rule):
    """Uniform random scores, the baseline every rule should beat."""

    name = "random"
    quantity = "uniform(0, 1)"
    score_name = "random"
    prunes = "below"

    def scores(self, site, context):
        loc = site.loc
        return random_scores(loc.shape, context["generator"], dtype=loc.dtype, device=loc.device)

    def unit_scores(self, site, bias, unit_dim, context):
        return random_scores((site.loc.shape[unit_dim],), context["generator"], dtype=site.loc.dtype)


class _GroupRule(Rule):
    """A prior's own rule: it reads the per-group quantity the prior put into the summary
    (``site.groups[name]``, :meth:`~pyro_sparse.priors.Prior.group_values` of a prior whose
    ``rule`` it is) and judges only the weights of that prior."""

    reads_groups = True

    def scores(self, site, context):
        value = site.groups.get(self.name)
        return None if value is None else value.to(site.loc.device)

    def unit_scores(self, site, bias, unit_dim, context):
        value = self.scores(site, context)
        if value is None:
            return None
        dims = [d for d in range(value.dim()) if value.shape[d] != 1]
        if dims not in ([unit_dim], []):
            raise NotApplicable(f"structured: rule {self.name!r} removes units through unit groups, and the groups "
                                f"of {site.name!r} are not its units (shape {tuple(value.shape)})")
        return value.reshape(-1).expand(site.loc.shape[unit_dim]).clone()


class GroupLogAlpha(_GroupRule):
    r"""The group normal-Jeffreys prior's rule (Louizos, Ullrich & Welling 2017): remove the
    groups whose multiplicative variable has :math:`\log\alpha_z = \log\sigma_z^2 - \log\mu_z^2`
    above 0, i.e. :math:`\alpha = 1`: noise on the group as large as its signal. Louizos et al.
    set the thresholds per layer by hand; on the digits MLP the fitted :math:`\log\alpha_z` form
    two clusters, below about -1 and above about 5, and 0 separates them."""

    name = "group-log-alpha"
    quantity = "log alpha of the group variable z"
    score_name = "group_log_alpha"
    prunes = "above"
    threshold = 0.0


class HorseshoeScale(_GroupRule):
    r"""The horseshoe's rule: keep the groups whose relative scale
    :math:`\tilde\lambda_g = s_g/\tau` (posterior medians) is at least 3. A group the data do not
    need keeps its local scale near the prior's typical values (the KL alone puts the median of
    :math:`\lambda^2` near 1), while groups that carry signal move into the Cauchy tail; 3 is
    about the 80th percentile of :math:`C^+(0, 1)`, above the no-data mode (Carvalho, Polson &
    Scott 2010 threshold the shrinkage coefficient :math:`1/(1 + \lambda^2)` in the same spirit)."""

    name = "horseshoe-scale"
    quantity = "relative scale s_g / tau"
    score_name = "relative_scale"
    prunes = "below"
    threshold = 3.0
    plot = "log10"


def rule(name) -> Rule:
    """The registered rule ``name`` (a :class:`Rule` passes through); ValueError naming the rules."""
    if isinstance(name, Rule):
        return name
    if not isinstance(name, str) or name not in RULES:
        raise ValueError(f"method: unknown reduction rule {name!r}; expected one of {list(RULES)}")
    return RULES[name]


def applicable_rules(summary) -> dict:
    """``name -> reason`` for every registered rule: None where it applies to ``summary``, else
    why not (as :func:`reduce` would say)."""
    out = {}
    for name, r in RULES.items():
        try:
            _natural(summary, r, _context(r, None, DEFAULT_SHRINK, torch.Generator().manual_seed(0)))
            out[name] = None
        except ValueError as e:
            out[name] = str(e)
    return out


# =========================================================================== the decision


@dataclass
class Decision:
    """What a reduction rule decided.

    Attributes:
        method: the rule's name.
        masks: site name -> bool tensor shaped like the parameter, True = keep (every site of
            the summary, biases included).
        scores: judged site -> the per-element quantity the rule ranked by (``score_name``).
        score_name: what ``scores`` holds (``delta_f``, ``log_alpha``, ``opd``, ...).
        units: layer -> bool tensor over its output units, True = kept by the rule (a unit whose
            incoming weights are all removed counts as removed). The output layer keeps all its
            units. Compaction may remove more (units nothing reads).
        group_scores: structured rules: layer -> the per-unit group quantity.
        options: the arguments the rule ran with (sparsity, threshold, scope, ...).
        zeta: spike-and-slab: weight site (or layer, structured) -> the fitted log-odds zeta.
        values: compensated reductions: site -> the reduced posterior mean (the kept weights moved,
            the removed ones 0) of every reduced layer's weight and bias; empty otherwise (the
            summary's means stand).
        layers: compensated reductions: layer -> what was done (``removed``, ``total``,
            ``delta_f``: the evidence change of the removal, ``path``, ``output_scale``, ``refit``).
        approximation: how the posterior was read where it is not what the rule assumes (a
            diagonal Laplace precision taken as the marginal one, row blocks of a Kronecker
            posterior), or None.
    """

    method: str
    masks: dict
    scores: dict
    score_name: str
    units: dict
    group_scores: dict = field(default_factory=dict)
    options: dict = field(default_factory=dict)
    zeta: dict = field(default_factory=dict)
    values: dict = field(default_factory=dict)
    layers: dict = field(default_factory=dict)
    approximation: str | None = None

    def weight_sites(self):
        return [k for k in self.masks if _role(k) == "weight"]

    def counts(self, weights_only=True):
        """``(kept, total)`` over the weights (or every parameter) by the rule's masks."""
        names = self.weight_sites() if weights_only else list(self.masks)
        kept = sum(int(self.masks[k].sum()) for k in names)
        total = sum(self.masks[k].numel() for k in names)
        return kept, total

    @property
    def sparsity(self) -> float:
        """Fraction of weights (biases and group variables excluded) the rule removed."""
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
        out = {"method": self.method, "sparsity": self.sparsity, "weights_kept": kept, "weights_total": total,
               "params_kept": kept_all, "params_total": total_all,
               "units_removed": sum(self.units_removed.values()),
               "units_removed_per_layer": self.units_removed,
               "options": {k: v for k, v in self.options.items() if _jsonable(v)},
               "compensated": bool(self.values), "approximation": self.approximation}
        if self.layers:
            out["layers"] = {k: {**v, "sparsity": v["removed"] / max(v["total"], 1)} for k, v in self.layers.items()}
        return out


def _jsonable(v):
    return v is None or isinstance(v, (bool, int, float, str))


def _role(name):
    return param_role(name)


# =========================================================================== checks


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


# =========================================================================== helpers of the maths


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


def _context(r, reduced_scale, shrink, generator):
    return {"rule": r, "reduced_scale": reduced_scale, "shrink": shrink, "generator": generator}


def _natural(summary, r, context) -> dict:
    """Judged site -> the rule's per-element quantity (broadcast to the site's shape)."""
    out = {}
    for k, s in summary.items():
        if r.judges(s):
            q = r.scores(s, context)
            if q is not None:
                out[k] = q.expand(s.loc.shape)
    if not any(summary[k].role == "weight" for k in out):
        if isinstance(r, _GroupRule):
            raise NotApplicable(f"rule {r.name!r} reads the group quantity of its prior, and no site of this "
                                "summary has one (fit a model with that prior)")
        raise NotApplicable(f"rule {r.name!r}: the summary has no weight sites it can judge")
    return out


# =========================================================================== the interface


def reduce(summary, method: str | Rule, sparsity: float | None = None, threshold: float | None = None,
           structured: bool = False, *, scope: str = "global", reduced_scale: float | None = None,
           shrink: float = DEFAULT_SHRINK, seed: int = 0, generator: torch.Generator | None = None,
           compensate: bool | None = None, calibration=None, pattern: str | None = None,
           output_scale: str | None = None) -> Decision:
    r"""Decide which weights (or units) of a posterior summary to remove.

    Args:
        summary: a :class:`~pyro_sparse.summary.PosteriorSummary` (site -> SiteSummary).
        method: a registered rule's name (:data:`pyro_sparse.registry.RULES`) or a :class:`Rule`.
        sparsity: target fraction in [0, 1) of weights to remove (structured: of units per hidden
            layer), ranked by the rule's quantity. Required for rules without a default threshold
            (``opd``, ``magnitude``, ``random``) unless ``threshold`` is given; not accepted by
            ``spike-slab`` (it decides itself).
        threshold: the rule's threshold (default: the rule's own, e.g. 3 for ``log-alpha``). Not
            with ``sparsity``.
        structured: remove whole units/filters instead of single weights.
        scope: ``"global"`` (rank all weights together) or ``"layer"`` (the same fraction per
            tensor), for unstructured ``sparsity``.
        reduced_scale: ``bmr``/``spike-slab``: standard deviation ``g`` of the reduced prior
            :math:`N(0, g^2)`; default ``shrink`` times the prior's standard deviation.
        shrink: relative scale of the reduced prior when ``reduced_scale`` is not given (a shrunk
            copy of the full prior, Markovic et al. 2023), in (0, 1).
        seed, generator: the random stream of ``random``.
        compensate: ``bmr`` and ``savage-dickey`` on a summary whose weight sites carry a layer
            structure (Kronecker factors or row blocks, :mod:`pyro_sparse.kron`): remove weights
            by the evidence and move the kept ones to the reduced posterior mean
            (:mod:`.compensate`); default on where the summary has the structure (None), never
            for ``structured``.
        calibration: with compensation, an object whose ``input_moment(layer, values)`` gives a
            layer's input second moment on the reduced network: the layers are then reduced in
            order on the reduced network's own inputs (a Laplace fit's ``calibration(data)``).
        output_scale: with compensation, ``"unit"`` (each layer in its own output units) or
            ``"posterior"`` (as fitted); see :mod:`.compensate`. Default: the summary's own
            (``unit`` for a classifier's Laplace posterior, ``posterior`` for a regression's).
        pattern: ``"N:M"`` (e.g. ``"2:4"``): of every M consecutive weights along a weight's input
            axis keep at most the N the rule ranks highest (:func:`~.scores.mask_n_m`), on every
            weight site the rule judges. Alone it is the whole decision (the rule's default
            threshold is not applied); with ``sparsity`` or ``threshold`` a weight must pass both.
            With compensation the pattern is the whole target, and the kept weights move.

    Returns a :class:`Decision`.
    """
    r = rule(method)
    n_m = parse_pattern(pattern) if pattern is not None else None
    if n_m is not None and (structured or not r.ranks):
        raise ValueError(f"pattern: an N:M pattern ranks single weights; not with "
                         f"{'structured' if structured else f'the {r.name} rule (it decides its own threshold)'}")
    sparsity = _check_sparsity(sparsity)
    threshold = _check_threshold(threshold)
    if sparsity is not None and threshold is not None:
        raise ValueError(f"threshold: give either sparsity ({sparsity}) or threshold ({threshold}), not both")
    if scope not in ("global", "layer"):
        raise ValueError(f"scope: must be 'global' or 'layer', got {scope!r}")
    if not r.ranks and (sparsity is not None or threshold is not None):
        bad = "sparsity" if sparsity is not None else "threshold"
        raise ValueError(f"{bad}: the {r.name} rule decides its own threshold; "
                         f"got {bad}={sparsity if sparsity is not None else threshold!r}")
    if r.ranks and r.threshold is None and sparsity is None and threshold is None and n_m is None:
        raise ValueError(f"sparsity: rule {r.name!r} ranks weights and needs a target sparsity "
                         "(or a threshold on its score)")
    if reduced_scale is not None and not (isinstance(reduced_scale, Real) and reduced_scale > 0):
        raise ValueError(f"reduced_scale: must be a positive number, got {reduced_scale!r}")
    if not (isinstance(shrink, Real) and 0 < shrink < 1):
        raise ValueError(f"shrink: must be in (0, 1), got {shrink!r}")
    if not summary:
        raise ValueError("summary: has no sites")
    if generator is None:
        generator = torch.Generator().manual_seed(int(seed))
    if threshold is None and sparsity is None and n_m is None:
        threshold = r.threshold
    options = {"sparsity": sparsity, "threshold": threshold, "structured": bool(structured), "scope": scope,
               "reduced_scale": reduced_scale, "shrink": shrink if isinstance(r, BMR) else None, "seed": seed,
               "pattern": None if n_m is None else f"{n_m[0]}:{n_m[1]}"}
    context = _context(r, reduced_scale, shrink, generator)

    weights = summary.of_role("weight")
    if not weights:
        raise ValueError("summary: has no weight sites")
    compensate = _compensates(summary, weights, r, structured, compensate, pattern)
    output_scale = output_scale or getattr(summary, "output_scale", None) or "unit"
    approximation = _approximation(summary, r, compensate, output_scale)
    biases = {s.layer: s for s in summary.of_role("bias").values()}
    output_layer = list(weights.values())[-1].layer
    masks = {k: torch.ones_like(s.loc, dtype=torch.bool) for k, s in summary.items()}
    zeta, group_q = {}, {}

    values, layer_info = {}, {}
    if compensate:
        from .compensate import compensated_reduction

        if n_m is not None and (sparsity is not None or threshold is not None):
            raise ValueError("pattern: with compensation an n:m pattern is the whole target; give no sparsity or "
                             "threshold with it")

        natural = _natural(summary, r, context)
        found, values, layer_info = compensated_reduction(
            summary, r.compensated_delta_f(context), sparsity=sparsity, threshold=threshold or 0.0, scope=scope,
            pattern=pattern, calibration=calibration, output_scale=output_scale)
        masks.update(found)
        options.update({"compensate": True, "output_scale": output_scale, "layer_by_layer": calibration is not None})
    elif not structured:
        natural = _natural(summary, r, context)
        ranked = {k: v for k, v in natural.items() if summary[k].role == "weight"}
        if sparsity is not None:
            masks.update(mask_by_sparsity({k: r.keep_score(v) for k, v in ranked.items()}, sparsity, scope=scope))
        elif not r.ranks:  # spike-and-slab: its own threshold per tensor
            for k, v in natural.items():
                keep, z = spike_slab_decision(v)
                masks[k], zeta[k] = keep, float(z)
        elif threshold is not None:
            masks.update({k: r.keep(v, threshold) for k, v in natural.items()})
        if n_m is not None:  # N:M along the input axis, by the rule's own ranking
            for k, v in ranked.items():
                if "input" in summary[k].axes and v.dim() > 1:
                    masks[k] = masks[k] & mask_n_m(r.keep_score(v), *n_m, dim=summary[k].axes["input"])
    else:
        natural = {}
        hidden = {k: s for k, s in weights.items() if s.layer != output_layer and "unit" in s.axes}
        for k, s in hidden.items():
            q = r.unit_scores(s, biases.get(s.layer), s.axes["unit"], context)
            if q is not None:
                group_q[s.layer] = q
        if not group_q:
            raise NotApplicable(f"structured: rule {r.name!r} scores no hidden units of this summary")
        if sparsity is not None:
            keep_units = mask_by_sparsity({L: r.keep_score(q) for L, q in group_q.items()}, sparsity, scope="layer")
        elif not r.ranks:
            keep_units = {}
            for L, q in group_q.items():
                keep_units[L], z = spike_slab_decision(q)
                zeta[L] = float(z)
        else:
            keep_units = {L: r.keep(q, threshold) for L, q in group_q.items()}
        for k, s in hidden.items():
            if s.layer not in keep_units:
                continue
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
    return Decision(r.name, masks, natural, r.score_name, units, group_q, options, zeta, values, layer_info,
                    approximation)


def _compensates(summary, weights, r, structured, compensate, pattern) -> bool:
    """Whether :func:`reduce` compensates: as asked, or (None) wherever the rule can and every
    weight site has a layer structure."""
    has = all(s.structure is not None for s in weights.values())
    if compensate is None:
        compensate = r.compensates and has and not structured
    if compensate:
        if not r.compensates:
            raise NotApplicable(f"compensate: rule {r.name!r} does not move the kept weights; the compensated rules "
                                "are bmr and savage-dickey")
        if structured:
            raise NotApplicable("compensate: the compensated reduction removes single weights; use structured=False "
                                "or compensate=False")
        if not has:
            bare = next(k for k, s in weights.items() if s.structure is None)
            raise NotApplicable(f"compensate: site {bare!r} has no correlated posterior (a diagonal or mean-field "
                                "summary); fit the Laplace posterior with curvature kfac or rows, or compensate=False")
        if any(bool((s.prior_loc != 0).any()) for s in weights.values()):
            raise NotApplicable("compensate: the reduced posterior mean is computed for zero-mean priors")
    return bool(compensate)


def _approximation(summary, r, compensate, output_scale):
    """What the decision says about how it read the posterior (see :class:`Decision`)."""
    if compensate:
        kinds = sorted({s.structure.kind for s in summary.values() if s.structure is not None})
        return (f"row blocks of the {' and '.join(kinds)} posterior (rows independent), output scale {output_scale}")
    if r.reads_marginal and any(not s.marginal for s in summary.values() if r.judges(s)):
        return ("diagonal precision P_ii read as the marginal precision 1/Sigma_ii (a diagonal Laplace posterior: "
                "exact only where the curvature is diagonal; fit curvature kfac or rows for the marginals)")
    return None


def _expand_units(keep, shape, unit_dim):
    view = [1] * len(shape)
    view[unit_dim] = shape[unit_dim]
    return keep.reshape(view).expand(shape).clone()
