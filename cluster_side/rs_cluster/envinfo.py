"""What this cluster node runs: versions of the stack and the GPUs, for ``rs-cluster env``.

Versions come from installed package metadata, so nothing heavy (TensorFlow) is imported; a missing
package is reported as ``null`` rather than failing, since the plugin shows this as a checklist.
"""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import sys
from importlib import metadata
from typing import Any

from rs_cluster import __version__


def package_version(*names: str) -> str | None:
    for name in names:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return None


def gpus() -> list[dict[str, str]]:
    """GPUs that ``nvidia-smi`` lists; empty where there is none (or no driver)."""
    smi = shutil.which("nvidia-smi")
    if not smi:
        return []
    try:
        out = subprocess.run([smi, "--query-gpu=name,memory.total,driver_version",
                              "--format=csv,noheader"], capture_output=True, text=True,
                             timeout=20, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    found = []
    for line in out.splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) == 3:
            found.append({"name": parts[0], "memory": parts[1], "driver": parts[2]})
    return found


def java_version() -> str | None:
    java = shutil.which("java")
    if not java:
        return None
    try:
        proc = subprocess.run([java, "-version"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return None
    first = (proc.stderr or proc.stdout).splitlines()
    return first[0].strip() if first else None


def environment() -> dict[str, Any]:
    return {
        "python": platform.python_version(),
        "python_executable": sys.executable,
        "platform": platform.platform(),
        "rs_cluster": __version__,
        "spark": package_version("pyspark"),
        "horovod": package_version("horovod"),
        "tensorflow": package_version("tensorflow", "tensorflow-cpu", "tensorflow-gpu"),
        "petastorm": package_version("petastorm"),
        "rasterio": package_version("rasterio"),
        "java": java_version(),
        "gpus": gpus(),
    }


# -- rs-cluster env --probe ------------------------------------------------------------------------

_PROBE_TIMEOUT_S = 10.0
_TASKS_TIMEOUT_S = 120.0


def probe() -> dict[str, Any]:
    """Checks what the settings promise, with a tiny Spark job: the master answers, executors
    start this very Python and import TensorFlow and Horovod there, and the storage URL can be
    written, read and deleted from this host and from every executor (a small probe object).

    Returns the findings and ``problems``: one line each, naming what failed; none means ready.
    """
    import getpass

    from rs_cluster import storage
    from rs_cluster.settings import effective_spark, load_settings

    settings = load_settings()
    spark = effective_spark(settings=settings)
    problems: list[str] = []
    found: dict[str, Any] = {"master": spark.master, "storage_url": settings.storage.url}
    probe_url = None
    if settings.storage.url:
        os.environ.update(settings.storage.environment())
        probe_url = storage.join(settings.storage.url.rstrip("/"), getpass.getuser(), ".rs-probe")
        found["storage_here"] = _storage_probe(probe_url, "login")
        if found["storage_here"] != "ok":
            problems.append(found["storage_here"])
    elif not spark.master.startswith("local"):
        problems.append(f"no storage.url in the settings: executors of {spark.master} cannot "
                        "see a job folder on this login host")
    unreachable = _master_unreachable(spark.master)
    if unreachable:
        problems.append(unreachable)
        found.update(master_reachable=False, executors=[])
        return {**found, "problems": problems}
    found["master_reachable"] = True
    try:
        found["executors"] = _probe_executors(
            probe_url, settings.storage.environment(executors=True))
    except Exception as e:  # noqa: BLE001 - whatever Spark raised is the finding, on one line
        text = str(e).strip().splitlines()
        problems.append(f"the Spark master {spark.master} ran no probe task: "
                        f"{(text[0] if text else type(e).__name__)[:300]}")
        found["executors"] = []
    for executor in found["executors"]:
        where = f"executor on {executor['address']}"
        if not executor["python_found"]:
            problems.append(f"{where}: no Python at {executor['python']} (the venv must be at "
                            "the same path on every node, or shipped with spark.archives)")
        for module in ("tensorflow", "horovod"):
            if not executor[module]:
                problems.append(f"{where}: {module} does not import with {executor['python']}")
        if executor["storage"] not in ("ok", None):
            problems.append(f"{where}: {executor['storage']}")
    return {**found, "problems": problems}


def _storage_probe(folder_url: str, who: str) -> str:
    """"ok" when a small object can be written, read back whole and deleted under
    ``folder_url``; else the one-line storage error (it names the URL, never a key)."""
    import uuid

    from rs_cluster import storage
    from rs_cluster.errors import RsClusterError

    url = storage.join(folder_url, f"{who}-{uuid.uuid4().hex}")
    data = f"rs-cluster probe from {who}\n".encode()
    try:
        storage.write_bytes(url, data)
        if storage.read_bytes(url) != data:
            return f"{url}: read back other bytes than were written"
        storage.delete_file(url)
    except (RsClusterError, OSError) as e:
        return str(e) if isinstance(e, RsClusterError) else str(storage.storage_error(url, e))
    return "ok"


def _master_unreachable(master: str) -> str | None:
    """A spark://host:port master that does not accept a connection, in one line; None for a
    reachable one, and for local and YARN masters (YARN is found through Hadoop's settings)."""
    import socket
    from urllib.parse import urlparse

    if not master.startswith("spark://"):
        return None
    for hostport in master[len("spark://"):].split(","):  # standby masters, comma separated
        parsed = urlparse(f"spark://{hostport}")
        try:
            socket.create_connection((parsed.hostname, parsed.port or 7077),
                                     timeout=_PROBE_TIMEOUT_S).close()
            return None
        except OSError as e:
            reason = e.strerror or str(e)
    return f"the Spark master {master} cannot be reached: {reason}"


def _probe_executors(probe_url: str | None, executor_env: dict[str, str]) -> list[dict[str, Any]]:
    """One row per executor address that ran a probe task."""
    from rs_cluster.spark import spark_session

    import threading

    python = sys.executable
    conf = {f"spark.executorEnv.{k}": v for k, v in executor_env.items()}
    with spark_session(app_name="rs-cluster probe", conf=conf) as spark:
        sc = spark.sparkContext
        slots = max(sc.defaultParallelism, 1)
        done: dict[str, Any] = {}

        def run() -> None:
            try:
                done["rows"] = sc.parallelize(range(4 * slots), 4 * slots).map(
                    lambda _: _executor_facts(python, probe_url)).collect()
            except Exception as e:  # noqa: BLE001 - handed to the caller below
                done["error"] = e

        worker = threading.Thread(target=run, daemon=True)
        worker.start()
        worker.join(_TASKS_TIMEOUT_S)
        if worker.is_alive():
            # A master with no free worker (or none at all) queues the job for ever.
            sc.cancelAllJobs()
            worker.join(30)
            raise TimeoutError(f"no executor ran a task in {_TASKS_TIMEOUT_S:g} s: the master "
                               "has no free worker, or executors fail to start "
                               f"{python} (it must exist at that path on every node)")
        if "error" in done:
            raise done["error"]
        memory = sc.getConf().get("spark.executor.memory", "1g")
        cores = sc.getConf().get("spark.executor.cores", None)
    by_address: dict[str, dict[str, Any]] = {}
    for row in done["rows"]:
        by_address.setdefault(row["address"], {**row, "executor_memory": memory,
                                               "executor_cores": cores})
    return [by_address[a] for a in sorted(by_address)]


def _executor_facts(python: str, probe_url: str | None) -> dict[str, Any]:
    """Runs in a probe task on an executor."""
    import importlib.util
    import os as _os
    import socket

    host = socket.gethostname()
    address = _os.environ.get("SPARK_LOCAL_IP") or socket.gethostbyname(host)
    return {
        "host": host, "address": address, "cpus": _os.cpu_count(), "python": python,
        "python_found": _os.path.exists(python),
        "python_used": sys.executable,
        "tensorflow": importlib.util.find_spec("tensorflow") is not None,
        "horovod": importlib.util.find_spec("horovod") is not None,
        "storage": _storage_probe(probe_url, address) if probe_url else None,
    }
