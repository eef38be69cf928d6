#!/usr/bin/env bash
# Creates the cluster venv (.venv) with the pinned stack and Horovod built from source.
# Idempotent: a stamp file records the hash of requirements/cluster.txt; nothing is redone while it
# matches. Usage: setup-venv.sh VENV_DIR PYTHON
set -euo pipefail
venv=${1:-.venv}
python=${2:-python3.11}
req=requirements/cluster.txt
stamp="$venv/.rs-stamp"
want=$(sha256sum "$req" scripts/setup-venv.sh cluster_side/pyproject.toml | sha256sum | cut -d' ' -f1)

if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  echo "setup-venv: $venv is up to date"
  exit 0
fi

[ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
pip=("$venv/bin/python" -m pip --disable-pip-version-check)
"${pip[@]}" install -q --upgrade "pip==24.3.1" "setuptools==75.6.0" wheel
"${pip[@]}" install -q -r "$req"

hvd_version=$(sed -n 's/^# HOROVOD_VERSION=//p' "$req")
if ! "$venv/bin/python" -c "import horovod, sys; sys.exit(horovod.__version__ != '$hvd_version')" 2>/dev/null \
   || ! "$venv/bin/python" -c "import horovod.tensorflow as h; assert h.gloo_built()" 2>/dev/null; then
  echo "setup-venv: building horovod $hvd_version with Gloo + TensorFlow (a few minutes)"
  # The build links against the installed TensorFlow, so it must come after it, without isolation.
  env HOROVOD_WITH_GLOO=1 HOROVOD_WITHOUT_MPI=1 HOROVOD_WITH_TENSORFLOW=1 \
      HOROVOD_WITHOUT_PYTORCH=1 HOROVOD_WITHOUT_MXNET=1 MAKEFLAGS="-j$(nproc)" \
      "${pip[@]}" install -q --no-build-isolation --no-cache-dir -c "$req" "horovod[spark]==$hvd_version"
fi
"${pip[@]}" install -q --no-deps -e cluster_side
echo "$want" > "$stamp"
echo "setup-venv: $venv ready"
