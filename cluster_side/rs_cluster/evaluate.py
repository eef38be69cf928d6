"""The evaluate stage: predicted masks against reference masks -> building IoU, F1 and friends.

Predictions and references are paired by name: ``<stem>_mask.<ext>`` (what predict writes) or
``<stem>.<ext>`` in the prediction folder pairs with ``<stem>.<ext>`` in the reference folder;
``<stem>_prob.*`` files are skipped. A pixel is building when its value is non-zero, in both.
Pixels that a prediction masks out (its internal mask or alpha: no data in the input imagery) are
left out of every count; a reference's nodata value is ignored, since mask files often set
``nodata=0`` for what is really background.

Counts are kept per image and pooled over all pixels; the pooled figures are the ones to quote
(a mean of per-image IoU overweights small, empty or nearly empty images). A metric whose
denominator is zero (precision with nothing predicted, recall with no reference building) is
``None`` in the report and ``-`` in the table. Rasters are read in row blocks, so any size works.
"""

from __future__ import annotations

import os
import time
import warnings
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from rs_cluster import __version__, storage
from rs_cluster.atomic import write_json_atomic
from rs_cluster.config import check_keys
from rs_cluster.errors import ConfigError, InputError
from rs_cluster.progress import Reporter
from rs_cluster.rasters import _open, _short, list_rasters

EVALUATION_FORMAT = "rs-cluster-evaluation"
MASK_SUFFIX = "_mask"
PROB_SUFFIX = "_prob"
_ROWS = 1024


@dataclass(frozen=True)
class EvaluateConfig:
    pred: str
    truth: str
    json: str | None = None

    def __post_init__(self) -> None:
        if not self.pred or not self.truth:
            raise ConfigError("evaluate needs a prediction folder and a reference folder")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "EvaluateConfig":
        data = check_keys(cls, data, "evaluate")
        return cls(**data)


@dataclass
class Counts:
    tp: int = 0
    fp: int = 0
    fn: int = 0
    tn: int = 0

    def __iadd__(self, other: "Counts") -> "Counts":
        self.tp += other.tp
        self.fp += other.fp
        self.fn += other.fn
        self.tn += other.tn
        return self

    def metrics(self) -> dict[str, float | None]:
        return metrics_from_counts(self.tp, self.fp, self.fn, self.tn)


def _ratio(num: int, den: int) -> float | None:
    return num / den if den else None


def metrics_from_counts(tp: int, fp: int, fn: int, tn: int) -> dict[str, float | None]:
    """Building IoU, F1, precision, recall and pixel accuracy; None where undefined (0/0)."""
    return {
        "iou": _ratio(tp, tp + fp + fn),
        "f1": _ratio(2 * tp, 2 * tp + fp + fn),
        "precision": _ratio(tp, tp + fp),
        "recall": _ratio(tp, tp + fn),
        "accuracy": _ratio(tp + tn, tp + fp + fn + tn),
    }


@dataclass(frozen=True)
class EvaluateResult:
    pooled: dict[str, Any]
    images: list[dict[str, Any]]
    unmatched_predictions: list[str] = field(default_factory=list)
    unmatched_truth: list[str] = field(default_factory=list)
    json: str | None = None
    seconds: float = 0.0


def _key_of_prediction(path: Path) -> str | None:
    stem = path.stem
    if stem.endswith(PROB_SUFFIX):
        return None
    return stem[: -len(MASK_SUFFIX)] if stem.endswith(MASK_SUFFIX) else stem


def pair_predictions(pred_dir: str, truth_dir: str) -> tuple[list[tuple[str, Path, Path]], list[str], list[str]]:
    """[(name, prediction, reference)], predictions without reference, references without prediction."""
    preds: dict[str, Path] = {}
    for p in list_rasters(pred_dir):
        key = _key_of_prediction(p)
        if key is None:
            continue
        # "<stem>_mask.tif" wins over a plain "<stem>.tif" in the same folder.
        if key not in preds or p.stem.endswith(MASK_SUFFIX):
            preds[key] = p
    truths: dict[str, list[Path]] = {}
    for p in list_rasters(truth_dir):
        truths.setdefault(p.stem, []).append(p)
    pairs, lonely = [], []
    for key in sorted(preds):
        found = truths.get(key, [])
        if len(found) > 1:
            raise InputError(f"{truth_dir}: several references named {key}.* "
                             f"({', '.join(p.name for p in found)}); keep one")
        if found:
            pairs.append((key, preds[key], found[0]))
        else:
            lonely.append(str(preds[key]))
    unused = sorted(str(p[0]) for k, p in truths.items() if k not in preds)
    return pairs, lonely, unused


