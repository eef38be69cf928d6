"""The cluster's own settings: one TOML file an admin writes, as ``spark-defaults.conf`` is for Spark.

The file is ``~/.rs-cluster/cluster.toml``, or the one ``$RS_CLUSTER_CONFIG`` names::

    [spark]
    master = "spark://head.example.org:7077"   # or "yarn", "local[4]"
    executor_cores = 2
    executor_memory = "4g"
    max_cores = 8                              # spark.cores.max: this product's share of the cluster
    queue = "analysts"                         # spark.yarn.queue

    [spark.conf]                               # any other Spark setting, passed on as it is
    "spark.network.timeout" = "300s"

    [storage]
    url = "s3://rs-jobs/prefix"                # or hdfs://namenode:8020/path, file:///shared/path
    credentials = "aws-profile:rs"             # or "env", "file:/etc/rs/s3.ini", "settings"
    endpoint_url = "http://store.example.org:8333"

    [jobs]
    heartbeat_timeout_s = 60                   # a job on another host is dead after this silence
    shared_workspace = false                   # true: every node mounts the workspace (NFS, ...)

A job spec, or the command line, carries overrides only: an explicit ``--master`` or resource wins
over this file, the file over ``$RS_SPARK_MASTER``, and that over ``local[*]``. The file is checked
when it is read: an unknown key or a wrong type is refused naming the file and the key. S3 keys may
be written here (``credentials = "settings"``) since it is the cluster's own file, but then only its
owner may read it, and nothing prints them.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from rs_cluster.errors import ConfigError

ENV_CONFIG = "RS_CLUSTER_CONFIG"
ENV_MASTER = "RS_SPARK_MASTER"
DEFAULT_PATH = "~/.rs-cluster/cluster.toml"
DEFAULT_MASTER = "local[*]"
DEFAULT_HEARTBEAT_TIMEOUT_S = 60.0
# Where credentials may come from; "aws-profile:NAME" and "file:/PATH" name their source.
CREDENTIAL_SOURCES = ("env", "settings", "aws-profile:", "file:")
_SECRET_KEYS = ("access_key_id", "secret_access_key")


@dataclass(frozen=True)
class SparkResources:
    """What a Spark application may take. ``None`` leaves Spark's (or the master's) default."""

    executor_cores: int | None = None
    executor_memory: str | None = None
    max_cores: int | None = None
    queue: str | None = None
    conf: tuple[tuple[str, str], ...] = ()  # extra spark.* settings, in the order given

    def __post_init__(self) -> None:
        for name in ("executor_cores", "max_cores"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                      or value < 1):
                raise ConfigError(f"{name} must be a whole number of at least 1 (got {value!r})")
        for name in ("executor_memory", "queue"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value.strip()):
                raise ConfigError(f"{name} must be a non-empty text (got {value!r})")
        object.__setattr__(self, "conf", tuple((str(k), str(v)) for k, v in self.conf))
        for key, _ in self.conf:
            check_spark_key(key, "spark conf")

    def spark_conf(self) -> dict[str, str]:
        """These resources as Spark settings; a named resource wins over the same key in ``conf``."""
        out = dict(self.conf)
        named = {"spark.executor.cores": self.executor_cores,
                 "spark.executor.memory": self.executor_memory,
                 "spark.cores.max": self.max_cores, "spark.yarn.queue": self.queue}
        out.update({k: str(v) for k, v in named.items() if v is not None})
        return out

    def over(self, base: "SparkResources") -> "SparkResources":
        """These resources where set, ``base``'s elsewhere (conf merged key by key, ours winning)."""
        conf = {**dict(base.conf), **dict(self.conf)}
        pick = {f.name: getattr(self, f.name) if getattr(self, f.name) is not None
                else getattr(base, f.name) for f in fields(self) if f.name != "conf"}
        return SparkResources(**pick, conf=tuple(conf.items()))

    def to_dict(self) -> dict[str, Any]:
        return {"executor_cores": self.executor_cores, "executor_memory": self.executor_memory,
                "max_cores": self.max_cores, "queue": self.queue, "conf": dict(self.conf)}


