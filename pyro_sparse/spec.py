"""Declarative model specs (``models/*.yaml``): architecture + priors + likelihood.

A spec is a mapping::

    name: mlp_gaussian
    input_shape: auto          # auto (the data's feature shape), image, or a list like [1, 8, 8]
    prior: {type: gaussian, scale: 1.0}       # default weight prior for every layer
    bias_prior: {type: gaussian, scale: 1.0}  # default bias prior
    layers:
      - {type: linear, in: auto, out: 300}
      - {type: relu}
      - {type: linear, out: auto, prior: {type: gaussian, scale: 0.5}}
    likelihood: {type: categorical}
    recipe: ../inference/svi_meanfield.yaml   # the recipe that fits it (relative to this file)

Instead of a layer list a spec may name a PyTorch class of the user's (``module``), which
:func:`~pyro_sparse.convert.bayesian` converts (its ``forward`` runs unchanged)::

    name: resnet_digits
    module: examples.resnet_digits:ResidualCNN   # package.module:ClassName, importable
    kwargs: {channels: 16}                        # its constructor's arguments
    input_shape: image                            # inputs are reshaped to it
    prior: {type: log_uniform}                    # default weight prior
    priors: {"fc.*": {type: gaussian}}            # by fnmatch pattern on site / module names
    deterministic: ["stem.*"]                     # modules left deterministic (frozen)
    init: resnet_digits_map.pt                    # a state_dict of the class, or a run directory
    likelihood: {type: categorical}

Importing the class runs its code, so building such a spec needs permission
(:func:`pyro_sparse.usercode.allow_code`; ``--allow-code`` on the command line). ``init`` (both
kinds of spec) starts the network elsewhere than its fresh initialisation: a ``state_dict``
file (``.pt``; of the user's class, or keyed by site names for a layer list), or a run
directory whose posterior means (a MAP run's weights) become the starting values.

It is checked in two passes, both before anything trains: :func:`parse_model_spec` checks keys,
types, layer/prior names and values; :func:`build_network` resolves ``auto`` sizes from the
data and checks that sizes chain. Every error names the file, the path inside it
(``layers[2].prior.scale``) and what was expected.
"""

from __future__ import annotations

import math
import os

import torch

from .data import INPUT_FIELDS, TEXT_FIELDS
from .errors import SpecError
from .network import BayesianNetwork
from .plugins import parse_plugins
from .registry import LAYERS, LIKELIHOODS, PRIORS
from .schema import Field, load_yaml, short_repr, validate

MODEL_FIELDS = {
    "name": Field("str", None, allow_none=True),
    "description": Field("str", None, allow_none=True),
    "input_shape": Field("any", "auto"),
    "prior": Field("any", None, allow_none=True),
    "bias_prior": Field("any", None, allow_none=True),
    "layers": Field("list", None, allow_none=True, doc="the layer list (or name a class with module:)"),
    "module": Field("str", None, allow_none=True, doc="package.module:ClassName of a torch.nn.Module to convert"),
    "kwargs": Field("dict", None, allow_none=True, doc="the class's constructor arguments"),
    "priors": Field("dict", None, allow_none=True, doc="module: priors by fnmatch pattern on site/module names"),
    "deterministic": Field("list", None, allow_none=True, doc="module: module-name patterns left deterministic"),
    "init": Field("str", None, allow_none=True, doc="start from a state_dict file (.pt) or a run directory, "
                                                    "relative to the spec file"),
    "likelihood": Field("any", "categorical"),
    "data": Field("dict", None, allow_none=True),  # loader options: data.INPUT_FIELDS, or data.TEXT_FIELDS for a corpus
    "plugins": Field("list", None, allow_none=True, doc="plugin modules (names or .py paths) whose priors, layers and "
                                                       "rules the spec uses; needs --allow-code (pyro_sparse.plugins)"),
    "recipe": Field("str", None, allow_none=True, doc="the inference recipe that fits this spec, relative to the spec "
                                                      "file (what `fit` uses without --inference)"),
}


