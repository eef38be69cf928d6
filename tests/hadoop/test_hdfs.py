"""hdfs:// storage against real HDFS daemons: a NameNode on ``master`` and DataNodes on
``worker1`` and ``worker2``, each a separate JVM on its own host's address and disk.

Python code runs on the rig's hosts (``login`` as the driver, the workers as executors), so
every byte goes over the network to the DataNodes; no host sees another's folders.
"""

from __future__ import annotations

import json
import signal
import subprocess
import textwrap
import time

import pytest

from tests.rig import WORKERS

pytestmark = [pytest.mark.hadoop, pytest.mark.multihost]


def _py(rig, host: str, code: str, *, timeout: float = 120, check: bool = True
        ) -> subprocess.CompletedProcess[str]:
    """Runs ``code`` with the cluster venv's Python on ``host`` of the rig."""
    result = rig.host(host).run([str(rig.python), "-c", textwrap.dedent(code)], timeout=timeout,
                                check=False)
    if check:
        assert result.returncode == 0, result.stderr[-3000:]
    return result


def upload_pairs(rig, job: str, picks: dict[str, list[str]]) -> None:
    """Copies dev image/mask pairs ({subset: file names}) from login into HDFS under
    ``<job>/inputs/images`` and ``<job>/inputs/masks``, through the storage module."""
    from tests import devdata

    files = [(str(devdata.subset(name) / folder / f), f"{job}/inputs/{kind}/{f}")
             for name, names in picks.items() for f in names
             for kind, folder in (("images", "images"), ("masks", "gt"))]
    _py(rig, "login", f"""
        from rs_cluster import storage
        for local, url in {files!r}:
            storage.copy_tree(local, url)
    """)


def _namespace_pids(rig, host: str, main_class: str) -> list[int]:
    out = []
    for pid in rig.host(host).pids():
        try:
            cmdline = open(f"/proc/{pid}/cmdline", "rb").read().split(b"\0")
        except OSError:
            continue
        if main_class.encode() in cmdline:
            out.append(pid)
    return out


def test_each_daemon_is_its_own_process_on_its_own_host(hdfs_rig):
    rig, hadoop = hdfs_rig
    from tests.hadoop_daemons import DATANODE, NAMENODE

    assert len(_namespace_pids(rig, "master", NAMENODE)) == 1
    for worker in WORKERS:
        assert len(_namespace_pids(rig, worker, DATANODE)) == 1, worker
        assert not _namespace_pids(rig, worker, NAMENODE)
    assert not _namespace_pids(rig, "login", DATANODE)
    assert hadoop.live_datanodes() == len(WORKERS)
    # A DataNode's blocks are on its own host's disk: the login host cannot see them.
    data = rig.host("worker1").root / "hadoop" / "data"
    seen = rig.host("login").run(["sh", "-c", f"ls {data} 2>&1 || true"]).stdout
    assert "current" not in seen


def test_the_storage_module_reads_and_writes_hdfs_from_the_login_host(hdfs_rig):
    rig, hadoop = hdfs_rig
    result = _py(rig, "login", f"""
        import json
        from rs_cluster import storage
        base = "{hadoop.url}/user/rs/roundtrip"
        storage.make_dirs(base + "/a/b")
        storage.write_json(base + "/a/b/card.json", {{"ok": 1}})
        storage.write_bytes(base + "/a/big.bin", bytes(range(256)) * 40000)  # ~10 MB, 1 block
        storage.copy_tree(base + "/a", base + "/copy")
        storage.move(base + "/copy", base + "/moved")
        print(json.dumps({{
            "card": storage.read_json(base + "/moved/b/card.json"),
            "size": len(storage.read_bytes(base + "/moved/big.bin")),
            "listing": sorted(storage.list_dir(base)),
            "copy_gone": not storage.exists(base + "/copy"),
            "default_fs": storage.read_json("hdfs:///user/rs/roundtrip/a/b/card.json"),
        }}))
    """)
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["card"] == {"ok": 1} and out["size"] == 256 * 40000
    assert out["copy_gone"] and out["default_fs"] == {"ok": 1}
    assert [name for name, _ in out["listing"]] == ["a", "moved"]


def test_a_rename_onto_an_existing_file_replaces_it(hdfs_rig):
    """What a retried prepare task does: its complete file replaces the first attempt's. HDFS's
    rename alone refuses an existing target (POSIX replaces it)."""
    rig, hadoop = hdfs_rig
    result = _py(rig, "worker1", f"""
        from rs_cluster import storage
        base = "{hadoop.url}/user/rs/replace"
        storage.write_bytes(base + "/part-00000.parquet", b"first attempt")
        storage.write_bytes(base + "/.part-00000.tmp", b"second attempt")
        filesys, folder = storage.url_to_fs(base)
        storage.replace_file(filesys, folder + "/.part-00000.tmp", folder + "/part-00000.parquet")
        print(storage.read_bytes(base + "/part-00000.parquet").decode(),
              sorted(n for n, _ in storage.list_dir(base)))
    """)
    assert result.stdout.strip().splitlines()[-1] == \
        "second attempt ['part-00000.parquet']"


