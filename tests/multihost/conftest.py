"""Fixtures of the multi-host tier: one rig (tests/rig.py) for the whole session."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from tests.rig import Rig, unavailable


@pytest.fixture(scope="session")
def rig(tmp_path_factory):
    """login, master, worker1, worker2 and storage, each on its own address and filesystem view;
    skipped, with the reason, where mount namespaces are not allowed (no root). On teardown it
    checks that no process of the rig runs and none of its ports still listens."""
    reason = unavailable()
    if reason:
        pytest.skip(reason)
    with Rig(tmp_path_factory.mktemp("rig")) as started:
        namespaces = {host.namespace for host in started.hosts.values()}
        ports = {started.spark.port, started.spark.ui_port, started.sshd.port,
                 *started._weed_ports}
        yield started
        stopping = time.monotonic()
    assert time.monotonic() - stopping < 30, "the rig took more than 30 s to stop"
    left = [p for p in os.listdir("/proc") if p.isdigit() and _mount_ns(int(p)) in namespaces]
    assert not left, f"processes {left} still run on the rig's hosts"
    assert not ports & _listening_ports(), "a rig port still listens"
    assert not [s for port in ports for s in Path("/tmp").glob(f"seaweedfs-*-{port}.sock")]


def _mount_ns(pid: int) -> str | None:
    try:
        return os.readlink(f"/proc/{pid}/ns/mnt")
    except OSError:
        return None


def _listening_ports() -> set[int]:
    rows = Path("/proc/net/tcp").read_text().splitlines()[1:]
    return {int(r.split()[1].rsplit(":", 1)[1], 16) for r in rows if r.split()[3] == "0A"}