def _typed(registry, value, path, source, what):
    """Validate a ``{type: ..., **options}`` entry against a registry of Configurable classes."""
    if isinstance(value, str):
        value = {"type": value}
    if not isinstance(value, dict):
        raise SpecError(f"expected a {what} name or a mapping with 'type', got {short_repr(value)}", source, path)
    kind = value.get("type")
    if kind is None:
        raise SpecError(f"missing 'type' (one of {sorted(registry)})", source, path)
    if not isinstance(kind, str) or kind not in registry:
        raise SpecError(f"unknown {what} type {short_repr(kind)}; expected one of {sorted(registry)}", source,
                        f"{path}.type")
    options = validate(registry[kind].fields, {k: v for k, v in value.items() if k != "type"}, path, source)
    return {"type": kind, **options}


def parse_prior(value, path, source=None) -> dict:
    return _typed(PRIORS, value, path, source, "prior")


def parse_model_spec(data: dict, source: str | None = None) -> dict:
    """Check a model spec's structure and values; return it normalised (defaults filled in)."""
    plugins = parse_plugins(data, source)  # first: the rest may name what they register
    spec = validate(MODEL_FIELDS, data, "", source)
    spec["plugins"] = plugins
    shape = spec["input_shape"]
    if not (shape in ("auto", "image") or (isinstance(shape, list) and shape and all(
            isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in shape))):
        raise SpecError(f"expected 'auto', 'image' or a list of positive integers, got {short_repr(shape)}",
                        source, "input_shape")
    for key in ("prior", "bias_prior"):
        if spec[key] is not None:
            spec[key] = parse_prior(spec[key], key, source)
    spec["likelihood"] = _typed(LIKELIHOODS, spec["likelihood"], "likelihood", source, "likelihood")
    if spec["data"] is not None:  # a text corpus's options, or array data's ``inputs``
        given = spec["data"]
        checked = validate({**TEXT_FIELDS, **INPUT_FIELDS}, given, "data", source)
        spec["data"] = {k: v for k, v in checked.items() if k in given}  # the loader fills its own defaults
        _check_data_task(spec, source)
    if spec["module"] is not None:
        return _parse_module_spec(spec, source)
    for key in ("kwargs", "priors", "deterministic"):
        if spec[key] is not None:
            raise SpecError(f"{key} applies to a spec that names a class (module:), not to a layer list", source, key)
    if spec["layers"] is None:
        raise SpecError("missing required key 'layers' (a list of layers), or name a class with module: "
                        "package.module:ClassName", source, None)
    if not spec["layers"]:
        raise SpecError("expected at least one layer", source, "layers")
    layers = []
    for i, entry in enumerate(spec["layers"]):
        path = f"layers[{i}]"
        if not isinstance(entry, dict) or "type" not in entry:
            raise SpecError(f"expected a mapping with 'type' (one of {sorted(LAYERS)}), got {short_repr(entry)}",
                            source, path)
        kind = entry["type"]
        if not isinstance(kind, str) or kind not in LAYERS:
            raise SpecError(f"unknown layer type {short_repr(kind)}; expected one of {sorted(LAYERS)}", source,
                            f"{path}.type")
        fields = {**LAYERS[kind].fields, "name": Field("str", None, allow_none=True)}
        layer = {"type": kind, **validate(fields, {k: v for k, v in entry.items() if k != "type"}, path, source)}
        for key in ("prior", "bias_prior"):
            if layer.get(key) is not None:
                layer[key] = parse_prior(layer[key], f"{path}.{key}", source)
        layers.append(layer)
    parametric = [i for i, l in enumerate(layers) if "out" in l]
    for i in parametric[:-1]:
        if layers[i]["out"] == "auto":
            raise SpecError("'out: auto' is only allowed on the last layer with weights", source,
                            f"layers[{i}].out")
    spec["layers"] = layers
    return spec


