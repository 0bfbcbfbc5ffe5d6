"""Cost of the prune stage against a plain forward pass, and its peak memory against the model's size. Prints JSON.

    .venv/bin/python benchmarks/prune.py [--model DIR | --hidden 512 --layers 8 ...] [--samples 16 --seq-len 256]
    .venv/bin/python benchmarks/prune.py --quick   # a 2-layer model, 4 samples, 1 repeat: checks that it runs

Without --model, a random Llama (GQA) of the given shape is saved to a temp dir first. The measurement runs in a
fresh subprocess, after a warm-up on a miniature model (transformers imports ~140 MB of modules on its first
save), so the peak RSS belongs to the stage: load, importance pass, surgery, save. Then both passes are timed on
a fresh copy, alternating, fastest of --repeats each. Goals (issue #3):
  time_ratio = (importance + surgery) / (plain forward over the same calibration set)   <= 1.3
  rss_ratio  = (peak RSS - RSS before loading the model) / model bytes; the raw peak / model bytes is printed too
The target is Minitron's 4B-Width recipe scaled to the model: hidden x0.75, MLP x0.64, all layers and heads.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")  # transformers imports deepspeed, which otherwise prints to stdout
QUICK = dict(
    hidden=128,
    layers=2,
    heads=4,
    kv_heads=2,
    intermediate=256,
    vocab=512,
    samples=4,
    seq_len=32,
    batch_size=4,
    repeats=1,
)


def build_random_llama(
    out: Path, hidden: int, layers: int, heads: int, kv_heads: int, intermediate: int, vocab: int
) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        intermediate_size=intermediate,
        vocab_size=vocab,
        max_position_embeddings=4096,
    )
    LlamaForCausalLM(config).save_pretrained(out)


def rss_bytes() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def timed(fn):
    """(result, wall seconds, CPU seconds of this process): CPU time is steadier on a shared machine."""
    wall, cpu = time.perf_counter(), time.process_time()
    result = fn()
    return result, time.perf_counter() - wall, time.process_time() - cpu


def warm_up(model_dir: str, out_dir: str) -> None:
    """Run every step once on a miniature of the same architecture: transformers imports ~140 MB of code lazily on
    the first load / save_pretrained, which is a one-time cost of the process, not memory the stage uses."""
    import json

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from compressor.models import load_model
    from compressor.stages.prune.importance import estimate

    config = json.loads((Path(model_dir) / "config.json").read_text())
    mini = dict(
        hidden_size=64,
        intermediate_size=64,
        num_attention_heads=2,
        num_key_value_heads=2,
        head_dim=32,
        num_hidden_layers=1,
        vocab_size=128,
    )
    kwargs = {
        k: v for k, v in {**config, **mini}.items() if k not in ("model_type", "layer_types", "transformers_version")
    }
    AutoModelForCausalLM.from_config(AutoConfig.for_model(config["model_type"], **kwargs)).save_pretrained(out_dir)
    model = load_model(out_dir)
    estimate(model, torch.ones(2, 8, dtype=torch.long), head_dim=32)
    model.save_pretrained(out_dir)


def measure(
    model_dir: str, samples: int, seq_len: int, batch_size: int, threads: int, align: int, repeats: int
) -> dict:
    import gc

    import torch

    from compressor.manifest import ModelRef
    from compressor.models import load_model, read_config
    from compressor.stages.prune import shapes
    from compressor.stages.prune.importance import estimate
    from compressor.stages.prune.plan import make_plan
    from compressor.stages.prune.spec import PruneSpec
    from compressor.stages.prune.surgery import apply_plan

    torch.set_num_threads(threads)
    config = read_config(ModelRef(path=model_dir, key="benchmark"))
    src = shapes.source_shape(config)
    target = {
        "hidden_size": max(align, round(src.hidden_size * 0.75 / align) * align),
        "intermediate_size": max(align, round(src.intermediate_size * 0.64 / align) * align),
    }
    out = shapes.target_shape(PruneSpec(target=target, align=align), config)
    blocks = torch.randint(0, config["vocab_size"], (samples, seq_len), generator=torch.Generator().manual_seed(0))

    # Phase 1, memory: exactly what the stage does (load, importance, surgery, save), before anything else ran.
    with tempfile.TemporaryDirectory() as tmp:
        warm_up(model_dir, tmp)
    gc.collect()
    rss = {"before_load": rss_bytes()}
    model = load_model(model_dir, dtype="auto")
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    rss["after_load"] = rss_bytes()
    importance = estimate(model, blocks, src.head_dim, batch_size)
    rss["after_importance"] = rss_bytes()
    _, surgery_s, _ = timed(lambda: apply_plan(model, make_plan(importance, src, out, list(range(src.num_layers)))))
    rss["after_surgery"] = rss_bytes()
    with tempfile.TemporaryDirectory() as tmp:
        _, save_s, _ = timed(lambda: model.save_pretrained(tmp))
    rss["after_save"] = rss_bytes()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB

    # Phase 2, time: a fresh model; the machine is shared, so alternate the passes and keep each one's fastest run.
    del model, importance
    gc.collect()
    model = load_model(model_dir, dtype="auto")

    @torch.no_grad()
    def plain_forward() -> None:
        for batch in blocks.split(batch_size):
            model(input_ids=batch, use_cache=False)

    plain_forward()  # warm-up
    forward, importance = [], []  # (wall, cpu) per run
    for _ in range(repeats):
        forward.append(timed(plain_forward)[1:])
        importance.append(timed(lambda: estimate(model, blocks, src.head_dim, batch_size))[1:])
    forward_s, forward_cpu = (min(run[i] for run in forward) for i in (0, 1))
    importance_s, importance_cpu = (min(run[i] for run in importance) for i in (0, 1))
    return {
        "time_ratio": round((importance_s + surgery_s) / forward_s, 3),
        "time_ratio_cpu": round((importance_cpu + surgery_s) / forward_cpu, 3),
        "rss_ratio": round((peak - rss["before_load"]) / model_bytes, 3),
        "peak_rss_over_model_bytes": round(peak / model_bytes, 3),  # includes Python, torch and transformers
        "forward_seconds": round(forward_s, 3),
        "importance_seconds": round(importance_s, 3),
        "surgery_seconds": round(surgery_s, 3),
        "save_seconds": round(save_s, 3),
        "model_bytes": model_bytes,
        "peak_rss_bytes": peak,
        "rss_bytes": rss,
        "source_shape": src.as_dict(),
        "target_shape": out.as_dict(),
        "calibration": {"samples": samples, "seq_len": seq_len, "batch_size": batch_size, "repeats": repeats},
        "threads": threads,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", help="HF checkpoint dir (Llama/Mistral/Qwen2); default: a random Llama")
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--intermediate", type=int, default=1536)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1, help="1 keeps timings steady on a shared machine")
    parser.add_argument("--align", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5, help="timed runs of each pass; the fastest counts")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, one repeat (the test suite runs this)")
    parser.add_argument("--measure", action="store_true", help=argparse.SUPPRESS)  # the child process
    args = parser.parse_args()
    if args.quick:  # as defaults, so that flags given explicitly still win
        parser.set_defaults(**QUICK)
        args = parser.parse_args()
    if args.measure:
        print(
            json.dumps(
                measure(args.model, args.samples, args.seq_len, args.batch_size, args.threads, args.align, args.repeats)
            )
        )
        return
    with tempfile.TemporaryDirectory(prefix="prune-bench-") as tmp:
        model = args.model
        if model is None:
            model = str(Path(tmp) / "model")
            build_random_llama(
                Path(model), args.hidden, args.layers, args.heads, args.kv_heads, args.intermediate, args.vocab
            )
        child = [
            sys.executable,
            __file__,
            "--measure",
            "--model",
            model,
            "--samples",
            str(args.samples),
            "--seq-len",
            str(args.seq_len),
            "--batch-size",
            str(args.batch_size),
            "--threads",
            str(args.threads),
            "--align",
            str(args.align),
            "--repeats",
            str(args.repeats),
        ]
        result = json.loads(
            subprocess.run(child, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
        )
    print(json.dumps({"benchmark": "prune", "quick": args.quick, **result}, indent=2))


if __name__ == "__main__":
    main()
