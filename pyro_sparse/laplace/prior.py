"""Gaussian prior precisions of a Laplace approximation, by structure (Immer et al. 2021; SpaM).

A prior ``N(0, diag(delta)^-1)`` over a network's trainable parameters, whose log precisions are
the parameters of an ``nn.Module`` (what the marginal likelihood is maximised over):

* ``"scalar"``: one ``delta`` for all parameters;
* ``"layerwise"``: one ``delta`` per layer (module owning parameters), shared by its weight and bias;
* ``"parameterwise"``: one ``delta`` per scalar parameter;
* ``"unitwise"`` (Dhahri et al. 2024): Linear weight (out, in): ``log delta_ij = a_i + b_j``
  (output unit ``i``, input unit ``j``); Conv weight (out, in, k...): ``a_o + b_i`` per
  (out-channel, in-channel) pair, shared over the kernel; each bias has its own ``log delta``
  per output unit.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import nn

__all__ = [
    "PRIOR_STRUCTURES",
    "PriorPrecision",
    "ScalarPrior",
    "LayerwisePrior",
    "ParameterwisePrior",
    "UnitwisePrior",
    "make_prior_precision",
    "as_theta",
]

PRIOR_STRUCTURES = ("scalar", "layerwise", "parameterwise", "unitwise")
_LOG_2PI = math.log(2 * math.pi)


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
        theta = as_theta(theta, self.names, "theta")
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
    a convolution's weight (out, in, kh, kw) gets ``a[:, None, None, None] + b[None, :, None, None]``
    (one precision per channel pair, shared over the kernel). A bias (out,) gets its own
    per-unit ``a`` and no ``b`` (``col_logs[k]`` is empty). The split ``a + b`` is only
    identified up to a constant moved between ``a`` and ``b``; the precision is unaffected.
    """

    def __init__(self, model, init=1.0):
        super().__init__(model)
        log_init = _log_init(init)
        rows, cols = [], []
        for name in self.names:
            kind, shape = name.rpartition(".")[2], self.shapes[name]
            if kind not in ("weight", "bias") or len(shape) != (1 if kind == "bias" else max(len(shape), 2)):
                raise ValueError(f"unitwise prior: parameter {name!r} of shape {list(shape)} is neither a weight "
                                 "(units, inputs, ...) nor a bias (units,)")
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


def as_theta(theta, names, arg):
    """Parameters as a dict; a Module is read as its detached parameters."""
    if isinstance(theta, nn.Module):
        theta = {name: p.detach() for name, p in theta.named_parameters()}
    if not isinstance(theta, Mapping):
        raise ValueError(f"{arg} must be a dict name -> tensor or an nn.Module, got {type(theta).__name__}")
    missing = [name for name in names if name not in theta]
    if missing:
        raise ValueError(f"{arg} lacks the parameters {missing}")
    return theta
