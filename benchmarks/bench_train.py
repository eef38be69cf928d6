"""Training throughput on real tiles: plain Keras vs ``rs-cluster train`` with 1 and 2 workers.

Prepares a tile dataset from the dev imagery (``../shared/data/dev``, or ``$RS_DEV_DATA``) once,
then measures training images/s, each in a fresh process on the same tiles and model:

  (a) plain Keras ``fit`` on the tiles held in memory as numpy arrays (the baseline);
  (b) ``rs-cluster train --num-proc 1``: Petastorm reader, Horovod engine, callbacks, checkpoints;
  (c) ``rs-cluster train --num-proc 2 --threads-per-worker 1``: two Horovod workers as Spark tasks
      sharing the same cores as (a) and (b).

Epoch 1 (graph tracing) is left out; images/s = training images / training seconds (validation not
counted), the median over the timed epochs of a run and the best of ``--repeats`` runs (other
work on a shared box only ever slows a run down). Augmentation is off in (a), (b) and (c) so that they do the same work; (b+aug) shows
what the flips and rotations cost. Prints b/a and c/a, and the original 2019 pipeline's CPU figures
as scaling efficiency beside ours.

    .venv/bin/python benchmarks/bench_train.py [--base-filters 16] [--steps 15] [--epochs 4]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# The 2019 pipeline on CPU nodes: seconds per epoch by node count.
ORIGINAL_2019 = {1: 3204.0, 2: 2092.0, 8: 1709.0}
SUBSETS = {"xiamen_robosat_z18": 60, "inria_austin_chicago": 30}


def prepare(workdir: Path) -> Path:
    from rs_cluster.prepare import PrepareConfig, run_prepare
    from tests import devdata

    out = workdir / "tiles"
    if (out / "dataset.json").exists():
        return out
    images, masks = devdata.link_pairs(workdir / "pairs", {
        name: devdata.first_files(name, n) for name, n in SUBSETS.items()})
    run_prepare(PrepareConfig(images=str(images), masks=str(masks), output=str(out),
                              split=(0.8, 0.1, 0.1), seed=0))
    return out


def plain_keras(data: str, base_filters: int, batch: int, steps: int, epochs: int, lr: float) -> float:
    """(a), run in its own process: the same U-Net, loss and metrics, fit on numpy arrays."""
    import numpy as np
    import tensorflow as tf

    from rs_cluster import model as unet
    from rs_cluster.dataset import load_dataset, make_tile_reader

    with make_tile_reader(load_dataset(data).split_url("train"), fields=["image", "mask"]) as reader:
        rows = list(reader)
    x = np.stack([r.image for r in rows]).astype(np.float32) / 255.0
    y = np.stack([r.mask for r in rows]).astype(np.float32)
    tf.keras.utils.set_random_seed(0)
    net = unet.build_unet(x.shape[1], base_filters)
    net.compile(tf.keras.optimizers.Adam(lr), loss=unet.make_loss(False), metrics=unet.make_metrics())
    ds = tf.data.Dataset.from_tensor_slices((x, y)).repeat().shuffle(256, seed=0) \
        .batch(batch, drop_remainder=True).prefetch(tf.data.AUTOTUNE)
    times: list[float] = []

    class Timer(tf.keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            self.t0 = time.monotonic()

        def on_epoch_end(self, epoch, logs=None):
            times.append(time.monotonic() - self.t0)

    net.fit(ds, epochs=epochs, steps_per_epoch=steps, callbacks=[Timer()], verbose=0)
    return statistics.median(steps * batch / t for t in times[1:])


def rs_train(data: str, model_dir: Path, num_proc: int, base_filters: int, batch: int, steps: int,
             epochs: int, lr: float, augment: bool, threads: int | None) -> float:
    args = [sys.executable, "-m", "rs_cluster", "-q", "train", "--data", data,
            "--model-dir", str(model_dir), "--num-proc", str(num_proc), "--epochs", str(epochs),
            "--base-filters", str(base_filters), "--batch-size", str(batch),
            "--steps-per-epoch", str(steps), "--validation-steps", "1", "--lr", str(lr),
            "--patience", "0", "--overwrite", "--json"]
    if not augment:
        args.append("--no-augment")
    if threads:
        args += ["--threads-per-worker", str(threads)]
    env = {**os.environ, "RS_SPARK_MASTER": "local[2]"}
    done = subprocess.run(args, capture_output=True, text=True, cwd=REPO, env=env, timeout=900)
    if done.returncode:
        sys.exit(f"rs-cluster train failed:\n{done.stderr[-3000:]}")
    epochs_run = json.loads(done.stdout)["epochs"]
    return statistics.median(e["images_per_s"] for e in epochs_run[1:])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--base-filters", type=int, default=16)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--steps", type=int, default=15, help="training steps per epoch")
    p.add_argument("--epochs", type=int, default=4, help="epochs per run; the first is not timed")
    p.add_argument("--repeats", type=int, default=2, help="runs of each; the best counts")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--workdir", help="keep the prepared tiles here between runs")
    p.add_argument("--plain", metavar="DATA", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.plain:
        print(plain_keras(a.plain, a.base_filters, a.batch_size, a.steps, a.epochs, a.lr))
        return

    workdir = Path(a.workdir or tempfile.mkdtemp(prefix="bench-train-"))
    started = time.monotonic()
    data = str(prepare(workdir))
    meta = json.loads((Path(data) / "dataset.json").read_text())
    print(f"tiles: {meta['splits']['train']['tiles']} train ({data}); cores: {os.cpu_count()}; "
          f"U-Net base filters {a.base_filters}, batch {a.batch_size} per worker, "
          f"{a.steps} steps x {a.epochs} epochs (first not timed), best of {a.repeats}; "
          f"load average {os.getloadavg()[0]:.1f}", flush=True)

    cmd = [sys.executable, __file__, "--plain", data, "--base-filters", str(a.base_filters),
           "--batch-size", str(a.batch_size), "--steps", str(a.steps), "--epochs", str(a.epochs),
           "--lr", str(a.lr)]
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}

    def plain() -> float:
        done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
        if done.returncode:
            sys.exit(f"plain Keras run failed:\n{done.stderr[-3000:]}")
        return float(done.stdout.strip().splitlines()[-1])

    common = dict(base_filters=a.base_filters, batch=a.batch_size, steps=a.steps, epochs=a.epochs, lr=a.lr)
    runs = {
        "a": ("(a)     plain Keras fit, 1 process       ", plain),
        "b": ("(b)     rs-cluster train --num-proc 1    ",
              lambda: rs_train(data, workdir / "model-b", 1, augment=False, threads=None, **common)),
        "b_aug": ("(b+aug) same, with flips and rotations   ",
                  lambda: rs_train(data, workdir / "model-b", 1, augment=True, threads=None, **common)),
        "c": ("(c)     --num-proc 2, 1 thread per worker",
              lambda: rs_train(data, workdir / "model-c", 2, augment=False, threads=1, **common)),
    }
    samples: dict[str, list[float]] = {key: [] for key in runs}
    for _ in range(a.repeats):  # interleaved, so a burst of other work hits every variant alike
        for key, (_, fn) in runs.items():
            samples[key].append(fn())
    best = {key: max(values) for key, values in samples.items()}
    for key, (label, _) in runs.items():
        print(f"{label} {best[key]:8.1f} images/s   (runs: "
              f"{', '.join(f'{v:.1f}' for v in samples[key])})", flush=True)
    ips_a, ips_b, ips_b_aug, ips_c = best["a"], best["b"], best["b_aug"], best["c"]

    print(f"\nb/a = {ips_b / ips_a:.3f}  (target >= 0.95: pipeline overhead under 5%)")
    print(f"c/a = {ips_c / ips_a:.3f}  (target >= 0.90: Horovod overhead under 10% on the same cores)")
    print(f"b+aug/b = {ips_b_aug / ips_b:.3f}  (cost of augmentation)")
    print("\nscaling efficiency = speed-up / hardware added")
    one = ORIGINAL_2019[1]
    for nodes, secs in ORIGINAL_2019.items():
        print(f"  2019, {nodes} CPU node(s): {secs:6.0f} s/epoch  speed-up {one / secs:4.2f}  "
              f"efficiency {one / secs / nodes:6.1%}")
    print(f"  ours, 2 workers on the same {os.cpu_count()} cores (no hardware added): speed-up "
          f"{ips_c / ips_a:4.2f} over (a), {ips_c / ips_b:4.2f} over (b)")
    print(f"\nbenchmark took {time.monotonic() - started:.0f} s; load average now "
          f"{os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
