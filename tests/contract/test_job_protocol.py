"""The contract between the plugin and the cluster, each side's output read by the other's code:
a spec built by the plugin is validated and run by rs_cluster; the job's events.jsonl and
status.json are parsed by the plugin's parsers. Runs in the cluster venv (no QGIS, no paramiko)."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from rs_cluster import jobs, jobspec
from rs_cluster.errors import ConfigError
from rs_cluster.progress import JsonLinesReporter, utc_now

from rs_qgis_plugin.core import jobspec as plugin_jobspec
from rs_qgis_plugin.core.errors import ProtocolError
from rs_qgis_plugin.core.protocol import EVENT_KINDS, parse_events, parse_status
from tests import cluster_selftest

REPO = Path(__file__).resolve().parents[2]


def test_every_stage_and_parameter_is_the_same_on_both_sides():
    cluster = {stage: {k: r.kind for k, r in rules.items()}
               for stage, (_, rules) in jobspec.STAGES.items()}
    assert cluster == plugin_jobspec.STAGE_PARAMS
    # the self-test stage is test-only: tests/cluster_selftest.py adds it on each side
    assert "sleep" not in cluster and "sleep" not in plugin_jobspec.STAGE_PARAMS
    assert jobspec.SCHEMA_VERSION == plugin_jobspec.SCHEMA_VERSION
    assert sorted(jobspec.OUTPUT_PARAMS) == sorted(plugin_jobspec.OUTPUT_PARAMS)


def test_plugin_spec_is_accepted_by_the_cluster(tmp_path):
    spec = (plugin_jobspec.JobSpecBuilder("Xiamen \"north\" $(x)")
            .prepare(images="inputs/images", masks="inputs/masks", output="outputs/ds",
                     tile_size=128, stride=64, split=[0.8, 0.1, 0.1], seed=1, overwrite=True)
            .train(data="outputs/ds", model_dir="outputs/model", epochs=1, lr=0.001,
                   num_proc=2, master="local[2]")
            .predict(model="outputs/model", input="inputs/test", output="outputs/pred",
                     threshold=0.5, polygons=True)
            .evaluate(pred="outputs/pred", truth="inputs/truth", json="outputs/eval.json")
            .build())
    parsed = jobspec.parse_job_spec(json.loads(spec.to_json()), tmp_path)
    assert parsed.to_dict()["steps"][1] == spec.to_dict()["steps"][1]
    assert parsed.outputs() == spec.outputs()
    argv = jobspec.step_argv(parsed.steps[0], tmp_path)
    assert argv[0] == "prepare" and "--split=0.8,0.1,0.1" in argv


def test_chosen_validation_rasters_reach_the_prepare_cli(tmp_path):
    """The dock's "validate on" ticks become prepare's --val-rasters, which its CLI parses."""
    import argparse

    from rs_cluster import prepare_cli

    spec = (plugin_jobspec.JobSpecBuilder("x")
            .prepare(images="inputs/train/images", masks="inputs/train/masks",
                     output="outputs/dataset", split=[0.8, 0.0, 0.2],
                     val_rasters="tile_3.tif,tile_7.tif").build())
    parsed = jobspec.parse_job_spec(json.loads(spec.to_json()), tmp_path)
    argv = jobspec.step_argv(parsed.steps[0], tmp_path)
    parser = argparse.ArgumentParser()
    prepare_cli.register(parser.add_subparsers())
    args = parser.parse_args(argv)
    assert args.val_rasters == "tile_3.tif,tile_7.tif" and args.split == (0.8, 0.0, 0.2)


def test_plugin_fine_tuning_spec_becomes_the_cluster_train_options(tmp_path):
    """The plugin names the network and ships the model to fine-tune where it ships a model to
    predict with (inputs/model); the cluster's CLI parses the options the step becomes."""
    import argparse

    from rs_cluster import train_cli

    spec = (plugin_jobspec.JobSpecBuilder("fine-tune")
            .train(data="outputs/ds", model_dir="outputs/model", arch="effnet_lite0_unet",
                   init_model="inputs/model", lr=1e-5)
            .build())
    parsed = jobspec.parse_job_spec(json.loads(spec.to_json()), tmp_path)
    argv = jobspec.step_argv(parsed.steps[0], tmp_path)
    assert "--arch=effnet_lite0_unet" in argv
    assert argv[argv.index("--init-model") + 1] == str(tmp_path / "inputs" / "model")
    parser = argparse.ArgumentParser()
    train_cli.register(parser.add_subparsers())
    args = parser.parse_args(argv)
    assert (args.arch, args.init_model) == ("effnet_lite0_unet", str(tmp_path / "inputs" / "model"))
    escaping = spec.to_dict()
    escaping["steps"][0]["params"]["init_model"] = "../other-job/outputs/model"
    with pytest.raises(ConfigError, match="leaves the job folder"):
        jobspec.parse_job_spec(escaping, tmp_path)


