"""The demo's cluster of separate hosts: tests/rig.py's rig, set up the way a cluster admin would.

The rig gives each host its own address and its own view of the filesystem (see tests/rig.py):
``login`` (sshd; the job runner there is the Spark driver), ``master``, ``worker1`` and ``worker2``
(one core each) and ``storage`` (SeaweedFS's S3 gateway). On top of it this module writes what an
admin installs: a bucket, each node's own ``~/.aws/credentials`` under the profile ``demo``, and
login's ``~/.rs-cluster/cluster.toml`` naming the Spark master and the S3 store. Spark's event log
goes to login's own temp folder.

Which host ran what comes from evidence, never from the plan: the Spark event logs the driver wrote
on login (the driver's address, each task's executor host), the Horovod worker processes seen on
the hosts while a job trains (their ``HOROVOD_RANK`` and the mount namespace they run in), and a
listing of the job's folder in the store.

With ``cluster="yarn"`` the same hosts run Hadoop instead (tests/hadoop_daemons.py): the NameNode
and the YARN ResourceManager on ``master``, a DataNode and a NodeManager on each worker host. The
settings then name ``master = "yarn"`` and an ``hdfs://`` storage URL, each node finds both through
its own ``$HADOOP_CONF_DIR``, and the report adds the YARN containers the executors ran in.

Standard library only, like tests/rig.py: the demo runs in the QGIS venv; what needs pyarrow runs
in the cluster venv's Python.
"""

from __future__ import annotations

import getpass
import json
import os
import subprocess
import threading
from collections import Counter
from pathlib import Path
from typing import Iterator

from tests.hadoop_daemons import Hadoop
from tests.rig import WORKERS, Rig, write_aws_files

BUCKET = "rs-demo"
STORAGE_URL = f"s3://{BUCKET}/jobs"
HDFS_JOBS = "/rs/jobs"  # the jobs' folder in HDFS (cluster="yarn")
CLUSTERS = ("standalone", "yarn")
AWS_PROFILE = "demo"
WORKER_MEMORY = "2g"  # each worker's offer; one executor of EXECUTOR_MEMORY fits in it
EXECUTOR_MEMORY = "1g"  # Spark's default, as on the single-host cluster

# Run in the cluster venv on login (yarn): counts the files and bytes under an hdfs:// URL.
_HDFS_LIST = r"""
import json, sys
from rs_cluster import storage
def walk(url):
    for name, is_file in storage.list_dir(url):
        yield from [url + "/" + name] if is_file else walk(url + "/" + name)
files = list(walk(sys.argv[1])) if storage.exists(sys.argv[1]) else []
fs, _ = storage.url_to_fs(sys.argv[1])
sizes = [fs.get_file_info(storage.url_to_fs(f)[1]).size or 0 for f in files]
print(json.dumps({"files": len(files), "bytes": sum(sizes)}))
"""

# Run in the cluster venv, outside the rig (the store answers on every address): creates the
# bucket, or lists a prefix. The keys arrive on stdin, never on a command line.
_S3_SCRIPT = r"""
import json, sys
import pyarrow.fs as pafs
a = json.load(sys.stdin)
s3 = pafs.S3FileSystem(access_key=a["access_key"], secret_key=a["secret_key"],
                       endpoint_override=a["endpoint"], scheme="http", region=a["region"],
                       allow_bucket_creation=True)
if a["op"] == "create":
    s3.create_dir(a["path"])
else:
    files = [i for i in s3.get_file_info(pafs.FileSelector(a["path"], recursive=True,
                                                           allow_not_found=True)) if i.is_file]
    print(json.dumps({"files": len(files), "bytes": sum(i.size or 0 for i in files)}))
"""


