"""The multi-host rig really isolates its hosts: files, addresses, Spark, S3 and SSH, all real."""

from __future__ import annotations

import json
import subprocess
import textwrap
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.procs import wait_for
from tests.rig import ADDRESSES, WORKERS, Rig

pytestmark = pytest.mark.multihost


def _visible(rig: Rig, host: str, path: Path) -> bool:
    return rig.host(host).run(["test", "-e", str(path)], check=False).returncode == 0


def test_login_workspace_and_home_are_invisible_from_the_workers(rig):
    login = rig.host("login")
    job_file = login.workspace / "job-42" / "inputs.json"
    job_file.parent.mkdir(exist_ok=True)
    job_file.write_text('{"job": 42}')
    (login.home / "whoami").write_text("login\n")

    assert login.run(["cat", str(job_file)]).stdout == '{"job": 42}'
    assert login.run(["sh", "-c", "cat ~/whoami"]).stdout == "login\n"
    for worker in WORKERS:
        assert not _visible(rig, worker, job_file), f"{worker} sees the login workspace"
        assert rig.host(worker).run(["ls", "-A", str(login.root)]).stdout == ""
        assert rig.host(worker).run(["sh", "-c", "cat ~/whoami"], check=False).returncode != 0
    # The shared parts a cluster admin installs on every node stay at the same path.
    for host in rig.hosts:
        assert _visible(rig, host, rig.python) and _visible(rig, host, Path(__file__))


def test_a_workers_local_dir_is_invisible_from_login_and_the_other_worker(rig):
    worker1 = rig.host("worker1")
    block = worker1.tmp / "spark-local" / "shuffle-probe"
    worker1.run(["sh", "-c", f"mkdir -p {block.parent} && echo blocks > {block}"])

    assert block.read_text() == "blocks\n"  # really on disk, seen from outside the rig
    assert _visible(rig, "worker1", block)
    assert not _visible(rig, "login", block)
    assert not _visible(rig, "worker2", block)


def test_each_host_has_its_own_namespace_address_and_folders(rig):
    namespaces = {name: host.namespace for name, host in rig.hosts.items()}
    assert len(set(namespaces.values())) == len(ADDRESSES)
    for name, host in rig.hosts.items():
        out = host.run(["sh", "-c", 'readlink /proc/self/ns/mnt; echo "$SPARK_LOCAL_IP $TMPDIR"'])
        ns, env = out.stdout.splitlines()
        assert ns == namespaces[name]
        assert env == f"{ADDRESSES[name]} {host.tmp}"


PROBE_JOB = textwrap.dedent("""\
    import json, os, sys
    from pyspark.sql import SparkSession

    master, secret = sys.argv[1], sys.argv[2]
    ip = os.environ["SPARK_LOCAL_IP"]
    spark = (SparkSession.builder.master(master).appName("rig-probe")
             .config("spark.driver.host", ip).config("spark.driver.bindAddress", ip)
             .config("spark.executor.memory", "512m").config("spark.cores.max", "2")
             .config("spark.scheduler.minRegisteredResourcesRatio", "1.0")
             .config("spark.scheduler.maxRegisteredResourcesWaitingTime", "60s")
             .config("spark.ui.enabled", "false").getOrCreate())
    sc = spark.sparkContext

    def probe(i):
        import os, time
        time.sleep(0.5)  # long enough that both one-core executors get tasks
        return {"rig_host": os.environ.get("RS_RIG_HOST"), "ip": os.environ.get("SPARK_LOCAL_IP"),
                "ns": os.readlink("/proc/self/ns/mnt"), "sees_login_file": os.path.exists(secret)}

    tasks = sc.parallelize(range(8), 8).map(probe).collect()
    endpoints = sc._jsc.sc().getExecutorMemoryStatus().keysIterator()
    block_managers = []
    while endpoints.hasNext():
        block_managers.append(endpoints.next().rsplit(":", 1)[0])
    spark.stop()
    print(json.dumps({"tasks": tasks, "block_managers": sorted(block_managers),
                      "driver_ns": os.readlink("/proc/self/ns/mnt")}))
""")


@pytest.mark.spark
def test_a_spark_job_from_login_runs_on_both_workers_without_seeing_login_files(rig):
    login = rig.host("login")
    (login.workspace / "probe_job.py").write_text(PROBE_JOB)
    secret = login.workspace / "job-7" / "model.h5"
    secret.parent.mkdir(exist_ok=True)
    secret.write_bytes(b"weights")

    out = login.run([str(rig.python), "probe_job.py", rig.master_url, str(secret)],
                    env=rig.driver_env(), timeout=120)
    report = json.loads(out.stdout.strip().splitlines()[-1])

    assert report["driver_ns"] == login.namespace
    hosts = {t["rig_host"] for t in report["tasks"]}
    assert hosts == set(WORKERS), f"tasks ran on {hosts}, not on both workers"
    for task in report["tasks"]:
        worker = rig.host(task["rig_host"])
        assert task["ip"] == worker.address and task["ns"] == worker.namespace
        assert not task["sees_login_file"], f"{worker.name} sees {secret}"
    # The block managers (one per executor, one for the driver) bound their hosts' addresses.
    assert report["block_managers"] == sorted(
        [ADDRESSES["login"], ADDRESSES["worker1"], ADDRESSES["worker2"]])


