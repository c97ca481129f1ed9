#!/usr/bin/env bash
# System packages fastssl needs beyond Python, installed only when missing.
# Called by `make setup`; safe to run again (it checks before it installs).
#   python3-venv, gcc: the .venv and C extensions
#   pkg-config, libopencv-dev, libturbojpeg0-dev: ffcv builds its C extension against
#     opencv4 and libturbojpeg (found through pkg-config) and links them at run time
set -euo pipefail

need=()
python3 -c "import venv, ensurepip" 2>/dev/null || need+=(python3-venv)
command -v gcc >/dev/null || need+=(build-essential)
command -v pkg-config >/dev/null || need+=(pkg-config)
pkg-config --exists opencv4 2>/dev/null || need+=(libopencv-dev)
pkg-config --exists libturbojpeg 2>/dev/null || need+=(libturbojpeg0-dev)

if [ ${#need[@]} -eq 0 ]; then
  exit 0
fi
echo "setup: installing system packages: ${need[*]}"
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need[@]}"
