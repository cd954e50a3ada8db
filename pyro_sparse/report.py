"""Run reports and model comparison: ``pyro-sparse report DIR`` and ``pyro-sparse compare``.

A report reads a fitted run directory -- any fit: SVI with any guide, MAP, iterative BMR, a
Laplace fit -- and writes into it

* ``posterior.nc``: the dense model's InferenceData (:func:`pyro_sparse.diagnostics.to_inference_data`,
  draws from the fitted posterior: the guide, or a Laplace fit's Gaussian), and
  ``posterior-<rule>.nc`` for each reduced model (pruned parameters fixed at 0);
* PNG figures: ``training.png``, ``scores.png``, ``sparsity.png``, ``accuracy_vs_sparsity.png``,
  ``forest.png``;
* ``report.md`` (tables + links to the figures) and ``report.json`` (the same numbers), with the
  deployment figures of the first rule's compact network (the recipe's own rule where it has one):
  the compact file's size and stored floats against the dense network's ``state_dict``, each
  layer's storage and the latency of both at batch 1 and 256, measured on the spot
  (:func:`pyro_sparse.outcome.deployment_figures`).

The reduced models come from the rules of :mod:`pyro_sparse.reduction.rules` that apply to the
run's posterior summary (``trainer.posterior_summary()``), each at its own threshold (the
recipe's ``reduction: {method, threshold}`` sets the threshold of its rule): the rules with a
threshold (a rule's ``threshold``: ``pyro-sparse rules`` lists each with its default),
``spike-slab``, and ``opd`` at the sparsity of the first of them (or 90%), so OPD is compared
at equal size; rules whose masks coincide share one reduced model. Every parameter tensor the
rules judge (weights of every layer, recurrent group variables) is pruned; biases stay.

Two accuracies, named everywhere the same way (:mod:`pyro_sparse.evaluation`): the
*posterior-mean network* (one deterministic network at the posterior means, masked by a rule:
what its compact network computes) and the *posterior predictive* with S draws (the ArviZ
draws; ``test_accuracy`` of the InferenceData).
"""

from __future__ import annotations

import glob
import json
import math
import os
import time

import numpy as np
import torch

from . import diagnostics as D
from . import evaluation, plots
from .checkpoint import write_json_atomic, write_text_atomic
from .errors import PyroSparseError
from .outcome import metric_key, reduction_report
from .rebuild import masked_module
from .reduction.rules import OPD, applicable_rules, reduce
from .registry import RULES

SPARSITY_LEVELS = (0.0, 0.5, 0.8, 0.9, 0.95, 0.97, 0.98, 0.985, 0.99, 0.993, 0.995, 0.998, 0.999)
FIGURES = {"training": "training.png", "scores": "scores.png", "sparsity": "sparsity.png",
           "accuracy_vs_sparsity": "accuracy_vs_sparsity.png", "forest": "forest.png"}
#: at most this many weight tensors in the sparsity maps (the largest)
MAX_MAPS = 8


def _sparsity(masks, summary) -> float:
    """``rule_sparsity``: the fraction of the weights that ``masks`` remove."""
    weights = summary.of_role("weight")
    total = sum(s.loc.numel() for s in weights.values())
    return 1.0 - sum(int(masks[k].sum()) for k in weights) / total


def compact_sparsity(network, values: dict, decision) -> float:
    """``sparsity``, the one definition every command reports: the fraction of the weights that
    are zero in the compact network of ``decision`` (a unit compaction deletes takes its weights
    with it), counted by :func:`~pyro_sparse.outcome.reduction_report`."""
    if decision is None:
        return 0.0
    return reduction_report(network, values, decision)["sparsity"]


def reduction_label(decision) -> str:
    """The name of a reduced model: the stem ``reduce`` gives its files
    (:func:`~pyro_sparse.reduced_runs.output_base`: ``log-alpha-t3``, ``opd-s0.9``), so
    ``compare DIR:<name>`` accepts the names of both commands."""
    from .reduced_runs import output_base

    o = decision.options
    return output_base(decision.method, o.get("sparsity"), o.get("threshold"), o.get("structured", False),
                       o.get("scope", "global"), o.get("reduced_scale"))


