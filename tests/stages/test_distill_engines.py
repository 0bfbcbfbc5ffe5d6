"""The stage's DeepSpeed training step (no Ray) equals plain PyTorch: same loss, same updates. Gradient checkpointing
and ZeRO++ hierarchical partitioning change the work, not the numbers; under ZeRO-3 each 128k-vocabulary output head
is all-gathered once per micro-batch, however many chunks the KD loss has (2 processes, gloo)."""

import os
import socket

import pytest
import torch
from distill_helpers import build_llama, build_tokenizer, single_process_group  # noqa: F401 (fixture)

from compressor.stages.distill.engines import build_engines, lr_at, train_step
from compressor.stages.distill.loss import distill_loss
from compressor.stages.distill.spec import DistillSpec


def test_deepspeed_step_matches_plain_pytorch(single_process_group, tmp_path):
    from transformers import AutoModelForCausalLM

    tokenizer = build_tokenizer()
    teacher = build_llama(tmp_path / "teacher", tokenizer, hidden=64, intermediate=128, layers=2, seed=1)
    student = build_llama(tmp_path / "student", tokenizer, hidden=64, intermediate=64, layers=2, seed=2)
    # Everything at once: CE mix, temperature, hidden MSE, 3 loss chunks, clipping, accumulation, warm-up + cosine.
    spec = DistillSpec(
        data="d",
        steps=3,
        lr=1e-3,
        min_lr=1e-4,
        warmup_steps=1,
        grad_clip=0.05,
        loss={"alpha": 0.3, "temperature": 2.0, "chunk_tokens": 16, "hidden_mse": [(0, 1)]},
        deepspeed={"zero_stage": 0},
    )
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, 320, (2, 24), generator=gen) for _ in range(2)]

    engines = build_engines(spec, str(student), str(teacher), world_size=1, micro_batch=2, grad_accum=2)
    got = [train_step(engines, batches, lr_at(step, spec, 3)) for step in range(3)]

    s, t = AutoModelForCausalLM.from_pretrained(student), AutoModelForCausalLM.from_pretrained(teacher)
    optimizer = torch.optim.AdamW(s.parameters(), lr=1e-3, weight_decay=0.0)
    for step in range(3):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, spec, 3)
        total = 0.0
        for tokens in batches:
            with torch.no_grad():
                t_states = t.model(input_ids=tokens, output_hidden_states=True).hidden_states
            s_states = s.model(input_ids=tokens, output_hidden_states=True).hidden_states
            terms = distill_loss(s_states, t_states, tokens, s.lm_head, t.lm_head, spec.loss)
            (terms.loss / len(batches)).backward()
            total += terms.loss.item() / len(batches)
        torch.nn.utils.clip_grad_norm_(s.parameters(), 0.05)
        optimizer.step()
        optimizer.zero_grad()
        assert got[step].loss == pytest.approx(total, rel=1e-5)
        assert got[step].hidden_mse > 0
    for a, b in zip(engines.student_model.parameters(), s.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    assert lr_at(0, spec, 3) == pytest.approx(1e-3) and lr_at(2, spec, 3) == pytest.approx(1e-4)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """(teacher dir, student dir): random tiny Llamas with the shared test vocabulary."""
    root = tmp_path_factory.mktemp("engine-models")
    tokenizer = build_tokenizer()
    teacher = build_llama(root / "teacher", tokenizer, hidden=64, intermediate=128, layers=2, seed=1)
    student = build_llama(root / "student", tokenizer, hidden=64, intermediate=64, layers=2, seed=2)
    return str(teacher), str(student)


def test_a_step_with_teacher_targets_builds_no_teacher(single_process_group, pair, monkeypatch):
    """With loss.targets the engines load the student only (a spy on the loader), and a step trains from targets."""
    from transformers import AutoModelForCausalLM

    teacher, student = pair
    loaded = []
    real = AutoModelForCausalLM.from_pretrained
    monkeypatch.setattr(
        AutoModelForCausalLM, "from_pretrained", lambda path, **kw: loaded.append(str(path)) or real(path, **kw)
    )
    spec = DistillSpec(data="x", steps=2, global_batch=2, micro_batch=2, loss={"targets": {"kind": "topk", "k": 4}})
    engines = build_engines(spec, student, teacher, world_size=1, micro_batch=2, grad_accum=1)
    assert engines.teacher is None and loaded == [student]
    tokens = torch.randint(0, 320, (2, 16), generator=torch.Generator().manual_seed(0))
    sparse = {
        "ids": torch.randint(0, 320, (2, 16, 4)),
        "val": torch.full((2, 16, 4), -3.0),
        "tail": torch.full((2, 16), 0.8),
    }
    result = train_step(engines, [(tokens, sparse)], 1e-3)
    assert result.kd_loss > 0 and result.grad_norm


def test_gradient_checkpointing_recomputes_the_layers_and_trains_the_same(single_process_group, pair):
    teacher, student = pair
    gen = torch.Generator().manual_seed(3)
    batches = [torch.randint(0, 320, (2, 24), generator=gen) for _ in range(2)]
    runs = {}
    for on in (False, True):
        spec = DistillSpec(
            data="d",
            steps=2,
            lr=1e-3,
            warmup_steps=0,
            gradient_checkpointing=on,
            loss={"chunk_tokens": 16},
            deepspeed={"zero_stage": 2},
        )
        engines = build_engines(spec, student, teacher, world_size=1, micro_batch=2, grad_accum=2)
        calls = []
        # transformers checkpoints a layer's forward (its own hooks run once); its MLP starts again in backward (and
        # recomputation stops once it has the tensors backward needs, so count the MLP's starts, not its ends)
        engines.student_model.model.layers[0].mlp.register_forward_pre_hook(lambda *_: calls.append(1))
        losses = [train_step(engines, batches, lr_at(step, spec, 2)).loss for step in range(2)]
        runs[on] = (engines, losses, len(calls))
    (plain, plain_losses, plain_calls), (ckpt, ckpt_losses, ckpt_calls) = runs[False], runs[True]
    assert ckpt.student_model.is_activation_checkpointing and not plain.student_model.is_activation_checkpointing
    assert (plain_calls, ckpt_calls) == (4, 8)  # 2 steps x 2 micro-batches; recomputed in backward
    assert ckpt_losses == pytest.approx(plain_losses, rel=1e-5)
    for a, b in zip(ckpt.student_model.parameters(), plain.student_model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def zero3_worker(rank: int, port: int, teacher: str, student: str, out: str) -> None:
    """One of two ZeRO-3 processes: 3 steps with gradient checkpointing, counting the all-gathers of each output head
    per micro-batch; then 3 steps of the same run under ZeRO++ hierarchical partitioning."""
    import json

    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    torch.set_num_threads(1)
    from compressor.stages.distill import engines as engines_module

    engines_module.prepare_deepspeed_env()
    from deepspeed.runtime.zero.partitioned_param_coordinator import PartitionedParameterCoordinator

    # The test heads (320 x 64) are below ZeRO-3's persistence threshold, which would keep them whole on every rank;
    # the 128k-vocabulary heads of a real run are far above it. Partition them here as they would be there.
    for name in ("student_config", "teacher_config"):

        def partitioned(*args, _make=getattr(engines_module, name), **kwargs):
            config = _make(*args, **kwargs)
            config["zero_optimization"]["stage3_param_persistence_threshold"] = 0
            return config

        setattr(engines_module, name, partitioned)
    gathered, from_secondary = [], []
    fetch = PartitionedParameterCoordinator._PartitionedParameterCoordinator__all_gather_params

    def counting_fetch(self, params, forward):
        gathered.extend(p.ds_id for p in params)
        from_secondary.extend(getattr(p, "ds_secondary_tensor", None) is not None for p in params)
        return fetch(self, params, forward)

    PartitionedParameterCoordinator._PartitionedParameterCoordinator__all_gather_params = counting_fetch
    gen = torch.Generator().manual_seed(rank)
    batches = [[torch.randint(0, 320, (2, 33), generator=gen)] for _ in range(3)]  # 64 targets: 4 chunks of 16
    result = {}
    for name, overrides in [
        ("checkpointed", {"gradient_checkpointing": True}),
        ("hpz", {"deepspeed": {"zero_stage": 3, "zero_hpz_partition_size": 2}}),
    ]:
        spec = DistillSpec(
            **{
                "data": "d",
                "steps": 3,
                "lr": 1e-3,
                "warmup_steps": 0,
                "workers": 2,
                "loss": {"chunk_tokens": 16},
                "deepspeed": {"zero_stage": 3},
                **overrides,
            }
        )
        engines = engines_module.build_engines(spec, student, teacher, world_size=2, micro_batch=2, grad_accum=1)
        heads = (
            engines.student_model.get_output_embeddings().weight.ds_id,
            engines.teacher.module.teacher.get_output_embeddings().weight.ds_id,
        )
        counts, losses = [], []
        from_secondary.clear()
        for step in range(3):
            gathered.clear()
            losses.append(engines_module.train_step(engines, batches[step], 1e-3).loss)
            counts.append([gathered.count(head) for head in heads])
        result[name] = {"losses": losses, "head_gathers": counts, "secondary_gathers": sum(from_secondary)}
    if rank == 0:
        with open(out, "w") as fh:
            json.dump(result, fh)


def test_two_zero3_workers_gather_each_head_once_per_micro_batch(pair, tmp_path):
    import json

    import torch.multiprocessing as mp

    teacher, student = pair
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "result.json"
    mp.spawn(zero3_worker, args=(port, teacher, student, str(out)), nprocs=2)
    result = json.loads(out.read_text())
    first, *steady = result["checkpointed"]["head_gathers"]
    # The first micro-batch records ZeRO-3's module trace and gathers a head at each call: 4 chunks in the forward,
    # 4 recomputations in backward, and for the student head 4 backward passes.
    assert first == [12, 8]
    # From then on the trace keeps each head gathered over all its calls: one all-gather per micro-batch, with
    # gradient checkpointing recomputing the decoder layers in between.
    assert steady == [[1, 1], [1, 1]]
    # Hierarchical partitioning gathers weights again from a secondary copy split within the group (in backward);
    # it changes where the weights come from, not the numbers.
    assert result["hpz"]["secondary_gathers"] > 0 and result["checkpointed"]["secondary_gathers"] == 0
    assert result["hpz"]["losses"] == pytest.approx(result["checkpointed"]["losses"], rel=1e-5)


def test_hierarchical_partitioning_config():
    from pydantic import ValidationError

    from compressor.stages.distill.deepspeed_config import student_config, teacher_config

    spec = DistillSpec(
        data="d",
        steps=1,
        global_batch=64,
        micro_batch=1,
        workers=64,
        gpus_per_worker=1,
        deepspeed={"zero_stage": 3, "zero_hpz_partition_size": 8},
    )
    zero = student_config(spec, 64, 1, 1, bf16=True, on_gpu=True)["zero_optimization"]
    assert zero == {"stage": 3, "stage3_max_reuse_distance": 10**9, "zero_hpz_partition_size": 8}
    # DeepSpeed 0.19.8 cannot build an optimizer-less engine with hpZ: the teacher never gets it.
    assert "zero_hpz_partition_size" not in teacher_config(1, True)["zero_optimization"]
    plain = spec.model_copy(update={"deepspeed": spec.deepspeed.model_copy(update={"zero_hpz_partition_size": 1})})
    assert "zero_hpz_partition_size" not in student_config(plain, 64, 1, 1, bf16=True, on_gpu=True)["zero_optimization"]
    for overrides, words in [
        ({"deepspeed": {"zero_stage": 2, "zero_hpz_partition_size": 8}}, "needs deepspeed.zero_stage 3"),
        ({"workers": 12, "deepspeed": {"zero_hpz_partition_size": 8}}, "does not divide workers 12"),
        ({"workers": 1, "deepspeed": {"zero_hpz_partition_size": 8}}, "does not divide workers 1"),
    ]:
        with pytest.raises(ValidationError, match=words):
            DistillSpec(**{"data": "d", "steps": 1, "global_batch": 96, **overrides})
