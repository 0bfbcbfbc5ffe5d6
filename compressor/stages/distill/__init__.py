"""Knowledge distillation: the frozen teacher teaches the student (the previous stage's output) in Ray Train workers,
each running DeepSpeed (student under ZeRO-2/3, teacher as a ZeRO-3 inference engine), with a chunked KD loss.

Importing this module does not import torch (the stage contract); the work happens in `driver` and `train`."""

from __future__ import annotations

from compressor.config.stages import DistillSpec
from compressor.manifest import ModelRef
from compressor.stages.base import CheckResult, StageResult
from compressor.stages.context import StageContext
from compressor.stages.distill.layout import batch_layout, budget_steps, check_student

RUNS_AS = "driver"  # run() starts a Ray Train TorchTrainer itself


def check(spec: DistillSpec, config: dict) -> CheckResult:
    """Distillation keeps the student's shape. Refuses batch layouts, budgets and layer pairs that cannot work."""
    check_student(spec, config)
    batch_layout(spec)
    if spec.steps is not None or spec.seq_len is not None:  # a token budget may need the data source's seq_len
        budget_steps(spec, spec.seq_len or 1)
    warnings = []
    if spec.deepspeed.bf16 and spec.gpus_per_worker == 0:
        warnings.append("distill.deepspeed.bf16 on CPU workers: works, but usually slower than fp32 on CPUs")
    if spec.deepspeed.offload_optimizer and spec.gpus_per_worker == 0:
        warnings.append("distill.deepspeed.offload_optimizer has no effect on CPU workers (no GPU memory to save)")
    return CheckResult(config=dict(config), warnings=warnings)


def run(spec: DistillSpec, model: ModelRef, ctx: StageContext) -> StageResult:
    from compressor.stages.distill.driver import distill

    return distill(spec, model, ctx)