class DemoRig:
    """The rig under ``base`` (removed on stop), configured for jobs submitted over SSH."""

    def __init__(self, base: Path, python: Path, cluster: str = "standalone") -> None:
        if cluster not in CLUSTERS:
            raise ValueError(f"unknown cluster {cluster!r}; one of {', '.join(CLUSTERS)}")
        self.cluster = cluster
        services = ("storage", "spark", "ssh") if cluster == "standalone" else ("ssh",)
        self.rig = Rig(base, python=python, worker_memory=WORKER_MEMORY, remove=True,
                       services=services)
        self.hadoop = Hadoop(self.rig, yarn=True) if cluster == "yarn" else None
        self.names = {h.address: h.name for h in self.rig.hosts.values()}
        self._reported: set[str] = set()  # event log files already summed up

    # -- start, configure, stop ---------------------------------------------------------------

    def start(self) -> DemoRig:
        if self.hadoop is not None:
            self.hadoop.write_conf()  # every host's $HADOOP_CONF_DIR, before anything starts
        self.rig.start()
        try:
            if self.hadoop is not None:
                self.hadoop.start()
            self._configure()
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        if self.hadoop is not None:
            self.hadoop.stop()
        self.rig.stop()

    @property
    def storage_url(self) -> str:
        if self.hadoop is not None:
            return f"{self.hadoop.url}{HDFS_JOBS}"
        return STORAGE_URL

    @property
    def login(self):
        return self.rig.host("login")

    @property
    def events_dir(self) -> Path:
        return self.login.tmp / "spark-events"

    @property
    def settings_inside(self) -> Path:
        """login's settings file as a process on login reads it (``~`` is login's home there)."""
        return self.login.user_home / ".rs-cluster" / "cluster.toml"

    def _configure(self) -> None:
        rig = self.rig
        if self.hadoop is None:
            s3 = self.rig.s3
            assert s3 is not None
            self._s3("create", BUCKET)
            for name in ("login", *WORKERS):  # each node's own keys, as its admin wrote them
                write_aws_files(rig.host(name).home, s3, profile=AWS_PROFILE, config=False)
            master = rig.master_url
            storage = (f'url = "{STORAGE_URL}"\ncredentials = "aws-profile:{AWS_PROFILE}"\n'
                       f'endpoint_url = "{s3.url}"\n')
            yarn = ""
        else:
            # HDFS needs no credentials here: each node's Hadoop configuration finds it.
            master, storage = "yarn", f'url = "{self.storage_url}"\n'
            jars = Path(rig.spark_home) / "jars"  # every node has the install at this path
            yarn = (f'"spark.yarn.jars" = "local:{jars}/*"\n"spark.yarn.am.memory" = "512m"\n'
                    '"spark.executor.cores" = 1\n')
        self.events_dir.mkdir(parents=True, exist_ok=True)
        folder = self.login.home / ".rs-cluster"
        folder.mkdir(mode=0o700, exist_ok=True)
        address = self.login.address
        (folder / "cluster.toml").write_text(f"""\
[spark]
master = "{master}"
executor_memory = "{EXECUTOR_MEMORY if self.hadoop is None else "512m"}"

[spark.conf]
{yarn}
"spark.driver.host" = "{address}"
"spark.driver.bindAddress" = "{address}"
"spark.ui.enabled" = false
# Start once both workers' executors are in, so each stage spreads over both hosts.
"spark.scheduler.minRegisteredResourcesRatio" = "1.0"
"spark.scheduler.maxRegisteredResourcesWaitingTime" = "60s"
# The driver's event log says which host ran each task (the demo reads it).
"spark.eventLog.enabled" = true
"spark.eventLog.dir" = "file://{self.events_dir}"

[storage]
{storage}""")
        (folder / "cluster.toml").chmod(0o600)

    def _s3(self, op: str, path: str) -> str:
        s3 = self.rig.s3
        assert s3 is not None
        args = {"op": op, "path": path, "access_key": s3.access_key, "secret_key": s3.secret_key,
                "endpoint": s3.endpoint, "region": s3.region}
        done = subprocess.run([str(self.rig.python), "-c", _S3_SCRIPT], input=json.dumps(args),
                              capture_output=True, text=True, timeout=120)
        if done.returncode != 0:
            raise RuntimeError(f"S3 {op} {path} on {s3.url} failed: "
                               f"{done.stderr.strip().splitlines()[-1:] or done.returncode}")
        return done.stdout

    # -- what the plugin's profile needs ------------------------------------------------------

    def remote_command(self, rs_cluster: Path) -> tuple[str, ...]:
        """rs-cluster as a non-interactive SSH login on ``login`` runs it: that shell's bare
        environment plus what the driver must know of its host (the rig's Host.env gives its
        own processes the same: an address, a temp folder, Spark's scratch space)."""
        login = self.login
        env = {"SPARK_LOCAL_IP": login.address, "TMPDIR": str(login.tmp),
               **self.rig.driver_env(), "RS_CLUSTER_CONFIG": str(self.settings_inside),
               **(self.hadoop.env(login) if self.hadoop is not None else {})}
        return ("/usr/bin/env", *(f"{k}={v}" for k, v in env.items()), str(rs_cluster))

    @property
    def workspace(self) -> str:
        """The job workspace on login: in login's own folder, which no other host sees."""
        return str(self.login.workspace / "rs-cluster")

    # -- who ran what -------------------------------------------------------------------------

    def watch_horovod(self) -> HorovodWitness:
        return HorovodWitness(self)

    def where(self, address: str) -> str:
        return f"{self.names.get(address, 'an unknown host')} ({address})"

    def report(self, job_id: str, witness: HorovodWitness | None = None) -> list[str]:
        """Lines saying where ``job_id``'s parts ran, from the Spark applications that ended
        since the last report, the Horovod ranks ``witness`` saw, and the store's listing."""
        lines = []
        apps = self._new_applications()
        drivers = sorted({a for app in apps for a in app["drivers"]})
        if drivers:
            lines.append("driver (job runner): " + ", ".join(self.where(a) for a in drivers))
        for app in apps:
            stage = app["name"].removeprefix("rs-cluster ")
            hosts = app["tasks"].most_common()
            tasks = ", ".join(f"{n} on {self.where(a)}" if i else
                              f"{n} task{'s' if n != 1 else ''} on {self.where(a)}"
                              for i, (a, n) in enumerate(hosts)) or "no tasks"
            lines.append(f"{stage}: {tasks}")
            if app["containers"]:
                lines.append(f"{stage}: YARN containers " + ", ".join(
                    f"{c.rsplit('_', 1)[-1]} on {self.where(a)}"
                    for c, a in sorted(app["containers"].items())))
            if stage == "train" and witness is not None:
                ranks = witness.ranks
                lines.append("train: " + ("Horovod " + ", ".join(
                    f"rank {r} on {self.where(ranks[r])}" for r in sorted(ranks))
                    if ranks else "no Horovod worker process seen on the hosts"))
        url = f"{self.storage_url}/{getpass.getuser()}/{job_id}"
        if self.hadoop is None:
            listing = json.loads(self._s3("list", url.removeprefix("s3://")))
            assert self.rig.s3 is not None
            where = self.where(self.rig.s3.endpoint.rsplit(":", 1)[0])
        else:
            listing = json.loads(self.login.run(
                [str(self.rig.python), "-c", _HDFS_LIST, url], env=self.hadoop.env(self.login),
                timeout=120).stdout.strip().splitlines()[-1])
            where = (f"HDFS (NameNode on {self.where(self.rig.host('master').address)}, "
                     f"blocks on the DataNodes of {', '.join(WORKERS)})")
        lines.append(f"storage: {listing['files']} objects, {listing['bytes'] / 1e6:.1f} MB under "
                     f"{url} on {where}")
        return lines

    def _new_applications(self) -> list[dict]:
        """The Spark applications whose event logs are complete and not yet reported: name,
        driver addresses, tasks per executor address; in the order they started."""
        apps = []
        for log in sorted(self.events_dir.iterdir(), key=lambda p: p.stat().st_mtime):
            if log.name in self._reported or log.name.endswith(".inprogress"):
                continue
            self._reported.add(log.name)
            app: dict = {"name": "", "drivers": set(), "tasks": Counter(), "start": 0,
                         "containers": {}}
            for line in log.read_text().splitlines():
                event = json.loads(line)
                kind = event.get("Event")
                if kind == "SparkListenerApplicationStart":
                    app["name"], app["start"] = event["App Name"], event.get("Timestamp", 0)
                elif kind == "SparkListenerBlockManagerAdded" and \
                        event["Block Manager ID"]["Executor ID"] == "driver":
                    app["drivers"].add(event["Block Manager ID"]["Host"])
                elif kind == "SparkListenerTaskEnd":
                    app["tasks"][event["Task Info"]["Host"]] += 1
                elif kind == "SparkListenerExecutorAdded":
                    info = event["Executor Info"]
                    container = (info.get("Attributes") or {}).get("CONTAINER_ID")
                    if container:
                        app["containers"][container] = info.get("Host", "")
            apps.append(app)
        return sorted(apps, key=lambda a: a["start"])


