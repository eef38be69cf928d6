"""Jobs: a folder per run that outlives the SSH session which started it.

Layout of ``<workspace>/jobs/<job-id>/``::

    job.json       the validated job spec (:mod:`rs_cluster.jobspec`)
    inputs/        files uploaded by the plugin
    status.json    state, stage, progress, times, results, runner pid; always replaced atomically
    events.jsonl   JSON-lines progress events of every step (:mod:`rs_cluster.progress`)
    log.txt        stdout and stderr of every step
    outputs/       what the steps write
    previews/      the train steps' preview images, previews/epoch-NNNN.png (``--previews``)
    .status.lock   taken around every read-modify-write of status.json

``submit`` starts a runner detached from the caller (double fork into a new session), so closing
the SSH connection does not stop it. The runner runs each step as ``python -m rs_cluster <stage>``
(the entry module that submitted, see :func:`submit`) and turns its events into ``status.json``. Every process of a job either belongs to the runner's
session or carries ``RS_CLUSTER_JOB_ID`` in its environment; ``cancel`` stops all of them.

Status changes are serialised by the job's lock, and a terminal state is final: whoever writes
second (a slow submit, a late cancel, a reader declaring a dead runner failed) finds the newer
state and leaves it.

The workspace may be shared by several login hosts (round-robin SSH names, one home on NFS), so a
job's liveness is not judged by a pid alone: status.json records the runner's ``host`` and
``boot_id``, and the runner refreshes its ``heartbeat`` every few seconds. On the runner's own
host (same name, same boot) the pid decides; elsewhere only a heartbeat older than the settings'
``jobs.heartbeat_timeout_s`` makes the job failed. A cancel from another host cannot signal the
runner's processes: it leaves the cancel marker, which the runner polls, and waits for it.

When the cluster settings (:mod:`rs_cluster.settings`) name a storage URL, the job folder is not
where executors look: the runner copies ``inputs/`` to ``<storage>/<user>/<job-id>/inputs``, every
path of every step becomes a URL under ``<storage>/<user>/<job-id>``, and once every step has
counted the runner brings the steps' outputs back into the job folder, all or none, before the job
may succeed. The storage settings reach the steps as the standard AWS variables (``AWS_PROFILE``,
``AWS_SHARED_CREDENTIALS_FILE``, ``AWS_ENDPOINT_URL``) and Spark executors as
``spark.executorEnv.*``; keys written in the settings file go to this host's steps only, never into
a spec, a status, an event or the Spark configuration. Without a storage URL, a job with a Spark
step for a master beyond this host (not ``local[...]``) is refused at submit, in one line naming
the setting to add.

Besides progress, the runner keeps in status.json how many ``warning`` events the steps wrote
(``warnings``) and what the last train step's ``finish`` event said of the model (``verdict``:
verdict, reason, advice, best validation IoU and its epoch), and says both in the message of a
job that succeeded ("done with 2 warning(s); best validation IoU 0.412 at epoch 7").

The workspace holds the user's imagery, models and results, on login nodes
shared with other users: its folders are 0700, and the files that submit, the runner and its steps
write are 0600 (the runner runs with umask 077), whatever umask the login shell left.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import math
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from rs_cluster import jobspec, storage
from rs_cluster.atomic import write_json_atomic
from rs_cluster.errors import ConfigError, DiskFullError, RsClusterError, disk_full_error, is_disk_full
from rs_cluster.jobspec import JobSpec, Step, check_job_id, parse_job_spec, step_argv
from rs_cluster.progress import JsonLinesReporter, clean_text, parse_event, utc_now

STATUS_SCHEMA_VERSION = 1
ENV_JOB_ID = "RS_CLUSTER_JOB_ID"
ENV_WORKSPACE = "RS_CLUSTER_WORKSPACE"

JOB_FILE, STATUS_FILE, EVENTS_FILE, LOG_FILE = "job.json", "status.json", "events.jsonl", "log.txt"
INPUTS_DIR, OUTPUTS_DIR, CANCEL_FILE = "inputs", "outputs", ".cancel-requested"
PREVIEWS_DIR = "previews"
LOCK_FILE = ".status.lock"
PRIVATE_DIR, PRIVATE_FILE, PRIVATE_UMASK = 0o700, 0o600, 0o077
# Disk space the runner holds back while steps run and frees for its last words (the final
# status.json, event and log line), so a job that fills the disk still ends "failed", not "running".
RESERVE_FILE, _RESERVE_BYTES = ".disk-reserve", 64 * 1024

ACTIVE_STATES = frozenset({"queued", "running"})
TERMINAL_STATES = frozenset({"succeeded", "failed", "cancelled"})

ENTRY_MODULE = "rs_cluster"
_MODULE_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")

# How long a job may sit in "queued" without a runner pid before it is declared failed.
_QUEUED_GRACE_S = 60.0
_POLL_S = 0.2
# How often the runner refreshes its heartbeat; at most a quarter of the timeout readers apply.
HEARTBEAT_S = 5.0
_BOOT_ID = Path("/proc/sys/kernel/random/boot_id")


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

    def create(self) -> None:
        """Creates the workspace private to its user, or makes an existing one so."""
        for folder in (self.root, self.jobs_dir):
            private_dir(folder)

    def tighten(self) -> None:
        """Makes an existing workspace that others can read private (as older versions left
        them); creates nothing."""
        for folder in (self.root, self.jobs_dir):
            with contextlib.suppress(FileNotFoundError):
                _tighten(folder)

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


def private_dir(path: Path) -> None:
    """Creates the folder ``path`` as 0700 (its missing parents get the usual mode: they are not
    the workspace's to decide), or tightens it to 0700 when it exists."""
    with contextlib.suppress(FileExistsError):
        path.mkdir(mode=PRIVATE_DIR, parents=True)
    _tighten(path)


def _tighten(path: Path) -> None:
    st = path.stat()
    # Only the owner may chmod; a folder someone else made (a shared root) is theirs to decide.
    if st.st_mode & 0o777 != PRIVATE_DIR and st.st_uid == os.geteuid():
        os.chmod(path, PRIVATE_DIR)


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
    skipped: the previous ``status.json`` stays whole, and a later update replaces it. Callers
    that may race another writer use :func:`update_status` instead."""
    status["updated"] = utc_now()
    try:
        write_json_atomic(job_dir / STATUS_FILE, status, mode=PRIVATE_FILE)
    except DiskFullError:
        if status.get("state") not in ACTIVE_STATES or not (job_dir / STATUS_FILE).exists():
            raise


@contextlib.contextmanager
def status_lock(job_dir: Path) -> Iterator[None]:
    """Holds the job's lock: submit, the runner, cancel and readers that change ``status.json``
    read, decide and write it under this lock, so none writes back a state older than it read."""
    try:
        fd = os.open(job_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, PRIVATE_FILE)
    except OSError as e:
        if is_disk_full(e):
            raise disk_full_error(e, job_dir / LOCK_FILE, "creating the job's lock file") from e
        raise
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # released when the descriptor closes, even on a crash
        yield
    finally:
        os.close(fd)


def update_status(job_dir: Path, change: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
    """Reads ``status.json`` under the job's lock, lets ``change`` update it, writes it back when
    ``change`` returns True, and returns the status as it now stands."""
    with status_lock(job_dir):
        status: dict[str, Any] = load_json(job_dir / STATUS_FILE)
        if change(status):
            write_status(job_dir, status)
        return status


def _process_start_time(pid: int) -> float | None:
    import psutil

    try:
        return psutil.Process(pid).create_time()
    except psutil.Error:
        return None


def this_host() -> dict[str, str | None]:
    """Who this machine is, as status.json records a runner's host: its name and its boot (a pid
    means nothing on another machine, nor on this one after a restart)."""
    try:
        boot_id: str | None = _BOOT_ID.read_text(encoding="ascii").strip() or None
    except OSError:
        boot_id = None
    return {"host": socket.gethostname(), "boot_id": boot_id}


def runner_is_here(status: dict[str, Any]) -> bool:
    """Whether the runner in ``status`` ran on this machine since its last boot. A status without
    a host (written before hosts were recorded) is taken as this machine's, as it always was."""
    if status.get("host") is None:
        return True
    me = this_host()
    return status.get("host") == me["host"] and status.get("boot_id") == me["boot_id"]


