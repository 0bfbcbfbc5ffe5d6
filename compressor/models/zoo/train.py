"""Train a reference Llama from scratch on packed corpus blocks (torch; imported only when building)."""

from __future__ import annotations

import math
import random
from collections import Counter

import torch

from compressor.models.zoo.recipes import Recipe


def pack(docs: list[list[str]], tokenizer, seq_len: int, seed: int) -> torch.Tensor:
    """Shuffle documents (seeded), encode each as <s> paragraphs joined by blank lines </s>, concatenate,
    cut into [n, seq_len] blocks. Whole documents, not shuffled paragraphs: the model should learn that
    what follows relates to what came before (it is what the ref_next task measures)."""
    order = ["\n\n".join(doc) for doc in docs]
    random.Random(seed).shuffle(order)
    stream: list[int] = []
    for ids in tokenizer(order, add_special_tokens=False, verbose=False)["input_ids"]:
        stream += [tokenizer.bos_token_id, *ids, tokenizer.eos_token_id]
    n = len(stream) // seq_len
    return torch.tensor(stream[: n * seq_len], dtype=torch.long).view(n, seq_len)


def build_model(config: dict, seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    kwargs = {k: v for k, v in config.items() if k not in ("architectures", "model_type", "dtype")}
    model = LlamaForCausalLM(LlamaConfig(**kwargs, architectures=config["architectures"]))
    return model.float()


def lr_at(step: int, r: Recipe) -> float:
    """Linear warm-up, then cosine decay to 10% of the peak."""
    if step < r.warmup_steps:
        return r.lr * (step + 1) / r.warmup_steps
    progress = (step - r.warmup_steps) / max(1, r.steps - r.warmup_steps)
    return r.lr * (0.1 + 0.45 * (1 + math.cos(math.pi * progress)))


def train(model, blocks: torch.Tensor, r: Recipe, progress=lambda it, **kw: it) -> list[float]:
    """AdamW over `r.steps` batches in a seeded order (a new permutation each epoch). Returns the losses."""
    generator = torch.Generator().manual_seed(r.seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=r.lr, betas=(0.9, 0.95), weight_decay=0.1)
    order, cursor, losses = torch.randperm(len(blocks), generator=generator), 0, []
    model.train()
    for step in progress(range(r.steps), description="training"):
        if cursor + r.batch_size > len(order):
            order, cursor = torch.randperm(len(blocks), generator=generator), 0
        batch = blocks[order[cursor : cursor + r.batch_size]]
        cursor += r.batch_size
        losses.append(optimizer_step(model, optimizer, model(input_ids=batch, labels=batch).loss, step, r))
    model.eval()
    return losses


def optimizer_step(model, optimizer, loss: torch.Tensor, step: int, r: Recipe) -> float:
    """Step `step` of the schedule (lr_at) on `loss`, gradients clipped to norm 1; returns the loss."""
    for group in optimizer.param_groups:
        group["lr"] = lr_at(step, r)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.item()


def unigram_perplexity(train_blocks: torch.Tensor, heldout_blocks: torch.Tensor, vocab_size: int) -> float:
    """Perplexity of the held-out next tokens under add-one smoothed train token frequencies: the bar
    that a model which ignores context entirely would reach."""
    counts = Counter(train_blocks.flatten().tolist())
    total = sum(counts.values()) + vocab_size
    targets = heldout_blocks[:, 1:].flatten().tolist()
    nll = -sum(math.log((counts.get(t, 0) + 1) / total) for t in targets) / len(targets)
    return math.exp(nll)
