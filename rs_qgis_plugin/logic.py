"""The plugin's decisions that need no QGIS: which job a run becomes, which files go up, what
comes back, how a job is remembered. Imports neither ``qgis`` nor Qt, so plain pytest covers it.

The GUI (``dock.py``), the tasks and the Processing algorithms all build their jobs here, so the
three entry points cannot drift apart.
"""

from __future__ import annotations

import json
import os
import re
import time
import unicodedata
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

from rs_qgis_plugin.core.errors import SpecError
from rs_qgis_plugin.core.formats import is_raster, is_sidecar
from rs_qgis_plugin.core.jobspec import BUILTIN_MODEL, JobSpec, JobSpecBuilder
from rs_qgis_plugin.core.protocol import JobStatus
from rs_qgis_plugin.pairing import check_split

SETTINGS_PREFIX = "rs_qgis_plugin/"

MODE_TRAIN = "train"
MODE_PREDICT = "predict"
MODE_TRAIN_PREDICT = "train_predict"
MODE_EVALUATE = "evaluate"
# Trains like MODE_TRAIN, but from the weights of an existing model (rs-cluster train --init-model).
MODE_FINE_TUNE = "fine_tune"
MODES = (MODE_TRAIN, MODE_PREDICT, MODE_TRAIN_PREDICT, MODE_EVALUATE, MODE_FINE_TUNE)
TRAINING_MODES = (MODE_TRAIN, MODE_TRAIN_PREDICT, MODE_FINE_TUNE)
# The modes that start from a model the analyst chooses (the built-in one, a local folder or a
# cluster job).
MODEL_MODES = (MODE_PREDICT, MODE_EVALUATE, MODE_FINE_TUNE)

# The networks `rs-cluster train --arch` builds, and the multiple of which a tile side must be (the
# times it halves the tile); mirrors rs_cluster.archs, which this package cannot import.
ARCH_TILE_MULTIPLE: dict[str, int] = {"effnet_lite0_unet": 32, "unet_bn": 16, "unet2019": 16}
ARCHS = tuple(ARCH_TILE_MULTIPLE)
DEFAULT_ARCH = "effnet_lite0_unet"  # what the cluster builds when none is sent
LEGACY_ARCH = "unet2019"  # what a model card without "arch" was trained as
# The network of the model built into rs-cluster (the job spec's model "builtin"); fine-tuning it
# checks the tile size against this network, as nothing of it is on this computer to read.
BUILTIN_ARCH = "effnet_lite0_unet"
# Fine-tuning moves pretrained weights a little, not from scratch: ten times below the cluster's
# from-scratch default (1e-4), unless the analyst chooses a rate.
FINE_TUNE_LR = 1e-5

# Where things live inside the job folder on the cluster (relative paths, as the spec wants).
IMAGES = "inputs/images"
MASKS = "inputs/masks"
TRAIN_IMAGES = "inputs/train/images"
TRAIN_MASKS = "inputs/train/masks"
MODEL_INPUT = "inputs/model"
DATASET = "outputs/dataset"
MODEL_OUTPUT = "outputs/model"
PREDICTIONS = "outputs/masks"
REPORT = "outputs/report.json"

MASK_SUFFIX = "_mask.tif"
POLYGONS_SUFFIX = "_buildings.gpkg"

# Besides the cluster's states, a record can be "exporting" or "uploading" (before the cluster
# knows the job) or "error" (it never started, or the cluster forgot it).
ACTIVE_REMOTE_STATES = ("queued", "running")
# Raster providers that read from a server (WMS, WMTS and XYZ tiles are "wms"), not a file:
# exported only with a clip, which sets the extent and the resolution.
WEB_PROVIDERS = frozenset({"wms", "wcs", "arcgismapserver"})

# The Spark masters a job may name (spark-submit's --master forms): local, local[N], local[*],
# local[N,M] (M: task retries), spark://host:port (standby masters comma separated), yarn,
# k8s://https://host[:port].
_HOST_PORT = r"[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?:\d{1,5}"
_MASTER = re.compile(r"local(?:\[(?:\d+|\*)(?:,\d+)?\])?"
                     rf"|spark://{_HOST_PORT}(?:,{_HOST_PORT})*"
                     r"|yarn"
                     r"|k8s://https://[A-Za-z0-9.\-\[\]:]+(?:/[^\s]*)?")
