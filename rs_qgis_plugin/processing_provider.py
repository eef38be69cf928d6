"""Processing algorithms: train, fine-tune, predict and evaluate on a cluster profile, for the toolbox, the
Model Designer and ``qgis_process``. They plan jobs with the same QGIS-free functions as the dock
and run the same blocking steps as its tasks (Processing already runs them off the GUI thread).
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

from qgis.core import (
    QgsProcessing,
    QgsProcessingAlgorithm,
    QgsProcessingContext,
    QgsProcessingParameterDefinition,
    QgsProcessingException,
    QgsProcessingLayerPostProcessorInterface,
    QgsProcessingOutputFile,
    QgsProcessingOutputMultipleLayers,
    QgsProcessingOutputNumber,
    QgsProcessingParameterBoolean,
    QgsProcessingParameterEnum,
    QgsProcessingParameterFile,
    QgsProcessingParameterFolderDestination,
    QgsProcessingParameterMultipleLayers,
    QgsProcessingParameterNumber,
    QgsProcessingParameterString,
    QgsProcessingProvider,
    QgsRasterLayer,
)
from qgis.PyQt.QtCore import QCoreApplication
from qgis.PyQt.QtGui import QIcon

from rs_qgis_plugin import settings
from rs_qgis_plugin.core.errors import CancelledError, RsPluginError
from rs_qgis_plugin.core.jobs import RemoteJobs
from rs_qgis_plugin.log import get_logger
from rs_qgis_plugin.logic import (
    FINE_TUNE_LR,
    MODE_FINE_TUNE,
    MODE_PREDICT,
    MODE_TRAIN,
    WEB_PROVIDERS,
    JobRecord,
    PlannedJob,
    RasterPick,
    RunParams,
    classify_results,
    layer_upload_path,
    now_iso,
    plan_evaluation,
    plan_job,
    safe_stem,
    spec_parameters,
)
from rs_qgis_plugin.results import MASK_STYLE, POLYGON_STYLE, resource_path
from rs_qgis_plugin.tasks import (
    ExportRasterTask,
    TaskCancelFlag,
    connect,
    fetch,
    run_by_processing,
    submit_planned,
    watch,
)

log = get_logger("processing")
PROVIDER_ID = "rs_buildings"


def tr(text: str) -> str:
    return QCoreApplication.translate("RsProcessing", text)


class _Styler(QgsProcessingLayerPostProcessorInterface):
    """Applies the plugin's style to a layer Processing loads when the algorithm ends."""

    keep: list[_Styler] = []  # Processing holds only a C++ pointer: keep the Python objects alive

    def __init__(self, style: str) -> None:
        super().__init__()
        self.style = style
        _Styler.keep.append(self)

    def postProcessLayer(self, layer: Any, context: Any, feedback: Any) -> None:  # noqa: N802
        layer.loadNamedStyle(str(resource_path(self.style)))
        layer.triggerRepaint()


class _Recorder:
    """Keeps the job's record in the settings current, as the dock's controller does (from the
    algorithm's thread; the jobs panel hears of each save)."""

    def __init__(self, record: JobRecord) -> None:
        self.record = record

    def save(self, record: JobRecord) -> None:
        self.record = record
        settings.save_job(record)


def run_job_blocking(profile_name: str, planned: PlannedJob, local_dir: Path, feedback: Any, *,
                     mode: str = "") -> list[Path]:
    """Upload (0-20 %), run (20-90 %), download (90-100 %); cancelling cancels the cluster job.

    The job is recorded like the dock's jobs: the jobs panel shows it while it runs and after,
    and should QGIS close or the link drop mid-way, it is found again like any other."""
    try:
        profile = settings.load_profile(profile_name)
        passphrase = settings.load_passphrase(settings.profile_authcfg(profile_name))
        jobs = RemoteJobs(connect(profile, settings.known_hosts_path(), passphrase))
    except RsPluginError as e:
        raise QgsProcessingException(str(e)) from e
    job_id = planned.spec.job_id
    recorder = _Recorder(JobRecord(
        job_id=job_id, name=planned.spec.name, profile=profile_name, mode=mode or "processing",
        state="uploading", created=now_iso(), local_dir=str(local_dir), fetch=planned.fetch,
        origin="processing", parameters=spec_parameters(planned.spec)))
    try:
        with run_by_processing(job_id):
            return _run_recorded(jobs, planned, local_dir, feedback, recorder)
    finally:
        settings.job_changed(job_id)  # no longer busy here
        jobs.client.close()


