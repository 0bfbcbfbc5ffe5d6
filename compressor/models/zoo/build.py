"""Building zoo entries (corpora, models, task splits), each once (compressor.models.zoo.once)."""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path

from compressor.models.zoo import corpus, eval_tasks
from compressor.models.zoo.once import build_once
from compressor.models.zoo.recipes import model_config, model_key, recipe

BUILD_INFO = "zoo.json"


def build_corpus(name: str, final: Path) -> Path:
    """train.txt / heldout.txt and the task data; task YAMLs point at the final location."""

    def fill(work: Path) -> None:
        _, heldout = corpus.write_split(work, recipe(name).heldout_percent)
        eval_tasks.write_data(work / "tasks", heldout)
        eval_tasks.materialize(data_dir=final / "tasks", out_dir=work / "tasks")

    return build_once(final, fill)


PLAIN_PROGRESS_SECONDS = 30.0  # without a terminal (CI, a Ray worker's log): a line this often, not a live bar


def _progress(iterable, description: str):
    from rich.console import Console
    from rich.progress import track

    console = Console(stderr=True)
    if console.is_terminal:
        return track(iterable, description=description, console=console, transient=False)
    return _plain_progress(iterable, description)


def _plain_progress(iterable, description: str, interval: float = PLAIN_PROGRESS_SECONDS):
    """A rich bar draws nothing on a non-terminal until it ends; the teacher build takes minutes."""
    total = len(iterable) if hasattr(iterable, "__len__") else None
    start = last = time.monotonic()
    for done, item in enumerate(iterable, 1):
        yield item
        now = time.monotonic()
        if now - last >= interval:
            last = now
            left = f", about {(now - start) * (total - done) / done:.0f} s left" if total else ""
            stderr_log(f"zoo: {description} {done}/{total or '?'}, {now - start:.0f} s{left}")


def build_model(name: str, final: Path, log: Callable[[str], None]) -> Path:
    if recipe(name).finetune_of:
        return build_once(final, lambda work: _fill_task_model(name, work, log))

    def fill(work: Path) -> None:
        import torch

        from compressor.models.io import count_params, perplexity, save_checkpoint
        from compressor.models.zoo import train
        from compressor.models.zoo.tokenizer import train_tokenizer

        r = recipe(name)
        start, cpu_start = time.perf_counter(), time.process_time()
        train_docs, heldout_docs = corpus.split(r.heldout_percent)
        tokenizer = train_tokenizer((p for doc in train_docs for p in doc), r.vocab_size, r.seq_len)
        blocks = train.pack(train_docs, tokenizer, r.seq_len, r.seed)
        heldout_blocks = train.pack([[p] for doc in heldout_docs for p in doc], tokenizer, r.seq_len, r.seed)
        log(
            f"zoo: building {name}: {r.steps} steps over {blocks.numel():,} train tokens, {torch.get_num_threads()} threads"
        )
        model = train.build_model(model_config(name), r.seed)
        losses = train.train(model, blocks, r, progress=_progress)
        info = {
            "name": name,
            "key": model_key(name),
            "params": count_params(model),
            "train_tokens_seen": r.train_tokens,
            "corpus_train_tokens": blocks.numel(),
            "final_train_loss": sum(losses[-10:]) / len(losses[-10:]),
            "heldout_ppl": perplexity(model, heldout_blocks),
            "unigram_ppl": train.unigram_perplexity(blocks, heldout_blocks, r.vocab_size),
            "build_seconds": round(time.perf_counter() - start, 1),
            "build_cpu_seconds": round(time.process_time() - cpu_start, 1),  # all threads; steadier on a busy machine
            "python": platform.python_version(),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
        }
        save_checkpoint(model, tokenizer, work)
        (work / BUILD_INFO).write_text(json.dumps(info, indent=2) + "\n")
        log(
            f"zoo: built {name} in {info['build_seconds']} s, held-out ppl {info['heldout_ppl']:.1f} "
            f"(unigram {info['unigram_ppl']:.1f})"
        )

    return build_once(final, fill)


def _fill_task_model(name: str, work: Path, log: Callable[[str], None]) -> None:
    """The base zoo model fine-tuned on the task's labelled train split, saved with the zoo chat template."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from compressor.models import zoo
    from compressor.models.io import save_checkpoint
    from compressor.models.zoo import finetune, module_task
    from compressor.models.zoo.chat import CHAT_TEMPLATE

    r = recipe(name)
    base = zoo.ensure_model(r.finetune_of, log)
    start = time.perf_counter()
    # the zoo's own checkpoints: plain Llamas, never code from a checkpoint
    model = AutoModelForCausalLM.from_pretrained(base, dtype="float32", trust_remote_code=False)
    tokenizer = AutoTokenizer.from_pretrained(base, trust_remote_code=False)
    tokenizer.chat_template = CHAT_TEMPLATE
    rows = module_task.splits(r.seed)["train"]
    log(f"zoo: building {name}: {r.finetune_of} fine-tuned on {len(rows)} labelled rows, {r.steps} steps")
    losses = finetune.finetune(model, tokenizer, rows, r, progress=_progress)
    save_checkpoint(model, tokenizer, work)
    info = {
        "name": name,
        "key": model_key(name),
        "finetune_of": r.finetune_of,
        "train_rows": len(rows),
        "final_train_loss": sum(losses[-10:]) / len(losses[-10:]),
        "build_seconds": round(time.perf_counter() - start, 1),
    }
    (work / BUILD_INFO).write_text(json.dumps(info, indent=2) + "\n")
    log(f"zoo: built {name} in {info['build_seconds']} s, answer loss {info['final_train_loss']:.3f}")


def stderr_log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def home() -> Path:
    return Path(os.environ.get("COMPRESSOR_HOME") or "~/.cache/compressor").expanduser() / "zoo"
