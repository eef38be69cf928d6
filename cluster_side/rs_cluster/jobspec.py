"""The job spec: what the QGIS plugin sends to run a job, validated before anything runs.

A job spec is a versioned JSON object stored as ``job.json`` in the job folder::

    {"schema_version": 1, "job_id": "20260101-120000-ab12cd", "name": "Xiamen buildings",
     "steps": [{"stage": "prepare", "params": {"images": "inputs/images", "masks": "inputs/masks",
                                               "output": "outputs/dataset", "tile_size": 128}}]}

Each step becomes one ``rs-cluster <stage> ...`` argument list. Only the parameters listed in
:data:`STAGE_PARAMS` are accepted, each with a type, so a spec can never smuggle in an option or a
shell fragment; every path is relative to the job folder and refused when it would leave it.
"""

from __future__ import annotations

import os
import re
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from types import MappingProxyType
from typing import Any, Mapping

from rs_cluster.errors import ConfigError

SCHEMA_VERSION = 1

JOB_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")

# Parameter kinds: "path" (relative to the job folder), "int", "float", "str", "flag" (a boolean
# switch that adds its option when true), "split" (three fractions, a list or "a,b,c"), "conf" (an
# object of extra Spark settings, {"spark.key": value}, each becoming one --spark-conf=KEY=VALUE).
_PATH, _INT, _FLOAT, _STR, _FLAG, _SPLIT = "path", "int", "float", "str", "flag", "split"
_CONF = "conf"
# "model": a path like "path", or the name of a model built into rs-cluster ("builtin" or
# "builtin:NAME", rs_cluster.builtin), which the stage itself resolves and checks.
_MODEL = "model"
_BUILTIN_REF = re.compile(r"^builtin(:[a-z0-9][a-z0-9.-]{0,63})?$")
# What a job may override of the cluster settings file for each Spark stage (rs_cluster.settings).
_SPARK_OVERRIDES = {"master": _STR, "executor_cores": _INT, "executor_memory": _STR,
                    "max_cores": _INT, "queue": _STR, "spark_conf": _CONF}


@dataclass(frozen=True)
class ParamRule:
    option: str
    kind: str


def _rules(**kinds: str) -> Mapping[str, ParamRule]:
    return MappingProxyType(
        {name: ParamRule("--" + name.replace("_", "-"), kind) for name, kind in kinds.items()}
    )


# stage name in the spec -> (rs-cluster sub-command, accepted parameters). The flags mirror the
# sub-commands of issues 2-4. Test-only stages are not here: the tests' own entry point adds them
# (tests/cluster_selftest.py), so no spec sent to a production rs-cluster can start one.
STAGES: Mapping[str, tuple[str, Mapping[str, ParamRule]]] = MappingProxyType({
    "prepare": ("prepare", _rules(
        images=_PATH, masks=_PATH, output=_PATH, tile_size=_INT, stride=_INT, split=_SPLIT,
        seed=_INT, val_rasters=_STR, overwrite=_FLAG, skip_bad=_FLAG, gsd=_FLOAT,
        **_SPARK_OVERRIDES)),
    "train": ("train", _rules(
        data=_PATH, model_dir=_PATH, epochs=_INT, batch_size=_INT, num_proc=_INT,
        lr=_FLOAT, patience=_INT, resume=_FLAG, overwrite=_FLAG, base_filters=_INT, seed=_INT,
        dice=_FLAG, tile_size=_INT, steps_per_epoch=_INT, validation_steps=_INT,
        warmup_epochs=_INT, threads_per_worker=_INT, nics=_STR, no_augment=_FLAG,
        max_restarts=_INT, arch=_STR, init_model=_MODEL, loss=_STR, lr_schedule=_STR,
        preview_every=_INT, time_limit=_FLOAT, **_SPARK_OVERRIDES)),
    "predict": ("predict", _rules(
        model=_MODEL, input=_PATH, output=_PATH, overlap=_INT, batch_size=_INT, threshold=_FLOAT,
        probabilities=_FLAG, polygons=_FLAG, fail_fast=_FLAG, overwrite=_FLAG, tta=_FLAG,
        regularize=_FLAG, min_building_m2=_FLOAT, input_gsd=_FLOAT, no_resample=_FLAG,
        band_rows=_INT, **_SPARK_OVERRIDES)),
    "evaluate": ("evaluate", _rules(pred=_PATH, truth=_PATH, json=_PATH)),
})

