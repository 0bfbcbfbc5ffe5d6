#!/usr/bin/env bash
# Create .venv (if needed) and install compressor with its dev extra, pinned by constraints/cpu.txt, or with GPU=1
# (`make setup GPU=1`) by constraints/gpu.txt: the same pins with PyPI's CUDA build of torch.
# Re-running is cheap: the install is skipped while pyproject.toml and the constraints are unchanged.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
GPU=${GPU:-0}
if [ "$GPU" = 0 ]; then default=constraints/cpu.txt; else default=constraints/gpu.txt; fi
CONSTRAINTS=${COMPRESSOR_CONSTRAINTS:-$default}

if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv with $($PYTHON --version)"
  $PYTHON -m venv .venv
fi
stamp=".venv/.compressor-installed-$(cat pyproject.toml "$CONSTRAINTS" | sha256sum | cut -c1-16)"
if [ ! -f "$stamp" ]; then
  echo "setup: installing with $CONSTRAINTS (a few minutes on a fresh machine)"
  # Both builds are version 2.13.0, so pip keeps whichever is installed: remove one of the other kind first.
  want=cpu
  [ "$GPU" = 0 ] || want=cuda
  torch_kind() { .venv/bin/python -c 'import torch; print("cuda" if torch.version.cuda else "cpu")' 2>/dev/null || echo none; }
  installed="$(torch_kind)"
  if [ "$installed" != none ] && [ "$installed" != "$want" ]; then
    .venv/bin/python -m pip uninstall -q -y torch
  fi
  # torch first, from the pinned build, so that nothing pulls another build as a dependency.
  .venv/bin/python -m pip install -q -c "$CONSTRAINTS" torch
  if [ "$want" = cuda ] && [ "$(torch_kind)" != cuda ]; then
    echo "setup: GPU=1, but pip installed a CPU-only torch: see where it came from with 'pip config list'" >&2
    exit 1
  fi
  DS_BUILD_OPS=0 .venv/bin/python -m pip install -q -c "$CONSTRAINTS" -e '.[dev]'
  rm -f .venv/.compressor-installed-*
  touch "$stamp"
fi
