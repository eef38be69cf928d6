"""The plugin's QGIS-free decisions: which job a run becomes, what is uploaded and fetched."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from rs_qgis_plugin.core.errors import SpecError
from rs_qgis_plugin.core.protocol import parse_status
from rs_qgis_plugin.logic import (
    JobRecord,
    RasterPick,
    RunParams,
    classify_results,
    local_raster_path,
    plan_evaluation,
    plan_job,
    summarize_report,
    unique_stems,
)

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("module", ["rs_qgis_plugin.logic", "rs_qgis_plugin.pairing"])
def test_the_decision_modules_import_neither_qgis_nor_qt(module):
    probe = ("import sys\nfor n in ('qgis', 'PyQt5', 'sip'): sys.modules[n] = None\n"
             f"import {module}")
    out = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True,
                         text=True, timeout=60, env={"PYTHONPATH": str(REPO)})
    assert out.returncode == 0, out.stderr


def test_train_then_predict_pairs_masks_by_image_name_and_predicts_every_image():
    picks = [RasterPick("/data/a b.tif", "/masks/whatever.tif"),
             RasterPick("/other/a b.tif", "/masks/x.tiff"),
             RasterPick("/data/Ω only.jp2")]
    planned = plan_job("Xiamen", RunParams(mode="train_predict", epochs=3, workers=2), picks,
                       job_id="20260101-000000-abcdef")
    spec = planned.spec.to_dict()
    assert [s["stage"] for s in spec["steps"]] == ["prepare", "train", "predict"]
    assert spec["steps"][1]["params"]["epochs"] == 3 and spec["steps"][1]["params"]["num_proc"] == 2
    assert spec["steps"][2]["params"]["model"] == "outputs/model"
    assert planned.inputs == {
        "inputs/train/images/a_b.tif": "/data/a b.tif",
        "inputs/train/masks/a_b.tif": "/masks/whatever.tif",
        "inputs/train/images/a_b_2.tif": "/other/a b.tif",
        "inputs/train/masks/a_b_2.tiff": "/masks/x.tiff",
        "inputs/images/a_b.tif": "/data/a b.tif",
        "inputs/images/a_b_2.tif": "/other/a b.tif",
        "inputs/images/only.jp2": "/data/Ω only.jp2",
    }
    assert planned.fetch == ("outputs/model", "outputs/masks")
    # settings not chosen are left to the cluster's defaults
    assert "stride" not in spec["steps"][0]["params"] and "lr" not in spec["steps"][1]["params"]


def test_chosen_training_settings_reach_prepare_and_train():
    params = RunParams(mode="train", stride=64, base_filters=16, learning_rate=1e-3, patience=0,
                       dice=True, master="spark://127.0.0.1:7077")
    steps = plan_job("x", params, [RasterPick("/a.tif", "/m.tif")]).spec.to_dict()["steps"]
    assert steps[0]["params"]["stride"] == 64
    assert {k: steps[1]["params"][k] for k in ("base_filters", "lr", "patience", "dice", "master")} \
        == {"base_filters": 16, "lr": 1e-3, "patience": 0, "dice": True,
            "master": "spark://127.0.0.1:7077"}


def test_the_chosen_split_reaches_prepare_and_a_bad_one_is_refused():
    params = RunParams(mode="train", split=(0.8, 0.1, 0.1), patience=3)
    steps = plan_job("x", params, [RasterPick("/a.tif", "/m.tif")]).spec.to_dict()["steps"]
    assert steps[0]["params"]["split"] == [0.8, 0.1, 0.1]
    assert steps[1]["params"]["patience"] == 3
    with pytest.raises(SpecError, match="adding up to 1"):
        RunParams(mode="train", split=(0.5, 0.1, 0.1))
    with pytest.raises(SpecError, match="train fraction"):
        RunParams(mode="train", split=(0.0, 0.5, 0.5))


def test_train_then_predict_predicts_only_the_rasters_chosen_for_it():
    """Ten training pairs, one held-out raster: one prediction comes back, not eleven."""
    picks = [RasterPick(f"/d/images/t{i}.tif", f"/d/gt/t{i}.tif", predict=False)
             for i in range(10)] + [RasterPick("/d/images/held.tif")]
    planned = plan_job("x", RunParams(mode="train_predict"), picks)
    trained = [k for k in planned.inputs if k.startswith("inputs/train/images/")]
    predicted = [k for k in planned.inputs if k.startswith("inputs/images/")]
    assert len(trained) == 10 and predicted == ["inputs/images/held.tif"]
    assert planned.stems == {"held": "/d/images/held.tif"}


def test_chosen_validation_rasters_go_up_with_the_training_pairs_and_are_named():
    picks = [RasterPick(f"/d/images/t {i}.TIF", f"/d/gt/t {i}.tif", validate=i in (2, 5))
             for i in range(6)]
    planned = plan_job("x", RunParams(mode="train"), picks)
    prepare = planned.spec.steps[0].params
    assert prepare["val_rasters"] == "t_2.tif,t_5.tif"
    assert "inputs/train/images/t_2.tif" in planned.inputs
    with pytest.raises(SpecError, match="validation needs a reference mask; missing for a.tif"):
        plan_job("x", RunParams(mode="train"), [*picks, RasterPick("/a.tif", validate=True)])
    with pytest.raises(SpecError, match="leave at least one to train on"):
        plan_job("x", RunParams(mode="train"), [RasterPick("/a.tif", "/m.tif", validate=True)])


def test_predict_uploads_a_local_model_or_reuses_a_cluster_job():
    local = plan_job("p", RunParams(mode="predict", model_dir="/models/m1", threshold=0.4),
                     [RasterPick("/d/x.tif")])
    assert local.inputs["inputs/model"] == "/models/m1" and local.model_job is None
    step = local.spec.to_dict()["steps"][0]
    assert step == {"stage": "predict", "params": {
        "model": "inputs/model", "input": "inputs/images", "output": "outputs/masks",
        "overlap": 32, "batch_size": 16, "threshold": 0.4, "polygons": True}}
    remote = plan_job("p", RunParams(mode="predict", model_job="20260101-000000-aaaaaa"),
                      [RasterPick("/d/x.tif")])
    assert "inputs/model" not in remote.inputs and remote.model_job == "20260101-000000-aaaaaa"


@pytest.mark.parametrize("mode, picks", [
    ("predict", [RasterPick("/d/x.tif")]),
    ("evaluate", [RasterPick("/d/x.tif", "/g/x.tif")]),
])
def test_predict_and_evaluate_with_the_built_in_model_upload_no_model(mode, picks):
    planned = plan_job("b", RunParams(mode=mode, model_builtin=True), picks)
    assert planned.spec.to_dict()["steps"][0]["params"]["model"] == "builtin"
    assert not any(k.startswith("inputs/model") for k in planned.inputs)
    assert planned.model_job is None


def test_evaluate_predicts_then_scores_against_the_reference_masks():
    planned = plan_job("e", RunParams(mode="evaluate", model_dir="/m"),
                       [RasterPick("/d/x.tif", "/g/x.tif")])
    assert [s.stage for s in planned.spec.steps] == ["predict", "evaluate"]
    assert planned.spec.steps[1].params == {"pred": "outputs/masks", "truth": "inputs/masks",
                                            "json": "outputs/report.json"}
    assert planned.inputs["inputs/masks/x.tif"] == "/g/x.tif"
    assert planned.fetch == ("outputs/masks", "outputs/report.json")


@pytest.mark.parametrize("params, picks, message", [
    (RunParams(mode="train"), [RasterPick("/a.tif")], "reference mask"),
    (RunParams(mode="evaluate", model_dir="/m"), [RasterPick("/a.tif", "/g.tif"),
                                                   RasterPick("/b.tif")], "missing for b.tif"),
    (RunParams(mode="predict", model_dir="/m"), [], "at least one imagery"),
])
def test_impossible_runs_are_refused_with_the_reason(params, picks, message):
    with pytest.raises(SpecError, match=message):
        plan_job("x", params, picks)


@pytest.mark.parametrize("changes, message", [
    ({"mode": "predict"}, "choose a model: the built-in model, a model folder on this "
                          "computer or a finished training job on the cluster"),
    ({"mode": "predict", "model_builtin": True, "model_dir": "/m"}, "choose one model"),
    ({"mode": "evaluate", "model_builtin": True, "model_job": "20260101-000000-aaaaaa"},
     "choose one model"),
    ({"overlap": 128, "model_dir": "/m"}, "overlap"),
    ({"threshold": 1.0, "model_dir": "/m"}, "threshold"),
    ({"mode": "paint"}, "unknown mode"),
    ({"mode": "train", "stride": 0}, "stride must be at least 1"),
    ({"mode": "train", "learning_rate": 0.0}, "learning rate"),
])
def test_bad_parameters_are_refused(changes, message):
    with pytest.raises(SpecError, match=message):
        RunParams(**changes)


def test_evaluation_of_existing_masks_pairs_them_in_order():
    planned = plan_evaluation("e", ["/p/a_mask.tif", "/p/b.tif"], ["/g/1.tif", "/g/2.tif"])
    assert planned.inputs == {"inputs/predicted/a_mask_mask.tif": "/p/a_mask.tif",
                              "inputs/masks/a_mask.tif": "/g/1.tif",
                              "inputs/predicted/b_mask.tif": "/p/b.tif",
                              "inputs/masks/b.tif": "/g/2.tif"}
    with pytest.raises(SpecError, match="as many"):
        plan_evaluation("e", ["/p/a.tif"], [])


def test_unique_stems_are_safe_and_distinct():
    assert unique_stems(["/a/x y.tif", "/b/X y.tif", "/c/$(rm -rf).tif", "/d/建筑.tif"]) == [
        "x_y", "X_y_2", "rm_-rf", "raster"]


@pytest.mark.parametrize("provider, source, expected", [
    ("gdal", "/data/a.tif", "/data/a.tif"),
    ("gdal", "/data/a.tif|option:x", "/data/a.tif"),
    ("gdal", "/data/a.vrt", None),  # its sources would not travel with it
    ("gdal", "/vsicurl/https://host/a.tif", None),
    ("gdal", "GPKG:/data/a.gpkg:table", None),
    ("wms", "url=https://tiles/{z}/{x}/{y}.png", None),
    ("virtualraster", "?crs=EPSG:3857", None),
    ("gdal", "/data/a.png", "/data/a.png"),
    # Formats outside the contract's list (the cluster's GDAL may lack the driver, or the file
    # is a header whose data lies elsewhere) are exported to GeoTIFF, never left out there.
    ("gdal", "/data/a.ecw", None),
    ("gdal", "/data/a.sid", None),
    ("gdal", "/data/a.asc", None),
    ("gdal", "/data/a.nc", None),
    ("gdal", "/data/a.hdr", None),
])
def test_which_layers_are_uploaded_as_they_are(provider, source, expected):
    assert local_raster_path(provider, source, exists=True) == expected


def test_results_are_sorted_into_masks_polygons_report_model(tmp_path):
    files = [tmp_path / "outputs/masks/a_mask.tif", tmp_path / "outputs/masks/a_buildings.gpkg",
             tmp_path / "outputs/masks/predict.json", tmp_path / "outputs/report.json",
             tmp_path / "outputs/model/model.json", tmp_path / "outputs/model/model.keras"]
    r = classify_results(files)
    assert r.masks == (str(files[0]),) and r.polygons == (str(files[1]),)
    assert r.report == str(files[3]) and r.model == str(tmp_path / "outputs/model")


def test_report_summary_names_the_pooled_scores():
    report = {"pooled": {"iou": 0.1672, "f1": 0.2866, "precision": 0.2221, "recall": 0.4036,
                         "accuracy": 0.7293}, "images": [{"name": "a"}]}
    assert summarize_report(report) == ("1 image(s): IoU 0.167, F1 0.287, precision 0.222, "
                                        "recall 0.404, accuracy 0.729")


def test_job_records_survive_a_round_trip_and_follow_the_status():
    record = JobRecord("j1", "Bâtiments", "loopback", "predict", fetch=("outputs/masks",))
    assert JobRecord.from_json(record.to_json()) == record
    status = parse_status(json.dumps({"schema_version": 1, "job_id": "j1", "state": "running",
                                      "stage": "predict", "progress": 40.0,
                                      "started": "2026-01-01T00:00:00Z"}))
    running = record.with_status(status)
    assert running.remote_active and running.stage == "predict" and running.progress == 40.0
    restarted = running.with_status(parse_status({"schema_version": 1, "job_id": "j1",
                                                  "state": "running", "restarts": 1}))
    assert restarted.restarts == 1 and JobRecord.from_json(restarted.to_json()).restarts == 1
    done = running.with_status(parse_status({"schema_version": 1, "job_id": "j1",
                                             "state": "succeeded", "progress": 100.0}))
    assert done.needs_fetch and not done.remote_active
    # a record written by a newer plugin with extra keys still loads
    data = json.loads(record.to_json()) | {"future_key": 1}
    assert JobRecord.from_json(json.dumps(data)).job_id == "j1"


# -- georeferencing travels with the raster -------------------------------------------------------
@pytest.fixture
def pam_enabled():
    """GDAL's .aux.xml files as QGIS reads them by default. The plugin tests turn them off so
    nothing is written beside the shared dev data (conftest); the files here are the test's own."""
    from osgeo import gdal

    before = gdal.GetConfigOption("GDAL_PAM_ENABLED")
    gdal.SetConfigOption("GDAL_PAM_ENABLED", "YES")
    yield
    gdal.SetConfigOption("GDAL_PAM_ENABLED", before)


