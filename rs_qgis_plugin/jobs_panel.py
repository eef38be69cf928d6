"""The jobs panel: every job this QGIS profile started (from the dock or Processing), with state,
stage, progress, warnings and start time, kept across restarts, and the cluster's jobs started
elsewhere; Cancel, Refresh (looks every job up on the cluster), Load results, Forget (and
delete the job's folder on the cluster).

Everything the cluster sent (status messages, warnings) is shown as plain text: cells are plain
text already, and tooltips, which Qt renders as rich text, get it escaped.
"""

from __future__ import annotations

import html
from typing import Any

from qgis.core import Qgis
from pathlib import Path

from qgis.PyQt.QtCore import QCoreApplication, Qt, QUrl, pyqtSignal, pyqtSlot
from qgis.PyQt.QtGui import QDesktopServices
from qgis.PyQt.QtWidgets import (
    QAbstractItemView,
    QFileDialog,
    QHBoxLayout,
    QHeaderView,
    QLabel,
    QMessageBox,
    QPlainTextEdit,
    QPushButton,
    QSplitter,
    QTableWidget,
    QTabWidget,
    QTableWidgetItem,
    QVBoxLayout,
    QWidget,
)

from rs_qgis_plugin import settings
from rs_qgis_plugin.core.errors import RsPluginError
from rs_qgis_plugin.logic import TRAINING_MODES, JobRecord, progress_text, verdict_text
from rs_qgis_plugin.training_view import TrainingView


def tr(text: str) -> str:
    return QCoreApplication.translate("JobsPanel", text)


def plain_tooltip(text: str) -> str:
    """``text`` as a tooltip that shows it literally: always rich text (so the escaped
    characters are decoded, never shown as ``&lt;``), with its line breaks kept."""
    return f'<p style="white-space:pre-wrap">{html.escape(text, quote=False)}</p>' if text else ""


def _warnings_text(record: JobRecord) -> str:
    """Every warning of the job as a list (the last 50 of more); the count is the cluster's,
    which also knows those sent while no QGIS watched."""
    if not record.warnings:
        return ""
    kept = len(record.recent_warnings)
    if kept >= record.warnings:
        head = tr("{n} warning(s):").format(n=record.warnings)
    elif kept:
        head = tr("{n} warning(s); the last {k} received here:").format(n=record.warnings, k=kept)
    else:
        head = tr("{n} warning(s), sent while this QGIS did not watch (the job's log on the "
                  "cluster has them):").format(n=record.warnings)
    return "\n".join([head, *(f"• {w}" for w in record.recent_warnings)])


def confirm_cancel(parent: QWidget | None, controller: Any, job_id: str) -> bool:
    """Asks before a job is cancelled on the cluster (it cannot be resumed), naming the job."""
    record = next((r for r in controller.records() if r.job_id == job_id), None)
    name = record.name if record is not None else job_id
    where = record.profile if record is not None else ""
    answer = QMessageBox.question(
        parent, tr("Cancel job"),
        tr("Cancel job {name} ({job}) on the cluster {profile}?\n\nIts work so far is lost; "
           "the job cannot be resumed. (Closing QGIS does not cancel jobs: they keep "
           "running.)").format(name=name, job=job_id, profile=where),
        QMessageBox.Yes | QMessageBox.No, QMessageBox.No)
    return answer == QMessageBox.Yes


def details_text(record: JobRecord, events: list[str], log: list[str] | None = None) -> str:
    """The details pane of one job, as plain text (a QPlainTextEdit never renders markup: the
    cluster's messages, warnings and log are shown as they came)."""
    lines = [f"{record.name}  ({record.job_id})",
             tr("State: {state}").format(state=record.state + (
                 tr(" — not on the cluster") if record.gone else "")),
             tr("Stage: {stage}   Progress: {progress}").format(
                 stage=record.stage or "-", progress=progress_text(record)),
             tr("Profile: {profile}   Mode: {mode}").format(profile=record.profile,
                                                           mode=record.mode),
             tr("Started: {started}   Finished: {finished}").format(
                 started=(record.started or record.created or "-").replace("T", " "),
                 finished=(record.finished or "-").replace("T", " ")),
             tr("Results folder: {folder}").format(folder=record.local_dir or "-"),
             tr("Results fetched: {what}").format(what=", ".join(record.fetch) or "-")]
    if record.message:
        lines += ["", tr("Message:"), record.message]
    if record.verdict:
        lines += ["", tr("Training: {verdict}").format(verdict=verdict_text(record))]
    if record.warnings:
        lines += ["", _warnings_text(record)]
    if record.parameters:
        lines += ["", tr("Parameters:"), record.parameters]
    lines += ["", tr("Events (received in this session, newest last):")]
    lines += events or [tr("none yet")]
    lines += ["", tr("Log on the cluster (last lines; Show log reads it again):")]
    lines += log if log is not None else [tr("not read yet: Show log")]
    return "\n".join(lines)