# Spark's own size form, as spark.executor.memory takes it: 512m, 2g, 1024 (MiB).
_MEMORY = re.compile(r"\d+[kmgtKMGT]?")
_QUEUE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")


def master_problem(master: str) -> str | None:
    """Why ``master`` is not a Spark master URL a job may name; None when it is."""
    if _MASTER.fullmatch(master):
        return None
    return (f"Spark master {master!r} is not one of local, local[N], local[*], "
            "spark://host:port, yarn or k8s://https://host:port")


@dataclass(frozen=True)
class RunParams:
    """What the analyst chose in the dock (or a Processing algorithm's parameters)."""

    mode: str = MODE_PREDICT
    tile_size: int = 128
    overlap: int = 32
    epochs: int = 10
    batch_size: int = 16
    workers: int = 1
    threshold: float | None = None  # None: the model card's (tuned on validation tiles)
    polygons: bool = True
    tta: bool = False  # predict: average the 8 flips and rotations of each window (8x slower)
    regularize: bool = False  # polygons: square the outlines along each building's walls
    # predict/evaluate/fine-tune: the model built into rs-cluster (nothing uploaded), a model
    # folder on this computer (uploaded), or the id of a finished training job on the cluster
    # whose model is reused there.
    model_builtin: bool = False
    model_dir: str | None = None
    model_job: str | None = None
    # Overrides of the cluster's settings file (what `rs-cluster env` reports) for this job's
    # Spark stages; None: the cluster's setting.
    master: str | None = None
    executor_cores: int | None = None
    executor_memory: str | None = None  # Spark's form: 512m, 2g
    max_cores: int | None = None  # spark.cores.max: what the job may take of a shared cluster
    queue: str | None = None  # YARN
    # Training settings left to the cluster's defaults unless given (Processing, scripts).
    stride: int | None = None
    base_filters: int | None = None
    # The network (one of ARCHS); None: the cluster's default. Fine-tuning keeps the model's.
    arch: str | None = None
    learning_rate: float | None = None
    patience: int | None = None  # 0 turns early stopping off
    dice: bool = False
    # Train/validation/test fractions of the labelled rasters (whole rasters), None: the
    # cluster's default (0.6, 0.2, 0.2). The dock always sends what it shows.
    split: tuple[float, float, float] | None = None

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise SpecError(f"unknown mode {self.mode!r}; one of {', '.join(MODES)}")
        for name, low in (("tile_size", 16), ("epochs", 1), ("batch_size", 1), ("workers", 1)):
            if int(getattr(self, name)) < low:
                raise SpecError(f"{name} must be at least {low}")
        if not 0 <= self.overlap < self.tile_size:
            raise SpecError(f"overlap {self.overlap} must be between 0 and the tile size "
                            f"{self.tile_size}")
        for name, low in (("stride", 1), ("base_filters", 1), ("patience", 0)):
            value = getattr(self, name)
            if value is not None and int(value) < low:
                raise SpecError(f"{name} must be at least {low}")
        if self.split is not None:
            object.__setattr__(self, "split", check_split(self.split))
        self._check_spark_overrides()
        if self.learning_rate is not None and not self.learning_rate > 0:
            raise SpecError(f"learning rate {self.learning_rate} must be above 0")
        if self.threshold is not None and not 0.0 < self.threshold < 1.0:
            raise SpecError(f"threshold {self.threshold} must be between 0 and 1")
        if self.arch is not None and self.arch not in ARCHS:
            raise SpecError(f"unknown network {self.arch!r}; one of {', '.join(ARCHS)}")
        if self.mode in MODEL_MODES and not (self.model_builtin or self.model_dir
                                             or self.model_job):
            raise SpecError("choose a model: the built-in model, a model folder on this "
                            "computer or a finished training job on the cluster")
        if self.model_builtin and (self.model_dir or self.model_job):
            raise SpecError("choose one model: the built-in model, or a model folder or "
                            "training job instead of it")
        if self.mode == MODE_FINE_TUNE and (self.arch or self.base_filters):
            # The cluster refuses a mismatch; saying it here saves an upload.
            raise SpecError("fine-tuning keeps the network and width of the model it starts "
                            "from; leave the network and the model width unset")

    def _check_spark_overrides(self) -> None:
        for name in ("master", "executor_memory", "queue"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, str):
                raise SpecError(f"{name.replace('_', ' ')} must be a text, not {value!r}")
            # A blank field means "the cluster's setting", like no field at all.
            object.__setattr__(self, name, (value or "").strip() or None)
        if self.master is not None:
            problem = master_problem(self.master)
            if problem:
                raise SpecError(problem)
        if self.executor_memory is not None and not _MEMORY.fullmatch(self.executor_memory):
            raise SpecError(f"executor memory {self.executor_memory!r} is not a size such as "
                            "512m, 2g or 1t (a whole number, then k, m, g or t)")
        if self.queue is not None and not _QUEUE.fullmatch(self.queue):
            raise SpecError(f"YARN queue {self.queue!r} is not a queue name (letters, digits, "
                            "'.', '_' and '-')")
        for name, label in (("executor_cores", "executor cores"), ("max_cores", "max cores")):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                      or value < 1):
                raise SpecError(f"{label} must be a whole number of at least 1 (got {value!r}); "
                                "leave it empty for the cluster's setting")

    def spark_overrides(self) -> dict[str, Any]:
        """The Spark settings this job overrides (the parameters of its Spark stages); only those
        set, so the cluster's settings file decides the rest."""
        chosen = {"master": self.master, "executor_cores": self.executor_cores,
                  "executor_memory": self.executor_memory, "max_cores": self.max_cores,
                  "queue": self.queue}
        return {k: v for k, v in chosen.items() if v is not None}


