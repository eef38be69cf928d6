"""The cluster settings file (issue 17): what admins write in ``cluster.toml``, how it is checked,
what ``rs-cluster env`` reports, and that master and resources reach the SparkSession of a stage,
with a job's overrides winning over the file, the file over ``$RS_SPARK_MASTER``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from rs_cluster.cli import build_parser
from rs_cluster.errors import ConfigError
from rs_cluster.jobspec import parse_job_spec, step_argv
from rs_cluster.settings import SparkResources, effective_spark, load_settings, resources_from_args

REPO = Path(__file__).resolve().parents[2]
SECRET = "wJalrXUtnFEMI-K7MDENG-bPxRfiCYEXAMPLEKEY"

FULL = f"""
[spark]
master = "spark://head.example.org:7077"
executor_cores = 2
executor_memory = "3g"
max_cores = 4
queue = "analysts"

[spark.conf]
"spark.network.timeout" = "300s"
"spark.speculation" = true

[storage]
url = "s3://rs-jobs/team"
endpoint_url = "http://127.0.0.1:8333"
access_key_id = "AKIDEXAMPLE"
secret_access_key = "{SECRET}"

[jobs]
heartbeat_timeout_s = 30
"""


def write(path: Path, text: str, mode: int = 0o600) -> Path:
    path.write_text(textwrap.dedent(text))
    path.chmod(mode)
    return path


def clean_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """The environment of a login shell with no settings: a home without cluster.toml."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("RS_CLUSTER_CONFIG", "RS_SPARK_MASTER")}
    env.update(HOME=str(tmp_path / "home"), PYTHONPATH=str(REPO / "cluster_side"), **extra)
    return env


def rs_cluster(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "rs_cluster", *args], capture_output=True,
                          text=True, env=env, timeout=120)


# -- rs-cluster env ---------------------------------------------------------------------------------

def test_env_says_local_on_the_login_host_when_nothing_is_set(tmp_path):
    proc = rs_cluster(clean_env(tmp_path), "env")
    assert proc.returncode == 0, proc.stderr
    cluster = json.loads(proc.stdout)["cluster"]
    assert (cluster["master"], cluster["master_source"]) == ("local[*]", "default")
    assert cluster["runs_on"].startswith("local[*] on the login host: no Spark master is set")
    assert str(tmp_path / "home" / ".rs-cluster" / "cluster.toml") in cluster["runs_on"]
    assert cluster["settings_file"] is None and cluster["storage"]["url"] is None


def test_env_reports_the_settings_file_and_never_the_storage_keys(tmp_path):
    home_file = write(tmp_path / "cluster.toml", FULL)
    proc = rs_cluster(clean_env(tmp_path, RS_CLUSTER_CONFIG=str(home_file),
                                RS_SPARK_MASTER="spark://ignored:7077"), "env")
    assert proc.returncode == 0, proc.stderr
    cluster = json.loads(proc.stdout)["cluster"]
    assert cluster["master"] == "spark://head.example.org:7077"
    assert cluster["master_source"] == f"settings file {home_file}"
    assert cluster["resources"] == {
        "executor_cores": 2, "executor_memory": "3g", "max_cores": 4, "queue": "analysts",
        "conf": {"spark.network.timeout": "300s", "spark.speculation": "true"}}
    assert cluster["storage"] == {
        "url": "s3://rs-jobs/team", "credentials": "settings file",
        "endpoint_url": "http://127.0.0.1:8333", "access_key_id": "set",
        "secret_access_key": "set"}
    assert cluster["heartbeat_timeout_s"] == 30
    assert SECRET not in proc.stdout + proc.stderr and "AKIDEXAMPLE" not in proc.stdout


def test_env_names_where_the_master_came_from_without_a_file(tmp_path):
    proc = rs_cluster(clean_env(tmp_path, RS_SPARK_MASTER="spark://10.0.0.5:7077"), "env")
    cluster = json.loads(proc.stdout)["cluster"]
    assert (cluster["master"], cluster["master_source"]) == ("spark://10.0.0.5:7077",
                                                             "RS_SPARK_MASTER")


def test_the_default_file_in_the_home_folder_is_read(tmp_path):
    folder = tmp_path / "home" / ".rs-cluster"
    folder.mkdir(parents=True)
    write(folder / "cluster.toml", '[spark]\nmaster = "yarn"\n[storage]\nurl = '
          '"hdfs://nn:8020/rs"\ncredentials = "env"\n', mode=0o644)
    cluster = json.loads(rs_cluster(clean_env(tmp_path), "env").stdout)["cluster"]
    assert (cluster["master"], cluster["settings_file"]) == ("yarn", str(folder / "cluster.toml"))
    assert cluster["storage"]["credentials"] == "env"


