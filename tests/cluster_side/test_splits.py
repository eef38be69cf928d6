"""Split by whole raster: deterministic for a seed, proportional, no split left empty."""

from __future__ import annotations

from collections import Counter

from rs_cluster.prepare import assign_splits


def test_same_seed_same_split_regardless_of_input_order():
    ids = [f"r{i}.tif" for i in range(50)]
    assert assign_splits(ids, (0.6, 0.2, 0.2), 7) == assign_splits(list(reversed(ids)), (0.6, 0.2, 0.2), 7)


def test_other_seed_other_split():
    ids = [f"r{i}.tif" for i in range(50)]
    assert assign_splits(ids, (0.6, 0.2, 0.2), 1) != assign_splits(ids, (0.6, 0.2, 0.2), 2)


def test_counts_follow_fractions():
    counts = Counter(assign_splits([f"r{i}" for i in range(100)], (0.7, 0.2, 0.1), 0).values())
    assert counts == {"train": 70, "val": 20, "test": 10}


def test_every_nonzero_split_gets_a_raster_when_possible():
    counts = Counter(assign_splits(["a", "b", "c"], (0.8, 0.1, 0.1), 0).values())
    assert counts == {"train": 1, "val": 1, "test": 1}
    counts = Counter(assign_splits(["a", "b", "c", "d"], (1.0, 0.0, 0.0), 0).values())
    assert counts == {"train": 4}


def test_chosen_validation_rasters_are_the_validation_split():
    """The analyst's "use these layers for validation": exactly those, the rest train/test in
    the ratio of their fractions."""
    ids = [f"r{i}.tif" for i in range(14)]
    split = assign_splits(ids, (0.6, 0.2, 0.2), 0, validation=["r3.tif", "r7.tif"])
    assert sorted(r for r, s in split.items() if s == "val") == ["r3.tif", "r7.tif"]
    assert Counter(split.values()) == {"train": 9, "val": 2, "test": 3}
