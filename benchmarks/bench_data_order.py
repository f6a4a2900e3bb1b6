"""The train data order alone: time and memory to the first micro-batch and per micro-batch.

    python benchmarks/bench_data_order.py [--sizes 1000000,100000000,1000000000]
        [--micro-batch 512] [--batches 200] [--old-max N] [--json OUT]

Two contenders, each asked for the sample indices of stream positions [0, B), then of
the ``--batches`` micro-batches after it (B = ``--micro-batch``), at each corpus size N:

    old   ``MaterialisedOrder`` below, the previous algorithm of ``pretrain.data.SampleOrder``
          (copied here as it was): a seeded ``numpy.random.Generator(PCG64([seed, epoch]))
          .permutation(N)`` materialised for the current epoch, in every rank;
    new   ``pretrain.data.SampleOrder``: a cycle-walking Feistel network, per index.

Each (N, contender) runs in a fresh subprocess, so that its resident memory is its own:
"first batch" is constructing the order and its first ``positions`` call; "per batch" the
median of the later calls; "peak RSS" the child's ``ru_maxrss`` less that of a baseline
child that only imports numpy and pretrain.data; "traced" the tracemalloc peak of a second,
fresh construction and first call in the same child (numpy reports its buffers to it).
``--old-max`` skips the old order above that N (it needs 8 bytes per sample, and
temporaries, and its first batch at N = 10^9 takes about a minute).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
import tracemalloc

import numpy as np
import numpy.random  # noqa: F401  (numpy imports it lazily; its import is no part of either order)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from pretrain.data import SampleOrder  # noqa: E402


class MaterialisedOrder:
    """The PREVIOUS algorithm of pretrain.data.SampleOrder, kept here to compare against:
    each epoch's permutation of all N indices, materialised and cached for that epoch."""

    def __init__(self, num_samples: int, seed: int):
        self.num_samples, self.seed = num_samples, seed
        self._epoch, self._perm = -1, None

    def permutation(self, epoch: int) -> np.ndarray:
        if epoch != self._epoch:
            rng = np.random.Generator(np.random.PCG64([self.seed, epoch]))
            self._epoch, self._perm = epoch, rng.permutation(self.num_samples)
        return self._perm

    def positions(self, start: int, count: int) -> tuple[np.ndarray, np.ndarray]:
        pos = np.arange(start, start + count, dtype=np.int64)
        epochs = pos // self.num_samples
        indices = np.empty(count, np.int64)
        for e in np.unique(epochs):
            where = epochs == e
            indices[where] = self.permutation(int(e))[pos[where] % self.num_samples]
        return epochs, indices


CONTENDERS = {"old": MaterialisedOrder, "new": SampleOrder}
SEED = 1234


def max_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def child(variant: str, num_samples: int, micro_batch: int, batches: int) -> dict:
    """One contender at one size, in this (fresh) process."""
    if variant == "baseline":
        return {"max_rss_mb": max_rss_mb()}
    cls = CONTENDERS[variant]
    start = time.perf_counter()
    order = cls(num_samples, SEED)
    _, first = order.positions(0, micro_batch)
    first_ms = (time.perf_counter() - start) * 1e3
    later = []
    for b in range(1, batches + 1):
        start = time.perf_counter()
        _, indices = order.positions(b * micro_batch, micro_batch)
        later.append((time.perf_counter() - start) * 1e3)
    assert ((indices >= 0) & (indices < num_samples)).all()
    del order
    tracemalloc.start()
    _, again = cls(num_samples, SEED).positions(0, micro_batch)
    traced_mb = tracemalloc.get_traced_memory()[1] / 2**20
    tracemalloc.stop()
    assert np.array_equal(first, again)
    return {
        "first_batch_ms": first_ms,
        "per_batch_ms": statistics.median(later),
        "per_batch_max_ms": max(later),
        "traced_mb": traced_mb,
        "max_rss_mb": max_rss_mb(),
    }


def run_child(variant: str, num_samples: int, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", variant, str(num_samples)]
    cmd += ["--micro-batch", str(args.micro_batch), "--batches", str(args.batches)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
    if out.returncode:
        raise RuntimeError(f"{variant} at N={num_samples} failed:\n{out.stderr}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--sizes", default="1000000,100000000,1000000000")
    p.add_argument("--micro-batch", type=int, default=512)
    p.add_argument("--batches", type=int, default=200, help="later batches timed")
    p.add_argument("--old-max", type=int, default=None, help="skip the old order above this N")
    p.add_argument("--timeout", type=float, default=900, help="seconds per child")
    p.add_argument("--json")
    p.add_argument("--child", nargs=2, metavar=("VARIANT", "N"), help=argparse.SUPPRESS)
    args = p.parse_args()

    if args.child:
        variant, n = args.child
        print(json.dumps(child(variant, int(n), args.micro_batch, args.batches)))
        return

    sizes = [int(s) for s in args.sizes.split(",")]
    baseline = run_child("baseline", 1, args)["max_rss_mb"]
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"# Python {platform.python_version()}, numpy {np.__version__}, {os.cpu_count()} cores")
    print(f"# baseline child (imports only): {baseline:.0f} MB RSS; load average {load}")
    print(f"# micro-batch {args.micro_batch}, {args.batches} later batches timed")
    rows = []
    print("\n| N | order | first batch ms | per batch ms (max) | peak RSS MB | traced MB |")
    print("|---:|---|---:|---:|---:|---:|")
    for n in sizes:
        for variant in CONTENDERS:
            if variant == "old" and args.old_max is not None and n > args.old_max:
                print(f"| {n:,} | {variant} | skipped (--old-max) | | | |", flush=True)
                rows.append({"num_samples": n, "variant": variant, "skipped": True})
                continue
            r = run_child(variant, n, args)
            r["peak_rss_mb"] = r["max_rss_mb"] - baseline
            rows.append({"num_samples": n, "variant": variant, **r})
            print(
                f"| {n:,} | {variant} | {r['first_batch_ms']:,.1f} | {r['per_batch_ms']:.3f} "
                f"({r['per_batch_max_ms']:.2f}) | {r['peak_rss_mb']:,.0f} | "
                f"{r['traced_mb']:,.2f} |",
                flush=True,
            )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"baseline_rss_mb": baseline, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
