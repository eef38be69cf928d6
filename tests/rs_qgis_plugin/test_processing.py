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
        "PROFILE", "INPUT", "MODEL", "MODEL_JOB", "OVERLAP", "THRESHOLD", "TTA", "OUTPUT"}
    assert {d.name() for d in train.parameterDefinitions()} >= {
        "PROFILE", "INPUT", "MASKS", "EPOCHS", "WORKERS", "OUTPUT"}
    assert {o.name() for o in evaluate.outputDefinitions()} >= {"REPORT", "IOU", "F1"}
    # the model's width and learning rate are optional advanced choices
    for name in ("BASE_FILTERS", "LEARNING_RATE"):
        definition = train.parameterDefinition(name)
        assert definition.flags() & QgsProcessingParameterDefinition.FlagOptional
        assert definition.flags() & QgsProcessingParameterDefinition.FlagAdvanced


def test_train_shows_and_sends_the_split_and_early_stopping(provider, tmp_path):
    """The split and the patience are parameters with their defaults in view, and what is set
    reaches the job (prepare --split, train --patience); a bad split is refused up front."""
    from qgis.core import QgsProcessingContext, QgsProcessingFeedback

    from tests.rs_qgis_plugin.conftest import dev_image

    train = QgsApplication.processingRegistry().algorithmById("rs_buildings:train")
    assert train.parameterDefinition("SPLIT").defaultValue() == "0.6,0.2,0.2"
    assert train.parameterDefinition("PATIENCE").defaultValue() == 5
    image = QgsRasterLayer(str(dev_image(0)), "image", "gdal")
    truth = QgsRasterLayer(str(dev_mask(0)), "truth", "gdal")
    QgsProject.instance().addMapLayers([image, truth])
    context = QgsProcessingContext()
    context.setProject(QgsProject.instance())
    parameters = {"PROFILE": "x", "INPUT": [image], "MASKS": [truth], "SPLIT": "0.8,0.2,0",
                  "PATIENCE": 0, "OUTPUT": str(tmp_path)}
    planned = train.plan(parameters, context, QgsProcessingFeedback(), tmp_path)
    prepare, fit = (s.to_dict()["params"] for s in planned.spec.steps)
    assert prepare["split"] == [0.8, 0.2, 0.0] and fit["patience"] == 0
    with pytest.raises(QgsProcessingException, match="adding up to 1"):
        train.plan({**parameters, "SPLIT": "0.8,0.8,0"}, context, QgsProcessingFeedback(),
                   tmp_path)
    # "use these layers for validation" instead of the drawn split
    other = QgsRasterLayer(str(dev_image(1)), "other", "gdal")
    other_truth = QgsRasterLayer(str(dev_mask(1)), "other truth", "gdal")
    QgsProject.instance().addMapLayers([other, other_truth])
    planned = train.plan({**parameters, "INPUT": [image, other], "MASKS": [truth, other_truth],
                          "VALIDATION": [other]}, context, QgsProcessingFeedback(), tmp_path)
    assert planned.spec.steps[0].params["val_rasters"] == f"{dev_image(1).stem}.tif"


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


def test_predict_sends_tta_and_squared_outlines_only_when_asked(provider, tmp_path):
    from qgis.core import QgsProcessingFeedback

    image, _, context = _dev_pair_context()
    predict = QgsApplication.processingRegistry().algorithmById("rs_buildings:predict")
    parameters = {"PROFILE": "x", "INPUT": [image], "MODEL": str(tmp_path),
                  "OUTPUT": str(tmp_path / "out")}

    def step(**more):
        planned = predict.plan({**parameters, **more}, context, QgsProcessingFeedback(), tmp_path)
        return next(s for s in planned.spec.steps if s.stage == "predict").params

    assert "tta" not in step() and "regularize" not in step()
    assert step(TTA=True)["tta"] is True
    assert step(REGULARIZE=True)["regularize"] is True
    assert "regularize" not in step(REGULARIZE=True, POLYGONS=False)


