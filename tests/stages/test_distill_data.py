"""The distill stage's data path: a token budget met from token shards, repetition only when allowed, each Ray Train
worker reading only its own sequence ids (COMPRESSOR_DATA_TRACE), and the data position surviving a killed worker.

The reference teacher `tiny-test` is both teacher and student (the data path is what is tested); Ray Train fits cost
~20 s each here, so the runs are few and short (seq_len 64, global batch 4)."""

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from compressor.config.schema import DataSource
from compressor.contract.context import MetricsSink, StageContext
from compressor.errors import UserError
from compressor.manifest import ModelRef
from compressor.shards import ShardIndex
from compressor.stages.distill.batches import TRACE_ENV, BatchPlan, run_data
from compressor.stages.distill.layout import budget_steps
from compressor.stages.distill.spec import DistillSpec

SEQ, BATCH = 64, 4


def spec(**overrides) -> DistillSpec:
    base = dict(
        data="distill",
        seq_len=SEQ,
        global_batch=BATCH,
        micro_batch=2,
        lr=1e-3,
        min_lr=1e-4,
        checkpoint_every=100,
        cpus_per_worker=1,
        deepspeed={"zero_stage": 2},
    )
    return DistillSpec(**{**base, **overrides})


def traces(directory: Path) -> dict[int, list[dict]]:
    return {
        int(p.stem[len("rank") :]): [json.loads(line) for line in p.read_text().splitlines()]
        for p in sorted(directory.glob("rank*.jsonl"))
    }


def sequences_of(tokenizer, path: Path) -> int:
    """Full SEQ-token sequences in a text file, counted the plain way (paragraphs + EOS)."""
    from compressor.text_sources import documents

    docs = documents(DataSource(source=str(path)))
    return sum(len(tokenizer(d, add_special_tokens=False)["input_ids"]) + 1 for d in docs) // SEQ


# ----------------------------------------------------------------------------- without Ray
def test_batch_plan_is_the_same_global_batch_for_any_worker_count_and_disjoint_per_step():
    one = BatchPlan(40, 8, 1, 2, seed=3)
    two = BatchPlan(40, 8, 2, 2, seed=3)
    seen = []
    for step in range(5):  # exactly one epoch
        ranks = [set(two.rank_ids(step, r).tolist()) for r in range(2)]
        assert not ranks[0] & ranks[1]
        assert ranks[0] | ranks[1] == set(one.rank_ids(step, 0).tolist())
        seen += one.rank_ids(step, 0).tolist()
    assert sorted(seen) == list(range(40))
    assert [len(b) for b in two.micro_batches(0, 1)] == [2, 2]
    assert one.rank_ids(5, 0).tolist() != one.rank_ids(0, 0).tolist()  # a new order in the next epoch


def test_token_budget_rounds_up_to_whole_steps_and_refuses_less_than_one():
    assert budget_steps(spec(tokens=2000), SEQ) == 8  # 8 x 4 x 64 = 2048 >= 2000
    assert budget_steps(spec(tokens=2048), SEQ) == 8
    with pytest.raises(UserError, match="a budget of 100 tokens is less than one optimizer step"):
        budget_steps(spec(tokens=100), SEQ)


def test_run_data_refuses_repetition_unless_allowed():
    index = ShardIndex(
        key="k",
        source="s",
        seq_len=SEQ,
        dtype="<u2",
        vocab_size=1024,
        eos=1,
        tokenizer="t",
        sequences=30,
        exhausted=True,
    )
    with pytest.raises(UserError) as err:
        run_data("d", index, steps=16, global_batch=BATCH, max_epochs=1.0, source="small.txt")
    for words in (
        "needs 64 sequences of 64 tokens (4,096 tokens",
        "holds only 30 sequences (1,920 tokens)",
        "distill.max_epochs to 2.14 or more",
    ):
        assert words in str(err.value)
    data = run_data("d", index, steps=16, global_batch=BATCH, max_epochs=3, source="small.txt")
    assert (data.sequences, data.distinct_tokens, round(data.epochs, 3)) == (30, 30 * SEQ, 2.133)
    big = run_data("d", ShardIndex(**{**index.__dict__, "sequences": 500, "exhausted": False}), 16, BATCH, 1.0, "s")
    assert (big.sequences, big.epochs, big.distinct_tokens) == (64, 1.0, 64 * SEQ)  # only what the run trains


