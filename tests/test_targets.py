"""Teacher targets from the command line: `plan` prices them, `data prepare` computes them ahead of a run, a killed
computation resumes without computing a listed part again, and object storage works (moto's S3 server)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np

from compressor import targets as tg
from tests.pipeline_runs import compressor

TARGETS = "stages.distill.loss.targets={kind: sampled, k: 8}"


def parts(trace) -> list[int]:
    return [json.loads(line)["first"] for line in trace.read_text().splitlines()] if trace.exists() else []


def test_data_prepare_computes_targets_once_resuming_after_a_kill_and_plan_prices_them(
    tiny_teacher, tiny_test_overrides, tmp_path
):
    args = ["tiny", *tiny_test_overrides, TARGETS, f"storage={tmp_path / 'store'}"]
    trace = tmp_path / "parts.jsonl"
    env = {"COMPRESSOR_TARGETS_PART_SEQUENCES": "16", "COMPRESSOR_TARGETS_TRACE": str(trace)}
    before = compressor("plan", *args, env=env)
    assert before.returncode == 0, before.stderr
    assert "distill targets: sampled k=8, 40 B/token" in before.stdout and "runs once: to compute" in before.stdout

    killed = subprocess.Popen(
        [sys.executable, "-m", "compressor", "data", "prepare", *args],
        env={**os.environ, "HF_HUB_OFFLINE": "1", **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    deadline = time.monotonic() + 300
    while len(parts(trace)) < 2 and killed.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    os.killpg(killed.pid, signal.SIGKILL)  # the driver and its Ray workers, mid-computation
    killed.wait()
    listed = parts(trace)
    assert 2 <= len(listed) < 20, listed  # 320 sequences in parts of 16

    done = compressor("data", "prepare", *args, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    after = parts(trace)
    assert sorted(after) == list(range(0, 320, 16))  # every part listed exactly once
    assert after[: len(listed)] == listed  # the re-run computed only what the killed run had not listed
    assert "teacher targets for 320 sequences" in done.stdout
    cached = compressor("plan", *args, env=env)
    assert "runs once: cached: no teacher pass" in cached.stdout, cached.stdout


def test_targets_on_s3_are_written_by_the_actors_and_range_read_by_id(s3, tiny_teacher, tmp_path, monkeypatch):
    import ray

    from compressor import shards
    from compressor.config.schema import DataSource
    from compressor.contract.context import StageContext
    from compressor.manifest import ModelRef
    from compressor.ray_runtime import ensure_ray
    from compressor.stages.distill.spec import DistillSpec
    from compressor.stages.distill.targets_compute import prepare_targets

    monkeypatch.setattr(tg, "PART_SEQUENCES", 8)
    monkeypatch.setenv("COMPRESSOR_CACHE", str(tmp_path / "cache"))
    root = "s3://bucket/store/_data"
    shard_dir, index = shards.prepare(DataSource(source="zoo:tiny-test", seq_len=64), str(tiny_teacher), 64, 20, root)
    if ray.is_initialized():
        ray.shutdown()  # a Ray started before this test's S3 variables would not pass them to its actors
    ensure_ray(None)
    try:
        spec = DistillSpec(data="d", steps=1, loss={"targets": {"kind": "topk", "k": 4}})
        teacher = ModelRef(path=str(tiny_teacher), key="tiny-test")
        directory = prepare_targets(spec, teacher, shard_dir, 20, StageContext(quiet=True))
    finally:
        ray.shutdown()
    assert directory.startswith(root) and s3.exists(directory.removeprefix("s3://") + "/" + tg.INDEX)
    s3.served.clear()
    got = tg.TargetsReader(directory, 20).read([17, 3])
    assert got["ids"].shape == (2, 64, 4) and np.all(got["tail"] >= 0)
    fetched = sum(n for key, n in s3.served.items() if ".ids" in key or ".val" in key or ".tail" in key)
    assert fetched == 2 * 64 * (4 * 2 + 4 * 2 + 2)  # just the two sequences' rows, not their parts
