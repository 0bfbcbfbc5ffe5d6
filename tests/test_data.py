"""Streaming document readers (text, JSONL, parquet, directories, object storage) and exact-count calibration blocks."""

import json

import pytest
import torch

from compressor import text_sources as data
from compressor.config.schema import DataSource
from compressor.errors import UserError

DOCS = [f"Document {i}: " + " ".join(f"word{j}" for j in range(i % 7 + 1)) for i in range(40)]


def write(path, docs, kind):
    if kind == "txt":
        path.write_text("\n\n".join(docs) + "\n")
    elif kind == "jsonl":
        path.write_text("\n".join(json.dumps({"text": d, "id": i}) for i, d in enumerate(docs)) + "\n")
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist([{"text": d} for d in docs]), path, row_group_size=7)
    return path


@pytest.mark.parametrize("kind", ["txt", "jsonl", "parquet"])
def test_each_format_streams_its_documents_in_order_and_skips(kind, tmp_path, monkeypatch):
    monkeypatch.setattr(data, "PARQUET_BATCH_ROWS", 5)  # several record batches per file
    path = write(tmp_path / f"corpus.{kind}", DOCS, kind)
    ds = DataSource(source=str(path))
    assert list(data.documents(ds)) == DOCS
    assert list(data.documents(ds, skip=13)) == DOCS[13:]


def test_text_paragraphs_are_read_line_by_line_and_long_ones_cut(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "MAX_DOCUMENT_CHARS", 50)
    path = tmp_path / "t.txt"
    path.write_text("first line\nsame paragraph\n\n\n\nsecond\n   \nthird\n\n" + "x" * 120)
    docs = list(data.documents(DataSource(source=str(path))))
    assert docs[:3] == ["first line\nsame paragraph", "second", "third"]
    assert "".join(docs[3:]) == "x" * 120 and all(len(d) <= 50 for d in docs[3:])  # one line, read in bounded pieces


def test_a_directory_is_read_file_by_file_and_skip_passes_whole_parquet_files(tmp_path):
    root = tmp_path / "dir"
    (root / "sub").mkdir(parents=True)
    write(root / "a.parquet", DOCS[:10], "parquet")
    write(root / "b.txt", DOCS[10:25], "txt")
    write(root / "sub" / "c.jsonl", DOCS[25:], "jsonl")
    (root / ".hidden.txt").write_text("never read")
    ds = DataSource(source=str(root))
    assert list(data.documents(ds)) == DOCS
    assert list(data.documents(ds, skip=12)) == DOCS[12:]


def test_bad_sources_are_user_errors(tmp_path):
    cases = {
        "missing": (tmp_path / "nope.txt", "no such file"),
        "empty": (tmp_path / "empty.txt", "no text found"),
        "type": (tmp_path / "x.csv", "unsupported data file type '.csv'"),
        "field": (tmp_path / "rows.jsonl", "no field 'text'"),
    }
    (tmp_path / "empty.txt").write_text("\n\n  \n")
    (tmp_path / "x.csv").write_text("a,b")
    (tmp_path / "rows.jsonl").write_text('{"body": "hello"}\n')
    for path, words in cases.values():
        with pytest.raises(UserError, match=words):
            list(data.documents(DataSource(source=str(path))))


def test_documents_stream_from_object_storage(s3, tmp_path):
    write(tmp_path / "part.jsonl", DOCS, "jsonl")
    s3.put(str(tmp_path / "part.jsonl"), "bucket/corpus/part.jsonl")
    assert list(data.documents(DataSource(source="s3://bucket/corpus"))) == DOCS


def test_source_identity_ignores_spelling_and_follows_the_files(tmp_path, monkeypatch):
    path = write(tmp_path / "c.txt", DOCS, "txt")
    monkeypatch.chdir(tmp_path)
    relative, absolute = DataSource(source="c.txt", samples=4), DataSource(source=str(path))
    assert data.source_identity(relative) == data.source_identity(absolute)  # samples and spelling do not matter
    assert data.normalized(relative).source == str(path)
    before = data.source_identity(absolute)
    path.write_text(path.read_text() + "\n\nOne more document.")
    assert data.source_identity(absolute) != before


# ----------------------------------------------------------------------------- calibration blocks
@pytest.fixture(scope="module")
def tokenizer(tiny_teacher):
    from compressor.models import load_tokenizer

    return load_tokenizer(tiny_teacher)