def test_a_web_map_layer_is_refused_naming_it(provider, tmp_path):
    """Processing has no clip: the whole advertised extent of an XYZ layer at 2048 px would go."""
    from qgis.core import QgsProcessingFeedback

    xyz = QgsRasterLayer("type=xyz&url=http://127.0.0.1:9/%7Bz%7D/%7Bx%7D/%7By%7D.png",
                         "web tiles", "wms")
    QgsProject.instance().addMapLayer(xyz)
    predict = QgsApplication.processingRegistry().algorithmById("rs_buildings:predict")
    with pytest.raises(QgsProcessingException, match="web tiles is a web map layer"):
        predict.local_rasters([xyz], tmp_path, QgsProcessingFeedback())
    assert not list(tmp_path.iterdir())  # nothing exported


def _dev_pair_context():
    from qgis.core import QgsProcessingContext

    from tests.rs_qgis_plugin.conftest import dev_image

    image = QgsRasterLayer(str(dev_image(0)), "image", "gdal")
    truth = QgsRasterLayer(str(dev_mask(0)), "truth", "gdal")
    QgsProject.instance().addMapLayers([image, truth])
    context = QgsProcessingContext()
    context.setProject(QgsProject.instance())
    return image, truth, context


def test_train_offers_the_network_and_refuses_a_tile_it_cannot_take(provider, tmp_path):
    from qgis.core import QgsProcessingFeedback

    train = QgsApplication.processingRegistry().algorithmById("rs_buildings:train")
    arch = train.parameterDefinition("ARCH")
    assert arch.options()[0].startswith("cluster default") and arch.defaultValue() == 0
    assert len(arch.options()) == 4
    image, truth, context = _dev_pair_context()
    parameters = {"PROFILE": "x", "INPUT": [image], "MASKS": [truth], "OUTPUT": str(tmp_path)}
    fit = train.plan(parameters, context, QgsProcessingFeedback(), tmp_path).spec.steps[1].params
    assert "arch" not in fit  # the cluster's default
    fit = train.plan({**parameters, "ARCH": 3, "TILE_SIZE": 80}, context,
                     QgsProcessingFeedback(), tmp_path).spec.steps[1].params
    assert (fit["arch"], fit["tile_size"]) == ("unet2019", 80)
    with pytest.raises(QgsProcessingException, match="tile size 80 px is not a multiple of 32"):
        train.plan({**parameters, "TILE_SIZE": 80}, context, QgsProcessingFeedback(), tmp_path)


def test_fine_tune_is_in_the_toolbox_and_starts_from_the_chosen_model(provider, tmp_path):
    from qgis.core import QgsProcessingFeedback

    tune = QgsApplication.processingRegistry().algorithmById("rs_buildings:fine_tune")
    assert tune is not None
    names = {d.name() for d in tune.parameterDefinitions()}
    assert names >= {"PROFILE", "INPUT", "MASKS", "INIT_MODEL", "INIT_MODEL_JOB", "EPOCHS",
                     "LEARNING_RATE", "SPLIT", "PATIENCE", "OUTPUT"}
    assert not names & {"ARCH", "BASE_FILTERS"}  # the model's own
    assert {o.name() for o in tune.outputDefinitions()} >= {"MODEL"}
    image, truth, context = _dev_pair_context()
    parameters = {"PROFILE": "x", "INPUT": [image], "MASKS": [truth], "SPLIT": "0.8,0.2,0",
                  "INIT_MODEL_JOB": "20260101-000000-aaaaaa", "OUTPUT": str(tmp_path)}
    planned = tune.plan(parameters, context, QgsProcessingFeedback(), tmp_path)
    fit = planned.spec.steps[1].params
    assert (fit["init_model"], fit["lr"]) == ("inputs/model", 1e-5)
    assert planned.model_job == "20260101-000000-aaaaaa" and "inputs/model" not in planned.inputs
    model = tmp_path / "model"
    model.mkdir()
    planned = tune.plan({**parameters, "INIT_MODEL_JOB": "", "INIT_MODEL": str(model),
                         "LEARNING_RATE": 2e-5}, context, QgsProcessingFeedback(), tmp_path)
    assert planned.inputs["inputs/model"] == str(model)
    assert planned.spec.steps[1].params["lr"] == 2e-5