def georeferenced_copies(folder: Path) -> dict[str, Path]:
    """A real Xiamen GeoTIFF rewritten as GDAL writes rasters whose grid and CRS lie beside them:
    PNG + world file + .aux.xml, JPEG + .jgw + .aux.xml (upper-case extension), baseline TIFF +
    .tfw + .aux.xml (its CRS only), ENVI .img + .hdr."""
    from osgeo import gdal, osr

    from tests.rs_qgis_plugin.conftest import dev_image

    folder.mkdir(parents=True, exist_ok=True)
    # A copy: GDAL may write an .aux.xml beside what it reads while PAM is on, never in dev data.
    source = folder / "source.tif"
    source.write_bytes(dev_image(0).read_bytes())
    made = {}
    for name, driver, options in (("Scene one.png", "PNG", ["WORLDFILE=YES"]),
                                  ("Scene two.JPG", "JPEG", ["WORLDFILE=YES", "QUALITY=95"]),
                                  ("Scene three.tif", "GTiff", ["PROFILE=BASELINE", "TFW=YES"]),
                                  ("Scene four.img", "ENVI", [])):
        path = folder / name
        assert gdal.Translate(str(path), str(source), format=driver, creationOptions=options)
        made[name] = path
    (folder / "Scene two.wld").rename(folder / "Scene two.jgw")
    # GDAL also put the TIFF's grid in its .aux.xml: keep only the CRS there, so the grid comes
    # from the world file alone (as with a TIFF from a scanner or a GIS that writes .tfw).
    (folder / "Scene three.tif.aux.xml").unlink()
    tiff = gdal.Open(str(made["Scene three.tif"]))
    tiff.SetSpatialRef(osr.SpatialReference(tiff_crs_wkt()))
    tiff = None  # read-only: GDAL writes the CRS to the .aux.xml on closing
    return made


