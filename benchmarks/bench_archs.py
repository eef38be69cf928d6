"""Training and inference speed of each network of ``rs_cluster.model.ARCHS`` on the CPU, as ratios
against ``unet2019`` measured in the same run.

Real dev tiles (128 px crops of Inria Chicago and Xiamen rasters, scaled to [0, 1] as the pipeline
feeds them), batch 16, BCE + Dice, Adam. Each network runs in its own process, one after the
other: a few untimed warm-up steps (graph tracing), then ``--steps`` timed training steps and
``--steps`` timed inference batches. Figures are the best of ``--repeats`` runs, interleaved,
since other work on a shared box only ever slows a run down.

Two widths: the default (``--base-filters 64``, what a user trains) and the narrow one the tests
use (8), where the 2019 U-Net shrinks to almost nothing but the pretrained encoder keeps its
ImageNet width.

    .venv/bin/python benchmarks/bench_archs.py [--steps 6] [--repeats 2] [--widths 64,8]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(REPO))

BASELINE = "unet2019"
TILE = 128
BATCH = 16
WARMUP_STEPS = 2
PICKS = {"inria_austin_chicago": 2, "xiamen_robosat_z18": 2}


def tiles(count: int):
    """``count`` real 128 px (image, mask) crops, image in [0, 1], mask 0./1."""
    import numpy as np
    import rasterio

    from tests import devdata

    images, masks = [], []
    for name, n in PICKS.items():
        for file in devdata.first_files(name, n):
            with rasterio.open(devdata.subset(name) / "images" / file) as src:
                image = np.moveaxis(src.read((1, 2, 3)), 0, -1)
            with rasterio.open(devdata.subset(name) / "gt" / file) as src:
                mask = src.read(1)
            for top in range(0, image.shape[0] - TILE + 1, TILE):
                for left in range(0, image.shape[1] - TILE + 1, TILE):
                    images.append(image[top:top + TILE, left:left + TILE])
                    masks.append(mask[top:top + TILE, left:left + TILE, None])
    reps = -(-count // len(images))
    x = np.stack((images * reps)[:count]).astype(np.float32) / 255.0
    y = (np.stack((masks * reps)[:count]) > 0).astype(np.float32)
    return x, y


def one(arch: str, base_filters: int, steps: int) -> dict[str, float]:
    """Run in its own process: seconds per training step and per inference batch."""
    import tensorflow as tf

    from rs_cluster import model

    tf.keras.utils.set_random_seed(0)
    x, y = tiles(BATCH * (steps + WARMUP_STEPS))
    built = model.build_model(arch, TILE, 3, base_filters=base_filters)
    net = built.model
    net.compile(tf.keras.optimizers.Adam(1e-3), loss=model.make_loss(dice=True))
    ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(BATCH, drop_remainder=True)
    net.fit(ds.take(WARMUP_STEPS), epochs=1, verbose=0)
    t0 = time.perf_counter()
    net.fit(ds.skip(WARMUP_STEPS), epochs=1, verbose=0)
    train_s = (time.perf_counter() - t0) / steps
    infer = tf.function(lambda b: net(b, training=False))
    infer(x[:BATCH])
    t0 = time.perf_counter()
    for i in range(steps):
        infer(x[i * BATCH:(i + 1) * BATCH]).numpy()
    predict_s = (time.perf_counter() - t0) / steps
    return {"train_step_s": train_s, "predict_batch_s": predict_s,
            "parameters": float(net.count_params())}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=6, help="timed steps of each (default 6)")
    p.add_argument("--repeats", type=int, default=2, help="runs of each; the best counts")
    p.add_argument("--widths", default="64,8", help="base filters to measure (default 64,8)")
    p.add_argument("--one", nargs=2, metavar=("ARCH", "WIDTH"), help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.one:
        print(json.dumps(one(a.one[0], int(a.one[1]), a.steps)))
        return

    from rs_cluster.model import ARCHS

    started = time.monotonic()
    widths = [int(w) for w in a.widths.split(",")]
    print(f"{TILE} px tiles, batch {BATCH}, {a.steps} timed steps after {WARMUP_STEPS} warm-up, "
          f"best of {a.repeats}; cores: {os.cpu_count()}; load average {os.getloadavg()[0]:.1f}",
          flush=True)
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    best: dict[tuple[str, int], dict[str, float]] = {}
    for _ in range(a.repeats):
        for width in widths:
            for arch in ARCHS:
                done = subprocess.run([sys.executable, __file__, "--one", arch, str(width),
                                       "--steps", str(a.steps)], capture_output=True, text=True,
                                      env=env, timeout=1800)
                if done.returncode:
                    sys.exit(f"{arch} at width {width} failed:\n{done.stderr[-3000:]}")
                got = json.loads(done.stdout.strip().splitlines()[-1])
                old = best.get((arch, width))
                best[(arch, width)] = got if old is None else {
                    k: min(old[k], got[k]) if k != "parameters" else got[k] for k in got}
    for width in widths:
        base = best[(BASELINE, width)]
        print(f"\nbase filters {width}:")
        for arch in ARCHS:
            r = best[(arch, width)]
            print(f"  {arch:18s} {r['parameters'] / 1e6:6.2f} M params  "
                  f"train {r['train_step_s']:6.3f} s/step ({BATCH / r['train_step_s']:6.1f} tiles/s, "
                  f"x{r['train_step_s'] / base['train_step_s']:.2f} of {BASELINE})  "
                  f"predict {r['predict_batch_s']:6.3f} s/batch "
                  f"(x{r['predict_batch_s'] / base['predict_batch_s']:.2f})", flush=True)
    print(f"\nratios are seconds per step over {BASELINE}'s at the same width (below 1: faster); "
          f"benchmark took {time.monotonic() - started:.0f} s")


if __name__ == "__main__":
    main()
