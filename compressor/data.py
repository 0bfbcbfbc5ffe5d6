"""Data sources: local text / JSONL / parquet, `hf:` datasets, and `zoo:` reference corpora.

`load_texts` returns documents; `token_blocks` tokenizes, concatenates with EOS and cuts fixed-length
blocks, deterministic under the seed. torch is imported lazily."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

from compressor.config.schema import DataSource
from compressor.errors import UserError

if TYPE_CHECKING:  # pragma: no cover
    import torch

TEXT_SUFFIXES = {".txt", ".md", ".rst"}
SUPPORTED = ".txt/.md/.rst, .jsonl/.json, .parquet, a directory of them, hf:ORG/NAME[:CONFIG][@SPLIT], or zoo:NAME"


def parse_hf(source: str) -> tuple[str, str | None, str]:
    """`hf:allenai/c4:en@train` -> ("allenai/c4", "en", "train")."""
    spec = source[len("hf:"):]
    split = "train"
    if "@" in spec:
        spec, split = spec.rsplit("@", 1)
    name, _, config = spec.partition(":")
    return name, (config or None), split


def _files(path: Path) -> list[Path]:
    if path.is_dir():
        return sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
    return [path]


def _read_file(path: Path, field: str) -> Iterator[str]:
    suffix = path.suffix.lower()
    if suffix in TEXT_SUFFIXES:
        # Blank-line separated paragraphs are documents.
        for block in path.read_text(encoding="utf-8", errors="replace").split("\n\n"):
            if block.strip():
                yield block.strip()
    elif suffix in {".jsonl", ".json"}:
        with path.open(encoding="utf-8") as fh:
            for n, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise UserError(f"{path}:{n}: not valid JSON lines ({exc.msg})") from None
                if field not in row:
                    raise UserError(f"{path}:{n}: no field {field!r} (set `text_field` on the data source)")
                yield str(row[field])
    elif suffix == ".parquet":
        import pyarrow.parquet as pq

        table = pq.read_table(path)
        if field not in table.column_names:
            raise UserError(f"{path}: no column {field!r} (columns: {', '.join(table.column_names)})")
        yield from (str(t) for t in table.column(field).to_pylist())
    else:
        raise UserError(f"{path}: unsupported data file type {suffix!r}; use {SUPPORTED}")


def resolve_local(source: str) -> Path:
    """The local path behind a file or zoo source (zoo corpora are built on first use)."""
    if source.startswith("zoo:"):
        from compressor import zoo

        return zoo.corpus_dir(source[len("zoo:"):])
    path = Path(source).expanduser()
    if not path.exists():
        raise UserError(f"data source {source!r}: no such file or directory")
    return path


def load_texts(ds: DataSource) -> list[str]:
    if ds.source.startswith("hf:"):
        import datasets

        name, config, split = parse_hf(ds.source)
        try:
            rows = datasets.load_dataset(name, config, split=split, streaming=True)
        except Exception as exc:  # hub unreachable, unknown dataset, ...
            raise UserError(f"data source {ds.source!r}: could not load from the Hugging Face hub ({exc})") from None
        want = ds.samples * 4 if ds.samples else 10_000
        return [str(r[ds.text_field]) for _, r in zip(range(want), rows)]
    path = resolve_local(ds.source)
    if ds.source.startswith("zoo:"):
        path = path / f"{ds.split}.txt"
    texts = [t for f in _files(path) for t in _read_file(f, ds.text_field)]
    if not texts:
        raise UserError(f"data source {ds.source!r}: no text found")
    return texts


def token_blocks(ds: DataSource, tokenizer, samples: int | None = None, seq_len: int | None = None, seed: int = 0) -> "torch.Tensor":
    """Tokenize the source into `samples` blocks of `seq_len` tokens ([samples, seq_len] LongTensor).

    Documents are shuffled with the seed, joined with EOS and cut; with `samples=None`, every full block."""
    import torch

    seq_len = seq_len or ds.seq_len
    samples = samples or ds.samples
    texts = load_texts(ds)
    random.Random(seed).shuffle(texts)
    eos = tokenizer.eos_token_id
    stream: list[int] = []
    need = None if samples is None else samples * seq_len
    for text in texts:
        stream.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
        if eos is not None:
            stream.append(eos)
        if need is not None and len(stream) >= need:
            break
    n = len(stream) // seq_len
    if n == 0:
        raise UserError(f"data source {ds.source!r}: fewer than {seq_len} tokens; nothing to use")
    if samples is not None:
        n = min(n, samples)
    return torch.tensor(stream[: n * seq_len], dtype=torch.long).view(n, seq_len)
