"""What the benchmark runs: a table of models, a table of methods, and their product.

A **model** is a network on a data set, with one spec per prior *family* (``gaussian`` for MAP,
mean-field Gaussian + BMR and SpaM; ``log_uniform`` for Sparse VD; ``group_log_uniform``;
``horseshoe``). A **method** is a fitting recipe plus the reduction rules applied to its
posterior. An **entry** is one (model, method) cell: the spec of the method's family, the
method's recipe (a model may name its own, e.g. the recurrent recipes), and the rules.

A spec is a list of candidates; the first whose file exists is used. A candidate is a path
(``models/x.yaml``) or a :class:`Derived` spec (a base file with top-level keys replaced), so a
variant the repository has no file for yet (LeNet-5 with a log-uniform prior) still runs, and is
replaced by the file once a branch adds it. An entry whose spec or recipe file is missing, whose
prior or layer type the library does not register, or whose recipe names an unknown fitting
method is **skipped with a note** (``resolve`` returns a :class:`Skip`), so the table grows as
branches land without editing the benchmark's code.

Adding a method or a model is one row here.
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass, field

import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

#: target sparsities of the accuracy-vs-sparsity curves (threshold-free rules)
SPARSITIES = (0.5, 0.8, 0.9, 0.95, 0.98, 0.99)
#: the sparsity at which threshold-free rules enter the quality tables
TABLE_SPARSITY = 0.9


@dataclass(frozen=True)
class Derived:
    """A spec made from ``base`` (a path under the repository) with top-level keys replaced and,
    optionally, keys of single layers (``layers``: index into the spec's layer list -> changes;
    -1 is the last layer)."""

    base: str
    changes: dict
    layers: dict = field(default_factory=dict)

    def load(self) -> dict:
        spec = yaml.safe_load(open(os.path.join(ROOT, self.base)))
        spec.update(copy.deepcopy(self.changes))
        for index, changes in self.layers.items():
            spec["layers"][index].update(copy.deepcopy(changes))
        spec["name"] = f"{spec.get('name', 'spec')}+{'+'.join(sorted(self.changes))}"
        return spec

    def __str__(self):
        parts = [f"{k}: {_flow(v)}" for k, v in self.changes.items()]
        parts += [f"layers[{i}].{k}: {_flow(v)}" for i, c in self.layers.items() for k, v in c.items()]
        return f"{self.base} with " + ", ".join(parts)


def _flow(value):
    """A value as YAML flow text (what one would write in the spec)."""
    return yaml.safe_dump(value, default_flow_style=True, sort_keys=False, width=10**6).strip()


@dataclass(frozen=True)
class Rule:
    """A reduction rule applied to a fitted posterior.

    ``method``: a rule of :data:`pyro_sparse.registry.RULES`, or None for the recipe's own
    ``reduction.method``. ``sparsity`` for threshold-free rules; ``threshold`` None means the
    rule's default, or the recipe's ``reduction.threshold`` when ``from_recipe``.
    """

    key: str
    label: str
    method: str | None
    sparsity: float | None = None
    threshold: float | None = None
    structured: bool = False
    from_recipe: bool = False


@dataclass(frozen=True)
class Method:
    key: str
    label: str
    family: str  # which of the model's specs
    recipe: str  # default recipe file (a model may override it)
    rules: tuple
    curves: tuple = ()  # threshold-free rules swept over SPARSITIES
    point: bool = False  # a point estimate (MAP): no posterior predictive to sample
    paper: str = ""
    cost: float = 2.5  # rough cost of a step relative to a MAP step (orders the work queue)
    models: tuple = ()  # the models it runs on (empty: every model with a spec of its family)


@dataclass(frozen=True)
class Model:
    key: str
    label: str
    data: str
    specs: dict  # family -> tuple of candidates (paths or Derived)
    recipes: dict = field(default_factory=dict)  # method key -> recipe file overriding the method's
    quick_scale: float = 0.5  # quick mode: fraction of the recipe's epochs (and warm-up schedule)
    quick_scales: dict = field(default_factory=dict)  # method key -> its own quick fraction
    headline: bool = False
    cost: float = 1.0  # rough cost of an epoch relative to the digits MLP (orders the work queue)
    quality: bool = True  # False: timed in the speed section only (its fits are too long for the tables)
    rules: dict = field(default_factory=dict)  # method key -> its rules on this model (default: the method's)
    skip: dict = field(default_factory=dict)  # method key -> why the method cannot run on this model


M = TABLE_SPARSITY
METHODS = {m.key: m for m in (
    Method("map", "MAP", "gaussian", "inference/map.yaml",
           (Rule("magnitude", f"magnitude {M:.0%}", "magnitude", sparsity=M),
            Rule("random", f"random {M:.0%}", "random", sparsity=M)),
           curves=("magnitude", "random"), point=True, paper="baseline", cost=1.0),
    Method("sparsevd", "Sparse VD", "log_uniform", "inference/svi_sparsevd.yaml",
           (Rule("log-alpha", "log alpha > 3", "log-alpha", from_recipe=True),),
           paper="Molchanov et al. 2017"),
    Method("group_lu", "Group log-uniform", "group_log_uniform", "inference/svi_group_loguniform.yaml",
           (Rule("group-log-alpha", "group log alpha", None, from_recipe=True, structured=True),),
           paper="Louizos et al. 2017"),
    Method("horseshoe", "Horseshoe", "horseshoe", "inference/svi_horseshoe.yaml",
           (Rule("horseshoe-scale", "unit scale", None, from_recipe=True),),
           paper="Piironen & Vehtari 2017; Louizos et al. 2017"),
    Method("horseshoe_structured", "Horseshoe, structured guide", "horseshoe",
           "inference/svi_horseshoe_structured.yaml",
           (Rule("horseshoe-scale", "unit scale", None, from_recipe=True),),
           paper="Louizos et al. 2017 (q(w | z))", models=("digits-mlp",)),
    Method("mf_bmr", "MF Gaussian + BMR", "gaussian", "inference/svi_meanfield.yaml",
           (Rule("savage-dickey", "Savage-Dickey dF > 0", "savage-dickey"),
            Rule("bmr", "BMR N(0,(0.01s)^2)", "bmr"),
            Rule("spike-slab", "spike-and-slab", "spike-slab")),
           curves=("opd",), paper="Friston & Penny 2011; Markovic et al. 2023"),
    Method("svi_bmr", "Iterative BMR", "gaussian", "inference/svi_bmr_iterative.yaml",
           (Rule("savage-dickey", "pruned in training", "savage-dickey"),), paper="Markovic et al. 2023"),
    Method("spam", "SpaM", "gaussian", "inference/laplace_marglik.yaml",
           (Rule("opd", f"OPD {M:.0%}", "opd", sparsity=M),),
           curves=("opd", "magnitude"), paper="Dhahri et al. 2024", cost=1.3),
)}

_LENET_BASE = "models/lenet5_gaussian.yaml"
_CNN1D_BASE = "models/cnn_mnist1d_gaussian.yaml"
# the tiered regularised horseshoe of models/mlp_horseshoe.yaml (Markovic et al. 2023): unit scales in
# the hidden layers, one scale for the output layer
_HORSESHOE = {"type": "horseshoe", "tau0": 0.01, "regularized": True, "slab_df": 4.0, "slab_scale": 1.7320508}
MLP_SPECS = {
    "gaussian": ("models/mlp_gaussian.yaml",),
    "log_uniform": ("models/mlp_sparsevd.yaml",),
    "group_log_uniform": ("models/mlp_group_loguniform.yaml",),
    "horseshoe": ("models/mlp_horseshoe.yaml",),
}


def _conv_specs(base, stem):
    return {
        "gaussian": (base,),
        "log_uniform": (f"models/{stem}_sparsevd.yaml", Derived(base, {"prior": {"type": "log_uniform"}})),
        "group_log_uniform": (f"models/{stem}_group_loguniform.yaml",
                              Derived(base, {"prior": {"type": "group_log_uniform", "group": "unit"}})),
        "horseshoe": (f"models/{stem}_horseshoe.yaml",
                      Derived(base, {"prior": dict(_HORSESHOE, group="unit")},
                              layers={-1: {"prior": dict(_HORSESHOE, group="layer")}})),
    }


MODELS = {m.key: m for m in (
    Model("digits-mlp", "digits MLP 64-300-100-10", "digits", MLP_SPECS, quick_scale=0.5, headline=True),
    Model("digits-lenet5", "digits LeNet-5 (conv 20-50, fc 500)", "digits", _conv_specs(_LENET_BASE, "lenet5"),
          recipes={"sparsevd": "inference/svi_lenet5_sparsevd.yaml"}, quick_scale=0.3,
          quick_scales={"sparsevd": 0.5}, cost=3.0),
    Model("mnist1d-mlp", "MNIST-1D MLP 40-300-100-10", "mnist1d", MLP_SPECS, quick_scale=0.4,
          quick_scales={"sparsevd": 0.5}, cost=3.0),
    Model("mnist1d-cnn", "MNIST-1D CNN (1x8x5 fold, conv 32-64, fc 128)", "mnist1d",
          _conv_specs(_CNN1D_BASE, "cnn_mnist1d"), quick_scale=0.35, cost=5.0),
    Model("mnist1d-lstm", "MNIST-1D LSTM 128 (40 steps)", "mnist1d",
          {"gaussian": ("models/lstm_classifier.yaml",), "log_uniform": ("models/lstm_classifier_w.yaml",),
           "group_log_uniform": ("models/lstm_classifier_wgn.yaml",)},
          recipes={"map": "inference/map_rnn.yaml", "sparsevd": "inference/svi_sparsevd_rnn.yaml",
                   "group_lu": "inference/svi_sparsevd_rnn.yaml"},
          # the LSTM's groups are the z variables of its neurons, gates and inputs (Lobacheva et al.):
          # log alpha > 3 on weights and z alike, and compaction removes the neurons a z removes
          rules={"group_lu": (Rule("group-log-alpha", "log alpha > 3 (weights, z)", "log-alpha", from_recipe=True),)},
          skip={"spam": "the Laplace curvature covers Linear and Conv layers, not recurrent ones"},
          quick_scale=0.2, quick_scales={"map": 0.5, "sparsevd": 0.3, "group_lu": 0.3}, cost=20.0),
    Model("digits-vit", "digits tiny ViT (2x2 patches, 2 blocks of width 32)", "digits",
          {"gaussian": ("models/vit_tiny_gaussian.yaml",), "log_uniform": ("models/vit_tiny_sparsevd.yaml",),
           "horseshoe": ("models/vit_tiny_horseshoe.yaml",)},
          recipes={"map": "inference/map_transformer.yaml", "sparsevd": "inference/svi_sparsevd_transformer.yaml",
                   "horseshoe": "inference/svi_horseshoe_transformer.yaml"}, quality=False,
          skip={"spam": "the Laplace curvature covers Linear and Conv layers, not patch, attention or mixer blocks"}),
    Model("digits-mixer", "digits tiny MLP-Mixer (2x2 patches, 2 blocks of width 32)", "digits",
          {"gaussian": ("models/mixer_tiny_gaussian.yaml",), "log_uniform": ("models/mixer_tiny_sparsevd.yaml",),
           "horseshoe": ("models/mixer_tiny_horseshoe.yaml",)},
          recipes={"map": "inference/map_transformer.yaml", "sparsevd": "inference/svi_sparsevd_transformer.yaml",
                   "horseshoe": "inference/svi_horseshoe_transformer.yaml"}, quality=False,
          skip={"spam": "the Laplace curvature covers Linear and Conv layers, not patch, attention or mixer blocks"}),
)}


@dataclass
class Entry:
    model: Model
    method: Method
    spec: dict
    recipe: dict
    spec_source: str
    recipe_source: str

    @property
    def key(self):
        return f"{self.model.key}/{self.method.key}"

    @property
    def rules(self):
        """The rules applied to this cell's fits: the model's own for the method, else the method's."""
        return self.model.rules.get(self.method.key, self.method.rules)

    def scale(self, mode: str) -> float:
        """Fraction of the recipe's epochs this entry runs in ``mode`` ("quick" or "full")."""
        if mode == "full":
            return 1.0
        return self.model.quick_scales.get(self.method.key, self.model.quick_scale)


