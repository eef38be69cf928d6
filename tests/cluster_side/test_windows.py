"""Window arithmetic: full coverage, edge windows shifted inside, counts, overlap."""

from __future__ import annotations

import numpy as np
import pytest

from rs_cluster.windows import count_windows, tile_windows, window_rows, window_starts


@pytest.mark.parametrize("height,width,size,stride", [
    (256, 256, 128, 128), (509, 544, 128, 128), (1000, 1000, 128, 96), (128, 300, 128, 64),
    (2149, 1480, 128, 128), (130, 129, 128, 1),
])
def test_windows_cover_every_pixel_without_padding(height, width, size, stride):
    covered = np.zeros((height, width), dtype=np.int32)
    windows = tile_windows(height, width, size, stride)
    for w in windows:
        assert 0 <= w.row_off and w.row_stop <= height and 0 <= w.col_off and w.col_stop <= width
        assert (w.height, w.width) == (size, size)
        covered[w.slices()] += 1
    assert covered.min() >= 1
    assert len(windows) == count_windows(height, width, size, stride) == len(set(windows))


def test_edge_window_is_shifted_back_inside():
    assert window_starts(300, 128, 128) == [0, 128, 172]
    assert window_starts(256, 128, 128) == [0, 128]
    assert window_starts(128, 128, 128) == [0]


def test_smaller_stride_overlaps():
    assert window_starts(256, 128, 64) == [0, 64, 128]
    assert count_windows(256, 256, 128, 64) == 9
    assert count_windows(256, 256, 128) == 4


def test_raster_smaller_than_tile_is_refused():
    with pytest.raises(ValueError, match="smaller than the 128 px tile"):
        window_starts(100, 128, 128)


def test_bad_sizes_are_refused():
    with pytest.raises(ValueError):
        window_starts(300, 0, 128)
    with pytest.raises(ValueError):
        window_starts(300, 128, 0)


def test_window_rows_groups_strips_in_order():
    windows = tile_windows(300, 300, 128, 128)
    strips = list(window_rows(windows))
    assert [s[0].row_off for s in strips] == [0, 128, 172]
    assert all(len(s) == 3 and len({w.row_off for w in s}) == 1 for s in strips)
    assert [w for s in strips for w in s] == windows
