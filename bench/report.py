"""RESULTS.md and the PNG plots, from the results dict that ``python -m bench`` collects."""

from __future__ import annotations

import math
import os
import statistics

from .metrics import ECE_BINS
from .registry import METHODS, MODELS, SPARSITIES, TABLE_SPARSITY

# --------------------------------------------------------------------------- helpers


def _mean_std(values, fmt="{:.3f}", pct=False):
    values = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not values:
        return "-"
    scale = 100.0 if pct else 1.0
    values = [scale * v for v in values]
    m = statistics.fmean(values)
    text = fmt.format(m)
    if len(values) > 1:
        text += " ± " + fmt.format(statistics.stdev(values))
    return text


def latency_section(lat) -> list:
    """The markdown lines of the latency table (:func:`bench.speed.latency`'s rows)."""
    onnx = any("onnx" in r["b1"] for r in lat)
    lines = ["### Inference latency: compact vs dense network", "",
             "Seed-0 networks of the quality section; `torch.inference_mode`, one thread, interleaved blocks (100 "
             "calls at batch 1, 10 at batch 256), median CPU time per call. *Compact*: the compact network as "
             "`reduce` writes it -- units removed, the kept weights of a Linear/Conv layer stored in CSR where "
             "that is smaller (*storage*: layers in CSR of those with removed weights; `plain`: none removed "
             "inside a layer), each Linear computed by the kernel measured fastest at the batch size "
             "(`pyro_sparse.storage`; measured again in this process, alone on the machine). *TS*, *ONNX*: "
             "the same network exported by `pyro-sparse export` (input transform included), run by TorchScript "
             "and by ONNX Runtime (one intra-op thread) in the same blocks; speed-ups are against the dense "
             "network. *File*: the compact file against `torch.save(dense.state_dict())`.", ""]
    head = ["model", "method", "rule", "params compact / dense", "storage", "file KB compact / dense",
            "b1 dense µs", "b1 compact µs", "b1 speed-up", "b1 TS"] + (["b1 ONNX"] if onnx else []) + [
            "b256 dense µs", "b256 compact µs", "b256 speed-up", "b256 TS"] + (["b256 ONNX"] if onnx else [])

    def graph(r, b, k):
        return f"{r[b]['speedup_' + k]:.2f}x" if f"speedup_{k}" in r[b] else "–"

    rows = []
    for r in lat:
        size = (f"{r['bytes_compact'] / 1024:.1f} / {r['bytes_dense'] / 1024:.1f}"
                if r.get("bytes_compact") and r.get("bytes_dense") else "–")
        row = [r["model"], METHODS[r["method"]].label, r["rule"], f"{r['params_compact']} / {r['params_dense']}",
               r.get("storage", "–"), size]
        for b in ("b1", "b256"):
            row += [_us(r[b]["dense"]["cpu"]), _us(r[b]["compact"]["cpu"]), f"{r[b]['speedup']:.2f}x",
                    graph(r, b, "torchscript")] + ([graph(r, b, "onnx")] if onnx else [])
        rows.append(row)
    lines += [_table(head, rows), ""]
    notes = [f"{r['model']}/{r['method']}/{r['rule']}: {r['export_error']}" for r in lat if r.get("export_error")]
    if notes:
        lines += ["Export failed (the row has no exported columns): " + "; ".join(notes), ""]
    return lines


def _table(header, rows):
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(out)


def _ok(results):
    return [r for r in results if "error" not in r]


def _group(results, model):
    """(method key, rule key) -> [rule result of each seed], in registry order."""
    out = {}
    for method in METHODS:
        for r in sorted((r for r in _ok(results) if r["model"] == model and r["method"] == method),
                        key=lambda r: r["seed"]):
            for rule_key, rule in r["rules"].items():
                if "error" not in rule:
                    out.setdefault((method, rule_key), []).append((r, rule))
    return out


def _row_label(method, rule):
    return METHODS[method].label, rule["label"]


def _units_cell(rules):
    if rules[0].get("not_compacted"):
        return "- (masked only)"
    return _mean_std([x["units_removed"] for x in rules], "{:.0f}") + f" / {rules[0]['hidden_units_total']}"


