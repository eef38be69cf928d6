"""Runs jobs from start to map: chains the tasks, keeps the job records, reports to the user.

Lives in the GUI thread. Task callbacks (``on_done``) and the watch task's ``status_changed``
signal arrive here in the GUI thread too, so this is where records are saved, layers loaded and
messages shown.
"""

from __future__ import annotations

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

from rs_qgis_plugin import settings
from rs_qgis_plugin.core.errors import (
    RemoteCommandError,
    RsPluginError,
    SpecError,
    UnknownHostKeyError,
)
from rs_qgis_plugin.core.jobspec import new_job_id
from rs_qgis_plugin.core.profile import ConnectionProfile
from rs_qgis_plugin.core.protocol import JobStatus
from rs_qgis_plugin.log import get_logger
from rs_qgis_plugin.logic import (
    JobRecord,
    PlannedJob,
    RasterPick,
    RunParams,
    classify_results,
    local_raster_path,
    now_iso,
    plan_job,
    safe_stem,
)
from rs_qgis_plugin.results import load_results
from rs_qgis_plugin.tasks import (
    CancelJobTask,
    ExportRasterTask,
    FetchResultsTask,
    RsTask,
    SubmitJobTask,
    WatchJobTask,
)

log = get_logger("controller")
TITLE = "RS Buildings"


def tr(text: str) -> str:
    return QCoreApplication.translate("JobController", text)


@dataclass
class LayerPick:
    """A row of the dock: an imagery layer, its reference mask (optional), predict it or not."""

    image: QgsRasterLayer
    mask: QgsRasterLayer | None = None
    predict: bool = True


@dataclass
class PreparedRun:
    planned: PlannedJob
    exports: list[ExportRasterTask]


