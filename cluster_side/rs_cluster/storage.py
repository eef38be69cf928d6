"""Storage locations: local paths by default, any URL pyarrow understands (``hdfs://``, ``file://``).

Spark and Petastorm want URLs; people type paths. :func:`to_url` turns a local path into an
absolute ``file://`` URL and leaves URLs alone. The helpers below go through pyarrow's filesystem
layer so the same code writes to HDFS on a real cluster.
"""

from __future__ import annotations

import json
import os
import posixpath
import time
from typing import Any
from urllib.parse import unquote, urlparse

from rs_cluster.atomic import fsync_dir
from rs_cluster.atomic import replace_dir as atomic_replace_dir


def is_url(location: str) -> bool:
    scheme = urlparse(str(location)).scheme
    return len(scheme) > 1  # "C:" on Windows is a drive, not a scheme


def to_url(location: str | os.PathLike[str]) -> str:
    location = str(location)
    if is_url(location):
        return location.rstrip("/")
    return "file://" + os.path.abspath(location)


def filesystem(url: str):
    """(pyarrow filesystem, path inside it) for a URL."""
    from pyarrow import fs

    return fs.FileSystem.from_uri(url)


def join(url: str, *parts: str) -> str:
    return posixpath.join(url, *parts)


def exists(url: str) -> bool:
    from pyarrow import fs

    filesys, path = filesystem(url)
    return filesys.get_file_info(path).type != fs.FileType.NotFound


def is_nonempty_dir(url: str) -> bool:
    from pyarrow import fs

    filesys, path = filesystem(url)
    info = filesys.get_file_info(path)
    if info.type == fs.FileType.NotFound:
        return False
    if info.type != fs.FileType.Directory:
        return True
    return bool(filesys.get_file_info(fs.FileSelector(path, recursive=False)))


def delete_dir(url: str) -> None:
    filesys, path = filesystem(url)
    if exists(url):
        filesys.delete_dir(path)


def _local_path(url: str) -> str | None:
    """The path of a ``file://`` URL (or a plain path); None for other filesystems."""
    parsed = urlparse(url)
    if not is_url(url):
        return os.path.abspath(url)
    return unquote(parsed.path) if parsed.scheme == "file" else None


def move(src_url: str, dst_url: str) -> None:
    filesys, src = filesystem(src_url)
    _, dst = filesystem(dst_url)
    filesys.move(src, dst)
    local = _local_path(dst_url)
    if local is not None:
        fsync_dir(os.path.dirname(local))  # the rename is durable only once its folder is flushed


def replace_dir(new_url: str, url: str) -> None:
    """Puts the complete folder ``new_url`` at ``url``, replacing any folder there, so that a run
    killed at any point leaves a whole folder at ``url``: see :func:`rs_cluster.atomic.replace_dir`
    (local disks). Elsewhere the old folder is renamed aside first, put back if the new one cannot
    be moved in, and deleted only once the new one is in place."""
    new_local, local = _local_path(new_url), _local_path(url)
    if new_local is not None and local is not None:
        atomic_replace_dir(new_local, local)
        return
    if not exists(url):
        move(new_url, url)
        return
    parent, name = url.rstrip("/").rsplit("/", 1)
    old = f"{parent}/.{name}.old-{os.getpid()}-{time.time_ns()}"
    move(url, old)
    try:
        move(new_url, url)
    except BaseException:
        move(old, url)
        raise
    delete_dir(old)


def read_json(url: str) -> Any:
    filesys, path = filesystem(url)
    with filesys.open_input_stream(path) as f:
        return json.loads(f.read().decode("utf-8"))


def write_json(url: str, data: Any) -> None:
    """Writes JSON through a temporary name and a rename (atomic on local disks and HDFS)."""
    filesys, path = filesystem(url)
    tmp = posixpath.join(posixpath.dirname(path), f".{posixpath.basename(path)}.tmp-{os.getpid()}")
    with filesys.open_output_stream(tmp) as f:
        f.write((json.dumps(data, indent=2, default=str) + "\n").encode("utf-8"))
    filesys.move(tmp, path)
    local = _local_path(url)
    if local is not None:
        fsync_dir(os.path.dirname(local))
