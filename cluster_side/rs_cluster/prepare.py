"""The prepare stage: image/mask rasters -> Petastorm tile datasets, one per split, with Spark.

The driver only pairs file names, plans windows and assigns splits; opening, checking and reading
rasters happen on the executors, one task per group of raster strips. The dataset is built in a
hidden staging folder beside the output and renamed into place when complete.
"""

from __future__ import annotations

import os
import pickle
import random
import re
import time
from dataclasses import asdict, dataclass, field, fields
from datetime import datetime, timezone
from typing import Any, Iterable

from pyspark.accumulators import AccumulatorParam

from rs_cluster import __version__, storage
from rs_cluster.dataset import (DATASET_FORMAT, DATASET_FORMAT_VERSION, DATASET_JSON, SPLITS,
                                tile_schema)
from rs_cluster.errors import ConfigError, InputError, OutputExistsError, RsClusterError
from rs_cluster.progress import Reporter
from rs_cluster.rasters import PairInfo, RasterPair, inspect_pair, pair_rasters, read_tiles, window_transform
from rs_cluster.spark import Poller, resolve_master, spark_session
from rs_cluster.windows import Window, tile_windows, window_rows

# Executor errors come back to the driver buried in a Java stack trace; these marks let the driver
# find the message meant for the user.
_MARK = "<<RS-CLUSTER-ERROR>>"
_SEP = "<<IN>>"
MAX_TILES_PER_TASK = 64


@dataclass(frozen=True)
class PrepareConfig:
    images: str
    masks: str
    output: str
    tile_size: int = 128
    stride: int | None = None
    split: tuple[float, float, float] = (0.6, 0.2, 0.2)
    seed: int = 0
    master: str | None = None
    overwrite: bool = False
    skip_bad: bool = False
    rowgroup_size_mb: int = 8

    def __post_init__(self) -> None:
        if self.tile_size < 8:
            raise ConfigError(f"tile size must be at least 8 px (got {self.tile_size})")
        if self.stride is not None and not 0 < self.stride <= self.tile_size:
            raise ConfigError(f"stride must be between 1 and the tile size {self.tile_size} "
                              f"(got {self.stride}); a larger stride would leave gaps")
        if len(self.split) != 3 or any(f < 0 for f in self.split) or abs(sum(self.split) - 1) > 1e-6:
            raise ConfigError(f"split must be three non-negative fractions for train,val,test "
                              f"adding up to 1 (got {','.join(map(str, self.split))})")
        if self.split[0] <= 0:
            raise ConfigError("split: the train fraction must be above 0")

    @property
    def effective_stride(self) -> int:
        return self.stride or self.tile_size

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "PrepareConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"prepare: unknown setting(s) {', '.join(unknown)}; "
                              f"known: {', '.join(sorted(known))}")
        data = dict(data)
        if "split" in data:
            data["split"] = tuple(float(x) for x in data["split"])
        return cls(**data)


@dataclass(frozen=True)
class PrepareResult:
    output: str
    tiles: dict[str, int]
    rasters: dict[str, int]
    building_fraction: dict[str, float]
    skipped: list[dict[str, str]] = field(default_factory=list)
    seconds: float = 0.0


@dataclass(frozen=True)
class _Task:
    """One unit of executor work: some consecutive strips of windows of one raster."""

    info: PairInfo
    windows: tuple[Window, ...]


class _TaskSums(AccumulatorParam):
    """Adds {raster_id: (tiles, building pixels)} dicts from the tasks."""

    def zero(self, value: dict) -> dict:
        return {}

    def addInPlace(self, a: dict, b: dict) -> dict:
        for key, (n, px) in b.items():
            n0, px0 = a.get(key, (0, 0))
            a[key] = (n0 + n, px0 + px)
        return a


def assign_splits(raster_ids: Iterable[str], fractions: tuple[float, float, float],
                  seed: int) -> dict[str, str]:
    """Deterministic split by whole raster: the same ids, fractions and seed give the same split.

    Counts are rounded by largest remainder; a split with a non-zero fraction gets at least one
    raster whenever there are enough rasters to go round.
    """
    ids = sorted(set(raster_ids))
    random.Random(seed).shuffle(ids)
    n = len(ids)
    exact = [f * n for f in fractions]
    counts = [int(x) for x in exact]
    for i in sorted(range(3), key=lambda i: exact[i] - counts[i], reverse=True)[: n - sum(counts)]:
        counts[i] += 1
    wanted = [i for i in range(3) if fractions[i] > 0]
    if n >= len(wanted):
        for i in wanted:
            if counts[i] == 0:
                donor = max(range(3), key=lambda j: counts[j])
                counts[donor] -= 1
                counts[i] += 1
    out: dict[str, str] = {}
    start = 0
    for split, count in zip(SPLITS, counts):
        for rid in ids[start:start + count]:
            out[rid] = split
        start += count
    return out


