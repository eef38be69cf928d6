"""Jobs through SSH: the plugin core drives the real ``rs-cluster`` behind a real OpenSSH server."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from rs_qgis_plugin.core.errors import ProtocolError, RemoteCommandError
from rs_qgis_plugin.core.jobs import RemoteJobs
from rs_qgis_plugin.core.jobspec import JobSpecBuilder
from rs_qgis_plugin.core.ssh import SshClient
from tests.cluster_selftest import plugin_sleep_spec
from tests.procs import job_pids, wait_for

pytestmark = [pytest.mark.ssh, pytest.mark.usefixtures("need_cluster_python")]

ODD_NAME = "Bâtiments \"test\" $(touch canary); `id` 建筑"


def test_env_check_reports_the_cluster_stack(client):
    info = RemoteJobs(client).env()
    assert info["python"].startswith("3.") and info["rs_cluster"]
    assert "spark" in info and "gpus" in info


def with_settings_file(profile, path: Path):
    """The profile, its rs-cluster reading the cluster settings file ``path``."""
    from dataclasses import replace

    return replace(profile, remote_command=("/usr/bin/env", f"RS_CLUSTER_CONFIG={path}",
                                            *profile.remote_command))


def test_env_probe_with_problems_is_an_answer_not_an_error(profile, known_hosts, tmp_path):
    """``rs-cluster env --probe`` exits 1 when it finds problems, its report still on stdout:
    that is the answer. A settings file the cluster refuses is an error naming the file."""
    settings_file = tmp_path / "cluster.toml"
    settings_file.write_text('[spark]\nmaster = "spark://127.0.0.1:9"\n')  # nothing listens
    with SshClient(with_settings_file(profile, settings_file), known_hosts) as client:
        info = RemoteJobs(client).env(probe=True)
        assert info["cluster"]["master"] == "spark://127.0.0.1:9"
        probe = info["probe"]
        assert probe["master_reachable"] is False and probe["executors"] == []
        assert any("spark://127.0.0.1:9 cannot be reached" in p for p in probe["problems"])
        assert "probe" not in RemoteJobs(client).env()  # the plain report runs no Spark
    settings_file.write_text('[spark]\nmastr = "yarn"\n')
    with SshClient(with_settings_file(profile, settings_file), known_hosts) as client:
        for probe_too in (False, True):
            with pytest.raises(RemoteCommandError, match="mastr") as caught:
                RemoteJobs(client).env(probe=probe_too)
            assert caught.value.exit_status not in (0, None)


def test_job_outlives_its_ssh_session_and_is_followed_from_a_new_one(sshd, profile, known_hosts,
                                                                     tmp_path):
    inputs = tmp_path / "local images"
    inputs.mkdir()
    (inputs / "tile 1.tif").write_bytes(b"not really a tiff")
    spec = plugin_sleep_spec(ODD_NAME, seconds=3, steps=6)
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
    spec = plugin_sleep_spec("long", seconds=120, steps=120, children=2)
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
    spec = plugin_sleep_spec("fetch", seconds=0.1, steps=1)
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


def finished_job_on_the_cluster(profile, folder: str, **status_changes) -> Path:
    """A job folder as rs-cluster leaves a succeeded job, with ``status_changes`` made to its
    status.json, as a modified cluster side or a tampering process there could."""
    job_dir = Path(profile.remote_workspace, "jobs", folder)
    (job_dir / "outputs" / "masks").mkdir(parents=True)
    (job_dir / "outputs" / "masks" / "mask.tif").write_bytes(b"mask")
    spec = JobSpecBuilder("tampered", job_id=folder).predict(
        model="inputs/model", input="inputs/images", output="outputs/masks").build()
    (job_dir / "job.json").write_text(spec.to_json())
    status = {"schema_version": 1, "job_id": folder, "name": "tampered", "state": "succeeded",
              "stage": "predict", "step": 1, "steps": 1, "progress": 100.0, "message": "done",
              "submitted": "2026-01-01T00:00:00.000+00:00", "started": None, "finished": None,
              "exit_code": 0, "pid": None, "results": ["outputs/masks"], **status_changes}
    (job_dir / "status.json").write_text(json.dumps(status))
    return job_dir


def test_a_status_naming_another_job_is_refused(client, profile):
    finished_job_on_the_cluster(profile, "asked-for", job_id="someone-else")
    jobs = RemoteJobs(client)
    with pytest.raises(ProtocolError, match="status of job 'someone-else' when asked for job "
                                            "'asked-for'"):
        jobs.status("asked-for")


def test_results_sent_as_text_are_refused_not_read_letter_by_letter(client, profile, tmp_path):
    finished_job_on_the_cluster(profile, "text-results", results="outputs/masks")
    jobs = RemoteJobs(client)
    with pytest.raises(ProtocolError, match="field 'results' must be a list of strings, got str"):
        jobs.status("text-results")
    with pytest.raises(ProtocolError, match="field 'results'"):
        jobs.fetch_outputs("text-results", tmp_path / "results")
    assert not (tmp_path / "results").exists()


def test_a_result_outside_the_job_folder_is_refused(client, profile, tmp_path):
    finished_job_on_the_cluster(profile, "escaping", results=["outputs/../../../.ssh"])
    with pytest.raises(ProtocolError, match=r"holds 'outputs/\.\./\.\./\.\./\.ssh'"):
        RemoteJobs(client).fetch_outputs("escaping", tmp_path / "results")
    assert not (tmp_path / "results").exists()


def test_the_job_folder_and_spec_are_private_to_the_user(umask_022_client, tmp_path):
    client = umask_022_client
    jobs = RemoteJobs(client)
    truth = tmp_path / "truth.tif"
    truth.write_bytes(b"not really a tiff")
    # a job that fails at once (nothing to evaluate): what matters is what submit left
    spec = JobSpecBuilder("private").evaluate(pred="inputs/pred", truth="inputs/truth",
                                              json="outputs/eval.json").build()
    jobs.submit(spec, {"inputs/truth/truth.tif": truth})
    workspace = Path(client.profile.remote_workspace)
    job_dir = workspace / "jobs" / spec.job_id

    def mode(path: Path) -> int:
        return stat.S_IMODE(os.lstat(path).st_mode)

    assert mode(job_dir / "job.json") == 0o600
    assert mode(job_dir / "inputs" / "truth" / "truth.tif") == 0o600
    for folder in (workspace, workspace / "jobs", job_dir, job_dir / "inputs",
                   job_dir / "inputs" / "truth"):
        assert mode(folder) == 0o700, folder
    assert jobs.wait(spec.job_id, poll_s=0.2, timeout=120).state == "failed"
