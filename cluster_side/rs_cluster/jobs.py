"""Jobs: a folder per run that outlives the SSH session which started it.

Layout of ``<workspace>/jobs/<job-id>/``::

    job.json       the validated job spec (:mod:`rs_cluster.jobspec`)
    inputs/        files uploaded by the plugin
    status.json    state, stage, progress, times, results, runner pid; always replaced atomically
    events.jsonl   JSON-lines progress events of every step (:mod:`rs_cluster.progress`)
    log.txt        stdout and stderr of every step
    outputs/       what the steps write

``submit`` starts a runner detached from the caller (double fork into a new session), so closing
the SSH connection does not stop it. The runner runs each step as ``python -m rs_cluster <stage>``
and turns its events into ``status.json``. Every process of a job either belongs to the runner's
session or carries ``RS_CLUSTER_JOB_ID`` in its environment; ``cancel`` stops all of them.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Iterator

from rs_cluster.atomic import write_json_atomic
from rs_cluster.errors import ConfigError, DiskFullError, RsClusterError, disk_full_error, is_disk_full
from rs_cluster.jobspec import JobSpec, check_job_id, parse_job_spec, step_argv
from rs_cluster.progress import JsonLinesReporter, parse_event, utc_now

STATUS_SCHEMA_VERSION = 1
ENV_JOB_ID = "RS_CLUSTER_JOB_ID"
ENV_WORKSPACE = "RS_CLUSTER_WORKSPACE"

JOB_FILE, STATUS_FILE, EVENTS_FILE, LOG_FILE = "job.json", "status.json", "events.jsonl", "log.txt"
INPUTS_DIR, OUTPUTS_DIR, CANCEL_FILE = "inputs", "outputs", ".cancel-requested"
# Disk space the runner holds back while steps run and frees for its last words (the final
# status.json, event and log line), so a job that fills the disk still ends "failed", not "running".
RESERVE_FILE, _RESERVE_BYTES = ".disk-reserve", 64 * 1024

ACTIVE_STATES = frozenset({"queued", "running"})
TERMINAL_STATES = frozenset({"succeeded", "failed", "cancelled"})

# How long a job may sit in "queued" without a runner pid before it is declared failed.
_QUEUED_GRACE_S = 60.0
_POLL_S = 0.2


class JobNotFoundError(RsClusterError, LookupError):
    """No job with that id in the workspace."""


class JobStateError(RsClusterError, RuntimeError):
    """The job is in a state that does not allow this (cleaning a running job, resubmitting)."""


def default_workspace() -> Path:
    return Path(os.environ.get(ENV_WORKSPACE) or "~/.rs-cluster").expanduser()


class Workspace:
    """The root holding every job folder (``<root>/jobs/<job-id>``)."""

    def __init__(self, root: str | os.PathLike[str] | None = None) -> None:
        self.root = (Path(root).expanduser() if root else default_workspace()).absolute()
        self.jobs_dir = self.root / "jobs"

    def job_dir(self, job_id: str) -> Path:
        return self.jobs_dir / check_job_id(job_id)

    def existing_job_dir(self, job_id: str) -> Path:
        path = self.job_dir(job_id)
        if not (path / JOB_FILE).is_file():
            raise JobNotFoundError(f"no job {job_id!r} in {self.jobs_dir}")
        return path

    def job_ids(self) -> list[str]:
        if not self.jobs_dir.is_dir():
            return []
        return sorted(p.name for p in self.jobs_dir.iterdir() if (p / JOB_FILE).is_file())


# -- status -----------------------------------------------------------------------------------------

def load_json(path: Path) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise
    except (OSError, ValueError) as e:
        raise ConfigError(f"{path} is not readable JSON: {e}") from e


def initial_status(spec: JobSpec) -> dict[str, Any]:
    now = utc_now()
    return {
        "schema_version": STATUS_SCHEMA_VERSION, "job_id": spec.job_id, "name": spec.name,
        "state": "queued", "stage": None, "step": 0, "steps": len(spec.steps), "progress": 0.0,
        "message": "queued", "submitted": now, "started": None, "finished": None, "updated": now,
        "exit_code": None, "pid": None, "pgid": None, "pid_started": None,
        "results": [],  # what the job produced: filled in only when it succeeds
    }


def write_status(job_dir: Path, status: dict[str, Any]) -> None:
    """Replaces ``status.json``. A progress update of an active job that finds the disk full is
    skipped: the previous ``status.json`` stays whole, and a later update replaces it."""
    status["updated"] = utc_now()
    try:
        write_json_atomic(job_dir / STATUS_FILE, status)
    except DiskFullError:
        if status.get("state") not in ACTIVE_STATES or not (job_dir / STATUS_FILE).exists():
            raise


def _process_start_time(pid: int) -> float | None:
    import psutil

    try:
        return psutil.Process(pid).create_time()
    except psutil.Error:
        return None


def runner_alive(status: dict[str, Any]) -> bool:
    """Whether the runner recorded in ``status`` still runs (a reused pid does not count)."""
    import psutil

    pid = status.get("pid")
    if not pid:
        return False
    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            return False
        started = status.get("pid_started")
        return started is None or abs(proc.create_time() - started) < 1.0
    except psutil.Error:
        return False


def read_status(job_dir: Path) -> dict[str, Any]:
    """The job's status; a queued/running job whose runner died is marked failed (and saved)."""
    status: dict[str, Any] = load_json(job_dir / STATUS_FILE)
    if status.get("state") not in ACTIVE_STATES or runner_alive(status):
        return status
    if status.get("pid") is None and _age_s(status.get("submitted")) < _QUEUED_GRACE_S:
        return status  # submit is still starting the runner
    # Read again: the runner may have written its final state just before it exited.
    status = load_json(job_dir / STATUS_FILE)
    if status.get("state") in ACTIVE_STATES:
        pid = status.get("pid")
        status.update(
            state="failed", finished=utc_now(),
            message=(f"the job runner (pid {pid}) stopped without reporting an end: it was killed "
                     "or the machine restarted; see log.txt, and run `rs-cluster job cancel "
                     f"{status.get('job_id')}` to stop any step it left running" if pid else
                     "the job runner never started; see log.txt"))
        with contextlib.suppress(DiskFullError):  # the verdict is reached again on every read
            write_status(job_dir, status)
    return status


