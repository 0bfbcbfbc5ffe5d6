"""pipelines/task.yaml end to end at test size: the zoo task teacher answers the transfer prompts, a pruned student
is distilled on the answers (white-box, loss on the answers only) and quantized, gated on held-out accuracy."""

from __future__ import annotations

import json

import pytest

from tests.pipeline_runs import compressor

TASK_AT_TEST_SIZE = [
    "teacher.model=zoo:tiny-test-modules",
    "student.model=zoo:tiny-test",
    "data.calib.source=zoo:tiny-test",
    "data.calib.samples=16",
    "data.calib.seq_len=128",
    "stages.prune.target.intermediate_size=192",
    "stages.prune.target.num_attention_heads=2",
    "stages.distill.steps=40",
    "stages.distill.checkpoint_every=40",
    "stages.quantize.group_size=64",
]


def test_task_pipeline_runs_end_to_end_gated_on_held_out_accuracy(tmp_path):
    summary_path = tmp_path / "summary.json"
    result = compressor(
        "run", "task", f"storage={tmp_path / 'artifacts'}", *TASK_AT_TEST_SIZE, "--summary-json", str(summary_path)
    )
    assert result.returncode == 0, result.stderr[-6000:]
    summary = json.loads(summary_path.read_text())
    stages = {s["kind"]: s for s in summary["stages"]}
    assert [s["kind"] for s in summary["stages"]] == ["generate", "prune", "distill", "quantize"]
    teacher = summary["baseline"]["stdlib_module"]["accuracy"]
    distilled = stages["distill"]["scores"]["stdlib_module"]["accuracy"]
    assert teacher > 0.3  # chance is 1/8: the fine-tuned teacher knows the task
    assert distilled >= 0.6 * teacher  # the gate's bar, here read from the summary
    output = result.stdout + result.stderr  # the gate tables and the summary
    assert "gate: distill" in output and "gate: quantize" in output and "FAIL" not in output
    # the distillation table: the teacher, the same student on the train split's labels alone, the distilled one
    (row,) = [r for r in summary["distillation"]["distill"] if r["metric"] == "stdlib_module.accuracy"]
    assert row["teacher"] == teacher and row["distilled"] == distilled
    control = row["hard_labels"]
    assert 0 <= control <= 1 and row["gap_recovered"] == (
        None if teacher == control else pytest.approx((distilled - control) / (teacher - control))
    )
    assert "distillation: distill" in output and "gap recovered" in output
    manifest = json.loads(next((tmp_path / "artifacts" / "task").glob("distill-*/manifest.json")).read_text())
    reference = manifest["details"]["references"]["hard_labels"]
    assert reference["steps"] == 40 and reference["scores"]["stdlib_module"]["accuracy"] == control
    assert (tmp_path / "artifacts" / "task" / manifest["details"]["references"]["hard_labels"]["model_uri"]).parent
    chat = manifest["details"]["chat"]
    assert (
        chat["examples"] > 100
        and chat["answer_tokens"] > 0
        and chat["dropped"] + chat["kept"] + chat["truncated"] == chat["examples"]
    )
