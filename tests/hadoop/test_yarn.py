"""Spark on YARN: the stages run in containers that real NodeManagers start on the worker hosts,
scheduled by a real ResourceManager on ``master`` (tests/hadoop_daemons.py), with every location
an hdfs:// URL. The driver (the job runner's step) stays on ``login``, in YARN's client mode, the
way ``spark-submit --master yarn`` runs a notebook or a login-node job.

The rig's nodes have the venv at the same path, so executors run it directly
(``PYSPARK_PYTHON``) and Spark's jars are read in place (``spark.yarn.jars=local:...``); a cluster
whose nodes lack the install ships a packed venv with ``spark.archives`` instead, which is not
tested here (README).
"""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path

import pytest

from tests import devdata
from tests.hadoop.test_hdfs import _py, upload_pairs
from tests.multihost.test_storage_loop import (
    INRIA,
    XIAMEN,
    _task_hosts,
    run_the_loop,
    spark_applications,
)
from tests.rig import ADDRESSES, WORKERS

pytestmark = [pytest.mark.hadoop, pytest.mark.multihost, pytest.mark.spark, pytest.mark.slow]

QUEUE = "analysts"


def yarn_master(rig) -> list[str]:
    """--master yarn and the settings a site's spark-defaults.conf would hold for it."""
    jars = Path(rig.spark_home) / "jars"
    args = ["--master", "yarn", "--queue", QUEUE]
    for conf in (f"spark.yarn.jars=local:{jars}/*", "spark.yarn.am.memory=512m",
                 "spark.executor.instances=2", "spark.executor.cores=1"):
        args += ["--spark-conf", conf]
    return args


def _applications(hadoop) -> list[dict]:
    with urllib.request.urlopen(f"{hadoop.resourcemanager_web}/ws/v1/cluster/apps",
                                timeout=10) as answer:  # noqa: S310 - the rig's ResourceManager
        apps = json.load(answer)["apps"]
    return apps["app"] if apps else []


def _executor_containers(rig) -> dict[str, set[str]]:
    """{Spark application name: the YARN containers its executors ran in} from the event logs."""
    out: dict[str, set[str]] = {}
    for name, events in spark_applications(rig):
        out.setdefault(name, set()).update(
            e["Executor Info"].get("Attributes", {}).get("CONTAINER_ID", "") for e in events
            if e["Event"] == "SparkListenerExecutorAdded")
    return out


def test_the_whole_loop_runs_in_yarn_containers_on_both_workers_in_the_queue_asked_for(hdfs_rig):
    rig, hadoop = hdfs_rig
    for old in (rig.host("login").tmp / "spark-events").glob("*"):
        old.unlink()  # only this test's applications
    picks = {XIAMEN: devdata.first_files(XIAMEN, 2), INRIA: devdata.first_files(INRIA, 1)}
    job = f"{hadoop.url}/user/rs/yarn-loop"
    upload_pairs(rig, job, picks)

    run_the_loop(rig, job, master=yarn_master(rig))

    out = json.loads(_py(rig, "login", f"""
        import json
        from rs_cluster import storage
        print(json.dumps({{"card": storage.read_json("{job}/model/model.json"),
                          "report": storage.read_json("{job}/report.json")}}))
    """).stdout.strip().splitlines()[-1])
    assert out["card"]["world_size"] == 2
    assert out["report"]["pooled"]["images"] == 3
    # Every stage's tasks ran on the two worker hosts, in containers of YARN's, none on login.
    hosts, containers = _task_hosts(rig), _executor_containers(rig)
    workers = {ADDRESSES[w] for w in WORKERS}
    for app in ("rs-cluster prepare", "rs-cluster train", "rs-cluster predict"):
        assert hosts.get(app) == workers, f"{app} ran its tasks on {hosts.get(app)}"
        assert containers[app] and all(c.startswith("container_") for c in containers[app]), app
    ran = {a["name"]: a for a in _applications(hadoop)}
    for app in ("rs-cluster prepare", "rs-cluster train", "rs-cluster predict"):
        assert ran[app]["queue"] == QUEUE and ran[app]["finalStatus"] == "SUCCEEDED", ran[app]


