"""Connection profiles: where the cluster is and how to reach it. Never holds a secret.

Passwords and key passphrases go through QGIS's authentication manager and are handed to
:meth:`rs_qgis_plugin.core.ssh.SshClient.connect` at connect time only.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from rs_qgis_plugin.core.errors import SpecError

DEFAULT_WORKSPACE = ".rs-cluster"


@dataclass(frozen=True)
class ConnectionProfile:
    name: str
    host: str
    user: str
    port: int = 22
    key_file: str | None = None
    use_agent: bool = False
    # Relative paths are relative to the remote home directory (for SFTP and commands alike).
    remote_workspace: str = DEFAULT_WORKSPACE
    remote_command: tuple[str, ...] = ("rs-cluster",)
    connect_timeout: float = 15.0
    keepalive_interval: int = 30

    def __post_init__(self) -> None:
        if not self.name or not self.host or not self.user:
            raise SpecError("a connection profile needs a name, a host and a user")
        if not 0 < int(self.port) < 65536:
            raise SpecError(f"port {self.port} is not a TCP port (1-65535)")
        if not self.key_file and not self.use_agent:
            raise SpecError(f"profile {self.name!r}: give a private key file or use the ssh-agent")
        if isinstance(self.remote_command, (str, bytes)) or not self.remote_command:
            raise SpecError("remote_command is an argument list, e.g. ['/opt/venv/bin/rs-cluster']")
        object.__setattr__(self, "remote_command", tuple(str(a) for a in self.remote_command))
        if self.connect_timeout <= 0:
            raise SpecError("connect_timeout must be positive")

    @property
    def workspace_path(self) -> str:
        """The workspace as both SFTP and the remote shell read it (``~/`` dropped: relative
        paths already start in the home directory, and SFTP does not expand ``~``)."""
        ws = self.remote_workspace
        if ws == "~":
            return "."
        return ws[2:] if ws.startswith("~/") else ws

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["remote_command"] = list(self.remote_command)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ConnectionProfile:
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(data) - known)
        if unknown:
            raise SpecError(f"unknown connection profile key(s): {', '.join(unknown)}")
        values = dict(data)
        if "remote_command" in values:
            values["remote_command"] = tuple(values["remote_command"])
        return cls(**values)
