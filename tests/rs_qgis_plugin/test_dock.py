"""The dock turns chosen layers and parameters into a job; non-file layers are exported first.

Real QGIS offscreen, real dev GeoTIFFs (Xiamen imagery and its reference masks).
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from qgis.core import QgsProject, QgsRasterLayer, QgsRectangle

from rs_qgis_plugin.controller import JobController
from rs_qgis_plugin.core.errors import RsPluginError
from rs_qgis_plugin.dock import BUILTIN_SOURCE, RunDock
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


def use_model_folder(dock, path) -> None:
    """Chooses "Model folder on this computer" (the built-in model is the default) and a folder."""
    dock.model_source.setCurrentIndex(dock.model_source.findData(""))
    dock.model_dir.setFilePath(str(path))


def test_dock_builds_the_job_from_the_chosen_layers_and_parameters(dock, tiny_model, results_root):
    image = add_raster(dev_image(0), "Xiamen tile")
    other = add_raster(dev_image(1), "unchecked tile")
    truth = add_raster(dev_mask(0), "reference")
    assert dock.layers.rowCount() == 2  # every imagery layer is offered, the mask is not
    dock.mode.setCurrentIndex(dock.mode.findData("evaluate"))
    dock.set_imagery(image, mask=truth)
    use_model_folder(dock, str(tiny_model))
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
    dock.mode.setCurrentIndex(dock.mode.findData("train"))
    dock.set_imagery(image, mask=truth)
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
    assert dock.run() is None  # no profile: nothing starts
    assert "connection" in dock.status.text()


def test_a_vrt_layer_is_exported_to_geotiff_before_upload(dock, tmp_path, results_root):
    vrt = tmp_path / "mosaic.vrt"
    subprocess.run(["gdalbuildvrt", "-q", str(vrt), str(dev_image(0))], check=True)
    layer = add_raster(vrt, "VRT mosaic")
    assert local_raster_path(layer.providerType(), layer.source()) is None
    dock.set_imagery(layer)
    dock.mode.setCurrentIndex(dock.mode.findData("predict"))
    use_model_folder(dock, str(tmp_path))

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


def test_tta_and_the_models_threshold_by_default_reach_the_predict_step(dock, results_root):
    add_raster(dev_image(0), "tile")
    dock.set_imagery(next(iter(QgsProject.instance().mapLayersByName("tile"))))
    dock.mode.setCurrentIndex(dock.mode.findData("predict"))
    use_model_folder(dock, "/models/m")
    assert dock.tta.isEnabled() and not dock.tta.isChecked()
    params = dock.prepare_run().planned.spec.steps[0].params
    # by default the model's own threshold (tuned when it was trained) is used: none is sent
    assert "tta" not in params and "threshold" not in params
    assert dock.threshold.text() == "the model's"
    dock.tta.setChecked(True)
    assert dock.prepare_run().planned.spec.steps[0].params["tta"] is True
    # squared outlines: only with polygons, which the cluster requires for them
    assert "regularize" not in params and dock.regularize.isEnabled()
    dock.regularize.setChecked(True)
    assert dock.prepare_run().planned.spec.steps[0].params["regularize"] is True
    dock.polygons.setChecked(False)
    assert not dock.regularize.isEnabled()
    assert "regularize" not in dock.prepare_run().planned.spec.steps[0].params
    dock.mode.setCurrentIndex(dock.mode.findData("train"))
    assert not dock.tta.isEnabled()


def test_a_web_map_layer_is_exported_only_with_a_clip(dock, qgis_iface, results_root):
    """An XYZ layer advertises the whole world: without a clip it would come out at 2048 px
    across it. Refused, saying what to do; with the map extent as clip it is exported at the
    map's resolution. (The tile URL points nowhere: nothing is fetched until an export runs.)"""
    xyz = QgsRasterLayer("type=xyz&url=http://127.0.0.1:9/%7Bz%7D/%7Bx%7D/%7By%7D.png"
                         "&zmax=19&zmin=0", "web tiles", "wms")
    assert xyz.isValid()
    QgsProject.instance().addMapLayer(xyz)
    dock.set_imagery(xyz)
    dock.mode.setCurrentIndex(dock.mode.findData("predict"))
    use_model_folder(dock, "/models/m")
    with pytest.raises(RsPluginError, match="web tiles is a web map layer .*Clip to the current "
                                            "map extent"):
        dock.prepare_run()
    canvas = qgis_iface.mapCanvas()
    canvas.setDestinationCrs(xyz.crs())
    canvas.setExtent(QgsRectangle(13146251, 2811048, 13146863, 2811201))
    dock.clip.setChecked(True)
    run = dock.prepare_run()
    assert len(run.exports) == 1
    assert run.exports[0].cols == pytest.approx(612 / canvas.mapUnitsPerPixel(), abs=2)


