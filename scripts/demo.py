"""`make demo`: the whole pipeline on real dev imagery, ending in a picture of the mask on the map.

prepare (Spark + Petastorm) -> train (U-Net, Horovod workers as Spark tasks) -> predict on a
georeferenced raster held out from training -> evaluate against its reference mask -> render the
mask over the imagery with QGIS. Everything lands in build/demo/. Each step is the real
`rs-cluster` command, so what runs here is what runs on a cluster.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RS_CLUSTER = [sys.executable, "-m", "rs_cluster"]
# Training subsets: aerial imagery at about 0.3 m, as the held-out raster (see the data README).
TRAIN_SUBSETS = ("inria_austin_chicago", "inria_png_austin_chicago", "whu_aerial_christchurch")
# Held out from training: an Inria Austin crop that kept its CRS (EPSG:26914), 1000x1000 px.
HOLDOUT = ("deeposlandia_georef_samples", "inria_austin_sample.tif")


def step(title: str, argv: list[str]) -> None:
    print(f"\n== {title}\n   $ {' '.join(argv)}", flush=True)
    started = time.monotonic()
    proc = subprocess.run(argv, cwd=REPO)
    if proc.returncode != 0:
        sys.exit(f"demo: step '{title}' failed (exit {proc.returncode}); see the messages above")
    print(f"   ({time.monotonic() - started:.0f} s)", flush=True)


def link_inputs(data: Path, out: Path) -> tuple[Path, Path]:
    images, masks = out / "images", out / "masks"
    shutil.rmtree(out, ignore_errors=True)
    images.mkdir(parents=True)
    masks.mkdir(parents=True)
    for subset in TRAIN_SUBSETS:
        for image in sorted((data / subset / "images").iterdir()):
            (images / f"{subset}__{image.name}").symlink_to(image)
            (masks / f"{subset}__{image.name}").symlink_to(data / subset / "gt" / image.name)
    return images, masks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "dev")
    parser.add_argument("--out", type=Path, default=REPO / "build" / "demo")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--base-filters", type=int, default=16)
    parser.add_argument("--qgis-python", default=str(REPO / ".venv-qgis" / "bin" / "python"))
    args = parser.parse_args()
    data, out = args.data.resolve(), args.out.resolve()
    if not (data / TRAIN_SUBSETS[0]).is_dir():
        sys.exit(f"demo: {data} does not hold the dev imagery (expected {TRAIN_SUBSETS[0]}/); "
                 "pass DATA=/path/to/dev")
    out.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()

    images, masks = link_inputs(data, out / "inputs")
    holdout_dir = out / "holdout"
    shutil.rmtree(holdout_dir, ignore_errors=True)
    (holdout_dir / "images").mkdir(parents=True)
    (holdout_dir / "masks").mkdir(parents=True)
    subset, name = HOLDOUT
    (holdout_dir / "images" / name).symlink_to(data / subset / "images" / name)
    (holdout_dir / "masks" / name).symlink_to(data / subset / "gt" / name)

    step("prepare: tiles with Spark, written through Petastorm",
         [*RS_CLUSTER, "prepare", "--images", str(images), "--masks", str(masks),
          "--output", str(out / "tiles"), "--stride", "64", "--split", "0.8,0.2,0.0", "--overwrite"])
    step(f"train: U-Net, {args.workers} Horovod worker(s) on Spark, {args.epochs} epoch(s)",
         [*RS_CLUSTER, "train", "--data", str(out / "tiles"), "--model-dir", str(out / "model"),
          "--epochs", str(args.epochs), "--num-proc", str(args.workers),
          "--base-filters", str(args.base_filters), "--batch-size", "16", "--lr", "1e-3", "--dice",
          "--patience", "0", "--overwrite"])
    step("predict: sliding windows over the held-out georeferenced raster",
         [*RS_CLUSTER, "predict", "--model", str(out / "model"), "--input", str(holdout_dir / "images"),
          "--output", str(out / "masks"), "--polygons", "--overwrite"])
    step("evaluate: against the reference mask",
         [*RS_CLUSTER, "evaluate", "--pred", str(out / "masks"), "--truth", str(holdout_dir / "masks"),
          "--json", str(out / "report.json")])

    mask = next(p for p in sorted((out / "masks").glob("*.tif")) if "prob" not in p.name)
    report = json.loads((out / "report.json").read_text())
    pooled = report.get("pooled", report)
    title = (f"predicted buildings, {args.epochs} epoch(s) - IoU {pooled['iou']:.3f}, "
             f"F1 {pooled['f1']:.3f}")
    step("render: the mask over the imagery, drawn by QGIS",
         [args.qgis_python, str(REPO / "scripts" / "render_overlay.py"),
          str(holdout_dir / "images" / name), str(mask), str(out / "overlay.png"), "--title", title])

    print(f"\ndemo finished in {time.monotonic() - started:.0f} s; results in {out}:")
    for path in sorted(out.rglob("*")):
        if path.is_file() and "tiles" not in path.parts and "inputs" not in path.parts \
                and "holdout" not in path.parts:
            print(f"  {path.relative_to(out)}")
    print(f"\nbuilding IoU on the held-out raster: {pooled['iou']:.3f} "
          f"(precision {pooled['precision']:.3f}, recall {pooled['recall']:.3f})")
    print(f"picture: {out / 'overlay.png'}")


if __name__ == "__main__":
    os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
    main()
