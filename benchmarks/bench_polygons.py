"""Peak memory of tracing building polygons as the mask grows: ``polygonize_mask`` (strips of
1024 rows, each polygon written as its strip is done) against GDAL tracing the whole mask at once
(rasterio ``shapes`` on the file's band, what polygonize did before: rasterio gathers every
polygon before it gives the first).

Masks are mosaics of real reference masks (Xiamen dev tiles, 256 px, flipped at random), 5000 and
20000 px square by default. Each measurement runs in its own process; peak RSS is polled every
0.05 s with psutil. Ratios are of the same run's figures.

Run: ``.venv/bin/python benchmarks/bench_polygons.py [--sizes 5000,20000] [--keep DIR]``.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
MB = 2**20


def build_mask(path: Path, size: int, seed: int = 0) -> Path:
    """A size x size uint8 mask (0/255) of Xiamen reference tiles, written block row by row."""
    import rasterio

    from tests import devdata

    tiles = sorted((devdata.subset("xiamen_robosat_z18") / "gt").glob("*.tif"))
    with rasterio.open(tiles[0]) as first:
        side = first.width
        profile = {"driver": "GTiff", "width": size, "height": size, "count": 1, "dtype": "uint8",
                   "crs": first.crs, "transform": first.transform, "tiled": True,
                   "blockxsize": 256, "blockysize": 256, "compress": "deflate"}
    masks = []
    for t in tiles:
        with rasterio.open(t) as src:
            masks.append(np.where(src.read(1) > 0, 255, 0).astype(np.uint8))
    rng = np.random.default_rng(seed)
    with rasterio.open(path, "w", **profile) as dst:
        for top in range(0, size, side):
            h = min(side, size - top)
            row = np.empty((h, size), np.uint8)
            for left in range(0, size, side):
                w = min(side, size - left)
                m = masks[int(rng.integers(len(masks)))]
                m = m[:, ::-1] if rng.random() < 0.5 else m
                row[:, left:left + w] = m[:h, :w]
            dst.write(row, 1, window=rasterio.windows.Window(0, top, size, h))
    return path


def _strips(mask: str, out: str) -> None:
    from rs_cluster.polygons import polygonize_mask

    print(polygonize_mask(mask, out, simplify_px=1.0))


def _whole(mask: str) -> None:
    import rasterio
    from rasterio.features import shapes

    with rasterio.open(mask) as src:
        band = rasterio.band(src, 1)
        print(sum(1 for _ in shapes(band, mask=band, connectivity=4, transform=src.transform)))


def measure(argv: list[str]) -> dict:
    import psutil

    started = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    ps, peak = psutil.Process(proc.pid), 0
    while proc.poll() is None:
        try:
            peak = max(peak, ps.memory_info().rss)
        except psutil.Error:
            break
        time.sleep(0.05)
    out, err = proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"{argv[2:4]} failed:\n{err[-2000:]}")
    return {"wall": time.perf_counter() - started, "peak": peak, "count": int(out.split()[-1])}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="5000,20000")
    parser.add_argument("--keep", metavar="DIR")
    parser.add_argument("--run", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.run:
        sys.path.insert(0, str(REPO / "cluster_side"))
        (_strips if args.run[0] == "strips" else _whole)(*args.run[1:])
        return 0
    work = Path(args.keep or tempfile.mkdtemp(prefix="bench-polygons-"))
    work.mkdir(parents=True, exist_ok=True)
    sizes = [int(s) for s in args.sizes.split(",")]
    runs: dict[tuple[str, int], dict] = {}
    for size in sizes:
        mask = work / f"mask_{size}.tif"
        if not mask.exists():
            build_mask(mask, size)
        for way in ("strips", "whole"):
            extra = [str(work / f"buildings_{size}.gpkg")] if way == "strips" else []
            runs[way, size] = r = measure([sys.executable, __file__, "--run", way, str(mask), *extra])
            print(f"{way:6s} {size}^2: {r['count']} polygons, peak RSS {r['peak'] / MB:.0f} MiB, "
                  f"{r['wall']:.1f} s", flush=True)
    small, large = sizes[0], sizes[-1]
    print(f"\nbench_polygons: peak RSS {large}^2 vs {small}^2 ({(large / small) ** 2:.0f}x the "
          f"area): strips {runs['strips', large]['peak'] / runs['strips', small]['peak']:.2f}x, "
          f"whole mask at once {runs['whole', large]['peak'] / runs['whole', small]['peak']:.2f}x; "
          f"at {large}^2 strips use {runs['strips', large]['peak'] / runs['whole', large]['peak']:.2f}x "
          f"the memory of the whole-mask way (the strips also simplify and write the GeoPackage)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