@dataclass
class Skip:
    model: Model
    method: Method
    reason: str

    @property
    def key(self):
        return f"{self.model.key}/{self.method.key}"


def _candidate(c):
    """(spec dict, source text) of a candidate, or None when its file is missing."""
    path = c.base if isinstance(c, Derived) else c
    if not os.path.exists(os.path.join(ROOT, path)):
        return None
    if isinstance(c, Derived):
        return c.load(), str(c)
    return yaml.safe_load(open(os.path.join(ROOT, path))), path


def _missing_types(spec) -> str | None:
    """Why the library cannot build ``spec`` (an unregistered prior or layer type), or None."""
    from pyro_sparse.registry import LAYERS, PRIORS

    priors = [spec.get("prior"), spec.get("bias_prior")]
    for layer in spec.get("layers", []):
        if layer.get("type") not in LAYERS:
            return f"layer type {layer.get('type')!r} is not in this library yet"
        priors += [layer.get("prior"), layer.get("bias_prior")]
    for p in priors:
        if isinstance(p, dict) and p.get("type") not in PRIORS:
            return f"prior {p.get('type')!r} is not in this library yet"
    return None


def resolve(model: Model, method: Method) -> Entry | Skip:
    """The entry of a (model, method) cell, or a :class:`Skip` saying why it cannot run here."""
    from pyro_sparse.registry import FITTERS, RULES

    candidates = model.specs.get(method.family)
    if method.key in model.skip:
        return Skip(model, method, model.skip[method.key])
    if method.models and model.key not in method.models:
        return Skip(model, method, f"{method.label} runs on {', '.join(method.models)} only")
    if not candidates:
        return Skip(model, method, f"no {method.family} spec for this model")
    found = next((r for r in map(_candidate, candidates) if r is not None), None)
    if found is None:
        names = ", ".join(c.base if isinstance(c, Derived) else c for c in candidates)
        return Skip(model, method, f"spec file missing ({names})")
    spec, source = found
    why = _missing_types(spec)
    if why:
        return Skip(model, method, f"{source}: {why}")
    recipe_path = model.recipes.get(method.key, method.recipe)
    if not os.path.exists(os.path.join(ROOT, recipe_path)):
        return Skip(model, method, f"recipe file missing ({recipe_path})")
    recipe = yaml.safe_load(open(os.path.join(ROOT, recipe_path)))
    if recipe.get("method", "svi") not in FITTERS:
        return Skip(model, method, f"{recipe_path}: fitting method {recipe.get('method')!r} is not in this library")
    for rule in model.rules.get(method.key, method.rules):
        name = rule.method or (recipe.get("reduction") or {}).get("method")
        if name not in RULES:
            return Skip(model, method, f"{recipe_path}: reduction rule {name!r} is not in this library")
    return Entry(model, method, spec, recipe, source, recipe_path)