# --------------------------------------------------------------------------- quality tables


def headline_table(results, model):
    groups = _group(results, model)
    rows = []
    for (method, _), items in groups.items():
        rules = [rule for _, rule in items]
        seeds = [r["seed"] for r, _ in items]
        rows.append([*_row_label(method, rules[0]),
                     _mean_std([x["point"]["accuracy"] for x in rules], "{:.1f}", pct=True),
                     _mean_std([x["point"]["nll"] for x in rules]),
                     _mean_std([x["point"]["ece"] for x in rules]),
                     _mean_std([x["sparsity"] for x in rules], "{:.1f}", pct=True),
                     _units_cell(rules),
                     _mean_std([x["params_compact"] for x in rules], "{:.0f}") + f" / {rules[0]['params_dense']}",
                     len(seeds)])
    header = ["method", "rule", "test acc %", "NLL", f"ECE ({ECE_BINS} bins)", "weights removed %",
              "hidden units removed", "compact params / dense", "seeds"]
    return _table(header, rows)


def detail_table(results, model):
    groups = _group(results, model)
    rows = []
    for (method, _), items in groups.items():
        rules = [rule for _, rule in items]
        runs = [r for r, _ in items]
        sampled = runs[0]["sampled"]
        rows.append([*_row_label(method, rules[0]),
                     _mean_std([r["dense_predictive"]["accuracy"] for r in runs], "{:.1f}", pct=True),
                     _mean_std([x["point"]["accuracy"] for x in rules], "{:.1f}", pct=True),
                     _mean_std([x["predictive"]["accuracy"] for x in rules], "{:.1f}", pct=True) if sampled else "=",
                     _mean_std([x["predictive"]["nll"] for x in rules]) if sampled else "=",
                     _mean_std([x["predictive"]["ece"] for x in rules]) if sampled else "=",
                     _mean_std([x["sparsity"] for x in rules], "{:.1f}", pct=True),
                     _mean_std([x["params_nonzero"] for x in rules], "{:.0f}"),
                     _mean_std([x["flops_dense"] / max(x["flops_compact"], 1) for x in rules
                                if x.get("flops_dense")], "{:.1f}"),
                     f"{runs[0]['epochs']}",
                     _mean_std([r["fit_cpu_s"] for r in runs], "{:.1f}"),
                     len(runs)])
    header = ["method", "rule", "dense predictive acc %", "reduced acc %", "reduced predictive acc %",
              "reduced predictive NLL", "reduced predictive ECE", "weights removed %", "non-zero params",
              "FLOPs dense/compact", "epochs", "fit CPU s", "seeds"]
    return _table(header, rows)


def curve_table(results, model):
    series = _curves(results, model)
    rows = []
    for (method, rule), per_seed in series.items():
        cells = []
        for q in SPARSITIES:
            accs = [row["accuracy"] for rows in per_seed for row in rows if row["target"] == q and "accuracy" in row]
            cells.append(_mean_std(accs, "{:.1f}", pct=True))
        rows.append([f"{METHODS[method].label} + {rule}", *cells, len(per_seed)])
    return _table(["posterior + rule", *[f"{q:.0%}" for q in SPARSITIES], "seeds"], rows)


def _curves(results, model):
    out = {}
    for method in METHODS:
        for r in sorted((r for r in _ok(results) if r["model"] == model and r["method"] == method),
                        key=lambda r: r["seed"]):
            for rule, rows in r.get("curves", {}).items():
                out.setdefault((method, rule), []).append(rows)
    return out


# --------------------------------------------------------------------------- plots


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


_MARKERS = "*PXDs^vph<>"


def _styles():
    """One style per (method, rule) of the registry, the same in every panel: curves of the
    threshold-free rules get tab10 colours, the evidence rules (points) markers and Dark2 colours."""
    import matplotlib

    curves = [(m.key, c) for m in METHODS.values() for c in m.curves]
    points = [(m.key, r.key) for m in METHODS.values() for r in m.rules if r.sparsity is None]
    tab, dark = matplotlib.colormaps["tab10"], matplotlib.colormaps["Dark2"]
    out = {k: {"color": tab(i % 10)} for i, k in enumerate(curves)}
    out.update({k: {"color": dark(i % 8), "marker": _MARKERS[i % len(_MARKERS)]} for i, k in enumerate(points)})
    return out


