"""prepare writing its tile dataset to HDFS against the same prepare writing to local disk.

Both run `rs-cluster prepare` on the rig's ``login`` host with Spark ``local[2]`` over the same
real dev rasters (on login's disk); only ``--output`` differs: a folder on login's disk, or an
``hdfs://`` URL on the rig's real NameNode (``master``) with two DataNodes (``worker1``,
``worker2``, replication 2). Each is run twice and the faster run counts (the first warms the
page cache). Needs root (mount namespaces) and the Hadoop jars (``make hadoop-jars``).

    .venv/bin/python benchmarks/bench_hdfs.py [--subsets a,b,...]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.bench_prepare import link_inputs  # noqa: E402
from tests import devdata  # noqa: E402
from tests.hadoop_daemons import Hadoop  # noqa: E402
from tests.hadoop_daemons import unavailable as hadoop_unavailable  # noqa: E402
from tests.rig import Rig  # noqa: E402
from tests.rig import unavailable as rig_unavailable  # noqa: E402

DEFAULT_SUBSETS = ("inria_austin_chicago", "whu_aerial_christchurch", "xiamen_robosat_z18")


def prepare(rig: Rig, images: Path, masks: Path, output: str) -> float:
    login = rig.host("login")
    started = time.monotonic()
    result = login.run([str(rig.python), "-m", "rs_cluster", "prepare", "--images", str(images),
                        "--masks", str(masks), "--output", output, "--tile-size", "128",
                        "--overwrite", "--master", "local[2]"],
                       env=rig.driver_env(), timeout=900, check=False)
    took = time.monotonic() - started
    if result.returncode != 0:
        raise SystemExit(f"prepare to {output} failed:\n{result.stderr[-2000:]}")
    return took


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--subsets", default=",".join(DEFAULT_SUBSETS))
    args = parser.parse_args()
    reason = rig_unavailable() or hadoop_unavailable()
    if reason:
        print(f"bench_hdfs: skipped: {reason}")
        return 0
    with tempfile.TemporaryDirectory(prefix="bench-hdfs-") as tmp:
        rig = Rig(Path(tmp) / "rig", services=("spark",))
        hadoop = Hadoop(rig)
        hadoop.write_conf()
        with rig:
            hadoop.start()
            login = rig.host("login")
            images, masks = link_inputs(devdata.DEV_DATA, args.subsets.split(","),
                                        login.workspace / "inputs")
            count = sum(1 for _ in images.iterdir())
            local = min(prepare(rig, images, masks, str(login.workspace / "tiles"))
                        for _ in range(2))
            hdfs = min(prepare(rig, images, masks, f"{hadoop.url}/user/rs/tiles")
                       for _ in range(2))
            hadoop.stop()
    print(f"prepare of {count} rasters, tile 128, Spark local[2] on the rig's login host")
    print(f"  local disk: {local:6.1f} s")
    print(f"  HDFS (NameNode + 2 DataNodes, replication 2): {hdfs:6.1f} s")
    print(f"  HDFS vs local disk: {local / hdfs:.2f}x (target >= 0.8x)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
