"""Sliding-window arithmetic shared by prepare and predict.

Windows step by ``stride``; a window that would cross the right or bottom edge is shifted back
inside the raster (as the original 2019 pipeline did), so every pixel is covered, no window is
padded, and the last windows may overlap their neighbours more than the stride says.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator


@dataclass(frozen=True, order=True)
class Window:
    """A pixel window: offsets of its top-left corner and its size."""

    row_off: int
    col_off: int
    height: int
    width: int

    @property
    def row_stop(self) -> int:
        return self.row_off + self.height

    @property
    def col_stop(self) -> int:
        return self.col_off + self.width

    def slices(self) -> tuple[slice, slice]:
        return slice(self.row_off, self.row_stop), slice(self.col_off, self.col_stop)


def window_starts(length: int, size: int, stride: int) -> list[int]:
    """Start offsets along one axis: 0, stride, 2*stride, ... and a last one flush with the edge."""
    if size <= 0 or stride <= 0:
        raise ValueError(f"tile size and stride must be positive (got {size} and {stride})")
    if length < size:
        raise ValueError(f"{length} px is smaller than the {size} px tile")
    starts = list(range(0, length - size + 1, stride))
    if starts[-1] + size < length:
        starts.append(length - size)
    return starts


def tile_windows(height: int, width: int, size: int, stride: int | None = None) -> list[Window]:
    """Every window of ``size`` x ``size`` over a raster, row by row."""
    stride = stride or size
    rows = window_starts(height, size, stride)
    cols = window_starts(width, size, stride)
    return [Window(r, c, size, size) for r in rows for c in cols]


def count_windows(height: int, width: int, size: int, stride: int | None = None) -> int:
    stride = stride or size
    return len(window_starts(height, size, stride)) * len(window_starts(width, size, stride))


def window_rows(windows: list[Window]) -> Iterator[list[Window]]:
    """Groups windows that share a row offset (one strip of the raster), in order."""
    strip: list[Window] = []
    for w in windows:
        if strip and w.row_off != strip[0].row_off:
            yield strip
            strip = []
        strip.append(w)
    if strip:
        yield strip