def heartbeat_timeout_s() -> float:
    from rs_cluster.settings import load_settings

    return load_settings().heartbeat_timeout_s


def runner_alive(status: dict[str, Any]) -> bool:
    """Whether the runner recorded in ``status`` still runs: on its own host, by its pid (a reused
    pid does not count); from another host, by a heartbeat fresher than the timeout."""
    if not runner_is_here(status):
        # No heartbeat yet: submit on that host recorded the pid before the runner reported.
        return _age_s(status.get("heartbeat") or status.get("updated")) < heartbeat_timeout_s()
    return _local_runner_alive(status)


def _local_runner_alive(status: dict[str, Any]) -> bool:
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
    if not _runner_lost(status):
        return status
    try:
        return update_status(job_dir, _declare_lost)
    except DiskFullError:  # not saved: the verdict is reached again on every read
        status = load_json(job_dir / STATUS_FILE)
        _declare_lost(status)
        return status


def _runner_lost(status: dict[str, Any]) -> bool:
    if status.get("state") not in ACTIVE_STATES or runner_alive(status):
        return False
    # Without a pid, submit may still be starting the runner.
    return status.get("pid") is not None or _age_s(status.get("submitted")) >= _QUEUED_GRACE_S


def _declare_lost(status: dict[str, Any]) -> bool:
    # Checked again under the lock: the runner may have written its final state just before it
    # exited.
    if not _runner_lost(status):
        return False
    pid = status.get("pid")
    if pid and not runner_is_here(status):
        status.update(
            state="failed", finished=utc_now(),
            message=(f"the job runner (pid {pid} on host {status.get('host')}) sent no heartbeat "
                     f"for over {heartbeat_timeout_s():g} s: it was killed, or that host restarted "
                     "or lost the shared workspace; see log.txt, and run `rs-cluster job cancel "
                     f"{status.get('job_id')}` on {status.get('host')} to stop any step it left "
                     "running"))
        return True
    status.update(
        state="failed", finished=utc_now(),
        message=(f"the job runner (pid {pid}) stopped without reporting an end: it was killed "
                 "or the machine restarted; see log.txt, and run `rs-cluster job cancel "
                 f"{status.get('job_id')}` to stop any step it left running" if pid else
                 "the job runner never started; see log.txt"))
    return True


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


