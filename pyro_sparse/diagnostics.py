r"""Posterior diagnostics in ArviZ: InferenceData from a fitted network, PSIS-LOO, model comparison.

This is the only module of pyro-sparse that imports ArviZ (written against ArviZ 0.23); a move to
ArviZ 1.x touches this file alone. Everything else (reports, CLI, examples) calls the functions
below and receives plain numbers, dicts and pandas tables.

What :func:`to_inference_data` builds (``S`` draws from the guide, one chain):

``posterior``
    one variable per latent sample site, named like the site (``fc1.weight``,
    ``fc1.weight.unit_scale``, ``lstm1.z_hidden``), with named dims taken from the layers'
    ``param_axes``: ``fc1.weight`` has dims ``(chain, draw, fc1_unit, fc1_input)``. A hyper-site
    of a parameter (its name extends the parameter's, e.g. ``fc1.weight.unit_scale`` of shape
    ``(300, 1)``) keeps the parameter's dims on its non-singleton axes and drops the singleton
    ones (dims ``fc1_unit``); the site's own shape is in the variable's ``site_shape`` attribute.
    Derived per-draw quantity: the shrinkage factor ``<param>.kappa`` of every parameter whose
    prior has hyper-sites (see :func:`shrinkage`).
``log_likelihood``, ``posterior_predictive``, ``observed_data``
    ``obs`` over dim ``obs_id``: :math:`\log p(y_n \mid \theta_s)`, a replicate
    :math:`y^{rep}_n \sim p(y \mid \theta_s)`, and :math:`y_n`. Each draw :math:`\theta_s` is one
    full weight sample shared by all observations (no local reparameterisation here: PSIS-LOO
    needs the same :math:`\theta_s` in every column).
``sample_stats``
    per draw: ``log_q`` (:math:`\log q(\theta_s)`), and when the observations are the training
    data and no mask is applied, ``lp`` (:math:`\log p(y, \theta_s)`, up to the constant of an
    improper prior) and ``log_importance_ratio`` = ``lp - log_q``.
``variational`` (custom group)
    the guide's Gaussian of each site, ``<site>.loc`` / ``<site>.scale`` (log-space for
    log-normal sites), and ``<site>.log_alpha`` = :math:`\log\sigma^2 - \log\theta^2` for Gaussian
    sites (Molchanov et al. 2017). These describe :math:`q`, not a draw, so they have no
    chain/draw dims and live outside ``posterior``.
``fit_history`` (custom group)
    the training trace over dim ``epoch``: ``loss``, ``elbo_per_datum``, ``kl_weight``, ``lr``,
    ``test_accuracy``/``test_nll``/``test_rmse`` (NaN where not evaluated).
attributes
    method, guide, priors (JSON), likelihood, observations, sizes and sparsity, predictive
    metrics of the draws, final ELBO; nested values are JSON strings (netCDF attributes are flat).

LOO for variational draws. ArviZ 0.23 has no importance correction for draws from an
approximate posterior: ``az.loo`` treats the draws as posterior draws. :func:`loo` therefore
reports PSIS-LOO of the *variational* predictive (:math:`q` in place of the posterior; iid draws,
so ``reff = 1``) with its Pareto :math:`\hat k` per observation. :func:`importance_corrected_loo`
adds the correction of Magnusson et al. (2019, "Bayesian leave-one-out cross-validation for
large data", ICML), importance ratios
:math:`r_{s,n} \propto p(y, \theta_s) / (q(\theta_s)\, p(y_n \mid \theta_s))`, smoothed by PSIS;
its reliability is the :math:`\hat k` of :math:`p(y,\theta)/q(\theta)` (:func:`vi_pareto_k`; Yao,
Vehtari, Simpson & Gelman 2018, "Yes, but did it work?"): above 0.7 the correction is
unreliable, which is the rule rather than the exception for networks with 10^4+ weights.
Under an improper prior (log-uniform, Sparse VD) the posterior itself is improper (Hron,
Matthews & Ghahramani 2018), so no correction is computed.

The reduced model (``masks``): pruned entries are fixed at zero in every draw and therefore in
the log-likelihood, while kept entries keep their :math:`q` marginals. Under a factorised
posterior this *is* the Bayesian-model-reduction posterior of the kept weights for a reduced
prior that is a point mass at zero (Savage-Dickey limit; Friston & Penny 2011), so
``az.compare({"dense": ..., "bmr": ...})`` ranks dense and reduced networks by PSIS-LOO.
"""

from __future__ import annotations

import json
import logging
import math
import os
import warnings

import numpy as np
import pyro
import pyro.poutine as poutine
import torch

with warnings.catch_warnings():
    # ArviZ 0.23 prints a once-a-day FutureWarning about its 1.x refactor at import time.
    warnings.simplefilter("ignore", FutureWarning)
    import arviz as az
import xarray as xr

from .distributions import LogUniform
from .evaluation import evaluation_mode

__all__ = [
    "to_inference_data",
    "run_inference_data",
    "site_dims",
    "shrinkage",
    "loo",
    "importance_corrected_loo",
    "vi_pareto_k",
    "compare",
    "compare_held_out",
    "held_out",
    "loo_reliability",
    "summary",
    "save",
    "slim",
    "load",
    "attributes",
    "groups",
    "plot_forest",
]

