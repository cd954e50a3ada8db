"""The reduction report: what a decision removed and what it costs and gains.

Counts (per layer and overall): weights kept/total, biases kept/total, units kept/total (as
:func:`~.compact.compact` physically deleted them), parameters of the dense network, non-zero
parameters and dense parameters of the compact network, their bytes, and FLOPs per example.
Transformer and Mixer blocks count their MLP hidden units as units, and the report lists per
block the attention heads kept and removed and the MLP units removed (``blocks``,
``heads_removed_per_block``; FLOPs of attention as in :mod:`.transformer`).

FLOPs count the multiply-adds of the parametric layers as 2 operations each (activations,
pooling and bias additions are not counted): ``2 * in * out`` for a linear layer and
``2 * out_ch * in_ch * kh * kw * H_out * W_out`` for a convolution. ``flops_compact`` is that of
the dense compact network, ``flops_sparse`` counts only the non-zero weights (what a sparse
kernel would do). ``compression_ratio`` is dense parameters / non-zero parameters of the reduced
network (Molchanov et al. 2017 report |W| / |W != 0|; biases are counted on both sides).

Test figures: accuracy (RMSE for regression) and NLL of the dense posterior-mean network and
of the compact network; with ``num_samples > 0`` also of the dense and the masked posterior
predictive (:func:`~.compact.masked_predictive`).
"""

from __future__ import annotations

import math

import torch

from .compact import compact as build_compact
from .compact import layer_shapes, masked_module, masked_predictive, point_values

__all__ = ["reduction_report", "output_metrics", "format_blocks"]


@torch.no_grad()
def output_metrics(likelihood, outputs, y, noise=None) -> dict:
    """``{accuracy|rmse, nll}`` of network outputs ``(S, B, ...)`` (S draws; S = 1 for a point
    estimate). NLL = -mean_n log (1/S) sum_s p(y_n | outputs_s)."""
    mean = likelihood.predictive_mean(outputs)
    if likelihood.task == "regression":
        nll = -likelihood.log_predictive(outputs, y, noise).mean().item()
        return {"rmse": (mean - y).square().mean().sqrt().item(), "nll": nll}
    nll = -likelihood.log_predictive(outputs, y).mean().item()
    pred = mean.argmax(-1) if likelihood.task == "classification" else (mean > 0.5).long()
    return {"accuracy": (pred == y.long()).float().mean().item(), "nll": nll}


def _block_summary(info):
    out = {}
    if "heads_total" in info:
        out.update({"heads_total": info["heads_total"], "heads_kept": list(info["heads_kept"]),
                    "heads_removed": list(info["heads_removed"])})
    for mlp, u in info.get("units", {}).items():
        out[f"{mlp}_units_total"] = u["total"]
        out[f"{mlp}_units_removed"] = u["removed"]
    return out


def format_blocks(report) -> str:
    """One line per transformer/Mixer block of a report: heads kept and removed, MLP units removed."""
    lines = []
    for name, b in report.get("blocks", {}).items():
        parts = []
        if "heads_total" in b:
            parts.append(f"heads kept {b['heads_kept']} of {b['heads_total']}, removed {b['heads_removed']}")
        for key, removed in b.items():
            if key.endswith("_units_removed"):
                mlp = key[: -len("_units_removed")]
                parts.append(f"{mlp} units removed {removed}/{b[f'{mlp}_units_total']}")
        lines.append(f"{name}: " + "; ".join(parts))
    return "\n".join(lines)


def _count(t):
    return int(t.sum()) if t is not None else 0


