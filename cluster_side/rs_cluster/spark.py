"""Starting Spark for a stage: ``local[*]`` by default, a standalone or YARN master when given one.

Executors must run this very Python (the venv with rasterio, petastorm, TensorFlow), so
``PYSPARK_PYTHON`` is set to it unless the caller chose another one.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
from pathlib import Path
from typing import Any, Callable, Iterator

DEFAULT_MASTER = "local[*]"
QUIET_WARNINGS = "ignore::FutureWarning,ignore::DeprecationWarning,ignore::UserWarning:rasterio"
_LOG4J = Path(__file__).with_name("log4j2.properties")


def resolve_master(master: str | None) -> str:
    """The master a stage runs on: ``master`` if given, else the cluster settings file's, else
    ``$RS_SPARK_MASTER``, else ``local[*]`` (see :mod:`rs_cluster.settings`)."""
    from rs_cluster.settings import effective_spark

    return effective_spark(master).master


@contextlib.contextmanager
def spark_session(master: str | None = None, app_name: str = "rs-cluster",
                  conf: dict[str, str] | None = None, spark: Any = None,
                  resources: Any = None) -> Iterator[Any]:
    """Yields a SparkSession; stops it afterwards unless one was passed in as ``spark``.

    ``master`` and ``resources`` (a :class:`rs_cluster.settings.SparkResources`) are the job's
    overrides; what they leave unset comes from the cluster settings file."""
    if spark is not None:
        yield spark
        return
    from rs_cluster.settings import effective_spark

    effective = effective_spark(master, resources)  # a bad settings file stops us before the JVM
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    os.environ.setdefault("PYSPARK_DRIVER_PYTHON", sys.executable)
    # Python workers inherit this: petastorm and rasterio warn about things users cannot change.
    os.environ.setdefault("PYTHONWARNINGS", QUIET_WARNINGS)
    quiet_library_warnings()
    from pyspark.sql import SparkSession

    master = effective.master
    java_opts = f"-Dlog4j.configurationFile=file:{_LOG4J} -Dlog4j2.configurationFile=file:{_LOG4J}"
    settings = {
        "spark.ui.showConsoleProgress": "false",
        "spark.driver.memory": os.environ.get("RS_SPARK_DRIVER_MEMORY", "2g"),
        "spark.driver.extraJavaOptions": java_opts,
        "spark.executor.extraJavaOptions": java_opts,
        "spark.executorEnv.PYSPARK_PYTHON": os.environ["PYSPARK_PYTHON"],
        "spark.executorEnv.PYTHONWARNINGS": os.environ["PYTHONWARNINGS"],
        "spark.executorEnv.TF_CPP_MIN_LOG_LEVEL": os.environ.get("TF_CPP_MIN_LOG_LEVEL", "1"),
        "spark.sql.parquet.compression.codec": "snappy",
    }
    if master.startswith("local") or "127.0.0.1" in master or "localhost" in master:
        settings.update({"spark.driver.host": "127.0.0.1", "spark.driver.bindAddress": "127.0.0.1",
                         "spark.ui.enabled": "false"})
    settings.update(effective.resources.spark_conf())
    settings.update(conf or {})
    builder = SparkSession.builder.master(master).appName(app_name)
    for key, value in settings.items():
        builder = builder.config(key, value)
    session = builder.getOrCreate()
    session.sparkContext.setLogLevel("ERROR")
    try:
        yield session
    finally:
        session.stop()


def quiet_library_warnings() -> None:
    """Silences deprecation chatter of pinned libraries (petastorm on pyarrow 10) in this process."""
    import warnings

    for category in (FutureWarning, DeprecationWarning):
        warnings.filterwarnings("ignore", category=category, module=r"(petastorm|pyarrow|pyspark)(\..*)?$")
    warnings.filterwarnings("ignore", module=r"rasterio(\..*)?$", message=".*georeferenc.*")


class Poller:
    """Calls ``fn`` every ``interval`` seconds on a daemon thread until stopped (progress polling)."""

    def __init__(self, fn: Callable[[], None], interval: float = 0.5) -> None:
        self._fn = fn
        self._interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="rs-progress")

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            with contextlib.suppress(Exception):  # progress must never break the job
                self._fn()

    def __enter__(self) -> "Poller":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        with contextlib.suppress(Exception):
            self._fn()
