"""prepare on real dev imagery with real Spark; tiles read back through Petastorm."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import rasterio
from rasterio.windows import Window as RioWindow

from rs_cluster.dataset import load_dataset, make_tile_reader
from rs_cluster.errors import InputError, OutputExistsError
from rs_cluster.prepare import PrepareConfig, run_prepare
from rs_cluster.windows import count_windows
from tests import devdata

pytestmark = pytest.mark.spark
REPO = Path(__file__).resolve().parents[2]


def read_split(url: str) -> list:
    with make_tile_reader(url, num_epochs=1) as reader:
        return list(reader)


def all_rows(dataset: Path) -> dict[str, list]:
    info = load_dataset(str(dataset))
    return {s: read_split(info.split_url(s)) for s in info.meta["splits"] if info.split_tiles(s)}


def test_tiles_equal_source_windows_pixel_for_pixel(small_dataset):
    info = load_dataset(str(small_dataset))
    sources = {s["raster_id"]: s for s in info.meta["sources"]}
    rows = all_rows(small_dataset)
    seen: dict[str, set] = {}
    for split, split_rows in rows.items():
        assert len(split_rows) == info.split_tiles(split)
        for row in split_rows:
            src = sources[row.raster_id]
            assert src["split"] == split
            window = RioWindow(int(row.col_off), int(row.row_off), 128, 128)
            with rasterio.open(src["image"]) as img:
                np.testing.assert_array_equal(row.image, img.read((1, 2, 3), window=window).transpose(1, 2, 0))
                assert row.crs == (img.crs.to_wkt() if img.crs else "")
                np.testing.assert_allclose(row.transform, tuple(img.window_transform(window))[:6])
            with rasterio.open(src["mask"]) as msk:
                expected = (msk.read(1, window=window) != 0).astype(np.uint8)
            np.testing.assert_array_equal(row.mask[..., 0], expected)
            seen.setdefault(row.raster_id, set()).add((int(row.row_off), int(row.col_off)))
    # Every raster is complete: all its windows, no more, no fewer; each raster in one split only.
    for rid, src in sources.items():
        assert len(seen[rid]) == count_windows(src["height"], src["width"], 128) == src["tiles"]


def test_georeferenced_tiles_keep_crs_and_map_position(small_dataset):
    rows = [r for split in all_rows(small_dataset).values() for r in split if r.raster_id.startswith("z18_")]
    assert rows, "the small set includes Xiamen GeoTIFFs"
    for row in rows:
        assert "Pseudo-Mercator" in row.crs or "3857" in row.crs
        # Xiamen is around 118.1 E, 24.5 N: about 13.15e6 m east, 2.81e6 m north in EPSG:3857.
        assert 13.1e6 < row.transform[2] < 13.2e6 and 2.7e6 < row.transform[5] < 2.9e6


def test_dataset_json_summarises_the_dataset(small_dataset, small_pairs):
    meta = json.loads((small_dataset / "dataset.json").read_text())
    assert meta["tile_size"] == 128 and meta["stride"] == 128
    ids = {s: set(v["raster_ids"]) for s, v in meta["splits"].items()}
    assert not (ids["train"] & ids["val"]) and not (ids["train"] & ids["test"]) and not (ids["val"] & ids["test"])
    assert set().union(*ids.values()) == {p.name for p in small_pairs[0].iterdir()}
    for split, rows in all_rows(small_dataset).items():
        fraction = np.mean([r.mask.mean() for r in rows])
        assert meta["splits"][split]["building_fraction"] == pytest.approx(fraction, abs=1e-5)


def test_split_is_deterministic_and_inputs_untouched(spark, small_pairs, small_dataset, tmp_path):
    images, masks = small_pairs
    before = devdata.tree_digest(images) | devdata.tree_digest(masks)
    run_prepare(PrepareConfig(images=str(images), masks=str(masks), output=str(tmp_path / "again"),
                              seed=0), spark=spark)
    assert devdata.tree_digest(images) | devdata.tree_digest(masks) == before
    again = json.loads((tmp_path / "again" / "dataset.json").read_text())["splits"]
    first = json.loads((small_dataset / "dataset.json").read_text())["splits"]
    assert {s: v["raster_ids"] for s, v in again.items()} == {s: v["raster_ids"] for s, v in first.items()}


def test_overlapping_stride_and_other_tile_size(spark, small_pairs, tmp_path):
    images, masks = small_pairs
    result = run_prepare(PrepareConfig(images=str(images), masks=str(masks), output=str(tmp_path / "ds"),
                                       tile_size=96, stride=64, split=(1.0, 0.0, 0.0)), spark=spark)
    expected = 0
    for image in images.iterdir():
        with rasterio.open(image) as src:
            expected += count_windows(src.height, src.width, 96, 64)
    assert result.tiles == {"train": expected, "val": 0, "test": 0}
    rows = read_split(load_dataset(str(tmp_path / "ds")).split_url("train"))
    assert len(rows) == expected and rows[0].image.shape == (96, 96, 3)


def test_reading_back_many_times_returns_every_row_every_time(small_dataset):
    """petastorm 0.13.1 was seen returning zero rows on some reads: 25 reads, all rows each time."""
    info = load_dataset(str(small_dataset))
    url = info.split_url("train")
    expected = {r.tile_id for r in read_split(url)}
    assert len(expected) == info.split_tiles("train") > 0
    for _ in range(25):
        with make_tile_reader(url, num_epochs=1, fields=["tile_id", "mask"]) as reader:
            assert {r.tile_id for r in reader} == expected


def test_prepare_on_a_standalone_master(standalone_cluster, small_pairs, small_dataset, tmp_path):
    images, masks = small_pairs
    out = tmp_path / "standalone"
    proc = subprocess.run(
        [sys.executable, "-m", "rs_cluster", "prepare", "--images", str(images), "--masks", str(masks),
         "--output", str(out), "--master", standalone_cluster.master_url, "--json"],
        capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["tiles"] == {
        s: v["tiles"] for s, v in json.loads((small_dataset / "dataset.json").read_text())["splits"].items()}
    ours, theirs = all_rows(out), all_rows(small_dataset)
    for split in theirs:
        a = {r.tile_id: r for r in ours[split]}
        b = {r.tile_id: r for r in theirs[split]}
        assert a.keys() == b.keys()
        for key in a:
            np.testing.assert_array_equal(a[key].image, b[key].image)
            np.testing.assert_array_equal(a[key].mask, b[key].mask)


# -- bad input -------------------------------------------------------------------------------------

def _pairs(tmp_path: Path, picks=None) -> tuple[Path, Path]:
    return devdata.link_pairs(tmp_path / "in", picks or {"xiamen_robosat_z18": devdata.first_files("xiamen_robosat_z18", 2)})


def _cfg(images: Path, masks: Path, out: Path, **kw) -> PrepareConfig:
    return PrepareConfig(images=str(images), masks=str(masks), output=str(out), split=(1.0, 0.0, 0.0), **kw)


def _write_like(src_path: Path, dest: Path, bands: list[int] | None = None, **changes) -> None:
    with rasterio.open(src_path) as src:
        data = src.read(bands or list(range(1, src.count + 1)))
        profile = {**src.profile, "count": data.shape[0], **changes}
    with rasterio.open(dest, "w", **profile) as dst:
        dst.write(data)


def test_missing_mask_is_named(tmp_path):
    images, masks = _pairs(tmp_path)
    next(masks.iterdir()).unlink()
    with pytest.raises(InputError, match=r"z18_.*\.tif: no mask named"):
        run_prepare(_cfg(images, masks, tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_cli_reports_one_line_and_exit_code(tmp_path):
    images, masks = _pairs(tmp_path)
    missing = sorted(masks.iterdir())[0]
    missing.unlink()
    proc = subprocess.run([sys.executable, "-m", "rs_cluster", "prepare", "--images", str(images),
                           "--masks", str(masks), "--output", str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines[-1].startswith("rs-cluster prepare: error: ") and missing.name in lines[-1]
    assert "Traceback" not in proc.stderr


def test_empty_input_folder(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    with pytest.raises(InputError, match="no rasters found"):
        run_prepare(_cfg(tmp_path / "images", tmp_path / "masks", tmp_path / "out"))


def test_size_mismatch_names_the_mask(spark, tmp_path):
    images, masks = _pairs(tmp_path)
    victim = sorted(masks.iterdir())[0]
    victim.unlink()
    _write_like(devdata.subset("dubai_mbrsc_hitl") / "gt" / "tile1_part_001.png", victim, driver="GTiff")
    with pytest.raises(InputError, match=rf"{victim.name}: is 797x644 px but its image {victim.name} is 256x256 px"):
        run_prepare(_cfg(images, masks, tmp_path / "out"), spark=spark)


def test_wrong_band_count(spark, tmp_path):
    images, masks = _pairs(tmp_path)
    victim = sorted(images.iterdir())[0]
    real = victim.resolve()
    victim.unlink()
    _write_like(real, victim, bands=[1])
    with pytest.raises(InputError, match=rf"{victim.name}: has 1 band\(s\); imagery must be RGB"):
        run_prepare(_cfg(images, masks, tmp_path / "out"), spark=spark)


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_corrupt_file_is_named(spark, tmp_path, damage):
    images, masks = _pairs(tmp_path)
    victim = sorted(images.iterdir())[0]
    data = victim.resolve().read_bytes()
    victim.unlink()
    victim.write_bytes(os.urandom(4096) if damage == "garbage" else data[: len(data) // 2])
    with pytest.raises(InputError, match=rf"{victim.name}: (not a readable raster|corrupt or truncated)"):
        run_prepare(_cfg(images, masks, tmp_path / "out"), spark=spark)
    assert not (tmp_path / "out").exists()


def test_skip_bad_reports_and_skips(spark, tmp_path):
    images, masks = _pairs(tmp_path, {"xiamen_robosat_z18": devdata.first_files("xiamen_robosat_z18", 3)})
    victim = sorted(images.iterdir())[0]
    victim.unlink()
    victim.write_bytes(b"not a raster at all")
    result = run_prepare(_cfg(images, masks, tmp_path / "out", skip_bad=True), spark=spark)
    assert result.tiles["train"] == 2 * 4
    assert len(result.skipped) == 1 and victim.name in result.skipped[0]["error"]
    meta = json.loads((tmp_path / "out" / "dataset.json").read_text())
    assert victim.name not in meta["splits"]["train"]["raster_ids"] and len(meta["skipped"]) == 1


def test_failure_while_writing_leaves_no_dataset(spark, tmp_path):
    """A mask whose 3 bands differ is only found while tiles are read on the executors."""
    images, masks = _pairs(tmp_path)
    victim = sorted(masks.iterdir())[0]
    real = victim.resolve()
    victim.unlink()
    with rasterio.open(real) as src:
        band = src.read(1)
        profile = {**src.profile, "count": 3}
    with rasterio.open(victim, "w", **profile) as dst:
        dst.write(np.stack([band, band, 255 - band]))
    with pytest.raises(InputError, match=rf"{victim.name}: its 3 bands differ"):
        run_prepare(_cfg(images, masks, tmp_path / "out"), spark=spark)
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if ".partial" in p.name]


def test_existing_output_refused_unless_overwrite(spark, tmp_path):
    images, masks = _pairs(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("an analyst's file")
    with pytest.raises(OutputExistsError, match="--overwrite"):
        run_prepare(_cfg(images, masks, out), spark=spark)
    assert (out / "keep.txt").read_text() == "an analyst's file"
    run_prepare(_cfg(images, masks, out, overwrite=True), spark=spark)
    assert (out / "dataset.json").exists() and not (out / "keep.txt").exists()


def test_killed_run_leaves_nothing_that_looks_complete(spark, tmp_path):
    images, masks = _pairs(tmp_path, {"dubai_mbrsc_hitl": devdata.first_files("dubai_mbrsc_hitl", 6)})
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "rs_cluster", "prepare", "--images", str(images),
                             "--masks", str(masks), "--output", str(out), "--master", "local[1]"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 120
    while not any(".partial" in p.name for p in tmp_path.iterdir()):
        assert proc.poll() is None and time.monotonic() < deadline, "prepare never started writing"
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not out.exists()
    # A new run is not confused by the debris of the killed one.
    result = run_prepare(_cfg(images, masks, out), spark=spark)
    assert (out / "dataset.json").exists() and result.tiles["train"] > 0


def test_output_given_as_url(spark, tmp_path):
    """Outputs go through pyarrow's filesystem layer, so a URL works as well as a path.

    HDFS cannot run here; a file:// URL exercises the same code path (staging, rename, dataset.json).
    """
    images, masks = _pairs(tmp_path)
    url = (tmp_path / "by-url").as_uri()
    result = run_prepare(PrepareConfig(images=str(images), masks=str(masks), output=url,
                                       split=(1.0, 0.0, 0.0)), spark=spark)
    assert result.tiles["train"] == 8
    info = load_dataset(url)
    assert len(read_split(info.split_url("train"))) == 8
