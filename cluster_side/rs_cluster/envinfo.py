"""What this cluster node runs: versions of the stack and the GPUs, for ``rs-cluster env``.

Versions come from installed package metadata, so nothing heavy (TensorFlow) is imported; a missing
package is reported as ``null`` rather than failing, since the plugin shows this as a checklist.
"""

from __future__ import annotations

import platform
import shutil
import subprocess
import sys
from importlib import metadata
from typing import Any

from rs_cluster import __version__


def package_version(*names: str) -> str | None:
    for name in names:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return None


def gpus() -> list[dict[str, str]]:
    """GPUs that ``nvidia-smi`` lists; empty where there is none (or no driver)."""
    smi = shutil.which("nvidia-smi")
    if not smi:
        return []
    try:
        out = subprocess.run([smi, "--query-gpu=name,memory.total,driver_version",
                              "--format=csv,noheader"], capture_output=True, text=True,
                             timeout=20, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    found = []
    for line in out.splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) == 3:
            found.append({"name": parts[0], "memory": parts[1], "driver": parts[2]})
    return found


def java_version() -> str | None:
    java = shutil.which("java")
    if not java:
        return None
    try:
        proc = subprocess.run([java, "-version"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return None
    first = (proc.stderr or proc.stdout).splitlines()
    return first[0].strip() if first else None


def environment() -> dict[str, Any]:
    return {
        "python": platform.python_version(),
        "python_executable": sys.executable,
        "platform": platform.platform(),
        "rs_cluster": __version__,
        "spark": package_version("pyspark"),
        "horovod": package_version("horovod"),
        "tensorflow": package_version("tensorflow", "tensorflow-cpu", "tensorflow-gpu"),
        "petastorm": package_version("petastorm"),
        "rasterio": package_version("rasterio"),
        "java": java_version(),
        "gpus": gpus(),
    }