_TICKS = (0.1, 0.3, 0.5, 0.8, 0.9, 0.95, 0.98, 0.99)


def plot_curves(results, models, path):
    plt = _plt()
    from matplotlib.ticker import NullFormatter

    styles = _styles()
    models = [m for m in models if _curves(results, m)]
    if not models:
        return None
    cols = 2
    rows = math.ceil((len(models) + 1) / cols)  # one more panel for the legend
    fig, axes = plt.subplots(rows, cols, figsize=(5.0 * cols, 3.3 * rows), squeeze=False)
    handles = {}
    for ax, model in zip(axes.flat, models):
        lowest = SPARSITIES[0]
        for (method, rule), per_seed in _curves(results, model).items():
            xs, ms, ss = [], [], []
            for q in SPARSITIES:
                accs = [row["accuracy"] for rows in per_seed for row in rows
                        if row["target"] == q and "accuracy" in row]
                if accs:
                    xs.append(q)
                    ms.append(statistics.fmean(accs))
                    ss.append(statistics.stdev(accs) if len(accs) > 1 else 0.0)
            color = styles[(method, rule)]["color"]
            label = f"{METHODS[method].label} + {rule} (curve)"
            handles[label], = ax.plot(xs, ms, marker="o", ms=3, color=color, label=label)
            ax.fill_between(xs, [m - s for m, s in zip(ms, ss)], [m + s for m, s in zip(ms, ss)],
                            color=color, alpha=0.2)
        for (method, rule_key), items in _group(results, model).items():  # evidence rules as points
            rule = items[0][1]
            if any(r.key == rule_key and r.sparsity is None for r in METHODS[method].rules):
                x = statistics.fmean(r["sparsity"] for _, r in items)
                y = statistics.fmean(r["point"]["accuracy"] for _, r in items)
                lowest = min(lowest, x)
                st = styles[(method, rule_key)]
                label = f"{METHODS[method].label}: {rule['label']}"
                handles[label] = ax.scatter([x], [y], marker=st["marker"], s=60, zorder=5, color=st["color"],
                                            edgecolors="k", linewidths=0.4, label=label)
        ax.set_xscale("logit")
        left = max(0.01, min(0.45, 0.8 * lowest))
        ax.set_xlim(left, 0.998)
        ticks = [t for t in _TICKS if t >= left]
        ax.set_xticks(ticks)
        ax.set_xticklabels([f"{t:.0%}" for t in ticks], fontsize=7)
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_ylim(0, 1)
        ax.set_xlabel("fraction of weights removed (logit scale)", fontsize=8)
        ax.set_ylabel("test accuracy (no fine-tuning)", fontsize=8)
        ax.set_title(MODELS[model].label, fontsize=9)
        ax.grid(alpha=0.3)
    rest = list(axes.flat)[len(models):]
    for ax in rest:
        ax.axis("off")
    rest[0].legend(list(handles.values()), list(handles), loc="center", fontsize=7, frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=72)
    plt.close(fig)
    return path


