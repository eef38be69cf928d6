"""One large mosaic across executors: ``rs-cluster predict`` with the raster cut into bands of
rows on 2 executors, against the raster in one task on 1 executor, and the memory of one
executor as the mosaic grows.

In one run, on mosaics of real dev tiles (Xiamen GeoTIFFs, EPSG:3857, built as bench_predict
builds them), with bench_predict's small U-Net (8 base filters, depth 2, random weights):

* (1) one executor with one core: ``--master local[1] --band-rows 0`` pinned to one CPU
  (``taskset -c 0``, its whole process tree), the whole raster in one task;
* (2) two executors with a core each: ``--master local[2]`` on both CPUs, the raster cut as
  predict cuts it by default (about 2 bands per Spark slot);
* (3) for context, ``--master local[2] --band-rows 0``: one task on two cores (TensorFlow's own
  threads), what predict did before it cut rasters;
* peak RSS of the largest process (a Python worker running TensorFlow: in local mode each
  executor slot is one) with ``--band-rows 2048`` on the small and the large mosaic, both cut.

Every run is the real command in its own process (JVM, Spark and TensorFlow start included in
its wall time; the per-task seconds are in predict.json). Ratios are of the same run's figures.

Run: ``.venv/bin/python benchmarks/bench_mosaic.py [--size 20000] [--small 5000] [--keep DIR]``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
from bench_predict import BATCH, OVERLAP, build_model, build_mosaic, measure  # noqa: E402

GB = 2**30


def predict(raster: Path, model: Path, out: Path, master: str, band_rows: int | None,
            cores: str | None = None) -> dict:
    """The real command; with ``cores`` (e.g. "0"), pinned to those CPUs with its whole process
    tree (taskset), as one executor with that many cores would be."""
    env = {**os.environ, "PYTHONPATH": str(REPO / "cluster_side"),
           "SPARK_LOCAL_IP": os.environ.get("SPARK_LOCAL_IP", "127.0.0.1")}
    argv = [*(["taskset", "-c", cores] if cores else []), sys.executable, "-m", "rs_cluster", "--quiet", "predict", "--model", str(model),
            "--input", str(raster), "--output", str(out), "--overlap", str(OVERLAP),
            "--batch-size", str(BATCH), "--overwrite", "--master", master]
    if band_rows is not None:
        argv += ["--band-rows", str(band_rows)]
    m = measure(argv, env)
    m["summary"] = json.loads((out / "predict.json").read_text())["outputs"][0]
    return m


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=20000, help="side of the large mosaic, px")
    parser.add_argument("--small", type=int, default=5000, help="side of the small mosaic, px")
    parser.add_argument("--keep", metavar="DIR", help="work in DIR and keep it")
    args = parser.parse_args()
    work = Path(args.keep or tempfile.mkdtemp(prefix="bench-mosaic-"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"# bench_mosaic: work dir {work}; {os.cpu_count()} CPUs; small U-Net (8 filters, "
          f"depth 2), overlap {OVERLAP}, batch {BATCH}", flush=True)
    model = build_model(work / "model")
    rasters = {}
    for size in (args.small, args.size):
        rasters[size] = work / f"mosaic_{size}.tif"
        if not rasters[size].exists():
            t = time.perf_counter()
            build_mosaic(rasters[size], size)
            print(f"built {rasters[size].name} in {time.perf_counter() - t:.1f} s", flush=True)

    large, mpx = rasters[args.size], args.size ** 2 / 1e6

    def show(name: str, r: dict) -> None:
        s = r["summary"]
        px = s["width"] * s["height"] / 1e6
        print(f"{name}: wall {r['wall']:.1f} s ({px / r['wall']:.2f} Mpx/s), bands "
              f"{s.get('bands', 1)}, windows computed {s.get('windows_computed', s['windows'])} "
              f"of {s['windows']}; peak RSS largest process {r['peak_one'] / GB:.2f} GiB, "
              f"tree {r['peak_tree'] / GB:.2f} GiB", flush=True)

    one = predict(large, model, work / "one", "local[1]", 0, cores="0")
    show(f"(1) 1 executor (1 core), one task, {args.size}^2", one)
    two = predict(large, model, work / "two", "local[2]", None)
    show(f"(2) 2 executors (1 core each), bands, {args.size}^2", two)
    old = predict(large, model, work / "old", "local[2]", 0)
    show(f"(3) 2 cores, one task, {args.size}^2", old)
    mem = {}
    for size in (args.small, args.size):
        mem[size] = predict(rasters[size], model, work / f"mem_{size}", "local[2]", 2048)
        show(f"memory run, --band-rows 2048, {size}^2", mem[size])

    print()
    print(f"bench_mosaic {args.size}x{args.size} ({mpx:.0f} Mpx): 2 executors with bands vs 1 "
          f"executor: {one['wall'] / two['wall']:.2f}x (target >= 1.6x); vs one task on 2 cores: "
          f"{old['wall'] / two['wall']:.2f}x")
    small, big = mem[args.small], mem[args.size]
    print(f"peak RSS of the largest process, {args.size}^2 vs {args.small}^2 (both in bands of "
          f"2048 rows): {big['peak_one'] / small['peak_one']:.2f}x ({small['peak_one'] / GB:.2f} -> "
          f"{big['peak_one'] / GB:.2f} GiB; target <= 1.2x; area {(args.size / args.small) ** 2:.0f}x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
