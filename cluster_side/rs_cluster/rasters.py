"""Finding, pairing and checking image/mask rasters, and reading their windows.

An input folder holds rasters in the formats of :mod:`rs_cluster.formats` (the list the plugin
uses too) and their sidecars; any other file there is refused by name. Imagery has 3 (RGB) or 4
(RGBA) bands; masks 1 band, or 3 identical bands (RGB masks as some datasets ship them). A building
is any non-zero mask value. Files are only ever opened read-only.

Imagery that is not 8-bit becomes the model's 0..255 by one rule, :func:`input_stretch`, which
prepare's tiles and predict's windows both use: per band, linearly from its 2nd..98th percentile.

A raster's ground sampling distance (GSD, ground metres per pixel) comes from its CRS and
transform (:func:`ground_gsd`); :func:`resampled_grid` is the grid, in the same CRS, at which it
is seen at another GSD. Prepare (``--gsd``) and predict (the model card's ``gsd_m``) both use them.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, replace
from pathlib import Path, PurePosixPath
from typing import Any, Iterable, Iterator

import numpy as np

from rs_cluster.errors import InputError, RasterReadError
from rs_cluster.formats import RASTER_SUFFIXES, SIDECAR_SUFFIXES, is_raster, is_sidecar
from rs_cluster.windows import Window, window_rows

STRETCH_PERCENTILES = (2.0, 98.0)
# Long side, in pixels, of the decimated read the percentiles come from (GDAL serves it from the
# overviews where the raster has them): a few hundred thousand pixels per band are plenty.
STRETCH_SAMPLE_PX = 1024
# GSDs within 10 % of each other count as equal and the raster is not resampled: resampling by
# so little would cost two interpolations (blur) for a change of scale a model tolerates anyway.
GSD_TOLERANCE = 0.10
EARTH_RADIUS_M = 6371008.8  # mean radius: ground metres per radian, for a CRS in degrees
_WEB_MERCATOR_EPSG = frozenset({3857, 3785, 900913, 102100, 102113})
_WEB_MERCATOR_NAMES = ("Pseudo-Mercator", "Pseudo_Mercator", "Mercator_Auxiliary_Sphere",
                       "Popular Visualisation")


@dataclass(frozen=True)
class InputStretch:
    """How one raster's pixels become the 0..255 the model is trained and run on.

    uint8 imagery is taken as it is (no ``low``/``high``). Any other real type is mapped per band,
    linearly, from ``low`` (its 2nd percentile) to 0 and ``high`` (its 98th) to 255, clipped. The
    percentiles are taken once per raster, so every tile and window of it gets the same map, and
    a linear rescale of the imagery (x * 257, reflectance 0..1) gives the same model input.
    """

    dtype: str
    low: tuple[float, ...] = ()
    high: tuple[float, ...] = ()

    @property
    def identity(self) -> bool:
        return not self.low

    def apply(self, pixels: np.ndarray) -> np.ndarray:
        """(bands, rows, cols) in the raster's type -> uint8."""
        if self.identity:
            return pixels
        low = np.asarray(self.low, dtype=np.float64)
        scale = 255.0 / (np.asarray(self.high, dtype=np.float64) - low)
        x = pixels.astype(np.float32)
        x -= low.astype(np.float32)[:, None, None]
        x *= scale.astype(np.float32)[:, None, None]
        np.nan_to_num(x, copy=False, nan=0.0)
        np.clip(x, 0.0, 255.0, out=x)
        return np.rint(x, out=x).astype(np.uint8)

    def to_dict(self) -> dict[str, Any]:
        if self.identity:
            return {"method": "none", "dtype": self.dtype}
        return {"method": "percentile_stretch", "dtype": self.dtype,
                "percentiles": list(STRETCH_PERCENTILES), "low": list(self.low),
                "high": list(self.high), "to": [0, 255]}

    def describe(self, path: str) -> str:
        bands = ", ".join(f"band {i} {lo:.6g}..{hi:.6g}"
                          for i, (lo, hi) in enumerate(zip(self.low, self.high), start=1))
        return (f"{path}: pixels are {self.dtype}, not 8-bit; each band is stretched linearly from "
                f"its {STRETCH_PERCENTILES[0]:g}-{STRETCH_PERCENTILES[1]:g} % percentiles to "
                f"0..255 ({bands})")


