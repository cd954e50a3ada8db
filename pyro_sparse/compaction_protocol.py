r"""Compaction: the masked network rebuilt smaller, with removed units physically deleted.

A reduction rule decides which parameters to remove (a keep-mask per parameter tensor); the
*masked network* is the network at its point values times those masks. Compaction builds a
plain ``torch.nn.Sequential`` that predicts exactly as the masked network does (up to float
rounding) but no longer computes what the masks made useless:

* a unit (neuron, conv channel, recurrent hidden neuron, embedding dimension) that **nothing
  reads** -- every weight of the next layer that consumes it is masked -- is deleted with its
  row and the next layer's columns;
* a unit that **does not depend on the input** -- every incoming weight is masked -- outputs a
  constant :math:`c` (e.g. :math:`\phi(b)` after its activation); its contribution to the next
  layer, :math:`W_{l+1}[:, j]\,c`, is added to that layer's bias and the unit is deleted. This
  is exact where the constant reaches the next layer unchanged at every position (always for a
  linear layer on vectors; for a convolution only when the constant map is spatially uniform
  and the convolution has no zero padding; otherwise the unit stays).

Deleting units makes more units unread or constant, so both passes repeat until nothing
changes. The last layer keeps all its outputs; a convolution keeps at least one channel.

The protocol. Every Bayesian layer implements ``compaction(name, values, masks, in_shape,
out_shape)`` and returns a :class:`Compaction` (or ``None`` for a parameter-free layer), so the
algorithm (:func:`pyro_sparse.rebuild.compact_plan`) names no layer type. A compaction
object exposes its layer's units to its neighbours:

* as a **producer**: its units (along ``out_axis`` of its per-example output), which of them
  are constant and with what output (:meth:`Compaction.constant_units`), which unread ones it
  may drop (:meth:`Compaction.removable_unread`: a recurrent layer still reads its own hidden
  units), and :meth:`Compaction.delete_units`;
* as a **consumer**: the input features it reads (along ``in_axis`` of its input;
  :meth:`Compaction.read_features`), whether a constant input can be folded into its bias
  (:meth:`Compaction.foldable` / :meth:`Compaction.fold`) and
  :meth:`Compaction.delete_features`;
* and finally :meth:`Compaction.build`: its compact spec entry, parameters and what it removed.

Between a producer and its consumer only parameter-free layers may stand that route units to
features (``route_units``: element-wise maps and dropout keep the axis, pooling keeps the
channel axis, ``flatten`` turns channel ``c`` of a ``(C, H, W)`` map into the block of ``H W``
features ``c H W .. (c + 1) H W - 1``, ``last_step`` drops the time axis). A layer with
``in_axis``/``out_axis`` ``None`` (a transformer block, a layer norm) compacts only itself and
separates the chains around it. A compact network is rebuilt from its spec by the classes in
:data:`pyro_sparse.registry.LAYERS` (``build_compact(entry)``).
"""

from __future__ import annotations

import math

import torch

__all__ = ["Compaction", "WeightCompaction"]


def as_index(idx, like=None):
    return torch.as_tensor(idx, dtype=torch.long, device=None if like is None else like.device).reshape(-1)


def drop_entries(t, idx, dim):
    """``t`` without the entries ``idx`` along ``dim``."""
    keep = torch.ones(t.shape[dim], dtype=torch.bool, device=t.device)
    keep[as_index(idx, t)] = False
    return t[(slice(None),) * dim + (keep,)]


