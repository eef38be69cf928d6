"""The long steps of a job as ``QgsTask``s: export, upload and submit, watch, download.

``run()`` does background work only: it talks to the cluster through the QGIS-free core, checks
``isCanceled()`` between steps and calls ``setProgress``. Nothing here touches the project, a
widget or the message bar; ``finished()`` hands the outcome to the callback the controller gave,
which runs in the GUI thread. The blocking helpers at the top are shared with the Processing
algorithms, which already run off the GUI thread.
"""

from __future__ import annotations

import posixpath
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from qgis.core import (
    QgsCoordinateReferenceSystem,
    QgsCoordinateTransform,
    QgsCoordinateTransformContext,
    QgsRasterBlockFeedback,
    QgsRasterDataProvider,
    QgsRasterFileWriter,
    QgsRasterLayer,
    QgsRasterPipe,
    QgsRectangle,
    QgsTask,
)
from qgis.PyQt.QtCore import QCoreApplication, pyqtSignal

from rs_qgis_plugin.core.errors import (
    CancelledError,
    HostUnreachableError,
    RemoteCommandError,
    RsPluginError,
)
from rs_qgis_plugin.core.jobs import RemoteJobs
from rs_qgis_plugin.core.profile import ConnectionProfile
from rs_qgis_plugin.core.protocol import STATES, JobStatus, ProgressEvent
from rs_qgis_plugin.core.ssh import SshClient
from rs_qgis_plugin.core.training import TrainingHistory, preview_epoch
from rs_qgis_plugin.log import get_logger
from rs_qgis_plugin.logic import MODEL_INPUT, MODEL_OUTPUT, PlannedJob

log = get_logger("tasks")

# Dropped links while watching: reconnect this many times in a row before giving up.
RECONNECT_TRIES = 5
RECONNECT_PAUSE_S = 2.0


# Tasks that only read from the cluster: stopping them loses nothing (the cluster keeps the job
# and its results), so QGIS may stop them on exit without asking (QgisApp::fileExit asks "try
# canceling these active tasks?" about the others, and then stays open).
READ_ONLY = QgsTask.CanCancel | QgsTask.CancelWithoutPrompt


def tr(text: str) -> str:
    return QCoreApplication.translate("RsTasks", text)


def job_title(name: str, job_id: str) -> str:
    """How a task names its job in QGIS's task manager: the name the user gave, and the id."""
    return f"{name} ({job_id})" if name and name != job_id else job_id


class TaskCancelFlag:
    """The core's cancel protocol (``is_set()``) over a ``QgsTask`` (or a Processing feedback)."""

    def __init__(self, source: Any) -> None:
        self._source = source

    def is_set(self) -> bool:
        return bool(self._source.isCanceled())


def connect(profile: ConnectionProfile, known_hosts: str | Path,
            passphrase: str | None) -> SshClient:
    return SshClient(profile, known_hosts).connect(passphrase)


# -- blocking steps, shared with Processing -------------------------------------------------------
_PROCESSING_JOBS: set[str] = set()
_PROCESSING_LOCK = threading.Lock()


def processing_jobs() -> set[str]:
    """Jobs a Processing algorithm of this QGIS runs right now (in its own thread): the jobs
    panel shows them, and leaves watching and fetching them to the algorithm."""
    with _PROCESSING_LOCK:
        return set(_PROCESSING_JOBS)


@contextmanager
def run_by_processing(job_id: str) -> Iterator[None]:
    with _PROCESSING_LOCK:
        _PROCESSING_JOBS.add(job_id)
    try:
        yield
    finally:
        with _PROCESSING_LOCK:
            _PROCESSING_JOBS.discard(job_id)


