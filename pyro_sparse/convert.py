r"""Your own PyTorch model as a sparse Bayesian one: :func:`bayesian` and :class:`BayesianModule`.

:func:`bayesian` takes any ``torch.nn.Module`` -- residual connections, branches, loops and
custom ``forward`` code included -- and returns a :class:`BayesianModule`: a copy of it in which
every ``nn.Linear``, ``nn.Conv1d``, ``nn.Conv2d``, ``nn.LSTM``, ``nn.GRU`` and ``nn.Embedding``
(and ``nn.LayerNorm`` where a prior is asked for) is replaced by its Bayesian counterpart
(:data:`pyro_sparse.registry.CONVERSIONS`), while the user's ``forward`` runs unchanged::

    net = pyro_sparse.bayesian(MyResNet(), prior={"type": "log_uniform"},
                               priors={"head.*": {"type": "gaussian", "scale": 0.1}},
                               deterministic=["stem.*"], likelihood="categorical")

* **Sites** are named after the module paths: the weight of ``self.layer1[0].conv1`` is the site
  ``layer1.0.conv1.weight``, exactly the name of that parameter in the user's ``state_dict``.
* **Priors** by fnmatch glob on the qualified name: the first pattern of ``priors`` that matches
  the parameter (``"*.bias"``, ``"head.weight"``) or else its module (``"layer1.*"``) gives the
  prior; otherwise ``prior`` (weights) or ``bias_prior`` (biases and layer-norm shifts). A
  layer norm is converted only when a pattern of ``priors`` matches it.
* **Deterministic** modules (``deterministic`` patterns, modules of other types, parameters
  registered directly on a module) keep their weights, frozen: they are constants of the model.
* **Start from the trained weights.** Every Bayesian layer starts at its module's current values
  (:meth:`~pyro_sparse.layers.Layer.start_at`): a guide set up on the network has its posterior
  means there, so at zero posterior variance it computes what the trained network computes
  (MOPED-style initialisation, Krishnan, Subedar & Tickoo 2020).

The result is a :class:`~pyro_sparse.network.PyroNetwork` like a spec-built
:class:`~pyro_sparse.network.BayesianNetwork`: ``model``, ``forward``, ``param_sites``,
``bayesian_layers``, ``deterministic(values)`` (a copy of the *user's* module, plain torch
layers holding ``values``), ``likelihood``, ``input_shape``, ``num_weights``; guides, trainers,
the ELBO core, reduction rules, reports and the ArviZ export read nothing else. Local
reparameterisation applies to every converted Linear/Conv layer.

A module that ``forward`` applies more than once per pass (a loop over one block, weight
sharing) samples its weights once per pass and reuses them, as one weight draw must serve every
application (:func:`~pyro_sparse.layers.scoped_params`); such layers draw real weight tensors,
not local reparameterisations. Which modules those are is found by one probe run of the
user's module (on the first batch, or at construction when ``input_shape`` is given), which
also records the per-example input shape of every submodule for compaction.

``forward`` must *call* the converted modules: code that reads a converted module's
``.weight`` directly (weight tying, ``F.linear(x, self.fc.weight)``) has no weight to read there,
and two modules that share one parameter tensor become two sites.

Training and evaluation mode. The modules left deterministic (batch norms, dropout) behave as the
user's module would: the converted network starts in training mode whatever mode the module was
in, :class:`~pyro_sparse.fitting.SVITrainer` fits in training mode (dropout on; a batch norm
normalises with the batch's statistics and updates its running ones), and predictions
(``sample_outputs``, ``point_outputs``), the deterministic twin, the exported and the compact
modules run in evaluation mode (dropout the identity, running statistics). The running
statistics are part of the network's :meth:`~BayesianModule.frozen_state`, which checkpoints
keep beside the guide.
"""

from __future__ import annotations

