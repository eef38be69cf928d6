"""A real OpenSSH server on 127.0.0.1 for tests and benchmarks, with its own keys and config.

    server = Sshd(tmp_dir); server.start(); ...; server.stop()

Everything (host key, user key, authorized_keys, sshd_config, pid file, log) lives in ``tmp_dir``;
the server runs in the foreground (``-D``) as the current user and is stopped by its pid. Its
environment is minimal, as on a cluster node reached over SSH.
"""

from __future__ import annotations

import getpass
import os
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Sequence

SSHD = "/usr/sbin/sshd"
SSH_KEYGEN = "ssh-keygen"


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def keygen(path: Path, kind: str = "ed25519") -> Path:
    if path.exists():
        path.unlink()
        path.with_suffix(".pub").unlink(missing_ok=True)
    subprocess.run([SSH_KEYGEN, "-q", "-t", kind, "-N", "", "-C", path.name, "-f", str(path)],
                   check=True)
    return path


def fingerprint(public_key: Path) -> str:
    """``SHA256:...`` as ``ssh-keygen -l`` prints it."""
    out = subprocess.run([SSH_KEYGEN, "-l", "-E", "sha256", "-f", str(public_key)],
                         capture_output=True, text=True, check=True).stdout
    return out.split()[1]


class Sshd:
    def __init__(self, base: Path, port: int | None = None, host: str = "127.0.0.1",
                 prefix: Sequence[str] = ()) -> None:
        """``host`` is the address it listens on; ``prefix`` goes before the sshd command (the
        multi-host rig runs it inside a host's mount namespace, see tests/rig.py)."""
        self.base = Path(base)
        self.base.mkdir(parents=True, exist_ok=True)
        self.host = host
        self.prefix = tuple(prefix)
        self.port = port or free_port(host)
        self.user = getpass.getuser()
        self.host_key = self.base / "ssh_host_ed25519_key"
        self.user_key = self.base / "id_ed25519"
        self.config = self.base / "sshd_config"
        self.log = self.base / "sshd.log"
        self.proc: subprocess.Popen[bytes] | None = None
        if not self.host_key.exists():
            keygen(self.host_key)
        if not self.user_key.exists():
            keygen(self.user_key)
        (self.base / "authorized_keys").write_bytes(self.user_key.with_suffix(".pub").read_bytes())
        self._write_config()

    def _write_config(self) -> None:
        self.config.write_text(f"""\
Port {self.port}
ListenAddress {self.host}
HostKey {self.host_key}
PidFile {self.base / "sshd.pid"}
AuthorizedKeysFile {self.base / "authorized_keys"}
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
StrictModes no
PermitRootLogin prohibit-password
PermitUserEnvironment no
X11Forwarding no
AllowTcpForwarding no
MaxStartups 50
MaxSessions 50
LogLevel VERBOSE
Subsystem sftp internal-sftp
""")

    @property
    def public_host_key(self) -> tuple[str, str]:
        """(key type, base64 key) of the server's host key, as known_hosts lists it."""
        key_type, key_b64 = self.host_key.with_suffix(".pub").read_text().split()[:2]
        return key_type, key_b64

    @property
    def host_key_fingerprint(self) -> str:
        return fingerprint(self.host_key.with_suffix(".pub"))

    def start(self, timeout: float = 10.0) -> Sshd:
        Path("/run/sshd").mkdir(exist_ok=True)  # sshd's privilege separation directory
        env = {"PATH": "/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin", "LANG": "C.UTF-8"}
        log = open(self.log, "ab")  # noqa: SIM115 - the server writes to it until stopped
        self.proc = subprocess.Popen([*self.prefix, SSHD, "-D", "-e", "-f", str(self.config)], env=env,
                                     stdout=log, stderr=log, stdin=subprocess.DEVNULL)
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"sshd exited: {self.log.read_text()[-2000:]}")
            try:
                with socket.create_connection((self.host, self.port), timeout=1) as s:
                    if s.recv(4).startswith(b"SSH-"):
                        return self
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"sshd did not listen on {self.port}: {self.log.read_text()[-2000:]}")

    def children(self) -> list[int]:
        """Pids of the per-connection sshd processes (children of the listener)."""
        if self.proc is None:
            return []
        out = subprocess.run(["pgrep", "-P", str(self.proc.pid)], capture_output=True,
                             text=True).stdout
        return [int(p) for p in out.split()]

    def kill_connections(self) -> int:
        """Cuts every open connection by killing the sshd processes serving them."""
        pids = self.children()
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        return len(pids)

    def stop(self) -> None:
        if self.proc is None:
            return
        self.kill_connections()
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.proc = None

    def new_host_key(self) -> None:
        """Replaces the host key (same type) and restarts: the server now looks like an impostor."""
        self.stop()
        keygen(self.host_key)
        self.start()

    def scp_argv(self, source: str, target: str) -> list[str]:
        """OpenSSH's ``scp`` to this server, trusting exactly its host key."""
        known = self.base / "scp_known_hosts"
        key_type, key_b64 = self.public_host_key
        known.write_text(f"[{self.host}]:{self.port} {key_type} {key_b64}\n")
        return ["scp", "-q", "-P", str(self.port), "-i", str(self.user_key),
                "-o", f"UserKnownHostsFile={known}", "-o", "StrictHostKeyChecking=yes",
                "-o", "BatchMode=yes", "-o", "IdentitiesOnly=yes", source, target]

    def __enter__(self) -> Sshd:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
