"""Output GeoTIFFs written so that a half-written one never looks complete.

A :class:`GeoTiffSink` writes one single-band GeoTIFF (tiled, compressed, BigTIFF when it could
pass 4 GB) under a hidden name, checks at close that GDAL wrote all of it (rasterio's close does
not raise when it fails), adds internal overviews and is renamed into place only then;
:func:`all_or_nothing` commits a raster's outputs together or discards them. A full disk is
named as such, with the output (:func:`naming_a_full_disk`). :class:`RowWriter` turns blended
probabilities into the mask and probability rows, in whole blocks.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import warnings
from typing import Any, Iterator

import numpy as np

from rs_cluster.errors import OutputWriteError, disk_full_error, is_disk_full
from rs_cluster.rasters import InputStretch

BLOCK = 256  # GeoTIFF tile side; finished rows are written in whole block rows


# Deflate level 1: masks come out about 1.5x larger than at the default level 6, written 3x faster.
ZLEVEL = 1


def output_profile(src: Any, dtype: str, georeferenced: bool) -> dict[str, Any]:
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


class GeoTiffSink:
    """One single-band output GeoTIFF under a hidden name: :meth:`finish` closes it, checking that
    GDAL wrote all of it, :meth:`commit` renames it into place."""

    def __init__(self, final: str, profile: dict[str, Any], gcps: Any, token: str,
                 overviews: bool = True) -> None:
        import rasterio

        self.final = final
        self.overviews = overviews  # none on a band's part: the assembled raster gets them
        self.width, self.height, self.dtype = profile["width"], profile["height"], profile["dtype"]
        self.tmp = os.path.join(os.path.dirname(final), f".{os.path.basename(final)}.partial-{token}")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # NotGeoreferencedWarning: intended for pixel-grid input
            with naming_a_full_disk(self.final, "creating it"):
                self.dst = rasterio.open(self.tmp, "w", **profile)
        if gcps is not None:
            self.dst.gcps = gcps

    def write(self, array: np.ndarray, row: int, valid: np.ndarray | None) -> None:
        from rasterio.windows import Window as RioWindow

        window = RioWindow(0, row, array.shape[1], array.shape[0])
        with naming_a_full_disk(self.final, "writing it"):
            self.dst.write(array, 1, window=window)
            if valid is not None:
                self.dst.write_mask(valid, window=window)

    def finish(self) -> None:
        import rasterio

        # rasterio's close() does not raise when GDAL fails to write the last blocks or the TIFF
        # directory (rasterio 1.4, GDAL 3.9): it logs the errors and returns, and the broken file
        # would be renamed into place as if complete.
        with rasterio.Env(), gdal_errors() as errors:
            self.dst.close()
            if not errors and self.overviews:
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
        with naming_a_full_disk(self.final, "adding its overviews"), \
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
def naming_a_full_disk(path: str, doing: str) -> Iterator[None]:
    """GDAL says "Write failed"; when ENOSPC lies underneath, raise the error naming the output.

    The ENOSPC may be in the exception, in what GDAL logged before it (libtiff's strerror), or
    nowhere: a dirty block GDAL's cache flushes in the middle of a write fails as "An error
    occurred while writing a dirty block". Then the output's disk itself is asked."""
    with gdal_errors() as logged:
        try:
            yield
        except Exception as e:
            if is_disk_full(e) or any(is_disk_full(OSError(m)) for m in logged) or \
                    out_of_space(path):
                raise disk_full_error(e, path, doing) from e
            raise


def out_of_space(path: str, spare: int = 1 << 20) -> bool:
    """Whether the disk that holds ``path`` has under ``spare`` bytes left for this user."""
    try:
        st = os.statvfs(os.path.dirname(os.path.abspath(path)))
    except OSError:
        return False
    return st.f_bavail * st.f_frsize < spare


@contextlib.contextmanager
def gdal_errors() -> Iterator[list[str]]:
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


class RowWriter:
    """Collects finished rows and writes them in whole 256-row blocks (each tile compressed once)."""

    def __init__(self, sinks: dict[str, GeoTiffSink], threshold: float, with_valid: bool) -> None:
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


def open_sinks(sinks: dict[str, GeoTiffSink], src: Any, outputs: dict[str, str],
                georeferenced: bool, token: str, stretch: InputStretch,
                rows: tuple[int, int] | None = None) -> None:
    """Opens into ``sinks`` (so that a failure part-way leaves them to be discarded) the mask and
    probability GeoTIFFs named in ``outputs``, on ``src``'s grid, tagged with its stretch; with
    ``rows`` (top, bottom), a band's part: those rows only, without overviews or GCPs."""
    gcps = src.gcps if src.gcps[0] and src.crs is None and rows is None else None
    for kind in ("mask", "probabilities"):
        if kind in outputs:
            profile = output_profile(src, "uint8" if kind == "mask" else "float32", georeferenced)
            if rows is not None:
                profile["height"] = rows[1] - rows[0]
                if "transform" in profile:
                    from affine import Affine

                    profile["transform"] = profile["transform"] * Affine.translation(0, rows[0])
            sinks[kind] = GeoTiffSink(outputs[kind], profile, gcps, token,
                                       overviews=rows is None)
            if not stretch.identity:
                sinks[kind].dst.update_tags(RS_INPUT_STRETCH=json.dumps(stretch.to_dict()))


@contextlib.contextmanager
def all_or_nothing(sinks: dict[str, GeoTiffSink]) -> Iterator[None]:
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