def test_predict_and_fine_tune_use_the_built_in_model_when_no_model_is_given(provider,
                                                                             tmp_path):
    """Left empty, the folder and the job id parameters mean the model built into rs-cluster:
    nothing of a model is uploaded or linked, and the parameters say so."""
    from qgis.core import QgsProcessingFeedback

    registry = QgsApplication.processingRegistry()
    image, truth, context = _dev_pair_context()
    cases = (("rs_buildings:predict", ("MODEL", "MODEL_JOB"), {}, 0, "model"),
             ("rs_buildings:fine_tune", ("INIT_MODEL", "INIT_MODEL_JOB"), {"MASKS": [truth]}, 1,
              "init_model"))
    for alg_id, keys, more, index, param in cases:
        alg = registry.algorithmById(alg_id)
        for key in keys:
            assert "built-in model" in alg.parameterDefinition(key).description(), key
        assert "built into rs-cluster" in alg.shortHelpString()
        parameters = {"PROFILE": "x", "INPUT": [image], **more, keys[0]: "", keys[1]: "",
                      "OUTPUT": str(tmp_path)}
        planned = alg.plan(parameters, context, QgsProcessingFeedback(), tmp_path)
        assert planned.spec.steps[index].params[param] == "builtin", alg_id
        assert "inputs/model" not in planned.inputs and planned.model_job is None


def test_spark_master_and_resources_are_advanced_optional_and_reach_the_job(provider, tmp_path):
    """Train, fine-tune and predict take the overrides of the cluster's settings file as
    advanced parameters; left out (or 0) they are not sent; a bad value is refused by name."""
    from qgis.core import QgsProcessingContext, QgsProcessingFeedback

    from tests.rs_qgis_plugin.conftest import dev_image

    registry = QgsApplication.processingRegistry()
    names = ("MASTER", "EXECUTOR_CORES", "EXECUTOR_MEMORY", "MAX_CORES", "QUEUE")
    for alg_id in ("rs_buildings:train", "rs_buildings:fine_tune", "rs_buildings:predict"):
        alg = registry.algorithmById(alg_id)
        for name in names:
            definition = alg.parameterDefinition(name)
            assert definition is not None, (alg_id, name)
            assert definition.flags() & QgsProcessingParameterDefinition.FlagOptional
            assert definition.flags() & QgsProcessingParameterDefinition.FlagAdvanced
    assert registry.algorithmById("rs_buildings:evaluate").parameterDefinition("MASTER") is None

    image = QgsRasterLayer(str(dev_image(0)), "image", "gdal")
    truth = QgsRasterLayer(str(dev_mask(0)), "truth", "gdal")
    QgsProject.instance().addMapLayers([image, truth])
    context = QgsProcessingContext()
    context.setProject(QgsProject.instance())
    feedback = QgsProcessingFeedback()
    train = registry.algorithmById("rs_buildings:train")
    parameters = {"PROFILE": "x", "INPUT": [image], "MASKS": [truth], "OUTPUT": str(tmp_path),
                  "EXECUTOR_CORES": 0, "MASTER": ""}
    for step in train.plan(parameters, context, feedback, tmp_path).spec.steps:
        assert not set(names) & {k.upper() for k in step.params}, step
    chosen = {"MASTER": "yarn", "EXECUTOR_CORES": 2, "EXECUTOR_MEMORY": "3g", "MAX_CORES": 4,
              "QUEUE": "gis"}
    wanted = {"master": "yarn", "executor_cores": 2, "executor_memory": "3g", "max_cores": 4,
              "queue": "gis"}
    for step in train.plan({**parameters, **chosen}, context, feedback, tmp_path).spec.steps:
        assert {k: step.params[k] for k in wanted} == wanted
    predict = registry.algorithmById("rs_buildings:predict")
    planned = predict.plan({"PROFILE": "x", "INPUT": [image], "MODEL_JOB": "20250101-000000-abc",
                            "OUTPUT": str(tmp_path), "MAX_CORES": 3}, context, feedback, tmp_path)
    assert planned.spec.steps[0].params["max_cores"] == 3
    assert "master" not in planned.spec.steps[0].params
    with pytest.raises(QgsProcessingException, match="executor memory '3 GB' is not a size"):
        train.plan({**parameters, "EXECUTOR_MEMORY": "3 GB"}, context, feedback, tmp_path)
    with pytest.raises(QgsProcessingException, match="Spark master 'spark://nohost' is not"):
        predict.plan({"PROFILE": "x", "INPUT": [image], "MODEL_JOB": "20250101-000000-abc",
                      "OUTPUT": str(tmp_path), "MASTER": "spark://nohost"}, context, feedback,
                     tmp_path)
