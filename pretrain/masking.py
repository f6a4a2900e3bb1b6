"""Dynamic MLM masking that is a pure function of (seed, epoch, global sample index).

BERT's recipe: of each sequence's maskable positions (not special, not padding),
round(15%) are predicted; of those, 80% become [MASK], 10% a random non-special token,
10% stay unchanged. Instead of a stateful RNG, every random number comes from a
counter-based hash (splitmix64) of (seed, epoch, sample index, position, stream), so a
sample's mask does not depend on the world size, the batch it lands in, or the step a
run was resumed at. Vectorized over the whole batch in numpy uint64 arithmetic.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np
import torch

IGNORE_INDEX = -100  # the label of a position that is not predicted (PyTorch/HF convention)

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)
_SELECT, _ACTION, _REPLACEMENT = 0, 1, 2  # independent random streams per position
_TWO_POW_53 = float(2**53)
MASK_PROB = 0.15  # BERT's: the fraction of a row's maskable positions that are predicted


def max_predictions(seq_len: int, mask_prob: float = MASK_PROB) -> int:
    """P: the most positions :class:`DynamicMasker` predicts in a row of ``seq_len``
    tokens (round(mask_prob * n) of n <= seq_len maskable ones), the static number of
    prediction slots a training step computes."""
    return max(1, math.floor(seq_len * mask_prob + 0.5))


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """The splitmix64 finalizer: a bijective, well-mixed uint64 -> uint64 hash."""
    with np.errstate(over="ignore"):
        z = x + _GOLDEN
        z = (z ^ (z >> np.uint64(30))) * _MIX1
        z = (z ^ (z >> np.uint64(27))) * _MIX2
        return z ^ (z >> np.uint64(31))


def _sample_keys(seed: int, epoch: int, sample_indices: np.ndarray) -> np.ndarray:
    """One uint64 key per sample, a hash of (seed, epoch, global sample index)."""
    base = _splitmix64(np.array([seed % 2**64], dtype=np.uint64))
    base = _splitmix64(base ^ np.uint64(epoch % 2**64))
    return _splitmix64(base ^ sample_indices.astype(np.uint64))  # [batch]


def _uniforms(keys: np.ndarray, seq_len: int, stream: int) -> np.ndarray:
    """[batch, seq] float64 in [0, 1) for one stream: hash of (key, position, stream)."""
    counters = np.arange(seq_len, dtype=np.uint64) * np.uint64(3) + np.uint64(stream)
    bits = _splitmix64(keys[:, None] ^ _splitmix64(counters)[None, :])
    return (bits >> np.uint64(11)).astype(np.float64) / _TWO_POW_53


class DynamicMasker:
    """BERT masking for a fixed vocabulary and special-token set.

    Args:
        special_ids: ids never masked and never used as random replacements
            ([PAD], [CLS], [SEP], [MASK], [UNK]; from the manifest).
        mask_id: the [MASK] id.
        vocab_size: number of token ids.
        seed: the run's seed.
        mask_prob: fraction of maskable positions predicted (0.15).
        mask_token_prob, random_token_prob: of those, replaced by [MASK] (0.8) and by a
            random non-special token (0.1); the rest stay unchanged.
    """

    def __init__(
        self,
        special_ids: Iterable[int],
        mask_id: int,
        vocab_size: int,
        seed: int,
        mask_prob: float = MASK_PROB,
        mask_token_prob: float = 0.8,
        random_token_prob: float = 0.1,
    ):
        self.special_ids = np.array(sorted({int(i) for i in special_ids}), dtype=np.int64)
        if mask_id not in set(self.special_ids.tolist()):
            raise ValueError(
                f"mask_id {mask_id} must be one of the special ids {self.special_ids.tolist()}"
            )
        if not 0.0 < mask_prob <= 1.0:
            raise ValueError(f"mask_prob must be in (0, 1], got {mask_prob}")
        if mask_token_prob < 0 or random_token_prob < 0 or mask_token_prob + random_token_prob > 1:
            raise ValueError("mask_token_prob and random_token_prob must be >= 0 and sum to <= 1")
        self.mask_id = int(mask_id)
        self.vocab_size = int(vocab_size)
        self.seed = int(seed)
        self.mask_prob = mask_prob
        self.mask_token_prob = mask_token_prob
        self.random_token_prob = random_token_prob
        is_special = np.zeros(self.vocab_size, dtype=bool)
        is_special[self.special_ids] = True
        self._is_special = is_special  # [vocab]
        self._replacements = np.flatnonzero(~is_special)  # [vocab - specials] candidate ids
        if len(self._replacements) == 0:
            raise ValueError("every id of the vocabulary is special: nothing to mask")

    def __call__(
        self,
        input_ids: torch.Tensor | np.ndarray,
        sample_indices: torch.Tensor | np.ndarray,
        epoch: int,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """input_ids [B, S] (any integer dtype), sample_indices [B] global sample indices.

        Returns (masked_input_ids [B, S] int64, labels [B, S] int64 with -100 where not predicted).
        """
        ids = np.asarray(input_ids.cpu() if isinstance(input_ids, torch.Tensor) else input_ids)
        index = np.asarray(
            sample_indices.cpu() if isinstance(sample_indices, torch.Tensor) else sample_indices
        )
        masked, labels = self.mask_numpy(ids, index, epoch)
        return torch.from_numpy(masked), torch.from_numpy(labels)

    def mask_numpy(
        self, ids: np.ndarray, index: np.ndarray, epoch: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """:meth:`__call__` on numpy arrays, returning numpy arrays (the data loader's form)."""
        ids = ids.astype(np.int64)
        if ids.ndim != 2 or index.shape != (ids.shape[0],):
            raise ValueError(
                f"input_ids must be [batch, seq] and sample_indices [batch]; got "
                f"{ids.shape} and {index.shape}"
            )
        if ids.size and (ids.min() < 0 or ids.max() >= self.vocab_size):
            raise ValueError(f"input_ids outside the vocabulary [0, {self.vocab_size})")
        batch, seq_len = ids.shape
        keys = _sample_keys(self.seed, int(epoch), index.astype(np.int64))

        # Exactly round(mask_prob * n) of each row's n maskable positions: those with the
        # smallest random keys (unmaskable positions get a key above every real one).
        maskable = ~self._is_special[ids]  # [batch, seq]
        select_key = np.where(maskable, _uniforms(keys, seq_len, _SELECT), 2.0)
        num_maskable = maskable.sum(axis=1)
        num_masked = np.floor(num_maskable * self.mask_prob + 0.5).astype(np.int64)
        num_masked = np.where(num_maskable > 0, np.maximum(num_masked, 1), 0)
        rank = np.empty_like(ids)
        np.put_along_axis(
            rank, np.argsort(select_key, axis=1, kind="stable"), np.arange(seq_len)[None, :], 1
        )
        predicted = rank < num_masked[:, None]  # [batch, seq]

        action = _uniforms(keys, seq_len, _ACTION)
        to_mask = predicted & (action < self.mask_token_prob)
        to_random = predicted & ~to_mask & (action < self.mask_token_prob + self.random_token_prob)
        replacement_draw = _uniforms(keys, seq_len, _REPLACEMENT)
        replacement = self._replacements[
            (replacement_draw * len(self._replacements)).astype(np.int64)
        ]

        labels = np.where(predicted, ids, IGNORE_INDEX)
        masked = np.where(to_mask, self.mask_id, np.where(to_random, replacement, ids))
        return masked, labels


def mask_batch(
    input_ids: torch.Tensor | np.ndarray,
    sample_indices: torch.Tensor | np.ndarray,
    epoch: int,
    seed: int,
    special_ids: Iterable[int],
    mask_id: int,
    vocab_size: int,
    mask_prob: float = MASK_PROB,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Functional form of DynamicMasker (builds the special-id tables on every call)."""
    masker = DynamicMasker(special_ids, mask_id, vocab_size, seed, mask_prob=mask_prob)
    return masker(input_ids, sample_indices, epoch)


__all__ = ["IGNORE_INDEX", "MASK_PROB", "DynamicMasker", "mask_batch", "max_predictions"]