def _age_s(iso: str | None) -> float:
    from datetime import datetime

    if not iso:
        return float("inf")
    return time.time() - datetime.fromisoformat(iso).timestamp()


def read_events(job_dir: Path, since: int = 0) -> tuple[list[str], int]:
    """Complete event lines from number ``since`` on (0-based), and the number to ask for next.

    A line that is not a JSON object was cut short by a full disk; it is left out (and not
    counted), so readers that parse every line still can.
    """
    try:
        data = (job_dir / EVENTS_FILE).read_bytes()
    except FileNotFoundError:
        return [], since
    complete = data[: data.rfind(b"\n") + 1].decode("utf-8", errors="replace")
    lines = [line for line in complete.splitlines() if _is_json_object(line)]
    return lines[since:], max(since, len(lines))


def _is_json_object(line: str) -> bool:
    try:
        return isinstance(json.loads(line), dict)
    except ValueError:
        return False


# -- submit -----------------------------------------------------------------------------------------

def submit(workspace: Workspace, source: str | os.PathLike[str], *, wait_s: float = 30.0) -> dict[str, Any]:
    """Creates (or takes) the job folder and starts its runner detached; returns its status.

    ``source`` is either a spec file (copied into a new job folder) or a job folder under the
    workspace already holding ``job.json`` and the uploaded inputs.
    """
    source = Path(source)
    if source.is_dir():
        job_dir = source.resolve()
        spec = parse_job_spec(load_json(job_dir / JOB_FILE), job_dir)
        if job_dir != workspace.job_dir(spec.job_id).resolve():
            raise ConfigError(f"{source} is not the folder of job {spec.job_id!r} in the workspace "
                              f"{workspace.root}; upload to {workspace.job_dir(spec.job_id)}")
    else:
        try:
            raw = load_json(source)
        except FileNotFoundError:
            raise ConfigError(f"job spec {source} does not exist") from None
        spec = parse_job_spec(raw)
        job_dir = workspace.job_dir(spec.job_id)
        if job_dir.exists():
            raise JobStateError(f"job {spec.job_id!r} already exists in {workspace.jobs_dir}")
        job_dir.mkdir(parents=True)
        spec = parse_job_spec(raw, job_dir)
        write_json_atomic(job_dir / JOB_FILE, spec.to_dict())
    if (job_dir / STATUS_FILE).exists():
        raise JobStateError(f"job {spec.job_id!r} was already submitted; see `rs-cluster job "
                            f"status {spec.job_id}`")
    (job_dir / INPUTS_DIR).mkdir(exist_ok=True)
    (job_dir / OUTPUTS_DIR).mkdir(exist_ok=True)
    write_status(job_dir, initial_status(spec))

    argv = [sys.executable, "-m", "rs_cluster", "--quiet", "job", "_run",
            "--workspace", str(workspace.root), spec.job_id]
    env = {**os.environ, ENV_JOB_ID: spec.job_id}
    pid = spawn_detached(argv, cwd=job_dir, log=job_dir / LOG_FILE, env=env)

    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        status: dict[str, Any] = load_json(job_dir / STATUS_FILE)
        if status.get("state") != "queued":
            return status
        if _process_start_time(pid) is None:
            break
        time.sleep(0.02)
    status = load_json(job_dir / STATUS_FILE)
    if status.get("state") == "queued":
        status.update(pid=pid, pgid=pid)
        if _process_start_time(pid) is None:
            status.update(state="failed", finished=utc_now(),
                          message="the job runner exited before it started; see log.txt")
        write_status(job_dir, status)
    return status


