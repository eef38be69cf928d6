"""Horovod training on YARN against the standalone Spark master on the same hosts.

One rig (tests/rig.py) runs both cluster managers side by side on the same hosts: a Spark
standalone master on ``master`` with a one-core worker on ``worker1`` and ``worker2``, and real
Hadoop daemons (tests/hadoop_daemons.py): the NameNode and the ResourceManager on ``master``,
a DataNode and a NodeManager on each worker host. Real dev image/mask pairs are uploaded to HDFS
and prepared once (on the standalone master); then the same ``rs-cluster train`` (2 Horovod
workers, the same dataset, seed and steps) runs from ``login`` against (a) the standalone master
(the baseline) and (b) ``--master yarn``, interleaved, ``--repeats`` times each. Model and
checkpoints go to HDFS in both, so only the cluster manager differs.

Each run's ``--events`` file and Spark event log separate start-up from training: start-up is
the command's start to its first training step's progress event (Python and JVM start, the Spark
application and its executors, or on YARN its application master and containers, then Horovod
and TensorFlow); training is that step to the end of the Horovod tasks (epochs, checkpoints to
HDFS, the model written), from the driver's event log; the rest is the driver committing the
model and stopping Spark. Rank 0's own epoch seconds (its metrics events; no checkpoints) are
printed too. (Rank 0 relays its events through HDFS at most once a second, and its last ones
only when it closes, so the progress events do not time the end of training.) The
ratio that counts is training after start-up, standalone / YARN (target >= 0.9x); start-up
times are printed beside it. The rig's nodes have the venv at the same path, so executors use it
in place and ``spark.archives`` (shipping a packed venv) is not used: the ratio measures YARN's
containers only, not archive shipping (untested here, README).

The hosts share this machine's CPUs, so unless ``--no-pin`` each worker host (its Spark worker,
DataNode and NodeManager, and what they start) is pinned to a CPU of its own, as bench_rig.py
does. YARN is asked for executor containers too big to share a NodeManager, so its two executors
land one per worker host, as the standalone workers' do; where each run's tasks ran is printed.
Needs root (mount namespaces) and the Hadoop jars (``make hadoop-jars``); without them, says why
and exits 0.

    .venv/bin/python benchmarks/bench_yarn.py [--repeats N] [--pairs N] [--epochs N]
        [--steps-per-epoch N] [--no-pin]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.bench_rig import HOST_OF, pin_workers, spark_events  # noqa: E402
from tests import devdata  # noqa: E402
from tests.hadoop.test_hdfs import upload_pairs  # noqa: E402
from tests.hadoop.test_yarn import yarn_master  # noqa: E402
from tests.hadoop_daemons import NODE_MEMORY_MB, Hadoop  # noqa: E402
from tests.hadoop_daemons import unavailable as hadoop_unavailable  # noqa: E402
from tests.rig import ADDRESSES, WORKERS, Rig  # noqa: E402
from tests.rig import unavailable as rig_unavailable  # noqa: E402

SUBSET = "xiamen_robosat_z18"  # 256x256 px, georeferenced: 4 tiles of 128 px each
EXECUTOR_MEMORY_MB = 512
# On YARN a container holds the executor's heap plus this overhead, which is where its Python
# workers and TensorFlow live (outside the JVM). Sized so that two executors do not fit on one
# NodeManager: each worker host then gets one, as with the standalone workers.
YARN_OVERHEAD_MB = NODE_MEMORY_MB // 2 - EXECUTOR_MEMORY_MB + 64
BASELINE, YARN = "standalone", "YARN"


@dataclass(frozen=True)
class Run:
    """One ``rs-cluster train``: seconds of the whole command and of its phases, where it ran."""

    label: str
    whole: float
    startup: float  # command start -> first training step (its progress event)
    spark_up: float  # command start -> Spark's executors registered ("starting ... workers")
    training: float  # first training step -> the Horovod tasks' end (Spark event log)
    epochs: float  # rank 0's own seconds of its epochs (metrics events), for comparison
    hosts: frozenset[str]  # hosts that ran the Horovod tasks
    containers: int  # executors that ran in YARN containers
    load: float  # 1-minute load average when it started

    @property
    def rest(self) -> float:
        return self.whole - self.startup - self.training


def spark_conf(rig: Rig, events: Path) -> list[str]:
    """The --spark-conf options both masters get: the driver on login, its event log in
    ``events``, and tasks only once every executor asked for has registered."""
    args = []
    for conf in (f"spark.driver.host={ADDRESSES['login']}",
                 f"spark.driver.bindAddress={ADDRESSES['login']}",
                 f"spark.executor.memory={EXECUTOR_MEMORY_MB}m", "spark.ui.enabled=false",
                 "spark.scheduler.minRegisteredResourcesRatio=1.0",
                 "spark.scheduler.maxRegisteredResourcesWaitingTime=60s",
                 "spark.eventLog.enabled=true", f"spark.eventLog.dir=file://{events}"):
        args += ["--spark-conf", conf]
    return args


def masters(rig: Rig) -> dict[str, list[str]]:
    return {BASELINE: ["--master", rig.master_url],
            YARN: [*yarn_master(rig), "--spark-conf",
                   f"spark.executor.memoryOverhead={YARN_OVERHEAD_MB}m"]}


def rs(rig: Rig, label: str, stage: str, args: list[str], master: list[str],
       timeout: float = 900) -> tuple[float, float, Path, Path]:
    """``rs-cluster --events FILE <stage> ARGS`` on login; returns (wall-clock start, seconds,
    events file, Spark event log folder)."""
    login = rig.host("login")
    name = f"{label.replace(' ', '-')}-{time.monotonic_ns()}"
    events, spark_events = login.tmp / f"events-{name}.jsonl", login.tmp / "spark-events" / name
    spark_events.mkdir(parents=True)
    started_at, started = time.time(), time.monotonic()
    result = login.run([str(rig.python), "-m", "rs_cluster", "-q", "--events", str(events), stage,
                        *args, *master, *spark_conf(rig, spark_events)],
                       env=rig.driver_env({"TF_CPP_MIN_LOG_LEVEL": "2"}), timeout=timeout,
                       check=False)
    seconds = time.monotonic() - started
    if result.returncode != 0:
        raise SystemExit(f"bench_yarn: {label} failed ({result.returncode}):\n"
                         f"{result.stderr[-3000:]}")
    return started_at, seconds, events, spark_events


def phases(events: Path, started_at: float) -> tuple[float, float, float]:
    """(the first training step's time, seconds to Spark up, rank 0's epoch seconds) from a
    train run's events file."""
    first_step = spark_up = None
    epoch_seconds = 0.0
    for line in events.read_text().splitlines():
        event = json.loads(line)
        at = datetime.fromisoformat(event["time"]).timestamp()
        kind = event["event"]
        if kind == "info" and event.get("message", "").startswith("starting ") and spark_up is None:
            spark_up = at - started_at
        elif kind == "progress" and event.get("epoch") and first_step is None:
            first_step = at
        elif kind == "metrics" and "seconds" in event:
            epoch_seconds += float(event["seconds"])
    if first_step is None or spark_up is None:
        raise SystemExit(f"bench_yarn: {events} lacks the events that time the run's phases")
    return first_step, spark_up, epoch_seconds


