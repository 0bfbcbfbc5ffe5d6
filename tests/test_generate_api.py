"""The generate stage against an OpenAI-compatible server on 127.0.0.1 (tests/openai_server.py) serving the tiny-test
model, through the real `openai` client: faults, a SIGKILL mid-run and its resume, the API key's path."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from compressor.prompt_rows import normalize, prompt_id
from compressor.stages.generate.spec import GenerateSpec
from compressor.stages.generate.store import AnswerStore

KEY_ENV, KEY = "TEACHER_API_KEY", "sk-test-planted-7d1f0c9e2b"


def write_prompts(path: Path, count: int) -> list[str]:
    """`count` prompt rows, the three forms mixed (messages; prompt + system; prompt + id). Returns what the server
    logs of each (the hash of its messages); with `ids=True` `(dataset ids, server ids)`."""
    rows = []
    for i in range(count):
        if i % 3 == 0:
            rows.append({"messages": [{"role": "user", "content": f"Describe the module number {i}."}]})
        elif i % 3 == 1:
            rows.append({"prompt": f"The function {i} returns", "system": "Answer briefly."})
        else:
            rows.append({"id": f"given-{i}", "prompt": f"A list of {i} items is"})
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return [prompt_id(normalize(row, "")["messages"]) for row in rows]


def row_ids(path: Path) -> list[str]:
    """The dataset ids of the rows (`id` when given, else the messages' hash)."""
    return [normalize(json.loads(line), "")["id"] for line in path.read_text().splitlines()]


def api_spec(server, **fields) -> GenerateSpec:
    base = {"prompts": "prompts", "teacher": "openai:tiny-test", "base_url": server.base_url, "api_key_env": KEY_ENV}
    return GenerateSpec(**{**base, "max_new_tokens": 6, "commit_every": 4, "max_concurrency": 4, **fields})


def dataset_ids(out: Path) -> list[str]:
    return pq.read_table(out / "data", columns=["id"]).column("id").to_pylist()


def test_faults_are_retried_and_every_prompt_has_exactly_one_answer(tmp_path, openai_server, monkeypatch):
    from compressor.commands.generate import run_generate

    openai_server.reset()
    monkeypatch.setenv(KEY_ENV, KEY)
    ids = write_prompts(tmp_path / "prompts.jsonl", 12)
    faults = {ids[0]: ["429"], ids[1]: ["500"], ids[2]: ["drop"], ids[3]: ["429", "500", "drop"]}
    openai_server.faults.update({k: list(v) for k, v in faults.items()})
    manifest = run_generate(
        api_spec(openai_server), "openai:tiny-test", str(tmp_path / "prompts.jsonl"), str(tmp_path / "out"), quiet=True
    )
    got = dataset_ids(tmp_path / "out")
    assert sorted(got) == sorted(row_ids(tmp_path / "prompts.jsonl")) and len(set(got)) == len(
        got
    )  # one answer each, none lost, none twice
    requests = openai_server.requested_ids()
    for ident, injected in faults.items():
        assert requests.count(ident) == len(injected) + 1  # each fault retried, then answered once
    assert manifest.metrics["failed"] == 0 and manifest.metrics["kept"] == 12
    assert {entry["auth"] for entry in openai_server.log} == {f"Bearer {KEY}"}  # the key reached the server
    text = "".join(p.read_text(errors="replace") for p in tmp_path.rglob("*") if p.is_file() and p.suffix != ".parquet")
    assert KEY not in text


def test_a_prompt_that_keeps_failing_is_recorded_and_the_stage_fails_over_max_failed(
    tmp_path, openai_server, monkeypatch
):
    from compressor.commands.generate import run_generate
    from compressor.errors import StageFailed

    openai_server.reset()
    monkeypatch.setenv(KEY_ENV, KEY)
    ids = write_prompts(tmp_path / "prompts.jsonl", 6)
    openai_server.faults[ids[4]] = ["500"] * 2  # its first try and its one retry (max_retries=1)
    spec = api_spec(openai_server, max_retries=1)
    with pytest.raises(StageFailed, match="1 of 6 prompts failed"):
        run_generate(spec, "openai:tiny-test", str(tmp_path / "prompts.jsonl"), str(tmp_path / "out"), quiet=True)
    assert not (tmp_path / "out").exists()
    store = AnswerStore(str(next(tmp_path.glob(".answers-*"))))
    assert list(store.failed()) == [row_ids(tmp_path / "prompts.jsonl")[4]]  # recorded, never dropped
    # with the fault gone, a re-run sends that prompt only
    before = len(openai_server.log)
    run_generate(spec, "openai:tiny-test", str(tmp_path / "prompts.jsonl"), str(tmp_path / "out"), quiet=True)
    assert openai_server.requested_ids(before) == [ids[4]]
    assert sorted(dataset_ids(tmp_path / "out")) == sorted(row_ids(tmp_path / "prompts.jsonl"))


def _cli(tmp_path: Path, server, out: str, *extra: str) -> list[str]:
    return [
        sys.executable, "-m", "compressor", "generate", "--teacher", "openai:tiny-test", "--base-url", server.base_url,
        "--api-key-env", KEY_ENV, "--prompts", str(tmp_path / "prompts.jsonl"), "--out", str(tmp_path / out),
        "--max-new-tokens", "6", "--commit-every", "2", "--max-concurrency", "2", *extra,
    ]  # fmt: skip


def test_sigkill_mid_generation_then_rerun_sends_no_committed_prompt_again(tmp_path, openai_server):
    ids = write_prompts(tmp_path / "prompts.jsonl", 16)
    env = {**os.environ, KEY_ENV: KEY}
    openai_server.reset(latency_s=0.25)
    run = subprocess.Popen(
        _cli(tmp_path, openai_server, "out"),
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    deadline = time.time() + 120
    while len(list(tmp_path.glob(".answers-*/index/*.json"))) < 3:  # some batches committed, more in flight
        assert run.poll() is None and time.time() < deadline, run.communicate()
        time.sleep(0.05)
    os.killpg(run.pid, signal.SIGKILL)
    first_out, first_err = run.communicate()
    store = AnswerStore(str(next(tmp_path.glob(".answers-*"))))
    to_server = dict(zip(row_ids(tmp_path / "prompts.jsonl"), ids))
    committed = {
        to_server[i]
        for path in store.shard_paths()
        for i in pq.read_table(path, columns=["id"]).column("id").to_pylist()
    }
    assert 0 < len(committed) < len(ids) and not (tmp_path / "out").exists()

    before = len(openai_server.log)
    openai_server.latency_s = 0.0
    again = subprocess.run(_cli(tmp_path, openai_server, "out"), env=env, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0, again.stderr[-2000:]
    resent = openai_server.requested_ids(before)
    assert not committed & set(resent), committed & set(resent)  # nothing paid for twice
    assert set(resent) == set(ids) - committed

    whole = subprocess.run(
        _cli(tmp_path, openai_server, "uninterrupted/out"), env=env, capture_output=True, text=True, timeout=120
    )
    assert whole.returncode == 0, whole.stderr[-2000:]
    final = sorted(dataset_ids(tmp_path / "out"))
    assert final == sorted(dataset_ids(tmp_path / "uninterrupted" / "out")) == sorted(to_server)
    console = first_out + first_err + (again.stdout + again.stderr + whole.stdout + whole.stderr).encode()
    assert KEY.encode() not in console
