"""Black-box distillation: an API teacher's top_logprobs as the student's sparse targets (compressor/soft_labels.py),
the masked top-k loss, and a pipeline that trains from the top_logprobs (k = 5) of the local OpenAI-compatible
server (tests/openai_server.py) with `distill.teacher: none`."""

from __future__ import annotations

import json
import math

import pytest
import torch

from compressor import soft_labels
from compressor.stages.distill.sparse_loss import black_box_loss, sparse_kd_sum
from compressor.stages.distill.spec import KDLoss
from tests.pipeline_runs import compressor


@pytest.fixture(scope="module")
def tokenizer(tiny_teacher):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_teacher)


def test_alternatives_map_by_exact_string_and_align_by_offset(tokenizer):
    vocab = soft_labels.VocabMap(tokenizer)
    response = " the module"
    student = tokenizer(response, add_special_tokens=False, return_offsets_mapping=True)
    starts = [a for a, _ in student["offset_mapping"]]
    pieces = [tokenizer.decode([i]) for i in student["input_ids"]]
    assert "".join(pieces) == response and len(pieces) >= 2
    # The teacher chose the student's first token, then the rest of the answer as ONE token the student lacks: its
    # second step still starts where the student's second token does, so that position gets its alternatives.
    chosen = [pieces[0], response[len(pieces[0]) :]]
    steps = [
        [{"token": pieces[0], "logprob": math.log(0.6)}, {"token": "no such token \u2603", "logprob": math.log(0.3)}],
        [{"token": pieces[1], "logprob": math.log(0.9)}],
    ]
    counts = soft_labels.SoftCounts()
    out = soft_labels.align(steps, chosen, response, starts, vocab, counts)
    assert out[0] == [(student["input_ids"][0], pytest.approx(math.log(0.6)))]
    second = [i for i, s in enumerate(starts) if s == len(pieces[0])]
    assert second and out[second[0]] is not None  # the second step starts where the student's 2nd token does
    assert (
        counts.alternatives == 3
        and counts.mapped == 2
        and counts.as_dict()["mapping_rate"] == pytest.approx(2 / 3, abs=1e-3)
    )


def test_unused_slots_change_nothing_and_the_tail_takes_the_unmapped_mass():
    torch.manual_seed(0)
    logits = torch.randn(3, 11, requires_grad=True)
    ids = torch.tensor([[1, 4, 0], [2, 3, 0], [7, 0, 0]])
    val = torch.log(torch.tensor([[0.5, 0.2, 0.0], [0.7, 0.1, 0.0], [0.4, 0.0, 0.0]]))  # log 0 = -inf: unused
    tail = 1 - val.exp().sum(-1)
    sparse = {"ids": ids, "val": val, "tail": tail}
    for divergence in ("forward_kl", "reverse_kl"):
        got = sparse_kd_sum(logits, sparse, "topk", divergence, 1.0)
        q = logits.log_softmax(-1)
        want = 0.0
        for row in range(3):
            used = torch.isfinite(val[row])
            log_p = torch.cat([val[row][used], tail[row].log()[None]])
            inside = q[row][ids[row][used]]
            log_q = torch.cat([inside, torch.log1p(-inside.exp().sum())[None]])
            a, b = (log_p, log_q) if divergence == "forward_kl" else (log_q, log_p)
            want = want + (a.exp() * (a - b)).sum()
        assert got.item() == pytest.approx(want.item(), rel=1e-5)
        (grad,) = torch.autograd.grad(got, logits)
        assert torch.isfinite(grad).all()


def test_black_box_loss_is_ce_without_soft_labels_and_mixes_by_alpha_with_them():
    torch.manual_seed(0)
    head = torch.nn.Linear(8, 11, bias=False)
    hidden, tokens = torch.randn(5, 8), torch.randint(0, 11, (5,))
    ce = torch.nn.functional.cross_entropy(head(hidden), tokens)
    loss, kd, ce_term = black_box_loss(hidden, tokens, head, KDLoss(alpha=0.5))
    assert loss.item() == pytest.approx(ce.item(), rel=1e-6) and kd.item() == 0
    sparse = {"ids": torch.tensor([[3, 5]] * 5), "val": torch.log(torch.tensor([[0.8, 0.1]] * 5)),
              "tail": torch.full((5,), 0.1)}  # fmt: skip
    soft = torch.tensor([True, False, True, True, False])
    loss, kd, ce_term = black_box_loss(hidden, tokens, head, KDLoss(alpha=0.5, chunk_tokens=2), sparse, soft)
    want_kd = sparse_kd_sum(head(hidden[soft]), {k: v[soft] for k, v in sparse.items()}, "topk", "forward_kl", 1.0)
    assert kd.item() == pytest.approx(want_kd.item() / 3, rel=1e-5)
    assert loss.item() == pytest.approx(0.5 * kd.item() + 0.5 * ce.item(), rel=1e-5)


def test_distill_trains_from_the_top_logprobs_of_an_openai_compatible_server(tmp_path, openai_server):
    """generate (openai:tiny-test, logprobs 5) -> prune -> distill (teacher: none, chat): the API's answers and their
    top-5 log-probabilities are the only teacher the student sees."""
    openai_server.reset()
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"The function number {i} returns"}) + "\n" for i in range(24)))
    pipeline = {
        "name": "blackbox",
        "teacher": {"model": "zoo:tiny-test"},  # the student's starting point; the API is the teacher
        "storage": str(tmp_path / "artifacts"),
        "data": {"prompts": {"source": str(prompts)}, "calib": {"source": "zoo:tiny-test", "samples": 8}},
        "stages": [
            {
                "generate": {
                    "prompts": "prompts",
                    "teacher": "openai:tiny-test",
                    "base_url": openai_server.base_url,
                    "max_new_tokens": 8,
                    "logprobs": 5,
                    "commit_every": 12,
                }
            },  # fmt: skip
            {"prune": {"target": {"intermediate_size": 192}, "calibration": "calib"}},
            {
                "distill": {
                    "data": "generate",
                    "teacher": "none",
                    "chat": {"template": "{prompt}\nAnswer:"},
                    "seq_len": 64,
                    "steps": 3,
                    "global_batch": 4,
                    "micro_batch": 4,
                    "checkpoint_every": 3,
                    "loss": {"alpha": 0.5},
                    "deepspeed": {"zero_stage": 0},
                }
            },  # fmt: skip
        ],
    }
    path = tmp_path / "blackbox.yaml"
    path.write_text(json.dumps(pipeline))
    result = compressor("run", str(path))
    assert result.returncode == 0, result.stderr[-6000:]
    assert "soft labels from the teacher's top_logprobs" in result.stdout + result.stderr
    manifest = json.loads(next((tmp_path / "artifacts" / "blackbox").glob("distill-*/manifest.json")).read_text())
    soft = manifest["details"]["chat"]["soft_labels"]
    # the server's tokens are the student's (same tokenizer): nearly every alternative maps, nearly every token aligns
    assert soft["rows_with_logprobs"] == 24 and soft["mapping_rate"] > 0.9
    assert soft["aligned_tokens"] > 0.8 * soft["answer_tokens"]
    assert manifest["metrics"]["kd_loss"] > 0 and math.isfinite(manifest["metrics"]["kd_loss"])
    assert manifest["metrics"]["soft_mapping_rate"] == soft["mapping_rate"]
    assert manifest["details"]["teacher"] == "none"
