"""Runs jobs from start to map: chains the tasks, keeps the job records, reports to the user.

Lives in the GUI thread. Task callbacks (``on_done``) and the watch task's ``status_changed``
signal arrive here in the GUI thread too, so this is where records are saved, layers loaded and
messages shown.
"""

from __future__ import annotations

import html
import time
from collections import deque
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Sequence

from qgis.core import (
    Qgis,
    QgsApplication,
    QgsCoordinateReferenceSystem,
    QgsProject,
    QgsRasterLayer,
    QgsRectangle,
    QgsTask,
)
from qgis.PyQt.QtCore import QCoreApplication, QObject, pyqtSignal, pyqtSlot
from qgis.PyQt.QtWidgets import QMessageBox

from rs_qgis_plugin import settings
from rs_qgis_plugin.core.errors import (
    RemoteCommandError,
    RsPluginError,
    SpecError,
    UnknownHostKeyError,
)
from rs_qgis_plugin.core.jobspec import new_job_id
from rs_qgis_plugin.core.profile import ConnectionProfile
from rs_qgis_plugin.core.protocol import STATES, TERMINAL_STATES, JobStatus, ProgressEvent
from rs_qgis_plugin.log import get_logger
from rs_qgis_plugin.logic import (
    MODEL_OUTPUT,
    PREDICTIONS,
    REPORT,
    TRAINING_MODES,
    WEB_PROVIDERS,
    JobRecord,
    PlannedJob,
    RasterPick,
    RunParams,
    classify_results,
    layer_upload_path,
    now_iso,
    plan_job,
    safe_stem,
    spec_parameters,
    verdict_text,
)
from rs_qgis_plugin.core.training import TrainingHistory
from rs_qgis_plugin.results import load_results
from rs_qgis_plugin.tasks import (
    CancelJobTask,
    CleanJobTask,
    ExportRasterTask,
    FetchResultsTask,
    LogTailTask,
    ReconcileTask,
    Reconciliation,
    RsTask,
    SubmitJobTask,
    TrainingTask,
    WatchJobTask,
    processing_jobs,
)

log = get_logger("controller")
TITLE = "RS Buildings"
EVENTS_KEPT = 50
LOG_LINES = 50  # of a job's log in the jobs panel's details
HISTORY_RETRY_S = 60.0  # a training history that could not be read is asked for again after this


def tr(text: str) -> str:
    return QCoreApplication.translate("JobController", text)


@dataclass
class LayerPick:
    """A row of the dock: an imagery layer, its reference mask (optional), predict it or not."""

    image: QgsRasterLayer
    mask: QgsRasterLayer | None = None
    predict: bool = True
    validate: bool = False  # training: this pair is the validation split (chosen, not drawn)


@dataclass
class PreparedRun:
    planned: PlannedJob
    exports: list[ExportRasterTask]


@dataclass(frozen=True)
class ClusterJob:
    """A job of a profile's workspace that no record here knows (started from another computer,
    by hand, or by a QGIS profile that was reset): listed, and adopted only on request."""

    profile: str
    job_id: str
    name: str = ""
    state: str = ""
    progress: float = 0.0
    message: str = ""
    submitted: str = ""

    @classmethod
    def from_entry(cls, profile: str, entry: dict[str, Any]) -> ClusterJob:
        def text(key: str) -> str:
            value = entry.get(key)
            return value if isinstance(value, str) else ""

        progress = entry.get("progress")
        return cls(profile, entry["job_id"], text("name"), text("state"),
                   float(progress) if isinstance(progress, (int, float)) else 0.0,
                   text("message"), text("submitted"))

    @property
    def adoptable(self) -> bool:
        return self.state in ("queued", "running", "succeeded")


