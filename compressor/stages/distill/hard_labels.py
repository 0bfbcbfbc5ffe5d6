"""The control of a task distillation (`distill.hard_labels`): the stage's input model trained on a labelled set
alone, CE on its answers and no teacher, with the stage's own settings. The classic question distillation answers is
how much better the student gets from the teacher than from the few labels the teacher itself learned from; the
pipeline scores this control beside the distilled student (orchestrator: a manifest's `references`), and the
summary and report show the table with the fraction of the gap recovered (compressor/recovery.py).

It is a second Ray Train run of the same driver, under its own run name (it resumes like the first), an MLflow
child run of the stage's, and its model is kept with the stage's output in `hard_labels/model`."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

from compressor.contract.context import StageContext
from compressor.contract.kind import StageResult
from compressor.manifest import ModelRef
from compressor.stages.distill.spec import DistillSpec

REFERENCE = "hard_labels"
CONTROL_MAX_EPOCHS = 10_000.0


def control_spec(spec: DistillSpec, steps: int) -> DistillSpec:
    """The distillation's settings with the labelled data, no teacher and no KD: CE on the answers."""
    given = spec.hard_labels
    fields = spec.model_dump(exclude={"hard_labels", "search", "loss", "tokens", "steps", "teacher", "data"})
    return DistillSpec.model_validate(
        {
            **fields,
            "data": given.data,
            "teacher": "none",
            "steps": given.steps or steps,
            # the labels are few (that is why there is a teacher): the control passes over them as its steps take
            "max_epochs": max(spec.max_epochs, CONTROL_MAX_EPOCHS),
            "loss": {"chunk_tokens": spec.loss.chunk_tokens},
        }
    )


def train_control(spec: DistillSpec, model: ModelRef, ctx: StageContext, distilled: StageResult) -> StageResult:
    from compressor.stages.distill.driver import distill, teacher_ref

    control = control_spec(spec, distilled.details["steps"])
    ctx.info(f"distill: the control, the same student on {control.data}'s labels alone ({control.steps} steps)")
    sink = ctx.child_sink(REFERENCE, {"data": control.data, "steps": control.steps, "teacher": "none"})
    work_dir = Path(ctx.work_dir) / REFERENCE
    run = dataclasses.replace(ctx, work_dir=work_dir, run_name=f"{ctx.run_name}-{REFERENCE}", sink=sink)
    start = time.perf_counter()
    try:
        # rendered, tokenized and exported with the distillation's tokenizer: the same prompts, the same template
        result = distill(control, model, run, tokenizer_of=teacher_ref(spec, ctx, model))
    finally:
        sink.finish()
    details = dict(distilled.details)
    details["references"] = {
        REFERENCE: {
            "model_uri": f"{REFERENCE}/model",
            "data": control.data,
            "steps": control.steps,
            "loss": result.metrics.get("loss"),
            "seconds": round(time.perf_counter() - start, 1),
        }
    }
    details["scratch"] = [*details.get("scratch", []), *result.details.get("scratch", [])]
    return StageResult(metrics=distilled.metrics, details=details)
