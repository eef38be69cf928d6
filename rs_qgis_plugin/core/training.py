"""A training job's history, read from its progress events: per-epoch metrics, restarts, the
resources it runs on, the latest prediction preview, and the time it still needs.

Built from the events alone, so the jobs panel draws the same curves live and after a QGIS restart
(when it reads the job's events again from the first). Every value comes from the cluster and is
checked here: a metric that is not a finite number is left out, an epoch that is not a positive
integer drops its row, and a preview path must name ``previews/epoch-NNNN.png`` in the job folder
before it becomes a local file name. Adding an event twice changes nothing (rows are keyed by
epoch, restarts by their count), so a live event and the same event read again later agree.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any, Iterable

from rs_qgis_plugin.core.protocol import ProgressEvent

# The metrics drawn, and their labels: the cluster's names (Keras' logs).
CURVES = ("loss", "val_loss", "iou", "val_iou")
PREVIEW_PATH = re.compile(r"previews/epoch-(\d{4})\.png")
# A model whose best validation IoU stays under this learned almost nothing (as the cluster says).
WEAK_IOU = 0.05


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def _count(value: Any, minimum: int = 0) -> int | None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        return None
    return value


def preview_epoch(path: Any) -> int | None:
    """The epoch of a preview path the cluster named, or None unless it is exactly
    ``previews/epoch-NNNN.png`` (no other folder, no ``..``, nothing absolute)."""
    if not isinstance(path, str):
        return None
    match = PREVIEW_PATH.fullmatch(path)
    return int(match.group(1)) if match else None


@dataclass(frozen=True)
class Resources:
    master: str = ""
    workers: int | None = None
    engine: str = ""
    executors: int | None = None
    cores: int | None = None
    storage: str | None = None

    @classmethod
    def from_event(cls, data: Any) -> Resources | None:
        if not isinstance(data, dict):
            return None

        def text(key: str) -> str:
            value = data.get(key)
            return value[:300] if isinstance(value, str) else ""

        return cls(master=text("master"), workers=_count(data.get("workers"), 1),
                   engine=text("engine"), executors=_count(data.get("executors")),
                   cores=_count(data.get("cores")), storage=text("storage") or None)

    def text(self) -> str:
        """In words: "spark://m:7077: 2 Horovod workers in 2 executors (4 cores); storage s3://…"."""
        # "in-process": one worker in the train step's own process, on the login host
        where = ("the login host, in one process" if self.master == "in-process"
                 else self.master or "?")
        workers = (f"{self.workers} {self.engine.capitalize() or 'training'} worker(s)"
                   if self.workers else "workers unknown")
        parts = [f"{where}: {workers}"]
        if self.executors is not None:
            parts.append(f" in {self.executors} executor(s)"
                         + (f" ({self.cores} cores)" if self.cores is not None else ""))
        storage = f"; storage {self.storage}" if self.storage else "; files in the job folder"
        return "".join(parts) + storage


@dataclass
class TrainingHistory:
    epochs: dict[int, dict[str, float]] = field(default_factory=dict)  # epoch -> metric -> value
    epoch_seconds: dict[int, float] = field(default_factory=dict)
    planned_epochs: int | None = None
    restarts: dict[int, int] = field(default_factory=dict)  # restart count -> epoch resumed from
    resources: Resources | None = None
    preview: str | None = None  # the newest preview's path in the job folder
    best_epoch_reported: int | None = None

    # -- building -------------------------------------------------------------------------------------
    @classmethod
    def from_events(cls, events: Iterable[ProgressEvent]) -> TrainingHistory:
        history = cls()
        for event in events:
            history.add(event)
        return history

    def add(self, event: ProgressEvent) -> bool:
        """Takes what a training event says; True when it changed anything."""
        if event.stage != "train":
            return False
        extra = event.extra
        before = self._state()
        if event.event == "metrics":
            epoch = _count(extra.get("epoch"), 1)
            if epoch is not None:
                # A restart trains an epoch again: its newer values replace the older ones.
                self.epochs[epoch] = {k: v for k in CURVES
                                      if (v := _number(extra.get(k))) is not None}
                seconds = _number(extra.get("seconds"))
                if seconds is not None and seconds >= 0:
                    self.epoch_seconds[epoch] = seconds
                planned = _count(extra.get("epochs"), 1)
                if planned is not None:
                    self.planned_epochs = planned
                best = _count(extra.get("best_epoch"), 1)
                if best is not None:
                    self.best_epoch_reported = best
        elif event.event == "warning":
            restart = _count(extra.get("restart"), 1)
            if restart is not None:
                self.restarts[restart] = _count(extra.get("resume_epoch")) or 0
        elif event.event == "info":
            resources = Resources.from_event(extra.get("resources"))
            if resources is not None:
                self.resources = resources
            epoch = preview_epoch(extra.get("preview"))
            if epoch is not None and (self.preview is None
                                      or epoch >= (preview_epoch(self.preview) or 0)):
                self.preview = extra["preview"]
        return self._state() != before

    def _state(self) -> tuple[Any, ...]:
        return (sorted((e, sorted(r.items())) for e, r in self.epochs.items()),
                self.planned_epochs, sorted(self.restarts.items()), self.resources, self.preview,
                self.best_epoch_reported)

    # -- reading ------------------------------------------------------------------------------------
    @property
    def is_empty(self) -> bool:
        return not self.epochs and self.resources is None and self.preview is None

    def series(self, metric: str) -> list[tuple[int, float]]:
        """(epoch, value) of one metric, by epoch."""
        return [(e, row[metric]) for e, row in sorted(self.epochs.items()) if metric in row]

    @property
    def last_epoch(self) -> int:
        return max(self.epochs, default=0)

    @property
    def best(self) -> tuple[int, float] | None:
        """(epoch, validation IoU) of the best epoch: the highest validation IoU, the earliest
        epoch among equals, as the cluster keeps it."""
        points = self.series("val_iou")
        if not points:
            return None
        return max(points, key=lambda p: (p[1], -p[0]))

    def restart_epochs(self) -> list[int]:
        """The epochs training went back to, one per restart, in order."""
        return [self.restarts[n] for n in sorted(self.restarts)]

    def seconds_left(self) -> float | None:
        """Epochs still planned times the mean of the last (up to) three epoch times; None
        before the first epoch or without a planned count. Early stopping may end it sooner."""
        if self.planned_epochs is None or not self.epoch_seconds:
            return None
        remaining = self.planned_epochs - self.last_epoch
        if remaining <= 0:
            return 0.0
        recent = [self.epoch_seconds[e] for e in sorted(self.epoch_seconds)[-3:]]
        return remaining * sum(recent) / len(recent)


def duration_text(seconds: float) -> str:
    """"45 s", "12 min", "2 h 05 min"."""
    seconds = max(0.0, seconds)
    if seconds < 90:
        return f"{seconds:.0f} s"
    minutes = round(seconds / 60)
    if minutes < 90:
        return f"{minutes} min"
    return f"{minutes // 60} h {minutes % 60:02d} min"
