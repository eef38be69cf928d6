"""``rs-cluster prepare``: argument parsing only; the work is in :mod:`rs_cluster.prepare`."""

from __future__ import annotations

import argparse
import json

from rs_cluster.errors import ConfigError
from rs_cluster.progress import Reporter
from rs_cluster.settings import add_resource_options, resources_from_args


def _split(text: str) -> tuple[float, float, float]:
    try:
        parts = tuple(float(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not three numbers: {text!r}") from None
    if len(parts) != 3:
        raise argparse.ArgumentTypeError(f"expected train,val,test fractions, got {text!r}")
    return parts  # type: ignore[return-value]


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "prepare", help="tile image/mask rasters into a Petastorm dataset with Spark",
        description="Pairs images with masks by file name, cuts them into tiles with Spark and "
        "writes one Petastorm (Parquet) dataset per split plus dataset.json.")
    p.add_argument("--images", required=True, metavar="DIR", help="folder of imagery rasters (RGB)")
    p.add_argument("--masks", required=True, metavar="DIR",
                   help="folder of building masks named like the images (non-zero = building)")
    p.add_argument("--output", required=True, metavar="DIR_OR_URL",
                   help="dataset folder to create (a local path or hdfs:// URL)")
    p.add_argument("--tile-size", type=int, default=128, metavar="PX", help="tile side (default 128)")
    p.add_argument("--stride", type=int, metavar="PX", help="step between tiles (default: tile size)")
    p.add_argument("--split", type=_split, default=(0.6, 0.2, 0.2), metavar="TRAIN,VAL,TEST",
                   help="fractions of rasters per split (default 0.6,0.2,0.2)")
    p.add_argument("--seed", type=int, default=0, help="seed of the split by raster (default 0)")
    p.add_argument("--val-rasters", default="", metavar="NAMES",
                   help="comma-separated image file names that form the validation split; the "
                   "others are split train/test by the TRAIN and TEST fractions")
    p.add_argument("--gsd", type=float, metavar="M",
                   help="resample georeferenced rasters to M ground metres per pixel before "
                   "tiling (bilinear for imagery, nearest for masks; Web Mercator and degrees are "
                   "converted with the latitude); rasters without georeferencing are tiled as "
                   "they are, with a warning")
    p.add_argument("--master", metavar="URL",
                   help="Spark master (default: the cluster settings file's, else local[*]; "
                   "e.g. spark://host:7077, yarn)")
    add_resource_options(p)
    p.add_argument("--overwrite", action="store_true", help="replace an existing output dataset")
    p.add_argument("--skip-bad", action="store_true",
                   help="report and skip bad image/mask pairs instead of stopping")
    p.add_argument("--json", action="store_true", help="print the result as JSON on stdout")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace, reporter: Reporter) -> int:
    from dataclasses import asdict

    from rs_cluster.prepare import PrepareConfig, run_prepare

    try:
        cfg = PrepareConfig(images=args.images, masks=args.masks, output=args.output,
                            tile_size=args.tile_size, stride=args.stride, split=args.split,
                            seed=args.seed,
                            val_rasters=tuple(v for v in args.val_rasters.split(",") if v),
                            master=args.master, overwrite=args.overwrite,
                            skip_bad=args.skip_bad, resources=resources_from_args(args),
                            gsd=args.gsd)
    except TypeError as e:  # pragma: no cover - argparse already typed everything
        raise ConfigError(str(e)) from None
    result = run_prepare(cfg, reporter=reporter)
    if args.json:
        print(json.dumps(asdict(result), indent=2))
    else:
        print(f"dataset: {result.output}")
        for split in result.tiles:
            print(f"  {split:5s} {result.rasters[split]:4d} rasters {result.tiles[split]:6d} tiles "
                  f"building fraction {result.building_fraction[split]:.3f}")
        if result.skipped:
            print(f"  skipped {len(result.skipped)} bad pair(s); see dataset.json")
    return 0
