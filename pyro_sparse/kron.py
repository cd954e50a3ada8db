r"""Structured Gaussian precisions of one layer: Kronecker factors and row blocks.

A layer ``z = W a + b`` with ``out`` units has the parameters of each unit ``i`` in one *row*
:math:`r_i = [W_i \mid b_i]` of length :math:`D' = D + 1` (``D`` input features; a convolution's
weight read as ``W.reshape(out, -1)``, its patches as the inputs; no bias column without a
bias). Two structures of the posterior precision :math:`P` over the rows are kept here:

* :class:`KroneckerPrecision`, the KFAC Laplace posterior (Martens & Grosse 2015; Ritter, Botev &
  Barber 2018; Immer et al. 2021): :math:`P = A \otimes G + \mathrm{diag}(\delta)`, ``A``
  :math:`(D', D')` the second moment of the layer's inputs (with a one for the bias; a sum over
  the data), ``G`` :math:`(out, out)` that of its output gradients (a mean), :math:`\delta` the
  prior precision of every entry. With :math:`A = Q_A\Lambda_AQ_A^\top`,
  :math:`G = Q_G\Lambda_GQ_G^\top` (as laplace-torch's ``KronDecomposed``) the eigenvectors of
  :math:`A \otimes G` are :math:`Q_A \otimes Q_G` with eigenvalues :math:`\lambda_{A,k}\lambda_{G,m}`,
  so for a constant :math:`\delta` the marginal variances are exact:

  .. math::

      \Sigma_{ij} = [P^{-1}]_{(i,j),(i,j)} = \sum_{m,k} \frac{Q_G[i,m]^2\, Q_A[j,k]^2}
          {\lambda_{G,m}\lambda_{A,k} + \delta}.

  For a non-constant :math:`\delta` the prior is projected onto that eigenbasis and its diagonal
  kept (Immer et al. 2021), and the variances are approximate (``exact`` says which).
* :class:`RowPrecision`: one precision matrix per row, :math:`P_i` :math:`(D', D')`, rows
  independent (the exact GGN block of each unit, or KFAC's :math:`G_{ii} A + \mathrm{diag}(\delta_i)`).

:meth:`rows` gives the row blocks of either, which the compensated reduction
(:mod:`pyro_sparse.reduction.compensate`) works on: within a row the reduced posterior mean moves
the kept weights (the Optimal Brain Surgeon update, Hassibi & Stork 1993). :func:`psd_eigh` is
the eigendecomposition every structure uses: float64, robust to rank-deficient and badly scaled
factors.
"""

from __future__ import annotations

import math

import torch

from .errors import CurvatureError

__all__ = ["psd_eigh", "psd_eigvalsh", "KroneckerPrecision", "RowPrecision", "rows_of", "split_rows"]

#: widest row (D') whose marginal variances are computed by a full eigendecomposition; wider
#: layers keep the diagonal of the precision (a conditional precision; the summary says so)
MAX_EIGH = 4096


def _clean(matrix, what):
    m = matrix.detach().to(torch.float64)  # symmetric: LAPACK reads its lower triangle
    if not bool(torch.isfinite(m).all()):
        bad = int((~torch.isfinite(m)).sum())
        raise CurvatureError(f"{what}: {bad} NaN or infinite entries (non-finite activations or gradients: check "
                             "the inputs for NaN or values far from unit scale)")
    return m


def _decompose(fn, matrix, what):
    """``fn(matrix + jitter I)`` with the smallest jitter (0, then 1e-12 .. 1e-4 times the largest
    diagonal entry) at which LAPACK converges; returns ``(result, jitter)``."""
    m = _clean(matrix, what)
    scale = float(m.diagonal(dim1=-2, dim2=-1).abs().max()) if m.numel() else 0.0
    eye = torch.eye(m.shape[-1], dtype=m.dtype, device=m.device)
    for jitter in (0.0, 1e-12, 1e-10, 1e-8, 1e-6, 1e-4):
        try:
            return fn(m + (jitter * max(scale, 1e-300)) * eye if jitter else m), jitter * scale
        except (torch.linalg.LinAlgError, RuntimeError):
            continue
    raise CurvatureError(f"{what}: the eigendecomposition did not converge even with a jitter of 1e-4 times its "
                         f"largest diagonal entry ({scale:.3g}); its entries may be far out of range: standardise the "
                         "inputs, or use curvature diag")


