"""Reading what the cluster sends back: JSON-lines progress events and ``status.json``.

Both are versioned (``v`` on events, ``schema_version`` on the status); a newer version than this
plugin knows is refused with a message saying to update the plugin, never half-read.

Every known field is typed, and a value of the wrong type raises :class:`ProtocolError` naming
the field: what the cluster sends ends up in widgets, records and local paths, so it is read as
data of a known shape or not at all (a ``results`` sent as one string would otherwise become a
tuple of its characters). Keys this plugin does not know are kept in ``extra``, so a newer cluster
can add fields without breaking older plugins.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

from rs_qgis_plugin.core.errors import ProtocolError
from rs_qgis_plugin.core.jobspec import job_id_problem, relative_path_problem

EVENT_SCHEMA_VERSION = 1
STATUS_SCHEMA_VERSION = 1
EVENT_KINDS = frozenset({"start", "progress", "info", "warning", "metrics", "finish"})
STATES = frozenset({"queued", "running", "succeeded", "failed", "cancelled"})
TERMINAL_STATES = frozenset({"succeeded", "failed", "cancelled"})


@dataclass(frozen=True)
class ProgressEvent:
    time: str
    stage: str
    event: str  # one of EVENT_KINDS, or a kind from a newer cluster that readers may ignore
    message: str = ""
    done: int | None = None
    total: int | None = None
    percent: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)


VERDICTS = frozenset({"ok", "weak"})


@dataclass(frozen=True)
class Verdict:
    """The cluster's judgement of a trained model: "weak" when it learned almost nothing (its
    best validation IoU, or the building pixels it finds where the reference has many)."""

    verdict: str  # one of VERDICTS
    reason: str = ""
    advice: str = ""
    best_val_iou: float | None = None
    best_epoch: int | None = None

    @property
    def weak(self) -> bool:
        return self.verdict == "weak"


@dataclass(frozen=True)
class JobStatus:
    job_id: str
    state: str
    name: str = ""
    stage: str | None = None
    step: int = 0
    steps: int = 0
    progress: float = 0.0
    message: str = ""
    submitted: str | None = None
    started: str | None = None
    finished: str | None = None
    exit_code: int | None = None
    results: tuple[str, ...] = ()  # paths relative to the job folder, each checked safe
    restarts: int = 0  # times training restarted its workers after losing one
    warnings: int = 0  # warning events of all the job's steps so far
    verdict: Verdict | None = None  # how well the job's training went, once it finished
    extra: dict[str, Any] = field(default_factory=dict)  # e.g. the runner's pid, "updated"

    @property
    def is_finished(self) -> bool:
        return self.state in TERMINAL_STATES


# -- typed fields -------------------------------------------------------------------------------------
def _type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


class _Fields:
    """Typed access to the fields of one decoded object; each error names the object and field."""

    def __init__(self, data: dict[str, Any], what: str) -> None:
        self.data, self.what = data, what

    def _wrong(self, key: str, expected: str) -> ProtocolError:
        value = self.data[key]
        shown = f": {value!r}"[:80] if not isinstance(value, (dict, list)) else ""
        return ProtocolError(f"{self.what} field {key!r} must be {expected}, "
                             f"got {_type_name(value)}{shown}")

    def text(self, key: str, *, default: str = "") -> str:
        """A string; null or missing reads as ``default``."""
        value = self.data.get(key)
        if value is None:
            return default
        if not isinstance(value, str):
            raise self._wrong(key, "a string")
        return value

    def optional_text(self, key: str) -> str | None:
        value = self.data.get(key)
        if value is not None and not isinstance(value, str):
            raise self._wrong(key, "a string or null")
        return value

    def integer(self, key: str, *, minimum: int | None = None, nullable: bool = False,
                default: int | None = 0) -> int | None:
        value = self.data.get(key)
        if value is None and (nullable or key not in self.data):
            return None if nullable else default
        # bool is an int in Python, never in this protocol
        if isinstance(value, bool) or not isinstance(value, int):
            raise self._wrong(key, "an integer or null" if nullable else "an integer")
        if minimum is not None and value < minimum:
            raise ProtocolError(f"{self.what} field {key!r} must be at least {minimum}, "
                                f"got {value}")
        return value

    def number(self, key: str, *, nullable: bool = False,
               default: float | None = 0.0) -> float | None:
        value = self.data.get(key)
        if value is None and (nullable or key not in self.data):
            return None if nullable else default
        if isinstance(value, bool) or not isinstance(value, (int, float)) \
                or not math.isfinite(value):
            raise self._wrong(key, "a finite number or null" if nullable else "a finite number")
        return float(value)

    def relative_paths(self, key: str) -> tuple[str, ...]:
        """A list of '/'-separated paths inside the job folder; missing reads as empty."""
        value = self.data.get(key, [])
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise self._wrong(key, "a list of strings")
        for item in value:
            problem = relative_path_problem(item)
            if problem is not None:
                raise ProtocolError(f"{self.what} field {key!r} holds {item!r}, which {problem}")
        return tuple(value)


def _load_object(text: str, what: str) -> dict[str, Any]:
    try:
        data = json.loads(text)
    except ValueError as e:
        raise ProtocolError(f"{what} is not JSON: {text[:200]!r}") from e
    if not isinstance(data, dict):
        raise ProtocolError(f"{what} is not a JSON object: {text[:200]!r}")
    return data


# -- events -------------------------------------------------------------------------------------------
_EVENT_FIELDS = frozenset({"v", "time", "stage", "event", "message", "done", "total", "percent"})


def parse_event(line: str) -> ProgressEvent:
    data = _load_object(line, "progress event")
    version, kind = data.get("v"), data.get("event")
    if isinstance(version, bool) or not isinstance(version, int) or kind is None:
        raise ProtocolError(f"not a progress event: {line[:200]!r}")
    if version > EVENT_SCHEMA_VERSION:
        raise ProtocolError(f"progress events v{version} are newer than this plugin reads "
                            f"(v{EVENT_SCHEMA_VERSION}); update the plugin")
    fields = _Fields(data, "progress event")
    kind = fields.text("event")
    if not kind:
        raise ProtocolError(f"progress event field 'event' is empty: {line[:200]!r}")
    return ProgressEvent(
        time=fields.text("time"), stage=fields.text("stage"), event=kind,
        message=fields.text("message"),
        done=fields.integer("done", minimum=0, nullable=True),
        total=fields.integer("total", minimum=0, nullable=True),
        percent=fields.number("percent", nullable=True),
        extra={k: v for k, v in data.items() if k not in _EVENT_FIELDS})


def parse_events(text: str) -> list[ProgressEvent]:
    """Every complete line of ``rs-cluster job events`` output."""
    return [parse_event(line) for line in text.splitlines() if line.strip()]


# -- status -------------------------------------------------------------------------------------------
_STATUS_FIELDS = frozenset({"schema_version", "job_id", "state", "name", "stage", "step", "steps",
                            "progress", "message", "submitted", "started", "finished",
                            "exit_code", "results", "restarts", "warnings", "verdict"})


def parse_verdict(data: Any) -> Verdict | None:
    """The status's ``verdict``: null, or an object whose every field is checked."""
    if data is None:
        return None
    if not isinstance(data, dict):
        raise ProtocolError(f"job status field 'verdict' must be an object or null, got "
                            f"{_type_name(data)}")
    fields = _Fields(data, "job status verdict")
    verdict = fields.text("verdict")
    if verdict not in VERDICTS:
        raise ProtocolError(f"job status verdict must be one of {', '.join(sorted(VERDICTS))}, "
                            f"got {verdict!r}"[:300])
    return Verdict(verdict=verdict, reason=fields.text("reason")[:500],
                   advice=fields.text("advice")[:500],
                   best_val_iou=fields.number("best_val_iou", nullable=True),
                   best_epoch=fields.integer("best_epoch", minimum=1, nullable=True))


