"""Upload throughput of the plugin's SFTP transfer against OpenSSH's ``scp``, in one run.

A 200 MB file of random bytes goes to a real sshd on 127.0.0.1 (tests/sshd.py) several times
through each, alternating so all see the same machine load. Ours is timed twice: the whole
verified upload (sha256 on both sides, ``.part`` file, rename) and the data phase alone, which is
what ``scp`` does; paramiko's stock ``SFTPClient.put`` is shown for reference. Prints MB/s of
each and the ratios to scp (target: ours >= 0.8x).

Needs paramiko (Debian's python3-paramiko): started with a Python that lacks it (the cluster venv,
as ``make bench`` does), it re-runs itself with the QGIS venv's Python.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
QGIS_PYTHON = REPO / ".venv-qgis" / "bin" / "python"

try:
    import paramiko  # noqa: F401
except ImportError:
    if QGIS_PYTHON.exists() and Path(sys.executable) != QGIS_PYTHON:
        os.execv(str(QGIS_PYTHON), [str(QGIS_PYTHON), *sys.argv])
    sys.exit("bench_transfer: needs paramiko (apt install python3-paramiko)")

sys.path.insert(0, str(REPO))

from rs_qgis_plugin.core.profile import ConnectionProfile  # noqa: E402
from rs_qgis_plugin.core.ssh import SshClient, trust_host_key  # noqa: E402
from rs_qgis_plugin.core.transfer import Transfers  # noqa: E402
from tests.sshd import Sshd  # noqa: E402

MB = 1 << 20


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mb", type=int, default=200)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    size = args.size_mb * MB
    load_before = os.getloadavg()[0]

    with tempfile.TemporaryDirectory(prefix="bench-transfer-") as tmp:
        base = Path(tmp)
        source = base / "source.bin"
        with open(source, "wb") as f:
            for _ in range(args.size_mb // 8):
                f.write(os.urandom(8 * MB))
        with Sshd(base / "sshd") as server:
            key_type, key_b64 = server.public_host_key
            trust_host_key(base / "known_hosts", "127.0.0.1", server.port, key_type, key_b64)
            profile = ConnectionProfile(name="bench", host="127.0.0.1", port=server.port,
                                        user=server.user, key_file=str(server.user_key))
            scp_s, ours_s, data_s, put_s = [], [], [], []
            with SshClient(profile, base / "known_hosts") as client:
                transfers = Transfers(client)
                for i in range(args.repeat):
                    target = base / "remote" / f"scp-{i}.bin"
                    target.parent.mkdir(exist_ok=True)
                    started = time.perf_counter()
                    subprocess.run(server.scp_argv(str(source), f"{server.user}@127.0.0.1:{target}"),
                                   check=True)
                    scp_s.append(time.perf_counter() - started)
                    assert target.stat().st_size == size
                    target.unlink()

                    marks: dict[str, float] = {}

                    def progress(done: int, total: int, percent: float,
                                 marks: dict[str, float] = marks) -> None:
                        # first call: sending starts; first call at 100%: the last byte was
                        # written (before the remote sha256 and the rename)
                        now = time.perf_counter()
                        marks.setdefault("first", now)
                        if done == total:
                            marks.setdefault("last", now)

                    target = base / "remote" / f"ours-{i}.bin"
                    started = time.perf_counter()
                    result = transfers.upload(source, str(target), progress=progress)
                    ours_s.append(time.perf_counter() - started)
                    data_s.append(marks["last"] - marks["first"])
                    assert result.size == size and not result.skipped
                    target.unlink()

                    target = base / "remote" / f"put-{i}.bin"  # paramiko's stock put()
                    started = time.perf_counter()
                    client.sftp().put(str(source), str(target))
                    put_s.append(time.perf_counter() - started)
                    target.unlink()

    def rate(seconds: list[float]) -> float:
        return size / MB / statistics.median(seconds)

    scp, ours, data, put = rate(scp_s), rate(ours_s), rate(data_s), rate(put_s)
    print(f"file: {args.size_mb} MB over loopback sshd, median of {args.repeat}, "
          f"paramiko {paramiko.__version__}")
    print(f"scp (OpenSSH, baseline)             {scp:8.1f} MB/s")
    print(f"ours, verified upload (sha256 both) {ours:8.1f} MB/s   ratio {ours / scp:.2f}x scp")
    print(f"ours, data phase only               {data:8.1f} MB/s   ratio {data / scp:.2f}x scp")
    print(f"paramiko SFTPClient.put (stock)     {put:8.1f} MB/s   ratio {put / scp:.2f}x scp")
    print(f"target: ours >= 0.80x scp  (load average {load_before:.1f} -> {os.getloadavg()[0]:.1f} "
          f"on {os.cpu_count()} CPUs: sshd shares them with both clients)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
