"""The dock: choose imagery (and reference masks), a mode, parameters and a cluster; run; watch.

Built in code (no .ui file). It only collects choices: :class:`JobController` plans the job (via
the QGIS-free :func:`rs_qgis_plugin.logic.plan_job`) and runs the tasks.
"""

from __future__ import annotations

from typing import Any

from qgis.core import Qgis, QgsMapLayerProxyModel, QgsProject, QgsRasterLayer, QgsSettings
from qgis.gui import QgsCollapsibleGroupBox, QgsDockWidget, QgsFileWidget, QgsMapLayerComboBox
from qgis.PyQt.QtCore import QCoreApplication, Qt
from qgis.PyQt.QtWidgets import (
    QCheckBox,
    QComboBox,
    QDoubleSpinBox,
    QFormLayout,
    QFrame,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QMessageBox,
    QPushButton,
    QScrollArea,
    QSpinBox,
    QTableWidgetItem,
    QTabWidget,
    QVBoxLayout,
    QWidget,
)

from rs_qgis_plugin import settings
from rs_qgis_plugin.controller import JobController, LayerPick, PreparedRun
from rs_qgis_plugin.core.errors import RsPluginError
from rs_qgis_plugin.jobs_panel import JobsPanel, confirm_cancel
from rs_qgis_plugin.layer_table import (
    COL_IMAGE,
    COL_MASK,
    COL_PREDICT,
    COL_VALIDATE,
    LayerTable,
    MaskCombo,
)
from rs_qgis_plugin.logic import (
    FINE_TUNE_LR,
    MODE_EVALUATE,
    MODE_FINE_TUNE,
    MODE_PREDICT,
    MODE_TRAIN,
    MODE_TRAIN_PREDICT,
    MODEL_MODES,
    SETTINGS_PREFIX,
    TRAINING_MODES,
    RunParams,
)
from rs_qgis_plugin.pairing import split_counts
from rs_qgis_plugin.tasks import SubmitJobTask


# The model chooser's item for the model built into rs-cluster. Its other items hold "" (a model
# folder on this computer) or a job id, which starts with a letter or digit (JOB_ID_PATTERN).
BUILTIN_SOURCE = ":builtin"


def tr(text: str) -> str:
    return QCoreApplication.translate("RunDock", text)


