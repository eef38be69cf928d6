"""Faults a cluster job survives, or ends cleanly on: a Horovod worker killed mid-epoch, and a
cancel at each stage. Real job runner, real local Spark, real Horovod (Gloo) processes, real tiles;
the faults are real signals sent to real processes, found by the job id in their environment.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import time
from pathlib import Path

import pytest
from rs_cluster import jobs
from rs_cluster.engine_horovod import HorovodEngine
from rs_qgis_plugin.core.protocol import parse_status

from tests.procs import ENV_JOB_ID, job_pids, live_processes, wait_for

HOROVOD_WORKER = "horovod.spark.task.gloo_exec_fn"
# The 2019 U-Net: at width 4 it is the fastest network (the faults, not the network, are tested).
QUICK_TRAIN = {"num_proc": 2, "master": "local[2]", "arch": "unet2019", "base_filters": 4,
               "batch_size": 4, "steps_per_epoch": 6, "validation_steps": 2, "lr": 1e-3,
               "patience": 0}


def job_processes(job_id: str, marker: str) -> list[int]:
    """Live processes of the job with ``marker`` as one of their arguments (a Python module) or
    as their name (``java``)."""
    return [p.pid for p in live_processes()
            if p.environ.get(ENV_JOB_ID) == job_id and (marker in p.argv or p.name == marker)]


def describe(pids: list[int]) -> list[str]:
    return [f"{p.pid} {p.command[:150]}" for p in live_processes() if p.pid in pids]


def events_of(job_dir: Path) -> list[dict]:
    path = job_dir / jobs.EVENTS_FILE
    if not path.exists():
        return []
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def submit(workspace: Path, tmp_path: Path, job_id: str, steps: list[dict],
           inputs: dict[str, Path]) -> Path:
    """Writes a job folder with ``inputs`` copied in (real files, not links) and starts it."""
    job_dir = workspace.job_dir(job_id)
    for rel, source in inputs.items():
        target = job_dir / rel
        if source.is_dir():
            shutil.copytree(source, target, symlinks=False)
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(source, target)
    spec = {"schema_version": 1, "job_id": job_id, "name": job_id, "steps": steps}
    (job_dir / jobs.JOB_FILE).write_text(json.dumps(spec))
    jobs.submit(workspace, job_dir)
    return job_dir


def test_a_worker_killed_by_a_signal_is_told_from_one_that_failed():
    killed = RuntimeError("Horovod detected that one or more processes exited with non-zero "
                          "status, thus causing the job to be terminated. The first process to do "
                          "so was:\nProcess name: 1\nExit code: 137\n")
    assert HorovodEngine.lost_worker(killed) == "training worker 1 was killed (SIGKILL)"
    assert HorovodEngine.lost_worker(RuntimeError(str(killed).replace("137", "-15"))) == \
        "training worker 1 was killed (SIGTERM)"
    assert HorovodEngine.lost_worker(RuntimeError(str(killed).replace("137", "1"))) is None  # its own error
    assert HorovodEngine.lost_worker(RuntimeError("Timed out waiting for Spark tasks to start")) is None
    # Horovod saw the survivor exit first (its peer's socket closed): the killed worker's shell
    # said what happened in the output (seen in CI under load)
    survivor_first = RuntimeError(str(killed).replace("Process name: 1", "Process name: 0")
                                  .replace("137", "1"))
    deaths = ["[1]<stderr>:Killed"]
    assert HorovodEngine.lost_worker(survivor_first, deaths) == "training worker 1 was killed (SIGKILL)"
    assert HorovodEngine.lost_worker(survivor_first, ["[0]<stderr>:Terminated"]) == \
        "training worker 0 was killed (SIGTERM)"
    assert HorovodEngine.lost_worker(survivor_first) is None  # a worker's own error: no restart
    assert HorovodEngine.lost_worker(RuntimeError("Timed out"), deaths) is None


@pytest.mark.spark
@pytest.mark.horovod
@pytest.mark.slow
def test_a_horovod_worker_killed_mid_epoch_restarts_the_job_from_its_checkpoint(
        small_dataset, tmp_path):
    workspace = jobs.Workspace(tmp_path / "ws")
    epochs = 4
    job_dir = submit(workspace, tmp_path, "lost-worker", [
        {"stage": "train", "params": {"data": "inputs/tiles", "model_dir": "outputs/model",
                                      "epochs": epochs, **QUICK_TRAIN}}],
        {"inputs/tiles": small_dataset})
    state_file = job_dir / "outputs" / ".model.training" / "state.json"

    def first_checkpoint_and_workers():
        if jobs.read_status(job_dir)["state"] != "running":
            raise AssertionError(f"the job ended early: {jobs.read_status(job_dir)}")
        return state_file.exists() and job_processes("lost-worker", HOROVOD_WORKER)

    workers = wait_for(first_checkpoint_and_workers, 240, "the first checkpoint")
    assert len(workers) == 2
    os.kill(workers[0], signal.SIGKILL)  # as the OOM killer or a lost node would
    killed_after = json.loads(state_file.read_text())["epochs_done"]
    assert killed_after < epochs, "training finished before a worker could be killed"

    status = wait_for(lambda: (s := jobs.read_status(job_dir))["state"] not in
                        jobs.ACTIVE_STATES and s, 300, "the job to end")
    assert status["state"] == "succeeded", status["message"]
    assert status["restarts"] == 1
    # and the plugin reads it (its jobs panel shows "train (restarted 1×)")
    assert parse_status((job_dir / jobs.STATUS_FILE).read_text()).restarts == 1
    warnings = [e for e in events_of(job_dir) if e["event"] == "warning" and "restart" in e]
    assert len(warnings) == 1 and warnings[0]["restart"] == 1
    assert "was killed (SIGKILL)" in warnings[0]["message"]
    assert warnings[0]["resume_epoch"] >= killed_after
    card = json.loads((job_dir / "outputs" / "model" / "model.json").read_text())
    assert [e["epoch"] for e in card["epochs"]] == list(range(1, epochs + 1))
    assert card["training"]["restarts_after_lost_worker"] == [warnings[0]["resume_epoch"]]
    assert not state_file.parent.exists()  # the staging folder is gone once the model is in place
    # the runner and its Spark JVM exit just after the final status: nothing stays behind
    wait_for(lambda: not job_pids("lost-worker"), 30,
               f"the job's processes to exit: {describe(job_pids('lost-worker'))}")


STAGE_MARKERS = {
    # stage -> a process that shows the stage's real work is under way
    "prepare": "java",
    "train": HOROVOD_WORKER,
    "predict": "java",
}


@pytest.mark.spark
@pytest.mark.horovod
@pytest.mark.slow
@pytest.mark.parametrize("stage", list(STAGE_MARKERS))
def test_cancel_at_each_stage_stops_every_process_and_leaves_no_result(
        stage, small_pairs, tmp_path):
    workspace = jobs.Workspace(tmp_path / "ws")
    job_id = f"cancel-{stage}"
    images, masks = small_pairs
    job_dir = submit(workspace, tmp_path, job_id, [
        {"stage": "prepare", "params": {"images": "inputs/images", "masks": "inputs/masks",
                                        "output": "outputs/tiles", "master": "local[2]"}},
        {"stage": "train", "params": {"data": "outputs/tiles", "model_dir": "outputs/model",
                                      "epochs": 50, **QUICK_TRAIN,
                                      **({"epochs": 1} if stage == "predict" else {})}},
        {"stage": "predict", "params": {"model": "outputs/model", "input": "inputs/images",
                                        "output": "outputs/masks", "master": "local[2]"}},
    ], {"inputs/images": images, "inputs/masks": masks})

    def in_stage():
        status = jobs.read_status(job_dir)
        if status["state"] != "running":
            raise AssertionError(f"the job ended before its {stage} stage: {status}")
        return status.get("stage") == stage and job_processes(job_id, STAGE_MARKERS[stage])

    wait_for(in_stage, 300, f"the {stage} stage to run")
    cancelled = jobs.cancel(workspace, job_id)
    assert cancelled["state"] == "cancelled"
    assert job_pids(job_id) == []  # no Spark JVM, Python worker or Horovod worker left
    status = jobs.read_status(job_dir)
    assert status["state"] == "cancelled" and not status.get("results")
    # nothing of the cancelled stage looks finished: no dataset card, model card or run summary
    card = {"prepare": "tiles/dataset.json", "train": "model/model.json",
            "predict": "masks/predict.json"}[stage]
    assert not (job_dir / "outputs" / card).exists()
    masks_dir = job_dir / "outputs" / "masks"
    written = sorted(p.name for p in masks_dir.rglob("*")) if masks_dir.exists() else []
    assert not [n for n in written if "part" in n or n.startswith(".")], written
    time.sleep(1)
    assert job_pids(job_id) == []  # and none came back
