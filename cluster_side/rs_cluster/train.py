"""The train stage: a U-Net (:mod:`rs_cluster.archs` names which) on a prepared tile dataset, over
N workers of a training engine, from scratch, from ImageNet weights, or from a model (fine-tuning).

The driver checks the dataset and the model folder, then has the engine (Horovod by default, see
:mod:`rs_cluster.engine`) run :func:`train_worker` once per worker: in this process for one worker,
as Spark tasks for more. Each worker reads its shard of the Petastorm splits; rank 0 alone writes.

Everything a run writes goes to a hidden sibling of the model folder, ``.<name>.training/``::

    state.json          epochs done, per-epoch metrics, best epoch, early-stopping count
    checkpoint/         model + optimizer (tf.train.Checkpoint), for --resume
    best-<n>.weights.h5 weights of the best epoch so far (by val IoU)
    events.jsonl        rank 0's progress, relayed by the driver to the reporter
    previews/           rank 0's latest preview PNGs, copied by the driver to --previews
    model/              what becomes the model folder: model.keras, metrics.jsonl, logs/, model.json

``model.json`` is written last and ``model/`` is then renamed to the model folder, so a model folder
is complete or absent; an interrupted run leaves the hidden folder for ``--resume``. Its
"quality" holds rank 0's verdict on the final model (:mod:`rs_cluster.previews`).
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import json
import math
import os
import shutil
import sys
import time
import warnings
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import IO, Any
from urllib.parse import urlsplit

from rs_cluster import __version__, archs, builtin, storage
from rs_cluster.atomic import replace_dir, write_json_atomic, write_text_atomic
from rs_cluster.dataset import DatasetInfo, load_dataset
from rs_cluster.config import check_keys
from rs_cluster.errors import ClusterError, ConfigError, InputError, OutputExistsError, StorageError
from rs_cluster.previews import FixedTiles, copy_preview, judge, preview_due
from rs_cluster.progress import Reporter
from rs_cluster.settings import SparkResources
from rs_cluster.spark import Poller, quiet_library_warnings, resolve_master, spark_session

MODEL_FORMAT = "rs-cluster-model"
MODEL_FORMAT_VERSION = 1
MODEL_FILE = "model.keras"
MODEL_JSON = "model.json"
METRICS_FILE = "metrics.jsonl"
LOGS_DIR = "logs"
STATE_FILE = "state.json"
CHECKPOINT_DIR = "checkpoint"
EVENTS_FILE = "events.jsonl"
STAGED_MODEL = "model"
ENV_NICS = "RS_HOROVOD_NICS"
# Kept in sync with rs_cluster.model (not imported here: it imports TensorFlow).
THRESHOLD, INPUT_SCALE, BANDS = 0.5, 255.0, ["red", "green", "blue"]
DEFAULT_BASE_FILTERS = 64
EPOCH_KEYS = ("loss", "accuracy", "iou", "val_loss", "val_accuracy", "val_iou")
LOSSES = ("bce", "bce_dice")
LR_SCHEDULES = ("cosine", "constant")
# Settings a resumed run must share with the checkpoint it continues.
FINGERPRINT_KEYS = ("data", "tile_size", "base_filters", "dice", "engine", "arch", "init_model")
# What a checkpoint state written before a setting existed was trained with.
_FINGERPRINT_BEFORE = {"arch": archs.LEGACY_ARCH, "init_model": None}


@dataclass(frozen=True)
class TrainConfig:
    data: str
    model_dir: str
    epochs: int = 30
    batch_size: int = 16
    num_proc: int = 1
    master: str | None = None
    lr: float = 1e-4
    patience: int = 5
    min_delta: float = 0.0  # how much val IoU must rise to count as better
    resume: bool = False
    overwrite: bool = False
    base_filters: int | None = None  # default: 64, or the init model's
    seed: int = 0
    dice: bool = False  # the same as loss="bce_dice", kept for older specs and scripts
    tile_size: int | None = None  # the model's input; default: the dataset's tile size
    steps_per_epoch: int | None = None  # default: one pass over the train split
    validation_steps: int | None = None  # default: the whole val split every epoch
    warmup_epochs: int = 2
    threads: int | None = None  # CPU threads per worker; default: the host's cores / its workers
    nics: tuple[str, ...] | None = None
    engine: str = "horovod"
    start_timeout: int = 120
    slot_wait_s: float = 30.0
    augment: bool = True
    max_restarts: int = 2  # times a run that lost a worker starts again from its last checkpoint
    resources: SparkResources | None = None  # overrides of the cluster settings file
    # The network (rs_cluster.archs.ARCHS); default: the init model's, else DEFAULT_ARCH, which
    # falls back to FALLBACK_ARCH when its ImageNet weights are not installed.
    arch: str | None = None
    init_model: str | None = None  # a model folder whose weights training starts from
    loss: str = "bce_dice"
    # cosine: after the warm-up, the LR falls from its peak to 0 by the last step; constant: 2019's
    lr_schedule: str = "cosine"
    # A preview PNG every this many epochs and after the last (0: none), copied into ``previews``
    # (a folder on the driver's host; no previews without it): rs_cluster.previews.
    preview_every: int = 1
    previews: str | None = None
    # Stop after the first epoch that ends this many minutes of training in (None: no limit);
    # for a fixed budget, e.g. comparing networks at equal time (benchmarks/bench_quality.py).
    time_limit_min: float | None = None

    def __post_init__(self) -> None:
        positive = {"epochs": self.epochs, "batch_size": self.batch_size, "num_proc": self.num_proc,
                    "base_filters": self.base_filters, "start_timeout": self.start_timeout,
                    "steps_per_epoch": self.steps_per_epoch, "validation_steps": self.validation_steps,
                    "threads": self.threads}
        for name, value in positive.items():
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ConfigError(f"train: {name} must be a whole number of at least 1 (got {value!r})")
        if not self.lr > 0:
            raise ConfigError(f"train: lr must be above 0 (got {self.lr})")
        if self.patience < 0 or self.warmup_epochs < 0 or self.min_delta < 0 or self.max_restarts < 0:
            raise ConfigError("train: patience, min_delta, warmup_epochs and max_restarts must not "
                              "be negative")
        if self.time_limit_min is not None and not self.time_limit_min > 0:
            raise ConfigError(f"train: time_limit_min must be above 0 (got {self.time_limit_min})")
        if not isinstance(self.preview_every, int) or self.preview_every < 0:
            raise ConfigError(f"train: preview_every must be a whole number, 0 for no previews "
                              f"(got {self.preview_every!r})")
        if self.arch is not None:
            archs.get_arch(self.arch)  # a named error before anything runs
        if self.loss not in LOSSES:
            raise ConfigError(f"train: loss {self.loss!r} is not one of {', '.join(LOSSES)}")
        if self.dice and self.loss != "bce_dice":
            raise ConfigError(f"train: dice (the same as loss bce_dice) contradicts loss "
                              f"{self.loss!r}; pick one")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ConfigError(f"train: lr_schedule {self.lr_schedule!r} is not one of "
                              f"{', '.join(LR_SCHEDULES)}")
        if self.tile_size is not None:
            # Without --arch the network is known only once the init model's card or the weights
            # package is looked at: the driver checks its tile size then.
            problem = archs.tile_problem(self.arch or archs.LEGACY_ARCH, self.tile_size)
            if problem:
                raise ConfigError(f"train: {problem}")
        if self.resume and self.overwrite:
            raise ConfigError("train: --resume and --overwrite contradict each other; pick one")

    @property
    def uses_dice(self) -> bool:
        return self.dice or self.loss == "bce_dice"

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TrainConfig":
        data = check_keys(cls, data, "train")
        if data.get("nics") is not None:
            data["nics"] = tuple(data["nics"])
        return cls(**data)


class ArchMismatchError(ConfigError):
    """Fine-tuning asked for another network than the init model's: its weights fit only its own."""


