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


def old_dataset_is_going(out: Path, padding: Path, files: int) -> bool:
    try:
        return not (out / "dataset.json").exists() or len(os.listdir(padding)) < files
    except FileNotFoundError:
        return True


def test_overwrite_killed_while_replacing_leaves_a_complete_dataset(spark, tmp_path):
    """The run is SIGKILLed (a cancel, a lost node) the moment the old dataset starts to go: the
    output still holds a whole dataset. Many small files in the old one make its removal last
    long enough for the kill to land in it."""
    images, masks = _pairs(tmp_path)
    out = tmp_path / "out"
    run_prepare(_cfg(images, masks, out), spark=spark)
    padding, files = out / "padding", 20000
    padding.mkdir()
    for i in range(files):
        (padding / str(i)).touch()
    proc = subprocess.Popen([sys.executable, "-m", "rs_cluster", "prepare", "--images", str(images),
                             "--masks", str(masks), "--output", str(out), "--split", "1,0,0",
                             "--master", "local[1]", "--overwrite"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 120
    while not old_dataset_is_going(out, padding, files):
        assert proc.poll() is None and time.monotonic() < deadline, "prepare never replaced the dataset"
        time.sleep(0.005)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert (out / "dataset.json").exists()
    assert {s: len(rows) for s, rows in all_rows(out).items()} == {"train": 8}


def test_overwrite_that_fails_midway_keeps_the_old_dataset(spark, tmp_path, monkeypatch):
    images, masks = _pairs(tmp_path)
    out = tmp_path / "out"
    run_prepare(_cfg(images, masks, out), spark=spark)
    before = devdata.tree_digest(out)
    victim = sorted(masks.iterdir())[0]  # a mask found bad only while tiles are written
    real = victim.resolve()
    victim.unlink()
    with rasterio.open(real) as src:
        band, profile = src.read(1), {**src.profile, "count": 3}
    with rasterio.open(victim, "w", **profile) as dst:
        dst.write(np.stack([band, band, 255 - band]))
    with pytest.raises(InputError, match="its 3 bands differ"):
        run_prepare(_cfg(images, masks, out, overwrite=True), spark=spark)
    assert devdata.tree_digest(out) == before

    victim.unlink()
    victim.symlink_to(real)
    synced: list[str] = []
    real_fsync = os.fsync

    def recording(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", recording)
    run_prepare(_cfg(images, masks, out, overwrite=True, tile_size=64), spark=spark)
    assert json.loads((out / "dataset.json").read_text())["tile_size"] == 64
    assert str(tmp_path) in synced  # the folder holding the renamed dataset is flushed
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in", "out"]


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


# -- sidecars, unknown files, imagery that is not 8-bit --------------------------------------------

class _Events:
    """A reporter that keeps the events, as the job's events.jsonl would."""

    def __init__(self) -> None:
        from rs_cluster.progress import Reporter

        self.events: list[dict] = []
        outer = self

        class Keep(Reporter):
            def emit(self, event: dict) -> None:
                outer.events.append(event)

        self.reporter = Keep()

    def warnings(self) -> list[str]:
        return [e["message"] for e in self.events if e["event"] == "warning"]


def test_sidecars_are_no_rasters_and_an_unknown_file_is_refused_by_name(spark, tmp_path):
    """image.tif + image.tfw + image.tif.aux.xml (grid and CRS beside it) is one raster, in the
    images folder and in the masks folder; a file of no known format is named, never skipped."""
    images, masks = _pairs(tmp_path, {"xiamen_robosat_z18": devdata.first_files("xiamen_robosat_z18", 1)})
    for folder in (images, masks):
        real = next(folder.iterdir()).resolve()
        _write_like(real, folder / "image.tif", PROFILE="BASELINE", TFW="YES", compress=None)
        assert {"image.tfw", "image.tif.aux.xml"} <= {p.name for p in folder.iterdir()}
    result = run_prepare(_cfg(images, masks, tmp_path / "out"), spark=spark)
    assert result.rasters["train"] == 2 and result.tiles["train"] == 2 * 4
    with rasterio.open(images / "image.tif") as img:
        assert img.crs.to_epsg() == 3857  # from the sidecars, not from the TIFF
        expected_transform = list(img.transform)[:6]
    meta = json.loads((tmp_path / "out" / "dataset.json").read_text())
    source = next(s for s in meta["sources"] if s["raster_id"] == "image.tif")
    np.testing.assert_allclose(source["transform"], expected_transform)

    (images / "scene.bil").write_bytes(b"ENVI data, header elsewhere")
    with pytest.raises(InputError, match=r"scene\.bil: not a raster format rs-cluster reads"):
        run_prepare(_cfg(images, masks, tmp_path / "out2"), spark=spark)
    assert not (tmp_path / "out2").exists()


def test_16_bit_and_float_imagery_is_tiled_by_the_stated_stretch(spark, tmp_path):
    """The uint16 (x * 200 + 1500) and float32 (x / 255) versions of a real 8-bit tile give the
    same tiles: the 8-bit pixels stretched per band from their 2-98 % percentiles to 0..255. The
    rule is said in a warning naming the file, its type and the percentiles, and kept in
    dataset.json."""
    name = devdata.first_files("xiamen_robosat_z18", 1)[0]
    source = devdata.subset("xiamen_robosat_z18") / "images" / name
    truth = devdata.subset("xiamen_robosat_z18") / "gt" / name
    with rasterio.open(source) as src:
        rgb = src.read()
    images, masks = tmp_path / "images", tmp_path / "masks"
    images.mkdir()
    masks.mkdir()
    _write_like(source, images / "deep.tif", dtype="uint16")
    with rasterio.open(images / "deep.tif", "r+") as dst:
        dst.write(rgb.astype(np.uint16) * 200 + 1500)
    _write_like(source, images / "reflectance.tif", dtype="float32")
    with rasterio.open(images / "reflectance.tif", "r+") as dst:
        dst.write(rgb.astype(np.float32) / np.float32(255))
    for stem in ("deep", "reflectance"):
        (masks / f"{stem}.tif").symlink_to(truth)
    events = _Events()
    run_prepare(_cfg(images, masks, tmp_path / "out"), spark=spark, reporter=events.reporter)

    low, high = np.percentile(rgb.reshape(3, -1).astype(np.float64), (2, 98), axis=1)
    expected = np.clip((rgb - low[:, None, None]) * 255 / (high - low)[:, None, None], 0, 255)
    rows = [r for split in all_rows(tmp_path / "out").values() for r in split]
    assert len(rows) == 2 * 4
    for row in rows:
        assert row.image.dtype == np.uint8
        window = expected[:, row.row_off:row.row_off + 128, row.col_off:row.col_off + 128]
        np.testing.assert_allclose(row.image.transpose(2, 0, 1), window, atol=0.5 + 1e-4)
    meta = json.loads((tmp_path / "out" / "dataset.json").read_text())
    stretch = {s["raster_id"]: s["input_stretch"] for s in meta["sources"]}
    assert stretch["deep.tif"]["method"] == "percentile_stretch"
    np.testing.assert_allclose(stretch["deep.tif"]["low"], low * 200 + 1500)
    np.testing.assert_allclose(stretch["reflectance.tif"]["high"], high / 255, rtol=1e-6)
    notes = events.warnings()
    deep = next(n for n in notes if "deep.tif" in n)
    assert "pixels are uint16" in deep and f"band 1 {low[0] * 200 + 1500:.6g}.." in deep
    assert any("reflectance.tif" in n and "pixels are float32" in n for n in notes)


def test_chosen_validation_rasters_form_the_validation_split(spark, tmp_path):
    names = devdata.first_files("xiamen_robosat_z18", 3)
    images, masks = _pairs(tmp_path, {"xiamen_robosat_z18": names})
    result = run_prepare(_cfg(images, masks, tmp_path / "out", val_rasters=(names[1],)),
                         spark=spark)
    assert result.rasters == {"train": 2, "val": 1, "test": 0}
    meta = load_dataset(str(tmp_path / "out")).meta
    assert meta["splits"]["val"]["raster_ids"] == [names[1]]
    with pytest.raises(InputError, match="validation rasters nope.tif are not among"):
        run_prepare(_cfg(images, masks, tmp_path / "bad", val_rasters=("nope.tif",)), spark=spark)