def check_spark_key(key: str, where: str) -> str:
    if not isinstance(key, str) or not key.startswith("spark.") or len(key) <= len("spark."):
        raise ConfigError(f"{where}: {key!r} is not a Spark setting (they start with 'spark.')")
    return key


def parse_conf_items(items: list[str] | None) -> tuple[tuple[str, str], ...]:
    """``["spark.x=1", ...]`` (repeated ``--spark-conf KEY=VALUE`` options) as pairs."""
    pairs = []
    for item in items or ():
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"--spark-conf {item!r}: give KEY=VALUE, e.g. "
                              "spark.executor.memoryOverhead=1g")
        pairs.append((check_spark_key(key.strip(), "--spark-conf"), value))
    return tuple(pairs)


@dataclass(frozen=True)
class StorageSettings:
    url: str | None = None
    credentials: str | None = None  # one of CREDENTIAL_SOURCES
    endpoint_url: str | None = None
    access_key_id: str | None = field(default=None, repr=False)
    secret_access_key: str | None = field(default=None, repr=False)

    def to_report(self) -> dict[str, Any]:
        """What ``rs-cluster env`` shows: where the keys come from, never the keys."""
        report: dict[str, Any] = {"url": self.url, "credentials": self.credentials_source(),
                                  "endpoint_url": self.endpoint_url}
        for key in _SECRET_KEYS:
            report[key] = "set" if getattr(self, key) else None
        return report

    def credentials_source(self) -> str | None:
        if self.credentials == "settings":
            return "settings file"
        return self.credentials

    def environment(self, *, executors: bool = False) -> dict[str, str]:
        """The standard AWS variables that point every AWS SDK (pyarrow's, botocore, GDAL) of a
        job's process at this store: the endpoint, the profile or the credentials file to read.
        Keys written in the settings file go only to the job's processes on this host
        (``executors=False``): handing them to executors would put them into the Spark
        configuration, which Spark logs; executors read their own node's AWS chain."""
        env: dict[str, str] = {}
        if self.endpoint_url:
            env["AWS_ENDPOINT_URL"] = self.endpoint_url
        source = self.credentials or ""
        if source.startswith("aws-profile:"):
            env["AWS_PROFILE"] = source[len("aws-profile:"):]
        elif source.startswith("file:"):
            env["AWS_SHARED_CREDENTIALS_FILE"] = source[len("file:"):]
        elif source == "settings" and not executors:
            env["AWS_ACCESS_KEY_ID"] = self.access_key_id or ""
            env["AWS_SECRET_ACCESS_KEY"] = self.secret_access_key or ""
        return env


@dataclass(frozen=True)
class ClusterSettings:
    """The settings file as read; ``path`` is None when there is none."""

    path: Path | None = None
    master: str | None = None
    resources: SparkResources = field(default_factory=SparkResources)
    storage: StorageSettings = field(default_factory=StorageSettings)
    heartbeat_timeout_s: float = DEFAULT_HEARTBEAT_TIMEOUT_S
    # The workspace is on a filesystem every node mounts at the same path (NFS, Lustre, or one
    # machine): executors see the job folder, so a remote master needs no storage.url.
    shared_workspace: bool = False


@dataclass(frozen=True)
class EffectiveSpark:
    """The master and resources a stage runs with, and where the master came from."""

    master: str
    master_source: str
    resources: SparkResources


def settings_path() -> tuple[Path, bool]:
    """The settings file to read, and whether ``$RS_CLUSTER_CONFIG`` named it (then it must exist)."""
    named = os.environ.get(ENV_CONFIG)
    return Path(named or DEFAULT_PATH).expanduser(), bool(named)


def load_settings(path: str | os.PathLike[str] | None = None) -> ClusterSettings:
    """Reads and checks the settings file; no file (where none was named) is no settings."""
    import tomllib

    if path is None:
        file, named = settings_path()
    else:
        file, named = Path(path).expanduser(), True
    try:
        with open(file, "rb") as f:
            raw = tomllib.load(f)
            mode = os.fstat(f.fileno()).st_mode
    except FileNotFoundError:
        if named:
            raise ConfigError(f"the cluster settings file {file} (${ENV_CONFIG}) does not "
                              "exist") from None
        return ClusterSettings()
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{file} is not valid TOML: {e}") from None
    except OSError as e:
        raise ConfigError(f"cannot read the cluster settings file {file}: {e.strerror}") from None
    return _parse(file, raw, mode)