def _run_recorded(jobs: RemoteJobs, planned: PlannedJob, local_dir: Path, feedback: Any,
                  recorder: _Recorder) -> list[Path]:
    cancel = TaskCancelFlag(feedback)
    job_id = planned.spec.job_id
    recorder.save(recorder.record)
    started = False
    try:
        feedback.pushInfo(tr("Uploading {n} input(s) for job {job}").format(
            n=len(planned.inputs), job=job_id))
        try:
            status = submit_planned(jobs, planned, progress=lambda p: feedback.setProgress(0.2 * p),
                                    cancel=cancel)
        except CancelledError:
            raise
        except Exception as e:
            # The spec or `job submit` may have reached the cluster: the jobs panel looks it up.
            recorder.save(replace(recorder.record, state="unknown", message=tr(
                "starting the job failed where the cluster may have it anyway: {reason}").format(
                reason=e)))
            raise
        started = True
        recorder.save(recorder.record.with_status(status))
        last_stage = [""]

        def on_status(status: Any) -> None:
            feedback.setProgress(20 + 0.7 * status.progress)
            if status.stage and status.stage != last_stage[0]:
                last_stage[0] = status.stage
                feedback.pushInfo(tr("Stage {stage}").format(stage=status.stage))
            recorder.save(recorder.record.with_status(status))

        def on_event(event: Any) -> None:
            record = recorder.record.with_event(event.event, event.message)
            if event.event == "warning":
                feedback.pushWarning(f"{event.stage}: {event.message}")
                recorder.save(record)
            elif event.event == "info":
                feedback.pushInfo(f"{event.stage}: {event.message}")
                recorder.save(record)
            else:
                recorder.record = record  # saved with the next status

        final = watch(jobs, job_id, on_status=on_status, on_event=on_event, cancel=cancel)
        if final.state != "succeeded":
            raise QgsProcessingException(tr("job {job} {state}: {reason}").format(
                job=job_id, state=final.state, reason=final.message or tr("no reason given")))
        files = fetch(jobs, job_id, planned.fetch, local_dir,
                      progress=lambda p: feedback.setProgress(90 + 0.1 * p), cancel=cancel)
        # Processing loads the layers when the algorithm returns
        recorder.save(replace(recorder.record, loaded=True))
        feedback.setProgress(100)
        return files
    except CancelledError:
        if not started:
            recorder.save(replace(recorder.record, state="cancelled",
                                  message=tr("cancelled before start")))
            raise QgsProcessingException(tr("cancelled; job {job} was not started").format(
                job=job_id)) from None
        try:
            recorder.save(recorder.record.with_status(jobs.cancel(job_id)))
        except RsPluginError as e:
            recorder.save(replace(recorder.record, message=str(e)))
            raise QgsProcessingException(tr(
                "cancelled here, but cancelling job {job} on the cluster failed: {reason}; it "
                "may still run there (see the jobs panel)").format(job=job_id, reason=e)) from e
        raise QgsProcessingException(tr("cancelled; job {job} cancelled on the cluster")
                                     .format(job=job_id)) from None
    except RsPluginError as e:
        recorder.save(replace(recorder.record, message=str(e)))
        raise QgsProcessingException(str(e)) from e


