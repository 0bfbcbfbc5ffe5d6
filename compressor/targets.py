"""Teacher targets: sparse teacher distributions for every position of a token-shard set, computed once.

    <token shard dir>/targets-<kind>-k<k>-T<T>-<teacher12>/
        index.json                   what is there; written LAST (again after each part)
        part-<first id>.ids          [n, seq_len, k] token ids (uint16 when the vocabulary fits, else uint32)
        part-<first id>.val          [n, seq_len, k] fp16 teacher log-probabilities at temperature T of those ids
        part-<first id>.cnt          sampled: [n, seq_len, k] uint8 draw counts (0 in an unused slot)
        part-<first id>.tail         topk: [n, seq_len] fp16 probability mass outside the k ids

Two kinds (issue 22):
- `topk`: the k most likely tokens, their log-probabilities and the tail mass (DistillKit's, Axolotl's). It drops
  the tail and over-sharpens: its gradient is biased.
- `sampled`: k draws with replacement from the teacher's distribution at T (Gemma's sampled soft labels, RS-KD),
  kept as unique ids with counts and the teacher's log-probability of each. (1/k) sum_draws f(x) is an unbiased
  estimate of E_p[f], so the forward-KL gradient is unbiased; the log-probabilities give unbiased KL values and,
  by importance weighting, reverse KL (compressor/stages/distill/sparse_loss.py).

At k=64 on a 32k vocabulary a position costs 258 bytes (topk) or 320 bytes (sampled), 0.4-0.5% of dense fp16
logits (65,536 bytes). The directory's key hashes the token shards' key, the teacher's identity, kind, k, T and the
draws' seed, so every distillation of any student on that data and teacher reads the same targets.

**Writing** goes in parts of `PART_SEQUENCES` consecutive sequence ids, each written whole by one worker (a Ray Data
actor, on any node) and then listed in the index. A killed run loses only parts not yet listed, a larger request
computes only the parts it lacks, and nothing ever holds more than one part. **Reading** memory-maps local parts
and range-reads remote ones, only the ids asked for (each distill worker its own)."""

from __future__ import annotations

import json
import os
from collections import OrderedDict
from dataclasses import asdict, dataclass, field
from typing import Optional

import numpy as np

from compressor import storage
from compressor.cache import digest
from compressor.errors import UserError

FORMAT = 1
INDEX = "index.json"
# Sequences per part: 256 x 8192 positions x 320 B = 670 MB at the flagship's seq_len and k=64. Recorded in each
# index (readers follow the index); the variable sets it for new targets (tests use small parts).
PART_SEQUENCES = int(os.environ.get("COMPRESSOR_TARGETS_PART_SEQUENCES", "256"))
OPEN_MAPS = 64


@dataclass
class TargetsIndex:
    key: str
    kind: str
    k: int
    temperature: float
    seed: int
    teacher: str  # the teacher's cache key (a hub commit, a directory's content hash, a zoo recipe's key)
    tokenizer: str  # digest of the tokenizer the token shards were made with
    vocab_size: int  # the teacher's logits' width
    seq_len: int
    id_dtype: str
    parts: dict[str, int] = field(default_factory=dict)  # first sequence id (as text) -> sequences in that part
    part_sequences: int = field(default_factory=lambda: PART_SEQUENCES)
    format: int = FORMAT

    def bytes_per_position(self) -> int:
        return bytes_per_position(self.kind, self.k, self.vocab_size)


def bytes_per_position(kind: str, k: int, vocab_size: int) -> int:
    id_bytes = 2 if vocab_size <= 1 << 16 else 4
    return k * (id_bytes + 2) + (2 if kind == "topk" else k)  # ids + fp16 log-probs, + the tail or counts


def check_settings(kind: str, k: int, vocab_size: int, where: str = "loss.targets") -> None:
    if k < 1:
        raise UserError(f"{where}.k: {k}; take at least 1 token per position")
    if k > vocab_size:
        raise UserError(f"{where}.k: {k} is larger than the teacher's vocabulary ({vocab_size:,} tokens)")
    if kind == "sampled" and k > 255:
        raise UserError(f"{where}.k: {k}; sampled targets keep draw counts in one byte: take k <= 255")


def targets_dir(shard_dir: str, kind: str, k: int, temperature: float, seed: int, teacher_key: str) -> str:
    key = digest(
        {
            "format": FORMAT,
            "shards": shard_dir.rstrip("/").rsplit("/", 1)[-1],
            "teacher": teacher_key,
            "kind": kind,
            "k": k,
            "temperature": temperature,
            "seed": seed,
        }
    )
    return storage.join(shard_dir, f"targets-{kind}-k{k}-T{temperature:g}-{key[:12]}")


