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

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from .compaction_protocol import Compaction, as_index, drop_entries
from .layers import Layer, _Stateless, auto_size, read_parameter, scoped_params
from .local_reparam import realize, shared_weights
from .priors import Gaussian, LogUniform, build_prior
from .schema import Field
from .storage import CompactSequential

__all__ = [
    "LSTM",
    "GRU",
    "TorchLSTM",
    "TorchGRU",
    "CompactTorchRecurrent",
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


def _hidden_bias(cell, bias, bias_hn):
    """``bias_hh`` of the torch module: 0, except a GRU's hidden bias of the candidate gate n."""
    if bias_hn is None:
        return torch.zeros_like(bias)
    if cell != "gru":
        raise ValueError("a hidden bias (bias_hn) exists for the GRU only")
    return torch.cat([torch.zeros_like(bias[: 2 * bias_hn.shape[0]]), bias_hn])


def recurrent_sequence(cell, x, weight_ih, weight_hh, bias, z_input=None, z_hidden=None, z_gates=None,
                       bias_hn=None):
    r"""Run one gated LSTM/GRU layer over a batch-first sequence; return :math:`\hat h_{1..T}`.

    ``x`` is (B, T, F); weights are (G H, F) and (G H, H), ``bias`` (G H,) with G = 4 (LSTM) or
    3 (GRU); group variables (F,), (H,), (G H,) or ``None``. The recurrence is PyTorch's fused
    one (inputs multiplied by the weights for all steps at once, then one ``h @ W_h^T`` per
    step) on the folded weights of :func:`fold_gated_weights`, with ``bias_ih = bias`` and
    ``bias_hh = 0``; the output is scaled by :math:`z^h`. The initial state is zero.
    ``bias_hn`` (H,): a GRU's hidden bias of the candidate gate,
    :math:`n = \tanh(W^n_x x + b^n + r (W^n_h h + b^n_h))` (``torch.nn.GRU``'s ``b_hn``).
    """
    return recurrent_states(cell, x, weight_ih, weight_hh, bias, z_input, z_hidden, z_gates, bias_hn)[0]


def recurrent_states(cell, x, weight_ih, weight_hh, bias, z_input=None, z_hidden=None, z_gates=None,
                     bias_hn=None, state=None):
    """:func:`recurrent_sequence` and the final state: ``(outputs, state)``, the state ``(h, c)``
    (LSTM) or ``h`` (GRU), each ``(1, B, H)`` as ``torch.nn.LSTM`` returns it; ``state``: the
    initial state in that form (None: zeros)."""
    w_ih, w_hh = fold_gated_weights(weight_ih, weight_hh, z_input, z_hidden, z_gates)
    hidden = weight_hh.shape[-1]
    module = _template(cell, weight_ih.shape[-1], hidden, x.device)
    params = {"weight_ih_l0": w_ih, "weight_hh_l0": w_hh, "bias_ih_l0": bias,
              "bias_hh_l0": _hidden_bias(cell, bias, bias_hn)}
    out, final = functional_call(module, params, (x,) if state is None else (x, state))
    return (out * z_hidden if z_hidden is not None else out), final


# ---------------------------------------------------------------------------- layers
class _Recurrent(Layer):
    """Shared machinery of the Bayesian LSTM and GRU layers."""

    curvature = None  # the Laplace curvature does not cover recurrent layers

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
        size = auto_size(cfg.pop("in"), in_shape, ("time", "features"), 1, cls.spec_name,
                         "set input_shape: [T, F] in the spec")
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
                out[pname] = realize(prior.sample(f"{self.site}.{pname}", init, self.param_axes[pname]))
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
                                   params.get(f"z_gates{s}"), params.get(f"bias_hn{s}"))
        return x if self.return_sequence else x[:, -1]

    def forward(self, x):
        return self.run(x, scoped_params(self, self.sample_params))

    def deterministic(self, params):
        return RecurrentStack(self.cell, [self.layer_params(params, k) for k in range(self.num_layers)],
                              self.return_sequence)

    def compaction(self, name, values, masks, in_shape, out_shape):
        return RecurrentCompaction(name, self, values, masks, in_shape, out_shape)

    @classmethod
    def build_compact(cls, entry):
        last = len(entry["layers"]) - 1
        return CompactSequential(*(CompactRecurrent.empty(entry["cell"], sizes, entry["return_sequence"] or k < last)
                                   for k, sizes in enumerate(entry["layers"])))

    def layer_params(self, params: dict, k: int) -> dict:
        """Parameters of stacked layer ``k`` under their base names (weight_ih, ..., z_gates)."""
        s = self.suffix(k)
        out = {}
        for base in ("weight_ih", "weight_hh", "bias", "bias_hn", "z_input", "z_hidden", "z_gates"):
            if f"{base}{s}" in params:
                out[base] = params[f"{base}{s}"]
        return out


class LSTM(_Recurrent):
    """Bayesian LSTM (batch-first) with optional z_input / z_hidden / z_gates groups."""

    spec_name = "lstm"

    prefix = "lstm"
    cell = "lstm"


class GRU(_Recurrent):
    """Bayesian GRU (batch-first) with optional z_input / z_hidden / z_gates groups (r, z, n)."""

    spec_name = "gru"

    prefix = "gru"
    cell = "gru"


