r"""The Laplace posterior of a network: its curvature, summary and predictive.

Around the weights :math:`\theta` of a network's deterministic twin (a MAP estimate, or a
trained module's weights), the Laplace approximation is the Gaussian
:math:`N(\theta, P^{-1})`, :math:`P = H + \mathrm{diag}(\delta)`, with ``H`` a curvature of the
negative log-likelihood on the data (:mod:`pyro_sparse.laplace.curvature`) and :math:`\delta`
the prior precision (:mod:`pyro_sparse.laplace.prior`), fitted to the Laplace marginal
likelihood (:mod:`pyro_sparse.laplace.marglik`; MacKay 1992; Immer et al. 2021). Three
structures of ``H`` are kept (``curvature``):

* ``"diag"``: the exact diagonal GGN (or empirical Fisher, ``hessian="ef"``). The summary's
  precision :math:`P_{ii}` is then the diagonal of the precision matrix -- a *conditional*
  precision: :math:`1/P_{ii} \le \Sigma_{ii}`, equal only where ``H`` is diagonal. The summary
  says so (``marginal=False``) and the rules that read marginal variances name the approximation.
* ``"kfac"``: Kronecker factors per layer, :math:`P = A \otimes G + \delta`
  (:class:`~pyro_sparse.kron.KroneckerPrecision`): marginal variances from the eigenbasis, and
  the row blocks :math:`G_{ii}A + \delta` the compensated reduction works on.
* ``"rows"``: the exact GGN block of every unit's row (:class:`~pyro_sparse.kron.RowPrecision`),
  rows independent: exact within a row.

:class:`LaplacePosterior` holds one fit: its :meth:`~LaplacePosterior.summary` is the
:class:`~pyro_sparse.summary.PosteriorSummary` every reduction rule reads (site names as in the
network, the structure of each layer reachable as ``site.structure``), and
:meth:`~LaplacePosterior.predictive` draws from the linearised (GLM) or the sampled-network
predictive (Immer, Korzepa & Bauer 2021; Daxberger et al. 2021, "Laplace Redux").
:func:`laplace_posterior` fits one to a trained module in one call.
"""

from __future__ import annotations

import copy
import time

import torch
from torch import nn
from torch.func import functional_call, jvp

from ..data import data_batches
from ..distributions import log_alpha
from ..kron import KroneckerPrecision, RowPrecision, rows_of
from ..summary import PosteriorSummary, SiteSummary
from .curvature import as_likelihood, diag_ef, diag_ggn, input_moment, kfac_ggn, row_ggn
from .marglik import fit_prior_precision
from .prior import PRIOR_STRUCTURES, make_prior_precision

__all__ = ["CURVATURES", "HESSIANS", "PREDICTIVES", "curvature_of", "LaplacePosterior", "laplace_posterior",
           "Calibration"]

CURVATURES = ("diag", "kfac", "rows")
HESSIANS = ("ggn", "ef")
PREDICTIVES = ("glm", "nn")


def curvature_of(model, data, likelihood, curvature="diag", hessian="ggn", mc_samples=None, generator=None,
                 network=None):
    """The curvature ``H`` of ``-log p(D | theta)`` summed over ``data`` (a list of ``(x, y)`` batches,
    :func:`~pyro_sparse.laplace.curvature.data_batches`): ``diag`` name -> ``H_ii`` (GGN, or the
    empirical Fisher with ``hessian="ef"``), ``kfac`` layer -> ``(A, G)``, ``rows`` layer ->
    ``(A, blocks)`` with ``blocks`` ``(out, D', D')``. ``mc_samples``: Monte Carlo output columns
    instead of one backward pass per output (any GGN)."""
    if curvature not in CURVATURES:
        raise ValueError(f"curvature: expected one of {CURVATURES}, got {curvature!r}")
    if hessian not in HESSIANS:
        raise ValueError(f"hessian: expected one of {HESSIANS}, got {hessian!r}")
    if hessian == "ef":
        if curvature != "diag":
            raise ValueError(f"hessian: the empirical Fisher is diagonal here; use curvature diag (got {curvature!r})")
        return diag_ef(model, data, None, likelihood, network=network)
    fn = {"diag": diag_ggn, "kfac": kfac_ggn, "rows": row_ggn}[curvature]
    return fn(model, data, None, likelihood, mc_samples=mc_samples, generator=generator, network=network)


