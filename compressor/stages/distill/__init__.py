"""Knowledge distillation: the frozen teacher teaches the student (the previous stage's output) in Ray Train workers,
each running DeepSpeed (student under ZeRO-2/3, teacher as a ZeRO-3 inference engine), with a chunked KD loss.

Importing this module does not import torch (the stage contract); the work happens in `driver` and `train`."""

from __future__ import annotations

import dataclasses
from typing import Optional

from compressor.contract import register
from compressor.contract.context import StageContext
from compressor.contract.kind import CheckResult, EstimateInput, PlanContext, StageKind, StageResult, one_task
from compressor.contract.spec import SourceRef
from compressor.manifest import ModelRef
from compressor.stages.distill.layout import Budget, batch_layout, budget, budget_steps, check_student
from compressor.stages.distill.spec import DistillSpec


class Distill(StageKind):
    name = "distill"
    spec = DistillSpec
    summary = "Knowledge distillation from the teacher, in Ray Train with DeepSpeed ZeRO."
    runs_as = "driver"
    needs_teacher = True

    def check(self, spec: DistillSpec, config: dict) -> CheckResult:
        """Distillation keeps the student's shape. Refuses batch layouts, budgets and layer pairs that cannot work."""
        check_student(spec, config)
        batch_layout(spec)
        if spec.steps is not None or spec.seq_len is not None:  # a token budget may need the data source's seq_len
            budget_steps(spec, spec.seq_len or 1)
        if spec.loss.targets is not None and config.get("vocab_size"):  # the student's width: the teacher's or less
            from compressor.targets import check_settings

            check_settings(spec.loss.targets.kind, spec.loss.targets.k, config["vocab_size"], "distill.loss.targets")
        warnings = []
        if spec.black_box and spec.loss.temperature != 1.0:
            warnings.append(
                f"distill.loss.temperature {spec.loss.temperature:g} is not used with teacher {spec.teacher}: an API's "
                "top_logprobs are the teacher's distribution at T = 1, and the KD term runs at T = 1"
            )
        if spec.deepspeed.bf16 and spec.gpus_per_worker == 0:
            warnings.append("distill.deepspeed.bf16 on CPU workers: works, but usually slower than fp32 on CPUs")
        if spec.deepspeed.offload_optimizer and spec.gpus_per_worker == 0:
            warnings.append("distill.deepspeed.offload_optimizer has no effect on CPU workers (no GPU memory to save)")
        return CheckResult(config=dict(config), warnings=warnings)

    def data_sources(self, spec: DistillSpec) -> list[SourceRef]:
        """Its data is read as chat rows (prompt and answer) when `chat` is set, else as text."""
        refs = super().data_sources(spec)
        if spec.chat is None:
            return refs
        return [dataclasses.replace(ref, reads="chat") if ref.field == "data" else ref for ref in refs]

    def preflight(self, spec: DistillSpec, pipeline, index: int) -> None:
        """Chat data rendered with the tokenizer's chat template needs a tokenizer that has one."""
        from compressor.errors import UserError
        from compressor.preflight import has_chat_template

        if spec.chat is None or spec.chat.template is not None:
            return
        teacher = spec.teacher or pipeline.teacher.model
        if has_chat_template(teacher) is False:
            raise UserError(
                f"stages.{index}.distill.chat: the data is rendered with the tokenizer's chat template, and the "
                f"tokenizer of {teacher} has none: set `chat.template` to a plain template with a {{prompt}} "
                'placeholder (e.g. "{prompt}\\nAnswer: "), or use a model whose tokenizer has a chat template'
            )

    def run(self, spec: DistillSpec, model: ModelRef, ctx: StageContext) -> StageResult:
        if spec.search is not None:  # trials first (Ray Tune), then this run with the best settings
            from compressor.stages.distill.search import search_then_distill

            result = search_then_distill(spec, model, ctx)
        else:
            from compressor.stages.distill.driver import distill

            result = distill(spec, model, ctx, planned=Budget(**ctx.planned) if ctx.planned else None)
        if spec.hard_labels is not None:  # the control: the same student on the labels alone
            from compressor.stages.distill.hard_labels import train_control

            result = train_control(spec, model, ctx, result)
        return result

    def calibration(self, spec: DistillSpec) -> tuple[Optional[int], Optional[int]]:
        """Its own seq_len, if set, is the standalone command's data source's (samples: the budget decides)."""
        return None, spec.seq_len

    def derived(self, spec: DistillSpec, data: dict) -> dict[str, int]:
        """Its budget on its data source (steps from `tokens`, at the source's seq_len), computed once per plan."""
        return dataclasses.asdict(budget(spec, data.get(spec.data)))

    def flops(self, spec: DistillSpec, given: EstimateInput) -> float:
        """Per token: the teacher's forward and the student's forward + backward (3x)."""
        from compressor import estimate
        from compressor.models import offline_config

        planned = Budget(**given.derived)
        seq_len, tokens = planned.seq_len, float(planned.tokens)
        if spec.search is not None:  # each trial trains `fraction` of the budget (or less, when ASHA stops it)
            tokens *= 1 + spec.search.trials() * spec.search.fraction
        student = 3 * estimate.forward_flops_per_token(given.in_config, seq_len)
        # the hard-label control: the same student, no teacher, its steps (default: the distillation's)
        control = 0.0
        if spec.hard_labels is not None:
            steps = spec.hard_labels.steps or planned.steps
            control = steps * spec.global_batch * seq_len * student
        if spec.black_box:  # no teacher forward
            return tokens * student + control
        teacher = given.teacher_config or offline_config(given.pipeline.teacher) or given.in_config
        return tokens * (estimate.forward_flops_per_token(teacher, seq_len) + student) + control

    def key_extra(self, spec: DistillSpec, plan: PlanContext) -> dict:
        # The teacher's logits are what the student learns; a black box's answers (and log-probs) are the data, keyed.
        extra = {} if spec.black_box else {"teacher": plan.teacher_key}
        if spec.hard_labels is not None:  # the control's labelled data, by content (it is not the stage's `data`)
            from compressor.cache import key_fields

            source = plan.pipeline.data.get(spec.hard_labels.data)
            extra["hard_labels_data"] = key_fields(source) if source is not None else spec.hard_labels.data
        if spec.search is not None:  # the validation data picks the settings: other validation data, another output
            from compressor.stages.distill.search_spec import validation_source

            extra["search_validation"] = validation_source(spec, plan)
        return extra

    def describe_resources(self, spec: DistillSpec, resources) -> str:
        worker = type(resources)(num_cpus=spec.cpus_per_worker, num_gpus=spec.gpus_per_worker)
        searched = f"; search: {spec.search.trials()} trials of the same" if spec.search is not None else ""
        control = "; then its hard-label control on the same" if spec.hard_labels is not None else ""
        return f"{spec.workers} x {one_task(spec, worker)}{searched}{control}"

    def plan_notes(self, plan, stage) -> list[str]:
        if stage.cached:
            return []
        if stage.entry.spec.data not in plan.spec.data:
            return [f"{stage.name} data: the dataset of stage {stage.entry.spec.data!r}, tokenized once it is made"]
        from compressor.stages.distill.status import shard_status, targets_status

        targets = targets_status(plan, stage)
        return [f"{stage.name} data: {shard_status(plan, stage)}"] + ([targets] if targets else [])

    def result_line(self, manifest) -> str:
        metrics, d = manifest.metrics, manifest.details
        return (
            f"distilled {d['steps']} steps ({d['tokens']:,} tokens) on {d['workers']} worker(s): loss "
            f"{metrics.get('loss', float('nan')):.4f}, {metrics.get('mean_tokens_per_s', 0):.0f} tokens/s"
        )


KIND = register(Distill())