def submit_planned(jobs: RemoteJobs, planned: PlannedJob, *,
                   progress: Callable[[float], None] | None = None, cancel: Any = None) -> JobStatus:
    """Uploads the inputs, reuses a training job's model on the cluster, starts the job."""
    if planned.model_job:
        # The spec only names paths inside its own job folder, so the earlier job's model is
        # put there on the cluster (nothing crosses the network) as hard links: no second copy
        # on the cluster's disk, and the model stays whole when the training job is cleaned.
        job_dir = jobs.job_dir(planned.spec.job_id)
        target = posixpath.join(job_dir, MODEL_INPUT)
        jobs.transfers.makedirs(posixpath.dirname(target))
        source = posixpath.join(jobs.job_dir(planned.model_job), MODEL_OUTPUT)
        try:
            jobs.client.run(["cp", "-al", "--", source, target], timeout=600)
        except RemoteCommandError as e:
            # Hard links cannot cross filesystems (the training job's folder on other storage)
            log.info("could not link the model of job %s (%s); copying it", planned.model_job, e)
            jobs.client.run(["rm", "-rf", "--", target], timeout=600)
            jobs.client.run(["cp", "-R", "--", source, target], timeout=600)

    def on_bytes(done: int, total: int, percent: float) -> None:
        if progress:
            progress(percent)

    return jobs.submit(planned.spec, planned.inputs, progress=on_bytes, cancel=cancel)


def watch(jobs: RemoteJobs, job_id: str, *, on_status: Callable[[JobStatus], None] | None = None,
          on_event: Callable[[ProgressEvent], None] | None = None, cancel: Any = None,
          poll_s: float = 2.0, skip_events: int = 0) -> JobStatus:
    """Follows a job to its end, reconnecting after a dropped link.

    ``on_event`` gets each event once, from number ``skip_events`` on: each (re)connection reads
    the job's events from the first, and those already passed on are skipped.
    """
    delivered = skip_events
    failures = 0
    while True:
        index = 0

        def each(event: ProgressEvent) -> None:
            nonlocal index, delivered
            index += 1
            if index > delivered:
                delivered = index
                if on_event is not None:
                    on_event(event)

        try:
            return jobs.wait(job_id, poll_s=poll_s, on_status=on_status, on_event=each,
                             cancel=cancel)
        except (EOFError, HostUnreachableError, ConnectionError) as e:
            failures += 1
            if failures > RECONNECT_TRIES:
                raise
            log.warning("connection lost while watching job %s (%s); reconnecting", job_id, e)
            end = time.monotonic() + RECONNECT_PAUSE_S
            while time.monotonic() < end:
                if cancel is not None and cancel.is_set():
                    raise CancelledError(f"stopped watching job {job_id}") from None
                time.sleep(0.1)
            try:
                jobs.client.connect()
            except (HostUnreachableError, OSError) as again:
                log.warning("reconnect failed: %s", again)


@dataclass(frozen=True)
class Reconciliation:
    """What one cluster's ``job list`` says about the jobs recorded here for its profile."""

    statuses: dict[str, JobStatus] = field(default_factory=dict)  # the cluster ran or runs them
    not_started: dict[str, str] = field(default_factory=dict)  # folder there, never started: why
    missing: frozenset[str] = frozenset()  # the cluster has no such job
    others: tuple[dict[str, Any], ...] = ()  # jobs of the workspace not recorded here


def reconcile(jobs: RemoteJobs, known: list[str], detail: set[str] | None = None) -> Reconciliation:
    """Looks the ``known`` job ids up in ``job list``; the status of those in ``detail`` (all,
    when ``None``) that the cluster has is read too."""
    listed = {entry["job_id"]: entry for entry in jobs.list()}
    statuses, not_started, missing = {}, {}, set()
    for job_id in known:
        entry = listed.get(job_id)
        if entry is None:
            missing.add(job_id)
        elif entry.get("state") not in STATES:  # "new": a spec, never submitted; "unknown"
            not_started[job_id] = str(entry.get("message") or entry.get("state"))
        elif detail is None or job_id in detail:
            statuses[job_id] = jobs.status(job_id)
    recorded = set(known)
    others = tuple(entry for job_id, entry in listed.items() if job_id not in recorded)
    return Reconciliation(statuses, not_started, frozenset(missing), others)


