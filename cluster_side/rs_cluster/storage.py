"""Storage locations: the one module where a location becomes a filesystem and a path.

A location is a plain path, a ``file://`` URL (a disk, or a POSIX filesystem every node mounts),
an ``s3://bucket/prefix`` URL (any S3-compatible store) or an ``hdfs://namenode:port/path`` URL.
:func:`url_to_fs` resolves it, the way fsspec's ``url_to_fs`` and pyarrow's
``FileSystem.from_uri`` do; every stage goes through it and never builds a ``Path`` from a
location that may be remote.

S3 settings come from where every AWS tool looks, never from a job spec: the endpoint from
``$AWS_ENDPOINT_URL_S3`` / ``$AWS_ENDPOINT_URL`` or ``endpoint_url`` in ``~/.aws/config``
(``$AWS_CONFIG_FILE``, profile ``$AWS_PROFILE``), the region from ``$AWS_REGION`` /
``$AWS_DEFAULT_REGION`` or that file, and the credentials from the AWS SDK's own chain
(``$AWS_ACCESS_KEY_ID``/``$AWS_SECRET_ACCESS_KEY``, then ``~/.aws/credentials``), read by each
process on its own host. So executors get their keys from their node, and no key travels in a
task, an event or a log line.

``hdfs://namenode:port/path`` goes to hdfs-native (HDFS's RPC and data-transfer protocols, no JVM
and no libhdfs.so), configured the Hadoop way: ``$HADOOP_CONF_DIR`` (core-site.xml, hdfs-site.xml)
on each host; ``hdfs:///path`` means the configuration's ``fs.defaultFS``. pyarrow's own HDFS
client would need Hadoop's native library, which no Maven artifact ships. Spark's JVM uses its
own Hadoop client with the same configuration. Tested against real NameNode and DataNode daemons
(tests/hadoop).

Code that needs a local file (GDAL, Keras) uses :func:`local_input` and :func:`local_output`: the
path itself for local locations, else a copy in this host's ``$TMPDIR`` (downloaded first, or
uploaded once the block succeeds). Failures raise :class:`StorageError` naming the URL.
"""

from __future__ import annotations

import configparser
import contextlib
import functools
import json
import os
import posixpath
import re
import shutil
import tempfile
import time
from dataclasses import dataclass
from typing import Any, Iterator
from urllib.parse import unquote, urlparse

from rs_cluster.atomic import fsync_dir
from rs_cluster.atomic import replace_dir as atomic_replace_dir
from rs_cluster.errors import StorageError

S3_SCHEMES = ("s3", "s3a")  # s3a: what Hadoop calls the same store
HDFS_SCHEMES = ("hdfs",)
DEFAULT_REGION = "us-east-1"  # what the AWS SDKs assume; S3-compatible stores mostly ignore it
TEMP_PREFIX = "rs-cluster-"
_CHUNK = 8 * 1024 * 1024


# -- locations -------------------------------------------------------------------------------------

def is_url(location: str) -> bool:
    scheme = urlparse(str(location)).scheme
    return len(scheme) > 1  # "C:" on Windows is a drive, not a scheme


def to_url(location: str | os.PathLike[str]) -> str:
    location = str(location)
    if is_url(location):
        return location.rstrip("/")
    return "file://" + os.path.abspath(location)


def local_path(location: str | os.PathLike[str]) -> str | None:
    """The local path of a plain path or ``file://`` URL; None for any other filesystem."""
    location = str(location)
    if not is_url(location):
        return os.path.abspath(location)
    parsed = urlparse(location)
    return unquote(parsed.path) if parsed.scheme == "file" else None


_local_path = local_path  # the name this module used before


def is_local(location: str | os.PathLike[str]) -> bool:
    """Whether ``location`` is on a filesystem this process reads with plain file calls."""
    return local_path(location) is not None


def join(url: str, *parts: str) -> str:
    if not is_url(url):
        return os.path.join(url, *parts)
    return posixpath.join(url, *parts)


