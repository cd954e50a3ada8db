"""Command-line interface: ``pyro-sparse <command> ...`` (also ``python -m pyro_sparse``).

Errors caused by input (bad spec, data, flags, files) print one line naming the culprit and
exit with status 2; ``--debug`` shows the traceback instead. Library warnings
(:class:`~pyro_sparse.errors.PyroSparseWarning`: a data fingerprint that differs from the
run's, a resume from ``checkpoint.pt.prev``, a NaN recovery) print as one ``warning:`` line
on stderr.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings

from .builtins import BUILTIN, names
from .errors import PyroSparseError, PyroSparseWarning
from .rundir import check_out_dir, check_run_dir

# Only the standard library, the checks of pyro_sparse.rundir and the table of built-in names
# (pyro_sparse.builtins, which imports nothing) are imported here: flags, files and directories are
# checked before a command imports torch, Pyro or a model (`--help` and a wrong flag answer at once).

COMMANDS = {}


def command(name, help):
    def wrap(fn):
        COMMANDS[name] = (fn, help)
        return fn

    return wrap


def _check_file(flag, path):
    if path is not None and not os.path.isfile(path):
        raise PyroSparseError(f"{flag}: {path}: {'is a directory' if os.path.isdir(path) else 'no such file'}")


def _looks_like_a_path(data: str) -> bool:
    """A data argument that names a file or directory rather than a built-in set (``digits``)."""
    return os.sep in data or "." in os.path.basename(data) or os.path.isdir(data)


def _print_metrics(metrics: dict, title: str):
    print(title)
    width = max(len(k) for k in metrics)
    for key in sorted(metrics):
        value = metrics[key]
        text = f"{value:.4f}" if isinstance(value, float) else str(value)
        print(f"  {key:<{width}}  {text}")


def _add_fit(sub):
    p = sub.add_parser("fit", help="fit a model spec with an inference recipe")
    p.add_argument("--model", help="model spec (models/*.yaml); not needed with --resume")
    p.add_argument("--inference", help="inference recipe (inference/*.yaml); default: the spec's own recipe; not "
                                       "needed with --resume")
    p.add_argument("--data", help="digits | mnist1d | sparse-regression | PATH.npz | PATH.csv | PATH.txt | IDX dir; "
                   "not needed with --resume")
    p.add_argument("--target", help="label column of a CSV file")
    p.add_argument("--init", help="start from this state_dict file or run directory (in place of the spec's init:); "
                                  "with a Laplace recipe of 0 epochs, the post-hoc Laplace posterior of those weights")
    p.add_argument("--out", required=True, help="run directory to write")
    p.add_argument("--epochs", type=int, help="override the recipe's epochs")
    p.add_argument("--seed", type=int, help="override the recipe's seed")
    p.add_argument("--device", help="override the recipe's device (cpu, cuda, cuda:1)")
    p.add_argument("--threads", type=int, help="torch CPU threads (overrides the recipe's num_threads)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.add_argument("--quiet", action="store_true", help="no progress output (bar, or per-epoch lines when stderr "
                   "is not a terminal); warnings, errors and the final figures still print")
    p.add_argument("--distributed", action="store_true", default=None,
                   help="data-parallel over the processes of a torchrun launch (the default when "
                        "torchrun's WORLD_SIZE > 1); fails outside torchrun")


@command("fit", "fit a model")
def cmd_fit(args):
    missing = [f"--{k}" for k in ("model", "data") if getattr(args, k) is None]
    if missing and not args.resume:
        raise PyroSparseError(f"fit needs {', '.join(missing)} (or --resume to continue the run in --out)")
    for flag in ("epochs", "threads"):
        v = getattr(args, flag)
        if v is not None and v <= 0:
            raise PyroSparseError(f"--{flag} must be a positive integer, got {v}")
    if args.seed is not None and not 0 <= args.seed < 2**32:
        raise PyroSparseError(f"--seed must be an integer in [0, 2**32), got {args.seed}")
    for flag in ("model", "inference"):
        _check_file(f"--{flag}", getattr(args, flag))
    if args.data is not None and _looks_like_a_path(args.data) and not os.path.exists(args.data):
        raise PyroSparseError(f"--data: {args.data}: no such file or directory")
    if args.init is not None and (args.resume or not os.path.exists(args.init)):
        raise PyroSparseError(f"--init: {args.init}: " + ("a resumed run continues from its checkpoint" if args.resume
                                                           else "no such state_dict file or run directory"))
    check_out_dir(args.out, args.resume, args.overwrite)  # all of the above before torch is imported
    from .runs import fit_run

    _, metrics = fit_run(args.model, args.inference, args.data, args.out, epochs=args.epochs, seed=args.seed,
                         device=args.device, resume=args.resume, overwrite=args.overwrite, target=args.target,
                         progress=not (args.no_progress or args.quiet), distributed=args.distributed,
                         init=args.init, threads=args.threads)
    from .distributed import env_rank

    if env_rank() == 0:  # under torchrun only rank 0 prints
        _print_metrics(metrics, f"fitted {args.out}")
    return 0


def _add_evaluate(sub):
    p = sub.add_parser("evaluate", help="reprint (or recompute on other data) a run's figures")
    p.add_argument("dir", help="run directory")
    p.add_argument("--data", help="evaluate on this data instead of the run's own")
    p.add_argument("--samples", type=int, default=None, help="posterior samples for the predictive")


@command("evaluate", "evaluate a run")
def cmd_evaluate(args):
    if args.samples is not None and args.samples <= 0:
        raise PyroSparseError(f"--samples must be a positive integer, got {args.samples}")
    check_run_dir(args.dir)
    from .checkpoint import read_json
    from .runs import load_run

    path = os.path.join(args.dir, "metrics.json")
    if args.data is None and args.samples is None and os.path.exists(path):
        metrics = read_json(path, "metrics file")
        if metrics:
            _print_metrics(metrics, f"run {args.dir}")
            return 0
    run = load_run(args.dir, data=args.data)
    metrics = run.trainer.evaluate(args.samples)
    _print_metrics(metrics, f"run {args.dir} on {args.data or 'its own data'}")
    return 0


def _add_reduce(sub):
    p = sub.add_parser("reduce", help="prune a fitted run with one rule and save the compact network")
    p.add_argument("dir", help="run directory (from pyro-sparse fit)")
    p.add_argument("--method", help=f"reduction rule: {', '.join(names('reduction rule'))}, or a plugin's "
                                    "(pyro-sparse list rules; default: the recipe's reduction.method)")
    p.add_argument("--sparsity", type=float, help="target fraction of weights (structured: units per layer) to remove")
    p.add_argument("--threshold", type=float, help="the rule's threshold (default: the rule's own, or the recipe's)")
    p.add_argument("--structured", action="store_true", help="remove whole units / conv filters")
    p.add_argument("--scope", default="global", help="global | layer: rank weights over the network or per layer")
    p.add_argument("--reduced-scale", type=float, help="bmr: standard deviation of the reduced prior N(0, g^2)")
    p.add_argument("--pattern", help="N:M, e.g. 2:4: keep at most N of every M consecutive weights along each weight's "
                                     "input axis (input channels at every kernel position), ranked by the rule (alone, "
                                     "or with --threshold / --sparsity); compensated: the whole target")
    p.add_argument("--compensate", choices=("auto", "yes", "no"), default="auto",
                   help="bmr, savage-dickey: move the kept weights to the reduced posterior mean (default: where the "
                        "run's posterior has the structure, a Laplace fit with curvature kfac or rows)")
    p.add_argument("--output-scale", choices=("unit", "posterior"),
                   help="with compensation: read each layer in unit output scale or as fitted (default: unit for a "
                        "classifier, posterior for a regression)")
    p.add_argument("--max-drop", type=float,
                   help="fail (exit 3, nothing written) when the reduced network's test accuracy falls more than this "
                        "below the dense one's (a fraction: 0.02 = 2 points; regression: NLL per example)")
    p.add_argument("--samples", type=int, default=0, help="also report the masked posterior predictive (draws)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random rule and the predictive draws")
    p.add_argument("--data", help="the run's data, if it moved (a different fingerprint is warned about)")
    p.add_argument("--overwrite", action="store_true", help="replace the files of the same reduction")
    p.add_argument("--storage", default="auto", help="auto | csr | dense: kept weights of Linear/Conv layers in CSR "
                   "where smaller, computed sparsely where measured faster (auto), always sparsely (csr), or "
                   "every layer dense")
    p.add_argument("--no-latency", action="store_true", help="skip the latency measurement (batch 1 and 256)")


#: what the figures of `reduce` are, in the words every command uses
REDUCE_LEGEND = ("  (test_*_dense / _reduced: the posterior-mean network, dense and compact; test_*_predictive_*: the "
                 "posterior predictive, --samples draws; sparsity: the fraction of the weights zero in the compact "
                 "network, rule_sparsity: removed by the rule itself; biases and frozen modules are not weights)")


@command("reduce", "reduce a fitted run")
def cmd_reduce(args):
    if args.scope not in ("global", "layer"):
        raise PyroSparseError(f"--scope: expected 'global' or 'layer', got {args.scope!r}")
    if args.samples < 0:
        raise PyroSparseError(f"--samples: must be >= 0, got {args.samples}")
    if args.max_drop is not None and not args.max_drop >= 0:
        raise PyroSparseError(f"--max-drop: must be a number >= 0, got {args.max_drop}")
    if args.storage not in ("auto", "csr", "dense"):
        raise PyroSparseError(f"--storage: expected auto, csr or dense, got {args.storage!r}")
    extra = {"reduced_scale": args.reduced_scale} if args.reduced_scale is not None else {}
    extra.update({"compensate": {"auto": None, "yes": True, "no": False}[args.compensate],
                  "output_scale": args.output_scale})
    if args.pattern is not None:
        n, sep, m = args.pattern.partition(":")
        if not (sep and n.isdigit() and m.isdigit() and 0 < int(n) < int(m)):
            raise PyroSparseError(f"--pattern: expected N:M with 0 < N < M (e.g. 2:4), got {args.pattern!r}")
        extra["pattern"] = args.pattern
    check_run_dir(args.dir)
    from .reduced_runs import reduce_run

    report = reduce_run(args.dir, args.method, sparsity=args.sparsity, threshold=args.threshold,
                        structured=args.structured, scope=args.scope, num_samples=args.samples, seed=args.seed,
                        overwrite=args.overwrite, data=args.data, storage=args.storage,
                        latency=not args.no_latency, max_drop=args.max_drop, **extra)
    keys = [k for k in report if k.startswith("test_")] + [
        "sparsity", "rule_sparsity", "weights_kept", "weights_total", "units_removed", "compression_ratio",
        "compact_ratio", "flops_dense", "flops_compact", "param_bytes_dense", "param_bytes_compact",
        "max_abs_output_diff"]
    _print_metrics({k: report[k] for k in keys}, f"reduced {args.dir} with {report['method']}")
    print(REDUCE_LEGEND)
    if report.get("compensation"):
        per_layer = ", ".join(f"{k or '(root)'} {v['sparsity']:.3f} removed, dF {v['delta_f']:.1f}"
                              for k, v in report["compensation"].items())
        print(f"  compensated (kept weights moved to the reduced posterior mean); per layer: {per_layer}")
    if report.get("approximation"):
        print(f"  approximation: {report['approximation']}")
    print("  units kept per layer: " + ", ".join(f"{k} {v['units_kept']}/{v['units_total']}"
                                                 for k, v in report["layers"].items() if v["units_total"]))
    if report.get("blocks"):
        from .outcome import format_blocks

        print("\n".join("  " + line for line in format_blocks(report).splitlines()))
    for name, layer in report["layers"].items():
        for k, r in enumerate(layer.get("recurrent", [])):
            gates = ", ".join(f"{g} {v['kept']} ({v['constant']} constant)" for g, v in r["gates"].items())
            print(f"  {name}[{k}] {r['cell']}: hidden {r['hidden'][0]}/{r['hidden'][1]}, inputs "
                  f"{r['inputs'][0]}/{r['inputs'][1]}, gates computed {gates}")
    from .outcome import format_deployment

    print("\n".join("  " + line for line in format_deployment(report).splitlines()))
    print(f"  wrote {report['report_path']} and {report['compact_path']}")
    return 0


def _add_sweep(sub):
    p = sub.add_parser("sweep", help="accuracy against sparsity for ranking rules (table, JSON, CSV, PNG)")
    p.add_argument("dir", help="run directory")
    p.add_argument("--method", required=True, help=f"reduction rules, comma-separated for several curves: "
                                                   f"{', '.join(names('reduction rule'))}, or a plugin's")
    p.add_argument("--sparsities", default="0.5,0.8,0.9,0.95,0.98,0.99", help="comma-separated fractions")
    p.add_argument("--structured", action="store_true", help="remove whole units (fractions of units per layer)")
    p.add_argument("--scope", default="global", help="global | layer")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-plot", action="store_true", help="skip the PNG")
    p.add_argument("--data", help="the run's data, if it moved")
    p.add_argument("--overwrite", action="store_true", help="replace the files of the same sweep")


@command("sweep", "sparsity sweep")
def cmd_sweep(args):
    if args.scope not in ("global", "layer"):
        raise PyroSparseError(f"--scope: expected 'global' or 'layer', got {args.scope!r}")
    check_run_dir(args.dir)
    from .reduced_runs import format_sweep, sweep_run

    result = sweep_run(args.dir, args.method, args.sparsities, structured=args.structured, scope=args.scope,
                       seed=args.seed, plot=not args.no_plot, overwrite=args.overwrite, data=args.data)
    print(format_sweep(result))
    print("wrote " + ", ".join(result["paths"]))
    return 0


def build_parser():
    parser = argparse.ArgumentParser(prog="pyro-sparse", description="Bayesian sparsification of neural networks")
    parser.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    sub = parser.add_subparsers(dest="command", required=True)
    for adder in ADDERS:
        adder(sub)
    for name in CODE_COMMANDS:  # a spec may name a Python class (module:); importing it runs its code
        sub.choices[name].add_argument("--allow-code", action="store_true",
                                       help="allow a model spec that names a Python class (module: pkg.mod:Class) "
                                            "to import it; importing runs that code")
    return parser


#: commands that build networks from model specs (which may name code to import)
CODE_COMMANDS = ("fit", "evaluate", "reduce", "sweep", "report", "compare", "predict", "export", "list")


ADDERS = [_add_fit, _add_evaluate, _add_reduce, _add_sweep]


def _add_report(sub):
    p = sub.add_parser("report", help="ArviZ posterior, reduced models, plots and report.md for a run")
    p.add_argument("dir", help="run directory")
    p.add_argument("--samples", type=int, default=100, help="posterior draws (default 100)")
    p.add_argument("--seed", type=int, default=0, help="seed of the draws")
    p.add_argument("--threads", type=int, help="torch CPU threads (small networks: 1 is fastest)")
    p.add_argument("--data", help="the run's data, if it moved (a different fingerprint is warned about)")


@command("report", "write a run report")
def cmd_report(args):
    if not 0 <= args.seed < 2**32:
        raise PyroSparseError(f"--seed must be an integer in [0, 2**32), got {args.seed}")
    if args.samples < 2:
        raise PyroSparseError(f"--samples must be an integer >= 2 (PSIS needs several draws), got {args.samples}")
    if args.threads is not None and args.threads < 1:
        raise PyroSparseError(f"--threads must be a positive integer, got {args.threads}")
    check_run_dir(args.dir)
    if args.threads is not None:
        import torch

        torch.set_num_threads(args.threads)
    from .report import write_report

    write_report(args.dir, num_samples=args.samples, seed=args.seed, data=args.data)
    print(f"wrote {os.path.join(args.dir, 'report.md')}")
    return 0


def _add_compare(sub):
    p = sub.add_parser("compare", help="rank runs (PSIS-LOO where reliable, else held-out log predictive density) "
                                       "next to accuracy, sparsity and size")
    p.add_argument("entries", nargs="+", help="run directories, DIR:RULE for a reduced model of a report, or .nc files")
    p.add_argument("--samples", type=int, default=100, help="draws for runs without posterior.nc")
    p.add_argument("--out", help="also write the table here (.md, or .csv)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out file")


@command("compare", "compare runs")
def cmd_compare(args):
    if args.samples < 2:
        raise PyroSparseError(f"--samples must be an integer >= 2, got {args.samples}")
    if args.out and os.path.exists(args.out) and not (args.overwrite and os.path.isfile(args.out)):
        raise PyroSparseError(f"{args.out}: exists; use --overwrite to replace it" if os.path.isfile(args.out)
                              else f"{args.out}: exists and is not a file")
    for entry in args.entries:
        path = entry if os.path.exists(entry) else entry.partition(":")[0]
        if not os.path.exists(path):
            raise PyroSparseError(f"{entry}: not a run directory or .nc file")
    from .report import compare_entries, markdown_table, text_table

    rows, note = compare_entries(args.entries, num_samples=args.samples)
    print(note)
    print(text_table(rows))
    if args.out:
        if args.out.endswith(".csv"):
            import csv

            with open(args.out, "w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=list(rows[0]))
                writer.writeheader()
                writer.writerows(rows)
        else:
            with open(args.out, "w") as f:
                f.write(f"# Model comparison with accuracy, sparsity and size\n\n{note}\n\n")
                f.write(markdown_table(rows) + "\n")
        print(f"wrote {args.out}")
    return 0


ADDERS.extend([_add_report, _add_compare])


def _add_predict(sub):
    p = sub.add_parser("predict", help="class probabilities (or predictive mean and sd) for new data, from a run or "
                                       "a compact network")
    p.add_argument("source", help="run directory (posterior predictive), compact-*.pt file (deterministic), or a "
                                  "graph written by pyro-sparse export (TorchScript, or .onnx with onnxruntime)")
    p.add_argument("--data", required=True, help="PATH.npz (x [, y]) or PATH.csv (features [, target column]); "
                                                 "raw inputs: the run's input transform is applied")
    p.add_argument("--out", required=True, help="file to write: PATH.npz (one array per column) or CSV (one row "
                                                "per example)")
    p.add_argument("--target", help="label column of a CSV file (default: 'target' where present)")
    p.add_argument("--samples", type=int, default=100, help="posterior draws for a run (default 100)")
    p.add_argument("--seed", type=int, default=0, help="seed of the draws")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out file")


@command("predict", "predict new data")
def cmd_predict(args):
    from .predict import predict, write_predictions

    if args.samples <= 0:
        raise PyroSparseError(f"--samples: must be a positive integer, got {args.samples}")
    if os.path.exists(args.out) and not (args.overwrite and os.path.isfile(args.out)):
        raise PyroSparseError(f"{args.out}: exists; use --overwrite to replace it" if os.path.isfile(args.out)
                              else f"{args.out}: exists and is not a file")
    result = predict(args.source, args.data, num_samples=args.samples, seed=args.seed, target=args.target)
    write_predictions(result, args.out, overwrite=args.overwrite)
    what = {"run": f"posterior predictive, {result['samples']} draw(s)", "compact": "compact network",
            "graph": "exported graph"}[result["source"]]
    print(f"predicted {result['examples']} examples from {args.source} ({what})")
    for key, value in (result["figures"] or {}).items():
        print(f"  {key:<9} {value:.4f}")
    print(f"wrote {args.out}")
    return 0


ADDERS.append(_add_predict)


def _add_export(sub):
    p = sub.add_parser("export", help="write a compact network (with its input transform) as a TorchScript or ONNX "
                                      "graph that runs without pyro-sparse")
    p.add_argument("source", help="compact-*.pt file, or a run directory (reduced with its recipe's rule, or --method)")
    p.add_argument("--format", required=True, help="torchscript | onnx (onnx needs: pip install 'pyro-sparse[onnx]')")
    p.add_argument("--out", required=True, help="file to write")
    p.add_argument("--method", help="run directory: the reduction rule (default: the recipe's)")
    p.add_argument("--threshold", type=float, help="run directory: the rule's threshold")
    p.add_argument("--sparsity", type=float, help="run directory: target fraction of weights to remove")
    p.add_argument("--data", help="PATH.npz or PATH.csv of raw inputs to check the graph on (default: the run's "
                                  "test split)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out file")


@command("export", "export a compact network as a graph")
def cmd_export(args):
    if args.format not in ("torchscript", "onnx"):  # pyro_sparse.deploy.FORMATS (imported after the checks)
        raise PyroSparseError(f"--format: expected torchscript or onnx, got {args.format!r}")
    if os.path.exists(args.out) and not (args.overwrite and os.path.isfile(args.out)):
        raise PyroSparseError(f"{args.out}: exists; use --overwrite to replace it" if os.path.isfile(args.out)
                              else f"{args.out}: exists and is not a file")
    if not os.path.exists(args.source):
        raise PyroSparseError(f"{args.source}: no such run directory or compact file")
    if os.path.isdir(args.source):
        check_run_dir(args.source)
    _check_file("--data", args.data)
    from .deploy import export_graph

    result = export_graph(args.source, args.out, args.format, overwrite=args.overwrite, data=args.data,
                          method=args.method, threshold=args.threshold, sparsity=args.sparsity)
    diff = result["max_abs_diff"]
    check = (f"outputs within {diff:.2g} of the compact network's on {result['checked_on']} ({result['examples']} "
             f"examples; largest |output| {result['max_abs_output']:.3g})" if diff is not None
             else "not checked: onnxruntime is not installed")
    print(f"wrote {args.out} ({args.format}, {result['bytes']:,} bytes): {check}")
    return 0


ADDERS.append(_add_export)

#: the words `pyro-sparse list` takes for each registry kind
LIST_KINDS = {"priors": "prior", "layers": "layer", "likelihoods": "likelihood", "guides": "guide",
              "methods": "fitting method", "rules": "reduction rule", "conversions": "module conversion"}


def _add_list(sub):
    p = sub.add_parser("list", help="the registered priors, layers, likelihoods, guides, methods, rules and "
                                    "module conversions (built-in and from plugins)")
    p.add_argument("kind", nargs="?", choices=sorted(LIST_KINDS), help="one registry (default: all)")
    p.add_argument("--plugins", help="comma-separated plugin modules or .py files to load first (needs --allow-code)")


def _first_sentence(doc, limit=100) -> str:
    """The first sentence of a docstring on one line (at most ``limit`` characters)."""
    import re

    paragraph = " ".join((doc or "").strip().split("\n\n")[0].split())
    paragraph = re.sub(r":(?:math|class|func|mod|meth):`~?([^`]*)`", r"\1", paragraph).replace("``", "")
    end = re.search(r"(?<!\bal)(?<!e\.g)(?<!i\.e)\.\s+(?=[A-Z(])", paragraph)
    text = paragraph[: end.start() + 1] if end else paragraph
    return text if len(text) <= limit else text[: limit - 3] + "..."


@command("list", "list the registries")
def cmd_list(args):
    from .plugins import load_plugins
    from .registry import REGISTRIES

    if args.plugins:
        load_plugins([r.strip() for r in args.plugins.split(",") if r.strip()], None, "--plugins")
    kinds = [LIST_KINDS[args.kind]] if args.kind else list(LIST_KINDS.values())
    for kind in kinds:
        registry = REGISTRIES[kind]
        print(f"{kind}s:" if not kind.endswith("s") else f"{kind}:")
        for name, obj in registry.items():
            cls = obj if isinstance(obj, type) else type(obj)
            doc = _first_sentence(cls.__doc__)
            extra = ""
            if kind == "reduction rule":
                extra = (f" [threshold {obj.threshold}]" if obj.threshold is not None else
                         " [ranks to a sparsity]" if obj.ranks else " [decides alone]")
            elif kind == "module conversion":
                extra = " [converts " + ", ".join(t.__name__ for t in obj.torch_types) + "]"
            builtin = BUILTIN["layer" if kind == "module conversion" else kind]
            origin = "" if name in builtin else f" (plugin {cls.__module__})"
            print(f"  {name:<26}{doc}{extra}{origin}")
    return 0


ADDERS.append(_add_list)


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)

    def show(message, category, filename, lineno, file=None, line=None):
        if issubclass(category, PyroSparseWarning):
            print(f"pyro-sparse {args.command}: warning: {message}", file=sys.stderr)
        else:
            sys.stderr.write(warnings.formatwarning(message, category, filename, lineno, line))

    with warnings.catch_warnings():
        warnings.simplefilter("always", PyroSparseWarning)
        warnings.showwarning = show
        try:
            from .usercode import allow_code

            with allow_code(getattr(args, "allow_code", False)):
                return COMMANDS[args.command][0](args)
        except PyroSparseError as e:
            if args.debug:
                raise
            print(f"pyro-sparse {args.command}: error: {e}", file=sys.stderr)
            return getattr(e, "exit_status", 2)
        except OSError as e:  # unwritable --out, full disk, ...: the environment, not a bug
            if args.debug:
                raise
            where = f"{e.filename}: " if getattr(e, "filename", None) else ""
            print(f"pyro-sparse {args.command}: error: {where}{e.strerror or e}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            print("interrupted; resume with --resume", file=sys.stderr)
            return 130
