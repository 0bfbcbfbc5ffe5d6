"""The generate stage's run: scan the prompts, send the batches without a committed answer, build the dataset."""

from __future__ import annotations

import os
from typing import Optional

from compressor import prompt_rows as prompts
from compressor import secrets, storage
from compressor.cache import digest
from compressor.config.schema import DataSource
from compressor.contract.kind import StageResult
from compressor.errors import StageFailed, UserError
from compressor.manifest import ModelRef
from compressor.stages.generate.store import AnswerStore

# The spec fields an answer depends on (filters and review only shape the dataset made from the answers).
ANSWER_FIELDS = ("teacher", "backend", "base_url", "temperature", "top_p", "max_new_tokens", "n", "stop", "logprobs")


def api_key(spec) -> str:
    """The API key from the variable `api_key_env` names (masked in every log from now on); a UserError if unset."""
    if spec.api_key_env is None:
        return "not-needed"  # a local server without auth; the client requires some value
    value = os.environ.get(spec.api_key_env)
    if not value:
        raise UserError(
            f"generate.api_key_env: the environment variable {spec.api_key_env} is not set (or empty); export the "
            "API key under that name before running"
        )
    secrets.register(value)
    return value


def teacher_identity(spec, teacher: Optional[ModelRef]) -> dict:
    """What identifies the teacher in keys: its content key (commit) for local weights, endpoint and model for an API."""
    if spec.api_model:
        return {"endpoint": spec.base_url, "model": spec.api_model}
    return {"key": teacher.key if teacher else None}


def answers_key(spec, teacher: Optional[ModelRef], source: DataSource, seed: int) -> str:
    """The key of the committed answers: prompts, teacher, sampling and the batch size commits are made of."""
    from compressor.text_sources import source_identity

    fields = {f: getattr(spec, f) for f in ANSWER_FIELDS}
    return digest(
        {"prompts": source_identity(source), "teacher": teacher_identity(spec, teacher), "answer": fields}
        | {"seed": seed, "commit_every": spec.commit_every}
    )


def store_for(ctx, key: str) -> AnswerStore:
    """Beside the directory the stage publishes to (pipelines: <storage>/<pipeline>/pending/), named by its key."""
    publish = ctx.publish_uri or str(ctx.work_dir)
    parent = publish.rstrip("/").rsplit("/", 1)[0] if storage.is_remote(publish) else os.path.dirname(publish)
    return AnswerStore(storage.join(parent, f".answers-{key[:16]}"))


def generate(spec, model: ModelRef, ctx) -> StageResult:
    from compressor.stages.generate.finalize import finalize
    from compressor.text_sources import normalized

    key = api_key(spec) if spec.api_model else None  # unset variable: exit 2 before anything is read or written
    source = normalized(ctx.data_source(spec.prompts))
    teacher = None if spec.api_model else (ctx.shared_teacher or ctx.teacher or model)
    seed = spec.seed if spec.seed is not None else ctx.seed
    store = store_for(ctx, answers_key(spec, teacher, source, seed))
    committed = store.committed()
    todo, total, resent = [], 0, 0
    for desc, rows in prompts.scan(source, spec.commit_every):  # every row validated before anything is sent
        total += len(rows)
        if desc["k"] in committed.complete:
            continue
        attempt, only = committed.retry.get(desc["k"], (0, None))
        resent += len(only) if only is not None else len(rows)
        todo.append({**desc, "attempt": attempt, "only": only})
    ctx.info(f"generate: {total} prompts, {total - resent} answered before, {resent} to send; answers in {store.uri}")
    if todo:
        if spec.api_model:
            from compressor.stages.generate import openai_backend as backend

            summaries = backend.run(spec, key, source, store, todo, ctx, seed)
        else:
            from compressor.stages.generate import hf_backend, vllm_backend

            backend = vllm_backend if spec.backend == "vllm" else hf_backend
            summaries = backend.run(spec, teacher, source, store, todo, ctx, seed)
        for _ in ctx.progress(summaries, total=len(todo), desc="prompt batches"):
            pass
    failed = store.failed()
    usage = store.usage()
    if len(failed) > spec.max_failed * total:
        example = next(iter(failed.values()))
        raise StageFailed(
            f"generate: {len(failed)} of {total} prompts failed after their retries, more than max_failed "
            f"{spec.max_failed:g} allows (last error of one: {secrets.redact(example)}). The "
            f"{total - len(failed)} answered are kept in {store.uri}; a re-run sends only the failed prompts"
        )
    counts = finalize(store, ctx.work_dir, spec, seed)
    metrics = {"prompts": total, "failed": len(failed), **counts}
    metrics.update(prompt_tokens=usage["prompt_tokens"], completion_tokens=usage["completion_tokens"])
    if counts["answers"]:
        metrics["mean_completion_tokens"] = usage["completion_tokens"] / max(usage["answers"], 1)
    if usage["seconds"]:
        metrics["tokens_per_s"] = usage["completion_tokens"] / usage["seconds"]  # per actor (or per API batch)
    if spec.price is not None:
        metrics["cost_usd"] = dollars(spec.price, usage["prompt_tokens"], usage["completion_tokens"])
    ctx.log_metrics({k: float(v) for k, v in metrics.items()})
    ctx.log_artifact(ctx.work_dir / "review.md")
    details = {"teacher": teacher_identity(spec, teacher), "answers_uri": store.uri, "failed_ids": sorted(failed)[:100]}
    return StageResult(metrics={k: float(v) for k, v in metrics.items()}, details=details)


def dollars(price, prompt_tokens: float, completion_tokens: float) -> float:
    return prompt_tokens / 1e6 * price.input_per_mtok + completion_tokens / 1e6 * price.output_per_mtok