@dataclass(frozen=True)
class RasterPick:
    """One imagery raster (a local file by now) and, optionally, its reference mask."""

    image: str
    mask: str | None = None
    predict: bool = True  # also predict this image (train-then-predict, predict, evaluate)
    validate: bool = False  # training: one of the chosen validation rasters (needs its mask)


def safe_stem(name: str) -> str:
    """A file stem that survives every file system and shell: ASCII letters, digits, ``._-``."""
    text = unicodedata.normalize("NFKD", name).encode("ascii", "ignore").decode("ascii")
    text = re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("._-")
    return text[:80] or "raster"


def unique_stems(paths: Sequence[str]) -> list[str]:
    """One distinct safe stem per path, in order (``a``, ``a_2``...), so uploads never collide
    and each image keeps the name its mask is paired by."""
    seen: dict[str, int] = {}
    stems = []
    for p in paths:
        stem = safe_stem(Path(p).stem)
        n = seen.get(stem.lower(), 0) + 1
        seen[stem.lower()] = n
        stems.append(stem if n == 1 else f"{stem}_{n}")
    return stems


@dataclass(frozen=True)
class PlannedJob:
    """A job spec plus what to upload for it and what to fetch when it ends."""

    spec: JobSpec
    inputs: dict[str, str]  # path relative to the job folder -> local file or folder
    fetch: tuple[str, ...]  # results (relative to the job folder) to download
    model_job: str | None = None  # reuse this training job's model (copied on the cluster)
    stems: dict[str, str] = field(default_factory=dict)  # remote stem -> local image path


