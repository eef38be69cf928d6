"""A training job's history as the plugin reads it from the job's events (no QGIS needed)."""

from __future__ import annotations

import json
import math

import pytest

from rs_qgis_plugin.core.errors import ProtocolError
from rs_qgis_plugin.core.protocol import parse_event, parse_status
from rs_qgis_plugin.core.training import TrainingHistory, duration_text, preview_epoch


def event(kind: str, stage: str = "train", **fields) -> str:
    return json.dumps({"v": 1, "time": "2026-12-02T10:00:00+00:00", "stage": stage,
                       "event": kind, **fields})


def metrics(epoch: int, val_iou: float, **more) -> str:
    return event("metrics", epoch=epoch, loss=1.0 / epoch, val_loss=1.2 / epoch, iou=val_iou + 0.05,
                 val_iou=val_iou, seconds=10.0 * epoch, epochs=10, **more)


def history_of(*lines: str) -> TrainingHistory:
    return TrainingHistory.from_events(parse_event(line) for line in lines)


def test_curves_best_epoch_restarts_and_resources_come_from_the_events():
    history = history_of(
        event("info", message="training on spark://m:7077: 2 workers", resources={
            "master": "spark://m:7077", "workers": 2, "engine": "horovod", "executors": 2,
            "cores": 4, "storage": "s3://rs/jobs/ana/j1"}),
        metrics(1, 0.10), metrics(2, 0.30), metrics(3, 0.25),
        event("warning", message="worker lost; restarting", restart=1, resume_epoch=2),
        metrics(3, 0.28),  # trained again after the restart: replaces the first epoch 3
        event("info", message="preview after epoch 3", preview="previews/epoch-0003.png", epoch=3),
        event("metrics", stage="predict", epoch=9, val_iou=0.9))  # another stage: not training
    assert history.series("val_iou") == [(1, 0.10), (2, 0.30), (3, 0.28)]
    assert history.series("loss") == [(1, 1.0), (2, 0.5), (3, pytest.approx(1 / 3))]
    assert history.best == (2, 0.30)
    assert history.restart_epochs() == [2]
    assert history.preview == "previews/epoch-0003.png"
    assert history.resources.text() == ("spark://m:7077: 2 Horovod worker(s) in 2 executor(s) "
                                        "(4 cores); storage s3://rs/jobs/ana/j1")
    # 7 epochs left at the mean of the last three epoch times (10, 20, 30 s)
    assert history.seconds_left() == pytest.approx(7 * 20.0)


def test_the_same_event_twice_changes_nothing():
    """A live event and the same event read again after a restart must agree."""
    lines = [metrics(1, 0.1), event("warning", message="lost", restart=1, resume_epoch=1),
             event("info", preview="previews/epoch-0001.png")]
    history = history_of(*lines)
    assert not any(history.add(parse_event(line)) for line in lines)
    assert history.add(parse_event(metrics(2, 0.2)))


@pytest.mark.parametrize("path", ["../../.ssh/authorized_keys", "/etc/passwd",
                                  "previews/../../x.png", "previews/epoch-1.png",
                                  "previews/epoch-0001.png/x", "outputs/epoch-0001.png",
                                  "previews\\epoch-0001.png", 7, None])
def test_a_preview_path_other_than_previews_epoch_nnnn_png_is_ignored(path):
    assert preview_epoch(path) is None
    assert history_of(event("info", preview=path)).preview is None


def test_hostile_metric_values_are_left_out_not_drawn():
    history = history_of(
        event("metrics", epoch=1, loss="NaN", val_loss=True, iou=[1], val_iou=0.2, seconds=-5),
        event("metrics", epoch="2", loss=0.5), event("metrics", epoch=0, loss=0.5),
        event("metrics", epoch=True, loss=0.5),
        event("warning", restart="1"), event("info", resources="spark://m"),
        event("info", resources={"master": 7, "workers": -1, "cores": 1.5}))
    assert history.epochs == {1: {"val_iou": 0.2}}
    assert history.epoch_seconds == {} and history.restarts == {}
    assert history.resources.master == "" and history.resources.workers is None
    assert history.resources.cores is None
    assert not math.isnan(history.best[1])


def test_the_newest_preview_wins_whatever_the_order():
    history = history_of(event("info", preview="previews/epoch-0004.png"),
                         event("info", preview="previews/epoch-0002.png"))
    assert history.preview == "previews/epoch-0004.png"


def test_the_status_verdict_is_read_with_its_fields_checked():
    base = {"schema_version": 1, "job_id": "j-1", "state": "succeeded", "warnings": 2}
    status = parse_status(json.dumps({**base, "verdict": {
        "verdict": "weak", "reason": "validation IoU 0.002 is under 0.05", "advice": "more epochs",
        "best_val_iou": 0.002, "best_epoch": 3}}))
    assert status.warnings == 2 and status.verdict.weak
    assert (status.verdict.best_val_iou, status.verdict.best_epoch) == (0.002, 3)
    assert parse_status(json.dumps(base)).verdict is None
    for bad in ({"verdict": "great"}, {"verdict": "ok", "best_val_iou": "high"},
                {"verdict": "ok", "best_epoch": 0}, "weak", {"verdict": "ok", "reason": 5}):
        with pytest.raises(ProtocolError, match="verdict"):
            parse_status(json.dumps({**base, "verdict": bad}))
    with pytest.raises(ProtocolError, match="warnings"):
        parse_status(json.dumps({**base, "warnings": -1}))


def test_durations_read_as_people_say_them():
    assert [duration_text(s) for s in (5, 89, 600, 7500)] == ["5 s", "89 s", "10 min",
                                                              "2 h 05 min"]