def tiff_crs_wkt() -> str:
    from osgeo import osr

    srs = osr.SpatialReference()
    srs.ImportFromEPSG(3857)
    return srs.ExportToWkt()


def test_world_files_aux_xml_and_headers_travel_with_their_raster(tmp_path, pam_enabled):
    """The plan uploads every sidecar GDAL lists for the file, renamed with it; laid out on the
    cluster under those names, GDAL reads each raster at the same place in the same CRS."""
    from osgeo import gdal

    made = georeferenced_copies(tmp_path / "local")
    picks = [RasterPick(str(p)) for p in made.values()]
    planned = plan_job("p", RunParams(mode="predict", model_dir="/m"), picks)
    uploaded = {k: Path(v).name for k, v in planned.inputs.items() if k.startswith("inputs/images/")}
    assert uploaded == {
        "inputs/images/Scene_one.png": "Scene one.png",
        "inputs/images/Scene_one.wld": "Scene one.wld",
        "inputs/images/Scene_one.png.aux.xml": "Scene one.png.aux.xml",
        "inputs/images/Scene_two.jpg": "Scene two.JPG",
        "inputs/images/Scene_two.jgw": "Scene two.jgw",
        "inputs/images/Scene_two.jpg.aux.xml": "Scene two.JPG.aux.xml",
        "inputs/images/Scene_three.tif": "Scene three.tif",
        "inputs/images/Scene_three.tfw": "Scene three.tfw",
        "inputs/images/Scene_three.tif.aux.xml": "Scene three.tif.aux.xml",
        "inputs/images/Scene_four.img": "Scene four.img",
        "inputs/images/Scene_four.hdr": "Scene four.hdr",
        "inputs/images/Scene_four.img.aux.xml": "Scene four.img.aux.xml",
    }
    job = tmp_path / "job"
    for remote, local in planned.inputs.items():
        if remote.startswith("inputs/images/"):
            (job / remote).parent.mkdir(parents=True, exist_ok=True)
            (job / remote).write_bytes(Path(local).read_bytes())
    source = gdal.Open(str(made["Scene one.png"]))
    for remote in ("Scene_one.png", "Scene_two.jpg", "Scene_three.tif", "Scene_four.img"):
        there = gdal.Open(str(job / "inputs/images" / remote))
        assert there.GetGeoTransform() == pytest.approx(source.GetGeoTransform()), remote
        assert there.GetSpatialRef().GetAuthorityCode(None) == "3857", remote
    # a mask goes up with its sidecars too, named after its image
    train = plan_job("t", RunParams(mode="train"), [RasterPick(str(made["Scene one.png"]),
                                                               str(made["Scene three.tif"]))])
    assert {"inputs/train/masks/Scene_one.tif", "inputs/train/masks/Scene_one.tfw",
            "inputs/train/masks/Scene_one.tif.aux.xml"} <= set(train.inputs)


