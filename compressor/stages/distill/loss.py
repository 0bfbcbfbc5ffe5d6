"""The distillation loss, computed in chunks of tokens.

Full [tokens, vocab] logits are the memory peak of KD on large vocabularies (a 128k vocab at 8k tokens is
4 GiB per model in fp32). We never build them: the loss takes both models' final hidden states and output
heads, and for each chunk of tokens computes both heads' logits in fp32, the loss terms, and drops them.
Each chunk runs under activation checkpointing, so backward recomputes that chunk's logits instead of
keeping them, and the peak is one chunk's logits whatever the sequence length. The heads are called as
modules (not through their weights) so that DeepSpeed ZeRO-3, which gathers a module's shards in its
forward hooks, stays in charge of them; since the calls come back to back, ZeRO-3 keeps a head gathered
from the first chunk to the last recomputation in backward, one all-gather per micro-batch
(deepspeed_config.MAX_REUSE_DISTANCE).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from compressor.stages.distill.layout import FeaturePair
from compressor.stages.distill.spec import KDLoss

Head = Callable[[torch.Tensor], torch.Tensor]


class LossTerms(NamedTuple):
    loss: torch.Tensor  # what backward runs on
    kd: torch.Tensor  # T^2-scaled divergence, mean per token
    ce: torch.Tensor  # the student's next-token cross-entropy, mean per token (logged even when alpha = 0)
    hidden: torch.Tensor  # mean hidden-state MSE over the hidden_mse layer pairs (0 without pairs)
    features: torch.Tensor  # the weighted sum of the `features` terms (0 without them)


def divergence(student_log_probs: torch.Tensor, teacher_log_probs: torch.Tensor, kind: str, beta: float = 0.5):
    """Summed divergence between the two distributions (log-probabilities over the last dimension)."""

    def kl(p_log, q_log):  # KL(p || q), summed
        return F.kl_div(q_log, p_log, log_target=True, reduction="sum")

    # gjsd's formula tends to 0 at beta 0 and 1; TRL's GKD defines those ends as the KLs, and so do we.
    if kind == "forward_kl" or (kind == "gjsd" and beta == 0.0):  # KL(teacher || student): Minitron's choice
        return kl(teacher_log_probs, student_log_probs)
    if kind == "reverse_kl" or (kind == "gjsd" and beta == 1.0):  # KL(student || teacher): mode-seeking
        return kl(student_log_probs, teacher_log_probs)
    # Generalized JSD (TRL GKD): M = beta * teacher + (1 - beta) * student, mixed in log space for stability.
    mixture = torch.logsumexp(
        torch.stack([teacher_log_probs + math.log(beta), student_log_probs + math.log(1.0 - beta)]), dim=0
    )
    return beta * kl(teacher_log_probs, mixture) + (1.0 - beta) * kl(student_log_probs, mixture)


def _chunk_sums(h_student, h_teacher, targets, student_head: Head, teacher_head: Head, spec: KDLoss, ce_grad: bool):
    """Summed (KD, CE) over one chunk of tokens, as a 2-vector."""
    t = spec.temperature
    student_logits = student_head(h_student).float()
    with torch.no_grad():
        # A teacher whose vocabulary is a padded superset of the student's (driver.check_vocabulary allows only
        # that): its extra rows are ids the tokenizer never produces, so they are dropped.
        teacher_logits = teacher_head(h_teacher)[..., : student_logits.shape[-1]]
        teacher_log_probs = F.log_softmax(teacher_logits.float() / t, dim=-1)
    student_log_probs = F.log_softmax(student_logits / t, dim=-1)
    # T^2 keeps the soft-target gradients on the scale of the hard-label ones (Hinton et al.).
    kd = divergence(student_log_probs, teacher_log_probs, spec.kind, spec.beta) * (t * t)
    with torch.set_grad_enabled(ce_grad and torch.is_grad_enabled()):
        log_probs = student_log_probs if t == 1.0 else F.log_softmax(student_logits, dim=-1)
        ce = -log_probs.gather(-1, targets.unsqueeze(-1)).sum()
    return torch.stack([kd, ce])


def kd_loss(
    student_hidden: torch.Tensor,
    teacher_hidden: torch.Tensor,
    targets: torch.Tensor,
    student_head: Head,
    teacher_head: Head,
    spec: KDLoss,
) -> LossTerms:
    """KD (+ optional CE) over N tokens. `*_hidden` are [N, width] final hidden states, `targets` [N] next tokens."""
    n = targets.numel()
    chunks = range(0, n, spec.chunk_tokens)
    ce_grad = spec.alpha > 0
    # One chunk gains nothing from checkpointing and would only pay its recomputation.
    recompute = len(chunks) > 1 and torch.is_grad_enabled() and student_hidden.requires_grad
    sums = student_hidden.new_zeros(2, dtype=torch.float32)
    for start in chunks:
        part = slice(start, start + spec.chunk_tokens)
        args = (student_hidden[part], teacher_hidden[part], targets[part], student_head, teacher_head, spec, ce_grad)
        sums = sums + (checkpoint(_chunk_sums, *args, use_reentrant=False) if recompute else _chunk_sums(*args))
    kd, ce = sums[0] / n, sums[1] / n
    loss = (1.0 - spec.alpha) * kd + spec.alpha * ce
    zero = torch.zeros((), device=loss.device)
    return LossTerms(loss, kd.detach(), ce.detach(), zero, zero)


def hidden_mse(student_states: Sequence[torch.Tensor], teacher_states: Sequence[torch.Tensor], pairs) -> torch.Tensor:
    """Mean MSE between the outputs of paired decoder layers (index i is layer i's output: states[i + 1])."""
    losses = [F.mse_loss(student_states[s + 1].float(), teacher_states[t + 1].float()) for s, t in pairs]
    return torch.stack(losses).mean()


def feature_term(kind: str, student, teacher, projector=None) -> torch.Tensor:
    """One feature term. Hidden states are [B, L, width] (the student's projected to the teacher's width when they
    differ); attention maps [B, heads, L, L], compared per head when the head counts agree, else head-averaged."""
    if kind == "attention_mse":
        if student.shape[1] != teacher.shape[1]:
            student, teacher = student.mean(dim=1), teacher.mean(dim=1)
        return F.mse_loss(student.float(), teacher.float())
    if projector is not None:
        student = projector(student)
    if kind == "hidden_cosine":
        return (1.0 - F.cosine_similarity(student.float(), teacher.float(), dim=-1)).mean()
    return F.mse_loss(student.float(), teacher.float())


class Outputs(NamedTuple):
    """What the loss reads of a model's forward: HF `hidden_states` (embeddings, then each layer; the last is the
    final-norm output that feeds the head), or just `(last_hidden_state,)`; and `attentions` when a term needs them."""

    hidden: Sequence[torch.Tensor]
    attentions: Optional[Sequence[torch.Tensor]] = None


def distill_loss(
    student_states,
    teacher_states,
    tokens: torch.Tensor,
    student_head: Head,
    teacher_head: Head,
    spec: KDLoss,
    features: Sequence[FeaturePair] = (),
    projectors: Optional[Mapping[str, torch.nn.Module]] = None,
    loss_mask: Optional[torch.Tensor] = None,
) -> LossTerms:
    """The stage's whole loss over [B, L] `tokens`. `*_states` are Outputs, or bare HF `hidden_states` tuples.
    `features` are the resolved layer pairs of spec.features (layout.feature_pairs), `projectors` keyed by
    FeaturePair.name for the pairs whose widths differ. `loss_mask` ([B, L] bool, chat data: compressor.chat_data
    .target_mask) keeps the KD and CE terms to the positions that predict an answer token."""
    student, teacher = _outputs(student_states), _outputs(teacher_states)

    def final(states):  # positions 0..L-2 predict tokens 1..L-1
        return states[-1][:, :-1].reshape(-1, states[-1].shape[-1])

    targets = tokens[:, 1:].reshape(-1)
    student_final, teacher_final = final(student.hidden), final(teacher.hidden)
    if loss_mask is not None:  # prompt positions are left out: no term, so no gradient, comes from them
        keep = loss_mask[:, :-1].reshape(-1)
        student_final, teacher_final, targets = student_final[keep], teacher_final[keep], targets[keep]
    terms = kd_loss(student_final, teacher_final, targets, student_head, teacher_head, spec)
    if spec.hidden_mse:
        mse = hidden_mse(student.hidden, teacher.hidden, spec.hidden_mse)
        terms = terms._replace(loss=terms.loss + spec.hidden_weight * mse, hidden=mse.detach())
    if features:
        total = sum(
            pair.weight
            * feature_term(
                pair.kind,
                *(
                    (student.attentions[pair.student], teacher.attentions[pair.teacher])
                    if pair.kind == "attention_mse"
                    else (student.hidden[pair.student + 1], teacher.hidden[pair.teacher + 1])
                ),
                projectors[pair.name] if projectors is not None and pair.name in projectors else None,
            )
            for pair in features
        )
        terms = terms._replace(loss=terms.loss + total, features=total.detach())
    return terms


def _outputs(states) -> Outputs:
    return states if isinstance(states, Outputs) else Outputs(tuple(states))