class Calibration:
    """The inputs of every layer of a network being reduced: what the compensated reduction
    (:mod:`pyro_sparse.reduction.compensate`) reads to reduce the layers in order, each on the
    already-reduced network's own activations (OBC and SparseGPT do the same).

    ``network``: the Bayesian network; ``model``: its deterministic twin (copied; parameters
    named like the sites); ``data``: ``(x, y)`` batches (the labels are not read).
    """

    def __init__(self, network, model, data):
        self.network, self.data = network, data
        self.model = copy.deepcopy(model).eval()

    @torch.no_grad()
    def input_moment(self, layer, values):
        """``A`` of ``layer`` (:func:`~pyro_sparse.laplace.curvature.input_moment`) on the network
        holding ``values`` (site -> tensor; others as they are)."""
        params = dict(self.model.named_parameters())
        for site, value in values.items():
            if site in params:
                params[site].copy_(value)
        return input_moment(self.model, self.data, layer, self.network)


class LaplacePosterior:
    r"""A Laplace posterior :math:`N(\theta, (H + \mathrm{diag}(\delta))^{-1})` of ``model``, the
    deterministic twin of ``network`` (parameters named like the network's sites).

    Attributes: ``network``, ``model``, ``likelihood``, ``prior`` (a
    :class:`~pyro_sparse.laplace.prior.PriorPrecision`), ``curvature`` (``diag``, ``kfac``,
    ``rows``), ``factors`` (the curvature itself: name -> ``H_ii``, layer -> ``(A, G)``, layer ->
    row blocks), ``log_lik`` and ``info`` (marginal likelihood, seconds per stage).
    """

    def __init__(self, network, model, likelihood, prior, curvature, factors, log_lik=None, info=None,
                 method="laplace"):
        self.network, self.model, self.likelihood, self.prior = network, model, likelihood, prior
        self.curvature, self.factors, self.log_lik = curvature, factors, log_lik
        self.info = dict(info or {})
        self.method = method
        self._summary = None

    @property
    def sites(self):
        return self.network.param_sites()

    def theta(self) -> dict:
        """Site -> the weight the posterior is centred at (detached)."""
        params = dict(self.model.named_parameters())
        return {name: params[name].detach() for name in self.sites if name in params}

    # ------------------------------------------------------------------ the summary
    @torch.no_grad()
    def summary(self) -> PosteriorSummary:
        """The posterior as a :class:`~pyro_sparse.summary.PosteriorSummary` (computed once).

        Per site: ``loc = theta``, ``prior_loc = 0``, ``prior_precision = delta``, the network's
        group axes, ``log_alpha`` from the variance; ``precision`` is the marginal precision
        :math:`1/\\Sigma_{ii}` where the structure gives it (kfac, rows) and :math:`P_{ii}` for a
        diagonal curvature (``marginal=False``); ``structure`` the layer's
        :class:`~pyro_sparse.kron.KroneckerPrecision` or :class:`~pyro_sparse.kron.RowPrecision`."""
        if self._summary is not None:
            return self._summary
        deltas = {name: d.detach() for name, d in self.prior.precision_dict().items()}
        theta = self.theta()
        sites = self.sites
        structures, precisions, marginal = {}, {}, {}
        if self.curvature == "diag":
            for name in sites:
                precisions[name] = self.factors[name].detach() + deltas[name].expand(theta[name].shape)
                marginal[name] = False
        else:
            for layer, value in self.factors.items():
                prefix = f"{layer}." if layer else ""
                w, b = f"{prefix}weight", f"{prefix}bias"
                if w not in sites:
                    continue
                bias = b if b in sites and b in deltas else None
                delta = rows_of(deltas[w].expand(theta[w].shape),
                                deltas[bias].expand(theta[bias].shape) if bias else None)
                if self.curvature == "kfac":
                    s = KroneckerPrecision(layer, w, bias, theta[w].shape, value[0], value[1], delta)
                else:
                    blocks = value[1].detach().to(torch.float64).clone()
                    blocks.diagonal(dim1=1, dim2=2).add_(delta.to(torch.float64))
                    s = RowPrecision(layer, w, bias, theta[w].shape, blocks, delta, input_moment=value[0])
                variance = s.marginal_variance()
                values = s.split(s.precision_diagonal() if variance is None else variance.reciprocal())
                for site in s.sites():
                    structures[site], precisions[site], marginal[site] = s, values[site], variance is not None
        # a classifier's curvature vanishes where its softmax saturates (a confident fit), a Gaussian
        # likelihood's does not: the compensated reduction reads the former in unit output scale
        scale = "posterior" if getattr(self.likelihood, "task", None) == "regression" else "unit"
        out = PosteriorSummary(method=self.method, output_scale=scale)
        for name, (layer, param, _) in sites.items():
            if name not in precisions:
                raise ValueError(f"the Laplace posterior has no curvature for the site {name!r}")
            loc = theta[name].clone()
            precision = precisions[name].to(loc.dtype)
            delta = deltas[name].expand(loc.shape).clone()
            zero = torch.zeros((), dtype=loc.dtype, device=loc.device)
            out[name] = SiteSummary(layer.site, param, loc, precision, zero,
                                    delta, dict(layer.param_axes[param]), log_alpha(loc, precision.rsqrt()),
                                    structure=structures.get(name), marginal=marginal[name])
        self._summary = out
        return out

    def calibration(self, data) -> Calibration:
        """A :class:`Calibration` on ``data`` (tensors ``x`` or ``(x, y)`` batches): the compensated
        reduction then works layer by layer on the reduced network's inputs."""
        batches = data_batches(data) if not torch.is_tensor(data) else data_batches(data, None, 256)
        return Calibration(self.network, self.model, batches)

    # ------------------------------------------------------------------ draws and the predictive
    @torch.no_grad()
    def sample(self, num_samples, generator=None) -> list[dict]:
        """``num_samples`` draws of the weights, each site -> value (the other parameters as they are)."""
        summary = self.summary()
        draws = [dict() for _ in range(num_samples)]
        done = set()
        for name, s in summary.items():
            if name in done:
                continue
            if s.structure is not None:
                noise = s.structure.sample(num_samples, generator)
                for i in range(num_samples):
                    for site, v in s.structure.split(noise[i]).items():
                        draws[i][site] = summary[site].loc + v.to(s.loc.dtype)
                done.update(s.structure.sites())
                continue
            sd = s.precision.rsqrt()
            for i in range(num_samples):
                eps = torch.randn(s.loc.shape, generator=generator, dtype=s.loc.dtype).to(s.loc.device)
                draws[i][name] = s.loc + sd * eps
            done.add(name)
        return draws

    def predictive(self, x, num_samples=20, kind="glm", generator=None):
        r"""Network outputs ``(S, B, ...)`` under ``num_samples`` posterior draws.

        ``kind="glm"`` (default): the linearised network :math:`f(x;\theta) + J_\theta(x)(w - \theta)`
        for each draw ``w`` -- the generalised linear model whose predictive the Laplace
        approximation describes best (Immer, Korzepa & Bauer 2021; laplace-torch's ``glm``
        predictive with Monte Carlo link), one Jacobian-vector product per draw
        (``torch.func.jvp``). ``kind="nn"``: the network itself at each draw (Laplace Redux's
        "sampled" predictive; it underfits where the posterior is broad)."""
        if kind not in PREDICTIVES:
            raise ValueError(f"kind: expected one of {PREDICTIVES}, got {kind!r}")
        draws = self.sample(num_samples, generator)
        model = self.model
        modes = [m.training for m in model.modules()]
        model.eval()
        try:
            with torch.no_grad():
                if kind == "nn":
                    params = dict(model.named_parameters())
                    return torch.stack([functional_call(model, {**params, **d}, (x,)) for d in draws])
                theta = self.theta()
                fixed = {k: v.detach() for k, v in model.named_parameters() if k not in theta}
                fixed.update({k: v for k, v in model.named_buffers()})

                def f(sites):
                    return functional_call(model, {**fixed, **sites}, (x,))

                outputs = []
                for d in draws:
                    tangent = {k: (d[k] - theta[k]).to(theta[k].dtype) for k in theta}
                    f0, df = jvp(f, (theta,), (tangent,))
                    outputs.append(f0 + df)
                return torch.stack(outputs)
        finally:
            for m, mode in zip(model.modules(), modes):
                m.training = mode


