r"""How a compact layer stores its kept weights and which kernel computes with them.

A compact network (:func:`pyro_sparse.rebuild`) has its removed units deleted, but the
matrices over the kept units still hold the weights the rule removed inside them (Sparse VD on the
digits MLP keeps 405 weights in matrices of 3,564 entries). Per Linear / Conv layer of a compact
network (:func:`decide`, applied by :func:`pyro_sparse.rebuild.apply_storage`):

* **A layer where nothing was removed** is the plain ``torch.nn`` layer (a Linear that only lost
  units keeps dense storage but has its kernels measured, see below).
* **Storage** (the compact file, the module's ``state_dict``): the weight, as the
  ``(out, in * kernel)`` matrix, in compressed sparse rows (CSR) -- ``weight_values`` (the kept
  weights, row by row), ``weight_col`` (their columns, ``int16`` below 32,768 columns, else
  ``int32``) and ``weight_crow`` (``int32`` row pointers) -- wherever that is smaller in the file
  than the dense weight: :math:`n_{nz}(s_v + s_i) + 4(m + 1) + 2o < m\,n\,s_v`, with :math:`o`
  the archive bytes of a tensor (:data:`TENSOR_OVERHEAD`), about a density of 2/3 for float32
  values and 16-bit columns. This depends on the weights only. In memory the layer keeps the dense
  matrix of its kept units (rebuilt from the CSR entries when a file is loaded), which the dense
  kernels read.
* **Compute** (:class:`CompactLinear`): one of three kernels for ``y = x W^T + b``,

  - ``linear``: ``F.linear(x, W, b)``, torch's dense product;
  - ``t``: the same product written feature-major, ``(b + W x^T)^T`` (``torch.addmm`` on the
    transposed input, returning a transposed view): the BLAS call then has the batch as its long
    dimension, which on the development machine (AMD EPYC, MKL, one thread) made the 10 x 35
    output layer of the compact digits MLP 2x faster at batch 256 and a 36 x 64 layer no faster;
  - ``csr``: ``(b + W_csr x^T)^T`` with ``W`` a ``torch.sparse_csr_tensor`` (CSR product): it beat
    the dense product at batch 256 below about 15-20% density for 300 x 64 layers and larger,
    never for layers of a few thousand weights, and at batch 1 only for layers of about 10^5
    weights at a few percent density (a sparse product's fixed cost is about three small dense
    products).

  Which kernel is fastest is **measured on the machine** when the storage is decided
  (:func:`measure_kernels`): each is timed on this layer's kept weights at ``R = P`` and
  ``R = 256 P`` rows (``P`` the positions per example: batch 1 and 256), interleaved blocks,
  medians of one-thread CPU time; the layer uses the fastest at batch 1 below ``switch_rows``
  rows and the fastest at 256 from there on, ``switch_rows`` being where their costs, each taken
  as linear in ``R`` through the two measurements, cross. ``csr`` is not timed above 50% density
  (it never won there). Measurements are kept for the process (layers of the same size and
  density are timed once); :func:`tune` measures a loaded compact network again (another
  machine, a quieter moment). A fine-tune (gradients on the weight) always runs ``linear``.
* **Convolutions** (:class:`SparseConv1d`, :class:`SparseConv2d`) store CSR the same way and
  compute with the dense kernel: a sparse convolution through ``unfold`` (im2col) and a CSR
  product was 2-3x *slower* than the dense convolution on the 4x4 to 8x8 maps of the shipped specs
  (``unfold`` alone costs more than the dense convolution), so it is not offered.

The decision is recorded in the compact spec entry (``storage``, ``kernels``, ``switch_rows``) and
the plan's ``layers[name]["storage"]`` (density, bytes of both forms, the timings), which the
reduction report and ``pyro-sparse reduce`` show. :func:`dense_twin` replaces every such layer of a
module by the plain torch layer holding the same weights (what the exporters trace).
"""

from __future__ import annotations

import copy
import math
import warnings

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules import module as torch_module

__all__ = ["CompactSequential", "CompactLinear", "SparseConv1d", "SparseConv2d", "CSRState", "csr_parts", "to_csr",
           "storage_bytes", "measure_kernels", "decide", "dense_twin", "tune", "pattern_holds", "semi_structured",
           "STORAGES", "KERNELS", "TENSOR_OVERHEAD", "CSR_MAX_DENSITY"]

