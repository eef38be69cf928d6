"""The predict stage: a trained model over whole rasters -> georeferenced building masks, with Spark.

Each input raster is one Spark task. The task slides the model's tile over the raster with overlap
(edge windows shifted back inside, as prepare does) and blends overlapping predictions with a
separable weight that is highest at a window's centre, so window borders leave no seam. It works
one strip of windows at a time: only the overlap band between two strips is carried over, and
finished rows are written block by block into a tiled, compressed GeoTIFF (BigTIFF when it could
pass 4 GB, internal overviews added before the rename), so memory depends on the raster's width and
the tile size, never on its height. Reading the next strip and writing finished
rows run on a helper thread while the model computes.

Outputs, per input ``<stem>.<ext>`` in the output folder (written under a hidden name and renamed
into place when complete; the input is only ever opened read-only):

* ``<stem>_mask.tif``: uint8, 255 building / 0 background, the source CRS and transform. Pixels
  that are no data in the input (alpha 0, nodata value, GDAL mask) are 0 and masked out by an
  internal mask band, so QGIS shows them transparent. Imagery that is not 8-bit is stretched to
  0..255 first (:func:`rs_cluster.rasters.input_stretch`, as prepare does); the mask's
  ``RS_INPUT_STRETCH`` tag and ``predict.json`` then say how.
* ``<stem>_prob.tif`` (``probabilities``): float32 building probability, same grid and mask.
* ``<stem>_buildings.gpkg`` (``polygons``): building polygons in the source CRS (see
  :mod:`rs_cluster.polygons`), optionally squared (``regularize``) and with buildings and holes
  under ``min_building_m2`` square metres dropped.
* ``predict.json``: what was written and what failed, for the plugin.

When the model card states the GSD the model was trained at (``gsd_m``) and an input's GSD is
known (from its georeferencing, or ``input_gsd`` for one without), an input more than 10 % away
from it is seen on a grid at the model's GSD (bilinear, read window by window through a GDAL
warped VRT), predicted there into a temporary probability raster in this host's $TMPDIR, and that
is resampled back (bilinear) onto the input's own grid before the threshold: the outputs always
have the input's CRS, transform, width and height. ``predict.json`` says per raster which GSD
the model saw.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import json
import logging
import math
import os
import re
import secrets
import time
import warnings
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from rs_cluster import __version__, archs, builtin, storage
from rs_cluster.atomic import write_json_atomic
from rs_cluster.config import check_keys
from rs_cluster.keras_file import check_model_file, confined_model_file
from rs_cluster.keras_file import load_model as load_keras_model
from rs_cluster.errors import (ClusterError, ConfigError, DiskFullError, InputError, OutputExistsError,
                               OutputWriteError, RasterReadError, RsClusterError, disk_full_error,
                               is_disk_full)
from rs_cluster.progress import Reporter
from rs_cluster.rasters import (RASTER_SUFFIXES, InputStretch, _open, _short, ground_gsd, input_stretch,
                                list_rasters, resampled_grid, same_gsd)
from rs_cluster.settings import SparkResources
from rs_cluster.spark import Poller, resolve_master, spark_session
from rs_cluster.windows import window_starts

MODEL_CARD = "model.json"
MODEL_FORMAT = "rs-cluster-model"
MODEL_FORMAT_VERSIONS = (1,)
PREDICTIONS_JSON = "predict.json"
PREDICTIONS_FORMAT = "rs-cluster-predictions"
MASK_SUFFIX = "_mask"
PROB_SUFFIX = "_prob"
POLYGONS_SUFFIX = "_buildings"
BLOCK = 256  # GeoTIFF tile side; finished rows are written in whole block rows
# Deflate level 1: masks come out about 1.5x larger than at the default level 6, written 3x faster.
ZLEVEL = 1
WEIGHT_FLOOR = 0.01  # blend weight at a window's very edge: >0 so raster edges still count
BAND_NAMES = ("red", "green", "blue")
SCALINGS = ("divide", "none")

_MARK = "<<RS-CLUSTER-ERROR>>"


# -- the model card ------------------------------------------------------------------------------

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


# -- configuration and result --------------------------------------------------------------------

@dataclass(frozen=True)
class PredictConfig:
    model: str
    input: str
    output: str
    overlap: int = 32
    batch_size: int = 32
    threshold: float | None = None  # None: the model card's threshold
    probabilities: bool = False
    polygons: bool = False
    master: str | None = None
    fail_fast: bool = False
    resources: SparkResources | None = None  # overrides of the cluster settings file
    overwrite: bool = False
    min_polygon_px: int = 16
    simplify_px: float = 1.0
    tta: bool = False  # average the model over the 8 flips and rotations of each window
    regularize: bool = False  # square the polygons' outlines
    min_building_m2: float | None = None  # None: drop polygons by min_polygon_px instead
    # Ground metres per pixel of inputs without georeferencing (georeferenced ones say their own).
    input_gsd: float | None = None
    no_resample: bool = False  # predict every input at its own GSD, whatever the model's

    def __post_init__(self) -> None:
        if self.input_gsd is not None and not (isinstance(self.input_gsd, (int, float))
                                               and self.input_gsd > 0):
            raise ConfigError(f"input_gsd must be a positive number of metres per pixel "
                              f"(got {self.input_gsd})")
        if self.overlap < 0:
            raise ConfigError(f"overlap must be 0 or more pixels (got {self.overlap})")
        if self.batch_size < 1:
            raise ConfigError(f"batch size must be at least 1 (got {self.batch_size})")
        if self.threshold is not None and not 0.0 < self.threshold < 1.0:
            raise ConfigError(f"threshold must be between 0 and 1 (got {self.threshold})")
        if self.min_polygon_px < 0 or self.simplify_px < 0:
            raise ConfigError("min_polygon_px and simplify_px must not be negative")
        if self.min_building_m2 is not None and not self.min_building_m2 >= 0:
            raise ConfigError(f"min_building_m2 must be 0 or more square metres (got {self.min_building_m2})")
        if (self.regularize or self.min_building_m2 is not None) and not self.polygons:
            raise ConfigError("regularize and min_building_m2 shape the building polygons; "
                              "ask for polygons too")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "PredictConfig":
        data = check_keys(cls, data, "predict")
        return cls(**data)


@dataclass(frozen=True)
class PredictResult:
    output: str
    outputs: list[dict[str, Any]]
    failures: list[dict[str, str]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    seconds: float = 0.0


def output_names(input_path: str | os.PathLike[str]) -> dict[str, str]:
    """File names predict writes for one input: mask, probabilities and polygons."""
    stem = Path(input_path).stem
    return {"mask": f"{stem}{MASK_SUFFIX}.tif", "probabilities": f"{stem}{PROB_SUFFIX}.tif",
            "polygons": f"{stem}{POLYGONS_SUFFIX}.gpkg"}


# -- blending ------------------------------------------------------------------------------------

def blend_weights(size: int, floor: float = WEIGHT_FLOOR) -> np.ndarray:
    """1-D window weight: a Hann bump from ``floor`` at the edges to 1 at the centre."""
    i = np.arange(size, dtype=np.float64)
    return (floor + (1.0 - floor) * np.sin(np.pi * (i + 0.5) / size) ** 2).astype(np.float32)


def _inverse_coverage(length: int, starts: list[int], weight: np.ndarray) -> np.ndarray:
    """1 / (sum of the weights of every window over each pixel) along one axis.

    The 2-D weight is the outer product of 1-D weights and the windows form a full grid, so the sum
    of 2-D weights over a pixel is the product of these two 1-D sums: no weight raster is needed.
    """
    total = np.zeros(length, dtype=np.float64)
    for s in starts:
        total[s:s + len(weight)] += weight
    return (1.0 / total).astype(np.float32)


# -- one raster ----------------------------------------------------------------------------------

@dataclass
class RasterStats:
    width: int
    height: int
    georeferenced: bool
    crs: str
    windows: int
    building_pixels: int
    valid_pixels: int
    warnings: list[str] = field(default_factory=list)
    input_stretch: dict[str, Any] | None = None
    gsd: dict[str, Any] | None = None  # which GSD the model saw, and whether the input was resampled


def _band_indexes(src: Any, card: ModelCard, path: str) -> tuple[list[int], int | None]:
    """(bands to feed the model, alpha band or None), by colour interpretation, else by position."""
    from rasterio.enums import ColorInterp

    interp = {ci.name: i + 1 for i, ci in reversed(list(enumerate(src.colorinterp)))}
    if all(name in interp for name in card.bands):
        bands = [interp[name] for name in card.bands]
    else:
        bands = [BAND_NAMES.index(name) + 1 for name in card.bands]
    needed = max(BAND_NAMES.index(name) + 1 for name in card.bands)
    if src.count < needed or max(bands) > src.count:
        raise InputError(f"{path}: has {src.count} band(s); the model needs {len(card.bands)} "
                         f"({', '.join(card.bands)}); give it RGB or RGBA imagery")
    alpha = interp.get(ColorInterp.alpha.name)
    if alpha is None and src.count == 4 and 4 not in bands:
        alpha = 4  # RGBA whose fourth band is not tagged as alpha
    return bands, alpha


def _needs_valid_mask(src: Any, alpha: int | None) -> bool:
    from rasterio.enums import MaskFlags

    if alpha is not None or src.nodata is not None:
        return True
    return any(flags != [MaskFlags.all_valid] for flags in src.mask_flag_enums)


def _is_georeferenced(src: Any) -> bool:
    from affine import Affine

    return src.crs is not None or src.transform != Affine.identity() or bool(src.gcps[0])


def _output_profile(src: Any, dtype: str, georeferenced: bool) -> dict[str, Any]:
    # BIGTIFF=IF_SAFER: a classic TIFF stops at 4 GB, and what compression saves is only known
    # at the end; GDAL switches to BigTIFF whenever the uncompressed raster could pass that
    # (a 33000 px square float32 probability map does), instead of failing as the last tiles go.
    profile: dict[str, Any] = {"driver": "GTiff", "width": src.width, "height": src.height, "count": 1,
                               "dtype": dtype, "nodata": None, "tiled": True, "blockxsize": BLOCK,
                               "blockysize": BLOCK, "compress": "deflate", "zlevel": ZLEVEL,
                               "bigtiff": "IF_SAFER"}
    if dtype == "float32":
        profile["predictor"] = 3
    if georeferenced and (src.crs is not None or src.transform != _identity()):
        profile.update(crs=src.crs, transform=src.transform)
    return profile


def overview_levels(width: int, height: int, block: int = BLOCK) -> list[int]:
    """2, 4, 8, ... while the level above is still larger than one block: the smallest overview
    fits in one ``block`` px tile (none for a raster that already does)."""
    levels, level = [], 2
    while max(width, height) / (level // 2) > block:
        levels.append(level)
        level *= 2
    return levels


def _identity() -> Any:
    from affine import Affine

    return Affine.identity()


class _GeoTiffSink:
    """One single-band output GeoTIFF under a hidden name: :meth:`finish` closes it, checking that
    GDAL wrote all of it, :meth:`commit` renames it into place."""

    def __init__(self, final: str, profile: dict[str, Any], gcps: Any, token: str) -> None:
        import rasterio

        self.final = final
        self.width, self.height, self.dtype = profile["width"], profile["height"], profile["dtype"]
        self.tmp = os.path.join(os.path.dirname(final), f".{os.path.basename(final)}.partial-{token}")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # NotGeoreferencedWarning: intended for pixel-grid input
            with _naming_a_full_disk(self.final, "creating it"):
                self.dst = rasterio.open(self.tmp, "w", **profile)
        if gcps is not None:
            self.dst.gcps = gcps

    def write(self, array: np.ndarray, row: int, valid: np.ndarray | None) -> None:
        from rasterio.windows import Window as RioWindow

        window = RioWindow(0, row, array.shape[1], array.shape[0])
        with _naming_a_full_disk(self.final, "writing it"):
            self.dst.write(array, 1, window=window)
            if valid is not None:
                self.dst.write_mask(valid, window=window)

    def finish(self) -> None:
        import rasterio

        # rasterio's close() does not raise when GDAL fails to write the last blocks or the TIFF
        # directory (rasterio 1.4, GDAL 3.9): it logs the errors and returns, and the broken file
        # would be renamed into place as if complete.
        with rasterio.Env(), _gdal_errors() as errors:
            self.dst.close()
            if not errors:
                self._add_overviews()
        if errors:
            failure = OSError("; ".join(errors))
            if is_disk_full(failure):
                raise disk_full_error(failure, self.final, "writing it")
            raise OutputWriteError(f"{self.final}: could not finish writing it ({errors[0]})")

    def _add_overviews(self) -> None:
        """Internal overviews (2x, 4x, ... until one fits a 256 px block), so QGIS draws a large
        mask zoomed out from a few blocks instead of reading every pixel: the most common value
        for a mask (crisp 0/255), the mean for probabilities. Before the rename, so an output in
        place always has them."""
        import rasterio
        from rasterio.enums import Resampling

        levels = overview_levels(self.width, self.height)
        if not levels:
            return
        resampling = Resampling.mode if self.dtype == "uint8" else Resampling.average
        with _naming_a_full_disk(self.final, "adding its overviews"), \
                rasterio.open(self.tmp, "r+") as dst:
            dst.build_overviews(levels, resampling)
            dst.update_tags(ns="rio_overview", resampling=resampling.name)

    def commit(self) -> None:
        os.replace(self.tmp, self.final)

    def discard(self) -> None:
        if not self.dst.closed:
            self.dst.close()
        if os.path.exists(self.tmp):
            os.unlink(self.tmp)


@contextlib.contextmanager
def _naming_a_full_disk(path: str, doing: str) -> Iterator[None]:
    """GDAL says "Write failed"; when ENOSPC lies underneath, raise the error naming the output.

    The ENOSPC may be in the exception, in what GDAL logged before it (libtiff's strerror), or
    nowhere: a dirty block GDAL's cache flushes in the middle of a write fails as "An error
    occurred while writing a dirty block". Then the output's disk itself is asked."""
    with _gdal_errors() as logged:
        try:
            yield
        except Exception as e:
            if is_disk_full(e) or any(is_disk_full(OSError(m)) for m in logged) or \
                    _out_of_space(path):
                raise disk_full_error(e, path, doing) from e
            raise


def _out_of_space(path: str, spare: int = 1 << 20) -> bool:
    """Whether the disk that holds ``path`` has under ``spare`` bytes left for this user."""
    try:
        st = os.statvfs(os.path.dirname(os.path.abspath(path)))
    except OSError:
        return False
    return st.f_bavail * st.f_frsize < spare


@contextlib.contextmanager
def _gdal_errors() -> Iterator[list[str]]:
    """Collects the errors GDAL signals meanwhile, which rasterio logs (at INFO) instead of raising."""
    found: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            message = record.getMessage()
            if "GDAL signalled an error" in message:
                found.append(message)

    logger = logging.getLogger("rasterio")
    handler, level = Collect(), logger.level
    logger.addHandler(handler)
    logger.setLevel(min(logger.getEffectiveLevel(), logging.INFO))
    try:
        yield found
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


class _RowWriter:
    """Collects finished rows and writes them in whole 256-row blocks (each tile compressed once)."""

    def __init__(self, sinks: dict[str, _GeoTiffSink], threshold: float, with_valid: bool) -> None:
        self.sinks = sinks
        self.threshold = np.float32(threshold)
        self.with_valid = with_valid
        self.pending: list[tuple[np.ndarray, np.ndarray | None]] = []
        self.pending_rows = 0
        self.row = 0
        self.building = 0
        self.valid_pixels = 0

    def add(self, prob: np.ndarray, valid: np.ndarray | None) -> None:
        self.pending.append((prob, valid))
        self.pending_rows += prob.shape[0]
        if self.pending_rows >= BLOCK:
            self._flush(self.pending_rows - self.pending_rows % BLOCK)

    def close(self) -> None:
        if self.pending_rows:
            self._flush(self.pending_rows)

    def _flush(self, rows: int) -> None:
        prob = np.concatenate([p for p, _ in self.pending])
        valid = np.concatenate([v for _, v in self.pending]) if self.with_valid else None
        head, tail = prob[:rows], prob[rows:]
        mask = np.where(head > self.threshold, np.uint8(255), np.uint8(0))
        valid_head = None
        if valid is not None:
            valid_head = valid[:rows]
            mask[valid_head == 0] = 0
            head = np.where(valid_head == 0, np.float32(0), head)
            self.valid_pixels += int(np.count_nonzero(valid_head))
        else:
            self.valid_pixels += head.size
        self.building += int(np.count_nonzero(mask))
        if "mask" in self.sinks:
            self.sinks["mask"].write(mask, self.row, valid_head)
        if "probabilities" in self.sinks:
            self.sinks["probabilities"].write(np.ascontiguousarray(head), self.row, valid_head)
        self.row += rows
        self.pending = [(tail, valid[rows:] if valid is not None else None)] if len(tail) else []
        self.pending_rows = len(tail)


class _RowSource:
    """Serves row ranges of a raster that only move down, reading whole block rows.

    A window read that cuts through the source's blocks is several times slower in GDAL than one
    aligned with them, and consecutive strips overlap; so rows are read in aligned chunks and kept
    until no later strip needs them.
    """

    def __init__(self, src: Any, path: str, bands: list[int], alpha: int | None, with_valid: bool) -> None:
        self.src, self.path, self.bands, self.alpha, self.with_valid = src, path, bands, alpha, with_valid
        block_rows = max(1, src.block_shapes[0][0])
        self.chunk = block_rows * max(1, math.ceil(BLOCK / block_rows))
        self.top = self.bottom = 0
        self.pixels = np.zeros((len(bands), 0, src.width), dtype=src.dtypes[0])
        self.valid = np.zeros((0, src.width), dtype=np.uint8) if with_valid else None

    def rows(self, top: int, bottom: int) -> tuple[np.ndarray, np.ndarray | None]:
        while self.bottom < bottom:
            self._extend()
        drop = top - self.top
        if drop > 0:
            self.pixels = self.pixels[:, drop:]
            if self.valid is not None:
                self.valid = self.valid[drop:]
            self.top = top
        n = bottom - top
        return self.pixels[:, :n], None if self.valid is None else self.valid[:n]

    def _extend(self) -> None:
        from rasterio.windows import Window as RioWindow

        start = self.bottom
        rows = min(self.chunk, self.src.height - start)
        window = RioWindow(0, start, self.src.width, rows)
        try:
            pixels = self.src.read(self.bands, window=window)
        except Exception as e:  # rasterio raises several types for undecodable data
            raise _unreadable_rows(self.path, window, e) from e
        self.pixels = np.concatenate([self.pixels, pixels], axis=1)
        if self.valid is not None:
            self.valid = np.concatenate([self.valid,
                                         _valid_rows(self.src, self.path, self.alpha, window)])
        self.bottom = start + rows


def predict_raster(path: str, card: ModelCard, predict_fn: Callable[[np.ndarray], np.ndarray],
                   outputs: dict[str, str], *, overlap: int, batch_size: int, threshold: float,
                   token: str | None = None,
                   on_progress: Callable[[int, int], None] | None = None,
                   input_gsd: float | None = None, resample: bool = True) -> RasterStats:
    """Predicts one raster into the GeoTIFFs named in ``outputs`` (``mask``, ``probabilities``).

    With ``resample`` and a card that has ``gsd_m``, a raster whose GSD (its georeferencing's, or
    ``input_gsd`` when it has none) is more than 10 % away is predicted at the model's GSD and
    the result put back on its own grid (see the module's docstring).

    ``predict_fn`` maps a batch of raw pixels (N, T, T, bands), in the raster's data type, to
    probabilities (N, T, T[, 1]); scaling them as the model card says is its job
    (:func:`load_predict_fn` does it inside the compiled graph, :meth:`ModelCard.scale` in numpy).
    ``on_progress(windows done, windows total)`` is called after each strip.
    """
    import rasterio

    token = token or secrets.token_hex(4)
    tile = card.tile_size
    if not 0 <= overlap < tile:
        raise ConfigError(f"overlap {overlap} must be smaller than the model's tile size {tile}")
    stride = tile - overlap
    with _open(path) as src:
        bands, alpha = _band_indexes(src, card, path)
        height, width = src.height, src.width
        # The GDAL block cache would otherwise keep up to 5% of RAM of decoded blocks. Rows are
        # read and written in whole block rows, once each: one block row of the input and of the
        # outputs (uint8 + float32) is all it needs to hold.
        block_rows = max(BLOCK, src.block_shapes[0][0])
        cache_mb = 16 + math.ceil(width * block_rows * (src.count * np.dtype(src.dtypes[0]).itemsize + 5)
                                  / 2**20)
        plan = _gsd_plan(src, path, card.gsd_m, input_gsd, resample)
        with rasterio.Env(GDAL_CACHEMAX=cache_mb):
            if plan.grid is None:
                stats = _predict_open(src, path, card, predict_fn, outputs, bands, alpha, stride,
                                      batch_size, threshold, token, on_progress, height, width)
            else:
                stats = _predict_resampled(src, path, card, predict_fn, outputs, bands, alpha,
                                           stride, batch_size, threshold, token, on_progress, plan)
    stats.warnings.extend(plan.notes)
    stats.gsd = plan.record
    return stats


# A frame to resample a raster without georeferencing in, at its stated GSD: any projected CRS
# serves, since the raster is only ever resampled within it, never reprojected.
_PIXEL_FRAME_CRS = "EPSG:3857"


@dataclass(frozen=True)
class _GsdPlan:
    """How one raster meets the model's GSD: the record for predict.json, notes for the analyst
    and, when it is resampled, ``frame`` (the CRS and transform the raster is read in) and
    ``grid`` (transform, width, height at the model's GSD, in that frame)."""

    record: dict[str, Any]
    notes: tuple[str, ...] = ()
    frame: tuple[Any, Any] | None = None
    grid: tuple[Any, int, int] | None = None


def _gsd_plan(src: Any, path: str, model_gsd: float | None, input_gsd: float | None,
              resample: bool) -> _GsdPlan:
    from affine import Affine
    from rasterio.crs import CRS

    try:
        found = ground_gsd(src.crs, src.transform, src.width, src.height, path)
    except InputError:
        if model_gsd is not None and resample:
            raise
        found = None  # nothing is resampled, so a CRS it cannot measure does not matter
    notes: list[str] = []
    origin = "georeferencing" if found else None
    frame = (src.crs, src.transform) if found else None
    if found is None and input_gsd is not None:
        found, origin = (input_gsd, input_gsd), "input_gsd"
        frame = (CRS.from_user_input(_PIXEL_FRAME_CRS), Affine(input_gsd, 0, 0, 0, -input_gsd, 0))
    elif found is not None and input_gsd is not None and not same_gsd(sum(found) / 2, input_gsd):
        notes.append(f"{path}: input_gsd {input_gsd:g} m/px is not used for it: its "
                     f"georeferencing says {sum(found) / 2:.3g} m/px")
    source = None if found is None else round(sum(found) / 2, 6)
    record: dict[str, Any] = {"input_gsd_m": source, "input_gsd_from": origin,
                              "model_gsd_m": model_gsd, "resample": resample,
                              "resampled": False, "gsd_m": source}
    if model_gsd is None or not resample:
        return _GsdPlan(record, tuple(notes))
    if found is None or frame is None:
        notes.append(f"{path}: its ground sampling distance is unknown (no georeferencing), so it "
                     f"is predicted as it is, not resampled to the model's {model_gsd:g} m/px; "
                     "state it with input_gsd (--input-gsd) if it differs")
        return _GsdPlan(record, tuple(notes))
    grid = resampled_grid(frame[1], src.width, src.height, found, model_gsd)
    if grid is None:  # within 10 % of the model's GSD: predicted on its own pixels
        return _GsdPlan(record, tuple(notes))
    _, width, height = grid
    seen = (found[0] * src.width / width + found[1] * src.height / height) / 2
    record.update(resampled=True, gsd_m=round(seen, 6), resampled_width=width,
                  resampled_height=height)
    return _GsdPlan(record, tuple(notes), frame, grid)


def _no_georeferencing_note(path: str) -> str:
    return (f"{path}: has no georeferencing; its mask is on the same pixel grid, "
            "without coordinates")


def _unreadable_rows(path: str, window: Any, e: BaseException) -> RasterReadError:
    return RasterReadError(f"{path}: corrupt or truncated raster; cannot read rows "
                           f"{window.row_off}-{window.row_off + window.height} "
                           f"({_short(e.__cause__ or e)})")


def _valid_rows(src: Any, path: str, alpha: int | None, window: Any) -> np.ndarray:
    """The raster's valid-pixel mask (0 = no data) over ``window``, alpha 0 included."""
    try:
        valid = src.dataset_mask(window=window)
        if alpha is not None:
            valid = np.where(src.read(alpha, window=window) == 0, np.uint8(0), valid)
    except Exception as e:  # rasterio raises several types for undecodable data
        raise _unreadable_rows(path, window, e) from e
    return valid


def _open_sinks(sinks: dict[str, _GeoTiffSink], src: Any, outputs: dict[str, str],
                georeferenced: bool, token: str, stretch: InputStretch) -> None:
    """Opens into ``sinks`` (so that a failure part-way leaves them to be discarded) the mask and
    probability GeoTIFFs named in ``outputs``, on ``src``'s grid, tagged with its stretch."""
    gcps = src.gcps if src.gcps[0] and src.crs is None else None
    for kind in ("mask", "probabilities"):
        if kind in outputs:
            profile = _output_profile(src, "uint8" if kind == "mask" else "float32", georeferenced)
            sinks[kind] = _GeoTiffSink(outputs[kind], profile, gcps, token)
            if not stretch.identity:
                sinks[kind].dst.update_tags(RS_INPUT_STRETCH=json.dumps(stretch.to_dict()))


@contextlib.contextmanager
def _all_or_nothing(sinks: dict[str, _GeoTiffSink]) -> Iterator[None]:
    """Commits the sinks (filled in the block) only when the block ends well, all finished before
    any is renamed, so a raster's outputs appear together or not at all; otherwise discards them."""
    try:
        yield
        for sink in sinks.values():
            sink.finish()
        for sink in sinks.values():
            sink.commit()
    except BaseException:
        for sink in sinks.values():
            sink.discard()
        raise


def _predict_resampled(src: Any, path: str, card: ModelCard,
                       predict_fn: Callable[[np.ndarray], np.ndarray], outputs: dict[str, str],
                       bands: list[int], alpha: int | None, stride: int, batch_size: int,
                       threshold: float, token: str,
                       on_progress: Callable[[int, int], None] | None, plan: _GsdPlan) -> RasterStats:
    """Predicts ``src`` on ``plan.grid`` into a temporary probability raster ($TMPDIR, deleted
    afterwards), then resamples it back onto the source grid (bilinear) and thresholds it there.
    The outputs are written under hidden names and renamed into place together once complete,
    as :func:`_predict_open` does: a half-written output never looks complete."""
    import shutil

    import rasterio
    from rasterio.enums import Resampling
    from rasterio.vrt import WarpedVRT
    from rasterio.windows import Window as RioWindow

    assert plan.frame is not None and plan.grid is not None
    frame_crs, frame_transform = plan.frame
    grid_transform, grid_width, grid_height = plan.grid
    # The stretch is the source's own, as prepare takes it, not that of the resampled pixels.
    stretch = input_stretch(src, path, bands)
    georeferenced = _is_georeferenced(src)
    scratch = storage.temp_dir()
    try:
        prob_path = os.path.join(scratch, "probabilities.tif")
        with WarpedVRT(src, src_crs=frame_crs, src_transform=frame_transform, crs=frame_crs,
                       transform=grid_transform, width=grid_width, height=grid_height,
                       resampling=Resampling.bilinear) as vrt:
            inner = _predict_open(vrt, path, card, predict_fn, {"probabilities": prob_path}, bands,
                                  alpha, stride, batch_size, threshold, token, on_progress,
                                  grid_height, grid_width, stretch=stretch)
        notes = list(inner.warnings)
        if not georeferenced:
            notes.append(_no_georeferencing_note(path))
        with_valid = _needs_valid_mask(src, alpha)
        sinks: dict[str, _GeoTiffSink] = {}
        with _all_or_nothing(sinks):
            _open_sinks(sinks, src, outputs, georeferenced, token, stretch)
            writer = _RowWriter(sinks, threshold, with_valid)
            with rasterio.open(prob_path) as prob_src, \
                    WarpedVRT(prob_src, src_crs=frame_crs, src_transform=grid_transform,
                              crs=frame_crs, transform=frame_transform, width=src.width,
                              height=src.height, resampling=Resampling.bilinear) as back:
                for top in range(0, src.height, BLOCK):
                    window = RioWindow(0, top, src.width, min(BLOCK, src.height - top))
                    prob = back.read(1, window=window)
                    valid = _valid_rows(src, path, alpha, window) if with_valid else None
                    writer.add(prob, valid)
            writer.close()
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return RasterStats(width=src.width, height=src.height, georeferenced=georeferenced,
                       crs=src.crs.to_string() if src.crs else "", windows=inner.windows,
                       building_pixels=writer.building, valid_pixels=writer.valid_pixels,
                       warnings=notes, input_stretch=stretch.to_dict())


def _predict_open(src: Any, path: str, card: ModelCard, predict_fn: Callable[[np.ndarray], np.ndarray],
                  outputs: dict[str, str], bands: list[int], alpha: int | None, stride: int,
                  batch_size: int, threshold: float, token: str,
                  on_progress: Callable[[int, int], None] | None, height: int, width: int,
                  stretch: InputStretch | None = None) -> RasterStats:

    tile = card.tile_size
    notes: list[str] = []
    if stretch is None:
        stretch = input_stretch(src, path, bands)  # the same rule as prepare's tiles
    if not stretch.identity:
        notes.append(stretch.describe(path))
    georeferenced = _is_georeferenced(src)
    if not georeferenced:
        notes.append(_no_georeferencing_note(path))
    # A raster smaller than the tile is padded by mirroring; the padding is never written.
    vh, vw = max(height, tile), max(width, tile)
    row_starts = window_starts(vh, tile, stride)
    col_starts = window_starts(vw, tile, stride)
    total = len(row_starts) * len(col_starts)
    w1 = blend_weights(tile)
    w2 = np.outer(w1, w1)
    row_norm = _inverse_coverage(vh, row_starts, w1)
    col_norm = _inverse_coverage(vw, col_starts, w1)
    with_valid = _needs_valid_mask(src, alpha)

    source = _RowSource(src, path, bands, alpha if with_valid else None, with_valid)

    def read_strip(top: int) -> tuple[np.ndarray, np.ndarray | None]:
        pixels, valid = source.rows(top, min(top + tile, height))
        x = stretch.apply(pixels).transpose(1, 2, 0)
        if x.shape[0] < tile or x.shape[1] < vw:
            x = np.pad(x, ((0, tile - x.shape[0]), (0, vw - x.shape[1]), (0, 0)), mode="symmetric")
        return x, valid

    sinks: dict[str, _GeoTiffSink] = {}
    with _all_or_nothing(sinks):
        _open_sinks(sinks, src, outputs, georeferenced, token, stretch)
        writer = _RowWriter(sinks, threshold, with_valid)
        acc = np.zeros((tile, vw), dtype=np.float32)
        done = 0
        with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="rs-predict-io") as io:
            next_strip = io.submit(read_strip, row_starts[0])
            writing: concurrent.futures.Future | None = None
            for k, top in enumerate(row_starts):
                x, valid = next_strip.result()
                if k + 1 < len(row_starts):
                    next_strip = io.submit(read_strip, row_starts[k + 1])
                for b in range(0, len(col_starts), batch_size):
                    cols = col_starts[b:b + batch_size]
                    batch = np.stack([x[:, c:c + tile] for c in cols])
                    prob = np.asarray(predict_fn(batch), dtype=np.float32)
                    if prob.size != len(cols) * tile * tile:
                        raise ModelError(f"{card.model_file}: gives {prob.shape[1:]} per window; a "
                                         f"building probability ({tile}, {tile}, 1) was expected")
                    prob = prob.reshape(len(cols), tile, tile)
                    for c, p in zip(cols, prob):
                        acc[:, c:c + tile] += p * w2
                    done += len(cols)
                bottom = row_starts[k + 1] if k + 1 < len(row_starts) else vh
                n = bottom - top
                rows = min(bottom, height) - top
                final = acc[:rows, :width] * row_norm[top:top + rows, None] * col_norm[None, :width]
                acc[:tile - n] = acc[n:]
                acc[tile - n:] = 0
                if writing is not None:
                    writing.result()
                writing = io.submit(writer.add, final, None if valid is None else valid[:rows])
                if on_progress is not None:
                    on_progress(done, total)
            if writing is not None:
                writing.result()
        writer.close()
    return RasterStats(width=width, height=height, georeferenced=georeferenced,
                       crs=src.crs.to_string() if src.crs else "", windows=total,
                       building_pixels=writer.building, valid_pixels=writer.valid_pixels,
                       warnings=notes, input_stretch=stretch.to_dict())