def test_clipping_to_the_map_extent_exports_only_that_part(dock, qgis_iface, results_root):
    image = add_raster(dev_image(0), "tile")
    extent = image.extent()
    half = type(extent)(extent.xMinimum(), extent.yMinimum(), extent.center().x(),
                        extent.center().y())
    qgis_iface.mapCanvas().setDestinationCrs(image.crs())
    qgis_iface.mapCanvas().setExtent(half)
    dock.set_imagery(image)
    dock.mode.setCurrentIndex(dock.mode.findData("predict"))
    use_model_folder(dock, "/models/m")
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
    use_model_folder(dock, "/models/m")
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
    use_model_folder(dock, "/models/m")
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


# -- the layer table: pairs that pair themselves, a table that scales (issue 13) ----------------
INRIA = "inria_austin_chicago"


def inria(kind: str, name: str) -> Path:
    """A real Inria crop read in place (GDAL_PAM_ENABLED=NO: nothing is written beside it)."""
    from tests import devdata

    return devdata.subset(INRIA) / kind / name


def labels_of(dock) -> list[str]:
    return [dock.layers.item(r, 0).text() for r in range(dock.layers.rowCount())]


def mask_label(dock, layer) -> str:
    return dock.layer_table.row_of(layer.id())[1].currentText()


def test_inria_images_and_masks_of_the_same_name_are_told_apart_and_paired(dock):
    """Real Inria crops: images/ and gt/ hold files of identical names. The masks stay out of
    the imagery rows, each image gets its own mask, renames and removals show at once."""
    from tests import devdata

    names = devdata.first_files(INRIA, 4)
    images = [add_raster(inria("images", n), Path(n).stem) for n in names]
    masks = [add_raster(inria("gt", n), Path(n).stem) for n in names[:3]]
    stems = [Path(n).stem for n in names]
    assert labels_of(dock) == [f"{s} — images/" for s in stems]
    assert [mask_label(dock, i) for i in images] == [f"{s} — gt/" for s in stems[:3]] + [
        "(no mask)"]
    assert f"without a mask: {stems[3]} — images/" in dock.layer_table.note.text()
    assert not list(devdata.subset(INRIA).rglob("*.aux.xml"))

    images[0].setName("downtown")
    assert "downtown — images/" in labels_of(dock)
    QgsProject.instance().removeMapLayer(masks[1].id())
    assert mask_label(dock, images[1]) == "(no mask)"
    assert "without a mask" in dock.layer_table.note.text() and stems[1] in \
        dock.layer_table.note.text()
    QgsProject.instance().removeMapLayer(images[2].id())
    assert dock.layers.rowCount() == 3
    assert f"masks without an image: {stems[2]} — gt/" in dock.layer_table.note.text()


