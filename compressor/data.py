"""Data sources, read as streams of documents: local or remote (fsspec) text / JSONL / parquet files or directories
of them, `hf:` datasets (streaming) and `zoo:` reference corpora.

- `documents(ds, skip)` yields a source's documents one at a time, in a fixed order: text files paragraph by
  paragraph (blank lines separate documents), JSONL line by line, parquet record batch by record batch, hub datasets
  through `datasets` streaming. Nothing here holds a corpus in memory; the token shards of a distillation
  (compressor.shards) are written from this stream.
- `encode_batch` tokenizes a batch of documents with the fast tokenizer's batched (Rust, multi-threaded) call.
- `token_blocks` packs calibration / evaluation sequences in memory: exactly `samples` of them, or a UserError.

torch is imported lazily."""

from __future__ import annotations

import itertools
import json
import queue
import random
import threading
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import numpy as np

from compressor import storage
from compressor.config.schema import DataSource
from compressor.errors import UserError

if TYPE_CHECKING:  # pragma: no cover
    import torch

TEXT_SUFFIXES = {".txt", ".md", ".rst"}
JSON_SUFFIXES = {".jsonl", ".json"}
SUPPORTED = ".txt/.md/.rst, .jsonl/.json, .parquet, a directory of them, hf:ORG/NAME[:CONFIG][@SPLIT], or zoo:NAME"
# A paragraph longer than this is cut into several documents, so one file without blank lines is not read whole.
MAX_DOCUMENT_CHARS = 1 << 22
PARQUET_BATCH_ROWS = 1024
SHUFFLE_BUFFER = 10_000  # documents; calibration draws from a seeded shuffle buffer of this size
ENCODE_BATCH = 256  # documents per batched tokenizer call


def parse_hf(source: str) -> tuple[str, str | None, str]:
    """`hf:allenai/c4:en@train` -> ("allenai/c4", "en", "train")."""
    spec = source[len("hf:") :]
    split = "train"
    if "@" in spec:
        spec, split = spec.rsplit("@", 1)
    name, _, config = spec.partition(":")
    return name, (config or None), split


def resolve_local(source: str) -> Path:
    """The local path behind a file or zoo source (zoo corpora are built on first use)."""
    if source.startswith("zoo:"):
        from compressor import zoo

        return zoo.corpus_dir(source[len("zoo:") :])
    path = Path(source).expanduser()
    if not path.exists():
        raise UserError(f"data source {source!r}: no such file or directory")
    return path


def _location(ds: DataSource) -> str:
    """The file or directory (a local path or a storage URI) behind a file or zoo source."""
    if ds.source.startswith("zoo:"):
        return str(resolve_local(ds.source) / f"{ds.split}.txt")
    if storage.is_remote(ds.source):
        fs, path = storage.filesystem(ds.source)
        if not fs.exists(path):
            raise UserError(f"data source {ds.source!r}: no such file or directory")
        return ds.source
    return str(resolve_local(ds.source).resolve())


def _files(location: str) -> tuple[object, list[dict]]:
    """(filesystem, [fsspec info of each data file]) in a fixed order; hidden files are skipped."""
    fs, path = storage.filesystem(location)
    if fs.isdir(path):
        found = fs.find(path, detail=True)
        infos = [found[p] for p in sorted(found) if not any(part.startswith(".") for part in p[len(path) :].split("/"))]
    else:
        infos = [fs.info(path)]
    for info in infos:
        suffix = Path(info["name"]).suffix.lower()
        if suffix not in TEXT_SUFFIXES | JSON_SUFFIXES | {".parquet"}:
            raise UserError(f"{info['name']}: unsupported data file type {suffix!r}; use {SUPPORTED}")
    return fs, infos


def source_identity(ds: DataSource) -> dict:
    """What the documents of `ds` depend on, for content keys (token shards): the source and its fields, plus
    each file's name, size and modification stamp (a file edited in place is other data); zoo corpora by their key."""
    ident = {"text_field": ds.text_field}
    if ds.source.startswith("zoo:"):
        from compressor import zoo

        return {**ident, "source": ds.source, "split": ds.split, "corpus": zoo.corpus_key(ds.source[len("zoo:") :])}
    if ds.source.startswith("hf:"):
        return {**ident, "source": ds.source}
    location = _location(ds)  # absolute: a relative spelling of the same files is the same source
    _, infos = _files(location)
    root = storage.filesystem(location)[1].rstrip("/")
    stamp = lambda i: str(i.get("mtime") or i.get("LastModified") or i.get("ETag") or i.get("created") or "")  # noqa: E731
    return {**ident, "source": location, "files": [[i["name"][len(root) :], i.get("size"), stamp(i)] for i in infos]}


