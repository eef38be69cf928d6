"""The job tasks against a real OpenSSH server on 127.0.0.1 running the real ``rs-cluster``.

Jobs here use the cluster's ``sleep`` self-test stage (it only waits and reports progress), so
progress and cancel are exercised in seconds; the round trip test runs a real prediction.
"""

from __future__ import annotations

import html
from pathlib import Path

import pytest
from qgis.core import Qgis
from qgis.PyQt.QtCore import Qt
from qgis.PyQt.QtWidgets import QMessageBox

from rs_qgis_plugin import settings
from rs_qgis_plugin.controller import JobController, PreparedRun
from rs_qgis_plugin.core.jobs import RemoteJobs
from rs_qgis_plugin.core.jobspec import JobSpecBuilder
from rs_qgis_plugin.core.ssh import SshClient
from rs_qgis_plugin.jobs_panel import JobsPanel
from rs_qgis_plugin.logic import JobRecord, PlannedJob
from rs_qgis_plugin.tasks import SubmitJobTask, WatchJobTask
from tests.cluster_selftest import plugin_sleep_spec
from tests.rs_qgis_plugin.conftest import dev_image, wait_for

pytestmark = [pytest.mark.qgis, pytest.mark.ssh, pytest.mark.usefixtures("qgis_env")]


def sleep_job(name: str, seconds: float, steps: int, **inputs) -> PlannedJob:
    spec = plugin_sleep_spec(name, seconds=seconds, steps=steps)
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
    watch.cancel_job()  # the user pressed Cancel job
    assert watch.run() is False and watch.error is None
    assert watch.remote_cancelled.state == "cancelled"
    assert remote_status(profile, planned.spec.job_id).state == "cancelled"


def test_the_task_managers_cancel_only_stops_watching(profile):
    """QGIS's task manager calls cancel() on exit (cancelAll) and from its panel: the job must
    keep running; QGIS may do it without asking, and the task names the job."""
    from qgis.core import QgsTask

    planned = sleep_job("kept on exit", 5.0, 5)
    assert SubmitJobTask(profile, settings.known_hosts_path(), None, planned).run()
    watch = WatchJobTask(profile, settings.known_hosts_path(), None, planned.spec.job_id,
                         name="kept on exit")
    assert watch.flags() & QgsTask.CancelWithoutPrompt
    assert "kept on exit" in watch.description()
    watch.cancel()
    assert watch.run() is False and watch.remote_cancelled is None
    assert remote_status(profile, planned.spec.job_id).state == "running"


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
    assert "cannot connect to 127.0.0.1:1: connection refused" in str(task.error)


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
    """Predict with "Cluster: model of job ...": the model is hard-linked into the new job's
    folder on the cluster (specs only name paths inside their own job folder); nothing is
    uploaded, no second copy takes disk space, and cleaning the training job leaves it whole."""
    import shutil

    earlier = Path(profile.remote_workspace, "jobs", "20260101-000000-aaaaaa", "outputs", "model")
    shutil.copytree(tiny_model, earlier)
    planned = sleep_job("reuse", 0.2, 1)
    planned = PlannedJob(spec=planned.spec, inputs={}, fetch=(), model_job="20260101-000000-aaaaaa")
    task = SubmitJobTask(profile, settings.known_hosts_path(), None, planned)
    assert task.run(), task.error
    copied = Path(profile.remote_workspace, "jobs", planned.spec.job_id, "inputs", "model")
    assert (copied / "model.json").read_bytes() == (tiny_model / "model.json").read_bytes()
    # the same file on the cluster's disk, not a copy of it
    assert (copied / "model.keras").stat().st_ino == (earlier / "model.keras").stat().st_ino
    shutil.rmtree(earlier.parents[1])  # what `rs-cluster job clean` does to the training job
    assert (copied / "model.keras").read_bytes() == (tiny_model / "model.keras").read_bytes()


def test_a_model_on_another_filesystem_is_copied_instead(profile, tiny_model):
    """Hard links cannot cross filesystems (a training job's folder on scratch, say): the model
    is then copied, and the job still starts."""
    import shutil
    import tempfile

    if Path("/dev/shm").stat().st_dev == Path(profile.remote_workspace).parent.stat().st_dev:
        pytest.skip("/dev/shm is on the same filesystem as the workspace here")
    scratch = Path(tempfile.mkdtemp(dir="/dev/shm"))
    try:
        shutil.copytree(tiny_model, scratch / "outputs" / "model")
        jobs_dir = Path(profile.remote_workspace, "jobs")
        jobs_dir.mkdir(parents=True, exist_ok=True)
        (jobs_dir / "20260101-000000-bbbbbb").symlink_to(scratch)
        planned = sleep_job("reuse from scratch", 0.2, 1)
        planned = PlannedJob(spec=planned.spec, inputs={}, fetch=(),
                             model_job="20260101-000000-bbbbbb")
        task = SubmitJobTask(profile, settings.known_hosts_path(), None, planned)
        assert task.run(), task.error
        copied = jobs_dir / planned.spec.job_id / "inputs" / "model"
        assert (copied / "model.keras").read_bytes() == (tiny_model / "model.keras").read_bytes()
        assert not (copied / "model.keras").is_symlink()
    finally:
        shutil.rmtree(scratch)


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


