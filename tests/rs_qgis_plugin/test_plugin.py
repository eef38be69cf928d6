"""The plugin as QGIS loads it, its log tab, and the connection profile editor (against the real
OpenSSH server: host key trust, "Test connection" showing ``rs-cluster env``; what it shows is
tested in test_profiles_dialog.py)."""

from __future__ import annotations

import logging

import pytest
from qgis.core import Qgis, QgsApplication, QgsSettings
from qgis.PyQt.QtWidgets import QMessageBox

import rs_qgis_plugin
from rs_qgis_plugin import settings
from rs_qgis_plugin.log import TAB, setup_logging
from rs_qgis_plugin.profiles_dialog import ProfilesDialog
from tests.rs_qgis_plugin.conftest import loopback_profile, wait_for

pytestmark = [pytest.mark.qgis, pytest.mark.usefixtures("qgis_env")]


def test_plugin_loads_with_its_dock_action_and_processing_provider(qgis_iface, qgis_processing):
    plugin = rs_qgis_plugin.classFactory(qgis_iface)
    plugin.initGui()
    try:
        provider = QgsApplication.processingRegistry().providerById("rs_buildings")
        assert provider is not None
        assert {a.id() for a in provider.algorithms()} == {
            "rs_buildings:train", "rs_buildings:fine_tune", "rs_buildings:predict",
            "rs_buildings:evaluate"}
        assert plugin.dock.isHidden()
        plugin.action.trigger()  # the toolbar button (the stand-in main window is never shown)
        assert not plugin.dock.isHidden() and plugin.action.isChecked()
        assert plugin.dock.tabs.count() == 2  # Run and Jobs
    finally:
        plugin.unload()
    assert QgsApplication.processingRegistry().providerById("rs_buildings") is None
    assert plugin.dock is None and plugin.action is None


def test_python_logging_reaches_the_plugins_log_tab_once():
    received = []

    def on_message(message, tag, level):
        if tag == TAB:
            received.append((message, level))

    QgsApplication.messageLog().messageReceived.connect(on_message)
    try:
        setup_logging()
        setup_logging()  # loading twice must not double every line
        logging.getLogger("rs_qgis_plugin.core.ssh").error("connection to cluster lost")
    finally:
        QgsApplication.messageLog().messageReceived.disconnect(on_message)
    assert received == [("rs_qgis_plugin.core.ssh: connection to cluster lost", Qgis.Critical)]


def fill(dialog: ProfilesDialog, profile, passphrase: str = "") -> None:
    dialog.clear()
    dialog.name.setText(profile.name)
    dialog.host.setText(profile.host)
    dialog.port.setValue(profile.port)
    dialog.user.setText(profile.user)
    dialog.key_file.setFilePath(profile.key_file)
    dialog.workspace.setText(profile.remote_workspace)
    dialog.command.setText(" ".join(profile.remote_command))
    dialog.passphrase.setText(passphrase)


def test_profile_keeps_the_passphrase_only_in_the_auth_database(sshd, tmp_path):
    dialog = ProfilesDialog()
    fill(dialog, loopback_profile(sshd, tmp_path / "ws", name="prod cluster"), "s3cret phrase")
    saved = dialog.save()
    assert saved is not None and settings.profile_names() == ["prod cluster"]
    assert settings.load_profile("prod cluster") == saved
    s = QgsSettings()
    values = [str(s.value(k)) for k in s.allKeys() if k.startswith("rs_qgis_plugin")]
    assert values and not any("s3cret" in v for v in values)
    authcfg = settings.profile_authcfg("prod cluster")
    assert authcfg and settings.load_passphrase(authcfg) == "s3cret phrase"
    assert dialog.passphrase.text() == ""


@pytest.mark.ssh
@pytest.mark.parametrize("answer", [QMessageBox.No, QMessageBox.Yes], ids=["refused", "trusted"])
def test_unknown_host_key_is_trusted_only_when_the_user_says_so(sshd, tmp_path, qtbot,
                                                                monkeypatch, answer):
    asked = []

    def question(parent, title, text, *args):
        asked.append(text)
        return answer

    monkeypatch.setattr(QMessageBox, "question", question)
    settings.known_hosts_path().unlink(missing_ok=True)
    dialog = ProfilesDialog()
    fill(dialog, loopback_profile(sshd, tmp_path / "ws"))
    dialog.test_connection()
    if answer == QMessageBox.No:
        wait_for(qtbot, lambda: "not trusted" in dialog.output.toPlainText(), 60)
        assert not settings.known_hosts_path().exists()
    else:
        wait_for(qtbot, lambda: "Connected" in dialog.output.toPlainText(), 120)
        # what rs-cluster env reports, in words
        assert "\nVersions: rs-cluster " in dialog.output.toPlainText()
        assert f"[127.0.0.1]:{sshd.port}" in settings.known_hosts_path().read_text()
    assert len(asked) == 1 and sshd.host_key_fingerprint in asked[0]
    settings.known_hosts_path().unlink(missing_ok=True)
