"""polygons: building outlines from real and drawn masks, squared and sized in square metres.

Drawn masks are real GeoTIFFs (0.3 m pixels in UTM 50N unless a test says otherwise) whose
buildings are burnt by pixel centre, so their edges are the pixel staircase a model's mask has.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import fiona
import numpy as np
import pytest
import rasterio
from rasterio.crs import CRS
from rasterio.transform import from_origin

from rs_cluster.polygons import building_polygons, pixel_area_m2, polygonize_mask, ring_area, rings_cross
from tests import devdata

PIXEL = 0.3
XIAMEN_GT = devdata.subset("xiamen_robosat_z18") / "gt" / devdata.first_files("xiamen_robosat_z18", 1)[0]
AUSTIN_GT = devdata.subset("deeposlandia_georef_samples") / "gt" / "inria_austin_sample.tif"


def burn(corners: np.ndarray, shape: tuple[int, int] = (200, 200)) -> np.ndarray:
    """Pixels (row, col) whose centre lies inside the polygon ``corners`` (x = col, y = row)."""
    rows, cols = np.mgrid[0:shape[0], 0:shape[1]] + 0.5
    inside = np.zeros(shape, bool)
    for (x1, y1), (x2, y2) in zip(corners, np.roll(corners, -1, axis=0)):
        crosses = (y1 > rows) != (y2 > rows)
        x_at = x1 + (rows - y1) * (x2 - x1) / (y2 - y1 if y2 != y1 else 1.0)
        inside ^= crosses & (cols < x_at)
    return inside


def turned(corners: list[tuple[float, float]], degrees: float, about=(100.0, 100.0)) -> np.ndarray:
    t = math.radians(degrees)
    rot = np.array([[math.cos(t), -math.sin(t)], [math.sin(t), math.cos(t)]])
    return (np.asarray(corners, float) - about) @ rot.T + about


def write_mask(path: Path, mask: np.ndarray, crs: str | None = "EPSG:32650", pixel: float = PIXEL,
               origin: tuple[float, float] = (500000.0, 2700000.0)) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # no CRS: NotGeoreferencedWarning
        with rasterio.open(path, "w", driver="GTiff", width=mask.shape[1], height=mask.shape[0],
                           count=1, dtype="uint8", crs=crs,
                           transform=from_origin(*origin, pixel, pixel)) as dst:
            dst.write(mask.astype(np.uint8) * 255, 1)
    return path


def corner_angles(ring: np.ndarray) -> np.ndarray:
    """Interior turn at each corner of a closed ring, in degrees (90 for a right angle)."""
    edges = np.diff(ring, axis=0)
    nxt = np.roll(edges, -1, axis=0)
    cos = (edges * nxt).sum(axis=1) / (np.hypot(*edges.T) * np.hypot(*nxt.T))
    return np.degrees(np.arccos(np.clip(cos, -1, 1)))


def outlines(path: Path, **kw) -> list[tuple[list[np.ndarray], float, bool]]:
    return [([np.asarray(r) for r in geom["coordinates"]], area, squared)
            for geom, area, squared in building_polygons(str(path), **kw)]


def test_a_turned_staircase_rectangle_comes_out_square_along_its_walls(tmp_path):
    """24 x 12 m at 30°, with a few pixels of its wall eaten away as a model's mask would."""
    mask = burn(turned([(60, 80), (140, 80), (140, 120), (60, 120)], 30))
    rng = np.random.default_rng(0)
    wall = np.argwhere(mask & ~np.roll(mask, 1, axis=0))
    for r, c in wall[rng.choice(len(wall), 6, replace=False)]:
        mask[r, c] = False
    path = write_mask(tmp_path / "rect.tif", mask)

    (plain, _, squared_plain), = outlines(path)
    (rings, area, squared), = outlines(path, regularize=True)
    assert not squared_plain and len(plain[0]) - 1 > 4
    shell = rings[0]
    assert squared and len(shell) - 1 == 4
    np.testing.assert_allclose(corner_angles(shell), 90.0, atol=1.0)
    edges = np.diff(shell, axis=0)
    longest = edges[np.argmax(np.hypot(*edges.T))]
    # Rows grow southwards, so 30° on the pixel grid is -30° on the map.
    wall_angle = (math.degrees(math.atan2(longest[1], longest[0])) + 30.0 + 90.0) % 180.0 - 90.0
    assert abs(wall_angle) < 1.0, wall_angle
    assert abs(area / (24 * 12) - 1) < 0.05, area


def test_an_l_shaped_building_keeps_six_right_angled_corners(tmp_path):
    corners = turned([(40, 40), (160, 40), (160, 90), (90, 90), (90, 160), (40, 160)], 20)
    path = write_mask(tmp_path / "l.tif", burn(corners))
    (rings, area, squared), = outlines(path, regularize=True)
    assert squared and len(rings[0]) - 1 == 6
    np.testing.assert_allclose(corner_angles(rings[0]), 90.0, atol=1.0)
    true_area = (120 * 50 + 50 * 70) * PIXEL ** 2
    assert abs(area / true_area - 1) < 0.05


