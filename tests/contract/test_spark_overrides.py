"""The contract for where a job runs: the Spark master and resources an analyst sets in the dock or
a Processing algorithm (the plugin's ``RunParams``) pass the cluster's spec validator, become the
options of each Spark stage's command line, and there override the cluster's settings file.
Runs in the cluster venv (no QGIS)."""

from __future__ import annotations

import argparse
import json

from rs_cluster import jobspec, predict_cli, prepare_cli, train_cli
from rs_cluster.settings import (
    ClusterSettings,
    SparkResources,
    effective_spark,
    resources_from_args,
)

from rs_qgis_plugin.logic import RasterPick, RunParams, plan_job

OVERRIDES = {"master": "spark://10.0.0.5:7077,10.0.0.6:7077", "executor_cores": 2,
             "executor_memory": "3g", "max_cores": 6, "queue": "analytics"}


def test_a_plugin_job_with_every_override_runs_each_spark_stage_with_them(tmp_path):
    planned = plan_job("Xiamen", RunParams(mode="evaluate", model_dir="/m", **OVERRIDES),
                       [RasterPick("/data/a.tif", "/masks/a.tif")])
    training = plan_job("Xiamen", RunParams(mode="train_predict", **OVERRIDES),
                        [RasterPick("/data/a.tif", "/masks/a.tif")])
    clis = {"prepare": prepare_cli, "train": train_cli, "predict": predict_cli}
    base = ClusterSettings(master="local[*]", resources=SparkResources(
        executor_cores=1, executor_memory="1g", max_cores=2, queue="default",
        conf=(("spark.executor.memoryOverhead", "512m"),)))
    seen = []
    for spec in (training.spec, planned.spec):
        parsed = jobspec.parse_job_spec(json.loads(spec.to_json()), tmp_path)
        for step in parsed.steps:
            argv = jobspec.step_argv(step, tmp_path)
            seen.append(step.stage)
            if step.stage == "evaluate":  # runs no Spark: it takes none
                assert not any(a.startswith(("--master", "--executor", "--max-cores", "--queue"))
                               for a in argv)
                continue
            assert {"--master=spark://10.0.0.5:7077,10.0.0.6:7077", "--executor-cores=2",
                    "--executor-memory=3g", "--max-cores=6", "--queue=analytics"} <= set(argv)
            parser = argparse.ArgumentParser()
            clis[step.stage].register(parser.add_subparsers())
            args = parser.parse_args(argv)
            spark = effective_spark(args.master, resources_from_args(args), settings=base)
            assert spark.master == OVERRIDES["master"]
            assert spark.master_source.startswith("job")
            assert spark.resources.spark_conf() == {
                "spark.executor.memoryOverhead": "512m",  # the file's, not overridden
                "spark.executor.cores": "2", "spark.executor.memory": "3g",
                "spark.cores.max": "6", "spark.yarn.queue": "analytics"}
    assert seen == ["prepare", "train", "predict", "predict", "evaluate"]


def test_without_overrides_the_clusters_settings_file_decides(tmp_path):
    planned = plan_job("Xiamen", RunParams(mode="train", executor_cores=None, master=""),
                       [RasterPick("/data/a.tif", "/masks/a.tif")])
    base = ClusterSettings(master="yarn", resources=SparkResources(executor_memory="8g"))
    for step in jobspec.parse_job_spec(json.loads(planned.spec.to_json()), tmp_path).steps:
        argv = jobspec.step_argv(step, tmp_path)
        parser = argparse.ArgumentParser()
        {"prepare": prepare_cli, "train": train_cli}[step.stage].register(parser.add_subparsers())
        args = parser.parse_args(argv)
        spark = effective_spark(args.master, resources_from_args(args), settings=base)
        assert (spark.master, spark.resources.executor_memory) == ("yarn", "8g")
        assert spark.master_source.startswith("settings file")
