"""lm-eval on checkpoints from disk: the reference tasks separate a real model from a destroyed one."""

import json
import math
import os
import shutil

import pytest

from compressor.config.schema import TaskSpec
from compressor.errors import UserError
from compressor.evaluation import (
    eval_cache_key,
    evaluate,
    higher_is_better,
    load_cached,
    numeric_scores,
    primary_metric,
    save_cached,
)

MC_DOCS, PPL_DOCS = 100, 40
TASKS = [
    TaskSpec(name="ref_next", include="zoo:tiny-test", limit=MC_DOCS),
    TaskSpec(name="ref_ppl", include="zoo:tiny-test", limit=PPL_DOCS),
]


@pytest.fixture(scope="module")
def teacher_scores(tiny_teacher):
    return evaluate(tiny_teacher, TASKS, batch_size=32)


@pytest.fixture(scope="module")
def destroyed_scores(tiny_teacher, tmp_path_factory):
    """The teacher with every weight matrix's entries permuted: same checkpoint format and weight
    statistics, no knowledge left."""
    import torch

    from compressor.models import load_model, load_tokenizer, save_checkpoint

    model = load_model(tiny_teacher)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() == 2:
                flat = param.view(-1)
                flat.copy_(flat[torch.randperm(flat.numel(), generator=generator)])
    out = tmp_path_factory.mktemp("destroyed")
    save_checkpoint(model, load_tokenizer(tiny_teacher), out)
    return evaluate(out, TASKS, batch_size=32)


def test_teacher_answers_the_multiple_choice_task_well_above_chance(teacher_scores):
    assert set(teacher_scores) == {"ref_next", "ref_ppl"}
    assert set(teacher_scores["ref_next"]) == {"acc", "acc_norm", "acc_stderr", "acc_norm_stderr"}
    assert teacher_scores["ref_next"]["acc"] >= 0.5  # chance is 0.25; measured 0.77 on all items
    assert {"word_perplexity", "byte_perplexity", "bits_per_byte"} <= set(teacher_scores["ref_ppl"])
    assert 1.0 < teacher_scores["ref_ppl"]["byte_perplexity"] < 8.0


def test_mean_metrics_come_with_their_standard_error(teacher_scores):
    """acc is a mean over the docs: lm-eval's analytic stderr is sqrt(p(1-p)/(n-1)). The perplexity aggregations
    (weighted perplexity, bits per byte) have none in lm-eval 0.4.13; if a release adds one, gates can use it."""
    acc = teacher_scores["ref_next"]["acc"]
    assert teacher_scores["ref_next"]["acc_stderr"] == pytest.approx(math.sqrt(acc * (1 - acc) / (MC_DOCS - 1)))
    assert not any(m.endswith("_stderr") for m in teacher_scores["ref_ppl"])


def test_a_destroyed_model_scores_worse_on_both_tasks(teacher_scores, destroyed_scores):
    assert destroyed_scores["ref_next"]["acc"] < teacher_scores["ref_next"]["acc"] - 0.25
    assert destroyed_scores["ref_next"]["acc"] < 0.45  # back near chance
    assert destroyed_scores["ref_ppl"]["word_perplexity"] > 3 * teacher_scores["ref_ppl"]["word_perplexity"]


def test_unknown_task_is_a_user_error_before_any_model_loads(tmp_path):
    missing_model = tmp_path / "no-model-here"
    with pytest.raises(UserError, match="unknown evaluation task 'ref_nxt'"):
        evaluate(missing_model, [TaskSpec(name="ref_nxt", include="zoo:tiny-test")])
    with pytest.raises(UserError, match="not a directory"):
        evaluate(missing_model, [TaskSpec(name="ref_next", include=str(tmp_path / "nowhere"))])


def test_model_dir_without_config_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="no config.json"):
        evaluate(tmp_path, [TaskSpec(name="ref_next", include="zoo:tiny-test", limit=2)])


def test_flatten_strips_filters_and_bookkeeping_and_keeps_numeric_stderrs():
    raw = {
        "t": {
            "alias": "t",
            "acc,none": 0.5,
            "acc_stderr,none": 0.05,
            "sample_len": 7,
            "bits_per_byte,none": 1.5,
            "bits_per_byte_stderr,none": "N/A",
        }
    }
    assert numeric_scores(raw) == {"t": {"acc": 0.5, "acc_stderr": 0.05, "bits_per_byte": 1.5}}


