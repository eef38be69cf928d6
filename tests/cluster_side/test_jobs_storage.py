"""The job runner and shared storage (issue 17): with ``storage.url`` in the cluster settings, a
job's inputs go to ``<storage>/<user>/<job-id>/``, its steps get URLs there, and its results come
back into the job folder before it may succeed; without one, a job bound for a Spark master beyond
the login host is refused before anything runs.

Here the store is a ``file://`` folder (the "every node mounts it" case) and jobs run the real
runner with the tests' ``sleep`` stage; tests/multihost/test_jobs_storage.py runs real stages
against the rig's S3 store across hosts.
"""

from __future__ import annotations

import getpass
import json
from pathlib import Path

import pytest

from tests.cluster_side.test_jobs import ENDED, cli, status_of, write_spec
from tests.procs import job_pids, live_processes, wait_for

SECRET = "wJalrXUtnFEMI-K7MDENG-bPxRfiCYSTORAGEKEY"


def settings_file(tmp_path: Path, monkeypatch, text: str) -> Path:
    path = tmp_path / "cluster.toml"
    path.write_text(text)
    path.chmod(0o600)
    monkeypatch.setenv("RS_CLUSTER_CONFIG", str(path))
    return path


def sleep_job(job_id: str, **params: object) -> dict:
    return {"schema_version": 1, "job_id": job_id, "name": job_id,
            "steps": [{"stage": "sleep", "params": {"seconds": 0.2, "steps": 2, **params}}]}


def submit_folder(ws: Path, spec: dict, inputs: dict[str, bytes]) -> Path:
    """A job folder as the plugin uploads it (job.json and inputs/), then ``job submit`` of it."""
    job_dir = ws / "jobs" / spec["job_id"]
    for rel, data in inputs.items():
        (job_dir / rel).parent.mkdir(parents=True, exist_ok=True)
        (job_dir / rel).write_bytes(data)
    (job_dir / "job.json").write_text(json.dumps(spec))
    cli(ws, "job", "submit", str(job_dir), check=False)
    return job_dir


def test_inputs_go_to_the_store_steps_use_it_and_results_come_back(tmp_path, monkeypatch):
    store = tmp_path / "store"
    settings_file(tmp_path, monkeypatch, f'[storage]\nurl = "file://{store}"\n')
    ws = tmp_path / "ws"
    job_dir = submit_folder(ws, sleep_job("st1", output="outputs/result.txt"),
                            {"inputs/images/a.tif": b"tif bytes"})
    final = wait_for(lambda: (s := status_of(ws, "st1"))["state"] in ENDED and s)
    assert (final["state"], final["results"]) == ("succeeded", ["outputs/result.txt"]), final
    remote = store / getpass.getuser() / "st1"
    assert (remote / "inputs" / "images" / "a.tif").read_bytes() == b"tif bytes"
    # The step wrote into the store, not the job folder; the runner brought the result back.
    assert (remote / "outputs" / "result.txt").read_text() == "slept\n"
    assert (job_dir / "outputs" / "result.txt").read_text() == "slept\n"
    log = (job_dir / "log.txt").read_text()
    assert f"--output file://{remote}/outputs/result.txt" in log
    assert not [p for p in job_dir.iterdir() if p.name.startswith(".fetch")]


def test_a_remote_master_without_storage_fails_before_any_step_with_one_line(tmp_path,
                                                                           monkeypatch):
    path = settings_file(tmp_path, monkeypatch, '[spark]\nmaster = "spark://head.example:7077"\n')
    ws = tmp_path / "ws"
    spec = {"schema_version": 1, "job_id": "nost1", "name": "no storage", "steps": [
        {"stage": "prepare", "params": {"images": "inputs/images", "masks": "inputs/masks",
                                        "output": "outputs/dataset"}}]}
    proc = cli(ws, "job", "submit", str(write_spec(tmp_path, spec)), check=False)
    final = wait_for(lambda: (s := status_of(ws, "nost1"))["state"] in ENDED and s)
    assert final["state"] == "failed"
    assert final["message"] == (
        "step 1 (prepare) would run on the Spark master spark://head.example:7077, whose "
        f"executors cannot see the job folder {ws.resolve() / 'jobs' / 'nost1'} on this login "
        f"host: set storage.url in {path} to a store every node reaches (s3://bucket/prefix, "
        "or file:///path every node mounts), or jobs.shared_workspace = true if every node "
        "mounts the workspace itself")
    assert proc.returncode == 1
    assert proc.stderr == f"rs-cluster job submit: job nost1 failed: {final['message']}\n"
    assert not (ws / "jobs" / "nost1" / "log.txt").exists()  # no runner, no step started


