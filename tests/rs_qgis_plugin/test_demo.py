"""`make demo`'s driver on a few real dev rasters: the whole loop on the multi-host rig (tests/rig.py:
real sshd on login, a real Spark master and two one-core workers on their own hosts, real Horovod
workers, SeaweedFS as S3, QGIS offscreen), or, where the rig cannot run (no root), through its
single-host throwaway cluster; and interrupts, on either, that must leave nothing running."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from qgis.core import QgsRasterLayer

from tests import devdata
from tests.procs import live_processes
from tests.rig import ADDRESSES, unavailable
from tests.rs_qgis_plugin.conftest import CLUSTER_PYTHON, REPO

pytestmark = [pytest.mark.qgis, pytest.mark.ssh, pytest.mark.spark, pytest.mark.horovod,
              pytest.mark.slow]
HOLDOUT = ("deeposlandia_georef_samples", "inria_austin_sample.tif")


@pytest.fixture
def mini_dev(tmp_path) -> Path:
    """A dev tree with six training pairs and the held-out raster, linked from the real set."""
    if not CLUSTER_PYTHON.exists():
        pytest.skip("the cluster venv (.venv) is not built; run make setup")
    root = tmp_path / "dev"
    training = "inria_austin_chicago"
    devdata.link_pairs(root / training, {training: devdata.first_files(training, 6)})
    (root / training / "masks").rename(root / training / "gt")  # the dev set's layout
    subset, name = HOLDOUT
    (root / subset / "images").mkdir(parents=True)
    (root / subset / "gt").mkdir(parents=True)
    (root / subset / "images" / name).symlink_to(devdata.subset(subset) / "images" / name)
    (root / subset / "gt" / name).symlink_to(devdata.subset(subset) / "gt" / name)
    return root


def _ignore_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)


class Demo:
    """scripts/demo.py in its own process, its output collected line by line."""

    def __init__(self, data: Path, out: Path, epochs: int, *, sigint_ignored: bool = False,
                 single_host: bool = False, cluster: str = "standalone") -> None:
        env = {**os.environ, "QT_QPA_PLATFORM": "offscreen"}
        self.out = out
        self.proc = subprocess.Popen(
            [sys.executable, str(REPO / "scripts" / "demo.py"), "--data", str(data), "--out",
             str(out), "--epochs", str(epochs), "--workers", "2",
             *(["--single-host"] if single_host else []), "--cluster", cluster],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
            # what a shell's background job (`make test &`, CI) hands its children
            preexec_fn=_ignore_sigint if sigint_ignored else None)
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    @property
    def text(self) -> str:
        return "\n".join(self.lines)

    def wait_for_line(self, pattern: str, timeout: float) -> re.Match:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in list(self.lines):
                if match := re.search(pattern, line):
                    return match
            if self.proc.poll() is not None:
                break
            time.sleep(0.2)
        raise AssertionError(f"no line matching {pattern!r}:\n{self.text[-3000:]}")

    def wait(self, timeout: float) -> int:
        code = self.proc.wait(timeout=timeout)
        self._reader.join(timeout=10)
        return code


def processes_mentioning(text: str) -> list[str]:
    """Live processes whose command line or environment names ``text``."""
    return [f"{p.pid} {p.command[:160]}" for p in live_processes() if p.mentions(text)]


def _host(name: str) -> str:
    return re.escape(f"{name} ({ADDRESSES[name]})")


WORKER = r"worker[12] \(127\.0\.0\.[45]\)"


def assert_it_said_which_host_ran_what(text: str, train_job: str, evaluate_job: str) -> None:
    """The lines the demo prints after each job on the rig, read from the Spark event logs, the
    Horovod processes on the hosts and the store."""
    assert text.count(f"driver (job runner): login ({ADDRESSES['login']})\n") == 2, text
    prepare = re.search(rf"prepare: (\d+) tasks? on ({WORKER}), (\d+) on ({WORKER})", text)
    assert prepare and prepare.group(2) != prepare.group(4), text  # both workers
    ranks = re.search(rf"train: Horovod rank 0 on ({WORKER}), rank 1 on ({WORKER})$", text,
                      re.MULTILINE)
    assert ranks and ranks.group(1) != ranks.group(2), text  # one worker process on each host
    predict = re.search(r"^   predict: (.*)$", text, re.MULTILINE)
    assert predict and re.fullmatch(rf"\d+ tasks? on {WORKER}(, \d+ on {WORKER})?",
                                    predict.group(1)), text
    for job in (train_job, evaluate_job):
        assert re.search(rf"storage: [1-9]\d* objects, [0-9.]+ MB under s3://rs-demo/jobs/\S+/"
                         rf"{job} on {_host('storage')}", text), text
    tasks = re.findall(r"^ *(?:prepare|train|predict): .*$", text, re.MULTILINE)
    assert tasks and not [line for line in tasks if ADDRESSES["login"] in line], text


def test_demo_takes_rasters_through_ssh_and_spark_and_back_onto_the_map(mini_dev, tmp_path):
    before = devdata.tree_digest(mini_dev)
    out = tmp_path / "out"
    reason = unavailable()
    demo = Demo(mini_dev, out, epochs=1)
    code = demo.wait(timeout=900)
    assert code == 0, demo.text[-4000:]
    iou = float(demo.wait_for_line(r"building IoU on the held-out raster: ([0-9.]+)", 1).group(1))
    report = json.loads((out / "report.json").read_text())
    assert report["pooled"]["iou"] == pytest.approx(iou, abs=1e-3) and 0.0 <= iou <= 1.0
    assert "2 Horovod worker(s)" in demo.text
    jobs = re.findall(r"^   job (\S+): ", demo.text, re.MULTILINE)
    assert len(jobs) == 2, demo.text
    if reason is None:
        assert f"Spark master spark://{ADDRESSES['master']}:" in demo.text
        assert_it_said_which_host_ran_what(demo.text, *jobs)
        assert not (out / "rig").exists()
    else:  # no root here: the fallback, said in one line
        assert f"== no multi-host rig ({reason}): falling back to the single-host" in demo.text
        assert "spark://127.0.0.1:" in demo.text

    # the mask came back georeferenced exactly on the held-out raster
    mask = QgsRasterLayer(str(out / "masks" / "inria_austin_sample_mask.tif"), "mask", "gdal")
    source = QgsRasterLayer(str(mini_dev / HOLDOUT[0] / "images" / HOLDOUT[1]), "src", "gdal")
    assert mask.isValid() and mask.crs().authid() == "EPSG:26914" == source.crs().authid()
    assert mask.extent() == source.extent()
    assert (out / "masks" / "inria_austin_sample_buildings.gpkg").is_file()
    assert (out / "overlay.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "demo.qgz").is_file()
    # everything it started has stopped; the dev rasters are untouched
    assert processes_mentioning(str(out)) == []
    assert devdata.tree_digest(mini_dev) == before


@pytest.mark.parametrize("sig, single_host", [(signal.SIGINT, False), (signal.SIGTERM, True)],
                         ids=["sigint-rig", "sigterm-single-host"])
def test_interrupting_the_demo_cancels_the_job_and_stops_the_cluster(mini_dev, tmp_path, sig,
                                                                     single_host):
    """Whatever SIGINT disposition the caller's shell left: the demo starts with SIGINT ignored,
    as under a background shell, and must still stop on Ctrl-C (and on SIGTERM). Ctrl-C is tried
    on the rig (where it runs), SIGTERM on the single-host cluster (``--single-host``)."""
    out = tmp_path / "out"
    demo = Demo(mini_dev, out, epochs=50, sigint_ignored=True, single_host=single_host)
    job = demo.wait_for_line(r"job (\S+): prepare -> train", 300).group(1)
    demo.wait_for_line(r"train: (starting|2 worker|epoch)", 300)  # Horovod workers on the way
    demo.proc.send_signal(sig)
    assert demo.wait(timeout=120) == 130, demo.text[-3000:]
    assert f"job {job} cancelled" in demo.text  # the cluster's answer to the cancel
    if single_host or unavailable() is not None:
        status = json.loads((out / "cluster-workspace" / "jobs" / job / "status.json").read_text())
        assert status["state"] == "cancelled" and not status["results"]
    else:  # the rig, its hosts' folders and the job folder on login are gone with it
        assert not (out / "rig").exists()
    assert processes_mentioning(f"RS_CLUSTER_JOB_ID={job}") == []
    assert processes_mentioning(str(out)) == []


@pytest.mark.hadoop
@pytest.mark.multihost
def test_the_demo_on_yarn_runs_every_stage_in_yarn_containers_on_both_workers_with_hdfs(
        mini_dev, tmp_path):
    """``make demo CLUSTER=yarn``: the same loop through the plugin's code and sshd on login, with
    real YARN (ResourceManager on master, a NodeManager per worker host) and HDFS daemons."""
    from tests.hadoop_daemons import unavailable as hadoop_unavailable

    reason = unavailable() or hadoop_unavailable()
    if reason:
        pytest.skip(reason)
    out = tmp_path / "out"
    demo = Demo(mini_dev, out, epochs=1, cluster="yarn")
    assert demo.wait(timeout=900) == 0, demo.text[-4000:]
    text = demo.text

    assert "login's settings: Spark master yarn (from settings file" in text
    assert re.search(rf"^   master +{re.escape(ADDRESSES['master'])} +HDFS NameNode .*YARN "
                     "ResourceManager", text, re.MULTILINE), text
    for stage in ("prepare", "train", "predict"):
        containers = re.search(rf"^   {stage}: YARN containers (\d+) on ({WORKER}), (\d+) on "
                               rf"({WORKER})$", text, re.MULTILINE)
        assert containers and containers.group(2) != containers.group(4), (stage, text)
    ranks = re.search(rf"train: Horovod rank 0 on ({WORKER}), rank 1 on ({WORKER})$", text,
                      re.MULTILINE)
    assert ranks and ranks.group(1) != ranks.group(2), text
    jobs = re.findall(r"^   job (\S+): ", text, re.MULTILINE)
    for job in jobs:
        assert re.search(rf"storage: [1-9]\d* objects, [0-9.]+ MB under hdfs://"
                         rf"{re.escape(ADDRESSES['master'])}:\d+/rs/jobs/\S+/{job} on HDFS", text)
    tasks = re.findall(r"^ *(?:prepare|train|predict): .*$", text, re.MULTILINE)
    assert tasks and not [line for line in tasks if ADDRESSES["login"] in line], text
    mask = QgsRasterLayer(str(out / "masks" / "inria_austin_sample_mask.tif"), "mask", "gdal")
    source = QgsRasterLayer(str(mini_dev / HOLDOUT[0] / "images" / HOLDOUT[1]), "src", "gdal")
    assert mask.isValid() and mask.crs().authid() == "EPSG:26914" == source.crs().authid()
    assert mask.extent() == source.extent()
    assert not (out / "rig").exists()
    assert processes_mentioning(str(out)) == []
