"""The training loop: it calls the components and holds none of their detail.

One optimizer step, on every rank:

    for each micro-batch of this rank's slice of the global batch:
        select the kept positions (importance table, seeded by seed/step/rank/micro-batch)
        forward (token-dropped), backward, record per-id MLM losses into the table
    DeepSpeed's optimizer step (at the accumulation boundary)
    one all_reduce of the table's [2, vocab] sums and counts, then the EMA update
    one small all_reduce of the step's statistics and the stop flag, left on the device

Nothing in a step is read back on the host (shapes are static and the step's sums stay on
the device), so a GPU runs ahead of the Python loop; the statistics of all the steps
since the last read come back in one transfer at each logged step, and at evaluation,
checkpoint and the end, where the stop flag and the divergence check are decided.

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
from pretrain.apex_support import client_optimizer
from pretrain.config import ResolvedRun
from pretrain.data import Batch, PretrainLoader, SampleOrder, TokenShards, validation_batches
from pretrain.importance import STRATEGIES, ImportanceTable
from pretrain.masking import IGNORE_INDEX, DynamicMasker, max_predictions
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


class MlmSums:
    """This rank's sums over the micro-batches of one step (or one evaluation), kept on
    the device: [loss sum, predictions, correct, kept predictions] float64 [4]. Nothing
    is read on the host here; the trainer reads them once per logged step."""

    def __init__(self, training: bool, device: torch.device):
        self.training = training  # whether recorded losses also feed the importance table
        self.values = torch.zeros(4, dtype=torch.float64, device=device)

    def add(self, out: MlmOutput) -> None:
        sums = (out.token_losses.sum(), out.num_predictions, out.num_correct)
        self.values[:3] += torch.stack([v.to(torch.float64) for v in sums])

    def add_kept(self, kept_predictions: torch.Tensor) -> None:
        """Predicted positions the middle layers kept."""
        self.values[3] += kept_predictions.to(torch.float64)


@dataclass
class PendingStep:
    """An optimizer step whose statistics are still on the device, all-reduced; they are
    read with the rest of their logging window, in one transfer (:meth:`Trainer.read_steps`)."""

    step: int  # the step count after it
    kept_tokens: int | None
    lr: float
    stats: torch.Tensor  # [7] float64: MlmSums.values, stop flags, bad norms, the grad norm
    has_grad_norm: bool
    skipped: bool
    table_sync_s: float
    samples: int  # consumed samples after it


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
    step: int = 0  # the step count after it
    samples: int = 0  # consumed samples after it
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


def initial_model(resolved: ResolvedRun, weights: dict | None) -> BertForTokenDropPretraining:
    """The model a run starts with, the same on every rank: initialised from ``--seed``, or
    holding ``weights`` (``--init-from``; :func:`pretrain.init_from.initial_weights`)."""
    torch.manual_seed(resolved.run.seed)
    model = BertForTokenDropPretraining(resolved.model)
    if weights is not None:
        model.load_state_dict(weights, strict=True)
    return model


class DataParallelRunner:
    """Data parallelism (ZeRO 0-3): the whole model on every rank."""

    def __init__(
        self, resolved: ResolvedRun, select: Selector, record: Recorder, weights: dict | None
    ):
        import deepspeed

        self.select, self.record = select, record
        self.device = distributed.device()
        model = initial_model(resolved, weights)
        if resolved.run.compile:
            # The model's own forward, and with it its backward: one graph per phase
            # (dropping, full sequence; with and without a padding mask), held to fullgraph
            # by tests/test_device_step.py. DeepSpeed's hooks around it stay eager (traced,
            # its timers would break the graph), and parameter names stay the model's.
            model.forward = torch.compile(
                model.forward, backend=resolved.run.compile, fullgraph=True, dynamic=False
            )
        optimizer, ds_config = client_optimizer(resolved.deepspeed, model.parameters())
        self.engine, _, _, _ = deepspeed.initialize(
            model=model, model_parameters=model.parameters(), optimizer=optimizer, config=ds_config
        )
        self.dp_rank = distributed.rank()
        self.dp_size = self.engine.dp_world_size
        # static shapes: every micro-batch has P prediction slots, padded with label -100
        self.prediction_width = max_predictions(resolved.manifest.seq_len)

    def describe(self) -> str | None:
        return None

    def train_step(self, batches: Iterable[Batch], kept_tokens: int | None) -> None:
        engine = self.engine
        for micro, batch in enumerate(batches):
            input_ids, attention_mask, labels = batch.to(self.device)
            kept_idx = self.select(micro, input_ids, labels, kept_tokens)  # [batch, kept]
            out = engine(input_ids, attention_mask, labels, kept_idx, self.prediction_width)
            engine.backward(out.loss)
            engine.step()
            self.record(out)

    def evaluate(self, batches: list[Batch]) -> None:
        self.engine.eval()
        with torch.no_grad():
            for batch in batches:
                self.record(self.engine(*batch.to(self.device), None, self.prediction_width))
        self.engine.train()


class Trainer:
    def __init__(self, resolved: ResolvedRun, initialise: bool = True):
        """``initialise``: start from ``--init-from``'s weights and table when the run has
        one (False when a checkpoint is to be resumed instead)."""
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
        weights = None
        if resolved.init is not None and initialise:
            from pretrain.init_from import initial_weights

            weights, table = initial_weights(resolved.init, resolved.model, self.cfg.seed)
            if table is not None:  # the same file on every rank: the same table
                self.table.load_state_dict({**self.table.state_dict(), "table": table})
        # K of the dropping phase; None: the dense baseline (no phase drops)
        self.kept_tokens = resolved.kept_tokens if strategy.drops else None
        self.step = 0
        self.sums = MlmSums(training=True, device=self.device)
        if self.cfg.pipeline_stages > 1:
            from pretrain.pipeline import PipelineRunner

            self.runner: StepRunner = PipelineRunner(resolved, self.select, self.record, weights)
        else:
            self.runner = DataParallelRunner(resolved, self.select, self.record, weights)
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
            # the device's own generator: the draws never leave the device
            generator = torch.Generator(device=input_ids.device).manual_seed(
                seed_of(self.cfg.seed, self.step, self.runner.dp_rank, micro)
            )
            kept_idx = self.table.select(input_ids, kept_tokens, generator)  # [batch, kept]
        predicted = labels != IGNORE_INDEX
        if kept_idx is not None:
            predicted &= torch.zeros_like(predicted).scatter_(1, kept_idx, True)
        self.sums.add_kept(predicted.sum())
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
        window: list[PendingStep] = []  # steps whose statistics are still on the device
        window_started = time.perf_counter()
        try:
            while self.step < end:
                window.append(self.run_step(full_seq_from))
                step = self.step
                eval_due = (cfg.eval_every and step % cfg.eval_every == 0) or (
                    step == cfg.train_steps
                )
                save_due = cfg.save_every and step % cfg.save_every == 0
                if step % cfg.log_every and step != end and not eval_due and not save_due:
                    continue  # nothing to decide yet: no host read, the device runs ahead
                elapsed = time.perf_counter() - window_started
                stop = False
                for result in self.read_steps(window):
                    record = self.step_record(result, elapsed / len(window))
                    if result.step % cfg.log_every == 0 or result.step == end or not result.finite:
                        log.log(record)
                    log.progress(result.step, record)
                    bad_steps = 0 if result.finite else bad_steps + 1
                    if bad_steps >= cfg.max_bad_steps:
                        raise RunFailed(
                            f"step {result.step}: loss {record['loss']}, gradient norm "
                            f"{record.get('grad_norm')}: {bad_steps} consecutive steps not "
                            f"finite (--max-bad-steps {cfg.max_bad_steps}); the run diverged, "
                            f"nothing was checkpointed after the last good step "
                            f"({self._latest_text()})",
                            DIVERGED,
                        )
                    stop = stop or result.stop_requested
                window = []

                if eval_due and not bad_steps:
                    val = self.evaluate()
                    if val is not None:
                        log.log({"step": step, **val})
                        log.message(
                            f"step {step}: val_loss {val['val_loss']:.4f} "
                            f"val_acc {val['val_acc']:.4f}"
                        )
                if stop:
                    stopped_by_signal = True
                    log.message(f"step {step}: stop requested by a signal; checkpointing")
                    break
                if save_due:
                    try:
                        self.save(after_bad_step=bad_steps > 0)
                        saved_at = step
                    except NonFiniteState as e:  # the next steps decide whether it diverged
                        log.message(f"run.py: {e}")
                window_started = time.perf_counter()  # evaluation and saving are not steps
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
        """One optimizer step, read at once; returns (its metrics record, stop requested on
        any rank). Dropping stops at step ``full_seq_from`` (the full-sequence phase)."""
        started = time.perf_counter()
        (result,) = self.read_steps([self.run_step(full_seq_from)])
        return self.step_record(result, time.perf_counter() - started), result.stop_requested

    def step_record(self, result: StepResult, step_s: float) -> dict:
        """The metrics.jsonl line of a step; ``step_s`` is its share of its window's time
        (steps run ahead of the host between reads, so one step alone has no time)."""
        seq_len = self.manifest.seq_len
        record = {
            "step": result.step,
            "loss": result.loss,
            "lr": result.lr,
            "tokens_per_s": self.global_batch * seq_len / step_s,
            "kept_fraction": (result.kept_tokens or seq_len) / seq_len,
            "kept_masked_fraction": result.kept_masked_fraction,
            "mlm_acc": result.mlm_acc,
            "samples": result.samples,
            "step_s": step_s,
            "table_sync_s": result.table_sync_s,
        }
        if result.grad_norm is not None:
            record["grad_norm"] = result.grad_norm
        if result.skipped:
            record["skipped"] = True
        if not result.finite:
            record["non_finite"] = True
        return record

    def run_step(self, full_seq_from: int | None = None) -> PendingStep:
        """One optimizer step: the runner's micro-batches, the table's all_reduce and EMA,
        then one all_reduce of the step's statistics, left on the device."""
        full_seq_from = self.cfg.train_steps if full_seq_from is None else full_seq_from
        kept_tokens = self.kept_tokens if self.step < full_seq_from else None
        lr = self.engine.optimizer.param_groups[0]["lr"]  # the rate this step uses
        self.sums = MlmSums(training=True, device=self.device)
        self.runner.train_step(self.loader.next_step(), kept_tokens)
        skipped = self._step_skipped()
        started = time.perf_counter()
        if skipped:
            self.table.discard()
        else:
            self.table.synchronize_and_apply()  # over the world, as save() verifies
        table_sync_s = time.perf_counter() - started  # host time: on a GPU, the launch only
        self.step += 1
        grad_norm = self.engine.get_global_grad_norm()  # a device tensor or a float
        norm = torch.as_tensor(
            0.0 if grad_norm is None else grad_norm, dtype=torch.float64, device=self.device
        ).reshape(1)
        flags = torch.tensor([float(self.stop_requested)], dtype=torch.float64)
        local = torch.cat([self.sums.values, flags.to(self.device), (~norm.isfinite()).double()])
        distributed.all_reduce_sum_(local)
        return PendingStep(
            step=self.step,
            kept_tokens=kept_tokens,
            lr=lr,
            stats=torch.cat([local, norm]),
            has_grad_norm=grad_norm is not None,
            skipped=skipped,
            table_sync_s=table_sync_s,
            samples=self.loader.consumed_samples,
        )

    def read_steps(self, pending: list[PendingStep]) -> list[StepResult]:
        """The steps' statistics on the host: one device-to-host transfer for all of them."""
        rows = torch.stack([p.stats for p in pending]).tolist()
        results = []
        for p, row in zip(pending, rows):
            loss_sum, predictions, correct, kept_masked, stop, bad_norms, grad_norm = row
            results.append(
                StepResult(
                    kept_tokens=p.kept_tokens,
                    loss=loss_sum / max(predictions, 1),
                    mlm_acc=correct / max(predictions, 1),
                    kept_masked_fraction=kept_masked / max(predictions, 1),
                    lr=p.lr,
                    grad_norm=grad_norm if p.has_grad_norm else None,
                    table_sync_s=p.table_sync_s,
                    stop_requested=bool(stop),
                    step=p.step,
                    samples=p.samples,
                    skipped=p.skipped,
                    # a NaN anywhere makes the summed loss NaN on every rank
                    finite=p.skipped or (math.isfinite(loss_sum) and not bad_norms),
                )
            )
        return results

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
        self.sums = MlmSums(training=False, device=self.device)
        self.runner.evaluate(list(batches))  # the same count on every rank
        totals = self.sums.values[:3].clone()
        distributed.all_reduce_sum_(totals)
        loss_sum, predictions, correct = totals.tolist()
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
