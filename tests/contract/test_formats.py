"""One list of raster formats for both sides: what the plugin uploads as it is, with its sidecars,
is exactly what the cluster reads from an input folder. Runs in the cluster venv (no QGIS), the
two packages' modules side by side, as tests/contract/test_job_protocol.py does."""

from __future__ import annotations

import pytest
from rs_cluster import formats as cluster_formats
from rs_cluster.errors import InputError
from rs_cluster.rasters import list_rasters

from rs_qgis_plugin.core import formats as plugin_formats
from rs_qgis_plugin.logic import RasterPick, RunParams, local_raster_path, plan_job


def test_both_sides_hold_the_same_lists():
    assert plugin_formats.RASTER_SUFFIXES == cluster_formats.RASTER_SUFFIXES
    assert plugin_formats.SIDECAR_SUFFIXES == cluster_formats.SIDECAR_SUFFIXES
    assert not set(cluster_formats.RASTER_SUFFIXES) & set(cluster_formats.SIDECAR_SUFFIXES)


def test_what_the_plugin_uploads_is_one_raster_each_on_the_cluster(tmp_path):
    """Every format of the list, each with every kind of sidecar (named after the file or its
    stem, as GDAL looks for them), planned by the plugin and laid out under the remote names:
    the cluster finds each raster once and takes no sidecar for a raster."""
    local = tmp_path / "local"
    local.mkdir()
    picks, sidecars = [], {}
    for i, suffix in enumerate(plugin_formats.RASTER_SUFFIXES):
        image = local / f"scene {i}{suffix.upper() if i % 2 else suffix}"
        image.write_bytes(b"")
        sides = []
        for kind in plugin_formats.SIDECAR_SUFFIXES:
            for base in (image.name, image.stem):
                sides.append(str(local / f"{base}{kind}"))
        sidecars[str(image)] = sides
        picks.append(RasterPick(str(image)))
    planned = plan_job("formats", RunParams(mode="predict", model_dir="/m"), picks,
                       sidecars=lambda path: sidecars.get(path, ()))
    job = tmp_path / "job"
    for remote in planned.inputs:
        if remote.startswith("inputs/images/"):
            (job / remote).parent.mkdir(parents=True, exist_ok=True)
            (job / remote).write_bytes(b"")
    uploaded = len([r for r in planned.inputs if r.startswith("inputs/images/")])
    assert uploaded == len(picks) * (1 + 2 * len(plugin_formats.SIDECAR_SUFFIXES))
    found = list_rasters(job / "inputs/images", refuse_unknown=True)
    assert sorted(p.name for p in found) == sorted(
        f"scene_{i}{suffix}" for i, suffix in enumerate(plugin_formats.RASTER_SUFFIXES))


@pytest.mark.parametrize("name", ["scene.ecw", "scene.sid", "scene.nc", "scene.bil", "scene.vrt",
                                  "scene.asc", "scene"])
def test_a_format_off_the_list_is_exported_by_the_plugin_and_refused_by_the_cluster(tmp_path, name):
    assert local_raster_path("gdal", f"/data/{name}", exists=True) is None  # becomes a GeoTIFF
    (tmp_path / name).write_bytes(b"")
    with pytest.raises(InputError, match=rf"{name}: not a raster format rs-cluster reads"):
        list_rasters(tmp_path, refuse_unknown=True)