@pytest.mark.parametrize(
    "metric,higher",
    [
        ("acc", True),
        ("acc_norm", True),
        ("exact_match", True),
        ("ref_next.acc", True),
        ("acc,none", True),
        ("word_perplexity", False),
        ("byte_perplexity", False),
        ("bits_per_byte", False),
        ("ref_ppl.perplexity", False),
    ],
)
def test_metric_direction(metric, higher):
    assert higher_is_better(metric) is higher


def test_primary_metric():
    assert primary_metric("ref_next", {"acc": 0.7, "acc_norm": 0.72}) == "acc_norm"
    assert primary_metric("mmlu", {"acc": 0.6}) == "acc"
    assert (
        primary_metric("ref_ppl", {"byte_perplexity": 3.0, "word_perplexity": 90.0, "bits_per_byte": 1.6})
        == "word_perplexity"
    )
    assert primary_metric("custom", {"zeta": 1.0, "alpha": 2.0}) == "alpha"
    assert primary_metric("custom", {"alpha_stderr": 0.1, "beta": 2.0}) == "beta"
    with pytest.raises(UserError, match="custom"):
        primary_metric("custom", {})


def test_eval_cache_key_follows_model_tasks_options_and_task_files(tmp_path):
    tasks_dir = tmp_path / "tasks"
    shutil.copytree(_zoo_tasks(), tasks_dir)
    tasks = [TaskSpec(name="ref_next", include=str(tasks_dir))]
    key = eval_cache_key("model-a", tasks, 16)
    assert key == eval_cache_key("model-a", [TaskSpec(name="ref_next", include=str(tasks_dir))], 16)
    assert key != eval_cache_key("model-b", tasks, 16)
    assert key != eval_cache_key("model-a", tasks, 8)
    assert key != eval_cache_key("model-a", tasks, "auto")
    assert key != eval_cache_key("model-a", [TaskSpec(name="ref_next", include=str(tasks_dir), limit=5)], 16)
    with (tasks_dir / "next.jsonl").open("a") as fh:
        fh.write(json.dumps({"context": "x", "choices": ["a", "b", "c", "d"], "label": 0}) + "\n")
    assert key != eval_cache_key("model-a", tasks, 16)


def test_eval_cache_key_follows_the_bootstrap_setting(monkeypatch):
    from compressor import evaluation

    key = eval_cache_key("model-a", TASKS, 16)
    monkeypatch.setattr(evaluation, "BOOTSTRAP_ITERS", 0)  # e.g. scores cached before standard errors existed
    assert eval_cache_key("model-a", TASKS, 16) != key


def _zoo_tasks():
    from compressor.models import zoo

    return zoo.tasks_dir("tiny-test")


def test_result_cache_round_trip_and_torn_files(tmp_path):
    path = tmp_path / "evals" / "k.json"
    assert load_cached(str(path)) is None
    save_cached(str(path), {"ref_next": {"acc": 0.75}})
    assert load_cached(str(path)) == {"ref_next": {"acc": 0.75}}
    path.write_text('{"results": {"ref_ne')
    assert load_cached(str(path)) is None


def test_cli_eval_prints_a_table_and_writes_json(tiny_teacher, tmp_path):
    from typer.testing import CliRunner

    from compressor.cli import app

    out = tmp_path / "scores.json"
    result = CliRunner().invoke(
        app,
        ["eval", "--model", "zoo:tiny-test", "--tasks", "ref_next", "--limit", "20", "--output", str(out)],
        env={"COLUMNS": "200"},
    )
    assert result.exit_code == 0, result.output
    assert "ref_next" in result.stdout and "acc_norm" in result.stdout
    assert "stderr" in result.stdout and "±0." in result.stdout and "acc_stderr" not in result.stdout  # a column
    assert 0.0 <= json.loads(out.read_text())["ref_next"]["acc"] <= 1.0


def test_cli_eval_rejects_a_bad_batch_size(tiny_teacher):
    from typer.testing import CliRunner

    from compressor.cli import app

    result = CliRunner().invoke(app, ["eval", "--model", str(tiny_teacher), "--batch-size", "0"])
    assert isinstance(result.exception, UserError) and "--batch-size '0'" in str(result.exception)  # the CLI: exit 2


def test_cli_eval_unknown_task_exits_2_with_one_line(tiny_teacher):
    import subprocess
    import sys

    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "compressor",
            "eval",
            "--model",
            str(tiny_teacher),
            "--tasks",
            "no_such_task",
            "--include",
            "zoo:tiny-test",
        ],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2
    assert "unknown evaluation task 'no_such_task'" in result.stderr and "Traceback" not in result.stderr


