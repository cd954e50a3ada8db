r"""Applying a decision: the masked network, its predictive, and the compact network.

* :func:`masked_values` / :func:`masked_module`: the network with every parameter at its
  posterior mean (or given values) times the decision's masks, as a plain ``torch.nn`` module
  (:meth:`~pyro_sparse.network.BayesianNetwork.deterministic`). This is *the masked network*:
  the reference every reduced network must reproduce.
* :func:`masked_predictive`: the masked posterior predictive, drawing each parameter from its
  Gaussian marginal in the summary, :math:`w = m \odot (\mu + \sigma\varepsilon)`.
* :func:`compact`: a deterministic ``torch.nn.Sequential`` in which removed units, channels,
  recurrent neurons and gates, attention heads and MLP units are physically deleted, predicting
  as the masked network does; for a converted module (:mod:`pyro_sparse.convert`) a module of the
  user's own class, masked, with its ``nn.Sequential`` unit chains physically smaller.
  :func:`compact_plan` runs the unit-chain algorithm of :mod:`pyro_sparse.compaction_protocol` over the
  layers' own compaction objects (it names no layer type); :func:`build_module` rebuilds a
  compact network from its spec.
"""

from __future__ import annotations

import warnings
from collections import OrderedDict
from dataclasses import dataclass, field

import torch
from torch import nn

from .compaction_protocol import as_index
from .layers import Reshape, _Parametric, site_name
from .registry import CONVERSIONS, LAYERS
from .storage import CompactSequential

#: layers whose compaction with masks only changes the non-zero count (nothing deleted on its own)
_WEIGHT_LAYERS = (_Parametric,)

__all__ = ["masked_values", "masked_module", "masked_predictive", "compact", "compact_plan", "CompactPlan",
           "build_module", "layer_shapes", "FORMAT", "export", "add_prune_masks", "replace_chains", "apply_storage",
           "CompactSequential", "align_pattern"]

#: version of the compact spec (format 2: children named like the network's layers; format 3: a Linear/Conv
#: entry records its storage and kernels, :mod:`pyro_sparse.storage`)
FORMAT = 3


# --------------------------------------------------------------------------- masked network


def point_values(summary_or_values, decision=None) -> dict:
    """Site -> point value: the summary's posterior means, or a given dict of tensors; where the
    decision moved the kept weights (a compensated reduction's ``values``), those."""
    if hasattr(summary_or_values, "locs"):
        values = summary_or_values.locs()
    else:
        values = dict(summary_or_values)
    if hasattr(decision, "masks"):  # a Decision (a dict of masks moves nothing)
        values.update(decision.values)
    return values


def masked_values(summary_or_values, decision=None) -> dict:
    """Site -> point value (:func:`point_values`) times the decision's keep-mask (pruned entries
    exactly 0); ``decision`` is a :class:`~.rules.Decision` or a dict of masks."""
    values = point_values(summary_or_values, decision)
    masks = _masks(decision)
    return {k: v * masks[k].to(v.dtype) if k in masks else v for k, v in values.items()}


def _masks(decision) -> dict:
    if decision is None:
        return {}
    return decision.masks if hasattr(decision, "masks") else dict(decision)


def masked_module(network, summary_or_values, decision=None) -> nn.Sequential:
    """The masked network as a plain ``torch.nn.Sequential`` in inference mode."""
    return network.deterministic(masked_values(summary_or_values, decision)).eval()


def export(network, summary_or_values, decision=None, prune_masks: bool = False) -> nn.Module:
    """The reduced network as a plain module of the user's kind: for a converted module
    (:func:`~pyro_sparse.convert.bayesian`) a copy of the user's module, of its own class, whose
    ``state_dict`` loads into a fresh instance of that class; for a spec-built network its
    ``nn.Sequential`` twin. Parameters are the point values (posterior means) times the
    decision's masks, so pruned weights are exactly 0 and the outputs are the masked network's.

    ``prune_masks=True`` attaches ``torch.nn.utils.prune`` masks (:func:`add_prune_masks`) so
    that further training keeps the pruned weights at 0 (its ``state_dict`` then holds
    ``weight_orig`` and ``weight_mask``; ``torch.nn.utils.prune.remove`` folds them back).

    Not the command ``pyro-sparse export``, which writes the *compact* network as a TorchScript
    or ONNX graph: that is :func:`pyro_sparse.deploy.export_graph` (``pyro_sparse.export_graph``)."""
    module = network.deterministic(masked_values(summary_or_values, decision))
    if prune_masks:
        add_prune_masks(module, _masks(decision))
    return module.eval()


