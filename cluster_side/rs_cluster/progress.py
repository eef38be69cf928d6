"""Progress reporting for long stages: a terminal bar for people, JSON lines for programs.

A stage takes a ``reporter`` and calls :meth:`Reporter.progress` as work completes. The JSON-lines
events are part of the contract with the QGIS plugin: one JSON object per line, each with ``v``
(event schema version), ``time`` (UTC ISO 8601), ``stage`` and ``event``; see ``EVENT_SCHEMA_VERSION``.
"""

from __future__ import annotations

import json
import math
import re
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
        self._bar_stage = ""
        # Without a terminal (a log file) there is no bar: one progress line this often, at most.
        self._line_interval = line_interval
        self._last: dict[str, float] = {}  # stage -> when its last progress line was written

    def emit(self, event: dict[str, Any]) -> None:
        kind = event["event"]
        with self._lock:
            if kind == "start":
                self._close_bar()
                from tqdm import tqdm

                self._bar = tqdm(total=event.get("total"), unit=" " + event.get("unit", "items"),
                                 desc=self._stage, file=self._stream, dynamic_ncols=True,
                                 disable=None)  # None: disabled when not a terminal
                self._bar_stage = self._stage
                if self._bar.disable and event.get("message"):
                    self._line(event["message"])
            elif kind == "progress":
                self._progress(event)
            elif kind in ("info", "warning", "finish"):
                if kind == "finish" and self._bar_stage == self._stage:
                    self._close_bar()
                prefix = "warning: " if kind == "warning" else ""
                if event.get("message"):
                    self._line(prefix + event["message"])
            elif kind == "metrics":
                values = {k: v for k, v in event.items() if k != "event"}
                self._line(" ".join(f"{k}={_fmt(v)}" for k, v in values.items()))

    def _progress(self, event: dict[str, Any]) -> None:
        # The bar shows its own stage only: in a job's events another stage's progress (the
        # runner counting steps) comes between, and is a line rather than a jump of the bar.
        bar = self._bar if self._bar is not None and self._bar_stage == self._stage else None
        if bar is not None:
            if event.get("total") is not None:
                bar.total = event["total"]
            bar.n = event["done"]
            if event.get("message"):
                bar.set_postfix_str(event["message"], refresh=False)
            bar.refresh()
            if not bar.disable:
                return
        total = event.get("total")
        # Without a bar, a line now and then, and always the last one: a log then says that
        # the stage got to the end, not only that it was at 1/400 ten seconds in.
        last = total is not None and event["done"] >= total
        now = time.monotonic()
        if last or now - self._last.get(self._stage, -math.inf) >= self._line_interval:
            self._last[self._stage] = now
            self._line(f"{event['done']}/{total or '?'} {event.get('message') or ''}".rstrip())

    def _line(self, text: str) -> None:
        if self._bar is not None and not self._bar.disable:
            self._bar.write(f"[{self._stage}] {text}", file=self._stream)
        else:
            self._stream.write(f"[{self._stage}] {text}\n")
            self._stream.flush()

    def _close_bar(self) -> None:
        if self._bar is not None:
            if not self._bar.n:
                # A bar that never moved says nothing: it goes, rather than stay on the screen
                # as "0%" above the next stage's (a job's first bar, its count of steps).
                self._bar.leave = False
            self._bar.close()
            self._bar = None
            self._bar_stage = ""

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


# What a replayed event may carry into a terminal line: no control characters (an escape sequence
# in a message would drive the reader's terminal), and no text longer than a status message.
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
_MAX_TEXT = 500


def clean_text(value: Any, limit: int = _MAX_TEXT) -> str:
    """``value`` as one line of at most ``limit`` characters for a person to read: a message
    read back from an events file, which whatever wrote it may have filled with anything."""
    text = value if isinstance(value, str) else "" if value is None else str(value)
    return _CONTROL.sub(" ", text)[:limit]


def _count(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


def _shown(value: Any) -> Any:
    """A metric value as it may be shown: a finite number, or text; anything else as text."""
    if isinstance(value, bool) or value is None:
        return value
    if isinstance(value, int) or (isinstance(value, float) and math.isfinite(value)):
        return value
    return clean_text(value, 80)


def render_event(reporter: Reporter, event: dict[str, Any]) -> None:
    """Replays one parsed event (:func:`parse_event`) into ``reporter`` as the stage named in its
    envelope: ``rs-cluster job events --follow`` shows a job's events, those of several stages
    one after the other, in the same words the stages print themselves. The event was read from
    a file, so each field is checked before it reaches the reporter; one it cannot show is left
    out, never an error."""
    kind = event.get("event")
    stage = clean_text(event.get("stage"), 40) or "?"
    message = clean_text(event.get("message"))
    if kind == "start":
        unit = clean_text(event.get("unit"), 40) or "items"
        reporter.start(stage, total=_count(event.get("total")), unit=unit, message=message)
        return
    reporter._stage = stage
    if kind == "progress":
        done = _count(event.get("done"))
        if done is not None:
            reporter.emit({"event": "progress", "done": done, "total": _count(event.get("total")),
                           "message": message})
    elif kind in ("info", "warning", "finish"):
        reporter.emit({"event": kind, "message": message})
    elif kind == "metrics":
        envelope = ("v", "time", "stage", "event")
        reporter.emit({"event": "metrics", **{clean_text(k, 40): _shown(v) for k, v in event.items()
                                              if k not in envelope}})
