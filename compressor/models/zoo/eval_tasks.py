"""The reference lm-eval tasks, made from the held-out corpus (no torch).

- `ref_ppl`  (loglikelihood_rolling): every held-out paragraph; word/byte perplexity, bits per byte.
- `ref_next` (multiple_choice): a held-out paragraph's opening sentence(s), then which of 4 sentences is
  the one that really comes next. The 3 distractors are that sentence with one pair of adjacent words
  swapped (each at a different place), a minimal-pair design like BLiMP: a fluent model prefers the real
  sentence, a damaged one drifts towards 25%. Distractors taken from other documents were tried first:
  both reference models scored at or below chance there (acc 17-20%, acc_norm 22-24%, 291 items), since
  models this small hardly use the context, although a word-overlap heuristic reached 77%.

Templates ship in compressor/models/zoo/tasks/*.yaml with a @DATA_DIR@ placeholder; `materialize` writes them
with the absolute path of the JSONL data, which is what lm-eval's `dataset_kwargs.data_files` needs."""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
from importlib import resources
from pathlib import Path

TASK_NAMES = ("ref_ppl", "ref_next")
MC_ITEMS = 400
MC_DISTRACTORS = 3
CONTEXT_CHARS = (
    60,
    300,
)  # opening sentences until at least 60 chars; longer ones are skipped (model windows are short)
SENTENCE_WORDS = (6, 40)  # length range of the sentence to recognise
# A sentence ends at . ! or ? followed by a capital; skip common abbreviations like "e.g." and "i.e.".
SENTENCE_END = re.compile(r"(?<!\be\.g\.)(?<!\bi\.e\.)(?<!\betc\.)(?<=[.!?])\s+(?=[A-Z])")


def sentences(paragraph: str) -> list[str]:
    return [s.strip() for s in SENTENCE_END.split(paragraph) if s.strip()]


def _stable(text: str) -> int:
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big")


def swapped_variants(sentence: str, n: int, rng: random.Random) -> list[str] | None:
    """`n` copies of the sentence, each with one pair of adjacent (different) words swapped at its own place."""
    words = sentence.split()
    places = [i for i in range(len(words) - 1) if words[i] != words[i + 1]]
    if len(places) < n:
        return None
    variants = []
    for i in sorted(rng.sample(places, n)):
        swapped = words[:i] + [words[i + 1], words[i]] + words[i + 2 :]
        variants.append(" ".join(swapped))
    return variants


def next_sentence_items(heldout_docs: list[list[str]], n_items: int = MC_ITEMS, seed: int = 0) -> list[dict]:
    """Deterministic 4-way items {context, choices, label} from held-out paragraphs with 2+ sentences."""
    candidates = []
    for doc in heldout_docs:
        for paragraph in doc:
            sents = sentences(paragraph)
            k = 1
            while k < len(sents) and len(" ".join(sents[:k])) < CONTEXT_CHARS[0]:
                k += 1
            if k == len(sents) or len(" ".join(sents[:k])) > CONTEXT_CHARS[1]:
                continue
            if SENTENCE_WORDS[0] <= len(sents[k].split()) <= SENTENCE_WORDS[1]:
                candidates.append((" ".join(sents[:k]), sents[k]))
    candidates.sort(key=lambda c: _stable(c[0] + c[1]))  # a fixed, well-mixed choice of items
    rng = random.Random(seed)
    items = []
    for context, truth in candidates:
        choices = swapped_variants(truth, MC_DISTRACTORS, rng)
        if choices is None:
            continue
        label = rng.randrange(MC_DISTRACTORS + 1)
        choices.insert(label, truth)
        items.append({"context": context, "choices": choices, "label": label})
        if len(items) == n_items:
            break
    return items


def write_data(data_dir: Path, heldout_docs: list[list[str]]) -> None:
    """ppl.jsonl (one held-out paragraph per line) and next.jsonl (the multiple-choice items)."""
    data_dir.mkdir(parents=True, exist_ok=True)
    with (data_dir / "ppl.jsonl").open("w", encoding="utf-8") as fh:
        for paragraph in (p for doc in heldout_docs for p in doc):
            fh.write(json.dumps({"text": paragraph}) + "\n")
    with (data_dir / "next.jsonl").open("w", encoding="utf-8") as fh:
        for item in next_sentence_items(heldout_docs):
            fh.write(json.dumps(item) + "\n")


def materialize(data_dir: Path, out_dir: Path) -> Path:
    """Write the task YAMLs pointing at `data_dir`; rewritten only when the content would change."""
    out_dir.mkdir(parents=True, exist_ok=True)
    templates = resources.files("compressor.models.zoo") / "tasks"
    for name in TASK_NAMES:
        text = (templates / f"{name}.yaml").read_text(encoding="utf-8")
        text = text.replace("@DATA_DIR@", json.dumps(str(data_dir.resolve()))[1:-1])
        target = out_dir / f"{name}.yaml"
        if not target.exists() or target.read_text(encoding="utf-8") != text:
            tmp = target.with_name(f".{name}.{os.getpid()}.tmp")  # private name: other processes may do the same
            tmp.write_text(text, encoding="utf-8")
            tmp.replace(target)
    return out_dir
