"""Which layers are reference masks, which mask belongs to which image, and how the dock names
them. Imports neither ``qgis`` nor Qt (GDAL only, lazily, to peek at a mask's values), so plain
pytest covers it.

The common building datasets (Inria, WHU, SpaceNet crops) name an image and its mask the same and
keep them in sibling folders (``images/austin1.tif`` and ``gt/austin1.tif``); others add a suffix
(``austin1_mask.tif``). Layer names alone cannot tell the two apart, so every decision here looks
at the file: its stem, its folder and, for masks, its values.
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass
from pathlib import PurePath
from typing import Iterable, Sequence

from rs_qgis_plugin.core.errors import SpecError

# Folders that hold reference masks in the datasets analysts use (compared in lower case).
MASK_FOLDERS = frozenset({"gt", "label", "labels", "mask", "masks", "annotation", "annotations",
                          "groundtruth", "ground_truth", "reference", "references", "truth",
                          "targets", "target", "y"})
# Stem suffixes that mark a mask of the image with the stem before them.
MASK_SUFFIXES = ("_mask", "_masks", "_gt", "_label", "_labels", "_target", "_truth",
                 "-mask", "-gt", "-label", "-labels")
# A mask is 0/1 or 0/255; values outside these say "imagery" (or a probability raster).
MASK_VALUE_SETS = (frozenset({0, 1}), frozenset({0, 255}))
# Side of the decimated block a mask check reads: enough to see any image's spread of values,
# few enough pixels (4096) that checking 50 layers stays instant.
PEEK_SIZE = 64

SPLIT_NAMES = ("train", "validation", "test")


@dataclass(frozen=True)
class RasterInfo:
    """What pairing needs to know of one raster layer (the dock fills it from QGIS)."""

    layer_id: str
    name: str  # the layer's name in QGIS, which follows renames
    path: str = ""  # the local file it reads, "" when it is none (WMS, memory...)
    is_mask: bool = False


@dataclass(frozen=True)
class Pairing:
    """Images with their masks, and what found no partner."""

    pairs: dict[str, str]  # image layer id -> mask layer id
    images: tuple[str, ...]  # every imagery layer id (paired or not), in name order
    masks: tuple[str, ...]  # every mask layer id, in name order
    unpaired_images: tuple[str, ...]
    unpaired_masks: tuple[str, ...]


def in_mask_folder(path: str) -> bool:
    """The file sits in a folder that datasets use for reference masks (``gt/``, ``labels/``)."""
    return bool(path) and PurePath(path).parent.name.lower() in MASK_FOLDERS


def values_look_like_mask(band_count: int, values: Iterable[int | float]) -> bool:
    """A single band whose values are only 0/1 or only 0/255 (an empty mask, all 0, counts)."""
    if band_count != 1:
        return False
    seen = set()
    for v in values:
        if v != int(v):
            return False
        seen.add(int(v))
        if len(seen) > 2:
            return False
    return any(seen <= allowed for allowed in MASK_VALUE_SETS)


def peek_values(path: str, size: int = PEEK_SIZE) -> tuple[int, list[float]] | None:
    """The band count of ``path`` and the values of a ``size`` x ``size`` decimated read of its
    first band (its smallest overview when it has one), never the whole raster; ``None`` when
    GDAL cannot open it. Nearest-neighbour decimation keeps values as they are, so a mask stays
    0/255 while an image keeps its spread."""
    from osgeo import gdal  # QGIS's own GDAL

    gdal.PushErrorHandler("CPLQuietErrorHandler")
    try:
        dataset = gdal.OpenEx(path, gdal.OF_RASTER | gdal.OF_READONLY)
        if dataset is None or dataset.RasterCount < 1:
            return None
        band = dataset.GetRasterBand(1)
        if band.GetOverviewCount():
            band = band.GetOverview(band.GetOverviewCount() - 1)
        width, height = band.XSize, band.YSize
        out_w, out_h = min(size, width), min(size, height)
        data = band.ReadRaster(0, 0, width, height, buf_xsize=out_w, buf_ysize=out_h,
                               buf_type=gdal.GDT_Float64)
        if data is None:
            return None
        return dataset.RasterCount, list(struct.unpack(f"{out_w * out_h}d", data))
    except RuntimeError:  # raised instead of returning None where gdal.UseExceptions() is on
        return None
    finally:
        dataset = band = None  # closes it before the error handler goes
        gdal.PopErrorHandler()


def looks_like_mask(path: str) -> bool:
    """Whether the local raster ``path`` is a reference mask: in a mask folder, or a single band
    of only 0/1 or 0/255 values (read from a small decimated block)."""
    if not path:
        return False
    if in_mask_folder(path):
        return True
    peeked = peek_values(path)
    return peeked is not None and values_look_like_mask(*peeked)


def mask_key(stem: str) -> str:
    """The image stem a mask's stem names: ``austin1_mask`` -> ``austin1``."""
    lower = stem.lower()
    for suffix in MASK_SUFFIXES:
        if lower.endswith(suffix) and len(lower) > len(suffix):
            return lower[: -len(suffix)]
    return lower


def _stem(info: RasterInfo) -> str:
    return PurePath(info.path).stem if info.path else info.name


