#!/usr/bin/env bash
# Installs the pinned NVRTC wheel from PyPI into the project-local, git-ignored folder .nvrtc/
# and prints its library folder. Idempotent; needs python3 with pip, no CUDA toolkit, no GPU.
set -euo pipefail
NVRTC_WHEEL="nvidia-cuda-nvrtc-cu12==12.4.127"
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
DEST="$ROOT/.nvrtc"
LIB="$DEST/nvidia/cuda_nvrtc/lib"
if [ ! -e "$LIB/libnvrtc.so.12" ]; then
  python3 -m pip install --quiet --disable-pip-version-check --no-deps --target "$DEST" "$NVRTC_WHEEL" >&2
fi
echo "$LIB"
