"""Bad distill input fails with a clear UserError before any training (and mostly before Ray starts)."""

import subprocess
import sys

import pytest
from distill_helpers import FileSink, build_llama, build_tokenizer, context, tiny_pair
from pydantic import ValidationError

from compressor.errors import UserError
from compressor.manifest import ModelRef
from compressor.stages import distill
from compressor.stages.distill.spec import DistillSpec

LLAMA = {"architectures": ["LlamaForCausalLM"], "num_hidden_layers": 4, "hidden_size": 64, "vocab_size": 320}


def spec(**overrides) -> DistillSpec:
    return DistillSpec(**{"data": "text", "steps": 10, **overrides})


def test_importing_the_stage_does_not_import_torch():
    code = "import sys, compressor.stages.distill, compressor.commands.stage; print('torch' in sys.modules)"
    assert (
        subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
        == "False"
    )


def test_check_keeps_the_shape():
    assert distill.KIND.check(spec(), LLAMA).config == LLAMA


@pytest.mark.parametrize(
    "overrides,config,words",
    [
        (
            {"global_batch": 6, "workers": 4},
            LLAMA,
            "distill.global_batch: 6 sequences do not split evenly over 4 workers",
        ),
        ({"global_batch": 12, "micro_batch": 5}, LLAMA, "distill.micro_batch: each worker gets 12 sequences"),
        (
            {"steps": None, "tokens": 1000, "seq_len": 512},
            LLAMA,
            "distill.tokens: a budget of 1000 tokens is less than one",
        ),
        ({"warmup_steps": 10}, LLAMA, "distill.warmup_steps: 10 warm-up steps leave none of the 10"),
        ({"loss": {"hidden_mse": [(4, 0)]}}, LLAMA, "student layer 4 does not exist"),
        ({}, {**LLAMA, "final_logit_softcapping": 30.0}, "final_logit_softcapping=30.0"),
    ],
)
def test_check_refuses(overrides, config, words):
    with pytest.raises(UserError, match=words):
        distill.KIND.check(spec(**overrides), config)


def test_spec_refuses_a_zero_or_missing_budget():
    with pytest.raises(ValidationError, match="greater than 0"):
        DistillSpec(data="text", tokens=0)
    with pytest.raises(ValidationError, match="give `steps` or `tokens`"):
        DistillSpec(data="text")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("distill-check")
    teacher, student, corpus = tiny_pair(root)
    other_vocab = build_llama(root / "other-vocab", build_tokenizer(), 64, 64, 2, seed=3, vocab=300)
    narrow = build_llama(root / "narrow", build_tokenizer(), 32, 64, 2, seed=4)
    empty = root / "empty.txt"
    empty.write_text("\n\n")
    few = root / "few.txt"
    few.write_text("only a few tokens")
    return {
        "teacher": teacher,
        "student": student,
        "corpus": corpus,
        "other_vocab": other_vocab,
        "narrow": narrow,
        "empty": empty,
        "few": few,
    }


@pytest.mark.parametrize(
    "student,corpus,overrides,words",
    [
        ("other_vocab", "corpus", {}, r"the teacher's vocab_size \(320, .*\) is larger than the student's \(300\)"),
        ("narrow", "corpus", {"loss": {"hidden_mse": [(1, 1)]}}, r"student's hidden_size \(32\) differs"),
        ("student", "corpus", {"loss": {"hidden_mse": [(0, 7)]}}, "teacher layer 7 does not exist"),
        ("student", "empty", {}, "no text found"),
        ("student", "few", {}, "fewer than 32 tokens"),
        (
            "student",
            "corpus",
            {"steps": None, "tokens": 100.0},
            "a budget of 100 tokens is less than one optimizer step",
        ),
    ],
)
def test_run_refuses_bad_input_before_training(models, tmp_path, student, corpus, overrides, words):
    import ray

    work = tmp_path / "work"
    work.mkdir()
    ctx = context(work, models["teacher"], models[corpus], FileSink(tmp_path / "m.jsonl"), storage=tmp_path / "ray")
    ray_was_up = ray.is_initialized()
    with pytest.raises(UserError, match=words):
        distill.KIND.run(spec(**overrides), ModelRef(path=str(models[student]), key="s"), ctx)
    assert not (tmp_path / "ray").exists() and not (tmp_path / "m.jsonl").exists()
    assert ray.is_initialized() == ray_was_up  # refused before Ray was even started
