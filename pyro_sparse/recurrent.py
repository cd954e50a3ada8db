r"""Bayesian recurrent layers (LSTM, GRU) with weight, neuron and gate groups; token inputs.

Lobacheva, Chirkova, Vetrov (2017), "Bayesian Sparsification of Recurrent Neural Networks",
and (2018), "Bayesian Sparsification of Gated Recurrent Neural Networks". The weights of a
recurrent layer take any prior of the library (:mod:`pyro_sparse.priors`; Sparse VD's
log-uniform in the papers) and are **sampled once per mini-batch and shared by all time
steps**: every weight tensor is one ``pyro.sample`` site per forward pass, and there is no
local reparameterisation inside the recurrence (it would give every time step its own
weights). Group variables, each switchable:

* ``z_input`` :math:`z^x` (one per input neuron; for a language model on one-hot tokens this is
  the vocabulary variable),
* ``z_hidden`` :math:`z^h` (one per hidden neuron, applied to :math:`h_t` as it is produced, so
  both the recurrence and the next layer see :math:`\hat h_t = h_t z^h`),
* ``z_gates`` :math:`\hat z` (one per gate per hidden unit, on the pre-activation *before* the
  bias: "information flow").

The gated LSTM of Lobacheva et al. (2018), with gate order (i, f, g, o) as in ``torch.nn.LSTM``:

.. math::

    \hat x = x z^x,\qquad \hat h_{t-1} = h_{t-1} z^h,\\
    i = \sigma\big((W^i_x \hat x_t + W^i_h \hat h_{t-1})\,\hat z^i + b^i\big),\quad
    f, o \text{ alike},\quad
    g = \tanh\big((W^g_x \hat x_t + W^g_h \hat h_{t-1})\,\hat z^g + b^g\big),\\
    c_t = f c_{t-1} + i g,\qquad h_t = o \tanh(c_t).

Because every group variable is a diagonal scaling, the whole step is an ordinary LSTM step
with *folded* weights :math:`\mathrm{diag}(\hat z) W_x \mathrm{diag}(z^x)` and
:math:`\mathrm{diag}(\hat z) W_h \mathrm{diag}(z^h)` and the output scaled by :math:`z^h`; the
layer runs PyTorch's fused recurrence on them (one matmul of the inputs for all time steps,
one ``h @ W_h`` per step). A removed :math:`\hat z` (= 0) leaves the gate at the constant
:math:`\sigma(b)` or :math:`\tanh(b)`.

The GRU uses ``torch.nn.GRU``'s gates (r, z, n) with one bias per gate (``bias_hh = 0``):
:math:`r = \sigma((W^r_x\hat x + W^r_h\hat h)\hat z^r + b^r)`, :math:`u` (update) alike,
:math:`n = \tanh((W^n_x\hat x + r\,W^n_h\hat h)\hat z^n + b^n)`,
:math:`h_t = (1-u) n + u h_{t-1}`, output :math:`\hat h_t = h_t z^h`.

Sites (DESIGN.md): ``lstm.weight_ih`` (4H, F), ``lstm.weight_hh`` (4H, H), ``lstm.bias`` (4H),
``lstm.z_input`` (F), ``lstm.z_hidden`` (H), ``lstm.z_gates`` (4H); the k-th stacked layer
(k >= 1) of a ``num_layers > 1`` layer appends ``_l{k}`` (``lstm.weight_ih_l1``). Group
variables are real-valued sites initialised at 1 with the log-uniform prior by default
(``z_prior``), so the mean-field guide gives them Gaussian posteriors; any prior of the
library (e.g. a horseshoe) is a spec change: ``z_prior: {type: ...}``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pyro.poutine.messenger import Messenger
from torch import nn
from torch.func import functional_call

from .layers import Layer, _Stateless, register_layer
from .local_reparam import GaussianWeight
from .priors import Gaussian, LogUniform, build_prior
from .schema import Field

__all__ = [
    "LSTM",
    "GRU",
    "Embedding",
    "OneHot",
    "LastStep",
    "RecurrentStack",
    "shared_weights",
    "fold_gated_weights",
    "recurrent_sequence",
    "CELLS",
]

#: gate names and which of them use tanh (the rest use the logistic sigmoid), per cell type,
#: in the row order of ``torch.nn.LSTM`` / ``torch.nn.GRU`` weights.
CELLS = {
    "lstm": {"gates": ("i", "f", "g", "o"), "tanh": ("g",), "torch": nn.LSTM},
    "gru": {"gates": ("r", "z", "n"), "tanh": ("n",), "torch": nn.GRU},
}


# ---------------------------------------------------------------------------- weight sharing
class shared_weights(Messenger):
    """Mark every latent site sampled inside as *not* locally reparameterisable.

    The mean-field guide reads ``infer["ps_local_reparam_ok"]`` when it sets up a site; with it
    False, the guide samples a real weight tensor even under
    :class:`~pyro_sparse.local_reparam.LocalReparameterization`, so a recurrent layer gets one
    weight sample per mini-batch, shared across time steps (Lobacheva et al. 2017, sec. 3).
    """

    def _pyro_sample(self, msg):
        if not msg["is_observed"]:
            msg["infer"]["ps_local_reparam_ok"] = False


def _realize(param):
    """A weight tensor from a prior's return value.

    A :class:`GaussianWeight` (a guide set up without :class:`shared_weights`) is turned into
    one draw ``loc + sqrt(var) * eps`` for the whole mini-batch, never one per time step.
    """
    if isinstance(param, GaussianWeight):
        return param.loc + param.var.clamp_min(0).sqrt() * torch.randn_like(param.loc)
    return param


# ---------------------------------------------------------------------------- the maths
def fold_gated_weights(weight_ih, weight_hh, z_input=None, z_hidden=None, z_gates=None):
    r"""Fold the group variables into the weights of one gated recurrent layer.

    Returns :math:`(\mathrm{diag}(\hat z) W_x \mathrm{diag}(z^x),\ \mathrm{diag}(\hat z) W_h
    \mathrm{diag}(z^h))`: the pre-activation :math:`(W_x \hat x + W_h \hat h)\hat z` of
    Lobacheva et al. (2018) equals :math:`W'_x x + W'_h h` with these. ``None`` means no group
    variable (all ones).
    """
    if z_input is not None:
        weight_ih = weight_ih * z_input
    if z_hidden is not None:
        weight_hh = weight_hh * z_hidden
    if z_gates is not None:
        weight_ih = weight_ih * z_gates.unsqueeze(-1)
        weight_hh = weight_hh * z_gates.unsqueeze(-1)
    return weight_ih, weight_hh


_TEMPLATES: dict = {}


def _template(cell, input_size, hidden_size, device):
    """A cached ``torch.nn.LSTM``/``GRU`` whose parameters :func:`functional_call` replaces."""
    key = (cell, input_size, hidden_size, str(device))
    if key not in _TEMPLATES:
        _TEMPLATES[key] = CELLS[cell]["torch"](input_size, hidden_size, batch_first=True, device=device)
    return _TEMPLATES[key]


def recurrent_sequence(cell, x, weight_ih, weight_hh, bias, z_input=None, z_hidden=None, z_gates=None):
    r"""Run one gated LSTM/GRU layer over a batch-first sequence; return :math:`\hat h_{1..T}`.

    ``x`` is (B, T, F); weights are (G H, F) and (G H, H), ``bias`` (G H,) with G = 4 (LSTM) or
    3 (GRU); group variables (F,), (H,), (G H,) or ``None``. The recurrence is PyTorch's fused
    one (inputs multiplied by the weights for all steps at once, then one ``h @ W_h^T`` per
    step) on the folded weights of :func:`fold_gated_weights`, with ``bias_ih = bias`` and
    ``bias_hh = 0``; the output is scaled by :math:`z^h`. The initial state is zero.
    """
    w_ih, w_hh = fold_gated_weights(weight_ih, weight_hh, z_input, z_hidden, z_gates)
    hidden = weight_hh.shape[-1]
    module = _template(cell, weight_ih.shape[-1], hidden, x.device)
    params = {"weight_ih_l0": w_ih, "weight_hh_l0": w_hh, "bias_ih_l0": bias,
              "bias_hh_l0": torch.zeros_like(bias)}
    out, _ = functional_call(module, params, (x,))
    return out * z_hidden if z_hidden is not None else out


# ---------------------------------------------------------------------------- layers
class _Recurrent(Layer):
    """Shared machinery of the Bayesian LSTM and GRU layers."""

    cell = "lstm"
    fields = {
        "in": Field("size", "auto", doc="input features per time step"),
        "hidden_size": Field("int", positive=True),
        "num_layers": Field("int", 1, positive=True),
        "return_sequence": Field("bool", False, doc="whole sequence (B, T, H) or last state (B, H)"),
        "prior": Field("any", None, allow_none=True, doc="prior of the input and recurrent weights"),
        "bias_prior": Field("any", None, allow_none=True),
        "z_input": Field("bool", False, doc="group variable per input neuron"),
        "z_hidden": Field("bool", False, doc="group variable per hidden neuron"),
        "z_gates": Field("bool", False, doc="group variable per gate per hidden unit"),
        "z_prior": Field("any", None, allow_none=True, doc="prior of the group variables (log_uniform)"),
    }

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1, return_sequence: bool = False,
                 prior=None, bias_prior=None, z_input: bool = False, z_hidden: bool = False,
                 z_gates: bool = False, z_prior=None):
        name = type(self).__name__
        for arg, v in (("input_size", input_size), ("hidden_size", hidden_size), ("num_layers", num_layers)):
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise ValueError(f"{name} {arg} must be a positive integer, got {v!r}")
        super().__init__()
        self.input_size, self.hidden_size, self.num_layers = input_size, hidden_size, num_layers
        self.return_sequence = bool(return_sequence)
        self.use_z = {"z_input": bool(z_input), "z_hidden": bool(z_hidden), "z_gates": bool(z_gates)}
        self.weight_prior = build_prior(prior if prior is not None else Gaussian())
        self.bias_prior = build_prior(bias_prior if bias_prior is not None else Gaussian())
        self.z_prior = build_prior(z_prior if z_prior is not None else LogUniform())
        self.num_gates = len(CELLS[self.cell]["gates"])
        # torch's default initialisation, so training starts like a deterministic network
        # (the one bias per gate is torch's bias_ih + bias_hh).
        reference = CELLS[self.cell]["torch"](input_size, hidden_size, num_layers, batch_first=True)
        gh = self.num_gates * hidden_size
        self.param_axes = {}
        self._priors = {}
        for k in range(num_layers):
            s = self.suffix(k)
            w_ih = getattr(reference, f"weight_ih_l{k}").detach().clone()
            w_hh = getattr(reference, f"weight_hh_l{k}").detach().clone()
            b = (getattr(reference, f"bias_ih_l{k}") + getattr(reference, f"bias_hh_l{k}")).detach().clone()
            inits = {f"weight_ih{s}": w_ih, f"weight_hh{s}": w_hh, f"bias{s}": b}
            self.param_axes.update({
                f"weight_ih{s}": {"unit": 0, "gate": 0, "input": 1},
                f"weight_hh{s}": {"unit": 0, "gate": 0, "input": 1, "hidden": 1},
                f"bias{s}": {"unit": 0, "gate": 0}})
            self._priors.update({f"weight_ih{s}": self.weight_prior, f"weight_hh{s}": self.weight_prior,
                                 f"bias{s}": self.bias_prior})
            groups = {"z_input": (w_ih.shape[1], {"input": 0}) if k == 0 else None,
                      "z_hidden": (hidden_size, {"hidden": 0, "unit": 0}),
                      "z_gates": (gh, {"gate": 0, "unit": 0})}
            for group, spec in groups.items():
                if self.use_z[group] and spec is not None:
                    inits[f"{group}{s}"] = torch.ones(spec[0])
                    self.param_axes[f"{group}{s}"] = spec[1]
                    self._priors[f"{group}{s}"] = self.z_prior
            for pname, value in inits.items():
                self.register_buffer(f"{pname}_init", value, persistent=False)

    @staticmethod
    def suffix(k: int) -> str:
        """Site-name suffix of the k-th stacked layer: '' for the first, '_l1', '_l2', ..."""
        return "" if k == 0 else f"_l{k}"

    @classmethod
    def from_config(cls, cfg, in_shape):
        cfg = dict(cfg)
        size = cfg.pop("in")
        if size == "auto":
            if len(in_shape) != 2:
                raise ValueError(f"expects (time, features) inputs, got shape {list(in_shape)}; "
                                 "set input_shape: [T, F] in the spec")
            size = in_shape[-1]
        return cls(size, **cfg)

    def out_shape(self, in_shape):
        if len(in_shape) != 2 or in_shape[-1] != self.input_size:
            raise ValueError(f"expects (time, {self.input_size}) inputs, got shape {tuple(in_shape)}")
        return (in_shape[0], self.hidden_size) if self.return_sequence else (self.hidden_size,)

    def priors(self):
        return dict(self._priors)

    def sample_params(self) -> dict:
        """One sample of every weight and group variable (one site each), shared by all steps."""
        out = {}
        with shared_weights():
            for pname, prior in self._priors.items():
                init = getattr(self, f"{pname}_init")
                out[pname] = _realize(prior.sample(f"{self.site}.{pname}", init, self.param_axes[pname]))
        return out

    def run(self, x, params: dict):
        """The layer's output for fixed parameter values ``params`` (name -> tensor)."""
        if x.dim() != 3:
            raise ValueError(f"{type(self).__name__} expects batch-first (batch, time, features) input, "
                             f"got shape {tuple(x.shape)}")
        for k in range(self.num_layers):
            s = self.suffix(k)
            x = recurrent_sequence(self.cell, x, params[f"weight_ih{s}"], params[f"weight_hh{s}"],
                                   params[f"bias{s}"], params.get(f"z_input{s}"), params.get(f"z_hidden{s}"),
                                   params.get(f"z_gates{s}"))
        return x if self.return_sequence else x[:, -1]

    def forward(self, x):
        return self.run(x, self.sample_params())

    def deterministic(self, params):
        return RecurrentStack(self.cell, [self.layer_params(params, k) for k in range(self.num_layers)],
                              self.return_sequence)

    def layer_params(self, params: dict, k: int) -> dict:
        """Parameters of stacked layer ``k`` under their base names (weight_ih, ..., z_gates)."""
        s = self.suffix(k)
        out = {}
        for base in ("weight_ih", "weight_hh", "bias", "z_input", "z_hidden", "z_gates"):
            if f"{base}{s}" in params:
                out[base] = params[f"{base}{s}"]
        return out