class _TorchRecurrent:
    """The interface of ``torch.nn.LSTM`` / ``torch.nn.GRU`` on the Bayesian recurrent layers: the
    counterpart that :func:`pyro_sparse.convert.bayesian` puts in place of a user's module, so the
    user's ``forward`` can call it as before: ``output, (h_n, c_n) = self.lstm(x, hx)`` (LSTM) or
    ``output, h_n = self.gru(x, hx)``, batch-first or time-first, batched or not, with inter-layer
    dropout in training mode.

    Maths and sites are those of the Bayesian layer (weights sampled once per mini-batch and
    shared by all time steps; ``lstm.weight_ih``, ``lstm.weight_hh``, ``lstm.bias`` and ``_l{k}``
    for stacked layers). ``torch.nn``'s two biases per gate are one site ``bias`` = ``b_ih + b_hh``,
    which is exact for every LSTM gate and for the GRU's r and z gates; the GRU's candidate gate
    :math:`n = \tanh(W_{in} x + b_{in} + r (W_{hn} h + b_{hn}))` keeps ``b_hn`` as a site of its
    own, ``gru.bias_hn`` (H,). Bidirectional layers, ``proj_size`` and ``bias=False`` have no
    counterpart (ValueError)."""

    batch_first = True
    dropout = 0.0

    @classmethod
    def from_torch(cls, module, priors):
        name = type(module).__name__
        for what, bad in (("bidirectional=True", module.bidirectional), ("bias=False", not module.bias),
                          ("proj_size > 0", getattr(module, "proj_size", 0))):
            if bad:
                raise ValueError(f"{name} with {what} has no Bayesian counterpart; leave it deterministic")
        layer = cls(module.input_size, module.hidden_size, module.num_layers, return_sequence=True,
                    prior=priors.get("weight"), bias_prior=priors.get("bias"))
        layer.batch_first, layer.dropout = bool(module.batch_first), float(module.dropout)
        return layer.start_at(layer.torch_values(module))

    def torch_values(self, module):
        out = {}
        for k in range(self.num_layers):
            s = self.suffix(k)
            b_ih, b_hh = getattr(module, f"bias_ih_l{k}").detach(), getattr(module, f"bias_hh_l{k}").detach()
            out[f"weight_ih{s}"] = getattr(module, f"weight_ih_l{k}").detach()
            out[f"weight_hh{s}"] = getattr(module, f"weight_hh_l{k}").detach()
            if self.cell == "gru":
                h = self.hidden_size
                out[f"bias{s}"] = torch.cat([b_ih[: 2 * h] + b_hh[: 2 * h], b_ih[2 * h:]])
                out[f"bias_hn{s}"] = b_hh[2 * h:]
            else:
                out[f"bias{s}"] = b_ih + b_hh
        return out

    @torch.no_grad()
    def write_torch(self, module, params):
        for k in range(self.num_layers):
            p = self.layer_params(params, k)
            getattr(module, f"weight_ih_l{k}").copy_(p["weight_ih"])
            getattr(module, f"weight_hh_l{k}").copy_(p["weight_hh"])
            getattr(module, f"bias_ih_l{k}").copy_(p["bias"])
            getattr(module, f"bias_hh_l{k}").copy_(_hidden_bias(self.cell, p["bias"], p.get("bias_hn")))

    def compact_module(self, values: dict, masks: dict, in_shape, out_shape):
        """``(entry, module, info)``: the :class:`CompactTorchRecurrent` of this layer at point
        ``values`` with keep ``masks`` (parameter name -> tensor), by the recurrent compaction of
        :class:`RecurrentCompaction` with every output neuron of the last layer read."""
        plan = RecurrentCompaction(self.site, self, values, masks, in_shape, out_shape)
        entry, _, info = plan.build()
        entry.update({"type": self.spec_name, "hidden_size": self.hidden_size, "batch_first": self.batch_first})
        module = CompactTorchRecurrent(self.cell, self.hidden_size, plan.modules, plan.kept_hidden, self.batch_first)
        return entry, module.eval(), info

    @classmethod
    def build_compact(cls, entry):
        return CompactTorchRecurrent.empty(entry)

    def deterministic(self, params):
        w = params["weight_ih"]
        module = CELLS[self.cell]["torch"](self.input_size, self.hidden_size, self.num_layers,
                                           batch_first=self.batch_first, dropout=self.dropout, device=w.device,
                                           dtype=w.dtype)
        self.write_torch(module, params)
        return module

    def forward(self, input, hx=None):
        params = scoped_params(self, self.sample_params)
        if input.dim() not in (2, 3):
            raise ValueError(f"{self.site}: expected a 2-D or 3-D input, got shape {tuple(input.shape)}")
        lstm = self.cell == "lstm"
        x, unbatched, h0, c0 = _torch_inputs(input, hx, lstm, self.batch_first)
        finals = []
        for k in range(self.num_layers):
            p = self.layer_params(params, k)
            state = None
            if hx is not None:
                state = (h0[k:k + 1], c0[k:k + 1]) if lstm else h0[k:k + 1]
            x, final = recurrent_states(self.cell, x, p["weight_ih"], p["weight_hh"], p["bias"],
                                        bias_hn=p.get("bias_hn"), state=state)
            finals.append(final)
            if self.dropout and self.training and k + 1 < self.num_layers:
                x = F.dropout(x, self.dropout, True)
        if lstm:
            h_n, c_n = torch.cat([f[0] for f in finals]), torch.cat([f[1] for f in finals])
        else:
            h_n, c_n = torch.cat(finals), None
        return _torch_outputs(x, h_n, c_n, lstm, self.batch_first, unbatched)


def _torch_inputs(x, hx, lstm, batch_first):
    """``(x as (B, T, F), unbatched, h0, c0)`` of the ``torch.nn.LSTM``/``GRU`` calling
    convention: an unbatched (T, F) input and its (layers, H) state get a batch axis, a
    time-first input is made batch-first; ``h0, c0`` None without ``hx`` (``c0`` None for a GRU)."""
    unbatched = x.dim() == 2
    if unbatched:
        x = x.unsqueeze(0 if batch_first else 1)
    if not batch_first:
        x = x.transpose(0, 1)
    h0 = c0 = None
    if hx is not None:
        h0, c0 = hx if lstm else (hx, None)
        if unbatched:
            h0, c0 = h0.unsqueeze(1), (c0.unsqueeze(1) if c0 is not None else None)
    return x, unbatched, h0, c0


def _torch_outputs(out, h_n, c_n, lstm, batch_first, unbatched):
    """The ``torch.nn.LSTM``/``GRU`` return value from a batch-first output and final states
    (the inverse of :func:`_torch_inputs`' reshaping)."""
    if not batch_first:
        out = out.transpose(0, 1)
    if unbatched:
        out = out.squeeze(0 if batch_first else 1)
        h_n, c_n = h_n.squeeze(1), (c_n.squeeze(1) if c_n is not None else None)
    return (out, (h_n, c_n)) if lstm else (out, h_n)


