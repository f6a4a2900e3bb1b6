"""Progress of a fine-tuning run on stderr: a tqdm bar on a terminal, and in a log (a batch
job's output, a pipe) a plain line every ``LOG_INTERVAL_S`` seconds and at the end."""

from __future__ import annotations

import sys
import time

LOG_INTERVAL_S = 30.0


class Progress:
    def __init__(self, total: int, desc: str) -> None:
        self.total, self.desc, self.done = total, desc, 0
        self.t0 = self.last_line = time.time()
        self.postfix = ""
        self.bar = None
        if sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=desc, unit="step", file=sys.stderr, leave=False)

    def update(self, steps: int = 1, **postfix: float) -> None:
        self.done += steps
        self.postfix = ", ".join(f"{k} {v:.4g}" for k, v in postfix.items())
        if self.bar is not None:
            self.bar.update(steps)
            self.bar.set_postfix_str(self.postfix, refresh=False)
        elif time.time() - self.last_line >= LOG_INTERVAL_S:
            self._line()

    def _line(self) -> None:
        self.last_line = now = time.time()
        rate = self.done / max(now - self.t0, 1e-9)
        print(
            f"finetune: {self.desc} step {self.done}/{self.total} "
            f"({self.done / max(self.total, 1):.0%}), {rate:.2f} steps/s"
            + (f", {self.postfix}" if self.postfix else ""),
            file=sys.stderr,
            flush=True,
        )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        self._line()
