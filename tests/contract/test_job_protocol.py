"""The contract between the plugin and the cluster, each side's output read by the other's code:
a spec built by the plugin is validated and run by rs_cluster; the job's events.jsonl and
status.json are parsed by the plugin's parsers. Runs in the cluster venv (no QGIS, no paramiko)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from rs_cluster import jobs, jobspec
from rs_cluster.errors import ConfigError

from rs_qgis_plugin.core import jobspec as plugin_jobspec
from rs_qgis_plugin.core.protocol import parse_events, parse_status

REPO = Path(__file__).resolve().parents[2]


def test_every_stage_and_parameter_is_the_same_on_both_sides():
    cluster = {stage: {k: r.kind for k, r in rules.items()}
               for stage, (_, rules) in jobspec.STAGES.items()}
    assert cluster == plugin_jobspec.STAGE_PARAMS
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


def test_spec_with_a_path_outside_the_job_or_another_version_is_refused(tmp_path):
    good = plugin_jobspec.JobSpecBuilder("x").prepare(images="inputs/images").build().to_dict()
    escaping = json.loads(json.dumps(good))
    escaping["steps"][0]["params"]["images"] = "inputs/../../etc"
    with pytest.raises(ConfigError, match="leaves the job folder"):
        jobspec.parse_job_spec(escaping, tmp_path)
    with pytest.raises(ConfigError, match="schema_version 2 is not supported"):
        jobspec.parse_job_spec({**good, "schema_version": 2}, tmp_path)


def test_cluster_events_and_status_are_read_by_the_plugin(tmp_path, monkeypatch):
    spec = plugin_jobspec.JobSpecBuilder("contract").step("sleep", seconds=0.4, steps=4).build()
    spec_file = tmp_path / "spec.json"
    spec_file.write_text(spec.to_json())
    workspace = jobs.Workspace(tmp_path / "ws")
    monkeypatch.setenv("PYTHONPATH", str(REPO / "cluster_side"))  # for the detached runner
    jobs.submit(workspace, spec_file)
    job_dir = workspace.job_dir(spec.job_id)
    deadline = time.monotonic() + 60
    while jobs.read_status(job_dir)["state"] == "running" and time.monotonic() < deadline:
        time.sleep(0.1)
    status = parse_status((job_dir / "status.json").read_text())
    assert status.state == "succeeded" and status.job_id == spec.job_id and status.progress == 100
    events = parse_events((job_dir / "events.jsonl").read_text())
    assert [e.done for e in events if e.stage == "sleep" and e.event == "progress"] == [1, 2, 3, 4]
    assert events[-1].event == "finish" and events[-1].extra["state"] == "succeeded"
    # and what the CLI prints over SSH parses the same way
    cli = subprocess.run([sys.executable, "-m", "rs_cluster", "job", "status", "--workspace",
                          str(workspace.root), "--json", spec.job_id], capture_output=True,
                         text=True, check=True)
    assert parse_status(cli.stdout) == status
