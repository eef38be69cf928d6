"""The tile dataset that prepare writes and train reads: a Petastorm Unischema over Parquet.

A prepared dataset is a folder (or URL) holding ``dataset.json`` and one Petastorm dataset per
split (``train/``, ``val/``, ``test/``). Every row is one tile and keeps where it came from: the
source raster id, the window offsets, the source CRS (WKT, empty when the source had none) and the
window's affine transform, so a tile can be put back on the map.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from rs_cluster import storage
from rs_cluster.errors import InputError

DATASET_FORMAT = "rs-cluster-tiles"
DATASET_FORMAT_VERSION = 1
SPLITS = ("train", "val", "test")
DATASET_JSON = "dataset.json"

# Reader settings training uses; the read-back test uses the very same ones.
TRAIN_READER_SETTINGS: dict[str, Any] = {
    "reader_pool_type": "thread",
    "workers_count": 2,
    "shuffle_row_groups": True,
}


def tile_schema(tile_size: int):
    """The Unischema of a tile row for ``tile_size`` x ``tile_size`` tiles."""
    from petastorm.codecs import NdarrayCodec, ScalarCodec
    from petastorm.unischema import Unischema, UnischemaField
    from pyspark.sql.types import IntegerType, StringType

    return Unischema(f"Tiles{tile_size}", [
        UnischemaField("tile_id", np.str_, (), ScalarCodec(StringType()), False),
        UnischemaField("raster_id", np.str_, (), ScalarCodec(StringType()), False),
        UnischemaField("row_off", np.int32, (), ScalarCodec(IntegerType()), False),
        UnischemaField("col_off", np.int32, (), ScalarCodec(IntegerType()), False),
        UnischemaField("image", np.uint8, (tile_size, tile_size, 3), NdarrayCodec(), False),
        # 1 where a building is, 0 elsewhere.
        UnischemaField("mask", np.uint8, (tile_size, tile_size, 1), NdarrayCodec(), False),
        UnischemaField("crs", np.str_, (), ScalarCodec(StringType()), False),
        UnischemaField("transform", np.float64, (6,), NdarrayCodec(), False),
    ])


@dataclass(frozen=True)
class DatasetInfo:
    """``dataset.json`` of a prepared dataset, with the location it was read from."""

    url: str
    meta: dict[str, Any]

    @property
    def tile_size(self) -> int:
        return int(self.meta["tile_size"])

    def split_url(self, split: str) -> str:
        if split not in self.meta["splits"]:
            raise InputError(f"{self.url}: has no '{split}' split")
        return storage.join(self.url, self.meta["splits"][split]["path"])

    def split_tiles(self, split: str) -> int:
        return int(self.meta["splits"].get(split, {}).get("tiles", 0))


def load_dataset(location: str) -> DatasetInfo:
    """Reads ``dataset.json``; a folder without one is not a prepare output and is refused."""
    url = storage.to_url(location)
    meta_url = storage.join(url, DATASET_JSON)
    if not storage.exists(meta_url):
        raise InputError(f"{location}: not a prepared dataset (no {DATASET_JSON}; "
                         "make one with `rs-cluster prepare`)")
    meta = storage.read_json(meta_url)
    if meta.get("format") != DATASET_FORMAT:
        raise InputError(f"{location}: {DATASET_JSON} is not an rs-cluster tile dataset")
    if int(meta.get("format_version", 0)) > DATASET_FORMAT_VERSION:
        raise InputError(f"{location}: dataset format v{meta['format_version']} is newer than this "
                         f"rs-cluster reads (v{DATASET_FORMAT_VERSION}); upgrade rs-cluster")
    return DatasetInfo(url=url, meta=meta)


def make_tile_reader(url: str, *, num_epochs: int | None = 1, cur_shard: int | None = None,
                     shard_count: int | None = None, seed: int | None = None,
                     fields: list[str] | None = None, **overrides: Any):
    """A Petastorm reader over one split, with the settings training uses unless overridden."""
    from petastorm import make_reader

    from rs_cluster.spark import quiet_library_warnings

    quiet_library_warnings()
    settings = {**TRAIN_READER_SETTINGS, **overrides}
    # s3:// goes through fsspec's s3fs, configured from this host's AWS settings, hdfs:// through
    # hdfs-native and this host's Hadoop configuration (storage.py).
    return make_reader(storage.petastorm_url(url), num_epochs=num_epochs, cur_shard=cur_shard,
                       shard_count=shard_count, shard_seed=seed, seed=seed, schema_fields=fields,
                       storage_options=storage.fsspec_options(url),
                       filesystem=storage.petastorm_filesystem(url), **settings)


def read_schema(url: str):
    """The Unischema stored in one split's Petastorm metadata."""
    from petastorm.etl.dataset_metadata import get_schema_from_dataset_url

    return get_schema_from_dataset_url(storage.petastorm_url(url),
                                       storage_options=storage.fsspec_options(url),
                                       filesystem=storage.petastorm_filesystem(url))