def _container_pids(host) -> list[int]:
    """The processes YARN containers run on ``host`` (the executors and their Python workers)."""
    found = []
    for pid in host.pids():
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes()
        except OSError:
            continue
        if b"\0CONTAINER_ID=container_" in b"\0" + environ:
            found.append(pid)
    return found


def test_a_nodemanager_lost_during_training_restarts_the_workers_from_the_hdfs_checkpoint(
        hdfs_rig):
    import os
    import signal
    import time

    from tests.multihost.test_storage_loop import _rs

    rig, hadoop = hdfs_rig
    job = f"{hadoop.url}/user/rs/yarn-lost-node"
    upload_pairs(rig, job, {XIAMEN: devdata.first_files(XIAMEN, 3)})
    prepare = _rs(rig, "prepare", "--images", f"{job}/inputs/images", "--masks",
                  f"{job}/inputs/masks", "--output", f"{job}/dataset", "--tile-size", "128",
                  "--split", "0.67,0.33,0")  # on the standalone master: only the data matters
    assert prepare.returncode == 0, prepare.stderr[-3000:]
    epochs = 4
    login = rig.host("login")
    events = login.tmp / "events-train-lost-node.jsonl"
    argv = [str(rig.python), "-m", "rs_cluster", "--events", str(events), "train", "--data",
            f"{job}/dataset", "--model-dir", f"{job}/model", "--epochs", str(epochs),
            "--base-filters", "8", "--batch-size", "4", "--num-proc", "2", "--nics", "lo",
            "--arch", "unet2019", "--max-restarts", "2", *yarn_master(rig),
            "--spark-conf", f"spark.driver.host={ADDRESSES['login']}",
            "--spark-conf", f"spark.driver.bindAddress={ADDRESSES['login']}",
            "--spark-conf", "spark.executor.memory=512m", "--spark-conf", "spark.ui.enabled=false",
            "--spark-conf", "spark.scheduler.minRegisteredResourcesRatio=1.0"]
    train = login.popen(argv, log=login.logs / "train-lost-node.log", env=rig.driver_env())
    state = f"{job}/.model.training/state.json"

    def epochs_done() -> int:
        out = _py(rig, "login", f"""
            from rs_cluster import storage
            print(storage.read_json("{state}")["epochs_done"] if storage.is_file("{state}") else 0)
        """).stdout.strip().splitlines()[-1]
        return int(out)

    deadline = time.monotonic() + 400
    while epochs_done() < 1:
        assert train.poll() is None, (login.logs / "train-lost-node.log").read_text()[-3000:]
        assert time.monotonic() < deadline, "no checkpoint in HDFS after 400 s"
        time.sleep(2)
    # The worker host that does not run the application master loses its NodeManager and
    # every container on it, as a crashed node would; the DataNode there stays up.
    app = next(a for a in _applications(hadoop)
               if a["name"] == "rs-cluster train" and a["state"] == "RUNNING")
    am_host = app["amHostHttpAddress"].rsplit(":", 1)[0]
    lost = next(w for w in WORKERS if ADDRESSES[w] != am_host)
    killed_after = epochs_done()
    hadoop.kill_daemon(f"nodemanager-{lost}")
    for pid in _container_pids(rig.host(lost)):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    assert killed_after < epochs, "training finished before the node could be lost"

    code = train.wait(timeout=900)
    log = (login.logs / "train-lost-node.log").read_text()
    assert code == 0, log[-4000:]
    warnings = [json.loads(line) for line in events.read_text().splitlines()
                if '"warning"' in line and '"restart"' in line]
    assert len(warnings) >= 1 and warnings[0]["resume_epoch"] >= killed_after, warnings
    card = json.loads(_py(rig, "login", f"""
        import json
        from rs_cluster import storage
        print(json.dumps(storage.read_json("{job}/model/model.json")))
    """).stdout.strip().splitlines()[-1])
    assert card["world_size"] == 2 and card["training"]["epochs_run"] == epochs
    assert card["training"]["restarts_after_lost_worker"][0] >= killed_after
    hadoop.start_daemon(f"nodemanager-{lost}")
    hadoop.wait_yarn(120)