# -- executor side -------------------------------------------------------------------------------

@dataclass(frozen=True)
class _RasterJob:
    index: int
    input: str
    outputs: dict[str, str]
    card: ModelCard
    overlap: int
    batch_size: int
    threshold: float
    polygons: str | None
    min_polygon_px: int
    simplify_px: float
    progress_file: str
    token: str
    threads: int
    fail_fast: bool
    model_url: str | None = None  # a model folder in a store: each executor downloads it once
    builtin: str | None = None  # a built-in model: each executor loads its own installation's
    tta: bool = False
    regularize: bool = False
    min_building_m2: float | None = None
    input_gsd: float | None = None
    resample: bool = True

    @property
    def remote(self) -> bool:
        """Whether an input or output is in a store: the task then works on local copies."""
        locations = [self.input, *self.outputs.values(), *([self.polygons] if self.polygons else [])]
        return not all(storage.is_local(x) for x in locations)


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


def _run_job(job: _RasterJob) -> dict[str, Any]:
    """Executor side: predict one raster; returns its summary, or its error unless fail-fast."""
    started = time.monotonic()
    last = [0.0]

    def progress(done: int, total: int) -> None:
        now = time.monotonic()
        if now - last[0] >= 0.5 or done == total:
            last[0] = now
            _write_progress(job.progress_file, done)

    try:
        return _predict_job(job, started, progress)
    finally:
        with contextlib.suppress(OSError), open(job.progress_file + ".end", "w", encoding="utf-8"):
            pass  # only for the progress count; a full disk must not hide the raster's own result