#: the ``storage`` options of :func:`pyro_sparse.rebuild`: ``auto`` (CSR where smaller; kernels
#: measured), ``csr`` (CSR where smaller; the ``csr`` kernel at every size: nothing timed), ``dense`` (every
#: layer the plain torch layer)
STORAGES = ("auto", "csr", "dense")
#: the kernels of :class:`CompactLinear`
KERNELS = ("linear", "t", "csr")
#: above this density the CSR kernel is not timed (it never won there)
CSR_MAX_DENSITY = 0.5
#: bytes a tensor adds to a ``torch.save`` archive besides its data (zip entries, alignment, pickle record;
#: about 270 measured): CSR stores two tensors more than a dense weight
TENSOR_OVERHEAD = 300


def _index_dtype(columns: int):
    return torch.int16 if columns <= torch.iinfo(torch.int16).max else torch.int32


def to_csr(matrix: torch.Tensor) -> torch.Tensor:
    """``matrix.to_sparse_csr()`` without torch's warning that sparse CSR support is in beta."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Sparse CSR tensor support is in beta")
        return matrix.to_sparse_csr()


def csr_parts(matrix: torch.Tensor):
    """``(crow int32 (m+1,), col int16|int32 (nnz,), values (nnz,))`` of the non-zero entries of a
    2-D tensor, row by row (CSR)."""
    matrix = matrix.detach()
    rows, cols = torch.nonzero(matrix, as_tuple=True)
    counts = torch.bincount(rows, minlength=matrix.shape[0])
    crow = torch.zeros(matrix.shape[0] + 1, dtype=torch.int32, device=matrix.device)
    crow[1:] = torch.cumsum(counts, 0)
    return crow, cols.to(_index_dtype(matrix.shape[1])), matrix[rows, cols].clone()


def storage_bytes(shape, nnz: int, element_size: int = 4) -> dict:
    """Bytes of a weight of ``shape`` with ``nnz`` kept entries: dense, and CSR over the
    ``(shape[0], prod(shape[1:]))`` matrix (values, 16- or 32-bit columns, 32-bit row pointers)."""
    rows, cols = shape[0], math.prod(shape[1:])
    index = torch.tensor([], dtype=_index_dtype(cols)).element_size()
    return {"dense": rows * cols * element_size, "csr": nnz * (element_size + index) + 4 * (rows + 1)}


class CSRState:
    r"""Mixin of a torch layer (``nn.Linear``, ``nn.Conv1d``, ``nn.Conv2d``) whose ``state_dict``
    stores the weight in CSR over the ``(out, in * kernel)`` matrix -- ``weight_values``,
    ``weight_col``, ``weight_crow`` instead of ``weight`` (:func:`csr_parts`) -- where
    ``csr_storage`` is true. In memory the layer keeps its dense ``weight`` Parameter, so it is the
    torch layer in every other respect. ``load_state_dict`` takes either form (a kept entry is a
    non-zero one)."""

    csr_storage = True

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if not self.csr_storage:
            return
        weight = destination.pop(prefix + "weight")
        crow, col, values = csr_parts(weight.reshape(weight.shape[0], -1))
        destination[prefix + "weight_values"] = values
        destination[prefix + "weight_col"] = col
        destination[prefix + "weight_crow"] = crow

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        local = {k: v for k, v in state_dict.items() if k.startswith(prefix) and "." not in k[len(prefix):]}
        parts = [prefix + k for k in ("weight_values", "weight_col", "weight_crow")]
        if all(p in local for p in parts) and prefix + "weight" not in local:
            values, col, crow = (local.pop(p) for p in parts)
            shape = tuple(self.weight.shape)
            rows, cols = shape[0], math.prod(shape[1:])
            if (crow.dim() != 1 or crow.numel() != rows + 1 or col.numel() != values.numel()
                    or (values.numel() and (int(col.min()) < 0 or int(col.max()) >= cols))
                    or int(crow[0]) != 0 or int(crow[-1]) != values.numel()
                    or bool((crow[1:] < crow[:-1]).any())):
                error_msgs.append(f"{prefix}weight_values/weight_col/weight_crow: not a CSR matrix of "
                                  f"{rows} x {cols}")
                return
            counts = (crow[1:] - crow[:-1]).long()
            row = torch.repeat_interleave(torch.arange(rows, device=counts.device), counts)
            dense = values.new_zeros(rows, cols).index_put((row, col.long()), values)
            local[prefix + "weight"] = dense.reshape(shape)
        super()._load_from_state_dict(local, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        self.refresh()

    @property
    def nnz(self) -> int:
        """The kept (non-zero) weights."""
        return int((self.weight != 0).sum())

    def refresh(self):
        """Forget the cached CSR matrix (after a write through ``.data``, which bumps no version)."""
        self.__dict__.pop("_csr_cache", None)

    def _apply(self, fn, recurse=True):
        out = super()._apply(fn, recurse)
        self.refresh()
        return out

    def __getstate__(self):  # copies and pickles leave the cache behind
        state = self.__dict__.copy()
        state.pop("_csr_cache", None)
        return state

    def plain_module(self) -> nn.Module:
        """The plain torch layer holding the same weights (:func:`dense_twin`)."""
        base = next(c for c in type(self).__mro__ if c.__module__.startswith("torch.nn"))
        m = copy.deepcopy(self)
        m.__class__ = base
        for key in ("csr_storage", "kernel_small", "kernel_large", "switch_rows", "positions", "contiguous"):
            m.__dict__.pop(key, None)
        return m


class CompactLinear(CSRState, nn.Linear):
    r"""The ``nn.Linear`` of a compact network where the rule removed weights: stored in CSR
    (``csr_storage``, :class:`CSRState`) or dense, computed by the kernel ``kernel_small`` below
    ``switch_rows`` rows ``R`` (the product of the input's leading dimensions) and by
    ``kernel_large`` from there on (``switch_rows`` None: ``kernel_small`` only). The kernels
    (:data:`KERNELS`): ``linear`` (``F.linear``), ``t`` (:math:`(b + W x^T)^T`, ``torch.addmm``
    with the batch as the long dimension; the result is a transposed view) and ``csr`` (the same
    with ``W`` a ``torch.sparse_csr_tensor``, built from the weight once and again when it
    changes). See the module docstring for how they are chosen."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, csr_storage: bool = True,
                 kernels=("linear", "linear"), switch_rows=None, positions: int = 1, contiguous: bool = False, **kw):
        super().__init__(in_features, out_features, bias, **kw)
        #: return a contiguous output from the feature-major kernels (a layer inside code of the user's, which
        #: may ``view`` it; in a compact network the next layer reads the transposed view as it is)
        self.contiguous = bool(contiguous)
        #: positions per example the layer applies to (tokens of a sequence): rows = batch x positions
        self.positions = int(positions)
        small, large = kernels
        for k in (small, large):
            if k not in KERNELS:
                raise ValueError(f"kernels: expected names of {KERNELS}, got {k!r}")
        self.csr_storage = bool(csr_storage)
        self.kernel_small, self.kernel_large = small, large
        self.switch_rows = None if switch_rows is None or small == large else int(switch_rows)

    def csr(self) -> torch.Tensor:
        """The weight as a ``torch.sparse_csr_tensor``."""
        w = self.weight
        if w.is_inference():
            return to_csr(w.detach())
        key = (id(w), w._version, w.device, w.dtype)
        cached = self.__dict__.get("_csr_cache")
        if cached is None or cached[0] != key:
            with torch.no_grad():
                cached = (key, to_csr(w.detach()))
            self.__dict__["_csr_cache"] = cached
        return cached[1]

    def forward(self, x):
        # parameters read from the registry itself: nn.Module.__getattr__ costs about a microsecond per
        # attribute on the development machine, a third of a small product at batch 1
        params = self._parameters
        weight, bias = params["weight"], params["bias"]
        kernel, switch = self.kernel_small, self.switch_rows
        if switch is not None and self.in_features and x.numel() // self.in_features >= switch:
            kernel = self.kernel_large
        if kernel == "linear" or (weight.requires_grad and torch.is_grad_enabled()):
            return F.linear(x, weight, bias)
        flat = x.reshape(-1, self.in_features).t()
        matrix = self.csr() if kernel == "csr" else weight
        y = (torch.mm(matrix, flat) if bias is None else torch.addmm(bias.unsqueeze(1), matrix, flat)).t()
        if x.dim() != 2:
            return y.reshape(*x.shape[:-1], self.out_features)
        return y.contiguous() if self.contiguous else y

    def extra_repr(self):
        how = self.kernel_small if self.switch_rows is None else \
            f"{self.kernel_small} below {self.switch_rows} rows, {self.kernel_large} from there"
        return super().extra_repr() + f", stored {'CSR' if self.csr_storage else 'dense'}, kernel {how}"