def report_rules(summary, recipe: dict | None = None) -> dict:
    """Rule label -> :class:`~pyro_sparse.reduction.rules.Decision` for the reduced models of a
    report (see the module docstring): the recipe's own rule first (at its threshold, or its
    sparsity for a ranking rule), then every other rule with a threshold that applies, then OPD
    at the sparsity of the first."""
    section = (recipe or {}).get("reduction") or {}
    own = section.get("method")
    applies = applicable_rules(summary)
    todo = []
    if own in applies and applies[own] is None:
        todo.append((own, section.get("threshold"), section.get("sparsity") if RULES[own].ranks else None))
    for name, rule in RULES.items():
        if name != own and applies[name] is None and not (rule.threshold is None and rule.ranks):
            todo.append((name, None, None))
    decisions = {}
    for name, threshold, sparsity in todo:
        rule = RULES[name]
        if threshold is None and sparsity is None:
            threshold = rule.threshold
        decision = reduce(summary, rule, threshold=threshold if rule.ranks else None, sparsity=sparsity)
        decisions[reduction_label(decision)] = decision
    equal_size = OPD.name  # the ranking rule compared at the size of the first decision
    if equal_size in applies and applies[equal_size] is None and own != equal_size:
        first = next(iter(decisions.values()), None)
        sparsity = round(_sparsity(first.masks, summary), 2) if first is not None else 0.9
        decision = reduce(summary, equal_size, sparsity=min(sparsity, 0.99))
        decisions[reduction_label(decision)] = decision
    return decisions


def _by_layer(scores: dict) -> dict:
    """Per-element scores of the sites grouped by their top-level layer (``block1``, ``fc2``): one
    stack per layer in a histogram."""
    out = {}
    for site, value in scores.items():
        out.setdefault(site.split(".")[0], []).append(value.reshape(-1))
    return {layer: torch.cat(values) for layer, values in out.items()}


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def point_metric(network, values: dict, masks, x, y, noise=None) -> float:
    """Held-out accuracy (RMSE for regression) of the masked posterior-mean network."""
    lik = network.likelihood
    module = masked_module(network, values, masks)
    return evaluation.evaluate(evaluation.point_predictive(module), x, y, lik, noise)[metric_key(lik)]


def sparsity_sweep(run, summary, levels=SPARSITY_LEVELS, noise=None) -> dict:
    """Rule -> (sparsities, accuracy of the masked posterior-mean network) for every ranking
    rule that applies, at each target sparsity (of the rule); the sparsity is
    :func:`compact_sparsity`."""
    data = run.dataset
    values = summary.locs()
    curves = {}
    for name, reason in applicable_rules(summary).items():
        if reason is not None or not RULES[name].ranks:
            continue
        s_list, m_list = [], []
        for level in levels:
            decision = reduce(summary, name, sparsity=level) if level > 0 else None
            masks = decision.masks if decision is not None else {}
            s_list.append(compact_sparsity(run.network, values, decision))
            m_list.append(point_metric(run.network, values, masks, data.x_test, data.y_test, noise))
        curves[name] = (s_list, m_list)
    return curves


# ============================================================================ markdown


def _fmt(v):
    if isinstance(v, float):
        if not math.isfinite(v):
            return str(v)
        return f"{v:.4g}" if 1e-3 <= abs(v) < 1e5 or v == 0 else f"{v:.3e}"
    if isinstance(v, (np.floating,)):
        return _fmt(float(v))
    if isinstance(v, (np.integer,)):
        return str(int(v))
    return str(v)


