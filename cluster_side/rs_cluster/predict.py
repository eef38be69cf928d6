"""The predict stage: a trained model over whole rasters -> georeferenced building masks, with Spark.

Each input raster is one Spark task, unless it is large (``band_rows``, :func:`band_plan`): then
it is cut into bands of rows, each band a task that computes every window strip reaching its rows
on the whole raster's window grid and blend weights (so its pixels are exactly those one task
would give) and writes them into a hidden part; once all of a raster's bands are done, one more
task joins the parts into its outputs (:func:`assemble_raster`) and its polygons. A retried band
rewrites its own part; a raster whose band failed gets no output, and its parts are deleted.
A task slides the model's tile over the raster with overlap
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

The stage in four modules: this one (rasters in; the executor's tasks, bands and joining; the
driver), :mod:`rs_cluster.windows` (the window grid, blend weights, a band's strips),
:mod:`rs_cluster.geotiff_out` (outputs that appear whole or not at all) and
:mod:`rs_cluster.model_card` (the card, and the model as a compiled function).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import math
import os
import re
import secrets
import time
import warnings
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import numpy as np

from rs_cluster import __version__, builtin, storage
from rs_cluster.atomic import write_json_atomic
from rs_cluster.config import check_keys
from rs_cluster.errors import (ClusterError, ConfigError, DiskFullError, InputError, OutputExistsError,
                               OutputWriteError, RasterReadError, RsClusterError, disk_full_error,
                               is_disk_full)
from rs_cluster.geotiff_out import (BLOCK, GeoTiffSink, RowWriter, all_or_nothing, open_sinks)
from rs_cluster.model_card import (BAND_NAMES, ModelCard, ModelError, d4_average,
                                   load_predict_fn)
from rs_cluster.progress import Reporter
from rs_cluster.rasters import (RASTER_SUFFIXES, InputStretch, _open, _short, ground_gsd, input_stretch,
                                list_rasters, resampled_grid, same_gsd)
from rs_cluster.settings import SparkResources
from rs_cluster.spark import Poller, resolve_master, spark_session
from rs_cluster.windows import band_strips, blend_weights, inverse_coverage, window_starts

PREDICTIONS_JSON = "predict.json"
PREDICTIONS_FORMAT = "rs-cluster-predictions"
MASK_SUFFIX = "_mask"
PROB_SUFFIX = "_prob"
POLYGONS_SUFFIX = "_buildings"

_MARK = "<<RS-CLUSTER-ERROR>>"


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
    # Rows per band of a raster cut into bands, each a Spark task (a multiple of 256); 0: every
    # raster in one task; None: large rasters only (see band_plan).
    band_rows: int | None = None

    def __post_init__(self) -> None:
        if self.band_rows is not None and (isinstance(self.band_rows, bool) or not isinstance(
                self.band_rows, int) or self.band_rows < 0 or self.band_rows % BLOCK):
            raise ConfigError(f"band_rows must be 0 (one task per raster) or a multiple of {BLOCK} "
                              f"rows (got {self.band_rows})")
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


class _RowSource:
    """Serves row ranges of a raster that only move down, reading whole block rows.

    A window read that cuts through the source's blocks is several times slower in GDAL than one
    aligned with them, and consecutive strips overlap; so rows are read in aligned chunks and kept
    until no later strip needs them.
    """

    def __init__(self, src: Any, path: str, bands: list[int], alpha: int | None, with_valid: bool,
                 start: int = 0) -> None:
        self.src, self.path, self.bands, self.alpha, self.with_valid = src, path, bands, alpha, with_valid
        block_rows = max(1, src.block_shapes[0][0])
        self.chunk = block_rows * max(1, math.ceil(BLOCK / block_rows))
        self.top = self.bottom = start - start % block_rows  # the first rows asked for: ``start``
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
                   input_gsd: float | None = None, resample: bool = True,
                   rows: tuple[int, int] | None = None) -> RasterStats:
    """Predicts one raster into the GeoTIFFs named in ``outputs`` (``mask``, ``probabilities``).

    With ``resample`` and a card that has ``gsd_m``, a raster whose GSD (its georeferencing's, or
    ``input_gsd`` when it has none) is more than 10 % away is predicted at the model's GSD and
    the result put back on its own grid (see the module's docstring).

    ``predict_fn`` maps a batch of raw pixels (N, T, T, bands), in the raster's data type, to
    probabilities (N, T, T[, 1]); scaling them as the model card says is its job
    (:func:`load_predict_fn` does it inside the compiled graph, :meth:`ModelCard.scale` in numpy).
    ``on_progress(windows done, windows total)`` is called after each strip.

    ``rows`` (top, bottom) predicts only those rows, into outputs of that height (a band's
    parts, which :func:`assemble_raster` joins); a raster predicted at another GSD is not cut.
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
                                      batch_size, threshold, token, on_progress, height, width,
                                      rows=rows)
            elif rows is not None:
                raise ConfigError(f"{path}: a raster resampled to the model's GSD is predicted "
                                  "whole, not in bands")
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
        sinks: dict[str, GeoTiffSink] = {}
        with all_or_nothing(sinks):
            open_sinks(sinks, src, outputs, georeferenced, token, stretch)
            writer = RowWriter(sinks, threshold, with_valid)
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
                  stretch: InputStretch | None = None,
                  rows: tuple[int, int] | None = None) -> RasterStats:
    """Predicts ``src`` into ``outputs`` strip by strip of windows; with ``rows`` (top, bottom),
    only those rows, into a band's part: the strips whose windows reach them, on the whole
    raster's window grid and blend weights, so the part holds exactly those rows of the whole."""
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
    first, last = (0, height) if rows is None else rows
    strips = band_strips(row_starts, tile, first, last)
    total = len(strips) * len(col_starts)
    w1 = blend_weights(tile)
    w2 = np.outer(w1, w1)
    row_norm = inverse_coverage(vh, row_starts, w1)
    col_norm = inverse_coverage(vw, col_starts, w1)
    with_valid = _needs_valid_mask(src, alpha)

    source = _RowSource(src, path, bands, alpha if with_valid else None, with_valid,
                        start=row_starts[strips[0]])

    def read_strip(top: int) -> tuple[np.ndarray, np.ndarray | None]:
        pixels, valid = source.rows(top, min(top + tile, height))
        x = stretch.apply(pixels).transpose(1, 2, 0)
        if x.shape[0] < tile or x.shape[1] < vw:
            x = np.pad(x, ((0, tile - x.shape[0]), (0, vw - x.shape[1]), (0, 0)), mode="symmetric")
        return x, valid

    sinks: dict[str, GeoTiffSink] = {}
    with all_or_nothing(sinks):
        open_sinks(sinks, src, outputs, georeferenced, token, stretch, rows)
        writer = RowWriter(sinks, threshold, with_valid)
        acc = np.zeros((tile, vw), dtype=np.float32)
        done = 0
        with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="rs-predict-io") as io:
            next_strip = io.submit(read_strip, row_starts[strips[0]])
            writing: concurrent.futures.Future | None = None
            for k in strips:
                top = row_starts[k]
                x, valid = next_strip.result()
                if k + 1 in strips:
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
                # the rows this strip completes, [top, bottom), cut to the rows asked for
                keep_top, keep_bottom = max(top, first), min(bottom, last)
                final = None
                if keep_bottom > keep_top:
                    a, b = keep_top - top, keep_bottom - top
                    final = (acc[a:b, :width] * row_norm[keep_top:keep_bottom, None]
                             * col_norm[None, :width])
                acc[:tile - n] = acc[n:]
                acc[tile - n:] = 0
                if final is not None:
                    if writing is not None:
                        writing.result()
                    writing = io.submit(writer.add, final, None if valid is None else valid[a:b])
                if on_progress is not None:
                    on_progress(done, total)
            if writing is not None:
                writing.result()
        writer.close()
    return RasterStats(width=width, height=last - first, georeferenced=georeferenced,
                       crs=src.crs.to_string() if src.crs else "", windows=total,
                       building_pixels=writer.building, valid_pixels=writer.valid_pixels,
                       warnings=notes, input_stretch=stretch.to_dict())