class Compaction:
    """The compaction state of one layer (see the module docstring): subclasses implement the
    producer and consumer sides they take part in and :meth:`build`.

    ``name``: the layer's name; ``in_axis`` / ``out_axis``: the per-example input / output axes
    of its features / units (``None``: it takes no part in unit chains on that side).
    """

    in_axis: int | None = None
    out_axis: int | None = None
    #: the fewest units a producer keeps (a convolution needs one channel)
    min_units = 0

    def __init__(self, name, layer, in_shape, out_shape, units: int = 0):
        self.name, self.layer = name, layer
        self.in_shape, self.out_shape = tuple(in_shape), tuple(out_shape)
        self.dead = self.constant = 0
        self.folded = False
        #: original indices of the producer's units still there
        self.total, self.units = units, torch.arange(units)

    # ---------------------------------------------------------------- producer
    def num_units(self) -> int:
        return self.units.numel()

    def unit_index(self) -> list:
        """Original indices of the units still there."""
        return self.units.tolist()

    def unit_rest(self) -> tuple:
        """The output shape without ``out_axis``: where a unit's value lives."""
        return tuple(s for d, s in enumerate(self.out_shape) if d != self.out_axis)

    def constant_units(self):
        """``(idx, values)``: the units whose output does not depend on the input, and that output,
        shaped ``(len(idx), *rest)`` with ``rest`` the output shape without ``out_axis``."""
        return as_index([]), None

    def removable_unread(self, idx):
        """Of the units ``idx`` that the consumer does not read, those this layer can delete."""
        return idx

    def delete_units(self, idx):
        """Delete units ``idx`` (current positions): the bookkeeping here, the tensors in
        :meth:`drop_units`."""
        self.drop_units(idx)
        self.units = drop_entries(self.units, idx, 0)

    def drop_units(self, idx):
        raise NotImplementedError

    # ---------------------------------------------------------------- consumer
    def num_features(self) -> int:
        raise NotImplementedError

    def read_features(self) -> torch.Tensor:
        """Bool per input feature: read by a kept weight."""
        raise NotImplementedError

    def foldable(self, values) -> torch.Tensor:
        """Bool per constant input feature (``values``: ``(n, P)``, its value at each of the P
        positions the layer applies to): can its contribution go into this layer's bias?"""
        return torch.zeros(values.shape[0], dtype=torch.bool)

    def fold(self, features, values):
        """Add the contributions of constant input features (all :meth:`foldable`) to the bias."""
        raise NotImplementedError

    def delete_features(self, idx):
        raise NotImplementedError

    # ---------------------------------------------------------------- result
    def build(self):
        """``(entry, params, info)``: the compact spec entry (``type`` names the class that
        rebuilds it), the compact module's parameters (relative names) and what was removed
        (``units``: name -> {total, kept, removed, constant, unread}; ``heads_*`` for attention)."""
        raise NotImplementedError

    def units_info(self) -> dict:
        kept = self.unit_index()
        return {"total": self.total, "kept": kept, "removed": self.total - len(kept), "constant": self.constant,
                "unread": self.dead}


class WeightCompaction(Compaction):
    """A layer whose weight is ``(units, features, *kernel)`` with an optional bias per unit:
    Linear (on the last axis of its input, at every position) and Conv1d/Conv2d (channels)."""

    def __init__(self, name, layer, values, masks, in_shape, out_shape, in_axis, out_axis, conv=False):
        super().__init__(name, layer, in_shape, out_shape, units=values["weight"].shape[0])
        self.in_axis, self.out_axis, self.conv = in_axis, out_axis, conv
        self.min_units = 1 if conv else 0
        w = values["weight"].detach()
        self.m = masks.get("weight", torch.ones_like(w, dtype=torch.bool)).to(w.device).clone()
        self.w = (w * self.m.to(w.dtype)).clone()
        b = values.get("bias")
        if b is not None:
            b = b.detach() * masks.get("bias", torch.ones_like(b, dtype=torch.bool)).to(b.dtype)
        self.b = None if b is None else b.clone()

    def constant_units(self):
        idx = torch.nonzero(~self.m.flatten(1).any(1)).squeeze(1)
        rest = self.unit_rest()
        pre = self.b[idx] if self.b is not None else self.w.new_zeros(len(idx))
        return idx, pre.reshape(-1, *([1] * len(rest))).expand(len(idx), *rest)

    def drop_units(self, idx):
        self.w, self.m = drop_entries(self.w, idx, 0), drop_entries(self.m, idx, 0)
        if self.b is not None:
            self.b = drop_entries(self.b, idx, 0)

    def num_features(self):
        return self.w.shape[1]

    def read_features(self):
        return self.m.transpose(0, 1).flatten(1).any(1)

    def foldable(self, values):
        uniform = (values == values[:, :1]).all(1)
        if not self.conv:
            return uniform
        zero = (values == 0).all(1)
        return zero | (uniform & bool(getattr(self.layer, "zero_padding", getattr(self.layer, "padding", 0) == 0)))

    def fold(self, features, values):
        c = values[:, 0]
        if not bool((c != 0).any()):
            return
        w = self.w[:, as_index(features, self.w)]
        contribution = (w.flatten(2).sum(2) if self.conv else w) @ c.to(w.dtype)
        self.b = contribution if self.b is None else self.b + contribution
        self.folded = True

    def delete_features(self, idx):
        self.w, self.m = drop_entries(self.w, idx, 1), drop_entries(self.m, idx, 1)

    def build(self):
        params = {"weight": (self.w * self.m.to(self.w.dtype)).contiguous()}
        if self.b is not None:
            params["bias"] = self.b.contiguous()
        entry = self.layer.compact_spec(self.w.shape[1], self.w.shape[0], self.b is not None)
        # a multiply-add per weight at every position of the output (every pixel, every token)
        positions = math.prod(s for d, s in enumerate(self.out_shape) if d != self.out_axis)
        w = params["weight"]
        return entry, params, {"units": {"": self.units_info()}, "flops": 2 * w.numel() * positions,
                               "flops_sparse": 2 * int((w != 0).sum()) * positions, "positions": positions}
