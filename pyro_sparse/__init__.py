"""pyro-sparse: Bayesian sparsification of neural networks, written as Pyro models.

The entry points for a network of your own (imported on first use, so ``import pyro_sparse``
stays cheap): :func:`bayesian` (any ``torch.nn.Module`` -> a sparse Bayesian model,
:mod:`pyro_sparse.convert`), :func:`prune` (a trained module pruned post hoc through a Laplace
posterior, :mod:`pyro_sparse.posthoc`), :func:`export` (a reduced model back as the user's
class, :mod:`pyro_sparse.rebuild`) and :func:`export_graph` (a compact network as a
TorchScript or ONNX graph that runs without pyro-sparse, :mod:`pyro_sparse.deploy`; what the
command ``pyro-sparse export`` does); for run directories :func:`reduce_run`, :func:`sweep_run`,
:func:`save_compact` and :func:`load_compact` (:mod:`pyro_sparse.reduced_runs`).
"""

import importlib

__version__ = "0.1.0"

#: name -> the module that defines it (imported when the name is first used)
_LAZY = {"bayesian": "pyro_sparse.convert", "BayesianModule": "pyro_sparse.convert",
         "prune": "pyro_sparse.posthoc", "export": "pyro_sparse.rebuild",
         "export_graph": "pyro_sparse.deploy", "reduce_run": "pyro_sparse.reduced_runs",
         "sweep_run": "pyro_sparse.reduced_runs", "save_compact": "pyro_sparse.reduced_runs",
         "load_compact": "pyro_sparse.reduced_runs"}


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'pyro_sparse' has no attribute {name!r}")
