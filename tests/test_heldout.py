"""Task metrics on a labelled held-out JSONL: the generated lm-eval task, its metrics, and the same value through
the `lm_eval` CLI as in compressor's gate."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from compressor.config.schema import GateSpec, TaskSpec
from compressor.errors import UserError
from compressor.heldout_metrics import first_label, macro_f1, normalize
from compressor.models.zoo import module_task
from compressor.models.zoo.chat import add_chat_template


def test_metrics_normalize_and_take_the_first_label():
    assert normalize("  The OS-module! ") == "the os module"
    labels = ["os", "os.path", "math"]
    assert first_label("it is math, not os", labels) == "math"
    assert first_label("Answer: os path", labels) == "os.path"  # the longer label at the same place
    assert first_label("cosine", labels) == ""  # word-bounded: no "os" inside "cosine"
    assert macro_f1([("a", "a"), ("", "b"), ("a", "b")]) == pytest.approx((2 / 3 + 0) / 2)


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory, tiny_teacher) -> Path:
    model = tmp_path_factory.mktemp("chat") / "model"
    shutil.copytree(tiny_teacher, model)
    add_chat_template(model)
    return model


@pytest.fixture(scope="module")
def heldout(tmp_path_factory) -> Path:
    return module_task.write_splits(tmp_path_factory.mktemp("task")) / "test.jsonl"


def test_lm_eval_cli_gives_the_gate_value(chat_model, heldout, tmp_path):
    from compressor import evaluation, gates
    from compressor import heldout as heldout_mod

    task = TaskSpec(name="stdlib_module", data=str(heldout), labels=list(module_task.LABELS), max_gen_toks=4)
    scores = evaluation.evaluate(chat_model, [task], batch_size=8)
    metrics = scores["stdlib_module"]
    assert {"exact_match", "accuracy", "f1", "accuracy_stderr"} <= set(metrics)
    gate = GateSpec(metrics={"stdlib_module.accuracy": {"min": 0.0}, "stdlib_module.f1": {"min": 0.0}})
    rows = gates.check_gate(gate, scores, None, None)
    print(f"held-out metrics of the untuned test teacher: {metrics}")
    gate_values = {row.metric.split(".")[1]: row.value for row in rows}

    task_dir = heldout_mod.materialize(task)
    out = tmp_path / "lm_eval_out"
    cli = Path(sys.executable).with_name("lm_eval")
    args = [str(cli), "--model", "hf", "--model_args", f"pretrained={chat_model},dtype=auto", "--device", "cpu"]
    args += ["--include_path", str(task_dir), "--tasks", "stdlib_module", "--apply_chat_template"]
    args += ["--batch_size", "8", "--output_path", str(out)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    done = subprocess.run(args, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(next(out.rglob("results_*.json")).read_text())["results"]["stdlib_module"]
    assert result["accuracy,none"] == pytest.approx(gate_values["accuracy"], abs=1e-12)
    assert result["f1,none"] == pytest.approx(gate_values["f1"], abs=1e-12)
    assert result["exact_match,none"] == pytest.approx(metrics["exact_match"], abs=1e-12)


def test_a_model_without_chat_template_answers_the_plain_prompts(tiny_teacher, heldout):
    """A base model (no chat template) is scored as `lm_eval` without --apply_chat_template would, with a warning."""
    from compressor import evaluation

    task = TaskSpec(name="stdlib_module", data=str(heldout), labels=list(module_task.LABELS), max_gen_toks=4, limit=8)
    with pytest.warns(UserWarning, match="has no chat template, so the model answers the plain prompts"):
        scores = evaluation.evaluate(tiny_teacher, [task])
    assert 0 <= scores["stdlib_module"]["accuracy"] <= 1


def test_bad_held_out_rows_are_refused_with_file_and_line(tmp_path):
    from compressor.heldout import read_rows

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "answer": "os"}\n{"prompt": "b"}\n')
    with pytest.raises(UserError, match=r"bad.jsonl:2: no `answer`"):
        read_rows(TaskSpec(name="t", data=str(bad)))
    bad.write_text('{"prompt": "a", "answer": "perl"}\n')
    with pytest.raises(UserError, match=r"bad.jsonl:1: answer 'perl' names none"):
        read_rows(TaskSpec(name="t", data=str(bad), labels=["os"]))
