"""The benchmarks still run: every benchmarks/*.py with --quick (tiny sizes, few steps, the test-size teacher) exits 0
and prints one JSON object with its report's keys. Their numbers are not checked: at these sizes they mean nothing.
gpu_smoke.sh needs a GPU; here it must refuse with a clear message."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BENCHMARKS = ROOT / "benchmarks"
# Top-level keys each report must have (a few that say the measurement ran, not all of them).
KEYS = {
    "data.py": {"quick", "corpus", "tokenize", "memory", "distill"},
    "distill.py": {"quick", "memory", "throughput", "gpu_mfu"},
    "generate.py": {"quick", "openai", "resume", "hf"},
    "losses.py": {"quick", "bits_per_byte", "variants"},
    "overhead.py": {"quick", "first_run_wall_s", "orchestration_overhead_s", "cached_rerun_statuses"},
    "prune.py": {"quick", "benchmark", "time_ratio", "rss_ratio", "source_shape", "target_shape"},
    "quantize.py": {"quick", "model", "stage_s", "direct_gptqmodel_s", "ratio"},
    "search.py": {"quick", "chosen_shape", "hand_picked_shape", "heldout_bits_per_byte", "equal_compute_steps"},
    "task.py": {"quick", "test_accuracy", "gap_recovered", "student_param_fraction", "seconds", "white_vs_black_box"},
    "targets.py": {"quick", "bytes", "speed", "quality"},
    "teacher.py": {"quick", "name", "params", "heldout_ppl", "ref_next", "ref_ppl"},
}
# Not run here, and why: the suite already runs the same thing elsewhere.
COVERED_ELSEWHERE = {
    "task.py": "its --quick is one run of the test-size task pipeline (3 minutes), which tests/test_task_pipeline.py "
    "runs end to end, gates included",
}
# The longest first: two run at a time (2 cores), and much of a pipeline run is Ray starting processes.
ORDER = [
    "search.py",
    "task.py",
    "overhead.py",
    "generate.py",
    "quantize.py",
    "data.py",
    "distill.py",
    "prune.py",
    "losses.py",
    "targets.py",
    "teacher.py",
]


def run_quick(script: str, workdir: Path) -> tuple[str, subprocess.CompletedProcess, float]:
    extra = ["--storage", str(workdir / "search")] if script == "search.py" else []  # it keeps its storage
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    start = time.perf_counter()
    result = subprocess.run(
        [sys.executable, str(BENCHMARKS / script), "--quick", *extra],
        cwd=workdir,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    return script, result, time.perf_counter() - start


def test_every_benchmark_runs_quick(tiny_teacher, tmp_path):
    """tiny_teacher: zoo:tiny-test is built once, before benchmarks that share it start at the same time."""
    scripts = sorted(p.name for p in BENCHMARKS.glob("*.py"))
    assert set(scripts) == set(KEYS), "a benchmark without an entry in KEYS (or an entry without a benchmark)"
    with ThreadPoolExecutor(2) as pool:
        run = [s for s in sorted(scripts, key=ORDER.index) if s not in COVERED_ELSEWHERE]
        results = list(pool.map(lambda s: run_quick(s, tmp_path), run))
    failures = []
    for script, result, seconds in results:
        print(f"{script}: {seconds:.1f} s")
        try:
            report = json.loads(result.stdout)
        except ValueError:
            report = None
        if result.returncode != 0 or not isinstance(report, dict):
            failures.append(f"{script}: exit {result.returncode}, stdout not one JSON object\n{result.stderr[-3000:]}")
        elif not KEYS[script] <= set(report) or report["quick"] is not True:
            failures.append(f"{script}: missing {sorted(KEYS[script] - set(report))} or quick != true")
    assert not failures, "\n\n".join(failures)


@pytest.mark.parametrize("nvidia_smi", ["missing", "failing"])
def test_gpu_smoke_refuses_without_a_gpu(nvidia_smi, tmp_path):
    if nvidia_smi == "missing" and any((Path(d) / "nvidia-smi").exists() for d in os.environ["PATH"].split(":")):
        pytest.skip("this machine has nvidia-smi")
    path = os.environ["PATH"]
    if nvidia_smi == "failing":  # a driver that finds no GPU
        (tmp_path / "nvidia-smi").write_text("#!/bin/sh\necho 'No devices were found' >&2\nexit 6\n")
        (tmp_path / "nvidia-smi").chmod(0o755)
        path = f"{tmp_path}:{path}"
    result = subprocess.run(
        ["bash", str(BENCHMARKS / "gpu_smoke.sh"), str(tmp_path / "work")],
        env={**os.environ, "PATH": path},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode != 0 and result.stdout == ""
    expected = "needs an NVIDIA GPU" if nvidia_smi == "missing" else "no usable NVIDIA GPU"
    assert expected in result.stderr


def test_gpu_constraints_keep_the_cpu_pins():
    """constraints/gpu.txt = cpu.txt's pins (torch's CUDA build has the same version) plus CUDA libraries."""

    def pins(name: str) -> dict[str, str]:
        lines = (ROOT / "constraints" / name).read_text().splitlines()
        return dict(line.split("==") for line in lines if line and not line.startswith("#"))

    cpu, gpu = pins("cpu.txt"), pins("gpu.txt")
    assert {k: gpu.get(k) for k in cpu} == cpu
    assert gpu["torch"] == "2.13.0" and "triton" in gpu
