"""The connection profile editor: where the cluster is, how to log in, where rs-cluster lives.

The key passphrase goes to QGIS's authentication database; the profile keeps only its authcfg id.
"Test connection" runs ``rs-cluster env`` in a task and says in words where jobs run, with what
resources and storage, and which versions the cluster has; "Probe cluster" runs ``rs-cluster env
--probe`` (a tiny Spark job) and lists the executors and what is wrong. What the cluster sends is
untrusted: it is shown as plain text only, and a missing or odd value reads "?". An unknown host key
is shown with its SHA256 fingerprint and trusted only when the user says so.
"""

from __future__ import annotations

import shlex
from typing import Any, Mapping

from qgis.core import QgsApplication
from qgis.gui import QgsFileWidget, QgsPasswordLineEdit
from qgis.PyQt.QtCore import QCoreApplication
from qgis.PyQt.QtWidgets import (
    QCheckBox,
    QComboBox,
    QDialog,
    QDialogButtonBox,
    QFormLayout,
    QHBoxLayout,
    QLineEdit,
    QMessageBox,
    QPlainTextEdit,
    QPushButton,
    QSpinBox,
    QVBoxLayout,
    QWidget,
)

from rs_qgis_plugin import settings
from rs_qgis_plugin.core.errors import HostKeyChangedError, RsPluginError, UnknownHostKeyError
from rs_qgis_plugin.core.profile import DEFAULT_WORKSPACE, ConnectionProfile
from rs_qgis_plugin.core.ssh import trust_host_key
from rs_qgis_plugin.log import get_logger
from rs_qgis_plugin.logic import cluster_summary, cluster_text
from rs_qgis_plugin.tasks import EnvTask, RsTask

log = get_logger("profiles")


def tr(text: str) -> str:
    return QCoreApplication.translate("ProfilesDialog", text)


UNKNOWN = "?"


def _field(data: Any, *keys: str) -> Any:
    """``data[k1][k2]...``, or None where a level is missing or not an object."""
    for key in keys:
        if not isinstance(data, Mapping):
            return None
        data = data.get(key)
    return data


def _text(value: Any, *, none: str = UNKNOWN) -> str:
    """A scalar from the cluster as one plain line; ``none`` for null, "?" for anything that
    is not a text or a number."""
    if value is None:
        return none
    if isinstance(value, bool):
        return tr("yes") if value else tr("no")
    if isinstance(value, (str, int, float)):
        return cluster_text(value) or UNKNOWN
    return UNKNOWN


def _version(info: Mapping[str, Any], key: str) -> str:
    """A version from ``rs-cluster env``: null there means the package is not installed."""
    if key not in info:
        return UNKNOWN
    return _text(info[key], none=tr("not installed"))


def format_resources(resources: Any) -> str:
    if not isinstance(resources, Mapping):
        return UNKNOWN
    named = (("executor_cores", tr("executor cores")), ("executor_memory", tr("executor memory")),
             ("max_cores", tr("max cores")), ("queue", tr("YARN queue")))
    parts = [f"{label} {_text(resources[key])}" for key, label in named
             if resources.get(key) is not None]
    conf = resources.get("conf")
    if isinstance(conf, Mapping):
        parts += [f"{_text(k)}={_text(v)}" for k, v in list(conf.items())[:20]]
    elif conf not in (None, [], ()):
        parts.append(tr("other Spark settings {value}").format(value=UNKNOWN))
    return ", ".join(parts) or tr("Spark's defaults (none set)")


def format_storage(storage: Any) -> str:
    """The storage URL and where its credentials come from; never the credentials (only their
    source is read, whatever else the cluster sends)."""
    if not isinstance(storage, Mapping):
        return UNKNOWN
    if storage.get("url") is None:
        return tr("none: jobs use their folder on the login host, so executors on other hosts "
                  "must mount the workspace")
    url = storage.get("url")
    text = _text(url)
    credentials = storage.get("credentials")
    if credentials is not None:
        text += "; " + tr("credentials from {source}").format(source=_text(credentials))
    elif isinstance(url, str) and url.startswith("s3"):
        text += "; " + tr("credentials from the standard AWS variables and files of each node")
    elif isinstance(url, str) and url.startswith("hdfs"):
        text += "; " + tr("access as Hadoop's configuration of each node sets it")
    if storage.get("endpoint_url") is not None:
        text += "; " + tr("endpoint {url}").format(url=_text(storage.get("endpoint_url")))
    return text


