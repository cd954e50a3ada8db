"""Reduction of a fitted run directory: what ``pyro-sparse reduce`` and ``pyro-sparse sweep`` do.

* :func:`reduce_run`: summarise the run's posterior, apply one rule, build the compact network,
  write ``DIR/reduction-<method>.json`` (the report) and ``DIR/compact-<method>.pt``.
* :func:`sweep_run`: accuracy and NLL of the masked posterior-mean network at several target
  sparsities; writes ``DIR/sweep-<method>.json``, ``.csv`` and a ``.png`` plot.
* :func:`save_compact` / :func:`load_compact`: a compact network on disk as its state dict plus
  its spec (plain containers), readable with ``torch.load(weights_only=True)``.

Bad input raises :class:`~pyro_sparse.errors.PyroSparseError` naming the flag and the value.
"""

from __future__ import annotations

import csv
import io
import math
import os

import torch

from ..checkpoint import load_safe, save_atomic, write_json_atomic, write_text_atomic
from ..errors import CheckpointError, PyroSparseError
from .compact import build_module, compact, masked_module
from .report import output_metrics, reduction_report
from .rules import METHODS, group_log_alpha, reduce

__all__ = ["reduce_run", "sweep_run", "save_compact", "load_compact", "SWEEP_METHODS", "DEFAULT_SPARSITIES"]

#: rules that rank weights, so a target sparsity can be asked of them
SWEEP_METHODS = tuple(m for m in METHODS if m != "spike-slab")
DEFAULT_SPARSITIES = (0.5, 0.8, 0.9, 0.95, 0.98, 0.99)


# --------------------------------------------------------------------------- checks


def check_method(method, allowed=METHODS, flag="--method"):
    if method not in allowed:
        raise PyroSparseError(f"{flag}: unknown method {method!r}; expected one of {', '.join(allowed)}")
    return method


def check_sparsity(value, flag="--sparsity"):
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= float(value) < 1.0 \
            or math.isnan(float(value)):
        raise PyroSparseError(f"{flag}: must be a fraction in [0, 1), got {value!r}")
    return float(value)


def parse_sparsities(text) -> list[float]:
    """``"0.5,0.8,0.9"`` -> ``[0.5, 0.8, 0.9]``, each checked as a sparsity."""
    if isinstance(text, (list, tuple)):
        items = list(text)
    else:
        items = [t.strip() for t in str(text).split(",") if t.strip()]
    if not items:
        raise PyroSparseError(f"--sparsities: expected a comma-separated list of fractions, got {text!r}")
    out = []
    for item in items:
        try:
            value = float(item)
        except ValueError:
            raise PyroSparseError(f"--sparsities: {item!r} is not a number") from None
        out.append(check_sparsity(value, "--sparsities"))
    return out


def _load(directory):
    from ..runs import load_run

    if not os.path.isdir(directory):
        raise PyroSparseError(f"{directory}: no such run directory")
    return load_run(directory)


def _noise(run):
    lik = run.network.likelihood
    if getattr(lik, "learn_noise", False):
        return run.guide.median().get("likelihood.noise")
    return None


def _decide(run, summary, method, **options):
    groups = group_log_alpha(run.network, run.guide) if method == "log-alpha" else None
    try:
        return reduce(summary, method, groups=groups, **options)
    except ValueError as e:
        head, _, rest = str(e).partition(": ")
        if head in ("sparsity", "threshold", "structured", "scope", "reduced_scale"):
            raise PyroSparseError(f"--{head.replace('_', '-')}: {rest}") from None
        if head == f"method {method!r}":
            raise PyroSparseError(f"--method {method}: {rest}") from None
        raise PyroSparseError(f"--method {method}: {e}") from None


# --------------------------------------------------------------------------- compact on disk


def save_compact(path, module, info=None):
    """Write a compact network as ``{"format", "spec", "state_dict", "info"}`` (atomically)."""
    save_atomic({"format": 1, "spec": module.spec, "state_dict": module.state_dict(), "info": info or {}},
                path, keep_previous=False)


def load_compact(path, map_location="cpu") -> torch.nn.Sequential:
    """Rebuild a compact network saved by :func:`save_compact` (loaded with ``weights_only=True``).

    The module is in inference mode and carries ``.spec`` and ``.info``.
    """
    data = load_safe(path, map_location=map_location)
    if not isinstance(data, dict) or "spec" not in data or "state_dict" not in data:
        raise CheckpointError(f"{path}: not a compact network (expected keys 'spec' and 'state_dict')")
    try:
        module = build_module(data["spec"])
        ref = next(iter(data["state_dict"].values()), None)
        if ref is not None:
            module.to(dtype=ref.dtype)
        module.load_state_dict(data["state_dict"])
    except (ValueError, KeyError, RuntimeError, TypeError) as e:
        raise CheckpointError(f"{path}: cannot rebuild the compact network ({e})") from None
    module.eval()
    module.spec = data["spec"]
    module.info = data.get("info", {})
    return module


# --------------------------------------------------------------------------- reduce