@dataclass(frozen=True)
class InitModel:
    """The model a fine-tuning run starts from, as its card describes it."""

    location: str
    model_file: str  # its name inside the folder
    model_sha256: str
    arch: str
    base_filters: int
    bands: tuple[str, ...]
    tile_size: int
    dataset: str | None

    def to_card(self) -> dict[str, Any]:
        return {"location": self.location, "model_sha256": self.model_sha256, "arch": self.arch,
                "tile_size": self.tile_size, "base_filters": self.base_filters,
                "dataset": self.dataset}


@dataclass(frozen=True)
class TrainResult:
    model_dir: str
    epochs: list[dict[str, Any]]
    best_epoch: int
    stopped_early: bool
    world_size: int
    wall_time_s: float
    resumed_from: int = 0
    workers: list[dict[str, Any]] = field(default_factory=list)
    restarts: int = 0
    quality: dict[str, Any] = field(default_factory=dict)  # the model card's: verdict and why


def run_train(cfg: TrainConfig, *, reporter: Reporter | None = None, spark: Any = None) -> TrainResult:
    """Trains the U-Net on ``cfg.data`` and writes the model folder ``cfg.model_dir``."""
    reporter = reporter or Reporter()
    started = time.monotonic()
    quiet_library_warnings()
    reporter.start("train", message=f"checking {cfg.data} and {cfg.model_dir}")
    info = load_dataset(cfg.data)
    bands = list(info.meta.get("bands", BANDS))
    init = _read_init_model(cfg.init_model, bands) if cfg.init_model else None
    arch, fallback_reason = _choose_arch(cfg, init)
    if fallback_reason:
        reporter.warning(fallback_reason)
    base_filters = _base_filters(cfg, init)
    tile_size = _check_tiles(info, cfg, arch, len(bands))
    train_tiles, val_tiles = _check_splits(info)
    # The model folder and the run's work folder are locations (a path, file://, s3://, hdfs://):
    # rank 0 may run on any node, so it reads and writes them through rs_cluster.storage.
    final, work = _locations(cfg.model_dir)
    fingerprint = {"data": info.url, "tile_size": tile_size, "base_filters": base_filters,
                   "dice": cfg.uses_dice, "engine": cfg.engine, "arch": arch,
                   "init_model": init.model_sha256 if init else None}
    if cfg.resume and not cfg.overwrite and _read_state(work) is None and \
            storage.is_file(storage.join(final, MODEL_JSON)):
        card = storage.read_json(storage.join(final, MODEL_JSON))
        quality = card.get("quality") if isinstance(card.get("quality"), dict) else \
            _quality({"best_epoch": card.get("best_epoch"), "best_val_iou": _best_iou(card)}, None)
        _finish(reporter, f"{cfg.model_dir}: training is already complete; nothing to resume",
                quality, model_dir=str(final))
        return _result_from_card(final)
    state = _claim_model_dir(cfg, final, work, fingerprint, reporter)
    resumed_from = int(state["epochs_done"]) if state else 0
    prior_wall = float(state["wall_time_s"]) if state else 0.0

    world = cfg.num_proc
    steps = cfg.steps_per_epoch or max(1, train_tiles // (cfg.batch_size * world))
    spec = {
        "engine": cfg.engine, "work": str(work), "fingerprint": fingerprint,
        "train_url": info.split_url("train"), "val_url": info.split_url("val"),
        "tile_size": tile_size, "base_filters": base_filters, "dice": cfg.uses_dice,
        "lr_schedule": cfg.lr_schedule,
        "arch": arch, "requested_arch": cfg.arch or (init.arch if init else archs.DEFAULT_ARCH),
        "fallback_reason": fallback_reason, "bands": len(bands),
        "init_model": init.location if init else None,
        "init_model_file": init.model_file if init else None,
        "init_sha256": init.model_sha256 if init else None,
        "epochs": cfg.epochs, "batch_size": cfg.batch_size, "lr": cfg.lr, "patience": cfg.patience,
        "min_delta": cfg.min_delta,
        "warmup_epochs": cfg.warmup_epochs, "seed": cfg.seed, "augment": cfg.augment,
        "steps_per_epoch": steps, "validation_steps": cfg.validation_steps, "threads": cfg.threads,
        # Rank 0 draws previews only for a driver that copies them somewhere.
        "preview_every": cfg.preview_every if cfg.previews else 0,
        "time_limit_s": cfg.time_limit_min * 60 if cfg.time_limit_min else None,
    }
    storage.make_dirs(work)
    relay = _EventRelay(storage.join(work, EVENTS_FILE), reporter, cfg.epochs * steps, work=work,
                        previews=Path(cfg.previews) if cfg.previews else None)
    where = "in this process" if world == 1 else f"as Spark tasks on {resolve_master(cfg.master)}"
    resuming = f", resuming after epoch {resumed_from}" if resumed_from else ""
    reporter.start("train", total=cfg.epochs * steps, unit="steps",
                   message=f"training {arch} ({base_filters} base filters, {tile_size} px"
                   f"{', from ' + init.location if init else ''}) on "
                   f"{train_tiles} train / {val_tiles} val tiles with {world} worker(s) {where}"
                   f"{resuming}")
    if world == 1 and cfg.master:
        reporter.info(f"one worker trains in this process; --master {cfg.master} is not used")
    if resumed_from:
        reporter.info(f"resuming {cfg.model_dir} from its checkpoint after epoch {resumed_from}")
        reporter.progress(resumed_from * steps, cfg.epochs * steps,
                          f"resuming after epoch {resumed_from}", epoch=resumed_from, step=0)

    restarts: list[int] = []  # epochs done when each restart began
    try:
        workers = _launch(cfg, spec, relay, reporter, spark, restarts)
    except BaseException:
        if _read_state(work) is None:  # nothing to resume: leave no trace
            _remove(work)
        raise

    final_state = _read_state(work)
    if final_state is None:  # pragma: no cover - rank 0 always writes a state after an epoch
        raise ClusterError(f"{work}: training ended without a checkpoint state")
    wall = prior_wall + time.monotonic() - started
    network = next((w.pop("network") for w in workers if "network" in w), None)
    quality = _quality(final_state, next((w.pop("quality") for w in workers if "quality" in w), None))
    card = _model_card(info, cfg, spec, final_state, workers, wall, resumed_from, restarts,
                       network, init)
    card["quality"] = quality
    # the cut-off predict uses unless told otherwise: tuned on the validation tiles
    card["threshold"] = quality.get("threshold", THRESHOLD)
    staged = storage.join(work, STAGED_MODEL)
    _write_json(storage.join(staged, MODEL_JSON), card)  # last: it means the model is complete
    _commit(staged, final, cfg.overwrite)
    _remove(work)
    result = TrainResult(model_dir=str(final), epochs=card["epochs"], best_epoch=card["best_epoch"],
                         stopped_early=card["training"]["stopped_early"], world_size=world,
                         wall_time_s=round(wall, 3), resumed_from=resumed_from, workers=workers,
                         restarts=len(restarts), quality=quality)
    _finish(reporter, f"model written to {final} after {len(card['epochs'])} epoch(s) in {wall:.1f} s",
            quality, model_dir=str(final))
    return result


def _quality(state: dict[str, Any], judged: dict[str, Any] | None) -> dict[str, Any]:
    """The model card's "quality": the best epoch's val IoU and rank 0's verdict on the final
    model (judged on the val IoU alone when rank 0 sent none)."""
    best_epoch = int(state.get("best_epoch") or 0) or None
    iou = state.get("best_val_iou")
    iou = round(float(iou), 5) if isinstance(iou, (int, float)) and math.isfinite(iou) and best_epoch \
        else None
    return {"best_val_iou": iou, "best_epoch": best_epoch, **(judged or judge(iou))}


def _finish(reporter: Reporter, message: str, quality: dict[str, Any], **extra: Any) -> None:
    """The finish event with the verdict; a weak model is also a warning, so it is counted."""
    iou, epoch = quality.get("best_val_iou"), quality.get("best_epoch")
    if iou is not None:
        message += f"; best validation IoU {iou:.3f} at epoch {epoch}"
    threshold = quality.get("threshold")
    if isinstance(threshold, float) and threshold != THRESHOLD:
        message += (f"; threshold {threshold:.2f} (IoU {quality.get('threshold_iou', 0):.3f} "
                    f"against {quality.get('iou_at_0_5', 0):.3f} at 0.5 on the checked tiles)")
    if quality.get("verdict") == "weak":
        message += f"; weak model: {quality.get('verdict_reason')}"
        reporter.warning(f"{quality.get('verdict_reason')}; {quality.get('advice')}",
                         verdict="weak")
    reporter.finish(message, **extra, best_val_iou=iou, best_epoch=epoch,
                    verdict=quality.get("verdict", "ok"),
                    verdict_reason=quality.get("verdict_reason", ""),
                    advice=quality.get("advice", ""))


def _launch(cfg: TrainConfig, spec: dict[str, Any], relay: "_EventRelay", reporter: Reporter,
            spark: Any, restarts: list[int]) -> list[dict[str, Any]]:
    """Runs the workers through the engine: here for one, as Spark tasks for more.

    When a worker process is killed, the surviving workers fail too; the whole set then starts
    again from the last checkpoint (rank 0 reads it), up to ``cfg.max_restarts`` times. Each
    restart is reported as a warning event carrying ``restart`` (its number). A worker that fails
    with an error of its own is not restarted: the same error would come back.
    """
    from rs_cluster.engine import get_engine

    engine = get_engine(cfg.engine)
    world = cfg.num_proc
    if world == 1:
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
        _report_resources(reporter, engine.name, spec["work"], None, 1, cfg.threads)
        with Poller(relay.poll):
            return engine.launch(train_worker, (spec,), num_proc=1)
    with spark_session(cfg.master, "rs-cluster train", spark=spark, resources=cfg.resources,
                       conf=_yarn_executors(cfg, world)) as session:
        sc = session.sparkContext
        _wait_for_slots(sc, world, 0 if sc.master.startswith("local") else cfg.slot_wait_s)
        env = {**_worker_env(), "TF_CPP_MIN_LOG_LEVEL": os.environ.get("TF_CPP_MIN_LOG_LEVEL", "2")}
        while True:
            reporter.info(f"starting {world} {engine.name} workers on {sc.master}")
            _report_resources(reporter, engine.name, spec["work"], sc, world)
            output = _TailStream(sys.stderr)  # worker output to stderr: stdout may carry events
            executors = _executors(sc)
            try:
                with Poller(relay.poll):
                    return engine.launch(train_worker, (spec,), num_proc=world, env=env,
                                         nics=_nics(cfg, sc.master),
                                         start_timeout=cfg.start_timeout, output=output)
            except Exception as e:
                # A worker killed by a signal, or the executor it ran in gone with its node.
                lost = engine.lost_worker(e, output.deaths) or _lost_executors(sc, executors)
                if lost is None or len(restarts) >= cfg.max_restarts:
                    tried = f" after {len(restarts)} restart(s)" if restarts else ""
                    raise ClusterError(
                        f"training on {sc.master} with {world} workers failed{tried} "
                        f"({lost or type(e).__name__ + ': ' + _first_line(e)}); last worker "
                        f"error: {output.last_error() or 'none'}; continue with --resume once "
                        "fixed") from e
            state = _read_state(spec["work"])
            done = int(state["epochs_done"]) if state else 0
            restarts.append(done)
            where = f"its checkpoint after epoch {done}" if done else "epoch 1 (no checkpoint yet)"
            reporter.warning(f"{lost}; restarting all {world} workers from {where} "
                             f"(restart {len(restarts)} of at most {cfg.max_restarts})",
                             restart=len(restarts), max_restarts=cfg.max_restarts,
                             resume_epoch=done)
            if not sc.master.startswith("local"):  # a lost executor's replacement must register
                _wait_for_slots(sc, world, cfg.slot_wait_s)


def _report_resources(reporter: Reporter, engine: str, work: str, sc: Any, world: int,
                      threads: int | None = None) -> None:
    """What the workers (re)start on, as one info event with "resources": the Spark master, the
    world size, the engine, the executors and their cores (None when Spark does not say), and the
    store folder the run's files go to, the model's parent (None: a local folder; any user part
    of the URL left out)."""
    if sc is None:  # one worker in this process
        master, executors, cores = "in-process", None, threads or os.cpu_count()
    else:
        master = str(sc.master)
        found = len(_executors(sc))
        # Spark lists the driver among its executors; on a local master it is the only one.
        executors = 1 if master.startswith("local") else (found - 1 if found else None)
        try:
            cores = int(sc.defaultParallelism)
        except Exception:  # noqa: BLE001 - only a figure to show
            cores = None
    store = None
    if not storage.is_local(work):
        parsed = urlsplit(work.rstrip("/"))
        store = f"{parsed.scheme}://{parsed.netloc.rpartition('@')[2]}{parsed.path.rpartition('/')[0]}"
    where = "in this process" if sc is None else f"on {master}"
    spread = f" in {executors} executor(s)" if executors else ""
    message = (f"training {where}: {world} {engine} worker(s){spread}"
               f"{f' ({cores} cores)' if cores else ''}; storage {store or 'local folder'}")
    reporter.info(message, resources={"master": master, "workers": world, "engine": engine,
                                      "executors": executors, "cores": cores, "storage": store})


# Horovod sets the variables it is given over each worker's own environment. These belong to the
# host (its home, temp folder, Spark address) or are credentials: a worker on another host keeps
# its own, and finds its storage keys on its own node, never through the driver.
_HOST_ENV = ("HOME", "TMPDIR", "TMP", "TEMP", "PWD", "OLDPWD", "HOSTNAME", "SPARK_LOCAL_IP",
             "SPARK_LOCAL_DIRS", "SPARK_PUBLIC_DNS", "RS_RIG_HOST", "AWS_ACCESS_KEY_ID",
             "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN",
             "AWS_SHARED_CREDENTIALS_FILE", "AWS_CONFIG_FILE", "AWS_PROFILE", "KRB5CCNAME",
             "HADOOP_TOKEN_FILE_LOCATION", "HADOOP_CONF_DIR", "HADOOP_HOME", "YARN_CONF_DIR")


def _worker_env() -> dict[str, str]:
    """The driver's environment as the Horovod workers get it: without :data:`_HOST_ENV`."""
    return {k: v for k, v in os.environ.items() if k not in _HOST_ENV}


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [""])[0][:300]


