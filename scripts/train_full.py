"""`make train-full`: train on all the dev data until early stopping; report val and test IoU.

What the model reaches when given time, as opposed to the few epochs of `make demo`. Every subset of
the dev set is tiled (split by raster, 70/15/15, seed 0), the U-Net trains until the validation
loss has not improved for PATIENCE epochs (or MAX_EPOCHS), then the rasters of the test split are
predicted whole (sliding windows) and scored against their reference masks. The Xiamen masks miss
some buildings (see the data README), so the test figures are also given without Xiamen.

Runs the real `rs-cluster` commands on local Spark; results in build/train-full/.
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
INCOMPLETE_LABELS = "xiamen_robosat_z18"


def step(title: str, argv: list[str]) -> None:
    print(f"\n== {title}\n   $ {' '.join(argv)}", flush=True)
    started = time.monotonic()
    if subprocess.run(argv, cwd=REPO).returncode != 0:
        raise SystemExit(f"train-full: step '{title}' failed; see the messages above")
    print(f"   ({time.monotonic() - started:.0f} s)", flush=True)


def link_all(data: Path, out: Path) -> tuple[Path, Path]:
    """Every image/mask pair of every subset, as ``<subset>__<name>`` links in two folders."""
    images, masks = out / "images", out / "masks"
    images.mkdir(parents=True)
    masks.mkdir(parents=True)
    for subset in sorted(p for p in data.iterdir() if (p / "images").is_dir()):
        for image in sorted((subset / "images").iterdir()):
            if (subset / "gt" / image.name).is_file():
                (images / f"{subset.name}__{image.name}").symlink_to(image)
                (masks / f"{subset.name}__{image.name}").symlink_to(subset / "gt" / image.name)
    return images, masks


def link_test_split(meta: dict, images: Path, masks: Path, test: Path) -> None:
    """Links the rasters of the dataset's test split (``meta``: its dataset.json) and their masks
    into ``test/images`` and ``test/masks``, to be predicted whole and scored."""
    for kind, source in (("images", images), ("masks", masks)):
        (test / kind).mkdir(parents=True)
        for raster_id in meta["splits"]["test"]["raster_ids"]:
            (test / kind / raster_id).symlink_to((source / raster_id).resolve())


def pooled(rows: list[dict]) -> dict[str, float]:
    tp, fp, fn = (sum(r[k] for r in rows) for k in ("tp", "fp", "fn"))
    return {"iou": tp / (tp + fp + fn) if tp + fp + fn else float("nan"),
            "f1": 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else float("nan"), "images": len(rows)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "dev")
    parser.add_argument("--out", type=Path, default=REPO / "build" / "train-full")
    parser.add_argument("--max-epochs", type=int, default=100)
    parser.add_argument("--patience", type=int, default=5)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--base-filters", type=int, default=16)
    parser.add_argument("--stride", type=int, default=128)
    parser.add_argument("--tile-size", type=int, default=128)
    parser.add_argument("--arch", help="the network (default: rs-cluster train's)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", default="1e-3")
    parser.add_argument("--time-limit", metavar="MIN", help="rs-cluster train --time-limit")
    args = parser.parse_args()
    data, out = args.data.resolve(), args.out.resolve()
    shutil.rmtree(out, ignore_errors=True)
    images, masks = link_all(data, out / "inputs")
    print(f"train-full: {sum(1 for _ in images.iterdir())} image/mask pairs from {data}")
    started = time.monotonic()

    step("prepare: every dev subset, split by raster 70/15/15",
         [*RS_CLUSTER, "prepare", "--images", str(images), "--masks", str(masks),
          "--output", str(out / "tiles"), "--stride", str(args.stride), "--tile-size", str(args.tile_size),
          "--split", "0.7,0.15,0.15"])
    step(f"train: until val loss stops improving ({args.patience} epochs) or {args.max_epochs} epochs",
         [*RS_CLUSTER, "train", "--data", str(out / "tiles"), "--model-dir", str(out / "model"),
          "--epochs", str(args.max_epochs), "--patience", str(args.patience),
          "--num-proc", str(args.workers), "--base-filters", str(args.base_filters),
          "--batch-size", str(args.batch_size), "--lr", args.lr, "--loss", "bce_dice",
          *(["--arch", args.arch] if args.arch else []),
          *(["--time-limit", args.time_limit] if args.time_limit else [])])

    meta = json.loads((out / "tiles" / "dataset.json").read_text())
    test = out / "test"
    link_test_split(meta, images, masks, test)
    step("predict: the test split's rasters, whole",
         [*RS_CLUSTER, "predict", "--model", str(out / "model"), "--input", str(test / "images"),
          "--output", str(out / "test-masks")])
    step("evaluate: against their reference masks",
         [*RS_CLUSTER, "evaluate", "--pred", str(out / "test-masks"), "--truth", str(test / "masks"),
          "--json", str(out / "test-report.json")])

    card = json.loads((out / "model" / "model.json").read_text())
    best = card["epochs"][card["best_epoch"] - 1]
    rows = json.loads((out / "test-report.json").read_text())["images"]
    clean = [r for r in rows if not r["name"].startswith(INCOMPLETE_LABELS)]
    summary = {
        "epochs_run": len(card["epochs"]), "best_epoch": card["best_epoch"],
        "stopped_early": card["training"]["stopped_early"], "val_iou": best.get("val_iou"),
        "val_loss": best.get("val_loss"), "test": pooled(rows), "test_without_xiamen": pooled(clean),
        "wall_time_s": round(time.monotonic() - started, 1),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"\ntrain-full: {summary['epochs_run']} epoch(s), best {summary['best_epoch']}"
          f"{' (stopped early)' if summary['stopped_early'] else ''}, "
          f"{summary['wall_time_s'] / 60:.0f} min")
    print(f"  validation IoU (tiles, best epoch): {summary['val_iou']:.3f}")
    print(f"  test IoU (whole rasters, pooled):   {summary['test']['iou']:.3f} "
          f"over {summary['test']['images']} rasters")
    print(f"  test IoU without Xiamen:            {summary['test_without_xiamen']['iou']:.3f} "
          f"over {summary['test_without_xiamen']['images']} rasters")
    print(f"  written: {out / 'summary.json'}")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
    sys.exit(main())
