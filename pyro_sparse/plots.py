"""Figures of a run, saved as PNG: training traces, sparsity maps, score histograms, and
accuracy-vs-sparsity curves.

Plain matplotlib on :class:`matplotlib.figure.Figure` objects (Agg canvas, no pyplot state, no
display needed). Inputs are plain tensors, dicts and lists, so the functions serve any fitting
or reduction method. The ArviZ forest plot lives in :mod:`pyro_sparse.diagnostics` (the one
module that imports ArviZ).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from matplotlib.figure import Figure
from matplotlib.ticker import FixedLocator, MaxNLocator

__all__ = [
    "plot_training",
    "plot_sparsity_maps",
    "plot_score_histogram",
    "plot_score_histograms",
    "plot_accuracy_vs_sparsity",
]

THRESHOLD_COLOR = "#d62728"


def _save(fig, path, dpi=110):
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    return path


def _series(history, key):
    pts = [(h.get("epoch", i + 1), h[key]) for i, h in enumerate(history)
           if h.get(key) is not None and math.isfinite(h[key])]
    return (np.array([p[0] for p in pts]), np.array([p[1] for p in pts])) if pts else (np.array([]), np.array([]))


#: the training objective a history may hold, and how to label it
OBJECTIVES = (("elbo_per_datum", "ELBO per training datum (nats)", "ELBO"),
              ("neg_log_joint_per_datum", "-log p(y, theta) per training datum (nats)", "MAP objective"))


def plot_training(history: list[dict], path: str, title: str = "training", figures_of: str | None = None) -> str:
    """The training traces of any fit, one panel each, per epoch:

    * the objective: the ELBO per datum (SVI; the end of the KL warm-up, the first epoch with
      ``kl_weight == 1``, is marked by a dotted line) or the negative log joint per datum (MAP
      and the MAP steps of a Laplace fit);
    * for a Laplace fit with marginal-likelihood steps (SpaM), the Laplace log marginal
      likelihood per datum at each step, with the mean log prior precision;
    * held-out accuracy, or RMSE, with the NLL, where an epoch was evaluated.

    ``history`` is the trainer's list of per-epoch records (``metrics.jsonl``); ``figures_of`` says
    what the held-out figures are (``"the posterior predictive, 10 draws"``), for the axis label.
    """
    if not history:
        raise ValueError("history: no epochs recorded, nothing to plot")
    objective = next(((k, label, short) for k, label, short in OBJECTIVES if len(_series(history, k)[0])), None)
    marglik = len(_series(history, "log_marglik_per_datum")[0]) > 0
    metric = next((k for k in ("test_accuracy", "test_rmse") if len(_series(history, k)[0])), None)
    panels = [p for p, on in (("objective", objective), ("marglik", marglik), ("metric", metric)) if on]
    if not panels:
        raise ValueError(f"history: no trace to plot (keys {sorted(history[-1])})")
    fig = Figure(figsize=(0.5 + 4.8 * len(panels), 3.8))
    axes = dict(zip(panels, fig.subplots(1, len(panels), squeeze=False)[0]))
    if objective:
        key, label, short = objective
        epochs, values = _series(history, key)
        ax = axes["objective"]
        ax.plot(epochs, values, color="#1f77b4", lw=1.5)
        ax.set_xlabel("epoch")
        ax.set_ylabel(label)
        ax.set_title(f"{title}: {short}")
        ax.grid(alpha=0.3)
        warm = next((h.get("epoch", i + 1) for i, h in enumerate(history) if h.get("kl_weight", 1.0) >= 1.0), None)
        if "kl_weight" in history[0] and warm is not None and warm > epochs[0]:
            for a in axes.values():
                a.axvline(warm, color="grey", ls=":", lw=1)
            ax.text(warm, ax.get_ylim()[0], " KL weight = 1", color="grey", fontsize=8, va="bottom")
    if marglik:
        ax = axes["marglik"]
        e, v = _series(history, "log_marglik_per_datum")
        ax.plot(e, v, "o-", color="#9467bd", ms=3, lw=1.2)
        ax.set_xlabel("epoch")
        ax.set_ylabel("Laplace log marginal likelihood per datum", color="#9467bd")
        ax.set_title(f"{title}: marginal likelihood (final {v[-1]:.4g})")
        ax.grid(alpha=0.3)
        e2, d = _series(history, "log_prior_precision_mean")
        if len(e2):
            twin = ax.twinx()
            twin.plot(e2, d, "s--", color="#8c564b", ms=2.5, lw=1)
            twin.set_ylabel("mean log prior precision", color="#8c564b")
    if metric:
        ax = axes["metric"]
        e, v = _series(history, metric)
        label = "test accuracy" if metric == "test_accuracy" else "test RMSE"
        ax.plot(e, v, "o-", color="#2ca02c", ms=3, lw=1.2, label=label)
        ax.set_xlabel("epoch")
        ax.set_ylabel(f"{label}\n({figures_of})" if figures_of else label, color="#2ca02c")
        ax.set_title(f"{title}: held-out {label.split()[-1]} (final {v[-1]:.4g})")
        ax.grid(alpha=0.3)
        e2, nll = _series(history, "test_nll")
        if len(e2):
            twin = ax.twinx()
            twin.plot(e2, nll, "s--", color="#ff7f0e", ms=2.5, lw=1, label="test NLL")
            twin.set_ylabel("test NLL per datum (nats)", color="#ff7f0e")
    return _save(fig, path)


def _as_2d(mask: torch.Tensor) -> np.ndarray:
    m = torch.as_tensor(mask).detach().cpu()
    return m.reshape(m.shape[0], -1).numpy() if m.dim() >= 2 else m.reshape(1, -1).numpy()


def plot_sparsity_maps(masks: dict, path: str, title: str | None = None) -> str:
    """One image per weight mask (True = kept, drawn black): rows are units (outputs), columns
    inputs (flattened ``in x kh x kw`` for convolutions). Each title gives kept weights and the
    units and inputs that keep at least one weight. 1-D masks (biases) are left out.
    """
    items = [(n, torch.as_tensor(m)) for n, m in masks.items() if torch.as_tensor(m).dim() >= 2]
    if not items:
        raise ValueError(f"masks: no mask with two or more dims to draw (got {sorted(masks)})")
    fig = Figure(figsize=(3.6 * len(items) + 0.6, 4.6))
    axes = fig.subplots(1, len(items), squeeze=False)[0]
    total = sum(m.numel() for _, m in items)
    kept_total = sum(int(m.sum()) for _, m in items)
    for ax, (name, mask) in zip(axes, items):
        img = _as_2d(mask).astype(float)
        ax.imshow(img, cmap="Greys", vmin=0, vmax=1, aspect="auto", interpolation="nearest")
        units = int((img.sum(1) > 0).sum())
        inputs = int((img.sum(0) > 0).sum())
        ax.set_title(f"{name}\nkept {int(img.sum())}/{img.size} ({img.mean():.1%})\n"
                     f"units {units}/{img.shape[0]}, inputs {inputs}/{img.shape[1]}", fontsize=9)
        ax.set_xlabel("input" if mask.dim() == 2 else "input x kernel position")
        ax.set_ylabel("unit (output)")
        for axis, size in ((ax.xaxis, img.shape[1]), (ax.yaxis, img.shape[0])):  # whole units and inputs only
            axis.set_major_locator(FixedLocator(np.arange(size)) if size <= 10 else MaxNLocator(nbins=8, integer=True))
    fig.suptitle(title or f"kept weights (black): {kept_total}/{total} = {kept_total / total:.2%}", fontsize=10)
    return _save(fig, path)


def _flat(scores) -> dict[str, np.ndarray]:
    if torch.is_tensor(scores) or isinstance(scores, np.ndarray):
        scores = {"": scores}
    return {k: torch.as_tensor(v).detach().double().reshape(-1).cpu().numpy() for k, v in scores.items()}


def _symlog(x):
    return np.sign(x) * np.log10(1.0 + np.abs(x))


def _symexp(t):
    return np.sign(t) * (10.0 ** np.abs(t) - 1.0)


def _draw_histogram(ax, scores, threshold, label, prune="above", log10=False, bins=60, symlog=False):
    flat = _flat(scores)
    if log10:
        tiny = min((v[v > 0].min() for v in flat.values() if (v > 0).any()), default=1e-300)
        flat = {k: np.log10(np.maximum(v, tiny)) for k, v in flat.items()}
        threshold = math.log10(max(threshold, tiny))
        label = f"log10 {label}"
    finite = {k: v[np.isfinite(v)] for k, v in flat.items()}
    values = np.concatenate(list(finite.values()))
    if values.size == 0:
        raise ValueError(f"{label}: no finite scores to plot")
    lo, hi = float(min(values.min(), threshold)), float(max(values.max(), threshold))
    if hi <= lo:
        hi = lo + 1.0
    if symlog:  # bins equally wide on a symmetric-log axis (linear within |x| < 1)
        edges = _symexp(np.linspace(_symlog(lo), _symlog(hi), bins + 1))
        ax.set_xscale("symlog", linthresh=1.0)
    else:
        edges = np.linspace(lo, hi, bins + 1)
    counts, _, _ = ax.hist(list(finite.values()), bins=edges, stacked=True, label=[k or "all" for k in finite],
                           alpha=0.85)
    ax.set_yscale("log")
    ax.set_ylim(0.5, 60 * float(np.max(counts)))  # headroom above the bars for the legend and the note
    ax.axvline(threshold, color=THRESHOLD_COLOR, ls="--", lw=2)
    pruned = float(np.mean(values > threshold) if prune == "above" else np.mean(values < threshold))
    if prune == "above":
        ax.axvspan(threshold, hi, color=THRESHOLD_COLOR, alpha=0.08)
    else:
        ax.axvspan(lo, threshold, color=THRESHOLD_COLOR, alpha=0.08)
    shown = f"log10 = {threshold:.3g} ({10 ** threshold:.3g})" if log10 else f"{threshold:.3g}"
    ax.text(0.98 if prune == "above" else 0.02, 0.86,
            f"threshold {shown}\npruned ({prune}): {pruned:.1%}",
            transform=ax.transAxes, ha="right" if prune == "above" else "left", va="top", fontsize=8,
            color=THRESHOLD_COLOR, bbox=dict(facecolor="white", alpha=0.8, edgecolor="none"))
    ax.set_xlabel(label)
    ax.set_ylabel("number of weights (log scale)")
    ax.legend(fontsize=7, loc="upper center", framealpha=0.8, ncol=min(3, len(finite)))
    ax.grid(alpha=0.3)


def plot_score_histogram(scores, threshold: float, path: str, label: str = "score", prune: str = "above",
                         log10: bool = False, symlog: bool = False) -> str:
    """Histogram of one pruning score with the threshold marked.

    ``scores`` is a tensor or a dict ``site -> tensor`` (stacked per site); entries on the
    ``prune`` side of ``threshold`` (``"above"``: log alpha > 3, BMR/Savage-Dickey dF > 0;
    ``"below"``: OPD or magnitude scores under the cut) are shaded and counted. ``log10``
    plots log10 of positive scores (OPD spans many decades); ``symlog`` puts signed values
    spanning decades (BMR dF) on a symmetric-log axis.
    """
    return plot_score_histograms([{"scores": scores, "threshold": threshold, "label": label,
                                   "prune": prune, "log10": log10, "symlog": symlog}], path)


def plot_score_histograms(panels: list[dict], path: str) -> str:
    """Several score histograms side by side; each panel is a dict with the arguments of
    :func:`plot_score_histogram` (``scores``, ``threshold``, ``label``, ``prune``, ``log10``,
    ``symlog``) and an optional ``title``."""
    if not panels:
        raise ValueError("panels: nothing to plot")
    for p in panels:
        if p.get("prune", "above") not in ("above", "below"):
            raise ValueError(f"prune must be 'above' or 'below', got {p.get('prune')!r}")
    fig = Figure(figsize=(5.2 * len(panels), 3.9))
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, p in zip(axes, panels):
        _draw_histogram(ax, p["scores"], float(p["threshold"]), p.get("label", "score"), p.get("prune", "above"),
                        p.get("log10", False), symlog=p.get("symlog", False))
        ax.set_title(p.get("title", p.get("label", "score")), fontsize=10)
    return _save(fig, path)


def _to_log_remaining(s):
    return -np.log10(np.clip(1.0 - np.asarray(s, dtype=float), 1e-4, None))


def _from_log_remaining(t):
    return 1.0 - 10.0 ** (-np.asarray(t, dtype=float))


def coinciding(curves: dict) -> dict:
    """``curves`` (method -> (xs, ys)) with the curves that lie on top of each other (the same
    points to 1e-9) merged into one, labelled ``"a = b = c"``: drawn separately, only the last of
    them would be visible."""
    out = {}
    for method, (s, a) in curves.items():
        s, a = np.asarray(s, dtype=float), np.asarray(a, dtype=float)
        same = next((k for k, (s2, a2) in out.items() if s2.shape == s.shape and np.allclose(s2, s, atol=1e-9)
                     and np.allclose(a2, a, atol=1e-9)), None)
        if same is None:
            out[method] = (s, a)
        else:
            out[f"{same} = {method}"] = out.pop(same)
    return out


def plot_accuracy_vs_sparsity(curves: dict, path: str, points: dict | None = None, ylabel: str = "test accuracy",
                              title: str = "accuracy vs sparsity") -> str:
    """Accuracy against the fraction of weights removed, one line per method.

    ``curves``: method -> (sparsities, accuracies); curves that coincide are drawn once, labelled
    with every method's name (:func:`coinciding`). ``points``: label -> (sparsity, accuracy),
    drawn as stars (e.g. the operating point of a threshold rule).
    """
    if not curves:
        raise ValueError("curves: nothing to plot")
    fig = Figure(figsize=(9.0, 4.4))
    ax = fig.add_subplot()
    markers, styles = "osD^v<>ph", ["-", "--", "-.", ":"]
    for i, (method, (s, a)) in enumerate(coinciding(curves).items()):
        ax.plot(np.asarray(s), np.asarray(a), marker=markers[i % len(markers)], ms=6, ls=styles[i % len(styles)],
                lw=1.4, label=method, alpha=0.9)
    for label, (s, a) in (points or {}).items():
        ax.plot([s], [a], "*", ms=13, mec="black", mew=0.7, label=f"{label} ({s:.1%}, {a:.3f})")
    # x = -log10(1 - sparsity): equal room for 0 -> 90%, 90% -> 99% and 99% -> 99.9%
    ax.set_xscale("function", functions=(_to_log_remaining, _from_log_remaining))
    top = max([max(np.asarray(s)) for s, _ in curves.values()] + [s for s, _ in (points or {}).values()])
    ax.set_xlim(0.0, min(max(top, 0.99) + (1 - max(top, 0.99)) * 0.5, 0.9999))
    ticks = [t for t in (0.0, 0.5, 0.8, 0.9, 0.95, 0.98, 0.99, 0.995, 0.998, 0.999) if t <= ax.get_xlim()[1]]
    if top > 0.999:  # everything removed: mark the right end
        ticks.append(ax.get_xlim()[1])
    ax.set_xticks(ticks, [f"{t:g}" if t <= 0.999 else f"{top:.4g}" for t in ticks], fontsize=8)
    ax.set_xlabel("sparsity (fraction of weights removed; axis stretched as -log10(1 - sparsity))")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)  # beside the curves
    return _save(fig, path)
