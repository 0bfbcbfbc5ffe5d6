"""Chat data for distillation: the loss mask, packing (attention within each example) and chat shards.

The loss-mask claim, as tested: with causal attention an answer token's loss depends on the prompt through its
context, so "random prompts give the same loss" holds for the loss *terms at prompt positions*, which must not be
counted at all. The tests check that (1) the masked loss equals a hand-made mean over answer positions only, (2)
changing the prompt tokens while keeping every answer position's prediction fixed (a model whose logits depend on
the current token only) leaves the loss unchanged, and (3) the gradient through the prompt positions' own outputs
is zero."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from compressor import chat_data
from compressor.errors import UserError


def test_packing_keeps_examples_whole():
    packed = list(chat_data.pack([([1, 2, 3], 1), ([4, 5], 1), ([6, 7, 8, 9], 2)], 6, pad_id=0))
    assert [p.tokens.tolist() for p in packed] == [[1, 2, 3, 4, 5, 0], [6, 7, 8, 9, 0, 0]]
    assert [p.loss_mask.tolist() for p in packed] == [[0, 0, 1, 0, 1, 0], [0, 0, 1, 1, 0, 0]]
    assert [p.positions.tolist() for p in packed] == [[0, 1, 2, 0, 1, 0], [0, 1, 2, 3, 0, 1]]
    target = chat_data.target_mask(torch.tensor(np.stack([p.loss_mask for p in packed])))
    # position 1 predicts token 3 (answer); position 2 predicts the next example's first token: never counted
    assert target.int().tolist() == [[0, 1, 0, 1, 0, 0], [0, 1, 1, 0, 0, 0]]


def tiny_llama(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, attn_implementation="sdpa",
    )  # fmt: skip
    return LlamaForCausalLM(config).eval()


def masked_ce(model, tokens, loss_mask, positions=None):
    """The mean next-token CE over the positions whose target is an answer token (as the distill loss counts)."""
    kwargs = {}
    if positions is not None:
        kwargs = {"position_ids": positions, "attention_mask": chat_data.attention_mask(positions, torch.float32)}
    logits = model(input_ids=tokens, **kwargs).logits
    keep = chat_data.target_mask(loss_mask)
    terms = torch.nn.functional.cross_entropy(logits.transpose(1, 2)[..., :-1], tokens[:, 1:], reduction="none")
    return terms[keep[:, :-1]], logits


def test_packed_examples_have_their_unpacked_loss():
    model = tiny_llama()
    a, b = [3, 9, 14, 20, 7], [5, 6, 30, 31]
    examples = [(a, 2), (b, 3)]
    (packed,) = chat_data.pack(examples, 12, pad_id=0)
    as_tensor = {k: torch.tensor(getattr(packed, k)).unsqueeze(0).long() for k in ("tokens", "loss_mask", "positions")}
    with torch.no_grad():
        together, _ = masked_ce(model, as_tensor["tokens"], as_tensor["loss_mask"], as_tensor["positions"])
        alone = []
        for ids, answer in examples:
            mask = torch.tensor([[0] * (len(ids) - answer) + [1] * answer])
            alone.append(masked_ce(model, torch.tensor([ids]), mask)[0])
    assert torch.allclose(together, torch.cat(alone), atol=1e-5)
    assert together.numel() == 2 + 3  # each answer token is predicted once, from the position before it


def test_chat_shards_hold_tokens_mask_and_positions(tmp_path, tiny_teacher):
    import shutil

    from compressor.models.zoo.chat import add_chat_template
    from compressor.shards import ShardReader

    model = tmp_path / "tok"
    shutil.copytree(tiny_teacher, model)
    add_chat_template(model)
    rows = tmp_path / "answers.jsonl"
    lines = [{"prompt": f"question {i}", "response": "os"} for i in range(20)]
    lines.append({"messages": [{"role": "user", "content": "long " * 80}], "response": "math"})  # > seq_len
    lines.append({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "time"}]})
    rows.write_text("".join(json.dumps(line) + "\n" for line in lines))
    directory = chat_data.prepare(str(rows), str(model), 32, None, "drop", str(tmp_path / "data"))
    counts = chat_data.read_counts(directory)
    assert counts["examples"] == 22 and counts["dropped"] == 1 and counts["kept"] == 21
    sides = {side: ShardReader(f"{directory}/{side}") for side in chat_data.SIDES}
    assert len(sides["tokens"]) == len(sides["loss_mask"]) == counts["sequences"] > 1
    ids = np.arange(counts["sequences"])
    assert int(sides["loss_mask"].read(ids).sum()) == counts["answer_tokens"]
    assert (sides["positions"].read(ids)[:, 0] == 0).all()
    truncated = chat_data.prepare(str(rows), str(model), 32, None, "prompt", str(tmp_path / "data"))
    assert chat_data.read_counts(truncated)["truncated"] == 1 and truncated != directory

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "no answer here"}\n')
    with pytest.raises(UserError, match="bad.jsonl:1: no answer"):
        chat_data.prepare(str(bad), str(model), 32, None, "drop", str(tmp_path / "data"))


def _loss_inputs(seed: int = 0):
    """Final hidden states of a [1, 8] batch (3 prompt tokens, 5 answer tokens) and the two output heads."""
    torch.manual_seed(seed)
    student_head, teacher_head = torch.nn.Linear(16, 64, bias=False), torch.nn.Linear(16, 64, bias=False)
    student = torch.randn(1, 8, 16, requires_grad=True)
    teacher = torch.randn(1, 8, 16)
    tokens = torch.randint(0, 64, (1, 8))
    loss_mask = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1]])
    return student, teacher, tokens, loss_mask, student_head, teacher_head


def test_masked_distill_loss_counts_answer_positions_only():
    import torch.nn.functional as F

    from compressor.stages.distill.loss import distill_loss
    from compressor.stages.distill.spec import KDLoss

    student, teacher, tokens, loss_mask, s_head, t_head = _loss_inputs()
    spec = KDLoss(kind="forward_kl", temperature=2.0, alpha=0.5)
    keep = chat_data.target_mask(loss_mask)
    terms = distill_loss((student,), (teacher,), tokens, s_head, t_head, spec, loss_mask=keep)

    # by hand: positions 2..6 predict the answer tokens 3..7
    rows = [2, 3, 4, 5, 6]
    s_log = F.log_softmax(s_head(student[0, rows]) / 2.0, -1)
    t_log = F.log_softmax(t_head(teacher[0, rows]) / 2.0, -1)
    kd = (t_log.exp() * (t_log - s_log)).sum(-1).mean() * 4.0
    ce = F.cross_entropy(s_head(student[0, rows]), tokens[0, 3:])
    assert torch.allclose(terms.loss, 0.5 * kd + 0.5 * ce, atol=1e-5)

    # other prompt-position states (random prompts, the answers' own states unchanged): the same loss
    other_student, other_teacher = student.detach().clone(), teacher.clone()
    other_student[0, :2], other_teacher[0, :2] = torch.randn(2, 16), torch.randn(2, 16)
    other_tokens = tokens.clone()
    other_tokens[0, :3] = torch.randint(0, 64, (3,))
    again = distill_loss((other_student,), (other_teacher,), other_tokens, s_head, t_head, spec, loss_mask=keep)
    assert torch.allclose(again.loss, terms.loss, atol=1e-6)

    # no gradient reaches the prompt positions' outputs
    terms.loss.backward()
    assert student.grad[0, :2].abs().max() == 0 and student.grad[0, 2:7].abs().max() > 0