OBS = "obs"
OBS_DIM = "obs_id"
HISTORY_KEYS = ("loss", "elbo_per_datum", "kl_weight", "lr", "test_accuracy", "test_nll", "test_rmse")


# ============================================================================ dims and coords


def _var(name: str) -> str:
    return name.replace(".", "_")


def site_dims(network, shapes: dict[str, tuple]) -> dict[str, list]:
    """Dim names of every site, from the layers' ``param_axes``; ``None`` marks an axis to squeeze.

    * Layer parameters: axis ``a`` of layer ``L`` on tensor dim ``d`` is named ``L_a``
      (``fc1_unit``, ``fc1_input``, ``conv1_unit``); where two axes share a dim the first
      declared wins; dims without an axis are ``L_param_dim<d>`` (a conv kernel's height).
    * Hyper-sites of a parameter ``P`` (name ``P.<suffix>``, keepdim shape broadcastable to
      ``P``): singleton dims are squeezed, the others take ``P``'s dim name.
    * Other sites of layer ``L`` (``L.<rest>``, e.g. group variables ``lstm1.z_hidden``): the
      axes of ``param_axes[rest]`` if the layer declares them, else the layer axis of the same
      size (first declared), singleton dims squeezed.
    * Anything else (``likelihood.noise``): singleton dims squeezed, ``<site>_dim<d>``.

    A dim name is bound to one size; a clash falls back to ``<site>_dim<d>``.
    """
    sizes: dict[str, int] = {}

    def claim(name, size, fallback):
        if sizes.setdefault(name, size) == size:
            return name
        sizes[fallback] = size
        return fallback

    params = network.param_sites()
    out: dict[str, list] = {}
    layer_axes: dict[str, dict[str, int]] = {}  # layer -> axis -> size
    for site, (layer, param, _) in params.items():
        if site not in shapes:
            continue
        shape = tuple(shapes[site])
        names = [None] * len(shape)
        for axis, d in layer.param_axes.get(param, {}).items():
            if d < len(shape) and names[d] is None:
                names[d] = axis
        dims = []
        for d, size in enumerate(shape):
            fallback = f"{_var(site)}_dim{d}"
            if names[d] is None:
                dims.append(claim(f"{layer.site}_{param}_dim{d}", size, fallback))
            else:
                dims.append(claim(f"{layer.site}_{names[d]}", size, fallback))
                layer_axes.setdefault(layer.site, {}).setdefault(names[d], size)
        out[site] = dims
    for site, shape in shapes.items():
        if site in out:
            continue
        shape = tuple(shape)
        parents = [p for p in out if site.startswith(p + ".") and len(shapes[p]) == len(shape)]
        dims = []
        if parents:
            parent = max(parents, key=len)
            for d, size in enumerate(shape):
                if size == 1:
                    dims.append(None)
                elif size == shapes[parent][d]:
                    dims.append(claim(out[parent][d], size, f"{_var(site)}_dim{d}"))
                else:
                    dims.append(claim(f"{_var(site)}_dim{d}", size, f"{_var(site)}_dim{d}"))
            out[site] = dims
            continue
        head, _, rest = site.partition(".")
        layers = getattr(network, "layers", {})
        layer = layers[head] if head in layers else None
        declared = layer.param_axes.get(rest, {}) if layer is not None else {}
        by_dim = {}
        for axis, d in declared.items():
            by_dim.setdefault(d, axis)
        for d, size in enumerate(shape):
            fallback = f"{_var(site)}_dim{d}"
            axis = by_dim.get(d)
            if axis is None and layer is not None and size > 1:
                axis = next((a for a, n in layer_axes.get(head, {}).items() if n == size), None)
            if axis is not None:
                dims.append(claim(f"{head}_{axis}", size, fallback))
            elif size == 1:
                dims.append(None)
            else:
                dims.append(claim(fallback, size, fallback))
        out[site] = dims
    return out


def _squeeze(array: np.ndarray, dims: list, lead: int) -> tuple[np.ndarray, list]:
    """Drop the axes whose dim is None (after ``lead`` leading chain/draw axes)."""
    drop = tuple(lead + d for d, name in enumerate(dims) if name is None)
    return (np.squeeze(array, axis=drop) if drop else array), [n for n in dims if n is not None]


# ============================================================================ drawing


def _check_masks(masks, shapes):
    if masks is None:
        return {}
    if not isinstance(masks, dict):
        raise ValueError(f"masks must be a dict site name -> bool tensor, got {type(masks).__name__}")
    out = {}
    for name, mask in masks.items():
        if name not in shapes:
            raise ValueError(f"masks: {name!r} is not a latent site of the guide; sites are {sorted(shapes)}")
        mask = torch.as_tensor(mask)
        if mask.dtype != torch.bool:
            raise ValueError(f"masks[{name!r}] must be a bool tensor (True = keep), got dtype {mask.dtype}")
        try:
            torch.broadcast_shapes(mask.shape, shapes[name])
        except RuntimeError:
            raise ValueError(f"masks[{name!r}] of shape {tuple(mask.shape)} does not broadcast onto the site "
                             f"shape {tuple(shapes[name])}") from None
        out[name] = mask
    return out