def reduce_run(directory, method, sparsity=None, threshold=None, structured=False, scope="global",
               num_samples=0, seed=0, write=True, **rule_options) -> dict:
    """Reduce a fitted run: returns the report (and writes the JSON and the compact network).

    The report holds at least ``sparsity`` (fraction of weights removed), ``units_removed``,
    ``compression_ratio``, ``test_accuracy_dense`` and ``test_accuracy_reduced`` (RMSE for
    regression), plus everything :func:`~.report.reduction_report` gives.
    """
    from ..summary import summarize

    check_method(method)
    sparsity = check_sparsity(sparsity)
    run = _load(directory)
    summary = summarize(run.network, run.guide)
    options = {"sparsity": sparsity, "threshold": threshold, "structured": structured, "scope": scope,
               "seed": seed, **rule_options}
    decision = _decide(run, summary, method, **options)
    module = compact(run.network, summary, decision)
    data = run.dataset
    generator = torch.Generator().manual_seed(seed)
    report = reduction_report(run.network, summary, decision, data.x_test, data.y_test, module=module,
                              num_samples=num_samples, noise=_noise(run), generator=generator)
    report.update({"run": os.path.abspath(directory), "summary_method": summary.method,
                   "weights_removed": report["weights_total"] - report["weights_kept"]})
    if write:
        base = f"{method}{'-structured' if structured else ''}"
        report["compact_path"] = os.path.join(directory, f"compact-{base}.pt")
        save_compact(report["compact_path"], module,
                     {"method": method, "run": os.path.abspath(directory), "sparsity": report["sparsity"]})
        report["report_path"] = os.path.join(directory, f"reduction-{base}.json")
        write_json_atomic(report["report_path"], report)
    return report


# --------------------------------------------------------------------------- sweep


def sweep_run(directory, methods, sparsities=DEFAULT_SPARSITIES, structured=False, scope="global", seed=0,
              write=True, plot=True) -> dict:
    """Accuracy (RMSE) and NLL of the masked posterior-mean network against target sparsity.

    ``methods``: one rule or a list (comma-separated string accepted), each of
    :data:`SWEEP_METHODS`. Returns ``{"rows": [...], "dense": {...}, ...}``; with ``write`` saves
    ``sweep-<methods>.json``, ``.csv`` and (``plot``) ``.png`` in the run directory.
    """
    from ..summary import summarize

    if isinstance(methods, str):
        methods = [m.strip() for m in methods.split(",") if m.strip()]
    if not methods:
        raise PyroSparseError("--method: expected a method name")
    for m in methods:
        check_method(m, SWEEP_METHODS)
    sparsities = parse_sparsities(sparsities)
    run = _load(directory)
    summary = summarize(run.network, run.guide)
    data, lik = run.dataset, run.network.likelihood
    key = "rmse" if lik.task == "regression" else "accuracy"
    with torch.no_grad():
        dense_out = masked_module(run.network, summary)(data.x_test)
    dense = output_metrics(lik, dense_out.unsqueeze(0), data.y_test, _noise(run))
    rows = []
    for method in methods:
        for q in sparsities:
            decision = _decide(run, summary, method, sparsity=q, structured=structured, scope=scope, seed=seed)
            module = compact(run.network, summary, decision)
            with torch.no_grad():
                out = module(data.x_test)
            metrics = output_metrics(lik, out.unsqueeze(0), data.y_test, _noise(run))
            rows.append({"method": method, "target_sparsity": q, "sparsity": decision.sparsity,
                         "units_removed": sum(module.plan.units_removed.values()),
                         f"test_{key}": metrics[key], "test_nll": metrics["nll"]})
    result = {"run": os.path.abspath(directory), "summary_method": summary.method, "structured": structured,
              "scope": scope, "metric": f"test_{key}", "dense": {f"test_{key}": dense[key], "test_nll": dense["nll"]},
              "rows": rows}
    if write:
        base = os.path.join(directory, f"sweep-{'+'.join(methods)}{'-structured' if structured else ''}")
        write_json_atomic(base + ".json", result)
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
        write_text_atomic(base + ".csv", buf.getvalue())
        result["paths"] = [base + ".json", base + ".csv"]
        if plot:
            _plot(result, base + ".png", directory)
            result["paths"].append(base + ".png")
    return result


def format_sweep(result) -> str:
    """The sweep as a fixed-width table."""
    key = result["metric"]
    lines = [f"dense posterior mean: {key} {result['dense'][key]:.4f}  nll {result['dense']['test_nll']:.4f}",
             f"{'method':<14} {'target':>7} {'sparsity':>9} {'units_rm':>8} {key:>14} {'test_nll':>9}"]
    for r in result["rows"]:
        lines.append(f"{r['method']:<14} {r['target_sparsity']:>7.3f} {r['sparsity']:>9.4f} {r['units_removed']:>8d} "
                     f"{r[key]:>14.4f} {r['test_nll']:>9.4f}")
    return "\n".join(lines)


def _plot(result, path, title):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    key = result["metric"]
    fig, ax = plt.subplots(figsize=(6, 4))
    methods = list(dict.fromkeys(r["method"] for r in result["rows"]))
    for method in methods:
        rows = [r for r in result["rows"] if r["method"] == method]
        ax.plot([r["sparsity"] for r in rows], [r[key] for r in rows], marker="o", label=method)
    ax.axhline(result["dense"][key], color="gray", linestyle="--", label="dense posterior mean")
    ax.set_xlabel("fraction of weights removed" if not result["structured"] else "fraction of weights removed "
                  "(structured)")
    ax.set_ylabel(key.replace("_", " "))
    ax.set_title(os.path.basename(os.path.normpath(title)) + f" ({result['summary_method']})", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    from ..checkpoint import _atomic_write

    _atomic_write(path, lambda f: f.write(buf.getvalue()))
