"""Data loading: memory-mapped shards, a seeded global order, and O(1) resume.

Every train sequence has a global index (shards in manifest order). The run reads an
endless stream of positions; position p is sample ``perm_e(p % N)`` of epoch
``e = p // N``, where ``perm_e`` is a seeded permutation of all N indices. Optimizer step
b reads stream positions [b*G, (b+1)*G) (G = the global batch size); data-parallel rank
r of R takes positions [r*G/R, (r+1)*G/R) of that window, micro-batch by micro-batch.

``perm_e`` is never materialised: :class:`SampleOrder` computes it index by index, as a
keyed Feistel network over [0, 2^b) (the smallest such domain that holds N) whose round
keys come from (seed, epoch), restricted to [0, N) by cycle walking (a value that lands
at N or above is put through the network again until it falls below N). Any position
maps to its sample in O(1) time and memory, whatever N.

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


_U64 = np.uint64
_MASK64 = (1 << 64) - 1
_GOLDEN = _U64(0x9E3779B97F4A7C15)  # 2^64 / golden ratio: spreads consecutive counters


def _mix64(z: np.ndarray) -> np.ndarray:
    """splitmix64's finalizer, a bijection of uint64 with full avalanche (in place)."""
    z ^= z >> _U64(30)
    z *= _U64(0xBF58476D1CE4E5B9)
    z ^= z >> _U64(27)
    z *= _U64(0x94D049BB133111EB)
    z ^= z >> _U64(31)
    return z


class SampleOrder:
    """Stream position -> (epoch, global sample index): a seeded bijection of [0, N) per
    epoch, computed per index (a cycle-walking Feistel network), never materialised.

    Position p is sample ``perm(p % N)`` of epoch ``p // N``. ``perm`` is a Feistel network
    of ``ROUNDS`` rounds on b-bit values, b the smallest with 2^b >= N (so the domain is
    < 2N; b >= 4 for N > 4, see ``__init__``). A value is split into halves (L, R) of
    floor(b/2) and ceil(b/2) bits; each round maps it to (R, L ^ F_k(R)), where F_k is
    splitmix64's finalizer of ``k ^ R`` cut to L's width and k the round's key, derived
    from (seed, epoch). Each round is a bijection of [0, 2^b), whatever F_k, so the network
    is one too; a result >= N is put through it again (cycle walking) until it is < N,
    which keeps a bijection of [0, N). All arithmetic is uint64 numpy, vectorised over
    the positions asked for: O(count) time and memory, nothing of size N.

    ROUNDS = 12 because small domains need them: in chi-square tests of the samples at
    pairs of positions over 10^5 shuffles, 6 rounds show structure up to N = 64 and 8 up
    to N = 16, and 10 still do at N = 5 and 6 over 5 * 10^5; 12 showed none. Larger N
    would do with fewer; at 12, a micro-batch of 512 positions takes ~1-3 ms.

    ``ALGORITHM`` names this order; change it whenever any output would change, so that a
    checkpoint written under one order is never resumed under another.
    """

    ALGORITHM = "feistel-v1"
    ROUNDS = 12

    def __init__(self, num_samples: int, seed: int):
        if num_samples < 1:
            raise ValueError("the train split holds no sequence")
        if num_samples >= 1 << 63:
            raise ValueError(f"{num_samples} samples do not fit int64 indices")
        self.num_samples, self.seed = int(num_samples), int(seed)
        # the domain [0, 2^bits), < 2N but for N <= 8: a network whose halves are 1 and 2
        # bits wide mixes poorly (measured), so 5 <= N <= 8 take 2 + 2 bits, N <= 4 1 + 1
        bits = (self.num_samples - 1).bit_length()
        bits = 2 if bits <= 2 else max(4, bits)
        self.left_bits, self.right_bits = bits // 2, bits - bits // 2
        # the seed's key; negative seeds wrap modulo 2^64 like any other
        self._seed_key = _mix64(np.array([self.seed & _MASK64], _U64) ^ _GOLDEN)[0]

    def round_keys(self, epochs: np.ndarray) -> np.ndarray:
        """The Feistel round keys of each epoch in ``epochs`` [n]: uint64 [ROUNDS, n]."""
        epoch_key = _mix64(epochs.astype(_U64) * _GOLDEN ^ self._seed_key)
        rounds = np.arange(1, self.ROUNDS + 1, dtype=_U64)[:, None] * _GOLDEN
        return _mix64(_mix64(epoch_key[None, :] + rounds))

    def permute(self, values: np.ndarray, keys: np.ndarray) -> np.ndarray:
        """One pass of the Feistel network over [0, 2^b): uint64 [n] -> uint64 [n], under the
        round keys ``keys`` [ROUNDS, n] of each value (or [ROUNDS, 1] for all of them)."""
        left_bits, right_bits = self.left_bits, self.right_bits
        left, right = values >> _U64(right_bits), values & _U64((1 << right_bits) - 1)
        for k in keys:
            # (L, R) -> (R, L ^ F_k(R)): the halves trade places, and so do their widths
            left, right = right, left ^ (_mix64(k ^ right) & _U64((1 << left_bits) - 1))
            left_bits, right_bits = right_bits, left_bits
        return (left << _U64(right_bits)) | right

    def positions(self, start: int, count: int) -> tuple[np.ndarray, np.ndarray]:
        """Epochs [count] and sample indices [count] (both int64) of stream positions
        [start, start+count)."""
        if start < 0 or count < 0 or start + count >= 1 << 63:
            raise ValueError(f"stream positions [{start}, {start} + {count}) are out of range")
        pos = np.arange(start, start + count, dtype=np.int64)  # [count]
        epochs = pos // self.num_samples
        first, last = start // self.num_samples, (start + max(count, 1) - 1) // self.num_samples
        keys = self.round_keys(np.arange(first, last + 1, dtype=np.int64))
        if last > first:  # the window crosses an epoch boundary
            keys = keys[:, epochs - first]  # [ROUNDS, count]; else [ROUNDS, 1], broadcast
        values = self.permute((pos % self.num_samples).astype(_U64), keys)
        n = _U64(self.num_samples)
        # cycle walking: the domain is < 2N (N > 8), so a value needs < 2 passes on average
        walking = np.flatnonzero(values >= n)
        while walking.size:
            again = self.permute(values[walking], keys[:, walking] if last > first else keys)
            values[walking] = again
            walking = walking[again >= n]
        return epochs, values.astype(np.int64)


