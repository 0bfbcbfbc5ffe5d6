"""Shared fixtures: the small reference teacher and its corpus, built once into the normal zoo cache
($COMPRESSOR_HOME/zoo, ~1 min the first time) so that every test file and later runs reuse them."""

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_teacher() -> Path:
    """HF checkpoint dir of zoo recipe "tiny-test": a ~1M-param Llama (GQA 4/2) trained on CPython's docs."""
    from compressor import zoo

    return zoo.ensure_model("tiny-test")


@pytest.fixture(scope="session")
def tiny_corpus() -> Path:
    """Directory with train.txt and heldout.txt (blank-line separated paragraphs) of the tiny-test corpus."""
    from compressor import zoo

    return zoo.corpus_dir("tiny-test")


# pipelines/tiny.yaml sized for the test teacher (hidden 128, 4 query / 2 KV heads, MLP 384) and CI's budget.
TINY_PIPELINE_AT_TEST_SIZE = [
    "teacher.model=zoo:tiny-test",
    "data.calib.source=zoo:tiny-test", "data.calib.samples=32", "data.calib.seq_len=128",
    "data.distill.source=zoo:tiny-test", "data.distill.seq_len=128",
    "evaluation.tasks.0.include=zoo:tiny-test", "evaluation.tasks.1.include=zoo:tiny-test",
    "stages.prune.target.intermediate_size=192", "stages.prune.target.num_attention_heads=2",
    "stages.distill.steps=40", "stages.distill.checkpoint_every=20",
    "stages.quantize.group_size=64",
]


@pytest.fixture(scope="session")
def tiny_test_overrides() -> list[str]:
    """KEY=VALUE overrides that run the shipped tiny pipeline on the test-size teacher."""
    return list(TINY_PIPELINE_AT_TEST_SIZE)
