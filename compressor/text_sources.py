"""Data sources, read as streams of documents: local or remote (fsspec) text / JSONL / parquet files or directories
of them, `hf:` datasets (streaming) and `zoo:` reference corpora.

- `documents(ds, skip)` yields a source's documents one at a time, in a fixed order: text files paragraph by
  paragraph (blank lines separate documents), JSONL line by line, parquet record batch by record batch, hub datasets
  through `datasets` streaming. Nothing here holds a corpus in memory; the token shards of a distillation
  (compressor.shards) are written from this stream, in batches (`document_batches`) that carry the stream's state.
- `hf:` sources are read at one commit (`hf_commit`): a branch is resolved once, so a dataset updated upstream
  never splices two versions into one set of token shards. Their position is restored with `datasets`'
  `state_dict()` / `load_state_dict()`, not by reading the rows again.
- Remote streams (hub, object storage) survive transient errors: the stream is re-opened from its last batch,
  with exponential backoff, `STREAM_RETRIES` times in a row at most (then a UserError).
- `encode_batch` tokenizes a batch of documents with the fast tokenizer's batched (Rust, multi-threaded) call.
- `token_blocks` packs calibration / evaluation sequences in memory: exactly `samples` of them, or a UserError.

torch is imported lazily."""

from __future__ import annotations

import functools
import itertools
import json
import os
import queue
import random
import re
import sys
import threading
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import numpy as np

from compressor import storage
from compressor.config.schema import DataSource
from compressor.errors import UserError
from compressor.models.reference import is_zoo, zoo_name

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from compressor.contract.context import StageContext

TEXT_SUFFIXES = {".txt", ".md", ".rst"}
JSON_SUFFIXES = {".jsonl", ".json"}
SUPPORTED = ".txt/.md/.rst, .jsonl/.json, .parquet, a directory of them, hf:ORG/NAME[:CONFIG][@SPLIT], or zoo:NAME"
# A paragraph longer than this is cut into several documents, so one file without blank lines is not read whole.
MAX_DOCUMENT_CHARS = 1 << 22
PARQUET_BATCH_ROWS = 1024
SHUFFLE_BUFFER = 10_000  # documents; calibration draws from a seeded shuffle buffer of this size
ENCODE_BATCH = 256  # documents per batched tokenizer call
READ_BATCH = 64  # documents `documents` reads at a time (the unit a failed remote stream is re-opened from)
STREAM_RETRIES = 5  # failures in a row, each after a doubled wait, before a remote stream is given up
RETRY_DELAY_S = 2.0
COMMIT_RE = re.compile(r"^[0-9a-f]{40}$")
# Errors of a network read worth retrying (besides OSError, which covers requests' and aiohttp's connection errors and
# fsspec's timeouts), looked up only in modules already imported: one not imported cannot have raised.
TRANSIENT = ("requests.RequestException", "httpx.HTTPError", "httpx2.HTTPError", "aiohttp.ClientError")


def parse_hf(source: str) -> tuple[str, str | None, str]:
    """`hf:allenai/c4:en@train` -> ("allenai/c4", "en", "train")."""
    spec = source[len("hf:") :]
    split = "train"
    if "@" in spec:
        spec, split = spec.rsplit("@", 1)
    name, _, config = spec.partition(":")
    return name, (config or None), split


def hf_commit(ds: DataSource) -> str:
    """The commit an `hf:` source is read at: its `revision` if that is a commit, else that branch or tag (default
    branch if unset) resolved, once per process, on the hub or (HF_HUB_OFFLINE=1) in the local HF cache."""
    return _hf_commit(parse_hf(ds.source)[0], ds.revision)


def pinned(ds: DataSource) -> DataSource:
    """`ds` with an `hf:` source's revision replaced by its commit, so every process reads the same data."""
    return ds.model_copy(update={"revision": hf_commit(ds)}) if ds.source.startswith("hf:") else ds


