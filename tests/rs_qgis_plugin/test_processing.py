"""The Processing algorithms: registered with their parameters, and one run end to end through
``processing.run`` against the real OpenSSH server and the real ``rs-cluster evaluate``."""

from __future__ import annotations

import json
import shutil

import pytest
from qgis.core import (
    QgsApplication,
    QgsProcessingException,
    QgsProcessingParameterDefinition,
    QgsProject,
    QgsRasterLayer,
)

from rs_qgis_plugin.processing_provider import RsProvider
from tests.rs_qgis_plugin.conftest import dev_mask

pytestmark = [pytest.mark.qgis, pytest.mark.usefixtures("qgis_env", "qgis_processing")]


@pytest.fixture
def provider():
    p = RsProvider()
    assert QgsApplication.processingRegistry().addProvider(p)
    yield p
    QgsApplication.processingRegistry().removeProvider(p)


def test_train_predict_evaluate_are_in_the_toolbox(provider):
    registry = QgsApplication.processingRegistry()
    predict = registry.algorithmById("rs_buildings:predict")
    train = registry.algorithmById("rs_buildings:train")
    evaluate = registry.algorithmById("rs_buildings:evaluate")
    assert predict and train and evaluate
    assert {d.name() for d in predict.parameterDefinitions()} >= {
        "PROFILE", "INPUT", "MODEL", "MODEL_JOB", "OVERLAP", "THRESHOLD", "OUTPUT"}
    assert {d.name() for d in train.parameterDefinitions()} >= {
        "PROFILE", "INPUT", "MASKS", "EPOCHS", "WORKERS", "OUTPUT"}
    assert {o.name() for o in evaluate.outputDefinitions()} >= {"REPORT", "IOU", "F1"}
    # the model's width and learning rate are optional advanced choices
    for name in ("BASE_FILTERS", "LEARNING_RATE"):
        definition = train.parameterDefinition(name)
        assert definition.flags() & QgsProcessingParameterDefinition.FlagOptional
        assert definition.flags() & QgsProcessingParameterDefinition.FlagAdvanced


@pytest.mark.ssh
def test_evaluate_runs_on_the_cluster_and_returns_the_scores(provider, profile, tmp_path,
                                                             qgis_iface, qtbot):
    """Also recorded as a job: it appears in the jobs panel, as the dock's jobs do."""
    import processing

    from rs_qgis_plugin import settings
    from rs_qgis_plugin.controller import JobController
    from rs_qgis_plugin.jobs_panel import JobsPanel
    from tests.rs_qgis_plugin.conftest import wait_for

    controller = JobController(qgis_iface)  # the plugin's, while QGIS runs the algorithm
    panel = JobsPanel(controller)
    truth = QgsRasterLayer(str(dev_mask(0)), "reference", "gdal")
    # a "prediction": the reference mask itself, so every score is exactly 1
    predicted_path = tmp_path / "pred.tif"
    shutil.copyfile(dev_mask(0), predicted_path)
    predicted = QgsRasterLayer(str(predicted_path), "prediction", "gdal")
    QgsProject.instance().addMapLayers([truth, predicted])
    result = processing.run("rs_buildings:evaluate", {
        "PROFILE": profile.name, "PREDICTED": [predicted], "REFERENCE": [truth],
        "OUTPUT": str(tmp_path / "out")})
    assert result["IOU"] == 1.0 and result["F1"] == 1.0
    report = json.loads(open(result["REPORT"]).read())
    assert report["pooled"]["images"] == 1
    records = settings.load_jobs()
    assert [(r.mode, r.state, r.origin, r.loaded) for r in records] == [
        ("evaluate", "succeeded", "processing", True)]
    assert records[0].local_dir == str(tmp_path / "out")
    wait_for(qtbot, lambda: [r.state for r in controller.records()] == ["succeeded"], 10)
    assert panel.table.rowCount() == 1
    assert panel.table.item(0, JobsPanel.COLUMNS.index("job id")).text() == records[0].job_id
    controller.shutdown()
    panel.deleteLater()


def test_an_unknown_profile_is_a_clear_processing_error(provider, tmp_path):
    import processing

    truth = QgsRasterLayer(str(dev_mask(0)), "reference", "gdal")
    QgsProject.instance().addMapLayer(truth)
    with pytest.raises(QgsProcessingException, match="no connection profile 'nowhere'"):
        processing.run("rs_buildings:evaluate", {
            "PROFILE": "nowhere", "PREDICTED": [truth], "REFERENCE": [truth],
            "OUTPUT": str(tmp_path / "out")})
