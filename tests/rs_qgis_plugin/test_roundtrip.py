"""From the dock to the cluster and back onto the map: the real plugin, a real OpenSSH server on
127.0.0.1, the real ``rs-cluster predict``/``evaluate`` (local Spark), a real Keras model (a fixed
1x1 convolution, so it needs no training), real Xiamen GeoTIFFs."""

from __future__ import annotations

import pytest
from qgis.core import Qgis, QgsProject, QgsRasterLayer, QgsVectorLayer

import rs_qgis_plugin
from rs_qgis_plugin.results import JOB_PROPERTY
from tests.rs_qgis_plugin.conftest import dev_image, dev_mask, wait_for

pytestmark = [pytest.mark.qgis, pytest.mark.ssh, pytest.mark.slow,
              pytest.mark.usefixtures("qgis_env", "need_predict")]


def job_layers(job_id: str) -> list:
    return [lyr for lyr in QgsProject.instance().mapLayers().values()
            if lyr.customProperty(JOB_PROPERTY) == job_id]


@pytest.fixture
def plugin(qgis_iface, profile, results_root):
    loaded = rs_qgis_plugin.classFactory(qgis_iface)
    loaded.initGui()
    loaded.controller.poll_s = 0.5
    yield loaded
    if loaded.controller is not None:
        loaded.unload()


def choose(dock, profile, image, mode, model, mask=None):
    dock.refresh_profiles()
    dock.profile.setCurrentText(profile.name)
    dock.mode.setCurrentIndex(dock.mode.findData(mode))
    dock.set_imagery(image, mask=mask)
    if model is None:  # the dock's default: the model built into rs-cluster
        assert dock.model_source.currentIndex() == 0 and not dock.model_dir.isEnabled()
        return
    dock.model_source.setCurrentIndex(dock.model_source.findData(""))  # a folder, not the built-in
    dock.model_dir.setFilePath(str(model))


def test_predict_survives_a_plugin_reload_and_the_mask_lands_on_the_imagery(
        plugin, qgis_iface, qtbot, profile, tiny_model):
    image = QgsRasterLayer(str(dev_image(0)), "Xiamen imagery", "gdal")
    QgsProject.instance().addMapLayer(image)
    choose(plugin.dock, profile, image, "predict", tiny_model)
    task = plugin.dock.run()
    assert task is not None, plugin.dock.status.text()
    job = task.job_id
    wait_for(qtbot, lambda: plugin.controller.record(job).state == "running", 60)

    # QGIS is closed while the cluster works, and opened again
    plugin.unload()
    assert job_layers(job) == []
    again = rs_qgis_plugin.classFactory(qgis_iface)
    again.initGui()  # reattaches: watches the job, then fetches and loads its results
    try:
        assert again.controller.record(job).name == "Xiamen imagery"
        wait_for(qtbot, lambda: again.controller.record(job).loaded, 240)
        record = again.controller.record(job)
        assert record.state == "succeeded" and record.progress == 100.0

        masks = [lyr for lyr in job_layers(job) if isinstance(lyr, QgsRasterLayer)]
        polygons = [lyr for lyr in job_layers(job) if isinstance(lyr, QgsVectorLayer)]
        assert len(masks) == 1 and len(polygons) == 1
        mask = masks[0]
        assert mask.source().endswith(f"{dev_image(0).stem}_mask.tif")
        assert mask.crs() == image.crs() and mask.extent() == image.extent()
        assert (mask.width(), mask.height()) == (256, 256)
        # the model marks pixels whose red is above half: some, not all, are "buildings"
        stats = mask.dataProvider().bandStatistics(1)
        assert (stats.minimumValue, stats.maximumValue) == (0, 255)
        # drawn over the imagery: the job's group is above the imagery in the layer tree
        order = [lyr.id() for lyr in QgsProject.instance().layerTreeRoot().layerOrder()]
        assert order.index(mask.id()) < order.index(image.id())
        assert any("layer(s) added" in m
                   for m in qgis_iface.messageBar().get_messages(Qgis.Success))
    finally:
        again.unload()


@pytest.mark.parametrize("builtin", [False, True], ids=["model-folder", "built-in-model"])
def test_evaluate_reports_the_scores_in_the_message_bar(plugin, qgis_iface, qtbot, profile,
                                                         tiny_model, builtin):
    """With a model folder (uploaded) and with the dock's default, the built-in model (the
    cluster's own copy, which the planner tests show is never uploaded)."""
    image = QgsRasterLayer(str(dev_image(0)), "imagery", "gdal")
    truth = QgsRasterLayer(str(dev_mask(0)), "reference", "gdal")
    QgsProject.instance().addMapLayers([image, truth])
    choose(plugin.dock, profile, image, "evaluate", None if builtin else tiny_model, mask=truth)
    job = plugin.dock.run().job_id
    wait_for(qtbot, lambda: plugin.controller.record(job).loaded, 240)
    success = qgis_iface.messageBar().get_messages(Qgis.Success)
    assert any("IoU 0." in m for m in success), success
    assert "IoU" in plugin.controller.record(job).message
    assert plugin.dock.jobs_panel.table.rowCount() == 1
