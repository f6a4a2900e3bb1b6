"""The training loop: it calls the components and holds none of their detail.

One optimizer step, on every rank:

    for each micro-batch of this rank's slice of the global batch:
        select the kept positions (importance table, seeded by seed/step/rank/micro-batch)
        forward (token-dropped), backward, accumulate per-id MLM losses into the table
    DeepSpeed's optimizer step (at the accumulation boundary)
    one all_reduce of the table's [2, vocab] sums and counts, then the EMA update
    one small all_reduce of the step's statistics and the stop flag

The stop flag is how a SIGTERM/SIGUSR1 on any rank makes every rank checkpoint at the
same step and exit 0.
"""

from __future__ import annotations

import os
import signal
import sys
import time

import torch

from pretrain import checkpoint, distributed
from pretrain.config import Resolved
from pretrain.data import PretrainLoader, TokenShards, validation_batches
from pretrain.importance import ImportanceTable
from pretrain.masking import DynamicMasker
from pretrain.metrics import MetricsLogger
from pretrain.model import IGNORE_INDEX, BertForTokenDropPretraining


def _mix(*values: int) -> int:
    """A 63-bit seed from several integers (for per-step generators)."""
    h = 0x9E3779B97F4A7C15
    for v in values:
        h = ((h ^ (v & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
        h ^= h >> 31
    return h & 0x7FFFFFFFFFFFFFFF


class Trainer:
    def __init__(self, resolved: Resolved):
        import deepspeed

        self.resolved = resolved
        self.cfg = resolved.run
        self.manifest = resolved.manifest
        special = self.manifest.special
        self.rank = distributed.rank()
        self.device = distributed.device()
        self.stop_requested = False

        self.table = ImportanceTable(
            self.manifest.vocab_size,
            self.cfg.token_drop,
            allow_ids=(special.cls, special.sep, special.mask, special.unk),
            deny_ids=(special.pad,),
            beta=self.cfg.ema_beta,
            token_counts=self.manifest.token_counts()
            if self.cfg.token_drop == "frequency"
            else None,
            device=self.device,
        )
        self.pipelined = self.cfg.pipeline_stages > 1
        self._pipe_dropping = None
        if self.pipelined:
            from pretrain.pipeline import PipeLoss, build_pipeline, max_predictions

            self.pipe_loss = PipeLoss(self.table, resolved.model.kernels)
            self.pipe_width = max_predictions(self.manifest.seq_len)
            module, parts, self.stage_shares = build_pipeline(
                resolved.model,
                self.cfg.pipeline_stages,
                self.manifest.seq_len,
                self.cfg.keep_ratio if self.cfg.token_drop != "none" else 1.0,
                self.pipe_loss,
                self.cfg.seed,
            )
            self.stage_layers = [(parts[i], parts[i + 1]) for i in range(len(parts) - 1)]
            self.engine, _, _, _ = deepspeed.initialize(
                model=module,
                model_parameters=[p for p in module.parameters() if p.requires_grad],
                config=resolved.deepspeed,
            )
            self.dp_rank = self.engine.grid.get_data_parallel_rank()
        else:
            torch.manual_seed(self.cfg.seed)  # the same initial weights on every rank
            model = BertForTokenDropPretraining(resolved.model)
            self.engine, _, _, _ = deepspeed.initialize(
                model=model, model_parameters=model.parameters(), config=resolved.deepspeed
            )
            self.dp_rank = self.rank
        self.dp_size = self.engine.dp_world_size
        torch.manual_seed(_mix(self.cfg.seed, self.rank))  # dropout differs per rank

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
            self.dp_rank,
            self.dp_size,
            self.cfg.seed,
        )
        self.step = 0

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
            torch.manual_seed(_mix(self.cfg.seed, self.rank, self.step))

    def save(self) -> checkpoint.CheckpointRef:
        self.table.verify_synchronized(self._table_group())
        config = self.resolved.to_dict()
        client_state = {
            "importance": self.table.state_dict(),
            "consumed_samples": self.loader.consumed_samples,
            "step": self.step,
            "config": config,
            "manifest_sha256": self.manifest.sha256,
        }
        run_state = {
            "step": self.step,
            "consumed_samples": self.loader.consumed_samples,
            "world_size": distributed.world_size(),
            "config": config,
        }
        return checkpoint.save(self.engine, self.cfg.output, self.step, client_state, run_state)

    def _table_group(self):
        return None  # data parallel only: the whole world is the data-parallel group

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
            f"data parallel {self.dp_size}; token drop {cfg.token_drop}, kept "
            f"{self.resolved.kept_tokens}/{seq_len}"
        )
        if self.pipelined:
            shares = ", ".join(
                f"stage {i}: layers {a}-{b - 1}, {share:.0%} of the FLOPs"
                for i, ((a, b), share) in enumerate(zip(self.stage_layers, self.stage_shares))
            )
            log.message(f"pipeline of {len(self.stage_shares)} stages balanced by FLOPs: {shares}")
        saved_at = self.step if self.step else None
        stopped_by_signal = False
        while self.step < end:
            record, stop = self.train_one_step(full_seq_from)
            if self.step % cfg.log_every == 0 or self.step == end:
                log.log(record)
            log.progress(self.step, record)

            if (cfg.eval_every and self.step % cfg.eval_every == 0) or self.step == cfg.train_steps:
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
                self.save()
                saved_at = self.step
        if saved_at != self.step:
            ref = self.save()
            log.message(f"checkpoint {ref.path}")
        log.close()
        if self.rank == 0:
            why = (
                "stopped by a signal"
                if stopped_by_signal
                else "stopped (--stop-at-step)"
                if self.step < cfg.train_steps
                else "finished"
            )
            print(self._where(why), file=sys.stderr)
        return 0

    def train_one_step(self, full_seq_from: int | None = None) -> tuple[dict, bool]:
        """One optimizer step with its statistics; returns (metrics record, stop requested
        on any rank). Dropping stops at step ``full_seq_from`` (the full-sequence phase)."""
        started = time.perf_counter()
        seq_len = self.manifest.seq_len
        full_seq_from = self.cfg.train_steps if full_seq_from is None else full_seq_from
        drop = self.cfg.token_drop != "none" and self.step < full_seq_from
        stats = self._pipeline_step(drop) if self.pipelined else self._train_step(drop)
        self.step += 1
        loss_sum, predictions, correct, kept_masked, stop = distributed.all_reduce_sum(
            [*stats["local"], float(self.stop_requested)]
        )
        elapsed = time.perf_counter() - started
        record = {
            "step": self.step,
            "loss": loss_sum / max(predictions, 1),
            "lr": stats["lr"],
            "tokens_per_s": self.global_batch * seq_len / elapsed,
            "kept_fraction": (self.resolved.kept_tokens if drop else seq_len) / seq_len,
            "kept_masked_fraction": kept_masked / max(predictions, 1),
            "mlm_acc": correct / max(predictions, 1),
            "samples": self.loader.consumed_samples,
            "step_s": elapsed,
            "table_sync_s": stats["table_sync_s"],
        }
        if stats["grad_norm"] is not None:
            record["grad_norm"] = stats["grad_norm"]
        return record, bool(stop)

    def _synchronize_table(self) -> float:
        """The once-per-step all_reduce and EMA update; returns its seconds."""
        started = time.perf_counter()
        self.table.synchronize_and_apply(self._table_group())
        return time.perf_counter() - started

    def _train_step(self, drop: bool) -> dict:
        engine, k = self.engine, self.resolved.kept_tokens
        loss_sum = predictions = correct = kept_masked = 0.0
        lr = engine.optimizer.param_groups[0]["lr"]  # the rate this step uses
        for micro, batch in enumerate(self.loader.next_step()):
            input_ids = batch.input_ids.to(self.device, non_blocking=True)
            attention_mask = batch.attention_mask.to(self.device, non_blocking=True)
            labels = batch.labels.to(self.device, non_blocking=True)
            kept_idx = None
            if drop:
                generator = torch.Generator().manual_seed(
                    _mix(self.cfg.seed, self.step, self.dp_rank, micro)
                )
                kept_idx = self.table.select(input_ids, k, generator)  # [batch, kept]
            out = engine(input_ids, attention_mask, labels, kept_idx)
            engine.backward(out.loss)
            engine.step()
            self.table.accumulate(out.target_ids, out.token_losses)
            loss_sum += float(out.token_losses.sum())
            predictions += out.num_predictions
            correct += float(out.num_correct)
            kept_masked += self._kept_masked(labels, kept_idx)
        sync_s = self._synchronize_table()
        grad_norm = engine.get_global_grad_norm()
        return {
            "table_sync_s": sync_s,
            "local": [loss_sum, predictions, correct, kept_masked],
            "lr": lr,
            "grad_norm": None if grad_norm is None else float(grad_norm),
        }

    def _pipeline_step(self, drop: bool) -> dict:
        """One step of the pipeline engine: DeepSpeed runs the micro-batches through the
        stages; the first stage selects tokens, the last one computes the loss."""
        from pretrain.pipeline import pipe_batch

        engine = self.engine
        first, last = engine.is_first_stage(), engine.is_last_stage()
        if self._pipe_dropping is not None and drop != self._pipe_dropping:
            engine.reset_activation_shape()  # K changes: the full-sequence phase begins
        self._pipe_dropping = drop
        lr = engine.optimizer.param_groups[0]["lr"]
        batches = self.loader.next_step()
        kept_masked = 0.0

        def micro_batches():
            nonlocal kept_masked
            for micro, batch in enumerate(batches):
                labels = batch.labels.to(self.device)
                input_ids = batch.input_ids.to(self.device)
                kept_idx = self._kept_for_pipeline(input_ids, drop, micro, select=first)
                if first:
                    kept_masked += self._kept_masked(labels, kept_idx if drop else None)
                yield pipe_batch(
                    input_ids,
                    batch.attention_mask.to(self.device),
                    labels,
                    kept_idx,
                    self.pipe_width,
                )

        self.pipe_loss.reset()
        self.pipe_loss.training = True
        engine.train_batch(data_iter=micro_batches() if first or last else None)
        sync_s = self._synchronize_table()
        grad_norm = engine.get_global_grad_norm()
        return {
            "table_sync_s": sync_s,
            "local": [
                self.pipe_loss.loss_sum,
                self.pipe_loss.predictions,
                self.pipe_loss.correct,
                kept_masked,
            ],
            "lr": lr,
            "grad_norm": None if grad_norm is None else float(grad_norm),
        }

    def _kept_for_pipeline(self, input_ids, drop: bool, micro: int, select: bool) -> torch.Tensor:
        """kept_idx [B, K] for the pipeline: selected on the first stage; elsewhere only its
        shape matters. Without dropping, every position (K = S)."""
        batch, seq_len = input_ids.shape
        if drop and select:
            generator = torch.Generator().manual_seed(
                _mix(self.cfg.seed, self.step, self.dp_rank, micro)
            )
            return self.table.select(input_ids, self.resolved.kept_tokens, generator)
        if drop:
            return torch.zeros(
                batch, self.resolved.kept_tokens, dtype=torch.int64, device=input_ids.device
            )
        return torch.arange(seq_len, device=input_ids.device).expand(batch, seq_len).contiguous()

    def _evaluate_pipeline(self, batches) -> tuple[float, float, float]:
        from pretrain.pipeline import pipe_batch

        batches = list(batches)  # the same count on every stage: the schedule depends on it
        if not batches:
            return 0.0, 0.0, 0.0
        engine = self.engine

        def items():
            for b in batches:
                input_ids = b.input_ids.to(self.device)
                yield pipe_batch(
                    input_ids,
                    b.attention_mask.to(self.device),
                    b.labels.to(self.device),
                    self._kept_for_pipeline(input_ids, False, 0, False),
                    self.pipe_width,
                )

        engine.reset_activation_shape()  # the full sequence: K = S
        self.pipe_loss.reset()
        self.pipe_loss.training = False
        first, last = engine.is_first_stage(), engine.is_last_stage()
        engine.eval_batch(items() if first or last else None, num_micro_batches=len(batches))
        engine.reset_activation_shape()
        self._pipe_dropping = None
        return self.pipe_loss.loss_sum, self.pipe_loss.predictions, self.pipe_loss.correct

    @staticmethod
    def _kept_masked(labels: torch.Tensor, kept_idx: torch.Tensor | None) -> float:
        predicted = labels != IGNORE_INDEX
        if kept_idx is None:
            return float(predicted.sum())
        kept = torch.zeros_like(predicted).scatter_(1, kept_idx, True)
        return float((kept & predicted).sum())

    def evaluate(self) -> dict | None:
        """Full-sequence validation (no dropping) on the fixed validation set."""
        special = self.manifest.special
        batches = validation_batches(
            self.valid_shards,
            self.masker,
            special.pad,
            self.micro_batch,
            self.cfg.eval_batches,
            self.dp_rank,
            self.dp_size,
        )
        if self.pipelined:
            loss_sum, predictions, correct = self._evaluate_pipeline(batches)
        else:
            loss_sum = predictions = correct = 0.0
            self.engine.eval()
            with torch.no_grad():
                for batch in batches:
                    out = self.engine(
                        batch.input_ids.to(self.device),
                        batch.attention_mask.to(self.device),
                        batch.labels.to(self.device),
                        None,
                    )
                    loss_sum += float(out.token_losses.sum())
                    predictions += out.num_predictions
                    correct += float(out.num_correct)
            self.engine.train()
        loss_sum, predictions, correct = distributed.all_reduce_sum(
            [loss_sum, predictions, correct]
        )
        if not predictions:
            return None
        return {"val_loss": loss_sum / predictions, "val_acc": correct / predictions}

    def _where(self, why: str) -> str:
        out = self.cfg.output
        return (
            f"run.py: {why} at step {self.step} of {self.cfg.train_steps}\n"
            f"  metrics      {os.path.join(out, 'metrics.jsonl')}\n"
            f"  config       {os.path.join(out, 'config.json')}\n"
            f"  checkpoints  {os.path.join(out, 'checkpoints')} (latest: "
            f"{checkpoint.tag_of(self.step)})\n"
            f"  tensorboard  {out}"
        )