def fetch(jobs: RemoteJobs, job_id: str, paths: tuple[str, ...], local_dir: str | Path, *,
          progress: Callable[[float], None] | None = None, cancel: Any = None) -> list[Path]:
    """Downloads the results into a temporary folder, then moves them into place, so a
    cancelled or broken download never leaves partial results where they would be loaded."""
    final = Path(local_dir)
    staging = final.parent / f".{final.name}.partial"

    def on_bytes(done: int, total: int, percent: float) -> None:
        if progress:
            progress(percent)

    # Only what the job says it produced (an evaluation without polygons has none, say).
    results = jobs.status(job_id).results
    present = [p for p in paths if any(p == r or p.startswith(r + "/") for r in results)]
    files = jobs.fetch_outputs(job_id, staging, present, progress=on_bytes, cancel=cancel)
    final.mkdir(parents=True, exist_ok=True)
    moved = []
    for f in files:
        target = final / f.relative_to(staging)
        target.parent.mkdir(parents=True, exist_ok=True)
        f.replace(target)
        moved.append(target)
    return moved


# -- tasks ------------------------------------------------------------------------------------------
class RsTask(QgsTask):
    """Runs :meth:`work` in the background; ``finished`` calls ``on_done(task)`` in the GUI thread.

    After ``run``: ``self.error`` holds the exception that stopped it (``None`` when it worked or
    was cancelled), ``self.result`` what :meth:`work` returned.
    """

    def __init__(self, description: str, on_done: Callable[[RsTask], None] | None = None,
                 flags: Any = QgsTask.CanCancel) -> None:
        super().__init__(description, flags)
        self.on_done = on_done
        self.error: BaseException | None = None
        self.result: Any = None
        self.cancel_flag = TaskCancelFlag(self)
        # Set once run() is over: QGIS closing waits on it, so no task still runs Python code
        # while QGIS unloads the plugins and ends Python.
        self.ran = threading.Event()

    def wait_ran(self, timeout_s: float) -> bool:
        """Waits (releasing the GIL, unlike ``waitForFinished``) until ``run`` is over, or the
        task manager has dropped a task it never started; ``False`` on timeout."""
        end = time.monotonic() + timeout_s
        while not self.ran.is_set():
            try:
                if self.status() in (QgsTask.Complete, QgsTask.Terminated):
                    return True
            except RuntimeError:  # the task manager deleted it: it has ended
                return True
            if time.monotonic() > end:
                return False
            time.sleep(0.05)
        return True

    def work(self) -> Any:
        raise NotImplementedError

    def run(self) -> bool:
        try:
            return self._run()
        finally:
            self.ran.set()

    def _run(self) -> bool:
        try:
            self.result = self.work()
        except CancelledError as e:
            log.info("%s: %s", self.description(), e)
            return False
        except Exception as e:  # noqa: BLE001 - the edge: every failure reaches the user
            if self.isCanceled():
                log.info("%s: cancelled (%s)", self.description(), e)
                return False
            self.error = e
            log.error("%s failed: %s", self.description(), e, exc_info=not isinstance(e, RsPluginError))
            return False
        return not self.isCanceled()

    def finished(self, result: bool) -> None:  # noqa: FBT001 - QgsTask's signature
        # Dropped once called: a finished task no longer keeps its caller (the controller) alive
        on_done, self.on_done = self.on_done, None
        if on_done is not None:
            on_done(self)


# QgsRasterFileWriter.WriterError, in words: what the analyst can act on
WRITER_ERRORS = {
    1: "the layer's data could not be read (is its source still reachable?)",
    2: "GDAL could not write the GeoTIFF",
    3: "the GeoTIFF could not be created (is the folder writable, the disk not full?)",
    4: "writing the GeoTIFF failed (is the disk full?)",
    5: "the layer's no-data value does not fit the output type",
}


