"""Jobs on the cluster side: spec validation, the detached runner, status, events, cancel.

Jobs run the real ``rs-cluster`` runner and the test-only ``sleep`` stage in real processes,
through the tests' entry point (tests/cluster_selftest.py).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from rs_cluster.errors import ConfigError
from rs_cluster.jobspec import STAGES, parse_job_spec, resolve_in_job, step_argv

from tests import cluster_selftest
from tests.procs import job_pids, wait_for

REPO = Path(__file__).resolve().parents[2]


def cli(workspace: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """``rs-cluster`` with the sleep stage (the tests' entry point)."""
    env = {**os.environ, "PYTHONPATH": cluster_selftest.pythonpath()}
    proc = subprocess.run([sys.executable, "-m", cluster_selftest.ENTRY_MODULE, "--quiet", *args[:2],
                           "--workspace", str(workspace), *args[2:]],
                          capture_output=True, text=True, env=env, timeout=60)
    if check and proc.returncode != 0:
        raise AssertionError(f"rs-cluster {args} failed ({proc.returncode}): {proc.stderr}")
    return proc


ENDED = ("succeeded", "failed", "cancelled")


def sleep_spec(job_id: str, **params: object) -> dict:
    return {"schema_version": 1, "job_id": job_id, "name": f"sleep {job_id}",
            "steps": [{"stage": "sleep", "params": {"seconds": 1, "steps": 4, **params}}]}


def write_spec(tmp_path: Path, spec: dict) -> Path:
    path = tmp_path / f"{spec['job_id']}.json"
    path.write_text(json.dumps(spec))
    return path


def status_of(workspace: Path, job_id: str) -> dict:
    return json.loads(cli(workspace, "job", "status", job_id, "--json").stdout)


# -- spec ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("change, message", [
    ({"schema_version": 2}, "schema_version 2 is not supported"),
    ({"colour": "red"}, "unknown key(s) in the job spec: colour"),
    ({"job_id": "../x"}, "job id"),
    ({"steps": []}, "non-empty list"),
    ({"steps": [{"stage": "shell", "params": {}}]}, "steps[0].stage 'shell'"),
    ({"steps": [{"stage": "prepare", "params": {"images": "/etc"}}]}, "relative to the job folder"),
    ({"steps": [{"stage": "prepare", "params": {"images": "inputs/../../x"}}]}, "'..' is not allowed"),
    ({"steps": [{"stage": "prepare", "params": {"images": "~root"}}]}, "relative to the job folder"),
    ({"steps": [{"stage": "prepare", "params": {"exec": "x"}}]}, "unknown parameter"),
    ({"steps": [{"stage": "prepare", "params": {"tile_size": "128; rm -rf /"}}]}, "integer"),
    ({"steps": [{"stage": "prepare", "params": {"master": "--conf=x"}}]}, "must not start with '-'"),
    ({"steps": [{"stage": "prepare", "params": {"overwrite": "yes"}}]}, "true or false"),
    # a model is a path in the job folder or a built-in model's name, nothing else
    ({"steps": [{"stage": "predict", "params": {"model": "/srv/models/m"}}]}, "relative to the job folder"),
    ({"steps": [{"stage": "predict", "params": {"model": "models/../../x"}}]}, "'..' is not allowed"),
    ({"steps": [{"stage": "train", "params": {"init_model": "~/builtin"}}]}, "relative to the job folder"),
])
def test_bad_specs_are_refused_naming_the_problem(tmp_path, change, message):
    spec = {**sleep_spec("bad"), **change}
    with pytest.raises(ConfigError) as e:
        parse_job_spec(spec, tmp_path)
    assert message in str(e.value)


def test_symlink_out_of_the_job_folder_is_refused(tmp_path):
    job = tmp_path / "job"
    (job / "inputs").mkdir(parents=True)
    (job / "inputs" / "images").symlink_to("/etc")
    spec = {"schema_version": 1, "job_id": "j", "steps": [
        {"stage": "prepare", "params": {"images": "inputs/images"}}]}
    with pytest.raises(ConfigError, match="outside the job folder"):
        parse_job_spec(spec, job)


