"""Chat data for distillation: (prompt, answer) rows rendered, tokenized, masked and packed into token shards.

**Rows.** A generate stage's output, or any .jsonl / .parquet file or directory whose rows have `messages` (chat
turns; the answer is `response`, or else the last assistant turn) or `prompt` (+ optional `system`) + `response`.

**Rendering.** With the tokenizer's chat template: the prompt is the template with the generation prompt, the answer
is what the full conversation adds after it (the template must render the prompt as a prefix of the conversation,
which every common template does). Without one, a plain `template` with a `{prompt}` placeholder (the turns'
contents, one per line) gives the prompt text, and the answer is the response plus EOS. Neither: a UserError.

**Loss mask.** 1 on answer tokens, 0 on prompt tokens and padding, stored beside the tokens. A position's loss
counts when the token it predicts has mask 1. The first token of every example has mask 0 (it is the prompt's), so
no loss term predicts across an example boundary.

**Packing.** Examples are laid end to end into sequences of `seq_len` in order; one that does not fit in the rest
of a sequence starts the next (the rest is padding, masked). `positions` restart at 0 with every example (and the
padding): they are the position ids, and they delimit the examples, from which the block-diagonal causal attention
mask (`attention_mask`) keeps attention inside each example. An example longer than `seq_len` is dropped, or
(`truncate: prompt`) loses the start of its prompt; one whose answer alone does not fit is always dropped.

**Shards.** `<data_root>/chat-<key12>/{tokens,loss_mask,positions}/` are each a token-shard directory
(compressor.shards: index.json + raw shard files, the same sequence ids), read by `ShardReader`; `chat.json`, written
last, holds the counts (examples, kept, truncated, dropped, sequences, answer tokens). The key hashes the rows'
files, the tokenizer, the template and the options."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Optional

import numpy as np

from compressor import storage
from compressor.cache import digest
from compressor.chat_encoding import check_template, encode_with_starts, fit
from compressor.errors import UserError

FORMAT = 1
SIDES = ("tokens", "loss_mask", "positions")
SEQUENCES_PER_SHARD = 16384
COUNTS = "chat.json"


# ----------------------------------------------------------------------------- rows
@dataclass
class ChatRow:
    messages: list[dict]
    response: str
    where: str  # file and line (or row), for errors
    top_logprobs: Optional[list] = None  # an API teacher's alternatives per answer token (compressor.soft_labels)
    answer_tokens: Optional[list] = None  # the tokens it chose


def rows(source: str) -> Iterator[ChatRow]:
    """The rows of a .jsonl / .parquet file or directory (local or on storage)."""
    from compressor.text_sources import _files

    fs, infos = _files(source)
    for info in infos:
        name = info["name"]
        if name.endswith(".parquet"):
            import pyarrow.parquet as pq

            with fs.open(name, "rb") as fh:
                for batch_start, batch in _parquet_batches(pq.ParquetFile(fh)):
                    for i, row in enumerate(batch):
                        yield _chat_row(row, f"{name} row {batch_start + i}")
        else:
            with fs.open(name, "rt", encoding="utf-8") as fh:
                for number, line in enumerate(fh, 1):
                    if line.strip():
                        try:
                            row = json.loads(line)
                        except json.JSONDecodeError as exc:
                            raise UserError(f"{name}:{number}: not JSON ({exc.msg})") from None
                        yield _chat_row(row, f"{name}:{number}")


def _parquet_batches(parquet) -> Iterator[tuple[int, list[dict]]]:
    start = 0
    for batch in parquet.iter_batches(batch_size=1024):
        listed = batch.to_pylist()
        yield start, listed
        start += len(listed)


def _chat_row(row, where: str) -> ChatRow:
    from compressor.prompt_rows import normalize

    if not isinstance(row, dict):
        raise UserError(f"{where}: a chat row must be an object with `messages` or `prompt`, and `response`")
    response = row.get("response", row.get("answer"))  # `answer`: the labelled rows of a held-out set's format
    messages = normalize(row, where)["messages"]
    if response is None and messages[-1]["role"] == "assistant":
        messages, response = messages[:-1], messages[-1]["content"]
    if not isinstance(response, str) or not messages:
        raise UserError(
            f"{where}: no answer: give `response` (or `answer`, text) beside `messages` or `prompt`, or end "
            "`messages` with the assistant's turn"
        )
    return ChatRow(messages, response, where, row.get("top_logprobs"), row.get("answer_tokens"))


# ----------------------------------------------------------------------------- packing
@dataclass
class Packed:
    tokens: np.ndarray  # [seq_len]
    loss_mask: np.ndarray  # [seq_len] uint8: 1 where the token is an answer token
    positions: np.ndarray  # [seq_len]: restart at 0 with every example
    soft: Optional[list] = None  # [seq_len]: per position, the teacher's alternatives for the next token, or None


def pack(examples, seq_len: int, pad_id: int) -> Iterator[Packed]:
    """Sequences from (ids, answer_length[, soft targets per position]) examples laid end to end; none is split
    across two sequences."""
    tokens, mask, positions, soft = [], [], [], []
    for ids, answer_length, *given in examples:
        if len(tokens) + len(ids) > seq_len:
            yield _padded(tokens, mask, positions, soft, seq_len, pad_id)
            tokens, mask, positions, soft = [], [], [], []
        tokens += ids
        mask += [0] * (len(ids) - answer_length) + [1] * answer_length
        positions += range(len(ids))
        soft += given[0] if given and given[0] is not None else [None] * len(ids)
    if tokens:
        yield _padded(tokens, mask, positions, soft, seq_len, pad_id)


def _padded(tokens, mask, positions, soft, seq_len, pad_id) -> Packed:
    pad = seq_len - len(tokens)
    return Packed(
        np.array(tokens + [pad_id] * pad, dtype=np.int64),
        np.array(mask + [0] * pad, dtype=np.uint8),
        np.array(positions + list(range(pad)), dtype=np.int64),
        soft + [None] * pad,
    )


def attention_mask(positions, dtype):
    """[batch, 1, L, L] additive mask (0 or the dtype's minimum): causal, and only within each example, whose
    starts are the positions equal to 0. What eager and SDPA attention take for packed sequences."""
    import torch

    segments = torch.cumsum((positions == 0).long(), dim=-1)
    length = positions.shape[-1]
    causal = torch.ones(length, length, dtype=torch.bool, device=positions.device).tril()
    allowed = (segments[:, :, None] == segments[:, None, :]) & causal
    return torch.zeros(allowed.shape, dtype=dtype, device=positions.device).masked_fill(
        ~allowed, torch.finfo(dtype).min
    )[:, None]


def target_mask(loss_mask):
    """Per position: does its next-token loss count? (The token it predicts is an answer token.) The last position
    predicts nothing inside the sequence."""
    import torch

    return torch.cat([loss_mask[:, 1:], torch.zeros_like(loss_mask[:, :1])], dim=1).bool()


# ----------------------------------------------------------------------------- shards
def chat_dir(data_root: str, source: str, tokenizer_key: str, seq_len: int, template, truncate: str, soft=False) -> str:
    from compressor.config.schema import DataSource
    from compressor.text_sources import source_identity

    ident = source_identity(DataSource(source=source))
    key = digest(
        {"format": FORMAT, "source": ident, "tokenizer": tokenizer_key, "seq_len": seq_len}
        | {"template": template, "truncate": truncate}
        | ({"soft_labels": True} if soft else {})
    )
    return storage.join(data_root, f"chat-{key[:12]}")


def read_counts(directory: str) -> Optional[dict]:
    text = storage.read_text(storage.join(directory, COUNTS))
    return json.loads(text) if text else None


def prepare(
    source: str, tokenizer_dir: str, seq_len: int, template, truncate: str, data_root: str, soft: bool = False
) -> str:
    """Write (once per key) the chat shards of `source`; returns their directory. Streams: one shard in memory.
    `soft`: rows that carry an API teacher's `top_logprobs` also give sparse targets (compressor.soft_labels)."""
    from compressor import soft_labels
    from compressor.models import load_tokenizer
    from compressor.shards import tokenizer_digest

    tokenizer = load_tokenizer(tokenizer_dir)
    check_template(tokenizer, template, f"data {source}")
    template_key = template if template is not None else tokenizer.chat_template
    digest_ = tokenizer_digest(tokenizer_dir)
    k = soft_labels.width(rows(source)) if soft else 0
    directory = chat_dir(data_root, source, digest_, seq_len, template_key, truncate, soft=k > 0)
    if read_counts(directory) is not None:
        return directory
    counts = {"examples": 0, "kept": 0, "truncated": 0, "dropped": 0, "answer_tokens": 0}
    vocab = soft_labels.VocabMap(tokenizer) if k else None
    soft_counts = soft_labels.SoftCounts()

    def examples():
        for row in rows(source):
            prompt, answer, starts = encode_with_starts(tokenizer, row.messages, row.response, template)
            ids, status = fit(prompt, answer, seq_len, truncate)
            counts["examples"] += 1
            counts[status] += 1
            if ids is None:
                continue
            counts["answer_tokens"] += len(answer)
            targets = None
            if vocab is not None and row.top_logprobs:
                # the alternatives for answer token j sit at the position that predicts it
                per_token = soft_labels.align(
                    row.top_logprobs, row.answer_tokens, row.response, starts, vocab, soft_counts
                )
                targets = [None] * len(ids)
                for j, alternatives in enumerate(per_token):
                    targets[len(ids) - len(answer) + j - 1] = alternatives
            yield ids, len(answer), targets

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    writers = {side: _SideWriter(storage.join(directory, side), seq_len, side, len(tokenizer)) for side in SIDES}
    soft_writer = None
    if k:
        soft_writer = soft_labels.SoftWriter(
            storage.join(directory, soft_labels.TARGETS), seq_len, k, len(tokenizer), digest_
        )
        writers["soft_mask"] = _SideWriter(storage.join(directory, "soft_mask"), seq_len, "loss_mask", len(tokenizer))
    for packed in pack(examples(), seq_len, pad):
        for side in SIDES:
            writers[side].add(getattr(packed, side))
        if soft_writer is not None:
            writers["soft_mask"].add(soft_writer.add(packed.soft))
    for writer in writers.values():
        writer.close()
    if soft_writer is not None:
        soft_writer.close()
        counts["soft_labels"] = soft_counts.as_dict()
    if counts["examples"] == 0 or counts["dropped"] == counts["examples"]:
        raise UserError(
            f"data {source}: no example fits seq_len {seq_len} ({counts['examples']} rows, {counts['dropped']} "
            "longer than that); raise seq_len or set `chat.truncate: prompt`"
        )
    counts["sequences"] = writers["tokens"].sequences
    storage.write_text(storage.join(directory, COUNTS), json.dumps(counts, indent=2))
    return directory


class _SideWriter:
    """One side (tokens, loss_mask or positions) as a shard directory that compressor.shards.ShardReader reads."""

    def __init__(self, directory: str, seq_len: int, side: str, vocab: int):
        from compressor.shards import ShardIndex

        dtype = "<u1" if side == "loss_mask" else ("<u2" if max(vocab, seq_len) <= 65536 else "<u4")
        self.directory, self.rows, self.sequences = directory, [], 0
        self.index = ShardIndex(key=side, source=side, seq_len=seq_len, dtype=dtype, vocab_size=vocab, eos=None,
                                tokenizer="")  # fmt: skip

    def add(self, row: np.ndarray) -> None:
        self.rows.append(row.astype(self.index.dtype))
        if len(self.rows) == SEQUENCES_PER_SHARD:
            self._flush()

    def _flush(self) -> None:
        if not self.rows:
            return
        name = f"shard-{len(self.index.shards):05d}.bin"
        fs, path = storage.filesystem(storage.join(self.directory, name))
        fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
        fs.pipe_file(path, np.stack(self.rows).tobytes())
        self.index.shards.append({"file": name, "sequences": len(self.rows)})
        self.sequences += len(self.rows)
        self.rows = []

    def close(self) -> None:
        from compressor.shards import INDEX

        self._flush()
        self.index.sequences, self.index.exhausted = self.sequences, True
        storage.write_text(storage.join(self.directory, INDEX), self.index.to_json())


def for_distill(source: str, tokenizer_dir: str, seq_len: int, template, truncate: str, data_root: str, soft=False):
    """(chat shard directory, the tokens' ShardIndex, counts) for a distillation run (prepared on first use)."""
    from compressor.shards import read_index

    directory = prepare(source, tokenizer_dir, seq_len, template, truncate, data_root, soft)
    return directory, read_index(storage.join(directory, "tokens")), read_counts(directory)


def is_chat_dir(directory: str) -> bool:
    return storage.exists(storage.join(directory, COUNTS))


def side_readers(directory: str) -> dict:
    """ShardReaders of a chat shard directory, by side (tokens, loss_mask, positions, and soft_mask where the
    rows gave an API teacher's log-probabilities)."""
    from compressor.shards import ShardReader

    sides = SIDES + (("soft_mask",) if storage.exists(storage.join(directory, "soft_mask", "index.json")) else ())
    return {side: ShardReader(storage.join(directory, side)) for side in sides}


def packed_inputs(model, positions) -> dict:
    """Forward kwargs for packed sequences: position ids restarting per example, and attention kept inside each
    example (flash attention finds the examples from the position ids alone; eager and SDPA need the 4D mask)."""
    if positions is None:
        return {}
    if getattr(model.config, "_attn_implementation", None) == "flash_attention_2":
        return {"position_ids": positions}
    return {"position_ids": positions, "attention_mask": attention_mask(positions, model.dtype)}
