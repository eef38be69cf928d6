"""The SSH client: paramiko with strict host key checking, keys from a file or the agent.

Host keys live in the plugin's own ``known_hosts`` file. An unknown key is never accepted
silently: :class:`UnknownHostKeyError` carries its type and SHA256 fingerprint so the GUI can ask
the user, then :func:`trust_host_key` records it. A key that changed is refused outright.
Works with paramiko 2.12 (Debian 12, QGIS's Python) and 3.x.
"""

from __future__ import annotations

import base64
import hashlib
import os
import select
import socket
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, Sequence

import paramiko

from rs_qgis_plugin.core.commands import build_remote_command
from rs_qgis_plugin.core.errors import (
    AuthenticationError,
    CancelledError,
    HostKeyChangedError,
    HostUnreachableError,
    RemoteCommandError,
    UnknownHostKeyError,
)
from rs_qgis_plugin.core.profile import ConnectionProfile


def _cheap_message_repr(self: paramiko.Message) -> str:
    return f"<paramiko.Message of {len(self.asbytes())} bytes>"


# paramiko 2.x's asbytes() formats repr(message) (a hex dump of the whole packet) into an exception
# it then catches, for every packet sent: two thirds of an upload's CPU time. Only that debug
# representation changes here; paramiko 3 no longer calls it.
if int(paramiko.__version__.split(".")[0]) < 3:
    paramiko.Message.__repr__ = _cheap_message_repr  # type: ignore[method-assign]

# Large windows keep many SFTP requests in flight, so throughput is not bound by round trips.
WINDOW_SIZE = 64 * 1024 * 1024
MAX_PACKET_SIZE = 32768


class CancelFlag(Protocol):
    """Anything with ``is_set()``: a ``threading.Event``, or an adapter over ``QgsTask.isCanceled``."""

    def is_set(self) -> bool: ...


def key_fingerprint(key: paramiko.PKey) -> str:
    """``SHA256:<base64>``, the form ``ssh-keygen -l`` and OpenSSH's prompts show."""
    digest = hashlib.sha256(key.asbytes()).digest()
    return "SHA256:" + base64.b64encode(digest).decode("ascii").rstrip("=")


def known_hosts_name(host: str, port: int) -> str:
    return host if port == 22 else f"[{host}]:{port}"


def connect_failure(error: BaseException) -> str:
    """Why a connection failed, in words: paramiko's "could not connect to any address" error
    reads "[Errno None] Unable to connect to port 22 on ..."; the reasons are its ``errors``."""
    causes = list(getattr(error, "errors", {}).values()) or [error]
    reasons = []
    for cause in causes:
        errno_ = getattr(cause, "errno", None)
        text = os.strerror(errno_) if errno_ else getattr(cause, "strerror", None) or str(cause)
        text = text[:1].lower() + text[1:]
        if text not in reasons:
            reasons.append(text)
    return "; ".join(reasons) or type(error).__name__


def trust_host_key(known_hosts: str | os.PathLike[str], host: str, port: int, key_type: str,
                   key_base64: str) -> None:
    """Records a host key the user accepted (replacing any older key of that type for the host)."""
    path = Path(known_hosts)
    path.parent.mkdir(parents=True, exist_ok=True)
    keys = paramiko.HostKeys()
    if path.exists():
        keys.load(str(path))
    name = known_hosts_name(host, port)
    entry = paramiko.hostkeys.HostKeyEntry.from_line(f"{name} {key_type} {key_base64}")
    if entry is None or entry.key is None:
        raise ValueError(f"not a usable {key_type} key")
    keys.add(name, key_type, entry.key)
    fd, tmp = tempfile.mkstemp(prefix=".known_hosts.", dir=path.parent)
    os.close(fd)
    keys.save(tmp)
    os.replace(tmp, path)


