"""prepare -> train -> predict -> evaluate on the rig with every location an s3:// URL.

The driver runs on ``login``; Spark executors and the Horovod workers run on ``worker1`` and
``worker2``, which never see login's files. Each host finds its S3 keys in its own
``~/.aws/credentials`` (written here as a cluster admin would); nothing passes them along.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Iterator

import pytest

from tests import devdata
from tests.rig import ADDRESSES, WORKERS, Rig, write_aws_files

pytestmark = [pytest.mark.multihost, pytest.mark.spark]

BUCKET = "rs-storage-loop"  # one bucket, one prefix per test (SeaweedFS fits few buckets)
XIAMEN = "xiamen_robosat_z18"  # georeferenced (EPSG:3857): the masks must keep it
INRIA = "inria_austin_chicago"


def _snapshot(folder: Path) -> set[str]:
    """Every path under ``folder`` but Keras's own settings file (``~/.keras/keras.json``, which
    Keras writes at its first import on any host: no part of a job)."""
    if not folder.exists():
        return set()
    return {rel for p in folder.rglob("*")
            if not (rel := str(p.relative_to(folder))).startswith(".keras")}


def rig_bucket(rig: Rig, bucket: str):
    """A pyarrow S3 filesystem on the rig's store, with the test's own ``bucket`` created."""
    import pyarrow.fs as pafs

    s3 = pafs.S3FileSystem(access_key=rig.s3.access_key, secret_key=rig.s3.secret_key,
                           endpoint_override=rig.s3.endpoint, scheme="http", region=rig.s3.region,
                           allow_bucket_creation=True)
    s3.create_dir(bucket)
    return s3


@pytest.fixture(scope="module")
def store(rig):
    """The bucket, and every host's own AWS files with the rig's keys; removed afterwards."""
    s3 = rig_bucket(rig, BUCKET)
    hosts = ("login", *WORKERS)
    for name in hosts:
        write_aws_files(rig.host(name).home, rig.s3)
    yield s3
    for name in hosts:
        shutil.rmtree(rig.host(name).home / ".aws", ignore_errors=True)


def _upload_pairs(s3, prefix: str, picks: dict[str, list[str]]) -> None:
    for name, files in picks.items():
        src = devdata.subset(name)
        for f in files:
            for kind, folder in (("images", "images"), ("masks", "gt")):
                with s3.open_output_stream(f"{BUCKET}/{prefix}/inputs/{kind}/{f}") as out:
                    out.write((src / folder / f).read_bytes())


def _rs(rig: Rig, stage: str, *args: str, timeout: float = 240, spark: bool = True,
        master: list[str] | None = None) -> subprocess.CompletedProcess[str]:
    """``rs-cluster <stage>`` on login, events in login's temp folder; a Spark stage on the rig's
    standalone master, or on ``master`` (its --master and --spark-conf options)."""
    login = rig.host("login")
    events = login.tmp / f"events-{stage}.jsonl"
    events.unlink(missing_ok=True)
    spark_args = []
    if spark:
        spark_args = master or ["--master", rig.master_url]
        for conf in (f"spark.driver.host={ADDRESSES['login']}",
                     f"spark.driver.bindAddress={ADDRESSES['login']}",
                     "spark.executor.memory=512m", "spark.ui.enabled=false",
                     "spark.scheduler.minRegisteredResourcesRatio=1.0",
                     "spark.scheduler.maxRegisteredResourcesWaitingTime=60s",
                     # The driver's event log (on login) says which host ran each task.
                     "spark.eventLog.enabled=true",
                     f"spark.eventLog.dir=file://{login.tmp / 'spark-events'}"):
            spark_args += ["--spark-conf", conf]
    (login.tmp / "spark-events").mkdir(exist_ok=True)
    return login.run([str(rig.python), "-m", "rs_cluster", "--events", str(events), stage,
                      *args, *spark_args], env=rig.driver_env(), timeout=timeout, check=False)


def spark_applications(rig: Rig) -> Iterator[tuple[str, list[dict]]]:
    """(application name, its listener events) of each Spark event log on login."""
    for log in (rig.host("login").tmp / "spark-events").iterdir():
        events = [json.loads(line) for line in log.read_text().splitlines()]
        yield next((e["App Name"] for e in events
                    if e["Event"] == "SparkListenerApplicationStart"), ""), events


def _task_hosts(rig: Rig) -> dict[str, set[str]]:
    """{Spark application name: addresses of the executors that ran its tasks}."""
    out: dict[str, set[str]] = {}
    for name, events in spark_applications(rig):
        out.setdefault(name, set()).update(e["Task Info"]["Host"] for e in events
                                           if e["Event"] == "SparkListenerTaskEnd")
    return out


def run_the_loop(rig: Rig, job: str, master: list[str] | None = None) -> None:
    """prepare -> train (2 Horovod workers) -> predict -> evaluate on ``job``'s inputs, each
    location under the URL ``job``; the driver on login, the tasks on the workers (of the rig's
    standalone master, or of ``master``: see :func:`_rs`)."""
    prepare = _rs(rig, "prepare", "--images", f"{job}/inputs/images", "--masks",
                  f"{job}/inputs/masks", "--output", f"{job}/dataset", "--tile-size", "128",
                  "--split", "0.5,0.25,0.25", master=master)
    assert prepare.returncode == 0, prepare.stderr[-3000:]
    train = _rs(rig, "train", "--data", f"{job}/dataset", "--model-dir", f"{job}/model",
                "--epochs", "1", "--base-filters", "8", "--batch-size", "4", "--num-proc", "2",
                "--nics", "lo", "--arch", "unet2019",
                "--previews", str(rig.host("login").tmp / "previews"), timeout=400, master=master)
    assert train.returncode == 0, train.stderr[-3000:]
    predict = _rs(rig, "predict", "--model", f"{job}/model", "--input", f"{job}/inputs/images",
                  "--output", f"{job}/masks", "--polygons", master=master)
    assert predict.returncode == 0, predict.stderr[-3000:]
    evaluate = _rs(rig, "evaluate", "--pred", f"{job}/masks", "--truth", f"{job}/inputs/masks",
                   "--json", f"{job}/report.json", spark=False)
    assert evaluate.returncode == 0, evaluate.stderr[-3000:]


def assert_tasks_ran_on_the_workers_only(rig: Rig) -> None:
    """Each worker host ran part of every Spark stage, the Horovod training included; the
    driver's host ran none."""
    hosts = _task_hosts(rig)
    workers = {ADDRESSES[w] for w in WORKERS}
    for app in ("rs-cluster prepare", "rs-cluster train", "rs-cluster predict"):
        assert hosts.get(app) == workers, f"{app} ran its tasks on {hosts.get(app)}"


