"""Jobs submitted on the rig's login host with ``rs-cluster job submit``, as the plugin submits them.

The cluster settings file on login (``~/.rs-cluster/cluster.toml``) names the rig's Spark master
and its S3 store, with ``credentials = "aws-profile:rig"`` and the endpoint: every host's own
``~/.aws/credentials`` holds the keys under that profile and no endpoint, so the job works only if
the runner hands the profile and the endpoint to the driver and the executors. The runner copies the
uploaded inputs to ``<storage>/<user>/<job>``, the stages run on worker1 and worker2, and the
results come back into login's job folder.
"""

from __future__ import annotations

import getpass
import json
import shutil
import time
from pathlib import Path

import pytest

from tests import cluster_selftest, devdata
from tests.multihost.test_storage_loop import _snapshot, _task_hosts, rig_bucket
from tests.rig import ADDRESSES, WORKERS, Rig, write_aws_files

pytestmark = [pytest.mark.multihost, pytest.mark.spark]

BUCKET = "rs-jobs-storage"
PREFIX = f"s3://{BUCKET}/team"
XIAMEN = "xiamen_robosat_z18"
ENDED = ("succeeded", "failed", "cancelled")


def _settings(rig: Rig, storage: bool) -> str:
    login = rig.host("login")
    text = f"""[spark]
master = "{rig.master_url}"
executor_memory = "512m"

[spark.conf]
"spark.driver.host" = "{ADDRESSES['login']}"
"spark.driver.bindAddress" = "{ADDRESSES['login']}"
"spark.ui.enabled" = false
"spark.scheduler.minRegisteredResourcesRatio" = "1.0"
"spark.scheduler.maxRegisteredResourcesWaitingTime" = "60s"
"spark.eventLog.enabled" = true
"spark.eventLog.dir" = "file://{login.tmp / 'spark-events'}"
"""
    if storage:
        text += (f'\n[storage]\nurl = "{PREFIX}"\ncredentials = "aws-profile:rig"\n'
                 f'endpoint_url = "{rig.s3.url}"\n')
    return text


@pytest.fixture(scope="module")
def configured(rig):
    """The bucket; each host's AWS keys under the profile "rig"; login's settings file."""
    s3 = rig_bucket(rig, BUCKET)
    hosts = ("login", *WORKERS)
    for name in hosts:
        write_aws_files(rig.host(name).home, rig.s3, profile="rig", config=False)
    login = rig.host("login")
    (login.tmp / "spark-events").mkdir(exist_ok=True)
    home = login.home / ".rs-cluster"
    home.mkdir(mode=0o700, exist_ok=True)
    (home / "cluster.toml").write_text(_settings(rig, storage=True))
    (login.tmp / "no-storage.toml").write_text(_settings(rig, storage=False))
    yield s3
    for name in hosts:
        shutil.rmtree(rig.host(name).home / ".aws", ignore_errors=True)
    shutil.rmtree(home, ignore_errors=True)


def _predict_job(rig: Rig, job_id: str, *extra_steps: dict) -> Path:
    """A job folder on login as the plugin uploads it: a model, two Xiamen images and their
    masks; predict (with polygons) then evaluate, then ``extra_steps``."""
    from tests.cluster_side.test_predict import build_channel_model

    job_dir = rig.host("login").home / ".rs-cluster" / "jobs" / job_id
    build_channel_model(job_dir / "inputs" / "model")
    for f in devdata.first_files(XIAMEN, 2):
        for kind, folder in (("images", "images"), ("masks", "gt")):
            (job_dir / "inputs" / kind).mkdir(parents=True, exist_ok=True)
            shutil.copy(devdata.subset(XIAMEN) / folder / f, job_dir / "inputs" / kind / f)
    steps = [{"stage": "predict", "params": {"model": "inputs/model", "input": "inputs/images",
                                             "output": "outputs/masks", "polygons": True}},
             {"stage": "evaluate", "params": {"pred": "outputs/masks", "truth": "inputs/masks",
                                              "json": "outputs/report.json"}}, *extra_steps]
    (job_dir / "job.json").write_text(json.dumps(
        {"schema_version": 1, "job_id": job_id, "name": job_id, "steps": steps}))
    return job_dir


def _submit(rig: Rig, job_dir: Path, env: dict[str, str] | None = None, selftest: bool = False):
    """``rs-cluster job submit <job folder>`` on login (the tests' entry point for the sleep
    stage), with the environment a login shell gives the driver."""
    module = cluster_selftest.ENTRY_MODULE if selftest else "rs_cluster"
    extra = {"PYTHONPATH": cluster_selftest.pythonpath(), **(env or {})} if selftest else env
    inside = Path(rig.host("login").user_home) / job_dir.relative_to(rig.host("login").home)
    return rig.host("login").run([str(rig.python), "-m", module, "--quiet", "job", "submit",
                                  str(inside)], env=rig.driver_env(extra), check=False)


def _final(job_dir: Path, timeout: float) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = json.loads((job_dir / "status.json").read_text())
        if status["state"] in ENDED:
            return status
        time.sleep(0.5)
    log = (job_dir / "log.txt").read_text()[-3000:]
    raise AssertionError(f"job {job_dir.name} did not end in {timeout:.0f} s: {status}\n{log}")