class JobsPanel(QWidget):
    # The dock's status line follows the selected job (or the newest one): its text
    status_changed = pyqtSignal(str)

    # Qt slots (pyqtSlot) throughout, so connections need no PyQt proxy objects: with a lambda
    # here, panels made and deleted were seen to break an unrelated connection of the project.
    COLUMNS = ("name", "state", "stage", "progress", "warnings", "val iou", "started", "profile",
               "job id")

    def __init__(self, controller: Any, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.controller = controller
        self.table = QTableWidget(0, len(self.COLUMNS), self)
        self.table.setHorizontalHeaderLabels([tr("Name"), tr("State"), tr("Stage"),
                                              tr("Progress"), tr("Warnings"), tr("Val IoU"),
                                              tr("Started"),
                                              tr("Profile"), tr("Job id")])
        self.table.setSelectionBehavior(QAbstractItemView.SelectRows)
        self.table.setSelectionMode(QAbstractItemView.SingleSelection)
        self.table.setEditTriggers(QAbstractItemView.NoEditTriggers)
        # Sized to their contents, then the user's to resize: no column is cut short, and
        # the table scrolls sideways in a narrow dock.
        header = self.table.horizontalHeader()
        header.setSectionResizeMode(QHeaderView.Interactive)
        header.setStretchLastSection(True)
        self.table.setWordWrap(False)
        self.table.setHorizontalScrollMode(QAbstractItemView.ScrollPerPixel)
        self.details = QPlainTextEdit(self)
        self.details.setReadOnly(True)
        self.details.setPlaceholderText(tr("Select a job to see its events, warnings and "
                                           "parameters"))
        self.folder_label = QLabel(self)
        self.folder_label.setTextFormat(Qt.PlainText)
        self.folder_label.setWordWrap(True)
        self.open_folder_button = QPushButton(tr("Open folder"), self)
        self.open_folder_button.setToolTip(tr("Open the selected job's results folder (or the "
                                              "results folder) in the file manager"))
        self.choose_folder_button = QPushButton(tr("Results folder…"), self)
        self.choose_folder_button.setToolTip(tr("Choose where the results of jobs started from "
                                                "now on are downloaded"))
        self.cancel_button = QPushButton(tr("Cancel job"), self)
        self.refresh_button = QPushButton(tr("Refresh"), self)
        self.load_button = QPushButton(tr("Load results"), self)
        self.forget_button = QPushButton(tr("Forget"), self)
        self.log_button = QPushButton(tr("Show log"), self)
        self.log_button.setToolTip(tr("Read the last lines of the selected job's log on the "
                                      "cluster into the details below"))
        self.cancel_button.setToolTip(tr("Cancel the selected job here and on the cluster"))
        self.refresh_button.setToolTip(tr("Look the jobs up on the cluster: follow running ones, "
                                          "fetch finished ones, list those started elsewhere"))
        self.load_button.setToolTip(tr("Download and load the results (a job started elsewhere "
                                       "is added to this list first)"))
        self.forget_button.setToolTip(tr("Remove the job from this list; you choose whether its "
                                         "folder on the cluster is deleted too"))
        buttons = QHBoxLayout()
        for b in (self.cancel_button, self.refresh_button, self.load_button, self.forget_button,
                  self.log_button):
            buttons.addWidget(b)
        folder = QHBoxLayout()
        folder.addWidget(self.folder_label, 1)
        folder.addWidget(self.open_folder_button)
        folder.addWidget(self.choose_folder_button)
        self.splitter = QSplitter(Qt.Vertical, self)
        self.splitter.addWidget(self.table)
        self.training = TrainingView(self)
        self.tabs = QTabWidget(self)
        self.tabs.addTab(self.details, tr("Details"))
        self.tabs.addTab(self.training, tr("Training"))
        self.splitter.addWidget(self.tabs)
        self.splitter.setStretchFactor(0, 3)
        self.splitter.setStretchFactor(1, 2)
        layout = QVBoxLayout(self)
        layout.addWidget(self.splitter, 1)
        layout.addLayout(buttons)
        layout.addLayout(folder)
        self.open_folder_button.clicked.connect(self.open_folder)
        self.choose_folder_button.clicked.connect(self.choose_results_folder)
        self.table.itemSelectionChanged.connect(self._show_details)
        self.cancel_button.clicked.connect(self._cancel)
        self.refresh_button.clicked.connect(self.refresh_from_cluster)
        self.load_button.clicked.connect(self._load)
        self.forget_button.clicked.connect(self._forget)
        self.log_button.clicked.connect(self.show_log)
        self.table.itemSelectionChanged.connect(self._update_buttons)
        controller.jobs_changed.connect(self.refresh)
        controller.training_changed.connect(self._training_changed)
        self.refresh()

    @pyqtSlot()
    def refresh_from_cluster(self) -> None:
        """Refresh: every job looked up on the cluster (that of the last used profile too)."""
        self.controller.reattach(include_last_profile=True)

    def selected_job(self) -> str | None:
        rows = self.table.selectionModel().selectedRows()
        if not rows:
            return None
        return self.table.item(rows[0].row(), 0).data(Qt.UserRole)

    def _record(self, job_id: str | None) -> JobRecord | None:
        return next((r for r in self.controller.records() if r.job_id == job_id), None)

    @pyqtSlot()
    def refresh(self) -> None:
        selected = self.selected_job()
        records = self.controller.records()
        listed = self.controller.cluster_jobs()
        self.table.setRowCount(len(records) + len(listed))
        busy = set(self.controller.active_job_ids())
        for row, r in enumerate(records):
            # A model that learned almost nothing is no plain success (its reason: the tooltip).
            state = (r.state + (tr(" — not on the cluster") if r.gone else "")
                     + (tr(" ⚠ weak model") if r.weak else "")
                     + (" ✓" if r.loaded and not r.weak else "")
                     + (" …" if r.job_id in busy else ""))
            stage = r.stage + (f" (restarted {r.restarts}×)" if r.restarts else "")
            name = r.name + (tr(" (Processing)") if r.origin == "processing" else "")
            iou = "" if r.best_val_iou is None else f"{r.best_val_iou:.3f}"
            values = (name, state, stage, progress_text(r), str(r.warnings or ""), iou,
                      (r.started or r.created or "").replace("T", " ")[:19], r.profile, r.job_id)
            tip = plain_tooltip("\n\n".join(t for t in (r.message, verdict_text(r),
                                                         _warnings_text(r)) if t))
            self._fill(row, r.job_id, values, tip)
            if r.warnings:
                self.table.item(row, self.COLUMNS.index("warnings")).setToolTip(
                    plain_tooltip(_warnings_text(r)))
            if r.job_id == selected:
                self.table.selectRow(row)
        for row, job in enumerate(listed, start=len(records)):
            state = job.state + tr(" — on the cluster, not started here") + (
                " …" if job.job_id in busy else "")
            values = (job.name or job.job_id, state, "", f"{job.progress:.0f}%", "", "",
                      job.submitted.replace("T", " ")[:19], job.profile, job.job_id)
            self._fill(row, job.job_id, values, plain_tooltip(job.message))
            for col in range(len(self.COLUMNS)):
                item = self.table.item(row, col)
                font = item.font()
                font.setItalic(True)
                item.setFont(font)
            if job.job_id == selected:
                self.table.selectRow(row)
        # Widened when their text grows, never narrowed: what the user widened stays so.
        for col in range(self.table.columnCount() - 1):
            wanted = max(self.table.sizeHintForColumn(col),
                         self.table.horizontalHeader().sectionSizeHint(col))
            if self.table.columnWidth(col) < wanted:
                self.table.setColumnWidth(col, wanted)
        self.folder_label.setText(tr("Results folder: {folder}").format(
            folder=settings.results_dir()))
        self._update_buttons()
        self._show_details()

    def status_text(self) -> str:
        """One line on the selected job, else the newest: what the Run tab's status shows."""
        job = self.selected_job()
        record = self._record(job) if job else next(iter(self.controller.records()), None)
        if record is None:
            return ""
        text = tr("Job {name}: {state}").format(name=record.name, state=record.state)
        if record.state == "running":
            text += f", {progress_text(record)}"
        if record.loaded:
            text += tr(", results loaded")
        return text + (f" — {record.message}" if record.message else "")

    @pyqtSlot()
    def _show_details(self) -> None:
        job = self.selected_job()
        record = self._record(job)
        if record is not None:
            text = details_text(record, self.controller.recent_events(record.job_id),
                                self.controller.log_tail(record.job_id))
        else:
            listed = self.controller.cluster_job(job) if job else None
            text = "" if listed is None else "\n".join(
                [f"{listed.name or listed.job_id}  ({listed.job_id})",
                 tr("On the cluster {profile}, not started here: {state}").format(
                     profile=listed.profile, state=listed.state), listed.message])
        if self.details.toPlainText() != text:
            self.details.setPlainText(text)
        self._show_training()
        status = self.status_text()
        if status != getattr(self, "_status", None):  # a dock's own message stays till then
            self._status = status
            self.status_changed.emit(status)

    @pyqtSlot(str)
    def _training_changed(self, job_id: str) -> None:
        if job_id == self.selected_job():
            self._show_training()

    def _show_training(self) -> None:
        job = self.selected_job()
        record = self._record(job)
        if record is None or record.mode not in TRAINING_MODES:
            self.training.show_job(None, None, None)
            return
        history, preview = self.controller.training(record.job_id)
        self.training.show_job(record, history, preview)
        self.controller.load_training(record.job_id)  # once a session: all its events

    @pyqtSlot()
    def show_log(self) -> None:
        job = self.selected_job()
        if job:
            try:
                self.controller.fetch_log(job)
            except RsPluginError as e:
                self.controller.notify(str(e), Qgis.Warning)

    def folder_of(self, job_id: str | None) -> Path:
        record = self._record(job_id)
        if record is not None and record.local_dir and Path(record.local_dir).is_dir():
            return Path(record.local_dir)
        return settings.results_dir()

    @pyqtSlot()
    def open_folder(self) -> None:
        QDesktopServices.openUrl(QUrl.fromLocalFile(str(self.folder_of(self.selected_job()))))

    @pyqtSlot()
    def choose_results_folder(self) -> None:
        chosen = QFileDialog.getExistingDirectory(self, tr("Results folder"),
                                                  str(settings.results_dir()))
        if not chosen:
            return
        try:
            settings.set_results_dir(chosen)
        except RsPluginError as e:
            self.controller.notify(str(e), Qgis.Warning)
        self.refresh()

    def _fill(self, row: int, job_id: str, values: tuple[str, ...], tip: str) -> None:
        for col, value in enumerate(values):
            item = QTableWidgetItem(value)  # plain text, whatever it holds
            item.setData(Qt.UserRole, job_id)
            if tip:
                item.setToolTip(tip)
            self.table.setItem(row, col, item)

    @pyqtSlot()
    def _update_buttons(self) -> None:
        job = self.selected_job()
        record = self._record(job)
        listed = self.controller.cluster_job(job) if job and record is None else None
        busy = job in self.controller.active_job_ids()
        self.cancel_button.setEnabled(bool(record and (busy or record.remote_active)))
        self.load_button.setEnabled(bool(
            (record and record.state == "succeeded" and not record.gone and not busy)
            or (listed and listed.adoptable and not busy)))
        self.forget_button.setEnabled(bool((record or listed) and not busy))

    @pyqtSlot()
    def _cancel(self) -> None:
        job = self.selected_job()
        if job and confirm_cancel(self, self.controller, job):
            self.controller.cancel(job)

    @pyqtSlot()
    def _load(self) -> None:
        job = self.selected_job()
        if not job:
            return
        if self._record(job) is not None:
            self.controller.fetch(job)
        else:
            self.controller.adopt(job)

    @pyqtSlot()
    def _forget(self) -> None:
        job = self.selected_job()
        if not job:
            return
        record = self._record(job)
        delete = False
        if record is not None:
            # exporting/uploading (of a session that ended): the cluster never got a job
            if not record.gone and record.state not in ("exporting", "uploading"):
                answer = QMessageBox.question(
                    self, tr("Forget job"),
                    tr("Forget job {name}.\n\nAlso delete its folder on the cluster ({profile}), "
                       "with its inputs and results? That frees the cluster's disk, and cannot "
                       "be undone.").format(name=record.name, profile=record.profile),
                    QMessageBox.Yes | QMessageBox.No | QMessageBox.Cancel, QMessageBox.No)
                if answer == QMessageBox.Cancel:
                    return
                delete = answer == QMessageBox.Yes
        else:
            listed = self.controller.cluster_job(job)
            if listed is None:
                return
            answer = QMessageBox.question(
                self, tr("Delete cluster job"),
                tr("Job {name} was not started here. Delete its folder on the cluster "
                   "({profile}), with its inputs and results? This cannot be undone.").format(
                    name=listed.name or job, profile=listed.profile),
                QMessageBox.Yes | QMessageBox.No, QMessageBox.No)
            if answer != QMessageBox.Yes:
                return
            delete = True
        try:
            self.controller.forget(job, delete_on_cluster=delete)
        except RsPluginError as e:
            self.controller.notify(str(e), Qgis.Warning)