class ExportRasterTask(RsTask):
    """Writes a raster layer that is no local file (WMS, VRT, virtual) to a GeoTIFF.

    The provider is cloned in the constructor (GUI thread); ``run`` only reads the clone.
    """

    def __init__(self, layer: QgsRasterLayer, target: str | Path, *,
                 extent: QgsRectangle | None = None, extent_crs: Any = None,
                 units_per_pixel: float | None = None,
                 transform_context: QgsCoordinateTransformContext | None = None,
                 on_done: Callable[[RsTask], None] | None = None) -> None:
        super().__init__(tr("Export {name} to GeoTIFF").format(name=layer.name()), on_done)
        self.layer_id = layer.id()
        self.layer_name = layer.name()
        self.target = Path(target)
        self.crs = QgsCoordinateReferenceSystem(layer.crs())
        provider = layer.dataProvider().clone()
        self.pipe = QgsRasterPipe()
        if not self.pipe.set(provider):
            raise RsPluginError(f"cannot read layer {layer.name()} for export")
        full = layer.extent()
        if extent is not None:
            if extent_crs is not None and extent_crs != self.crs:
                ct = QgsCoordinateTransform(extent_crs, self.crs,
                                            transform_context or QgsCoordinateTransformContext())
                extent = ct.transformBoundingBox(extent)
            extent = extent.intersect(full)
            if extent.isEmpty():
                raise RsPluginError(f"layer {layer.name()} does not overlap the chosen extent")
        self.extent = QgsRectangle(extent if extent is not None else full)
        if provider.capabilities() & QgsRasterDataProvider.Size and layer.width() > 0:
            # native resolution
            ux = full.width() / layer.width()
            uy = full.height() / layer.height()
        else:
            ux = uy = units_per_pixel or (self.extent.width() / 2048.0)
        self.cols = max(1, round(self.extent.width() / ux))
        self.rows = max(1, round(self.extent.height() / uy))
        self.transform_context = transform_context or QgsCoordinateTransformContext()
        self.feedback = QgsRasterBlockFeedback()

    def cancel(self) -> None:
        self.feedback.cancel()
        super().cancel()

    def work(self) -> Path:
        self.target.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.target.with_name(self.target.stem + ".part.tif")
        self.feedback.progressChanged.connect(self.setProgress)
        writer = QgsRasterFileWriter(str(tmp))
        writer.setOutputFormat("GTiff")
        # BigTIFF where the export could pass a classic TIFF's 4 GB (GDAL decides from its size)
        writer.setCreateOptions(["COMPRESS=DEFLATE", "TILED=YES", "BIGTIFF=IF_SAFER"])
        err = writer.writeRaster(self.pipe, self.cols, self.rows, self.extent, self.crs,
                                 self.transform_context, self.feedback)
        if self.isCanceled() or self.feedback.isCanceled():
            tmp.unlink(missing_ok=True)
            raise CancelledError(f"export of {self.layer_name} cancelled")
        if err != QgsRasterFileWriter.NoError:
            tmp.unlink(missing_ok=True)
            raise RsPluginError(f"could not export layer {self.layer_name} to {self.target}: "
                                f"{WRITER_ERRORS.get(int(err), f'GDAL writer error {int(err)}')}")
        tmp.replace(self.target)
        self.setProgress(100.0)
        return self.target


class _RemoteTask(RsTask):
    """A task that opens its own SSH connection (paramiko objects stay in one thread)."""

    def __init__(self, description: str, profile: ConnectionProfile, known_hosts: str | Path,
                 passphrase: str | None, on_done: Callable[[RsTask], None] | None = None,
                 flags: Any = QgsTask.CanCancel) -> None:
        super().__init__(description, on_done, flags)
        self.profile = profile
        self.known_hosts = Path(known_hosts)
        self._passphrase = passphrase

    @contextmanager
    def remote_jobs(self) -> Iterator[RemoteJobs]:
        """The cluster's jobs over this task's own SSH connection, closed when the block ends."""
        jobs = RemoteJobs(connect(self.profile, self.known_hosts, self._passphrase))
        try:
            yield jobs
        finally:
            jobs.client.close()


