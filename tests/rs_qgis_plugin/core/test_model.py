"""Connection profiles, job specs and the parsers of what the cluster sends back."""

from __future__ import annotations

import json

import pytest

from rs_qgis_plugin.core.errors import ProtocolError, SpecError
from rs_qgis_plugin.core.jobspec import JobSpecBuilder, JobStep, new_job_id
from rs_qgis_plugin.core.profile import ConnectionProfile
from rs_qgis_plugin.core.protocol import parse_event, parse_events, parse_status


def test_profile_round_trips_through_a_dict_and_holds_no_secret():
    profile = ConnectionProfile(name="lab", host="gpu1.example.org", port=2222, user="ana",
                                key_file="~/.ssh/id_ed25519",
                                remote_command=["/opt/venv/bin/rs-cluster"])  # type: ignore[arg-type]
    data = profile.to_dict()
    assert ConnectionProfile.from_dict(json.loads(json.dumps(data))) == profile
    assert data["remote_command"] == ["/opt/venv/bin/rs-cluster"]
    assert not any("pass" in k or "secret" in k for k in data)
    assert profile.workspace_path == ".rs-cluster"


@pytest.mark.parametrize("changes, message", [
    ({"key_file": None}, "key file or use the ssh-agent"),
    ({"port": 70000}, "not a TCP port"),
    ({"remote_command": "rs-cluster --x"}, "argument list"),
    ({"host": ""}, "needs a name, a host and a user"),
])
def test_bad_profiles_are_refused(changes, message):
    values = dict(name="lab", host="h", user="u", key_file="k", **{})
    values.update(changes)
    with pytest.raises(SpecError, match=message):
        ConnectionProfile(**values)
    with pytest.raises(SpecError, match="unknown connection profile key"):
        ConnectionProfile.from_dict({"name": "x", "host": "h", "user": "u", "password": "no"})


def test_builder_makes_a_versioned_spec():
    spec = (JobSpecBuilder("Xiamen", job_id="j-1")
            .prepare(images="inputs/images", masks="inputs/masks", output="outputs/ds",
                     tile_size=128, split=[0.8, 0.1, 0.1])
            .train(data="outputs/ds", model_dir="outputs/model", epochs=2).build())
    assert spec.to_dict() == {"schema_version": 1, "job_id": "j-1", "name": "Xiamen", "steps": [
        {"stage": "prepare", "params": {"images": "inputs/images", "masks": "inputs/masks",
                                        "output": "outputs/ds", "tile_size": 128,
                                        "split": [0.8, 0.1, 0.1]}},
        {"stage": "train", "params": {"data": "outputs/ds", "model_dir": "outputs/model",
                                      "epochs": 2}}]}
    assert spec.outputs() == ["outputs/ds", "outputs/model"]
    assert json.loads(spec.to_json()) == spec.to_dict()
    assert new_job_id() != new_job_id()


@pytest.mark.parametrize("stage, params, message", [
    ("shell", {}, "unknown stage"),
    ("prepare", {"images": "../etc"}, "leaves the job folder"),
    ("prepare", {"images": "/etc"}, "relative to the job folder"),
    ("prepare", {"command": "x"}, "no parameter"),
    ("prepare", {"tile_size": "128"}, "integer"),
    ("train", {"master": "--conf"}, "not starting with '-'"),
])
def test_builder_refuses_bad_steps(stage, params, message):
    with pytest.raises(SpecError, match=message):
        JobStep(stage, params)


def test_events_and_status_parse():
    event = parse_event('{"v": 1, "time": "t", "stage": "train", "event": "metrics", "loss": 0.5}')
    assert (event.stage, event.event, event.extra) == ("train", "metrics", {"loss": 0.5})
    events = parse_events('{"v":1,"stage":"s","event":"progress","done":1,"total":4,"percent":25}\n\n')
    assert events[0].percent == 25.0 and events[0].done == 1
    status = parse_status({"schema_version": 1, "job_id": "j", "state": "failed", "message": "x",
                           "results": ["outputs/ds"]})
    assert status.is_finished and status.results == ("outputs/ds",)


@pytest.mark.parametrize("text, message", [
    ('{"v": 2, "event": "progress"}', "newer than this plugin reads"),
    ("not json", "not JSON"),
    ('{"event": "progress"}', "not a progress event"),
])
def test_unreadable_events_are_refused(text, message):
    with pytest.raises(ProtocolError, match=message):
        parse_event(text)


def test_unreadable_status_is_refused():
    with pytest.raises(ProtocolError, match="update the plugin"):
        parse_status('{"schema_version": 2, "job_id": "j", "state": "running"}')
    with pytest.raises(ProtocolError, match="field 'state' must be one of"):
        parse_status('{"schema_version": 1, "job_id": "j", "state": "sleeping"}')


GOOD_STATUS = {"schema_version": 1, "job_id": "20260101-000000-abcdef", "name": "Xiamen",
               "state": "succeeded", "stage": "predict", "step": 2, "steps": 2, "progress": 100.0,
               "message": "done", "submitted": "2026-01-01T00:00:00.000+00:00", "started": None,
               "finished": None, "exit_code": 0, "results": ["outputs/masks", "outputs/eval.json"],
               "restarts": 0, "pid": 123, "updated": "2026-01-01T00:01:00.000+00:00"}


