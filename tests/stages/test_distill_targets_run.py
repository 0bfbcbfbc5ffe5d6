"""Distillation from teacher targets computed once (loss.targets): the teacher's one pass over the data as Ray Data
actors, then Ray Train workers that read the targets of their own ids and build no teacher (random tiny Llamas on two
simulated nodes, as in test_distill.py)."""

from __future__ import annotations

import json

import pytest
from conftest import simulated_cluster
from distill_helpers import FileSink, build_llama, context, corpus_text

from compressor import targets as tg
from compressor.errors import UserError
from compressor.manifest import ModelRef
from compressor.stages import distill
from compressor.stages.distill.batches import TRACE_ENV
from compressor.stages.distill.spec import DistillSpec
from compressor.stages.distill.targets_compute import TRACE_ENV as TARGETS_TRACE

STEPS = 8


@pytest.fixture(scope="module")
def two_nodes():
    yield from simulated_cluster(2)


@pytest.fixture(scope="module")
def models(tmp_path_factory, tiny_teacher):
    """The trained test teacher (zoo:tiny-test) and a random student with its tokenizer: a KL that has far to fall."""
    from compressor.models import load_tokenizer

    root = tmp_path_factory.mktemp("targets-models")
    vocab = json.loads((tiny_teacher / "config.json").read_text())["vocab_size"]
    student = build_llama(
        root / "student", load_tokenizer(tiny_teacher), hidden=64, intermediate=64, layers=2, seed=2, vocab=vocab
    )
    corpus = root / "corpus.txt"
    corpus.write_text(corpus_text())
    return tiny_teacher, student, corpus


def spec(**overrides) -> DistillSpec:
    base = dict(
        data="text",
        steps=STEPS,
        lr=3e-3,
        min_lr=3e-4,
        global_batch=4,
        micro_batch=2,
        checkpoint_every=4,
        workers=2,
        placement_strategy="STRICT_SPREAD",
        loss={"chunk_tokens": 40, "targets": {"kind": "sampled", "k": 8}},
        deepspeed={"zero_stage": 3},
    )
    return DistillSpec(**{**base, **overrides})


def run(tmp, models, stage_spec, name):
    teacher, student, corpus = models
    work = tmp / f"work-{name}"
    work.mkdir()
    sink = FileSink(tmp / f"{name}.jsonl")
    ctx = context(work, teacher, corpus, sink, run_name=name, storage=tmp / "ray")
    ctx.data_root = str(tmp / "data")
    return distill.KIND.run(stage_spec, ModelRef(path=str(student), key="student"), ctx), sink


def parts_computed(trace) -> list[int]:
    return [json.loads(line)["first"] for line in trace.read_text().splitlines()] if trace.exists() else []


def test_targets_are_computed_once_and_two_workers_train_on_their_own_ids_without_a_teacher(
    two_nodes, models, tmp_path, monkeypatch
):
    monkeypatch.setattr(tg, "PART_SEQUENCES", 8)  # several parts, so that workers and re-runs read across them
    monkeypatch.setenv(TARGETS_TRACE, str(tmp_path / "parts.jsonl"))
    monkeypatch.setenv(TRACE_ENV, str(tmp_path / "ids"))
    result, sink = run(tmp_path, models, spec(), "sampled")
    losses = [r["loss"] for r in sink.records() if "loss" in r]
    assert len(losses) == STEPS and losses[-1] < losses[0]  # it learns from the targets alone
    first_pass = parts_computed(tmp_path / "parts.jsonl")
    assert first_pass and len(first_pass) == len(set(first_pass))  # each part once
    for step in range(1, STEPS + 1):  # the two workers read disjoint ids, targets with them
        ranks = [
            {
                tuple(r["ids"])
                for r in map(json.loads, (tmp_path / "ids" / f"rank{k}.jsonl").read_text().splitlines())
                if r["step"] == step
            }
            for k in (0, 1)
        ]
        assert ranks[0] and ranks[1] and not set().union(*ranks[0]) & set().union(*ranks[1])
    assert result.details["zero_stage"] == 3

    # another student-side setting: the same targets, and no teacher pass at all
    again, _ = run(tmp_path, models, spec(lr=1e-3), "sampled-lr")
    assert parts_computed(tmp_path / "parts.jsonl") == first_pass
    assert again.metrics


def test_targets_made_with_another_teacher_or_k_beyond_the_vocabulary_are_refused(two_nodes, models, tmp_path):
    (tmp_path / "other").mkdir()
    index = tg.TargetsIndex(
        key="o",
        kind="sampled",
        k=8,
        temperature=1.0,
        seed=0,
        teacher="another-teacher",
        tokenizer="t",
        vocab_size=320,
        seq_len=32,
        id_dtype="<u2",
    )
    tg.write_index(str(tmp_path / "other"), index)
    targets = {"kind": "sampled", "k": 8, "path": str(tmp_path / "other")}
    with pytest.raises(UserError, match="made with another teacher"):
        run(tmp_path, models, spec(workers=1, placement_strategy="PACK", loss={"targets": targets}), "foreign")
    with pytest.raises(UserError, match="larger than the teacher's vocabulary"):
        distill.KIND.check(spec(loss={"targets": {"kind": "topk", "k": 4096}}), {"vocab_size": 1024})


def test_a_search_over_three_prune_candidates_runs_the_teacher_over_the_data_once(
    two_nodes, tiny_teacher, tmp_path, monkeypatch
):
    from compressor.config.schema import DataSource
    from compressor.contract.context import StageContext
    from compressor.stages import prune as prune_stage
    from compressor.stages.prune.spec import PruneSpec

    monkeypatch.setattr(tg, "PART_SEQUENCES", 4)
    monkeypatch.setenv(TARGETS_TRACE, str(tmp_path / "parts.jsonl"))
    short = {
        "global_batch": 4,
        "micro_batch": 4,
        "lr": 1e-3,
        "cpus_per_worker": 1,
        "loss": {"targets": {"kind": "sampled", "k": 8}},
        "deepspeed": {"zero_stage": 2},
    }
    search = {"tolerance": 0.2, "top_k": 3, "steps": 2, "data": "distill", "heldout_samples": 8, "distill": short}
    spec = PruneSpec(target={"params": 0.5}, calibration="calib", align=64, search=search)
    (tmp_path / "prune").mkdir()
    teacher = ModelRef(path=str(tiny_teacher), key="zoo:tiny-test")
    ctx = StageContext(
        work_dir=tmp_path / "prune",
        teacher=teacher,
        data={
            "calib": DataSource(source="zoo:tiny-test", samples=16, seq_len=64),
            "distill": DataSource(source="zoo:tiny-test", seq_len=64),
        },
        storage_path=str(tmp_path / "ray"),
        data_root=str(tmp_path / "data"),
        run_name="prune",
        quiet=True,
    )
    result = prune_stage.KIND.run(spec, teacher, ctx)
    assert len(result.details["search"]["ranking_after"]) == 3  # three candidates short-distilled from the targets
    assert sorted(parts_computed(tmp_path / "parts.jsonl")) == [0, 4]  # 2 steps x 4 sequences, each part once