class CompactTorchRecurrent(nn.Module):
    """The compact form of a converted ``torch.nn.LSTM`` / ``GRU`` (:class:`_TorchRecurrent`), with
    the torch interface: one :class:`CompactRecurrent` per stacked layer (constant gates and input
    features nothing reads deleted; hidden neurons of inner layers that neither the next layer nor
    the recurrence reads deleted), ``kept_<k>`` the original indices of layer ``k``'s kept hidden
    neurons. The output sequence and the last layer's final state are exact; in ``h_n`` (and
    ``c_n``) of an inner layer a deleted neuron reads 0 (nothing in the network read it). Runs in
    inference mode (no inter-layer dropout)."""

    def __init__(self, cell, hidden_size, layers, kept, batch_first=True):
        super().__init__()
        self.cell, self.hidden_size, self.batch_first = cell, int(hidden_size), bool(batch_first)
        self.layers = nn.ModuleList(layers)
        for k, index in enumerate(kept):
            self.register_buffer(f"kept_{k}", torch.as_tensor(index, dtype=torch.long))

    @classmethod
    def empty(cls, entry: dict):
        """Of the sizes of a compact entry (``layers``: per stacked layer its sizes)."""
        layers = [CompactRecurrent.empty(entry["cell"], sizes, True) for sizes in entry["layers"]]
        return cls(entry["cell"], entry["hidden_size"], layers, [torch.zeros(s["hidden"], dtype=torch.long)
                                                                  for s in entry["layers"]], entry["batch_first"])

    def forward(self, input, hx=None):
        lstm = self.cell == "lstm"
        x, unbatched, h0, c0 = _torch_inputs(input, hx, lstm, self.batch_first)
        hs, cs = [], []
        B, H = x.shape[0], self.hidden_size
        for k, layer in enumerate(self.layers):
            kept = getattr(self, f"kept_{k}")
            h = None if hx is None else h0[k].index_select(-1, kept)
            c = None if hx is None or c0 is None else c0[k].index_select(-1, kept)
            x, h, c = layer.run(x, h, c)
            hs.append(x.new_zeros(B, H).index_copy(1, kept, h))
            if lstm:
                cs.append(x.new_zeros(B, H).index_copy(1, kept, c))
        kept = getattr(self, f"kept_{len(self.layers) - 1}")
        out = x.new_zeros(B, x.shape[1], H).index_copy(2, kept, x)
        return _torch_outputs(out, torch.stack(hs), torch.stack(cs) if lstm else None, lstm, self.batch_first,
                              unbatched)


class TorchLSTM(_TorchRecurrent, LSTM):
    """A converted ``torch.nn.LSTM``: :class:`LSTM` with the torch interface (:class:`_TorchRecurrent`)."""

    spec_name = "torch_lstm"
    torch_types = (nn.LSTM,)


class TorchGRU(_TorchRecurrent, GRU):
    """A converted ``torch.nn.GRU``: :class:`GRU` with the torch interface and the hidden bias
    ``bias_hn`` of the candidate gate (:class:`_TorchRecurrent`)."""

    spec_name = "torch_gru"
    torch_types = (nn.GRU,)

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        for k in range(self.num_layers):
            s = self.suffix(k)
            self.register_buffer(f"bias_hn{s}_init", torch.zeros(self.hidden_size), persistent=False)
            self.param_axes[f"bias_hn{s}"] = {"unit": 0, "hidden": 0}
            self._priors[f"bias_hn{s}"] = self.bias_prior


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
                rnn.bias_hh_l0.copy_(_hidden_bias(cell, p["bias"], p.get("bias_hn")))
            self.rnns.append(rnn)
            z_h = p.get("z_hidden")
            self.register_buffer(f"output_scale_{k}",
                                 z_h.detach().clone() if z_h is not None
                                 else torch.ones_like(p["bias"][:w_hh.shape[1]]))

    def forward(self, x):
        for k, rnn in enumerate(self.rnns):
            x = rnn(x)[0] * getattr(self, f"output_scale_{k}")
        return x if self.return_sequence else x[:, -1]


class Embedding(Layer):
    """Bayesian token embedding ``e_t = z_{x_t} W[x_t]`` with an optional per-token group variable.

    Inputs are token ids (any dtype; cast to long), shape (B, T); output (B, T, dim). The
    weight (num_tokens, dim) is sampled once per mini-batch (site ``emb.weight``); with
    ``z_tokens`` a log-uniform group variable per token (``emb.z_tokens``) multiplies its row, so
    a removed token maps to the zero vector (Lobacheva et al. 2018, the vocabulary variable).
    ``num_tokens: auto`` takes the data's number of classes (a language model's vocabulary).
    """

    spec_name = "embedding"
    curvature = None

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
        if self.tied:
            out = {k: v for k, v in out.items() if k not in self.tied}
        return out

    def sample_params(self) -> dict:
        """One draw of the table (and the token variables), shared by every position."""
        with shared_weights():
            params = {p: realize(prior.sample(f"{self.site}.{p}", getattr(self, f"{p}_init"), self.param_axes[p]))
                      for p, prior in self.priors().items()}
        if self.tied:
            params.update(self._tied_values())
        return params

    readable = ("weight",)

    def __getattr__(self, name):
        if name == "weight" and "_modules" in self.__dict__:  # a direct read in the user's forward
            return read_parameter(self, name)
        return super().__getattr__(name)

    def forward(self, x):
        params = scoped_params(self, self.sample_params)
        return embed(x, params["weight"], params.get("z_tokens"))

    torch_types = (nn.Embedding,)

    @classmethod
    def from_torch(cls, module, priors):
        if module.max_norm is not None:
            raise ValueError("nn.Embedding with max_norm renormalises its table in the forward pass and has no "
                             "Bayesian counterpart; leave it deterministic")
        if module.sparse:
            raise ValueError("nn.Embedding(sparse=True) has no Bayesian counterpart; leave it deterministic")
        layer = cls(module.num_embeddings, module.embedding_dim, prior=priors.get("weight"))
        return layer.start_at({"weight": module.weight.detach()})

    def torch_values(self, module):
        return {"weight": module.weight.detach()}

    @torch.no_grad()
    def write_torch(self, module, params):
        if "weight" in params:  # a table tied to another layer's weight is written by that layer
            module.weight.copy_(embed_table(params["weight"], params.get("z_tokens")))

    def deterministic(self, params):
        weight = embed_table(params["weight"], params.get("z_tokens"))
        return _TokenModule(nn.Embedding.from_pretrained(weight.detach().clone(), freeze=True))

    def compaction(self, name, values, masks, in_shape, out_shape):
        return EmbeddingCompaction(name, self, values, masks, in_shape, out_shape)

    @classmethod
    def build_compact(cls, entry):
        return _TokenModule(nn.Embedding(entry["num_tokens"], entry["dim"]))


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


