"""Streaming document readers (text, JSONL, parquet, directories, object storage) and exact-count calibration blocks."""

import json

import pytest
import torch

from compressor import data
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
    from compressor.modeling import load_tokenizer

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
    from compressor.stages.context import StageContext

    ctx = StageContext(work_dir=tmp_path, data={"calib": DataSource(source="zoo:tiny-test", seq_len=128)}, quiet=True)
    blocks = ctx.calibration_blocks("calib", tokenizer, 50, None, 128, 1024, "prune")
    assert blocks.shape == (50, 128)
    with pytest.raises(UserError, match=r"prune calibration: .*1,000,000 sequences of 128 tokens"):
        ctx.calibration_blocks("calib", tokenizer, 1_000_000, None, 128, 1024, "prune")
