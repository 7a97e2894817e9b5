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
# The tensor-core paths again with the emulated mma summing exactly (the pass above sums like the
# tensor cores): every tolerance must hold under both.
MOLE_HOSTEXEC_MMA=exact cargo test --test hostexec_fused --test hostexec_sgmv --test hostexec_probes
MOLE_HOSTEXEC_MMA=exact cargo test -p mole-hostexec --test mma
cargo test --doc
cargo run --release -- check-kernels --arch sm_80,sm_90
cargo run --release -- gen-ptx --check
