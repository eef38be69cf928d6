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
    with pytest.raises(ProtocolError, match="no valid job_id/state"):
        parse_status('{"schema_version": 1, "job_id": "j", "state": "sleeping"}')
