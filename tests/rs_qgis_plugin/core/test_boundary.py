"""The core imports neither QGIS, Qt nor rs_cluster: proved by importing every module of it in a
fresh interpreter where those imports fail."""

from __future__ import annotations

import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

import rs_qgis_plugin.core

REPO = Path(__file__).resolve().parents[3]

PROBE = """
import sys
for name in ("qgis", "PyQt5", "PyQt6", "PySide2", "PySide6", "sip", "rs_cluster"):
    sys.modules[name] = None  # any import of these now raises ImportError
import importlib
for module in sys.argv[1:]:
    importlib.import_module(module)
print("ok", len(sys.argv) - 1)
"""


def test_every_core_module_imports_without_qgis_qt_or_rs_cluster():
    pytest.importorskip("paramiko")
    modules = [f"rs_qgis_plugin.core.{m.name}"
               for m in pkgutil.iter_modules(rs_qgis_plugin.core.__path__)]
    assert {"rs_qgis_plugin.core.ssh", "rs_qgis_plugin.core.transfer"} <= set(modules)
    out = subprocess.run([sys.executable, "-c", PROBE, "rs_qgis_plugin.core", *modules],
                         cwd=REPO, capture_output=True, text=True, timeout=60,
                         env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == f"ok {len(modules) + 1}"


def test_protocol_modules_do_not_need_paramiko():
    """The cluster venv has no paramiko; the contract test imports these there."""
    probe = ("import sys; sys.modules['paramiko'] = None\n"
             "import rs_qgis_plugin.core.protocol, rs_qgis_plugin.core.jobspec, "
             "rs_qgis_plugin.core.commands, rs_qgis_plugin.core.profile")
    out = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True,
                         timeout=60, env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr
