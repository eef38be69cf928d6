"""The built-in model's test IoU on its own card's test split, with or without ``--tta``.

The card (``rs_cluster/builtin_models/<name>/model.json``) lists the rasters of each split by the
ids train-full gave them (``<subset>__<file>``); this links those of the test split from the dev
data, predicts them whole with ``rs-cluster predict --model builtin`` and scores them pooled, as
train-full did, also without Xiamen (whose labels miss buildings).

    .venv/bin/python scripts/score_builtin.py [--tta] [--name buildings-v1] [--data DIR]

Writes build/score-builtin/.
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
from train_full import INCOMPLETE_LABELS, link_all, pooled  # noqa: E402 - the same inputs and scoring

RS_CLUSTER = [sys.executable, "-m", "rs_cluster"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "dev")
    parser.add_argument("--out", type=Path, default=REPO / "build" / "score-builtin")
    parser.add_argument("--name", default="buildings-v1")
    parser.add_argument("--tta", action="store_true")
    args = parser.parse_args()
    card = json.loads((REPO / "cluster_side" / "rs_cluster" / "builtin_models" / args.name
                       / "model.json").read_text())
    test_ids = card["builtin"]["splits"]["test"]
    out = args.out.resolve()
    shutil.rmtree(out, ignore_errors=True)
    images, masks = link_all(args.data.resolve(), out / "all")
    for kind, source in (("images", images), ("masks", masks)):
        (out / "test" / kind).mkdir(parents=True)
        for raster_id in test_ids:
            (out / "test" / kind / raster_id).symlink_to((source / raster_id).resolve())
    started = time.monotonic()
    for argv in ([*RS_CLUSTER, "predict", "--model", f"builtin:{args.name}", "--input",
                  str(out / "test" / "images"), "--output", str(out / "masks"),
                  *(["--tta"] if args.tta else [])],
                 [*RS_CLUSTER, "evaluate", "--pred", str(out / "masks"), "--truth",
                  str(out / "test" / "masks"), "--json", str(out / "report.json")]):
        if subprocess.run(argv, cwd=REPO).returncode != 0:
            raise SystemExit(f"score_builtin: {argv[3]} failed")
    rows = json.loads((out / "report.json").read_text())["images"]
    every = pooled(rows)
    without = pooled([r for r in rows if not r["name"].startswith(INCOMPLETE_LABELS)])
    result = {"name": args.name, "tta": args.tta, "test_rasters": every["images"],
              "test_iou": round(every["iou"], 4), "test_f1": round(every["f1"], 4),
              "test_iou_without_xiamen": round(without["iou"], 4),
              "rasters_without_xiamen": without["images"],
              "seconds": round(time.monotonic() - started, 1)}
    (out / "summary.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
    sys.exit(main())