#: rows per chunk of the curvature pass over tensor data (the activations of one chunk are held)
CURVATURE_BATCH = 128
#: most outputs whose GGN columns are computed exactly (one backward pass each) by default
MAX_EXACT_OUTPUTS = 16


def _check_targets(likelihood, data, outputs):
    """Finite inputs and targets, and class labels within the network's ``outputs`` classes
    (ValueError naming the value and the row)."""
    seen = 0
    for xb, yb in data:
        for name, t in (("x", xb), ("y", yb)):
            if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                row = seen + int(torch.nonzero((~torch.isfinite(t.reshape(len(t), -1))).any(1))[0])
                raise ValueError(f"{name}: NaN or infinite values, the first in row {row}")
        seen += len(xb)
    if likelihood.task not in ("classification", "binary"):
        return
    classes = outputs if likelihood.task == "classification" else 2
    for _, yb in data:
        if yb.is_floating_point() and not bool((yb == yb.round()).all()):
            raise ValueError("y: class labels must be whole numbers")
        low, high = int(yb.min()), int(yb.max())
        if low < 0 or high >= classes:
            bad = low if low < 0 else high
            raise ValueError(f"y: label {bad} is outside 0..{classes - 1}, the classes the network predicts")


def _without_curvature(module):
    """Module paths of ``module`` that ``bayesian()`` would convert to a layer declaring no
    curvature (recurrent, embedding, ...): the post-hoc posterior holds them fixed."""
    from ..convert import conversion_for

    out = []
    for path, child in module.named_modules():
        cls = conversion_for(child) if path else None
        if cls is not None and cls.curvature is None and not any(path.startswith(p + ".") for p in out):
            out.append(path)
    return out


