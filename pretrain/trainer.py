"""The training loop: it calls the components and holds none of their detail.

One optimizer step, on every rank:

    for each micro-batch of this rank's slice of the global batch:
        select the kept positions (importance table, seeded by seed/step/rank/micro-batch)
        forward (token-dropped), backward, record per-id MLM losses into the table
    DeepSpeed's optimizer step (at the accumulation boundary)
    one all_reduce of the table's [2, vocab] sums and counts, then the EMA update
    one small all_reduce of the step's statistics and the stop flag

How the micro-batches run is a :class:`StepRunner`'s business: :class:`DataParallelRunner`
here, :class:`pretrain.pipeline.PipelineRunner` for pipeline parallelism. Both are given
the same two callables, :meth:`Trainer.select` and :meth:`Trainer.record`, so token
selection and the table's feed exist once; after construction the trainer never asks
which runner it has.

The stop flag is how a SIGTERM/SIGUSR1 on any rank makes every rank checkpoint at the
same step and exit 0.
"""

from __future__ import annotations

import math
import os
import signal
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Protocol

import torch

from pretrain import checkpoint, distributed
from pretrain.config import ResolvedRun
from pretrain.data import Batch, PretrainLoader, SampleOrder, TokenShards, validation_batches
from pretrain.importance import STRATEGIES, ImportanceTable
from pretrain.masking import IGNORE_INDEX, DynamicMasker
from pretrain.metrics import MetricsLogger
from pretrain.model import BertForTokenDropPretraining, MlmOutput

# select(micro-batch index, input_ids [B, S], labels [B, S], K or None) -> kept_idx [B, K] or None
Selector = Callable[[int, torch.Tensor, torch.Tensor, "int | None"], "torch.Tensor | None"]
Recorder = Callable[[MlmOutput], None]  # record one micro-batch's MLM output