class EventTail:
    """The event lines appended to a job's ``events.jsonl``, call after call: what
    :func:`read_events` returns, but read on from where the last call stopped, so following a
    long training does not read its whole file again every poll. ``since`` skips that many
    events first, counted as :func:`read_events` counts them."""

    def __init__(self, job_dir: Path, since: int = 0) -> None:
        self._path = job_dir / EVENTS_FILE
        self._offset, self._skip = 0, max(since, 0)

    def new_lines(self) -> list[str]:
        try:
            with open(self._path, "rb") as f:
                f.seek(self._offset)
                data = f.read()
        except FileNotFoundError:
            return []
        end = data.rfind(b"\n") + 1  # a line still being written waits for the next call
        self._offset += end
        lines = [line for line in data[:end].decode("utf-8", errors="replace").splitlines()
                 if _is_json_object(line)]
        skipped = min(self._skip, len(lines))
        self._skip -= skipped
        return lines[skipped:]


LOG_TAIL_BYTES = 64 * 1024  # what `job log --tail` reads at most from the end of log.txt


def read_log_tail(job_dir: Path, lines: int = 50) -> list[str]:
    """The last ``lines`` lines of the job's log (from its last 64 KiB: a tail, not the log)."""
    try:
        with open(job_dir / LOG_FILE, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - LOG_TAIL_BYTES))
            data = f.read()
    except FileNotFoundError:
        return []
    text = data.decode("utf-8", errors="replace").splitlines()
    if size > LOG_TAIL_BYTES and text:
        text = text[1:]  # the first line was cut by the window
    return text[-lines:] if lines > 0 else []


def _is_json_object(line: str) -> bool:
    try:
        return isinstance(json.loads(line), dict)
    except ValueError:
        return False


# -- submit -----------------------------------------------------------------------------------------

def submit(workspace: Workspace, source: str | os.PathLike[str], *, wait_s: float = 30.0,
           entry_module: str = ENTRY_MODULE) -> dict[str, Any]:
    """Creates (or takes) the job folder and starts its runner detached; returns its status.

    ``source`` is either a spec file (copied into a new job folder) or a job folder under the
    workspace already holding ``job.json`` and the uploaded inputs. The runner and its steps run
    ``python -m <entry_module>``: the entry point that submitted, so they know the same stages.
    """
    _check_entry_module(entry_module)
    workspace.create()
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
        job_dir.mkdir(mode=PRIVATE_DIR)
        spec = parse_job_spec(raw, job_dir)
        write_json_atomic(job_dir / JOB_FILE, spec.to_dict(), mode=PRIVATE_FILE)
    if (job_dir / STATUS_FILE).exists():
        raise JobStateError(f"job {spec.job_id!r} was already submitted; see `rs-cluster job "
                            f"status {spec.job_id}`")
    for folder in (job_dir, job_dir / INPUTS_DIR, job_dir / OUTPUTS_DIR):
        private_dir(folder)  # the uploaded folders too: SFTP made them with the server's umask
    with status_lock(job_dir):
        write_status(job_dir, initial_status(spec))
    try:
        job_storage(spec, job_dir)  # a job its executors could not run fails here, in one line
    except RsClusterError as e:
        reason = str(e)

        def refuse(current: dict[str, Any]) -> bool:
            current.update(state="failed", message=reason, finished=utc_now())
            return True

        return update_status(job_dir, refuse)

    argv = [sys.executable, "-m", entry_module, "--quiet", "job", "_run",
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
    # The runner has not reported yet: record its pid, so readers can tell a dead one. Checked
    # before the lock is taken (the runner needs the lock to report) and applied only while the
    # runner has written nothing: anything it wrote is newer than what this knows.
    runner_started = _process_start_time(pid) is not None

    def fill_in(current: dict[str, Any]) -> bool:
        if current.get("state") != "queued" or current.get("pid") is not None:
            return False
        current.update(pid=pid, pgid=pid, **this_host())
        if not runner_started:
            current.update(state="failed", finished=utc_now(),
                           message="the job runner exited before it started; see log.txt")
        return True

    return update_status(job_dir, fill_in)


def _check_entry_module(name: str) -> None:
    if not _MODULE_NAME.match(name):
        raise ConfigError(f"{name!r} is not a Python module name to run jobs with")


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
                out = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, PRIVATE_FILE)
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


