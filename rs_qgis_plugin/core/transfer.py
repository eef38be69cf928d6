"""Resumable, verified file transfers over SFTP.

Uploads go to ``<name>.part`` on the cluster and are renamed into place only once the remote sha256
equals the local one, so a half-sent file never looks complete. After a dropped connection the
transfer reconnects and continues at the size of the partial file, once the hash of that partial
content matches the same prefix here; otherwise it starts over. A file the other side already has
with the same hash is skipped. Downloads work the same way in the other direction.

Progress is reported as ``callback(bytes_done, bytes_total, percent)``; ``cancel.is_set()`` is
checked between chunks, and a cancelled transfer keeps its partial file for a later resume.
"""

from __future__ import annotations

import collections
import errno
import hashlib
import importlib
import inspect
import os
import posixpath
import stat
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import paramiko
from paramiko.sftp import CMD_STATUS, CMD_WRITE

from rs_qgis_plugin.core.commands import (
    build_remote_command,
    follow_sha256_argv,
    sha256_argv,
    sha256sum_argv,
)
from rs_qgis_plugin.core.errors import (
    CancelledError,
    ChecksumMismatchError,
    HostUnreachableError,
    RemoteCommandError,
    RsPluginError,
    TransferError,
    UnsafeRemoteNameError,
)
from rs_qgis_plugin.core.jobspec import name_problem, relative_path_problem
from rs_qgis_plugin.core.ssh import CancelFlag, SshClient

ProgressCallback = Callable[[int, int, float], None]

# Paramiko sends at most 32768 - 64 bytes of channel data per SSH packet; an SFTP write request
# of this size plus its header fits one packet instead of spilling a few bytes into a second.
UPLOAD_CHUNK = 32768 - 64 - 64
UPLOAD_READ = 32 * UPLOAD_CHUNK
DOWNLOAD_CHUNK = 1 << 20
PART_SUFFIX = ".part"
# Write requests in flight; 256 x 32 KB = 8 MB, well beyond what one round trip drains.
MAX_PENDING_WRITES = 256
# The integer type paramiko packs as 64 bits: sftp.int64 in 3.x, py3compat.long in 2.x.
_INT64 = getattr(paramiko.sftp, "int64", None) or importlib.import_module("paramiko.py3compat").long
_PROGRESS_EVERY = 1 << 20
# What the plugin creates on the cluster is the analyst's alone (see Transfers.makedirs).
PRIVATE_FOLDER_MODE = 0o700
PRIVATE_FILE_MODE = 0o600


@dataclass(frozen=True)
class TransferResult:
    source: str
    target: str
    size: int
    sha256: str
    skipped: bool  # the target already had this content: nothing was sent
    resumed_from: int  # where the last attempt started (0: from the beginning)
    bytes_sent: int  # file bytes sent over the wire by this call, all attempts together
    attempts: int
    last_attempt_bytes: int = 0  # of which the successful attempt sent


def sha256_file(path: str | os.PathLike[str], limit: int | None = None,
                cancel: CancelFlag | None = None) -> hashlib._Hash:
    """The sha256 object of the first ``limit`` bytes (or all) of a local file."""
    h = hashlib.sha256()
    remaining = limit if limit is not None else -1
    with open(path, "rb") as f:
        while remaining != 0:
            block = f.read(DOWNLOAD_CHUNK if remaining < 0 else min(DOWNLOAD_CHUNK, remaining))
            if not block:
                break
            h.update(block)
            if remaining > 0:
                remaining -= len(block)
            _check_cancel(cancel)
    return h


def _check_cancel(cancel: CancelFlag | None) -> None:
    if cancel is not None and cancel.is_set():
        raise CancelledError("transfer cancelled; the partial file is kept and resumes next time")


class _Progress:
    def __init__(self, callback: ProgressCallback | None, total: int) -> None:
        self._callback, self._total, self._last = callback, total, -_PROGRESS_EVERY

    def __call__(self, done: int, force: bool = False) -> None:
        if self._callback and (force or done == self._total or
                               done - self._last >= _PROGRESS_EVERY):
            self._last = done
            percent = 100.0 if self._total == 0 else round(100.0 * done / self._total, 2)
            self._callback(done, self._total, percent)