def add_prune_masks(module: nn.Module, masks: dict) -> nn.Module:
    """Attach ``torch.nn.utils.prune`` masks (``custom_from_mask``) to every parameter named in
    ``masks`` (site names, which are the module's parameter names) that the mask prunes, in place.
    Sites that are not a parameter of ``module`` (a recurrent layer's summed bias) are skipped."""
    from torch.nn.utils import prune as torch_prune

    params = dict(module.named_parameters())
    for name, mask in masks.items():
        if name not in params or bool(mask.all()):
            continue
        owner, _, param = name.rpartition(".")
        torch_prune.custom_from_mask(module.get_submodule(owner) if owner else module, param,
                                     mask.to(dtype=torch.bool, device=params[name].device))
    return module


@torch.no_grad()
def masked_predictive(network, summary, decision=None, x=None, num_samples=10, generator=None):
    r"""Outputs ``(S, B, ...)`` of the masked posterior predictive.

    Each draw takes every parameter from its Gaussian marginal in the summary,
    :math:`w = m \odot (\mu + \sigma\varepsilon)`, :math:`\varepsilon \sim N(0, I)`, so pruned
    parameters are exactly 0 (the reduced posterior of BMR for a point-mass reduced prior) and
    kept ones follow the fitted posterior (centred at the reduced posterior mean where the
    decision moved them; their spread is the fitted marginal's). ``decision=None`` gives the dense predictive of the
    summary.
    """
    masks = _masks(decision)
    locs = point_values(summary, decision)
    outputs = []
    for _ in range(num_samples):
        values = {}
        for k, s in summary.items():
            sd = s.precision.rsqrt().nan_to_num(0.0)
            w = locs[k] + sd * torch.randn(s.loc.shape, generator=generator, dtype=s.loc.dtype).to(s.loc.device)
            values[k] = w * masks[k].to(w.dtype) if k in masks else w
        outputs.append(network.deterministic(values).eval()(x))
    return torch.stack(outputs)


# --------------------------------------------------------------------------- the plan


def layer_shapes(network, input_shape=None):
    """``[(name, layer, in_shape, out_shape)]`` per example, in network order. ``input_shape``:
    the per-example input shape where the network declares none (a network that starts with a
    linear layer needs neither)."""
    shape = network.input_shape or input_shape
    if shape is None:
        first = next(iter(network.layers.values()))
        size = getattr(first, "in_features", None)
        if size is None:
            raise ValueError("compact: the network has no input_shape and does not start with a linear layer; "
                             "give the per-example input shape (input_shape=...)")
        shape = (size,)
    out = []
    for name, layer in network.layers.items():
        new = tuple(layer.out_shape(tuple(shape)))
        out.append((name, layer, tuple(shape), new))
        shape = new
    return out


class _Link:
    """Producer ``a`` -> (parameter-free layers) -> consumer ``b``; unit ``j`` of ``a`` is the
    block of ``block`` input features ``j * block .. (j + 1) * block - 1`` of ``b``."""

    def __init__(self, a, b, between, block):
        self.a, self.b, self.block = a, b, block
        self.modules = [layer.deterministic({}).eval() for layer in between]

    def features(self, units):
        units = as_index(units)
        return (units[:, None] * self.block + torch.arange(self.block)).reshape(-1)

    @torch.no_grad()
    def constant_features(self, units, values):
        """The constant values ``(len(units) * block, P)`` that the consumer receives from
        constant units of the producer (run through the parameter-free layers between)."""
        a = self.a
        z = torch.zeros(a.out_shape, dtype=values.dtype, device=values.device)
        z.movedim(a.out_axis, 0)[as_index(units, z)] = values
        z = z.unsqueeze(0)
        for module in self.modules:
            z = module(z)
        z = z[0].movedim(self.b.in_axis, 0)  # (features of b, positions...)
        return z.reshape(z.shape[0], -1)[self.features(units)]

    def unread_units(self):
        read = self.b.read_features().reshape(-1, self.block).any(1)
        return torch.nonzero(~read).squeeze(1)

    def delete(self, units):
        self.b.delete_features(self.features(units))
        self.a.delete_units(units)


