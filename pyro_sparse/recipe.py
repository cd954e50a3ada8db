"""Inference recipes (``inference/*.yaml``): how to fit a model.

::

    method: svi                    # svi | laplace | svi_bmr (pyro_sparse.registry.FITTERS)
    guide: meanfield               # meanfield | delta | (structured, lowrank, ...)
    guide_options: {init_scale: 0.0067}
    local_reparam: true
    elbo: auto                     # auto: the ELBO core (CoreELBO) | pyro: the Pyro reference
    optimizer: {name: Adam, lr: 0.001}   # any torch.optim optimiser by name, with its options
    schedule: {name: cosine}             # none | cosine | step | exponential | multistep
    epochs: 100
    batch_size: 128
    kl_warmup_epochs: 10           # KL weight rises linearly 0 -> 1 over these epochs
    kl_free_epochs: 0              # epochs on the data term alone (KL weight 0) before the warm-up
    grad_clip: 10.0                # max gradient norm, or null
    eval_samples: 10               # posterior samples for the predictive on held-out data
    seed: 0
    device: cpu
    num_threads: 1                 # torch CPU threads while fitting (null: torch's default, one per core)
    nan_retries: 3                 # numerical faults survived in a row before NumericalError
    nan_lr_factor: 0.5             # the learning rate is multiplied by this after each fault
    divergence_factor: 1000        # an exploding loss or held-out NLL is a fault too (fitting.SVITrainer)
    reduction: {method: log-alpha, threshold: 3.0}   # the rule `pyro-sparse reduce RUN` uses by default

:func:`parse_recipe` validates every key with errors that name the file and field.
"""

from __future__ import annotations

import inspect
import math
import warnings

import torch

from .errors import PyroSparseError, SpecError
from .plugins import parse_plugins
from .registry import FITTERS, GUIDES, RULES
from .schema import Field, load_yaml, validate

SCHEDULES = {
    "none": None,
    "cosine": torch.optim.lr_scheduler.CosineAnnealingLR,
    "step": torch.optim.lr_scheduler.StepLR,
    "exponential": torch.optim.lr_scheduler.ExponentialLR,
    "multistep": torch.optim.lr_scheduler.MultiStepLR,
}

RECIPE_FIELDS = {
    "name": Field("str", None, allow_none=True),
    "description": Field("str", None, allow_none=True),
    "method": Field("choice", "svi", choices=lambda: tuple(FITTERS), doc="a fitting method (svi, laplace, ...)"),
    "plugins": Field("list", None, allow_none=True, doc="plugin modules (names or .py paths) whose fitting methods, "
                                                       "guides and rules the recipe uses; needs --allow-code"),
    "guide": Field("str", "meanfield"),
    "guide_options": Field("dict", {}),
    "local_reparam": Field("bool", True),
    "elbo": Field("choice", "auto", choices=("auto", "pyro"),
                  doc="auto: the ELBO core (CoreELBO); pyro: the reference through Pyro (MeanFieldELBO)"),
    "optimizer": Field("dict", {"name": "Adam", "lr": 1e-3}),
    "schedule": Field("dict", {"name": "none"}),
    "epochs": Field("int", 50, nonneg=True, doc="0 only for method laplace: the post-hoc Laplace posterior of the "
                                                "starting weights, nothing trained"),
    "batch_size": Field("int", 128, positive=True),
    "kl_warmup_epochs": Field("float", 0.0, nonneg=True),
    "scale_lr_factor": Field("float", 1.0, positive=True),
    "kl_free_epochs": Field("float", 0.0, nonneg=True),
    "grad_clip": Field("float", None, positive=True, allow_none=True),
    "eval_samples": Field("int", 10, positive=True),
    "eval_every": Field("int", 1, positive=True),
    "seed": Field("int", 0, nonneg=True, doc="in [0, 2**32)"),
    "device": Field("str", "cpu"),
    "num_threads": Field("int", 1, positive=True, allow_none=True,
                         doc="torch CPU threads while fitting (fit --threads); 1 by default: the networks here "
                             "are small, and more threads than idle cores multiply the step time on a shared "
                             "machine (bench/bench_threads.py); null: torch's default, one per core"),
    "reduction": Field("dict", None, allow_none=True),
    "nan_retries": Field("int", 3, nonneg=True),
    "nan_lr_factor": Field("float", 0.5, positive=True, doc="in (0, 1)"),
    "divergence_factor": Field("float", 1000.0, positive=True, allow_none=True,
                               doc="a step's loss per datum above L0 + factor * max(|L0|, 1) (L0: the same "
                                   "estimate at the start, full KL weight), or a held-out NLL above factor * "
                                   "log(classes), is a numerical fault like a NaN; null: no such check"),
}