class SparseConv1d(CSRState, nn.Conv1d):
    """An ``nn.Conv1d`` stored in CSR (:class:`CSRState`), computed with the dense kernel."""

    def forward(self, x):
        params = self._parameters  # see CompactLinear.forward
        return self._conv_forward(x, params["weight"], params["bias"])

    def extra_repr(self):
        return super().extra_repr() + ", stored CSR"


class SparseConv2d(CSRState, nn.Conv2d):
    """An ``nn.Conv2d`` stored in CSR (:class:`CSRState`), computed with the dense kernel."""

    def forward(self, x):
        params = self._parameters  # see CompactLinear.forward
        return self._conv_forward(x, params["weight"], params["bias"])

    def extra_repr(self):
        return super().extra_repr() + ", stored CSR"


class CompactSequential(nn.Sequential):
    """The ``nn.Sequential`` of a compact network: children named like the network's layers.

    Its ``forward`` calls each child's ``forward`` directly, skipping ``nn.Module.__call__``'s
    hook dispatch, which at batch 1 costs about as much as a small layer's arithmetic (the digits
    MLP's compact network: 20 against 26 microseconds per call). Where any hook is registered --
    on a child, or a global module hook -- it runs as a plain ``nn.Sequential`` instead, so hooks
    behave as usual. Its output is contiguous (a :class:`CompactLinear` may hand the next layer a
    transposed view)."""

    def forward(self, x):
        if _global_hooks():
            return super().forward(x)
        children = self._modules.values()
        for m in children:
            if m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks:
                return super().forward(x)
        for m in children:
            x = m.forward(x)
        # a feature-major kernel's transposed view stays inside; the caller gets contiguous memory
        return x.contiguous() if isinstance(x, torch.Tensor) else x