import copy
import fnmatch
import warnings
from collections import OrderedDict

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from . import layers as L
from .errors import PyroSparseWarning
from .evaluation import evaluation_mode
from .layers import Layer, param_scope, site_name
from .likelihoods import build_likelihood
from .network import PyroNetwork, check_input_shape
from .priors import Gaussian, build_prior
from .registry import CONVERSIONS

__all__ = ["bayesian", "BayesianModule", "conversion_for", "stateless_layer", "reshaping_inputs",
           "FrozenModulesWarning"]


class FrozenModulesWarning(PyroSparseWarning):
    """A converted module keeps parameters deterministic that no ``deterministic`` pattern named
    (the message lists them; ``net.frozen_parameters()`` has them all)."""


def conversion_for(module: nn.Module):
    """The Bayesian layer class that converts ``module`` (its exact type is one of the class's
    ``torch_types``; a subclass of ``nn.Linear`` may compute something else), or None."""
    for cls in CONVERSIONS.values():
        if type(module) in cls.torch_types:
            return cls
    return None


def _match(patterns, *names):
    """The value of the first pattern (in ``patterns``' order) that matches one of ``names`` (tried
    in order); ``(pattern, value)`` or None."""
    for name in names:
        for pattern, value in patterns.items():
            if fnmatch.fnmatchcase(name, pattern):
                return pattern, value
    return None


def _check_patterns(value, what):
    if value is None:
        return {}
    if isinstance(value, str):
        value = [value]
    if what == "priors":
        if not isinstance(value, dict) or not all(isinstance(k, str) and k for k in value):
            raise ValueError(f"priors: expected a mapping of module-name patterns to priors, got {value!r}")
        return dict(value)
    if not isinstance(value, (list, tuple)) or not all(isinstance(k, str) and k for k in value):
        raise ValueError(f"{what}: expected a list of module-name patterns, got {value!r}")
    return {k: True for k in value}


def bayesian(module: nn.Module, prior=None, priors=None, bias_prior=None, likelihood="categorical",
             deterministic=(), input_shape=None) -> "BayesianModule":
    """Turn ``module`` into a :class:`BayesianModule` (see the module docstring).

    Args:
        module: any ``torch.nn.Module`` (it is copied, not changed).
        prior: default prior of weights (a prior, its spec name or ``{type: ..., **options}``);
            default ``N(0, 1)``.
        priors: ``{pattern: prior}``; fnmatch globs on qualified parameter names
            (``"fc2.weight"``, ``"*.bias"``) or module names (``"layer1.*"``), first match wins.
        bias_prior: default prior of biases (and layer-norm shifts); default ``N(0, 1)``.
        likelihood: the observation model (``categorical``, ``bernoulli``, ``gaussian``, ... or a
            :class:`~pyro_sparse.likelihoods.Likelihood`).
        deterministic: module-name patterns left deterministic (with everything inside them).
        input_shape: per-example input shape; inputs are reshaped to it (flat vectors can feed a
            convolutional class), and the probe run happens at once on a zero input.
    """
    return BayesianModule(module, prior=prior, priors=priors, bias_prior=bias_prior, likelihood=likelihood,
                          deterministic=deterministic, input_shape=input_shape)


