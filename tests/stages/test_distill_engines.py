"""The stage's DeepSpeed training step (one process, no Ray) equals plain PyTorch: same loss, same updates."""

import os
import socket

import pytest
import torch

from compressor.config.stages import DistillSpec
from compressor.stages.distill.engines import build_engines, lr_at, train_step
from compressor.stages.distill.loss import distill_loss

from distill_helpers import build_llama, build_tokenizer


@pytest.fixture(scope="module")
def single_process_group():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    yield
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    # Leave no rank variables behind: later tests start subprocesses (lm_eval) that would join a process group.
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def test_deepspeed_step_matches_plain_pytorch(single_process_group, tmp_path):
    from transformers import AutoModelForCausalLM

    tokenizer = build_tokenizer()
    teacher = build_llama(tmp_path / "teacher", tokenizer, hidden=64, intermediate=128, layers=2, seed=1)
    student = build_llama(tmp_path / "student", tokenizer, hidden=64, intermediate=64, layers=2, seed=2)
    # Everything at once: CE mix, temperature, hidden MSE, 3 loss chunks, clipping, accumulation, warm-up + cosine.
    spec = DistillSpec(data="d", steps=3, lr=1e-3, min_lr=1e-4, warmup_steps=1, grad_clip=0.05,
                       loss={"alpha": 0.3, "temperature": 2.0, "chunk_tokens": 16, "hidden_mse": [(0, 1)]},
                       deepspeed={"zero_stage": 0})
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