def spawn_detached(argv: list[str], *, cwd: Path, log: Path, env: dict[str, str]) -> int:
    """Starts ``argv`` as a grandchild in its own session, not a child of ours: it survives the
    caller's exit and SSH hang-up, and no zombie waits on us. Returns its pid."""
    read_fd, write_fd = os.pipe()
    middle = os.fork()
    if middle == 0:  # pragma: no cover - runs in the forked child
        try:
            os.close(read_fd)
            os.setsid()
            pid = os.fork()
            if pid == 0:
                os.chdir(cwd)
                devnull = os.open(os.devnull, os.O_RDONLY)
                out = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
                os.dup2(devnull, 0)
                os.dup2(out, 1)
                os.dup2(out, 2)
                # Drop every inherited descriptor, the SSH channel's pipes above all: an open one
                # keeps the remote command "running" for the client until the job ends.
                os.closerange(3, os.sysconf("SC_OPEN_MAX"))
                try:
                    os.execve(argv[0], argv, env)
                finally:
                    os._exit(127)
            os.write(write_fd, str(pid).encode())
        finally:
            os._exit(0)
    os.close(write_fd)
    with os.fdopen(read_fd, "rb") as f:
        data = f.read()
    os.waitpid(middle, 0)
    if not data:
        raise JobStateError("could not start the job runner (fork failed)")
    return int(data)


# -- the runner -------------------------------------------------------------------------------------

class _EventFollower:
    """Reads the events appended to ``events.jsonl`` since the last call."""

    def __init__(self, path: Path) -> None:
        self._path = path
        self._offset = path.stat().st_size if path.exists() else 0

    def new_events(self) -> Iterator[dict[str, Any]]:
        try:
            with open(self._path, "rb") as f:
                f.seek(self._offset)
                data = f.read()
        except FileNotFoundError:
            return
        end = data.rfind(b"\n") + 1
        self._offset += end
        for line in data[:end].decode("utf-8", errors="replace").splitlines():
            try:
                yield parse_event(line)
            except ValueError:
                continue