class BayesianModule(PyroNetwork):
    """A ``torch.nn.Module`` with Bayesian layers in place of its Linear/Conv/recurrent/embedding
    modules, run by its own ``forward`` (built by :func:`bayesian`).

    Attributes: ``module`` (the converted copy that runs), ``template`` (a plain copy of the
    user's module: the deterministic twins are copies of it), ``converted`` (path -> Bayesian
    layer), ``conversions`` (path -> what happened to each module with parameters: the Bayesian
    layer type, or why it stayed deterministic), ``source`` (``{"module": "pkg.mod:Class",
    "kwargs": {...}}`` where a spec named the class; what a compact file needs to rebuild it).
    """

    def __init__(self, module: nn.Module, prior=None, priors=None, bias_prior=None, likelihood="categorical",
                 deterministic=(), input_shape=None, source=None):
        super().__init__()
        if not isinstance(module, nn.Module):
            raise TypeError(f"bayesian: expected a torch.nn.Module, got {type(module).__name__}")
        if isinstance(module, PyroNetwork) or any(isinstance(m, Layer) for m in module.modules()):
            raise ValueError("bayesian: the module is already Bayesian (it holds pyro_sparse layers)")
        weight_prior = build_prior(prior if prior is not None else Gaussian())
        shift_prior = build_prior(bias_prior if bias_prior is not None else Gaussian())
        patterns = {k: build_prior(v) for k, v in _check_patterns(priors, "priors").items()}
        keep = _check_patterns(deterministic, "deterministic")
        self.likelihood = build_likelihood(likelihood)
        self.input_shape = check_input_shape(input_shape)
        self.source = dict(source) if source else None
        self.template = copy.deepcopy(module)
        for p in self.template.parameters():
            p.requires_grad_(False)
        self.module = copy.deepcopy(module)  # a deep copy keeps tied parameters tied
        self.conversions: dict[str, str] = OrderedDict()
        converted = OrderedDict()
        holders = _parameter_holders(self.module)  # id(parameter) -> [(module path, name)], tied ones twice
        first_site = {}  # id(parameter) -> (path, name) of the converted module that owns its site
        #: follower site -> owner site of every tied parameter (one site, the owner's)
        self.ties: dict[str, str] = OrderedDict()
        skip = ()  # paths whose descendants stay as they are
        self._asked_frozen = ()  # the deterministic patterns' modules
        for path, child in list(self.module.named_modules()):
            if not path and conversion_for(child) is None:  # the root converts only when it is one layer
                continue
            if any(path.startswith(p + ".") for p in skip) or (skip and skip[0] == "" and path):
                continue
            owns = any(True for _ in child.parameters(recurse=False))
            if _match(keep, path):
                skip += (path,)
                self._asked_frozen += (path,)
                if any(True for _ in child.parameters()):
                    self.conversions[path] = "deterministic (pattern)"
                continue
            cls = conversion_for(child)
            if cls is None:
                if owns:
                    self.conversions[path] = f"deterministic ({type(child).__name__} has no Bayesian counterpart)"
                continue
            if isinstance(child, nn.LayerNorm) and not self._asked(patterns, path, child):
                self.conversions[path] = "deterministic (layer norm without a prior in priors)"
                skip += (path,)
                continue
            layer = self._convert(cls, child, path, weight_prior, shift_prior, patterns)
            for name, p in child.named_parameters(recurse=False):
                owner = first_site.setdefault(id(p), (path, name))
                if owner != (path, name):
                    self._tie(layer, name, converted[owner[0]], owner)
            if path:
                _set_submodule(self.module, path, layer)
            else:  # a bare layer (an nn.Linear): its Bayesian counterpart is the whole module
                self.module = layer
            converted[path] = layer
            self.conversions[path] = type(layer).__name__
            skip += (path,)
        if not converted:
            raise ValueError(f"bayesian: {type(module).__name__} has no module to convert (types: "
                             f"{', '.join(t.__name__ for c in CONVERSIONS.values() for t in c.torch_types)}) outside "
                             "the deterministic patterns")
        self.converted = converted
        _check_ties(holders, first_site, converted)
        self._check_patterns(patterns, keep, module)
        for p in self.module.parameters():  # deterministic modules are constants of the model
            p.requires_grad_(False)
        # training mode, as a new torch module: what the network does no longer depends on the mode
        # the user's module was in (fitting trains, predictions and twins evaluate)
        self.train()
        self._probed = False
        self._shapes: dict[str, tuple] = {}
        self._report_frozen()
        if self.input_shape is not None:
            self.probe(torch.zeros(1, *self.input_shape))

    def _check_patterns(self, patterns, keep, module):
        """ValueError for a ``priors`` pattern that matches no converted module, parameter or site
        (it would change nothing: a typo, or a module that stays deterministic) and for a
        ``deterministic`` pattern that matches no module."""
        names = set(self.converted)
        names.update(site_name(path, p) for path in self.converted
                     for p, _ in module.get_submodule(path).named_parameters(recurse=False))
        names.update(site_name(path, p) for path, layer in self.converted.items() for p in layer.priors())
        for pattern in patterns:
            if not any(fnmatch.fnmatchcase(n, pattern) for n in names):
                raise ValueError(f"bayesian: priors pattern {pattern!r} matches no converted module, parameter or "
                                 "site, "
                                 f"so it would change nothing; converted: {', '.join(list(self.converted)[:8])}"
                                 f"{', ...' if len(self.converted) > 8 else ''} (sites are <module>.weight, "
                                 "<module>.bias, ...)")
        paths = [path for path, _ in module.named_modules() if path]
        for pattern in keep:
            if not any(fnmatch.fnmatchcase(path, pattern) for path in paths):
                raise ValueError(f"bayesian: deterministic pattern {pattern!r} matches no module of "
                                 f"{type(module).__name__} (modules: {', '.join(paths[:8])}"
                                 f"{', ...' if len(paths) > 8 else ''})")

    def _tie(self, layer, name, owner_layer, owner):
        """``layer.<name>`` is the same parameter as ``owner`` = (path, name) of an earlier converted
        module: one site, the owner's (:meth:`~pyro_sparse.layers.Layer.tie`)."""
        path, site = layer.site, site_name(*owner)
        if name not in layer.readable or owner[1] not in owner_layer.readable:
            raise ValueError(f"bayesian: {path}.{name} is the same parameter as {site}; tied parameters are "
                             "converted between the weights and biases of Linear, Conv, Embedding and LayerNorm "
                             f"modules, not a {type(layer).__name__}'s {name!r}; leave one of the modules in "
                             "deterministic (with the other)")
        try:
            layer.tie(name, owner_layer, owner[1])
        except ValueError as e:
            raise ValueError(f"bayesian: {e}") from None
        self.ties[site_name(path, name)] = site

    def tied_values(self, values: dict) -> dict:
        """``values`` (site -> tensor) with an entry for every tied parameter's follower name too
        (``out.weight`` holding ``emb.weight``'s value), as the modules that hold it read it."""
        out = dict(values)
        out.update({follower: values[owner] for follower, owner in self.ties.items() if owner in values})
        return out

    @staticmethod
    def _asked(patterns, path, module):
        return any(_match(patterns, site_name(path, p), path) for p, _ in module.named_parameters(recurse=False))

    @staticmethod
    def _convert(cls, child, path, weight_prior, shift_prior, patterns):
        """The Bayesian counterpart of ``child``: priors by the first pattern that matches the
        weight's (bias's) site name or else the module's path, else the defaults; then any
        pattern that matches a site of the counterpart by name (``lstm.weight_hh*``) overrides."""
        def chosen(param, default):
            found = _match(patterns, site_name(path, param), path)
            return found[1] if found else default

        is_norm = isinstance(child, nn.LayerNorm)
        uniform = {"weight": chosen("weight", None if is_norm else weight_prior), "bias": chosen("bias", shift_prior)}
        try:
            layer = cls.from_torch(child, uniform)
        except ValueError as e:
            raise ValueError(f"bayesian: module {path!r}: {e}") from None
        for param in layer.priors():
            if param in uniform:
                continue
            found = _match(patterns, site_name(path, param))
            if found is not None:
                layer.set_prior(param, found[1])
        for param, p in layer.priors().items():
            try:
                p.check_axes(param, layer.param_axes[param])
            except ValueError as e:
                raise ValueError(f"bayesian: module {path!r}: {e}") from None
        layer.site = path
        return layer

    # ------------------------------------------------------------------ structure
    def bayesian_layers(self):
        return list(self.converted.items())

    # ------------------------------------------------------------------ the probe
    @torch.no_grad()
    def probe(self, x):
        """Run the user's module once on ``x`` (the first example) with hooks: the Bayesian layers
        its ``forward`` applies more than once become ``shared`` (one weight draw per pass), and
        every submodule's per-example input shape is recorded (:meth:`unit_chains`). Sets
        ``input_shape`` where none was given."""
        x = self._reshape(x[:1])
        calls, shapes, outs, hooks = {}, {}, {}, []
        reads = _DirectReads({path: self.template.get_submodule(path) for path in self.converted})
        for path, sub in self.template.named_modules():
            def hook(mod, args, out, path=path):
                calls[path] = calls.get(path, 0) + 1
                reads.leave(path)
                out = out[0] if isinstance(out, tuple) else out
                if path not in shapes and args and torch.is_tensor(args[0]) and torch.is_tensor(out):
                    shapes[path], outs[path] = _per_example(mod, args[0]), _per_example(mod, out)
            hooks.append(sub.register_forward_pre_hook(lambda mod, args, path=path: reads.enter(path)))
            hooks.append(sub.register_forward_hook(hook))
        try:
            with evaluation_mode(self.template), reads, _no_fused_attention():
                self.template(x)
        finally:
            for h in hooks:
                h.remove()
        for path, names in reads.found.items():  # F.linear(h, self.emb.weight) in the user's forward
            layer = self.converted[path]
            bad = sorted(set(names) - set(layer.readable))
            if bad:
                raise ValueError(f"bayesian: the forward reads {path}.{bad[0]} directly (outside {path}'s own "
                                 f"forward), which the Bayesian {type(layer).__name__} cannot serve (it serves "
                                 f"{', '.join(layer.readable) or 'no parameter'}); leave {path} in deterministic")
        self.read_directly = {path: sorted(names) for path, names in reads.found.items()}
        tied = {site.rpartition(".")[0] for pair in self.ties.items() for site in pair}
        for path, layer in self.converted.items():
            layer.shared = calls.get(path, 0) > 1 or path in tied or path in self.read_directly
        # the layers in the order the forward pass first applies them (the output layer last), the
        # order of the sites in summaries and of "the last layer" of structured rules
        first = {path: i for i, path in enumerate(calls)}
        self.converted = OrderedDict(sorted(self.converted.items(), key=lambda kv: first.get(kv[0], len(first))))
        self._shapes, self._out_shapes, self._probed = shapes, outs, True

    def fixed_shape(self) -> set:
        """The converted modules compaction must not resize: those holding a tied parameter and
        those whose parameters the user's ``forward`` reads directly (code outside them expects
        their shapes). Compaction keeps them whole, masked."""
        tied = {site.rpartition(".")[0] for pair in self.ties.items() for site in pair}
        return tied | set(getattr(self, "read_directly", {}))

    def layer_shapes(self) -> dict:
        """Path -> (per-example input shape, output shape) of every Bayesian layer, as the probe saw
        them (a layer the forward pass never reached has none)."""
        if not self._probed:
            raise ValueError("the converted module has not run yet; call it once (or give input_shape)")
        return {path: (self._shapes[path], self._out_shapes[path]) for path in self.converted if path in self._shapes}

    # ------------------------------------------------------------------ model
    def forward(self, x):
        x = self._reshape(x)
        if not self._probed:
            self.probe(x)
        with _no_fused_attention():
            if L._SCOPES:  # a scope is open already (this network inside another)
                return self.module(x)
            with param_scope():
                return self.module(x)

    # ------------------------------------------------------------------ the deterministic twin
    def deterministic(self, params: dict[str, torch.Tensor]) -> nn.Module:
        """A copy of the user's module (its own class) whose converted modules hold ``params``
        (site -> tensor; missing sites keep the starting values) and whose other modules hold the
        network's :meth:`frozen_state` (a batch norm's running statistics as fitting left them).
        Its ``state_dict`` loads into a fresh instance of the user's class. It is in evaluation
        mode whatever mode the user's module was in (``.train()`` to train it). With an
        ``input_shape`` a forward pre-hook (:func:`reshaping_inputs`, not part of the state dict)
        reshapes its inputs to it, as the Bayesian network does."""
        twin = copy.deepcopy(self.template)
        for p in twin.parameters():
            p.requires_grad_(True)
        ref = next((v for v in params.values()), None)
        if ref is not None:
            twin.to(dtype=ref.dtype if ref.is_floating_point() else None, device=ref.device)
        twin.load_state_dict(self.module.state_dict(), strict=False)
        full = {**self.starting_values(), **params}
        for path, layer in self.converted.items():
            own = {p: full[site_name(path, p)] for p in layer.priors()}
            layer.write_torch(twin.get_submodule(path), own)
        return reshaping_inputs(twin, self.input_shape).eval()

    def frozen_parameters(self) -> dict:
        return {name: p.numel() for name, p in self.module.named_parameters()}

    def _report_frozen(self):
        """A :class:`FrozenModulesWarning` naming the modules with parameters that stay
        deterministic without a ``deterministic`` pattern asking for it (a batch norm, a module of
        a type without a Bayesian counterpart, a parameter registered directly on a module)."""
        groups = OrderedDict()
        for name, n in self.frozen_parameters().items():
            if any(name.startswith(p + ".") for p in self._asked_frozen):
                continue
            path, _, param = name.rpartition(".")
            owner = self.module.get_submodule(path) if path else self.module
            if path in self.conversions:
                key = f"{path} ({type(owner).__name__}"
            else:  # a parameter registered directly on a module
                key = f"{name} (a parameter of {type(owner).__name__}"
            groups[key] = groups.get(key, 0) + n
        if groups:
            total = sum(groups.values())
            listed = ", ".join(f"{k}, {n} parameters)" for k, n in list(groups.items())[:6])
            more = f" and {len(groups) - 6} more" if len(groups) > 6 else ""
            warnings.warn(f"bayesian: these stay deterministic (frozen at their values, not sparsified, counted apart "
                          f"from the weights in sparsity figures): {listed}{more}; {total} frozen parameters in all "
                          "(name them in deterministic= to silence this)", FrozenModulesWarning, stacklevel=4)

    def frozen_state(self) -> dict:
        """The ``state_dict`` of the modules left deterministic (their frozen parameters and their
        buffers, such as a batch norm's running statistics, which fitting in training mode updates)."""
        return {k: v.detach().clone() for k, v in self.module.state_dict().items()}

    def load_frozen_state(self, state: dict):
        keys = set(self.module.state_dict())
        unknown, missing = sorted(set(state) - keys), sorted(keys - set(state))
        if unknown or missing:
            raise ValueError(f"the deterministic state does not fit this module: "
                             f"{'unexpected ' + ', '.join(unknown[:3]) if unknown else ''}"
                             f"{'; ' if unknown and missing else ''}"
                             f"{'missing ' + ', '.join(missing[:3]) if missing else ''}")
        own = self.module.state_dict()
        for k, v in state.items():
            if tuple(v.shape) != tuple(own[k].shape):
                raise ValueError(f"the deterministic state does not fit this module: {k} has shape {list(v.shape)}, "
                                 f"the module's {list(own[k].shape)}")
        self.module.load_state_dict(state, strict=True)

    def twin_frozen_state(self, twin: nn.Module) -> dict:
        state = twin.state_dict()
        return {k: state[k].detach().clone() for k in self.module.state_dict()}

    def twin_values(self, twin: nn.Module) -> dict:
        """Site -> value read off a copy of the user's module (e.g. after training it): each
        converted module's parameters in the counterpart's terms (``torch_values``)."""
        out = {}
        for path, layer in self.converted.items():
            values = layer.torch_values(twin.get_submodule(path))
            out.update({site_name(path, k): v.detach().clone() for k, v in values.items()})
        return out

    def state_dict_of(self, params: dict) -> dict:
        """The ``state_dict`` of the user's class holding ``params``: :meth:`deterministic`'s."""
        return self.deterministic(params).state_dict()

    # ------------------------------------------------------------------ compaction
    def unit_chains(self, input_shape=None):
        """The ``nn.Sequential`` submodules of the user's module that hold at least one converted
        Linear/Conv layer, as chains of layers for compaction. Parameter-free torch modules are
        represented by the library's (``stateless_layer``) or, where it has none, by an opaque
        layer that ends a chain; a chain keeps its input features and its outputs, so the compact
        chain fits in the user's code. Needs the probe's shapes (the first batch ran, or
        ``input_shape`` was given)."""
        if not self._probed:
            shape = self.input_shape or input_shape
            if shape is None:
                raise ValueError("compact: the converted module has not run yet and has no input_shape; "
                                 "give input_shape=... (the per-example input shape)")
            self.probe(torch.zeros(1, *shape))
        chains = []
        fixed = self.fixed_shape()
        for path, seq in self.module.named_modules():
            if not isinstance(seq, nn.Sequential) or path not in self._shapes:
                continue
            members = OrderedDict()
            for name, child in seq.named_children():
                full = f"{path}.{name}" if path else name
                if isinstance(child, (L.Linear, L.ConvNd)) and full not in fixed:
                    members[name] = child
                else:
                    members[name] = stateless_layer(child, self.template.get_submodule(full))
            if sum(isinstance(m, (L.Linear, L.ConvNd)) for m in members.values()) >= 1:
                chains.append((path, _Chain(members, self._shapes[path])))
        return chains