# -- driver-side checks ------------------------------------------------------------------------------

def _read_init_model(location: str, bands: list[str]) -> InitModel:
    """The model folder ``location`` that fine-tuning starts from, checked the way predict
    checks a model (a confined ``.keras`` file of built-in layers), with its file's sha256."""
    from rs_cluster.keras_file import check_model_file, confined_model_file

    # What the card and the workers get: a built-in model by its name (each worker finds its own
    # copy), a folder as an absolute path, a URL as it is.
    named = builtin.name_of(location)
    ref = f"{builtin.PREFIX}:{named}" if named else \
        str(Path(location).absolute()) if storage.is_local(location) else location
    location = builtin.resolve(location)
    card_url = storage.join(location, MODEL_JSON)
    if not storage.is_file(card_url):
        raise ConfigError(f"{card_url}: not found; --init-model takes a model folder written by "
                          "'rs-cluster train' (model.json and model.keras)")
    try:
        card = storage.read_json(card_url)
    except ValueError as e:
        raise ConfigError(f"{card_url}: not valid JSON ({e})") from None
    if not isinstance(card, dict) or card.get("format") != MODEL_FORMAT:
        raise ConfigError(f"{card_url}: not an rs-cluster model card (format should be "
                          f"{MODEL_FORMAT!r}); --init-model takes a model written by rs-cluster train")
    arch = card.get("arch", archs.LEGACY_ARCH)  # cards before networks were a choice: 2019's
    if not isinstance(arch, str) or arch not in archs.ARCHS:
        raise ConfigError(f"{card_url}: network {arch!r} is not one this rs-cluster builds "
                          f"({', '.join(archs.ARCHS)}); fine-tuning needs the same network")
    base_filters, tile_size = card.get("base_filters"), card.get("tile_size")
    if not isinstance(base_filters, int) or not isinstance(tile_size, int):
        raise ConfigError(f"{card_url}: 'base_filters' and 'tile_size' must be whole numbers")
    if list(card.get("bands", BANDS)) != bands:
        raise InputError(f"{card_url}: the init model takes bands {card.get('bands')}, the dataset "
                         f"has {bands}; fine-tune on tiles of the same bands")
    with storage.local_input(location) as folder:
        path = confined_model_file(folder, card.get("model_file"), card_url)
        check_model_file(path)  # the worker loads it in Keras's safe mode, as predict does
        with open(path, "rb") as f:
            digest = hashlib.sha256(f.read()).hexdigest()
    return InitModel(location=ref, model_file=os.path.basename(path), model_sha256=digest,
                     arch=arch, base_filters=base_filters, bands=tuple(bands),
                     tile_size=tile_size, dataset=(card.get("dataset") or {}).get("path"))


