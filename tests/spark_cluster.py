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

from tests.sshd import free_port


class StandaloneCluster:
    def __init__(self, workdir: Path, cores: int = 2, memory: str = "2g", python: str = sys.executable,
                 spark_home: Path | None = None):
        if spark_home is None:
            import pyspark

            spark_home = Path(pyspark.__file__).parent
        self.spark_home = Path(spark_home)
        self.workdir = workdir
        self.cores = cores
        self.memory = memory
        self.port = free_port()
        self.ui_port = free_port()
        self.master_url = f"spark://127.0.0.1:{self.port}"
        self.env = {**os.environ, "SPARK_HOME": str(self.spark_home), "SPARK_LOCAL_IP": "127.0.0.1",
                    "PYSPARK_PYTHON": python, "SPARK_LOG_DIR": str(workdir / "logs"),
                    "SPARK_WORKER_DIR": str(workdir / "work")}
        self.procs: list[subprocess.Popen] = []

    def _start(self, *args: str, log: str) -> None:
        out = open(self.workdir / log, "wb")  # noqa: SIM115 - kept open for the process' life
        self.procs.append(subprocess.Popen(
            [str(self.spark_home / "bin" / "spark-class"), *args], env=self.env, stdout=out,
            stderr=subprocess.STDOUT, start_new_session=True))

    def start(self, timeout: float = 90) -> "StandaloneCluster":
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._start("org.apache.spark.deploy.master.Master", "--host", "127.0.0.1",
                    "--port", str(self.port), "--webui-port", str(self.ui_port), log="master.log")
        self._start("org.apache.spark.deploy.worker.Worker", self.master_url, "--host", "127.0.0.1",
                    "--cores", str(self.cores), "--memory", self.memory,
                    "--webui-port", str(free_port()), "--work-dir", str(self.workdir / "work"),
                    log="worker.log")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for p in self.procs:
                if p.poll() is not None:
                    self.stop()
                    raise RuntimeError(f"Spark daemon exited early; see {self.workdir}/*.log")
            if self.alive_workers() >= 1:
                return self
            time.sleep(1)
        self.stop()
        raise TimeoutError(f"no Spark worker registered with {self.master_url} in {timeout} s")

    def alive_workers(self) -> int:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.ui_port}/json/", timeout=2) as r:
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
