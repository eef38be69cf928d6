"""Fixtures of the cluster-side tests: a real Spark session, a real standalone cluster, real tiles."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests import devdata
from tests.spark_cluster import StandaloneCluster

# A small but varied real set: georeferenced GeoTIFFs (Xiamen, EPSG:3857, 1-band masks), PNGs with
# RGB masks (Inria), and a raster whose size is no multiple of 128 (Dubai 509x544 and up).
SMALL_PICKS = {
    "xiamen_robosat_z18": devdata.first_files("xiamen_robosat_z18", 6),
    "inria_png_austin_chicago": devdata.first_files("inria_png_austin_chicago", 2),
    "dubai_mbrsc_hitl": ["tile1_part_001.png"],
}


@pytest.fixture(scope="session")
def spark():
    """One local[2] SparkSession for the whole test run (a JVM start costs seconds)."""
    from rs_cluster.spark import spark_session

    with spark_session("local[2]", "rs-cluster tests") as session:
        yield session


@pytest.fixture(scope="session")
def standalone_cluster(tmp_path_factory):
    """A real Spark standalone master + worker on 127.0.0.1 (2 cores), stopped afterwards."""
    with StandaloneCluster(tmp_path_factory.mktemp("spark-standalone")) as cluster:
        yield cluster


@pytest.fixture(scope="session")
def small_pairs(tmp_path_factory) -> tuple[Path, Path]:
    """(images dir, masks dir) of SMALL_PICKS, linked from the dev set."""
    return devdata.link_pairs(tmp_path_factory.mktemp("small-pairs"), SMALL_PICKS)


@pytest.fixture(scope="session")
def small_dataset(spark, small_pairs, tmp_path_factory) -> Path:
    """A tile dataset prepared (128 px, stride 128) from SMALL_PICKS; read-only for tests."""
    from rs_cluster.prepare import PrepareConfig, run_prepare

    out = tmp_path_factory.mktemp("small-dataset") / "tiles"
    images, masks = small_pairs
    run_prepare(PrepareConfig(images=str(images), masks=str(masks), output=str(out),
                              split=(0.6, 0.2, 0.2), seed=0), spark=spark)
    return out
