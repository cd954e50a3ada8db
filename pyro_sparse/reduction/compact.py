r"""Applying a decision: masked predictions and the compact network.

* :func:`masked_values` / :func:`masked_module`: the network with every parameter at its
  posterior mean (or given values) times the decision's masks, as a plain ``torch.nn`` module.
  This is *the masked network*: the reference every reduced network must reproduce.
* :func:`masked_predictive`: the masked posterior predictive, drawing each parameter from its
  Gaussian marginal in the summary, :math:`w = m \odot (\mu + \sigma\varepsilon)`.
* :func:`compact`: a deterministic ``torch.nn.Sequential`` in which removed units and conv
  channels are physically deleted (rows of layer l and the matching columns of layer l+1;
  conv out-channels and the next layer's in-channels, including the block of columns a channel
  becomes after ``flatten``), predicting as the masked network does.

Which units go. A unit (neuron, or conv channel) of a hidden layer is deleted when

* nothing reads it: every weight of the next layer that consumes it is masked (*dead*), or
* it does not depend on the input: every incoming weight is masked (*constant*). It then
  outputs the constant :math:`c = \phi(b)` after its activation (``b`` its bias, 0 if masked);
  its contribution to the next layer, :math:`W_{l+1}[:, j]\,c`, is added to that layer's bias.
  For a next conv layer this is exact only when the constant map stays spatially uniform and
  the conv has no zero padding; otherwise the unit is deleted only when :math:`c = 0`
  (e.g. ReLU of a negative bias), and kept when not.

Deleting units makes more units dead or constant, so both passes repeat until nothing changes.
The output layer keeps all its units, and a conv layer at least one channel (torch has no
convolution with zero channels). Between two parametric layers only element-wise activations,
dropout (inference mode), pooling and flatten may appear; units feeding anything else are kept.

Layers that compact themselves. A Bayesian layer with a ``compact_entry(values, masks)`` hook
(the transformer family, :mod:`pyro_sparse.transformer`) returns its compact spec entry, its
compact parameters and what it removed (attention heads, MLP hidden units; see
:mod:`.transformer`); its class rebuilds the module with ``build_compact(entry)``. Such a layer
keeps its input and output widths, so it separates the linear/conv chains around it.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import torch
from torch import nn

from ..layers import LAYERS, Conv2d, Linear, _Stateless

__all__ = ["masked_values", "masked_module", "masked_predictive", "compact", "compact_plan", "CompactPlan",
           "build_module", "layer_shapes"]

_ELEMENTWISE = {"relu", "tanh", "sigmoid", "gelu", "dropout"}
_TRANSPARENT = _ELEMENTWISE | {"maxpool2d", "avgpool2d", "flatten"}


# --------------------------------------------------------------------------- masked network


def point_values(summary_or_values) -> dict:
    """Site -> point value: the summary's posterior means, or a given dict of tensors."""
    if hasattr(summary_or_values, "locs"):
        return summary_or_values.locs()
    return dict(summary_or_values)


def masked_values(summary_or_values, decision=None) -> dict:
    """Site -> point value times the decision's keep-mask (pruned entries exactly 0)."""
    values = point_values(summary_or_values)
    if decision is None:
        return values
    return {k: v * decision.masks[k].to(v.dtype) if k in decision.masks else v for k, v in values.items()}


def masked_module(network, summary_or_values, decision=None) -> nn.Sequential:
    """The masked network as a plain ``torch.nn.Sequential`` in inference mode."""
    return network.deterministic(masked_values(summary_or_values, decision)).eval()


def _module_names(network):
    """Site -> parameter name inside ``network.deterministic(...)``."""
    offset = 1 if network.input_shape is not None else 0
    out = {}
    for i, (name, layer) in enumerate(network.layers.items()):
        for p in layer.priors():
            out[f"{name}.{p}"] = f"{i + offset}.{p}"
    return out


