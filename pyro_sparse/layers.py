"""Bayesian layers and the parameter-free layers they compose with.

A Bayesian layer holds priors, not weights: in ``forward`` it asks each prior for its
parameter (which emits the Pyro sample sites) and applies the usual operation. The
variational parameters live in the guide. Each layer also knows

* ``out_shape(in_shape)``: shape inference (per example, no batch dimension), used to
  resolve ``auto`` sizes and to check that a spec's sizes chain;
* ``param_axes``: which tensor dimension is each group axis (``unit``, ``input``, ...),
  so priors and reduction rules can act on groups;
* ``deterministic(params)``: the plain ``torch.nn`` module with given parameter values,
  used for MAP/Laplace training and masked predictions;
* the compaction protocol (:mod:`pyro_sparse.compaction`): ``compaction(...)`` (a Bayesian
  layer's units and features for the unit-chain algorithm), ``route_units`` (how a
  parameter-free layer passes units on), ``compact_spec`` and the class method
  ``build_compact(entry)`` that rebuilds the compact module from its spec entry.

New layer types become usable in specs once registered in :data:`pyro_sparse.registry.LAYERS`.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .compaction import WeightCompaction
from .local_reparam import gaussian_conv2d, gaussian_linear
from .priors import Gaussian, build_prior
from .schema import Field, validate


def image_channels(size, in_shape: tuple, layer: str) -> int:
    """A spec's input-channel count that may be ``auto``: then the channels of a per-example
    ``(channels, height, width)`` input."""
    if size != "auto":
        return size
    if len(in_shape) != 3:
        raise ValueError(f"{layer} expects (channels, height, width) input, got shape {list(in_shape)}; "
                         "set input_shape: image or a list in the spec")
    return in_shape[0]


def last_dim(size, in_shape: tuple, key: str) -> int:
    """A spec size that may be ``auto``: then the last dimension of the per-example input."""
    if size != "auto":
        return size
    if not in_shape:
        raise ValueError(f"cannot infer {key!r} from a scalar input")
    return in_shape[-1]


class Reshape(nn.Module):
    """``(B, ...) -> (B, *shape)``: inputs to a network's per-example ``input_shape`` (flat digits
    to ``(1, 8, 8)``); inputs already of that shape pass unchanged."""

    def __init__(self, shape):
        super().__init__()
        self.shape = tuple(shape)

    def forward(self, x):
        return x.reshape(x.shape[0], *self.shape)

    def extra_repr(self):
        return f"shape={self.shape}"


class Layer(nn.Module):
    """Base class. ``fields`` declare the spec options; ``site`` is the sample-site prefix."""

    spec_name = "layer"
    fields: dict[str, Field] = {}
    #: name prefix for automatically named layers (``fc`` -> fc1, fc2, ...)
    prefix = "layer"
    #: parameter name -> {axis name: tensor dim}
    param_axes: dict[str, dict[str, int]] = {}

    def __init__(self):
        super().__init__()
        self.site = self.prefix

    @classmethod
    def from_config(cls, cfg: dict, in_shape: tuple) -> "Layer":
        """Build from validated spec options, given the per-example input shape."""
        return cls(**cfg)

    def out_shape(self, in_shape: tuple) -> tuple:
        return tuple(in_shape)

    def priors(self) -> dict:
        """Parameter name -> prior, for the parameters this layer samples."""
        return {}

    def param_shapes(self) -> dict[str, torch.Size]:
        return {name: getattr(self, f"{name}_init").shape for name in self.priors()}

    def leaves(self) -> list["Layer"]:
        """The layers that own this layer's sample sites: itself; a composite layer (a
        transformer block) lists its Bayesian sub-layers, whose ``site`` is their path."""
        return [self]

    def deterministic(self, params: dict[str, torch.Tensor]) -> nn.Module:
        """The plain PyTorch module with parameter values ``params`` (name -> tensor)."""
        raise NotImplementedError

    # ------------------------------------------------------------------ compaction protocol
    def compaction(self, name: str, values: dict, masks: dict, in_shape: tuple, out_shape: tuple):
        """The layer's :class:`~pyro_sparse.compaction.Compaction` at point ``values`` with keep
        ``masks`` (parameter name -> tensor); None for a parameter-free layer."""
        raise NotImplementedError(f"{type(self).__name__} does not implement the compaction protocol")

    @classmethod
    def build_compact(cls, entry: dict) -> nn.Module:
        """The plain module of a compact spec entry (parameters uninitialised)."""
        raise NotImplementedError(f"{cls.__name__} cannot rebuild a compact module")


class _Stateless(Layer):
    """A parameter-free layer wrapping a ``torch.nn`` module."""

    def _module(self) -> nn.Module:
        raise NotImplementedError

    def __init__(self, **options):
        super().__init__()
        self.options = validate(self.fields, options, path=type(self).__name__)
        self.fn = self._module()

    def forward(self, x):
        return self.fn(x)

    def deterministic(self, params):
        return self._module()

    def compaction(self, name, values, masks, in_shape, out_shape):
        return None

    #: how units pass through: "elementwise" (any axis), "channels" (axis 0 of a (C, H, W) map),
    #: or None (opaque: a unit chain ends here)
    routes = None

    def route_units(self, in_shape: tuple, axis: int):
        """``(axis, block)`` in the output of the units on ``axis`` of the input (each becomes
        ``block`` consecutive features), or None where this layer mixes them."""
        if self.routes == "elementwise" or (self.routes == "channels" and axis == 0 and len(in_shape) == 3):
            return axis, 1
        return None

    def compact_spec(self) -> dict:
        return {"type": self.spec_name, **self.options}

    @classmethod
    def build_compact(cls, entry):
        return cls(**{k: v for k, v in entry.items() if k not in ("type", "name")}).deterministic({})


def _activation(name, module, doc):
    return type(name, (_Stateless,), {"prefix": name.lower(), "spec_name": name.lower(), "routes": "elementwise",
                                       "_module": lambda self: module(), "__doc__": doc})


ReLU = _activation("ReLU", nn.ReLU, "Rectified linear unit.")
Tanh = _activation("Tanh", nn.Tanh, "Hyperbolic tangent.")
Sigmoid = _activation("Sigmoid", nn.Sigmoid, "Logistic sigmoid.")
GELU = _activation("GELU", nn.GELU, "Gaussian error linear unit.")


class Flatten(_Stateless):
    """Flatten every dimension but the batch."""

    spec_name = "flatten"

    prefix = "flatten"

    def _module(self):
        return nn.Flatten()

    def out_shape(self, in_shape):
        return (math.prod(in_shape),)

    def route_units(self, in_shape, axis):
        """Units on the leading axis become contiguous blocks of the flat output."""
        return (0, math.prod(in_shape[1:])) if axis == 0 else None


class Dropout(_Stateless):
    """Ordinary (Bernoulli) dropout, active in training mode only."""

    spec_name = "dropout"

    prefix = "dropout"
    fields = {"p": Field("float", 0.5, nonneg=True)}

    def __init__(self, p=0.5):
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 <= p < 1:
            raise ValueError(f"dropout p must be in [0, 1), got {p!r}")
        super().__init__(p=p)

    routes = "elementwise"  # inference mode: the identity

    def _module(self):
        return nn.Dropout(self.options["p"])


def _pool_out(size, k, s, p):
    return (size + 2 * p - k) // s + 1


class _Pool2d(_Stateless):
    fields = {"kernel_size": Field("int", positive=True), "stride": Field("int", None, positive=True,
                                                                          allow_none=True),
              "padding": Field("int", 0, nonneg=True)}
    torch_cls = nn.MaxPool2d
    routes = "channels"

    def __init__(self, kernel_size, stride=None, padding=0):
        super().__init__(kernel_size=kernel_size, stride=stride or kernel_size, padding=padding)

    def _module(self):
        return self.torch_cls(**self.options)

    def out_shape(self, in_shape):
        if len(in_shape) != 3:
            raise ValueError(f"expects (channels, height, width) input, got shape {tuple(in_shape)}")
        c, h, w = in_shape
        k, s, p = self.options["kernel_size"], self.options["stride"], self.options["padding"]
        oh, ow = _pool_out(h, k, s, p), _pool_out(w, k, s, p)
        if oh <= 0 or ow <= 0:
            raise ValueError(f"kernel {k} does not fit input of size {h}x{w}")
        return (c, oh, ow)


class MaxPool2d(_Pool2d):
    spec_name = "maxpool2d"
    prefix = "pool"
    torch_cls = nn.MaxPool2d


class AvgPool2d(_Pool2d):
    spec_name = "avgpool2d"
    prefix = "pool"
    torch_cls = nn.AvgPool2d


class _Parametric(Layer):
    """Shared machinery of layers with a Bayesian weight and an optional Bayesian bias."""

    def __init__(self, torch_layer: nn.Module, prior, bias_prior):
        super().__init__()
        self.weight_prior = build_prior(prior if prior is not None else Gaussian())
        self.has_bias = torch_layer.bias is not None
        self.bias_prior = build_prior(bias_prior if bias_prior is not None else Gaussian()) if self.has_bias else None
        for param, p in self.priors().items():
            p.check_axes(param, self.param_axes[param])
        # The usual deterministic initialisation, so training starts like a deterministic net.
        self.register_buffer("weight_init", torch_layer.weight.detach().clone(), persistent=False)
        if self.has_bias:
            self.register_buffer("bias_init", torch_layer.bias.detach().clone(), persistent=False)

    def priors(self):
        out = {"weight": self.weight_prior}
        if self.has_bias:
            out["bias"] = self.bias_prior
        return out

    def sample_params(self):
        weight = self.weight_prior.sample(f"{self.site}.weight", self.weight_init, self.param_axes["weight"])
        bias = None
        if self.has_bias:
            bias = self.bias_prior.sample(f"{self.site}.bias", self.bias_init, self.param_axes["bias"])
        return weight, bias

    def compute(self, x, weight, bias):
        """The layer's operation for given parameters: tensors, or under local
        reparameterisation :class:`~pyro_sparse.local_reparam.GaussianWeight` (then the
        pre-activations are sampled). ``forward`` is ``compute(x, *sample_params())``."""
        raise NotImplementedError

    def forward(self, x):
        return self.compute(x, *self.sample_params())

    #: compaction: the per-example axes of the input features and output units (None: last)
    feature_axis = unit_axis = None
    conv = False

    def compaction(self, name, values, masks, in_shape, out_shape):
        """Units are the weight's rows, features its columns (:class:`~pyro_sparse.compaction.WeightCompaction`)."""
        in_axis = len(in_shape) - 1 if self.feature_axis is None else self.feature_axis
        out_axis = len(out_shape) - 1 if self.unit_axis is None else self.unit_axis
        return WeightCompaction(name, self, values, masks, in_shape, out_shape, in_axis, out_axis, self.conv)


