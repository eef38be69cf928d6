"""prepare -> train -> predict -> evaluate with every location an hdfs:// URL on real HDFS
daemons. The driver runs on ``login``; Spark executors and the Horovod workers run on
``worker1`` and ``worker2`` (which are also the DataNodes); nobody sees another host's folders.
Each host finds HDFS through its own ``$HADOOP_CONF_DIR``; no setting travels with the job."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests import devdata
from tests.hadoop.test_hdfs import _py, upload_pairs
from tests.multihost.test_storage_loop import (
    INRIA,
    XIAMEN,
    _snapshot,
    assert_tasks_ran_on_the_workers_only,
    run_the_loop,
)
from tests.rig import WORKERS

pytestmark = [pytest.mark.hadoop, pytest.mark.multihost, pytest.mark.spark, pytest.mark.slow]


def test_the_whole_loop_runs_on_both_workers_with_every_location_in_hdfs(hdfs_rig):
    rig, hadoop = hdfs_rig
    picks = {XIAMEN: devdata.first_files(XIAMEN, 2), INRIA: devdata.first_files(INRIA, 2)}
    job = f"{hadoop.url}/user/rs/loop"
    upload_pairs(rig, job, picks)
    before = {name: (_snapshot(rig.host(name).home), _snapshot(rig.host(name).workspace))
              for name in ("login", *WORKERS)}

    run_the_loop(rig, job)

    # What the job made is in HDFS, whole; the dataset's row count is what prepare reported.
    result = _py(rig, "login", f"""
        import json
        from rs_cluster import storage
        from rs_cluster.dataset import make_tile_reader
        def walk(url, prefix=""):
            for name, is_file in storage.list_dir(url):
                if is_file:
                    yield prefix + name
                else:
                    yield from walk(url + "/" + name, prefix + name + "/")
        meta = storage.read_json("{job}/dataset/dataset.json")
        with make_tile_reader("{job}/dataset/train", fields=["tile_id"]) as reader:
            rows = sum(1 for _ in reader)
        print(json.dumps({{"files": sorted(walk("{job}")), "meta": meta, "rows": rows,
                          "card": storage.read_json("{job}/model/model.json"),
                          "report": storage.read_json("{job}/report.json")}}))
    """, timeout=240)
    out = json.loads(result.stdout.strip().splitlines()[-1])
    files_made = set(out["files"])
    assert {"dataset/dataset.json", "model/model.json", "model/model.keras",
            "masks/predict.json", "report.json"} <= files_made
    stems = [Path(f).stem for names in picks.values() for f in names]
    assert {f"masks/{s}_mask.tif" for s in stems} <= files_made
    assert not [f for f in files_made if "/." in f or f.startswith(".")], "a hidden partial was left"
    assert out["rows"] == out["meta"]["splits"]["train"]["tiles"] > 0
    assert out["card"]["world_size"] == 2 and out["card"]["dataset"]["path"] == f"{job}/dataset"
    assert out["report"]["pooled"]["images"] == 4

    assert_tasks_ran_on_the_workers_only(rig)
    for name in ("login", *WORKERS):
        host = rig.host(name)
        assert (_snapshot(host.home), _snapshot(host.workspace)) == before[name], name
        assert not list(host.tmp.glob("rs-cluster-*")), f"{name} kept temporary copies"


def test_a_datanode_killed_mid_job_leaves_the_job_to_succeed_with_replication_2(hdfs_rig):
    """prepare -> train -> predict -> evaluate on HDFS while worker2's DataNode is killed as the
    training starts: the job succeeds whole on the DataNode left. (Whether one of the job's
    Python writes falls in the seconds before the NameNode drops the dead DataNode is a matter of
    timing; test_hdfs.py's test of writes right after a DataNode dies covers that window.)"""
    import signal
    import threading
    import time

    rig, hadoop = hdfs_rig
    job = f"{hadoop.url}/user/rs/loop-dn-lost"
    upload_pairs(rig, job, {XIAMEN: devdata.first_files(XIAMEN, 2),
                            INRIA: devdata.first_files(INRIA, 1)})
    train_events = rig.host("login").tmp / "events-train.jsonl"
    train_events.unlink(missing_ok=True)
    failure: list[BaseException] = []

    def loop() -> None:
        try:
            run_the_loop(rig, job)
        except BaseException as e:  # noqa: BLE001 - re-raised in the test's thread
            failure.append(e)

    runner = threading.Thread(target=loop, daemon=True)
    runner.start()
    deadline = time.monotonic() + 400
    while not train_events.exists() and runner.is_alive():
        assert time.monotonic() < deadline, "training never started"
        time.sleep(0.5)
    hadoop.kill_daemon("datanode-worker2", signal.SIGKILL)
    try:
        runner.join(900)
    finally:
        hadoop.start_daemon("datanode-worker2")
        hadoop.wait_ready(120)
    assert not runner.is_alive(), "the job did not end in 15 min"
    if failure:
        raise failure[0]
    out = json.loads(_py(rig, "login", f"""
        import json
        from rs_cluster import storage
        print(json.dumps({{"card": storage.read_json("{job}/model/model.json"),
                          "report": storage.read_json("{job}/report.json")}}))
    """).stdout.strip().splitlines()[-1])
    assert out["card"]["world_size"] == 2 and out["report"]["pooled"]["images"] == 3