@pytest.mark.qgis
def test_a_layer_whose_crs_was_set_in_qgis_is_exported_with_that_crs(qgis_env, qgis_iface,
                                                                     results_root, tmp_path):
    """A world-file TIFF with no CRS of its own, and a GeoTIFF whose CRS the analyst overrode in
    QGIS, go up as GeoTIFF exports carrying the layer's CRS; an untouched GeoTIFF goes as it is."""
    from osgeo import gdal
    from qgis.core import QgsCoordinateReferenceSystem, QgsProject, QgsRasterLayer

    from rs_qgis_plugin.controller import JobController, LayerPick
    from tests.rs_qgis_plugin.conftest import dev_image

    local = tmp_path / "local"
    local.mkdir()
    assert gdal.Translate(str(local / "no crs.tif"), str(dev_image(0)),
                          creationOptions=["PROFILE=BASELINE", "TFW=YES"])
    (local / "no crs.tif.aux.xml").unlink(missing_ok=True)  # the grid stays, the CRS goes
    layers = {}
    for key, path in (("no_crs", local / "no crs.tif"), ("overridden", dev_image(0)),
                      ("untouched", dev_image(1))):
        layers[key] = QgsRasterLayer(str(path), key, "gdal")
        assert layers[key].isValid()
        QgsProject.instance().addMapLayer(layers[key])
    assert not layers["no_crs"].crs().isValid()
    layers["no_crs"].setCrs(QgsCoordinateReferenceSystem("EPSG:3857"))
    layers["overridden"].setCrs(QgsCoordinateReferenceSystem("EPSG:32650"))

    run = JobController(qgis_iface).prepare(
        "crs", RunParams(mode="predict", model_dir="/m"),
        [LayerPick(layers["no_crs"]), LayerPick(layers["overridden"]),
         LayerPick(layers["untouched"])])
    assert run.planned.inputs[f"inputs/images/{dev_image(1).stem}.tif"] == str(dev_image(1))
    assert sorted(e.layer_name for e in run.exports) == ["no_crs", "overridden"]
    for export in run.exports:
        assert export.run(), export.error
        written = QgsRasterLayer(str(export.target), "written", "gdal")
        crs, extent = written.crs(), written.extent()
        del written  # a layer left for the interpreter's exit crashes QGIS as it shuts down
        layer = layers[export.layer_name]
        assert crs == layer.crs() and crs.isValid()
        assert extent == layer.extent()
        assert run.planned.inputs[f"inputs/images/{export.layer_name}.tif"] == str(export.target)


