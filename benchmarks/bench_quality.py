"""Mask quality of each network at equal wall-clock training time, as ratios against ``unet2019``
in the same run, and what test-time augmentation (``predict --tta``) adds and costs.

Every dev subset is tiled once (128 px, split by raster 70/15/15, seed 0, as ``make train-full``).
Each network then trains on the train split with the same settings (width 16, batch 16, one
worker, BCE + Dice, constant learning rate 1e-3 so that a cut-off run is not favoured by a
finished cosine) until ``rs-cluster train --time-limit`` stops it after the epoch that reaches the
budget (epochs of 40 steps and 10 validation batches, so that the last one ends near the
budget). Its model (the epoch of the best validation IoU) predicts the test split's rasters whole,
and the masks are scored pooled over them. The default network's test rasters are then predicted
again with ``--tta``.

    .venv/bin/python benchmarks/bench_quality.py [--minutes 5] [--archs unet2019,unet_bn,effnet_lite0_unet]
        [--test-rasters N]

Runs the real ``rs-cluster`` commands on local Spark; writes build/bench-quality/. The budget is
per network; on a busy 2-core machine a few minutes buy only a few epochs, so the figures say
which network learns faster from the same data and time, not what any reaches given hours (for
that, see the built-in model's card: rs_cluster/builtin_models/*/model.json).
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
sys.path.insert(0, str(REPO / "scripts"))
from train_full import link_all, link_test_split, pooled  # noqa: E402 - the same inputs and scoring as train-full

RS_CLUSTER = [sys.executable, "-m", "rs_cluster"]
BASELINE = "unet2019"
DEFAULT = "effnet_lite0_unet"


def run(argv: list[str]) -> float:
    """Runs one rs-cluster command (its output to the log), returning its wall time in s."""
    started = time.monotonic()
    done = subprocess.run(argv, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True)
    if done.returncode != 0:
        sys.stdout.write(done.stdout[-3000:])
        raise SystemExit(f"bench_quality: {' '.join(argv[2:4])} failed")
    return time.monotonic() - started


def score(out: Path, model: Path, test: Path, name: str, *extra: str) -> tuple[dict, float]:
    """Test IoU (pooled over whole rasters) of ``model`` and the seconds its predict took."""
    masks = out / f"masks-{name}"
    seconds = run([*RS_CLUSTER, "predict", "--model", str(model), "--input", str(test / "images"),
                   "--output", str(masks), "--overwrite", *extra])
    report = out / f"report-{name}.json"
    run([*RS_CLUSTER, "evaluate", "--pred", str(masks), "--truth", str(test / "masks"),
         "--json", str(report)])
    return pooled(json.loads(report.read_text())["images"]), seconds


def _sample_test(meta: dict, count: int) -> dict:
    """``meta`` with its test split cut to ``count`` rasters, every k-th of the sorted ids (so the
    subsets stay mixed as in the whole split); all of them when ``count`` is 0 or too large."""
    ids = sorted(meta["splits"]["test"]["raster_ids"])
    if 0 < count < len(ids):
        ids = [ids[round(i * len(ids) / count)] for i in range(count)]
    return {**meta, "splits": {**meta["splits"], "test": {**meta["splits"]["test"], "raster_ids": ids}}}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "dev")
    parser.add_argument("--out", type=Path, default=REPO / "build" / "bench-quality")
    parser.add_argument("--minutes", type=float, default=5.0, help="training budget per network")
    parser.add_argument("--archs", default=f"{BASELINE},unet_bn,{DEFAULT}")
    parser.add_argument("--test-rasters", type=int, default=0,
                        help="score on this many of the test split's rasters, spread evenly over "
                             "its sorted ids (default: all); TTA predicts each 8 times")
    args = parser.parse_args()
    out = args.out.resolve()
    shutil.rmtree(out, ignore_errors=True)
    images, masks = link_all(args.data.resolve(), out / "inputs")
    run([*RS_CLUSTER, "prepare", "--images", str(images), "--masks", str(masks), "--output",
         str(out / "tiles"), "--split", "0.7,0.15,0.15"])
    meta = json.loads((out / "tiles" / "dataset.json").read_text())
    test = out / "test"
    link_test_split(_sample_test(meta, args.test_rasters), images, masks, test)

    rows = {}
    for arch in args.archs.split(","):
        model = out / f"model-{arch}"
        run([*RS_CLUSTER, "train", "--data", str(out / "tiles"), "--model-dir", str(model),
             "--arch", arch, "--base-filters", "16", "--batch-size", "16", "--lr", "1e-3",
             "--lr-schedule", "constant", "--epochs", "1000", "--patience", "0",
             "--time-limit", str(args.minutes), "--preview-every", "0",
             # short epochs (40 steps, 10 validation batches), so the budget ends near its mark
             "--steps-per-epoch", "40", "--validation-steps", "10"])
        card = json.loads((model / "model.json").read_text())
        test_score, predict_s = score(out, model, test, arch)
        rows[arch] = {"epochs": len(card["epochs"]), "train_s": card["wall_time_s"],
                      "val_iou": card["epochs"][card["best_epoch"] - 1].get("val_iou"),
                      "test_iou": test_score["iou"], "predict_s": predict_s}
        print(f"{arch:18s} {rows[arch]['epochs']:3d} epochs in {rows[arch]['train_s']:6.0f} s; "
              f"val IoU {rows[arch]['val_iou']:.3f}, test IoU {rows[arch]['test_iou']:.3f} "
              f"over {test_score['images']} rasters", flush=True)
    if DEFAULT in rows:
        tta, tta_s = score(out, out / f"model-{DEFAULT}", test, f"{DEFAULT}-tta", "--tta")
        rows[f"{DEFAULT}+tta"] = {**rows[DEFAULT], "test_iou": tta["iou"], "predict_s": tta_s}

    base = rows.get(BASELINE)
    print(f"\nbench_quality: {args.minutes:g} min of training per network, test split of "
          f"{len(list((test / 'images').iterdir()))} rasters, ratios vs {BASELINE} (same run)")
    for name, row in rows.items():
        ratio = f"{row['test_iou'] / base['test_iou']:.2f}x" if base and base["test_iou"] else "-"
        print(f"  {name:24s} test IoU {row['test_iou']:.3f} ({ratio})   val IoU "
              f"{row['val_iou']:.3f}   predict {row['predict_s']:5.0f} s")
    if f"{DEFAULT}+tta" in rows:
        plain, tta = rows[DEFAULT], rows[f"{DEFAULT}+tta"]
        print(f"  --tta: test IoU {tta['test_iou'] - plain['test_iou']:+.3f}, predict time "
              f"{tta['predict_s'] / plain['predict_s']:.1f}x")
    (out / "summary.json").write_text(json.dumps({"minutes": args.minutes, "test_rasters": sorted(
        p.name for p in (test / "images").iterdir()), "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
    sys.exit(main())
