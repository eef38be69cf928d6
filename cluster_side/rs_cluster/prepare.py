"""The prepare stage: image/mask rasters -> Petastorm tile datasets, one per split, with Spark.

The driver only pairs file names, plans windows and assigns splits; opening, checking and reading
rasters happen on the executors, one task per group of raster strips. The dataset is built in a
hidden staging folder beside the output and renamed into place when complete. With ``gsd``,
each georeferenced pair is tiled from a grid at that many ground metres per pixel (its files are
resampled as they are read: bilinear for the imagery, nearest for the mask); dataset.json says
which were resampled and from what GSD.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import random
import re
import time
import uuid
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from typing import Any, Iterable, Iterator

from pyspark.accumulators import AccumulatorParam

from rs_cluster import __version__, storage
from rs_cluster.dataset import (DATASET_FORMAT, DATASET_FORMAT_VERSION, DATASET_JSON, SPLITS,
                                tile_schema)
from rs_cluster.config import check_keys
from rs_cluster.errors import ConfigError, InputError, OutputExistsError, RsClusterError
from rs_cluster.progress import Reporter
from rs_cluster.rasters import (PairInfo, RasterPair, at_gsd, inspect_pair, pair_rasters, read_tiles,
                                window_transform)
from rs_cluster.settings import SparkResources
from rs_cluster.spark import Poller, resolve_master, spark_session
from rs_cluster.windows import Window, tile_windows, window_rows

# Executor errors come back to the driver buried in a Java stack trace; these marks let the driver
# find the message meant for the user.
_MARK = "<<RS-CLUSTER-ERROR>>"
_SEP = "<<IN>>"
MAX_TILES_PER_TASK = 256
# Formats GDAL decodes from the top for any window: a task low in such a raster costs its rows above.
_SEQUENTIAL_FORMATS = (".png", ".jpg", ".jpeg")


@dataclass(frozen=True)
class PrepareConfig:
    images: str
    masks: str
    output: str
    tile_size: int = 128
    stride: int | None = None
    split: tuple[float, float, float] = (0.6, 0.2, 0.2)
    seed: int = 0
    # Raster ids (image file names) chosen as the validation split; the others are then split
    # train/test by the train and test fractions.
    val_rasters: tuple[str, ...] = ()
    master: str | None = None
    overwrite: bool = False
    skip_bad: bool = False
    resources: SparkResources | None = None  # overrides of the cluster settings file
    rowgroup_size_mb: int = 8
    # Ground metres per pixel to resample georeferenced rasters to before tiling; None: as they are.
    gsd: float | None = None

    def __post_init__(self) -> None:
        if self.gsd is not None and not (isinstance(self.gsd, (int, float)) and self.gsd > 0):
            raise ConfigError(f"gsd must be a positive number of metres per pixel (got {self.gsd})")
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
        data = check_keys(cls, data, "prepare")
        if "split" in data:
            data["split"] = tuple(float(x) for x in data["split"])
        if isinstance(data.get("val_rasters"), str):
            data["val_rasters"] = tuple(v for v in data["val_rasters"].split(",") if v)
        elif "val_rasters" in data:
            data["val_rasters"] = tuple(data["val_rasters"])
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
    """Adds {raster_id: (tiles, building pixels)} dicts: live progress while the job runs.

    The exact counts come back with the tasks' results; a retried task may add here twice.
    """

    def zero(self, value: dict) -> dict:
        return {}

    def addInPlace(self, a: dict, b: dict) -> dict:
        for key, (n, px) in b.items():
            n0, px0 = a.get(key, (0, 0))
            a[key] = (n0 + n, px0 + px)
        return a


def assign_splits(raster_ids: Iterable[str], fractions: tuple[float, float, float],
                  seed: int, *, validation: Iterable[str] = ()) -> dict[str, str]:
    """Deterministic split by whole raster: the same ids, fractions and seed give the same split.

    Counts are rounded by largest remainder; a split with a non-zero fraction gets at least one
    raster whenever there are enough rasters to go round. The ``validation`` ids (the analyst's
    choice) are the validation split; the rest go to train and test in their fractions' ratio.
    """
    chosen = set(validation)
    if chosen:
        train, _, test = fractions
        rest = assign_splits([r for r in raster_ids if r not in chosen],
                             (train / (train + test), 0.0, test / (train + test)), seed)
        return {**rest, **{r: "val" for r in chosen}}
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


@contextlib.contextmanager
def _local_pair(pair: RasterPair, folder: str | None = None) -> Iterator[tuple[RasterPair, Any]]:
    """Executor side: ``pair`` with local paths GDAL opens (remote rasters are copied into this
    host's $TMPDIR, into ``folder`` when given, with their sidecars), and a function that puts
    the URLs back into a message that names the local copies."""
    if storage.is_local(pair.image) and storage.is_local(pair.mask):
        yield pair, (lambda text: text)
        return
    with contextlib.ExitStack() as stack:
        if folder is None:
            folder = stack.enter_context(_temp_folder())
        paths = {}
        for kind, url in (("image", pair.image), ("mask", pair.mask)):
            sub = os.path.join(folder, kind, uuid.uuid5(uuid.NAMESPACE_URL, url).hex)
            os.makedirs(sub, exist_ok=True)
            local = os.path.join(sub, storage.basename(url))
            if not os.path.exists(local):
                local = storage.download(url, sub, sidecars=True)
            paths[kind] = local

        def named(text: str) -> str:
            for kind, url in (("image", pair.image), ("mask", pair.mask)):
                text = text.replace(paths[kind], url)
            return text

        yield RasterPair(pair.raster_id, paths["image"], paths["mask"]), named


@contextlib.contextmanager
def _temp_folder() -> Iterator[str]:
    import shutil

    folder = storage.temp_dir()
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _inspect(pair: RasterPair, tile_size: int,
             gsd: float | None = None) -> tuple[PairInfo | None, str | None]:
    """Executor side: check one pair, and plan its grid at ``gsd`` m/px when given; returns
    (info, None) or (None, the user-facing error)."""
    try:
        with _local_pair(pair) as (local, named):
            try:
                info = replace(inspect_pair(local), pair=pair)
            except RsClusterError as e:
                raise type(e)(named(str(e))) from None
        if gsd is not None:
            info = at_gsd(info, gsd)
        if min(info.width, info.height) < tile_size:
            at = (f" once resampled from {info.source_gsd_m:.3g} to {gsd:g} m/px"
                  if info.resampled and info.source_gsd_m else "")
            raise InputError(f"{pair.image}: is {info.width}x{info.height} px{at}, smaller than the "
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


def _task_cost(task: _Task) -> int:
    """Pixels a task decodes: its rows, or every row down to its last for sequential formats."""
    top = 0 if task.info.pair.image.lower().endswith(_SEQUENTIAL_FORMATS) else task.windows[0].row_off
    return task.info.width * (max(w.row_stop for w in task.windows) - top)


def _balance(tasks: list[tuple[str, _Task]], buckets: int) -> list[list[tuple[str, bytes]]]:
    """Longest-first greedy packing of tasks into ``buckets`` of similar cost (one per partition).

    Consecutive tasks of a list are not alike (big PNG scenes cluster together), so Spark's
    plain slicing leaves one core working long after the other has finished.
    """
    loads = [0] * buckets
    out: list[list[tuple[str, bytes]]] = [[] for _ in range(buckets)]
    for split, task in sorted(tasks, key=lambda st: (-_task_cost(st[1]), st[1].info.pair.raster_id,
                                                     st[1].windows[0].row_off)):
        i = loads.index(min(loads))
        loads[i] += _task_cost(task)
        out[i].append((split, pickle.dumps(task)))
    for bucket in out:  # each partition writes one file per split: group its tasks by split
        bucket.sort(key=lambda st: SPLITS.index(st[0]))
    return [b for b in out if b]


def _arrow_schema(schema: Any):
    """The Arrow schema of encoded rows, the types of ``schema.as_spark_schema()``."""
    import pyarrow as pa
    from pyspark.sql.types import BinaryType, IntegerType, StringType

    types = {StringType: pa.string(), IntegerType: pa.int32(), BinaryType: pa.binary()}
    return pa.schema([(f.name, types[type(f.dataType)]) for f in schema.as_spark_schema().fields])


def _encoded_rows(task: _Task, schema: Any) -> Iterator[tuple[dict[str, Any], int]]:
    """(row encoded by the Unischema's codecs, building pixels) for each window of a task."""
    info = task.info
    for w, image, mask in read_tiles(info, task.windows):
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
        encoded = {}
        for name, value in row.items():
            field_ = schema.fields[name]
            value = field_.codec.encode(field_, value)
            encoded[name] = bytes(value) if isinstance(value, (bytearray, memoryview)) else value
        yield encoded, int(mask.sum())


def _write_partition(index: int, items: Iterable[tuple[str, bytes]], staging: str, schema: Any,
                     rows_per_group: int, accumulator: Any) -> Iterator[tuple[str, str, int, int]]:
    """Executor side: tiles this partition's tasks into ``<split>/part-<index>.parquet`` files.

    The files are written with pyarrow straight from the executor (no row crosses into the JVM)
    under a temporary name and renamed when complete. Names depend only on the partition index,
    so a retried or speculative attempt replaces its own file and never adds duplicate rows.
    Yields (raster id, split, tiles, building pixels) for the driver's exact counts.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    arrow_schema = _arrow_schema(schema)
    writers: dict[str, tuple[Any, Any, str, str]] = {}  # split: (writer, filesystem, tmp, final)
    pending: dict[str, dict[str, list]] = {}
    # Remote rasters are copied once per partition into this host's $TMPDIR (several tasks of a
    # partition may read the same raster) and deleted with the partition.
    copies = contextlib.ExitStack()
    scratch = copies.enter_context(_temp_folder())

    def flush(split: str) -> None:
        batch = pending.pop(split, None)
        if batch and batch["tile_id"]:
            writers[split][0].write_table(pa.Table.from_pydict(batch, schema=arrow_schema),
                                          row_group_size=rows_per_group)

    try:
        for split, blob in items:
            task: _Task = pickle.loads(blob)
            if split not in writers:
                split_url = storage.join(staging, split)
                if storage.renames(split_url):
                    filesys, folder = storage.filesystem(split_url)
                    storage.make_dirs(split_url)
                    final = f"{folder}/part-{index:05d}.parquet"
                    tmp = f"{folder}/.part-{index:05d}.parquet.{uuid.uuid4().hex}.tmp"
                    writer = pq.ParquetWriter(tmp, arrow_schema, filesystem=filesys,
                                              compression="snappy")
                else:
                    # An object store renames by copying, and pyarrow leaves an empty "folder/"
                    # object behind when it deletes the old name: write here, upload when
                    # complete (one object that appears whole).
                    filesys, final = None, storage.join(split_url, f"part-{index:05d}.parquet")
                    tmp = os.path.join(scratch, f"{split}-part-{index:05d}.parquet")
                    writer = pq.ParquetWriter(tmp, arrow_schema, compression="snappy")
                writers[split] = (writer, filesys, tmp, final)
            batch = pending.setdefault(split, {name: [] for name in arrow_schema.names})
            tiles = building = 0
            named: Any = str
            try:
                local, named = copies.enter_context(_local_pair(task.info.pair, scratch))
                if local is not task.info.pair:
                    task = replace(task, info=replace(task.info, pair=local))
                for row, px in _encoded_rows(task, schema):
                    for name, value in row.items():
                        batch[name].append(value)
                    tiles += 1
                    building += px
                    if len(batch["tile_id"]) >= rows_per_group:
                        flush(split)
                        batch = pending.setdefault(split, {name: [] for name in arrow_schema.names})
            except RsClusterError as e:
                raise RuntimeError(f"{_MARK}{task.info.pair.raster_id}{_SEP}{named(str(e))}{_MARK}"
                                   ) from None
            accumulator.add({task.info.pair.raster_id: (tiles, building)})
            yield task.info.pair.raster_id, split, tiles, building
        for split, (writer, filesys, tmp, final) in list(writers.items()):
            flush(split)
            writer.close()
            if filesys is None:
                storage.upload(tmp, final)
                os.unlink(tmp)
            else:
                storage.replace_file(filesys, tmp, final)
            del writers[split]
    finally:
        for writer, filesys, tmp, _ in writers.values():  # only after a failure: drop partial files
            with contextlib.suppress(Exception):
                writer.close()
            with contextlib.suppress(Exception):
                if filesys is None:
                    os.unlink(tmp)
                else:
                    filesys.delete_file(tmp)
        copies.close()


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
    with spark_session(cfg.master, "rs-cluster prepare", spark=spark,
                       resources=cfg.resources) as session:
        sc = session.sparkContext
        checked = sc.parallelize(pairs, max(1, min(len(pairs), sc.defaultParallelism * 4))) \
            .map(lambda p, t=cfg.tile_size, g=cfg.gsd: _inspect(p, t, g)).collect()
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
        for info in infos:
            if not info.stretch.identity:  # the rule applied is said, and kept in dataset.json
                reporter.warning(info.stretch.describe(info.pair.image))
            if cfg.gsd is not None and info.source_gsd_m is None:
                reporter.warning(f"{info.pair.image}: has no georeferencing, so its ground sampling "
                                 f"distance is unknown; it is tiled as it is, not resampled to "
                                 f"{cfg.gsd:g} m/px")

        ids = [i.pair.raster_id for i in infos]
        unknown = sorted(set(cfg.val_rasters) - set(ids))
        if unknown:
            raise InputError(f"{cfg.images}: the validation rasters {', '.join(unknown)} are not "
                             f"among its image/mask pairs")
        if cfg.val_rasters and not set(ids) - set(cfg.val_rasters):
            raise InputError(f"{cfg.images}: every raster is chosen for validation; none is "
                             f"left to train on")
        split_of = assign_splits(ids, cfg.split, cfg.seed, validation=cfg.val_rasters)
        schema = tile_schema(cfg.tile_size)
        staging = _staging_url(output_url)
        try:
            stats, skipped = _write_splits(session, schema, infos, split_of, cfg, stride, staging,
                                           reporter, bad)
            infos = [i for i in infos if i.pair.raster_id not in skipped]
            meta = _dataset_meta(cfg, stride, infos, split_of, stats, bad)
            storage.write_json(storage.join(staging, DATASET_JSON), meta)
            # An existing dataset (only with --overwrite, checked above) goes only once the new
            # one is in place: a run killed or failing here leaves one whole dataset, never none.
            storage.replace_dir(staging, output_url, commit_file=DATASET_JSON)
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
    """Writes every split in one Spark job; returns {raster_id: (tiles, building px)} and skipped ids.

    With ``skip_bad`` a raster that fails while being read is dropped and the job run again.
    """
    from petastorm.etl.dataset_metadata import materialize_dataset

    sc = session.sparkContext
    expected = {i.pair.raster_id: len(tile_windows(i.height, i.width, cfg.tile_size, stride)) for i in infos}
    total_tiles = sum(expected.values())
    reporter.start("prepare", total=total_tiles, unit="tiles",
                   message=f"tiling {len(infos)} rasters into {total_tiles} tiles")
    row_bytes = cfg.tile_size * cfg.tile_size * 4 + 1024
    rows_per_group = max(1, cfg.rowgroup_size_mb * 1024 * 1024 // row_bytes)
    skipped: set[str] = set()
    while True:
        tasks = [(split_of[i.pair.raster_id], t) for i in infos if i.pair.raster_id not in skipped
                 for t in _plan_tasks(i, cfg.tile_size, stride)]
        acc = sc.accumulator({}, _TaskSums())

        def report(acc: Any = acc) -> None:
            done = acc.value
            tiles = sum(n for n, _ in done.values())
            rasters = sum(1 for rid, (n, _) in done.items() if n >= expected[rid])
            reporter.progress(tiles, total_tiles, f"{rasters}/{len(infos)} rasters",
                              rasters_done=rasters, rasters_total=len(infos))

        buckets = _balance(tasks, max(1, min(len(tasks), sc.defaultParallelism * 4)))
        try:
            with Poller(report):
                counts = sc.parallelize(buckets, len(buckets)).mapPartitionsWithIndex(
                    lambda i, it, a=acc: _write_partition(
                        i, (task for bucket in it for task in bucket), staging, schema, rows_per_group, a)
                ).collect()
        except Exception as e:
            found = _user_error(e)
            if found is None:
                raise
            raster_id, message = found
            if not cfg.skip_bad:
                raise InputError(message) from None
            skipped.add(raster_id)
            bad.append({"image": raster_id, "error": message})
            reporter.warning(f"skipped: {message}")
            storage.delete_dir(staging)
            continue
        break
    stats: dict[str, tuple[int, int]] = {}
    for raster_id, _split, tiles, building in counts:
        n0, px0 = stats.get(raster_id, (0, 0))
        stats[raster_id] = (n0 + tiles, px0 + building)
    for split in SPLITS:
        url = storage.join(staging, split)
        if storage.exists(url):
            # The files are in place: Petastorm adds its Unischema and row-group metadata.
            with materialize_dataset(session, storage.petastorm_url(url), schema,
                                     cfg.rowgroup_size_mb,
                                     filesystem_factory=storage.petastorm_fs_factory(url)):
                pass
    return stats, skipped


def _source(location: str) -> str:
    return os.path.abspath(location) if not storage.is_url(location) else location


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
        "image": _source(i.pair.image),
        "mask": _source(i.pair.mask),
        "width": i.width,
        "height": i.height,
        "crs": i.crs_wkt,
        "transform": list(i.transform),
        "split": split_of[i.pair.raster_id],
        "tiles": stats.get(i.pair.raster_id, (0, 0))[0],
        "input_stretch": i.stretch.to_dict(),
        **(_gsd_record(i) if cfg.gsd is not None else {}),
    } for i in sorted(infos, key=lambda i: i.pair.raster_id)]
    return {
        "format": DATASET_FORMAT,
        "format_version": DATASET_FORMAT_VERSION,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "rs_cluster_version": __version__,
        "tile_size": cfg.tile_size,
        "stride": stride,
        # Ground metres per pixel the georeferenced rasters were tiled at; None: as they came
        # (each source says whether it was resampled, and from what GSD).
        "gsd_m": cfg.gsd,
        "bands": ["red", "green", "blue"],
        "image_dtype": "uint8",
        "mask_encoding": "uint8, 1 = building, 0 = background",
        "seed": cfg.seed,
        "split_fractions": dict(zip(SPLITS, cfg.split)),
        "splits": splits,
        "sources": sources,
        "skipped": bad,
        "config": {k: v for k, v in asdict(cfg).items() if k not in ("overwrite", "resources")},
    }


def _gsd_record(info: PairInfo) -> dict[str, Any]:
    """What a source's entry in dataset.json says of its GSD when prepare was asked for one."""
    record: dict[str, Any] = {
        "source_gsd_m": None if info.source_gsd_m is None else round(info.source_gsd_m, 6),
        "resampled": info.resampled,
    }
    if info.source_grid is not None:
        width, height, transform = info.source_grid
        record.update(source_width=width, source_height=height, source_transform=list(transform))
    return record