def _global_hooks() -> bool:
    return bool(torch_module._global_forward_hooks or torch_module._global_forward_pre_hooks
                or torch_module._global_backward_hooks or torch_module._global_backward_pre_hooks)


def dense_twin(module: nn.Module) -> nn.Module:
    """A copy of ``module`` in which every submodule with a ``plain_module()`` method -- the layers
    here (:class:`CSRState`), a compact recurrent layer
    (:class:`~pyro_sparse.recurrent.CompactRecurrent`) -- is replaced by the plain torch module it
    returns, computing the same: what the exporters trace (ONNX has no sparse product; a compact
    recurrent layer builds its torch layer on first use, which a trace cannot)."""
    module = copy.deepcopy(module)
    if callable(getattr(module, "plain_module", None)):
        return module.plain_module()
    for name, child in list(module.named_modules()):
        if name and callable(getattr(child, "plain_module", None)):
            parent, _, attr = name.rpartition(".")
            setattr(module.get_submodule(parent) if parent else module, attr, child.plain_module())
    return module


def pattern_holds(weight: torch.Tensor, n: int, m: int) -> bool:
    """Whether every block of ``m`` consecutive entries along the input axis (dim 1) of ``weight``
    holds at most ``n`` non-zeros (a last, shorter block included)."""
    w = weight.movedim(1, -1) != 0
    pad = (-w.shape[-1]) % m
    if pad:
        w = torch.cat([w, w.new_zeros(*w.shape[:-1], pad)], -1)
    return bool((w.reshape(*w.shape[:-1], -1, m).sum(-1) <= n).all())