S3_CLIENT = textwrap.dedent("""\
    import sys
    import pyarrow.fs as pafs

    endpoint, action, path = sys.argv[1:4]
    # Keys come from the standard AWS variables, as the cluster side reads them.
    fs = pafs.S3FileSystem(endpoint_override=endpoint, scheme="http", region="us-east-1",
                           allow_bucket_creation=True)
    if action == "put":
        fs.create_dir(path.split("/")[0])
        with fs.open_output_stream(path) as f:
            f.write(sys.argv[4].encode())
    else:
        sys.stdout.write(fs.open_input_stream(path).read().decode())
""")


def _s3(rig: Rig, host: str, *args: str, keys: tuple[str, str] | None = None,
        check: bool = True) -> subprocess.CompletedProcess[str]:
    assert rig.s3 is not None
    script = rig.host(host).workspace / "s3_client.py"
    script.write_text(S3_CLIENT)
    access, secret = keys or (rig.s3.access_key, rig.s3.secret_key)
    return rig.host(host).run([str(rig.python), str(script), rig.s3.endpoint, *args],
                              env={"AWS_ACCESS_KEY_ID": access, "AWS_SECRET_ACCESS_KEY": secret},
                              check=check, timeout=60)


def test_s3_with_the_right_keys_stores_objects_every_host_reads_back(rig):
    _s3(rig, "worker1", "put", "jobs/job-9/state.json", '{"epoch": 3}')

    assert _s3(rig, "worker1", "get", "jobs/job-9/state.json").stdout == '{"epoch": 3}'
    assert _s3(rig, "worker2", "get", "jobs/job-9/state.json").stdout == '{"epoch": 3}'
    assert _s3(rig, "login", "get", "jobs/job-9/state.json").stdout == '{"epoch": 3}'
    # The bytes live on the storage host's disk, not on the worker that wrote them.
    assert any((rig.host("storage").root / "data").glob("jobs_*.dat"))
    assert not any(rig.host("worker1").tmp.rglob("*.dat"))


def test_s3_refuses_anonymous_and_wrong_key_requests(rig):
    _s3(rig, "worker1", "put", "private/secret.txt", "top secret")
    url = f"{rig.s3.url}/private/secret.txt"

    for request in (urllib.request.Request(url),
                    urllib.request.Request(url, data=b"overwritten", method="PUT"),
                    urllib.request.Request(f"{rig.s3.url}/private")):
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(request, timeout=10)
        assert refused.value.code == 403 and b"AccessDenied" in refused.value.read()

    wrong_secret = _s3(rig, "worker2", "get", "private/secret.txt",
                       keys=(rig.s3.access_key, "not-the-secret"), check=False)
    assert wrong_secret.returncode != 0 and "ACCESS_DENIED" in wrong_secret.stderr
    unknown_key = _s3(rig, "worker2", "put", "private/secret.txt", "overwritten",
                      keys=("AKIDUNKNOWN", "whatever"), check=False)
    assert unknown_key.returncode != 0 and "top secret" not in unknown_key.stdout
    assert _s3(rig, "worker1", "get", "private/secret.txt").stdout == "top secret"


@pytest.mark.ssh
def test_an_ssh_key_login_lands_on_the_login_host(rig):
    login, sshd = rig.host("login"), rig.sshd
    (login.home / "whoami").write_text("login\n")
    known = login.root / "client_known_hosts"
    key_type, key_b64 = sshd.public_host_key
    known.write_text(f"[{login.address}]:{sshd.port} {key_type} {key_b64}\n")
    worker_dir = rig.host("worker1").tmp
    remote = f"readlink /proc/self/ns/mnt; cat ~/whoami; test -e {worker_dir} || echo hidden"

    out = subprocess.run(
        ["ssh", "-F", "/dev/null", "-p", str(sshd.port), "-i", str(sshd.user_key), "-o", f"UserKnownHostsFile={known}",
         "-o", "StrictHostKeyChecking=yes", "-o", "BatchMode=yes", "-o", "IdentitiesOnly=yes",
         f"{sshd.user}@{login.address}", remote], capture_output=True, text=True, timeout=30)

    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == [login.namespace, "login", "hidden"]


def test_stop_kills_what_escaped_its_session_and_releases_the_hosts(tmp_path):
    rig = Rig(tmp_path / "rig", services=()).start()
    worker = rig.host("worker2")
    # A daemon that left the process group it was started in, as sshd's sessions do.
    worker.run(["sh", "-c", "setsid sleep 300 > /dev/null 2>&1 < /dev/null &"])
    daemon = wait_for(lambda: [p for p in worker.pids() if p != worker.holder.pid],
                      what="the escaped daemon")[0]
    holders = [h.holder.pid for h in rig.hosts.values()]

    rig.stop()

    for pid in [daemon, *holders]:
        assert not Path(f"/proc/{pid}").exists() or _is_zombie(pid), f"pid {pid} still runs"


def _is_zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True
