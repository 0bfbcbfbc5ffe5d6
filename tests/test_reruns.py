"""Re-runs never throw training away: a model that missed its gate is kept under rejected/ and judged again after
the bar changes, with no distill step. (A killed or stopped distillation resuming, with operational fields changed:
tests/test_crash.py.)"""

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

PIPELINE = """\
name: rerun
teacher: {{model: "zoo:tiny-test"}}
storage: {storage}
data:
  distill: {{source: "zoo:tiny-test", seq_len: 64}}
evaluation:
  tasks: [{{name: ref_next, include: "zoo:tiny-test", limit: 40}}]
  baseline: none
stages:
  - distill: {{data: distill, steps: {steps}, global_batch: 4, micro_batch: 4, lr: 1.0e-3, checkpoint_every: 2,
               cpus_per_worker: 2}}
    gate: {gate}
"""


def write(
    tmp_path: Path, name: str, steps: int = 4, gate: str = "{ref_next.acc: {min: 1.01}}", tasks: bool = True
) -> Path:
    text = PIPELINE.format(storage=tmp_path / "store", steps=steps, gate=gate)
    if not tasks:
        text = text.replace('  tasks: [{name: ref_next, include: "zoo:tiny-test", limit: 40}]\n', "  tasks: []\n")
        text = text.replace(f"    gate: {gate}\n", "")
    path = tmp_path / name
    path.write_text(text)
    return path


def compressor(*args, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "compressor", *map(str, args)], capture_output=True, text=True, timeout=900, **kwargs
    )


def distill_runs(tmp_path: Path):
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}")
    runs = client.search_runs(
        [client.get_experiment_by_name("rerun").experiment_id],
        "attributes.run_name = 'distill'",
        order_by=["attributes.start_time ASC"],
    )
    return client, runs


@pytest.mark.slow
def test_a_missed_gate_keeps_the_model_and_a_relaxed_rerun_takes_it_without_training(tmp_path):
    strict = compressor("run", write(tmp_path, "strict.yaml"))
    assert strict.returncode == 1, strict.stderr[-3000:]
    errors = [line for line in strict.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "missed its gate" in errors[0] and "rejected" in errors[0], strict.stderr[-3000:]
    assert "FAIL" in strict.stdout + strict.stderr  # the gate table
    pipeline_dir = tmp_path / "store" / "rerun"
    assert not list(pipeline_dir.glob("distill-*")) and not list(pipeline_dir.glob(".tmp-*")), "nothing published"
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}")
    found = client.search_runs([client.get_experiment_by_name("rerun").experiment_id])
    (parent,) = [r for r in found if "mlflow.parentRunId" not in r.data.tags]  # named "rerun MM-DD HH:MM:SS"
    by_name = {r.info.run_name: r for r in found if r is not parent}
    assert parent.info.run_name.startswith("rerun ") and parent.data.tags["compressor.pipeline"] == "rerun"
    assert parent.info.status == "FAILED" and parent.data.tags["gate"] == "failed"
    assert by_name["distill"].info.status == "FAILED" and by_name["distill"].data.tags["gate"] == "failed"
    assert by_name["distill"].data.tags["mlflow.parentRunId"] == parent.info.run_id
    rejected = next((tmp_path / "store" / "rerun" / "rejected").glob("distill-*"))
    kept = json.loads((rejected / "manifest.json").read_text())
    assert "missed its gate" in kept["details"]["rejected"]["reason"]
    assert (rejected / "model" / "model.safetensors").is_file()
    checkpoints = list((tmp_path / "store" / "ray").glob("*/checkpoint_*"))
    assert checkpoints, "the Ray Train checkpoints stay until the model is published"

    relaxed = compressor(
        "run",
        write(tmp_path, "relaxed.yaml", gate="{ref_next.acc: {min: 0.0}}"),
        "--summary-json",
        tmp_path / "summary.json",
    )
    assert relaxed.returncode == 0, relaxed.stderr[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert [s["status"] for s in summary["stages"]] == ["re-gated"]
    final = tmp_path / "store" / "rerun" / rejected.name
    assert (final / "model" / "model.safetensors").is_file() and not rejected.exists()
    assert json.loads((final / "manifest.json").read_text())["details"]["gate"]["status"] == "re-gated"
    assert not list((tmp_path / "store" / "ray").glob("*/checkpoint_*")), "published: the checkpoints go"
    client, (first, second) = distill_runs(tmp_path)
    assert client.get_metric_history(first.info.run_id, "loss"), "the first run trained"
    assert not client.get_metric_history(second.info.run_id, "loss"), "the re-run took no distill step"
    assert second.data.tags["gate"] == "passed"


def wait_for(predicate, seconds: float, what: str):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")
