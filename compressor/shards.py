"""Token shards: a data source tokenized once into fixed-length sequences, kept where every worker can read them.

    <data_root>/<source-slug>-L<seq_len>-<key12>/
        index.json                  what is there; written LAST (and again after each shard)
        shard-00000-<writer>.bin    raw little-endian uint16 (vocab <= 65,536) or uint32 tokens, sequences x seq_len

`data_root` is a local/NFS path or a storage URI (s3://...), normally `<storage>/_data`. The key hashes the source
(`compressor.text_sources.source_identity`: the spec without `samples`, plus file sizes and stamps), the tokenizer's files and
seq_len, so a second pipeline, or a re-run, on the same data and tokenizer reuses the shards. A directory without
index.json holds nothing usable: shard files count only once an index lists them, and every file an index lists is
complete. Writers name their files with a random writer id, so two writers of one key never clobber each other's
files, and each index they write is consistent on its own.

**Writing.** Documents stream from the source (never a list of the corpus) in batches through the fast tokenizer's
batched call, are joined with EOS and cut into sequences, which go straight into the open shard file: the writer
holds one batch of documents and less than one shard. It stops as soon as it has the sequences asked for or the
source ends, and the index records which (`exhausted`), with the stream position reached (`documents` read before
it, and the `offset` of the next unwritten token inside the next document). A later, larger request extends the same
shards from that position, with exactly the sequences an uninterrupted writer would have produced; an interrupted
writer resumes from its last complete shard the same way. Sequence ids never change once written, so a running
distillation is not disturbed by another pipeline extending its shards. For an `hf:` source the index also keeps the
`datasets` stream `state` at the start of the batch holding that position: extending loads it and reads less than
one batch again, instead of every row before the position (`compressor.text_sources.document_batches`).

**Fit, early.** When the first shard closes, the writer extrapolates the source's size (`estimated_tokens`: tokens
per document x the dataset's row count, or tokens per byte x its files' bytes) into the index, and hands it to the
caller's `check`, which refuses a budget the whole source clearly cannot give (distill: `check_fit`) after one shard
rather than after hours of tokenizing; a later writer checks the recorded estimate before reading anything.

**Why the tokenizer's own batched call, not Ray Data or `datasets.map(num_proc=...)`.** A fast tokenizer's
`encode_batch` runs in Rust, parallel across the node's cores (Rayon), on text that never leaves the process; it is
where the time goes, and the writer keeps >= 0.8 of its throughput (benchmarks/data.py). The packing is
inherently sequential (a sequence spans documents, and "stop at N sequences, extend later" needs one stream
position), which Ray Data's unordered parallel blocks and `datasets.map` would have to re-serialize; `map(num_proc)`
also needs a non-streaming dataset and writes a full Arrow copy of it to one node's local cache, and Ray Data
materializes blocks in the object store (about 30% of a node's RAM). Measured here, 2 shared cores prepare about
0.7M tokens/s; a GPU node's dozens of cores make the 94B-token recipe hours of one-off preparation (`compressor data
prepare`) before a multi-day run, and every later pipeline on the same data skips it.

**Reading.** `ShardReader` memory-maps local shards (np.memmap, a bounded LRU of open maps) and range-reads remote ones
(fsspec `cat_ranges`, concurrent on s3), and reads only the requested global sequence ids."""

from __future__ import annotations

import hashlib
import json
import re
import uuid
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Optional

import numpy as np

from compressor import storage
from compressor.cache import digest
from compressor.config.schema import DataSource
from compressor.errors import UserError
from compressor.models import is_tokenizer_file

FORMAT = 1
INDEX = "index.json"
SHARD_BYTES = 256 << 20
DOCUMENT_BATCH = 512  # documents per batched tokenizer call
OPEN_MAPS = 32  # memory maps a reader keeps open (one file descriptor each)


def data_root_for(storage_uri: str) -> str:
    """Where a pipeline keeps its token shards: `<storage>/_data`, shared by every pipeline on that storage."""
    return storage.join(storage_uri, "_data")