def test_calibration_gives_exactly_the_samples_asked_for_deterministically(tokenizer):
    ds = DataSource(source="zoo:tiny-test", seq_len=64)
    blocks = data.token_blocks(ds, tokenizer, samples=300, seq_len=64, seed=1)
    assert blocks.shape == (300, 64) and blocks.dtype == torch.long
    assert torch.equal(blocks, data.token_blocks(ds, tokenizer, samples=300, seq_len=64, seed=1))
    assert not torch.equal(blocks, data.token_blocks(ds, tokenizer, samples=300, seq_len=64, seed=2))
    # Every block is real text of the source: EOS separates documents, ids are in the vocabulary.
    assert (blocks == tokenizer.eos_token_id).any() and int(blocks.max()) < len(tokenizer)


def test_calibration_from_a_source_too_small_names_the_numbers(tokenizer, tmp_path):
    path = tmp_path / "small.txt"
    path.write_text("\n\n".join(DOCS))
    total = sum(len(tokenizer(d, add_special_tokens=False)["input_ids"]) + 1 for d in DOCS)
    ds = DataSource(source=str(path), seq_len=32)
    assert data.token_blocks(ds, tokenizer, samples=total // 32, seq_len=32).shape == (total // 32, 32)
    with pytest.raises(UserError) as err:
        data.token_blocks(ds, tokenizer, samples=total // 32 + 1, seq_len=32)
    message = str(err.value)
    assert f"{total // 32 + 1} sequences of 32 tokens ({(total // 32 + 1) * 32:,} tokens)" in message
    assert f"holds only {total:,} tokens ({total // 32} sequences)" in message and str(path) in message


def test_stage_calibration_is_exact_or_a_user_error_naming_the_stage(tokenizer, tmp_path):
    from compressor.contract.context import StageContext

    ctx = StageContext(work_dir=tmp_path, data={"calib": DataSource(source="zoo:tiny-test", seq_len=128)}, quiet=True)
    blocks = data.calibration_blocks(ctx, "calib", tokenizer, 50, None, 128, 1024, "prune")
    assert blocks.shape == (50, 128)
    with pytest.raises(UserError, match=r"prune calibration: .*1,000,000 sequences of 128 tokens"):
        data.calibration_blocks(ctx, "calib", tokenizer, 1_000_000, None, 128, 1024, "prune")


# ----------------------------------------------------------------------------- hf: sources (local files via `datasets`)
COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def local_hub(tmp_path, monkeypatch):
    """hf: sources streamed by `datasets` from 4 local JSONL files (4 stream shards) instead of the hub; `reads`
    holds the row number of every row the stream produced, `opens` the revision of every stream opened."""
    files = [str(write(tmp_path / f"part{i}.jsonl", DOCS[i * 10 : (i + 1) * 10], "jsonl")) for i in range(4)]
    hub = type("LocalHub", (), {"reads": [], "opens": [], "breaks": []})()

    def open_hf(name, config, split, revision):
        import datasets

        hub.opens.append(revision)
        rows = datasets.load_dataset("json", data_files=files, split="train", streaming=True)
        return Flaky(rows.map(lambda row: hub.reads.append(DOCS.index(row["text"])) or row), hub.breaks)

    monkeypatch.setattr(data, "_open_hf", open_hf)
    monkeypatch.setattr(data, "RETRY_DELAY_S", 0)
    return hub


class Flaky:
    """A `datasets` stream whose n-th opening breaks with a ConnectionError after `breaks[n]` rows (None: never)."""

    def __init__(self, rows, breaks: list):
        self.rows, self.breaks = rows, breaks

    def __getattr__(self, name):
        return getattr(self.rows, name)

    def __iter__(self):
        after = self.breaks.pop(0) if self.breaks else None
        for n, row in enumerate(self.rows):
            if n == after:
                raise ConnectionError("Connection reset by peer")
            yield row


def test_an_hf_stream_resumes_from_its_state_without_reading_earlier_rows(local_hub):
    ds = DataSource(source="hf:acme/corpus", revision=COMMIT)
    assert list(data.documents(ds)) == DOCS and local_hub.opens == [COMMIT]  # read at the commit
    batches = data.document_batches(ds, 6)
    for _ in range(3):
        _, state = next(batches)
    batches.close()
    assert state["documents"] == 18
    local_hub.reads.clear()
    # resume at document 20 from the state after 18: only the rows after 18 are read (2 of them skipped here)
    assert [t for b, _ in data.document_batches(ds, 6, skip=20, state=state) for t in b] == DOCS[20:]
    assert local_hub.reads == list(range(18, 40))
    local_hub.reads.clear()
    assert list(data.documents(ds, skip=20)) == DOCS[20:] and local_hub.reads == list(range(40))  # no state: all


def test_transient_errors_mid_stream_are_retried_from_the_last_batch_then_refused(local_hub):
    ds = DataSource(source="hf:acme/corpus", revision=COMMIT)
    local_hub.breaks.extend([15, 0, 7])  # three breaks: mid-batch, at once on re-opening, after another batch
    got = [(b, s["documents"]) for b, s in data.document_batches(ds, 6)]
    assert [t for b, _ in got for t in b] == DOCS and [n for _, n in got] == [6, 12, 18, 24, 30, 36, 40]
    assert len(local_hub.opens) == 4
    local_hub.breaks.extend([3] * (data.STREAM_RETRIES + 1))  # never gets past the first batch
    with pytest.raises(UserError, match=rf"reading failed {data.STREAM_RETRIES + 1} times in a row at document 0"):
        list(data.documents(ds))


def test_hf_sources_are_read_at_a_commit_that_keys_their_shards(monkeypatch, tmp_path):
    from pydantic import ValidationError

    from compressor import shards

    calls = []

    class Api:
        def dataset_info(self, name, revision=None):
            calls.append((name, revision))
            return type("Info", (), {"sha": "a" * 40})()

    monkeypatch.setattr("huggingface_hub.HfApi", Api)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False)
    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "HF_HUB_CACHE"):
        monkeypatch.delenv(name, raising=False)
    data._hf_commit.cache_clear()
    ds = DataSource(source="hf:acme/corpus:en@train")
    assert data.source_identity(ds) == {"text_field": "text", "source": ds.source, "revision": "a" * 40}
    assert data.normalized(ds).revision == "a" * 40 and calls == [("acme/corpus", None)]  # resolved once
    other = DataSource(source=ds.source, revision="b" * 40)  # a commit needs no look-up, and is other data
    assert data.source_identity(other)["revision"] == "b" * 40 and len(calls) == 1
    key = lambda d: shards.shard_dir(str(tmp_path), d, "tokenizer", 64)  # noqa: E731
    assert key(ds) == key(DataSource(source=ds.source, revision="a" * 40)) != key(other)

    # offline: the commit the local HF cache recorded for the branch or tag
    data._hf_commit.cache_clear()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    refs = tmp_path / "hub" / "datasets--acme--corpus" / "refs"
    refs.mkdir(parents=True)
    (refs / "v2").write_text("c" * 40 + "\n")
    assert data.hf_commit(DataSource(source=ds.source, revision="v2")) == "c" * 40
    with pytest.raises(UserError, match=r"revision 'main' to a commit in the local HF cache"):
        data.hf_commit(ds)
    data._hf_commit.cache_clear()

    # local sources: no revision, and their dumps (stage keys) and identities (shard keys) are as before it existed
    local = DataSource(source=str(write(tmp_path / "c.txt", DOCS, "txt")))
    assert "revision" not in local.model_dump() and "revision" not in data.source_identity(local)
    with pytest.raises(ValidationError, match="for hf: sources only"):
        DataSource(source=local.source, revision="main")


def test_source_extent_is_known_without_reading(tmp_path, monkeypatch):
    from types import SimpleNamespace

    splits = {"train": SimpleNamespace(num_examples=1234)}  # the hub's split info (dataset card)
    monkeypatch.setattr(data, "_open_hf", lambda *a: SimpleNamespace(info=SimpleNamespace(splits=splits)))
    assert data.source_extent(DataSource(source="hf:acme/corpus", revision=COMMIT)) == (1234, "documents")
    assert data.estimated_tokens(DataSource(source="hf:acme/corpus", revision=COMMIT), 10, 500, 0) == 1234 * 50
    (tmp_path / "p").mkdir()
    parquet = write(tmp_path / "p" / "a.parquet", DOCS, "parquet")
    assert data.source_extent(DataSource(source=str(parquet.parent))) == (len(DOCS), "documents")
    text = write(tmp_path / "c.txt", DOCS, "txt")
    assert data.source_extent(DataSource(source=str(text))) == (text.stat().st_size, "bytes")
