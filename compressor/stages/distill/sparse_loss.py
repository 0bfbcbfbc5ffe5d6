"""KD against sparse teacher targets (compressor/targets.py): no teacher in the training loop.

Per position the teacher is known only on k ids. With `topk` targets the divergence is taken over k + 1 buckets:
the k ids and one tail bucket holding everything else, on both sides (the teacher's stored tail mass, the student's
mass outside the k ids). With `sampled` targets the k ids are draws from the teacher's distribution p, kept with
their counts and log p, and expectations under p become weighted sums over the distinct ids drawn, with
w_i = p_i / P(i drawn) (see _inclusion_weights):
    KL(p || q) = E_p[log p - log q]            ~ sum_i w_i (log p_i - log q_i)
    KL(q || p) = E_p[(q/p) log(q/p)]           ~ sum_i w_i (q_i / p_i) log(q_i / p_i)
Both estimates, and their gradients in the student's logits, are unbiased (tests/stages/test_distill_targets.py);
the top-k buckets are not: their mean gradient differs from full KD's by more than sampling noise."""

from __future__ import annotations

import torch
import torch.nn.functional as F

TINY = 1e-12


def _log_tail(log_q_on_ids: torch.Tensor) -> torch.Tensor:
    """log of the student's mass outside the k ids (k distinct ids per row)."""
    inside = torch.logsumexp(log_q_on_ids, dim=-1).clamp(max=-TINY)
    return torch.log(-torch.expm1(inside))  # log(1 - e^inside), exact near 0 and near 1


def _inclusion_weights(counts: torch.Tensor, log_p: torch.Tensor) -> torch.Tensor:
    """Per drawn id, p_i / P(i is among the draws) = p_i / (1 - (1 - p_i)^k) (Horvitz-Thompson), 0 in unused slots.
    sum_i w_i f(i) over the distinct ids drawn is an unbiased estimate of E_p[f], like (1/k) sum_draws f, but a likely
    token, drawn almost surely, gets its exact weight p_i instead of a noisy count / k (less variance at equal k)."""
    k = counts.sum(-1, keepdim=True).float()
    p = log_p.exp().clamp(max=1.0)
    drawn = -torch.expm1(k * torch.log1p(-p.clamp(max=1.0 - 1e-7)))  # 1 - (1 - p)^k, exact for tiny p
    return torch.where(counts > 0, p / drawn.clamp_min(TINY), torch.zeros_like(p))


def sparse_kd_sum(student_logits: torch.Tensor, targets: dict, kind: str, divergence: str, temperature: float):
    """Summed divergence over P positions. `student_logits` [P, V]; `targets` {"ids", "val", "tail" | "cnt"} of
    [P, k] (tail [P]) tensors as stored, at the temperature the targets were computed at."""
    t = temperature
    log_q_all = F.log_softmax(student_logits.float() / t, dim=-1)
    ids = targets["ids"].long()
    log_q = log_q_all.gather(-1, ids)
    log_p = targets["val"].float()
    if kind == "topk":
        # A slot at -inf is unused (an API teacher's alternative that did not map): no id, no mass on either side.
        used = torch.isfinite(log_p)
        log_p = torch.where(used, log_p, torch.zeros_like(log_p))  # finite, so no 0 * inf in values or gradients
        p_tail = targets["tail"].float().clamp_min(0.0)
        log_p_tail = torch.log(p_tail.clamp_min(TINY))
        log_q_tail = _log_tail(log_q.masked_fill(~used, float("-inf")))
        zero = torch.zeros_like(log_q)
        if divergence == "forward_kl":
            inside = torch.where(used, log_p.exp() * (log_p - log_q), zero)
            kd = inside.sum() + (p_tail * (log_p_tail - log_q_tail)).sum()
        else:
            q_tail = log_q_tail.exp()
            inside = torch.where(used, log_q.exp() * (log_q - log_p), zero)
            kd = inside.sum() + (q_tail * (log_q_tail - log_p_tail)).sum()
    else:
        weights = _inclusion_weights(targets["cnt"], log_p)
        if divergence == "forward_kl":
            kd = (weights * (log_p - log_q)).sum()
        else:
            ratio = log_q - log_p
            kd = (weights * ratio.exp() * ratio).sum()
    return kd * (t * t)  # as in the dense loss: soft-target gradients on the scale of hard-label ones


