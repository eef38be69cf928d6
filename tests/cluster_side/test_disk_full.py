"""A full disk under the job folders: the job that fills it fails with a clear message, earlier
results stay intact, and nothing half-written is left looking complete.

The small filesystem is a real tmpfs mounted for each test (``mount -t tmpfs -o size=...``), so
writes fail as they do on a full cluster disk: the kernel answers ENOSPC, which reaches predict
through GDAL's GeoTIFF writer and the job runner through Python's file writes. Mounting needs root
(CAP_SYS_ADMIN); elsewhere the tests are skipped. The jobs run through the real detached runner,
the real predict stage on a real local Spark, a real Keras model and real dev rasters.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import rasterio

from rs_cluster import jobs
from rs_cluster.errors import DiskFullError
from rs_cluster.geotiff_out import GeoTiffSink, naming_a_full_disk
from rs_cluster.progress import parse_event
from tests import cluster_selftest, devdata
from tests.cluster_side.test_predict import build_channel_model
from tests.procs import wait_for

pytestmark = pytest.mark.spark

XIAMEN = (devdata.subset("xiamen_robosat_z18") / "images"
          / devdata.first_files("xiamen_robosat_z18", 1)[0])  # 256 x 256 px, its mask is 7 kB
# 797 x 644 px: its float32 probability raster is about 1 MB even compressed.
DUBAI = devdata.subset("dubai_mbrsc_hitl") / "images" / "tile1_part_001.png"
PAGE = os.sysconf("SC_PAGE_SIZE")
# Room left beside the staged inputs: the first job's mask (7 kB) and every job's own files
# (spec, status, events, log, the runner's 64 KiB reserve) fit; the second job's rasters do not.
HEADROOM = 512 * 1024


@pytest.fixture
def small_disk(tmp_path):
    """Mounts a tmpfs of the size asked for; unmounts it afterwards, stopping any job left on it."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root (CAP_SYS_ADMIN)")
    mounted: list[Path] = []

    def mount(size: int) -> Path:
        point = tmp_path / f"disk{len(mounted)}"
        point.mkdir()
        proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs",
                               str(point)], capture_output=True, text=True)
        if proc.returncode != 0:
            pytest.skip(f"mount -t tmpfs is not permitted here: {proc.stderr.strip()}")
        mounted.append(point)
        return point

    yield mount
    for point in mounted:
        workspace = jobs.Workspace(point)
        for job_id in workspace.job_ids():
            with contextlib.suppress(Exception):
                jobs.cancel(workspace, job_id, grace_s=2.0)
        if subprocess.run(["umount", str(point)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "--lazy", str(point)], check=True)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return build_channel_model(tmp_path_factory.mktemp("model") / "copy-red")


