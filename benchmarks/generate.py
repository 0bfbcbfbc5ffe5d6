"""Benchmark of the generate stage; prints JSON. `--quick` finishes in seconds (plus Ray's start for the hf part).

- hf: the stage's answer tokens/s (inside its Ray Data actor; and end to end) against a plain transformers
  `generate` loop over the same prompts and batch size, on the tiny-test teacher. Goal >= 0.9x.
- openai: requests/s against tests/openai_server.py (fixed answers, 50 ms injected latency, its own process) against
  the bound max_concurrency / latency. Goal >= 0.8x.
- resume: a run killed (SIGKILL) once half of its batches are committed, then re-run: the re-run's time against the
  time of the remaining half alone in a fresh directory. Goal <= 1.1x.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
KEY_ENV = "BENCH_TEACHER_KEY"


def write_prompts(path: Path, count: int, start: int = 0) -> Path:
    path.write_text("".join(json.dumps({"prompt": f"The module number {i} is"}) + "\n" for i in range(start, count)))
    return path


def plain_loop(model_dir: str, prompts: list[str], batch: int, new_tokens: int) -> float:
    """Answer tokens/s of a plain transformers loop (greedy, left padding): the bar for the hf backend."""
    import torch

    from compressor.stages.generate.hf_backend import load

    model, tok = load(model_dir, 0)
    torch.set_num_threads(1)  # as the stage's actor (resources.num_cpus 1: Ray gives it one thread)
    tokens, start = 0, time.perf_counter()
    for i in range(0, len(prompts), batch):
        enc = tok([p + "\n\n" for p in prompts[i : i + batch]], return_tensors="pt", padding=True)
        with torch.no_grad():
            out = model.generate(**enc, max_new_tokens=new_tokens, pad_token_id=tok.pad_token_id)
        new = out[:, enc["input_ids"].shape[1] :]
        for row in new.tolist():
            tokens += row.index(tok.eos_token_id) if tok.eos_token_id in row else len(row)
    return tokens / (time.perf_counter() - start)


def bench_hf(work: Path, count: int, batch: int, new_tokens: int) -> dict:
    import ray

    from compressor.commands.generate import run_generate
    from compressor.models import zoo
    from compressor.stages.generate.spec import GenerateSpec

    model_dir = str(zoo.ensure_model("tiny-test"))
    prompts = [f"The module number {i} is" for i in range(count)]
    first = plain_loop(model_dir, prompts, batch, new_tokens)
    os.environ.update(RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_AUTH_MODE="disabled")
    ray.init(address="local", num_cpus=1, include_dashboard=False, log_to_driver=False)
    try:
        spec = GenerateSpec(
            prompts="prompts", max_new_tokens=new_tokens, batch_size=batch, commit_every=count, actors=1
        )
        start = time.perf_counter()
        manifest = run_generate(
            spec, model_dir, str(write_prompts(work / "hf.jsonl", count)), str(work / "hf-out"), quiet=True
        )
        wall = time.perf_counter() - start
    finally:
        ray.shutdown()
    stage = manifest.metrics["tokens_per_s"]
    baseline = max(first, plain_loop(model_dir, prompts, batch, new_tokens))  # best of two: the machine is shared
    return {
        "prompts": count, "batch_size": batch, "max_new_tokens": new_tokens,
        "plain_loop_tokens_per_s": round(baseline, 1), "stage_tokens_per_s": round(stage, 1),
        "ratio": round(stage / baseline, 3), "goal": ">= 0.9",
        "stage_end_to_end_tokens_per_s": round(manifest.metrics["completion_tokens"] / wall, 1),
        "note": "stage_tokens_per_s is measured inside the actor (reading prompts, generating, committing); "
        "end to end adds Ray Data's actor start and the teacher's load",
    }  # fmt: skip


def start_server(latency_ms: float):
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "tests" / "openai_server.py"), "--port", "0", "--latency-ms", str(latency_ms)],
        stdout=subprocess.PIPE, text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    return proc, proc.stdout.readline().strip()


def api_spec(base_url: str, concurrency: int, commit_every: int):
    from compressor.stages.generate.spec import GenerateSpec

    return GenerateSpec(
        prompts="prompts", teacher="openai:bench", base_url=base_url, api_key_env=KEY_ENV,
        max_concurrency=concurrency, commit_every=commit_every, max_new_tokens=4,
    )  # fmt: skip


def bench_openai(work: Path, base_url: str, count: int, concurrency: int, latency_s: float) -> dict:
    from compressor.commands.generate import run_generate

    spec = api_spec(base_url, concurrency, 64)
    warm = work / "warm"  # imports and the first connections, once, outside the measured run
    warm.mkdir()
    run_generate(spec, "openai:bench", str(write_prompts(warm / "w.jsonl", 16)), str(warm / "out"), quiet=True)
    manifest = run_generate(
        spec, "openai:bench", str(write_prompts(work / "api.jsonl", count)), str(work / "api-out"), quiet=True
    )
    rate = count / manifest.seconds
    bound = concurrency / latency_s
    return {
        "prompts": count, "max_concurrency": concurrency, "latency_ms": latency_s * 1000,
        "requests_per_s": round(rate, 1), "bound_requests_per_s": round(bound, 1), "ratio": round(rate / bound, 3),
        "goal": ">= 0.8",
    }  # fmt: skip


def bench_resume(work: Path, base_url: str, count: int, concurrency: int) -> dict:
    from compressor.commands.generate import run_generate

    prompts, commit_every = write_prompts(work / "resume.jsonl", count), 16
    batches = -(-count // commit_every)
    command = [
        sys.executable, "-m", "compressor", "generate", "--teacher", "openai:bench", "--base-url", base_url,
        "--api-key-env", KEY_ENV, "--prompts", str(prompts), "--out", str(work / "resume-out"), "--max-new-tokens",
        "4", "--max-concurrency", str(concurrency), "--commit-every", str(commit_every), "--quiet",
    ]  # fmt: skip
    run = subprocess.Popen(command, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while len(list(work.glob(".answers-*/index/*.json"))) < batches // 2:
        if run.poll() is not None:
            raise RuntimeError("the run to kill finished before half of it was committed: use more prompts")
        time.sleep(0.005)
    os.killpg(run.pid, signal.SIGKILL)
    run.wait()
    committed = len(list(work.glob(".answers-*/index/*.json")))
    spec = api_spec(base_url, concurrency, commit_every)
    start = time.perf_counter()
    run_generate(spec, "openai:bench", str(prompts), str(work / "resume-out"), quiet=True)
    resumed = time.perf_counter() - start
    half = work / "half"
    half.mkdir()
    rest = write_prompts(half / "rest.jsonl", count, committed * commit_every)  # the prompts not yet committed
    start = time.perf_counter()
    run_generate(spec, "openai:bench", str(rest), str(half / "out"), quiet=True)
    alone = time.perf_counter() - start
    return {
        "prompts": count, "batches_committed_at_kill": committed, "of_batches": batches,
        "rerun_seconds": round(resumed, 3), "remaining_alone_seconds": round(alone, 3),
        "ratio": round(resumed / alone, 3), "goal": "<= 1.1",
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes: a few seconds")
    parser.add_argument("--skip-hf", action="store_true", help="leave out the hf part (it starts Ray)")
    args = parser.parse_args()
    os.environ[KEY_ENV] = "bench-key-not-secret"
    latency = 0.05
    result: dict = {"quick": args.quick}
    server, base_url = start_server(latency * 1000)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            work = Path(tmp)
            (work / "api").mkdir()
            result["openai"] = bench_openai(work / "api", base_url, 320 if args.quick else 2000, 16, latency)
            (work / "resume").mkdir()
            result["resume"] = bench_resume(work / "resume", base_url, 320 if args.quick else 1280, 16)
            if not args.skip_hf:
                (work / "hf").mkdir()
                quick = (16, 8, 16) if args.quick else (128, 8, 32)
                result["hf"] = bench_hf(work / "hf", *quick)
    finally:
        server.terminate()
        server.wait()
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
