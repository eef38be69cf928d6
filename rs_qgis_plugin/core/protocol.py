"""Reading what the cluster sends back: JSON-lines progress events and ``status.json``.

Both are versioned (``v`` on events, ``schema_version`` on the status); a newer version than this
plugin knows is refused with a message saying to update the plugin, never half-read.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from rs_qgis_plugin.core.errors import ProtocolError

EVENT_SCHEMA_VERSION = 1
STATUS_SCHEMA_VERSION = 1
EVENT_KINDS = frozenset({"start", "progress", "info", "warning", "metrics", "finish"})
STATES = frozenset({"queued", "running", "succeeded", "failed", "cancelled"})
TERMINAL_STATES = frozenset({"succeeded", "failed", "cancelled"})


@dataclass(frozen=True)
class ProgressEvent:
    time: str
    stage: str
    event: str
    message: str = ""
    done: int | None = None
    total: int | None = None
    percent: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)


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
    results: tuple[str, ...] = ()
    restarts: int = 0  # times training restarted its workers after losing one

    @property
    def is_finished(self) -> bool:
        return self.state in TERMINAL_STATES


def _load_object(text: str, what: str) -> dict[str, Any]:
    try:
        data = json.loads(text)
    except ValueError as e:
        raise ProtocolError(f"{what} is not JSON: {text[:200]!r}") from e
    if not isinstance(data, dict):
        raise ProtocolError(f"{what} is not a JSON object: {text[:200]!r}")
    return data


def parse_event(line: str) -> ProgressEvent:
    data = _load_object(line, "progress event")
    version, kind = data.get("v"), data.get("event")
    if not isinstance(version, int) or kind is None:
        raise ProtocolError(f"not a progress event: {line[:200]!r}")
    if version > EVENT_SCHEMA_VERSION:
        raise ProtocolError(f"progress events v{version} are newer than this plugin reads "
                            f"(v{EVENT_SCHEMA_VERSION}); update the plugin")
    known = {"v", "time", "stage", "event", "message", "done", "total", "percent"}
    percent = data.get("percent")
    return ProgressEvent(
        time=str(data.get("time", "")), stage=str(data.get("stage", "")), event=str(kind),
        message=str(data.get("message") or ""), done=data.get("done"), total=data.get("total"),
        percent=float(percent) if percent is not None else None,
        extra={k: v for k, v in data.items() if k not in known})


def parse_events(text: str) -> list[ProgressEvent]:
    """Every complete line of ``rs-cluster job events`` output."""
    return [parse_event(line) for line in text.splitlines() if line.strip()]


def parse_status(text: str | dict[str, Any]) -> JobStatus:
    data = _load_object(text, "job status") if isinstance(text, str) else text
    version = data.get("schema_version")
    if not isinstance(version, int) or version > STATUS_SCHEMA_VERSION:
        raise ProtocolError(f"job status schema {version!r} is not one this plugin reads "
                            f"(<= {STATUS_SCHEMA_VERSION}); update the plugin")
    state = data.get("state")
    if state not in STATES or not isinstance(data.get("job_id"), str):
        raise ProtocolError(f"job status has no valid job_id/state: {str(data)[:200]}")
    return JobStatus(
        job_id=data["job_id"], state=state, name=str(data.get("name") or ""),
        stage=data.get("stage"), step=int(data.get("step") or 0), steps=int(data.get("steps") or 0),
        progress=float(data.get("progress") or 0.0), message=str(data.get("message") or ""),
        submitted=data.get("submitted"), started=data.get("started"),
        finished=data.get("finished"), exit_code=data.get("exit_code"),
        results=tuple(data.get("results") or ()), restarts=int(data.get("restarts") or 0))