def basename(location: str) -> str:
    return posixpath.basename(str(location).rstrip("/")) if is_url(str(location)) \
        else os.path.basename(str(location).rstrip(os.sep))


def parent(location: str) -> str:
    location = str(location).rstrip("/")
    return location.rsplit("/", 1)[0] if is_url(location) else os.path.dirname(location)


def sibling(location: str, name: str) -> str:
    """``name`` in the folder that holds ``location``."""
    return join(parent(location), name)


# -- S3 settings -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class S3Settings:
    """Where the S3 store is: no credentials here (the AWS SDKs find those themselves)."""

    endpoint_url: str | None = None  # e.g. http://store:8333; None: AWS itself
    region: str = DEFAULT_REGION

    @property
    def scheme(self) -> str:
        return urlparse(self.endpoint_url).scheme or "https" if self.endpoint_url else "https"

    @property
    def endpoint_host(self) -> str | None:
        """host:port, what pyarrow's ``endpoint_override`` wants."""
        if not self.endpoint_url:
            return None
        parsed = urlparse(self.endpoint_url)
        return parsed.netloc or parsed.path


def _aws_config_profile() -> dict[str, str]:
    """The active profile's section of ``~/.aws/config`` (or ``$AWS_CONFIG_FILE``), flattened:
    a nested ``s3 =`` block's keys come as ``s3.<key>``."""
    path = os.environ.get("AWS_CONFIG_FILE") or os.path.expanduser("~/.aws/config")
    profile = os.environ.get("AWS_PROFILE") or os.environ.get("AWS_DEFAULT_PROFILE") or "default"
    parser = configparser.RawConfigParser()
    try:
        parser.read(path, encoding="utf-8")
    except (OSError, configparser.Error) as e:
        raise StorageError(f"{path}: cannot read the AWS config file ({e})") from None
    section = profile if profile == "default" else f"profile {profile}"
    if not parser.has_section(section):
        return {}
    out: dict[str, str] = {}
    for key, value in parser.items(section):
        if value.startswith("\n") or (value == "" and key == "s3"):
            for line in value.splitlines():
                if "=" in line:
                    sub, subvalue = line.split("=", 1)
                    out[f"{key}.{sub.strip()}"] = subvalue.strip()
        else:
            out[key] = value.strip()
    return out


def s3_settings() -> S3Settings:
    """The S3 endpoint and region from the standard AWS variables, else the AWS config file."""
    config = _aws_config_profile()
    endpoint = (os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
                or config.get("s3.endpoint_url") or config.get("endpoint_url") or None)
    region = (os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
              or config.get("region") or DEFAULT_REGION)
    return S3Settings(endpoint_url=endpoint, region=region)


_S3_CACHE: dict[S3Settings, Any] = {}


def _s3_filesystem(settings: S3Settings):
    from pyarrow import fs

    if settings not in _S3_CACHE:
        # No keys passed: the AWS SDK's default chain reads them on this host (env, then
        # ~/.aws/credentials), so no key is ever held in an argument that could be pickled.
        _S3_CACHE[settings] = fs.S3FileSystem(
            region=settings.region, scheme=settings.scheme,
            endpoint_override=settings.endpoint_host, connect_timeout=5, request_timeout=30)
    return _S3_CACHE[settings]


def url_to_fs(location: str | os.PathLike[str]):
    """(pyarrow filesystem, path inside it) for a location: a path, file://, s3:// or hdfs://."""
    from pyarrow import fs

    location = str(location)
    local = local_path(location)
    if local is not None:
        return fs.LocalFileSystem(), local
    parsed = urlparse(location)
    if parsed.scheme in S3_SCHEMES:
        if not parsed.netloc:
            raise StorageError(f"{location}: an S3 URL needs a bucket (s3://bucket/prefix)")
        return _s3_filesystem(s3_settings()), f"{parsed.netloc}{parsed.path}".rstrip("/")
    if parsed.scheme in HDFS_SCHEMES:
        return _hdfs_filesystem(location), _hdfs_path(parsed)
    with storage_errors(location, "opening"):
        return fs.FileSystem.from_uri(location)


