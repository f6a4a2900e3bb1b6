"""Rank 0's view of a run: a progress bar and ``RUN_DIR/metrics.jsonl``.

One JSON object per logged step, appended and flushed, with at least ``step``, ``loss``,
``lr``, ``tokens_per_s`` and ``kept_fraction``; validation lines carry ``val_loss`` and
``val_acc``. A resumed run appends to the same file after dropping the lines of steps
beyond its checkpoint, so the file always describes one consistent run.
"""

from __future__ import annotations

import json
import os
import sys

from tqdm import tqdm

from data_prep.atomic import write_atomic


class MetricsLogger:
    """Writes metrics on rank 0; a no-op elsewhere."""

    def __init__(self, run_dir: str, enabled: bool, total_steps: int, start_step: int):
        self.enabled = enabled
        self.path = os.path.join(run_dir, "metrics.jsonl")
        self.bar = None
        if not enabled:
            return
        _truncate_after(self.path, start_step)
        self.file = open(self.path, "a")  # closed in close()
        self.bar = tqdm(
            total=total_steps,
            initial=start_step,
            desc="train",
            unit="step",
            dynamic_ncols=True,
            file=sys.stderr,
            disable=None,
        )

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()

    def progress(self, step: int, record: dict) -> None:
        if self.bar is None:
            return
        self.bar.n = step
        shown = {
            "loss": f"{record['loss']:.4f}",
            "lr": f"{record['lr']:.2e}",
            "tok/s": f"{record['tokens_per_s']:,.0f}",
            "kept": f"{record['kept_fraction']:.2f}",
        }
        self.bar.set_postfix(shown, refresh=False)
        self.bar.refresh()

    def message(self, text: str) -> None:
        if self.enabled:
            (self.bar.write if self.bar is not None else print)(text, file=sys.stderr)

    def close(self) -> None:
        if self.enabled:
            self.bar.close()
            self.file.close()


def _truncate_after(path: str, step: int) -> None:
    """Drop lines of steps after ``step`` (left by a run that went on past its checkpoint),
    and a last line that a kill cut short mid-write (it does not parse)."""
    if not os.path.exists(path):
        return
    with open(path) as f:
        lines = [line for line in f if line.strip()]
    kept = []
    for line in lines:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if record.get("step", 0) <= step:
            kept.append(line if line.endswith("\n") else line + "\n")
    if kept != lines:  # atomically: a kill now must not cut the history short
        write_atomic(path, "".join(kept).encode())
