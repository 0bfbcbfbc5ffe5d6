"""From committed answers to the stage's dataset: filters, counts, review.md.

The committed shards are streamed in batch order; an answer is dropped when it is empty, truncated (with
`drop_truncated`), an exact duplicate of an earlier (prompt, answer) pair, misses `accept` or is outside `labels`.
The kept rows go to <work>/data/part-NNNNN.parquet (the stage's published dataset), and a seeded reservoir sample of
`review_samples` (prompt, answer) pairs to review.md. Memory: one shard at a time, plus 8 bytes per kept answer
for duplicate detection."""

from __future__ import annotations

import hashlib
import json
import random
import re
from pathlib import Path

from compressor import storage
from compressor.stages.generate.store import AnswerStore, answer_schema

ROWS_PER_PART = 50_000
DROPS = ("empty", "truncated", "duplicate", "accept", "labels")


def _drop_reason(row: dict, filters, accept, labels, seen: set) -> str | None:
    text = row["response"] or ""
    if filters.drop_empty and not text.strip():
        return "empty"
    if filters.drop_truncated and row["finish_reason"] == "length":
        return "truncated"
    if accept is not None and not accept.search(text):
        return "accept"
    if labels is not None and text.strip() not in labels:
        return "labels"
    if filters.dedupe:
        pair = json.dumps([row["messages"], text], ensure_ascii=False)
        digest = hashlib.blake2b(pair.encode(), digest_size=8).digest()
        if digest in seen:
            return "duplicate"
        seen.add(digest)
    return None


def finalize(store: AnswerStore, work_dir: Path, spec, seed: int) -> dict:
    """Write the dataset and review.md into `work_dir`; return the counts (answers, kept, dropped_<kind>, ...)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    out = Path(work_dir) / "data"
    out.mkdir(parents=True, exist_ok=True)
    filters = spec.filters
    accept = re.compile(filters.accept) if filters.accept else None
    labels = {label.strip() for label in filters.labels} if filters.labels is not None else None
    schema = answer_schema(bool(spec.logprobs))
    counts = {"answers": 0, "kept": 0, **{f"dropped_{d}": 0 for d in DROPS}}
    seen: set[bytes] = set()
    rng = random.Random(seed)
    review: list[dict] = []
    part, writer, in_part = 0, None, 0
    for uri in store.shard_paths():
        fs, path = storage.filesystem(uri)
        with fs.open(path, "rb") as fh:
            table = pq.read_table(fh, schema=schema)
        kept = []
        for row in table.to_pylist():
            counts["answers"] += 1
            reason = _drop_reason(row, filters, accept, labels, seen)
            if reason:
                counts[f"dropped_{reason}"] += 1
                continue
            kept.append(row)
            counts["kept"] += 1
            if len(review) < spec.review_samples:  # reservoir sampling: every kept answer equally likely
                review.append(row)
            elif spec.review_samples and (j := rng.randrange(counts["kept"])) < spec.review_samples:
                review[j] = row
        if kept:
            if writer is None:
                writer = pq.ParquetWriter(out / f"part-{part:05d}.parquet", schema)
            writer.write_table(pa.Table.from_pylist(kept, schema=schema))
            in_part += len(kept)
            if in_part >= ROWS_PER_PART:
                writer.close()
                writer, in_part, part = None, 0, part + 1
    if writer is not None:
        writer.close()
    if counts["kept"] == 0:  # an empty dataset is still a dataset: one file with the schema
        pq.write_table(schema.empty_table(), out / "part-00000.parquet")
    (Path(work_dir) / "review.md").write_text(review_markdown(review, counts))
    return counts


def review_markdown(pairs: list[dict], counts: dict) -> str:
    lines = [
        f"# Review: {len(pairs)} random (prompt, answer) pairs of {counts['kept']} kept",
        "",
        "Dropped: " + ", ".join(f"{d} {counts[f'dropped_{d}']}" for d in DROPS) + ".",
        "",
    ]
    for i, row in enumerate(pairs, 1):
        lines += [f"## {i}. `{row['id']}` ({row['finish_reason']}, {row['completion_tokens']} tokens)", ""]
        for m in row["messages"]:
            lines += [f"**{m['role']}:**", "", _quote(m["content"]), ""]
        lines += ["**answer:**", "", _quote(row["response"]), ""]
    return "\n".join(lines)


def _quote(text: str) -> str:
    return "\n".join(f"> {line}" for line in (text or "(empty)").splitlines() or [""])