class EnvTask(_RemoteTask):
    """"Test connection": connects and returns what ``rs-cluster env`` reports; with ``probe``
    ("Probe cluster"), ``rs-cluster env --probe``, which also runs a tiny Spark job and reports
    the executors and what is wrong (``result["probe"]``)."""

    def __init__(self, profile: ConnectionProfile, known_hosts: str | Path, passphrase: str | None,
                 on_done: Callable[[RsTask], None] | None = None, *, probe: bool = False) -> None:
        description = (tr("Probe the cluster {host}") if probe
                       else tr("Test connection to {host}")).format(host=profile.host)
        super().__init__(description, profile, known_hosts, passphrase, on_done, READ_ONLY)
        self.probe = probe

    def work(self) -> dict[str, Any]:
        with self.remote_jobs() as jobs:
            return jobs.env(probe=self.probe, cancel=self.cancel_flag)


class LogTailTask(_RemoteTask):
    """The last lines of a job's log on the cluster, for the jobs panel's details."""

    def __init__(self, profile: ConnectionProfile, known_hosts: str | Path, passphrase: str | None,
                 job_id: str, *, lines: int = 50, name: str = "",
                 on_done: Callable[[RsTask], None] | None = None) -> None:
        super().__init__(tr("Log of cluster job {name} ({job})").format(name=name or job_id,
                                                                        job=job_id),
                         profile, known_hosts, passphrase, on_done, READ_ONLY)
        self.job_id = job_id
        self.lines = lines

    def work(self) -> list[str]:
        with self.remote_jobs() as jobs:
            return jobs.log_tail(self.job_id, self.lines)


class SubmitJobTask(_RemoteTask):
    """Uploads the inputs (progress = bytes sent) and starts the job; ``result`` is its status
    whenever the job started, even if the task was cancelled.

    Cancelled after the job started, it cancels the job on the cluster too: ``result`` is then
    the cancelled status, or, when that cancel failed, the running one with ``cancel_error``
    saying why. ``uncertain``: it failed once connected, where the cluster may have received
    and started the job anyway (the link dropped during ``job submit``); look it up.
    """

    def __init__(self, profile: ConnectionProfile, known_hosts: str | Path, passphrase: str | None,
                 planned: PlannedJob, on_done: Callable[[RsTask], None] | None = None) -> None:
        super().__init__(tr("Upload and start {job}").format(
            job=job_title(planned.spec.name, planned.spec.job_id)), profile, known_hosts,
            passphrase, on_done)
        self.planned = planned
        self.job_id = planned.spec.job_id
        self.uncertain = False
        self.cancel_error: BaseException | None = None

    def work(self) -> JobStatus:
        with self.remote_jobs() as jobs:
            try:
                status = submit_planned(jobs, self.planned, progress=self.setProgress,
                                        cancel=self.cancel_flag)
            except CancelledError:
                raise  # before the spec went up: the cluster has no job
            except Exception:
                self.uncertain = True
                raise
            if self.isCanceled():
                try:
                    status = jobs.cancel(self.job_id)
                except Exception as e:  # noqa: BLE001 - reported, and the job is followed
                    log.error("job %s started, but cancelling it failed: %s", self.job_id, e)
                    self.cancel_error = e
            return status


