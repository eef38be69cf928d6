"""``rs-cluster env --probe`` (issue 17): a tiny real Spark job that checks what the cluster
settings promise, on this host (a local master, a ``file://`` store); the rig's test
(tests/multihost/test_jobs_storage.py) probes a standalone master, two workers and S3."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def env_probe(tmp_path: Path, settings: str) -> subprocess.CompletedProcess[str]:
    path = tmp_path / "cluster.toml"
    path.write_text(settings)
    env = {**os.environ, "PYTHONPATH": str(REPO / "cluster_side"), "RS_CLUSTER_CONFIG": str(path)}
    return subprocess.run([sys.executable, "-m", "rs_cluster", "env", "--probe"],
                          capture_output=True, text=True, env=env, timeout=240)


@pytest.mark.spark
def test_the_probe_runs_tasks_and_writes_reads_and_deletes_a_probe_object(tmp_path):
    store = tmp_path / "store"
    proc = env_probe(tmp_path, f'[spark]\nmaster = "local[2]"\n\n[storage]\nurl = "file://{store}"\n')
    assert proc.returncode == 0, proc.stderr[-2000:]
    found = json.loads(proc.stdout)["probe"]
    assert (found["problems"], found["master_reachable"], found["storage_here"]) == ([], True, "ok")
    [executor] = found["executors"]  # local mode: the driver's own host
    assert executor["python_used"] == sys.executable
    assert (executor["tensorflow"], executor["horovod"], executor["storage"]) == (True, True, "ok")
    assert [p for p in store.rglob("*") if p.is_file()] == []  # every probe object deleted


def test_an_unreachable_master_is_one_problem_line_and_exit_1(tmp_path):
    proc = env_probe(tmp_path, '[spark]\nmaster = "spark://127.0.0.1:1"\n')
    assert proc.returncode == 1
    found = json.loads(proc.stdout)["probe"]
    assert found["master_reachable"] is False
    assert found["problems"] == [
        "no storage.url in the settings: executors of spark://127.0.0.1:1 cannot see a job "
        "folder on this login host",
        "the Spark master spark://127.0.0.1:1 cannot be reached: Connection refused"]
    assert proc.stderr.splitlines()[-1] == ("rs-cluster env --probe: the Spark master "
                                            "spark://127.0.0.1:1 cannot be reached: "
                                            "Connection refused")