def seed_of(*values: int) -> int:
    """A 63-bit seed from several integers (for per-step generators)."""
    h = 0x9E3779B97F4A7C15
    for v in values:
        h = ((h ^ (v & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
        h ^= h >> 31
    return h & 0x7FFFFFFFFFFFFFFF


@dataclass
class MlmSums:
    """This rank's sums over the micro-batches of one step (or one evaluation)."""

    training: bool  # whether recorded losses also feed the importance table
    loss_sum: float = 0.0
    predictions: float = 0.0
    correct: float = 0.0
    kept_masked: float = 0.0  # predicted positions the middle layers kept

    def add(self, out: MlmOutput) -> None:
        self.loss_sum += float(out.token_losses.sum())
        self.predictions += out.num_predictions
        self.correct += float(out.num_correct)


@dataclass
class StepResult:
    """One optimizer step as the whole job saw it (sums all-reduced over the ranks)."""

    kept_tokens: int | None  # K of this step; None: no dropping
    loss: float
    mlm_acc: float
    kept_masked_fraction: float
    lr: float
    grad_norm: float | None
    table_sync_s: float
    stop_requested: bool
    skipped: bool = False  # the optimizer skipped the update (fp16 overflow); table untouched
    finite: bool = True  # loss and gradient norm finite on every rank (or the step skipped)


DIVERGED = 3  # exit code: the loss or the weights stopped being finite
CHECKPOINT_NOT_WRITTEN = 4  # exit code: no space or no permission for a checkpoint


class RunFailed(Exception):
    """The run cannot go on; raised on every rank together (each decision rests on
    all-reduced values), printed once by rank 0, and every rank exits with ``code``."""

    def __init__(self, message: str, code: int):
        super().__init__(message)
        self.code = code


class NonFiniteState(RunFailed):
    """The weights or the table are not finite: no checkpoint may hold them."""


class StepRunner(Protocol):
    """Runs the micro-batches of a step through the DeepSpeed engine it owns."""

    engine: object  # a deepspeed engine: optimizer, get_global_grad_norm(), save/load
    dp_rank: int
    dp_size: int

    def describe(self) -> str | None:
        """A line about the layout for the start-up message, or None."""

    def train_step(self, batches: Iterable[Batch], kept_tokens: int | None) -> None:
        """Forward, backward and optimizer step of one global batch's share; kept_tokens
        None: no dropping."""

    def evaluate(self, batches: list[Batch]) -> None:
        """Full-sequence forward passes; every micro-batch's output goes to ``record``."""


class DataParallelRunner:
    """Data parallelism (ZeRO 0-3): the whole model on every rank."""

    def __init__(self, resolved: ResolvedRun, select: Selector, record: Recorder):
        import deepspeed

        self.select, self.record = select, record
        self.device = distributed.device()
        torch.manual_seed(resolved.run.seed)  # the same initial weights on every rank
        model = BertForTokenDropPretraining(resolved.model)
        self.engine, _, _, _ = deepspeed.initialize(
            model=model, model_parameters=model.parameters(), config=resolved.deepspeed
        )
        self.dp_rank = distributed.rank()
        self.dp_size = self.engine.dp_world_size

    def describe(self) -> str | None:
        return None

    def _to_device(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return (
            batch.input_ids.to(self.device, non_blocking=True),
            batch.attention_mask.to(self.device, non_blocking=True),
            batch.labels.to(self.device, non_blocking=True),
        )

    def train_step(self, batches: Iterable[Batch], kept_tokens: int | None) -> None:
        engine = self.engine
        for micro, batch in enumerate(batches):
            input_ids, attention_mask, labels = self._to_device(batch)
            kept_idx = self.select(micro, input_ids, labels, kept_tokens)  # [batch, kept]
            out = engine(input_ids, attention_mask, labels, kept_idx)
            engine.backward(out.loss)
            engine.step()
            self.record(out)

    def evaluate(self, batches: list[Batch]) -> None:
        self.engine.eval()
        with torch.no_grad():
            for batch in batches:
                self.record(self.engine(*self._to_device(batch), None))
        self.engine.train()


class Trainer:
    def __init__(self, resolved: ResolvedRun):
        self.resolved = resolved
        self.cfg = resolved.run
        self.manifest = resolved.manifest
        special = self.manifest.special
        self.rank = distributed.rank()
        self.device = distributed.device()
        self.stop_requested = False
        self._estimate: int | None = None  # a checkpoint's bytes, once computed

        strategy = STRATEGIES[self.cfg.token_drop]
        self.table = ImportanceTable(
            self.manifest.vocab_size,
            self.cfg.token_drop,
            allow_ids=(special.cls, special.sep, special.mask, special.unk),
            deny_ids=(special.pad,),
            beta=self.cfg.ema_beta,
            token_counts=self.manifest.token_counts() if strategy.needs_token_counts else None,
            device=self.device,
        )
        # K of the dropping phase; None: the dense baseline (no phase drops)
        self.kept_tokens = resolved.kept_tokens if strategy.drops else None
        self.step = 0
        self.sums = MlmSums(training=True)
        if self.cfg.pipeline_stages > 1:
            from pretrain.pipeline import PipelineRunner

            self.runner: StepRunner = PipelineRunner(resolved, self.select, self.record)
        else:
            self.runner = DataParallelRunner(resolved, self.select, self.record)
        self.engine = self.runner.engine
        torch.manual_seed(seed_of(self.cfg.seed, self.rank))  # dropout differs per rank

        self.masker = DynamicMasker(
            special.all, special.mask, self.manifest.vocab_size, self.cfg.seed
        )
        self.train_shards = TokenShards(self.manifest, "train")
        self.valid_shards = TokenShards(self.manifest, "valid")
        self.global_batch = self.engine.train_batch_size()
        self.micro_batch = self.engine.train_micro_batch_size_per_gpu()
        self.loader = PretrainLoader(
            self.train_shards,
            self.masker,
            special.pad,
            self.global_batch,
            self.micro_batch,
            self.runner.dp_rank,
            self.runner.dp_size,
            self.cfg.seed,
        )

    # -- the two callables every runner is given -----------------------------------------

    def select(
        self, micro: int, input_ids: torch.Tensor, labels: torch.Tensor, kept_tokens: int | None
    ) -> torch.Tensor | None:
        """The kept positions [B, K] of micro-batch ``micro`` of this step, or None when the
        step does not drop; counts the predicted positions the middle layers keep."""
        kept_idx = None
        if kept_tokens is not None:
            generator = torch.Generator().manual_seed(
                seed_of(self.cfg.seed, self.step, self.runner.dp_rank, micro)
            )
            kept_idx = self.table.select(input_ids, kept_tokens, generator)  # [batch, kept]
        predicted = labels != IGNORE_INDEX
        if kept_idx is not None:
            predicted &= torch.zeros_like(predicted).scatter_(1, kept_idx, True)
        self.sums.kept_masked += float(predicted.sum())
        return kept_idx

    def record(self, out: MlmOutput) -> None:
        """Add a micro-batch's MLM output to the step's sums and, in training, the table."""
        if self.sums.training:
            self.table.accumulate(out.target_ids, out.token_losses)
        self.sums.add(out)

    # -- resume and checkpoints ----------------------------------------------------------

    def resume(self, ref: checkpoint.CheckpointRef | None) -> None:
        if ref is None:
            return
        state = checkpoint.load(self.engine, ref)
        self.table.load_state_dict(state["importance"])
        self.loader.load_state_dict(state)
        self.step = int(state["step"])
        if not os.path.isfile(os.path.join(ref.path, "rng", f"rank{self.rank:05d}.pt")):
            # another world size: the data and table resume exactly, dropout does not
            torch.manual_seed(seed_of(self.cfg.seed, self.rank, self.step))

    def save(self, after_bad_step: bool = False) -> checkpoint.CheckpointRef:
        """Every rank: write a checkpoint of this step. Raises :class:`NonFiniteState`
        (nothing written) after a step whose loss or gradient norm was not finite (its
        weights may be finite yet ruined, or the update skipped) and when the weights or
        the table are not finite; raises :class:`RunFailed` when the checkpoint cannot be
        written (no space, read-only)."""
        if after_bad_step or not self._state_finite():
            what = "loss or gradient norm" if after_bad_step else "weights or importance table"
            raise NonFiniteState(
                f"step {self.step}: not checkpointing, the {what} is not finite "
                f"({self._latest_text()})",
                DIVERGED,
            )
        # the table spans the data-parallel group; with pipeline stages, all ranks: the world
        self.table.verify_synchronized()
        config = self.resolved.to_dict()
        client_state = {
            "importance": self.table.state_dict(),
            **self.loader.state_dict(),
            "step": self.step,
            "config": config,
            "manifest_sha256": self.manifest.sha256,
        }
        run_state = {
            "step": self.step,
            "data_order": SampleOrder.ALGORITHM,
            **self.loader.state_dict(),
            "world_size": distributed.world_size(),
            "config": config,
        }
        try:
            return checkpoint.save(
                self.engine,
                self.cfg.output,
                self.step,
                client_state,
                run_state,
                keep=self.cfg.keep_checkpoints,
                estimate=self._checkpoint_bytes(),
            )
        except checkpoint.CheckpointWriteError as e:
            raise RunFailed(str(e), CHECKPOINT_NOT_WRITTEN) from None

    def _state_finite(self) -> bool:
        """Whether the table and every rank's weights (its ZeRO-3 partition, its pipeline
        stage) are finite: one pass over the parameters and one small collective."""
        finite = bool(torch.isfinite(self.table.table).all())
        for p in self.engine.module.parameters():
            local = p.ds_tensor if hasattr(p, "ds_tensor") else p.data  # ZeRO-3: a partition
            finite = finite and bool(torch.isfinite(local).all())
        (bad,) = distributed.all_reduce_sum([float(not finite)])
        return not bad

    def _checkpoint_bytes(self) -> int:
        """About how many bytes a checkpoint takes: per parameter, its weight plus fp32
        master copy and Adam's two moments (what a first checkpoint is checked against;
        later ones go by the size of the one before)."""
        if self._estimate is None:
            params = list(self.engine.module.parameters())
            numel = sum(getattr(p, "ds_numel", p.numel()) for p in params)  # ZeRO-3: full size
            (total,) = distributed.all_reduce_sum([float(numel)])  # stages and replicas
            weight_bytes = params[0].element_size() if params else 4
            self._estimate = int(total / self.runner.dp_size) * (weight_bytes + 12)
        return self._estimate

    def _latest_text(self) -> str:
        ref = checkpoint.find_latest(os.path.join(self.cfg.output, "checkpoints"))
        return f"latest still names {ref.tag}" if ref else "no checkpoint was written"

    # -- the loop ------------------------------------------------------------------------

    def _install_signal_handlers(self) -> None:
        def request_stop(signum, frame):
            self.stop_requested = True

        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, request_stop)

    def train(self) -> int:
        cfg = self.cfg
        self._install_signal_handlers()
        end = cfg.stop_at_step if cfg.stop_at_step is not None else cfg.train_steps
        log = MetricsLogger(cfg.output, self.rank == 0, cfg.train_steps, self.step)
        full_seq_from = cfg.train_steps - cfg.full_seq_steps
        seq_len = self.manifest.seq_len
        log.message(
            f"training steps {self.step}..{end} of {cfg.train_steps}: global batch {self.global_batch} "
            f"= micro {self.micro_batch} x accumulation {self.loader.micro_batches_per_step} x "
            f"data parallel {self.runner.dp_size}; token drop {cfg.token_drop}, kept "
            f"{self.resolved.kept_tokens}/{seq_len}"
        )
        layout = self.runner.describe()
        if layout:
            log.message(layout)
        saved_at = self.step if self.step else None
        stopped_by_signal = False
        bad_steps = 0  # consecutive steps with a non-finite loss or gradient norm
        try:
            while self.step < end:
                record, stop = self.train_one_step(full_seq_from)
                if self.step % cfg.log_every == 0 or self.step == end or "non_finite" in record:
                    log.log(record)
                log.progress(self.step, record)
                bad_steps = bad_steps + 1 if "non_finite" in record else 0
                if bad_steps >= cfg.max_bad_steps:
                    raise RunFailed(
                        f"step {self.step}: loss {record['loss']}, gradient norm "
                        f"{record.get('grad_norm')}: {bad_steps} consecutive steps not finite "
                        f"(--max-bad-steps {cfg.max_bad_steps}); the run diverged, nothing was "
                        f"checkpointed after the last good step ({self._latest_text()})",
                        DIVERGED,
                    )

                due = cfg.eval_every and self.step % cfg.eval_every == 0
                if (due or self.step == cfg.train_steps) and not bad_steps:
                    val = self.evaluate()
                    if val is not None:
                        log.log({"step": self.step, **val})
                        log.message(
                            f"step {self.step}: val_loss {val['val_loss']:.4f} "
                            f"val_acc {val['val_acc']:.4f}"
                        )
                if stop:
                    stopped_by_signal = True
                    log.message(f"step {self.step}: stop requested by a signal; checkpointing")
                    break
                if cfg.save_every and self.step % cfg.save_every == 0:
                    try:
                        self.save(after_bad_step=bad_steps > 0)
                        saved_at = self.step
                    except NonFiniteState as e:  # the next steps decide whether it diverged
                        log.message(f"run.py: {e}")
            if saved_at != self.step:
                ref = self.save(after_bad_step=bad_steps > 0)
                log.message(f"checkpoint {ref.path}")
        except RunFailed as e:
            log.message(f"run.py: error: {e}")
            log.close()
            return e.code
        log.close()
        if self.rank == 0:
            why = (
                "stopped by a signal"
                if stopped_by_signal
                else "stopped (--stop-at-step)"
                if self.step < cfg.train_steps
                else "finished"
            )
            print(self._outputs_summary(why), file=sys.stderr)
        return 0

    def train_one_step(self, full_seq_from: int | None = None) -> tuple[dict, bool]:
        """One optimizer step; returns (its metrics record, stop requested on any rank).
        Dropping stops at step ``full_seq_from`` (the full-sequence phase)."""
        started = time.perf_counter()
        result = self.run_step(full_seq_from)
        elapsed = time.perf_counter() - started
        seq_len = self.manifest.seq_len
        record = {
            "step": self.step,
            "loss": result.loss,
            "lr": result.lr,
            "tokens_per_s": self.global_batch * seq_len / elapsed,
            "kept_fraction": (result.kept_tokens or seq_len) / seq_len,
            "kept_masked_fraction": result.kept_masked_fraction,
            "mlm_acc": result.mlm_acc,
            "samples": self.loader.consumed_samples,
            "step_s": elapsed,
            "table_sync_s": result.table_sync_s,
        }
        if result.grad_norm is not None:
            record["grad_norm"] = result.grad_norm
        if result.skipped:
            record["skipped"] = True
        if not result.finite:
            record["non_finite"] = True
        return record, result.stop_requested

    def run_step(self, full_seq_from: int | None = None) -> StepResult:
        """One optimizer step: the runner's micro-batches, the table's all_reduce and EMA,
        then the step's statistics summed over the ranks."""
        full_seq_from = self.cfg.train_steps if full_seq_from is None else full_seq_from
        kept_tokens = self.kept_tokens if self.step < full_seq_from else None
        lr = self.engine.optimizer.param_groups[0]["lr"]  # the rate this step uses
        self.sums = MlmSums(training=True)
        self.runner.train_step(self.loader.next_step(), kept_tokens)
        skipped = self._step_skipped()
        started = time.perf_counter()
        if skipped:
            self.table.discard()
        else:
            self.table.synchronize_and_apply()  # over the world, as save() verifies
        table_sync_s = time.perf_counter() - started
        grad_norm = self.engine.get_global_grad_norm()
        grad_norm = None if grad_norm is None else float(grad_norm)
        self.step += 1
        sums = self.sums
        bad_norm = grad_norm is not None and not math.isfinite(grad_norm)
        loss_sum, predictions, correct, kept_masked, stop, bad_norms = distributed.all_reduce_sum(
            [
                sums.loss_sum,
                sums.predictions,
                sums.correct,
                sums.kept_masked,
                float(self.stop_requested),
                float(bad_norm),
            ]
        )
        return StepResult(
            kept_tokens=kept_tokens,
            loss=loss_sum / max(predictions, 1),
            mlm_acc=correct / max(predictions, 1),
            kept_masked_fraction=kept_masked / max(predictions, 1),
            lr=lr,
            grad_norm=grad_norm,
            table_sync_s=table_sync_s,
            stop_requested=bool(stop),
            skipped=skipped,
            # a NaN anywhere makes the summed loss NaN on every rank
            finite=skipped or (math.isfinite(loss_sum) and not bad_norms),
        )

    def _step_skipped(self) -> bool:
        """Whether the optimizer skipped this step's update on some rank: only fp16's loss
        scaling skips (on an overflow). Decided over the whole job (one small collective,
        under fp16 only), so that every rank's table discards or learns alike."""
        if not self.engine.fp16_enabled():
            return False
        (skips,) = distributed.all_reduce_sum([float(not self.engine.was_step_applied())])
        return skips > 0

    def evaluate(self) -> dict | None:
        """Full-sequence validation (no dropping) on the fixed validation set."""
        batches = validation_batches(
            self.valid_shards,
            self.masker,
            self.manifest.special.pad,
            self.micro_batch,
            self.cfg.eval_batches,
            self.runner.dp_rank,
            self.runner.dp_size,
        )
        self.sums = MlmSums(training=False)
        self.runner.evaluate(list(batches))  # the same count on every rank
        sums = self.sums
        loss_sum, predictions, correct = distributed.all_reduce_sum(
            [sums.loss_sum, sums.predictions, sums.correct]
        )
        if not predictions:
            return None
        return {"val_loss": loss_sum / predictions, "val_acc": correct / predictions}

    def _outputs_summary(self, why: str) -> str:
        out = self.cfg.output
        return (
            f"run.py: {why} at step {self.step} of {self.cfg.train_steps}\n"
            f"  metrics      {os.path.join(out, 'metrics.jsonl')}\n"
            f"  config       {os.path.join(out, 'config.json')}\n"
            f"  checkpoints  {os.path.join(out, 'checkpoints')} (latest: "
            f"{checkpoint.tag_of(self.step)})\n"
            f"  tensorboard  {out}"
        )
