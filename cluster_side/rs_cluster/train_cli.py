"""``rs-cluster train``: argument parsing only; the work is in :mod:`rs_cluster.train`."""

from __future__ import annotations

import argparse
import json

from rs_cluster.archs import ARCHS, DEFAULT_ARCH, FALLBACK_ARCH
from rs_cluster.progress import Reporter
from rs_cluster.settings import add_resource_options, resources_from_args


def _nics(text: str) -> tuple[str, ...]:
    names = tuple(n.strip() for n in text.split(",") if n.strip())
    if not names:
        raise argparse.ArgumentTypeError("expected network interface names such as lo or eth0,eth1")
    return names


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train", help="train the building U-Net on a prepared dataset with Horovod on Spark",
        description="Trains a building U-Net (--arch; by default over an ImageNet-pretrained "
        "encoder), or fine-tunes one (--init-model), on the train split of a prepared dataset, "
        "keeping the epoch of the best val IoU and early-stopping on it, with N Horovod workers "
        "run as Spark tasks (one worker runs in this process). Writes model.keras, model.json, "
        "metrics.jsonl and TensorBoard logs to --model-dir, complete or not at all.")
    p.add_argument("--data", required=True, metavar="DIR_OR_URL", help="dataset made by `rs-cluster prepare`")
    p.add_argument("--model-dir", required=True, metavar="DIR", help="model folder to create")
    p.add_argument("--epochs", type=int, default=30, help="most epochs to train (default 30)")
    p.add_argument("--batch-size", type=int, default=16, help="tiles per step per worker (default 16)")
    p.add_argument("--num-proc", type=int, default=1, metavar="N",
                   help="Horovod workers (default 1: in this process; more: as Spark tasks)")
    p.add_argument("--master", metavar="URL", help="Spark master for N > 1 (default: the cluster "
                   "settings file's, else local[*])")
    add_resource_options(p)
    p.add_argument("--lr", type=float, default=1e-4,
                   help="Adam learning rate of one worker; scaled by N with warm-up (default 1e-4)")
    p.add_argument("--patience", type=int, default=5,
                   help="stop after this many epochs without a better val IoU (0: never; default "
                   "5); the model is the epoch of the best val IoU")
    p.add_argument("--min-delta", type=float, default=0.0,
                   help="val IoU must rise by more than this to count as better (default 0)")
    p.add_argument("--resume", action="store_true", help="continue the interrupted run in --model-dir")
    p.add_argument("--overwrite", action="store_true", help="replace a model or unfinished run there")
    p.add_argument("--arch", choices=list(ARCHS),
                   help=f"the network: {'; '.join(f'{a.name}: {a.summary}' for a in ARCHS.values())} "
                   f"(default {DEFAULT_ARCH}, or {FALLBACK_ARCH} where its ImageNet weights package "
                   "is not installed; with --init-model: that model's)")
    p.add_argument("--init-model", metavar="DIR_OR_URL",
                   help="fine-tune: start from the weights of this model folder (model.json + "
                   "model.keras from rs-cluster train), keeping its network and width; its tile "
                   "size may differ; 'builtin' fine-tunes the model that ships with rs-cluster")
    p.add_argument("--base-filters", type=int,
                   help="width: filters of the first U-Net level, or x4 those of the pretrained "
                   "network's first decoder level (default 64, as in 2019; with --init-model: "
                   "that model's)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--loss", choices=["bce", "bce_dice"], default="bce_dice",
                   help="binary cross-entropy, or binary cross-entropy + soft Dice (default; "
                   "keeps small data from collapsing to an all-background mask)")
    p.add_argument("--dice", action="store_true", help="the same as --loss bce_dice (older scripts)")
    p.add_argument("--lr-schedule", choices=["cosine", "constant"], default="cosine",
                   help="cosine (default): after the warm-up the LR falls along half a cosine to 0 "
                   "by the last step; constant: as in 2019")
    p.add_argument("--tile-size", type=int, metavar="PX",
                   help="tile size the model is for (default: the dataset's); must match the data")
    p.add_argument("--steps-per-epoch", type=int, metavar="N",
                   help="steps per epoch (default: one pass over the train split)")
    p.add_argument("--validation-steps", type=int, metavar="N",
                   help="validation steps per epoch (default: one pass over the val split)")
    p.add_argument("--warmup-epochs", type=int, default=2,
                   help="epochs of LR warm-up when N > 1 (default 2)")
    p.add_argument("--threads-per-worker", type=int, metavar="N",
                   help="CPU threads of each worker (default: the host's cores / its workers)")
    p.add_argument("--nics", type=_nics, metavar="IF[,IF]",
                   help="network interfaces for Horovod (default: lo on a local master, else "
                   "$RS_HOROVOD_NICS or auto-detected)")
    p.add_argument("--no-augment", action="store_true", help="no flips, rotations, zoom or colour changes")
    p.add_argument("--max-restarts", type=int, default=2, metavar="N",
                   help="when a worker process is killed, start all workers again from the last "
                   "checkpoint up to N times (default 2)")
    p.add_argument("--time-limit", type=float, metavar="MIN", dest="time_limit_min",
                   help="stop after the first epoch that ends this many minutes in (default: none)")
    p.add_argument("--preview-every", type=int, default=1, metavar="N",
                   help="with --previews: a preview image every N epochs and after the last "
                   "(default 1; 0: none)")
    p.add_argument("--previews", metavar="DIR",
                   help="folder on this host for the preview images (epoch-NNNN.png: a few fixed "
                   "validation tiles, their reference masks and the predicted probabilities); "
                   "none without it")
    p.add_argument("--json", action="store_true", help="print the result as JSON on stdout")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace, reporter: Reporter) -> int:
    from dataclasses import asdict

    from rs_cluster.train import TrainConfig, run_train

    cfg = TrainConfig(
        data=args.data, model_dir=args.model_dir, epochs=args.epochs, batch_size=args.batch_size,
        num_proc=args.num_proc, master=args.master, lr=args.lr, patience=args.patience,
        min_delta=args.min_delta,
        resume=args.resume, overwrite=args.overwrite, base_filters=args.base_filters, seed=args.seed,
        dice=args.dice, tile_size=args.tile_size, steps_per_epoch=args.steps_per_epoch,
        validation_steps=args.validation_steps, warmup_epochs=args.warmup_epochs,
        threads=args.threads_per_worker, nics=args.nics, augment=not args.no_augment,
        max_restarts=args.max_restarts, resources=resources_from_args(args), arch=args.arch,
        init_model=args.init_model, loss=args.loss, lr_schedule=args.lr_schedule,
        preview_every=args.preview_every, previews=args.previews,
        time_limit_min=args.time_limit_min)
    result = run_train(cfg, reporter=reporter)
    if args.json:
        print(json.dumps(asdict(result), indent=2))
    else:
        best = result.epochs[result.best_epoch - 1] if result.best_epoch else {}
        print(f"model: {result.model_dir}")
        print(f"  {len(result.epochs)} epoch(s), best {result.best_epoch}: "
              + " ".join(f"{k}={best[k]:.4f}" for k in ("val_loss", "val_accuracy", "val_iou") if k in best))
        print(f"  {result.world_size} worker(s), {result.wall_time_s:.1f} s")
        if result.quality.get("verdict") == "weak":
            print(f"  weak model: {result.quality.get('verdict_reason')}; {result.quality.get('advice')}")
    return 0
