"""Putting a job's results on the map: masks and polygons styled from ``resources/``, grouped per
job in the layer tree. Called from ``finished()`` handlers only (GUI thread)."""

from __future__ import annotations

import json
from pathlib import Path

from qgis.core import (
    QgsCoordinateReferenceSystem,
    QgsCoordinateTransform,
    QgsLayerTreeGroup,
    QgsMapLayer,
    QgsProject,
    QgsRasterLayer,
    QgsVectorLayer,
)

from rs_qgis_plugin.core.errors import RsPluginError
from rs_qgis_plugin.log import get_logger
from rs_qgis_plugin.logic import (
    MASK_SUFFIX,
    POLYGONS_SUFFIX,
    ResultFiles,
    summarize_report,
)

log = get_logger("results")

JOB_PROPERTY = "rs_qgis_plugin/job_id"
MASK_STYLE = "mask.qml"
POLYGON_STYLE = "polygons.qml"


def resource_path(name: str) -> Path:
    """``resources/`` sits inside the plugin folder once packaged, next to it in the source tree."""
    here = Path(__file__).resolve().parent
    for base in (here / "resources", here.parent / "resources"):
        if (base / name).exists():
            return base / name
    raise RsPluginError(f"the plugin's resource {name} is missing; reinstall the plugin")


def job_group(project: QgsProject, job_id: str, title: str) -> QgsLayerTreeGroup:
    """The layer tree group of a job (made once, on top of the tree)."""
    root = project.layerTreeRoot()
    for group in root.findGroups():
        if group.customProperty(JOB_PROPERTY) == job_id:
            return group
    group = root.insertGroup(0, title)
    group.setCustomProperty(JOB_PROPERTY, job_id)
    return group


def _open(layer: QgsMapLayer, style: str, job_id: str) -> QgsMapLayer:
    if not layer.isValid():
        raise RsPluginError(f"QGIS cannot open the downloaded result {layer.source()}")
    message, ok = layer.loadNamedStyle(str(resource_path(style)))
    if not ok:
        log.warning("style %s not applied to %s: %s", style, layer.name(), message)
    layer.setCustomProperty(JOB_PROPERTY, job_id)
    return layer


def open_mask(path: str | Path, job_id: str) -> QgsRasterLayer:
    name = Path(path).name
    name = name[: -len(MASK_SUFFIX)] if name.endswith(MASK_SUFFIX) else Path(path).stem
    return _open(QgsRasterLayer(str(path), f"{name} buildings", "gdal"), MASK_STYLE, job_id)


def open_polygons(path: str | Path, job_id: str) -> QgsVectorLayer:
    name = Path(path).name[: -len(POLYGONS_SUFFIX)]
    return _open(QgsVectorLayer(str(path), f"{name} building outlines", "ogr"), POLYGON_STYLE,
                 job_id)


def place_without_georeference(project: QgsProject, layers: list[QgsMapLayer]) -> list[str]:
    """Results of plain (non-georeferenced) images have no CRS, or a local "Undefined" one
    that no transform reaches, and the desktop then shows "No transform available between
    Undefined SRS and EPSG:..." in red. They get the project's CRS instead, as QGIS's "Use
    project CRS" treats a layer without one: drawn in pixel units, like their image. Returns
    the names of the layers so placed."""
    target = project.crs()
    placed = []
    for layer in layers:
        crs = layer.crs()
        if not target.isValid() or crs == target:
            continue
        # A local CRS is tested by its WKT: building a transform from it would log the very
        # error this avoids.
        local = crs.toWkt(QgsCoordinateReferenceSystem.WKT2_2019).startswith("ENGCRS")
        if crs.isValid() and not local and \
                QgsCoordinateTransform(crs, target, project).isValid():
            continue
        layer.setCrs(target)
        placed.append(layer.name())
    return placed


def load_results(project: QgsProject, job_id: str, title: str,
                 files: ResultFiles) -> tuple[list[QgsMapLayer], str | None]:
    """Adds the masks (polygons above them) to the job's group; returns the layers and a
    one-line summary of the evaluation report, if there is one. All or nothing: a result QGIS
    cannot open is reported and nothing of the job is added."""
    summary = None
    if files.report:
        try:
            summary = summarize_report(json.loads(Path(files.report).read_text(encoding="utf-8")))
        except (OSError, ValueError) as e:
            raise RsPluginError(f"the evaluation report {files.report} is unreadable: {e}") from e
    layers: list[QgsMapLayer] = [open_polygons(p, job_id) for p in files.polygons]
    layers += [open_mask(p, job_id) for p in files.masks]
    placed = place_without_georeference(project, layers)
    if placed:
        note = (f"{', '.join(placed)}: no coordinate reference system (the input was not "
                f"georeferenced); drawn in pixel units in the project's CRS")
        log.info("%s", note)
        summary = f"{summary}; {note}" if summary else note
    if layers:
        group = job_group(project, job_id, title)
        for layer in layers:
            project.addMapLayer(layer, False)
            group.addLayer(layer)
    return layers, summary
