"""Jobs through SSH: the plugin core drives the real ``rs-cluster`` behind a real OpenSSH server."""

from __future__ import annotations

from pathlib import Path

import pytest

from rs_qgis_plugin.core.errors import RemoteCommandError
from rs_qgis_plugin.core.jobs import RemoteJobs
from rs_qgis_plugin.core.jobspec import JobSpecBuilder
from rs_qgis_plugin.core.ssh import SshClient
from tests.procs import job_pids, wait_for

pytestmark = [pytest.mark.ssh, pytest.mark.usefixtures("need_cluster_python")]

ODD_NAME = "Bâtiments \"test\" $(touch canary); `id` 建筑"


def test_env_check_reports_the_cluster_stack(client):
    info = RemoteJobs(client).env()
    assert info["python"].startswith("3.") and info["rs_cluster"]
    assert "spark" in info and "gpus" in info


def test_job_outlives_its_ssh_session_and_is_followed_from_a_new_one(sshd, profile, known_hosts,
                                                                     tmp_path):
    inputs = tmp_path / "local images"
    inputs.mkdir()
    (inputs / "tile 1.tif").write_bytes(b"not really a tiff")
    spec = JobSpecBuilder(ODD_NAME).step("sleep", seconds=3, steps=6).build()
    with SshClient(profile, known_hosts) as first:
        status = RemoteJobs(first).submit(spec, {"inputs/images": inputs})
        sshd.kill_connections()  # the link drops hard, as when a laptop leaves the network
    assert status.job_id == spec.job_id and status.state == "running"
    # the session that started it is gone; the job is not
    with SshClient(profile, known_hosts) as second:
        jobs = RemoteJobs(second)
        assert jobs.status(spec.job_id).state == "running"
        seen = []
        final = jobs.wait(spec.job_id, poll_s=0.5, timeout=60, on_event=seen.append)
        assert final.state == "succeeded" and final.progress == 100.0
        sleep_done = [e.done for e in seen if e.stage == "sleep" and e.event == "progress"]
        assert sleep_done == [1, 2, 3, 4, 5, 6]
        listed = {j["job_id"]: j for j in jobs.list()}
        assert listed[spec.job_id]["name"] == ODD_NAME
        uploaded = Path(profile.remote_workspace, "jobs", spec.job_id, "inputs", "images", "tile 1.tif")
        assert uploaded.read_bytes() == b"not really a tiff"
        jobs.clean(spec.job_id)
        with pytest.raises(RemoteCommandError, match="no job"):
            jobs.status(spec.job_id)
    assert not (Path.home() / "canary").exists()


def test_cancel_from_a_new_session_stops_every_process_of_the_job(profile, known_hosts):
    spec = JobSpecBuilder("long").step("sleep", seconds=120, steps=120, children=2).build()
    with SshClient(profile, known_hosts) as first:
        RemoteJobs(first).submit(spec)
    with SshClient(profile, known_hosts) as second:
        jobs = RemoteJobs(second)
        # runner, step, and two children (one in a session of its own)
        wait_for(lambda: len(job_pids(spec.job_id)) >= 4, what="the job's processes", interval=0.2)
        status_file = Path(profile.remote_workspace, "jobs", spec.job_id, "status.json")
        import json

        session = json.loads(status_file.read_text())["pgid"]
        cancelled = jobs.cancel(spec.job_id)
        assert cancelled.state == "cancelled"
        assert job_pids(spec.job_id, session) == []
        assert jobs.status(spec.job_id).state == "cancelled"


def test_fetch_outputs_downloads_the_results(client, profile, tmp_path):
    jobs = RemoteJobs(client)
    spec = JobSpecBuilder("fetch").step("sleep", seconds=0.1, steps=1).build()
    jobs.submit(spec)
    assert jobs.wait(spec.job_id, poll_s=0.2, timeout=60).state == "succeeded"
    out = Path(profile.remote_workspace, "jobs", spec.job_id, "outputs", "masks")
    out.mkdir(parents=True)
    (out / "mask 1.tif").write_bytes(b"mask one")
    (out / "sub").mkdir()
    (out / "sub" / "mask 2.tif").write_bytes(b"mask two")
    fetched = jobs.fetch_outputs(spec.job_id, tmp_path / "results", ["outputs/masks"])
    assert sorted(p.relative_to(tmp_path / "results").as_posix() for p in fetched) == [
        "outputs/masks/mask 1.tif", "outputs/masks/sub/mask 2.tif"]
    assert (tmp_path / "results/outputs/masks/sub/mask 2.tif").read_bytes() == b"mask two"
