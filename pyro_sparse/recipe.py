"""Inference recipes (``inference/*.yaml``): how to fit a model.

::

    method: svi                    # svi (others register themselves, e.g. laplace)
    guide: meanfield               # meanfield | delta | (structured, lowrank, ...)
    guide_options: {init_scale: 0.0067}
    local_reparam: true
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
    num_threads: null              # torch CPU threads (null: torch's default)
    reduction: {...}               # read by the reduction module

:func:`parse_recipe` validates every key with errors that name the file and field.
"""

from __future__ import annotations

import inspect

import torch

from .errors import SpecError
from .schema import Field, validate

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
    "method": Field("choice", "svi", choices=("svi",)),
    "guide": Field("str", "meanfield"),
    "guide_options": Field("dict", {}),
    "local_reparam": Field("bool", True),
    "optimizer": Field("dict", {"name": "Adam", "lr": 1e-3}),
    "schedule": Field("dict", {"name": "none"}),
    "epochs": Field("int", 50, positive=True),
    "batch_size": Field("int", 128, positive=True),
    "kl_warmup_epochs": Field("float", 0.0, nonneg=True),
    "kl_free_epochs": Field("float", 0.0, nonneg=True),
    "grad_clip": Field("float", None, positive=True, allow_none=True),
    "eval_samples": Field("int", 10, positive=True),
    "eval_every": Field("int", 1, positive=True),
    "seed": Field("int", 0, nonneg=True),
    "device": Field("str", "cpu"),
    "num_threads": Field("int", None, positive=True, allow_none=True),
    "reduction": Field("dict", None, allow_none=True),
    "nan_retries": Field("int", 3, nonneg=True),
    "nan_lr_factor": Field("float", 0.5, positive=True),
}

#: other sections that fitting methods registered elsewhere may add (e.g. laplace)
EXTRA_SECTIONS: dict[str, Field] = {}
METHODS = ["svi"]


def register_method(name: str, **sections: Field):
    """Allow ``method: <name>`` and the recipe sections that method reads."""
    METHODS.append(name)
    EXTRA_SECTIONS.update(sections)


def _check_optimizer(cfg, source):
    opts = dict(cfg)
    name = opts.pop("name", None)
    cls = getattr(torch.optim, name, None) if isinstance(name, str) else None
    if not (isinstance(cls, type) and issubclass(cls, torch.optim.Optimizer)):
        raise SpecError(f"unknown optimizer {name!r}; expected a torch.optim class name such as 'Adam'",
                        source, "optimizer.name")
    allowed = set(inspect.signature(cls.__init__).parameters) - {"self", "params"}
    for key, value in opts.items():
        if key not in allowed:
            raise SpecError(f"{name} has no option {key!r}; expected one of {sorted(allowed)}", source,
                            f"optimizer.{key}")
        if key == "lr" and not (isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0):
            raise SpecError(f"expected a number > 0, got {value!r}", source, "optimizer.lr")


def _check_schedule(cfg, source):
    opts = dict(cfg)
    name = opts.pop("name", "none")
    if name not in SCHEDULES:
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


def parse_recipe(data: dict, source: str | None = None) -> dict:
    """Validate an inference recipe; return it with defaults filled in."""
    fields = dict(RECIPE_FIELDS)
    fields["method"] = Field("choice", "svi", choices=tuple(METHODS))
    fields.update(EXTRA_SECTIONS)
    recipe = validate(fields, data, "", source)
    from .guides import GUIDES

    if recipe["guide"] not in GUIDES:
        raise SpecError(f"unknown guide {recipe['guide']!r}; expected one of {sorted(GUIDES)}", source, "guide")
    _check_optimizer(recipe["optimizer"], source)
    _check_schedule(recipe["schedule"], source)
    if recipe["device"] != "cpu" and not recipe["device"].startswith(("cuda", "mps")):
        raise SpecError(f"expected 'cpu', 'cuda' or 'cuda:N', got {recipe['device']!r}", source, "device")
    return recipe


def load_recipe(path: str) -> dict:
    from .spec import load_yaml

    recipe = parse_recipe(load_yaml(path), path)
    recipe["_source"] = path
    return recipe


def make_optimizer(params, cfg: dict) -> torch.optim.Optimizer:
    opts = dict(cfg)
    return getattr(torch.optim, opts.pop("name"))(params, **opts)


def make_scheduler(optimizer, cfg: dict, epochs: int):
    opts = dict(cfg)
    name = opts.pop("name", "none")
    cls = SCHEDULES[name]
    if cls is None:
        return None
    if name == "cosine":
        opts["T_max"] = epochs
    return cls(optimizer, **opts)
