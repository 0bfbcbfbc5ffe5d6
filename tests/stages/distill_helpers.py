"""Small models, data and sinks for the distill tests (random tiny Llamas: the mechanics do not need a trained teacher)."""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path
from typing import Optional

import pytest

from compressor.config.schema import DataSource
from compressor.contract.context import MetricsSink, StageContext
from compressor.manifest import ModelRef

VOCAB = 320


def corpus_text() -> str:
    """A few hundred KB of English that every CPython ships (its help topics), as blank-line separated paragraphs."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics))


def build_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB,
        special_tokens=["<s>", "</s>"],
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(corpus_text().split("\n\n")[:400], trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")


def build_llama(
    out_dir: Path,
    tokenizer,
    hidden: int,
    intermediate: int,
    layers: int,
    seed: int,
    vocab: int = VOCAB,
    tie: bool = False,
) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from compressor.models import save_checkpoint

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=hidden // 4,
        tie_word_embeddings=tie,
        max_position_embeddings=256,
    )
    save_checkpoint(LlamaForCausalLM(config), tokenizer, out_dir)
    return out_dir


def tiny_pair(root: Path, student_vocab: int = VOCAB) -> tuple[Path, Path, Path]:
    """(teacher dir, student dir, corpus file) under root."""
    tokenizer = build_tokenizer()
    teacher = build_llama(root / "teacher", tokenizer, hidden=64, intermediate=128, layers=2, seed=1)
    student = build_llama(
        root / "student", tokenizer, hidden=64, intermediate=64, layers=2, seed=2, vocab=student_vocab
    )
    corpus = root / "corpus.txt"
    corpus.write_text(corpus_text())
    return teacher, student, corpus


class FileSink(MetricsSink):
    """Appends every metrics call as a JSON line: it works from inside Ray workers on this machine.

    With `die_at_step`, the worker that logs that step exits hard once (a marker file remembers it), which is how the
    fault-tolerance tests kill a worker mid-run. It first waits a little: Ray Train's controller registers a reported
    checkpoint when it next polls the workers (every 2 s), and a real failure comes long after the last report."""

    def __init__(self, path: Path, die_at_step: Optional[int] = None):
        self.path = Path(path)
        self.die_at_step = die_at_step

    def log_metrics(self, metrics, step=None):
        with self.path.open("a") as fh:
            fh.write(json.dumps({"step": step, **metrics, "pid": os.getpid()}) + "\n")
        marker = self.path.with_suffix(f".died{self.die_at_step}")
        if self.die_at_step is not None and step == self.die_at_step and not marker.exists():
            marker.touch()
            time.sleep(3.0)
            os._exit(1)

    def records(self) -> list[dict]:
        if not self.path.exists():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines()]


def context(
    work: Path,
    teacher: Path,
    corpus: Path,
    sink: MetricsSink,
    seq_len: int = 32,
    run_name: str = "distill-test",
    storage: Optional[Path] = None,
) -> StageContext:
    return StageContext(
        work_dir=work,
        teacher=ModelRef(path=str(teacher), key="teacher"),
        data={"text": DataSource(source=str(corpus), seq_len=seq_len)},
        storage_path=str(storage or work.parent / "ray"),
        run_name=run_name,
        sink=sink,
        quiet=True,
    )


@pytest.fixture(scope="module")
def single_process_group():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    yield
    import torch

    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    # Leave no rank variables behind: later tests start subprocesses (lm_eval) that would join a process group.
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def _ship_by_value() -> None:
    # Ray workers cannot import this test module: pickle FileSink by value so it can ride into them.
    import sys

    import ray.cloudpickle

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


_ship_by_value()
