"""Evaluate stage: score the previous stage's model on the pipeline's lm-eval tasks (it writes no model).

Its gate then judges those scores; use it to gate the teacher itself or to re-check a model on more tasks."""

from __future__ import annotations

from compressor.contract import register
from compressor.contract.context import StageContext
from compressor.contract.kind import CheckResult, EstimateInput, PlanContext, StageKind, StageResult
from compressor.errors import UserError
from compressor.manifest import ModelRef
from compressor.stages.evaluate.spec import EvaluateSpec


class Evaluate(StageKind):
    name = "evaluate"
    spec = EvaluateSpec
    summary = "Score the previous stage's model on the pipeline's lm-eval tasks."
    output = "scores"
    standalone = False

    def check(self, spec: EvaluateSpec, config: dict) -> CheckResult:
        return CheckResult(config=config)

    def run(self, spec: EvaluateSpec, model: ModelRef, ctx: StageContext) -> StageResult:
        from compressor.evaluation import device_for, evaluate

        tasks = ctx.tasks
        if spec.tasks is not None:
            unknown = sorted(set(spec.tasks) - {t.name for t in ctx.tasks})
            if unknown:
                raise UserError(f"evaluate.tasks: {', '.join(unknown)} not among the pipeline's evaluation tasks")
            tasks = [t for t in ctx.tasks if t.name in spec.tasks]
        # The stage's own resources are what its Ray task reserved: a GPU there is the one to evaluate on.
        scores = evaluate(model.path, tasks, batch_size=ctx.eval_batch_size, device=device_for(ctx.resources.num_gpus))
        ctx.save_json_artifact("eval.json", scores)
        flat = {f"{task}.{metric}": float(v) for task, metrics in scores.items() for metric, v in metrics.items()}
        ctx.log_metrics(flat)
        return StageResult(metrics=flat, details={"scores": scores})

    def flops(self, spec: EvaluateSpec, given: EstimateInput) -> float:
        from compressor.estimate import eval_flops

        wanted = set(spec.tasks) if spec.tasks else None
        return eval_flops(
            given.in_config, [t for t in given.pipeline.evaluation.tasks if wanted is None or t.name in wanted]
        )

    def key_extra(self, spec: EvaluateSpec, plan: PlanContext) -> dict:
        return {"tasks": [t.model_dump(mode="json") for t in plan.pipeline.evaluation.tasks]}


KIND = register(Evaluate())
