"""The curvature protocol: how a layer enters the Laplace curvature, declared by the layer.

Every Bayesian layer class names a curvature backend in its ``curvature`` attribute (or ``None``
where the Laplace approximation does not cover its parameters; the registry refuses a layer that
declares neither, :mod:`pyro_sparse.registry`). A backend turns the layer's input into *patches*
``(N, D, L)`` with ``z[:, :, l] = W.reshape(out, -1) @ patches[:, :, l] + b`` and its output
gradient into ``(N, out, L)``: all the curvatures of :mod:`pyro_sparse.laplace.curvature` (diagonal
GGN, empirical Fisher, KFAC, exact row blocks) need of a layer. Like the compaction protocol
(:mod:`pyro_sparse.compaction_protocol`) it sits below the layers, which import nothing of the
Laplace machinery.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = ["CurvatureBackend", "LinearCurvature", "ConvCurvature", "LINEAR", "CONV"]


class CurvatureBackend:
    """How one kind of layer enters the curvature: its inputs as patches and its output gradients."""

    name = "backend"

    def check(self, module) -> None:
        """Raise ValueError (naming what) where this module's configuration is not covered."""

    def patches(self, module, a) -> torch.Tensor:
        """The layer input ``a`` as ``(N, D, L)`` with ``z[:, :, l] = W_mat @ patches[:, :, l] + b``."""
        raise NotImplementedError

    def out_grads(self, module, g) -> torch.Tensor:
        """The gradient ``g`` of the layer output as ``(N, out, L)``, matching :meth:`patches`."""
        raise NotImplementedError

    def columns(self, module, a) -> torch.Tensor:
        """The patches as one matrix ``(D, N L)`` (a column per example and position), what the
        input factor ``A`` is the Gram matrix of; by default from :meth:`patches`."""
        p = self.patches(module, a)
        return p.transpose(0, 1).reshape(p.shape[1], -1)

    def __repr__(self):
        return f"<curvature backend {self.name}>"


class LinearCurvature(CurvatureBackend):
    """``z = a W' + b`` on the last dimension: ``(N, in)`` gives ``L = 1``, ``(N, ..., in)`` one
    position per leading index."""

    name = "linear"

    def patches(self, module, a):
        return a.reshape(a.shape[0], -1, a.shape[-1]).transpose(1, 2)

    def out_grads(self, module, g):
        return g.reshape(g.shape[0], -1, g.shape[-1]).transpose(1, 2)

    def columns(self, module, a):
        return a.reshape(-1, a.shape[-1]).T  # a view: no copy of the inputs


class ConvCurvature(CurvatureBackend):
    """An N-d convolution (``groups=1``, zero padding) as a linear map of its patches (Grosse &
    Martens 2016): the input padded, each spatial axis unfolded by the kernel's reach with the
    stride, every ``dilation``-th tap kept; rows ordered (channel, kernel position) like
    ``weight.reshape(out, -1)``. For 2-D this is ``F.unfold``."""

    name = "conv"

    def check(self, module):
        if module.groups != 1:
            raise ValueError(f"{type(module).__name__} with groups={module.groups} is not covered (groups=1 only)")
        if isinstance(module.padding, str) or module.padding_mode != "zeros":
            raise ValueError(f"{type(module).__name__} needs numeric zero padding, got padding={module.padding!r}, "
                             f"padding_mode={module.padding_mode!r}")

    @staticmethod
    def _unfolded(module, a):
        """The input unfolded: ``(N, C, o_1..o_d, k_1..k_d)`` (a view of the padded input)."""
        dims = a.dim() - 2
        pad = [p for size in reversed(module.padding) for p in (size, size)]
        x = F.pad(a, pad) if any(module.padding) else a
        for d in range(dims):
            k, s, dil = module.kernel_size[d], module.stride[d], module.dilation[d]
            x = x.unfold(2 + d, dil * (k - 1) + 1, s)
            if dil > 1:
                x = x[..., ::dil]
        return x, dims

    def patches(self, module, a):
        x, dims = self._unfolded(module, a)
        # (N, C, o_1..o_d, k_1..k_d) -> (N, C, k_1..k_d, o_1..o_d)
        order = [0, 1] + list(range(2 + dims, 2 + 2 * dims)) + list(range(2, 2 + dims))
        x = x.permute(order)
        return x.reshape(a.shape[0], -1, math.prod(x.shape[2 + dims:]))

    def columns(self, module, a):
        x, dims = self._unfolded(module, a)
        # -> (C, k_1..k_d, N, o_1..o_d): one copy, in the layout of the Gram matrix
        order = [1] + list(range(2 + dims, 2 + 2 * dims)) + [0] + list(range(2, 2 + dims))
        x = x.permute(order)
        rows = math.prod(x.shape[:1 + dims])
        return x.reshape(rows, -1)

    def out_grads(self, module, g):
        return g.reshape(g.shape[0], g.shape[1], -1)


#: the backends the built-in layers declare
LINEAR = LinearCurvature()
CONV = ConvCurvature()
