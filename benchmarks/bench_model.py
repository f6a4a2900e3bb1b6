"""Time one training step of our dense model, our token-dropped model and HF BertForMaskedLM.

    python benchmarks/bench_model.py [--json OUT] [--configs tiny,mid] [--steps N] [--compile]

All three run in one process at the same size (fp32, dropout 0.1, random tokens with 15%
masking) and take turns step by step, so machine noise hits them alike; the medians over
the measured rounds are reported. The CPU pressure (Linux PSI) before and after is recorded:
on a shared machine a high value means other processes competed for the cores. A step is
forward, backward and torch.optim.AdamW.step():

    dense   BertForTokenDropPretraining, no dropping (strategy none), sparse MLM head,
            pretrain.kernels' CPU kernels (--kernels torch: PyTorch's ops only)
    drop    the same with loss_ema selection at keep_ratio 0.5, including select() and the
            importance table's accumulate + synchronize_and_apply
    hf      transformers.BertForMaskedLM (attn_implementation="sdpa"), the loss over all
            positions as usual (labels = -100 where not masked)

Our models run as the trainer runs them: static shapes (the masking's most predictions per
row, ``max_predictions``), no padding mask for rows without padding. With ``--compile``,
two more take their turns: ``dense_compiled`` and ``drop_compiled``, the same models under
``torch.compile(fullgraph=True, dynamic=False)`` (inductor), their compilation in the
unmeasured warm-up steps.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pretrain.flops import flops_ratio  # noqa: E402
from pretrain.importance import ImportanceTable  # noqa: E402
from pretrain.kernels import KERNELS  # noqa: E402
from pretrain.masking import DynamicMasker, max_predictions  # noqa: E402
from pretrain.model import BertForTokenDropPretraining, ModelConfig, num_kept_tokens  # noqa: E402

PAD, UNK, CLS, SEP, MASK = 0, 1, 2, 3, 4  # the data_prep layout; here only for the random data
SPECIAL_IDS = (PAD, UNK, CLS, SEP, MASK)

BENCH_CONFIGS = {
    "tiny": dict(preset="tiny", batch_size=8, seq_len=512, vocab_size=8192),
    "mid": dict(preset="mid", batch_size=8, seq_len=512, vocab_size=8192),
}


def machine_description() -> dict:
    cpu = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import transformers

    return {
        "cpu": cpu,
        "logical_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "malloc_env": {k: v for k, v in os.environ.items() if k.startswith("MALLOC_")},
        "ld_preload": os.environ.get("LD_PRELOAD", ""),
    }


def make_batches(num: int, batch_size: int, seq_len: int, vocab_size: int, seed: int) -> list:
    """Random token rows ([CLS] ... [SEP]) with dynamic 15% masking."""
    gen = torch.Generator().manual_seed(seed)
    masker = DynamicMasker(SPECIAL_IDS, MASK, vocab_size, seed=seed)
    batches = []
    for b in range(num):
        ids = torch.randint(len(SPECIAL_IDS), vocab_size, (batch_size, seq_len), generator=gen)
        ids[:, 0], ids[:, -1] = CLS, SEP
        masked, labels = masker(ids, torch.arange(b * batch_size, (b + 1) * batch_size), epoch=0)
        attention_mask = torch.ones(batch_size, seq_len, dtype=torch.bool)
        batches.append((masked, attention_mask, labels))
    return batches


def cpu_pressure() -> float | None:
    """Share of the last 60 s in which some runnable task waited for a CPU (Linux PSI), in %.

    Other processes wanting the CPU while the benchmark runs show up here; a high value
    means the step times are inflated and noisier.
    """
    try:
        first = Path("/proc/pressure/cpu").read_text().splitlines()[0]
        return float(dict(kv.split("=") for kv in first.split()[1:])["avg60"])
    except (OSError, KeyError, ValueError, IndexError):
        return None


def bench_config(
    name: str,
    steps: int,
    warmup: int,
    seed: int,
    attention_dropout: float | None = None,
    kernels: str = "auto",
    compile: bool = False,
) -> dict:
    """``warmup`` + ``steps`` rounds of one step of each model; medians over ``steps``."""
    from transformers import BertConfig, BertForMaskedLM

    spec = BENCH_CONFIGS[name]
    batch_size, seq_len, vocab_size = spec["batch_size"], spec["seq_len"], spec["vocab_size"]
    cfg = ModelConfig.from_preset(
        spec["preset"],
        vocab_size=vocab_size,
        dropout=0.1,
        attention_dropout=attention_dropout,
        kernels=kernels,
    )
    keep_ratio = 0.5
    kept = num_kept_tokens(seq_len, keep_ratio)

    width = max_predictions(seq_len)

    torch.manual_seed(seed)
    dense = BertForTokenDropPretraining(cfg).train()
    drop = BertForTokenDropPretraining(cfg).train()
    drop.load_state_dict(dense.state_dict())
    hf = BertForMaskedLM(BertConfig(**cfg.to_hf_bert_config(), attn_implementation="sdpa")).train()
    models = {"dense": dense, "drop": drop}
    if compile:
        for key in ("dense", "drop"):
            twin = BertForTokenDropPretraining(cfg).train()
            twin.load_state_dict(dense.state_dict())
            models[f"{key}_compiled"] = twin
    optimizers = {m: torch.optim.AdamW(m.parameters(), lr=1e-4) for m in (*models.values(), hf)}
    forwards = {
        key: torch.compile(m, fullgraph=True, dynamic=False) if key.endswith("_compiled") else m
        for key, m in models.items()
    }
    table = ImportanceTable(
        vocab_size, "loss_ema", allow_ids=(UNK, CLS, SEP, MASK), deny_ids=(PAD,)
    )
    select_gen = torch.Generator().manual_seed(seed)
    batches = make_batches(4, batch_size, seq_len, vocab_size, seed)

    def our_step(key, batch):
        ids, _, labels = batch  # no row is padded: no mask, as the trainer passes it
        model, dropping = models[key], key.startswith("drop")
        kept_idx = table.select(ids, kept, select_gen) if dropping else None
        out = forwards[key](ids, None, labels, kept_idx, width)
        out.loss.backward()
        optimizers[model].step()
        optimizers[model].zero_grad(set_to_none=True)
        if dropping:
            table.accumulate(out.target_ids, out.token_losses)
            table.synchronize_and_apply()

    def hf_step(batch):
        ids, attention_mask, labels = batch
        hf(input_ids=ids, attention_mask=attention_mask, labels=labels).loss.backward()
        optimizers[hf].step()
        optimizers[hf].zero_grad(set_to_none=True)

    runs = {key: (lambda batch, key=key: our_step(key, batch)) for key in models}
    runs["hf"] = hf_step
    pressure_before = cpu_pressure()
    times: dict[str, list[float]] = {key: [] for key in runs}
    for step in range(warmup + steps):
        batch = batches[step % len(batches)]
        # Rotate the starting model too, so none always runs right after another's backward.
        order = list(runs)[step % len(runs) :] + list(runs)[: step % len(runs)]
        for key in order:
            start = time.perf_counter()
            runs[key](batch)
            elapsed = time.perf_counter() - start
            if step >= warmup:
                times[key].append(elapsed)

    result = {
        "preset": spec["preset"],
        "batch_size": batch_size,
        "seq_len": seq_len,
        "vocab_size": vocab_size,
        "keep_ratio": keep_ratio,
        "kept_tokens": kept,
        "dropout": cfg.dropout,
        "attention_dropout": cfg.attention_dropout_p,
        "kernels": cfg.kernels,
        "steps": steps,
        "warmup": warmup,
        "dense_step_s": statistics.median(times["dense"]),
        "drop_step_s": statistics.median(times["drop"]),
        "hf_step_s": statistics.median(times["hf"]),
        "flops_ratio": flops_ratio(cfg, seq_len, keep_ratio, mask_fraction=0.15),
        "all_step_s": times,
        "cpu_pressure_avg60_before": pressure_before,
        "cpu_pressure_avg60_after": cpu_pressure(),
    }
    result["drop_over_dense"] = result["drop_step_s"] / result["dense_step_s"]
    result["drop_over_dense_per_flops_ratio"] = result["drop_over_dense"] / result["flops_ratio"]
    result["dense_speedup_vs_hf"] = result["hf_step_s"] / result["dense_step_s"]
    result["drop_speedup_vs_hf"] = result["hf_step_s"] / result["drop_step_s"]
    if compile:
        for key in ("dense", "drop"):
            compiled = statistics.median(times[f"{key}_compiled"])
            result[f"{key}_compiled_step_s"] = compiled
            result[f"{key}_compiled_speedup"] = result[f"{key}_step_s"] / compiled
    return result


def print_table(results: dict) -> None:
    header = (
        f"{'config':<6} {'dense s':>9} {'drop s':>9} {'HF s':>9} {'drop/dense':>11} "
        f"{'flops ratio':>12} {'HF/dense':>9} {'HF/drop':>8}"
    )
    print(header)
    print("-" * len(header))
    for name, r in results.items():
        print(
            f"{name:<6} {r['dense_step_s']:>9.3f} {r['drop_step_s']:>9.3f} {r['hf_step_s']:>9.3f} "
            f"{r['drop_over_dense']:>11.3f} {r['flops_ratio']:>12.3f} "
            f"{r['dense_speedup_vs_hf']:>8.2f}x {r['drop_speedup_vs_hf']:>7.2f}x"
        )
        if "dense_compiled_step_s" in r:
            print(
                f"{'':<6} compiled: dense {r['dense_compiled_step_s']:.3f} s "
                f"({r['dense_compiled_speedup']:.2f}x eager), drop {r['drop_compiled_step_s']:.3f} s "
                f"({r['drop_compiled_speedup']:.2f}x eager)"
            )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--json", type=Path, help="write the results to this JSON file")
    parser.add_argument("--configs", default="tiny,mid", help="comma-separated: tiny, mid")
    parser.add_argument("--steps", type=int, default=10, help="measured steps per model")
    parser.add_argument("--warmup", type=int, default=2, help="unmeasured steps per model first")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)"
    )
    parser.add_argument("--seed", type=int, default=0)

    parser.add_argument(
        "--attention-dropout",
        type=float,
        default=None,
        help="attention dropout of all three models (default: the hidden dropout, 0.1)",
    )
    parser.add_argument(
        "--kernels",
        choices=KERNELS,
        default="auto",
        help="ModelConfig.kernels of our two models (torch: PyTorch's ops only, SDPA throughout)",
    )
    parser.add_argument(
        "--compile",
        action="store_true",
        help="also time our two models under torch.compile(fullgraph=True), side by side",
    )
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.configs.split(",") if n.strip()]
    unknown = [n for n in names if n not in BENCH_CONFIGS]
    if unknown:
        parser.error(f"unknown configs {unknown}; choose from {sorted(BENCH_CONFIGS)}")
    if args.threads:
        torch.set_num_threads(args.threads)

    results = {}
    for name in names:
        results[name] = bench_config(
            name,
            args.steps,
            args.warmup,
            args.seed,
            args.attention_dropout,
            args.kernels,
            args.compile,
        )
        pressure = results[name]["cpu_pressure_avg60_after"]
        print(f"[{name}] done; CPU pressure (PSI avg60) {pressure}%", file=sys.stderr)
    print_table(results)
    if args.json:
        report = {
            "benchmark": "model training step",
            "command": " ".join([Path(sys.executable).name, *sys.argv]),
            "machine": machine_description(),
            "configs": results,
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
