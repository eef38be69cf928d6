"""The connection profile editor's *Test connection* and *Probe cluster*: what ``rs-cluster env``
reports, said in words as plain text, against the real OpenSSH server and the real ``rs-cluster``
reading a real cluster settings file; the cluster's text is untrusted (markup shown literally,
wrong types read "?"), and nothing of the storage credentials is shown or remembered."""

from __future__ import annotations

import json
import os
import shlex
from pathlib import Path

import pytest
from qgis.core import QgsSettings, QgsTask
from qgis.PyQt.QtWidgets import QPlainTextEdit

from rs_qgis_plugin import settings
from rs_qgis_plugin.dock import runs_on_text
from rs_qgis_plugin.profiles_dialog import ProfilesDialog, format_env, format_probe
from rs_qgis_plugin.tasks import EnvTask
from tests.rs_qgis_plugin.conftest import loopback_profile, remote_rs_cluster, trust, wait_for

pytestmark = [pytest.mark.qgis, pytest.mark.usefixtures("qgis_env")]

SECRET_KEY = "wJalrXUtnFEMI-not-to-be-shown"
KEY_ID = "AKIA-not-to-be-shown"


def settings_file(folder: Path, text: str) -> Path:
    path = folder / "cluster.toml"
    path.write_text(text)
    path.chmod(0o600)  # it may hold storage keys: the cluster refuses it readable by others
    return path


def dialog_for(sshd, workspace: Path, cluster_toml: Path | None, name: str = "loopback", *,
               home: Path | None = None):
    """The dialog filled in as an analyst would, for the loopback cluster whose rs-cluster reads
    ``cluster_toml`` (as $RS_CLUSTER_CONFIG), or with none, its default in ``home``; the host key
    is already trusted."""
    p = loopback_profile(sshd, workspace, name=name)
    trust(sshd)
    dialog = ProfilesDialog()
    dialog.clear()
    dialog.name.setText(p.name)
    dialog.host.setText(p.host)
    dialog.port.setValue(p.port)
    dialog.user.setText(p.user)
    dialog.key_file.setFilePath(p.key_file)
    dialog.workspace.setText(p.remote_workspace)
    env = ([f"RS_CLUSTER_CONFIG={cluster_toml}"] if cluster_toml else
           ["-u", "RS_CLUSTER_CONFIG", "-u", "RS_SPARK_MASTER", f"HOME={home}"])
    dialog.command.setText(shlex.join(["/usr/bin/env", *env, *remote_rs_cluster()]))
    return dialog


def all_settings_text() -> str:
    s = QgsSettings()
    return "\n".join(f"{k}={s.value(k)}" for k in s.allKeys() if k.startswith("rs_qgis_plugin"))


@pytest.mark.ssh
def test_test_connection_says_where_jobs_run_with_what_and_remembers_only_the_master(
        sshd, tmp_path, qtbot):
    toml = settings_file(tmp_path, f"""
[spark]
master = "spark://<b>bold</b>:7077"
executor_memory = "4g"
max_cores = 8
[spark.conf]
"spark.executor.memoryOverhead" = "1g"
[storage]
url = "s3://rs-jobs/<i>team</i>"
credentials = "settings"
endpoint_url = "http://127.0.0.1:8333"
access_key_id = "{KEY_ID}"
secret_access_key = "{SECRET_KEY}"
""")
    dialog = dialog_for(sshd, tmp_path / "ws", toml)
    try:
        dialog.test_button.click()
        wait_for(qtbot, lambda: "Connected" in dialog.output.toPlainText()
                 or "failed" in dialog.output.toPlainText(), 120)
        text = dialog.output.toPlainText()
        assert isinstance(dialog.output, QPlainTextEdit)  # plain text: markup stays literal
        lines = text.splitlines()
        assert lines[0] == "Connected."
        assert lines[1] == ("Jobs run on: Spark master spark://<b>bold</b>:7077 (from settings "
                            f"file {toml})")
        assert lines[2] == f"Settings file: {toml}"
        assert lines[3] == ("Resources: executor memory 4g, max cores 8, "
                            "spark.executor.memoryOverhead=1g")
        assert lines[4] == ("Storage: s3://rs-jobs/<i>team</i>; credentials from settings file; "
                            "endpoint http://127.0.0.1:8333")
        versions = next(line for line in lines if line.startswith("Versions:"))
        assert versions.startswith("Versions: rs-cluster ") and ", Python 3." in versions
        assert "Spark 3." in versions and "TensorFlow " in versions and "Horovod " in versions
        assert "GPUs: " in text
        assert SECRET_KEY not in text and KEY_ID not in text
        assert dialog.test_button.isEnabled() and dialog.probe_button.isEnabled()
        # The dock now says where this profile's jobs run; nothing of storage is remembered.
        summary = settings.load_cluster_summary("loopback")
        assert summary["master"] == "spark://<b>bold</b>:7077"
        assert summary["master_source"] == f"settings file {toml}"
        assert runs_on_text(summary) == (f"Runs on: Spark master spark://<b>bold</b>:7077 "
                                         f"(from settings file {toml})")
        remembered = all_settings_text()
        assert "spark://<b>bold</b>:7077" in remembered
        for secret in (SECRET_KEY, KEY_ID, "rs-jobs", "8333"):
            assert secret not in remembered
    finally:
        settings.known_hosts_path().unlink(missing_ok=True)
        dialog.deleteLater()