def input_stretch(src: Any, path: str, bands: Iterable[int]) -> InputStretch:
    """The stretch of an open raster's ``bands``; raises InputError for types it cannot map."""
    from rasterio.enums import Resampling

    bands = list(bands)
    dtype = str(np.result_type(*[src.dtypes[b - 1] for b in bands]))
    if dtype == "uint8":
        return InputStretch(dtype)
    if np.dtype(dtype).kind not in "uif":
        raise InputError(f"{path}: pixels are {dtype}; imagery must be real numbers (8-bit, or "
                         "16-bit/32-bit/float, which are stretched to 8-bit); convert it first")
    factor = max(src.width, src.height) / STRETCH_SAMPLE_PX
    shape = (len(bands), src.height, src.width) if factor <= 1 else (
        len(bands), max(1, round(src.height / factor)), max(1, round(src.width / factor)))
    try:
        sample = src.read(bands, out_shape=shape, masked=True, resampling=Resampling.nearest)
    except Exception as e:  # rasterio raises several types for undecodable data
        raise RasterReadError(f"{path}: corrupt or truncated raster; cannot read it to find its "
                              f"value range ({_short(e)})") from e
    low, high = [], []
    for band in sample:
        values = np.ma.compressed(band).astype(np.float64)
        values = values[np.isfinite(values)]
        lo, hi = (np.percentile(values, STRETCH_PERCENTILES) if values.size else (0.0, 1.0))
        low.append(float(lo))
        high.append(float(hi) if hi > lo else float(lo) + 1.0)  # a flat band maps to 0
    return InputStretch(dtype, tuple(low), tuple(high))


@dataclass(frozen=True)
class RasterPair:
    raster_id: str
    image: str
    mask: str


@dataclass(frozen=True)
class PairInfo:
    """What prepare needs to know of a checked pair, small enough to ship to every task."""

    pair: RasterPair
    width: int
    height: int
    image_bands: int
    mask_bands: int
    crs_wkt: str
    transform: tuple[float, float, float, float, float, float]
    stretch: InputStretch = InputStretch("uint8")
    # Ground metres per pixel of the files (mean of the two sides); None when not georeferenced.
    # Only looked up when prepare is asked for a GSD.
    source_gsd_m: float | None = None
    # (width, height, transform) of the files when the tiles are cut from a resampled grid: then
    # width, height and transform above are that grid's, in the same CRS.
    source_grid: tuple[int, int, tuple[float, ...]] | None = None

    @property
    def resampled(self) -> bool:
        return self.source_grid is not None


