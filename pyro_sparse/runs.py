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
from dataclasses import dataclass, replace

import torch
import yaml

from . import distributed as ddp
from .checkpoint import load_safe, read_json, write_json_atomic, write_text_atomic
from .data import BUILTIN, Dataset, load_dataset
from .errors import PyroSparseError, PyroSparseWarning, SpecError
from .guides import build_guide
from .recipe import RECIPE_FIELDS, check_device, check_seed, check_threads, load_recipe, parse_recipe
from .registry import FITTERS
from .rundir import CHECKPOINT, check_out_dir, check_run_dir
from .schema import short_repr
from .spec import (
    build_network,
    data_task,
    init_is_state_dict,
    init_path,
    load_model_spec,
    parse_model_spec,
    recipe_of,
    spec_name,
)


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


def start_from_run(network, model_spec: dict):
    """A spec's ``init`` naming a run directory: the network starts at that run's posterior means
    (a MAP run's weights; ``trainer.posterior_summary()``), site by site. A state_dict file is
    loaded by :func:`~pyro_sparse.spec.build_network` itself."""
    path = init_path(model_spec)
    if path is None or init_is_state_dict(path):
        return
    source = model_spec.get("_source")
    if not os.path.isdir(path):
        raise SpecError(f"no such run directory (or state_dict file) {path!r}", source, "init")
    try:
        previous = load_run(path)
        values = previous.trainer.posterior_summary().locs()
    except PyroSparseError as e:
        raise SpecError(f"cannot start from the run {path}: {e}", source, "init") from None
    sites = network.param_sites()
    missing = sorted(set(sites) - set(values))
    if missing:
        raise SpecError(f"the run {path} has no sites {missing[:3]} of this network; it must have the same "
                        "layers", source, "init")
    try:
        network.start_at({k: values[k] for k in sites})
        frozen = previous.network.frozen_state()  # e.g. the running statistics that fit left its batch norms
        if frozen:
            network.load_frozen_state(frozen)
    except ValueError as e:
        raise SpecError(f"the run {path} does not fit this network: {e}", source, "init") from None


def make_trainer(run: Run, out_dir=None, progress=True):
    cls = FITTERS[run.recipe.get("method", "svi")]  # SVITrainer, LaplaceTrainer, IterativeBMRTrainer, ...
    return cls(run.network, run.guide, run.dataset, run.recipe, out_dir=out_dir, progress=progress)


