#!/usr/bin/env bash
# Installs the Debian 12 packages the project needs. Idempotent: does nothing when all are present.
# Needs root (or sudo). Called by `make setup`; safe to run by hand.
set -euo pipefail

packages=(
  # Spark runs on the JVM; Maven fetches the Hadoop daemons of the hadoop test tier.
  openjdk-17-jre-headless maven
  # Cluster venv: Python 3.11 with headers (Horovod compiles against them) and a compiler.
  python3.11 python3.11-dev python3-venv build-essential cmake
  # QGIS from Debian: the plugin and its tests run against it; qgis for the desktop under Xvfb.
  python3-qgis qgis-providers qgis
  # The loopback "cluster" reached over SSH, and the virtual screen for desktop screenshots.
  openssh-server openssh-client xvfb xauth
  # The plugin's SSH client, from Debian so QGIS's own Python has it.
  python3-paramiko
  procps
)

missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -eq 0 ]; then
  echo "setup-system: all Debian packages present"
  exit 0
fi

SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
echo "setup-system: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
