"""Teacher generation: the teacher answers the user's prompts, and the answers become a dataset a later stage
(distill) names as its `data`. Local weights run in Ray Data actors (hf) or ray.data.llm (vllm); an API teacher is
any OpenAI-compatible endpoint. Answers are committed in batches, so a crashed run never pays twice for an answer.

Importing this module does not import torch (the stage contract)."""

from __future__ import annotations

from compressor.contract import register
from compressor.contract.context import StageContext
from compressor.contract.kind import CheckResult, EstimateInput, PlanContext, StageKind, StageResult, one_task
from compressor.errors import UserError
from compressor.manifest import ModelRef
from compressor.stages.generate.spec import GenerateSpec


class Generate(StageKind):
    name = "generate"
    spec = GenerateSpec
    summary = "The teacher (local weights or an OpenAI-compatible API) answers prompts; the answers are a dataset."
    output = "dataset"
    runs_as = "driver"
    needs_teacher = True

    def check(self, spec: GenerateSpec, config: dict) -> CheckResult:
        """The stage makes no model: the model after it is the one before it."""
        if spec.backend == "vllm" and not spec.api_model and (spec.n > 1 or spec.logprobs):
            raise UserError("generate.backend vllm: n > 1 and logprobs are not supported yet; use backend hf")
        return CheckResult(config=dict(config))

    def run(self, spec: GenerateSpec, model: ModelRef, ctx: StageContext) -> StageResult:
        from compressor.stages.generate.job import generate

        return generate(spec, model, ctx)

    def flops(self, spec: GenerateSpec, given: EstimateInput) -> float:
        """A local teacher's forward FLOPs for every prompt's longest answers (the prompt tokens left out: plan's cost
        note counts them); an API teacher's are not ours to count."""
        if spec.api_model:
            return 0.0
        from compressor import estimate
        from compressor.prompt_rows import scan
        from compressor.text_sources import normalized

        teacher = given.teacher_config or given.in_config
        if not teacher:
            return 0.0
        count = sum(len(rows) for _, rows in scan(normalized(given.pipeline.data[spec.prompts]), 1024))
        per_token = estimate.forward_flops_per_token(teacher, spec.max_new_tokens)
        return count * spec.n * spec.max_new_tokens * per_token

    def key_extra(self, spec: GenerateSpec, plan: PlanContext) -> dict:
        """The prompts' content (file names, sizes, stamps; an hf: commit) and, for local weights, the teacher's key."""
        from compressor.cache import key_fields
        from compressor.text_sources import source_identity

        source = plan.pipeline.data[spec.prompts]
        extra = {"prompts": {**key_fields(source), "content": source_identity(source)}}
        return extra if spec.api_model else {**extra, "teacher": plan.teacher_key}

    def describe_resources(self, spec: GenerateSpec, resources) -> str:
        if spec.api_model:
            return f"API, {spec.max_concurrency} concurrent"
        return f"{spec.actors or 'auto'} x {one_task(spec, resources)}"

    def plan_notes(self, plan, stage) -> list[str]:
        """prompts, input/output tokens, and GPU-hours or dollars (compressor/stages/generate/cost.py)."""
        from compressor.stages.generate import cost, job
        from compressor.text_sources import normalized

        spec = stage.entry.spec
        try:
            source = normalized(plan.spec.data[spec.prompts])
            measured = stage.cached.metrics if stage.cached else None
            if measured:
                answers, tokens, rate = (measured.get(k) for k in ("answers", "completion_tokens", "tokens_per_s"))
                measured = {"answers": answers, "completion_tokens": tokens, "seconds": tokens / rate if rate else 0}
            else:  # an interrupted run's commits tell the mean answer length and the speed
                seed = spec.seed if spec.seed is not None else plan.spec.seed
                teacher = None if spec.api_model else plan.teacher
                key = job.answers_key(spec, teacher, source, seed)
                store = job.AnswerStore(job.storage.join(plan.pipeline_uri, "pending", f".answers-{key[:16]}"))
                measured = store.usage(limit=200)
            tokenizer = None if spec.api_model else cost.local_tokenizer(plan.teacher.path)
            est = cost.estimate(spec, source, tokenizer, measured)
        except UserError as exc:
            return [f"{stage.name}: cost unknown ({exc})"]
        return [f"{stage.name}: {line}" for line in cost.cost_lines(spec, est, stage.entry.resources.num_gpus)]

    def result_line(self, manifest) -> str:
        m = manifest.metrics
        return (
            f"answered {m.get('prompts', 0):.0f} prompts ({m.get('failed', 0):.0f} failed): kept {m.get('kept', 0):.0f} "
            f"of {m.get('answers', 0):.0f} answers, {m.get('completion_tokens', 0):.0f} answer tokens"
        )


KIND = register(Generate())