@dataclass
class Batch:
    """One micro-batch, ready for the model (CPU tensors; the trainer moves them)."""

    input_ids: torch.Tensor  # [batch, seq] int64, masked
    attention_mask: torch.Tensor  # [batch, seq] bool, True = real token
    labels: torch.Tensor  # [batch, seq] int64, -100 = not predicted
    sample_indices: torch.Tensor  # [batch] int64 global indices (for tests and debugging)
    padded: bool = True  # some row has padding; False: the model may skip the padding mask

    def to(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """(input_ids, attention_mask or None when nothing is padded, labels) on ``device``;
        decided from the host copy, so the step reads nothing back from the device."""
        pin = device.type == "cuda"  # pinned memory: the copies overlap with compute

        def move(t: torch.Tensor) -> torch.Tensor:
            return (t.pin_memory() if pin else t).to(device, non_blocking=True)

        mask = move(self.attention_mask) if self.padded else None
        return move(self.input_ids), mask, move(self.labels)


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
            input_ids[where], labels[where] = self.masker.mask_numpy(
                ids[where], indices[where], int(e)
            )
        return Batch(
            input_ids=torch.from_numpy(input_ids),
            attention_mask=torch.from_numpy(ids != self.pad_id),
            labels=torch.from_numpy(labels),
            sample_indices=torch.from_numpy(indices),
            padded=bool((ids == self.pad_id).any()),
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
        real = ids != pad_id
        yield Batch(
            masked, torch.from_numpy(real), labels, torch.from_numpy(indices), not bool(real.all())
        )
