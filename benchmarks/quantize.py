"""The quantize stage against a direct GPTQModel call on the same model and calibration. Prints JSON.

Each run is a fresh process that imports torch and transformers before its clock starts; both clocks then
include importing GPTQModel, loading, quantizing and saving. The stage's clock also covers what it adds:
tokenizing the calibration text, the alignment check, the tokenizer copy, byte accounting and the manifest.
The direct call gets the calibration already tokenized. Runs alternate (direct, stage, ...) after one
untimed warm-up, and the medians are compared. Goal: stage / direct <= 1.1. CPU seconds (all threads) are
reported too: they vary less than wall time on a shared machine. Peak RSS is each process's ru_maxrss.
CPU only (no GPU here).

    .venv/bin/python benchmarks/quantize.py [--model zoo:tiny | DIR] [--samples 128] [--seq-len 256] [--repeats 3]
    .venv/bin/python benchmarks/quantize.py --quick   # test teacher (zoo:tiny-test), 8 x 64 tokens, 1 run, no warm-up
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path


def worker(args) -> None:
    import resource
    import time

    import torch
    import transformers  # noqa: F401  (imported before the clock in both modes)

    torch.set_num_threads(args.threads)
    from compressor.config.schema import DataSource
    from compressor.stages.quantize.spec import GPTQSpec

    spec = GPTQSpec(
        bits=args.bits, group_size=args.group_size, calibration="calib", samples=args.samples, seq_len=args.seq_len
    )
    start, cpu_start = time.perf_counter(), time.process_time()
    if args.worker == "stage":
        from compressor.runner import run_standalone

        data = {"calib": DataSource(source=args.calibration, samples=args.samples, seq_len=args.seq_len)}
        run_standalone("quantize", spec, args.model, args.out, data=data, quiet=True)
    else:
        from gptqmodel import GPTQModel, QuantizeConfig

        rows = json.loads(Path(args.rows).read_text())
        config = QuantizeConfig(
            bits=spec.bits,
            group_size=spec.group_size,
            desc_act=spec.desc_act,
            sym=spec.sym,
            damp_percent=spec.damp_percent,
        )
        model = GPTQModel.load(args.model, config)
        model.quantize(rows, batch_size=spec.batch_size)
        model.save(args.out)
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    Path(args.result).write_text(json.dumps({"seconds": seconds, "cpu_seconds": cpu, "peak_rss_mb": peak_mb}))


def calibration_rows(model: str, source: str, samples: int, seq_len: int) -> list[dict]:
    """Exactly the rows the stage builds (same source, seed 0, same blocking)."""
    from compressor.config.schema import DataSource
    from compressor.models import load_tokenizer
    from compressor.text_sources import token_blocks

    blocks = token_blocks(
        DataSource(source=source, samples=samples, seq_len=seq_len), load_tokenizer(model), samples, seq_len, 0
    )
    return [{"input_ids": row, "attention_mask": [1] * len(row)} for row in blocks.tolist()]


def run(mode: str, args, workdir: Path, rows: Path, index: int) -> dict:
    out, result = workdir / f"{mode}-{index}", workdir / f"{mode}-{index}.json"
    cmd = [
        sys.executable,
        __file__,
        "--worker",
        mode,
        "--model",
        args.model,
        "--calibration",
        args.calibration,
        "--samples",
        str(args.samples),
        "--seq-len",
        str(args.seq_len),
        "--bits",
        str(args.bits),
        "--group-size",
        str(args.group_size),
        "--threads",
        str(args.threads),
        "--rows",
        str(rows),
        "--out",
        str(out),
        "--result",
        str(result),
    ]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return json.loads(result.read_text())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="zoo:tiny", help="Checkpoint directory or zoo:NAME.")
    parser.add_argument("--calibration", default=None, help="Data source (default: the zoo model's corpus).")
    parser.add_argument("--samples", type=int, default=128)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="test teacher, tiny calibration, 1 run, no warm-up")
    parser.add_argument("--worker", choices=["stage", "direct"], help=argparse.SUPPRESS)
    for hidden in ("--rows", "--out", "--result"):
        parser.add_argument(hidden, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.quick:  # as defaults, so that flags given explicitly still win
        parser.set_defaults(model="zoo:tiny-test", samples=8, seq_len=64, repeats=1)
        args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault(
        "GPTQMODEL_CPU_WORKERS", "2"
    )  # the direct call needs it on 2 cores (the stage sets it itself)
    if args.worker:
        return worker(args)

    if args.model.startswith("zoo:"):
        from compressor.models import zoo

        name = args.model[len("zoo:") :]
        args.calibration = args.calibration or args.model
        args.model = str(zoo.ensure_model(name))
    if args.calibration is None:
        parser.error("--calibration is required for a model outside the zoo")
    with tempfile.TemporaryDirectory(prefix="bench-quantize-") as tmp:
        workdir = Path(tmp)
        rows = workdir / "rows.json"
        rows.write_text(json.dumps(calibration_rows(args.model, args.calibration, args.samples, args.seq_len)))
        if not args.quick:
            run("direct", args, workdir, rows, -1)  # warm-up: file cache, GPTQModel's one-time kernel builds
        runs: dict[str, list[dict]] = {"direct": [], "stage": []}
        for i in range(args.repeats):
            for mode in ("direct", "stage"):
                runs[mode].append(run(mode, args, workdir, rows, i))
    stage, direct = (statistics.median(r["seconds"] for r in runs[m]) for m in ("stage", "direct"))
    stage_cpu, direct_cpu = (statistics.median(r["cpu_seconds"] for r in runs[m]) for m in ("stage", "direct"))
    print(
        json.dumps(
            {
                "model": args.model,
                "quick": args.quick,
                "bits": args.bits,
                "group_size": args.group_size,
                "calibration": {"samples": args.samples, "seq_len": args.seq_len},
                "device": "cpu",
                "threads": args.threads,
                "stage_s": round(stage, 2),
                "direct_gptqmodel_s": round(direct, 2),
                "ratio": round(stage / direct, 3),
                "goal_ratio": 1.1,
                # CPU seconds of all threads: steadier than wall time when other work shares the cores.
                "stage_cpu_s": round(stage_cpu, 2),
                "direct_cpu_s": round(direct_cpu, 2),
                "cpu_ratio": round(stage_cpu / direct_cpu, 3),
                "stage_peak_rss_mb": round(max(r["peak_rss_mb"] for r in runs["stage"])),
                "direct_peak_rss_mb": round(max(r["peak_rss_mb"] for r in runs["direct"])),
                "runs_s": {mode: [round(r["seconds"], 2) for r in rs] for mode, rs in runs.items()},
                "gpu": "not measured (no GPU on this machine)",
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
