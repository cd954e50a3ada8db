"""Curvature of a deterministic network: diagonal GGN, empirical Fisher, KFAC and exact row blocks.

These are the Hessian approximations ``H`` that enter the Laplace marginal likelihood
(Immer et al. 2021, "Scalable marginal likelihood estimation for model selection in deep
learning"; Dhahri et al. 2024, "Shaving Weights with Occam's Razor", SpaM) and, through the
posterior precision ``P = H + P0``, the Laplace posterior that the reduction rules read.

Notation. For one input ``x_n`` the network output is ``f_n = f(x_n; theta)`` (logits or
means, ``K`` numbers), ``J_n = d f_n / d theta`` its Jacobian and ``Lambda_n`` the Hessian of
the negative log-likelihood with respect to ``f_n``. The generalised Gauss-Newton (GGN) is
``H = sum_n J_n' Lambda_n J_n`` (summed over the data, not averaged). Everything here rests on
one factorisation ``Lambda_n = S_n S_n'`` with ``M`` columns ``s_{n,m}``, which the likelihood
provides (:meth:`~pyro_sparse.likelihoods.Likelihood.hessian_sqrt`: categorical
``s_{n,k} = sqrt(p_k) (e_k - p)``, Gaussian ``e_k / sigma``, Bernoulli ``sqrt(p (1 - p)) e_k``;
or ``M`` Monte Carlo columns with ``E[s s'] = Lambda``, one backward pass each instead of one
per output, :meth:`~pyro_sparse.likelihoods.Likelihood.sampled_hessian_sqrt`). Then
``diag(H) = sum_n sum_m (J_n' s_{n,m})^2`` and each ``J_n' s_{n,m}`` is one ordinary backward
pass: because the samples of a deterministic network without batch statistics do not interact,
back-propagating the cotangent ``s_{., m}`` through a mini-batch gives every layer's *per-sample*
output gradient at once. For a layer ``z = W a + b`` the per-sample weight gradient is ``g a'``
(summed over weight-sharing positions for a convolution), so every curvature here needs only
the layer inputs ``a`` and output gradients ``g`` (the trick of BackPACK, Dangel et al. 2020),
never a per-sample copy of a fully connected weight. The empirical Fisher uses the single column
``r_n = d NLL_n / d f_n``; KFAC (Martens & Grosse 2015; Grosse & Martens 2016 for convolutions)
and the exact row blocks use the same ``a`` and ``g``.

**Which modules get curvature is declared by the layers.** Every Bayesian layer class names a
curvature backend (its ``curvature`` attribute, :mod:`pyro_sparse.curvature_protocol`: ``LINEAR``,
``CONV``) or ``None``
(recurrent, attention, embedding and normalisation layers: the registry refuses a layer with
parameters that declares neither, :mod:`pyro_sparse.registry`). A backend turns a module's
input into *patches* ``(N, D, L)`` with ``z[:, :, l] = W.reshape(out, -1) @ patches[:, :, l] + b``
and its output gradient into ``(N, out, L)``. A torch module gets the backend of the layer class
that converts its type (:data:`pyro_sparse.registry.CONVERSIONS`), or, given the Bayesian network,
of the layer at its path. Any ``torch.nn.Module`` works -- a ``Sequential`` or a user's class
with residual connections, branches and its own ``forward``: the layer inputs and outputs are
recorded by forward hooks, so ``forward`` runs unchanged. Parameters that do not require
gradients (a frozen feature extractor, a batch norm set aside) are held fixed and get no
curvature -- the Laplace approximation over a subnetwork (Daxberger et al. 2021). A module
applied several times in one pass contributes every application as extra positions ``l``, like
the positions of a convolution, so its per-sample gradient ``sum_l g_l a_l'`` is exact. The
network is put in ``eval`` mode for the computation (Dropout the identity, batch norms on their
running statistics) and its mode is restored afterwards.

**Data** are tensors ``(x, y)`` (cut into chunks of ``batch_size``) or any re-iterable of
``(x, y)`` batches (a ``DataLoader``); every curvature is a sum over the batches, accumulated as
they stream by, so no more than one batch of activations is held at once.
"""

from __future__ import annotations

import contextlib
import math

import torch
from torch import nn

from ..curvature_protocol import CONV, LINEAR, ConvCurvature, CurvatureBackend, LinearCurvature
from ..data import data_batches

__all__ = [
    "CurvatureBackend",
    "LinearCurvature",
    "ConvCurvature",
    "LINEAR",
    "CONV",
    "as_likelihood",
    "check_supported",
    "curvature_targets",
    "log_likelihood",
    "diag_ggn",
    "diag_ef",
    "kfac_ggn",
    "row_ggn",
    "kfac_layer_names",
    "input_moment",
]


