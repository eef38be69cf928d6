#!/usr/bin/env bash
# Creates the plugin test venv (.venv-qgis) on Debian's Python with --system-site-packages, so
# QGIS, PyQt5, numpy and paramiko are Debian's own. Everything pip adds is constrained to the
# versions Debian already ships: pip never replaces PyQt5 or numpy there.
# Idempotent (stamp = hash of the requirements). Usage: setup-qgis-venv.sh VENV_DIR
set -euo pipefail
venv=${1:-.venv-qgis}
req=requirements/qgis.txt
stamp="$venv/.rs-stamp"
want=$(sha256sum "$req" scripts/setup-qgis-venv.sh | sha256sum | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  echo "setup-qgis-venv: $venv is up to date"
  exit 0
fi
[ -x "$venv/bin/python" ] || /usr/bin/python3 -m venv --system-site-packages "$venv"
"$venv/bin/python" -c "import qgis.core, PyQt5, paramiko, numpy" || {
  echo "setup-qgis-venv: Debian's python3-qgis / python3-paramiko are missing (run scripts/setup-system.sh)" >&2
  exit 1
}
constraints="$venv/debian-constraints.txt"
/usr/bin/python3 -m pip list --format=freeze 2>/dev/null | grep -viE '^(pip|setuptools|wheel)==' > "$constraints" || true
"$venv/bin/python" -m pip install -q --disable-pip-version-check -r "$req" -c "$constraints"
"$venv/bin/python" -c "import numpy, sys; sys.exit(int(numpy.__version__.split('.')[0]) >= 2)" || {
  echo "setup-qgis-venv: numpy 2 crept into $venv; QGIS 3.22 needs numpy < 2" >&2
  exit 1
}
echo "$want" > "$stamp"
echo "setup-qgis-venv: $venv ready"
