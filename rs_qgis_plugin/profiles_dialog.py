"""The connection profile editor: where the cluster is, how to log in, where rs-cluster lives.

The key passphrase goes to QGIS's authentication database; the profile keeps only its authcfg id.
"Test connection" runs ``rs-cluster env`` in a task; an unknown host key is shown with its SHA256
fingerprint and trusted only when the user says so.
"""

from __future__ import annotations

import json
import shlex
from typing import Any

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
from rs_qgis_plugin.tasks import EnvTask, RsTask

log = get_logger("profiles")


def tr(text: str) -> str:
    return QCoreApplication.translate("ProfilesDialog", text)


def format_env(info: dict[str, Any]) -> str:
    return json.dumps(info, indent=2, ensure_ascii=False, sort_keys=True)


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
        self.output = QPlainTextEdit(self)
        self.output.setReadOnly(True)
        self.output.setPlaceholderText(tr("rs-cluster env of the cluster appears here"))
        buttons = QDialogButtonBox(QDialogButtonBox.Save | QDialogButtonBox.Close, self)
        layout = QVBoxLayout(self)
        layout.addLayout(top)
        layout.addLayout(form)
        layout.addWidget(self.test_button)
        layout.addWidget(self.output)
        layout.addWidget(buttons)

        self.profiles.currentTextChanged.connect(self.show_profile)
        self.new_button.clicked.connect(self.clear)
        self.delete_button.clicked.connect(self.delete)
        self.test_button.clicked.connect(self.test_connection)
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
    def test_connection(self) -> EnvTask | None:
        try:
            profile = self.profile()
        except RsPluginError as e:
            self.output.setPlainText(str(e))
            return None
        passphrase = self.passphrase.text() or settings.load_passphrase(
            settings.profile_authcfg(profile.name))
        self.output.setPlainText(tr("Connecting to {host}…").format(host=profile.host))
        self.test_button.setEnabled(False)
        self.test_task = EnvTask(profile, settings.known_hosts_path(), passphrase,
                                 on_done=self._tested)
        self.task_manager.addTask(self.test_task)
        return self.test_task

    def _tested(self, task: RsTask) -> None:
        self.test_button.setEnabled(True)
        error = task.error
        if isinstance(error, UnknownHostKeyError):
            if self.ask_trust(error):
                trust_host_key(settings.known_hosts_path(), error.host, error.port,
                               error.key_type, error.key_base64)
                log.info("trusted host key %s of %s:%s", error.fingerprint, error.host, error.port)
                self.test_connection()
            else:
                self.output.setPlainText(tr("Not connected: the host key was not trusted."))
            return
        if isinstance(error, HostKeyChangedError):
            QMessageBox.critical(self, tr("Host key changed"), str(error))
        if error is not None:
            self.output.setPlainText(tr("Connection failed: {reason}").format(reason=error))
        elif task.result is not None:
            self.output.setPlainText(tr("Connected. rs-cluster env:\n") + format_env(task.result))
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