@functools.cache
def _hf_commit(name: str, revision: Optional[str]) -> str:
    if revision is not None and COMMIT_RE.match(revision):
        return revision
    ref = revision or "main"
    from huggingface_hub import HfApi, constants

    # huggingface_hub reads its environment when imported: the variables set since count too
    offline = constants.HF_HUB_OFFLINE or any(
        os.environ.get(v, "").upper() in {"1", "ON", "YES", "TRUE"} for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
    )
    try:
        if offline:  # the commit the cache recorded for the ref when it was downloaded
            home = os.environ.get("HF_HOME")
            hub = os.environ.get("HF_HUB_CACHE") or (Path(home) / "hub" if home else constants.HF_HUB_CACHE)
            return (Path(hub) / f"datasets--{name.replace('/', '--')}" / "refs" / ref).read_text().strip()
        return HfApi().dataset_info(name, revision=revision).sha
    except Exception as exc:  # noqa: BLE001  (unknown dataset or revision, hub unreachable, not in the cache)
        where = "in the local HF cache (HF_HUB_OFFLINE is set)" if offline else "on the Hugging Face hub"
        raise UserError(
            f"data source hf:{name}: cannot resolve revision {ref!r} to a commit {where} ({exc}); set `revision` on "
            "the data source to a commit of the dataset"
        ) from None


def resolve_local(source: str) -> Path:
    """The local path behind a file or zoo source (zoo corpora are built on first use)."""
    if is_zoo(source):
        from compressor.models import zoo

        return zoo.corpus_dir(zoo_name(source))
    path = Path(source).expanduser()
    if not path.exists():
        raise UserError(f"data source {source!r}: no such file or directory")
    return path


def _location(ds: DataSource) -> str:
    """The file or directory (a local path or a storage URI) behind a file or zoo source."""
    if is_zoo(ds.source):
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
    if is_zoo(ds.source):
        from compressor.models import zoo

        return {**ident, "source": ds.source, "split": ds.split, "corpus": zoo.corpus_key(zoo_name(ds.source))}
    if ds.source.startswith("hf:"):  # the commit, not the branch: new upstream data is other data
        return {**ident, "source": ds.source, "revision": hf_commit(ds)}
    location = _location(ds)  # absolute: a relative spelling of the same files is the same source
    _, infos = _files(location)
    root = storage.filesystem(location)[1].rstrip("/")
    stamp = lambda i: str(i.get("mtime") or i.get("LastModified") or i.get("ETag") or i.get("created") or "")  # noqa: E731
    return {**ident, "source": location, "files": [[i["name"][len(root) :], i.get("size"), stamp(i)] for i in infos]}


def normalized(ds: DataSource) -> DataSource:
    """`ds` with a local path made absolute, so it means the same files in a process with another working directory
    (a Ray task); an `hf:` source pinned to its commit (`pinned`), so it means the same rows there."""
    if ds.source.startswith("hf:"):
        return pinned(ds)
    if is_zoo(ds.source) or storage.is_remote(ds.source):
        return ds
    return ds.model_copy(update={"source": str(Path(ds.source).expanduser().resolve())})


def documents(ds: DataSource, skip: int = 0) -> Iterator[str]:
    """The documents of a source in a fixed order, streamed, after the first `skip` of them. An empty source
    raises UserError("no text found")."""
    for batch, _ in document_batches(ds, READ_BATCH, skip):
        yield from batch


