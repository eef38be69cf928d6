"""Uploads and downloads over a real OpenSSH server: sha256 checked, resumed after the connection
is cut (by killing the sshd process serving it), skipped when already there, odd names intact."""

from __future__ import annotations

import hashlib
import os
import subprocess
import threading
import time

import pytest

from rs_qgis_plugin.core.errors import CancelledError
from rs_qgis_plugin.core.transfer import PART_SUFFIX, Transfers
from tests.rs_qgis_plugin.core.test_ssh import NASTY_NAMES

pytestmark = pytest.mark.ssh

MB = 1 << 20
SIZE = 100 * MB


@pytest.fixture(scope="module")
def big_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("big") / "raster 100MB.bin"
    rng_block = os.urandom(4 * MB)
    with open(path, "wb") as f:
        for i in range(SIZE // len(rng_block)):
            f.write(bytes([i]) + rng_block[1:])  # every block differs
    return path


def sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def cut_connection_at(sshd, at: int):
    """A progress callback that kills the sshd serving the transfer once ``at`` bytes are done."""
    state = {"cut_at": None, "calls": []}

    def progress(done: int, total: int, percent: float) -> None:
        state["calls"].append((done, total, percent))
        if state["cut_at"] is None and done >= at:
            state["cut_at"] = done
            assert sshd.kill_connections() >= 1

    return progress, state


def test_upload_and_download_resume_after_the_connection_is_cut(sshd, client, big_file, tmp_path):
    transfers = Transfers(client, retry_delay=0.2)
    remote = f"{tmp_path}/remote dir/big.bin"
    progress, state = cut_connection_at(sshd, 40 * MB)
    up = transfers.upload(big_file, remote, progress=progress)
    assert up.attempts == 2 and not up.skipped
    assert up.sha256 == sha256(big_file) == sha256(tmp_path / "remote dir" / "big.bin")
    # What had arrived before the cut was not sent again: the second attempt started there.
    assert up.resumed_from > 20 * MB
    assert up.last_attempt_bytes == SIZE - up.resumed_from < SIZE
    assert up.bytes_sent < SIZE + 8 * MB  # only what was in flight at the cut went twice
    assert not (tmp_path / "remote dir" / ("big.bin" + PART_SUFFIX)).exists()
    assert state["calls"][-1] == (SIZE, SIZE, 100.0)

    local = tmp_path / "back" / "big.bin"
    # Cut early: the download reads ahead, and on a busy machine a late cut could come after the
    # last byte had already been received.
    progress, state = cut_connection_at(sshd, 15 * MB)
    down = transfers.download(remote, local, progress=progress)
    assert down.attempts == 2 and down.resumed_from > 10 * MB
    assert down.last_attempt_bytes == SIZE - down.resumed_from < SIZE
    assert down.bytes_sent < SIZE + 8 * MB
    assert sha256(local) == up.sha256
    assert not local.with_name("big.bin" + PART_SUFFIX).exists()

    # Both sides now hold the same content: nothing is sent again.
    assert transfers.upload(big_file, remote).skipped
    assert transfers.download(remote, local).skipped


def test_changed_partial_upload_is_not_trusted(client, tmp_path):
    transfers = Transfers(client)
    source = tmp_path / "src.bin"
    source.write_bytes(os.urandom(3 * MB))
    remote = tmp_path / "dst.bin"
    # A stale partial file with other content must be discarded, not continued.
    remote.with_name("dst.bin" + PART_SUFFIX).write_bytes(os.urandom(MB))
    result = transfers.upload(source, str(remote))
    assert result.resumed_from == 0 and remote.read_bytes() == source.read_bytes()


def test_cancel_stops_a_transfer_and_keeps_the_partial_file(client, big_file, tmp_path):
    transfers = Transfers(client)
    cancel = threading.Event()

    def progress(done: int, total: int, percent: float) -> None:
        if done > 10 * MB:
            cancel.set()

    remote = tmp_path / "cancelled.bin"
    with pytest.raises(CancelledError):
        transfers.upload(big_file, str(remote), progress=progress, cancel=cancel)
    assert not remote.exists()
    partial = remote.with_name("cancelled.bin" + PART_SUFFIX)
    assert 0 < partial.stat().st_size < SIZE
    resumed = transfers.upload(big_file, str(remote))
    assert resumed.resumed_from > 0 and sha256(remote) == sha256(big_file)
    # the hash follower of the cancelled attempt did not stay behind on the cluster
    deadline = time.monotonic() + 10
    while followers_of(partial) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert followers_of(partial) == []


def followers_of(path) -> list[int]:
    out = subprocess.run(["pgrep", "-f", f"hashlib.*{path.name}"], capture_output=True, text=True)
    return [int(p) for p in out.stdout.split()]


def test_odd_file_names_survive_the_round_trip_and_run_nothing(client, tmp_path):
    transfers = Transfers(client)
    remote_dir = tmp_path / "remote $(touch canary) ; dir"
    for i, name in enumerate(NASTY_NAMES):
        local = tmp_path / "local" / name
        local.parent.mkdir(exist_ok=True)
        local.write_bytes(f"content {i}".encode())
        up = transfers.upload(local, f"{remote_dir}/{name}")
        assert (remote_dir / name).read_bytes() == local.read_bytes()
        back = tmp_path / "back" / name
        down = transfers.download(f"{remote_dir}/{name}", back)
        assert back.read_bytes() == local.read_bytes() and down.sha256 == up.sha256
    assert sorted(p.name for p in remote_dir.iterdir()) == sorted(NASTY_NAMES)
    home = client.run(["sh", "-c", "pwd"]).stdout.strip()
    for canary in ("canary", "canary2", "canary3"):
        assert not os.path.exists(os.path.join(home, canary))
        assert not (tmp_path / canary).exists()


@pytest.mark.parametrize("python", ["python3", "/no/python3"])  # the second: sha256sum fallback
def test_remote_sha256_of_whole_files_and_prefixes(client, tmp_path, python):
    transfers = Transfers(client, remote_python=python)
    path = tmp_path / "it's $(x).bin"
    data = os.urandom(3 * MB + 17)
    path.write_bytes(data)
    assert transfers.remote_sha256(str(path)) == hashlib.sha256(data).hexdigest()
    assert transfers.remote_sha256(str(path), MB + 1) == hashlib.sha256(data[: MB + 1]).hexdigest()
