"""Building job specs for the cluster (the plugin's own copy of the schema, not an import).

The cluster validates the spec again on arrival (``rs_cluster.jobspec``); checking here as well
lets the GUI refuse a bad value before anything is uploaded. A contract test keeps the two in step.
"""

from __future__ import annotations

import json
import re
import secrets
import time
import unicodedata
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Any

from rs_qgis_plugin.core.errors import SpecError

SCHEMA_VERSION = 1

# What a job may override of the cluster's settings file in each Spark stage; "conf" is an object
# of extra Spark settings ({"spark.executor.memoryOverhead": "1g"}).
SPARK_OVERRIDE_PARAMS: dict[str, str] = {"master": "str", "executor_cores": "int",
                                         "executor_memory": "str", "max_cores": "int",
                                         "queue": "str", "spark_conf": "conf"}
_SPARK_KEY = re.compile(r"spark\.[A-Za-z0-9_.\-]+")

# A "model" is a path like "path", or a model built into rs-cluster: "builtin" (its default one) or
# "builtin:NAME".
BUILTIN_MODEL = "builtin"
_BUILTIN_REF = re.compile(r"builtin(:[a-z0-9][a-z0-9.-]{0,63})?")

# stage -> parameter -> kind; mirrors the cluster's whitelist.
STAGE_PARAMS: dict[str, dict[str, str]] = {
    "prepare": {"images": "path", "masks": "path", "output": "path", "tile_size": "int",
                "stride": "int", "split": "split", "seed": "int", "val_rasters": "str",
                "overwrite": "flag", "skip_bad": "flag", "gsd": "float", **SPARK_OVERRIDE_PARAMS},
    "train": {"data": "path", "model_dir": "path", "epochs": "int", "batch_size": "int",
              "num_proc": "int", "lr": "float", "patience": "int",
              "resume": "flag", "overwrite": "flag", "base_filters": "int", "seed": "int",
              "dice": "flag", "tile_size": "int", "steps_per_epoch": "int",
              "validation_steps": "int", "warmup_epochs": "int", "threads_per_worker": "int",
              "nics": "str", "no_augment": "flag", "max_restarts": "int",
              "preview_every": "int", "time_limit": "float", "arch": "str", "init_model": "model", "loss": "str", "lr_schedule": "str",
              **SPARK_OVERRIDE_PARAMS},
    "predict": {"model": "model", "input": "path", "output": "path", "overlap": "int",
                "batch_size": "int", "threshold": "float", "probabilities": "flag",
                "polygons": "flag", "fail_fast": "flag", "overwrite": "flag", "tta": "flag",
                "regularize": "flag", "min_building_m2": "float", "input_gsd": "float",
                "no_resample": "flag", "band_rows": "int", **SPARK_OVERRIDE_PARAMS},
    "evaluate": {"pred": "path", "truth": "path", "json": "path"},
}
OUTPUT_PARAMS = ("json", "model_dir", "output")


def new_job_id() -> str:
    """UTC time plus random hex: sortable, unique, safe as a folder name."""
    return time.strftime("%Y%m%d-%H%M%S", time.gmtime()) + "-" + secrets.token_hex(3)


def check_relative_path(value: str, what: str = "path") -> str:
    path = PurePosixPath(value)
    if not value or path.is_absolute() or value.startswith("~") or "\\" in value:
        raise SpecError(f"{what} {value!r} must be a path relative to the job folder")
    if ".." in path.parts:
        raise SpecError(f"{what} {value!r} leaves the job folder")
    return str(path)


# -- names that come back from the cluster ----------------------------------------------------------
# Stricter than check_relative_path: these become local files on the analyst's computer, which may
# run Windows, so a name must be one plain component there too.
JOB_ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")  # the cluster's rule
_BIDI_CONTROLS = frozenset("\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e"
                           "\u2066\u2067\u2068\u2069")
_WINDOWS_DEVICES = frozenset({"CON", "PRN", "AUX", "NUL", "CONIN$", "CONOUT$",
                              *(f"{port}{n}" for port in ("COM", "LPT")
                                for n in (*"123456789", "\u00b9", "\u00b2", "\u00b3"))})


def name_problem(name: str) -> str | None:
    """Why ``name``, one component of a path sent by the cluster, cannot safely become a local
    file or folder name (on Linux, macOS or Windows); ``None`` when it can."""
    if name in ("", ".", ".."):
        return "is not a file name (empty, '.' or '..')"
    for char in name:
        if char in "/\\":
            return f"holds a folder separator {char!r}"
        if char == ":":
            return "holds a ':' (a drive or stream on Windows)"
        if unicodedata.category(char) == "Cc":
            return f"holds the control character U+{ord(char):04X}"
        if char in _BIDI_CONTROLS:
            return f"holds the text direction control U+{ord(char):04X}, which disguises names"
    if name[-1] in ". ":
        return "ends with a dot or a space, which Windows drops"
    if name.split(".", 1)[0].rstrip(" ").upper() in _WINDOWS_DEVICES:
        return "is a device name on Windows"
    return None