def write_tif(path: Path, bands: int, values) -> Path:
    """A small real GeoTIFF (32 x 32, EPSG:3857) with the given pixel values."""
    import numpy as np
    from osgeo import gdal, osr

    path.parent.mkdir(parents=True, exist_ok=True)
    data = np.asarray(values, dtype=np.uint8).reshape(bands, 32, 32)
    ds = gdal.GetDriverByName("GTiff").Create(str(path), 32, 32, bands, gdal.GDT_Byte)
    ds.SetGeoTransform((13145000.0, 0.6, 0, 2810000.0, 0, -0.6))
    srs = osr.SpatialReference()
    srs.ImportFromEPSG(3857)
    ds.SetProjection(srs.ExportToWkt())
    for b in range(bands):
        ds.GetRasterBand(b + 1).WriteArray(data[b])
    ds = None
    return path


def fifty_layers(root: Path, held_out: int = 0) -> tuple[list, list]:
    """25 images (images/tile_N.tif, RGB noise) and their 25 masks (gt/tile_N.tif, 0/255),
    added to the project at once as QGIS does for a dropped folder; the last ``held_out``
    images get no mask."""
    import numpy as np

    rng = np.random.default_rng(13)
    layers_i, layers_m = [], []
    for n in range(25):
        img = write_tif(root / "images" / f"tile_{n}.tif", 3, rng.integers(0, 256, 3 * 32 * 32))
        layers_i.append(QgsRasterLayer(str(img), f"tile_{n}", "gdal"))
        if n < 25 - held_out:
            m = write_tif(root / "gt" / f"tile_{n}.tif", 1,
                          255 * (rng.random(32 * 32) > 0.7))
            layers_m.append(QgsRasterLayer(str(m), f"tile_{n}", "gdal"))
    QgsProject.instance().addMapLayers(layers_i + layers_m)
    return layers_i, layers_m


def test_fifty_layers_sort_filter_select_and_count(dock, tmp_path, qtbot):
    from qgis.PyQt.QtCore import Qt

    images, masks = fifty_layers(tmp_path)
    assert dock.layers.rowCount() == 25  # the 25 masks are no imagery rows
    assert [mask_label(dock, i) for i in images] == [f"tile_{n} — gt/" for n in range(25)]
    assert "25 of 25 imagery layers paired" in dock.layer_table.note.text()
    # numbered tiles sort as numbers, both ways
    assert labels_of(dock)[:3] == ["tile_0 — images/", "tile_1 — images/", "tile_2 — images/"]
    dock.layers.sortByColumn(0, Qt.DescendingOrder)
    assert labels_of(dock)[0] == "tile_24 — images/"
    assert mask_label(dock, images[24]) == "tile_24 — gt/"  # masks move with their rows

    dock.mode.setCurrentIndex(dock.mode.findData("train"))
    dock.layer_table.filter.setText("tile_1")  # tile_1, tile_10 .. tile_19
    shown = [r for r in range(25) if not dock.layers.isRowHidden(r)]
    assert len(shown) == 11
    qtbot.mouseClick(dock.layer_table.select_all, Qt.LeftButton)
    assert dock.layer_table.count.text() == "11 of 25 selected (11 shown)"
    dock.layer_table.filter.clear()
    assert len(dock.picks()) == 11  # only what was shown got ticked
    qtbot.mouseClick(dock.layer_table.select_all, Qt.LeftButton)
    assert dock.layer_table.count.text() == "25 of 25 selected"
    qtbot.mouseClick(dock.layer_table.select_none, Qt.LeftButton)
    assert dock.layer_table.count.text() == "0 of 25 selected" and dock.picks() == []


def test_train_then_predict_predicts_the_rasters_without_masks(dock, tmp_path, qtbot):
    """20 pairs and 5 rasters without masks: the 20 are trained on, only the 5 are predicted
    (before, every ticked training raster was predicted and loaded back too)."""
    from qgis.PyQt.QtCore import Qt

    images, _ = fifty_layers(tmp_path, held_out=5)
    dock.mode.setCurrentIndex(dock.mode.findData("train_predict"))
    assert not dock.layers.isColumnHidden(2) and dock.layers.horizontalHeaderItem(0).text() \
        == "Train on"
    qtbot.mouseClick(dock.layer_table.select_all, Qt.LeftButton)  # every raster with a mask
    assert dock.layer_table.count.text() == "20 to train on, 5 to predict, of 25"
    picks = dock.picks()
    assert sorted(p.image.name() for p in picks if p.mask) == sorted(
        f"tile_{n}" for n in range(20))
    assert sorted(p.image.name() for p in picks if p.predict) == [f"tile_{n}"
                                                                  for n in range(20, 25)]
    assert all(p.mask is None for p in picks if p.predict)  # held-out truth stays home