@dataclass
class CompactPlan:
    """What :func:`compact_plan` decided: the compact spec (layer list with sizes), its parameters (named
    ``<layer>.<param>``), and per layer what was removed (``layers``: name -> info with
    ``units``: sub-layer ('' for the layer itself) -> {total, kept, removed, constant, unread},
    and for attention ``heads_total``/``heads_kept``/``heads_removed``)."""

    spec: dict
    params: dict
    layers: dict = field(default_factory=dict)
    folded: list = field(default_factory=list)

    def units(self) -> dict:
        """``unit group -> info``: ``fc1``, ``block1.mlp.fc1``, ..."""
        return {(f"{name}.{sub}" if sub else name): u for name, info in self.layers.items()
                for sub, u in info.get("units", {}).items()}

    @property
    def units_removed(self) -> dict:
        return {k: u["removed"] for k, u in self.units().items()}

    @property
    def kept_units(self) -> dict:
        return {k: u["kept"] for k, u in self.units().items()}

    @property
    def total_units(self) -> dict:
        return {k: u["total"] for k, u in self.units().items()}

    @property
    def heads_removed(self) -> dict:
        return {k: len(v["heads_removed"]) for k, v in self.layers.items() if "heads_removed" in v}


def _own(d, layer, name):
    prefix = name + "."
    return {k[len(prefix):]: v for k, v in d.items() if k.startswith(prefix)}


@torch.no_grad()
def compact_plan(network, values: dict, masks: dict, input_shape=None) -> CompactPlan:
    """Plan the compact network of ``network`` at point ``values`` (site -> tensor) with keep
    ``masks`` (site -> bool tensor; missing: all kept); :func:`build_module` builds it.
    ``input_shape``: see :func:`layer_shapes`.

    A sequential network is one unit chain (its ``unit_chains()`` is ``[("", network)]``) and its
    compact network a layer list. Any other network (a converted module,
    :class:`~pyro_sparse.convert.BayesianModule`) keeps its own class: its compact network is its
    masked deterministic twin in which every unit chain (an ``nn.Sequential`` of converted
    Linear/Conv layers) is replaced by the compact chain (:func:`_module_plan`)."""
    chains = network.unit_chains(input_shape)
    if len(chains) == 1 and chains[0][0] == "" and chains[0][1] is network:
        return _chain_plan(network, values, masks, input_shape)
    return _module_plan(network, values, masks, chains)


