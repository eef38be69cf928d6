"""Exceptions raised by the plugin core.

Every error derives from :class:`RsPluginError`; each subclass also inherits the matching builtin
(rasterio's pattern). Messages say what happened and what the analyst can do about it.
"""

from __future__ import annotations


class RsPluginError(Exception):
    """Root of every error the plugin raises on purpose."""


class SpecError(RsPluginError, ValueError):
    """A job spec or connection profile is invalid (unknown stage, parameter or value)."""


class ProtocolError(RsPluginError, ValueError):
    """The cluster answered something this plugin cannot read (wrong version, not JSON)."""


class HostUnreachableError(RsPluginError, ConnectionError):
    """The host did not answer or refused the connection within the timeout."""


class AuthenticationError(RsPluginError, PermissionError):
    """The server refused our key (wrong key, wrong user, no key in the agent)."""


class HostKeyError(RsPluginError, ConnectionError):
    """Base for host key problems; carries the server's key so the GUI can show it."""

    def __init__(self, message: str, *, host: str, port: int, key_type: str, key_base64: str,
                 fingerprint: str) -> None:
        super().__init__(message)
        self.host = host
        self.port = port
        self.key_type = key_type
        self.key_base64 = key_base64
        self.fingerprint = fingerprint


class UnknownHostKeyError(HostKeyError):
    """The server's key is not in the plugin's known_hosts: ask the user to check the fingerprint,
    then call :func:`rs_qgis_plugin.core.ssh.trust_host_key`."""


class HostKeyChangedError(HostKeyError):
    """The server's key differs from the one trusted before: possibly an attack; refused."""

    def __init__(self, message: str, *, expected_fingerprint: str, **kwargs: object) -> None:
        super().__init__(message, **kwargs)  # type: ignore[arg-type]
        self.expected_fingerprint = expected_fingerprint


class RemoteCommandError(RsPluginError, RuntimeError):
    """A command on the cluster failed; carries its exit status and the last line it printed."""

    def __init__(self, message: str, *, command: str = "", exit_status: int | None = None,
                 stderr: str = "") -> None:
        super().__init__(message)
        self.command = command
        self.exit_status = exit_status
        self.stderr = stderr


class TransferError(RsPluginError, OSError):
    """An upload or download failed (connection lost and not resumable, disk full)."""


class ChecksumMismatchError(TransferError):
    """A transferred file's sha256 differs from the source's: the copy was discarded."""


class CancelledError(RsPluginError):
    """The user cancelled the operation."""


class UnsafeRemoteNameError(ProtocolError):
    """A file name or link the cluster sent back would land outside the local results folder, or
    cannot be held safely on this computer (a Windows device name, say): refused, and nothing of
    that download was written."""
