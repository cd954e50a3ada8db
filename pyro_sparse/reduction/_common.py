"""Small tensor helpers shared by :mod:`.bmr` and :mod:`.scores` (private)."""

from functools import reduce

import torch


def common_dtype_device(*values):
    """The floating dtype and device that a computation on ``values`` should use.

    Tensors set the dtype (by type promotion over the floating ones) and the device; Python
    numbers follow them. Without any floating tensor the default dtype is used.
    """
    tensors = [v for v in values if isinstance(v, torch.Tensor)]
    floating = [t.dtype for t in tensors if t.is_floating_point()]
    dtype = reduce(torch.promote_types, floating) if floating else torch.get_default_dtype()
    device = tensors[0].device if tensors else None
    return dtype, device


def as_float(x, dtype, device):
    return torch.as_tensor(x, dtype=dtype, device=device)


def first_bad(name, bad, values, what):
    """Raise ``ValueError`` naming ``name``, the first offending index and value, if any ``bad``."""
    if bool(bad.any()):
        index = tuple(torch.nonzero(bad)[0].tolist())
        value = values.expand(bad.shape)[index].item()
        where = f" at index {index}" if index else ""
        raise ValueError(f"{name}: {what}; got {value!r}{where}")


def check_positive(name, t, what="must be a positive precision"):
    # ``~(t > 0)`` also catches NaN.
    first_bad(name, ~(t > 0), t, what)


def check_no_nan(name, t):
    first_bad(name, torch.isnan(t), t, "contains NaN")


def sum_over_groups(values, dim=None, groups=None, num_groups=None, keepdim=False, name="values"):
    """Sum element-wise quantities over groups of a parameter tensor.

    Exactly one way of grouping is used:

    - ``groups`` (an integer tensor broadcastable to ``values`` with ids ``0 .. G-1``):
      returns a tensor of shape ``(G,)`` whose entry g is the sum over ``groups == g``;
    - ``dim`` (int or tuple of ints): sums over those dimensions;
    - neither: sums over every dimension but the first, i.e. one group per output unit
      (the rows of a Linear weight ``(out, in)``, the filters of a conv weight
      ``(out, in, kh, kw)``). A 1-D tensor (a bias) is returned unchanged.
    """
    values = torch.as_tensor(values)
    if groups is not None:
        if dim is not None:
            raise ValueError(f"groups: give either `groups` or `dim`, not both (dim={dim!r})")
        groups = torch.as_tensor(groups, device=values.device)
        if groups.dtype.is_floating_point or groups.dtype == torch.bool:
            raise ValueError(f"groups: must be an integer tensor of group ids, got dtype {groups.dtype}")
        try:
            groups, values = torch.broadcast_tensors(groups, values)
        except RuntimeError as exc:
            raise ValueError(
                f"groups: shape {tuple(groups.shape)} does not broadcast with {name} of shape "
                f"{tuple(values.shape)}"
            ) from exc
        groups, values = groups.reshape(-1), values.reshape(-1)
        if groups.numel() and bool((groups < 0).any()):
            raise ValueError(f"groups: ids must be >= 0, got min {groups.min().item()}")
        if num_groups is None:
            num_groups = int(groups.max().item()) + 1 if groups.numel() else 0
        elif groups.numel() and int(groups.max().item()) >= num_groups:
            raise ValueError(
                f"num_groups: {num_groups} is too small for group id {int(groups.max().item())}"
            )
        out = torch.zeros(num_groups, dtype=values.dtype, device=values.device)
        return out.index_add_(0, groups, values)
    if dim is None:
        dim = tuple(range(1, values.dim()))
        if not dim:
            return values.clone()
    return values.sum(dim=dim, keepdim=keepdim)