def _parse_module_spec(spec, source):
    """A spec that names a class: the reference, its arguments, priors by pattern and the patterns
    left deterministic are checked here; nothing is imported (that is :func:`build_network`'s,
    with permission)."""
    from .usercode import check_reference

    if spec["layers"] is not None:
        raise SpecError("give either layers or module (a class to convert), not both", source, "layers")
    check_reference(spec["module"], source, "module")
    spec["kwargs"] = dict(spec["kwargs"] or {})
    if not all(isinstance(k, str) for k in spec["kwargs"]):
        raise SpecError("expected a mapping of argument names to values", source, "kwargs")
    priors = {}
    for pattern, prior in (spec["priors"] or {}).items():
        if not isinstance(pattern, str) or not pattern:
            raise SpecError(f"expected module-name patterns as keys, got {short_repr(pattern)}", source, "priors")
        priors[pattern] = parse_prior(prior, f"priors.{pattern}", source)
    spec["priors"] = priors
    patterns = spec["deterministic"] or []
    for i, pattern in enumerate(patterns):
        if not isinstance(pattern, str) or not pattern:
            raise SpecError(f"expected a module-name pattern, got {short_repr(pattern)}", source, f"deterministic[{i}]")
    spec["deterministic"] = list(patterns)
    return spec


def init_is_state_dict(path) -> bool:
    """Whether an ``init`` path names a state_dict file (a file, or a missing name with an
    extension such as ``.pt``) rather than a run directory."""
    if path is None:
        return False
    return os.path.isfile(path) or (not os.path.isdir(path) and bool(os.path.splitext(path)[1]))


def init_path(spec: dict) -> str | None:
    """The absolute path a loaded spec's ``init`` names (relative to the spec file), or None."""
    init = spec.get("init")
    if not init:
        return None
    source = spec.get("_source")
    base = os.path.dirname(os.path.abspath(source)) if source else os.getcwd()
    return os.path.normpath(os.path.join(base, os.path.expanduser(init)))


def _state_dict(path, source):
    """A ``state_dict`` file's tensors (loaded with ``weights_only``); SpecError naming ``init``."""
    from .checkpoint import load_error

    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise SpecError(f"no such file {path!r}", source, "init") from None
    except Exception as e:
        raise SpecError(load_error(path, e, "state_dict file"), source, "init") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(k, str) and torch.is_tensor(v) for k, v in state.items()):
        raise SpecError(f"{path}: expected a state_dict (parameter name -> tensor)", source, "init")
    return state


def state_dict_mismatch(own: dict, state: dict) -> str | None:
    """What keeps ``state`` from loading into a module whose ``state_dict`` is ``own``, naming the
    first key of each kind (a tensor of another shape, a key the module lacks, a key the file
    lacks) and how many there are; None when it fits."""
    shapes = [(k, list(state[k].shape), list(own[k].shape)) for k in state if k in own
              and tuple(state[k].shape) != tuple(own[k].shape)]
    unexpected = [k for k in state if k not in own]
    missing = [k for k in own if k not in state]
    parts = []
    if shapes:
        k, theirs, mine = shapes[0]
        more = f" (and {len(shapes) - 1} more tensors of other shapes)" if len(shapes) > 1 else ""
        parts.append(f"{k} has shape {theirs} in the file but {mine} in the module{more}")
    for what, keys in (("the module has no", unexpected), ("the file has no", missing)):
        if keys:
            parts.append(f"{what} {keys[0]}" + (f" (and {len(keys) - 1} more keys)" if len(keys) > 1 else ""))
    return "; ".join(parts) or None


