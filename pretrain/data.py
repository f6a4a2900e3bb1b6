"""Data loading: memory-mapped shards, a seeded global order, and O(1) resume.

Every train sequence has a global index (shards in manifest order). The run reads an
endless stream of positions; position p is sample ``perm_e[p % N]`` of epoch
``e = p // N``, where ``perm_e`` is a seeded permutation of all N indices. Optimizer step
b reads stream positions [b*G, (b+1)*G) (G = the global batch size); data-parallel rank
r of R takes positions [r*G/R, (r+1)*G/R) of that window, micro-batch by micro-batch.

The loader's whole state is ``consumed_samples``: resuming seeks in O(1), and a run
can resume on another data-parallel world size at the same G. Masks come from
:class:`pretrain.masking.DynamicMasker`, a pure function of (seed, epoch, sample index),
so a resumed run sees exactly the masks it would have seen.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from data_prep.manifest import Manifest, open_shard
from pretrain.masking import DynamicMasker


class TokenShards:
    """The shards of one split as one array of sequences, memory-mapped (no copy)."""

    def __init__(self, manifest: Manifest, split: str):
        self.seq_len = manifest.seq_len
        self.shards = [open_shard(p, self.seq_len) for p in manifest.shard_paths(split)]
        self.starts = np.cumsum([0] + [len(s) for s in self.shards])  # [shards + 1]

    def __len__(self) -> int:
        return int(self.starts[-1])

    def gather(self, indices: np.ndarray) -> np.ndarray:
        """Rows at global ``indices`` [n] -> int64 [n, seq_len]."""
        out = np.empty((len(indices), self.seq_len), np.int64)
        shard_of = np.searchsorted(self.starts, indices, side="right") - 1
        for s in np.unique(shard_of):
            where = np.flatnonzero(shard_of == s)
            out[where] = self.shards[s][indices[where] - self.starts[s]]
        return out


class SampleOrder:
    """Stream position -> (epoch, global sample index), with a seeded permutation per epoch."""

    def __init__(self, num_samples: int, seed: int):
        if num_samples < 1:
            raise ValueError("the train split holds no sequence")
        self.num_samples, self.seed = num_samples, seed
        self._epoch, self._perm = -1, None

    def permutation(self, epoch: int) -> np.ndarray:
        if epoch != self._epoch:
            rng = np.random.Generator(np.random.PCG64([self.seed, epoch]))
            self._epoch, self._perm = epoch, rng.permutation(self.num_samples)
        return self._perm

    def positions(self, start: int, count: int) -> tuple[np.ndarray, np.ndarray]:
        """Epochs [count] and sample indices [count] of stream positions [start, start+count)."""
        pos = np.arange(start, start + count, dtype=np.int64)
        epochs = pos // self.num_samples
        indices = np.empty(count, np.int64)
        for e in np.unique(epochs):
            where = epochs == e
            indices[where] = self.permutation(int(e))[pos[where] % self.num_samples]
        return epochs, indices


@dataclass
class Batch:
    """One micro-batch, ready for the model (CPU tensors; the trainer moves them)."""

    input_ids: torch.Tensor  # [batch, seq] int64, masked
    attention_mask: torch.Tensor  # [batch, seq] bool, True = real token
    labels: torch.Tensor  # [batch, seq] int64, -100 = not predicted
    sample_indices: torch.Tensor  # [batch] int64 global indices (for tests and debugging)


class PretrainLoader:
    """Micro-batches of this data-parallel rank for each optimizer step.

    Args:
        shards: the train split.
        masker: the run's masking.
        pad_id: padding id (from the manifest).
        global_batch: G, samples per optimizer step over all ranks.
        micro_batch: samples per micro-batch on one rank.
        dp_rank, dp_size: this rank's place in the data-parallel group.
        seed: orders the epochs.
        consumed_samples: where to start (0, or the value saved in a checkpoint).
    """

    def __init__(
        self,
        shards: TokenShards,
        masker: DynamicMasker,
        pad_id: int,
        global_batch: int,
        micro_batch: int,
        dp_rank: int,
        dp_size: int,
        seed: int,
        consumed_samples: int = 0,
    ):
        if global_batch % (micro_batch * dp_size):
            raise ValueError(
                f"global batch {global_batch} is not a multiple of micro batch {micro_batch} "
                f"x data-parallel size {dp_size}"
            )
        self.shards, self.masker, self.pad_id = shards, masker, pad_id
        self.global_batch, self.micro_batch = global_batch, micro_batch
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.order = SampleOrder(len(shards), seed)
        self.consumed_samples = consumed_samples

    @property
    def micro_batches_per_step(self) -> int:
        return self.global_batch // (self.micro_batch * self.dp_size)

    def state_dict(self) -> dict:
        return {"consumed_samples": self.consumed_samples}

    def load_state_dict(self, state: dict) -> None:
        self.consumed_samples = int(state["consumed_samples"])

    def next_step(self) -> Iterator[Batch]:
        """The micro-batches of the next optimizer step (read lazily); advances
        consumed_samples by G at once, whether or not this rank reads them."""
        per_rank = self.global_batch // self.dp_size
        start = self.consumed_samples + self.dp_rank * per_rank
        self.consumed_samples += self.global_batch
        return (
            self.batch_at(start + m * self.micro_batch, self.micro_batch)
            for m in range(self.micro_batches_per_step)
        )

    def batch_at(self, position: int, size: int) -> Batch:
        """The masked batch of stream positions [position, position + size)."""
        epochs, indices = self.order.positions(position, size)
        ids = self.shards.gather(indices)
        input_ids = np.empty_like(ids)
        labels = np.empty_like(ids)
        for e in np.unique(epochs):  # a window spans at most two epochs
            where = np.flatnonzero(epochs == e)
            masked, lab = self.masker(ids[where], indices[where], int(e))
            input_ids[where], labels[where] = masked.numpy(), lab.numpy()
        return Batch(
            input_ids=torch.from_numpy(input_ids),
            attention_mask=torch.from_numpy(ids != self.pad_id),
            labels=torch.from_numpy(labels),
            sample_indices=torch.from_numpy(indices),
        )


def validation_batches(
    shards: TokenShards,
    masker: DynamicMasker,
    pad_id: int,
    batch: int,
    max_batches: int,
    dp_rank: int,
    dp_size: int,
) -> Iterator[Batch]:
    """This rank's share of a fixed validation set: the first sequences of the split, at
    most ``max_batches * batch`` per rank, masked with epoch 0 (the same masks every
    evaluation). Every rank gets the same number of full batches (ZeRO-3 and pipeline
    stages need that)."""
    per_rank = min(len(shards) // dp_size, max_batches * batch) // batch * batch
    mine = np.arange(per_rank, dtype=np.int64) * dp_size + dp_rank
    for start in range(0, per_rank, batch):
        indices = mine[start : start + batch]
        ids = shards.gather(indices)
        masked, labels = masker(ids, indices, 0)
        yield Batch(masked, torch.from_numpy(ids != pad_id), labels, torch.from_numpy(indices))
