"""``rs-cluster predict`` and ``rs-cluster evaluate``: argument parsing only.

The work is in :mod:`rs_cluster.predict` and :mod:`rs_cluster.evaluate`, imported when a command
runs, so ``--help`` never loads TensorFlow, Spark or GDAL.
"""

from __future__ import annotations

import argparse
import json

from rs_cluster.progress import Reporter
from rs_cluster.settings import add_resource_options, resources_from_args


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "predict", help="predict georeferenced building masks for rasters with Spark",
        description="Slides the model over each raster with overlap, blends the windows and writes "
        "<stem>_mask.tif (uint8, 255 building, 0 background; the source CRS and transform) per input, "
        "optionally <stem>_prob.tif and <stem>_buildings.gpkg, plus predict.json listing outputs "
        "and failures. One Spark task per raster.")
    p.add_argument("--model", required=True, metavar="DIR_OR_URL",
                   help="model folder (model.json and the Keras file it names), or 'builtin' "
                   "for the model that ships with rs-cluster ('builtin:NAME' for another)")
    p.add_argument("--input", required=True, metavar="FILE_OR_DIR",
                   help="a raster, or a folder of rasters (any format GDAL reads)")
    p.add_argument("--output", required=True, metavar="DIR", help="folder for the masks")
    p.add_argument("--overlap", type=int, default=32, metavar="PX",
                   help="overlap between neighbouring windows (default 32)")
    p.add_argument("--batch-size", type=int, default=32, metavar="N",
                   help="windows per model call (default 32)")
    p.add_argument("--threshold", type=float, metavar="P",
                   help="building probability cut-off (default: the model card's, normally 0.5)")
    p.add_argument("--probabilities", action="store_true",
                   help="also write the float32 probability GeoTIFF <stem>_prob.tif")
    p.add_argument("--polygons", action="store_true",
                   help="also write building polygons to <stem>_buildings.gpkg")
    p.add_argument("--regularize", action="store_true",
                   help="with --polygons: square the outlines along each building's main "
                   "directions (round or ragged shapes are kept as traced; the 'regularized' "
                   "field says which were squared)")
    p.add_argument("--min-building-m2", type=float, metavar="M2",
                   help="with --polygons: drop buildings and holes smaller than M2 square metres "
                   "(default: under 16 pixels; a mask in degrees keeps that rule)")
    p.add_argument("--tta", action="store_true",
                   help="test-time augmentation: average the 8 flips and rotations of every "
                   "window (8x the model time)")
    p.add_argument("--input-gsd", type=float, metavar="M",
                   help="ground metres per pixel of inputs without georeferencing, so that they "
                   "too are resampled to the model's GSD (georeferenced inputs use their own)")
    p.add_argument("--no-resample", action="store_true",
                   help="predict every input at its own GSD, even when the model card states "
                   "another (by default an input more than 10 %% off is resampled to the model's "
                   "GSD and the mask put back on the input's grid)")
    p.add_argument("--band-rows", type=int, metavar="N",
                   help="cut rasters taller than N rows (a multiple of 256) into bands of N rows, "
                   "each predicted as its own Spark task and joined into one output (same "
                   "pixels as one task); 0: one task per raster; default: rasters of 64 Mpx or "
                   "more, in about 2 bands per Spark slot")
    p.add_argument("--master", metavar="URL",
                   help="Spark master (default: the cluster settings file's, else local[*]; "
                   "e.g. spark://host:7077, yarn)")
    add_resource_options(p)
    p.add_argument("--fail-fast", action="store_true",
                   help="stop at the first input that fails (default: report it, go on)")
    p.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    p.add_argument("--json", action="store_true", help="print the result as JSON on stdout")
    p.set_defaults(func=_run_predict)

    e = sub.add_parser(
        "evaluate", help="score predicted masks against reference masks",
        description="Pairs <stem>_mask.* (or <stem>.*) predictions with <stem>.* references and "
        "reports building IoU, F1, precision, recall and pixel accuracy per image and pooled over "
        "all pixels. Non-zero pixels are building in both.")
    e.add_argument("--pred", required=True, metavar="DIR", help="folder of predicted masks")
    e.add_argument("--truth", required=True, metavar="DIR", help="folder of reference masks")
    e.add_argument("--json", metavar="FILE", help="also write the report as JSON to FILE")
    e.set_defaults(func=_run_evaluate)


def _run_predict(args: argparse.Namespace, reporter: Reporter) -> int:
    from dataclasses import asdict

    from rs_cluster.predict import PredictConfig, run_predict

    cfg = PredictConfig(model=args.model, input=args.input, output=args.output, overlap=args.overlap,
                        batch_size=args.batch_size, threshold=args.threshold,
                        probabilities=args.probabilities, polygons=args.polygons, master=args.master,
                        fail_fast=args.fail_fast, overwrite=args.overwrite, tta=args.tta,
                        regularize=args.regularize, min_building_m2=args.min_building_m2,
                        input_gsd=args.input_gsd, no_resample=args.no_resample,
                        band_rows=args.band_rows, resources=resources_from_args(args))
    result = run_predict(cfg, reporter=reporter)
    if args.json:
        print(json.dumps(asdict(result), indent=2, default=str))
    else:
        for r in result.outputs:
            print(f"{r['mask']}  {r['width']}x{r['height']} px  building "
                  f"{r['building_pixels'] / max(r['valid_pixels'], 1):.3f}")
        for f in result.failures:
            print(f"FAILED {f['error']}")
        print(f"summary: {result.output}/predict.json")
    return 1 if result.failures else 0


def _run_evaluate(args: argparse.Namespace, reporter: Reporter) -> int:
    from rs_cluster.evaluate import EvaluateConfig, format_table, run_evaluate

    result = run_evaluate(EvaluateConfig(pred=args.pred, truth=args.truth, json=args.json),
                          reporter=reporter)
    print(format_table(result))
    if result.unmatched_predictions:
        print(f"{len(result.unmatched_predictions)} prediction(s) without a reference were not scored")
    return 0
