"""Sparsify recurrent networks (Lobacheva, Chirkova, Vetrov 2017/2018) and print their tables.

Two experiments, each "fit the dense reference and the sparse configurations, prune by
log alpha > 3, compact, report":

    python examples/rnn_sparsify.py mnist1d [--configs map,w,wn,wgn] [--out runs/rnn]
    python examples/rnn_sparsify.py charlm [--corpus PATH.txt] [--configs map,w,wn] [--out runs/rnn]

``mnist1d``: LSTM with 128 hidden units on MNIST-1D read as 40 steps of one value
(models/lstm_classifier*.yaml). ``charlm``: a character-level LSTM language model
(models/char_lm*.yaml) on a text file; without ``--corpus`` one is written from the Python
standard library's own sources (concatenated until it holds >= 1 MB). The tables give test
accuracy / bits per character of the posterior-mean network, of the pruned network and of the
compact network built from it (through ``reduce_run``, the path of ``pyro-sparse reduce``), the
fraction of recurrent weights removed, hidden neurons kept and gates kept per type (constant
gates in parentheses).
"""

import argparse
import glob
import math
import os
import sys
import sysconfig
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from pyro_sparse.guides import DeltaGuide  # noqa: E402
from pyro_sparse.reduced_runs import reduce_run  # noqa: E402
from pyro_sparse.runs import fit_run, load_run  # noqa: E402

EXPERIMENTS = {
    "mnist1d": {"model": "lstm_classifier", "map_recipe": "map_rnn", "svi_recipe": "svi_sparsevd_rnn",
                "configs": "map,w,wn,wgn"},
    "charlm": {"model": "char_lm", "map_recipe": "map_char_lm", "svi_recipe": "svi_sparsevd_char_lm",
               "configs": "map,w,wn"},
}


def stdlib_corpus(path, min_bytes=1 << 20):
    """Concatenate the standard library's .py files (sorted, deterministic) until >= min_bytes."""
    if os.path.exists(path) and os.path.getsize(path) >= min_bytes:
        return path
    files = sorted(glob.glob(os.path.join(sysconfig.get_paths()["stdlib"], "*.py")))
    chunks, size = [], 0
    for name in files:
        with open(name, encoding="utf-8", errors="replace") as f:
            text = f.read()
        chunks.append(text)
        size += len(text.encode("utf-8"))
        if size >= min_bytes:
            break
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.write("".join(chunks))
    return path


def report(run, name, seconds):
    """One row of the table: the posterior-mean network, then ``reduce_run`` (what
    ``pyro-sparse reduce DIR`` does with the recipe's rule, log alpha > 3): the compact network,
    recurrent weights removed, hidden neurons kept and gates computed (constant) per type."""
    metric = "bpc" if run.dataset.task == "sequence" else "accuracy"
    if isinstance(run.guide, DeltaGuide):
        return {"config": name, "fit_s": seconds, **{k: v for k, v in run.trainer.evaluate().items()
                                                      if k.startswith("test_")}}, None
    r = reduce_run(run.directory, overwrite=True)
    recurrent = [rep for layer in r["layers"].values() for rep in layer.get("recurrent", [])]
    kept = sum(x["weights"][0] for x in recurrent)
    total = sum(x["weights"][1] for x in recurrent)
    row = {"config": name, "fit_s": seconds,
           "dense_mean_net": r[f"test_{'accuracy' if metric == 'accuracy' else 'nll'}_dense"],
           "compact": r[f"test_{'accuracy' if metric == 'accuracy' else 'nll'}_reduced"],
           "recurrent_weights_removed": 1 - kept / total, "max_abs_output_diff": r["max_abs_output_diff"],
           "hidden_kept": "+".join(f"{x['hidden'][0]}/{x['hidden'][1]}" for x in recurrent),
           "gates": ", ".join(" ".join(f"{g}{v['kept']}({v['constant']})" for g, v in x["gates"].items())
                              for x in recurrent)}
    if metric == "bpc":  # per-character NLL in nats -> bits
        row["dense_mean_net"], row["compact"] = row["dense_mean_net"] / math.log(2), row["compact"] / math.log(2)
    return row, r["compact_path"]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("experiment", choices=sorted(EXPERIMENTS))
    parser.add_argument("--configs", help="comma-separated subset of map,w,wn,wgn")
    parser.add_argument("--corpus", help="text file for charlm (default: written from the stdlib)")
    parser.add_argument("--out", default=os.path.join(ROOT, "runs", "rnn"))
    parser.add_argument("--epochs", type=int, help="override the recipes' epochs")
    parser.add_argument("--reuse", action="store_true", help="report existing finished runs instead of refitting")
    args = parser.parse_args()
    torch.set_num_threads(1)
    exp = EXPERIMENTS[args.experiment]
    data = args.experiment
    if args.experiment == "charlm":
        data = args.corpus or stdlib_corpus(os.path.join(args.out, "stdlib_corpus.txt"))
        print(f"corpus {data}: {os.path.getsize(data)} bytes")
    rows = []
    for config in (args.configs or exp["configs"]).split(","):
        model = os.path.join(ROOT, "models", exp["model"] + ("" if config == "map" else f"_{config}") + ".yaml")
        recipe_name = exp["map_recipe"] if config == "map" else exp["svi_recipe"]
        recipe = os.path.join(ROOT, "inference", recipe_name + ".yaml")
        out = os.path.join(args.out, f"{args.experiment}_{config}")
        start = time.perf_counter()
        if args.reuse and os.path.exists(os.path.join(out, "metrics.json")):
            run = load_run(out)
        else:
            run, _ = fit_run(model, recipe, data, out, epochs=args.epochs, overwrite=True, progress=False)
        seconds = time.perf_counter() - start
        row, table = report(run, config.upper(), seconds)
        rows.append(row)
        print(f"\n== {config.upper()}: {os.path.relpath(model, ROOT)} + {os.path.relpath(recipe, ROOT)} "
              f"({run.trainer.epoch} epochs, {seconds:.0f} s)")
        print("  " + "  ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()))
        if table:
            print(f"  compact network: {table}")


if __name__ == "__main__":
    main()