class OneHot(_Stateless):
    """Token ids (B, T) -> one-hot vectors (B, T, num_tokens); ``num_tokens: auto`` is the data's
    number of classes. Followed by an LSTM with ``z_input`` this is the vocabulary-sparsified
    character model of Lobacheva et al."""

    spec_name = "onehot"

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


class LastStep(_Stateless):
    """Keep the last time step of a batch-first sequence: (B, T, ...) -> (B, ...)."""

    spec_name = "last_step"

    prefix = "last"

    def _module(self):
        return _LastStepModule()

    def out_shape(self, in_shape):
        if len(in_shape) < 1:
            raise ValueError("last_step needs a (time, ...) input")
        return tuple(in_shape[1:])

    def route_units(self, in_shape, axis):
        """Units on a feature axis keep it (one axis down); the time axis itself does not route."""
        return (axis - 1, 1) if axis >= 1 else None


# ---------------------------------------------------------------------------- compaction
@dataclass
class RecurrentMasks:
    """Keep-masks of one gated recurrent layer (True = keep), the fixed point of
    :func:`recurrent_masks`.

    ``gates`` (G H,) is True where a gate of a kept hidden unit is computed; a False entry of a
    kept unit is a constant gate, an entry of a removed unit is deleted with it. ``weight_ih``
    (G H, F) and ``weight_hh`` (G H, H) are the effective weight masks (zero outside live rows
    and kept columns).
    """

    cell: str
    input: torch.Tensor
    hidden: torch.Tensor
    gates: torch.Tensor
    weight_ih: torch.Tensor
    weight_hh: torch.Tensor

    @property
    def gate_names(self):
        return CELLS[self.cell]["gates"]

    def same(self, other) -> bool:
        return other is not None and all(torch.equal(getattr(self, k), getattr(other, k))
                                         for k in ("input", "hidden", "gates"))

    def report(self) -> dict:
        """Counts as in Lobacheva et al.'s tables: weights, hidden and input neurons, gates per type.

        ``gates[name] = {"kept": computed gates of kept units, "constant": kept units whose gate is
        constant}``.
        """
        G, H = len(self.gate_names), self.hidden.numel()
        gates = self.gates.view(G, H)
        kept_units = self.hidden.unsqueeze(0)
        return {
            "cell": self.cell,
            "weights": (int(self.weight_ih.sum() + self.weight_hh.sum()),
                        self.weight_ih.numel() + self.weight_hh.numel()),
            "hidden": (int(self.hidden.sum()), H),
            "inputs": (int(self.input.sum()), self.input.numel()),
            "gates": {name: {"kept": int((gates[k] & kept_units[0]).sum()),
                             "constant": int((~gates[k] & kept_units[0]).sum())}
                      for k, name in enumerate(self.gate_names)},
        }


def _check_bool(name, mask, shape):
    mask = torch.as_tensor(mask)
    if mask.dtype != torch.bool:
        raise ValueError(f"{name}: expected a boolean keep-mask, got dtype {mask.dtype}")
    if tuple(mask.shape) != tuple(shape):
        raise ValueError(f"{name}: expected shape {tuple(shape)}, got {tuple(mask.shape)}")
    return mask


def recurrent_masks(cell, weight_ih, weight_hh, z_input=None, z_hidden=None, z_gates=None,
                    next_input=None, keep_gates=None) -> RecurrentMasks:
    r"""Structured masks of one LSTM (``cell='lstm'``) or GRU (``'gru'``) layer from element masks.

    Lobacheva, Chirkova & Vetrov (2018): weights and group variables are pruned by a rule; the
    structure then follows:

    * a **gate** (one per gate type per hidden unit) is *kept* if its :math:`\hat z` survives and
      at least one weight into it survives; otherwise its pre-activation is the constant bias and
      the gate is the constant :math:`\sigma(b)` (i, f, o; r, z) or :math:`\tanh(b)` (g; n);
    * a **hidden neuron** is kept if its :math:`z^h` survives and it still has an outgoing weight:
      into a live gate row of the recurrence, or into the next layer;
    * an **input neuron** is kept if its :math:`z^x` survives and it has a weight into a live gate.

    These rules feed each other (removing a neuron removes its gate rows, which may leave another
    neuron without outgoing weights), so they are iterated to their fixed point; every step only
    removes, so it stops after at most F + H + G H rounds, each one vectorised.

    Args:
        weight_ih, weight_hh: boolean keep-masks of the weights, (G H, F) and (G H, H).
        z_input, z_hidden, z_gates: keep-masks of the group variables, (F,), (H,), (G H,), or
            ``None`` for a layer without that group (all kept).
        next_input: keep-mask of the weights that read this layer's output, (M, H) (the next
            layer's input weights), or ``None`` when the output is read as it is (every hidden
            neuron counts as having an outgoing weight).
        keep_gates: (G H,) gates computed even without a weight into them (a GRU's candidate
            gate with a hidden bias :math:`b_{hn} \ne 0` is :math:`\tanh(b_n + r\,b_{hn})`,
            not a constant), or ``None``.
    """
    if cell not in CELLS:
        raise ValueError(f"cell: expected one of {sorted(CELLS)}, got {cell!r}")
    G = len(CELLS[cell]["gates"])
    weight_ih = torch.as_tensor(weight_ih)
    if weight_ih.dim() != 2 or weight_ih.shape[0] % G:
        raise ValueError(f"weight_ih: expected a ({G}*H, F) mask, got shape {tuple(weight_ih.shape)}")
    H, F_in = weight_ih.shape[0] // G, weight_ih.shape[1]
    weight_ih = _check_bool("weight_ih", weight_ih, (G * H, F_in))
    weight_hh = _check_bool("weight_hh", weight_hh, (G * H, H))
    ones = lambda n: torch.ones(n, dtype=torch.bool, device=weight_ih.device)  # noqa: E731
    z_x = _check_bool("z_input", z_input, (F_in,)) if z_input is not None else ones(F_in)
    z_h = _check_bool("z_hidden", z_hidden, (H,)) if z_hidden is not None else ones(H)
    z_g = _check_bool("z_gates", z_gates, (G * H,)) if z_gates is not None else ones(G * H)
    if next_input is not None:
        next_input = torch.as_tensor(next_input)
        if next_input.dtype != torch.bool or next_input.dim() != 2 or next_input.shape[1] != H:
            raise ValueError(f"next_input: expected a boolean (M, {H}) mask, got "
                             f"{next_input.dtype} {tuple(next_input.shape)}")
        read = next_input.any(0)
    else:
        read = ones(H)
    unit = torch.arange(G * H, device=weight_ih.device) % H
    forced = _check_bool("keep_gates", keep_gates, (G * H,)) if keep_gates is not None else ~ones(G * H)
    inputs, hidden, gates = z_x.clone(), z_h.clone(), z_g.clone()
    while True:
        rows = gates & hidden[unit]
        w_ih = weight_ih & rows.unsqueeze(1) & inputs.unsqueeze(0)
        w_hh = weight_hh & rows.unsqueeze(1) & hidden.unsqueeze(0)
        new_gates = rows & (w_ih.any(1) | w_hh.any(1) | forced)
        new_inputs = inputs & w_ih.any(0)
        new_hidden = hidden & (w_hh.any(0) | read)
        if (torch.equal(new_gates, gates) and torch.equal(new_inputs, inputs)
                and torch.equal(new_hidden, hidden)):
            break
        inputs, hidden, gates = new_inputs, new_hidden, new_gates
    rows = gates & hidden[unit]
    return RecurrentMasks(cell, inputs, hidden, rows,
                          weight_ih & rows.unsqueeze(1) & inputs.unsqueeze(0),
                          weight_hh & rows.unsqueeze(1) & hidden.unsqueeze(0))