def _chunk_sums(h_student, sparse: dict, next_tokens, head, kind: str, divergence: str, t: float, ce_grad: bool):
    """Summed (KD, CE) over one chunk of positions, as a 2-vector."""
    student_logits = head(h_student).float()
    kd = sparse_kd_sum(student_logits, sparse, kind, divergence, t)
    with torch.set_grad_enabled(ce_grad and torch.is_grad_enabled()):
        ce = -F.log_softmax(student_logits, dim=-1).gather(-1, next_tokens.unsqueeze(-1)).sum()
    return torch.stack([kd, ce])


def sparse_kd_loss(student_hidden, sparse: dict, next_tokens, head, spec, kind: str):
    """(loss, kd, ce) over N positions: `student_hidden` [N, width], `sparse` the targets of those positions
    ({name: [N, k] or [N]}), `next_tokens` [N]. Chunked and checkpointed like the dense loss (loss.kd_loss), so only
    one chunk's [positions, vocab] student logits exist at a time."""
    from torch.utils.checkpoint import checkpoint

    n = next_tokens.numel()
    chunks = range(0, n, spec.chunk_tokens)
    recompute = len(chunks) > 1 and torch.is_grad_enabled() and student_hidden.requires_grad
    sums = student_hidden.new_zeros(2, dtype=torch.float32)
    for start in chunks:
        part = slice(start, start + spec.chunk_tokens)
        args = (
            student_hidden[part],
            {k: v[part] for k, v in sparse.items()},
            next_tokens[part],
            head,
            kind,
            spec.kind,
            spec.temperature,
            spec.alpha > 0,
        )
        sums = sums + (checkpoint(_chunk_sums, *args, use_reentrant=False) if recompute else _chunk_sums(*args))
    kd, ce = sums[0] / n, sums[1] / n
    return (1.0 - spec.alpha) * kd + spec.alpha * ce, kd.detach(), ce.detach()


def black_box_loss(student_hidden, next_tokens, head, spec, sparse=None, soft=None):
    """(loss, kd, ce) of black-box distillation over N answer positions: CE on the teacher's answer tokens; where
    `soft` ([N] bool) marks positions with an API teacher's top log-probabilities (`sparse`, topk layout, at T = 1:
    the API gives the teacher's own distribution), (1 - alpha) * their KD + alpha * CE. Chunked like the others."""
    from torch.utils.checkpoint import checkpoint

    n = next_tokens.numel()
    soft_n = int(soft.sum()) if soft is not None and sparse is not None else 0

    def chunk_sums(h, tokens, targets, rows):
        logits = head(h).float()
        ce = -F.log_softmax(logits, dim=-1).gather(-1, tokens.unsqueeze(-1)).sum()
        if targets is None or not rows.any():
            return torch.stack([torch.zeros_like(ce), ce])
        picked = {name: t[rows] for name, t in targets.items()}
        return torch.stack([sparse_kd_sum(logits[rows], picked, "topk", spec.kind, 1.0), ce])

    chunks = range(0, n, spec.chunk_tokens)
    recompute = len(chunks) > 1 and torch.is_grad_enabled() and student_hidden.requires_grad
    sums = student_hidden.new_zeros(2, dtype=torch.float32)
    for start in chunks:
        part = slice(start, start + spec.chunk_tokens)
        targets = {k: v[part] for k, v in sparse.items()} if soft_n else None
        rows = soft[part] if soft_n else None
        args = (student_hidden[part], next_tokens[part], targets, rows)
        sums = sums + (checkpoint(chunk_sums, *args, use_reentrant=False) if recompute else chunk_sums(*args))
    ce = sums[1] / max(n, 1)
    if not soft_n:
        return ce, torch.zeros_like(ce).detach(), ce.detach()
    kd = sums[0] / soft_n
    return (1.0 - spec.alpha) * kd + spec.alpha * ce, kd.detach(), ce.detach()