def test_a_mode_change_resets_ticks_masks_and_the_job_name(dock, tmp_path):
    """A mask picked by hand for Evaluate must not become training data in Train."""
    images, masks = fifty_layers(tmp_path)
    dock.mode.setCurrentIndex(dock.mode.findData("evaluate"))
    dock.set_imagery(images[0], mask=masks[5])
    dock.name.setText("check")
    dock.mode.setCurrentIndex(dock.mode.findData("train"))
    assert dock.picks() == [] and dock.name.text() == ""
    assert mask_label(dock, images[0]) == "tile_0 — gt/"  # the automatic pair again


def test_split_and_early_stopping_are_shown_and_reach_the_job(dock, tmp_path, results_root):
    images, _ = fifty_layers(tmp_path)
    dock.mode.setCurrentIndex(dock.mode.findData("train"))
    for image in images[:10]:
        dock.set_imagery(image, keep_mask=True)
    assert dock.split_note.text() == ("10 ticked pairs: 6 train, 2 validation, 2 test "
                                      "(whole rasters)")
    dock.split_train.setValue(80)
    dock.split_val.setValue(20)
    dock.split_test.setValue(0)
    assert dock.split_note.text().startswith("10 ticked pairs: 8 train, 2 validation")
    dock.patience.setValue(3)
    prepare, train = (s.to_dict()["params"] for s in dock.prepare_run().planned.spec.steps)
    assert prepare["split"] == [0.8, 0.2, 0.0] and train["patience"] == 3
    dock.early_stopping.setChecked(False)
    assert not dock.patience.isEnabled()
    assert dock.prepare_run().planned.spec.steps[1].params["patience"] == 0
    dock.split_test.setValue(10)
    assert "110 %" in dock.split_note.text()


class _Started:
    def __init__(self, prepared):
        self.prepared = prepared
        self.job_id = prepared.planned.spec.job_id


def started_runs(dock, monkeypatch) -> list:
    """Runs reach ``controller.start`` with what the dock planned; no cluster is involved."""
    runs = []

    def start(profile, prepared, mode):
        runs.append(prepared)
        return _Started(prepared)

    monkeypatch.setattr(dock.controller, "start", start)
    dock.profile.addItem("loopback")
    dock.profile.setCurrentText("loopback")
    return runs


def test_evaluating_against_rasters_the_model_was_trained_on_asks_first(dock, tmp_path,
                                                                        monkeypatch,
                                                                        results_root):
    from qgis.PyQt.QtWidgets import QMessageBox

    from rs_qgis_plugin import settings
    from rs_qgis_plugin.logic import JobRecord

    images, _ = fifty_layers(tmp_path)
    runs = started_runs(dock, monkeypatch)
    dock.mode.setCurrentIndex(dock.mode.findData("train"))
    for image in images[:3]:
        dock.set_imagery(image, keep_mask=True)
    dock.name.setText("first model")
    assert dock.run() is not None
    job = runs[0].planned.spec.job_id
    # the next run starts from nothing: no ticks, no name
    assert dock.picks() == [] and dock.name.text() == ""
    settings.save_job(JobRecord(job, "first model", "loopback", "train", state="succeeded"))
    dock.refresh_models()

    asked = []
    answer = [QMessageBox.No]
    monkeypatch.setattr(QMessageBox, "question",
                        lambda *args, **kwargs: asked.append(args[2]) or answer[0])
    dock.mode.setCurrentIndex(dock.mode.findData("evaluate"))
    dock.model_source.setCurrentIndex(dock.model_source.findData(job))
    dock.set_imagery(images[2], keep_mask=True)  # trained on
    dock.set_imagery(images[7], keep_mask=True)  # not
    assert dock.run() is None and len(runs) == 1
    assert "trained on tile_2" in asked[0] and "tile_7" not in asked[0]
    assert "Not started" in dock.status.text()
    answer[0] = QMessageBox.Yes
    dock.set_imagery(images[2], keep_mask=True)
    assert dock.run() is not None and len(runs) == 2
    dock.set_imagery(images[7], keep_mask=True)  # held out: nothing to ask
    assert dock.run() is not None and len(asked) == 2


