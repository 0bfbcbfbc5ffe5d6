"""The hf backend: the teacher's weights through transformers `generate`, in a pool of Ray Data actors.

Each actor loads the teacher once (on its node, from where the pipeline keeps it), and for each prompt batch it is
handed (a small descriptor: `prompts.scan`) reads the prompts from storage, answers them `batch_size` at a time and
commits the batch itself (store.AnswerStore). The driver only sees one small summary row per batch. Sampling is
seeded per batch (seed + batch number), so the answers do not depend on which actor, or how many, answered."""

from __future__ import annotations

import json
import time
from typing import Any

from compressor import prompt_rows as prompts
from compressor.manifest import ModelRef
from compressor.stages.generate.store import AnswerStore


def chat_text(tokenizer, messages: list[dict]) -> str:
    """The prompt text the model sees: its chat template, or for a base model without one the contents in order."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return "".join(f"{m['content']}\n\n" for m in messages)


def load(path: str, num_gpus: float):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from compressor import remote_code

    trust = remote_code.enabled()  # tests/test_security.py: every load passes it explicitly
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust)
    tokenizer.padding_side = "left"  # answers start right after each prompt
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=trust)
    if num_gpus and torch.cuda.is_available():
        model = model.to("cuda")
    return model.eval(), tokenizer


def answer(model, tokenizer, rows: list[dict], spec: Any, seed: int) -> list[dict]:
    """One answer row per (prompt, sample) of `rows` (the output schema of store.answer_schema)."""
    import torch

    torch.manual_seed(seed)
    texts = [chat_text(tokenizer, r["messages"]) for r in rows]
    enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=not tokenizer.chat_template)
    enc = {k: v.to(model.device) for k, v in enc.items() if k in ("input_ids", "attention_mask")}
    sampling = {"do_sample": True, "temperature": spec.temperature, "top_p": spec.top_p} if spec.temperature else {}
    with torch.no_grad():
        out = model.generate(
            **enc,
            max_new_tokens=spec.max_new_tokens,
            num_return_sequences=spec.n,
            pad_token_id=tokenizer.pad_token_id,
            return_dict_in_generate=True,
            output_logits=bool(spec.logprobs),
            **sampling,
        )
    width = enc["input_ids"].shape[1]
    new = out.sequences[:, width:]
    prompt_lens = enc["attention_mask"].sum(dim=1).tolist()
    results = []
    for j in range(new.shape[0]):
        row = rows[j // spec.n]
        tokens = new[j].tolist()
        ended = tokenizer.eos_token_id in tokens
        if ended:
            tokens = tokens[: tokens.index(tokenizer.eos_token_id)]
        text = tokenizer.decode(tokens, skip_special_tokens=True)
        finish = "stop" if ended else "length"
        for stop in spec.stop:
            if stop in text:
                text, finish = text[: text.index(stop)], "stop"
        record = {
            "id": row["id"],
            "messages": row["messages"],
            "response": text,
            "finish_reason": finish,
            "prompt_tokens": int(prompt_lens[j // spec.n]),
            "completion_tokens": len(tokens),
        }
        if spec.logprobs:
            record["top_logprobs"] = top_logprobs(
                tokenizer, [step[j] for step in out.logits[: len(tokens)]], spec.logprobs
            )
            record["answer_tokens"] = [tokenizer.decode([t]) for t in tokens]
        results.append(record)
    return results


def top_logprobs(tokenizer, logits, k: int) -> list[list[dict]]:
    import torch

    steps = []
    for step in logits:
        values, ids = torch.log_softmax(step.float(), dim=-1).topk(k)
        steps.append([{"token": tokenizer.decode([i]), "logprob": float(v)} for v, i in zip(values, ids.tolist())])
    return steps


class Answerer:
    """A Ray Data actor: answers and commits whole prompt batches."""

    def __init__(self, teacher: dict, spec: dict, source: dict, store_uri: str, seed: int, num_gpus: float):
        from compressor.config.schema import DataSource
        from compressor.models import materialize
        from compressor.stages.generate.spec import GenerateSpec

        self.spec, self.source = GenerateSpec.model_validate(spec), DataSource.model_validate(source)
        self.store, self.seed = AnswerStore(store_uri), seed
        self.model, self.tokenizer = load(materialize(ModelRef(**teacher)).path, num_gpus)

    def __call__(self, batch: dict) -> dict:
        out: dict[str, list] = {"batch": [], "prompts": [], "completion_tokens": [], "seconds": []}
        for text in batch["desc"]:
            desc = json.loads(text)
            start = time.perf_counter()
            rows = prompts.read(self.source, desc)
            if desc.get("only") is not None:  # a re-run of a batch with failures: only those prompts
                rows = [r for r in rows if r["id"] in set(desc["only"])]
            answers = []
            for i in range(0, len(rows), self.spec.batch_size):
                seed = self.seed + desc["k"] * 100_003 + i  # the same answers whichever actor takes the batch
                answers += answer(self.model, self.tokenizer, rows[i : i + self.spec.batch_size], self.spec, seed)
            seconds = time.perf_counter() - start
            usage = {
                "prompts": len(rows),
                "prompt_tokens": sum(a["prompt_tokens"] for a in answers[:: self.spec.n]),
                "completion_tokens": sum(a["completion_tokens"] for a in answers),
                "seconds": seconds,
            }
            self.store.commit(desc["k"], desc["attempt"], answers, {}, usage, bool(self.spec.logprobs))
            for key, value in (("batch", desc["k"]), ("prompts", len(rows)), ("seconds", seconds)):
                out[key].append(value)
            out["completion_tokens"].append(usage["completion_tokens"])
        return out


def actor_count(spec, resources, batches: int) -> int:
    """`spec.actors`, else as many actors of `resources` as the cluster's CPUs/GPUs fit; never more than batches."""
    import ray

    if spec.actors:
        return max(1, min(spec.actors, batches))
    total = ray.cluster_resources()
    fits = [total.get("CPU", 1) // resources.num_cpus] if resources.num_cpus else []
    fits += [total.get("GPU", 0) // resources.num_gpus] if resources.num_gpus else []
    return int(max(1, min([*fits, batches])))


def quiet_ray_data() -> None:
    """Ray Data's progress bars and INFO lines only with `-v` (the stage shows its own progress line)."""
    import logging

    import ray

    from compressor.ray_runtime import verbose

    if not verbose():
        ray.data.DataContext.get_current().enable_progress_bars = False
        logging.getLogger("ray.data").setLevel(logging.WARNING)


def run(spec, teacher: ModelRef, source, store: AnswerStore, todo: list[dict], ctx, seed: int):
    """Answer the `todo` batches with a pool of Answerer actors; yields each batch's summary as it is committed."""
    import ray

    from compressor.ray_runtime import ensure_ray

    ensure_ray(ctx.ray_address)
    quiet_ray_data()
    actors = actor_count(spec, ctx.resources, len(todo))
    ctx.info(f"generate: {len(todo)} batch(es) on {actors} Ray Data actor(s)")
    data = ray.data.from_items([{"desc": json.dumps(d)} for d in todo], override_num_blocks=len(todo))
    answered = data.map_batches(
        Answerer,
        fn_constructor_kwargs={
            "teacher": teacher.model_dump(),
            "spec": spec.model_dump(mode="json"),
            "source": source.model_dump(mode="json"),
            "store_uri": store.uri,
            "seed": seed,
            "num_gpus": ctx.resources.num_gpus,
        },
        batch_size=1,
        compute=ray.data.ActorPoolStrategy(size=actors),
        num_cpus=ctx.resources.num_cpus,
        num_gpus=ctx.resources.num_gpus,
        batch_format="numpy",
    )
    yield from answered.iter_rows()