def markdown_table(rows: list[dict], columns: list[str] | None = None) -> str:
    columns = columns or list(dict.fromkeys(k for r in rows for k in r))
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(_fmt(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def text_table(rows: list[dict], columns: list[str] | None = None) -> str:
    columns = columns or list(dict.fromkeys(k for r in rows for k in r))
    cells = [[c for c in columns]] + [[_fmt(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
    return "\n".join("  ".join(cell.rjust(w) if j else cell.ljust(w) for j, (cell, w) in enumerate(zip(row, widths)))
                     for row in cells)


def _reduction_files(directory):
    out = []
    for path in sorted(glob.glob(os.path.join(directory, "reduction-*.json"))):
        try:
            with open(path) as f:
                out.append((os.path.basename(path), json.load(f)))
        except (OSError, ValueError) as e:
            out.append((os.path.basename(path), {"error": f"unreadable: {e}"}))
    return out


def _render_json(name, data) -> str:
    """A reduction-*.json as markdown: scalars as a key/value table, dicts of dicts as a table."""
    lines = [f"### {name}", ""]
    if not isinstance(data, dict):
        return "\n".join(lines + ["```", json.dumps(data, indent=1)[:4000], "```", ""])
    scalars = [{"key": k, "value": v} for k, v in data.items() if not isinstance(v, (dict, list))]
    if scalars:
        lines += [markdown_table(scalars), ""]
    for key, value in data.items():
        if isinstance(value, dict) and value and all(isinstance(v, dict) for v in value.values()):
            rows = [{"name": k, **{kk: vv for kk, vv in v.items() if not isinstance(vv, (dict, list))}}
                    for k, v in value.items()]
            lines += [f"**{key}**", "", markdown_table(rows), ""]
        elif isinstance(value, dict):
            rows = [{"name": k, "value": v if not isinstance(v, (dict, list)) else json.dumps(v)[:80]}
                    for k, v in value.items()]
            lines += [f"**{key}**", "", markdown_table(rows), ""]
        elif isinstance(value, list):
            lines += [f"**{key}**: " + json.dumps(value)[:300], ""]
    return "\n".join(lines)


# ============================================================================ report


def _loo_row(name, idata, loo) -> dict:
    a = D.attributes(idata)
    row = {"model": name, "elpd_loo": loo["elpd_loo"], "se": loo["se"], "p_loo": loo["p_loo"],
           "max k": loo["pareto_k_max"], "k > 0.7": D.loo_reliability(loo)}
    for key in ("test_accuracy", "test_rmse", "test_nll"):
        if key in a:
            row[key] = a[key]
    row.update({"sparsity": a.get("sparsity"), "params_nonzero": a.get("params_nonzero")})
    return row


def write_report(directory: str, num_samples: int = 100, seed: int = 0, progress=print, data=None) -> dict:
    """Write ``posterior.nc``, the reduced models' ``posterior-<rule>.nc``, the figures,
    ``report.md`` and ``report.json`` into a run directory; returns the report's numbers."""
    from .runs import load_run

    if not isinstance(num_samples, int) or num_samples < 2:
        raise PyroSparseError(f"--samples must be an integer >= 2 (PSIS needs several draws), got {num_samples!r}")
    start = time.perf_counter()
    run = load_run(directory, data=data)
    net, data = run.network, run.dataset
    history = getattr(run.trainer, "history", []) or []
    summary = run.trainer.posterior_summary()
    values = summary.locs()
    noise = run.guide.median().get("likelihood.noise") if getattr(net.likelihood, "learn_noise", False) else None
    key = metric_key(net.likelihood)

    dense = D.run_inference_data(run, num_samples, seed=seed, extra_attrs={"sparsity": 0.0})
    D.save(dense, os.path.join(directory, "posterior.nc"))
    decisions = report_rules(summary, run.recipe)
    models = {"dense": dense}
    rule_info = []
    for label, decision in decisions.items():
        masks = decision.masks
        twin = next((r for r, d in decisions.items() if r in models and _same(d.masks, masks)), None)
        if twin is None:  # the same masks give the same reduced model: build it once
            idata = D.run_inference_data(run, num_samples, masks=masks, seed=seed,
                                         extra_attrs={"reduction": label,
                                                      "reduction_threshold": decision.options.get("threshold"),
                                                      "sparsity": compact_sparsity(net, values, decision)})
            D.save(D.slim(idata, list(summary)), os.path.join(directory, f"posterior-{label}.nc"))
            models[label] = idata
        a = D.attributes(models[twin or label])
        rule_info.append({"rule": label, "quantity": RULES[decision.method].quantity,
                          "threshold": decision.options.get("threshold"),
                          "sparsity": a["sparsity"], "rule_sparsity": a["rule_sparsity"],
                          "params_nonzero": a["params_nonzero"],
                          f"{key} (posterior-mean network)":
                              point_metric(net, values, masks, data.x_test, data.y_test, noise),
                          f"{key} (predictive, {num_samples} draws)": a.get(f"test_{key}"),
                          "file": f"same masks as {twin}" if twin else f"posterior-{label}.nc",
                          **{f"kept {k}": f"{int(m.sum())}/{m.numel()}" for k, m in masks.items()
                             if summary[k].role != "bias"}})
    loos = {name: D.loo(idata) for name, idata in models.items()}
    loo_rows = [_loo_row(name, models[name], loos[name]) for name in models]
    corrected = D.importance_corrected_loo(dense)
    ranking, ranking_note = rank_models(models, loos) if len(models) > 1 else (None, None)

    # figures
    figs = {}
    if history:
        figs["training"] = plots.plot_training(history, os.path.join(directory, FIGURES["training"]),
                                               title=_run_name(run), figures_of=_test_figures(directory))
    panels = []
    for label, decision in decisions.items():
        rule = RULES[decision.method]
        if rule.threshold is None or not decision.scores:
            continue
        panels.append({"scores": _by_layer(decision.scores), "threshold": decision.options["threshold"],
                       "label": rule.quantity,
                       "prune": rule.prunes, "log10": rule.plot == "log10", "symlog": rule.plot == "symlog",
                       "title": f"{label}: prune {rule.prunes} the threshold"})
    if panels:
        figs["scores"] = plots.plot_score_histograms(panels, os.path.join(directory, FIGURES["scores"]))
    if decisions:
        first = next(iter(decisions))
        weights = {k: m for k, m in decisions[first].masks.items() if summary[k].role == "weight"}
        shown = dict(sorted(weights.items(), key=lambda kv: -kv[1].numel())[:MAX_MAPS])
        shown = {k: shown[k] for k in weights if k in shown}  # network order
        figs["sparsity"] = plots.plot_sparsity_maps(
            shown, os.path.join(directory, FIGURES["sparsity"]),
            title=f"kept weights (black) under {first}: rule_sparsity {_sparsity(decisions[first].masks, summary):.2%} "
                  f"(the weights the rule removes)"
                  + (f" ({len(shown)} largest of {len(weights)} weight tensors)" if len(shown) < len(weights) else ""))
    ylabel = f"test {key} (posterior-mean network, masked)"
    curves = sparsity_sweep(run, summary, noise=noise)
    if curves:
        points = {r["rule"]: (r["sparsity"], r[f"{key} (posterior-mean network)"]) for r in rule_info}
        figs["accuracy_vs_sparsity"] = plots.plot_accuracy_vs_sparsity(
            curves, os.path.join(directory, FIGURES["accuracy_vs_sparsity"]), points, ylabel=ylabel,
            title=f"{_run_name(run)} on {data.name}: pruning by each rule")
    figs["forest"] = D.plot_forest(dense, os.path.join(directory, FIGURES["forest"]))
    deployment = _deployment(run, summary, decisions)
    seconds = time.perf_counter() - start

    result = {"directory": directory, "num_samples": num_samples, "seconds": seconds,
              "summary_method": summary.method, "metric": key,
              "attributes": D.attributes(dense), "loo": loo_rows, "importance_corrected_loo": corrected,
              "rules": rule_info, "figures": {k: os.path.basename(v) for k, v in figs.items()},
              "accuracy_vs_sparsity": {k: {"sparsity": s, "metric": m} for k, (s, m) in curves.items()},
              "compare": ranking, "compare_note": ranking_note,
              "frozen_params": sum(net.frozen_parameters().values()), "deployment": deployment}
    write_text_atomic(os.path.join(directory, "report.md"),
                      _report_markdown(run, result, summary, dense, history))
    write_json_atomic(os.path.join(directory, "report.json"), _jsonable(result))
    progress(f"report {directory}: {len(models)} models, {num_samples} draws, {seconds:.1f} s")
    return result


def _run_name(run) -> str:
    """The spec's name, or else the run directory's."""
    return run.model_spec.get("name") or os.path.basename(os.path.normpath(run.directory or "run"))


def _test_figures(directory):
    """What a run's held-out figures are, as its metrics.json says (``test_figures``), or None."""
    try:
        with open(os.path.join(directory, "metrics.json")) as f:
            return json.load(f).get("test_figures")
    except (OSError, ValueError, AttributeError):
        return None


def _deployment(run, summary, decisions) -> dict | None:
    """Size and latency of the first rule's compact network against the dense network."""
    if not decisions:
        return None
    from .outcome import deployment_figures, saved_bytes
    from .rebuild import compact
    from .reduced_runs import _run_extras, compact_payload

    label, decision = next(iter(decisions.items()))
    module = compact(run.network, summary, decision)
    info = {"method": decision.method, **_run_extras(run)}
    figures = deployment_figures(masked_module(run.network, summary), module, run.dataset.x_test,
                                 saved_bytes(compact_payload(module, info)))
    params_dense = sum(s.loc.numel() for s in summary.values())
    return {"rule": label, "params_dense": params_dense, **figures}


def _deployment_markdown(d) -> list:
    from .outcome import format_deployment

    lines = ["## Deployment", "", f"The compact network of `{d['rule']}`, as `pyro-sparse reduce` writes it "
             "(`pyro-sparse export` turns it into a TorchScript or ONNX graph):", ""]
    lines += [f"- {line}" for line in format_deployment(d).splitlines()]
    return lines + [""]


def _jsonable(x):
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, (np.floating, float)):
        x = float(x)
        return x if math.isfinite(x) else str(x)
    if isinstance(x, (np.bool_,)):
        return bool(x)
    if isinstance(x, np.ndarray):
        return _jsonable(x.tolist())
    return x


def _report_markdown(run, result, summary, dense, history) -> str:
    a = result["attributes"]
    figs = result["figures"]
    lines = [f"# Report: {os.path.basename(os.path.abspath(run.directory))}", "",
             f"Model `{a.get('model')}` on `{a.get('data')}`, fitted by `{a.get('method')}` "
             f"({a.get('epochs', '?')} epochs); {a['params_total']} parameters ({a['weights_total']} weights)"
             + (f" and {result['frozen_params']} frozen ones of modules left deterministic, which no rule judges "
                "and no sparsity counts" if result.get("frozen_params") else "") + ". "
             f"Posterior summary: `{result['summary_method']}`. "
             f"Posterior draws: {result['num_samples']} (one chain of independent draws from the fitted posterior). "
             f"Report written in {result['seconds']:.1f} s.", ""]
    lines += ["## Priors", "", markdown_table([{"site": k, "prior": ", ".join(f"{kk}={vv}" for kk, vv in v.items())}
                                               for k, v in a["priors"].items()]), ""]
    lines += ["## Fit", ""]
    if "training" in figs:
        lines += [f"![training traces]({figs['training']})", ""]
    if history:
        last = history[-1]
        lines += [markdown_table([{k: last[k] for k in ("epoch", "elbo_per_datum", "test_accuracy", "test_rmse",
                                                        "test_nll") if k in last}]), ""]
    lines += ["## Posterior (ArviZ)", "",
              "`posterior.nc` opens with `arviz.from_netcdf`; groups: "
              + ", ".join(f"`{g}`" for g in D.groups(dense)) + ".", ""]
    names = D.posterior_var_names(dense)
    small = [n for n in names if dense.posterior[n].size <= 12 * dense.posterior.sizes["draw"]] or names[-1:]
    tab = D.summary(dense, var_names=small[:6], kind="stats", round_to="none")
    rows = [{"variable": idx, **{c: float(tab.loc[idx, c]) for c in tab.columns}} for idx in tab.index[:30]]
    lines += [f"`az.summary` of {', '.join(f'`{n}`' for n in small[:6])} (first 30 rows):", "",
              markdown_table(rows), ""]
    lines += ["## Model comparison", "",
              f"PSIS-LOO of the pointwise log-likelihood on the **{a['observations']}** observations "
              f"({result['loo'][0]['model']} and each reduced model). The reduced models fix pruned weights "
              "at 0 in every draw and keep the fitted marginals of the rest (the Savage-Dickey "
              "reduced posterior under a factorised posterior). `max k` is the largest Pareto k-hat, "
              "`k > 0.7` the share of observations whose estimate is unreliable.", "",
              markdown_table(result["loo"]), ""]
    if result["compare"]:
        lines += [f"**{result['compare_note']}**", "", markdown_table(result["compare"]), ""]
    c = result["importance_corrected_loo"]
    if a.get("method") == "map":
        lines += ["A point-mass (MAP) guide has no posterior spread: every draw is the same network, so "
                  "PSIS-LOO degenerates (k-hat = inf) and the figures above are the training log-likelihood. "
                  "Fit a Laplace approximation or a mean-field guide for LOO and evidence-based reduction.", ""]
    elif math.isfinite(c["vi_pareto_k"]):
        verdict = "reliable" if c["reliable"] else "NOT reliable (k-hat > 0.7): use the uncorrected figures"
        lines += [f"Importance-corrected PSIS-LOO for VI draws (Magnusson et al. 2019): elpd_loo = "
                  f"{c['elpd_loo']:.2f} (se {c['se']:.2f}); k-hat of p(y, theta)/q(theta) (Yao et al. 2018) = "
                  f"{c['vi_pareto_k']:.2f}: {verdict}.", ""]
    else:
        reason = ("the prior is improper (log-uniform), so the posterior is too (Hron et al. 2018)"
                  if a.get("improper_prior_sites") else "the joint importance ratios are unavailable")
        lines += [f"No importance correction for the VI draws: {reason}. The figures above are PSIS-LOO of the "
                  "variational predictive (q in place of the posterior).", ""]
    lines += ["## Reduction", ""]
    if result["rules"]:
        lines += [markdown_table(result["rules"]), ""]
    for key, caption in (("scores", "pruning scores with thresholds"), ("sparsity", "sparsity maps"),
                         ("accuracy_vs_sparsity", "accuracy vs sparsity"), ("forest", "forest plot")):
        if key in figs:
            lines += [f"![{caption}]({figs[key]})", ""]
    if result["accuracy_vs_sparsity"]:
        curves = result["accuracy_vs_sparsity"]
        rows = []
        levels = next(iter(curves.values()))["sparsity"]
        for i in range(len(levels)):
            rows.append({"target rule_sparsity": SPARSITY_LEVELS[i],
                         **{m: v["metric"][i] for m, v in curves.items()}})
        lines += [f"Test {result['metric']} of the posterior-mean network, masked by each rule at each target "
                  "fraction of the weights the rule removes (rule_sparsity):", "", markdown_table(rows), ""]
    if result.get("deployment"):
        lines += _deployment_markdown(result["deployment"])
    extra = _reduction_files(run.directory)
    if extra:
        lines += ["## Reduction results on disk", ""]
        for name, data in extra:
            lines += [_render_json(name, data), ""]
    return "\n".join(lines)


# ============================================================================ compare


def _entry_name(entry, taken):
    path, _, rule = entry.partition(":") if not os.path.exists(entry) else (entry, "", "")
    base = os.path.basename(os.path.normpath(path))
    if base.endswith(".nc"):
        base = f"{os.path.basename(os.path.dirname(os.path.abspath(path)))}/{base[:-3]}"
    name = f"{base}:{rule}" if rule else base
    return name if name not in taken else entry


def reduced_models(directory) -> list[str]:
    """The names of the reduced models of a run directory: those of ``report``
    (``posterior-<name>.nc``) and of ``reduce`` (``reduction-<name>.json``), one vocabulary
    (:func:`reduction_label`)."""
    names = {os.path.basename(p)[len("posterior-"):-3] for p in glob.glob(os.path.join(directory, "posterior-*.nc"))}
    names |= {os.path.basename(p)[len("reduction-"):-5] for p in glob.glob(os.path.join(directory, "reduction-*.json"))}
    return sorted(names)


def load_entry(entry: str, num_samples: int = 100, seed: int = 0):
    """InferenceData for a compare entry: ``DIR`` (its posterior.nc, or fresh draws when
    missing), ``DIR:NAME`` (a reduced model: ``DIR/posterior-NAME.nc`` of ``report``, or the
    reduction ``reduce`` wrote as ``DIR/reduction-NAME.json``, drawn afresh) or a ``.nc`` file."""
    if os.path.isfile(entry):
        return D.load(entry)
    path, _, rule = entry.partition(":")
    if rule:
        nc = os.path.join(path, f"posterior-{rule}.nc")
        if os.path.exists(nc):
            return D.load(nc)
        reduction = os.path.join(path, f"reduction-{rule}.json")
        if os.path.exists(reduction):
            return _reduced_inference_data(path, reduction, rule, num_samples, seed)
        have = reduced_models(path)
        raise PyroSparseError(f"{entry}: {path} has no reduced model {rule!r} (reduced models there: "
                              f"{', '.join(have) or 'none'}; `pyro-sparse reduce {path} --method ...` or "
                              f"`pyro-sparse report {path}` make them)")
    if not os.path.isdir(path):
        raise PyroSparseError(f"{entry}: not a run directory or .nc file")
    nc = os.path.join(path, "posterior.nc")
    if os.path.exists(nc):
        return D.load(nc)
    from .runs import load_run

    return D.run_inference_data(load_run(path), num_samples, seed=seed)


def _reduced_inference_data(directory, reduction, name, num_samples, seed):
    """The InferenceData of the reduced model a ``reduce`` report describes: its decision again
    (the rule and options it records), the masked model's draws."""
    from .checkpoint import read_json
    from .runs import load_run

    report = read_json(reduction, "reduction report")
    options = dict(report.get("options") or {})
    run = load_run(directory)
    summary = run.trainer.posterior_summary()
    try:
        decision = reduce(summary, report["method"], **{k: v for k, v in options.items() if v is not None})
    except (KeyError, TypeError, ValueError) as e:
        raise PyroSparseError(f"{reduction}: cannot repeat this reduction ({e})") from None
    return D.run_inference_data(run, num_samples, masks=decision.masks, seed=seed,
                                extra_attrs={"reduction": name, "sparsity": report.get("sparsity")})


def rank_models(models: dict, loos: dict | None = None) -> tuple[list[dict], str]:
    """Rank InferenceData by what the draws can support; returns ``(rows, note)``.

    PSIS-LOO (``az.compare``, stacking weights) is used when it is reliable for every model:
    no observation's Pareto k-hat above 0.7 (:func:`~pyro_sparse.diagnostics.loo_reliability`).
    For network posteriors with 10^4+ weights and ~100 draws it rarely is: then the models are
    ranked by their held-out log predictive density on the test points
    (:func:`~pyro_sparse.diagnostics.compare_held_out`, paired standard errors), which needs no
    importance sampling; the PSIS-LOO figures stay in the rows for reference and no stacking
    weights are given. ``note`` says which, in words."""
    loos = loos or {name: D.loo(m) for name, m in models.items()}
    share = {name: D.loo_reliability(loo) for name, loo in loos.items()}
    obs = {name: D.attributes(m).get("observations") for name, m in models.items()}
    reliable = all(v == 0.0 for v in share.values())
    try:
        table = D.compare(models, loos)
    except ValueError as e:
        raise PyroSparseError(f"compare: {e}; observations: {obs}") from None
    rows = {}
    for name in table.index:
        rows[name] = {"model": name, "elpd_loo": table.loc[name, "elpd_loo"], "se": table.loc[name, "se"],
                      "p_loo": table.loc[name, "p_loo"], "elpd_diff": table.loc[name, "elpd_diff"],
                      "dse": table.loc[name, "dse"], "k > 0.7": share[name]}
        if reliable:
            rows[name].update({"rank": table.loc[name, "rank"], "weight": table.loc[name, "weight"]})
    worst = max(share, key=share.get)
    if reliable:
        order, note = list(table.index), ("Ranked by PSIS-LOO on the training observations (az.compare, stacking "
                                          "weights): every Pareto k-hat is at most 0.7, so the estimates are reliable.")
    else:
        try:
            held = D.compare_held_out(models)
        except ValueError as e:
            held, reason = None, str(e)
        if held is None:
            order = list(table.index)
            note = (f"PSIS-LOO is NOT reliable for these draws ({share[worst]:.0%} of the observations of {worst!r} "
                    f"have Pareto k-hat > 0.7) and no held-out figure is available ({reason}); the order below "
                    "is PSIS-LOO's and should not be trusted.")
        else:
            for row in held:
                rows[row["model"]].update(row)
            order = [row["model"] for row in held]
            n = held[0]["elpd_test"] and D.held_out(models[order[0]])["n"]
            note = (f"PSIS-LOO is NOT reliable for these draws: {share[worst]:.0%} of the observations of {worst!r} "
                    f"have Pareto k-hat > 0.7 (importance sampling from q fails for networks this large). The "
                    f"models are ranked by their held-out log predictive density on the {n} test points instead "
                    "(elpd_test, which needs no importance sampling; elpd_test_diff to the best with its paired "
                    "standard error dse_test). The PSIS-LOO columns are shown for reference only; no stacking "
                    "weights.")
    out = []
    for rank, name in enumerate(order):
        a = D.attributes(models[name])
        row = {"model": name, "rank": rank, "reference": "yes" if rank == 0 else "",
               **{k: v for k, v in rows[name].items() if k not in ("model", "rank")}}
        for key in ("test_accuracy", "test_rmse", "test_nll"):
            if key in a:
                row[key] = a[key]
        row.update({"sparsity": a.get("sparsity"), "rule_sparsity": a.get("rule_sparsity"),
                    "params_nonzero": a.get("params_nonzero"), "size_kb": a.get("params_nonzero", 0) * 4 / 1024})
        out.append(row)
    note += (f" The differences (elpd_diff, dse{', elpd_test_diff, dse_test' if not reliable else ''}) are to the "
             f"reference row, the best model ({order[0]}). test_accuracy is the posterior predictive of the draws; "
             "sparsity the fraction of the weights zero in the compact network, rule_sparsity the fraction the "
             "rule removed.")
    return out, note


def compare_entries(entries: list[str], num_samples: int = 100, seed: int = 0) -> tuple[list[dict], str]:
    """Rank the entries (:func:`rank_models`), joined with accuracy, sparsity and size: one row
    per model, best first, and the note saying what the ranking rests on. Size counts the nonzero
    parameters (``size_kb``: as float32)."""
    if len(entries) < 2:
        raise PyroSparseError(f"compare needs at least two runs, got {len(entries)}")
    models = {}
    for entry in entries:
        models[_entry_name(entry, models)] = load_entry(entry, num_samples, seed)
    return rank_models(models)
