"""Token shards: written from a document stream, read back by global sequence id (memory-mapped or range-read from
object storage), reused by a second request, extended by a larger one, resumable after an interrupted writer."""

import json
from pathlib import Path

import numpy as np
import pytest

from compressor import shards
from compressor.config.schema import DataSource
from compressor.errors import UserError
from compressor.text_sources import documents

SEQ = 64
SMALL_SHARDS = SEQ * 2 * 25  # 25 sequences of uint16 per shard: many shards from a small corpus


@pytest.fixture(scope="module")
def tokenizer(tiny_teacher):
    from compressor.models import load_tokenizer

    return load_tokenizer(tiny_teacher)


@pytest.fixture(scope="module")
def expected(tokenizer, tiny_corpus):
    """Every full sequence of the tiny-test corpus, packed the plain way: documents in order, each + EOS, cut."""
    source = DataSource(source="zoo:tiny-test")
    stream = [t for doc in documents(source) for t in tokenizer(doc, add_special_tokens=False)["input_ids"] + [1]]
    n = len(stream) // SEQ
    return np.array(stream[: n * SEQ]).reshape(n, SEQ)


def prepare(root, tokenizer_dir, sequences, **kw):
    return shards.prepare(
        DataSource(source="zoo:tiny-test"),
        str(tokenizer_dir),
        SEQ,
        sequences,
        str(root),
        shard_bytes=kw.pop("shard_bytes", SMALL_SHARDS),
        **kw,
    )


def test_round_trip_many_shards_read_by_global_id(tiny_teacher, expected, tmp_path):
    directory, index = prepare(tmp_path, tiny_teacher, 600)
    assert index.sequences == 600 and not index.exhausted and index.dtype == "<u2"  # vocab 1024 fits uint16
    assert len(index.shards) == 24 and all(s["sequences"] == 25 for s in index.shards)
    on_disk = Path(directory)
    assert sorted(p.name for p in on_disk.glob("*.bin")) == sorted(s["file"] for s in index.shards)
    assert (on_disk / shards.INDEX).is_file()
    reader = shards.ShardReader(directory)
    ids = np.random.default_rng(0).permutation(600)[:200]
    assert np.array_equal(reader.read(ids), expected[ids])  # across shard boundaries, in the asked order
    assert isinstance(reader._map(0), np.memmap)
    with pytest.raises(IndexError):
        reader.read([600])


def test_a_second_request_reuses_and_a_larger_one_extends(tiny_teacher, expected, tmp_path):
    directory, first = prepare(tmp_path / "a", tiny_teacher, 110)
    files = {s["file"] for s in first.shards}
    mtime = (Path(directory) / shards.INDEX).stat().st_mtime_ns
    again_dir, again = prepare(tmp_path / "a", tiny_teacher, 50)
    assert again_dir == directory and again.shards == first.shards
    assert (Path(directory) / shards.INDEX).stat().st_mtime_ns == mtime  # nothing written

    _, extended = prepare(tmp_path / "a", tiny_teacher, 700)
    assert extended.sequences == 700 and files <= {s["file"] for s in extended.shards}  # extended, not restarted
    _, fresh = prepare(tmp_path / "b", tiny_teacher, 700)
    assert np.array_equal(shards.ShardReader(directory).read(np.arange(700)), expected[:700])
    assert (extended.documents, extended.offset) == (fresh.documents, fresh.offset)


def test_the_source_running_out_is_recorded_and_final(tiny_teacher, expected, tmp_path):
    directory, index = prepare(tmp_path, tiny_teacher, 10**9, shard_bytes=shards.SHARD_BYTES)
    assert index.exhausted and index.sequences == len(expected) and len(index.shards) == 1
    assert np.array_equal(shards.ShardReader(directory).read(np.arange(len(expected))), expected)
    index_text = (Path(directory) / shards.INDEX).read_text()
    _, again = prepare(tmp_path, tiny_teacher, 10**9 + 1)
    assert again.sequences == index.sequences and (Path(directory) / shards.INDEX).read_text() == index_text


def test_an_interrupted_writer_leaves_only_complete_shards_and_resumes_exactly(tiny_teacher, expected, tmp_path):
    calls = []

    def crash(done):
        calls.append(done)
        if done >= 300:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        prepare(tmp_path, tiny_teacher, 800, progress=crash)
    directory = shards.shard_dir(
        str(tmp_path), DataSource(source="zoo:tiny-test"), shards.tokenizer_digest(str(tiny_teacher)), SEQ
    )
    index = shards.read_index(directory)
    assert 0 < index.sequences < 800 and index.sequences % 25 == 0  # the complete shards only
    for shard in index.shards:  # every listed file is whole; a torn one, if any, is not listed
        assert (Path(directory) / shard["file"]).stat().st_size == shard["sequences"] * SEQ * 2
    _, resumed = prepare(tmp_path, tiny_teacher, 800)
    assert resumed.sequences == 800
    assert np.array_equal(shards.ShardReader(directory).read(np.arange(800)), expected[:800])


