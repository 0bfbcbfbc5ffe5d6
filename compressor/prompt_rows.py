"""Prompts, streamed from a data source (.jsonl / .parquet file or directory, local or on storage, or `hf:`): what the
generate stage answers, what chat data (compressor.chat_data) is made of, what preflight checks.

A row has a `messages` column (OpenAI chat format: a list of {role, content}) or a `prompt` column with an optional
`system` column, and an optional `id` column (used as is; without one the id is a hash of the messages).

`scan` reads the source once, in order, validating every row (a malformed one is a UserError naming the file and
line or row), and yields one small descriptor per batch of `size` consecutive prompts: where the batch starts
(a byte offset, a parquet row, a `datasets` stream state). Batch k is the same prompts in every run over the same
source, so "batch k is committed" is all a re-run needs to know, and `read(ds, descriptor)` lets whichever worker
answers batch k read its prompts from storage itself: no process ever holds the prompts as a list."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Optional

from compressor import storage
from compressor.config.schema import DataSource
from compressor.errors import UserError

ROLES = ("system", "user", "assistant", "tool", "developer")
PARQUET_BATCH_ROWS = 1024


def prompt_id(messages: list[dict]) -> str:
    """The id of a prompt without an `id` column: a hash of its messages (the test server computes it too)."""
    text = json.dumps([[m["role"], m["content"]] for m in messages], ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def normalize(row: Any, where: str) -> dict:
    """{id, messages} of one source row, or a UserError naming `where` (file:line) and the field."""
    if not isinstance(row, dict):
        raise UserError(f"{where}: a prompt row must be an object with a `messages` or `prompt` field")
    if row.get("messages") is not None:
        messages = row["messages"]
        if not isinstance(messages, list) or not messages:
            raise UserError(f"{where}: `messages` must be a non-empty list of {{role, content}} objects")
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
                raise UserError(
                    f"{where}: messages[{i}] must be {{role, content}} with role one of {', '.join(ROLES)} and "
                    "text content"
                )
        messages = [{"role": m["role"], "content": m["content"]} for m in messages]
    elif row.get("prompt") is not None:
        if not isinstance(row["prompt"], str) or not isinstance(row.get("system") or "", str):
            raise UserError(f"{where}: `prompt` (and `system`, when given) must be text")
        system = [{"role": "system", "content": row["system"]}] if row.get("system") else []
        messages = [*system, {"role": "user", "content": row["prompt"]}]
    else:
        raise UserError(
            f"{where}: no `messages` or `prompt` field (fields: {', '.join(map(str, row)) or 'none'}); give the chat "
            "messages as `messages` [{role, content}, ...] or the text as `prompt` (+ optional `system`)"
        )
    ident = row.get("id")
    return {"id": str(ident) if ident is not None else prompt_id(messages), "messages": messages}


def _files(ds: DataSource) -> list[tuple[Any, str]]:
    from compressor.text_sources import _location

    location = _location(ds)  # zoo:, missing paths and remote URIs handled as for any data source
    fs, path = storage.filesystem(location)
    names = sorted(p for p in fs.find(path) if not Path(p).name.startswith(".")) if fs.isdir(path) else [path]
    for name in names:
        if Path(name).suffix.lower() not in (".jsonl", ".json", ".parquet"):
            raise UserError(f"{name}: prompts are read from .jsonl or .parquet files (or hf: datasets)")
    if not names:
        raise UserError(f"data source {ds.source!r}: no .jsonl or .parquet files there")
    return [(fs, name) for name in names]


def scan(ds: DataSource, size: int) -> Iterator[tuple[dict, list[dict]]]:
    """(descriptor, its prompts) for batch 0, 1, ... of `size` prompts (a batch never spans two files)."""
    k = 0
    if ds.source.startswith("hf:"):
        for start, state, rows in _hf_batches(ds, size):
            yield {"k": k, "hf_start": start, "hf_state": state, "rows": len(rows)}, rows
            k += 1
        if k == 0:
            raise UserError(f"data source {ds.source!r}: no prompts found")
        return
    for fs, name in _files(ds):
        if name.lower().endswith(".parquet"):
            batches = _parquet_batches(fs, name, size)
        else:
            batches = _jsonl_batches(fs, name, size)
        for where, rows in batches:
            yield {"k": k, "file": name, **where, "rows": len(rows)}, rows
            k += 1
    if k == 0:
        raise UserError(f"data source {ds.source!r}: no prompts found")


def read(ds: DataSource, desc: dict) -> list[dict]:
    """The prompts of one batch that `scan` described."""
    if "hf_start" in desc:
        return next(iter(_hf_batches(ds, desc["rows"], desc["hf_start"], desc["hf_state"])))[2]
    fs, name = storage.filesystem(desc["file"])[0], desc["file"]
    if "offset" in desc:
        return next(iter(_jsonl_batches(fs, name, desc["rows"], desc["offset"], desc["line"])))[1]
    return next(iter(_parquet_batches(fs, name, desc["rows"], desc["row"])))[1]


def _jsonl_batches(fs, name: str, size: int, offset: int = 0, line: int = 1) -> Iterator[tuple[dict, list[dict]]]:
    rows: list[dict] = []
    start = {"offset": offset, "line": line}
    with fs.open(name, "rb") as fh:
        fh.seek(offset)
        for raw in iter(fh.readline, b""):
            here, offset, line = line, offset + len(raw), line + 1
            if not raw.strip():
                if not rows:
                    start = {"offset": offset, "line": line}
                continue
            try:
                row = json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                raise UserError(f"{name}:{here}: not valid JSON ({getattr(exc, 'msg', exc)})") from None
            rows.append(normalize(row, f"{name}:{here}"))
            if len(rows) == size:
                yield start, rows
                rows, start = [], {"offset": offset, "line": line}
    if rows:
        yield start, rows


def _parquet_batches(fs, name: str, size: int, first: int = 0) -> Iterator[tuple[dict, list[dict]]]:
    import pyarrow.parquet as pq

    with fs.open(name, "rb") as fh:
        parquet = pq.ParquetFile(fh)
        columns = parquet.schema_arrow.names
        if "messages" not in columns and "prompt" not in columns:
            raise UserError(
                f"{name}: no `messages` or `prompt` column (columns: {', '.join(columns)}); give the chat messages "
                "as `messages` [{role, content}, ...] or the text as `prompt` (+ optional `system`)"
            )
        wanted = [c for c in ("id", "messages", "prompt", "system") if c in columns]
        rows: list[dict] = []
        seen, start = 0, first
        for group in range(parquet.num_row_groups):
            count = parquet.metadata.row_group(group).num_rows
            if seen + count <= first:  # a worker reading batch k skips whole row groups before it unread
                seen += count
                continue
            for record in parquet.read_row_group(group, columns=wanted).to_pylist():
                seen += 1
                if seen <= first:
                    continue
                rows.append(normalize(record, f"{name}: row {seen}"))
                if len(rows) == size:
                    yield {"row": start}, rows
                    rows, start = [], seen
    if rows:
        yield {"row": start}, rows


def _hf_batches(ds: DataSource, size: int, start: int = 0, state: Optional[dict] = None):
    """(first row number, the stream state before it, rows) of an `hf:` dataset, resumed from `state`."""
    from compressor.text_sources import _hf_stream

    stream = _hf_stream(ds)
    if state is not None:
        stream.load_state_dict(state)
    rows: list[dict] = []
    before, seen = state, start
    for record in stream:
        seen += 1
        rows.append(normalize(record, f"{ds.source}: row {seen}"))
        if len(rows) == size:
            yield seen - size, before, rows
            rows, before = [], stream.state_dict()
    if rows:
        yield seen - len(rows), before, rows