class _ClusterAlgorithm(QgsProcessingAlgorithm):
    PROFILE = "PROFILE"
    OUTPUT = "OUTPUT"
    MASTER, EXECUTOR_CORES, EXECUTOR_MEMORY = "MASTER", "EXECUTOR_CORES", "EXECUTOR_MEMORY"
    MAX_CORES, QUEUE = "MAX_CORES", "QUEUE"

    def group(self) -> str:
        return tr("Cluster")

    def groupId(self) -> str:  # noqa: N802
        return "cluster"

    def createInstance(self) -> QgsProcessingAlgorithm:  # noqa: N802
        return type(self)()

    def add_profile_parameter(self) -> None:
        default = settings.last_profile() or None
        self.addParameter(QgsProcessingParameterString(
            self.PROFILE, tr("Cluster connection profile"), defaultValue=default))

    def add_spark_parameters(self) -> None:
        """Advanced, optional overrides of the cluster's settings file for this job's Spark
        stages; left out (or 0), the cluster's setting applies (rs-cluster env shows it)."""
        texts = ((self.MASTER, tr("Spark master (empty: the cluster's setting; local[*], "
                                  "spark://host:7077, yarn)")),
                 (self.EXECUTOR_MEMORY, tr("Executor memory (e.g. 2g; empty: the cluster's "
                                           "setting)")),
                 (self.QUEUE, tr("YARN queue (empty: the cluster's setting)")))
        numbers = ((self.EXECUTOR_CORES, tr("Executor cores (0: the cluster's setting)")),
                   (self.MAX_CORES, tr("Max cores of the job, spark.cores.max (0: the "
                                       "cluster's setting)")))
        parameters: list[QgsProcessingParameterDefinition] = [
            QgsProcessingParameterString(key, label, optional=True) for key, label in texts]
        parameters += [QgsProcessingParameterNumber(key, label, optional=True, minValue=0)
                       for key, label in numbers]
        for parameter in parameters:
            parameter.setFlags(parameter.flags() | QgsProcessingParameterDefinition.FlagAdvanced)
            self.addParameter(parameter)

    def spark_params(self, parameters: dict[str, Any],
                     context: QgsProcessingContext) -> dict[str, Any]:
        """The RunParams fields :meth:`add_spark_parameters` sets (None: not overridden)."""
        chosen: dict[str, Any] = {}
        for key, field_name in ((self.MASTER, "master"), (self.EXECUTOR_MEMORY, "executor_memory"),
                                (self.QUEUE, "queue")):
            chosen[field_name] = self.parameterAsString(parameters, key, context).strip() or None
        for key, field_name in ((self.EXECUTOR_CORES, "executor_cores"),
                                (self.MAX_CORES, "max_cores")):
            given = parameters.get(key) not in (None, "")
            chosen[field_name] = (self.parameterAsInt(parameters, key, context) or None
                                  if given else None)
        return chosen

    def local_rasters(self, layers: list[Any], export_dir: Path, feedback: Any) -> list[str]:
        """Files the cluster can take: the layers' own files, or GeoTIFF exports of them."""
        paths = []
        for i, layer in enumerate(layers):
            if not isinstance(layer, QgsRasterLayer):
                raise QgsProcessingException(tr("{name} is not a raster layer").format(
                    name=getattr(layer, "name", lambda: layer)()))
            if layer.providerType() in WEB_PROVIDERS:
                # no clip parameter here: the whole advertised extent at 2048 px is no imagery
                raise QgsProcessingException(tr(
                    "{name} is a web map layer ({provider}); Processing cannot choose its "
                    "extent and resolution. Save the area you need as a GeoTIFF (Export › Save "
                    "As…), or run from the dock with a clip.").format(
                    name=layer.name(), provider=layer.providerType()))
            path = layer_upload_path(layer)
            if path is None:
                feedback.pushInfo(tr("Exporting {name} to GeoTIFF").format(name=layer.name()))
                task = ExportRasterTask(
                    layer, export_dir / str(i + 1) / f"{safe_stem(layer.name())}.tif")
                path = str(task.work())
            paths.append(path)
        return paths

    def chosen_model(self, parameters: dict[str, Any], context: QgsProcessingContext,
                     folder_key: str, job_key: str) -> dict[str, Any]:
        """The RunParams fields of the model chosen by a folder and a job id parameter; the
        built-in model when both are left empty."""
        folder = self.parameterAsString(parameters, folder_key, context) or None
        job = self.parameterAsString(parameters, job_key, context).strip() or None
        return {"model_dir": folder, "model_job": job, "model_builtin": not (folder or job)}

    def job_dir(self, parameters: dict[str, Any], context: QgsProcessingContext) -> Path:
        out = Path(self.parameterAsString(parameters, self.OUTPUT, context))
        out.mkdir(parents=True, exist_ok=True)
        return out