@pytest.mark.parametrize("text, message", [
    ("[spark]\nmastr = 'yarn'\n", "unknown setting(s) spark.mastr; known in [spark]: conf,"),
    ("[sparks]\nmaster = 'yarn'\n", "unknown setting(s) sparks; known in the file"),
    ("[spark]\nexecutor_cores = '2'\n", "spark.executor_cores must be a whole number, got str"),
    ("[spark]\nexecutor_cores = 0\n", "spark.executor_cores must be a whole number of at least 1"),
    ("[spark]\nexecutor_memory = 4\n", "spark.executor_memory must be a text, got int"),
    ("[spark.conf]\n'network.timeout' = '1s'\n", "'network.timeout' is not a Spark setting"),
    ("spark = 'yarn'\n", "spark must be a table ([spark]), got str"),
    ("[storage]\ncredentials = 'vault'\n", "storage.credentials 'vault' is not one of"),
    ("[storage]\ncredentials = 'env'\naccess_key_id = 'a'\nsecret_access_key = 'b'\n",
     "storage keys are written here but storage.credentials is 'env'"),
    ("[jobs]\nheartbeat_timeout_s = -1\n", "jobs.heartbeat_timeout_s must be above 0"),
    ("[spark\n", "is not valid TOML"),
])
def test_a_mistake_in_the_file_is_refused_naming_the_file_and_the_key(tmp_path, text, message):
    path = write(tmp_path / "cluster.toml", text)
    proc = rs_cluster(clean_env(tmp_path, RS_CLUSTER_CONFIG=str(path)), "env")
    assert proc.returncode == 2
    assert f"rs-cluster env: error: {path}" in proc.stderr and message in proc.stderr


def test_keys_in_a_file_others_can_read_are_refused_without_printing_them(tmp_path):
    path = write(tmp_path / "cluster.toml", FULL, mode=0o644)
    proc = rs_cluster(clean_env(tmp_path, RS_CLUSTER_CONFIG=str(path)), "env")
    assert proc.returncode == 2
    assert f"holds storage keys but others may read it (mode 0644); run: chmod 600 {path}" in proc.stderr
    assert SECRET not in proc.stdout + proc.stderr
    assert SECRET not in repr(load_settings(write(path, FULL)))  # nor in a traceback's repr


def test_a_named_settings_file_that_is_missing_is_an_error(tmp_path):
    proc = rs_cluster(clean_env(tmp_path, RS_CLUSTER_CONFIG=str(tmp_path / "nope.toml")), "env")
    assert proc.returncode == 2 and f"{tmp_path / 'nope.toml'} ($RS_CLUSTER_CONFIG) does not exist" \
        in proc.stderr


# -- precedence and the job spec ------------------------------------------------------------------

def test_explicit_overrides_win_over_the_file_and_the_file_over_the_environment(tmp_path,
                                                                               monkeypatch):
    settings = load_settings(write(tmp_path / "cluster.toml", FULL))
    monkeypatch.setenv("RS_SPARK_MASTER", "spark://from-env:7077")
    job = SparkResources(executor_cores=1, conf=(("spark.network.timeout", "60s"),))
    eff = effective_spark("local[2]", job, settings)
    assert (eff.master, eff.master_source) == ("local[2]", "job or command line (--master)")
    assert eff.resources.spark_conf() == {
        "spark.executor.cores": "1", "spark.executor.memory": "3g", "spark.cores.max": "4",
        "spark.yarn.queue": "analysts", "spark.network.timeout": "60s", "spark.speculation": "true"}
    assert effective_spark(None, None, settings).master == "spark://head.example.org:7077"
    empty = load_settings(write(tmp_path / "empty.toml", ""))
    assert effective_spark(None, None, empty).master_source == "RS_SPARK_MASTER"
    monkeypatch.delenv("RS_SPARK_MASTER")
    assert (effective_spark(None, None, empty).master,
            effective_spark(None, None, empty).master_source) == ("local[*]", "default")


