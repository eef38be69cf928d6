"""evaluate: hand-computed cases on small GeoTIFFs, real dev masks, and the refusals."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import rasterio
from affine import Affine
from rasterio.crs import CRS

from rs_cluster import cli
from rs_cluster.errors import InputError
from rs_cluster.evaluate import EvaluateConfig, metrics_from_counts, run_evaluate
from tests import devdata

TRANSFORM = Affine(0.5, 0, 13147321.0, 0, -0.5, 2811353.0)
CRS_3857 = CRS.from_epsg(3857)


def write_mask(path: Path, array: np.ndarray, *, crs=CRS_3857, transform=TRANSFORM,
               valid: np.ndarray | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    profile = {"driver": "GTiff", "width": array.shape[1], "height": array.shape[0], "count": 1,
               "dtype": "uint8", "crs": crs, "transform": transform}
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(array.astype(np.uint8), 1)
        if valid is not None:
            dst.write_mask(np.where(valid, 255, 0).astype(np.uint8))
    return path


def blank() -> np.ndarray:
    return np.zeros((10, 10), np.uint8)


def rows(first: int, last: int) -> np.ndarray:
    a = blank()
    a[first:last] = 255
    return a


@pytest.fixture
def cases(tmp_path) -> tuple[Path, Path]:
    """Five 10x10 pairs with known counts; predictions named as predict names them."""
    pred, truth = tmp_path / "pred", tmp_path / "truth"
    pairs = {
        "perfect": (rows(0, 3), rows(0, 3)),        # tp 30, tn 70
        "half": (rows(0, 2), rows(0, 4)),           # tp 20, fn 20, tn 60
        "empty_truth": (rows(9, 10), blank()),      # fp 10, tn 90
        "empty_pred": (blank(), rows(9, 10)),       # fn 10, tn 90
        "both_empty": (blank(), blank()),           # tn 100
    }
    for name, (p, t) in pairs.items():
        write_mask(pred / f"{name}_mask.tif", p)
        write_mask(truth / f"{name}.tif", t)
    write_mask(pred / "half_prob.tif", rows(0, 5))  # probabilities are not masks: skipped
    return pred, truth


def test_metrics_of_hand_computed_cases(cases):
    pred, truth = cases
    result = run_evaluate(EvaluateConfig(pred=str(pred), truth=str(truth)))
    by = {r["name"]: r for r in result.images}
    assert sorted(by) == ["both_empty", "empty_pred", "empty_truth", "half", "perfect"]
    assert {k: by["perfect"][k] for k in ("iou", "f1", "precision", "recall", "accuracy")} == \
        {"iou": 1.0, "f1": 1.0, "precision": 1.0, "recall": 1.0, "accuracy": 1.0}
    half = by["half"]
    assert (half["tp"], half["fp"], half["fn"], half["tn"]) == (20, 0, 20, 60)
    assert half["iou"] == 0.5 and half["precision"] == 1.0 and half["recall"] == 0.5
    assert half["f1"] == pytest.approx(2 / 3) and half["accuracy"] == 0.8
    et = by["empty_truth"]
    assert (et["iou"], et["f1"], et["precision"], et["recall"], et["accuracy"]) == (0.0, 0.0, 0.0, None, 0.9)
    ep = by["empty_pred"]
    assert (ep["iou"], ep["f1"], ep["precision"], ep["recall"], ep["accuracy"]) == (0.0, 0.0, None, 0.0, 0.9)
    be = by["both_empty"]
    assert (be["iou"], be["f1"], be["precision"], be["recall"], be["accuracy"]) == (None, None, None, None, 1.0)
    pooled = result.pooled  # tp 50, fp 10, fn 30, tn 410
    assert (pooled["tp"], pooled["fp"], pooled["fn"], pooled["tn"]) == (50, 10, 30, 410)
    assert pooled["iou"] == pytest.approx(50 / 90) and pooled["f1"] == pytest.approx(100 / 140)
    assert pooled["precision"] == pytest.approx(50 / 60) and pooled["recall"] == pytest.approx(50 / 80)
    assert pooled["accuracy"] == pytest.approx(460 / 500) and pooled["images"] == 5


def test_metrics_from_counts_undefined_is_none():
    assert metrics_from_counts(0, 0, 0, 0) == {"iou": None, "f1": None, "precision": None,
                                               "recall": None, "accuracy": None}


def test_pixels_the_prediction_masks_out_are_not_counted(tmp_path):
    valid = np.ones((10, 10), bool)
    valid[5:] = False
    write_mask(tmp_path / "pred" / "a_mask.tif", rows(0, 10), valid=valid)
    write_mask(tmp_path / "truth" / "a.tif", rows(0, 5))
    result = run_evaluate(EvaluateConfig(pred=str(tmp_path / "pred"), truth=str(tmp_path / "truth")))
    assert result.pooled["iou"] == 1.0 and result.pooled["tp"] == 50 and result.pooled["tn"] == 0


def test_real_dev_masks_against_themselves_are_perfect(tmp_path):
    names = devdata.first_files("xiamen_robosat_z18", 3)
    gt = devdata.subset("xiamen_robosat_z18") / "gt"
    for sub in ("pred", "truth"):
        (tmp_path / sub).mkdir()
        for n in names:
            (tmp_path / sub / n).symlink_to(gt / n)
    result = run_evaluate(EvaluateConfig(pred=str(tmp_path / "pred"), truth=str(tmp_path / "truth")))
    assert result.pooled["iou"] == 1.0 and result.pooled["images"] == 3
    assert result.pooled["tp"] > 0 and result.pooled["fp"] == result.pooled["fn"] == 0


def test_size_mismatch_is_refused_naming_both_files(tmp_path):
    write_mask(tmp_path / "pred" / "a_mask.tif", blank())
    write_mask(tmp_path / "truth" / "a.tif", np.zeros((12, 10), np.uint8))
    with pytest.raises(InputError, match=r"a_mask.tif and .*a.tif: sizes differ \(10x10 px vs 10x12 px\)"):
        run_evaluate(EvaluateConfig(pred=str(tmp_path / "pred"), truth=str(tmp_path / "truth")))


def test_georeferencing_mismatch_is_refused(tmp_path):
    write_mask(tmp_path / "pred" / "a_mask.tif", blank())
    write_mask(tmp_path / "truth" / "a.tif", blank(), crs=CRS.from_epsg(32737))
    write_mask(tmp_path / "pred" / "b_mask.tif", blank())
    write_mask(tmp_path / "truth" / "b.tif", blank(), transform=TRANSFORM @ Affine.translation(3, 0))
    with pytest.raises(InputError) as info:
        run_evaluate(EvaluateConfig(pred=str(tmp_path / "pred"), truth=str(tmp_path / "truth")))
    assert "a_mask.tif" in str(info.value) and "CRS differ" in str(info.value)
    assert "1 more mismatched pair" in str(info.value)


def test_nothing_to_pair_is_an_error(tmp_path):
    write_mask(tmp_path / "pred" / "a_mask.tif", blank())
    write_mask(tmp_path / "truth" / "b.tif", blank())
    with pytest.raises(InputError, match="no prediction has a reference"):
        run_evaluate(EvaluateConfig(pred=str(tmp_path / "pred"), truth=str(tmp_path / "truth")))


def test_cli_prints_a_table_and_writes_the_json_report(cases, tmp_path, capsys):
    pred, truth = cases
    report = tmp_path / "report" / "eval.json"
    assert cli.main(["--quiet", "evaluate", "--pred", str(pred), "--truth", str(truth),
                     "--json", str(report)]) == 0
    out = capsys.readouterr().out
    assert "pooled (all pixels)" in out and "half" in out and "0.5556" in out
    data = json.loads(report.read_text())
    assert data["format"] == "rs-cluster-evaluation" and len(data["images"]) == 5
    assert data["pooled"]["iou"] == pytest.approx(50 / 90)
    assert cli.main(["--quiet", "evaluate", "--pred", str(tmp_path / "nope"), "--truth", str(truth)]) == 2
