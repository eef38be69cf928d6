"""A real Spark standalone cluster on 127.0.0.1: one master and one worker, started through
pyspark's own ``bin/spark-class`` (pip's pyspark has no start-master.sh), for tests and the demo.

``spark_home`` and ``python`` let a process without pyspark (the demo, in the QGIS venv) start it
from the cluster venv.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Mapping, Sequence

from tests.sshd import free_port


class StandaloneCluster:
    def __init__(self, workdir: Path, cores: int = 2, memory: str = "2g", python: str = sys.executable,
                 spark_home: Path | None = None, host: str = "127.0.0.1"):
        """``host`` is the master's address (and the default worker's). The multi-host rig
        (tests/rig.py) calls ``start_master`` and ``add_worker`` itself, one host each."""
        if spark_home is None:
            import pyspark

            spark_home = Path(pyspark.__file__).parent
        self.spark_home = Path(spark_home)
        self.workdir = workdir
        self.cores = cores
        self.memory = memory
        self.host = host
        self.port = free_port(host)
        self.ui_port = free_port(host)
        self.master_url = f"spark://{host}:{self.port}"
        self.env = {**os.environ, "SPARK_HOME": str(self.spark_home), "SPARK_LOCAL_IP": host,
                    "PYSPARK_PYTHON": python, "SPARK_LOG_DIR": str(workdir / "logs"),
                    "SPARK_WORKER_DIR": str(workdir / "work")}
        self.procs: list[subprocess.Popen] = []

    def _start(self, *args: str, log: str | Path, prefix: Sequence[str] = (),
               env: Mapping[str, str] | None = None) -> None:
        out = open(self.workdir / log, "wb")  # noqa: SIM115 - kept open for the process' life
        self.procs.append(subprocess.Popen(
            [*prefix, str(self.spark_home / "bin" / "spark-class"), *args],
            env={**self.env, **(env or {})}, stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True))

    def start_master(self, prefix: Sequence[str] = (), env: Mapping[str, str] | None = None,
                     log: str | Path = "master.log") -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._start("org.apache.spark.deploy.master.Master", "--host", self.host,
                    "--port", str(self.port), "--webui-port", str(self.ui_port), log=log,
                    prefix=prefix, env=env)

    def add_worker(self, host: str, cores: int, work_dir: Path, prefix: Sequence[str] = (),
                   env: Mapping[str, str] | None = None, log: str | Path = "worker.log") -> None:
        """A worker bound to ``host``; ``prefix`` and ``env`` place it (the rig: on a host)."""
        self._start("org.apache.spark.deploy.worker.Worker", self.master_url, "--host", host,
                    "--cores", str(cores), "--memory", self.memory,
                    "--webui-port", str(free_port(host)), "--work-dir", str(work_dir),
                    log=log, prefix=prefix, env={"SPARK_LOCAL_IP": host, **(env or {})})

    def start(self, timeout: float = 90) -> "StandaloneCluster":
        self.start_master()
        self.add_worker(self.host, self.cores, self.workdir / "work")
        return self.wait_for_workers(1, timeout)

    def wait_for_workers(self, count: int, timeout: float = 90) -> "StandaloneCluster":
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for p in self.procs:
                if p.poll() is not None:
                    self.stop()
                    raise RuntimeError(f"Spark daemon exited early; see {self.workdir}/*.log")
            if self.alive_workers() >= count:
                return self
            time.sleep(0.5)
        self.stop()
        raise TimeoutError(f"fewer than {count} Spark workers registered with {self.master_url} "
                           f"in {timeout} s; see {self.workdir}/*.log")

    def alive_workers(self) -> int:
        try:
            with urllib.request.urlopen(f"http://{self.host}:{self.ui_port}/json/", timeout=2) as r:
                return int(json.load(r).get("aliveworkers", 0))
        except OSError:
            return 0

    def stop(self) -> None:
        for p in reversed(self.procs):
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
        for p in self.procs:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
        self.procs.clear()

    def __enter__(self) -> "StandaloneCluster":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