def reduction_report(network, summary_or_values, decision, x_test=None, y_test=None, *, module=None,
                     num_samples=0, noise=None, generator=None) -> dict:
    """Counts, costs and (with test data) accuracy/NLL before and after a decision.

    ``module``: the compact network if already built (else it is built here). ``noise``: the
    Gaussian likelihood's noise scale, for regression NLLs of learned-noise models.
    """
    values = point_values(summary_or_values)
    if module is None:
        module = build_compact(network, summary_or_values, decision)
    plan = module.plan
    shapes = {name: (in_shape, out_shape) for name, _, in_shape, out_shape in layer_shapes(network)}
    element = next(iter(values.values())).element_size()
    layers, totals = {}, dict.fromkeys(
        ["weights_kept", "weights_total", "biases_kept", "biases_total", "units_kept", "units_total",
         "params_dense", "params_nonzero", "params_compact", "flops_dense", "flops_compact", "flops_sparse"], 0)
    offset = 1 if network.input_shape is not None else 0
    index = {name: i + offset for i, name in enumerate(network.layers)}
    for name, layer in network.bayesian_layers():
        if hasattr(layer, "reduction_counts"):  # a layer that compacts itself (transformer blocks)
            prefix = f"{index[name]}."
            own = {p: values[f"{name}.{p}"] for p in layer.priors()}
            entry = layer.reduction_counts(
                own, {p: decision.masks.get(f"{name}.{p}", torch.ones_like(v, dtype=torch.bool))
                      for p, v in own.items()},
                {k[len(prefix):]: v for k, v in plan.params.items() if k.startswith(prefix)},
                plan.blocks.get(name, {}), shapes[name][0])
            layers[name] = entry
            for key in totals:
                totals[key] += entry[key]
            continue
        w = values[f"{name}.weight"]
        b = values.get(f"{name}.bias")
        mw = decision.masks[f"{name}.weight"]
        mb = decision.masks.get(f"{name}.bias")
        _, out_shape = shapes[name]
        positions = math.prod(out_shape[1:]) if w.dim() == 4 else 1
        cw = plan.params[f"{index[name]}.weight"]
        cb = plan.params.get(f"{index[name]}.bias")
        entry = {
            "weights_kept": _count(mw), "weights_total": mw.numel(),
            "biases_kept": _count(mb), "biases_total": mb.numel() if mb is not None else 0,
            "units_kept": len(plan.kept_units[name]), "units_total": plan.total_units[name],
            "params_dense": w.numel() + (b.numel() if b is not None else 0),
            "params_nonzero": int((cw != 0).sum()) + (int((cb != 0).sum()) if cb is not None else 0),
            "params_compact": cw.numel() + (cb.numel() if cb is not None else 0),
            "flops_dense": 2 * w.numel() * positions,
            "flops_compact": 2 * cw.numel() * positions,
            "flops_sparse": 2 * int((cw != 0).sum()) * positions,
        }
        entry["units_removed"] = entry["units_total"] - entry["units_kept"]
        entry["sparsity"] = 1.0 - entry["weights_kept"] / entry["weights_total"]
        layers[name] = entry
        for key in totals:
            totals[key] += entry[key]
    report = {"method": decision.method, "options": decision.summary()["options"], "layers": layers, **totals}
    report.update({
        "sparsity": 1.0 - totals["weights_kept"] / max(totals["weights_total"], 1),
        "units_removed": totals["units_total"] - totals["units_kept"],
        "units_removed_per_layer": plan.units_removed,
        "compression_ratio": totals["params_dense"] / max(totals["params_nonzero"], 1),
        "compact_ratio": totals["params_dense"] / max(totals["params_compact"], 1),
        "param_bytes_dense": totals["params_dense"] * element,
        "param_bytes_compact": totals["params_compact"] * element,
        "param_bytes_nonzero": totals["params_nonzero"] * element,
        "flops_ratio": totals["flops_dense"] / max(totals["flops_compact"], 1),
        "folded_biases": plan.folded,
    })
    if plan.blocks:  # attention heads and MLP hidden units removed per block
        report["blocks"] = {name: _block_summary(info) for name, info in plan.blocks.items() if info}
        report["heads_removed_per_block"] = plan.heads_removed
    if x_test is not None and y_test is not None:
        lik = network.likelihood
        with torch.no_grad():
            dense_out = network.deterministic(values).eval()(x_test)
            masked_out = masked_module(network, values, decision)(x_test)
            compact_out = module(x_test)
        key = "rmse" if lik.task == "regression" else "accuracy"
        dense = output_metrics(lik, dense_out.unsqueeze(0), y_test, noise)
        reduced = output_metrics(lik, compact_out.unsqueeze(0), y_test, noise)
        report.update({f"test_{key}_dense": dense[key], f"test_{key}_reduced": reduced[key],
                       "test_nll_dense": dense["nll"], "test_nll_reduced": reduced["nll"],
                       "max_abs_logit_diff": (compact_out - masked_out).abs().max().item()})
        if num_samples and hasattr(summary_or_values, "locs"):
            state = generator.get_state() if generator is not None else None
            dense_s = masked_predictive(network, summary_or_values, None, x_test, num_samples, generator)
            if state is not None:
                generator.set_state(state)  # the same draws for the reduced predictive
            red_s = masked_predictive(network, summary_or_values, decision, x_test, num_samples, generator)
            dense_p = output_metrics(lik, dense_s, y_test, noise)
            red_p = output_metrics(lik, red_s, y_test, noise)
            report.update({f"test_{key}_predictive_dense": dense_p[key],
                           f"test_{key}_predictive_reduced": red_p[key],
                           "test_nll_predictive_dense": dense_p["nll"],
                           "test_nll_predictive_reduced": red_p["nll"], "predictive_samples": num_samples})
    return report