class Linear(_Parametric):
    """Bayesian affine map ``y = x W^T + b`` on the last dimension; W is (out, in)."""

    spec_name = "linear"

    prefix = "fc"
    fields = {"in": Field("size", "auto"), "out": Field("size"), "bias": Field("bool", True),
              "prior": Field("any", None, allow_none=True), "bias_prior": Field("any", None, allow_none=True)}
    param_axes = {"weight": {"unit": 0, "input": 1}, "bias": {"unit": 0}}

    def __init__(self, in_features: int, out_features: int, bias: bool = True, prior=None, bias_prior=None):
        for name, v in (("in_features", in_features), ("out_features", out_features)):
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise ValueError(f"Linear {name} must be a positive integer, got {v!r}")
        if not isinstance(bias, bool):
            raise ValueError(f"Linear bias must be true or false, got {bias!r}")
        super().__init__(nn.Linear(in_features, out_features, bias=bias), prior, bias_prior)
        self.in_features, self.out_features = in_features, out_features

    @classmethod
    def from_config(cls, cfg, in_shape):
        cfg = dict(cfg)
        return cls(last_dim(cfg.pop("in"), in_shape, "in"), cfg.pop("out"), **cfg)

    def out_shape(self, in_shape):
        if not in_shape or in_shape[-1] != self.in_features:
            raise ValueError(f"expects inputs whose last dimension is {self.in_features}, "
                             f"got shape {tuple(in_shape)}")
        return (*in_shape[:-1], self.out_features)

    def compute(self, x, weight, bias):
        return gaussian_linear(x, weight, bias)

    def compact_spec(self, features, units, bias):
        return {"type": "linear", "in": int(features), "out": int(units), "bias": bool(bias)}

    @classmethod
    def build_compact(cls, entry):
        return nn.Linear(entry["in"], entry["out"], bias=entry["bias"])

    def deterministic(self, params):
        w = params["weight"]
        m = nn.Linear(w.shape[1], w.shape[0], bias="bias" in params, device=w.device, dtype=w.dtype)
        with torch.no_grad():
            m.weight.copy_(w)
            if "bias" in params:
                m.bias.copy_(params["bias"])
        return m


