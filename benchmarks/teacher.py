"""The reference teacher: size, build time, held-out perplexity against a unigram baseline, and its
multiple-choice accuracy against chance. Prints JSON.

With --fresh the model is built from scratch into a temporary COMPRESSOR_HOME (so the build time is
measured, not read from the cache); otherwise the cached build's recorded numbers are used. Held-out
perplexity is per token over the held-out paragraphs packed into seq_len blocks; the unigram baseline is
the same tokens under add-one smoothed train token frequencies. MC accuracy is lm-eval `ref_next` over all
items (4 choices, chance 0.25). Times depend on how busy the 2 shared cores are.

    .venv/bin/python benchmarks/teacher.py [--name tiny] [--fresh] [--batch-size 32] [--limit N]
    .venv/bin/python benchmarks/teacher.py --quick   # the test-size teacher (tiny-test), 50 items per task
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--name", default="tiny")
    parser.add_argument("--fresh", action="store_true", help="build in a temporary COMPRESSOR_HOME and time it")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--limit", type=int, default=None, help="items per task (default: all)")
    parser.add_argument("--quick", action="store_true", help="tiny-test teacher, 50 items per task (the test suite)")
    args = parser.parse_args()
    if args.quick:  # as defaults, so that flags given explicitly still win
        parser.set_defaults(name="tiny-test", limit=50)
        args = parser.parse_args()

    with tempfile.TemporaryDirectory() as home:
        if args.fresh:
            os.environ["COMPRESSOR_HOME"] = home
        from compressor.config.schema import TaskSpec
        from compressor.evaluation import evaluate
        from compressor.models import zoo

        start = time.perf_counter()
        path = zoo.ensure_model(args.name)
        wall = time.perf_counter() - start
        info = zoo.build_info(args.name)
        tasks = [TaskSpec(name=t, include=f"zoo:{args.name}", limit=args.limit) for t in zoo.TASK_NAMES]
        start = time.perf_counter()
        scores = evaluate(path, tasks, batch_size=args.batch_size)
        eval_seconds = time.perf_counter() - start
        r = zoo.RECIPES[args.name]
        print(
            json.dumps(
                {
                    "name": args.name,
                    "quick": args.quick,
                    "params": info["params"],
                    "shape": {
                        "hidden": r.hidden_size,
                        "layers": r.num_layers,
                        "heads": r.num_heads,
                        "kv_heads": r.num_kv_heads,
                        "mlp": r.intermediate_size,
                        "vocab": r.vocab_size,
                        "seq_len": r.seq_len,
                    },
                    "train_tokens_seen": info["train_tokens_seen"],
                    "build_seconds": info["build_seconds"],
                    "build_cpu_seconds": info.get("build_cpu_seconds"),
                    "build_wall_seconds_this_run": round(wall, 1) if args.fresh else None,
                    "threads": info["threads"],
                    "heldout_ppl": round(info["heldout_ppl"], 2),
                    "unigram_ppl": round(info["unigram_ppl"], 2),
                    "ref_next": {**{k: round(v, 4) for k, v in scores["ref_next"].items()}, "chance": 0.25},
                    "ref_ppl": {k: round(v, 4) for k, v in scores["ref_ppl"].items()},
                    "eval_items_per_task": args.limit or "all",
                    "eval_seconds": round(eval_seconds, 1),
                    "load_average_1m": round(os.getloadavg()[0], 2),
                },
                indent=2,
            )
        )


if __name__ == "__main__":
    main()