def _executor_predict_fn(job: _RasterJob) -> Callable[[np.ndarray], np.ndarray]:
    """The job's model: from the card's folder, or, for a model in a store, from a copy in this
    host's $TMPDIR that is deleted once loaded (kept in memory for the run's next rasters)."""
    if job.builtin is not None:
        folder = builtin.resolve(f"{builtin.PREFIX}:{job.builtin}")
        card = dataclasses.replace(job.card, model_dir=folder, model_file=os.path.join(
            folder, os.path.basename(job.card.model_file)))
        return load_predict_fn(card, job.threads)
    if job.model_url is None:
        return load_predict_fn(job.card, job.threads)
    key = (job.model_url, job.token)
    if key not in _REMOTE_MODELS:
        with storage.local_input(job.model_url) as folder:
            rel = os.path.relpath(job.card.model_file, job.card.model_dir)
            card = dataclasses.replace(job.card, model_dir=folder,
                                       model_file=os.path.join(folder, rel))
            fn = load_predict_fn(card, job.threads)
        _REMOTE_MODELS.clear()
        _REMOTE_MODELS[key] = fn
    return _REMOTE_MODELS[key]


_REMOTE_MODELS: dict[tuple[str, str], Callable[[np.ndarray], np.ndarray]] = {}


def _predict_job(job: _RasterJob, started: float, progress: Callable[[int, int], None]) -> dict[str, Any]:
    if not job.remote:
        return _predict_local_job(job, started, progress)
    # Inputs and outputs in a store: the raster is copied into this host's $TMPDIR, predicted
    # there as on a disk, and each output uploaded whole once complete.
    scratch = storage.temp_dir()
    try:
        with storage.local_input(job.input, sidecars=True) as local_input:
            local = {k: os.path.join(scratch, storage.basename(v)) for k, v in job.outputs.items()}
            local_polygons = (os.path.join(scratch, storage.basename(job.polygons))
                              if job.polygons else None)
            local_job = dataclasses.replace(job, input=local_input, outputs=local,
                                            polygons=local_polygons)
            names = {local_input: job.input, **{local[k]: job.outputs[k] for k in local}}
            if local_polygons and job.polygons:
                names[local_polygons] = job.polygons

            def named(text: Any) -> Any:
                if isinstance(text, str):
                    for path, url in names.items():
                        text = text.replace(path, url)
                return text

            try:
                summary = _predict_local_job(local_job, started, progress)
            except RuntimeError as e:  # fail-fast: the message names the local copies
                raise RuntimeError(named(str(e))) from None
            if "error" not in summary:
                for key in ("mask", "probabilities"):
                    if key in local:
                        storage.upload(local[key], job.outputs[key])
                if local_polygons and job.polygons:
                    storage.upload(local_polygons, job.polygons)
        out = {k: named(v) for k, v in summary.items()}
        if isinstance(summary.get("warnings"), list):
            out["warnings"] = [named(w) for w in summary["warnings"]]
        return out
    except RsClusterError as e:
        if job.fail_fast:
            raise RuntimeError(f"{_MARK}{e}{_MARK}") from None
        return {"input": job.input, "error": str(e)}
    finally:
        import shutil

        shutil.rmtree(scratch, ignore_errors=True)


