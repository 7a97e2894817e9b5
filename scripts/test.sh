#!/usr/bin/env bash
# The whole test suite, from a fresh clone: installs the pinned NVRTC wheel (project-local),
# then runs every test and the kernel compile gates.
set -euo pipefail
cd "$(dirname "$0")/.."
NVRTC_LIB="$(bash scripts/install-nvrtc.sh)"
export LD_LIBRARY_PATH="$NVRTC_LIB${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
cargo test --all-targets
cargo test --doc
