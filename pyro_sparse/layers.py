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
* the compaction protocol (:mod:`pyro_sparse.compaction_protocol`): ``compaction(...)`` (a Bayesian
  layer's units and features for the unit-chain algorithm), ``route_units`` (how a
  parameter-free layer passes units on), ``compact_spec`` and the class method
  ``build_compact(entry)`` that rebuilds the compact module from its spec entry;
* the conversion protocol (:mod:`pyro_sparse.convert`): the class method
  ``from_torch(module, priors)`` builds the Bayesian counterpart of a ``torch.nn`` module started
  at its weights (:meth:`Layer.start_at`), and ``write_torch(module, params)`` writes parameter
  values back into such a module (what a converted network's deterministic twin is made of).

Parameter scopes. A Bayesian layer samples its parameters once per call of ``forward``, unless a
*parameter scope* (:func:`param_scope`) is open: then the first call samples them and every
further call in the scope reuses them (a module that a converted network's ``forward`` applies
twice shares one weight draw). Inside the ELBO core the priors return the values it drew
(:func:`~pyro_sparse.priors.provided`), scope or not.

New layer types become usable in specs once registered in :data:`pyro_sparse.registry.LAYERS`.
"""

from __future__ import annotations

import math
from contextlib import contextmanager

import torch
from torch import nn

from .compaction_protocol import WeightCompaction
from .curvature_protocol import CONV, LINEAR
from .local_reparam import gaussian_conv, gaussian_linear, realize, shared_weights
from .priors import Gaussian, build_prior
from .schema import Field, validate
from .storage import CompactLinear, SparseConv1d, SparseConv2d


def auto_size(size, in_shape: tuple, axes: tuple, axis: int, layer: str, hint: str) -> int:
    """A spec size that may be ``auto``: then the size along ``axis`` of a per-example input whose
    axes are named ``axes`` (ValueError naming the layer, the expected axes and ``hint`` for an
    input of another rank)."""
    if size != "auto":
        return size
    if len(in_shape) != len(axes):
        raise ValueError(f"{layer} expects ({', '.join(axes)}) input, got shape {list(in_shape)}; {hint}")
    return in_shape[axis]


def image_channels(size, in_shape: tuple, layer: str) -> int:
    """A spec's input-channel count that may be ``auto``: then the channels of a per-example
    ``(channels, height, width)`` input."""
    return auto_size(size, in_shape, ("channels", "height", "width"), 0, layer,
                     "set input_shape: image or a list in the spec")


def last_dim(size, in_shape: tuple, key: str) -> int:
    """A spec size that may be ``auto``: then the last dimension of the per-example input."""
    if size != "auto":
        return size
    if not in_shape:
        raise ValueError(f"cannot infer {key!r} from a scalar input")
    return in_shape[-1]


def site_name(site: str, param: str) -> str:
    """The sample site of parameter ``param`` of the layer at ``site``: ``fc1.weight``, or ``weight``
    for a layer at the root (a converted bare ``nn.Linear``)."""
    return f"{site}.{param}" if site else param


#: open parameter scopes, innermost last (:func:`param_scope`)
_SCOPES: list = []


@contextmanager
def param_scope():
    """Within the block every Bayesian layer samples its parameters at most once, on its first
    call, and reuses them on further calls. Yields the scope's dict (layer -> parameters)."""
    scope = {}
    _SCOPES.append(scope)
    try:
        yield scope
    finally:
        _SCOPES.pop()


def scoped_params(layer, sample):
    """``sample()`` (a layer's parameter draw), or inside a :func:`param_scope` the scope's value
    for ``layer``, drawn on first use. A layer marked ``shared`` (applied several times per
    forward pass) draws real weight tensors (:class:`~pyro_sparse.local_reparam.shared_weights`):
    local reparameterisation would give each application its own weights."""
    if not _SCOPES:
        return _draw(layer, sample)
    scope = _SCOPES[-1]
    params = scope.get(layer)
    if params is None:
        params = scope[layer] = _draw(layer, sample)
    return params


def _draw(layer, sample):
    if not layer.shared:
        return sample()
    with shared_weights():
        params = sample()
    if isinstance(params, dict):
        return {k: realize(v) for k, v in params.items()}
    return tuple(realize(p) for p in params)


def read_parameter(layer, name):
    """``layer.<name>`` for a parameter the layer samples (``weight``, ``bias``): inside a forward
    pass of the network (an open :func:`param_scope`), that pass's draw (:meth:`Layer.drawn`), so a
    user's ``forward`` that reads a converted module's weight directly (``F.linear(h,
    self.emb.weight)``) gets the weight the module itself uses; outside one, AttributeError saying
    why there is no single value."""
    if _SCOPES:
        return layer.drawn(name)
    raise AttributeError(f"{layer.site}.{name}: a Bayesian layer's {name} is a random variable, drawn once per "
                         "forward pass; read it inside the network's forward (that pass's draw) or take a point "
                         f"value from the posterior (summary.locs()[{layer.site + '.' + name!r}])")


def _check_ints(layer, name, value, n, minimum):
    """``value`` as a tuple of ``n`` integers >= ``minimum`` (an int is repeated)."""
    items = (value,) * n if isinstance(value, int) and not isinstance(value, bool) else value
    if (not isinstance(items, (tuple, list)) or len(items) != n
            or any(isinstance(v, bool) or not isinstance(v, int) or v < minimum for v in items)):
        what = "a positive integer" if minimum > 0 else "an integer >= 0"
        if isinstance(value, (tuple, list)):
            what = f"{n} integers {'> 0' if minimum > 0 else '>= 0'}"
        raise ValueError(f"{layer} {name} must be {what}, got {value!r}")
    return tuple(items)


def _plain(t: tuple):
    """A tuple of equal ints as one int (how specs write sizes), else a list."""
    return t[0] if len(set(t)) == 1 else list(t)


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

    #: how the Laplace curvature covers the layer's parameters (:mod:`pyro_sparse.laplace.curvature`):
    #: a backend, or None where it does not; every registered layer must say which
    curvature = NotImplemented

    #: applied more than once per forward pass: one weight draw serves every application
    #: (set by :class:`~pyro_sparse.convert.BayesianModule`; see :func:`scoped_params`)
    shared = False
    #: parameter name -> (owner layer, the owner's parameter name): parameters tied to another
    #: layer's (:meth:`tie`), which this layer reads instead of sampling a site of its own
    tied: dict = {}

    def __init__(self):
        super().__init__()
        self.site = self.prefix

    # ------------------------------------------------------------------ tied parameters
    def tie(self, param: str, owner: "Layer", owner_param: str):
        """Make this layer's ``param`` the random variable ``owner``'s ``owner_param`` is (a tied
        weight: ``self.out.weight = self.emb.weight``). The parameter leaves :meth:`priors` (one
        site, the owner's: one posterior, one mask, counted once) and every forward pass reads the
        owner's draw of the pass (:meth:`drawn`); both layers draw real weight tensors
        (``shared``), as one draw must serve both. ValueError for parameters of other shapes."""
        mine, theirs = self.param_shapes(), owner.param_shapes()
        if param not in mine or owner_param not in theirs:
            raise ValueError(f"cannot tie {self.site}.{param} to {owner.site}.{owner_param}: no such parameter")
        if tuple(mine[param]) != tuple(theirs[owner_param]):
            raise ValueError(f"cannot tie {self.site}.{param} {list(mine[param])} to {owner.site}.{owner_param} "
                             f"{list(theirs[owner_param])}: the shapes differ")
        self.tied = {**self.tied, param: (owner, owner_param)}
        self.shared = owner.shared = True
        return self

    #: the names of what ``sample_params`` returns, where it returns a tuple
    draw_names: tuple = ()
    #: parameters a converted layer serves to code that reads them directly (``module.weight``),
    #: with the torch module's name and layout (:func:`read_parameter`)
    readable: tuple = ()

    def drawn(self, param: str):
        """The value of ``param`` in the open parameter scope (:func:`param_scope`; drawn on first
        use, a real tensor): what a layer tied to this one reads, and what a direct read of
        ``module.weight`` in the user's ``forward`` returns."""
        values = scoped_params(self, self.sample_params)
        if not isinstance(values, dict):
            values = dict(zip(self.draw_names, values))
        return realize(values[param])

    def _tied_values(self) -> dict:
        return {param: owner.drawn(theirs) for param, (owner, theirs) in self.tied.items()}

    @classmethod
    def from_config(cls, cfg: dict, in_shape: tuple) -> "Layer":
        """Build from validated spec options, given the per-example input shape."""
        return cls(**cfg)

    def out_shape(self, in_shape: tuple) -> tuple:
        return tuple(in_shape)

    def priors(self) -> dict:
        """Parameter name -> prior, for the parameters this layer samples."""
        return {}

    def set_prior(self, param: str, prior):
        """Give the parameter ``param`` another prior (a prior, its name or a mapping)."""
        prior = build_prior(prior)
        prior.check_axes(param, self.param_axes[param])
        own = getattr(self, "_priors", None)
        if own is not None and param in own:
            own[param] = prior
        elif param in ("weight", "bias") and param in self.priors():
            setattr(self, f"{param}_prior", prior)
        elif param.startswith("z_") and param in self.priors():
            self.z_prior = prior
        else:
            raise ValueError(f"{type(self).__name__} has no parameter {param!r} (parameters: {sorted(self.priors())})")
        return self

    def param_shapes(self) -> dict[str, torch.Size]:
        return {name: getattr(self, f"{name}_init").shape for name in self.priors()}

    def leaves(self) -> list["Layer"]:
        """The layers that own this layer's sample sites: itself; a composite layer (a
        transformer block) lists its Bayesian sub-layers, whose ``site`` is their path."""
        return [self]

    def deterministic(self, params: dict[str, torch.Tensor]) -> nn.Module:
        """The plain PyTorch module with parameter values ``params`` (name -> tensor)."""
        raise NotImplementedError

    # ------------------------------------------------------------------ starting values
    def start_at(self, values: dict):
        """Start from given parameter values (name -> tensor, e.g. trained weights): they become
        the initial values the priors propose (``<param>_init``), so a guide set up afterwards has
        its posterior means there. Dtype and device follow ``values``."""
        shapes = self.param_shapes()
        for name, value in values.items():
            if name not in shapes:
                raise ValueError(f"{self.site}: no parameter {name!r} (parameters: {sorted(shapes)})")
            value = torch.as_tensor(value).detach()
            if tuple(value.shape) != tuple(shapes[name]):
                raise ValueError(f"{site_name(self.site, name)}: expected shape {list(shapes[name])}, "
                                 f"got {list(value.shape)}")
            setattr(self, f"{name}_init", value.clone())
        return self

    # ------------------------------------------------------------------ conversion protocol
    #: the ``torch.nn`` module types :meth:`from_torch` converts
    torch_types: tuple = ()

    @classmethod
    def from_torch(cls, module: nn.Module, priors: dict) -> "Layer":
        """The Bayesian counterpart of ``module`` started at its parameters; ``priors`` maps the
        counterpart's parameter names (``weight``, ``bias``, ...) to priors (missing: the layer's
        default). Raises ValueError naming what it cannot represent."""
        raise NotImplementedError(f"{cls.__name__} does not convert torch modules")

    def torch_values(self, module: nn.Module) -> dict:
        """This layer's parameter values (name -> tensor) read off a ``torch.nn`` module of the
        type it converts: the inverse of :meth:`write_torch`."""
        return {name: getattr(module, name).detach() for name in self.priors()}

    @torch.no_grad()
    def write_torch(self, module: nn.Module, params: dict):
        """Write parameter values (name -> tensor) into ``module`` (of the type it converts), in
        place: then ``module`` computes what this layer computes with those values."""
        for name, value in params.items():
            getattr(module, name).copy_(value)

    # ------------------------------------------------------------------ compaction protocol
    def compaction(self, name: str, values: dict, masks: dict, in_shape: tuple, out_shape: tuple):
        """The layer's :class:`~pyro_sparse.compaction_protocol.Compaction` at point ``values`` with keep
        ``masks`` (parameter name -> tensor); None for a parameter-free layer."""
        raise NotImplementedError(f"{type(self).__name__} does not implement the compaction protocol")

    @classmethod
    def build_compact(cls, entry: dict) -> nn.Module:
        """The plain module of a compact spec entry (parameters uninitialised)."""
        raise NotImplementedError(f"{cls.__name__} cannot rebuild a compact module")


class _Stateless(Layer):
    """A parameter-free layer wrapping a ``torch.nn`` module."""

    curvature = None  # no parameters

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

    @classmethod
    def build_compact(cls, entry):
        """A compact network pools with :class:`StridedMaxPool2d` where it applies (the same values)."""
        module = super().build_compact(entry)
        if StridedMaxPool2d.applies(module):
            module.__class__ = StridedMaxPool2d
        return module


class StridedMaxPool2d(nn.MaxPool2d):
    """``nn.MaxPool2d`` with ``kernel_size == stride`` of 2 or 3 and no padding, computed, for an
    input of at least :attr:`STRIDED_FROM` elements, as the element-wise maximum of the ``k * k``
    strided views ``x[..., i::k, j::k]`` (rows and columns beyond the last whole window dropped,
    as the pool does): exactly the pool's values. On the CPU torch's pooling kernel works plane by
    plane, and a compact network's small maps are many planes: on the 2-core development machine
    (one thread) it took 1.9 ms for a (256, 17, 8, 8) input, this 0.26 ms -- a third of LeNet-5's
    compact network at batch 256 was its first pool. Below about 2^14 elements torch's kernel was
    faster (the views cost about 12 microseconds), so smaller inputs go to it. Exported graphs pool
    with torch's operator (:meth:`plain_module`)."""

    #: inputs with fewer elements use torch's pooling kernel (measured crossover, see the class docstring)
    STRIDED_FROM = 2 ** 14

    def plain_module(self):
        return nn.MaxPool2d(self.kernel_size, self.stride, self.padding)

    @staticmethod
    def applies(module) -> bool:
        if type(module) is not nn.MaxPool2d:
            return False
        k, s, p = module.kernel_size, module.stride, module.padding
        return (isinstance(k, int) and k in (2, 3) and s == k and p == 0
                and module.dilation == 1 and not module.ceil_mode and not module.return_indices)

    def forward(self, x):
        if x.numel() < self.STRIDED_FROM:
            return super().forward(x)
        k = self.kernel_size
        h, w = x.shape[-2] // k * k, x.shape[-1] // k * k
        x = x[..., :h, :w]
        out = x[..., 0::k, 0::k]
        for i in range(k):
            for j in range(k):
                if i or j:
                    out = torch.maximum(out, x[..., i::k, j::k])
        return out


class AvgPool2d(_Pool2d):
    spec_name = "avgpool2d"
    prefix = "pool"
    torch_cls = nn.AvgPool2d


class _Parametric(Layer):
    """Shared machinery of layers with a Bayesian weight and an optional Bayesian bias."""

    #: the torch class a compact network stores this layer's kept weights in as CSR
    #: (:mod:`pyro_sparse.storage`); None: always the dense torch layer
    sparse_cls = None

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
        if self.tied:
            out = {k: v for k, v in out.items() if k not in self.tied}
        return out

    draw_names = readable = ("weight", "bias")

    def sample_params(self):
        tied = self._tied_values() if self.tied else {}
        weight = tied["weight"] if "weight" in tied else self.weight_prior.sample(
            site_name(self.site, "weight"), self.weight_init, self.param_axes["weight"])
        bias = None
        if self.has_bias:
            bias = tied["bias"] if "bias" in tied else self.bias_prior.sample(
                site_name(self.site, "bias"), self.bias_init, self.param_axes["bias"])
        return weight, bias

    def __getattr__(self, name):
        if name in ("weight", "bias") and name in self.draw_names and "_modules" in self.__dict__:
            if name == "bias" and not self.__dict__.get("has_bias", False):
                return None  # as torch's layers without a bias
            return read_parameter(self, name)
        return super().__getattr__(name)

    def compute(self, x, weight, bias):
        """The layer's operation for given parameters: tensors, or under local
        reparameterisation :class:`~pyro_sparse.local_reparam.GaussianWeight` (then the
        pre-activations are sampled). ``forward`` is ``compute(x, *sample_params())``."""
        raise NotImplementedError

    def forward(self, x):
        return self.compute(x, *scoped_params(self, self.sample_params))

    @classmethod
    def _converted(cls, module, priors, layer):
        """``layer`` started at ``module``'s weight and bias."""
        values = {"weight": module.weight.detach()}
        if module.bias is not None:
            values["bias"] = module.bias.detach()
        return layer.start_at(values)

    #: compaction: the per-example axes of the input features and output units (None: last)
    feature_axis = unit_axis = None
    conv = False

    def compaction(self, name, values, masks, in_shape, out_shape):
        """Units are the weight's rows, features its columns
        (:class:`~pyro_sparse.compaction_protocol.WeightCompaction`)."""
        in_axis = len(in_shape) - 1 if self.feature_axis is None else self.feature_axis
        out_axis = len(out_shape) - 1 if self.unit_axis is None else self.unit_axis
        return WeightCompaction(name, self, values, masks, in_shape, out_shape, in_axis, out_axis, self.conv)


class Linear(_Parametric):
    """Bayesian affine map ``y = x W^T + b`` on the last dimension; W is (out, in)."""

    spec_name = "linear"

    prefix = "fc"
    curvature = LINEAR
    sparse_cls = CompactLinear
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

    torch_types = (nn.Linear,)

    @classmethod
    def from_torch(cls, module, priors):
        layer = cls(module.in_features, module.out_features, bias=module.bias is not None,
                    prior=priors.get("weight"), bias_prior=priors.get("bias"))
        return cls._converted(module, priors, layer)

    def compact_spec(self, features, units, bias):
        return {"type": "linear", "in": int(features), "out": int(units), "bias": bool(bias)}

    @classmethod
    def build_compact(cls, entry):
        if "kernels" in entry:  # a layer where weights were removed (pyro_sparse.storage)
            return CompactLinear(entry["in"], entry["out"], bias=entry["bias"], csr_storage=entry["storage"] == "csr",
                                 kernels=entry["kernels"], switch_rows=entry.get("switch_rows"),
                                 positions=entry.get("positions", 1), contiguous=entry.get("contiguous", False))
        return nn.Linear(entry["in"], entry["out"], bias=entry["bias"])

    def deterministic(self, params):
        w = params["weight"]
        m = nn.Linear(w.shape[1], w.shape[0], bias="bias" in params, device=w.device, dtype=w.dtype)
        with torch.no_grad():
            m.weight.copy_(w)
            if "bias" in params:
                m.bias.copy_(params["bias"])
        return m


#: the names of a convolution's spatial axes, by their number (shape errors name them)
SPATIAL_AXES = {1: ("length",), 2: ("height", "width"), 3: ("depth", "height", "width")}


class ConvNd(_Parametric):
    """Shared machinery of the Bayesian convolutions over ``dims`` spatial axes (``groups=1``,
    zero padding); ``kernel_size``, ``stride``, ``padding`` and ``dilation`` may be ints or tuples.
    A subclass names ``dims``, its torch class and ``spec_name``: the forward pass
    (:func:`~pyro_sparse.local_reparam.gaussian_conv`), shapes, conversion, compaction and the
    Laplace curvature (the N-d ``CONV`` backend) are all here."""

    dims = 2
    torch_cls = nn.Conv2d
    curvature = CONV
    prefix = "conv"
    fields = {"in": Field("size", "auto"), "out": Field("size"), "kernel_size": Field("int", positive=True),
              "stride": Field("int", 1, positive=True), "padding": Field("int", 0, nonneg=True),
              "dilation": Field("int", 1, positive=True), "bias": Field("bool", True),
              "prior": Field("any", None, allow_none=True), "bias_prior": Field("any", None, allow_none=True)}
    param_axes = {"weight": {"unit": 0, "channel": 0, "input": 1}, "bias": {"unit": 0, "channel": 0}}

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, bias: bool = True,
                 prior=None, bias_prior=None, dilation=1):
        kind = type(self).__name__
        for name, v in (("in_channels", in_channels), ("out_channels", out_channels)):
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise ValueError(f"{kind} {name} must be a positive integer, got {v!r}")
        n = self.dims
        kernel = _check_ints(kind, "kernel_size", kernel_size, n, 1)
        stride_t = _check_ints(kind, "stride", stride, n, 1)
        padding_t = _check_ints(kind, "padding", padding, n, 0)
        dilation_t = _check_ints(kind, "dilation", dilation, n, 1)
        if not isinstance(bias, bool):
            raise ValueError(f"{kind} bias must be true or false, got {bias!r}")
        super().__init__(self.torch_cls(in_channels, out_channels, kernel, stride_t, padding_t, dilation_t,
                                        bias=bias), prior, bias_prior)
        self.in_channels, self.out_channels = in_channels, out_channels
        # ints where the spec gave ints (compact specs and reports keep that form)
        self.kernel_size, self.stride = _plain(kernel), _plain(stride_t)
        self.padding, self.dilation = _plain(padding_t), _plain(dilation_t)
        self._geometry = (kernel, stride_t, padding_t, dilation_t)

    @property
    def zero_padding(self) -> bool:
        """No padding: a spatially uniform input gives a spatially uniform output (compaction)."""
        return not any(self._geometry[2])

    def out_shape(self, in_shape):
        n = self.dims
        if len(in_shape) != n + 1 or in_shape[0] != self.in_channels:
            where = ", ".join(SPATIAL_AXES.get(n, [f"size {i + 1}" for i in range(n)]))
            raise ValueError(f"expects input of shape ({self.in_channels}, {where}), got {tuple(in_shape)}")
        kernel, stride, padding, dilation = self._geometry
        out = [(size + 2 * p - d * (k - 1) - 1) // s + 1
               for size, k, s, p, d in zip(in_shape[1:], kernel, stride, padding, dilation)]
        if any(o <= 0 for o in out):
            raise ValueError(f"kernel {self.kernel_size} does not fit input of size {'x'.join(map(str, in_shape[1:]))}")
        return (self.out_channels, *out)

    def _conv_options(self):
        _, stride, padding, dilation = self._geometry
        return {"stride": stride, "padding": padding, "dilation": dilation}

    @classmethod
    def from_config(cls, cfg, in_shape):
        cfg = dict(cfg)
        axes = SPATIAL_AXES[cls.dims]
        size = auto_size(cfg.pop("in"), in_shape, ("channels", *axes), 0, cls.spec_name,
                         f"set input_shape: [C, {', '.join(a[0].upper() for a in axes)}] in the spec")
        return cls(size, cfg.pop("out"), **cfg)

    def compute(self, x, weight, bias):
        return gaussian_conv(x, weight, bias, **self._conv_options())

    feature_axis = unit_axis = 0  # channels
    conv = True

    def compact_spec(self, features, units, bias):
        entry = {"type": self.spec_name, "in": int(features), "out": int(units), "bias": bool(bias),
                 "kernel_size": self.kernel_size, "stride": self.stride, "padding": self.padding}
        if self.dilation != 1:
            entry["dilation"] = self.dilation
        return entry

    @classmethod
    def build_compact(cls, entry):
        def t(v):
            return tuple(v) if isinstance(v, list) else v

        kind = cls.sparse_cls if entry.get("storage") == "csr" and cls.sparse_cls else cls.torch_cls  # .storage
        return kind(entry["in"], entry["out"], t(entry["kernel_size"]), t(entry["stride"]),
                    t(entry["padding"]), t(entry.get("dilation", 1)), bias=entry["bias"])

    def deterministic(self, params):
        w = params["weight"]
        m = self.torch_cls(w.shape[1], w.shape[0], tuple(w.shape[2:]), bias="bias" in params, device=w.device,
                           dtype=w.dtype, **self._conv_options())
        with torch.no_grad():
            m.weight.copy_(w)
            if "bias" in params:
                m.bias.copy_(params["bias"])
        return m

    @classmethod
    def from_torch(cls, module, priors):
        name = type(module).__name__
        if module.groups != 1:
            raise ValueError(f"{name} with groups={module.groups} has no Bayesian counterpart (groups=1 only); "
                             "leave it deterministic")
        if isinstance(module.padding, str) or module.padding_mode != "zeros":
            raise ValueError(f"{name} with padding={module.padding!r}, padding_mode={module.padding_mode!r} has no "
                             "Bayesian counterpart (numeric zero padding only); leave it deterministic")
        layer = cls(module.in_channels, module.out_channels, tuple(module.kernel_size), tuple(module.stride),
                    tuple(module.padding), module.bias is not None, priors.get("weight"), priors.get("bias"),
                    tuple(module.dilation))
        return cls._converted(module, priors, layer)


class Conv2d(ConvNd):
    """Bayesian 2-D convolution; weight (out_channels, in_channels, kh, kw)."""

    spec_name = "conv2d"

    dims = 2
    torch_cls = nn.Conv2d
    sparse_cls = SparseConv2d
    torch_types = (nn.Conv2d,)

    @classmethod
    def from_config(cls, cfg, in_shape):
        cfg = dict(cfg)
        return cls(image_channels(cfg.pop("in"), in_shape, "conv2d"), cfg.pop("out"), **cfg)


class Conv1d(ConvNd):
    """Bayesian 1-D convolution over ``(channels, length)`` inputs; weight (out_channels,
    in_channels, k). Under local reparameterisation the pre-activations are drawn with
    :func:`~pyro_sparse.local_reparam.gaussian_conv` (Kingma, Salimans & Welling 2015)."""

    spec_name = "conv1d"

    dims = 1
    torch_cls = nn.Conv1d
    sparse_cls = SparseConv1d
    torch_types = (nn.Conv1d,)
