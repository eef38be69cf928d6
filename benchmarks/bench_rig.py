"""prepare and predict on the multi-host rig: 2 workers against 1, and prepare to S3 against local disk.

Every run is the real ``rs-cluster prepare`` or ``rs-cluster predict`` on the rig's ``login`` host
(the driver) against the rig's Spark master, whose two workers (``worker1``, ``worker2``, one core
each) run the tasks and never see login's files. The inputs (real dev rasters) and the model sit in
the rig's shared folder, which every host mounts at the same path (as NFS would); each host reads
its S3 keys from its own ``~/.aws`` files. In one run, on the same data:

* workers: the same command limited to one core (``--max-cores 1``: one executor, on one worker)
  and to two (one executor on each worker), output to the rig's S3 store (SeaweedFS). The Spark
  event log of every run tells which hosts ran its tasks; the figure counts only if the 1-worker
  runs used one host and the 2-worker runs both. Baseline: the 1-worker run.
* storage: prepare on two workers writing its dataset to ``s3://`` against ``file://`` on the
  shared folder (a POSIX filesystem every host mounts). Baseline: the shared folder.

Each measurement is repeated (``--repeats``, at least 2), interleaved, and the fastest run counts;
its time is the whole command (JVM and executor start-up included), with the span of its Spark
jobs from the event log printed beside it. The rig's hosts share this machine's CPUs, so unless
``--no-pin`` each worker host is pinned to a CPU of its own: a 1-core worker then has one CPU, as
on a real cluster, instead of TensorFlow's threads spreading over every CPU of the machine. Other
work on the machine shows in the load averages printed with each run. Needs root (mount
namespaces); without it, says why and exits 0.

    .venv/bin/python benchmarks/bench_rig.py [--repeats N] [--prepare-subsets a,b] [--predict-subsets a,b]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "cluster_side"))

from benchmarks.bench_prepare import DEFAULT_SUBSETS as PREPARE_SUBSETS  # noqa: E402
from tests import devdata  # noqa: E402
from tests.rig import ADDRESSES, WORKERS, Rig, write_aws_files  # noqa: E402
from tests.rig import unavailable as rig_unavailable  # noqa: E402

PREDICT_SUBSETS = ("whu_satellite",)  # 16 rasters of 512x512: tasks of equal size
BUCKET = "rs-bench-rig"
HOST_OF = {address: name for name, address in ADDRESSES.items()}


@dataclass(frozen=True)
class Run:
    """One command's outcome: wall seconds, its Spark jobs' span, where its tasks ran."""

    label: str
    seconds: float
    spark_seconds: float
    hosts: frozenset[str]
    tasks: int
    load: float  # 1-minute load average when it started
    tiles: int = 0


def copy_pairs(data: Path, subsets: list[str], dest: Path) -> int:
    """Copies every image/mask pair of ``subsets`` into ``dest/images`` and ``dest/masks``, named
    ``<subset>__<file>`` (names repeat across subsets); returns the number of pairs."""
    (dest / "images").mkdir(parents=True)
    (dest / "masks").mkdir(parents=True)
    count = 0
    for name in subsets:
        for image in sorted((data / name / "images").iterdir()):
            if image.is_file():
                shutil.copyfile(image, dest / "images" / f"{name}__{image.name}")
                shutil.copyfile(data / name / "gt" / image.name, dest / "masks" / f"{name}__{image.name}")
                count += 1
    return count


def pin_workers(rig: Rig) -> str:
    """Pins every thread on each worker host to one CPU of its own (what the worker daemons start
    later inherits it); returns what was done, in words."""
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < len(WORKERS):
        return f"workers not pinned: this process may use only {len(cpus)} CPU(s)"
    for name, cpu in zip(WORKERS, cpus):
        for pid in rig.host(name).pids():
            for tid in os.listdir(f"/proc/{pid}/task"):
                try:
                    os.sched_setaffinity(int(tid), {cpu})
                except (ProcessLookupError, PermissionError):
                    pass  # a thread that ended meanwhile
    return ", ".join(f"{name} -> CPU {cpu}" for name, cpu in zip(WORKERS, cpus)) + \
        f" (of {len(cpus)}); login, master and storage unpinned"


def aws_files(rig: Rig) -> None:
    """login's and the workers' own ~/.aws files with the rig's keys and endpoint."""
    assert rig.s3 is not None
    for name in ("login", *WORKERS):
        write_aws_files(rig.host(name).home, rig.s3)


def bucket(rig: Rig):
    import pyarrow.fs as pafs

    assert rig.s3 is not None
    s3 = pafs.S3FileSystem(access_key=rig.s3.access_key, secret_key=rig.s3.secret_key,
                           endpoint_override=rig.s3.endpoint, scheme="http", region=rig.s3.region,
                           allow_bucket_creation=True)
    s3.create_dir(BUCKET)
    return s3