@register_layer("lstm")
class LSTM(_Recurrent):
    """Bayesian LSTM (batch-first) with optional z_input / z_hidden / z_gates groups."""

    prefix = "lstm"
    cell = "lstm"


@register_layer("gru")
class GRU(_Recurrent):
    """Bayesian GRU (batch-first) with optional z_input / z_hidden / z_gates groups (r, z, n)."""

    prefix = "gru"
    cell = "gru"


class RecurrentStack(nn.Module):
    """Plain deterministic LSTM/GRU layers with the group variables folded in.

    Each element of ``layers`` is a dict with ``weight_ih, weight_hh, bias`` and optionally
    ``z_input, z_hidden, z_gates``. Each layer is a ``torch.nn.LSTM``/``GRU`` holding the folded
    weights (``bias_hh = 0``) followed by the output scale :math:`z^h`; outputs equal the
    Bayesian layer's with the same parameter values.
    """

    def __init__(self, cell: str, layers: list[dict], return_sequence: bool = False):
        super().__init__()
        self.cell, self.return_sequence = cell, return_sequence
        self.rnns = nn.ModuleList()
        for k, p in enumerate(layers):
            w_ih, w_hh = fold_gated_weights(p["weight_ih"], p["weight_hh"], p.get("z_input"), p.get("z_hidden"),
                                            p.get("z_gates"))
            rnn = CELLS[cell]["torch"](w_ih.shape[1], w_hh.shape[1], batch_first=True, device=w_ih.device,
                                       dtype=w_ih.dtype)
            with torch.no_grad():
                rnn.weight_ih_l0.copy_(w_ih)
                rnn.weight_hh_l0.copy_(w_hh)
                rnn.bias_ih_l0.copy_(p["bias"])
                rnn.bias_hh_l0.zero_()
            self.rnns.append(rnn)
            z_h = p.get("z_hidden")
            self.register_buffer(f"output_scale_{k}",
                                 z_h.detach().clone() if z_h is not None else torch.ones_like(p["bias"][:w_hh.shape[1]]))

    def forward(self, x):
        for k, rnn in enumerate(self.rnns):
            x = rnn(x)[0] * getattr(self, f"output_scale_{k}")
        return x if self.return_sequence else x[:, -1]