class PredictAlgorithm(_ClusterAlgorithm):
    INPUT, MODEL, MODEL_JOB = "INPUT", "MODEL", "MODEL_JOB"
    OVERLAP, BATCH_SIZE, THRESHOLD, POLYGONS = "OVERLAP", "BATCH_SIZE", "THRESHOLD", "POLYGONS"
    TTA, REGULARIZE = "TTA", "REGULARIZE"
    MASKS = "MASKS"

    def name(self) -> str:
        return "predict"

    def displayName(self) -> str:  # noqa: N802
        return tr("Predict building masks")

    def shortHelpString(self) -> str:  # noqa: N802
        return tr("Uploads the imagery to the cluster, predicts a building mask (255 building, "
                  "0 background, same CRS and grid as the image) per raster with a trained "
                  "model, and downloads masks and polygons. The model is a folder on this "
                  "computer or the id of a finished training job on the cluster; with both left "
                  "empty, the building model built into rs-cluster (nothing is uploaded for "
                  "it).")

    def initAlgorithm(self, config: Any = None) -> None:  # noqa: N802
        self.add_profile_parameter()
        self.addParameter(QgsProcessingParameterMultipleLayers(
            self.INPUT, tr("Imagery"), QgsProcessing.TypeRaster))
        self.addParameter(QgsProcessingParameterFile(
            self.MODEL, tr("Model folder on this computer (empty, and no job below: the "
                           "built-in model)"),
            behavior=QgsProcessingParameterFile.Folder, optional=True))
        self.addParameter(QgsProcessingParameterString(
            self.MODEL_JOB, tr("…or the training job on the cluster (job id; empty, and no "
                               "folder above: the built-in model)"), optional=True))
        self.addParameter(QgsProcessingParameterNumber(
            self.OVERLAP, tr("Overlap (px)"), defaultValue=32, minValue=0))
        self.addParameter(QgsProcessingParameterNumber(
            self.BATCH_SIZE, tr("Batch size"), defaultValue=16, minValue=1))
        self.addParameter(QgsProcessingParameterNumber(
            self.THRESHOLD, tr("Threshold (0: the model's own, tuned when it was trained)"),
            QgsProcessingParameterNumber.Double, defaultValue=0.0, minValue=0.0, maxValue=0.99))
        self.addParameter(QgsProcessingParameterBoolean(
            self.POLYGONS, tr("Also make building polygons"), defaultValue=True))
        self.addParameter(QgsProcessingParameterBoolean(
            self.REGULARIZE, tr("Square the polygons' outlines along each building's walls"),
            defaultValue=False))
        self.addParameter(QgsProcessingParameterBoolean(
            self.TTA, tr("Average 8 flips and rotations of each window (8× the model's time)"),
            defaultValue=False))
        self.add_spark_parameters()
        self.addParameter(QgsProcessingParameterFolderDestination(self.OUTPUT, tr("Results folder")))
        self.addOutput(QgsProcessingOutputMultipleLayers(self.MASKS, tr("Building masks")))

    def plan(self, parameters: dict[str, Any], context: QgsProcessingContext, feedback: Any,
             out: Path) -> PlannedJob:
        """The job the parameters make (nothing is sent yet)."""
        layers = self.parameterAsLayerList(parameters, self.INPUT, context)
        images = self.local_rasters(layers, out / "exports", feedback)
        try:
            params = RunParams(
                mode=MODE_PREDICT, overlap=self.parameterAsInt(parameters, self.OVERLAP, context),
                batch_size=self.parameterAsInt(parameters, self.BATCH_SIZE, context),
                threshold=self.parameterAsDouble(parameters, self.THRESHOLD, context) or None,
                polygons=self.parameterAsBool(parameters, self.POLYGONS, context),
                tta=self.parameterAsBool(parameters, self.TTA, context),
                regularize=self.parameterAsBool(parameters, self.REGULARIZE, context),
                **self.chosen_model(parameters, context, self.MODEL, self.MODEL_JOB),
                **self.spark_params(parameters, context))
            return plan_job(layers[0].name() if layers else "predict", params,
                            [RasterPick(p) for p in images])
        except RsPluginError as e:
            raise QgsProcessingException(str(e)) from e

    def processAlgorithm(self, parameters: dict[str, Any], context: QgsProcessingContext,  # noqa: N802
                         feedback: Any) -> dict[str, Any]:
        out = self.job_dir(parameters, context)
        planned = self.plan(parameters, context, feedback, out)
        files = classify_results(run_job_blocking(
            self.parameterAsString(parameters, self.PROFILE, context), planned, out, feedback,
            mode=self.name()))
        for path in files.masks:
            details = QgsProcessingContext.LayerDetails(Path(path).stem, context.project(),
                                                        self.MASKS)
            details.setPostProcessor(_Styler(MASK_STYLE))
            context.addLayerToLoadOnCompletion(path, details)
        for path in files.polygons:
            details = QgsProcessingContext.LayerDetails(Path(path).stem, context.project(),
                                                        self.MASKS)
            details.setPostProcessor(_Styler(POLYGON_STYLE))
            context.addLayerToLoadOnCompletion(path, details)
        return {self.OUTPUT: str(out), self.MASKS: list(files.masks)}


