"""The generate stage with local weights (hf backend in Ray Data actors), its filters and review, bad input, and
`plan`'s cost lines checked against a hand computation."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from compressor.stages.generate.spec import GenerateSpec
from compressor.stages.generate.store import AnswerStore

PROMPTS = [f"The module number {i} is" for i in range(7)]


@pytest.fixture(scope="module")
def local_ray():
    """A 2-CPU Ray on loopback for this module (its own; stopped afterwards)."""
    import ray

    if ray.is_initialized():
        ray.shutdown()
    os.environ.update(RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_AUTH_MODE="disabled")
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)  # never another user's
    yield
    ray.shutdown()


def prompts_file(directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    return path


def rows(out: Path) -> list[dict]:
    return sorted(pq.read_table(out / "data").to_pylist(), key=lambda r: r["id"])


def test_two_actors_give_what_one_gives_and_a_lost_commit_is_redone_alone(tmp_path, local_ray, tiny_teacher):
    from compressor.commands.generate import run_generate

    spec = GenerateSpec(prompts="prompts", max_new_tokens=6, commit_every=3, batch_size=2, actors=1)
    one = run_generate(spec, str(tiny_teacher), str(prompts_file(tmp_path / "one")), str(tmp_path / "one" / "out"))
    two = spec.model_copy(update={"actors": 2})
    run_generate(two, str(tiny_teacher), str(prompts_file(tmp_path / "two")), str(tmp_path / "two" / "out"))
    assert rows(tmp_path / "one" / "out") == rows(tmp_path / "two" / "out")
    assert len(rows(tmp_path / "one" / "out")) == len(PROMPTS) and one.metrics["completion_tokens"] > 0

    # a run that died before batch 1's commit record: the re-run answers batch 1 only, with the same answers
    store = AnswerStore(str(next((tmp_path / "two").glob(".answers-*"))))
    stamps = {p: os.stat(p).st_mtime_ns for p in store.shard_paths()}
    next(Path(store.uri, "index").glob("b00000001-*")).unlink()
    run_generate(two, str(tiny_teacher), str(tmp_path / "two" / "prompts.jsonl"), str(tmp_path / "two" / "again"))
    changed = [Path(p).name for p in store.shard_paths() if os.stat(p).st_mtime_ns != stamps[p]]
    assert changed == ["b00000001-a0.parquet"]
    assert rows(tmp_path / "two" / "again") == rows(tmp_path / "one" / "out")


def test_filters_count_each_drop_and_review_shows_kept_pairs(tmp_path):
    from compressor.stages.generate.finalize import finalize

    store = AnswerStore(str(tmp_path / "answers"))
    msg = [{"role": "user", "content": "Is it?"}]

    def answer(i, text, finish="stop"):
        return {"id": f"p{i}", "messages": msg if i else [], "response": text, "finish_reason": finish,
                "prompt_tokens": 3, "completion_tokens": 2}  # fmt: skip

    batch = [answer(1, "yes"), answer(2, "  "), answer(3, "no", "length"), answer(1, "yes"), answer(4, "maybe")]
    store.commit(0, 0, batch + [answer(5, "nope")], {}, {"prompts": 6}, False)
    filters = {"drop_truncated": True, "accept": "^(yes|no|nope)$", "labels": ["yes", "no"]}
    spec = GenerateSpec(prompts="p", filters=filters, review_samples=50)
    counts = finalize(store, tmp_path / "work", spec, seed=0)
    assert counts == {
        "answers": 6, "kept": 1, "dropped_empty": 1, "dropped_truncated": 1, "dropped_duplicate": 1,
        "dropped_accept": 1, "dropped_labels": 1,
    }  # fmt: skip
    assert [r["response"] for r in pq.read_table(tmp_path / "work" / "data").to_pylist()] == ["yes"]
    review = (tmp_path / "work" / "review.md").read_text()
    assert "1 random (prompt, answer) pairs of 1 kept" in review and "> Is it?" in review and "> yes" in review


# ----------------------------------------------------------------------------- bad input: exit 2, nothing written
BAD = {
    "no prompt column": ('{"text": "hi"}\n', [], "prompts.jsonl:1: no `messages` or `prompt` field"),
    "malformed line": ('{"prompt": "a"}\n{"prompt": "b"}\n{"prompt": \n', [], "prompts.jsonl:3: not valid JSON"),
    "unset key variable": ('{"prompt": "a"}\n', ["--api-key-env", "NOT_SET_ANYWHERE"], "NOT_SET_ANYWHERE is not set"),
    "n below 1": ('{"prompt": "a"}\n', ["--n", "0"], "--n"),
    "negative price": (
        '{"prompt": "a"}\n',
        ["--price", "input_per_mtok=-1,output_per_mtok=2"],
        "--price-input-per-mtok",
    ),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_exits_2_with_one_paragraph_and_writes_nothing(tmp_path, case):
    text, flags, expected = BAD[case]
    (tmp_path / "prompts.jsonl").write_text(text)
    env = {**os.environ, "SOME_KEY": "k-123456"}
    env.pop("NOT_SET_ANYWHERE", None)
    command = [sys.executable, "-m", "compressor", "generate", "--teacher", "openai:m", "--base-url",
               "http://127.0.0.1:9/v1", "--api-key-env", "SOME_KEY", "--prompts", str(tmp_path / "prompts.jsonl"),
               "--out", str(tmp_path / "out"), *flags]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 2, done.stdout + done.stderr
    assert expected in done.stderr and "Traceback" not in done.stderr, done.stderr
    assert "\n\n" not in done.stderr.strip(), done.stderr  # one paragraph
    assert sorted(p.name for p in tmp_path.iterdir()) == ["prompts.jsonl"]  # nothing written


# ----------------------------------------------------------------------------- plan: cost before compute
def test_plan_shows_prompts_tokens_and_cost_matching_a_hand_computation(tmp_path, tiny_teacher):
    from tokenizers import Tokenizer
    from typer.testing import CliRunner

    from compressor.cli import application

    prompts = prompts_file(tmp_path)
    pipeline = tmp_path / "gen.yaml"
    pipeline.write_text(
        f"name: gen\nteacher: {{model: {tiny_teacher}}}\nstorage: {tmp_path / 'store'}\n"
        f"data:\n  asks: {{source: {prompts}}}\n"
        "stages:\n"
        "  - generate: {prompts: asks, teacher: 'openai:big', base_url: 'http://127.0.0.1:9/v1', n: 2,\n"
        "               max_new_tokens: 100, price: {input_per_mtok: 3, output_per_mtok: 15}}\n"
        "  - generate: {prompts: asks, max_new_tokens: 10, tokens_per_s: 50}\n"
        "    resources: {num_gpus: 1}\n"
        "  - distill: {data: generate2, steps: 1}\n"
    )
    planned = CliRunner().invoke(application(), ["plan", str(pipeline)], terminal_width=250)
    assert planned.exit_code == 0, planned.output
    count, chars = len(PROMPTS), sum(len(p) for p in PROMPTS)
    api_in, api_out = chars / 4, count * 2 * 100
    assert (
        f"generate: {count} prompts; input tokens {api_in:,.0f} (about 4 chars per token); output tokens {api_out:,}"
        in planned.output
    )
    assert f"generate: cost (max): ${api_in / 1e6 * 3 + api_out / 1e6 * 15:,.4f}" in planned.output
    tokenizer = Tokenizer.from_file(str(tiny_teacher / "tokenizer.json"))
    exact = sum(len(tokenizer.encode(p + "\n\n").ids) for p in PROMPTS)
    assert f"generate2: {count} prompts; input tokens {exact:,} (teacher's tokenizer)" in planned.output
    assert f"generate2: time (max): {count * 10 / 50 / 3600:,.3f} GPU-hours at 50.0 tokens/s" in planned.output
    assert "distill data: the dataset of stage 'generate2'" in planned.output


def test_prompts_stream_in_batches_that_read_back_alike_from_jsonl_and_parquet(tmp_path):
    import pyarrow as pa

    from compressor import prompt_rows as prompts
    from compressor.config.schema import DataSource

    (tmp_path / "src").mkdir()
    lines = [json.dumps({"prompt": f"p{i}", **({"id": f"x{i}"} if i % 2 else {})}) for i in range(5)]
    (tmp_path / "src" / "a.jsonl").write_text("\n".join(lines[:2]) + "\n\n\n" + "\n".join(lines[2:]) + "\n")
    messages = [[{"role": "system", "content": "s"}, {"role": "user", "content": f"q{i}"}] for i in range(5)]
    pq.write_table(pa.table({"messages": messages}), tmp_path / "src" / "b.parquet", row_group_size=2)
    source = DataSource(source=str(tmp_path / "src"))
    scanned = list(prompts.scan(source, 2))
    assert [len(rows) for _, rows in scanned] == [2, 2, 1, 2, 2, 1]  # a batch never spans two files
    assert all(prompts.read(source, desc) == rows for desc, rows in scanned)  # any worker reads batch k alike
    flat = [row for _, rows in scanned for row in rows]
    assert [r["id"] for r in flat[:2]] == [prompts.prompt_id([{"role": "user", "content": "p0"}]), "x1"]
    assert flat[5]["messages"] == messages[0] and flat[5]["id"] == prompts.prompt_id(messages[0])


def test_hf_prompts_resume_each_batch_from_the_stream_state(monkeypatch):
    import datasets

    from compressor import prompt_rows as prompts
    from compressor import text_sources as data
    from compressor.config.schema import DataSource

    rows = [{"prompt": f"q{i}", "system": "s"} for i in range(5)]
    monkeypatch.setattr(data, "_open_hf", lambda *a: datasets.Dataset.from_list(rows).to_iterable_dataset(2))
    source = DataSource(source="hf:acme/prompts", revision="a" * 40)
    scanned = list(prompts.scan(source, 2))
    assert [d["rows"] for d, _ in scanned] == [2, 2, 1]
    for desc, batch in scanned:
        assert prompts.read(source, json.loads(json.dumps(desc))) == batch  # the descriptor travels as JSON
    assert scanned[2][1][0]["messages"][1]["content"] == "q4"
