"""The jobs panel: every job this QGIS profile started, with state, stage, progress and start
time, kept across restarts; Cancel, Refresh (reattach), Load results, Forget."""

from __future__ import annotations

from typing import Any

from qgis.PyQt.QtCore import QCoreApplication, Qt
from qgis.PyQt.QtWidgets import (
    QAbstractItemView,
    QHBoxLayout,
    QHeaderView,
    QPushButton,
    QTableWidget,
    QTableWidgetItem,
    QVBoxLayout,
    QWidget,
)

from rs_qgis_plugin.core.errors import RsPluginError
from rs_qgis_plugin.logic import progress_text


def tr(text: str) -> str:
    return QCoreApplication.translate("JobsPanel", text)


class JobsPanel(QWidget):
    COLUMNS = ("name", "state", "stage", "progress", "started", "profile", "job id")

    def __init__(self, controller: Any, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.controller = controller
        self.table = QTableWidget(0, len(self.COLUMNS), self)
        self.table.setHorizontalHeaderLabels([tr("Name"), tr("State"), tr("Stage"),
                                              tr("Progress"), tr("Started"), tr("Profile"),
                                              tr("Job id")])
        self.table.setSelectionBehavior(QAbstractItemView.SelectRows)
        self.table.setSelectionMode(QAbstractItemView.SingleSelection)
        self.table.setEditTriggers(QAbstractItemView.NoEditTriggers)
        self.table.horizontalHeader().setSectionResizeMode(QHeaderView.ResizeToContents)
        self.cancel_button = QPushButton(tr("Cancel job"), self)
        self.refresh_button = QPushButton(tr("Refresh"), self)
        self.load_button = QPushButton(tr("Load results"), self)
        self.forget_button = QPushButton(tr("Forget"), self)
        self.cancel_button.setToolTip(tr("Cancel the selected job here and on the cluster"))
        self.refresh_button.setToolTip(tr("Look again at running jobs and fetch finished ones"))
        self.forget_button.setToolTip(tr("Remove the job from this list (the cluster keeps its "
                                         "folder)"))
        buttons = QHBoxLayout()
        for b in (self.cancel_button, self.refresh_button, self.load_button, self.forget_button):
            buttons.addWidget(b)
        layout = QVBoxLayout(self)
        layout.addWidget(self.table)
        layout.addLayout(buttons)
        self.cancel_button.clicked.connect(self._cancel)
        self.refresh_button.clicked.connect(self.controller.reattach)
        self.load_button.clicked.connect(self._load)
        self.forget_button.clicked.connect(self._forget)
        self.table.itemSelectionChanged.connect(self._update_buttons)
        controller.jobs_changed.connect(self.refresh)
        self.refresh()

    def selected_job(self) -> str | None:
        rows = self.table.selectionModel().selectedRows()
        if not rows:
            return None
        return self.table.item(rows[0].row(), 0).data(Qt.UserRole)

    def refresh(self) -> None:
        selected = self.selected_job()
        records = self.controller.records()
        self.table.setRowCount(len(records))
        busy = set(self.controller.active_job_ids())
        for row, r in enumerate(records):
            state = r.state + (" ✓" if r.loaded else "") + (" …" if r.job_id in busy else "")
            stage = r.stage + (f" (restarted {r.restarts}×)" if r.restarts else "")
            values = (r.name, state, stage, progress_text(r), (r.started or r.created or "")
                      .replace("T", " ")[:19], r.profile, r.job_id)
            for col, value in enumerate(values):
                item = QTableWidgetItem(value)
                item.setData(Qt.UserRole, r.job_id)
                if r.message:
                    item.setToolTip(r.message)
                self.table.setItem(row, col, item)
            if r.job_id == selected:
                self.table.selectRow(row)
        self._update_buttons()

    def _update_buttons(self) -> None:
        job = self.selected_job()
        record = next((r for r in self.controller.records() if r.job_id == job), None)
        busy = job in self.controller.active_job_ids()
        self.cancel_button.setEnabled(bool(record and (busy or record.remote_active)))
        self.load_button.setEnabled(bool(record and record.state == "succeeded" and not busy))
        self.forget_button.setEnabled(bool(record and not busy))

    def _cancel(self) -> None:
        job = self.selected_job()
        if job:
            self.controller.cancel(job)

    def _load(self) -> None:
        job = self.selected_job()
        if job:
            self.controller.fetch(job)

    def _forget(self) -> None:
        job = self.selected_job()
        if job:
            try:
                self.controller.forget(job)
            except RsPluginError as e:
                self.controller.notify(str(e))
