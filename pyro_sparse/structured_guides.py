"""Guides beyond mean-field: scales coupled to the weights they govern, and low-rank blocks.

* :class:`StructuredGuide` (``guide: structured``). For a weight site whose prior has group
  scales (group log-uniform, horseshoe) the posterior is ``q(scales) prod_g q(w_g | scale_g)``.
  Both priors are written non-centred (``w = scale_g * eps``), so already the mean-field
  ``q(scale_g) q(eps)`` is the group-conditional family of Louizos, Ullrich & Welling (2017):
  ``q(w_ij | z_g) = N(z_g mu_ij, z_g^2 sigma_ij^2)``. The structured guide adds a learned linear
  dependence of the weights' mean on their group's scale::

      q(eps_ij | h_g) = N(mu_ij + beta_ij * xi_g, sigma_ij^2)

  where ``xi_g`` is the standardised deviation of the group's unconstrained hyper-variable from
  its posterior mean: for log-normal scale sites ``x_k`` (e.g. the horseshoe's
  ``lambda_g^2 = a_g b_g``), ``xi_g = sum_k (log x_k - m_k) / sqrt(sum_k s_k^2)``; for a Gaussian
  z, ``xi_g = (z_g - mu_z) / sigma_z``. So ``xi_g ~ N(0, 1)`` under q, and the joint of
  (log-scale, eps) is Gaussian with covariance ``beta`` between them. ``beta = 0`` at the start
  (the guide starts as the mean-field one). Given the sampled scales the weights are still
  independent Gaussians, so local reparameterisation and the closed-form KL of eps given the
  scales apply; the ELBO's one-sample estimate of ``E_q(h)[KL(q(eps | h) || p(eps))]`` is unbiased.

* :class:`LowRankGuide` (``guide: lowrank``, options ``rank``, ``max_params``). The real-valued
  parameters of a layer (weight and bias together) get one Gaussian
  ``N(mu, F F^T + D)`` with ``F`` of shape (n, rank), if the layer has at most ``max_params``
  of them; other layers and all scale sites stay mean-field. The weights of a block layer are
  *sampled* (their pre-activations are not independent per unit, so local reparameterisation
  does not apply there). The KL of a block is in closed form whenever every element's marginal
  has one against its prior:

      KL(q || prod_i p_i) = sum_i KL(q_i || p_i) + TC,
      TC = sum_i H[q_i] - H[q] = 1/2 sum_i log(1 + (F F^T)_ii / D_i) - 1/2 log det(I + F^T D^-1 F)

  (the total correlation; matrix determinant lemma), which holds for the Sparse VD
  approximation too (Molchanov et al. 2017, applied to the marginals).
"""

from __future__ import annotations

import math

import pyro.distributions as dist
import torch
from pyro.distributions import TorchDistribution, constraints
from torch import nn
from torch.distributions import Normal, kl_divergence
from torch.distributions.kl import register_kl

from .distributions import LOG_SCALE_MAX, LOG_SCALE_MIN, LogScaleNormal, LogUniform
from .guides import MeanFieldGuide, _key
from .kl import kl_normal_loguniform
from .priors import log_value


# ---------------------------------------------------------------------------- structured
class StructuredGuide(MeanFieldGuide):
    """Mean-field over scales, weights conditioned on their group's scale (module docstring).

    Args: as :class:`~pyro_sparse.guides.MeanFieldGuide`. Parameters added: ``shifts`` (beta,
    one per weight of every site whose prior declares group sites).
    """

    spec_name = "structured"

    def __init__(self, model, init_scale: float = math.exp(-5.0), init_scale_hyper: float = 0.1,
                 local_reparam: bool = True):
        super().__init__(model, init_scale, init_scale_hyper, local_reparam)
        self.shifts = nn.ParameterDict()

    def _add_site(self, site):
        super()._add_site(site)
        groups = site["infer"].get("ps_group_sites")
        name = site["name"]
        if groups and self.sites[name]["family"] == "normal":
            missing = [g for g in groups if g not in self.sites]
            if missing:
                raise ValueError(f"StructuredGuide: site {name!r} depends on {missing}, which are not "
                                 "latent sites emitted before it")
            self.shifts[_key(name)] = nn.Parameter(torch.zeros_like(self.locs[_key(name)]))
            self.sites[name]["group_sites"] = tuple(groups)

    def _xi(self, groups, values):
        """Standardised deviation of a group's hyper-variables from their posterior means."""
        dev, var = 0.0, 0.0
        for g in groups:
            q = self.distribution(g)
            d = (log_value(values, g) if self.sites[g]["family"] == "lognormal" else values[g]) - q.loc
            dev = dev + d
            var = var + q.scale.square()
        return (dev / var.sqrt()).detach()  # = the standard normal draw itself: no gradient to m, s

    def conditional(self, name, values):
        """q(eps | hyper-values) of a structured site, as a LogScaleNormal."""
        q = self.distribution(name)
        if "group_sites" not in self.sites[name]:
            return q
        xi = self._xi(self.sites[name]["group_sites"], values)
        return LogScaleNormal(q.loc + self.shifts[_key(name)] * xi, q.log_scale)

    def posterior(self, name, values):
        return self.conditional(name, values)

    def marginal_site_posterior(self, name):
        """Marginal ``(loc, var)`` of a site: ``var = sigma^2 + beta^2`` (xi ~ N(0, 1) under q).
        :meth:`site_posterior` gives the conditional at the hyper-sites' medians (xi = 0)."""
        loc, var = self.site_posterior(name)
        if _key(name) in self.shifts:
            var = var + self.shifts[_key(name)].detach().square()
        return loc, var


