"""Building polygons from a mask GeoTIFF, written to a GeoPackage in the mask's CRS.

The mask is read and traced (GDAL's polygonize, through rasterio ``shapes``) a strip of rows at a
time; a building cut by a strip's edge is traced again, whole, with the next strip, so memory
holds one strip and its polygons, never the whole mask's, and each polygon is written as soon as
its strip is done. Specks smaller than ``min_area_px`` pixels are
dropped (holes too), and the pixel staircase is simplified with Douglas-Peucker at a tolerance of
``simplify_px`` pixels; a ring that would collapse is kept as it was.

``min_building_m2`` states that size in square metres instead, for a mask whose CRS has a linear
unit (:func:`pixel_area_m2`); a mask in degrees or without a CRS keeps the pixel rule, and the
caller is told why.

``regularize`` squares each outline for an analyst (:func:`regularize_polygon`): its edges are
snapped to the building's two dominant, perpendicular directions. Round or ragged shapes, and any
outline that squaring would distort or tangle, are kept as simplified; the ``regularized``
property (1 or 0) says which outlines were squared.
"""

from __future__ import annotations

import math
import os
import secrets
import warnings
from typing import Any, Callable, Iterator

import numpy as np

LAYER = "buildings"
_BATCH = 1000
_WEB_MERCATOR_RADIUS = 6378137.0  # EPSG:3857's sphere (the WGS 84 semi-major axis)
# Squaring rules: below this alignment an outline is not rectilinear enough to square (a circle
# scores about 0, a rectangle 1); a squared ring must keep its area within this fraction; sides
# shorter than this many pixels are pixel noise, folded into their neighbours. Squaring starts
# from rings simplified at least this much: at 1 px, a one-pixel bite out of a turned wall stays
# as a zigzag that squares into a false step (31 of 156 turned, bitten rectangles; none at 2 px).
_MIN_ALIGNMENT = 0.5
_MAX_AREA_CHANGE = 0.3
_MIN_SIDE_PX = 2.5
_SQUARING_SIMPLIFY_PX = 2.0
_CHORD_PX = 6.0  # see dominant_angle
_MAX_CORNERS = 1000  # per polygon: the O(n^2) crossing check's memory stays small


def _signed_area(ring: np.ndarray) -> float:
    x, y = ring[:, 0], ring[:, 1]
    return float(np.dot(x[:-1], y[1:]) - np.dot(x[1:], y[:-1])) / 2.0


def ring_area(ring: np.ndarray) -> float:
    """Unsigned shoelace area of a closed ring (N x 2, first point repeated last)."""
    return abs(_signed_area(ring))


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


# -- sizes in square metres ------------------------------------------------------------------------

def pixel_area_m2(crs: Any, transform: Any, width: int, height: int) -> float | None:
    """Ground area of one pixel in m², or ``None`` when the CRS has no linear unit (geographic
    coordinates, or no CRS at all).

    EPSG:3857 (Web Mercator) is in metres, but they are ground metres only at the equator: the
    projection stretches both axes by 1/cos(latitude). The area is therefore scaled by cos² of
    the latitude at the raster's centre (about 0.83 at Xiamen, 24.5° N), which is exact enough
    over one raster of building imagery.
    """
    from rasterio.errors import CRSError

    if crs is None or not crs.is_projected:
        return None
    try:
        metres = float(crs.linear_units_factor[1])  # metres per CRS unit (feet CRSs too)
    except CRSError:
        return None
    area = abs(transform.a * transform.e - transform.b * transform.d) * metres ** 2
    if crs.to_epsg() == 3857:
        y = transform.d * width / 2 + transform.e * height / 2 + transform.f  # the centre's
        latitude = math.atan(math.sinh(y * metres / _WEB_MERCATOR_RADIUS))
        area *= math.cos(latitude) ** 2
    return area


def _min_area_rule(src: Any, path: str, min_area_px: float, min_building_m2: float | None
                   ) -> tuple[float, str | None]:
    """(smallest area kept, in pixels; a warning or None) for an open mask."""
    if min_building_m2 is None:
        return min_area_px, None
    per_pixel = pixel_area_m2(src.crs, src.transform, src.width, src.height)
    if per_pixel is None:
        where = f"its CRS {src.crs} is not in metres" if src.crs else "it has no CRS"
        return min_area_px, (f"{path}: min_building_m2 {min_building_m2:g} ignored because {where}; "
                             f"polygons under {min_area_px:g} pixels were dropped instead")
    return min_building_m2 / per_pixel, None