def checked_job_id(data: Any, where: str) -> str:
    """The ``job_id`` of a status or job-list entry from the cluster, checked: the id names
    local folders and records, so it must be a plain job id."""
    job_id = data.get("job_id") if isinstance(data, dict) else None
    if not isinstance(job_id, str):
        raise ProtocolError(f"{where} field 'job_id' must be a string, got "
                            f"{_type_name(job_id)}: {str(data)[:200]}")
    problem = job_id_problem(job_id)
    if problem is not None:
        raise ProtocolError(f"{where} field 'job_id' {job_id!r} {problem}")
    return job_id


def parse_status(text: str | dict[str, Any], *, expect_job_id: str | None = None) -> JobStatus:
    """The status of a job; with ``expect_job_id``, refused unless it is that job's."""
    data = _load_object(text, "job status") if isinstance(text, str) else text
    if not isinstance(data, dict):
        raise ProtocolError(f"job status is not a JSON object: {str(data)[:200]}")
    version = data.get("schema_version")
    if isinstance(version, bool) or not isinstance(version, int) or \
            not 1 <= version <= STATUS_SCHEMA_VERSION:
        raise ProtocolError(f"job status schema {version!r} is not one this plugin reads "
                            f"(<= {STATUS_SCHEMA_VERSION}); update the plugin")
    fields = _Fields(data, "job status")
    job_id = checked_job_id(data, "job status")
    if expect_job_id is not None and job_id != expect_job_id:
        raise ProtocolError(f"the cluster answered with the status of job {job_id!r} when asked "
                            f"for job {expect_job_id!r}")
    state = data.get("state")
    if state not in STATES:
        raise ProtocolError(f"job status field 'state' must be one of {', '.join(sorted(STATES))}"
                            f", got {state!r}"[:300])
    return JobStatus(
        job_id=job_id, state=state, name=fields.text("name"),
        stage=fields.optional_text("stage"),
        step=fields.integer("step", minimum=0) or 0,
        steps=fields.integer("steps", minimum=0) or 0,
        progress=fields.number("progress") or 0.0,
        message=fields.text("message"),
        submitted=fields.optional_text("submitted"), started=fields.optional_text("started"),
        finished=fields.optional_text("finished"),
        exit_code=fields.integer("exit_code", nullable=True),
        results=fields.relative_paths("results"),
        restarts=fields.integer("restarts", minimum=0) or 0,
        warnings=fields.integer("warnings", minimum=0) or 0,
        verdict=parse_verdict(data.get("verdict")),
        extra={k: v for k, v in data.items() if k not in _STATUS_FIELDS})