class CompactRecurrent(nn.Module):
    r"""A deterministic LSTM/GRU with deleted neurons and constant gates.

    Only the computed ("active") gate rows are stored as matrix rows, ``weight_ih`` (A, F') and
    ``weight_hh`` (A, H'); a constant gate stores its value in ``constants`` (one per constant
    gate, at the rows ``constant_index``). The forward pass runs torch's fused recurrence on the
    equivalent plain layer (:meth:`plain_weights`). The hidden state is the raw :math:`h`; the
    group variables are folded into the weights and the output is
    :math:`\hat h = h \cdot` ``output_scale``. ``input_index`` selects the kept input features
    of the (B, T, F) input.
    """

    def __init__(self, cell, input_index, weight_ih, weight_hh, bias, active, constant_index, constants,
                 output_scale, return_sequence=True, bias_hn=None):
        super().__init__()
        self.cell, self.return_sequence = cell, return_sequence
        self.num_gates = len(CELLS[cell]["gates"])
        self.register_buffer("input_index", input_index)
        self.register_buffer("active", active)
        self.register_buffer("constant_index", constant_index)
        self.weight_ih = nn.Parameter(weight_ih)
        self.weight_hh = nn.Parameter(weight_hh)
        self.bias = nn.Parameter(bias)
        self.constants = nn.Parameter(constants)
        self.output_scale = nn.Parameter(output_scale)
        #: a GRU's hidden bias of the candidate gate, per kept unit (None: 0)
        self.bias_hn = nn.Parameter(bias_hn) if bias_hn is not None else None

    @classmethod
    def empty(cls, cell, sizes: dict, return_sequence=True):
        """A module of the sizes of a compact spec entry (``features``, ``hidden``, ``active``),
        its parameters and indices to be loaded from a state dict."""
        G = len(CELLS[cell]["gates"])
        f, h, a = sizes["features"], sizes["hidden"], sizes["active"]
        long = lambda n: torch.zeros(n, dtype=torch.long)  # noqa: E731
        return cls(cell, long(f), torch.zeros(a, f), torch.zeros(a, h), torch.zeros(a), long(a), long(G * h - a),
                   torch.zeros(G * h - a), torch.zeros(h), return_sequence,
                   torch.zeros(h) if sizes.get("hidden_bias") else None)

    @property
    def hidden_size(self):
        return self.output_scale.numel()

    def sizes(self) -> dict:
        out = {"features": self.input_index.numel(), "hidden": self.hidden_size, "active": self.active.numel()}
        if self.bias_hn is not None:
            out["hidden_bias"] = True
        return out

    def forward(self, x):
        if not torch.is_grad_enabled():  # inference: the cached torch layer, as little Python as possible
            layer, every_input, index, scale = self._plain_layer()
            if layer is not None and x.shape[1] and index.numel():
                if not (every_input and x.shape[-1] == index.numel()):
                    x = x.index_select(-1, index)
                out = layer(x)[0]
                return out * scale if self.return_sequence else out[:, -1] * scale  # scale the last step only
        out, _, _ = self.run(x)
        return out if self.return_sequence else out[:, -1]

    def run(self, x, h=None, c=None):
        """``(outputs (B, T, H'), h_T, c_T)`` from the initial state ``(h, c)`` of the kept units
        (zeros when None; ``c`` is None for a GRU), by torch's fused recurrence on
        :meth:`plain_weights`."""
        training = torch.is_grad_enabled() and any(p.requires_grad for p in self._parameters.values()
                                                   if p is not None)
        layer, every_input, _, _ = (None, False, None, None) if training else self._plain_layer()
        if not (every_input and x.shape[-1] == self.input_index.numel()):  # all of them, in order: nothing to select
            x = x.index_select(-1, self.input_index)
        B, T, H = x.shape[0], x.shape[1], self.hidden_size
        lstm = self.cell == "lstm"
        if T == 0 or H == 0:  # nothing to run (torch's layers need a hidden unit)
            return x.new_zeros(B, T, H), (x.new_zeros(B, H) if h is None else h), (
                (x.new_zeros(B, H) if c is None else c) if lstm else None)
        if x.shape[-1] == 0:  # no input feature kept: one zero column (torch's layers need an input)
            x = x.new_zeros(B, T, 1)
        state = None
        if h is not None or c is not None:
            h = x.new_zeros(B, H) if h is None else h
            c = x.new_zeros(B, H) if c is None else c
            state = (h.unsqueeze(0), c.unsqueeze(0)) if lstm else h.unsqueeze(0)
        if training:  # fine-tuning: differentiable in every parameter
            w_ih, w_hh, bias, bias_hn = self.plain_weights()
            out, final = recurrent_states(self.cell, x, w_ih, w_hh, bias, bias_hn=bias_hn, state=state)
        else:
            out, final = layer(x) if state is None else layer(x, state)
        h_T, c_T = (final[0][0], final[1][0]) if lstm else (final[0], None)
        return out * self.output_scale, h_T, c_T

    def _plain_layer(self):
        """``(layer, every_input, input_index, output_scale)``: a ``torch.nn.LSTM``/``GRU`` holding
        :meth:`plain_weights` (None without hidden units) for
        inference, kept outside the module's parameters and state dict and built again when a
        parameter or index buffer changed: its identity, storage or version (in-place updates,
        optimiser steps, ``load_state_dict``; ``.to()`` forgets it). A write through ``p.data`` bumps
        no version: call :meth:`refresh` after one. Inference tensors (a module built in inference
        mode) have no version: then the layer is built for each call. ``every_input``: the kept
        input features are all the input's, in order (no selection needed). The check reads the
        parameter and buffer registries directly: ``self.parameters()`` cost more than the LSTM's
        arithmetic at batch 1 (the compact MNIST-1D LSTM was 10% slower than the dense one)."""
        tensors = [t for t in (*self._parameters.values(), *self._buffers.values()) if t is not None]
        try:
            key = tuple((id(t), t._version, t.data_ptr()) for t in tensors)
        except RuntimeError:  # inference tensors have no version counter
            key = None
        cached = self.__dict__.get("_plain_cache")
        if cached is None or key is None or cached[0] != key:
            layer = None
            with torch.inference_mode(False), torch.no_grad():  # plain tensors, usable outside inference mode
                if self.hidden_size:  # (torch's layers need a hidden unit)
                    w_ih, w_hh, bias, bias_hn = self.plain_weights()
                    layer = CELLS[self.cell]["torch"](w_ih.shape[1], self.hidden_size, batch_first=True,
                                                      device=w_ih.device, dtype=w_ih.dtype).requires_grad_(False)
                    for name, value in (("weight_ih_l0", w_ih), ("weight_hh_l0", w_hh), ("bias_ih_l0", bias),
                                        ("bias_hh_l0", _hidden_bias(self.cell, bias, bias_hn))):
                        getattr(layer, name).copy_(value)
                index = self.input_index
                every = bool(index.numel() and torch.equal(index, torch.arange(index.numel(), device=index.device)))
            cached = (key, (layer, every, self.input_index, self.output_scale.detach()))
            if key is not None:
                self.__dict__["_plain_cache"] = cached
        return cached[1]

    def _apply(self, fn, recurse=True):
        out = super()._apply(fn, recurse)
        self.refresh()
        return out

    def refresh(self):
        """Forget the inference layer of :meth:`_plain_layer` (after writing a parameter through
        ``.data``, which its cache cannot see)."""
        self.__dict__.pop("_plain_cache", None)

    @torch.no_grad()
    def plain_module(self) -> "PlainRecurrent":
        """A :class:`PlainRecurrent` computing what this module computes, its torch layer built now
        (what the exporters trace: building a torch layer inside a trace fails)."""
        layer = None
        if self.hidden_size:
            w_ih, w_hh, bias, bias_hn = self.plain_weights()
            layer = CELLS[self.cell]["torch"](w_ih.shape[1], self.hidden_size, batch_first=True, device=w_ih.device,
                                              dtype=w_ih.dtype).requires_grad_(False)
            for name, value in (("weight_ih_l0", w_ih), ("weight_hh_l0", w_hh), ("bias_ih_l0", bias),
                                ("bias_hh_l0", _hidden_bias(self.cell, bias, bias_hn))):
                getattr(layer, name).copy_(value)
        return PlainRecurrent(self.cell, layer, self.input_index.clone(), self.output_scale.detach().clone(),
                              self.return_sequence).eval()

    def plain_weights(self):
        r"""``(weight_ih, weight_hh, bias, bias_hn)`` of a plain LSTM/GRU layer of the kept units
        (``bias_hn`` None for an LSTM) that computes this module exactly, for torch's fused
        recurrence: an active gate row is its own, a constant gate is a row of zero weights whose
        bias is the inverse of the gate's nonlinearity at the constant (:math:`\mathrm{logit}`,
        or :math:`\tanh^{-1}` for the tanh gate; a saturated constant, 0 or 1 (or -1), taken one
        machine epsilon inside, so that value and gradient stay finite), and a GRU's constant
        candidate gate gets no hidden bias. No input feature kept: one zero column. The matrices keep zero rows where
        the module keeps none: the fused kernel costs a little more arithmetic than the active
        rows alone, and far less than a step-by-step loop in Python."""
        G, H = self.num_gates, self.hidden_size
        gh = G * H
        w_ih = self.weight_ih.new_zeros(gh, max(self.weight_ih.shape[1], 1))
        if self.weight_ih.shape[1]:
            w_ih = w_ih.index_copy(0, self.active, self.weight_ih)
        w_hh = self.weight_hh.new_zeros(gh, H).index_copy(0, self.active, self.weight_hh)
        gate = torch.div(self.constant_index, H, rounding_mode="floor")
        tanh_gates = [CELLS[self.cell]["gates"].index(g) for g in CELLS[self.cell]["tanh"]]
        on_tanh = torch.isin(gate, torch.tensor(tanh_gates, device=gate.device))
        c, eps = self.constants, torch.finfo(self.constants.dtype).eps
        # each branch sees only inputs in its domain: torch.where differentiates both
        pre = torch.where(on_tanh, torch.atanh(torch.where(on_tanh, c, 0.0).clamp(-1 + eps, 1 - eps)),
                          torch.logit(torch.where(on_tanh, 0.5, c), eps=eps))
        bias = self.bias.new_zeros(gh).index_copy(0, self.active, self.bias).index_copy(0, self.constant_index, pre)
        bias_hn = None
        if self.cell == "gru":
            bias_hn = self.bias_hn if self.bias_hn is not None else self.bias.new_zeros(H)
            n_constant = self.constant_index[gate == G - 1] - (G - 1) * H
            bias_hn = bias_hn.index_fill(0, n_constant, 0.0)
        return w_ih, w_hh, bias, bias_hn


