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

from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from compressor.stages.distill.spec import KDLoss

Head = Callable[[torch.Tensor], torch.Tensor]


class LossTerms(NamedTuple):
    loss: torch.Tensor  # what backward runs on
    kd: torch.Tensor  # T^2-scaled KL, mean per token
    ce: torch.Tensor  # the student's next-token cross-entropy, mean per token (logged even when alpha = 0)
    hidden: torch.Tensor  # mean hidden-state MSE over the layer pairs (0 without pairs)


def _chunk_sums(h_student, h_teacher, targets, student_head: Head, teacher_head: Head, spec: KDLoss, ce_grad: bool):
    """Summed (KD, CE) over one chunk of tokens, as a 2-vector."""
    t = spec.temperature
    student_logits = student_head(h_student).float()
    with torch.no_grad():
        teacher_log_probs = F.log_softmax(teacher_head(h_teacher).float() / t, dim=-1)
    student_log_probs = F.log_softmax(student_logits / t, dim=-1)
    if spec.kind == "forward_kl":  # KL(teacher || student): mass-covering, Minitron's choice
        kd = F.kl_div(student_log_probs, teacher_log_probs, log_target=True, reduction="sum")
    else:  # KL(student || teacher): mode-seeking
        kd = F.kl_div(teacher_log_probs, student_log_probs, log_target=True, reduction="sum")
    kd = kd * (t * t)  # keeps the soft-target gradients on the scale of the hard-label ones (Hinton et al.)
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
    return LossTerms(loss, kd.detach(), ce.detach(), torch.zeros((), device=loss.device))


def hidden_mse(student_states: Sequence[torch.Tensor], teacher_states: Sequence[torch.Tensor], pairs) -> torch.Tensor:
    """Mean MSE between the outputs of paired decoder layers (index i is layer i's output: states[i + 1])."""
    losses = [F.mse_loss(student_states[s + 1].float(), teacher_states[t + 1].float()) for s, t in pairs]
    return torch.stack(losses).mean()


def distill_loss(
    student_states, teacher_states, tokens: torch.Tensor, student_head: Head, teacher_head: Head, spec: KDLoss
) -> LossTerms:
    """The stage's whole loss over [B, L] `tokens`. `*_states` are HF `hidden_states` tuples (embeddings, then each
    layer; the last is the final-norm output that feeds the head), or just `(last_hidden_state,)` without MSE pairs."""

    def final(states):  # positions 0..L-2 predict tokens 1..L-1
        return states[-1][:, :-1].reshape(-1, states[-1].shape[-1])

    targets = tokens[:, 1:].reshape(-1)
    terms = kd_loss(final(student_states), final(teacher_states), targets, student_head, teacher_head, spec)
    if not spec.hidden_mse:
        return terms
    mse = hidden_mse(student_states, teacher_states, spec.hidden_mse)
    return terms._replace(loss=terms.loss + spec.hidden_weight * mse, hidden=mse.detach())