def laplace_posterior(module: nn.Module, x, y=None, likelihood="categorical", noise=1.0, curvature="diag",
                      structure="scalar", prior_precision=1.0, hyper_steps=200, hyper_lr=0.1, exclude=(),
                      input_shape=None, batch_size=None, mc_samples="auto", seed=0) -> LaplacePosterior:
    """The post-hoc Laplace posterior of a trained module, in one call (as laplace-torch's
    ``Laplace(model, ...).fit(loader)`` with ``optimize_prior_precision``).

    ``module``: any ``torch.nn.Module`` with parameters (a bare ``nn.Linear`` too); ``x, y``
    tensors or ``x`` an iterable of ``(x, y)`` batches (a ``DataLoader``, streamed).
    ``curvature``: ``diag`` (exact diagonal GGN), ``kfac`` or ``rows`` (see the module
    docstring); ``mc_samples``: Monte Carlo output columns (one backward pass each instead of one
    per output), ``None`` for the exact columns, ``"auto"`` (default): exact up to
    :data:`MAX_EXACT_OUTPUTS` outputs, one column above (a network with hundreds of outputs would
    otherwise cost hundreds of backward passes per batch). ``structure``: the prior precisions (``scalar``,
    ``layerwise``, ``parameterwise``, ``unitwise``), fitted from ``prior_precision`` by MacKay's
    fixed point (scalar, layer-wise; at most ``hyper_steps`` iterations) or ``hyper_steps`` Adam
    steps at ``hyper_lr`` (``hyper_steps=0``: fixed). The default ``scalar`` (laplace-torch's
    too): with the weights fixed at a MAP of another objective, richer structures raise the
    marginal likelihood by driving the precision of weights the data do not constrain towards 0.
    ``exclude``: module-name patterns held fixed (with every layer that has no curvature).
    ``batch_size``: chunk size of tensor data for the curvature pass (memory; default
    :data:`CURVATURE_BATCH`).

    Returns a :class:`LaplacePosterior`: ``.summary()`` (with the factors reachable per layer),
    ``.predictive(x, S)``, ``.network`` (the :class:`~pyro_sparse.convert.BayesianModule` naming the
    sites), ``.model`` (the copy the curvature was computed on), ``.info`` (``log_marglik``,
    ``prior_precision``, seconds and peak memory per stage).
    """
    from ..convert import BayesianModule
    from ..priors import Gaussian

    if curvature not in CURVATURES:
        raise ValueError(f"curvature: expected one of {CURVATURES}, got {curvature!r}")
    if structure not in PRIOR_STRUCTURES:
        raise ValueError(f"structure: expected one of {PRIOR_STRUCTURES}, got {structure!r}")
    if isinstance(hyper_steps, bool) or not isinstance(hyper_steps, int) or hyper_steps < 0:
        raise ValueError(f"hyper_steps: expected an integer >= 0, got {hyper_steps!r}")
    lik = as_likelihood(likelihood, noise)
    data = data_batches(x, y, batch_size or CURVATURE_BATCH)
    if any(yb is None for _, yb in data):
        raise ValueError("y: the Laplace posterior needs the labels (targets) of the data")
    start = time.perf_counter()
    fixed = _without_curvature(module)
    network = BayesianModule(module, prior=Gaussian(), likelihood=lik, deterministic=list(exclude) + fixed,
                             input_shape=input_shape)
    if not network._probed:
        network.probe(data[0][0])
    sites = network.param_sites()
    model = network.deterministic(network.starting_values())
    for name, p in model.named_parameters():
        p.requires_grad_(name in sites)
    with torch.no_grad():
        outputs = model(data[0][0]).reshape(len(data[0][0]), -1).shape[1]
    _check_targets(lik, data, outputs)
    if mc_samples == "auto":  # one backward pass per output up to MAX_EXACT_OUTPUTS outputs, else one column
        mc_samples = None if outputs <= MAX_EXACT_OUTPUTS else 1
    generator = torch.Generator().manual_seed(seed)
    curv = curvature_of(model, data, lik, curvature, "ggn", mc_samples, generator)
    with torch.no_grad():
        ll = sum(lik.log_likelihood(model(xb), yb) for xb, yb in data)
    curvature_seconds = time.perf_counter() - start
    start = time.perf_counter()
    theta = {name: p.detach() for name, p in model.named_parameters() if name in sites}
    prior = make_prior_precision(structure, model, init=prior_precision)
    trajectory = fit_prior_precision(ll, theta, curv, curvature, prior, hyper_steps, hyper_lr)
    info = {"log_marglik": float(trajectory[-1]), "log_marglik_start": float(trajectory[0]),
            "log_lik": float(ll), "examples": sum(len(xb) for xb, _ in data), "curvature": curvature,
            "structure": structure, "mc_samples": mc_samples,
            "prior_precision": {k: float(v.detach().mean()) for k, v in prior.precision_dict().items()},
            "held_fixed": fixed, "curvature_seconds": curvature_seconds,
            "marglik_seconds": time.perf_counter() - start}
    return LaplacePosterior(network, model, lik, prior, curvature, curv, ll, info,
                            method=f"laplace-posthoc-{curvature}-{structure}")
