"""rs_cluster.storage on its own: locations to filesystems, S3 settings from the AWS files, local
copies, and errors that name the URL. The S3 store itself is exercised on the multi-host rig
(tests/multihost/test_storage_loop.py); here an S3 endpoint that nothing listens on is enough to
prove an unreachable store is said so."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest

from rs_cluster import storage
from rs_cluster.errors import RsClusterError, StorageError


@pytest.fixture
def aws_home(tmp_path, monkeypatch):
    """A home with no AWS files and no AWS variables: each test writes what it needs."""
    home = tmp_path / "home"
    (home / ".aws").mkdir(parents=True)
    monkeypatch.setenv("HOME", str(home))
    for name in list(os.environ):
        if name.startswith("AWS_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")  # no probe of a cloud's metadata
    return home


def test_plain_paths_and_file_urls_resolve_to_the_local_disk(tmp_path):
    from pyarrow import fs

    for location in (str(tmp_path / "a"), f"file://{tmp_path}/a"):
        filesys, path = storage.url_to_fs(location)
        assert isinstance(filesys, fs.LocalFileSystem) and path == str(tmp_path / "a")
        assert storage.is_local(location)
    assert not storage.is_local("s3://bucket/a") and not storage.is_local("hdfs://nn:8020/a")


def test_the_s3_endpoint_and_region_come_from_the_aws_config_file_then_the_variables(
        aws_home, monkeypatch):
    (aws_home / ".aws" / "config").write_text(
        "[default]\nregion = eu-west-3\nendpoint_url = http://store.example:8333\n"
        "[profile other]\nregion = ap-south-1\ns3 =\n  endpoint_url = https://other.example\n")

    assert storage.s3_settings() == storage.S3Settings("http://store.example:8333", "eu-west-3")
    filesys, path = storage.url_to_fs("s3://jobs/prefix/x.json")
    assert path == "jobs/prefix/x.json" and filesys.region == "eu-west-3"
    monkeypatch.setenv("AWS_PROFILE", "other")
    assert storage.s3_settings() == storage.S3Settings("https://other.example", "ap-south-1")
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://10.0.0.9:9000")
    monkeypatch.setenv("AWS_REGION", "us-west-2")
    settings = storage.s3_settings()
    assert settings == storage.S3Settings("http://10.0.0.9:9000", "us-west-2")
    assert (settings.endpoint_host, settings.scheme) == ("10.0.0.9:9000", "http")
    # Petastorm's s3fs gets the endpoint and region, never keys.
    assert storage.fsspec_options("s3://jobs/ds") == {
        "client_kwargs": {"region_name": "us-west-2", "endpoint_url": "http://10.0.0.9:9000"}}
    assert storage.fsspec_options("/local/ds") is None


def test_an_unreachable_store_is_one_error_naming_the_url_not_the_secret(aws_home, monkeypatch):
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    secret = "s3cr3t-never-printed-0123456789"
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIDTEST")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)

    with pytest.raises(StorageError) as e:
        storage.exists("s3://jobs/job-1/dataset")
    assert isinstance(e.value, RsClusterError) and isinstance(e.value, OSError)
    message = str(e.value)
    assert message.startswith("s3://jobs/job-1/dataset: the storage service at "
                              f"http://127.0.0.1:{port} cannot be reached")
    assert secret not in message and "\n" not in message


def test_the_cli_says_which_url_it_cannot_reach_in_one_line(aws_home, tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    (aws_home / ".aws" / "credentials").write_text(
        "[default]\naws_access_key_id = AKIDTEST\naws_secret_access_key = file-secret-42424242\n")
    (aws_home / ".aws" / "config").write_text(f"[default]\nendpoint_url = http://127.0.0.1:{port}\n")
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()

    result = subprocess.run(
        [sys.executable, "-m", "rs_cluster", "prepare", "--images", str(tmp_path / "images"),
         "--masks", str(tmp_path / "masks"), "--output", "s3://jobs/job-2/dataset"],
        capture_output=True, text=True, timeout=120, env={**os.environ, "HOME": str(aws_home)})

    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith(
        "rs-cluster prepare: error: s3://jobs/job-2/dataset: the storage service at")
    assert "Traceback" not in result.stderr and "file-secret-42424242" not in result.stderr


def test_local_input_and_output_use_the_path_itself_and_write_whole(tmp_path):
    src = tmp_path / "in.txt"
    src.write_text("pixels")
    with storage.local_input(str(src)) as path:
        assert path == str(src)
    out = tmp_path / "out" / "report.json"
    with storage.local_output(str(out)) as tmp:
        assert os.path.dirname(tmp) == str(out.parent) and os.path.basename(tmp).startswith(".")
        with open(tmp, "w") as f:
            f.write("{}")
        assert not out.exists()  # not at its name until complete
    assert out.read_text() == "{}"
    with pytest.raises(RuntimeError), storage.local_output(str(tmp_path / "failed.json")) as tmp:
        with open(tmp, "w") as f:
            f.write("half")
        raise RuntimeError("killed")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.txt", "out"]


def test_copy_tree_and_the_runner_hooks_stage_and_fetch_a_job(tmp_path):
    job_dir = tmp_path / "job"
    (job_dir / "inputs" / "images").mkdir(parents=True)
    (job_dir / "inputs" / "images" / "a.tif").write_bytes(b"tif")
    store = tmp_path / "store"
    job_url = storage.job_url(f"file://{store}", "ana", "20261201-1200-ab12")

    storage.stage_inputs(str(job_dir), job_url)
    assert (store / "ana" / "20261201-1200-ab12" / "inputs" / "images" / "a.tif").read_bytes() == b"tif"
    storage.write_json(storage.join(job_url, "masks", "predict.json"), {"outputs": []})
    copied = storage.fetch_results(job_url, str(job_dir), ("masks", "model"))
    assert copied == ["masks"]
    assert (job_dir / "masks" / "predict.json").is_file() and not (job_dir / "model").exists()
    with pytest.raises(StorageError):
        storage.job_url("s3://b/p", "ana", "../other")
    with pytest.raises(StorageError):
        storage.job_url("s3://b/p", "../ana", "job1")
