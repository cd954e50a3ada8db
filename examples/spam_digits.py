"""SpaM on digits: MAP vs marginal-likelihood training, then OPD vs magnitude vs random pruning.

Trains the digits MLP (64-300-100-10, models/mlp_gaussian.yaml) three times with the same
deterministic loop (inference/laplace_marglik.yaml):

* MAP: fixed prior precision (``hyper_steps: 0``);
* SpaM, parameter-wise and unit-wise prior precisions learned by the Laplace marginal likelihood
  (Dhahri et al. 2024; Immer et al. 2021).

Then prunes each to 20..99% of its weights (one-shot, no fine-tuning) with Optimal Posterior
Damage (``P_ii theta_i^2`` from the Laplace posterior summary), magnitude and random scores, and
structurally (whole hidden units) with and without a short masked fine-tune. Prints the tables
and saves ``accuracy_vs_sparsity.png`` and ``results.json`` in ``--out``.

Run:  PYTHONPATH=. python examples/spam_digits.py [--epochs 100] [--out runs/spam_digits]
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch
import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SPARSITIES = (0.2, 0.5, 0.8, 0.9, 0.95, 0.98, 0.99)
UNIT_FRACTIONS = (0.5, 0.7, 0.8, 0.9, 0.95)
RANDOM_DRAWS = 5


def train(name, spec, recipe, data, **laplace):
    from pyro_sparse.laplace.trainer import LaplaceTrainer
    from pyro_sparse.runs import build, parse_specs

    r = dict(recipe, laplace=dict(recipe["laplace"], **laplace), eval_every=10_000)
    m, r = parse_specs(spec, r)
    network, guide = build(m, r, data)
    trainer = LaplaceTrainer(network, guide, data, r, progress=False)
    metrics = trainer.fit()
    marglik = [h["log_marglik"] for h in trainer.history if "log_marglik" in h]
    print(f"{name:<22} test acc {metrics['test_accuracy']:.4f}  nll {metrics['test_nll']:.4f}  "
          f"train {metrics['train_seconds']:.1f} s" + (f"  log marglik {marglik[-1]:.1f}" if marglik else ""))
    return trainer


def accuracy(trainer, masks, fine_tune_epochs=0):
    return trainer.evaluate_model(trainer.pruned(masks, fine_tune_epochs=fine_tune_epochs))["test_accuracy"]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=None, help="override the recipe's epochs (100)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=os.path.join(ROOT, "runs", "spam_digits"))
    parser.add_argument("--fine-tune-epochs", type=int, default=5, help="masked fine-tune after structured pruning")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)

    from pyro_sparse.data import load_digits
    from pyro_sparse.rebuild import compact
    from pyro_sparse.reduction import reduce

    data = load_digits()
    spec = yaml.safe_load(open(os.path.join(ROOT, "models", "mlp_gaussian.yaml")))
    recipe = yaml.safe_load(open(os.path.join(ROOT, "inference", "laplace_marglik.yaml")))
    recipe["seed"] = args.seed
    if args.epochs:
        recipe["epochs"] = args.epochs
    start = time.perf_counter()
    trainers = {
        "MAP": train("MAP (fixed prior)", spec, recipe, data, hyper_steps=0),
        "SpaM-pw": train("SpaM parameter-wise", spec, recipe, data, structure="parameterwise"),
        "SpaM-uw": train("SpaM unit-wise", spec, recipe, data, structure="unitwise"),
    }
    summaries = {name: t.posterior_summary() for name, t in trainers.items()}

    # ---------------------------------------------------------------- unstructured, one shot
    curves = {  # label -> (trainer, rule)
        "SpaM-pw + OPD": ("SpaM-pw", "opd"),
        "SpaM-uw + OPD": ("SpaM-uw", "opd"),
        "SpaM-pw + magnitude": ("SpaM-pw", "magnitude"),
        "MAP + OPD": ("MAP", "opd"),
        "MAP + magnitude": ("MAP", "magnitude"),
        "MAP + random": ("MAP", "random"),  # mean of RANDOM_DRAWS masks
    }
    table = {}
    for label, (name, rule) in curves.items():
        row = []
        for sparsity in SPARSITIES:
            draws = RANDOM_DRAWS if rule == "random" else 1  # random masks: mean over draws
            accs = [accuracy(trainers[name], reduce(summaries[name], rule, sparsity=sparsity,
                                                    seed=args.seed + d).masks)
                    for d in range(draws)]
            row.append(sum(accs) / draws)
        table[label] = row
    width = max(len(k) for k in table)
    print(f"\nTest accuracy after one-shot unstructured pruning (no fine-tune), {data.name}, "
          f"{trainers['MAP'].network.num_weights()} weights (random: mean of {RANDOM_DRAWS} masks)")
    print(f"{'sparsity':<{width}}  " + "  ".join(f"{s:>6.0%}" for s in SPARSITIES))
    for label, row in table.items():
        print(f"{label:<{width}}  " + "  ".join(f"{a:6.3f}" for a in row))

    # ---------------------------------------------------------------- structured: whole hidden units
    structured = {}
    for label, (name, rule) in {"SpaM-uw + OPD": ("SpaM-uw", "opd"), "SpaM-pw + OPD": ("SpaM-pw", "opd"),
                                "MAP + magnitude": ("MAP", "magnitude")}.items():
        plain, tuned, weights = [], [], []
        for fraction in UNIT_FRACTIONS:
            decision = reduce(summaries[name], rule, sparsity=fraction, structured=True)
            masks = decision.masks
            # weights left in the compact network (removing a unit also removes the next layer's columns)
            module = compact(trainers[name].network, summaries[name], decision)
            kept = sum(int((m.weight != 0).sum()) for m in module if isinstance(m, torch.nn.Linear))
            weights.append(1 - kept / decision.counts()[1])
            plain.append(accuracy(trainers[name], masks))
            tuned.append(accuracy(trainers[name], masks, args.fine_tune_epochs))
        structured[label] = {"weight_sparsity": weights, "accuracy": plain, "accuracy_fine_tuned": tuned}
    print(f"\nTest accuracy after removing a fraction of the hidden units of every layer "
          f"(structured; '+ft' = {args.fine_tune_epochs}-epoch masked fine-tune)")
    width = max(len(k) for k in structured) + 4
    print(f"{'units removed':<{width}}  " + "  ".join(f"{f:>6.0%}" for f in UNIT_FRACTIONS))
    print(f"{'(weights removed)':<{width}}  "
          + "  ".join(f"{w:>6.1%}" for w in structured["MAP + magnitude"]["weight_sparsity"]))
    for label, row in structured.items():
        print(f"{label:<{width}}  " + "  ".join(f"{a:6.3f}" for a in row["accuracy"]))
        print(f"{label + ' +ft':<{width}}  " + "  ".join(f"{a:6.3f}" for a in row["accuracy_fine_tuned"]))

    # ---------------------------------------------------------------- figure and numbers
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(args.out, exist_ok=True)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 5.6))
    styles = {"SpaM-pw + OPD": ("C0", "o", "-"), "SpaM-uw + OPD": ("C2", "s", "-"),
              "SpaM-pw + magnitude": ("C0", "^", ":"), "MAP + OPD": ("C1", "o", "--"),
              "MAP + magnitude": ("C3", "v", "-"), "MAP + random": ("C7", "x", "-")}
    positions = range(len(SPARSITIES))
    for label, row in table.items():
        color, marker, line = styles[label]
        ax1.plot(positions, row, color=color, marker=marker, linestyle=line, label=label)
    ax1.set_xticks(list(positions), [f"{s:.0%}" for s in SPARSITIES])
    ax1.set_xlabel("weight sparsity (fraction of weights removed)")
    ax1.set_ylabel("test accuracy")
    ax1.set_title("Unstructured, one-shot (no fine-tune)")
    ax1.set_ylim(0, 1.02)
    ax1.grid(alpha=0.3)
    ax1.legend(loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=3, fontsize=8)
    for (label, row), color in zip(structured.items(), ("C2", "C0", "C3")):
        ax2.plot(UNIT_FRACTIONS, row["accuracy"], color=color, marker="o", linestyle="--", label=f"{label}")
        ax2.plot(UNIT_FRACTIONS, row["accuracy_fine_tuned"], color=color, marker="s", linestyle="-",
                 label=f"{label}, {args.fine_tune_epochs}-epoch masked fine-tune")
    ax2.set_xlabel("fraction of hidden units removed per layer")
    ax2.set_ylabel("test accuracy")
    ax2.set_title("Structured (whole units)")
    ax2.set_ylim(0, 1.02)
    ax2.grid(alpha=0.3)
    ax2.legend(loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2, fontsize=8)
    fig.suptitle("Digits MLP 64-300-100-10: SpaM (Laplace marglik) vs MAP")
    fig.tight_layout()
    path = os.path.join(args.out, "accuracy_vs_sparsity.png")
    fig.savefig(path, dpi=120)
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump({"sparsities": SPARSITIES, "unstructured": table, "unit_fractions": UNIT_FRACTIONS,
                   "structured": structured,
                   "dense": {k: t.evaluate()["test_accuracy"] for k, t in trainers.items()},
                   "train_seconds": {k: t.train_seconds for k, t in trainers.items()}}, f, indent=1)
    print(f"\nsaved {path} ({time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()