def _hdfs_path(parsed) -> str:
    return unquote(parsed.path).rstrip("/") or "/"


HDFS_DEFAULT_PORT = 8020
NAMENODE_CONNECT_TIMEOUT_S = 10.0


def hdfs_fsspec(location: str):
    """The fsspec filesystem (hdfs-native) of an ``hdfs://`` location, for Petastorm.

    The NameNode is dialled first: hdfs-native retries a refused connection without end, so a
    NameNode that is down would hang the stage instead of failing it with its name."""
    import socket

    parsed = urlparse(str(location))
    if parsed.hostname:
        port = parsed.port or HDFS_DEFAULT_PORT
        try:
            socket.create_connection((parsed.hostname, port),
                                     timeout=NAMENODE_CONNECT_TIMEOUT_S).close()
        except OSError as e:
            raise StorageError(f"{location}: the HDFS NameNode at {parsed.hostname}:{port} cannot "
                               f"be reached ({e.strerror or e}); check that it runs and the "
                               f"URL's host and port") from None
    with storage_errors(location, "connecting to its NameNode"):
        from hdfs_native.fsspec import HdfsFileSystem

        return HdfsFileSystem(host=parsed.hostname, port=parsed.port)


def _hdfs_filesystem(location: str):
    from pyarrow import fs

    return fs.PyFileSystem(_listing_handler()(hdfs_fsspec(location)))


@functools.lru_cache(maxsize=None)
def _listing_handler() -> type:
    """pyarrow's FSSpecHandler with folder listings that leave the folder itself out (pyarrow 10
    keeps it: fsspec's ``find(withdirs=True)`` includes it). Built once, on first use, so that
    importing this module does not import pyarrow."""
    from pyarrow import fs

    class ListingHandler(fs.FSSpecHandler):
        def get_file_info_selector(self, selector):
            base = selector.base_dir.rstrip("/") or "/"
            return [i for i in super().get_file_info_selector(selector)
                    if (i.path.rstrip("/") or "/") != base]

    return ListingHandler


filesystem = url_to_fs  # the name this module used before


def fsspec_options(location: str) -> dict[str, Any] | None:
    """``storage_options`` for fsspec (Petastorm reads s3:// through s3fs): the endpoint and
    region only; s3fs's botocore finds the credentials on its own host, as pyarrow's SDK does."""
    if urlparse(str(location)).scheme not in S3_SCHEMES:
        return None
    settings = s3_settings()
    client: dict[str, Any] = {"region_name": settings.region}
    if settings.endpoint_url:
        client["endpoint_url"] = settings.endpoint_url
    return {"client_kwargs": client}


def petastorm_url(location: str) -> str:
    """The URL Petastorm wants: a file:// URL for a local path, s3a:// as s3://."""
    url = to_url(location)
    return "s3://" + url[len("s3a://"):] if url.startswith("s3a://") else url


def petastorm_filesystem(location: str):
    """The filesystem Petastorm's readers get for ``location`` (None: they resolve it, s3://
    through s3fs with :func:`fsspec_options`); hdfs:// gets hdfs-native, not Petastorm's libhdfs."""
    if urlparse(str(location)).scheme in HDFS_SCHEMES:
        return hdfs_fsspec(location)
    return None


def petastorm_fs_factory(location: str):
    """A picklable filesystem factory for Petastorm's ``materialize_dataset`` (None: its own)."""
    if urlparse(str(location)).scheme in HDFS_SCHEMES:
        return _HdfsFsFactory(str(location))
    options = fsspec_options(location)
    if options is None:
        return None
    return _S3FsFactory(options)


@dataclass(frozen=True)
class _HdfsFsFactory:
    location: str

    def __call__(self):
        return hdfs_fsspec(self.location)


@dataclass(frozen=True)
class _S3FsFactory:
    options: dict[str, Any]

    def __call__(self):
        import s3fs

        return s3fs.S3FileSystem(**self.options)


