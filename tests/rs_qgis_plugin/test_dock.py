"""The dock turns chosen layers and parameters into a job; non-file layers are exported first.

Real QGIS offscreen, real dev GeoTIFFs (Xiamen imagery and its reference masks).
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from qgis.core import QgsProject, QgsRasterLayer

from rs_qgis_plugin.controller import JobController
from rs_qgis_plugin.dock import RunDock
from rs_qgis_plugin.logic import local_raster_path
from tests.rs_qgis_plugin.conftest import dev_image, dev_mask

pytestmark = [pytest.mark.qgis, pytest.mark.usefixtures("qgis_env")]


def add_raster(path: Path, name: str) -> QgsRasterLayer:
    layer = QgsRasterLayer(str(path), name, "gdal")
    assert layer.isValid(), path
    QgsProject.instance().addMapLayer(layer)
    return layer


@pytest.fixture
def dock(qgis_iface):
    controller = JobController(qgis_iface)
    widget = RunDock(qgis_iface, controller)
    yield widget
    widget.disconnect_project()
    widget.deleteLater()


def test_dock_builds_the_job_from_the_chosen_layers_and_parameters(dock, tiny_model, results_root):
    image = add_raster(dev_image(0), "Xiamen tile")
    other = add_raster(dev_image(1), "unchecked tile")
    truth = add_raster(dev_mask(0), "reference")
    assert dock.layers.rowCount() == 3  # every raster layer is offered
    dock.set_imagery(image, mask=truth)
    dock.mode.setCurrentIndex(dock.mode.findData("evaluate"))
    dock.model_dir.setFilePath(str(tiny_model))
    dock.overlap.setValue(16)
    dock.threshold.setValue(0.35)
    dock.name.setText("Xiamen check")

    run = dock.prepare_run()
    spec = run.planned.spec.to_dict()
    assert spec["name"] == "Xiamen check"
    assert [s["stage"] for s in spec["steps"]] == ["predict", "evaluate"]
    assert spec["steps"][0]["params"]["overlap"] == 16
    assert spec["steps"][0]["params"]["threshold"] == 0.35
    # file layers go up as they are; nothing to export; the unchecked layer stays home
    assert run.exports == []
    stem = dev_image(0).stem  # a file layer keeps its file's name (and so will its mask)
    assert run.planned.inputs == {f"inputs/images/{stem}.tif": str(dev_image(0)),
                                  "inputs/model": str(tiny_model),
                                  f"inputs/masks/{stem}.tif": str(dev_mask(0))}
    assert str(dev_image(1)) not in run.planned.inputs.values() and other.isValid()


def test_training_width_and_rate_are_the_clusters_unless_chosen(dock, results_root):
    image = add_raster(dev_image(0), "Xiamen tile")
    truth = add_raster(dev_mask(0), "reference")
    dock.set_imagery(image, mask=truth)
    dock.mode.setCurrentIndex(dock.mode.findData("train"))
    assert dock.base_filters.isEnabled() and dock.learning_rate.isEnabled()
    train = dock.prepare_run().planned.spec.to_dict()["steps"][1]["params"]
    assert "base_filters" not in train and "lr" not in train
    dock.base_filters.setValue(16)
    dock.learning_rate.setValue(0.001)
    train = dock.prepare_run().planned.spec.to_dict()["steps"][1]["params"]
    assert (train["base_filters"], train["lr"]) == (16, 0.001)
    dock.mode.setCurrentIndex(dock.mode.findData("predict"))
    assert not dock.base_filters.isEnabled()


def test_predict_mode_hides_masks_and_a_missing_model_is_reported(dock, qgis_iface, results_root):
    image = add_raster(dev_image(0), "tile")
    truth = add_raster(dev_mask(0), "reference")
    dock.set_imagery(image, mask=truth)
    dock.mode.setCurrentIndex(dock.mode.findData("predict"))
    assert dock.layers.isColumnHidden(1) and dock.picks()[0].mask is None
    assert dock.run() is None  # no profile, no model: nothing starts
    assert "connection" in dock.status.text()


def test_a_vrt_layer_is_exported_to_geotiff_before_upload(dock, tmp_path, results_root):
    vrt = tmp_path / "mosaic.vrt"
    subprocess.run(["gdalbuildvrt", "-q", str(vrt), str(dev_image(0))], check=True)
    layer = add_raster(vrt, "VRT mosaic")
    assert local_raster_path(layer.providerType(), layer.source()) is None
    dock.set_imagery(layer)
    dock.mode.setCurrentIndex(dock.mode.findData("predict"))
    dock.model_dir.setFilePath(str(tmp_path))

    run = dock.prepare_run()
    assert len(run.exports) == 1
    export = run.exports[0]
    assert run.planned.inputs["inputs/images/VRT_mosaic.tif"] == str(export.target)
    assert export.target.is_relative_to(results_root)

    progress = []
    export.progressChanged.connect(progress.append)
    assert export.run()
    assert export.target.exists() and progress and progress[-1] == 100.0
    written = QgsRasterLayer(str(export.target), "written", "gdal")
    assert written.crs() == layer.crs() and written.extent() == layer.extent()
    assert (written.width(), written.height(), written.bandCount()) == (256, 256, 3)


def test_clipping_to_the_map_extent_exports_only_that_part(dock, qgis_iface, results_root):
    image = add_raster(dev_image(0), "tile")
    extent = image.extent()
    half = type(extent)(extent.xMinimum(), extent.yMinimum(), extent.center().x(),
                        extent.center().y())
    qgis_iface.mapCanvas().setDestinationCrs(image.crs())
    qgis_iface.mapCanvas().setExtent(half)
    dock.set_imagery(image)
    dock.mode.setCurrentIndex(dock.mode.findData("predict"))
    dock.model_dir.setFilePath("/models/m")
    dock.clip.setChecked(True)
    run = dock.prepare_run()
    assert len(run.exports) == 1  # even a GeoTIFF is cut to the extent
    export = run.exports[0]
    assert export.run()
    written = QgsRasterLayer(str(export.target), "clip", "gdal")
    visible = qgis_iface.mapCanvas().extent().intersect(extent)
    assert written.extent().width() == pytest.approx(visible.width(), rel=0.02)
    assert written.width() == pytest.approx(256 * visible.width() / extent.width(), abs=2)


def test_clipping_to_a_polygon_layers_extent(dock, qgis_iface, results_root):
    from qgis.core import QgsFeature, QgsGeometry, QgsVectorLayer

    image = add_raster(dev_image(0), "tile")
    extent = image.extent()
    area = QgsVectorLayer(f"Polygon?crs={image.crs().authid()}", "area of interest", "memory")
    quarter = type(extent)(extent.xMinimum(), extent.yMinimum(),
                           extent.xMinimum() + extent.width() / 4, extent.yMaximum())
    feature = QgsFeature()
    feature.setGeometry(QgsGeometry.fromRect(quarter))
    area.dataProvider().addFeatures([feature])
    area.updateExtents()
    QgsProject.instance().addMapLayer(area)
    dock.set_imagery(image)
    dock.mode.setCurrentIndex(dock.mode.findData("predict"))
    dock.model_dir.setFilePath("/models/m")
    dock.clip_layer.setLayer(area)
    export = dock.prepare_run().exports[0]
    assert export.run()
    written = QgsRasterLayer(str(export.target), "clip", "gdal")
    assert written.extent().width() == pytest.approx(quarter.width(), rel=0.02)
    assert written.extent().height() == pytest.approx(extent.height(), rel=0.02)
    assert written.width() == pytest.approx(64, abs=2)  # native resolution kept


def test_a_cancelled_export_leaves_no_file(dock, tmp_path, results_root):
    vrt = tmp_path / "mosaic.vrt"
    subprocess.run(["gdalbuildvrt", "-q", str(vrt), str(dev_image(0))], check=True)
    dock.set_imagery(add_raster(vrt, "VRT"))
    dock.mode.setCurrentIndex(dock.mode.findData("predict"))
    dock.model_dir.setFilePath("/models/m")
    export = dock.prepare_run().exports[0]
    export.cancel()
    assert export.run() is False
    assert not export.target.exists() and export.error is None


def test_the_status_line_shows_an_error_quoting_the_cluster_as_text(dock, monkeypatch,
                                                                     results_root):
    """An error may quote what the cluster said; a link in it must not become clickable."""
    from qgis.PyQt.QtCore import Qt

    from rs_qgis_plugin.core.errors import RemoteCommandError

    hostile = "rs-cluster: <a href='file:///home/ana/.ssh'>click to fix</a><img src='x'>"

    def start(*args, **kwargs):
        raise RemoteCommandError(hostile)

    monkeypatch.setattr(dock.controller, "start", start)
    monkeypatch.setattr(dock, "prepare_run", lambda: None)
    dock.mode.setCurrentIndex(dock.mode.findData("train"))  # needs no model
    dock.profile.addItem("loopback")
    dock.profile.setCurrentText("loopback")
    assert dock.run() is None
    assert dock.status.text() == hostile
    assert dock.status.textFormat() == Qt.PlainText
