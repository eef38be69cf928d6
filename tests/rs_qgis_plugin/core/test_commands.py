"""Remote command lines are built from argument lists only; the exact strings are pinned here."""

from __future__ import annotations

import pytest

from rs_qgis_plugin.core.commands import build_remote_command, job_argv, rs_cluster_argv
from rs_qgis_plugin.core.profile import ConnectionProfile


@pytest.mark.parametrize("argv, expected", [
    (["rs-cluster", "env"], "rs-cluster env"),
    (["ls", "two words"], "ls 'two words'"),
    (["echo", "$(touch canary)"], "echo '$(touch canary)'"),
    (["echo", "a; rm -rf ~"], "echo 'a; rm -rf ~'"),
    (["echo", "it's"], "echo 'it'\"'\"'s'"),
    (["echo", "`id`", "$HOME", "*"], "echo '`id`' '$HOME' '*'"),
    (["echo", ""], "echo ''"),
    (["cat", "Bâtiments 建筑.tif"], "cat 'Bâtiments 建筑.tif'"),
    (["/opt/venv/bin/rs-cluster", "job", "status", "20260101-120000-ab12cd"],
     "/opt/venv/bin/rs-cluster job status 20260101-120000-ab12cd"),
])
def test_build_remote_command_quotes_every_argument(argv, expected):
    assert build_remote_command(argv) == expected


def test_build_remote_command_refuses_a_plain_string():
    with pytest.raises(ValueError):
        build_remote_command("rm -rf /")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        build_remote_command([])


def test_job_commands_use_the_profile_command_and_workspace():
    profile = ConnectionProfile(name="c", host="h", user="u", use_agent=True,
                                remote_workspace="~/jobs space",
                                remote_command=("/opt/venv/bin/python", "-m", "rs_cluster"))
    assert rs_cluster_argv(profile, "env") == ["/opt/venv/bin/python", "-m", "rs_cluster", "env"]
    assert job_argv(profile, "status", "j1") == [
        "/opt/venv/bin/python", "-m", "rs_cluster", "job", "status", "--workspace", "jobs space",
        "--json", "j1"]
    assert build_remote_command(job_argv(profile, "events", "j1", "--since", "5")) == (
        "/opt/venv/bin/python -m rs_cluster job events --workspace 'jobs space' j1 --since 5")