def test_a_new_analyst_trains_on_10_pairs_and_predicts_1_held_out_raster(dock, qtbot,
                                                                         monkeypatch,
                                                                         results_root):
    """Done-when of issue 13, through the dock's widgets only (mode, filter, All, Run): real
    Inria crops, 10 image/mask pairs and one more image whose mask is not loaded. No cluster:
    the run stops at the planned job handed to the controller."""
    from qgis.PyQt.QtCore import Qt

    from tests import devdata

    names = devdata.first_files(INRIA, 11)
    for n in names:
        add_raster(inria("images", n), Path(n).stem)
    for n in names[:10]:
        add_raster(inria("gt", n), Path(n).stem)
    runs = started_runs(dock, monkeypatch)

    dock.mode.setCurrentIndex(dock.mode.findData("train_predict"))
    qtbot.mouseClick(dock.layer_table.select_all, Qt.LeftButton)
    assert dock.layer_table.count.text() == "10 to train on, 1 to predict, of 11"
    assert dock.split_note.text().startswith("10 ticked pairs: 6 train")
    qtbot.mouseClick(dock.run_button, Qt.LeftButton)

    assert len(runs) == 1, dock.status.text()
    planned = runs[0].planned
    assert [s.stage for s in planned.spec.steps] == ["prepare", "train", "predict"]
    trained = sorted(Path(k).name for k in planned.inputs if k.startswith("inputs/train/images/"))
    truth = sorted(Path(k).name for k in planned.inputs if k.startswith("inputs/train/masks/"))
    predicted = [Path(k).name for k in planned.inputs if k.startswith("inputs/images/")]
    assert trained == truth == sorted(names[:10])
    assert predicted == [names[10]]
    assert planned.inputs[f"inputs/images/{names[10]}"] == str(inria("images", names[10]))
    assert planned.spec.steps[0].params["split"] == [0.6, 0.2, 0.2]
    assert planned.spec.steps[1].params["patience"] == 5


def test_screenshot_of_the_dock_with_fifty_layers(dock, tmp_path):
    """For the README: build/dock_many_layers.png, the dock rendered offscreen."""
    images, _ = fifty_layers(tmp_path, held_out=3)
    dock.mode.setCurrentIndex(dock.mode.findData("train_predict"))
    dock.layer_table.tick_shown(True)
    dock.set_validated(images[4])
    dock.set_validated(images[9])
    dock.resize(700, 1500)
    dock.show()
    out = Path(__file__).resolve().parents[2] / "build" / "dock_many_layers.png"
    out.parent.mkdir(exist_ok=True)
    image = dock.grab().toImage()
    assert image.save(str(out))
    assert (image.width(), image.height()) == (700, 1500)
    assert dock.layers.height() >= 400  # the room goes to the table
    assert dock.layer_table.count.text() == ("22 to train on (2 for validation), 3 to predict, "
                                             "of 25")
    dock.hide()


def test_training_and_predicting_the_same_raster_asks_first(dock, tmp_path, monkeypatch,
                                                            results_root):
    from qgis.PyQt.QtWidgets import QMessageBox

    images, _ = fifty_layers(tmp_path, held_out=1)
    runs = started_runs(dock, monkeypatch)
    asked = []
    monkeypatch.setattr(QMessageBox, "question",
                        lambda *args, **kwargs: asked.append(args[2]) or QMessageBox.No)
    dock.mode.setCurrentIndex(dock.mode.findData("train_predict"))
    dock.set_imagery(images[0], keep_mask=True)
    dock.set_predicted(images[0])
    assert dock.run() is None and runs == []
    assert asked and asked[0].startswith("tile_0 would be trained on and predicted")
    dock.set_predicted(images[0], False)
    assert dock.run() is not None and len(runs) == 1 and len(asked) == 1