def run_job(job_dir: Path, *, entry_module: str = ENTRY_MODULE) -> int:
    """Runs every step of the job in ``job_dir`` as ``python -m <entry_module> <stage> ...``,
    keeping ``status.json`` current. The runner process; started by :func:`submit`, not by users."""
    _check_entry_module(entry_module)
    os.umask(PRIVATE_UMASK)  # what the runner and every step create is private to the user
    spec = parse_job_spec(load_json(job_dir / JOB_FILE), job_dir)
    pid = os.getpid()

    def start(current: dict[str, Any]) -> bool:
        if current.get("state") != "queued":  # cancelled (or declared failed) before it started
            return False
        current.update(state="running", pid=pid, pgid=os.getpgid(0),
                       pid_started=_process_start_time(pid), started=utc_now(), message="started",
                       heartbeat=utc_now(), warnings=0, verdict=None, **this_host())
        return True

    status = update_status(job_dir, start)
    if status.get("state") != "running" or status.get("pid") != pid:
        return 1
    _reserve_space(job_dir)
    heartbeat = _Heartbeat(job_dir, pid, _heartbeat_interval_s())

    stop = threading.Event()

    def on_signal(signum: int, frame: Any) -> None:
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, on_signal)

    events_path = job_dir / EVENTS_FILE
    env = {**os.environ, ENV_JOB_ID: spec.job_id}
    heartbeat.start()
    exit_code, steps_done = 0, 0
    full_disk: OSError | None = None
    failure: str | None = None  # why the job failed outside its steps (settings, storage)
    trained: dict[str, Any] = {}  # the last train finish event's quality fields (train_quality)
    events_stream = open(events_path, "a", encoding="utf-8")  # noqa: SIM115 - closed below
    log = open(job_dir / LOG_FILE, "ab")  # noqa: SIM115 - closed below
    try:
        reporter = JsonLinesReporter(events_stream)
        try:
            reporter.start("job", total=len(spec.steps), unit="steps", message=spec.name)
            where: JobStorage | None = None
            try:
                where = job_storage(spec, job_dir)
                if where is not None:
                    # The runner's own copies and every step's SDK read the same store.
                    os.environ.update(where.env)
                    env.update(where.env)
                    _log_line(log, f"# job files in shared storage: {where.url}")
                    # Recorded for `job clean`, which deletes this copy too (a URL, no key).
                    status.update(storage_url=where.url,
                                  message=f"copying the inputs to {where.url}")
                    _runner_write(job_dir, status)
                    storage.stage_inputs(str(job_dir), where.url)
            except RsClusterError as e:
                failure, exit_code = str(e), e.exit_code
            for index, step in enumerate(spec.steps):
                if failure is not None or stop.is_set() or (job_dir / CANCEL_FILE).exists():
                    break
                argv = [sys.executable, "-m", entry_module, "--quiet", "--events", str(events_path),
                        *step_argv(step, job_dir, root_url=where and where.url),
                        *(where.spark_args(step) if where is not None else ())]
                if step.stage == "train":
                    # The train driver runs here, in the job folder, even when the job's files
                    # are in shared storage: its previews are local files the plugin fetches.
                    private_dir(job_dir / PREVIEWS_DIR)
                    argv += ["--previews", str(job_dir / PREVIEWS_DIR)]
                log.write(f"$ {shlex.join(argv)}\n".encode())
                log.flush()
                follower = _EventFollower(events_path)
                status.update(stage=step.stage, step=index + 1, message=f"{step.stage} started")
                if not _runner_write(job_dir, status):
                    break
                proc = subprocess.Popen(argv, cwd=job_dir, stdin=subprocess.DEVNULL, stdout=log,
                                        stderr=subprocess.STDOUT, env=env)
                exit_code = _follow_step(proc, follower, status, job_dir, index, len(spec.steps),
                                         stop, trained)
                _end_cut_line(events_path, events_stream)
                reporter.progress(index + 1, len(spec.steps), message=f"{step.stage} exit {exit_code}")
                if exit_code != 0 or not _step_counts(job_dir, stop):
                    break
                steps_done = index + 1
            if where is not None and failure is None and steps_done == len(spec.steps):
                # Back into the job folder, where the plugin fetches them, before the job may
                # be called succeeded: all of them, or none (storage.fetch_results).
                status.update(message=f"copying the results back from {where.url}")
                _runner_write(job_dir, status)
                try:
                    storage.fetch_results(where.url, str(job_dir), spec.results())
                except RsClusterError as e:
                    failure, exit_code = str(e), e.exit_code
        except OSError as e:  # the runner's own log and event lines, written between steps
            if not is_disk_full(e):
                raise
            full_disk = e
        # A job whose every step was counted (see _step_counts) succeeded, even when a cancel
        # arrived after that; anything else with a cancel pending was cancelled.
        with status_lock(job_dir):
            if full_disk is None and failure is None and steps_done == len(spec.steps):
                status.update(state="succeeded", progress=100.0,
                              message=success_message(status.get("warnings") or 0, trained),
                              results=[r for r in spec.results() if (job_dir / r).exists()])
            elif stop.is_set() or (job_dir / CANCEL_FILE).exists():
                status.update(state="cancelled", message="cancelled")
            elif failure is not None:
                status.update(state="failed", message=failure)
                with contextlib.suppress(OSError):
                    _log_line(log, f"error: {failure}")
            elif full_disk is not None:
                status.update(state="failed", message=str(disk_full_error(
                    full_disk, job_dir, "writing the job's log and events")))
            else:
                status.update(state="failed", message=_step_error(job_dir, status))
            status.update(exit_code=exit_code, finished=utc_now())
            (job_dir / RESERVE_FILE).unlink(missing_ok=True)
            with contextlib.suppress(OSError):
                reporter.finish(status["message"], state=status["state"])
            _close(events_stream, log)
            current = load_json(job_dir / STATUS_FILE)
            if current.get("state") in TERMINAL_STATES:
                status = current  # ended by someone else meanwhile: that verdict stands
            else:
                write_status(job_dir, status)
    finally:
        heartbeat.stop()
        _close(events_stream, log)
    return 0 if status["state"] == "succeeded" else 1


