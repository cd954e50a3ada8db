"""Laplace marginal likelihood with structured Gaussian prior precisions (SpaM).

The Laplace approximation around a MAP estimate ``theta`` (MacKay 1992; Immer et al. 2021,
"Scalable marginal likelihood estimation for model selection in deep learning") gives

    log p(D | delta) ~= log p(D | theta) + log p(theta | delta) - 0.5 log det(P / 2 pi)
                     =  log p(D | theta) - 0.5 [log det P - log det P0 + theta' P0 theta],

with the prior ``p(theta | delta) = N(0, P0^-1)``, ``P0 = diag(delta)``, and the posterior
precision ``P = H + P0`` where ``H`` is a GGN (or empirical Fisher) approximation of the
Hessian of the negative log-likelihood (:mod:`pyro_sparse.curvature`), diagonal or
Kronecker-factored. Maximising it over ``log delta`` with a few Adam steps every few epochs
is the online model selection of Immer et al. (2021) that SpaM (Dhahri et al. 2024,
"Shaving Weights with Occam's Razor") uses to learn sparsity-inducing prior precisions; the
diagonal of ``P`` then feeds the Optimal Posterior Damage score ``s_i = P_ii theta_i^2``.

Prior precision structures (each an ``nn.Module`` whose parameters are log precisions):

* ``"scalar"``: one ``delta`` for all parameters;
* ``"layerwise"``: one ``delta`` per Linear/Conv2d layer, shared by its weight and bias;
* ``"parameterwise"``: one ``delta`` per scalar parameter;
* ``"unitwise"`` (Dhahri et al. 2024): Linear weight (out, in): ``log delta_ij = a_i + b_j``
  (output unit ``i``, input unit ``j``); Conv2d weight (out, in, kh, kw): ``a_o + b_i`` per
  (out-channel, in-channel) pair, shared over the kernel; each bias has its own ``log delta``
  per output unit.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import nn

from .curvature import kfac_flatten

__all__ = [
    "PRIOR_STRUCTURES",
    "PriorPrecision",
    "ScalarPrior",
    "LayerwisePrior",
    "ParameterwisePrior",
    "UnitwisePrior",
    "make_prior_precision",
    "posterior_precision_diag",
    "log_marglik_diag",
    "kfac_eig",
    "log_marglik_kfac",
]

PRIOR_STRUCTURES = ("scalar", "layerwise", "parameterwise", "unitwise")
_LOG_2PI = math.log(2 * math.pi)


# --------------------------------------------------------------------------- priors


def _log_init(init):
    value = float(init)
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"init (the initial prior precision) must be finite and > 0, got init={init!r}")
    return math.log(value)


def _module_of(name):
    return name.rpartition(".")[0]


class PriorPrecision(nn.Module):
    """Base class: a diagonal Gaussian prior ``N(0, diag(delta)^-1)`` over named parameters.

    Subclasses implement :meth:`log_precision_dict`. ``names`` lists the covered parameters, the
    trainable ones (``requires_grad``; frozen ones are held fixed) in ``model.named_parameters()``
    order, and ``shapes`` their shapes.
    """

    def __init__(self, model):
        super().__init__()
        params = [(name, p) for name, p in model.named_parameters() if p.requires_grad]  # frozen: held fixed
        if not params:
            raise ValueError(f"model has no trainable parameters; got model of type {type(model).__name__}")
        self.names = [name for name, _ in params]
        self.shapes = {name: tuple(p.shape) for name, p in params}
        self._dtype = params[0][1].dtype

    def log_precision_dict(self):
        """name -> ``log delta``, a tensor broadcastable to the parameter's shape."""
        raise NotImplementedError

    def precision_dict(self):
        """name -> ``delta``, a tensor broadcastable to the parameter's shape."""
        return {name: value.exp() for name, value in self.log_precision_dict().items()}

    def full_log_precision_dict(self):
        """name -> ``log delta`` expanded to the parameter's full shape."""
        return {name: value.expand(self.shapes[name]) for name, value in self.log_precision_dict().items()}

    def log_prior(self, theta):
        """``log N(theta; 0, diag(delta)^-1) = sum_i 0.5 log delta_i - 0.5 delta_i theta_i^2 - 0.5 log 2 pi``."""
        theta = _as_theta(theta, self.names, "theta")
        total = 0.0
        for name, log_delta in self.full_log_precision_dict().items():
            total = total + (0.5 * log_delta - 0.5 * log_delta.exp() * theta[name].square() - 0.5 * _LOG_2PI).sum()
        return total