def _inspect(pair: RasterPair, tile_size: int) -> tuple[PairInfo | None, str | None]:
    """Executor side: check one pair; returns (info, None) or (None, the user-facing error)."""
    try:
        info = inspect_pair(pair)
        if min(info.width, info.height) < tile_size:
            raise InputError(f"{pair.image}: is {info.width}x{info.height} px, smaller than the "
                             f"{tile_size} px tile")
        return info, None
    except RsClusterError as e:
        return None, str(e)
    except Exception as e:  # an unexpected library error is still reported against its file
        return None, f"{pair.image}: cannot be read ({type(e).__name__}: {e})"


def _plan_tasks(info: PairInfo, tile_size: int, stride: int) -> list[_Task]:
    tasks, current = [], []
    for strip in window_rows(tile_windows(info.height, info.width, tile_size, stride)):
        if current and len(current) + len(strip) > MAX_TILES_PER_TASK:
            tasks.append(_Task(info, tuple(current)))
            current = []
        current.extend(strip)
    if current:
        tasks.append(_Task(info, tuple(current)))
    return tasks


def _arrow_schema(schema: Any):
    """The Arrow schema of the encoded rows, matching ``schema.as_spark_schema()``."""
    import pyarrow as pa
    from pyspark.sql.types import BinaryType, IntegerType, StringType

    types = {StringType: pa.string(), IntegerType: pa.int32(), BinaryType: pa.binary()}
    return pa.schema([(f.name, types[type(f.dataType)]) for f in schema.as_spark_schema().fields])


def _encode_tasks(batches: Iterable[Any], schema: Any, accumulator: Any) -> Iterable[Any]:
    """Executor side (``mapInArrow``): read each task's windows, yield encoded Arrow batches.

    Rows go to the JVM as Arrow columns rather than pickled Row objects: the same bytes Petastorm's
    codecs produce, at a fraction of the serialisation cost.
    """
    import pyarrow as pa

    arrow_schema = _arrow_schema(schema)
    fields_ = schema.fields
    for batch in batches:
        for blob in batch.column(0).to_pylist():
            task: _Task = pickle.loads(blob)
            info = task.info
            columns: dict[str, list] = {name: [] for name in arrow_schema.names}
            building = 0
            try:
                for w, image, mask in read_tiles(info, task.windows):
                    building += int(mask.sum())
                    row = {
                        "tile_id": f"{info.pair.raster_id}:{w.row_off}:{w.col_off}",
                        "raster_id": info.pair.raster_id,
                        "row_off": w.row_off,
                        "col_off": w.col_off,
                        "image": image,
                        "mask": mask,
                        "crs": info.crs_wkt,
                        "transform": _as_float_array(window_transform(info, w)),
                    }
                    for name, value in row.items():
                        field_ = fields_[name]
                        columns[name].append(field_.codec.encode(field_, value))
            except RsClusterError as e:
                raise RuntimeError(f"{_MARK}{info.pair.raster_id}{_SEP}{e}{_MARK}") from None
            columns["image"] = [bytes(v) for v in columns["image"]]
            columns["mask"] = [bytes(v) for v in columns["mask"]]
            columns["transform"] = [bytes(v) for v in columns["transform"]]
            accumulator.add({info.pair.raster_id: (len(columns["tile_id"]), building)})
            yield pa.RecordBatch.from_pydict(columns, schema=arrow_schema)


def _as_float_array(values: Iterable[float]):
    import numpy as np

    return np.asarray(list(values), dtype=np.float64)


def _user_error(exc: BaseException) -> tuple[str, str] | None:
    """(raster id, message) if an executor failed on one of our errors."""
    m = re.search(re.escape(_MARK) + r"(.*?)" + re.escape(_SEP) + r"(.*?)" + re.escape(_MARK),
                  str(exc), re.S)
    return (m.group(1), m.group(2)) if m else None


def _staging_url(output_url: str) -> str:
    parent, name = output_url.rsplit("/", 1)
    return f"{parent}/.{name}.partial-{os.getpid()}-{int(time.time())}"


