"""Fixtures of the plugin core's SSH tests: a real OpenSSH server on 127.0.0.1 (tests/sshd.py)
whose remote side runs the real ``rs-cluster`` of the cluster venv."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from tests import cluster_selftest
from tests.sshd import SSHD, Sshd

try:
    import paramiko  # noqa: F401 - Debian's python3-paramiko, in the QGIS venv
except ImportError:  # the cluster venv: these tests belong to the plugin tier
    collect_ignore = ["test_ssh.py", "test_transfer.py", "test_remote_jobs.py"]

REPO = Path(__file__).resolve().parents[3]
CLUSTER_PYTHON = REPO / ".venv" / "bin" / "python"


def remote_rs_cluster() -> list[str]:
    """How the loopback "cluster" runs rs-cluster: the venv's Python on the source tree, through
    the tests' entry point, which adds the test-only sleep stage (an absolute argv)."""
    return cluster_selftest.command(CLUSTER_PYTHON)


def _need_sshd() -> None:
    if not os.access(SSHD, os.X_OK) or not shutil.which("ssh-keygen"):
        pytest.skip("OpenSSH server not installed (apt install openssh-server)")
    pytest.importorskip("paramiko")


@pytest.fixture(scope="session")
def sshd(tmp_path_factory):
    """One server for the session; tests that change its keys use ``fresh_sshd``."""
    _need_sshd()
    server = Sshd(tmp_path_factory.mktemp("sshd")).start()
    yield server
    server.stop()


@pytest.fixture
def fresh_sshd(tmp_path):
    _need_sshd()
    server = Sshd(tmp_path / "sshd").start()
    yield server
    server.stop()


def trusted_known_hosts(server: Sshd, path: Path) -> Path:
    from rs_qgis_plugin.core.ssh import trust_host_key

    key_type, key_b64 = server.public_host_key
    trust_host_key(path, "127.0.0.1", server.port, key_type, key_b64)
    return path


def make_profile(server: Sshd, workspace: Path, **changes):
    from rs_qgis_plugin.core.profile import ConnectionProfile

    values = dict(name="loopback", host="127.0.0.1", port=server.port, user=server.user,
                  key_file=str(server.user_key), remote_workspace=str(workspace),
                  remote_command=tuple(remote_rs_cluster()), connect_timeout=5.0)
    values.update(changes)
    return ConnectionProfile(**values)


@pytest.fixture
def known_hosts(sshd, tmp_path) -> Path:
    return trusted_known_hosts(sshd, tmp_path / "known_hosts")


@pytest.fixture
def profile(sshd, tmp_path):
    return make_profile(sshd, tmp_path / "workspace")


@pytest.fixture
def client(profile, known_hosts):
    from rs_qgis_plugin.core.ssh import SshClient

    with SshClient(profile, known_hosts) as c:
        yield c


@pytest.fixture
def need_cluster_python():
    if not CLUSTER_PYTHON.exists():
        pytest.skip("the cluster venv (.venv) is not built; run make setup")


@pytest.fixture
def umask_022_client(tmp_path):
    """A client of a server started under umask 022, the usual default on login nodes: what it
    creates is readable by every user unless the plugin asks for tighter modes itself. (The test
    runner's own umask may be tighter and would hide a missing mode.)"""
    from rs_qgis_plugin.core.ssh import SshClient

    _need_sshd()
    previous = os.umask(0o022)
    try:
        server = Sshd(tmp_path / "sshd-022").start()  # its sessions inherit the umask
    finally:
        os.umask(previous)
    profile = make_profile(server, tmp_path / "workspace")
    try:
        with SshClient(profile, trusted_known_hosts(server, tmp_path / "known_hosts-022")) as c:
            assert c.run(["sh", "-c", "umask"]).stdout.strip() == "0022"
            yield c
    finally:
        server.stop()