def _parameter_holders(module: nn.Module) -> dict:
    """``id(parameter) -> [(module path, name), ...]`` over every module (a tied parameter is
    listed once per module that registers it)."""
    holders = {}
    for path, sub in module.named_modules(remove_duplicate=False):
        for name, p in sub._parameters.items():
            if p is not None and (path, name) not in holders.setdefault(id(p), []):
                holders[id(p)].append((path, name))
    return holders


def _check_ties(holders, first_site, converted):
    """A parameter held by a converted module and by a module that stays deterministic (or
    registered directly on a module) would be a random variable in one place and a constant in
    the other: ValueError naming both."""
    for pid, places in holders.items():
        if len(places) < 2 or pid not in first_site:
            continue
        frozen = [f"{p}.{n}" if p else n for p, n in places if p not in converted]
        if frozen:
            raise ValueError("bayesian: {}.{} is the same parameter as {}, which stays deterministic; a tied parameter "
                             "must be Bayesian in every module that holds it (convert both, or leave both in "
                             "deterministic)".format(*first_site[pid], frozen[0]))


class _DirectReads(TorchFunctionMode):
    """Records the parameters of converted modules that a torch function receives outside those
    modules' own ``forward`` (``F.linear(h, self.emb.weight)`` in the user's code): a probe run
    under this mode says which converted modules the ``forward`` reads directly."""

    def __init__(self, modules: dict):
        super().__init__()
        self.owner = {id(p): (path, name) for path, m in modules.items()
                      for name, p in m.named_parameters(recurse=False)}
        self.paths = {}  # id(parameter) -> every converted path holding it (tied ones: several)
        for path, m in modules.items():
            for p in m.parameters(recurse=False):
                self.paths.setdefault(id(p), set()).add(path)
        self.active, self.found = [], {}

    def enter(self, path):
        self.active.append(path)

    def leave(self, path):
        for i in range(len(self.active) - 1, -1, -1):  # the innermost call of that module
            if self.active[i] == path:
                del self.active[i]
                break

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        for t in _tensors((args, kwargs)):
            if id(t) in self.owner and not (self.paths[id(t)] & set(self.active)):
                path, name = self.owner[id(t)]
                self.found.setdefault(path, set()).add(name)
        return func(*args, **kwargs)