def _build_module_network(spec, likelihood, input_shape, out_dim, num_outputs, source):
    """The :class:`~pyro_sparse.convert.BayesianModule` of a spec that names a class."""
    from .convert import BayesianModule
    from .usercode import import_object

    cls = import_object(spec["module"], source, "module")
    if not (isinstance(cls, type) and issubclass(cls, torch.nn.Module)) and not callable(cls):
        raise SpecError(f"{spec['module']!r} is not a torch.nn.Module class", source, "module")
    try:
        module = cls(**spec["kwargs"])
    except Exception as e:
        raise SpecError(f"{spec['module']}(**kwargs) failed: {type(e).__name__}: {str(e)[:300]}", source,
                        "kwargs") from None
    if not isinstance(module, torch.nn.Module):
        raise SpecError(f"{spec['module']} made a {type(module).__name__}, not a torch.nn.Module", source, "module")
    path = init_path(spec)
    if init_is_state_dict(path):
        state = _state_dict(path, source)
        mismatch = state_dict_mismatch(module.state_dict(), state)
        if mismatch:
            raise SpecError(f"{path} does not fit {spec['module']}(**{spec['kwargs']}): {mismatch}", source,
                            "init") from None
        module.load_state_dict(state)
    try:
        network = BayesianModule(module, prior=spec["prior"], priors=spec["priors"], bias_prior=spec["bias_prior"],
                                 likelihood=likelihood, deterministic=spec["deterministic"], input_shape=input_shape,
                                 source={"module": spec["module"], "kwargs": spec["kwargs"]})
    except (ValueError, TypeError, RuntimeError) as e:
        msg = (str(e).splitlines() or [type(e).__name__])[0][:400]
        field = next((f for f in ("priors", "deterministic") if msg.startswith(f"bayesian: {f} pattern")), "module")
        raise SpecError(msg if field != "module" else f"{msg} (input shape {list(input_shape)})", source,
                        field) from None
    with torch.no_grad():
        shape = tuple(network.deterministic({})(torch.zeros(1, *input_shape)).shape[1:])
    try:
        expected = tuple(likelihood.output_shape(num_outputs, shape))
    except ValueError as e:
        raise SpecError(str(e), source, "likelihood") from None
    if shape != expected:
        raise SpecError(f"{spec['module']} outputs shape {list(shape)} per example but the "
                        f"{type(likelihood).spec_name} likelihood needs {list(expected)} for this data", source,
                        "module")
    return network


#: the targets each likelihood task needs from a data file (Likelihood.task -> data task)
_DATA_TASKS = {"classification": "classification", "binary": "classification", "regression": "regression"}


def data_task(spec: dict) -> str | None:
    """What a data file's targets are for this spec: ``data.task`` when it names one, else what
    the likelihood needs ('regression' for gaussian, 'classification' for categorical and
    bernoulli), None for likelihoods that read other data (sequences). Passed to
    :func:`pyro_sparse.data.load_dataset` so that the likelihood, not the dtype of the file's
    target column, decides whether whole numbers are labels or real values."""
    given = (spec.get("data") or {}).get("task")
    if given not in (None, "auto"):
        return given
    kind = (spec.get("likelihood") or {}).get("type")
    return _DATA_TASKS.get(getattr(LIKELIHOODS.get(kind), "task", None))


def _check_data_task(spec, source):
    """``data.task`` must agree with the likelihood (a Gaussian cannot fit class labels)."""
    given = spec["data"].get("task")
    kind = spec["likelihood"]["type"]
    needs = _DATA_TASKS.get(LIKELIHOODS[kind].task)
    if given not in (None, "auto") and needs is not None and given != needs:
        raise SpecError(f"task {given} contradicts the {kind} likelihood, which needs "
                        f"{'class labels' if needs == 'classification' else 'real-valued targets'}; "
                        f"use task: {needs} or auto", source, "data.task")
    if spec["data"].get("targets", "raw") != "raw" and needs != "regression":
        raise SpecError(f"targets: {spec['data']['targets']} applies to regression targets, but the {kind} "
                        f"likelihood needs {'class labels' if needs == 'classification' else 'other data'}",
                        source, "data.targets")


def load_model_spec(path: str) -> dict:
    spec = parse_model_spec(load_yaml(path), path)
    spec["_source"] = path
    return spec


def recipe_of(spec: dict) -> str:
    """The path of the recipe a loaded spec names (``recipe:``, relative to the spec file);
    SpecError when it names none or the file is missing."""
    source = spec.get("_source")
    if not spec.get("recipe"):
        raise SpecError("names no recipe (add `recipe: ../inference/<recipe>.yaml`), so fit needs --inference",
                        source, "recipe")
    path = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(source)) if source else os.getcwd(),
                                         spec["recipe"]))
    if not os.path.isfile(path):
        raise SpecError(f"the recipe {spec['recipe']!r} is not a file ({path})", source, "recipe")
    return path