@torch.no_grad()
def _guide_draws(guide, x, num_samples):
    """``num_samples`` independent traces of the guide: site -> (S, *shape), and log q (S,)."""
    draws, log_q = {}, []
    for _ in range(num_samples):
        trace = poutine.trace(guide).get_trace(x)
        log_q.append(float(trace.log_prob_sum()))
        for name, site in trace.nodes.items():
            if site["type"] == "sample" and not site["is_observed"]:
                draws.setdefault(name, []).append(site["value"].detach())
    return {k: torch.stack(v) for k, v in draws.items()}, torch.tensor(log_q, dtype=torch.float64)


def _network_pass(network, values, x, y, batch_size, prior_terms=False):
    """One draw through the network on (x, y) in batches.

    Returns outputs (B, ...), pointwise log-likelihood (B,), a predictive replicate (B, ...),
    and (first batch only) the model trace, from which roles and log-prior terms are read.
    """
    lik = network.likelihood

    def forward(xb):
        out = network(xb)
        return out, lik.distribution(out)

    outs, logliks, reps, first = [], [], [], None
    for start in range(0, len(x), batch_size):
        xb, yb = x[start:start + batch_size], y[start:start + batch_size]
        with evaluation_mode(network):  # dropout off, batch norms on their running statistics
            trace = poutine.trace(poutine.condition(forward, data=values)).get_trace(xb)
        out, fn = trace.nodes["_RETURN"]["value"]
        if lik.task == "binary":
            yb = yb.to(out.dtype)
        logliks.append(fn.log_prob(yb))
        reps.append(fn.sample())
        outs.append(out)
        if first is None:
            first = trace
    return torch.cat(outs), torch.cat(logliks), torch.cat(reps), first


def _log_prior(trace, names):
    """sum of log p(site) over the given latent sites (unnormalised for improper priors)."""
    total = 0.0
    for name in names:
        site = trace.nodes[name]
        total += float(site["fn"].log_prob(site["value"]).sum())
    return total


def _base(fn):
    while hasattr(fn, "base_dist"):
        fn = fn.base_dist
    return fn


def _predictive_metrics(network, outputs, loglik, y) -> dict:
    """Accuracy (or RMSE; per character and bits per character for a language model) of the
    draws' predictive (:func:`pyro_sparse.evaluation.evaluate_outputs`), and the lppd per
    observation from the pointwise log-likelihood of the draws (which holds each draw's own
    learned noise); ``nll = -lppd``."""
    from .evaluation import evaluate_outputs

    S = outputs.shape[0]
    lppd = (torch.logsumexp(loglik, 0) - math.log(S)).mean().item()
    figures = {k: v for k, v in evaluate_outputs(outputs, y, network.likelihood).items() if k != "nll"}
    return {**figures, "lppd": lppd, "nll": -lppd}


def shrinkage(prior, site: str, draw_values: dict, data_precision: torch.Tensor) -> torch.Tensor:
    r"""Shrinkage factor of one draw: :math:`\kappa = 1 / (1 + \bar h\, s^2)`.

    ``s`` is the parameter's conditional prior scale given this draw's hyper-sites
    (``prior.gaussian_prior(site, draw_values)``, e.g. :math:`\tau\tilde\lambda_g` of a horseshoe,
    :math:`\lambda_g^{-1/2}` of a Gaussian-gamma prior), and :math:`\bar h` the data precision
    of the weights, averaged over each group (the axes on which ``s`` is singleton). In the
    normal-means model :math:`\hat w \sim N(w, 1/h)`, :math:`w \sim N(0, s^2)` the posterior mean is
    :math:`(1-\kappa)\hat w`: :math:`\kappa \to 1` shrinks the group to zero, :math:`\kappa \to 0`
    leaves it to the data (Carvalho, Polson & Scott 2010; Piironen & Vehtari 2017 use
    :math:`h = n/\sigma^2`). For a network :math:`h` is read off the fitted Gaussian posterior:
    :math:`h = P - \Pi`, posterior minus conditional prior precision at the posterior median,
    clamped at 0. Returns a tensor with the parameter's number of dims, singleton on the
    axes where ``s`` is shared by a group (e.g. ``(300, 1)`` for unit scales of a ``(300, 64)``
    weight).
    """
    _, scale = prior.gaussian_prior(site, draw_values)
    h = data_precision
    scale = torch.as_tensor(scale, dtype=h.dtype, device=h.device)
    scale = scale.reshape((1,) * (h.dim() - scale.dim()) + tuple(scale.shape))
    groups = tuple(d for d in range(h.dim()) if scale.shape[d] == 1 and h.shape[d] > 1)
    if groups:
        h = h.mean(dim=groups, keepdim=True)
    return 1.0 / (1.0 + h * scale.square())


def _kappas(network, guide, draws):
    """``<param>.kappa`` per draw for every parameter whose prior has hyper-sites among the draws."""
    out = {}
    if not hasattr(guide, "site_posterior"):
        return out
    from .summary import summarize  # local: summary imports nothing from here

    summaries = None
    for site, (_, _, prior) in network.param_sites().items():
        if site not in draws or not any(n.startswith(site + ".") for n in draws):
            continue
        if summaries is None:
            summaries = summarize(network, guide)
        s = summaries[site]
        if not bool(torch.isfinite(s.precision).all()):
            continue  # a point-mass guide has no data precision to read
        h = (s.precision - s.prior_precision.expand_as(s.precision)).clamp_min(0.0)
        S = next(iter(draws.values())).shape[0]
        kappa = [shrinkage(prior, site, {k: v[i] for k, v in draws.items()}, h) for i in range(S)]
        out[site] = torch.stack(kappa)
    return out