@dataclass(frozen=True)
class JobStorage:
    """Where a job's files live while it runs, when the cluster settings name a storage URL:
    ``<storage>/<user>/<job-id>``, and the AWS variables that point its processes there."""

    url: str
    env: dict[str, str] = field(repr=False)  # this host's processes (may hold settings keys)
    executor_env: dict[str, str] = field(default_factory=dict)  # never a key

    def spark_args(self, step: Step) -> list[str]:
        """Options that hand the storage pointers to a Spark step's executors."""
        if "spark_conf" not in jobspec.STAGES[step.stage][1]:
            return []
        return [f"--spark-conf=spark.executorEnv.{k}={v}" for k, v in self.executor_env.items()]


def job_storage(spec: JobSpec, job_dir: Path) -> JobStorage | None:
    """The job's place in shared storage, or None when the cluster settings name none. Without
    one, a Spark step bound for a master beyond this host is refused before anything runs: its
    executors cannot see the job folder, which exists on this login host only."""
    import getpass

    from rs_cluster.settings import effective_spark, load_settings, settings_path

    settings = load_settings()
    if settings.storage.url is None and settings.shared_workspace:
        return None  # every node mounts the workspace: the stages run in the job folder
    if settings.storage.url is None:
        for index, step in enumerate(spec.steps):
            if "master" not in jobspec.STAGES[step.stage][1]:
                continue  # not a Spark stage: it runs here, in the job folder
            master = effective_spark(step.params.get("master"), settings=settings).master
            if not master.startswith("local"):
                path = settings.path or settings_path()[0]
                raise ConfigError(
                    f"step {index + 1} ({step.stage}) would run on the Spark master {master}, "
                    f"whose executors cannot see the job folder {job_dir} on this login host: set "
                    f"storage.url in {path} to a store every node reaches (s3://bucket/prefix, or "
                    "file:///path every node mounts), or jobs.shared_workspace = true if every "
                    "node mounts the workspace itself")
        return None
    url = storage.job_url(settings.storage.url, getpass.getuser(), spec.job_id)
    return JobStorage(url=url, env=settings.storage.environment(),
                      executor_env=settings.storage.environment(executors=True))


