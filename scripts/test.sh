#!/usr/bin/env bash
# The whole test suite, from a fresh clone: installs the pinned NVRTC wheels of CUDA 12 and 13
# (project-local, .nvrtc/), then runs every test, the kernel compile gates under both compilers,
# and the GPU kit's pack and dry run. GPU tests (tests/*_gpu.rs) are counted as ignored here.
set -euo pipefail
cd "$(dirname "$0")/.."
NVRTC12="$(bash scripts/install-nvrtc.sh 12)"
NVRTC13="$(bash scripts/install-nvrtc.sh 13)"
# NVRTC 12 is the suite's compiler (the shipped PTX is generated with it); tests that need the
# other find it in .nvrtc/ themselves.
export LD_LIBRARY_PATH="$NVRTC12${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
# NVRTC is installed above, so tests that compile kernels must not skip for want of it.
export MOLE_REQUIRE_NVRTC=1
# `--features cli`: the command line and what only it uses (the library alone builds without it);
# the tests and benches that need it declare `required-features`.
cargo test --all-targets --features cli
# The tensor-core paths again with the emulated mma summing exactly (the pass above sums like the
# tensor cores): every tolerance must hold under both.
MOLE_HOSTEXEC_MMA=exact cargo test --features cli --test hostexec_fused --test hostexec_sgmv --test hostexec_probes
MOLE_HOSTEXEC_MMA=exact cargo test -p mole-hostexec --test mma
cargo test --doc --features cli
# The C ABI (capi/): the checked-in header is what cbindgen generates from the crate, and the
# crate's tests (tests/c/reference.c runs below, against the release build).
cargo run -q -p mole-c --features gen-header --bin gen-header -- --check
cargo test -p mole-c
# A framework links the library alone: no command-line dependency may reach its build.
if cargo tree -e normal -p mole --prefix none | grep -E '^(clap|indicatif|safetensors) '; then
  echo "the library's default build depends on the command line's crates (above)" >&2
  exit 1
fi
# What a framework sees: the default build's public items (rustdoc's list of all items) stay few
# (90: the forward and backward runtimes, the reference, the model and the tuning cache).
cargo doc --no-deps -p mole --quiet
items=$(grep -o '<li><a href="[^"]*">' target/doc/mole/all.html | wc -l)
echo "public items in the default build: $items"
if [ "$items" -gt 90 ]; then
  echo "the default build exposes $items public items (at most 90): put internals behind the \`internals\` feature" >&2
  exit 1
fi
cargo run --release --features cli -- check-kernels --arch sm_80,sm_90
MOLE_NVRTC_PATH="$NVRTC13/libnvrtc.so.13" cargo run --release --features cli -- check-kernels --arch sm_80,sm_90,sm_100
MOLE_NVRTC_PATH="$NVRTC12" cargo run --release --features cli -- gen-ptx --check
# The Python package: built from source with pip, its pytest suite (NumPy only).
bash scripts/test-python.sh
# tests/c/reference.c compiled with the system C compiler against the static library and run (no
# GPU: the reference against a naive loop, the error paths, device creation refused). Built with
# the command line's features, so the release library crate built above is reused (as pack.sh does).
cargo build --release -p mole-c --lib --features mole-core/cli
cc -std=c11 -Wall -Wextra -Werror -Iinclude tests/c/reference.c target/release/libmole.a -lpthread -ldl -lm \
  -o target/c-reference
target/c-reference
# The header from C++ (engines are C++): it compiles warning-free as C++17.
printf '#include "mole.h"\nint main() { MoleLayerSizes s{}; return s.saved_bytes != 0; }\n' |
  c++ -std=c++17 -Wall -Wextra -Werror -Iinclude -x c++ -fsyntax-only -
# The README's C example, compiled and linked against the static library (not run: it needs a GPU).
awk '/^## C$/,/^## The model/' README.md | sed -n '/^```c$/,/^```$/p' | sed '1d;$d' > target/readme-example.c
grep -q mole_layer_forward target/readme-example.c
printf 'int main(void) { return 0; }\n' >> target/readme-example.c
cc -std=c11 -Wall -Wextra -Werror -Iinclude target/readme-example.c target/release/libmole.a -lpthread -ldl -lm \
  -o target/readme-example
# The GPU kit: its report builder's tests, pack (release builds into .gpu/), and a dry run of the
# default set (exits non-zero when a step that needs no GPU fails).
python3 scripts/gpu/test_kit.py
bash scripts/gpu/pack.sh
bash scripts/gpu/run.sh default "$(mktemp -d)" --dry-run