def test_step_becomes_an_argument_list_of_whitelisted_options(tmp_path):
    spec = parse_job_spec({"schema_version": 1, "job_id": "j", "steps": [{"stage": "prepare", "params": {
        "images": "inputs/my images", "masks": "inputs/masks", "output": "outputs/ds",
        "tile_size": 128, "split": [0.8, 0.1, 0.1], "overwrite": True, "skip_bad": False}}]},
        tmp_path)
    root = tmp_path.resolve()
    assert step_argv(spec.steps[0], tmp_path) == [
        "prepare", "--images", str(root / "inputs/my images"), "--masks", str(root / "inputs/masks"),
        "--output", str(root / "outputs/ds"), "--tile-size=128", "--split=0.8,0.1,0.1", "--overwrite"]
    assert spec.outputs() == ["outputs/ds"]
    assert resolve_in_job(tmp_path, "outputs") == root / "outputs"


def test_a_built_in_model_is_passed_by_name_and_a_model_folder_as_a_path(tmp_path):
    spec = parse_job_spec({"schema_version": 1, "job_id": "j", "steps": [
        {"stage": "predict", "params": {"model": "builtin", "input": "inputs/images",
                                        "output": "outputs/masks"}},
        {"stage": "train", "params": {"data": "d", "model_dir": "m", "init_model": "builtin:v2"}},
        {"stage": "predict", "params": {"model": "inputs/builtin", "input": "i", "output": "o"}}]},
        tmp_path)
    root = tmp_path.resolve()
    assert step_argv(spec.steps[0], tmp_path)[:2] == ["predict", "--model=builtin"]
    assert step_argv(spec.steps[1], tmp_path, root_url="s3://b/j")[-1] == "--init-model=builtin:v2"
    assert step_argv(spec.steps[2], tmp_path)[1:3] == ["--model", str(root / "inputs/builtin")]


def test_every_whitelisted_parameter_is_an_option_of_its_stage_command():
    from rs_cluster.cli import build_parser

    parser = build_parser()
    commands = next(a for a in parser._actions if a.dest == "command").choices
    for stage, (command, rules) in STAGES.items():
        options = {o for a in commands[command]._actions for o in a.option_strings}
        assert {r.option for r in rules.values()} <= options, stage


def test_production_rs_cluster_has_no_test_stage(tmp_path):
    """The sleep self-test stage (it starts processes on request) exists only in the tests' entry
    point: the production whitelist and CLI refuse it."""
    assert "sleep" not in STAGES
    with pytest.raises(ConfigError, match=r"steps\[0\]\.stage 'sleep' is not one of prepare, "
                                          "train, predict, evaluate"):
        parse_job_spec(sleep_spec("s1"))
    env = {**os.environ, "PYTHONPATH": str(REPO / "cluster_side")}
    spec = write_spec(tmp_path, sleep_spec("s1"))
    proc = subprocess.run([sys.executable, "-m", "rs_cluster", "job", "submit", "--workspace",
                           str(tmp_path / "ws"), str(spec)], capture_output=True, text=True,
                          env=env, timeout=60)
    assert proc.returncode == 2 and "stage 'sleep' is not one of" in proc.stderr
    assert not (tmp_path / "ws" / "jobs" / "s1").exists()
    proc = subprocess.run([sys.executable, "-m", "rs_cluster", "selftest-sleep"],
                          capture_output=True, text=True, env=env, timeout=60)
    assert proc.returncode == 2 and "invalid choice: 'selftest-sleep'" in proc.stderr


def test_submit_refuses_an_unknown_schema_version(tmp_path):
    spec = write_spec(tmp_path, {**sleep_spec("v9"), "schema_version": 9})
    proc = cli(tmp_path / "ws", "job", "submit", str(spec), check=False)
    assert proc.returncode == 2
    assert "schema_version 9 is not supported" in proc.stderr
    assert not (tmp_path / "ws" / "jobs" / "v9").exists()