class WatchJobTask(_RemoteTask):
    """Follows a job until it ends; ``status_changed`` carries each new status to the GUI, and
    ``event_received`` each event of the job (job id, :class:`ProgressEvent`) from number
    ``skip_events`` on.

    ``cancel()``, which QGIS's task manager calls (QGIS closing, the task panel's cancel
    button), and ``detach()`` only stop watching: the job keeps running on the cluster, its
    record stays, and a later Refresh or QGIS start follows it again. Only ``cancel_job()``
    (the plugin's *Cancel job*) cancels the job on the cluster as well.
    """

    status_changed = pyqtSignal(object)
    event_received = pyqtSignal(str, object)
    preview_fetched = pyqtSignal(str, str)  # job id, the local PNG

    def __init__(self, profile: ConnectionProfile, known_hosts: str | Path, passphrase: str | None,
                 job_id: str, on_done: Callable[[RsTask], None] | None = None,
                 poll_s: float = 2.0, skip_events: int = 0, name: str = "",
                 previews_dir: str | Path | None = None) -> None:
        super().__init__(tr("Cluster job {job}").format(job=job_title(name, job_id)), profile,
                         known_hosts, passphrase, on_done, READ_ONLY)
        self.job_id = job_id
        self.poll_s = poll_s
        self.skip_events = skip_events
        # Where a training preview named by an event is downloaded as it comes (None: not)
        self.previews_dir = None if previews_dir is None else Path(previews_dir)
        self._jobs: RemoteJobs | None = None
        self.cancel_remote = False
        self.remote_cancelled: JobStatus | None = None

    def cancel_job(self) -> None:
        """The user's *Cancel job*: stops watching and cancels the job on the cluster."""
        self.cancel_remote = True
        super().cancel()

    def cancel(self) -> None:
        # QgsTask's virtual: what QGIS's task manager calls (cancelAll on exit, the task panel).
        # It never reaches the cluster; a Cancel job asked for before is kept.
        super().cancel()

    def detach(self) -> None:
        """Stops watching; the job keeps running (the plugin unloading, QGIS closing)."""
        self.cancel()

    def _status(self, status: JobStatus) -> None:
        self.setProgress(status.progress)
        self.status_changed.emit(status)

    def _event(self, event: ProgressEvent) -> None:
        self.event_received.emit(self.job_id, event)
        preview = event.extra.get("preview")
        if self.previews_dir is not None and self._jobs is not None \
                and preview_epoch(preview) is not None:
            local = fetch_preview(self._jobs, self.job_id, preview, self.previews_dir,
                                  cancel=self.cancel_flag)
            if local is not None:
                self.preview_fetched.emit(self.job_id, str(local))

    def work(self) -> JobStatus:
        with self.remote_jobs() as jobs:
            self._jobs = jobs
            try:
                return watch(jobs, self.job_id, on_status=self._status, on_event=self._event,
                             cancel=self.cancel_flag, poll_s=self.poll_s,
                             skip_events=self.skip_events)
            except CancelledError:
                if self.cancel_remote:
                    self.remote_cancelled = jobs.cancel(self.job_id)
                    self.status_changed.emit(self.remote_cancelled)
                raise


def fetch_preview(jobs: RemoteJobs, job_id: str, rel: str, local_dir: Path, *,
                  cancel: Any = None) -> Path | None:
    """One training preview into ``local_dir``, or None when it cannot be had: a preview is only
    a picture of the progress, so its failure (a refused name, a lost file) is logged, never
    the end of watching the job."""
    try:
        return jobs.fetch_preview(job_id, rel, local_dir, cancel=cancel)
    except CancelledError:
        raise
    except (RsPluginError, OSError) as e:
        log.warning("job %s: preview %s not fetched: %s", job_id, rel, e)
        return None


class TrainingTask(_RemoteTask):
    """All a job's events (its training chart after a QGIS restart), and its newest preview
    downloaded into ``previews_dir``. ``result``: (events, local preview or None)."""

    def __init__(self, profile: ConnectionProfile, known_hosts: str | Path, passphrase: str | None,
                 job_id: str, previews_dir: str | Path, *, name: str = "",
                 on_done: Callable[[RsTask], None] | None = None) -> None:
        super().__init__(tr("Training history of {job}").format(job=job_title(name, job_id)),
                         profile, known_hosts, passphrase, on_done, READ_ONLY)
        self.job_id = job_id
        self.previews_dir = Path(previews_dir)

    def work(self) -> tuple[list[ProgressEvent], Path | None]:
        with self.remote_jobs() as jobs:
            events, _ = jobs.events(self.job_id, 0)
            history = TrainingHistory.from_events(events)
            preview = None
            if history.preview is not None:
                preview = self.previews_dir.joinpath(*history.preview.split("/"))
                if not preview.is_file():
                    preview = fetch_preview(jobs, self.job_id, history.preview,
                                            self.previews_dir, cancel=self.cancel_flag)
            return events, preview


