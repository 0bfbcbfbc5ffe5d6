"""The openai backend: any OpenAI-compatible chat-completions endpoint through the official `openai` client.

Why the client's own retries (not ray.data.llm's HttpRequestProcessor): it retries 429, 408/409, every 5xx,
timeouts and dropped connections with exponential backoff and jitter, and waits what `Retry-After` (or
`retry-after-ms`) says; the HTTP processor retries neither 500 nor honours Retry-After, and puts the key in
headers that Ray may log. A prompt that still fails after `max_retries` is recorded as failed in its batch's
commit record (and sent again by the next run), never dropped. At most `max_concurrency` requests are in flight;
batches are committed as soon as each is complete, each commit finishing before another result is accepted."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

from compressor import prompt_rows as prompts
from compressor.errors import UserError
from compressor.stages.generate.store import AnswerStore


def client(spec, api_key: str):
    from openai import AsyncOpenAI

    return AsyncOpenAI(base_url=spec.base_url, api_key=api_key, max_retries=spec.max_retries, timeout=spec.timeout_s)


def request(spec, messages: list[dict], seed: int) -> dict:
    body = {
        "model": spec.api_model,
        "messages": messages,
        "temperature": spec.temperature,
        "top_p": spec.top_p,
        "max_tokens": spec.max_new_tokens,
        "n": spec.n,
        "seed": seed,
    }
    if spec.stop:
        body["stop"] = spec.stop
    if spec.logprobs:
        body.update(logprobs=True, top_logprobs=spec.logprobs)
    return body


def rows_of(row: dict, completion, logprobs: bool) -> list[dict]:
    """The answer rows of one response (n choices). Per-choice answer tokens: the logprob count when there, else
    the usage split evenly (servers report one total for all n)."""
    usage = completion.usage
    choices = sorted(completion.choices, key=lambda c: c.index)
    out = []
    for choice in choices:
        content = getattr(choice.logprobs, "content", None) if choice.logprobs else None
        tokens = len(content) if content else (usage.completion_tokens // max(len(choices), 1) if usage else 0)
        record = {
            "id": row["id"],
            "messages": row["messages"],
            "response": choice.message.content or "",
            "finish_reason": choice.finish_reason or "stop",
            "prompt_tokens": usage.prompt_tokens if usage else 0,
            "completion_tokens": tokens,
        }
        if logprobs:
            record["top_logprobs"] = (
                [[{"token": alt.token, "logprob": float(alt.logprob)} for alt in step.top_logprobs] for step in content]
                if content
                else None
            )
            # the chosen tokens: where each step's alternatives start in the answer (compressor/soft_labels.py)
            record["answer_tokens"] = [step.token for step in content] if content else None
        out.append(record)
    return out


async def _answer(api, spec, row: dict, seed: int, limit: asyncio.Semaphore):
    import openai
    from openai.types.chat import ChatCompletion

    async with limit:
        try:
            # The client's post, not chat.completions.create: the same retries, backoff and Retry-After, without
            # the per-request transform of typed parameters (about 2 ms of CPU each, a third of a core at 150/s).
            completion = await api.post(
                "/chat/completions", body=request(spec, row["messages"], seed), cast_to=ChatCompletion
            )
        except (openai.AuthenticationError, openai.PermissionDeniedError) as exc:
            raise UserError(
                f"generate: {spec.base_url} refused the key in ${spec.api_key_env} ({exc.status_code}); what was "
                "answered before is kept"
            ) from None
        except openai.NotFoundError:
            raise UserError(f"generate: {spec.base_url} has no model {spec.api_model!r} (404)") from None
        except openai.OpenAIError as exc:  # still failing after the client's retries: recorded, sent again next run
            return row, None, f"{type(exc).__name__}: {str(exc)[:300]}"
    return row, completion, None


async def _batch(api, spec, store: AnswerStore, source, desc: dict, seed: int, limit, lock) -> dict:
    start = time.perf_counter()
    rows = await asyncio.to_thread(prompts.read, source, desc)
    if desc.get("only") is not None:
        rows = [r for r in rows if r["id"] in set(desc["only"])]
    done = await asyncio.gather(*(_answer(api, spec, r, seed, limit) for r in rows))
    answers, failed, prompt_tokens = [], {}, 0
    for row, completion, error in done:
        if error is not None:
            failed[row["id"]] = error
            continue
        answers += rows_of(row, completion, bool(spec.logprobs))
        prompt_tokens += completion.usage.prompt_tokens if completion.usage else 0
    seconds = time.perf_counter() - start
    usage = {
        "prompts": len(rows),
        "prompt_tokens": prompt_tokens,
        "completion_tokens": sum(a["completion_tokens"] for a in answers),
        "seconds": seconds,
    }
    async with lock:  # one commit at a time; results wait until it is written
        store.commit(desc["k"], desc["attempt"], answers, failed, usage, bool(spec.logprobs))
    return {
        "batch": desc["k"],
        "prompts": len(rows),
        "completion_tokens": usage["completion_tokens"],
        "seconds": seconds,
    }


async def _run(spec, api_key: str, source, store: AnswerStore, todo: list[dict], seed: int, results):
    api = client(spec, api_key)
    limit, lock = asyncio.Semaphore(spec.max_concurrency), asyncio.Lock()
    # Enough batches in flight to keep max_concurrency requests busy while one batch waits for its slowest answer.
    window = max(2, -(-2 * spec.max_concurrency // spec.commit_every) + 1)
    pending: set[asyncio.Task] = set()
    try:
        for desc in todo:
            if len(pending) >= window:
                finished, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                for task in finished:
                    results.put(task.result())
            pending.add(asyncio.create_task(_batch(api, spec, store, source, desc, seed, limit, lock)))
        while pending:
            finished, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for task in finished:
                results.put(task.result())
    finally:
        for task in pending:
            task.cancel()
        await api.close()


def run(spec, api_key: str, source, store: AnswerStore, todo: list[dict], ctx, seed: int) -> Iterator[dict]:
    """Answer the `todo` batches; yields each batch's summary once it is committed (the event loop runs in a thread,
    so the stage's progress line moves while requests are in flight). Its error is raised here."""
    import queue
    import threading

    results: queue.Queue = queue.Queue()
    done = object()

    def loop() -> None:
        try:
            asyncio.run(_run(spec, api_key, source, store, todo, seed, results))
        except BaseException as exc:  # re-raised in the stage's thread
            results.put(exc)
        results.put(done)

    thread = threading.Thread(target=loop, name="generate-openai", daemon=True)
    thread.start()
    while (item := results.get()) is not done:
        if isinstance(item, BaseException):
            raise item
        yield item
    # The loop's thread has closed its event loop and executor; wait for it to end, so the process never exits
    # with it still running (a process that did once aborted at exit: "terminate called without an active
    # exception", in tests/test_generate_api.py under load).
    thread.join(timeout=30)