def _overrides(recipe: dict, epochs, seed, device, threads=None) -> dict:
    """Validated command-line overrides of a recipe's epochs, seed, device and threads."""
    out = {}
    if epochs is not None:
        out["epochs"] = RECIPE_FIELDS["epochs"].check(epochs, "--epochs", None)
    if threads is not None:
        out["num_threads"] = check_threads(threads, None, "--threads")
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
            distributed=None, threads=None, init=None) -> tuple[Run, dict]:
    """Fit a model spec with a recipe on data into ``out_dir``; returns (run, final metrics).

    ``recipe_path`` None: the recipe the spec names (``recipe:``). ``epochs``, ``seed``, ``device``
    and ``threads`` (torch CPU threads, the recipe's ``num_threads``) override the recipe's.
    ``init``: a state_dict file or a run directory to start from, in place of the spec's own ``init:``.

    Everything (specs, recipe, overrides, device, data, network) is validated before
    ``out_dir`` is created or, with ``overwrite``, removed; ``overwrite`` only replaces a
    directory holding a previous run (``run.json``).

    ``distributed``: True requires the torchrun environment and fits data-parallel; None (the
    default) does so when that environment describes more than one process; False never.
    """
    check_out_dir(out_dir, resume, overwrite)
    out_dir = os.fspath(out_dir)
    clear = not resume and os.path.isdir(out_dir) and bool(os.listdir(out_dir))  # decided before any rank writes
    if resume:
        for name in os.listdir(out_dir) if ddp.env_rank() == 0 else ():  # left by a write a kill interrupted
            if name.startswith(".tmp-"):
                os.unlink(os.path.join(out_dir, name))
        model_spec = load_model_spec(os.path.join(out_dir, "model.yaml"))
        recipe = load_recipe(os.path.join(out_dir, "inference.yaml"))
        info = read_json(os.path.join(out_dir, "run.json"), "run record")
        _check_resume_inputs(out_dir, model_spec, recipe, info, model_path, recipe_path, data, target)
        data, target = info.get("data"), info.get("target")
        if not isinstance(data, str):
            raise PyroSparseError(f"{os.path.join(out_dir, 'run.json')}: no data set recorded")
        changes = _overrides(recipe, epochs, seed, device, threads)
        for key in ("seed",):
            if key in changes and changes[key] != recipe[key]:
                raise PyroSparseError(f"--{key} {changes[key]} differs from this run's {key} {recipe[key]}; a "
                                      f"resumed run continues with its own recipe ({out_dir}/inference.yaml)")
        extension = _resume_epochs(out_dir, recipe, changes.get("epochs"))
        recipe.update(changes)
    else:
        model_spec = load_model_spec(model_path)
        if init is not None:
            model_spec["init"] = os.path.abspath(init)
        if recipe_path is None:  # the spec's own recipe
            recipe_path = recipe_of(model_spec)
        recipe = load_recipe(recipe_path)
        recipe.update(_overrides(recipe, epochs, seed, device, threads))
        extension = None
    dataset = load_dataset(data, target=target, seed=0, options=model_spec.get("data"), task=data_task(model_spec))
    owner = False  # whether this call creates (and so ends) the process group
    if distributed or (distributed is None and ddp.launched_by_torchrun()):
        owner = ddp.init_from_env(device=recipe["device"])
    network, guide = build(model_spec, recipe, dataset)
    if not resume:
        start_from_run(network, model_spec)
    run = Run(network, guide, dataset, model_spec, recipe, out_dir)
    run.trainer = make_trainer(run, out_dir, progress)  # validates the data against the network
    main = ddp.is_main_process()
    existed = os.path.isdir(out_dir)  # a directory the user had is never removed (_discard_unstarted_run)
    if clear and main:
        shutil.rmtree(out_dir)  # only with overwrite, on a run directory (check_out_dir)
    if main:
        os.makedirs(out_dir, exist_ok=True)
    if not resume and main:
        saved = _strip(model_spec)
        if saved.get("recipe"):  # the copy lives elsewhere: name the spec's recipe by its absolute path
            try:
                saved["recipe"] = recipe_of(model_spec)
            except SpecError:  # a copied spec whose recipe is not beside it (fitted with --inference)
                del saved["recipe"]
        if saved.get("init"):  # like the recipe: the copy names it by its absolute path
            saved["init"] = init_path(model_spec)
        write_text_atomic(os.path.join(out_dir, "model.yaml"), yaml.safe_dump(saved, sort_keys=False))
        write_text_atomic(os.path.join(out_dir, "inference.yaml"), yaml.safe_dump(_strip(recipe), sort_keys=False))
        write_json_atomic(os.path.join(out_dir, "run.json"), {
            "data": data_reference(data), "data_as_given": data, "target": target,
            "data_fingerprint": dataset.fingerprint(),
            "input_transform": dataset.extras.get("input_transform"),
            "target_transform": dataset.extras.get("target_transform"),
            "seed": recipe["seed"], "versions": versions(),
            "model_source": os.path.abspath(model_path), "inference_source": os.path.abspath(recipe_path),
            "model_spec": _strip(model_spec), "recipe": _strip(recipe),
            "feature_shape": list(dataset.feature_shape), "num_outputs": dataset.num_outputs,
            # the objective as it runs: which ELBO and, per site, which KL path (CoreELBO.explain)
            "elbo_path": getattr(run.trainer, "elbo_path", None), "kl_paths": getattr(run.trainer, "kl_paths", None)})
    if resume and main and extension:
        _record_extension(out_dir, *extension)
    try:
        metrics = run.trainer.fit(epochs=recipe["epochs"], resume=resume)
    except Exception:
        if main and not resume:
            _discard_unstarted_run(out_dir, created=not existed)
        raise
    metrics.update({"model": spec_name(model_spec), "data": data, "method": recipe["method"],
                    "guide": recipe["guide"]})
    if main:
        if not os.path.exists(os.path.join(out_dir, "run.json")):
            raise PyroSparseError(f"{out_dir}: the run directory (or its run.json) disappeared during the fit; "
                                  "metrics.json is not written")
        write_json_atomic(os.path.join(out_dir, "metrics.json"), metrics)
    if owner:
        ddp.shutdown()
    return run, metrics


def data_reference(data: str) -> str:
    """How a run records its data: a built-in set by name, a file or directory by its absolute
    path (so the run still finds it from another working directory)."""
    return data if data in BUILTIN or not os.path.exists(data) else os.path.abspath(data)


