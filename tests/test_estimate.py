"""compressor.estimate: exact parameter counts from config.json, FLOPs, GPU-hours; offline teacher configs
(compressor.models.offline_config), which every estimate starts from."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from compressor import estimate
from compressor.config.load import load_pipeline
from compressor.config.schema import TeacherSpec
from compressor.contract import stage_flops
from compressor.errors import UserError
from compressor.models import offline_config
from compressor.models.config import SHIPPED_CONFIGS
from compressor.stages.evaluate.spec import EvaluateSpec

ROOT = Path(__file__).resolve().parent.parent
LLAMA_8B = json.loads((SHIPPED_CONFIGS / "meta-llama--Llama-3.1-8B.json").read_text())
WIDTH_4B = {**LLAMA_8B, "hidden_size": 3072, "intermediate_size": 9216}  # head_dim stays 128


def test_llama_3_1_8b_and_minitron_4b_width_param_counts():
    assert estimate.param_count(LLAMA_8B) == 8_030_261_248  # the published Llama-3.1-8B count
    assert estimate.param_count(WIDTH_4B) == pytest.approx(4.5e9, rel=0.01)  # Minitron-4B-Width: 4.51B
    assert estimate.param_count({**LLAMA_8B, "num_hidden_layers": 16}) == pytest.approx(4.5e9, rel=0.01)  # 4B-Depth


def test_smollm2_135m_shipped_config():
    config = json.loads((SHIPPED_CONFIGS / "HuggingFaceTB--SmolLM2-135M.json").read_text())
    assert estimate.param_count(config) == 134_515_008  # tied embeddings are counted once
    pruned = {**config, "hidden_size": 384, "intermediate_size": 1024, "num_attention_heads": 6}  # head_dim stays 64
    assert estimate.param_count(pruned) == pytest.approx(67.6e6, rel=0.01)


TINY = {
    "vocab_size": 96,
    "hidden_size": 32,
    "intermediate_size": 48,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 64,
}


@pytest.mark.parametrize(
    "model_type,extra",
    [
        ("llama", {}),
        ("llama", {"tie_word_embeddings": True}),
        ("llama", {"head_dim": 16}),  # explicit head_dim != hidden / heads, as Minitron exports
        ("llama", {"attention_bias": True, "mlp_bias": True}),
        ("mistral", {"head_dim": 8}),
        ("qwen2", {"tie_word_embeddings": True}),
    ],
)
def test_param_count_matches_transformers(model_type, extra):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = {**TINY, "model_type": model_type, **extra}
    hf_config = AutoConfig.for_model(model_type, **{k: v for k, v in config.items() if k != "model_type"})
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf_config)
    assert estimate.param_count(config) == sum(p.numel() for p in model.parameters())


def test_missing_shape_key_is_a_user_error():
    with pytest.raises(UserError, match="intermediate_size"):
        estimate.param_count({k: v for k, v in TINY.items() if k != "intermediate_size"})


def test_forward_flops_follow_the_palm_convention():
    per_token = estimate.forward_flops_per_token(LLAMA_8B, seq_len=8192)
    non_embedding_matmuls = 8_030_261_248 - 128256 * 4096 - (2 * 32 + 1) * 4096  # minus embedding lookup and norms
    assert per_token == 2 * non_embedding_matmuls + 4 * 32 * 8192 * 4096


def test_distill_flops_teacher_forward_plus_student_train_step():
    spec = load_pipeline(ROOT / "pipelines" / "llama8b_to_4b.yaml")
    distill = spec.stages[1]
    flops = stage_flops("distill", distill.spec, WIDTH_4B, WIDTH_4B, spec, teacher_cfg=LLAMA_8B)
    teacher = estimate.forward_flops_per_token(LLAMA_8B, 8192)
    student = estimate.forward_flops_per_token(WIDTH_4B, 8192)
    # 94e9 tokens, rounded up to whole optimizer steps: what the run trains (distill.layout.budget)
    trained = math.ceil(94e9 / (distill.spec.global_batch * 8192)) * distill.spec.global_batch * 8192
    assert 94e9 <= trained < 94e9 + distill.spec.global_batch * 8192
    assert flops == pytest.approx(trained * (teacher + 3 * student))
    # Without an explicit teacher config the pipeline's teacher is resolved offline (shipped config).
    assert stage_flops("distill", distill.spec, WIDTH_4B, WIDTH_4B, spec) == pytest.approx(flops)
    # Thousands of H100-hours at 40% MFU, as the issue expects of the real job.
    assert 2_000 < estimate.gpu_hours(flops, "H100", 0.4) < 10_000


def test_the_plan_derives_the_distill_budget_once_and_its_estimate_reads_those_figures(tmp_path):
    """Distill's steps follow from its token budget and its data's seq_len: the plan derives them once
    (PlannedStage.derived, what the run gets as ctx.planned) and the FLOPs estimate takes them from there."""
    from compressor.planning import make_plan

    spec = load_pipeline(ROOT / "pipelines" / "llama8b_to_4b.yaml")
    stage = make_plan(spec, storage=str(tmp_path)).stages[1]
    batch = stage.entry.spec.global_batch
    steps = math.ceil(94e9 / (batch * 8192))
    assert stage.derived == {
        "seq_len": 8192,
        "steps": steps,
        "sequences": steps * batch,
        "tokens": steps * batch * 8192,
    }
    planned = stage_flops("distill", stage.entry.spec, WIDTH_4B, WIDTH_4B, spec, LLAMA_8B, derived=stage.derived)
    assert planned == pytest.approx(stage_flops("distill", stage.entry.spec, WIDTH_4B, WIDTH_4B, spec, LLAMA_8B))
    halved = {**stage.derived, "tokens": stage.derived["tokens"] // 2}
    assert stage_flops("distill", stage.entry.spec, WIDTH_4B, WIDTH_4B, spec, LLAMA_8B, derived=halved) == (
        pytest.approx(planned / 2)
    )


def test_stage_flops_scale_with_calibration_and_steps():
    spec = load_pipeline(ROOT / "pipelines" / "llama8b_to_4b.yaml")
    prune, quantize = spec.stages[0].spec, spec.stages[2].spec
    base = stage_flops("prune", prune, LLAMA_8B, WIDTH_4B, spec)
    assert base == pytest.approx(1024 * 4096 * estimate.forward_flops_per_token(LLAMA_8B, 4096))
    doubled = stage_flops("prune", prune.model_copy(update={"samples": 2048}), LLAMA_8B, WIDTH_4B, spec)
    assert doubled == pytest.approx(2 * base)
    by_loss = prune.model_copy(
        update={"depth_metric": "loss", "target": prune.target.model_copy(update={"num_layers": 16})}
    )
    assert stage_flops("prune", by_loss, LLAMA_8B, WIDTH_4B, spec) == pytest.approx(33 * base)  # +1 pass per layer
    gptq = stage_flops("quantize", quantize, WIDTH_4B, WIDTH_4B, spec)
    assert gptq > 2 * 256 * 2048 * estimate.forward_flops_per_token(WIDTH_4B, 2048)  # forwards plus Hessian work
    evaluate = stage_flops("evaluate", EvaluateSpec(tasks=["winogrande"]), WIDTH_4B, WIDTH_4B, spec)
    assert 0 < evaluate < estimate.eval_flops(WIDTH_4B, spec.evaluation.tasks)


def test_gpu_hours_and_its_errors():
    assert estimate.gpu_hours(989e12 * 0.5 * 3600, "H100", 0.5) == pytest.approx(1.0)
    assert estimate.gpu_hours(312e12 * 3600, "a100", 1.0) == pytest.approx(1.0)
    with pytest.raises(UserError, match="unknown GPU type"):
        estimate.gpu_hours(1e18, "TPUv9", 0.4)
    with pytest.raises(UserError, match="--mfu"):
        estimate.gpu_hours(1e18, "H100", 1.5)


def test_teacher_config_resolves_offline(tmp_path, monkeypatch):
    import socket

    def no_network(*args, **kwargs):
        raise AssertionError("offline_config must not touch the network")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    assert offline_config(TeacherSpec(model="meta-llama/Llama-3.1-8B")) == LLAMA_8B  # shipped by hub id
    assert offline_config(TeacherSpec(model="org/x", config="meta-llama--Llama-3.1-8B")) == LLAMA_8B
    (tmp_path / "cfg.json").write_text(json.dumps(TINY))
    assert offline_config(TeacherSpec(model="org/x", config="cfg.json"), base_dir=tmp_path) == TINY
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "config.json").write_text(json.dumps(TINY))
    assert offline_config(TeacherSpec(model=str(tmp_path / "ckpt"))) == TINY
    assert offline_config(TeacherSpec(model="nobody/unknown-model")) is None
    with pytest.raises(UserError, match="teacher.config"):
        offline_config(TeacherSpec(model="org/x", config="missing.json"), base_dir=tmp_path)


def test_teacher_config_of_a_zoo_model():
    from compressor.models import zoo

    config = offline_config(TeacherSpec(model="zoo:tiny-test"))
    assert config == zoo.model_config("tiny-test")
    assert estimate.param_count(config) > 0


@pytest.mark.parametrize(
    "pipeline,teacher,target",
    [
        ("llama8b_to_4b.yaml", "8.03B", "4.51B"),  # Minitron-4B-Width: 4.5B within 1%
        ("llama8b_to_4b_depth.yaml", "8.03B", "4.54B"),
        ("smollm2_135m.yaml", "134.52M", "67.56M"),
    ],
)
def test_plan_counts_parameters_offline(pipeline, teacher, target, monkeypatch):
    """`compressor plan` on the shipped recipes, with every network connection refused."""
    import socket

    from typer.testing import CliRunner

    from compressor.cli import app

    def no_network(*args, **kwargs):
        raise OSError("network access during plan")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setenv("COLUMNS", "200")
    result = CliRunner().invoke(app, ["plan", str(ROOT / "pipelines" / pipeline), "--gpu", "H100", "--mfu", "0.4"])
    assert result.exit_code == 0, result.output
    assert f"({teacher} params)" in result.output
    prune_row = next(line for line in result.output.splitlines() if "prune" in line)
    assert teacher in prune_row and target in prune_row
    assert "H100-hours" in result.output
