"""The reduction report: what a decision removed and what it costs and gains.

Counts (per layer and overall), read off the compact network that
:func:`~.compact.compact` built, so they describe what is actually left:

* ``weights_total`` / ``weights_kept``: the network's weights (parameters named ``weight*``:
  matrices, kernels, recurrent weights, embeddings, layer-norm gains) and how many of them are
  non-zero in the compact network -- a weight of a deleted unit or gate is not kept, even where
  the rule kept it. ``sparsity = 1 - weights_kept / weights_total``. ``rule_sparsity`` is the
  fraction the rule itself removed (before compaction deleted the units it left useless);
* ``units_total`` / ``units_kept``: units of every unit group (neurons, channels, recurrent
  hidden neurons, embedding dimensions, transformer MLP units), and attention heads per block;
* ``frozen_params``: the parameters of the modules a converted network left deterministic (batch
  norms, modules without a Bayesian counterpart; ``network.frozen_parameters()``), which no rule
  judges and no figure above counts; a tied parameter is one site, counted once;
* ``params_dense`` (every parameter of the network, group variables included), ``params_compact``
  (the compact network's parameters, zeros included) and ``params_nonzero``, their bytes, and
  ``compression_ratio = params_dense / params_nonzero`` (Molchanov et al. 2017 report
  |W| / |W != 0|);
* FLOPs per example, counting the multiply-adds of the parametric layers as 2 operations each
  (activations, pooling and bias additions are not counted): ``flops_dense`` of the network,
  ``flops_compact`` of the dense compact network, ``flops_sparse`` counting only its non-zero
  weights (what a sparse kernel would do).

Deployment figures (:func:`deployment_figures`, which ``reduce`` adds): the bytes of the compact
file against those of the dense network's ``state_dict`` saved with ``torch.save``, the floats the
compact file stores (``params_stored``: kept weights of CSR layers, every entry of dense ones),
each Linear/Conv layer's storage (:mod:`pyro_sparse.storage`), and the latency of the compact and
the dense network at batch 1 and 256 measured on the spot.

Test figures (:mod:`pyro_sparse.evaluation`): ``test_<accuracy|rmse>_dense`` and ``_reduced``
are those of the *posterior-mean network* (dense, and compact); with ``num_samples > 0``
``test_<...>_predictive_dense`` / ``_reduced`` are those of the *posterior predictive* with that
many draws, dense and masked (:func:`~.compact.masked_predictive`); ``max_abs_output_diff`` is
the largest difference between the compact network's and the masked network's outputs.
"""

from __future__ import annotations

import torch

from . import evaluation
from .rebuild import compact as build_compact
from .rebuild import compact_plan, masked_module, masked_predictive, point_values
from .summary import param_role

__all__ = ["reduction_report", "format_blocks", "metric_key", "deployment_figures", "saved_bytes", "format_deployment"]


def metric_key(likelihood) -> str:
    """``rmse`` for regression, else ``accuracy``."""
    return "rmse" if likelihood.task == "regression" else "accuracy"


def _block_summary(info):
    out = {}
    if "heads_total" in info:
        out.update({"heads_total": info["heads_total"], "heads_kept": list(info["heads_kept"]),
                    "heads_removed": list(info["heads_removed"])})
    for mlp, u in info.get("units", {}).items():
        if mlp:
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


def _numel(tensors, role=None, nonzero=False):
    out = 0
    for name, t in tensors.items():
        if not t.is_floating_point() or (role is not None and param_role(name) != role):
            continue
        out += int((t != 0).sum()) if nonzero else t.numel()
    return out


def _layer_entry(name, values, masks, params, info, dense_info) -> dict:
    """The report's figures of one layer from its dense values, the rule's masks, its compact
    parameters and what compaction removed."""
    units = info.get("units", {})
    entry = {
        "weights_total": _numel(values, "weight"), "weights_kept": _numel(params, "weight", nonzero=True),
        "rule_weights_kept": sum(int(masks[k].sum()) if k in masks else v.numel() for k, v in values.items()
                                 if param_role(k) == "weight"),
        "biases_total": _numel(values, "bias"), "biases_kept": _numel(params, "bias", nonzero=True),
        "units_total": sum(u["total"] for u in units.values()),
        "units_kept": sum(len(u["kept"]) for u in units.values()),
        "params_dense": _numel(values), "params_compact": _numel(params),
        "params_nonzero": _numel(params, nonzero=True),
        "flops_dense": dense_info.get("flops", 0), "flops_compact": info.get("flops", 0),
        "flops_sparse": info.get("flops_sparse", 0),
    }
    entry["units_removed"] = entry["units_total"] - entry["units_kept"]
    entry["sparsity"] = 1.0 - entry["weights_kept"] / entry["weights_total"] if entry["weights_total"] else 0.0
    if "heads_total" in info:
        entry.update({"heads_total": info["heads_total"], "heads_kept": len(info["heads_kept"]),
                      "heads_removed": len(info["heads_removed"])})
    if "recurrent" in info:
        entry["recurrent"] = info["recurrent"]
    return entry