# The ARCH enum's options, in order: (label, network sent; None: the cluster's default).
ARCH_CHOICES = (
    (lambda: tr("cluster default (pretrained EfficientNet-Lite0 U-Net)"), None),
    (lambda: tr("pretrained EfficientNet-Lite0 U-Net (tiles a multiple of 32 px)"),
     "effnet_lite0_unet"),
    (lambda: tr("U-Net with batch normalisation, from scratch"), "unet_bn"),
    (lambda: tr("2019 U-Net (reproduces the thesis)"), "unet2019"),
)


class TrainAlgorithm(_ClusterAlgorithm):
    INPUT, MASKS = "INPUT", "MASKS"
    TILE_SIZE, EPOCHS, BATCH_SIZE, WORKERS = "TILE_SIZE", "EPOCHS", "BATCH_SIZE", "WORKERS"
    BASE_FILTERS, LEARNING_RATE, ARCH = "BASE_FILTERS", "LEARNING_RATE", "ARCH"
    SPLIT, PATIENCE, VALIDATION = "SPLIT", "PATIENCE", "VALIDATION"
    INIT_MODEL, INIT_MODEL_JOB = "INIT_MODEL", "INIT_MODEL_JOB"
    MODEL = "MODEL"
    MODE = MODE_TRAIN

    def name(self) -> str:
        return "train"

    def displayName(self) -> str:  # noqa: N802
        return tr("Train a building model")

    def shortHelpString(self) -> str:  # noqa: N802
        return tr("Uploads imagery and reference masks (paired in the order given; non-zero = "
                  "building), tiles them and trains the chosen network with Horovod on the "
                  "cluster (by default a U-Net over an ImageNet-pretrained EfficientNet-Lite0 "
                  "encoder, which needs tiles a multiple of 32 px), and downloads the model "
                  "folder (model.json + model.keras).")

    def initAlgorithm(self, config: Any = None) -> None:  # noqa: N802
        self.add_profile_parameter()
        self.addParameter(QgsProcessingParameterMultipleLayers(
            self.INPUT, tr("Imagery"), QgsProcessing.TypeRaster))
        self.addParameter(QgsProcessingParameterMultipleLayers(
            self.MASKS, tr("Reference masks (same order as the imagery)"),
            QgsProcessing.TypeRaster))
        for key, label, default in ((self.TILE_SIZE, tr("Tile size (px)"), 128),
                                    (self.EPOCHS, tr("Epochs"), 10),
                                    (self.BATCH_SIZE, tr("Batch size"), 16),
                                    (self.WORKERS, tr("Horovod workers"), 1)):
            self.addParameter(QgsProcessingParameterNumber(key, label, defaultValue=default,
                                                           minValue=1))
        # Shown, not applied silently: what is held out of training, and when it stops.
        self.addParameter(QgsProcessingParameterString(
            self.SPLIT, tr("Train, validation, test fractions of the rasters (whole rasters; "
                           "validation picks the best epoch and stops early)"),
            defaultValue="0.6,0.2,0.2"))
        self.addParameter(QgsProcessingParameterNumber(
            self.PATIENCE, tr("Early stopping: epochs without improvement before training stops "
                              "(0: never stop early)"), defaultValue=5, minValue=0))
        self.addParameter(QgsProcessingParameterMultipleLayers(
            self.VALIDATION, tr("Use these imagery layers (of the imagery above) for validation "
                                "instead of drawing them by the split"),
            QgsProcessing.TypeRaster, optional=True))
        self.add_model_parameters()
        # Advanced, optional: left out, the cluster's defaults apply (64 filters, 1e-4).
        numbers = [(self.LEARNING_RATE, tr("Learning rate of one worker"),
                    QgsProcessingParameterNumber.Double, 1e-7)]
        if self.MODE != MODE_FINE_TUNE:  # fine-tuning keeps the model's width
            numbers.insert(0, (self.BASE_FILTERS, tr("Model width (filters of the first level)"),
                               QgsProcessingParameterNumber.Integer, 1))
        for key, label, kind, low in numbers:
            parameter = QgsProcessingParameterNumber(key, label, kind, optional=True, minValue=low)
            parameter.setFlags(parameter.flags() | QgsProcessingParameterDefinition.FlagAdvanced)
            self.addParameter(parameter)
        self.add_spark_parameters()
        self.addParameter(QgsProcessingParameterFolderDestination(self.OUTPUT, tr("Results folder")))
        self.addOutput(QgsProcessingOutputFile(self.MODEL, tr("Model folder")))

    def add_model_parameters(self) -> None:
        """Which network to train; fine-tuning instead chooses the model it starts from."""
        self.addParameter(QgsProcessingParameterEnum(
            self.ARCH, tr("Network"), options=[label() for label, _ in ARCH_CHOICES],
            defaultValue=0))

    def model_params(self, parameters: dict[str, Any],
                     context: QgsProcessingContext) -> dict[str, Any]:
        """The RunParams fields :meth:`add_model_parameters` sets."""
        index = self.parameterAsEnum(parameters, self.ARCH, context)
        return {"arch": ARCH_CHOICES[index][1] if 0 <= index < len(ARCH_CHOICES) else None,
                "base_filters": self._optional(parameters, self.BASE_FILTERS, context)}

    def _optional(self, parameters: dict[str, Any], key: str,
                  context: QgsProcessingContext) -> Any:
        if parameters.get(key) in (None, ""):
            return None
        if key == self.BASE_FILTERS:
            return self.parameterAsInt(parameters, key, context)
        return self.parameterAsDouble(parameters, key, context)

    def split(self, parameters: dict[str, Any], context: QgsProcessingContext) -> tuple[float, ...]:
        text = self.parameterAsString(parameters, self.SPLIT, context) or "0.6,0.2,0.2"
        try:
            return tuple(float(part) for part in text.replace(";", ",").split(","))
        except ValueError:
            raise QgsProcessingException(tr("the split {text!r} is not three fractions, e.g. "
                                            "0.6,0.2,0.2").format(text=text)) from None

    def processAlgorithm(self, parameters: dict[str, Any], context: QgsProcessingContext,  # noqa: N802
                         feedback: Any) -> dict[str, Any]:
        out = self.job_dir(parameters, context)
        planned = self.plan(parameters, context, feedback, out)
        files = classify_results(run_job_blocking(
            self.parameterAsString(parameters, self.PROFILE, context), planned, out, feedback,
            mode=self.name()))
        return {self.OUTPUT: str(out), self.MODEL: files.model or ""}

    def plan(self, parameters: dict[str, Any], context: QgsProcessingContext, feedback: Any,
             out: Path) -> PlannedJob:
        """The job the parameters make (nothing is sent yet)."""
        layers = self.parameterAsLayerList(parameters, self.INPUT, context)
        chosen = {lyr.id() for lyr in self.parameterAsLayerList(parameters, self.VALIDATION,
                                                                 context)}
        outside = chosen - {lyr.id() for lyr in layers}
        if outside:
            raise QgsProcessingException(tr("the validation layers must be among the imagery "
                                            "({n} are not)").format(n=len(outside)))
        images = self.local_rasters(layers, out / "exports", feedback)
        validate = [lyr.id() in chosen for lyr in layers]
        masks = self.local_rasters(self.parameterAsLayerList(parameters, self.MASKS, context),
                                   out / "exports", feedback)
        if len(images) != len(masks):
            raise QgsProcessingException(tr("give one reference mask per imagery layer "
                                            "({i} images, {m} masks)").format(i=len(images),
                                                                             m=len(masks)))
        try:
            params = RunParams(
                mode=self.MODE, tile_size=self.parameterAsInt(parameters, self.TILE_SIZE, context),
                epochs=self.parameterAsInt(parameters, self.EPOCHS, context),
                batch_size=self.parameterAsInt(parameters, self.BATCH_SIZE, context),
                workers=self.parameterAsInt(parameters, self.WORKERS, context),
                overlap=0, learning_rate=self._optional(parameters, self.LEARNING_RATE, context),
                split=self.split(parameters, context),
                patience=self.parameterAsInt(parameters, self.PATIENCE, context),
                **self.model_params(parameters, context), **self.spark_params(parameters, context))
            return plan_job(self.name(), params, [RasterPick(i, m, validate=v)
                                                  for i, m, v in zip(images, masks, validate)])
        except RsPluginError as e:
            raise QgsProcessingException(str(e)) from e