def test_the_key_follows_source_tokenizer_and_seq_len(tiny_teacher, tmp_path):
    ds = DataSource(source="zoo:tiny-test", samples=8)
    token = shards.tokenizer_digest(str(tiny_teacher))
    base = shards.shard_dir(str(tmp_path), ds, token, SEQ)
    assert base == shards.shard_dir(str(tmp_path), DataSource(source="zoo:tiny-test", seq_len=9), token, SEQ)
    assert base != shards.shard_dir(str(tmp_path), ds, token, SEQ + 1)
    assert base != shards.shard_dir(str(tmp_path), DataSource(source="zoo:tiny-test", split="heldout"), token, SEQ)
    other = tmp_path / "tok"
    other.mkdir()
    config = json.loads((tiny_teacher / "tokenizer_config.json").read_text())
    (other / "tokenizer.json").write_text((tiny_teacher / "tokenizer.json").read_text().replace('"</s>"', '"</eos>"'))
    (other / "tokenizer_config.json").write_text(json.dumps(config))
    assert base != shards.shard_dir(str(tmp_path), ds, shards.tokenizer_digest(str(other)), SEQ)
    assert Path(base).name.startswith(f"zoo-tiny-test-L{SEQ}-")


def test_shards_on_object_storage_are_range_read(s3, tiny_teacher, expected):
    directory, index = prepare("s3://bucket/_data", tiny_teacher, 120)
    assert directory.startswith("s3://bucket/_data/") and index.sequences == 120
    assert s3.exists(f"{directory[len('s3://') :]}/{shards.INDEX}")
    reader = shards.ShardReader(directory)
    assert reader.remote
    ids = np.array([119, 0, 57, 25, 24])
    assert np.array_equal(reader.read(ids), expected[ids])
    _, extended = prepare("s3://bucket/_data", tiny_teacher, 160)
    assert np.array_equal(shards.ShardReader(directory).read(np.arange(160)), expected[:160])


def test_data_prepare_tokenizes_each_distill_stage_and_plan_shows_the_shards(
    tiny_teacher, tiny_test_overrides, tmp_path
):
    from typer.testing import CliRunner

    from compressor.cli import app

    args = ["tiny", *tiny_test_overrides, f"storage={tmp_path}"]
    before = CliRunner().invoke(app, ["plan", *args], terminal_width=400)
    assert before.exit_code == 0, before.output
    assert "distill data: zoo:tiny-test: not tokenized yet (320 sequences of 128 tokens needed" in before.output
    prepared = CliRunner().invoke(app, ["data", "prepare", *args])
    assert prepared.exit_code == 0, prepared.output
    assert f"distill: 320 sequences of 128 tokens (40,960 tokens) at {tmp_path / '_data'}" in prepared.output
    after = CliRunner().invoke(app, ["plan", *args], terminal_width=400)
    assert "distill data: zoo:tiny-test: cached: 320 sequences (40,960 tokens)" in after.output
    # Once a first shard has estimated the source's size, plan shows it, and a budget it cannot fit is refused early.
    (index_file,) = (tmp_path / "_data").glob(f"*/{shards.INDEX}")
    index_file.write_text(json.dumps({**json.loads(index_file.read_text()), "estimated_tokens": 50_000}))
    estimated = CliRunner().invoke(app, ["plan", *args], terminal_width=400)
    assert "cached: 320 sequences (40,960 tokens), source ~50,000 tokens, 320 sequences" in estimated.output
    too_much = CliRunner().invoke(app, ["data", "prepare", *args, "stages.distill.steps=100000"])
    assert isinstance(too_much.exception, UserError) and "distill.max_epochs" in str(too_much.exception)  # exit 2
    assert "holds only about 50,000 tokens" in str(too_much.exception)


def test_validate_warns_of_an_unpinned_hf_source(tiny_teacher, tiny_test_overrides, tmp_path):
    from typer.testing import CliRunner

    from compressor.cli import app

    args = ["validate", "tiny", *tiny_test_overrides, f"storage={tmp_path}", "data.distill.source=hf:acme/corpus"]
    unpinned = CliRunner().invoke(app, args)
    assert unpinned.exit_code == 0, unpinned.output
    assert "data.distill: hf:acme/corpus is not pinned" in " ".join(unpinned.output.split())
    pinned = CliRunner().invoke(app, [*args, f"data.distill.revision={COMMIT}"])
    assert pinned.exit_code == 0 and "not pinned" not in pinned.output