def assemble_raster(path: str, card: ModelCard, parts: list[dict[str, str]],
                    outputs: dict[str, str], token: str,
                    fetch: Callable[[str], Any] = storage.local_input) -> None:
    """Joins the band parts of ``path`` (top to bottom, each naming its GeoTIFF per output kind,
    made local one at a time by ``fetch``) into the raster's outputs, one block row at a time,
    with the profile, tags, mask and overviews that one task's outputs have. All of them
    appear, or none."""
    import rasterio
    from rasterio.windows import Window as RioWindow

    with _open(path) as src:
        bands, alpha = _band_indexes(src, card, path)
        with_valid = _needs_valid_mask(src, alpha)
        stretch = input_stretch(src, path, bands)
        cache_mb = 16 + math.ceil(src.width * BLOCK * 10 / 2**20)
        sinks: dict[str, GeoTiffSink] = {}
        with rasterio.Env(GDAL_CACHEMAX=cache_mb), all_or_nothing(sinks):
            open_sinks(sinks, src, outputs, _is_georeferenced(src), token, stretch)
            for kind, sink in sinks.items():
                row = 0
                for part in parts:
                    with fetch(part[kind]) as local, rasterio.open(local) as band:
                        if band.width != src.width or row + band.height > src.height:
                            raise OutputWriteError(f"{part[kind]}: a band of {band.width} x "
                                                   f"{band.height} px does not fit {path} at row {row}")
                        for top in range(0, band.height, BLOCK):
                            window = RioWindow(0, top, band.width, min(BLOCK, band.height - top))
                            sink.write(band.read(1, window=window), row + top,
                                       band.dataset_mask(window=window) if with_valid else None)
                        row += band.height
                if row != src.height:
                    raise OutputWriteError(f"{outputs[kind]}: its bands hold {row} rows; {path} "
                                           f"has {src.height}")


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
    rows: tuple[int, int] | None = None  # a band of the raster: its outputs are parts

    @property
    def remote(self) -> bool:
        """Whether an input or output is in a store: the task then works on local copies."""
        locations = [self.input, *self.outputs.values(), *([self.polygons] if self.polygons else [])]
        return not all(storage.is_local(x) for x in locations)


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
                               resample=job.resample, rows=job.rows)
        summary: dict[str, Any] = {"input": job.input, **job.outputs, **asdict(stats),
                                   "model_load_seconds": round(loaded - started, 3),
                                   "predict_seconds": round(time.monotonic() - loaded, 3),
                                   "predict_cpu_seconds": round(time.process_time() - cpu, 3)}
        if job.polygons:
            _polygonize(job, summary)
        summary["seconds"] = round(time.monotonic() - started, 3)
        return summary
    except ModelError as e:
        return {"input": job.input, "error": str(e), "fatal": "model"}
    except Exception as e:
        return _failed(job, e, "prediction", "predicting")