class FineTuneAlgorithm(TrainAlgorithm):
    """Training that starts from an existing model's weights (``rs-cluster train
    --init-model``); the network and width are that model's."""

    MODE = MODE_FINE_TUNE

    def name(self) -> str:
        return "fine_tune"

    def displayName(self) -> str:  # noqa: N802
        return tr("Fine-tune a building model")

    def shortHelpString(self) -> str:  # noqa: N802
        return tr("Like training, but starts from an existing model (a folder on this computer, "
                  "the id of a finished training job on the cluster or, with both left empty, "
                  "the building model built into rs-cluster, whose network needs tiles a "
                  "multiple of 32 px) and keeps its network and width: uploads imagery and "
                  "reference masks (paired in the order given), trains on the cluster at a low "
                  "learning rate ({rate:g} unless one is given) and downloads the new model "
                  "folder.").format(rate=FINE_TUNE_LR)

    def add_model_parameters(self) -> None:
        self.addParameter(QgsProcessingParameterFile(
            self.INIT_MODEL, tr("Model to start from: a folder on this computer (empty, and no "
                                "job below: the built-in model)"),
            behavior=QgsProcessingParameterFile.Folder, optional=True))
        self.addParameter(QgsProcessingParameterString(
            self.INIT_MODEL_JOB, tr("…or the training job on the cluster (job id; empty, and no "
                                    "folder above: the built-in model)"),
            optional=True))

    def model_params(self, parameters: dict[str, Any],
                     context: QgsProcessingContext) -> dict[str, Any]:
        return self.chosen_model(parameters, context, self.INIT_MODEL, self.INIT_MODEL_JOB)