# Parameters naming what a step produces; the job's status lists them as its results.
OUTPUT_PARAMS = frozenset({"output", "model_dir", "json"})

_TOP_KEYS = frozenset({"schema_version", "job_id", "name", "steps"})
_STEP_KEYS = frozenset({"stage", "params"})


@dataclass(frozen=True)
class Step:
    stage: str
    params: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))

    def to_dict(self) -> dict[str, Any]:
        return {"stage": self.stage, "params": dict(self.params)}


@dataclass(frozen=True)
class JobSpec:
    job_id: str
    name: str
    steps: tuple[Step, ...]
    schema_version: int = SCHEMA_VERSION

    def to_dict(self) -> dict[str, Any]:
        return {"schema_version": self.schema_version, "job_id": self.job_id, "name": self.name,
                "steps": [s.to_dict() for s in self.steps]}

    def outputs(self) -> list[str]:
        return [s.params[k] for s in self.steps for k in sorted(OUTPUT_PARAMS) if k in s.params]

    def results(self) -> list[str]:
        """The outputs a job hands back: all but a prepared dataset that a later step of the job
        trains on (tiles, possibly many gigabytes, that nobody downloads)."""
        consumed = {s.params.get("data") for s in self.steps if s.stage == "train"}
        datasets = {s.params.get("output") for s in self.steps if s.stage == "prepare"}
        return [o for o in self.outputs() if not (o in datasets and o in consumed)]


def new_job_id() -> str:
    """A sortable, unique id: UTC time plus random hex, e.g. ``20260101-120000-ab12cd``."""
    return time.strftime("%Y%m%d-%H%M%S", time.gmtime()) + "-" + secrets.token_hex(3)


def check_job_id(job_id: Any) -> str:
    if not isinstance(job_id, str) or not JOB_ID_PATTERN.match(job_id):
        raise ConfigError(f"job id {job_id!r} is not valid: use 1-64 letters, digits, '.', '_' or "
                          "'-', starting with a letter or digit")
    return job_id


def parse_job_spec(data: Any, job_dir: str | os.PathLike[str] | None = None) -> JobSpec:
    """Validates a decoded ``job.json``; with ``job_dir`` also checks that no path escapes it.

    Raises :class:`ConfigError` naming the offending key.
    """
    if not isinstance(data, dict):
        raise ConfigError("the job spec must be a JSON object")
    unknown = sorted(set(data) - _TOP_KEYS)
    if unknown:
        raise ConfigError(f"unknown key(s) in the job spec: {', '.join(unknown)}")
    version = data.get("schema_version")
    if version != SCHEMA_VERSION:
        raise ConfigError(f"job spec schema_version {version!r} is not supported; this rs-cluster "
                          f"reads version {SCHEMA_VERSION} (update rs-cluster or the plugin)")
    job_id = check_job_id(data.get("job_id", new_job_id()))
    name = data.get("name", job_id)
    if not isinstance(name, str) or len(name) > 200:
        raise ConfigError("job spec 'name' must be a string of at most 200 characters")
    raw_steps = data.get("steps")
    if not isinstance(raw_steps, list) or not raw_steps:
        raise ConfigError("job spec 'steps' must be a non-empty list")
    steps = tuple(_parse_step(i, s) for i, s in enumerate(raw_steps))
    spec = JobSpec(job_id=job_id, name=name, steps=steps)
    if job_dir is not None:
        for i, step in enumerate(spec.steps):
            for key, value in step.params.items():
                if _is_path(STAGES[step.stage][1][key].kind, value):
                    resolve_in_job(job_dir, value, what=f"steps[{i}].params.{key}")
    return spec


def _is_path(kind: str, value: Any) -> bool:
    """Whether a parameter's value is a path in the job folder (a built-in model's name is not)."""
    return kind == _PATH or (kind == _MODEL and not _BUILTIN_REF.match(value))