def test_spec_with_a_path_outside_the_job_or_another_version_is_refused(tmp_path):
    good = plugin_jobspec.JobSpecBuilder("x").prepare(images="inputs/images").build().to_dict()
    escaping = json.loads(json.dumps(good))
    escaping["steps"][0]["params"]["images"] = "inputs/../../etc"
    with pytest.raises(ConfigError, match="leaves the job folder"):
        jobspec.parse_job_spec(escaping, tmp_path)
    with pytest.raises(ConfigError, match="schema_version 2 is not supported"):
        jobspec.parse_job_spec({**good, "schema_version": 2}, tmp_path)


def run_sleep_job(tmp_path, monkeypatch, spec) -> tuple[jobs.Workspace, Path]:
    """Submits a plugin-built spec of the test-only sleep stage to the real runner and waits
    (up to 60 s) for it to end; returns the workspace and the job folder."""
    spec_file = tmp_path / "spec.json"
    spec_file.write_text(spec.to_json())
    workspace = jobs.Workspace(tmp_path / "ws")
    entry = cluster_selftest.install(monkeypatch)  # the sleep stage is test-only on both sides
    jobs.submit(workspace, spec_file, entry_module=entry)
    job_dir = workspace.job_dir(spec.job_id)
    deadline = time.monotonic() + 60
    while jobs.read_status(job_dir)["state"] == "running" and time.monotonic() < deadline:
        time.sleep(0.1)
    return workspace, job_dir


def test_cluster_events_and_status_are_read_by_the_plugin(tmp_path, monkeypatch):
    spec = cluster_selftest.plugin_sleep_spec("contract", seconds=0.4, steps=4)
    workspace, job_dir = run_sleep_job(tmp_path, monkeypatch, spec)
    status = parse_status((job_dir / "status.json").read_text(), expect_job_id=spec.job_id)
    assert status.state == "succeeded" and status.job_id == spec.job_id and status.progress == 100
    assert status.extra["pid"] > 0  # the runner's own fields travel on, untouched
    assert {"host", "boot_id", "heartbeat"} <= set(status.extra)  # liveness across login hosts
    events = parse_events((job_dir / "events.jsonl").read_text())
    assert [e.done for e in events if e.stage == "sleep" and e.event == "progress"] == [1, 2, 3, 4]
    assert events[-1].event == "finish" and events[-1].extra["state"] == "succeeded"
    # and what the CLI prints over SSH parses the same way
    cli = subprocess.run([sys.executable, "-m", "rs_cluster", "job", "status", "--workspace",
                          str(workspace.root), "--json", spec.job_id], capture_output=True,
                         text=True, check=True)
    assert parse_status(cli.stdout, expect_job_id=spec.job_id) == status
    with pytest.raises(ProtocolError, match="when asked for job 'another-job'"):
        parse_status(cli.stdout, expect_job_id="another-job")