@torch.no_grad()
def masked_predictive(network, summary, decision=None, x=None, num_samples=10, generator=None):
    r"""Outputs ``(S, B, ...)`` of the masked posterior predictive.

    Each draw takes every parameter from its Gaussian marginal in the summary,
    :math:`w = m \odot (\mu + \sigma\varepsilon)`, :math:`\varepsilon \sim N(0, I)`, so pruned
    parameters are exactly 0 (the reduced posterior of BMR for a point-mass reduced prior) and
    kept ones follow the fitted posterior. ``decision=None`` gives the dense predictive of the
    summary.
    """
    module = network.deterministic(summary.locs()).eval()
    names = _module_names(network)
    outputs = []
    for _ in range(num_samples):
        params = {}
        for k, s in summary.items():
            sd = s.precision.rsqrt().nan_to_num(0.0)
            eps = torch.randn(s.loc.shape, generator=generator, dtype=s.loc.dtype)
            w = s.loc + sd * eps
            if decision is not None:
                w = w * decision.masks[k].to(w.dtype)
            params[names[k]] = w
        outputs.append(torch.func.functional_call(module, params, (x,)))
    return torch.stack(outputs)


# --------------------------------------------------------------------------- shapes


def layer_shapes(network):
    """``[(name, layer, in_shape, out_shape)]`` per example, in network order."""
    shape = network.input_shape
    if shape is None:
        first = next(iter(network.layers.values()))
        if not isinstance(first, Linear):
            raise ValueError("compact: a network without input_shape must start with a linear layer")
        shape = (first.in_features,)
    out = []
    for name, layer in network.layers.items():
        new = tuple(layer.out_shape(tuple(shape)))
        out.append((name, layer, tuple(shape), new))
        shape = new
    return out


def _spec_of(layer):
    """Spec entry (plain containers) of a stateless layer."""
    kind = getattr(layer, "spec_name", None)
    options = dict(getattr(layer, "options", {}))
    return {"type": kind, **options}


# --------------------------------------------------------------------------- the plan


@dataclass
class CompactPlan:
    """What :func:`compact` builds: a spec (layer list with sizes), its parameters, and what was
    deleted. ``kept_units``: layer -> original indices of the kept units; ``folded``: layers
    whose bias received constant contributions of deleted units."""

    spec: dict
    params: dict  # parameter name in the built module -> tensor
    kept_units: dict = field(default_factory=dict)
    total_units: dict = field(default_factory=dict)
    dead: dict = field(default_factory=dict)
    constant: dict = field(default_factory=dict)
    folded: list = field(default_factory=list)
    #: self-compacting layers: layer -> what its hook removed (``heads_total``, ``heads_kept``,
    #: ``heads_removed``, ``units``: MLP -> {total, kept, removed, ...})
    blocks: dict = field(default_factory=dict)

    @property
    def units_removed(self):
        return {k: self.total_units[k] - len(v) for k, v in self.kept_units.items()}

    @property
    def heads_removed(self):
        """layer -> number of attention heads removed."""
        return {k: len(v["heads_removed"]) for k, v in self.blocks.items() if "heads_removed" in v}


class _P:
    """Mutable state of one parametric layer during planning."""

    def __init__(self, name, layer, w, m, b, mb):
        self.name, self.layer = name, layer
        self.w, self.m, self.b, self.mb = w, m, b, mb
        self.keep = torch.arange(w.shape[0])
        self.conv = isinstance(layer, Conv2d)

    def delete_units(self, idx):
        keep = torch.ones(self.w.shape[0], dtype=torch.bool)
        keep[idx] = False
        self.w, self.m = self.w[keep], self.m[keep]
        if self.b is not None:
            self.b, self.mb = self.b[keep], self.mb[keep]
        self.keep = self.keep[keep]