def load_run(directory: str, data: str | None = None, device: str = "cpu") -> Run:
    """Rebuild the fitted network and guide of a run directory (on ``device``)."""
    directory = check_run_dir(directory)
    model_spec = load_model_spec(os.path.join(directory, "model.yaml"))
    recipe = load_recipe(os.path.join(directory, "inference.yaml"))
    recipe["device"] = device
    check_device(device)
    info = read_json(os.path.join(directory, "run.json"), "run record")
    if data is None and not isinstance(info.get("data"), str):
        raise PyroSparseError(f"{os.path.join(directory, 'run.json')}: no data set recorded; pass data=")
    if data is None and info["data"] not in BUILTIN and not os.path.exists(info["data"]):
        raise PyroSparseError(f"{directory}: the data this run was fitted on, {info['data']}, is not there any more; "
                              "give its new place with --data (its fingerprint is checked)")
    dataset = load_dataset(data or info["data"], target=info.get("target"), seed=0, options=model_spec.get("data"),
                           task=data_task(model_spec))
    if data is not None:
        dataset = _fit_data_to_run(directory, info, dataset, data)
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


# ---------------------------------------------------------------------------- resume and evaluate checks
#: files fit writes before its first checkpoint (removed again if the fit fails before that)
_RUN_FILES = ("model.yaml", "inference.yaml", "run.json", "metrics.jsonl", "metrics.json")
#: recipe keys with their own command-line flags: overridden at fit time, so not compared on resume
_FLAG_KEYS = ("epochs", "seed", "device", "num_threads")


def _discard_unstarted_run(out_dir, created):
    """After a fit failed before its first checkpoint, leave ``out_dir`` as it was: remove it if
    this call created it, else remove only the files fit wrote into it (a directory the user
    already had, empty or just cleared by ``--overwrite``, stays). A run with a checkpoint is
    kept: ``--resume`` continues it."""
    if any(os.path.exists(os.path.join(out_dir, CHECKPOINT + s)) for s in ("", ".prev")):
        return
    if created:
        shutil.rmtree(out_dir, ignore_errors=True)
        return
    for name in os.listdir(out_dir) if os.path.isdir(out_dir) else ():
        if name in _RUN_FILES or name.startswith(".tmp-"):
            try:
                os.unlink(os.path.join(out_dir, name))
            except OSError:
                pass


def _differences(a, b, path="") -> list[str]:
    """Where two parsed specs differ, as 'path: a vs b' (nested mappings and lists; values cut short)."""
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for key in sorted(set(a) | set(b), key=str):
            sub = f"{path}.{key}" if path else str(key)
            if key not in a or key not in b:
                out.append(f"{sub}: {short_repr(a.get(key, '(absent)'), 40)} vs "
                           f"{short_repr(b.get(key, '(absent)'), 40)}")
            else:
                out += _differences(a[key], b[key], sub)
        return out
    if isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            return [f"{path}: {len(a)} entries vs {len(b)}"]
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in _differences(x, y, f"{path}[{i}]")]
    return [] if a == b else [f"{path or '(top)'}: {short_repr(a, 40)} vs {short_repr(b, 40)}"]


def _check_resume_inputs(out_dir, model_spec, recipe, info, model_path, recipe_path, data, target):
    """``fit --resume`` continues a run with its own specs and data: a ``--model``,
    ``--inference``, ``--data`` or ``--target`` given with it must say the same thing (then it is
    harmless), else the resume is refused, naming the difference. Specs are compared parsed (so
    formatting and defaults do not count); recipe keys with their own flags (epochs, seed,
    device) are left to those flags."""
    def refuse(flag, given, saved, diffs):
        shown = "; ".join(diffs[:3]) + (f"; and {len(diffs) - 3} more" if len(diffs) > 3 else "")
        raise PyroSparseError(f"{flag} {given} differs from this run's {saved} ({shown}); a resumed run continues "
                              f"with its own specs and data: drop {flag}, or fit a new run into another --out")

    if model_path is not None:
        given = _strip(load_model_spec(model_path))
        diffs = _differences(_strip(model_spec), given)
        if diffs:
            refuse("--model", model_path, os.path.join(out_dir, "model.yaml"), [f"{d} (run vs given)" for d in diffs])
    if recipe_path is not None:
        given = _strip(load_recipe(recipe_path))
        saved = _strip(recipe)
        diffs = _differences({k: v for k, v in saved.items() if k not in _FLAG_KEYS},
                             {k: v for k, v in given.items() if k not in _FLAG_KEYS})
        if diffs:
            refuse("--inference", recipe_path, os.path.join(out_dir, "inference.yaml"),
                   [f"{d} (run vs given)" for d in diffs])
    run_json = os.path.join(out_dir, "run.json")
    saved_data = info.get("data")
    if data is not None and isinstance(saved_data, str) and data_reference(data) != saved_data:
        same = os.path.exists(data) and os.path.exists(saved_data) and os.path.samefile(data, saved_data)
        if not same:
            refuse("--data", data, f"data {saved_data!r} ({run_json})", [f"{saved_data!r} vs {data!r}"])
    if target is not None and target != info.get("target"):
        refuse("--target", target, f"target {info.get('target')!r} ({run_json})",
               [f"{info.get('target')!r} vs {target!r}"])