def test_submit_refuses_a_job_folder_outside_the_workspace(tmp_path):
    job = tmp_path / "elsewhere" / "j1"
    job.mkdir(parents=True)
    (job / "job.json").write_text(json.dumps(sleep_spec("j1")))
    proc = cli(tmp_path / "ws", "job", "submit", str(job), check=False)
    assert proc.returncode == 2 and "is not the folder of job 'j1'" in proc.stderr


# -- running jobs -------------------------------------------------------------------------------

def test_job_runs_detached_and_reports_status_and_events(tmp_path):
    ws = tmp_path / "ws"
    spec = write_spec(tmp_path, sleep_spec("ok1"))
    started = time.monotonic()
    out = cli(ws, "job", "submit", str(spec), "--json").stdout
    assert time.monotonic() - started < 10  # submit returns while the job runs
    submitted = json.loads(out)
    assert submitted["job_id"] == "ok1" and submitted["state"] in ("running", "succeeded")
    running = status_of(ws, "ok1")
    assert running["pid"] and running["state"] in ("running", "succeeded")

    final = wait_for(lambda: (s := status_of(ws, "ok1"))["state"] == "succeeded" and s)
    assert final["progress"] == 100.0 and final["exit_code"] == 0 and final["finished"]
    # no warnings, no train step: the plain message (tests/cluster_side/test_job_events.py)
    assert (final["message"], final["warnings"], final["verdict"]) == ("done", 0, None)
    events = [json.loads(x) for x in cli(ws, "job", "events", "ok1").stdout.splitlines()]
    sleep_progress = [e for e in events if e["stage"] == "sleep" and e["event"] == "progress"]
    assert [e["done"] for e in sleep_progress] == [1, 2, 3, 4]
    later = cli(ws, "job", "events", "ok1", "--since", str(len(events) - 1)).stdout.splitlines()
    assert [json.loads(x) for x in later] == events[-1:]
    assert "selftest-sleep" in (ws / "jobs" / "ok1" / "log.txt").read_text()
    listed = json.loads(cli(ws, "job", "list", "--json").stdout)
    assert [(j["job_id"], j["state"]) for j in listed] == [("ok1", "succeeded")]
    cli(ws, "job", "clean", "ok1")
    assert not (ws / "jobs" / "ok1").exists()


def test_job_log_prints_the_last_lines_of_a_long_log(tmp_path):
    ws = tmp_path / "ws"
    cli(ws, "job", "submit", str(write_spec(tmp_path, sleep_spec("log1", seconds=0.1))))
    wait_for(lambda: status_of(ws, "log1")["state"] == "succeeded")
    log = ws / "jobs" / "log1" / "log.txt"
    ended = log.read_text().splitlines()[-1]
    with open(log, "a") as f:  # a long log: only its end is read, never the whole file
        f.writelines(f"line {i} " + "x" * 100 + "\n" for i in range(3000))
    tail = cli(ws, "job", "log", "log1", "--tail", "3").stdout.splitlines()
    assert tail == [f"line {i} " + "x" * 100 for i in (2997, 2998, 2999)]
    assert ended not in cli(ws, "job", "log", "log1", "--tail", "1000").stdout
    missing = cli(ws, "job", "log", "nojob", check=False)
    assert missing.returncode != 0 and "nojob" in missing.stderr


def test_failing_step_marks_the_job_failed_with_the_error(tmp_path):
    ws = tmp_path / "ws"
    cli(ws, "job", "submit", str(write_spec(tmp_path, sleep_spec("bad1", seconds=0.2, fail=True))))
    final = wait_for(lambda: (s := status_of(ws, "bad1"))["state"] == "failed" and s)
    assert "failed on purpose" in final["message"]
    assert final["exit_code"] != 0