def _json(value):
    return json.dumps(value, sort_keys=True, default=str)


def _attr(value):
    """netCDF-safe attribute: numbers and strings as they are, anything else as JSON."""
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, (int, float, str)):
        return value
    if isinstance(value, (np.integer, np.floating)):
        return value.item()
    return _json(value)


def _prior_description(prior) -> dict:
    return {"type": getattr(prior, "spec_name", type(prior).__name__), **getattr(prior, "config", {})}


def _sparsity(network, masks) -> dict:
    """Counts of a (masked) network in the vocabulary of the reduction report: ``params_total`` /
    ``params_nonzero`` (every parameter, biases and group variables included), ``weights_total`` /
    ``weights_kept`` (the weight tensors) and ``rule_sparsity`` (the fraction of the weights the
    masks remove; ``sparsity``, what the compact network keeps, is the report's to add)."""
    from .summary import param_role

    per_site, counts = {}, {"params_total": 0, "params_nonzero": 0, "weights_total": 0, "weights_kept": 0}
    for site, (layer, param, _) in network.param_sites().items():
        n = math.prod(layer.param_shapes()[param])
        kept = n
        if site in masks:
            kept = int(masks[site].expand(layer.param_shapes()[param]).sum())
        counts["params_total"] += n
        counts["params_nonzero"] += kept
        if param_role(site) == "weight":
            counts["weights_total"] += n
            counts["weights_kept"] += kept
        per_site[site] = [kept, n]
    total = counts["weights_total"]
    return {**counts, "rule_sparsity": 1.0 - counts["weights_kept"] / total if total else 0.0,
            "kept_per_site": per_site}


def _held_out_dataset(test_ll):
    """Pointwise held-out log predictive density ``lpd_n = log (1/S) sum_s p(y_n | theta_s)`` of
    the test observations (S draws), over dim ``test_id``: what :func:`held_out` ranks by."""
    S = test_ll.shape[0]
    lpd = (torch.logsumexp(test_ll.double(), 0) - math.log(S)).cpu().numpy()
    return xr.Dataset({"lpd": (("test_id",), lpd)}, coords={"test_id": np.arange(lpd.shape[0])})


def _history_dataset(history):
    epochs = np.array([h.get("epoch", i + 1) for i, h in enumerate(history)], dtype=np.int64)
    data = {}
    for key in HISTORY_KEYS:
        if any(key in h for h in history):
            data[key] = (("epoch",), np.array([h.get(key, np.nan) for h in history], dtype=np.float64))
    return xr.Dataset(data, coords={"epoch": epochs})


def _variational_dataset(guide, names, dims, coords):
    data = {}
    if not hasattr(guide, "site_posterior"):
        return None
    for name in names:
        loc, var = guide.site_posterior(name)
        d = dims[name]
        arrays = {"loc": loc, "scale": var.sqrt()}
        family = getattr(guide, "sites", {}).get(name, {}).get("family")
        if family == "normal" and hasattr(guide, "log_alpha"):
            arrays["log_alpha"] = guide.log_alpha(name)
        for key, tensor in arrays.items():
            array, kept = _squeeze(tensor.detach().cpu().numpy(), d, 0)
            data[f"{name}.{key}"] = (tuple(kept), array)
    used = {n for v in data.values() for n in v[0]}
    return xr.Dataset(data, coords={k: v for k, v in coords.items() if k in used})