@dataclass
class ShardIndex:
    key: str
    source: str
    seq_len: int
    dtype: str  # numpy dtype string, "<u2" or "<u4"
    vocab_size: int
    eos: Optional[int]
    tokenizer: str  # digest of the tokenizer's files
    shards: list[dict] = field(default_factory=list)  # [{"file": name, "sequences": n}, ...] in id order
    sequences: int = 0
    documents: int = 0  # documents read before the stream position
    offset: int = 0  # tokens of document `documents` already written
    exhausted: bool = False  # the source ended: no more sequences will ever come
    revision: Optional[str] = None  # hf: sources: the commit read (also in the key)
    state: Optional[dict] = None  # hf: {"documents": n <= documents, "hf": datasets' stream state after n documents}
    estimated_tokens: Optional[int] = None  # the whole source, extrapolated from the first shard (None: unknown)
    format: int = FORMAT

    @property
    def tokens(self) -> int:
        return self.sequences * self.seq_len

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)

    @classmethod
    def from_json(cls, text: str) -> ShardIndex:
        return cls(**json.loads(text))


def tokenizer_digest(directory: str) -> str:
    """Content hash of a tokenizer directory (local path or storage URI): its tokenizer files, names and bytes."""
    fs, path = storage.filesystem(directory)
    try:
        names = sorted(p.rsplit("/", 1)[-1] for p in fs.ls(path, detail=False))
    except FileNotFoundError:
        raise UserError(f"tokenizer {directory}: no such directory") from None
    wanted = [n for n in names if is_tokenizer_file(n)]
    if not wanted:
        raise UserError(f"tokenizer {directory}: no tokenizer files there (tokenizer.json, tokenizer.model, ...)")
    sha = hashlib.sha256()
    for name in wanted:
        sha.update(name.encode() + b"\0" + hashlib.sha256(fs.cat_file(f"{path.rstrip('/')}/{name}")).digest())
    return sha.hexdigest()


def shard_dir(data_root: str, ds: DataSource, tokenizer: str, seq_len: int) -> str:
    """The directory (path or URI) of the shards of `ds` tokenized by `tokenizer` (a tokenizer_digest) at seq_len."""
    from compressor.text_sources import source_identity

    key = digest({"format": FORMAT, "source": source_identity(ds), "tokenizer": tokenizer, "seq_len": seq_len})
    slug = re.sub(
        r"[^A-Za-z0-9._-]+",
        "-",
        ds.source.rstrip("/").rsplit("/", 1)[-1]
        if "://" in ds.source or ds.source.startswith(("/", ".", "~"))
        else ds.source,
    ).strip("-")[:48]
    return storage.join(data_root, f"{slug or 'data'}-L{seq_len}-{key[:12]}")


def read_index(directory: str) -> Optional[ShardIndex]:
    """The index of a shard directory, or None when there is none (nothing prepared yet)."""
    text = storage.read_text(storage.join(directory, INDEX))
    return None if text is None else ShardIndex.from_json(text)


def prepare(
    ds: DataSource,
    tokenizer_dir: str,
    seq_len: int,
    sequences: int,
    data_root: str,
    progress: Optional[Callable[[int], None]] = None,
    shard_bytes: int = SHARD_BYTES,
    check: Optional[Callable[[int], None]] = None,
) -> tuple[str, ShardIndex]:
    """(shard directory, index) holding at least `sequences` sequences of `ds`, or all the source has: reuses
    the shards there, extends them, or writes them. `progress(n)` is called with the sequences written so far;
    `check(estimated source tokens)` may raise to stop a budget the source cannot fit (see the module doc)."""
    tokenizer_key = tokenizer_digest(tokenizer_dir)
    directory = shard_dir(data_root, ds, tokenizer_key, seq_len)
    index = read_index(directory)
    if index is not None and (index.exhausted or index.sequences >= sequences):
        return directory, index
    if index is not None and index.estimated_tokens and check is not None:
        check(index.estimated_tokens)  # known from an earlier writer: refused before waiting for the lock
    from compressor.locks import holding

    # issue 14: one writer at a time. Two pipelines on the same data would otherwise both write an index, and the
    # last one (maybe the shorter) would win under a run that needs more. The second then finds the first's shards.
    with holding(directory, f"token shards {directory}"):
        return _prepare_alone(
            ds, tokenizer_dir, tokenizer_key, directory, seq_len, sequences, progress, shard_bytes, check
        )