def _tensors(obj):
    """The tensors in nested tuples, lists and dicts (a torch function's arguments)."""
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (tuple, list)):
        for item in obj:
            yield from _tensors(item)
    elif isinstance(obj, dict):
        for item in obj.values():
            yield from _tensors(item)


class _ReshapeInputs:
    """Forward pre-hook: the first argument reshaped to ``(batch, *shape)``."""

    def __init__(self, shape):
        self.shape = tuple(shape)

    def __call__(self, module, args):
        x = args[0]
        if tuple(x.shape[1:]) != self.shape:
            x = x.reshape(x.shape[0], *self.shape)
        return (x, *args[1:])


def reshaping_inputs(module: nn.Module, input_shape) -> nn.Module:
    """``module`` with a forward pre-hook that reshapes its input to ``(batch, *input_shape)``
    (nothing for ``input_shape`` None); returns ``module``."""
    if input_shape is not None:
        module.register_forward_pre_hook(_ReshapeInputs(input_shape))
    return module


def _per_example(module, t):
    """The per-example shape of a module's input or output (time-first recurrent modules and
    attention carry the batch on axis 1)."""
    if isinstance(module, (nn.LSTM, nn.GRU, nn.MultiheadAttention)) and not module.batch_first and t.dim() == 3:
        return (t.shape[0], *t.shape[2:])
    return tuple(t.shape[1:])


