"""Uploads and downloads over a real OpenSSH server: sha256 checked, resumed after the connection
is cut (by killing the sshd process serving it), skipped when already there, odd names intact,
hostile names and links refused, and what the plugin creates on the cluster private to the user."""

from __future__ import annotations

import hashlib
import os
import stat
import subprocess
import threading
import time
from pathlib import Path

import pytest

from rs_qgis_plugin.core.errors import CancelledError, UnsafeRemoteNameError
from rs_qgis_plugin.core.jobs import RemoteJobs
from rs_qgis_plugin.core.transfer import PART_SUFFIX, Transfers, local_path_under
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


# -- names and links that come back from the cluster ------------------------------------------------
HOSTILE_NAMES = {
    # one file on Linux; on Windows two folders up from the results, e.g. QGIS's startup.py
    "windows-parent": "..\\..\\startup.py",
    "newline": "mask 1.tif\nmask 2.tif",
    "colon": "C:mask.tif",  # a drive-relative path, or an NTFS stream, on Windows
    "control": "mask\x1b[2J.tif",
    "bidi-override": "mask\u202efit.exe",  # shows as "maskexe.tif"
    "windows-device": "CON.tif",
    "trailing-dot": "mask.tif.",
}


def job_with_masks(profile, job_id: str) -> Path:
    """A job folder on the "cluster" (this machine) with one ordinary mask in outputs/masks."""
    masks = Path(profile.remote_workspace, "jobs", job_id, "outputs", "masks")
    masks.mkdir(parents=True)
    (masks / "good mask.tif").write_bytes(b"good")
    return masks


def files_under(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*")) if folder.exists() else []


@pytest.mark.parametrize("name", HOSTILE_NAMES.values(), ids=HOSTILE_NAMES.keys())
def test_a_hostile_file_name_in_the_results_is_refused_and_nothing_is_written(client, profile,
                                                                              tmp_path, name):
    masks = job_with_masks(profile, "hostile")
    (masks / name).write_bytes(b"import os  # would run when QGIS starts")
    home = tmp_path / "analyst"
    with pytest.raises(UnsafeRemoteNameError) as e:
        RemoteJobs(client).fetch_outputs("hostile", home / "results" / "hostile", ["outputs/masks"])
    assert repr(name) in str(e.value) and "outputs/masks" in str(e.value)
    # not even the good mask: the whole listing is checked before the first byte is fetched
    assert files_under(home) == []


def test_a_result_name_that_is_not_utf8_is_refused(client, profile, tmp_path):
    masks = job_with_masks(profile, "not-utf8")
    with open(os.fsencode(masks) + b"/mask \xff.tif", "wb") as f:
        f.write(b"latin-1 name")
    with pytest.raises(UnsafeRemoteNameError, match="not UTF-8") as e:
        RemoteJobs(client).fetch_outputs("not-utf8", tmp_path / "results", ["outputs/masks"])
    assert "outputs/masks" in str(e.value)
    assert files_under(tmp_path / "results") == []


@pytest.fixture
def secrets_outside(tmp_path) -> Path:
    """What a link in a job folder could point at: the analyst's SSH keys on the cluster."""
    ssh = tmp_path / "home on the cluster" / ".ssh"
    ssh.mkdir(parents=True)
    (ssh / "id_ed25519").write_text("-----BEGIN OPENSSH PRIVATE KEY-----\n")
    return ssh


@pytest.mark.parametrize("where", ["link in a result folder", "link to a folder in a result folder",
                                   "result is a link", "parent of a result is a link"])
def test_a_link_pointing_out_of_the_job_folder_is_not_followed(client, profile, tmp_path,
                                                                 secrets_outside, where):
    masks = job_with_masks(profile, "linked")
    job_dir = masks.parent.parent
    fetch, offender = ["outputs/masks"], ""
    if where == "link in a result folder":
        (masks / "key.tif").symlink_to(secrets_outside / "id_ed25519")
        offender = "key.tif"
    elif where == "link to a folder in a result folder":
        (masks / "more masks").symlink_to(secrets_outside)
        offender = "more masks"
    elif where == "result is a link":
        (job_dir / "outputs" / "eval.json").symlink_to(secrets_outside / "id_ed25519")
        fetch, offender = ["outputs/masks", "outputs/eval.json"], "outputs/eval.json"
    else:
        (job_dir / "outputs").rename(job_dir / "real outputs")
        (secrets_outside / "masks").mkdir()
        (secrets_outside / "masks" / "copied.tif").write_bytes(b"x")
        (job_dir / "outputs").symlink_to(secrets_outside)
        offender = "outputs"
    results = tmp_path / "results"
    with pytest.raises(UnsafeRemoteNameError, match="link") as e:
        RemoteJobs(client).fetch_outputs("linked", results, fetch)
    assert offender in str(e.value)
    assert files_under(results) == []


def test_results_with_ordinary_odd_names_still_arrive(client, profile, tmp_path):
    masks = job_with_masks(profile, "odd-ok")
    for name in ("Ünïcödé 建筑.tif", "it's \"quoted\" $(x).tif", "-dash.tif", "a.b.c.tif"):
        (masks / name).write_bytes(name.encode())
    fetched = RemoteJobs(client).fetch_outputs("odd-ok", tmp_path / "results", ["outputs/masks"])
    assert sorted(p.name for p in fetched) == sorted(p.name for p in masks.iterdir())
    for path in fetched:
        assert path.read_bytes() == (masks / path.name).read_bytes()


def test_a_local_result_path_stays_in_its_folder_even_through_a_link(tmp_path):
    results = tmp_path / "results"
    (results / "outputs").mkdir(parents=True)
    target = local_path_under(results, "outputs/masks/mask 1.tif")
    assert target.relative_to(results).as_posix() == "outputs/masks/mask 1.tif"
    # a link already on this computer (left by another program, say) is seen by resolving
    (results / "outputs" / "elsewhere").symlink_to(tmp_path)
    with pytest.raises(UnsafeRemoteNameError, match="outside"):
        local_path_under(results, "outputs/elsewhere/startup.py")
    with pytest.raises(UnsafeRemoteNameError, match="folder separator"):
        local_path_under(results, "outputs/..\\..\\startup.py")


# -- what the plugin creates on the cluster is private ----------------------------------------------
def mode_of(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def test_folders_and_uploads_the_plugin_creates_are_private(umask_022_client, tmp_path):
    transfers = Transfers(umask_022_client)
    source = tmp_path / "image.tif"
    source.write_bytes(os.urandom(3 * MB))
    workspace = tmp_path / "workspace"
    remote = workspace / "jobs" / "j1" / "inputs" / "image.tif"
    transfers.upload(source, str(remote))
    assert remote.read_bytes() == source.read_bytes()
    assert mode_of(remote) == 0o600
    for folder in (workspace, workspace / "jobs", workspace / "jobs" / "j1", remote.parent):
        assert mode_of(folder) == 0o700, folder
    # a partial upload is private from its first byte on, not only once renamed into place
    cancel = threading.Event()
    partial = remote.with_name("second.tif" + PART_SUFFIX)
    with pytest.raises(CancelledError):
        transfers.upload(source, str(remote.with_name("second.tif")), cancel=cancel,
                         progress=lambda *_: cancel.set())
    assert partial.stat().st_size > 0 and mode_of(partial) == 0o600