def _epochs_done(out_dir):
    """Epochs in the run's checkpoint (or the previous one, as resume would use); None if neither loads."""
    for name in (CHECKPOINT, CHECKPOINT + ".prev"):
        try:
            epoch = load_safe(os.path.join(out_dir, name)).get("epoch")
        except (PyroSparseError, AttributeError):
            continue
        if isinstance(epoch, int):
            return epoch
    return None


def _resume_epochs(out_dir, recipe, epochs):
    """``fit --resume --epochs N`` with N other than the run's: allowed down to the epochs done
    (a finished 15-epoch run extends to 25; the cosine schedule is stretched, see
    ``SVITrainer._extend_schedule``), refused below. Returns ``(old, new, done)`` or None."""
    if epochs is None or epochs == recipe["epochs"]:
        return None
    done = _epochs_done(out_dir)
    if done is not None and epochs < done:
        raise PyroSparseError(f"--epochs {epochs} is below the {done} epochs this run has already done "
                              f"({out_dir}); a resumed run can only continue or be extended: --epochs {done} or more")
    return recipe["epochs"], epochs, done


def _record_extension(out_dir, old, new, done):
    """Write a resumed run's new length into its ``inference.yaml`` (so a later ``--resume``
    and ``load_run`` see it) and log the change in ``run.json`` (``epoch_changes``)."""
    path = os.path.join(out_dir, "inference.yaml")
    with open(path) as f:
        saved = yaml.safe_load(f)
    saved["epochs"] = new
    write_text_atomic(path, yaml.safe_dump(saved, sort_keys=False))
    info_path = os.path.join(out_dir, "run.json")
    info = read_json(info_path, "run record")
    info.setdefault("epoch_changes", []).append({"from": old, "to": new, "epochs_done": done})
    if isinstance(info.get("recipe"), dict):
        info["recipe"]["epochs"] = new
    write_json_atomic(info_path, info)


def _fit_data_to_run(directory, info, dataset, data):
    """Data given to ``load_run`` / ``evaluate --data`` must fit the fitted network: the same
    example shape (run.json's ``feature_shape``), and for labels no class beyond the network's
    outputs; fewer classes are fine (the network keeps its outputs). Runs fitted before
    run.json recorded the shapes are checked only by the checkpoint's parameter shapes."""
    shape = info.get("feature_shape")
    if isinstance(shape, list) and list(dataset.feature_shape) != shape:
        def size(s):
            return f"{s[0]} feature(s)" if len(s) == 1 else f"shape {list(s)}"

        raise PyroSparseError(f"{data}: examples have {size(list(dataset.feature_shape))} but the network of "
                              f"{directory} was fitted on examples with {size(shape)} ({info.get('data')!r}); "
                              "the features do not match the network")
    outputs = info.get("num_outputs")
    if isinstance(outputs, int) and dataset.num_outputs != outputs:
        if dataset.task == "classification" and dataset.num_outputs < outputs:
            return replace(dataset, num_outputs=outputs)
        what = "classes" if dataset.task == "classification" else "targets per example"
        raise PyroSparseError(f"{data}: the data have {dataset.num_outputs} {what} but the network of {directory} "
                              f"has {outputs}")
    return dataset


def parse_specs(model: dict, recipe: dict) -> tuple[dict, dict]:
    """Parse in-memory spec and recipe mappings (the Python API's equivalent of the YAML files)."""
    return parse_model_spec(model, "<model>"), parse_recipe(recipe, "<inference>")