def test_chosen_validation_layers_replace_the_drawn_validation_split(dock, tmp_path,
                                                                     results_root):
    images, _ = fifty_layers(tmp_path)
    dock.mode.setCurrentIndex(dock.mode.findData("train"))
    assert not dock.layers.isColumnHidden(3)  # "Validate on"
    for image in images[:10]:
        dock.set_imagery(image, keep_mask=True)
    dock.set_validated(images[3])
    dock.set_validated(images[7])
    assert dock.layer_table.count.text() == "10 of 25 selected (2 for validation)"
    assert dock.split_note.text() == ("10 ticked pairs: 2 chosen for validation, 6 train, "
                                      "2 test (whole rasters)")
    assert not dock.split_val.isEnabled()
    prepare = dock.prepare_run().planned.spec.steps[0].params
    assert prepare["val_rasters"] == "tile_3.tif,tile_7.tif"
    dock.mode.setCurrentIndex(dock.mode.findData("predict"))
    assert dock.layers.isColumnHidden(3)
    dock.mode.setCurrentIndex(dock.mode.findData("train"))
    assert dock.layer_table.validated() == []  # reset with the mode


def test_fine_tune_mode_starts_from_a_model_and_keeps_its_network(dock, tiny_model, tmp_path,
                                                                  results_root):
    """"Fine-tune an existing model": the Model box and the training parameters are on, the
    network and the width are the model's (off, and not sent), and the rate defaults to 1e-5."""
    images, _ = fifty_layers(tmp_path)
    dock.mode.setCurrentIndex(dock.mode.findData("train"))
    assert dock.arch.isEnabled() and dock.base_filters.isEnabled()
    assert not dock.model_box.isEnabled()
    dock.arch.setCurrentIndex(dock.arch.findData("unet_bn"))  # chosen for training...
    dock.base_filters.setValue(16)
    dock.mode.setCurrentIndex(dock.mode.findData("fine_tune"))
    assert dock.mode.currentText() == "Fine-tune an existing model"
    assert dock.model_box.isEnabled() and not dock.model_dir.isEnabled()  # the built-in model
    for w in (dock.epochs, dock.workers, dock.learning_rate, dock.split_train,
              dock.early_stopping, dock.tile_size):
        assert w.isEnabled(), w
    for w in (dock.arch, dock.base_filters, dock.overlap, dock.threshold, dock.polygons):
        assert not w.isEnabled(), w
    assert not dock.layers.isColumnHidden(1) and not dock.layers.isColumnHidden(3)  # mask, val
    assert "1e-05" in dock.learning_rate.specialValueText()
    dock.set_imagery(images[0], keep_mask=True)
    dock.set_imagery(images[1], keep_mask=True)
    dock.set_validated(images[1])
    builtin = dock.prepare_run().planned
    assert builtin.spec.steps[1].params["init_model"] == "builtin"
    assert "inputs/model" not in builtin.inputs and builtin.model_job is None
    use_model_folder(dock, str(tiny_model))
    assert dock.model_dir.isEnabled()
    planned = dock.prepare_run().planned
    assert [s.stage for s in planned.spec.steps] == ["prepare", "train"]
    train = planned.spec.steps[1].params
    # ...but not sent when fine-tuning
    assert "arch" not in train and "base_filters" not in train
    assert (train["init_model"], train["lr"]) == ("inputs/model", 1e-5)
    assert planned.inputs["inputs/model"] == str(tiny_model) and planned.model_job is None
    assert planned.spec.steps[0].params["val_rasters"] == "tile_1.tif"
    dock.learning_rate.setValue(0.00003)
    assert dock.prepare_run().planned.spec.steps[1].params["lr"] == 3e-5