def plot_steps(rows, path):
    plt = _plt()
    rows = [r for r in rows if "ratio" in r]
    if not rows:
        return None
    fig, ax = plt.subplots(figsize=(7, 0.28 * len(rows) + 1.2))
    labels = [f"{r['model']} / {METHODS[r['method']].label}" for r in rows]
    y = list(range(len(rows)))
    ax.barh(y, [r["ratio"] for r in rows], color="tab:blue", label="step")
    extra = [(i, r["ratio_amortised"]) for i, r in enumerate(rows) if "ratio_amortised" in r]
    if extra:
        ax.scatter([e[1] for e in extra], [e[0] for e in extra], marker="|", s=120, color="k",
                   label="with amortised between-step work")
    ax.axvline(1.0, color="gray", lw=1)
    ax.set_yticks(y)
    ax.set_yticklabels(labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("step time / plain PyTorch step (CPU time, 1 thread)", fontsize=8)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3, axis="x")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def plot_scaling(rows, path):
    plt = _plt()
    rows = [r for r in rows if "error" not in r]
    if not rows:
        return None
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.4))
    for kind, label in (("plain", "plain PyTorch"), ("sparsevd", "Sparse VD SVI")):
        rs = sorted((r for r in rows if r["kind"] == kind), key=lambda r: r["width"])
        a.plot([r["width"] for r in rs], [1e3 * r["cpu"] for r in rs], marker="o", label=label)
        b.plot([r["width"] for r in rs], [r["peak_bytes"] / 2**20 for r in rs], marker="o", label=label)
    from matplotlib.ticker import NullFormatter, ScalarFormatter

    widths = sorted({r["width"] for r in rows})
    for ax, ylabel in ((a, "ms per step (CPU time)"), (b, "peak memory growth (MiB)")):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xticks(widths)
        ax.set_xticklabels([str(w) for w in widths], fontsize=7)
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.yaxis.set_major_formatter(ScalarFormatter())
        ax.yaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("hidden width h (MLP 64-h-h-10, batch 64)", fontsize=8)
        ax.set_ylabel(ylabel, fontsize=8)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


# --------------------------------------------------------------------------- RESULTS.md


def _ms(t):
    return f"{1e3 * t:.2f}"


def _us(t):
    return f"{1e6 * t:.0f}"