def format_env(info: Any) -> str:
    """``rs-cluster env``'s answer in words, one fact a line: where jobs run, the settings file,
    resources, storage, then the versions of the stack and the GPUs."""
    if not isinstance(info, Mapping):
        return tr("The cluster's answer is not a report: {value}").format(value=UNKNOWN)
    cluster = info.get("cluster")
    lines = []
    if isinstance(cluster, Mapping):
        settings_file = cluster.get("settings_file")
        if settings_file is None and "settings_file" in cluster:
            settings_text = tr("none (looked for {path})").format(
                path=_text(cluster.get("settings_file_looked_for")))
        else:
            settings_text = _text(settings_file)
        timeout = cluster.get("heartbeat_timeout_s")
        seconds = (f"{timeout:g}" if isinstance(timeout, (int, float))
                   and not isinstance(timeout, bool) else UNKNOWN)
        lines += [
            tr("Jobs run on: {where}").format(where=_text(cluster.get("runs_on"))),
            tr("Settings file: {path}").format(path=settings_text),
            tr("Resources: {resources}").format(
                resources=format_resources(cluster.get("resources"))),
            tr("Storage: {storage}").format(storage=format_storage(cluster.get("storage"))),
            tr("Workspace shared by every node: {shared}").format(
                shared=_text(cluster.get("shared_workspace"))),
            tr("A job on another login host counts as dead after {seconds} s without a "
               "heartbeat").format(seconds=seconds),
        ]
    else:
        lines.append(tr("Jobs run on: {where} (this rs-cluster reports no cluster settings; "
                        "update it)").format(where=UNKNOWN))
    lines.append(tr("Versions: rs-cluster {rs}, Python {python}, Spark {spark}, Horovod {horovod}, "
                    "TensorFlow {tf}").format(
        rs=_version(info, "rs_cluster"), python=_version(info, "python"),
        spark=_version(info, "spark"), horovod=_version(info, "horovod"),
        tf=_version(info, "tensorflow")))
    gpus = info.get("gpus")
    if isinstance(gpus, list):
        names = [f"{_text(_field(g, 'name'))} ({_text(_field(g, 'memory'))})" for g in gpus[:16]]
        lines.append(tr("GPUs: {gpus}").format(gpus=", ".join(names) or tr("none")))
    else:
        lines.append(tr("GPUs: {gpus}").format(gpus=UNKNOWN))
    return "\n".join(lines)


def _executor_line(executor: Any) -> str:
    if not isinstance(executor, Mapping):
        return UNKNOWN
    python = _text(executor.get("python"))
    if executor.get("python_found") is False:
        python = tr("{python} (missing)").format(python=python)
    return tr("{host} ({address}): {cpus} CPUs, executor cores {cores}, memory {memory}; "
              "Python {python}; TensorFlow {tf}, Horovod {horovod}; storage {storage}").format(
        host=_text(executor.get("host")), address=_text(executor.get("address")),
        cpus=_text(executor.get("cpus")),
        cores=_text(executor.get("executor_cores"), none=tr("default")),
        memory=_text(executor.get("executor_memory"), none=tr("default")), python=python,
        tf=_text(executor.get("tensorflow")), horovod=_text(executor.get("horovod")),
        storage=_text(executor.get("storage"), none=tr("not set")))


def format_probe(probe: Any) -> str:
    """What ``rs-cluster env --probe`` found: the master, storage from the login host, one line
    per executor, then the problems (or that there are none)."""
    if not isinstance(probe, Mapping):
        return tr("Probe: no report ({value})").format(value=UNKNOWN)
    lines = [tr("Probe of Spark master {master}: reachable {reachable}").format(
        master=_text(probe.get("master")), reachable=_text(probe.get("master_reachable")))]
    if probe.get("storage_url") is not None or "storage_here" in probe:
        lines.append(tr("Storage {url} from the login host: {result}").format(
            url=_text(probe.get("storage_url")), result=_text(probe.get("storage_here"))))
    executors = probe.get("executors")
    if isinstance(executors, list):
        lines.append(tr("Executors: {n}").format(n=len(executors)))
        lines += ["  " + _executor_line(e) for e in executors[:64]]
        if len(executors) > 64:
            lines.append("  " + tr("… and {n} more").format(n=len(executors) - 64))
    else:
        lines.append(tr("Executors: {n}").format(n=UNKNOWN))
    problems = probe.get("problems")
    if not isinstance(problems, list):
        lines.append(tr("Problems: {value}").format(value=UNKNOWN))
    elif problems:
        lines.append(tr("Problems:"))
        lines += ["  - " + _text(p) for p in problems[:50]]
    else:
        lines.append(tr("Ready: no problems."))
    return "\n".join(lines)