def test_a_round_building_is_kept_as_traced(tmp_path):
    """Squaring a water tank would invent corners: it stays simplified, and valid."""
    rows, cols = np.mgrid[0:200, 0:200]
    path = write_mask(tmp_path / "tank.tif", (rows - 100) ** 2 + (cols - 100) ** 2 < 30 ** 2)
    (rings, area, squared), = outlines(path, regularize=True)
    assert not squared and len(rings[0]) - 1 > 8
    assert not rings_cross(rings)
    assert abs(area / (math.pi * (30 * PIXEL) ** 2) - 1) < 0.03


def test_a_building_with_a_courtyard_is_squared_hole_and_all(tmp_path):
    outer = turned([(40, 40), (160, 40), (160, 160), (40, 160)], 15)
    inner = turned([(80, 80), (120, 80), (120, 120), (80, 120)], 15)
    path = write_mask(tmp_path / "court.tif", burn(outer) & ~burn(inner))
    (rings, _, squared), = outlines(path, regularize=True)
    assert squared and [len(r) - 1 for r in rings] == [4, 4]
    assert not rings_cross(rings)
    assert abs(ring_area(rings[1]) / (40 * 40 * PIXEL ** 2) - 1) < 0.1


def test_rings_cross_finds_a_bow_tie_and_a_hole_poking_out():
    square = np.array([(0, 0), (4, 0), (4, 4), (0, 4), (0, 0)], float)
    bow_tie = np.array([(0, 0), (4, 4), (4, 0), (0, 4), (0, 0)], float)
    hole_in = np.array([(1, 1), (1, 3), (3, 3), (3, 1), (1, 1)], float)
    hole_out = hole_in + (2, 0)
    assert not rings_cross([square]) and not rings_cross([square, hole_in])
    assert rings_cross([bow_tie]) and rings_cross([square, hole_out])


def test_min_building_m2_drops_specks_and_holes_under_that_area(tmp_path):
    """At 0.3 m a 3 x 3 px speck (0.81 m²) and a 3 x 3 px hole go at 2 m²; a 10 x 10 px shed stays."""
    mask = np.zeros((60, 60), bool)
    mask[5:8, 5:8] = True  # speck
    mask[20:30, 20:30] = True  # shed, 9 m²
    mask[40:55, 40:55] = True
    mask[46:49, 46:49] = False  # hole in the last building
    path = write_mask(tmp_path / "specks.tif", mask)

    assert len(outlines(path, min_area_px=1)) == 3
    gpkg = tmp_path / "b.gpkg"
    count = polygonize_mask(str(path), str(gpkg), min_area_px=1, min_building_m2=2.0)
    with fiona.open(gpkg) as layer:
        kept = [(f.properties["area"], len(f.geometry["coordinates"])) for f in layer]
    assert count == 2
    assert sorted(kept) == [(pytest.approx(9.0), 1), (pytest.approx(15 * 15 * 0.09), 1)]


def test_web_mercator_pixels_are_scaled_to_ground_metres_at_the_raster_latitude():
    """Xiamen (EPSG:3857, 0.6 'metres' at about 24.5° N): a pixel covers 0.6² cos²(lat) m²."""
    with rasterio.open(XIAMEN_GT) as src:
        crs, t, width, height = src.crs, src.transform, src.width, src.height
    y = t.f + t.e * height / 2  # north up: the centre's northing
    latitude = 2 * math.atan(math.exp(y / 6378137.0)) - math.pi / 2  # inverse Mercator (Snyder 7-4)
    assert 24 < math.degrees(latitude) < 25
    expected = abs(t.a * t.e) * math.cos(latitude) ** 2
    assert pixel_area_m2(crs, t, width, height) == pytest.approx(expected, rel=1e-9)
    assert pixel_area_m2(crs, t, width, height) < 0.9 * abs(t.a * t.e)

    with rasterio.open(AUSTIN_GT) as src:  # UTM: metres as they are
        assert pixel_area_m2(src.crs, src.transform, src.width, src.height) == pytest.approx(0.09)
    assert pixel_area_m2(CRS.from_epsg(2277), t, width, height) == pytest.approx(  # US survey feet
        abs(t.a * t.e) * (1200 / 3937) ** 2)
    assert pixel_area_m2(CRS.from_epsg(4326), t, width, height) is None
    assert pixel_area_m2(None, t, width, height) is None


