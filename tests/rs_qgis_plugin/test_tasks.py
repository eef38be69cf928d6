"""The job tasks against a real OpenSSH server on 127.0.0.1 running the real ``rs-cluster``.

Jobs here use the cluster's ``sleep`` self-test stage (it only waits and reports progress), so
progress and cancel are exercised in seconds; the round trip test runs a real prediction.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from qgis.core import Qgis

from rs_qgis_plugin import settings
from rs_qgis_plugin.controller import JobController, PreparedRun
from rs_qgis_plugin.core.jobs import RemoteJobs
from rs_qgis_plugin.core.jobspec import JobSpecBuilder
from rs_qgis_plugin.core.ssh import SshClient
from rs_qgis_plugin.logic import PlannedJob
from rs_qgis_plugin.tasks import SubmitJobTask, WatchJobTask
from tests.rs_qgis_plugin.conftest import dev_image, wait_for

pytestmark = [pytest.mark.qgis, pytest.mark.ssh, pytest.mark.usefixtures("qgis_env")]


def sleep_job(name: str, seconds: float, steps: int, **inputs) -> PlannedJob:
    spec = JobSpecBuilder(name).step("sleep", seconds=seconds, steps=steps).build()
    return PlannedJob(spec=spec, inputs={k: str(v) for k, v in inputs.items()}, fetch=())


def remote_status(profile, job_id):
    with SshClient(profile, settings.known_hosts_path()) as client:
        return RemoteJobs(client).status(job_id)


def test_submit_then_watch_report_progress_until_the_job_succeeds(profile):
    planned = sleep_job("progress", 4.0, 4, **{"inputs/images/tile.tif": dev_image(0)})
    submit = SubmitJobTask(profile, settings.known_hosts_path(), None, planned)
    upload_progress = []
    submit.progressChanged.connect(upload_progress.append)
    assert submit.run(), submit.error
    assert submit.result.state == "running" and upload_progress[-1] == 100.0
    uploaded = profile.remote_workspace + f"/jobs/{planned.spec.job_id}/inputs/images/tile.tif"
    assert open(uploaded, "rb").read() == dev_image(0).read_bytes()

    watch = WatchJobTask(profile, settings.known_hosts_path(), None, planned.spec.job_id,
                         poll_s=0.3)
    seen = []
    watch.status_changed.connect(seen.append)
    assert watch.run(), watch.error
    assert watch.result.state == "succeeded"
    progress = [s.progress for s in seen]
    # each poll is a new SSH command: on a busy machine it may see only some of the 4 steps
    assert progress == sorted(progress) and progress[-1] == 100.0
    assert any(0 < p < 100 for p in progress)


def test_cancelling_the_watch_cancels_the_job_on_the_cluster(profile):
    planned = sleep_job("long", 60.0, 60)
    submit = SubmitJobTask(profile, settings.known_hosts_path(), None, planned)
    assert submit.run(), submit.error
    watch = WatchJobTask(profile, settings.known_hosts_path(), None, planned.spec.job_id,
                         poll_s=0.3)
    watch.cancel()  # the user pressed Cancel
    assert watch.run() is False and watch.error is None
    assert watch.remote_cancelled.state == "cancelled"
    assert remote_status(profile, planned.spec.job_id).state == "cancelled"


def test_detaching_leaves_the_job_running(profile):
    planned = sleep_job("keeps running", 5.0, 5)
    assert SubmitJobTask(profile, settings.known_hosts_path(), None, planned).run()
    watch = WatchJobTask(profile, settings.known_hosts_path(), None, planned.spec.job_id)
    watch.detach()  # QGIS closing
    assert watch.run() is False and watch.remote_cancelled is None
    assert remote_status(profile, planned.spec.job_id).state == "running"


def test_an_unreachable_cluster_is_reported_with_the_reason(profile, tmp_path):
    broken = profile.__class__.from_dict({**profile.to_dict(), "port": 1, "connect_timeout": 2.0})
    task = SubmitJobTask(broken, settings.known_hosts_path(), None, sleep_job("x", 0.1, 1))
    assert task.run() is False
    assert "cannot reach 127.0.0.1:1" in str(task.error)


def test_cancel_in_the_panel_stops_the_job_here_and_on_the_cluster(qgis_iface, qtbot, profile,
                                                                   results_root):
    controller = JobController(qgis_iface, poll_s=0.3)
    planned = sleep_job("to cancel", 60.0, 60)
    job = planned.spec.job_id
    controller.start(profile.name, PreparedRun(planned, []), "predict")
    wait_for(qtbot, lambda: controller.record(job).state == "running", 60)
    wait_for(qtbot, lambda: isinstance(controller.tasks.get(job), WatchJobTask), 30)
    controller.cancel(job)
    wait_for(qtbot, lambda: controller.record(job).state == "cancelled" and
             job not in controller.tasks, 60)
    assert remote_status(profile, job).state == "cancelled"
    assert any("cancelled" in m for m in qgis_iface.messageBar().get_messages(Qgis.Info))


def test_reattach_after_restart_finds_the_job_and_finishes_it(qgis_iface, qtbot, profile,
                                                              results_root):
    """The controller is what the plugin keeps between load and unload: shutting it down and
    making a new one from the saved settings is what a QGIS restart does to it."""
    first = JobController(qgis_iface, poll_s=0.3)
    planned = sleep_job("overnight", 3.0, 3)
    job = planned.spec.job_id
    first.start(profile.name, PreparedRun(planned, []), "predict")
    wait_for(qtbot, lambda: first.record(job).state == "running", 60)
    first.shutdown()
    assert remote_status(profile, job).state == "running"

    second = JobController(qgis_iface, poll_s=0.3)
    assert second.record(job).state == "running"  # remembered through QgsSettings
    second.reattach()
    wait_for(qtbot, lambda: second.record(job).state == "succeeded" and second.record(job).loaded,
             60)
    assert [r.job_id for r in settings.load_jobs()] == [job]


def test_a_non_file_layer_is_exported_then_uploaded_in_one_run(qgis_iface, qtbot, profile,
                                                               results_root, tmp_path):
    import subprocess

    from qgis.core import QgsProject, QgsRasterLayer

    from rs_qgis_plugin.tasks import ExportRasterTask

    vrt = tmp_path / "mosaic.vrt"
    subprocess.run(["gdalbuildvrt", "-q", str(vrt), str(dev_image(0))], check=True)
    layer = QgsRasterLayer(str(vrt), "VRT mosaic", "gdal")
    QgsProject.instance().addMapLayer(layer)
    target = results_root / "exports" / "VRT_mosaic.tif"
    export = ExportRasterTask(layer, target)
    planned = sleep_job("exported", 0.5, 1, **{"inputs/images/VRT_mosaic.tif": target})
    controller = JobController(qgis_iface, poll_s=0.3)
    controller.start(profile.name, PreparedRun(planned, [export]), "predict")
    assert controller.record(planned.spec.job_id).state == "exporting"
    wait_for(qtbot, lambda: controller.record(planned.spec.job_id).state in ("running",
                                                                             "succeeded"), 60)
    uploaded = Path(profile.remote_workspace, "jobs", planned.spec.job_id, "inputs", "images",
                    "VRT_mosaic.tif")
    assert uploaded.read_bytes() == target.read_bytes()
    written = QgsRasterLayer(str(uploaded), "uploaded", "gdal")
    assert written.crs() == layer.crs() and written.extent() == layer.extent()
    wait_for(qtbot, lambda: not controller.tasks, 60)


def test_a_model_trained_by_an_earlier_job_is_reused_on_the_cluster(profile, tiny_model):
    """Predict with "Cluster: model of job ...": the model is copied into the new job's folder
    on the cluster (specs only name paths inside their own job folder); nothing is uploaded."""
    import shutil

    earlier = Path(profile.remote_workspace, "jobs", "20260101-000000-aaaaaa", "outputs", "model")
    shutil.copytree(tiny_model, earlier)
    planned = sleep_job("reuse", 0.2, 1)
    planned = PlannedJob(spec=planned.spec, inputs={}, fetch=(), model_job="20260101-000000-aaaaaa")
    task = SubmitJobTask(profile, settings.known_hosts_path(), None, planned)
    assert task.run(), task.error
    copied = Path(profile.remote_workspace, "jobs", planned.spec.job_id, "inputs", "model")
    assert (copied / "model.json").read_bytes() == (tiny_model / "model.json").read_bytes()
    assert (copied / "model.keras").stat().st_size == (tiny_model / "model.keras").stat().st_size


def test_a_job_to_an_untrusted_host_says_how_to_trust_it(qgis_iface, qtbot, profile,
                                                         results_root):
    settings.known_hosts_path().unlink()
    controller = JobController(qgis_iface)
    planned = sleep_job("untrusted", 0.1, 1)
    controller.start(profile.name, PreparedRun(planned, []), "predict")
    wait_for(qtbot, lambda: controller.record(planned.spec.job_id).state == "error", 60)
    message = controller.record(planned.spec.job_id).message
    assert "not known yet" in message and "Test connection" in message
    assert any("could not start" in m for m in qgis_iface.messageBar().get_messages(Qgis.Critical))


def test_cancel_while_the_watch_is_still_queued_still_cancels_on_the_cluster(qgis_iface, qtbot,
                                                                             profile,
                                                                             results_root):
    """A task cancelled before the task manager ran it never reaches the cluster itself."""

    class Queue:  # holds tasks the way a busy task manager would, then cancels one
        def __init__(self):
            self.tasks = []

        def addTask(self, task):  # noqa: N802 - QgsTaskManager's name
            self.tasks.append(task)

    queue = Queue()
    controller = JobController(qgis_iface, task_manager=queue, poll_s=0.3)
    planned = sleep_job("queued", 60.0, 60)
    job = planned.spec.job_id
    controller.start(profile.name, PreparedRun(planned, []), "predict")
    submit = queue.tasks.pop()
    assert submit.run()
    submit.finished(True)  # what the task manager calls in the GUI thread
    watch = queue.tasks.pop()
    assert isinstance(watch, WatchJobTask)
    controller.cancel(job)
    watch.finished(False)  # cancelled before it ever ran
    cancel = queue.tasks.pop()
    assert cancel.run()
    cancel.finished(True)
    assert controller.record(job).state == "cancelled"
    assert remote_status(profile, job).state == "cancelled"