def test_the_whole_loop_runs_on_both_workers_with_every_location_in_s3(rig, store):
    import rasterio

    s3 = store
    picks = {XIAMEN: devdata.first_files(XIAMEN, 2), INRIA: devdata.first_files(INRIA, 2)}
    _upload_pairs(s3, "loop", picks)
    job = f"s3://{BUCKET}/loop"
    before = {name: (_snapshot(rig.host(name).home), _snapshot(rig.host(name).workspace))
              for name in ("login", *WORKERS)}

    run_the_loop(rig, job)

    # Everything the job made is in the store.
    keys = {info.path.removeprefix(f"{BUCKET}/loop/") for info in
            s3.get_file_info(pafs_selector(f"{BUCKET}/loop")) if info.is_file}
    assert {"dataset/dataset.json", "model/model.json", "model/model.keras",
            "masks/predict.json", "report.json"} <= keys
    assert any(k.startswith("dataset/train/part-") for k in keys)
    stems = [Path(f).stem for files in picks.values() for f in files]
    assert {f"masks/{s}_mask.tif" for s in stems} | {f"masks/{s}_buildings.gpkg" for s in stems} <= keys
    assert not [k for k in keys if "/." in k or k.startswith(".")], "a hidden partial was left"
    card = json.loads(s3.open_input_stream(f"{BUCKET}/loop/model/model.json").read())
    assert card["world_size"] == 2 and card["dataset"]["path"] == f"{job}/dataset"
    report = json.loads(s3.open_input_stream(f"{BUCKET}/loop/report.json").read())
    assert report["pooled"]["images"] == 4 and report["predictions"] == f"{job}/masks"

    # The mask keeps its source's CRS and transform.
    xiamen = picks[XIAMEN][0]
    with rasterio.open(devdata.subset(XIAMEN) / "images" / xiamen) as src:
        crs, transform = src.crs, src.transform
    mask_bytes = s3.open_input_stream(f"{BUCKET}/loop/masks/{Path(xiamen).stem}_mask.tif").read()
    with rasterio.MemoryFile(mask_bytes) as mem, mem.open() as mask:
        assert mask.crs == crs and mask.transform.almost_equals(transform)

    assert_tasks_ran_on_the_workers_only(rig)

    # What the analyst is shown of the training: where it ran, and rank 0's preview, drawn on a
    # worker, synced to the store and copied from there by the driver on login.
    login = rig.host("login")
    train_events = [json.loads(x) for x in (login.tmp / "events-train.jsonl").read_text().splitlines()]
    resources = [e["resources"] for e in train_events if "resources" in e]
    assert resources and resources[-1]["master"] == rig.master_url
    assert (resources[-1]["workers"], resources[-1]["executors"]) == (2, 2)
    assert resources[-1]["storage"] == job  # the model's folder in the store, no key
    previews = [e["preview"] for e in train_events if "preview" in e]
    assert previews and Path(previews[-1]).name == "epoch-0001.png"
    copied = login.tmp / "previews" / "epoch-0001.png"
    assert copied.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")

    # Nothing of the job landed in a host's own folders; the temporary copies are gone too.
    for name in ("login", *WORKERS):
        host = rig.host(name)
        assert (_snapshot(host.home), _snapshot(host.workspace)) == before[name], name
        assert not list(host.tmp.glob("rs-cluster-*")), f"{name} kept temporary copies"