# -- errors ----------------------------------------------------------------------------------------

# Matched against the message in lower case without "_" (AWS_ERROR vs AwsError spellings).
_DENIED = ("accessdenied", "access denied", "invalidaccesskeyid", "signaturedoesnotmatch",
           "forbidden", "http status 403", "permission denied", "no credentials",
           "nocredentials", "unable to locate credentials", "expiredtoken")
_NOT_FOUND = ("nosuchbucket", "nosuchkey", "notfound", "no such file", "does not exist",
              "http status 404")
_UNREACHABLE = ("networkconnection", "connection refused", "couldn't connect", "could not connect",
                "curlcode", "timed out", "timeout", "unreachable", "name or service not known",
                "failed to connect", "connection reset", "endpointconnectionerror")


def _redact(text: str) -> str:
    """The message with any credential this process holds blanked out, to be sure."""
    for name in ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"):
        secret = os.environ.get(name)
        if secret and len(secret) >= 4:
            text = text.replace(secret, "***")
    return text


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return (text.splitlines()[0] if text else type(e).__name__)[:300]


def storage_error(location: str, exc: BaseException, doing: str = "accessing") -> StorageError:
    """A one-line error naming ``location`` and what went wrong, never a credential."""
    if isinstance(exc, StorageError):
        return exc
    text = str(exc).lower().replace("_", "")
    scheme = urlparse(str(location)).scheme
    is_s3 = scheme in S3_SCHEMES
    if scheme in HDFS_SCHEMES and "safemode" in text.replace(" ", ""):
        message = (f"{location}: the HDFS NameNode is in safe mode (read-only) while {doing}; "
                   f"wait for it to leave safe mode or ask the cluster's administrator")
    elif any(m in text for m in _DENIED) or isinstance(exc, PermissionError):
        hint = ("check this host's S3 credentials ($AWS_ACCESS_KEY_ID/$AWS_SECRET_ACCESS_KEY or "
                "~/.aws/credentials) and that they may use this bucket") if is_s3 else \
            "check the permissions of this location"
        message = f"{location}: access denied while {doing}; {hint}"
    elif any(m in text for m in _UNREACHABLE):
        where = f" at {s3_settings().endpoint_url or 'AWS'}" if is_s3 else \
            " (an HDFS NameNode or DataNode)" if scheme in HDFS_SCHEMES else ""
        message = (f"{location}: the storage service{where} cannot be reached while {doing} "
                   f"({_first_line(exc)}); check that it runs and the endpoint setting")
    elif isinstance(exc, FileNotFoundError) or any(m in text for m in _NOT_FOUND):
        message = f"{location}: not found while {doing}"
    else:
        message = f"{location}: storage failed while {doing} ({type(exc).__name__}: {_first_line(exc)})"
    return StorageError(_redact(message))


@contextlib.contextmanager
def storage_errors(location: str, doing: str = "accessing") -> Iterator[None]:
    """Turns a filesystem failure inside the block into a :class:`StorageError` naming
    ``location``; errors of our own and a full disk pass through unchanged."""
    from rs_cluster.errors import RsClusterError, is_disk_full

    try:
        yield
    except RsClusterError:
        raise
    except OSError as e:
        if is_disk_full(e):
            raise
        raise storage_error(location, e, doing) from None
    except RuntimeError as e:
        # hdfs-native reports the NameNode's answers (safe mode, leases, a refused connection
        # inside its RPC layer) as RuntimeError.
        if urlparse(str(location)).scheme not in HDFS_SCHEMES:
            raise
        raise storage_error(location, e, doing) from None


# -- queries and small files -----------------------------------------------------------------------

def exists(url: str) -> bool:
    from pyarrow import fs

    filesys, path = url_to_fs(url)
    with storage_errors(url, "looking it up"):
        return filesys.get_file_info(path).type != fs.FileType.NotFound


def is_dir(url: str) -> bool:
    from pyarrow import fs

    filesys, path = url_to_fs(url)
    with storage_errors(url, "looking it up"):
        return filesys.get_file_info(path).type == fs.FileType.Directory


