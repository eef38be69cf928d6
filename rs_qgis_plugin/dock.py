"""The dock: choose imagery (and reference masks), a mode, parameters and a cluster; run; watch.

Built in code (no .ui file). It only collects choices: :class:`JobController` plans the job (via
the QGIS-free :func:`rs_qgis_plugin.logic.plan_job`) and runs the tasks.
"""

from __future__ import annotations

from typing import Any

from qgis.core import Qgis, QgsMapLayerProxyModel, QgsProject, QgsRasterLayer
from qgis.gui import QgsDockWidget, QgsFileWidget, QgsMapLayerComboBox
from qgis.PyQt.QtCore import QCoreApplication, Qt
from qgis.PyQt.QtWidgets import (
    QCheckBox,
    QComboBox,
    QDoubleSpinBox,
    QFormLayout,
    QGroupBox,
    QHBoxLayout,
    QHeaderView,
    QLabel,
    QLineEdit,
    QPushButton,
    QSpinBox,
    QTableWidget,
    QTableWidgetItem,
    QTabWidget,
    QVBoxLayout,
    QWidget,
)

from rs_qgis_plugin import settings
from rs_qgis_plugin.controller import JobController, LayerPick, PreparedRun
from rs_qgis_plugin.core.errors import RsPluginError
from rs_qgis_plugin.jobs_panel import JobsPanel
from rs_qgis_plugin.results import JOB_PROPERTY
from rs_qgis_plugin.logic import (
    MODE_EVALUATE,
    MODE_PREDICT,
    MODE_TRAIN,
    MODE_TRAIN_PREDICT,
    RunParams,
)
from rs_qgis_plugin.tasks import SubmitJobTask


def tr(text: str) -> str:
    return QCoreApplication.translate("RunDock", text)