def test_every_status_field_is_typed_and_unknown_ones_are_kept():
    status = parse_status(json.dumps(GOOD_STATUS), expect_job_id=GOOD_STATUS["job_id"])
    assert status.results == ("outputs/masks", "outputs/eval.json")
    assert (status.step, status.steps, status.progress, status.exit_code) == (2, 2, 100.0, 0)
    assert status.extra == {"pid": 123, "updated": "2026-01-01T00:01:00.000+00:00"}
    # what an older cluster leaves out reads as the defaults
    bare = parse_status({"schema_version": 1, "job_id": "j", "state": "queued"})
    assert (bare.results, bare.step, bare.progress, bare.message, bare.stage) == ((), 0, 0.0, "", None)


@pytest.mark.parametrize("key, value, message", [
    # a string used to become a tuple of its characters, each then fetched as a result
    ("results", "outputs/masks", "field 'results' must be a list of strings, got str"),
    ("results", [1], "field 'results' must be a list of strings, got list"),
    ("results", None, "field 'results' must be a list of strings, got null"),
    ("results", ["../../.ssh"], r"field 'results' holds '../../.ssh'"),
    ("results", ["/etc/passwd"], "not relative to the job folder"),
    ("results", ["outputs\\..\\..\\startup.py"], "folder separator"),
    ("results", ["outputs/C:x"], "a drive or stream on Windows"),
    ("job_id", 7, "field 'job_id' must be a string, got int"),
    ("job_id", "../other-user", "field 'job_id' '../other-user' is not a job id"),
    ("job_id", "CON", "device name on Windows"),
    ("name", ["x"], "field 'name' must be a string, got list"),
    ("message", {"html": "<a href='x'>"}, "field 'message' must be a string, got dict"),
    ("stage", 3, "field 'stage' must be a string or null, got int"),
    ("step", "2", "field 'step' must be an integer, got str"),
    ("steps", True, "field 'steps' must be an integer, got bool"),
    ("step", -1, "field 'step' must be at least 0"),
    ("progress", "100", "field 'progress' must be a finite number, got str"),
    ("progress", float("nan"), "field 'progress' must be a finite number"),
    ("exit_code", "0", "field 'exit_code' must be an integer or null, got str"),
    ("submitted", 1767225600, "field 'submitted' must be a string or null, got int"),
    ("restarts", 1.5, "field 'restarts' must be an integer, got float"),
])
def test_a_status_field_of_the_wrong_type_is_refused_naming_it(key, value, message):
    with pytest.raises(ProtocolError, match=message):
        parse_status(json.dumps({**GOOD_STATUS, key: value}))


def test_a_status_of_another_job_is_refused():
    with pytest.raises(ProtocolError, match="status of job '20260101-000000-abcdef' when asked "
                                            "for job 'mine'"):
        parse_status(GOOD_STATUS, expect_job_id="mine")


def test_every_event_field_is_typed_and_unknown_ones_are_kept():
    event = parse_event('{"v": 1, "time": "t", "stage": "predict", "event": "progress", "done": 3,'
                        ' "total": 4, "percent": 75, "message": "3/4 rasters", "rasters_done": 3}')
    assert (event.done, event.total, event.percent, event.message) == (3, 4, 75.0, "3/4 rasters")
    assert isinstance(event.percent, float) and event.extra == {"rasters_done": 3}
    start = parse_event('{"v": 1, "time": "t", "stage": "train", "event": "start", "total": null,'
                        ' "unit": "steps", "message": ""}')
    assert (start.total, start.done, start.percent, start.extra) == (None, None, None,
                                                                     {"unit": "steps"})
    # a kind a newer cluster may add is passed on for readers to ignore
    assert parse_event('{"v": 1, "stage": "s", "event": "heartbeat"}').event == "heartbeat"


@pytest.mark.parametrize("key, value, message", [
    ("done", "3", "field 'done' must be an integer or null, got str"),
    ("done", 2.5, "field 'done' must be an integer or null, got float"),
    ("total", True, "field 'total' must be an integer or null, got bool"),
    ("done", -1, "field 'done' must be at least 0"),
    ("percent", "75", "field 'percent' must be a finite number or null, got str"),
    ("percent", float("inf"), "field 'percent' must be a finite number or null"),
    ("message", ["<b>x</b>"], "field 'message' must be a string, got list"),
    ("stage", 1, "field 'stage' must be a string, got int"),
    ("time", 0, "field 'time' must be a string, got int"),
    ("event", 1, "field 'event' must be a string, got int"),
    ("event", "", "field 'event' is empty"),
])
def test_an_event_field_of_the_wrong_type_is_refused_naming_it(key, value, message):
    good = {"v": 1, "time": "t", "stage": "predict", "event": "progress", "done": 3, "total": 4,
            "percent": 75.0, "message": "m"}
    with pytest.raises(ProtocolError, match=message):
        parse_event(json.dumps({**good, key: value}))