def is_file(url: str) -> bool:
    from pyarrow import fs

    filesys, path = url_to_fs(url)
    with storage_errors(url, "looking it up"):
        return filesys.get_file_info(path).type == fs.FileType.File


def is_nonempty_dir(url: str) -> bool:
    from pyarrow import fs

    filesys, path = url_to_fs(url)
    with storage_errors(url, "looking it up"):
        info = filesys.get_file_info(path)
        if info.type == fs.FileType.NotFound:
            return False
        if info.type != fs.FileType.Directory:
            return True
        return bool(filesys.get_file_info(fs.FileSelector(path, recursive=False)))


def list_dir(url: str) -> list[tuple[str, bool]]:
    """(name, is a file) of every entry directly in folder ``url``, sorted by name."""
    from pyarrow import fs

    filesys, path = url_to_fs(url)
    with storage_errors(url, "listing it"):
        infos = filesys.get_file_info(fs.FileSelector(path, recursive=False))
    return sorted((posixpath.basename(i.path.rstrip("/")), i.type == fs.FileType.File)
                  for i in infos)


def make_dirs(url: str) -> None:
    """Creates folder ``url`` and its parents; nothing on object stores, where folders are only
    key prefixes (pyarrow would write empty "folder/" objects that other S3 clients list as
    files, and Petastorm's dataset reader then takes them for empty Parquet files)."""
    if not renames(url):
        return
    filesys, path = url_to_fs(url)
    with storage_errors(url, "creating it"):
        filesys.create_dir(path, recursive=True)


def delete_dir(url: str) -> None:
    filesys, path = url_to_fs(url)
    if exists(url):
        with storage_errors(url, "deleting it"):
            filesys.delete_dir(path)


def delete_file(url: str) -> None:
    filesys, path = url_to_fs(url)
    if exists(url):
        with storage_errors(url, "deleting it"):
            filesys.delete_file(path)


def read_bytes(url: str) -> bytes:
    filesys, path = url_to_fs(url)
    with storage_errors(url, "reading it"), filesys.open_input_stream(path) as f:
        return f.read()


# How long a write to HDFS is retried while it fails on a DataNode: a block placed on one that has
# just died fails (hdfs-native does not rebuild a pipeline around its first DataNode) until the
# NameNode stops choosing it, once it counts as dead, or as stale with
# dfs.namenode.avoid.write.stale.datanode (30 s by default).
HDFS_WRITE_RETRY_S = float(os.environ.get("RS_HDFS_WRITE_RETRY_S", "90"))


def _writing(url: str, write: Any) -> None:
    """Runs ``write()``, a whole write that may be repeated; to HDFS, again with a growing pause
    while a DataNode fails it (see :data:`HDFS_WRITE_RETRY_S`), never for the NameNode's own
    refusals (safe mode, permissions), which repeating does not change."""
    if urlparse(str(url)).scheme not in HDFS_SCHEMES:
        write()
        return
    deadline, pause = time.monotonic() + HDFS_WRITE_RETRY_S, 1.0
    while True:
        try:
            write()
            return
        except (OSError, RuntimeError) as e:
            text = str(e).lower().replace(" ", "")
            refused = any(m in text for m in ("safemode", "permission", "accesscontrol",
                                              "quota"))
            if refused or isinstance(e, (FileNotFoundError, PermissionError)) or \
                    time.monotonic() + pause > deadline or not _namenode_answers(url):
                raise
        time.sleep(pause)
        pause = min(pause * 2, 10.0)


def _namenode_answers(url: str) -> bool:
    """Whether the NameNode of ``url`` answers: then a failed write was a DataNode's (one that
    died), worth writing again; a NameNode that is down is reported at once."""
    try:
        filesys, _ = url_to_fs(url)
        filesys.get_file_info("/")
        return True
    except (OSError, RuntimeError):
        return False