def _parse(file: Path, raw: dict[str, Any], mode: int) -> ClusterSettings:
    _known(file, "", raw, {"spark", "storage", "jobs"})
    spark = _table(file, raw, "spark")
    _known(file, "spark.", spark, {"master", "executor_cores", "executor_memory", "max_cores",
                                   "queue", "conf"})
    conf = _table(file, spark, "conf", "spark.")
    for key, value in conf.items():
        if not key.startswith("spark."):
            raise ConfigError(f"{file}: [spark.conf] key {key!r} is not a Spark setting (they "
                              "start with 'spark.')")
        if isinstance(value, (dict, list)):
            raise ConfigError(f"{file}: spark.conf.{key!r} must be a text, number or boolean")
    typed = {key: _typed(file, spark, "spark.", key, kind) for key, kind in
             (("executor_cores", int), ("executor_memory", str), ("max_cores", int),
              ("queue", str))}
    try:
        resources = SparkResources(**typed, conf=tuple((k, _conf_text(v)) for k, v in conf.items()))
    except ConfigError as e:
        raise ConfigError(f"{file}: spark.{e}") from None
    master = _typed(file, spark, "spark.", "master", str)
    if master is not None and (not master.strip() or master.startswith("-")):
        raise ConfigError(f"{file}: spark.master {master!r} is not a Spark master URL")

    storage_raw = _table(file, raw, "storage")
    _known(file, "storage.", storage_raw, {"url", "credentials", "endpoint_url", *_SECRET_KEYS})
    values = {k: _typed(file, storage_raw, "storage.", k, str)
              for k in ("url", "credentials", "endpoint_url", *_SECRET_KEYS)}
    storage = _check_storage(file, StorageSettings(**values), mode)

    jobs = _table(file, raw, "jobs")
    _known(file, "jobs.", jobs, {"heartbeat_timeout_s", "shared_workspace"})
    timeout = _typed(file, jobs, "jobs.", "heartbeat_timeout_s", (int, float))
    if timeout is not None and timeout <= 0:
        raise ConfigError(f"{file}: jobs.heartbeat_timeout_s must be above 0 (got {timeout})")
    shared = jobs.get("shared_workspace", False)
    if not isinstance(shared, bool):
        raise ConfigError(f"{file}: jobs.shared_workspace must be true or false, got "
                          f"{type(shared).__name__} {shared!r}")
    return ClusterSettings(path=file, master=master, resources=resources, storage=storage,
                           heartbeat_timeout_s=float(timeout or DEFAULT_HEARTBEAT_TIMEOUT_S),
                           shared_workspace=shared)


def _check_storage(file: Path, storage: StorageSettings, mode: int) -> StorageSettings:
    source = storage.credentials
    if source is not None and not any(
            source == s or (s.endswith(":") and source.startswith(s) and len(source) > len(s))
            for s in CREDENTIAL_SOURCES):
        raise ConfigError(f"{file}: storage.credentials {source!r} is not one of \"env\", "
                          "\"settings\", \"aws-profile:NAME\" or \"file:/PATH\"")
    has_keys = any(getattr(storage, k) for k in _SECRET_KEYS)
    if has_keys and source not in (None, "settings"):
        raise ConfigError(f"{file}: storage keys are written here but storage.credentials is "
                          f"{source!r}; set it to \"settings\" or remove the keys")
    if has_keys and not all(getattr(storage, k) for k in _SECRET_KEYS):
        raise ConfigError(f"{file}: give both storage.access_key_id and storage.secret_access_key")
    if has_keys and stat.S_IMODE(mode) & 0o077:
        # The file holds a secret: refuse to use it while other users can read it.
        raise ConfigError(f"{file} holds storage keys but others may read it (mode "
                          f"{stat.S_IMODE(mode):04o}); run: chmod 600 {file}")
    if source == "settings" and not has_keys:
        raise ConfigError(f"{file}: storage.credentials is \"settings\" but the file has no "
                          "storage.access_key_id and storage.secret_access_key")
    return replace(storage, credentials="settings") if has_keys else storage