def test_fine_tune_from_a_training_job_on_the_cluster(dock, tmp_path, results_root):
    from rs_qgis_plugin import settings
    from rs_qgis_plugin.logic import JobRecord

    images, _ = fifty_layers(tmp_path)
    job = "20260101-000000-abcdef"
    settings.save_job(JobRecord(job, "first model", "loopback", "train", state="succeeded"))
    settings.save_job(JobRecord("20260101-000000-fffeee", "tuned", "loopback", "fine_tune",
                                state="succeeded"))
    dock.refresh_models()
    # a fine-tuned model can be used (and fine-tuned) again
    assert dock.model_source.findData("20260101-000000-fffeee") > 0
    dock.mode.setCurrentIndex(dock.mode.findData("fine_tune"))
    dock.model_source.setCurrentIndex(dock.model_source.findData(job))
    assert not dock.model_dir.isEnabled()
    dock.set_imagery(images[0], keep_mask=True)
    planned = dock.prepare_run().planned
    assert planned.model_job == job and "inputs/model" not in planned.inputs
    assert planned.spec.steps[1].params["init_model"] == "inputs/model"


def test_the_built_in_model_is_the_default_and_a_model_folder_can_still_be_chosen(dock,
                                                                                  results_root):
    """A fresh dock predicts with the model built into rs-cluster, and nothing of a model goes
    up; "Model folder on this computer" uploads the folder, and stays chosen over a refresh."""
    assert dock.model_source.itemData(0) == BUILTIN_SOURCE
    assert dock.model_source.currentData() == BUILTIN_SOURCE
    assert dock.model_source.currentText().startswith("Built-in model")
    dock.mode.setCurrentIndex(dock.mode.findData("predict"))
    dock.set_imagery(add_raster(dev_image(0), "tile"))
    assert dock.model_box.isEnabled() and not dock.model_dir.isEnabled()
    planned = dock.prepare_run().planned
    assert planned.spec.steps[0].params["model"] == "builtin"
    assert "inputs/model" not in planned.inputs and planned.model_job is None
    dock.refresh_models()
    assert dock.model_source.currentData() == BUILTIN_SOURCE
    use_model_folder(dock, "/models/m")
    assert dock.model_dir.isEnabled()
    dock.refresh_models()  # as when a job's state changes
    assert dock.model_source.currentData() == "" and dock.model_dir.isEnabled()
    planned = dock.prepare_run().planned
    assert planned.spec.steps[0].params["model"] == "inputs/model"
    assert planned.inputs["inputs/model"] == "/models/m" and planned.model_job is None


def test_the_chosen_network_reaches_the_job_and_a_tile_it_cannot_take_is_refused(
        dock, tmp_path, results_root, monkeypatch):
    images, _ = fifty_layers(tmp_path)
    runs = started_runs(dock, monkeypatch)
    dock.mode.setCurrentIndex(dock.mode.findData("train"))
    assert [dock.arch.itemData(i) for i in range(dock.arch.count())] == [
        "", "effnet_lite0_unet", "unet_bn", "unet2019"]
    assert dock.tile_size.singleStep() == 32 and dock.tile_size.value() % 32 == 0
    dock.set_imagery(images[0], keep_mask=True)
    assert "arch" not in dock.prepare_run().planned.spec.steps[1].params  # cluster default
    dock.arch.setCurrentIndex(dock.arch.findData("unet2019"))
    dock.tile_size.setValue(80)  # a multiple of 16 does for the 2019 U-Net
    train = dock.prepare_run().planned.spec.steps[1].params
    assert (train["arch"], train["tile_size"]) == ("unet2019", 80)
    dock.arch.setCurrentIndex(dock.arch.findData(""))
    assert dock.run() is None and runs == []  # refused before anything is exported or sent
    assert dock.status.text().startswith("tile size 80 px is not a multiple of 32")
    assert "choose 64 or 96 px" in dock.status.text()


