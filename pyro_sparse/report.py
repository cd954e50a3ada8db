"""Run reports and model comparison: ``pyro-sparse report DIR`` and ``pyro-sparse compare``.

A report reads a fitted run directory and writes into it

* ``posterior.nc``: the dense model's InferenceData (:func:`pyro_sparse.diagnostics.to_inference_data`),
  and ``posterior-<rule>.nc`` for each reduced model (pruned weights fixed at 0);
* PNG figures: ``training.png``, ``scores.png``, ``sparsity.png``, ``accuracy_vs_sparsity.png``,
  ``forest.png``;
* ``report.md`` (tables + links to the figures) and ``report.json`` (the same numbers).

Reduction rules read only the posterior summary (:func:`pyro_sparse.summary.summarize`):

* ``log-alpha-<t>``: drop weights with log alpha = log sigma^2 - log theta^2 > t (default 3;
  Molchanov, Ashukha & Vetrov 2017), where the guide is Gaussian;
* ``savage-dickey``: drop weights whose Savage-Dickey evidence change dF = ln q(0) - ln p(0) > 0
  (Friston & Penny 2011), where the prior is a proper Gaussian given its scales;
* ``opd-<pct>``: keep the highest Optimal-Posterior-Damage scores P theta^2 (Dhahri et al.
  2024) at the sparsity of the first threshold rule (or 90% without one), so OPD is compared
  at equal size. Under a Gaussian VI posterior P = 1/sigma^2, so P theta^2 = 1/alpha and OPD
  keeps exactly the weights log alpha keeps; rules with identical masks share one reduced model.

Only weight tensors (parameter ``weight``) are pruned; biases stay. A recipe's ``reduction:
{method, threshold}`` section overrides the threshold of the matching rule.
"""

from __future__ import annotations

import glob
import json
import math
import os
import time
from dataclasses import dataclass

import numpy as np
import torch

from . import diagnostics as D
from . import plots
from .checkpoint import write_json_atomic, write_text_atomic
from .errors import PyroSparseError
from .reduction import mask_by_sparsity, mask_by_threshold, opd_scores, savage_dickey
from .summary import summarize

SPARSITY_LEVELS = (0.0, 0.5, 0.8, 0.9, 0.95, 0.97, 0.98, 0.985, 0.99, 0.993, 0.995, 0.998, 0.999)
FIGURES = {"training": "training.png", "scores": "scores.png", "sparsity": "sparsity.png",
           "accuracy_vs_sparsity": "accuracy_vs_sparsity.png", "forest": "forest.png"}


@dataclass
class Criterion:
    """A per-weight pruning quantity: ``values`` per site, pruned on the ``prune`` side of
    ``threshold`` (``None``: no natural threshold, the rule picks a sparsity)."""

    name: str
    label: str
    values: dict
    prune: str  # "above" or "below"
    threshold: float | None = None
    log10: bool = False
    symlog: bool = False

    def keep_scores(self) -> dict:
        """Higher = keep, for :func:`~pyro_sparse.reduction.mask_by_sparsity`."""
        return {k: -v if self.prune == "above" else v for k, v in self.values.items()}

    def mask(self, threshold=None) -> dict:
        t = self.threshold if threshold is None else threshold
        return mask_by_threshold(self.values, t, keep="below" if self.prune == "above" else "above")


def _finite(t):
    return bool(torch.isfinite(t).all())


def criteria(summary) -> dict[str, Criterion]:
    """The pruning quantities defined for this posterior summary, over its weight tensors."""
    weights = {k: s for k, s in summary.items() if s.param == "weight"}
    out = {}
    if weights and all(s.log_alpha is not None for s in weights.values()):
        out["log-alpha"] = Criterion("log-alpha", "log alpha = log sigma^2 - log theta^2",
                                     {k: s.log_alpha for k, s in weights.items()}, "above", 3.0)
    precise = weights and all(_finite(s.precision) and bool((s.precision > 0).all()) for s in weights.values())
    if precise and all(_finite(s.prior_precision) and bool((s.prior_precision > 0).all()) for s in weights.values()):
        out["savage-dickey"] = Criterion(
            "savage-dickey", "Savage-Dickey dF = ln q(0) - ln p(0)",
            {k: savage_dickey(s.loc, s.precision, s.prior_loc, s.prior_precision) for k, s in weights.items()},
            "above", 0.0, symlog=True)
    if precise:
        out["opd"] = Criterion("opd", "OPD score P theta^2",
                               {k: opd_scores(s.loc, s.precision) for k, s in weights.items()}, "below", None,
                               log10=True)
    if weights:
        out["magnitude"] = Criterion("magnitude", "|theta|", {k: s.loc.abs() for k, s in weights.items()},
                                     "below", None, log10=True)
    return out


