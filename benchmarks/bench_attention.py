"""Attention with dropout on the CPU: SDPA's math path against pretrain.kernels' kernel.

    python benchmarks/bench_attention.py [--rounds 10] [--json OUT]

One encoder layer's attention, forward and backward, at the `mid` benchmark size
([batch 8, heads 4, queries, keys, head_dim 64], float32, dropout 0.1), for the shapes the
token-dropped model uses: full layers (512 x 512), the boundary layer (256 queries over 512
keys) and the kept layers (256 x 256). Three contenders, interleaved round by round,
medians reported:

    sdpa_dropout   F.scaled_dot_product_attention(dropout_p=0.1): PyTorch's math path
    ours_dropout   pretrain.kernels.attention(dropout_p=0.1): CpuDropoutAttention
    sdpa_no_drop   F.scaled_dot_product_attention(dropout_p=0): PyTorch's fused CPU kernel,
                   the floor (it does less work: no dropout at all)
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pretrain.kernels import attention  # noqa: E402

SHAPES = {"full 512x512": (512, 512), "boundary 256x512": (256, 512), "kept 256x256": (256, 256)}
CONTENDERS = {
    "sdpa_dropout": lambda q, k, v: F.scaled_dot_product_attention(q, k, v, dropout_p=0.1),
    "ours_dropout": lambda q, k, v: attention(q, k, v, None, 0.1),
    "sdpa_no_drop": lambda q, k, v: F.scaled_dot_product_attention(q, k, v),
}


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--json", type=Path)
    args = p.parse_args()

    results = {}
    for shape_name, (num_q, num_k) in SHAPES.items():
        gen = torch.Generator().manual_seed(0)
        q = torch.randn(8, 4, num_q, 64, generator=gen, requires_grad=True)
        k = torch.randn(8, 4, num_k, 64, generator=gen, requires_grad=True)
        v = torch.randn(8, 4, num_k, 64, generator=gen, requires_grad=True)
        grad = torch.randn(8, 4, num_q, 64, generator=gen)
        times = {name: [] for name in CONTENDERS}
        for r in range(args.warmup + args.rounds):
            for name, fn in CONTENDERS.items():
                start = time.perf_counter()
                fn(q, k, v).backward(grad)
                if r >= args.warmup:
                    times[name].append(time.perf_counter() - start)
        medians = {name: statistics.median(t) * 1e3 for name, t in times.items()}
        results[shape_name] = {f"{name}_ms": round(ms, 2) for name, ms in medians.items()}
        results[shape_name]["sdpa_dropout_over_ours"] = round(
            medians["sdpa_dropout"] / medians["ours_dropout"], 2
        )
        results[shape_name]["ours_over_no_dropout_floor"] = round(
            medians["ours_dropout"] / medians["sdpa_no_drop"], 2
        )

    print(
        f"{'shape':<18} {'SDPA drop ms':>13} {'ours ms':>9} {'SDPA no-drop ms':>16} {'speed-up':>9}"
    )
    for shape_name, r in results.items():
        print(
            f"{shape_name:<18} {r['sdpa_dropout_ms']:>13.1f} {r['ours_dropout_ms']:>9.1f} "
            f"{r['sdpa_no_drop_ms']:>16.1f} {r['sdpa_dropout_over_ours']:>8.2f}x"
        )
    if args.json:
        args.json.write_text(
            json.dumps({"threads": torch.get_num_threads(), "shapes": results}, indent=2) + "\n"
        )


if __name__ == "__main__":
    main()
