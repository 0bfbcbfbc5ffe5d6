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