def test_zoo_tasks_run_offline_without_leaking_the_setting(monkeypatch):
    from compressor.evaluation import _offline

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "0")  # the user's own choice wins
    with _offline(True):
        assert os.environ["HF_HUB_OFFLINE"] == "1" and os.environ["HF_DATASETS_OFFLINE"] == "0"
    assert "HF_HUB_OFFLINE" not in os.environ and os.environ["HF_DATASETS_OFFLINE"] == "0"
    with _offline(False):
        assert "HF_HUB_OFFLINE" not in os.environ


# ----------------------------------------------------------------------------- device: what the model loader is asked
class LoaderCalled(Exception):
    """Stops an evaluation at the model loader, once the device it was asked for is recorded."""


@pytest.fixture
def loader_calls(monkeypatch):
    """Record the device_map of every from_pretrained; CUDA requests stop there (no GPU here), CPU ones load."""
    import torch
    from transformers import AutoModelForCausalLM

    calls = []
    original = AutoModelForCausalLM.from_pretrained

    def recording(path, *args, **kwargs):
        calls.append(kwargs.get("device_map"))
        if str(kwargs.get("device_map")).startswith("cuda"):
            raise LoaderCalled
        return original(path, *args, **kwargs)

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", recording)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    return calls


SMALL = [TaskSpec(name="ref_next", include="zoo:tiny-test", limit=4)]


@pytest.mark.parametrize("num_gpus,device", [(1, "cuda"), (0.5, "cuda"), (0, "cpu")])
def test_pipeline_evaluation_loads_the_model_onto_the_reserved_gpu(tiny_teacher, loader_calls, num_gpus, device):
    from compressor.manifest import ModelRef
    from compressor.runner import evaluate_ref

    model = ModelRef(path=str(tiny_teacher), key="teacher")
    if device == "cuda":
        with pytest.raises(LoaderCalled):
            evaluate_ref(model, SMALL, 8, num_gpus=num_gpus)
    else:
        scores, seconds = evaluate_ref(model, SMALL, 8, num_gpus=num_gpus)
        assert 0 <= scores["ref_next"]["acc"] <= 1 and seconds > 0
    assert loader_calls == [device]


@pytest.mark.parametrize("num_gpus,device", [(1, "cuda"), (0, "cpu")])
def test_evaluate_stage_loads_the_model_onto_its_own_gpu(tiny_teacher, tmp_path, loader_calls, num_gpus, device):
    from compressor.contract.context import StageContext
    from compressor.contract.spec import Resources
    from compressor.manifest import ModelRef
    from compressor.stages import evaluate as stage
    from compressor.stages.evaluate.spec import EvaluateSpec

    ctx = StageContext(
        work_dir=tmp_path, resources=Resources(num_gpus=num_gpus), tasks=SMALL, eval_batch_size=8, quiet=True
    )
    model = ModelRef(path=str(tiny_teacher), key="teacher")
    if device == "cuda":
        with pytest.raises(LoaderCalled):
            stage.KIND.run(EvaluateSpec(), model, ctx)
    else:
        assert "ref_next.acc_stderr" in stage.KIND.run(EvaluateSpec(), model, ctx).metrics
    assert loader_calls == [device]


def test_auto_batch_size_reaches_lm_eval(tiny_teacher, monkeypatch):
    from lm_eval.models.huggingface import HFLM

    detected = []
    original = HFLM._detect_batch_size
    monkeypatch.setattr(HFLM, "_detect_batch_size", lambda self, *a, **k: detected.append(1) or original(self, *a, **k))
    scores = evaluate(tiny_teacher, SMALL, batch_size="auto")
    assert detected and 0 <= scores["ref_next"]["acc"] <= 1


def test_cuda_without_a_cuda_torch_is_a_user_error(tiny_teacher, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(UserError, match="num_gpus: 0"):
        evaluate(tiny_teacher, SMALL, device="cuda")


def test_evaluation_batch_size_is_a_positive_int_or_auto():
    from pydantic import ValidationError

    from compressor.config.schema import EvaluationSpec

    assert EvaluationSpec(batch_size="auto").batch_size == "auto"
    assert EvaluationSpec(batch_size=4).batch_size == 4
    for bad in (0, -1, "big"):
        with pytest.raises(ValidationError, match="batch_size"):
            EvaluationSpec(batch_size=bad)
