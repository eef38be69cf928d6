"""The jobs panel's Training tab: curves, previews, resources and the verdict of a training job.

The chart is first drawn from hand-made events (what each mark looks like), then from a real
training job: the real ``rs-cluster`` over a real OpenSSH server on 127.0.0.1, real Spark
(``local``) preparing real Xiamen tiles, real Keras training. Its curves must be the points of the
job's own ``metrics.jsonl``, live and again after a restart of the controller (what a QGIS restart
does to it), and its previews real PNGs fetched from the job folder.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from qgis.core import Qgis
from qgis.PyQt.QtGui import QColor, QImage

from rs_qgis_plugin import settings
from rs_qgis_plugin.controller import JobController, PreparedRun
from rs_qgis_plugin.core.jobspec import JobSpecBuilder
from rs_qgis_plugin.core.protocol import parse_event
from rs_qgis_plugin.core.training import TrainingHistory
from rs_qgis_plugin.jobs_panel import JobsPanel
from rs_qgis_plugin.logic import (
    DATASET,
    MODEL_OUTPUT,
    TRAIN_IMAGES,
    TRAIN_MASKS,
    JobRecord,
    PlannedJob,
)
from rs_qgis_plugin.training_view import BEST_COLOUR, RESTART_COLOUR, SERIES, TrainingChart
from tests.rs_qgis_plugin.conftest import dev_image, dev_mask, wait_for

pytestmark = [pytest.mark.qgis, pytest.mark.usefixtures("qgis_env")]


def event(kind: str, **fields) -> str:
    return json.dumps({"v": 1, "time": "2026-12-02T10:00:00+00:00", "stage": "train",
                       "event": kind, **fields})


def colour_columns(image: QImage, colour: str) -> set[int]:
    """x of every column holding a pixel close to ``colour``."""
    want = QColor(colour)
    found = set()
    for x in range(image.width()):
        for y in range(0, image.height(), 2):
            c = QColor(image.pixel(x, y))
            if abs(c.red() - want.red()) + abs(c.green() - want.green()) + \
                    abs(c.blue() - want.blue()) < 40:
                found.add(x)
                break
    return found


def test_the_chart_marks_the_best_epoch_and_the_restart(qtbot):
    lines = [event("metrics", epoch=e, loss=1 / e, val_loss=1.1 / e, iou=v, val_iou=v, epochs=6,
                   seconds=5.0) for e, v in ((1, 0.1), (2, 0.2), (3, 0.5), (4, 0.4))]
    lines.insert(3, event("warning", message="worker lost", restart=1, resume_epoch=2))
    chart = TrainingChart()
    qtbot.addWidget(chart)
    chart.resize(600, 300)
    chart.set_history(TrainingHistory.from_events(parse_event(x) for x in lines))
    image = chart.grab().toImage()
    plot = chart._plot()

    def x_of(epoch: float) -> int:
        return round(chart._x(epoch, plot))

    # the best epoch (3) is marked where epoch 3 is drawn, the restart between epochs 2 and 3
    assert any(abs(x - x_of(3)) <= 2 for x in colour_columns(image, BEST_COLOUR))
    assert any(abs(x - x_of(2.5)) <= 2 for x in colour_columns(image, RESTART_COLOUR))
    assert not any(abs(x - x_of(5)) <= 2 for x in colour_columns(image, BEST_COLOUR))
    # the curves reach the planned last epoch's place only once it is trained
    loss_x = colour_columns(image, SERIES[0][2])
    assert max(loss_x) < x_of(5)


def test_a_few_wild_validation_losses_do_not_flatten_the_curves(qtbot):
    """Seen on a real run: validation losses of 24, 205 and 148 in the first epochs, then 3 to
    15, against training losses of 1.0 to 1.5."""
    val = [23.9, 204.7, 147.8, 73.3, 68.9, 14.8, 9.1, 5.0, 3.8, 4.3, 3.7, 3.2]
    lines = [event("metrics", epoch=e, loss=1.5 - e / 24, val_loss=v, epochs=12)
             for e, v in enumerate(val, start=1)]
    chart = TrainingChart()
    qtbot.addWidget(chart)
    chart.set_history(TrainingHistory.from_events(parse_event(x) for x in lines))
    top = chart._loss_top()
    assert 10 < top < 40  # the training losses use a visible share of the axis, not 0.7 %
    assert chart.points()["val_loss"][1] == (2, 204.7)  # still the value, only drawn clipped


def test_an_empty_history_says_the_curves_come_after_the_first_epoch(qtbot):
    chart = TrainingChart()
    qtbot.addWidget(chart)
    chart.resize(400, 200)
    chart.grab()  # draws without a point
    assert chart.points() == {m: [] for m, *_ in SERIES}


def training_job(name: str, pairs: int = 4) -> PlannedJob:
    """Prepare and train on real Xiamen tiles, as small as training gets. Its learning rate is
    so small that it learns nothing: the verdict must say so."""
    spec = (JobSpecBuilder(name)
            .prepare(images=TRAIN_IMAGES, masks=TRAIN_MASKS, output=DATASET, tile_size=128,
                     split=[0.5, 0.5, 0.0], seed=0)
            .train(data=DATASET, model_dir=MODEL_OUTPUT, epochs=3, batch_size=4,
                   steps_per_epoch=2, validation_steps=1, arch="unet2019", base_filters=4,
                   lr=1e-12, patience=0, preview_every=1)
            .build())
    inputs = {}
    for i in range(pairs):
        inputs[f"{TRAIN_IMAGES}/{dev_image(i).name}"] = str(dev_image(i))
        inputs[f"{TRAIN_MASKS}/{dev_image(i).name}"] = str(dev_mask(i))
    return PlannedJob(spec=spec, inputs=inputs, fetch=(MODEL_OUTPUT,))


def metrics_rows(profile, job_id: str) -> list[dict]:
    path = Path(profile.remote_workspace) / "jobs" / job_id / MODEL_OUTPUT / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def select(panel: JobsPanel, job_id: str) -> None:
    for row in range(panel.table.rowCount()):
        if panel.table.item(row, 0).data(0x0100) == job_id:  # Qt.UserRole
            panel.table.selectRow(row)
            return
    raise AssertionError(f"job {job_id} is not in the panel")


@pytest.mark.ssh
@pytest.mark.spark
@pytest.mark.slow
def test_a_real_training_job_is_charted_live_and_after_a_restart(qgis_iface, qtbot, profile,
                                                                 results_root):
    planned = training_job("chart me")
    job = planned.spec.job_id
    controller = JobController(qgis_iface, poll_s=0.5)
    panel = JobsPanel(controller)
    panel.resize(900, 700)
    try:
        controller.start(profile.name, PreparedRun(planned, []), "train")
        wait_for(qtbot, lambda: controller.record(job).state not in ("exporting", "uploading",
                                                                     "queued", "running"), 420)
        record = controller.record(job)
        assert record.state == "succeeded", record.message
        rows = metrics_rows(profile, job)
        assert [r["epoch"] for r in rows] == [1, 2, 3]

        # live: the chart's points are the job's metrics.jsonl, every curve
        select(panel, job)
        panel.tabs.setCurrentWidget(panel.training)
        points = panel.training.chart.points()
        for metric, *_ in SERIES:
            assert points[metric] == [(r["epoch"], pytest.approx(r[metric])) for r in rows], metric
        # the last events may come with the final status, and their preview just after it
        wait_for(qtbot, lambda: Path(controller.training(job)[1] or "x").name == "epoch-0003.png",
                 60)
        history, preview = controller.training(job)
        assert history.planned_epochs == 3 and history.resources is not None
        # one worker trains in the step's own process (no Spark master is set)
        assert history.resources.master == "in-process" and history.resources.workers == 1
        assert "Runs on the login host, in one process" in panel.training.summary.text()
        # the newest preview: the last epoch's, a real PNG downloaded into the results folder
        assert Path(preview).name == "epoch-0003.png"
        assert Path(preview).parent == controller.previews_dir(job) / "previews"
        image = QImage(preview)
        assert not image.isNull() and image.width() > image.height() / 4 * 2  # 3 columns
        assert not panel.training.preview.pixmap().isNull()

        # the verdict: it learned nothing (lr 1e-12), which must not read as a plain success
        assert record.weak and record.best_val_iou is not None and record.verdict_reason
        assert record.warnings >= 1 and any("weak" in w or record.verdict_reason in w
                                            for w in record.recent_warnings)
        wait_for(qtbot, lambda: controller.record(job).loaded, 120)
        state = panel.table.item(0, JobsPanel.COLUMNS.index("state")).text()
        assert "weak model" in state and "✓" not in state
        iou = panel.table.item(0, JobsPanel.COLUMNS.index("val iou")).text()
        assert iou == f"{record.best_val_iou:.3f}"
        warned = [m for m in qgis_iface.messageBar().get_messages(Qgis.Warning)
                  if "chart me" in m]
        assert warned and "weak model" in warned[-1]
        assert record.advice[:20].lower() in warned[-1].lower()
        assert "Training: weak model" in panel.details.toPlainText()

        # after a restart: no events come live, the panel reads them all again
        controller.shutdown()
        panel.deleteLater()
        shutil.rmtree(controller.previews_dir(job) / "previews")
        again = JobController(qgis_iface, poll_s=0.5)
        panel = JobsPanel(again)
        assert again.training(job) == (None, None)
        select(panel, job)
        wait_for(qtbot, lambda: again.training(job)[1] is not None, 120)
        points = panel.training.chart.points()
        assert points["val_iou"] == [(r["epoch"], pytest.approx(r["val_iou"])) for r in rows]
        assert Path(again.training(job)[1]).is_file()
        assert not panel.training.preview.pixmap().isNull()
        again.shutdown()
    finally:
        controller.shutdown()
        panel.deleteLater()


def test_a_record_keeps_its_verdict_across_restarts(qgis_env):
    record = JobRecord("j-1", "roofs", "p", "train", state="succeeded", verdict="weak",
                       verdict_reason="validation IoU 0.002 is under 0.05", advice="more epochs",
                       best_val_iou=0.002, best_epoch=2)
    settings.save_job(record)
    assert settings.load_job("j-1") == record
