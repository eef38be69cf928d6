"""One raster across many tasks: predict cut into bands of rows, each a Spark task, joined into one
output that equals, pixel for pixel, what one task writes.

Real local Spark (two slots), real GeoTIFFs (the georeferenced Austin sample, 1000 x 1000 px, and
an RGBA copy of it), a real Keras model whose 5 x 5 convolutions see each window's zero-padded
edges, so a band that left out a window, or weighted one differently, would not match.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import rasterio

from rs_cluster.predict import (BLOCK, PredictConfig, _band_windows, band_plan, band_strips,
                                run_predict)
from rs_cluster.errors import ConfigError
from rs_cluster.windows import window_starts
from tests import devdata
from tests.cluster_side.test_predict import write_card
from tests.procs import live_processes, wait_for

pytestmark = pytest.mark.spark

AUSTIN = devdata.subset("deeposlandia_georef_samples") / "images" / "inria_austin_sample.tif"


def build_context_model(folder: Path, tile_size: int = 128) -> Path:
    """Two 5 x 5 convolutions with fixed random weights: each output pixel depends on its
    neighbourhood and, near a window's edge, on the padding, so windows disagree there."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(7)
    inputs = tf.keras.Input((None, None, 3))
    first = tf.keras.layers.Conv2D(4, 5, padding="same", activation="relu")
    last = tf.keras.layers.Conv2D(1, 5, padding="same", activation="sigmoid")
    model = tf.keras.Model(inputs, last(first(inputs)))
    first.set_weights([rng.normal(0, 0.3, (5, 5, 3, 4)).astype(np.float32), np.zeros(4, np.float32)])
    last.set_weights([rng.normal(0, 0.3, (5, 5, 4, 1)).astype(np.float32),
                      np.array([-0.5], np.float32)])
    model.save(folder / "model.keras")
    return write_card(folder, "context-test", tile_size, base_filters=4)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return build_context_model(tmp_path_factory.mktemp("context-model"))


def _rgba(tmp_path: Path) -> Path:
    """The Austin sample with an alpha band: a transparent block that crosses band borders."""
    with rasterio.open(AUSTIN) as src:
        profile = {**src.profile, "count": 4}
        rgb = src.read()
    alpha = np.full(rgb.shape[1:], 255, np.uint8)
    alpha[200:700, 100:400] = 0
    path = tmp_path / "in" / "austin_rgba.tif"
    path.parent.mkdir()
    with rasterio.open(path, "w", **profile, photometric="RGB", alpha="YES") as dst:
        dst.write(np.concatenate([rgb, alpha[None]]))
    return path


def _read(path: Path) -> dict:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with rasterio.open(path) as src:
            return {"pixels": src.read(1), "valid": src.dataset_mask(), "crs": src.crs,
                    "transform": src.transform, "shape": (src.height, src.width),
                    "dtype": src.dtypes[0], "blocks": src.block_shapes,
                    "compress": src.compression, "overviews": src.overviews(1),
                    "mask_flags": src.mask_flag_enums, "tags": src.tags()}


@pytest.mark.parametrize("source", ["georeferenced RGB", "RGBA with a transparent block"])
def test_a_raster_in_bands_equals_the_raster_in_one_task_pixel_for_pixel(spark, model_dir, tmp_path,
                                                                        source):
    raster = AUSTIN if source == "georeferenced RGB" else _rgba(tmp_path)
    runs = {}
    for name, band_rows in (("whole", 0), ("bands", 256)):
        out = tmp_path / name
        runs[name] = run_predict(PredictConfig(
            model=str(model_dir), input=str(raster), output=str(out), overlap=40,
            probabilities=True, polygons=True, band_rows=band_rows), spark=spark)
        assert not runs[name].failures
        # nothing hidden is left: no part, no partial file, no progress folder
        assert sorted(p.name for p in out.iterdir()) == sorted(
            f"{raster.stem}{suffix}" for suffix in ("_mask.tif", "_prob.tif", "_buildings.gpkg")
        ) + ["predict.json"]
    whole, bands = (runs[k].outputs[0] for k in ("whole", "bands"))
    assert "bands" not in whole and bands["bands"] == 4  # 1000 rows in bands of 256
    for kind in ("mask", "probabilities"):
        one, joined = _read(Path(whole[kind])), _read(Path(bands[kind]))
        np.testing.assert_array_equal(joined.pop("pixels"), one.pop("pixels"))
        np.testing.assert_array_equal(joined.pop("valid"), one.pop("valid"))
        assert joined == one  # CRS, transform, size, blocks, compression, overviews, mask, tags
    if source != "georeferenced RGB":
        assert not _read(Path(bands["mask"]))["valid"][200:700, 100:400].any()
    for key in ("building_pixels", "valid_pixels", "windows", "width", "height", "crs",
                "input_stretch", "polygon_count"):
        assert bands[key] == whole[key], key
    assert bands["windows_computed"] > bands["windows"]  # each band's margin of strips
    recorded = json.loads((tmp_path / "bands" / "predict.json").read_text())["outputs"][0]
    assert recorded["bands"] == 4 and recorded["mask"] == bands["mask"]