def _remote_missing(e: Exception) -> bool:
    return isinstance(e, (FileNotFoundError, IOError)) and getattr(e, "errno", None) == errno.ENOENT


def _prefetch(src: paramiko.SFTPFile, size: int) -> None:
    # paramiko 3 can bound the read-ahead; 2.x requests the whole rest of the file at once.
    if "max_concurrent_requests" in inspect.signature(src.prefetch).parameters:
        src.prefetch(size, max_concurrent_requests=MAX_PENDING_WRITES)
    else:
        src.prefetch(size)


class _RemoteHash:
    """The sha256 of a remote file, computed by a command started now and read when needed."""

    def __init__(self, transfers: Transfers, path: str) -> None:
        self._transfers, self._path = transfers, path
        self._command = build_remote_command(sha256_argv(path, python=transfers.remote_python))
        self._channel: paramiko.Channel | None = transfers.client.start_command_line(self._command)
        self._digest: str | None = None

    def result(self) -> str:
        if self._digest is None:
            channel, self._channel = self._channel, None
            assert channel is not None
            out = self._transfers.client.collect(channel, self._command, check=False,
                                                 timeout=3600)
            digest = out.stdout.strip()
            if out.exit_status != 0 or len(digest) != 64:  # no python3 there: the slow way
                digest = self._transfers.remote_sha256(self._path)
            self._digest = digest
        return self._digest

    def close(self) -> None:
        if self._channel is not None:
            self._channel.close()
            self._channel = None


class _PipelinedWriter:
    """Keeps up to MAX_PENDING_WRITES write requests in flight and reads each acknowledgement
    as it arrives. (paramiko's own pipelined ``SFTPFile.write`` waits for all outstanding
    requests every hundred or so, which empties the pipe and halves throughput.)"""

    def __init__(self, sftp: paramiko.SFTPClient, handle: bytes) -> None:
        self._sftp, self._handle = sftp, handle
        self._pending: collections.deque[int] = collections.deque()

    def write(self, offset: int, block: bytes) -> None:
        self._pending.append(self._sftp._async_request(
            type(None), CMD_WRITE, self._handle, _INT64(offset), block))
        while self._pending and (len(self._pending) > MAX_PENDING_WRITES
                                 or self._sftp.sock.recv_ready()):
            self._ack()

    def wait_all(self) -> None:
        while self._pending:
            self._ack()

    def _ack(self) -> None:
        # raises IOError for an error status (disk full, permission)
        kind, _ = self._sftp._read_response(self._pending.popleft())
        if kind != CMD_STATUS:
            raise TransferError(f"the SFTP server answered a write with message type {kind}")


def _link_error(shown: str, root: str | None) -> UnsafeRemoteNameError:
    where = f" in {root}" if root else ""
    return UnsafeRemoteNameError(
        f"{shown}{where} on the cluster is a symbolic link; links in results are not followed, "
        "since one may point at any file of yours there (your SSH keys, say); nothing of this "
        "result was downloaded")


def local_path_under(folder: str | os.PathLike[str], rel: str, what: str = "result") -> Path:
    """``folder/rel`` for a '/'-separated ``rel`` sent by the cluster, once every part of it is a
    plain name on this system and the path, links resolved, lies inside ``folder``.

    Returns the path unresolved (so callers can take it ``relative_to(folder)``)."""
    problem = relative_path_problem(rel)
    if problem is not None:
        raise UnsafeRemoteNameError(f"{what} {rel!r} from the cluster {problem}; not downloaded")
    base = Path(folder)
    target = base.joinpath(*rel.split("/"))
    # Pure name checks cannot see a link already on this computer, nor a rule of this system
    # they do not know; resolving both ends does.
    resolved_base, resolved = base.resolve(), target.resolve()
    if resolved == resolved_base or resolved_base not in resolved.parents:
        raise UnsafeRemoteNameError(f"{what} {rel!r} from the cluster would be written to "
                                    f"{resolved}, outside {resolved_base}; not downloaded")
    return target


