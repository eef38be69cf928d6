"""Exceptions raised by rs_cluster.

Every error a user can cause derives from :class:`RsClusterError`; each subclass also inherits the
matching builtin so callers that only know Python's exceptions still catch it. Messages name the
file and the problem, and say what to do where that is not obvious.
"""

from __future__ import annotations


class RsClusterError(Exception):
    """Root of every error rs_cluster raises on purpose. The CLI prints it on one line."""

    exit_code = 2


class ConfigError(RsClusterError, ValueError):
    """A stage configuration or job spec is invalid (unknown key, bad value)."""


class InputError(RsClusterError, ValueError):
    """Input data is unusable: missing pair, empty folder, mismatched sizes, wrong bands."""


class RasterReadError(InputError, OSError):
    """A raster cannot be opened or decoded (missing, corrupt, not a raster)."""


class OutputExistsError(RsClusterError, FileExistsError):
    """The output location already holds a result; pass --overwrite to replace it."""


class ClusterError(RsClusterError, RuntimeError):
    """Spark or Horovod could not run the work (no master, too few slots, worker died)."""


class CancelledError(RsClusterError):
    """The work was cancelled by the user (Ctrl-C or a job cancel)."""

    exit_code = 130