def test_a_workspace_every_node_mounts_needs_no_storage_for_a_remote_master(tmp_path,
                                                                          monkeypatch):
    from rs_cluster import jobs
    from rs_cluster.jobspec import parse_job_spec

    spec_dict = {"schema_version": 1, "job_id": "shared1", "name": "shared", "steps": [
        {"stage": "prepare", "params": {"images": "inputs/images", "masks": "inputs/masks",
                                        "output": "outputs/dataset"}}]}
    job_dir = tmp_path / "ws" / "jobs" / "shared1"
    job_dir.mkdir(parents=True)
    spec = parse_job_spec(spec_dict, job_dir)
    settings_file(tmp_path, monkeypatch, '[spark]\nmaster = "spark://head.example:7077"\n')
    with pytest.raises(jobs.ConfigError, match="jobs.shared_workspace = true"):
        jobs.job_storage(spec, job_dir)
    settings_file(tmp_path, monkeypatch, '[spark]\nmaster = "spark://head.example:7077"\n'
                  '[jobs]\nshared_workspace = true\n')
    assert jobs.job_storage(spec, job_dir) is None  # the stages run in the job folder
    settings_file(tmp_path, monkeypatch, '[jobs]\nshared_workspace = "yes"\n')
    with pytest.raises(jobs.ConfigError, match="jobs.shared_workspace must be true or false"):
        jobs.job_storage(spec, job_dir)


@pytest.mark.parametrize("storage, expected", [
    ('credentials = "aws-profile:rs"\nendpoint_url = "http://127.0.0.1:8333"',
     {"AWS_PROFILE": "rs", "AWS_ENDPOINT_URL": "http://127.0.0.1:8333"}),
    ('credentials = "file:/etc/rs/s3.ini"', {"AWS_SHARED_CREDENTIALS_FILE": "/etc/rs/s3.ini"}),
    (f'access_key_id = "AKIDSTORAGE"\nsecret_access_key = "{SECRET}"',
     {"AWS_ACCESS_KEY_ID": "AKIDSTORAGE", "AWS_SECRET_ACCESS_KEY": SECRET}),
])
def test_the_storage_settings_reach_the_steps_environment_but_no_file_of_the_job(
        tmp_path, monkeypatch, storage, expected):
    store = tmp_path / "store"
    settings_file(tmp_path, monkeypatch, f'[storage]\nurl = "file://{store}"\n{storage}\n')
    for name in ("AWS_PROFILE", "AWS_ENDPOINT_URL", "AWS_SHARED_CREDENTIALS_FILE",
                 "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(name, raising=False)
    ws = tmp_path / "ws"
    cli(ws, "job", "submit", str(write_spec(tmp_path, sleep_job("env1", seconds=60, steps=60))))

    def step_env():
        for proc in live_processes():
            if proc.environ.get("RS_CLUSTER_JOB_ID") == "env1" and "selftest-sleep" in proc.argv:
                return proc.environ
        return None

    env = wait_for(step_env, what="the sleep step to start")
    assert {k: env.get(k) for k in expected} == expected
    cli(ws, "job", "cancel", "env1")
    assert job_pids("env1") == []
    job_dir = ws / "jobs" / "env1"
    for name in ("job.json", "status.json", "events.jsonl", "log.txt"):
        assert SECRET not in (job_dir / name).read_text(), name


def test_clean_deletes_the_jobs_copy_in_the_store_and_nothing_else(tmp_path, monkeypatch):
    store = tmp_path / "store"
    settings_file(tmp_path, monkeypatch, f'[storage]\nurl = "file://{store}"\n')
    ws = tmp_path / "ws"
    job_dir = submit_folder(ws, sleep_job("st-clean", output="outputs/result.txt"),
                            {"inputs/a.tif": b"tif bytes"})
    final = wait_for(lambda: (s := status_of(ws, "st-clean"))["state"] in ENDED and s)
    remote = store / getpass.getuser() / "st-clean"
    assert final["storage_url"] == f"file://{remote}" and (remote / "inputs" / "a.tif").exists()
    neighbour = store / getpass.getuser() / "another-job" / "inputs"
    neighbour.mkdir(parents=True)
    # A status.json naming a URL of another shape (edited by hand) deletes nothing in the store.
    odd = ws / "jobs" / "odd-job"
    odd.mkdir()
    (odd / "job.json").write_text(json.dumps(sleep_job("odd-job")))
    (odd / "status.json").write_text(json.dumps(
        {"job_id": "odd-job", "state": "failed", "storage_url": f"file://{store}"}))

    cli(ws, "job", "clean", "st-clean")
    cli(ws, "job", "clean", "odd-job")

    assert not job_dir.exists() and not remote.exists() and not odd.exists()
    assert neighbour.is_dir() and store.is_dir()


def test_a_dataset_that_a_later_step_trains_on_stays_in_the_store():
    from rs_cluster.jobspec import parse_job_spec

    steps = [{"stage": "prepare", "params": {"images": "inputs/i", "masks": "inputs/m",
                                             "output": "dataset"}},
             {"stage": "train", "params": {"data": "dataset", "model_dir": "model"}},
             {"stage": "predict", "params": {"model": "model", "input": "inputs/p",
                                             "output": "predictions"}}]
    spec = parse_job_spec({"schema_version": 1, "job_id": "j", "name": "j", "steps": steps})
    assert spec.results() == ["model", "predictions"]
    only_prepare = parse_job_spec({"schema_version": 1, "job_id": "j", "name": "j",
                                   "steps": steps[:1]})
    assert only_prepare.results() == ["dataset"]  # what that job was for: it comes back