def write(results: dict, path: str, plot_dir: str, prefix: str) -> list:
    """Write RESULTS.md at ``path`` and the plots into ``plot_dir``; returns the plot paths."""
    os.makedirs(plot_dir, exist_ok=True)
    rel = os.path.relpath(plot_dir, os.path.dirname(os.path.abspath(path)))
    meta, quality = results["meta"], results.get("quality", [])
    models = [m for m in MODELS if any(r["model"] == m for r in _ok(quality))]
    lines = [f"# pyro-sparse benchmarks ({meta['mode']} mode)", "",
             f"Generated by `{meta['command']}` on {meta['date']} (commit `{meta['commit']}`).", "",
             f"- **Machine**: {meta['cpu']}, {meta['cores']} cores, {meta['memory']}; {meta['os']}.",
             f"- **GPU**: {meta['gpu']}",
             "- **Versions**: " + ", ".join(f"{k} {v}" for k, v in meta["versions"].items()) + ".",
             f"- **Threads**: one torch thread per process; quality fits ran in {meta['jobs']} worker "
             f"process(es) at once, the timing sections alone in the main process.",
             "- **Seeds**: " + "; ".join(f"{m}: {', '.join(map(str, s))}" for m, s in meta["seeds"].items()) +
             ". The data splits are fixed (digits: scikit-learn's 1797 images, 1437 train / 360 test; MNIST-1D: "
             "4000 / 1000, generated locally); a seed sets the initialisation, the mini-batch order and the "
             "Monte Carlo draws.",
             f"- **Run time**: {meta['wall_s']:.0f} s wall, {meta['cpu_s']:.0f} s CPU (this process and its "
             f"children), on a machine {meta['load']}.",
             f"- **Epochs**: {meta['epochs_note']}", ""]
    lines += ["Reading the tables. *Test acc*, *NLL* and *ECE* are those of the **reduced network**: the "
              "compact network (units physically removed) with every kept weight at its posterior mean, on the "
              "held-out test set. ECE uses 15 equal-width confidence bins (Guo et al. 2017). *Weights removed* "
              "counts weights (biases excluded); *hidden units removed* counts neurons and conv channels "
              "the compact network no longer has; *compact params* are the parameters (weights and biases) of "
              "the compact network, whose remaining matrices are dense. Threshold-free rules (magnitude, "
              f"random, OPD) are applied at {TABLE_SPARSITY:.0%} sparsity in the tables, without fine-tuning; "
              "evidence rules (log alpha, Savage-Dickey, BMR, spike-and-slab, iterative BMR) decide their own "
              "sparsity. For iterative BMR the pruning happened during training; the final Savage-Dickey step on "
              "the fitted posterior adds at most a few weights (`bmr_sparsity` in `results-*.json`).", ""]
    plots = []
    head = next((m for m in models if MODELS[m].headline), None)
    if head:
        lines += [f"## Headline: {MODELS[head].label} (mean ± std over seeds)", "", headline_table(quality, head), ""]
    lines += ["## Quality per model", ""]
    for model in models:
        seeds = sorted({r["seed"] for r in _ok(quality) if r["model"] == model})
        lines += [f"### {MODELS[model].label}", "", f"Seeds {', '.join(map(str, seeds))}.", "",
                  headline_table(quality, model), "", "<details><summary>more columns</summary>", "",
                  "*Dense predictive*: the method's own posterior predictive before reduction (MAP and SpaM: the "
                  "point network). *Reduced predictive*: the masked posterior predictive (kept weights drawn from "
                  "their Gaussian marginals; `=`: a point estimate, same as the reduced network).", "",
                  detail_table(quality, model), "", "</details>", ""]
    lines += ["## Accuracy vs sparsity (threshold-free rules, no fine-tuning)", "",
              "Masked posterior-mean network; global ranking of all weights; mean ± std over seeds. Stars in the "
              "plot mark the evidence rules at the sparsity they chose.", ""]
    p = plot_curves(quality, models, os.path.join(plot_dir, f"{prefix}curves.png"))
    if p:
        plots.append(p)
        lines += [f"![accuracy vs sparsity]({rel}/{os.path.basename(p)})", ""]
    for model in models:
        if _curves(quality, model):
            lines += [f"**{MODELS[model].label}**", "", curve_table(quality, model), ""]
    speed = results.get("speed", {})
    if speed:
        lines += ["## Speed", "", "Times are CPU time of the measuring thread (`time.thread_time`, one torch thread), "
                  "medians of interleaved blocks; on a shared machine they are steadier than wall time, which is "
                  "kept in `results.json`.", ""]
    steps = speed.get("steps")
    if steps:
        device = speed.get("device", "cpu")
        lines += [f"### One fitting step against a plain-PyTorch step of the same network ({device})", "",
                  "Same mini-batches (the recipe's batch size), same process, interleaved blocks of "
                  f"{speed['step_calls']} steps, median of {speed['step_repeats']} blocks. *Amortised* adds the work "
                  "a method does between steps (SpaM's marglik steps, iterative BMR's pruning steps), spread over "
                  "the steps of a full run of the recipe.", ""]
        if device != "cpu":
            lines += [f"On `{device}` ({results['meta'].get('gpu', '')}) the times are wall-clock medians, each block "
                      "closed by `torch.cuda.synchronize()`.", ""]
        if speed.get("steps_note"):
            lines += [speed["steps_note"], ""]
        rows = []
        for r in steps:
            if "error" in r:
                rows.append([r["model"], METHODS[r["method"]].label, "-", "-", "-", "-", r["error"]])
                continue
            clock = r.get("clock", "cpu")
            rows.append([r["model"], METHODS[r["method"]].label, _ms(r["library"][clock]), _ms(r["plain"][clock]),
                         f"{r['ratio']:.2f}x",
                         f"{r['ratio_amortised']:.2f}x" if "ratio_amortised" in r else "",
                         r["amortised"]["what"] + f" of {_ms(r['amortised']['each_cpu'])} ms"
                         if "amortised" in r else
                         f"between-step work failed: {r['amortised_error']}" if "amortised_error" in r else ""])
        lines += [_table(["model", "method", "step ms", "plain ms", "ratio", "amortised ratio", "between steps"],
                         rows), ""]
        p = plot_steps(steps, os.path.join(plot_dir, f"{prefix}step-ratio.png"))
        if p:
            plots.append(p)
            lines += [f"![step ratios]({rel}/{os.path.basename(p)})", ""]
    rules = speed.get("rules")
    if rules:
        lines += [f"### Reduction rules on {rules['weights']:,} parameters", "",
                  "`reduce(summary, method, ...)` on the synthetic posterior summary of "
                  "`bench/bench_reduction_rules.py` (one conv and three dense layers, float32): the rule, the "
                  f"masks and the unit counts. Median of {speed['rule_repeats']} calls.", "",
                  _table(["rule", "ms (CPU)", "ms (min)"],
                         [[r["rule"], _ms(r["cpu"]), _ms(r["cpu_min"])] for r in rules["rows"]]), ""]
    lat = speed.get("latency")
    if lat:
        lines += latency_section(lat)
    scaling = results.get("scaling")
    if scaling:
        lines += ["## Scaling with width", "",
                  "MLP 64-h-h-10 (`models/mlp_sparsevd.yaml` with both hidden layers of width h), digits, batch 64: "
                  "the Sparse VD SVI step (`inference/svi_sparsevd.yaml`) against the plain-PyTorch step. Each "
                  "(width, network) runs in its own process, forked from a freshly spawned interpreter. *Peak* is the "
                  "growth of the process's anonymous memory at its peak over building the network, guide and "
                  "optimiser and running the steps (`VmHWM - RssFile - RssShmem` at the end minus `RssAnon` before, "
                  "from `/proc/self/status`, the high-water mark reset through `/proc/self/clear_refs`): "
                  "parameters, gradients, optimiser state, activations, temporaries and allocator slack, without "
                  "the ~20 MiB of shared-library code pages a fresh process touches. For scale, parameters + "
                  "gradients + two Adam moments of the plain network take 16 bytes per weight, and twice that for "
                  "the mean-field guide (a mean and a log-scale per weight).", ""]
        by = {(r["kind"], r["width"]): r for r in scaling}
        rows = []
        for w in sorted({r["width"] for r in scaling}):
            p_, s_ = by.get(("plain", w), {}), by.get(("sparsevd", w), {})
            if "error" in p_ or "error" in s_ or not p_ or not s_:
                rows.append([w, "-", "-", "-", "-", "-", "-", "-", p_.get("error", "") + s_.get("error", "")])
                continue
            rows.append([w, f"{s_['params']:,}", _ms(p_["cpu"]), _ms(s_["cpu"]), f"{s_['cpu'] / p_['cpu']:.1f}x",
                         f"{16 * p_['params'] / 2**20:.1f}", f"{p_['peak_bytes'] / 2**20:.1f}",
                         f"{s_['peak_bytes'] / 2**20:.1f}", f"{s_['peak_bytes'] / max(p_['peak_bytes'], 1):.1f}x"])
        lines += [_table(["h", "parameters", "plain ms", "Sparse VD ms", "time ratio", "16 B/parameter MiB",
                          "plain peak MiB", "Sparse VD peak MiB", "memory ratio"], rows), ""]
        p = plot_scaling(scaling, os.path.join(plot_dir, f"{prefix}scaling.png"))
        if p:
            plots.append(p)
            lines += [f"![scaling]({rel}/{os.path.basename(p)})", ""]
    lines += ["## GPU", "", meta["gpu_section"], ""]
    notes = results.get("skipped", []) + [
        {"model": r["model"], "method": r["method"], "reason": f"seed {r['seed']} failed: {r['error']}"}
        for r in quality if "error" in r]
    for r in _ok(quality):
        for key, rule in r["rules"].items():
            if "error" in rule:
                notes.append({"model": r["model"], "method": r["method"],
                              "reason": f"rule {key} (seed {r['seed']}) failed: {rule['error']}"})
    if notes:
        lines += ["## Skipped and failed entries", "",
                  _table(["model", "method", "why"], [[n["model"], n["method"], n["reason"]] for n in notes]), ""]
    lines += ["## Entries", "", "The registry (`bench/registry.py`): spec and recipe of every cell that ran.", "",
              _table(["model", "method", "spec", "recipe", "epochs"],
                     [(r["model"], METHODS[r["method"]].label, r["spec"], r["recipe"], r["epochs"])
                      for r in _ok(quality) if r["seed"] == min(meta["seeds"][r["model"]])]), ""]
    with open(path, "w") as f:
        f.write("\n".join(lines))
    return plots