class PlainRecurrent(nn.Module):
    """A :class:`CompactRecurrent` as plain torch modules, for export: the kept input features
    (``input_index``; a zero column where none is kept), a ``torch.nn.LSTM``/``GRU`` (``layer``;
    None without hidden units), the output scale; ``run`` and ``forward`` as
    :class:`CompactRecurrent`'s."""

    def __init__(self, cell, layer, input_index, output_scale, return_sequence=True):
        super().__init__()
        self.cell, self.layer, self.return_sequence = cell, layer, return_sequence
        self.register_buffer("input_index", input_index)
        self.register_buffer("output_scale", output_scale)

    def forward(self, x):
        out, _, _ = self.run(x)
        return out if self.return_sequence else out[:, -1]

    def run(self, x, h=None, c=None):
        x = x.index_select(-1, self.input_index)
        lstm = self.cell == "lstm"
        if self.layer is None:  # no hidden unit: an empty output and state
            empty = x[:, 0, :0]
            return x[..., :0], empty if h is None else h, (empty if c is None else c) if lstm else None
        if self.input_index.numel() == 0:
            x = F.pad(x, (0, 1))  # one zero column (torch's layers need an input)
        state = None
        if h is not None or c is not None:
            h = torch.zeros_like(x[:, 0, :1]).expand(-1, self.output_scale.numel()) if h is None else h
            c = torch.zeros_like(h) if c is None else c
            state = (h.unsqueeze(0), c.unsqueeze(0)) if lstm else h.unsqueeze(0)
        out, final = self.layer(x) if state is None else self.layer(x, state)
        h_T, c_T = (final[0][0], final[1][0]) if lstm else (final[0], None)
        return out * self.output_scale, h_T, c_T


