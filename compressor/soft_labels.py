"""Soft labels from an API teacher: the `top_logprobs` a generate stage stored, as sparse targets of the student.

A black-box teacher (`distill.teacher: none`, or an API) gives no logits, but an OpenAI-compatible API gives, per
answer token, the k most likely next tokens as strings with their log-probabilities (at T = 1). They become the
student's sparse top-k targets (compressor/targets.py's `topk` format, beside the chat shards) where two things hold:

- **Alignment.** The teacher's step starts where one of the student's answer tokens starts: the tokens the teacher
  chose (`answer_tokens`, else the top-1 alternatives) give each step's character offset in the response, the
  student's tokenizer gives its tokens' offsets. A student token that starts mid-way through a teacher token has no
  teacher distribution (its position keeps the CE term only).
- **Mapping.** An alternative's string maps to the student id whose decoded text is exactly that string (and no
  other id's is). Alternatives that do not map give their mass to the tail bucket, which holds 1 - the mapped mass.

The counts (positions aligned, alternatives mapped, their mass) go into the chat data's counts and the manifest:
the mapping rate says how much of the teacher's distribution the student actually sees."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from compressor import storage

TARGETS = "targets-api"
Alternatives = list[tuple[int, float]]  # (student id, log-probability), distinct ids


class VocabMap:
    """Exact strings -> student ids: every id whose decoded text no other id shares."""

    def __init__(self, tokenizer):
        seen: dict[str, int] = {}
        ambiguous: set[str] = set()
        for i in range(len(tokenizer)):
            text = tokenizer.decode([i])
            if text in seen:
                ambiguous.add(text)
            seen.setdefault(text, i)
        self.ids = {text: i for text, i in seen.items() if text not in ambiguous}

    def get(self, text: str) -> Optional[int]:
        return self.ids.get(text)


@dataclass
class SoftCounts:
    rows_with_logprobs: int = 0
    answer_tokens: int = 0  # of the rows with log-probabilities
    aligned: int = 0  # of those, tokens whose position got the teacher's distribution
    alternatives: int = 0  # at the aligned positions
    mapped: int = 0
    mapped_mass: float = 0.0  # summed probability of the mapped alternatives
    mass: float = 0.0  # summed probability of all alternatives

    def as_dict(self) -> dict:
        return {
            "rows_with_logprobs": self.rows_with_logprobs,
            "answer_tokens": self.answer_tokens,
            "aligned_tokens": self.aligned,
            "alternatives": self.alternatives,
            "mapped_alternatives": self.mapped,
            "mapping_rate": round(self.mapped / self.alternatives, 4) if self.alternatives else None,
            "mapped_mass_rate": round(self.mapped_mass / self.mass, 4) if self.mass else None,
        }


def step_offsets(chosen: list[str], response: str) -> list[int]:
    """Character offset in `response` of each step the chosen tokens spell, for the steps inside it."""
    offsets, at = [], 0
    for token in chosen:
        if at >= len(response) or not response.startswith(token, at) or not token:
            break
        offsets.append(at)
        at += len(token)
    return offsets


def align(
    steps: list[list[dict]],
    chosen: Optional[list[str]],
    response: str,
    token_starts: list[Optional[int]],
    vocab: VocabMap,
    counts: SoftCounts,
) -> list[Optional[Alternatives]]:
    """Per student answer token (its start in `response`, None outside it): the teacher's mapped alternatives for
    predicting it, or None."""
    chosen = chosen if chosen is not None else [s[0]["token"] if s else "" for s in steps]
    by_offset = dict(zip(step_offsets(chosen, response), steps))
    counts.rows_with_logprobs += 1
    counts.answer_tokens += len(token_starts)
    out: list[Optional[Alternatives]] = []
    for start in token_starts:
        step = by_offset.get(start) if start is not None else None
        out.append(None if step is None else _mapped(step, vocab, counts))
    return out


def _mapped(step: list[dict], vocab: VocabMap, counts: SoftCounts) -> Optional[Alternatives]:
    merged: dict[int, float] = {}
    for alt in step:
        p = math.exp(alt["logprob"])
        counts.alternatives += 1
        counts.mass += p
        i = vocab.get(alt["token"])
        if i is not None:
            counts.mapped += 1
            counts.mapped_mass += p
            merged[i] = merged.get(i, 0.0) + p
    if not merged:
        return None
    counts.aligned += 1
    return [(i, math.log(p)) for i, p in merged.items()]


@dataclass
class SoftWriter:
    """The sparse targets of packed chat sequences, in compressor.targets' `topk` layout (parts + index.json)."""

    directory: str
    seq_len: int
    k: int
    vocab_size: int
    tokenizer: str
    rows: list = field(default_factory=list)
    written: int = 0

    def __post_init__(self):
        from compressor.targets import TargetsIndex

        self.index = TargetsIndex(
            key=TARGETS, kind="topk", k=self.k, temperature=1.0, seed=0, teacher="api", tokenizer=self.tokenizer,
            vocab_size=self.vocab_size, seq_len=self.seq_len,
            id_dtype="<u2" if self.vocab_size <= 1 << 16 else "<u4",
        )  # fmt: skip

    def add(self, targets: list[Optional[Alternatives]]) -> np.ndarray:
        """One sequence's targets (per position: the alternatives for predicting the next token, or None); returns
        its soft mask on the predicted tokens (1 where position - 1 has targets), the convention of loss_mask."""
        ids = np.zeros((self.seq_len, self.k), dtype=self.index.id_dtype)
        val = np.full((self.seq_len, self.k), -np.inf, dtype="<f2")  # -inf: an unused slot (no mass, no id)
        tail = np.zeros(self.seq_len, dtype="<f2")
        mask = np.zeros(self.seq_len, dtype=np.uint8)
        for position, alternatives in enumerate(targets):
            if not alternatives:
                continue
            best = sorted(alternatives, key=lambda a: -a[1])[: self.k]
            for slot, (i, logp) in enumerate(best):
                ids[position, slot], val[position, slot] = i, logp
            tail[position] = max(0.0, 1.0 - sum(math.exp(logp) for _, logp in best))
            mask[position + 1] = 1
        self.rows.append({"ids": ids, "val": val, "tail": tail})
        if len(self.rows) == self.index.part_sequences:
            self._flush()
        return mask

    def _flush(self) -> None:
        from compressor.targets import write_index, write_part

        if not self.rows:
            return
        arrays = {name: np.stack([r[name] for r in self.rows]) for name in ("ids", "val", "tail")}
        write_part(self.directory, self.written, arrays)
        self.index.parts[str(self.written)] = len(self.rows)
        self.written += len(self.rows)
        self.rows = []
        write_index(self.directory, self.index)

    def close(self) -> None:
        from compressor.targets import write_index

        self._flush()
        write_index(self.directory, self.index)


def width(rows_source, look: int = 100) -> int:
    """k: the most alternatives a step has, in the first row with log-probabilities among the first `look` rows
    (a generate stage stores them on every row or on none); 0 when none has them."""
    for _, row in zip(range(look), rows_source):
        if row.top_logprobs:
            return max((len(step) for step in row.top_logprobs), default=0)
    return 0


def targets_of(chat_directory: str) -> Optional[str]:
    """The soft-label targets beside a chat shard directory, when it has them."""
    directory = storage.join(chat_directory, TARGETS)
    return directory if storage.exists(storage.join(directory, "index.json")) else None