def _choose_arch(cfg: TrainConfig, init: InitModel | None) -> tuple[str, str | None]:
    """The network to train and, when it is the fallback, why. Fine-tuning keeps the init
    model's network; without --arch, the default falls back to the BN U-Net where its ImageNet
    weights are not installed, while an explicit --arch effnet_lite0_unet fails instead."""
    if init is not None:
        if cfg.arch is not None and cfg.arch != init.arch:
            raise ArchMismatchError(
                f"{cfg.init_model}: is a {init.arch} model, this run asks for --arch {cfg.arch}; "
                f"fine-tuning starts from the init model's weights, which fit only its own network: "
                f"leave out --arch (or pass --arch {init.arch}), or train {cfg.arch} without "
                "--init-model")
        return init.arch, None
    requested = cfg.arch or archs.DEFAULT_ARCH
    if archs.get_arch(requested).encoder is None:
        return requested, None
    from rs_cluster import model  # imports TensorFlow, only for a network with a pretrained encoder

    return model.resolve_arch(requested, fallback=cfg.arch is None)


def _base_filters(cfg: TrainConfig, init: InitModel | None) -> int:
    if init is None:
        return cfg.base_filters or DEFAULT_BASE_FILTERS
    if cfg.base_filters is not None and cfg.base_filters != init.base_filters:
        raise ArchMismatchError(f"{cfg.init_model}: has {init.base_filters} base filters, this run "
                                f"asks for {cfg.base_filters}; fine-tuning keeps the init model's "
                                "width: leave out --base-filters")
    return init.base_filters


def _check_tiles(info: DatasetInfo, cfg: TrainConfig, arch: str, bands: int) -> int:
    """The tile size the model is built for, after checking the dataset can feed it."""
    tile = info.tile_size
    if cfg.tile_size is not None and cfg.tile_size != tile:
        raise InputError(f"{cfg.data}: has {tile} px tiles but the model is for {cfg.tile_size} px "
                         "tiles; prepare the data with --tile-size "
                         f"{cfg.tile_size} or train for {tile} px")
    problem = archs.tile_problem(arch, tile, bands)
    if problem:
        raise InputError(f"{cfg.data}: its {tile} px tiles of {bands} band(s) do not fit: {problem}")
    from rs_cluster.dataset import read_schema

    for split in ("train", "val"):
        if info.split_tiles(split) == 0:
            continue
        try:
            shape = read_schema(info.split_url(split)).fields["image"].shape
        except Exception as e:
            raise InputError(f"{info.split_url(split)}: not a readable Petastorm tile dataset "
                             f"({type(e).__name__}: {e})") from None
        if tuple(shape[:2]) != (tile, tile):
            raise InputError(f"{info.split_url(split)}: holds {shape[0]}x{shape[1]} px tiles but "
                             f"dataset.json says {tile} px; prepare the dataset again")
    return tile


def _check_splits(info: DatasetInfo) -> tuple[int, int]:
    counts = {s: info.split_tiles(s) for s in ("train", "val")}
    for split, n in counts.items():
        if n == 0:
            raise InputError(f"{info.url}: the '{split}' split has no tiles; training needs both "
                             "train and val tiles (prepare with more rasters or another --split)")
    return counts["train"], counts["val"]


def _claim_model_dir(cfg: TrainConfig, final: str, work: str, fingerprint: dict[str, Any],
                     reporter: Reporter) -> dict[str, Any] | None:
    """Decides what to do with an existing model folder or unfinished run.

    Returns the state of the run to resume, or None to train from epoch 1.
    """
    has_model = storage.is_file(storage.join(final, MODEL_JSON))
    nonempty = storage.is_dir(final) and storage.is_nonempty_dir(final)
    if storage.exists(final) and not storage.is_dir(final):
        raise OutputExistsError(f"{cfg.model_dir}: exists and is not a folder")
    if cfg.overwrite:
        _remove(work)  # the old model stays until the new one is complete
        return None
    state = _read_state(work)
    if state is not None:
        done = state["epochs_done"]
        if not cfg.resume:
            raise OutputExistsError(f"{cfg.model_dir}: an unfinished training run is waiting in {work} "
                                    f"(checkpoint after epoch {done}); pass --resume to continue it or "
                                    "--overwrite to start over")
        if nonempty:
            raise OutputExistsError(f"{cfg.model_dir}: is not empty, so the resumed run could not be "
                                    "written there; move it away or pass --overwrite")
        old = state.get("fingerprint", {})
        for key in FINGERPRINT_KEYS:
            was = old.get(key, _FINGERPRINT_BEFORE.get(key))
            if was != fingerprint[key]:
                raise ConfigError(f"{cfg.model_dir}: cannot resume: the checkpoint was trained with "
                                  f"{key}={was!r}, this run asks for {fingerprint[key]!r}; "
                                  "use the same settings, or --overwrite to start over")
        return state
    if nonempty:
        if has_model:
            raise OutputExistsError(f"{cfg.model_dir}: already holds a trained model; pass "
                                    "--overwrite to replace it (or --resume to keep it)")
        raise OutputExistsError(f"{cfg.model_dir}: exists, is not empty and holds no rs-cluster "
                                "model; choose another folder or pass --overwrite")
    # A run that died before its first checkpoint left nothing worth keeping.
    _remove(work)
    if cfg.resume:
        reporter.info(f"{cfg.model_dir}: no checkpoint to resume from; training from epoch 1")
    return None


def _spark_slots(sc: Any) -> int:
    """How many tasks Spark can run at once now (what barrier mode checks), else its parallelism."""
    try:
        jsc = sc._jsc.sc()
        return int(jsc.maxNumConcurrentTasks(jsc.resourceProfileManager().defaultResourceProfile()))
    except Exception:  # the private API moved: the public, rougher figure
        return int(sc.defaultParallelism)


def _executors(sc: Any) -> set[str]:
    """``host:port`` of every executor registered now (and the driver's); empty if unknown."""
    try:
        return {f"{i.host()}:{i.port()}" for i in sc._jsc.sc().statusTracker().getExecutorInfos()}
    except Exception:  # noqa: BLE001 - the private API moved: no executor-loss detection
        return set()


def _lost_executors(sc: Any, before: set[str], wait_s: float = 10.0) -> str | None:
    """Which executors of ``before`` went away (their node or container lost), waiting up to
    ``wait_s`` for the driver to notice; None when all are still there."""
    deadline = time.monotonic() + wait_s
    while True:
        gone = before - _executors(sc) if before else set()
        if gone or time.monotonic() >= deadline:
            break
        time.sleep(1)
    if not gone:
        return None
    hosts = ", ".join(sorted({g.rsplit(":", 1)[0] for g in gone}))
    return f"the Spark executor(s) on {hosts} were lost (node or container gone)"