def _sparsity(masks) -> float:
    total = sum(m.numel() for m in masks.values())
    return 1.0 - sum(int(m.sum()) for m in masks.values()) / total


def _threshold_at(criterion: Criterion, masks) -> float:
    """The score value at the cut of a sparsity mask (smallest kept score)."""
    kept = [v[m] for v, m in zip(criterion.values.values(), masks.values()) if bool(m.any())]
    return float(torch.cat([k.reshape(-1) for k in kept]).min()) if kept else float("inf")


def reduction_rules(crit: dict[str, Criterion], recipe: dict | None = None) -> dict[str, tuple]:
    """Rule name -> (criterion name, masks, threshold) for the reduced models of a report."""
    overrides = {}
    section = (recipe or {}).get("reduction") or {}
    if "method" in section and "threshold" in section:
        overrides[str(section["method"]).replace("_", "-")] = float(section["threshold"])
    rules = {}
    for name in ("log-alpha", "savage-dickey"):
        if name in crit:
            t = overrides.get(name, crit[name].threshold)
            crit[name].threshold = t
            rule = f"log-alpha-{t:g}" if name == "log-alpha" else name
            rules[rule] = (name, crit[name].mask(t), t)
    if "opd" in crit:
        first = next(iter(rules.values()), None)
        sparsity = _sparsity(first[1]) if first else 0.9
        masks = mask_by_sparsity(crit["opd"].keep_scores(), sparsity)
        crit["opd"].threshold = _threshold_at(crit["opd"], masks)
        rules[f"opd-{round(100 * sparsity)}"] = ("opd", masks, crit["opd"].threshold)
    return rules


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@torch.no_grad()
def point_metric(network, values: dict, x, y) -> float:
    """Held-out accuracy (classification) or RMSE (regression) of the network at point values."""
    out = network.point_outputs(x, values)
    lik = network.likelihood
    if lik.task == "regression":
        return (out - y).square().mean().sqrt().item()
    pred = out.argmax(-1) if lik.task == "classification" else (out.squeeze(-1) > 0).long()
    return (pred == y.long()).double().mean().item()


def masked_values(values: dict, masks: dict) -> dict:
    return {k: v * masks[k].to(v.dtype) if k in masks else v for k, v in values.items()}


def sparsity_sweep(network, guide, crit: dict[str, Criterion], x, y, levels=SPARSITY_LEVELS) -> dict:
    """method -> (sparsities, point metric at the posterior median with that mask)."""
    median = guide.median()
    curves = {}
    for name, c in crit.items():
        keep = c.keep_scores()
        s_list, m_list = [], []
        for level in levels:
            masks = mask_by_sparsity(keep, level) if level > 0 else {k: torch.ones_like(v, dtype=torch.bool)
                                                                       for k, v in keep.items()}
            s_list.append(_sparsity(masks))
            m_list.append(point_metric(network, masked_values(median, masks), x, y))
        curves[name] = (s_list, m_list)
    return curves


# ============================================================================ markdown


def _fmt(v):
    if isinstance(v, float):
        if not math.isfinite(v):
            return str(v)
        return f"{v:.4g}" if abs(v) < 1e5 else f"{v:.3e}"
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
           "max k": loo["pareto_k_max"], f"k > {loo['good_k']:.2f}": loo["n_bad_k"]}
    for key in ("test_accuracy", "test_rmse", "test_nll"):
        if key in a:
            row[key] = a[key]
    row.update({"sparsity": a["sparsity"], "nonzero": a["num_nonzero"]})
    return row