def compact_recurrent(cell, weight_ih, weight_hh, bias, masks: RecurrentMasks, z_input=None, z_hidden=None,
                      z_gates=None, return_sequence=True, input_index=None, bias_hn=None) -> CompactRecurrent:
    """The :class:`CompactRecurrent` of a masked LSTM/GRU layer.

    The parameters are the layer's point values (e.g. posterior means); the masks come from
    :func:`recurrent_masks`. Weights outside the masks are dropped, group variables are folded
    in (:func:`fold_gated_weights`), the rows and columns of removed neurons are deleted and each
    constant gate keeps only :math:`\\sigma(b)` or :math:`\\tanh(b)`. ``input_index``: where each
    kept input feature is in the input the module receives (default: its own index).
    """
    G = len(CELLS[cell]["gates"])
    with torch.no_grad():
        w_ih, w_hh = fold_gated_weights(weight_ih * masks.weight_ih, weight_hh * masks.weight_hh,
                                        z_input, z_hidden, z_gates)
        hidden = masks.hidden.nonzero().squeeze(1)
        inputs = masks.input.nonzero().squeeze(1)
        H = masks.hidden.numel()
        rows = (torch.arange(G, device=hidden.device).unsqueeze(1) * H + hidden.unsqueeze(0)).reshape(-1)
        live = masks.gates[rows]
        active = live.nonzero().squeeze(1)
        constant = (~live).nonzero().squeeze(1)
        b = bias[rows]
        tanh_rows = torch.tensor([name in CELLS[cell]["tanh"] for name in CELLS[cell]["gates"]],
                                 device=b.device).repeat_interleave(hidden.numel())
        constants = torch.where(tanh_rows, torch.tanh(b), torch.sigmoid(b))[constant]
        scale = z_hidden[hidden] if z_hidden is not None else torch.ones_like(b[: hidden.numel()])
        return CompactRecurrent(cell, inputs if input_index is None else input_index[inputs],
                                w_ih[rows[active]][:, inputs].clone(), w_hh[rows[active]][:, hidden].clone(),
                                b[active].clone(), active, constant, constants.clone(), scale.clone(),
                                return_sequence, None if bias_hn is None else bias_hn[hidden].clone())


_GATED = ("weight_ih", "weight_hh", "bias", "bias_hn", "z_input", "z_hidden", "z_gates")