def _yarn_executors(cfg: TrainConfig, world: int) -> dict[str, str]:
    """On YARN, one executor per Horovod worker unless the settings or the job say how many:
    YARN starts two by default, and nothing asks it for more."""
    from rs_cluster.settings import effective_spark

    effective = effective_spark(cfg.master, cfg.resources)
    conf = effective.resources.spark_conf()
    if effective.master != "yarn" or "spark.executor.instances" in conf or \
            conf.get("spark.dynamicAllocation.enabled") == "true":
        return {}
    cores = int(conf.get("spark.executor.cores", "1"))
    return {"spark.executor.instances": str(-(-world // cores))}


def _wait_for_slots(sc: Any, wanted: int, wait_s: float) -> None:
    """Fails fast, instead of waiting forever, when Spark cannot run ``wanted`` tasks at once."""
    deadline = time.monotonic() + wait_s
    slots = _spark_slots(sc)
    while slots < wanted and time.monotonic() < deadline:
        time.sleep(1)  # executors of a standalone or YARN master register after the context starts
        slots = _spark_slots(sc)
    if slots < wanted:
        raise ClusterError(f"--num-proc {wanted} needs {wanted} task slots at once but Spark master "
                           f"{sc.master} offers {slots}; lower --num-proc or add executor cores")


def _nics(cfg: TrainConfig, master: str) -> list[str] | None:
    if cfg.nics:
        return list(cfg.nics)
    if os.environ.get(ENV_NICS):
        return [n.strip() for n in os.environ[ENV_NICS].split(",") if n.strip()]
    if master.startswith("local") or "127.0.0.1" in master or "localhost" in master:
        return ["lo"]  # all workers on this host: Horovod must not probe other interfaces
    return None


class _TailStream:
    """Forwards worker output to ``stream`` and keeps its last lines for the error message."""

    def __init__(self, stream: IO[str], keep: int = 40) -> None:
        self._stream = stream
        self._lines: collections.deque[str] = collections.deque(maxlen=keep)
        # Short lines that say a worker died (a shell's "Killed"), kept whatever follows them:
        # a dying worker's peers print tracebacks of many lines after it.
        self.deaths: list[str] = []

    def write(self, text: str) -> int:
        lines = [line for line in text.splitlines() if line.strip()]
        self._lines.extend(lines)
        self.deaths.extend(line for line in lines if line.rstrip().endswith(("Killed", "Terminated"))
                           and len(self.deaths) < 16)
        return self._stream.write(text)

    def flush(self) -> None:
        self._stream.flush()

    def last_error(self) -> str:
        for line in reversed(self._lines):
            if "Error" in line or "error" in line:
                return line.strip()[:400]
        return ""


class _EventRelay:
    """Driver side: reads rank 0's events file as it grows and passes the events to the reporter.

    A preview event is passed on once its PNG is copied from the work folder into ``previews``
    (it then names the copy); without ``previews``, or when the copy fails, it is dropped.
    """

    def __init__(self, location: str, reporter: Reporter, total: int, work: str = "",
                 previews: Path | None = None) -> None:
        self._work, self._previews = work, previews
        # Rank 0 appends to a local file, or re-uploads the whole (small) file to a store.
        local = storage.local_path(location)
        self._path = Path(local) if local is not None else None
        self._url = location
        self._reporter = reporter
        self._total = total
        self._offset = len(self._read(0))

    def _read(self, offset: int) -> bytes:
        if self._path is not None:
            if not self._path.exists():
                return b""
            with open(self._path, "rb") as f:
                f.seek(offset)
                return f.read()
        try:
            return storage.read_bytes(self._url)[offset:] if storage.exists(self._url) else b""
        except StorageError:
            return b""  # a store that hiccups between two polls: the next poll catches up

    def poll(self) -> None:
        data = self._read(self._offset)
        if not data:
            return
        end = data.rfind(b"\n") + 1
        self._offset += end
        for line in data[:end].decode("utf-8").splitlines():
            try:
                event = json.loads(line)
            except ValueError:
                continue
            kind = event.pop("event", None)
            if kind == "progress":
                self._reporter.progress(event.pop("done"), self._total, event.pop("message", ""), **event)
            elif kind == "metrics":
                self._reporter.metrics(**event)
            elif kind == "info" and "preview" in event:
                shown = (copy_preview(self._work, event.pop("preview"), self._previews)
                         if self._previews is not None else None)
                if shown is not None:
                    self._reporter.info(event.pop("message", ""), preview=shown, **event)
            elif kind == "info":
                self._reporter.info(event.pop("message", ""), **event)


# -- outputs ----------------------------------------------------------------------------------------

def _locations(model_dir: str) -> tuple[str, str]:
    """(model folder, work folder ``.<name>.training`` beside it): absolute paths for local
    folders, as before, else URLs."""
    if storage.is_local(model_dir):
        final = Path(storage.local_path(model_dir) or model_dir).absolute()
        return str(final), str(final.parent / f".{final.name}.training")
    final_url = model_dir.rstrip("/")
    return final_url, storage.sibling(final_url, f".{storage.basename(final_url)}.training")


def _read_state(work: str | Path) -> dict[str, Any] | None:
    path = storage.join(str(work), STATE_FILE)
    if not storage.is_file(path):
        return None
    return storage.read_json(path)


def _write_json(location: str, data: Any) -> None:
    if storage.is_local(location):
        write_json_atomic(storage.local_path(location) or location, data)
    else:
        storage.write_json(location, data)


def _remove(location: str) -> None:
    local = storage.local_path(location)
    if local is not None:
        shutil.rmtree(local, ignore_errors=True)
    else:
        with contextlib.suppress(StorageError):
            storage.delete_dir(location)


def _commit(staged: str, final: str, overwrite: bool) -> None:
    """Renames the staged model folder into place, replacing an old one only when allowed."""
    if storage.is_nonempty_dir(final) and not overwrite:
        raise OutputExistsError(f"{final}: appeared while this run was training; left it untouched "
                                f"(the new model is in {staged})")
    local_staged, local_final = storage.local_path(staged), storage.local_path(final)
    if local_staged is not None and local_final is not None:
        replace_dir(local_staged, local_final)  # the old model goes only once the new is in place
    else:
        storage.replace_dir(staged, final, commit_file=MODEL_JSON)


def _model_card(info: DatasetInfo, cfg: TrainConfig, spec: dict[str, Any], state: dict[str, Any],
                workers: list[dict[str, Any]], wall: float, resumed_from: int,
                restarts: list[int], network: dict[str, Any] | None,
                init: InitModel | None) -> dict[str, Any]:
    meta = info.meta
    return {
        "format": MODEL_FORMAT,
        "format_version": MODEL_FORMAT_VERSION,
        "model_file": MODEL_FILE,
        "architecture": "unet",  # every network is a U-Net; "arch" says which
        "arch": spec["arch"],
        "network": network,  # rs_cluster.model.arch_info: encoder, its weights' sha256, size
        "init_model": init.to_card() if init else None,
        "tile_size": spec["tile_size"],
        # Ground metres per pixel of the training tiles (prepare --gsd); None: not known.
        # Predict resamples georeferenced input to it.
        "gsd_m": meta.get("gsd_m"),
        "bands": list(meta.get("bands", BANDS)),
        # Every network takes [0, 1]; the pretrained encoder normalises further inside the model.
        "input_scaling": {"method": "divide", "value": INPUT_SCALE},
        "threshold": THRESHOLD,
        "base_filters": spec["base_filters"],
        "output": "sigmoid building probability",
        "dataset": {
            "path": info.url,
            "tile_size": info.tile_size,
            "stride": meta.get("stride"),
            "created": meta.get("created"),
            "splits": {s: {k: v for k, v in m.items() if k in ("tiles", "rasters", "building_fraction")}
                       for s, m in meta.get("splits", {}).items()},
        },
        "epochs": state["history"],
        "best_epoch": state["best_epoch"],
        "world_size": cfg.num_proc,
        "wall_time_s": round(wall, 3),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "rs_cluster_version": __version__,
        "loss": "binary_crossentropy + dice" if cfg.uses_dice else "binary_crossentropy",
        # The model is the epoch of the best val IoU, which early stopping watches too.
        "best_by": "val_iou",
        "metrics_file": METRICS_FILE,
        "logs_dir": LOGS_DIR,
        "engine": cfg.engine,
        "devices": sorted({str(w.get("device")) for w in workers}),
        "training": {
            "epochs_requested": cfg.epochs, "epochs_run": len(state["history"]),
            "stopped_early": bool(state.get("stopped")), "patience": cfg.patience,
            "stopped_by": state.get("stopped_by"), "time_limit_min": cfg.time_limit_min,
            "min_delta": cfg.min_delta,
            "batch_size_per_worker": cfg.batch_size, "lr": cfg.lr, "lr_scaled": cfg.lr * cfg.num_proc,
            "warmup_epochs": _warmup_epochs(spec, cfg.num_proc), "seed": cfg.seed,
            "lr_schedule": cfg.lr_schedule,
            "steps_per_epoch": spec["steps_per_epoch"],
            "validation_steps": spec["validation_steps"] or "whole val split",
            "augmentation": list(archs.AUGMENTATION) if cfg.augment else [],
            "resumed_from_epoch": resumed_from or None,
            "restarts_after_lost_worker": restarts,  # epochs done at each restart
        },
    }


def _warmup_epochs(spec: dict[str, Any], world: int) -> int:
    """Epochs of the engine's LR warm-up: only a larger world scales the LR up, so one worker
    starts at its peak."""
    return min(spec["warmup_epochs"], spec["epochs"]) if world > 1 else 0


def cosine_lr(peak: float, step: int, total_steps: int, warmup_steps: int) -> float | None:
    """The LR of global ``step`` (0-based) under the cosine schedule: None during the warm-up
    (the engine sets it then), then ``peak`` falling along half a cosine to 0 after the last
    step."""
    if step < warmup_steps:
        return None
    t = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return peak * 0.5 * (1.0 + math.cos(math.pi * min(1.0, t)))


def _best_iou(card: dict[str, Any]) -> float | None:
    """The best epoch's val IoU from a model card written before cards had "quality"."""
    best, epochs = card.get("best_epoch"), card.get("epochs")
    if isinstance(best, int) and isinstance(epochs, list) and 0 < best <= len(epochs) and \
            isinstance(epochs[best - 1], dict):
        value = epochs[best - 1].get("val_iou")
        return float(value) if isinstance(value, (int, float)) else None
    return None


def _result_from_card(final: str) -> TrainResult:
    card = storage.read_json(storage.join(final, MODEL_JSON))
    return TrainResult(model_dir=str(final), epochs=card["epochs"], best_epoch=card["best_epoch"],
                       stopped_early=bool(card.get("training", {}).get("stopped_early")),
                       world_size=card["world_size"], wall_time_s=card["wall_time_s"],
                       quality=card.get("quality") if isinstance(card.get("quality"), dict) else {})


# -- worker side ------------------------------------------------------------------------------------

class _EventLog:
    """Rank 0's events, one JSON object a line, appended and flushed at once. With ``upload_to``
    (the work folder is in a store) the file is uploaded whole at most every
    ``UPLOAD_EVERY_S`` and on close: the driver, on another host, reads it there."""

    UPLOAD_EVERY_S = 1.0

    def __init__(self, path: Path | None, upload_to: str | None = None) -> None:
        self._stream = open(path, "a", encoding="utf-8") if path else None  # noqa: SIM115
        self._path, self._url = path, upload_to
        self._uploaded = 0.0

    def write(self, **event: Any) -> None:
        if self._stream is not None:
            self._stream.write(json.dumps(event, default=float) + "\n")
            self._stream.flush()
            if self._url and time.monotonic() - self._uploaded >= self.UPLOAD_EVERY_S:
                self._upload()

    def _upload(self) -> None:
        assert self._path is not None and self._url is not None
        try:
            storage.upload(str(self._path), self._url)
        except StorageError:
            pass  # only progress: the next upload carries these events too
        self._uploaded = time.monotonic()

    def close(self) -> None:
        if self._stream is not None:
            self._stream.close()
            if self._url:
                self._upload()


class _WorkMirror:
    """A worker's view of the run's work folder: the folder itself when it is local (a disk or a
    shared mount), else a private copy in this host's $TMPDIR, downloaded by rank 0 when a run
    resumes and uploaded by :meth:`sync` after each epoch: new and changed files first,
    ``state.json`` (which names the checkpoint) after them, files gone locally deleted last."""

    def __init__(self, url: str, chief: bool) -> None:
        local = storage.local_path(url)
        self.url = url
        self.remote = local is None
        self._synced: dict[str, tuple[int, int]] = {}
        if local is not None:
            self.path = Path(local)
            return
        self.path = Path(storage.temp_dir())
        if chief and storage.is_dir(url):
            storage.download_to(url, str(self.path))
            self._synced = self._files()

    @property
    def events_url(self) -> str | None:
        return storage.join(self.url, EVENTS_FILE) if self.remote else None

    def _files(self) -> dict[str, tuple[int, int]]:
        out = {}
        for p in self.path.rglob("*"):
            rel = p.relative_to(self.path).as_posix()
            if p.is_file() and rel != EVENTS_FILE:  # the event log uploads itself
                st = p.stat()
                out[rel] = (st.st_size, st.st_mtime_ns)
        return out

    def sync(self) -> None:
        if not self.remote:
            return
        files = self._files()
        for rel in sorted(files, key=lambda r: (r == STATE_FILE, r)):
            if self._synced.get(rel) != files[rel]:
                storage.upload(str(self.path / rel), storage.join(self.url, rel))
        for rel in sorted(set(self._synced) - set(files)):
            storage.delete_file(storage.join(self.url, rel))
        self._synced = files

    def close(self) -> None:
        if self.remote:
            shutil.rmtree(self.path, ignore_errors=True)


def _open_reader(url: str, rank: int, size: int, seed: int, shuffle: bool, log: _EventLog,
                 split: str, endless: bool = True) -> tuple[Any, tuple[int, int] | None]:
    """A reader of this worker's shard (by row group, else by row index).

    An ``endless`` reader repeats the split for ever (training takes a fixed number of steps per
    epoch); otherwise it makes one pass and starts again each time its dataset is iterated anew.
    """
    from petastorm.errors import NoDataAvailableError

    from rs_cluster.dataset import make_tile_reader

    common = {"num_epochs": None if endless else 1, "seed": seed, "fields": ["image", "mask"],
              "shuffle_row_groups": shuffle}
    if size == 1:
        return make_tile_reader(url, **common), None
    try:
        return make_tile_reader(url, cur_shard=rank, shard_count=size, **common), None
    except NoDataAvailableError:
        log.write(event="info", message=f"the {split} split has fewer Parquet row groups than the "
                  f"{size} workers: each worker reads all of it and keeps every {size}th tile")
        # One reader thread keeps the row order the same on every worker, so the shards partition it.
        return make_tile_reader(url, reader_pool_type="dummy", **common), (rank, size)


def train_worker(spec: dict[str, Any]) -> dict[str, Any]:
    """One training worker; returns its rank, pid, device and a digest of its final weights."""
    from rs_cluster.engine import get_engine

    engine = get_engine(spec["engine"])
    device = engine.init(spec["threads"])
    rank, size = engine.rank(), engine.size()
    chief = rank == 0  # rank 0 alone writes checkpoints, logs and the model
    mirror = _WorkMirror(spec["work"], chief)
    try:
        return _train_worker(spec, engine, device, rank, size, chief, mirror)
    finally:
        mirror.close()


def _train_worker(spec: dict[str, Any], engine: Any, device: str, rank: int, size: int,
                  chief: bool, mirror: _WorkMirror) -> dict[str, Any]:
    work = mirror.path
    log = _EventLog(work / EVENTS_FILE if chief else None, mirror.events_url if chief else None)
    log.write(event="info", message=f"{size} worker(s) up; rank 0 on {device}")

    import tensorflow as tf

    from rs_cluster import model as unet

    tf.get_logger().setLevel("ERROR")  # per-batch timing advice about the first (broadcast) step
    # Re-reading the val split every epoch is what we want, not what petastorm warns about.
    warnings.filterwarnings("ignore", category=UserWarning, module=r"petastorm\.tf_utils")

    staged = work / STAGED_MODEL
    state = _read_state(work) if chief else None
    state = engine.broadcast_object(state)  # every worker starts at the epoch rank 0 resumes from
    tf.keras.utils.set_random_seed(spec["seed"])

    lr = spec["lr"] * size  # larger global batch, larger steps (warmed up, see engine.callbacks)
    # Only rank 0 of a fresh run reads the starting weights (ImageNet's, or the init model's):
    # the engine's start-of-training broadcast gives every other worker rank 0's.
    fresh = chief and state is None
    with engine.scope():
        net = unet.build_model(spec["arch"], spec["tile_size"], spec["bands"],
                               base_filters=spec["base_filters"],
                               load_pretrained=fresh and spec["init_model"] is None).model
        if fresh and spec["init_model"] is not None:
            _start_from(net, spec)
            log.write(event="info", message=f"starting from the weights of {spec['init_model']}")
        optimizer = engine.wrap_optimizer(tf.keras.optimizers.Adam(lr))
        net.compile(optimizer=optimizer, loss=unet.make_loss(spec["dice"]), metrics=unet.make_metrics())
    checkpoint = tf.train.Checkpoint(model=net, optimizer=optimizer)
    if state is not None:
        # Every worker builds its optimizer now, as rank 0 must to restore into it: the start-of-
        # training broadcast of rank 0's variables needs the same variables on every worker.
        optimizer.build(net.trainable_variables)
        if chief:
            checkpoint.restore(str(work / state["checkpoint"])).assert_existing_objects_matched()
        optimizer.learning_rate.assign(lr)  # the world size may differ from the interrupted run's

    readers = []
    try:
        train_reader, train_shard = _open_reader(spec["train_url"], rank, size, spec["seed"], True, log, "train")
        readers.append(train_reader)
        # The whole val shard every epoch, the same tiles each time, unless the steps are capped.
        val_reader, val_shard = _open_reader(spec["val_url"], rank, size, spec["seed"], False, log,
                                             "val", endless=spec["validation_steps"] is not None)
        readers.append(val_reader)
        train_ds = unet.tile_batches(train_reader, spec["batch_size"], shard=train_shard, train=True,
                                     augment_tiles=spec["augment"], seed=spec["seed"] + rank)
        val_ds = unet.tile_batches(val_reader, spec["batch_size"], shard=val_shard)

        tiles = _fixed_tiles(spec["val_url"], log) if chief else None
        keeper = _EpochKeeper(engine, chief, state, checkpoint, work, spec, size, log,
                              sync=mirror.sync, tiles=tiles)
        callbacks = engine.callbacks(initial_lr=lr, warmup_epochs=spec["warmup_epochs"],
                                     steps_per_epoch=spec["steps_per_epoch"])
        if spec["lr_schedule"] == "cosine":
            # Every worker sets the same LR from the step count: nothing to broadcast.
            callbacks.append(_CosineSchedule(lr, spec["epochs"], spec["steps_per_epoch"],
                                             _warmup_epochs(spec, size)))
        callbacks.append(keeper)  # after the engine's: it needs the averaged metrics
        if chief:
            callbacks.append(tf.keras.callbacks.TensorBoard(str(staged / LOGS_DIR), write_graph=False,
                                                            profile_batch=0))
        initial_epoch = int(state["epochs_done"]) if state else 0
        if initial_epoch < spec["epochs"] and not (state or {}).get("stopped"):
            net.fit(train_ds, epochs=spec["epochs"], initial_epoch=initial_epoch,
                    steps_per_epoch=spec["steps_per_epoch"], validation_data=val_ds,
                    validation_steps=spec["validation_steps"], callbacks=callbacks, verbose=0)
    finally:
        for reader in readers:
            reader.stop()
            reader.join()
    digest = unet.weights_digest(net)
    if chief:
        # Uncompiled, so it loads anywhere; its weights are set from the best epoch just below.
        final = unet.build_model(spec["arch"], spec["tile_size"], spec["bands"],
                                 base_filters=spec["base_filters"], load_pretrained=False).model
        best = keeper.best_weights_path()
        if best is not None:
            final.load_weights(str(best))
        else:
            final.set_weights(net.get_weights())
        staged.mkdir(parents=True, exist_ok=True)
        final.save(str(staged / MODEL_FILE))
        mirror.sync()
        best_iou = keeper.best_val if math.isfinite(keeper.best_val) else None
        quality = _assess(tiles, final, best_iou, log)
    log.close()
    result = {"rank": rank, "pid": os.getpid(), "device": device, "weights_sha256": digest}
    if chief:
        result["network"] = unet.arch_info(unet.BuiltModel(
            final, spec["arch"], spec["requested_arch"], spec["fallback_reason"]))
        if quality is not None:
            result["quality"] = quality
    return result


def _fixed_tiles(url: str, log: _EventLog) -> FixedTiles | None:
    """Rank 0's fixed val tiles for previews and the verdict; None (and a note) when they cannot
    be read: a run is not failed for what only illustrates it."""
    try:
        return FixedTiles.read(url)
    except Exception as e:  # noqa: BLE001 - see above; the training readers report real trouble
        log.write(event="info", message=f"no previews or tile check: reading validation tiles "
                  f"from {url} failed ({type(e).__name__}: {_first_line(e)})")
        return None


def _assess(tiles: FixedTiles | None, model: Any, best_iou: float | None,
            log: _EventLog) -> dict[str, Any] | None:
    """The verdict on the final model from the fixed tiles; None (the driver then judges by val
    IoU alone) without tiles or when predicting them fails."""
    if tiles is None:
        return None
    try:
        return tiles.assess(model, best_iou)
    except Exception as e:  # noqa: BLE001 - the model is trained and saved: judge it by IoU alone
        log.write(event="info", message=f"checking the model on validation tiles failed "
                  f"({type(e).__name__}: {_first_line(e)})")
        return None


def _start_from(net: Any, spec: dict[str, Any]) -> None:
    """Sets ``net``'s weights to the init model's, layer by layer: the same network, so the
    same layers and shapes whatever its tile size (both are fully convolutional)."""
    from rs_cluster.keras_file import load_model

    with storage.local_input(builtin.resolve(spec["init_model"])) as folder:
        path = os.path.join(folder, spec["init_model_file"])
        with open(path, "rb") as f:
            digest = hashlib.sha256(f.read()).hexdigest()
        if digest != spec["init_sha256"]:
            raise ConfigError(f"{spec['init_model']}: {spec['init_model_file']} changed after the "
                              f"run started (sha256 {digest}, was {spec['init_sha256']}); start "
                              "again")
        source = load_model(path)  # checked again: .keras, built-in layers, safe mode
    theirs = {layer.name: layer for layer in source.layers}
    for layer in net.layers:
        if not layer.weights:
            continue
        other = theirs.get(layer.name)
        shapes = [tuple(w.shape) for w in layer.weights]
        if other is None or [tuple(w.shape) for w in other.weights] != shapes:
            raise ArchMismatchError(f"{spec['init_model']}: its layer {layer.name!r} does not fit "
                                    f"{spec['arch']} with {spec['base_filters']} base filters; "
                                    "it is not the network its model.json says")
        layer.set_weights(other.get_weights())


def _make_epoch_keeper() -> type:
    import tensorflow as tf

    class EpochKeeper(tf.keras.callbacks.Callback):
        """Per-epoch bookkeeping on every worker; rank 0 also checkpoints and reports.

        The best epoch, the one whose weights become the model, is the one of the highest val
        IoU: what the analyst gets judged by, where val loss (BCE, plus Dice) may keep falling on
        confident background while the buildings get worse. Early stopping watches the same
        figure; it is decided by rank 0 and broadcast, so all workers stop at the same epoch (a
        worker that stopped alone would leave the others waiting in allreduce).
        """

        def __init__(self, engine: Any, chief: bool, state: dict[str, Any] | None, checkpoint: Any,
                     work: Path, spec: dict[str, Any], size: int, log: _EventLog,
                     sync: Any = None, tiles: FixedTiles | None = None) -> None:
            super().__init__()
            self.tiles = tiles  # rank 0's fixed val tiles, drawn into previews
            self.sync = sync  # puts what rank 0 wrote into the work folder's store, if any
            self.engine, self.chief, self.work, self.spec, self.size, self.log = (
                engine, chief, work, spec, size, log)
            state = state or {}
            self.history: list[dict[str, Any]] = list(state.get("history", []))
            self.best_val = float(state.get("best_val_iou", -math.inf))
            self.best_epoch = int(state.get("best_epoch", 0))
            self.best_file: str | None = state.get("best_weights")
            self.wait = int(state.get("wait", 0))
            self.prior_wall = float(state.get("wall_time_s", 0.0))
            self.started = time.monotonic()
            self.manager = (tf.train.CheckpointManager(checkpoint, str(work / CHECKPOINT_DIR),
                                                       max_to_keep=2) if chief else None)
            self._epoch = 0
            self._t0 = self._train_end = 0.0
            self._last_progress = 0.0

        def best_weights_path(self) -> Path | None:
            return self.work / self.best_file if self.best_file else None

        def on_epoch_begin(self, epoch: int, logs: Any = None) -> None:
            self._epoch = epoch
            self._t0 = time.monotonic()
            self._train_end = 0.0

        def on_test_begin(self, logs: Any = None) -> None:
            if not self._train_end:
                self._train_end = time.monotonic()

        def on_train_batch_end(self, batch: int, logs: Any = None) -> None:
            now = time.monotonic()
            if not self.chief or (now - self._last_progress < 0.5 and batch + 1 < self.spec["steps_per_epoch"]):
                return
            self._last_progress = now
            steps, epochs = self.spec["steps_per_epoch"], self.spec["epochs"]
            self.log.write(event="progress", done=self._epoch * steps + batch + 1,
                           message=f"epoch {self._epoch + 1}/{epochs} step {batch + 1}/{steps}",
                           epoch=self._epoch + 1, step=batch + 1)

        def on_epoch_end(self, epoch: int, logs: Any = None) -> None:
            logs = logs or {}
            now = time.monotonic()
            train_s = (self._train_end or now) - self._t0
            images = self.spec["steps_per_epoch"] * self.spec["batch_size"] * self.size
            row = {"epoch": epoch + 1, **{k: float(logs[k]) for k in EPOCH_KEYS if k in logs},
                   "lr": float(tf.keras.backend.get_value(self.model.optimizer.learning_rate)),
                   "seconds": round(now - self._t0, 3), "train_seconds": round(train_s, 3),
                   "images_per_s": round(images / train_s, 2) if train_s > 0 else None}
            val_iou = row.get("val_iou", math.nan)
            improved = math.isfinite(val_iou) and val_iou > self.best_val + self.spec["min_delta"]
            old_best = self.best_file
            if improved:
                self.best_val, self.best_epoch, self.wait = val_iou, epoch + 1, 0
                self.best_file = f"best-{epoch + 1}.weights.h5"
                if self.chief:
                    self.model.save_weights(str(self.work / self.best_file))
            else:
                self.wait += 1
            patience, limit = self.spec["patience"], self.spec.get("time_limit_s")
            out_of_time = bool(limit) and self.prior_wall + now - self.started >= limit
            stop_by = "patience" if patience > 0 and self.wait >= patience else \
                "time limit" if out_of_time else None
            stop_by = self.engine.broadcast_object(stop_by)  # rank 0's clock decides for all
            stop = stop_by is not None
            row.update(epochs=self.spec["epochs"], best_epoch=self.best_epoch or None,
                       best_val_iou=self.best_val if math.isfinite(self.best_val) else None)
            self.history.append(row)
            if self.chief:
                saved = self.manager.save(checkpoint_number=epoch + 1)
                state = {
                    "version": 1, "fingerprint": self.spec["fingerprint"], "epochs_done": epoch + 1,
                    "checkpoint": os.path.relpath(saved, self.work), "history": self.history,
                    "best_epoch": self.best_epoch, "best_val_iou": self.best_val,
                    "best_weights": self.best_file, "wait": self.wait, "stopped": stop,
                    "stopped_by": stop_by,
                    "world_size": self.size,
                    "wall_time_s": round(self.prior_wall + now - self.started, 3),
                }
                write_json_atomic(self.work / STATE_FILE, state)
                if old_best and old_best != self.best_file:
                    (self.work / old_best).unlink(missing_ok=True)
                staged = self.work / STAGED_MODEL
                write_text_atomic(staged / METRICS_FILE,
                                  "".join(json.dumps(r) + "\n" for r in self.history))
                if self.sync is not None:
                    self.sync()
                self.log.write(event="metrics", **row)
                self.log.write(event="progress", done=(epoch + 1) * self.spec["steps_per_epoch"],
                               message=f"epoch {epoch + 1}/{self.spec['epochs']} done"
                               + {"patience": " (early stop)", "time limit": " (time limit)"}.get(
                                   stop_by or "", ""), epoch=epoch + 1,
                               step=self.spec["steps_per_epoch"], checkpoint=True)
                preview = self._preview(epoch + 1, stop)
                if preview is not None:
                    self.log.write(event="info", message=f"preview after epoch {epoch + 1}",
                                   preview=preview, epoch=epoch + 1)
            if stop:
                self.model.stop_training = True

        def _preview(self, epoch: int, stop: bool) -> str | None:
            """Draws this epoch's preview into the work folder when one is due, and puts it in the
            work folder's store before the event naming it is written: the driver copies it."""
            if self.tiles is None or not preview_due(epoch, self.spec.get("preview_every", 0),
                                                     self.spec["epochs"], stop):
                return None
            try:
                name = self.tiles.write_preview(self.model, epoch, self.work)
                if self.sync is not None:
                    self.sync()
                return name
            except Exception as e:  # noqa: BLE001 - a picture is not worth the run
                self.log.write(event="info", message=f"no preview after epoch {epoch} "
                               f"({type(e).__name__}: {_first_line(e)})")
                return None

    return EpochKeeper


def _EpochKeeper(*args: Any, **kwargs: Any) -> Any:  # noqa: N802 - used like the class it builds
    """Builds the callback; its class derives from Keras', so it is made once TensorFlow is imported."""
    return _make_epoch_keeper()(*args, **kwargs)


def _CosineSchedule(peak: float, epochs: int, steps_per_epoch: int,  # noqa: N802
                    warmup_epochs: int) -> Any:
    """A callback setting the LR of every step by :func:`cosine_lr`, from the step count alone,
    so a resumed run goes on where the interrupted one was."""
    import tensorflow as tf

    class CosineSchedule(tf.keras.callbacks.Callback):
        def __init__(self) -> None:
            super().__init__()
            self._epoch = 0

        def on_epoch_begin(self, epoch: int, logs: Any = None) -> None:
            self._epoch = epoch

        def on_train_batch_begin(self, batch: int, logs: Any = None) -> None:
            lr = cosine_lr(peak, self._epoch * steps_per_epoch + batch, epochs * steps_per_epoch,
                           warmup_epochs * steps_per_epoch)
            if lr is not None:
                self.model.optimizer.learning_rate.assign(lr)

    return CosineSchedule()