class RunDock(QgsDockWidget):
    def __init__(self, iface: Any, controller: JobController, parent: QWidget | None = None,
                 project: QgsProject | None = None) -> None:
        super().__init__(tr("RS Buildings"), parent)
        self.setObjectName("RsBuildingsDock")
        self.iface = iface
        self.controller = controller
        self.project = project or QgsProject.instance()
        self.last_task: SubmitJobTask | None = None

        tabs = QTabWidget(self)
        run_page = QWidget(tabs)
        tabs.addTab(run_page, tr("Run"))
        self.jobs_panel = JobsPanel(controller, tabs)
        tabs.addTab(self.jobs_panel, tr("Jobs"))
        self.tabs = tabs
        self.setWidget(tabs)

        # cluster
        self.profile = QComboBox(run_page)
        self.edit_profiles = QPushButton(tr("Connections…"), run_page)
        self.name = QLineEdit(run_page)
        self.name.setPlaceholderText(tr("job name (default: the first image)"))
        self.mode = QComboBox(run_page)
        for label, mode in ((tr("Predict with an existing model"), MODE_PREDICT),
                            (tr("Train a model"), MODE_TRAIN),
                            (tr("Train, then predict"), MODE_TRAIN_PREDICT),
                            (tr("Evaluate a model against reference masks"), MODE_EVALUATE)):
            self.mode.addItem(label, mode)

        # layers: one row per raster layer, checkable, with its reference mask
        self.layers = QTableWidget(0, 2, run_page)
        self.layers.setHorizontalHeaderLabels([tr("Imagery"), tr("Reference mask")])
        self.layers.horizontalHeader().setSectionResizeMode(QHeaderView.Stretch)
        self.layers.verticalHeader().setVisible(False)
        self.clip = QCheckBox(tr("Clip to the current map extent"), run_page)
        # Or to the extent of a polygon layer (an area of interest); it wins over the map extent.
        self.clip_layer = QgsMapLayerComboBox(run_page)
        self.clip_layer.setFilters(QgsMapLayerProxyModel.PolygonLayer)
        self.clip_layer.setAllowEmptyLayer(True)
        self.clip_layer.setLayer(None)
        self.clip_layer.setToolTip(tr("Send only the part of the imagery inside this layer's extent"))

        # model
        self.model_source = QComboBox(run_page)
        self.model_dir = QgsFileWidget(run_page)
        self.model_dir.setStorageMode(QgsFileWidget.GetDirectory)
        self.model_dir.setDialogTitle(tr("Model folder (model.json + model.keras)"))

        # parameters
        self.tile_size = self._spin(16, 2048, 128, 16)
        self.overlap = self._spin(0, 1024, 32, 8)
        self.epochs = self._spin(1, 1000, 10)
        self.batch_size = self._spin(1, 1024, 16)
        self.workers = self._spin(1, 256, 1)
        # 0 leaves the choice to the cluster's rs-cluster defaults (64 filters, 1e-4)
        self.base_filters = self._spin(0, 256, 0, 8)
        self.base_filters.setSpecialValueText(tr("cluster default"))
        self.base_filters.setToolTip(tr("Filters of the U-Net's first level: smaller trains "
                                        "faster, larger learns more"))
        self.learning_rate = QDoubleSpinBox(run_page)
        self.learning_rate.setDecimals(5)
        self.learning_rate.setRange(0.0, 0.1)
        self.learning_rate.setSingleStep(0.0001)
        self.learning_rate.setSpecialValueText(tr("cluster default"))
        self.learning_rate.setToolTip(tr("Adam learning rate of one worker (scaled by the "
                                         "number of workers on the cluster)"))
        self.threshold = QDoubleSpinBox(run_page)
        self.threshold.setRange(0.01, 0.99)
        self.threshold.setSingleStep(0.05)
        self.threshold.setValue(0.5)
        self.polygons = QCheckBox(tr("Also make building polygons"), run_page)
        self.polygons.setChecked(True)

        self.run_button = QPushButton(tr("Run on the cluster"), run_page)
        self.cancel_button = QPushButton(tr("Cancel"), run_page)
        self.cancel_button.setEnabled(False)
        self.status = QLabel(run_page)
        self.status.setWordWrap(True)
        # It shows error messages, which may quote the cluster: text, never markup or links.
        self.status.setTextFormat(Qt.PlainText)

        layout = QVBoxLayout(run_page)
        row = QHBoxLayout()
        row.addWidget(QLabel(tr("Cluster"), run_page))
        row.addWidget(self.profile, 1)
        row.addWidget(self.edit_profiles)
        layout.addLayout(row)
        form = QFormLayout()
        form.addRow(tr("Job name"), self.name)
        form.addRow(tr("Mode"), self.mode)
        layout.addLayout(form)
        layout.addWidget(self.layers, 1)
        layout.addWidget(self.clip)
        clip_row = QHBoxLayout()
        clip_row.addWidget(QLabel(tr("or clip to the extent of"), run_page))
        clip_row.addWidget(self.clip_layer, 1)
        layout.addLayout(clip_row)
        model_box = QGroupBox(tr("Model"), run_page)
        model_form = QFormLayout(model_box)
        model_form.addRow(tr("Use"), self.model_source)
        model_form.addRow(tr("Folder"), self.model_dir)
        layout.addWidget(model_box)
        self.model_box = model_box
        params = QGroupBox(tr("Parameters"), run_page)
        pform = QFormLayout(params)
        pform.addRow(tr("Tile size (px)"), self.tile_size)
        pform.addRow(tr("Overlap (px)"), self.overlap)
        pform.addRow(tr("Epochs"), self.epochs)
        pform.addRow(tr("Batch size"), self.batch_size)
        pform.addRow(tr("Workers"), self.workers)
        pform.addRow(tr("Model width"), self.base_filters)
        pform.addRow(tr("Learning rate"), self.learning_rate)
        pform.addRow(tr("Threshold"), self.threshold)
        pform.addRow("", self.polygons)
        layout.addWidget(params)
        buttons = QHBoxLayout()
        buttons.addWidget(self.run_button, 1)
        buttons.addWidget(self.cancel_button)
        layout.addLayout(buttons)
        layout.addWidget(self.status)

        self.mode.currentIndexChanged.connect(self._mode_changed)
        self.model_source.currentIndexChanged.connect(self._mode_changed)
        self.run_button.clicked.connect(self.run)
        self.cancel_button.clicked.connect(self.cancel)
        self.edit_profiles.clicked.connect(self.open_profiles)
        self.project.layersAdded.connect(self.refresh_layers)
        self.project.layersRemoved.connect(self.refresh_layers)
        controller.jobs_changed.connect(self._jobs_changed)
        self.refresh_profiles()
        self.refresh_layers()
        self.refresh_models()
        self._mode_changed()

    def _spin(self, low: int, high: int, value: int, step: int = 1) -> QSpinBox:
        box = QSpinBox(self)
        box.setRange(low, high)
        box.setSingleStep(step)
        box.setValue(value)
        return box

    # -- lists -------------------------------------------------------------------------------------------
    def refresh_profiles(self) -> None:
        current = self.profile.currentText() or settings.last_profile()
        self.profile.clear()
        self.profile.addItems(settings.profile_names())
        if current and self.profile.findText(current) >= 0:
            self.profile.setCurrentText(current)

    def refresh_models(self) -> None:
        current = self.model_source.currentData()
        self.model_source.blockSignals(True)
        self.model_source.clear()
        self.model_source.addItem(tr("Model folder on this computer"), "")
        for r in self.controller.records():
            if r.state in ("succeeded",) and r.mode in ("train", "train_predict"):
                self.model_source.addItem(tr("Cluster: model of job {name} ({job})").format(
                    name=r.name, job=r.job_id), r.job_id)
        index = self.model_source.findData(current) if current else 0
        self.model_source.setCurrentIndex(max(0, index))
        self.model_source.blockSignals(False)

    def refresh_layers(self, *args: Any) -> None:
        checked = {lid for lid, _ in self._rows() if self._item(lid).checkState() == Qt.Checked}
        masks = {lid: combo.currentLayer() for lid, combo in self._rows()}
        # Masks this plugin brought back are no imagery (they stay pickable as reference masks).
        rasters = [layer for layer in self.project.mapLayers().values()
                   if isinstance(layer, QgsRasterLayer) and not layer.customProperty(JOB_PROPERTY)]
        self.layers.setRowCount(len(rasters))
        for row, layer in enumerate(sorted(rasters, key=lambda lyr: lyr.name().lower())):
            item = QTableWidgetItem(layer.name())
            item.setFlags(Qt.ItemIsUserCheckable | Qt.ItemIsEnabled | Qt.ItemIsSelectable)
            item.setCheckState(Qt.Checked if layer.id() in checked else Qt.Unchecked)
            item.setData(Qt.UserRole, layer.id())
            item.setToolTip(layer.source())
            self.layers.setItem(row, 0, item)
            combo = QgsMapLayerComboBox(self.layers)
            combo.setFilters(QgsMapLayerProxyModel.RasterLayer)
            combo.setAllowEmptyLayer(True)
            combo.setLayer(masks.get(layer.id()))
            self.layers.setCellWidget(row, 1, combo)

    def _rows(self) -> list[tuple[str, QgsMapLayerComboBox]]:
        out = []
        for row in range(self.layers.rowCount()):
            item = self.layers.item(row, 0)
            combo = self.layers.cellWidget(row, 1)
            if item is not None and combo is not None:
                out.append((item.data(Qt.UserRole), combo))
        return out

    def _item(self, layer_id: str) -> QTableWidgetItem:
        for row in range(self.layers.rowCount()):
            item = self.layers.item(row, 0)
            if item is not None and item.data(Qt.UserRole) == layer_id:
                return item
        raise KeyError(layer_id)

    def set_imagery(self, layer: QgsRasterLayer, checked: bool = True,
                    mask: QgsRasterLayer | None = None) -> None:
        """Ticks an imagery layer and picks its reference mask (as the user would)."""
        self._item(layer.id()).setCheckState(Qt.Checked if checked else Qt.Unchecked)
        for lid, combo in self._rows():
            if lid == layer.id():
                combo.setLayer(mask)

    def _mode_changed(self, *args: Any) -> None:
        mode = self.mode.currentData()
        needs_model = mode in (MODE_PREDICT, MODE_EVALUATE)
        self.model_box.setEnabled(needs_model)
        self.model_dir.setEnabled(needs_model and not self.model_source.currentData())
        trains = mode in (MODE_TRAIN, MODE_TRAIN_PREDICT)
        for w in (self.epochs, self.workers, self.base_filters, self.learning_rate):
            w.setEnabled(trains)
        predicts = mode != MODE_TRAIN
        for w in (self.overlap, self.threshold, self.polygons):
            w.setEnabled(predicts)
        self.layers.setColumnHidden(1, mode == MODE_PREDICT)

    def _jobs_changed(self) -> None:
        active = self.last_task is not None and \
            self.last_task.job_id in self.controller.active_job_ids()
        self.cancel_button.setEnabled(active)
        self.refresh_models()

    # -- the run -----------------------------------------------------------------------------------------
    def picks(self) -> list[LayerPick]:
        out = []
        for lid, combo in self._rows():
            image = self.project.mapLayer(lid)
            if image is None or self._item(lid).checkState() != Qt.Checked:
                continue
            mask = combo.currentLayer() if not self.layers.isColumnHidden(1) else None
            out.append(LayerPick(image, mask if isinstance(mask, QgsRasterLayer) else None))
        return out

    def run_params(self) -> RunParams:
        mode = self.mode.currentData()
        model_job = self.model_source.currentData() or None
        return RunParams(
            mode=mode, tile_size=self.tile_size.value(), overlap=self.overlap.value(),
            epochs=self.epochs.value(), batch_size=self.batch_size.value(),
            workers=self.workers.value(), threshold=round(self.threshold.value(), 4),
            polygons=self.polygons.isChecked(), model_job=model_job,
            model_dir=None if model_job else (self.model_dir.filePath() or None),
            base_filters=self.base_filters.value() or None,
            learning_rate=round(self.learning_rate.value(), 6) or None)

    def job_name(self, picks: list[LayerPick]) -> str:
        name = self.name.text().strip()
        if name:
            return name
        first = picks[0].image.name() if picks else "job"
        return first if len(picks) == 1 else f"{first} +{len(picks) - 1}"

    def prepare_run(self) -> PreparedRun:
        picks = self.picks()
        clip = crs = upp = None
        area = self.clip_layer.currentLayer()
        if area is not None:
            clip, crs = area.extent(), area.crs()
        elif self.clip.isChecked() and self.iface is not None:
            canvas = self.iface.mapCanvas()
            clip, crs = canvas.extent(), canvas.mapSettings().destinationCrs()
            upp = canvas.mapUnitsPerPixel()
        return self.controller.prepare(self.job_name(picks), self.run_params(), picks,
                                       clip_extent=clip, clip_crs=crs, units_per_pixel=upp)

    def run(self) -> SubmitJobTask | None:
        profile = self.profile.currentText()
        try:
            if not profile:
                raise RsPluginError(tr("create a cluster connection first (Connections…)"))
            prepared = self.prepare_run()
            task = self.controller.start(profile, prepared, self.run_params().mode)
        except (RsPluginError, ValueError) as e:
            self.status.setText(str(e))
            self.controller.notify(str(e), Qgis.Warning)
            return None
        self.last_task = task
        self.cancel_button.setEnabled(True)
        self.status.setText(tr("Job {job} started; follow it in the Jobs tab.").format(
            job=prepared.planned.spec.job_id))
        return task

    def cancel(self) -> None:
        job = self.jobs_panel.selected_job() or (self.last_task.job_id if self.last_task else None)
        if job:
            self.controller.cancel(job)

    def open_profiles(self) -> None:
        from rs_qgis_plugin.profiles_dialog import ProfilesDialog

        dialog = ProfilesDialog(self)
        dialog.exec_()
        self.refresh_profiles()

    def disconnect_project(self) -> None:
        for signal in (self.project.layersAdded, self.project.layersRemoved):
            try:
                signal.disconnect(self.refresh_layers)
            except TypeError:
                pass
