"""Minitron structured pruning (width and depth) of Hugging Face Llama-family checkpoints.

Torch-free at import: `check` reads only config.json; `run` imports the torch parts lazily."""

from __future__ import annotations

from compressor.config.stages import PruneSpec
from compressor.manifest import ModelRef
from compressor.stages.base import CheckResult, StageResult
from compressor.stages.context import StageContext

RUNS_AS = "task"


def check(spec: PruneSpec, config: dict) -> CheckResult:
    """Validate the target against the source config (UserError naming the field) and predict the output config."""
    from compressor.stages.prune import shapes

    if not config:  # a hub id not fetched yet: the same check runs again when the stage starts
        return CheckResult(config={}, warnings=["prune: input config.json not available; the target is checked at run time"])
    shapes.architecture(config)
    out = shapes.target_shape(spec, config)
    kept = shapes.kept_layers_rule(spec, shapes.source_shape(config).num_layers)
    return CheckResult(
        config=shapes.output_config(config, out, kept),
        warnings=shapes.group_size_warnings(out, spec.quantize_group_size),
    )


def run(spec: PruneSpec, model: ModelRef, ctx: StageContext) -> StageResult:
    from compressor.stages.prune.stage import prune

    return prune(spec, model, ctx)