def test_runner_killed_outright_is_reported_failed(tmp_path):
    ws = tmp_path / "ws"
    cli(ws, "job", "submit", str(write_spec(tmp_path, sleep_spec("dead1", seconds=60))))
    status = status_of(ws, "dead1")
    os.kill(status["pid"], signal.SIGKILL)
    wait_for(lambda: not psutil.pid_exists(status["pid"]))
    final = status_of(ws, "dead1")
    assert final["state"] == "failed"
    assert f"pid {status['pid']}" in final["message"] and "killed" in final["message"]
    cli(ws, "job", "cancel", "dead1")  # stops the orphaned step too
    assert job_pids("dead1") == []


def test_cancel_stops_every_process_of_the_job(tmp_path):
    ws = tmp_path / "ws"
    cli(ws, "job", "submit", str(write_spec(tmp_path, sleep_spec("can1", seconds=60, children=3))))
    # runner + step + 3 children, one of which left the job's session as a JVM might
    wait_for(lambda: len(job_pids("can1")) >= 5)
    session = status_of(ws, "can1")["pgid"]
    out = json.loads(cli(ws, "job", "cancel", "can1", "--json").stdout)
    assert out["state"] == "cancelled"
    assert job_pids("can1") == []
    left = []
    for proc in psutil.process_iter():
        try:
            if os.getsid(proc.pid) == session:
                left.append(proc.pid)
        except OSError:
            continue
    assert left == []
    assert status_of(ws, "can1")["state"] == "cancelled"
    assert cli(ws, "job", "clean", "can1").returncode == 0


def test_clean_refuses_a_running_job_and_unknown_jobs(tmp_path):
    ws = tmp_path / "ws"
    cli(ws, "job", "submit", str(write_spec(tmp_path, sleep_spec("run1", seconds=60))))
    proc = cli(ws, "job", "clean", "run1", check=False)
    assert proc.returncode == 2 and "still running; cancel it first" in proc.stderr
    cli(ws, "job", "cancel", "run1")
    missing = cli(ws, "job", "status", "nope", check=False)
    assert missing.returncode == 2 and "no job 'nope'" in missing.stderr


def test_env_reports_versions_as_json():
    out = subprocess.run([sys.executable, "-m", "rs_cluster", "env"], capture_output=True,
                         text=True, check=True, timeout=60,
                         env={**os.environ, "PYTHONPATH": str(REPO / "cluster_side")}).stdout
    info = json.loads(out)
    assert info["python"] == ".".join(map(str, sys.version_info[:3]))
    assert {"rs_cluster", "spark", "horovod", "tensorflow", "gpus"} <= set(info)
    assert isinstance(info["gpus"], list)


# -- privacy --------------------------------------------------------------------------------------

def modes(root: Path) -> dict[str, int]:
    """Permission bits of ``root`` and everything under it, by path relative to ``root``."""
    found = {".": root.stat().st_mode & 0o777}
    for path in root.rglob("*"):
        found[str(path.relative_to(root))] = path.lstat().st_mode & 0o777
    return found


def test_the_workspace_and_everything_a_job_writes_are_private_under_umask_022(tmp_path):
    """On a login node with the usual umask 022, no other user may read another's imagery,
    models or results: folders are 0700, files 0600."""
    ws = tmp_path / "ws"
    spec = write_spec(tmp_path, sleep_spec("priv1", seconds=0.2, steps=2, output="outputs/result.txt"))
    env = {**os.environ, "PYTHONPATH": cluster_selftest.pythonpath()}
    subprocess.run([sys.executable, "-m", cluster_selftest.ENTRY_MODULE, "--quiet", "job", "submit",
                    "--workspace", str(ws), str(spec)], check=True, env=env, umask=0o022,
                   capture_output=True, timeout=60)
    wait_for(lambda: status_of(ws, "priv1")["state"] == "succeeded")
    found = modes(ws)
    job = "jobs/priv1"
    assert {f"{job}/status.json", f"{job}/job.json", f"{job}/events.jsonl", f"{job}/log.txt",
            f"{job}/outputs/result.txt"} <= set(found)
    folders = {p for p in found if (ws / p).is_dir()}
    assert {".", "jobs", job, f"{job}/inputs", f"{job}/outputs"} <= folders
    assert {p: m for p, m in found.items() if p in folders and m != 0o700} == {}
    assert {p: m for p, m in found.items() if p not in folders and m != 0o600} == {}