def _same_georeferencing(a: Any, b: Any) -> str | None:
    """Why two open rasters are not on the same grid, or None."""
    if (a.width, a.height) != (b.width, b.height):
        return f"sizes differ ({a.width}x{a.height} px vs {b.width}x{b.height} px)"
    if (a.crs is None) != (b.crs is None) or (a.crs is not None and a.crs != b.crs):
        return (f"CRS differ ({a.crs.to_string() if a.crs else 'none'} vs "
                f"{b.crs.to_string() if b.crs else 'none'})")
    ta, tb = a.transform, b.transform
    px = max(abs(ta.a), abs(ta.b), abs(ta.d), abs(ta.e), 1e-12)
    same_scale = all(abs(x - y) <= 1e-6 * px for x, y in
                     ((ta.a, tb.a), (ta.b, tb.b), (ta.d, tb.d), (ta.e, tb.e)))
    same_origin = abs(ta.c - tb.c) <= 1e-3 * px and abs(ta.f - tb.f) <= 1e-3 * px
    if not (same_scale and same_origin):
        return f"geotransforms differ ({tuple(ta)[:6]} vs {tuple(tb)[:6]})"
    return None


def _prediction_valid(src: Any) -> bool:
    """Whether the prediction carries its own mask (per-dataset mask or alpha) worth honouring."""
    from rasterio.enums import MaskFlags

    flags = src.mask_flag_enums[0]
    return MaskFlags.per_dataset in flags or MaskFlags.alpha in flags


def count_pair(pred_path: str, truth_path: str) -> Counts:
    """Confusion counts of one prediction/reference pair, read in row blocks."""
    from rasterio.windows import Window as RioWindow

    counts = Counts()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # NotGeoreferencedWarning: pixel-grid pairs are fine
        with _open(pred_path) as pred, _open(truth_path) as truth:
            problem = _same_georeferencing(pred, truth)
            if problem:
                raise InputError(f"{pred_path} and {truth_path}: {problem}; they must be on the same grid")
            honour_mask = _prediction_valid(pred)
            for top in range(0, pred.height, _ROWS):
                window = RioWindow(0, top, pred.width, min(_ROWS, pred.height - top))
                try:
                    p = pred.read(1, window=window) != 0
                    t = truth.read(1, window=window) != 0
                    valid = pred.dataset_mask(window=window) != 0 if honour_mask else None
                except Exception as e:
                    raise InputError(f"{pred_path} or {truth_path}: cannot read rows {top}- "
                                     f"({_short(e)})") from e
                if valid is not None:
                    p, t = p[valid], t[valid]
                tp = int(np.count_nonzero(p & t))
                fp = int(np.count_nonzero(p)) - tp
                fn = int(np.count_nonzero(t)) - tp
                counts += Counts(tp, fp, fn, p.size - tp - fp - fn)
    return counts


def _check_pairs(pairs: list[tuple[str, Path, Path]]) -> None:
    """Refuses, before counting anything, every pair whose size or georeferencing differ."""
    bad = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _, pred_path, truth_path in pairs:
            with _open(str(pred_path)) as pred, _open(str(truth_path)) as truth:
                problem = _same_georeferencing(pred, truth)
            if problem:
                bad.append(f"{pred_path} and {truth_path}: {problem}")
    if bad:
        more = f" (and {len(bad) - 1} more mismatched pair(s))" if len(bad) > 1 else ""
        raise InputError(f"{bad[0]}; a prediction and its reference must be on the same grid{more}")


