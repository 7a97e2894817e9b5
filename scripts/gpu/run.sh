#!/usr/bin/env bash
# GPU kit, step 2: on the GPU machine, from the repository root, after scripts/gpu/pack.sh ran here
# and .gpu/ was carried: `bash scripts/gpu/run.sh default "$OUT"` (<= 7 min) or `quick` (<= 2 min,
# correctness only). Here, without a GPU: `bash scripts/gpu/run.sh default DIR --dry-run`.
# Writes report.md, results.json, logs.tar.gz (and tuning.json) into the output folder.
set -euo pipefail
cd "$(dirname "$0")/../.."
exec python3 scripts/gpu/kit.py "$@"