def test_an_existing_workspace_open_to_others_is_tightened_on_first_use(tmp_path):
    ws = tmp_path / "ws"
    (ws / "jobs" / "old-job").mkdir(parents=True)
    for folder in (ws, ws / "jobs", ws / "jobs" / "old-job"):
        folder.chmod(0o755)
    cli(ws, "job", "list")
    assert (ws.stat().st_mode & 0o777, (ws / "jobs").stat().st_mode & 0o777) == (0o700, 0o700)


# -- cleaning -------------------------------------------------------------------------------------

def backdate(ws: Path, job_id: str, days: float) -> None:
    """Makes a finished job look ``days`` older, as if it had ended that long ago."""
    from datetime import datetime, timedelta, timezone

    path = ws / "jobs" / job_id / "status.json"
    status = json.loads(path.read_text())
    when = datetime.now(timezone.utc) - timedelta(days=days)
    status.update(finished=when.isoformat(), submitted=when.isoformat())
    path.write_text(json.dumps(status))


def test_clean_older_than_removes_only_jobs_that_ended_before_then(tmp_path):
    ws = tmp_path / "ws"
    for job_id in ("old-ok", "old-bad", "new-ok"):
        cli(ws, "job", "submit", str(write_spec(tmp_path, sleep_spec(
            job_id, seconds=0.1, steps=1, fail=job_id == "old-bad"))))
    cli(ws, "job", "submit", str(write_spec(tmp_path, sleep_spec("busy", seconds=60))))
    for job_id in ("old-ok", "old-bad", "new-ok"):
        wait_for(lambda j=job_id: status_of(ws, j)["state"] in ("succeeded", "failed"))
    backdate(ws, "old-ok", 8)
    backdate(ws, "old-bad", 10)
    backdate(ws, "busy", 30)  # an active job is never cleaned, however old it looks

    out = json.loads(cli(ws, "job", "clean", "--older-than", "7d", "--json").stdout)
    assert sorted(out["cleaned"]) == ["old-bad", "old-ok"]
    assert sorted(p.name for p in (ws / "jobs").iterdir()) == ["busy", "new-ok"]

    text = cli(ws, "job", "clean", "--older-than", "0s").stdout
    assert "new-ok" in text and "busy" not in text
    assert [p.name for p in (ws / "jobs").iterdir()] == ["busy"]
    assert status_of(ws, "busy")["state"] == "running"
    cli(ws, "job", "cancel", "busy")
    cli(ws, "job", "clean", "busy")  # one job by its id still works
    assert list((ws / "jobs").iterdir()) == []


@pytest.mark.parametrize("duration", ["7", "7x", "-1d", "d", "1.5.2h"])
def test_clean_older_than_refuses_a_duration_it_cannot_read(tmp_path, duration):
    proc = cli(tmp_path / "ws", "job", "clean", f"--older-than={duration}", check=False)
    assert proc.returncode == 2
    assert f"--older-than {duration!r}" in proc.stderr and "e.g. 7d, 12h, 30m" in proc.stderr


# -- races ----------------------------------------------------------------------------------------