# -- fine-tuning and the choice of network (issue 12) ---------------------------------------------
def test_fine_tune_trains_on_the_pairs_from_a_local_model_at_a_lower_rate():
    """The model folder goes up as inputs/model, as predict's does; the network and width are
    the model's own (none sent), and the learning rate is 1e-5 unless one is chosen."""
    picks = [RasterPick("/d/a.tif", "/g/a.tif"), RasterPick("/d/b.tif", "/g/b.tif", validate=True)]
    planned = plan_job("ft", RunParams(mode="fine_tune", model_dir="/models/m1", epochs=4,
                                       patience=2), picks)
    assert [s.stage for s in planned.spec.steps] == ["prepare", "train"]
    train = planned.spec.steps[1].params
    assert train["init_model"] == "inputs/model" and train["lr"] == 1e-5
    assert train["epochs"] == 4 and train["patience"] == 2
    assert "arch" not in train and "base_filters" not in train
    assert planned.inputs["inputs/model"] == "/models/m1" and planned.model_job is None
    assert planned.inputs["inputs/train/images/a.tif"] == "/d/a.tif"
    assert planned.spec.steps[0].params["val_rasters"] == "b.tif"
    assert planned.fetch == ("outputs/model",)
    chosen = plan_job("ft", RunParams(mode="fine_tune", model_dir="/m", learning_rate=3e-5),
                      picks[:1])
    assert chosen.spec.steps[1].params["lr"] == 3e-5