class _no_fused_attention:
    """``torch.backends.mha`` fast path off within the block: ``nn.TransformerEncoderLayer`` in
    evaluation mode would otherwise read its attention's ``in_proj_weight`` and its linear layers'
    weights itself and run a fused kernel, instead of calling those modules (the converted ones
    compute what the Bayesian network samples; the probe must see every call)."""

    def __enter__(self):
        self.enabled = torch.backends.mha.get_fastpath_enabled()
        if self.enabled:
            torch.backends.mha.set_fastpath_enabled(False)
        return self

    def __exit__(self, *exc):
        if self.enabled:
            torch.backends.mha.set_fastpath_enabled(True)
        return False


class _Chain:
    """A sequential run of layers (name -> layer) with its per-example input shape."""

    def __init__(self, layers, input_shape):
        self.layers, self.input_shape = layers, tuple(input_shape)


class _Opaque(L._Stateless):
    """A module of the user's a unit chain cannot see through (no units routed): it ends the
    chain and stays as it is in the compact network."""

    spec_name = "opaque"
    routes = None

    def __init__(self, module):
        Layer.__init__(self)
        self.options = {}
        self.fn = module

    def forward(self, x):
        return self.fn(x)

    def deterministic(self, params):
        return self.fn

    def out_shape(self, in_shape):
        with torch.no_grad(), evaluation_mode(self.fn):  # a batch norm: one example, statistics untouched
            return tuple(self.fn(torch.zeros(1, *in_shape)).shape[1:])

    def compact_spec(self):
        return {"type": "opaque"}


