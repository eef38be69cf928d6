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


def sha256_argv(path: str) -> list[str]:
    return ["sha256sum", "--", path]


def stat_size_argv(path: str) -> list[str]:
    return ["stat", "-c", "%s", "--", path]
