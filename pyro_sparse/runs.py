"""Runs on disk: "model spec + inference recipe + data" -> a directory of results.

A run directory holds ``model.yaml`` and ``inference.yaml`` (copies of what was run),
``run.json`` (versions, seed, data name and fingerprint), ``metrics.jsonl`` (one line per
epoch), ``checkpoint.pt`` and, when done, ``metrics.json``. :func:`fit_run` creates or resumes
one; :func:`load_run` rebuilds the fitted network and guide from one.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import warnings
from dataclasses import dataclass

import torch
import yaml

from .checkpoint import load_safe, write_json_atomic, write_text_atomic
from .data import Dataset, load_dataset
from .errors import PyroSparseError, SpecError
from .fitting import CHECKPOINT, SVITrainer
from .guides import build_guide
from .recipe import load_recipe, parse_recipe
from .spec import build_network, load_model_spec, parse_model_spec

FITTERS = {"svi": SVITrainer}


def register_fitter(method: str, trainer_cls):
    FITTERS[method] = trainer_cls


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
    except (TypeError, ValueError) as e:
        raise SpecError(str(e), recipe.get("_source"), "guide_options") from None
    return network, guide


def make_trainer(run: Run, out_dir=None, progress=True):
    cls = FITTERS[run.recipe.get("method", "svi")]
    return cls(run.network, run.guide, run.dataset, run.recipe, out_dir=out_dir, progress=progress)


def fit_run(model_path: str, recipe_path: str, data: str, out_dir: str, epochs=None, seed=None,
            device=None, resume=False, overwrite=False, target=None, progress=True) -> tuple[Run, dict]:
    """Fit a model spec with a recipe on data into ``out_dir``; returns (run, final metrics)."""
    ckpt = os.path.join(out_dir, CHECKPOINT)
    if resume:
        if not os.path.exists(ckpt):
            raise PyroSparseError(f"{out_dir}: nothing to resume (no {CHECKPOINT})")
        model_spec = load_model_spec(os.path.join(out_dir, "model.yaml"))
        recipe = load_recipe(os.path.join(out_dir, "inference.yaml"))
        info = json.load(open(os.path.join(out_dir, "run.json")))
        data, target = info["data"], info.get("target")
    else:
        if os.path.exists(out_dir) and os.listdir(out_dir):
            if not overwrite:
                raise PyroSparseError(f"{out_dir}: output directory exists and is not empty; "
                                      "use --resume to continue it or --overwrite to replace it")
            shutil.rmtree(out_dir)
        model_spec = load_model_spec(model_path)
        recipe = load_recipe(recipe_path)
        if epochs is not None:
            recipe["epochs"] = epochs
        if seed is not None:
            recipe["seed"] = seed
        if device is not None:
            recipe["device"] = device
    dataset = load_dataset(data, target=target, seed=0, options=model_spec.get("data"))
    network, guide = build(model_spec, recipe, dataset)
    run = Run(network, guide, dataset, model_spec, recipe, out_dir)
    os.makedirs(out_dir, exist_ok=True)
    if not resume:
        write_text_atomic(os.path.join(out_dir, "model.yaml"), yaml.safe_dump(_strip(model_spec), sort_keys=False))
        write_text_atomic(os.path.join(out_dir, "inference.yaml"), yaml.safe_dump(_strip(recipe), sort_keys=False))
        write_json_atomic(os.path.join(out_dir, "run.json"), {
            "data": data, "target": target, "data_fingerprint": dataset.fingerprint(),
            "seed": recipe["seed"], "versions": versions(),
            "model_source": os.path.abspath(model_path), "inference_source": os.path.abspath(recipe_path)})
    run.trainer = make_trainer(run, out_dir, progress)
    metrics = run.trainer.fit(epochs=recipe["epochs"], resume=resume)
    metrics.update({"model": model_spec.get("name"), "data": data, "method": recipe["method"],
                    "guide": recipe["guide"]})
    write_json_atomic(os.path.join(out_dir, "metrics.json"), metrics)
    return run, metrics


def load_run(directory: str, data: str | None = None, device="cpu") -> Run:
    """Rebuild the fitted network and guide of a run directory (on ``device``)."""
    for name in ("model.yaml", "inference.yaml", "run.json", CHECKPOINT):
        if not os.path.exists(os.path.join(directory, name)):
            raise PyroSparseError(f"{directory}: not a run directory (missing {name})")
    model_spec = load_model_spec(os.path.join(directory, "model.yaml"))
    recipe = load_recipe(os.path.join(directory, "inference.yaml"))
    recipe["device"] = device
    info = json.load(open(os.path.join(directory, "run.json")))
    dataset = load_dataset(data or info["data"], target=info.get("target"), seed=0, options=model_spec.get("data"))
    if data is None and dataset.fingerprint() != info.get("data_fingerprint"):
        warnings.warn(f"{directory}: the data {info['data']!r} differ from the data this run was fitted on "
                      "(fingerprint mismatch)", stacklevel=2)
    network, guide = build(model_spec, recipe, dataset)
    run = Run(network, guide, dataset, model_spec, recipe, directory)
    run.trainer = make_trainer(run, directory, progress=False)
    run.trainer.resume()
    return run


def parse_specs(model: dict, recipe: dict) -> tuple[dict, dict]:
    """Parse in-memory spec and recipe mappings (the Python API's equivalent of the YAML files)."""
    return parse_model_spec(model, "<model>"), parse_recipe(recipe, "<inference>")
