"""GPTQ quantization through GPTQModel: a GPTQ-format checkpoint that GPTQModel, transformers (with optimum),
lm-eval and vLLM load.

Torch-free at import: `check` reads only config.json (see alignment.py); `run` imports GPTQModel lazily."""

from __future__ import annotations

from compressor.config.stages import QuantizeSpec
from compressor.manifest import ModelRef
from compressor.stages.base import CheckResult, StageResult
from compressor.stages.context import StageContext

RUNS_AS = "task"


def check(spec: QuantizeSpec, config: dict) -> CheckResult:
    """Refuse a group size that misaligns with the layer widths (on_misaligned=error) and predict the output config."""
    from compressor.stages.quantize import alignment

    resolution = alignment.resolve(spec, config)
    if not config:  # a hub id not fetched yet: the same decision is taken again when the stage starts
        return CheckResult(config={}, warnings=["quantize: input config.json not available; alignment is checked at run time"])
    return CheckResult(config=alignment.output_config(config, spec, resolution), warnings=resolution.warnings)


def run(spec: QuantizeSpec, model: ModelRef, ctx: StageContext) -> StageResult:
    from compressor.stages.quantize.gptq import quantize

    return quantize(spec, model, ctx)