def _chain_plan(network, values, masks, input_shape=None) -> CompactPlan:
    """The unit-chain algorithm over ``network.layers`` (see the module docstring)."""
    shapes = layer_shapes(network, input_shape)
    members, links = {}, []
    producer, route, between = None, None, []
    for name, layer, in_shape, out_shape in shapes:
        member = layer.compaction(name, _own(values, layer, name), _own(masks, layer, name), in_shape, out_shape)
        if member is None:  # parameter-free: it routes the producer's units, or ends the chain
            if route is not None:
                step = layer.route_units(in_shape, route[0])
                route = None if step is None else (step[0], route[1] * step[1])
            between.append(layer)
            continue
        members[name] = member
        if (producer is not None and route is not None and member.in_axis is not None
                and route[0] == member.in_axis and member.num_features() == producer.num_units() * route[1]):
            links.append(_Link(producer, member, between, route[1]))
        between = []
        producer, route = (member, (member.out_axis, 1)) if member.out_axis is not None else (None, None)

    changed = True
    while changed:
        changed = False
        for link in links:  # forward: units that do not depend on the input
            a, b = link.a, link.b
            idx, pre = a.constant_units()
            if idx.numel() == 0:
                continue
            values_in = link.constant_features(idx, pre).reshape(len(idx), link.block, -1)
            ok = b.foldable(values_in.reshape(len(idx) * link.block, -1)).reshape(len(idx), link.block).all(1)
            idx, values_in = idx[ok], values_in[ok]
            spare = a.num_units() - a.min_units
            idx, values_in = idx[:max(spare, 0)], values_in[:max(spare, 0)]
            if idx.numel() == 0:
                continue
            b.fold(link.features(idx), values_in.reshape(len(idx) * link.block, -1))
            link.delete(idx)
            a.constant += len(idx)
            changed = True
        for link in reversed(links):  # backward: units nothing reads
            a = link.a
            idx = a.removable_unread(link.unread_units())
            idx = idx[:max(a.num_units() - a.min_units, 0)]
            if idx.numel() == 0:
                continue
            link.delete(idx)
            a.dead += len(idx)
            changed = True

    entries, params, infos, folded = [], {}, {}, []
    for name, layer, _, _ in shapes:
        if name in members:
            entry, own, info = members[name].build()
            if members[name].folded:
                folded.append(name)
            folded.extend(f"{name}.{f}" for f in info.pop("folded", ()))
            infos[name] = info
            params.update({f"{name}.{k}": v for k, v in own.items()})
        else:
            entry = layer.compact_spec()
        entries.append({**entry, "name": name})
    spec = {"format": FORMAT, "input_shape": list(network.input_shape) if network.input_shape is not None else None,
            "layers": entries}
    return CompactPlan(spec, params, infos, sorted(folded))


def _strip(d, prefix):
    return {k[len(prefix):]: v for k, v in d.items() if k.startswith(prefix)} if prefix else dict(d)


def _module_plan(network, values, masks, chains) -> CompactPlan:
    """The compact plan of a converted module: each unit chain by :func:`_chain_plan` (its members'
    units physically deleted, its input features and outputs kept, so the compact chain fits the
    user's code), every other Bayesian layer at its masked values with nothing deleted (its
    counts and FLOPs from its own compaction object, units all kept)."""
    spec = {"format": FORMAT, "kind": "module", "source": network.source, "class": _class_path(network.template),
            "input_shape": list(network.input_shape) if network.input_shape is not None else None, "chains": {}}
    params, infos, folded, done = {}, {}, [], set()
    # a tied parameter (one site) is read by every module that holds it, under each one's name
    values, masks = network.tied_values(values), network.tied_values(masks)
    masked = masked_values(values, masks)
    for path, chain in chains:
        prefix = f"{path}." if path else ""
        plan = _chain_plan(chain, _strip(values, prefix), _strip(masks, prefix))
        members = list(plan.layers)
        spec["chains"][path] = {"layers": plan.spec["layers"], "members": members}
        params.update({prefix + k: v for k, v in plan.params.items()})
        infos.update({prefix + k: v for k, v in plan.layers.items()})
        folded.extend(prefix + f for f in plan.folded)
        done.update(prefix + m for m in members)
    shapes = network.layer_shapes()
    spec["modules"] = {}
    for path, layer in network.bayesian_layers():
        if path in done:
            continue
        names = [*layer.priors(), *layer.tied]
        own = {p: masked[site_name(path, p)] for p in names if site_name(path, p) in masked}
        own_masks = {p: masks[site_name(path, p)] for p in names if site_name(path, p) in masks}
        if path not in shapes:  # the forward never called it (its weight is only read directly)
            infos[path] = {"units": {}, "flops": 0, "flops_sparse": 0}
            params.update({site_name(path, p): v for p, v in own.items()})
            continue
        in_shape, out_shape = shapes[path]
        if hasattr(layer, "compact_module"):  # a converted LSTM/GRU: constant gates, unread neurons deleted
            entry, module, info = layer.compact_module(own, own_masks, in_shape, out_shape)
            spec["modules"][path] = entry
            infos[path] = info
            params.update({site_name(path, k): v for k, v in module.state_dict().items()})
            continue
        info = {"units": {}, "flops": 0, "flops_sparse": 0}
        try:
            dense = layer.compaction(path, own, {}, in_shape, out_shape).build()[2]
            sparse = layer.compaction(path, own, own_masks, in_shape, out_shape).build()[2]
            total = sum(u["total"] for u in dense.get("units", {}).values())
            info = {"units": {"": {"total": total, "kept": list(range(total)), "removed": 0, "constant": 0,
                                   "unread": 0}} if total else {},
                    "flops": dense.get("flops", 0),
                    "flops_sparse": sparse.get("flops_sparse", 0) if isinstance(layer, _WEIGHT_LAYERS)
                    else dense.get("flops_sparse", 0)}
        except (NotImplementedError, ValueError, RuntimeError):
            pass
        infos[path] = info
        params.update({site_name(path, p): v for p, v in own.items()})
    order = [path for path, _ in network.bayesian_layers()]
    infos = {k: infos[k] for k in order if k in infos}
    return CompactPlan(spec, params, infos, sorted(folded))