@torch.no_grad()
def to_inference_data(network, guide, data, num_samples: int = 100, masks: dict | None = None,
                      extra_attrs: dict | None = None, *, test_data=None, history=None,
                      observations: str = "train", seed: int = 0, batch_size: int = 4096):
    """ArviZ ``InferenceData`` of a fitted network: posterior draws, pointwise log-likelihood,
    posterior predictive, observed data, sample stats, the guide's Gaussians and the fit history.

    Args:
        network: a :class:`~pyro_sparse.network.BayesianNetwork`.
        guide: its fitted guide (any guide whose trace holds every latent site).
        data: ``(x, y)``, the observations of ``log_likelihood`` / ``observed_data`` /
            ``posterior_predictive``. Use the training data for PSIS-LOO (the posterior was
            conditioned on them), test data for held-out comparisons.
        num_samples: draws ``S`` (one chain).
        masks: site name -> bool tensor (True = keep), broadcastable to the site: the reduced
            model, with the pruned entries fixed at 0 in every draw.
        extra_attrs: added to the attributes (nested values stored as JSON).
        test_data: optional held-out ``(x, y)`` whose predictive metrics (accuracy or RMSE,
            lppd) go into the attributes.
        history: the trainer's per-epoch records (``SVITrainer.history``) for ``fit_history``.
        observations: what ``data`` is: ``"train"`` enables ``lp`` / ``log_importance_ratio``.
        seed: seed of the draws (the global RNG state is restored afterwards).
        batch_size: observations per network pass.

    See the module docstring for the layout.
    """
    if not isinstance(num_samples, int) or isinstance(num_samples, bool) or num_samples < 1:
        raise ValueError(f"num_samples must be a positive integer, got {num_samples!r}")
    x, y = data
    if len(x) != len(y) or len(x) == 0:
        raise ValueError(f"data must be a non-empty (x, y) pair of equal length, got {len(x)} and {len(y)} rows")
    with torch.random.fork_rng(), pyro.validation_enabled(False):
        torch.manual_seed(seed)
        draws, log_q = _guide_draws(guide, x[:1], num_samples)
        shapes = {k: tuple(v.shape[1:]) for k, v in draws.items()}
        masks = _check_masks(masks, shapes)
        for name, mask in masks.items():
            draws[name] = draws[name] * mask.to(draws[name].dtype)
        loglik, reps, outputs, test_out, test_ll, lp = [], [], [], [], [], []
        trace = None
        for s in range(num_samples):
            values = {k: v[s] for k, v in draws.items()}
            out, ll, rep, trace = _network_pass(network, values, x, y, batch_size)
            loglik.append(ll)
            reps.append(rep)
            outputs.append(out)
            if test_data is not None:
                t_out, t_ll, _, _ = _network_pass(network, values, test_data[0], test_data[1], batch_size)
                test_out.append(t_out)
                test_ll.append(t_ll)
            if observations == "train" and not masks:
                lp.append(_log_prior(trace, draws) + float(ll.double().sum()))
        kappas = _kappas(network, guide, draws)
    loglik, outputs = torch.stack(loglik), torch.stack(outputs)

    dims = site_dims(network, shapes)
    roles = {name: trace.nodes[name]["infer"].get("ps_role", "") for name in draws if name in trace.nodes}
    improper = [name for name in draws
                if name in trace.nodes and isinstance(_base(trace.nodes[name]["fn"]), LogUniform)]

    posterior, post_dims = {}, {}
    for name, value in draws.items():
        array, kept = _squeeze(value.cpu().numpy()[None], dims[name], 2)
        posterior[name], post_dims[name] = array, kept
    for site, kappa in kappas.items():
        kname = f"{site}.kappa"
        kdims = _kappa_dims(site, kappa.shape[1:], dims, shapes)
        array, kept = _squeeze(kappa.cpu().numpy()[None], kdims, 2)
        posterior[kname], post_dims[kname] = array, kept
    coords = {}
    for name, d in post_dims.items():
        for axis, dim in enumerate(d):
            coords.setdefault(dim, np.arange(posterior[name].shape[2 + axis]))
    n_obs = len(y)
    coords[OBS_DIM] = np.arange(n_obs)
    y_np = y.cpu().numpy()
    obs_dims = [OBS_DIM] + [f"{OBS}_dim{d}" for d in range(1, y_np.ndim)]
    for d in range(1, y_np.ndim):
        coords[obs_dims[d]] = np.arange(y_np.shape[d])
    all_dims = {**post_dims, OBS: obs_dims}

    sample_stats = {"log_q": log_q.numpy()[None]}
    if lp:
        lp_t = torch.tensor(lp, dtype=torch.float64)
        sample_stats["lp"] = lp_t.numpy()[None]
        sample_stats["log_importance_ratio"] = (lp_t - log_q).numpy()[None]

    metrics = _predictive_metrics(network, outputs, loglik, y)
    attrs = {
        "inference_library": "pyro",
        "method": _method(guide),
        "guide": getattr(guide, "spec_name", type(guide).__name__),
        "likelihood": getattr(network.likelihood, "spec_name", type(network.likelihood).__name__),
        "priors": {site: _prior_description(p) for site, (_, _, p) in network.param_sites().items()},
        "observations": observations,
        "num_samples": num_samples,
        "masked": bool(masks),
        "improper_prior_sites": improper,
        "scale_sites": [n for n, r in roles.items() if r == "scale"],
        **{f"{observations}_{k}": v for k, v in metrics.items()},
        **_sparsity(network, masks),
    }
    if test_data is not None:
        test_metrics = _predictive_metrics(network, torch.stack(test_out), torch.stack(test_ll), test_data[1])
        attrs.update({f"test_{k}": v for k, v in test_metrics.items()})
    if history:
        last = history[-1]
        attrs.update({"epochs": last.get("epoch", len(history)), "final_elbo_per_datum": last.get("elbo_per_datum")})
    attrs.update(extra_attrs or {})
    attrs = {k: _attr(v) for k, v in attrs.items() if v is not None}

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        idata = az.from_dict(
            posterior=posterior,
            log_likelihood={OBS: loglik.double().cpu().numpy()[None]},
            posterior_predictive={OBS: torch.stack(reps).cpu().numpy()[None]},
            observed_data={OBS: y_np},
            sample_stats=sample_stats,
            coords=coords, dims=all_dims, attrs=attrs)
        extra = {}
        variational = _variational_dataset(guide, list(draws), dims, coords)
        if variational is not None:
            extra["variational"] = variational
        if history:
            extra["fit_history"] = _history_dataset(history)
        if test_data is not None:
            extra["held_out"] = _held_out_dataset(torch.stack(test_ll))
        if extra:
            idata.add_groups(extra, warn_on_custom_groups=False)
    for name in draws:
        idata.posterior[name].attrs.update({"site_shape": list(shapes[name]), "role": roles.get(name, "")})
    for site in kappas:
        idata.posterior[f"{site}.kappa"].attrs.update(
            {"role": "derived", "formula": "1 / (1 + h_bar * s^2), s the conditional prior scale"})
    idata.attrs.update(attrs)
    return idata