def _predict_local_job(job: _RasterJob, started: float,
                       progress: Callable[[int, int], None]) -> dict[str, Any]:
    try:
        predict_fn = _executor_predict_fn(job)
        if job.tta:
            predict_fn = d4_average(predict_fn)
        loaded, cpu = time.monotonic(), time.process_time()
        stats = predict_raster(job.input, job.card, predict_fn, job.outputs, overlap=job.overlap,
                               batch_size=job.batch_size, threshold=job.threshold, token=job.token,
                               on_progress=progress, input_gsd=job.input_gsd,
                               resample=job.resample)
        summary: dict[str, Any] = {"input": job.input, **job.outputs, **asdict(stats),
                                   "model_load_seconds": round(loaded - started, 3),
                                   "predict_seconds": round(time.monotonic() - loaded, 3),
                                   "predict_cpu_seconds": round(time.process_time() - cpu, 3)}
        if job.polygons:
            from rs_cluster.polygons import polygonize_mask

            summary["polygons"] = job.polygons
            summary["polygon_count"] = polygonize_mask(
                job.outputs["mask"], job.polygons, min_area_px=job.min_polygon_px,
                simplify_px=job.simplify_px, token=job.token, regularize=job.regularize,
                min_building_m2=job.min_building_m2, warn=summary["warnings"].append)
        summary["seconds"] = round(time.monotonic() - started, 3)
        return summary
    except ModelError as e:
        return {"input": job.input, "error": str(e), "fatal": "model"}
    except DiskFullError as e:  # every raster after it would fail the same way
        return {"input": job.input, "error": str(e), "fatal": "disk"}
    except RsClusterError as e:
        if job.fail_fast:
            raise RuntimeError(f"{_MARK}{e}{_MARK}") from None
        return {"input": job.input, "error": str(e)}
    except Exception as e:  # an unexpected library error is still reported against its file
        if is_disk_full(e):
            return {"input": job.input, "fatal": "disk",
                    "error": str(disk_full_error(e, doing=f"predicting {job.input}"))}
        message = f"{job.input}: prediction failed ({type(e).__name__}: {_short(e)})"
        if job.fail_fast:
            raise RuntimeError(f"{_MARK}{message}{_MARK}") from None
        return {"input": job.input, "error": message}


