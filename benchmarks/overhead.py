"""Orchestration overhead of `compressor run`: wall time minus the compute inside stages and evaluations,
and the wall time of a fully cached re-run (which must not start Ray). Prints JSON.

    .venv/bin/python benchmarks/overhead.py [PIPELINE] [KEY=VALUE ...] [--storage DIR]
    .venv/bin/python benchmarks/overhead.py --quick   # the tiny pipeline cut to one prune stage of the test teacher
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

COMPRESSOR = [sys.executable, "-m", "compressor"]
# --quick: the test-size teacher (zoo:tiny-test, ~1 min to build once), its prune stage alone, one short evaluation
# task and no teacher baseline: the same orchestration (Ray, cache, tracking) around a few seconds of compute.
QUICK = [
    "teacher.model=zoo:tiny-test",
    "data.calib={source: 'zoo:tiny-test', samples: 8, seq_len: 64}",
    "data.distill={source: 'zoo:tiny-test', seq_len: 64}",
    "evaluation={tasks: [{name: ref_ppl, include: 'zoo:tiny-test', limit: 20}], baseline: none}",
    "stages=[{prune: {target: {intermediate_size: 192}, calibration: calib}, resources: {num_cpus: 1}}]",
]


def timed_run(pipeline: str, overrides: list[str], storage: Path, summary: Path) -> float:
    start = time.perf_counter()
    subprocess.run(
        [*COMPRESSOR, "run", pipeline, *overrides, f"storage={storage}", "--summary-json", str(summary)],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("pipeline", nargs="?", default="tiny")
    parser.add_argument("overrides", nargs="*", help="KEY=VALUE overrides passed to `compressor run`")
    parser.add_argument("--storage", type=Path, default=None)
    parser.add_argument("--quick", action="store_true", help="one prune stage on the test teacher (the test suite)")
    args = parser.parse_args()
    if args.quick:
        args.overrides = [*QUICK, *args.overrides]  # the caller's overrides still win
    storage = args.storage or Path(tempfile.mkdtemp(prefix="compressor-overhead-"))
    summary = storage / "summary.json"
    try:
        first = timed_run(args.pipeline, args.overrides, storage, summary)
        compute = json.loads(summary.read_text())["stage_seconds"]
        second = timed_run(args.pipeline, args.overrides, storage, summary)
        statuses = [s["status"] for s in json.loads(summary.read_text())["stages"]]
    finally:
        if args.storage is None:
            shutil.rmtree(storage, ignore_errors=True)
    print(
        json.dumps(
            {
                "pipeline": args.pipeline,
                "quick": args.quick,
                "first_run_wall_s": round(first, 2),
                "stage_compute_s": round(compute, 2),
                "orchestration_overhead_s": round(first - compute, 2),
                "overhead_fraction": round((first - compute) / first, 3),
                "cached_rerun_wall_s": round(second, 2),
                "cached_rerun_statuses": statuses,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