def _kappa_dims(site, shape, dims, shapes):
    """Dims of a kappa (keepdim shape of the parameter): the parameter's dims, singletons squeezed."""
    return [dims[site][d] if n == shapes[site][d] and n > 1 else None for d, n in enumerate(shape)]


def _method(guide) -> str:
    if getattr(guide, "method", None):  # a posterior that another method fitted (a Laplace fit)
        return guide.method
    name = getattr(guide, "spec_name", type(guide).__name__)
    return "map" if name == "delta" else f"svi-{name}"


def run_inference_data(run, num_samples: int = 100, masks: dict | None = None, extra_attrs: dict | None = None,
                       observations: str = "train", seed: int = 0):
    """:func:`to_inference_data` for a :class:`~pyro_sparse.runs.Run`: its network and guide,
    its training (or test) data as observations, its test data for held-out metrics and its
    trainer's history."""
    if observations not in ("train", "test"):
        raise ValueError(f"observations must be 'train' or 'test', got {observations!r}")
    d = run.dataset
    data = (d.x_train, d.y_train) if observations == "train" else (d.x_test, d.y_test)
    history = getattr(run.trainer, "history", None)
    attrs = {"run": run.directory or "", "data": d.name,
             "model": run.model_spec.get("name") or os.path.basename(os.path.normpath(run.directory or ""))}
    attrs.update(extra_attrs or {})
    guide = run.trainer.posterior_guide() if run.trainer is not None else run.guide
    return to_inference_data(run.network, guide, data, num_samples, masks, attrs,
                             test_data=(d.x_test, d.y_test), history=history, observations=observations,
                             seed=seed)


# ============================================================================ LOO and comparison


def _loglik(idata):
    return idata.log_likelihood[OBS].stack(__sample__=("chain", "draw"))