class JobController(QObject):
    jobs_changed = pyqtSignal()
    training_changed = pyqtSignal(str)  # job id: its training history or preview changed
    results_loaded = pyqtSignal(str, list)  # job id, layers
    _saved_elsewhere = pyqtSignal(str)  # emitted in any thread, handled in the GUI thread

    def __init__(self, iface: Any, project: QgsProject | None = None, *,
                 task_manager: Any = None, poll_s: float = 2.0) -> None:
        super().__init__()
        self.iface = iface
        self._project = project
        self.task_manager = task_manager or QgsApplication.taskManager()
        self.poll_s = poll_s
        self._records: dict[str, JobRecord] = {r.job_id: r for r in settings.load_jobs()}
        self.tasks: dict[str, RsTask] = {}
        self._lookups: dict[str, ReconcileTask] = {}  # profile name -> its job list being read
        self._cluster_only: dict[str, ClusterJob] = {}
        self._cancel_when_found: set[str] = set()
        self._look_again: set[str] = set()
        self._closing = False
        # The last events of each job seen in this session, for the jobs panel's details
        # (kept in memory: the record keeps counts and the last warnings).
        self._events: dict[str, deque[str]] = {}
        self._logs: dict[str, list[str]] = {}  # the log tail last read of each job
        self._log_tasks: dict[str, LogTailTask] = {}
        # Each training job's events that draw its chart (metrics, restarts, resources,
        # previews), as received or read again from the first; the newest preview's local file.
        self._training_events: dict[str, list[ProgressEvent]] = {}
        self._histories: dict[str, TrainingHistory] = {}
        self._previews: dict[str, str] = {}
        self._history_read: set[str] = set()  # jobs whose events were all read this session
        self._history_failed: dict[str, float] = {}  # job -> when reading them last failed
        self._training_tasks: dict[str, TrainingTask] = {}
        # Processing algorithms record their jobs from a worker thread: show them here too.
        self._saved_elsewhere.connect(self._on_saved)
        settings.add_job_listener(self._job_saved)

    @property
    def project(self) -> QgsProject:
        # Looked up when needed rather than held: a controller left in a reference cycle (a
        # task's callback) would otherwise take QGIS's project wrapper into the garbage
        # collector, which clears the Python connections of every project signal.
        return self._project if self._project is not None else QgsProject.instance()

    # -- records ------------------------------------------------------------------------------------
    def records(self) -> list[JobRecord]:
        return sorted(self._records.values(), key=lambda r: r.created or r.job_id, reverse=True)

    def record(self, job_id: str) -> JobRecord:
        return self._records[job_id]

    def _update(self, record: JobRecord) -> JobRecord:
        self._records[record.job_id] = record
        settings.save_job(record)
        self.jobs_changed.emit()
        return record

    def recent_events(self, job_id: str) -> list[str]:
        """The last events of the job this session received (oldest first), as plain text."""
        return list(self._events.get(job_id, ()))

    def log_tail(self, job_id: str) -> list[str] | None:
        """The job's log tail as last read from the cluster (None: not read in this session)."""
        return self._logs.get(job_id)

    def fetch_log(self, job_id: str, lines: int = LOG_LINES) -> LogTailTask | None:
        """Reads the last ``lines`` lines of the job's log on the cluster, in a task."""
        record = self._records.get(job_id)
        if record is None or record.gone or job_id in self._log_tasks:
            return None
        profile, passphrase = self.connection(record.profile)
        task = LogTailTask(profile, settings.known_hosts_path(), passphrase, job_id, lines=lines,
                           name=record.name, on_done=self._log_read)
        self._log_tasks[job_id] = task
        self.task_manager.addTask(task)
        return task

    def _log_read(self, task: RsTask) -> None:
        assert isinstance(task, LogTailTask)
        self._log_tasks.pop(task.job_id, None)
        if task.error is not None:
            self._logs[task.job_id] = [tr("(the log could not be read: {reason})").format(
                reason=task.error)]
        elif task.result is not None:
            self._logs[task.job_id] = list(task.result)
        self.jobs_changed.emit()

    # -- training history --------------------------------------------------------------------------
    def previews_dir(self, job_id: str) -> Path:
        """Where the job's training previews are downloaded: its results folder's previews/."""
        record = self._records.get(job_id)
        return Path(record.local_dir if record is not None and record.local_dir
                    else settings.results_dir() / job_id)

    def training(self, job_id: str) -> tuple[TrainingHistory | None, str | None]:
        """The job's training history as known in this session, and its newest preview's local
        file (either None when there is none yet)."""
        return self._histories.get(job_id), self._previews.get(job_id)

    def load_training(self, job_id: str) -> TrainingTask | None:
        """Reads all the job's events (and its newest preview) in a task, once a session: after
        a QGIS restart the events received live start where the last session stopped."""
        record = self._records.get(job_id)
        if record is None or record.gone or record.mode not in TRAINING_MODES \
                or job_id in self._history_read or job_id in self._training_tasks \
                or record.state in ("exporting", "uploading", "error"):
            return None
        if time.monotonic() - self._history_failed.get(job_id, -HISTORY_RETRY_S) < HISTORY_RETRY_S:
            return None  # the panel asks at every refresh: a failing cluster is asked less often
        try:
            profile, passphrase = self.connection(record.profile)
        except RsPluginError:
            return None  # said where the job is watched; the chart waits for its events
        task = TrainingTask(profile, settings.known_hosts_path(), passphrase, job_id,
                            self.previews_dir(job_id), name=record.name,
                            on_done=self._training_read)
        self._training_tasks[job_id] = task
        self.task_manager.addTask(task)
        return task

    def _training_read(self, task: RsTask) -> None:
        assert isinstance(task, TrainingTask)
        self._training_tasks.pop(task.job_id, None)
        if self._closing or task.result is None:
            if task.error is not None:
                self._history_failed[task.job_id] = time.monotonic()
                log.warning("training history of job %s not read: %s", task.job_id, task.error)
            return
        events, preview = task.result
        self._history_read.add(task.job_id)
        # Adding an event twice changes nothing: those received live meanwhile are kept.
        self._training_events[task.job_id] = [*events, *self._training_events.get(task.job_id, [])]
        self._histories[task.job_id] = TrainingHistory.from_events(
            self._training_events[task.job_id])
        if preview is not None:
            self._previews.setdefault(task.job_id, str(preview))
            self._newest_preview(task.job_id, str(preview))
        self.training_changed.emit(task.job_id)

    def show_recorded_training(self, record: JobRecord, events: Sequence[ProgressEvent],
                               preview: str | None) -> None:
        """Shows a job from its recorded events and a preview file, without a cluster (the
        README's screenshot replays a real job this way)."""
        self._update(record)
        self._history_read.add(record.job_id)
        self._training_events[record.job_id] = list(events)
        self._histories[record.job_id] = TrainingHistory.from_events(events)
        if preview is not None:
            self._previews[record.job_id] = preview
        self.training_changed.emit(record.job_id)

    def _newest_preview(self, job_id: str, path: str) -> None:
        current = self._previews.get(job_id)
        if current is None or Path(path).name >= Path(current).name:  # epoch-NNNN.png
            self._previews[job_id] = path

    @pyqtSlot(str, str)
    def _on_preview(self, job_id: str, path: str) -> None:
        if not self._closing:
            self._newest_preview(job_id, path)
            self.training_changed.emit(job_id)

    def _training_event(self, job_id: str, event: ProgressEvent) -> None:
        if event.stage != "train" or event.event not in ("metrics", "warning", "info"):
            return
        self._training_events.setdefault(job_id, []).append(event)
        history = self._histories.setdefault(job_id, TrainingHistory())
        if history.add(event):
            self.training_changed.emit(job_id)

    def cluster_jobs(self) -> list[ClusterJob]:
        """Jobs the last look at each cluster found there that no record here knows."""
        return sorted(self._cluster_only.values(), key=lambda j: j.submitted or j.job_id,
                      reverse=True)

    def cluster_job(self, job_id: str) -> ClusterJob | None:
        return self._cluster_only.get(job_id)

    def _job_saved(self, job_id: str) -> None:
        self._saved_elsewhere.emit(job_id)  # queued to the GUI thread when saved in another

    @pyqtSlot(str)
    def _on_saved(self, job_id: str) -> None:
        """A record saved or forgotten elsewhere (a Processing algorithm); our own saves read
        back the same record and change nothing."""
        if self._closing:
            return
        saved = settings.load_job(job_id)
        if saved == self._records.get(job_id) and (saved is None or saved.origin != "processing"):
            return
        if saved is None:
            self._records.pop(job_id, None)
        else:
            self._records[job_id] = saved
            self._cluster_only.pop(job_id, None)
        self.jobs_changed.emit()

    def forget(self, job_id: str, *, delete_on_cluster: bool = False) -> CleanJobTask | None:
        """Drops the record (or the listed cluster job); with ``delete_on_cluster``, only once
        a task has deleted the job's folder on the cluster (``rs-cluster job clean``)."""
        if job_id in self.active_job_ids():
            raise SpecError(tr("the job is still busy here; cancel it first"))
        record, listed = self._records.get(job_id), self._cluster_only.get(job_id)
        if not delete_on_cluster:
            self._drop_record(job_id)
            return None
        profile_name = record.profile if record is not None else listed.profile if listed else ""
        profile, passphrase = self.connection(profile_name)
        name = record.name if record is not None else listed.name if listed else ""
        task = CleanJobTask(profile, settings.known_hosts_path(), passphrase, job_id,
                            on_done=self._cleaned, name=name)
        self.tasks[job_id] = task
        self.task_manager.addTask(task)
        self.jobs_changed.emit()
        return task

    def _drop_record(self, job_id: str) -> None:
        self._cluster_only.pop(job_id, None)
        if self._records.pop(job_id, None) is not None:
            settings.forget_job(job_id)
        self.jobs_changed.emit()

    def _cleaned(self, task: RsTask) -> None:
        assert isinstance(task, CleanJobTask)
        self._drop_task(task.job_id, task)
        record, listed = self._records.get(task.job_id), self._cluster_only.get(task.job_id)
        name = record.name if record else listed.name if listed and listed.name else task.job_id
        if task.result:
            self._drop_record(task.job_id)
            self.notify(tr("Job {name} forgotten, and its folder deleted on the cluster").format(
                name=name))
        elif task.error is not None:
            self.notify(tr("Could not delete the folder of job {name} on the cluster: {reason}. "
                           "The job stays in the list.").format(name=name, reason=task.error),
                        Qgis.Critical, 0)

    def active_job_ids(self) -> list[str]:
        """Jobs something is busy with: a task here, a look-up on the cluster, Processing."""
        looked_up = {j for task in self._lookups.values() for j in task.candidates}
        running = processing_jobs()
        return [*self.tasks, *(sorted((looked_up | running) - set(self.tasks)))]

    # -- messages -----------------------------------------------------------------------------------
    def notify(self, text: str, level: Any = Qgis.Info, duration: int = 8) -> None:
        """Pushes ``text`` as plain text: the message bar renders rich text and opens links,
        and messages embed what the cluster said (status messages, its error output)."""
        if self.iface is not None and not self._closing:
            self.iface.messageBar().pushMessage(tr(TITLE), html.escape(text, quote=False),
                                                level, duration)

    # -- connections ----------------------------------------------------------------------------------
    @staticmethod
    def connection(profile_name: str) -> tuple[ConnectionProfile, str | None]:
        """The profile and its passphrase (read here, in the GUI thread, from QGIS's auth DB)."""
        profile = settings.load_profile(profile_name)
        return profile, settings.load_passphrase(settings.profile_authcfg(profile_name))

    # -- starting a job -------------------------------------------------------------------------------
    def prepare(self, name: str, params: RunParams, picks: Sequence[LayerPick], *,
                job_id: str | None = None, clip_extent: QgsRectangle | None = None,
                clip_crs: QgsCoordinateReferenceSystem | None = None,
                units_per_pixel: float | None = None) -> PreparedRun:
        """Decides which layers are exported first and builds the job spec (no I/O yet)."""
        job_id = job_id or new_job_id()
        export_dir = settings.results_dir() / job_id / "exports"
        exports: list[ExportRasterTask] = []
        exported: dict[str, str] = {}

        def local(layer: QgsRasterLayer) -> str:
            if layer.id() in exported:
                return exported[layer.id()]
            if clip_extent is None and layer.providerType() in WEB_PROVIDERS:
                # Its advertised extent is often a continent or the world: 2048 px across that
                # is no imagery to find buildings in, and nothing would say so.
                raise SpecError(tr(
                    "{name} is a web map layer ({provider}): it has no resolution of its own to "
                    "export at. Tick \"Clip to the current map extent\" (the map's scale sets the "
                    "resolution) or clip to a polygon layer's extent.").format(
                    name=layer.name(), provider=layer.providerType()))
            path = None if clip_extent is not None else layer_upload_path(layer)
            if path is None:
                target = export_dir / str(len(exports) + 1) / f"{safe_stem(layer.name())}.tif"
                exports.append(ExportRasterTask(
                    layer, target, extent=clip_extent, extent_crs=clip_crs,
                    units_per_pixel=units_per_pixel,
                    transform_context=self.project.transformContext()))
                path = str(target)
            exported[layer.id()] = path
            return path

        raster_picks = [RasterPick(local(p.image), local(p.mask) if p.mask else None, p.predict,
                                   p.validate) for p in picks]
        planned = plan_job(name, params, raster_picks, job_id=job_id)
        return PreparedRun(planned, exports)

    def start(self, profile_name: str, run: PreparedRun, mode: str) -> SubmitJobTask:
        profile, passphrase = self.connection(profile_name)
        spec = run.planned.spec
        record = self._update(JobRecord(
            job_id=spec.job_id, name=spec.name, profile=profile_name, mode=mode,
            state="exporting" if run.exports else "uploading", created=now_iso(),
            local_dir=str(settings.results_dir() / spec.job_id), fetch=run.planned.fetch,
            project=self.project.fileName(), parameters=spec_parameters(spec)))
        task = SubmitJobTask(profile, settings.known_hosts_path(), passphrase, run.planned,
                             on_done=self._submitted)
        task.exports = run.exports  # type: ignore[attr-defined]
        for export in run.exports:
            export.on_done = self._exported
            task.addSubTask(export, [], QgsTask.ParentDependsOnSubTask)
        self.tasks[record.job_id] = task
        self.task_manager.addTask(task)
        log.info("job %s (%s) on %s: %d export(s), %d upload(s)", spec.job_id, spec.name,
                 profile_name, len(run.exports), len(run.planned.inputs))
        return task

    def _exported(self, task: RsTask) -> None:
        if task.error is not None:
            self.notify(tr("Export failed: {reason}").format(reason=task.error), Qgis.Critical)

    def _submitted(self, task: RsTask) -> None:
        assert isinstance(task, SubmitJobTask)
        self._drop_task(task.job_id, task)
        record = self._records.get(task.job_id)
        if record is None:
            return
        if task.result is not None:  # the job started on the cluster, whatever happened next
            record = self._update(record.with_status(task.result))
            if task.cancel_error is not None:
                self.notify(tr("Could not cancel job {name}: {reason}. It runs on the cluster; "
                               "cancel it again in the jobs panel.").format(
                    name=record.name, reason=task.cancel_error), Qgis.Critical, 0)
            elif task.isCanceled():
                self.notify(tr("Job {name} cancelled on the cluster").format(name=record.name))
            else:
                self.notify(tr("Job {name} started on the cluster").format(name=record.name))
            if record.remote_active:
                self.watch(record.job_id)
            elif record.needs_fetch:  # it ended before the cancel reached it
                self.fetch(record.job_id)
            return
        failed = task.error or next((e.error for e in getattr(task, "exports", []) if e.error), None)
        if task.uncertain:
            # The spec or `job submit` may have reached the cluster: never forget such a job.
            reason = failed or tr("cancelled while the job was being started")
            if task.isCanceled():
                self._cancel_when_found.add(record.job_id)
            self._update(replace(record, state="unknown", message=tr(
                "starting the job failed where the cluster may have it anyway: {reason}").format(
                reason=reason)))
            self.notify(tr("Job {name}: {reason}. Looking for it on the cluster…").format(
                name=record.name, reason=reason), Qgis.Warning)
            self._look_up(record.profile)
            return
        if isinstance(failed, UnknownHostKeyError):
            failed = tr("{reason}. Open Connections… and press Test connection to review the "
                        "key's fingerprint and trust it").format(reason=failed)
        if failed is not None:
            self._update(replace(record, state="error", message=str(failed)))
            self.notify(tr("Job {name} could not start: {reason}").format(
                name=record.name, reason=failed), Qgis.Critical, 0)
        else:
            self._update(replace(record, state="cancelled", message=tr("cancelled before start")))
            self.notify(tr("Job {name} cancelled").format(name=record.name))

    # -- watching ---------------------------------------------------------------------------------------
    def watch(self, job_id: str) -> WatchJobTask | None:
        record = self._records[job_id]
        try:
            profile, passphrase = self.connection(record.profile)
        except RsPluginError as e:
            self._update(replace(record, message=str(e)))
            self.notify(str(e), Qgis.Warning)
            return None
        task = WatchJobTask(profile, settings.known_hosts_path(), passphrase, job_id,
                            on_done=self._watched, poll_s=self.poll_s,
                            skip_events=record.events_seen, name=record.name,
                            previews_dir=self.previews_dir(job_id))
        if record.events_seen == 0:
            self._history_read.add(job_id)  # every event will come live
        task.status_changed.connect(self._on_status)
        task.event_received.connect(self._on_event)
        task.preview_fetched.connect(self._on_preview)
        self.tasks[job_id] = task
        self.task_manager.addTask(task)
        return task

    @pyqtSlot(object)
    def _on_status(self, status: JobStatus) -> None:
        record = self._records.get(status.job_id)
        if record is not None and not self._closing:
            self._update(record.with_status(status))

    @pyqtSlot(str, object)
    def _on_event(self, job_id: str, event: ProgressEvent) -> None:
        """Warnings and infos go to the plugin's log tab; warnings are also counted and kept in
        the record (the jobs panel, the finished-job message)."""
        record = self._records.get(job_id)
        if record is None or self._closing:
            return
        record = record.with_event(event.event, event.message)
        self._training_event(job_id, event)
        line = " ".join(t for t in (event.time or "", event.event, event.stage or "",
                                    event.message or "") if t)
        self._events.setdefault(job_id, deque(maxlen=EVENTS_KEPT)).append(line)
        if event.event in ("warning", "info"):
            level = log.warning if event.event == "warning" else log.info
            level("job %s (%s), %s: %s", record.name, job_id, event.stage or "-", event.message)
            self._update(record)
        else:  # saved with the next status
            self._records[job_id] = record

    def _watched(self, task: RsTask) -> None:
        assert isinstance(task, WatchJobTask)
        self._drop_task(task.job_id, task)
        record = self._records.get(task.job_id)
        if record is None or self._closing:
            return
        if task.result is not None:
            status: JobStatus = task.result
            self._ended(self._update(record.with_status(status)), status)
        elif task.remote_cancelled is not None:
            self._update(record.with_status(task.remote_cancelled))
            self.notify(tr("Job {name} cancelled on the cluster").format(name=record.name))
        elif task.cancel_remote and task.isCanceled() and task.error is None:
            # Cancelled while still queued in the task manager: run() never got to the cluster.
            self._cancel_remote(record)
        elif task.isCanceled() and task.error is None:
            # Stopped by QGIS's task manager (its panel's cancel button, or an exit the user then
            # called off): never a cancel on the cluster, which only Cancel job asks for.
            self.jobs_changed.emit()
            self.notify(tr("Stopped following job {name} here; it keeps running on the "
                           "cluster. Refresh in the jobs panel follows it again, Cancel job "
                           "cancels it.").format(name=record.name))
        elif task.error is not None:
            if isinstance(task.error, RemoteCommandError) and "no job" in str(task.error):
                self._vanished(record)
            else:
                self._update(replace(record, message=str(task.error)))
            self.notify(tr("Lost track of job {name}: {reason}. It may still be running; "
                           "Refresh in the jobs panel to look again.").format(
                name=record.name, reason=task.error), Qgis.Warning, 0)

    # -- fetching -----------------------------------------------------------------------------------------
    def fetch(self, job_id: str) -> FetchResultsTask | None:
        record = self._records[job_id]
        try:
            profile, passphrase = self.connection(record.profile)
        except RsPluginError as e:
            self.notify(str(e), Qgis.Warning)
            return None
        local_dir = Path(record.local_dir or settings.results_dir() / job_id)
        task = FetchResultsTask(profile, settings.known_hosts_path(), passphrase, job_id,
                                record.fetch, local_dir, on_done=self._fetched,
                                name=record.name)
        self.tasks[job_id] = task
        self.task_manager.addTask(task)
        return task

    def _fetched(self, task: RsTask) -> None:
        assert isinstance(task, FetchResultsTask)
        self._drop_task(task.job_id, task)
        record = self._records.get(task.job_id)
        if record is None or self._closing:
            return
        if task.result is None:
            if task.error is not None:
                self._update(replace(record, message=str(task.error)))
                self.notify(tr("Could not download the results of {name}: {reason}").format(
                    name=record.name, reason=task.error), Qgis.Critical, 0)
            else:
                self._update(replace(record, message=tr(
                    "download cancelled; the results stay on the cluster")))
                self.notify(tr("Download of {name} cancelled; nothing was loaded, and the results "
                               "stay on the cluster").format(name=record.name))
            return
        self.load(record, task.result)

    def _into_project(self, record: JobRecord) -> bool:
        """Results belong in the project the job was started from. When another one is open
        (QGIS restarted, the job reattached), the user says where: that project, this one, or
        later (Load results in the jobs panel). ``False``: not now."""
        current = self.project.fileName()
        if not record.project or record.project == current or self.iface is None:
            return True
        answer = QMessageBox.question(
            self.iface.mainWindow(), tr("Load results of {name}").format(name=record.name),
            tr("Job {name} was started from the project\n{started}\nbut {current} is open.\n\n"
               "Yes: open {started_name} and load the results there.\nNo: load them into the "
               "open project.\nCancel: not now (Load results in the Jobs tab).").format(
                name=record.name, started=record.project,
                current=current or tr("a new, unsaved project"),
                started_name=Path(record.project).name),
            QMessageBox.Yes | QMessageBox.No | QMessageBox.Cancel, QMessageBox.Yes)
        if answer == QMessageBox.No:
            return True
        if answer == QMessageBox.Yes:
            if not Path(record.project).is_file():
                self.notify(tr("The project {path} of job {name} no longer exists; its results "
                               "were not loaded").format(path=record.project, name=record.name),
                            Qgis.Warning, 0)
                return False
            if self.project.isDirty():
                self.notify(tr("Save or close the open project first, then press Load results "
                               "for job {name}").format(name=record.name), Qgis.Warning, 0)
                return False
            opener = getattr(self.iface, "addProject", None)
            opened = opener(record.project) if opener else self.project.read(record.project)
            return bool(opened) and self.project.fileName() == record.project
        self._update(replace(record, message=tr(
            "results downloaded to {folder}, not loaded yet: Load results puts them on the "
            "map").format(folder=record.local_dir)))
        return False

    def load(self, record: JobRecord, files: Sequence[Path | str]) -> list[Any]:
        if not self._into_project(record):
            return []
        try:
            layers, summary = load_results(self.project, record.job_id, record.name,
                                           classify_results(files))
        except RsPluginError as e:
            self.notify(str(e), Qgis.Critical, 0)
            return []
        message = summary or ""
        self._update(replace(record, loaded=True, message=message or record.message))
        text = tr("Job {name} done: {n} layer(s) added").format(name=record.name, n=len(layers))
        if record.warnings:
            text += ", " + (tr("1 warning") if record.warnings == 1 else
                            tr("{n} warnings").format(n=record.warnings))
        if record.weak:
            # A model that learned almost nothing is no success: said, with what to try.
            self.notify(text + " — " + verdict_text(record), Qgis.Warning, 0)
        else:
            verdict = verdict_text(record)
            text += f" — {verdict}" if verdict else ""
            self.notify(text + (f" — {summary}" if summary else ""), Qgis.Success,
                        0 if summary else 8)
        self.results_loaded.emit(record.job_id, layers)
        return layers

    # -- cancel, reattach, shutdown -----------------------------------------------------------------------
    def cancel(self, job_id: str) -> None:
        """The user's Cancel job: stops what runs here for the job and cancels it on the
        cluster (the caller asked for confirmation)."""
        task = self.tasks.get(job_id)
        record = self._records.get(job_id)
        if isinstance(task, WatchJobTask):
            task.cancel_job()
            return
        if task is not None:
            task.cancel()
            return
        if record is not None and record.remote_active:
            self._cancel_remote(record)

    def _cancel_remote(self, record: JobRecord) -> None:
        try:
            profile, passphrase = self.connection(record.profile)
        except RsPluginError as e:
            self.notify(str(e), Qgis.Critical)
            return
        cancel = CancelJobTask(profile, settings.known_hosts_path(), passphrase, record.job_id,
                               on_done=self._cancelled, name=record.name)
        self.tasks[record.job_id] = cancel
        self.task_manager.addTask(cancel)

    def _cancelled(self, task: RsTask) -> None:
        assert isinstance(task, CancelJobTask)
        self._drop_task(task.job_id, task)
        record = self._records.get(task.job_id)
        if record is None:
            return
        if task.result is not None:
            self._update(record.with_status(task.result))
            self.notify(tr("Job {name} cancelled on the cluster").format(name=record.name))
        elif task.error is not None:
            self.notify(tr("Could not cancel {name}: {reason}").format(
                name=record.name, reason=task.error), Qgis.Critical)

    def reattach(self, *, include_last_profile: bool = False) -> None:
        """Start-up and Refresh: reconciles the records with each cluster's ``job list``, then
        watches running jobs, fetches finished ones, looks up those whose start was uncertain,
        marks those the cluster no longer has, and lists the cluster's jobs unknown here (of the
        last used profile too with ``include_last_profile``, even if it has no records)."""
        names = {r.profile for r in self._records.values()}
        if include_last_profile and settings.last_profile():
            names.add(settings.last_profile())
        for name in sorted(names):
            self._look_up(name)

    def _look_up(self, profile_name: str) -> ReconcileTask | None:
        if profile_name in self._lookups:
            # that look began before this was asked for: look again once it is done
            self._look_again.add(profile_name)
            return None
        mine = [r for r in self._records.values() if r.profile == profile_name]
        try:
            profile, passphrase = self.connection(profile_name)
        except RsPluginError as e:
            log.warning("cannot look up the jobs of profile %s: %s", profile_name, e)
            if any(r.remote_active or r.state == "unknown" for r in mine):
                self.notify(str(e), Qgis.Warning)
            return None
        busy = set(self.tasks) | processing_jobs()
        # Only jobs nothing else is busy with are acted on (a submit may finish after the list
        # was read); the cluster's status only of those not settled, for the others the list
        # is enough.
        candidates = {r.job_id for r in mine if r.job_id not in busy}
        detail = {r.job_id for r in mine if r.job_id in candidates and
                  r.state not in TERMINAL_STATES}
        task = ReconcileTask(profile, settings.known_hosts_path(), passphrase,
                             [r.job_id for r in mine], detail, candidates,
                             on_done=self._reconciled)
        self._lookups[profile_name] = task
        self.task_manager.addTask(task)
        self.jobs_changed.emit()
        return task

    def _reconciled(self, task: RsTask) -> None:
        assert isinstance(task, ReconcileTask)
        if self._lookups.get(task.profile_name) is task:
            del self._lookups[task.profile_name]
        if self._closing:
            return
        if task.result is None:
            waiting = [r for r in self._records.values() if r.profile == task.profile_name
                       and (r.remote_active or r.state == "unknown")]
            if task.error is not None and waiting:
                self.notify(tr("Could not look up the jobs on {profile}: {reason}. Refresh in "
                               "the jobs panel to look again.").format(
                    profile=task.profile_name, reason=task.error), Qgis.Warning, 0)
            self._look_again.discard(task.profile_name)
            self.jobs_changed.emit()
            return
        found: Reconciliation = task.result
        self._cluster_only = {k: v for k, v in self._cluster_only.items()
                              if v.profile != task.profile_name}
        for entry in found.others:
            if entry["job_id"] not in self._records:
                self._cluster_only[entry["job_id"]] = ClusterJob.from_entry(task.profile_name,
                                                                            entry)
        busy = set(self.tasks) | processing_jobs()
        for job_id in task.known:
            record = self._records.get(job_id)
            if record is None or job_id in busy or job_id not in task.candidates:
                continue
            if job_id in found.statuses:
                self._follow(record, found.statuses[job_id])
            elif job_id in found.not_started:
                if record.state != "error":
                    self._update(replace(record, state="error", message=tr(
                        "the job's folder is on the cluster, but the job never started ({why}); "
                        "Forget it to delete the folder").format(why=found.not_started[job_id])))
            elif job_id in found.missing:
                self._vanished(record)
            elif record.needs_fetch:
                self.fetch(job_id)
        self.jobs_changed.emit()
        if task.profile_name in self._look_again:
            self._look_again.discard(task.profile_name)
            self._look_up(task.profile_name)

    def _follow(self, record: JobRecord, status: JobStatus) -> None:
        """A recorded job found on the cluster: watch it, or act on how it ended meanwhile."""
        ended_before = record.state in TERMINAL_STATES
        record = self._update(record.with_status(status))
        if record.remote_active:
            log.info("reattaching to job %s (%s)", record.job_id, record.state)
            if record.job_id in self._cancel_when_found:
                self._cancel_when_found.discard(record.job_id)
                self._cancel_remote(record)
            else:
                self.watch(record.job_id)
        elif not ended_before:
            self._ended(record, status)
        elif record.needs_fetch:
            log.info("fetching the results of job %s", record.job_id)
            self.fetch(record.job_id)

    def _ended(self, record: JobRecord, status: JobStatus) -> None:
        if status.state == "succeeded":
            self.fetch(record.job_id)
        elif status.state == "failed":
            self.notify(tr("Job {name} failed on the cluster: {reason}").format(
                name=record.name, reason=status.message or tr("no reason given")),
                Qgis.Critical, 0)
        else:
            self.notify(tr("Job {name} was cancelled").format(name=record.name))

    def _vanished(self, record: JobRecord) -> None:
        """The cluster has no such job: marked, never dropped silently."""
        if record.gone:
            return
        if record.state in TERMINAL_STATES:  # ran, then its folder was cleaned elsewhere
            log.info("job %s is no longer on the cluster", record.job_id)
            self._update(replace(record, gone=True))
        elif record.remote_active:
            self._update(replace(record, state="error", gone=True, message=tr(
                "the job's folder was removed from the cluster while it ran")))
        else:  # "exporting", "uploading", "unknown", "error": it never got there
            reason = record.message
            message = tr("the cluster has no such job: it never started")
            self._update(replace(record, state="error", gone=True,
                                 message=f"{message} ({reason})" if reason else message))

    def adopt(self, job_id: str) -> JobRecord | None:
        """Records a job found on the cluster that was started elsewhere, then follows it like
        the others: watched while it runs, its results (model, masks, report) fetched."""
        job = self._cluster_only.get(job_id)
        if job is None or not job.adoptable:
            return None
        del self._cluster_only[job_id]
        record = self._update(JobRecord(
            job_id=job_id, name=job.name or job_id, profile=job.profile, mode="adopted",
            state=job.state if job.state in STATES else "unknown", progress=job.progress,
            created=job.submitted or now_iso(), local_dir=str(settings.results_dir() / job_id),
            fetch=(MODEL_OUTPUT, PREDICTIONS, REPORT)))
        if record.remote_active:
            self.watch(job_id)
        elif record.needs_fetch:
            self.fetch(job_id)
        return record

    def shutdown(self, wait_s: float = 20.0) -> list[RsTask]:
        """Stops watching without cancelling anything on the cluster (QGIS closing, unload):
        the jobs keep running there and their records stay, so the next start follows them.

        Waits up to ``wait_s`` for the stopped tasks to leave their ``run`` (a status command
        under way ends first): QGIS ends Python soon after, and must find none of them still
        in Python. Returns the tasks still running after that."""
        self._closing = True
        settings.remove_job_listener(self._job_saved)
        stopped = [*self.tasks.values(), *self._lookups.values(), *self._log_tasks.values(),
                   *self._training_tasks.values()]
        for task in stopped:
            try:
                if isinstance(task, WatchJobTask):
                    task.detach()
                else:
                    task.cancel()
            except RuntimeError:  # the task manager already deleted it: it has ended
                continue
        self.tasks.clear()
        self._lookups.clear()
        self._log_tasks.clear()
        self._training_tasks.clear()
        end = time.monotonic() + wait_s
        left = [t for t in stopped if not t.wait_ran(max(0.0, end - time.monotonic()))]
        if left:
            log.warning("%d task(s) still running as QGIS closes: %s", len(left),
                        ", ".join(t.description() for t in left))
        return left

    def _drop_task(self, job_id: str, task: RsTask) -> None:
        if self.tasks.get(job_id) is task:
            del self.tasks[job_id]
            self.jobs_changed.emit()