def list_rasters(folder: str | os.PathLike[str], *, refuse_unknown: bool = False) -> list[Path]:
    """The rasters in ``folder`` (hidden files aside), sidecars left out.

    With ``refuse_unknown`` (input folders) any other file raises InputError naming it: a raster
    in a format the list lacks would otherwise be left out of the job without a word.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"{folder}: not a folder (expected a folder of rasters)")
    found = []
    for p in sorted(folder.iterdir()):
        if p.name.startswith(".") or not p.is_file():
            continue
        if is_raster(p.name):
            found.append(p)
        elif refuse_unknown and not is_sidecar(p.name):
            raise InputError(f"{p}: not a raster format rs-cluster reads "
                             f"({', '.join(RASTER_SUFFIXES)}) nor a sidecar of one "
                             f"({', '.join(SIDECAR_SUFFIXES)}); convert it to GeoTIFF or move it "
                             "out of the folder")
    return found


def pair_rasters(images_dir: str | os.PathLike[str], masks_dir: str | os.PathLike[str]
                 ) -> tuple[list[RasterPair], list[InputError]]:
    """Pairs each image with the mask of the same file name (or, failing that, the same stem).

    Returns the pairs and an error for every image without a mask; raises when there is no image.
    """
    images = _list_located(images_dir)
    if not images:
        raise InputError(f"{images_dir}: no rasters found (looked for {', '.join(RASTER_SUFFIXES)})")
    masks = _list_located(masks_dir)
    by_name = {p.name: p for p in masks}
    by_stem: dict[str, list[_Located]] = {}
    for p in masks:
        by_stem.setdefault(p.stem, []).append(p)
    pairs, missing = [], []
    for image in images:
        mask = by_name.get(image.name)
        if mask is None and len(by_stem.get(image.stem, [])) == 1:
            mask = by_stem[image.stem][0]
        if mask is None:
            missing.append(InputError(f"{image}: no mask named {image.name} (or {image.stem}.*) "
                                      f"in {masks_dir}"))
            continue
        pairs.append(RasterPair(raster_id=image.name, image=str(image), mask=str(mask)))
    return pairs, missing


@dataclass(frozen=True)
class _Located:
    """A raster found in an input folder: its name, and its path or URL."""

    name: str
    location: str

    @property
    def stem(self) -> str:
        return PurePosixPath(self.name).stem

    def __str__(self) -> str:
        return self.location


def _list_located(folder: str | os.PathLike[str]) -> list[_Located]:
    """:func:`list_rasters` for a local folder; for a storage URL (s3://, hdfs://) the same rules
    over the store's listing (see :mod:`rs_cluster.storage`), rasters named by URL."""
    from rs_cluster import storage

    if storage.is_local(str(folder)):
        return [_Located(p.name, str(p)) for p in list_rasters(folder, refuse_unknown=True)]
    url = str(folder).rstrip("/")
    if not storage.is_dir(url):
        raise InputError(f"{url}: not a folder (expected a folder of rasters)")
    found = []
    for name, is_a_file in storage.list_dir(url):
        if name.startswith(".") or not is_a_file:
            continue
        if is_raster(name):
            found.append(_Located(name, storage.join(url, name)))
        elif not is_sidecar(name):
            raise InputError(f"{storage.join(url, name)}: not a raster format rs-cluster reads "
                             f"({', '.join(RASTER_SUFFIXES)}) nor a sidecar of one "
                             f"({', '.join(SIDECAR_SUFFIXES)}); convert it to GeoTIFF or move it "
                             "out of the folder")
    return found


def _open(path: str):
    import rasterio
    from rasterio.errors import RasterioIOError

    try:
        return rasterio.open(path)
    except RasterioIOError as e:
        if not os.path.exists(path):
            raise RasterReadError(f"{path}: file not found") from e
        raise RasterReadError(f"{path}: not a readable raster ({_short(e)})") from e


def _short(e: BaseException) -> str:
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return text[:300]


def inspect_pair(pair: RasterPair) -> PairInfo:
    """Opens both rasters and checks bands, types and sizes; raises InputError naming the file."""
    with _open(pair.image) as img:
        if img.count not in (3, 4):
            raise InputError(f"{pair.image}: has {img.count} band(s); imagery must be RGB (3 bands) "
                             "or RGBA (4 bands)")
        stretch = input_stretch(img, pair.image, (1, 2, 3))
        width, height = img.width, img.height
        crs_wkt = img.crs.to_wkt() if img.crs else ""
        transform = tuple(img.transform)[:6]
        image_bands = img.count
    with _open(pair.mask) as msk:
        if msk.count not in (1, 3):
            raise InputError(f"{pair.mask}: has {msk.count} bands; a mask must have 1 band "
                             "(or 3 identical bands)")
        if (msk.width, msk.height) != (width, height):
            raise InputError(f"{pair.mask}: is {msk.width}x{msk.height} px but its image "
                             f"{os.path.basename(pair.image)} is {width}x{height} px")
        mask_bands = msk.count
    return PairInfo(pair=pair, width=width, height=height, image_bands=image_bands,
                    mask_bands=mask_bands, crs_wkt=crs_wkt, transform=transform,  # type: ignore[arg-type]
                    stretch=stretch)


def is_georeferenced_grid(crs: Any, transform: Any) -> bool:
    """Whether a CRS and an affine transform place the pixels on the ground (GCPs do not count)."""
    from affine import Affine

    return bool(crs) and tuple(transform)[:6] != tuple(Affine.identity())[:6]


def ground_gsd(crs: Any, transform: Any, width: int, height: int,
               path: str = "raster") -> tuple[float, float] | None:
    """Ground metres per pixel (along a row, along a column) at the raster's centre; None when
    the raster is not georeferenced.

    A projected CRS counts in its linear unit, except Web Mercator, whose metres are ground
    metres only at the equator: its pixel sides are scaled by cos(latitude). A CRS in degrees
    is converted with the latitude too (a degree of longitude is cos(latitude) times shorter).
    Raises InputError, naming ``path``, for a CRS it cannot measure.
    """
    from affine import Affine
    from rasterio.crs import CRS
    from rasterio.errors import CRSError

    if not is_georeferenced_grid(crs, transform):
        return None
    try:
        return _ground_gsd(crs if isinstance(crs, CRS) else CRS.from_user_input(crs),
                           Affine(*tuple(transform)[:6]), width, height, path)
    except CRSError as e:
        raise InputError(f"{path}: its CRS cannot be measured in metres ({_short(e)}), so its "
                         "ground sampling distance cannot be told; reproject it to a CRS in "
                         "metres") from None


def _ground_gsd(crs: Any, t: Any, width: int, height: int, path: str) -> tuple[float, float]:
    import math

    along_row = math.hypot(t.a, t.d)
    along_col = math.hypot(t.b, t.e)
    cx, cy = t @ (width / 2.0, height / 2.0)
    if crs.is_geographic:
        _, radians = crs.units_factor
        if not radians:
            raise InputError(f"{path}: the angular unit of its CRS is unknown, so its ground "
                             "sampling distance cannot be told; reproject it to a CRS in metres")
        lat = cy * radians
        return along_row * radians * EARTH_RADIUS_M * math.cos(lat), along_col * radians * EARTH_RADIUS_M
    if not crs.is_projected:
        raise InputError(f"{path}: its CRS is neither projected nor geographic, so its ground "
                         "sampling distance cannot be told; reproject it to a CRS in metres")
    _, metres = crs.linear_units_factor
    gx, gy = along_row * metres, along_col * metres
    if _is_web_mercator(crs):
        from rasterio.warp import transform as transform_points

        _, (lat,) = transform_points(crs, "EPSG:4326", [cx], [cy])
        scale = math.cos(math.radians(lat))
        gx, gy = gx * scale, gy * scale
    return gx, gy


def _is_web_mercator(crs: Any) -> bool:
    if crs.to_epsg() in _WEB_MERCATOR_EPSG:
        return True
    wkt = crs.to_wkt()
    return any(name in wkt for name in _WEB_MERCATOR_NAMES)


def same_gsd(a: float, b: float) -> bool:
    """Whether GSD ``b`` is within :data:`GSD_TOLERANCE` of ``a`` (their ratio, the scale a
    resampling from ``a`` to ``b`` would apply, is within 10 % of 1)."""
    return abs(b / a - 1.0) <= GSD_TOLERANCE


def resampled_grid(transform: Any, width: int, height: int, gsd_xy: tuple[float, float],
                   target: float) -> tuple[Any, int, int] | None:
    """(transform, width, height) of the grid over the same bounds, in the same CRS, whose pixels
    are ``target`` ground metres on each side; None when the raster is within
    :data:`GSD_TOLERANCE` of that already. The sizes are rounded to whole pixels, so the grid's
    GSD differs from ``target`` by under one pixel over the raster's width or height."""
    from affine import Affine

    gx, gy = gsd_xy
    if same_gsd(gx, target) and same_gsd(gy, target):
        return None
    new_width = max(1, round(width * gx / target))
    new_height = max(1, round(height * gy / target))
    t = Affine(*tuple(transform)[:6]) @ Affine.scale(width / new_width, height / new_height)
    return t, new_width, new_height


def at_gsd(info: PairInfo, gsd: float) -> PairInfo:
    """``info`` with its ground GSD and, when the raster is to be resampled to ``gsd`` m/px, the
    grid its tiles are cut from; unchanged when it is not georeferenced."""
    found = ground_gsd(info.crs_wkt or None, info.transform, info.width, info.height,
                       info.pair.image)
    if found is None:
        return info
    source_gsd = (found[0] + found[1]) / 2.0
    grid = resampled_grid(info.transform, info.width, info.height, found, gsd)
    if grid is None:
        return replace(info, source_gsd_m=source_gsd)
    transform, width, height = grid
    return replace(info, width=width, height=height, transform=tuple(transform)[:6],
                   source_gsd_m=source_gsd,
                   source_grid=(info.width, info.height, tuple(info.transform)[:6]))


@contextlib.contextmanager
def _on_grid(src: Any, info: PairInfo, resampling: Any) -> Iterator[Any]:
    """``src`` itself, or, for a resampled pair, ``src`` seen on the pair's grid (a WarpedVRT
    that resamples as it is read, window by window). A mask is taken on its image's grid: the
    pair check proved they are the same size, and a mask need not be georeferenced."""
    if info.source_grid is None:
        yield src
        return
    from affine import Affine
    from rasterio.crs import CRS
    from rasterio.vrt import WarpedVRT

    crs = CRS.from_wkt(info.crs_wkt)
    with WarpedVRT(src, src_crs=crs, src_transform=Affine(*info.source_grid[2]), crs=crs,
                   transform=Affine(*info.transform), width=info.width, height=info.height,
                   resampling=resampling) as vrt:
        yield vrt


def read_tiles(info: PairInfo, windows: Iterable[Window]) -> Iterator[tuple[Window, np.ndarray, np.ndarray]]:
    """Yields (window, image HxWx3, mask HxWx1 of 0/1) for ``windows``, reading strip by strip.

    Both files are opened once and read top to bottom one strip of windows at a time: formats
    that cannot seek (PNG) then decode each row once, and memory holds one strip, not the raster.
    """
    from rasterio.enums import Resampling
    from rasterio.windows import Window as RioWindow

    # A resampled pair: bilinear for the imagery, nearest for the mask (its values stay crisp).
    with _open(info.pair.image) as img_file, _open(info.pair.mask) as msk_file, \
            _on_grid(img_file, info, Resampling.bilinear) as img, \
            _on_grid(msk_file, info, Resampling.nearest) as msk:
        for strip_windows in window_rows(sorted(windows)):
            top = strip_windows[0].row_off
            bottom = max(w.row_stop for w in strip_windows)
            strip = RioWindow(0, top, info.width, bottom - top)
            image = info.stretch.apply(_read(img, info.pair.image, strip, (1, 2, 3))).transpose(1, 2, 0)
            mask = _read(msk, info.pair.mask, strip, None)
            if mask.shape[0] == 3 and not (np.array_equal(mask[0], mask[1])
                                           and np.array_equal(mask[0], mask[2])):
                raise InputError(f"{info.pair.mask}: its 3 bands differ; a mask must have 1 band or "
                                 "3 identical bands")
            building = (mask[0] != 0).astype(np.uint8)[..., None]
            for w in strip_windows:
                rs = slice(w.row_off - top, w.row_stop - top)
                cs = slice(w.col_off, w.col_stop)
                yield w, np.ascontiguousarray(image[rs, cs]), building[rs, cs]


def _read(src, path: str, window, bands) -> np.ndarray:
    try:
        return src.read(bands, window=window)
    except Exception as e:  # rasterio raises several types for undecodable data
        raise RasterReadError(f"{path}: corrupt or truncated raster, rows {window.row_off}-"
                              f"{window.row_off + window.height} cannot be decoded ({_short(e)})") from e


def window_transform(info: PairInfo, w: Window) -> tuple[float, ...]:
    """The affine transform (GDAL order a, b, c, d, e, f as rasterio gives it) of a window."""
    a, b, c, d, e, f = info.transform
    return (a, b, c + a * w.col_off + b * w.row_off, d, e, f + d * w.col_off + e * w.row_off)
