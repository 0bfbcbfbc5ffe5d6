"""Data-path benchmarks of the token shards (compressor.shards); prints one JSON object.

1. tokenize_ratio: tokens/s of the shard writer (`shards.prepare`: streaming the text file paragraph by paragraph,
   batched tokenization, packing, writing uint16 shards) divided by the tokenizer's own batched throughput
   (`encode_batch_fast` on the same documents already in memory, same batch size: no reading, packing or writing).
   Goal >= 0.8. Best of `--repeats` alternating runs of each, by wall clock and by process CPU time (all threads):
   on a shared machine the load of other processes moves wall-clock numbers by 2x between runs.
2. rss_ratio: peak RSS of a fresh process preparing 100M tokens divided by one preparing 10M tokens, from the same
   file. Goal <= 1.2 (memory flat in the corpus size).
3. distill_ratio: tokens/s of the distill stage's training step fed from memory-mapped shards (`WorkerData`, its ids
   from the BatchPlan, the next step prefetched) divided by the same step fed from an in-memory token tensor (the
   former object-store blocks), same models and ids, steps alternating; medians by wall clock and CPU time.
   Goal >= 0.95.

The corpus is generated here: the `tiny-test` reference corpus (CPython's docs), its paragraphs reshuffled per copy,
written to a temp file until it holds the tokens needed. The tokenizer is that model's (byte-level BPE, vocab 1024).

    python benchmarks/data.py [--repeats 2] [--steps 16] [--skip-rss]
    python benchmarks/data.py --quick   # 1/100 of the tokens, 2 distill steps: checks that it runs
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SEQ_LEN = 2048
# --quick: the same three measurements on 1/50 to 1/100 of the tokens, one repeat, 2 steps.
QUICK = dict(repeats=1, steps=2, seq_len=64, throughput_tokens=200_000, rss_tokens=[100_000, 1_000_000])


def corpus_file(path: Path, tokens: int, tokenizer) -> Path:
    """A text file of blank-line separated paragraphs holding at least `tokens` tokens."""
    from compressor.config.schema import DataSource
    from compressor.text_sources import documents, encode_batch

    paragraphs = list(documents(DataSource(source="zoo:tiny-test")))
    per_copy = sum(len(ids) + 1 for ids in encode_batch(tokenizer, paragraphs))
    copies = tokens // per_copy + 1
    rng = random.Random(0)
    with path.open("w") as fh:
        for _ in range(copies):
            rng.shuffle(paragraphs)
            fh.write("\n\n".join(paragraphs) + "\n\n")
    return path


# ----------------------------------------------------------------------------- 1. throughput
def tokenize_throughput(text: Path, tokenizer_dir: str, tokens: int, repeats: int) -> dict:
    from compressor import shards
    from compressor.config.schema import DataSource
    from compressor.models import load_tokenizer
    from compressor.text_sources import batched, documents, encode_batch

    tokenizer = load_tokenizer(tokenizer_dir)
    source = DataSource(source=str(text))
    sequences = tokens // SEQ_LEN
    docs, have = [], 0  # the documents the writer will consume, in memory for the baseline only
    for batch in batched(documents(source), shards.DOCUMENT_BATCH):
        docs += batch
        have += sum(len(ids) + 1 for ids in encode_batch(tokenizer, batch))
        if have >= tokens:
            break
    best = {(who, clock): 0.0 for who in ("tokenizer", "writer") for clock in ("wall", "cpu")}

    def timed(who: str, fn) -> None:
        wall, cpu = time.perf_counter(), time.process_time()  # process time: every thread, the Rust ones included
        tokens = fn()
        best[who, "wall"] = max(best[who, "wall"], tokens / (time.perf_counter() - wall))
        best[who, "cpu"] = max(best[who, "cpu"], tokens / (time.process_time() - cpu))

    def writer() -> int:
        with tempfile.TemporaryDirectory() as root:
            return shards.prepare(source, tokenizer_dir, SEQ_LEN, sequences, root)[1].tokens

    for _ in range(repeats):  # alternating, so that both see the same load from other processes
        timed(
            "tokenizer",
            lambda: sum(
                len(ids) + 1 for batch in batched(docs, shards.DOCUMENT_BATCH) for ids in encode_batch(tokenizer, batch)
            ),
        )
        timed("writer", writer)
    out = {"tokens": sequences * SEQ_LEN, "documents": len(docs), "seq_len": SEQ_LEN, "best_of": repeats}
    for clock in ("wall", "cpu"):
        out[f"tokenizer_tokens_per_s_{clock}"] = round(best["tokenizer", clock])
        out[f"writer_tokens_per_s_{clock}"] = round(best["writer", clock])
        out[f"tokenize_ratio_{clock}"] = round(best["writer", clock] / best["tokenizer", clock], 3)
    out["tokenize_goal"] = ">= 0.8"
    return out


# ----------------------------------------------------------------------------- 2. memory
def prepare_probe(text: str, tokenizer_dir: str, tokens: int) -> dict:
    """Runs in a fresh process: prepare `tokens` tokens of shards and report this process's peak RSS."""
    from compressor import shards
    from compressor.config.schema import DataSource

    with tempfile.TemporaryDirectory() as root:
        start = time.perf_counter()
        _, index = shards.prepare(DataSource(source=text), tokenizer_dir, SEQ_LEN, tokens // SEQ_LEN, root)
        seconds = time.perf_counter() - start
    return {
        "tokens": index.tokens,
        "seconds": round(seconds, 1),
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }


def rss(text: Path, tokenizer_dir: str, sizes: list[int]) -> dict:
    def probe(tokens: int) -> dict:
        out = subprocess.run(
            [sys.executable, __file__, "--probe", str(text), "--tokenizer", tokenizer_dir, "--tokens", str(tokens)],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        return json.loads(out.strip().splitlines()[-1])

    small, large = (probe(tokens) for tokens in sizes)
    return {
        "prepare_small": small,
        "prepare_large": large,
        "rss_ratio": round(large["peak_rss_mib"] / small["peak_rss_mib"], 3),
        "rss_goal": "<= 1.2",
    }


# ----------------------------------------------------------------------------- 3. distill throughput
def distill_throughput(text: Path, tokenizer_dir: str, steps: int, seq: int = 256) -> dict:
    import numpy as np
    import torch
    from distill import tiny_llamas  # benchmarks/ is on sys.path when a benchmark script runs

    from compressor import shards
    from compressor.config.schema import DataSource
    from compressor.models import load_tokenizer
    from compressor.stages.distill.batches import BatchPlan, WorkerData
    from compressor.stages.distill.engines import build_engines, train_step
    from compressor.stages.distill.spec import DistillSpec

    torch.set_num_threads(1)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    vocab = len(load_tokenizer(tokenizer_dir))
    micro, accum = 4, 2
    spec = DistillSpec(data="bench", steps=steps, global_batch=micro * accum, micro_batch=micro, lr=1e-4)
    sequences = (2 * steps + 4) * micro * accum
    with tempfile.TemporaryDirectory() as tmp:
        teacher, student = tiny_llamas(Path(tmp), vocab)  # benchmarks/distill.py: the same pair
        engines = build_engines(spec, student, teacher, 1, micro, accum)
        directory, _ = shards.prepare(
            DataSource(source=str(text)), tokenizer_dir, seq, sequences, str(Path(tmp) / "data")
        )
        plan = BatchPlan(sequences, spec.global_batch, 1, micro, seed=0)
        from_shards = WorkerData(directory, sequences, plan, 0, steps=2 * steps + 2)
        blocks = torch.from_numpy(shards.ShardReader(directory).read(np.arange(sequences)).astype(np.int64))

        def in_memory(step: int) -> list:
            return [blocks[torch.from_numpy(ids)] for ids in plan.micro_batches(step, 0)]

        for step in range(2):  # warm-up
            train_step(engines, from_shards.batch(step), 1e-4)
            train_step(engines, in_memory(step), 1e-4)
        times = {(name, clock): [] for name in ("shards", "memory") for clock in ("wall", "cpu")}
        for i in range(steps):  # alternating, so both see the same load from other processes
            for name, batch in (("shards", from_shards.batch), ("memory", in_memory)):
                wall, cpu = time.perf_counter(), time.process_time()
                train_step(engines, batch(2 + i), 1e-4)
                times[name, "wall"].append(time.perf_counter() - wall)
                times[name, "cpu"].append(time.process_time() - cpu)
        from_shards.close()
    tokens_per_step = micro * accum * seq
    out = {
        "model": "Llama 8 layers x 256, vocab of the tokenizer; 1 worker, 1 thread",
        "batch": f"{accum} x {micro} x {seq} tokens per step",
        "steps_timed": steps,
    }
    for clock in ("wall", "cpu"):
        shard_tps = tokens_per_step / statistics.median(times["shards", clock])
        memory_tps = tokens_per_step / statistics.median(times["memory", clock])
        out[f"shards_tokens_per_s_{clock}"] = round(shard_tps, 1)
        out[f"memory_tokens_per_s_{clock}"] = round(memory_tps, 1)
        out[f"distill_ratio_{clock}"] = round(shard_tps / memory_tps, 3)
    out["distill_goal"] = ">= 0.95"
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--steps", type=int, default=16, help="Timed distill steps of each feed.")
    parser.add_argument("--seq-len", type=int, default=256, help="Tokens per sequence of the distill steps.")
    parser.add_argument("--throughput-tokens", type=int, default=10_000_000)
    parser.add_argument("--skip-rss", action="store_true", help="Skip the 10M / 100M-token preparations.")
    parser.add_argument(
        "--rss-tokens", type=int, nargs=2, default=[10_000_000, 100_000_000], metavar=("SMALL", "LARGE")
    )
    parser.add_argument("--quick", action="store_true", help="Tiny sizes, 1 repeat, 2 steps (the test suite).")
    parser.add_argument("--probe", help=argparse.SUPPRESS)
    parser.add_argument("--tokenizer", help=argparse.SUPPRESS)
    parser.add_argument("--tokens", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.quick:  # as defaults, so that flags given explicitly still win
        parser.set_defaults(**QUICK)
        args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.probe:
        print(json.dumps(prepare_probe(args.probe, args.tokenizer, args.tokens)))
        return
    from compressor.models import load_tokenizer, zoo

    tokenizer_dir = str(zoo.ensure_model("tiny-test"))
    with tempfile.TemporaryDirectory() as tmp:
        need = max(args.throughput_tokens, 0 if args.skip_rss else max(args.rss_tokens))
        text = corpus_file(Path(tmp) / "corpus.txt", int(need * 1.02), load_tokenizer(tokenizer_dir))
        report = {
            "corpus": f"{text.stat().st_size / 1e6:.0f} MB of text (tiny-test corpus, reshuffled copies)",
            "cpus": os.cpu_count(),
            "quick": args.quick,
            "tokenize": tokenize_throughput(text, tokenizer_dir, args.throughput_tokens, args.repeats),
        }
        if not args.skip_rss:
            report["memory"] = rss(text, tokenizer_dir, args.rss_tokens)
        report["distill"] = distill_throughput(text, tokenizer_dir, args.steps, args.seq_len)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