def test_a_late_submit_never_overwrites_what_the_runner_wrote(tmp_path, monkeypatch):
    """submit reads "queued", then the runner starts, runs and ends the job, then submit writes
    back its stale copy. The pause between submit's read and its write is forced by holding up
    submit's check of the runner's pid until the job has ended (the runner is real)."""
    from rs_cluster import jobs

    entry = cluster_selftest.install(monkeypatch)
    workspace = jobs.Workspace(tmp_path / "ws")
    job_dir = workspace.job_dir("late1")
    real_start_time = jobs._process_start_time

    def slow_start_time(pid):
        wait_for(lambda: json.loads((job_dir / "status.json").read_text())["state"] == "succeeded",
                 what="the runner to finish the job")
        return real_start_time(pid)

    monkeypatch.setattr(jobs, "_process_start_time", slow_start_time)
    spec = write_spec(tmp_path, sleep_spec("late1", seconds=0.1, steps=1))
    returned = jobs.submit(workspace, spec, wait_s=0, entry_module=entry)
    monkeypatch.setattr(jobs, "_process_start_time", real_start_time)

    assert returned["state"] == "succeeded"
    final = jobs.read_status(job_dir)
    assert (final["state"], final["exit_code"], final["message"]) == ("succeeded", 0, "done")


def test_a_cancel_while_the_last_stage_is_exiting_ends_the_job_cancelled(tmp_path):
    """The stage has written its output and reported its finish when the cancel comes (marker,
    then SIGTERM to the runner, as ``job cancel`` does); it ignores the signal and exits 0 just
    after. The runner learns of the exit and the cancel in the same poll: the cancel came while
    the stage ran, so the job is cancelled, whichever the runner sees first."""
    ws = tmp_path / "ws"
    cli(ws, "job", "submit", str(write_spec(tmp_path, sleep_spec(
        "late2", seconds=0.1, steps=1, output="outputs/result.txt", cancel_after=True))))
    final = wait_for(lambda: (s := status_of(ws, "late2"))["state"] in ENDED and s)
    assert (final["state"], final["message"], final["results"]) == ("cancelled", "cancelled", [])
    assert job_pids("late2") == []


def test_cancelling_a_job_that_ended_leaves_it_as_it_is_and_says_so(tmp_path):
    ws = tmp_path / "ws"
    cli(ws, "job", "submit", str(write_spec(tmp_path, sleep_spec(
        "done1", seconds=0.1, steps=1, output="outputs/result.txt"))))
    wait_for(lambda: status_of(ws, "done1")["state"] == "succeeded")
    proc = cli(ws, "job", "cancel", "done1")
    assert "done1: already succeeded; left as it is" in proc.stdout
    out = json.loads(cli(ws, "job", "cancel", "done1", "--json").stdout)
    assert (out["state"], out["results"]) == ("succeeded", ["outputs/result.txt"])
    assert status_of(ws, "done1")["state"] == "succeeded"


# -- two login hosts sharing the workspace (issue 17) ----------------------------------------------

OTHER_HOST = "login2"


def _pid_namespace_prefix() -> list[str]:
    """Runs a command in a PID namespace of its own where one can be made (root, or user
    namespaces): there the runner's pid is truly not visible, as on another host."""
    for prefix in (["unshare", "--pid", "--fork", "--mount-proc"],
                   ["unshare", "--user", "--map-root-user", "--pid", "--fork", "--mount-proc"]):
        try:
            if subprocess.run([*prefix, "true"], capture_output=True, timeout=10).returncode == 0:
                return prefix
        except (OSError, subprocess.SubprocessError):
            continue
    return []


