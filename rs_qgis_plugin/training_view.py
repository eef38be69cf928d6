"""The jobs panel's Training tab: a training job's curves, its newest prediction preview, and what
the cluster runs it on, with the time left.

The chart is drawn with Qt's QPainter (no plotting library on the analyst's machine): loss on the
left axis, IoU (0 to 1) on the right, training solid and validation dashed, the best epoch marked,
and a restart drawn where training went back to its checkpoint. Everything it shows comes from the
job's events (:class:`~rs_qgis_plugin.core.training.TrainingHistory`), so it is the same live and
after a QGIS restart. The cluster's text is shown as plain text.
"""

from __future__ import annotations

import math
import time
from datetime import datetime, timezone
from pathlib import Path

from qgis.PyQt.QtCore import QCoreApplication, QPointF, QRectF, QSize, Qt
from qgis.PyQt.QtGui import QColor, QImage, QPainter, QPainterPath, QPen, QPixmap, QPolygonF
from qgis.PyQt.QtWidgets import QHBoxLayout, QLabel, QSizePolicy, QVBoxLayout, QWidget

from rs_qgis_plugin.core.training import TrainingHistory, duration_text, preview_epoch
from rs_qgis_plugin.logic import JobRecord, verdict_text

# (metric, label, colour, dashed): loss against the left axis, IoU against the right one
SERIES = (("loss", "loss", "#1f77b4", False), ("val_loss", "val loss", "#1f77b4", True),
          ("iou", "IoU", "#d62728", False), ("val_iou", "val IoU", "#d62728", True))
BEST_COLOUR, RESTART_COLOUR = "#2ca02c", "#ff7f0e"


def tr(text: str) -> str:
    return QCoreApplication.translate("TrainingView", text)