class HorovodWitness:
    """While a job runs, looks for Horovod worker processes on the rig's hosts: the rank in their
    environment (``HOROVOD_RANK``, which Horovod's launcher sets for each worker) and the host
    whose mount namespace they run in."""

    def __init__(self, demo_rig: DemoRig, every_s: float = 0.5) -> None:
        self.hosts = {h.namespace: h.address for h in demo_rig.rig.hosts.values()}
        self.every_s = every_s
        self.ranks: dict[int, str] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="horovod-witness", daemon=True)

    def __enter__(self) -> HorovodWitness:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            for rank, address in _horovod_workers(self.hosts):
                self.ranks.setdefault(rank, address)


def _horovod_workers(hosts: dict[str, str]) -> Iterator[tuple[int, str]]:
    """(rank, host address) of each live process of ``hosts`` ({mount namespace: address})
    that carries ``HOROVOD_RANK``."""
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            address = hosts.get(os.readlink(f"/proc/{entry.name}/ns/mnt"))
            if address is None:
                continue
            with open(f"/proc/{entry.name}/environ", "rb") as f:
                environ = f.read().split(b"\0")
        except OSError:
            continue  # gone meanwhile
        for item in environ:
            if item.startswith(b"HOROVOD_RANK="):
                yield int(item.split(b"=", 1)[1]), address