class ScalarPrior(PriorPrecision):
    """One precision ``delta`` for every parameter (``log_delta`` is a 0-d parameter)."""

    def __init__(self, model, init=1.0):
        super().__init__(model)
        self.log_delta = nn.Parameter(torch.tensor(_log_init(init), dtype=self._dtype))

    def log_precision_dict(self):
        return {name: self.log_delta for name in self.names}


class LayerwisePrior(PriorPrecision):
    """One precision per layer (module owning parameters); a layer's weight and bias share it.

    ``layers`` lists the module paths; ``log_delta[k]`` belongs to ``layers[k]``.
    """

    def __init__(self, model, init=1.0):
        super().__init__(model)
        self.layers = list(dict.fromkeys(_module_of(name) for name in self.names))
        self._index = {name: self.layers.index(_module_of(name)) for name in self.names}
        self.log_delta = nn.Parameter(torch.full((len(self.layers),), _log_init(init), dtype=self._dtype))

    def log_precision_dict(self):
        return {name: self.log_delta[self._index[name]] for name in self.names}


class ParameterwisePrior(PriorPrecision):
    """One precision per scalar parameter: ``log_deltas[k]`` has the shape of ``names[k]``."""

    def __init__(self, model, init=1.0):
        super().__init__(model)
        log_init = _log_init(init)
        self.log_deltas = nn.ParameterList(
            [nn.Parameter(torch.full(self.shapes[name], log_init, dtype=self._dtype)) for name in self.names]
        )

    def log_precision_dict(self):
        return dict(zip(self.names, self.log_deltas))


class UnitwisePrior(PriorPrecision):
    """Unit-wise precisions (Dhahri et al. 2024): ``log delta_ij = a_i + b_j`` for a weight.

    For each parameter ``names[k]``, ``row_logs[k]`` holds ``a`` (one per output unit /
    out-channel, initialised at ``log init``) and ``col_logs[k]`` holds ``b`` (one per input unit /
    in-channel, initialised at 0). A Linear weight (out, in) gets ``a[:, None] + b[None, :]``;
    a Conv2d weight (out, in, kh, kw) gets ``a[:, None, None, None] + b[None, :, None, None]``
    (one precision per channel pair, shared over the kernel). A bias (out,) gets its own
    per-unit ``a`` and no ``b`` (``col_logs[k]`` is empty). The split ``a + b`` is only
    identified up to a constant moved between ``a`` and ``b``; the precision is unaffected.
    """

    def __init__(self, model, init=1.0):
        super().__init__(model)
        log_init = _log_init(init)
        modules = dict(model.named_modules())
        rows, cols = [], []
        for name in self.names:
            module, kind = modules[_module_of(name)], name.rpartition(".")[2]
            if not isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d)) or kind not in ("weight", "bias"):
                raise ValueError(
                    f"unitwise prior supports Linear and Conv weights and biases; parameter {name!r} "
                    f"belongs to {type(module).__name__}"
                )
            shape = self.shapes[name]
            rows.append(nn.Parameter(torch.full((shape[0],), log_init, dtype=self._dtype)))
            n_cols = shape[1] if kind == "weight" else 0
            cols.append(nn.Parameter(torch.zeros((n_cols,), dtype=self._dtype)))
        self.row_logs = nn.ParameterList(rows)
        self.col_logs = nn.ParameterList(cols)

    def log_precision_dict(self):
        out = {}
        for name, a, b in zip(self.names, self.row_logs, self.col_logs):
            shape = self.shapes[name]
            if b.numel() == 0:  # bias
                out[name] = a
            else:
                trailing = (1,) * (len(shape) - 2)
                out[name] = a.reshape(-1, 1, *trailing) + b.reshape(1, -1, *trailing)
        return out