def write_bytes(url: str, data: bytes) -> None:
    """Writes ``data`` whole: through a temporary name and a rename on file systems that rename,
    in one PUT on object stores (an object appears complete or not at all)."""
    filesys, path = url_to_fs(url)
    with storage_errors(url, "writing it"):
        if not renames(url):
            with filesys.open_output_stream(path) as f:
                f.write(data)
            return
        filesys.create_dir(posixpath.dirname(path), recursive=True)
        tmp = posixpath.join(posixpath.dirname(path),
                             f".{posixpath.basename(path)}.tmp-{os.getpid()}")

        def write() -> None:
            with filesys.open_output_stream(tmp) as f:
                f.write(data)

        _writing(url, write)
        replace_file(filesys, tmp, path)
    local = local_path(url)
    if local is not None:
        fsync_dir(os.path.dirname(local))


def replace_file(filesys: Any, src: str, dst: str) -> None:
    """Renames the file ``src`` onto ``dst`` in one step, replacing a file there: POSIX's rename
    does; HDFS's plain rename refuses an existing target, its rename with OVERWRITE replaces it
    (a retried task's complete file must replace its first attempt's, never sit beside it)."""
    inner = getattr(getattr(filesys, "handler", None), "fs", None)
    if type(inner).__module__.startswith("hdfs_native"):
        inner.mv(src, dst, overwrite=True)
    else:
        filesys.move(src, dst)


def read_json(url: str) -> Any:
    return json.loads(read_bytes(url).decode("utf-8"))


def write_json(url: str, data: Any) -> None:
    """Writes JSON whole (see :func:`write_bytes`)."""
    write_bytes(url, (json.dumps(data, indent=2, default=str) + "\n").encode("utf-8"))


def renames(url: str) -> bool:
    """Whether the filesystem renames atomically (disks, HDFS) rather than copying (S3)."""
    return urlparse(str(url)).scheme not in S3_SCHEMES


# -- moving and copying ----------------------------------------------------------------------------

def copy_tree(src_url: str, dst_url: str) -> None:
    """Copies a file or a folder's tree from ``src_url`` to ``dst_url``, across filesystems."""
    from pyarrow import fs

    src_fs, src = url_to_fs(src_url)
    dst_fs, dst = url_to_fs(dst_url)
    with storage_errors(src_url, f"copying it to {dst_url}"):
        info = src_fs.get_file_info(src)
        if info.type == fs.FileType.NotFound:
            raise FileNotFoundError(src)
        dirs = renames(dst_url)  # no empty "folder/" objects in a store (see make_dirs)
        if info.type == fs.FileType.File:
            files = [(src, dst)]
        else:
            if dirs:
                dst_fs.create_dir(dst, recursive=True)
            files = []
            for entry in src_fs.get_file_info(fs.FileSelector(src, recursive=True)):
                rel = posixpath.relpath(entry.path, src)
                if entry.type == fs.FileType.Directory and dirs:
                    dst_fs.create_dir(posixpath.join(dst, rel), recursive=True)
                elif entry.type == fs.FileType.File and not rel.endswith("/"):
                    files.append((entry.path, posixpath.join(dst, rel)))
        # File by file, not pyarrow.fs.copy_files: with threads, pyarrow 10's copy_files hangs on
        # S3 for trees of a few files.
        for src_file, dst_file in files:
            if dirs:
                dst_fs.create_dir(posixpath.dirname(dst_file), recursive=True)

            def copy(src_file: str = src_file, dst_file: str = dst_file) -> None:
                with src_fs.open_input_stream(src_file) as fin, \
                        dst_fs.open_output_stream(dst_file) as fout:
                    while chunk := fin.read(_CHUNK):
                        fout.write(chunk)

            _writing(dst_url, copy)


def move(src_url: str, dst_url: str) -> None:
    filesys, src = url_to_fs(src_url)
    _, dst = url_to_fs(dst_url)
    if not renames(src_url) and is_dir(src_url):
        # Object stores have no folders to rename: copy every object, then drop the originals.
        copy_tree(src_url, dst_url)
        delete_dir(src_url)
        return
    with storage_errors(src_url, f"moving it to {dst_url}"):
        filesys.move(src, dst)
    local = local_path(dst_url)
    if local is not None:
        fsync_dir(os.path.dirname(local))  # the rename is durable only once its folder is flushed