def loo(idata) -> dict:
    """PSIS-LOO (Vehtari, Gelman & Gabry 2017) of the draws as they are, via ``az.loo``.

    Draws from q are independent, so the relative efficiency is 1. Returns ``elpd_loo``,
    ``se``, ``p_loo``, ``n_samples``, ``n_data_points``, ``good_k`` (ArviZ's threshold
    ``min(1 - 1/log10 S, 0.7)``), ``pareto_k_max``, ``n_bad_k`` (observations with
    :math:`\\hat k` above it), ``pareto_k`` (array), ``loo_i`` (array) and ``elpd_data`` (ArviZ's
    result, which :func:`compare` accepts in place of the InferenceData).
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the k-hat warning: counted in n_bad_k instead
        res = az.loo(idata, pointwise=True, reff=1.0)
    k = np.asarray(res.pareto_k)
    return {"elpd_loo": float(res.elpd_loo), "se": float(res.se), "p_loo": float(res.p_loo),
            "n_samples": int(res.n_samples), "n_data_points": int(res.n_data_points),
            "good_k": float(res.good_k), "pareto_k_max": float(np.max(k)),
            "n_bad_k": int(np.sum(k > res.good_k)), "pareto_k": k, "loo_i": np.asarray(res.loo_i),
            "elpd_data": res}


def vi_pareto_k(idata) -> float:
    r"""Pareto :math:`\hat k` of the joint importance ratios :math:`p(y,\theta_s)/q(\theta_s)`
    (Yao et al. 2018): below 0.5 q is close to the posterior, above 0.7 importance corrections
    are unreliable. NaN where the ratios are unavailable (masked model, test observations,
    improper prior, point-mass guide)."""
    if "sample_stats" not in idata.groups() or "log_importance_ratio" not in idata.sample_stats:
        return float("nan")
    if json.loads(idata.attrs.get("improper_prior_sites", "[]")):
        return float("nan")
    lr = np.asarray(idata.sample_stats["log_importance_ratio"]).reshape(-1)
    if np.ptp(lr) == 0:
        return float("nan")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _, k = az.psislw(lr[None, :])
    return float(np.asarray(k).reshape(-1)[0])


def importance_corrected_loo(idata) -> dict:
    r"""PSIS-LOO for draws from an approximate posterior (Magnusson et al. 2019).

    With :math:`\theta_s \sim q`, the leave-one-out posterior is reached with ratios
    :math:`\log r_{s,n} = \log p(y,\theta_s) - \log q(\theta_s) - \log p(y_n\mid\theta_s)`,
    PSIS-smoothed per observation and self-normalised:
    :math:`\mathrm{elpd}_n = \log \sum_s \tilde w_{s,n}\, p(y_n \mid \theta_s)`.
    Returns ``elpd_loo``, ``se``, ``pareto_k_max`` (over observations), ``vi_pareto_k``
    (:func:`vi_pareto_k`) and ``reliable`` (both :math:`\hat k` at most 0.7); all NaN / False
    when the joint ratios are unavailable (see :func:`vi_pareto_k`).
    """
    k_joint = vi_pareto_k(idata)
    if not math.isfinite(k_joint):
        return {"elpd_loo": float("nan"), "se": float("nan"), "pareto_k_max": float("nan"),
                "vi_pareto_k": k_joint, "reliable": False}
    ll = np.asarray(_loglik(idata).transpose(..., "__sample__"))  # (N, S)
    lr = np.asarray(idata.sample_stats["log_importance_ratio"]).reshape(-1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lw, k = az.psislw(lr[None, :] - ll)
    elpd_i = _logsumexp(np.asarray(lw) + ll)
    n = ll.shape[0]
    k = np.asarray(k)
    return {"elpd_loo": float(elpd_i.sum()), "se": float(math.sqrt(n * np.var(elpd_i))),
            "pareto_k_max": float(np.max(k)), "vi_pareto_k": k_joint,
            "reliable": bool(k_joint <= 0.7 and np.max(k) <= 0.7)}


def _logsumexp(a):
    m = np.max(a, axis=-1, keepdims=True)
    return (m + np.log(np.sum(np.exp(a - m), axis=-1, keepdims=True)))[..., 0]


def held_out(idata) -> dict | None:
    """The held-out log predictive density of the draws: ``elpd = sum_n lpd_n`` over the test
    observations with ``se = sqrt(n var(lpd_n))`` and the pointwise ``lpd`` (no importance
    sampling: the test points were not used to fit). None for data saved without it."""
    if "held_out" not in idata.groups():
        return None
    lpd = np.asarray(idata.held_out["lpd"], dtype=np.float64)
    return {"elpd": float(lpd.sum()), "se": float(math.sqrt(lpd.size * np.var(lpd))), "lpd": lpd, "n": lpd.size}


#: Pareto k-hat above which a PSIS estimate is unreliable (Vehtari et al. 2024, "Pareto smoothed
#: importance sampling"); ArviZ's own threshold min(1 - 1/log10 S, 0.7) is stricter for few draws
K_RELIABLE = 0.7


def loo_reliability(loo: dict) -> float:
    """Fraction of the observations whose PSIS-LOO Pareto k-hat exceeds :data:`K_RELIABLE`: 0
    when the estimate can be trusted."""
    k = np.asarray(loo["pareto_k"])
    return float(np.mean(k > K_RELIABLE)) if k.size else 0.0


def compare_held_out(idatas: dict) -> list[dict]:
    """Models ranked by held-out elpd (:func:`held_out`), best first: ``elpd_test``, ``se_test``,
    and against the best ``elpd_test_diff`` with its paired standard error ``dse_test`` (the
    difference is taken per test point, so the shared noise of the test set cancels). The models
    must share their test points; raises ValueError otherwise or when one has none."""
    scores = {name: held_out(idata) for name, idata in idatas.items()}
    missing = [name for name, h in scores.items() if h is None]
    if missing:
        raise ValueError(f"no held-out log predictive density in {missing} (saved by an older version)")
    sizes = {name: h["n"] for name, h in scores.items()}
    if len(set(sizes.values())) != 1:
        raise ValueError(f"models must share their test points, got {sizes}")
    order = sorted(scores, key=lambda name: -scores[name]["elpd"])
    best = scores[order[0]]["lpd"]
    rows = []
    for rank, name in enumerate(order):
        h = scores[name]
        d = best - h["lpd"]
        rows.append({"model": name, "rank": rank, "elpd_test": h["elpd"], "se_test": h["se"],
                     "elpd_test_diff": float(d.sum()), "dse_test": float(math.sqrt(d.size * np.var(d)))})
    return rows


def compare(idatas: dict, loos: dict | None = None):
    """``az.compare`` by PSIS-LOO (stacking weights), with iid-draw ``reff = 1`` per model.

    ``idatas`` maps model names to InferenceData with ``log_likelihood`` over the *same*
    observations; ``loos`` optionally holds their :func:`loo` results, to skip recomputing.
    Returns a pandas DataFrame indexed by model, best first.
    """
    if len(idatas) < 2:
        raise ValueError(f"compare needs at least two models, got {len(idatas)}")
    sizes = {name: int(idata.log_likelihood[OBS].sizes[OBS_DIM]) for name, idata in idatas.items()}
    if len(set(sizes.values())) != 1:
        raise ValueError(f"models must share their observations, got {sizes} observations")
    observed = {name: np.asarray(idata.observed_data[OBS]) for name, idata in idatas.items()
                if "observed_data" in idata.groups()}
    if observed:
        first_name, first = next(iter(observed.items()))
        for name, values in observed.items():
            if values.shape != first.shape or not np.array_equal(values, first):
                raise ValueError(f"models must share their observations: the observed data of {name!r} "
                                 f"differ from those of {first_name!r}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        elpds = {name: (loos[name]["elpd_data"] if loos and name in loos else az.loo(idata, pointwise=True, reff=1.0))
                 for name, idata in idatas.items()}
        return az.compare(elpds, ic="loo")


def summary(idata, var_names=None, **kwargs):
    """``az.summary`` of the posterior (pandas DataFrame); quiet about single-chain R-hat
    (R-hat needs two chains and is NaN for one chain of q draws)."""
    logger = logging.getLogger("arviz")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return az.summary(idata, var_names=var_names, **kwargs)
    finally:
        logger.setLevel(level)


# ============================================================================ files and access


def save(idata, path: str) -> str:
    """Write to netCDF (``az.from_netcdf`` reads it back), atomically via a temporary file."""
    import os

    tmp = f"{path}.tmp"
    idata.to_netcdf(tmp)
    os.replace(tmp, path)
    return path


def slim(idata, var_names):
    """The InferenceData of a reduced model as a report saves it: the posterior of ``var_names``
    (the network's parameters; the hyper-sites and derived shrinkage are those of the dense
    model), the pointwise log-likelihood, posterior predictive, observed data and sample stats that
    comparison reads; no ``variational`` or ``fit_history`` group (the dense file has them)."""
    keep = [name for name in var_names if name in idata.posterior]
    out = az.InferenceData(**{g: getattr(idata, g) for g in idata.groups()
                              if g not in ("posterior", "variational", "fit_history")},
                           posterior=idata.posterior[keep])
    out.attrs.update(idata.attrs)
    return out


def load(path: str):
    """``az.from_netcdf``."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return az.from_netcdf(path)


