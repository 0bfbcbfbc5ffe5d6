"""The committed answers of a generate stage: never pay twice for one.

Layout under the store URI (a local path or a storage URI; beside the stage's pending directory):
    shards/b00000042-a0.parquet       the answers of prompt batch 42, attempt 0 (written first)
    index/b00000042-a0-f3.json        its commit record, written LAST: ids that failed (3 here), token usage, seconds

A shard without its index record is not committed (a run killed while writing it); the next attempt overwrites it.
The failure count is in the record's name, so one listing tells which batches are complete; only the records of
batches with failures are read (to send those prompts again). The worker that answered a batch commits it, from
whichever node it ran on."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Optional

from compressor import storage

RECORD_RE = re.compile(r"b(\d+)-a(\d+)-f(\d+)\.json$")


def answer_schema(logprobs: bool):
    import pyarrow as pa

    message = pa.struct([("role", pa.string()), ("content", pa.string())])
    fields = [
        ("id", pa.string()),
        ("messages", pa.list_(message)),
        ("response", pa.string()),
        ("finish_reason", pa.string()),
        ("prompt_tokens", pa.int64()),
        ("completion_tokens", pa.int64()),
    ]
    if logprobs:  # per answer token: up to k (token, logprob) alternatives, and the token the teacher chose
        alternative = pa.struct([("token", pa.string()), ("logprob", pa.float64())])
        fields.append(("top_logprobs", pa.list_(pa.list_(alternative))))
        fields.append(("answer_tokens", pa.list_(pa.string())))
    return pa.schema(fields)


@dataclass
class Committed:
    complete: set[int] = field(default_factory=set)  # batches whose every prompt has its answer(s)
    retry: dict[int, tuple[int, list[str]]] = field(default_factory=dict)  # batch -> (next attempt, failed ids)


class AnswerStore:
    def __init__(self, uri: str):
        self.uri = uri

    def _path(self, *parts: str) -> str:
        return storage.join(self.uri, *parts)

    def records(self) -> list[tuple[int, int, int, str]]:
        """(batch, attempt, failed, path) of every commit record, in batch and attempt order."""
        fs, root = storage.filesystem(self._path("index"))
        if not fs.exists(root):
            return []
        found = []
        for path in fs.ls(root, detail=False):
            m = RECORD_RE.search(path)
            if m:
                found.append((int(m.group(1)), int(m.group(2)), int(m.group(3)), path))
        return sorted(found)

    def committed(self) -> Committed:
        latest: dict[int, tuple[int, int, str]] = {}
        for k, attempt, failed, path in self.records():
            latest[k] = (attempt, failed, path)
        state = Committed()
        fs = storage.filesystem(self.uri)[0]
        for k, (attempt, failed, path) in latest.items():
            if failed == 0:
                state.complete.add(k)
            else:
                state.retry[k] = (attempt + 1, json.loads(fs.cat_file(path))["failed_ids"])
        return state

    def commit(self, k: int, attempt: int, rows: list[dict], failed: dict[str, str], usage: dict, logprobs: bool):
        """Write batch k's answers, then its record (the commit). `failed`: prompt id -> last error."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        name = f"b{k:08d}-a{attempt}"
        fs, shard = storage.filesystem(self._path("shards", f"{name}.parquet"))
        fs.makedirs(shard.rsplit("/", 1)[0], exist_ok=True)
        with fs.open(shard, "wb") as fh:
            pq.write_table(pa.Table.from_pylist(rows, schema=answer_schema(logprobs)), fh)
        record = {"batch": k, "attempt": attempt, "answers": len(rows), "failed_ids": sorted(failed)}
        record.update(usage=usage, errors=dict(list(failed.items())[:20]))
        storage.write_text(self._path("index", f"{name}-f{len(failed)}.json"), json.dumps(record))

    def shard_paths(self) -> list[str]:
        """Committed shards in batch and attempt order."""
        return [self._path("shards", f"b{k:08d}-a{a}.parquet") for k, a, _, _ in self.records()]

    def usage(self, limit: Optional[int] = None) -> dict:
        """Token usage and seconds summed over the commit records (the latest `limit` of them)."""
        fs = storage.filesystem(self.uri)[0]
        total = {"answers": 0, "prompts": 0, "prompt_tokens": 0, "completion_tokens": 0, "seconds": 0.0}
        records = self.records()
        for _, _, _, path in records[-limit:] if limit else records:
            record = json.loads(fs.cat_file(path))
            total["answers"] += record["answers"]
            for key in ("prompts", "prompt_tokens", "completion_tokens", "seconds"):
                total[key] += record["usage"].get(key, 0)
        return total

    def failed(self) -> dict[str, str]:
        """Prompt id -> error of every prompt whose latest attempt failed."""
        fs = storage.filesystem(self.uri)[0]
        latest: dict[int, str] = {}
        for k, _, failed, path in self.records():
            latest[k] = path if failed else ""
        out: dict[str, str] = {}
        for path in filter(None, latest.values()):
            record = json.loads(fs.cat_file(path))
            out.update({i: record["errors"].get(i, "failed") for i in record["failed_ids"]})
        return out
