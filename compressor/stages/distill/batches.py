"""Training data for distillation: token shards on shared storage, and which sequences each worker reads at each step.

The driver has the source tokenized with the teacher's tokenizer into token shards (`compressor.shards`, under
`ctx.data_root`) by a Ray task, so its own memory never grows with the budget, and hands the workers only the
shard directory and the number of sequences the run draws from: the first `min(available, steps x global_batch)`
sequences of the source, fixed when the run starts (another pipeline extending the same shards later changes nothing).

Sequence slot k of the run is sequence `permutation(epoch)[k % n]` of those n, with a seeded permutation per epoch,
so the data order depends only on the seed. Step s uses slots [s*G, (s+1)*G) of the global batch G; worker r of W
takes the r-th contiguous G/W of them. The global batch of a step is therefore the same for any number of workers,
which is what makes 1-worker and N-worker runs comparable and resume exact. Each worker reads only its own ids of each
step from the shards (memory-mapped, or range-read from an object store), the next step in the background.

With COMPRESSOR_DATA_TRACE=<dir>, each worker appends {"step" (1-based, as in the metrics), "rank", "pid", "ids"} to
<dir>/rank<r>.jsonl for every step it trains: what it really read, for tests and debugging.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Optional

import numpy as np

from compressor.config.schema import DataSource
from compressor.errors import CompressorError, UserError
from compressor.shards import ShardIndex

TRACE_ENV = "COMPRESSOR_DATA_TRACE"
FIT_MARGIN = 1.1  # the estimate comes from one shard: refuse only a source clearly too small for the budget


@dataclass(frozen=True)
class RunData:
    """The data of one distillation run: what the workers open and what the manifest records."""

    directory: str  # shard directory (path or URI) with its index.json
    sequences: int  # the first `sequences` of the shards are this run's distinct data
    seq_len: int
    needed: int  # sequences trained: steps x global_batch

    @property
    def epochs(self) -> float:
        return self.needed / self.sequences

    @property
    def distinct_tokens(self) -> int:
        return min(self.sequences, self.needed) * self.seq_len


def run_data(
    directory: str, index: ShardIndex, steps: int, global_batch: int, max_epochs: float, source: str
) -> RunData:
    """The run's share of the shards, or a UserError when the source is too small for the budget at `max_epochs`."""
    needed, available, seq_len = steps * global_batch, index.sequences, index.seq_len
    if available == 0:
        raise UserError(f"data source {source!r}: fewer than {seq_len} tokens; nothing to use")
    data = RunData(directory, min(available, needed), seq_len, needed)
    if data.epochs > max_epochs * (1 + 1e-9):
        least = math.ceil(data.epochs * 100) / 100
        raise UserError(
            f"distill.max_epochs: the run needs {needed:,} sequences of {seq_len} tokens ({needed * seq_len:,} tokens: "
            f"{steps:,} steps x global_batch {global_batch}), but data source {source!r} holds only {available:,} "
            f"sequences ({available * seq_len:,} tokens), so each would be seen {data.epochs:.2f} times and max_epochs is "
            f"{max_epochs:g}. Set distill.max_epochs to {least:g} or more to allow that repetition, or lower "
            "steps / tokens, or use a larger source."
        )
    return data


def check_fit(
    estimated_tokens: int, steps: int, global_batch: int, seq_len: int, max_epochs: float, source: str
) -> None:
    """`run_data`'s refusal made early, from the source's size estimated at its first shard (`shards.prepare`'s
    `check`): for the 94B-token recipe, after minutes of tokenizing instead of the whole source. The margin leaves
    close calls to the exact check once the source is read."""
    needed = steps * global_batch * seq_len
    if estimated_tokens * FIT_MARGIN * max_epochs >= needed:
        return
    least = math.ceil(needed / estimated_tokens * 10) / 10
    raise UserError(
        f"distill.max_epochs: the run needs {needed:,} tokens ({steps:,} steps x global_batch {global_batch} x "
        f"{seq_len} tokens), but data source {source!r} holds only about {estimated_tokens:,} tokens (estimated from "
        f"its first token shard and its size), so each would be seen about {needed / estimated_tokens:.1f} times and "
        f"max_epochs is {max_epochs:g}. Set distill.max_epochs to {least:g} or more to allow that repetition, or lower "
        "steps / tokens, or use a larger source (found before tokenizing the whole source; the shards written are kept)."
    )


def prepare_task(
    ds: DataSource, teacher, seq_len: int, sequences: int, data_root: str, queue=None, check=None
) -> tuple[str, ShardIndex]:
    """Body of the Ray task that writes (or extends) the shards, on whichever node it runs; reports progress to `queue`."""
    import time

    from compressor.models import tokenizer_dir
    from compressor.shards import prepare

    last = [0.0]

    def progress(done: int) -> None:
        if queue is not None and time.monotonic() - last[0] > 1.0:
            last[0] = time.monotonic()
            try:
                queue.put_nowait(done)
            except Exception:  # noqa: BLE001  (a full or gone queue only costs the progress bar)
                pass

    return prepare(ds, tokenizer_dir(teacher), seq_len, sequences, data_root, progress, check=check)