# -- squaring outlines -----------------------------------------------------------------------------

def dominant_angle(ring: np.ndarray, chord: float) -> tuple[float, float]:
    """(angle in radians, alignment 0..1) of a ring's two perpendicular main directions.

    The directions are those of chords ``chord`` long between points spaced evenly along the
    ring: on a pixel staircase they follow the wall, where the raw edges are all axis-aligned and
    the simplified ones zigzag (up to 19° off for a 24 x 12 m building at 0.3 m, against under
    1°). Their angles are taken times four, so directions 90° apart coincide, and averaged
    weighted by length; the alignment is that mean's length: 1 when every chord runs along the
    two directions, near 0 for a circle."""
    step = chord / 24.0
    edges = np.diff(ring, axis=0)
    along = np.concatenate([[0.0], np.cumsum(np.hypot(edges[:, 0], edges[:, 1]))])
    at = np.arange(0.0, along[-1], step)
    points = np.column_stack([np.interp(at, along, ring[:, 0]), np.interp(at, along, ring[:, 1])])
    chords = np.roll(points, -24, axis=0) - points
    length = np.hypot(chords[:, 0], chords[:, 1])
    theta4 = 4.0 * np.arctan2(chords[:, 1], chords[:, 0])
    c, s, total = float(length @ np.cos(theta4)), float(length @ np.sin(theta4)), float(length.sum())
    return math.atan2(s, c) / 4.0, (math.hypot(c, s) / total if total else 0.0)


def _rotate(points: np.ndarray, angle: float) -> np.ndarray:
    """Points (N x 2) turned anticlockwise by ``angle`` about the origin."""
    c, s = math.cos(angle), math.sin(angle)
    return points @ np.array([[c, s], [-s, c]])


def _runs(points: np.ndarray) -> list[list[Any]]:
    """The ring's edges (points: N x 2, not closed, axis-aligned frame) merged into runs of
    consecutive horizontal or vertical edges: ``[horizontal, length, length * position]``, the
    position being y for a horizontal run and x for a vertical one."""
    nxt = np.roll(points, -1, axis=0)
    edges, mids = nxt - points, (nxt + points) / 2.0
    horizontal = np.abs(edges[:, 0]) >= np.abs(edges[:, 1])
    length = np.hypot(edges[:, 0], edges[:, 1])
    position = np.where(horizontal, mids[:, 1], mids[:, 0])
    runs: list[list[Any]] = []
    for h, n, p in zip(horizontal.tolist(), length.tolist(), position.tolist()):
        if runs and runs[-1][0] == h:
            runs[-1][1] += n
            runs[-1][2] += n * p
        else:
            runs.append([h, n, n * p])
    if len(runs) > 1 and runs[0][0] == runs[-1][0]:
        last = runs.pop()
        runs[0][1] += last[1]
        runs[0][2] += last[2]
    return runs


def _drop_short_runs(runs: list[list[Any]], min_side: float) -> list[list[Any]]:
    """Removes the shortest run while it is under ``min_side``: its two neighbours, parallel to
    each other, become one run at their length-weighted position (a pixel step disappears)."""
    while len(runs) > 4:
        k = min(range(len(runs)), key=lambda i: runs[i][1])
        if runs[k][1] >= min_side:
            break
        before, after = (k - 1) % len(runs), (k + 1) % len(runs)
        runs[before][1] += runs[after][1]
        runs[before][2] += runs[after][2]
        for i in sorted((k, after), reverse=True):
            del runs[i]
    return runs