# --------------------------------------------------------------------------- checks and data


def as_likelihood(likelihood, noise=1.0):
    """A :class:`~pyro_sparse.likelihoods.Likelihood` from an instance or a name (``categorical``,
    ``gaussian`` with ``noise``, ``bernoulli``), checked to provide an output Hessian."""
    if isinstance(likelihood, str):
        from ..likelihoods import build_likelihood

        if likelihood == "gaussian":
            value = float(noise)
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"noise (the Gaussian noise std) must be finite and > 0, got noise={noise!r}")
            likelihood = {"type": "gaussian", "noise": value}
        likelihood = build_likelihood(likelihood)
    check = getattr(likelihood, "check_curvature", None)
    if check is None:
        raise ValueError(f"likelihood: expected a pyro_sparse likelihood or its name, got {likelihood!r}")
    check()
    return likelihood


class _Target:
    """A module whose parameters get curvature: its path, the module and its backend."""

    def __init__(self, name, module, backend):
        self.name, self.module, self.backend = name, module, backend


def _backend(name, module, layer=None):
    """The curvature backend of ``module`` (at path ``name``): the one declared by ``layer`` (the
    network's Bayesian layer at that path) or by the layer class that converts its type."""
    cls = type(layer) if layer is not None else None
    if cls is None:
        from ..registry import CONVERSIONS

        cls = next((c for c in CONVERSIONS.values() if type(module) in c.torch_types), None)
    where = f"model[{name or '(root)'}]"
    if cls is None:
        raise ValueError(f"{where}: {type(module).__name__} has trainable parameters but no layer of the registry "
                         "converts it, so it has no curvature; freeze them (requires_grad_(False)) to hold them fixed")
    backend = getattr(cls, "curvature", None)
    if backend is None:
        raise ValueError(f"{where}: {type(module).__name__} (layer {cls.__name__}) declares no curvature, so the "
                         "Laplace approximation does not cover it; freeze its parameters (requires_grad_(False)) to "
                         "hold them fixed")
    try:
        backend.check(module)
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None
    return backend


def _targets(model, network=None):
    """The modules whose parameters get curvature, in module order: every module that owns
    trainable parameters, with its backend (ValueError naming the first that has none)."""
    if not isinstance(model, nn.Module):
        raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    layers = {}
    if network is not None:
        layers = {leaf.site: leaf for _, layer in network.bayesian_layers() for leaf in layer.leaves()}
        for site, leaf in layers.items():  # a layer whose twin folds its parameters is named here
            if getattr(type(leaf), "curvature", None) is None:
                raise ValueError(f"model[{site}]: layer {type(leaf).__name__} declares no curvature, so the Laplace "
                                 "approximation does not cover it")
    out = []
    for name, module in model.named_modules():
        if not any(p.requires_grad for p in module.parameters(recurse=False)):
            continue
        out.append(_Target(name, module, _backend(name, module, layers.get(name))))
    if not out:
        raise ValueError(f"model ({type(model).__name__}) has no trainable layer with curvature")
    return out


def check_supported(model, network=None):
    """Raise ValueError naming the first module of ``model`` that has trainable parameters and no
    curvature (what every curvature function here would raise): a Laplace fit checks at start-up
    instead of at its first marginal-likelihood step. ``network``: the Bayesian network whose
    deterministic twin ``model`` is (its layers declare the backends)."""
    _targets(model, network)


def curvature_targets(model, network=None) -> dict:
    """Module path -> module of the layers whose parameters get curvature."""
    return {t.name: t.module for t in _targets(model, network)}


def kfac_layer_names(model, network=None):
    """Module paths of the layers of ``model`` whose parameters get curvature (the KFAC keys), in
    module order."""
    return [t.name for t in _targets(model, network)]