def test_fine_tune_from_a_cluster_job_links_its_model_there():
    planned = plan_job("ft", RunParams(mode="fine_tune", model_job="20260101-000000-aaaaaa"),
                       [RasterPick("/d/a.tif", "/g/a.tif")])
    # tasks.submit_planned hard-links that job's outputs/model to inputs/model on the cluster
    assert planned.model_job == "20260101-000000-aaaaaa" and "inputs/model" not in planned.inputs
    assert planned.spec.steps[1].params["init_model"] == "inputs/model"


def test_fine_tune_of_the_built_in_model_uploads_no_model_and_checks_its_networks_tiles():
    """The built-in model is an effnet_lite0_unet: tiles a multiple of 32 px."""
    picks = [RasterPick("/d/a.tif", "/g/a.tif")]
    planned = plan_job("ft", RunParams(mode="fine_tune", model_builtin=True, tile_size=96), picks)
    train = planned.spec.to_dict()["steps"][1]["params"]
    assert (train["init_model"], train["lr"], train["tile_size"]) == ("builtin", 1e-5, 96)
    assert "arch" not in train
    assert set(planned.inputs) == {"inputs/train/images/a.tif", "inputs/train/masks/a.tif"}
    assert planned.model_job is None
    with pytest.raises(SpecError, match="tile size 80 px is not a multiple of 32.*"
                                        "effnet_lite0_unet.*choose 64 or 96 px"):
        plan_job("ft", RunParams(mode="fine_tune", model_builtin=True, tile_size=80), picks)