def _class_path(module) -> str:
    cls = type(module)
    return f"{cls.__module__}:{cls.__qualname__}"


def build_module_network(network, plan: CompactPlan, values: dict, masks: dict) -> nn.Module:
    """The compact module of a converted network: its masked deterministic twin (the user's class)
    with every unit chain's members rebuilt at their compact sizes, holding the plan's parameters."""
    module = network.deterministic(masked_values(values, masks))
    replace_chains(module, plan.spec)
    state = module.state_dict()
    for key, value in plan.params.items():
        if key in state:
            state[key] = value
        elif key.endswith(".weight") and f"{key}_values" in state:  # a member stored in CSR: its dense weight
            for suffix in ("_values", "_col", "_crow"):
                state.pop(key + suffix)
            state[key] = value
    ref = next((v for v in plan.params.values() if v.is_floating_point()), None)
    if ref is not None:
        module.to(device=ref.device)
    module.load_state_dict(state, strict=True)
    return module


def replace_chains(module: nn.Module, spec: dict) -> nn.Module:
    """Put the compact members of every unit chain of a compact module spec into ``module`` (an
    instance of the user's class), in place; their parameters are then loaded from a state dict.
    Children of a chain that are not members (activations, pooling, modules of the user's a chain
    cannot see through) stay as they are."""
    for path, chain in spec.get("chains", {}).items():
        seq = module.get_submodule(path) if path else module
        members = set(chain["members"])
        for entry in chain["layers"]:
            if entry["name"] in members:
                with warnings.catch_warnings():  # a layer whose units were all removed has no weights
                    warnings.filterwarnings("ignore", "Initializing zero-element tensors")
                    setattr(seq, entry["name"], LAYERS[entry["type"]].build_compact(entry))
    for path, entry in spec.get("modules", {}).items():  # converted recurrent layers
        parent, _, name = path.rpartition(".")
        setattr(module.get_submodule(parent) if parent else module, name,
                CONVERSIONS[entry["type"]].build_compact(entry))
    return module


def check_format(spec: dict):
    """ValueError unless ``spec`` is of this version's compact format :data:`FORMAT`."""
    found = spec.get("format")
    if found != FORMAT:
        why = (" (format 2 stored every kept matrix dense; format 3 records each layer's storage)"
               if found == 2 else "")
        raise ValueError(f"spec: compact format {found!r}; this version reads format {FORMAT}{why}: reduce the run "
                         "again to rebuild it")


#: the compact spec types whose weight storage :func:`apply_storage` decides
def _plan_entries(plan):
    """``(prefix, entry)`` for every layer entry of a compact plan's spec (module chains included)."""
    for entry in plan.spec.get("layers", []):
        yield "", entry
    for path, chain in plan.spec.get("chains", {}).items():
        for entry in chain["layers"]:
            yield (f"{path}." if path else ""), entry