class RecurrentCompaction(Compaction):
    """Compaction of a (stacked) LSTM/GRU layer: units are the hidden neurons of its last stacked
    layer, features the input neurons of its first. The structure inside the layer (gates made
    constant, hidden and input neurons deleted, stacked layers re-indexed) is the fixed point of
    :func:`recurrent_masks` over the stack, with the next layer's reads (``read``) deciding which
    of the last layer's neurons still have an outgoing weight."""

    def __init__(self, name, layer, values, masks, in_shape, out_shape):
        super().__init__(name, layer, in_shape, out_shape, units=layer.hidden_size)
        self.cell, self.return_sequence = layer.cell, layer.return_sequence
        self.num_gates = len(CELLS[self.cell]["gates"])
        self.in_axis, self.out_axis = len(in_shape) - 1, len(out_shape) - 1
        self.stack = []
        for k in range(layer.num_layers):
            p, m = layer.layer_params(values, k), layer.layer_params(masks, k)
            entry = {}
            for key in _GATED:
                if key in p:
                    keep = m.get(key, torch.ones_like(p[key], dtype=torch.bool)).to(p[key].device)
                    entry[key], entry["m_" + key] = (p[key].detach() * keep.to(p[key].dtype)).clone(), keep.clone()
            self.stack.append(entry)
        self.read = None  # the next layer's reads of our units (None: every unit is read)
        #: per stacked layer, the dense sizes: weights, hidden neurons, input neurons
        self.dense = [(e["weight_ih"].numel() + e["weight_hh"].numel(), e["weight_hh"].shape[1],
                       e["weight_ih"].shape[1]) for e in self.stack]

    # ---------------------------------------------------------------- the structure
    def masks(self, read=None) -> list:
        """:class:`RecurrentMasks` of every stacked layer, iterated to their joint fixed point."""
        out = [None] * len(self.stack)
        for _ in range(len(self.stack) + 1):
            new = []
            for k, e in enumerate(self.stack):
                z_in = e.get("m_z_input")
                if k > 0:
                    z_in = new[k - 1].hidden if z_in is None else z_in & new[k - 1].hidden
                if k + 1 < len(self.stack):
                    nxt = out[k + 1].weight_ih if out[k + 1] is not None else self.stack[k + 1]["m_weight_ih"]
                else:
                    nxt = None if read is None else read.unsqueeze(0)
                new.append(recurrent_masks(self.cell, e["m_weight_ih"], e["m_weight_hh"], z_in, e.get("m_z_hidden"),
                                           e.get("m_z_gates"), nxt, self._live_gates(e)))
            if all(n.same(o) for n, o in zip(new, out)):
                break
            out = new
        return new

    @staticmethod
    def _live_gates(e):
        """A GRU's candidate gates with a non-zero hidden bias ``b_hn`` (computed even without
        weights), or None."""
        b_hn = e.get("bias_hn")
        if b_hn is None:
            return None
        h = b_hn.numel()
        return torch.cat([torch.zeros(2 * h, dtype=torch.bool, device=b_hn.device), b_hn != 0])

    # ---------------------------------------------------------------- producer
    def constant_units(self):
        """Neurons whose :math:`z^h` was removed: their output :math:`h z^h` is 0."""
        last = self.stack[-1]
        if "m_z_hidden" not in last:
            return super().constant_units()
        idx = torch.nonzero(~last["m_z_hidden"]).squeeze(1)
        return idx, last["z_hidden"].new_zeros(len(idx), *self.unit_rest())

    def removable_unread(self, idx):
        """Unread neurons that the recurrence does not read either."""
        read = torch.ones(self.num_units(), dtype=torch.bool)
        read[idx] = False
        hidden = self.masks(read)[-1].hidden
        return idx[~hidden[idx]]

    def drop_units(self, idx):
        e, G, H = self.stack[-1], self.num_gates, self.num_units()
        rows = (torch.arange(G).unsqueeze(1) * H + as_index(idx).unsqueeze(0)).reshape(-1)
        for key in ("weight_ih", "weight_hh", "bias", "z_gates"):
            for k in (key, "m_" + key):
                if k in e:
                    e[k] = drop_entries(e[k], rows, 0)
        for k in ("weight_hh", "m_weight_hh"):
            e[k] = drop_entries(e[k], idx, 1)
        for k in ("z_hidden", "m_z_hidden", "bias_hn", "m_bias_hn"):
            if k in e:
                e[k] = drop_entries(e[k], idx, 0)
        if self.read is not None:
            self.read = drop_entries(self.read, idx, 0)

    # ---------------------------------------------------------------- consumer
    def num_features(self):
        return self.stack[0]["weight_ih"].shape[1]

    def read_features(self):
        return self.masks(self.read)[0].input

    def foldable(self, values):
        return (values == values[:, :1]).all(1)  # constant over the time steps

    def fold(self, features, values):
        """A constant input :math:`c` adds :math:`\\hat z \\odot (W_x z^x)_{\\cdot f} c` to the gates' bias."""
        e = self.stack[0]
        w_ih, _ = fold_gated_weights(e["weight_ih"], e["weight_hh"], e.get("z_input"), None, e.get("z_gates"))
        contribution = w_ih[:, as_index(features)] @ values[:, 0].to(w_ih.dtype)
        if bool((contribution != 0).any()):
            e["bias"] = e["bias"] + contribution
            self.folded = True

    def delete_features(self, idx):
        e = self.stack[0]
        e["weight_ih"], e["m_weight_ih"] = drop_entries(e["weight_ih"], idx, 1), drop_entries(e["m_weight_ih"], idx, 1)
        for k in ("z_input", "m_z_input"):
            if k in e:
                e[k] = drop_entries(e[k], idx, 0)

    # ---------------------------------------------------------------- result
    def build(self):
        masks = self.masks(self.read)
        last = masks[-1]
        # the last layer keeps every neuron the chain kept; one whose z^h is 0 outputs 0
        masks[-1] = RecurrentMasks(last.cell, last.input, torch.ones_like(last.hidden), last.gates, last.weight_ih,
                                   last.weight_hh)
        modules, params, position = [], {}, None
        for k, (e, m) in enumerate(zip(self.stack, masks)):
            module = compact_recurrent(self.cell, e["weight_ih"], e["weight_hh"], e["bias"], m, e.get("z_input"),
                                       e.get("z_hidden"), e.get("z_gates"),
                                       self.return_sequence or k + 1 < len(self.stack), position, e.get("bias_hn"))
            kept = m.hidden.nonzero().squeeze(1)
            position = torch.full((m.hidden.numel(),), -1, dtype=torch.long)
            position[kept] = torch.arange(kept.numel())
            modules.append(module)
            params.update({f"{k}.{n}": t for n, t in module.state_dict().items()})
        entry = {"type": self.layer.spec_name, "cell": self.cell, "return_sequence": self.return_sequence,
                 "layers": [module.sizes() for module in modules]}
        steps = self.in_shape[0]  # a multiply-add per weight and time step
        weights = [t for m in modules for t in (m.weight_ih, m.weight_hh)]
        reports = []
        for m, (total, hidden, inputs) in zip(self.masks(self.read), self.dense):  # against the dense layer
            r = m.report()
            r.update(weights=(r["weights"][0], total), hidden=(r["hidden"][0], hidden), inputs=(r["inputs"][0], inputs))
            reports.append(r)
        info = {"units": {"": self.units_info()}, "recurrent": reports,
                "flops": 2 * steps * sum(w.numel() for w in weights),
                "flops_sparse": 2 * steps * sum(int((w != 0).sum()) for w in weights)}
        self.kept_hidden = [m.hidden.nonzero().squeeze(1) for m in masks]  # per stacked layer (the last: all)
        self.modules = modules
        return entry, params, info


class EmbeddingCompaction(Compaction):
    """Compaction of a token embedding: its units are the embedding dimensions (columns of the
    table :math:`\\mathrm{diag}(z) W`); a column with every entry removed outputs 0 and goes."""

    def __init__(self, name, layer, values, masks, in_shape, out_shape):
        super().__init__(name, layer, in_shape, out_shape, units=values["weight"].shape[1])
        self.out_axis = len(out_shape) - 1
        w = values["weight"].detach()
        m = masks.get("weight", torch.ones_like(w, dtype=torch.bool)).to(w.device)
        z = values.get("z_tokens")
        if z is not None:
            keep_z = masks.get("z_tokens", torch.ones_like(z, dtype=torch.bool)).to(w.device)
            m = m & keep_z.unsqueeze(-1)
        self.m = m.clone()
        self.table = embed_table(w, z) * m.to(w.dtype)

    def constant_units(self):
        idx = torch.nonzero(~self.m.any(0)).squeeze(1)
        return idx, self.table.new_zeros(len(idx), *self.unit_rest())

    def drop_units(self, idx):
        self.table, self.m = drop_entries(self.table, idx, 1), drop_entries(self.m, idx, 1)

    def build(self):
        entry = {"type": self.layer.spec_name, "num_tokens": self.table.shape[0], "dim": self.table.shape[1]}
        return entry, {"module.weight": self.table.contiguous()}, {"units": {"": self.units_info()},
                                                                   "flops": 0, "flops_sparse": 0}  # a look-up