def _own(d, name):
    prefix = name + "."
    return {k[len(prefix):]: v for k, v in d.items() if k.startswith(prefix)}


@torch.no_grad()
def reduction_report(network, summary_or_values, decision, x_test=None, y_test=None, *, module=None,
                     num_samples=0, noise=None, generator=None, input_shape=None) -> dict:
    """Counts, costs and (with test data) accuracy/NLL before and after a decision.

    ``module``: the compact network if already built (else it is built here). ``noise``: the
    Gaussian likelihood's noise scale, for regression NLLs of learned-noise models.
    ``input_shape``: the per-example input shape where the network declares none.
    """
    values = point_values(summary_or_values)
    if module is None:
        module = build_compact(network, summary_or_values, decision, input_shape)
    plan = module.plan
    dense = compact_plan(network, values, {}, input_shape)  # the network itself, as compaction counts it
    element = next(iter(values.values())).element_size()
    keys = ["weights_kept", "rule_weights_kept", "weights_total", "biases_kept", "biases_total", "units_kept",
            "units_total", "params_dense", "params_nonzero", "params_compact", "flops_dense", "flops_compact",
            "flops_sparse"]
    layers, totals = {}, dict.fromkeys(keys, 0)
    tied = set(getattr(network, "ties", {}))  # a tied parameter's other names: counted at its site only
    params = {k: v for k, v in plan.params.items() if k not in tied}
    for name in plan.layers:  # the Bayesian layers, in network order
        entry = _layer_entry(name, _own(values, name), _own(decision.masks, name), _own(params, name),
                             plan.layers[name], dense.layers.get(name, {}))
        layers[name] = entry
        for key in totals:
            totals[key] += entry[key]
    report = {"method": decision.method, "options": decision.summary()["options"], "layers": layers, **totals}
    report.update({
        "sparsity": 1.0 - totals["weights_kept"] / max(totals["weights_total"], 1),
        "rule_sparsity": decision.sparsity,
        "units_removed": totals["units_total"] - totals["units_kept"],
        "units_removed_per_layer": plan.units_removed,
        "compression_ratio": totals["params_dense"] / max(totals["params_nonzero"], 1),
        "compact_ratio": totals["params_dense"] / max(totals["params_compact"], 1),
        "param_bytes_dense": totals["params_dense"] * element,
        "param_bytes_compact": totals["params_compact"] * element,
        "param_bytes_nonzero": totals["params_nonzero"] * element,
        "flops_ratio": totals["flops_dense"] / max(totals["flops_compact"], 1),
        "folded_biases": plan.folded,
        "compensated": bool(decision.values), "approximation": decision.approximation,
        "frozen_params": sum(network.frozen_parameters().values()),
    })
    if decision.layers:  # the compensated reduction, layer by layer: removed, evidence change, path
        report["compensation"] = decision.summary()["layers"]
    blocks = {name: _block_summary(info) for name, info in plan.layers.items()
              if "heads_total" in info or any(info.get("units", {}))}
    if blocks:  # attention heads and MLP hidden units removed per block
        report["blocks"] = blocks
        report["heads_removed_per_block"] = plan.heads_removed
    if x_test is not None and y_test is not None:
        lik = network.likelihood
        key = metric_key(lik)
        masked = masked_module(network, values, decision)
        dense_fig = evaluation.evaluate(evaluation.point_predictive(network.deterministic(values)), x_test, y_test,
                                        lik, noise)
        reduced_fig = evaluation.evaluate(evaluation.point_predictive(module), x_test, y_test, lik, noise)
        report.update({f"test_{key}_dense": dense_fig[key], f"test_{key}_reduced": reduced_fig[key],
                       "test_nll_dense": dense_fig["nll"], "test_nll_reduced": reduced_fig["nll"],
                       "max_abs_output_diff": _max_diff(module, masked, x_test)})
        if num_samples and hasattr(summary_or_values, "locs"):
            state = generator.get_state() if generator is not None else None

            def draws(d):
                return lambda xb: masked_predictive(network, summary_or_values, d, xb, num_samples, generator)

            dense_p = evaluation.evaluate(draws(None), x_test, y_test, lik, noise, batch_size=len(x_test))
            if state is not None:
                generator.set_state(state)  # the same draws for the reduced predictive
            red_p = evaluation.evaluate(draws(decision), x_test, y_test, lik, noise, batch_size=len(x_test))
            report.update({f"test_{key}_predictive_dense": dense_p[key],
                           f"test_{key}_predictive_reduced": red_p[key],
                           "test_nll_predictive_dense": dense_p["nll"],
                           "test_nll_predictive_reduced": red_p["nll"], "predictive_samples": num_samples})
    return report