@pytest.mark.parametrize("params, message", [
    (dict(mode="fine_tune"), "choose a model"),
    (dict(mode="fine_tune", model_dir="/m", arch="unet_bn"), "network and width of the model"),
    (dict(mode="fine_tune", model_dir="/m", base_filters=16), "network and width of the model"),
    (dict(mode="train", arch="resnet"), "unknown network 'resnet'"),
])
def test_fine_tune_and_network_choices_that_cannot_work_are_refused(params, message):
    with pytest.raises(SpecError, match=message):
        RunParams(**params)


def test_fine_tune_needs_reference_masks():
    with pytest.raises(SpecError, match="reference mask"):
        plan_job("ft", RunParams(mode="fine_tune", model_dir="/m"), [RasterPick("/d/a.tif")])


def test_the_chosen_network_reaches_train_and_the_default_is_the_clusters():
    picks = [RasterPick("/a.tif", "/m.tif")]
    default = plan_job("x", RunParams(mode="train"), picks).spec.steps[1].params
    assert "arch" not in default and "init_model" not in default
    chosen = plan_job("x", RunParams(mode="train_predict", arch="unet2019", tile_size=80),
                      picks).spec.steps[1].params
    assert chosen["arch"] == "unet2019" and chosen["tile_size"] == 80


@pytest.mark.parametrize("arch, tile, message", [
    (None, 100, "tile size 100 px is not a multiple of 32.*choose 96 or 128 px"),
    ("effnet_lite0_unet", 48, "tile size 48 px is not a multiple of 32.*choose 32 or 64 px"),
    ("unet_bn", 40, "tile size 40 px is not a multiple of 16.*choose 32 or 48 px"),
])
def test_a_tile_size_the_network_cannot_take_is_refused_before_upload(arch, tile, message):
    with pytest.raises(SpecError, match=message):
        plan_job("x", RunParams(mode="train", arch=arch, tile_size=tile),
                 [RasterPick("/a.tif", "/m.tif")])


def test_fine_tune_checks_the_tile_size_against_the_local_models_network(tmp_path):
    """The network is the model card's (a card without one is the 2019 U-Net)."""
    (tmp_path / "model.json").write_text(json.dumps({"arch": "effnet_lite0_unet"}))
    with pytest.raises(SpecError, match="tile size 80 px is not a multiple of 32"):
        plan_job("ft", RunParams(mode="fine_tune", model_dir=str(tmp_path), tile_size=80),
                 [RasterPick("/a.tif", "/m.tif")])
    (tmp_path / "model.json").write_text(json.dumps({"format": "rs-cluster-model"}))
    planned = plan_job("ft", RunParams(mode="fine_tune", model_dir=str(tmp_path), tile_size=80),
                       [RasterPick("/a.tif", "/m.tif")])
    assert planned.spec.steps[1].params["tile_size"] == 80


# -- where a job runs: Spark master and resources (issue 17) ---------------------------------------
SPARK_OVERRIDES = {"master": "spark://10.0.0.5:7077", "executor_cores": 2,
                   "executor_memory": "4g", "max_cores": 8, "queue": "analytics"}