@pytest.mark.parametrize("crs", ["EPSG:4326", None])
def test_min_building_m2_on_a_mask_without_metres_keeps_the_pixel_rule_and_says_so(tmp_path, crs):
    mask = np.zeros((40, 40), bool)
    mask[2:5, 2:5] = True  # 9 px
    mask[10:30, 10:30] = True
    path = write_mask(tmp_path / "deg.tif", mask, crs=crs, pixel=1e-5, origin=(118.0, 24.5))
    said: list[str] = []
    count = polygonize_mask(str(path), str(tmp_path / "b.gpkg"), min_area_px=16,
                            min_building_m2=1e-12, warn=said.append)
    assert count == 1  # the 9 px speck went by the 16 px rule, not the (tiny) area
    assert len(said) == 1 and str(path) in said[0] and "min_building_m2" in said[0]


def test_real_masks_are_written_squared_in_the_mask_crs(tmp_path):
    """The Xiamen reference mask (EPSG:3857): most outlines squared, none tangled."""
    gpkg = tmp_path / "xiamen.gpkg"
    count = polygonize_mask(str(XIAMEN_GT), str(gpkg), regularize=True)
    with fiona.open(gpkg) as layer, rasterio.open(XIAMEN_GT) as src:
        assert CRS.from_wkt(layer.crs_wkt) == src.crs
        features = list(layer)
    flags = [f.properties["regularized"] for f in features]
    assert len(features) == count > 0 and set(flags) <= {0, 1} and sum(flags) > count / 2
    for f in features:
        assert not rings_cross([np.asarray(r) for r in f.geometry["coordinates"]])


def _whole_mask_regions(path: Path) -> list:
    """Every region's rings as GDAL traces them over the whole mask at once (the reference)."""
    from rasterio.features import shapes

    with rasterio.open(path) as src:
        data = src.read(1)
    return [[np.asarray(r) for r in geom["coordinates"]]
            for geom, _ in shapes(data, mask=data != 0, connectivity=4)]


def _canonical(regions) -> list:
    """Regions as comparable values: each ring's vertex set, rings sorted."""
    return sorted(tuple(sorted(tuple(sorted(map(tuple, np.round(r, 6).tolist()))) for r in rings))
                  for rings in regions)


def _drawn_strip_traps() -> np.ndarray:
    """Shapes that cross strip edges in every way: a U open upwards (its arms meet below a cut),
    an arch (its legs part below a cut), a bar taller than several strips, a spiral, a building
    on one row just below a cut, rings with holes, and diagonal neighbours (not 4-connected)."""
    m = np.zeros((60, 40), bool)
    m[2:14, 2:4] = m[2:14, 8:10] = m[12:14, 2:10] = True  # U: arms rows 2-13, joined at 12-13
    m[16:18, 12:20] = m[16:30, 12:14] = m[16:30, 18:20] = True  # arch: top joined, legs go down
    m[1:58, 24:26] = True  # a bar through every strip
    m[20:40, 30:38] = True
    m[25:35, 32:36] = False  # a square ring with a hole across cuts
    m[8, 12:20] = True  # one row, right below a cut at 8
    m[36, 2] = m[37, 3] = m[38, 4] = True  # diagonal specks: three regions
    spiral = np.zeros((16, 16), bool)
    spiral[0, :] = spiral[:, 15] = spiral[15, :] = spiral[2:, 0] = True
    spiral[2, 0:13] = spiral[2:13, 12] = spiral[12, 3:13] = spiral[5:13, 3] = True
    spiral[5, 3:10] = spiral[5:10, 9] = True
    m[42:58, 4:20] |= spiral
    return m


@pytest.mark.parametrize("strip_rows", [1, 2, 3, 4, 8, 64])
def test_tracing_strip_by_strip_finds_every_region_once_and_whole(tmp_path, strip_rows):
    """The regions traced strip by strip equal those GDAL traces over the whole mask at once,
    vertex for vertex, however the strips cut them."""
    from rs_cluster.polygons import _regions

    path = write_mask(tmp_path / "traps.tif", _drawn_strip_traps())
    with rasterio.open(path) as src:
        found = list(_regions(src, strip_rows))
    reference = _whole_mask_regions(path)
    assert len(found) == len(reference) == 9
    assert _canonical(found) == _canonical(reference)


def test_a_real_mask_gives_the_same_polygons_in_strips_as_whole(tmp_path):
    """The Austin sample's reference mask (1000 x 1000 px, 0.3 m, UTM): the polygons written strip
    by strip (64 rows, so many buildings are cut) equal those of one strip over the whole mask,
    after simplification and squaring too."""
    for kw in ({"simplify_px": 0.0, "min_area_px": 0}, {"regularize": True}):
        cut = outlines(AUSTIN_GT, strip_rows=64, **kw)
        whole = outlines(AUSTIN_GT, strip_rows=1000, **kw)
        assert len(cut) == len(whole) > 100
        assert sorted(round(a, 6) for _, a, _ in cut) == sorted(round(a, 6) for _, a, _ in whole)
        assert _canonical(r for r, _, _ in cut) == _canonical(r for r, _, _ in whole)
        assert sum(s for *_, s in cut) == sum(s for *_, s in whole)
