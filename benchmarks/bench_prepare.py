"""Tiles per second of `prepare` on Spark local[2] against a plain single-process loop.

Both read the same real dev rasters and write the same tile content (Petastorm's NdarrayCodec
bytes in Parquet). The single-process loop is the baseline: rasterio windows, encoded, written
with pyarrow. Spark's JVM start-up is measured and printed apart from the tiling itself.

    .venv/bin/python benchmarks/bench_prepare.py [--data DIR] [--subsets a,b,...]
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "cluster_side"))

from rs_cluster.prepare import PrepareConfig, run_prepare  # noqa: E402
from rs_cluster.rasters import inspect_pair, pair_rasters, read_tiles  # noqa: E402
from rs_cluster.spark import quiet_library_warnings, spark_session  # noqa: E402
from rs_cluster.windows import tile_windows  # noqa: E402

DEFAULT_SUBSETS = ("inria_austin_chicago", "inria_png_austin_chicago", "whu_aerial_christchurch",
                   "whu_satellite", "xiamen_robosat_z18", "kampala_oam_fair", "dubai_mbrsc_hitl",
                   "massachusetts_hffcn_patches", "xbd_pre_disaster", "deeposlandia_georef_samples")


def link_inputs(data: Path, subsets: list[str], dest: Path) -> tuple[Path, Path]:
    images, masks = dest / "images", dest / "masks"
    images.mkdir(parents=True)
    masks.mkdir(parents=True)
    for name in subsets:
        for image in sorted((data / name / "images").iterdir()):
            link = f"{name}__{image.name}"
            (images / link).symlink_to(image)
            (masks / link).symlink_to(data / name / "gt" / image.name)
    return images, masks


def encode(array: np.ndarray) -> bytes:
    # The same bytes Petastorm's NdarrayCodec writes (np.save of the array).
    buf = io.BytesIO()
    np.save(buf, array)
    return buf.getvalue()


def single_process(images: Path, masks: Path, out: Path, tile: int, stride: int) -> int:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pairs, _ = pair_rasters(images, masks)
    schema = pa.schema([("tile_id", pa.string()), ("image", pa.binary()), ("mask", pa.binary())])
    tiles = 0
    with pq.ParquetWriter(out, schema, compression="snappy") as writer:
        for pair in pairs:
            info = inspect_pair(pair)
            batch: dict[str, list] = {"tile_id": [], "image": [], "mask": []}
            for w, image, mask in read_tiles(info, tile_windows(info.height, info.width, tile, stride)):
                batch["tile_id"].append(f"{pair.raster_id}:{w.row_off}:{w.col_off}")
                batch["image"].append(encode(image))
                batch["mask"].append(encode(mask))
            writer.write_table(pa.table(batch, schema=schema))
            tiles += len(batch["tile_id"])
    return tiles


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=os.environ.get("RS_DEV_DATA", REPO.parent / "shared/data/dev"))
    parser.add_argument("--subsets", default=",".join(DEFAULT_SUBSETS))
    parser.add_argument("--tile-size", type=int, default=128)
    parser.add_argument("--strides", default="128,64",
                        help="one measurement per stride: 128 gives ~3.5k tiles, 64 ~13k")
    parser.add_argument("--master", default="local[2]")
    args = parser.parse_args()
    quiet_library_warnings()

    with tempfile.TemporaryDirectory(prefix="bench-prepare-") as tmp:
        tmp = Path(tmp)
        images, masks = link_inputs(Path(args.data), args.subsets.split(","), tmp / "in")
        n_rasters = len(list(images.iterdir()))
        t0 = time.perf_counter()
        with spark_session(args.master, "bench-prepare") as spark:
            # Start-up, reported apart: the JVM, the Python workers with their imports, and the
            # JIT's first pass, through a prepare of two rasters.
            warm_images, warm_masks = tmp / "warm" / "images", tmp / "warm" / "masks"
            warm_images.mkdir(parents=True)
            warm_masks.mkdir(parents=True)
            for link in sorted(images.iterdir())[:2]:
                (warm_images / link.name).symlink_to(link.resolve())
                (warm_masks / link.name).symlink_to((masks / link.name).resolve())
            run_prepare(PrepareConfig(images=str(warm_images), masks=str(warm_masks),
                                      output=str(tmp / "warm-out"), tile_size=args.tile_size), spark=spark)
            print(f"rasters: {n_rasters}, tile {args.tile_size} px, cores: {os.cpu_count()}, Spark "
                  f"{args.master} start-up {time.perf_counter() - t0:.1f} s (not counted below)")
            for stride in (int(x) for x in args.strides.split(",")):
                t0 = time.perf_counter()
                baseline_tiles = single_process(images, masks, tmp / f"baseline-{stride}.parquet",
                                                args.tile_size, stride)
                baseline_s = time.perf_counter() - t0
                t0 = time.perf_counter()
                result = run_prepare(PrepareConfig(images=str(images), masks=str(masks),
                                                   output=str(tmp / f"spark-{stride}"),
                                                   tile_size=args.tile_size, stride=stride), spark=spark)
                spark_s = time.perf_counter() - t0
                spark_tiles = sum(result.tiles.values())
                assert spark_tiles == baseline_tiles, (spark_tiles, baseline_tiles)
                base_rate, spark_rate = baseline_tiles / baseline_s, spark_tiles / spark_s
                print(f"stride {stride}: {spark_tiles} tiles")
                print(f"  baseline  single-process loop : {baseline_s:7.2f} s  {base_rate:8.1f} tiles/s")
                print(f"  spark     {args.master:20s}: {spark_s:7.2f} s  {spark_rate:8.1f} tiles/s")
                print(f"  ratio spark/baseline: {spark_rate / base_rate:.2f}x  (target >= 1.5x)")


if __name__ == "__main__":
    main()