# ---------------------------------------------------------------------------- low rank
class BlockMarginal(TorchDistribution):
    """One site's share of a jointly sampled low-rank Gaussian block.

    ``value`` is the site's part of the joint draw; ``loc``/``scale`` its Gaussian marginals;
    ``tc`` the block's total correlation spread evenly over the block's elements (a tensor
    broadcastable to ``loc``). ``rsample`` returns ``value``; ``log_prob(x)`` is the marginal
    log density plus ``tc`` per element, and the registered KL against a prior is the marginal
    KL plus ``tc``: summed over the block, ``KL(q || prod p_i)`` exactly (module docstring).
    Not a ``Normal``, so local reparameterisation leaves these sites alone.
    """

    arg_constraints = {}
    support = constraints.real
    has_rsample = True

    def __init__(self, value, loc, scale, tc, validate_args=None):
        self.value, self.loc, self.scale, self.tc = value, loc, scale, tc
        super().__init__(loc.shape, validate_args=False)

    def rsample(self, sample_shape=torch.Size()):
        if sample_shape:
            raise NotImplementedError("BlockMarginal holds one joint draw; sample the guide again")
        return self.value

    def log_prob(self, x):
        return Normal(self.loc, self.scale).log_prob(x) + self.tc

    def expand(self, batch_shape, _instance=None):
        if torch.Size(batch_shape) != self.batch_shape:
            raise NotImplementedError("BlockMarginal cannot be expanded")
        return self


@register_kl(BlockMarginal, Normal)
def _kl_block_normal(p, q):
    return kl_divergence(Normal(p.loc, p.scale), q) + p.tc


@register_kl(BlockMarginal, LogUniform)
def _kl_block_loguniform(p, q):
    return kl_normal_loguniform(p.loc, p.scale) + p.tc


def lowrank_total_correlation(cov_factor, cov_diag):
    """``sum_i H[q_i] - H[q]`` of ``N(mu, F F^T + D)``:
    ``1/2 sum_i log(1 + (F F^T)_ii / D_i) - 1/2 log det(I_r + F^T D^-1 F)``."""
    rank = cov_factor.shape[-1]
    scaled = cov_factor / cov_diag.sqrt()[:, None]  # D^-1/2 F
    capacitance = torch.eye(rank, dtype=cov_factor.dtype, device=cov_factor.device) + scaled.T @ scaled
    logdet = 2 * torch.linalg.cholesky(capacitance).diagonal().log().sum()
    return 0.5 * torch.log1p(scaled.square().sum(-1)).sum() - 0.5 * logdet


