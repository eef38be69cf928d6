"""The dock's layer table: one row per imagery layer, named by file and folder, paired with its
reference mask automatically, sortable and filterable, with select all/none and a count.

Which layers are masks and which mask is whose is decided by :mod:`rs_qgis_plugin.pairing`
(QGIS-free); this widget only shows the decision and keeps the analyst's changes to it.
"""

from __future__ import annotations

import os
from typing import Any

from qgis.core import QgsProject, QgsRasterLayer
from qgis.PyQt.QtCore import QCoreApplication, Qt, pyqtSignal
from qgis.PyQt.QtWidgets import (
    QComboBox,
    QHBoxLayout,
    QHeaderView,
    QLabel,
    QLineEdit,
    QPushButton,
    QTableWidget,
    QTableWidgetItem,
    QVBoxLayout,
    QWidget,
)

from rs_qgis_plugin.pairing import RasterInfo, display_labels, looks_like_mask, natural_key, pair_layers
from rs_qgis_plugin.results import JOB_PROPERTY

COL_IMAGE, COL_MASK, COL_PREDICT, COL_VALIDATE = 0, 1, 2, 3
LAYER_ID = Qt.UserRole


def tr(text: str) -> str:
    return QCoreApplication.translate("LayerTable", text)


def layer_file(layer: QgsRasterLayer) -> str:
    """The local file a raster layer reads ("" for a web or memory layer)."""
    path = layer.source().split("|", 1)[0] if layer.providerType() == "gdal" else ""
    return path if path and os.path.isfile(path) else ""


class _SortItem(QTableWidgetItem):
    """Sorts tiles as numbered (``austin1_2`` before ``austin1_10``); the tick-only column by
    its tick."""

    def __lt__(self, other: QTableWidgetItem) -> bool:
        if self.text() or other.text():
            return natural_key(self.text()) < natural_key(other.text())
        return int(self.checkState()) < int(other.checkState())


