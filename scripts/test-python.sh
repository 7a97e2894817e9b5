#!/usr/bin/env bash
# The Python package (python/): builds it from source into a virtual environment kept under
# target/pyvenv (made once, with maturin, NumPy and pytest from PyPI), then runs its pytest suite
# (NumPy only: the reference path, spec, shape, dtype and layout errors; no GPU, no torch).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=target/pyvenv
if [ ! -x "$VENV/bin/pytest" ] || [ ! -x "$VENV/bin/maturin" ]; then
  rm -rf "$VENV"
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install --quiet --upgrade pip
  "$VENV/bin/pip" install --quiet maturin numpy pytest
fi
# What a user runs: `pip install ./python` (maturin as the build backend, a release build).
"$VENV/bin/pip" install --quiet --force-reinstall --no-deps ./python
# From the repository root, not python/: the tests import the installed package.
"$VENV/bin/pytest" -q python/tests
