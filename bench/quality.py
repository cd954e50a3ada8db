"""Quality: fit each registry entry, reduce its posterior by each rule, and measure the result.

One *task* is one (model, method, seed): build the network and guide from the entry's spec and
recipe (:func:`pyro_sparse.runs.build`, seeded by the recipe's seed), fit with the recipe's
trainer, summarise the posterior (``trainer.posterior_summary()``: the guide's, or the Laplace
posterior of SpaM), and for every rule of the method

* decide (:func:`pyro_sparse.reduction.reduce`), build the compact network
  (:func:`~pyro_sparse.rebuild`, units physically removed) and count what went
  (:func:`~pyro_sparse.outcome.reduction_report`);
* measure test accuracy, NLL and ECE of the compact network (posterior means: the network one
  deploys) and, for sampled posteriors, of the masked posterior predictive (``S`` draws).

Threshold-free rules are also swept over :data:`~bench.registry.SPARSITIES` (the masked
posterior-mean network; no fine-tuning). Tasks run in worker processes, one torch thread each;
a task returns plain numbers (and writes its seed-0 compact networks for the latency section).
"""

from __future__ import annotations

import os
import time
import traceback

import torch

from .metrics import classification_metrics
from .registry import METHODS, MODELS, SPARSITIES, resolve, scale_recipe

_DATA = {}


def dataset(name):
    from pyro_sparse.data import load_dataset

    if name not in _DATA:
        _DATA[name] = load_dataset(name)
    return _DATA[name]


def decide(rule, summary, recipe, seed=0, sparsity=None):
    """The decision of a benchmark rule: by name through the library's one rule registry (the
    recipe's own ``reduction.method`` where the rule names none)."""
    from pyro_sparse.reduction import reduce

    section = recipe.get("reduction") or {}
    name = rule.method or section.get("method")
    options = {"structured": rule.structured, "seed": seed}
    q = rule.sparsity if sparsity is None else sparsity
    if q is not None:
        options["sparsity"] = q
    else:
        threshold = rule.threshold
        if threshold is None and rule.from_recipe and section.get("threshold") is not None:
            threshold = section["threshold"]
        if threshold is not None:
            options["threshold"] = threshold
    return reduce(summary, name, **options)


@torch.no_grad()
def _predictive(network, guide, x, samples):
    return network.sample_outputs(x, guide, samples)


