"""What the training loop costs on top of the model, and what the EMA all-reduce costs.

    python benchmarks/bench_train.py [--steps 8] [--warmup 2] [--json OUT] [--skip-two-ranks]

Both at the ``mid`` config of benchmarks/bench_model.py (12 layers, hidden 256, 4 heads,
FFN 1024, seq 512, vocab 8192, micro batch 8, fp32 on CPU), with loss_ema token dropping
at keep ratio 0.5, on the built-in corpus prepared at seq_len 512.

1. Loop overhead, one rank, in one process, side by side step by step:
   - ``loop``: ``Trainer.train_one_step()`` of pretrain/run.py's trainer: a DeepSpeed
     engine (ZeRO 0, torch AdamW, gradient clipping as in ds_configs/cpu_zero0.json),
     memory-mapped data loading, masking, token selection, the table's accumulate and
     synchronize, the step statistics all-reduce;
   - ``model``: bench_model.py's token-dropped step on batches already in memory:
     forward, backward, ``torch.optim.AdamW.step()``, selection and table update.
   Overhead = loop / model - 1 (medians).
2. EMA all-reduce, two ranks (``deepspeed --num_gpus 2 pretrain/run.py``, ZeRO-2): the
   trainer's own per-step timing of ``synchronize_and_apply`` (the [2, 8192] float32
   all_reduce plus the EMA update) against the step time, from metrics.jsonl.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from bench_model import machine_description  # noqa: E402


def prepare_data(root: Path) -> Path:
    data = root / "data"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "data_prep",
            "--input",
            "builtin:python-docstrings",
            "--output",
            str(data),
            "--seq-len",
            "512",
            "--vocab-size",
            "8192",
        ],
        cwd=REPO,
        check=True,
        capture_output=True,
    )
    return data


def ds_config(root: Path, name: str, micro: int, stage: int) -> Path:
    with open(REPO / "ds_configs" / f"cpu_zero{stage}.json") as f:
        cfg = json.load(f)
    cfg["train_batch_size"] = micro * (2 if name == "two" else 1)
    cfg["train_micro_batch_size_per_gpu"] = micro
    cfg.pop("tensorboard", None)
    path = root / f"ds_{name}.json"
    path.write_text(json.dumps(cfg))
    return path


def loop_overhead(root: Path, data: Path, steps: int, warmup: int) -> dict:
    from pretrain import distributed
    from pretrain.config import RunConfig, resolve
    from pretrain.importance import ImportanceTable
    from pretrain.model import BertForTokenDropPretraining
    from pretrain.trainer import Trainer

    run = RunConfig(
        data=str(data),
        output=str(root / "run1"),
        deepspeed_config=str(ds_config(root, "one", 8, 0)),
        model="mid",
        train_steps=10_000,
        eval_every=0,
        save_every=0,
        dropout=0.1,
    )
    resolved = resolve(run)
    distributed.init()
    trainer = Trainer(resolved)

    torch.manual_seed(0)
    model = BertForTokenDropPretraining(resolved.model).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    special = resolved.manifest.special
    table = ImportanceTable(
        resolved.manifest.vocab_size,
        "loss_ema",
        allow_ids=(special.cls, special.sep, special.mask, special.unk),
        deny_ids=(special.pad,),
    )
    generator = torch.Generator().manual_seed(0)
    batches = [next(iter(trainer.loader.next_step())) for _ in range(4)]  # in memory

    def model_step(batch):
        kept_idx = table.select(batch.input_ids, resolved.kept_tokens, generator)
        out = model(batch.input_ids, batch.attention_mask, batch.labels, kept_idx)
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        table.accumulate(out.target_ids, out.token_losses)
        table.synchronize_and_apply()

    times = {"loop": [], "model": []}
    for i in range(warmup + steps):
        order = ("loop", "model") if i % 2 == 0 else ("model", "loop")
        for key in order:
            start = time.perf_counter()
            if key == "loop":
                trainer.train_one_step()
            else:
                model_step(batches[i % len(batches)])
            if i >= warmup:
                times[key].append(time.perf_counter() - start)
    loop, bare = statistics.median(times["loop"]), statistics.median(times["model"])
    return {
        "loop_step_s": loop,
        "model_step_s": bare,
        "loop_overhead": loop / bare - 1,
        "all_step_s": times,
    }


def allreduce_share(root: Path, data: Path, steps: int, warmup: int) -> dict:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = root / "run2"
    cmd = [
        "deepspeed",
        "--num_gpus",
        "2",
        "--master_port",
        str(port),
        "pretrain/run.py",
        "--deepspeed_config",
        str(ds_config(root, "two", 8, 2)),
        "--data",
        str(data),
        "--output",
        str(out),
        "--model",
        "mid",
        "--train-steps",
        str(warmup + steps),
        "--eval-every",
        "0",
        "--eval-batches",
        "1",
        "--save-every",
        "0",
    ]
    subprocess.run(cmd, cwd=REPO, check=True, capture_output=True)
    records = [json.loads(line) for line in open(out / "metrics.jsonl")]
    records = [r for r in records if "step_s" in r][warmup:]
    step = statistics.median(r["step_s"] for r in records)
    sync = statistics.median(r["table_sync_s"] for r in records)
    return {"two_rank_step_s": step, "table_sync_s": sync, "table_sync_share": sync / step}


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--json")
    p.add_argument("--skip-two-ranks", action="store_true")
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench_train_") as tmp:
        root = Path(tmp)
        data = prepare_data(root)
        result = {
            "machine": machine_description(),
            "config": "mid, seq 512, micro batch 8, keep 0.5",
        }
        if (
            not args.skip_two_ranks
        ):  # first: the in-process part below initialises torch.distributed
            result.update(allreduce_share(root, data, args.steps, args.warmup))
        os.environ.setdefault("MASTER_PORT", "29593")
        result.update(loop_overhead(root, data, args.steps, args.warmup))
    for key, value in result.items():
        if key not in ("all_step_s", "machine"):
            print(f"{key:>20}: {value}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
