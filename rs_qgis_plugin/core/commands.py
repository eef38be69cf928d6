"""Remote command lines, built only from argument lists with every argument shell-quoted.

The remote side of an SSH exec request is a shell; these pure functions are the one place its
command line is made, so no user text (a layer name, a path) is ever read as shell syntax.
"""

from __future__ import annotations

import shlex
from typing import Sequence

from rs_qgis_plugin.core.profile import ConnectionProfile


def build_remote_command(argv: Sequence[str]) -> str:
    """``argv`` as one shell command line in which every element is a single literal word."""
    if isinstance(argv, (str, bytes)) or not argv:
        raise ValueError("build_remote_command takes a non-empty list of arguments")
    return " ".join(shlex.quote(str(a)) for a in argv)


def rs_cluster_argv(profile: ConnectionProfile, *args: str) -> list[str]:
    return [*profile.remote_command, *args]


def job_argv(profile: ConnectionProfile, action: str, *args: str, json: bool = True) -> list[str]:
    """``rs-cluster job ACTION --workspace WS [--json] ARGS...``."""
    argv = rs_cluster_argv(profile, "job", action, "--workspace", profile.workspace_path)
    if json and action != "events":
        argv.append("--json")
    return [*argv, *args]


# Hashes a file (or its first N bytes) with Python's hashlib, which uses the CPU's SHA extensions
# through OpenSSL: about three times as fast as coreutils' sha256sum on the same machine.
_SHA256_SCRIPT = """import hashlib, sys
h, n = hashlib.sha256(), int(sys.argv[2])
with open(sys.argv[1], "rb") as f:
    while n:
        b = f.read(1048576 if n < 0 else min(1048576, n))
        if not b:
            break
        h.update(b)
        n -= len(b) if n > 0 else 0
print(h.hexdigest())"""


def sha256_argv(path: str, limit: int | None = None, *, python: str = "python3") -> list[str]:
    """Prints the sha256 of ``path`` (or of its first ``limit`` bytes) as hex."""
    return [python, "-c", _SHA256_SCRIPT, path, str(-1 if limit is None else limit)]


# Hashes a file while it is being written, up to SIZE bytes, so an upload is verified moments
# after its last byte instead of after a second full read. Ends when the client goes away (its
# stdin closes) or when the file stops growing for a minute.
_FOLLOW_SHA256_SCRIPT = """import hashlib, os, select, sys, time
h, size, done, idle = hashlib.sha256(), int(sys.argv[2]), 0, time.monotonic()
with open(sys.argv[1], "rb") as f:
    while done < size:
        b = f.read(min(1048576, size - done))
        if b:
            h.update(b)
            done += len(b)
            idle = time.monotonic()
            continue
        if time.monotonic() - idle > 60:
            sys.exit("no new data for 60 s")
        if select.select([0], [], [], 0.05)[0] and not os.read(0, 1):
            sys.exit("client gone")
print(h.hexdigest())"""


def follow_sha256_argv(path: str, size: int, *, python: str = "python3") -> list[str]:
    """Prints the sha256 of the first ``size`` bytes of ``path``, waiting for them to be written."""
    return [python, "-c", _FOLLOW_SHA256_SCRIPT, path, str(size)]


def sha256sum_argv(path: str) -> list[str]:
    """The fallback where the cluster has no ``python3`` on its PATH (whole files only)."""
    return ["sha256sum", "--", path]