class LowRankGuide(MeanFieldGuide):
    """Per-layer low-rank-plus-diagonal Gaussian for layers with at most ``max_params`` real
    parameters; mean-field elsewhere (module docstring).

    Args:
        model: the Pyro model.
        rank: columns of the covariance factor F.
        max_params: largest number of real parameters (weight + bias) of a layer given a block.
        init_scale, init_scale_hyper, local_reparam: as :class:`~pyro_sparse.guides.MeanFieldGuide`
            (``init_scale`` is the initial sqrt of D; F starts at zero, so the guide starts
            mean-field).
    """

    spec_name = "lowrank"

    def __init__(self, model, rank: int = 10, max_params: int = 20000, init_scale: float = math.exp(-5.0),
                 init_scale_hyper: float = 0.1, local_reparam: bool = True):
        super().__init__(model, init_scale, init_scale_hyper, local_reparam)
        for name, v in (("rank", rank), ("max_params", max_params)):
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise ValueError(f"LowRankGuide {name} must be a positive integer, got {v!r}")
        self.rank, self.max_params = rank, max_params
        self.block_locs = nn.ParameterDict()
        self.block_log_diag = nn.ParameterDict()  # log sqrt(D)
        self.block_factors = nn.ParameterDict()
        self.blocks: dict[str, list[str]] = {}

    def setup(self, *args, **kwargs):
        if self.sites:
            return self
        super().setup(*args, **kwargs)
        layers: dict[str, list[str]] = {}
        for name, info in self.sites.items():
            if info["family"] == "normal" and info.get("role") == "weight":
                layers.setdefault(name.rsplit(".", 1)[0], []).append(name)
        for layer, names in layers.items():
            n = sum(self.locs[_key(s)].numel() for s in names)
            if n > self.max_params:
                continue
            offset = 0
            for s in names:
                numel = self.locs[_key(s)].numel()
                self.sites[s].update(block=layer, offset=offset, numel=numel, shape=tuple(self.locs[_key(s)].shape),
                                     local_reparam=False)
                offset += numel
            key = _key(layer)
            self.block_locs[key] = nn.Parameter(torch.cat([self.locs.pop(_key(s)).detach().reshape(-1) for s in names]))
            self.block_log_diag[key] = nn.Parameter(
                torch.cat([self.log_scales.pop(_key(s)).detach().reshape(-1) for s in names]))
            self.block_factors[key] = nn.Parameter(torch.zeros(n, self.rank, dtype=self.block_locs[key].dtype,
                                                               device=self.block_locs[key].device))
            self.blocks[layer] = names
        return self

    def _add_site(self, site):
        super()._add_site(site)
        self.sites[site["name"]]["role"] = site["infer"].get("ps_role")

    # ------------------------------------------------------------------ block maths
    def block_params(self, layer):
        """(loc (n,), cov_factor (n, r), cov_diag (n,)) of a layer's block."""
        key = _key(layer)
        log_sd = self.block_log_diag[key].clamp(LOG_SCALE_MIN, LOG_SCALE_MAX)
        return self.block_locs[key], self.block_factors[key], torch.exp(2 * log_sd)

    def _sample_block(self, layer):
        loc, factor, diag = self.block_params(layer)
        eps_r = torch.randn(self.rank, dtype=loc.dtype, device=loc.device)
        value = loc + factor @ eps_r + diag.sqrt() * torch.randn_like(loc)
        scale = (diag + factor.square().sum(-1)).sqrt()
        tc = lowrank_total_correlation(factor, diag) / loc.numel()
        return value, loc, scale, tc

    def posterior(self, name, values):
        """A site outside any block: its mean-field posterior. The first site of a block draws the
        whole block (:meth:`_sample_block`); each of its sites is the :class:`BlockMarginal` of
        that one draw (kept in ``values`` under ``("block", layer)`` until the next call)."""
        info = self.sites[name]
        layer = info.get("block")
        if layer is None:
            return self.distribution(name)
        key = ("block", layer)
        if info["offset"] == 0 or key not in values:
            values[key] = self._sample_block(layer)
        value, loc, scale, tc = values[key]
        part = slice(info["offset"], info["offset"] + info["numel"])
        return BlockMarginal(value[part].view(info["shape"]), loc[part].view(info["shape"]),
                             scale[part].view(info["shape"]), tc)

    # ------------------------------------------------------------------ read-outs
    def _part(self, name, tensor):
        info = self.sites[name]
        return tensor[info["offset"]: info["offset"] + info["numel"]]

    def distribution(self, name):
        info = self.sites[name]
        if info.get("block") is None:
            return super().distribution(name)
        loc, factor, diag = self.block_params(info["block"])
        scale = (diag + factor.square().sum(-1)).sqrt()
        return dist.Normal(self._part(name, loc).view(info["shape"]), self._part(name, scale).view(info["shape"]))

    def median(self):
        out = {}
        for name, info in self.sites.items():
            if info.get("block") is None:
                loc = self.loc(name).detach()
                out[name] = loc if info["family"] == "normal" else loc.exp()
            else:
                out[name] = self._part(name, self.block_locs[_key(info["block"])]).detach().view(info["shape"])
        return out

    def site_block(self, name):
        """``{"cov_factor": (n, r), "cov_diag": (n,), "shape"}`` over the flattened site, or None
        for a site outside any block."""
        info = self.sites.get(name)
        if info is None or info.get("block") is None:
            return None
        _, factor, diag = self.block_params(info["block"])
        return {"cov_factor": self._part(name, factor).detach(), "cov_diag": self._part(name, diag).detach(),
                "shape": info["shape"]}
