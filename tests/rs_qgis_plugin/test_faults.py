"""Faults the loop survives, seen from the plugin, against the real sshd and the real rs-cluster.

A dropped SSH connection while a job is watched, the job's processes killed on the cluster, and
the user cancelling an upload or a download half-way. Each test drives the real
:class:`JobController` with QGIS's own task manager, as the dock does; the faults are real too
(sshd's connection processes and the job runner are SIGKILLed, transfers are cut mid-file).
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest
from qgis.core import Qgis, QgsProject, QgsRasterLayer, QgsVectorLayer

from rs_qgis_plugin import settings
from rs_qgis_plugin.controller import JobController, PreparedRun
from rs_qgis_plugin.core.jobs import RemoteJobs
from rs_qgis_plugin.core.ssh import SshClient
from rs_qgis_plugin.logic import MODE_PREDICT, PlannedJob, RasterPick, RunParams, plan_job
from rs_qgis_plugin.results import JOB_PROPERTY
from rs_qgis_plugin.tasks import FetchResultsTask, WatchJobTask
from tests.cluster_selftest import plugin_sleep_spec
from tests.procs import ENV_JOB_ID, live_processes
from tests.rs_qgis_plugin.conftest import dev_image, wait_for

pytestmark = [pytest.mark.qgis, pytest.mark.ssh, pytest.mark.usefixtures("qgis_env")]

# Big enough that a transfer over the loopback lasts a moment after its first progress report.
UPLOAD_MB = 256
DOWNLOAD_MB = 128


@pytest.fixture
def controllers(qgis_iface):
    """Makes job controllers and shuts them down after the test, so no task of a failed test
    keeps running into the next one."""
    made: list[JobController] = []

    def make() -> JobController:
        made.append(JobController(qgis_iface, poll_s=0.3))
        return made[-1]

    yield make
    for controller in made:
        controller.shutdown()


def sleep_job(name: str, seconds: float, steps: int, **inputs) -> PlannedJob:
    spec = plugin_sleep_spec(name, seconds=seconds, steps=steps)
    return PlannedJob(spec=spec, inputs={k: str(v) for k, v in inputs.items()}, fetch=())


def remote_jobs(profile) -> tuple[SshClient, RemoteJobs]:
    client = SshClient(profile, settings.known_hosts_path()).connect()
    return client, RemoteJobs(client)


def job_dir(profile, job_id: str) -> Path:
    return Path(profile.remote_workspace, "jobs", job_id)


def random_file(path: Path, megabytes: int) -> Path:
    """Incompressible content, so every byte really crosses the connection."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        for _ in range(megabytes // 8):
            f.write(os.urandom(8 << 20))
    return path


def job_processes(job_id: str) -> list[int]:
    """Live processes of the job on the (loopback) cluster: those carrying its id in their
    environment, as every process of a job does, or naming its folder on their command line
    (the upload's hash follower)."""
    return [p.pid for p in live_processes()
            if p.environ.get(ENV_JOB_ID) == job_id or f"/jobs/{job_id}/" in p.command]


def running_a_command(sshd) -> bool:
    """Whether a connection's sshd process has a child: a command (``rs-cluster job events``,
    ``status``) the plugin is waiting on. A cut then lands mid-command, not between two polls."""
    for pid in sshd.children():
        try:
            if Path(f"/proc/{pid}/task/{pid}/children").read_text().split():
                return True
        except OSError:
            continue
    return False


def job_layers(job_id: str) -> list:
    return [lyr for lyr in QgsProject.instance().mapLayers().values()
            if lyr.customProperty(JOB_PROPERTY) == job_id]


def files_under(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file()) if folder.exists() else []