def pages(*paths: Path) -> int:
    """Bytes the files take on a tmpfs: whole pages."""
    files = [f for p in paths for f in ([p] if p.is_file() else p.rglob("*")) if f.is_file()]
    return sum(-(-f.stat().st_size // PAGE) * PAGE for f in files)


def stage_job(workspace: Path, job_id: str, model: Path, image: Path, **params: object) -> Path:
    """A job folder as the plugin uploads it: job.json, the model and one image under inputs/."""
    job_dir = workspace / "jobs" / job_id
    shutil.copytree(model, job_dir / "inputs" / "model")
    (job_dir / "inputs" / "images").mkdir()
    shutil.copyfile(image, job_dir / "inputs" / "images" / image.name)
    (job_dir / "job.json").write_text(json.dumps({
        "schema_version": 1, "job_id": job_id, "name": f"predict {image.name}",
        "steps": [{"stage": "predict", "params": {
            "model": "inputs/model", "input": "inputs/images", "output": "outputs/pred",
            "master": "local[1]", **params}}]}))
    return job_dir


def run_to_the_end(workspace: Path, job_dir: Path, timeout_s: float = 180.0) -> dict:
    jobs.submit(jobs.Workspace(workspace), job_dir)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        status = jobs.read_status(job_dir)
        if status["state"] in jobs.TERMINAL_STATES:
            return status
        time.sleep(0.2)
    log = (job_dir / jobs.LOG_FILE).read_text(errors="replace")[-3000:]
    raise AssertionError(f"job {job_dir.name} still {status['state']} after {timeout_s} s:\n{log}")


def test_a_job_that_fills_the_disk_fails_clearly_and_leaves_earlier_results_intact(
        small_disk, model_dir):
    staged = 2 * pages(model_dir) + pages(XIAMEN, DUBAI)
    disk = small_disk(staged + HEADROOM)
    fits = stage_job(disk, "fits", model_dir, XIAMEN)
    too_big = stage_job(disk, "too-big", model_dir, DUBAI, probabilities=True)

    first = run_to_the_end(disk, fits)
    assert first["state"] == "succeeded", first["message"]
    mask = fits / "outputs" / "pred" / f"{XIAMEN.stem}_mask.tif"
    with rasterio.open(mask) as src:
        assert (src.width, src.height) == (256, 256)
    before = devdata.tree_digest(fits)

    second = run_to_the_end(disk, too_big)

    assert second["state"] == "failed" and second["exit_code"] != 0
    message = second["message"]
    assert re.search(rf"{re.escape(str(too_big))}/outputs/pred/{DUBAI.stem}_(mask|prob)\.tif: "
                     r"no space left on device \(disk full\)", message), message
    assert "free space" in message
    events = [parse_event(line) for line in jobs.read_events(too_big)[0]]
    assert events[-1]["stage"] == "job" and events[-1]["event"] == "finish"
    assert events[-1]["state"] == "failed"
    # Nothing of the failed run is left: no mask that looks complete, no hidden partial file,
    # no predict.json; the runner gave back its reserve.
    assert sorted(p.name for p in (too_big / "outputs").rglob("*")) == ["pred"]
    assert not (too_big / jobs.RESERVE_FILE).exists()
    assert [p.name for p in disk.rglob("*.tmp")] == []
    assert devdata.tree_digest(fits) == before


def test_a_job_ends_failed_when_something_else_fills_its_disk(small_disk, tmp_path, monkeypatch):
    """The disk fills while a step runs: the step's events, the runner's status updates and events
    all find it full, and the job must still end ``failed`` with the reason, not stay ``running``."""
    entry = cluster_selftest.install(monkeypatch)  # the sleep stage is test-only
    disk = small_disk(1024 * 1024)
    spec = tmp_path / "sleeper.json"
    spec.write_text(json.dumps({"schema_version": 1, "job_id": "sleeper", "steps": [
        {"stage": "sleep", "params": {"seconds": 60, "steps": 600}}]}))
    workspace = jobs.Workspace(disk)
    jobs.submit(workspace, spec, entry_module=entry)
    job_dir = workspace.job_dir("sleeper")
    wait_for(lambda: jobs.read_status(job_dir)["message"] not in
             ("queued", "started", "sleep started"), 60, "the sleep step to report progress")

    with open(disk / "filler", "wb", buffering=0) as f, pytest.raises(OSError, match="No space"):
        while True:
            f.write(bytes(64 * 1024))
    status = wait_for(lambda: (s := jobs.read_status(job_dir))["state"] not in jobs.ACTIVE_STATES
                      and s, 60, "the job to end once its disk was full", interval=0.2)

    assert status["state"] == "failed" and status["finished"], status
    assert "no space left on device (disk full)" in status["message"], status["message"]
    # the runner exits right after writing its final status
    wait_for(lambda: not jobs.runner_alive(status), 10, "the runner to exit after the job ended")
    # The full disk may have cut the step's last event line short: `job events` leaves such a
    # fragment out, so every line it gives parses, ending with the job's own verdict.
    events = [parse_event(line) for line in jobs.read_events(job_dir)[0]]
    assert (events[-1]["stage"], events[-1]["event"], events[-1]["state"]) == ("job", "finish", "failed")
    assert sorted(p.name for p in job_dir.iterdir()) == [
        ".status.lock", "events.jsonl", "inputs", "job.json", "log.txt", "outputs", "status.json"]


def test_a_geotiff_the_disk_cannot_finish_is_never_renamed_into_place(small_disk):
    """GDAL writes partial blocks and the TIFF directory only when the file closes, and rasterio's
    close() does not raise when that fails: the output must still not appear."""
    disk = small_disk(256 * 1024)
    final = disk / "tile_prob.tif"
    profile = {"driver": "GTiff", "width": 1000, "height": 256, "count": 1, "dtype": "float32",
               "tiled": True, "blockxsize": 256, "blockysize": 256, "compress": "deflate",
               "predictor": 3}
    sink = GeoTiffSink(str(final), profile, None, "t1")
    noise = np.random.default_rng(0).random((256, 1000), dtype=np.float32)  # 1 MB, incompressible
    with pytest.raises(DiskFullError, match=rf"{re.escape(str(final))}: no space left on device"):
        sink.write(noise[:128], 0, None)  # half blocks: GDAL keeps them in its cache until close,
        sink.write(noise[128:], 128, None)  # unless its cache is full (earlier tests' blocks)
        sink.finish()
    sink.discard()
    assert list(disk.iterdir()) == []


def test_a_write_that_fails_without_saying_why_on_a_full_disk_is_a_disk_full_error(small_disk):
    """GDAL's block cache may flush a dirty block in the middle of a write; the error then says
    only "An error occurred while writing a dirty block". On a disk with no room left that is
    the full disk, named with the output; on a disk with room it stays the error it was."""
    full, roomy = small_disk(64 * 1024), small_disk(4 << 20)
    with pytest.raises(OSError):  # fill it up
        (full / "filler").write_bytes(b"\0" * (128 * 1024))
    final = full / "mask.tif"
    dirty = rasterio.errors.RasterioIOError("Read or write failed. An error occurred while "
                                            "writing a dirty block from GDALRasterBand::IRasterIO")
    with pytest.raises(DiskFullError, match=rf"{re.escape(str(final))}: no space left on device "
                                            "\\(disk full\\) while writing it"):
        with naming_a_full_disk(str(final), "writing it"):
            raise dirty
    with pytest.raises(rasterio.errors.RasterioIOError, match="dirty block"):
        with naming_a_full_disk(str(roomy / "mask.tif"), "writing it"):
            raise dirty
