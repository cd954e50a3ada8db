r"""Reduction of gated recurrent layers: weight, neuron and gate masks, and compact LSTM/GRU.

Lobacheva, Chirkova, Vetrov (2018), "Bayesian Sparsification of Gated Recurrent Neural
Networks". Weights and group variables are pruned by their own rule (log alpha > 3 under the
log-uniform prior, or the Savage-Dickey evidence); the structure then follows:

* a **gate** (one per gate type per hidden unit) is *kept* if its :math:`\hat z` survives and
  at least one weight into it survives; otherwise its pre-activation is the constant bias and
  the gate is the constant :math:`\sigma(b)` (i, f, o; r, z) or :math:`\tanh(b)` (g; n);
* a **hidden neuron** is kept if its :math:`z^h` survives and it still has an outgoing weight:
  into a live gate row of the recurrence, or into the next layer;
* an **input neuron** is kept if its :math:`z^x` survives and it has a weight into a live gate.

These rules feed each other (removing a neuron removes its gate rows, which may leave another
neuron without outgoing weights), so :func:`recurrent_masks` iterates them to their fixed
point; every step only removes, so it stops after at most F + H + G H rounds, each one vectorised.

:func:`compact_lstm` / :func:`compact_gru` rebuild a smaller deterministic layer
(:class:`CompactRecurrent`): removed neurons deleted, a removed gate replaced by its constant
instead of a matmul row. Its outputs equal the masked model's (the Bayesian layer evaluated at
the masked point values), which the tests check to 1e-5.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..layers import Linear
from ..recurrent import CELLS, _Recurrent, fold_gated_weights
from .bmr import savage_dickey

__all__ = [
    "RecurrentMasks",
    "recurrent_masks",
    "CompactRecurrent",
    "compact_recurrent",
    "compact_lstm",
    "compact_gru",
    "site_keep_masks",
    "RecurrentReduction",
    "reduce_recurrent_network",
    "masked_values",
    "compact_recurrent_network",
    "ScatterHidden",
    "format_recurrent_report",
]


# ---------------------------------------------------------------------------- masks of one layer
@dataclass
class RecurrentMasks:
    """Keep-masks of one gated recurrent layer (True = keep).

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
                    next_input=None) -> RecurrentMasks:
    """Structured masks of one LSTM (``cell='lstm'``) or GRU (``'gru'``) layer from element masks.

    Args:
        weight_ih, weight_hh: boolean keep-masks of the weights, (G H, F) and (G H, H).
        z_input, z_hidden, z_gates: keep-masks of the group variables, (F,), (H,), (G H,), or
            ``None`` for a layer without that group (all kept).
        next_input: keep-mask of the weights that read this layer's output, (M, H) (the next
            layer's input weights), or ``None`` when the output is read as it is (every hidden
            neuron counts as having an outgoing weight).

    Returns the fixed point of the rules in the module docstring as :class:`RecurrentMasks`.
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
    inputs, hidden, gates = z_x.clone(), z_h.clone(), z_g.clone()
    while True:
        rows = gates & hidden[unit]
        w_ih = weight_ih & rows.unsqueeze(1) & inputs.unsqueeze(0)
        w_hh = weight_hh & rows.unsqueeze(1) & hidden.unsqueeze(0)
        new_gates = rows & (w_ih.any(1) | w_hh.any(1))
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


# ---------------------------------------------------------------------------- compact layers
class CompactRecurrent(nn.Module):
    r"""A deterministic LSTM/GRU with deleted neurons and constant gates.

    Only the computed ("active") gate rows are matrix rows: the inputs of all time steps are
    multiplied by ``weight_ih`` (A, F') at once, and each step multiplies :math:`h` by
    ``weight_hh`` (A, H'). A constant gate takes its value from ``constants`` (G H',) instead.
    The hidden state is the raw :math:`h`; the group variables are folded into the weights and
    the output is :math:`\hat h = h \cdot` ``output_scale``.

    ``input_index`` selects the kept input features of the (B, T, F) input.
    """

    def __init__(self, cell, input_index, weight_ih, weight_hh, bias, active, constants, output_scale,
                 return_sequence=True):
        super().__init__()
        self.cell, self.return_sequence = cell, return_sequence
        self.num_gates = len(CELLS[cell]["gates"])
        gh = constants.numel()
        active_mask = torch.zeros(gh, dtype=torch.bool, device=constants.device)
        active_mask[active] = True
        self.register_buffer("input_index", input_index)
        self.register_buffer("weight_ih", weight_ih)
        self.register_buffer("weight_hh", weight_hh)
        self.register_buffer("bias", bias)
        self.register_buffer("active", active)
        self.register_buffer("active_mask", active_mask)
        self.register_buffer("constants", constants)
        self.register_buffer("output_scale", output_scale)

    @property
    def hidden_size(self):
        return self.output_scale.numel()

    def num_parameters(self) -> int:
        """Stored numbers: active weight rows, their biases, constants of constant gates, scales."""
        return (self.weight_ih.numel() + self.weight_hh.numel() + self.bias.numel()
                + int((~self.active_mask).sum()) + self.output_scale.numel())

    def _scatter(self, values, like_shape):
        out = values.new_zeros(*like_shape[:-1], self.constants.numel())
        return out.index_copy(out.dim() - 1, self.active, values)

    def forward(self, x):
        x = x.index_select(-1, self.input_index)
        B, T = x.shape[:2]
        H, G = self.hidden_size, self.num_gates
        xw = self._scatter(x @ self.weight_ih.T + self.bias, (B, T, G * H))
        h = x.new_zeros(B, H)
        c = x.new_zeros(B, H)
        const = self.constants.view(G, H)
        act = self.active_mask.view(G, H)
        outputs = []
        for t in range(T):
            hw = self._scatter(h @ self.weight_hh.T, (B, G * H)).view(B, G, H)
            xt = xw[:, t].view(B, G, H)
            if self.cell == "lstm":
                pre = xt + hw
                s = torch.where(act, torch.sigmoid(pre), const)
                g = torch.where(act[2], torch.tanh(pre[:, 2]), const[2])
                c = s[:, 1] * c + s[:, 0] * g
                h = s[:, 3] * torch.tanh(c)
            else:  # gru: r, z (update), n
                r = torch.where(act[0], torch.sigmoid(xt[:, 0] + hw[:, 0]), const[0])
                u = torch.where(act[1], torch.sigmoid(xt[:, 1] + hw[:, 1]), const[1])
                n = torch.where(act[2], torch.tanh(xt[:, 2] + r * hw[:, 2]), const[2])
                h = (1 - u) * n + u * h
            outputs.append(h)
        out = torch.stack(outputs, 1) * self.output_scale if outputs else x.new_zeros(B, 0, H)
        return out if self.return_sequence else out[:, -1]


def compact_recurrent(cell, weight_ih, weight_hh, bias, masks: RecurrentMasks, z_input=None, z_hidden=None,
                      z_gates=None, return_sequence=True) -> CompactRecurrent:
    """Build the :class:`CompactRecurrent` of a masked LSTM/GRU layer.

    The parameters are the layer's point values (e.g. posterior means); the masks come from
    :func:`recurrent_masks`. Weights outside the masks are dropped, group variables are folded
    in (:func:`~pyro_sparse.recurrent.fold_gated_weights`), the rows and columns of removed
    neurons are deleted and each constant gate keeps only :math:`\\sigma(b)` or :math:`\\tanh(b)`.
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
        b = bias[rows]
        tanh_rows = torch.zeros(G, hidden.numel(), dtype=torch.bool, device=b.device)
        for k, name in enumerate(CELLS[cell]["gates"]):
            tanh_rows[k] = name in CELLS[cell]["tanh"]
        tanh_rows = tanh_rows.reshape(-1)
        constants = torch.where(tanh_rows, torch.tanh(b), torch.sigmoid(b)) * ~live
        scale = z_hidden[hidden] if z_hidden is not None else torch.ones_like(b[: hidden.numel()])
        return CompactRecurrent(cell, inputs, w_ih[rows[active]][:, inputs].clone(),
                                w_hh[rows[active]][:, hidden].clone(), b[active].clone(), active, constants,
                                scale.clone(), return_sequence)


def compact_lstm(weight_ih, weight_hh, bias, masks, z_input=None, z_hidden=None, z_gates=None,
                 return_sequence=True) -> CompactRecurrent:
    """:func:`compact_recurrent` for an LSTM (gates i, f, g, o)."""
    return compact_recurrent("lstm", weight_ih, weight_hh, bias, masks, z_input, z_hidden, z_gates, return_sequence)


def compact_gru(weight_ih, weight_hh, bias, masks, z_input=None, z_hidden=None, z_gates=None,
                return_sequence=True) -> CompactRecurrent:
    """:func:`compact_recurrent` for a GRU (gates r, z, n)."""
    return compact_recurrent("gru", weight_ih, weight_hh, bias, masks, z_input, z_hidden, z_gates, return_sequence)


# ---------------------------------------------------------------------------- networks
def site_keep_masks(summary, threshold: float = 3.0, method: str = "log-alpha") -> dict:
    """Element keep-masks of every weight and group-variable site of a posterior summary.

    ``method='log-alpha'``: keep where log alpha <= ``threshold`` (Molchanov et al. 2017; 3 by
    default). ``method='savage-dickey'``: keep where the evidence for removing the element,
    :func:`~pyro_sparse.reduction.savage_dickey`, is <= ``threshold`` (0 is the evidence
    boundary; needs a proper Gaussian prior). Biases are never pruned and get no mask.
    """
    if method not in ("log-alpha", "savage-dickey"):
        raise ValueError(f"method: expected 'log-alpha' or 'savage-dickey', got {method!r}")
    out = {}
    for name, s in summary.items():
        if s.param.startswith("bias"):
            continue
        if method == "log-alpha":
            if s.log_alpha is None:
                raise ValueError(f"{name}: the summary has no log alpha (not a Gaussian mean-field "
                                 "posterior); use method='savage-dickey'")
            out[name] = s.log_alpha <= threshold
        else:
            out[name] = savage_dickey(s.loc, s.precision, s.prior_loc, s.prior_precision) <= threshold
    return out


@dataclass
class RecurrentReduction:
    """Effective keep-masks per site (``keep``) and the structured masks of every recurrent
    layer (``layers``: layer name -> list of :class:`RecurrentMasks`, one per stacked layer)."""

    keep: dict
    layers: dict

    def report(self) -> dict:
        return {name: [m.report() for m in masks] for name, masks in self.layers.items()}


def _reader(network, names, i):
    """The next layer with weights after position ``i`` and the name of its input-weight site."""
    for name in names[i + 1:]:
        layer = network.layers[name]
        if isinstance(layer, _Recurrent):
            return name, layer, "weight_ih"
        if layer.priors():
            return name, layer, "weight"
    return None, None, None


def reduce_recurrent_network(network, summary, threshold: float = 3.0, method: str = "log-alpha") -> RecurrentReduction:
    """Masks for a network with recurrent layers, from its posterior summary.

    Element masks come from :func:`site_keep_masks`; for every recurrent layer (and stacked
    sub-layer) :func:`recurrent_masks` adds the neuron and gate structure, reading the next
    layer's input-weight mask for "has an outgoing weight". Returns the effective masks of all
    sites (the recurrent ones replaced by their structured versions, group variables zeroed for
    removed groups, the next layer's columns of removed neurons dropped).
    """
    raw = site_keep_masks(summary, threshold, method)
    keep = dict(raw)
    layers = {}
    names = list(network.layers)
    available = None  # hidden mask of a recurrent layer that feeds the next one directly
    for i, name in enumerate(names):
        layer = network.layers[name]
        if not isinstance(layer, _Recurrent):
            if layer.priors():
                available = None
            continue
        masks = []
        for k in range(layer.num_layers):
            s = layer.suffix(k)
            site = lambda p: f"{name}.{p}{s}"  # noqa: E731
            if k + 1 < layer.num_layers:
                next_input = raw[f"{name}.weight_ih{layer.suffix(k + 1)}"]
            else:
                rname, reader, param = _reader(network, names, i)
                next_input = raw.get(f"{rname}.{param}") if reader is not None else None
                if next_input is not None and (next_input.dim() != 2 or next_input.shape[1] != layer.hidden_size):
                    next_input = None  # read through a reshape: every neuron counts as read
            z_input = raw.get(site("z_input"))
            if available is not None:
                z_input = available if z_input is None else z_input & available
            m = recurrent_masks(layer.cell, raw[site("weight_ih")], raw[site("weight_hh")], z_input,
                                raw.get(site("z_hidden")), raw.get(site("z_gates")), next_input)
            masks.append(m)
            keep[site("weight_ih")], keep[site("weight_hh")] = m.weight_ih, m.weight_hh
            for group, mask in (("z_input", m.input), ("z_hidden", m.hidden), ("z_gates", m.gates)):
                if site(group) in keep:
                    keep[site(group)] = mask
            available = m.hidden
        layers[name] = masks
        rname, reader, param = _reader(network, names, i)
        if reader is not None and not isinstance(reader, _Recurrent):
            w = keep[f"{rname}.{param}"]
            if w.dim() == 2 and w.shape[1] == layer.hidden_size:
                keep[f"{rname}.{param}"] = w & available.unsqueeze(0)
            available = None
    return RecurrentReduction(keep, layers)


def masked_values(values: dict, keep: dict) -> dict:
    """Point values with every masked element set to zero (the "masked model")."""
    return {name: (v * keep[name] if name in keep else v) for name, v in values.items()}


def compact_recurrent_network(network, values: dict, reduction: RecurrentReduction) -> nn.Sequential:
    """A plain ``nn.Sequential`` equal to the masked model, with recurrent layers compacted.

    ``values``: point values of every site (e.g. ``guide.median()``). Recurrent layers become
    :class:`CompactRecurrent` modules; a Linear or recurrent layer that reads a recurrent layer's
    output directly loses the input columns of removed hidden neurons; any other reader gets the
    full-width output back (removed neurons as zeros, :class:`ScatterHidden`). Other layers are
    their masked deterministic modules.
    """
    values = masked_values(values, reduction.keep)
    modules = [nn.Unflatten(1, network.input_shape)] if network.input_shape is not None else []
    kept, width = None, None  # kept hidden neurons of the last compacted recurrent layer, its full width
    for name, layer in network.layers.items():
        params = {p: values[f"{name}.{p}"] for p in layer.priors()}
        if isinstance(layer, _Recurrent):
            for k, m in enumerate(reduction.layers[name]):
                p = layer.layer_params(params, k)
                cell = compact_recurrent(layer.cell, p["weight_ih"], p["weight_hh"], p["bias"], m, p.get("z_input"),
                                         p.get("z_hidden"), p.get("z_gates"),
                                         return_sequence=layer.return_sequence or k + 1 < layer.num_layers)
                if kept is not None:  # inputs come from a compacted layer: re-index into its outputs
                    position = torch.full((width,), -1, dtype=torch.long, device=kept.device)
                    position[kept] = torch.arange(kept.numel(), device=kept.device)
                    cell.input_index = position[cell.input_index]
                modules.append(cell)
                kept, width = m.hidden.nonzero().squeeze(1), m.hidden.numel()
            continue
        if kept is not None and layer.priors():
            if isinstance(layer, Linear) and params["weight"].shape[1] == width:
                params = dict(params, weight=params["weight"][:, kept])
            else:
                modules.append(ScatterHidden(kept, width))
            kept = None
        modules.append(layer.deterministic(params))
    if kept is not None:
        modules.append(ScatterHidden(kept, width))
    return nn.Sequential(*modules)


class ScatterHidden(nn.Module):
    """Put the kept hidden neurons back at their places in a zero vector of the full width."""

    def __init__(self, kept, width):
        super().__init__()
        self.width = width
        self.register_buffer("kept", kept)

    def forward(self, x):
        out = x.new_zeros(*x.shape[:-1], self.width)
        return out.index_copy(x.dim() - 1, self.kept, x)


def format_recurrent_report(reduction: RecurrentReduction) -> str:
    """A table per recurrent layer: weights, hidden and input neurons kept, gates kept (constant)."""
    lines = []
    for name, reports in reduction.report().items():
        for k, r in enumerate(reports):
            label = name if len(reports) == 1 else f"{name}[{k}]"
            wk, wt = r["weights"]
            hk, ht = r["hidden"]
            ik, it = r["inputs"]
            gates = "  ".join(f"{g} {v['kept']}({v['constant']})" for g, v in r["gates"].items())
            lines.append(f"{label:10} {r['cell']:4}  weights {wk:>7d}/{wt:<7d} ({100 * (1 - wk / wt):5.1f}% removed)  "
                         f"hidden {hk:>4d}/{ht:<4d}  inputs {ik:>4d}/{it:<4d}  gates kept(constant): {gates}")
    return "\n".join(lines)
