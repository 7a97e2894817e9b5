#!/usr/bin/env bash
# Installs a pinned NVRTC wheel from PyPI into the project-local, git-ignored folder .nvrtc/cuMAJOR
# and prints its library folder. `install-nvrtc.sh` or `install-nvrtc.sh 12`: CUDA 12 (the default
# compiler of the test suite); `install-nvrtc.sh 13`: CUDA 13. Idempotent; needs python3 with pip,
# no CUDA toolkit, no GPU. mole finds both installs by itself from inside the checkout.
set -euo pipefail
MAJOR="${1:-12}"
case "$MAJOR" in
  12) WHEEL="nvidia-cuda-nvrtc-cu12==12.4.127"; SUB="nvidia/cuda_nvrtc/lib"; SO="libnvrtc.so.12" ;;
  13) WHEEL="nvidia-cuda-nvrtc==13.5.37"; SUB="nvidia/cu13/lib"; SO="libnvrtc.so.13" ;;
  *) echo "install-nvrtc.sh: unknown CUDA major '$MAJOR' (12 or 13)" >&2; exit 2 ;;
esac
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
DEST="$ROOT/.nvrtc/cu$MAJOR"
LIB="$DEST/$SUB"
if [ ! -e "$LIB/$SO" ]; then
  python3 -m pip install --quiet --disable-pip-version-check --root-user-action=ignore --no-deps --target "$DEST" "$WHEEL" >&2
fi
echo "$LIB"
