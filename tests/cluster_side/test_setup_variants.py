"""The install variants of scripts/setup-venv.sh: what each would install and build.

The CPU variant is what every other test here runs on. The GPU variant (tensorflow[and-cuda],
Horovod with NCCL) cannot be installed or run on this machine, which has no GPU and no CUDA
toolkit: only its plan (RS_PLAN=1) and its refusal without nvcc are tested here.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PINS = REPO / "requirements" / "cluster.txt"


def _setup(tmp_path: Path, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "scripts/setup-venv.sh", str(tmp_path / "venv"), "python3"],
                          cwd=REPO, capture_output=True, text=True, timeout=60,
                          env={"PATH": os.environ["PATH"], **env})


def _plan(tmp_path: Path, variant: str) -> tuple[str, list[str]]:
    done = _setup(tmp_path, RS_VARIANT=variant, RS_PLAN="1")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    build = next(line for line in lines if line.startswith("# horovod "))
    return build, [line for line in lines if not line.startswith("# variant:") and line != build]


def test_the_cpu_plan_is_the_pinned_list_and_a_gloo_only_horovod(tmp_path):
    build, requirements = _plan(tmp_path, "cpu")
    assert requirements == PINS.read_text().splitlines()
    assert "HOROVOD_WITH_GLOO=1" in build and "NCCL" not in build


def test_the_gpu_plan_swaps_only_the_tensorflow_build_and_adds_nccl(tmp_path):
    build, requirements = _plan(tmp_path, "gpu")
    pins = PINS.read_text().splitlines()
    cpu = next(line for line in pins if line.startswith("tensorflow-cpu=="))
    version = cpu.split("==")[1]
    assert f"tensorflow[and-cuda]=={version}" in requirements
    assert not any(line.startswith("tensorflow-cpu") for line in requirements)
    # every other pin is the same line, in the same place
    assert [line for line in requirements if not line.startswith("tensorflow[")] == \
        [line for line in pins if line != cpu]
    for setting in ("HOROVOD_GPU_OPERATIONS=NCCL", "HOROVOD_WITH_GLOO=1", "HOROVOD_CUDA_HOME=",
                    "HOROVOD_NCCL_HOME=", "/site-packages/nvidia/nccl"):
        assert setting in build


def test_the_gpu_variant_without_a_cuda_toolkit_says_what_it_needs_and_installs_nothing(tmp_path):
    done = _setup(tmp_path, RS_VARIANT="gpu", CUDA_HOME=str(tmp_path / "no-cuda"))
    assert done.returncode == 2
    assert f"no nvcc at {tmp_path / 'no-cuda'}/bin" in done.stderr and "CUDA_HOME" in done.stderr
    assert not (tmp_path / "venv").exists()


def test_an_unknown_variant_is_refused(tmp_path):
    done = _setup(tmp_path, RS_VARIANT="rocm")
    assert done.returncode == 2 and "RS_VARIANT must be cpu or gpu, not 'rocm'" in done.stderr
    assert not (tmp_path / "venv").exists()
