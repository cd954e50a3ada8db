"""Reduction of a fitted run directory: what ``pyro-sparse reduce`` and ``pyro-sparse sweep`` do.

* :func:`reduce_run`: the run's posterior summary (``trainer.posterior_summary()``, whatever
  fitted it), one rule, the compact network; writes ``DIR/reduction-<base>.json`` (the report)
  and ``DIR/compact-<base>.pt``, ``<base>`` naming the rule and its options (:func:`output_base`).
* :func:`sweep_run`: accuracy and NLL of the compact posterior-mean network at several target
  sparsities; writes ``DIR/sweep-<methods>.json``, ``.csv`` and a ``.png`` plot.
* :func:`save_compact` / :func:`load_compact`: a compact network on disk as its state dict plus
  its spec (plain containers), readable with ``torch.load(weights_only=True)``.

Bad input raises :class:`~pyro_sparse.errors.PyroSparseError` naming the flag and the value.
"""

from __future__ import annotations

import csv
import io
import math
import os
import warnings

import torch

from . import evaluation
from .checkpoint import load_safe, save_atomic, write_json_atomic, write_text_atomic
from .errors import CheckpointError, PyroSparseError, PyroSparseWarning
from .outcome import deployment_figures, metric_key, reduction_report, saved_bytes
from .rebuild import FORMAT, align_pattern, build_module, check_format, compact, masked_module
from .reduction.rules import reduce
from .registry import RULES
from .runs import load_run

__all__ = ["reduce_run", "sweep_run", "save_compact", "load_compact", "compact_payload", "DEFAULT_SPARSITIES",
           "output_base", "run_rule"]

DEFAULT_SPARSITIES = (0.5, 0.8, 0.9, 0.95, 0.98, 0.99)


# --------------------------------------------------------------------------- checks


def check_method(method, ranking=False, flag="--method"):
    """``method`` if it names a registered rule (one that ranks to a sparsity, with ``ranking``)."""
    allowed = [name for name, r in RULES.items() if r.ranks or not ranking]
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


def _load(directory, data=None):
    if not os.path.isdir(directory):
        raise PyroSparseError(f"{directory}: no such run directory")
    return load_run(directory, data=data)


def _noise(run):
    lik = run.network.likelihood
    if getattr(lik, "learn_noise", False):
        return run.guide.median().get("likelihood.noise")
    return None


def _decide(summary, method, **options):
    try:
        return reduce(summary, method, **options)
    except ValueError as e:
        head, _, rest = str(e).partition(": ")
        if head in ("sparsity", "threshold", "structured", "scope", "reduced_scale", "pattern", "compensate",
                    "output_scale"):
            raise PyroSparseError(f"--{head.replace('_', '-')}: {rest}") from None
        if head == f"rule {method!r}":
            raise PyroSparseError(f"--method {method}: {rest}") from None
        raise PyroSparseError(f"--method {method}: {e}") from None


# --------------------------------------------------------------------------- compact on disk


def compact_payload(module, info=None) -> dict:
    """What a compact file holds: ``{"format", "spec", "state_dict", "info"}``."""
    return {"format": FORMAT, "spec": module.spec, "state_dict": module.state_dict(), "info": info or {}}


def save_compact(path: str, module: torch.nn.Module, info: dict | None = None) -> None:
    """Write a compact network as ``{"format", "spec", "state_dict", "info"}`` (atomically); a
    layer stored in CSR (:mod:`pyro_sparse.storage`) saves its kept weights only."""
    save_atomic(compact_payload(module, info), path, keep_previous=False)


def load_compact(path: str, map_location="cpu") -> torch.nn.Module:
    """Rebuild a compact network saved by :func:`save_compact` (loaded with ``weights_only=True``).

    The module is in inference mode and carries ``.spec`` and ``.info``. A compact network of a
    converted module is an instance of the user's class (``spec["kind"] == "module"``): building
    it imports that class, which needs :func:`pyro_sparse.usercode.allow_code`
    (``--allow-code``), and calls it with the arguments the spec recorded.
    """
    data = load_safe(path, map_location=map_location)
    if not isinstance(data, dict) or "spec" not in data or "state_dict" not in data:
        raise CheckpointError(f"{path}: not a compact network (expected keys 'spec' and 'state_dict')")
    if isinstance(data["spec"], dict) and data["spec"].get("kind") == "module":
        try:
            check_format(data["spec"])
        except ValueError as e:
            raise CheckpointError(f"{path}: {e}") from None
        module = _user_module(path, data["spec"])
        try:
            module.load_state_dict(data["state_dict"])
        except RuntimeError as e:
            raise CheckpointError(f"{path}: the compact network does not fit {data['spec'].get('class')} "
                                  f"({str(e).splitlines()[0][:300]})") from None
        module.eval()
        module.spec, module.info = data["spec"], data.get("info", {})
        return module
    try:
        module = build_module(data["spec"])
        ref = next((t for t in data["state_dict"].values() if t.is_floating_point()), None)
        if ref is not None:
            module.to(dtype=ref.dtype)
        module.load_state_dict(data["state_dict"])
    except (ValueError, KeyError, RuntimeError, TypeError) as e:
        raise CheckpointError(f"{path}: cannot rebuild the compact network ({e})") from None
    module.eval()
    module.spec = data["spec"]
    module.info = data.get("info", {})
    return module