# -- records and the cluster's job list --------------------------------------------------------
def started_on_the_cluster(profile, name: str, seconds: float = 0.1, steps: int = 1,
                           wait: bool = True) -> str:
    """A job started on the (loopback) cluster without this QGIS knowing (another computer, an
    older plugin); with ``wait``, it has ended by the time this returns."""
    import time

    planned = sleep_job(name, seconds, steps)
    task = SubmitJobTask(profile, settings.known_hosts_path(), None, planned)
    assert task.run(), task.error
    deadline = time.monotonic() + 60
    while wait and remote_status(profile, planned.spec.job_id).state == "running":
        assert time.monotonic() < deadline
        time.sleep(0.2)
    return planned.spec.job_id


def remembered(profile, job_id: str, name: str, state: str, **fields) -> JobRecord:
    record = JobRecord(job_id=job_id, name=name, profile=profile.name, mode="predict",
                       state=state, created=job_id, **fields)
    settings.save_job(record)
    return record


def panel_row(panel, job_id: str) -> int:
    rows = [r for r in range(panel.table.rowCount())
            if panel.table.item(r, 0).data(Qt.UserRole) == job_id]
    assert rows, f"no row for {job_id}"
    return rows[0]


def test_refresh_reconciles_the_records_with_the_clusters_job_list(qgis_iface, qtbot, profile,
                                                                   results_root):
    import shutil

    # finished and loaded here, then its folder was deleted on the cluster
    cleaned = started_on_the_cluster(profile, "cleaned elsewhere")
    remembered(profile, cleaned, "cleaned elsewhere", "succeeded", loaded=True)
    shutil.rmtree(Path(profile.remote_workspace, "jobs", cleaned))
    # an "error" record of a job that did start (the link dropped while it was submitted)
    errored = started_on_the_cluster(profile, "errored but ran", 2.0, 2, wait=False)
    remembered(profile, errored, "errored but ran", "error", message="connection dropped")
    # started from another computer: on the cluster, unknown here
    elsewhere = started_on_the_cluster(profile, "from the laptop")

    controller = JobController(qgis_iface, poll_s=0.3)
    panel = JobsPanel(controller)
    try:
        panel.refresh_button.click()
        wait_for(qtbot, lambda: controller.record(errored).state == "succeeded" and
                 controller.record(errored).loaded and not controller.active_job_ids(), 60)
        gone = controller.record(cleaned)
        assert gone.state == "succeeded" and gone.gone and not gone.needs_fetch
        assert "not on the cluster" in panel.table.item(panel_row(panel, cleaned),
                                                              1).text()
        # listed, not adopted behind the analyst's back
        assert elsewhere not in [r.job_id for r in settings.load_jobs()]
        row = panel_row(panel, elsewhere)
        assert "not started here" in panel.table.item(row, 1).text()
        assert panel.table.item(row, 0).text() == "from the laptop"
        panel.table.selectRow(row)
        assert panel.load_button.isEnabled()
        panel.load_button.click()  # adopts it: recorded here, its results fetched
        wait_for(qtbot, lambda: elsewhere in [r.job_id for r in settings.load_jobs()] and
                 controller.record(elsewhere).loaded, 60)
        # one row for it, now a record's
        assert "not started here" not in panel.table.item(panel_row(panel, elsewhere), 1).text()
        assert panel.table.rowCount() == 3
    finally:
        controller.shutdown()
        panel.deleteLater()


@pytest.mark.parametrize("answer", [QMessageBox.Yes, QMessageBox.No], ids=["deleted", "kept"])
def test_forget_offers_to_delete_the_jobs_folder_on_the_cluster(qgis_iface, qtbot, profile,
                                                                results_root, monkeypatch,
                                                                answer):
    job = started_on_the_cluster(profile, "to forget")
    folder = Path(profile.remote_workspace, "jobs", job)
    remembered(profile, job, "to forget", "succeeded", loaded=True)
    asked = []

    def question(parent, title, text, *args):
        asked.append(text)
        return answer

    monkeypatch.setattr(QMessageBox, "question", question)
    controller = JobController(qgis_iface)
    panel = JobsPanel(controller)
    try:
        panel.table.selectRow(panel_row(panel, job))
        panel.forget_button.click()
        assert len(asked) == 1 and "folder" in asked[0] and "to forget" in asked[0]
        if answer == QMessageBox.Yes:  # deleted by a task, not in the GUI thread
            from rs_qgis_plugin.tasks import CleanJobTask

            assert isinstance(controller.tasks.get(job), CleanJobTask)
        wait_for(qtbot, lambda: not controller.records() and not controller.tasks, 60)
        assert settings.load_jobs() == [] and panel.table.rowCount() == 0
        assert folder.exists() == (answer == QMessageBox.No)
    finally:
        controller.shutdown()
        panel.deleteLater()