def _failed(job: Any, e: Exception, what: str, doing: str) -> dict[str, Any]:
    """A task's result for its error ``e``: fatal for a full disk (every raster after it would
    fail the same way), else the raster's error, an unexpected library error included (reported
    against its file as "``what`` failed"); raised instead under fail-fast."""
    if isinstance(e, DiskFullError):
        return {"input": job.input, "error": str(e), "fatal": "disk"}
    if isinstance(e, RsClusterError):
        message = str(e)
    elif is_disk_full(e):
        return {"input": job.input, "fatal": "disk",
                "error": str(disk_full_error(e, doing=f"{doing} {job.input}"))}
    else:
        message = f"{job.input}: {what} failed ({type(e).__name__}: {_short(e)})"
    if job.fail_fast:
        raise RuntimeError(f"{_MARK}{message}{_MARK}") from None
    return {"input": job.input, "error": message}


def _polygonize(job: Any, summary: dict[str, Any]) -> None:
    """The building polygons of ``job``'s mask into ``job.polygons``, counted in ``summary``."""
    from rs_cluster.polygons import polygonize_mask

    summary["polygons"] = job.polygons
    summary["polygon_count"] = polygonize_mask(
        job.outputs["mask"], job.polygons, min_area_px=job.min_polygon_px,
        simplify_px=job.simplify_px, token=job.token, regularize=job.regularize,
        min_building_m2=job.min_building_m2, warn=summary["warnings"].append)


