"""Fixtures of the hadoop tier: the multi-host rig (tests/rig.py) with real Hadoop daemons on it
(tests/hadoop_daemons.py): the NameNode and the YARN ResourceManager on ``master``, a DataNode and
a NodeManager on each worker host."""

from __future__ import annotations

import pytest

from tests import hadoop_daemons
from tests.rig import Rig, unavailable


@pytest.fixture(scope="session")
def hdfs_rig(tmp_path_factory):
    """(rig, hadoop): login, master and the workers with Spark (standalone), HDFS and YARN (no S3
    store, no sshd);
    skipped, with the reason, where mount namespaces are not allowed (no root) or the Hadoop jars
    are missing (``make hadoop-jars``)."""
    reason = unavailable() or hadoop_daemons.unavailable()
    if reason:
        pytest.skip(reason)
    rig = Rig(tmp_path_factory.mktemp("hadoop-rig"), services=("spark",))
    hadoop = hadoop_daemons.Hadoop(rig, yarn=True)
    hadoop.write_conf()  # before the Spark workers start: their executors inherit HADOOP_CONF_DIR
    with rig:
        hadoop.start()
        yield rig, hadoop
        hadoop.stop()