def run_job(job_dir: Path) -> int:
    """Runs every step of the job in ``job_dir``, keeping ``status.json`` current. The runner
    process; started by :func:`submit`, not by users."""
    spec = parse_job_spec(load_json(job_dir / JOB_FILE), job_dir)
    status = load_json(job_dir / STATUS_FILE)
    pid = os.getpid()
    status.update(state="running", pid=pid, pgid=os.getpgid(0), pid_started=_process_start_time(pid),
                  started=utc_now(), message="started")
    write_status(job_dir, status)
    _reserve_space(job_dir)

    stop = threading.Event()

    def on_signal(signum: int, frame: Any) -> None:
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, on_signal)

    events_path = job_dir / EVENTS_FILE
    env = {**os.environ, ENV_JOB_ID: spec.job_id}
    exit_code = 0
    full_disk: OSError | None = None
    events_stream = open(events_path, "a", encoding="utf-8")  # noqa: SIM115 - closed below
    log = open(job_dir / LOG_FILE, "ab")  # noqa: SIM115 - closed below
    try:
        reporter = JsonLinesReporter(events_stream)
        try:
            reporter.start("job", total=len(spec.steps), unit="steps", message=spec.name)
            for index, step in enumerate(spec.steps):
                if stop.is_set() or (job_dir / CANCEL_FILE).exists():
                    break
                argv = [sys.executable, "-m", "rs_cluster", "--quiet", "--events", str(events_path),
                        *step_argv(step, job_dir)]
                log.write(f"$ {shlex.join(argv)}\n".encode())
                log.flush()
                follower = _EventFollower(events_path)
                status.update(stage=step.stage, step=index + 1, message=f"{step.stage} started")
                write_status(job_dir, status)
                proc = subprocess.Popen(argv, cwd=job_dir, stdin=subprocess.DEVNULL, stdout=log,
                                        stderr=subprocess.STDOUT, env=env)
                exit_code = _follow_step(proc, follower, status, job_dir, index, len(spec.steps), stop)
                _end_cut_line(events_path, events_stream)
                reporter.progress(index + 1, len(spec.steps), message=f"{step.stage} exit {exit_code}")
                if exit_code != 0:
                    break
        except OSError as e:  # the runner's own log and event lines, written between steps
            if not is_disk_full(e):
                raise
            full_disk = e
        cancelled = stop.is_set() or (job_dir / CANCEL_FILE).exists()
        if cancelled:
            status.update(state="cancelled", message="cancelled")
        elif full_disk is not None:
            status.update(state="failed", message=str(disk_full_error(
                full_disk, job_dir, "writing the job's log and events")))
        elif exit_code != 0:
            message = _last_error(job_dir / LOG_FILE, status)
            disk_full = shutil.disk_usage(job_dir).free < _RESERVE_BYTES  # the reserve still held
            if disk_full and "no space left" not in message.lower():
                # The step's own error line may have found no room in log.txt.
                message = str(disk_full_error(None, job_dir, f"running {status.get('stage')}"))
            status.update(state="failed", message=message)
        else:
            status.update(state="succeeded", progress=100.0, message="done",
                          results=[r for r in spec.outputs() if (job_dir / r).exists()])
        status.update(exit_code=exit_code, finished=utc_now())
        (job_dir / RESERVE_FILE).unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            reporter.finish(status["message"], state=status["state"])
    finally:
        for stream in (events_stream, log):
            with contextlib.suppress(OSError):  # a line the full disk did not take is lost
                stream.close()
    write_status(job_dir, status)
    return 0 if status["state"] == "succeeded" else 1


def _end_cut_line(path: Path, stream: Any) -> None:
    """Ends the step's last event line when a full disk cut it short, so the runner's next event
    starts a line of its own instead of being glued to a fragment."""
    with open(path, "rb") as f:
        end = f.seek(0, os.SEEK_END)
        if end == 0:
            return
        f.seek(end - 1)
        last = f.read(1)
    if last != b"\n":
        stream.write("\n")
        stream.flush()


def _reserve_space(job_dir: Path) -> None:
    path = job_dir / RESERVE_FILE
    try:
        with open(path, "wb") as f:
            f.write(bytes(_RESERVE_BYTES))  # written, not truncated: a sparse file holds nothing
            f.flush()
            os.fsync(f.fileno())
    except OSError:
        path.unlink(missing_ok=True)  # already full: run without it