@torch.no_grad()
def apply_storage(plan: CompactPlan, storage: str = "auto", pattern=None, values=None) -> CompactPlan:
    """Decide how each Linear / Conv layer of a compact plan stores its kept weights and computes
    with them (:func:`pyro_sparse.storage.decide`), in place: the spec entry of a layer that is not
    the plain torch layer gets ``storage`` (``csr`` or ``dense``; a Linear also ``kernels`` and
    ``switch_rows``), and ``plan.layers[name]["storage"]`` the record (density, bytes dense and
    CSR, the measured timings). The plan's ``params`` stay the dense compact tensors. ``values``
    (site -> the network's tensors) tells which layers compaction reshaped. ``pattern``
    (``"N:M"``, a decision's): each record says whether the compact weight still holds it along its
    input axis (``pattern_holds``): deleting unread or constant units removes input columns, which
    can shift the blocks."""
    from .reduction.scores import parse_pattern
    from .storage import decide, pattern_holds

    for prefix, entry in _plan_entries(plan):
        kind = entry.get("type")
        key = prefix + entry.get("name", "")
        weight = plan.params.get(f"{key}.weight")
        if weight is None or getattr(LAYERS.get(kind), "sparse_cls", None) is None:  # no CSR form: dense
            continue
        info = plan.layers.setdefault(key, {})
        original = (values or {}).get(f"{key}.weight")
        reshaped = original is not None and tuple(original.shape) != tuple(weight.shape)
        record = decide(kind, weight, plan.params.get(f"{key}.bias"), info.get("positions", 1), storage, reshaped)
        if pattern is not None:
            n, m = parse_pattern(pattern)
            record["pattern"], record["pattern_holds"] = f"{n}:{m}", pattern_holds(weight, n, m)
        info["storage"] = record
        for k in ("storage", "kernels", "switch_rows", "positions", "contiguous"):
            entry.pop(k, None)
        if record["layer"] == "compact":
            entry["storage"] = record["storage"]
            if "kernels" in record:
                entry["kernels"], entry["switch_rows"] = record["kernels"], record["switch_rows"]
                entry["positions"] = int(info.get("positions", 1))
                if plan.spec.get("kind") == "module":  # inside the user's code, which may view the output
                    entry["contiguous"] = True
    return plan


def build_module(spec: dict) -> nn.Sequential:
    """A :class:`CompactSequential` (a ``torch.nn.Sequential``) from a compact spec (parameters
    uninitialised): children named like the layers, each built by its class's
    ``build_compact(entry)``."""
    if not isinstance(spec, dict) or not isinstance(spec.get("layers"), list):
        raise ValueError(f"spec: not a compact network spec (a layer list), got {type(spec).__name__}")
    check_format(spec)
    modules = OrderedDict()
    if spec.get("input_shape"):
        modules["input"] = Reshape(spec["input_shape"])
    for i, entry in enumerate(spec["layers"]):
        kind = entry.get("type") if isinstance(entry, dict) else None
        if not isinstance(kind, str) or kind not in LAYERS:
            raise ValueError(f"spec.layers[{i}].type: unsupported layer type {kind!r}")
        with warnings.catch_warnings():  # a layer whose units were all removed has no weights
            warnings.filterwarnings("ignore", "Initializing zero-element tensors")
            modules[entry.get("name", str(i))] = LAYERS[kind].build_compact(entry)
    return CompactSequential(modules)


def _kept_columns(plan: CompactPlan, sites: dict) -> dict:
    """Site -> the original input features its layer keeps in the compact network (in order), for
    the weight sites of a chain whose producer is the Bayesian layer before it (the first keeps all
    its inputs); a site whose columns cannot be told from the plan is left out."""
    out, producer = {}, None
    for name, info in plan.layers.items():
        site = f"{name}.weight"
        units = info.get("units", {}).get("")
        if site in sites:
            shape, dim = sites[site]
            width = plan.params[site].shape[dim] if site in plan.params else None
            if producer is None:
                columns = torch.arange(shape[dim])
            else:
                kept, total = producer
                block = shape[dim] // total if total and shape[dim] % total == 0 else None
                columns = None if block is None else (
                    torch.as_tensor(kept, dtype=torch.long)[:, None] * block + torch.arange(block)).reshape(-1)
            if columns is not None and width == len(columns):
                out[site] = columns
        producer = (units["kept"], units["total"]) if units else None
    return out


