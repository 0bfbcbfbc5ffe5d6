"""The teacher's pass over the token shards that writes sparse targets (compressor/targets.py), as Ray Data batch
inference: one actor per worker loads the teacher once, each call computes one part (PART_SEQUENCES sequences) and
writes it from the node it runs on; the driver lists each finished part in the index, so a killed run loses at most
the parts in flight. On a GPU, vLLM's `prompt_logprobs=k` computes top-k targets at higher throughput (see
docs/stages/distill.md); the hf path here runs everywhere, CPU included."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import asdict
from typing import Optional

import numpy as np
import torch

from compressor import targets as tg

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
def teacher_targets(
    teacher, tokens: torch.Tensor, first_id: int, kind: str, k: int, temperature: float, seed: int, id_dtype: str
) -> dict[str, np.ndarray]:
    """Targets of [n, L] `tokens` (sequence ids first_id..first_id+n-1) as numpy arrays ready to write."""
    device = next(teacher.parameters()).device
    out: dict[str, list] = {}
    head = teacher.get_output_embeddings()
    for row in range(tokens.shape[0]):
        hidden = teacher.base_model(input_ids=tokens[row : row + 1].to(device), use_cache=False).last_hidden_state[0]
        generator = _generator(seed, first_id + row, device) if kind == "sampled" else None
        pieces = []
        for start in range(0, hidden.shape[0], POSITION_CHUNK):
            logits = head(hidden[start : start + POSITION_CHUNK]).float() / temperature
            pieces.append(sparse_targets(torch.log_softmax(logits, dim=-1), kind, k, generator))
        for name in pieces[0]:
            out.setdefault(name, []).append(torch.cat([p[name] for p in pieces]).cpu().numpy())
    dtypes = {"ids": np.dtype(id_dtype), "val": np.dtype("<f2"), "tail": np.dtype("<f2"), "cnt": np.dtype("u1")}
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
        self.teacher = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=remote_code.enabled())
        self.teacher = self.teacher.to(device).eval()
        self.reader = ShardReader(shard_dir)
        self.directory, self.index = directory, index

    def __call__(self, batch: dict) -> dict:
        i = self.index
        for first, count in zip(batch["first"], batch["count"]):
            tokens = torch.from_numpy(self.reader.read(np.arange(first, first + count)).astype(np.int64))
            arrays = teacher_targets(
                self.teacher, tokens, int(first), i["kind"], i["k"], i["temperature"], i["seed"], i["id_dtype"]
            )
            tg.write_part(self.directory, int(first), arrays)
        return batch


def compute(
    shard_dir: str,
    teacher_path: str,
    index: tg.TargetsIndex,
    directory: str,
    sequences: int,
    workers: int = 1,
    num_gpus: float = 0,
    progress: Optional[Callable[[int], None]] = None,
) -> tg.TargetsIndex:
    """Compute the parts of the first `sequences` sequences that the index lacks; returns the updated index.
    Runs on the Ray cluster the caller has initialised."""
    import ray

    missing = tg.missing_parts(index, sequences)
    if not missing:
        return index
    from compressor.locks import holding

    with holding(directory, f"teacher targets {directory}"):
        index = tg.read_index(directory) or index  # another run may have written parts meanwhile
        missing = tg.missing_parts(index, sequences)
        parts = ray.data.from_items([{"first": f, "count": c} for f, c in missing], override_num_blocks=len(missing))
        done = parts.map_batches(
            PartWriter,
            fn_constructor_args=(teacher_path, shard_dir, directory, asdict(index), "cuda" if num_gpus else "cpu"),
            batch_size=1,
            concurrency=max(1, min(workers, len(missing))),
            num_gpus=num_gpus,
        )
        for row in done.iter_rows():  # parts in the order they finish: each listed as soon as it is whole
            index.parts[str(int(row["first"]))] = int(row["count"])
            tg.write_index(directory, index)
            if progress is not None:
                progress(sum(index.parts.values()))
    return index
