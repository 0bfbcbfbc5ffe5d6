"""Feature terms (hidden states and attention maps, with learned projectors where widths differ) and teachers with a
padded vocabulary: the torch-level pieces, the checks, and short real runs in Ray Train on the test teacher."""

import json
import subprocess
import sys

import pytest
import torch
from conftest import simulated_cluster
from distill_helpers import FileSink, build_llama, build_tokenizer, context

from compressor.errors import UserError
from compressor.manifest import ModelRef
from compressor.stages import distill
from compressor.stages.distill.layout import FeaturePair, check_pair, check_student, feature_pairs, uniform_map
from compressor.stages.distill.loss import Outputs, distill_loss, feature_term
from compressor.stages.distill.spec import DistillSpec, KDLoss

PRUNED_HIDDEN = 96  # tiny-test's hidden 128, width-pruned at align 32 (4 heads of 32 kept)


# ----------------------------------------------------------------------------- layer maps and checks (no Ray)
def test_the_uniform_map_pairs_tinyberts_layers():
    # TinyBERT (4 student layers of a 12-layer BERT): student layer m <-> teacher layer 3m, counted from 1.
    assert uniform_map(4, 12) == [(0, 2), (1, 5), (2, 8), (3, 11)]
    assert uniform_map(2, 4) == [(0, 1), (1, 3)]
    assert uniform_map(3, 4) == [(0, 0), (1, 1), (2, 3)]  # floor(i * 4 / 3): 1, 2, 4


def test_features_resolve_by_the_layer_map():
    uniform = KDLoss(features=[{"kind": "hidden_cosine", "weight": 0.5}], layer_map="uniform")
    assert feature_pairs(uniform, 2, 4) == [
        FeaturePair(0, 1, "hidden_cosine", 0.5),
        FeaturePair(1, 3, "hidden_cosine", 0.5),
    ]
    last = KDLoss(features=[{"kind": "attention_mse"}], layer_map="last")
    assert feature_pairs(last, 2, 4) == [FeaturePair(1, 3, "attention_mse", 1.0)]
    explicit = KDLoss(features=[{"student_layer": 0, "teacher_layer": 2}])
    assert feature_pairs(explicit, 2, 4) == [FeaturePair(0, 2, "hidden_mse", 1.0)]


def test_out_of_range_or_misplaced_layers_are_refused():
    from pydantic import ValidationError

    bad_student = DistillSpec(data="d", steps=1, loss={"features": [{"student_layer": 2, "teacher_layer": 0}]})
    with pytest.raises(UserError, match=r"features.0.student_layer: student layer 2 does not exist \(the student"):
        check_student(bad_student, {"num_hidden_layers": 2})
    bad_teacher = DistillSpec(data="d", steps=1, loss={"features": [{"student_layer": 0, "teacher_layer": 4}]})
    config = {"num_hidden_layers": 4, "vocab_size": 10, "hidden_size": 8}
    with pytest.raises(UserError, match=r"features.0.teacher_layer: teacher layer 4 does not exist"):
        check_pair(bad_teacher, config, config, "t")
    with pytest.raises(ValidationError, match="give student_layer and teacher_layer"):
        KDLoss(features=[{"student_layer": 0}])
    with pytest.raises(ValidationError, match="layer_map uniform chooses the layers"):
        KDLoss(features=[{"student_layer": 0, "teacher_layer": 0}], layer_map="uniform")
    smaller_teacher = {**config, "vocab_size": 8}
    with pytest.raises(UserError, match=r"student's vocab_size \(10\) differs from the teacher's \(8, t\)"):
        check_pair(DistillSpec(data="d", steps=1), config, smaller_teacher, "t")


