"""Runs on disk: "model spec + inference recipe + data" -> a directory of results.

A run directory holds ``model.yaml`` and ``inference.yaml`` (copies of what was run),
``run.json`` (versions, seed, data name and fingerprint), ``metrics.jsonl`` (one line per
epoch), ``checkpoint.pt`` and, when done, ``metrics.json``. :func:`fit_run` creates or resumes
one; :func:`load_run` rebuilds the fitted network and guide from one.

Under ``torchrun`` (or with ``distributed=True``) :func:`fit_run` joins the process group and
fits data-parallel; every rank reads the specs, data and (on resume) the checkpoint, and only
rank 0 creates, clears or writes files in the run directory.
"""

from __future__ import annotations

import os
import platform
import shutil
import warnings
from dataclasses import dataclass

import torch
import yaml

from . import distributed as ddp
from .checkpoint import read_json, write_json_atomic, write_text_atomic
from .data import Dataset, load_dataset
from .errors import PyroSparseError, PyroSparseWarning, SpecError
from .fitting import CHECKPOINT
from .guides import build_guide
from .recipe import RECIPE_FIELDS, check_device, check_seed, load_recipe, parse_recipe
from .registry import FITTERS
from .spec import build_network, load_model_spec, parse_model_spec, recipe_of

@dataclass
class Run:
    network: object
    guide: object
    dataset: Dataset
    model_spec: dict
    recipe: dict
    directory: str | None = None
    trainer: object = None


def versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    from . import __version__

    out = {"pyro_sparse": __version__, "python": platform.python_version()}
    for package in ("torch", "pyro-ppl", "numpy", "arviz"):
        try:
            out[package] = version(package)
        except PackageNotFoundError:
            out[package] = None
    return out


def _strip(d: dict) -> dict:
    return {k: v for k, v in d.items() if not k.startswith("_")}


def build(model_spec: dict, recipe: dict, dataset: Dataset) -> tuple:
    """(network, guide) for a parsed spec and recipe, seeded by the recipe's seed."""
    torch.manual_seed(recipe["seed"])
    network = build_network(model_spec, dataset.feature_shape, dataset.num_outputs, dataset.image_shape)
    try:
        guide = build_guide(recipe["guide"], network.model, **recipe["guide_options"])
    except (TypeError, ValueError, ArithmeticError) as e:
        raise SpecError(str(e), recipe.get("_source"), "guide_options") from None
    return network, guide


def make_trainer(run: Run, out_dir=None, progress=True):
    cls = FITTERS[run.recipe.get("method", "svi")]  # SVITrainer, LaplaceTrainer, IterativeBMRTrainer, ...
    return cls(run.network, run.guide, run.dataset, run.recipe, out_dir=out_dir, progress=progress)


def _check_out_dir(out_dir, resume, overwrite):
    """Refuse to write into a non-empty directory unless resuming it or told to overwrite a run."""
    if not isinstance(out_dir, (str, os.PathLike)) or not os.fspath(out_dir):
        raise PyroSparseError(f"the output directory must be a path, got {out_dir!r}")
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise PyroSparseError(f"{out_dir}: exists and is not a directory")
    if resume:
        ckpt = os.path.join(out_dir, CHECKPOINT)
        if not (os.path.exists(ckpt) or os.path.exists(ckpt + ".prev")):
            raise PyroSparseError(f"{out_dir}: nothing to resume (no {CHECKPOINT})")
        return
    if os.path.isdir(out_dir) and os.listdir(out_dir):
        if not overwrite:
            raise PyroSparseError(f"{out_dir}: output directory exists and is not empty; "
                                  "use --resume to continue it or --overwrite to replace it")
        if not os.path.exists(os.path.join(out_dir, "run.json")):
            raise PyroSparseError(f"{out_dir}: --overwrite only replaces a previous run directory (one with "
                                  "run.json); this one is not, so it is left alone")


def _overrides(recipe: dict, epochs, seed, device) -> dict:
    """Validated command-line overrides of a recipe's epochs, seed and device."""
    out = {}
    if epochs is not None:
        out["epochs"] = RECIPE_FIELDS["epochs"].check(epochs, "--epochs", None)
    if seed is not None:
        out["seed"] = check_seed(seed, None, "--seed")
    if device is not None:
        if not isinstance(device, str):
            raise SpecError(f"expected a device name such as 'cpu' or 'cuda', got {device!r}", None, "--device")
        out["device"] = device
    check_device(out.get("device", recipe["device"]), "--device" if device is not None else "device")
    return out