def _resolve_input_shape(spec, feature_shape, image_shape, source):
    shape = spec["input_shape"]
    if shape == "auto":
        return tuple(feature_shape)
    if shape == "image":
        if image_shape is None:
            raise SpecError("input_shape 'image' but the data set has no image shape; give a list",
                            source, "input_shape")
        shape = image_shape
    shape = tuple(shape)
    if math.prod(shape) != math.prod(feature_shape):
        raise SpecError(f"input shape {list(shape)} has {math.prod(shape)} values but the data's examples "
                        f"have shape {list(feature_shape)}", source, "input_shape")
    return shape


def _dry_run(layer, in_shape):
    """Run a Bayesian layer once on one zero example with every site at its initial value, so
    prior options that only matter at sampling time (e.g. a ``group`` axis the parameter does
    not have) fail while building, with the layer's path. Uses no random numbers."""
    if not layer.priors():
        return
    from .guides import prototype_trace

    with torch.random.fork_rng(devices=[]):
        prototype_trace(layer, torch.zeros(1, *in_shape))


def build_network(spec: dict, feature_shape, num_outputs: int, image_shape=None,
                  source: str | None = None) -> BayesianNetwork:
    """Instantiate a parsed spec for data with per-example ``feature_shape`` and ``num_outputs``."""
    source = source or spec.get("_source")
    likelihood_cfg = dict(spec["likelihood"])
    likelihood = LIKELIHOODS[likelihood_cfg.pop("type")](**likelihood_cfg)
    out_dim = likelihood.output_dim(num_outputs)
    input_shape = _resolve_input_shape(spec, feature_shape, image_shape, source)
    if spec.get("module"):
        return _build_module_network(spec, likelihood, input_shape, out_dim, num_outputs, source)
    shape = input_shape
    last_parametric = max((i for i, l in enumerate(spec["layers"]) if "out" in l), default=None)
    layers = []
    for i, cfg in enumerate(spec["layers"]):
        cfg = dict(cfg)
        kind, name = cfg.pop("type"), cfg.pop("name", None)
        cls = LAYERS[kind]
        if hasattr(cls, "resolve_auto"):  # e.g. num_tokens: auto -> the vocabulary
            cfg = cls.resolve_auto(cfg, out_dim)
        if "prior" in cls.fields:
            cfg["prior"] = cfg.get("prior") or spec["prior"]
            cfg["bias_prior"] = cfg.get("bias_prior") or spec["bias_prior"]
        if cfg.get("out") == "auto" and i == last_parametric:
            cfg["out"] = out_dim
        try:
            layer = cls.from_config(cfg, shape)
            _dry_run(layer, shape)
            shape = layer.out_shape(shape)
        except (ValueError, TypeError, RuntimeError, MemoryError, OverflowError, IndexError, KeyError) as e:
            msg = (str(e).splitlines() or [type(e).__name__])[0][:300]
            raise SpecError(f"{msg} (input to this layer has shape {list(shape)})", source, f"layers[{i}]") from None
        layers.append((name, layer) if name else layer)
    try:
        expected = tuple(likelihood.output_shape(num_outputs, tuple(shape)))
    except ValueError as e:
        raise SpecError(str(e), source, "likelihood") from None
    if tuple(shape) != expected:
        raise SpecError(f"the network's output has shape {list(shape)} but the {spec['likelihood']['type']} "
                        f"likelihood needs {expected} for this data", source,
                        f"layers[{last_parametric if last_parametric is not None else len(layers) - 1}].out")
    try:
        network = BayesianNetwork(layers, likelihood, input_shape=input_shape)
    except ValueError as e:
        raise SpecError(str(e), source, "layers") from None
    path = init_path(spec)
    if init_is_state_dict(path):  # a state_dict keyed by site names (fc1.weight)
        try:
            network.start_at(_state_dict(path, source))
        except ValueError as e:
            raise SpecError(f"{path}: {e}", source, "init") from None
    return network


def spec_name(spec: dict) -> str:
    return spec.get("name") or os.path.splitext(os.path.basename(spec.get("_source", "model")))[0]