def test_the_runners_warning_count_and_training_verdict_are_read_by_the_plugin(tmp_path,
                                                                             monkeypatch):
    """status.json's ``warnings`` and ``verdict`` as the real runner writes them, from a step
    that warns twice and ends as a train step does, with a weak model."""
    finish = {"best_val_iou": 0.002, "best_epoch": 3, "verdict": "weak",
              "verdict_reason": "validation IoU 0.002 is under 0.05", "advice": "more epochs"}
    spec = cluster_selftest.plugin_sleep_spec("verdict", seconds=0.2, steps=2, warnings=2,
                                              train_finish=json.dumps(finish))
    _, job_dir = run_sleep_job(tmp_path, monkeypatch, spec)
    status = parse_status((job_dir / "status.json").read_text(), expect_job_id=spec.job_id)
    assert status.state == "succeeded" and status.warnings == 2
    assert status.verdict is not None and status.verdict.weak
    assert (status.verdict.best_val_iou, status.verdict.best_epoch) == (0.002, 3)
    assert (status.verdict.reason, status.verdict.advice) == (finish["verdict_reason"],
                                                              "more epochs")
    assert status.message.startswith("done with 2 warning(s); best validation IoU 0.002 at "
                                     "epoch 3; weak model")
    assert not {"warnings", "verdict"} & set(status.extra)  # read as fields, not passed through


def test_every_field_the_cluster_writes_has_the_type_the_plugin_reads(tmp_path):
    plugin_spec = (plugin_jobspec.JobSpecBuilder("types \"<b>bold</b>\"")
                   .predict(model="inputs/model", input="inputs/images", output="outputs/masks",
                            polygons=True)
                   .evaluate(pred="outputs/masks", truth="inputs/truth", json="outputs/eval.json")
                   .build())
    spec = jobspec.parse_job_spec(plugin_spec.to_dict(), tmp_path)
    status = jobs.initial_status(spec)
    jobs.write_status(tmp_path, status)
    queued = parse_status((tmp_path / jobs.STATUS_FILE).read_text(), expect_job_id=spec.job_id)
    assert (queued.state, queued.results, queued.steps, queued.name) == (
        "queued", (), 2, plugin_spec.name)
    # as the runner leaves a job that succeeded after one restart of its workers
    status.update(state="running", pid=4242, pgid=4242, pid_started=time.time(), started=utc_now(),
                  stage="evaluate", step=2, restarts=1)
    status.update(state="succeeded", progress=100.0, message="done", exit_code=0,
                  finished=utc_now(), results=list(spec.outputs()))
    jobs.write_status(tmp_path, status)
    done = parse_status((tmp_path / jobs.STATUS_FILE).read_text(), expect_job_id=spec.job_id)
    assert done.results == tuple(plugin_spec.outputs()) == ("outputs/masks", "outputs/eval.json")
    assert (done.step, done.exit_code, done.restarts, done.stage) == (2, 0, 1, "evaluate")
    assert set(done.extra) == {"pid", "pgid", "pid_started", "updated"}

    # every kind of event the cluster's reporter writes, with the types the plugin expects
    stream = io.StringIO()
    reporter = JsonLinesReporter(stream)
    reporter.start("predict", total=10, unit="windows", message="predicting 1 raster")
    reporter.progress(3, 10, "1/2 rasters", rasters_done=1, rasters_total=2)
    reporter.progress(4)  # no total known: no percent either
    reporter.info("read <a href='x'>tile.tif</a>", raster="tile.tif")
    reporter.warning("worker lost; restarting", restart=1, resume_epoch=3)
    reporter.metrics(loss=0.25, epoch=3)
    reporter.finish("done", state="succeeded")
    events = parse_events(stream.getvalue())
    assert {e.event for e in events} == EVENT_KINDS
    start, progress, open_ended, info, warning, metrics, finish = events
    assert (start.total, start.done, start.extra) == (10, None, {"unit": "windows"})
    assert (progress.done, progress.total, progress.percent) == (3, 10, 30.0)
    assert progress.extra == {"rasters_done": 1, "rasters_total": 2}
    assert (open_ended.done, open_ended.total, open_ended.percent) == (4, None, None)
    assert info.message == "read <a href='x'>tile.tif</a>"  # text, for widgets to show as such
    assert warning.extra == {"restart": 1, "resume_epoch": 3}
    assert metrics.extra == {"loss": 0.25, "epoch": 3} and metrics.message == ""
    assert finish.extra == {"state": "succeeded"} and all(e.stage == "predict" for e in events)