def _log_line(log: Any, line: str) -> None:
    log.write(f"{line}\n".encode())
    log.flush()


def _step_counts(job_dir: Path, stop: threading.Event) -> bool:
    """Whether a step that exited 0 counts as done. Not when a cancel came while it ran: the
    runner may learn of the exit and of the cancel in the same poll, or see the exit first, so
    the order it sees them in says nothing. Decided under the lock cancel takes to leave its
    marker (before it signals anyone): a cancel either came first and the job is cancelled, or
    it finds the step counted and the job keeps its success."""
    with status_lock(job_dir):
        return not (stop.is_set() or (job_dir / CANCEL_FILE).exists())


def _heartbeat_interval_s() -> float:
    from rs_cluster.settings import load_settings

    try:
        timeout = load_settings().heartbeat_timeout_s
    except RsClusterError:  # a settings mistake is the steps' to report; beat at the default
        timeout = 4 * HEARTBEAT_S
    return min(HEARTBEAT_S, timeout / 4)


class _Heartbeat:
    """Refreshes ``heartbeat`` in status.json every ``interval`` seconds while the job is this
    runner's and active, so readers on other hosts can tell it lives."""

    def __init__(self, job_dir: Path, pid: int, interval: float) -> None:
        self._job_dir, self._pid, self._interval = job_dir, pid, interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="rs-heartbeat")

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=10)

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            # A beat that cannot be written (disk full, a hiccup of the shared filesystem) is
            # skipped: the next one may pass, and only a long silence makes the job failed.
            with contextlib.suppress(OSError, RsClusterError):
                update_status(self._job_dir, self._beat)

    def _beat(self, current: dict[str, Any]) -> bool:
        if current.get("state") not in ACTIVE_STATES or current.get("pid") != self._pid:
            return False
        current["heartbeat"] = utc_now()
        return True


def _close(*streams: Any) -> None:
    for stream in streams:
        with contextlib.suppress(OSError):  # a line the full disk did not take is lost
            stream.close()


def _runner_write(job_dir: Path, status: dict[str, Any]) -> bool:
    """Writes the runner's status, unless the job already ended (a terminal state is final)."""
    with status_lock(job_dir):
        if load_json(job_dir / STATUS_FILE).get("state") in TERMINAL_STATES:
            return False
        status["heartbeat"] = utc_now()  # our copy replaces the file: it must not set it back
        write_status(job_dir, status)
        return True


def _step_error(job_dir: Path, status: dict[str, Any]) -> str:
    message = _last_error(job_dir / LOG_FILE, status)
    disk_full = shutil.disk_usage(job_dir).free < _RESERVE_BYTES  # the reserve still held
    if disk_full and "no space left" not in message.lower():
        # The step's own error line may have found no room in log.txt.
        message = str(disk_full_error(None, job_dir, f"running {status.get('stage')}"))
    return message


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


def apply_event(status: dict[str, Any], event: dict[str, Any], index: int, steps: int,
                trained: dict[str, Any]) -> None:
    """Adds one event of step ``index`` (of ``steps``) to ``status``: the job's progress, its
    message (a preview's note does not take the place of the epoch's), the count of warnings and
    restarts, and the quality fields of a train finish (into ``trained`` and the verdict)."""
    kind = event.get("event")
    if kind == "progress" and event.get("percent") is not None:
        fraction = min(max(float(event["percent"]), 0.0), 100.0) / 100.0
        status["progress"] = round(100.0 * (index + fraction) / steps, 1)
    if kind in ("start", "progress", "info", "warning", "finish") and event.get("message") \
            and not event.get("preview"):
        status["message"] = str(event["message"])[:500]
    if kind == "warning":
        status["warnings"] = int(status.get("warnings") or 0) + 1
        if isinstance(event.get("restart"), int):
            # training restarted its workers from the last checkpoint after losing one
            status["restarts"] = event["restart"]
    if kind == "finish" and event.get("stage") == "train":
        trained.clear()
        trained.update(train_quality(event))
        status["verdict"] = dict(trained) if trained["verdict"] else None


