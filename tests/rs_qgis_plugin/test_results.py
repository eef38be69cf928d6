"""Results on the map: the mask on the imagery's grid, styled for overlay, grouped per job.

The "downloaded" mask here is the real Xiamen reference mask under the name predict gives its
output (``<stem>_mask.tif``, uint8 255/0 on the image grid, exactly what predict writes); the
polygons are made from it with GDAL.
"""

from __future__ import annotations

import json
import shutil
import subprocess

import pytest
from qgis.core import Qgis, QgsProject, QgsRasterLayer, QgsSingleBandPseudoColorRenderer

from rs_qgis_plugin.controller import JobController
from rs_qgis_plugin.logic import JobRecord
from rs_qgis_plugin.results import JOB_PROPERTY
from tests.rs_qgis_plugin.conftest import dev_image, dev_mask

pytestmark = [pytest.mark.qgis, pytest.mark.usefixtures("qgis_env")]


@pytest.fixture
def downloaded(tmp_path):
    """A job folder as FetchResultsTask leaves it."""
    masks = tmp_path / "job" / "outputs" / "masks"
    masks.mkdir(parents=True)
    stem = dev_image(0).stem
    mask = masks / f"{stem}_mask.tif"
    shutil.copyfile(dev_mask(0), mask)
    polygons = masks / f"{stem}_buildings.gpkg"
    subprocess.run(["gdal_polygonize.py", "-q", str(dev_mask(0)), "-mask", str(dev_mask(0)),
                    "-f", "GPKG", str(polygons), "buildings"], check=True, timeout=120)
    report = tmp_path / "job" / "outputs" / "report.json"
    report.write_text(json.dumps({"pooled": {"iou": 0.8123, "f1": 0.9}, "images": [{}]}))
    return [mask, polygons, report, masks / "predict.json"]


def test_mask_lands_on_the_imagery_styled_and_grouped_per_job(qgis_iface, downloaded):
    project = QgsProject.instance()
    image = QgsRasterLayer(str(dev_image(0)), "imagery", "gdal")
    project.addMapLayer(image)
    controller = JobController(qgis_iface)
    record = JobRecord("20260101-000000-abcdef", "Xiamen", "loopback", "evaluate",
                       state="succeeded")
    layers = controller.load(record, downloaded)

    assert [lyr.name() for lyr in layers] == [f"{dev_image(0).stem} building outlines",
                                              f"{dev_image(0).stem} buildings"]
    polygons, mask = layers
    assert mask.crs() == image.crs() and mask.extent() == image.extent()
    assert (mask.width(), mask.height()) == (image.width(), image.height())
    # the overlay style: background fully transparent, buildings a solid colour, half opaque
    renderer = mask.renderer()
    assert isinstance(renderer, QgsSingleBandPseudoColorRenderer)
    items = {int(i.value): i.color for i in
             renderer.shader().rasterShaderFunction().colorRampItemList()}
    assert items[0].alpha() == 0 and items[255].alpha() == 255
    assert 0.3 <= renderer.opacity() <= 0.8
    assert polygons.featureCount() > 0 and polygons.crs() == image.crs()
    assert polygons.extent().intersects(image.extent())

    # one group per job, on top of the tree, holding exactly its layers
    group = project.layerTreeRoot().children()[0]
    assert group.name() == "Xiamen" and group.customProperty(JOB_PROPERTY) == record.job_id
    assert {n.layerId() for n in group.findLayers()} == {mask.id(), polygons.id()}
    # the evaluation report reaches the user, and the record remembers it
    messages = qgis_iface.messageBar().get_messages(Qgis.Success)
    assert any("IoU 0.812" in m for m in messages)
    assert controller.record(record.job_id).loaded


def test_a_broken_download_is_reported_not_loaded(qgis_iface, tmp_path):
    bad = tmp_path / "x_mask.tif"
    bad.write_bytes(b"not a tiff")
    controller = JobController(qgis_iface)
    record = JobRecord("j", "broken", "loopback", "predict", state="succeeded")
    assert controller.load(record, [bad]) == []
    assert any("cannot open" in m for m in qgis_iface.messageBar().get_messages(Qgis.Critical))
    assert not QgsProject.instance().mapLayers()


def test_a_non_georeferenced_result_loads_without_a_crs_error(qgis_iface, qgis_canvas, qtbot,
                                                              tmp_path):
    """A mask predicted from a plain image (no CRS, no geotransform), loaded into a project
    in EPSG:26914 and drawn: QGIS must not report "No transform available between Undefined
    SRS and EPSG:26914", and the user is told why the layer has no place on the map."""
    from osgeo import gdal
    from qgis.core import QgsApplication, QgsCoordinateReferenceSystem, QgsCoordinateTransform

    masks = tmp_path / "job" / "outputs" / "masks"
    masks.mkdir(parents=True)
    path = masks / "plain_mask.tif"
    ds = gdal.GetDriverByName("GTiff").Create(str(path), 64, 48, 1, gdal.GDT_Byte)
    ds.GetRasterBand(1).Fill(255)
    ds = None
    # what a prediction copying a plain image's profile holds: a local ("Undefined") CRS
    local = masks / "local_mask.tif"
    ds = gdal.GetDriverByName("GTiff").Create(str(local), 64, 48, 1, gdal.GDT_Byte)
    ds.SetProjection('LOCAL_CS["Undefined",UNIT["metre",1]]')
    ds.SetGeoTransform((0, 1, 0, 0, 0, -1))
    ds = None
    project = QgsProject.instance()
    crs = QgsCoordinateReferenceSystem("EPSG:26914")
    project.setCrs(crs)
    critical = []

    def on_message(message, tag, level):
        if level == Qgis.Critical:
            critical.append(f"{tag}: {message}")

    QgsApplication.messageLog().messageReceived.connect(on_message)
    try:
        record = JobRecord("job-plain", "plain image", "p", "predict", state="succeeded")
        layers = JobController(qgis_iface).load(record, [path, local])
        assert len(layers) == 2 and all(layer.isValid() for layer in layers)
        # The desktop reports "No transform available between Undefined SRS and EPSG:26914"
        # in red when the canvas cannot build this transform (pytest-qgis has no such handler)
        for layer in layers:
            transform = QgsCoordinateTransform(layer.crs(), crs, project)
            assert transform.isValid() or layer.crs() == crs, layer.crs().toWkt()
        qgis_canvas.setDestinationCrs(crs)
        qgis_canvas.setLayers(layers)
        qgis_canvas.setExtent(layers[0].extent())
        qgis_canvas.refresh()
        qgis_canvas.waitWhileRendering()
        qtbot.wait(200)
    finally:
        QgsApplication.messageLog().messageReceived.disconnect(on_message)
    bar = qgis_iface.messageBar()
    assert critical == [] and bar.get_messages(Qgis.Critical) == []
    assert any("no coordinate reference system" in m
               for level in (Qgis.Info, Qgis.Success, Qgis.Warning)
               for m in bar.get_messages(level))