@register_layer("embedding")
class Embedding(Layer):
    """Bayesian token embedding ``e_t = z_{x_t} W[x_t]`` with an optional per-token group variable.

    Inputs are token ids (any dtype; cast to long), shape (B, T); output (B, T, dim). The
    weight (num_tokens, dim) is sampled once per mini-batch (site ``emb.weight``); with
    ``z_tokens`` a log-uniform group variable per token (``emb.z_tokens``) multiplies its row, so
    a removed token maps to the zero vector (Lobacheva et al. 2018, the vocabulary variable).
    ``num_tokens: auto`` takes the data's number of classes (a language model's vocabulary).
    """

    prefix = "emb"
    fields = {
        "num_tokens": Field("size", "auto"),
        "dim": Field("int", positive=True),
        "prior": Field("any", None, allow_none=True),
        "z_tokens": Field("bool", False),
        "z_prior": Field("any", None, allow_none=True),
    }
    param_axes = {"weight": {"input": 0, "unit": 1}, "z_tokens": {"input": 0}}

    def __init__(self, num_tokens: int, dim: int, prior=None, z_tokens: bool = False, z_prior=None):
        for arg, v in (("num_tokens", num_tokens), ("dim", dim)):
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise ValueError(f"Embedding {arg} must be a positive integer, got {v!r}")
        super().__init__()
        self.num_tokens, self.dim, self.z_tokens = num_tokens, dim, bool(z_tokens)
        self.weight_prior = build_prior(prior if prior is not None else Gaussian())
        self.z_prior = build_prior(z_prior if z_prior is not None else LogUniform())
        self.register_buffer("weight_init", nn.Embedding(num_tokens, dim).weight.detach().clone(), persistent=False)
        if self.z_tokens:
            self.register_buffer("z_tokens_init", torch.ones(num_tokens), persistent=False)

    @classmethod
    def from_config(cls, cfg, in_shape):
        cfg = dict(cfg)
        cfg.pop("bias_prior", None)  # an embedding has no bias
        return cls(**cfg)

    @classmethod
    def resolve_auto(cls, cfg, num_outputs):
        """``num_tokens: auto`` -> the data's number of classes (the vocabulary)."""
        return {**cfg, "num_tokens": num_outputs} if cfg.get("num_tokens") == "auto" else cfg

    def out_shape(self, in_shape):
        return (*in_shape, self.dim)

    def priors(self):
        out = {"weight": self.weight_prior}
        if self.z_tokens:
            out["z_tokens"] = self.z_prior
        return out

    def forward(self, x):
        with shared_weights():
            params = {p: _realize(prior.sample(f"{self.site}.{p}", getattr(self, f"{p}_init"), self.param_axes[p]))
                      for p, prior in self.priors().items()}
        return embed(x, params["weight"], params.get("z_tokens"))

    def deterministic(self, params):
        weight = embed_table(params["weight"], params.get("z_tokens"))
        return _TokenModule(nn.Embedding.from_pretrained(weight.detach().clone(), freeze=True))