class JobController(QObject):
    jobs_changed = pyqtSignal()
    results_loaded = pyqtSignal(str, list)  # job id, layers

    def __init__(self, iface: Any, project: QgsProject | None = None, *,
                 task_manager: Any = None, poll_s: float = 2.0) -> None:
        super().__init__()
        self.iface = iface
        self.project = project or QgsProject.instance()
        self.task_manager = task_manager or QgsApplication.taskManager()
        self.poll_s = poll_s
        self._records: dict[str, JobRecord] = {r.job_id: r for r in settings.load_jobs()}
        self.tasks: dict[str, RsTask] = {}
        self._closing = False

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

    def forget(self, job_id: str) -> None:
        if job_id in self.tasks:
            raise SpecError(tr("the job is still busy here; cancel it first"))
        self._records.pop(job_id, None)
        settings.forget_job(job_id)
        self.jobs_changed.emit()

    def active_job_ids(self) -> list[str]:
        return list(self.tasks)

    # -- messages -----------------------------------------------------------------------------------
    def notify(self, text: str, level: Any = Qgis.Info, duration: int = 8) -> None:
        if self.iface is not None and not self._closing:
            self.iface.messageBar().pushMessage(tr(TITLE), text, level, duration)

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
            path = None if clip_extent is not None else local_raster_path(
                layer.providerType(), layer.source())
            if path is None:
                target = export_dir / str(len(exports) + 1) / f"{safe_stem(layer.name())}.tif"
                exports.append(ExportRasterTask(
                    layer, target, extent=clip_extent, extent_crs=clip_crs,
                    units_per_pixel=units_per_pixel,
                    transform_context=self.project.transformContext()))
                path = str(target)
            exported[layer.id()] = path
            return path

        raster_picks = [RasterPick(local(p.image), local(p.mask) if p.mask else None, p.predict)
                        for p in picks]
        planned = plan_job(name, params, raster_picks, job_id=job_id)
        return PreparedRun(planned, exports)

    def start(self, profile_name: str, run: PreparedRun, mode: str) -> SubmitJobTask:
        profile, passphrase = self.connection(profile_name)
        spec = run.planned.spec
        record = self._update(JobRecord(
            job_id=spec.job_id, name=spec.name, profile=profile_name, mode=mode,
            state="exporting" if run.exports else "uploading", created=now_iso(),
            local_dir=str(settings.results_dir() / spec.job_id), fetch=run.planned.fetch))
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
        if task.result is not None:
            record = self._update(record.with_status(task.result))
            self.notify(tr("Job {name} started on the cluster").format(name=record.name))
            self.watch(record.job_id)
            return
        failed = task.error or next((e.error for e in getattr(task, "exports", []) if e.error), None)
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
                            on_done=self._watched, poll_s=self.poll_s)
        task.status_changed.connect(self._on_status)
        self.tasks[job_id] = task
        self.task_manager.addTask(task)
        return task

    @pyqtSlot(object)
    def _on_status(self, status: JobStatus) -> None:
        record = self._records.get(status.job_id)
        if record is not None and not self._closing:
            self._update(record.with_status(status))

    def _watched(self, task: RsTask) -> None:
        assert isinstance(task, WatchJobTask)
        self._drop_task(task.job_id, task)
        record = self._records.get(task.job_id)
        if record is None or self._closing:
            return
        if task.result is not None:
            status: JobStatus = task.result
            record = self._update(record.with_status(status))
            if status.state == "succeeded":
                self.fetch(record.job_id)
            elif status.state == "failed":
                self.notify(tr("Job {name} failed on the cluster: {reason}").format(
                    name=record.name, reason=status.message or tr("no reason given")),
                    Qgis.Critical, 0)
            else:
                self.notify(tr("Job {name} was cancelled").format(name=record.name))
        elif task.remote_cancelled is not None:
            self._update(record.with_status(task.remote_cancelled))
            self.notify(tr("Job {name} cancelled on the cluster").format(name=record.name))
        elif task.cancel_remote and task.isCanceled() and task.error is None:
            # Cancelled while still queued in the task manager: run() never got to the cluster.
            self._cancel_remote(record)
        elif task.error is not None:
            if isinstance(task.error, RemoteCommandError) and "no job" in str(task.error):
                self._update(replace(record, state="error", message=tr(
                    "the cluster has no such job (interrupted before it started?)")))
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
                                record.fetch, local_dir, on_done=self._fetched)
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

    def load(self, record: JobRecord, files: Sequence[Path | str]) -> list[Any]:
        try:
            layers, summary = load_results(self.project, record.job_id, record.name,
                                           classify_results(files))
        except RsPluginError as e:
            self.notify(str(e), Qgis.Critical, 0)
            return []
        message = summary or ""
        self._update(replace(record, loaded=True, message=message or record.message))
        text = tr("Job {name} done: {n} layer(s) added").format(name=record.name, n=len(layers))
        self.notify(text + (f" — {summary}" if summary else ""), Qgis.Success, 0 if summary else 8)
        self.results_loaded.emit(record.job_id, layers)
        return layers

    # -- cancel, reattach, shutdown -----------------------------------------------------------------------
    def cancel(self, job_id: str) -> None:
        task = self.tasks.get(job_id)
        record = self._records.get(job_id)
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
                               on_done=self._cancelled)
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

    def reattach(self) -> None:
        """Picks up where the last session stopped: watches running jobs, fetches finished ones."""
        for record in self.records():
            if record.job_id in self.tasks:
                continue
            if record.remote_active or record.state in ("exporting", "uploading"):
                log.info("reattaching to job %s (%s)", record.job_id, record.state)
                self.watch(record.job_id)
            elif record.needs_fetch:
                log.info("fetching the results of job %s", record.job_id)
                self.fetch(record.job_id)

    def shutdown(self) -> None:
        """Stops watching without cancelling anything on the cluster (QGIS closing, unload)."""
        self._closing = True
        for task in list(self.tasks.values()):
            if isinstance(task, WatchJobTask):
                task.detach()
            else:
                task.cancel()
        self.tasks.clear()

    def _drop_task(self, job_id: str, task: RsTask) -> None:
        if self.tasks.get(job_id) is task:
            del self.tasks[job_id]
            self.jobs_changed.emit()
