"""Which layers are masks, which mask is whose, how the dock names them: QGIS-free decisions,
checked on the real dev data (Inria crops: ``images/`` and ``gt/`` with identical file names),
read in place through symlinks, never copied."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from rs_qgis_plugin.pairing import (
    RasterInfo,
    display_labels,
    looks_like_mask,
    mask_key,
    pair_layers,
    peek_values,
    split_counts,
    values_look_like_mask,
)
from tests import devdata

REPO = Path(__file__).resolve().parents[2]
INRIA = "inria_austin_chicago"


def test_real_masks_are_told_from_real_imagery_by_their_values(tmp_path):
    """Linked under names and folders that say nothing, the Inria and Massachusetts masks are
    still masks (one band of 0/255) and their images are not; no .aux.xml appears beside them."""
    cases = []
    for subset, name in ((INRIA, "austin1_0.tif"), (INRIA, "chicago1_3.tif"),
                         ("massachusetts_hffcn_patches", "patch0.tif")):
        src = devdata.subset(subset)
        for kind, expected in (("images", False), ("gt", True)):
            link = tmp_path / f"{subset}_{kind}_{name}"
            link.symlink_to(src / kind / name)
            cases.append((link, expected))
    assert [looks_like_mask(str(p)) for p, _ in cases] == [e for _, e in cases]
    band_count, values = peek_values(str(cases[1][0]))
    assert band_count == 1 and len(values) == 64 * 64 and set(values) <= {0.0, 255.0}
    assert not list(devdata.subset(INRIA).rglob("*.aux.xml"))


@pytest.mark.parametrize("bands, values, expected", [
    (1, [0, 255, 255, 0], True), (1, [0, 1], True), (1, [0, 0], True),  # an empty mask
    (1, [0, 1, 255], False), (1, [0, 12, 200], False), (3, [0, 255], False),
    (1, [0.0, 0.5], False),  # a probability raster is no reference mask
])
def test_mask_values_are_0_1_or_0_255_in_one_band(bands, values, expected):
    assert values_look_like_mask(bands, values) is expected


def test_a_mask_folder_marks_a_mask_without_reading_it(tmp_path):
    for folder in ("gt", "labels", "masks", "Mask", "annotations"):
        assert looks_like_mask(str(tmp_path / folder / "missing.tif"))  # not even opened
    assert not looks_like_mask(str(tmp_path / "images" / "missing.tif"))


def _infos(paths: dict[str, str]) -> list[RasterInfo]:
    return [RasterInfo(lid, Path(p).stem, p, looks_like_mask(p)) for lid, p in paths.items()]


def test_inria_images_pair_with_the_same_name_in_the_sibling_gt_folder():
    data = devdata.subset(INRIA)
    names = devdata.first_files(INRIA, 10)
    paths = {f"img{i}": str(data / "images" / n) for i, n in enumerate(names)}
    paths.update({f"gt{i}": str(data / "gt" / n) for i, n in enumerate(names[:9])})
    pairing = pair_layers(_infos(paths))
    assert pairing.pairs == {f"img{i}": f"gt{i}" for i in range(9)}
    assert pairing.unpaired_images == ("img9",) and pairing.unpaired_masks == ()
    assert len(pairing.images) == 10 and len(pairing.masks) == 9


def test_suffixes_pair_and_each_dataset_keeps_its_own_masks():
    infos = [
        RasterInfo("a", "tile7", "/d/a/images/tile7.tif"),
        RasterInfo("am", "tile7", "/d/a/gt/tile7.tif", True),
        RasterInfo("b", "tile7", "/d/b/images/tile7.tif"),
        RasterInfo("bm", "tile7", "/d/b/labels/tile7.tif", True),
        RasterInfo("c", "scene", "/d/c/scene.tif"),
        RasterInfo("cm", "scene_mask", "/d/c/scene_mask.tif", True),
        RasterInfo("x", "xbd", "/d/x/images/guatemala_pre_disaster.png"),
        RasterInfo("xm", "xbd_t", "/d/x/gt/guatemala_pre_disaster_target.png", True),
        RasterInfo("lonely", "lonely mask", "/d/e/gt/nobody.tif", True),
        RasterInfo("wms", "web map"),
    ]
    pairing = pair_layers(infos)
    assert pairing.pairs == {"a": "am", "b": "bm", "c": "cm", "x": "xm"}
    assert pairing.unpaired_masks == ("lonely",) and pairing.unpaired_images == ("wms",)
    assert mask_key("Austin1_GT") == "austin1" and mask_key("_mask") == "_mask"


def test_labels_name_the_folder_and_go_deeper_only_where_needed():
    infos = [RasterInfo("i", "austin1_0", "/d/inria/images/austin1_0.tif"),
             RasterInfo("g", "austin1_0", "/d/inria/gt/austin1_0.tif", True),
             RasterInfo("i2", "tile", "/d/one/images/tile.tif"),
             RasterInfo("i3", "tile", "/d/two/images/tile.tif"),
             RasterInfo("w", "web map")]
    assert display_labels(infos) == {"i": "austin1_0 — images/", "g": "austin1_0 — gt/",
                                     "i2": "tile — one/images/", "i3": "tile — two/images/",
                                     "w": "web map"}


def test_split_counts_are_the_clusters():
    """The dock says how many pairs go to each split before the job runs: the cluster's own
    rule (rs_cluster.prepare.assign_splits, run in the cluster venv) must agree."""
    cases = [(n, split) for n in (1, 2, 3, 4, 7, 10, 50)
             for split in ((0.6, 0.2, 0.2), (0.8, 0.1, 0.1), (1.0, 0.0, 0.0), (0.7, 0.3, 0.0))]
    cluster_python = REPO / ".venv" / "bin" / "python"
    if not cluster_python.exists():
        pytest.skip("the cluster venv (.venv) is not built")
    script = ("import json, sys\nfrom rs_cluster.prepare import assign_splits\n"
              "out = []\nfor n, f in json.loads(sys.argv[1]):\n"
              "    s = list(assign_splits([str(i) for i in range(n)], tuple(f), 0).values())\n"
              "    out.append([s.count(k) for k in ('train', 'val', 'test')])\n"
              "print(json.dumps(out))")
    import json

    out = subprocess.run([str(cluster_python), "-c", script, json.dumps(cases)],
                         capture_output=True, text=True, timeout=120, check=True,
                         env={"PYTHONPATH": str(REPO / "cluster_side")})
    assert [list(split_counts(n, f)) for n, f in cases] == json.loads(out.stdout)
