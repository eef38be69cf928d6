"""Quitting QGIS while a job runs: QGIS closes by itself, the job keeps running on the cluster,
and the next QGIS start follows it to its end (issue 13).

The first test is the real thing: QGIS desktop under Xvfb with the plugin installed from the zip
``make package`` builds, against the real OpenSSH server and ``rs-cluster`` (its sleep self-test
stage). The others exercise the same paths in pytest-qgis's QGIS: the task manager cancelling
the plugin's tasks as ``QgisApp::fileExit`` and the task manager panel do, and the plugin's own
*Cancel job*.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from tests.rs_qgis_plugin.conftest import REPO, loopback_profile, wait_for

pytestmark = [pytest.mark.qgis, pytest.mark.ssh]

# Runs inside QGIS (``qgis --code``), in its GUI thread, once the window and the plugin are up.
INNER = r'''
import json, sys, traceback
from pathlib import Path
from qgis.core import QgsApplication, QgsProject
from qgis.PyQt.QtCore import QTimer
from qgis.PyQt.QtWidgets import QApplication
from qgis.utils import iface, plugins

CONFIG = json.loads(Path(__CONFIG__).read_text())
STATE = Path(CONFIG["state"])
state = json.loads(STATE.read_text()) if STATE.exists() else {}
state[CONFIG["phase"]] = phase = {"error": None, "modal": None}


def save():
    STATE.write_text(json.dumps(state, indent=1))


def fail(text):
    phase["error"] = text
    save()
    QgsApplication.instance().exit(3)


def watch_for_dialogs():
    # A question QGIS asks blocks the exit: record it, so the test says what was asked.
    widget = QApplication.activeModalWidget()
    if widget is not None:
        phase["modal"] = widget.windowTitle() + ": " + getattr(widget, "text", lambda: "")()
        save()
    QTimer.singleShot(1000, watch_for_dialogs)


def until(predicate, then, timeout_s, what):
    deadline = [timeout_s * 10]

    def step():
        try:
            if predicate():
                then()
                return
            deadline[0] -= 1
            if deadline[0] <= 0:
                fail("timed out waiting for " + what)
                return
            QTimer.singleShot(100, step)
        except Exception:
            fail(traceback.format_exc())
    step()


def quit_as_the_user_does():
    QgsProject.instance().setDirty(False)
    phase["closing"] = True
    save()
    watch_for_dialogs()
    iface.mainWindow().close()  # the window's close button / File > Exit QGIS


def start():
    plugin = plugins["rs_qgis_plugin"]
    from rs_qgis_plugin import settings
    from rs_qgis_plugin.controller import PreparedRun
    from rs_qgis_plugin.core.profile import ConnectionProfile
    from rs_qgis_plugin.logic import PlannedJob
    from rs_qgis_plugin.tasks import WatchJobTask
    sys.path.append(CONFIG["repo"])  # the sleep stage's spec (the plugin itself is the zip's)
    from tests.cluster_selftest import plugin_sleep_spec

    settings.save_profile(ConnectionProfile.from_dict(CONFIG["profile"]))
    spec = plugin_sleep_spec("overnight", seconds=CONFIG["seconds"], steps=CONFIG["seconds"])
    controller = plugin.controller
    controller.start(CONFIG["profile"]["name"], PreparedRun(PlannedJob(spec=spec, inputs={}, fetch=()), []),
                     "predict")
    phase["job_id"] = job = spec.job_id

    def watched():
        task = controller.tasks.get(job)
        return isinstance(task, WatchJobTask) and controller.record(job).state == "running" \
            and controller.record(job).progress > 0

    def running():
        phase["task"] = controller.tasks[job].description()
        save()
        quit_as_the_user_does()
    until(watched, running, 120, "the job to run")


def reattach():
    plugin = plugins["rs_qgis_plugin"]
    from rs_qgis_plugin.tasks import WatchJobTask
    controller = plugin.controller
    job = state["start"]["job_id"]
    phase["watched"] = False

    def done():
        if isinstance(controller.tasks.get(job), WatchJobTask):
            phase["watched"] = True
        record = controller.record(job)
        return record.state == "succeeded" and record.loaded

    def finished():
        phase["record"] = controller.record(job).to_json()
        save()
        quit_as_the_user_does()
    until(done, finished, 180, "the reattached job to finish")


def run():
    try:
        if plugins.get("rs_qgis_plugin") is None:
            fail("the plugin is not loaded: " + ", ".join(plugins))
            return
        {"start": start, "reattach": reattach}[CONFIG["phase"]]()
    except Exception:
        fail(traceback.format_exc())


QTimer.singleShot(2000, run)
'''


def install_plugin(zip_path: Path, profiles: Path) -> Path:
    """The plugin installed from its zip as scripts/qgis_screenshot.py installs it, enabled; the
    QGIS profile folder."""
    spec = importlib.util.spec_from_file_location("qgis_screenshot",
                                                  REPO / "scripts" / "qgis_screenshot.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    return script.install_plugin(zip_path, profiles).parents[2]  # <profile>/python/plugins/<it>


class Desktop:
    """QGIS desktop under Xvfb on one temporary profile, started once per phase."""

    def __init__(self, work: Path, config: dict) -> None:
        self.work = work
        self.config = config
        self.state = work / "state.json"
        self.code = work / "inner.py"
        self.code.write_text(INNER.replace("__CONFIG__", repr(str(work / "config.json"))))
        (work / "runtime").mkdir(mode=0o700, exist_ok=True)

    def start(self, phase: str) -> subprocess.Popen:
        (self.work / "config.json").write_text(json.dumps({**self.config, "phase": phase,
                                                           "state": str(self.state)}))
        # QGIS embeds the system Python: no venv's python3 first on the PATH, no PYTHONHOME.
        env = {k: v for k, v in os.environ.items()
               if k not in ("PYTHONHOME", "PYTHONPATH", "VIRTUAL_ENV", "QT_QPA_PLATFORM")}
        env.update(PATH="/usr/bin:/bin:/usr/sbin:/sbin", GDAL_PAM_ENABLED="NO",
                   QT_QPA_PLATFORM="xcb", XDG_RUNTIME_DIR=str(self.work / "runtime"))
        log = open(self.work / f"{phase}.log", "wb")  # noqa: SIM115 - QGIS writes until it exits
        proc = subprocess.Popen(
            ["xvfb-run", "-a", "-s", "-screen 0 1280x900x24", "qgis", "--profiles-path",
             str(self.work), "--nologo", "--noversioncheck", "--code", str(self.code)],
            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        return proc

    def phase(self, name: str) -> dict:
        state = json.loads(self.state.read_text()) if self.state.exists() else {}
        return state.get(name, {})

    def log(self, phase: str) -> str:
        return (self.work / f"{phase}.log").read_text(errors="replace")[-3000:]

    def wait_closing(self, proc: subprocess.Popen, phase: str, timeout_s: float) -> dict:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            state = self.phase(phase)
            if state.get("closing") or state.get("error") or proc.poll() is not None:
                return state
            time.sleep(0.5)
        stop(proc)
        pytest.fail(f"QGIS ({phase}) never got to closing: {self.log(phase)}")

    def wait_exit(self, proc: subprocess.Popen, phase: str, timeout_s: float) -> int:
        try:
            return proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            asked = self.phase(phase).get("modal")
            stop(proc)
            pytest.fail(f"QGIS ({phase}) did not exit within {timeout_s:g} s of closing its "
                        f"window; it asked: {asked!r}\n{self.log(phase)}")

    def run_phase(self, phase: str) -> dict:
        """Starts QGIS for ``phase``, waits until the script closes the window and QGIS exits
        by itself with rc 0; the state the script reported."""
        proc = self.start(phase)
        try:
            state = self.wait_closing(proc, phase, 240)
            assert not state.get("error"), state["error"]
            rc = self.wait_exit(proc, phase, 60)
        finally:
            stop(proc)
        assert rc == 0, self.log(phase)
        return state


def stop(proc: subprocess.Popen) -> None:
    """Ends the xvfb-run session this test started (its own process group)."""
    if proc.poll() is None:
        os.killpg(proc.pid, 9)
        proc.wait(10)


def scripted_questions(monkeypatch):
    """QMessageBox.question answered by the test: (the texts asked, ``answer(reply)`` to set the
    reply to the next questions)."""
    from qgis.PyQt.QtWidgets import QMessageBox

    asked: list[str] = []

    def answer(reply):
        def question(parent, title, text, *args):
            asked.append(text)
            return reply
        monkeypatch.setattr(QMessageBox, "question", question)

    return asked, answer


def remote_state(profile, known_hosts: Path, job_id: str) -> str:
    from rs_qgis_plugin.core.jobs import RemoteJobs
    from rs_qgis_plugin.core.ssh import SshClient

    with SshClient(profile, known_hosts) as client:
        return RemoteJobs(client).status(job_id).state


@pytest.mark.slow
@pytest.mark.skipif(not (shutil.which("qgis") and shutil.which("xvfb-run")),
                    reason="QGIS desktop or xvfb-run not installed")
def test_closing_qgis_keeps_the_job_running_and_the_next_start_follows_it(sshd, tmp_path):
    from rs_qgis_plugin.core.ssh import trust_host_key

    subprocess.run(["make", "-s", "package"], cwd=REPO, check=True, timeout=120)
    work = tmp_path / "qgis"
    profile_dir = install_plugin(REPO / "build" / "rs_qgis_plugin.zip", work)
    profile = loopback_profile(sshd, tmp_path / "workspace")
    known_hosts = profile_dir / "rs_qgis_plugin" / "known_hosts"
    trust_host_key(known_hosts, "127.0.0.1", sshd.port, *sshd.public_host_key)
    desktop = Desktop(work, {"profile": profile.to_dict(), "repo": str(REPO), "seconds": 40})

    state = desktop.run_phase("start")
    assert "overnight" in state["task"]  # the task manager names the job, not only its id
    job = state["job_id"]
    assert remote_state(profile, known_hosts, job) == "running"  # not cancelled by the exit

    state = desktop.run_phase("reattach")
    record = json.loads(state["record"])
    assert record["state"] == "succeeded" and record["loaded"]
    assert remote_state(profile, known_hosts, job) == "succeeded"


# -- in pytest-qgis's QGIS ----------------------------------------------------------------------
def sleep_run(name: str, seconds: float):
    from rs_qgis_plugin.controller import PreparedRun
    from rs_qgis_plugin.logic import PlannedJob
    from tests.cluster_selftest import plugin_sleep_spec

    spec = plugin_sleep_spec(name, seconds=seconds, steps=int(seconds))
    return PreparedRun(PlannedJob(spec=spec, inputs={}, fetch=()), [])


def started(controller, qtbot, profile, name: str, seconds: float = 60.0) -> str:
    from rs_qgis_plugin.tasks import WatchJobTask

    run = sleep_run(name, seconds)
    job = run.planned.spec.job_id
    controller.start(profile.name, run, "predict")
    wait_for(qtbot, lambda: controller.record(job).state == "running" and
             isinstance(controller.tasks.get(job), WatchJobTask), 60)
    return job


def cluster_state(profile, job: str) -> str:
    from rs_qgis_plugin import settings

    return remote_state(profile, settings.known_hosts_path(), job)


@pytest.mark.usefixtures("qgis_env")
def test_cancel_job_asks_first_and_cancels_on_the_cluster_only_on_yes(qgis_iface, qtbot, profile,
                                                                      results_root, monkeypatch):
    from qgis.PyQt.QtWidgets import QMessageBox

    from rs_qgis_plugin.controller import JobController
    from rs_qgis_plugin.dock import RunDock

    controller = JobController(qgis_iface, poll_s=0.3)
    dock = RunDock(qgis_iface, controller)
    panel = dock.jobs_panel
    job = started(controller, qtbot, profile, "ask before cancel")
    asked, answer = scripted_questions(monkeypatch)

    try:
        panel.table.selectRow(0)
        assert panel.selected_job() == job
        answer(QMessageBox.No)
        panel.cancel_button.click()
        dock.cancel()  # the Run tab's Cancel button
        assert len(asked) == 2 and all("ask before cancel" in t for t in asked)
        qtbot.wait(1500)
        assert cluster_state(profile, job) == "running" and job in controller.tasks
        answer(QMessageBox.Yes)
        panel.cancel_button.click()
        wait_for(qtbot, lambda: controller.record(job).state == "cancelled" and
                 job not in controller.tasks, 60)
        assert cluster_state(profile, job) == "cancelled"
    finally:
        controller.shutdown()
        dock.disconnect_project()
        dock.deleteLater()


@pytest.mark.usefixtures("qgis_env")
def test_the_task_managers_cancel_all_leaves_the_job_running_and_listed(qgis_iface, qtbot,
                                                                        profile, results_root):
    """What QgisApp::fileExit does with tasks flagged CancelWithoutPrompt (and what the task
    panel's cancel button does to one): the real task manager cancels them."""
    from qgis.core import Qgis, QgsApplication, QgsTask

    from rs_qgis_plugin.controller import JobController

    controller = JobController(qgis_iface, poll_s=0.3)
    job = started(controller, qtbot, profile, "left running")
    try:
        manager = QgsApplication.taskManager()
        ours = [t for t in manager.activeTasks() if "left running" in t.description()]
        assert ours and all(t.flags() & QgsTask.CancelWithoutPrompt for t in ours)
        manager.cancelAll()
        wait_for(qtbot, lambda: job not in controller.tasks, 30)
        assert cluster_state(profile, job) == "running"
        assert controller.record(job).state == "running"  # still listed, Refresh follows it
        assert any("keeps running" in m for m in qgis_iface.messageBar().get_messages(Qgis.Info))
    finally:
        controller.shutdown()


@pytest.mark.usefixtures("qgis_env")
def test_shutdown_waits_until_no_task_runs_python_and_the_job_keeps_running(qgis_iface, qtbot,
                                                                            profile,
                                                                            results_root):
    from rs_qgis_plugin.controller import JobController

    controller = JobController(qgis_iface, poll_s=0.3)
    job = started(controller, qtbot, profile, "outlives qgis")
    task = controller.tasks[job]
    wait_for(qtbot, lambda: controller.record(job).progress > 0, 30)  # run() is under way
    assert controller.shutdown(wait_s=20) == []
    assert task.ran.is_set()
    assert cluster_state(profile, job) == "running"


# -- orientation: the jobs panel -------------------------------------------------------------------
@pytest.mark.usefixtures("qgis_env")
def test_the_jobs_panel_shows_details_follows_the_selection_and_opens_the_folder(
        qgis_iface, qtbot, profile, results_root, tmp_path, monkeypatch):
    from qgis.PyQt.QtGui import QDesktopServices
    from qgis.PyQt.QtWidgets import QFileDialog, QHeaderView

    from rs_qgis_plugin import settings
    from rs_qgis_plugin.controller import JobController
    from rs_qgis_plugin.dock import RunDock

    controller = JobController(qgis_iface, poll_s=0.3)
    dock = RunDock(qgis_iface, controller)
    panel = dock.jobs_panel
    try:
        run = sleep_run("a <b>named</b> job", 2.0)
        job = run.planned.spec.job_id
        controller.start(profile.name, run, "predict")
        wait_for(qtbot, lambda: controller.record(job).state == "succeeded" and
                 controller.record(job).loaded, 90)
        # the Run tab's status line is not left at "started" once the job is done
        assert "succeeded" in dock.status.text()
        panel.table.selectRow(0)
        details = panel.details.toPlainText()
        assert "a <b>named</b> job" in details and job in details  # plain text, as sent
        assert "slept 2/2" in details  # the job's events
        assert "Parameters:" in details and "seconds=2.0" in details  # what the job ran with
        assert "not read yet" in details
        panel.log_button.click()  # the log's last lines, read on the cluster over SSH
        wait_for(qtbot, lambda: "selftest-sleep" in panel.details.toPlainText(), 60)
        assert "not read yet" not in panel.details.toPlainText()
        assert "succeeded" in dock.status.text() and "a <b>named</b> job" in dock.status.text()
        header = panel.table.horizontalHeader()
        assert header.sectionResizeMode(0) == QHeaderView.Interactive
        for col in range(panel.table.columnCount() - 1):
            assert panel.table.columnWidth(col) >= panel.table.sizeHintForColumn(col)

        opened = []
        monkeypatch.setattr(QDesktopServices, "openUrl", lambda url: opened.append(url))
        panel.open_folder_button.click()
        assert opened and Path(opened[0].toLocalFile()) in (
            Path(controller.record(job).local_dir), settings.results_dir())
        chosen = tmp_path / "my results"
        monkeypatch.setattr(QFileDialog, "getExistingDirectory", lambda *a: str(chosen))
        panel.choose_folder_button.click()
        assert settings.results_dir() == chosen and str(chosen) in panel.folder_label.text()
    finally:
        controller.shutdown()
        dock.disconnect_project()
        dock.deleteLater()


@pytest.mark.usefixtures("qgis_env")
def test_results_go_into_the_project_the_job_was_started_from(qgis_iface, qtbot, profile,
                                                               results_root, tmp_path,
                                                               monkeypatch):
    import shutil as sh

    from qgis.core import QgsProject
    from qgis.PyQt.QtWidgets import QMessageBox

    from rs_qgis_plugin.controller import JobController
    from tests.rs_qgis_plugin.conftest import dev_image, dev_mask

    project = QgsProject.instance()
    started_from = tmp_path / "city.qgz"
    assert project.write(str(started_from))
    controller = JobController(qgis_iface, poll_s=0.3)
    run = sleep_run("city job", 0.5)
    job = run.planned.spec.job_id
    controller.start(profile.name, run, "predict")
    wait_for(qtbot, lambda: job not in controller.tasks and
             controller.record(job).state == "succeeded", 60)
    record = controller.record(job)
    assert record.project == str(started_from)

    mask = tmp_path / "dl" / f"{dev_image(0).stem}_mask.tif"
    mask.parent.mkdir()
    sh.copyfile(dev_mask(0), mask)
    project.clear()  # QGIS restarted onto an empty project
    asked, answer = scripted_questions(monkeypatch)

    answer(QMessageBox.Cancel)
    assert controller.load(record, [mask]) == [] and project.count() == 0
    assert "city.qgz" in asked[-1] and "not loaded yet" in controller.record(job).message
    answer(QMessageBox.No)
    assert len(controller.load(record, [mask])) == 1 and project.count() == 1
    project.clear()
    answer(QMessageBox.Yes)
    layers = controller.load(record, [mask])
    assert len(layers) == 1 and project.fileName() == str(started_from)
    assert project.mapLayer(layers[0].id()) is not None
    asked.clear()
    controller.load(record, [mask])  # that project is open now: nothing to ask
    assert asked == []
    controller.shutdown()
