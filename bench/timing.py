"""The clocks and interleaved timing of the benchmarks: :mod:`pyro_sparse.timing` (the library's
``reduce`` and ``report`` time compact networks with the same code)."""

from pyro_sparse.timing import interleaved, timed

__all__ = ["interleaved", "timed"]
