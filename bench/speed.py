"""Speed: cost of a fitting step against plain PyTorch, of the reduction rules, and of inference.

1. **Step ratio.** For each entry of a model, the recipe's trainer is built (not fitted) and one
   optimisation step on a mini-batch of the recipe's size is timed against a plain-PyTorch step
   of the same deterministic network (``network.deterministic`` at the posterior means:
   ``nn.Sequential``, cross-entropy, ``torch.optim.Adam``), on the same batches, in the same
   process, interleaved in blocks (:func:`~bench.timing.interleaved`); the figure is the ratio of
   the medians. The library's step is what its trainer runs: ``SVITrainer._step`` (ELBO with
   analytic KL and local reparameterisation, gradient clipping, the finiteness check, the
   optimiser step); for SpaM the MAP step of :class:`~pyro_sparse.spam.LaplaceTrainer`. Work a
   method does between steps (SpaM's marglik step, iterative BMR's pruning step) is timed on its
   own and spread over the steps of a full run of the recipe ("amortised").
2. **Reduction rules** on about one million weights: ``reduce(summary, method, ...)`` on the
   synthetic summary of ``bench/bench_reduction_rules.py``.
3. **Inference latency** of each compact network (units physically removed, kept weights stored
   as :mod:`pyro_sparse.storage` decided, kernels measured again here with :func:`pyro_sparse.storage.tune`
   while nothing else runs) against the dense network (every weight at its posterior mean) at
   batch 1 and batch 256, interleaved, with the same network exported (``pyro_sparse.deploy``) as
   TorchScript and, where onnxruntime is installed, as ONNX run by ONNX Runtime (one intra-op
   thread) in the same blocks; plus the compact file's bytes against the dense state dict's.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .quality import dataset
from .registry import METHODS, MODELS, resolve, scale_recipe
from .timing import interleaved, timed


def _build(entry, device="cpu"):
    from pyro_sparse.runs import Run, build, make_trainer, parse_specs

    recipe = scale_recipe(entry.recipe, 1.0)
    recipe["device"], recipe["num_threads"] = device, 1
    spec, recipe = parse_specs(entry.spec, recipe)
    data = dataset(entry.model.data)
    network, guide = build(spec, recipe, data)
    trainer = make_trainer(Run(network, guide, data, spec, recipe), None, progress=False)
    return trainer, recipe, data


def _library_step(trainer):
    if hasattr(trainer, "map_loss"):  # SpaM: the MAP step of LaplaceTrainer.train_epoch
        params = list(trainer.net.parameters())
        clip = trainer.recipe["grad_clip"]

        def step(idx):
            loss = trainer.map_loss(idx)
            trainer.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if clip:
                torch.nn.utils.clip_grad_norm_(params, clip)
            trainer.optimizer.step()

        return step
    return lambda idx: trainer._step(idx, 1.0)


def _plain_step(trainer, data, lr):
    from pyro_sparse.summary import summarize

    network = trainer.network
    net = network.deterministic(summarize(network, trainer.guide).locs()).train().to(trainer.device)
    for p in net.parameters():
        p.requires_grad_(True)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    x, y = data.x_train.to(trainer.device), data.y_train.to(trainer.device)

    def step(idx):
        loss = F.cross_entropy(net(x[idx]), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def _amortised(trainer, recipe, repeats):
    """Seconds per training step of the between-steps work over a full run of the recipe, or None."""
    epochs, spe = recipe["epochs"], trainer.steps_per_epoch
    if hasattr(trainer, "marglik_step"):
        o = trainer.options
        n = sum(trainer.marglik_due(e) for e in range(1, epochs + 1))
        t = timed(trainer.marglik_step, repeats=max(3, repeats // 5), warmup=1)
        return {"what": f"{n} marglik steps", "cpu": t["cpu"] * n / (epochs * spe), "each_cpu": t["cpu"],
                "options": {k: o[k] for k in ("burn_in", "marglik_frequency", "hyper_steps")}}
    if hasattr(trainer, "bmr_step"):
        cfg = trainer.config
        n = sum(1 for e in range(1, epochs + 1)
                if e >= cfg["warmup_epochs"] and (e - cfg["warmup_epochs"]) % cfg["every"] == 0
                and (e < epochs or cfg["last_step"]))
        t = timed(trainer.bmr_step, repeats=max(3, repeats // 5), warmup=1)
        return {"what": f"{n} pruning steps", "cpu": t["cpu"] * n / (epochs * spe), "each_cpu": t["cpu"]}
    return None


def step_ratios(models, repeats=15, calls=10, methods=None, log=print, device="cpu") -> list:
    """One row per (model, method): library step vs plain PyTorch step (see the module doc). On a
    GPU (``device`` cuda) both run there and the ratio is of wall-clock medians (each block closed
    by ``torch.cuda.synchronize``); on the CPU of CPU-time medians."""
    cuda = device.startswith("cuda")
    clock = "wall" if cuda else "cpu"
    import pyro

    torch.set_num_threads(1)
    rows = []
    for model in models:
        for key in methods or METHODS:
            entry = resolve(MODELS[model], METHODS[key])
            if not hasattr(entry, "spec"):
                continue
            row = {"model": model, "method": key}
            try:
                with pyro.validation_enabled(False):
                    trainer, recipe, data = _build(entry, device)
                    batch = trainer.batch_size
                    gen = torch.Generator().manual_seed(0)
                    batches = [torch.randperm(len(data.x_train), generator=gen)[:batch].to(trainer.device)
                               for _ in range(16)]
                    lib, plain = _library_step(trainer), _plain_step(trainer, data, recipe["optimizer"].get("lr", 1e-3))
                    if hasattr(trainer, "bmr_step"):  # mid-training state: some weights already pruned
                        for idx in batches:
                            lib(idx)
                        trainer.bmr_step()
                    state = {"i": 0}

                    def cycle(fn):
                        def call():
                            state["i"] = (state["i"] + 1) % len(batches)
                            fn(batches[state["i"]])
                        return call

                    t = interleaved({"library": cycle(lib), "plain": cycle(plain)}, repeats, calls,
                                    sync=torch.cuda.synchronize if cuda else None)
                    row.update({"batch": batch, "library": t["library"], "plain": t["plain"], "clock": clock,
                                "device": device, "elbo_path": getattr(trainer, "elbo_path", None),
                                "ratio": t["library"][clock] / t["plain"][clock],
                                "ratio_wall": t["library"]["wall"] / t["plain"]["wall"]})
                    try:
                        extra = _amortised(trainer, recipe, repeats)
                    except Exception as e:
                        extra = None
                        row["amortised_error"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                    if extra:
                        row["amortised"] = extra
                        row["ratio_amortised"] = (t["library"][clock] + extra["cpu"]) / t["plain"][clock]
            except Exception as e:
                row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            rows.append(row)
            if "error" in row:
                log(f"  step {model}/{key}: {row['error']}")
            else:
                log(f"  step {model}/{key}: {1e3 * row['library'][clock]:.2f} ms vs plain "
                    f"{1e3 * row['plain'][clock]:.2f} ms -> {row['ratio']:.2f}x")
    return rows


def reduction_rules(repeats=3, log=print) -> dict:
    """``reduce(...)`` on the synthetic ~1M-weight summary of bench_reduction_rules."""
    from .bench_reduction_rules import reduce_calls, synthetic_summary

    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    summary = synthetic_summary(torch.float32, g)
    rows = []
    for name, fn in reduce_calls(summary).items():
        t = timed(fn, repeats)
        rows.append({"rule": name, **t})
        log(f"  reduce {name}: {1e3 * t['cpu']:.1f} ms")
    return {"weights": summary.num_weights(), "sites": len(summary), "rows": rows}


def _graphs(small, x, tmp):
    """The compact network exported: ``{"torchscript": module, "onnx": callable}`` (ONNX where
    onnx and onnxruntime are installed)."""
    import os
    import warnings

    from pyro_sparse.deploy import write_graph

    out = {}
    path = os.path.join(tmp, "g.pt")
    write_graph(small, x[:2], path, "torchscript")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out["torchscript"] = torch.jit.load(path).eval()
    try:
        import onnxruntime
    except ImportError:
        return out
    path = os.path.join(tmp, "g.onnx")
    write_graph(small, x[:2], path, "onnx")
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    session = onnxruntime.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    out["onnx"] = lambda xb: session.run(None, {name: xb.numpy()})[0]
    return out


def _storage_summary(small) -> str:
    """``csr 2/3``: layers whose kept weights are stored in CSR, of the Linear/Conv layers with
    removed weights (``plain``: every layer the plain torch layer)."""
    from pyro_sparse.storage import CSRState

    compact = [m for m in small.modules() if isinstance(m, CSRState)]
    if not compact:
        return "plain"
    return f"csr {sum(bool(getattr(m, 'csr_storage', True)) for m in compact)}/{len(compact)}"


def latency(quality_results, repeats=15, log=print) -> list:
    """Dense vs compact (and exported) inference time at batch 1 and 256 for every seed-0 compact
    network, and the compact file's size."""
    import tempfile

    from pyro_sparse.outcome import saved_bytes
    from pyro_sparse.reduced_runs import compact_payload
    from pyro_sparse.storage import tune

    torch.set_num_threads(1)

    def load_compact(path):  # written by this benchmark's own workers (bench.quality._save)
        return torch.load(path, weights_only=False).eval()

    rows = []
    for r in quality_results:
        if r.get("seed") != 0 or "dense_path" not in r:
            continue
        data = dataset(MODELS[r["model"]].data)
        dense = load_compact(r["dense_path"])
        dense_params = sum(p.numel() for p in dense.parameters())
        dense_bytes = saved_bytes(dense.state_dict())
        for rule_key, rule in r["rules"].items():
            if "compact_path" not in rule:
                continue
            small = load_compact(rule["compact_path"])
            tune(small)  # the kernels measured again here, alone on the machine
            row = {"model": r["model"], "method": r["method"], "rule": rule_key,
                   "params_dense": rule.get("params_dense", dense_params), "params_compact": rule["params_compact"],
                   "not_compacted": rule.get("not_compacted", False), "storage": _storage_summary(small),
                   "bytes_dense": dense_bytes,
                   "bytes_compact": saved_bytes(compact_payload(small)) if hasattr(small, "spec") else None}
            with tempfile.TemporaryDirectory() as tmp:
                try:
                    graphs = _graphs(small, data.x_test, tmp)
                except Exception as e:  # an export that fails is a row note, not a lost table
                    graphs, row["export_error"] = {}, f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
                for b, calls in ((1, 100), (256, 10)):
                    x = data.x_test[:b]
                    fns = {"dense": lambda: dense(x), "compact": lambda: small(x)}
                    fns.update({k: (lambda g=g: g(x)) for k, g in graphs.items()})
                    with torch.inference_mode():
                        t = interleaved(fns, repeats, calls)
                    row[f"b{b}"] = {k: t[k] for k in fns}
                    row[f"b{b}"]["speedup"] = t["dense"]["cpu"] / t["compact"]["cpu"]
                    for k in graphs:
                        row[f"b{b}"][f"speedup_{k}"] = t["dense"]["cpu"] / t[k]["cpu"]
            rows.append(row)
            log(f"  latency {r['model']}/{r['method']}/{rule_key}: b1 {row['b1']['speedup']:.2f}x, "
                f"b256 {row['b256']['speedup']:.2f}x ({row['storage']})")
    return rows