def attributes(idata) -> dict:
    """The InferenceData's attributes with JSON strings decoded."""
    out = {}
    for key, value in idata.attrs.items():
        if isinstance(value, (np.integer, np.floating)):
            value = value.item()
        if isinstance(value, str) and value[:1] in "[{":
            try:
                value = json.loads(value)
            except ValueError:
                pass
        out[key] = value
    return out


def groups(idata) -> list[str]:
    return list(idata.groups())


def history(idata) -> dict[str, np.ndarray]:
    """The ``fit_history`` group as arrays (``epoch`` plus the recorded keys); empty if none."""
    if "fit_history" not in idata.groups():
        return {}
    ds = idata.fit_history
    return {"epoch": np.asarray(ds["epoch"]), **{k: np.asarray(ds[k]) for k in ds.data_vars}}


def posterior_var_names(idata) -> list[str]:
    return list(idata.posterior.data_vars)


# ============================================================================ plots


def forest_selection(idata, max_rows: int = 24):
    """What :func:`plot_forest` shows: ``(var_names, coords, title)``.

    The group scales (``scale_sites``) if the run has any, each cut to its first rows;
    otherwise a few weights of every layer: of each weight tensor, its first unit at the inputs
    where its posterior mean is largest in magnitude (the first position of any further axis, a
    convolution's kernel), ``max_rows`` rows in all.
    """
    attrs = attributes(idata)
    scales = [n for n in attrs.get("scale_sites", []) if n in idata.posterior]
    coords = {}
    if scales:
        per = max(1, max_rows // len(scales))
        for name in scales:
            for dim in idata.posterior[name].dims[2:]:
                coords[dim] = np.asarray(idata.posterior[dim][:per])
        return scales, coords, f"posterior of the scale / precision sites (first {per} entries of each)"
    weights = [n for n in idata.posterior.data_vars
               if idata.posterior[n].attrs.get("role") == "weight" and idata.posterior[n].ndim >= 4]
    if not weights:
        weights = [n for n in idata.posterior.data_vars if idata.posterior[n].ndim >= 3][-1:]
    per = max(2, max_rows // len(weights))
    for name in weights:
        var = idata.posterior[name]
        dims = var.dims[2:]
        coords[dims[0]] = [int(np.asarray(var[dims[0]])[0])]
        if len(dims) == 1:
            continue
        mean = np.abs(np.asarray(var.sel({dims[0]: coords[dims[0]]}).mean(("chain", "draw"))))[0]
        # a kernel: its last axis whole (up to 5 positions), every other kernel axis at its largest |mean|
        last = dims[-1] if len(dims) > 2 and mean.shape[-1] <= 5 else None
        width = mean.shape[-1] if last is not None else 1
        for i, dim in enumerate(dims[2:], start=2):
            if dim == last:
                continue
            axes = tuple(a for a in range(mean.ndim) if a != i - 1)
            coords[dim] = [int(np.asarray(var[dim])[int(np.argmax(mean.max(axis=axes)))])]
        inputs = mean.reshape(mean.shape[0], -1).max(1)
        top = np.argsort(-inputs)[:max(1, per // width)]
        coords[dims[1]] = np.asarray(var[dims[1]])[np.sort(top)]
    which = "the weight tensor" if len(weights) == 1 else f"each of the {len(weights)} weight tensors"
    return weights, coords, (f"posterior of a few weights of {which}:\n"
                             f"its first unit, at the inputs with the largest |mean| (a kernel: its largest row)")


def scales_shown(idata, var_names) -> bool:
    scales = set(attributes(idata).get("scale_sites", []))
    return bool(var_names) and all(v in scales for v in var_names)


def plot_forest(idata, path: str, max_rows: int = 24, hdi_prob: float = 0.94) -> str:
    """ArviZ forest plot (``az.plot_forest``) of the group scales or, without scale sites, of a
    few weight rows (:func:`forest_selection`); saved as PNG."""
    from matplotlib.figure import Figure

    var_names, coords, title = forest_selection(idata, max_rows)
    rows = sum(int(np.prod([len(coords.get(d, idata.posterior[d])) for d in idata.posterior[v].dims[2:]]))
               for v in var_names)
    fig = Figure(figsize=(7, 1.2 + 0.28 * rows))
    ax = fig.add_subplot()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        az.plot_forest(idata, var_names=var_names, coords=coords, combined=True, hdi_prob=hdi_prob, ax=ax,
                       textsize=9, filter_vars=None)
    if not scales_shown(idata, var_names):
        ax.axvline(0.0, color="grey", lw=0.8, ls=":")  # weights whose interval straddles 0
    else:  # positive scales spanning decades (1e-4 next to 150): a log axis
        ax.set_xscale("log")
    ax.set_title("")
    ax.set_xlabel("value (log scale)" if scales_shown(idata, var_names) else "value")
    fig.suptitle(f"{title}\n(median, 50% and {hdi_prob:.0%} HDI; one chain of q draws)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path