def replace_dir(new_url: str, url: str, *, commit_file: str | None = None) -> None:
    """Puts the complete folder ``new_url`` at ``url``, replacing any folder there, so that a run
    killed at any point leaves a whole folder at ``url``: see :func:`rs_cluster.atomic.replace_dir`
    (local disks). Elsewhere the old folder is renamed aside first, put back if the new one cannot
    be moved in, and deleted only once the new one is in place.

    Object stores rename nothing: there the old folder's ``commit_file`` (the file whose presence
    says the folder is complete, e.g. ``dataset.json``) goes first, then the old folder, then the
    new objects are copied in with ``commit_file`` last. A run killed midway leaves a folder
    without ``commit_file``, which readers refuse as incomplete, never a mix that looks whole."""
    new_local, local = local_path(new_url), local_path(url)
    if new_local is not None and local is not None:
        atomic_replace_dir(new_local, local)
        return
    if not renames(url):
        if commit_file:
            delete_file(join(url, commit_file))
        delete_dir(url)
        marker = join(new_url, commit_file) if commit_file else None
        if marker and exists(marker):
            tmp_marker = join(parent(new_url), f".{basename(new_url)}.{commit_file}")
            move(marker, tmp_marker)
            copy_tree(new_url, url)
            copy_tree(tmp_marker, join(url, commit_file))
            delete_file(tmp_marker)
        else:
            copy_tree(new_url, url)
        delete_dir(new_url)
        return
    if not exists(url):
        move(new_url, url)
        return
    old = sibling(url, f".{basename(url)}.old-{os.getpid()}-{time.time_ns()}")
    move(url, old)
    try:
        move(new_url, url)
    except BaseException:
        move(old, url)
        raise
    delete_dir(old)


# -- local copies ----------------------------------------------------------------------------------

def temp_dir(prefix: str = TEMP_PREFIX) -> str:
    """A new private folder in this host's temporary folder ($TMPDIR), never a shared one."""
    return tempfile.mkdtemp(prefix=prefix)


@contextlib.contextmanager
def local_input(url: str, *, sidecars: bool = False) -> Iterator[str]:
    """A local path holding ``url`` (a file or a folder) for the block: the path itself when it
    is local, else a download into this host's $TMPDIR, deleted afterwards. ``sidecars`` also
    fetches a raster's sidecar files (``name.tif.aux.xml``, ``name.tfw`` ...) beside it."""
    local = local_path(url)
    if local is not None:
        yield local
        return
    tmp = temp_dir()
    try:
        yield download(url, tmp, sidecars=sidecars)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def gdal_path(url: str) -> Iterator[str]:
    """A name GDAL opens ``url`` by, for reading a header or a few windows without a download:
    the path itself when local, ``/vsis3/bucket/key`` with this host's S3 endpoint set for GDAL
    (GDAL finds the credentials itself, as the AWS SDKs do), else a local copy."""
    parsed = urlparse(str(url))
    if is_local(url) or parsed.scheme not in S3_SCHEMES:
        with local_input(url, sidecars=True) as path:
            yield path
        return
    import rasterio

    settings = s3_settings()
    options = {"AWS_REGION": settings.region, "AWS_VIRTUAL_HOSTING": "FALSE"}
    if settings.endpoint_host:
        options["AWS_S3_ENDPOINT"] = settings.endpoint_host
        options["AWS_HTTPS"] = "YES" if settings.scheme == "https" else "NO"
    with rasterio.Env(**options):
        yield f"/vsis3/{parsed.netloc}{parsed.path}"