class MaskCombo(QComboBox):
    """A reference mask choice labelled like the table (``austin1 — gt/``), masks first."""

    def __init__(self, project: QgsProject, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.project = project
        self.layer_id = ""  # the image row it belongs to
        self.setSizeAdjustPolicy(QComboBox.AdjustToMinimumContentsLengthWithIcon)
        self.setMinimumContentsLength(12)

    def set_choices(self, masks: list[tuple[str, str]], others: list[tuple[str, str]],
                    current: str | None) -> None:
        self.blockSignals(True)
        self.clear()
        self.addItem(tr("(no mask)"), "")
        for lid, label in masks:
            self.addItem(label, lid)
        if others:  # a mask the values check missed can still be picked, after the masks
            self.insertSeparator(self.count())
            for lid, label in others:
                self.addItem(label, lid)
        index = self.findData(current) if current else 0
        self.setCurrentIndex(max(0, index))
        self.blockSignals(False)

    def setLayer(self, layer: QgsRasterLayer | None) -> None:  # noqa: N802 (QgsMapLayerComboBox's)
        index = self.findData(layer.id()) if layer is not None else 0
        self.setCurrentIndex(max(0, index))

    def currentLayer(self) -> QgsRasterLayer | None:  # noqa: N802
        lid = self.currentData()
        layer = self.project.mapLayer(lid) if lid else None
        return layer if isinstance(layer, QgsRasterLayer) else None


class LayerTable(QWidget):
    """Rows of imagery layers: a tick (use / train on), the reference mask, a "predict on" tick
    (shown for *Train, then predict*) and a "validate on" tick (training: these pairs are the
    validation split). ``changed`` fires on every tick or mask change."""

    changed = pyqtSignal()

    def __init__(self, project: QgsProject, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.project = project
        self.mode_trains = False
        self.mode_predicts_separately = False
        self._mask_of_file: dict[str, bool] = {}  # path -> is a mask (read once per file)
        self._auto_pairs: dict[str, str] = {}
        # What the analyst chose over the automatic pairing and "predict on" default; the rest
        # follows the pairing as layers come and go.
        self._mask_chosen: dict[str, str] = {}  # image id -> mask id, "" for "no mask"
        self._predict_chosen: dict[str, bool] = {}
        self._watched: set[str] = set()
        self.labels: dict[str, str] = {}
        self.unpaired_images: tuple[str, ...] = ()
        self.unpaired_masks: tuple[str, ...] = ()

        self.filter = QLineEdit(self)
        self.filter.setPlaceholderText(tr("Filter layers by name or folder…"))
        self.filter.setClearButtonEnabled(True)
        self.select_all = QPushButton(tr("All"), self)
        self.select_all.setToolTip(tr("Tick every shown layer that this mode can use"))
        self.select_none = QPushButton(tr("None"), self)
        self.select_none.setToolTip(tr("Untick every shown layer"))
        self.count = QLabel(self)
        self.table = QTableWidget(0, 4, self)
        self.table.setHorizontalHeaderLabels([tr("Imagery"), tr("Reference mask"),
                                              tr("Predict"), tr("Validate")])
        self.table.horizontalHeaderItem(COL_PREDICT).setToolTip(tr(
            "Predict these rasters with the model just trained (by default: those without a "
            "mask)"))
        self.table.horizontalHeaderItem(COL_VALIDATE).setToolTip(tr(
            "Use these pairs for validation (picking the best epoch, early stopping) instead "
            "of drawing them by the split"))
        header = self.table.horizontalHeader()
        header.setSectionResizeMode(COL_IMAGE, QHeaderView.Stretch)
        header.setSectionResizeMode(COL_MASK, QHeaderView.Stretch)
        header.setSectionResizeMode(COL_PREDICT, QHeaderView.ResizeToContents)
        header.setSectionResizeMode(COL_VALIDATE, QHeaderView.ResizeToContents)
        self.table.verticalHeader().setVisible(False)
        self.table.setTextElideMode(Qt.ElideMiddle)  # keep the folder in view
        self.table.verticalHeader().setDefaultSectionSize(22)
        self.table.setMinimumHeight(200)
        self.table.setSortingEnabled(True)
        self.table.sortByColumn(COL_IMAGE, Qt.AscendingOrder)
        self.note = QLabel(self)
        self.note.setWordWrap(True)
        self.note.setTextFormat(Qt.PlainText)  # layer names are the analyst's text

        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        row = QHBoxLayout()
        row.addWidget(self.filter, 1)
        row.addWidget(self.select_all)
        row.addWidget(self.select_none)
        layout.addLayout(row)
        layout.addWidget(self.table, 1)
        counts = QHBoxLayout()
        counts.addWidget(self.count)
        counts.addStretch(1)
        layout.addLayout(counts)
        layout.addWidget(self.note)

        self.filter.textChanged.connect(self._apply_filter)
        self.select_all.clicked.connect(lambda: self.tick_shown(True))
        self.select_none.clicked.connect(lambda: self.tick_shown(False))
        self.table.itemChanged.connect(self._item_changed)

    # -- rows ---------------------------------------------------------------------------------------
    def _is_mask(self, layer: QgsRasterLayer, path: str) -> bool:
        if layer.customProperty(JOB_PROPERTY):  # a mask this plugin brought back
            return True
        if not path:
            return False
        if path not in self._mask_of_file:
            self._mask_of_file[path] = looks_like_mask(path)
        return self._mask_of_file[path]

    def rows(self) -> list[tuple[str, QTableWidgetItem, MaskCombo, QTableWidgetItem]]:
        out = []
        for row in range(self.table.rowCount()):
            item = self.table.item(row, COL_IMAGE)
            combo = self.table.cellWidget(row, COL_MASK)
            predict = self.table.item(row, COL_PREDICT)
            if item is not None and isinstance(combo, MaskCombo) and predict is not None:
                out.append((item.data(LAYER_ID), item, combo, predict))
        return out

    def row_of(self, layer_id: str) -> tuple[QTableWidgetItem, MaskCombo, QTableWidgetItem]:
        for lid, item, combo, predict in self.rows():
            if lid == layer_id:
                return item, combo, predict
        raise KeyError(layer_id)

    def refresh(self, *args: Any) -> None:
        """Rebuilds the rows from the project's raster layers, keeping every tick and mask the
        analyst chose; new layers get their automatic mask."""
        ticks = {lid: item.checkState() for lid, item, _, _ in self.rows()}
        validating = set(self.validated())
        rasters = [lyr for lyr in self.project.mapLayers().values()
                   if isinstance(lyr, QgsRasterLayer)]
        infos = []
        for layer in rasters:
            path = layer_file(layer)
            infos.append(RasterInfo(layer.id(), layer.name(), path, self._is_mask(layer, path)))
            if layer.id() not in self._watched:
                layer.nameChanged.connect(self.refresh)  # renames show at once
                self._watched.add(layer.id())
        pairing = pair_layers(infos)
        self.labels = display_labels(infos)
        self._auto_pairs = pairing.pairs
        self.unpaired_images, self.unpaired_masks = pairing.unpaired_images, pairing.unpaired_masks
        masks = [(lid, self.labels[lid]) for lid in sorted(
            pairing.masks, key=lambda i: natural_key(self.labels[i]))]
        others = [(lid, self.labels[lid]) for lid in sorted(
            pairing.images, key=lambda i: natural_key(self.labels[i]))]

        self.table.blockSignals(True)
        self.table.setSortingEnabled(False)  # rows would move while they are filled
        self.table.setRowCount(len(pairing.images))
        for row, lid in enumerate(pairing.images):
            layer = self.project.mapLayer(lid)
            mask = self.mask_of(lid)
            item = _SortItem(self.labels[lid])
            item.setFlags(Qt.ItemIsUserCheckable | Qt.ItemIsEnabled | Qt.ItemIsSelectable)
            item.setCheckState(ticks.get(lid, Qt.Unchecked))
            item.setData(LAYER_ID, lid)
            item.setToolTip(layer.source())
            self.table.setItem(row, COL_IMAGE, item)
            combo = MaskCombo(self.project, self.table)
            combo.layer_id = lid
            combo.set_choices(masks, [o for o in others if o[0] != lid], mask)
            combo.setToolTip(tr("Reference mask (paired automatically by file name and folder)"))
            combo.currentIndexChanged.connect(self._mask_changed)
            self.table.setCellWidget(row, COL_MASK, combo)
            predict = _SortItem("")
            predict.setFlags(Qt.ItemIsUserCheckable | Qt.ItemIsEnabled | Qt.ItemIsSelectable)
            predict.setCheckState(Qt.Checked if self.predicted(lid) else Qt.Unchecked)
            predict.setData(LAYER_ID, lid)
            self.table.setItem(row, COL_PREDICT, predict)
            validate = _SortItem("")
            validate.setFlags(Qt.ItemIsUserCheckable | Qt.ItemIsEnabled | Qt.ItemIsSelectable)
            validate.setCheckState(Qt.Checked if lid in validating else Qt.Unchecked)
            validate.setData(LAYER_ID, lid)
            self.table.setItem(row, COL_VALIDATE, validate)
        self.table.setSortingEnabled(True)
        self.table.blockSignals(False)
        self._apply_filter()
        self._update_counts()

    def forget_layers(self) -> None:
        """Stops following renames (the dock is closing)."""
        for lid in self._watched:
            layer = self.project.mapLayer(lid)
            if layer is not None:
                try:
                    layer.nameChanged.disconnect(self.refresh)
                except TypeError:
                    pass
        self._watched.clear()

    # -- choices ------------------------------------------------------------------------------------
    def mask_of(self, lid: str) -> str:
        """The mask layer id of an image row: the analyst's choice, else the automatic pair."""
        return self._mask_chosen.get(lid, self._auto_pairs.get(lid, ""))

    def predicted(self, lid: str) -> bool:
        """Whether "predict on" is ticked by default: only the rasters without a mask, the
        held-out ones, unless the analyst ticked otherwise."""
        return self._predict_chosen.get(lid, not self.mask_of(lid))

    def reset(self) -> None:
        """Back to no ticks, the automatic masks and the default "predict on" ticks: what one
        mode chose must not carry into another (a reference mask picked for evaluation would
        become training data)."""
        self._mask_chosen.clear()
        self._predict_chosen.clear()
        self.table.blockSignals(True)
        for lid, item, combo, predict in self.rows():
            item.setCheckState(Qt.Unchecked)
            combo.blockSignals(True)
            combo.setCurrentIndex(max(0, combo.findData(self.mask_of(lid))) if self.mask_of(lid)
                                  else 0)
            combo.blockSignals(False)
            predict.setCheckState(Qt.Checked if self.predicted(lid) else Qt.Unchecked)
        for row in range(self.table.rowCount()):
            validate = self.table.item(row, COL_VALIDATE)
            if validate is not None:
                validate.setCheckState(Qt.Unchecked)
        self.table.blockSignals(False)
        self._update_counts()

    def validated(self) -> list[str]:
        """Rows ticked "validate on"."""
        out = []
        for row in range(self.table.rowCount()):
            item = self.table.item(row, COL_VALIDATE)
            if item is not None and item.checkState() == Qt.Checked:
                out.append(item.data(LAYER_ID))
        return out

    def validate_item(self, layer_id: str) -> QTableWidgetItem:
        for row in range(self.table.rowCount()):
            item = self.table.item(row, COL_VALIDATE)
            if item is not None and item.data(LAYER_ID) == layer_id:
                return item
        raise KeyError(layer_id)

    def usable(self, lid: str) -> bool:
        """Whether "All" ticks this row in the current mode: training and evaluation need a
        mask."""
        _, combo, _ = self.row_of(lid)
        return not self.mode_trains or combo.currentLayer() is not None

    def tick_shown(self, checked: bool) -> None:
        self.table.blockSignals(True)
        for row in range(self.table.rowCount()):
            if self.table.isRowHidden(row):
                continue
            item = self.table.item(row, COL_IMAGE)
            state = Qt.Checked if checked and self.usable(item.data(LAYER_ID)) else Qt.Unchecked
            item.setCheckState(state)
        self.table.blockSignals(False)
        self._update_counts()

    def ticked(self) -> list[str]:
        return [lid for lid, item, _, _ in self.rows() if item.checkState() == Qt.Checked]

    def predict_ticked(self) -> list[str]:
        return [lid for lid, _, _, p in self.rows() if p.checkState() == Qt.Checked]

    # -- display ------------------------------------------------------------------------------------
    def _apply_filter(self, *args: Any) -> None:
        words = self.filter.text().lower().split()
        for row in range(self.table.rowCount()):
            item = self.table.item(row, COL_IMAGE)
            combo = self.table.cellWidget(row, COL_MASK)
            text = (item.text() + " " + item.toolTip() + " " +
                    (combo.currentText() if isinstance(combo, MaskCombo) else "")).lower()
            self.table.setRowHidden(row, not all(w in text for w in words))
        self._update_counts()

    def _item_changed(self, item: QTableWidgetItem) -> None:
        if item.column() == COL_PREDICT:
            self._predict_chosen[item.data(LAYER_ID)] = item.checkState() == Qt.Checked
        self._update_counts()

    def _mask_changed(self, *args: Any) -> None:
        combo = self.sender()
        if not isinstance(combo, MaskCombo):
            return
        lid = combo.layer_id
        self._mask_chosen[lid] = combo.currentData() or ""
        # A raster given a mask is for training, one without for predicting (unless chosen).
        _, _, predict = self.row_of(lid)
        self.table.blockSignals(True)
        predict.setCheckState(Qt.Checked if self.predicted(lid) else Qt.Unchecked)
        self.table.blockSignals(False)
        self._update_counts()

    def _update_counts(self) -> None:
        total = self.table.rowCount()
        shown = sum(not self.table.isRowHidden(r) for r in range(total))
        ticked = set(self.ticked())
        validating = len(set(self.validated()) & ticked)
        chosen = tr(" ({n} for validation)").format(n=validating) if validating else ""
        if self.mode_predicts_separately:
            predicted = set(self.predict_ticked())
            text = tr("{train} to train on{chosen}, {predict} to predict, of {total}").format(
                train=len(ticked), chosen=chosen, predict=len(predicted), total=total)
        else:
            text = tr("{n} of {total} selected{chosen}").format(n=len(ticked), total=total,
                                                                 chosen=chosen)
        if shown != total:
            text += " " + tr("({shown} shown)").format(shown=shown)
        self.count.setText(text)
        paired = total - len(self.unpaired_images)
        parts = [tr("{paired} of {total} imagery layers paired with a mask").format(
            paired=paired, total=total)]
        if self.unpaired_images:
            parts.append(tr("without a mask: {names}").format(names=self._names(
                self.unpaired_images)))
        if self.unpaired_masks:
            parts.append(tr("masks without an image: {names}").format(names=self._names(
                self.unpaired_masks)))
        self.note.setText("; ".join(parts) + ".")
        self.changed.emit()

    def _names(self, ids: tuple[str, ...], most: int = 4) -> str:
        names = [self.labels.get(i, i) for i in ids[:most]]
        more = len(ids) - most
        return ", ".join(names) + (tr(" and {n} more").format(n=more) if more > 0 else "")