def document_batches(
    ds: DataSource, size: int, skip: int = 0, state: Optional[dict] = None
) -> Iterator[tuple[list[str], Optional[dict]]]:
    """(up to `size` documents, the stream's state after them) from document `skip` on. `state` is one such state
    recorded at or before `skip` (`hf:` sources: its `datasets` state is loaded instead of reading the rows before it;
    file sources have none and skip as `documents` does). A transient error of a remote stream re-opens it after
    the last batch handed out, waiting RETRY_DELAY_S, twice that, ...; STREAM_RETRIES failures in a row: UserError."""
    remote = ds.source.startswith("hf:") or storage.is_remote(ds.source)
    failures = 0
    while True:
        try:
            if ds.source.startswith("hf:"):
                stream = _hf_batches(ds, size, skip, state)
            else:
                stream = ((batch, None) for batch in batched(_file_documents(ds, skip), size))
            for batch, after in stream:
                yield batch, after
                skip, state, failures = skip + len(batch), after, 0
            return
        except Exception as exc:
            if not remote or not _transient(exc):
                raise
            if failures == STREAM_RETRIES:
                raise UserError(
                    f"data source {ds.source!r}: reading failed {failures + 1} times in a row at document {skip:,} "
                    f"({type(exc).__name__}: {exc}); what was written before is kept, and a re-run resumes there"
                ) from None
            delay = RETRY_DELAY_S * 2**failures
            failures += 1
            print(
                f"data source {ds.source}: {type(exc).__name__}: {exc}; re-opening at document {skip:,} in "
                f"{delay:g} s (retry {failures}/{STREAM_RETRIES})",
                file=sys.stderr,
                flush=True,
            )
            time.sleep(delay)


def _transient(exc: BaseException) -> bool:
    """A network hiccup (connection, timeout, server error), not a bad request or bad data."""
    status = getattr(getattr(exc, "response", None), "status_code", None)
    if isinstance(status, int) and 400 <= status < 500 and status not in (408, 429):
        return False  # not found, forbidden, ...: retrying gives the same answer
    kinds = [OSError]
    for spec in TRANSIENT:
        module, _, name = spec.rpartition(".")
        kind = getattr(sys.modules.get(module), name, None)
        if isinstance(kind, type):
            kinds.append(kind)
    return isinstance(exc, tuple(kinds))


def _file_documents(ds: DataSource, skip: int) -> Iterator[str]:
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


def as_text(value, where: str, field: str) -> str:
    """A document's text. Chat turns (a list of {role, content}) or other structures are refused rather than
    trained on as their Python repr: distill reads plain text."""
    if isinstance(value, (list, dict)):
        what = "chat turns" if isinstance(value, list) and all(isinstance(t, dict) for t in value) else "a structure"
        raise UserError(
            f"{where}: field {field!r} holds {what}, not text; distill trains on plain text, so set `text_field` on "
            "the data source to a column of text"
        )
    return str(value)


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
        yield as_text(row[field], f"{name}:{n}", field)


def _parquet_documents(parquet, name: str, field: str) -> Iterator[str]:
    columns = parquet.schema_arrow.names
    if field not in columns:
        raise UserError(
            f"{name}: no column {field!r} (columns: {', '.join(columns)}); set `text_field` on the data source"
        )
    row = 0
    for batch in parquet.iter_batches(batch_size=PARQUET_BATCH_ROWS, columns=[field]):
        for value in batch.column(0).to_pylist():
            row += 1
            yield as_text(value, f"{name} row {row}", field)


def _open_hf(name: str, config: Optional[str], split: str, revision: str):
    """The `datasets` stream of a hub dataset at a commit (a seam for tests)."""
    import datasets

    return datasets.load_dataset(name, config, split=split, revision=revision, streaming=True)


def _hf_stream(ds: DataSource):
    name, config, split = parse_hf(ds.source)
    try:
        return _open_hf(name, config, split, hf_commit(ds))
    except UserError:
        raise
    except Exception as exc:  # hub unreachable (retried by the caller), unknown dataset, ...
        if _transient(exc):
            raise
        raise UserError(f"data source {ds.source!r}: could not load from the Hugging Face hub ({exc})") from None


