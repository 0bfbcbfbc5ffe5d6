"""The teacher's pass over the token shards that writes sparse targets (compressor/targets.py), as Ray Data batch
inference: one actor per worker loads the teacher once, each call computes one part (PART_SEQUENCES sequences) and
writes it from the node it runs on; the driver lists each finished part in the index, so a killed run loses at most
the parts in flight. On a GPU, vLLM's `prompt_logprobs=k` computes top-k targets at higher throughput (see
docs/stages/distill.md); the hf path here runs everywhere, CPU included."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import asdict
from typing import Optional

import numpy as np
import torch

from compressor import targets as tg
from compressor.errors import UserError

TRACE_ENV = "COMPRESSOR_TARGETS_TRACE"  # a file each finished part is appended to (tests count teacher passes)
POSITION_CHUNK = 512  # positions whose full-vocabulary logits exist at once (128k vocab: 256 MB in fp32)


def _generator(seed: int, sequence_id: int, device) -> torch.Generator:
    """The draws of a sequence depend on (seed, its id) alone: a resumed or re-split run draws the same tokens."""
    value = int.from_bytes(hashlib.sha256(f"{seed}:{sequence_id}".encode()).digest()[:8], "little") >> 1
    return torch.Generator(device=device).manual_seed(value)


def sparse_targets(
    log_probs: torch.Tensor, kind: str, k: int, generator: Optional[torch.Generator] = None
) -> dict[str, torch.Tensor]:
    """[P, V] teacher log-probabilities (at T) -> the sparse targets of P positions (see compressor/targets.py)."""
    if kind == "topk":
        values, ids = log_probs.topk(k, dim=-1)
        tail = (1.0 - values.exp().sum(-1)).clamp_min(0.0)
        return {"ids": ids, "val": values, "tail": tail}
    draws = torch.multinomial(log_probs.exp(), k, replacement=True, generator=generator)  # [P, k]
    counts = torch.zeros_like(log_probs, dtype=torch.int32).scatter_add_(
        1, draws, torch.ones_like(draws, dtype=torch.int32)
    )
    cnt, ids = counts.topk(k, dim=-1)  # the drawn ids (<= k distinct) first, then unused slots with count 0
    return {"ids": ids, "val": log_probs.gather(1, ids), "cnt": cnt}


@torch.no_grad()
def teacher_targets(teacher, tokens: torch.Tensor, first_id: int, index: dict) -> dict[str, np.ndarray]:
    """Targets of [n, L] `tokens` (sequence ids first_id..first_id+n-1) as numpy arrays ready to write; `index` is
    the TargetsIndex as a dict (kind, k, temperature, seed, vocab_size, id_dtype)."""
    kind, k, vocab = index["kind"], index["k"], index["vocab_size"]
    device = next(teacher.parameters()).device
    out: dict[str, list] = {}
    head = teacher.get_output_embeddings()
    for row in range(tokens.shape[0]):
        hidden = teacher.base_model(input_ids=tokens[row : row + 1].to(device), use_cache=False).last_hidden_state[0]
        generator = _generator(index["seed"], first_id + row, device) if kind == "sampled" else None
        pieces = []
        for start in range(0, hidden.shape[0], POSITION_CHUNK):
            # a padded head's rows past the tokenizer are ids no text has: they are never targets
            logits = head(hidden[start : start + POSITION_CHUNK])[..., :vocab].float() / index["temperature"]
            pieces.append(sparse_targets(torch.log_softmax(logits, dim=-1), kind, k, generator))
        for name in pieces[0]:
            out.setdefault(name, []).append(torch.cat([p[name] for p in pieces]).cpu().numpy())
    dtypes = {
        "ids": np.dtype(index["id_dtype"]),
        "val": np.dtype("<f2"),
        "tail": np.dtype("<f2"),
        "cnt": np.dtype("u1"),
    }
    return {name: np.stack(rows).astype(dtypes[name]) for name, rows in out.items()}


class PartWriter:
    """A Ray Data actor: loads the teacher once, then computes and writes whole parts."""

    def __init__(self, teacher_path: str, shard_dir: str, directory: str, index: dict, device: str = "cpu"):
        from transformers import AutoModelForCausalLM

        from compressor import remote_code
        from compressor.manifest import ModelRef
        from compressor.models import materialize
        from compressor.shards import ShardReader

        path = materialize(ModelRef(path=teacher_path, key=teacher_path)).path
        dtype = torch.bfloat16 if device == "cuda" else torch.float32
        teacher = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, trust_remote_code=remote_code.enabled())
        self.teacher = teacher.to(device).eval()
        self.reader = ShardReader(shard_dir)
        self.directory, self.index = directory, index

    def __call__(self, batch: dict) -> dict:
        for first, count in zip(batch["first"], batch["count"]):
            tokens = torch.from_numpy(self.reader.read(np.arange(first, first + count)).astype(np.int64))
            tg.write_part(self.directory, int(first), teacher_targets(self.teacher, tokens, int(first), self.index))
        return batch


def compute(
    shard_dir: str,
    teacher_path: str,
    index: tg.TargetsIndex,
    directory: str,
    sequences: int,
    workers: int = 1,
    num_gpus: float = 0,
    show: Callable = lambda items, total: items,
) -> tg.TargetsIndex:
    """Compute the parts of the first `sequences` sequences that the index lacks; returns the updated index.
    Runs on the Ray cluster the caller has initialised; `show(iterable, total)` displays the progress in parts."""
    import ray

    if not tg.missing_parts(index, sequences):
        return index
    from compressor.locks import holding

    with holding(directory, f"teacher targets {directory}"):
        index = tg.read_index(directory) or index  # another run may have written parts meanwhile
        missing = tg.missing_parts(index, sequences)
        if not missing:
            return index
        parts = ray.data.from_items([{"first": f, "count": c} for f, c in missing], override_num_blocks=len(missing))
        done = parts.map_batches(
            PartWriter,
            fn_constructor_args=(teacher_path, shard_dir, directory, asdict(index), "cuda" if num_gpus else "cpu"),
            batch_size=1,
            concurrency=max(1, min(workers, len(missing))),
            num_gpus=num_gpus,
        )
        for row in show(done.iter_rows(), len(missing)):  # in the order parts finish: each listed once whole
            index.parts[str(int(row["first"]))] = int(row["count"])
            tg.write_index(directory, index)
            if os.environ.get(TRACE_ENV):  # tests count the teacher's passes over the data
                with open(os.environ[TRACE_ENV], "a") as fh:
                    fh.write(json.dumps({"first": int(row["first"]), "count": int(row["count"])}) + "\n")
    return index


def prepare_targets(spec, teacher, shard_dir: str, sequences: int, ctx) -> str:
    """The directory of the teacher targets `spec.loss.targets` asks for over the first `sequences` sequences of the
    token shards: found, extended or computed (Ray Data, `spec.workers` actors). Targets named by `path` must have
    been made with this teacher and this tokenizer."""
    from compressor.shards import read_index as read_shards

    wanted = spec.loss.targets
    shards = read_shards(shard_dir)
    # The tokenizer's size, not the teacher's (maybe padded) head: ids past it never occur in text, nor in targets.
    vocab_size, tokenizer = shards.vocab_size, shards.tokenizer
    tg.check_settings(wanted.kind, wanted.k, vocab_size, "distill.loss.targets")
    t = spec.loss.temperature
    directory = wanted.path or tg.targets_dir(shard_dir, wanted.kind, wanted.k, t, wanted.seed, teacher.key)
    index = tg.read_index(directory)
    if index is None and wanted.path:
        raise UserError(f"distill.loss.targets.path {wanted.path}: no {tg.INDEX} there; these are not teacher targets")
    if index is not None:
        for field, have, want in (("teacher", index.teacher, teacher.key), ("tokenizer", index.tokenizer, tokenizer)):
            if have != want:
                raise UserError(
                    f"distill.loss.targets: {directory} were made with another {field} ({have[:24]}) than this "
                    f"distillation's ({want[:24]}); drop `path` to compute them for this {field}"
                )
        asked = (wanted.kind, wanted.k, t, wanted.seed)
        if (index.kind, index.k, index.temperature, index.seed) != asked:
            raise UserError(
                f"distill.loss.targets: {directory} hold {index.kind} k={index.k} at T={index.temperature:g} (seed "
                f"{index.seed}), not {wanted.kind} k={wanted.k} at T={t:g} (seed {wanted.seed})"
            )
    else:
        id_dtype = "<u2" if vocab_size <= 1 << 16 else "<u4"
        index = tg.TargetsIndex(
            key=directory.rstrip("/").rsplit("/", 1)[-1],
            kind=wanted.kind,
            k=wanted.k,
            temperature=t,
            seed=wanted.seed,
            teacher=teacher.key,
            tokenizer=tokenizer,
            vocab_size=vocab_size,
            seq_len=shards.seq_len,
            id_dtype=id_dtype,
        )
    lacking = tg.missing_parts(index, sequences)
    if lacking:
        ctx.info(
            f"distill: teacher targets ({wanted.kind}, k={wanted.k}): the teacher's one pass over "
            f"{sum(c for _, c in lacking):,} sequences, into {directory}"
        )
        compute(
            shard_dir,
            teacher.path,
            index,
            directory,
            sequences,
            spec.workers,
            spec.gpus_per_worker,
            lambda items, total: ctx.progress(items, total, desc="targets"),
        )
    return directory