def run_prepare(cfg: PrepareConfig, *, reporter: Reporter | None = None, spark: Any = None) -> PrepareResult:
    """Tiles every image/mask pair under ``cfg.images``/``cfg.masks`` into a split tile dataset."""
    reporter = reporter or Reporter()
    started = time.monotonic()
    stride = cfg.effective_stride
    output_url = storage.to_url(cfg.output)
    if storage.is_nonempty_dir(output_url) and not cfg.overwrite:
        raise OutputExistsError(f"{cfg.output}: already exists and is not empty; "
                                "pass --overwrite to replace it")
    pairs, missing = pair_rasters(cfg.images, cfg.masks)
    bad: list[dict[str, str]] = [{"image": str(e).split(":")[0], "error": str(e)} for e in missing]
    if missing and not cfg.skip_bad:
        raise missing[0]

    reporter.start("prepare", total=len(pairs), unit="rasters",
                   message=f"checking {len(pairs)} image/mask pairs on Spark ({resolve_master(cfg.master)})")
    with spark_session(cfg.master, "rs-cluster prepare", spark=spark) as session:
        sc = session.sparkContext
        checked = sc.parallelize(pairs, max(1, min(len(pairs), sc.defaultParallelism * 4))) \
            .map(lambda p, t=cfg.tile_size: _inspect(p, t)).collect()
        infos = [info for info, _ in checked if info is not None]
        errors = [err for _, err in checked if err is not None]
        if errors and not cfg.skip_bad:
            more = f" (and {len(errors) - 1} more bad pair(s); --skip-bad skips them)" if len(errors) > 1 else ""
            raise InputError(errors[0] + more)
        for err in errors:
            bad.append({"image": err.split(":")[0], "error": err})
            reporter.warning(f"skipped: {err}")
        if not infos:
            raise InputError(f"{cfg.images}: no usable image/mask pair")

        split_of = assign_splits([i.pair.raster_id for i in infos], cfg.split, cfg.seed)
        schema = tile_schema(cfg.tile_size)
        staging = _staging_url(output_url)
        try:
            stats, skipped = _write_splits(session, schema, infos, split_of, cfg, stride, staging,
                                           reporter, bad)
            infos = [i for i in infos if i.pair.raster_id not in skipped]
            meta = _dataset_meta(cfg, stride, infos, split_of, stats, bad)
            storage.write_json(storage.join(staging, DATASET_JSON), meta)
            if storage.exists(output_url):
                storage.delete_dir(output_url)  # only reached with --overwrite (checked above)
            storage.move(staging, output_url)
        except BaseException:
            storage.delete_dir(staging)
            raise
    result = PrepareResult(
        output=cfg.output,
        tiles={s: meta["splits"][s]["tiles"] for s in meta["splits"]},
        rasters={s: meta["splits"][s]["rasters"] for s in meta["splits"]},
        building_fraction={s: meta["splits"][s]["building_fraction"] for s in meta["splits"]},
        skipped=bad,
        seconds=time.monotonic() - started,
    )
    reporter.finish(f"{sum(result.tiles.values())} tiles "
                    f"({', '.join(f'{s} {n}' for s, n in result.tiles.items())}) written to {cfg.output} "
                    f"in {result.seconds:.1f} s", tiles=result.tiles, output=cfg.output)
    return result


def _write_splits(session: Any, schema: Any, infos: list[PairInfo], split_of: dict[str, str],
                  cfg: PrepareConfig, stride: int, staging: str, reporter: Reporter,
                  bad: list[dict[str, str]]) -> tuple[dict[str, tuple[int, int]], set[str]]:
    """Writes every split; returns {raster_id: (tiles, building pixels)} and the skipped ids.

    The splits are written by concurrent Spark jobs (one driver thread each), so the cores stay
    busy through each job's tail and Petastorm's metadata pass. With ``skip_bad`` a raster that
    fails while being read is dropped and its split written again.
    """
    from concurrent.futures import ThreadPoolExecutor

    sc = session.sparkContext
    expected = {i.pair.raster_id: len(tile_windows(i.height, i.width, cfg.tile_size, stride)) for i in infos}
    total_tiles = sum(expected.values())
    reporter.start("prepare", total=total_tiles, unit="tiles",
                   message=f"tiling {len(infos)} rasters into {total_tiles} tiles")
    # Set once for all jobs: materialize_dataset sets and restores it around each write, and the
    # concurrent writes must not restore each other's value.
    hadoop = sc._jsc.hadoopConfiguration()
    hadoop.setInt("parquet.block.size", cfg.rowgroup_size_mb * 1024 * 1024)
    accumulators: dict[str, Any] = {}

    def report() -> None:
        merged: dict[str, tuple[int, int]] = {}
        for acc in list(accumulators.values()):
            merged.update(acc.value)
        tiles = sum(n for n, _ in merged.values())
        rasters = sum(1 for rid, (n, _) in merged.items() if n >= expected[rid])
        reporter.progress(tiles, total_tiles, f"{rasters}/{len(infos)} rasters",
                          rasters_done=rasters, rasters_total=len(infos))

    def write(split: str) -> tuple[dict[str, tuple[int, int]], set[str], list[dict[str, str]]]:
        skipped: set[str] = set()
        skipped_info: list[dict[str, str]] = []
        while True:
            members = [i for i in infos if split_of[i.pair.raster_id] == split
                       and i.pair.raster_id not in skipped]
            tasks = [t for i in members for t in _plan_tasks(i, cfg.tile_size, stride)]
            if not tasks:
                return {}, skipped, skipped_info
            acc = accumulators[split] = sc.accumulator({}, _TaskSums())
            url = storage.join(staging, split)
            try:
                _write_split(session, schema, tasks, url, acc, cfg.rowgroup_size_mb)
            except Exception as e:
                found = _user_error(e)
                if found is None:
                    raise
                raster_id, message = found
                if not cfg.skip_bad:
                    raise InputError(message) from None
                skipped.add(raster_id)
                skipped_info.append({"image": raster_id, "error": message})
                reporter.warning(f"skipped: {message}")
                storage.delete_dir(url)
                continue
            sums = dict(acc.value)
            if session.read.parquet(url).count() != sum(n for n, _ in sums.values()):
                sums = _recount(sc, tasks)  # a retried task counted twice; count again exactly
            return sums, skipped, skipped_info

    stats: dict[str, tuple[int, int]] = {}
    skipped_all: set[str] = set()
    with Poller(report), ThreadPoolExecutor(len(SPLITS), thread_name_prefix="rs-split") as pool:
        futures = [pool.submit(write, split) for split in SPLITS]
        try:
            for future in futures:
                sums, skipped, skipped_info = future.result()
                stats.update(sums)
                skipped_all |= skipped
                bad.extend(skipped_info)
        except BaseException:
            sc.cancelAllJobs()
            raise
    return stats, skipped_all