def test_spark_overrides_reach_every_spark_stage_only_when_set():
    picks = [RasterPick("/data/a.tif", "/masks/a.tif")]
    plain = plan_job("x", RunParams(mode="evaluate", model_dir="/m"), picks).spec.to_dict()
    for step in plain["steps"]:
        assert not set(SPARK_OVERRIDES) & set(step["params"]), step  # the cluster decides
    # train, then predict, then score: prepare, train and predict take them, evaluate none
    planned = plan_job("x", RunParams(mode="train_predict", **SPARK_OVERRIDES), picks)
    steps = {s["stage"]: s["params"] for s in planned.spec.to_dict()["steps"]}
    for stage in ("prepare", "train", "predict"):
        assert {k: steps[stage][k] for k in SPARK_OVERRIDES} == SPARK_OVERRIDES, stage
    evaluated = plan_job("x", RunParams(mode="evaluate", model_dir="/m", max_cores=4), picks)
    predict, evaluate = (s.to_dict()["params"] for s in evaluated.spec.steps)
    assert predict["max_cores"] == 4 and "max_cores" not in evaluate
    # only what is set: blank text is "the cluster's setting" too
    planned = plan_job("x", RunParams(mode="predict", model_dir="/m", executor_memory="512m",
                                      master="  ", queue=""), picks)
    params = planned.spec.steps[0].params
    assert params["executor_memory"] == "512m"
    assert not {"master", "queue", "executor_cores", "max_cores"} & set(params)


@pytest.mark.parametrize("master", [
    "local", "local[4]", "local[*]", "local[2,3]", "spark://10.0.0.5:7077",
    "spark://m1.example.org:7077,m2.example.org:7077", "yarn",
    "k8s://https://k8s.example.org:6443"])
def test_spark_masters_a_job_may_name(master):
    assert RunParams(master=master, model_dir="/m").master == master


@pytest.mark.parametrize("changes, message", [
    ({"master": "spark://10.0.0.5"}, "'spark://10.0.0.5' is not one of local"),
    ({"master": "--conf x=y"}, "'--conf x=y' is not"),
    ({"master": "local[*] ; rm -rf ~"}, "'local\\[\\*\\] ; rm -rf ~' is not"),
    ({"master": "mesos://h:5050"}, "'mesos://h:5050'"),
    ({"master": "k8s://h:443"}, "'k8s://h:443'"),
    ({"executor_memory": "2 GB"}, "executor memory '2 GB' is not a size"),
    ({"executor_memory": "-2g"}, "'-2g'"),
    ({"executor_memory": "2gb"}, "'2gb'"),
    ({"executor_cores": 0}, "executor cores must be a whole number of at least 1 \\(got 0\\)"),
    ({"max_cores": -1}, "max cores must be .* \\(got -1\\)"),
    ({"queue": "-x"}, "YARN queue '-x'"),
])
def test_bad_spark_overrides_are_refused_naming_the_value(changes, message):
    with pytest.raises(SpecError, match=message):
        RunParams(model_dir="/m", **changes)


def test_the_cluster_summary_keeps_where_jobs_run_and_nothing_of_storage():
    from rs_qgis_plugin.logic import cluster_summary

    info = {"python": "3.11", "cluster": {
        "master": "spark://m:7077", "master_source": "settings file /etc/rs/cluster.toml",
        "runs_on": "Spark master spark://m:7077\n(from\u202e settings file)",
        "settings_file": "/etc/rs/cluster.toml", "resources": {"executor_memory": "4g"},
        "storage": {"url": "s3://bucket/jobs", "credentials": "settings",
                    "access_key_id": "AKIAEXAMPLE", "secret_access_key": "wJalr"}}}
    summary = cluster_summary(info)
    assert summary == {"master": "spark://m:7077",
                       "master_source": "settings file /etc/rs/cluster.toml",
                       "runs_on": "Spark master spark://m:7077 (from settings file)",
                       "settings_file": "/etc/rs/cluster.toml"}
    # an older rs-cluster, or values of the wrong type
    assert cluster_summary({"python": "3.11"}) is None
    assert cluster_summary(["cluster"]) is None
    assert cluster_summary({"cluster": {"master": 7077, "runs_on": ["x"]}}) is None
    assert cluster_summary({"cluster": {"master": "yarn", "runs_on": None}}) == {"master": "yarn"}