def runs_on_text(summary: dict[str, str] | None, override: str = "") -> str:
    """Where a job of the chosen profile will run, in words: the master set here for the job,
    else what the profile's last "Test connection" reported (``settings.load_cluster_summary``)."""
    override = override.strip()
    if override:
        where = (tr("{master} on the login host").format(master=override)
                 if override.startswith("local") else
                 tr("Spark master {master}").format(master=override))
        return tr("Runs on: {where}, set here for this job instead of the cluster's "
                  "setting").format(where=where)
    master = (summary or {}).get("master")
    if not master:
        return tr("Where jobs run is set by the cluster's settings file; press Test connection "
                  "in the profile to see it.")
    source = summary.get("master_source") or "?"
    if source == "default":
        return tr("Runs on: {master} on the login host: the cluster has no Spark master "
                  "set").format(master=master)
    if master.startswith("local"):
        return tr("Runs on: {master} on the login host (from {source})").format(
            master=master, source=source)
    return tr("Runs on: Spark master {master} (from {source})").format(master=master,
                                                                       source=source)


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
        # The page scrolls, so a short dock still reaches every choice and a tall one gives the
        # extra room to the layer table.
        run_scroll = QScrollArea(tabs)
        run_scroll.setWidgetResizable(True)
        run_scroll.setFrameShape(QFrame.NoFrame)
        run_page = QWidget(run_scroll)
        run_scroll.setWidget(run_page)
        tabs.addTab(run_scroll, tr("Run"))
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
                            (tr("Fine-tune an existing model"), MODE_FINE_TUNE),
                            (tr("Evaluate a model against reference masks"), MODE_EVALUATE)):
            self.mode.addItem(label, mode)

        # layers: one row per imagery layer (masks are kept out), with its reference mask
        self.layer_table = LayerTable(self.project, run_page)
        self.layers = self.layer_table.table
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
        # Steps of 32: the pretrained default network halves a tile five times.
        self.tile_size = self._spin(32, 2048, 128, 32)
        self.overlap = self._spin(0, 1024, 32, 8)
        self.epochs = self._spin(1, 1000, 10)
        self.batch_size = self._spin(1, 1024, 16)
        self.workers = self._spin(1, 256, 1)
        self.arch = QComboBox(run_page)
        for label, arch in ((tr("cluster default"), ""),
                            (tr("pretrained EfficientNet-Lite0 U-Net"), "effnet_lite0_unet"),
                            (tr("U-Net with batch norm"), "unet_bn"),
                            (tr("2019 U-Net"), "unet2019")):
            self.arch.addItem(label, arch)
        self.arch.setToolTip(tr("The cluster's default is the U-Net over an ImageNet-pretrained "
                                "EfficientNet-Lite0 encoder (tiles a multiple of 32 px); the "
                                "2019 U-Net reproduces the thesis"))
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
        # At its minimum it reads "the model's": the card's threshold, which training tunes on
        # validation tiles; any other value overrides it.
        self.threshold.setRange(0.0, 0.99)
        self.threshold.setSingleStep(0.05)
        self.threshold.setSpecialValueText(tr("the model's"))
        self.threshold.setValue(0.0)
        self.threshold.setToolTip(tr("Building probability cut-off. \"the model's\": the one "
                                     "stored with the model (tuned on validation tiles when it "
                                     "was trained, else 0.5)"))
        self.polygons = QCheckBox(tr("Also make building polygons"), run_page)
        self.polygons.setChecked(True)
        self.regularize = QCheckBox(tr("squared"), run_page)
        self.regularize.setToolTip(tr("Snap each building's outline to its two wall directions "
                                      "(round or ragged shapes are kept as traced)"))
        self.tta = QCheckBox(tr("Average 8 flips and rotations"), run_page)
        self.tta.setToolTip(tr("Test-time augmentation: each window is predicted as it is and "
                               "turned 7 more ways, and the 8 predictions are averaged (8 "
                               "times the model's time)"))
        # What training holds out and when it stops: shown, so nothing is decided silently.
        # Percentages of the labelled rasters (whole rasters), the cluster's default 60/20/20.
        self.split_train = self._spin(1, 100, 60, 5)
        self.split_val = self._spin(0, 99, 20, 5)
        self.split_test = self._spin(0, 99, 20, 5)
        for box, what in ((self.split_train, tr("trained on")),
                          (self.split_val, tr("held out to pick the best epoch and stop early")),
                          (self.split_test, tr("held out for the final test score"))):
            box.setSuffix(" %")
            box.setToolTip(tr("Share of the labelled rasters {what}").format(what=what))
        self.split_note = QLabel(run_page)
        self.split_note.setWordWrap(True)
        self.early_stopping = QCheckBox(tr("Stop early"), run_page)
        self.early_stopping.setToolTip(tr("Stop training when the validation loss has not "
                                          "improved for this many epochs"))
        self.early_stopping.setChecked(True)
        self.patience = self._spin(1, 1000, 5)
        self.patience.setSuffix(tr(" epochs"))
        self.patience.setToolTip(tr("Epochs without improvement before training stops"))

        # Where the job runs: the cluster's settings file decides unless set here.
        self.runs_on = QLabel(run_page)
        self.runs_on.setWordWrap(True)
        self.runs_on.setTextFormat(Qt.PlainText)  # it quotes the cluster's own text
        self.master = QLineEdit(run_page)
        self.master.setPlaceholderText(tr("the cluster's setting"))
        self.master.setToolTip(tr("Spark master for this job: local[*], spark://host:7077, "
                                  "yarn or k8s://https://host:port; empty: the cluster's "
                                  "settings file decides"))
        self.executor_cores = self._spin(0, 1024, 0)
        self.executor_cores.setSpecialValueText(tr("cluster setting"))
        self.executor_memory = QLineEdit(run_page)
        self.executor_memory.setPlaceholderText(tr("cluster setting, e.g. 2g"))
        self.executor_memory.setToolTip(tr("Memory of each executor: a number, then k, m, g or "
                                           "t (512m, 4g)"))
        self.max_cores = self._spin(0, 100000, 0)
        self.max_cores.setSpecialValueText(tr("cluster setting"))
        self.max_cores.setToolTip(tr("The most cores the job takes of a shared cluster "
                                     "(spark.cores.max), so other users keep theirs"))
        self.queue = QLineEdit(run_page)
        self.queue.setPlaceholderText(tr("cluster setting"))
        self.queue.setToolTip(tr("YARN queue to submit to"))

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
        layout.addWidget(self.runs_on)
        form = QFormLayout()
        form.addRow(tr("Job name"), self.name)
        form.addRow(tr("Mode"), self.mode)
        layout.addLayout(form)
        layout.addWidget(self.layer_table, 1)
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
        pform.addRow(tr("Network"), self.arch)
        pform.addRow(tr("Model width"), self.base_filters)
        pform.addRow(tr("Learning rate"), self.learning_rate)
        split_row = QHBoxLayout()
        for box in (self.split_train, self.split_val, self.split_test):
            split_row.addWidget(box)
        pform.addRow(tr("Train / validation / test"), split_row)
        pform.addRow(self.split_note)
        stop_row = QHBoxLayout()
        stop_row.addWidget(self.early_stopping)
        stop_row.addWidget(QLabel(tr("after"), run_page))
        stop_row.addWidget(self.patience, 1)
        pform.addRow(tr("Early stopping"), stop_row)
        # Options side by side, not a row each: the room goes to the layer table. (Their
        # labels are short: a wider row would give the dock a horizontal scroll bar.)
        pform.addRow(tr("Threshold"), self._side_by_side(self.threshold, self.tta))
        pform.addRow("", self._side_by_side(self.polygons, self.regularize))
        layout.addWidget(params)
        resources = QgsCollapsibleGroupBox(tr("Cluster resources"), run_page)
        resources.setObjectName("RsBuildingsClusterResources")
        resources.setSaveCollapsedState(False)  # collapsed at each start: rarely needed
        rform = QFormLayout(resources)
        rform.addRow(tr("Spark master"), self.master)
        rform.addRow(tr("Executor cores"), self.executor_cores)
        rform.addRow(tr("Executor memory"), self.executor_memory)
        rform.addRow(tr("Max cores"), self.max_cores)
        rform.addRow(tr("YARN queue"), self.queue)
        resources.setCollapsed(True)
        layout.addWidget(resources)
        self.resources_box = resources
        buttons = QHBoxLayout()
        buttons.addWidget(self.run_button, 1)
        buttons.addWidget(self.cancel_button)
        layout.addLayout(buttons)
        layout.addWidget(self.status)

        self.mode.currentIndexChanged.connect(self._mode_switched)
        self.layer_table.changed.connect(self._update_split_note)
        for box in (self.split_train, self.split_val, self.split_test):
            box.valueChanged.connect(self._update_split_note)
        self.early_stopping.toggled.connect(self._mode_changed)
        self.polygons.toggled.connect(self._mode_changed)  # squaring needs polygons
        self.model_source.currentIndexChanged.connect(self._mode_changed)
        self.run_button.clicked.connect(self.run)
        self.cancel_button.clicked.connect(self.cancel)
        self.edit_profiles.clicked.connect(self.open_profiles)
        self.profile.currentTextChanged.connect(self.update_runs_on)
        self.master.textChanged.connect(self.update_runs_on)
        self.project.layersAdded.connect(self.refresh_layers)
        self.project.layersRemoved.connect(self.refresh_layers)
        controller.jobs_changed.connect(self._jobs_changed)
        self.jobs_panel.status_changed.connect(self.status.setText)
        self.refresh_profiles()
        self.refresh_layers()
        self.refresh_models()
        self._mode_changed()

    @staticmethod
    def _side_by_side(first: QWidget, second: QWidget) -> QHBoxLayout:
        row = QHBoxLayout()
        row.setContentsMargins(0, 0, 0, 0)
        row.addWidget(first)
        row.addWidget(second, 1)
        return row

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
        self.update_runs_on()

    def update_runs_on(self, *args: Any) -> None:
        """Says where a job of the chosen profile will run (after a Test connection of it)."""
        self.runs_on.setText(runs_on_text(
            settings.load_cluster_summary(self.profile.currentText()), self.master.text()))

    def refresh_models(self) -> None:
        # The first refresh (an empty list) chooses the built-in model, as does a refresh that
        # no longer lists the job chosen before; any choice still listed is kept.
        current = self.model_source.currentData()
        self.model_source.blockSignals(True)
        self.model_source.clear()
        self.model_source.addItem(tr("Built-in model (ships with rs-cluster; no labels needed)"),
                                  BUILTIN_SOURCE)
        self.model_source.addItem(tr("Model folder on this computer"), "")
        for r in self.controller.records():
            if r.state in ("succeeded",) and r.mode in TRAINING_MODES:
                self.model_source.addItem(tr("Cluster: model of job {name} ({job})").format(
                    name=r.name, job=r.job_id), r.job_id)
        index = self.model_source.findData(current) if current is not None else 0
        self.model_source.setCurrentIndex(max(0, index))
        self.model_source.blockSignals(False)

    def refresh_layers(self, *args: Any) -> None:
        self.layer_table.refresh()

    def _rows(self) -> list[tuple[str, MaskCombo]]:
        return [(lid, combo) for lid, _, combo, _ in self.layer_table.rows()]

    def _item(self, layer_id: str) -> QTableWidgetItem:
        return self.layer_table.row_of(layer_id)[0]

    def set_imagery(self, layer: QgsRasterLayer, checked: bool = True,
                    mask: QgsRasterLayer | None = None, *, keep_mask: bool = False) -> None:
        """Ticks an imagery layer and picks its reference mask (as the user would); with
        ``keep_mask`` the mask stays the one paired automatically."""
        item, combo, _ = self.layer_table.row_of(layer.id())
        item.setCheckState(Qt.Checked if checked else Qt.Unchecked)
        if not keep_mask:
            combo.setLayer(mask)

    def set_predicted(self, layer: QgsRasterLayer, predicted: bool = True) -> None:
        """Ticks or unticks "predict on" (Train, then predict) for an imagery layer."""
        self.layer_table.row_of(layer.id())[2].setCheckState(
            Qt.Checked if predicted else Qt.Unchecked)

    def set_validated(self, layer: QgsRasterLayer, validated: bool = True) -> None:
        """Ticks or unticks "validate on" (training) for an imagery layer."""
        self.layer_table.validate_item(layer.id()).setCheckState(
            Qt.Checked if validated else Qt.Unchecked)

    def _mode_switched(self, *args: Any) -> None:
        """A new mode starts from a clean slate: no ticks, the automatic masks, no job name."""
        self.layer_table.reset()
        self.name.clear()
        self._mode_changed()

    def _mode_changed(self, *args: Any) -> None:
        mode = self.mode.currentData()
        needs_model = mode in MODEL_MODES
        self.model_box.setEnabled(needs_model)
        self.model_dir.setEnabled(needs_model and self.model_source.currentData() == "")
        trains = mode in TRAINING_MODES
        for w in (self.epochs, self.workers, self.learning_rate):
            w.setEnabled(trains)
        # Fine-tuning keeps the network and width of the model it starts from.
        for w in (self.arch, self.base_filters):
            w.setEnabled(trains and mode != MODE_FINE_TUNE)
        self.learning_rate.setSpecialValueText(
            tr("{rate} (fine-tuning default)").format(rate=f"{FINE_TUNE_LR:g}")
            if mode == MODE_FINE_TUNE else tr("cluster default"))
        for w in (self.split_train, self.split_val, self.split_test, self.split_note,
                  self.early_stopping):
            w.setEnabled(trains)
        self.patience.setEnabled(trains and self.early_stopping.isChecked())
        predicts = mode not in (MODE_TRAIN, MODE_FINE_TUNE)
        for w in (self.overlap, self.threshold, self.polygons, self.tta):
            w.setEnabled(predicts)
        self.regularize.setEnabled(predicts and self.polygons.isChecked())
        self.layers.setColumnHidden(COL_MASK, mode == MODE_PREDICT)
        self.layers.setColumnHidden(COL_PREDICT, mode != MODE_TRAIN_PREDICT)
        self.layers.setColumnHidden(COL_VALIDATE, not trains)
        self.layers.horizontalHeaderItem(COL_IMAGE).setText(
            tr("Train on") if trains else tr("Imagery"))
        self.layer_table.mode_trains = mode != MODE_PREDICT
        self.layer_table.mode_predicts_separately = mode == MODE_TRAIN_PREDICT
        self.layer_table._update_counts()

    def split(self) -> tuple[float, float, float]:
        return (self.split_train.value() / 100, self.split_val.value() / 100,
                self.split_test.value() / 100)

    def _update_split_note(self, *args: Any) -> None:
        """Says up front how many of the ticked pairs the split trains on and holds out."""
        if self.mode.currentData() not in TRAINING_MODES:
            self.split_note.setText("")
            return
        total = sum(p for p in (self.split_train.value(), self.split_val.value(),
                                self.split_test.value()))
        if total != 100:
            self.split_note.setText(tr("The shares add up to {total} %, not 100 %.").format(
                total=total))
            return
        ticked = [lid for lid, combo in self._rows()
                  if self._item(lid).checkState() == Qt.Checked and combo.currentLayer()]
        pairs = len(ticked)
        chosen = len(set(ticked) & set(self.layer_table.validated()))
        self.split_val.setEnabled(not chosen)
        if chosen:
            share_train, _, share_test = self.split()
            train, _, test = split_counts(pairs - chosen, (
                share_train / (share_train + share_test), 0.0,
                share_test / (share_train + share_test)))
            self.split_note.setText(tr("{n} ticked pairs: {val} chosen for validation, {train} "
                                       "train, {test} test (whole rasters)").format(
                n=pairs, val=chosen, train=train, test=test))
            return
        train, val, test = split_counts(pairs, self.split())
        self.split_note.setText(tr("{n} ticked pairs: {train} train, {val} validation, {test} "
                                   "test (whole rasters)").format(
            n=pairs, train=train, val=val, test=test))

    def _jobs_changed(self) -> None:
        active = self.last_task is not None and \
            self.last_task.job_id in self.controller.active_job_ids()
        self.cancel_button.setEnabled(active)
        self.refresh_models()

    # -- the run -----------------------------------------------------------------------------------------
    def picks(self) -> list[LayerPick]:
        """The ticked rows as the mode reads them. Train, then predict: "train on" ticks train
        (with their masks), "predict on" ticks are predicted (a held-out raster's mask stays
        home). Training and evaluation refuse a ticked raster without a mask rather than
        dropping it silently."""
        mode = self.mode.currentData()
        out = []
        for lid, item, combo, predict_item in self.layer_table.rows():
            image = self.project.mapLayer(lid)
            if image is None:
                continue
            ticked = item.checkState() == Qt.Checked
            mask = combo.currentLayer() if mode != MODE_PREDICT else None
            if ticked and mode != MODE_PREDICT and mask is None:
                raise RsPluginError(tr("{layer} is ticked but has no reference mask: pick one "
                                       "or untick it").format(layer=item.text()))
            validate = (mode in TRAINING_MODES and ticked
                        and self.layer_table.validate_item(lid).checkState() == Qt.Checked)
            if mode == MODE_TRAIN_PREDICT:
                predicted = predict_item.checkState() == Qt.Checked
                if ticked or predicted:
                    out.append(LayerPick(image, mask if ticked else None, predicted, validate))
            elif ticked:
                out.append(LayerPick(image, mask, validate=validate))
        return out

    def run_params(self) -> RunParams:
        mode = self.mode.currentData()
        source = self.model_source.currentData()
        builtin = source == BUILTIN_SOURCE
        model_job = None if builtin else (source or None)
        tunes = mode == MODE_FINE_TUNE  # the model's own network and width, so neither is sent
        return RunParams(
            mode=mode, tile_size=self.tile_size.value(), overlap=self.overlap.value(),
            epochs=self.epochs.value(), batch_size=self.batch_size.value(),
            workers=self.workers.value(),
            threshold=round(self.threshold.value(), 4) if self.threshold.value() > 0 else None,
            polygons=self.polygons.isChecked(), tta=self.tta.isChecked(),
            regularize=self.regularize.isChecked(), model_builtin=builtin, model_job=model_job,
            model_dir=None if builtin or model_job else (self.model_dir.filePath() or None),
            base_filters=None if tunes else (self.base_filters.value() or None),
            arch=None if tunes else (self.arch.currentData() or None),
            learning_rate=round(self.learning_rate.value(), 6) or None,
            patience=self.patience.value() if self.early_stopping.isChecked() else 0,
            split=self.split() if mode in TRAINING_MODES else None,
            master=self.master.text().strip() or None,
            executor_cores=self.executor_cores.value() or None,
            executor_memory=self.executor_memory.text().strip() or None,
            max_cores=self.max_cores.value() or None, queue=self.queue.text().strip() or None)

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
            if not self._confirm_held_out():
                self.status.setText(tr("Not started: choose rasters the model was not trained "
                                       "on."))
                return None
            mode = self.run_params().mode
            task = self.controller.start(profile, prepared, mode)
        except (RsPluginError, ValueError) as e:
            self.status.setText(str(e))
            self.controller.notify(str(e), Qgis.Warning)
            return None
        if mode in TRAINING_MODES:
            remember_training(prepared.planned.spec.job_id, self._trained_sources())
        # Nothing of this run carries silently into the next one.
        self.layer_table.reset()
        self.name.clear()
        self.last_task = task
        self.cancel_button.setEnabled(True)
        self.status.setText(tr("Job {job} started; follow it in the Jobs tab.").format(
            job=prepared.planned.spec.job_id))
        return task

    def cancel(self) -> None:
        job = self.jobs_panel.selected_job() or (self.last_task.job_id if self.last_task else None)
        if job and confirm_cancel(self, self.controller, job):
            self.controller.cancel(job)

    def open_profiles(self) -> None:
        from rs_qgis_plugin.profiles_dialog import ProfilesDialog

        dialog = ProfilesDialog(self)
        dialog.exec_()
        self.refresh_profiles()

    def _trained_sources(self) -> list[str]:
        return [src for p in self.picks() if p.mask is not None
                for src in (p.image.source(), p.mask.source())]

    def _confirm_held_out(self) -> bool:
        """Before evaluating against (or predicting) rasters the chosen model was trained on,
        asks: such scores say how well it remembers, not how well it works."""
        mode = self.mode.currentData()
        if mode not in (MODE_EVALUATE, MODE_TRAIN_PREDICT):
            return True
        picks = self.picks()
        if mode == MODE_EVALUATE:
            source = self.model_source.currentData() or ""
            # The built-in model was not trained here: this dock knows nothing it was trained on.
            trained = set(trained_on(source) if source != BUILTIN_SOURCE else ())
            overlap = [p.image.name() for p in picks
                       if p.image.source() in trained or (p.mask and p.mask.source() in trained)]
            question = tr("The model was trained on {names}. Scores against rasters it was "
                          "trained on overstate how well it works. Evaluate anyway?")
        else:
            overlap = [p.image.name() for p in picks if p.mask is not None and p.predict]
            question = tr("{names} would be trained on and predicted. A prediction of a training "
                          "raster says little about new imagery. Run anyway?")
        if not overlap:
            return True
        names = ", ".join(overlap[:5]) + (tr(" and {n} more").format(n=len(overlap) - 5)
                                          if len(overlap) > 5 else "")
        answer = QMessageBox.question(self, tr("Rasters trained on"),
                                      question.format(names=names),
                                      QMessageBox.Yes | QMessageBox.No, QMessageBox.No)
        return answer == QMessageBox.Yes

    def disconnect_project(self) -> None:
        self.layer_table.forget_layers()
        for signal in (self.project.layersAdded, self.project.layersRemoved):
            try:
                signal.disconnect(self.refresh_layers)
            except TypeError:
                pass


# Which layer files each training job started here was trained on (images and masks), so that an
# evaluation with its model can warn about rasters it has seen. Kept across restarts.
TRAINED_ON = SETTINGS_PREFIX + "trained_on"


def remember_training(job_id: str, sources: list[str]) -> None:
    QgsSettings().setValue(f"{TRAINED_ON}/{job_id}", sources)


def trained_on(job_id: str) -> list[str]:
    if not job_id:
        return []
    value = QgsSettings().value(f"{TRAINED_ON}/{job_id}", [])
    return [value] if isinstance(value, str) else list(value or [])
