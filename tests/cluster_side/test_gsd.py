"""Resolution awareness: prepare --gsd, the model card's gsd_m, predict at the model's GSD.

Real dev rasters (georeferenced in UTM and Web Mercator, and without georeferencing), real
rasterio/GDAL resampling, a real local Spark session where a stage needs one. The model copies
the red channel (a fixed 1x1 convolution, as in test_predict), so a raster whose three bands are a
reference building mask is "predicted" as that mask: where the buildings land is then known.
"""

from __future__ import annotations

import argparse
import json
import math
import warnings
from pathlib import Path

import numpy as np
import pytest
import rasterio
from affine import Affine

from rs_cluster import jobspec, predict_cli, prepare_cli
from rs_cluster.dataset import make_tile_reader
from rs_cluster.errors import ConfigError
from rs_cluster.predict import ModelCard, PredictConfig, predict_raster, run_predict
from rs_cluster.prepare import PrepareConfig, run_prepare
from rs_cluster.rasters import ground_gsd, resampled_grid
from rs_cluster.windows import count_windows
from tests import devdata
from tests.cluster_side.test_predict import build_channel_model
from tests.cluster_side.test_prepare import _Events

GEOREF = devdata.subset("deeposlandia_georef_samples")
AUSTIN = GEOREF / "images" / "inria_austin_sample.tif"  # EPSG:26914, 0.3 m, 1000x1000
AUSTIN_GT = GEOREF / "gt" / AUSTIN.name
XIAMEN = devdata.subset("xiamen_robosat_z18") / "images" / devdata.first_files("xiamen_robosat_z18", 1)[0]
KAMPALA = devdata.subset("kampala_oam_fair") / "images"
INRIA_PNG = devdata.subset("inria_png_austin_chicago") / "images" / "austin3_45.png"  # no georef
INRIA_PNG_GT = devdata.subset("inria_png_austin_chicago") / "gt" / "austin3_45.png"  # RGB 0/255


