"""The raster file formats the plugin and the cluster agree on: part of the contract.

``cluster_side/rs_cluster/formats.py`` holds the same tuples (the two packages never import each
other) and ``tests/contract/test_formats.py`` proves they are equal. The plugin uploads a raster
in one of :data:`RASTER_SUFFIXES` as it is, with its sidecars, and exports anything else to
GeoTIFF first; the cluster reads exactly these from an input folder and refuses any other file
there that is not a sidecar, so no raster is ever left out without a word.
"""

from __future__ import annotations

from pathlib import PurePath

# Formats that travel as one file (plus sidecars) and that every GDAL build reads. Not VRT: its
# sources stay behind on the analyst's disk.
RASTER_SUFFIXES = (".tif", ".tiff", ".png", ".jpg", ".jpeg", ".jp2", ".img")

# Files GDAL reads beside a raster (name.tif.aux.xml, name.tfw ...): georeferencing, CRS,
# overviews, masks, ENVI headers, RPCs. They travel with it under its name and are no rasters.
SIDECAR_SUFFIXES = (".aux.xml", ".aux", ".ovr", ".rrd", ".msk", ".prj", ".wld", ".tfw", ".tifw",
                    ".tiffw", ".jgw", ".jpgw", ".jpegw", ".pgw", ".pngw", ".j2w", ".jp2w", ".hdr",
                    ".ige", ".rpb", "_rpc.txt", ".imd")


def is_raster(name: str) -> bool:
    return PurePath(name).suffix.lower() in RASTER_SUFFIXES


def is_sidecar(name: str) -> bool:
    return PurePath(name).name.lower().endswith(SIDECAR_SUFFIXES)
