r"""The posterior summary: where every fitting method ends and every reduction rule starts.

For each layer parameter (``fc1.weight``, ...) a :class:`SiteSummary` holds a Gaussian
approximation of its posterior marginals, ``N(loc, 1/precision)`` element-wise (plus an
optional full or low-rank block where the guide has one, or the structure of its layer's
posterior precision -- Kronecker factors or row blocks, :mod:`pyro_sparse.kron` -- shared by the
layer's weight and bias), and the Gaussian prior that produced
it, ``N(prior_loc, 1/prior_precision)`` (for hierarchical priors: the conditional prior given
the fitted scales), its ``role`` (a ``weight``, a ``bias``, or a ``group`` variable that
multiplies other parameters, like the ``z`` of a gated LSTM) and, for a prior with a rule of
its own, the group quantity that rule reads (``groups``: the log alpha of a group log-uniform
``z``, the relative scale of a horseshoe group). Every reduction rule
(:mod:`pyro_sparse.reduction.rules`) reads only this, so the rules run unchanged on SVI and
Laplace posteriors (DESIGN.md, "The flow of one run").

``precision`` is a *marginal* precision :math:`1/\Sigma_{ii}` (``marginal=True``: a mean-field
posterior, whose marginals are its factors, or a structure that gives the marginal variances)
or the diagonal :math:`P_{ii}` of a precision matrix whose off-diagonal entries were dropped
(``marginal=False``: a diagonal Laplace posterior), a *conditional* precision, with
:math:`1/P_{ii} \le \Sigma_{ii}`. Rules that need the marginal say which they read.

Where a summary comes from: :func:`summarize` (a fitted guide: mean-field, structured,
low-rank, delta) and :meth:`pyro_sparse.laplace.posterior.LaplacePosterior.summary` (a Laplace
fit); a fitted run gives its own through ``trainer.posterior_summary()``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .distributions import log_alpha


@dataclass
class SiteSummary:
    """Gaussian posterior and Gaussian (conditional) prior of one parameter tensor."""

    layer: str
    param: str
    loc: torch.Tensor
    precision: torch.Tensor  # diagonal posterior precision, same shape as loc
    prior_loc: torch.Tensor  # broadcastable to loc
    prior_precision: torch.Tensor  # broadcastable to loc
    axes: dict = field(default_factory=dict)  # group axis -> tensor dim
    log_alpha: torch.Tensor | None = None  # Sparse VD log sigma^2/theta^2, where defined
    block: dict | None = None  # {"precision": (n, n)} or {"cov_factor", "cov_diag"} over loc.flatten()
    groups: dict = field(default_factory=dict)  # prior's rule name -> one value per group (broadcastable)
    structure: object = None  # the layer's KroneckerPrecision or RowPrecision (pyro_sparse.kron), or None
    marginal: bool = True  # precision is 1/marginal variance (else the diagonal of a precision matrix)

    @property
    def name(self):
        return f"{self.layer}.{self.param}"

    @property
    def role(self) -> str:
        """``weight``, ``bias`` or ``group`` (:func:`param_role`)."""
        return param_role(self.param)

    @property
    def variance(self):
        return self.precision.reciprocal()

    def precision_diagonal(self):
        """:math:`P_{ii}`, the diagonal of the posterior precision matrix (what OPD reads): the
        structure's where there is one, else ``precision`` (for a mean-field posterior both are
        the same; a low-rank block is handled by the rules)."""
        if self.structure is not None:
            return self.structure.split(self.structure.precision_diagonal())[self.name].to(self.loc.dtype)
        return self.precision

    def to(self, device=None, dtype=None):
        def move(t):
            return t.to(device=device, dtype=dtype) if torch.is_tensor(t) else t

        return SiteSummary(self.layer, self.param, move(self.loc), move(self.precision), move(self.prior_loc),
                           move(self.prior_precision), self.axes, move(self.log_alpha),
                           {k: move(v) for k, v in self.block.items()} if self.block else None,
                           {k: move(v) for k, v in self.groups.items()}, self.structure, self.marginal)


def param_role(param: str) -> str:
    """What a parameter is, from its name: ``weight`` (``weight``, ``weight_ih``, ...), ``bias``,
    or ``group`` (a multiplicative group variable such as ``z_hidden``, ``z_tokens``)."""
    base = param.rsplit(".", 1)[-1]
    if base.startswith("bias"):
        return "bias"
    return "weight" if base.startswith("weight") else "group"


class PosteriorSummary(dict):
    """Site name -> :class:`SiteSummary`, in network order; ``method`` says where it came from."""

    def __init__(self, *args, method: str = "", output_scale: str | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.method = method
        #: how the compensated reduction reads the layer structures by default (``unit`` or
        #: ``posterior``, :mod:`pyro_sparse.reduction.compensate`); None: ``unit``
        self.output_scale = output_scale

    def num_weights(self) -> int:
        return sum(s.loc.numel() for s in self.values())

    def locs(self) -> dict[str, torch.Tensor]:
        return {k: s.loc for k, s in self.items()}

    def of_role(self, role: str) -> dict:
        """Site name -> :class:`SiteSummary` of the sites with ``role`` (``weight``, ``bias``, ``group``)."""
        return {k: s for k, s in self.items() if s.role == role}


@torch.no_grad()
def summarize(network, guide) -> PosteriorSummary:
    """Posterior summary of a fitted SVI guide (mean-field, delta, or any guide with
    ``site_posterior``).

    The guide gives, per sample site, a Gaussian ``(loc, var)`` of the site's value and point
    values of positive hyper-sites; each prior maps these to the *parameter's* posterior and its
    conditional Gaussian prior (:meth:`~pyro_sparse.priors.Prior.parameter_posterior`), so
    non-centred parameterisations (horseshoe: w = scale * eps) are summarised on w itself.
    """
    values = guide.median()
    out = PosteriorSummary(method=f"svi-{getattr(guide, 'spec_name', type(guide).__name__)}")
    for name, (layer, param, prior) in network.param_sites().items():
        q_loc, q_var = guide.site_posterior(name)
        loc, var = prior.parameter_posterior(name, q_loc, q_var, values)
        prior_loc, prior_scale = prior.gaussian_prior(name, values)
        alpha = None
        if name in guide.sites and guide.sites[name].get("family") == "normal":
            alpha = log_alpha(loc, var.sqrt())
        block = guide.site_block(name) if hasattr(guide, "site_block") else None
        if block is not None:
            block = prior.parameter_block(name, block, values)
        out[name] = SiteSummary(layer.site, param, loc, var.reciprocal(),
                                torch.as_tensor(prior_loc, dtype=loc.dtype, device=loc.device),
                                torch.as_tensor(prior_scale, dtype=loc.dtype, device=loc.device).square().reciprocal(),
                                dict(layer.param_axes[param]), alpha, block, prior.group_summary(name, guide, values))
    return out