def run_evaluate(cfg: EvaluateConfig, *, reporter: Reporter | None = None) -> EvaluateResult:
    """Scores every prediction in ``cfg.pred`` that has a reference in ``cfg.truth``.

    Folders in a store (s3://, hdfs://) are scored on copies in this host's $TMPDIR; the result
    and the report name the URLs, and a report URL gets the report uploaded whole."""
    locations = [cfg.pred, cfg.truth, *([cfg.json] if cfg.json else [])]
    if all(storage.is_local(x) for x in locations):
        return _evaluate(cfg, reporter=reporter)
    with storage.local_input(cfg.pred) as pred, storage.local_input(cfg.truth) as truth:
        local = _evaluate(replace(cfg, pred=pred, truth=truth, json=None), reporter=reporter)

        def named(path: str) -> str:
            for folder, url in ((pred, cfg.pred), (truth, cfg.truth)):
                if path == folder or path.startswith(folder + os.sep):
                    return url.rstrip("/") + path[len(folder):].replace(os.sep, "/")
            return path

    images = [{**i, "prediction": named(i["prediction"]), "reference": named(i["reference"])}
              for i in local.images]
    result = replace(local, images=images, json=cfg.json,
                     unmatched_predictions=[named(p) for p in local.unmatched_predictions],
                     unmatched_truth=[named(p) for p in local.unmatched_truth])
    if cfg.json:
        report = report_dict(result, cfg)
        if storage.is_local(cfg.json):
            write_json_atomic(storage.local_path(cfg.json) or cfg.json, report)
        else:
            storage.write_json(cfg.json, report)
    return result


def _evaluate(cfg: EvaluateConfig, *, reporter: Reporter | None = None) -> EvaluateResult:
    reporter = reporter or Reporter()
    started = time.monotonic()
    for folder in (cfg.pred, cfg.truth):
        if not os.path.isdir(folder):
            raise InputError(f"{folder}: not a folder")
    pairs, lonely, unused = pair_predictions(cfg.pred, cfg.truth)
    if not pairs:
        raise InputError(f"{cfg.pred}: no prediction has a reference of the same name in {cfg.truth}")
    _check_pairs(pairs)
    reporter.start("evaluate", total=len(pairs), unit="images",
                   message=f"scoring {len(pairs)} prediction(s) against {cfg.truth}")
    for path in lonely:
        reporter.warning(f"{path}: no reference of the same name in {cfg.truth}; not scored")
    pooled = Counts()
    images = []
    for i, (name, pred_path, truth_path) in enumerate(pairs):
        counts = count_pair(str(pred_path), str(truth_path))
        pooled += counts
        images.append({"name": name, "prediction": str(pred_path), "reference": str(truth_path),
                       **counts.metrics(), **asdict(counts)})
        reporter.progress(i + 1, len(pairs), name)
    summary = {**pooled.metrics(), **asdict(pooled), "images": len(images)}
    result = EvaluateResult(pooled=summary, images=images, unmatched_predictions=lonely,
                            unmatched_truth=unused, json=cfg.json,
                            seconds=time.monotonic() - started)
    if cfg.json:
        write_json_atomic(cfg.json, report_dict(result, cfg))
    reporter.metrics(**{k: summary[k] for k in ("iou", "f1", "precision", "recall", "accuracy")})
    reporter.finish(f"{len(images)} image(s) scored: building IoU {_fmt(summary['iou'])}, "
                    f"F1 {_fmt(summary['f1'])}", pooled=summary)
    return result


def report_dict(result: EvaluateResult, cfg: EvaluateConfig) -> dict[str, Any]:
    return {
        "format": EVALUATION_FORMAT,
        "format_version": 1,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "rs_cluster_version": __version__,
        "predictions": _location(cfg.pred),
        "references": _location(cfg.truth),
        "building": "non-zero pixels",
        "pooled": result.pooled,
        "images": result.images,
        "unmatched_predictions": result.unmatched_predictions,
        "unmatched_references": result.unmatched_truth,
    }


def _location(location: str) -> str:
    return os.path.abspath(location) if not storage.is_url(location) else location


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def format_table(result: EvaluateResult) -> str:
    """The per-image figures and the pooled line, as a fixed-width table."""
    columns = ("iou", "f1", "precision", "recall", "accuracy")
    width = max([len("pooled (all pixels)")] + [len(r["name"]) for r in result.images])
    head = f"{'image':<{width}}  " + "  ".join(f"{c:>9}" for c in columns)
    lines = [head, "-" * len(head)]
    for r in result.images:
        lines.append(f"{r['name']:<{width}}  " + "  ".join(f"{_fmt(r[c]):>9}" for c in columns))
    lines.append("-" * len(head))
    lines.append(f"{'pooled (all pixels)':<{width}}  "
                 + "  ".join(f"{_fmt(result.pooled[c]):>9}" for c in columns))
    return "\n".join(lines)