def pafs_selector(path: str):
    import pyarrow.fs as pafs

    return pafs.FileSelector(path, recursive=True)


def test_wrong_credentials_on_login_fail_naming_the_url_not_the_secret(rig, store):
    login = rig.host("login")
    wrong_secret = "wrong-" + rig.s3.secret_key[::-1]
    write_aws_files(login.home, rig.s3, secret_key=wrong_secret)
    job = f"s3://{BUCKET}/denied"
    try:
        result = _rs(rig, "prepare", "--images", f"{job}/inputs/images", "--masks",
                     f"{job}/inputs/masks", "--output", f"{job}/dataset", timeout=120)
    finally:
        write_aws_files(login.home, rig.s3)

    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines[-1].startswith("rs-cluster prepare: error: s3://"), result.stderr[-2000:]
    assert "access denied" in lines[-1] and "credentials" in lines[-1]
    assert "Traceback" not in result.stderr
    events = (login.tmp / "events-prepare.jsonl").read_text()
    for text in (result.stderr, result.stdout, events):
        assert wrong_secret not in text and rig.s3.secret_key not in text


def test_one_raster_predicted_in_bands_on_both_workers_equals_one_task(rig, store):
    """One georeferenced raster in the store, cut into 4 bands of rows: the bands run as tasks on
    both worker hosts, which share nothing but the store; the joined mask and probabilities equal
    those of one task, pixel for pixel, and no part is left in the store."""
    import numpy as np
    import rasterio

    s3 = store
    austin = devdata.subset("deeposlandia_georef_samples") / "images" / "inria_austin_sample.tif"
    with s3.open_output_stream(f"{BUCKET}/bands/inputs/austin.tif") as out:
        out.write(austin.read_bytes())
    job = f"s3://{BUCKET}/bands"
    logs = rig.host("login").tmp / "spark-events"
    before = set(logs.iterdir()) if logs.exists() else set()
    for name, band_rows in (("banded", "256"), ("whole", "0")):
        # the built-in model: each worker loads its own installation's copy
        done = _rs(rig, "predict", "--model", "builtin", "--input", f"{job}/inputs/austin.tif",
                   "--output", f"{job}/{name}", "--probabilities", "--band-rows", band_rows,
                   timeout=400)
        assert done.returncode == 0, done.stderr[-3000:]
        if name == "banded":
            runs = [json.loads(line) for log in logs.iterdir() if log not in before
                    for line in log.read_text().splitlines()]
            hosts = {e["Task Info"]["Host"] for e in runs if e["Event"] == "SparkListenerTaskEnd"}
            assert hosts == {ADDRESSES[w] for w in WORKERS}

    def read(key: str) -> tuple:
        data = s3.open_input_stream(f"{BUCKET}/bands/{key}").read()
        with rasterio.MemoryFile(data) as mem, mem.open() as src:
            return src.read(1), src.dataset_mask(), src.crs, src.transform, src.overviews(1)

    for output in ("austin_mask.tif", "austin_prob.tif"):
        joined, one = read(f"banded/{output}"), read(f"whole/{output}")
        np.testing.assert_array_equal(joined[0], one[0])
        np.testing.assert_array_equal(joined[1], one[1])
        assert joined[2:] == one[2:]
    with rasterio.open(austin) as src:
        assert one[2] == src.crs and one[3] == src.transform
    keys = sorted(info.path.removeprefix(f"{BUCKET}/bands/banded/") for info in
                  s3.get_file_info(pafs_selector(f"{BUCKET}/bands/banded")) if info.is_file)
    assert keys == ["austin_mask.tif", "austin_prob.tif", "predict.json"]
    recorded = json.loads(s3.open_input_stream(f"{BUCKET}/bands/banded/predict.json").read())
    assert recorded["outputs"][0]["bands"] == 4
    assert recorded["outputs"][0]["mask"] == f"{job}/banded/austin_mask.tif"
