"""Finding, pairing and checking image/mask rasters, and reading their windows.

Any raster GDAL reads is accepted (GeoTIFF, TIFF, PNG, ...). Imagery must be 8-bit with 3 (RGB) or
4 (RGBA) bands; masks 1 band, or 3 identical bands (RGB masks as some datasets ship them). A
building is any non-zero mask value. Files are only ever opened read-only.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from rs_cluster.errors import InputError, RasterReadError
from rs_cluster.windows import Window, window_rows

RASTER_SUFFIXES = (".tif", ".tiff", ".png", ".jpg", ".jpeg", ".jp2", ".img", ".vrt")


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


def list_rasters(folder: str | os.PathLike[str]) -> list[Path]:
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"{folder}: not a folder (expected a folder of rasters)")
    return sorted(p for p in folder.iterdir()
                  if p.is_file() and p.suffix.lower() in RASTER_SUFFIXES and not p.name.startswith("."))


def pair_rasters(images_dir: str | os.PathLike[str], masks_dir: str | os.PathLike[str]
                 ) -> tuple[list[RasterPair], list[InputError]]:
    """Pairs each image with the mask of the same file name (or, failing that, the same stem).

    Returns the pairs and an error for every image without a mask; raises when there is no image.
    """
    images = list_rasters(images_dir)
    if not images:
        raise InputError(f"{images_dir}: no rasters found (looked for {', '.join(RASTER_SUFFIXES)})")
    masks = list_rasters(masks_dir)
    by_name = {p.name: p for p in masks}
    by_stem: dict[str, list[Path]] = {}
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
        if img.dtypes[0] != "uint8":
            raise InputError(f"{pair.image}: pixels are {img.dtypes[0]}; 8-bit (uint8) imagery expected")
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
                    mask_bands=mask_bands, crs_wkt=crs_wkt, transform=transform)  # type: ignore[arg-type]


def read_tiles(info: PairInfo, windows: Iterable[Window]) -> Iterator[tuple[Window, np.ndarray, np.ndarray]]:
    """Yields (window, image HxWx3, mask HxWx1 of 0/1) for ``windows``, reading strip by strip.

    Both files are opened once and read top to bottom one strip of windows at a time: formats
    that cannot seek (PNG) then decode each row once, and memory holds one strip, not the raster.
    """
    from rasterio.windows import Window as RioWindow

    with _open(info.pair.image) as img, _open(info.pair.mask) as msk:
        for strip_windows in window_rows(sorted(windows)):
            top = strip_windows[0].row_off
            bottom = max(w.row_stop for w in strip_windows)
            strip = RioWindow(0, top, info.width, bottom - top)
            image = _read(img, info.pair.image, strip, (1, 2, 3)).transpose(1, 2, 0)
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