def read_index(directory: str) -> Optional[TargetsIndex]:
    text = storage.read_text(storage.join(directory, INDEX))
    return None if text is None else TargetsIndex(**json.loads(text))


def write_index(directory: str, index: TargetsIndex) -> None:
    storage.write_text(storage.join(directory, INDEX), json.dumps(asdict(index), indent=1))


def missing_parts(index: Optional[TargetsIndex], sequences: int) -> list[tuple[int, int]]:
    """(first id, count) of the parts that `sequences` sequences need and the index does not list whole. The last
    part of a shorter request is computed again, longer, under new file names (readers of the old one go on)."""
    done = index.parts if index else {}
    size = index.part_sequences if index else PART_SEQUENCES
    needed = [(first, min(size, sequences - first)) for first in range(0, sequences, size)]
    return [(first, count) for first, count in needed if done.get(str(first), 0) < count]


def part_files(first: int, count: int, kind: str) -> dict[str, str]:
    stem = f"part-{first:012d}-n{count}"
    names = {"ids": f"{stem}.ids", "val": f"{stem}.val"}
    names["tail" if kind == "topk" else "cnt"] = f"{stem}.{'tail' if kind == 'topk' else 'cnt'}"
    return names


def write_part(directory: str, first: int, arrays: dict[str, np.ndarray]) -> None:
    """Write one part's arrays (keys as in part_files) as raw little-endian files. The part counts only once the
    index lists it, so a writer killed half-way leaves nothing that is read."""
    fs, root = storage.filesystem(directory)
    fs.makedirs(root, exist_ok=True)
    kind = "topk" if "tail" in arrays else "sampled"
    for name, file in part_files(first, len(arrays["ids"]), kind).items():
        with fs.open(f"{root.rstrip('/')}/{file}", "wb") as fh:
            fh.write(np.ascontiguousarray(arrays[name]).tobytes())


class TargetsReader:
    """Reads the targets of given global sequence ids: {"ids", "val", and "tail" or "cnt"} arrays, [n, seq_len, ...]."""

    def __init__(self, directory: str, sequences: int):
        index = read_index(directory)
        if index is None:
            raise UserError(f"teacher targets {directory}: no {INDEX} there; they have not been computed")
        lacking = missing_parts(index, sequences)
        if lacking:
            raise UserError(f"teacher targets {directory}: {len(lacking)} parts of the {sequences} sequences missing")
        self.directory, self.index = directory, index
        self.remote = storage.is_remote(directory)
        self.fs, self.root = storage.filesystem(directory)
        self.shapes = {"ids": (index.k,), "val": (index.k,), "cnt": (index.k,), "tail": ()}
        self.dtypes = {
            "ids": np.dtype(index.id_dtype),
            "val": np.dtype("<f2"),
            "cnt": np.dtype("u1"),
            "tail": np.dtype("<f2"),
        }
        self._maps: OrderedDict[tuple[int, str], np.memmap] = OrderedDict()

    def read(self, ids) -> dict[str, np.ndarray]:
        ids = np.asarray(ids, dtype=np.int64)
        kind, seq_len = self.index.kind, self.index.seq_len
        out = {
            name: np.empty((len(ids), seq_len, *self.shapes[name]), dtype=self.dtypes[name])
            for name in part_files(0, 0, kind)
        }
        first_of = (ids // self.index.part_sequences) * self.index.part_sequences
        for first in np.unique(first_of):
            mask = first_of == first
            local = ids[mask] - first
            for name, file in part_files(int(first), self.index.parts[str(int(first))], kind).items():
                out[name][mask] = self._rows(int(first), name, file, local)
        return out

    def _rows(self, first: int, name: str, file: str, local: np.ndarray) -> np.ndarray:
        rows = self.index.parts[str(first)]
        row_shape = (self.index.seq_len, *self.shapes[name])
        dtype = self.dtypes[name]
        path = f"{self.root.rstrip('/')}/{file}"
        if self.remote:
            size = int(np.prod(row_shape)) * dtype.itemsize
            starts = [int(i) * size for i in local]
            parts = self.fs.cat_ranges([path] * len(local), starts, [s + size for s in starts])
            return np.frombuffer(b"".join(parts), dtype=dtype).reshape(len(local), *row_shape)
        key = (first, name)
        if key not in self._maps:
            self._maps[key] = np.memmap(path, dtype=dtype, mode="r", shape=(rows, *row_shape))
            if len(self._maps) > OPEN_MAPS:
                self._maps.popitem(last=False)
        self._maps.move_to_end(key)
        return self._maps[key][local]