@pytest.mark.ssh
def test_test_connection_without_a_settings_file_says_jobs_run_on_the_login_host(
        sshd, tmp_path, qtbot):
    home = tmp_path / "home of ana"
    home.mkdir()
    dialog = dialog_for(sshd, tmp_path / "ws", None, home=home)
    try:
        dialog.test_connection()
        wait_for(qtbot, lambda: "Connected" in dialog.output.toPlainText()
                 or "failed" in dialog.output.toPlainText(), 120)
        text = dialog.output.toPlainText()
        looked_for = home / ".rs-cluster" / "cluster.toml"
        assert f"Settings file: none (looked for {looked_for})" in text
        assert "Jobs run on: local[*] on the login host: no Spark master is set" in text
        assert "Resources: Spark's defaults (none set)" in text
        assert "Storage: none: jobs use their folder on the login host" in text
        assert runs_on_text(settings.load_cluster_summary("loopback")) == (
            "Runs on: local[*] on the login host: the cluster has no Spark master set")
        dialog.deleteLater()
        # A settings file named but missing is the answer, named, not a report of defaults.
        dialog = dialog_for(sshd, tmp_path / "ws", tmp_path / "no such cluster.toml")
        dialog.test_connection()
        wait_for(qtbot, lambda: "failed" in dialog.output.toPlainText(), 120)
        assert "no such cluster.toml ($RS_CLUSTER_CONFIG) does not exist" in \
            dialog.output.toPlainText()
    finally:
        settings.known_hosts_path().unlink(missing_ok=True)
        dialog.deleteLater()


@pytest.mark.ssh
@pytest.mark.spark
@pytest.mark.slow
def test_probe_cluster_runs_a_spark_job_and_lists_the_executors(sshd, tmp_path, qtbot):
    """The probe button runs ``rs-cluster env --probe``: a real Spark job (local[1]) whose
    executor writes, reads and deletes a probe object at a file:// storage URL."""
    store = tmp_path / "store"
    store.mkdir()
    toml = settings_file(tmp_path, f'[spark]\nmaster = "local[1]"\nexecutor_memory = "1g"\n'
                                   f'[storage]\nurl = "file://{store}"\n')
    dialog = dialog_for(sshd, tmp_path / "ws", toml)
    try:
        task = dialog.probe_cluster()
        assert task.probe and task.flags() & QgsTask.CancelWithoutPrompt
        assert not dialog.probe_button.isEnabled() and not dialog.test_button.isEnabled()
        wait_for(qtbot, lambda: "Ready" in dialog.output.toPlainText()
                 or "Problems" in dialog.output.toPlainText()
                 or "failed" in dialog.output.toPlainText(), 300)
        lines = dialog.output.toPlainText().splitlines()
        assert "Jobs run on: local[1] on the login host (from settings file " in lines[1]
        assert "Probe of Spark master local[1]: reachable yes" in lines
        assert f"Storage file://{store} from the login host: ok" in lines
        assert "Executors: 1" in lines
        executor = lines[lines.index("Executors: 1") + 1]
        assert executor.startswith("  ") and "(127.0.0.1): " in executor
        assert f"{os.cpu_count()} CPUs, executor cores default, memory 1g" in executor
        assert "TensorFlow yes, Horovod yes; storage ok" in executor
        assert lines[-1] == "Ready: no problems."
        assert not [p for p in store.rglob("*") if p.is_file()]  # the probe objects are gone
    finally:
        settings.known_hosts_path().unlink(missing_ok=True)
        dialog.deleteLater()


