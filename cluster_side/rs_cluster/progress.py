"""Progress reporting for long stages: a terminal bar for people, JSON lines for programs.

A stage takes a ``reporter`` and calls :meth:`Reporter.progress` as work completes. The JSON-lines
events are part of the contract with the QGIS plugin: one JSON object per line, each with ``v``
(event schema version), ``time`` (UTC ISO 8601), ``stage`` and ``event``; see ``EVENT_SCHEMA_VERSION``.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from datetime import datetime, timezone
from typing import IO, Any, Iterable

EVENT_SCHEMA_VERSION = 1


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


class Reporter:
    """Base reporter: ignores everything. Subclasses override :meth:`emit`."""

    def __init__(self) -> None:
        self._stage = ""
        self._lock = threading.Lock()

    # -- what stages call -------------------------------------------------------------------------
    def start(self, stage: str, total: int | None = None, unit: str = "items", message: str = "") -> None:
        self._stage = stage
        self.emit({"event": "start", "total": total, "unit": unit, "message": message})

    def progress(self, done: int, total: int | None = None, message: str = "", **extra: Any) -> None:
        percent = None if not total else round(100.0 * done / total, 1)
        self.emit({"event": "progress", "done": done, "total": total, "percent": percent,
                   "message": message, **extra})

    def info(self, message: str, **extra: Any) -> None:
        self.emit({"event": "info", "message": message, **extra})

    def warning(self, message: str, **extra: Any) -> None:
        self.emit({"event": "warning", "message": message, **extra})

    def metrics(self, **values: Any) -> None:
        self.emit({"event": "metrics", **values})

    def finish(self, message: str = "", **extra: Any) -> None:
        self.emit({"event": "finish", "message": message, **extra})

    # -- what subclasses implement ----------------------------------------------------------------
    def emit(self, event: dict[str, Any]) -> None:  # pragma: no cover - the null reporter
        pass

    def close(self) -> None:
        pass

    def _envelope(self, event: dict[str, Any]) -> dict[str, Any]:
        return {"v": EVENT_SCHEMA_VERSION, "time": utc_now(), "stage": self._stage, **event}


class JsonLinesReporter(Reporter):
    """Writes each event as one JSON line and flushes, so a reader tailing the file sees it now."""

    def __init__(self, stream: IO[str]) -> None:
        super().__init__()
        self._stream = stream

    def emit(self, event: dict[str, Any]) -> None:
        line = json.dumps(self._envelope(event), default=str, ensure_ascii=False)
        with self._lock:
            self._stream.write(line + "\n")
            self._stream.flush()


class TerminalReporter(Reporter):
    """A progress bar on stderr (tqdm) plus one-line messages; quiet when stderr is not a TTY."""

    def __init__(self, stream: IO[str] | None = None, line_interval: float = 10.0) -> None:
        super().__init__()
        self._stream = stream or sys.stderr
        self._bar: Any = None
        # Without a terminal (a log file) there is no bar: one progress line this often, at most.
        self._line_interval = line_interval
        self._last = 0.0

    def emit(self, event: dict[str, Any]) -> None:
        kind = event["event"]
        with self._lock:
            if kind == "start":
                self._close_bar()
                from tqdm import tqdm

                self._bar = tqdm(total=event.get("total"), unit=" " + event.get("unit", "items"),
                                 desc=self._stage, file=self._stream, dynamic_ncols=True,
                                 disable=None)  # None: disabled when not a terminal
                if self._bar.disable and event.get("message"):
                    self._line(event["message"])
            elif kind == "progress" and self._bar is not None:
                if event.get("total") is not None:
                    self._bar.total = event["total"]
                self._bar.n = event["done"]
                if event.get("message"):
                    self._bar.set_postfix_str(event["message"], refresh=False)
                self._bar.refresh()
                now = time.monotonic()
                if self._bar.disable and now - self._last >= self._line_interval:
                    self._last = now
                    self._line(f"{event['done']}/{event.get('total') or '?'} {event.get('message', '')}")
            elif kind in ("info", "warning", "finish"):
                if kind == "finish":
                    self._close_bar()
                prefix = "warning: " if kind == "warning" else ""
                if event.get("message"):
                    self._line(prefix + event["message"])
            elif kind == "metrics":
                values = {k: v for k, v in event.items() if k != "event"}
                self._line(" ".join(f"{k}={_fmt(v)}" for k, v in values.items()))

    def _line(self, text: str) -> None:
        if self._bar is not None and not self._bar.disable:
            self._bar.write(f"[{self._stage}] {text}", file=self._stream)
        else:
            self._stream.write(f"[{self._stage}] {text}\n")
            self._stream.flush()

    def _close_bar(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def close(self) -> None:
        with self._lock:
            self._close_bar()


class TeeReporter(Reporter):
    """Sends every event to several reporters (the terminal and a JSON-lines file, say)."""

    def __init__(self, reporters: Iterable[Reporter]) -> None:
        super().__init__()
        self._reporters = list(reporters)

    def start(self, stage: str, total: int | None = None, unit: str = "items", message: str = "") -> None:
        for r in self._reporters:
            r.start(stage, total, unit, message)

    def emit(self, event: dict[str, Any]) -> None:
        for r in self._reporters:
            r._stage = self._stage or r._stage
            r.emit(event)

    def close(self) -> None:
        for r in self._reporters:
            r.close()


def _fmt(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def parse_event(line: str) -> dict[str, Any]:
    """Parses one JSON-lines event, checking the envelope; raises ValueError when it is not one."""
    event = json.loads(line)
    if not isinstance(event, dict) or "event" not in event or "v" not in event:
        raise ValueError(f"not a progress event: {line[:200]!r}")
    if event["v"] > EVENT_SCHEMA_VERSION:
        raise ValueError(f"progress event schema v{event['v']} is newer than this rs-cluster reads")
    return event