def other_host_cli(workspace: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """``rs-cluster`` as the second login host: another host name and boot id (the tests' entry
    point's ``--as-host``), and where possible another PID namespace too."""
    env = {**os.environ, "PYTHONPATH": cluster_selftest.pythonpath()}
    proc = subprocess.run([*_pid_namespace_prefix(), sys.executable, "-m",
                           cluster_selftest.ENTRY_MODULE, "--as-host", OTHER_HOST, "--quiet",
                           *args[:2], "--workspace", str(workspace), *args[2:]],
                          capture_output=True, text=True, env=env, timeout=90)
    if proc.returncode != 0:
        raise AssertionError(f"rs-cluster {args} on {OTHER_HOST} failed ({proc.returncode}): "
                             f"{proc.stderr}")
    return proc


@pytest.fixture
def heartbeat_timeout(tmp_path, monkeypatch) -> float:
    """A cluster settings file with a short heartbeat timeout, for the runner and readers."""
    settings = tmp_path / "cluster.toml"
    settings.write_text("[jobs]\nheartbeat_timeout_s = 3\n")
    monkeypatch.setenv("RS_CLUSTER_CONFIG", str(settings))
    return 3.0


def test_a_running_job_stays_running_for_another_login_host_while_its_heartbeat_is_fresh(
        tmp_path, heartbeat_timeout):
    import socket

    ws = tmp_path / "ws"
    cli(ws, "job", "submit", str(write_spec(tmp_path, sleep_spec("hb1", seconds=60))))
    first = wait_for(lambda: (s := status_of(ws, "hb1")).get("heartbeat") and s)
    assert first["host"] == socket.gethostname()
    assert first["boot_id"] == Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    deadline = time.monotonic() + 2.5 * heartbeat_timeout  # well past the timeout
    while time.monotonic() < deadline:
        seen = json.loads(other_host_cli(ws, "job", "status", "hb1", "--json").stdout)
        assert seen["state"] == "running", seen["message"]
        time.sleep(0.5)
    assert seen["heartbeat"] > first["heartbeat"]  # the runner kept refreshing it
    assert status_of(ws, "hb1")["state"] == "running"
    cli(ws, "job", "cancel", "hb1")


def test_a_runner_killed_on_its_host_is_declared_failed_elsewhere_once_its_heartbeat_stops(
        tmp_path, heartbeat_timeout):
    ws = tmp_path / "ws"
    cli(ws, "job", "submit", str(write_spec(tmp_path, sleep_spec("hb2", seconds=60))))
    status = wait_for(lambda: (s := status_of(ws, "hb2")).get("heartbeat") and s)
    os.kill(status["pid"], signal.SIGKILL)
    wait_for(lambda: not psutil.pid_exists(status["pid"]))
    # The other host cannot see the pid: until the heartbeat is stale, the job still runs there.
    early = json.loads(other_host_cli(ws, "job", "status", "hb2", "--json").stdout)
    assert early["state"] == "running"
    # A cancel from there cannot stop the step the runner left: it waits, then says so.
    proc = other_host_cli(ws, "job", "cancel", "hb2")
    host = status["host"]
    assert (f"hb2: failed; the job runner on host {host} is gone, so a cancel from here cannot "
            "stop") in proc.stdout
    assert f"run `rs-cluster job cancel hb2` on {host}" in proc.stdout
    final = json.loads(other_host_cli(ws, "job", "status", "hb2", "--json").stdout)
    assert final["state"] == "failed"
    assert f"on host {host}) sent no heartbeat for over 3 s" in final["message"]
    if _pid_namespace_prefix():  # else the "other host" sees, and stops, this machine's step
        assert job_pids("hb2")  # the orphaned step: only its own host can stop it
    cli(ws, "job", "cancel", "hb2")
    assert job_pids("hb2") == []
    assert status_of(ws, "hb2")["state"] == "failed"


def test_cancel_from_another_login_host_stops_the_job_through_its_runner(tmp_path,
                                                                        heartbeat_timeout):
    ws = tmp_path / "ws"
    cli(ws, "job", "submit", str(write_spec(tmp_path, sleep_spec("hb3", seconds=60, children=2))))
    wait_for(lambda: len(job_pids("hb3")) >= 4)  # runner, step, 2 children
    started = time.monotonic()
    proc = other_host_cli(ws, "job", "cancel", "hb3")
    assert proc.stdout.strip() == "hb3: cancelled"
    assert time.monotonic() - started < 20
    # stopped by the runner, which saw the cancel marker (and exits just after saying so)
    wait_for(lambda: job_pids("hb3") == [], timeout=10, what="the job's processes to end")
    assert status_of(ws, "hb3")["state"] == "cancelled"