@dataclass(frozen=True)
class _AssembleJob:
    """Joins the bands of one raster, predicted as separate tasks, into its outputs."""

    index: int
    input: str
    parts: tuple[dict[str, str], ...]  # top to bottom: output kind -> the band's part
    outputs: dict[str, str]
    card: ModelCard
    polygons: str | None
    min_polygon_px: int
    simplify_px: float
    regularize: bool
    min_building_m2: float | None
    progress_file: str
    token: str
    fail_fast: bool


def _run_assemble(job: _AssembleJob) -> dict[str, Any]:
    """Executor side: one raster's outputs from its bands' parts, then its polygons; returns what
    was written (or the error, unless fail-fast). The parts are deleted once it is complete."""
    started = time.monotonic()
    scratch = storage.temp_dir()
    try:
        local = {k: storage.local_path(v) or os.path.join(scratch, storage.basename(v))
                 for k, v in job.outputs.items()}
        polygons = job.polygons and (storage.local_path(job.polygons)
                                     or os.path.join(scratch, storage.basename(job.polygons)))
        with storage.gdal_path(job.input) as readable:
            assemble_raster(readable, job.card, list(job.parts), local, job.token)
        summary: dict[str, Any] = {"input": job.input, **job.outputs, "warnings": [],
                                   "assemble_seconds": round(time.monotonic() - started, 3)}
        if polygons:
            _polygonize(dataclasses.replace(job, outputs=local, polygons=polygons), summary)
            summary["polygons"] = job.polygons
        for kind, url in [*job.outputs.items(), *([("polygons", job.polygons)] if polygons else [])]:
            if not storage.is_local(url):
                storage.upload(local.get(kind, polygons), url)
        for part in job.parts:
            for url in part.values():
                with contextlib.suppress(Exception):  # a part left over is hidden, and cleaned
                    storage.delete_file(url)
        return summary
    except Exception as e:
        return _failed(job, e, "joining its bands", "assembling")
    finally:
        import shutil

        shutil.rmtree(scratch, ignore_errors=True)
        with contextlib.suppress(OSError), open(job.progress_file + ".end", "w", encoding="utf-8"):
            pass


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

SPLIT_PIXELS = 64_000_000  # rasters this large are predicted in bands when --band-rows is not given
MIN_BAND_ROWS = 2048


def band_plan(height: int, width: int, band_rows: int | None, slots: int) -> list[tuple[int, int]] | None:
    """The bands of rows [top, bottom) one raster is predicted in, as separate tasks; None for one
    task. ``band_rows`` None decides: rasters of :data:`SPLIT_PIXELS` or more, with two Spark
    slots or more, in about two bands per slot (at least :data:`MIN_BAND_ROWS` rows, whole GeoTIFF
    blocks), so the slots stay busy and a retried task redoes a band, not the raster; 0 never."""
    if band_rows is None:
        if height * width < SPLIT_PIXELS or slots < 2:
            return None
        band_rows = max(MIN_BAND_ROWS, math.ceil(height / (2 * slots) / BLOCK) * BLOCK)
    if band_rows == 0 or height <= band_rows:
        return None
    return [(top, min(top + band_rows, height)) for top in range(0, height, band_rows)]