def spark_events(folder: Path) -> Iterator[dict]:
    """Every listener event of the Spark event logs in ``folder``."""
    for log in folder.iterdir():
        for line in log.read_text().splitlines():
            yield json.loads(line)


def event_summary(folder: Path) -> tuple[frozenset[str], float, int]:
    """(hosts that ran tasks, seconds from the first job submitted to the last one done, tasks)
    from the Spark event logs in ``folder`` (one application)."""
    hosts, starts, ends, tasks = set(), [], [], 0
    for event in spark_events(folder):
        kind = event["Event"]
        if kind == "SparkListenerTaskEnd":
            hosts.add(HOST_OF.get(event["Task Info"]["Host"], event["Task Info"]["Host"]))
            tasks += 1
        elif kind == "SparkListenerJobStart":
            starts.append(event["Submission Time"])
        elif kind == "SparkListenerJobEnd":
            ends.append(event["Completion Time"])
    span = (max(ends) - min(starts)) / 1000 if starts and ends else float("nan")
    return frozenset(hosts), span, tasks


def run_stage(rig: Rig, label: str, stage: str, args: list[str], cores: int) -> Run:
    """``rs-cluster <stage> ARGS --max-cores CORES`` on login against the rig's master."""
    login = rig.host("login")
    events = login.tmp / "spark-events" / f"{label.replace(' ', '-')}-{time.monotonic_ns()}"
    events.mkdir(parents=True)
    spark = ["--master", rig.master_url, "--max-cores", str(cores), "--executor-memory", "512m"]
    for conf in (f"spark.driver.host={ADDRESSES['login']}",
                 f"spark.driver.bindAddress={ADDRESSES['login']}", "spark.ui.enabled=false",
                 # Tasks start only once every core asked for has an executor.
                 "spark.scheduler.minRegisteredResourcesRatio=1.0",
                 "spark.scheduler.maxRegisteredResourcesWaitingTime=60s",
                 "spark.eventLog.enabled=true", f"spark.eventLog.dir=file://{events}"):
        spark += ["--spark-conf", conf]
    load = os.getloadavg()[0]
    started = time.monotonic()
    result = login.run([str(rig.python), "-m", "rs_cluster", "-q", stage, *args, *spark, "--json"],
                       env=rig.driver_env({"TF_CPP_MIN_LOG_LEVEL": "2"}), timeout=900, check=False)
    seconds = time.monotonic() - started
    if result.returncode != 0:
        raise SystemExit(f"bench_rig: {label} failed ({result.returncode}):\n{result.stderr[-3000:]}")
    out = json.loads(result.stdout)
    if out.get("failures") or out.get("skipped"):
        raise SystemExit(f"bench_rig: {label} left inputs out: {out.get('failures') or out['skipped']}")
    hosts, spark_seconds, tasks = event_summary(events)
    return Run(label, seconds, spark_seconds, hosts, tasks, load,
               tiles=sum(out.get("tiles", {}).values()))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=devdata.DEV_DATA)
    parser.add_argument("--prepare-subsets", default=",".join(PREPARE_SUBSETS))
    parser.add_argument("--predict-subsets", default=",".join(PREDICT_SUBSETS))
    parser.add_argument("--repeats", type=int, default=2, help="runs of each measurement (>= 2)")
    parser.add_argument("--no-pin", action="store_true",
                        help="let every worker host use all of this machine's CPUs")
    args = parser.parse_args()
    if args.repeats < 2:
        parser.error("--repeats must be at least 2")
    reason = rig_unavailable()
    if reason:
        print(f"bench_rig: skipped: {reason}")
        return 0
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from benchmarks.bench_predict import build_model

    print(f"bench_rig: {os.cpu_count()} CPUs, load average (1/5/15 min) at start: "
          + " ".join(f"{x:.2f}" for x in os.getloadavg()))
    begun = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="bench-rig-") as tmp:
        rig = Rig(Path(tmp) / "rig", services=("storage", "spark"))
        with rig:
            print(f"rig up in {time.monotonic() - begun:.1f} s: master {rig.master_url}, "
                  f"S3 {rig.s3.url if rig.s3 else '-'}")
            print("pinning: " + ("none (--no-pin)" if args.no_pin else pin_workers(rig)))
            aws_files(rig)
            s3 = bucket(rig)
            shared = rig.shared / "bench"
            pairs = copy_pairs(args.data, args.prepare_subsets.split(","), shared / "prepare")
            images = shared / "predict"
            images.mkdir(parents=True)
            for name in args.predict_subsets.split(","):
                for f in devdata.first_files(name, 10_000):
                    shutil.copyfile(devdata.subset(name) / "images" / f, images / f"{name}__{f}")
            build_model(shared / "model")
            prepare_in = ["--images", str(shared / "prepare" / "images"), "--masks",
                          str(shared / "prepare" / "masks"), "--tile-size", "128"]

            def prepare(label: str, output: str, cores: int) -> Run:
                run = run_stage(rig, label, "prepare", [*prepare_in, "--output", output], cores)
                if output.startswith("s3://"):  # SeaweedFS's volumes are small: free them again
                    s3.delete_dir(output[len("s3://"):])
                else:
                    shutil.rmtree(output[len("file://"):])
                return run

            def predict(label: str, output: str, cores: int) -> Run:
                run = run_stage(rig, label, "predict", ["--model", str(shared / "model"), "--input",
                                                        str(images), "--output", output], cores)
                s3.delete_dir(output[len("s3://"):])
                return run

            print(f"prepare: {pairs} image/mask pairs ({args.prepare_subsets}), tile 128 px; "
                  f"predict: {len(list(images.iterdir()))} rasters ({args.predict_subsets}), "
                  "U-Net 8 filters, depth 2, random weights; inputs and model in the shared folder")
            print(f"{'run':34} {'seconds':>8} {'in Spark':>9} {'tasks':>6}  {'ran on':18} {'load':>5}")
            runs: dict[str, list[Run]] = {}
            measurements = [
                ("prepare 1 worker -> S3", lambda i: prepare("prepare-1w-s3", f"s3://{BUCKET}/p1-{i}", 1)),
                ("prepare 2 workers -> S3", lambda i: prepare("prepare-2w-s3", f"s3://{BUCKET}/p2-{i}", 2)),
                ("prepare 2 workers -> shared disk",
                 lambda i: prepare("prepare-2w-local", f"file://{shared}/tiles-{i}", 2)),
                ("predict 1 worker -> S3", lambda i: predict("predict-1w", f"s3://{BUCKET}/m1-{i}", 1)),
                ("predict 2 workers -> S3", lambda i: predict("predict-2w", f"s3://{BUCKET}/m2-{i}", 2)),
            ]
            for i in range(args.repeats):
                for name, measure in measurements:
                    run = measure(i)
                    runs.setdefault(name, []).append(run)
                    print(f"{name + f' #{i + 1}':34} {run.seconds:8.1f} {run.spark_seconds:9.1f} "
                          f"{run.tasks:6d}  {','.join(sorted(run.hosts)):18} {run.load:5.2f}",
                          flush=True)
    total = time.monotonic() - begun
    best = {name: min(rs, key=lambda r: r.seconds) for name, rs in runs.items()}
    ok_hosts = all(len(r.hosts) == 1 for n, rs in runs.items() if "1 worker" in n for r in rs) and \
        all(r.hosts == frozenset(WORKERS) for n, rs in runs.items() if "2 workers" in n for r in rs)

    def verdict(ratio: float, target: float) -> str:
        return "met" if ratio >= target else "NOT met"

    print(f"\nresults: fastest of {args.repeats} runs each (median in brackets); seconds are the "
          "whole command, JVM and executor start-up included")
    for stage in ("prepare", "predict"):
        one, two = best[f"{stage} 1 worker -> S3"], best[f"{stage} 2 workers -> S3"]
        med1 = statistics.median(r.seconds for r in runs[f"{stage} 1 worker -> S3"])
        med2 = statistics.median(r.seconds for r in runs[f"{stage} 2 workers -> S3"])
        ratio = one.seconds / two.seconds
        print(f"  {stage} -> S3: 1 worker {one.seconds:.1f} s ({med1:.1f}), 2 workers "
              f"{two.seconds:.1f} s ({med2:.1f}); 2 workers vs 1: {ratio:.2f}x (target >= 1.5x): "
              f"{verdict(ratio, 1.5)}; Spark jobs alone: {one.spark_seconds / two.spark_seconds:.2f}x")
    local, remote = best["prepare 2 workers -> shared disk"], best["prepare 2 workers -> S3"]
    ratio = local.seconds / remote.seconds
    print(f"  prepare, 2 workers: shared disk {local.seconds:.1f} s "
          f"({local.tiles / local.seconds:.0f} tiles/s), S3 {remote.seconds:.1f} s "
          f"({remote.tiles / remote.seconds:.0f} tiles/s); S3 throughput vs shared disk: "
          f"{ratio:.2f}x (target >= 0.8x): {verdict(ratio, 0.8)}")
    print("  tasks ran on: 1-worker runs "
          f"{sorted({h for n, rs in runs.items() if '1 worker' in n for r in rs for h in r.hosts})}"
          f" (one host each), 2-worker runs "
          f"{sorted({h for n, rs in runs.items() if '2 workers' in n for r in rs for h in r.hosts})}: "
          + ("as intended" if ok_hosts else "NOT as intended: the worker ratios do not count"))
    print("  load average (1/5/15 min) at the end: "
          + " ".join(f"{x:.2f}" for x in os.getloadavg())
          + f" on {os.cpu_count()} CPUs; whole benchmark {total:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
