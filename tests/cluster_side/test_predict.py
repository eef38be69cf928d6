"""predict: real dev rasters, a real Keras model, a real local Spark session.

The model copies the red channel (a fixed 1x1 convolution), so the exact probability it gives each
pixel is known (red / 255): the stitched output must equal it everywhere, window borders and
raster edges included, whatever the blending does.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import rasterio

from rs_cluster.errors import ConfigError, InputError, OutputExistsError
from rs_cluster.predict import ModelCard, PredictConfig, blend_weights, run_predict
from tests import devdata

pytestmark = pytest.mark.spark

REPO = Path(__file__).resolve().parents[2]
AUSTIN = devdata.subset("deeposlandia_georef_samples") / "images" / "inria_austin_sample.tif"
XIAMEN = devdata.subset("xiamen_robosat_z18") / "images" / devdata.first_files("xiamen_robosat_z18", 1)[0]
XIAMEN_GT = devdata.subset("xiamen_robosat_z18") / "gt" / XIAMEN.name
AUSTIN_GT = devdata.subset("deeposlandia_georef_samples") / "gt" / AUSTIN.name
INRIA_PNG = devdata.subset("inria_png_austin_chicago") / "images" / "austin3_45.png"
DUBAI_PNG = devdata.subset("dubai_mbrsc_hitl") / "images" / "tile1_part_001.png"


def build_channel_model(folder: Path, tile_size: int = 128, channel: int = 0, outputs: int = 1) -> Path:
    """A model whose 'probability' is one input channel: a 1x1 Conv2D with weights fixed to pick it."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf

    folder.mkdir(parents=True, exist_ok=True)
    inputs = tf.keras.Input((None, None, 3))
    conv = tf.keras.layers.Conv2D(outputs, 1, activation="linear")
    model = tf.keras.Model(inputs, conv(inputs))
    kernel = np.zeros((1, 1, 3, outputs), np.float32)
    kernel[0, 0, channel, :] = 1.0
    conv.set_weights([kernel, np.zeros(outputs, np.float32)])
    model.save(folder / "model.keras")
    return write_card(folder, "channel-copy", tile_size, base_filters=1)


def write_card(folder: Path, architecture: str, tile_size: int, base_filters: int) -> Path:
    """The model.json of a test model saved as ``folder/model.keras`` (RGB, divided by 255)."""
    (folder / "model.json").write_text(json.dumps({
        "format": "rs-cluster-model", "format_version": 1, "model_file": "model.keras",
        "architecture": architecture, "tile_size": tile_size, "bands": ["red", "green", "blue"],
        "input_scaling": {"method": "divide", "value": 255.0}, "threshold": 0.5,
        "base_filters": base_filters, "output": "sigmoid building probability"}))
    return folder


def read(path: Path, band: int = 1) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with rasterio.open(path) as src:
            return src.read(band)


def expected_probability(path: Path) -> np.ndarray:
    return read(path, 1).astype(np.float32) / np.float32(255.0)


