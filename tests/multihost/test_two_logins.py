"""Two login nodes behind one name, sharing home and workspace: ``job status`` and ``job cancel`` from
the second never declare a running job failed, and a cancel there stops the job on the first.

``login2`` (tests/rig.py) mounts login's home (so its ``~/.rs-cluster`` workspace and settings
file) but has its own host name and its own process table: it can neither see nor signal the job
runner on login, which is the case a pid check gets wrong. Liveness from login2 can come only from
the heartbeat the runner writes into status.json, and a cancel only from the marker it polls.
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest

from tests import cluster_selftest
from tests.rig import Rig

pytestmark = pytest.mark.multihost

HEARTBEAT_TIMEOUT_S = 4.0  # the runner then beats every second (a quarter of it)
ENDED = ("succeeded", "failed", "cancelled")


@pytest.fixture(scope="module")
def logins(rig):
    """login and login2 with one settings file in the shared home (a short heartbeat timeout)."""
    login = rig.host("login")
    settings = login.home / "two-logins.toml"
    settings.write_text(f"[jobs]\nheartbeat_timeout_s = {HEARTBEAT_TIMEOUT_S}\n")
    yield rig
    settings.unlink()


def _cli(rig: Rig, host: str, *args: str, check: bool = True):
    """``rs-cluster`` (with the test-only sleep stage) on ``host``, as an SSH login runs it there."""
    login = rig.host("login")
    env = {"PYTHONPATH": cluster_selftest.pythonpath(),
           "RS_CLUSTER_CONFIG": str(login.user_home / "two-logins.toml")}
    return rig.host(host).run([str(rig.python), "-m", cluster_selftest.ENTRY_MODULE, "--quiet",
                               "job", *args], env=env, check=check)


def _sleep_job(rig: Rig, job_id: str, seconds: float) -> Path:
    """A job folder in the shared workspace holding one sleep step; the path inside the hosts."""
    home = rig.host("login").home
    job_dir = home / ".rs-cluster" / "jobs" / job_id
    job_dir.mkdir(parents=True)
    (job_dir / "job.json").write_text(json.dumps({
        "schema_version": 1, "job_id": job_id, "name": job_id,
        "steps": [{"stage": "sleep", "params": {"seconds": seconds, "steps": int(seconds)}}]}))
    return rig.host("login").user_home / job_dir.relative_to(home)


def _status(rig: Rig, host: str, job_id: str) -> dict:
    return json.loads(_cli(rig, host, "status", job_id, "--json").stdout)


def _wait(rig: Rig, host: str, job_id: str, states: tuple[str, ...], timeout: float) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        status = _status(rig, host, job_id)
        if status["state"] in states or time.monotonic() > deadline:
            return status
        time.sleep(0.3)


def _submit(rig: Rig, job_id: str, seconds: float) -> dict:
    _cli(rig, "login", "submit", str(_sleep_job(rig, job_id, seconds)))
    status = _wait(rig, "login", job_id, ("running", *ENDED), 30)
    assert status["state"] == "running", status
    return status


def _runner_runs_on_login(rig: Rig, pid: int) -> bool:
    """Whether ``pid`` (a pid of the machine's, as login sees it) is alive on login."""
    try:
        return os.readlink(f"/proc/{pid}/ns/mnt") == rig.host("login").namespace
    except OSError:  # gone, or a zombie waiting for its parent
        return False


def test_the_second_login_host_is_another_machine_for_names_and_processes(logins):
    rig = logins
    name = rig.host("login2").run(["hostname"]).stdout.strip()
    assert name == "login2" != rig.host("login").run(["hostname"]).stdout.strip()
    status = _submit(rig, "two-logins-names", 30)
    try:
        assert _runner_runs_on_login(rig, status["pid"])
        # login2 cannot see the runner's process: only the heartbeat can tell it lives.
        seen = rig.host("login2").run(["sh", "-c", f"kill -0 {status['pid']}"], check=False)
        assert seen.returncode != 0
        assert status["host"] != "login2"
    finally:
        _cli(rig, "login", "cancel", "two-logins-names", check=False)


def test_status_from_the_second_login_never_fails_a_running_job_and_its_cancel_stops_it(logins):
    rig = logins
    job_id = "two-logins-cancel"
    status = _submit(rig, job_id, 60)
    runner = status["pid"]
    # Well past the heartbeat timeout: a pid check on login2 would have failed the job by now.
    deadline = time.monotonic() + 3 * HEARTBEAT_TIMEOUT_S
    seen = []
    while time.monotonic() < deadline:
        seen.append(_status(rig, "login2", job_id)["state"])
        time.sleep(0.5)
    assert set(seen) == {"running"}, seen
    assert _runner_runs_on_login(rig, runner)

    cancelled = json.loads(_cli(rig, "login2", "cancel", job_id, "--json").stdout)

    assert cancelled["state"] == "cancelled", cancelled
    assert "cancel" not in cancelled  # no "will be stopped later" note: it is stopped
    final = _status(rig, "login", job_id)
    assert final["state"] == "cancelled"
    deadline = time.monotonic() + 10
    while _runner_runs_on_login(rig, runner) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not _runner_runs_on_login(rig, runner), "the runner on login outlived the cancel"


def test_a_killed_runner_is_declared_failed_from_the_second_login_only_after_its_heartbeat_stops(
        logins):
    rig = logins
    job_id = "two-logins-killed"
    status = _submit(rig, job_id, 120)
    os.killpg(os.getpgid(status["pid"]), signal.SIGKILL)  # the runner and its step, on login
    killed = time.monotonic()

    right_after = _status(rig, "login2", job_id)
    failed = _wait(rig, "login2", job_id, ENDED, 6 * HEARTBEAT_TIMEOUT_S)

    if time.monotonic() - killed < HEARTBEAT_TIMEOUT_S:
        assert right_after["state"] == "running"  # the last heartbeat is still fresh
    assert failed["state"] == "failed", failed
    assert time.monotonic() - killed >= HEARTBEAT_TIMEOUT_S - 1.5
    assert "heartbeat" in failed["message"] and str(status["host"]) in failed["message"]
    # A cancel from login2 now says plainly that it cannot stop what the runner left on login.
    answer = json.loads(_cli(rig, "login2", "cancel", job_id, "--json").stdout)
    assert answer["state"] == "failed"
    assert "cannot stop" in answer.get("cancel", "") and status["host"] in answer["cancel"]