class Conv2d(_Parametric):
    """Bayesian 2-D convolution; weight (out_channels, in_channels, kh, kw)."""

    spec_name = "conv2d"

    prefix = "conv"
    fields = {"in": Field("size", "auto"), "out": Field("size"), "kernel_size": Field("int", positive=True),
              "stride": Field("int", 1, positive=True), "padding": Field("int", 0, nonneg=True),
              "bias": Field("bool", True),
              "prior": Field("any", None, allow_none=True), "bias_prior": Field("any", None, allow_none=True)}
    param_axes = {"weight": {"unit": 0, "channel": 0, "input": 1}, "bias": {"unit": 0, "channel": 0}}

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1,
                 padding: int = 0, bias: bool = True, prior=None, bias_prior=None):
        for name, v in (("in_channels", in_channels), ("out_channels", out_channels),
                        ("kernel_size", kernel_size), ("stride", stride)):
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise ValueError(f"Conv2d {name} must be a positive integer, got {v!r}")
        if isinstance(padding, bool) or not isinstance(padding, int) or padding < 0:
            raise ValueError(f"Conv2d padding must be an integer >= 0, got {padding!r}")
        if not isinstance(bias, bool):
            raise ValueError(f"Conv2d bias must be true or false, got {bias!r}")
        super().__init__(nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, bias=bias),
                         prior, bias_prior)
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size, self.stride, self.padding = kernel_size, stride, padding

    @classmethod
    def from_config(cls, cfg, in_shape):
        cfg = dict(cfg)
        return cls(image_channels(cfg.pop("in"), in_shape, "conv2d"), cfg.pop("out"), **cfg)

    def out_shape(self, in_shape):
        if len(in_shape) != 3 or in_shape[0] != self.in_channels:
            raise ValueError(f"expects input of shape ({self.in_channels}, height, width), "
                             f"got {tuple(in_shape)}")
        _, h, w = in_shape
        oh = _pool_out(h, self.kernel_size, self.stride, self.padding)
        ow = _pool_out(w, self.kernel_size, self.stride, self.padding)
        if oh <= 0 or ow <= 0:
            raise ValueError(f"kernel {self.kernel_size} does not fit input of size {h}x{w}")
        return (self.out_channels, oh, ow)

    def compute(self, x, weight, bias):
        return gaussian_conv2d(x, weight, bias, stride=self.stride, padding=self.padding)

    feature_axis = unit_axis = 0  # channels
    conv = True

    def compact_spec(self, features, units, bias):
        return {"type": "conv2d", "in": int(features), "out": int(units), "bias": bool(bias),
                "kernel_size": self.kernel_size, "stride": self.stride, "padding": self.padding}

    @classmethod
    def build_compact(cls, entry):
        return nn.Conv2d(entry["in"], entry["out"], entry["kernel_size"], entry["stride"], entry["padding"],
                         bias=entry["bias"])

    def deterministic(self, params):
        w = params["weight"]
        m = nn.Conv2d(w.shape[1], w.shape[0], tuple(w.shape[2:]), self.stride, self.padding,
                      bias="bias" in params, device=w.device, dtype=w.dtype)
        with torch.no_grad():
            m.weight.copy_(w)
            if "bias" in params:
                m.bias.copy_(params["bias"])
        return m

