"""Sparse teacher targets (compressor/targets.py) and the loss against them (stages/distill/sparse_loss.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from compressor import targets as tg
from compressor.errors import UserError
from compressor.stages.distill.sparse_loss import sparse_kd_sum
from compressor.stages.distill.targets_compute import sparse_targets

VOCAB, K, DRAWS = 64, 8, 3000


def teacher_and_student():
    g = torch.Generator().manual_seed(0)
    teacher_log_p = F.log_softmax(torch.randn(1, VOCAB, generator=g), dim=-1)  # a tail top-k cannot ignore
    student_logits = torch.randn(1, VOCAB, generator=g)
    return teacher_log_p, student_logits


def gradient(student_logits: torch.Tensor, targets: dict, kind: str, divergence: str) -> torch.Tensor:
    z = student_logits.clone().requires_grad_(True)
    sparse_kd_sum(z, targets, kind, divergence, 1.0).backward()
    return z.grad[0]


@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl"])
def test_sampled_targets_give_the_full_kd_gradient_on_average_and_top_k_does_not(divergence):
    log_p, z = teacher_and_student()
    zz = z.clone().requires_grad_(True)
    lq = F.log_softmax(zz, dim=-1)
    full = (log_p.exp() * (log_p - lq)).sum() if divergence == "forward_kl" else (lq.exp() * (lq - log_p)).sum()
    exact = torch.autograd.grad(full, zz)[0][0]

    generator = torch.Generator().manual_seed(1)
    grads = torch.stack(
        [gradient(z, sparse_targets(log_p, "sampled", K, generator), "sampled", divergence) for _ in range(DRAWS)]
    )
    mean, spread = grads.mean(0), grads.std(0) / DRAWS**0.5  # the tolerance the number of draws allows
    tolerance = 5 * spread.max().item()
    assert (mean - exact).abs().max().item() < tolerance, ((mean - exact).abs().max(), tolerance)
    if divergence == "forward_kl":  # (reverse KL's importance weights are unbiased but too noisy to tell apart here)
        top = gradient(z, sparse_targets(log_p, "topk", K), "topk", divergence)
        assert (top - exact).abs().max().item() > tolerance  # biased: it drops the tail and over-sharpens


def test_top_k_over_the_whole_vocabulary_is_exact_kd():
    log_p, z = teacher_and_student()
    for divergence in ("forward_kl", "reverse_kl"):
        sparse = sparse_kd_sum(z, sparse_targets(log_p, "topk", VOCAB), "topk", divergence, 1.0)
        lq = F.log_softmax(z, dim=-1)
        dense = (
            F.kl_div(lq, log_p, log_target=True, reduction="sum")
            if divergence == "forward_kl"
            else (F.kl_div(log_p, lq, log_target=True, reduction="sum"))
        )
        assert sparse.item() == pytest.approx(dense.item(), abs=1e-5), divergence


def test_sampled_targets_are_unique_ids_with_counts_that_add_up_to_k():
    log_p, _ = teacher_and_student()
    t = sparse_targets(log_p.expand(5, -1), "sampled", K, torch.Generator().manual_seed(0))
    assert (t["cnt"].sum(-1) == K).all()
    for ids, cnt in zip(t["ids"], t["cnt"]):
        used = ids[cnt > 0]
        assert len(set(used.tolist())) == len(used)  # each drawn id once, with its count


def test_parts_written_are_read_back_by_id_only_once_listed(tmp_path):
    directory = str(tmp_path / "targets")
    index = tg.TargetsIndex(
        key="x",
        kind="sampled",
        k=4,
        temperature=1.0,
        seed=0,
        teacher="t",
        tokenizer="tok",
        vocab_size=1000,
        seq_len=3,
        id_dtype="<u2",
    )
    n = tg.PART_SEQUENCES + 10
    rng = np.random.default_rng(0)
    arrays = {}
    for first, count in tg.missing_parts(None, n):
        arrays[first] = {
            "ids": rng.integers(0, 1000, (count, 3, 4)).astype("<u2"),
            "val": rng.normal(size=(count, 3, 4)).astype("<f2"),
            "cnt": rng.integers(0, 5, (count, 3, 4)).astype("u1"),
        }
        tg.write_part(directory, first, arrays[first])
    tg.write_index(directory, index)
    with pytest.raises(UserError, match="2 parts"):  # written but not listed: not there
        tg.TargetsReader(directory, n)
    index.parts = {str(first): len(a["ids"]) for first, a in arrays.items()}
    tg.write_index(directory, index)
    assert tg.missing_parts(tg.read_index(directory), n) == []
    got = tg.TargetsReader(directory, n).read([n - 1, 2])
    assert (got["ids"][0] == arrays[tg.PART_SEQUENCES]["ids"][9]).all() and (got["cnt"][1] == arrays[0]["cnt"][2]).all()
    longer = tg.missing_parts(tg.read_index(directory), n + tg.PART_SEQUENCES)  # the short last part grows
    assert longer == [(tg.PART_SEQUENCES, tg.PART_SEQUENCES), (2 * tg.PART_SEQUENCES, 10)]


@pytest.mark.parametrize(
    "kind, k, vocab, words",
    [("topk", 0, 100, "at least 1"), ("topk", 101, 100, "larger than"), ("sampled", 300, 32000, "one byte")],
)
def test_k_outside_what_the_targets_can_hold_is_refused(kind, k, vocab, words):
    with pytest.raises(UserError, match=words):
        tg.check_settings(kind, k, vocab)


def test_bytes_per_position_at_k_64_on_a_32k_vocabulary_are_under_half_a_percent_of_dense_fp16():
    dense = 32_000 * 2
    assert tg.bytes_per_position("topk", 64, 32_000) / dense < 0.005
    assert tg.bytes_per_position("sampled", 64, 32_000) / dense <= 0.005  # the goal: <= 0.5%
