"""Copies a model trained by ``scripts/train_full.py`` into the cluster package as a built-in model.

    .venv/bin/python scripts/package_builtin.py build/builtin-v1 [--name buildings-v1]

Takes the model folder's ``model.json``, ``model.keras`` and ``metrics.jsonl`` (not its TensorBoard
logs) into ``cluster_side/rs_cluster/builtin_models/NAME/``, and adds a ``builtin`` section to the
card: what it was trained on, its ground resolution, epochs, validation and test IoU (from
train-full's ``summary.json``), the rasters of each split (so tests and pictures use rasters it was
not trained on), and the terms of the training data. Local paths of the training run are dropped.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TARGET = REPO / "cluster_side" / "rs_cluster" / "builtin_models"
FILES = ("model.keras", "metrics.jsonl")
TERMS = ("Trained on the project's dev set (shared/data/dev, 217 image/mask pairs from 10 public "
         "sources; see its README). Their terms differ: Inria's imagery and footprints are public "
         "domain, WHU and Massachusetts are for academic/research use, xBD is CC BY-NC-SA 4.0, and "
         "the Xiamen and Kampala licences are unconfirmed. Treat this model as a research and "
         "evaluation starter; check the sources' terms before commercial use.")
GSD = ("mixed, not resampled: 0.075-0.15 m (Kampala drone/aerial), 0.3 m (Inria, WHU aerial), "
       "about 0.5 m (Xiamen, xBD, Dubai), 1 m (Massachusetts), 0.3-2.5 m (WHU satellite)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, help="train-full's output folder (model/, summary.json)")
    parser.add_argument("--name", default="buildings-v1")
    args = parser.parse_args()
    model, summary = args.run / "model", json.loads((args.run / "summary.json").read_text())
    card = json.loads((model / "model.json").read_text())
    dataset = json.loads((args.run / "tiles" / "dataset.json").read_text())
    best = card["epochs"][card["best_epoch"] - 1]
    card["dataset"] = {k: v for k, v in card["dataset"].items() if k != "path"}
    card["builtin"] = {
        "name": args.name,
        "data": "all 217 pairs of the dev set, every subset, split by raster 70/15/15 (seed 0)",
        "gsd_m": None, "gsd": GSD,
        "epochs_run": summary["epochs_run"], "best_epoch": summary["best_epoch"],
        "training_minutes": round(card["wall_time_s"] / 60, 1),
        "trained_on": "one Horovod worker on a 2-core CPU machine shared with other work",
        "val_iou": best.get("val_iou"),
        "test_iou": round(summary["test"]["iou"], 4), "test_f1": round(summary["test"]["f1"], 4),
        "test_rasters": summary["test"]["images"],
        "test_iou_without_xiamen": round(summary["test_without_xiamen"]["iou"], 4),
        "splits": {name: sorted(split["raster_ids"]) for name, split in dataset["splits"].items()},
        "terms": TERMS,
    }
    out = TARGET / args.name
    staged = TARGET / f".{args.name}.new"
    shutil.rmtree(staged, ignore_errors=True)
    staged.mkdir(parents=True)
    for name in FILES:
        shutil.copy2(model / name, staged / name)
    (staged / "model.json").write_text(json.dumps(card, indent=2) + "\n")
    shutil.rmtree(out, ignore_errors=True)
    staged.rename(out)
    size = sum(p.stat().st_size for p in out.iterdir())
    digest = hashlib.sha256((out / "model.keras").read_bytes()).hexdigest()[:16]
    print(f"package_builtin: {out} ({size / 1e6:.1f} MB, model.keras sha256 {digest}...); "
          f"test IoU {card['builtin']['test_iou']:.3f} over {card['builtin']['test_rasters']} rasters")
    return 0


if __name__ == "__main__":
    sys.exit(main())