class TrainingChart(QWidget):
    """Loss and IoU per epoch. ``history`` is what it draws; :meth:`points` is the data of each
    curve as drawn (epoch, value), for tests and for the tooltip-free reader."""

    MARGIN = (46, 22, 46, 62)  # left, top, right, bottom (the epoch axis, then the legend)

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.history = TrainingHistory()
        self.setMinimumSize(260, 160)
        self.setSizePolicy(QSizePolicy.Expanding, QSizePolicy.Expanding)

    def sizeHint(self) -> QSize:  # noqa: N802 - Qt's name
        return QSize(420, 220)

    def set_history(self, history: TrainingHistory | None) -> None:
        self.history = history or TrainingHistory()
        self.update()

    def points(self) -> dict[str, list[tuple[int, float]]]:
        return {metric: self.history.series(metric) for metric, *_ in SERIES}

    # -- geometry ----------------------------------------------------------------------------------
    def _epochs(self) -> int:
        return max(self.history.planned_epochs or 0, self.history.last_epoch, 1)

    def _loss_top(self) -> float:
        """The loss axis' top: the largest loss, but at most three times the median one, so a
        few wild early validation losses (seen: 200 against 1.4) do not flatten every other
        point; those are drawn on the top edge, off the scale."""
        values = sorted(v for m in ("loss", "val_loss") for _, v in self.history.series(m))
        if not values or values[-1] <= 0:
            return 1.0
        median = values[len(values) // 2]
        return min(values[-1], 3 * median if median > 0 else values[-1]) * 1.1

    def _plot(self) -> QRectF:
        left, top, right, bottom = self.MARGIN
        return QRectF(left, top, max(10, self.width() - left - right),
                      max(10, self.height() - top - bottom))

    def _x(self, epoch: float, plot: QRectF) -> float:
        epochs = self._epochs()
        return plot.left() + (plot.width() * (epoch - 1) / (epochs - 1) if epochs > 1
                              else plot.width() / 2)

    def _y(self, value: float, top_value: float, plot: QRectF) -> float:
        fraction = min(max(value / top_value, 0.0), 1.0) if top_value else 0.0
        return plot.bottom() - plot.height() * fraction

    # -- drawing -----------------------------------------------------------------------------------
    @staticmethod
    def _label(painter: QPainter, x: float, y: float, text: str, plot: QRectF) -> None:
        """``text`` beside the marker line at ``x``: to its right, or its left near the edge."""
        width = painter.fontMetrics().horizontalAdvance(text) + 4
        left = x + 3 if x + 3 + width <= plot.right() else x - 3 - width
        painter.drawText(QRectF(left, y, width, 14), Qt.AlignLeft, text)

    def paintEvent(self, event: object) -> None:  # noqa: N802 - Qt's name
        painter = QPainter(self)
        painter.setRenderHint(QPainter.Antialiasing)
        painter.fillRect(self.rect(), self.palette().base())
        plot = self._plot()
        text_pen = QPen(self.palette().text().color())
        painter.setPen(text_pen)
        if not self.history.epochs:
            painter.drawText(self.rect(), Qt.AlignCenter,
                             tr("No epoch finished yet: the curves appear after the first."))
            painter.end()
            return
        loss_top, epochs = self._loss_top(), self._epochs()
        # axes and their labels
        grid = QPen(QColor(128, 128, 128, 90))
        for i in range(5):
            y = plot.bottom() - plot.height() * i / 4
            painter.setPen(grid)
            painter.drawLine(QPointF(plot.left(), y), QPointF(plot.right(), y))
            painter.setPen(text_pen)
            painter.drawText(QRectF(0, y - 8, plot.left() - 4, 16), Qt.AlignRight | Qt.AlignVCenter,
                             f"{loss_top * i / 4:.2g}")
            painter.drawText(QRectF(plot.right() + 4, y - 8, 42, 16),
                             Qt.AlignLeft | Qt.AlignVCenter, f"{i / 4:.2f}")
        # as many epoch labels as fit, about 28 px apart
        step = max(1, math.ceil(epochs / max(1.0, plot.width() / 28)))
        for epoch in range(1, epochs + 1, step):
            x = self._x(epoch, plot)
            painter.drawText(QRectF(x - 20, plot.bottom() + 2, 40, 14), Qt.AlignCenter, str(epoch))
        painter.drawText(QRectF(plot.left(), plot.bottom() + 14, plot.width(), 14),
                         Qt.AlignCenter, tr("epoch"))
        painter.drawText(QRectF(2, 2, 120, 16), Qt.AlignLeft, tr("loss"))
        painter.drawText(QRectF(self.width() - 122, 2, 120, 16), Qt.AlignRight, tr("IoU"))
        # restarts: where training went back to its checkpoint
        for resumed in self.history.restart_epochs():
            x = self._x(resumed + 0.5, plot) if resumed else plot.left()
            painter.setPen(QPen(QColor(RESTART_COLOUR), 1.5, Qt.DotLine))
            painter.drawLine(QPointF(x, plot.top()), QPointF(x, plot.bottom()))
            self._label(painter, x, plot.top(), tr("restart"), plot)
        best = self.history.best
        if best is not None:
            x = self._x(best[0], plot)
            painter.setPen(QPen(QColor(BEST_COLOUR), 1.5, Qt.DashLine))
            painter.drawLine(QPointF(x, plot.top()), QPointF(x, plot.bottom()))
            self._label(painter, x, plot.top() + 14, tr("best {iou:.3f}").format(iou=best[1]), plot)
        clipped = False
        for metric, label, colour, dashed in SERIES:
            points = self.history.series(metric)
            top_value = 1.0 if "iou" in metric else loss_top
            pen = QPen(QColor(colour), 2, Qt.DashLine if dashed else Qt.SolidLine)
            painter.setPen(pen)
            path = QPainterPath()
            for i, (epoch, value) in enumerate(points):
                point = QPointF(self._x(epoch, plot), self._y(value, top_value, plot))
                path.moveTo(point) if i == 0 else path.lineTo(point)
                if value > top_value:  # off the scale: an open triangle on the top edge
                    clipped = True
                    painter.drawPolygon(QPolygonF([point + QPointF(-4, 5), point + QPointF(4, 5),
                                                   point + QPointF(0, -2)]))
                else:
                    painter.drawEllipse(point, 2.0, 2.0)
            painter.drawPath(path)
        # legend, under the epoch axis, on a second row where the first is full
        items = [(label, QPen(QColor(colour), 2, Qt.DashLine if dashed else Qt.SolidLine))
                 for metric, label, colour, dashed in SERIES]
        if clipped:
            items.append((tr("▲ off the scale"), None))
        x, y = plot.left(), plot.bottom() + 36
        for label, pen in items:
            width = (24 if pen is not None else 0) + painter.fontMetrics().horizontalAdvance(label)
            if x > plot.left() and x + width > self.width() - 4:
                x, y = plot.left(), y + 15
            if pen is not None:
                painter.setPen(pen)
                painter.drawLine(QPointF(x, y), QPointF(x + 18, y))
                x += 21
            painter.setPen(text_pen)
            painter.drawText(QRectF(x, y - 8, width, 16), Qt.AlignLeft | Qt.AlignVCenter, label)
            x += width - (21 if pen is not None else 0) + 10
        painter.end()


def _elapsed_s(record: JobRecord) -> float | None:
    started = record.started or ""
    try:
        begin = datetime.fromisoformat(started.replace("Z", "+00:00"))
    except ValueError:
        return None
    if begin.tzinfo is None:
        begin = begin.replace(tzinfo=timezone.utc)
    end = time.time()
    if record.finished:
        try:
            end = datetime.fromisoformat(record.finished.replace("Z", "+00:00")).timestamp()
        except ValueError:
            pass
    return max(0.0, end - begin.timestamp())


def summary_text(record: JobRecord, history: TrainingHistory | None) -> str:
    """What the cluster ran and how far training is, in words (plain text)."""
    lines = []
    history = history or TrainingHistory()
    if history.resources is not None:
        lines.append(tr("Runs on {where}").format(where=history.resources.text()))
    planned = history.planned_epochs
    if history.epochs:
        lines.append(tr("Epoch {n} of {total}").format(n=history.last_epoch,
                                                        total=planned or "?"))
    elapsed = _elapsed_s(record)
    timing = []
    if elapsed is not None:
        timing.append(tr("elapsed {t}").format(t=duration_text(elapsed)))
    left = history.seconds_left()
    if record.state == "running" and left is not None:
        timing.append(tr("about {t} left (from the last epochs' times; early stopping may end "
                         "it sooner)").format(t=duration_text(left)))
    if timing:
        lines.append(", ".join(timing).capitalize())
    best = history.best
    if best is not None and not record.verdict:  # once judged, the verdict line says it
        lines.append(tr("Best validation IoU so far: {iou:.3f} at epoch {epoch}").format(
            iou=best[1], epoch=best[0]))
    if history.restarts:
        lines.append(tr("Restarted {n}× after losing a worker").format(n=len(history.restarts)))
    verdict = verdict_text(record)
    if verdict:
        lines.append(("⚠ " if record.weak else "") + verdict[:1].upper() + verdict[1:])
    return "\n".join(lines) or tr("No training events yet.")


class TrainingView(QWidget):
    """Chart, newest preview (image, reference, prediction per row) and summary of one job."""

    PREVIEW_WIDTH = 300

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.chart = TrainingChart(self)
        self.preview = QLabel(self)
        self.preview.setAlignment(Qt.AlignCenter)
        self.preview.setTextFormat(Qt.PlainText)
        self.preview.setWordWrap(True)
        self.preview.setMinimumWidth(160)
        self.preview_caption = QLabel(self)
        self.preview_caption.setTextFormat(Qt.PlainText)
        self.preview_caption.setAlignment(Qt.AlignCenter)
        self.summary = QLabel(self)
        self.summary.setTextFormat(Qt.PlainText)
        self.summary.setWordWrap(True)
        self.summary.setTextInteractionFlags(Qt.TextSelectableByMouse)
        side = QVBoxLayout()
        side.addWidget(self.preview, 1)
        side.addWidget(self.preview_caption)
        top = QHBoxLayout()
        top.addWidget(self.chart, 3)
        top.addLayout(side, 2)
        layout = QVBoxLayout(self)
        layout.addLayout(top, 1)
        layout.addWidget(self.summary)
        self.preview_path: str | None = None
        self.show_job(None, None, None)

    def show_job(self, record: JobRecord | None, history: TrainingHistory | None,
                 preview: str | None) -> None:
        self.chart.set_history(history)
        if record is None:
            self.summary.setText(tr("Select a training job to see its curves and previews."))
        else:
            self.summary.setText(summary_text(record, history))
        self._show_preview(preview)

    def _show_preview(self, path: str | None) -> None:
        if path == self.preview_path:
            return
        self.preview_path = path
        if path is None:
            self.preview.setPixmap(QPixmap())
            self.preview.setText(tr("No preview yet: one comes after each epoch."))
            self.preview_caption.setText("")
            return
        image = QImage(path)
        if image.isNull():  # whatever the cluster sent, it is no picture
            self.preview.setPixmap(QPixmap())
            self.preview.setText(tr("The preview {name} could not be read.").format(
                name=Path(path).name))
            self.preview_caption.setText("")
            return
        pixmap = QPixmap.fromImage(image)
        if pixmap.width() > self.PREVIEW_WIDTH:
            pixmap = pixmap.scaledToWidth(self.PREVIEW_WIDTH, Qt.SmoothTransformation)
        self.preview.setPixmap(pixmap)
        epoch = preview_epoch(f"previews/{Path(path).name}")
        self.preview_caption.setText(tr("After epoch {n}: image, reference, prediction").format(
            n=epoch if epoch is not None else "?"))