def write_report(directory: str, num_samples: int = 100, seed: int = 0, progress=print) -> dict:
    """Write ``posterior.nc``, the reduced models' ``posterior-<rule>.nc``, the figures,
    ``report.md`` and ``report.json`` into a run directory; returns the report's numbers."""
    from .runs import load_run

    if not isinstance(num_samples, int) or num_samples < 2:
        raise PyroSparseError(f"--samples must be an integer >= 2 (PSIS needs several draws), got {num_samples!r}")
    start = time.perf_counter()
    run = load_run(directory)
    net, guide, data = run.network, run.guide, run.dataset
    history = getattr(run.trainer, "history", []) or []

    dense = D.run_inference_data(run, num_samples, seed=seed)
    D.save(dense, os.path.join(directory, "posterior.nc"))
    summary = summarize(net, guide)
    crit = criteria(summary)
    rules = reduction_rules(crit, run.recipe)
    models = {"dense": dense}
    rule_info = []
    for rule, (cname, masks, threshold) in rules.items():
        twin = next((r for r, (_, m, _) in rules.items() if r in models and _same(m, masks)), None)
        if twin is None:  # the same masks give the same reduced model: build it once
            idata = D.run_inference_data(run, num_samples, masks=masks, seed=seed,
                                         extra_attrs={"reduction": rule, "reduction_threshold": threshold})
            D.save(idata, os.path.join(directory, f"posterior-{rule}.nc"))
            models[rule] = idata
        a = D.attributes(models[twin or rule])
        rule_info.append({"rule": rule, "criterion": crit[cname].label, "threshold": threshold,
                          "weight sparsity": _sparsity(masks), "sparsity": a["sparsity"],
                          "nonzero": a["num_nonzero"],
                          "point accuracy" if net.likelihood.task != "regression" else "point RMSE":
                              point_metric(net, masked_values(guide.median(), masks), data.x_test, data.y_test),
                          "file": f"same masks as {twin}" if twin else f"posterior-{rule}.nc",
                          **{f"kept {k}": f"{int(m.sum())}/{m.numel()}" for k, m in masks.items()}})
    loos = {name: D.loo(idata) for name, idata in models.items()}
    loo_rows = [_loo_row(name, models[name], loos[name]) for name in models]
    corrected = D.importance_corrected_loo(dense)
    table = D.compare(models, loos) if len(models) > 1 else None

    # figures
    figs = {}
    if history:
        figs["training"] = plots.plot_training(history, os.path.join(directory, FIGURES["training"]),
                                               title=run.model_spec.get("name", "run"))
    panels = [{"scores": c.values, "threshold": c.threshold, "label": c.label, "prune": c.prune, "log10": c.log10,
               "symlog": c.symlog,
               "title": f"{c.name}: prune {c.prune} the threshold"}
              for c in crit.values() if c.threshold is not None and c.name != "magnitude"]
    if panels:
        figs["scores"] = plots.plot_score_histograms(panels, os.path.join(directory, FIGURES["scores"]))
    if rules:
        first = next(iter(rules))
        figs["sparsity"] = plots.plot_sparsity_maps(
            rules[first][1], os.path.join(directory, FIGURES["sparsity"]),
            title=f"kept weights (black) under {first}: sparsity {_sparsity(rules[first][1]):.2%}")
    ylabel = "test RMSE (point, posterior median)" if net.likelihood.task == "regression" \
        else "test accuracy (point, posterior median)"
    if crit:
        curves = sparsity_sweep(net, guide, crit, data.x_test, data.y_test)
        points = {r["rule"]: (r["weight sparsity"], r.get("point accuracy", r.get("point RMSE"))) for r in rule_info}
        figs["accuracy_vs_sparsity"] = plots.plot_accuracy_vs_sparsity(
            curves, os.path.join(directory, FIGURES["accuracy_vs_sparsity"]), points, ylabel=ylabel,
            title=f"{run.model_spec.get('name', 'run')} on {data.name}: pruning by each score")
    else:
        curves = {}
    figs["forest"] = D.plot_forest(dense, os.path.join(directory, FIGURES["forest"]))
    seconds = time.perf_counter() - start

    result = {"directory": directory, "num_samples": num_samples, "seconds": seconds,
              "attributes": D.attributes(dense), "loo": loo_rows, "importance_corrected_loo": corrected,
              "rules": rule_info, "figures": {k: os.path.basename(v) for k, v in figs.items()},
              "accuracy_vs_sparsity": {k: {"sparsity": s, "metric": m} for k, (s, m) in curves.items()},
              "compare": table.reset_index().rename(columns={"index": "model"}).to_dict("records")
              if table is not None else None}
    write_text_atomic(os.path.join(directory, "report.md"),
                      _report_markdown(run, result, table, summary, dense, history))
    write_json_atomic(os.path.join(directory, "report.json"), _jsonable(result))
    progress(f"report {directory}: {len(models)} models, {num_samples} draws, {seconds:.1f} s")
    return result


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