def regularize_ring(ring: np.ndarray, angle: float, min_side: float) -> np.ndarray | None:
    """The closed ring squared along ``angle`` (and ``angle`` + 90°), or ``None`` when squaring
    would degenerate it: fewer than 4 corners, no area, its winding reversed, or its area changed
    by more than 30 %. Crossings are checked by the caller, over all rings of the polygon.

    In a frame turned by -``angle`` each edge is horizontal or vertical, whichever it is closer
    to; consecutive edges of one kind form a run, placed at its edges' length-weighted mean
    position, and the corners are where consecutive runs meet."""
    origin = ring[:-1].mean(axis=0)  # local coordinates keep the arithmetic exact enough
    runs = _drop_short_runs(_runs(_rotate(ring[:-1] - origin, -angle)), min_side)
    if len(runs) < 4 or any(r[1] <= 0 for r in runs):
        return None
    corners = []
    for run, nxt in zip(runs, runs[1:] + runs[:1]):
        at, cross = run[2] / run[1], nxt[2] / nxt[1]
        corners.append((cross, at) if run[0] else (at, cross))
    squared = _rotate(np.array(corners), angle) + origin
    squared = np.vstack([squared, squared[:1]])
    before, after = _signed_area(ring), _signed_area(squared)
    if after == 0 or (after > 0) != (before > 0) or abs(after - before) > _MAX_AREA_CHANGE * abs(before):
        return None
    return squared


def rings_cross(rings: list[np.ndarray]) -> bool:
    """Whether any two edges of the closed rings touch or cross, other than consecutive edges of
    one ring at their shared corner. A plain O(n²) test over all edge pairs: squared outlines
    have few corners."""
    origin = rings[0][0]
    starts = np.vstack([r[:-1] for r in rings]) - origin
    ends = np.vstack([r[1:] for r in rings]) - origin
    ring_of = np.concatenate([np.full(len(r) - 1, i) for i, r in enumerate(rings)])
    index = np.concatenate([np.arange(len(r) - 1) for r in rings])
    size = np.concatenate([np.full(len(r) - 1, len(r) - 1) for r in rings])
    scale = float(np.abs(np.vstack([starts, ends])).max()) or 1.0
    eps = 1e-9 * scale * scale

    def side(a: np.ndarray, b: np.ndarray, c: np.ndarray) -> np.ndarray:
        v = (b[:, None] - a[:, None]), (c[None] - a[:, None])
        d = v[0][..., 0] * v[1][..., 1] - v[0][..., 1] * v[1][..., 0]
        return np.where(np.abs(d) < eps, 0.0, d)

    apart = side(starts, ends, starts) * side(starts, ends, ends) <= 0  # [i, j]: j across i's line
    straddles = apart & apart.T
    lo, hi = np.minimum(starts, ends), np.maximum(starts, ends)
    boxes = ((lo[:, None] <= hi[None] + eps) & (lo[None] <= hi[:, None] + eps)).all(axis=2)
    gap = (index[None] - index[:, None]) % size[:, None]
    neighbours = (ring_of[:, None] == ring_of[None]) & ((gap <= 1) | (gap == size[:, None] - 1))
    return bool(np.triu(straddles & boxes & ~neighbours, k=1).any())


def regularize_polygon(rings: list[np.ndarray], pixel_size: float, simplify_px: float = 1.0
                       ) -> list[np.ndarray] | None:
    """Shell and holes, as polygonized (the pixel staircase), squared along the shell's main
    directions, or ``None`` (keep them as they are) when the shell is not rectilinear enough, a
    ring degenerates or rings cross."""
    angle, alignment = dominant_angle(rings[0], _CHORD_PX * pixel_size)
    if alignment < _MIN_ALIGNMENT:
        return None
    tolerance = max(simplify_px, _SQUARING_SIMPLIFY_PX) * pixel_size
    squared = [regularize_ring(simplify_ring(r, tolerance), angle, _MIN_SIDE_PX * pixel_size)
               for r in rings]
    if any(r is None for r in squared):
        return None
    kept = [r for r in squared if r is not None]
    if sum(len(r) for r in kept) > _MAX_CORNERS or rings_cross(kept):
        return None
    return kept


# -- reading and writing ---------------------------------------------------------------------------

STRIP_ROWS = 1024  # rows of the mask read and traced at a time