def test_the_watch_reconnects_after_the_connection_drops_and_sees_the_job_succeed(
        qgis_iface, qtbot, sshd, profile, results_root, controllers):
    """Each cut lands while the watch waits on a command, so the watch itself has to notice
    the dead link and reconnect (a cut between two polls is healed by the next command)."""
    controller = controllers()
    planned = sleep_job("through cuts", 15.0, 30)
    job = planned.spec.job_id
    controller.start(profile.name, PreparedRun(planned, []), "predict")
    wait_for(qtbot, lambda: isinstance(controller.tasks.get(job), WatchJobTask) and
             controller.record(job).state == "running" and controller.record(job).progress > 0, 60)
    watch = controller.tasks[job]
    statuses = []
    watch.status_changed.connect(statuses.append)

    # Two cuts: the second one once the watch has reported again over its new connection.
    for _ in range(2):
        progress_before = controller.record(job).progress
        seen_before = len(statuses)
        wait_for(qtbot, lambda: running_a_command(sshd), 30)
        assert controller.tasks.get(job) is watch, "the job ended before the cut"
        assert sshd.kill_connections() >= 1, "no SSH connection to cut"
        wait_for(qtbot, lambda n=seen_before: len(statuses) > n or job not in controller.tasks,
                 30)
        assert len(statuses) > seen_before, controller.record(job).message

    wait_for(qtbot, lambda: controller.record(job).state == "succeeded" and
             job not in controller.tasks, 60)
    record = controller.record(job)
    assert record.progress == 100.0 and record.loaded  # nothing to download for a sleep job
    assert statuses[-1].state == "succeeded"
    progress = [s.progress for s in statuses]
    assert progress == sorted(progress) and progress[-1] > progress_before
    bar = qgis_iface.messageBar()
    assert not bar.get_messages(Qgis.Warning) and not bar.get_messages(Qgis.Critical)


def test_a_job_killed_on_the_cluster_is_reported_as_failed(qgis_iface, qtbot, profile,
                                                           results_root, controllers):
    """The runner and its step die without a word (an out-of-memory kill, say); the cluster
    side notices at the next status read and the plugin reports the failure."""
    controller = controllers()
    planned = sleep_job("to be killed", 60.0, 60)
    job = planned.spec.job_id
    controller.start(profile.name, PreparedRun(planned, []), "predict")
    status_file = job_dir(profile, job) / "status.json"

    def runner():
        status = json.loads(status_file.read_text()) if status_file.exists() else {}
        return status if status.get("state") == "running" and status.get("stage") else None

    wait_for(qtbot, lambda: runner() and controller.record(job).state == "running", 60)
    status = runner()
    assert job_processes(job), "the job runs no process with its id"
    os.killpg(status["pgid"], signal.SIGKILL)  # the runner and its step

    wait_for(qtbot, lambda: controller.record(job).state == "failed" and
             job not in controller.tasks, 60)
    record = controller.record(job)
    assert f"pid {status['pid']}" in record.message and "killed" in record.message
    critical = qgis_iface.messageBar().get_messages(Qgis.Critical)
    assert any("failed on the cluster" in m and "to be killed" in m for m in critical), critical
    assert not record.loaded and QgsProject.instance().mapLayers() == {}
    assert job_processes(job) == []


def test_cancelling_the_upload_starts_nothing_on_the_cluster(qtbot, profile, results_root,
                                                             controllers, tmp_path):
    controller = controllers()
    big = random_file(tmp_path / "big" / "scene.tif", UPLOAD_MB)
    remote_name = "inputs/images/scene.tif"
    planned = sleep_job("upload cancelled", 1.0, 1, **{remote_name: big})
    job = planned.spec.job_id
    submit = controller.start(profile.name, PreparedRun(planned, []), "predict")
    wait_for(qtbot, lambda: submit.progress() > 0, 60)
    assert submit.progress() < 100, "the upload ended before it could be cancelled"
    controller.cancel(job)

    wait_for(qtbot, lambda: job not in controller.tasks, 60)
    record = controller.record(job)
    assert record.state == "cancelled" and record.message == "cancelled before start"
    # The cluster never heard of the job: no spec, no status, nothing running for it.
    folder = job_dir(profile, job)
    assert not (folder / "job.json").exists() and not (folder / "status.json").exists()
    client, jobs = remote_jobs(profile)
    with client:
        assert job not in [j["job_id"] for j in jobs.list()]
    # The partial copy stays for a later resume, under a name that never looks complete.
    part = folder / (remote_name + ".part")
    assert not (folder / remote_name).exists()
    assert 0 < part.stat().st_size < big.stat().st_size
    wait_for(qtbot, lambda: job_processes(job) == [], 15)  # the hash follower hears the hang-up
    assert QgsProject.instance().mapLayers() == {}