_STRUCTURES = {
    "scalar": ScalarPrior,
    "layerwise": LayerwisePrior,
    "parameterwise": ParameterwisePrior,
    "unitwise": UnitwisePrior,
}


def make_prior_precision(structure, model, init=1.0):
    """Build the prior precision module of the given ``structure`` for ``model``'s parameters.

    ``structure`` in ``{"scalar", "layerwise", "parameterwise", "unitwise"}``; every precision
    starts at ``init`` (> 0).
    """
    if structure not in _STRUCTURES:
        raise ValueError(f"structure must be one of {PRIOR_STRUCTURES}, got structure={structure!r}")
    return _STRUCTURES[structure](model, init=init)


# --------------------------------------------------------------------------- helpers


def _as_theta(theta, names, arg):
    """Parameters as a dict; a Module is read as its detached parameters."""
    if isinstance(theta, nn.Module):
        theta = {name: p.detach() for name, p in theta.named_parameters()}
    if not isinstance(theta, Mapping):
        raise ValueError(f"{arg} must be a dict name -> tensor or an nn.Module, got {type(theta).__name__}")
    missing = [name for name in names if name not in theta]
    if missing:
        raise ValueError(f"{arg} lacks the parameters {missing}")
    return theta


def _check_prior(prior):
    if not isinstance(prior, PriorPrecision):
        raise ValueError(f"prior must be a PriorPrecision (see make_prior_precision), got {type(prior).__name__}")


def posterior_precision_diag(ggn_diag, prior):
    """Diagonal posterior precision ``P_ii = H_ii + delta_i`` per parameter (the input to OPD).

    Returns dict name -> tensor of the parameter's shape (differentiable in ``log delta``).
    """
    _check_prior(prior)
    ggn_diag = _as_theta(ggn_diag, prior.names, "ggn_diag")
    return {name: ggn_diag[name] + delta.expand(prior.shapes[name]) for name, delta in prior.precision_dict().items()}


def _prior_terms(theta, prior):
    """``(log det P0, theta' P0 theta)`` for a diagonal prior, exactly."""
    logdet_prior, quad = 0.0, 0.0
    for name, log_delta in prior.full_log_precision_dict().items():
        logdet_prior = logdet_prior + log_delta.sum()
        quad = quad + (log_delta.exp() * theta[name].square()).sum()
    return logdet_prior, quad


def log_marglik_diag(log_lik, theta, ggn_diag, prior):
    """Laplace log marginal likelihood with a diagonal Hessian approximation.

        ``log p(D | delta) ~= log p(D | theta) - 0.5 [sum_i log(H_ii + delta_i) - sum_i log delta_i
        + sum_i delta_i theta_i^2]``

    (Immer et al. 2021, Eq. 3 with ``H`` diagonal; Dhahri et al. 2024). Differentiable in the
    prior's ``log delta``; ``theta`` (a dict or a Module, read detached) and ``ggn_diag`` are
    used as given. The approximation is exact for a linear-Gaussian model whose GGN is
    diagonal, at the posterior mode.

    Args:
        log_lik: scalar tensor ``log p(D | theta)``.
        theta: dict name -> tensor (or ``nn.Module``), the MAP estimate.
        ggn_diag: dict name -> tensor, e.g. :func:`pyro_sparse.curvature.diag_ggn`.
        prior: a :class:`PriorPrecision`.
    """
    _check_prior(prior)
    theta = _as_theta(theta, prior.names, "theta")
    post = posterior_precision_diag(ggn_diag, prior)
    logdet_post = sum(p.log().sum() for p in post.values())
    logdet_prior, quad = _prior_terms(theta, prior)
    return log_lik - 0.5 * (logdet_post - logdet_prior + quad)


def kfac_eig(kfac):
    """Eigendecompose every KFAC pair: name -> ``(eigvals_A, eigvecs_A, eigvals_G, eigvecs_G)``.

    Small negative eigenvalues from round-off are clipped to 0 (the factors are PSD).
    Do this once and pass the result to :func:`log_marglik_kfac` when taking many steps on
    ``log delta`` with fixed curvature.
    """
    out = {}
    for name, pair in kfac.items():
        if len(pair) == 4:
            out[name] = tuple(pair)
            continue
        a, g = pair
        la, qa = torch.linalg.eigh(a.detach())
        lg, qg = torch.linalg.eigh(g.detach())
        out[name] = (la.clamp_min(0), qa, lg.clamp_min(0), qg)
    return out