def test_a_band_that_cannot_be_read_fails_its_raster_and_leaves_no_part(spark, model_dir, tmp_path):
    """A raster whose last rows are cut off: the bands above succeed, the last cannot read its
    rows, so the raster is reported failed and nothing of it stays in the output folder."""
    with rasterio.open(AUSTIN) as src:
        profile = {**src.profile, "tiled": False, "blockysize": 8, "compress": "none"}
        pixels = src.read()
    truncated = tmp_path / "in" / "cut.tif"
    truncated.parent.mkdir()
    with rasterio.open(truncated, "w", **profile) as dst:
        dst.write(pixels)
    data = truncated.read_bytes()
    truncated.write_bytes(data[: int(len(data) * 0.85)])  # strips are in row order
    out = tmp_path / "out"
    result = run_predict(PredictConfig(model=str(model_dir), input=str(truncated), output=str(out),
                                       band_rows=256), spark=spark)
    assert result.outputs == [] and len(result.failures) == 1
    error = result.failures[0]["error"]
    assert f"{truncated}: corrupt or truncated raster; cannot read rows" in error
    # a lower band's read (its margin of strips starts above it); the top bands wrote parts
    assert int(error.split("cannot read rows ")[1].split("-")[0]) > 512
    assert sorted(p.name for p in out.iterdir()) == ["predict.json"]


def test_the_bands_cover_every_window_over_their_rows_and_no_other():
    for height, tile, stride in ((1000, 128, 88), (4097, 256, 192), (300, 256, 256), (257, 256, 1)):
        starts = window_starts(height, tile, stride)
        for top, bottom in ((0, 256), (256, 512), (512, height), (100, 101)):
            bottom = min(bottom, height)
            if top >= bottom:
                continue
            strips = band_strips(starts, tile, top, bottom)
            reaching = [k for k, s in enumerate(starts) if s < bottom and s + tile > top]
            assert list(strips) == reaching
            # the strips before the first end above the band: it can start with an empty blend
            assert strips.start == 0 or starts[strips.start - 1] + tile <= top
    # strips at rows 0, 88 and 176 reach rows 0-256; each has 11 windows across
    assert _band_windows(1000, 1000, 128, 88, (0, 256)) == 3 * len(window_starts(1000, 128, 88))


def test_which_rasters_are_cut_and_how():
    # By default only large rasters, and only with slots to share them.
    assert band_plan(5000, 5000, None, slots=8) is None  # 25 Mpx
    assert band_plan(20000, 20000, None, slots=1) is None
    plan = band_plan(20000, 20000, None, slots=2)
    assert plan == [(0, 5120), (5120, 10240), (10240, 15360), (15360, 20000)]  # ~2 per slot
    assert all(top % BLOCK == 0 for top, _ in plan)
    assert band_plan(30000, 3000, None, slots=64)[0] == (0, 2048)  # never thinner than 2048
    # Asked for: any raster taller than the band; 0 never.
    assert band_plan(1000, 10, 256, slots=1) == [(0, 256), (256, 512), (512, 768), (768, 1000)]
    assert band_plan(256, 10, 256, slots=4) is None
    assert band_plan(20000, 20000, 0, slots=8) is None
    for bad in (-256, 100, True):
        with pytest.raises(ConfigError, match="band_rows must be 0 .* or a multiple of 256"):
            PredictConfig(model="m", input="i", output="o", band_rows=bad)