def test_cli_refuses_an_out_of_range_feature_layer_with_exit_2(tiny_test_overrides):
    bad = "stages.distill.loss.features=[{student_layer: 7, teacher_layer: 0}]"
    proc = subprocess.run(
        [sys.executable, "-m", "compressor", "validate", "pipelines/tiny.yaml", *tiny_test_overrides, bad],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2, proc.stderr
    assert "features.0.student_layer: student layer 7 does not exist" in proc.stderr


def test_feature_terms_project_and_average_heads():
    torch.manual_seed(0)
    student, teacher = torch.randn(2, 5, 6), torch.randn(2, 5, 8)
    projector = torch.nn.Linear(6, 8, bias=False)
    want = ((projector(student) - teacher) ** 2).mean()
    torch.testing.assert_close(feature_term("hidden_mse", student, teacher, projector), want)
    cosine = feature_term("hidden_cosine", teacher, teacher)
    assert abs(cosine.item()) < 1e-6
    att_s, att_t = torch.rand(2, 2, 5, 5), torch.rand(2, 4, 5, 5)
    want = ((att_s.mean(1) - att_t.mean(1)) ** 2).mean()
    torch.testing.assert_close(feature_term("attention_mse", att_s, att_t), want)


def test_feature_terms_add_to_the_loss_and_train_the_projector():
    torch.manual_seed(1)
    vocab, tokens = 13, torch.randint(0, 13, (1, 7))
    head_s, head_t = torch.nn.Linear(6, vocab, bias=False), torch.nn.Linear(8, vocab, bias=False)
    hidden_s = tuple(torch.randn(1, 7, 6, requires_grad=True) for _ in range(3))
    hidden_t = tuple(torch.randn(1, 7, 8) for _ in range(3))
    pair = FeaturePair(1, 1, "hidden_mse", 0.5)
    projectors = torch.nn.ModuleDict({pair.name: torch.nn.Linear(6, 8, bias=False)})
    plain = distill_loss(Outputs(hidden_s), Outputs(hidden_t), tokens, head_s, head_t, KDLoss())
    terms = distill_loss(Outputs(hidden_s), Outputs(hidden_t), tokens, head_s, head_t, KDLoss(), [pair], projectors)
    want = 0.5 * ((projectors[pair.name](hidden_s[2]) - hidden_t[2]) ** 2).mean()
    torch.testing.assert_close(terms.features, want.detach())
    torch.testing.assert_close(terms.loss, plain.loss + want)
    terms.loss.backward()
    assert projectors[pair.name].weight.grad.abs().sum() > 0


# ----------------------------------------------------------------------------- real runs in Ray Train
@pytest.fixture(scope="module")
def two_nodes():
    yield from simulated_cluster(2)


@pytest.fixture(scope="module")
def pruned_student(tiny_teacher, tiny_corpus, tmp_path_factory):
    """tiny-test width-pruned by the prune stage: hidden 128 -> 96 (heads, MLP and layers kept)."""
    from compressor.config.schema import DataSource
    from compressor.contract.context import StageContext
    from compressor.stages import prune
    from compressor.stages.prune.spec import PruneSpec

    work = tmp_path_factory.mktemp("pruned")
    source = DataSource(source=str(tiny_corpus / "train.txt"), seq_len=64)
    ctx = StageContext(work_dir=work, data={"calib": source}, quiet=True)
    spec = PruneSpec(target={"hidden_size": PRUNED_HIDDEN}, calibration="calib", samples=16, batch_size=8)
    prune.KIND.run(spec, ModelRef(path=str(tiny_teacher), key="tiny-test"), ctx)
    return work / "model"


def distill_spec(**overrides) -> DistillSpec:
    base = dict(
        data="text",
        steps=4,
        lr=3e-3,
        min_lr=3e-4,
        global_batch=4,
        micro_batch=2,
        checkpoint_every=100,
        loss={"chunk_tokens": 64},
        deepspeed={"zero_stage": 3},
    )
    return DistillSpec(**{**base, **overrides})


def run(tmp, teacher, student, corpus, spec, name):
    sink = FileSink(tmp / f"{name}.jsonl")
    work = tmp / f"work-{name}"
    work.mkdir()
    ctx = context(work, teacher, corpus, sink, seq_len=64, run_name=name, storage=tmp / "ray")
    return distill.KIND.run(spec, ModelRef(path=str(student), key="student"), ctx), ctx, sink


def test_a_width_pruned_student_trains_with_projected_features_under_zero3_on_two_workers(
    two_nodes, tiny_teacher, tiny_corpus, pruned_student, tmp_path
):
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    assert json.loads((pruned_student / "config.json").read_text())["hidden_size"] == PRUNED_HIDDEN
    loss = {
        "chunk_tokens": 64,
        "features": [{"kind": "hidden_mse", "weight": 1.0}, {"kind": "attention_mse", "weight": 10.0}],
        "layer_map": "uniform",
        "projector_lr": 1e-2,
    }
    spec = distill_spec(workers=2, placement_strategy="STRICT_SPREAD", loss=loss)
    result, ctx, sink = run(tmp_path, tiny_teacher, pruned_student, tiny_corpus / "train.txt", spec, "features")
    records = [r for r in sink.records() if "feature_loss" in r]
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert all(r["feature_loss"] > 0 for r in records)
    assert records[-1]["feature_loss"] < records[0]["feature_loss"]  # projectors and student learn the features
    assert len(set(result.details["worker_nodes"])) == 2 and result.details["zero_stage"] == 3

    # The projectors are in the distill checkpoint (the student engine's module) ...
    final = next((tmp_path / "ray" / "features").glob("checkpoint_step00000004"))
    states = sorted(final.rglob("*model_states.pt"))
    assert states, sorted(p.name for p in final.rglob("*"))
    saved = torch.load(states[0], map_location="cpu", weights_only=False)
    names = [n for shapes in saved.get("param_shapes") or [] for n in shapes] + list(saved.get("module") or {})
    assert any(n.startswith("projectors.hidden_mse_s") for n in names), names
    # ... and not in the exported student, which loads in transformers.
    exported = ctx.model_dir
    keys = [k for f in exported.glob("*.safetensors") for k in safe_open(str(f), "pt").keys()]
    assert keys and not any("projector" in k for k in keys)
    model = AutoModelForCausalLM.from_pretrained(exported)
    assert model.config.hidden_size == PRUNED_HIDDEN


@pytest.fixture(scope="module")
def padded_teacher(tiny_teacher, tmp_path_factory):
    """tiny-test with its embedding and head padded from 1024 to 1088 rows, as hub checkpoints often are."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path_factory.mktemp("padded") / "teacher"
    model = AutoModelForCausalLM.from_pretrained(tiny_teacher)
    model.resize_token_embeddings(1088, mean_resizing=False)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(tiny_teacher).save_pretrained(out)
    return out


def test_a_padded_vocabulary_teacher_distils_into_the_unpadded_student(
    two_nodes, padded_teacher, pruned_student, tiny_corpus, tmp_path
):
    assert json.loads((padded_teacher / "config.json").read_text())["vocab_size"] == 1088
    spec = distill_spec(workers=1, steps=3)
    result, ctx, sink = run(tmp_path, padded_teacher, pruned_student, tiny_corpus / "train.txt", spec, "padded")
    losses = [r["kd_loss"] for r in sink.records() if "kd_loss" in r]
    assert len(losses) == 3 and all(0 < x < 20 for x in losses)
    assert json.loads((ctx.model_dir / "config.json").read_text())["vocab_size"] == 1024


def test_a_larger_vocabulary_with_another_tokenizer_is_refused(padded_teacher, tiny_corpus, tmp_path):
    # 1024 rows, like tiny-test, but another tokenizer: a real mismatch, not padding.
    student = build_llama(
        tmp_path / "other", build_tokenizer(), hidden=64, intermediate=64, layers=2, seed=3, vocab=1024
    )
    with pytest.raises(
        UserError,
        match=r"teacher's vocab_size \(1088, .*\) is larger than the student's \(1024\).*"
        "tokenizers differ",
    ):
        run(tmp_path, padded_teacher, student, tiny_corpus / "train.txt", distill_spec(), "refused")