def link(folder: Path, *paths: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for p in paths:
        (folder / p.name).symlink_to(p)
    return folder


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return build_channel_model(tmp_path_factory.mktemp("model") / "copy-red")


@pytest.fixture(scope="module")
def mixed(spark, model_dir, tmp_path_factory):
    """One predict run over georeferenced GeoTIFFs and plain PNGs, with every optional output."""
    base = tmp_path_factory.mktemp("mixed")
    inputs = link(base / "in", AUSTIN, XIAMEN, INRIA_PNG, DUBAI_PNG)
    before = devdata.tree_digest(inputs)
    out = base / "out"
    result = run_predict(PredictConfig(model=str(model_dir), input=str(inputs), output=str(out),
                                       overlap=32, batch_size=16, probabilities=True, polygons=True),
                         spark=spark)
    return inputs, out, result, before


def test_stitched_output_equals_the_model_per_pixel(mixed):
    """1000x1000 with 128 px windows and 32 px overlap: interior borders, shifted edge windows."""
    _, out, result, _ = mixed
    assert not result.failures
    for src in (AUSTIN, XIAMEN, INRIA_PNG, DUBAI_PNG):
        expected = expected_probability(src)
        prob = read(out / f"{src.stem}_prob.tif")
        assert prob.shape == expected.shape
        np.testing.assert_allclose(prob, expected, atol=1e-6, rtol=0)
        mask = read(out / f"{src.stem}_mask.tif")
        np.testing.assert_array_equal(mask, np.where(expected > 0.5, 255, 0).astype(np.uint8))


def shift_left(batch: np.ndarray) -> np.ndarray:
    """A 'model' that sees only each pixel's left neighbour (red, zero beyond the edge)."""
    out = np.zeros(batch.shape[:3] + (1,), np.float32)
    out[:, :, 1:, 0] = batch[:, :, :-1, 0]
    return out


def test_tta_averages_the_eight_flips_and_rotations_turned_back():
    """Seen through the 8 symmetries of the square, "the left neighbour" is each of the 4
    neighbours twice: turned back and averaged, the mean of the 4 neighbours."""
    from rs_cluster.predict import d4_average

    rng = np.random.default_rng(0)
    batch = rng.random((2, 16, 16, 3), dtype=np.float32)
    got = d4_average(shift_left)(batch)[..., 0]
    red = batch[..., 0]
    neighbours = (red[:, 1:-1, :-2] + red[:, 1:-1, 2:] + red[:, :-2, 1:-1] + red[:, 2:, 1:-1]) / 4
    np.testing.assert_allclose(got[:, 1:-1, 1:-1], neighbours, rtol=1e-6)
    assert not np.allclose(shift_left(batch)[:, 1:-1, 1:-1, 0], neighbours)


def test_predict_with_tta_runs_the_averaged_model_and_says_so(spark, tmp_path):
    """Through run_predict: a real Keras model that sees the left neighbour gives, with --tta,
    the mean of the 4 neighbours inside the raster (blended windows aside), and predict.json
    records that TTA was used."""
    import tensorflow as tf

    folder = build_channel_model(tmp_path / "left")
    inputs = tf.keras.Input((None, None, 3))
    conv = tf.keras.layers.Conv2D(1, 3, padding="same", activation="linear")
    model = tf.keras.Model(inputs, conv(inputs))
    kernel = np.zeros((3, 3, 3, 1), np.float32)
    kernel[1, 0, 0, 0] = 1.0  # output(y, x) = red(y, x - 1)
    conv.set_weights([kernel, np.zeros(1, np.float32)])
    model.save(folder / "model.keras")
    inputs_dir = link(tmp_path / "in", XIAMEN)
    runs = {}
    for tta in (False, True):
        out = tmp_path / f"out-{tta}"
        run_predict(PredictConfig(model=str(folder), input=str(inputs_dir), output=str(out),
                                  probabilities=True, tta=tta), spark=spark)
        runs[tta] = read(out / f"{XIAMEN.stem}_prob.tif")
        assert json.loads((out / "predict.json").read_text())["tta"] is tta
    red = expected_probability(XIAMEN)
    inner = (slice(8, -8), slice(8, -8))
    four = (red[7:-9, 8:-8] + red[9:-7, 8:-8] + red[8:-8, 7:-9] + red[8:-8, 9:-7]) / 4
    left = red[8:-8, 7:-9]
    assert np.mean(np.abs(runs[True][inner] - four)) < 0.01
    assert np.mean(np.abs(runs[False][inner] - left)) < 0.01
    assert np.mean(np.abs(runs[True][inner] - left)) > 0.02  # the two really differ here


def test_blend_weight_is_highest_at_the_centre_and_never_zero():
    w = blend_weights(128)
    assert w.min() > 0 and w.argmax() in (63, 64) and w[0] < 0.05


def test_masks_keep_the_source_crs_and_transform(mixed):
    _, out, _, _ = mixed
    for src_path in (AUSTIN, XIAMEN):
        with rasterio.open(src_path) as src, rasterio.open(out / f"{src_path.stem}_mask.tif") as dst:
            assert dst.crs == src.crs and dst.crs is not None
            assert dst.transform == src.transform
            assert (dst.width, dst.height) == (src.width, src.height)
            assert dst.dtypes == ("uint8",)
            assert dst.block_shapes == [(256, 256)] and dst.compression.name == "deflate"
    with rasterio.open(out / f"{XIAMEN.stem}_mask.tif") as dst:
        assert dst.crs.to_epsg() == 3857


def test_outputs_have_overviews_qgis_can_draw_zoomed_out(mixed):
    """Internal overviews down to one 256 px block: a mask's keep its 0/255 values (mode), the
    probabilities' are means; a raster of one block needs none."""
    _, out, _, _ = mixed
    with rasterio.open(out / f"{AUSTIN.stem}_mask.tif") as dst:  # 1000 x 1000
        assert dst.overviews(1) == [2, 4]
        assert dst.tags(ns="rio_overview") == {"resampling": "mode"}
        assert set(np.unique(dst.read(1, out_shape=(250, 250)))) <= {0, 255}  # from the 4x one
    with rasterio.open(out / f"{DUBAI_PNG.stem}_prob.tif") as dst:  # 797 x 644
        assert dst.overviews(1) == [2, 4]
        assert dst.tags(ns="rio_overview") == {"resampling": "average"}
    with rasterio.open(out / f"{XIAMEN.stem}_mask.tif") as dst:  # 256 x 256
        assert dst.overviews(1) == []
    assert (out / f"{AUSTIN.stem}_mask.tif").read_bytes()[:4] == b"II*\x00"  # a classic TIFF


def test_an_output_too_large_for_a_classic_tiff_is_a_bigtiff(tmp_path):
    """66000 x 66000 bytes is over 4 GB uncompressed: GDAL makes it a BigTIFF from the start,
    instead of failing with "Maximum TIFF file size exceeded" as the last tiles go."""
    from rs_cluster.geotiff_out import GeoTiffSink, output_profile

    class Source:
        width = height = 66000
        crs, transform = None, None

    profile = output_profile(Source(), "uint8", georeferenced=False)
    sink = GeoTiffSink(str(tmp_path / "huge_mask.tif"), profile, None, "t")
    sink.write(np.full((256, 66000), 255, np.uint8), 0, None)
    sink.dst.close()  # the whole finish() would also add overviews of 4 GB of pixels
    assert Path(sink.tmp).read_bytes()[:4] == b"II+\x00"  # BigTIFF's magic number 43
    with rasterio.open(sink.tmp) as dst:
        assert (dst.width, dst.height) == (66000, 66000)
        assert dst.read(1, window=((0, 1), (0, 8))).tolist() == [[255] * 8]


def test_png_without_georeferencing_gets_a_pixel_grid_mask_and_a_warning(mixed):
    _, out, result, _ = mixed
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with rasterio.open(out / "austin3_45_mask.tif") as dst:
            assert dst.crs is None and dst.transform.is_identity
            assert (dst.width, dst.height) == (256, 256)
    assert any("austin3_45.png" in w and "no georeferencing" in w for w in result.warnings)


def test_summary_lists_every_output_and_inputs_are_untouched(mixed):
    inputs, out, result, before = mixed
    summary = json.loads((out / "predict.json").read_text())
    assert summary["format"] == "rs-cluster-predictions" and summary["failures"] == []
    assert sorted(Path(o["input"]).name for o in summary["outputs"]) == sorted(
        p.name for p in (AUSTIN, XIAMEN, INRIA_PNG, DUBAI_PNG))
    assert all(os.path.exists(o["mask"]) and os.path.exists(o["polygons"]) for o in summary["outputs"])
    assert devdata.tree_digest(inputs) == before
    assert not [p for p in out.iterdir() if p.name.startswith(".")], "partial files left behind"


def austin_buildings_raster(tmp_path: Path) -> tuple[Path, dict, np.ndarray]:
    """An RGB raster (in ``tmp_path/in``) whose every band is the real Austin building mask, so
    the channel-copy model's mask is the reference: (its path, its profile, the mask)."""
    with rasterio.open(AUSTIN_GT) as gt:
        profile = {**gt.profile, "count": 3, "dtype": "uint8"}
        buildings = gt.read(1)
    src = tmp_path / "in" / "austin_buildings.tif"
    src.parent.mkdir()
    with rasterio.open(src, "w", **profile) as dst:
        dst.write(np.stack([buildings] * 3))
    return src, profile, buildings


def test_polygons_land_on_the_buildings_of_the_mask(spark, model_dir, tmp_path):
    """Imagery whose red channel is the real Austin building mask, so the mask is the reference."""
    from rasterio.features import rasterize

    src, profile, buildings = austin_buildings_raster(tmp_path)
    out = tmp_path / "out"
    run_predict(PredictConfig(model=str(model_dir), input=str(src), output=str(out), polygons=True,
                              min_polygon_px=16), spark=spark)
    import fiona

    with fiona.open(out / "austin_buildings_buildings.gpkg") as layer:
        assert layer.crs_wkt and rasterio.crs.CRS.from_wkt(layer.crs_wkt) == profile["crs"]
        shapes = [(dict(f.geometry), 1) for f in layer]
        areas = [f.properties["area"] for f in layer]
    mask = read(out / "austin_buildings_mask.tif") > 0
    np.testing.assert_array_equal(mask, buildings > 0)
    burnt = rasterize(shapes, out_shape=mask.shape, transform=profile["transform"], dtype="uint8") > 0
    iou = (burnt & mask).sum() / (burnt | mask).sum()
    assert iou > 0.95, iou
    pixel_area = abs(profile["transform"].a * profile["transform"].e)
    assert abs(sum(areas) / pixel_area - mask.sum()) / mask.sum() < 0.03


def test_regularized_polygons_are_squared_sized_and_recorded(spark, model_dir, tmp_path):
    """``--polygons --regularize --min-building-m2 2`` on the Austin buildings (UTM, 0.3 m)."""
    src, profile, _ = austin_buildings_raster(tmp_path)
    out = tmp_path / "out"
    run_predict(PredictConfig(model=str(model_dir), input=str(src), output=str(out), polygons=True,
                              regularize=True, min_building_m2=2.0, min_polygon_px=1), spark=spark)
    import fiona

    with fiona.open(out / "austin_buildings_buildings.gpkg") as layer:
        assert rasterio.crs.CRS.from_wkt(layer.crs_wkt) == profile["crs"]
        props = [f.properties for f in layer]
    flags = {p["regularized"] for p in props}
    assert flags <= {0, 1} and 1 in flags
    assert min(p["area"] for p in props) >= 2.0
    summary = json.loads((out / "predict.json").read_text())
    assert summary["polygon_options"] == {"min_polygon_px": 1, "simplify_px": 1.0,
                                          "regularize": True, "min_building_m2": 2.0}
    assert summary["warnings"] == []
    with pytest.raises(ConfigError, match="polygons"):
        PredictConfig(model=str(model_dir), input=str(src), output=str(out), regularize=True)


def test_raster_smaller_than_the_tile_is_predicted_whole(spark, tmp_path):
    model = build_channel_model(tmp_path / "big-tile", tile_size=320)
    out = tmp_path / "out"
    run_predict(PredictConfig(model=str(model), input=str(XIAMEN), output=str(out), probabilities=True,
                              overlap=64), spark=spark)
    np.testing.assert_allclose(read(out / f"{XIAMEN.stem}_prob.tif"), expected_probability(XIAMEN),
                               atol=1e-6, rtol=0)


def test_rgba_uses_rgb_and_alpha_zero_is_no_data(spark, model_dir, tmp_path):
    with rasterio.open(XIAMEN) as src:
        profile = {**src.profile, "count": 4}
        rgb = src.read()
    alpha = np.full(rgb.shape[1:], 255, np.uint8)
    alpha[:40, :100] = 0
    rgba = tmp_path / "in" / "rgba.tif"
    rgba.parent.mkdir()
    with rasterio.open(rgba, "w", **profile, photometric="RGB", alpha="YES") as dst:
        dst.write(np.concatenate([rgb, alpha[None]]))
    out = tmp_path / "out"
    run_predict(PredictConfig(model=str(model_dir), input=str(rgba), output=str(out),
                              probabilities=True), spark=spark)
    with rasterio.open(out / "rgba_mask.tif") as dst:
        valid = dst.dataset_mask()
        mask = dst.read(1)
    np.testing.assert_array_equal(valid, np.where(alpha == 0, 0, 255))
    assert not mask[:40, :100].any()
    expected = rgb[0].astype(np.float32) / 255
    np.testing.assert_allclose(read(out / "rgba_prob.tif")[alpha > 0], expected[alpha > 0], atol=1e-6)


def test_bad_inputs_are_reported_and_the_others_still_predicted(spark, model_dir, tmp_path):
    inputs = tmp_path / "in"
    inputs.mkdir()
    (inputs / "good.tif").symlink_to(XIAMEN)
    (inputs / "one_band.tif").symlink_to(XIAMEN_GT)
    (inputs / "not_a_raster.tif").write_text("this is no GeoTIFF\n")
    data = XIAMEN.read_bytes()
    (inputs / "truncated.tif").write_bytes(data[: len(data) // 3])
    before = devdata.tree_digest(inputs)
    out = tmp_path / "out"
    result = run_predict(PredictConfig(model=str(model_dir), input=str(inputs), output=str(out)),
                         spark=spark)
    errors = {Path(f["input"]).name: f["error"] for f in result.failures}
    assert sorted(errors) == ["not_a_raster.tif", "one_band.tif", "truncated.tif"]
    assert "one_band.tif: has 1 band(s); the model needs 3 (red, green, blue)" in errors["one_band.tif"]
    assert "not_a_raster.tif" in errors["not_a_raster.tif"]
    assert "truncated.tif" in errors["truncated.tif"]
    assert "corrupt" in errors["truncated.tif"] or "not a readable raster" in errors["truncated.tif"]
    assert [Path(o["input"]).name for o in result.outputs] == ["good.tif"]
    assert (out / "good_mask.tif").exists() and not (out / "one_band_mask.tif").exists()
    assert not [p for p in out.iterdir() if p.name.startswith(".")]
    summary = json.loads((out / "predict.json").read_text())
    assert len(summary["failures"]) == 3
    assert devdata.tree_digest(inputs) == before

    with pytest.raises(InputError, match="one_band.tif: has 1 band"):
        run_predict(PredictConfig(model=str(model_dir), input=str(inputs / "one_band.tif"),
                                  output=str(tmp_path / "out2"), fail_fast=True), spark=spark)


def test_model_folder_without_a_valid_card_is_refused(tmp_path, model_dir):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ConfigError, match=r"model.json: not found"):
        run_predict(PredictConfig(model=str(empty), input=str(XIAMEN), output=str(tmp_path / "o")))
    bad = tmp_path / "bad"
    shutil.copytree(model_dir, bad)
    (bad / "model.json").write_text('{"format": "something-else"}')
    with pytest.raises(ConfigError, match="not an rs-cluster model card"):
        ModelCard.load(bad)
    card = json.loads((model_dir / "model.json").read_text())
    (bad / "model.json").write_text(json.dumps({**card, "bands": ["nir"]}))
    with pytest.raises(ConfigError, match="bands"):
        ModelCard.load(bad)
    with pytest.raises(ConfigError, match="overlap"):
        run_predict(PredictConfig(model=str(model_dir), input=str(XIAMEN), output=str(tmp_path / "o"),
                                  overlap=128))


def test_a_model_with_the_wrong_output_stops_the_run(spark, tmp_path):
    model = build_channel_model(tmp_path / "two-class", outputs=2)
    with pytest.raises(ConfigError, match=r"model.keras: gives \(128, 128, 2\) per window"):
        run_predict(PredictConfig(model=str(model), input=str(XIAMEN), output=str(tmp_path / "out")),
                    spark=spark)
    assert not [p for p in (tmp_path / "out").iterdir()], "nothing may be left behind"


def test_existing_outputs_are_kept_unless_overwrite(spark, model_dir, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / f"{XIAMEN.stem}_mask.tif").write_text("old")
    with pytest.raises(OutputExistsError, match="--overwrite"):
        run_predict(PredictConfig(model=str(model_dir), input=str(XIAMEN), output=str(out)), spark=spark)
    assert (out / f"{XIAMEN.stem}_mask.tif").read_text() == "old"
    run_predict(PredictConfig(model=str(model_dir), input=str(XIAMEN), output=str(out), overwrite=True),
                spark=spark)
    assert read(out / f"{XIAMEN.stem}_mask.tif").shape == (256, 256)


@pytest.mark.slow
def test_cli_predicts_then_evaluates_with_progress_events(model_dir, tmp_path):
    """The real ``rs-cluster`` command in its own process (its own local Spark), then evaluate."""
    inputs = link(tmp_path / "in", XIAMEN)
    truth = link(tmp_path / "truth", XIAMEN_GT)
    events, out = tmp_path / "events.jsonl", tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(REPO / "cluster_side")}

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "rs_cluster", "--quiet", "--events", str(events),
                               *args], capture_output=True, text=True, env=env, timeout=300)

    proc = cli("predict", "--model", str(model_dir), "--input", str(inputs), "--output", str(out),
               "--master", "local[1]", "--polygons")
    assert proc.returncode == 0, proc.stderr
    assert (out / f"{XIAMEN.stem}_mask.tif").exists() and (out / f"{XIAMEN.stem}_buildings.gpkg").exists()
    report = tmp_path / "eval.json"
    proc = cli("evaluate", "--pred", str(out), "--truth", str(truth), "--json", str(report))
    assert proc.returncode == 0, proc.stderr
    assert "pooled (all pixels)" in proc.stdout
    assert json.loads(report.read_text())["images"][0]["name"] == XIAMEN.stem
    kinds = [(e["stage"], e["event"]) for e in map(json.loads, events.read_text().splitlines())]
    assert ("predict", "start") in kinds and ("predict", "finish") in kinds
    assert ("evaluate", "metrics") in kinds

    proc = cli("predict", "--model", str(tmp_path), "--input", str(inputs), "--output", str(out))
    assert proc.returncode == 2 and "model.json: not found" in proc.stderr