@contextlib.contextmanager
def _eval_mode(model):
    was_training = [m.training for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, mode in zip(model.modules(), was_training):
            m.training = mode


# --------------------------------------------------------------------------- the engine


def log_likelihood(model, x, y, likelihood="categorical", noise=1.0):
    """Full log-likelihood ``log p(D | theta) = sum_n log p(y_n | f(x_n; theta))`` (with constants),
    by the likelihood's own :meth:`~pyro_sparse.likelihoods.Likelihood.log_likelihood`;
    differentiable in the network parameters (the data term of the MAP objective). ``x`` may be
    an iterable of ``(x, y)`` batches (then ``y`` is None); the sum runs batch by batch."""
    lik = as_likelihood(likelihood, noise)
    if not torch.is_tensor(x):
        return sum(lik.log_likelihood(model(xb), yb) for xb, yb in data_batches(x))
    data_batches(x, y, need_y=True)  # the checks
    return lik.log_likelihood(model(x), y)


def _forward(model, targets, x):
    """Run ``model`` on ``x`` with forward hooks on the targets; returns the output and, in call
    order, ``(target, input, output)`` of each application of a target layer."""
    records, hooks = [], []
    for target in targets:
        def hook(module, args, z, target=target):
            if not z.requires_grad:
                z.requires_grad_()
            records.append((target, args[0].detach(), z))
            return z
        hooks.append(target.module.register_forward_hook(hook))
    try:
        f = model(x)
    finally:
        for h in hooks:
            h.remove()
    return f, records


def _flat(f):
    return f.reshape(f.shape[0], -1)


def _backprop_columns(model, targets, x, columns, patches=True):
    """Yield, for each cotangent column of ``columns(f)`` (a tensor ``(M, N, K)`` from the detached
    flat output), the per-sample output gradients of every target layer: a list of
    ``(target, inputs, g (N, out, L))``, ``inputs`` the patches ``(N, D, L)`` or, with
    ``patches=False`` (KFAC reads their Gram matrix alone), the list of the layer's raw inputs. A
    layer applied several times has its applications concatenated along ``L``."""
    f, records = _forward(model, targets, x)
    cols = columns(_flat(f.detach()))
    zs = [z for (_, _, z) in records]
    inputs = [t.backend.patches(t.module, a) if patches else a for (t, a, _) in records]
    order = list(dict.fromkeys(t.name for t, _, _ in records))
    by_name = {t.name: t for t, _, _ in records}
    for m in range(cols.shape[0]):
        grads = torch.autograd.grad(f, zs, grad_outputs=cols[m].reshape(f.shape), retain_graph=m + 1 < cols.shape[0])
        per = {}
        for (t, _, _), p, g in zip(records, inputs, grads):
            per.setdefault(t.name, []).append((p, t.backend.out_grads(t.module, g)))
        yield [(by_name[n], torch.cat([p for p, _ in per[n]], -1) if patches else [p for p, _ in per[n]],
                torch.cat([g for _, g in per[n]], -1)) for n in order]


def _columns(lik, mc_samples, generator):
    if mc_samples is None:
        return lik.hessian_sqrt
    if isinstance(mc_samples, bool) or not isinstance(mc_samples, int) or mc_samples < 1:
        raise ValueError(f"mc_samples must be a positive int or None, got mc_samples={mc_samples!r}")
    return lambda f: lik.sampled_hessian_sqrt(f, mc_samples, generator)


def _param_name(target, param):
    return f"{target.name}.{param}" if target.name else param


def _sum_squared_grads(model, targets, data, columns):
    """``sum_n sum_m (J_n' s_{n,m})^2`` per parameter, i.e. the diagonal of ``sum_n J_n' S_n S_n' J_n``.
    ``columns(f, y)`` gives the cotangent columns of a batch."""
    out = {}
    for t in targets:
        for p, value in t.module.named_parameters(recurse=False):
            if value.requires_grad:
                out[_param_name(t, p)] = torch.zeros_like(value, memory_format=torch.contiguous_format)
    for xb, yb in data:
        for layer_grads in _backprop_columns(model, targets, xb, lambda f: columns(f, yb)):
            for t, a, g in layer_grads:
                if a.shape[-1] == 1:
                    # per-sample weight gradient g_n a_n': its square is g_n^2 a_n^2', summed over n
                    w2 = g[..., 0].square().T @ a[..., 0].square()
                    b2 = g[..., 0].square().sum(0)
                else:
                    per_sample = torch.einsum("nol,nil->noi", g, a)
                    w2 = per_sample.square().sum(0)
                    b2 = g.sum(-1).square().sum(0)
                out[_param_name(t, "weight")] += w2.reshape(t.module.weight.shape)
                if t.module.bias is not None and t.module.bias.requires_grad:
                    out[_param_name(t, "bias")] += b2
    return out


def diag_ggn(model, x, y=None, likelihood="categorical", noise=1.0, mc_samples=None, batch_size=None,
             generator=None, network=None):
    """Diagonal of the GGN ``H = sum_n J_n' Lambda_n J_n`` (Immer et al. 2021, Sec. 3; SpaM).

    Args:
        model: a network whose trainable parameters belong to layers with curvature (see the
            module docstring).
        x: inputs (N, ...), or an iterable of ``(x, y)`` batches. y: targets; unused (the GGN of
            these likelihoods does not depend on them) but checked for length if given.
        likelihood: a :class:`~pyro_sparse.likelihoods.Likelihood` or ``"categorical"``,
            ``"gaussian"`` (noise std ``noise``), ``"bernoulli"``.
        mc_samples: ``None`` for the exact diagonal (one backward pass per output); an int
            ``M`` for the unbiased Monte Carlo estimate with ``M`` sampled targets per input.
        batch_size: process tensor data in chunks of this many inputs (memory), ``None`` = all.
        generator: ``torch.Generator`` for the Monte Carlo draws.
        network: the Bayesian network whose deterministic twin ``model`` is (its layers name the
            backends); default: the layers that convert each module's type.

    Returns:
        dict parameter name -> tensor of the parameter's shape, summed over the data (every
        trainable parameter of a layer with curvature).
    """
    lik = as_likelihood(likelihood, noise)
    data = data_batches(x, y, batch_size)
    columns = _columns(lik, mc_samples, generator)
    with _eval_mode(model), torch.enable_grad():
        return _sum_squared_grads(model, _targets(model, network), data, lambda f, _: columns(f))


def diag_ef(model, x, y=None, likelihood="categorical", noise=1.0, batch_size=None, network=None):
    """Diagonal empirical Fisher ``sum_n g_n^2``, ``g_n = grad_theta NLL(y_n | f(x_n))``.

    Per-sample gradients ``g_n = J_n' r_n`` with ``r_n = d NLL_n / d f_n``
    (:meth:`~pyro_sparse.likelihoods.Likelihood.nll_gradient`), computed in one backward pass with
    the same per-layer machinery as :func:`diag_ggn`. Summed over the data.
    """
    lik = as_likelihood(likelihood, noise)
    data = data_batches(x, y, batch_size, need_y=True)
    if any(yb is None for _, yb in data):
        raise ValueError("y is required (got y=None)")
    with _eval_mode(model), torch.enable_grad():
        return _sum_squared_grads(model, _targets(model, network), data,
                                  lambda f, yb: lik.nll_gradient(f, yb).unsqueeze(0))


def _with_ones(t, a):
    """The patches with a row of ones appended where the layer has a bias (the bias column)."""
    if t.module.bias is not None and t.module.bias.requires_grad:
        return torch.cat([a, torch.ones_like(a[:, :1, :])], dim=1)
    return a


def _gram(t, a, dtype=None):
    """``sum_{n,l} a~ a~'`` of one application's input ``a`` (``a~`` with a one for a trainable bias),
    from the backend's columns: the bias row and column are the column sums and the count, so the
    ones are never materialised."""
    p = t.backend.columns(t.module, a)
    if dtype is not None:
        p = p.to(dtype)
    inner = p @ p.T
    if not (t.module.bias is not None and t.module.bias.requires_grad):
        return inner
    out = inner.new_empty(inner.shape[0] + 1, inner.shape[1] + 1)
    out[:-1, :-1] = inner
    total = p.sum(1)
    out[:-1, -1] = total
    out[-1, :-1] = total
    out[-1, -1] = p.shape[1]
    return out


def kfac_ggn(model, x, y=None, likelihood="categorical", noise=1.0, batch_size=None, mc_samples=None,
             generator=None, network=None):
    """Kronecker-factored GGN, one ``(A, G)`` pair per layer with curvature (KFAC-expand).

    Layout. For a layer with weight ``W`` (out, D) -- a convolution's weight read as
    ``W.reshape(out, D)`` -- and bias ``b`` (out,), the rows of the layer are ``[W | b]``
    (:func:`~pyro_sparse.kron.rows_of`, no bias column without a bias), and the GGN block of the
    layer is approximated by :math:`A \\otimes G` over the row-major entries ``(i, j)``
    (output ``i``, input column ``j``): :math:`H_{(i,j),(i',j')} \\approx A_{jj'} G_{ii'}` with

        ``A = sum_{n, l} a~_{n,l} a~_{n,l}'``                      (D+1, D+1),
        ``G = 1/(N L) sum_{n, l} sum_m g_{n,m,l} g_{n,m,l}'``       (out, out),

    where ``a~ = [a; 1]`` is the layer input (a patch of it for a convolution, position ``l``
    of ``L``) with a one appended for the bias, and ``g_{n,m,l} = J_{z_{n,l}}' s_{n,m}`` the
    output gradient for the ``m``-th column of ``Lambda_n = S_n S_n'`` (exact, or ``mc_samples``
    Monte Carlo columns). **A carries the count** (a sum over the N data and L positions);
    **G is a mean**. Both are accumulated batch by batch (a ``DataLoader`` streams).

    For a Linear layer with one data point the factorisation is exact: the per-sample
    gradient is ``g a~'``, so ``H = sum_m (a~ a~') (x) (g_m g_m')``. For convolutions the
    positions are treated as extra data (Grosse & Martens 2016; "KFAC-expand" of Eschenhagen
    et al. 2023).

    Returns:
        dict layer name (module path, e.g. ``"0"``) -> ``(A, G)``.
    """
    lik = as_likelihood(likelihood, noise)
    data = data_batches(x, y, batch_size)
    columns = _columns(lik, mc_samples, generator)
    targets = _targets(model, network)
    a_sums, g_sums, counts = {}, {}, {}
    with _eval_mode(model), torch.enable_grad():
        for xb, _ in data:
            first = True
            for layer_grads in _backprop_columns(model, targets, xb, columns, patches=False):
                for t, inputs, g in layer_grads:
                    if first:
                        a_sums[t.name] = a_sums.get(t.name, 0) + sum(_gram(t, a) for a in inputs)
                        counts[t.name] = counts.get(t.name, 0) + g.shape[0] * g.shape[-1]
                    q = g.transpose(0, 1).reshape(g.shape[1], -1)
                    g_sums[t.name] = g_sums.get(t.name, 0) + q @ q.T
                first = False
    unused = [t.name for t in targets if t.name not in a_sums]
    if unused:
        raise ValueError(f"model[{unused[0]}]: the forward pass never applies this layer, so KFAC has no factors "
                         "for it; freeze its parameters (requires_grad_(False)) or use the diagonal curvature")
    return {t.name: (a_sums[t.name].detach(), (g_sums[t.name] / counts[t.name]).detach()) for t in targets}


def row_ggn(model, x, y=None, likelihood="categorical", noise=1.0, batch_size=None, mc_samples=None,
            generator=None, network=None):
    """The exact GGN block of every output unit's row ``[W_i | b_i]``, rows independent.

    For unit ``i`` of a layer the per-sample gradient of its row is
    ``v_{n,m,i} = sum_l g_{n,m,i,l} a~_{n,l}`` (``a~`` with the bias one), so the block is

        ``H_i = sum_n sum_m v_{n,m,i} v_{n,m,i}'``        (D+1, D+1) per unit,

    exact where KFAC factorises (no Kronecker assumption within a row) but blind to the
    coupling between rows. Memory ``out (D+1)^2`` per layer. The input factor ``A`` of
    :func:`kfac_ggn` comes with it (the scale of the layer's inputs, which the compensated
    reduction reads).

    Returns dict layer name -> ``(A, blocks)``, ``A`` ``(D+1, D+1)`` and ``blocks`` ``(out, D+1, D+1)``.
    """
    lik = as_likelihood(likelihood, noise)
    data = data_batches(x, y, batch_size)
    columns = _columns(lik, mc_samples, generator)
    targets = _targets(model, network)
    out, a_sums = {}, {}
    with _eval_mode(model), torch.enable_grad():
        for xb, _ in data:
            first = True
            for layer_grads in _backprop_columns(model, targets, xb, columns):
                for t, a, g in layer_grads:
                    a = _with_ones(t, a)
                    if first:
                        p = a.transpose(0, 1).reshape(a.shape[1], -1)
                        a_sums[t.name] = a_sums.get(t.name, 0) + p @ p.T
                    v = torch.einsum("nol,nil->noi", g, a)  # (N, out, D')
                    out[t.name] = out.get(t.name, 0) + torch.einsum("noi,noj->oij", v, v)
                first = False
    return {t.name: (a_sums[t.name].detach(), out[t.name].detach()) for t in targets if t.name in out}


@torch.no_grad()
def input_moment(model, x, layer, network=None, batch_size=None):
    """The input factor ``A = sum_{n,l} a~_{n,l} a~_{n,l}'`` of one layer (as in :func:`kfac_ggn`,
    ``a~`` with a one for a trainable bias), from a forward pass alone; float64. What the
    compensated reduction recomputes on the already-reduced network
    (:class:`~pyro_sparse.laplace.posterior.Calibration`)."""
    data = data_batches(x, None, batch_size) if torch.is_tensor(x) else x
    target = next((t for t in _targets(model, network) if t.name == layer), None)
    if target is None:
        raise ValueError(f"model[{layer}]: no trainable layer with curvature at this path")
    total, inputs = 0, []
    hook = target.module.register_forward_hook(lambda module, args, z: inputs.append(args[0].detach()))
    try:
        with _eval_mode(model):
            for xb, *_ in data:
                model(xb)
                for a in inputs:
                    total = total + _gram(target, a).to(torch.float64)
                inputs.clear()
    finally:
        hook.remove()
    return total