def _regions(src: Any, strip_rows: int = STRIP_ROWS) -> Iterator[list[np.ndarray]]:
    """The rings (pixel coordinates: x = column, y = row) of every 4-connected building region of
    an open mask, each once and whole, traced strip by strip so that memory holds one strip and
    its regions, never the mask's.

    A strip's regions that reach its last row may go on below: they are not given, and the next
    strip starts at the highest of their first rows, so they are traced again there, whole. In
    that strip, a region (or the lower rest of one) that ends above the previous strip's last row
    was given before, and is passed over. A region taller than a strip gets a taller one."""
    from rasterio.features import shapes
    from rasterio.windows import Window

    height, width = src.height, src.width
    top, rows, done_below = 0, strip_rows, 0  # regions ending above row done_below - 1: given
    while top < height:
        bottom = min(top + rows, height)
        data = src.read(1, window=Window(0, top, width, bottom - top))
        held = None
        for geom, _ in shapes(data, mask=data != 0, connectivity=4):
            rings = [np.asarray(r, dtype=np.float64) for r in geom["coordinates"]]
            last = top + int(rings[0][:, 1].max()) - 1  # the region's last row
            if last < done_below - 1:
                continue
            if bottom < height and last == bottom - 1:
                first = top + int(rings[0][:, 1].min())
                held = first if held is None else min(held, first)
                continue
            for ring in rings:
                ring[:, 1] += top
            yield rings
        if bottom >= height:
            return
        done_below = bottom
        if held is None:
            top, rows = bottom, strip_rows
        elif held > top:
            top, rows = held, strip_rows
        else:
            rows *= 2  # a region from this strip's first row to its last: read more rows


def building_polygons(mask_path: str, *, min_area_px: float = 16, simplify_px: float = 1.0,
                      regularize: bool = False, strip_rows: int = STRIP_ROWS
                      ) -> Iterator[tuple[dict[str, Any], float, bool]]:
    """Yields (GeoJSON polygon, area in CRS units, squared?) for each building region of a mask,
    as its strip of rows is traced (:func:`_regions`)."""
    import rasterio

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # NotGeoreferencedWarning: pixel-grid masks are fine
        src = rasterio.open(mask_path)
    # GDAL's block cache would keep every block read (up to 5 % of RAM); each strip is read
    # once, so a block row of it is enough.
    cache_mb = 16 + math.ceil(src.width * max(256, src.block_shapes[0][0]) / 2**20)
    with src, rasterio.Env(GDAL_CACHEMAX=cache_mb):
        t = src.transform
        pixel_area = abs(t.a * t.e - t.b * t.d) or 1.0
        tolerance = simplify_px * (pixel_area ** 0.5)
        for pixel_rings in _regions(src, strip_rows):
            rings = [np.column_stack([t.a * r[:, 0] + t.b * r[:, 1] + t.c,
                                      t.d * r[:, 0] + t.e * r[:, 1] + t.f]) for r in pixel_rings]
            area = ring_area(rings[0]) - sum(ring_area(r) for r in rings[1:])
            if area / pixel_area < min_area_px:
                continue
            rings = rings[:1] + [r for r in rings[1:] if ring_area(r) / pixel_area >= min_area_px]
            squared = regularize_polygon(rings, pixel_area ** 0.5, simplify_px) if regularize else None
            kept = squared or [simplify_ring(r, tolerance) for r in rings]
            yield ({"type": "Polygon", "coordinates": [r.tolist() for r in kept]},
                   ring_area(kept[0]) - sum(ring_area(r) for r in kept[1:]), squared is not None)


def polygonize_mask(mask_path: str, gpkg_path: str, *, min_area_px: float = 16, simplify_px: float = 1.0,
                    token: str | None = None, regularize: bool = False,
                    min_building_m2: float | None = None,
                    warn: Callable[[str], None] | None = None) -> int:
    """Writes the building polygons of ``mask_path`` to ``gpkg_path`` atomically; returns the count.

    ``min_building_m2``, when the mask's CRS has a linear unit, replaces ``min_area_px``; otherwise
    ``warn`` is told that the pixel rule was kept."""
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
            min_area_px, problem = _min_area_rule(src, mask_path, min_area_px, min_building_m2)
    if problem and warn:
        warn(problem)
    schema = {"geometry": "Polygon",
              "properties": {"id": "int", "area": "float", "area_px": "float", "regularized": "int"}}
    count = 0
    try:
        with fiona.open(tmp, "w", driver="GPKG", layer=LAYER, schema=schema,
                        **({"crs_wkt": crs_wkt} if crs_wkt else {})) as dst:
            batch = []
            for geom, area, squared in building_polygons(mask_path, min_area_px=min_area_px,
                                                         simplify_px=simplify_px, regularize=regularize):
                count += 1
                batch.append(fiona.Feature.from_dict({
                    "geometry": geom,
                    "properties": {"id": count, "area": round(area, 3),
                                   "area_px": round(area / pixel_area, 1), "regularized": int(squared)}}))
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
