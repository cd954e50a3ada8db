"""Errors the library raises for things a user wrote: specs, recipes, data, flags.

Every message names the file, the field (as a path such as ``layers[2].prior.scale``) or
the value at fault and says what was expected. The CLI turns these into exit status 2.
"""


class PyroSparseError(Exception):
    """Base class for every error caused by user input."""


class SpecError(PyroSparseError, ValueError):
    """A model spec or inference recipe is invalid.

    ``source`` is the file (or ``<dict>``), ``path`` the location inside it.
    """

    def __init__(self, message, source=None, path=None):
        self.source = source
        self.path = path
        where = ": ".join(p for p in (source, path) if p)
        super().__init__(f"{where}: {message}" if where else message)


class DataError(PyroSparseError, ValueError):
    """A data set or data file is unusable (missing arrays, NaN, bad labels, ...)."""


class CheckpointError(PyroSparseError):
    """A checkpoint or saved model cannot be read safely."""


class CurvatureError(PyroSparseError, ValueError):
    """The curvature of a Laplace approximation cannot be used: non-finite entries, or a factor
    that no decomposition handles. The message names the layer and what to try."""


class QualityError(PyroSparseError):
    """A reduced network fell further below the dense one than the user allowed (``--max-drop``).
    The CLI exits with status 3 (an input error is 2)."""

    exit_status = 3


class PyroSparseWarning(UserWarning):
    """Something the user should know but that does not stop the run (e.g. a data fingerprint
    that differs from the one a run was fitted on, or a resume from ``checkpoint.pt.prev``).
    The CLI prints these as one ``warning:`` line on stderr."""