def fit_run(model_path: str, recipe_path: str | None, data: str, out_dir: str, epochs=None, seed=None,
            device=None, resume=False, overwrite=False, target=None, progress=True,
            distributed=None) -> tuple[Run, dict]:
    """Fit a model spec with a recipe on data into ``out_dir``; returns (run, final metrics).

    ``recipe_path`` None: the recipe the spec names (``recipe:``).

    Everything (specs, recipe, overrides, device, data, network) is validated before
    ``out_dir`` is created or, with ``overwrite``, removed; ``overwrite`` only replaces a
    directory holding a previous run (``run.json``).

    ``distributed``: True requires the torchrun environment and fits data-parallel; None (the
    default) does so when that environment describes more than one process; False never.
    """
    _check_out_dir(out_dir, resume, overwrite)
    out_dir = os.fspath(out_dir)
    clear = not resume and os.path.isdir(out_dir) and bool(os.listdir(out_dir))  # decided before any rank writes
    if resume:
        for name in os.listdir(out_dir) if ddp.env_rank() == 0 else ():  # left by a write a kill interrupted
            if name.startswith(".tmp-"):
                os.unlink(os.path.join(out_dir, name))
        model_spec = load_model_spec(os.path.join(out_dir, "model.yaml"))
        recipe = load_recipe(os.path.join(out_dir, "inference.yaml"))
        info = read_json(os.path.join(out_dir, "run.json"), "run record")
        data, target = info.get("data"), info.get("target")
        if not isinstance(data, str):
            raise PyroSparseError(f"{os.path.join(out_dir, 'run.json')}: no data set recorded")
        changes = _overrides(recipe, epochs, seed, device)
        for key in ("epochs", "seed"):
            if key in changes and changes[key] != recipe[key]:
                raise PyroSparseError(f"--{key} {changes[key]} differs from this run's {key} {recipe[key]}; a "
                                      f"resumed run continues with its own recipe ({out_dir}/inference.yaml)")
        recipe.update(changes)
    else:
        model_spec = load_model_spec(model_path)
        if recipe_path is None:  # the spec's own recipe
            recipe_path = recipe_of(model_spec)
        recipe = load_recipe(recipe_path)
        recipe.update(_overrides(recipe, epochs, seed, device))
    dataset = load_dataset(data, target=target, seed=0, options=model_spec.get("data"))
    owner = False  # whether this call creates (and so ends) the process group
    if distributed or (distributed is None and ddp.launched_by_torchrun()):
        owner = ddp.init_from_env(device=recipe["device"])
    network, guide = build(model_spec, recipe, dataset)
    run = Run(network, guide, dataset, model_spec, recipe, out_dir)
    run.trainer = make_trainer(run, out_dir, progress)  # validates the data against the network
    main = ddp.is_main_process()
    if clear and main:
        shutil.rmtree(out_dir)  # only with overwrite, on a run directory (_check_out_dir)
    if main:
        os.makedirs(out_dir, exist_ok=True)
    if not resume and main:
        saved = _strip(model_spec)
        if saved.get("recipe"):  # the copy lives elsewhere: name the spec's recipe by its absolute path
            try:
                saved["recipe"] = recipe_of(model_spec)
            except SpecError:  # a copied spec whose recipe is not beside it (fitted with --inference)
                del saved["recipe"]
        write_text_atomic(os.path.join(out_dir, "model.yaml"), yaml.safe_dump(saved, sort_keys=False))
        write_text_atomic(os.path.join(out_dir, "inference.yaml"), yaml.safe_dump(_strip(recipe), sort_keys=False))
        write_json_atomic(os.path.join(out_dir, "run.json"), {
            "data": data, "target": target, "data_fingerprint": dataset.fingerprint(),
            "seed": recipe["seed"], "versions": versions(),
            "model_source": os.path.abspath(model_path), "inference_source": os.path.abspath(recipe_path),
            "model_spec": _strip(model_spec), "recipe": _strip(recipe)})
    metrics = run.trainer.fit(epochs=recipe["epochs"], resume=resume)
    metrics.update({"model": model_spec.get("name"), "data": data, "method": recipe["method"],
                    "guide": recipe["guide"]})
    if main:
        write_json_atomic(os.path.join(out_dir, "metrics.json"), metrics)
    if owner:
        ddp.shutdown()
    return run, metrics


def load_run(directory: str, data: str | None = None, device="cpu") -> Run:
    """Rebuild the fitted network and guide of a run directory (on ``device``)."""
    if not isinstance(directory, (str, os.PathLike)) or not os.path.isdir(directory):
        raise PyroSparseError(f"{directory}: not a run directory (no such directory)")
    directory = os.fspath(directory)
    for name in ("model.yaml", "inference.yaml", "run.json"):
        if not os.path.exists(os.path.join(directory, name)):
            raise PyroSparseError(f"{directory}: not a run directory (missing {name})")
    if not any(os.path.exists(os.path.join(directory, CHECKPOINT + s)) for s in ("", ".prev")):
        raise PyroSparseError(f"{directory}: not a run directory (missing {CHECKPOINT})")
    model_spec = load_model_spec(os.path.join(directory, "model.yaml"))
    recipe = load_recipe(os.path.join(directory, "inference.yaml"))
    recipe["device"] = device
    check_device(device)
    info = read_json(os.path.join(directory, "run.json"), "run record")
    if data is None and not isinstance(info.get("data"), str):
        raise PyroSparseError(f"{os.path.join(directory, 'run.json')}: no data set recorded; pass data=")
    dataset = load_dataset(data or info["data"], target=info.get("target"), seed=0, options=model_spec.get("data"))
    if dataset.fingerprint() != info.get("data_fingerprint"):
        if data is None:
            msg = (f"{directory}: the data {info['data']!r} differ from the data this run was fitted on "
                   "(fingerprint mismatch)")
        else:
            msg = (f"{directory}: evaluating on {data!r}, whose fingerprint differs from the data this run was "
                   f"fitted on ({info.get('data')!r}, sha256 {str(info.get('data_fingerprint'))[:12]}...)")
        warnings.warn(msg, PyroSparseWarning, stacklevel=2)
    network, guide = build(model_spec, recipe, dataset)
    run = Run(network, guide, dataset, model_spec, recipe, directory)
    run.trainer = make_trainer(run, directory, progress=False)
    run.trainer.resume()
    return run


def parse_specs(model: dict, recipe: dict) -> tuple[dict, dict]:
    """Parse in-memory spec and recipe mappings (the Python API's equivalent of the YAML files)."""
    return parse_model_spec(model, "<model>"), parse_recipe(recipe, "<inference>")