class _RejectUnknownHostKey(paramiko.MissingHostKeyPolicy):
    def __init__(self, host: str, port: int) -> None:
        self._host, self._port = host, port

    def missing_host_key(self, client: paramiko.SSHClient, hostname: str, key: paramiko.PKey) -> None:
        fp = key_fingerprint(key)
        raise UnknownHostKeyError(
            f"the host key of {self._host}:{self._port} is not known yet ({key.get_name()} "
            f"{fp}); check it with the cluster's administrator before trusting it",
            host=self._host, port=self._port, key_type=key.get_name(),
            key_base64=key.get_base64(), fingerprint=fp)


@dataclass(frozen=True)
class CommandResult:
    argv: tuple[str, ...]
    exit_status: int
    stdout: str
    stderr: str


class SshClient:
    """One SSH connection for a profile; reconnects on demand (after a dropped link)."""

    def __init__(self, profile: ConnectionProfile, known_hosts: str | os.PathLike[str]) -> None:
        self.profile = profile
        self.known_hosts = Path(known_hosts)
        self._client: paramiko.SSHClient | None = None
        self._sftp: paramiko.SFTPClient | None = None
        self._passphrase: str | None = None

    # -- connection ---------------------------------------------------------------------------------
    def connect(self, passphrase: str | None = None) -> SshClient:
        """Opens the connection; raises a :class:`RsPluginError` subclass the user can act on."""
        self.close()
        if passphrase is not None:
            self._passphrase = passphrase
        p = self.profile
        client = paramiko.SSHClient()
        if self.known_hosts.exists():
            client.load_host_keys(str(self.known_hosts))
        client.set_missing_host_key_policy(_RejectUnknownHostKey(p.host, p.port))
        where = f"{p.user}@{p.host}:{p.port}"
        try:
            client.connect(
                p.host, port=p.port, username=p.user,
                key_filename=os.path.expanduser(p.key_file) if p.key_file else None,
                passphrase=self._passphrase, allow_agent=p.use_agent, look_for_keys=False,
                timeout=p.connect_timeout, banner_timeout=p.connect_timeout,
                auth_timeout=p.connect_timeout, transport_factory=_transport_factory)
        except paramiko.BadHostKeyException as e:
            client.close()
            got, expected = e.key, e.expected_key
            raise HostKeyChangedError(
                f"the host key of {p.host}:{p.port} has CHANGED (now {got.get_name()} "
                f"{key_fingerprint(got)}, trusted: {key_fingerprint(expected)}). Someone may be "
                "intercepting the connection, or the server was reinstalled: check with its "
                "administrator before trusting the new key",
                host=p.host, port=p.port, key_type=got.get_name(), key_base64=got.get_base64(),
                fingerprint=key_fingerprint(got),
                expected_fingerprint=key_fingerprint(expected)) from None
        except UnknownHostKeyError:
            client.close()
            raise
        except paramiko.PasswordRequiredException:
            client.close()
            raise AuthenticationError(f"the key {p.key_file} is protected by a passphrase; "
                                      "enter it in the connection settings") from None
        except paramiko.AuthenticationException as e:
            client.close()
            how = f"the key {p.key_file}" if p.key_file else "the keys of the ssh-agent"
            raise AuthenticationError(f"{where} refused {how} ({e}); check the user name and "
                                      "that the public key is in ~/.ssh/authorized_keys "
                                      "on the cluster") from None
        except (socket.timeout, TimeoutError) as e:
            client.close()
            raise HostUnreachableError(f"{p.host}:{p.port} did not answer within "
                                       f"{p.connect_timeout:g} s ({e or 'timed out'})") from None
        except (paramiko.SSHException, OSError) as e:
            client.close()
            if isinstance(e, FileNotFoundError):
                raise AuthenticationError(f"key file {p.key_file} does not exist") from None
            raise HostUnreachableError(
                f"cannot connect to {p.host}:{p.port}: {connect_failure(e)}") from None
        transport = client.get_transport()
        assert transport is not None  # connect() succeeded
        transport.set_keepalive(p.keepalive_interval)
        self._client = client
        return self

    def close(self) -> None:
        if self._sftp is not None:
            try:
                self._sftp.close()
            except (OSError, EOFError, paramiko.SSHException):
                pass
            self._sftp = None
        if self._client is not None:
            self._client.close()
            self._client = None

    @property
    def connected(self) -> bool:
        t = self._client.get_transport() if self._client else None
        return bool(t and t.is_active())

    def ensure_connected(self) -> None:
        if not self.connected:
            self.connect()

    @property
    def transport(self) -> paramiko.Transport:
        self.ensure_connected()
        assert self._client is not None
        transport = self._client.get_transport()
        assert transport is not None
        return transport

    def sftp(self) -> paramiko.SFTPClient:
        if self._sftp is None or not self.connected:
            self._sftp = paramiko.SFTPClient.from_transport(
                self.transport, window_size=WINDOW_SIZE, max_packet_size=MAX_PACKET_SIZE)
            assert self._sftp is not None
        return self._sftp

    def __enter__(self) -> SshClient:
        if not self.connected:
            self.connect()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- commands -----------------------------------------------------------------------------------
    def run(self, argv: Sequence[str], *, check: bool = True, timeout: float | None = 300.0,
            cancel: CancelFlag | None = None, stdin: bytes | None = None) -> CommandResult:
        """Runs ``argv`` on the server (every argument quoted) and waits for it to end."""
        return self.run_command_line(build_remote_command(argv), check=check, timeout=timeout,
                                     cancel=cancel, stdin=stdin, argv=tuple(argv))

    def run_command_line(self, command: str, *, check: bool = True,
                         timeout: float | None = 300.0, cancel: CancelFlag | None = None,
                         stdin: bytes | None = None, argv: tuple[str, ...] = ()) -> CommandResult:
        """Runs a command line made by :func:`build_remote_command` (or several joined by a pipe)."""
        channel = self.start_command_line(command)
        try:
            if stdin is not None:
                channel.sendall(stdin)
            channel.shutdown_write()
        except BaseException:
            channel.close()
            raise
        return self.collect(channel, command, check=check, timeout=timeout, cancel=cancel,
                            argv=argv)

    def start_command_line(self, command: str) -> paramiko.Channel:
        """Starts a command and returns at once; finish it with :meth:`collect`."""
        channel = self.transport.open_session(timeout=self.profile.connect_timeout)
        try:
            channel.exec_command(command)
        except BaseException:
            channel.close()
            raise
        return channel

    def collect(self, channel: paramiko.Channel, command: str, *, check: bool = True,
                timeout: float | None = 300.0, cancel: CancelFlag | None = None,
                argv: tuple[str, ...] = ()) -> CommandResult:
        """Reads a started command's output until it exits, then closes its channel."""
        try:
            out, err = bytearray(), bytearray()
            deadline = None if timeout is None else time.monotonic() + timeout
            while True:
                if channel.recv_ready():
                    out += channel.recv(1 << 20)
                elif channel.recv_stderr_ready():
                    err += channel.recv_stderr(1 << 20)
                elif channel.exit_status_ready() and channel.eof_received:
                    break
                elif channel.closed or not self.connected:
                    raise EOFError(f"the connection to {self.profile.host} dropped while "
                                   f"running {command[:80]}")
                else:
                    if cancel is not None and cancel.is_set():
                        raise CancelledError(f"cancelled while running {command[:80]}")
                    if deadline is not None and time.monotonic() > deadline:
                        raise RemoteCommandError(f"{command} did not finish within {timeout:g} s",
                                                 command=command)
                    select.select([channel], [], [], 0.1)
            result = CommandResult(argv or (command,), channel.recv_exit_status(),
                                   out.decode("utf-8", "replace"), err.decode("utf-8", "replace"))
        finally:
            channel.close()
        if check and result.exit_status != 0:
            last = (result.stderr.strip().splitlines() or ["(no message)"])[-1]
            raise RemoteCommandError(f"{result.argv[0]} failed on {self.profile.host} "
                                     f"(exit {result.exit_status}): {last}", command=command,
                                     exit_status=result.exit_status, stderr=result.stderr)
        return result


def _transport_factory(sock: Any, **kwargs: Any) -> paramiko.Transport:
    return paramiko.Transport(sock, default_window_size=WINDOW_SIZE,
                              default_max_packet_size=MAX_PACKET_SIZE, **kwargs)
