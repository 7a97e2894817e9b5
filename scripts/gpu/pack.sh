#!/usr/bin/env bash
# GPU kit, step 1 (runs here, needs cargo; no GPU): builds in release the `mole` binary, every
# GPU test binary (tests/*_gpu.rs) (with PACK_BENCHES=1 also the criterion bench binaries, which
# the kit does not run) and the C ABI's shared library (lib/libmole.so.xz, compressed, for
# tests/c/forward_gpu.c), strips them, and writes them with a manifest into the git-ignored folder
# .gpu/, which the GPU machine receives (carry: [".gpu"]). The device tool takes at most 64 MiB of
# working tree per call, .gpu/ included: fails if .gpu/ and the rest of the tree that travels
# (tracked and untracked-not-ignored files) exceed 63 MiB (1 MiB of margin).
# Then, on the GPU machine: bash scripts/gpu/run.sh default "$OUT".
set -euo pipefail
cd "$(dirname "$0")/../.."
TREE_BYTES=$(git ls-files -z --cached --others --exclude-standard | xargs -0 -r du -cb 2>/dev/null | tail -1 | cut -f1)
LIMIT_BYTES=$((63 * 1024 * 1024 - ${TREE_BYTES:-0}))
KIT=.gpu
rm -rf "$KIT"
mkdir -p "$KIT/bin" "$KIT/lib"

# Every build prints cargo's JSON messages; the executables are picked from them.
tests=()
for f in tests/*_gpu.rs; do tests+=(--test "$(basename "$f" .rs)"); done
# Named one by one: `cargo bench` alone also builds the lib's and the bin's unit tests as benches.
benches=()
for f in benches/*.rs; do benches+=(--bench "$(basename "$f" .rs)"); done
{
  cargo build --release --features cli --bin mole --message-format=json
  cargo test --release --features cli --no-run --message-format=json "${tests[@]}"
  # The C ABI with the binary's feature set, so the library crate built above is reused.
  cargo build --release -p mole-c --lib --features mole-core/cli --message-format=json
  if [ "${PACK_BENCHES:-0}" = 1 ]; then
    cargo bench --features cli --no-run --message-format=json "${benches[@]}"
  fi
} 2> >(grep -v '^\s*\(Compiling\|Finished\|Executable\)' >&2) > "$KIT/cargo-messages.json"

python3 - "$KIT" <<'PY'
import hashlib, json, lzma, os, shutil, subprocess, sys, time
kit = sys.argv[1]
picked = {}
for line in open(os.path.join(kit, "cargo-messages.json")):
    try:
        msg = json.loads(line)
    except ValueError:
        continue
    if msg.get("reason") == "compiler-artifact" and "cdylib" in msg["target"]["kind"]:
        picked["lib/libmole.so"] = next(f for f in msg["filenames"] if f.endswith(".so"))
        continue
    exe = msg.get("executable") if msg.get("reason") == "compiler-artifact" else None
    if not exe:
        continue
    target = msg["target"]
    kind = target["kind"][0]
    name = target["name"]
    if kind == "bin" and not msg["profile"]["test"]:
        dest = name
    elif kind == "test":
        dest = name
    elif kind == "bench":
        dest = "bench-" + name
    else:
        continue
    picked["bin/" + dest] = exe
os.remove(os.path.join(kit, "cargo-messages.json"))
files = {}
for dest, exe in sorted(picked.items()):
    out = os.path.join(kit, dest)
    shutil.copy2(exe, out)
    subprocess.run(["strip", out], check=True)
    if dest.startswith("lib/"):
        # The library holds the shipped PTX (text): xz takes it from 6.4 to 1 MiB; kit.py unpacks it.
        with open(out, "rb") as f, lzma.open(out + ".xz", "wb", preset=9) as z:
            shutil.copyfileobj(f, z)
        os.remove(out)
        dest, out = dest + ".xz", out + ".xz"
    data = open(out, "rb").read()
    files[dest] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
def git(*args):
    r = subprocess.run(["git", *args], capture_output=True, text=True)
    return r.stdout.strip() if r.returncode == 0 else None
manifest = {
    "commit": git("rev-parse", "HEAD"),
    "dirty": bool(git("status", "--porcelain", "--untracked-files=no")),
    "packed_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    "files": files,
    "total_bytes": sum(f["bytes"] for f in files.values()),
}
assert "bin/mole" in picked, "the mole binary was not built"
version = subprocess.run([os.path.join(kit, "bin", "mole"), "--version"], capture_output=True, text=True).stdout
assert version.startswith("mole "), f"bin/mole is not the mole command line: {version[:80]!r}"
assert any(k.endswith("_gpu") for k in picked), "no GPU test binary was built"
assert "lib/libmole.so" in picked, "the C ABI's libmole.so was not built"
json.dump(manifest, open(os.path.join(kit, "manifest.json"), "w"), indent=2)
for name, f in files.items():
    print(f"{f['bytes'] / 2**20:8.1f} MiB  {name}")
print(f"{manifest['total_bytes'] / 2**20:8.1f} MiB  in all, commit {manifest['commit']}{' (dirty)' if manifest['dirty'] else ''}")
PY

# The Python package's wheel (abi3, manylinux, stripped) for the kit's PyTorch check, built with
# the maturin of scripts/test-python.sh's virtual environment (else of PATH); without maturin it
# is left out and the kit reports that step as skipped.
MATURIN=target/pyvenv/bin/maturin
[ -x "$MATURIN" ] || MATURIN="$(command -v maturin || true)"
if [ -n "$MATURIN" ]; then
  "$MATURIN" build --release --strip --manifest-path python/Cargo.toml --out "$KIT/wheel" 2>&1 \
    | grep -v '^\s*\(Compiling\|Finished\)' >&2
  ls -l "$KIT"/wheel/*.whl | awk '{printf "%8.1f MiB  %s\n", $5 / 1048576, $NF}'
else
  echo "pack: no maturin (run scripts/test-python.sh first): the wheel is left out" >&2
fi

total=$(du -sb "$KIT" | cut -f1)
if [ "$total" -gt "$LIMIT_BYTES" ]; then
  echo "pack: $KIT is $((total / 1024 / 1024)) MiB, over the $((LIMIT_BYTES / 1024 / 1024)) MiB left of the device's 64 MiB by the rest of the tree ($((TREE_BYTES / 1024 / 1024)) MiB, 1 MiB margin)" >&2
  exit 1
fi
echo "pack: $KIT ready ($((total / 1024)) KiB)"