def plan_job(name: str, params: RunParams, picks: Sequence[RasterPick], *,
             job_id: str | None = None,
             sidecars: Callable[[str], Sequence[str] | None] | None = None) -> PlannedJob:
    """Turns the analyst's choice into a job spec; raises :class:`SpecError` saying what is
    missing (e.g. a reference mask for training).

    Each raster goes up with its sidecars (``sidecars(path)``, by default
    :func:`raster_sidecars`), renamed with it, so the cluster's GDAL finds them beside it.
    """
    if not picks:
        raise SpecError("choose at least one imagery layer")
    mode = params.mode
    stems = unique_stems([p.image for p in picks])
    paired = [(s, p) for s, p in zip(stems, picks) if p.mask]
    to_predict = [(s, p) for s, p in zip(stems, picks) if p.predict]
    needs_masks = mode in (*TRAINING_MODES, MODE_EVALUATE)
    if needs_masks and not paired:
        raise SpecError("training and evaluation need a reference mask for at least one "
                        "imagery layer")
    unlabelled = [Path(p.image).name for p in picks if p.validate and not p.mask]
    if unlabelled and mode in TRAINING_MODES:
        raise SpecError(f"validation needs a reference mask; missing for {', '.join(unlabelled)}")
    if paired and all(p.validate for _, p in paired) and mode in TRAINING_MODES:
        raise SpecError("every labelled raster is chosen for validation; leave at least one "
                        "to train on")
    if mode == MODE_EVALUATE:
        missing = [Path(p.image).name for _, p in to_predict if not p.mask]
        if missing:
            raise SpecError(f"evaluation needs a reference mask for every image; missing for "
                            f"{', '.join(missing)}")
    if mode in (MODE_PREDICT, MODE_TRAIN_PREDICT, MODE_EVALUATE) and not to_predict:
        raise SpecError("choose at least one imagery layer to predict")
    if mode in TRAINING_MODES:
        arch = params.arch or DEFAULT_ARCH
        if mode == MODE_FINE_TUNE and params.model_builtin:
            arch = BUILTIN_ARCH
        elif mode == MODE_FINE_TUNE:
            arch = model_arch(params.model_dir) if params.model_dir else ""
        problem = tile_size_problem(arch, params.tile_size) if arch else None
        if problem:
            raise SpecError(problem)

    builder = JobSpecBuilder(name, job_id)
    inputs: dict[str, str] = {}

    def add(folder: str, stem: str, path: str) -> None:
        _add_raster(inputs, folder, stem, path, sidecars)

    fetch: list[str] = []
    # The model the predict step reads, or fine-tuning starts from, unless training makes it.
    chosen_model = BUILTIN_MODEL if params.model_builtin else MODEL_INPUT
    if mode in MODEL_MODES and params.model_dir and not (params.model_builtin or params.model_job):
        inputs[MODEL_INPUT] = params.model_dir
    common = params.spark_overrides()  # evaluate runs no Spark: it takes none
    if mode in TRAINING_MODES:
        for stem, pick in paired:
            add(TRAIN_IMAGES, stem, pick.image)
            add(TRAIN_MASKS, stem, pick.mask or "")
        chosen = {"base_filters": params.base_filters, "lr": params.learning_rate,
                  "patience": params.patience, "arch": params.arch}
        if mode == MODE_FINE_TUNE:
            # The network and width come from the model's card on the cluster, so none is sent.
            chosen.update(init_model=chosen_model, lr=params.learning_rate or FINE_TUNE_LR)
        training = {k: v for k, v in chosen.items() if v is not None}
        if params.dice:
            training["dice"] = True
        tiling: dict[str, Any] = {"stride": params.stride} if params.stride else {}
        if params.split is not None:
            tiling["split"] = list(params.split)
        validation = [upload_name(stem, pick.image) for stem, pick in paired if pick.validate]
        if validation:  # the cluster's raster ids are the uploaded file names
            tiling["val_rasters"] = ",".join(validation)
        builder.prepare(images=TRAIN_IMAGES, masks=TRAIN_MASKS, output=DATASET,
                        tile_size=params.tile_size, **tiling, **common)
        builder.train(data=DATASET, model_dir=MODEL_OUTPUT, epochs=params.epochs,
                      batch_size=params.batch_size, num_proc=params.workers,
                      tile_size=params.tile_size, **training, **common)
        fetch.append(MODEL_OUTPUT)
    if mode in (MODE_PREDICT, MODE_TRAIN_PREDICT, MODE_EVALUATE):
        for stem, pick in to_predict:
            add(IMAGES, stem, pick.image)
        model = MODEL_OUTPUT if mode == MODE_TRAIN_PREDICT else chosen_model
        # a threshold and TTA only when chosen: the model card's threshold otherwise
        chosen = {**({} if params.threshold is None else {"threshold": params.threshold}),
                  **({"tta": True} if params.tta else {}),
                  **({"regularize": True} if params.regularize and params.polygons else {})}
        builder.predict(model=model, input=IMAGES, output=PREDICTIONS, overlap=params.overlap,
                        batch_size=params.batch_size, polygons=params.polygons, **chosen,
                        **common)
        fetch.append(PREDICTIONS)
    if mode == MODE_EVALUATE:
        for stem, pick in to_predict:
            add(MASKS, stem, pick.mask or "")
        builder.evaluate(pred=PREDICTIONS, truth=MASKS, json=REPORT)
        fetch.append(REPORT)
    return PlannedJob(spec=builder.build(), inputs=inputs, fetch=tuple(fetch),
                      model_job=(params.model_job if mode in MODEL_MODES
                                 and not params.model_builtin else None),
                      stems={s: p.image for s, p in to_predict})


