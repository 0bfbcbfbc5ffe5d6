"""Orchestration overhead of `compressor run`: wall time minus the compute inside stages and evaluations,
and the wall time of a fully cached re-run (which must not start Ray). Prints JSON.

    .venv/bin/python benchmarks/overhead.py [PIPELINE] [KEY=VALUE ...] [--storage DIR]
    .venv/bin/python benchmarks/overhead.py --quick   # the tiny pipeline cut to one prune stage of the test teacher
    .venv/bin/python benchmarks/overhead.py --test-size --profile   # the test suite's tiny run, and where it goes

--profile runs the first `compressor run` under cProfile and adds `profile`: the main thread's seconds in each phase
(imports, Ray start and stop, MLflow, planning and checks, waiting on stage and evaluation tasks). The wait includes
the compute measured inside the tasks, so wait minus compute is the tasks' own start-up. cProfile slows Python code
(Ray's start most), only sees the main thread (MLflow starts in another one), and turns off the fast exit of
`compressor.cli.entry`: its figures tell where the time goes, the run without it how much there is.
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


ROOT = Path(__file__).resolve().parent.parent
# The driver-side phases of --profile: a phase is the cumulative time of the outermost call of a function whose
# "file:function" contains one of its patterns (a call inside another counted call is not counted twice).
PHASES = {
    "ray_start": ("ray_runtime.py:start", "worker.py:init"),
    "ray_stop": ("worker.py:shutdown",),
    "mlflow": ("compressor/tracking.py:",),
    "plan_and_checks": ("planning.py:build_plan", "preflight.py:"),
    "waiting_on_tasks": ("worker.py:get", "worker.py:wait", "orchestrator.py:ended"),  # Ray tasks, driver stages
    "imports": ("<frozen importlib._bootstrap>:_find_and_load",),
}


def timed_run(pipeline: str, overrides: list[str], storage: Path, summary: Path, profile: Path = None) -> float:
    start = time.perf_counter()
    python = [sys.executable, "-m", "cProfile", "-o", str(profile), "-m", "compressor"] if profile else COMPRESSOR
    subprocess.run(
        [*python, "run", pipeline, *overrides, f"storage={storage}", "--summary-json", str(summary)],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    return time.perf_counter() - start


def phases(profile: Path) -> dict[str, float]:
    """Seconds per PHASES entry, from the outermost matching calls of each (cProfile's cumulative times)."""
    import pstats

    stats = pstats.Stats(str(profile)).stats  # (file, line, function) -> (cc, nc, tt, ct, callers)
    found = {}
    for phase, patterns in PHASES.items():
        matching = {f for f in stats if any(p in f"{f[0]}:{f[2]}" for p in patterns)}
        # outermost: no caller among the matching functions themselves
        found[phase] = round(sum(stats[f][3] for f in matching if not set(stats[f][4]) & matching), 2)
    return found


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("pipeline", nargs="?", default="tiny")
    parser.add_argument("overrides", nargs="*", help="KEY=VALUE overrides passed to `compressor run`")
    parser.add_argument("--storage", type=Path, default=None)
    parser.add_argument("--test-size", action="store_true", help="the tiny pipeline as the test suite runs it")
    parser.add_argument("--profile", action="store_true", help="add the driver's time per phase (cProfile)")
    parser.add_argument("--quick", action="store_true", help="one prune stage on the test teacher (the test suite)")
    args = parser.parse_args()
    if args.quick:
        args.overrides = [*QUICK, *args.overrides]  # the caller's overrides still win
    if args.test_size:
        sys.path.insert(0, str(ROOT / "tests"))
        from conftest import TINY_PIPELINE_AT_TEST_SIZE

        args.overrides = [*TINY_PIPELINE_AT_TEST_SIZE, *args.overrides]
    storage = args.storage or Path(tempfile.mkdtemp(prefix="compressor-overhead-"))
    summary = storage / "summary.json"
    try:
        profile = storage / "run.prof" if args.profile else None
        first = timed_run(args.pipeline, args.overrides, storage, summary, profile)
        breakdown = phases(profile) if profile else None
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
                **({"test_size": True} if args.test_size else {}),
                **({"profile": breakdown} if breakdown else {}),
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