def log_marglik_kfac(log_lik, theta, kfac, prior):
    """Laplace log marginal likelihood with a KFAC Hessian ``H_l ~= kron(A_l, G_l)`` per layer.

    Layout as in :func:`pyro_sparse.curvature.kfac_ggn`: the block of layer ``l`` is over
    ``vec([W | b])`` (column-major). With ``A = Q_A diag(lambda_A) Q_A'`` and
    ``G = Q_G diag(lambda_G) Q_G'`` the eigenvectors of ``kron(A, G)`` are ``kron(Q_A, Q_G)``
    with eigenvalues ``lambda_A[k] lambda_G[m]``, so for a prior constant on the block
    (scalar, layer-wise):

        ``log det(kron(A, G) + delta I) = sum_{k,m} log(lambda_A[k] lambda_G[m] + delta)``   (exact).

    For a non-constant diagonal prior ``D = diag(d)`` on the block (parameter-wise, unit-wise)
    the prior is projected onto the Kronecker eigenbasis and only its diagonal kept
    (as in Immer et al. 2021 and Dhahri et al. 2024):

        ``log det P ~= sum_{k,m} log(lambda_A[k] lambda_G[m] + [Q' D Q]_{(k,m),(k,m)})``,
        ``[Q' D Q]_{(k,m),(k,m)} = sum_{j,i} Q_A[j,k]^2 Q_G[i,m]^2 d_{(j,i)} = (Q_A^2' M Q_G^2)[k,m]``,

    where ``M[j, i] = d`` at input column ``j`` (bias last), output unit ``i``. This reduces to
    the exact formula when ``d`` is constant and, by Hadamard's inequality, never
    underestimates ``log det P`` (so it never overestimates the marginal likelihood given
    ``H = kron(A, G)``). ``log det P0`` and ``theta' P0 theta`` are exact.

    Args:
        log_lik: scalar tensor ``log p(D | theta)``.
        theta: dict name -> tensor (or ``nn.Module``), the MAP estimate.
        kfac: dict layer name -> ``(A, G)`` from :func:`pyro_sparse.curvature.kfac_ggn`, or
            the output of :func:`kfac_eig` (reused across calls).
        prior: a :class:`PriorPrecision` whose parameters are exactly the layers' weights and biases.
    """
    _check_prior(prior)
    theta = _as_theta(theta, prior.names, "theta")
    decomposed = kfac_eig(kfac)
    log_delta = prior.full_log_precision_dict()
    covered = set()
    logdet_post = 0.0
    for layer, (la, qa, lg, qg) in decomposed.items():
        w_name, b_name = f"{layer}.weight", f"{layer}.bias"
        if w_name not in log_delta:
            raise ValueError(f"kfac has layer {layer!r} but the prior has no parameter {w_name!r}")
        has_bias = b_name in log_delta
        d = kfac_flatten(log_delta[w_name], log_delta[b_name] if has_bias else None).exp()
        n_out = prior.shapes[w_name][0]
        if d.numel() != la.numel() * lg.numel() or lg.numel() != n_out:
            raise ValueError(
                f"kfac[{layer!r}] factors of sizes {la.numel()} x {lg.numel()} do not match parameter "
                f"{w_name!r} of shape {prior.shapes[w_name]} (bias: {has_bias})"
            )
        m = d.reshape(la.numel(), n_out)  # M[j, i]
        projected = qa.square().T @ m @ qg.square()  # [Q' D Q] diagonal, (k, m)
        logdet_post = logdet_post + torch.log(torch.outer(la, lg) + projected).sum()
        covered.update({w_name, b_name} if has_bias else {w_name})
    uncovered = [name for name in prior.names if name not in covered]
    if uncovered:
        raise ValueError(f"kfac has no Kronecker factors for the prior's parameters {uncovered}")
    logdet_prior, quad = _prior_terms(theta, prior)
    return log_lik - 0.5 * (logdet_post - logdet_prior + quad)