class CancelJobTask(_RemoteTask):
    def __init__(self, profile: ConnectionProfile, known_hosts: str | Path, passphrase: str | None,
                 job_id: str, on_done: Callable[[RsTask], None] | None = None,
                 name: str = "") -> None:
        super().__init__(tr("Cancel cluster job {job}").format(job=job_title(name, job_id)),
                         profile, known_hosts, passphrase, on_done)
        self.job_id = job_id

    def work(self) -> JobStatus:
        with self.remote_jobs() as jobs:
            return jobs.cancel(self.job_id)


class ReconcileTask(_RemoteTask):
    """Reads one cluster's ``job list`` for the jobs recorded for its profile (``known``), with
    the status of those in ``detail``; ``result`` is a :class:`Reconciliation`. ``candidates``
    are the jobs the caller will act on (those nothing else was busy with)."""

    def __init__(self, profile: ConnectionProfile, known_hosts: str | Path, passphrase: str | None,
                 known: list[str], detail: set[str], candidates: set[str] | None = None,
                 on_done: Callable[[RsTask], None] | None = None) -> None:
        super().__init__(tr("Look up the jobs on {profile}").format(profile=profile.name),
                         profile, known_hosts, passphrase, on_done, READ_ONLY)
        self.profile_name = profile.name
        self.known = list(known)
        self.detail = set(detail)
        self.candidates = set(known if candidates is None else candidates)

    def work(self) -> Reconciliation:
        with self.remote_jobs() as jobs:
            return reconcile(jobs, self.known, self.detail)


class CleanJobTask(_RemoteTask):
    """Deletes a finished job's folder on the cluster (``rs-cluster job clean``); ``result`` is
    ``True`` once the folder is gone, also when it was gone already."""

    def __init__(self, profile: ConnectionProfile, known_hosts: str | Path, passphrase: str | None,
                 job_id: str, on_done: Callable[[RsTask], None] | None = None,
                 name: str = "") -> None:
        super().__init__(tr("Delete cluster job {job}").format(job=job_title(name, job_id)),
                         profile, known_hosts, passphrase, on_done)
        self.job_id = job_id

    def work(self) -> bool:
        with self.remote_jobs() as jobs:
            try:
                jobs.clean(self.job_id)
            except RemoteCommandError as e:
                if f"no job {self.job_id!r}" not in str(e):
                    raise
                log.info("job %s: nothing to delete on the cluster (%s)", self.job_id, e)
        return True


class FetchResultsTask(_RemoteTask):
    """Downloads a finished job's results; ``result`` is the list of local files."""

    def __init__(self, profile: ConnectionProfile, known_hosts: str | Path, passphrase: str | None,
                 job_id: str, paths: tuple[str, ...], local_dir: str | Path,
                 on_done: Callable[[RsTask], None] | None = None, name: str = "") -> None:
        # Read-only too: a download stopped on exit is fetched again at the next start.
        super().__init__(tr("Download results of {job}").format(job=job_title(name, job_id)),
                         profile, known_hosts, passphrase, on_done, READ_ONLY)
        self.job_id = job_id
        self.paths = paths
        self.local_dir = Path(local_dir)

    def work(self) -> list[Path]:
        with self.remote_jobs() as jobs:
            status = jobs.status(self.job_id)  # fetch() reads it again; cheap, and keeps it simple
            if status.state != "succeeded":
                raise RemoteCommandError(f"job {self.job_id} is {status.state}, not succeeded: "
                                         f"{status.message or 'nothing to download'}")
            return fetch(jobs, self.job_id, self.paths, self.local_dir,
                         progress=self.setProgress, cancel=self.cancel_flag)
