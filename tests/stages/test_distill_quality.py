"""Quality: on the reference teacher pruned to ~50% of its non-embedding weights, distillation recovers most of the
perplexity gap within a fixed budget, and beats training the same student on hard labels (CE) with the same tokens.

Perplexity is measured like the pipeline's `ref_ppl` task: each held-out paragraph scored on its own from BOS, the
format the teacher was trained in. (On the distillation stream itself, EOS-joined shuffled paragraphs, CE can also
learn that packing format, which the teacher never saw; that measures the format, not what was recovered.)"""

import json
import math
import os

import pytest
import torch

from compressor.config.schema import DataSource
from compressor.contract.context import MetricsSink, StageContext
from compressor.manifest import ModelRef
from compressor.stages.distill.spec import DistillSpec
from compressor.stages.prune.spec import PruneSpec

BUDGET = dict(steps=30, global_batch=8, micro_batch=8, seq_len=128)  # 30,720 tokens, a few seconds of training


@pytest.fixture(scope="module")
def ray_local():
    import ray

    if ray.is_initialized():  # another test module's connection; this one needs its own cluster
        ray.shutdown()
    os.environ.update(RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_AUTH_MODE="disabled")
    ray.init(address="local", num_cpus=2)
    yield
    ray.shutdown()


@torch.no_grad()
def paragraph_perplexity(model_dir, paragraphs, tokenizer, seq_len=128) -> float:
    from compressor.models import load_model

    model, nll, count = load_model(model_dir), 0.0, 0
    for start in range(0, len(paragraphs), 16):
        ids = [
            [tokenizer.bos_token_id, *tokenizer(p, add_special_tokens=False)["input_ids"][: seq_len - 1]]
            for p in paragraphs[start : start + 16]
        ]
        width = max(map(len, ids))
        tokens = torch.tensor([row + [0] * (width - len(row)) for row in ids])
        mask = torch.tensor([[1] * len(row) + [0] * (width - len(row)) for row in ids])
        logits = model(input_ids=tokens, attention_mask=mask).logits[:, :-1].float()
        losses = torch.nn.functional.cross_entropy(logits.transpose(1, 2), tokens[:, 1:], reduction="none")
        nll += (losses * mask[:, 1:]).sum().item()
        count += mask[:, 1:].sum().item()
    return math.exp(nll / count)


def context(work, teacher, seq_len=128) -> StageContext:
    work.mkdir()
    return StageContext(
        work_dir=work,
        teacher=ModelRef(path=str(teacher), key="zoo:tiny-test"),
        data={"corpus": DataSource(source="zoo:tiny-test", seq_len=seq_len, samples=128)},
        storage_path=str(work.parent / "ray"),
        run_name=work.name,
        sink=MetricsSink(),
        quiet=True,
    )


@pytest.mark.slow
def test_distillation_beats_hard_labels_on_a_pruned_reference_teacher(ray_local, tiny_teacher, tiny_corpus, tmp_path):
    from compressor.models import load_tokenizer
    from compressor.stages import distill, prune

    teacher = tiny_teacher
    pruned_ctx = context(tmp_path / "pruned", teacher)
    prune.KIND.run(
        PruneSpec(target={"intermediate_size": 128}, calibration="corpus"),
        ModelRef(path=str(teacher), key="t"),
        pruned_ctx,
    )  # MLP 384 -> 128: half of the non-embedding weights
    pruned = ModelRef(path=str(pruned_ctx.model_dir), key="pruned")

    students = {}
    for name, alpha in (("kd", 0.0), ("ce", 1.0)):  # the same run but for the loss: logit KD, or hard labels only
        ctx = context(tmp_path / name, teacher)
        spec = DistillSpec(data="corpus", lr=3e-3, min_lr=3e-4, loss={"alpha": alpha}, **BUDGET)
        distill.KIND.run(spec, pruned, ctx)
        students[name] = ctx.model_dir

    tokenizer = load_tokenizer(teacher)
    paragraphs = [p for p in (tiny_corpus / "heldout.txt").read_text().split("\n\n") if p.strip()][:300]
    ppl = {
        name: paragraph_perplexity(path, paragraphs, tokenizer)
        for name, path in {"teacher": teacher, "pruned": pruned.path, **students}.items()
    }
    gap = ppl["pruned"] - ppl["teacher"]
    recovered = {name: (ppl["pruned"] - ppl[name]) / gap for name in students}
    print(json.dumps({"perplexity": ppl, "gap_recovered": recovered, "tokens": 30 * 8 * 128}))

    assert gap > 10  # pruning really hurt
    assert recovered["kd"] >= 0.5  # distillation recovers most of it
    assert ppl["kd"] < ppl["ce"]  # and beats hard labels on the same tokens