@torch.no_grad()
def align_pattern(network, summary, decision, input_shape=None, rounds=8):
    """The decision with its N:M pattern (``reduce(..., pattern=...)``) laid over the input features
    each layer keeps in the compact network, instead of over all of them: compaction deletes units
    the pattern leaves unread, which removes input columns of the next layer and shifts its blocks.
    The rule's own cut (threshold or sparsity; none with a pattern alone) is kept, and the N of
    every M consecutive *kept* columns are chosen by the rule's ranking; this repeats until the
    kept columns stop changing (at most ``rounds`` times). Sites whose kept columns the plan does
    not tell (not in a Linear/Conv chain) keep the pattern over all their inputs. Returns a new
    :class:`~.rules.Decision` (the same one without a pattern)."""
    import dataclasses

    from .reduction.rules import rule as find_rule
    from .reduction.scores import mask_by_sparsity, mask_n_m, parse_pattern

    pattern = decision.options.get("pattern")
    if not pattern:
        return decision
    n, m = parse_pattern(pattern)
    r = find_rule(decision.method)
    values = point_values(summary)
    sites = {k: (tuple(v.shape), summary[k].axes["input"]) for k, v in decision.scores.items()
             if summary[k].role == "weight" and "input" in summary[k].axes and v.dim() > 1}
    keep_score = {k: r.keep_score(decision.scores[k]) for k in sites}
    threshold, sparsity = decision.options.get("threshold"), decision.options.get("sparsity")
    if sparsity is not None:
        ranked = {k: r.keep_score(v) for k, v in decision.scores.items() if summary[k].role == "weight"}
        base = mask_by_sparsity(ranked, sparsity, scope=decision.options.get("scope", "global"))
    elif threshold is not None:
        base = {k: r.keep(decision.scores[k], threshold) for k in sites}
    else:
        base = {k: torch.ones(shape, dtype=torch.bool) for k, (shape, _) in sites.items()}
    masks = dict(decision.masks)
    for _ in range(rounds):
        columns = _kept_columns(compact_plan(network, values, masks, input_shape), sites)
        new = dict(masks)
        for k, index in columns.items():
            dim = sites[k][1]
            chosen = torch.zeros(sites[k][0], dtype=torch.bool)
            chosen.index_copy_(dim, index, mask_n_m(keep_score[k].index_select(dim, index), n, m, dim))
            new[k] = base[k].to(chosen.device) & chosen
        if all(torch.equal(new[k], masks[k]) for k in columns):
            break
        masks = new
    output = list(decision.units)[-1] if decision.units else None  # the output layer keeps every unit
    units = dict(decision.units)
    for layer in decision.units:
        site = f"{layer}.weight"
        if site in sites and layer != output:
            dims = tuple(d for d in range(masks[site].dim()) if d != summary[site].axes["unit"])
            units[layer] = masks[site].any(dim=dims)
    return dataclasses.replace(decision, masks=masks, units=units,
                               options={**decision.options, "pattern_over": "kept inputs"})


@torch.no_grad()
def compact(network, summary_or_values, decision=None, input_shape=None, storage: str = "auto") -> nn.Sequential:
    """The deterministic compact network (inference mode) of a decision.

    ``summary_or_values``: a posterior summary (its means are used) or ``site -> tensor``;
    ``decision``: a :class:`~.rules.Decision` or a dict of keep-masks. The result predicts as
    :func:`masked_module` does (up to float rounding from the folded biases) and carries
    ``.spec`` (layer list with sizes, see :func:`build_module`) and ``.plan`` (:class:`CompactPlan`).
    ``input_shape``: the per-example input shape where the network declares none. ``storage``:
    how the kept weights of its Linear and Conv layers are stored and computed with
    (:func:`apply_storage`): ``auto`` (CSR where smaller, the CSR product where measured faster),
    ``csr`` (CSR where smaller, always the CSR product: no timing) or ``dense`` (plain layers).
    """
    values, masks = point_values(summary_or_values, decision), _masks(decision)
    plan = compact_plan(network, values, masks, input_shape)
    apply_storage(plan, storage, getattr(decision, "options", {}).get("pattern"), values)
    if plan.spec.get("kind") == "module":
        module = build_module_network(network, plan, values, masks)
    else:
        module = build_module(plan.spec)
        ref = next(t for t in plan.params.values() if t.is_floating_point())
        module.to(dtype=ref.dtype, device=ref.device)
        module.load_state_dict(plan.params, strict=True)
    module.eval()
    module.spec = plan.spec
    module.plan = plan
    return module
