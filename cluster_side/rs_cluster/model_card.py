"""The model card (``model.json``) that predict reads, and the model as a function of a batch.

:class:`ModelCard` checks a card when it is loaded; :func:`load_predict_fn` compiles the Keras
model once per worker process, scaling 8-bit windows inside the graph; :func:`d4_average` is
test-time augmentation over the 8 symmetries of the square.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from rs_cluster import archs
from rs_cluster.errors import ConfigError
from rs_cluster.keras_file import check_model_file, confined_model_file
from rs_cluster.keras_file import load_model as load_keras_model
from rs_cluster.rasters import _short

MODEL_CARD = "model.json"


MODEL_FORMAT = "rs-cluster-model"


MODEL_FORMAT_VERSIONS = (1,)


BAND_NAMES = ("red", "green", "blue")


SCALINGS = ("divide", "none")


class ModelError(ConfigError):
    """The model cannot be loaded or gives the wrong shape: no raster can be predicted with it."""


@dataclass(frozen=True)
class ModelCard:
    """What predict needs from ``model.json``, checked when loaded."""

    model_dir: str
    model_file: str
    tile_size: int
    bands: tuple[str, ...]
    scaling: str
    scale_value: float
    threshold: float
    architecture: str = ""
    arch: str = archs.LEGACY_ARCH  # which network (rs_cluster.archs); cards before it: 2019's
    gsd_m: float | None = None  # ground metres per pixel it was trained at; None: not known

    @classmethod
    def load(cls, model_dir: str | os.PathLike[str]) -> "ModelCard":
        model_dir = os.path.abspath(model_dir)  # executors may run in another working folder
        path = os.path.join(model_dir, MODEL_CARD)
        if not os.path.isdir(model_dir):
            raise ConfigError(f"{model_dir}: model folder not found")
        try:
            with open(path, encoding="utf-8") as f:
                card = json.load(f)
        except FileNotFoundError:
            raise ConfigError(f"{path}: not found; a model folder holds model.json and the model file "
                              "written by 'rs-cluster train'") from None
        except (OSError, ValueError) as e:
            raise ConfigError(f"{path}: not valid JSON ({_short(e)})") from None
        if not isinstance(card, dict) or card.get("format") != MODEL_FORMAT:
            raise ConfigError(f"{path}: not an rs-cluster model card (format should be {MODEL_FORMAT!r})")
        if card.get("format_version") not in MODEL_FORMAT_VERSIONS:
            raise ConfigError(f"{path}: model card format_version {card.get('format_version')!r} is not "
                              f"supported; this rs-cluster reads {MODEL_FORMAT_VERSIONS}")

        def need(key: str, kind: type | tuple[type, ...]) -> Any:
            value = card.get(key)
            if not isinstance(value, kind) or isinstance(value, bool):
                raise ConfigError(f"{path}: {key!r} is missing or not a {getattr(kind, '__name__', kind)}")
            return value

        model_file = confined_model_file(model_dir, need("model_file", str), path)
        check_model_file(model_file)  # on the driver, before any executor loads it
        tile_size = need("tile_size", int)
        if tile_size < 8:
            raise ConfigError(f"{path}: tile_size {tile_size} is too small")
        bands = tuple(need("bands", list))
        if not bands or any(b not in BAND_NAMES for b in bands):
            raise ConfigError(f"{path}: bands {list(bands)} are not supported; use names from "
                              f"{', '.join(BAND_NAMES)}")
        scaling = card.get("input_scaling") or {"method": "none"}
        method = scaling.get("method") if isinstance(scaling, dict) else None
        if method not in SCALINGS:
            raise ConfigError(f"{path}: input_scaling {scaling!r} is not supported; expected "
                              "{'method': 'divide', 'value': 255.0}")
        value = float(scaling.get("value", 1.0)) if method == "divide" else 1.0
        if value == 0:
            raise ConfigError(f"{path}: input_scaling divides by 0")
        threshold = float(card.get("threshold", 0.5))
        arch = card.get("arch", archs.LEGACY_ARCH)
        if arch not in archs.ARCHS:
            # Another network may want its input scaled otherwise than input_scaling says.
            raise ConfigError(f"{path}: network {arch!r} is not one this rs-cluster knows "
                              f"({', '.join(archs.ARCHS)}); update rs-cluster on the cluster")
        gsd = card.get("gsd_m")
        if gsd is not None and (isinstance(gsd, bool) or not isinstance(gsd, (int, float))
                                or not gsd > 0):
            raise ConfigError(f"{path}: gsd_m {gsd!r} is not a positive number of metres per "
                              "pixel (nor null)")
        return cls(model_dir=model_dir, model_file=model_file, tile_size=tile_size, bands=bands,
                   scaling=method, scale_value=value, threshold=threshold,
                   architecture=str(card.get("architecture", "")), arch=arch,
                   gsd_m=None if gsd is None else float(gsd))

    def scale(self, pixels: np.ndarray) -> np.ndarray:
        x = pixels.astype(np.float32)
        if self.scaling == "divide":
            np.divide(x, np.float32(self.scale_value), out=x)
        return x


_MODELS: dict[tuple[str, int], Callable[[np.ndarray], np.ndarray]] = {}


def d4_average(predict_fn: Callable[[np.ndarray], np.ndarray]) -> Callable[[np.ndarray], np.ndarray]:
    """Test-time augmentation: ``predict_fn`` averaged over the 8 symmetries of the square (4
    rotations, each also mirrored), each prediction turned back before it is added. A building
    seen at a slant the model learned less well is then also seen as it learned it; the cost is
    8 model calls per window."""

    def averaged(batch: np.ndarray) -> np.ndarray:
        total: np.ndarray | None = None
        for flip in (False, True):
            view = batch[:, :, ::-1] if flip else batch
            for k in range(4):
                turned = np.ascontiguousarray(np.rot90(view, k, axes=(1, 2)))
                back = np.rot90(np.asarray(predict_fn(turned), np.float32), -k, axes=(1, 2))
                if flip:
                    back = back[:, :, ::-1]
                total = back.copy() if total is None else total + back
        assert total is not None
        return total / np.float32(8.0)

    return averaged


def load_predict_fn(card: ModelCard, threads: int = 0) -> Callable[[np.ndarray], np.ndarray]:
    """The model as a compiled function of a batch of raw pixels; cached per worker process."""
    key = (card.model_file, os.stat(card.model_file).st_mtime_ns)
    if key in _MODELS:
        return _MODELS[key]
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf

    if threads:
        try:  # only possible before TensorFlow's first op in this process
            tf.config.threading.set_intra_op_parallelism_threads(threads)
            tf.config.threading.set_inter_op_parallelism_threads(min(2, threads))
        except RuntimeError:
            pass
    try:
        model = load_keras_model(card.model_file)  # checked again: no Lambda layers, safe mode
    except Exception as e:
        raise ModelError(f"{card.model_file}: cannot load the Keras model ({_short(e)})") from None
    shape = [None, card.tile_size, card.tile_size, len(card.bands)]

    def scaled(x: Any) -> Any:
        x = tf.cast(x, tf.float32)
        return x / tf.constant(card.scale_value, tf.float32) if card.scaling == "divide" else x

    # 8-bit windows go to TensorFlow as they are and are scaled there: a quarter of the bytes to
    # copy, and the scaling runs on TensorFlow's threads.
    infer_u8 = tf.function(lambda x: model(scaled(x), training=False),
                           input_signature=[tf.TensorSpec(shape, tf.uint8)])
    infer_f32 = tf.function(lambda x: model(scaled(x), training=False),
                            input_signature=[tf.TensorSpec(shape, tf.float32)])

    def predict_fn(batch: np.ndarray) -> np.ndarray:
        if batch.dtype == np.uint8:
            return infer_u8(batch).numpy()
        return infer_f32(batch.astype(np.float32)).numpy()

    _MODELS.clear()
    _MODELS[key] = predict_fn
    return predict_fn