def _closeness(image: RasterInfo, mask: RasterInfo) -> int:
    """Higher is likelier the same pair: sibling folders of one dataset (``x/images`` and
    ``x/gt``), then the same folder (suffix naming), then anything else with the same stem."""
    if not image.path or not mask.path:
        return 0
    ip, mp = PurePath(image.path), PurePath(mask.path)
    if ip.parent.parent == mp.parent.parent and ip.parent != mp.parent:
        return 3
    if ip.parent == mp.parent:
        return 2
    return 1


def pair_layers(infos: Sequence[RasterInfo]) -> Pairing:
    """Pairs each image with the mask of the same stem (a mask's ``_mask``/``_gt``/``_label``
    suffix dropped), preferring the mask in a sibling folder of the same dataset, then one in the
    same folder. Each mask goes to one image at most; the rest is reported unpaired."""
    ordered = sorted(infos, key=lambda i: (i.name.lower(), i.path))
    images = [i for i in ordered if not i.is_mask]
    masks = [i for i in ordered if i.is_mask]
    candidates: list[tuple[int, int, RasterInfo, RasterInfo]] = []
    by_key: dict[str, list[RasterInfo]] = {}
    for m in masks:
        by_key.setdefault(mask_key(_stem(m)), []).append(m)
    for n, image in enumerate(images):
        for m in by_key.get(_stem(image).lower(), ()):
            candidates.append((-_closeness(image, m), n, image, m))
    pairs: dict[str, str] = {}
    taken: set[str] = set()
    # The closest candidates first, so a mask beside its own image is never lost to a farther one.
    for _, _, image, m in sorted(candidates, key=lambda c: (c[0], c[1], c[3].path)):
        if image.layer_id in pairs or m.layer_id in taken:
            continue
        pairs[image.layer_id] = m.layer_id
        taken.add(m.layer_id)
    return Pairing(
        pairs=pairs, images=tuple(i.layer_id for i in images),
        masks=tuple(m.layer_id for m in masks),
        unpaired_images=tuple(i.layer_id for i in images if i.layer_id not in pairs),
        unpaired_masks=tuple(m.layer_id for m in masks if m.layer_id not in taken))


def display_labels(infos: Sequence[RasterInfo]) -> dict[str, str]:
    """A distinct label per layer: its name and folder, ``austin1 — images/``; where two layers
    would still read the same (the same folder name in two datasets), more of the path, up to the
    whole folder. A layer without a file keeps its name."""

    def label(info: RasterInfo, depth: int) -> str:
        if not info.path:
            return info.name
        parts = PurePath(info.path).parent.parts[-depth:]
        folder = "/".join(p for p in parts if p not in ("/", "\\")) or "/"
        return f"{info.name} — {folder}/"

    depth = {i.layer_id: 1 for i in infos}
    for _ in range(32):  # deeper than any folder tree worth naming
        labels = {i.layer_id: label(i, depth[i.layer_id]) for i in infos}
        counts: dict[str, int] = {}
        for text in labels.values():
            counts[text] = counts.get(text, 0) + 1
        clashing = [i for i in infos if counts[labels[i.layer_id]] > 1 and i.path
                    and depth[i.layer_id] < len(PurePath(i.path).parent.parts)]
        if not clashing:
            return labels
        for i in clashing:
            depth[i.layer_id] += 1
    return labels


def check_split(split: Sequence[float]) -> tuple[float, float, float]:
    """Three non-negative train/validation/test fractions adding up to 1, train above 0 (the
    cluster's own rule, checked here so the dock refuses before uploading)."""
    if len(split) != 3 or any(f < 0 for f in split) or abs(sum(split) - 1) > 1e-6:
        raise SpecError(f"the split must be three non-negative fractions for train, validation "
                        f"and test adding up to 1 (got {', '.join(f'{f:g}' for f in split)})")
    if split[0] <= 0:
        raise SpecError("the split's train fraction must be above 0")
    return (float(split[0]), float(split[1]), float(split[2]))


def split_counts(n: int, split: Sequence[float]) -> tuple[int, int, int]:
    """How many of ``n`` pairs the cluster's prepare stage puts in train, validation and test
    (whole rasters, largest remainder, each non-zero share at least one when there are enough):
    the same rule as ``rs_cluster.prepare.assign_splits``, so the dock can say it up front."""
    exact = [f * n for f in split]
    counts = [int(x) for x in exact]
    for i in sorted(range(3), key=lambda i: exact[i] - counts[i], reverse=True)[: n - sum(counts)]:
        counts[i] += 1
    wanted = [i for i in range(3) if split[i] > 0]
    if n >= len(wanted):
        for i in wanted:
            if counts[i] == 0:
                donor = max(range(3), key=lambda j: counts[j])
                counts[donor] -= 1
                counts[i] += 1
    return counts[0], counts[1], counts[2]


_NUMBER = re.compile(r"(\d+)")


def natural_key(text: str) -> list[object]:
    """``austin1_2`` before ``austin1_10``: how an analyst expects numbered tiles sorted."""
    return [int(p) if p.isdigit() else p.lower() for p in _NUMBER.split(text)]
