"""The distill stage in Ray Train on two simulated Ray nodes (ray.cluster_utils.Cluster, 1 CPU each): workers on two
nodes agree with one worker, failures and re-runs resume, outputs load, impossible placements are refused.

Each Ray Train fit costs ~15-25 s here, so the runs are few and short (random tiny Llamas, 6 steps)."""

import pytest
import torch
from conftest import simulated_cluster
from distill_helpers import FileSink, context, tiny_pair

from compressor.errors import StageFailed, UserError
from compressor.manifest import ModelRef
from compressor.stages import distill
from compressor.stages.distill.spec import DistillSpec

STEPS = 6


@pytest.fixture(scope="module")
def two_nodes():
    yield from simulated_cluster(2)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return tiny_pair(tmp_path_factory.mktemp("distill-models"))


def spec(**overrides) -> DistillSpec:
    base = dict(
        data="text",
        steps=STEPS,
        lr=3e-3,
        min_lr=3e-4,
        global_batch=4,
        micro_batch=2,
        checkpoint_every=2,
        loss={"chunk_tokens": 40},
        deepspeed={"zero_stage": 3},
    )
    return DistillSpec(**{**base, **overrides})


def run(tmp, models, stage_spec, sink, run_name="distill-test"):
    teacher, student, corpus = models
    work = tmp / f"work-{run_name}-{len(list(tmp.iterdir()))}"
    work.mkdir()
    ctx = context(work, teacher, corpus, sink, run_name=run_name, storage=tmp / "ray")
    return distill.KIND.run(stage_spec, ModelRef(path=str(student), key="student"), ctx), ctx


def trajectory(sink: FileSink) -> dict[int, float]:
    """step -> loss; a step replayed after a resume overwrites the earlier record."""
    return {r["step"]: r["loss"] for r in sink.records() if "loss" in r}


