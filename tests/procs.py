"""Processes as the tests see them, read from ``/proc`` (no psutil: the QGIS venv lacks it), and
polling until something holds. Shared by the cluster-side, contract and plugin tests."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, TypeVar

ENV_JOB_ID = "RS_CLUSTER_JOB_ID"  # what every process of a cluster job carries (rs_cluster.jobs)
T = TypeVar("T")


@dataclass(frozen=True)
class Proc:
    pid: int
    name: str  # /proc/<pid>/comm, e.g. "java"
    session: int
    argv: tuple[str, ...]
    environ: dict[str, str]

    @property
    def command(self) -> str:
        return " ".join(self.argv)

    def mentions(self, text: str) -> bool:
        """Whether ``text`` is in its command line or in one of its environment's entries."""
        return text in self.command or any(text in f"{k}={v}" for k, v in self.environ.items())


def live_processes() -> Iterator[Proc]:
    """Every process but this one and zombies; those that vanish meanwhile are skipped."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            fields = (entry / "stat").read_bytes().rsplit(b")", 1)[1].split()
            if fields[0] == b"Z":
                continue
            argv = (entry / "cmdline").read_bytes().split(b"\0")
            environ = (entry / "environ").read_bytes().split(b"\0")
            name = (entry / "comm").read_text().strip()
        except OSError:
            continue
        env = dict(item.decode(errors="replace").partition("=")[::2] for item in environ if item)
        yield Proc(int(entry.name), name, int(fields[3]),
                   tuple(a.decode(errors="replace") for a in argv if a), env)


def job_pids(job_id: str, session: int | None = None) -> list[int]:
    """Live processes of a cluster job: carrying its id in their environment, or in ``session``."""
    return [p.pid for p in live_processes()
            if p.environ.get(ENV_JOB_ID) == job_id or (session and p.session == session)]


def wait_for(predicate: Callable[[], T], timeout: float = 30.0, what: str = "a condition",
             interval: float = 0.1) -> T:
    """Polls ``predicate`` until it returns something true, and returns that."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