def _band_windows(height: int, width: int, tile: int, stride: int,
                  rows: tuple[int, int] | None = None) -> int:
    """Windows the band ``rows`` of a ``height`` x ``width`` raster computes (with its margin);
    those of the whole raster without ``rows``."""
    strips = band_strips(window_starts(max(height, tile), tile, stride), tile,
                         *(rows or (0, height)))
    return len(strips) * len(window_starts(max(width, tile), tile, stride))


def _part_name(stem: str, token: str, band: int, kind: str) -> str:
    """A band's part of one output: hidden, and ending as a partial file with the run's token, so
    that nothing takes it for an output (not even by its suffix) and a run that ends badly cleans
    it like any partial file."""
    suffix = MASK_SUFFIX if kind == "mask" else PROB_SUFFIX
    return f".{stem}.band{band:04d}{suffix}.tif.partial-{token}"


def _join_bands(results: list[dict[str, Any]], jobs: list[_RasterJob], whole: list[_RasterJob],
                run_tasks: Callable[..., list[dict[str, Any]]],
                windows_of: Callable[[int, int], int],
                sizes: dict[str, tuple[int, int, bool]]) -> list[dict[str, Any]]:
    """The per-raster results: those of whole rasters as they are; for a raster predicted in bands,
    its outputs joined from the parts (in tasks, when every band succeeded) and one summary."""
    out: list[dict[str, Any]] = []
    banded: dict[int, list[dict[str, Any]]] = {}
    for job, r in zip(jobs, results):
        if job.rows is None:
            out.append(r)
        else:
            banded.setdefault(job.index, []).append(r)
    assemble: list[_AssembleJob] = []
    for index, bands in banded.items():
        job = whole[index]
        bad = next((r for r in bands if r.get("fatal")), None) or \
            next((r for r in bands if "error" in r), None)
        if bad is not None:
            out.append({"input": job.input, "error": bad["error"],
                        **({"fatal": bad["fatal"]} if bad.get("fatal") else {})})
            continue
        parts = tuple({kind: r[kind] for kind in job.outputs} for r in bands)
        assemble.append(_AssembleJob(
            index=index, input=job.input, parts=parts, outputs=job.outputs, card=job.card,
            polygons=job.polygons, min_polygon_px=job.min_polygon_px, simplify_px=job.simplify_px,
            regularize=job.regularize, min_building_m2=job.min_building_m2,
            progress_file=job.progress_file, token=job.token, fail_fast=job.fail_fast))
    joined = run_tasks(assemble, _run_assemble) if assemble else []
    for task, r in zip(assemble, joined):
        if "error" in r:
            out.append(r)
            continue
        bands = banded[task.index]
        h, w, _ = sizes[task.input]
        warnings_seen = list(dict.fromkeys(w_ for b in bands for w_ in b.get("warnings", [])))
        summary = {**bands[0], **r, "height": h, "windows": windows_of(h, w),
                   "windows_computed": sum(b["windows"] for b in bands), "bands": len(bands),
                   "building_pixels": sum(b["building_pixels"] for b in bands),
                   "valid_pixels": sum(b["valid_pixels"] for b in bands),
                   "predict_seconds": round(sum(b["predict_seconds"] for b in bands), 3),
                   "predict_cpu_seconds": round(sum(b["predict_cpu_seconds"] for b in bands), 3),
                   "seconds": round(sum(b["seconds"] for b in bands) + r["assemble_seconds"], 3),
                   "warnings": [*warnings_seen, *r.get("warnings", [])]}
        out.append(summary)
    return out


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
                 resample: bool = True) -> tuple[int, int, bool] | str:
    """(height, width, resampled): the size the model will see (from the header, at
    ``model_gsd`` when the raster is resampled to it), or the error message when the raster
    cannot be opened or measured."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with storage.gdal_path(path) as readable:
                try:
                    with _open(readable) as src:
                        grid = _gsd_plan(src, readable, model_gsd, input_gsd, resample).grid
                        if grid is not None:
                            return grid[2], grid[1], True
                        return src.height, src.width, False
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
    sizes: dict[str, tuple[int, int, bool]] = {}
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
        return _band_windows(h, w, card.tile_size, stride)

    total_windows = sum(windows_of(h, w) for h, w, _ in sizes.values())
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
                # Largest rasters first, so a big one does not start last and run alone.
                order = sorted(sizes, key=lambda p: -sizes[p][0] * sizes[p][1])
                whole = [_RasterJob(
                    index=i, input=p, outputs={k: v for k, v in planned[p].items() if k != "polygons"},
                    card=card, overlap=cfg.overlap, batch_size=cfg.batch_size, threshold=threshold,
                    polygons=planned[p].get("polygons"), min_polygon_px=cfg.min_polygon_px,
                    simplify_px=cfg.simplify_px,
                    progress_file=os.path.join(progress_dir, f"{i}.done"), token=token,
                    threads=0,  # set below, once the bands are known
                    fail_fast=cfg.fail_fast, model_url=model_url, builtin=named,
                    tta=cfg.tta,
                    regularize=cfg.regularize, min_building_m2=cfg.min_building_m2,
                    input_gsd=cfg.input_gsd, resample=not cfg.no_resample)
                    for i, p in enumerate(order)]
                # A large raster is cut into bands of rows, each a task of its own; a task per
                # raster joins its bands' parts once they are all there (_run_assemble).
                jobs: list[_RasterJob] = []
                for job in whole:
                    h, w, resampled = sizes[job.input]
                    bands = None if resampled else band_plan(h, w, cfg.band_rows, slots)
                    if bands is None:
                        jobs.append(job)
                        continue
                    total_windows += sum(_band_windows(h, w, card.tile_size, stride, rows)
                                         for rows in bands) - windows_of(h, w)
                    stem = Path(storage.basename(job.input)).stem
                    jobs.extend(dataclasses.replace(
                        job, rows=rows, polygons=None,
                        outputs={kind: storage.join(output, _part_name(stem, token, k, kind))
                                 for kind in job.outputs},
                        progress_file=os.path.join(progress_dir, f"{job.index}.b{k}.done"))
                        for k, rows in enumerate(bands))
                # In-process tasks share this host's cores; a cluster task gets the cores Spark
                # gives each task (spark.task.cpus), not every core of its node.
                concurrent_tasks = max(1, min(len(jobs), slots))
                # (the cores this process may run on: fewer than the host's under taskset/cgroups)
                threads = (max(1, len(os.sched_getaffinity(0)) // concurrent_tasks)
                           if master.startswith("local")
                           else max(1, int(sc.getConf().get("spark.task.cpus", "1"))))
                jobs = [dataclasses.replace(job, threads=threads) for job in jobs]

                def report() -> None:
                    done = _read_progress(progress_dir)
                    finished = sum(1 for name in os.listdir(progress_dir)
                                   if name.endswith(".end") and ".b" not in name)
                    reporter.progress(done, total_windows, f"{finished}/{len(whole)} rasters",
                                      rasters_done=finished, rasters_total=len(whole))

                def run_tasks(tasks: list[Any], fn: Callable[[Any], dict[str, Any]]) -> list[dict[str, Any]]:
                    try:
                        with Poller(report):
                            return sc.parallelize(tasks, len(tasks)).map(fn).collect()
                    except Exception as e:
                        message = _user_error(e)
                        if message is None:
                            raise ClusterError(f"the Spark job failed ({_short(e)}); see the Spark "
                                               f"logs of {master}") from e
                        raise InputError(message) from None

                results = _join_bands(run_tasks(jobs, _run_job), jobs, whole, run_tasks,
                                      windows_of, sizes)
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
            _clean_remote_parts(output, token)
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


def _clean_remote_parts(output: str, token: str) -> None:
    """Deletes the band parts a run that ended badly left in the store (best effort: they are
    hidden files, never taken for outputs)."""
    with contextlib.suppress(Exception):
        for name, is_file in storage.list_dir(output):
            if is_file and name.startswith(".") and f".partial-{token}" in name:
                with contextlib.suppress(Exception):
                    storage.delete_file(storage.join(output, name))


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