class Transfers:
    """Uploads and downloads through one :class:`SshClient`, reconnecting up to ``retries`` times
    when the connection drops."""

    def __init__(self, client: SshClient, *, retries: int = 5, retry_delay: float = 1.0,
                 remote_python: str = "python3") -> None:
        self.client = client
        self.remote_python = remote_python
        self.retries = retries
        self.retry_delay = retry_delay

    # -- remote helpers ---------------------------------------------------------------------------
    def remote_sha256(self, path: str, limit: int | None = None) -> str:
        """sha256 of a remote file (or of its first ``limit`` bytes), computed on the cluster."""
        command = build_remote_command(sha256_argv(path, limit, python=self.remote_python))
        result = self.client.run_command_line(command, check=False)
        if result.exit_status == 127:  # no python3 there: coreutils
            if limit is None:
                command = build_remote_command(sha256sum_argv(path))
            else:
                command = (build_remote_command(["head", "-c", str(limit), "--", path]) + " | "
                           + build_remote_command(["sha256sum"]))
            result = self.client.run_command_line(command, check=False)
        # sha256sum marks a line whose file name it had to escape with a leading backslash
        digest = result.stdout.split(" ", 1)[0].strip().lstrip("\\")
        if result.exit_status != 0 or len(digest) != 64:
            raise RemoteCommandError(f"cannot compute the sha256 of {path} on the cluster: "
                                     f"{result.stderr.strip() or result.stdout.strip()}",
                                     command=command, exit_status=result.exit_status,
                                     stderr=result.stderr)
        return digest

    def remote_size(self, path: str) -> int | None:
        try:
            return self.client.sftp().stat(path).st_size
        except OSError as e:
            if _remote_missing(e):
                return None
            raise

    def makedirs(self, path: str) -> None:
        """``mkdir -p`` over SFTP; one round trip when the folder already exists.

        Folders it creates are 0700 (the server's umask can only take bits away): a login node
        has other users, and the workspace holds the analyst's imagery, models and results.
        Folders that exist already keep their mode."""
        if path in ("", ".", "/"):
            return
        sftp = self.client.sftp()
        try:
            attrs = sftp.stat(path)
        except OSError as e:
            if not _remote_missing(e):
                raise
            self.makedirs(posixpath.dirname(path.rstrip("/")))
            try:
                sftp.mkdir(path, mode=PRIVATE_FOLDER_MODE)
            except OSError:
                if not stat.S_ISDIR(sftp.stat(path).st_mode or 0):  # made meanwhile is fine
                    raise
            return
        if not stat.S_ISDIR(attrs.st_mode or 0):
            raise TransferError(f"{path} exists on the cluster and is not a folder")

    def walk_remote(self, path: str, *, root: str | None = None) -> Iterator[tuple[str, int]]:
        """(path, size) of every file under a remote folder (or the file itself).

        Everything listed is checked before it is yielded, since these names become local paths:
        a name that is not one plain component on every system (see
        :func:`~rs_qgis_plugin.core.jobspec.name_problem`) and any symbolic link raise
        :class:`UnsafeRemoteNameError` naming the entry. Links are refused rather than skipped:
        rs-cluster never writes one into its results, so one there means something else put it
        there, and a silently missing result would look like a cluster bug. With ``root``, the
        folders from ``root`` down to ``path`` must not be links either.
        """
        sftp = self.client.sftp()
        if root is not None:
            root = root.rstrip("/") or "/"
            rel = posixpath.relpath(path, root)
            if rel == ".." or rel.startswith("../") or posixpath.isabs(rel):
                raise UnsafeRemoteNameError(f"{path} is not inside {root} on the cluster")
            parts = [] if rel == "." else rel.split("/")
            for i in range(1, len(parts)):  # the last one is checked below
                self._refuse_link(sftp, posixpath.join(root, *parts[:i]), "/".join(parts[:i]),
                                  root)
        shown = path if root is None else posixpath.relpath(path, root)
        attrs = sftp.lstat(path)
        if stat.S_ISLNK(attrs.st_mode or 0):
            raise _link_error(shown, root)
        if not stat.S_ISDIR(attrs.st_mode or 0):
            yield path, attrs.st_size or 0
            return
        yield from self._walk_folder(sftp, path, shown, root)

    def _walk_folder(self, sftp: paramiko.SFTPClient, path: str, shown: str,
                     root: str | None) -> Iterator[tuple[str, int]]:
        try:
            entries = sftp.listdir_attr(path)
        except UnicodeDecodeError as e:
            raise UnsafeRemoteNameError(
                f"{shown} on the cluster holds a file whose name is not UTF-8 "
                f"({e.object[max(0, e.start - 20):e.end + 20]!r}); rename it there") from None
        for entry in sorted(entries, key=lambda a: a.filename):
            name = entry.filename
            problem = name_problem(name)
            if problem is not None:
                raise UnsafeRemoteNameError(
                    f"{shown} on the cluster holds a file or folder named {name!r} that "
                    f"{problem}; it is not downloaded (nor anything else of this result): "
                    "rename it there")
            child, child_shown = posixpath.join(path, name), posixpath.join(shown, name)
            mode = entry.st_mode or 0
            if stat.S_ISLNK(mode):
                raise _link_error(child_shown, root)
            if stat.S_ISDIR(mode):
                yield from self._walk_folder(sftp, child, child_shown, root)
            elif stat.S_ISREG(mode) and not name.endswith(PART_SUFFIX):
                yield child, entry.st_size or 0

    @staticmethod
    def _refuse_link(sftp: paramiko.SFTPClient, path: str, shown: str, root: str) -> None:
        if stat.S_ISLNK(sftp.lstat(path).st_mode or 0):
            raise _link_error(shown, root)

    # -- retry loop -------------------------------------------------------------------------------
    def _with_retries(self, what: str, attempt: Callable[[int], TransferResult]) -> TransferResult:
        attempts = 0
        while True:
            attempts += 1
            try:
                return attempt(attempts)
            except (CancelledError, ChecksumMismatchError):
                raise
            except (OSError, EOFError, paramiko.SSHException, RsPluginError) as e:
                if self.client.connected and not isinstance(e, EOFError):
                    raise TransferError(f"{what} failed: {e}") from e
                if attempts > self.retries:
                    raise TransferError(f"{what} failed after {attempts} attempts; the "
                                        f"connection keeps dropping: {e}") from e
                time.sleep(self.retry_delay)
                try:
                    self.client.connect()
                except HostUnreachableError:
                    continue  # counted as an attempt; try again after the delay
                # a host key or authentication error on reconnecting is not retried

    # -- upload -----------------------------------------------------------------------------------
    def upload(self, local: str | os.PathLike[str], remote: str, *,
               progress: ProgressCallback | None = None,
               cancel: CancelFlag | None = None) -> TransferResult:
        local = Path(local)
        size = local.stat().st_size
        report = _Progress(progress, size)
        sent = 0
        known: dict[str, str] = {}

        def local_digest() -> str:
            if "sha256" not in known:
                known["sha256"] = sha256_file(local, cancel=cancel).hexdigest()
            return known["sha256"]

        def attempt(number: int) -> TransferResult:
            nonlocal sent
            sftp = self.client.sftp()
            # Hash the whole local file up front only when the cluster may already have it;
            # otherwise it is hashed while it is read for sending.
            if self.remote_size(remote) == size and self.remote_sha256(remote) == local_digest():
                report(size, force=True)
                return TransferResult(str(local), remote, size, local_digest(),
                                      skipped=sent == 0, resumed_from=size, bytes_sent=sent,
                                      attempts=number)
            self.makedirs(posixpath.dirname(remote))
            part = remote + PART_SUFFIX
            offset = self.remote_size(part) or 0
            h = hashlib.sha256()
            if 0 < offset <= size:
                h = sha256_file(local, offset, cancel)
                if self.remote_sha256(part) != h.hexdigest():
                    offset, h = 0, hashlib.sha256()
            elif offset:
                offset = 0
            report(offset, force=True)
            sent_before = sent
            with sftp.open(part, "r+b" if offset else "wb", bufsize=0) as dst, \
                    open(local, "rb") as src:
                # Before the first byte: SFTP creates the file with the server's umask (often
                # 0644), and a partial file resumed now may come from an older plugin.
                dst.chmod(PRIVATE_FILE_MODE)
                follow_command = build_remote_command(
                    follow_sha256_argv(part, size, python=self.remote_python))
                follower = self.client.start_command_line(follow_command)
                try:
                    writer = _PipelinedWriter(sftp, dst.handle)
                    src.seek(offset)
                    done = offset
                    while True:
                        block = src.read(UPLOAD_READ)
                        if not block:
                            break
                        h.update(block)  # one call per megabyte: hashing stays cheap
                        for start in range(0, len(block), UPLOAD_CHUNK):
                            writer.write(done + start, block[start:start + UPLOAD_CHUNK])
                        done += len(block)
                        sent += len(block)
                        report(done)
                        _check_cancel(cancel)
                    writer.wait_all()
                except BaseException:
                    follower.close()
                    raise
            digest = known["sha256"] = h.hexdigest()
            # the hash computed on the cluster while the data arrived, else a fresh full one
            followed = self.client.collect(follower, follow_command, check=False, timeout=600)
            remote_digest = followed.stdout.strip() if followed.exit_status == 0 else ""
            if remote_digest != digest:
                remote_digest = self.remote_sha256(part)
            if done != size or remote_digest != digest:
                sftp.remove(part)
                raise ChecksumMismatchError(f"{remote}: the uploaded copy's sha256 differs from "
                                            f"{local} (did it change while uploading?); the copy "
                                            "was deleted, upload again")
            sftp.posix_rename(part, remote)
            report(size, force=True)
            return TransferResult(str(local), remote, size, digest, skipped=False,
                                  resumed_from=offset, bytes_sent=sent, attempts=number,
                                  last_attempt_bytes=sent - sent_before)

        return self._with_retries(f"upload of {local} to {remote}", attempt)

    # -- download ---------------------------------------------------------------------------------
    def download(self, remote: str, local: str | os.PathLike[str], *,
                 progress: ProgressCallback | None = None,
                 cancel: CancelFlag | None = None) -> TransferResult:
        local = Path(local)
        part = local.with_name(local.name + PART_SUFFIX)
        received = 0

        def attempt(number: int) -> TransferResult:
            nonlocal received
            sftp = self.client.sftp()
            size = sftp.stat(remote).st_size or 0
            # The cluster hashes the file while it is being sent, not before.
            remote_hash = _RemoteHash(self, remote)
            try:
                report = _Progress(progress, size)
                if local.exists() and local.stat().st_size == size and \
                        sha256_file(local, cancel=cancel).hexdigest() == remote_hash.result():
                    report(size, force=True)
                    return TransferResult(remote, str(local), size, remote_hash.result(),
                                          skipped=received == 0, resumed_from=size,
                                          bytes_sent=received, attempts=number)
                local.parent.mkdir(parents=True, exist_ok=True)
                offset = part.stat().st_size if part.exists() else 0
                h = hashlib.sha256()
                if offset:
                    h = sha256_file(part, cancel=cancel)
                    if offset > size or h.hexdigest() != self.remote_sha256(remote, offset):
                        offset, h = 0, hashlib.sha256()
                report(offset, force=True)
                received_before = received
                with sftp.open(remote, "rb") as src, \
                        open(part, "r+b" if offset else "wb") as dst:
                    src.seek(offset)
                    dst.seek(offset)
                    dst.truncate()
                    _prefetch(src, size)
                    done = offset
                    while done < size:
                        block = src.read(min(DOWNLOAD_CHUNK, size - done))
                        if not block:
                            raise TransferError(f"{remote} ended at {done} of {size} bytes")
                        dst.write(block)
                        h.update(block)
                        done += len(block)
                        received += len(block)
                        report(done)
                        _check_cancel(cancel)
                    dst.flush()
                    os.fsync(dst.fileno())
                digest = remote_hash.result()
            finally:
                remote_hash.close()
            if h.hexdigest() != digest:
                part.unlink()
                raise ChecksumMismatchError(f"{local}: the downloaded copy's sha256 differs from "
                                            f"{remote} on the cluster; it was deleted")
            os.replace(part, local)
            report(size, force=True)
            return TransferResult(remote, str(local), size, digest, skipped=False,
                                  resumed_from=offset, bytes_sent=received, attempts=number,
                                  last_attempt_bytes=received - received_before)

        return self._with_retries(f"download of {remote} to {local}", attempt)