def _user_module(path, spec):
    """An instance of the user's class named by a compact module spec, with the compact chains in
    place (parameters still to be loaded) and the input reshaping of its network."""
    from .convert import reshaping_inputs
    from .rebuild import replace_chains
    from .usercode import import_object

    source = spec.get("source") or {"module": spec.get("class"), "kwargs": {}}
    cls = import_object(source["module"], None, f"{path}: module")
    try:
        module = cls(**(source.get("kwargs") or {}))
    except Exception as e:
        raise CheckpointError(f"{path}: {source['module']}(**{source.get('kwargs') or {}}) failed ({type(e).__name__}: "
                              f"{e}); a compact file of a module converted in Python records no constructor "
                              "arguments: rebuild it with the class yourself and load its state_dict") from None
    replace_chains(module, spec)
    return reshaping_inputs(module, spec.get("input_shape"))


# --------------------------------------------------------------------------- reduce


def run_rule(run, method=None, threshold=None, sparsity=None, structured=False):
    """``(rule, threshold, sparsity, structured)`` to use on a run: as given, or where ``method``
    is None the recipe's ``reduction:`` section (its method, with its threshold or sparsity
    unless one is given)."""
    if method is None:
        section = run.recipe.get("reduction") or {}
        method = section.get("method")
        if method is None:
            from .rules import applicable_rules

            applies = [name for name, why in applicable_rules(run.trainer.posterior_summary()).items() if why is None]
            raise PyroSparseError("--method: required (the run's recipe names no reduction.method); rules that "
                                  f"apply to this run: {', '.join(applies)}")
        if threshold is None and sparsity is None:
            threshold, sparsity = section.get("threshold"), section.get("sparsity")
        structured = structured or bool(section.get("structured"))
    return check_method(method), threshold, sparsity, structured


def output_base(method, sparsity=None, threshold=None, structured=False, scope="global", reduced_scale=None,
                pattern=None, compensate=None, output_scale=None):
    """The stem of a reduction's files, naming what distinguishes it: ``opd-s0.9``,
    ``log-alpha-t3``, ``bmr-g0.01-structured``, ``magnitude-2of4``, ``bmr-s0.9-plain`` (no
    compensation asked), ``bmr-s0.9-posterior`` (the posterior's own output scale asked)."""
    parts = [method]
    if pattern is not None:
        parts.append(str(pattern).replace(":", "of"))
    if sparsity is not None:
        parts.append(f"s{sparsity:g}")
    if threshold is not None:
        parts.append(f"t{threshold:g}")
    if reduced_scale is not None:
        parts.append(f"g{reduced_scale:g}")
    if scope != "global":
        parts.append(scope)
    if structured:
        parts.append("structured")
    if compensate is False:
        parts.append("plain")
    if output_scale is not None:
        parts.append(output_scale)
    return "-".join(parts)


def _refuse_overwrite(paths, overwrite):
    existing = [p for p in paths if os.path.exists(p)]
    if existing and not overwrite:
        raise PyroSparseError(f"{existing[0]}: exists (the same reduction was written before); "
                              "use --overwrite to replace it")