def _follow_step(proc: subprocess.Popen[bytes], follower: _EventFollower, status: dict[str, Any],
                 job_dir: Path, index: int, steps: int, stop: threading.Event,
                 trained: dict[str, Any]) -> int:
    """Runs until the step's process ends, turning its events into ``status``: progress and
    message, restarts, the count of warnings, and the quality fields of a train finish event
    (into ``trained`` and, when it carries a verdict, ``status["verdict"]``)."""
    last_written = dict(status)
    while True:
        try:
            code = proc.wait(timeout=_POLL_S)
        except subprocess.TimeoutExpired:
            code = None
        for event in follower.new_events():
            apply_event(status, event, index, steps, trained)
        if status != last_written:
            if not _runner_write(job_dir, status):
                stop.set()  # the job was ended meanwhile: its steps stop too
            last_written = dict(status)
        if code is not None:
            return code
        if (job_dir / CANCEL_FILE).exists():
            stop.set()  # a cancel from another host, which cannot signal us
        if stop.is_set():
            stopped = _terminate_tree(proc.pid)
            if stopped is not None:
                return stopped


VERDICTS = ("ok", "weak")


def train_quality(event: dict[str, Any]) -> dict[str, Any]:
    """What a train stage's ``finish`` event says of the model, as status.json's ``verdict``
    holds it: ``verdict`` ("ok", "weak" or None when the event has none of those), ``reason``,
    ``advice``, ``best_val_iou`` and ``best_epoch``. The event is a line in a file any step could
    write: a field of the wrong type, a number that is not finite or an IoU outside 0..1 is left
    out (None or ""), and texts are cut to one line of 500 characters."""
    verdict = event.get("verdict")
    iou = event.get("best_val_iou")
    epoch = event.get("best_epoch")

    def text(key: str) -> str:
        value = event.get(key)
        return clean_text(value) if isinstance(value, str) else ""

    return {
        "verdict": verdict if isinstance(verdict, str) and verdict in VERDICTS else None,
        "reason": text("verdict_reason"), "advice": text("advice"),
        "best_val_iou": float(iou) if isinstance(iou, (int, float)) and not isinstance(iou, bool)
        and math.isfinite(iou) and 0.0 <= iou <= 1.0 else None,
        "best_epoch": epoch if isinstance(epoch, int) and not isinstance(epoch, bool)
        and epoch >= 1 else None,
    }


def success_message(warnings: int, trained: dict[str, Any]) -> str:
    """The message of a job that succeeded: "done", the warnings its steps gave, and for a job
    that trained, the best validation IoU and whether the model came out weak, so a user who
    reads no further than the message still learns that the model is not worth using."""
    message = "done" + (f" with {warnings} warning(s)" if warnings else "")
    if trained.get("best_val_iou") is not None:
        message += f"; best validation IoU {trained['best_val_iou']:.3f}"
        if trained.get("best_epoch") is not None:
            message += f" at epoch {trained['best_epoch']}"
    if trained.get("verdict") == "weak":
        message += "; weak model" + (f": {trained['reason']}" if trained.get("reason") else "")
    return message


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
    # A session id means something only on the runner's own host.
    session = status.get("pgid") if runner_is_here(status) and runner_alive(status) else None
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


def _terminate_tree(pid: int) -> int | None:
    """Stops the process ``pid`` and its descendants; returns its exit code (negative: the
    signal) when this reaped it. psutil reaps it, so Popen would read that exit as 0: a step
    stopped half-way must not count as finished."""
    import psutil

    try:
        parent = psutil.Process(pid)
        procs = [*parent.children(recursive=True), parent]
    except psutil.Error:
        return None
    _stop_processes(procs, grace_s=5.0)
    return getattr(parent, "returncode", None)


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


def cancel(workspace: Workspace, job_id: str, *, grace_s: float = 5.0,
           remote_wait_s: float = 30.0) -> dict[str, Any]:
    """Stops every process of the job (TERM, then KILL after ``grace_s``) and marks it cancelled;
    returns its status.

    A job that already ended keeps its state and results, and so does one whose last step had
    finished when the cancel arrived (the runner then reports it succeeded); stray processes a
    job left are stopped either way. A job whose runner is on another host is stopped by that
    runner, which polls the cancel marker: this waits up to ``remote_wait_s`` for it to end the
    job, and otherwise returns the status with a ``cancel`` note saying what will happen.
    """
    job_dir = workspace.existing_job_dir(job_id)
    if not (job_dir / STATUS_FILE).exists():
        raise JobStateError(f"job {job_id} was never submitted; there is nothing to cancel")
    with status_lock(job_dir):  # the runner decides how the job ended under the same lock
        status = load_json(job_dir / STATUS_FILE)
        if status.get("state") in ACTIVE_STATES:
            (job_dir / CANCEL_FILE).touch(mode=PRIVATE_FILE)
    if status.get("state") in ACTIVE_STATES and not runner_is_here(status):
        return _cancel_remote(job_dir, job_id, status, grace_s, remote_wait_s)
    alive = _stop_processes(job_processes(job_id, status), grace_s)
    if alive:
        raise JobStateError(f"could not stop process(es) {[p.pid for p in alive]} of job {job_id}")

    def mark(current: dict[str, Any]) -> bool:  # the runner was stopped before it could say so
        if current.get("state") not in ACTIVE_STATES:
            return False
        current.update(state="cancelled", message="cancelled", finished=utc_now())
        return True

    return _lost_runner_note(update_status(job_dir, mark), job_id)