def normalized(ds: DataSource) -> DataSource:
    """`ds` with a local path made absolute, so it means the same files in a process with another working directory
    (a Ray task)."""
    if ds.source.startswith(("zoo:", "hf:")) or storage.is_remote(ds.source):
        return ds
    return ds.model_copy(update={"source": str(Path(ds.source).expanduser().resolve())})


def documents(ds: DataSource, skip: int = 0) -> Iterator[str]:
    """The documents of a source in a fixed order, streamed, after the first `skip` of them. An empty source
    raises UserError("no text found")."""
    if ds.source.startswith("hf:"):
        yield from _hf_documents(ds, skip)
        return
    fs, infos = _files(_location(ds))
    seen = 0
    for info in infos:
        name = info["name"]
        if name.lower().endswith(".parquet"):
            import pyarrow.parquet as pq

            with fs.open(name, "rb") as fh:
                parquet = pq.ParquetFile(fh)
                rows = parquet.metadata.num_rows
                if seen + rows <= skip:  # extending shards: skip whole files without reading them
                    seen += rows
                    continue
                stream = _parquet_documents(parquet, name, ds.text_field)
                seen = yield from _after(stream, skip, seen)
        else:
            reader = _paragraphs if Path(name).suffix.lower() in TEXT_SUFFIXES else _json_lines
            with fs.open(name, "rt", encoding="utf-8", errors="replace") as fh:
                seen = yield from _after(reader(fh, name, ds.text_field), skip, seen)
    if seen == 0:
        raise UserError(f"data source {ds.source!r}: no text found")


def _after(stream: Iterable[str], skip: int, seen: int):
    """Yield the documents of `stream` whose running number is at least `skip`; return the new running count."""
    for text in stream:
        if seen >= skip:
            yield text
        seen += 1
    return seen


def _paragraphs(fh, name: str, field: str) -> Iterator[str]:
    lines: list[str] = []
    size = 0
    # readline with a limit: a file without line breaks is still read in bounded pieces.
    for line in iter(lambda: fh.readline(MAX_DOCUMENT_CHARS), ""):
        if line.strip():
            lines.append(line)
            size += len(line)
            if size < MAX_DOCUMENT_CHARS:
                continue
        if lines:
            yield "".join(lines).strip()
            lines, size = [], 0
    if lines:
        yield "".join(lines).strip()