def task_placement(folder: Path) -> tuple[frozenset[str], int, float]:
    """(hosts that ran tasks, executors in YARN containers, when the last task ended) from the
    Spark event log."""
    hosts, containers, ends = set(), 0, []
    for event in spark_events(folder):
        if event["Event"] == "SparkListenerTaskEnd":
            host = event["Task Info"]["Host"]
            hosts.add(HOST_OF.get(host, host))
            ends.append(event["Task Info"]["Finish Time"] / 1000)
        elif event["Event"] == "SparkListenerExecutorAdded":
            attributes = event["Executor Info"].get("Attributes", {})
            containers += attributes.get("CONTAINER_ID", "").startswith("container_")
    if not ends:
        raise SystemExit(f"bench_yarn: no task ended in the Spark event log in {folder}")
    return frozenset(hosts), containers, max(ends)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2, help="runs on each master (>= 2)")
    parser.add_argument("--pairs", type=int, default=6, help=f"image/mask pairs of {SUBSET}")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--steps-per-epoch", type=int, default=40,
                        help="training steps per epoch (the train split is read round and round)")
    parser.add_argument("--no-pin", action="store_true",
                        help="let every worker host use all of this machine's CPUs")
    args = parser.parse_args()
    if args.repeats < 2:
        parser.error("--repeats must be at least 2")
    reason = rig_unavailable() or hadoop_unavailable()
    if reason:
        print(f"bench_yarn: skipped: {reason}")
        return 0
    train_args = ["--epochs", str(args.epochs), "--steps-per-epoch", str(args.steps_per_epoch),
                  "--num-proc", "2", "--arch", "unet2019", "--base-filters", "8",
                  "--batch-size", "4", "--nics", "lo", "--patience", "0"]
    print(f"bench_yarn: {os.cpu_count()} CPUs, load average (1/5/15 min) at start: "
          + " ".join(f"{x:.2f}" for x in os.getloadavg()))
    begun = time.monotonic()
    runs: dict[str, list[Run]] = {BASELINE: [], YARN: []}
    with tempfile.TemporaryDirectory(prefix="bench-yarn-") as tmp:
        rig = Rig(Path(tmp) / "rig", services=("spark",))
        hadoop = Hadoop(rig, yarn=True)
        hadoop.write_conf()  # before the Spark workers start: their executors find HDFS with it
        with rig:
            hadoop.start()
            print(f"rig up in {time.monotonic() - begun:.1f} s: standalone {rig.master_url}, "
                  f"HDFS {hadoop.url}, YARN {hadoop.resourcemanager_web}")
            # After the daemons start: the NodeManagers, and the containers they start, too.
            print("pinning: " + ("none (--no-pin)" if args.no_pin else pin_workers(rig)))
            job = f"{hadoop.url}/user/rs/bench-yarn"
            upload_pairs(rig, job, {SUBSET: devdata.first_files(SUBSET, args.pairs)})
            _, took, _, _ = rs(rig, "prepare", "prepare",
                               ["--images", f"{job}/inputs/images", "--masks",
                                f"{job}/inputs/masks", "--output", f"{job}/dataset",
                                "--tile-size", "128", "--split", "0.67,0.33,0"],
                               masters(rig)[BASELINE])
            print(f"dataset: {args.pairs} pairs of {SUBSET}, tiles of 128 px, in HDFS "
                  f"(prepare on the standalone master: {took:.1f} s)")
            print(f"train: unet2019, 8 base filters, 2 Horovod workers, batch 4, {args.epochs} "
                  f"epochs of {args.steps_per_epoch} steps; model and checkpoints in HDFS; YARN "
                  f"executors {EXECUTOR_MEMORY_MB} MB + {YARN_OVERHEAD_MB} MB overhead")
            print(f"{'run':16} {'whole':>7} {'start-up':>9} {'(Spark)':>8} {'training':>9} "
                  f"{'(epochs)':>9} {'rest':>6}  {'ran on':22} {'load':>5}")
            for i in range(args.repeats):
                for label, master in masters(rig).items():
                    load = os.getloadavg()[0]
                    started_at, whole, events, spark_events = rs(
                        rig, f"train {label}", "train",
                        ["--data", f"{job}/dataset", "--model-dir", f"{job}/model-{label}-{i}",
                         *train_args], master)
                    first_step, spark_up, epochs = phases(events, started_at)
                    hosts, containers, last_end = task_placement(spark_events)
                    startup, training = first_step - started_at, last_end - first_step
                    run = Run(label, whole, startup, spark_up, training, epochs, hosts,
                              containers, load)
                    runs[label].append(run)
                    where = ",".join(sorted(hosts)) + (f" ({containers} ctr)" if containers else "")
                    print(f"{label + f' #{i + 1}':16} {whole:7.1f} {startup:9.1f} "
                          f"{spark_up:8.1f} {training:9.1f} {epochs:9.1f} {run.rest:6.1f}  "
                          f"{where:22} {load:5.2f}", flush=True)
            hadoop.stop()
    total = time.monotonic() - begun
    print("  whole: the command; start-up: its start to the first training step, (Spark): to "
          "its executors registered;\n  training: first step to the Horovod tasks' end "
          "(checkpoints and model written), (epochs): rank 0's\n  own epoch seconds; rest: "
          "the driver committing the model and stopping Spark")

    def best(label: str, phase: str) -> float:
        return min(getattr(r, phase) for r in runs[label])

    def median(label: str, phase: str) -> float:
        return statistics.median(getattr(r, phase) for r in runs[label])

    ratio = best(BASELINE, "training") / best(YARN, "training")
    print(f"\nresults: each figure the fastest of {args.repeats} runs on each master (median in "
          "brackets)")
    for phase, name in (("training", "training after start-up"), ("epochs", "rank 0's epochs"),
                        ("startup", "start-up"), ("spark_up", "  of which Spark up"),
                        ("whole", "whole command")):
        print(f"  {name:24} standalone {best(BASELINE, phase):6.1f} s "
              f"({median(BASELINE, phase):.1f}), YARN {best(YARN, phase):6.1f} s "
              f"({median(YARN, phase):.1f}); standalone / YARN "
              f"{best(BASELINE, phase) / best(YARN, phase):.2f}x")
    print(f"  YARN vs standalone, training after start-up: {ratio:.2f}x (target >= 0.9x): "
          + ("met" if ratio >= 0.9 else "NOT met"))
    extra = best(YARN, "startup") - best(BASELINE, "startup")
    print(f"  start-up: standalone {best(BASELINE, 'startup'):.1f} s, YARN "
          f"{best(YARN, 'startup'):.1f} s ({extra:+.1f} s on YARN: its application master and "
          "containers)")
    spread = all(r.hosts == frozenset(WORKERS) for done in runs.values() for r in done)
    contained = all(r.containers >= 2 for r in runs[YARN]) and \
        not any(r.containers for r in runs[BASELINE])
    print("  every run's tasks ran on both worker hosts, YARN's in its containers: as intended"
          if spread and contained else
          "  placement NOT as intended (see 'ran on'): the ratio compares unlike set-ups")
    print("  spark.archives (a packed venv shipped to the containers) is not used: the rig's "
          "nodes see the venv,\n  so this measures YARN's containers, not archive shipping")
    print("  load average (1/5/15 min) at the end: "
          + " ".join(f"{x:.2f}" for x in os.getloadavg())
          + f" on {os.cpu_count()} CPUs; whole benchmark {total:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