def _known(file: Path, prefix: str, table: dict[str, Any], known: set[str]) -> None:
    unknown = sorted(set(table) - known)
    if unknown:
        raise ConfigError(f"{file}: unknown setting(s) {', '.join(prefix + k for k in unknown)}; "
                          f"known in {'[' + prefix.rstrip('.') + ']' if prefix else 'the file'}: "
                          f"{', '.join(sorted(known))}")


def _table(file: Path, raw: dict[str, Any], key: str, prefix: str = "") -> dict[str, Any]:
    value = raw.get(key, {})
    if not isinstance(value, dict):
        raise ConfigError(f"{file}: {prefix}{key} must be a table ([{prefix}{key}]), "
                          f"got {type(value).__name__}")
    return value


_TYPE_NAMES = {int: "a whole number", str: "a text", (int, float): "a number"}


def _typed(file: Path, table: dict[str, Any], prefix: str, key: str, kind: Any) -> Any:
    value = table.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, kind):
        raise ConfigError(f"{file}: {prefix}{key} must be {_TYPE_NAMES[kind]}, got "
                          f"{type(value).__name__} {value!r}")
    return value


def _conf_text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"  # Spark's spelling, not Python's
    return str(value)


def effective_spark(master: str | None = None, resources: SparkResources | None = None,
                    settings: ClusterSettings | None = None) -> EffectiveSpark:
    """What a stage runs with: explicit ``master``/``resources`` (the job's or the command line's)
    over the settings file, over ``$RS_SPARK_MASTER``, over ``local[*]``."""
    if settings is None:
        settings = load_settings()
    if master:
        chosen, source = master, "job or command line (--master)"
    elif settings.master:
        chosen, source = settings.master, f"settings file {settings.path}"
    elif os.environ.get(ENV_MASTER):
        chosen, source = os.environ[ENV_MASTER], ENV_MASTER
    else:
        chosen, source = DEFAULT_MASTER, "default"
    merged = (resources or SparkResources()).over(settings.resources)
    return EffectiveSpark(master=chosen, master_source=source, resources=merged)


def report(settings: ClusterSettings | None = None) -> dict[str, Any]:
    """The effective settings for ``rs-cluster env``, secrets replaced by where they come from."""
    if settings is None:
        settings = load_settings()
    path, _ = settings_path()
    spark = effective_spark(settings=settings)
    if spark.master_source == "default":
        where = (f"{DEFAULT_MASTER} on the login host: no Spark master is set (no settings file "
                 f"{path} with spark.master, no ${ENV_MASTER})")
    elif spark.master.startswith("local"):
        where = f"{spark.master} on the login host (from {spark.master_source})"
    else:
        where = f"Spark master {spark.master} (from {spark.master_source})"
    return {"settings_file": str(settings.path) if settings.path else None,
            "settings_file_looked_for": str(path),
            "master": spark.master, "master_source": spark.master_source, "runs_on": where,
            "resources": spark.resources.to_dict(), "storage": settings.storage.to_report(),
            "heartbeat_timeout_s": settings.heartbeat_timeout_s,
            "shared_workspace": settings.shared_workspace}


# -- the stages' command-line overrides --------------------------------------------------------------

def add_resource_options(parser: Any) -> None:
    """``--executor-cores`` and the other resource overrides of a Spark stage (argparse)."""
    group = parser.add_argument_group(
        "Spark resources", "overrides of the cluster settings file (rs-cluster env shows them)")
    group.add_argument("--executor-cores", type=int, metavar="N", help="cores of each executor")
    group.add_argument("--executor-memory", metavar="SIZE", help="memory of each executor, e.g. 4g")
    group.add_argument("--max-cores", type=int, metavar="N",
                       help="most cores the job takes on a shared cluster (spark.cores.max)")
    group.add_argument("--queue", metavar="NAME", help="YARN queue (spark.yarn.queue)")
    group.add_argument("--spark-conf", action="append", metavar="KEY=VALUE",
                       help="any other spark.* setting; repeat for more")


def resources_from_args(args: Any) -> SparkResources:
    return SparkResources(executor_cores=args.executor_cores, executor_memory=args.executor_memory,
                          max_cores=args.max_cores, queue=args.queue,
                          conf=parse_conf_items(args.spark_conf))