def download(url: str, folder: str, *, sidecars: bool = False) -> str:
    """Copies ``url`` (a file or a folder) into local ``folder``; returns the local copy's path."""
    from rs_cluster.formats import is_sidecar

    name = basename(url) or "root"
    target = os.path.join(folder, name)
    if not exists(url):
        raise StorageError(f"{url}: not found")
    copy_tree(url, target)
    if sidecars and is_file(url):
        stem = name.rsplit(".", 1)[0]
        for other, is_a_file in list_dir(parent(url)):
            if is_a_file and other != name and (other.startswith(name + ".") or
                                                 other.startswith(stem + ".")) and is_sidecar(other):
                copy_tree(sibling(url, other), os.path.join(folder, other))
    return target


@contextlib.contextmanager
def local_output(url: str) -> Iterator[str]:
    """A local path to write ``url``'s content at (a file, or a folder the block creates); on
    success it is put at ``url`` whole: renamed there on local disks, uploaded elsewhere (each
    object in one PUT). On failure nothing appears at ``url``."""
    local = local_path(url)
    if local is not None:
        os.makedirs(os.path.dirname(local), exist_ok=True)
        tmp = os.path.join(os.path.dirname(local),
                           f".{os.path.basename(local)}.tmp-{os.getpid()}-{time.time_ns()}")
        try:
            yield tmp
            if os.path.isdir(tmp):
                atomic_replace_dir(tmp, local)
            elif os.path.exists(tmp):
                os.replace(tmp, local)
                fsync_dir(os.path.dirname(local))
        finally:
            if os.path.isdir(tmp):
                shutil.rmtree(tmp, ignore_errors=True)
            elif os.path.exists(tmp):
                os.unlink(tmp)
        return
    folder = temp_dir()
    try:
        tmp = os.path.join(folder, basename(url) or "out")
        yield tmp
        if os.path.exists(tmp):
            copy_tree(to_url(tmp), url)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def upload(local: str, url: str) -> None:
    """Copies local file or folder ``local`` to ``url``."""
    copy_tree(to_url(local), url)


# -- the job runner's staging ----------------------------------------------------------------------

_SAFE_NAME = re.compile(r"^[A-Za-z0-9._-]+$")


def job_url(storage_url: str, user: str, job_id: str) -> str:
    """``<storage>/<user>/<job-id>``: where a job's inputs and results live while it runs (the
    user keeps two users' job ids apart in one shared store)."""
    for what, name in (("user name", user), ("job id", job_id)):
        if not _SAFE_NAME.match(name) or name in (".", ".."):
            raise StorageError(f"{name!r}: not a {what} usable in a storage URL")
    return join(storage_url.rstrip("/"), user, job_id)


def stage_inputs(job_dir: str, storage_job_url: str, names: tuple[str, ...] = ("inputs",)) -> None:
    """Copies the job folder's uploaded inputs (``names`` in ``job_dir``) to the job's storage
    URL, so executors on any node read them there."""
    for name in names:
        src = os.path.join(job_dir, name)
        if os.path.exists(src):
            upload(src, join(storage_job_url, name))


def fetch_results(storage_job_url: str, job_dir: str, paths: tuple[str, ...] | list[str]) -> list[str]:
    """Copies each of ``paths`` (relative to the job's storage URL) that exists back into the job
    folder; returns those copied. All of them are downloaded into a hidden folder of the job
    folder first, and put at their names only once every one is complete: a store that fails
    midway leaves none of them, not a set that looks whole."""
    found = [rel for rel in paths if exists(join(storage_job_url, rel))]
    if not found:
        return []
    staging = os.path.join(job_dir, f".fetch-{os.getpid()}-{time.time_ns()}")
    try:
        for n, rel in enumerate(found):
            download_to(join(storage_job_url, rel), os.path.join(staging, str(n)))
        for n, rel in enumerate(found):
            src, dst = os.path.join(staging, str(n)), os.path.join(job_dir, rel)
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            if os.path.isdir(src):
                atomic_replace_dir(src, dst)
            else:
                os.replace(src, dst)
                fsync_dir(os.path.dirname(dst))
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return found


def download_to(url: str, target: str) -> None:
    """Copies ``url`` (a file or a folder) to the local path ``target``."""
    copy_tree(url, to_url(target))