MAX_SEED = 2**32  # numpy's and Python's seeders accept [0, 2**32); torch's more
MAX_THREADS = 1024


def _numeric_strings(cfg: dict) -> dict:
    """PyYAML reads ``1e-3`` (no dot) as a string: turn numeric strings into floats."""
    out = {}
    for key, value in cfg.items():
        if key != "name" and isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                pass
        out[key] = value
    return out


def _first_line(e: BaseException) -> str:
    return (str(e).splitlines() or [type(e).__name__])[0]


def _dry_run(cfg_opt: dict, cfg_sched: dict | None, source):
    """Build the optimiser (and schedule) on a dummy parameter and take two steps, so option
    values torch only checks lazily (types, ranges, missing arguments) fail now with the field."""
    p = torch.nn.Parameter(torch.zeros(2))
    try:
        optimizer = make_optimizer([p], cfg_opt)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for _ in range(2):
                p.grad = torch.ones_like(p)
                optimizer.step()
    except Exception as e:  # torch raises ValueError, TypeError, RuntimeError, KeyError, ...
        raise SpecError(f"{cfg_opt.get('name')} does not accept these options: {_first_line(e)}", source,
                        "optimizer") from None
    if cfg_sched is None:
        return
    try:
        scheduler = make_scheduler(optimizer, cfg_sched, 10)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for _ in range(3):
                if scheduler is not None:
                    scheduler.step()
        lrs = [g["lr"] for g in optimizer.param_groups]
    except Exception as e:
        raise SpecError(f"schedule {cfg_sched.get('name')!r} does not accept these options: {_first_line(e)}",
                        source, "schedule") from None
    if not all(isinstance(lr, (int, float)) and math.isfinite(lr) and lr >= 0 for lr in lrs):
        raise SpecError(f"schedule {cfg_sched.get('name')!r} gives the learning rate {lrs[0]!r}; "
                        "expected a finite number >= 0", source, "schedule")