def _report_markdown(run, result, table, summary, dense, history) -> str:
    a = result["attributes"]
    figs = result["figures"]
    lines = [f"# Report: {os.path.basename(os.path.abspath(run.directory))}", "",
             f"Model `{a.get('model')}` on `{a.get('data')}`, fitted by `{a.get('method')}` "
             f"({a.get('epochs', '?')} epochs); {a['num_weights']} parameters. "
             f"Posterior draws: {result['num_samples']} (one chain of independent draws from the guide). "
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
    tab = D.summary(dense, var_names=small[:6], kind="stats")
    rows = [{"variable": idx, **{c: float(tab.loc[idx, c]) for c in tab.columns}} for idx in tab.index[:30]]
    lines += [f"`az.summary` of {', '.join(f'`{n}`' for n in small[:6])} (first 30 rows):", "",
              markdown_table(rows), ""]
    lines += ["## Model comparison (PSIS-LOO)", "",
              f"Pointwise log-likelihood on the **{a['observations']}** observations "
              f"({result['loo'][0]['model']} and each reduced model). The reduced models fix pruned weights "
              "at 0 in every draw and keep the variational marginals of the rest (the Savage-Dickey "
              "reduced posterior under a factorised q). `max k` is the largest Pareto k-hat; "
              "observations above ArviZ's threshold make that estimate unreliable.", "",
              markdown_table(result["loo"]), ""]
    if table is not None:
        rows = [{"model": idx, **{c: table.loc[idx, c] for c in ("rank", "elpd_loo", "p_loo", "elpd_diff", "weight",
                                                                 "se", "dse", "warning")}} for idx in table.index]
        lines += ["`az.compare` (stacking weights):", "", markdown_table(rows), ""]
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
            rows.append({"target sparsity": SPARSITY_LEVELS[i],
                         **{m: v["metric"][i] for m, v in curves.items()}})
        lines += ["Point accuracy (posterior median, masked) at each sparsity:", "", markdown_table(rows), ""]
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


def load_entry(entry: str, num_samples: int = 100, seed: int = 0):
    """InferenceData for a compare entry: ``DIR`` (its posterior.nc, or fresh draws when
    missing), ``DIR:RULE`` (``DIR/posterior-RULE.nc``) or a ``.nc`` file."""
    if os.path.isfile(entry):
        return D.load(entry)
    path, _, rule = entry.partition(":")
    if rule:
        nc = os.path.join(path, f"posterior-{rule}.nc")
        if not os.path.exists(nc):
            have = sorted(os.path.basename(p)[10:-3] for p in glob.glob(os.path.join(path, "posterior-*.nc")))
            raise PyroSparseError(f"{entry}: no {nc}; run `pyro-sparse report {path}` first "
                                  f"(reduced models there: {have or 'none'})")
        return D.load(nc)
    if not os.path.isdir(path):
        raise PyroSparseError(f"{entry}: not a run directory or .nc file")
    nc = os.path.join(path, "posterior.nc")
    if os.path.exists(nc):
        return D.load(nc)
    from .runs import load_run

    return D.run_inference_data(load_run(path), num_samples, seed=seed)


def compare_entries(entries: list[str], num_samples: int = 100, seed: int = 0) -> list[dict]:
    """``az.compare`` of the entries by PSIS-LOO, joined with accuracy, sparsity and size:
    one row per model, best first. Size counts the nonzero parameters (``size_kb``: as float32)."""
    if len(entries) < 2:
        raise PyroSparseError(f"compare needs at least two runs, got {len(entries)}")
    models = {}
    for entry in entries:
        models[_entry_name(entry, models)] = load_entry(entry, num_samples, seed)
    obs = {name: D.attributes(m).get("observations") for name, m in models.items()}
    loos = {name: D.loo(m) for name, m in models.items()}
    try:
        table = D.compare(models, loos)
    except ValueError as e:
        raise PyroSparseError(f"compare: {e}; observations: {obs}") from None
    rows = []
    for name in table.index:
        a = D.attributes(models[name])
        loo = loos[name]
        row = {"model": name}
        for col in ("rank", "elpd_loo", "se", "p_loo", "elpd_diff", "dse", "weight", "warning"):
            row[col] = table.loc[name, col]
        row["max k"] = loo["pareto_k_max"]
        for key in ("test_accuracy", "test_rmse", "test_nll"):
            if key in a:
                row[key] = a[key]
        row.update({"sparsity": a.get("sparsity"), "nonzero": a.get("num_nonzero"),
                    "size_kb": a.get("num_nonzero", 0) * 4 / 1024})
        rows.append(row)
    return rows