def embed_table(weight, z_tokens=None):
    """The effective embedding table ``diag(z) W``."""
    return weight * z_tokens.unsqueeze(-1) if z_tokens is not None else weight


def embed(x, weight, z_tokens=None):
    return F.embedding(x.long(), embed_table(weight, z_tokens))


class _TokenModule(nn.Module):
    def __init__(self, module):
        super().__init__()
        self.module = module

    def forward(self, x):
        return self.module(x.long())


class _OneHotModule(nn.Module):
    def __init__(self, num_tokens):
        super().__init__()
        self.num_tokens = num_tokens

    def forward(self, x):
        return F.one_hot(x.long(), self.num_tokens).to(torch.get_default_dtype())


@register_layer("onehot")
class OneHot(_Stateless):
    """Token ids (B, T) -> one-hot vectors (B, T, num_tokens); ``num_tokens: auto`` is the data's
    number of classes. Followed by an LSTM with ``z_input`` this is the vocabulary-sparsified
    character model of Lobacheva et al."""

    prefix = "onehot"
    fields = {"num_tokens": Field("size", "auto")}

    def __init__(self, num_tokens):
        if isinstance(num_tokens, bool) or not isinstance(num_tokens, int) or num_tokens <= 0:
            raise ValueError(f"OneHot num_tokens must be a positive integer, got {num_tokens!r}")
        super().__init__(num_tokens=num_tokens)

    @classmethod
    def resolve_auto(cls, cfg, num_outputs):
        return {**cfg, "num_tokens": num_outputs} if cfg.get("num_tokens") == "auto" else cfg

    def _module(self):
        return _OneHotModule(self.options["num_tokens"])

    def out_shape(self, in_shape):
        return (*in_shape, self.options["num_tokens"])


class _LastStepModule(nn.Module):
    def forward(self, x):
        return x[:, -1]


@register_layer("last_step")
class LastStep(_Stateless):
    """Keep the last time step of a batch-first sequence: (B, T, ...) -> (B, ...)."""

    prefix = "last"

    def _module(self):
        return _LastStepModule()

    def out_shape(self, in_shape):
        if len(in_shape) < 1:
            raise ValueError("last_step needs a (time, ...) input")
        return tuple(in_shape[1:])