def _max_diff(a, b, x, batch_size=1024):
    out = 0.0
    for start in range(0, len(x), batch_size):
        xb = x[start:start + batch_size]
        out = max(out, (a(xb) - b(xb)).abs().max().item())
    return out


def saved_bytes(obj) -> int:
    """The size of ``torch.save(obj)`` in bytes."""
    import io

    buf = io.BytesIO()
    torch.save(obj, buf)
    return len(buf.getvalue())


def _rows(x, n):
    """``n`` examples of ``x``, its rows repeated where it has fewer."""
    if len(x) >= n:
        return x[:n]
    reps = -(-n // len(x))
    return x.repeat(reps, *([1] * (x.dim() - 1)))[:n]


def deployment_figures(dense_module, module, x=None, compact_bytes=None, batch_sizes=(1, 256), repeats=7) -> dict:
    """What the compact network ``module`` gains on the dense network ``dense_module``.

    * ``file_bytes_dense``: ``torch.save(dense_module.state_dict())``; ``file_bytes_compact``: the
      compact file's size (``compact_bytes``; default its state dict's), and their ratio
      ``file_ratio``; ``params_stored``: the floats of the compact state dict;
    * ``storage``: per Linear/Conv layer its storage record (:func:`pyro_sparse.storage.decide`:
      ``dense`` or ``csr``, density, ``sparse_from``);
    * with inputs ``x`` (rows repeated up to the batch size where there are fewer), ``latency``:
      ``b<N> -> {dense_us, compact_us, speedup, dense_wall_us, compact_wall_us}``, medians of
      interleaved blocks with one torch thread (:func:`pyro_sparse.timing.compare_latency`).
    """
    from .timing import compare_latency

    state = module.state_dict()
    out = {"file_bytes_dense": saved_bytes(dense_module.state_dict()),
           "file_bytes_compact": int(compact_bytes) if compact_bytes is not None else saved_bytes(state),
           "params_stored": sum(t.numel() for t in state.values() if t.is_floating_point())}
    out["file_ratio"] = out["file_bytes_dense"] / max(out["file_bytes_compact"], 1)
    plan = getattr(module, "plan", None)
    if plan is not None:
        out["storage"] = {name: {k: info["storage"][k] for k in ("layer", "storage", "density", "nnz", "kernels",
                                                                   "switch_rows", "pattern", "pattern_holds", "reason")
                                 if k in info["storage"]}
                          for name, info in plan.layers.items() if "storage" in info}
    if x is not None and len(x):
        inputs = {f"b{b}": _rows(x, b) for b in batch_sizes}
        measured = compare_latency({"dense": dense_module.eval(), "compact": module.eval()}, inputs, repeats=repeats)
        out["latency"] = {label: {"dense_us": t["dense"], "compact_us": t["compact"],
                                  "speedup": t["dense"] / max(t["compact"], 1e-9),
                                  "dense_wall_us": t["dense_wall"], "compact_wall_us": t["compact_wall"]}
                          for label, t in measured.items()}
    return out


def _storage_text(s) -> str:
    if s["layer"] == "plain":
        return "plain"
    text = f"{s['storage']} ({100 * s['density']:.1f}% kept"
    if "kernels" in s:
        small, large = s["kernels"]
        text += f", kernel {small}" if s.get("switch_rows") is None else \
            f", kernel {small} below {s['switch_rows']} rows, {large} from there"
    if "pattern" in s:
        text += f", {s['pattern']} {'holds' if s['pattern_holds'] else 'broken by deleted input units'}"
    return text + ")"


def format_deployment(report) -> str:
    """Lines for the command line: file size, parameters, storage and latency."""
    lines = [f"compact file {report['file_bytes_compact']:,} bytes against {report['file_bytes_dense']:,} of the "
             f"dense network's state_dict ({report['file_ratio']:.1f}x smaller); {report['params_stored']:,} floats "
             f"stored against {report['params_dense']:,} parameters"]
    storage = report.get("storage") or {}
    if storage:
        lines.append("storage: " + ", ".join(f"{name} {_storage_text(s)}" for name, s in storage.items()))
    for label, t in (report.get("latency") or {}).items():
        lines.append(f"latency at batch {label[1:]}: dense {t['dense_us']:.0f} us, compact {t['compact_us']:.0f} us "
                     f"({t['speedup']:.2f}x; one thread, median of interleaved blocks)")
    return "\n".join(lines)