def relative_path_problem(value: str) -> str | None:
    """Why ``value``, a '/'-separated path relative to the job folder sent by the cluster, cannot
    safely become a local path under the results folder; ``None`` when it can."""
    if value.startswith("/"):
        return "is not relative to the job folder"
    for part in value.split("/"):
        problem = name_problem(part)
        if problem is not None:
            return problem if part == value else f"has a part {part!r} that {problem}"
    return None


def job_id_problem(value: str) -> str | None:
    """Why ``value`` is not a job id (it names local folders too); ``None`` when it is."""
    if not JOB_ID_PATTERN.fullmatch(value):
        return "is not a job id (1-64 letters, digits, '.', '_' or '-')"
    return name_problem(value)


def _check_spark_conf(what: str, value: Any) -> None:
    if not isinstance(value, dict):
        raise SpecError(f"{what} must be a mapping of Spark settings, e.g. "
                        '{"spark.executor.memoryOverhead": "1g"}')
    for key, item in value.items():
        if not isinstance(key, str) or not _SPARK_KEY.fullmatch(key):
            raise SpecError(f"{what}: {key!r} is not a Spark setting (spark.<name>)")
        if not isinstance(item, (str, int, float)):
            raise SpecError(f"{what}.{key} must be a text, number or boolean")


@dataclass(frozen=True)
class JobStep:
    stage: str
    params: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.stage not in STAGE_PARAMS:
            raise SpecError(f"unknown stage {self.stage!r}; one of {', '.join(STAGE_PARAMS)}")
        kinds = STAGE_PARAMS[self.stage]
        for key, value in self.params.items():
            kind = kinds.get(key)
            what = f"{self.stage}.{key}"
            if kind is None:
                raise SpecError(f"stage {self.stage!r} has no parameter {key!r}")
            if kind == "flag" and not isinstance(value, bool):
                raise SpecError(f"{what} must be true or false")
            if kind == "int" and (isinstance(value, bool) or not isinstance(value, int)):
                raise SpecError(f"{what} must be an integer")
            if kind == "float" and (isinstance(value, bool) or not isinstance(value, (int, float))):
                raise SpecError(f"{what} must be a number")
            if kind == "path" or (kind == "model" and not (isinstance(value, str)
                                                         and _BUILTIN_REF.fullmatch(value))):
                check_relative_path(value, what)
            if kind == "str" and (not isinstance(value, str) or not value or value.startswith("-")):
                raise SpecError(f"{what} must be a non-empty text not starting with '-'")
            if kind == "split" and (not isinstance(value, (list, tuple)) or len(value) != 3):
                raise SpecError(f"{what} must be three fractions")
            if kind == "conf":
                _check_spark_conf(what, value)

    def to_dict(self) -> dict[str, Any]:
        params = {k: list(v) if isinstance(v, tuple) else v for k, v in self.params.items()}
        return {"stage": self.stage, "params": params}


@dataclass(frozen=True)
class JobSpec:
    name: str
    steps: tuple[JobStep, ...]
    job_id: str = field(default_factory=new_job_id)

    def __post_init__(self) -> None:
        if not self.steps:
            raise SpecError("a job needs at least one step")
        object.__setattr__(self, "steps", tuple(self.steps))

    def to_dict(self) -> dict[str, Any]:
        return {"schema_version": SCHEMA_VERSION, "job_id": self.job_id, "name": self.name,
                "steps": [s.to_dict() for s in self.steps]}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), ensure_ascii=False, indent=2) + "\n"

    def outputs(self) -> list[str]:
        return [s.params[k] for s in self.steps for k in OUTPUT_PARAMS if k in s.params]


class JobSpecBuilder:
    """Collects steps, e.g. ``JobSpecBuilder("Xiamen").prepare(images=..., masks=...).build()``."""

    def __init__(self, name: str, job_id: str | None = None) -> None:
        self._name = name
        self._job_id = job_id or new_job_id()
        self._steps: list[JobStep] = []

    def step(self, stage: str, **params: Any) -> JobSpecBuilder:
        self._steps.append(JobStep(stage, params))
        return self

    def prepare(self, **params: Any) -> JobSpecBuilder:
        return self.step("prepare", **params)

    def train(self, **params: Any) -> JobSpecBuilder:
        return self.step("train", **params)

    def predict(self, **params: Any) -> JobSpecBuilder:
        return self.step("predict", **params)

    def evaluate(self, **params: Any) -> JobSpecBuilder:
        return self.step("evaluate", **params)

    def build(self) -> JobSpec:
        return JobSpec(name=self._name, steps=tuple(self._steps), job_id=self._job_id)