def stateless_layer(module: nn.Module, original: nn.Module | None = None) -> Layer:
    """The library's parameter-free layer that computes what ``module`` does, for compaction
    (ReLU, Tanh, Sigmoid, GELU, Flatten, Dropout, MaxPool2d, AvgPool2d with square options), or an
    opaque stand-in that ends a unit chain."""
    kind = type(module)
    simple = {nn.ReLU: L.ReLU, nn.Tanh: L.Tanh, nn.Sigmoid: L.Sigmoid}
    if kind in simple:
        return simple[kind]()
    if kind is nn.GELU and module.approximate == "none":
        return L.GELU()
    if kind is nn.Flatten and module.start_dim == 1 and module.end_dim == -1:
        return L.Flatten()
    if kind is nn.Dropout:
        return L.Dropout(module.p)
    if kind in (nn.MaxPool2d, nn.AvgPool2d):
        opts = [module.kernel_size, module.stride, module.padding]
        plain = all(isinstance(v, int) for v in opts) and not module.ceil_mode
        if kind is nn.MaxPool2d:
            plain = plain and module.dilation == 1 and not module.return_indices
        else:
            plain = plain and module.count_include_pad and module.divisor_override is None
        if plain:
            return (L.MaxPool2d if kind is nn.MaxPool2d else L.AvgPool2d)(*opts)
    return _Opaque(original if original is not None else module)


def _set_submodule(root: nn.Module, path: str, module: nn.Module):
    parent, _, name = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, name, module)