def test_a_submitted_job_runs_on_the_workers_and_its_results_land_in_the_login_job_folder(
        rig, configured):
    import rasterio

    before = {w: (_snapshot(rig.host(w).home), _snapshot(rig.host(w).workspace)) for w in WORKERS}
    job_dir = _predict_job(rig, "rig-store1")
    submitted = _submit(rig, job_dir)
    assert submitted.returncode == 0, submitted.stderr[-2000:]
    status = _final(job_dir, 400)
    assert status["state"] == "succeeded", (job_dir / "log.txt").read_text()[-3000:]
    assert status["results"] == ["outputs/masks", "outputs/report.json"]

    # The results are in login's job folder, whole, and the masks keep their georeferencing.
    stems = [Path(f).stem for f in devdata.first_files(XIAMEN, 2)]
    masks = job_dir / "outputs" / "masks"
    assert {f"{s}_mask.tif" for s in stems} | {f"{s}_buildings.gpkg" for s in stems} <= \
        {p.name for p in masks.iterdir()}
    with rasterio.open(job_dir / "inputs" / "images" / f"{stems[0]}.tif") as src, \
            rasterio.open(masks / f"{stems[0]}_mask.tif") as mask:
        assert mask.crs == src.crs and mask.transform.almost_equals(src.transform)
    report = json.loads((job_dir / "outputs" / "report.json").read_text())
    assert report["pooled"]["images"] == 2
    assert not [p for p in job_dir.iterdir() if p.name.startswith(".fetch")]

    # The stages read and wrote the store, under the user's and the job's name.
    url = f"{PREFIX}/{getpass.getuser()}/rig-store1"
    log = (job_dir / "log.txt").read_text()
    assert f"--input {url}/inputs/images" in log and f"--output {url}/outputs/masks" in log
    keys = {i.path for i in configured.get_file_info(_selector(url)) if i.is_file}
    assert f"{url[5:]}/outputs/masks/{stems[0]}_mask.tif" in keys
    assert rig.s3.secret_key not in log + (job_dir / "status.json").read_text()

    # Predict ran its tasks on both workers, which never got login's files.
    assert _task_hosts(rig).get("rs-cluster predict") == {ADDRESSES[w] for w in WORKERS}
    for w in WORKERS:
        assert (_snapshot(rig.host(w).home), _snapshot(rig.host(w).workspace)) == before[w], w


def _selector(url: str):
    import pyarrow.fs as pafs

    return pafs.FileSelector(url[len("s3://"):], recursive=True)


def test_without_storage_a_job_for_the_rig_master_fails_before_running_with_one_line(
        rig, configured):
    login = rig.host("login")
    job_dir = _predict_job(rig, "rig-nostore1")
    settings = login.tmp / "no-storage.toml"  # the same path inside login
    submitted = _submit(rig, job_dir, env={"RS_CLUSTER_CONFIG": str(settings)})
    assert submitted.returncode == 1
    status = _final(job_dir, 60)
    assert status["state"] == "failed"
    inside = Path(login.user_home) / job_dir.relative_to(login.home)
    assert status["message"] == (
        f"step 1 (predict) would run on the Spark master {rig.master_url}, whose executors "
        f"cannot see the job folder {inside} on this login host: set storage.url in {settings} "
        "to a store every node reaches (s3://bucket/prefix, or file:///path every node mounts), "
        "or jobs.shared_workspace = true if every node mounts the workspace itself")
    assert submitted.stderr == f"rs-cluster job submit: job rig-nostore1 failed: {status['message']}\n"
    assert not (job_dir / "log.txt").exists()  # no runner, no step started


def test_storage_stopped_before_the_results_come_back_fails_the_job_naming_the_store(
        rig, configured):
    """The store stops after predict and evaluate wrote their results there, while a last
    (sleep) step runs: the runner cannot bring them back, and the job folder shows none."""
    job_dir = _predict_job(rig, "rig-outage1", {"stage": "sleep",
                                               "params": {"seconds": 30, "steps": 30}})
    assert _submit(rig, job_dir, selftest=True).returncode == 0
    deadline = time.monotonic() + 400
    while json.loads((job_dir / "status.json").read_text()).get("step") != 3:
        assert time.monotonic() < deadline, (job_dir / "log.txt").read_text()[-3000:]
        assert json.loads((job_dir / "status.json").read_text())["state"] not in ENDED, \
            (job_dir / "log.txt").read_text()[-3000:]
        time.sleep(0.5)
    rig.stop_storage()
    try:
        status = _final(job_dir, 200)
    finally:
        rig.start_storage()
    url = f"{PREFIX}/{getpass.getuser()}/rig-outage1"
    assert status["state"] == "failed"
    assert status["message"].startswith(f"{url}/outputs/") and \
        f"the storage service at {rig.s3.url} cannot be reached" in status["message"], status
    assert status["results"] == []
    assert not (job_dir / "outputs" / "masks").exists()
    assert not (job_dir / "outputs" / "report.json").exists()
    assert not [p for p in job_dir.rglob(".fetch*")]


def test_the_probe_finds_both_workers_running_the_venv_and_reaching_the_store(rig, configured):
    login = rig.host("login")
    result = login.run([str(rig.python), "-m", "rs_cluster", "env", "--probe"],
                       env=rig.driver_env(), timeout=300, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    found = json.loads(result.stdout)["probe"]
    assert found["problems"] == [] and found["storage_here"] == "ok"
    assert [e["address"] for e in found["executors"]] == [ADDRESSES[w] for w in WORKERS]
    for executor in found["executors"]:
        assert executor["python_used"] == str(rig.python)
        assert (executor["tensorflow"], executor["horovod"], executor["storage"]) == \
            (True, True, "ok")
        assert executor["executor_memory"] == "512m"
    assert rig.s3.secret_key not in result.stdout + result.stderr