def _write_progress(path: str, done: int) -> None:
    tmp = f"{path}.tmp"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(str(done))
        os.replace(tmp, path)
    except OSError:
        pass  # only for the progress bar; the outputs report a full disk themselves


def _read_progress(folder: str) -> int:
    total = 0
    try:
        names = os.listdir(folder)
    except FileNotFoundError:
        return 0
    for name in names:
        if name.endswith(".done"):
            try:
                with open(os.path.join(folder, name), encoding="utf-8") as f:
                    total += int(f.read() or 0)
            except (OSError, ValueError):
                continue
    return total


# -- driver side ---------------------------------------------------------------------------------

def _list_inputs(path: str) -> list[str]:
    """Absolute paths (or URLs) of the input rasters: executors may run in another folder."""
    if not storage.is_local(path):
        from rs_cluster.rasters import _list_located

        url = path.rstrip("/")
        if storage.is_file(url):
            return [url]
        if not storage.exists(url):
            raise InputError(f"{url}: input not found (expected a raster or a folder of rasters)")
        found = [str(p) for p in _list_located(url)]
        if not found:
            raise InputError(f"{url}: no rasters found (looked for {', '.join(RASTER_SUFFIXES)})")
        return found
    path = os.path.abspath(storage.local_path(path) or path)
    if os.path.isdir(path):
        found = [str(p) for p in list_rasters(path, refuse_unknown=True)]
        if not found:
            raise InputError(f"{path}: no rasters found (looked for {', '.join(RASTER_SUFFIXES)})")
        return found
    if not os.path.exists(path):
        raise InputError(f"{path}: input not found (expected a raster or a folder of rasters)")
    return [path]