class ProfilesDialog(QDialog):
    def __init__(self, parent: QWidget | None = None, *, task_manager: Any = None) -> None:
        super().__init__(parent)
        self.setWindowTitle(tr("RS Buildings: cluster connections"))
        self.task_manager = task_manager or QgsApplication.taskManager()
        self.test_task: EnvTask | None = None

        self.profiles = QComboBox(self)
        self.new_button = QPushButton(tr("New"), self)
        self.delete_button = QPushButton(tr("Delete"), self)
        top = QHBoxLayout()
        top.addWidget(self.profiles, 1)
        top.addWidget(self.new_button)
        top.addWidget(self.delete_button)

        self.name = QLineEdit(self)
        self.host = QLineEdit(self)
        self.port = QSpinBox(self)
        self.port.setRange(1, 65535)
        self.port.setValue(22)
        self.user = QLineEdit(self)
        self.key_file = QgsFileWidget(self)
        self.key_file.setStorageMode(QgsFileWidget.GetFile)
        self.key_file.setDialogTitle(tr("Private SSH key"))
        self.use_agent = QCheckBox(tr("Use the keys of the SSH agent"), self)
        self.passphrase = QgsPasswordLineEdit(self)
        self.passphrase.setPlaceholderText(tr("kept in the QGIS authentication database"))
        self.workspace = QLineEdit(DEFAULT_WORKSPACE, self)
        self.command = QLineEdit("rs-cluster", self)
        self.command.setToolTip(tr("How to run rs-cluster on the cluster, e.g. "
                                   "/opt/rs/venv/bin/rs-cluster"))
        form = QFormLayout()
        form.addRow(tr("Name"), self.name)
        form.addRow(tr("Host"), self.host)
        form.addRow(tr("Port"), self.port)
        form.addRow(tr("User"), self.user)
        form.addRow(tr("Private key file"), self.key_file)
        form.addRow("", self.use_agent)
        form.addRow(tr("Key passphrase"), self.passphrase)
        form.addRow(tr("Remote workspace"), self.workspace)
        form.addRow(tr("Remote command"), self.command)

        self.test_button = QPushButton(tr("Test connection"), self)
        self.test_button.setToolTip(tr("Connect and show where jobs run, with what resources "
                                       "and storage (rs-cluster env)"))
        self.probe_button = QPushButton(tr("Probe cluster"), self)
        self.probe_button.setToolTip(tr("Run a tiny Spark job on the cluster: which executors "
                                        "start, whether they import TensorFlow and Horovod and "
                                        "reach the storage (rs-cluster env --probe; up to a few "
                                        "minutes)"))
        # What the cluster sends is shown as text, never as markup.
        self.output = QPlainTextEdit(self)
        self.output.setReadOnly(True)
        self.output.setPlaceholderText(tr("What the cluster reports appears here"))
        buttons = QDialogButtonBox(QDialogButtonBox.Save | QDialogButtonBox.Close, self)
        layout = QVBoxLayout(self)
        layout.addLayout(top)
        layout.addLayout(form)
        test_row = QHBoxLayout()
        test_row.addWidget(self.test_button)
        test_row.addWidget(self.probe_button)
        layout.addLayout(test_row)
        layout.addWidget(self.output)
        layout.addWidget(buttons)

        self.profiles.currentTextChanged.connect(self.show_profile)
        self.new_button.clicked.connect(self.clear)
        self.delete_button.clicked.connect(self.delete)
        self.test_button.clicked.connect(lambda: self.test_connection())
        self.probe_button.clicked.connect(self.probe_cluster)
        buttons.accepted.connect(self.save)
        buttons.rejected.connect(self.reject)
        self.reload(settings.last_profile())

    # -- profile <-> fields -----------------------------------------------------------------------------
    def reload(self, select: str = "") -> None:
        self.profiles.blockSignals(True)
        self.profiles.clear()
        self.profiles.addItems(settings.profile_names())
        self.profiles.blockSignals(False)
        if select and self.profiles.findText(select) >= 0:
            self.profiles.setCurrentText(select)
        self.show_profile(self.profiles.currentText())

    def clear(self) -> None:
        for w in (self.name, self.host, self.user, self.passphrase):
            w.clear()
        self.key_file.setFilePath("")
        self.port.setValue(22)
        self.use_agent.setChecked(False)
        self.workspace.setText(DEFAULT_WORKSPACE)
        self.command.setText("rs-cluster")
        self.output.clear()

    def show_profile(self, name: str) -> None:
        if not name:
            self.clear()
            return
        try:
            p = settings.load_profile(name)
        except (RsPluginError, ValueError) as e:
            self.output.setPlainText(str(e))
            return
        self.name.setText(p.name)
        self.host.setText(p.host)
        self.port.setValue(p.port)
        self.user.setText(p.user)
        self.key_file.setFilePath(p.key_file or "")
        self.use_agent.setChecked(p.use_agent)
        self.passphrase.clear()
        self.workspace.setText(p.remote_workspace)
        self.command.setText(" ".join(shlex.quote(a) for a in p.remote_command))
        self.output.clear()

    def profile(self) -> ConnectionProfile:
        """The profile the fields describe; raises :class:`SpecError` saying what is wrong."""
        try:
            command = tuple(shlex.split(self.command.text()))
        except ValueError as e:
            raise RsPluginError(tr("the remote command is not valid: {e}").format(e=e)) from e
        return ConnectionProfile(
            name=self.name.text().strip(), host=self.host.text().strip(), port=self.port.value(),
            user=self.user.text().strip(), key_file=self.key_file.filePath().strip() or None,
            use_agent=self.use_agent.isChecked(),
            remote_workspace=self.workspace.text().strip() or DEFAULT_WORKSPACE,
            remote_command=command)

    def save(self) -> ConnectionProfile | None:
        try:
            profile = self.profile()
            authcfg = settings.profile_authcfg(profile.name)
            if self.passphrase.text():
                authcfg = settings.store_passphrase(profile.name, self.passphrase.text(), authcfg)
                self.passphrase.clear()
        except RsPluginError as e:
            QMessageBox.warning(self, tr("Connection profile"), str(e))
            return None
        settings.save_profile(profile, authcfg)
        self.reload(profile.name)
        return profile

    def delete(self) -> None:
        name = self.profiles.currentText()
        if name:
            settings.delete_profile(name)
            self.reload()

    # -- test connection ----------------------------------------------------------------------------
    def test_connection(self, probe: bool = False) -> EnvTask | None:
        try:
            profile = self.profile()
        except RsPluginError as e:
            self.output.setPlainText(str(e))
            return None
        passphrase = self.passphrase.text() or settings.load_passphrase(
            settings.profile_authcfg(profile.name))
        if probe:
            self.output.setPlainText(tr("Probing {host}: a tiny Spark job runs on the cluster "
                                        "(up to a few minutes)…").format(host=profile.host))
        else:
            self.output.setPlainText(tr("Connecting to {host}…").format(host=profile.host))
        self.test_button.setEnabled(False)
        self.probe_button.setEnabled(False)
        self.test_task = EnvTask(profile, settings.known_hosts_path(), passphrase,
                                 on_done=self._tested, probe=probe)
        self.task_manager.addTask(self.test_task)
        return self.test_task

    def probe_cluster(self) -> EnvTask | None:
        return self.test_connection(probe=True)

    def _tested(self, task: RsTask) -> None:
        self.test_button.setEnabled(True)
        self.probe_button.setEnabled(True)
        probe = task.probe if isinstance(task, EnvTask) else False
        error = task.error
        if isinstance(error, UnknownHostKeyError):
            if self.ask_trust(error):
                trust_host_key(settings.known_hosts_path(), error.host, error.port,
                               error.key_type, error.key_base64)
                log.info("trusted host key %s of %s:%s", error.fingerprint, error.host, error.port)
                self.test_connection(probe)
            else:
                self.output.setPlainText(tr("Not connected: the host key was not trusted."))
            return
        if isinstance(error, HostKeyChangedError):
            QMessageBox.critical(self, tr("Host key changed"), str(error))
        if error is not None:
            self.output.setPlainText(tr("Connection failed: {reason}").format(reason=error))
        elif task.result is not None:
            if isinstance(task, EnvTask):  # the dock says from now on where its jobs run
                settings.save_cluster_summary(task.profile.name, cluster_summary(task.result))
            text = tr("Connected.") + "\n" + format_env(task.result)
            if probe:
                text += "\n\n" + format_probe(_field(task.result, "probe"))
            self.output.setPlainText(text)
        else:
            self.output.setPlainText(tr("Cancelled."))

    def ask_trust(self, error: UnknownHostKeyError) -> bool:
        text = tr("The cluster {host}:{port} presents a host key this computer has not seen:\n\n"
                  "{key_type}\n{fingerprint}\n\nCompare the fingerprint with the one your "
                  "cluster administrator gave you (ssh-keygen -lf on the server's public host "
                  "key). Trust this key?").format(host=error.host, port=error.port,
                                                  key_type=error.key_type,
                                                  fingerprint=error.fingerprint)
        answer = QMessageBox.question(self, tr("Unknown host key"), text,
                                      QMessageBox.Yes | QMessageBox.No, QMessageBox.No)
        return answer == QMessageBox.Yes
