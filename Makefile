# The two commands of the README. Both create .venv and install on first use.
.PHONY: run test setup
export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1

setup:  ## GPU=1 (make setup GPU=1, make run GPU=1): the CUDA build of torch, constraints/gpu.txt (scripts/setup.sh)
	@GPU=$(GPU) scripts/setup.sh

run: setup  ## run the embedded default pipeline (offline reference teacher: prune -> distill -> quantize)
	.venv/bin/compressor run

test: setup  ## lint and format check (ruff), import contracts (lint-imports; both configured in pyproject.toml), then the test suite, end-to-end test included
	.venv/bin/ruff check .
	.venv/bin/ruff format --check .
	.venv/bin/lint-imports
	.venv/bin/python -m pytest -q --durations=15