class _Link:
    """What lies between parametric layers A and B: the stateless modules and the column map."""

    def __init__(self, a, b, between, a_out_shape, b_in_shape):
        self.a, self.b, self.between = a, b, between
        kinds = [getattr(layer, "spec_name", None) for layer in between]
        # linear -> linear, conv -> conv, conv -> (flatten) -> linear; a linear layer's units are
        # its last (only) output dimension
        self.transparent = (all(k in _TRANSPARENT for k in kinds) and not (b.conv and not a.conv)
                            and (a.conv or len(a_out_shape) == 1))
        self.a_out_shape = a_out_shape
        channels = a_out_shape[0]
        if self.transparent and not b.conv:
            features = b_in_shape[-1]
            self.transparent = len(b_in_shape) == 1 and features % channels == 0
            self.block = features // channels if self.transparent else None
        else:
            self.block = None
        # only a transparent link is ever evaluated (constant units)
        self.modules = [layer.deterministic({}).eval() for layer in between] if self.transparent else []

    # B's weight viewed as (out, units of A, rest...)
    def view(self, t):
        if self.b.conv:
            return t
        return t.reshape(t.shape[0], self.a.w.shape[0], self.block)

    def unview(self, t):
        return t if self.b.conv else t.reshape(t.shape[0], t.shape[1] * t.shape[2])

    def delete_columns(self, idx):
        keep = torch.ones(self.view(self.b.w).shape[1], dtype=torch.bool)
        keep[idx] = False
        self.b.w = self.unview(self.view(self.b.w)[:, keep])
        self.b.m = self.unview(self.view(self.b.m)[:, keep])

    def dead_units(self):
        m = self.view(self.b.m)
        used = m.sum(dim=[d for d in range(m.dim()) if d != 1]) > 0
        return torch.nonzero(~used).squeeze(1)

    @torch.no_grad()
    def constant_contributions(self, idx):
        """For constant units ``idx`` of A: (removable subset, contribution to B's bias)."""
        a = self.a
        pre = a.b * a.mb.to(a.b.dtype) if a.b is not None else torch.zeros(a.w.shape[0], dtype=a.w.dtype)
        if a.conv:
            c, h, w = self.a_out_shape
            z = pre.reshape(1, -1, 1, 1).expand(1, pre.shape[0], h, w).clone()
        else:
            z = pre.reshape(1, -1).clone()
        for module in self.modules:
            z = module(z)
        wb = self.view(self.b.w)
        n = wb.shape[1]
        if self.b.conv:
            z = z.reshape(1, n, *z.shape[2:])[0]  # (units, H, W)
            first = z[:, :1, :1]
            uniform = (z == first).flatten(1).all(1)
            zero = (z == 0).flatten(1).all(1)
            foldable = uniform & (self.b.layer.padding == 0)
            removable = [j for j in idx.tolist() if bool(zero[j]) or bool(foldable[j])]
            r = torch.tensor(removable, dtype=torch.long)
            contrib = (wb[:, r].flatten(2).sum(2) * first[r, 0, 0]).sum(1) if removable else None
        else:
            z = z.reshape(n, self.block)
            r = idx
            contrib = torch.einsum("oub,ub->o", wb[:, r], z[r])
            removable = idx.tolist()
        return removable, contrib


