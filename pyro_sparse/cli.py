"""Command-line interface: ``pyro-sparse <command> ...`` (also ``python -m pyro_sparse``).

Errors caused by input (bad spec, data, flags, files) print one line naming the culprit and
exit with status 2; ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from .errors import PyroSparseError

COMMANDS = {}


def command(name, help):
    def wrap(fn):
        COMMANDS[name] = (fn, help)
        return fn

    return wrap


def _print_metrics(metrics: dict, title: str):
    print(title)
    width = max(len(k) for k in metrics)
    for key in sorted(metrics):
        value = metrics[key]
        text = f"{value:.4f}" if isinstance(value, float) else str(value)
        print(f"  {key:<{width}}  {text}")


def _add_fit(sub):
    p = sub.add_parser("fit", help="fit a model spec with an inference recipe")
    p.add_argument("--model", required=True, help="model spec (models/*.yaml)")
    p.add_argument("--inference", required=True, help="inference recipe (inference/*.yaml)")
    p.add_argument("--data", required=True, help="digits | mnist1d | sparse-regression | PATH.npz | PATH.csv | PATH.txt | IDX dir")
    p.add_argument("--target", help="label column of a CSV file")
    p.add_argument("--out", required=True, help="run directory to write")
    p.add_argument("--epochs", type=int, help="override the recipe's epochs")
    p.add_argument("--seed", type=int, help="override the recipe's seed")
    p.add_argument("--device", help="override the recipe's device (cpu, cuda, cuda:1)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")


@command("fit", "fit a model")
def cmd_fit(args):
    from .runs import fit_run

    for flag in ("epochs",):
        v = getattr(args, flag)
        if v is not None and v <= 0:
            raise PyroSparseError(f"--{flag} must be a positive integer, got {v}")
    _, metrics = fit_run(args.model, args.inference, args.data, args.out, epochs=args.epochs, seed=args.seed,
                         device=args.device, resume=args.resume, overwrite=args.overwrite, target=args.target,
                         progress=not args.no_progress)
    _print_metrics(metrics, f"fitted {args.out}")
    return 0


def _add_evaluate(sub):
    p = sub.add_parser("evaluate", help="reprint (or recompute on other data) a run's figures")
    p.add_argument("dir", help="run directory")
    p.add_argument("--data", help="evaluate on this data instead of the run's own")
    p.add_argument("--samples", type=int, default=None, help="posterior samples for the predictive")


@command("evaluate", "evaluate a run")
def cmd_evaluate(args):
    from .runs import load_run

    path = os.path.join(args.dir, "metrics.json")
    if args.data is None and args.samples is None and os.path.exists(path):
        with open(path) as f:
            _print_metrics(json.load(f), f"run {args.dir}")
        return 0
    run = load_run(args.dir, data=args.data)
    metrics = run.trainer.evaluate(args.samples)
    _print_metrics(metrics, f"run {args.dir} on {args.data or 'its own data'}")
    return 0


def build_parser():
    parser = argparse.ArgumentParser(prog="pyro-sparse", description="Bayesian sparsification of neural networks")
    parser.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    sub = parser.add_subparsers(dest="command", required=True)
    for adder in ADDERS:
        adder(sub)
    return parser


ADDERS = [_add_fit, _add_evaluate]


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return COMMANDS[args.command][0](args)
    except PyroSparseError as e:
        if args.debug:
            raise
        print(f"pyro-sparse {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; resume with --resume", file=sys.stderr)
        return 130