@pytest.mark.slow
@pytest.mark.usefixtures("need_predict")
def test_cancelling_the_download_loads_nothing_and_a_later_fetch_completes(
        qgis_iface, qtbot, profile, results_root, controllers, tiny_model):
    """A real prediction; its 256 x 256 mask downloads in a blink, so a big file is added to the
    job's result folder on the cluster once it finished, to give the download time to be
    cancelled. QGIS is closed while the job runs and the download starts when it opens again."""
    planned = plan_job("download cancelled", RunParams(MODE_PREDICT, model_dir=str(tiny_model)),
                       [RasterPick(str(dev_image(0)))])
    job = planned.spec.job_id
    first = controllers()
    first.start(profile.name, PreparedRun(planned, []), "predict")
    wait_for(qtbot, lambda: first.record(job).state == "running", 60)
    first.shutdown()

    client, jobs = remote_jobs(profile)
    with client:
        deadline = time.monotonic() + 120
        while (state := jobs.status(job).state) == "running" and time.monotonic() < deadline:
            time.sleep(0.5)
    assert state == "succeeded"
    extra = random_file(job_dir(profile, job) / "outputs" / "masks" / "zz_extra.bin",
                        DOWNLOAD_MB)

    second = controllers()
    second.reattach()  # watches the job, sees it succeeded, starts the download
    # past the first percent: the small results are in, the big file is on its way
    wait_for(qtbot, lambda: isinstance(second.tasks.get(job), FetchResultsTask) and
             second.tasks[job].progress() > 1, 60)
    assert second.tasks[job].progress() < 100, "the download ended before it could be cancelled"
    second.cancel(job)
    wait_for(qtbot, lambda: job not in second.tasks, 60)

    record = second.record(job)
    assert record.state == "succeeded" and not record.loaded and record.needs_fetch
    assert job_layers(job) == []
    final = Path(record.local_dir)
    assert files_under(final) == []
    staged = files_under(final.parent / f".{final.name}.partial")
    assert any(p.name == "zz_extra.bin.part" and p.stat().st_size < extra.stat().st_size
               for p in staged), staged
    assert not qgis_iface.messageBar().get_messages(Qgis.Success)
    assert any("cancelled; nothing was loaded" in m
               for m in qgis_iface.messageBar().get_messages(Qgis.Info))

    second.reattach()  # a later session (or Refresh) fetches again and loads the results
    wait_for(qtbot, lambda: second.record(job).loaded, 120)
    names = {p.name for p in files_under(final)}
    stem = dev_image(0).stem
    assert {f"{stem}_buildings.gpkg", f"{stem}_mask.tif", "zz_extra.bin"} <= names
    assert not any(name.endswith(".part") for name in names)
    assert (final / "outputs" / "masks" / "zz_extra.bin").stat().st_size == extra.stat().st_size
    layers = job_layers(job)
    assert sorted(type(lyr).__name__ for lyr in layers) == [QgsRasterLayer.__name__,
                                                            QgsVectorLayer.__name__]


