"""Exceptions raised by rs_cluster.

Every error a user can cause derives from :class:`RsClusterError`; each subclass also inherits the
matching builtin so callers that only know Python's exceptions still catch it. Messages name the
file and the problem, and say what to do where that is not obvious.
"""

from __future__ import annotations

import errno
import os


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


class OutputWriteError(RsClusterError, OSError):
    """An output could not be written completely; nothing half-written is left at its name."""


class StorageError(RsClusterError, OSError):
    """A storage location (s3://, hdfs://, a path) cannot be reached, read or written: access
    denied, not found, unreachable. The message names the URL, never a credential."""


class DiskFullError(OutputWriteError):
    """A write failed because the disk (or the user's quota) is full."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.errno = errno.ENOSPC


class ClusterError(RsClusterError, RuntimeError):
    """Spark or Horovod could not run the work (no master, too few slots, worker died)."""


class CancelledError(RsClusterError):
    """The work was cancelled by the user (Ctrl-C or a job cancel)."""

    exit_code = 130


_DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})
# GDAL and Spark pass the failure on as text only: libtiff reports strerror(ENOSPC), GDAL's GTiff
# driver refuses to create a file with "Free disk space available is N bytes, whereas M are at
# least necessary", a JVM error quotes the Java IOException.
_DISK_FULL_TEXTS = ("no space left on device", "disk quota exceeded", "free disk space available")


def is_disk_full(exc: BaseException) -> bool:
    """Whether ``exc``, or an exception it was raised from, says the disk or the quota is full."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno in _DISK_FULL_ERRNOS:
            return True
        if any(text in str(current).lower() for text in _DISK_FULL_TEXTS):
            return True
        current = current.__cause__ or current.__context__
    return False


def disk_full_error(exc: BaseException | None, path: str | os.PathLike[str] | None = None,
                    doing: str = "writing") -> DiskFullError:
    """The error to raise for a write that found the disk full (``exc``, where there is one):
    which file, what to do."""
    if isinstance(exc, DiskFullError):
        return DiskFullError(str(exc))
    path = path or getattr(exc, "filename", None)
    if path:
        return DiskFullError(f"{os.fspath(path)}: no space left on device (disk full) while {doing}; "
                             "free space on that disk (or raise your quota) and run again")
    return DiskFullError(f"no space left on device (disk full) while {doing}; free space (or raise "
                         "your quota) and run again")