@pytest.mark.parametrize("stage, required", [
    ("prepare", {"images": "inputs/i", "masks": "inputs/m", "output": "outputs/d"}),
    ("train", {"data": "outputs/d", "model_dir": "outputs/m"}),
    ("predict", {"model": "outputs/m", "input": "inputs/t", "output": "outputs/p"}),
])
def test_a_job_spec_carries_master_and_resource_overrides_to_its_stage(tmp_path, stage, required):
    overrides = {"master": "spark://127.0.0.1:7077", "executor_cores": 2,
                 "executor_memory": "2g", "max_cores": 3, "queue": "q1",
                 "spark_conf": {"spark.task.maxFailures": 8, "spark.speculation": False}}
    spec = parse_job_spec({"schema_version": 1, "job_id": "res1", "name": "r",
                           "steps": [{"stage": stage, "params": {**required, **overrides}}]},
                          tmp_path)
    argv = step_argv(spec.steps[0], tmp_path)
    assert "--spark-conf=spark.task.maxFailures=8" in argv
    args = build_parser().parse_args(argv)
    assert args.master == "spark://127.0.0.1:7077"
    assert resources_from_args(args) == SparkResources(
        executor_cores=2, executor_memory="2g", max_cores=3, queue="q1",
        conf=(("spark.task.maxFailures", "8"), ("spark.speculation", "false")))


@pytest.mark.parametrize("value, message", [
    ({"network.timeout": "1s"}, "is not a Spark setting"),
    ("spark.x=1", "must be an object of Spark settings"),
    ({"spark.x": [1]}, "must be a text, number or boolean"),
])
def test_a_job_spec_with_bad_spark_conf_is_refused(tmp_path, value, message):
    with pytest.raises(ConfigError, match=message):
        parse_job_spec({"schema_version": 1, "job_id": "res2", "steps": [
            {"stage": "prepare", "params": {"spark_conf": value}}]}, tmp_path)


# -- resources reach Spark ------------------------------------------------------------------------

_SESSION_PROBE = """
import json, sys, urllib.request
from rs_cluster.settings import SparkResources
from rs_cluster.spark import spark_session

job = SparkResources(executor_memory="1g") if sys.argv[1] == "override" else None
with spark_session(None, "rs-cluster settings test", resources=job) as spark:
    sc = spark.sparkContext
    assert sc.parallelize(range(4), 2).count() == 4
    out = {key: spark.conf.get(key, None) for key in (
        "spark.executor.cores", "spark.executor.memory", "spark.cores.max", "spark.yarn.queue",
        "spark.network.timeout")}
    out["master"] = sc.master
    if len(sys.argv) > 2:  # the standalone master's own view of this application
        with urllib.request.urlopen(sys.argv[2], timeout=10) as r:
            apps = json.load(r)["activeapps"]
        out["app_cores"] = [a["cores"] for a in apps if a["id"] == sc.applicationId]
print(json.dumps(out))
"""


def probe_session(env: dict[str, str], *args: str) -> dict:
    proc = subprocess.run([sys.executable, "-c", _SESSION_PROBE, *args], capture_output=True,
                          text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.splitlines()[-1])


@pytest.mark.spark
def test_a_stage_session_gets_the_files_master_and_resources_with_the_jobs_override(tmp_path):
    path = write(tmp_path / "cluster.toml", """
        [spark]
        master = "local[2]"
        executor_cores = 1
        executor_memory = "512m"
        max_cores = 2
        queue = "analysts"
        [spark.conf]
        "spark.network.timeout" = "301s"
        """)
    got = probe_session(clean_env(tmp_path, RS_CLUSTER_CONFIG=str(path),
                                  RS_SPARK_MASTER="local[1]"), "override")
    assert got == {"spark.executor.cores": "1", "spark.executor.memory": "1g",
                   "spark.cores.max": "2", "spark.yarn.queue": "analysts",
                   "spark.network.timeout": "301s", "master": "local[2]"}


@pytest.mark.spark
def test_max_cores_in_the_file_leaves_cores_of_a_shared_standalone_master_free(standalone_cluster,
                                                                              tmp_path):
    """A 2-core standalone master: with spark.cores.max = 1 from the settings file, the
    application takes one core, not every core (so a second user's job still gets one)."""
    path = write(tmp_path / "cluster.toml", f"""
        [spark]
        master = "{standalone_cluster.master_url}"
        max_cores = 1
        executor_cores = 1
        """)
    url = f"http://{standalone_cluster.host}:{standalone_cluster.ui_port}/json/"
    got = probe_session(clean_env(tmp_path, RS_CLUSTER_CONFIG=str(path)), "file", url)
    assert got["master"] == standalone_cluster.master_url
    assert (got["spark.cores.max"], got["app_cores"]) == ("1", [1])