def _write_split(session: Any, schema: Any, tasks: list[_Task], url: str, acc: Any,
                 rowgroup_size_mb: int) -> None:
    from petastorm.etl.dataset_metadata import materialize_dataset

    sc = session.sparkContext
    slices = max(1, min(len(tasks), sc.defaultParallelism * 8))
    blobs = sc.parallelize([(pickle.dumps(t),) for t in tasks], slices)
    with materialize_dataset(session, url, schema, rowgroup_size_mb):
        session.createDataFrame(blobs, "task binary") \
            .mapInArrow(lambda it, s=schema, a=acc: _encode_tasks(it, s, a), schema.as_spark_schema()) \
            .write.mode("overwrite").parquet(url)


def _recount(sc: Any, tasks: list[_Task]) -> dict[str, tuple[int, int]]:
    def count(task: _Task) -> tuple[str, tuple[int, int]]:
        n = px = 0
        for _, _, mask in read_tiles(task.info, task.windows):
            n += 1
            px += int(mask.sum())
        return task.info.pair.raster_id, (n, px)

    sums: dict[str, tuple[int, int]] = {}
    for rid, (n, px) in sc.parallelize(tasks, max(1, len(tasks))).map(count).collect():
        n0, px0 = sums.get(rid, (0, 0))
        sums[rid] = (n0 + n, px0 + px)
    return sums


def _dataset_meta(cfg: PrepareConfig, stride: int, infos: list[PairInfo], split_of: dict[str, str],
                  stats: dict[str, tuple[int, int]], bad: list[dict[str, str]]) -> dict[str, Any]:
    tile_px = cfg.tile_size * cfg.tile_size
    splits: dict[str, Any] = {}
    for split in SPLITS:
        ids = sorted(i.pair.raster_id for i in infos if split_of.get(i.pair.raster_id) == split)
        tiles = sum(stats.get(r, (0, 0))[0] for r in ids)
        building = sum(stats.get(r, (0, 0))[1] for r in ids)
        splits[split] = {
            "path": split,
            "rasters": len(ids),
            "tiles": tiles,
            "building_fraction": round(building / (tiles * tile_px), 6) if tiles else 0.0,
            "raster_ids": ids,
        }
    sources = [{
        "raster_id": i.pair.raster_id,
        "image": os.path.abspath(i.pair.image),
        "mask": os.path.abspath(i.pair.mask),
        "width": i.width,
        "height": i.height,
        "crs": i.crs_wkt,
        "transform": list(i.transform),
        "split": split_of[i.pair.raster_id],
        "tiles": stats.get(i.pair.raster_id, (0, 0))[0],
    } for i in sorted(infos, key=lambda i: i.pair.raster_id)]
    return {
        "format": DATASET_FORMAT,
        "format_version": DATASET_FORMAT_VERSION,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "rs_cluster_version": __version__,
        "tile_size": cfg.tile_size,
        "stride": stride,
        "bands": ["red", "green", "blue"],
        "image_dtype": "uint8",
        "mask_encoding": "uint8, 1 = building, 0 = background",
        "seed": cfg.seed,
        "split_fractions": dict(zip(SPLITS, cfg.split)),
        "splits": splits,
        "sources": sources,
        "skipped": bad,
        "config": {k: v for k, v in asdict(cfg).items() if k not in ("overwrite",)},
    }