def _json_lines(fh, name: str, field: str) -> Iterator[str]:
    for n, line in enumerate(fh, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise UserError(f"{name}:{n}: not valid JSON lines ({exc.msg})") from None
        if not isinstance(row, dict) or field not in row:
            raise UserError(f"{name}:{n}: no field {field!r} (set `text_field` on the data source)")
        yield str(row[field])


def _parquet_documents(parquet, name: str, field: str) -> Iterator[str]:
    columns = parquet.schema_arrow.names
    if field not in columns:
        raise UserError(
            f"{name}: no column {field!r} (columns: {', '.join(columns)}); set `text_field` on the data source"
        )
    for batch in parquet.iter_batches(batch_size=PARQUET_BATCH_ROWS, columns=[field]):
        yield from (str(t) for t in batch.column(0).to_pylist())


def _hf_documents(ds: DataSource, skip: int) -> Iterator[str]:
    import datasets

    name, config, split = parse_hf(ds.source)
    try:
        rows = datasets.load_dataset(name, config, split=split, streaming=True)
    except Exception as exc:  # hub unreachable, unknown dataset, ...
        raise UserError(f"data source {ds.source!r}: could not load from the Hugging Face hub ({exc})") from None
    if skip:
        rows = rows.skip(skip)
    seen = 0
    for row in rows:
        if ds.text_field not in row:
            raise UserError(
                f"data source {ds.source!r}: no field {ds.text_field!r} (fields: {', '.join(row)}); "
                "set `text_field` on the data source"
            )
        seen += 1
        yield str(row[ds.text_field])
    if seen == 0 and skip == 0:
        raise UserError(f"data source {ds.source!r}: no text found")


def batched(items: Iterable, size: int) -> Iterator[list]:
    iterator = iter(items)
    while batch := list(itertools.islice(iterator, size)):
        yield batch


def prefetched(items: Iterable, depth: int = 2) -> Iterator:
    """`items`, produced by a background thread up to `depth` ahead: reading the next documents overlaps the batched
    tokenizer call, which releases the GIL. The producer's exceptions are raised here; stopping early stops it."""
    slots: queue.Queue = queue.Queue(maxsize=depth)
    stop, end = threading.Event(), object()

    def put(entry) -> bool:
        while not stop.is_set():
            try:
                slots.put(entry, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in items:
                if not put((item, None)):
                    return
            put((end, None))
        except BaseException as exc:  # noqa: BLE001  (handed to the consumer)
            put((end, exc))

    threading.Thread(target=produce, name="documents", daemon=True).start()
    try:
        while True:
            item, error = slots.get()
            if item is end:
                if error is not None:
                    raise error
                return
            yield item
    finally:
        stop.set()


def encode_batch(tokenizer, texts: list[str]) -> list[list[int]]:
    """Token ids of each text, without special tokens. A fast tokenizer's Rust backend encodes the batch on all cores
    (and skips the per-token offsets transformers would compute); slow tokenizers go through their Python call."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        return [e.ids for e in backend.encode_batch_fast(texts, add_special_tokens=False)]
    return tokenizer(texts, add_special_tokens=False)["input_ids"]


def token_dtype(tokenizer) -> np.dtype:
    """uint16 when every token id fits (vocabularies up to 65,536), else uint32 (Llama-3's 128k)."""
    return np.dtype(np.uint16) if len(tokenizer) <= 1 << 16 else np.dtype(np.uint32)


def join_documents(token_lists: list[list[int]], eos: Optional[int], dtype) -> tuple[np.ndarray, np.ndarray]:
    """(the documents' tokens concatenated, each followed by EOS; each document's length including its EOS)."""
    tail = [] if eos is None else [eos]
    lengths = np.fromiter((len(t) + len(tail) for t in token_lists), dtype=np.int64, count=len(token_lists))
    flat = np.fromiter(
        itertools.chain.from_iterable(t + tail for t in token_lists), dtype=dtype, count=int(lengths.sum())
    )
    return flat, lengths


def shuffled(items: Iterable[str], seed: int, buffer: int = SHUFFLE_BUFFER) -> Iterator[str]:
    """A seeded shuffle through a bounded buffer: a full shuffle for sources up to `buffer` documents."""
    rng = random.Random(seed)
    pool: list[str] = []
    for item in items:
        if len(pool) < buffer:
            pool.append(item)
            continue
        i = rng.randrange(buffer)
        yield pool[i]
        pool[i] = item
    rng.shuffle(pool)
    yield from pool


def token_blocks(
    ds: DataSource, tokenizer, samples: int | None = None, seq_len: int | None = None, seed: int = 0
) -> torch.Tensor:
    """Exactly `samples` blocks of `seq_len` tokens ([samples, seq_len] LongTensor) for calibration or evaluation:
    documents in a seeded shuffle (`shuffled`), joined with EOS, cut; reading stops once the blocks are there.
    A source too small raises UserError naming the numbers. With `samples=None` (and no `samples` on the source),
    every full block of the source: for small held-out sets only."""
    import torch

    seq_len = seq_len or ds.seq_len
    samples = samples or ds.samples
    need = None if samples is None else samples * seq_len
    dtype = np.dtype(np.int64)
    pieces, have = [], 0
    for batch in batched(shuffled(documents(ds), seed), ENCODE_BATCH):
        flat, _ = join_documents(encode_batch(tokenizer, batch), tokenizer.eos_token_id, dtype)
        pieces.append(flat)
        have += len(flat)
        if need is not None and have >= need:
            break
    n = have // seq_len
    if n == 0:
        raise UserError(f"data source {ds.source!r}: fewer than {seq_len} tokens; nothing to use")
    if samples is not None and n < samples:
        raise UserError(
            f"data source {ds.source!r}: {samples:,} sequences of {seq_len} tokens ({need:,} tokens) were asked for, "
            f"but the source holds only {have:,} tokens ({n:,} sequences); lower `samples` or `seq_len`, or use a "
            "larger source"
        )
    n = n if samples is None else samples
    return torch.from_numpy(np.concatenate(pieces)[: n * seq_len].reshape(n, seq_len))


def first_sequence_check(ds: DataSource, tokenizer, seq_len: int) -> None:
    """Cheap early check that the source exists, has text and holds at least one sequence of `seq_len` tokens:
    reads only as many documents as that takes."""
    have = 0
    for text in documents(ds):
        have += len(encode_batch(tokenizer, [text])[0]) + (tokenizer.eos_token_id is not None)
        if have >= seq_len:
            return
    raise UserError(f"data source {ds.source!r}: fewer than {seq_len} tokens; nothing to use")
