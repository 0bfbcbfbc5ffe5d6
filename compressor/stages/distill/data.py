"""Training data for distillation: packed token blocks and which of them each worker reads at each step.

The driver tokenizes once with the teacher's tokenizer (`compressor.data.token_blocks`: documents shuffled by the
seed, joined with EOS, cut into fixed-length blocks) and shares the array through the Ray object store. Sequence
slot k of the run is block `permutation(epoch)[k % n]` with a seeded permutation per epoch, so the data order
depends only on the seed. Step s uses slots [s*G, (s+1)*G) of the global batch G; worker r of W takes the r-th
contiguous G/W of them. The global batch of a step is therefore the same for any number of workers, which is
what makes 1-worker and N-worker runs comparable and resume exact.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from compressor.config.schema import DataSource


def pack_blocks(ds: DataSource, tokenizer, seq_len: int, sequences_needed: int, seed: int) -> np.ndarray:
    """[n, seq_len] int32 token blocks; n <= sequences_needed (fewer blocks are cycled over epochs)."""
    from compressor.data import token_blocks

    blocks = token_blocks(ds, tokenizer, samples=sequences_needed, seq_len=seq_len, seed=seed)
    return blocks.numpy().astype(np.int32)


@dataclass(frozen=True)
class BatchPlan:
    num_blocks: int
    global_batch: int
    world_size: int
    micro_batch: int
    seed: int

    @lru_cache(maxsize=4)
    def _permutation(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(self.num_blocks)

    def block_ids(self, slots: np.ndarray) -> np.ndarray:
        out = np.empty_like(slots)
        for epoch in np.unique(slots // self.num_blocks):
            mask = slots // self.num_blocks == epoch
            out[mask] = self._permutation(int(epoch))[slots[mask] % self.num_blocks]
        return out

    def micro_batches(self, step: int, rank: int) -> list[np.ndarray]:
        """Block indices of this worker's micro-batches at `step`."""
        per_worker = self.global_batch // self.world_size
        first = step * self.global_batch + rank * per_worker
        ids = self.block_ids(np.arange(first, first + per_worker))
        return [ids[i : i + self.micro_batch] for i in range(0, per_worker, self.micro_batch)]
