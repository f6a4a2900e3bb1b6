"""Token importance: which positions the middle layers keep (docs/architecture.md).

Every input position gets the score of its token id; the top-K positions of each
sequence are kept. Strategies (the registry ``STRATEGIES``; a new one is a class and a line):

    loss_ema   EMA of the MLM loss of each id as a prediction target (the paper's default)
    frequency  -log(count + 1) from the training data's token counts: rare tokens are kept
    random     fresh uniform scores each call (a random-LTD-style baseline)
    none       no dropping (the dense baseline); select() returns every position

The ``loss_ema`` update is split so that it is one collective per optimizer step:
``accumulate()`` after every micro-batch (local sums and counts per target id), then
``synchronize_and_apply()`` once per optimizer step (one all_reduce, then the EMA).
Since every rank applies the same reduced tensor to the same table, the table stays
bit-identical on all ranks; ``checksum()`` / ``verify_synchronized()`` check that.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np
import torch
import torch.distributed as dist


class Strategy:
    """How token ids are scored. Subclasses override what differs from these defaults."""

    drops = True  # False: the dense baseline, every position kept
    learns_from_loss = False  # True: accumulate() and synchronize_and_apply() feed the table
    needs_token_counts = False  # True: the table starts from data_prep's token counts

    def initial_table(self, vocab_size: int, token_counts: torch.Tensor | None) -> torch.Tensor:
        """The [vocab] float32 table a run starts with (unused when scores() ignores it)."""
        return torch.zeros(vocab_size, dtype=torch.float32)

    def scores(
        self, table: torch.Tensor, input_ids: torch.Tensor, generator: torch.Generator | None
    ) -> torch.Tensor:
        """[B, S] float32 score of every position, before the allow/deny overrides."""
        return table[input_ids]


class LossEma(Strategy):
    learns_from_loss = True

    def initial_table(self, vocab_size, token_counts):
        # ln(V) is the loss of a uniform guess: ids not seen yet count as hard.
        return torch.full((vocab_size,), math.log(vocab_size), dtype=torch.float32)


class Frequency(Strategy):
    needs_token_counts = True

    def initial_table(self, vocab_size, token_counts):
        # +1 so unseen ids are finite and score highest (log(1) = 0): they are the rarest.
        return (-torch.log1p(token_counts)).float()


class RandomScores(Strategy):
    def scores(self, table, input_ids, generator):
        return _uniform(input_ids.shape, generator, input_ids.device, torch.float32)


class NoDropping(Strategy):
    drops = False


STRATEGIES: dict[str, Strategy] = {
    "loss_ema": LossEma(),
    "frequency": Frequency(),
    "random": RandomScores(),
    "none": NoDropping(),
}


class ImportanceTable:
    """Per-token-id importance scores and top-K position selection.

    Args:
        vocab_size: number of token ids.
        strategy: one of ``STRATEGIES``.
        allow_ids: ids that are always kept ([CLS], [SEP], [MASK], [UNK]; from the manifest).
        deny_ids: ids never kept while another token can be ([PAD]).
        beta: EMA decay of ``loss_ema``: table = beta * table + (1 - beta) * mean loss.
        token_counts: [vocab] counts of each id in the training data, for ``frequency``.
        device: where the table and the accumulator live (that of the input ids).
    """

    def __init__(
        self,
        vocab_size: int,
        strategy: str = "loss_ema",
        allow_ids: Iterable[int] = (),
        deny_ids: Iterable[int] = (),
        beta: float = 0.995,
        token_counts: np.ndarray | torch.Tensor | None = None,
        device: torch.device | str = "cpu",
    ):
        if strategy not in STRATEGIES:
            raise ValueError(
                f"unknown token-drop strategy {strategy!r}; choose one of {tuple(STRATEGIES)}"
            )
        if vocab_size < 1:
            raise ValueError(f"vocab_size must be positive, got {vocab_size}")
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"beta must be in [0, 1), got {beta}")
        self.vocab_size = vocab_size
        self.strategy = strategy
        self.beta = beta
        self.allow_ids = sorted({int(i) for i in allow_ids})
        self.deny_ids = sorted({int(i) for i in deny_ids})
        both = set(self.allow_ids) & set(self.deny_ids)
        if both:
            raise ValueError(f"token ids {sorted(both)} are in both allow_ids and deny_ids")
        bad = [i for i in self.allow_ids + self.deny_ids if not 0 <= i < vocab_size]
        if bad:
            raise ValueError(f"allow/deny ids {bad} are outside the vocabulary [0, {vocab_size})")

        device = torch.device(device)
        self.kind = STRATEGIES[strategy]
        counts = None
        if self.kind.needs_token_counts:
            if token_counts is None:
                raise ValueError(
                    f"strategy {strategy!r} needs token_counts (data_prep's token_counts.arrow)"
                )
            counts = torch.as_tensor(np.asarray(token_counts), dtype=torch.float64)
            if counts.shape != (vocab_size,):
                raise ValueError(
                    f"token_counts has shape {tuple(counts.shape)}, expected ({vocab_size},)"
                )
            if bool((counts < 0).any()):
                raise ValueError("token_counts must be non-negative")
        table = self.kind.initial_table(vocab_size, counts)
        self.table = table.to(device)  # [vocab] float32
        self._accumulator = torch.zeros(2, vocab_size, dtype=torch.float32, device=device)
        # Score overrides applied at selection time, never stored in the table.
        self._override = torch.zeros(vocab_size, dtype=torch.float32, device=device)
        self._override[self.allow_ids] = math.inf
        self._override[self.deny_ids] = -math.inf

    # -- selection ---------------------------------------------------------------------

    def to(self, device: torch.device | str) -> ImportanceTable:
        self.table = self.table.to(device)
        self._accumulator = self._accumulator.to(device)
        self._override = self._override.to(device)
        return self

    def scores(
        self, input_ids: torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """[B, S] float32 score of every position, allow (+inf) / deny (-inf) applied."""
        scores = self.kind.scores(self.table, input_ids, generator)
        override = self._override[input_ids]
        return torch.where(override == 0, scores, override)

    def select(
        self, input_ids: torch.Tensor, k: int, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Kept positions [B, K] int64, ascending, for input_ids [B, S].

        The top-K positions by score; ties (all ids start equal) are broken by a random
        permutation drawn from ``generator``, never by position: the positions are shuffled,
        stably sorted by score, and the first K taken.
        """
        batch, seq_len = input_ids.shape
        if not 1 <= k <= seq_len:
            raise ValueError(f"k must be in [1, {seq_len}], got {k}")
        if not self.kind.drops or k == seq_len:
            if k != seq_len:
                raise ValueError(
                    f"strategy {self.strategy!r} keeps every position; got k={k} < seq_len={seq_len}"
                )
            every_position = torch.arange(seq_len, device=input_ids.device)
            return every_position.expand(batch, seq_len).contiguous()
        scores = self.scores(input_ids, generator)
        # float64 keys: a repeated key (a tie in the shuffle itself) has probability ~S^2 / 2^53.
        shuffle_keys = _uniform((batch, seq_len), generator, input_ids.device, torch.float64)
        shuffle = shuffle_keys.argsort(dim=1)  # [batch, seq]: a random permutation per row
        order = scores.gather(1, shuffle).argsort(dim=1, descending=True, stable=True)
        kept = shuffle.gather(1, order[:, :k])
        return kept.sort(dim=1).values  # [batch, kept], in sequence order

    # -- loss_ema update ---------------------------------------------------------------

    def accumulate(self, target_ids: torch.Tensor, token_losses: torch.Tensor) -> None:
        """Add one micro-batch: target_ids [N] and their MLM losses [N]; slots with target
        -100 (padding of the static prediction width) are left out.

        A non-finite loss (an fp16 overflow, a bad batch) is left out too, sum and count:
        one NaN would make its id's score NaN for good, and NaN outranks every score.
        Shapes stay static and nothing is read on the host.
        """
        if not self.kind.learns_from_loss:
            return
        if target_ids.shape != token_losses.shape or target_ids.dim() != 1:
            raise ValueError(
                f"target_ids {tuple(target_ids.shape)} and token_losses "
                f"{tuple(token_losses.shape)} must be matching 1-D tensors"
            )
        ids = target_ids.to(self._accumulator.device, torch.int64)
        losses = token_losses.detach().to(self._accumulator.device, torch.float32)
        counted = torch.isfinite(losses) & (ids >= 0)  # masked, not indexed
        ids = ids.clamp(min=0)
        self._accumulator[0].scatter_add_(0, ids, torch.where(counted, losses, 0.0))
        self._accumulator[1].scatter_add_(0, ids, counted.to(torch.float32))

    def synchronize_and_apply(self, group: dist.ProcessGroup | None = None) -> None:
        """Once per optimizer step: all_reduce (SUM) the [2, vocab] sums and counts over
        ``group`` (when torch.distributed is initialized), then for ids seen:
        table = beta * table + (1 - beta) * sum / count. Resets the accumulator.

        Only a strategy that learns from the loss communicates; the strategy is the same on
        every rank, so either every rank calls the collective or none does.
        """
        if not self.kind.learns_from_loss:
            return
        acc = self._accumulator
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(acc, op=dist.ReduceOp.SUM, group=group)
        sums, counts = acc[0], acc[1]
        seen = counts > 0
        mean_loss = sums / counts.clamp(min=1.0)
        self.table = torch.where(
            seen, self.beta * self.table + (1.0 - self.beta) * mean_loss, self.table
        )
        acc.zero_()

    def discard(self) -> None:
        """Drop what was accumulated since the last update, with no collective: the step it
        came from was skipped (an fp16 loss-scale overflow), so the table does not learn
        from it either. Every rank must agree (the trainer makes the decision global)."""
        self._accumulator.zero_()

    # -- consistency and checkpoints ---------------------------------------------------

    def checksum(self) -> torch.Tensor:
        """float64 [2]: (sum of the table, an exact hash of its bits mod 2^31 - 1).

        Both are identical on every rank iff the tables are; the hash is an integer below
        2^31, so it is exact in float64 and survives a MIN/MAX all_reduce unchanged.
        """
        modulus = 2**31 - 1
        bits = self.table.detach().cpu().contiguous().view(torch.int32).to(torch.int64) & 0xFFFFFFFF
        weights = (torch.arange(1, self.vocab_size + 1, dtype=torch.int64) * 2654435761) % modulus
        hashed = ((bits % modulus) * weights % modulus).sum() % modulus
        return torch.tensor([self.table.double().sum().item(), float(hashed)], dtype=torch.float64)

    def verify_synchronized(self, group: dist.ProcessGroup | None = None) -> None:
        """Raise RuntimeError unless the table is bit-identical on every rank of ``group``."""
        if not (dist.is_available() and dist.is_initialized()):
            return
        device = self.table.device if dist.get_backend(group) == "nccl" else torch.device("cpu")
        local = self.checksum().to(device)
        low, high = local.clone(), local.clone()
        dist.all_reduce(low, op=dist.ReduceOp.MIN, group=group)
        dist.all_reduce(high, op=dist.ReduceOp.MAX, group=group)
        if not torch.equal(low, high):
            raise RuntimeError(
                f"importance table differs between ranks (checksums from {low.tolist()} to "
                f"{high.tolist()}); this rank has {local.tolist()}"
            )

    def state_dict(self) -> dict:
        """Checkpoint state. Take it after synchronize_and_apply (the accumulator is not saved)."""
        return {
            "strategy": self.strategy,
            "beta": self.beta,
            "vocab_size": self.vocab_size,
            "table": self.table.detach().cpu().clone(),
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore a table saved by state_dict(); refuses one from another run setup."""
        expected = {"strategy": self.strategy, "beta": self.beta, "vocab_size": self.vocab_size}
        for key, value in expected.items():
            if state.get(key) != value:
                raise ValueError(
                    f"importance table checkpoint has {key}={state.get(key)!r}, but this run "
                    f"uses {key}={value!r}; resume with the same token-drop settings"
                )
        table = state.get("table")
        if not isinstance(table, torch.Tensor) or table.shape != (self.vocab_size,):
            shape = tuple(table.shape) if isinstance(table, torch.Tensor) else type(table).__name__
            raise ValueError(
                f"importance table checkpoint holds {shape}, expected ({self.vocab_size},)"
            )
        self.table = table.to(self.table.device, torch.float32).clone()
        self._accumulator.zero_()


def _uniform(
    shape: tuple[int, ...] | torch.Size,
    generator: torch.Generator | None,
    device: torch.device,
    dtype: torch.dtype,
) -> torch.Tensor:
    """U[0, 1) drawn on the generator's device, then moved to ``device``."""
    source = generator.device if generator is not None else device
    return torch.rand(tuple(shape), generator=generator, device=source, dtype=dtype).to(device)


__all__ = ["STRATEGIES", "ImportanceTable", "Strategy"]
