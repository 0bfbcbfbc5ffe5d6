#!/usr/bin/env bash
# Create .venv (if needed) and install compressor with its dev extra, pinned by constraints/cpu.txt.
# Re-running is cheap: the install is skipped while pyproject.toml and the constraints are unchanged.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
CONSTRAINTS=${COMPRESSOR_CONSTRAINTS:-constraints/cpu.txt}

if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv with $($PYTHON --version)"
  $PYTHON -m venv .venv
fi
stamp=".venv/.compressor-installed-$(cat pyproject.toml "$CONSTRAINTS" | sha256sum | cut -c1-16)"
if [ ! -f "$stamp" ]; then
  echo "setup: installing (a few minutes on a fresh machine)"
  # torch first, from the pinned build, so that nothing pulls a CUDA wheel as a dependency.
  .venv/bin/python -m pip install -q -c "$CONSTRAINTS" torch
  DS_BUILD_OPS=0 .venv/bin/python -m pip install -q -c "$CONSTRAINTS" -e '.[dev]'
  rm -f .venv/.compressor-installed-*
  touch "$stamp"
fi
