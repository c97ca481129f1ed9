#!/usr/bin/env bash
# Rehearse the GPU run on a CPU machine, in the GPU machine's own software.
#
#   bash tools/device_rehearsal.sh            # tools/gpu_check.py --dry-run, in that software
#   bash tools/device_rehearsal.sh --tests    # the same, then the whole test suite
#
# Why: the lent GPU machine runs its own image (Python 3.12, torch 2.11 with CUDA 13,
# torchvision 0.26, accelerate 1.15, numpy 2.5.2; /work/.library/device/KINDS.md, read 2026-11)
# plus the devkit's DALI 2.4 / FFCV 1.0.2 bundle, not our .venv's newer torch. Whatever breaks
# only in that software would otherwise be found in the GPU minutes. This builds a venv with
# those versions (CPU use of the CUDA wheels), unpacks the bundle exactly as on the device
# (.gpudeps/setup.sh, into /tmp/site) and runs the device command's dry run (docs/gpu_check.md).
#
# Needs: python3.12 (PATH or pyenv), a package registry (about 5.5 GB installed, once), and the
# bundle in .gpudeps (docs/gpu_check.md, "On the GPU machine"). The venv is kept in
# $REHEARSAL_VENV (default /tmp/fastssl_rehearsal), so a second run starts in seconds.
set -euo pipefail
cd "$(dirname "$0")/.."

DEVICE_PACKAGES=(torch==2.11.0 torchvision==0.26.0 accelerate==1.15.0 numpy==2.5.2
                 numba opencv-python-headless six psutil pillow tqdm tensorboard matplotlib
                 scikit-learn scipy pytest pytest-timeout)
VENV=${REHEARSAL_VENV:-/tmp/fastssl_rehearsal}
OUT=${REHEARSAL_OUT:-/tmp/fastssl_rehearsal_out}

die() { echo "device_rehearsal: $*" >&2; exit 2; }

case "${1:-}" in
  "") tests=0 ;;
  --tests) tests=1 ;;
  *) die "unknown argument '$1' (use --tests or nothing)" ;;
esac

[ -f .gpudeps/setup.sh ] && [ -f .gpudeps/device-site.tar.xz ] ||
  die ".gpudeps/ has no bundle: copy it first (docs/gpu_check.md, 'On the GPU machine')"

if [ ! -x "$VENV/bin/python3" ]; then
  py=$(command -v python3.12 || true)
  # a pyenv shim is on PATH even where 3.12 is not the selected version: it must run to count
  [ -n "$py" ] && ! "$py" -c "" 2>/dev/null && py=""
  if [ -z "$py" ] && command -v pyenv >/dev/null; then
    v=$(pyenv versions --bare | grep -E '^3\.12(\.|$)' | tail -1 || true)
    [ -n "$v" ] && py="$(pyenv root)/versions/$v/bin/python3.12"
  fi
  [ -n "$py" ] && [ -x "$py" ] || die "python3.12 not found (the GPU machine's Python): install it or put it on PATH"
  "$py" -m venv "$VENV"
fi
if [ ! -f "$VENV/.rehearsal-installed" ]; then
  echo "installing the GPU machine's package versions into $VENV (once; several GB)"
  "$VENV/bin/python3" -m pip install --quiet --disable-pip-version-check "${DEVICE_PACKAGES[@]}"
  touch "$VENV/.rehearsal-installed"
fi

export PATH="$VENV/bin:$PATH"
unset PYTHONPATH
# shellcheck disable=SC1091
source .gpudeps/setup.sh  # /tmp/site + the checkout on PYTHONPATH, as on the device
python3 -c "import torch, nvidia.dali, ffcv; print('rehearsal: Python', __import__('platform').python_version(),
'torch', torch.__version__, 'DALI', nvidia.dali.__version__)"

rm -rf "$OUT"
python3 tools/gpu_check.py --dry-run --out "$OUT" --budget 900
python3 - "$OUT/gpu_check.json" <<'PY'
import json, sys
bad = [f"{s['name']} {s['status']}" for s in json.load(open(sys.argv[1]))["stages"] if s["status"] != "ok"]
sys.exit(f"rehearsal: stages not ok: {', '.join(bad)}; see {sys.argv[1][:-4]}md" if bad else 0)
PY
if [ "$tests" = 1 ]; then
  python3 -m pytest -q -p no:cacheprovider
fi