def _open(path: Path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # NotGeoreferencedWarning for the PNGs
        return rasterio.open(path)


def _read(path: Path) -> np.ndarray:
    with _open(path) as src:
        return src.read(1)


def _gsd_of(path: Path) -> tuple[float, float] | None:
    with _open(path) as src:
        return ground_gsd(src.crs, src.transform, src.width, src.height, str(path))


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a > 0, b > 0
    return float((a & b).sum() / (a | b).sum())


# -- ground sampling distance of the dev CRSs -----------------------------------------------------

def test_ground_gsd_of_utm_web_mercator_degrees_and_no_georeferencing():
    gx, gy = _gsd_of(AUSTIN)
    assert gx == pytest.approx(0.3, abs=1e-9) and gy == pytest.approx(0.3, abs=1e-9)
    # Xiamen, XYZ z18 in EPSG:3857: 0.597 m in the CRS is 0.597 * cos(24.5 deg) on the ground.
    with _open(XIAMEN) as src:
        crs_px = src.transform.a
    gx, gy = _gsd_of(XIAMEN)
    assert crs_px == pytest.approx(0.597, abs=1e-3)
    assert gx == pytest.approx(crs_px * math.cos(math.radians(24.48)), rel=2e-3)
    assert gx == pytest.approx(0.5435, abs=1e-3) and gy == pytest.approx(gx)
    # Kampala lies on the equator: its Web Mercator metres are (nearly) ground metres.
    z20 = sorted(KAMPALA.glob("z20_*.tif"))[0]
    with _open(z20) as src:
        assert _gsd_of(z20)[0] == pytest.approx(src.transform.a * math.cos(math.radians(0.35)),
                                                rel=1e-4)
    # A CRS in degrees: 1e-5 deg at 24.5 N is 1.11 m north-south and 1.11 * cos(24.5) east-west.
    gx, gy = ground_gsd("EPSG:4326", Affine(1e-5, 0, 118.1, 0, -1e-5, 24.5 + 50e-5), 100, 100)
    assert gy == pytest.approx(1.1119, abs=1e-3)
    assert gx == pytest.approx(gy * math.cos(math.radians(24.5)), rel=1e-4)
    assert _gsd_of(INRIA_PNG) is None


def test_a_gsd_within_10_percent_is_kept_and_others_keep_the_bounds():
    t = Affine(0.3, 0, 617100, 0, -0.3, 3344400)
    assert resampled_grid(t, 1000, 1000, (0.3, 0.3), 0.325) is None
    assert resampled_grid(t, 1000, 1000, (0.3, 0.3), 0.275) is None
    assert resampled_grid(t, 1000, 1000, (0.3, 0.3), 0.335) is not None
    new, width, height = resampled_grid(t, 1000, 1000, (0.3, 0.3), 0.6)
    assert (width, height) == (500, 500)
    assert new @ (width, height) == pytest.approx(t @ (1000, 1000))
    assert (new.c, new.f) == (t.c, t.f) and new.a == pytest.approx(0.6)


# -- prepare --gsd --------------------------------------------------------------------------------

def _rows(url: Path) -> list:
    with make_tile_reader(str(url), num_epochs=1) as reader:
        return list(reader)


@pytest.fixture(scope="module")
def gsd_dataset(spark, tmp_path_factory):
    """Austin 0.3 m -> 0.6 m (500 px: 4x4 tiles of 128), Xiamen 0.54 m -> 0.6 m (232 px), and an
    Inria PNG without georeferencing; one raster per split."""
    base = tmp_path_factory.mktemp("gsd-dataset")
    images, masks = devdata.link_pairs(base / "in", {
        "deeposlandia_georef_samples": [AUSTIN.name],
        "xiamen_robosat_z18": [XIAMEN.name],
        "inria_png_austin_chicago": [INRIA_PNG.name]})
    out = base / "ds"
    events = _Events()
    result = run_prepare(PrepareConfig(images=str(images), masks=str(masks), output=str(out),
                                       gsd=0.6), reporter=events.reporter, spark=spark)
    return out, result, events


@pytest.mark.spark
def test_prepare_resamples_georeferenced_rasters_and_records_their_gsd(gsd_dataset):
    """The raster without georeferencing is tiled as it is, with a warning naming it."""
    out, result, events = gsd_dataset
    meta = json.loads((out / "dataset.json").read_text())
    assert meta["gsd_m"] == 0.6 and meta["config"]["gsd"] == 0.6
    sources = {s["raster_id"]: s for s in meta["sources"]}

    austin = sources[AUSTIN.name]
    assert austin["resampled"] is True and austin["source_gsd_m"] == pytest.approx(0.3)
    assert (austin["width"], austin["height"]) == (500, 500)
    assert (austin["source_width"], austin["source_height"]) == (1000, 1000)
    assert austin["transform"][0] == pytest.approx(0.6) and austin["tiles"] == 16
    xiamen = sources[XIAMEN.name]
    assert xiamen["resampled"] is True and xiamen["source_gsd_m"] == pytest.approx(0.5435, abs=1e-3)
    assert xiamen["width"] == round(256 * 0.5435 / 0.6) == 232
    assert xiamen["tiles"] == count_windows(232, 232, 128)
    png = sources[INRIA_PNG.name]
    assert png["resampled"] is False and png["source_gsd_m"] is None
    assert (png["width"], png["height"], png["tiles"]) == (256, 256, 4)
    assert sum(result.tiles.values()) == 16 + 4 + 4
    assert [w for w in events.warnings() if str(INRIA_PNG.name) in w
            and "no georeferencing" in w and "not resampled to 0.6 m/px" in w]

    rows = [r for split in ("train", "val", "test") for r in _rows(out / split)
            if r.raster_id == AUSTIN.name]
    assert len(rows) == 16
    truth = _read(AUSTIN_GT)
    building = 0
    for r in rows:
        assert set(np.unique(r.mask)) <= {0, 1}  # nearest: the mask stays crisp
        assert r.transform[0] == pytest.approx(0.6) and r.image.shape == (128, 128, 3)
        # Each tile pixel is one of the 2x2 source pixels under it, most often the same one.
        window = truth[2 * r.row_off:2 * (r.row_off + 128), 2 * r.col_off:2 * (r.col_off + 128)]
        blocks = window.reshape(128, 2, 128, 2).transpose(0, 2, 1, 3).reshape(128, 128, 4) > 0
        assert np.mean(np.any(blocks == r.mask.astype(bool)[..., :1], axis=2)) == 1.0
        building += int(r.mask.sum())
    # Tiles overlap at the edge (500 = 3 * 128 + 116); the fraction is still that of the source.
    assert building / (16 * 128 * 128) == pytest.approx(np.mean(truth > 0), abs=0.02)


@pytest.mark.spark
def test_train_copies_the_dataset_gsd_into_the_card_and_predict_resamples_to_it(gsd_dataset,
                                                                              tmp_path):
    """A real (tiny, one-step) U-Net trained on the 0.6 m tiles: its card says 0.6 m, and the
    0.3 m Austin raster is predicted at 0.6 m onto its own grid."""
    from rs_cluster.predict import load_predict_fn
    from rs_cluster.train import TrainConfig, run_train

    out, _, _ = gsd_dataset
    model_dir = tmp_path / "model"
    run_train(TrainConfig(data=str(out), model_dir=str(model_dir), epochs=1, batch_size=4,
                          steps_per_epoch=1, validation_steps=1, base_filters=4,
                          arch="unet2019"))
    card_json = json.loads((model_dir / "model.json").read_text())
    assert card_json["gsd_m"] == 0.6
    card = ModelCard.load(model_dir)
    assert card.gsd_m == 0.6
    outputs = {"mask": str(tmp_path / "austin_mask.tif")}
    stats = predict_raster(str(AUSTIN), card, load_predict_fn(card), outputs, overlap=32,
                           batch_size=16, threshold=card.threshold)
    assert stats.gsd["resampled"] is True and stats.gsd["gsd_m"] == pytest.approx(0.6)
    with _open(AUSTIN) as src, _open(Path(outputs["mask"])) as mask:
        assert (mask.crs, mask.transform, mask.width, mask.height) == (
            src.crs, src.transform, src.width, src.height)


def test_prepare_refuses_a_gsd_that_is_not_positive():
    with pytest.raises(ConfigError, match="gsd"):
        PrepareConfig(images="i", masks="m", output="o", gsd=0.0)


# -- predict at the model's GSD --------------------------------------------------------------------

def _card(tmp_path: Path, gsd_m: float | None, name: str = "model") -> Path:
    folder = build_channel_model(tmp_path / name)
    card = json.loads((folder / "model.json").read_text())
    card["gsd_m"] = gsd_m
    (folder / "model.json").write_text(json.dumps(card))
    return folder


def _mask_as_rgb(mask_path: Path, like: Path, dest: Path) -> Path:
    """A GeoTIFF with ``like``'s grid whose three bands are the reference mask: the channel
    model 'predicts' exactly the reference buildings on it."""
    with _open(mask_path) as m:
        mask = m.read(1)
    with _open(like) as src:
        profile = src.profile
    profile.update(driver="GTiff", count=3, dtype="uint8", tiled=True, blockxsize=256,
                   blockysize=256, compress="deflate")
    with rasterio.open(dest, "w", **profile) as dst:
        dst.write(np.stack([mask, mask, mask]))
    return dest


@pytest.fixture(scope="module")
def buildings_raster(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("buildings")
    return _mask_as_rgb(AUSTIN_GT, AUSTIN, folder / "austin_buildings.tif")


def _predict_one(path: Path, card_dir: Path, out: Path, **kw) -> tuple[dict[str, Path], object]:
    card = ModelCard.load(card_dir)
    outputs = {"mask": out / f"{path.stem}_mask.tif", "probabilities": out / f"{path.stem}_prob.tif"}
    out.mkdir(parents=True, exist_ok=True)
    stats = predict_raster(str(path), card, lambda b: b[..., :1].astype(np.float32) / 255.0,
                           {k: str(v) for k, v in outputs.items()}, overlap=32, batch_size=16,
                           threshold=0.5, **kw)
    return outputs, stats


@pytest.mark.spark
def test_predict_at_the_model_gsd_writes_the_mask_on_the_source_grid(spark, tmp_path,
                                                                     buildings_raster):
    """A 0.6 m model over 0.3 m rasters: each is predicted at 0.6 m and its mask put back on its
    own grid, where the buildings are where the unresampled prediction has them."""
    inputs = tmp_path / "in"
    inputs.mkdir()
    (inputs / AUSTIN.name).symlink_to(AUSTIN)
    (inputs / buildings_raster.name).symlink_to(buildings_raster)
    model = _card(tmp_path, 0.6)
    out, plain = tmp_path / "out", tmp_path / "plain"
    result = run_predict(PredictConfig(model=str(model), input=str(inputs), output=str(out),
                                       probabilities=True), spark=spark)
    run_predict(PredictConfig(model=str(model), input=str(inputs), output=str(plain),
                              no_resample=True), spark=spark)
    assert not result.failures
    report = json.loads((out / "predict.json").read_text())
    assert report["model_gsd_m"] == 0.6 and report["resample"] is True
    for record in report["outputs"]:
        gsd = record["gsd"]
        assert gsd["resampled"] is True and gsd["input_gsd_m"] == pytest.approx(0.3)
        assert gsd["input_gsd_from"] == "georeferencing" and gsd["gsd_m"] == pytest.approx(0.6)
        assert (gsd["resampled_width"], gsd["resampled_height"]) == (500, 500)
        assert (record["width"], record["height"]) == (1000, 1000)
        # the window count is that of the 500 px grid the model saw
        assert record["windows"] == count_windows(500, 500, 128, 96)
    plain_report = json.loads((plain / "predict.json").read_text())
    assert all(r["gsd"]["resampled"] is False and r["gsd"]["gsd_m"] == pytest.approx(0.3)
               for r in plain_report["outputs"])
    for source in (AUSTIN, buildings_raster):
        with _open(source) as src, _open(out / f"{source.stem}_mask.tif") as mask, \
                _open(out / f"{source.stem}_prob.tif") as prob:
            for dst in (mask, prob):
                assert dst.crs == src.crs and dst.transform == src.transform
                assert (dst.width, dst.height) == (src.width, src.height)
            resampled = mask.read(1)
        assert set(np.unique(resampled)) <= {0, 255}
        unresampled = _read(plain / f"{source.stem}_mask.tif")
        # The texture of raw imagery thresholded at red > 127 loses detail at 0.6 m; real
        # building outlines hardly move.
        assert _iou(resampled, unresampled) > (0.7 if source == AUSTIN else 0.97)
    truth = _read(AUSTIN_GT)
    buildings = _read(out / f"{buildings_raster.stem}_mask.tif")
    ious = {(dy, dx): _iou(np.roll(buildings, (dy, dx), (0, 1))[2:-2, 2:-2], truth[2:-2, 2:-2])
            for dy in (-1, 0, 1) for dx in (-1, 0, 1)}
    assert ious[(0, 0)] > 0.97 and ious[(0, 0)] == max(ious.values())  # not shifted by a pixel


def test_a_model_gsd_within_10_percent_leaves_the_output_byte_for_byte_as_before(tmp_path):
    plain, _ = _predict_one(AUSTIN, _card(tmp_path, None, "no-gsd"), tmp_path / "plain")
    near, stats = _predict_one(AUSTIN, _card(tmp_path, 0.32, "near"), tmp_path / "near")
    assert stats.gsd["resampled"] is False and stats.gsd["gsd_m"] == pytest.approx(0.3)
    for kind in ("mask", "probabilities"):
        assert near[kind].read_bytes() == plain[kind].read_bytes()


def test_input_gsd_resamples_a_raster_without_georeferencing(tmp_path):
    """Inria's 0.3 m PNG reference mask (3 equal bands) through a 0.6 m model."""
    model = _card(tmp_path, 0.6)
    outputs, stats = _predict_one(INRIA_PNG_GT, model, tmp_path / "out", input_gsd=0.3)
    assert stats.gsd == {"input_gsd_m": 0.3, "input_gsd_from": "input_gsd", "model_gsd_m": 0.6,
                         "resample": True, "resampled": True, "gsd_m": 0.6,
                         "resampled_width": 128, "resampled_height": 128}
    with _open(INRIA_PNG_GT) as src, _open(outputs["mask"]) as mask:
        assert mask.crs is None and mask.transform == Affine.identity()
        assert (mask.width, mask.height) == (src.width, src.height)
        assert _iou(mask.read(1), src.read(1)) > 0.9
    assert any("no georeferencing" in w for w in stats.warnings)


@pytest.mark.spark
def test_without_input_gsd_a_raster_without_georeferencing_is_predicted_as_is_with_a_warning(
        spark, tmp_path):
    inputs = tmp_path / "in"
    inputs.mkdir()
    (inputs / INRIA_PNG.name).symlink_to(INRIA_PNG)
    events = _Events()
    out = tmp_path / "out"
    result = run_predict(PredictConfig(model=str(_card(tmp_path, 0.6)), input=str(inputs),
                                       output=str(out)), reporter=events.reporter, spark=spark)
    (record,) = result.outputs
    assert record["gsd"]["resampled"] is False and record["gsd"]["input_gsd_m"] is None
    assert (record["width"], record["height"]) == (256, 256)
    unknown = [w for w in events.warnings() if "ground sampling distance is unknown" in w]
    assert len(unknown) == 1 and INRIA_PNG.name in unknown[0] and "--input-gsd" in unknown[0]
    assert unknown[0] in json.loads((out / "predict.json").read_text())["warnings"]


def test_model_card_gsd_must_be_a_positive_number_or_null(tmp_path):
    assert ModelCard.load(_card(tmp_path, None, "none")).gsd_m is None
    assert ModelCard.load(_card(tmp_path, 0.5, "half")).gsd_m == 0.5
    for bad in (0, -1.0, "0.5", True):
        with pytest.raises(ConfigError, match="gsd_m"):
            ModelCard.load(_card(tmp_path, bad, f"bad-{bad}"))
    with pytest.raises(ConfigError, match="input_gsd"):
        PredictConfig(model="m", input="i", output="o", input_gsd=0.0)


# -- the job spec carries the new options to the CLIs ----------------------------------------------

def _spec(*steps: dict) -> dict:
    return {"schema_version": jobspec.SCHEMA_VERSION, "job_id": "20260101-120000-ab12cd",
            "name": "gsd", "steps": list(steps)}


def test_job_spec_gsd_options_reach_the_prepare_and_predict_clis(tmp_path):
    """The plugin's STAGE_PARAMS mirror these (tests/contract/test_job_protocol.py)."""
    parsed = jobspec.parse_job_spec(_spec(
        {"stage": "prepare", "params": {"images": "inputs/images", "masks": "inputs/masks",
                                        "output": "outputs/ds", "gsd": 0.6}},
        {"stage": "predict", "params": {"model": "outputs/model", "input": "inputs/test",
                                        "output": "outputs/pred", "input_gsd": 0.3,
                                        "no_resample": True}}), tmp_path)
    prepare_argv, predict_argv = (jobspec.step_argv(s, tmp_path) for s in parsed.steps)
    assert "--gsd=0.6" in prepare_argv
    assert "--input-gsd=0.3" in predict_argv and "--no-resample" in predict_argv
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers()
    prepare_cli.register(sub)
    predict_cli.register(sub)
    assert parser.parse_args(prepare_argv).gsd == 0.6
    args = parser.parse_args(predict_argv)
    assert (args.input_gsd, args.no_resample) == (0.3, True)
    for stage, key, value in (("prepare", "gsd", "0.6"), ("predict", "input_gsd", "x"),
                              ("predict", "no_resample", 1)):
        with pytest.raises(ConfigError, match=key):
            jobspec.parse_job_spec(_spec({"stage": stage, "params": {key: value}}), tmp_path)