# ----------------------------------------------------------------------------- hf: sources, early fit check
COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def hub_corpus(tmp_path, monkeypatch):
    """The tiny-test corpus as an hf: source, streamed by `datasets` from 4 local JSONL files; `reads` holds the
    number of every row the stream produced, `breaks` makes the n-th opened stream fail after that many rows."""
    import datasets

    from compressor import text_sources as data

    docs = list(documents(DataSource(source="zoo:tiny-test")))
    files, quarter = [], -(-len(docs) // 4)
    for i in range(4):
        path = tmp_path / f"corpus-{i}.jsonl"
        path.write_text(
            "".join(
                json.dumps({"text": d, "n": i * quarter + j}) + "\n"
                for j, d in enumerate(docs[i * quarter : (i + 1) * quarter])
            )
        )
        files.append(str(path))
    hub = type("LocalHub", (), {"reads": [], "breaks": [], "opens": 0})()

    def open_hf(name, config, split, revision):
        assert revision == COMMIT
        rows = datasets.load_dataset("json", data_files=files, split="train", streaming=True)
        return Flaky(rows.map(lambda row: hub.reads.append(row["n"]) or row), hub)

    monkeypatch.setattr(data, "_open_hf", open_hf)
    monkeypatch.setattr(data, "RETRY_DELAY_S", 0)
    return hub


class Flaky:
    """A stream whose n-th iteration breaks after `hub.breaks[n]` rows (opened for its info only, it counts not)."""

    def __init__(self, rows, hub):
        self.rows, self.hub = rows, hub

    def __getattr__(self, name):
        return getattr(self.rows, name)

    def __iter__(self):
        self.hub.opens += 1
        after = self.hub.breaks.pop(0) if self.hub.breaks else None
        for n, row in enumerate(self.rows):
            if n == after:
                raise OSError("HTTP 502 from the hub mid-stream")
            yield row


HF = DataSource(source="hf:acme/corpus", revision=COMMIT)


def test_hf_shards_resume_from_the_stream_state_reading_less_than_a_batch_again(
    tiny_teacher, expected, hub_corpus, tmp_path
):
    def crash(done):
        if done >= 1000:  # in the second batch of documents
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        shards.prepare(HF, str(tiny_teacher), SEQ, 2000, str(tmp_path), crash, SMALL_SHARDS)
    directory = shards.shard_dir(str(tmp_path), HF, shards.tokenizer_digest(str(tiny_teacher)), SEQ)
    stopped = shards.read_index(directory)
    assert stopped.revision == COMMIT and stopped.documents > shards.DOCUMENT_BATCH
    assert stopped.state["documents"] <= stopped.documents < stopped.state["documents"] + shards.DOCUMENT_BATCH
    hub_corpus.reads.clear()
    _, resumed = shards.prepare(HF, str(tiny_teacher), SEQ, 2000, str(tmp_path), shard_bytes=SMALL_SHARDS)
    assert resumed.sequences == 2000
    assert np.array_equal(shards.ShardReader(directory).read(np.arange(2000)), expected[:2000])
    again = [n for n in hub_corpus.reads if n < stopped.documents]  # rows the first writer had already used
    assert min(hub_corpus.reads) == stopped.state["documents"] and len(again) < shards.DOCUMENT_BATCH


def test_transient_errors_mid_stream_are_retried_and_the_shards_are_an_uninterrupted_runs(
    tiny_teacher, expected, hub_corpus, tmp_path
):
    hub_corpus.breaks.extend([700, 0, 1300])  # an HTTP error mid-batch, one on re-opening, one later
    directory, index = shards.prepare(HF, str(tiny_teacher), SEQ, 1500, str(tmp_path), shard_bytes=SMALL_SHARDS)
    assert hub_corpus.opens == 4 and index.sequences == 1500
    assert np.array_equal(shards.ShardReader(directory).read(np.arange(1500)), expected[:1500])
    _, plain = prepare(tmp_path / "plain", tiny_teacher, 1500)
    assert (index.documents, index.offset) == (plain.documents, plain.offset)


def test_a_budget_the_source_cannot_fit_is_refused_at_its_first_shard(tiny_teacher, expected, tmp_path):
    from functools import partial

    from compressor.stages.distill.batches import check_fit

    total = expected.size  # the source's tokens in whole sequences
    check = partial(
        check_fit, steps=2 * len(expected), global_batch=1, seq_len=SEQ, max_epochs=1.0, source="zoo:tiny-test"
    )
    with pytest.raises(UserError) as err:
        prepare(tmp_path, tiny_teacher, 10**9, check=check)
    directory = shards.shard_dir(
        str(tmp_path), DataSource(source="zoo:tiny-test"), shards.tokenizer_digest(str(tiny_teacher)), SEQ
    )
    index = shards.read_index(directory)
    # the shards of the batch that closed the first one are written (and kept), not the whole source
    assert 0 < index.sequences < len(expected) / 10 and not index.exhausted
    assert abs(index.estimated_tokens - total) < 0.15 * total  # tokens per byte of the first batch x the file's bytes
    message = str(err.value)
    assert (
        f"needs {2 * len(expected) * SEQ:,} tokens" in message and f"about {index.estimated_tokens:,} tokens" in message
    )
    assert "distill.max_epochs" in message
    before = (Path(directory) / shards.INDEX).read_text()
    with pytest.raises(UserError, match="holds only about"):  # again: refused from the index, before reading
        prepare(tmp_path, tiny_teacher, 10**9, check=check)
    assert (Path(directory) / shards.INDEX).read_text() == before
    # repetition allowed: the whole source is tokenized, and the exact check (run_data) decides
    _, index = prepare(tmp_path, tiny_teacher, 10**9, check=partial(check, max_epochs=2.0))
    assert index.exhausted and index.sequences == len(expected)
