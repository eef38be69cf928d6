"""Sliding-window arithmetic shared by prepare and predict.

Windows step by ``stride``; a window that would cross the right or bottom edge is shifted back
inside the raster (as the original 2019 pipeline did), so every pixel is covered, no window is
padded, and the last windows may overlap their neighbours more than the stride says.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import numpy as np


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


# -- blending overlapping windows ------------------------------------------------------------------

WEIGHT_FLOOR = 0.01  # blend weight at a window's very edge: >0 so raster edges still count


def blend_weights(size: int, floor: float = WEIGHT_FLOOR) -> np.ndarray:
    """1-D window weight: a Hann bump from ``floor`` at the edges to 1 at the centre."""
    i = np.arange(size, dtype=np.float64)
    return (floor + (1.0 - floor) * np.sin(np.pi * (i + 0.5) / size) ** 2).astype(np.float32)


def inverse_coverage(length: int, starts: list[int], weight: np.ndarray) -> np.ndarray:
    """1 / (sum of the weights of every window over each pixel) along one axis.

    The 2-D weight is the outer product of 1-D weights and the windows form a full grid, so the sum
    of 2-D weights over a pixel is the product of these two 1-D sums: no weight raster is needed.
    """
    total = np.zeros(length, dtype=np.float64)
    for s in starts:
        total[s:s + len(weight)] += weight
    return (1.0 / total).astype(np.float32)


def band_strips(row_starts: list[int], tile: int, top: int, bottom: int) -> range:
    """The indexes of the window strips (rows of windows starting at ``row_starts``) that reach
    rows [top, bottom): every window over those rows, so the blend there is complete."""
    first = next(k for k, s in enumerate(row_starts) if s + tile > top)
    last = max(k for k, s in enumerate(row_starts) if s < bottom)
    return range(first, last + 1)