def run_task(task: dict) -> dict:
    """Fit and reduce one (model, method, seed); returns plain numbers (or ``error``)."""
    torch.set_num_threads(1)
    start_cpu, start_wall = time.process_time(), time.perf_counter()
    out = {"model": task["model"], "method": task["method"], "seed": task["seed"]}
    try:
        out.update(_run(task))
    except Exception as e:  # one failing cell must not stop the benchmark
        out["error"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        out["traceback"] = traceback.format_exc(limit=6)
    out["task_cpu_s"] = time.process_time() - start_cpu
    out["task_wall_s"] = time.perf_counter() - start_wall
    return out


def _run(task):
    import pyro

    from pyro_sparse.rebuild import masked_module, masked_predictive
    from pyro_sparse.runs import Run, build, make_trainer, parse_specs

    entry = resolve(MODELS[task["model"]], METHODS[task["method"]])
    method = entry.method
    recipe = scale_recipe(entry.recipe, task["scale"])
    recipe["seed"] = task["seed"]
    recipe["device"] = task.get("device", "cpu")
    recipe["num_threads"] = 1
    spec, recipe = parse_specs(entry.spec, recipe)
    data = dataset(entry.model.data)
    pyro.set_rng_seed(task["seed"])
    network, guide = build(spec, recipe, data)
    trainer = make_trainer(Run(network, guide, data, spec, recipe), None, progress=False)
    cpu0, wall0 = time.process_time(), time.perf_counter()
    fit = trainer.fit()
    fit_cpu, fit_wall = time.process_time() - cpu0, time.perf_counter() - wall0
    network.cpu()
    x, y = data.x_test.cpu(), data.y_test.cpu()
    samples = task["samples"]
    summary = trainer.posterior_summary()
    sampled = not method.point and trainer.elbo_path is not None  # a Laplace fit's figures are its MAP's
    with torch.no_grad():
        dense_point = classification_metrics(masked_module(network, summary)(x), y)
        if sampled:
            wrapped = trainer.objective()[1] if hasattr(trainer, "objective") else guide
            dense_pred = classification_metrics(_predictive(network, wrapped, x, samples), y)
        else:
            dense_pred = dense_point
    result = {
        "spec": entry.spec_source, "recipe": entry.recipe_source, "epochs": recipe["epochs"],
        "fit_cpu_s": fit_cpu, "fit_wall_s": fit_wall, "steps": fit.get("steps"),
        "step_wall_ms": fit.get("step_wall_ms"),
        "n_params": network.num_weights(), "dense_point": dense_point, "dense_predictive": dense_pred,
        "trainer_metrics": {k: v for k, v in fit.items() if isinstance(v, (int, float))},
        "sampled": sampled, "rules": {}, "curves": {},
    }
    generator = torch.Generator().manual_seed(task["seed"])
    compact_dir = task.get("compact_dir")
    keep_modules = bool(compact_dir) and task["seed"] == 0
    if keep_modules:
        os.makedirs(compact_dir, exist_ok=True)
        result["dense_path"] = _save(masked_module(network, summary), compact_dir, entry, "dense")
    for rule in entry.rules:
        r = {"label": rule.label}
        try:
            module, counts = _reduce(rule, network, summary, recipe, task["seed"])
            decision = counts.pop("_decision")
            with torch.no_grad():
                point = classification_metrics(module(x), y)
                pred = point
                if sampled:
                    pred = classification_metrics(
                        masked_predictive(network, summary, decision, x, samples, generator), y)
            r.update({"point": point, "predictive": pred, **counts})
            if keep_modules:
                r["compact_path"] = _save(module, compact_dir, entry, rule.key)
        except Exception as e:
            r["error"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        result["rules"][rule.key] = r
    for curve in method.curves:
        rows = []
        for q in SPARSITIES:
            try:
                rule = _curve_rule(curve)
                decision = decide(rule, summary, recipe, seed=task["seed"], sparsity=q)
                with torch.no_grad():
                    m = classification_metrics(masked_module(network, summary, decision)(x), y)
                rows.append({"target": q, "sparsity": decision.sparsity, **m})
            except Exception as e:
                rows.append({"target": q, "error": f"{type(e).__name__}: {e}"})
        result["curves"][curve] = rows
    return result


def _save(module, directory, entry, name):
    """Keep a network for the latency section (a private temporary file of this benchmark)."""
    path = os.path.join(directory, f"{entry.model.key}--{entry.method.key}--{name}.pt")
    torch.save(module, path)
    return path


def _reduce(rule, network, summary, recipe, seed):
    """(compact network, counts) of a rule: compaction handles every layer family (recurrent
    neurons and gates, attention heads, MLP units), so the counts are read off the compact network."""
    from pyro_sparse.outcome import reduction_report
    from pyro_sparse.rebuild import compact

    decision = decide(rule, summary, recipe, seed=seed)
    module = compact(network, summary, decision)
    report = reduction_report(network, summary, decision, module=module)
    keys = ("sparsity", "weights_total", "weights_kept", "units_removed", "units_total", "units_removed_per_layer",
            "params_dense", "params_nonzero", "params_compact", "flops_dense", "flops_compact")
    counts = {k: report[k] for k in keys}
    counts["hidden_units_total"] = report["units_total"] - _output_units(network)
    counts["_decision"] = decision
    return module, counts


def _curve_rule(name):
    from .registry import Rule

    return Rule(name, name, name)


def _output_units(network):
    """Units of the network's last parametric layer (never removed)."""
    name, layer = network.bayesian_layers()[-1]
    return layer.param_shapes()["weight"][0]


def tasks(mode: str, seeds: dict, compact_dir=None, models=None, methods=None, samples=10, device="cpu"):
    """(tasks to run, skipped cells) for a mode; ``seeds``: model key -> seeds."""
    from .registry import entries

    todo, skipped = [], []
    for e in entries(models, methods):
        if not hasattr(e, "spec"):
            skipped.append({"model": e.model.key, "method": e.method.key, "reason": e.reason})
            continue
        scale = e.scale(mode)
        for seed in seeds[e.model.key]:
            todo.append({"model": e.model.key, "method": e.method.key, "seed": seed, "scale": scale,
                         "samples": samples, "compact_dir": compact_dir, "device": device})
    return todo, skipped