@pytest.mark.ssh
def test_probe_cluster_lists_the_problems_it_found(sshd, tmp_path, qtbot):
    """A master nobody listens at: the probe exits 1 with its report, which is shown."""
    toml = settings_file(tmp_path, '[spark]\nmaster = "spark://127.0.0.1:9"\n')
    dialog = dialog_for(sshd, tmp_path / "ws", toml)
    try:
        dialog.probe_button.click()
        wait_for(qtbot, lambda: "Problems" in dialog.output.toPlainText()
                 or "failed" in dialog.output.toPlainText(), 120)
        text = dialog.output.toPlainText()
        assert "Probe of Spark master spark://127.0.0.1:9: reachable no" in text
        assert "Executors: 0" in text
        assert "\nProblems:\n  - " in text
        assert "the Spark master spark://127.0.0.1:9 cannot be reached" in text
        assert "no storage.url in the settings" in text
        assert "Ready" not in text
    finally:
        settings.known_hosts_path().unlink(missing_ok=True)
        dialog.deleteLater()


# -- untrusted input, without a cluster ------------------------------------------------------------
HOSTILE_ENV = {
    "python": ["3.11"], "spark": None, "tensorflow": {"v": 2}, "rs_cluster": "<b>x</b>",
    "gpus": "many",
    "cluster": {"runs_on": {"where": "here"}, "settings_file": 42, "resources": "lots",
                "storage": {"url": "s3://b/<script>alert(1)</script>", "credentials": ["env"],
                            "secret_access_key": SECRET_KEY, "access_key_id": KEY_ID},
                "heartbeat_timeout_s": "soon", "shared_workspace": "maybe\nFake line: ok"},
}


def test_odd_values_from_the_cluster_read_as_question_marks_never_crash():
    text = format_env(HOSTILE_ENV)
    lines = text.splitlines()
    assert "Jobs run on: ?" in lines and "Settings file: 42" in lines
    assert "Resources: ?" in lines
    assert "Storage: s3://b/<script>alert(1)</script>; credentials from ?" in lines
    assert "Fake line: ok" not in lines  # a line break in a value cannot fake a line
    assert ("Versions: rs-cluster <b>x</b>, Python ?, Spark not installed, Horovod ?, "
            "TensorFlow ?") in lines
    assert "GPUs: ?" in lines
    assert SECRET_KEY not in text and KEY_ID not in text
    for odd in (None, "text", [1, 2], {"cluster": "x", "gpus": [None, {"name": 1}]}):
        assert format_env(odd)  # a report of question marks, not an exception
    probe = format_probe({"master": ["x"], "master_reachable": "perhaps",
                          "executors": [5, {"host": "<b>h</b>", "cpus": "many",
                                            "python_found": False, "python": "/venv/python"}],
                          "problems": "all"})
    lines = probe.splitlines()
    assert lines[0] == "Probe of Spark master ?: reachable perhaps"
    assert lines[1:4] == ["Executors: 2", "  ?",
                          "  <b>h</b> (?): many CPUs, executor cores default, memory default; "
                          "Python /venv/python (missing); TensorFlow ?, Horovod ?; storage "
                          "not set"]
    assert lines[-1] == "Problems: ?"
    for odd in (None, "x", {"executors": {"a": 1}, "problems": [None, 3]}):
        assert format_probe(odd)


def test_a_hostile_report_is_shown_as_plain_text_and_remembers_nothing_odd(sshd, tmp_path):
    """The dialog's own path from a finished task (a report no real rs-cluster sends)."""
    dialog = ProfilesDialog()
    try:
        task = EnvTask(loopback_profile(sshd, tmp_path / "ws", name="odd"), tmp_path / "kh",
                       None, probe=True)
        task.result = {**HOSTILE_ENV, "probe": {"executors": [], "problems": [
            "<a href='file:///etc/passwd'>fix me</a>"]}}
        dialog._tested(task)
        text = dialog.output.toPlainText()
        assert "  - <a href='file:///etc/passwd'>fix me</a>" in text.splitlines()
        assert SECRET_KEY not in text
        assert settings.load_cluster_summary("odd") is None  # no master, no sentence: nothing
        assert SECRET_KEY not in all_settings_text()
        task.result = {"cluster": {"master": "yarn", "master_source": "settings file /etc/x",
                                   "storage": {"secret_access_key": SECRET_KEY}}}
        dialog._tested(task)
        assert json.loads(QgsSettings().value(f"{settings.CLUSTER_SUMMARIES}/odd")) == {
            "master": "yarn", "master_source": "settings file /etc/x"}
        assert SECRET_KEY not in all_settings_text()
    finally:
        dialog.deleteLater()