def _parse_step(index: int, raw: Any) -> Step:
    where = f"steps[{index}]"
    if not isinstance(raw, dict):
        raise ConfigError(f"{where} must be an object with 'stage' and 'params'")
    unknown = sorted(set(raw) - _STEP_KEYS)
    if unknown:
        raise ConfigError(f"unknown key(s) in {where}: {', '.join(unknown)}")
    stage = raw.get("stage")
    if stage not in STAGES:
        raise ConfigError(f"{where}.stage {stage!r} is not one of {', '.join(STAGES)}")
    params = raw.get("params", {})
    if not isinstance(params, dict):
        raise ConfigError(f"{where}.params must be an object")
    rules = STAGES[stage][1]
    clean: dict[str, Any] = {}
    for key, value in params.items():
        if key not in rules:
            raise ConfigError(f"unknown parameter {where}.params.{key} for stage {stage!r}; "
                              f"accepted: {', '.join(rules)}")
        clean[key] = _check_value(f"{where}.params.{key}", rules[key].kind, value)
    return Step(stage=stage, params=MappingProxyType(clean))


def _check_value(where: str, kind: str, value: Any) -> Any:
    if kind == _FLAG:
        if not isinstance(value, bool):
            raise ConfigError(f"{where} must be true or false")
        return value
    if kind == _INT:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where} must be an integer, got {value!r}")
        return value
    if kind == _FLOAT:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where} must be a number, got {value!r}")
        return float(value)
    if kind == _SPLIT:
        parts = value.split(",") if isinstance(value, str) else value
        try:
            fractions = [float(p) for p in parts]
        except (TypeError, ValueError):
            fractions = []
        if len(fractions) != 3:
            raise ConfigError(f"{where} must be three fractions, e.g. [0.8, 0.1, 0.1]")
        return ",".join(f"{f:g}" for f in fractions)
    if kind == _CONF:
        return _check_conf(where, value)
    if not isinstance(value, str) or not value or "\x00" in value:
        raise ConfigError(f"{where} must be a non-empty string")
    if _is_path(kind, value):
        _check_relative(where, value)
    elif value.startswith("-"):
        # An option value that looks like an option would be read as one by argparse.
        raise ConfigError(f"{where} must not start with '-'")
    return value


def _check_conf(where: str, value: Any) -> dict[str, str]:
    if not isinstance(value, dict):
        raise ConfigError(f"{where} must be an object of Spark settings, e.g. "
                          '{"spark.executor.memoryOverhead": "1g"}')
    clean = {}
    for key, item in value.items():
        if not isinstance(key, str) or not re.fullmatch(r"spark\.[A-Za-z0-9_.\-]+", key):
            raise ConfigError(f"{where}: {key!r} is not a Spark setting (spark.<name>)")
        if isinstance(item, bool):
            item = "true" if item else "false"  # Spark's spelling
        if not isinstance(item, (str, int, float)) or "\x00" in str(item):
            raise ConfigError(f"{where}.{key} must be a text, number or boolean")
        clean[key] = str(item)
    return clean


def _check_relative(where: str, value: str) -> PurePosixPath:
    path = PurePosixPath(value)
    if path.is_absolute() or value.startswith("~") or "\\" in value:
        raise ConfigError(f"{where} {value!r} must be a path relative to the job folder")
    if ".." in path.parts:
        raise ConfigError(f"{where} {value!r} leaves the job folder ('..' is not allowed)")
    return path


def resolve_in_job(job_dir: str | os.PathLike[str], value: str, *, what: str = "path") -> Path:
    """The absolute path of ``value`` inside ``job_dir``; refused when it (or a symlink on the way)
    leads outside the job folder."""
    rel = _check_relative(what, value)
    root = Path(job_dir).resolve()
    target = (root / rel).resolve()  # follows any symlink that already exists
    if target != root and root not in target.parents:
        raise ConfigError(f"{what} {value!r} leads outside the job folder (through a symlink)")
    return target


def step_argv(step: Step, job_dir: str | os.PathLike[str], *,
              root_url: str | None = None) -> list[str]:
    """The ``rs-cluster`` arguments (after the global options) that run ``step``. With
    ``root_url`` (the job's folder in shared storage) every path becomes a URL under it, still
    checked against ``job_dir`` first."""
    command, rules = STAGES[step.stage]
    argv = [command]
    for key, value in step.params.items():
        rule = rules[key]
        if rule.kind == _FLAG:
            if value:
                argv.append(rule.option)
        elif _is_path(rule.kind, value):
            local = resolve_in_job(job_dir, value, what=key)
            argv += [rule.option, str(local) if root_url is None else
                     f"{root_url.rstrip('/')}/{PurePosixPath(value).as_posix()}"]
        elif rule.kind == _CONF:
            argv += [f"{rule.option}={k}={v}" for k, v in value.items()]
        else:
            argv.append(f"{rule.option}={value}")  # one token: a value is never read as an option
    return argv