@torch.no_grad()
def compact_plan(network, summary_or_values, decision=None) -> CompactPlan:
    """Plan the compact network (see the module docstring); :func:`compact` builds it."""
    values = masked_values(summary_or_values, decision)
    masks = decision.masks if decision is not None else {}
    shapes = layer_shapes(network)
    plist, between, links = [], [], []
    prev_out = None
    for name, layer, in_shape, out_shape in shapes:
        if layer.priors() and hasattr(layer, "compact_entry"):
            between.append(layer)  # compacts itself; no chain runs through it
        elif layer.priors():
            if not isinstance(layer, (Linear, Conv2d)):
                raise ValueError(f"compact: layer {name!r} of type {type(layer).__name__} is not supported "
                                 "(linear and conv2d layers, with activations, dropout, pooling, flatten, and "
                                 "layers with a compact_entry hook)")
            w = values[f"{name}.weight"].detach().clone()
            m = masks.get(f"{name}.weight", torch.ones_like(w, dtype=torch.bool)).clone()
            b = mb = None
            if layer.has_bias:
                b = values[f"{name}.bias"].detach().clone()
                mb = masks.get(f"{name}.bias", torch.ones_like(b, dtype=torch.bool)).clone()
            p = _P(name, layer, w, m, b, mb)
            if plist:
                links.append(_Link(plist[-1], p, between, prev_out, in_shape))
            plist.append(p)
            between = []
            prev_out = out_shape
        else:
            between.append(layer)  # a link through anything but _TRANSPARENT layers is left alone
    dead = {p.name: 0 for p in plist}
    constant = {p.name: 0 for p in plist}
    folded = set()
    changed = True
    while changed:
        changed = False
        for link in links:  # forward: units that do not depend on the input
            if not link.transparent:
                continue
            a = link.a
            idx = torch.nonzero(~a.m.flatten(1).any(1)).squeeze(1)
            if idx.numel() == 0:
                continue
            if a.conv and idx.numel() == a.w.shape[0]:
                idx = idx[1:]  # torch has no conv with zero out-channels: keep one
            if idx.numel() == 0:
                continue
            removable, contrib = link.constant_contributions(idx)
            if not removable:
                continue
            if contrib is not None and bool((contrib != 0).any()):
                b = link.b
                if b.b is None:
                    b.b = torch.zeros(b.w.shape[0], dtype=b.w.dtype)
                    b.mb = torch.ones(b.w.shape[0], dtype=torch.bool)
                b.b = (b.b * b.mb.to(b.b.dtype)) + contrib
                b.mb = torch.ones_like(b.mb)
                folded.add(b.name)
            r = torch.tensor(removable, dtype=torch.long)
            link.delete_columns(r)
            a.delete_units(r)
            constant[a.name] += len(removable)
            changed = True
        for link in reversed(links):  # backward: units nothing reads
            if not link.transparent:
                continue
            idx = link.dead_units()
            if link.a.conv and idx.numel() == link.a.w.shape[0]:
                idx = idx[1:]
            if idx.numel() == 0:
                continue
            link.delete_columns(idx)
            link.a.delete_units(idx)
            dead[link.a.name] += idx.numel()
            changed = True

    # the spec and the parameters of the built module
    spec_layers, params, blocks, kept_units, total_units = [], {}, {}, {}, {}
    offset = 1 if network.input_shape is not None else 0
    by_name = {p.name: p for p in plist}
    for i, (name, layer, in_shape, out_shape) in enumerate(shapes):
        if name in by_name:
            p = by_name[name]
            entry = {"type": "conv2d" if p.conv else "linear", "name": name,
                     "in": int(p.w.shape[1]), "out": int(p.w.shape[0]), "bias": p.b is not None}
            if p.conv:
                entry.update({"kernel_size": list(p.w.shape[2:]), "stride": layer.stride, "padding": layer.padding})
            spec_layers.append(entry)
            params[f"{i + offset}.weight"] = (p.w * p.m.to(p.w.dtype)).contiguous()
            if p.b is not None:
                params[f"{i + offset}.bias"] = (p.b * p.mb.to(p.b.dtype)).contiguous()
        elif layer.priors():  # a layer with a compact_entry hook
            own = {p: values[f"{name}.{p}"].detach() for p in layer.priors()}
            own_masks = {p: masks[f"{name}.{p}"] for p in layer.priors() if f"{name}.{p}" in masks}
            entry, own_params, info = layer.compact_entry(own, own_masks)
            spec_layers.append({**entry, "name": name})
            params.update({f"{i + offset}.{k}": v for k, v in own_params.items()})
            blocks[name] = {k: v for k, v in info.items() if k != "folded"}
            for sub, u in info.get("units", {}).items():
                kept_units[f"{name}.{sub}"], total_units[f"{name}.{sub}"] = u["kept"], u["total"]
                dead[f"{name}.{sub}"], constant[f"{name}.{sub}"] = u["unread"], u["constant"]
            folded.update(f"{name}.{f}" for f in info.get("folded", ()))
        else:
            entry = _spec_of(layer)
            entry["name"] = name
            spec_layers.append(entry)
    spec = {"format": 1, "input_shape": list(network.input_shape) if network.input_shape is not None else None,
            "layers": spec_layers}
    return CompactPlan(spec, params, {**{p.name: p.keep.tolist() for p in plist}, **kept_units},
                       {**{p.name: int(values[f"{p.name}.weight"].shape[0]) for p in plist}, **total_units},
                       dead, constant, sorted(folded), blocks)