def wrapped_profile(profile, tmp_path: Path, *, failing_cancel: bool = False):
    """The saved profile, with the real ``rs-cluster`` behind a wrapper on the "cluster":
    ``job submit`` answers only 3 s after the job started (a loaded login node), which gives a
    test the time to cancel or cut the link between the two; with ``failing_cancel``,
    ``job cancel`` fails the way it does when a job's processes will not stop."""
    import shlex

    real = shlex.join(profile.remote_command)
    cancel = ('if [ "$2" = cancel ]; then\n'
              '  echo "error: could not stop process(es) [4242] of the job" >&2; exit 2\nfi\n'
              if failing_cancel else "")
    wrapper = tmp_path / "rs-cluster-wrapper.sh"
    wrapper.write_text(f"""#!/bin/sh
{cancel}if [ "$2" = submit ]; then
  {real} "$@"; rc=$?
  sleep 3
  exit $rc
fi
exec {real} "$@"
""")
    wrapped = profile.__class__.from_dict({**profile.to_dict(),
                                           "remote_command": ["/bin/sh", str(wrapper)]})
    settings.save_profile(wrapped)
    return wrapped


def test_a_cancel_that_fails_right_after_submit_leaves_the_job_followed(
        qgis_iface, qtbot, profile, results_root, controllers, tmp_path):
    """Cancel lands while ``job submit`` is answering; the cancel that follows fails on the
    cluster. The job runs there, so the record follows it instead of saying "cancelled before
    start", and the failed cancel is reported."""
    wrapped_profile(profile, tmp_path, failing_cancel=True)
    controller = controllers()
    planned = sleep_job("cancel fails", 6.0, 6)
    job = planned.spec.job_id
    controller.start(profile.name, PreparedRun(planned, []), "predict")
    wait_for(qtbot, lambda: (job_dir(profile, job) / "status.json").exists(), 60)
    controller.cancel(job)  # the user pressed Cancel: the job has just started on the cluster

    wait_for(qtbot, lambda: controller.record(job).state == "running", 60)
    critical = qgis_iface.messageBar().get_messages(Qgis.Critical)
    assert any("could not cancel" in m.lower() and "could not stop process" in m
               for m in critical), critical
    assert controller.record(job).message != "cancelled before start"
    # followed to its end, as any running job
    wait_for(qtbot, lambda: controller.record(job).state == "succeeded" and
             job not in controller.tasks, 60)
    assert settings.load_jobs()[0].state == "succeeded"


def test_a_link_dropped_during_submit_is_looked_up_and_the_job_followed(
        qgis_iface, qtbot, sshd, profile, results_root, controllers, tmp_path):
    """The connection is cut while ``job submit`` answers: the plugin cannot tell whether the
    job started, so it looks it up on the cluster instead of leaving an "error" record."""
    wrapped_profile(profile, tmp_path)
    controller = controllers()
    planned = sleep_job("cut at submit", 4.0, 4)
    job = planned.spec.job_id
    submit = controller.start(profile.name, PreparedRun(planned, []), "predict")
    wait_for(qtbot, lambda: (job_dir(profile, job) / "status.json").exists() and
             running_a_command(sshd), 60)
    assert controller.tasks.get(job) is submit
    assert sshd.kill_connections() >= 1

    wait_for(qtbot, lambda: controller.record(job).state == "succeeded" and
             job not in controller.tasks, 90)
    assert settings.load_jobs()[0].state == "succeeded"
    assert any("cut at submit" in m for m in qgis_iface.messageBar().get_messages(Qgis.Warning))


def test_an_uncertain_submit_the_cluster_never_got_says_so(qtbot, profile, results_root,
                                                           controllers):
    """A record left "unknown" (QGIS closed while the job was being started, say) for a job the
    cluster does not have: the lookup says so, and the record is not watched forever."""
    from rs_qgis_plugin.logic import JobRecord

    settings.save_job(JobRecord(job_id="20260101-000000-00dead", name="never arrived",
                                profile=profile.name, mode="predict", state="unknown",
                                message="the connection dropped while the job was starting"))
    controller = controllers()
    controller.reattach()
    wait_for(qtbot, lambda: controller.record("20260101-000000-00dead").state == "error" and
             not controller.active_job_ids(), 60)
    record = controller.record("20260101-000000-00dead")
    assert "no such job" in record.message and "connection dropped" in record.message