def prepare_in_ray(
    ds: DataSource, teacher, seq_len: int, sequences: int, data_root: str, show: Callable, check=None
) -> tuple[str, ShardIndex]:
    """Run `prepare_task` as a Ray task (1 CPU; the tokenizer uses every core of its node), preferably on this node,
    where a local data path and the tokenizer are; `show(iterable, total)` displays its progress; `check` as in
    `shards.prepare` (picklable: `functools.partial(check_fit, ...)`)."""
    import ray
    from ray.util.queue import Empty, Queue
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    queue = Queue(maxsize=1000, actor_options={"num_cpus": 0})
    here = NodeAffinitySchedulingStrategy(node_id=ray.get_runtime_context().get_node_id(), soft=True)
    task = ray.remote(num_cpus=1, max_retries=0)(prepare_task).options(scheduling_strategy=here, name="tokenize")
    ref = task.remote(ds, teacher, seq_len, sequences, data_root, queue, check)

    def advances():
        done = 0
        while True:
            finished, _ = ray.wait([ref], timeout=1.0)
            try:
                while True:
                    now = min(queue.get_nowait(), sequences)
                    yield from range(now - done)
                    done = max(done, now)
            except Empty:
                pass
            if finished:
                return

    try:
        for _ in show(advances(), sequences):
            pass
        return ray.get(ref)
    except ray.exceptions.RayTaskError as exc:
        if isinstance(exc.cause, CompressorError):  # bad data found while reading it: one paragraph, exit 2
            raise exc.cause from None
        raise
    finally:
        ray.kill(queue.actor)


@dataclass(frozen=True)
class BatchPlan:
    num_sequences: int
    global_batch: int
    world_size: int
    micro_batch: int
    seed: int

    @lru_cache(maxsize=2)  # a step spans at most two epochs; 8 bytes per sequence each (92 MB at 94B x 8k tokens)
    def _permutation(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(self.num_sequences)

    def sequence_ids(self, slots: np.ndarray) -> np.ndarray:
        out = np.empty_like(slots)
        for epoch in np.unique(slots // self.num_sequences):
            mask = slots // self.num_sequences == epoch
            out[mask] = self._permutation(int(epoch))[slots[mask] % self.num_sequences]
        return out

    def rank_ids(self, step: int, rank: int) -> np.ndarray:
        """Global sequence ids worker `rank` trains on at `step` (0-based)."""
        per_worker = self.global_batch // self.world_size
        first = step * self.global_batch + rank * per_worker
        return self.sequence_ids(np.arange(first, first + per_worker))

    def micro_batches(self, step: int, rank: int) -> list[np.ndarray]:
        """Sequence ids of this worker's micro-batches at `step`."""
        ids = self.rank_ids(step, rank)
        return [ids[i : i + self.micro_batch] for i in range(0, len(ids), self.micro_batch)]


_TORCH_SAFE = {"<u2": np.int32, "<u4": np.int64}  # torch has no uint16/uint32 tensors worth gathering with


class WorkerData:
    """One worker's batches: its ids of each step (BatchPlan), read from the shards, the next step prefetched."""

    def __init__(
        self,
        directory: str,
        sequences: int,
        plan: BatchPlan,
        rank: int,
        steps: int,
        trace_dir: Optional[str] = None,
        targets: Optional[str] = None,
    ):
        from compressor.chat_data import is_chat_dir, side_readers
        from compressor.shards import ShardReader

        # Chat data: the tokens' reader, and the loss mask and positions beside them (compressor.chat_data).
        self.chat = side_readers(directory) if is_chat_dir(directory) else {}
        self.reader = self.chat.pop("tokens") if self.chat else ShardReader(directory)
        if targets is not None:  # the teacher's sparse targets of the same sequence ids (compressor/targets.py)
            from compressor.targets import TargetsReader

            self.targets = TargetsReader(targets, sequences)
        else:
            self.targets = None
        if len(self.reader) < sequences:
            raise UserError(
                f"token shards {directory} hold {len(self.reader):,} sequences, the run needs {sequences:,}"
            )
        self.plan, self.rank, self.steps = plan, rank, steps
        trace_dir = trace_dir or os.environ.get(TRACE_ENV)
        self.trace = Path(trace_dir) / f"rank{rank}.jsonl" if trace_dir else None
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="distill-data")
        self._next: Optional[tuple[int, object]] = None

    def _read(self, step: int) -> tuple[np.ndarray, np.ndarray, Optional[dict]]:
        ids = self.plan.rank_ids(step, self.rank)
        return ids, self.reader.read(ids), self.targets.read(ids) if self.targets is not None else None

    def batch(self, step: int) -> list:
        """This worker's micro-batches of `step` (0-based) as int64 torch tensors, or with teacher targets
        (tokens, {name: tensor}) pairs; starts reading step + 1."""
        import torch

        if self._next is not None and self._next[0] == step:
            ids, tokens, sparse = self._next[1].result()
        else:
            ids, tokens, sparse = self._read(step)
        self._next = (step + 1, self._pool.submit(self._read, step + 1)) if step + 1 < self.steps else None
        if self.trace is not None:
            self.trace.parent.mkdir(parents=True, exist_ok=True)
            with self.trace.open("a") as fh:
                fh.write(
                    json.dumps({"step": step + 1, "rank": self.rank, "pid": os.getpid(), "ids": ids.tolist()}) + "\n"
                )
        micro = self.plan.micro_batch
        tokens = list(torch.from_numpy(tokens.astype(np.int64)).split(micro))
        # fp16 and small integer types as stored; the loss widens them per chunk
        parts = {
            name: torch.from_numpy(np.ascontiguousarray(a).astype(_TORCH_SAFE.get(a.dtype.str, a.dtype))).split(micro)
            for name, a in (sparse or {}).items()
        }
        if self.chat:  # {tokens, loss_mask, positions[, soft_mask, sparse]} per micro-batch; memory-mapped
            sides = {name: torch.from_numpy(r.read(ids).astype(np.int64)).split(micro) for name, r in self.chat.items()}
            return [
                {"tokens": t, **{name: sides[name][i] for name in sides}}
                | ({"sparse": {name: parts[name][i] for name in parts}} if parts else {})
                for i, t in enumerate(tokens)
            ]
        if sparse is None:
            return tokens
        return [(t, {name: parts[name][i] for name in parts}) for i, t in enumerate(tokens)]

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
