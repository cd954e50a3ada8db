"""The Laplace approximation, as one package.

* :mod:`.curvature`: curvatures of a deterministic network (diagonal GGN, empirical Fisher,
  KFAC, exact row blocks), with the backends the layers declare and the output Hessians the
  likelihoods provide;
* :mod:`.prior`: Gaussian prior precisions by structure (scalar, layer-wise, parameter-wise,
  unit-wise);
* :mod:`.marglik`: the Laplace marginal likelihood and the prior precisions that maximise it;
* :mod:`.posterior`: a fitted Laplace posterior -- its summary for the reduction rules and its
  (linearised) predictive -- and :func:`~.posterior.laplace_posterior`, the post-hoc fit of a
  trained module in one call;
* :mod:`.trainer`: SpaM, online marginal-likelihood training (``method: laplace``).

Importing this package imports none of them (the layers import the curvature backends alone);
``pyro_sparse.laplace.laplace_posterior`` and ``LaplacePosterior`` load :mod:`.posterior` on
first use.
"""

import importlib

_LAZY = {"laplace_posterior": ".posterior", "LaplacePosterior": ".posterior"}


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module 'pyro_sparse.laplace' has no attribute {name!r}")
