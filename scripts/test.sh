#!/usr/bin/env bash
# The whole test suite, from a fresh clone: installs the pinned NVRTC wheel (project-local),
# then runs every test and the kernel compile gates.
set -euo pipefail
cd "$(dirname "$0")/.."
NVRTC_LIB="$(bash scripts/install-nvrtc.sh)"
export LD_LIBRARY_PATH="$NVRTC_LIB${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
# NVRTC is installed above, so tests that compile kernels must not skip for want of it.
export MOLE_REQUIRE_NVRTC=1
cargo test --all-targets
cargo test --doc
cargo run --release -- check-kernels --arch sm_80,sm_90
cargo run --release -- gen-ptx --check
