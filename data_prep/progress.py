"""Progress of the encode phase on stderr.

On a terminal, a tqdm bar with MB/s and tokens/s. In a log (a batch job's output file,
a pipe), where a bar would be a stream of carriage returns, one plain line every
``LOG_INTERVAL_S`` seconds.
"""

from __future__ import annotations

import sys
import time

LOG_INTERVAL_S = 30.0


class Progress:
    def __init__(self, total_bytes: int, done_bytes: int, desc: str = "encode") -> None:
        self.total, self.done, self.desc = total_bytes, done_bytes, desc
        self.start_done = done_bytes
        self.tokens = 0
        self.t0 = self.last_line = time.time()
        self.bar = None
        if sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(
                total=total_bytes,
                initial=done_bytes,
                unit="B",
                unit_scale=True,
                desc=desc,
                file=sys.stderr,
            )

    def update(self, nbytes: int, tokens: int) -> None:
        self.done += nbytes
        self.tokens += tokens
        now = time.time()
        rate = self.tokens / max(now - self.t0, 1e-9)
        if self.bar is not None:
            self.bar.update(nbytes)
            self.bar.set_postfix_str(f"{rate:,.0f} tokens/s", refresh=False)
        elif now - self.last_line >= LOG_INTERVAL_S:
            self.last_line = now
            mbps = (self.done - self.start_done) / 1e6 / max(now - self.t0, 1e-9)
            left = (self.total - self.done) / 1e6 / max(mbps, 1e-9)
            print(
                f"data_prep: {self.desc} {self.done / max(self.total, 1):.0%} "
                f"({self.done / 1e6:,.1f} of {self.total / 1e6:,.1f} MB), {mbps:,.1f} MB/s, "
                f"{rate:,.0f} tokens/s, about {left:,.0f} s left",
                file=sys.stderr,
                flush=True,
            )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