def psd_eigh(matrix, what="matrix"):
    """``(eigenvalues, eigenvectors, jitter)`` of a symmetric positive semi-definite matrix.

    Computed in float64 (from the lower triangle). A factor estimated from fewer rows than its
    dimension is rank-deficient and, with activations spanning many orders of magnitude, badly
    scaled; float32 ``eigh`` may then not converge (LAPACK's "ill-conditioned or too many repeated
    eigenvalues"). Should float64 fail too, the smallest jitter that converges is added to the
    diagonal and returned (0 when none was needed). Round-off negatives are clipped to 0.
    :class:`~pyro_sparse.errors.CurvatureError` naming ``what`` for non-finite entries.
    """
    (vals, vecs), jitter = _decompose(torch.linalg.eigh, matrix, what)
    return vals.clamp_min(0.0), vecs, jitter


def psd_eigvalsh(matrix, what="matrix"):
    """``(eigenvalues, jitter)`` as :func:`psd_eigh` (about three times cheaper: no eigenvectors)."""
    vals, jitter = _decompose(torch.linalg.eigvalsh, matrix, what)
    return vals.clamp_min(0.0), jitter


def rows_of(weight, bias=None):
    """``[W.reshape(out, -1) | b]``: the rows of a layer, shape ``(out, D')``."""
    w = weight.reshape(weight.shape[0], -1)
    return torch.cat([w, bias.reshape(-1, 1).to(w.dtype)], 1) if bias is not None else w


def split_rows(rows, weight_shape, has_bias):
    """Inverse of :func:`rows_of`: ``(weight, bias or None)``."""
    if has_bias:
        return rows[:, :-1].reshape(weight_shape), rows[:, -1]
    return rows.reshape(weight_shape), None


class _LayerPrecision:
    """What every structure has: the layer, its weight and bias sites, the prior precision
    ``delta`` of every entry ``(out, D')``, and the row view of its parameters."""

    kind = ""
    exact = True

    def __init__(self, layer, weight_site, bias_site, weight_shape, delta):
        self.layer, self.weight_site, self.bias_site = layer, weight_site, bias_site
        self.weight_shape = tuple(weight_shape)
        self.out = self.weight_shape[0]
        self.width = math.prod(self.weight_shape[1:]) + (bias_site is not None)
        delta = torch.as_tensor(delta, dtype=torch.float64)
        self.delta = delta.expand(self.out, self.width).clone() if delta.dim() < 2 else delta.to(torch.float64)

    @property
    def has_bias(self):
        return self.bias_site is not None

    def sites(self):
        return [self.weight_site] + ([self.bias_site] if self.has_bias else [])

    def split(self, rows):
        """``{site: tensor}`` of a ``(out, D')`` array (variances, precisions, values)."""
        weight, bias = split_rows(rows, self.weight_shape, self.has_bias)
        return {self.weight_site: weight, **({self.bias_site: bias} if self.has_bias else {})}

    def rows(self, input_moment=None, output_scale=None):
        """The row blocks ``P_i`` ``(out, D', D')`` (float64)."""
        raise NotImplementedError

    def marginal_variance(self):
        """``(out, D')`` marginal variances :math:`[P^{-1}]_{ii}`, or None where too costly."""
        raise NotImplementedError

    def precision_diagonal(self):
        """``(out, D')`` diagonal of the precision :math:`P_{ii}` (what OPD reads)."""
        raise NotImplementedError