def _hf_batches(ds: DataSource, size: int, skip: int, state: Optional[dict]) -> Iterator[tuple[list[str], dict]]:
    rows = _hf_stream(ds)
    seen = 0
    if state is not None and state["documents"] <= skip:
        rows.load_state_dict(state["hf"])  # `datasets` goes to that shard and row: earlier files are not read again
        seen = state["documents"]
    batch: list[str] = []
    for row in rows:
        if ds.text_field not in row:
            raise UserError(
                f"data source {ds.source!r}: no field {ds.text_field!r} (fields: {', '.join(row)}); "
                "set `text_field` on the data source"
            )
        seen += 1
        if seen <= skip:  # only the rows since `state`: less than one batch of the shard writer
            continue
        batch.append(as_text(row[ds.text_field], f"data source {ds.source!r} row {seen}", ds.text_field))
        if len(batch) == size:
            # the state after the row just read (state_dict() is "the state at the latest example it yielded")
            yield batch, {"documents": seen, "hf": rows.state_dict()}
            batch = []
    if batch:
        yield batch, {"documents": seen, "hf": rows.state_dict()}
    if seen == 0:
        raise UserError(f"data source {ds.source!r}: no text found")


def source_extent(ds: DataSource) -> Optional[tuple[int, str]]:
    """How large the source is, known without reading it: (rows, "documents") from the hub's split info or parquet
    footers, or (bytes, "bytes") of text / JSONL files; None when unknown (no split info, mixed file types)."""
    if ds.source.startswith("hf:"):
        splits = getattr(_hf_stream(ds).info, "splits", None) or {}
        info = splits.get(parse_hf(ds.source)[2])
        rows = getattr(info, "num_examples", None)
        return (int(rows), "documents") if rows else None
    fs, infos = _files(_location(ds))
    parquet = [i for i in infos if i["name"].lower().endswith(".parquet")]
    if not parquet:
        return sum(int(i.get("size") or 0) for i in infos), "bytes"
    if len(parquet) < len(infos):
        return None
    import pyarrow.parquet as pq

    rows = 0
    for info in parquet:  # the footer only
        with fs.open(info["name"], "rb") as fh:
            rows += pq.ParquetFile(fh).metadata.num_rows
    return rows, "documents"


def estimated_tokens(ds: DataSource, documents: int, tokens: int, text_bytes: int) -> Optional[int]:
    """The source's tokens, extrapolated from a sample of `documents` read (`tokens`, `text_bytes` in them) to its
    `source_extent`. JSONL files' bytes hold more than the text, so their estimate errs large (never refuses wrongly)."""
    try:
        extent = source_extent(ds) if documents and tokens else None
    except Exception:  # noqa: BLE001  (an estimate only: the hub's info unreachable must not stop the writer)
        extent = None
    if extent is None:
        return None
    amount, unit = extent
    per = documents if unit == "documents" else text_bytes
    return int(tokens / per * amount) if per else None


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


def calibration_blocks(
    ctx: StageContext,
    name: Optional[str],
    tokenizer,
    samples: Optional[int],
    seq_len: Optional[int],
    max_positions: Optional[int],
    default_samples: int,
    stage: str,
) -> torch.Tensor:
    """A stage's calibration: exactly `samples` [samples, seq_len] token blocks of its data source `name` (UserError
    naming the stage and the numbers when the source is too small); the stage's own samples/seq_len win over the
    source's, and seq_len is capped at the model's context (`max_positions`)."""
    source = ctx.data_source(name)
    seq_len = seq_len or source.seq_len
    if max_positions and seq_len > max_positions:
        ctx.info(f"{stage}: seq_len {seq_len} is beyond the model's max_position_embeddings; using {max_positions}")
        seq_len = max_positions
    samples = samples or source.samples or default_samples
    try:
        return token_blocks(source, tokenizer, samples, seq_len, ctx.seed)
    except UserError as exc:
        raise UserError(f"{stage} calibration: {exc}") from None


def first_sequence_check(ds: DataSource, tokenizer, seq_len: int) -> None:
    """Cheap early check that the source exists, has text and holds at least one sequence of `seq_len` tokens:
    reads only as many documents as that takes."""
    have = 0
    for text in documents(ds):
        have += len(encode_batch(tokenizer, [text])[0]) + (tokenizer.eos_token_id is not None)
        if have >= seq_len:
            return
    raise UserError(f"data source {ds.source!r}: fewer than {seq_len} tokens; nothing to use")