# ----------------------------------------------------------------------------- Ray Train
@pytest.fixture(scope="module")
def local_ray():
    import ray

    if ray.is_initialized():
        ray.shutdown()
    os.environ.update(RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_AUTH_MODE="disabled")
    ray.init(address="local", num_cpus=2, include_dashboard=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def tokenizer(tiny_teacher):
    from compressor.models import load_tokenizer

    return load_tokenizer(tiny_teacher)


@pytest.fixture(scope="module")
def small_corpus(tiny_corpus, tmp_path_factory) -> Path:
    """The first 40 paragraphs of the tiny-test corpus: a few dozen sequences."""
    path = tmp_path_factory.mktemp("small") / "small.txt"
    path.write_text("\n\n".join((tiny_corpus / "train.txt").read_text().split("\n\n")[:40]))
    return path


def test_two_workers_read_disjoint_ids_and_the_budget_is_met_with_distinct_tokens(
    local_ray, tiny_teacher, tmp_path, monkeypatch
):
    from compressor.runner import run_standalone

    monkeypatch.setenv(TRACE_ENV, str(tmp_path / "trace"))
    budget = 2000  # the zoo corpus holds ~7,500 sequences of 64: far more than the budget
    manifest = run_standalone(
        "distill",
        spec(tokens=budget, workers=2),
        str(tiny_teacher),
        str(tmp_path / "out"),
        data={"distill": DataSource(source="zoo:tiny-test", seq_len=SEQ)},
        teacher=str(tiny_teacher),
        quiet=True,
    )
    details = manifest.details
    assert details["steps"] == 8 and details["tokens"] == 8 * BATCH * SEQ >= budget
    assert details["distinct_tokens"] == details["tokens"] >= budget and details["epochs"] == 1.0
    assert manifest.metrics["distinct_tokens"] == details["distinct_tokens"]
    assert Path(details["data"]).parent == tmp_path / "_data"

    by_rank = traces(tmp_path / "trace")
    assert sorted(by_rank) == [0, 1] and by_rank[0][0]["pid"] != by_rank[1][0]["pid"]
    plan = BatchPlan(8 * BATCH, BATCH, 1, 2, seed=0)
    for step in range(1, 9):
        ids = [next(r["ids"] for r in by_rank[rank] if r["step"] == step) for rank in (0, 1)]
        assert len(ids[0]) == len(ids[1]) == BATCH // 2 and not set(ids[0]) & set(ids[1])
        assert ids[0] + ids[1] == plan.rank_ids(step - 1, 0).tolist()  # the planned global batch of that step
    union = {i for rank in by_rank.values() for r in rank for i in r["ids"]}
    assert union == set(range(8 * BATCH))  # every planned sequence, each once


def test_a_budget_larger_than_the_source_needs_max_epochs(
    local_ray, tiny_teacher, tokenizer, small_corpus, tmp_path, monkeypatch
):
    available = sequences_of(tokenizer, small_corpus)
    budget = 16 * BATCH * SEQ  # 16 steps, 64 sequences
    assert available < 64
    cli = [
        sys.executable,
        "-m",
        "compressor",
        "distill",
        "--teacher",
        str(tiny_teacher),
        "--student",
        str(tiny_teacher),
        "--out",
        str(tmp_path / "refused"),
        "--data",
        str(small_corpus),
        "--tokens",
        str(budget),
        "--seq-len",
        str(SEQ),
        "--global-batch",
        str(BATCH),
        "--micro-batch",
        "2",
        "--deepspeed",
        "zero_stage=2",
        "--quiet",
    ]
    proc = subprocess.run(cli, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "distill.max_epochs" in proc.stderr and "Traceback" not in proc.stderr
    assert f"needs 64 sequences of {SEQ} tokens ({budget:,} tokens" in proc.stderr
    assert f"holds only {available} sequences ({available * SEQ:,} tokens)" in proc.stderr
    assert not (tmp_path / "refused").exists()

    from compressor.runner import run_standalone

    monkeypatch.setenv(TRACE_ENV, str(tmp_path / "trace"))
    manifest = run_standalone(
        "distill",
        spec(tokens=budget, max_epochs=3),
        str(tiny_teacher),
        str(tmp_path / "out"),
        data={"distill": DataSource(source=str(small_corpus), seq_len=SEQ)},
        teacher=str(tiny_teacher),
        quiet=True,
    )
    details = manifest.details
    assert details["steps"] == 16 and details["distinct_tokens"] == available * SEQ
    assert details["epochs"] == pytest.approx(64 / available)
    read = [i for r in traces(tmp_path / "trace")[0] for i in r["ids"]]
    assert len(read) == 64 and set(read) == set(range(available))  # all of the source, repeated, nothing else


def test_bad_data_found_while_tokenizing_is_one_user_error(local_ray, tiny_teacher, tiny_corpus, tmp_path):
    from compressor.stages import distill

    lines = [json.dumps({"text": p}) for p in (tiny_corpus / "train.txt").read_text().split("\n\n")[:3000]]
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("\n".join(lines[:2500] + ["{not json"] + lines[2500:]) + "\n")
    ctx = StageContext(
        work_dir=tmp_path / "work",
        teacher=ModelRef(path=str(tiny_teacher), key="teacher"),
        data={"distill": DataSource(source=str(corpus), seq_len=SEQ)},
        storage_path=str(tmp_path / "ray"),
        data_root=str(tmp_path / "_data"),
        quiet=True,
    )
    with pytest.raises(UserError, match="corpus.jsonl:2501: not valid JSON lines") as err:  # from the Ray task
        distill.KIND.run(spec(steps=2000), ModelRef(path=str(tiny_teacher), key="student"), ctx)
    assert type(err.value) is UserError and "Traceback" not in str(err.value)


class SlowSink(MetricsSink):
    """Rank 0's per-step metrics, slowed down so that a test can kill a worker in the middle of the run."""

    def log_metrics(self, metrics, step=None):
        time.sleep(0.4)


def _ship_by_value() -> None:
    import ray.cloudpickle

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # Ray workers cannot import this test module


_ship_by_value()


def test_a_killed_worker_resumes_at_the_step_after_the_checkpoint_with_the_planned_ids(
    local_ray, tiny_teacher, tmp_path, monkeypatch
):
    from compressor.stages import distill

    steps, every = 30, 4
    monkeypatch.setenv(TRACE_ENV, str(tmp_path / "trace"))
    work = tmp_path / "work"
    work.mkdir()
    ctx = StageContext(
        work_dir=work,
        teacher=ModelRef(path=str(tiny_teacher), key="teacher"),
        data={"distill": DataSource(source="zoo:tiny-test", seq_len=SEQ)},
        storage_path=str(tmp_path / "ray"),
        data_root=str(tmp_path / "_data"),
        run_name="kill",
        sink=SlowSink(),
        quiet=True,
    )
    outcome = {}

    def run():
        try:
            outcome["result"] = distill.KIND.run(
                spec(steps=steps, workers=2, checkpoint_every=every, max_failures=2),
                ModelRef(path=str(tiny_teacher), key="student"),
                ctx,
            )
        except BaseException as exc:  # noqa: BLE001  (re-raised below)
            outcome["error"] = exc

    driver = threading.Thread(target=run, daemon=True)
    driver.start()
    run_dir, trace = tmp_path / "ray" / "kill", tmp_path / "trace"
    deadline = time.monotonic() + 300
    while not list(run_dir.glob("checkpoint_step*")):
        assert driver.is_alive() and time.monotonic() < deadline, outcome
        time.sleep(0.2)
    time.sleep(3.0)  # Ray Train registers a reported checkpoint when its controller next polls the workers (every 2 s)
    assert driver.is_alive()
    victim = traces(trace)[1][-1]
    os.kill(victim["pid"], signal.SIGKILL)
    driver.join(timeout=400)
    assert "error" not in outcome, outcome.get("error")
    assert outcome["result"].details["steps"] == steps

    plan = BatchPlan(steps * BATCH, BATCH, 2, 2, seed=0)
    by_rank = traces(trace)
    for rank, records in by_rank.items():
        first_pid = records[0]["pid"]
        before = [r["step"] for r in records if r["pid"] == first_pid]
        after = [r["step"] for r in records if r["pid"] != first_pid]
        assert len({r["pid"] for r in records}) == 2  # one restart of the worker group
        resumed_from = after[0] - 1
        assert resumed_from % every == 0 and every <= resumed_from < before[-1], (before, after)
        assert after == list(range(resumed_from + 1, steps + 1))  # continues right after the checkpoint, none skipped
        assert set(before) | set(after) == set(range(1, steps + 1))
        for r in records:  # before and after the restart: the planned ids of that step
            assert r["ids"] == plan.rank_ids(r["step"] - 1, rank).tolist(), r
    assert victim["pid"] in {r["pid"] for r in by_rank[1]}
