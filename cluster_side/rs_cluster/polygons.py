"""Building polygons from a mask GeoTIFF, written to a GeoPackage in the mask's CRS.

GDAL polygonizes straight from the file band (rasterio ``shapes`` on a ``Band``), scanline by
scanline, so the mask is never loaded whole. Specks smaller than ``min_area_px`` pixels are
dropped (holes too), and the pixel staircase is simplified with Douglas-Peucker at a tolerance of
``simplify_px`` pixels; a ring that would collapse is kept as it was.
"""

from __future__ import annotations

import os
import secrets
import warnings
from typing import Any, Iterator

import numpy as np

LAYER = "buildings"
_BATCH = 1000


def ring_area(ring: np.ndarray) -> float:
    """Unsigned shoelace area of a closed ring (N x 2, first point repeated last)."""
    x, y = ring[:, 0], ring[:, 1]
    return abs(float(np.dot(x[:-1], y[1:]) - np.dot(x[1:], y[:-1]))) / 2.0


def simplify_ring(ring: np.ndarray, tolerance: float) -> np.ndarray:
    """Douglas-Peucker on a closed ring; returns the ring unchanged if it would collapse."""
    pts = ring[:-1]
    n = len(pts)
    if tolerance <= 0 or n < 4:
        return ring
    closed = np.vstack([pts, pts[:1]])
    far = int(np.argmax(np.hypot(*(pts - pts[0]).T)))
    keep = np.zeros(n + 1, dtype=bool)
    keep[[0, far, n]] = True
    stack = [(0, far), (far, n)]
    while stack:
        a, b = stack.pop()
        if b - a < 2:
            continue
        p, q = closed[a], closed[b]
        seg = closed[a + 1:b]
        d = q - p
        length = float(np.hypot(*d))
        if length == 0:
            dist = np.hypot(*(seg - p).T)
        else:
            dist = np.abs(d[0] * (seg[:, 1] - p[1]) - d[1] * (seg[:, 0] - p[0])) / length
        i = int(np.argmax(dist))
        if dist[i] > tolerance:
            m = a + 1 + i
            keep[m] = True
            stack.extend([(a, m), (m, b)])
    out = closed[keep]
    if len(out) < 4 or ring_area(out) == 0:
        return ring
    return out


def building_polygons(mask_path: str, *, min_area_px: int = 16, simplify_px: float = 1.0
                      ) -> Iterator[tuple[dict[str, Any], float]]:
    """Yields (GeoJSON polygon, area in CRS units) for each building region of a mask GeoTIFF."""
    import rasterio
    from rasterio.features import shapes

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # NotGeoreferencedWarning: pixel-grid masks are fine
        src = rasterio.open(mask_path)
    with src:
        t = src.transform
        pixel_area = abs(t.a * t.e - t.b * t.d) or 1.0
        tolerance = simplify_px * (pixel_area ** 0.5)
        band = rasterio.band(src, 1)
        for geom, _ in shapes(band, mask=band, connectivity=4, transform=t):
            rings = [np.asarray(r, dtype=np.float64) for r in geom["coordinates"]]
            area = ring_area(rings[0]) - sum(ring_area(r) for r in rings[1:])
            if area / pixel_area < min_area_px:
                continue
            shell = simplify_ring(rings[0], tolerance)
            holes = [simplify_ring(r, tolerance) for r in rings[1:]
                     if ring_area(r) / pixel_area >= min_area_px]
            yield ({"type": "Polygon", "coordinates": [r.tolist() for r in (shell, *holes)]},
                   ring_area(shell) - sum(ring_area(r) for r in holes))


def polygonize_mask(mask_path: str, gpkg_path: str, *, min_area_px: int = 16, simplify_px: float = 1.0,
                    token: str | None = None) -> int:
    """Writes the building polygons of ``mask_path`` to ``gpkg_path`` atomically; returns the count."""
    import fiona
    import rasterio

    token = token or secrets.token_hex(4)
    folder, name = os.path.split(gpkg_path)
    tmp = os.path.join(folder, f".{os.path.splitext(name)[0]}.partial-{token}.gpkg")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with rasterio.open(mask_path) as src:
            crs_wkt = src.crs.to_wkt() if src.crs else ""
            pixel_area = abs(src.transform.a * src.transform.e - src.transform.b * src.transform.d) or 1.0
    schema = {"geometry": "Polygon", "properties": {"id": "int", "area": "float", "area_px": "float"}}
    count = 0
    try:
        with fiona.open(tmp, "w", driver="GPKG", layer=LAYER, schema=schema,
                        **({"crs_wkt": crs_wkt} if crs_wkt else {})) as dst:
            batch = []
            for geom, area in building_polygons(mask_path, min_area_px=min_area_px,
                                                simplify_px=simplify_px):
                count += 1
                batch.append(fiona.Feature.from_dict({
                    "geometry": geom,
                    "properties": {"id": count, "area": round(area, 3),
                                   "area_px": round(area / pixel_area, 1)}}))
                if len(batch) >= _BATCH:
                    dst.writerecords(batch)
                    batch = []
            if batch:
                dst.writerecords(batch)
        os.replace(tmp, gpkg_path)
    except BaseException:
        for leftover in (tmp, tmp + "-journal", tmp + "-wal", tmp + "-shm"):
            if os.path.exists(leftover):
                os.unlink(leftover)
        raise
    return count