def _raster_size(path: str, model_gsd: float | None = None, input_gsd: float | None = None,
                 resample: bool = True) -> tuple[int, int] | str:
    """(height, width) the model will see (from the header, at ``model_gsd`` when the raster is
    resampled to it), or the error message when the raster cannot be opened or measured."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with storage.gdal_path(path) as readable:
                try:
                    with _open(readable) as src:
                        grid = _gsd_plan(src, readable, model_gsd, input_gsd, resample).grid
                        if grid is not None:
                            return grid[2], grid[1]
                        return src.height, src.width
                except RsClusterError as e:
                    return str(e).replace(readable, path)
    except RsClusterError as e:
        return str(e)


def _user_error(exc: BaseException) -> str | None:
    m = re.search(re.escape(_MARK) + r"(.*?)" + re.escape(_MARK), str(exc), re.S)
    return m.group(1) if m else None


def run_predict(cfg: PredictConfig, *, reporter: Reporter | None = None, spark: Any = None) -> PredictResult:
    """Predicts building masks for ``cfg.input`` (a raster or a folder of rasters) into ``cfg.output``."""
    reporter = reporter or Reporter()
    started = time.monotonic()
    named = builtin.name_of(cfg.model)  # each executor finds its own copy of a built-in model
    model = builtin.resolve(cfg.model)
    model_url = None if storage.is_local(model) else model.rstrip("/")
    # A model in a store is checked here on a copy; each executor downloads its own.
    with storage.local_input(model) as model_dir:
        card = ModelCard.load(storage.local_path(model_dir) or model_dir)
    if cfg.overlap >= card.tile_size:
        raise ConfigError(f"overlap {cfg.overlap} must be smaller than the model's tile size "
                          f"{card.tile_size}")
    threshold = card.threshold if cfg.threshold is None else cfg.threshold
    inputs = _list_inputs(cfg.input)
    remote_output = not storage.is_local(cfg.output)
    output = cfg.output.rstrip("/") if remote_output else \
        os.path.abspath(storage.local_path(cfg.output) or cfg.output)

    wanted = ["mask"] + (["probabilities"] if cfg.probabilities else []) + (["polygons"] if cfg.polygons else [])
    planned: dict[str, dict[str, str]] = {}
    by_stem: dict[str, str] = {}
    for path in inputs:
        stem = Path(storage.basename(path)).stem
        if stem in by_stem:
            raise InputError(f"{path}: its outputs would overwrite those of {by_stem[stem]} "
                             "(same file name stem); rename one of them")
        by_stem[stem] = path
        names = output_names(storage.basename(path))
        planned[path] = {k: storage.join(output, names[k]) for k in wanted}
    existing = [p for outs in planned.values() for p in outs.values() if storage.exists(p)]
    if existing and not cfg.overwrite:
        more = f" (and {len(existing) - 1} more)" if len(existing) > 1 else ""
        raise OutputExistsError(f"{existing[0]}: already exists{more}; pass --overwrite to replace")
    storage.make_dirs(output)

    failures: list[dict[str, str]] = []
    sizes: dict[str, tuple[int, int]] = {}
    for path in inputs:
        size = _raster_size(path, card.gsd_m, cfg.input_gsd, not cfg.no_resample)
        if isinstance(size, str):
            if cfg.fail_fast:
                raise RasterReadError(size)
            failures.append({"input": path, "error": size})
            reporter.warning(f"failed: {size}")
        else:
            sizes[path] = size

    stride = card.tile_size - cfg.overlap

    def windows_of(h: int, w: int) -> int:
        t = card.tile_size
        return len(window_starts(max(h, t), t, stride)) * len(window_starts(max(w, t), t, stride))

    total_windows = sum(windows_of(h, w) for h, w in sizes.values())
    token = f"{os.getpid()}-{secrets.token_hex(3)}"
    # Executors on this host count their windows in files here; elsewhere (a store) there is
    # no shared folder, and the count moves one raster at a time instead.
    progress_dir = os.path.join(storage.temp_dir() if remote_output else output,
                                f".predict-progress-{token}")
    os.makedirs(progress_dir, exist_ok=True)
    outputs: list[dict[str, Any]] = []
    notes: list[str] = []
    master = resolve_master(cfg.master)
    reporter.start("predict", total=total_windows, unit="windows",
                   message=f"predicting {len(sizes)} raster(s) on Spark ({master})")
    try:
        if sizes:
            with spark_session(cfg.master, "rs-cluster predict", spark=spark,
                               resources=cfg.resources) as session:
                sc = session.sparkContext
                slots = max(1, sc.defaultParallelism)
                concurrent_tasks = max(1, min(len(sizes), slots))
                # In-process tasks share this host's cores; a cluster task gets the cores Spark
                # gives each task (spark.task.cpus), not every core of its node.
                threads = (max(1, (os.cpu_count() or 1) // concurrent_tasks)
                           if master.startswith("local")
                           else max(1, int(sc.getConf().get("spark.task.cpus", "1"))))
                # Largest rasters first, so a big one does not start last and run alone.
                order = sorted(sizes, key=lambda p: -sizes[p][0] * sizes[p][1])
                jobs = [_RasterJob(
                    index=i, input=p, outputs={k: v for k, v in planned[p].items() if k != "polygons"},
                    card=card, overlap=cfg.overlap, batch_size=cfg.batch_size, threshold=threshold,
                    polygons=planned[p].get("polygons"), min_polygon_px=cfg.min_polygon_px,
                    simplify_px=cfg.simplify_px,
                    progress_file=os.path.join(progress_dir, f"{i}.done"), token=token,
                    threads=threads, fail_fast=cfg.fail_fast, model_url=model_url, builtin=named,
                    tta=cfg.tta,
                    regularize=cfg.regularize, min_building_m2=cfg.min_building_m2,
                    input_gsd=cfg.input_gsd, resample=not cfg.no_resample)
                    for i, p in enumerate(order)]

                def report() -> None:
                    done = _read_progress(progress_dir)
                    finished = sum(1 for name in os.listdir(progress_dir) if name.endswith(".end"))
                    reporter.progress(done, total_windows, f"{finished}/{len(jobs)} rasters",
                                      rasters_done=finished, rasters_total=len(jobs))

                try:
                    with Poller(report):
                        results = sc.parallelize(jobs, len(jobs)).map(_run_job).collect()
                except Exception as e:
                    message = _user_error(e)
                    if message is None:
                        raise ClusterError(f"the Spark job failed ({_short(e)}); see the Spark logs "
                                           f"of {master}") from e
                    raise InputError(message) from None
            for r in results:
                if r.get("fatal"):
                    raise (DiskFullError if r["fatal"] == "disk" else ModelError)(r["error"])
                if "error" in r:
                    failures.append({"input": r["input"], "error": r["error"]})
                    reporter.warning(f"failed: {r['error']}")
                else:
                    for note in r.pop("warnings", []):
                        notes.append(note)
                        reporter.warning(note)
                    outputs.append(r)
    finally:
        if remote_output:
            import shutil

            shutil.rmtree(os.path.dirname(progress_dir), ignore_errors=True)
        else:
            _clean_partials(output, token, progress_dir)
    outputs.sort(key=lambda r: r["input"])
    seconds = time.monotonic() - started
    write_report = storage.write_json if remote_output else write_json_atomic
    write_report(storage.join(output, PREDICTIONS_JSON), {
        "format": PREDICTIONS_FORMAT,
        "format_version": 1,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "rs_cluster_version": __version__,
        "model": model_url or os.path.abspath(storage.local_path(cfg.model) or cfg.model),
        "arch": card.arch,
        "tile_size": card.tile_size,
        "bands": list(card.bands),
        "overlap": cfg.overlap,
        "threshold": threshold,
        "tta": cfg.tta,
        "model_gsd_m": card.gsd_m,
        "input_gsd": cfg.input_gsd,
        "resample": not cfg.no_resample,
        **({"polygon_options": {"min_polygon_px": cfg.min_polygon_px, "simplify_px": cfg.simplify_px,
                                "regularize": cfg.regularize, "min_building_m2": cfg.min_building_m2}}
           if cfg.polygons else {}),
        "outputs": outputs,
        "failures": failures,
        "warnings": notes,
        "seconds": round(seconds, 3),
    })
    result = PredictResult(output=output, outputs=outputs, failures=failures, warnings=notes,
                           seconds=seconds)
    px = sum(r["width"] * r["height"] for r in outputs)
    reporter.finish(f"{len(outputs)} mask(s) written to {output}"
                    + (f", {len(failures)} input(s) failed" if failures else "")
                    + f" in {seconds:.1f} s ({px / 1e6 / max(seconds, 1e-9):.2f} Mpx/s)",
                    outputs=len(outputs), failures=len(failures), output=output)
    return result


def _clean_partials(output: str, token: str, progress_dir: str) -> None:
    """Removes what a killed task may have left: its hidden partial files and the progress files."""
    import shutil

    shutil.rmtree(progress_dir, ignore_errors=True)
    for name in os.listdir(output):
        if name.startswith(".") and f".partial-{token}" in name:
            try:
                os.unlink(os.path.join(output, name))
            except OSError:
                pass