def _follow_step(proc: subprocess.Popen[bytes], follower: _EventFollower, status: dict[str, Any],
                 job_dir: Path, index: int, steps: int, stop: threading.Event) -> int:
    last_written = dict(status)
    while True:
        try:
            code = proc.wait(timeout=_POLL_S)
        except subprocess.TimeoutExpired:
            code = None
        for event in follower.new_events():
            kind = event.get("event")
            if kind == "progress" and event.get("percent") is not None:
                fraction = min(max(float(event["percent"]), 0.0), 100.0) / 100.0
                status["progress"] = round(100.0 * (index + fraction) / steps, 1)
            if kind in ("start", "progress", "info", "warning", "finish") and event.get("message"):
                status["message"] = str(event["message"])[:500]
            if kind == "warning" and isinstance(event.get("restart"), int):
                # training restarted its workers from the last checkpoint after losing one
                status["restarts"] = event["restart"]
        if status != last_written:
            write_status(job_dir, status)
            last_written = dict(status)
        if code is not None:
            return code
        if stop.is_set():
            _terminate_tree(proc.pid)


def _last_error(log: Path, status: dict[str, Any]) -> str:
    try:
        lines = log.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        lines = []
    for line in reversed(lines[-200:]):
        if "error" in line.lower():
            return line.strip()[:500]
    return f"{status.get('stage')} failed; see log.txt"


# -- cancel, clean, list ----------------------------------------------------------------------------

def job_processes(job_id: str, status: dict[str, Any]) -> list[Any]:
    """Every live process of the job: the runner's session, and anything carrying the job id in
    its environment (a Spark JVM or Horovod worker that started its own session)."""
    import psutil

    me = os.getpid()
    session = status.get("pgid") if runner_alive(status) else None
    found = []
    for proc in psutil.process_iter():
        if proc.pid == me:
            continue
        try:
            if session and os.getsid(proc.pid) == session or proc.environ().get(ENV_JOB_ID) == job_id:
                found.append(proc)
        except (psutil.Error, OSError):
            continue
    return found


def _terminate_tree(pid: int) -> None:
    import psutil

    try:
        parent = psutil.Process(pid)
        procs = [*parent.children(recursive=True), parent]
    except psutil.Error:
        return
    _stop_processes(procs, grace_s=5.0)


def _stop_processes(procs: list[Any], grace_s: float) -> list[Any]:
    import psutil

    for proc in procs:
        try:
            proc.terminate()
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(procs, timeout=grace_s)
    for proc in alive:
        try:
            proc.kill()
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(alive, timeout=grace_s)
    return alive


def cancel(workspace: Workspace, job_id: str, *, grace_s: float = 5.0) -> dict[str, Any]:
    """Stops every process of the job (TERM, then KILL after ``grace_s``) and marks it cancelled.

    A job that already ended keeps its state, but stray processes it left are still stopped.
    """
    job_dir = workspace.existing_job_dir(job_id)
    (job_dir / CANCEL_FILE).touch()
    status = load_json(job_dir / STATUS_FILE)
    alive = _stop_processes(job_processes(job_id, status), grace_s)
    if alive:
        raise JobStateError(f"could not stop process(es) {[p.pid for p in alive]} of job {job_id}")
    status = load_json(job_dir / STATUS_FILE)
    if status.get("state") in ACTIVE_STATES:
        status.update(state="cancelled", message="cancelled", finished=utc_now())
        write_status(job_dir, status)
    return status


def clean(workspace: Workspace, job_id: str) -> None:
    """Deletes a job folder; refused while the job runs (cancel it first)."""
    job_dir = workspace.existing_job_dir(job_id)
    if (job_dir / STATUS_FILE).exists() and read_status(job_dir).get("state") in ACTIVE_STATES:
        raise JobStateError(f"job {job_id} is still running; cancel it first")
    shutil.rmtree(job_dir)


def list_jobs(workspace: Workspace) -> list[dict[str, Any]]:
    jobs = []
    for job_id in workspace.job_ids():
        job_dir = workspace.job_dir(job_id)
        try:
            status = read_status(job_dir)
        except FileNotFoundError:
            status = {"job_id": job_id, "state": "new", "message": "not submitted yet"}
        except ConfigError as e:
            status = {"job_id": job_id, "state": "unknown", "message": str(e)}
        jobs.append({k: status.get(k) for k in
                     ("job_id", "name", "state", "stage", "progress", "message", "submitted",
                      "finished")})
    return jobs
