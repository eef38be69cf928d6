"""Atomic files: a result is either complete at its final path or absent.

Files are written to a temporary sibling and renamed over the target. Stages build whole folders
(a dataset, a model) the same way, in a hidden sibling put in place at the end by
:func:`replace_dir`; for URLs (``hdfs://``) see :mod:`rs_cluster.storage`. After each rename the
folder holding the new name is flushed too: until then a crash may undo the rename.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from rs_cluster.errors import disk_full_error, is_disk_full


def write_text_atomic(path: str | os.PathLike[str], text: str, *, mode: int | None = None) -> None:
    """Writes ``text`` to ``path`` through a temporary sibling. The file gets ``mode``, or the
    usual ``0666 & ~umask`` when none is given."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_umask() if mode is None else mode)  # mkstemp makes 0600
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException as e:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if isinstance(e, OSError) and is_disk_full(e):
            raise disk_full_error(e, path, "writing it") from e
        raise


def _umask() -> int:
    # Read, not set-and-restore: os.umask() would change it for every thread for a moment.
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    return 0o022


def write_json_atomic(path: str | os.PathLike[str], data: Any, *, mode: int | None = None) -> None:
    write_text_atomic(path, json.dumps(data, indent=2, sort_keys=False, default=str) + "\n",
                      mode=mode)


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """Flushes a folder's entries to disk, making a rename into it durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    except OSError as e:
        # A few filesystems cannot flush a folder (EINVAL); they give no stronger promise either.
        if e.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
            raise
    finally:
        os.close(fd)


def replace_dir(new: str | os.PathLike[str], target: str | os.PathLike[str]) -> None:
    """Puts the complete folder ``new`` at ``target``, replacing any folder there.

    Where the filesystem can swap two names in one step (Linux, local disks) a reader finds the
    old or the new folder at ``target``, never none; elsewhere the old one is first renamed aside,
    and put back if the new one cannot be moved in. The old folder is deleted only after the new
    one is in place, so a run killed at any point leaves a whole folder at ``target`` (and at
    worst a hidden leftover beside it).
    """
    new, target = Path(new), Path(target)
    if not os.path.lexists(target):
        os.replace(new, target)
        fsync_dir(target.parent)
        return
    if _exchange(new, target):
        old = new  # the swap left the old folder at the new one's name
    else:
        old = target.parent / f".{target.name}.old-{os.getpid()}-{time.time_ns()}"
        os.replace(target, old)
        try:
            os.replace(new, target)
        except BaseException:
            os.replace(old, target)
            raise
    fsync_dir(target.parent)
    shutil.rmtree(old, ignore_errors=True)


_AT_FDCWD, _RENAME_EXCHANGE = -100, 2


def _exchange(a: Path, b: Path) -> bool:
    """Swaps two existing names in one step (``renameat2(RENAME_EXCHANGE)``); False where the
    system or the filesystem cannot (not Linux, NFS, old kernels)."""
    renameat2 = getattr(_libc(), "renameat2", None)
    if renameat2 is None:
        return False
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(a), None, str(b))


@functools.lru_cache(maxsize=1)
def _libc() -> Any:
    try:
        return ctypes.CDLL(None, use_errno=True)  # this process's own symbols, libc's among them
    except OSError:
        return None