def semi_structured(module: nn.Module):
    """Put the weight of every Linear layer of ``module`` whose kept weights hold the 2:4 pattern
    (:func:`pattern_holds`; ``reduce(..., pattern="2:4")``) into
    ``torch.sparse.to_sparse_semi_structured`` form, in place, where the device runs it: CUDA with
    compute capability 8.0 or higher (sparse tensor cores; float16/bfloat16, torch's size limits).
    On any other device nothing changes -- the CPU has no semi-structured kernels, and the layer
    computes densely. Returns ``(module, {layer: what happened})``. (Not run on a GPU yet: the
    development machine has none.)"""
    notes = {}
    params = list(module.parameters())
    device = params[0].device if params else torch.device("cpu")
    if device.type != "cuda" or torch.cuda.get_device_capability(device) < (8, 0):
        for name, m in module.named_modules():
            if isinstance(m, nn.Linear):
                notes[name] = (f"{device}: no semi-structured sparse kernels (they need CUDA compute capability "
                               "8.0+); computed densely")
        return module, notes
    from torch.sparse import to_sparse_semi_structured

    for name, m in module.named_modules():
        if not isinstance(m, nn.Linear):
            continue
        if not pattern_holds(m.weight, 2, 4):
            notes[name] = "not 2:4: computed densely"
            continue
        try:
            m.weight = nn.Parameter(to_sparse_semi_structured(m.weight.detach()), requires_grad=False)
            notes[name] = "semi-structured 2:4"
        except (RuntimeError, ValueError, TypeError) as e:
            notes[name] = f"computed densely ({str(e).splitlines()[0][:160]})"
    return module, notes


# --------------------------------------------------------------------------- the decision

#: measurements of this process: (shape, density, positions, dtype, kernels) -> measure_kernels' result
_MEASURED: dict = {}


def _kernel_calls(weight, bias, x):
    """Kernel name -> a call of it on ``x`` (``(R, in)``)."""
    csr = to_csr(weight)
    b = bias.unsqueeze(1) if bias is not None else None

    def product(matrix):
        return (lambda: torch.addmm(b, matrix, x.t()).t()) if b is not None else (lambda: torch.mm(matrix, x.t()).t())

    return {"linear": lambda: F.linear(x, weight, bias), "t": product(weight), "csr": product(csr)}


@torch.no_grad()
def measure_kernels(weight: torch.Tensor, bias=None, positions: int = 1, kernels=KERNELS, batches=(1, 256),
                    repeats: int = 5, cache: bool = True) -> dict:
    r"""Time the kernels of a Linear layer's kept ``weight`` ``(out, in)`` at ``R = b * positions``
    rows for each batch size ``b`` of ``batches`` (interleaved blocks of about half a millisecond,
    one torch thread, median CPU time per call). Returns ``{"rows", "us": kernel -> [microseconds
    per row count], "small", "large", "switch_rows"}``: the fastest kernel at the first and at the
    last row count, and the row count from which the second is faster, the cost of each taken as
    linear in ``R`` through the two measurements (None when one kernel is fastest at both). Results
    are kept for the process (``cache``) by shape, density (to 1%), positions and dtype."""
    from .timing import block_calls, interleaved

    weight = weight.detach()
    bias = bias.detach() if bias is not None else None
    key = (tuple(weight.shape), round(float((weight != 0).float().mean()), 2), int(positions), weight.dtype,
           tuple(kernels), tuple(batches), bias is not None)
    if cache and key in _MEASURED:
        return _MEASURED[key]
    gen = torch.Generator().manual_seed(0)
    rows = [max(1, int(b * positions)) for b in batches]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        us = {k: [] for k in kernels}
        for r in rows:
            x = torch.randn(r, weight.shape[1], generator=gen, dtype=weight.dtype)
            calls = _kernel_calls(weight, bias, x)
            fns = {k: calls[k] for k in kernels}
            n = min(block_calls(f, 5e-4, limit=200) for f in fns.values())
            t = interleaved(fns, repeats, n, warmup=2)
            for k in kernels:
                us[k].append(1e6 * t[k]["cpu"])
    finally:
        torch.set_num_threads(threads)
    small = min(kernels, key=lambda k: us[k][0])
    large = min(kernels, key=lambda k: us[k][-1])
    result = {"rows": rows, "us": us, "small": small, "large": large,
              "switch_rows": None if small == large else _crossing(rows, us[small], us[large])}
    _MEASURED[key] = result
    return result