def check_device(device, path="device") -> torch.device:
    """``torch.device`` for a recipe's device string; a clear error if it is malformed or absent."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise SpecError(f"expected 'cpu', 'cuda' or 'cuda:N', got {device!r}", None, path) from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise PyroSparseError(f"device {device!r} requested but CUDA is not available on this machine; "
                                  "use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise PyroSparseError(f"device {device!r} requested but this machine has "
                                  f"{torch.cuda.device_count()} CUDA device(s)")
    elif dev.type == "mps":
        if not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
            raise PyroSparseError(f"device {device!r} requested but MPS is not available on this machine")
    elif dev.type != "cpu":
        raise SpecError(f"expected 'cpu', 'cuda' or 'cuda:N', got {device!r}", None, path)
    return dev


def _check_optimizer(cfg, source):
    opts = dict(cfg)
    name = opts.pop("name", None)
    cls = getattr(torch.optim, name, None) if isinstance(name, str) else None
    if not (isinstance(cls, type) and issubclass(cls, torch.optim.Optimizer)):
        raise SpecError(f"unknown optimizer {name!r}; expected a torch.optim class name such as 'Adam'",
                        source, "optimizer.name")
    closure = inspect.signature(cls.step).parameters.get("closure")
    if closure is not None and closure.default is inspect.Parameter.empty:
        # LBFGS: step(closure) re-evaluates the loss several times per step (line search), which
        # needs the same mini-batch and the same Monte Carlo draw each time -- not what SVI steps are
        raise SpecError(f"{name} needs a closure that re-evaluates the loss within each step (a deterministic, "
                        "full-batch objective) and is not supported for mini-batch SVI; use a first-order "
                        "optimizer such as Adam, AdamW or SGD", source, "optimizer.name")
    allowed = set(inspect.signature(cls.__init__).parameters) - {"self", "params"}
    for key, value in opts.items():
        if key not in allowed:
            raise SpecError(f"{name} has no option {key!r}; expected one of {sorted(allowed)}", source,
                            f"optimizer.{key}")
        if key == "lr" and not (isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0
                                and math.isfinite(value)):
            raise SpecError(f"expected a number > 0, got {value!r}", source, "optimizer.lr")


def _check_schedule(cfg, source):
    opts = dict(cfg)
    name = opts.pop("name", "none")
    if not isinstance(name, str) or name not in SCHEDULES:
        raise SpecError(f"unknown schedule {name!r}; expected one of {sorted(SCHEDULES)}", source, "schedule.name")
    cls = SCHEDULES[name]
    if cls is None:
        if opts:
            raise SpecError(f"schedule 'none' takes no options, got {sorted(opts)}", source, "schedule")
        return
    allowed = set(inspect.signature(cls.__init__).parameters) - {"self", "optimizer", "last_epoch", "verbose"}
    if name == "cosine":
        allowed.discard("T_max")  # set from the number of epochs
    for key in opts:
        if key not in allowed:
            raise SpecError(f"schedule {name!r} has no option {key!r}; expected one of {sorted(allowed)}",
                            source, f"schedule.{key}")


def reduction_fields() -> dict:
    """The recipe's ``reduction:`` section, for fitting methods without one of their own (an
    iterative-BMR recipe's section says how to prune during training): the rule that
    ``pyro-sparse reduce RUN`` (and ``report``) use without ``--method``, and its options."""
    return {"method": Field("choice", None, choices=tuple(RULES), allow_none=True, doc="a reduction rule"),
            "threshold": Field("float", None, allow_none=True, doc="the rule's threshold (default: its own)"),
            "sparsity": Field("float", None, nonneg=True, allow_none=True, doc="target sparsity of a ranking rule"),
            "structured": Field("bool", False, doc="remove whole units")}


def parse_recipe(data: dict, source: str | None = None) -> dict:
    """Validate an inference recipe; return it with defaults filled in."""
    plugins = parse_plugins(data, source)  # first: the rest may name what they register
    fields = dict(RECIPE_FIELDS)
    for trainer in FITTERS.values():  # the sections the fitting methods read (laplace: {...})
        fields.update(trainer.recipe_sections)
    recipe = validate(fields, data, "", source)
    recipe["plugins"] = plugins
    section = recipe["reduction"]
    if section is not None:
        own = getattr(FITTERS[recipe["method"]], "reduction_fields", None)
        checked = validate(own or reduction_fields(), section, "reduction", source)
        if checked.get("sparsity") is not None and not checked["sparsity"] < 1:
            raise SpecError(f"expected a fraction in [0, 1), got {checked['sparsity']!r}", source, "reduction.sparsity")
        recipe["reduction"] = {k: v for k, v in checked.items() if k in section}
    if recipe["guide"] not in GUIDES:
        raise SpecError(f"unknown guide {recipe['guide']!r}; expected one of {sorted(GUIDES)}", source, "guide")
    recipe["optimizer"] = _numeric_strings(recipe["optimizer"])
    recipe["schedule"] = _numeric_strings(recipe["schedule"])
    _check_optimizer(recipe["optimizer"], source)
    _check_schedule(recipe["schedule"], source)
    _dry_run(recipe["optimizer"], recipe["schedule"], source)
    check_seed(recipe["seed"], source, "seed")
    if recipe["num_threads"] is not None:
        check_threads(recipe["num_threads"], source, "num_threads")
    if not recipe["nan_lr_factor"] < 1:
        raise SpecError(f"expected a number in (0, 1) (the learning rate is multiplied by it after a NaN), "
                        f"got {recipe['nan_lr_factor']!r}", source, "nan_lr_factor")
    try:
        dev = torch.device(recipe["device"])
    except (RuntimeError, TypeError, ValueError):
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda", "mps"):
        raise SpecError(f"expected 'cpu', 'cuda' or 'cuda:N', got {recipe['device']!r}", source, "device")
    return recipe


def check_seed(seed, source=None, path="seed") -> int:
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < MAX_SEED:
        raise SpecError(f"expected an integer in [0, 2**32), got {seed!r}", source, path)
    return seed


def check_threads(threads, source=None, path="num_threads") -> int:
    """A CPU thread count: an integer in [1, MAX_THREADS]."""
    if isinstance(threads, bool) or not isinstance(threads, int) or not 1 <= threads <= MAX_THREADS:
        raise SpecError(f"expected a number of threads in [1, {MAX_THREADS}], got {threads!r}", source, path)
    return threads


def load_recipe(path: str) -> dict:

    recipe = parse_recipe(load_yaml(path), path)
    recipe["_source"] = path
    return recipe


#: optimisers whose fused single-kernel implementation (CPU and CUDA) is the default here: the
#: same update rule, several times faster than the per-tensor loop for the many small tensors
#: of a guide (override with ``fused: false`` or ``foreach: ...`` in the recipe)
FUSED_BY_DEFAULT = ("Adam", "AdamW")


def make_optimizer(params, cfg: dict) -> torch.optim.Optimizer:
    opts = dict(cfg)
    name = opts.pop("name")
    params = list(params)  # tensors, or parameter groups (dicts with "params")
    tensors = [t for p in params for t in (p["params"] if isinstance(p, dict) else [p])]
    if (name in FUSED_BY_DEFAULT and "fused" not in opts and "foreach" not in opts
            and all(t.device.type in ("cpu", "cuda") and t.is_floating_point() for t in tensors)):
        opts["fused"] = True
    return getattr(torch.optim, name)(params, **opts)


def guide_param_groups(guide, cfg: dict, scale_lr_factor: float = 1.0):
    """Parameter groups for a guide: posterior scales (``log_scale`` parameters) may learn
    ``scale_lr_factor`` times faster than the means.

    Why: the posterior standard deviations start tiny (log sigma^2 = -10, so the network starts
    deterministic) and with Adam each step moves log sigma by at most ~lr, so at lr 1e-3 the
    scales of weights the data barely constrain need thousands of steps to grow towards the
    prior scale. Evidence-based pruning (BMR, Savage-Dickey, OPD) reads those scales.
    """
    if scale_lr_factor == 1.0:
        return list(guide.parameters())
    scales = [p for n, p in guide.named_parameters() if "log_scale" in n]
    ids = {id(p) for p in scales}
    others = [p for p in guide.parameters() if id(p) not in ids]
    groups = [{"params": others}]
    if scales:
        groups.append({"params": scales, "lr": cfg.get("lr", 1e-3) * scale_lr_factor})
    return groups


def make_scheduler(optimizer, cfg: dict, epochs: int):
    opts = dict(cfg)
    name = opts.pop("name", "none")
    cls = SCHEDULES[name]
    if cls is None:
        return None
    if name == "cosine":
        opts["T_max"] = epochs
    return cls(optimizer, **opts)