def tile_size_problem(arch: str, tile_size: int) -> str | None:
    """Why the network ``arch`` cannot take ``tile_size`` px tiles, naming the nearest sizes it
    can; None when it can (the cluster would refuse the job only after the upload)."""
    step = ARCH_TILE_MULTIPLE.get(arch)
    if step is None or (tile_size >= step and tile_size % step == 0):
        return None
    below = tile_size // step * step
    fits = f"{step} px" if below < step else f"{below} or {below + step} px"
    return (f"tile size {tile_size} px is not a multiple of {step}, which the network {arch} "
            f"needs (it halves the tile {step.bit_length() - 1} times): choose {fits}")


def model_arch(model_dir: str) -> str:
    """The network of the model folder ``model_dir`` as its card (``model.json``) names it, the
    2019 U-Net for a card from before networks were a choice; "" when there is no readable card
    (the cluster checks it then)."""
    try:
        card = json.loads((Path(model_dir) / "model.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return ""
    if not isinstance(card, dict):
        return ""
    arch = card.get("arch") or LEGACY_ARCH
    return arch if isinstance(arch, str) else ""


def plan_evaluation(name: str, predicted: Sequence[str], truth: Sequence[str], *,
                    job_id: str | None = None,
                    sidecars: Callable[[str], Sequence[str] | None] | None = None) -> PlannedJob:
    """Scores masks already made against reference masks, paired by position."""
    if not predicted or len(predicted) != len(truth):
        raise SpecError(f"give as many reference masks as predicted masks "
                        f"({len(predicted)} predicted, {len(truth)} reference)")
    stems = unique_stems(predicted)
    inputs: dict[str, str] = {}
    for stem, pred, ref in zip(stems, predicted, truth):
        # The predictions are uploaded under inputs/ so the job's own outputs stay separate.
        _add_raster(inputs, "inputs/predicted", f"{stem}_mask", pred, sidecars, suffix=".tif")
        _add_raster(inputs, MASKS, stem, ref, sidecars)
    spec = (JobSpecBuilder(name, job_id)
            .evaluate(pred="inputs/predicted", truth=MASKS, json=REPORT).build())
    return PlannedJob(spec=spec, inputs=inputs, fetch=(REPORT,))


def upload_name(stem: str, path: str, suffix: str | None = None) -> str:
    """The file name ``path`` is uploaded as under the stem ``stem``."""
    return f"{stem}{suffix or Path(path).suffix.lower() or '.tif'}"


def _add_raster(inputs: dict[str, str], folder: str, stem: str, path: str,
                sidecars: Callable[[str], Sequence[str] | None] | None, *,
                suffix: str | None = None) -> None:
    """``path`` as ``folder/stem.ext`` in ``inputs``, and each of its sidecars beside it."""
    name = upload_name(stem, path, suffix)
    inputs[f"{folder}/{name}"] = path
    for side in (sidecars or raster_sidecars)(path) or ():
        renamed = sidecar_name(Path(path).name, Path(side).name, name)
        if renamed is not None:
            inputs[f"{folder}/{renamed}"] = side


# -- results ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ResultFiles:
    masks: tuple[str, ...] = ()
    polygons: tuple[str, ...] = ()
    report: str | None = None
    model: str | None = None


def classify_results(files: Iterable[str | Path]) -> ResultFiles:
    """Sorts downloaded files into what gets loaded where."""
    masks, polygons, report, model = [], [], None, None
    for f in sorted(str(p) for p in files):
        name = Path(f).name
        if name.endswith(MASK_SUFFIX):
            masks.append(f)
        elif name.endswith(POLYGONS_SUFFIX):
            polygons.append(f)
        elif Path(f).as_posix().endswith(REPORT):
            report = f
        elif name == "model.json":
            model = str(Path(f).parent)
    return ResultFiles(tuple(masks), tuple(polygons), report, model)


# -- what the cluster says about itself (rs-cluster env) -------------------------------------------
SUMMARY_KEYS = ("master", "master_source", "runs_on", "settings_file")


def cluster_text(value: Any, limit: int = 300) -> str:
    """Untrusted text from the cluster as one plain line: control and format characters (line
    breaks, text direction controls) become spaces, so a value cannot fake further lines or
    reorder what is shown, and it is cut at ``limit`` characters."""
    text = "".join(" " if unicodedata.category(c) in ("Cc", "Cf", "Zl", "Zp") else c
                   for c in str(value))
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit - 1] + "\u2026"


def cluster_summary(info: Any) -> dict[str, str] | None:
    """What the dock says about where a profile's jobs run, taken from the ``cluster`` object of
    ``rs-cluster env``: the Spark master, where it came from, the cluster's own sentence and the
    settings file. Nothing of storage or its credentials. None when the answer has no such
    object (an older rs-cluster); a value of the wrong type is left out."""
    cluster = info.get("cluster") if isinstance(info, Mapping) else None
    if not isinstance(cluster, Mapping):
        return None
    summary = {key: cluster_text(cluster[key]) for key in SUMMARY_KEYS
               if isinstance(cluster.get(key), str) and cluster[key].strip()}
    return summary or None


def summarize_report(report: Mapping[str, Any]) -> str:
    """One line for the message bar: pooled IoU/F1/precision/recall of ``rs-cluster evaluate``."""
    pooled = report.get("pooled") or report.get("overall") or {}
    parts = []
    for key, label in (("iou", "IoU"), ("f1", "F1"), ("precision", "precision"),
                       ("recall", "recall"), ("accuracy", "accuracy")):
        value = pooled.get(key)
        if isinstance(value, (int, float)):
            parts.append(f"{label} {value:.3f}")
    images = report.get("images") or []
    head = f"{len(images)} image(s): " if images else ""
    return head + (", ".join(parts) if parts else json.dumps(pooled)[:200])


# -- job records (the jobs panel, kept across restarts) -----------------------------------------
@dataclass(frozen=True)
class JobRecord:
    """A job as the jobs panel remembers it.

    ``state`` is the cluster's, or "exporting"/"uploading" (the cluster does not know the job
    yet), "error" (it never started), or "unknown": starting it failed at a point where the
    cluster may have it anyway (the link dropped during ``job submit``), so it is looked up on
    the cluster until it is found or certainly absent. ``gone``: the cluster no longer has the
    job's folder (cleaned elsewhere), so there is nothing left to watch or fetch.
    """

    job_id: str
    name: str
    profile: str
    mode: str
    state: str = "exporting"
    stage: str = ""
    progress: float = 0.0
    message: str = ""
    created: str = ""
    started: str | None = None
    finished: str | None = None
    local_dir: str = ""
    fetch: tuple[str, ...] = ()
    loaded: bool = False
    restarts: int = 0
    origin: str = "dock"  # or "processing": started by a Processing algorithm
    gone: bool = False
    warnings: int = 0
    recent_warnings: tuple[str, ...] = ()  # the last few warning texts, newest last
    events_seen: int = 0  # events already counted, so a reattach replays none of them
    project: str = ""  # the project file open when the job started: its results go there
    parameters: str = ""  # the job's stage parameters (spec_parameters), for the details pane
    # How its training went, from the cluster's verdict once the job finished: "ok", "weak"
    # (the model learned almost nothing) or "" (no training, or not finished).
    verdict: str = ""
    verdict_reason: str = ""
    advice: str = ""
    best_val_iou: float | None = None
    best_epoch: int | None = None

    @property
    def remote_active(self) -> bool:
        return self.state in ACTIVE_REMOTE_STATES and not self.gone

    @property
    def needs_fetch(self) -> bool:
        return self.state == "succeeded" and not self.loaded and not self.gone

    @property
    def weak(self) -> bool:
        return self.verdict == "weak"

    def with_status(self, status: JobStatus) -> JobRecord:
        verdict = status.verdict
        judged = {} if verdict is None else {
            "verdict": verdict.verdict, "verdict_reason": verdict.reason,
            "advice": verdict.advice, "best_val_iou": verdict.best_val_iou,
            "best_epoch": verdict.best_epoch}
        return replace(self, state=status.state, stage=status.stage or self.stage,
                       progress=status.progress, message=status.message or self.message,
                       started=status.started or self.started,
                       finished=status.finished or self.finished,
                       restarts=max(status.restarts, self.restarts),
                       # the cluster counts every warning, also those sent before we looked
                       warnings=max(status.warnings, self.warnings), gone=False, **judged)

    def with_event(self, kind: str, message: str, *, keep: int = 50) -> JobRecord:
        """Counts one more event of the job; a warning also counts, and its text is kept."""
        if kind != "warning":
            return replace(self, events_seen=self.events_seen + 1)
        return replace(self, events_seen=self.events_seen + 1, warnings=self.warnings + 1,
                       recent_warnings=(*self.recent_warnings, message)[-keep:])

    def to_json(self) -> str:
        data = asdict(self)
        data["fetch"] = list(self.fetch)
        data["recent_warnings"] = list(self.recent_warnings)
        return json.dumps(data, ensure_ascii=False)

    @classmethod
    def from_json(cls, text: str) -> JobRecord:
        data = json.loads(text)
        if not isinstance(data, dict):
            raise ValueError("a job record is a JSON object")
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        known["fetch"] = tuple(known.get("fetch") or ())
        known["recent_warnings"] = tuple(str(w) for w in known.get("recent_warnings") or ())
        for key in ("best_val_iou", "best_epoch"):  # written by us, but settings can be edited
            if isinstance(known.get(key), bool) or not isinstance(known.get(key), (int, float)):
                known.pop(key, None)
        return cls(**known)


def spec_parameters(spec: JobSpec) -> str:
    """The parameters each stage of ``spec`` runs with, one line a stage (``train: epochs=10,
    lr=0.001``); the folders inside the job folder are left out."""
    from rs_qgis_plugin.core.jobspec import STAGE_PARAMS

    lines = []
    for step in spec.steps:
        kinds = STAGE_PARAMS.get(step.stage, {})
        shown = [f"{k}={_param_text(v)}" for k, v in step.params.items() if kinds.get(k) != "path"]
        lines.append(f"{step.stage}: {', '.join(shown) or '-'}")
    return "\n".join(lines)


def _param_text(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return ",".join(map(str, value))
    if isinstance(value, dict):
        return json.dumps(value, sort_keys=True)
    return str(value)


def now_iso() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def verdict_text(record: JobRecord) -> str:
    """The outcome of a job's training in one line ("" without one): its best validation IoU,
    and for a weak model why, and what to try."""
    if not record.verdict:
        return ""
    best = "" if record.best_val_iou is None else "best validation IoU {iou:.3f}{at}".format(
        iou=record.best_val_iou,
        at=f" at epoch {record.best_epoch}" if record.best_epoch else "")
    if not record.weak:
        return best
    text = "weak model" + (f" ({best})" if best else "")
    if record.verdict_reason:
        text += f": {record.verdict_reason}"
    if record.advice:
        text += f". {record.advice[:1].upper()}{record.advice[1:]}"
    return text


def progress_text(record: JobRecord) -> str:
    if record.state in ("running",) and record.stage:
        return f"{record.stage} {record.progress:.0f}%"
    return f"{record.progress:.0f}%"


# -- layers ---------------------------------------------------------------------------------------
def sidecar_name(raster: str, sidecar: str, uploaded: str) -> str | None:
    """The name ``sidecar`` (of the file named ``raster``) takes beside the raster uploaded as
    ``uploaded``: ``a b.TIF.aux.xml`` -> ``a_b.tif.aux.xml``, ``a b.tfw`` -> ``a_b.tfw``. ``None``
    when the sidecar is named after neither the raster's name nor its stem."""
    for old, new in ((raster, uploaded), (Path(raster).stem, Path(uploaded).stem)):
        rest = sidecar[len(old):]
        # The case of the rest is kept: GDAL tries a world file's extension in both cases.
        if sidecar.lower().startswith(old.lower()) and rest[:1] in (".", "_"):
            return new + rest
    return None


def raster_sidecars(path: str) -> tuple[str, ...] | None:
    """The files GDAL reads along with the local raster ``path`` (``GetFileList``: world file,
    ``.prj``, ``.aux.xml``, overviews, ENVI header...), which must travel with it; ``()`` for a
    file that does not exist (yet: an export) or GDAL cannot open. ``None`` when GDAL lists a
    file that cannot travel with it (another folder, not a known sidecar, not named after it):
    such a layer is exported to GeoTIFF instead."""
    if not os.path.isfile(path):
        return ()
    from osgeo import gdal  # QGIS's own GDAL: it decides what QGIS shows of the file

    gdal.PushErrorHandler("CPLQuietErrorHandler")
    try:
        dataset = gdal.OpenEx(path, gdal.OF_RASTER | gdal.OF_READONLY)
        listed = (dataset.GetFileList() or []) if dataset is not None else []
    except RuntimeError:  # raised instead of returning None where gdal.UseExceptions() is on
        listed = []
    finally:
        dataset = None  # closes it before the error handler goes
        gdal.PopErrorHandler()
    main = os.path.abspath(path)
    found = []
    for f in listed:
        f = os.path.abspath(f)
        if f == main:
            continue
        if (os.path.dirname(f) != os.path.dirname(main) or not is_sidecar(f)
                or sidecar_name(os.path.basename(main), os.path.basename(f),
                                os.path.basename(main)) is None):
            return None
        found.append(f)
    return tuple(found)


def layer_upload_path(layer: Any) -> str | None:
    """The file a raster layer (a ``QgsRasterLayer``) goes up as, or ``None`` when it is exported
    first: as :func:`local_raster_path` says, and also when its CRS in QGIS is not the file's own
    (the analyst set one on the layer, or the file has none), since only an export writes the
    layer's CRS into the file the cluster reads."""
    path = local_raster_path(layer.providerType(), layer.source())
    if path is not None and layer.crs() != layer.dataProvider().crs():
        return None
    return path


def local_raster_path(provider: str, source: str, *, exists: bool | None = None) -> str | None:
    """The local file a raster layer reads, or ``None`` when it must be exported first (WMS/WCS,
    in-memory, a VRT that points elsewhere, ``/vsicurl/`` and other virtual paths, a format
    outside the contract's list, a file whose sidecars cannot travel with it). Whether the
    layer's CRS is the file's is the caller's check (it needs QGIS)."""
    if provider != "gdal":
        return None
    path = source.split("|", 1)[0]
    if not path or path.startswith("/vsi") or "://" in path:
        return None
    if re.match(r"^[A-Za-z][A-Za-z0-9_]+:", path):  # a GDAL driver prefix: GPKG:, NETCDF:...
        return None
    if not is_raster(path):
        return None
    if exists is None:
        exists = Path(path).is_file()
    if not exists or raster_sidecars(path) is None:
        return None
    return path