def _prepare_alone(
    ds: DataSource,
    tokenizer_dir: str,
    tokenizer_key: str,
    directory: str,
    seq_len: int,
    sequences: int,
    progress: Optional[Callable[[int], None]],
    shard_bytes: int,
    check: Optional[Callable[[int], None]] = None,
) -> tuple[str, ShardIndex]:
    from compressor.models import load_tokenizer

    index = read_index(directory)
    if index is not None and (index.exhausted or index.sequences >= sequences):
        return directory, index
    tokenizer = load_tokenizer(tokenizer_dir)
    from compressor.text_sources import token_dtype

    if index is None:
        index = ShardIndex(
            key=directory.rsplit("/", 1)[-1],
            source=ds.source,
            seq_len=seq_len,
            dtype=token_dtype(tokenizer).newbyteorder("<").str,
            vocab_size=len(tokenizer),
            eos=tokenizer.eos_token_id,
            tokenizer=tokenizer_key,
            revision=ds.revision if ds.source.startswith("hf:") else None,
        )
    _Writer(directory, index, shard_bytes).extend(ds, tokenizer, sequences, progress, check)
    return directory, index


class _Writer:
    """Appends sequences to a shard directory from the index's stream position, one open shard file at a time."""

    def __init__(self, directory: str, index: ShardIndex, shard_bytes: int):
        self.directory, self.index = directory, index
        self.fs, self.root = storage.filesystem(directory)
        self.fs.makedirs(self.root, exist_ok=True)
        self.dtype = np.dtype(index.dtype)
        self.capacity = max(1, shard_bytes // (index.seq_len * self.dtype.itemsize))  # sequences per shard
        self.writer_id = uuid.uuid4().hex[:8]
        self.file, self.name, self.in_shard = None, "", 0
        self.state: Optional[dict] = index.state  # the stream's state at or before the current batch's start
        self.sample = [0, 0, 0]  # documents, their tokens and text bytes read: the estimate's sample
        self.estimate: Optional[Callable[[], Optional[int]]] = None

    def extend(
        self,
        ds: DataSource,
        tokenizer,
        wanted: int,
        progress: Optional[Callable[[int], None]],
        check: Optional[Callable[[int], None]] = None,
    ) -> None:
        from compressor.text_sources import document_batches, encode_batch, estimated_tokens, join_documents, prefetched

        index, seq_len = self.index, self.index.seq_len
        if index.estimated_tokens and check is not None:
            check(index.estimated_tokens)  # from an earlier writer: before reading anything
            check = None
        if index.estimated_tokens is None:
            self.estimate = lambda: estimated_tokens(ds, *self.sample)
        docs_before, first_offset = index.documents, index.offset
        carry = np.empty(0, dtype=self.dtype)
        for batch, after in prefetched(document_batches(ds, DOCUMENT_BATCH, index.documents, index.state)):
            token_lists = encode_batch(tokenizer, batch)
            token_lists[0] = token_lists[0][first_offset:]  # resuming inside a document
            tokens, lengths = join_documents(token_lists, index.eos, self.dtype)
            if self.estimate is not None:  # until the first shard closes
                self.sample[0] += len(batch)
                self.sample[1] += len(tokens)
                self.sample[2] += sum(len(t.encode("utf-8")) for t in batch)
            ends = np.cumsum(lengths)
            stream = np.concatenate([carry, tokens])

            def position(cut: int, docs_before=docs_before, first_offset=first_offset, ends=ends, carry=len(carry)):
                """(documents, offset) of the first token after `cut` tokens of `stream` (a cut past the carry)."""
                into = cut - carry
                doc = int(np.searchsorted(ends, into, side="right"))
                if doc == len(ends):
                    return docs_before + doc, 0
                return docs_before + doc, into - (int(ends[doc - 1]) if doc else 0) + (first_offset if doc == 0 else 0)

            take = min(len(stream) // seq_len, wanted - index.sequences)
            self._write(stream[: take * seq_len].reshape(take, seq_len), position)
            if index.estimated_tokens and check is not None:
                check(index.estimated_tokens)  # the first shard is written (and kept); is the source big enough?
                check = None
            if index.sequences >= wanted:
                self._close(position(take * seq_len))
                return
            carry = stream[take * seq_len :]
            docs_before, first_offset = docs_before + len(batch), 0
            self.state = after  # at `docs_before` now: a close inside the next batch resumes from here
            if progress is not None:
                progress(index.sequences)
        index.exhausted = True  # the tail, shorter than one sequence, is dropped
        self._close((docs_before, 0))

    def _write(self, rows: np.ndarray, position) -> None:
        done = 0
        while done < len(rows):
            if self.file is None:
                self.name = f"shard-{len(self.index.shards):05d}-{self.writer_id}.bin"
                self.file = self.fs.open(f"{self.root}/{self.name}", "wb")
            part = rows[done : done + self.capacity - self.in_shard]
            self.file.write(np.ascontiguousarray(part).tobytes())
            done += len(part)
            self.in_shard += len(part)
            self.index.sequences += len(part)
            if self.in_shard == self.capacity:
                self._close(position(done * self.index.seq_len))

    def _close(self, at: tuple[int, int]) -> None:
        """Close the open shard (if any), record it and the stream position `at`, and write the index."""
        if self.file is not None:
            self.file.close()
            self.index.shards.append({"file": self.name, "sequences": self.in_shard})
            self.file, self.in_shard = None, 0
            if self.estimate is not None:  # once, at the first shard this writer completes
                self.index.estimated_tokens, self.estimate = self.estimate(), None
        # `state` is at or before `at` (the start of the batch `at` falls in): resuming reads that batch again.
        self.index.documents, self.index.offset, self.index.state = (*at, self.state)
        storage.write_text(storage.join(self.directory, INDEX), self.index.to_json())


class ShardReader:
    """Reads sequences by global id from a shard directory (its index is read once)."""

    def __init__(self, directory: str):
        index = read_index(directory)
        if index is None:
            raise UserError(
                f"token shards {directory}: no {INDEX} there; prepare them first (`compressor data prepare`)"
            )
        self.directory, self.index = directory, index
        self.dtype = np.dtype(index.dtype)
        self.remote = storage.is_remote(directory)
        self.fs, self.root = storage.filesystem(directory)
        self.bounds = np.cumsum([0] + [s["sequences"] for s in index.shards])
        self._maps: OrderedDict[int, np.memmap] = OrderedDict()

    def __len__(self) -> int:
        return int(self.bounds[-1])

    @property
    def seq_len(self) -> int:
        return self.index.seq_len

    def read(self, ids) -> np.ndarray:
        """[len(ids), seq_len] tokens of the given global sequence ids, in that order."""
        ids = np.asarray(ids, dtype=np.int64)
        if len(ids) and (ids.min() < 0 or ids.max() >= len(self)):
            raise IndexError(f"sequence ids outside 0..{len(self) - 1} of {self.directory}")
        out = np.empty((len(ids), self.seq_len), dtype=self.dtype)
        shard_of = np.searchsorted(self.bounds, ids, side="right") - 1
        for shard in np.unique(shard_of):
            mask = shard_of == shard
            local = ids[mask] - self.bounds[shard]
            out[mask] = self._read_remote(int(shard), local) if self.remote else self._map(int(shard))[local]
        return out

    def _path(self, shard: int) -> str:
        return f"{self.root.rstrip('/')}/{self.index.shards[shard]['file']}"

    def _map(self, shard: int) -> np.memmap:
        if shard in self._maps:
            self._maps.move_to_end(shard)
            return self._maps[shard]
        rows = self.index.shards[shard]["sequences"]
        mapped = np.memmap(self._path(shard), dtype=self.dtype, mode="r", shape=(rows, self.seq_len))
        self._maps[shard] = mapped
        if len(self._maps) > OPEN_MAPS:
            self._maps.popitem(last=False)
        return mapped

    def _read_remote(self, shard: int, local: np.ndarray) -> np.ndarray:
        size = self.seq_len * self.dtype.itemsize
        path = self._path(shard)
        parts = self.fs.cat_ranges(
            [path] * len(local), [int(i) * size for i in local], [(int(i) + 1) * size for i in local]
        )
        return np.frombuffer(b"".join(parts), dtype=self.dtype).reshape(len(local), self.seq_len)