HOSTILE = '<a href="file:///etc/passwd">click</a><b>bold</b>'


def test_cluster_text_is_shown_as_plain_text(qgis_iface, qtbot, profile, results_root):
    """A status message that looks like HTML (a compromised or careless cluster) is shown as
    the text it is: no link in the message bar, none in the jobs panel's tooltips."""
    import json

    from qgis.PyQt.QtGui import QTextDocument

    job = started_on_the_cluster(profile, "hostile")
    status_file = Path(profile.remote_workspace, "jobs", job, "status.json")
    status = json.loads(status_file.read_text())
    status.update(state="failed", message=HOSTILE)
    status_file.write_text(json.dumps(status))
    remembered(profile, job, "hostile", "running")

    controller = JobController(qgis_iface, poll_s=0.3)
    panel = JobsPanel(controller)
    try:
        controller.reattach()
        wait_for(qtbot, lambda: controller.record(job).state == "failed" and
                 not controller.active_job_ids(), 60)
        pushed = [m for m in qgis_iface.messageBar().get_messages(Qgis.Critical) if "hostile" in m]
        assert pushed, qgis_iface.messageBar().get_messages(Qgis.Critical)
        assert "<a" not in pushed[0] and "<b>" not in pushed[0]
        assert html.escape(HOSTILE, quote=False) in pushed[0]
        tip = panel.table.item(panel_row(panel, job), 0).toolTip()
        assert "<a " not in tip
        shown = QTextDocument()
        shown.setHtml(tip)
        assert HOSTILE in shown.toPlainText()
    finally:
        controller.shutdown()
        panel.deleteLater()


def test_warnings_of_a_job_reach_the_log_the_panel_and_the_done_message(qgis_iface, qtbot,
                                                                       profile, results_root):
    """A real ``rs-cluster evaluate`` given a prediction without a reference warns that it is
    not scored; the analyst sees the warning in the log tab, the jobs panel and the message."""
    from qgis.core import QgsApplication

    from rs_qgis_plugin.log import TAB, setup_logging
    from rs_qgis_plugin.logic import MASKS, REPORT
    from tests.rs_qgis_plugin.conftest import dev_mask

    spec = JobSpecBuilder("lonely prediction").evaluate(pred="inputs/predicted", truth=MASKS,
                                                        json=REPORT).build()
    planned = PlannedJob(spec=spec, fetch=(REPORT,), inputs={
        "inputs/predicted/a_mask.tif": str(dev_mask(0)),
        "inputs/predicted/b_mask.tif": str(dev_mask(1)),
        f"{MASKS}/a.tif": str(dev_mask(0))})
    job = spec.job_id
    logged = []

    def on_message(message, tag, level):
        if tag == TAB:
            logged.append((message, level))

    setup_logging()
    QgsApplication.messageLog().messageReceived.connect(on_message)
    controller = JobController(qgis_iface, poll_s=0.3)
    panel = JobsPanel(controller)
    try:
        controller.start(profile.name, PreparedRun(planned, []), "evaluate")
        wait_for(qtbot, lambda: controller.record(job).loaded, 120)
    finally:
        QgsApplication.messageLog().messageReceived.disconnect(on_message)
    try:
        record = controller.record(job)
        assert record.warnings == 1 and "b_mask.tif: no reference" in record.recent_warnings[0]
        assert settings.load_jobs()[0].warnings == 1  # kept across restarts
        assert any("b_mask.tif: no reference" in m and level == Qgis.Warning
                   for m, level in logged), logged
        done = [m for m in qgis_iface.messageBar().get_messages(Qgis.Success)
                if "lonely prediction done" in m]
        assert done and "1 warning" in done[0], done
        row = panel_row(panel, job)
        warnings_column = JobsPanel.COLUMNS.index("warnings")
        cell = panel.table.item(row, warnings_column)
        assert cell.text() == "1" and "b_mask.tif: no reference" in cell.toolTip()

        # a restart replays no warning: the count stays
        controller.shutdown()
        again = JobController(qgis_iface, poll_s=0.3)
        again.reattach()
        wait_for(qtbot, lambda: not again.active_job_ids(), 60)
        assert again.record(job).warnings == 1
        again.shutdown()
    finally:
        panel.deleteLater()