def test_a_killed_datanode_loses_nothing_with_two_replicas(hdfs_rig):
    rig, hadoop = hdfs_rig
    payload = "bytes(range(256)) * 8192"  # 2 MB
    _py(rig, "login", f"""
        from rs_cluster import storage
        storage.write_bytes("{hadoop.url}/user/rs/replicated.bin", {payload})
    """)
    hadoop.kill_daemon("datanode-worker1", signal.SIGKILL)
    try:
        # At once, before the NameNode knows: the read goes to the replica that is left.
        _py(rig, "login", f"""
            from rs_cluster import storage
            data = storage.read_bytes("{hadoop.url}/user/rs/replicated.bin")
            assert data == {payload}, len(data)
        """)
        # Once the NameNode has dropped it (~12 s here), new files go to the DataNode left
        # without a retry (a write placed on the dead DataNode before that is written again:
        # the next test).
        deadline = time.monotonic() + 90
        while not hadoop.jmx("FSNamesystemState").get("NumDeadDataNodes") and \
                time.monotonic() < deadline:
            time.sleep(1)
        time.sleep(5)
        result = _py(rig, "login", f"""
            from rs_cluster import storage
            storage.write_bytes("{hadoop.url}/user/rs/after.bin", b"written with one DataNode")
            print(storage.read_bytes("{hadoop.url}/user/rs/after.bin").decode())
        """, timeout=180)
        assert result.stdout.strip().endswith("written with one DataNode")
    finally:
        hadoop.start_daemon("datanode-worker1")
        hadoop.wait_ready(120)


def test_namenode_in_safe_mode_fails_naming_it_and_the_location(hdfs_rig):
    rig, hadoop = hdfs_rig
    hadoop.dfsadmin("-safemode", "enter")
    try:
        result = _py(rig, "login", f"""
            from rs_cluster import storage
            from rs_cluster.errors import StorageError
            try:
                storage.write_json("{hadoop.url}/user/rs/safe/card.json", {{"a": 1}})
            except StorageError as e:
                print("ERROR", e)
        """)
    finally:
        hadoop.dfsadmin("-safemode", "leave")
    line = result.stdout.strip().splitlines()[-1]
    assert line.startswith(f"ERROR {hadoop.url}/user/rs/safe/card.json: ")
    assert "safe mode" in line


def test_namenode_down_fails_naming_the_location(hdfs_rig):
    rig, hadoop = hdfs_rig
    hadoop.kill_daemon("namenode", signal.SIGTERM)
    try:
        started = time.monotonic()
        result = _py(rig, "login", f"""
            from rs_cluster import storage
            from rs_cluster.errors import StorageError
            import time
            t = time.monotonic()
            try:  # a write fails at once too: no retrying against a NameNode that is down
                storage.write_bytes("{hadoop.url}/user/rs/while-down.bin", b"x")
            except StorageError as e:
                print("WRITE", round(time.monotonic() - t, 1), e)
            try:
                storage.read_json("{hadoop.url}/user/rs/roundtrip/a/b/card.json")
            except StorageError as e:
                print("ERROR", e)
        """, timeout=180)
        took = time.monotonic() - started
    finally:
        hadoop.start_daemon("namenode")
        hadoop.wait_ready(120)
    write, line = result.stdout.strip().splitlines()[-2:]
    assert write.startswith("WRITE ") and f"{hadoop.url}/user/rs/while-down.bin: " in write, write
    assert float(write.split()[1]) < 30, write  # not the 90 s a lost DataNode may take
    assert line.startswith(f"ERROR {hadoop.url}/user/rs/roundtrip/a/b/card.json: "), line
    assert "cannot be reached" in line and "NameNode" in line
    assert took < 120


def test_a_datanode_killed_while_files_are_written_costs_a_pause_not_a_file(hdfs_rig):
    """Writes started right after a DataNode dies: the blocks the NameNode still places on it fail
    until it counts that DataNode as dead; the storage module writes again meanwhile, so every
    file arrives whole (replication 2 leaves one copy on the other DataNode)."""
    rig, hadoop = hdfs_rig
    hadoop.kill_daemon("datanode-worker2", signal.SIGKILL)
    try:
        result = _py(rig, "login", f"""
            import time
            from rs_cluster import storage
            started = time.monotonic()
            for i in range(8):
                data = bytes([i]) * (3 * 1024 * 1024)
                storage.write_bytes(f"{hadoop.url}/user/rs/during-loss/{{i}}.bin", data)
                assert storage.read_bytes(f"{hadoop.url}/user/rs/during-loss/{{i}}.bin") == data
            print("wrote 8 files in", round(time.monotonic() - started, 1), "s")
        """, timeout=400)
    finally:
        hadoop.start_daemon("datanode-worker2")
        hadoop.wait_ready(120)
    assert "wrote 8 files in" in result.stdout, result.stdout + result.stderr[-2000:]
