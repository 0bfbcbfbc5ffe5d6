"""Supervised fine-tuning on labelled (prompt, answer) rows, loss on the answer tokens only (torch).

Builds the zoo's task teachers (a zoo model fine-tuned on a task's train split), and the hard-label student of
benchmarks/task.py (the same procedure on the student, the same rows): the baseline distillation has to beat."""

from __future__ import annotations

import random

import torch

from compressor.models.zoo.train import optimizer_step

IGNORE = -100  # label of positions whose next-token loss does not count (transformers' convention)


def batches(tokenizer, rows: list[dict], seq_len: int) -> list[tuple[list[int], int]]:
    """(token ids, answer length) of each row, rendered with the tokenizer's chat template."""
    from compressor.chat_encoding import encode, fit

    out = []
    for row in rows:
        prompt, answer = encode(tokenizer, [{"role": "user", "content": row["prompt"]}], row["answer"], None)
        ids, _ = fit(prompt, answer, seq_len, "prompt")
        if ids is not None:
            out.append((ids, len(answer)))
    return out


def _collate(examples: list[tuple[list[int], int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(ids) for ids, _ in examples)
    tokens = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    for i, (ids, answer) in enumerate(examples):
        tokens[i, : len(ids)] = torch.tensor(ids)
        labels[i, len(ids) - answer : len(ids)] = torch.tensor(ids[len(ids) - answer :])
    return tokens, labels


def finetune(model, tokenizer, rows: list[dict], recipe, progress=lambda it, **kw: it) -> list[float]:
    """AdamW over `recipe.steps` batches of `recipe.batch_size` rows (a seeded shuffle per epoch); returns losses.
    Right padding: a row's positions are 0.. as at inference, and padded positions come after it (causal)."""
    examples = batches(tokenizer, rows, recipe.seq_len)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    rng = random.Random(recipe.seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=recipe.lr, betas=(0.9, 0.95), weight_decay=0.0)
    order, losses = [], []
    model.train()
    for step in progress(range(recipe.steps), description="fine-tuning"):
        if len(order) < recipe.batch_size:
            order = list(range(len(examples)))
            rng.shuffle(order)
        batch, order = [examples[i] for i in order[: recipe.batch_size]], order[recipe.batch_size :]
        tokens, labels = _collate(batch, pad)
        loss = model(input_ids=tokens, labels=labels).loss  # causal: right padding never reaches a row's tokens
        losses.append(optimizer_step(model, optimizer, loss, step, recipe))
    model.eval()
    return losses