def reduce_run(directory: str, method: str | None = None, sparsity: float | None = None,
               threshold: float | None = None, structured: bool = False, scope: str = "global",
               num_samples: int = 0, seed: int = 0, write: bool = True, overwrite: bool = False,
               data: str | None = None, storage: str = "auto", latency: bool = True, max_drop: float | None = None,
               **rule_options) -> dict:
    """Reduce a fitted run: returns the report (and writes the JSON and the compact network).

    ``method``: a rule of :data:`pyro_sparse.registry.RULES`; default the recipe's
    ``reduction.method`` (and its threshold). ``rule_options``: further options of
    :func:`~.rules.reduce` (``reduced_scale``, ``compensate``, ``pattern``, ``output_scale``); a
    compensated reduction works layer by layer on the run's training inputs (the trainer's
    ``calibration()``). The report holds at least ``sparsity`` (fraction of weights not in the
    compact network), ``rule_sparsity``, ``units_removed``, ``compression_ratio``,
    ``test_accuracy_dense`` and ``test_accuracy_reduced`` (RMSE for regression), ``quality``
    (:func:`~pyro_sparse.evaluation.quality`: a warning when the reduced network falls more than
    :data:`~pyro_sparse.evaluation.WARN_DROP` below the dense one, also printed), plus everything
    :func:`~.report.reduction_report` gives. Files
    ``reduction-<base>.json`` and ``compact-<base>.pt`` (:func:`output_base`) are never replaced
    without ``overwrite``; with ``max_drop`` a larger fall raises
    :class:`~pyro_sparse.errors.QualityError` and nothing is written.

    ``storage``: how the compact network stores its kept weights (:func:`~.compact.compact`);
    the report adds the compact file's size against the dense network's ``state_dict``, the
    floats it stores, each layer's storage and (``latency``) the latency of both networks at
    batch 1 and 256, measured on the test inputs (:func:`~.report.deployment_figures`).
    """
    if storage not in ("auto", "csr", "dense"):
        raise PyroSparseError(f"--storage: expected auto, csr or dense, got {storage!r}")
    sparsity = check_sparsity(sparsity)
    rule_options = {k: v for k, v in rule_options.items() if v is not None}
    run = _load(directory, data)
    method, threshold, sparsity, structured = run_rule(run, method, threshold, sparsity, structured)
    if threshold is None and sparsity is None and rule_options.get("pattern") is None:  # the rule's own, named
        threshold = RULES[method].threshold
    base = output_base(method, sparsity, threshold, structured, scope, rule_options.get("reduced_scale"),
                       rule_options.get("pattern"), rule_options.get("compensate"), rule_options.get("output_scale"))
    paths = [os.path.join(directory, f"reduction-{base}.json"), os.path.join(directory, f"compact-{base}.pt")]
    if write:
        _refuse_overwrite(paths, overwrite)
    summary = run.trainer.posterior_summary()
    if hasattr(run.trainer, "calibration") and any(s.structure is not None for s in summary.values()):
        rule_options.setdefault("calibration", run.trainer.calibration())
    options = {"sparsity": sparsity, "threshold": threshold, "structured": structured, "scope": scope,
               "seed": seed, **rule_options}
    decision = _decide(summary, method, **options)
    if rule_options.get("pattern") and not decision.values:  # the N:M blocks over the inputs each compact
        decision = align_pattern(run.network, summary, decision)  # layer keeps (a compensated one is final)
    module = compact(run.network, summary, decision, storage=storage)
    data = run.dataset
    generator = torch.Generator().manual_seed(seed)
    report = reduction_report(run.network, summary, decision, data.x_test, data.y_test, module=module,
                              num_samples=num_samples, noise=_noise(run), generator=generator)
    report.update({"run": os.path.abspath(directory), "summary_method": summary.method,
                   "weights_removed": report["weights_total"] - report["weights_kept"]})
    key = metric_key(run.network.likelihood)
    advice = ""
    if summary.method.startswith("svi") and RULES[method].evidence:
        advice = ("; one-shot evidence rules on a long mean-field fit over-prune (README, 'When one-shot reduction "
                  "over-prunes'): use a target --sparsity, a Laplace posterior with curvature kfac, or iterative BMR")
    names = ("accuracy", "nll") if key == "accuracy" else ("nll",)
    report["quality"] = evaluation.quality({k: report[f"test_{k}_dense"] for k in names},
                                           {k: report[f"test_{k}_reduced"] for k in names}, max_drop, advice)
    if report["quality"]["warning"]:
        warnings.warn(report["quality"]["warning"], PyroSparseWarning, stacklevel=2)
    info = {"method": method, "run": os.path.abspath(directory), "sparsity": report["sparsity"],
            "options": report["options"], **_run_extras(run)}
    if write:
        report["report_path"], report["compact_path"] = paths
        save_compact(report["compact_path"], module, info)
        compact_bytes = os.path.getsize(report["compact_path"])
    else:
        compact_bytes = saved_bytes(compact_payload(module, info))
    report.update(deployment_figures(masked_module(run.network, summary), module,
                                     data.x_test if latency else None, compact_bytes))
    if write:
        write_json_atomic(report["report_path"], report)
    return report


def _run_extras(run) -> dict:
    """What a compact file carries of its run beyond the network: the likelihood (to read its
    outputs; a learned noise scale), the example shape, and the transforms of the inputs (to apply
    to raw data) and of regression targets (to map standardised outputs back)."""
    extras = {"likelihood": run.model_spec.get("likelihood"), "feature_shape": list(run.dataset.feature_shape)}
    for key in ("input_transform", "target_transform"):
        transform = run.dataset.extras.get(key)
        if transform is not None:
            extras[key] = transform
    noise = _noise(run)
    if noise is not None:  # a learned Gaussian noise scale (its posterior median)
        extras["noise"] = float(torch.as_tensor(noise).reshape(-1)[0])
    return extras


