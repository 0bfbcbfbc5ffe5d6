"""The vllm backend: the same job over Ray's batch-inference engine (`ray.data.llm`, vLLM engine processor).

GPU-only and untested on this project's CPU CI (vLLM needs CUDA). Tensor parallelism is the stage's
`resources.num_gpus` (one engine spans that many GPUs); `actors` engines run at once. The descriptors of the prompt
batches still to answer flow through Ray Data: each is expanded into its prompts on a worker (read from storage),
answered by the engines, and the driver commits a batch once all its rows have come back. Ray Data does not resume
a pipeline that died; the commits do: a re-run sends only the batches without a commit record."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

from compressor import prompt_rows as prompts
from compressor.errors import UserError
from compressor.manifest import ModelRef
from compressor.stages.generate.store import AnswerStore


def _require_vllm():
    try:
        import vllm  # noqa: F401
        from ray.data.llm import build_processor, vLLMEngineProcessorConfig
    except ImportError as exc:
        raise UserError(
            f"generate.backend vllm: {exc.name or 'vllm'} is not installed (pip install vllm, on GPU nodes); "
            "or use backend: hf"
        ) from None
    return build_processor, vLLMEngineProcessorConfig


def run(spec, teacher: ModelRef, source, store: AnswerStore, todo: list[dict], ctx, seed: int) -> Iterator[dict]:
    build_processor, config_class = _require_vllm()
    import ray

    from compressor.models import materialize
    from compressor.ray_runtime import ensure_ray

    ensure_ray(ctx.ray_address)
    tensor_parallel = max(1, int(ctx.resources.num_gpus))
    config = config_class(
        model_source=materialize(teacher).path,  # a path every GPU node can read (shared storage)
        engine_kwargs={"tensor_parallel_size": tensor_parallel, "max_logprobs": spec.logprobs or 0},
        concurrency=spec.actors or 1,
        batch_size=spec.batch_size,
    )
    sampling = {
        "temperature": spec.temperature,
        "top_p": spec.top_p,
        "max_tokens": spec.max_new_tokens,
        "n": spec.n,
        "seed": seed,
        "stop": spec.stop or None,
        **({"logprobs": spec.logprobs} if spec.logprobs else {}),
    }
    processor = build_processor(
        config,
        preprocess=lambda row: {**row, "messages": json.loads(row["messages_json"]), "sampling_params": sampling},
        postprocess=lambda row: {
            "k": row["k"],
            "attempt": row["attempt"],
            "id": row["id"],
            "messages_json": row["messages_json"],
            "response": row["generated_text"],
            "finish_reason": "length" if row.get("num_generated_tokens", 0) >= spec.max_new_tokens else "stop",
            "prompt_tokens": row.get("num_input_tokens", 0),
            "completion_tokens": row.get("num_generated_tokens", 0),
        },
    )

    def expand(desc_row: dict) -> list[dict]:
        desc = json.loads(desc_row["desc"])
        rows = prompts.read(source, desc)
        only = set(desc["only"]) if desc.get("only") is not None else None
        return [
            {"k": desc["k"], "attempt": desc["attempt"], "id": r["id"], "messages_json": json.dumps(r["messages"])}
            for r in rows
            if only is None or r["id"] in only
        ]

    expected = {d["k"]: (d["rows"] if d.get("only") is None else len(d["only"])) for d in todo}
    data = ray.data.from_items([{"desc": json.dumps(d)} for d in todo]).flat_map(expand)
    waiting: dict[int, list[dict]] = {}
    start = time.perf_counter()
    for row in processor(data).iter_rows():
        answers = waiting.setdefault(row["k"], [])
        answers.append({**row, "messages": json.loads(row["messages_json"])})
        if len(answers) == expected[row["k"]]:  # the batch is whole: commit it before taking more rows
            k, attempt = row["k"], row["attempt"]
            records = [
                {f: a[f] for f in ("id", "messages", "response", "finish_reason", "prompt_tokens", "completion_tokens")}
                for a in waiting.pop(k)
            ]
            usage = {
                "prompts": len(records),
                "prompt_tokens": sum(r["prompt_tokens"] for r in records),
                "completion_tokens": sum(r["completion_tokens"] for r in records),
                "seconds": time.perf_counter() - start,
            }
            store.commit(k, attempt, records, {}, usage, False)
            yield {"batch": k, "prompts": len(records), "completion_tokens": usage["completion_tokens"]}