@pytest.mark.slow
def test_standalone_cluster_predicts_each_raster_on_an_executor(standalone_cluster, model_dir, tmp_path):
    """A real standalone master and worker: executors run in their own working folder, so the
    relative paths given on the command line must reach them as absolute ones."""
    link(tmp_path / "in", XIAMEN, INRIA_PNG)
    env = {**os.environ, "PYTHONPATH": str(REPO / "cluster_side")}
    proc = subprocess.run(
        [sys.executable, "-m", "rs_cluster", "--quiet", "predict", "--model", str(model_dir),
         "--input", "in", "--output", "out", "--master", standalone_cluster.master_url,
         "--probabilities"], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr
    summary = json.loads((tmp_path / "out" / "predict.json").read_text())
    assert len(summary["outputs"]) == 2 and not summary["failures"]
    for src in (XIAMEN, INRIA_PNG):
        np.testing.assert_allclose(read(tmp_path / "out" / f"{src.stem}_prob.tif"),
                                   expected_probability(src), atol=1e-6, rtol=0)


# -- georeferencing in sidecars, unknown files, imagery that is not 8-bit ------------------------

def write_like(src_path: Path, dest: Path, data: np.ndarray | None = None, **changes) -> Path:
    """``dest`` with the pixels (or ``data``) and georeferencing of ``src_path``; ``changes`` go to
    the profile, where GDAL creation options (PROFILE, TFW) also go."""
    with rasterio.open(src_path) as src:
        pixels = src.read() if data is None else data
        profile = {**src.profile, "dtype": str(pixels.dtype), "count": pixels.shape[0], **changes}
    dest.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with rasterio.open(dest, "w", **profile) as dst:
            dst.write(pixels)
    return dest


def stretched(pixels: np.ndarray) -> np.ndarray:
    """The stated rule, computed here from scratch: per band, 2..98 % percentiles -> 0..255."""
    out = []
    for band in pixels.astype(np.float64):
        low, high = np.percentile(band, (2, 98))
        out.append(np.clip((band - low) * 255.0 / (high - low), 0, 255))
    return np.stack(out)


def test_sidecars_are_read_with_their_raster_and_an_unknown_file_is_refused(spark, model_dir, tmp_path):
    """A baseline TIFF whose grid is in its world file (.tfw) and its CRS in .aux.xml, as GDAL
    writes it and the plugin uploads it: one raster, and its mask lands where the image lies. A
    file of no known format beside it is refused by name, never quietly left out."""
    inputs = tmp_path / "in"
    write_like(XIAMEN, inputs / "image.tif", PROFILE="BASELINE", TFW="YES", compress=None)
    assert sorted(p.name for p in inputs.iterdir()) == ["image.tfw", "image.tif",
                                                        "image.tif.aux.xml"]
    (inputs / "scene.ecw").write_bytes(b"ECW rasters are not read on the cluster")
    out = tmp_path / "out"
    cfg = PredictConfig(model=str(model_dir), input=str(inputs), output=str(out), probabilities=True)
    with pytest.raises(InputError, match=r"scene\.ecw: not a raster format rs-cluster reads"):
        run_predict(cfg, spark=spark)

    (inputs / "scene.ecw").unlink()
    result = run_predict(cfg, spark=spark)
    assert not result.failures and [Path(o["input"]).name for o in result.outputs] == ["image.tif"]
    assert sorted(p.name for p in out.glob("*.tif")) == ["image_mask.tif", "image_prob.tif"]
    with rasterio.open(XIAMEN) as src, rasterio.open(out / "image_mask.tif") as dst:
        assert dst.crs == src.crs and dst.crs.to_epsg() == 3857
        assert dst.transform.almost_equals(src.transform)
    np.testing.assert_allclose(read(out / "image_prob.tif"), expected_probability(XIAMEN), atol=1e-6)
    assert not any("no georeferencing" in w for w in result.warnings)


def test_16_bit_and_float_imagery_is_stretched_not_divided_by_255(spark, model_dir, tmp_path):
    """The same Xiamen tile as uint16 (a linear map of the 8-bit values) and as float32 reflectance
    0..1 reaches the model as the stated stretch of its 8-bit pixels: the channel-copy model's
    probability is the stretched red band / 255, and the rule is recorded with the mask."""
    with rasterio.open(XIAMEN) as src:
        rgb = src.read()
    inputs = tmp_path / "in"
    write_like(XIAMEN, inputs / "deep.tif", (rgb.astype(np.uint16) * 200 + 1500))
    write_like(XIAMEN, inputs / "reflectance.tif", rgb.astype(np.float32) / np.float32(255))
    out = tmp_path / "out"
    result = run_predict(PredictConfig(model=str(model_dir), input=str(inputs), output=str(out),
                                       probabilities=True), spark=spark)
    assert not result.failures
    expected = stretched(rgb)[0] / 255.0
    for stem, dtype in (("deep", "uint16"), ("reflectance", "float32")):
        np.testing.assert_allclose(read(out / f"{stem}_prob.tif"), expected, atol=0.5 / 255 + 1e-6)
        note = next(w for w in result.warnings if f"{stem}.tif" in w)
        assert f"pixels are {dtype}" in note and "2-98 % percentiles" in note
        with rasterio.open(out / f"{stem}_mask.tif") as dst:
            recorded = json.loads(dst.tags()["RS_INPUT_STRETCH"])
        assert recorded["method"] == "percentile_stretch" and recorded["dtype"] == dtype
        summary = next(o for o in json.loads((out / "predict.json").read_text())["outputs"]
                       if Path(o["input"]).stem == stem)
        assert summary["input_stretch"] == recorded
    with rasterio.open(out / "deep_mask.tif") as dst:
        low = json.loads(dst.tags()["RS_INPUT_STRETCH"])["low"]
    np.testing.assert_allclose(low, np.percentile(rgb.reshape(3, -1), 2, axis=1) * 200 + 1500)
    assert f"band 1 {low[0]:.6g}.." in next(w for w in result.warnings if "deep.tif" in w)


def test_complex_imagery_is_refused_naming_the_file_and_its_type(spark, model_dir, tmp_path):
    with rasterio.open(XIAMEN) as src:
        rgb = src.read()
    radar = write_like(XIAMEN, tmp_path / "in" / "radar.tif", rgb.astype(np.complex64))
    result = run_predict(PredictConfig(model=str(model_dir), input=str(radar), output=str(tmp_path / "o")),
                         spark=spark)
    assert not result.outputs
    assert "radar.tif: pixels are complex64" in result.failures[0]["error"]