class EvaluateAlgorithm(_ClusterAlgorithm):
    PREDICTED, REFERENCE = "PREDICTED", "REFERENCE"
    REPORT, IOU, F1 = "REPORT", "IOU", "F1"

    def name(self) -> str:
        return "evaluate"

    def displayName(self) -> str:  # noqa: N802
        return tr("Evaluate building masks")

    def shortHelpString(self) -> str:  # noqa: N802
        return tr("Scores predicted masks against reference masks (paired in the order given; "
                  "non-zero = building) on the cluster: IoU, F1, precision, recall per image "
                  "and pooled over all pixels.")

    def initAlgorithm(self, config: Any = None) -> None:  # noqa: N802
        self.add_profile_parameter()
        self.addParameter(QgsProcessingParameterMultipleLayers(
            self.PREDICTED, tr("Predicted masks"), QgsProcessing.TypeRaster))
        self.addParameter(QgsProcessingParameterMultipleLayers(
            self.REFERENCE, tr("Reference masks (same order)"), QgsProcessing.TypeRaster))
        self.addParameter(QgsProcessingParameterFolderDestination(self.OUTPUT, tr("Results folder")))
        self.addOutput(QgsProcessingOutputFile(self.REPORT, tr("Evaluation report (JSON)")))
        self.addOutput(QgsProcessingOutputNumber(self.IOU, tr("Pooled IoU")))
        self.addOutput(QgsProcessingOutputNumber(self.F1, tr("Pooled F1")))

    def processAlgorithm(self, parameters: dict[str, Any], context: QgsProcessingContext,  # noqa: N802
                         feedback: Any) -> dict[str, Any]:
        out = self.job_dir(parameters, context)
        predicted = self.local_rasters(
            self.parameterAsLayerList(parameters, self.PREDICTED, context), out / "exports",
            feedback)
        reference = self.local_rasters(
            self.parameterAsLayerList(parameters, self.REFERENCE, context), out / "exports",
            feedback)
        try:
            planned = plan_evaluation("evaluate", predicted, reference)
        except RsPluginError as e:
            raise QgsProcessingException(str(e)) from e
        files = classify_results(run_job_blocking(
            self.parameterAsString(parameters, self.PROFILE, context), planned, out, feedback,
            mode=self.name()))
        if not files.report:
            raise QgsProcessingException(tr("the job produced no report"))
        report = json.loads(Path(files.report).read_text(encoding="utf-8"))
        pooled = report.get("pooled", {})
        feedback.pushInfo(json.dumps(pooled, indent=1))
        return {self.OUTPUT: str(out), self.REPORT: files.report,
                self.IOU: pooled.get("iou"), self.F1: pooled.get("f1")}


class RsProvider(QgsProcessingProvider):
    def id(self) -> str:
        return PROVIDER_ID

    def name(self) -> str:
        return tr("RS Buildings (cluster)")

    def icon(self) -> QIcon:
        try:
            return QIcon(str(resource_path("icon.svg")))
        except RsPluginError:
            return QgsProcessingProvider.icon(self)

    def loadAlgorithms(self) -> None:  # noqa: N802
        for alg in (TrainAlgorithm(), FineTuneAlgorithm(), PredictAlgorithm(),
                    EvaluateAlgorithm()):
            self.addAlgorithm(alg)

