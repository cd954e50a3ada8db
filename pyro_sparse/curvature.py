"""Curvature of a deterministic network: diagonal GGN, empirical Fisher and KFAC.

These are the Hessian approximations ``H`` that enter the Laplace marginal likelihood
(Immer et al. 2021, "Scalable marginal likelihood estimation for model selection in deep
learning"; Dhahri et al. 2024, "Shaving Weights with Occam's Razor", SpaM) and, through the
posterior precision ``P = H + P0``, the Optimal Posterior Damage score of SpaM.

Notation. For one input ``x_n`` the network output is ``f_n = f(x_n; theta)`` (logits or
means, ``K`` numbers), ``J_n = d f_n / d theta`` its Jacobian and ``Lambda_n`` the Hessian of
the negative log-likelihood with respect to ``f_n``:

* ``"categorical"`` (``f`` are logits):  ``Lambda = diag(p) - p p'``, ``p = softmax(f)``;
* ``"gaussian"`` (``f`` is the mean, known noise std ``sigma``): ``Lambda = I / sigma^2``;
* ``"bernoulli"`` (``f`` are logits, one independent Bernoulli per output):
  ``Lambda = diag(p (1 - p))``, ``p = sigmoid(f)``.

The generalised Gauss-Newton (GGN) is ``H = sum_n J_n' Lambda_n J_n`` (summed over the data,
not averaged). Everything here rests on one factorisation ``Lambda_n = S_n S_n'`` with ``K``
columns ``s_{n,k}``:

* categorical: ``s_{n,k} = sqrt(p_k) (e_k - p)``, because
  ``sum_k p_k (e_k - p)(e_k - p)' = diag(p) - p p'`` (using ``sum_k p_k = 1``);
* gaussian: ``s_{n,k} = e_k / sigma``;  bernoulli: ``s_{n,k} = sqrt(p_k (1 - p_k)) e_k``.

Then ``diag(H) = sum_n sum_k (J_n' s_{n,k})^2`` and each ``J_n' s_{n,k}`` is one ordinary
backward pass: because the samples of a deterministic network without batch statistics do
not interact, back-propagating the cotangent ``s_{., k}`` through a mini-batch gives every
layer's *per-sample* output gradient at once. For a layer ``z = W a + b`` the per-sample
weight gradient is ``g a'`` (summed over weight-sharing positions for a convolution), so the
diagonal needs only the layer inputs ``a`` and output gradients ``g`` (the trick of BackPACK,
Dangel et al. 2020), never a per-sample copy of a fully connected weight. The empirical
Fisher uses the same machinery with the single column ``r_n = d NLL_n / d f_n``; KFAC
(Martens & Grosse 2015; Grosse & Martens 2016 for convolutions) uses the same ``a`` and ``g``.

Supported networks: any ``torch.nn.Module`` whose trainable parameters (``requires_grad``) all
belong to ``Linear``, ``Conv1d`` or ``Conv2d`` modules (``groups=1``, numeric zero padding):
a ``torch.nn.Sequential`` of them and parameter-free layers, or a user's class with residual
connections, branches and its own ``forward``. The layer inputs ``a`` and outputs ``z`` are
recorded by forward hooks, so the network's ``forward`` runs unchanged; parameters that do not
require gradients (a frozen feature extractor, a batch norm set aside) are held fixed and get
no curvature -- the Laplace approximation over a subnetwork (Daxberger et al. 2021). A module
applied several times in one pass contributes every application as extra positions ``l``, like
the positions of a convolution, so its per-sample gradient ``sum_l g_l a_l'`` is exact.
The network is put in ``eval`` mode for the computation (so Dropout is the identity) and its
mode is restored afterwards.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "LIKELIHOODS",
    "check_supported",
    "curvature_targets",
    "log_likelihood",
    "diag_ggn",
    "diag_ef",
    "kfac_ggn",
    "kfac_layer_names",
    "kfac_flatten",
    "kfac_unflatten",
]

LIKELIHOODS = ("categorical", "gaussian", "bernoulli")

_PARAMETER_FREE = (
    nn.ReLU,
    nn.LeakyReLU,
    nn.ELU,
    nn.GELU,
    nn.SiLU,
    nn.Tanh,
    nn.Sigmoid,
    nn.Softplus,
    nn.Flatten,
    nn.MaxPool2d,
    nn.AvgPool2d,
    nn.Dropout,
    nn.Identity,
)


# --------------------------------------------------------------------------- validation


def _check_likelihood(likelihood, noise=1.0):
    if likelihood not in LIKELIHOODS:
        raise ValueError(f"likelihood must be one of {LIKELIHOODS}, got likelihood={likelihood!r}")
    if likelihood == "gaussian":
        noise_value = float(noise)
        if not (math.isfinite(noise_value) and noise_value > 0):
            raise ValueError(f"noise (the Gaussian noise std) must be finite and > 0, got noise={noise!r}")


def _check_batch_size(batch_size):
    if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1):
        raise ValueError(f"batch_size must be a positive int or None, got batch_size={batch_size!r}")


def _check_data(x, y, need_y):
    if not torch.is_tensor(x) or x.dim() < 1 or x.shape[0] < 1:
        raise ValueError(f"x must be a tensor with a non-empty batch dimension, got x of shape {getattr(x, 'shape', None)}")
    if y is None:
        if need_y:
            raise ValueError("y is required (got y=None)")
        return
    if not torch.is_tensor(y) or y.dim() < 1 or y.shape[0] != x.shape[0]:
        raise ValueError(
            f"y must be a tensor with the same first dimension as x ({x.shape[0]}), "
            f"got y of shape {getattr(y, 'shape', None)}"
        )


@dataclass
class _Layer:
    """One module of the flattened Sequential; ``name`` is its module path (e.g. ``"0"``, ``"1.2"``)."""

    name: str
    module: nn.Module


def _flatten_sequential(model, prefix=""):
    if not isinstance(model, nn.Sequential):
        raise ValueError(f"model must be a torch.nn.Sequential, got model of type {type(model).__name__}")
    layers = []
    for child_name, child in model.named_children():
        name = f"{prefix}{child_name}"
        if isinstance(child, nn.Sequential):
            layers.extend(_flatten_sequential(child, prefix=f"{name}."))
        elif _is_parametric(child):
            _check_conv(name, child)
            layers.append(_Layer(name, child))
        elif not any(True for _ in child.parameters()):
            # parameter-free (activations, pooling, reshapes, ...): autograd differentiates through it
            layers.append(_Layer(name, child))
        else:
            raise ValueError(
                f"model[{name}]: unsupported layer {type(child).__name__}; expected Linear, Conv1d, Conv2d or a "
                f"parameter-free layer such as {', '.join(t.__name__ for t in _PARAMETER_FREE)}"
            )
    return layers


def _check_conv(name, module):
    if isinstance(module, (nn.Conv1d, nn.Conv2d)):
        kind = type(module).__name__
        if module.groups != 1:
            raise ValueError(f"model[{name}]: {kind} with groups={module.groups} is not supported (need groups=1)")
        if isinstance(module.padding, str) or module.padding_mode != "zeros":
            raise ValueError(
                f"model[{name}]: {kind} needs numeric zero padding, got padding={module.padding!r}, "
                f"padding_mode={module.padding_mode!r}"
            )


def check_supported(model):
    """Raise ValueError naming the first layer of ``model`` that has trainable parameters and no
    curvature here (what every curvature function of this module would raise): a Laplace fit
    checks at start-up instead of at its first marginal-likelihood step."""
    _targets(model)


def _targets(model):
    """The Linear/Conv layers whose parameters get curvature, as ``_Layer``s in module order.

    A ``Sequential`` is checked layer by layer as before; any other module is searched: every
    module that owns trainable parameters must be a Linear, Conv1d or Conv2d (ValueError naming
    the first that is not); modules whose parameters are all frozen are held fixed."""
    if not isinstance(model, nn.Module):
        raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    out = []
    if isinstance(model, nn.Sequential):
        out = [layer for layer in _flatten_sequential(model) if _is_parametric(layer.module)
               and any(p.requires_grad for p in layer.module.parameters())]
    for name, module in () if isinstance(model, nn.Sequential) else model.named_modules():
        own = [p for p in module.parameters(recurse=False) if p.requires_grad]
        if not own:
            continue
        if type(module) not in (nn.Linear, nn.Conv1d, nn.Conv2d):  # a subclass may not compute x W' + b
            raise ValueError(
                f"model[{name or '(root)'}]: {type(module).__name__} has trainable parameters but no curvature here "
                "(Linear, Conv1d and Conv2d only); freeze them (requires_grad_(False)) to hold them fixed"
            )
        _check_conv(name, module)
        out.append(_Layer(name, module))
    if not out:
        raise ValueError(f"model ({type(model).__name__}) has no trainable Linear, Conv1d or Conv2d layer")
    return out


def _is_parametric(module):
    return isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d))


def curvature_targets(model) -> dict:
    """Module path -> module of the Linear/Conv layers whose parameters get curvature."""
    return {layer.name: layer.module for layer in _targets(model)}


def kfac_layer_names(model):
    """Module paths of the Linear/Conv layers of ``model`` whose parameters get curvature (the KFAC
    keys): forward order for a ``Sequential``, module order otherwise."""
    return [layer.name for layer in _targets(model)]


@contextlib.contextmanager
def _eval_mode(model):
    was_training = [m.training for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, mode in zip(model.modules(), was_training):
            m.training = mode


# --------------------------------------------------------------------------- likelihoods


def _flat_output(f):
    return f.reshape(f.shape[0], -1)


def log_likelihood(model, x, y, likelihood, noise=1.0):
    """Full log-likelihood ``log p(D | theta) = sum_n log p(y_n | f(x_n; theta))`` (with constants).

    * categorical: ``y`` integer labels (N,), ``log softmax(f)_y``;
    * gaussian: ``y`` same shape as ``f``, ``sum -0.5 (y - f)^2 / sigma^2 - 0.5 log(2 pi sigma^2)``;
    * bernoulli: ``y`` in {0, 1} with the shape of ``f``, ``y log p + (1 - y) log(1 - p)``.

    Differentiable in the network parameters (this is the data term of the MAP objective).
    """
    _check_likelihood(likelihood, noise)
    _check_data(x, y, need_y=True)
    f = model(x)
    return _log_lik_from_output(f, y, likelihood, noise)


def _log_lik_from_output(f, y, likelihood, noise):
    if likelihood == "categorical":
        if f.dim() != 2:
            raise ValueError(f"categorical likelihood needs logits of shape (N, C), got output shape {tuple(f.shape)}")
        return -F.cross_entropy(f, y.long().reshape(-1), reduction="sum")
    y = y.to(f.dtype).reshape(f.shape)
    if likelihood == "gaussian":
        var = float(noise) ** 2
        return (-0.5 * (y - f) ** 2 / var).sum() - 0.5 * f.numel() * math.log(2 * math.pi * var)
    return -F.binary_cross_entropy_with_logits(f, y, reduction="sum")


def _output_residual(f, y, likelihood, noise):
    """``r_n = d NLL_n / d f_n`` (N, K): the per-sample output gradient of the loss."""
    f = _flat_output(f)
    if likelihood == "categorical":
        return torch.softmax(f, dim=-1) - F.one_hot(y.long().reshape(-1), f.shape[1]).to(f.dtype)
    y = y.to(f.dtype).reshape(f.shape)
    if likelihood == "gaussian":
        return (f - y) / float(noise) ** 2
    return torch.sigmoid(f) - y


def _lambda_sqrt(f, likelihood, noise, mc_samples=None, generator=None):
    """Columns of a square root of ``Lambda_n``: tensor (M, N, K) with ``sum_m s s' = Lambda_n``.

    Exact (M = K) by default. With ``mc_samples = M`` the columns are Monte Carlo draws
    ``(d/df) NLL(y~; f) / sqrt(M)`` with ``y~ ~ p(y | f)``, whose outer products average to
    ``Lambda_n`` (the Fisher identity ``E[r r'] = Lambda`` for these exponential families).
    """
    f = _flat_output(f)
    n, k = f.shape
    if mc_samples is not None:
        if isinstance(mc_samples, bool) or not isinstance(mc_samples, int) or mc_samples < 1:
            raise ValueError(f"mc_samples must be a positive int or None, got mc_samples={mc_samples!r}")
        m = mc_samples
        if likelihood == "categorical":
            p = torch.softmax(f, dim=-1)
            ys = torch.multinomial(p, m, replacement=True, generator=generator).T  # (M, N)
            cols = p.unsqueeze(0) - F.one_hot(ys, k).to(f.dtype)
        elif likelihood == "gaussian":
            eps = torch.randn((m, n, k), dtype=f.dtype, device=f.device, generator=generator)
            cols = eps / float(noise)
        else:
            p = torch.sigmoid(f)
            ys = torch.bernoulli(p.expand(m, n, k), generator=generator)
            cols = p.unsqueeze(0) - ys
        return cols / math.sqrt(m)
    eye = torch.eye(k, dtype=f.dtype, device=f.device)
    if likelihood == "categorical":
        p = torch.softmax(f, dim=-1)  # (N, K)
        # column c of sample n: sqrt(p_c) (e_c - p)
        return p.T.sqrt().unsqueeze(-1) * (eye.unsqueeze(1) - p.unsqueeze(0))
    if likelihood == "gaussian":
        scale = torch.full_like(f, 1.0 / float(noise))
    else:
        p = torch.sigmoid(f)
        scale = (p * (1 - p)).sqrt()
    return eye.unsqueeze(1) * scale.unsqueeze(0)  # (K, N, K), column c = scale_c e_c


# --------------------------------------------------------------------------- the engine


def _forward(model, targets, x):
    """Run ``model`` on ``x`` with forward hooks on the ``targets``; returns the output and, in call
    order, ``(name, module, input, output)`` of each application of a target layer."""
    records, hooks = [], []
    for layer in targets:
        def hook(module, args, z, name=layer.name):
            if not z.requires_grad:
                z.requires_grad_()
            records.append((name, module, args[0].detach(), z))
            return z
        hooks.append(layer.module.register_forward_hook(hook))
    try:
        f = model(x)
    finally:
        for h in hooks:
            h.remove()
    return f, records


def _patches(module, a):
    """Layer input as patches (N, D_in, L): ``z[:, :, l] = W_mat @ patches[:, :, l] + b``.

    Linear on (N, in): L = 1. Linear on (N, ..., in): L = prod(...). Conv2d: ``F.unfold``
    with the layer's kernel, dilation, padding and stride (Grosse & Martens 2016), whose row
    order matches ``weight.reshape(out, -1)``; Conv1d: the same on a one-row image.
    """
    if isinstance(module, nn.Linear):
        n = a.shape[0]
        return a.reshape(n, -1, a.shape[-1]).transpose(1, 2)
    if isinstance(module, nn.Conv1d):  # a (N, C, L) signal is a (N, C, 1, L) image with a (1, k) kernel
        return F.unfold(a.unsqueeze(2), (1, module.kernel_size[0]), dilation=(1, module.dilation[0]),
                        padding=(0, module.padding[0]), stride=(1, module.stride[0]))
    return F.unfold(a, module.kernel_size, dilation=module.dilation, padding=module.padding, stride=module.stride)


def _out_grads(module, g):
    """Output gradient of a layer as (N, D_out, L), matching :func:`_patches`."""
    n = g.shape[0]
    if isinstance(module, nn.Linear):
        return g.reshape(n, -1, g.shape[-1]).transpose(1, 2)
    return g.reshape(n, g.shape[1], -1)


def _backprop_columns(model, x, columns):
    """Yield, for each cotangent column set, the per-sample output gradients of every layer.

    ``columns(f)`` maps the (detached) network output to a tensor (M, N, K). For each ``m``
    this yields a list of ``(name, module, patches (N, D_in, L), g (N, D_out, L))``: ``g`` is
    ``J_{z,n}' s_{n,m}``, the per-sample gradient of the layer output. A layer applied several
    times has its applications concatenated along ``L``.
    """
    f, records = _forward(model, _targets(model), x)
    cols = columns(f.detach())
    zs = [z for (_, _, _, z) in records]
    patches = [_patches(module, a) for (_, module, a, _) in records]
    order = list(dict.fromkeys(name for name, _, _, _ in records))
    modules = {name: module for name, module, _, _ in records}
    for m in range(cols.shape[0]):
        grads = torch.autograd.grad(f, zs, grad_outputs=cols[m].reshape(f.shape), retain_graph=m + 1 < cols.shape[0])
        per = {}
        for (name, module, _, _), p, g in zip(records, patches, grads):
            per.setdefault(name, []).append((p, _out_grads(module, g)))
        yield [(name, modules[name], torch.cat([p for p, _ in per[name]], -1), torch.cat([g for _, g in per[name]], -1))
               for name in order]


def _chunks(x, y, batch_size):
    n = x.shape[0]
    step = n if batch_size is None else batch_size
    for start in range(0, n, step):
        yield x[start : start + step], (None if y is None else y[start : start + step])


def _sum_squared_grads(model, x, y, columns, batch_size):
    """``sum_n sum_m (J_n' s_{n,m})^2`` per parameter, i.e. the diagonal of ``sum_n J_n' S_n S_n' J_n``."""
    covered = {f"{layer.name}.{p}" if layer.name else p for layer in _targets(model)
               for p, _ in layer.module.named_parameters(recurse=False)}
    out = {name: torch.zeros_like(p, memory_format=torch.contiguous_format) for name, p in model.named_parameters()
           if name in covered}
    for xb, yb in _chunks(x, y, batch_size):
        for layer_grads in _backprop_columns(model, xb, lambda f: columns(f, yb)):
            for name, module, a, g in layer_grads:
                if a.shape[-1] == 1:
                    # per-sample weight gradient g_n a_n': its square is g_n^2 a_n^2', summed over n
                    w2 = g[..., 0].square().T @ a[..., 0].square()
                    b2 = g[..., 0].square().sum(0)
                else:
                    per_sample = torch.einsum("nol,nil->noi", g, a)
                    w2 = per_sample.square().sum(0)
                    b2 = g.sum(-1).square().sum(0)
                prefix = f"{name}." if name else ""
                out[f"{prefix}weight"] += w2.reshape(module.weight.shape)
                if module.bias is not None:
                    out[f"{prefix}bias"] += b2
    return out


def diag_ggn(model, x, y=None, likelihood="categorical", noise=1.0, mc_samples=None, batch_size=None, generator=None):
    """Diagonal of the GGN ``H = sum_n J_n' Lambda_n J_n`` (Immer et al. 2021, Sec. 3; SpaM).

    Args:
        model: a network whose trainable parameters belong to Linear / Conv1d / Conv2d layers (see
            the module docstring).
        x: inputs (N, ...). y: targets; unused (the GGN of these likelihoods does not depend
            on them) but checked for length if given.
        likelihood: ``"categorical"``, ``"gaussian"`` or ``"bernoulli"``.
        noise: Gaussian noise std ``sigma`` (``Lambda = I / sigma^2``).
        mc_samples: ``None`` for the exact diagonal (one backward pass per output); an int
            ``M`` for the unbiased Monte Carlo estimate with ``M`` sampled targets per input.
        batch_size: process the data in chunks of this many inputs (memory), ``None`` = all.
        generator: ``torch.Generator`` for the Monte Carlo draws.

    Returns:
        dict parameter name -> tensor of the parameter's shape, summed over the data (every
        trainable parameter).
    """
    _check_likelihood(likelihood, noise)
    _check_data(x, y, need_y=False)
    _check_batch_size(batch_size)
    with _eval_mode(model), torch.enable_grad():
        return _sum_squared_grads(
            model, x, None,
            lambda f, _: _lambda_sqrt(f, likelihood, noise, mc_samples, generator),
            batch_size,
        )


def diag_ef(model, x, y, likelihood="categorical", noise=1.0, batch_size=None):
    """Diagonal empirical Fisher ``sum_n g_n^2``, ``g_n = grad_theta NLL(y_n | f(x_n))``.

    Per-sample gradients ``g_n = J_n' r_n`` with ``r_n = d NLL_n / d f_n`` (softmax: ``p - e_y``;
    Gaussian: ``(f - y) / sigma^2``; Bernoulli: ``p - y``), computed in one backward pass with the
    same per-layer machinery as :func:`diag_ggn`. Summed over the data.
    """
    _check_likelihood(likelihood, noise)
    _check_data(x, y, need_y=True)
    _check_batch_size(batch_size)
    with _eval_mode(model), torch.enable_grad():
        return _sum_squared_grads(
            model, x, y,
            lambda f, yb: _output_residual(f, yb, likelihood, noise).unsqueeze(0),
            batch_size,
        )


def kfac_ggn(model, x, y=None, likelihood="categorical", noise=1.0, batch_size=None):
    """Kronecker-factored GGN, one ``(A, G)`` pair per Linear/Conv layer (KFAC-expand).

    Flattening. For a layer with weight ``W`` (out, D) -- a Conv2d weight (out, in, kh, kw) is
    read as ``W.reshape(out, in*kh*kw)`` -- and bias ``b`` (out,), form the extended matrix
    ``W_ext = [W | b]`` of shape (out, D + 1) (no bias column without a bias) and flatten it
    **column-major**: ``vec(W_ext) = W_ext.T.reshape(-1) = [W[:, 0], ..., W[:, D-1], b]``
    (see :func:`kfac_flatten`). Then the GGN block of that vector is approximated by

        ``H_layer ~= kron(A, G)``  with
        ``A = sum_{n, l} a~_{n,l} a~_{n,l}'``                      (D+1, D+1),
        ``G = 1/(N L) sum_{n, l} sum_k g_{n,k,l} g_{n,k,l}'``       (out, out),

    where ``a~ = [a; 1]`` is the layer input (a patch of it for a convolution, position ``l``
    of ``L``) with a one appended for the bias, and ``g_{n,k,l} = J_{z_{n,l}}' s_{n,k}`` the
    output gradient for the ``k``-th column of ``Lambda_n = S_n S_n'``. **A carries the
    count** (a sum over the N data and L positions); **G is a mean**. (In laplace-torch's
    row-major layout the same block reads ``kron(G, A)``.)

    For a Linear layer with one data point the factorisation is exact: the per-sample
    gradient is ``vec(g a~') = a~ (x) g``, so ``H = sum_k (a~ a~') (x) (g_k g_k')``.
    For convolutions the positions are treated as extra data (Grosse & Martens 2016;
    "KFAC-expand" of Eschenhagen et al. 2023).

    Returns:
        dict layer name (module path, e.g. ``"0"``) -> ``(A, G)``.
    """
    _check_likelihood(likelihood, noise)
    _check_data(x, y, need_y=False)
    _check_batch_size(batch_size)
    layers = {name: None for name in kfac_layer_names(model)}
    a_sums, g_sums, counts = {}, {}, {}
    with _eval_mode(model), torch.enable_grad():
        for xb, _ in _chunks(x, None, batch_size):
            first = True
            for layer_grads in _backprop_columns(model, xb, lambda f: _lambda_sqrt(f, likelihood, noise)):
                for name, module, a, g in layer_grads:
                    if first:
                        if module.bias is not None:
                            ones = torch.ones_like(a[:, :1, :])
                            a = torch.cat([a, ones], dim=1)
                        a_sums[name] = a_sums.get(name, 0) + torch.einsum("nil,njl->ij", a, a)
                        counts[name] = counts.get(name, 0) + a.shape[0] * a.shape[-1]
                    g_sums[name] = g_sums.get(name, 0) + torch.einsum("nil,njl->ij", g, g)
                first = False
    unused = [name for name in layers if name not in a_sums]
    if unused:
        raise ValueError(f"model[{unused[0]}]: the forward pass never applies this layer, so KFAC has no factors "
                         "for it; freeze its parameters (requires_grad_(False)) or use the diagonal curvature")
    return {name: (a_sums[name].detach(), (g_sums[name] / counts[name]).detach()) for name in layers}


def kfac_flatten(weight, bias=None):
    """``vec([W | b])`` column-major, the order in which :func:`kfac_ggn` blocks are ``kron(A, G)``.

    ``weight`` (out, ...) is read as ``weight.reshape(out, -1)``; works on any trailing
    shape so it also flattens a precision tensor laid out like the parameter.
    """
    w = weight.reshape(weight.shape[0], -1)
    if bias is not None:
        w = torch.cat([w, bias.reshape(-1, 1)], dim=1)
    return w.T.reshape(-1)


def kfac_unflatten(vec, weight_shape, has_bias):
    """Inverse of :func:`kfac_flatten`: returns ``(weight, bias or None)``."""
    out = weight_shape[0]
    w_ext = vec.reshape(-1, out).T
    if has_bias:
        return w_ext[:, :-1].reshape(weight_shape), w_ext[:, -1]
    return w_ext.reshape(weight_shape), None
