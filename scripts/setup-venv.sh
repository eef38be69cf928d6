#!/usr/bin/env bash
# Creates the cluster venv (.venv) with the pinned stack and Horovod built from source.
# Idempotent: a stamp file records the hash of requirements/cluster.txt, this script and the
# variant; nothing is redone while it matches.
#
# Usage: [RS_VARIANT=cpu|gpu] [RS_PLAN=1] setup-venv.sh VENV_DIR PYTHON
#   RS_VARIANT=cpu (default): tensorflow-cpu, Horovod with Gloo. What `make setup` installs and
#     every test here runs on.
#   RS_VARIANT=gpu: the GPU install for cluster nodes with NVIDIA GPUs: tensorflow[and-cuda] (the
#     same TensorFlow release, with CUDA and cuDNN from PyPI) and Horovod built with NCCL for its
#     GPU collectives (HOROVOD_GPU_OPERATIONS=NCCL) next to Gloo. Its build compiles CUDA kernels,
#     so it needs a CUDA 12 toolkit (nvcc) at $CUDA_HOME (default /usr/local/cuda); NCCL comes
#     from the nvidia-nccl-cu12 wheel that tensorflow[and-cuda] installs unless HOROVOD_NCCL_HOME
#     names another. NOT TESTED HERE: no GPU was available; only its plan is (RS_PLAN).
#   RS_PLAN=1: prints the requirements and the Horovod build settings the variant would use, and
#     installs nothing.
set -euo pipefail
venv=${1:-.venv}
python=${2:-python3.11}
variant=${RS_VARIANT:-cpu}
req=requirements/cluster.txt

case "$variant" in
  cpu|gpu) ;;
  *) echo "setup-venv: RS_VARIANT must be cpu or gpu, not '$variant'" >&2; exit 2 ;;
esac

# The one list of pins; the GPU variant swaps only the TensorFlow build, keeping its version.
requirements() {
  if [ "$variant" = gpu ]; then
    grep -q '^tensorflow-cpu==' "$req" \
      || { echo "setup-venv: no tensorflow-cpu pin in $req to turn into the GPU build" >&2; exit 2; }
    sed 's/^tensorflow-cpu==/tensorflow[and-cuda]==/' "$req"
  else
    cat "$req"
  fi
}

hvd_version=$(sed -n 's/^# HOROVOD_VERSION=//p' "$req")
hvd_env=(HOROVOD_WITH_GLOO=1 HOROVOD_WITHOUT_MPI=1 HOROVOD_WITH_TENSORFLOW=1
         HOROVOD_WITHOUT_PYTORCH=1 HOROVOD_WITHOUT_MXNET=1)
if [ "$variant" = gpu ]; then
  cuda_home=${CUDA_HOME:-/usr/local/cuda}
  pyver=$("$python" -c 'import sys; print(f"python{sys.version_info[0]}.{sys.version_info[1]}")' 2>/dev/null || echo python3.11)
  nccl_home=${HOROVOD_NCCL_HOME:-$venv/lib/$pyver/site-packages/nvidia/nccl}
  hvd_env+=(HOROVOD_GPU_OPERATIONS=NCCL "HOROVOD_CUDA_HOME=$cuda_home"
            "HOROVOD_NCCL_HOME=$nccl_home" HOROVOD_NCCL_LINK=SHARED)
fi

if [ "${RS_PLAN:-}" = 1 ]; then
  echo "# variant: $variant"
  echo "# horovod $hvd_version build: ${hvd_env[*]}"
  requirements
  exit 0
fi

stamp="$venv/.rs-stamp"
want=$( (sha256sum "$req" scripts/setup-venv.sh cluster_side/pyproject.toml; echo "$variant") \
        | sha256sum | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  echo "setup-venv: $venv is up to date"
  exit 0
fi

if [ "$variant" = gpu ] && [ ! -x "$cuda_home/bin/nvcc" ]; then
  echo "setup-venv: the GPU variant builds Horovod's CUDA kernels and needs a CUDA 12 toolkit:" \
       "no nvcc at $cuda_home/bin (set CUDA_HOME)" >&2
  exit 2
fi

[ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
pip=("$venv/bin/python" -m pip --disable-pip-version-check)
"${pip[@]}" install -q --upgrade "pip==24.3.1" "setuptools==75.6.0" wheel
resolved="$venv/.rs-requirements.txt"
requirements > "$resolved"
if [ "$variant" = gpu ]; then
  # one TensorFlow build in the venv: the CPU wheel would shadow the CUDA one
  "${pip[@]}" uninstall -q -y tensorflow-cpu 2>/dev/null || true
fi
"${pip[@]}" install -q -r "$resolved"

built_ok="import horovod.tensorflow as h; assert h.gloo_built()"
[ "$variant" = gpu ] && built_ok+="; assert h.nccl_built()"
if ! "$venv/bin/python" -c "import horovod, sys; sys.exit(horovod.__version__ != '$hvd_version')" 2>/dev/null \
   || ! "$venv/bin/python" -c "$built_ok" 2>/dev/null; then
  echo "setup-venv: building horovod $hvd_version ($variant: ${hvd_env[*]}; a few minutes)"
  # The build links against the installed TensorFlow, so it must come after it, without isolation.
  env "${hvd_env[@]}" MAKEFLAGS="-j$(nproc)" \
      "${pip[@]}" install -q --no-build-isolation --no-cache-dir --force-reinstall --no-deps \
      "horovod[spark]==$hvd_version"
  "${pip[@]}" install -q -c "$resolved" "horovod[spark]==$hvd_version"
  "$venv/bin/python" -c "$built_ok" \
    || { echo "setup-venv: horovod was built without what the $variant variant needs" >&2; exit 1; }
fi
"${pip[@]}" install -q --no-deps -e cluster_side
echo "$want" > "$stamp"
echo "setup-venv: $venv ready ($variant)"