def _cancel_remote(job_dir: Path, job_id: str, status: dict[str, Any], grace_s: float,
                   wait_s: float) -> dict[str, Any]:
    """Cancel of a job whose runner is on another host: only that runner can signal its
    processes, so this waits for it to see the marker; what runs of the job here is stopped."""
    host = status.get("host")
    _stop_processes(job_processes(job_id, status), grace_s)
    deadline = time.monotonic() + wait_s
    while True:
        status = read_status(job_dir)  # declares the job failed once its heartbeat is stale
        if status.get("state") not in ACTIVE_STATES:
            break
        if time.monotonic() >= deadline:
            status["cancel"] = (f"cancel requested: the job runner on host {host} stops the job at "
                                "its next check; if it does not, the job is declared failed once "
                                f"{host} stops sending its heartbeat")
            return status
        time.sleep(_POLL_S)
    return _lost_runner_note(status, job_id)


def _lost_runner_note(status: dict[str, Any], job_id: str) -> dict[str, Any]:
    """A job failed because its runner on another host went silent: a cancel from here cannot
    reach the steps it may have left there, and says so (``cancel``)."""
    host = status.get("host")
    if status.get("state") == "failed" and not runner_is_here(status) and \
            "heartbeat" in str(status.get("message")):
        status["cancel"] = (f"the job runner on host {host} is gone, so a cancel from here cannot "
                            f"stop the job's steps there; run `rs-cluster job cancel {job_id}` on "
                            f"{host} to stop any it left running")
    return status


def clean(workspace: Workspace, job_id: str) -> None:
    """Deletes a job folder, and the job's copy in shared storage; refused while the job runs
    (cancel it first)."""
    job_dir = workspace.existing_job_dir(job_id)
    status = read_status(job_dir) if (job_dir / STATUS_FILE).exists() else {}
    if status.get("state") in ACTIVE_STATES:
        raise JobStateError(f"job {job_id} is still running; cancel it first")
    _remove_job(job_dir, status)


def _remove_job(job_dir: Path, status: dict[str, Any]) -> None:
    """The store's copy first: if the store refuses, the job folder stays and still names it, so
    a later clean can try again (nothing is left in the store that no job folder points to)."""
    import getpass

    url = status.get("storage_url")
    # Only a URL of the runner's own shape for this job, <storage>/<user>/<job-id>, is deleted.
    if isinstance(url, str) and storage.is_url(url) and \
            url.rstrip("/").endswith(f"/{getpass.getuser()}/{job_dir.name}"):
        from rs_cluster.settings import load_settings

        os.environ.update(load_settings().storage.environment())
        storage.delete_dir(url)
    shutil.rmtree(job_dir)


_DURATION = re.compile(r"^(\d+(?:\.\d+)?)([smhdw])$")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_duration(text: str) -> float:
    """Seconds in a duration such as ``7d``, ``12h``, ``30m``, ``90s`` or ``2w``."""
    match = _DURATION.match(text.strip())
    if not match:
        raise ConfigError(f"--older-than {text!r} is not a duration: give a number and a unit "
                          "(s, m, h, d or w), e.g. 7d, 12h, 30m")
    return float(match.group(1)) * _UNIT_S[match.group(2)]


def clean_older_than(workspace: Workspace, seconds: float) -> list[dict[str, Any]]:
    """Deletes the folder of every job that ended (succeeded, failed or cancelled) more than
    ``seconds`` ago; returns their id, state and end time. A job still queued or running, or one
    never submitted, is kept however old it is."""
    removed = []
    for job_id in workspace.job_ids():
        job_dir = workspace.job_dir(job_id)
        try:
            status = read_status(job_dir)
        except (FileNotFoundError, ConfigError):
            continue  # never submitted, or its status unreadable: not known to be over
        if status.get("state") not in TERMINAL_STATES or _ended_s_ago(job_dir, status) < seconds:
            continue
        _remove_job(job_dir, status)
        removed.append({"job_id": job_id, "state": status["state"], "finished": status.get("finished")})
    return removed


def _ended_s_ago(job_dir: Path, status: dict[str, Any]) -> float:
    try:
        return _age_s(status["finished"])
    except (KeyError, TypeError, ValueError):  # no readable end time: when status.json last changed
        return time.time() - (job_dir / STATUS_FILE).stat().st_mtime


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