@pytest.fixture(scope="module")
def two_worker_run(two_nodes, models, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("two-workers")
    sink = FileSink(tmp / "metrics.jsonl")
    result, ctx = run(tmp, models, spec(workers=2, placement_strategy="STRICT_SPREAD"), sink)
    return result, ctx, sink


def test_two_zero3_workers_on_two_nodes_train_and_export_a_loadable_student(two_worker_run, models):
    import ray
    from transformers import AutoModelForCausalLM, AutoTokenizer

    result, ctx, sink = two_worker_run
    nodes = result.details["worker_nodes"]
    assert len(nodes) == 2 and nodes[0] != nodes[1]
    assert set(nodes) == {n["NodeID"] for n in ray.nodes() if n["Alive"]}
    assert result.details["zero_stage"] == 3
    losses = trajectory(sink)
    assert sorted(losses) == list(range(1, STEPS + 1))
    assert losses[STEPS] < 0.7 * losses[1]  # the student moves toward the teacher
    assert result.details["steps"] == STEPS and result.details["workers"] == 2
    assert result.metrics["kd_loss"] == pytest.approx(losses[STEPS])

    trained = AutoModelForCausalLM.from_pretrained(ctx.model_dir)
    before = AutoModelForCausalLM.from_pretrained(models[1])
    assert trained.config.to_dict()["intermediate_size"] == before.config.intermediate_size
    changed = [not torch.equal(a, b) for a, b in zip(trained.state_dict().values(), before.state_dict().values())]
    assert all(changed)  # every tensor was trained (ZeRO-3 consolidation gathered all shards)
    AutoTokenizer.from_pretrained(ctx.model_dir)("tokenizer travels with the model")
    # The checkpoints stay until the caller has published the model (a failed gate must not cost the training);
    # the stage names them as scratch, and dropping it is the publisher's last step.
    run_dir = ctx.work_dir.parent / "ray" / "distill-test"
    assert result.details["scratch"] == [str(run_dir)] and list(run_dir.glob("checkpoint_*"))
    from compressor.manifest import Manifest
    from compressor.runner import drop_scratch

    drop_scratch(Manifest(stage="distill", kind="distill", key="k", model_uri="model", details=result.details))
    assert not run_dir.exists()


def test_worker_failure_and_rerun_resume_from_the_last_checkpoint(two_worker_run, models, tmp_path):
    # First attempt: the worker dies after step 3 and no restarts are allowed -> the stage fails. The checkpoint of
    # step 2 stays in the run's storage.
    first = FileSink(tmp_path / "first.jsonl", die_at_step=3)
    with pytest.raises(StageFailed):
        run(tmp_path, models, spec(workers=1, max_failures=0), first, run_name="resume")
    assert [r["step"] for r in first.records() if r["step"] is not None] == [1, 2, 3]

    # A different distillation under the same run name must not resume that checkpoint.
    other = FileSink(tmp_path / "other.jsonl")
    with pytest.raises(UserError, match="holds a checkpoint of a different distillation"):
        run(tmp_path, models, spec(workers=1, lr=1e-3, max_failures=0), other, run_name="resume")
    assert other.records() == []

    # A re-run with the same run name resumes at step 2. Its worker dies after step 5, Ray Train restarts the
    # worker group (max_failures=1), and it resumes again from the checkpoint of step 4.
    second = FileSink(tmp_path / "second.jsonl", die_at_step=5)
    result, ctx = run(tmp_path, models, spec(workers=1, max_failures=1), second, run_name="resume")
    per_step = [r for r in second.records() if r["step"] is not None]  # the last record sums up the whole run
    assert [r["step"] for r in per_step] == [3, 4, 5, 5, 6]
    assert len({r["pid"] for r in per_step}) == 2  # a new worker process after the failure
    assert result.details["steps"] == STEPS
    assert (ctx.model_dir / "model.safetensors").is_file()

    # Resuming is exact, and one worker gives the same trajectory as two on the same global batch.
    one_worker = {**trajectory(first), **trajectory(second)}
    two_workers = trajectory(two_worker_run[2])
    for step in range(1, STEPS + 1):
        assert one_worker[step] == pytest.approx(two_workers[step], rel=1e-4, abs=1e-6), step


def test_cli_distills_under_zero2(two_nodes, models, tmp_path):
    from transformers import AutoModelForCausalLM
    from typer.testing import CliRunner

    from compressor.cli import application
    from compressor.manifest import Manifest

    teacher, student, corpus = models
    out = tmp_path / "distilled"
    args = [
        "distill",
        "--teacher",
        str(teacher),
        "--student",
        str(student),
        "--out",
        str(out),
        "--data",
        str(corpus),
        "--steps",
        "2",
        "--seq-len",
        "32",
        "--global-batch",
        "2",
        "--micro-batch",
        "1",
        "--deepspeed",
        "zero_stage=2",
        "--quiet",
    ]
    result = CliRunner().invoke(application(), args)
    assert result.exit_code == 0, result.output
    assert "distilled 2 steps (128 tokens) on 1 worker(s)" in result.output
    manifest = Manifest.read(out)
    assert manifest.kind == "distill" and manifest.details["zero_stage"] == 2 and manifest.details["grad_accum"] == 2
    AutoModelForCausalLM.from_pretrained(out)  # OUT is the checkpoint itself


def test_cli_bad_input_exits_2_with_one_message(models, tmp_path):
    import subprocess
    import sys

    teacher, student, _ = models
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    args = [
        "distill",
        "--teacher",
        str(teacher),
        "--student",
        str(student),
        "--out",
        str(tmp_path / "out"),
        "--data",
        str(empty),
        "--steps",
        "2",
    ]
    proc = subprocess.run([sys.executable, "-m", "compressor", *args], capture_output=True, text=True)
    assert proc.returncode == 2
    assert "error: --data:" in proc.stderr and "empty.txt: the file is empty" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "out").exists()


def test_more_workers_than_the_cluster_can_place_are_refused(two_nodes, models, tmp_path):
    teacher, student, corpus = models
    (tmp_path / "work").mkdir()
    ctx = context(tmp_path / "work", teacher, corpus, FileSink(tmp_path / "metrics.jsonl"), storage=tmp_path / "ray")
    for overrides, words in [
        ({"workers": 3, "global_batch": 6}, "need 3 CPU, the cluster has 2"),
        ({"cpus_per_worker": 2}, "no single node has the 2 CPU"),
        ({"workers": 2, "gpus_per_worker": 1}, "need 2 GPU"),
    ]:
        with pytest.raises(UserError, match=words):
            distill.KIND.run(spec(micro_batch=1, **overrides), ModelRef(path=str(student), key="student"), ctx)
    assert not (tmp_path / "ray").exists()  # refused before Ray Train started anything
