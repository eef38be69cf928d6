"""Real Hadoop daemons on the multi-host rig (tests/rig.py): a NameNode on ``master`` and a
DataNode on each worker host, each its own JVM in its host's mount namespace, bound to its
host's address, keeping its data in its host's private folder.

The jars are Hadoop 3.3.4's own (tests/hadoop/pom.xml, copied into build/hadoop/lib by
``make hadoop-jars``), the version of the Hadoop client inside pyspark 3.5.3. They run on the
machine's Java 17 with the ``--add-opens`` flags Hadoop 3.3 needs there (its WebHDFS servlet's
JAXB reflects into java.lang).

Every host gets a ``HADOOP_CONF_DIR`` (``<host root>/hadoop/conf``), read by the daemons, by
Spark's Hadoop client and by the Python client (hdfs-native). Clients reach DataNodes by the
host name they register with (``dfs.client.use.datanode.hostname``): every rig host's connections
leave from 127.0.0.1, which the NameNode would otherwise record as each DataNode's address. This
is the multi-homed set-up Hadoop documents, not a shortcut: each DataNode listens only on its own
host's address.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping
from xml.sax.saxutils import escape

from tests.rig import REPO, WORKERS, Host, Rig, RigUnavailable, free_port

LIB = REPO / "build" / "hadoop" / "lib"
HEAP = "-Xmx384m"
# Hadoop 3.3 on Java 17: what its servlets (JAXB, Jersey) and IPC reflect into.
JAVA_OPENS = tuple(f"--add-opens=java.base/{pkg}=ALL-UNNAMED" for pkg in (
    "java.lang", "java.lang.reflect", "java.io", "java.net", "java.nio", "java.util",
    "java.util.concurrent", "sun.nio.ch", "sun.net.dns", "sun.net.util"))
NAMENODE = "org.apache.hadoop.hdfs.server.namenode.NameNode"
DATANODE = "org.apache.hadoop.hdfs.server.datanode.DataNode"
RESOURCEMANAGER = "org.apache.hadoop.yarn.server.resourcemanager.ResourceManager"
NODEMANAGER = "org.apache.hadoop.yarn.server.nodemanager.NodeManager"
NODE_MEMORY_MB = 3072  # per NodeManager: an application master and an executor or two


def unavailable(lib: Path = LIB) -> str | None:
    """Why the Hadoop daemons cannot start here, or None."""
    if shutil.which("java") is None:
        return "java is not installed (make setup installs it)"
    if not any(lib.glob("hadoop-hdfs-3*.jar")):
        return f"the Hadoop jars are missing from {lib} (make hadoop-jars fetches them)"
    return None


def site_xml(properties: Mapping[str, object]) -> str:
    rows = "".join(f"  <property><name>{escape(k)}</name><value>{escape(str(v))}</value>"
                   f"</property>\n" for k, v in properties.items())
    return f'<?xml version="1.0"?>\n<configuration>\n{rows}</configuration>\n'


@dataclass
class Daemon:
    name: str  # "namenode", "datanode-worker1"
    host: Host
    main: str
    proc: subprocess.Popen | None = None

    @property
    def log(self) -> Path:
        return self.host.logs / f"{self.name}.log"


class Hadoop:
    """HDFS on the rig: ``start()`` formats and starts the daemons and waits until every DataNode
    is live and the NameNode has left safe mode; the rig's ``stop()`` (or ours) ends them."""

    def __init__(self, rig: Rig, *, replication: int = 2, lib: Path = LIB, yarn: bool = False):
        self.rig = rig
        self.lib = lib
        self.replication = replication
        self.yarn = yarn
        master = rig.host("master")
        self.namenode_rpc = free_port(master.address)
        self.namenode_http = free_port(master.address)
        self.daemons: dict[str, Daemon] = {"namenode": Daemon("namenode", master, NAMENODE)}
        self._datanode_ports: dict[str, tuple[int, int, int]] = {}
        for name in WORKERS:
            host = rig.host(name)
            self.daemons[f"datanode-{name}"] = Daemon(f"datanode-{name}", host, DATANODE)
            self._datanode_ports[name] = (free_port(host.address), free_port(host.address),
                                          free_port(host.address))
        # YARN: the ResourceManager on master, a NodeManager on each worker host.
        self._rm_ports = [free_port(master.address) for _ in range(5)]
        self._nm_ports = {name: [free_port(rig.host(name).address) for _ in range(3)]
                          for name in WORKERS}
        if yarn:
            self.daemons["resourcemanager"] = Daemon("resourcemanager", master, RESOURCEMANAGER)
            for name in WORKERS:
                self.daemons[f"nodemanager-{name}"] = Daemon(f"nodemanager-{name}",
                                                             rig.host(name), NODEMANAGER)

    # -- addresses and configuration -------------------------------------------------------

    @property
    def url(self) -> str:
        """The file system's URL, ``hdfs://<master>:<port>``."""
        return f"hdfs://{self.rig.host('master').address}:{self.namenode_rpc}"

    def conf_dir(self, host: Host | str) -> Path:
        host = self.rig.host(host) if isinstance(host, str) else host
        return host.root / "hadoop" / "conf"

    def env(self, host: Host | str) -> dict[str, str]:
        """What a process on ``host`` needs to find HDFS and YARN: its Hadoop configuration
        folder (and Java, for the containers a NodeManager starts)."""
        java = os.path.realpath(shutil.which("java") or "/usr/bin/java")
        return {"HADOOP_CONF_DIR": str(self.conf_dir(host)),
                "YARN_CONF_DIR": str(self.conf_dir(host)),
                "JAVA_HOME": str(Path(java).parents[1])}

    def _site(self, host: Host) -> dict[str, dict[str, object]]:
        master = self.rig.host("master").address
        hdfs: dict[str, object] = {
            "dfs.replication": self.replication,
            "dfs.namenode.rpc-address": f"{master}:{self.namenode_rpc}",
            "dfs.namenode.http-address": f"{master}:{self.namenode_http}",
            "dfs.namenode.name.dir": str(host.root / "hadoop" / "name"),
            "dfs.datanode.data.dir": str(host.root / "hadoop" / "data"),
            # Leave safe mode as soon as the (empty or tiny) namespace is reported.
            "dfs.namenode.safemode.extension": 0,
            "dfs.namenode.datanode.registration.ip-hostname-check": "false",
            "dfs.client.use.datanode.hostname": "true",
            "dfs.datanode.use.datanode.hostname": "true",  # the replication pipeline, DN to DN
            # A dead DataNode is noticed in ~12 s (2 x recheck + 10 x heartbeat), not 10 min.
            "dfs.heartbeat.interval": 1,
            "dfs.namenode.heartbeat.recheck-interval": 1000,
            # Two DataNodes: a pipeline that loses one carries on with the other.
            "dfs.client.block.write.replace-datanode-on-failure.enable": "false",
            "dfs.permissions.superusergroup": "root",
        }
        if host.name in self._datanode_ports:
            xfer, http, ipc = self._datanode_ports[host.name]
            hdfs.update({"dfs.datanode.hostname": host.address,
                         "dfs.datanode.address": f"{host.address}:{xfer}",
                         "dfs.datanode.http.address": f"{host.address}:{http}",
                         "dfs.datanode.ipc.address": f"{host.address}:{ipc}"})
        core = {"fs.defaultFS": self.url, "hadoop.tmp.dir": str(host.root / "hadoop" / "tmp")}
        files = {"core-site.xml": core, "hdfs-site.xml": hdfs}
        if self.yarn:
            files.update(self._yarn_site(host))
        return files

    @property
    def resourcemanager_web(self) -> str:
        return f"http://{self.rig.host('master').address}:{self._rm_ports[4]}"

    def _yarn_site(self, host: Host) -> dict[str, dict[str, object]]:
        master = self.rig.host("master").address
        rpc, scheduler, tracker, admin, web = self._rm_ports
        yarn: dict[str, object] = {
            "yarn.resourcemanager.hostname": master,
            "yarn.resourcemanager.address": f"{master}:{rpc}",
            "yarn.resourcemanager.scheduler.address": f"{master}:{scheduler}",
            "yarn.resourcemanager.resource-tracker.address": f"{master}:{tracker}",
            "yarn.resourcemanager.admin.address": f"{master}:{admin}",
            "yarn.resourcemanager.webapp.address": f"{master}:{web}",
            "yarn.nodemanager.resource.memory-mb": NODE_MEMORY_MB,
            "yarn.nodemanager.resource.cpu-vcores": 2,
            "yarn.scheduler.minimum-allocation-mb": 128,
            "yarn.scheduler.maximum-allocation-mb": NODE_MEMORY_MB,
            # Python workers and TensorFlow live outside the JVM's heap: YARN would kill them.
            "yarn.nodemanager.pmem-check-enabled": "false",
            "yarn.nodemanager.vmem-check-enabled": "false",
            "yarn.nodemanager.disk-health-checker.max-disk-utilization-per-disk-percentage": 99,
            # What containers inherit from their NodeManager (RS_RIG_HOST: which host ran a
            # task, for the tests); executors bind to the address YARN gives them.
            "yarn.nodemanager.env-whitelist": "JAVA_HOME,HADOOP_CONF_DIR,PATH,LANG,TZ,"
                                              "RS_RIG_HOST",
            "yarn.nodemanager.delete.debug-delay-sec": 600,  # keep container logs to read
            # A dead NodeManager is noticed in seconds, not 10 minutes.
            "yarn.nm.liveness-monitor.expiry-interval-ms": 6000,
            "yarn.resourcemanager.nm.liveness-monitor.interval-ms": 1000,
            "yarn.resourcemanager.nodemanagers.heartbeat-interval-ms": 500,
        }
        if host.name in self._nm_ports:
            ipc, localizer, web_nm = self._nm_ports[host.name]
            yarn.update({
                "yarn.nodemanager.hostname": host.address,
                "yarn.nodemanager.address": f"{host.address}:{ipc}",
                "yarn.nodemanager.localizer.address": f"{host.address}:{localizer}",
                "yarn.nodemanager.webapp.address": f"{host.address}:{web_nm}",
                "yarn.nodemanager.local-dirs": str(host.tmp / "yarn-local"),
                "yarn.nodemanager.log-dirs": str(host.logs / "yarn-containers"),
            })
        capacity = {"yarn.scheduler.capacity.root.queues": "default,analysts",
                    "yarn.scheduler.capacity.root.default.capacity": 50,
                    "yarn.scheduler.capacity.root.analysts.capacity": 50,
                    "yarn.scheduler.capacity.root.default.maximum-capacity": 100,
                    "yarn.scheduler.capacity.root.analysts.maximum-capacity": 100,
                    # One user may grow into the whole cluster (a lost node halves it).
                    "yarn.scheduler.capacity.root.default.user-limit-factor": 2,
                    "yarn.scheduler.capacity.root.analysts.user-limit-factor": 2,
                    # Application masters may take the whole (small) cluster.
                    "yarn.scheduler.capacity.maximum-am-resource-percent": 1.0}
        return {"yarn-site.xml": yarn, "capacity-scheduler.xml": capacity}

    def write_conf(self) -> None:
        """Every host's Hadoop configuration; written before the rig starts, so the Spark
        workers (and their executors) find it through ``$HADOOP_CONF_DIR`` (tests/rig.py)."""
        for host in self.rig.hosts.values():
            conf = self.conf_dir(host)
            conf.mkdir(parents=True, exist_ok=True)
            for name, props in self._site(host).items():
                (conf / name).write_text(site_xml(props))
            (conf / "log4j.properties").write_text(
                "log4j.rootLogger=INFO, console\n"
                "log4j.appender.console=org.apache.log4j.ConsoleAppender\n"
                "log4j.appender.console.layout=org.apache.log4j.PatternLayout\n"
                "log4j.appender.console.layout.ConversionPattern=%d %p %c{1}: %m%n\n"
                "log4j.logger.org.apache.hadoop.util.NativeCodeLoader=ERROR\n")

    def _java(self, host: Host, main: str, *args: str) -> list[str]:
        classpath = f"{self.conf_dir(host)}:{self.lib}/*"
        return [shutil.which("java") or "java", HEAP, *JAVA_OPENS,
                f"-Dhadoop.log.dir={host.logs}", "-cp", classpath, main, *args]

    # -- life cycle ----------------------------------------------------------------------------

    def start(self, timeout: float = 120) -> Hadoop:
        reason = unavailable(self.lib)
        if reason:
            raise RigUnavailable(reason)
        self.write_conf()
        master = self.rig.host("master")
        master.run(self._java(master, NAMENODE, "-format", "-nonInteractive", "-force"),
                   env=self.env(master), timeout=120)
        for name in self.daemons:
            self.start_daemon(name)
        self.wait_ready(timeout)
        if self.yarn:
            self.wait_yarn(timeout)
        return self

    def active_nodemanagers(self) -> int:
        with urllib.request.urlopen(f"{self.resourcemanager_web}/ws/v1/cluster/metrics",
                                    timeout=5) as answer:  # noqa: S310 - the rig's RM
            return int(json.load(answer)["clusterMetrics"]["activeNodes"])

    def wait_yarn(self, timeout: float = 120, nodes: int | None = None) -> None:
        want = len(WORKERS) if nodes is None else nodes

        def ready() -> str | None:
            active = self.active_nodemanagers()
            return None if active == want else f"{active} of {want} NodeManagers active"

        self._wait("YARN", ready, timeout)

    def _wait(self, what: str, not_ready: Callable[[], str | None], timeout: float) -> None:
        """Until ``not_ready()`` (which says what is missing) returns None; a daemon that exits
        meanwhile fails at once, with the end of its log."""
        deadline = time.monotonic() + timeout
        last = "no answer"
        while time.monotonic() < deadline:
            for daemon in self.daemons.values():
                if daemon.proc is not None and daemon.proc.poll() is not None:
                    raise RigUnavailable(f"{daemon.name} exited with {daemon.proc.returncode}; "
                                         f"see {daemon.log}:\n{_tail(daemon.log)}")
            try:
                missing = not_ready()
                if missing is None:
                    return
                last = missing
            except (OSError, urllib.error.URLError, ValueError, KeyError) as e:
                last = str(e)
            time.sleep(0.5)
        raise RigUnavailable(f"{what} not ready after {timeout:g} s ({last}); logs in "
                             f"{self.rig.host('master').logs}")

    def start_daemon(self, name: str) -> None:
        daemon = self.daemons[name]
        if daemon.proc is not None and daemon.proc.poll() is None:
            return
        daemon.proc = daemon.host.popen(self._java(daemon.host, daemon.main), log=daemon.log,
                                        env=self.env(daemon.host))

    def kill_daemon(self, name: str, sig: int = signal.SIGKILL) -> None:
        """Ends one daemon the way a crash (SIGKILL) or an operator (SIGTERM) would."""
        daemon = self.daemons[name]
        if daemon.proc is not None and daemon.proc.poll() is None:
            os.killpg(daemon.proc.pid, sig)
            daemon.proc.wait(timeout=30)
        daemon.proc = None

    def stop(self) -> None:
        for name in reversed(list(self.daemons)):
            self.kill_daemon(name, signal.SIGTERM)

    def dfsadmin(self, *args: str) -> str:
        """``hdfs dfsadmin ARGS`` run on ``master`` (e.g. ``-safemode enter``)."""
        master = self.rig.host("master")
        return master.run(self._java(master, "org.apache.hadoop.hdfs.tools.DFSAdmin", *args),
                          env=self.env(master), timeout=120).stdout

    def jmx(self, bean: str) -> dict:
        master = self.rig.host("master").address
        url = f"http://{master}:{self.namenode_http}/jmx?qry=Hadoop:service=NameNode,name={bean}"
        with urllib.request.urlopen(url, timeout=5) as answer:  # noqa: S310 - the rig's NameNode
            beans = json.load(answer)["beans"]
        return beans[0] if beans else {}

    def live_datanodes(self) -> int:
        return int(self.jmx("FSNamesystemState").get("NumLiveDataNodes", 0))

    def in_safe_mode(self) -> bool:
        return bool(self.jmx("NameNodeInfo").get("Safemode"))

    def wait_ready(self, timeout: float = 120, datanodes: int | None = None) -> None:
        want = len(WORKERS) if datanodes is None else datanodes

        def ready() -> str | None:
            live, safe = self.live_datanodes(), self.in_safe_mode()
            return None if live >= want and not safe else \
                f"{live} of {want} DataNodes live, safe mode {safe}"

        self._wait("HDFS", ready, timeout)


def _tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""