class KroneckerPrecision(_LayerPrecision):
    r""":math:`P = A \otimes G + \mathrm{diag}(\delta)` for one layer (see the module docstring).

    ``A`` ``(D', D')`` (carries the count), ``G`` ``(out, out)``, ``delta`` the prior precision
    (scalar or ``(out, D')``). ``jitter`` records what :func:`psd_eigh` added to the factors.
    """

    kind = "kronecker"

    def __init__(self, layer, weight_site, bias_site, weight_shape, A, G, delta):
        super().__init__(layer, weight_site, bias_site, weight_shape, delta)
        self.A = A.detach().to(torch.float64)
        self.G = G.detach().to(torch.float64)
        if self.A.shape != (self.width, self.width) or self.G.shape != (self.out, self.out):
            raise ValueError(f"{layer}: Kronecker factors of shapes {tuple(self.A.shape)} and {tuple(self.G.shape)} do "
                             f"not fit a layer of {self.out} units with {self.width} entries per row")
        self.exact = bool((self.delta == self.delta.reshape(-1)[0]).all())
        self._eig = None
        self.jitter = 0.0

    def eig(self):
        """``(lambda_A, Q_A, lambda_G, Q_G)`` (cached)."""
        if self._eig is None:
            la, qa, ja = psd_eigh(self.A, f"{self.layer}: the input factor A")
            lg, qg, jg = psd_eigh(self.G, f"{self.layer}: the output factor G")
            self._eig, self.jitter = (la, qa, lg, qg), max(ja, jg)
        return self._eig

    def _eigen_precision(self):
        """``(out, D')`` precisions in the eigenbasis, :math:`\\lambda_{G,m}\\lambda_{A,k} + \\tilde\\delta_{mk}`."""
        la, qa, lg, qg = self.eig()
        projected = self.delta if self.exact else qg.square().T @ self.delta @ qa.square()
        return torch.outer(lg, la) + projected

    def marginal_variance(self):
        if self.width > MAX_EIGH:
            return None
        la, qa, lg, qg = self.eig()
        return qg.square() @ self._eigen_precision().reciprocal() @ qa.square().T

    def precision_diagonal(self):
        return torch.outer(self.G.diagonal(), self.A.diagonal()) + self.delta

    def rows(self, input_moment=None, output_scale=None):
        r""":math:`P_i = s\,G_{ii} A + \mathrm{diag}(\delta_i)`: the precision of row ``i`` given the
        other rows (KFAC's row blocks). ``input_moment`` replaces ``A`` (the inputs of an
        already-reduced network); ``output_scale`` ``s`` multiplies ``G`` (default 1)."""
        a = self.A if input_moment is None else input_moment.detach().to(torch.float64)
        g = self.G.diagonal() * (1.0 if output_scale is None else output_scale)
        rows = g[:, None, None] * a[None]
        rows.diagonal(dim1=1, dim2=2).add_(self.delta)
        return rows

    def log_det(self):
        """:math:`\\log\\det P` (exact for a constant ``delta``, else the projected form)."""
        return self._eigen_precision().log().sum()

    def sample(self, n, generator=None):
        r"""``n`` draws ``(n, out, D')`` of :math:`N(0, P^{-1})`: in the eigenbasis
        :math:`r = Q_G (Z \odot M^{-1/2}) Q_A^\top` with ``Z`` standard normal (exact for a constant
        ``delta``, the projected precision otherwise)."""
        la, qa, lg, qg = self.eig()
        z = torch.randn((n, self.out, self.width), generator=generator, dtype=torch.float64)
        return qg @ (z * self._eigen_precision().rsqrt()) @ qa.T


class RowPrecision(_LayerPrecision):
    """One precision matrix per row, ``precisions`` ``(out, D', D')`` with the prior included;
    rows independent. ``input_moment``: the layer's input second moment ``A`` (its scale is what
    a row block is measured against in unit output scale), or None."""

    kind = "rows"

    def __init__(self, layer, weight_site, bias_site, weight_shape, precisions, delta, input_moment=None):
        super().__init__(layer, weight_site, bias_site, weight_shape, delta)
        self.A = None if input_moment is None else input_moment.detach().to(torch.float64)
        self.P = precisions.detach().to(torch.float64)
        if self.P.shape != (self.out, self.width, self.width):
            raise ValueError(f"{layer}: row precisions of shape {tuple(self.P.shape)} do not fit a layer of "
                             f"{self.out} units with {self.width} entries per row")
        self._chol = None

    def cholesky(self):
        if self._chol is None:
            chol, info = torch.linalg.cholesky_ex(_clean(self.P, f"{self.layer}: the row precisions"))
            if bool((info != 0).any()):
                row = int(torch.nonzero(info)[0])
                raise CurvatureError(f"layer {self.layer}: the precision of unit {row} is not positive definite (a "
                                     "prior precision of 0?); fit the prior precision, or use curvature kfac")
            self._chol = chol
        return self._chol

    def rows(self, input_moment=None, output_scale=None):
        if input_moment is not None or output_scale is not None:
            raise ValueError(f"{self.layer}: exact row blocks cannot be recomputed from an input moment alone")
        return self.P

    def marginal_variance(self):
        return torch.cholesky_inverse(self.cholesky()).diagonal(dim1=-2, dim2=-1)

    def precision_diagonal(self):
        return self.P.diagonal(dim1=-2, dim2=-1).clone()

    def log_det(self):
        return 2.0 * self.cholesky().diagonal(dim1=-2, dim2=-1).log().sum()

    def sample(self, n, generator=None):
        """``n`` draws ``(n, out, D')`` of :math:`N(0, P^{-1})`: :math:`L^{-\\top} z` per row."""
        z = torch.randn((n, self.out, self.width, 1), generator=generator, dtype=torch.float64)
        chol = self.cholesky().unsqueeze(0)
        return torch.linalg.solve_triangular(chol.transpose(-1, -2), z, upper=True)[..., 0]