def _crossing(rows, small, large) -> int:
    """The row count from which the ``large`` kernel's line is below the ``small`` one's (each
    through its measurements at the first and last row count)."""
    r0, r1 = rows[0], rows[-1]
    slope_s, slope_l = (small[-1] - small[0]) / max(r1 - r0, 1), (large[-1] - large[0]) / max(r1 - r0, 1)
    a_s, a_l = small[0] - slope_s * r0, large[0] - slope_l * r0
    if slope_s <= slope_l:  # cannot happen when small wins at r0 and large at r1; the larger size then
        return r1
    return min(r1, max(r0 + 1, math.ceil((a_l - a_s) / (slope_s - slope_l))))


def _timed_kernels(density):
    return KERNELS if density <= CSR_MAX_DENSITY else ("linear", "t")


def tune(module: nn.Module, repeats: int = 5) -> dict:
    """Measure the kernels of every :class:`CompactLinear` in ``module`` again, on this machine and
    now (not from the process's cache), and use the fastest (in place): a compact file decided on
    another machine, or on a busy one. Returns ``name -> measure_kernels' result``."""
    out = {}
    for name, m in module.named_modules():
        if isinstance(m, CompactLinear):
            w = m.weight.detach()
            t = measure_kernels(w, None if m.bias is None else m.bias.detach(), m.positions,
                                _timed_kernels(float((w != 0).float().mean())), repeats=repeats, cache=False)
            m.kernel_small, m.kernel_large, m.switch_rows = t["small"], t["large"], t["switch_rows"]
            out[name] = t
    return out


def decide(kind: str, weight: torch.Tensor, bias=None, positions: int = 1, storage: str = "auto",
           reshaped: bool = False) -> dict:
    """How to store (and, for a Linear layer, compute with) a compact layer's ``weight``.

    ``kind``: ``linear``, ``conv1d`` or ``conv2d``; ``positions``: the positions per example the
    layer applies to (1 for a Linear on vectors, tokens for one on sequences, output pixels for a
    convolution); ``reshaped``: compaction deleted some of its units or inputs. Returns the record
    kept in the report: ``layer`` (``plain``: the torch layer; ``compact``), ``storage``
    (``dense`` or ``csr``), ``density``, ``nnz``, ``bytes_dense``, ``bytes_csr``, ``reason``,
    and for a compact Linear ``kernels`` (below / from ``switch_rows``) and ``timing``
    (:func:`measure_kernels`, ``auto`` only). A Linear that only lost units still has its
    kernels measured: torch's product was 1.2x slower for a 95 x 300 layer than for the 100 x 300
    one it came from at batch 256 (MKL, AVX-512), the feature-major one was not."""
    if storage not in STORAGES:
        raise ValueError(f"storage: expected one of {', '.join(STORAGES)}, got {storage!r}")
    nnz, numel = int((weight != 0).sum()), weight.numel()
    size = storage_bytes(tuple(weight.shape), nnz, weight.element_size())
    record = {"layer": "plain", "storage": "dense", "density": nnz / numel if numel else 1.0, "nnz": nnz,
              "bytes_dense": size["dense"], "bytes_csr": size["csr"]}
    if storage == "dense" or numel == 0 or (nnz == numel and not (reshaped and kind == "linear")):
        record["reason"] = ("storage: dense asked for" if storage == "dense" else
                            "nothing removed: the plain torch layer" if not reshaped else
                            "no weight removed inside: the plain torch layer")
        return record
    smaller = size["csr"] + 2 * TENSOR_OVERHEAD < size["dense"]
    if kind != "linear":
        if smaller:
            record.update(layer="compact", storage="csr",
                          reason="CSR storage; dense kernel (a sparse im2col product measured slower)")
        else:
            record["reason"] = "CSR would not be smaller in the file: the plain torch layer"
        return record
    record.update(layer="compact", storage="csr" if smaller else "dense")
    if storage == "csr":
        record.update(kernels=["csr", "csr"], switch_rows=None, reason="storage: csr asked for (CSR kernel)")
        return record
    timing = measure_kernels(weight, bias, positions, _timed_kernels(record["density"]))
    record.update(kernels=[timing["small"], timing["large"]], switch_rows=timing["switch_rows"], timing=timing,
                  reason="kernels measured at batch 1 and 256")
    return record