def build_module(spec: dict) -> nn.Sequential:
    """A plain ``torch.nn.Sequential`` from a compact spec (parameters uninitialised)."""
    if not isinstance(spec, dict) or spec.get("format") != 1 or not isinstance(spec.get("layers"), list):
        raise ValueError(f"spec: not a compact network spec (format 1 with a layer list), got {type(spec).__name__}")
    modules = []
    if spec.get("input_shape"):
        modules.append(nn.Unflatten(1, tuple(spec["input_shape"])))
    for i, entry in enumerate(spec["layers"]):
        kind = entry.get("type")
        if kind == "linear":
            with warnings.catch_warnings():  # a layer whose units were all removed has no weights
                warnings.filterwarnings("ignore", "Initializing zero-element tensors")
                modules.append(nn.Linear(entry["in"], entry["out"], bias=entry["bias"]))
        elif kind == "conv2d":
            modules.append(nn.Conv2d(entry["in"], entry["out"], tuple(entry["kernel_size"]), entry["stride"],
                                     entry["padding"], bias=entry["bias"]))
        elif kind == "relu":
            modules.append(nn.ReLU())
        elif kind == "tanh":
            modules.append(nn.Tanh())
        elif kind == "sigmoid":
            modules.append(nn.Sigmoid())
        elif kind == "gelu":
            modules.append(nn.GELU())
        elif kind == "flatten":
            modules.append(nn.Flatten())
        elif kind == "dropout":
            modules.append(nn.Dropout(entry.get("p", 0.5)))
        elif kind in ("maxpool2d", "avgpool2d"):
            cls = nn.MaxPool2d if kind == "maxpool2d" else nn.AvgPool2d
            modules.append(cls(entry["kernel_size"], entry.get("stride"), entry.get("padding", 0)))
        elif hasattr(LAYERS.get(kind), "build_compact"):  # a layer that compacts itself
            modules.append(LAYERS[kind].build_compact(entry))
        elif isinstance(LAYERS.get(kind), type) and issubclass(LAYERS[kind], _Stateless):
            options = {k: v for k, v in entry.items() if k not in ("type", "name")}
            modules.append(LAYERS[kind](**options).deterministic({}))
        else:
            raise ValueError(f"spec.layers[{i}].type: unsupported layer type {kind!r}")
    return nn.Sequential(*modules)


@torch.no_grad()
def compact(network, summary_or_values, decision=None) -> nn.Sequential:
    """The deterministic compact network (inference mode) of a decision.

    ``summary_or_values``: a posterior summary (its means are used) or ``site -> tensor``. The
    result predicts as :func:`masked_module` does (up to float rounding from the folded biases)
    and carries ``.spec`` (layer list with sizes, see :func:`build_module`) and ``.plan``
    (:class:`CompactPlan`).
    """
    plan = compact_plan(network, summary_or_values, decision)
    module = build_module(plan.spec)
    ref = next(iter(plan.params.values()))
    module.to(dtype=ref.dtype, device=ref.device)
    module.load_state_dict(plan.params, strict=True)
    module.eval()
    module.spec = plan.spec
    module.plan = plan
    return module