def entries(models=None, methods=None) -> list:
    """Every cell of ``models`` x ``methods`` (default: the models of the quality tables, all
    methods), as Entry or Skip."""
    models = models or [key for key, m in MODELS.items() if m.quality]
    return [resolve(MODELS[a], METHODS[b]) for a in models for b in (methods or METHODS)]


# --------------------------------------------------------------------------- recipes in quick mode

_EPOCH_KEYS = ("kl_warmup_epochs", "kl_free_epochs")
_SECTION_KEYS = {"reduction": ("warmup_epochs", "every"), "laplace": ("burn_in", "marglik_frequency")}
_AT_LEAST_ONE = {"every", "marglik_frequency"}


def scale_recipe(recipe: dict, factor: float) -> dict:
    """A copy of ``recipe`` whose epochs and epoch-counted schedule (KL warm-up, pre-training,
    iterative-BMR warm-up and period, SpaM burn-in and marglik period) are multiplied by
    ``factor`` and rounded (periods at least 1 epoch, at least 2 epochs of training). Held-out
    evaluation runs once, at the end."""
    if not 0 < factor <= 1:
        raise ValueError(f"factor: must be in (0, 1], got {factor!r}")
    out = copy.deepcopy(recipe)
    out["epochs"] = max(2, round(recipe.get("epochs", 1) * factor))
    for key in _EPOCH_KEYS:
        if key in out and out[key]:
            out[key] = max(1, round(out[key] * factor))
    for section, keys in _SECTION_KEYS.items():
        for key in keys:
            if isinstance(out.get(section), dict) and isinstance(out[section].get(key), int):
                value = round(out[section][key] * factor)
                out[section][key] = max(1, value) if key in _AT_LEAST_ONE else max(0, value)
    out["eval_every"] = out["epochs"]
    return out