# -- where the job runs, and the resources it may take (issue 17) ----------------------------------
def test_the_dock_says_in_words_where_a_job_will_run(dock):
    """Before any Test connection, after one that found no master, after one that found a
    Spark master in the settings file, and with a master set in the dock for this job."""
    from rs_qgis_plugin import settings
    from rs_qgis_plugin.core.profile import ConnectionProfile

    for name in ("untested", "login only", "standalone"):
        settings.save_profile(ConnectionProfile(name=name, host="h", user="u", use_agent=True))
    settings.save_cluster_summary("login only", {
        "master": "local[*]", "master_source": "default",
        "runs_on": "local[*] on the login host: no Spark master is set"})
    settings.save_cluster_summary("standalone", {
        "master": "spark://10.0.0.5:7077",
        "master_source": "settings file /home/ana/.rs-cluster/cluster.toml"})
    dock.refresh_profiles()
    dock.profile.setCurrentText("untested")
    assert dock.runs_on.text() == ("Where jobs run is set by the cluster's settings file; press "
                                   "Test connection in the profile to see it.")
    dock.profile.setCurrentText("login only")
    assert dock.runs_on.text() == ("Runs on: local[*] on the login host: the cluster has no "
                                   "Spark master set")
    dock.profile.setCurrentText("standalone")
    assert dock.runs_on.text() == ("Runs on: Spark master spark://10.0.0.5:7077 (from settings "
                                   "file /home/ana/.rs-cluster/cluster.toml)")
    dock.master.setText("spark://10.0.0.9:7077")
    assert dock.runs_on.text() == ("Runs on: Spark master spark://10.0.0.9:7077, set here for "
                                   "this job instead of the cluster's setting")
    dock.master.setText("local[2]")
    assert dock.runs_on.text().startswith("Runs on: local[2] on the login host, set here")
    dock.master.clear()
    assert "(from settings file" in dock.runs_on.text()
    # forgetting the profile forgets what its test found
    settings.delete_profile("standalone")
    assert settings.load_cluster_summary("standalone") is None


def test_cluster_resources_are_collapsed_and_reach_the_job_only_when_set(dock, results_root):
    from qgis.PyQt.QtCore import Qt

    image = add_raster(dev_image(0), "Xiamen tile")
    truth = add_raster(dev_mask(0), "reference")
    assert dock.resources_box.isCollapsed()
    dock.mode.setCurrentIndex(dock.mode.findData("train"))
    dock.set_imagery(image, mask=truth)
    for step in dock.prepare_run().planned.spec.to_dict()["steps"]:
        assert not {"master", "executor_cores", "executor_memory", "max_cores",
                    "queue"} & set(step["params"])
    dock.master.setText(" spark://10.0.0.5:7077 ")
    dock.executor_cores.setValue(2)
    dock.executor_memory.setText("4g")
    dock.max_cores.setValue(6)
    dock.queue.setText("analytics")
    dock.set_imagery(image, mask=truth)
    prepare, train = (s.to_dict()["params"] for s in dock.prepare_run().planned.spec.steps)
    wanted = {"master": "spark://10.0.0.5:7077", "executor_cores": 2, "executor_memory": "4g",
              "max_cores": 6, "queue": "analytics"}
    assert {k: prepare[k] for k in wanted} == wanted == {k: train[k] for k in wanted}
    # a value Spark would refuse is refused here, named, before anything is uploaded
    dock.executor_memory.setText("4 gigs")
    dock.profile.addItem("loopback")
    dock.profile.setCurrentText("loopback")
    assert dock.run() is None
    assert "executor memory '4 gigs' is not a size" in dock.status.text()
    assert dock.status.textFormat() == Qt.PlainText
    dock.executor_memory.clear()
    dock.master.setText("spark//typo:7077")
    assert dock.run() is None
    assert "Spark master 'spark//typo:7077' is not one of" in dock.status.text()