# --------------------------------------------------------------------------- sweep


def sweep_run(directory: str, methods, sparsities=DEFAULT_SPARSITIES, structured: bool = False,
              scope: str = "global", seed: int = 0, write: bool = True, plot: bool = True, overwrite: bool = False,
              data: str | None = None) -> dict:
    """Accuracy (RMSE) and NLL of the compact posterior-mean network against target sparsity.

    ``methods``: one rule or a list (comma-separated string accepted), each a rule that ranks
    to a sparsity. Returns ``{"rows": [...], "dense": {...}, ...}``; with ``write`` saves
    ``sweep-<methods>[-structured].json``, ``.csv`` and (``plot``) ``.png`` in the run directory
    (not replacing earlier ones without ``overwrite``). ``sparsity`` in a row is the fraction of
    weights not in the compact network, ``rule_sparsity`` the fraction the rule removed.
    """
    if isinstance(methods, str):
        methods = [m.strip() for m in methods.split(",") if m.strip()]
    if not methods:
        raise PyroSparseError("--method: expected a method name")
    for m in methods:
        check_method(m, ranking=True)
    sparsities = parse_sparsities(sparsities)
    base = os.path.join(directory, f"sweep-{'+'.join(methods)}{'-structured' if structured else ''}"
                                   f"{'' if scope == 'global' else '-' + scope}")
    paths = [base + ".json", base + ".csv"] + ([base + ".png"] if plot else [])
    if write:
        _refuse_overwrite(paths, overwrite)
    run = _load(directory, data)
    summary = run.trainer.posterior_summary()
    data, lik = run.dataset, run.network.likelihood
    key, noise = metric_key(lik), _noise(run)
    dense = evaluation.evaluate(evaluation.point_predictive(masked_module(run.network, summary)), data.x_test,
                                data.y_test, lik, noise)
    rows = []
    for method in methods:
        for q in sparsities:
            decision = _decide(summary, method, sparsity=q, structured=structured, scope=scope, seed=seed)
            module = compact(run.network, summary, decision, storage="dense")  # accuracy only: no timing
            figures = evaluation.evaluate(evaluation.point_predictive(module), data.x_test, data.y_test, lik, noise)
            kept = sum(int((t != 0).sum()) for k, t in module.plan.params.items()
                       if t.is_floating_point() and k.rsplit(".", 1)[-1].startswith("weight"))
            total = decision.counts()[1]
            rows.append({"method": method, "target_sparsity": q, "sparsity": 1.0 - kept / max(total, 1),
                         "rule_sparsity": decision.sparsity,
                         "units_removed": sum(module.plan.units_removed.values()),
                         f"test_{key}": figures[key], "test_nll": figures["nll"]})
    result = {"run": os.path.abspath(directory), "summary_method": summary.method, "structured": structured,
              "scope": scope, "metric": f"test_{key}", "dense": {f"test_{key}": dense[key], "test_nll": dense["nll"]},
              "rows": rows}
    if write:
        write_json_atomic(base + ".json", result)
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
        write_text_atomic(base + ".csv", buf.getvalue())
        if plot:
            _plot(result, base + ".png", directory)
        result["paths"] = paths
    return result


def format_sweep(result) -> str:
    """The sweep as a fixed-width table."""
    key = result["metric"]
    lines = [f"dense posterior-mean network: {key} {result['dense'][key]:.4f}  nll {result['dense']['test_nll']:.4f}",
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
    from .plots import coinciding

    methods = list(dict.fromkeys(r["method"] for r in result["rows"]))
    curves = {m: ([r["sparsity"] for r in result["rows"] if r["method"] == m],
                  [r[key] for r in result["rows"] if r["method"] == m]) for m in methods}
    for label, (xs, ys) in coinciding(curves).items():  # curves on top of each other drawn once, every name
        ax.plot(xs, ys, marker="o", label=label)
    ax.axhline(result["dense"][key], color="gray", linestyle="--", label="dense posterior-mean network")
    ax.set_xlabel("sparsity (fraction of the weights zero in the compact network)"
                  + (", whole units removed" if result["structured"] else ""))
    ax.set_ylabel(key.replace("_", " ") + " (compact posterior-mean network)")
    ax.set_title(os.path.basename(os.path.normpath(title)) + f" ({result['summary_method']})", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    from .checkpoint import _atomic_write

    _atomic_write(path, lambda f: f.write(buf.getvalue()))
