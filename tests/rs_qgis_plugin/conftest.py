"""Fixtures of the plugin's QGIS tests: real QGIS offscreen (pytest-qgis), a real OpenSSH server
on 127.0.0.1 whose "cluster" runs the real ``rs-cluster`` of the cluster venv, real dev GeoTIFFs.

The only stand-in is pytest-qgis's ``QgisInterface`` (the QGIS main window cannot run inside
pytest); it lacks a few methods of the real interface, added here as no-ops.
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from tests import cluster_selftest, devdata
from tests.sshd import SSHD, Sshd

REPO = Path(__file__).resolve().parents[2]
CLUSTER_PYTHON = REPO / ".venv" / "bin" / "python"
XIAMEN = "xiamen_robosat_z18"

try:
    import qgis.core  # noqa: F401
except ImportError:  # the cluster venv: only the QGIS-free core's tests run there
    collect_ignore_glob = ["test_*.py"]


# QGIS computes statistics when it styles a raster, and GDAL would save them next to the file
# (``.aux.xml``): never next to the shared dev data. The tests also read it through symlinks.
os.environ["GDAL_PAM_ENABLED"] = "NO"
_DEV_LINKS = Path(tempfile.mkdtemp(prefix="rs-plugin-dev-"))
atexit.register(shutil.rmtree, _DEV_LINKS, True)


def _linked(kind: str, index: int) -> Path:
    name = devdata.first_files(XIAMEN, index + 1)[index]
    link = _DEV_LINKS / kind / name
    if not link.exists():
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(devdata.subset(XIAMEN) / kind / name)
    return link


def dev_image(index: int = 0) -> Path:
    """A Xiamen imagery GeoTIFF (256 x 256, RGB, EPSG:3857), as a symlink in a temporary folder."""
    return _linked("images", index)


def dev_mask(index: int = 0) -> Path:
    """Its reference mask (uint8, 255 building, 0 background)."""
    return _linked("gt", index)


# -- QGIS ------------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def _iface_complete(qgis_iface):
    """Methods of QGIS's real interface that pytest-qgis's stand-in leaves out."""
    for name in ("removePluginMenu", "removeDockWidget", "addPluginToRasterMenu",
                 "removePluginRasterMenu"):
        if not hasattr(qgis_iface, name):
            setattr(qgis_iface, name, lambda *args: None)
    return qgis_iface


@pytest.fixture(scope="session")
def _auth_master_password(qgis_app):
    """QGIS asks the user for the master password in the GUI; tests set it up front."""
    from qgis.core import QgsApplication

    am = QgsApplication.authManager()
    if not am.masterPasswordIsSet():
        assert am.setMasterPassword("test-master-password", True)


@pytest.fixture
def qgis_env(qgis_app, qgis_iface, _iface_complete, _auth_master_password):
    """Every QGIS test uses this (not autouse: the core's tests below run without QGIS too).
    Each test starts with no profiles, no jobs, an empty project and an empty message bar."""
    from qgis.core import QgsProject, QgsSettings

    def wipe():
        QgsSettings().remove("rs_qgis_plugin")
        QgsProject.instance().clear()
        for messages in qgis_iface.messageBar().messages.values():
            messages.clear()

    wipe()
    yield
    wipe()


@pytest.fixture
def results_root(tmp_path):
    from qgis.core import QgsSettings

    from rs_qgis_plugin import settings

    path = tmp_path / "results"
    QgsSettings().setValue(settings.RESULTS_DIR, str(path))
    return path


def wait_for(qtbot, predicate, timeout_s: float = 120.0):
    """Processes Qt events (task callbacks, queued signals) until ``predicate()`` is true."""
    qtbot.waitUntil(lambda: bool(predicate()), timeout=int(timeout_s * 1000))


# -- SSH and the cluster side -----------------------------------------------------------------------
def remote_rs_cluster() -> list[str]:
    """rs-cluster with the test-only sleep stage, run by the cluster venv's Python."""
    return cluster_selftest.command(CLUSTER_PYTHON)


@pytest.fixture(scope="session")
def sshd(tmp_path_factory):
    if not os.access(SSHD, os.X_OK) or not shutil.which("ssh-keygen"):
        pytest.skip("OpenSSH server not installed (apt install openssh-server)")
    if not CLUSTER_PYTHON.exists():
        pytest.skip("the cluster venv (.venv) is not built; run make setup")
    server = Sshd(tmp_path_factory.mktemp("plugin-sshd")).start()
    yield server
    server.stop()


def loopback_profile(server: Sshd, workspace: Path, name: str = "loopback"):
    from rs_qgis_plugin.core.profile import ConnectionProfile

    return ConnectionProfile(name=name, host="127.0.0.1", port=server.port, user=server.user,
                             key_file=str(server.user_key), remote_workspace=str(workspace),
                             remote_command=tuple(remote_rs_cluster()), connect_timeout=5.0)


def trust(server: Sshd) -> None:
    from rs_qgis_plugin import settings
    from rs_qgis_plugin.core.ssh import trust_host_key

    key_type, key_b64 = server.public_host_key
    trust_host_key(settings.known_hosts_path(), "127.0.0.1", server.port, key_type, key_b64)


@pytest.fixture
def profile(sshd, tmp_path):
    """A saved, trusted profile for the loopback cluster (its workspace in ``tmp_path``)."""
    from rs_qgis_plugin import settings

    p = loopback_profile(sshd, tmp_path / "workspace")
    settings.save_profile(p)
    trust(sshd)
    yield p
    settings.known_hosts_path().unlink(missing_ok=True)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """A real Keras model folder as ``rs-cluster predict`` reads it, made by the cluster venv: a
    fixed 1x1 convolution that calls a pixel "building" where its red channel is above half."""
    if not CLUSTER_PYTHON.exists():
        pytest.skip("the cluster venv (.venv) is not built; run make setup")
    folder = tmp_path_factory.mktemp("model")
    script = f"""
import json, os
os.environ["TF_CPP_MIN_LOG_LEVEL"] = "2"
import numpy as np, tensorflow as tf
inputs = tf.keras.Input((None, None, 3))
conv = tf.keras.layers.Conv2D(1, 1, activation="linear")
model = tf.keras.Model(inputs, conv(inputs))
kernel = np.zeros((1, 1, 3, 1), np.float32); kernel[0, 0, 0, 0] = 1.0
conv.set_weights([kernel, np.zeros(1, np.float32)])
model.save({str(folder / "model.keras")!r})
"""
    subprocess.run([str(CLUSTER_PYTHON), "-c", script], check=True, timeout=300,
                   capture_output=True)
    (folder / "model.json").write_text(json.dumps({
        "format": "rs-cluster-model", "format_version": 1, "model_file": "model.keras",
        "architecture": "unet", "tile_size": 128, "bands": ["red", "green", "blue"],
        "input_scaling": {"method": "divide", "value": 255.0}, "threshold": 0.5,
        "base_filters": 4, "output": "sigmoid building probability"}))
    return folder


def has_predict() -> bool:
    script = REPO / ".venv" / "bin" / "rs-cluster"
    if not script.exists():
        return False
    out = subprocess.run([str(script), "predict", "--help"], capture_output=True, timeout=120)
    return out.returncode == 0


@pytest.fixture(scope="session")
def need_predict():
    if not has_predict():
        pytest.skip("rs-cluster predict is not available in .venv yet")
