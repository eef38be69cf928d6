"""The SSH client against a real OpenSSH server: host keys, authentication, reachability, quoting."""

from __future__ import annotations

import time

import pytest

from rs_qgis_plugin.core.errors import (
    AuthenticationError,
    HostKeyChangedError,
    HostUnreachableError,
    RemoteCommandError,
    UnknownHostKeyError,
)
from rs_qgis_plugin.core.ssh import SshClient, trust_host_key
from tests.rs_qgis_plugin.core.conftest import make_profile, trusted_known_hosts
from tests.sshd import free_port, keygen

pytestmark = pytest.mark.ssh

NASTY_NAMES = ["two words.txt", "it's \"quoted\".txt", "$(touch canary).txt",
               "x; touch canary2 #.txt", "`touch canary3`.txt", "Ünïcödé 建筑 ё.txt",
               "-dash first.txt", "back\\slash & pipe | ok.txt"]


def test_unknown_host_key_is_refused_with_its_fingerprint_until_trusted(fresh_sshd, tmp_path):
    known_hosts = tmp_path / "known_hosts"
    profile = make_profile(fresh_sshd, tmp_path / "ws")
    with pytest.raises(UnknownHostKeyError) as e:
        SshClient(profile, known_hosts).connect()
    assert e.value.fingerprint == fresh_sshd.host_key_fingerprint
    assert e.value.key_type == "ssh-ed25519"
    assert fresh_sshd.host_key_fingerprint in str(e.value)
    assert not known_hosts.exists()  # nothing was trusted behind the user's back

    trust_host_key(known_hosts, e.value.host, e.value.port, e.value.key_type, e.value.key_base64)
    with SshClient(profile, known_hosts) as client:
        assert client.run(["echo", "hello"]).stdout == "hello\n"


def test_changed_host_key_is_refused(fresh_sshd, tmp_path):
    known_hosts = trusted_known_hosts(fresh_sshd, tmp_path / "known_hosts")
    old = fresh_sshd.host_key_fingerprint
    fresh_sshd.new_host_key()
    with pytest.raises(HostKeyChangedError) as e:
        SshClient(make_profile(fresh_sshd, tmp_path / "ws"), known_hosts).connect()
    assert e.value.expected_fingerprint == old
    assert e.value.fingerprint == fresh_sshd.host_key_fingerprint != old
    assert "CHANGED" in str(e.value)
    # only an explicit decision of the user replaces the trusted key
    trust_host_key(known_hosts, e.value.host, e.value.port, e.value.key_type, e.value.key_base64)
    with SshClient(make_profile(fresh_sshd, tmp_path / "ws"), known_hosts) as client:
        assert client.connected
    assert known_hosts.read_text().count(f"[127.0.0.1]:{fresh_sshd.port}") == 1


def test_wrong_user_key_gives_an_authentication_error(sshd, known_hosts, tmp_path):
    other = keygen(tmp_path / "not_authorized")
    profile = make_profile(sshd, tmp_path / "ws", key_file=str(other))
    with pytest.raises(AuthenticationError) as e:
        SshClient(profile, known_hosts).connect()
    assert "refused the key" in str(e.value) and str(other) in str(e.value)
    assert isinstance(e.value, PermissionError)


def test_closed_port_gives_a_clear_error_within_the_timeout(sshd, known_hosts, tmp_path):
    profile = make_profile(sshd, tmp_path / "ws", port=free_port(), connect_timeout=3.0)
    started = time.monotonic()
    with pytest.raises(HostUnreachableError) as e:
        SshClient(profile, known_hosts).connect()
    assert time.monotonic() - started < 4.0
    assert f"127.0.0.1:{profile.port}" in str(e.value)
    assert isinstance(e.value, ConnectionError)


def test_arguments_reach_the_server_literally_and_run_nothing(client, tmp_path):
    for name in NASTY_NAMES:
        assert client.run(["printf", "%s", name]).stdout == name
    home = client.run(["sh", "-c", "pwd"]).stdout.strip()
    for canary in ("canary", "canary2", "canary3"):
        assert not (tmp_path / canary).exists()
        assert client.run(["test", "-e", f"{home}/{canary}"], check=False).exit_status == 1


def test_failing_remote_command_reports_exit_status_and_message(client):
    with pytest.raises(RemoteCommandError) as e:
        client.run(["ls", "/does/not/exist"])
    assert e.value.exit_status == 2 and "No such file" in str(e.value)


def test_a_refused_port_reads_as_words_not_errno_none(tmp_path):
    """Nothing listens on a free port of 127.0.0.2: the kernel refuses the connection."""
    from rs_qgis_plugin.core.profile import ConnectionProfile

    port = free_port("127.0.0.2")
    profile = ConnectionProfile(name="closed", host="127.0.0.2", port=port, user="nobody", use_agent=True,
                                remote_workspace=str(tmp_path / "ws"), connect_timeout=3.0)
    with pytest.raises(HostUnreachableError) as e:
        SshClient(profile, tmp_path / "known_hosts").connect()
    assert str(e.value) == f"cannot connect to 127.0.0.2:{port}: connection refused"
    assert "Errno" not in str(e.value)