def _python_workers(mark: str) -> list[int]:
    """PySpark's Python workers of the run carrying ``mark``: the processes its pyspark.daemon
    forked (the daemon itself is kept, so Spark can fork new ones)."""
    daemons = {p.pid: p for p in live_processes()
               if p.environ.get("RS_TEST_RUN") == mark and "pyspark.daemon" in p.argv}
    workers = []
    for pid in daemons:
        try:
            parent = int(Path(f"/proc/{pid}/stat").read_bytes().rsplit(b")", 1)[1].split()[1])
        except OSError:
            continue
        if parent in daemons:
            workers.append(pid)
    return workers


def test_a_band_whose_task_is_killed_is_retried_and_the_output_is_still_exact(model_dir, tmp_path):
    """A Spark task retried after its Python worker was killed (SIGKILL, as the OOM killer does)
    mid-band rewrites its own part: the raster comes out once, equal to one task's output."""
    with rasterio.open(AUSTIN) as src:
        profile = {**src.profile, "height": 2000, "width": 1000}
        pixels = np.concatenate([src.read(), src.read()[:, ::-1]], axis=1)
    raster = tmp_path / "in" / "tall.tif"
    raster.parent.mkdir()
    with rasterio.open(raster, "w", **profile) as dst:
        dst.write(pixels)
    env = {**os.environ, "RS_TEST_RUN": tmp_path.name, "SPARK_LOCAL_IP": "127.0.0.1"}

    def predict(out: Path, band_rows: int, master: str) -> subprocess.Popen:
        return subprocess.Popen(
            [sys.executable, "-m", "rs_cluster", "--quiet", "predict", "--model", str(model_dir),
             "--input", str(raster), "--output", str(out), "--probabilities", "--tta",
             "--batch-size", "4", "--band-rows", str(band_rows), "--master", master],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    # local[2,4]: two slots, and a task may fail 3 times before the job does
    banded = predict(tmp_path / "bands", 256, "local[2,4]")
    progress = wait_for(lambda: next((tmp_path / "bands").glob(".predict-progress-*"), None),
                        timeout=120, what="the progress folder")
    # a band under way: its windows counted, its task not ended
    wait_for(lambda: any(p.stat().st_size and not Path(f"{p}.end").exists()
                         for p in progress.glob("*.b*.done")), timeout=120, what="a band running")
    killed = wait_for(lambda: _python_workers(tmp_path.name), timeout=30, what="Python workers")
    for pid in killed:
        os.kill(pid, signal.SIGKILL)
    output, _ = banded.communicate(timeout=600)
    assert banded.returncode == 0, output
    assert "Python worker exited unexpectedly" in output  # the kill failed a task: it was retried
    whole = predict(tmp_path / "whole", 0, "local[2]")
    output, _ = whole.communicate(timeout=600)
    assert whole.returncode == 0, output

    for suffix in ("_mask.tif", "_prob.tif"):
        one, joined = _read(tmp_path / "whole" / f"tall{suffix}"), \
            _read(tmp_path / "bands" / f"tall{suffix}")
        np.testing.assert_array_equal(joined.pop("pixels"), one.pop("pixels"))
        np.testing.assert_array_equal(joined.pop("valid"), one.pop("valid"))
        assert joined == one
    recorded = json.loads((tmp_path / "bands" / "predict.json").read_text())
    assert [o["bands"] for o in recorded["outputs"]] == [8] and recorded["failures"] == []
    assert sorted(p.name for p in (tmp_path / "bands").iterdir()) == [
        "predict.json", "tall_mask.tif", "tall_prob.tif"]


def test_a_bands_part_is_never_taken_for_an_output():
    """The plugin loads every downloaded ``*_mask.tif`` as a mask: a part left by a run that was
    killed must not end like one, and must be found as partial by the run's own clean-up."""
    from rs_cluster.predict import _part_name

    for kind in ("mask", "probabilities"):
        name = _part_name("austin", "123-abc", 3, kind)
        assert name.startswith(".") and name.endswith(".partial-123-abc")
        assert not name.endswith((".tif", "_mask.tif", "_prob.tif"))
