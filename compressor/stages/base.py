"""The stage contract.

Each stage is a module `compressor.stages.<kind>` that does NOT import torch at import time, with:

    RUNS_AS: "task" | "driver"      # a Ray task, or in the driver (distill starts Ray Train itself)
    def check(spec, config: dict) -> CheckResult
        # torch-free; config is the input model's config.json as a dict. Raises UserError on a bad
        # spec (exit 2 before any compute); returns the output config and warnings. Used by
        # validate/plan/run so that shape errors surface before anything is loaded.
    def run(spec, model: ModelRef, ctx: StageContext) -> StageResult
        # reads `model.path`, writes an HF checkpoint + tokenizer into `ctx.model_dir`.

The orchestrator adds key, sizes, timings and the MLflow run id, and writes manifest.json last.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class CheckResult:
    config: dict  # the output model's config.json as predicted from the spec alone
    warnings: list[str] = field(default_factory=list)


@dataclass
class StageResult:
    metrics: dict[str, float] = field(default_factory=dict)  # logged to MLflow and kept in the manifest
    details: dict[str, Any] = field(default_factory=dict)  # shapes, bits, ... kept in the manifest
