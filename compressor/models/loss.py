"""The language-modelling loss of a model on token blocks: how the prune search ranks candidates, how student
selection and the distill search score a student on held-out text."""

from __future__ import annotations

import torch


@torch.no_grad()
def lm_loss(model, blocks: torch.Tensor, batch_size: int = 8) -> float:
    """Mean next-token cross-entropy (nats per predicted token) over `blocks` (sequences x tokens)."""
    total, tokens = 0.0, 0
    for batch in blocks.split(batch_size):
        batch, n = batch.to(model.device), batch[:, 1:].numel()
        total += model(input_ids=batch, labels=batch, use_cache=False).loss.item() * n
        tokens += n
    return total / tokens
